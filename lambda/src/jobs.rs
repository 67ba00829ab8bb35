//! Jobs as an operator sees them: the pipeline's instances by tag, with what their status.json
//! says; and the controls on them that launch nothing (cancel, and the reaper's look at the
//! fleet). `s3spot jobs` and the scheduled reaper both run this, through the same [`Launcher`]
//! and [`StatusStore`] seams as the handler.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use s3spot_bootstrap::{
    Events, HARD_LIMIT_GRACE_SECS, Instance, JobEvent, JobSpec, JobState, Recorded, STATUS_FILE,
    STDERR_FILE, STDOUT_FILE, State, Status, StatusError, StatusStore, Stored, Usd, Writer,
    changed_state, job_from_base64_user_data, key_results_prefix, parse_timestamp, read_status,
    read_stored, record_change, stopped_folder, timestamp, upload_folder, upload_order,
    waiting_prefix,
};

use crate::config::JobsConfig;
use crate::launcher::{
    InstanceInfo, LaunchError, Launcher, MAX_TAG_VALUE_CHARS, StateReason, TAG_BUCKET, TAG_JOB,
    TAG_KEY, TAG_PIPELINE, TAG_UPLOAD, is_active_state, is_ended_state,
};

/// How long past its max runtime an instance may still be pending or running before it counts
/// as stuck: the bootstrap's own hard limit comes `HARD_LIMIT_GRACE_SECS` after the max
/// runtime, and booting and fetching the worker come before the clock starts.
pub const STUCK_GRACE_SECS: u64 = HARD_LIMIT_GRACE_SECS + 300;

/// How much of each log `show` prints.
pub const LOG_TAIL_BYTES: u64 = 4096;

/// How much of an ended instance's console output goes into its attempt's status.
pub const CONSOLE_TAIL_CHARS: usize = 2048;

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
        "s3://{bucket}/{key} is being launched at this moment (or was just launched): look again \
         with `s3spot jobs show`, and cancel its instance once EC2 lists it"
    )]
    Busy { bucket: String, key: String },
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
    #[error(
        "the job costs are summed from the results bucket, and none is configured: set \
         S3SPOT_RESULTS_BUCKET (the stack's DataBucket output)"
    )]
    NoResultsBucket,
}

/// What names a job on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An instance of the job.
    Instance(String),
    /// The object: its key alone, found through the instances' tags, or its full location,
    /// which also finds jobs whose instances EC2 has forgotten. Its newest upload's job, for
    /// commands about one job.
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

/// How long one reaper run spends on the list of waiting jobs (see [`Jobs::expire_waiting`]),
/// well inside the function's timeout.
pub const EXPIRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(15);

/// One instance of the pipeline, as `s3spot jobs list` shows it; or a job that waits for one
/// (`state` is `waiting`, and `instance_id` is empty).
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
    /// The job's folder under its key's results.
    pub upload: Option<String>,
    pub attempt: Option<u32>,
    /// The max runtime the job was launched with.
    pub max_runtime_secs: Option<u64>,
    /// Pending or running for longer than its max runtime plus [`STUCK_GRACE_SECS`].
    pub stuck: bool,
    /// What status.json says of this instance's attempt, once there is something.
    pub result: Option<State>,
    /// The status.json could not be read: `result` says nothing then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub status_unreadable: bool,
    /// The attempt was interrupted, and status.json knows of no later one: the next attempt
    /// has yet to be launched (or its worker has yet to start).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub awaits_next_attempt: bool,
    /// EC2 took it back (its worker saw the notice, or the launcher recorded the warning): its
    /// job's next attempt is due, whether EC2 or the bootstrap then powered the instance off.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot_interruption: bool,
    /// Why EC2 last changed its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<StateReason>,
    /// For a job with no instance yet: why it waits, in short, and since when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<WaitingRow>,
    /// The attempt's estimated cost and its seconds from launch to end, once status.json has
    /// them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<Usd>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
}

/// Why a job waits, as `s3spot jobs list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingRow {
    /// The reason's first words: `no capacity`, `runaway guard`, ...
    pub reason: String,
    pub pools_tried: usize,
    /// RFC 3339.
    pub since: String,
    pub next_try: Option<String>,
    pub gives_up_at: Option<String>,
}

/// The first clause of a reason: what kind of wait it is.
fn short_reason(reason: &str) -> String {
    let first = reason.split(": ").next().unwrap_or(reason);
    let short: String = first.chars().take(60).collect();
    if short.len() < first.len() {
        format!("{short}…")
    } else {
        short
    }
}

impl JobInstance {
    pub fn is_active(&self) -> bool {
        is_active_state(&self.state)
    }

    /// Ended for good without an account of its attempt in status.json (as far as it can be
    /// read: an unreadable one is no evidence either way).
    pub fn ended_silently(&self) -> bool {
        is_ended_state(&self.state) && self.result.is_none() && !self.status_unreadable
    }

    /// Ended, and its job needs the reaper: it has no account of the attempt, or the attempt
    /// was interrupted and no later one is on record.
    pub fn needs_settling(&self) -> bool {
        self.ended_silently() || (is_ended_state(&self.state) && self.awaits_next_attempt)
    }

    fn info(&self) -> Instance {
        Instance {
            id: Some(self.instance_id.clone()),
            instance_type: self.instance_type.clone(),
            lifecycle: Some(self.market.clone()),
        }
    }
}

/// A job in full, for `s3spot jobs show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    pub bucket: String,
    pub key: String,
    pub job_id: Option<String>,
    pub instances: Vec<JobInstance>,
    pub status_url: String,
    pub status: Option<Status>,
    pub logs: Vec<LogTail>,
    /// Every upload of the key with results, oldest first: each one's folder.
    #[serde(default)]
    pub uploads: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTail {
    pub url: String,
    pub tail: String,
}

/// What a cancel or a reap stopped, and what the reaper found ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    pub instances: Vec<JobInstance>,
    /// Attempts whose instances ended without an account of them, and what was recorded.
    #[serde(default)]
    pub ended: Vec<EndedAttempt>,
    /// What could not be done: the instances are stopped all the same.
    pub errors: Vec<String>,
}

/// An attempt whose instance ended without its worker's account: the reaper's finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedAttempt {
    pub instance: JobInstance,
    /// What the reaper recorded (or, in a dry run, would record).
    pub outcome: String,
}

/// When an instance counts as stuck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clock {
    /// Seconds since the Unix epoch.
    pub now: i64,
    /// Active this long or longer: stuck, whatever the job's own max runtime. `None`: each
    /// job's max runtime plus [`STUCK_GRACE_SECS`].
    pub stuck_after_secs: Option<u64>,
    /// For instances launched without their max runtime in a tag.
    pub default_max_runtime_secs: u64,
}

impl Clock {
    /// Now, with the default thresholds of `config`.
    pub fn now(config: &JobsConfig) -> Clock {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Clock {
            now,
            stuck_after_secs: None,
            default_max_runtime_secs: config.max_runtime_secs,
        }
    }

    /// How long an instance of a job with this max runtime may be active.
    pub fn stuck_after(&self, max_runtime_secs: Option<u64>) -> u64 {
        self.stuck_after_secs.unwrap_or_else(|| {
            max_runtime_secs
                .unwrap_or(self.default_max_runtime_secs)
                .saturating_add(STUCK_GRACE_SECS)
        })
    }
}

/// What the reaper found: what it must stop, and what ended without an account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    pub stuck: Vec<JobInstance>,
    pub ended: Vec<JobInstance>,
}

impl Sweep {
    /// What the reaper would do: a dry run's answer.
    pub fn planned(self) -> Stopped {
        Stopped {
            instances: self.stuck,
            ended: self
                .ended
                .into_iter()
                .map(|instance| EndedAttempt {
                    outcome: match &instance.state_reason {
                        Some(reason) if reason.is_spot_reclaim() => {
                            "would re-launch its job (taken back by EC2)".into()
                        }
                        _ => "would record it failed".into(),
                    },
                    instance,
                })
                .collect(),
            errors: Vec::new(),
        }
    }
}

pub struct Jobs<L, S> {
    config: JobsConfig,
    launcher: L,
    statuses: S,
    events: Events,
}

impl<L: Launcher, S: StatusStore> Jobs<L, S> {
    pub fn new(config: JobsConfig, launcher: L, statuses: S) -> Self {
        Jobs {
            config,
            launcher,
            statuses,
            events: Events::off(),
        }
    }

    /// Announces the state changes it records (a cancel, the reaper's findings) to `events`.
    pub fn with_events(mut self, events: Events) -> Self {
        self.events = events;
        self
    }

    /// Records `status` for `spec`'s job by the one rule, and announces the change if it is
    /// one.
    pub(crate) async fn record_announced(
        &self,
        spec: &JobSpec,
        status: Status,
    ) -> Result<Recorded, StatusError> {
        record_announced(
            &self.statuses,
            &self.events,
            &self.config.pipeline,
            spec,
            status,
        )
        .await
    }

    pub fn config(&self) -> &JobsConfig {
        &self.config
    }

    pub(crate) fn statuses(&self) -> &S {
        &self.statuses
    }

    /// Every instance of the pipeline EC2 still lists, oldest first, then the jobs that wait for
    /// one, oldest wait first. Waiting jobs are listed in the results bucket
    /// (`S3SPOT_RESULTS_BUCKET`), or without one, in the buckets of the listed instances.
    pub async fn list(&self, clock: Clock) -> Result<Vec<JobInstance>, JobsError> {
        let instances = self.launcher.instances(&self.config.pipeline, None).await?;
        let mut buckets: Vec<String> = match &self.config.results_bucket {
            Some(bucket) => vec![bucket.clone()],
            None => instances
                .iter()
                .filter_map(|i| i.tag(TAG_BUCKET).map(str::to_owned))
                .collect(),
        };
        buckets.sort();
        buckets.dedup();
        let mut rows = self.rows(instances, clock).await?;
        let mut waiting = Vec::new();
        for bucket in &buckets {
            waiting.extend(self.waiting(bucket).await?);
        }
        waiting.sort_by(|a, b| {
            let since = |row: &JobInstance| row.waiting.as_ref().map(|w| w.since.clone());
            since(a).cmp(&since(b))
        });
        rows.extend(waiting);
        Ok(rows)
    }

    /// Fails the jobs listed as waiting in the results bucket whose wait has run out
    /// (`gives_up_at` has passed), with their last reason. A launch past it fails them too; this
    /// is for the job whose queue message ran out of deliveries first (to the dead-letter
    /// queue), which nothing would launch again. Entries are read and expired one by one, for
    /// at most [`EXPIRY_BUDGET`], so that a long list neither keeps the reaper from its other
    /// work nor from expiring any; the rest wait for the next run. Without
    /// `S3SPOT_RESULTS_BUCKET`, nothing is listed to look at.
    pub async fn expire_waiting(
        &self,
        now: SystemTime,
    ) -> Result<(Vec<EndedAttempt>, Vec<String>), JobsError> {
        let Some(bucket) = self.config.results_bucket.clone() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let started = std::time::Instant::now();
        let prefix = waiting_prefix(&self.config.results_prefix);
        let mut ended = Vec::new();
        let mut errors = Vec::new();
        for folder in self.statuses.folders(&bucket, &prefix).await? {
            if started.elapsed() > EXPIRY_BUDGET {
                break;
            }
            let entry = format!("{prefix}{folder}/{STATUS_FILE}");
            let listed = match read_stored(&self.statuses, &bucket, &entry).await {
                Ok(Some(Stored {
                    status: Ok(status), ..
                })) => status,
                Ok(_) => continue,
                Err(error) => {
                    errors.push(s3spot_bootstrap::error_chain(&error));
                    continue;
                }
            };
            let gives_up_at = listed.waiting.as_ref().and_then(|w| w.gives_up_at.clone());
            let past = gives_up_at
                .as_deref()
                .and_then(parse_timestamp)
                .is_some_and(|at| at <= now);
            if !past {
                continue;
            }
            let error = format!(
                "waited for an instance past S3SPOT_MAX_WAIT (until {}), and no delivery of its \
                 event is left to try again; last: {}",
                gives_up_at.unwrap_or_default(),
                listed
                    .waiting
                    .as_ref()
                    .map(|w| w.reason.as_str())
                    .unwrap_or_default()
            );
            match self
                .end_waiting(&bucket, &listed, State::Failed, &error, now)
                .await
            {
                Ok(Some(row)) => {
                    tracing::warn!(job_id = listed.job_id, error, "a waiting job gave up");
                    ended.push(EndedAttempt {
                        instance: row,
                        outcome: error,
                    });
                }
                Ok(None) => {}
                Err(error) => errors.push(format!(
                    "waiting job s3://{}/{}: {}",
                    listed.input.bucket,
                    listed.input.key,
                    s3spot_bootstrap::error_chain(&error)
                )),
            }
        }
        Ok((ended, errors))
    }

    /// Ends the wait of the job `listed` (its entry in the list of waiting jobs) with `state`
    /// and `error`: its status.json, then its attempt's claim (marked done, so that no later
    /// delivery launches it), then the list. `None`, with nothing written, when it turns out not
    /// to wait: EC2 lists an instance of the attempt or a later one, its status.json moved on,
    /// or a delivery holds its attempt's claim right now. The entry goes too when it is stale.
    async fn end_waiting(
        &self,
        bucket: &str,
        listed: &Status,
        state: State,
        error: &str,
        now: SystemTime,
    ) -> Result<Option<JobInstance>, JobsError> {
        let job_id = &listed.job_id;
        let entry = format!(
            "{}{job_id}/{STATUS_FILE}",
            waiting_prefix(&self.config.results_prefix)
        );
        let folder = format!(
            "{}{}/",
            key_results_prefix(&self.config.results_prefix, &listed.input.key),
            upload_folder(listed.uploaded_at.as_deref(), job_id)
        );
        let status_key = format!("{folder}{STATUS_FILE}");
        let launched = self
            .launcher
            .instances(&self.config.pipeline, Some(job_id))
            .await?
            .iter()
            .any(|i| i.attempt().is_some_and(|a| a >= listed.attempt));
        // The job's own status.json decides too: it may have launched, or ended, since.
        let current = read_status(&self.statuses, bucket, &status_key, job_id).await?;
        let waiting = current.filter(|s| {
            s.is_waiting()
                && s.attempt == listed.attempt
                && s.waiting.as_ref().is_some_and(|w| w.instance_id.is_none())
        });
        let Some(mut status) = waiting.filter(|_| !launched) else {
            self.statuses.delete(bucket, &entry).await?;
            return Ok(None);
        };
        let claim_key = format!(
            "{folder}{}attempt-{}.json",
            s3spot_bootstrap::RECORDS_FOLDER,
            status.attempt
        );
        if let Some(stored) =
            s3spot_bootstrap::read_claim(&self.statuses, bucket, &claim_key).await?
            && let Ok(mut claim) = stored.claim
        {
            if claim.instance_id.is_some() {
                self.statuses.delete(bucket, &entry).await?;
                return Ok(None);
            }
            let held = claim.is_pending()
                && claim
                    .age(now)
                    .is_some_and(|age| age < crate::launch::CLAIM_LEASE);
            if held {
                return Ok(None);
            }
            claim.done = Some(error.to_owned());
            match s3spot_bootstrap::write_claim(
                &self.statuses,
                bucket,
                &claim_key,
                &claim,
                &stored.expect,
            )
            .await
            {
                Ok(_) => {}
                // Taken by a delivery since: it decides.
                Err(StatusError::Conflict { .. }) => return Ok(None),
                Err(error) => return Err(error.into()),
            }
        }
        let row = self
            .waiting_row(&status)
            .unwrap_or_else(|| self.waiting_row(listed).expect("a listed job waits"));
        status.waiting = None;
        status.state = state;
        status.written_by = s3spot_bootstrap::Writer::Launcher;
        status.error = Some(error.to_owned());
        status.finished_at = timestamp(now);
        let spec = spec_of_status(&status, bucket, &self.config);
        // Both name the folder from the key, the upload time and the job id.
        debug_assert_eq!(spec.status_key(), status_key);
        self.record_announced(&spec, status).await?;
        self.statuses.delete(bucket, &entry).await?;
        Ok(Some(row))
    }

    /// `status` as a row of `s3spot jobs list`, if it says its job waits (and is not launched
    /// already, its worker yet to report).
    fn waiting_row(&self, status: &Status) -> Option<JobInstance> {
        let waiting = status
            .waiting
            .as_ref()
            .filter(|w| status.is_waiting() && w.instance_id.is_none())?;
        Some(JobInstance {
            instance_id: String::new(),
            state: State::Waiting.to_string(),
            market: String::new(),
            instance_type: None,
            launched_at: None,
            age_secs: None,
            bucket: status.input.bucket.clone(),
            key: status.input.key.clone(),
            job_id: Some(status.job_id.clone()),
            upload: None,
            attempt: Some(status.attempt),
            max_runtime_secs: None,
            stuck: false,
            result: None,
            status_unreadable: false,
            awaits_next_attempt: false,
            spot_interruption: false,
            state_reason: None,
            cost_usd: None,
            duration_secs: None,
            waiting: Some(WaitingRow {
                reason: short_reason(&waiting.reason),
                pools_tried: waiting.pools.len(),
                since: waiting.since.clone(),
                next_try: waiting.next_try.clone(),
                gives_up_at: waiting.gives_up_at.clone(),
            }),
        })
    }

    /// The jobs listed as waiting for an instance in `bucket`, as rows.
    pub async fn waiting(&self, bucket: &str) -> Result<Vec<JobInstance>, JobsError> {
        let prefix = waiting_prefix(&self.config.results_prefix);
        let mut rows = Vec::new();
        for folder in self.statuses.folders(bucket, &prefix).await? {
            let key = format!("{prefix}{folder}/{STATUS_FILE}");
            let Some(stored) = read_stored(&self.statuses, bucket, &key).await? else {
                continue;
            };
            // Not what the launcher writes there, or no longer waiting: not listed.
            let Ok(status) = stored.status else { continue };
            rows.extend(self.waiting_row(&status));
        }
        Ok(rows)
    }

    /// The instances of the jobs `target` names: one job for an instance, every job of the
    /// object for an object. Empty when it names an object that no listed instance ran.
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
                // By the tags first, so that only these jobs' status.json are read; a key longer
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

    /// A job's instances, status.json and log tails: the job of the instance named, or the
    /// newest upload's job of the object named.
    pub async fn show(&self, target: &Target, clock: Clock) -> Result<JobDetail, JobsError> {
        let found = self.find(target, clock).await?;
        let job = self.newest_job(target, &found).await?;
        let instances: Vec<JobInstance> = found
            .into_iter()
            .filter(|i| i.job_id.is_some() && i.job_id == job.job_id)
            .collect();
        let status = match &job.job_id {
            Some(job_id) => {
                read_status(
                    &self.statuses,
                    &job.results_bucket,
                    &job.status_key(),
                    job_id,
                )
                .await?
            }
            None => None,
        };
        let mut logs = Vec::new();
        for name in [STDOUT_FILE, STDERR_FILE] {
            // Where the attempt on record left its log: the job's folder, or its own when it
            // was stopped from outside.
            let log_key = status
                .as_ref()
                .and_then(|status| {
                    let stopped = format!("{}{}{name}", job.prefix, stopped_folder(status.attempt));
                    status.outputs.iter().find(|k| **k == stopped).cloned()
                })
                .unwrap_or_else(|| format!("{}{name}", job.prefix));
            let url = format!("s3://{}/{log_key}", job.results_bucket);
            // The logs are a help, not the answer: one that cannot be read is said so.
            match self
                .statuses
                .tail(&job.results_bucket, &log_key, LOG_TAIL_BYTES)
                .await
            {
                Ok(Some(tail)) => logs.push(LogTail { url, tail }),
                Ok(None) => {}
                Err(error) => {
                    let hint = match &error {
                        StatusError::Read { denied: true, .. } => {
                            "; the stack's OperatorPolicyArn output allows it"
                        }
                        _ => "",
                    };
                    logs.push(LogTail {
                        url,
                        tail: format!(
                            "(cannot be read: {}{hint})",
                            s3spot_bootstrap::error_chain(&error)
                        ),
                    });
                }
            }
        }
        Ok(JobDetail {
            status_url: format!("s3://{}/{}", job.results_bucket, job.status_key()),
            bucket: job.bucket,
            key: job.key,
            job_id: job.job_id,
            instances,
            status,
            logs,
            uploads: job.uploads,
        })
    }

    /// Terminates the pending and running instances of the jobs `target` names (every upload's,
    /// for an object), and marks their attempts `cancelled`.
    pub async fn cancel(&self, target: &Target, clock: Clock) -> Result<Stopped, JobsError> {
        let instances = self.find(target, clock).await?;
        let active: Vec<JobInstance> = instances
            .iter()
            .filter(|i| i.is_active())
            .cloned()
            .collect();
        if active.is_empty() {
            // No instance yet: a job that waits for one is cancelled before it launches.
            if let Some(stopped) = self.cancel_waiting(target, &instances).await? {
                return Ok(stopped);
            }
            let (bucket, key) = self.object_of(target, &instances)?;
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

    /// Cancels the newest job of `target` if it waits for an instance; `None` if it does not.
    async fn cancel_waiting(
        &self,
        target: &Target,
        found: &[JobInstance],
    ) -> Result<Option<Stopped>, JobsError> {
        let Ok(job) = self.newest_job(target, found).await else {
            return Ok(None);
        };
        let Some(job_id) = &job.job_id else {
            return Ok(None);
        };
        let Some(status) = read_status(
            &self.statuses,
            &job.results_bucket,
            &job.status_key(),
            job_id,
        )
        .await?
        else {
            return Ok(None);
        };
        if self.waiting_row(&status).is_none() {
            return Ok(None);
        }
        let error = "cancelled with `s3spot jobs cancel` while it waited for an instance";
        match self
            .end_waiting(
                &job.results_bucket,
                &status,
                State::Cancelled,
                error,
                SystemTime::now(),
            )
            .await?
        {
            Some(row) => Ok(Some(Stopped {
                instances: Vec::new(),
                ended: vec![EndedAttempt {
                    instance: row,
                    outcome: error.to_owned(),
                }],
                errors: Vec::new(),
            })),
            None => Err(JobsError::Busy {
                bucket: job.bucket,
                key: job.key,
            }),
        }
    }

    /// What the reaper has to do: the pipeline's stuck instances (active past their job's own
    /// max runtime and its grace), and those that ended without an account of their attempt.
    pub async fn sweep(&self, clock: Clock) -> Result<Sweep, JobsError> {
        let instances = self.launcher.instances(&self.config.pipeline, None).await?;
        // Only ended instances need their status read here; the others are judged by their age.
        let (stuck, rest): (Vec<JobInstance>, Vec<JobInstance>) = self
            .rows_with(instances, clock, |i| is_ended_state(&i.state))
            .await?
            .into_iter()
            .partition(|i| i.stuck);
        // A job that EC2 lists a later attempt of has moved on: that attempt carries it (its
        // worker writes status.json when it ends, and carries this one into its history).
        let later_attempt_listed = |ended: &JobInstance| {
            rest.iter().chain(&stuck).any(|other| {
                other.job_id.is_some()
                    && other.job_id == ended.job_id
                    && other.attempt > ended.attempt
            })
        };
        let ended = rest
            .iter()
            .filter(|i| i.needs_settling() && !later_attempt_listed(i))
            .cloned()
            .collect();
        Ok(Sweep { stuck, ended })
    }

    /// Terminates stuck instances and marks their attempts failed.
    pub async fn reap_stuck(
        &self,
        stuck: Vec<JobInstance>,
        clock: Clock,
    ) -> Result<Stopped, JobsError> {
        if stuck.is_empty() {
            return Ok(Stopped::default());
        }
        let stopped = self
            .stop(stuck, State::Failed, |instance| {
                format!(
                    "reaped: {} for {}s, past the {}s that the job's max runtime and its grace \
                     allow; the worker hung or the instance did not shut down",
                    instance.state,
                    instance.age_secs.unwrap_or_default(),
                    clock.stuck_after(instance.max_runtime_secs),
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

    /// Records that `instance` ended without an account of its attempt: `failed`, with EC2's
    /// reason and the end of its console output, where they can be had. Returns what stands.
    pub async fn record_silent_end(&self, instance: &JobInstance) -> Result<String, JobsError> {
        let spec = self.spec_of(&instance.instance_id).await?;
        let reason = instance.state_reason.as_ref().map_or_else(
            || "EC2 gives no reason".to_owned(),
            |reason| format!("EC2's reason: {reason}"),
        );
        let mut error = if instance.result == Some(State::Interrupted) {
            // Its worker was stopped (a shutdown, a terminate) by something other than a spot
            // interruption, which alone launches a next attempt.
            format!(
                "instance {} ended ({}) after its worker was stopped, and not by a spot \
                 interruption, so no next attempt is launched; {reason}",
                instance.instance_id, instance.state
            )
        } else {
            format!(
                "instance {} ended ({}) without a status from its worker; {reason}",
                instance.instance_id, instance.state
            )
        };
        match self.launcher.console_output(&instance.instance_id).await {
            Ok(Some(console)) => {
                error.push_str("; the end of its console output:\n");
                error.push_str(&tail_chars(&console, CONSOLE_TAIL_CHARS));
            }
            Ok(None) => error.push_str("; it left no console output"),
            Err(e) => {
                error.push_str("; its console output cannot be read: ");
                error.push_str(&e.to_string());
            }
        }
        let verdict = Status::verdict(&spec, instance.info(), State::Failed, error);
        self.record_verdict(&spec, verdict).await
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
            let recorded = async {
                let spec = self.spec_of(&instance.instance_id).await?;
                let mut verdict = Status::verdict(&spec, instance.info(), state, why(instance));
                // Terminated now: the attempt's cost runs until now.
                verdict.cost = self.cost_until_now(&spec).await;
                self.record_verdict(&spec, verdict).await
            };
            if let Err(error) = recorded.await {
                errors.push(format!(
                    "{}: {}",
                    instance.instance_id,
                    s3spot_bootstrap::error_chain(&error)
                ));
            }
        }
        let ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        self.launcher.terminate(&ids).await?;
        Ok(Stopped {
            instances,
            ended: Vec::new(),
            errors,
        })
    }

    /// The cost of `spec`'s attempt if its instance ends now, from the price in its claim;
    /// `None` if there is none (a claim that cannot be read costs the estimate, not the stop).
    async fn cost_until_now(&self, spec: &JobSpec) -> Option<s3spot_bootstrap::Cost> {
        let claim =
            s3spot_bootstrap::read_claim(&self.statuses, &spec.results_bucket, &spec.claim_key())
                .await
                .ok()??;
        let price = claim.claim.ok()?.price?;
        s3spot_bootstrap::Cost::estimate(&price, SystemTime::now())
    }

    /// Records the launcher's verdict on `spec`'s attempt by the one rule: it never overrides
    /// the worker's own account. Returns what stands, as a sentence.
    pub(crate) async fn record_verdict(
        &self,
        spec: &JobSpec,
        verdict: Status,
    ) -> Result<String, JobsError> {
        let state = verdict.state;
        let recorded = self.record_announced(spec, verdict).await?;
        Ok(match recorded {
            Recorded::Written(status) if status.attempt == spec.attempt => {
                format!("{} recorded", status.state)
            }
            Recorded::Written(_) => format!("{state} recorded in the job's history"),
            Recorded::Kept { reason } => format!("nothing recorded: {reason}"),
        })
    }

    /// The job an instance runs, from its user-data.
    pub(crate) async fn spec_of(&self, instance_id: &str) -> Result<JobSpec, JobsError> {
        let encoded = self.launcher.user_data(instance_id).await?;
        job_from_base64_user_data(&encoded).map_err(|error| JobsError::NoJob {
            instance_id: instance_id.to_owned(),
            reason: s3spot_bootstrap::error_chain(&error),
        })
    }

    /// The object a job is about: from its instances, or from the target itself.
    fn object_of(
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

    /// The job of `target` that commands about one job act on: the instance's, or the newest
    /// upload's of the object, by its instances' tags and by the upload folders in S3 (which
    /// outlive EC2's memory of the instances).
    pub(crate) async fn newest_job(
        &self,
        target: &Target,
        found: &[JobInstance],
    ) -> Result<JobLocation, JobsError> {
        let (bucket, key) = self.object_of(target, found)?;
        let results_bucket = self
            .config
            .results_bucket
            .clone()
            .unwrap_or_else(|| bucket.clone());
        let key_prefix = key_results_prefix(&self.config.results_prefix, &key);
        let mut uploads: Vec<String> = self
            .statuses
            .folders(&results_bucket, &key_prefix)
            .await?
            .into_iter()
            .filter(|folder| upload_order(folder).is_some())
            .collect();
        uploads.sort_by(|a, b| upload_order(a).cmp(&upload_order(b)));
        let named = match target {
            Target::Instance(id) => found.iter().find(|i| &i.instance_id == id),
            Target::Object { .. } => None,
        };
        // (upload folder, job id when known), newest last: folders are named by upload time.
        let chosen = match named {
            Some(instance) => instance
                .upload
                .clone()
                .map(|upload| (upload, instance.job_id.clone())),
            None => found
                .iter()
                .filter_map(|i| Some((i.upload.clone()?, i.job_id.clone())))
                .chain(uploads.iter().map(|upload| (upload.clone(), None)))
                .filter(|(upload, _)| upload_order(upload).is_some())
                .max_by(|a, b| {
                    upload_order(&a.0)
                        .cmp(&upload_order(&b.0))
                        .then(a.1.is_some().cmp(&b.1.is_some()))
                }),
        };
        let (job_id, upload) = match chosen {
            Some((upload, Some(job_id))) => (Some(job_id), Some(upload)),
            Some((upload, None)) => {
                let stored = read_stored(
                    &self.statuses,
                    &results_bucket,
                    &format!("{key_prefix}{upload}/{STATUS_FILE}"),
                )
                .await?;
                let job_id = stored.and_then(|s| s.status.ok()).map(|s| s.job_id);
                (job_id, Some(upload))
            }
            None if found.is_empty() => {
                return Err(JobsError::NotFound {
                    target: target.to_string(),
                    pipeline: self.config.pipeline.clone(),
                    hint: ", and no upload of it has results; upload the object again to run it",
                });
            }
            None => (found.first().and_then(|i| i.job_id.clone()), None),
        };
        let prefix = match &upload {
            Some(upload) => format!("{key_prefix}{upload}/"),
            None => key_prefix,
        };
        Ok(JobLocation {
            bucket,
            key,
            job_id,
            results_bucket,
            prefix,
            uploads,
        })
    }

    async fn rows(
        &self,
        instances: Vec<InstanceInfo>,
        clock: Clock,
    ) -> Result<Vec<JobInstance>, JobsError> {
        self.rows_with(instances, clock, |_| true).await
    }

    /// The rows of `instances`, with the result read for those `wanted` says.
    async fn rows_with(
        &self,
        mut instances: Vec<InstanceInfo>,
        clock: Clock,
        wanted: impl Fn(&InstanceInfo) -> bool,
    ) -> Result<Vec<JobInstance>, JobsError> {
        instances.sort_by(|a, b| {
            a.launched_at
                .cmp(&b.launched_at)
                .then_with(|| a.instance_id.cmp(&b.instance_id))
        });
        let mut statuses: std::collections::HashMap<(String, String), Result<Option<Status>, ()>> =
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
            let max_runtime_secs = instance.max_runtime_secs();
            let stuck = instance.is_active()
                && age_secs.is_some_and(|age| age >= clock.stuck_after(max_runtime_secs));
            let attempt = instance.attempt();
            let job_id = instance.tag(TAG_JOB).map(str::to_owned);
            let upload = instance.tag(TAG_UPLOAD).map(str::to_owned);
            let mut status_unreadable = false;
            let mut awaits_next_attempt = false;
            let mut spot_interruption = false;
            let mut cost = None;
            let result = match (&job_id, &upload) {
                (Some(job_id), Some(upload)) if wanted(&instance) => {
                    let results_bucket = self.config.results_bucket.as_deref().unwrap_or(&bucket);
                    let status_key = format!(
                        "{}{upload}/{STATUS_FILE}",
                        key_results_prefix(&self.config.results_prefix, &key)
                    );
                    let location = (results_bucket.to_owned(), status_key);
                    if !statuses.contains_key(&location) {
                        let status =
                            match read_status(&self.statuses, &location.0, &location.1, job_id)
                                .await
                            {
                                // A damaged document says nothing, and gives way to the next.
                                Err(StatusError::Invalid { .. }) => Ok(None),
                                // A read that failed, or another job's document: nothing is
                                // known of this attempt, so nothing is decided on it.
                                Err(error) => {
                                    tracing::warn!(
                                        error = s3spot_bootstrap::error_chain(&error),
                                        "cannot read a job's status.json"
                                    );
                                    Err(())
                                }
                                Ok(status) => Ok(status),
                            };
                        statuses.insert(location.clone(), status);
                    }
                    match &statuses[&location] {
                        Ok(status) => status.as_ref().and_then(|status| {
                            let attempt = attempt.unwrap_or(status.attempt);
                            let outcome = status.outcome_of(attempt);
                            awaits_next_attempt =
                                outcome == Some(State::Interrupted) && status.attempt <= attempt;
                            spot_interruption = awaits_next_attempt
                                && status.attempt == attempt
                                && status.taken_back();
                            cost = status.cost_of(attempt).cloned();
                            outcome
                        }),
                        Err(()) => {
                            status_unreadable = true;
                            None
                        }
                    }
                }
                _ => None,
            };
            rows.push(JobInstance {
                instance_id: instance.instance_id.clone(),
                state: instance.state.clone(),
                market: instance.market.clone(),
                instance_type: instance.instance_type.clone(),
                launched_at: instance.launched_at,
                age_secs,
                bucket,
                key,
                job_id,
                upload,
                attempt,
                max_runtime_secs,
                stuck,
                result,
                status_unreadable,
                awaits_next_attempt,
                spot_interruption,
                state_reason: instance.state_reason.clone(),
                waiting: None,
                cost_usd: cost.as_ref().map(|c| c.usd),
                duration_secs: cost.as_ref().map(|c| c.seconds),
            });
        }
        Ok(rows)
    }
}

/// Where one job's results are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobLocation {
    pub bucket: String,
    pub key: String,
    /// `None`: no instance or status.json says which job the folder is.
    pub job_id: Option<String>,
    pub results_bucket: String,
    /// The job's folder, `<results prefix><key>/<upload>/` (just the key's folder when no
    /// upload of it is known).
    pub prefix: String,
    /// Every upload folder of the key in S3, oldest first.
    pub uploads: Vec<String>,
}

impl JobLocation {
    pub(crate) fn status_key(&self) -> String {
        format!("{}{STATUS_FILE}", self.prefix)
    }
}

/// The last `chars` characters of `text`.
fn tail_chars(text: &str, chars: usize) -> String {
    let skip = text.chars().count().saturating_sub(chars);
    text.chars().skip(skip).collect()
}

/// Records `status` at `spec`'s status.json by the one rule, and puts a state-change event on
/// `events` if the write changed the job's state: every writer of the launcher's side goes
/// through here, so that a change is announced by the one write that made it.
pub(crate) async fn record_announced<S: StatusStore>(
    statuses: &S,
    events: &Events,
    pipeline: &str,
    spec: &JobSpec,
    status: Status,
) -> Result<Recorded, StatusError> {
    let (recorded, before) = Box::pin(record_change(
        statuses,
        &spec.results_bucket,
        &spec.status_key(),
        status,
    ))
    .await?;
    // A launch is announced by the launch, which knows where the instance landed.
    if let Some(written) = changed_state(&recorded, before)
        && JobState::of(written) != JobState::Launched
    {
        // A verdict on an instance with nothing on record of its attempt found it launched, at
        // least; otherwise the job was as its stored status said (an earlier attempt's, for the
        // wait of the next one).
        let launched = written.instance.as_ref().is_some_and(|i| i.id.is_some());
        let previous = match before {
            Some((state, attempt)) if attempt == written.attempt => Some(state),
            _ if launched => Some(JobState::Launched),
            other => other.map(|(state, _)| state),
        };
        events
            .emit(JobEvent::of_status(
                pipeline,
                spec,
                written,
                previous,
                Writer::Launcher,
            ))
            .await;
    }
    Ok(recorded)
}

/// The job a status is of, as far as its events need it (the object, the upload, where the
/// results are), for a job whose launch spec is not at hand.
fn spec_of_status(status: &Status, results_bucket: &str, config: &JobsConfig) -> JobSpec {
    JobSpec {
        bucket: status.input.bucket.clone(),
        key: status.input.key.clone(),
        version_id: status.input.version_id.clone(),
        etag: status.input.etag.clone(),
        size: status.input.size,
        sequencer: None,
        job_id: status.job_id.clone(),
        uploaded_at: status.uploaded_at.clone(),
        results_bucket: results_bucket.to_owned(),
        results_prefix: config.results_prefix.clone(),
        command: None,
        max_runtime_secs: config.max_runtime_secs,
        worker: s3spot_bootstrap::WorkerArtifact {
            uri: String::new(),
            sha256: String::new(),
        },
        attempt: status.attempt,
        pipeline: Some(config.pipeline.clone()),
        events_off: false,
    }
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

    #[test]
    fn each_job_is_judged_stuck_by_its_own_max_runtime() {
        let clock = Clock {
            now: 100_000,
            stuck_after_secs: None,
            default_max_runtime_secs: 3600,
        };
        assert_eq!(clock.stuck_after(Some(7200)), 7200 + STUCK_GRACE_SECS);
        assert_eq!(clock.stuck_after(Some(60)), 60 + STUCK_GRACE_SECS);
        assert_eq!(clock.stuck_after(None), 3600 + STUCK_GRACE_SECS);
        let forced = Clock {
            stuck_after_secs: Some(5),
            ..clock
        };
        assert_eq!(forced.stuck_after(Some(7200)), 5);
    }

    #[test]
    fn console_tails_keep_the_end_whole() {
        assert_eq!(tail_chars("abcdé", 2), "dé");
        assert_eq!(tail_chars("ab", 5), "ab");
    }
}
