//! The job commands as requests: what `s3spot jobs` asks, and how it is carried out on a
//! [`Jobs`] or a [`Handler`], in this process (AWS) or in `s3spot local serve` (which receives
//! the request over its control socket).

use s3spot_lambda::{Clock, Handler, Jobs, JobsConfig, Launcher, StatusStore, Target};
use serde::{Deserialize, Serialize};

/// One job command: parsed from the command line, and sent as JSON to `s3spot local serve`.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Subcommand)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// The pipeline's instances (EC2 lists terminated ones for about an hour), oldest first,
    /// with what each one's status.json says. Stuck ones are flagged.
    List {
        /// Active this long counts as stuck, e.g. 90m; default: S3SPOT_MAX_RUNTIME plus 10
        /// minutes.
        #[arg(long = "stuck-after", value_name = "DURATION", value_parser = seconds)]
        stuck_after_secs: Option<u64>,
    },
    /// A job's instances, its status.json and the end of its logs.
    Show {
        /// An object key, s3://bucket/key, or the id of one of the job's instances.
        job: String,
    },
    /// Terminate a job's pending or running instance and mark it cancelled in status.json.
    Cancel {
        /// An object key, s3://bucket/key, or the id of one of the job's instances.
        job: String,
    },
    /// Launch a job again as its next attempt, through the launcher's guard and options. Needs
    /// the same S3SPOT_* settings as the function.
    Retry {
        /// An object key, s3://bucket/key, or the id of one of the job's instances.
        job: String,
    },
    /// What the jobs cost: the estimates in their status.json, summed by day, results prefix,
    /// state or instance type, beside what on-demand would have cost.
    Cost {
        /// Jobs whose status.json was written this recently, e.g. 7d, 12h.
        #[arg(long, value_name = "DURATION", value_parser = seconds, default_value = "7d")]
        since: u64,
        /// What to sum by: day, prefix, state or type.
        #[arg(long, value_name = "KEY", default_value = "day")]
        by: s3spot_lambda::cost::CostBy,
    },
    /// Terminate the stuck instances (pending or running past the max runtime and its grace)
    /// and mark them failed.
    Reap {
        /// Only list what would be terminated.
        #[arg(long)]
        dry_run: bool,
        /// Active this long counts as stuck, e.g. 90m; default: S3SPOT_MAX_RUNTIME plus 10
        /// minutes.
        #[arg(long = "stuck-after", value_name = "DURATION", value_parser = seconds)]
        stuck_after_secs: Option<u64>,
    },
}

/// A duration as people write it ("90m", "2h"), in whole seconds.
fn seconds(text: &str) -> Result<u64, humantime::DurationError> {
    humantime::parse_duration(text).map(|d| d.as_secs())
}

impl Request {
    /// Whether the request may launch, and so needs the function's whole configuration: a
    /// retry does, and so does a reap, which launches the next attempt of a job that EC2 took
    /// back.
    pub fn launches(&self) -> bool {
        matches!(
            self,
            Request::Retry { .. } | Request::Reap { dry_run: false, .. }
        )
    }
}

fn clock(config: &JobsConfig, stuck_after_secs: Option<u64>) -> Clock {
    Clock {
        stuck_after_secs,
        ..Clock::now(config)
    }
}

/// Runs a request that launches nothing on `jobs`; the answer as JSON, or the error's whole
/// chain.
pub async fn execute<L: Launcher, S: StatusStore>(
    jobs: &Jobs<L, S>,
    request: &Request,
) -> Result<serde_json::Value, String> {
    let config = jobs.config();
    let value = match request {
        Request::List { stuck_after_secs } => jobs
            .list(clock(config, *stuck_after_secs))
            .await
            .map(serde_json::to_value),
        Request::Show { job } => jobs
            .show(&Target::parse(job), clock(config, None))
            .await
            .map(serde_json::to_value),
        Request::Cancel { job } => jobs
            .cancel(&Target::parse(job), clock(config, None))
            .await
            .map(serde_json::to_value),
        Request::Reap {
            stuck_after_secs, ..
        } => jobs
            .sweep(clock(config, *stuck_after_secs))
            .await
            .map(|sweep| serde_json::to_value(sweep.planned())),
        Request::Cost { since, by } => {
            let since = std::time::SystemTime::now()
                .checked_sub(std::time::Duration::from_secs(*since))
                .unwrap_or(std::time::UNIX_EPOCH);
            jobs.cost(since, *by).await.map(serde_json::to_value)
        }
        Request::Retry { .. } => {
            return Err("retry launches: it runs on the function's handler".into());
        }
    };
    value
        .map_err(|error| s3spot_lambda::error_chain(&error))?
        .map_err(|error| error.to_string())
}

/// Runs any request on `handler`: those that launch through it, the others on its jobs.
pub async fn on_handler<L: Launcher, S: StatusStore>(
    handler: &Handler<L, S>,
    request: &Request,
) -> Result<serde_json::Value, String> {
    let config = handler.jobs().config().clone();
    let value = match request {
        Request::Retry { job } => handler
            .retry(&Target::parse(job))
            .await
            .map(serde_json::to_value),
        Request::Reap {
            dry_run: false,
            stuck_after_secs,
        } => handler
            .reap(clock(&config, *stuck_after_secs), false)
            .await
            .map(serde_json::to_value),
        _ => return execute(&handler.jobs(), request).await,
    };
    value
        .map_err(|error| s3spot_lambda::error_chain(&error))?
        .map_err(|error| error.to_string())
}
