//! The real `s3spot-lambda` binary under the Lambda Runtime API emulator, launching on moto:
//! cold start, CPU and wall time per event, peak RSS and the size of the binary as it ships.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use s3spot_tests::{Moto, Outcome, RuntimeApi, create_launch_template, s3spot_env};

use crate::{Options, Table, median, sibling};

const TEMPLATE: &str = "s3spot-worker";
/// Instances of the pipeline running while the per-event cost is measured.
const IN_FLIGHT: usize = 10;

pub async fn run(options: &Options) -> anyhow::Result<Table> {
    let binary = sibling("s3spot-lambda")?;
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    create_launch_template(&ec2, TEMPLATE).await;
    // The events' bucket: each job's claim and status.json are kept there.
    moto.create_buckets(&["data"]).await;

    let mut cold_ms = Vec::new();
    for _ in 0..options.starts {
        let api = RuntimeApi::start().await;
        let started = Instant::now();
        let mut function = spawn(&binary, &moto, &api)?;
        anyhow::ensure!(
            api.wait_for_next_call(1, Duration::from_secs(10)).await,
            "s3spot-lambda never asked for an event"
        );
        let first = api.first_next().await.context("no first /next")?;
        cold_ms.push((first - started).as_secs_f64() * 1e3);
        stop(&mut function);
    }

    // One warm process, many events: distinct keys, so that each one launches. Jobs finish as
    // others start: past IN_FLIGHT running instances, the oldest is terminated (between events,
    // by this process), so that the runaway guard reads a steady pipeline's worth of instances.
    let api = RuntimeApi::start().await;
    let mut function = spawn(&binary, &moto, &api)?;
    anyhow::ensure!(
        api.wait_for_next_call(1, Duration::from_secs(10)).await,
        "s3spot-lambda never asked for an event"
    );
    let pid = function.id();
    let cpu_before = cpu_time(pid)?;
    let mut wall_ms = Vec::new();
    let mut running = std::collections::VecDeque::new();
    let started = Instant::now();
    for n in 0..options.events {
        let sent = Instant::now();
        let id = api.invoke(event(n)).await;
        match api.outcome(&id, Duration::from_secs(30)).await {
            Outcome::Response(report) => {
                let id = report["launched"][0]["instance_id"].as_str();
                let id = id.with_context(|| format!("event {n} did not launch: {report}"))?;
                running.push_back(id.to_owned());
            }
            other => anyhow::bail!("event {n} failed: {other:?}"),
        }
        wall_ms.push(sent.elapsed().as_secs_f64() * 1e3);
        if running.len() > IN_FLIGHT
            && let Some(oldest) = running.pop_front()
        {
            ec2.terminate_instances()
                .instance_ids(oldest)
                .send()
                .await
                .context("terminate a finished instance")?;
        }
    }
    // The answer is posted before the process asks for the next event; let it get there, so
    // that the CPU time includes the whole of the last event.
    api.wait_for_next_call(options.events + 1, Duration::from_secs(10))
        .await;
    let total = started.elapsed();
    let cpu = cpu_time(pid)? - cpu_before;
    let peak_kib = peak_rss_kib(pid)?;
    stop(&mut function);

    let size = std::fs::metadata(&binary)?.len();
    let stripped = stripped_size(&binary)?;

    let cpu_per_event_ms = cpu.as_secs_f64() * 1e3 / options.events as f64;
    let mut table = Table::new(
        "Lambda: s3spot-lambda under a Runtime API emulator, launching on moto",
        &["measure", "value", "target"],
    );
    table.row(vec![
        format!(
            "cold start to the first /next (median of {})",
            options.starts
        ),
        format!("{:.1} ms", median(&mut cold_ms)),
        "< 50 ms".into(),
    ]);
    table.row(vec![
        format!("CPU per event ({} events)", options.events),
        format!("{cpu_per_event_ms:.2} ms"),
        "< 2 ms".into(),
    ]);
    table.row(vec![
        "wall per event, median (moto's CreateFleet included)".into(),
        format!("{:.1} ms", median(&mut wall_ms)),
        String::new(),
    ]);
    table.row(vec![
        "peak RSS".into(),
        format!("{:.1} MiB", peak_kib as f64 / 1024.0),
        "< 30 MiB".into(),
    ]);
    table.row(vec![
        "binary size (stripped, as it ships)".into(),
        format!("{:.1} MiB", stripped as f64 / 1048576.0),
        String::new(),
    ]);
    table.note(format!(
        "{} events in {:.2} s, with {IN_FLIGHT} instances of the pipeline running. Each event \
         asks EC2 for the job's instances, reads its status.json, claims the attempt, counts the \
         pipeline's instances (the runaway guard), makes the fleet request, looks up the spot price \
         of the instance it got, records both in the claim and announces the launch: three EC2 \
         reads, a launch, a read and two writes to S3, and an event to EventBridge; unstripped \
         binary {:.1} MiB.",
        options.events,
        total.as_secs_f64(),
        size as f64 / 1048576.0
    ));
    Ok(table)
}

fn spawn(binary: &std::path::Path, moto: &Moto, api: &RuntimeApi) -> anyhow::Result<Child> {
    let mut env = s3spot_env(TEMPLATE);
    env.extend(moto.env());
    env.extend(api.env());
    env.push(("AWS_LAMBDA_LOG_FORMAT", "JSON".into()));
    Command::new(binary)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {}", binary.display()))
}

fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A console-style S3 Put event for a key of its own.
fn event(n: usize) -> String {
    serde_json::json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-22T00:00:00.000Z",
        "eventName": "ObjectCreated:Put",
        "s3": {
            "bucket": {"name": "data", "arn": "arn:aws:s3:::data"},
            "object": {
                "key": format!("bench/object-{n:05}.csv"),
                "size": 1024,
                "eTag": "0123456789abcdef0123456789abcdef",
                "sequencer": format!("{:018X}", 0x0A1B_2C3D_4E5F_0000_u64 + n as u64),
            }
        }
    }]})
    .to_string()
}

/// CPU time of every thread of `pid`, from /proc/<pid>/task/*/schedstat (nanoseconds, unlike
/// /proc/<pid>/stat's clock ticks).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let mut total = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may have exited between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|ns| ns.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(Duration::from_nanos(total))
}

fn peak_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

fn stripped_size(binary: &std::path::Path) -> anyhow::Result<u64> {
    let out = tempfile::NamedTempFile::new()?;
    let status = Command::new("strip")
        .arg("-o")
        .arg(out.path())
        .arg(binary)
        .status()
        .context("run strip (binutils)")?;
    anyhow::ensure!(status.success(), "strip failed: {status}");
    Ok(std::fs::metadata(out.path())?.len())
}
