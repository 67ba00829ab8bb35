//! [`Launcher`] on AWS Batch (`S3SPOT_BACKEND=batch`): each job is a Batch job on the stack's
//! queue, run by a job definition whose command is the container form of the bootstrap script
//! ([`s3spot_bootstrap::render_container_script`]). The job travels in the container's
//! environment ([`s3spot_bootstrap::container_environment`]).
//!
//! Batch has no client token, so a job's name is its identity: `s3spot-<job id>-<attempt>`.
//! Before it submits, the launcher looks that name up on the queue, and a job found there is the
//! launch. The claim's lease keeps two deliveries from submitting at once; the lookup covers a
//! launcher that died between its submit and its claim's update, minutes before the next
//! delivery looks, well past the few seconds `ListJobs` may lag behind a submit.
//!
//! A job is the unit the job commands see: [`InstanceInfo::instance_id`] is its Batch job id.
//! The pipeline's list holds its active jobs and those that ended within [`LISTED_AFTER_END`]
//! (or, never started, were created within [`LISTED_UNSTARTED`]); one job's list holds every
//! attempt Batch still keeps.
//! Batch bounds the spend itself (the compute environment's maximum vCPUs), so the runaway
//! guard's count is not taken; Batch places and prices instances, so a job carries no type or
//! price of its own.

use std::collections::HashMap;

use aws_sdk_batch::error::ProvideErrorMetadata as _;
use aws_sdk_batch::types::{
    ContainerOverrides, JobDetail, JobStatus, JobTimeout, KeyValuePair, KeyValuesPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use s3spot_bootstrap::{
    HARD_LIMIT_GRACE_SECS, JobSpec, KILL_AFTER_SECS, RenderError, container_environment,
    job_from_base64_user_data,
};

use crate::config::{Backend, BatchTarget};
use crate::ec2::{Ec2Launcher, api_error};
use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PriceQuery, SpotPrice,
    StateReason, TAG_ATTEMPT, TAG_JOB, TAG_MAX_RUNTIME, TAG_PIPELINE, TAG_UPLOAD, job_tags,
};

/// Every s3spot job's name starts so: the queue's other jobs are not s3spot's.
pub const JOB_NAME_PREFIX: &str = "s3spot-";

/// The market a Batch job reports: Batch chooses the instance and its market.
pub const BATCH_MARKET: &str = "batch";

/// Batch's answer to a call over its rate (HTTP 429).
const THROTTLED: &str = "TooManyRequestsException";

/// `DescribeJobs` takes at most 100 ids a call.
const DESCRIBE_BATCH: usize = 100;

/// `ListJobs` answers at most 100 jobs a page when it is given a filter.
const LIST_PAGE: i32 = 100;

/// How long an ended job stays in the pipeline's list, as EC2 lists a terminated instance for
/// about an hour: long enough for the reaper to see it ended, where Batch keeps jobs for days.
pub const LISTED_AFTER_END: std::time::Duration = std::time::Duration::from_secs(3600);

/// How long a job that ended without having run stays listed, from its creation: Batch gives
/// it no stop time, and the queue cancels a job that waited RUNNABLE up to a day
/// (`BatchMaxRunnableSeconds`), which the reaper must then see ended.
pub const LISTED_UNSTARTED: std::time::Duration = std::time::Duration::from_secs(25 * 3600);

/// One job of a `ListJobs` page.
struct Listed {
    id: String,
    name: String,
    status: JobStatus,
    /// Milliseconds since the epoch. Batch sets it only for a job that ran.
    stopped_at: Option<i64>,
    created_at: Option<i64>,
}

impl Listed {
    fn has_ended(&self) -> bool {
        matches!(self.status, JobStatus::Succeeded | JobStatus::Failed)
    }
}

/// Batch's name of one attempt of a job: at most 50 characters of the letters, digits and
/// hyphens a job name allows.
pub fn job_name(job_id: &str, attempt: u32) -> String {
    format!("{JOB_NAME_PREFIX}{job_id}-{attempt}")
}

/// The tags a Batch job gets: its identity (pipeline, job, attempt, upload, max runtime), never
/// the object's key or bucket, which the job's environment has whole. Batch refuses a submit
/// whose tag values hold anything but letters, digits, spaces and `_ . : / = + - @` (by its own
/// Unicode classes), and a key is the uploader's choice.
const BATCH_TAGS: &[&str] = &[
    TAG_PIPELINE,
    TAG_JOB,
    TAG_ATTEMPT,
    TAG_UPLOAD,
    TAG_MAX_RUNTIME,
];

/// What Batch accepts, by the ASCII part of its rule alone (the identity tags are ASCII): a
/// pipeline named otherwise is left off rather than refused.
fn is_taggable(value: &str) -> bool {
    value.len() <= 256
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || " _.:/=+-@".contains(c))
}

/// `SUBMITTED` to `STARTING`: queued or being placed, the Batch form of `pending`.
pub fn instance_state(status: &JobStatus) -> &'static str {
    match status {
        JobStatus::Running => "running",
        JobStatus::Succeeded | JobStatus::Failed => "terminated",
        _ => "pending",
    }
}

#[derive(Debug, Clone)]
pub struct BatchLauncher {
    client: aws_sdk_batch::Client,
    target: BatchTarget,
}

impl BatchLauncher {
    pub fn new(sdk: &aws_config::SdkConfig, target: BatchTarget) -> Self {
        Self::from_client(aws_sdk_batch::Client::new(sdk), target)
    }

    pub fn from_client(client: aws_sdk_batch::Client, target: BatchTarget) -> Self {
        BatchLauncher { client, target }
    }

    /// The ids of the queue's jobs whose names match `filter` (a name, or a prefix and `*`),
    /// whatever their status: with a filter, `ListJobs` ignores the status.
    async fn list(&self, filter: &str) -> Result<Vec<Listed>, LaunchError> {
        let mut pages = self
            .client
            .list_jobs()
            .job_queue(&self.target.job_queue)
            .filters(
                KeyValuesPair::builder()
                    .name("JOB_NAME")
                    .values(filter)
                    .build(),
            )
            .max_results(LIST_PAGE)
            .into_paginator()
            .send();
        let mut jobs = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("ListJobs", &e))?;
            jobs.extend(
                page.job_summary_list()
                    .iter()
                    .filter(|job| {
                        job.job_name()
                            .is_some_and(|name| name.starts_with(JOB_NAME_PREFIX))
                    })
                    .filter_map(|job| {
                        Some(Listed {
                            id: job.job_id()?.to_owned(),
                            name: job.job_name()?.to_owned(),
                            status: job.status()?.clone(),
                            stopped_at: job.stopped_at(),
                            created_at: job.created_at(),
                        })
                    }),
            );
        }
        Ok(jobs)
    }

    async fn details(&self, ids: &[String]) -> Result<Vec<JobDetail>, LaunchError> {
        let mut details = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(DESCRIBE_BATCH) {
            let output = self
                .client
                .describe_jobs()
                .set_jobs(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| api_error("DescribeJobs", &e))?;
            details.extend(output.jobs().iter().cloned());
        }
        Ok(details)
    }
}

/// The job a Batch job runs, from its container's environment.
fn spec_of(detail: &JobDetail) -> Option<JobSpec> {
    let word = detail
        .container()?
        .environment()
        .iter()
        .find(|pair| pair.name() == Some("S3SPOT_JOB"))?
        .value()?;
    JobSpec::decode(word).ok()
}

fn instance_info(detail: &JobDetail, spec: &JobSpec) -> InstanceInfo {
    let pipeline = spec.pipeline.as_deref().unwrap_or_default();
    let reason = detail
        .status_reason()
        .or_else(|| detail.container().and_then(|c| c.reason()));
    InstanceInfo {
        instance_id: detail.job_id().unwrap_or_default().to_owned(),
        state: detail.status().map_or("pending", instance_state).to_owned(),
        instance_type: None,
        market: BATCH_MARKET.to_owned(),
        // Only a started job has run: a queued one is judged by the queue, not by its runtime.
        launched_at: detail.started_at().map(|ms| ms / 1000),
        tags: job_tags(pipeline, spec),
        state_reason: reason.map(|message| StateReason {
            code: detail
                .status()
                .map_or("UNKNOWN", JobStatus::as_str)
                .to_owned(),
            message: message.to_owned(),
        }),
    }
}

fn environment_error(error: RenderError) -> LaunchError {
    LaunchError::NotAvailable {
        code: "OverridesTooLarge".into(),
        message: s3spot_bootstrap::error_chain(&error),
    }
}

impl Launcher for BatchLauncher {
    async fn count_active(&self, _pipeline: &str, _enough: usize) -> Result<usize, LaunchError> {
        Ok(0)
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Launched, LaunchError> {
        let spec =
            job_from_base64_user_data(&request.user_data).map_err(|error| LaunchError::Api {
                operation: "SubmitJob",
                message: format!("the launch request carries no job: {error}"),
                retryable: false,
            })?;
        let name = job_name(&spec.job_id, spec.attempt);
        // A lookup that fails submitted nothing: the record waits for its next delivery (a
        // refusal, not an unknown outcome, which would hold the claim for its lease).
        let found = self.list(&name).await.map_err(|error| match error {
            LaunchError::Api { message, .. } if message.starts_with(THROTTLED) => {
                LaunchError::Throttled {
                    operation: "ListJobs",
                    message,
                }
            }
            error => LaunchError::NoInstance {
                pools: vec![crate::launcher::PoolError {
                    pool: format!("batch queue {}", self.target.job_queue),
                    code: "ListJobs".to_owned(),
                    message: error.to_string(),
                }],
            },
        })?;
        // The filter is case-insensitive, and a prefix match where a name ends in `*`.
        let found: Vec<Listed> = found.into_iter().filter(|job| job.name == name).collect();
        if let Some(Listed { id, .. }) = found.iter().find(|job| !job.has_ended()) {
            tracing::info!(
                job_name = name,
                batch_job_id = id,
                "the job is already on the queue"
            );
            return Ok(Launched {
                instance_id: id.clone(),
                instance_type: None,
                placement: None,
            });
        }
        if !found.is_empty() {
            return Err(LaunchError::AlreadyLaunched);
        }
        let environment = container_environment(&spec).map_err(environment_error)?;
        let tags: HashMap<String, String> = request
            .tags
            .iter()
            .filter(|(name, value)| BATCH_TAGS.contains(&name.as_str()) && is_taggable(value))
            .cloned()
            .collect();
        // Past the script's own hard limit and its kill: only a container that hangs anyway.
        let limit = spec
            .max_runtime_secs
            .saturating_add(HARD_LIMIT_GRACE_SECS + KILL_AFTER_SECS + 60);
        // Batch has no client token: a submit the SDK sent again after a lost answer would be a
        // second job. Sent once; an unknown outcome is looked up by the next delivery instead.
        let output = self
            .client
            .submit_job()
            .job_name(&name)
            .job_queue(&self.target.job_queue)
            .job_definition(&self.target.job_definition)
            .container_overrides(
                ContainerOverrides::builder()
                    .set_environment(Some(
                        environment
                            .into_iter()
                            .map(|(name, value)| {
                                KeyValuePair::builder().name(name).value(value).build()
                            })
                            .collect(),
                    ))
                    .build(),
            )
            .set_tags(Some(tags))
            .timeout(
                JobTimeout::builder()
                    .attempt_duration_seconds(i32::try_from(limit).unwrap_or(i32::MAX))
                    .build(),
            )
            .customize()
            .config_override(
                aws_sdk_batch::config::Builder::default()
                    .retry_config(aws_sdk_batch::config::retry::RetryConfig::disabled()),
            )
            .send()
            .await
            .map_err(|error| match error.code() {
                // Refused for Batch's rate, and sent once: nothing was submitted.
                Some(THROTTLED) => LaunchError::Throttled {
                    operation: "SubmitJob",
                    message: error.message().unwrap_or(THROTTLED).to_owned(),
                },
                // A queue or job definition that is not there (or not valid) is the account's
                // setup: its owner fixes it and the job launches, within S3SPOT_MAX_WAIT.
                Some(code @ "ClientException") => LaunchError::NoInstance {
                    pools: vec![crate::launcher::PoolError {
                        pool: format!("batch queue {}", self.target.job_queue),
                        code: code.to_owned(),
                        message: error.message().unwrap_or_default().to_owned(),
                    }],
                },
                _ => api_error("SubmitJob", &error),
            })?;
        Ok(Launched {
            instance_id: output
                .job_id()
                .ok_or_else(|| LaunchError::Api {
                    operation: "SubmitJob",
                    message: "Batch answered without the job's id".into(),
                    retryable: true,
                })?
                .to_owned(),
            instance_type: None,
            placement: None,
        })
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, LaunchError> {
        let details = self.details(&[instance_id.to_owned()]).await?;
        Ok(details
            .iter()
            .find(|detail| detail.job_id() == Some(instance_id))
            .and_then(|detail| Some(instance_info(detail, &spec_of(detail)?))))
    }

    async fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, LaunchError> {
        let filter = match job {
            Some(job) => format!("{JOB_NAME_PREFIX}{job}-*"),
            None => format!("{JOB_NAME_PREFIX}*"),
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let within = |at: Option<i64>, window: std::time::Duration| {
            let window = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
            at.is_none_or(|at| now_ms.saturating_sub(at) <= window)
        };
        let ids: Vec<String> = self
            .list(&filter)
            .await?
            .into_iter()
            // One job's every attempt, whenever it ended; the whole pipeline's active jobs and
            // those that ended lately, not a week of history on every sweep.
            .filter(|listed| {
                job.is_some()
                    || !listed.has_ended()
                    || match listed.stopped_at {
                        Some(stopped) => within(Some(stopped), LISTED_AFTER_END),
                        None => within(listed.created_at, LISTED_UNSTARTED),
                    }
            })
            .map(|listed| listed.id)
            .collect();
        Ok(self
            .details(&ids)
            .await?
            .iter()
            .filter_map(|detail| {
                let spec = spec_of(detail)?;
                (spec.pipeline.as_deref() == Some(pipeline)).then(|| instance_info(detail, &spec))
            })
            .collect())
    }

    async fn user_data(&self, instance_id: &str) -> Result<String, LaunchError> {
        let details = self.details(&[instance_id.to_owned()]).await?;
        let spec = details
            .iter()
            .find(|detail| detail.job_id() == Some(instance_id))
            .and_then(spec_of)
            .ok_or_else(|| LaunchError::Api {
                operation: "DescribeJobs",
                message: format!("Batch job {instance_id} is not an s3spot job (no S3SPOT_JOB)"),
                retryable: false,
            })?;
        // The job as the bootstrap script carries it: the one form every caller reads.
        Ok(BASE64.encode(format!("S3SPOT_JOB={}\n", spec.encode())))
    }

    async fn console_output(&self, _instance_id: &str) -> Result<Option<String>, LaunchError> {
        // The container's output is in CloudWatch Logs; the worker's logs are beside the
        // results, as on EC2.
        Ok(None)
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), LaunchError> {
        // Each job is stopped whatever became of the one before it.
        let mut failed = Vec::new();
        for id in instance_ids {
            // TerminateJob ends a job in any state: a queued one never starts, a running one
            // gets SIGTERM, which the worker takes as a stop from outside.
            if let Err(error) = self
                .client
                .terminate_job()
                .job_id(id)
                .reason("stopped by s3spot")
                .send()
                .await
            {
                failed.push((id, api_error("TerminateJob", &error)));
            }
        }
        match failed.len() {
            0 => Ok(()),
            _ => Err(LaunchError::Api {
                operation: "TerminateJob",
                retryable: failed.iter().any(|(_, error)| error.is_retryable()),
                message: failed
                    .iter()
                    .map(|(id, error)| format!("{id}: {error}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            }),
        }
    }

    async fn spot_prices(&self, _query: &PriceQuery) -> Result<Vec<SpotPrice>, LaunchError> {
        Ok(Vec::new())
    }
}

/// The launcher of the configured backend, for the binaries.
#[derive(Debug, Clone)]
pub enum AwsLauncher {
    Ec2(Ec2Launcher),
    Batch(BatchLauncher),
}

impl AwsLauncher {
    pub fn new(sdk: &aws_config::SdkConfig, backend: &Backend) -> Self {
        match backend {
            Backend::Ec2 => AwsLauncher::Ec2(Ec2Launcher::new(sdk)),
            Backend::Batch(target) => AwsLauncher::Batch(BatchLauncher::new(sdk, target.clone())),
        }
    }
}

impl Launcher for AwsLauncher {
    async fn count_active(&self, pipeline: &str, enough: usize) -> Result<usize, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.count_active(pipeline, enough).await,
            AwsLauncher::Batch(l) => l.count_active(pipeline, enough).await,
        }
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Launched, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.launch(request).await,
            AwsLauncher::Batch(l) => l.launch(request).await,
        }
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.describe(instance_id).await,
            AwsLauncher::Batch(l) => l.describe(instance_id).await,
        }
    }

    async fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.instances(pipeline, job).await,
            AwsLauncher::Batch(l) => l.instances(pipeline, job).await,
        }
    }

    async fn user_data(&self, instance_id: &str) -> Result<String, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.user_data(instance_id).await,
            AwsLauncher::Batch(l) => l.user_data(instance_id).await,
        }
    }

    async fn console_output(&self, instance_id: &str) -> Result<Option<String>, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.console_output(instance_id).await,
            AwsLauncher::Batch(l) => l.console_output(instance_id).await,
        }
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.terminate(instance_ids).await,
            AwsLauncher::Batch(l) => l.terminate(instance_ids).await,
        }
    }

    async fn spot_prices(&self, query: &PriceQuery) -> Result<Vec<SpotPrice>, LaunchError> {
        match self {
            AwsLauncher::Ec2(l) => l.spot_prices(query).await,
            AwsLauncher::Batch(l) => l.spot_prices(query).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_fit_batch_and_name_the_attempt() {
        let name = job_name(&"f".repeat(32), u32::MAX);
        assert!(name.len() <= 128, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_eq!(job_name("ab", 2), "s3spot-ab-2");
    }

    #[test]
    fn only_values_batch_accepts_become_tags() {
        assert!(is_taggable("20261130T101937.123Z-0123456789abcdef"));
        assert!(is_taggable("genomics-prod"));
        assert!(!is_taggable("photos (1).jpg"));
        assert!(!is_taggable("a&b"));
        // Letters Batch's own classes may not count as such (a combining vowel sign).
        assert!(!is_taggable("\u{915}\u{93f}"));
        assert!(!is_taggable(&"x".repeat(257)));
        assert!(!BATCH_TAGS.contains(&crate::launcher::TAG_KEY));
        assert!(!BATCH_TAGS.contains(&crate::launcher::TAG_BUCKET));
    }

    #[test]
    fn batch_states_read_as_instance_states() {
        for (status, state) in [
            (JobStatus::Submitted, "pending"),
            (JobStatus::Runnable, "pending"),
            (JobStatus::Starting, "pending"),
            (JobStatus::Running, "running"),
            (JobStatus::Succeeded, "terminated"),
            (JobStatus::Failed, "terminated"),
        ] {
            assert_eq!(instance_state(&status), state, "{status:?}");
        }
    }
}
