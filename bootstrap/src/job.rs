//! The job contract: everything an instance needs to process one upload of one object, and where
//! that job's results live.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::status::STATUS_FILE;

/// Where results go when nothing else is configured. The default skip rule (`analysis`) matches
/// it, so results never re-trigger the pipeline; the results-prefix skip rule covers any other
/// prefix an operator picks.
pub const DEFAULT_RESULTS_PREFIX: &str = "analysis/";

/// S3 keys hold at most 1,024 bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Bytes kept free under a job's results prefix for the names of its result files.
const RESULT_NAME_ROOM: usize = 256;

/// The longest upload folder: `YYYYMMDDTHHMMSS.mmmZ-` and 16 hex digits, then `/`.
const UPLOAD_FOLDER_BYTES: usize = "20261130T101937.123Z-".len() + 16 + 1;

/// Hex digits of the job id in its upload folder: unique among one key's uploads.
const FOLDER_ID_DIGITS: usize = 16;

/// Where all uploads of a key keep their results: `<results prefix><key>/`. A key too long to
/// leave room for an upload folder and result names under S3's 1,024 bytes is cut (at a
/// character boundary) and followed by `~` and 16 hex digits of its sha256, so distinct keys
/// keep distinct folders; status.json still holds the exact key.
pub fn key_results_prefix(results_prefix: &str, key: &str) -> String {
    let budget = MAX_KEY_BYTES - RESULT_NAME_ROOM - UPLOAD_FOLDER_BYTES;
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

/// The folder of one upload under its key's results: the upload's time, so that a key's uploads
/// list oldest first, then the start of its job id, so that two uploads never share one.
/// `uploaded_at` is RFC 3339 (`2026-11-30T10:19:37.123Z`); without a readable one the folder
/// starts with `undated`.
pub fn upload_folder(uploaded_at: Option<&str>, job_id: &str) -> String {
    let id: String = job_id.chars().take(FOLDER_ID_DIGITS).collect();
    let stamp = uploaded_at
        .and_then(compact_utc)
        .unwrap_or_else(|| "undated".to_owned());
    format!("{stamp}-{id}")
}

/// The folder, in its job's, of the outputs of an attempt stopped from outside.
pub fn stopped_folder(attempt: u32) -> String {
    format!("attempt-{attempt}-stopped/")
}

/// Whether `name` is an upload folder as [`upload_folder`] names them, and where it sorts
/// among a key's uploads: undated ones (jobs run by hand) first, then by upload time. `None`
/// for anything else under a key's results, such as the results of a longer key
/// (`in/f.csv/x`'s are under `in/f.csv/`).
pub fn upload_order(name: &str) -> Option<(bool, &str)> {
    let (stamp, id) = name.rsplit_once('-')?;
    let hex = id.len() == FOLDER_ID_DIGITS && id.bytes().all(|b| b.is_ascii_hexdigit());
    let dated = stamp.len() == "20261130T101937.123Z".len() && compact_utc_shape(stamp);
    match (hex, stamp) {
        (true, "undated") => Some((false, name)),
        (true, _) if dated => Some((true, name)),
        _ => None,
    }
}

/// `20261130T101937.123Z`, as [`compact_utc`] writes it.
fn compact_utc_shape(stamp: &str) -> bool {
    stamp.bytes().enumerate().all(|(i, b)| match i {
        8 => b == b'T',
        15 => b == b'.',
        19 => b == b'Z',
        _ => b.is_ascii_digit(),
    })
}

/// `2026-11-30T10:19:37.1234Z` as `20261130T101937.123Z`: ISO 8601's basic form, always with
/// milliseconds, so that names sort as the times do. Only UTC times (`Z` or `+00:00`), as S3
/// and EventBridge write them.
fn compact_utc(time: &str) -> Option<String> {
    let rest = ["Z", "z", "+00:00"]
        .iter()
        .find_map(|utc| time.strip_suffix(utc))?;
    let (date, clock) = rest.split_once(['T', 't'])?;
    let (clock, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let digits = |part: &str, groups: &[usize], separator: char| {
        let pieces: Vec<&str> = part.split(separator).collect();
        (pieces.len() == groups.len()
            && pieces
                .iter()
                .zip(groups)
                .all(|(p, n)| p.len() == *n && p.bytes().all(|b| b.is_ascii_digit())))
        .then(|| pieces.concat())
    };
    let date = digits(date, &[4, 2, 2], '-')?;
    let clock = digits(clock, &[2, 2, 2], ':')?;
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let millis: String = fraction.chars().chain("000".chars()).take(3).collect();
    Some(format!("{date}T{clock}.{millis}Z"))
}

/// What tells one upload of a key apart from another, best first: a version id is unique per
/// upload, a sequencer per event, an ETag per content. The event's time is a last resort for
/// hand-written events that carry none of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadIdentity<'a> {
    pub version_id: Option<&'a str>,
    pub sequencer: Option<&'a str>,
    pub etag: Option<&'a str>,
    pub event_time: Option<&'a str>,
}

/// 32 hex digits naming one upload of one object in one pipeline: the job. The same upload always
/// gets the same id, however often its event is delivered.
pub fn job_id(pipeline: &str, bucket: &str, key: &str, upload: UploadIdentity<'_>) -> String {
    let (kind, value) = [
        ("version", upload.version_id),
        ("sequencer", upload.sequencer),
        ("etag", upload.etag),
        ("event-time", upload.event_time),
    ]
    .into_iter()
    .find_map(|(kind, value)| value.map(|value| (kind, value)))
    .unwrap_or(("none", ""));
    // JSON keeps the parts apart whatever they contain.
    let parts = serde_json::json!(["s3spot-job-v1", pipeline, bucket, key, kind, value]);
    let mut id = hex::encode(Sha256::digest(parts.to_string()));
    id.truncate(32);
    id
}

/// One job: an upload of an S3 object to process, and how.
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
    /// Which upload of the object this is; see [`job_id`].
    pub job_id: String,
    /// When the object was uploaded, as its event says (RFC 3339): it names the job's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploaded_at: Option<String>,
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
    /// The pipeline that launched it, for its events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// The launcher's events are off (`S3SPOT_EVENTS=off`): so are the worker's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub events_off: bool,
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
    #[error("user-data is not base64 of a script")]
    NotAScript,
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

    /// This upload's folder under its key's results; see [`upload_folder`].
    pub fn upload(&self) -> String {
        upload_folder(self.uploaded_at.as_deref(), &self.job_id)
    }

    /// The key prefix every result of this job is written under:
    /// `<results prefix><key>/<upload>/`. Two uploads of one key never share it.
    pub fn results_key_prefix(&self) -> String {
        format!(
            "{}{}/",
            key_results_prefix(&self.results_prefix, &self.key),
            self.upload()
        )
    }

    /// Where the job's `status.json` lives, in `results_bucket`.
    pub fn status_key(&self) -> String {
        format!("{}{STATUS_FILE}", self.results_key_prefix())
    }

    /// Where this attempt's outputs go when it was stopped from outside (a spot interruption,
    /// a cancel, a shutdown): apart from the job's folder, which is the attempt's that runs to
    /// its own end. The next attempt may be writing there already.
    pub fn stopped_outputs_prefix(&self) -> String {
        format!(
            "{}{}",
            self.results_key_prefix(),
            stopped_folder(self.attempt)
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> JobSpec {
        JobSpec {
            bucket: "data".into(),
            key: "in/report 2024.csv".into(),
            version_id: Some("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY".into()),
            etag: Some("0123456789abcdef0123456789abcdef".into()),
            size: Some(1024),
            sequencer: None,
            job_id: "6f1c2a3b4c5d6e7f8091a2b3c4d5e6f7".into(),
            uploaded_at: Some("2026-11-30T10:19:37.123Z".into()),
            results_bucket: "data".into(),
            results_prefix: DEFAULT_RESULTS_PREFIX.into(),
            command: None,
            max_runtime_secs: 3600,
            worker: WorkerArtifact {
                uri: "s3://artifacts/s3spot-worker".into(),
                sha256: "ab".repeat(32),
            },
            attempt: 1,
            pipeline: None,
            events_off: false,
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
        job.uploaded_at = None;
        let json = String::from_utf8(job.to_json()).unwrap();
        for field in [
            "version_id",
            "etag",
            "size",
            "sequencer",
            "command",
            "uploaded_at",
        ] {
            assert!(!json.contains(field), "{field} in {json}");
        }
        assert_eq!(JobSpec::decode(&job.encode()).unwrap(), job);
    }

    #[test]
    fn missing_results_prefix_defaults_to_analysis() {
        let json = r#"{"bucket":"b","key":"k","job_id":"00","results_bucket":"b",
            "max_runtime_secs":5,"worker":{"uri":"s3://a/w","sha256":"00"},"attempt":1}"#;
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
    fn each_upload_has_its_own_folder_under_the_key() {
        let job = sample();
        assert_eq!(
            job.results_key_prefix(),
            "analysis/in/report 2024.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/"
        );
        assert_eq!(
            job.status_key(),
            "analysis/in/report 2024.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/status.json"
        );
        assert_eq!(
            job.stopped_outputs_prefix(),
            "analysis/in/report 2024.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/attempt-1-stopped/"
        );
        let mut other = sample();
        other.job_id = "0".repeat(32);
        assert_ne!(other.results_key_prefix(), job.results_key_prefix());
        assert!(
            other
                .results_key_prefix()
                .starts_with(&key_results_prefix("analysis/", &job.key)),
            "every upload of a key lives under the key's folder"
        );
    }

    #[test]
    fn upload_folders_sort_as_their_upload_times() {
        let times = [
            "2026-01-02T03:04:05Z",
            "2026-01-02T03:04:05.5Z",
            "2026-01-02T03:04:05.123456Z",
            "2026-11-30T10:19:37.999Z",
            "2027-01-01T00:00:00.000Z",
        ];
        let folders: Vec<String> = times.iter().map(|t| upload_folder(Some(t), "ab")).collect();
        assert_eq!(folders[0], "20260102T030405.000Z-ab");
        assert_eq!(folders[1], "20260102T030405.500Z-ab");
        assert_eq!(folders[2], "20260102T030405.123Z-ab");
        assert_eq!(
            upload_folder(Some("2026-01-02T03:04:05+00:00"), "ab"),
            folders[0],
            "EventBridge's form of UTC"
        );
        let mut sorted = folders.clone();
        sorted.sort();
        assert_eq!(sorted, [0, 2, 1, 3, 4].map(|i| folders[i].clone()));
        for unreadable in [
            "",
            "yesterday",
            "2026-01-02 03:04:05Z",
            "2026-01-02T03:04:05+01:00",
        ] {
            assert_eq!(upload_folder(Some(unreadable), "ab"), "undated-ab");
        }
        assert_eq!(
            upload_folder(None, &"c".repeat(32)),
            format!("undated-{}", "c".repeat(16))
        );
    }

    #[test]
    fn upload_folders_are_told_from_other_names_and_undated_ones_sort_first() {
        let dated = upload_folder(Some("2026-11-30T10:19:37.123Z"), &"a".repeat(32));
        let undated = upload_folder(None, &"b".repeat(32));
        assert_eq!(upload_order(&dated), Some((true, dated.as_str())));
        assert_eq!(upload_order(&undated), Some((false, undated.as_str())));
        assert!(upload_order(&undated) < upload_order(&dated));
        for other in [
            "x",
            "report.json",
            "20261130T101937.123Z",
            "undated-xyz",
            "zz-0123456789abcdef",
        ] {
            assert_eq!(upload_order(other), None, "{other}");
        }
    }

    #[test]
    fn keys_too_long_for_their_results_get_a_short_distinct_prefix() {
        let long = format!("in/{}", "é".repeat(500)); // 1,003 bytes
        let other = format!("{long}x");
        let prefix = key_results_prefix("analysis/", &long);
        assert!(
            prefix.len() + UPLOAD_FOLDER_BYTES <= MAX_KEY_BYTES - 256,
            "{}",
            prefix.len()
        );
        assert!(prefix.starts_with("analysis/in/éé"));
        assert!(prefix.ends_with('/'));
        assert_eq!(
            prefix,
            key_results_prefix("analysis/", &long),
            "deterministic"
        );
        assert_ne!(prefix, key_results_prefix("analysis/", &other));
        // Just under the budget: kept whole.
        let fits = "k".repeat(768 - UPLOAD_FOLDER_BYTES - "analysis/".len() - 1);
        assert_eq!(
            key_results_prefix("analysis/", &fits),
            format!("analysis/{fits}/")
        );
        let mut job = sample();
        job.key = long;
        assert!(job.status_key().len() <= MAX_KEY_BYTES - 256 + "status.json".len());
    }

    #[test]
    fn the_same_upload_is_the_same_job_and_others_are_not() {
        let upload = UploadIdentity {
            version_id: Some("v1"),
            sequencer: Some("0A"),
            etag: Some("e1"),
            event_time: Some("2024-05-01T12:00:00.000Z"),
        };
        let id = job_id("s3spot", "data", "in/a.csv", upload);
        assert_eq!(id.len(), 32);
        assert_eq!(id, job_id("s3spot", "data", "in/a.csv", upload));
        let variants = [
            job_id("other", "data", "in/a.csv", upload),
            job_id("s3spot", "data2", "in/a.csv", upload),
            job_id("s3spot", "data", "in/a.csv2", upload),
            job_id(
                "s3spot",
                "data",
                "in/a.csv",
                UploadIdentity {
                    version_id: Some("v2"),
                    ..upload
                },
            ),
        ];
        for variant in &variants {
            assert_ne!(variant, &id);
        }
        // Parts cannot run into each other.
        assert_ne!(
            job_id("s3spot", "ab", "c", upload),
            job_id("s3spot", "a", "bc", upload)
        );
    }

    #[test]
    fn identity_falls_back_from_version_to_sequencer_to_etag() {
        let mut upload = UploadIdentity {
            version_id: Some("v1"),
            sequencer: Some("0A"),
            etag: Some("e1"),
            event_time: None,
        };
        let id = |u| job_id("s3spot", "data", "k", u);
        let with_version = id(upload);
        upload.sequencer = Some("0B");
        upload.etag = Some("e2");
        assert_eq!(id(upload), with_version, "version id wins");
        upload.version_id = None;
        let with_sequencer = id(upload);
        upload.etag = Some("e3");
        assert_eq!(id(upload), with_sequencer, "then the sequencer");
        upload.sequencer = None;
        let with_etag = id(upload);
        upload.etag = Some("e4");
        assert_ne!(id(upload), with_etag, "then the ETag");
    }
}
