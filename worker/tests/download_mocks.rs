//! Ranged downloads against scripted S3 answers: the ranges' bytes land where they belong, and a
//! server that sends more or less than a range asked for fails the download.

use aws_sdk_s3::Client;
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use s3spot_bootstrap::{JobSpec, WorkerArtifact};
use s3spot_worker::download::{DownloadError, download};
use s3spot_worker::settings::DownloadSettings;
use sha2::{Digest as _, Sha256};

const SETTINGS: DownloadSettings = DownloadSettings {
    ranged_above: 16,
    chunk_size: 10,
    concurrency: 3,
};

fn object() -> Vec<u8> {
    (0..45u8).map(|i| i.wrapping_mul(37)).collect()
}

fn job() -> JobSpec {
    JobSpec {
        bucket: "data".into(),
        key: "in/a.bin".into(),
        version_id: None,
        etag: Some("abc".into()),
        size: Some(45),
        sequencer: None,
        job_id: "0".repeat(32),
        uploaded_at: None,
        results_bucket: "data".into(),
        results_prefix: "analysis/".into(),
        command: None,
        max_runtime_secs: 60,
        worker: WorkerArtifact {
            uri: "s3://artifacts/worker".into(),
            sha256: "0".repeat(64),
        },
        attempt: 1,
        pipeline: None,
        events_off: false,
    }
}

fn head() -> Rule {
    head_of_version(None)
}

/// HEAD of the object in a bucket whose versioning is `version`: `None` for a bucket that was
/// never versioned, `"null"` for one with versioning suspended.
fn head_of_version(version: Option<&'static str>) -> Rule {
    mock!(Client::head_object).then_output(move || {
        HeadObjectOutput::builder()
            .content_length(45)
            .e_tag("\"abc\"")
            .set_version_id(version.map(Into::into))
            .build()
    })
}

/// Answers `bytes=start-last` with `body`, only when asked for that range of that ETag (and of
/// no version: an unversioned object is pinned by its ETag alone).
fn range(start: usize, last: usize, body: Vec<u8>) -> Rule {
    let header = format!("bytes={start}-{last}");
    mock!(Client::get_object)
        .match_requests(move |r| {
            r.range() == Some(header.as_str())
                && r.if_match() == Some("abc")
                && r.version_id().is_none()
        })
        .then_output(move || {
            GetObjectOutput::builder()
                .body(ByteStream::from(body.clone()))
                .build()
        })
}

fn ranges(bodies: [Vec<u8>; 5]) -> Vec<Rule> {
    let mut rules = vec![head()];
    for (i, body) in bodies.into_iter().enumerate() {
        rules.push(range(i * 10, (i * 10 + 9).min(44), body));
    }
    rules
}

fn exact_ranges() -> [Vec<u8>; 5] {
    let object = object();
    std::array::from_fn(|i| object[i * 10..(i * 10 + 10).min(45)].to_vec())
}

async fn run(
    rules: &[Rule],
) -> (
    Result<s3spot_worker::download::Downloaded, DownloadError>,
    tempfile::TempDir,
) {
    let rules: Vec<&Rule> = rules.iter().collect();
    let client = mock_client!(aws_sdk_s3, RuleMode::MatchAny, &rules);
    let dir = tempfile::tempdir().unwrap();
    let result = download(&client, &job(), &dir.path().join("object"), &SETTINGS).await;
    (result, dir)
}

#[tokio::test]
async fn every_range_lands_at_its_offset_and_the_hash_covers_them_in_order() {
    let (result, dir) = run(&ranges(exact_ranges())).await;
    let downloaded = result.unwrap();
    assert_eq!(std::fs::read(dir.path().join("object")).unwrap(), object());
    assert_eq!(downloaded.size, 45);
    assert_eq!(downloaded.sha256, hex::encode(Sha256::digest(object())));
    assert_eq!(downloaded.etag.as_deref(), Some("abc"));
}

#[tokio::test]
async fn with_versioning_suspended_every_range_is_pinned_by_the_etag() {
    // S3 reports the version "null" then: it names no upload, and a PUT replaces it between two
    // ranges. Only If-Match keeps a download from mixing two uploads' bytes.
    let mut rules = ranges(exact_ranges());
    rules[0] = head_of_version(Some("null"));
    let (result, dir) = run(&rules).await;
    let downloaded = result.unwrap();
    assert_eq!(std::fs::read(dir.path().join("object")).unwrap(), object());
    assert_eq!(downloaded.version_id, None, "\"null\" is no version");
}

#[tokio::test]
async fn a_versioned_object_is_read_at_its_version() {
    let object = object();
    let mut rules = vec![head_of_version(Some("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"))];
    for i in 0..5 {
        let header = format!("bytes={}-{}", i * 10, (i * 10 + 9).min(44));
        let body = object[i * 10..(i * 10 + 10).min(45)].to_vec();
        rules.push(
            mock!(Client::get_object)
                .match_requests(move |r| {
                    r.range() == Some(header.as_str())
                        && r.version_id() == Some("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")
                })
                .then_output(move || {
                    GetObjectOutput::builder()
                        .body(ByteStream::from(body.clone()))
                        .build()
                }),
        );
    }
    let (result, _dir) = run(&rules).await;
    assert_eq!(
        result.unwrap().version_id.as_deref(),
        Some("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY")
    );
}

#[tokio::test]
async fn a_range_longer_than_asked_for_is_refused() {
    let mut bodies = exact_ranges();
    bodies[1].push(0);
    let (result, _dir) = run(&ranges(bodies)).await;
    let error = result.unwrap_err();
    assert!(
        error.to_string().contains("more than bytes 10-19"),
        "{error}"
    );
}

#[tokio::test]
async fn a_range_shorter_than_asked_for_is_a_short_download() {
    let mut bodies = exact_ranges();
    bodies[2].pop();
    let (result, _dir) = run(&ranges(bodies)).await;
    match result {
        Err(DownloadError::Short { got, expected: 45 }) => assert!(got < 45, "{got}"),
        other => panic!("expected a short download, got {other:?}"),
    }
}
