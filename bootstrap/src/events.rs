//! Job state-change events: one for every change of a job's state, on the account's default
//! EventBridge bus (`source: s3spot`, `detail-type: s3spot Job State Change`), or one JSON line
//! each in the local pipeline's `events.jsonl`. The format is `events/schema/job-state-change.json`.
//!
//! The launcher emits `waiting`, `launched`, and the outcomes it decides (failed to launch,
//! reaped, cancelled, interrupted); the worker emits `running` and its own outcome. An outcome
//! is announced by whoever's write of `status.json` changed the job's state (see
//! [`crate::record_change`]), so a redelivered or repeated write announces nothing twice.
//!
//! Events are news, not records: one that cannot be sent is logged, and never fails the job.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::cost::Cost;
use crate::job::JobSpec;
use crate::status::{State, Status, Writer, timestamp};

/// The `source` of every s3spot event.
pub const EVENT_SOURCE: &str = "s3spot";
/// The `detail-type` of a job's state change.
pub const EVENT_DETAIL_TYPE: &str = "s3spot Job State Change";
/// How long one event may take to send, retries included: the job waits for it at its start
/// and before its instance powers off.
const SEND_TIME: std::time::Duration = std::time::Duration::from_secs(5);
/// Once a send has failed, the next ones for a while get this long: a launcher with a batch of
/// records must not spend its timeout waiting on EventBridge.
const SEND_TIME_WHILE_FAILING: std::time::Duration = std::time::Duration::from_millis(500);
const FAILING_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// Tries of an entry that EventBridge refused for a passing reason.
const ENTRY_TRIES: u32 = 3;
/// Errors longer than this are cut in an event: EventBridge takes 256 KiB per entry, and a
/// notification e-mail is read by people.
const MAX_ERROR_CHARS: usize = 2000;

/// A job's state, as its events name it: the states of `status.json`, and the two steps before
/// an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Waiting,
    /// The launcher has an instance for the attempt.
    Launched,
    /// The worker on it has begun.
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Interrupted,
    Cancelled,
}

impl From<State> for JobState {
    fn from(state: State) -> JobState {
        match state {
            State::Waiting => JobState::Waiting,
            State::Succeeded => JobState::Succeeded,
            State::Failed => JobState::Failed,
            State::TimedOut => JobState::TimedOut,
            State::Interrupted => JobState::Interrupted,
            State::Cancelled => JobState::Cancelled,
        }
    }
}

impl JobState {
    /// The state `status` says the job is in: a wait that ended in a launch (the launcher's
    /// note until the worker reports) is `launched`.
    pub fn of(status: &Status) -> JobState {
        match &status.waiting {
            Some(waiting) if status.is_waiting() && waiting.instance_id.is_some() => {
                JobState::Launched
            }
            _ => status.state.into(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Launched => "launched",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Interrupted => "interrupted",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The instance an attempt runs on, as far as the emitter knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventInstance {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub instance_type: Option<String>,
    /// `spot` or `on-demand`.
    pub market: Option<String>,
    pub zone: Option<String>,
}

/// Where the job's results are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventResults {
    pub bucket: String,
    /// Every result of the job is under it.
    pub prefix: String,
    /// The key of its `status.json`.
    pub status: String,
}

/// The `detail` of a job state-change event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub pipeline: String,
    pub job_id: String,
    pub bucket: String,
    pub key: String,
    /// The upload's identity: what tells it apart from other uploads of the key.
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub uploaded_at: Option<String>,
    pub attempt: u32,
    pub state: JobState,
    /// The job's state before this change, as far as the emitter knows it.
    pub previous_state: Option<JobState>,
    /// RFC 3339, UTC.
    pub time: String,
    /// `launcher` or `worker`.
    pub emitted_by: Writer,
    pub instance: Option<EventInstance>,
    pub results: EventResults,
    /// Why it failed, or why it waits.
    pub error: Option<String>,
    /// The attempt's estimated cost, once it has ended.
    pub cost: Option<Cost>,
}

impl JobEvent {
    /// `job` has come to `state`.
    pub fn new(
        pipeline: &str,
        job: &JobSpec,
        state: JobState,
        previous_state: Option<JobState>,
        emitted_by: Writer,
    ) -> JobEvent {
        JobEvent {
            pipeline: pipeline.to_owned(),
            job_id: job.job_id.clone(),
            bucket: job.bucket.clone(),
            key: job.key.clone(),
            version_id: job.version_id.clone(),
            etag: job.etag.clone(),
            uploaded_at: job.uploaded_at.clone(),
            attempt: job.attempt,
            state,
            previous_state,
            time: timestamp(SystemTime::now()),
            emitted_by,
            instance: None,
            results: EventResults {
                bucket: job.results_bucket.clone(),
                prefix: job.results_key_prefix(),
                status: job.status_key(),
            },
            error: None,
            cost: None,
        }
    }

    /// The job's state is now what `status` says (a status of `job`'s attempt, just written by
    /// `emitted_by`: the document may hold another writer's account under its verdict).
    pub fn of_status(
        pipeline: &str,
        job: &JobSpec,
        status: &Status,
        previous_state: Option<JobState>,
        emitted_by: Writer,
    ) -> JobEvent {
        let mut job = job.clone();
        job.attempt = status.attempt;
        let mut event = JobEvent::new(
            pipeline,
            &job,
            JobState::of(status),
            previous_state,
            emitted_by,
        );
        event.error = status.error.as_deref().map(cut);
        event.cost = status.cost.clone();
        let waiting_on = status.waiting.as_ref().and_then(|w| w.instance_id.clone());
        event.instance = match (&status.instance, waiting_on) {
            (Some(instance), _) if instance.id.is_some() => Some(EventInstance {
                id: instance.id.clone(),
                instance_type: instance.instance_type.clone(),
                market: instance.lifecycle.clone(),
                zone: status.cost.as_ref().and_then(|c| c.zone.clone()),
            }),
            (_, Some(id)) => Some(EventInstance {
                id: Some(id),
                ..EventInstance::default()
            }),
            _ => None,
        };
        event
    }

    /// The whole event, as EventBridge delivers it to a rule's target, and as `events.jsonl`
    /// keeps it.
    pub fn envelope(&self, account: &str, region: &str) -> serde_json::Value {
        serde_json::json!({
            "version": "0",
            "id": self.id(),
            "detail-type": EVENT_DETAIL_TYPE,
            "source": EVENT_SOURCE,
            "account": account,
            "time": self.time,
            "region": region,
            "resources": [],
            "detail": self,
        })
    }

    /// The change's id: a job's attempt comes to each state once, so the same change announced
    /// twice (a launch recorded by two deliveries) has the same id, and a consumer can tell.
    fn id(&self) -> String {
        let digest = Sha256::digest(
            serde_json::json!([self.pipeline, self.job_id, self.attempt, self.state])
                .to_string()
                .as_bytes(),
        );
        let hex = hex::encode(&digest[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        )
    }
}

fn cut(error: &str) -> String {
    if error.chars().count() <= MAX_ERROR_CHARS {
        return error.to_owned();
    }
    let mut cut: String = error.chars().take(MAX_ERROR_CHARS).collect();
    cut.push('…');
    cut
}

/// Why an event was not sent.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("EventBridge PutEvents failed")]
    Put(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("EventBridge refused the event: {code}: {message}")]
    Refused { code: String, message: String },
    #[error("no answer in {0:?}")]
    TimedOut(std::time::Duration),
    #[error("cannot append to {path}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where events go: the seam between the emitters and EventBridge (or a file, or a test).
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    async fn put(&self, event: &JobEvent) -> Result<(), EventError>;
}

/// The emitters' handle on a sink. Cheap to clone.
#[derive(Clone)]
pub struct Events {
    sink: Option<Arc<dyn EventSink>>,
    /// Until when sends get [`SEND_TIME_WHILE_FAILING`], after a failure.
    failing_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.sink.is_some() {
            "Events(on)"
        } else {
            "Events(off)"
        })
    }
}

impl Default for Events {
    fn default() -> Events {
        Events::off()
    }
}

impl Events {
    pub fn off() -> Events {
        Events {
            sink: None,
            failing_until: Arc::default(),
        }
    }

    pub fn to(sink: impl EventSink + 'static) -> Events {
        Events {
            sink: Some(Arc::new(sink)),
            failing_until: Arc::default(),
        }
    }

    pub fn is_on(&self) -> bool {
        self.sink.is_some()
    }

    /// From `S3SPOT_EVENTS`: `eventbridge` (the default) for the default bus of `sdk`'s
    /// account and region, `off`, or `file:<path>` for a file of JSON lines.
    pub fn from_setting(
        setting: Option<&str>,
        sdk: &aws_config::SdkConfig,
    ) -> Result<Events, String> {
        match setting.map(str::trim).unwrap_or("") {
            "" | "eventbridge" => Ok(Events::to(EventBridge::new(sdk))),
            "off" => Ok(Events::off()),
            other => match other.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Events::to(JsonLines::new(path))),
                _ => Err(format!(
                    "S3SPOT_EVENTS={other:?} is not one of eventbridge, off, file:<path>"
                )),
            },
        }
    }

    /// Sends `event`, within a few seconds; a failure is logged, never returned: the job goes
    /// on.
    pub async fn emit(&self, event: JobEvent) {
        let Some(sink) = &self.sink else { return };
        let now = std::time::Instant::now();
        let limit = match *self.failing_until.lock().expect("not poisoned") {
            Some(until) if now < until => SEND_TIME_WHILE_FAILING,
            _ => SEND_TIME,
        };
        let sent = tokio::time::timeout(limit, sink.put(&event))
            .await
            .unwrap_or(Err(EventError::TimedOut(limit)));
        *self.failing_until.lock().expect("not poisoned") =
            sent.is_err().then(|| now + FAILING_FOR);
        match sent {
            Ok(()) => tracing::info!(
                job_id = event.job_id,
                attempt = event.attempt,
                state = %event.state,
                "job event sent"
            ),
            Err(error) => tracing::warn!(
                job_id = event.job_id,
                attempt = event.attempt,
                state = %event.state,
                error = crate::error_chain(&error),
                "cannot send the job event; the job goes on"
            ),
        }
    }
}

/// The account's default EventBridge bus.
#[derive(Debug, Clone)]
pub struct EventBridge {
    client: aws_sdk_eventbridge::Client,
}

impl EventBridge {
    pub fn new(sdk: &aws_config::SdkConfig) -> EventBridge {
        EventBridge::from_client(aws_sdk_eventbridge::Client::new(sdk))
    }

    pub fn from_client(client: aws_sdk_eventbridge::Client) -> EventBridge {
        EventBridge { client }
    }
}

#[async_trait::async_trait]
impl EventSink for EventBridge {
    async fn put(&self, event: &JobEvent) -> Result<(), EventError> {
        use aws_sdk_eventbridge::types::PutEventsRequestEntry;
        let detail = serde_json::to_string(event).expect("an event serialises");
        let time = crate::status::parse_timestamp(&event.time)
            .map(aws_sdk_eventbridge::primitives::DateTime::from);
        let entry = PutEventsRequestEntry::builder()
            .source(EVENT_SOURCE)
            .detail_type(EVENT_DETAIL_TYPE)
            .detail(detail)
            .set_time(time)
            .build();
        let mut tries = 0;
        loop {
            tries += 1;
            // The SDK retries the call; an entry refused inside its 200 is ours to retry.
            let output = self
                .client
                .put_events()
                .entries(entry.clone())
                .send()
                .await
                .map_err(|error| EventError::Put(Box::new(error)))?;
            if output.failed_entry_count() == 0 {
                return Ok(());
            }
            let failed = output.entries().iter().find(|e| e.error_code().is_some());
            let code = failed
                .and_then(|e| e.error_code())
                .unwrap_or("unknown")
                .to_owned();
            let passing = [
                "ThrottlingException",
                "InternalFailure",
                "InternalException",
            ]
            .contains(&code.as_str());
            if !passing || tries >= ENTRY_TRIES {
                return Err(EventError::Refused {
                    code,
                    message: failed
                        .and_then(|e| e.error_message())
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 << tries)).await;
        }
    }
}

/// A file of JSON lines, one whole event each, as the local pipeline keeps them. Each line is
/// one `write` to a file opened for appending, so writers in several processes (the pipeline
/// and its instances) do not interleave.
#[derive(Debug, Clone)]
pub struct JsonLines {
    path: PathBuf,
}

impl JsonLines {
    pub fn new(path: impl Into<PathBuf>) -> JsonLines {
        JsonLines { path: path.into() }
    }
}

#[async_trait::async_trait]
impl EventSink for JsonLines {
    async fn put(&self, event: &JobEvent) -> Result<(), EventError> {
        let mut line = event.envelope("local", "local").to_string();
        line.push('\n');
        let path = self.path.clone();
        let failed = |source| EventError::File {
            path: self.path.clone(),
            source,
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut file| file.write_all(line.as_bytes()))
            .map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::tests::sample;

    #[test]
    fn an_event_names_the_job_its_upload_and_where_its_results_are() {
        let job = sample();
        let event = JobEvent::new(
            "p",
            &job,
            JobState::Launched,
            Some(JobState::Waiting),
            Writer::Launcher,
        );
        let value = serde_json::to_value(&event).unwrap();
        assert_eq!(value["state"], "launched");
        assert_eq!(value["previous_state"], "waiting");
        assert_eq!(value["emitted_by"], "launcher");
        assert_eq!(value["key"], "in/report 2024.csv");
        assert_eq!(value["version_id"], "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY");
        assert_eq!(value["results"]["status"], job.status_key());
        let envelope = event.envelope("123456789012", "us-east-1");
        assert_eq!(envelope["source"], "s3spot");
        assert_eq!(envelope["detail-type"], "s3spot Job State Change");
        assert_eq!(envelope["id"], event.envelope("x", "y")["id"]);
    }

    #[test]
    fn long_errors_are_cut() {
        let job = sample();
        let mut status = Status::initial(&job, Writer::Worker, SystemTime::now());
        status.error = Some("é".repeat(MAX_ERROR_CHARS + 10));
        let event = JobEvent::of_status("p", &job, &status, None, Writer::Worker);
        assert_eq!(
            event.error.unwrap().chars().count(),
            MAX_ERROR_CHARS + "…".chars().count()
        );
    }

    #[tokio::test]
    async fn json_lines_append_one_whole_event_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let events = Events::to(JsonLines::new(&path));
        let job = sample();
        for state in [JobState::Launched, JobState::Running] {
            events
                .emit(JobEvent::new("p", &job, state, None, Writer::Worker))
                .await;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let states: Vec<String> = text
            .lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                value["detail"]["state"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(states, ["launched", "running"]);
    }

    #[tokio::test]
    async fn a_sink_that_fails_is_logged_and_nothing_else() {
        let events = Events::to(JsonLines::new("/nonexistent-dir/events.jsonl"));
        events
            .emit(JobEvent::new(
                "p",
                &sample(),
                JobState::Running,
                None,
                Writer::Worker,
            ))
            .await;
    }

    #[test]
    fn the_setting_names_a_sink_or_is_refused() {
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        assert!(Events::from_setting(None, &sdk).unwrap().is_on());
        assert!(!Events::from_setting(Some("off"), &sdk).unwrap().is_on());
        assert!(
            Events::from_setting(Some("file:/tmp/e.jsonl"), &sdk)
                .unwrap()
                .is_on()
        );
        let error = Events::from_setting(Some("sns"), &sdk).unwrap_err();
        assert!(error.contains("\"sns\""), "{error}");
    }
}
