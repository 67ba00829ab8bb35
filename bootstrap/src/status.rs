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
        assert_eq!(serde_json::from_value::<Status>(json).unwrap(), status);
    }
}
