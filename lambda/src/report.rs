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

/// The CloudWatch namespace of the function's metrics; the template's alarm names it too.
pub const METRICS_NAMESPACE: &str = "s3spot";

/// Where the function's metric lines go: stdout in Lambda, where CloudWatch Logs reads them.
pub type MetricsSink = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// What became of one invocation's records, as numbers. A record that fails in an SQS batch is a
/// partial batch failure, not a function error: no Lambda metric counts it, so the function
/// counts them itself.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecordCounts {
    pub launched: usize,
    pub skipped: usize,
    /// Every failed record, retryable or not.
    pub failed: usize,
    pub retryable: usize,
}

impl RecordCounts {
    pub fn add(&mut self, report: &Report) {
        self.launched += report.launched.len();
        self.skipped += report.skipped.len();
        self.failed += report.failed.len();
        self.retryable += report.failed.iter().filter(|f| f.retryable).count();
    }

    /// One line of CloudWatch Embedded Metric Format: CloudWatch Logs turns it into the metrics
    /// `LaunchedRecords`, `SkippedRecords`, `FailedRecords` and `RetryableRecords` in
    /// [`METRICS_NAMESPACE`], by `Pipeline`, with no SDK and no API call.
    pub fn emf(&self, pipeline: &str, timestamp_ms: u128) -> String {
        let metric = |name: &str| serde_json::json!({"Name": name, "Unit": "Count"});
        serde_json::json!({
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": METRICS_NAMESPACE,
                    "Dimensions": [["Pipeline"]],
                    "Metrics": [
                        metric("LaunchedRecords"),
                        metric("SkippedRecords"),
                        metric("FailedRecords"),
                        metric("RetryableRecords"),
                    ],
                }],
            },
            "Pipeline": pipeline,
            "LaunchedRecords": self.launched,
            "SkippedRecords": self.skipped,
            "FailedRecords": self.failed,
            "RetryableRecords": self.retryable,
        })
        .to_string()
    }
}
