//! The job contract: everything an instance needs to process one object.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Where results go when nothing else is configured. The default skip rule (`analysis`) matches
/// it, so results never re-trigger the pipeline; the results-prefix skip rule covers any other
/// prefix an operator picks.
pub const DEFAULT_RESULTS_PREFIX: &str = "analysis/";

/// S3 keys hold at most 1,024 bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Bytes kept free under a job's results prefix for the names of its result files.
const RESULT_NAME_ROOM: usize = 256;

/// Where a key's results go: `<results prefix><key>/`, unless that would leave less than 256
/// bytes of S3's 1,024 for the result names. A key that long is cut (at a character boundary)
/// and followed by `~` and 16 hex digits of its sha256, so distinct keys keep distinct prefixes;
/// status.json still holds the exact key.
pub fn results_key_prefix(results_prefix: &str, key: &str) -> String {
    let budget = MAX_KEY_BYTES - RESULT_NAME_ROOM;
    let full = format!("{results_prefix}{key}/");
    if full.len() <= budget {
        return full;
    }
    let digest = hex::encode(&Sha256::digest(key.as_bytes())[..8]);
    let mut end = budget
        .saturating_sub(results_prefix.len() + "~".len() + digest.len() + "/".len())
        .min(key.len());
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{results_prefix}{}~{digest}/", &key[..end])
}

/// One job: an S3 object to process, and how.
///
/// It travels to the instance as base64 of its JSON inside the user-data, so no part of it is ever
/// read by a shell. Optional fields are left out of the JSON when absent: user-data is capped at
/// 16 KiB, and the key alone may take 1 KiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Input bucket.
    pub bucket: String,
    /// Input key, already decoded (exactly as stored in S3).
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequencer: Option<String>,
    pub results_bucket: String,
    #[serde(default = "default_results_prefix")]
    pub results_prefix: String,
    /// Operator-configured processing command; `None` runs the worker's built-in analysis.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub max_runtime_secs: u64,
    pub worker: WorkerArtifact,
    /// 1 for the first launch of a job; re-launches count up.
    pub attempt: u32,
}

/// The worker binary the instance downloads and verifies before running it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerArtifact {
    /// `s3://bucket/key`.
    pub uri: String,
    /// Lowercase hex sha256 of the binary.
    pub sha256: String,
}

fn default_results_prefix() -> String {
    DEFAULT_RESULTS_PREFIX.to_owned()
}

#[derive(Debug, thiserror::Error)]
pub enum JobDecodeError {
    #[error("job is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("job is not a valid JobSpec JSON document: {0}")]
    Json(#[from] serde_json::Error),
    #[error("user-data has no S3SPOT_JOB line; it was not rendered by s3spot")]
    NotInUserData,
}

impl JobSpec {
    /// Base64 (standard alphabet, padded) of the JSON document.
    pub fn encode(&self) -> String {
        BASE64.encode(self.to_json())
    }

    /// The inverse of [`JobSpec::encode`]; what the worker does with `--job`.
    pub fn decode(encoded: &str) -> Result<Self, JobDecodeError> {
        let json = BASE64.decode(encoded.trim())?;
        Ok(serde_json::from_slice(&json)?)
    }

    /// Compact JSON. Serialising a struct of strings and numbers cannot fail.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("JobSpec serialises to JSON")
    }

    /// The key prefix every result of this job is written under; see [`results_key_prefix`].
    pub fn results_key_prefix(&self) -> String {
        results_key_prefix(&self.results_prefix, &self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> JobSpec {
        JobSpec {
            bucket: "data".into(),
            key: "in/report 2024.csv".into(),
            version_id: Some("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY".into()),
            etag: Some("0123456789abcdef0123456789abcdef".into()),
            size: Some(1024),
            sequencer: None,
            results_bucket: "data".into(),
            results_prefix: DEFAULT_RESULTS_PREFIX.into(),
            command: None,
            max_runtime_secs: 3600,
            worker: WorkerArtifact {
                uri: "s3://artifacts/s3spot-worker".into(),
                sha256: "ab".repeat(32),
            },
            attempt: 1,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let job = sample();
        assert_eq!(JobSpec::decode(&job.encode()).unwrap(), job);
    }

    #[test]
    fn absent_optionals_are_left_out_of_the_json() {
        let mut job = sample();
        job.version_id = None;
        job.etag = None;
        job.size = None;
        let json = String::from_utf8(job.to_json()).unwrap();
        for field in ["version_id", "etag", "size", "sequencer", "command"] {
            assert!(!json.contains(field), "{field} in {json}");
        }
        assert_eq!(JobSpec::decode(&job.encode()).unwrap(), job);
    }

    #[test]
    fn missing_results_prefix_defaults_to_analysis() {
        let json = r#"{"bucket":"b","key":"k","results_bucket":"b","max_runtime_secs":5,
            "worker":{"uri":"s3://a/w","sha256":"00"},"attempt":1}"#;
        let job: JobSpec = serde_json::from_str(json).unwrap();
        assert_eq!(job.results_prefix, "analysis/");
    }

    #[test]
    fn decode_errors_say_what_is_wrong() {
        let err = JobSpec::decode("not base64!").unwrap_err();
        assert!(err.to_string().contains("not valid base64"), "{err}");
        let err = JobSpec::decode(&BASE64.encode(b"{}")).unwrap_err();
        assert!(err.to_string().contains("not a valid JobSpec"), "{err}");
    }

    #[test]
    fn results_go_under_the_prefix_and_the_key() {
        assert_eq!(
            sample().results_key_prefix(),
            "analysis/in/report 2024.csv/"
        );
    }

    #[test]
    fn keys_too_long_for_their_results_get_a_short_distinct_prefix() {
        let long = format!("in/{}", "é".repeat(500)); // 1,003 bytes
        let other = format!("{long}x");
        let prefix = results_key_prefix("analysis/", &long);
        assert!(prefix.len() <= MAX_KEY_BYTES - 256, "{}", prefix.len());
        assert!(prefix.starts_with("analysis/in/éé"));
        assert!(prefix.ends_with('/'));
        assert_eq!(
            prefix,
            results_key_prefix("analysis/", &long),
            "deterministic"
        );
        assert_ne!(prefix, results_key_prefix("analysis/", &other));
        // Just under the budget: kept whole.
        let fits = "k".repeat(768 - "analysis/".len() - 1);
        assert_eq!(
            results_key_prefix("analysis/", &fits),
            format!("analysis/{fits}/")
        );
    }
}
