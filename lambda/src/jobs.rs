//! Jobs as an operator sees them: the pipeline's instances by tag, with what their status.json
//! says; and the controls on them (cancel, reap). `s3spot jobs` and the scheduled reaper both
//! run this, through the same [`Launcher`] and [`StatusStore`] seams as the handler.

use serde::{Deserialize, Serialize};

use s3spot_bootstrap::{
    HARD_LIMIT_GRACE_SECS, STATUS_FILE, STDERR_FILE, STDOUT_FILE, State, Status,
};

use crate::config::JobsConfig;
use crate::handler::{decode_job, ended};
use crate::launcher::{
    InstanceInfo, LaunchError, Launcher, MAX_TAG_VALUE_CHARS, TAG_BUCKET, TAG_JOB, TAG_KEY,
    TAG_PIPELINE, is_active_state,
};
use crate::statuses::{StatusError, StatusStore};

/// How long past its max runtime an instance may still be pending or running before it counts
/// as stuck: the bootstrap's own hard limit comes `HARD_LIMIT_GRACE_SECS` after the max
/// runtime, and booting and fetching the worker come before the clock starts.
pub const STUCK_GRACE_SECS: u64 = HARD_LIMIT_GRACE_SECS + 300;

/// How much of each log `show` prints.
pub const LOG_TAIL_BYTES: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error(transparent)]
    Launcher(#[from] LaunchError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("no job {target:?} in pipeline {pipeline:?}: no instance has that key or id{hint}")]
    NotFound {
        target: String,
        pipeline: String,
        hint: &'static str,
    },
    #[error("instance {instance_id} has no s3spot job: {reason}")]
    NoJob { instance_id: String, reason: String },
    #[error(
        "nothing to cancel for s3://{bucket}/{key}: none of its instances is pending or running \
         ({states})"
    )]
    NothingToCancel {
        bucket: String,
        key: String,
        states: String,
    },
    #[error(
        "s3://{bucket}/{key} is still {state} on {instance_id} (attempt {attempt}); cancel it \
         first with `s3spot jobs cancel {instance_id}`"
    )]
    StillActive {
        bucket: String,
        key: String,
        instance_id: String,
        state: String,
        attempt: u32,
    },
}

/// What names a job on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An instance of the job.
    Instance(String),
    /// The object: its key alone, found through the instances' tags, or its full location,
    /// which also finds jobs whose instances EC2 has forgotten.
    Object { bucket: Option<String>, key: String },
}

impl Target {
    /// `i-0abc...` is an instance, `s3://bucket/key` an object, anything else a key.
    pub fn parse(text: &str) -> Target {
        if let Some(rest) = text.strip_prefix("s3://")
            && let Some((bucket, key)) = rest.split_once('/')
            && !bucket.is_empty()
            && !key.is_empty()
        {
            return Target::Object {
                bucket: Some(bucket.to_owned()),
                key: key.to_owned(),
            };
        }
        let instance_like = text.strip_prefix("i-").is_some_and(|id| {
            !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
        if instance_like {
            Target::Instance(text.to_owned())
        } else {
            Target::Object {
                bucket: None,
                key: text.to_owned(),
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Instance(id) => f.write_str(id),
            Target::Object {
                bucket: Some(bucket),
                key,
            } => write!(f, "s3://{bucket}/{key}"),
            Target::Object { bucket: None, key } => f.write_str(key),
        }
    }
}

/// One instance of the pipeline, as `s3spot jobs list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInstance {
    pub instance_id: String,
    pub state: String,
    pub market: String,
    pub instance_type: Option<String>,
    /// Seconds since the Unix epoch.
    pub launched_at: Option<i64>,
    pub age_secs: Option<u64>,
    pub bucket: String,
    pub key: String,
    pub job_id: Option<String>,
    pub attempt: Option<u32>,
    /// Pending or running for longer than the max runtime plus [`STUCK_GRACE_SECS`].
    pub stuck: bool,
    /// What status.json says of this instance's attempt, once there is one.
    pub result: Option<State>,
}

impl JobInstance {
    pub fn is_active(&self) -> bool {
        is_active_state(&self.state)
    }
}

/// A job in full, for `s3spot jobs show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    pub bucket: String,
    pub key: String,
    pub instances: Vec<JobInstance>,
    pub status_url: String,
    pub status: Option<Status>,
    pub logs: Vec<LogTail>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    pub url: String,
    pub tail: String,
}

/// What a cancel or a reap stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    pub instances: Vec<JobInstance>,
    /// Status documents that could not be written: the instances are stopped all the same.
    pub errors: Vec<String>,
}

/// When an instance counts as stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Seconds since the Unix epoch.
    pub now: i64,
    /// Active for this long or longer: stuck.
    pub stuck_after_secs: u64,
}

impl Clock {
    /// Now, with the default threshold for `config`.
    pub fn now(config: &JobsConfig) -> Clock {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Clock {
            now,
            stuck_after_secs: config.max_runtime_secs + STUCK_GRACE_SECS,
        }
    }
}

pub struct Jobs<L, S> {
    config: JobsConfig,
    launcher: L,
    statuses: S,
}

impl<L: Launcher, S: StatusStore> Jobs<L, S> {
    pub fn new(config: JobsConfig, launcher: L, statuses: S) -> Self {
        Jobs {
            config,
            launcher,
            statuses,
        }
    }

    pub fn config(&self) -> &JobsConfig {
        &self.config
    }

    /// Every instance of the pipeline EC2 still lists, oldest first.
    pub async fn list(&self, clock: Clock) -> Result<Vec<JobInstance>, JobsError> {
        let instances = self.launcher.instances(&self.config.pipeline, None).await?;
        self.rows(instances, clock).await
    }

    /// The instances of the job `target` names; empty when it names an object that no listed
    /// instance ran.
    pub async fn find(&self, target: &Target, clock: Clock) -> Result<Vec<JobInstance>, JobsError> {
        let pipeline = &self.config.pipeline;
        match target {
            Target::Instance(id) => {
                let instance = self
                    .launcher
                    .describe(id)
                    .await?
                    .filter(|i| i.tag(TAG_PIPELINE) == Some(pipeline.as_str()));
                let Some(instance) = instance else {
                    return Err(JobsError::NotFound {
                        target: id.clone(),
                        pipeline: pipeline.clone(),
                        hint: ", or EC2 has forgotten it (about an hour after it terminated)",
                    });
                };
                let instances = match instance.tag(TAG_JOB) {
                    Some(job) => self.launcher.instances(pipeline, Some(job)).await?,
                    None => vec![instance],
                };
                self.rows(instances, clock).await
            }
            Target::Object { bucket, key } => {
                // By the tags first, so that only this job's status.json is read; a key longer
                // than a tag holds is confirmed from the user-data by `rows`.
                let tagged: String = key.chars().take(MAX_TAG_VALUE_CHARS).collect();
                let instances = self
                    .launcher
                    .instances(pipeline, None)
                    .await?
                    .into_iter()
                    .filter(|i| i.tag(TAG_KEY) == Some(tagged.as_str()))
                    .filter(|i| {
                        bucket
                            .as_deref()
                            .is_none_or(|b| i.tag(TAG_BUCKET) == Some(b))
                    })
                    .collect();
                Ok(self
                    .rows(instances, clock)
                    .await?
                    .into_iter()
                    .filter(|row| {
                        &row.key == key && bucket.as_ref().is_none_or(|b| &row.bucket == b)
                    })
                    .collect())
            }
        }
    }

    /// A job's instances, status.json and log tails.
    pub async fn show(&self, target: &Target, clock: Clock) -> Result<JobDetail, JobsError> {
        let instances = self.find(target, clock).await?;
        let (bucket, key) = self.object_of(target, &instances)?;
        let (results_bucket, prefix) = self.results(&bucket, &key);
        let status_key = format!("{prefix}{STATUS_FILE}");
        let status = self.statuses.read(&results_bucket, &status_key).await?;
        let mut logs = Vec::new();
        for name in [STDOUT_FILE, STDERR_FILE] {
            let log_key = format!("{prefix}{name}");
            if let Some(tail) = self
                .statuses
                .tail(&results_bucket, &log_key, LOG_TAIL_BYTES)
                .await?
            {
                logs.push(LogTail {
                    url: format!("s3://{results_bucket}/{log_key}"),
                    tail,
                });
            }
        }
        Ok(JobDetail {
            bucket,
            key,
            instances,
            status_url: format!("s3://{results_bucket}/{status_key}"),
            status,
            logs,
        })
    }

    /// Terminates the job's pending and running instances and marks its attempt `cancelled`.
    pub async fn cancel(&self, target: &Target, clock: Clock) -> Result<Stopped, JobsError> {
        let instances = self.find(target, clock).await?;
        let (bucket, key) = self.object_of(target, &instances)?;
        let active: Vec<JobInstance> = instances
            .iter()
            .filter(|i| i.is_active())
            .cloned()
            .collect();
        if active.is_empty() {
            let states = instances
                .iter()
                .map(|i| format!("{} {}", i.instance_id, i.state))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(JobsError::NothingToCancel {
                bucket,
                key,
                states: if states.is_empty() {
                    "EC2 lists none".into()
                } else {
                    states
                },
            });
        }
        self.stop(active, State::Cancelled, |_| {
            "cancelled with `s3spot jobs cancel`".to_owned()
        })
        .await
    }

    /// Terminates the pipeline's stuck instances and marks their attempts failed; with
    /// `dry_run`, only lists them.
    pub async fn reap(&self, clock: Clock, dry_run: bool) -> Result<Stopped, JobsError> {
        let stuck: Vec<JobInstance> = self
            .list(clock)
            .await?
            .into_iter()
            .filter(|i| i.stuck)
            .collect();
        if dry_run || stuck.is_empty() {
            return Ok(Stopped {
                instances: stuck,
                errors: Vec::new(),
            });
        }
        let limit = clock.stuck_after_secs;
        let stopped = self
            .stop(stuck, State::Failed, |instance| {
                format!(
                    "reaped: {} for {}s, past the {limit}s that the max runtime and its grace \
                     allow; the worker hung or the instance did not shut down",
                    instance.state,
                    instance.age_secs.unwrap_or_default()
                )
            })
            .await?;
        for instance in &stopped.instances {
            tracing::warn!(
                instance_id = instance.instance_id,
                bucket = instance.bucket,
                key = ?instance.key,
                age_secs = instance.age_secs,
                "reaped a stuck instance"
            );
        }
        Ok(stopped)
    }

    /// Records `state` for each instance's attempt (unless its worker already recorded how the
    /// attempt ended), then terminates them. The verdict goes first so that a worker stopped by
    /// the shutdown finds it and keeps it, with its own outputs, instead of racing it.
    async fn stop(
        &self,
        instances: Vec<JobInstance>,
        state: State,
        why: impl Fn(&JobInstance) -> String,
    ) -> Result<Stopped, JobsError> {
        let mut errors = Vec::new();
        for instance in &instances {
            if let Err(error) = self.record(instance, state, why(instance)).await {
                errors.push(format!(
                    "{}: {}",
                    instance.instance_id,
                    crate::error_chain(&error)
                ));
            }
        }
        let ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        self.launcher.terminate(&ids).await?;
        Ok(Stopped { instances, errors })
    }

    async fn record(
        &self,
        instance: &JobInstance,
        state: State,
        why: String,
    ) -> Result<(), JobsError> {
        let spec = self.spec_of(&instance.instance_id).await?;
        let status_key = format!("{}{STATUS_FILE}", spec.results_key_prefix());
        let previous = match self.statuses.read(&spec.results_bucket, &status_key).await {
            Ok(previous) => previous,
            // Replaced: a damaged document must not keep the verdict from being recorded.
            Err(StatusError::Invalid { .. }) => None,
            Err(error) => return Err(error.into()),
        };
        if let Some(previous) = &previous
            && previous.attempt >= spec.attempt
            && !matches!(previous.state, State::Interrupted)
        {
            return Ok(());
        }
        let info = InstanceInfo {
            instance_id: instance.instance_id.clone(),
            state: instance.state.clone(),
            instance_type: instance.instance_type.clone(),
            market: instance.market.clone(),
            launched_at: instance.launched_at,
            tags: Vec::new(),
        };
        let status = ended(&spec, &info, previous, state, why);
        self.statuses
            .write(&spec.results_bucket, &status_key, &status)
            .await?;
        Ok(())
    }

    /// The job an instance runs, from its user-data.
    pub(crate) async fn spec_of(
        &self,
        instance_id: &str,
    ) -> Result<s3spot_bootstrap::JobSpec, JobsError> {
        let encoded = self.launcher.user_data(instance_id).await?;
        decode_job(&encoded).map_err(|reason| JobsError::NoJob {
            instance_id: instance_id.to_owned(),
            reason,
        })
    }

    /// The object a job is about: from its instances, or from the target itself.
    pub(crate) fn object_of(
        &self,
        target: &Target,
        instances: &[JobInstance],
    ) -> Result<(String, String), JobsError> {
        if let Some(instance) = instances.first() {
            return Ok((instance.bucket.clone(), instance.key.clone()));
        }
        match target {
            Target::Object {
                bucket: Some(bucket),
                key,
            } => Ok((bucket.clone(), key.clone())),
            _ => Err(JobsError::NotFound {
                target: target.to_string(),
                pipeline: self.config.pipeline.clone(),
                hint: "; EC2 forgets terminated instances after about an hour: name the object \
                       as s3://bucket/key to read its status.json",
            }),
        }
    }

    /// Where an object's results are: bucket, and key prefix.
    pub(crate) fn results(&self, bucket: &str, key: &str) -> (String, String) {
        (
            self.config
                .results_bucket
                .clone()
                .unwrap_or_else(|| bucket.to_owned()),
            s3spot_bootstrap::results_key_prefix(&self.config.results_prefix, key),
        )
    }

    async fn rows(
        &self,
        mut instances: Vec<InstanceInfo>,
        clock: Clock,
    ) -> Result<Vec<JobInstance>, JobsError> {
        instances.sort_by(|a, b| {
            a.launched_at
                .cmp(&b.launched_at)
                .then_with(|| a.instance_id.cmp(&b.instance_id))
        });
        let mut statuses: std::collections::HashMap<(String, String), Option<Status>> =
            Default::default();
        let mut rows = Vec::with_capacity(instances.len());
        for instance in instances {
            let bucket = instance.tag(TAG_BUCKET).unwrap_or_default().to_owned();
            let mut key = instance.tag(TAG_KEY).unwrap_or_default().to_owned();
            // The tag holds at most 256 characters; the user-data holds the key whole.
            if key.chars().count() >= MAX_TAG_VALUE_CHARS
                && let Ok(spec) = self.spec_of(&instance.instance_id).await
            {
                key = spec.key;
            }
            let age_secs = instance
                .launched_at
                .map(|at| u64::try_from(clock.now.saturating_sub(at)).unwrap_or(0));
            let stuck =
                instance.is_active() && age_secs.is_some_and(|age| age >= clock.stuck_after_secs);
            let attempt = instance.attempt();
            let location = self.results(&bucket, &key);
            if !statuses.contains_key(&location) {
                let (results_bucket, prefix) = &location;
                let status_key = format!("{prefix}{STATUS_FILE}");
                let status = match self.statuses.read(results_bucket, &status_key).await {
                    Ok(status) => status,
                    Err(error) => {
                        tracing::warn!(
                            error = crate::error_chain(&error),
                            "cannot read a job's status.json"
                        );
                        None
                    }
                };
                statuses.insert(location.clone(), status);
            }
            let result = statuses[&location]
                .as_ref()
                .and_then(|status| result_of(status, attempt));
            rows.push(JobInstance {
                instance_id: instance.instance_id.clone(),
                state: instance.state.clone(),
                market: instance.market.clone(),
                instance_type: instance.instance_type.clone(),
                launched_at: instance.launched_at,
                age_secs,
                bucket,
                key,
                job_id: instance.tag(TAG_JOB).map(str::to_owned),
                attempt,
                stuck,
                result,
            });
        }
        Ok(rows)
    }
}

/// How status.json says `attempt` ended: the document itself, or an entry of its history.
fn result_of(status: &Status, attempt: Option<u32>) -> Option<State> {
    let attempt = attempt.unwrap_or(status.attempt);
    if status.attempt == attempt {
        return Some(status.state);
    }
    status
        .history
        .iter()
        .find(|a| a.attempt == attempt)
        .map(|a| a.state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_instances_objects_or_keys() {
        assert_eq!(
            Target::parse("i-0abc123"),
            Target::Instance("i-0abc123".into())
        );
        assert_eq!(
            Target::parse("i-local-000001"),
            Target::Instance("i-local-000001".into())
        );
        assert_eq!(
            Target::parse("s3://data/in/a b.csv"),
            Target::Object {
                bucket: Some("data".into()),
                key: "in/a b.csv".into()
            }
        );
        for key in ["in/a.csv", "i-data.csv", "i-", "s3://data", "s3://data/"] {
            assert_eq!(
                Target::parse(key),
                Target::Object {
                    bucket: None,
                    key: key.into()
                },
                "{key}"
            );
        }
    }
}
