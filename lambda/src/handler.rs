//! The Lambda handler: an event in, a report out. It dispatches each record to what handles its
//! kind: a created object to [`launch`](crate::launch), a spot interruption to
//! [`recover`](crate::recover), the reaper's schedule to [`Handler::reap`].

use std::future::Future;
use std::pin::Pin;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse};
use serde_json::Value;

use crate::config::Config;
use crate::event::{self, Invocation, Record};
use crate::jobs::{Clock, Jobs};
use crate::launch::{InvocationState, Purpose};
use crate::launcher::Launcher;
use crate::plan::{Decision, decide};
use crate::report::{FailedRecord, HandlerError, MetricsSink, RecordCounts, Report, Response};
pub use s3spot_bootstrap::error_chain;
use s3spot_bootstrap::{Events, StatusStore};

pub struct Handler<L, S> {
    pub(crate) config: Config,
    pub(crate) launcher: L,
    pub(crate) statuses: S,
    metrics: Option<MetricsSink>,
    pub(crate) events: Events,
}

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    pub fn new(config: Config, launcher: L, statuses: S) -> Self {
        Handler {
            config,
            launcher,
            statuses,
            metrics: None,
            events: Events::off(),
        }
    }

    /// Puts the state changes of the jobs it launches on `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Writes each invocation's [`RecordCounts`] to `sink`, as CloudWatch Embedded Metric Format.
    pub fn with_metrics(mut self, sink: MetricsSink) -> Self {
        self.metrics = Some(sink);
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Where the handler reads and writes `status.json`.
    pub fn statuses(&self) -> &S {
        &self.statuses
    }

    /// The job commands, on this handler's launcher and status store.
    pub fn jobs(&self) -> Jobs<&L, &S> {
        Jobs::new(self.config.jobs(), &self.launcher, &self.statuses)
            .with_events(self.events.clone())
    }

    /// Handles one invocation. Every record is seen through, whatever happens to the others.
    pub async fn handle(&self, event: Value) -> Result<Response, HandlerError> {
        let mut counts = RecordCounts::default();
        let handled = self.handle_counted(event, &mut counts).await;
        if let Some(sink) = &self.metrics {
            if matches!(handled, Err(HandlerError::Event(_))) {
                counts.failed += 1;
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis();
            sink(&counts.emf(&self.config.job.pipeline, now));
        }
        handled
    }

    async fn handle_counted(
        &self,
        event: Value,
        counts: &mut RecordCounts,
    ) -> Result<Response, HandlerError> {
        let mut state = InvocationState::default();
        match event::parse(event)? {
            Invocation::Direct(records) => {
                let mut report = Report::default();
                for record in records {
                    self.process(record, &mut state, &mut report).await;
                }
                report.log();
                counts.add(&report);
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
                    report.log();
                    counts.add(&report);
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
        // These rare paths nest deep. Boxed as trait objects, they keep every invocation's
        // future, and the compiler's view of it, as shallow as a launch.
        match record {
            Record::Reap => {
                let clock = Clock::now(self.jobs().config());
                let reap: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                    Box::pin(self.reap(clock, false));
                match reap.await {
                    Ok(stopped) => {
                        report
                            .failed
                            .extend(stopped.errors.into_iter().map(|error| {
                                FailedRecord {
                                    bucket: String::new(),
                                    key: String::new(),
                                    error: format!("reaper: {error}"),
                                    // The next schedule tries again in any case.
                                    retryable: false,
                                }
                            }));
                        report.reaped.extend(stopped.instances);
                        report.ended.extend(stopped.ended);
                    }
                    Err(error) => report.fail(FailedRecord {
                        bucket: String::new(),
                        key: String::new(),
                        error: format!(
                            "reaping pipeline {:?}: {}",
                            self.config.job.pipeline,
                            error_chain(&error)
                        ),
                        retryable: false,
                    }),
                }
            }
            // Batch retries a job whose host went away (its job definition's retry strategy):
            // the warning is for one of Batch's hosts, not an instance of s3spot's.
            Record::Interrupted { instance_id }
                if matches!(self.config.backend, crate::config::Backend::Batch(_)) =>
            {
                report.skip(
                    "",
                    "",
                    format!(
                        "spot interruption of {instance_id}: with S3SPOT_BACKEND=batch, Batch \
                         retries the jobs of a host it loses"
                    ),
                );
            }
            Record::Interrupted { instance_id } => {
                let recover: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                    Box::pin(self.recover(&instance_id, state, report));
                if let Err(failure) = recover.await {
                    report.fail(failure);
                }
            }
            record => match decide(&self.config.job, record, ATTEMPT) {
                Decision::Launch { job, .. } => {
                    if let Err(failure) = self.launch(&job, Purpose::New, state, report).await {
                        report.fail(failure);
                    }
                }
                Decision::Skip {
                    bucket,
                    key,
                    reason,
                } => report.skip(&bucket, &key, reason),
                Decision::Fail { bucket, key, error } => report.fail(FailedRecord {
                    bucket,
                    key,
                    error,
                    retryable: false,
                }),
            },
        }
    }
}
