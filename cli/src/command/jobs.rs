//! `s3spot jobs`: the pipeline's instances and the controls on them, in AWS or in a running
//! `s3spot local serve`. Both run the same library calls; only where they run differs.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use s3spot_bootstrap::Status;
use s3spot_bootstrap::Usd;
use s3spot_lambda::Report;
use s3spot_lambda::cost::{CostGroup, CostReport};
use s3spot_lambda::jobs::{JobDetail, JobInstance, Stopped};
use s3spot_lambda::{AwsLauncher, Backend, Config, Handler, Jobs, JobsConfig, S3Statuses};

use crate::jobs::{Request, execute, on_handler};
use crate::local::control;

#[derive(Args)]
pub struct JobsArgs {
    /// The jobs of the `s3spot local serve` that keeps its data in DIR, instead of AWS.
    #[arg(long, value_name = "DIR", global = true)]
    local: Option<PathBuf>,
    /// One JSON document instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Request,
}

/// Returns whether the command did all it was asked.
pub fn run(args: JobsArgs) -> anyhow::Result<bool> {
    let request = args.command;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let answer = runtime.block_on(async {
        match &args.local {
            Some(dir) => control::ask(dir, &request).await,
            None => in_aws(&request).await,
        }
    })?;
    print(&request, answer, args.json)
}

async fn in_aws(request: &Request) -> anyhow::Result<serde_json::Value> {
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    in_aws_with(&sdk, request).await
}

/// Runs `request` in AWS with `sdk`'s credentials and region, and the S3SPOT_* settings.
pub(super) async fn in_aws_with(
    sdk: &aws_config::SdkConfig,
    request: &Request,
) -> anyhow::Result<serde_json::Value> {
    let sdk = sdk.clone();
    let launcher = AwsLauncher::new(
        &sdk,
        &Backend::from_env().context("bad configuration (S3SPOT_BACKEND)")?,
    );
    let statuses = S3Statuses::new(&sdk);
    let events = s3spot_lambda::events_from_env(&sdk)?;
    let answer = if request.launches() {
        let mut config = Config::from_env().context(
            "bad configuration (this command may launch, so it needs the function's whole \
             S3SPOT_* configuration)",
        )?;
        config.job.region = sdk.region().map(ToString::to_string);
        on_handler(
            &Handler::new(config, launcher, statuses).with_events(events),
            request,
        )
        .await
    } else {
        let config = JobsConfig::from_env().context("bad configuration")?;
        execute(
            &Jobs::new(config, launcher, statuses).with_events(events),
            request,
        )
        .await
    };
    answer.map_err(|error| anyhow::anyhow!(error))
}

fn print(request: &Request, answer: serde_json::Value, json: bool) -> anyhow::Result<bool> {
    let bad = |error: serde_json::Error| anyhow::anyhow!("unexpected answer: {error}");
    let (text, complete) = match request {
        Request::List { .. } => {
            let rows: Vec<JobInstance> = serde_json::from_value(answer.clone()).map_err(bad)?;
            (table(&rows), true)
        }
        Request::Show { .. } => {
            let detail: JobDetail = serde_json::from_value(answer.clone()).map_err(bad)?;
            (show(&detail), true)
        }
        Request::Cancel { .. } => {
            let stopped: Stopped = serde_json::from_value(answer.clone()).map_err(bad)?;
            (
                stopped_text(&stopped, "cancelled"),
                stopped.errors.is_empty(),
            )
        }
        Request::Reap { dry_run, .. } => {
            let stopped: Stopped = serde_json::from_value(answer.clone()).map_err(bad)?;
            let verb = if *dry_run { "would reap" } else { "reaped" };
            (stopped_text(&stopped, verb), stopped.errors.is_empty())
        }
        Request::Retry { .. } => {
            let report: Report = serde_json::from_value(answer.clone()).map_err(bad)?;
            (retried(&report), report.failed.is_empty())
        }
        Request::Cost { .. } => {
            let report: CostReport = serde_json::from_value(answer.clone()).map_err(bad)?;
            (cost(&report), report.unreadable.is_empty())
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{text}");
    }
    Ok(complete)
}

/// A key as text that cannot break a table: control characters escaped.
fn printable(key: &str) -> String {
    if key.chars().any(char::is_control) {
        format!("{key:?}")
    } else {
        key.to_owned()
    }
}

fn age(secs: Option<u64>) -> String {
    let Some(secs) = secs else {
        return "-".into();
    };
    match secs {
        0..120 => format!("{secs}s"),
        120..7200 => format!("{}m", secs / 60),
        7200..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

fn table(rows: &[JobInstance]) -> String {
    if rows.is_empty() {
        return "no instances, and no job waits for one\n".into();
    }
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|row| {
            if let Some(waiting) = &row.waiting {
                // No instance yet: why, and since when, where the instance's columns would be.
                let mut why = waiting.reason.clone();
                if waiting.pools_tried > 0 {
                    let _ = write!(why, " ({} pools)", waiting.pools_tried);
                }
                return [
                    "-".into(),
                    "WAITING".into(),
                    "-".into(),
                    "-".into(),
                    format!("since {}", waiting.since),
                    row.attempt.map_or_else(|| "-".into(), |a| a.to_string()),
                    why,
                    format!("s3://{}/{}", row.bucket, printable(&row.key)),
                ];
            }
            [
                row.instance_id.clone(),
                if row.stuck {
                    format!("{} STUCK", row.state)
                } else {
                    row.state.clone()
                },
                row.market.clone(),
                row.instance_type.clone().unwrap_or_else(|| "-".into()),
                age(row.age_secs),
                row.attempt.map_or_else(|| "-".into(), |a| a.to_string()),
                row.result.map_or_else(|| "-".into(), |r| r.to_string()),
                format!("s3://{}/{}", row.bucket, printable(&row.key)),
            ]
        })
        .collect();
    let header = [
        "INSTANCE", "STATE", "MARKET", "TYPE", "AGE", "ATTEMPT", "RESULT", "JOB",
    ];
    columns(&header, &cells)
}

/// Rows under a header, each column as wide as its widest cell; the last is left ragged.
fn columns<const N: usize>(header: &[&str; N], cells: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in cells {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
            }
        }
        text.push_str(out.trim_end());
        text.push('\n');
    };
    line(&header.map(String::from));
    for row in cells {
        line(row);
    }
    text
}

fn cost(report: &CostReport) -> String {
    let by = serde_json::to_value(report.by)
        .ok()
        .and_then(|v| v.as_str().map(str::to_uppercase))
        .unwrap_or_default();
    let row = |g: &CostGroup| {
        [
            g.group.clone(),
            g.attempts.to_string(),
            g.priced.to_string(),
            format!("{:.2}", g.seconds as f64 / 3600.0),
            Usd(g.usd).to_string(),
            Usd(g.on_demand_usd).to_string(),
            match g.saving_percent() {
                Some(percent) => format!("{} ({percent:.0}%)", Usd(g.saving_usd)),
                None => Usd(g.saving_usd).to_string(),
            },
        ]
    };
    let mut cells: Vec<[String; 7]> = report.groups.iter().map(row).collect();
    cells.push(row(&report.total));
    let mut text = format!(
        "{} job{} whose status.json was written since {}\n",
        report.jobs,
        if report.jobs == 1 { "" } else { "s" },
        report.since
    );
    text.push_str(&columns(
        &[
            by.as_str(),
            "ATTEMPTS",
            "PRICED",
            "HOURS",
            "COST",
            "ON-DEMAND",
            "SAVING",
        ],
        &cells,
    ));
    if report.total.priced < report.total.attempts {
        let _ = writeln!(
            text,
            "{} attempts have no price (launched before s3spot kept prices, or EC2 gave none): \
             counted, not summed",
            report.total.attempts - report.total.priced
        );
    }
    for unreadable in &report.unreadable {
        let _ = writeln!(text, "skipped {unreadable}");
    }
    text.push_str(
        "An estimate: instance hours at the launch price (at least a minute each) plus the \
         job's gp3 volume; not data transfer, requests, or the Lambda.\n",
    );
    text
}

fn show(detail: &JobDetail) -> String {
    let mut text = format!("job s3://{}/{}", detail.bucket, printable(&detail.key));
    if let Some(job_id) = &detail.job_id {
        let _ = write!(text, " ({job_id})");
    }
    text.push('\n');
    if detail.uploads.len() > 1 {
        let _ = writeln!(
            text,
            "{} uploads of it have results; this is the newest unless an instance was named: {}",
            detail.uploads.len(),
            detail.uploads.join(", ")
        );
    }
    text.push('\n');
    text.push_str(&table(&detail.instances));
    let _ = write!(text, "\n{}:\n", detail.status_url);
    match &detail.status {
        Some(status) => {
            text.push_str(&status_json(status));
            text.push('\n');
        }
        None => text.push_str("  none yet\n"),
    }
    for log in &detail.logs {
        let _ = write!(
            text,
            "\n{} (last {} bytes at most):\n",
            log.url,
            s3spot_lambda::jobs::LOG_TAIL_BYTES
        );
        if log.tail.is_empty() {
            text.push_str("(empty)\n");
        } else {
            text.push_str(&log.tail);
            if !log.tail.ends_with('\n') {
                text.push('\n');
            }
        }
    }
    text
}

fn status_json(status: &Status) -> String {
    serde_json::to_string_pretty(status).unwrap_or_default()
}

fn stopped_text(stopped: &Stopped, verb: &str) -> String {
    if stopped.instances.is_empty() && stopped.ended.is_empty() {
        return format!("{verb}: none\n");
    }
    let mut text = String::new();
    for instance in &stopped.instances {
        let _ = writeln!(
            text,
            "{verb} {} ({}, {}) s3://{}/{} attempt {}",
            instance.instance_id,
            instance.state,
            age(instance.age_secs),
            instance.bucket,
            printable(&instance.key),
            instance.attempt.unwrap_or(1),
        );
    }
    for ended in &stopped.ended {
        let instance = &ended.instance;
        let _ = writeln!(
            text,
            "ended without a status: {} ({}) s3://{}/{} attempt {}: {}",
            instance.instance_id,
            instance
                .state_reason
                .as_ref()
                .map_or_else(|| instance.state.clone(), |r| r.code.clone()),
            instance.bucket,
            printable(&instance.key),
            instance.attempt.unwrap_or(1),
            ended.outcome.lines().next().unwrap_or_default(),
        );
    }
    for error in &stopped.errors {
        let _ = writeln!(text, "warning: {error}");
    }
    text
}

fn retried(report: &Report) -> String {
    let mut text = String::new();
    for launched in &report.launched {
        let _ = writeln!(
            text,
            "launched s3://{}/{} on {} ({} {}, ClientToken {})",
            launched.bucket,
            printable(&launched.key),
            launched.instance_id,
            launched.market,
            launched.instance_type.as_deref().unwrap_or("template type"),
            launched.client_token
        );
    }
    for skipped in &report.skipped {
        let _ = writeln!(
            text,
            "skipped s3://{}/{}: {}",
            skipped.bucket,
            printable(&skipped.key),
            skipped.reason
        );
    }
    for failed in &report.failed {
        let _ = writeln!(
            text,
            "failed s3://{}/{}: {}",
            failed.bucket,
            printable(&failed.key),
            failed.error
        );
    }
    text
}
