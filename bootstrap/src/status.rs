//! The contract that comes back: `status.json`, one per job (one upload of one object), in the
//! job's results folder. The worker writes its account of each attempt; the launcher writes a
//! verdict when it ends an attempt itself or finds one ended without an account. [`settle`] is
//! the one rule for which of them a stored document gives way to.

use std::time::SystemTime;

use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
use serde::{Deserialize, Serialize};

use crate::cost::Cost;
use crate::job::JobSpec;

/// The name of the status document under a job's results prefix.
pub const STATUS_FILE: &str = "status.json";
/// The command's output streams, next to it.
pub const STDOUT_FILE: &str = "stdout.log";
pub const STDERR_FILE: &str = "stderr.log";
/// What the built-in analysis writes when no command is configured.
pub const REPORT_FILE: &str = "report.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Succeeded,
    Failed,
    TimedOut,
    Interrupted,
    /// Stopped on purpose, by `s3spot jobs cancel`.
    Cancelled,
    /// No instance yet: the launcher tried and will try again (see [`Status::waiting`]). Not an
    /// outcome; whatever the attempt comes to replaces it.
    Waiting,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::TimedOut => "timed_out",
            State::Interrupted => "interrupted",
            State::Cancelled => "cancelled",
            State::Waiting => "waiting",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who wrote a status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Writer {
    /// The worker, on the instance: what it did.
    #[default]
    Worker,
    /// The launcher (a spot interruption's re-launch, a cancel, the reaper): what it decided, or
    /// what it found when an instance ended without a word.
    Launcher,
}

/// How one job ended, or how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
    /// The job this status belongs to (see [`crate::job_id`]); every reader checks it.
    #[serde(default)]
    pub job_id: String,
    /// When the object was uploaded, as its event said: with `job_id`, it names the job's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_at: Option<String>,
    #[serde(default)]
    pub written_by: Writer,
    pub input: Input,
    /// The result keys written for this job, status.json aside.
    pub outputs: Vec<String>,
    /// The command's exit code; absent without a command, or when a signal ended it.
    pub exit_code: Option<i32>,
    /// A readable account of what went wrong; absent on success.
    pub error: Option<String>,
    pub timings: Timings,
    /// The instance the job ran on, when it could be asked (it cannot off EC2).
    pub instance: Option<Instance>,
    pub attempt: u32,
    pub worker_version: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub finished_at: String,
    /// The earlier attempts of this job, oldest first: each re-launch (after a spot interruption,
    /// or a retry) carries them forward.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Attempt>,
    /// The launcher's verdict on this attempt, once a worker stopped from outside has taken it
    /// (its `state` and the start of `error` are then the verdict's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// The worker was stopped by EC2's spot interruption notice: the attempt is `interrupted`,
    /// and its job has a next attempt coming, however its instance then ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub spot_interruption: bool,
    /// Why the attempt has no instance yet, while it is `waiting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<Waiting>,
    /// What the attempt cost, estimated when it ended (see [`Cost::estimate`]); absent when
    /// its price is not known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// Why an attempt waits for an instance, and until when it may.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    /// In words, e.g. "no spot capacity in any of 12 pools".
    pub reason: String,
    /// Each pool the last launch tried, with EC2's answer; empty when none was tried (the
    /// instance cap, throttling).
    #[serde(default)]
    pub pools: Vec<WaitingPool>,
    /// When the attempt began to wait (RFC 3339, UTC).
    pub since: String,
    /// When the launcher tries again, as far as it knows (RFC 3339, UTC).
    pub next_try: Option<String>,
    /// Past this, the attempt fails with its last reason (RFC 3339, UTC).
    pub gives_up_at: Option<String>,
    /// The instance the attempt was launched on at last, while its worker has yet to report:
    /// the wait is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

/// One pool a launch tried: `spot m5.large in subnet-0abc`, and EC2's error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingPool {
    pub pool: String,
    pub code: String,
    pub message: String,
}

/// The launcher's word on an attempt: why it stopped it, or what it found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub state: State,
    pub error: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// How one earlier attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub state: State,
    pub instance_id: Option<String>,
    pub error: Option<String>,
    pub finished_at: String,
    /// What the attempt cost, if its status said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Cost>,
}

/// The object as it was downloaded (or as the job described it, if it never was).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub bucket: String,
    pub key: String,
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub download_ms: u64,
    pub process_ms: u64,
    pub upload_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub instance_type: Option<String>,
    /// `spot` or `on-demand`.
    pub lifecycle: Option<String>,
}

/// A time as status.json and claims write it; `None` if it is not one.
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let time = DateTime::from_str(text, DateTimeFormat::DateTime).ok()?;
    SystemTime::try_from(time).ok()
}

/// RFC 3339 in UTC, as status.json writes times.
pub fn timestamp(time: SystemTime) -> String {
    DateTime::from(time)
        .fmt(DateTimeFormat::DateTime)
        .unwrap_or_default()
}

impl Status {
    /// Where every account of `job` starts: failed, until the writer knows better.
    pub fn initial(job: &JobSpec, written_by: Writer, started: SystemTime) -> Status {
        Status {
            state: State::Failed,
            job_id: job.job_id.clone(),
            uploaded_at: job.uploaded_at.clone(),
            written_by,
            input: Input {
                bucket: job.bucket.clone(),
                key: job.key.clone(),
                version_id: job.version_id.clone(),
                etag: job.etag.clone(),
                size: job.size,
                sha256: None,
            },
            outputs: Vec::new(),
            exit_code: None,
            error: None,
            timings: Timings::default(),
            instance: None,
            attempt: job.attempt,
            worker_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: timestamp(started),
            finished_at: String::new(),
            history: Vec::new(),
            verdict: None,
            spot_interruption: false,
            waiting: None,
            cost: None,
        }
    }

    /// The launcher's account of an attempt that has no instance yet, and why.
    pub fn waiting(job: &JobSpec, waiting: Waiting) -> Status {
        let mut status = Status::initial(job, Writer::Launcher, SystemTime::now());
        status.state = State::Waiting;
        status.error = Some(waiting.reason.clone());
        status.started_at = String::new();
        status.waiting = Some(waiting);
        status
    }

    pub fn is_waiting(&self) -> bool {
        self.state == State::Waiting
    }

    /// The launcher's verdict on an attempt of `job`: it stopped it (cancel, reaper, a spot
    /// interruption's re-launch), or found it ended without an account.
    pub fn verdict(job: &JobSpec, instance: Instance, state: State, error: String) -> Status {
        let now = SystemTime::now();
        let mut status = Status::initial(job, Writer::Launcher, now);
        status.state = state;
        status.error = Some(error);
        status.instance = Some(instance);
        status.started_at = String::new();
        status.finished_at = timestamp(now);
        status
    }

    /// Whether EC2 is taking this attempt back, and its job's next attempt is due: its worker
    /// was stopped by the spot notice, or the launcher recorded it interrupted (which it does
    /// only for a spot interruption).
    pub fn taken_back(&self) -> bool {
        self.state == State::Interrupted
            && (self.spot_interruption
                || self
                    .verdict_on()
                    .is_some_and(|verdict| verdict.state == State::Interrupted))
    }

    /// Whether this status is an account of `job_id`'s job. Statuses of old versions, without an
    /// id, belong to no job.
    pub fn belongs_to(&self, job_id: &str) -> bool {
        self.job_id == job_id
    }

    /// How `attempt` ended, as far as this status knows: the document itself, or an entry of its
    /// history.
    pub fn outcome_of(&self, attempt: u32) -> Option<State> {
        if self.attempt == attempt {
            return (!self.is_waiting()).then_some(self.state);
        }
        self.history
            .iter()
            .find(|a| a.attempt == attempt)
            .map(|a| a.state)
    }

    /// What `attempt` cost, as far as this status knows.
    pub fn cost_of(&self, attempt: u32) -> Option<&Cost> {
        if self.attempt == attempt {
            return self.cost.as_ref();
        }
        self.history
            .iter()
            .find(|a| a.attempt == attempt)
            .and_then(|a| a.cost.as_ref())
    }

    fn as_attempt(&self) -> Attempt {
        Attempt {
            attempt: self.attempt,
            state: self.state,
            instance_id: self.instance.as_ref().and_then(|i| i.id.clone()),
            error: self.error.clone(),
            finished_at: self.finished_at.clone(),
            cost: self.cost.clone(),
        }
    }

    /// Takes over the history of `earlier`, a status of an earlier attempt, with `earlier` itself
    /// as its last entry.
    fn carry_history(&mut self, earlier: Status) {
        let mut history: Vec<Attempt> = earlier
            .history
            .iter()
            .filter(|a| a.attempt < self.attempt)
            .cloned()
            .collect();
        if earlier.attempt < self.attempt && !earlier.is_waiting() {
            history.push(earlier.as_attempt());
        }
        history.extend(std::mem::take(&mut self.history));
        history.sort_by_key(|a| a.attempt);
        history.dedup_by_key(|a| a.attempt);
        self.history = history;
    }

    /// The verdict this status is, or holds; `None` for a worker's own account.
    fn verdict_on(&self) -> Option<Verdict> {
        if self.is_waiting() {
            return None;
        }
        match self.written_by {
            Writer::Launcher => Some(Verdict {
                state: self.state,
                error: self.error.clone().unwrap_or_default(),
                at: self.finished_at.clone(),
            }),
            Writer::Worker => self.verdict.clone(),
        }
    }

    /// The worker's own account of why it stopped, without the verdict in front of it.
    fn own_error(&self) -> Option<String> {
        let error = self.error.as_deref()?;
        match &self.verdict {
            Some(verdict) if error == verdict.error => None,
            Some(verdict) => Some(
                error
                    .strip_prefix(&format!("{}; ", verdict.error))
                    .unwrap_or(error)
                    .to_owned(),
            ),
            None => Some(error.to_owned()),
        }
    }

    /// The worker's account of an attempt it was stopped in, under the launcher's verdict on it:
    /// the launcher knows why it stopped the attempt (a cancel, the reaper, a re-launch), the
    /// worker what it had done by then.
    fn under_verdict(mut self, verdict: Verdict) -> Status {
        let own = self.own_error();
        // The notice that stopped the worker says a next attempt is due only while the verdict
        // leaves the attempt interrupted.
        self.spot_interruption &= verdict.state == State::Interrupted;
        self.state = verdict.state;
        self.error = Some(match own {
            Some(own) if own != verdict.error => format!("{}; {own}", verdict.error),
            _ => verdict.error.clone(),
        });
        self.verdict = Some(verdict);
        self
    }
}

/// What [`settle`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Store this document.
    Write(Box<Status>),
    /// Keep the stored one: the new account adds nothing it may change.
    Keep { reason: String },
}

/// The stored status belongs to another job: nothing may replace it from here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the status.json there belongs to job {found:?}, not to job {expected:?}; it is left as it is"
)]
pub struct OtherJob {
    pub expected: String,
    pub found: String,
}

/// The one rule for which status may replace which, applied by every writer to what is stored
/// (`current`) and what it has to say (`new`):
///
/// - a status never replaces one of another job;
/// - a later attempt replaces an earlier one, and carries it into its history;
/// - an earlier attempt never replaces a later one; if the later one does not know how it ended,
///   it joins that one's history;
/// - on the same attempt, the worker's account replaces the launcher's verdict, except that a
///   worker stopped from outside (`interrupted`) takes the verdict's state and adds its account
///   to the verdict's error; a verdict never replaces the worker's own account, except that of a
///   stopped worker, which it completes the same way;
/// - the first final verdict stands; an `interrupted` one (a re-launch, done or still to do)
///   gives way to a later verdict;
/// - the same account written again (a retried write) changes nothing;
/// - `waiting` is no outcome: it replaces only the same attempt's wait (or an earlier attempt,
///   which it carries into its history), and anything the attempt comes to replaces it.
pub fn settle(current: Option<Status>, new: Status) -> Result<Settled, OtherJob> {
    let Some(mut current) = current else {
        return Ok(Settled::Write(Box::new(new)));
    };
    if !current.belongs_to(&new.job_id) {
        return Err(OtherJob {
            expected: new.job_id,
            found: current.job_id,
        });
    }
    let keep = |reason: String| Ok(Settled::Keep { reason });
    // Waiting is no outcome: it replaces only itself, and anything the attempt comes to
    // replaces it.
    if new.is_waiting() && !(new.attempt == current.attempt && current.is_waiting()) {
        if new.attempt > current.attempt {
            let mut new = new;
            new.carry_history(current);
            return Ok(Settled::Write(Box::new(new)));
        }
        return keep(format!(
            "attempt {} is past waiting ({} on record for attempt {})",
            new.attempt, current.state, current.attempt
        ));
    }
    if new.attempt > current.attempt {
        let mut new = new;
        new.carry_history(current);
        return Ok(Settled::Write(Box::new(new)));
    }
    if new.attempt < current.attempt {
        if current.outcome_of(new.attempt).is_some() {
            return keep(format!(
                "attempt {} is already on record, and attempt {} has begun",
                new.attempt, current.attempt
            ));
        }
        current.history.push(new.as_attempt());
        current.history.sort_by_key(|a| a.attempt);
        return Ok(Settled::Write(Box::new(current)));
    }
    let standing = current
        .verdict_on()
        .filter(|verdict| verdict.state != State::Interrupted);
    let history = std::mem::take(&mut current.history);
    let settled = match (current.written_by, new.written_by) {
        (Writer::Worker, Writer::Worker) if new.started_at == current.started_at => {
            return keep(format!(
                "the worker's account of attempt {} is already on record",
                current.attempt
            ));
        }
        // A stopped worker takes the verdict on record, whoever wrote it.
        (_, Writer::Worker) => match current.verdict_on() {
            Some(verdict) if new.state == State::Interrupted => new.under_verdict(verdict),
            _ => new,
        },
        (Writer::Worker, Writer::Launcher)
            if current.verdict.is_none() && current.state != State::Interrupted =>
        {
            return keep(format!(
                "the worker's own account of attempt {} ({}) stands",
                current.attempt, current.state
            ));
        }
        (_, Writer::Launcher) if standing.is_some() => {
            return keep(format!(
                "attempt {} already has a verdict ({})",
                current.attempt, current.state
            ));
        }
        (Writer::Worker, Writer::Launcher) => {
            let verdict = new.verdict_on().expect("a launcher's status is a verdict");
            current.under_verdict(verdict)
        }
        (Writer::Launcher, Writer::Launcher) => new,
    };
    Ok(Settled::Write(Box::new(Status { history, ..settled })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobSpec {
        crate::job::tests::sample()
    }

    fn status(attempt: u32, state: State, written_by: Writer, instance: &str) -> Status {
        let mut job = job();
        job.attempt = attempt;
        let mut status = Status::initial(&job, written_by, SystemTime::UNIX_EPOCH);
        status.state = state;
        status.error = Some(format!("attempt {attempt} by {written_by:?}"));
        status.instance = Some(Instance {
            id: Some(instance.into()),
            ..Instance::default()
        });
        status.finished_at = format!("t{attempt}");
        status
    }

    fn written(settled: Result<Settled, OtherJob>) -> Status {
        match settled {
            Ok(Settled::Write(status)) => *status,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    fn kept(settled: Result<Settled, OtherJob>) -> String {
        match settled {
            Ok(Settled::Keep { reason }) => reason,
            other => panic!("expected the stored status kept, got {other:?}"),
        }
    }

    #[test]
    fn field_names_are_the_documented_ones() {
        let status = status(1, State::TimedOut, Writer::Worker, "i-0abc");
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "timed_out");
        assert_eq!(json["written_by"], "worker");
        assert_eq!(json["job_id"], job().job_id);
        assert_eq!(json["uploaded_at"], "2026-11-30T10:19:37.123Z");
        assert_eq!(json["timings"]["download_ms"], 0);
        for field in [
            "input",
            "outputs",
            "exit_code",
            "error",
            "instance",
            "attempt",
            "worker_version",
            "started_at",
            "finished_at",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json.get("history"), None, "absent while there is none");
        for state in [
            State::Succeeded,
            State::Failed,
            State::TimedOut,
            State::Interrupted,
            State::Cancelled,
            State::Waiting,
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), status);
        assert_eq!(timestamp(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_first_account_is_written_as_it_is() {
        let new = status(1, State::Succeeded, Writer::Worker, "i-1");
        assert_eq!(written(settle(None, new.clone())), new);
    }

    fn waiting(attempt: u32, reason: &str) -> Status {
        let mut job = job();
        job.attempt = attempt;
        Status::waiting(
            &job,
            Waiting {
                reason: reason.into(),
                pools: Vec::new(),
                since: "2026-11-30T10:00:00Z".into(),
                next_try: None,
                gives_up_at: None,
                instance_id: None,
            },
        )
    }

    #[test]
    fn waiting_is_no_outcome_and_gives_way_to_any() {
        // It replaces itself, and nothing else of its attempt or a later one.
        let first = waiting(1, "no capacity");
        let again = waiting(1, "a quota");
        assert_eq!(written(settle(Some(first.clone()), again.clone())), again);
        let worker = status(1, State::Succeeded, Writer::Worker, "i-1");
        kept(settle(Some(worker.clone()), waiting(1, "late")));
        kept(settle(Some(worker), waiting(0, "earlier")));
        let verdict = status(1, State::Cancelled, Writer::Launcher, "i-1");
        kept(settle(Some(verdict), waiting(1, "late")));
        // Whatever the attempt comes to replaces it: the worker's account, even one stopped
        // from outside (no verdict is taken from a wait), and the launcher's verdict.
        let stopped = status(1, State::Interrupted, Writer::Worker, "i-1");
        let settled = written(settle(Some(first.clone()), stopped.clone()));
        assert_eq!((settled.state, settled.verdict), (State::Interrupted, None));
        assert_eq!(settled.error, stopped.error);
        let failed = status(1, State::Failed, Writer::Launcher, "i-1");
        assert_eq!(
            written(settle(Some(first.clone()), failed.clone())).state,
            State::Failed
        );
        assert_eq!(first.outcome_of(1), None);
        // A later attempt's wait carries the earlier attempt; a wait is never history.
        let interrupted = status(1, State::Interrupted, Writer::Worker, "i-1");
        let next = written(settle(Some(interrupted), waiting(2, "no capacity")));
        assert_eq!(next.state, State::Waiting);
        assert_eq!(next.history.len(), 1);
        assert_eq!(next.outcome_of(1), Some(State::Interrupted));
        let ran = written(settle(
            Some(next),
            status(2, State::Succeeded, Writer::Worker, "i-2"),
        ));
        assert_eq!(ran.history.len(), 1, "{:?}", ran.history);
        let after_wait = written(settle(
            Some(waiting(1, "no capacity")),
            status(2, State::Succeeded, Writer::Worker, "i-2"),
        ));
        assert!(after_wait.history.is_empty(), "{:?}", after_wait.history);
    }

    #[test]
    fn nothing_replaces_a_status_of_another_job() {
        let mut theirs = status(1, State::Succeeded, Writer::Worker, "i-1");
        theirs.job_id = "another upload".into();
        for new in [
            status(1, State::Failed, Writer::Worker, "i-2"),
            status(2, State::Succeeded, Writer::Worker, "i-2"),
            status(1, State::Cancelled, Writer::Launcher, "i-2"),
        ] {
            let error = settle(Some(theirs.clone()), new).unwrap_err();
            assert_eq!(error.found, "another upload");
            assert!(error.to_string().contains("belongs to job"), "{error}");
        }
    }

    #[test]
    fn each_attempt_carries_the_ones_before_it() {
        let first = status(1, State::Interrupted, Writer::Launcher, "i-1");
        let second = written(settle(
            Some(first),
            status(2, State::Interrupted, Writer::Worker, "i-2"),
        ));
        let third = written(settle(
            Some(second),
            status(3, State::Succeeded, Writer::Worker, "i-3"),
        ));
        let summary: Vec<(u32, State, Option<&str>)> = third
            .history
            .iter()
            .map(|a| (a.attempt, a.state, a.instance_id.as_deref()))
            .collect();
        assert_eq!(
            summary,
            [
                (1, State::Interrupted, Some("i-1")),
                (2, State::Interrupted, Some("i-2"))
            ]
        );
        assert_eq!(third.state, State::Succeeded);
        assert_eq!(third.history[1].finished_at, "t2");
    }

    #[test]
    fn a_late_earlier_attempt_never_replaces_a_later_one() {
        let later = written(settle(
            Some(status(1, State::Interrupted, Writer::Launcher, "i-1")),
            status(2, State::Succeeded, Writer::Worker, "i-2"),
        ));
        let reason = kept(settle(
            Some(later.clone()),
            status(1, State::Interrupted, Writer::Worker, "i-1"),
        ));
        assert!(reason.contains("already on record"), "{reason}");

        // An attempt the later one knows nothing of joins its history, in order.
        let mut unaware = status(3, State::Succeeded, Writer::Worker, "i-3");
        unaware.history = later.history.clone();
        let joined = written(settle(
            Some(unaware),
            status(2, State::Failed, Writer::Launcher, "i-2"),
        ));
        assert_eq!(joined.state, State::Succeeded);
        assert_eq!(joined.attempt, 3);
        let attempts: Vec<(u32, State)> = joined
            .history
            .iter()
            .map(|a| (a.attempt, a.state))
            .collect();
        assert_eq!(attempts, [(1, State::Interrupted), (2, State::Failed)]);
    }

    #[test]
    fn a_stopped_worker_keeps_the_launchers_verdict_whichever_comes_first() {
        let mut verdict = status(2, State::Cancelled, Writer::Launcher, "i-2");
        verdict.error = Some("cancelled with `s3spot jobs cancel`".into());
        verdict.history = vec![status(1, State::Interrupted, Writer::Worker, "i-1").as_attempt()];
        let mut stopped = status(2, State::Interrupted, Writer::Worker, "i-2");
        stopped.error = Some("the worker received SIGTERM".into());
        stopped.outputs = vec!["analysis/x/partial.csv".into()];

        let verdict_first = written(settle(Some(verdict.clone()), stopped.clone()));
        let worker_first = written(settle(
            Some(written(settle(None, stopped.clone()))),
            verdict.clone(),
        ));
        for settled in [&verdict_first, &worker_first] {
            assert_eq!(settled.state, State::Cancelled);
            assert_eq!(
                settled.error.as_deref(),
                Some("cancelled with `s3spot jobs cancel`; the worker received SIGTERM")
            );
            assert_eq!(
                settled.outputs, stopped.outputs,
                "the worker's outputs stay"
            );
            assert_eq!(settled.written_by, Writer::Worker);
        }
        assert_eq!(verdict_first.history.len(), 1, "the history stays");
        // The account is complete now: no later verdict changes it.
        kept(settle(
            Some(verdict_first),
            status(2, State::Failed, Writer::Launcher, "i-2"),
        ));
    }

    #[test]
    fn a_worker_that_finished_on_its_own_keeps_its_account() {
        let succeeded = status(2, State::Succeeded, Writer::Worker, "i-2");
        let reason = kept(settle(
            Some(succeeded.clone()),
            status(2, State::Failed, Writer::Launcher, "i-2"),
        ));
        assert!(reason.contains("worker's own account"), "{reason}");
        // And the other way round: a verdict that raced a success gives way to it.
        let settled = written(settle(
            Some(status(2, State::Cancelled, Writer::Launcher, "i-2")),
            succeeded.clone(),
        ));
        assert_eq!(settled.state, State::Succeeded);
    }

    #[test]
    fn the_first_verdict_stands() {
        let reaped = status(1, State::Failed, Writer::Launcher, "i-1");
        let reason = kept(settle(
            Some(reaped),
            status(1, State::Cancelled, Writer::Launcher, "i-1"),
        ));
        assert!(reason.contains("already has a verdict"), "{reason}");
    }

    #[test]
    fn the_same_account_written_again_changes_nothing() {
        // The worker's write landed, its answer was lost, and the retry finds its own document.
        let mut stopped = status(1, State::Interrupted, Writer::Worker, "i-1");
        stopped.error = Some("SIGTERM".into());
        let merged = written(settle(
            Some(status(1, State::Cancelled, Writer::Launcher, "i-1")),
            stopped.clone(),
        ));
        let reason = kept(settle(Some(merged.clone()), stopped));
        assert!(reason.contains("already on record"), "{reason}");
        assert_eq!(merged.state, State::Cancelled, "the verdict is not undone");
    }

    #[test]
    fn an_interrupted_verdict_gives_way_to_a_later_one_without_losing_the_workers_account() {
        let pending = |why: &str| {
            let mut verdict = status(1, State::Interrupted, Writer::Launcher, "i-1");
            verdict.error = Some(why.into());
            verdict
        };
        let mut stopped = status(1, State::Interrupted, Writer::Worker, "i-1");
        stopped.error = Some("spot interruption notice".into());
        stopped.outputs = vec!["out".into()];
        let merged = written(settle(
            Some(pending("attempt 2 not launched yet: no capacity")),
            stopped,
        ));
        assert_eq!(
            merged.error.as_deref(),
            Some("attempt 2 not launched yet: no capacity; spot interruption notice")
        );
        let relaunched = written(settle(
            Some(merged),
            pending("attempt 2 re-launched on i-2"),
        ));
        assert_eq!(relaunched.state, State::Interrupted);
        assert_eq!(
            relaunched.error.as_deref(),
            Some("attempt 2 re-launched on i-2; spot interruption notice"),
            "the new verdict in front of the worker's own account, once"
        );
        assert_eq!(relaunched.outputs, ["out"]);
        let mut given_up = status(1, State::Failed, Writer::Launcher, "i-1");
        given_up.error = Some("gave up".into());
        let failed = written(settle(Some(relaunched), given_up.clone()));
        assert_eq!(failed.state, State::Failed);
        assert_eq!(
            failed.error.as_deref(),
            Some("gave up; spot interruption notice")
        );
        // A final verdict stands.
        kept(settle(
            Some(failed),
            pending("attempt 2 re-launched on i-3"),
        ));
        // The same between verdicts alone.
        let replaced = written(settle(Some(pending("not yet")), given_up.clone()));
        assert_eq!(replaced.state, State::Failed);
        kept(settle(Some(replaced), pending("later")));
    }

    #[test]
    fn an_attempt_is_taken_back_while_the_notice_or_an_interrupted_verdict_says_so() {
        let mut noticed = status(1, State::Interrupted, Writer::Worker, "i-1");
        noticed.spot_interruption = true;
        assert!(noticed.taken_back());
        // A worker stopped by a signal alone: not EC2's doing.
        assert!(!status(1, State::Interrupted, Writer::Worker, "i-1").taken_back());
        // The launcher writes `interrupted` only for a spot interruption.
        let warned = status(1, State::Interrupted, Writer::Launcher, "i-1");
        assert!(warned.taken_back());
        let stopped = written(settle(
            Some(warned),
            status(1, State::Interrupted, Writer::Worker, "i-1"),
        ));
        assert!(stopped.taken_back(), "the verdict stays beside the account");
        // A final verdict over the notice ends it: no next attempt is due.
        let failed = written(settle(
            Some(noticed),
            status(1, State::Failed, Writer::Launcher, "i-1"),
        ));
        assert_eq!(failed.state, State::Failed);
        assert!(
            !failed.spot_interruption && !failed.taken_back(),
            "{failed:?}"
        );
    }

    #[test]
    fn a_verdict_names_the_job_and_its_instance() {
        let instance = Instance {
            id: Some("i-9".into()),
            instance_type: Some("m7i.large".into()),
            lifecycle: Some("spot".into()),
        };
        let verdict = Status::verdict(&job(), instance.clone(), State::Failed, "gone".into());
        assert_eq!(verdict.written_by, Writer::Launcher);
        assert!(verdict.belongs_to(&job().job_id));
        assert_eq!(verdict.instance, Some(instance));
        assert_eq!(verdict.error.as_deref(), Some("gone"));
        assert!(!verdict.finished_at.is_empty());
        assert_eq!(verdict.outcome_of(1), Some(State::Failed));
        assert_eq!(verdict.outcome_of(2), None);
    }
}
