//! The Lambda handler: an event in, instances launched, a report out.

use std::fmt::Write as _;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Config;
use crate::event::{self, EventError, Invocation, ObjectCreated, Record};
use crate::launcher::{
    LaunchError, LaunchRequest, Launcher, MAX_TAG_VALUE_CHARS, TAG_ATTEMPT, TAG_BUCKET, TAG_JOB,
    TAG_KEY, TAG_NAME, TAG_PIPELINE,
};
use crate::plan::{Decision, PlannedJob, decide};
use crate::token::{client_token, job_id};
pub use s3spot_bootstrap::error_chain;

/// What happened to every record of a direct (S3 or EventBridge) invocation.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub launched: Vec<LaunchedJob>,
    pub skipped: Vec<SkippedRecord>,
    pub failed: Vec<FailedRecord>,
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

pub struct Handler<L> {
    config: Config,
    launcher: L,
}

impl<L: Launcher> Handler<L> {
    pub fn new(config: Config, launcher: L) -> Self {
        Handler { config, launcher }
    }

    /// Handles one invocation. Every record is seen through, whatever happens to the others.
    pub async fn handle(&self, event: Value) -> Result<Response, HandlerError> {
        let mut guard = RunawayGuard::default();
        match event::parse(event)? {
            Invocation::Direct(records) => {
                let mut report = Report::default();
                for record in records {
                    self.process(record, &mut guard, &mut report).await;
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
                                self.process(record, &mut guard, &mut report).await;
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

    async fn process(&self, record: Record, guard: &mut RunawayGuard, report: &mut Report) {
        const ATTEMPT: u32 = 1;
        match decide(&self.config.job, record, ATTEMPT) {
            Decision::Launch { object, job } => {
                if let Err(failure) = self.launch(&object, &job, guard, report).await {
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
        guard: &mut RunawayGuard,
        report: &mut Report,
    ) -> Result<(), FailedRecord> {
        let failed = |error: String, retryable: bool| FailedRecord {
            bucket: object.bucket.clone(),
            key: object.key.clone(),
            error,
            retryable,
        };
        let launch = &self.config.launch;
        guard
            .check(&self.launcher, &launch.pipeline, launch.max_instances)
            .await
            .map_err(|error| failed(error_chain(&error), true))?;

        let job_id = job_id(&launch.pipeline, object);
        let tags = tags(&launch.pipeline, &job_id, job);
        let user_data = job.user_data.to_base64();
        let mut no_capacity = Vec::new();
        for option in launch.options() {
            let request = LaunchRequest {
                template: launch.template.clone(),
                template_version: launch.template_version.clone(),
                client_token: client_token(&job_id, job.spec.attempt, &option),
                user_data: user_data.clone(),
                tags: tags.clone(),
                option,
            };
            match self.launcher.launch(&request).await {
                Ok(launched) => {
                    guard.launched();
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
