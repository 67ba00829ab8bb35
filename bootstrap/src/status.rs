//! The contract that comes back: `status.json`, written by the worker on every outcome.

use serde::{Deserialize, Serialize};

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
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::TimedOut => "timed_out",
            State::Interrupted => "interrupted",
            State::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: State,
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
}

/// How one earlier attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub attempt: u32,
    pub state: State,
    pub instance_id: Option<String>,
    pub error: Option<String>,
    pub finished_at: String,
}

impl Status {
    /// Takes over the history of `previous`, the status this job had before this attempt, with
    /// `previous` itself as its last entry when it is an earlier attempt.
    pub fn carry_history(&mut self, previous: Status) {
        let mut history: Vec<Attempt> = previous
            .history
            .into_iter()
            .filter(|a| a.attempt < self.attempt)
            .collect();
        if previous.attempt < self.attempt {
            history.push(Attempt {
                attempt: previous.attempt,
                state: previous.state,
                instance_id: previous.instance.and_then(|i| i.id),
                error: previous.error,
                finished_at: previous.finished_at,
            });
        }
        history.extend(std::mem::take(&mut self.history));
        self.history = history;
    }
}

impl Status {
    /// Keeps the launcher's verdict on this attempt. A worker stopped from outside (a shutdown,
    /// SIGTERM) reports itself interrupted, but the launcher knows why: it cancelled the job,
    /// reaped it as stuck, or re-launched it after a spot interruption, and wrote so to
    /// status.json first. That state and account stay; the worker's own note is added to them.
    pub fn keep_verdict(&mut self, current: &Status) {
        if self.state != State::Interrupted
            || current.attempt != self.attempt
            || current.state == State::Succeeded
        {
            return;
        }
        self.state = current.state;
        self.error = match (current.error.clone(), self.error.take()) {
            (Some(verdict), Some(own)) if verdict != own => Some(format!("{verdict}; {own}")),
            (verdict, own) => verdict.or(own),
        };
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_the_documented_ones() {
        let status = Status {
            state: State::TimedOut,
            input: Input {
                bucket: "data".into(),
                key: "in/a.csv".into(),
                ..Input::default()
            },
            outputs: vec!["analysis/in/a.csv/stdout.log".into()],
            exit_code: None,
            error: Some("max runtime of 60s exceeded".into()),
            timings: Timings::default(),
            instance: Some(Instance {
                id: Some("i-0abc".into()),
                instance_type: Some("m7i.large".into()),
                lifecycle: Some("spot".into()),
            }),
            attempt: 1,
            worker_version: "0.1.0".into(),
            started_at: "2024-05-01T12:00:00Z".into(),
            finished_at: "2024-05-01T12:01:00Z".into(),
            history: Vec::new(),
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["state"], "timed_out");
        assert_eq!(json["instance"]["type"], "m7i.large");
        assert_eq!(json["timings"]["download_ms"], 0);
        for field in [
            "input",
            "outputs",
            "exit_code",
            "error",
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
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), status);
    }

    fn status(attempt: u32, state: State, instance: &str) -> Status {
        Status {
            state,
            input: Input::default(),
            outputs: Vec::new(),
            exit_code: None,
            error: Some(format!("attempt {attempt}")),
            timings: Timings::default(),
            instance: Some(Instance {
                id: Some(instance.into()),
                ..Instance::default()
            }),
            attempt,
            worker_version: "0.1.0".into(),
            started_at: String::new(),
            finished_at: format!("t{attempt}"),
            history: Vec::new(),
        }
    }

    #[test]
    fn each_attempt_carries_the_ones_before_it() {
        let mut second = status(2, State::Interrupted, "i-2");
        second.carry_history(status(1, State::Interrupted, "i-1"));
        let mut third = status(3, State::Succeeded, "i-3");
        third.carry_history(second);
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
        assert_eq!(third.history[1].error.as_deref(), Some("attempt 2"));
        assert_eq!(third.history[1].finished_at, "t2");
        let json = serde_json::to_value(&third).unwrap();
        assert_eq!(json["history"][0]["state"], "interrupted");
    }

    #[test]
    fn the_same_attempt_again_adds_nothing() {
        let mut again = status(2, State::Failed, "i-2");
        let mut before = status(2, State::Interrupted, "i-2");
        before.history = vec![Attempt {
            attempt: 1,
            state: State::Interrupted,
            instance_id: Some("i-1".into()),
            error: None,
            finished_at: "t1".into(),
        }];
        again.carry_history(before);
        assert_eq!(again.history.len(), 1);
        assert_eq!(again.history[0].attempt, 1);
    }

    #[test]
    fn a_stopped_worker_keeps_the_launchers_verdict() {
        let mut verdict = status(2, State::Cancelled, "i-2");
        verdict.error = Some("cancelled by s3spot jobs cancel".into());
        let mut stopped = status(2, State::Interrupted, "i-2");
        stopped.error = Some("the worker received SIGTERM".into());
        stopped.keep_verdict(&verdict);
        assert_eq!(stopped.state, State::Cancelled);
        assert_eq!(
            stopped.error.as_deref(),
            Some("cancelled by s3spot jobs cancel; the worker received SIGTERM")
        );

        // Only a stopped worker defers, only to a verdict on its own attempt.
        let mut finished = status(2, State::Succeeded, "i-2");
        finished.keep_verdict(&verdict);
        assert_eq!(finished.state, State::Succeeded);
        let mut later = status(3, State::Interrupted, "i-3");
        later.keep_verdict(&verdict);
        assert_eq!(later.state, State::Interrupted);
    }
}
