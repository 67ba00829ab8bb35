//! The Lambda handler: an event in, instances launched, a report out.

use std::fmt::Write as _;
use std::time::SystemTime;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse};
use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use s3spot_bootstrap::{Input, JobSpec, STATUS_FILE, State, Status, job_from_user_data};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::event::{self, EventError, Invocation, ObjectCreated, Record};
use crate::jobs::{Clock, JobInstance, Jobs, JobsError, Target};
use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launcher, MAX_TAG_VALUE_CHARS, PriceQuery,
    TAG_ATTEMPT, TAG_BUCKET, TAG_JOB, TAG_KEY, TAG_NAME, TAG_PIPELINE,
};
use crate::plan::{Decision, Plan, PlannedJob, decide, plan};
use crate::prices;
use crate::statuses::{StatusError, StatusStore};
use crate::token::{client_token, job_id};
pub use s3spot_bootstrap::error_chain;

/// What happened to every record of a direct (S3 or EventBridge) invocation.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub launched: Vec<LaunchedJob>,
    pub skipped: Vec<SkippedRecord>,
    pub failed: Vec<FailedRecord>,
    /// Stuck instances a scheduled event terminated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reaped: Vec<JobInstance>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchedJob {
    pub bucket: String,
    pub key: String,
    pub instance_id: String,
    pub instance_type: Option<String>,
    pub market: String,
    pub client_token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedRecord {
    pub bucket: String,
    pub key: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedRecord {
    pub bucket: String,
    pub key: String,
    pub error: String,
    pub retryable: bool,
}

/// What the function returns: a report for direct invocations, and for SQS the partial batch
/// response that makes Lambda delete only the messages that succeeded.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Report(Report),
    Batch(SqsBatchResponse),
}

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    Event(#[from] EventError),
    /// Some records may succeed later. The others are done; idempotent launches make their
    /// repetition harmless when Lambda retries the whole event.
    #[error("{}", retryable_summary(.0))]
    Retryable(Report),
    #[error("an SQS message without a messageId failed, so the whole batch must be retried")]
    UnidentifiedMessage,
}

impl HandlerError {
    /// A short name for the kind of failure, e.g. for Lambda's `errorType`.
    pub fn kind(&self) -> &'static str {
        match self {
            HandlerError::Event(_) => "S3spot.MalformedEvent",
            HandlerError::Retryable(_) => "S3spot.RetryableFailure",
            HandlerError::UnidentifiedMessage => "S3spot.UnidentifiedMessage",
        }
    }
}

fn retryable_summary(report: &Report) -> String {
    let retryable: Vec<&FailedRecord> = report.failed.iter().filter(|f| f.retryable).collect();
    let mut summary = format!(
        "{} of {} records failed with retryable errors; failing the invocation so that Lambda \
         retries it",
        retryable.len(),
        report.launched.len() + report.skipped.len() + report.failed.len()
    );
    for failed in retryable.iter().take(3) {
        let _ = write!(
            summary,
            "; s3://{}/{:?}: {}",
            failed.bucket, failed.key, failed.error
        );
    }
    summary
}

pub struct Handler<L, S> {
    config: Config,
    launcher: L,
    statuses: S,
}

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    pub fn new(config: Config, launcher: L, statuses: S) -> Self {
        Handler {
            config,
            launcher,
            statuses,
        }
    }

    /// Where the handler reads and writes `status.json`.
    pub fn statuses(&self) -> &S {
        &self.statuses
    }

    /// The job commands, on this handler's launcher and status store.
    pub fn jobs(&self) -> Jobs<&L, &S> {
        Jobs::new(self.config.jobs(), &self.launcher, &self.statuses)
    }

    /// Launches a job again, with the attempt after the last one EC2 or its status.json knows
    /// of: a new ClientToken, through the same guard and options as any launch. Refused while
    /// an instance of the job is still pending or running. `S3SPOT_MAX_ATTEMPTS` does not
    /// apply: that bounds automatic re-launches, and this one is asked for.
    pub async fn retry(&self, target: &Target) -> Result<Report, JobsError> {
        let jobs = self.jobs();
        let instances = jobs.find(target, Clock::now(jobs.config())).await?;
        if let Some(active) = instances.iter().find(|i| i.is_active()) {
            return Err(JobsError::StillActive {
                bucket: active.bucket.clone(),
                key: active.key.clone(),
                instance_id: active.instance_id.clone(),
                state: active.state.clone(),
                attempt: active.attempt.unwrap_or(1),
            });
        }
        let (bucket, key) = jobs.object_of(target, &instances)?;
        let (results_bucket, prefix) = jobs.results(&bucket, &key);
        let status = match self
            .statuses
            .read(&results_bucket, &format!("{prefix}{STATUS_FILE}"))
            .await
        {
            Ok(status) => status,
            Err(StatusError::Invalid { .. }) => None,
            Err(error) => return Err(error.into()),
        };
        let newest = instances.iter().max_by_key(|i| i.attempt.unwrap_or(0));
        let object = match newest {
            Some(newest) => object_of(&jobs.spec_of(&newest.instance_id).await?),
            None => match &status {
                Some(status) => ObjectCreated {
                    bucket: status.input.bucket.clone(),
                    key: status.input.key.clone(),
                    version_id: status.input.version_id.clone(),
                    etag: status.input.etag.clone(),
                    size: status.input.size,
                    sequencer: None,
                    event_time: None,
                },
                None => {
                    return Err(JobsError::NotFound {
                        target: target.to_string(),
                        pipeline: self.config.launch.pipeline.clone(),
                        hint: ", and it has no status.json: upload the object again to run it",
                    });
                }
            },
        };
        let last_attempt = instances
            .iter()
            .filter_map(|i| i.attempt)
            .chain(status.iter().map(|s| s.attempt))
            .chain(
                status
                    .iter()
                    .flat_map(|s| s.history.iter().map(|a| a.attempt)),
            )
            .max()
            .unwrap_or(0);
        let job_id = newest
            .and_then(|i| i.job_id.clone())
            .unwrap_or_else(|| job_id(&self.config.launch.pipeline, &object));
        let mut report = Report::default();
        match plan(&self.config.job, &object, last_attempt + 1) {
            Ok(Plan::Launch(job)) => {
                let mut state = InvocationState::default();
                if let Err(failure) = self
                    .launch(&object, &job, &job_id, &mut state, &mut report)
                    .await
                {
                    report.failed.push(failure);
                }
            }
            Ok(Plan::Skip(reason)) => report.skipped.push(SkippedRecord {
                bucket: object.bucket,
                key: object.key,
                reason,
            }),
            Err(error) => report.failed.push(FailedRecord {
                bucket: object.bucket,
                key: object.key,
                error: error_chain(&error),
                retryable: false,
            }),
        }
        log_report(&report);
        Ok(report)
    }

    /// Handles one invocation. Every record is seen through, whatever happens to the others.
    pub async fn handle(&self, event: Value) -> Result<Response, HandlerError> {
        let mut state = InvocationState::default();
        match event::parse(event)? {
            Invocation::Direct(records) => {
                let mut report = Report::default();
                for record in records {
                    self.process(record, &mut state, &mut report).await;
                }
                log_report(&report);
                if report.failed.iter().any(|f| f.retryable) {
                    return Err(HandlerError::Retryable(report));
                }
                Ok(Response::Report(report))
            }
            Invocation::Sqs(items) => {
                let mut batch = SqsBatchResponse::default();
                for item in items {
                    let mut report = Report::default();
                    match item.records {
                        Ok(records) => {
                            for record in records {
                                self.process(record, &mut state, &mut report).await;
                            }
                        }
                        Err(error) => {
                            let error = error_chain(&error);
                            tracing::error!(
                                message_id = item.message_id,
                                error,
                                "unreadable SQS message"
                            );
                            report.failed.push(FailedRecord {
                                bucket: String::new(),
                                key: String::new(),
                                error,
                                retryable: false,
                            });
                        }
                    }
                    log_report(&report);
                    // Any failure goes back to the queue: retryable ones succeed later, and the
                    // others reach the dead-letter queue after maxReceiveCount, where nothing is
                    // lost.
                    if !report.failed.is_empty() {
                        let Some(message_id) = item.message_id else {
                            return Err(HandlerError::UnidentifiedMessage);
                        };
                        let mut failure = BatchItemFailure::default();
                        failure.item_identifier = message_id;
                        batch.batch_item_failures.push(failure);
                    }
                }
                Ok(Response::Batch(batch))
            }
        }
    }

    async fn process(&self, record: Record, state: &mut InvocationState, report: &mut Report) {
        const ATTEMPT: u32 = 1;
        // Boxed: these rare paths nest deep, and unboxed they would make every invocation's
        // future as deep as theirs.
        if let Record::Reap = record {
            Box::pin(self.reap(report)).await;
            return;
        }
        if let Record::Interrupted { instance_id } = &record {
            if let Err(failure) = Box::pin(self.recover(instance_id, state, report)).await {
                tracing::error!(
                    instance_id,
                    error = failure.error,
                    retryable = failure.retryable,
                    "failed"
                );
                report.failed.push(failure);
            }
            return;
        }
        match decide(&self.config.job, record, ATTEMPT) {
            Decision::Launch { object, job } => {
                let job_id = job_id(&self.config.launch.pipeline, &object);
                if let Err(failure) = self.launch(&object, &job, &job_id, state, report).await {
                    tracing::error!(bucket = object.bucket, key = ?object.key, error = failure.error, retryable = failure.retryable, "failed");
                    report.failed.push(failure);
                }
            }
            Decision::Skip {
                bucket,
                key,
                reason,
            } => {
                tracing::info!(bucket, key = ?key, reason, "skipped");
                report.skipped.push(SkippedRecord {
                    bucket,
                    key,
                    reason,
                });
            }
            Decision::Fail { bucket, key, error } => {
                tracing::error!(bucket, key = ?key, error, "failed");
                report.failed.push(FailedRecord {
                    bucket,
                    key,
                    error,
                    retryable: false,
                });
            }
        }
    }

    /// Launches a planned job through the guard and the configured options, in order.
    async fn launch(
        &self,
        object: &ObjectCreated,
        job: &PlannedJob,
        job_id: &str,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<(), FailedRecord> {
        let failed = |error: String, retryable: bool| FailedRecord {
            bucket: object.bucket.clone(),
            key: object.key.clone(),
            error,
            retryable,
        };
        let launch = &self.config.launch;
        state
            .guard
            .check(&self.launcher, &launch.pipeline, launch.max_instances)
            .await
            .map_err(|error| failed(error_chain(&error), true))?;
        let options = self.options(state).await;

        let tags = tags(&launch.pipeline, job_id, job);
        let user_data = job.user_data.to_base64();
        let mut no_capacity = Vec::new();
        for option in options {
            let request = LaunchRequest {
                template: launch.template.clone(),
                template_version: launch.template_version.clone(),
                client_token: client_token(job_id, job.spec.attempt, &option),
                user_data: user_data.clone(),
                tags: tags.clone(),
                option,
            };
            match self.launcher.launch(&request).await {
                Ok(launched) => {
                    state.guard.launched();
                    tracing::info!(
                        bucket = object.bucket,
                        key = ?object.key,
                        instance_id = launched.instance_id,
                        option = %request.option,
                        client_token = request.client_token,
                        "launched"
                    );
                    report.launched.push(LaunchedJob {
                        bucket: object.bucket.clone(),
                        key: object.key.clone(),
                        instance_id: launched.instance_id,
                        instance_type: launched.instance_type,
                        market: request.option.market.to_string(),
                        client_token: request.client_token,
                    });
                    return Ok(());
                }
                Err(LaunchError::AlreadyLaunched) => {
                    let reason = format!(
                        "already launched: ClientToken {} belongs to an instance that has \
                         terminated",
                        request.client_token
                    );
                    tracing::info!(bucket = object.bucket, key = ?object.key, reason, "skipped");
                    report.skipped.push(SkippedRecord {
                        bucket: object.bucket.clone(),
                        key: object.key.clone(),
                        reason,
                    });
                    return Ok(());
                }
                Err(error @ LaunchError::Capacity { .. }) => {
                    tracing::warn!(option = %request.option, error = %error, "no capacity; trying the next option");
                    no_capacity.push(format!("{}: {error}", request.option));
                }
                Err(error) => return Err(failed(error.to_string(), error.is_retryable())),
            }
        }
        Err(failed(
            format!("no launch option had capacity: {}", no_capacity.join("; ")),
            true,
        ))
    }
}

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    /// A spot instance of this pipeline is being taken back: launch its job again with the next
    /// attempt number, through the same options and guard as a new job, and record the attempt
    /// in the job's status.json. On the last attempt (`S3SPOT_MAX_ATTEMPTS`) the job is marked
    /// failed instead. The new attempt's ClientTokens follow from the job and the attempt, so a
    /// repeated warning launches nothing more.
    async fn recover(
        &self,
        instance_id: &str,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<(), FailedRecord> {
        let pipeline = &self.config.launch.pipeline;
        let mut skipped = |bucket: &str, key: &str, reason: String| {
            tracing::info!(instance_id, reason, "skipped");
            report.skipped.push(SkippedRecord {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                reason,
            });
        };
        let failed = |spec: Option<&JobSpec>, error: String, retryable: bool| FailedRecord {
            bucket: spec.map(|s| s.bucket.clone()).unwrap_or_default(),
            key: spec.map(|s| s.key.clone()).unwrap_or_default(),
            error: format!("spot interruption of {instance_id}: {error}"),
            retryable,
        };
        let instance = match self.launcher.describe(instance_id).await {
            Ok(Some(instance)) => instance,
            Ok(None) => {
                skipped(
                    "",
                    "",
                    format!("spot interruption of {instance_id}: no such instance"),
                );
                return Ok(());
            }
            Err(error) => return Err(failed(None, error.to_string(), error.is_retryable())),
        };
        // The rule sees every spot interruption in the account and region.
        if instance.tag(TAG_PIPELINE) != Some(pipeline.as_str()) {
            skipped(
                "",
                "",
                format!(
                    "spot interruption of {instance_id}: not an instance of pipeline {pipeline:?}"
                ),
            );
            return Ok(());
        }
        let spec = self
            .launcher
            .user_data(instance_id)
            .await
            .map_err(|error| failed(None, error.to_string(), error.is_retryable()))
            .and_then(|encoded| decode_job(&encoded).map_err(|error| failed(None, error, false)))?;
        let status_key = format!("{}{STATUS_FILE}", spec.results_key_prefix());
        let previous = match self.statuses.read(&spec.results_bucket, &status_key).await {
            Ok(previous) => previous,
            // A damaged status.json must not keep the job from its next attempt.
            Err(error @ StatusError::Invalid { .. }) => {
                tracing::warn!(
                    error = error_chain(&error),
                    "replacing an unreadable status.json"
                );
                None
            }
            Err(error) => return Err(failed(Some(&spec), error_chain(&error), true)),
        };
        if let Some(previous) = &previous {
            let finished = !matches!(previous.state, State::Interrupted);
            if previous.attempt > spec.attempt || (previous.attempt == spec.attempt && finished) {
                skipped(
                    &spec.bucket,
                    &spec.key,
                    format!(
                        "spot interruption of {instance_id}: attempt {} of this job already \
                         ended ({:?})",
                        previous.attempt, previous.state
                    ),
                );
                return Ok(());
            }
        }

        let max = self.config.launch.max_attempts;
        if spec.attempt >= max {
            let error = format!(
                "spot interruption of {instance_id} on attempt {} of {max} \
                 (S3SPOT_MAX_ATTEMPTS); not re-launched",
                spec.attempt
            );
            let status = ended(&spec, &instance, previous, State::Failed, error.clone());
            self.statuses
                .write(&spec.results_bucket, &status_key, &status)
                .await
                .map_err(|e| failed(Some(&spec), error_chain(&e), true))?;
            skipped(
                &spec.bucket,
                &spec.key,
                format!("{error}; marked failed in status.json"),
            );
            return Ok(());
        }

        let object = object_of(&spec);
        let job_id = instance
            .tag(TAG_JOB)
            .map(str::to_owned)
            .unwrap_or_else(|| job_id(pipeline, &object));
        let next_attempt = spec.attempt + 1;
        // A repeated warning, or one redelivered after the next attempt began, must not launch
        // it twice: ClientTokens de-duplicate only identical requests, for a limited time.
        let launched = self
            .launcher
            .instances(pipeline, Some(&job_id))
            .await
            .map_err(|error| failed(Some(&spec), error.to_string(), error.is_retryable()))?;
        let next = match launched.iter().find(|i| i.attempt() == Some(next_attempt)) {
            Some(next) => {
                skipped(
                    &spec.bucket,
                    &spec.key,
                    format!(
                        "spot interruption of {instance_id}: attempt {next_attempt} is already \
                         launched ({}, {})",
                        next.instance_id, next.state
                    ),
                );
                format!("on {}", next.instance_id)
            }
            None => {
                let job = match plan(&self.config.job, &object, next_attempt) {
                    Ok(Plan::Launch(job)) => job,
                    Ok(Plan::Skip(reason)) => {
                        skipped(&spec.bucket, &spec.key, reason);
                        return Ok(());
                    }
                    Err(error) => {
                        return Err(failed(Some(&spec), error_chain(&error), false));
                    }
                };
                let before = report.launched.len();
                self.launch(&object, &job, &job_id, state, report).await?;
                report.launched.get(before).map_or_else(
                    || "before (its instance has terminated)".to_owned(),
                    |l| format!("on {}", l.instance_id),
                )
            }
        };
        let note = format!("spot interruption warning; attempt {next_attempt} re-launched {next}");
        let status = ended(&spec, &instance, previous, State::Interrupted, note);
        self.statuses
            .write(&spec.results_bucket, &status_key, &status)
            .await
            .map_err(|e| failed(Some(&spec), error_chain(&e), true))
    }
}

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    /// The launch options in the order to try them: as configured, or with the spot types
    /// cheapest first when `S3SPOT_ORDER_BY_PRICE` is on. Prices are read once per invocation;
    /// when they cannot be read, the configured order stands.
    async fn options(&self, state: &mut InvocationState) -> Vec<crate::config::LaunchOption> {
        let launch = &self.config.launch;
        if !launch.order_by_price || launch.instance_types.len() < 2 {
            return launch.options();
        }
        if state.price_order.is_none() {
            let query = PriceQuery {
                instance_types: launch.instance_types.clone(),
                ..PriceQuery::default()
            };
            let order = match self.launcher.spot_prices(&query).await {
                Ok(history) => {
                    let quotes =
                        prices::current(&history, self.config.job.region.as_deref().unwrap_or(""));
                    prices::order_by_price(&launch.instance_types, &quotes)
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read spot prices; trying the instance types in the configured order");
                    launch.instance_types.clone()
                }
            };
            tracing::info!(order = ?order, "instance types by current spot price");
            state.price_order = Some(order);
        }
        let mut ordered = launch.clone();
        ordered.instance_types = state.price_order.clone().unwrap_or_default();
        ordered.options()
    }

    /// The scheduled reaper: terminates the pipeline's stuck instances.
    async fn reap(&self, report: &mut Report) {
        let jobs = self.jobs();
        let pipeline = &self.config.launch.pipeline;
        match jobs.reap(Clock::now(jobs.config()), false).await {
            Ok(stopped) => {
                report
                    .failed
                    .extend(stopped.errors.into_iter().map(|error| FailedRecord {
                        bucket: String::new(),
                        key: String::new(),
                        error: format!("reaped, but status.json not written: {error}"),
                        retryable: false,
                    }));
                report.reaped.extend(stopped.instances);
            }
            Err(error) => {
                let error = format!("reaping pipeline {pipeline:?}: {}", error_chain(&error));
                tracing::error!(error, "failed");
                report.failed.push(FailedRecord {
                    bucket: String::new(),
                    key: String::new(),
                    error,
                    // The next schedule tries again in any case.
                    retryable: false,
                });
            }
        }
    }
}

/// The object a job was launched for, as its event described it.
fn object_of(spec: &JobSpec) -> ObjectCreated {
    ObjectCreated {
        bucket: spec.bucket.clone(),
        key: spec.key.clone(),
        version_id: spec.version_id.clone(),
        etag: spec.etag.clone(),
        size: spec.size,
        sequencer: spec.sequencer.clone(),
        event_time: None,
    }
}

/// The job an instance was launched with, from its base64 user-data.
pub(crate) fn decode_job(encoded: &str) -> Result<JobSpec, String> {
    let script = BASE64
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or("its user-data is not base64 of a script")?;
    job_from_user_data(&script)
        .map_err(|e| format!("its user-data holds no s3spot job: {}", error_chain(&e)))
}

/// The status of the interrupted attempt: what its worker wrote, if it got that far, or a new
/// one; with the history before it either way.
pub(crate) fn ended(
    spec: &JobSpec,
    instance: &InstanceInfo,
    previous: Option<Status>,
    state: State,
    error: String,
) -> Status {
    let now = DateTime::from(SystemTime::now())
        .fmt(DateTimeFormat::DateTime)
        .unwrap_or_default();
    let mut status = match previous {
        Some(previous) if previous.attempt == spec.attempt => previous,
        previous => {
            let mut status = Status {
                state,
                input: Input {
                    bucket: spec.bucket.clone(),
                    key: spec.key.clone(),
                    version_id: spec.version_id.clone(),
                    etag: spec.etag.clone(),
                    size: spec.size,
                    sha256: None,
                },
                outputs: Vec::new(),
                exit_code: None,
                error: None,
                timings: Default::default(),
                instance: Some(s3spot_bootstrap::Instance {
                    id: Some(instance.instance_id.clone()),
                    instance_type: instance.instance_type.clone(),
                    lifecycle: Some(instance.market.clone()),
                }),
                attempt: spec.attempt,
                worker_version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at: String::new(),
                finished_at: String::new(),
                history: Vec::new(),
            };
            if let Some(previous) = previous {
                status.carry_history(previous);
            }
            status
        }
    };
    status.state = state;
    status.error = Some(error);
    status.finished_at = now;
    status
}

/// Tags for the instance and its volumes: enough to find, count and re-run the job.
fn tags(pipeline: &str, job_id: &str, job: &PlannedJob) -> Vec<(String, String)> {
    let bounded = |value: String| value.chars().take(MAX_TAG_VALUE_CHARS).collect::<String>();
    vec![
        (
            TAG_NAME.into(),
            bounded(format!("s3spot: {}", job.spec.key)),
        ),
        (TAG_PIPELINE.into(), pipeline.into()),
        (TAG_BUCKET.into(), job.spec.bucket.clone()),
        (TAG_KEY.into(), bounded(job.spec.key.clone())),
        (TAG_JOB.into(), job_id.into()),
        (TAG_ATTEMPT.into(), job.spec.attempt.to_string()),
    ]
}

/// What one invocation reads from EC2 once and then keeps: the guard's count, and the order of
/// the instance types by price.
#[derive(Default)]
struct InvocationState {
    guard: RunawayGuard,
    price_order: Option<Vec<String>>,
}

/// The cap on pending and running instances of the pipeline. The count is read once per
/// invocation, on the first launch, and then kept up to date locally.
#[derive(Default)]
struct RunawayGuard {
    active: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
enum GuardError {
    #[error(
        "runaway guard: at least {active} instances of pipeline {pipeline:?} are pending or running, at \
         the S3SPOT_MAX_INSTANCES cap of {max}; not launching now, the event will be retried"
    )]
    AtCap {
        active: usize,
        max: u32,
        pipeline: String,
    },
    #[error("runaway guard: cannot count running instances, so not launching")]
    Count(#[source] LaunchError),
}

impl RunawayGuard {
    async fn check(
        &mut self,
        launcher: &impl Launcher,
        pipeline: &str,
        max: u32,
    ) -> Result<(), GuardError> {
        let active = match self.active {
            Some(active) => active,
            None => {
                let active = launcher
                    .count_active(pipeline, max as usize)
                    .await
                    .map_err(GuardError::Count)?;
                *self.active.insert(active)
            }
        };
        if active >= max as usize {
            return Err(GuardError::AtCap {
                active,
                max,
                pipeline: pipeline.into(),
            });
        }
        Ok(())
    }

    fn launched(&mut self) {
        if let Some(active) = &mut self.active {
            *active += 1;
        }
    }
}

fn log_report(report: &Report) {
    tracing::info!(
        launched = report.launched.len(),
        skipped = report.skipped.len(),
        failed = report.failed.len(),
        "records handled"
    );
}
