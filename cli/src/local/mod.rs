//! The whole pipeline on one machine, with no AWS account: an embedded S3 server whose data bucket
//! sends event notifications, the Lambda handler as it runs in AWS, and a launcher whose
//! "instances" run the rendered user-data with bash. The worker they download from the artifacts
//! bucket is this very program (see `main`).

pub mod control;
mod launcher;
mod notification;
mod progress;
mod s3;

use std::collections::HashMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use s3spot_bootstrap::{Events, JobEvent, JsonLines, STATUS_FILE, Status, read_status};
use s3spot_lambda::report::{FailedRecord, Report};
use s3spot_lambda::{Config, Handler, HandlerError, JobConfig, S3Statuses, error_chain};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Mutex, broadcast, mpsc};

pub use launcher::{Instance, InstanceState, LocalLauncher};
pub use progress::Progress;
pub use s3::Notification;
pub use s3::{bind, serve};

/// Where the worker is published in the artifacts bucket.
pub const WORKER_KEY: &str = "s3spot-worker";
/// The value of the `s3spot:pipeline` tag on local instances.
pub const PIPELINE: &str = "s3spot-local";

#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// 0 picks a free port.
    pub port: u16,
    pub data_bucket: String,
    pub artifacts_bucket: String,
    pub region: String,
    pub access_key: String,
    /// `None`: the data directory's own, made at random the first time (see
    /// [`Pipeline::start`]); after the start, the one in use.
    pub secret_key: Option<String>,
    /// Overrides `S3SPOT_COMMAND`; neither means the built-in analysis.
    pub command: Option<String>,
    pub max_instances: u32,
    /// The program published as the worker: this one, normally.
    pub worker: PathBuf,
}

impl Options {
    /// Defaults that `s3spot local` documents: `./.s3spot-local`, buckets `data` and `artifacts`,
    /// `us-east-1`, access key `s3spot` with the data directory's own secret.
    pub fn new(worker: PathBuf) -> Options {
        Options {
            data_dir: PathBuf::from(".s3spot-local"),
            port: 0,
            data_bucket: "data".into(),
            artifacts_bucket: "artifacts".into(),
            region: "us-east-1".into(),
            access_key: "s3spot".into(),
            secret_key: None,
            command: None,
            max_instances: 4,
            worker,
        }
    }

    /// Where the S3 server keeps its buckets.
    pub fn s3_root(&self) -> PathBuf {
        self.data_dir.join("s3")
    }

    /// The secret key in use: given, or the data directory's own.
    pub fn secret(&self) -> &str {
        self.secret_key.as_deref().unwrap_or_default()
    }
}

/// Where a data directory keeps its own secret key.
const SECRET_FILE: &str = "secret-key";

/// The data directory's secret key: the one it keeps, or a new random one, kept for next time
/// where only its owner can read it.
fn own_secret(data_dir: &Path) -> std::io::Result<String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(secret) if !secret.trim().is_empty() => return Ok(secret.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut random = [0u8; 20];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    let secret = hex::encode(random);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(secret.as_bytes())?;
    Ok(secret)
}

/// Creates the data directory for its owner alone (it holds the secret key, and every object),
/// unless it exists: a directory given by the user keeps its permissions.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot prepare {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on 127.0.0.1:{port}; pick another with --port")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot publish the worker {path} to s3://{bucket}/{WORKER_KEY}: {message}")]
    Publish {
        path: PathBuf,
        bucket: String,
        message: String,
    },
    #[error(
        "another s3spot local pipeline is running on {data_dir}; stop it, or give this one \
         another --data-dir"
    )]
    InUse { data_dir: PathBuf },
    #[error("bad configuration")]
    Config(#[from] s3spot_lambda::ConfigError),
    #[error("cannot upload {path}: {message}")]
    Upload { path: PathBuf, message: String },
    #[error("no outcome for {key:?}: the pipeline stopped, or the job ran past its limit")]
    NoOutcome { key: String },
}

/// What became of one uploaded file.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The last progress line of its job: a shutdown, or why it never launched.
    pub last: Progress,
    /// Its status.json, when the job got that far.
    pub status: Option<Status>,
    pub results_bucket: String,
    pub results_prefix: String,
    /// The same results, as files on this machine.
    pub local_dir: PathBuf,
}

impl Finished {
    pub fn succeeded(&self) -> bool {
        self.status
            .as_ref()
            .is_some_and(|s| s.state == s3spot_bootstrap::State::Succeeded)
    }
}

pub struct Pipeline {
    options: Options,
    job: JobConfig,
    endpoint: String,
    progress: broadcast::Sender<Progress>,
    launcher: Arc<LocalLauncher>,
    intake: mpsc::UnboundedSender<Notification>,
    /// Every progress line since the start, for the first subscriber: what the pipeline found
    /// of its predecessor's comes before anyone could subscribe.
    first_subscriber: std::sync::Mutex<Option<broadcast::Receiver<Progress>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the pipeline on its data directory, with what an earlier one left there: its
    /// objects, its instances (any that was running is ended, and its attempt given a final
    /// status), and the notifications it had not handled yet (handled now).
    pub async fn start(mut options: Options) -> Result<Pipeline, LocalError> {
        create_private_dir(&options.data_dir).map_err(|source| LocalError::Dir {
            path: options.data_dir.clone(),
            source,
        })?;
        // Instances run in directories of their own: every path they get must be absolute.
        options.data_dir = options
            .data_dir
            .canonicalize()
            .map_err(|source| LocalError::Dir {
                path: options.data_dir.clone(),
                source,
            })?;
        let control = control::listen(&options.data_dir).await?;
        if options.secret_key.is_none() {
            let secret = own_secret(&options.data_dir).map_err(|source| LocalError::Dir {
                path: options.data_dir.join(SECRET_FILE),
                source,
            })?;
            options.secret_key = Some(secret);
        }
        let s3_root = options.s3_root();
        let queue =
            s3::Queue::new(options.data_dir.join("queue")).map_err(|source| LocalError::Dir {
                path: options.data_dir.join("queue"),
                source,
            })?;
        for dir in [
            s3_root.join(&options.data_bucket),
            s3_root.join(&options.artifacts_bucket),
            options.data_dir.join("instances"),
        ] {
            std::fs::create_dir_all(&dir).map_err(|source| LocalError::Dir {
                path: dir.clone(),
                source,
            })?;
        }

        let (events, mut notifications) = mpsc::unbounded_channel();
        let storage = s3::NotifyingFs::new(
            s3_root.clone(),
            &options.region,
            &options.data_bucket,
            queue.clone(),
            events.clone(),
        )
        .map_err(|source| LocalError::Dir {
            path: s3_root.clone(),
            source,
        })?;
        let service = {
            let mut builder = s3s::service::S3ServiceBuilder::new(storage);
            builder.set_auth(s3s::auth::SimpleAuth::from_single(
                options.access_key.as_str(),
                options.secret(),
            ));
            builder.build()
        };
        let (listener, address) =
            s3::bind(options.port)
                .await
                .map_err(|source| LocalError::Bind {
                    port: options.port,
                    source,
                })?;
        let endpoint = format!("http://{address}");
        let mut tasks = vec![tokio::spawn(s3::serve(listener, service))];

        let client = client(&endpoint, &options).await;
        let sha256 = publish_worker(&client, &options).await?;

        let (progress, first_subscriber) = broadcast::channel(4096);
        let events_file = options.data_dir.join(EVENTS_FILE);
        let launcher = Arc::new(
            LocalLauncher::new(
                options.data_dir.join("instances"),
                s3_root,
                instance_env(&endpoint, &options, &events_file),
                progress.clone(),
            )
            .map_err(|source| LocalError::Dir {
                path: options.data_dir.join("instances"),
                source,
            })?,
        );
        let config = config(&options, &sha256)?;
        let job = config.job.clone();
        let handler = Arc::new(
            Handler::new(
                config,
                Arc::clone(&launcher),
                S3Statuses::from_client(client.clone()),
            )
            .with_events(Events::to(JsonLines::new(&events_file))),
        );
        tasks.push(tokio::spawn(follow_events(
            events_file.clone(),
            progress.clone(),
        )));
        // One invocation at a time: the guard's count and the launch that follows are then one
        // step, so the cap holds exactly.
        let serial = Arc::new(Mutex::new(()));
        tasks.push(tokio::spawn(control::serve(
            control,
            Arc::clone(&handler),
            Arc::clone(&serial),
            progress.clone(),
        )));
        // What the last pipeline on this directory left, first; then every REAP_EVERY, as the
        // scheduled reaper does in AWS.
        reap(&handler, &progress).await;
        let (waiting, unreadable) = queue.waiting().map_err(|source| LocalError::Dir {
            path: options.data_dir.join("queue"),
            source,
        })?;
        for error in unreadable {
            let _ = progress.send(Progress::Failed {
                bucket: options.data_bucket.clone(),
                key: String::new(),
                error: format!("a waiting notification cannot be read, and is set aside: {error}"),
            });
        }
        for notification in waiting {
            let _ = events.send(notification);
        }
        tasks.push(tokio::spawn({
            let (handler, serial, progress) =
                (Arc::clone(&handler), Arc::clone(&serial), progress.clone());
            async move {
                let mut every = tokio::time::interval(REAP_EVERY);
                every.tick().await;
                loop {
                    every.tick().await;
                    let _one_at_a_time = serial.lock().await;
                    reap(&handler, &progress).await;
                }
            }
        }));
        let dispatch_progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(notification) = notifications.recv().await {
                tokio::spawn(deliver(
                    Arc::clone(&handler),
                    Arc::clone(&serial),
                    dispatch_progress.clone(),
                    notification,
                ));
            }
        }));
        Ok(Pipeline {
            options,
            job,
            endpoint,
            progress,
            launcher,
            intake: events,
            first_subscriber: std::sync::Mutex::new(Some(first_subscriber)),
            tasks,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Progress lines from now on; the first subscriber gets every line since the start.
    pub fn subscribe(&self) -> broadcast::Receiver<Progress> {
        self.first_subscriber
            .lock()
            .expect("not poisoned")
            .take()
            .unwrap_or_else(|| self.progress.subscribe())
    }

    /// Hands a notification to the handler as if S3 had sent it (again).
    pub fn deliver(&self, event: Value) {
        let _ = self.intake.send(Notification {
            event,
            queued: None,
        });
    }

    /// An S3 client for the embedded server.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        client(&self.endpoint, &self.options).await
    }

    pub fn instances(&self) -> Vec<Instance> {
        self.launcher.instances()
    }

    /// The most instances that ran at once.
    pub fn most_running(&self) -> usize {
        self.launcher.most_running()
    }

    /// The directory on this machine that holds the objects under `prefix` of `bucket`.
    pub fn local_dir(&self, bucket: &str, prefix: &str) -> PathBuf {
        self.options
            .s3_root()
            .join(bucket)
            .join(s3s_fs::key_path(prefix))
    }

    /// Uploads `file` as `key` into the data bucket and waits for what becomes of it.
    pub async fn run_one(&self, file: &Path, key: &str) -> Result<Finished, LocalError> {
        let bucket = self.options.data_bucket.clone();
        let mut progress = self.subscribe();
        let body = aws_sdk_s3::primitives::ByteStream::from_path(file)
            .await
            .map_err(|e| LocalError::Upload {
                path: file.to_path_buf(),
                message: e.to_string(),
            })?;
        let client = self.client().await;
        client
            .put_object()
            .bucket(&bucket)
            .key(key)
            .body(body)
            .send()
            .await
            .map_err(|e| LocalError::Upload {
                path: file.to_path_buf(),
                message: aws_sdk_s3::error::DisplayErrorContext(&e).to_string(),
            })?;
        // The job's own limit, plus the bootstrap's grace: past that, something else is wrong.
        let limit = Duration::from_secs(self.job.max_runtime_secs + 600);
        let waited = tokio::time::timeout(limit, async {
            let mut instance = None;
            loop {
                let Ok(line) = progress.recv().await else {
                    return None;
                };
                let ours = line.key() == key;
                match &line {
                    Progress::Launched { instance_id, .. } if ours => {
                        instance = Some(instance_id.clone());
                    }
                    Progress::Shutdown { instance_id, .. }
                        if Some(instance_id) == instance.as_ref() =>
                    {
                        return Some(line);
                    }
                    Progress::Skipped { .. } | Progress::Failed { .. } if ours => {
                        return Some(line);
                    }
                    _ => {}
                }
            }
        })
        .await;
        let last = match waited {
            Ok(Some(last)) => last,
            Ok(None) | Err(_) => {
                return Err(LocalError::NoOutcome {
                    key: key.to_owned(),
                });
            }
        };
        let ran = match &last {
            Progress::Shutdown { instance_id, .. } => self
                .launcher
                .instances()
                .into_iter()
                .find(|i| i.id == *instance_id),
            _ => None,
        };
        let (results_bucket, prefix, status) = match ran {
            Some(instance) => {
                // The job's own status, checked to be its own.
                let status = match instance.tag(s3spot_lambda::launcher::TAG_JOB) {
                    Some(job_id) => read_status(
                        &S3Statuses::from_client(client.clone()),
                        &instance.results_bucket,
                        &format!("{}{STATUS_FILE}", instance.results_prefix),
                        job_id,
                    )
                    .await
                    .unwrap_or_else(|error| {
                        tracing::warn!(
                            error = error_chain(&error),
                            "cannot read the job's status.json"
                        );
                        None
                    }),
                    None => None,
                };
                (instance.results_bucket, instance.results_prefix, status)
            }
            // Nothing ran: where the key's uploads would have their results.
            None => (
                self.job
                    .results_bucket
                    .clone()
                    .unwrap_or_else(|| bucket.clone()),
                s3spot_bootstrap::key_results_prefix(&self.job.results_prefix, key),
                None,
            ),
        };
        Ok(Finished {
            last,
            status,
            local_dir: self.local_dir(&results_bucket, &prefix),
            results_bucket,
            results_prefix: prefix,
        })
    }

    /// Stops the instances that still run (they upload what they have), then the server.
    pub async fn shutdown(self) {
        self.launcher.stop_all(Duration::from_secs(20)).await;
        for task in self.tasks {
            task.abort();
        }
        let _ = std::fs::remove_file(control::socket_path(&self.options.data_dir));
    }
}

/// How often the local pipeline runs the reaper. Instances here end within moments of their
/// script, so attempts that ended without a status get theirs soon.
const REAP_EVERY: Duration = Duration::from_secs(10);

/// The reaper, as the schedule runs it in AWS: stuck instances are stopped, and attempts whose
/// instances ended without a status get their final one. That includes what a pipeline that
/// stopped or died left behind (the launcher has ended those of its instances that were still
/// running).
async fn reap(
    handler: &Handler<Arc<LocalLauncher>, S3Statuses>,
    progress: &broadcast::Sender<Progress>,
) {
    let clock = s3spot_lambda::Clock::now(handler.jobs().config());
    match handler.reap(clock, false).await {
        Ok(stopped) => {
            for ended in stopped.ended {
                let _ = progress.send(Progress::Failed {
                    bucket: ended.instance.bucket.clone(),
                    key: ended.instance.key.clone(),
                    error: format!(
                        "{} ended without a status ({}): {}",
                        ended.instance.instance_id,
                        ended
                            .instance
                            .state_reason
                            .as_ref()
                            .map_or_else(String::new, ToString::to_string),
                        ended.outcome
                    ),
                });
            }
            for error in stopped.errors {
                let _ = progress.send(Progress::Failed {
                    bucket: String::new(),
                    key: String::new(),
                    error,
                });
            }
        }
        Err(error) => {
            let _ = progress.send(Progress::Failed {
                bucket: String::new(),
                key: String::new(),
                error: format!(
                    "cannot look at the instances the last pipeline left: {}",
                    error_chain(&error)
                ),
            });
        }
    }
}

/// The jobs' state-change events, one JSON line each, in the data directory.
pub const EVENTS_FILE: &str = "events.jsonl";

/// How often `events.jsonl` is read for new lines.
const EVENTS_POLL: Duration = Duration::from_millis(200);

/// Shows each event that the pipeline and its instances add to `path` from now on as a
/// progress line. Lines are read whole: a line still being written waits for its newline.
async fn follow_events(path: PathBuf, progress: broadcast::Sender<Progress>) {
    let mut offset = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut partial = Vec::new();
    loop {
        tokio::time::sleep(EVENTS_POLL).await;
        let Ok(bytes) = read_from(&path, offset) else {
            continue;
        };
        offset += bytes.len() as u64;
        partial.extend_from_slice(&bytes);
        while let Some(end) = partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = partial.drain(..=end).collect();
            if let Some(line) = job_progress(&line) {
                let _ = progress.send(line);
            }
        }
    }
}

fn read_from(path: &Path, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Seek as _;
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The progress line of one line of `events.jsonl`; `None` if it is not an event.
fn job_progress(line: &[u8]) -> Option<Progress> {
    let value: Value = serde_json::from_slice(line).ok()?;
    let event: JobEvent = serde_json::from_value(value.get("detail")?.clone()).ok()?;
    Some(Progress::Job {
        state: event.state.to_string(),
        bucket: event.bucket,
        key: event.key,
        attempt: event.attempt,
        instance_id: event.instance.and_then(|i| i.id),
        error: event.error,
        cost_usd: event.cost.map(|c| c.usd),
    })
}

/// Runs one notification through the handler until it is done: a record at the cap waits and
/// tries again, like an SQS message that comes back, so no event is lost. Once done, the
/// notification leaves the queue.
async fn deliver(
    handler: Arc<Handler<Arc<LocalLauncher>, S3Statuses>>,
    serial: Arc<Mutex<()>>,
    progress: broadcast::Sender<Progress>,
    notification: Notification,
) {
    handle_until_done(&handler, &serial, &progress, &notification.event).await;
    if let Some(path) = &notification.queued {
        s3::Queue::done(path);
    }
}

async fn handle_until_done(
    handler: &Handler<Arc<LocalLauncher>, S3Statuses>,
    serial: &Mutex<()>,
    progress: &broadcast::Sender<Progress>,
    event: &Value,
) {
    let received = Instant::now();
    for record in event["Records"].as_array().into_iter().flatten() {
        let _ = progress.send(Progress::Event {
            bucket: text(&record["s3"]["bucket"]["name"]),
            key: s3spot_lambda::key::decode_key(&text(&record["s3"]["object"]["key"]))
                .unwrap_or_else(|_| text(&record["s3"]["object"]["key"])),
            event: text(&record["eventName"]),
        });
    }
    let mut backoff = Duration::from_millis(100);
    let mut waiting_reported = false;
    loop {
        let outcome = {
            let _one_at_a_time = serial.lock().await;
            handler.handle(event.clone()).await
        };
        let report = match outcome {
            Ok(s3spot_lambda::Response::Report(report)) => report,
            Ok(s3spot_lambda::Response::Batch(_)) => return,
            Err(HandlerError::Retryable(report)) => report,
            Err(error) => {
                let _ = progress.send(Progress::Failed {
                    bucket: String::new(),
                    key: String::new(),
                    error: error_chain(&error),
                });
                return;
            }
        };
        let retry = announce(&report, received, progress, &mut waiting_reported);
        if !retry {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Reports what the handler did; returns whether a record is to be tried again.
pub(crate) fn announce(
    report: &Report,
    received: Instant,
    progress: &broadcast::Sender<Progress>,
    waiting_reported: &mut bool,
) -> bool {
    for launched in &report.launched {
        let _ = progress.send(Progress::Launched {
            bucket: launched.bucket.clone(),
            key: launched.key.clone(),
            instance_id: launched.instance_id.clone(),
            ms: u64::try_from(received.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }
    for skipped in &report.skipped {
        let _ = progress.send(Progress::Skipped {
            bucket: skipped.bucket.clone(),
            key: skipped.key.clone(),
            reason: skipped.reason.clone(),
        });
    }
    let mut retry = false;
    for FailedRecord {
        bucket,
        key,
        error,
        retryable,
    } in &report.failed
    {
        if *retryable {
            retry = true;
            if !*waiting_reported {
                *waiting_reported = true;
                let _ = progress.send(Progress::Waiting {
                    bucket: bucket.clone(),
                    key: key.clone(),
                    reason: error.clone(),
                });
            }
        } else {
            let _ = progress.send(Progress::Failed {
                bucket: bucket.clone(),
                key: key.clone(),
                error: error.clone(),
            });
        }
    }
    retry
}

fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// The handler's configuration: the `S3SPOT_*` environment, as for `s3spot invoke`, with the
/// local launch settings and worker on top.
fn config(options: &Options, worker_sha256: &str) -> Result<Config, LocalError> {
    let mut local = HashMap::from([
        ("S3SPOT_LAUNCH_TEMPLATE", "s3spot-local".to_owned()),
        ("S3SPOT_LAUNCH_TEMPLATE_VERSION", "$Default".to_owned()),
        (
            "S3SPOT_WORKER_URI",
            format!("s3://{}/{WORKER_KEY}", options.artifacts_bucket),
        ),
        ("S3SPOT_WORKER_SHA256", worker_sha256.to_owned()),
        ("S3SPOT_MAX_INSTANCES", options.max_instances.to_string()),
        ("S3SPOT_PIPELINE", PIPELINE.to_owned()),
        // Where `jobs cost` finds the statuses: the data bucket, as in the stack.
        ("S3SPOT_RESULTS_BUCKET", options.data_bucket.clone()),
        ("S3SPOT_MARKET", "spot".to_owned()),
        ("S3SPOT_INSTANCE_TYPES", String::new()),
    ]);
    if let Some(command) = &options.command {
        local.insert("S3SPOT_COMMAND", command.clone());
    }
    let mut config = Config::from_lookup(|name| {
        local
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    })?;
    config.job.region = Some(options.region.clone());
    Ok(config)
}

/// What every local instance sees: the embedded endpoint and its credentials, no IMDS, none of
/// this machine's own AWS configuration, a fetch for the worker without the AWS CLI, and JSON
/// logs for the progress lines.
fn instance_env(endpoint: &str, options: &Options, events: &Path) -> Vec<(String, String)> {
    let worker = shlex::try_quote(&options.worker.to_string_lossy())
        .map(|q| q.into_owned())
        .unwrap_or_default();
    [
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", options.region.clone()),
        ("AWS_ACCESS_KEY_ID", options.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", options.secret().to_owned()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        (
            "S3SPOT_FETCH_COMMAND",
            format!(r#"{worker} local fetch "$1" "$2""#),
        ),
        ("S3SPOT_LOG_FORMAT", "json".into()),
        // The worker's events go where the pipeline's do.
        ("S3SPOT_EVENTS", format!("file:{}", events.display())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// An S3 client for a local pipeline's server at `endpoint`, with the credentials of `options`.
pub async fn client(endpoint: &str, options: &Options) -> aws_sdk_s3::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(options.region.clone()))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            options.access_key.clone(),
            options.secret().to_owned(),
            None,
            None,
            "s3spot-local",
        ))
        .load()
        .await;
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(true)
            .build(),
    )
}

/// Uploads the worker program to the artifacts bucket, as a deployment does, and returns its
/// sha256 for the jobs to check.
async fn publish_worker(
    client: &aws_sdk_s3::Client,
    options: &Options,
) -> Result<String, LocalError> {
    let failed = |message: String| LocalError::Publish {
        path: options.worker.clone(),
        bucket: options.artifacts_bucket.clone(),
        message,
    };
    let path = options.worker.clone();
    let sha256 = tokio::task::spawn_blocking(move || sha256_of(&path))
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(e.to_string()))?;
    let body = aws_sdk_s3::primitives::ByteStream::from_path(&options.worker)
        .await
        .map_err(|e| failed(e.to_string()))?;
    client
        .put_object()
        .bucket(&options.artifacts_bucket)
        .key(WORKER_KEY)
        .content_type("application/octet-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| failed(aws_sdk_s3::error::DisplayErrorContext(&e).to_string()))?;
    Ok(sha256)
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1024 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}
