//! What the local pipeline reports as jobs go: one line per stage.

use std::fmt::Write as _;
use std::time::Duration;

use s3spot_bootstrap::State;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Progress {
    /// A notification arrived.
    Event {
        bucket: String,
        key: String,
        event: String,
    },
    Skipped {
        bucket: String,
        key: String,
        reason: String,
    },
    /// At the instance cap: the event is retried until there is room.
    Waiting {
        bucket: String,
        key: String,
        reason: String,
    },
    Failed {
        bucket: String,
        key: String,
        error: String,
    },
    /// `ms` since the event arrived.
    Launched {
        bucket: String,
        key: String,
        instance_id: String,
        ms: u64,
    },
    Download {
        instance_id: String,
        key: String,
        ms: u64,
    },
    Process {
        instance_id: String,
        key: String,
        ms: u64,
        exit_code: Option<i32>,
    },
    Upload {
        instance_id: String,
        key: String,
        ms: u64,
    },
    /// A job state-change event, as `events.jsonl` has it.
    Job {
        state: String,
        bucket: String,
        key: String,
        attempt: u32,
        instance_id: Option<String>,
        error: Option<String>,
        cost_usd: Option<s3spot_bootstrap::Usd>,
    },
    /// The instance ended, `ms` after its launch. `state` is from its status.json.
    Shutdown {
        instance_id: String,
        key: String,
        ms: u64,
        state: Option<State>,
        shut_down: bool,
    },
}

impl Progress {
    /// The object the line is about.
    pub fn key(&self) -> &str {
        match self {
            Progress::Event { key, .. }
            | Progress::Skipped { key, .. }
            | Progress::Waiting { key, .. }
            | Progress::Failed { key, .. }
            | Progress::Launched { key, .. }
            | Progress::Download { key, .. }
            | Progress::Process { key, .. }
            | Progress::Upload { key, .. }
            | Progress::Job { key, .. }
            | Progress::Shutdown { key, .. } => key,
        }
    }

    /// One line for a terminal. Keys are quoted and escaped: whoever uploads chooses them, and a
    /// key must not be able to move the cursor or forge a line.
    pub fn human(&self) -> String {
        let mut line = String::new();
        let _ = match self {
            Progress::Event { bucket, key, event } => {
                write!(line, "event     s3://{bucket}/{key:?} {event}")
            }
            Progress::Skipped {
                bucket,
                key,
                reason,
            } => write!(line, "skipped   s3://{bucket}/{key:?}: {reason}"),
            Progress::Waiting {
                bucket,
                key,
                reason,
            } => write!(line, "waiting   s3://{bucket}/{key:?}: {reason}"),
            Progress::Failed { bucket, key, error } => {
                write!(line, "failed    s3://{bucket}/{key:?}: {error}")
            }
            Progress::Launched {
                bucket,
                key,
                instance_id,
                ms,
            } => write!(
                line,
                "launched  {instance_id} for s3://{bucket}/{key:?} ({} after the event)",
                duration(*ms)
            ),
            Progress::Download {
                instance_id, ms, ..
            } => write!(line, "download  {instance_id} {}", duration(*ms)),
            Progress::Process {
                instance_id,
                ms,
                exit_code,
                ..
            } => match exit_code {
                Some(code) => write!(
                    line,
                    "process   {instance_id} {} (exit status {code})",
                    duration(*ms)
                ),
                None => write!(line, "process   {instance_id} {}", duration(*ms)),
            },
            Progress::Upload {
                instance_id, ms, ..
            } => write!(line, "upload    {instance_id} {}", duration(*ms)),
            Progress::Job {
                state,
                bucket,
                key,
                attempt,
                instance_id,
                error,
                cost_usd,
            } => {
                // The file is appended to by the instances too: nothing read from it may move
                // the cursor.
                let _ = write!(
                    line,
                    "job       {} s3://{}/{key:?} attempt {attempt}",
                    escaped(state),
                    escaped(bucket)
                );
                if let Some(id) = instance_id {
                    let _ = write!(line, " on {}", escaped(id));
                }
                if let Some(usd) = cost_usd {
                    let _ = write!(line, ", {usd}");
                }
                match error {
                    // An error is the worker's or the command's words: shown escaped, like a key.
                    Some(error) => write!(line, ": {error:?}"),
                    None => Ok(()),
                }
            }
            Progress::Shutdown {
                instance_id,
                ms,
                state,
                shut_down,
                ..
            } => {
                let state = match state {
                    Some(state) => serde_json::to_value(state)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    None => "no status.json".to_owned(),
                };
                let how = if *shut_down {
                    "shut down"
                } else {
                    "ended without shutting down"
                };
                write!(
                    line,
                    "shutdown  {instance_id} {how}: {state}, {} after launch",
                    duration(*ms)
                )
            }
        };
        line
    }

    /// One JSON object, for `--json`.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("progress serialises")
    }
}

/// `text` as it is, or quoted and escaped if it holds a control character.
fn escaped(text: &str) -> String {
    if text.chars().any(char::is_control) {
        format!("{text:?}")
    } else {
        text.to_owned()
    }
}

fn duration(ms: u64) -> String {
    let duration = Duration::from_millis(ms);
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.2} s", duration.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_quote_keys_and_show_durations() {
        let launched = Progress::Launched {
            bucket: "data".into(),
            key: "in/a\nb\u{1b}[2J.csv".into(),
            instance_id: "i-local-000001".into(),
            ms: 7,
        };
        let line = launched.human();
        assert_eq!(
            line,
            "launched  i-local-000001 for s3://data/\"in/a\\nb\\u{1b}[2J.csv\" (7 ms after the event)"
        );
        assert!(!line.contains('\n') && !line.contains('\u{1b}'));
        let shutdown = Progress::Shutdown {
            instance_id: "i-local-000001".into(),
            key: "k".into(),
            ms: 1234,
            state: Some(State::TimedOut),
            shut_down: true,
        };
        assert_eq!(
            shutdown.human(),
            "shutdown  i-local-000001 shut down: timed_out, 1.23 s after launch"
        );
        let job = Progress::Job {
            state: "failed".into(),
            bucket: "da\rta".into(),
            key: "in/\u{1b}x".into(),
            attempt: 2,
            instance_id: Some("i-local-000002".into()),
            error: Some("exit status 3\nforged line".into()),
            cost_usd: Some(s3spot_bootstrap::Usd(0.0)),
        };
        assert_eq!(
            job.human(),
            "job       failed s3://\"da\\rta\"/\"in/\\u{1b}x\" attempt 2 on i-local-000002, $0.0000: \
             \"exit status 3\\nforged line\""
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&shutdown.json()).unwrap(),
            serde_json::json!({"stage": "shutdown", "instance_id": "i-local-000001", "key": "k",
                "ms": 1234, "state": "timed_out", "shut_down": true})
        );
    }
}
