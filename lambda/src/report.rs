//! What the function answers: what became of every record, and the errors that fail an
//! invocation.

use std::fmt::Write as _;

use aws_lambda_events::sqs::SqsBatchResponse;
use serde::{Deserialize, Serialize};

use crate::event::EventError;
use crate::jobs::{EndedAttempt, JobInstance};

/// What happened to every record of a direct (S3 or EventBridge) invocation.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub launched: Vec<LaunchedJob>,
    pub skipped: Vec<SkippedRecord>,
    pub failed: Vec<FailedRecord>,
    /// Stuck instances a scheduled event terminated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reaped: Vec<JobInstance>,
    /// Attempts whose instances ended without an account, and what a scheduled event recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ended: Vec<EndedAttempt>,
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

impl Report {
    pub(crate) fn skip(&mut self, bucket: &str, key: &str, reason: String) {
        tracing::info!(bucket, key = ?key, reason, "skipped");
        self.skipped.push(SkippedRecord {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            reason,
        });
    }

    pub(crate) fn fail(&mut self, failure: FailedRecord) {
        tracing::error!(
            bucket = failure.bucket,
            key = ?failure.key,
            error = failure.error,
            retryable = failure.retryable,
            "failed"
        );
        self.failed.push(failure);
    }

    pub(crate) fn log(&self) {
        tracing::info!(
            launched = self.launched.len(),
            skipped = self.skipped.len(),
            failed = self.failed.len(),
            "records handled"
        );
    }
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
