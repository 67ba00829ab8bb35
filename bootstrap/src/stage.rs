//! The worker's stage events: one line each on its log stream as it finishes a stage, for
//! whatever follows the instance's console (the local pipeline's progress lines).

use serde::{Deserialize, Serialize};

/// What marks a stage line, so that it cannot be mistaken for any other log line.
const MARKER: &str = "s3spot-stage ";

/// A stage of a job, as it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// The object is on disk: `size` bytes.
    Download { ms: u64, size: u64 },
    /// The command (or the built-in analysis) ended; `exit_code` is the command's.
    Process { ms: u64, exit_code: Option<i32> },
    /// The outputs are uploaded (status.json follows).
    Upload { ms: u64, outputs: usize },
}

impl Stage {
    /// The stage as one log line.
    pub fn to_line(&self) -> String {
        format!(
            "{MARKER}{}",
            serde_json::to_string(self).expect("a stage serialises")
        )
    }

    /// The stage a log line reports, if it is a stage line.
    pub fn from_line(line: &str) -> Option<Stage> {
        serde_json::from_str(line.trim_end().strip_prefix(MARKER)?).ok()
    }

    pub fn ms(&self) -> u64 {
        match self {
            Stage::Download { ms, .. } | Stage::Process { ms, .. } | Stage::Upload { ms, .. } => {
                *ms
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_round_trip_through_their_lines_and_nothing_else_is_one() {
        for stage in [
            Stage::Download { ms: 3, size: 465 },
            Stage::Process {
                ms: 1,
                exit_code: Some(2),
            },
            Stage::Process {
                ms: 1,
                exit_code: None,
            },
            Stage::Upload { ms: 2, outputs: 3 },
        ] {
            let line = stage.to_line();
            assert!(!line.contains('\n'));
            assert_eq!(Stage::from_line(&line), Some(stage));
            assert_eq!(Stage::from_line(&format!("{line}\r\n")), Some(stage));
        }
        assert_eq!(
            Stage::Download { ms: 3, size: 1 }.to_line(),
            r#"s3spot-stage {"stage":"download","ms":3,"size":1}"#
        );
        for other in [
            "",
            "2026-11-30T10:00:00Z s3spot-bootstrap: running the worker",
            r#"{"fields":{"stage":"download","ms":3}}"#,
            r#"s3spot-stage {"stage":"teleport","ms":3}"#,
            "s3spot-stage not json",
            r#"x s3spot-stage {"stage":"download","ms":3,"size":1}"#,
        ] {
            assert_eq!(Stage::from_line(other), None, "{other}");
        }
    }
}
