//! A burst of uploads against an EC2 double that throttles launches as EC2 does: the real
//! handler, in this process, fed by a simulated queue (batches of 10, a few pollers, failed
//! records back after the visibility timeout). It reports how fast the burst became instances,
//! how many records waited, and that none failed.
//!
//! Then the two backends side by side on a larger burst: the Batch backend against the Batch
//! double (Batch's 50 API calls a second), and the EC2 backend against the EC2 double, for as
//! long as a time budget allows (at 2 launches a second, 10,000 instances take well over an
//! hour; the rest is projected from the rate measured).

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use s3spot_lambda::{
    Backend, BatchLauncher, Config, Ec2Launcher, Handler, HandlerError, Launcher, Response,
    S3Statuses,
};
use s3spot_tests::{BatchDouble, Ec2Double, REGION, S3Server, s3spot_lookup};
use serde_json::{Value, json};

use crate::{Options, Table};

const BUCKET: &str = "data";
/// EC2's launch bucket: 1000 instances, refilled at 2 a second.
const BUCKET_SIZE: f64 = 1000.0;
const REFILL_PER_SECOND: f64 = 2.0;

/// One message of the simulated queue: an upload, and when it may be received again.
struct Message {
    upload: usize,
    visible_at: Instant,
    receives: u32,
}

#[derive(Default)]
struct Tally {
    launched: usize,
    /// Uploads whose record came back at least once (it waited).
    waited: HashSet<usize>,
    /// Records that failed for good: a burst must have none.
    failed: Vec<String>,
    /// Seconds from the start at which each launch was reported.
    launch_times: Vec<f64>,
    most_receives: u32,
}

fn event(uploads: &[usize]) -> Value {
    let records: Vec<Value> = uploads
        .iter()
        .map(|n| {
            json!({
                "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": REGION,
                "eventTime": "2026-11-30T10:19:37.123Z", "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": BUCKET}, "object": {
                    "key": format!("in/burst-{n:05}.csv"), "size": 1024,
                    "eTag": "0123456789abcdef0123456789abcdef",
                    "sequencer": format!("{n:018X}")}}
            })
        })
        .collect();
    json!({ "Records": records })
}

/// The EC2 double throttling as EC2 does, its bucket `options.burst_tokens` full, an S3 server,
/// and one handler per poller on them (one concurrent invocation each, with its own clients).
async fn ec2_pollers(
    options: &Options,
) -> anyhow::Result<(Ec2Double, S3Server, Vec<Handler<Ec2Launcher, S3Statuses>>)> {
    let ec2 = Ec2Double::start();
    ec2.set_launch_bucket(BUCKET_SIZE, options.burst_tokens as f64, REFILL_PER_SECOND);
    let s3 = S3Server::start(&[BUCKET]);
    let mut config = Config::from_lookup(s3spot_lookup(
        "s3spot-worker",
        &[
            ("S3SPOT_MAX_INSTANCES", "100000"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large,m5.large"),
            ("S3SPOT_SUBNETS", "subnet-0a,subnet-0b,subnet-0c"),
        ],
    ))?;
    config.job.region = Some(REGION.into());
    let mut handlers = Vec::new();
    for _ in 0..options.pollers {
        // Each poller is one concurrent invocation of the function, with its own clients.
        handlers.push(Handler::new(
            config.clone(),
            Ec2Launcher::new(&ec2.sdk_config().await),
            S3Statuses::from_client(s3.client().await),
        ));
    }
    Ok((ec2, s3, handlers))
}

pub async fn run(options: &Options) -> anyhow::Result<Table> {
    let visibility = Duration::from_secs(options.burst_visibility_secs);
    let (ec2, _s3, handlers) = ec2_pollers(options).await?;
    let started = Instant::now();
    let tally = simulate(handlers, options.burst, visibility, None).await?;
    let total = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        tally.failed.is_empty(),
        "records failed for good: {:?}",
        &tally.failed[..tally.failed.len().min(5)]
    );
    let instances = ec2.instances().len();
    anyhow::ensure!(
        instances == options.burst,
        "{} instances for {} uploads",
        instances,
        options.burst
    );
    // The rate once the bucket's tokens are spent: launches after the first `tokens`.
    let steady = steady_rate(&tally.launch_times, options.burst_tokens);

    let mut table = Table::new(
        &format!(
            "Launch burst: {} uploads, EC2 double throttling like EC2",
            options.burst
        ),
        &["measure", "value"],
    );
    table.row(vec![
        "launched (one instance per upload)".into(),
        format!("{} of {}", tally.launched, options.burst),
    ]);
    table.row(vec![
        "failed for good (throttling or else)".into(),
        tally.failed.len().to_string(),
    ]);
    table.row(vec![
        "uploads that waited at least once".into(),
        tally.waited.len().to_string(),
    ]);
    table.row(vec![
        "most deliveries of one record".into(),
        tally.most_receives.max(1).to_string(),
    ]);
    table.row(vec![
        "fleet requests EC2 refused for its rate (the SDK's retries of them included)".into(),
        ec2.throttled_requests().to_string(),
    ]);
    table.row(vec!["all launched after".into(), format!("{total:.1} s")]);
    table.row(vec![
        format!(
            "launch rate once the bucket's {} tokens were spent",
            options.burst_tokens
        ),
        format!("{steady:.2} /s (EC2 refills {REFILL_PER_SECOND} /s)"),
    ]);
    table.note(format!(
        "{} pollers (QueueConcurrency) take batches of 10; a record that waits comes back after \
         {} s (the template's visibility timeout is 300 s; shortened here so the bench ends \
         sooner). EC2's bucket holds {BUCKET_SIZE} launches and refills {REFILL_PER_SECOND} a \
         second; it starts with {} tokens, as in an account that launched {} instances in the \
         minutes before. Each record is one CreateFleet over 9 pools (3 types x 3 subnets).",
        options.pollers,
        visibility.as_secs(),
        options.burst_tokens,
        BUCKET_SIZE as usize - options.burst_tokens,
    ));
    Ok(table)
}

/// Feeds `burst` uploads to `handlers` (one concurrent invocation each) through a simulated
/// queue, until every upload launched or `budget` is spent.
async fn simulate<L: Launcher + 'static>(
    handlers: Vec<Handler<L, S3Statuses>>,
    burst: usize,
    visibility: Duration,
    budget: Option<Duration>,
) -> anyhow::Result<Tally> {
    let started = Instant::now();
    let queue: Arc<Mutex<VecDeque<Message>>> = Arc::new(Mutex::new(
        (0..burst)
            .map(|upload| Message {
                upload,
                visible_at: started,
                receives: 0,
            })
            .collect(),
    ));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut pollers = Vec::new();
    for handler in handlers {
        let (queue, tally) = (Arc::clone(&queue), Arc::clone(&tally));
        pollers.push(tokio::spawn(async move {
            loop {
                if budget.is_some_and(|budget| started.elapsed() >= budget) {
                    break;
                }
                let batch: Vec<(usize, u32)> = {
                    let mut queue = queue.lock().expect("no panic holding the queue");
                    if queue.is_empty() {
                        break;
                    }
                    let now = Instant::now();
                    let mut batch = Vec::new();
                    let mut rest = VecDeque::new();
                    while let Some(mut message) = queue.pop_front() {
                        if batch.len() < 10 && message.visible_at <= now {
                            message.receives += 1;
                            batch.push((message.upload, message.receives));
                        } else {
                            rest.push_back(message);
                        }
                    }
                    *queue = rest;
                    batch
                };
                if batch.is_empty() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                let uploads: Vec<usize> = batch.iter().map(|(n, _)| *n).collect();
                let report = match handler.handle(event(&uploads)).await {
                    Ok(Response::Report(report)) | Err(HandlerError::Retryable(report)) => report,
                    other => panic!("unexpected answer: {other:?}"),
                };
                let at = started.elapsed().as_secs_f64();
                let mut tally = tally.lock().expect("no panic holding the tally");
                tally.launched += report.launched.len();
                tally
                    .launch_times
                    .extend(std::iter::repeat_n(at, report.launched.len()));
                let mut queue = queue.lock().expect("no panic holding the queue");
                for failed in report.failed {
                    let upload: usize = failed
                        .key
                        .trim_start_matches("in/burst-")
                        .trim_end_matches(".csv")
                        .parse()
                        .expect("a burst key");
                    if failed.retryable {
                        let receives = batch
                            .iter()
                            .find(|(n, _)| *n == upload)
                            .map_or(1, |(_, r)| *r);
                        tally.waited.insert(upload);
                        tally.most_receives = tally.most_receives.max(receives + 1);
                        queue.push_back(Message {
                            upload,
                            visible_at: Instant::now() + visibility,
                            receives,
                        });
                    } else {
                        tally
                            .failed
                            .push(format!("{}: {}", failed.key, failed.error));
                    }
                }
            }
        }));
    }
    for poller in pollers {
        poller.await?;
    }
    let tally = std::mem::take(&mut *tally.lock().expect("no panic holding the tally"));
    Ok(tally)
}

fn steady_rate(launch_times: &[f64], skip: usize) -> f64 {
    let mut times = launch_times.to_vec();
    times.sort_by(f64::total_cmp);
    let skip = skip.min(times.len().saturating_sub(1));
    if times.len() > skip + 1 {
        (times.len() - skip - 1) as f64 / (times[times.len() - 1] - times[skip]).max(1e-9)
    } else {
        f64::NAN
    }
}

/// The two backends on one burst of `options.backend_burst` uploads: the Batch backend against
/// the Batch double, and the EC2 backend against the EC2 double within a time budget.
pub async fn backends(options: &Options) -> anyhow::Result<Table> {
    let burst = options.backend_burst;
    let visibility = Duration::from_secs(options.burst_visibility_secs);

    let batch = BatchDouble::start_rate_limited();
    let s3 = S3Server::start(&[BUCKET]);
    let mut config = Config::from_lookup(s3spot_lookup(
        "",
        &[
            ("S3SPOT_BACKEND", "batch"),
            ("S3SPOT_BATCH_JOB_QUEUE", "s3spot-jobs"),
            ("S3SPOT_BATCH_JOB_DEFINITION", "s3spot-job"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
        ],
    ))?;
    config.job.region = Some(REGION.into());
    let Backend::Batch(target) = config.backend.clone() else {
        anyhow::bail!("S3SPOT_BACKEND=batch configures the Batch backend");
    };
    let mut handlers = Vec::new();
    for _ in 0..options.pollers {
        handlers.push(Handler::new(
            config.clone(),
            BatchLauncher::new(&batch.sdk_config().await, target.clone()),
            S3Statuses::from_client(s3.client().await),
        ));
    }
    let started = Instant::now();
    let on_batch = simulate(handlers, burst, visibility, None).await?;
    let batch_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        on_batch.failed.is_empty(),
        "records failed for good on Batch: {:?}",
        &on_batch.failed[..on_batch.failed.len().min(5)]
    );
    let jobs = batch.jobs();
    let mut names: Vec<&str> = jobs.iter().map(|job| job.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    anyhow::ensure!(
        jobs.len() == burst && names.len() == burst,
        "{} Batch jobs ({} names) for {burst} uploads",
        jobs.len(),
        names.len()
    );
    let (calls, throttled) = batch.calls();

    let (ec2, _s3, handlers) = ec2_pollers(options).await?;
    let budget = Duration::from_secs(options.ec2_budget_secs);
    let started = Instant::now();
    let on_ec2 = simulate(handlers, burst, visibility, Some(budget)).await?;
    let ec2_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        on_ec2.failed.is_empty(),
        "records failed for good on EC2: {:?}",
        &on_ec2.failed[..on_ec2.failed.len().min(5)]
    );
    let launched = ec2.instances().len();
    let ec2_steady = steady_rate(&on_ec2.launch_times, options.burst_tokens);
    // What is left goes at EC2's refill at best: a rate measured over a few minutes, with the
    // bucket's first tokens near its start, can only overstate it.
    let ec2_total = if launched >= burst {
        ec2_secs
    } else {
        ec2_secs + (burst - launched) as f64 / ec2_steady.min(REFILL_PER_SECOND)
    };

    let mut table = Table::new(
        &format!("Backends: a burst of {burst} uploads, Batch double and EC2 double"),
        &["measure", "batch backend", "ec2 backend"],
    );
    table.row(vec![
        "launched (jobs submitted / instances)".into(),
        format!("{} of {burst}", on_batch.launched),
        format!("{launched} of {burst} in the {} s budget", budget.as_secs()),
    ]);
    table.row(vec![
        "all launched after".into(),
        format!("{batch_secs:.0} s"),
        if launched >= burst {
            format!("{ec2_total:.0} s")
        } else {
            format!(
                "{ec2_total:.0} s (projected: the rest at {:.2} /s)",
                ec2_steady.min(REFILL_PER_SECOND)
            )
        },
    ]);
    table.row(vec![
        "launches per second, whole burst".into(),
        format!("{:.1} /s", burst as f64 / batch_secs),
        format!("{:.2} /s", burst as f64 / ec2_total),
    ]);
    table.row(vec![
        "launches per second, steady".into(),
        format!("{:.1} /s", steady_rate(&on_batch.launch_times, 0)),
        format!(
            "{ec2_steady:.2} /s (after the bucket's {} tokens)",
            options.burst_tokens
        ),
    ]);
    table.row(vec![
        "uploads that waited at least once".into(),
        on_batch.waited.len().to_string(),
        on_ec2.waited.len().to_string(),
    ]);
    table.row(vec![
        "failed for good".into(),
        on_batch.failed.len().to_string(),
        on_ec2.failed.len().to_string(),
    ]);
    table.row(vec![
        "API calls refused for the rate".into(),
        format!("{throttled} of {calls} Batch calls"),
        format!("{} fleet requests", ec2.throttled_requests()),
    ]);
    table.note(format!(
        "{} pollers (QueueConcurrency) take batches of 10. Batch: each launch is three calls \
         (the job's attempts listed, the lookup by name, the SubmitJob), paced at \
         S3SPOT_LAUNCH_RATE's Batch default of 6 a second per invocation, under Batch's 50 \
         calls a second per account. EC2: one \
         CreateFleet per upload from a bucket of {BUCKET_SIZE} launches, {} left at the start, \
         refilled {REFILL_PER_SECOND} a second. Either way one job per upload; on Batch many \
         jobs then share an instance, which boots once.",
        options.pollers, options.burst_tokens,
    ));
    Ok(table)
}
