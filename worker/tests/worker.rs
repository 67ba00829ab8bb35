//! The worker binary end to end, against s3s-fs: every outcome ends with status.json uploaded
//! and exactly one shutdown.

mod common;

use std::time::{Duration, Instant};

use common::{Fixture, show};
use s3spot_bootstrap::State;
use s3spot_tests::{FakeImds, imds};
use sha2::{Digest as _, Sha256};

const CSV: &[u8] = b"id,name\n1,ada\n2,grace\n";

/// Events that cannot be sent change nothing of the job: here a file that cannot be written,
/// and a job whose launcher turned events off.
#[test]
fn a_job_ends_the_same_whatever_becomes_of_its_events() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job(
        "in/data.csv",
        Some("cat \"$S3SPOT_INPUT\" > \"$S3SPOT_OUTPUT_DIR/copy\""),
    );
    let nowhere = (
        "S3SPOT_EVENTS",
        "file:/nonexistent-dir/events.jsonl".to_owned(),
    );
    let output = fixture.run_job(&job, &[nowhere]);
    assert!(output.status.success(), "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cannot send the job event"),
        "{}",
        show(&output)
    );
    let status = fixture.status("data", &job.results_key_prefix());
    assert_eq!(status.state, State::Succeeded);

    let mut off = fixture.job("in/data.csv", None);
    off.events_off = true;
    off.attempt = 2;
    let output = fixture
        .command(&["run", "--job", &off.encode()], &[])
        .env_remove("S3SPOT_EVENTS")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    // Told off by its job, the worker sends nothing: not to the file (unset), nor to
    // EventBridge (here the S3 server, which would refuse it, and the worker would say so).
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("job event"),
        "{}",
        show(&output)
    );
    assert_eq!(fixture.events(), Vec::<(String, String)>::new());
    assert_eq!(fixture.shutdowns(), 2);
    let status = fixture.status("data", &off.results_key_prefix());
    assert_eq!((status.state, status.attempt), (State::Succeeded, 2));
}

#[test]
fn a_command_runs_on_the_object_and_its_outputs_land_under_the_results_prefix() {
    let fixture = Fixture::new();
    let etag = fixture.put("data", "in/data.csv", CSV);
    let command = r#"mkdir -p "$S3SPOT_OUTPUT_DIR/sub"
wc -l < "$S3SPOT_INPUT" | tr -d ' ' > "$S3SPOT_OUTPUT_DIR/lines.txt"
printf '{"bucket": "%s", "version": "%s"}' "$S3SPOT_BUCKET" "$S3SPOT_VERSION_ID" > "$S3SPOT_OUTPUT_DIR/sub/result.json"
echo to-stdout
echo to-stderr >&2"#;
    let mut job = fixture.job("in/data.csv", Some(command));
    job.etag = Some(etag.clone());
    job.size = Some(CSV.len() as u64);
    job.attempt = 2;
    let output = fixture.run_job(&job, &[]);
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(fixture.shutdowns(), 1, "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("to-stdout"),
        "echoed"
    );
    assert_eq!(
        fixture.events(),
        [
            ("running".to_owned(), "launched".to_owned()),
            ("succeeded".to_owned(), "running".to_owned())
        ]
    );

    let prefix = "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
    assert_eq!(
        fixture.keys("data", prefix),
        [
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/lines.txt",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/status.json",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/stderr.log",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/stdout.log",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/sub/result.json",
        ]
    );
    assert_eq!(fixture.text("data", &format!("{prefix}lines.txt")), "3\n");
    assert_eq!(
        fixture.text("data", &format!("{prefix}stdout.log")),
        "to-stdout\n"
    );
    assert_eq!(
        fixture.text("data", &format!("{prefix}stderr.log")),
        "to-stderr\n"
    );
    let (result, content_type) = fixture
        .get("data", &format!("{prefix}sub/result.json"))
        .unwrap();
    assert_eq!(result, br#"{"bucket": "data", "version": ""}"#);
    assert_eq!(content_type.as_deref(), Some("application/json"));
    let (_, content_type) = fixture.get("data", &format!("{prefix}lines.txt")).unwrap();
    assert_eq!(content_type.as_deref(), Some("text/plain"));

    let status = fixture.status("data", prefix);
    assert_eq!(status.state, State::Succeeded);
    assert_eq!(status.exit_code, Some(0));
    assert_eq!(status.error, None);
    assert_eq!(status.input.bucket, "data");
    assert_eq!(status.input.key, "in/data.csv");
    assert_eq!(status.input.size, Some(CSV.len() as u64));
    assert_eq!(status.input.etag.as_deref(), Some(etag.as_str()));
    assert_eq!(status.input.sha256, Some(hex::encode(Sha256::digest(CSV))));
    assert_eq!(
        status.outputs,
        [
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/lines.txt",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/sub/result.json",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/stdout.log",
            "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/stderr.log",
        ]
    );
    assert_eq!(status.instance, None, "no IMDS off EC2");
    assert_eq!(status.attempt, 2);
    assert_eq!(status.worker_version, env!("CARGO_PKG_VERSION"));
    assert!(status.started_at.ends_with('Z') && status.started_at <= status.finished_at);
    let (_, content_type) = fixture
        .get("data", &format!("{prefix}status.json"))
        .unwrap();
    assert_eq!(content_type.as_deref(), Some("application/json"));
    assert!(
        std::fs::read_dir(fixture.dir.path().join("work"))
            .unwrap()
            .next()
            .is_none(),
        "the work directory is removed"
    );
}

#[test]
fn without_a_command_the_built_in_analysis_writes_report_json() {
    let fixture = Fixture::new();
    fixture.put("data", "in/people.csv", CSV);
    let output = fixture.run_job(&fixture.job("in/people.csv", None), &[]);
    assert!(output.status.success(), "{}", show(&output));
    let prefix = "analysis/in/people.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
    assert_eq!(
        fixture.keys("data", prefix),
        [
            "analysis/in/people.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/report.json",
            "analysis/in/people.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/status.json"
        ]
    );
    let report: serde_json::Value =
        serde_json::from_str(&fixture.text("data", &format!("{prefix}report.json"))).unwrap();
    assert_eq!(report["size"], CSV.len());
    assert_eq!(report["sha256"], hex::encode(Sha256::digest(CSV)));
    assert_eq!(report["lines"], 3);
    assert_eq!(report["utf8"], true);
    assert_eq!(report["content_type"], "text/csv");
    assert_eq!(
        report["table"]["columns"],
        serde_json::json!(["id", "name"])
    );
    assert_eq!(report["table"]["rows"], 2);
    let status = fixture.status("data", prefix);
    assert_eq!(status.state, State::Succeeded);
    assert_eq!(status.exit_code, None, "no command");
    assert_eq!(
        status.outputs,
        ["analysis/in/people.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/report.json"]
    );
    assert_eq!(fixture.shutdowns(), 1);
}

#[test]
fn a_relaunched_attempt_keeps_the_earlier_ones_in_its_history() {
    let fixture = Fixture::new();
    fixture.put("data", "in/people.csv", CSV);
    let prefix = "analysis/in/people.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
    // What the launcher recorded when attempt 1's spot instance was taken back.
    let before = serde_json::json!({
        "state": "interrupted", "job_id": common::JOB_ID, "written_by": "launcher",
        "input": {"bucket": "data", "key": "in/people.csv", "version_id": null, "etag": null,
                  "size": null, "sha256": null},
        "outputs": [], "exit_code": null,
        "error": "spot interruption warning; attempt 2 re-launched on i-2",
        "timings": {"download_ms": 0, "process_ms": 0, "upload_ms": 0},
        "instance": {"id": "i-1", "type": "m7i.large", "lifecycle": "spot"},
        "attempt": 1, "worker_version": "0.1.0", "started_at": "", "finished_at": "t1"
    });
    fixture.put(
        "data",
        &format!("{prefix}status.json"),
        before.to_string().as_bytes(),
    );
    let mut job = fixture.job("in/people.csv", None);
    job.attempt = 2;
    let output = fixture.run_job(&job, &[]);
    assert!(output.status.success(), "{}", show(&output));
    let status = fixture.status("data", prefix);
    assert_eq!((status.state, status.attempt), (State::Succeeded, 2));
    assert_eq!(status.history.len(), 1);
    let earlier = &status.history[0];
    assert_eq!((earlier.attempt, earlier.state), (1, State::Interrupted));
    assert_eq!(earlier.instance_id.as_deref(), Some("i-1"));
    assert!(earlier.error.as_deref().unwrap().contains("attempt 2"));
}

#[test]
fn a_failing_command_fails_the_job_with_its_exit_code_and_logs() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job(
        "in/data.csv",
        Some(r#"echo partial > "$S3SPOT_OUTPUT_DIR/partial.txt"; echo "cannot parse row 2" >&2; exit 3"#),
    );
    let output = fixture.run_job(&job, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let prefix = "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
    let status = fixture.status("data", prefix);
    assert_eq!(status.state, State::Failed);
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(
        status.error.as_deref(),
        Some("the command exited with status 3")
    );
    assert_eq!(
        fixture.text("data", &format!("{prefix}stderr.log")),
        "cannot parse row 2\n"
    );
    assert_eq!(
        fixture.text("data", &format!("{prefix}partial.txt")),
        "partial\n"
    );
    assert_eq!(fixture.shutdowns(), 1);
}

#[test]
fn a_missing_object_fails_the_job_without_processing_anything() {
    let fixture = Fixture::new();
    for command in [Some(r#"touch "$S3SPOT_OUTPUT_DIR/ran""#), None] {
        let output = fixture.run_job(&fixture.job("in/missing.csv", command), &[]);
        assert_eq!(output.status.code(), Some(1), "{}", show(&output));
        let prefix = "analysis/in/missing.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
        assert_eq!(
            fixture.keys("data", prefix),
            ["analysis/in/missing.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/status.json"],
            "no report of nothing"
        );
        let status = fixture.status("data", prefix);
        assert_eq!(status.state, State::Failed);
        assert_eq!(
            status.error.as_deref(),
            Some("object not found: s3://data/in/missing.csv")
        );
        assert_eq!(status.outputs, Vec::<String>::new());
        assert_eq!(status.input.sha256, None);
    }
    assert_eq!(fixture.shutdowns(), 2, "once per run");
}

#[test]
fn an_object_replaced_since_the_event_is_not_processed_as_if_it_were_the_old_one() {
    let fixture = Fixture::new();
    let old = fixture.put("data", "in/data.csv", b"old content\n");
    fixture.put("data", "in/data.csv", CSV);
    let mut job = fixture.job("in/data.csv", Some("true"));
    job.etag = Some(old.clone());
    let output = fixture.run_job(&job, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let status = fixture.status(
        "data",
        "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/",
    );
    let error = status.error.unwrap();
    assert!(
        error.starts_with("object changed since the event"),
        "{error}"
    );
    assert!(error.contains(&old), "{error}");
}

#[test]
fn the_max_runtime_stops_the_command_even_one_that_ignores_sigterm() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    for (command, grace) in [
        (
            r#"echo started > "$S3SPOT_OUTPUT_DIR/progress.txt"; sleep 60"#,
            "10",
        ),
        (
            r#"trap '' TERM; echo started > "$S3SPOT_OUTPUT_DIR/progress.txt"; sleep 60 & wait; sleep 60"#,
            "1",
        ),
    ] {
        let mut job = fixture.job("in/data.csv", Some(command));
        job.max_runtime_secs = 1;
        let clock = Instant::now();
        let output = fixture.run_job(&job, &[("S3SPOT_KILL_GRACE", grace.into())]);
        let took = clock.elapsed();
        assert_eq!(output.status.code(), Some(1), "{}", show(&output));
        assert!(took < Duration::from_secs(15), "took {took:?}");
        let prefix = "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
        let status = fixture.status("data", prefix);
        assert_eq!(status.state, State::TimedOut, "{command}");
        assert_eq!(
            status.error.as_deref(),
            Some("max runtime exceeded while the command ran")
        );
        assert_eq!(
            fixture.text("data", &format!("{prefix}progress.txt")),
            "started\n",
            "partial outputs kept"
        );
    }
    assert_eq!(fixture.shutdowns(), 2);
}

#[test]
fn a_spot_interruption_notice_stops_the_job_and_keeps_its_partial_outputs() {
    let fixture = Fixture::new();
    let imds = FakeImds::start();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job(
        "in/data.csv",
        Some(r#"echo "half done" > "$S3SPOT_OUTPUT_DIR/partial.txt"; sleep 120"#),
    );
    let child = fixture
        .command(
            &["run", "--job", &job.encode()],
            &[
                ("AWS_EC2_METADATA_DISABLED", "false".into()),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint()),
            ],
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let noticed = Instant::now();
    imds.interrupt();
    let output = child.wait_with_output().unwrap();
    let took = noticed.elapsed();
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        took < Duration::from_secs(20),
        "well inside the two minutes: {took:?}"
    );

    let prefix = "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/";
    let status = fixture.status("data", prefix);
    assert_eq!(status.state, State::Interrupted);
    assert!(
        status.spot_interruption,
        "the launcher launches the next attempt"
    );
    let error = status.error.unwrap();
    assert!(
        error.starts_with("spot interruption notice ({\"action\": \"terminate\""),
        "{error}"
    );
    // Apart from the job's folder, where the next attempt writes its own.
    assert_eq!(
        fixture.text("data", &format!("{prefix}attempt-1-stopped/partial.txt")),
        "half done\n"
    );
    assert_eq!(
        fixture.keys("data", prefix),
        [
            format!("{prefix}attempt-1-stopped/partial.txt"),
            format!("{prefix}attempt-1-stopped/stderr.log"),
            format!("{prefix}attempt-1-stopped/stdout.log"),
            format!("{prefix}status.json"),
        ]
    );
    assert!(
        status
            .outputs
            .iter()
            .all(|k| k.contains("/attempt-1-stopped/"))
    );
    let instance = status.instance.expect("identified through IMDS");
    assert_eq!(instance.id.as_deref(), Some(imds::INSTANCE_ID));
    assert_eq!(instance.instance_type.as_deref(), Some(imds::INSTANCE_TYPE));
    assert_eq!(instance.lifecycle.as_deref(), Some("spot"));
    assert!(imds.notice_polls() >= 1);
    assert_eq!(imds.tokenless_requests(), 0, "IMDSv2 only");
    assert_eq!(fixture.shutdowns(), 1);
}

#[test]
fn hostile_keys_are_only_ever_data() {
    let fixture = Fixture::new();
    let marker = fixture.dir.path().join("pwned");
    let key = format!(
        "in/$(touch {}) `touch {0}`; it's \"quoted\"\nnext line ünïcödé 名前.csv",
        marker.display()
    );
    fixture.put("data", &key, CSV);
    let job = fixture.job(
        &key,
        Some(r#"printf '%s' "$S3SPOT_KEY" > "$S3SPOT_OUTPUT_DIR/key.txt"; basename "$S3SPOT_INPUT" > "$S3SPOT_OUTPUT_DIR/local-name.txt""#),
    );
    let output = fixture.run_job(&job, &[]);
    assert!(output.status.success(), "{}", show(&output));
    assert!(!marker.exists(), "part of the key was run");
    let prefix = format!("analysis/{key}/{}/", common::UPLOAD);
    assert_eq!(fixture.text("data", &format!("{prefix}key.txt")), key);
    let local = fixture.text("data", &format!("{prefix}local-name.txt"));
    assert!(local.trim_end().ends_with(".csv"), "{local}");
    assert!(
        local
            .trim_end()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
        "{local:?}"
    );
    let status = fixture.status("data", &prefix);
    assert_eq!(status.input.key, key);
    assert!(status.outputs.iter().all(|o| o.starts_with(&prefix)));
    assert_eq!(fixture.shutdowns(), 1);
}

#[test]
fn flags_and_s3spot_variables_describe_the_same_job() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let output = fixture.run(
        &[
            "run",
            "--bucket",
            "data",
            "--key",
            "in/data.csv",
            "--results-bucket",
            "results",
            "--results-prefix",
            "out/",
            "--command",
            r#"cp "$S3SPOT_INPUT" "$S3SPOT_OUTPUT_DIR/copy.csv""#,
            "--max-runtime",
            "30",
        ],
        &[],
    );
    assert!(output.status.success(), "{}", show(&output));
    // A job run by hand is named by its object: running it again replaces its results.
    let by_hand = s3spot_bootstrap::upload_folder(
        None,
        &s3spot_bootstrap::job_id(
            "s3spot-worker run",
            "data",
            "in/data.csv",
            s3spot_bootstrap::UploadIdentity::default(),
        ),
    );
    let prefix = format!("out/in/data.csv/{by_hand}/");
    assert_eq!(
        fixture
            .text("results", &format!("{prefix}copy.csv"))
            .as_bytes(),
        CSV
    );
    assert_eq!(fixture.status("results", &prefix).state, State::Succeeded);

    let output = fixture.run(
        &["run"],
        &[
            ("S3SPOT_BUCKET", "data".into()),
            ("S3SPOT_KEY", "in/data.csv".into()),
            ("S3SPOT_RESULTS_PREFIX", "by-env/".into()),
        ],
    );
    assert!(output.status.success(), "{}", show(&output));
    assert!(
        fixture
            .get("data", &format!("by-env/in/data.csv/{by_hand}/report.json"))
            .is_some()
    );
    assert_eq!(fixture.shutdowns(), 2);
}

#[test]
fn job_variables_in_the_environment_do_not_override_or_block_the_job() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job("in/data.csv", Some("true"));
    let output = fixture.run_job(
        &job,
        &[
            ("S3SPOT_BUCKET", "results".into()),
            ("S3SPOT_COMMAND", "exit 9".into()),
        ],
    );
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(
        fixture
            .status(
                "data",
                "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/"
            )
            .state,
        State::Succeeded
    );
}

#[test]
fn bad_invocations_exit_2_and_still_shut_down() {
    let fixture = Fixture::new();
    let cases: &[(&[&str], &str)] = &[
        (
            &["run"],
            "give the job: --job BASE64, or --bucket and --key",
        ),
        (
            &["run", "--job", "not-a-job"],
            "--job is not a job from s3spot: job is not valid base64",
        ),
        (
            &["run", "--job", "e30=", "--bucket", "x"],
            "--job describes the whole job; drop --bucket",
        ),
        (
            &[
                "run",
                "--bucket",
                "data",
                "--key",
                "k",
                "--results-prefix",
                "out",
            ],
            "must end with '/'",
        ),
    ];
    for (i, (args, expected)) in cases.iter().enumerate() {
        let output = fixture.run(args, &[]);
        assert_eq!(output.status.code(), Some(2), "{}", show(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert_eq!(fixture.shutdowns(), i + 1, "{args:?}");
    }
    // A typo in a flag is a usage error: no shutdown of whatever machine it was typed on.
    let output = fixture.run(&["run", "--buckt", "data"], &[]);
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(fixture.shutdowns(), cases.len());
}

#[test]
fn no_shutdown_means_none() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let output = fixture.run(
        &[
            "run",
            "--no-shutdown",
            "--job",
            &fixture.job("in/data.csv", Some("true")).encode(),
        ],
        &[],
    );
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(fixture.shutdowns(), 0);
}

#[test]
fn unexpected_failures_still_write_status_and_shut_down() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job("in/data.csv", Some("true"));
    let output = fixture.run_job(&job, &[("S3SPOT_WORK_DIR", "/nonexistent/work".into())]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let status = fixture.status(
        "data",
        "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/",
    );
    assert_eq!(status.state, State::Failed);
    assert!(
        status
            .error
            .unwrap()
            .starts_with("cannot create a work directory in /nonexistent/work")
    );
    assert_eq!(fixture.shutdowns(), 1);

    // Nowhere to write the status either: still a failure, and still one shutdown.
    let mut job = fixture.job("in/data.csv", Some("true"));
    job.results_bucket = "x".into(); // not a valid bucket name: S3 refuses every write
    let output = fixture.run_job(&job, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot record status.json"), "{stderr}");
    assert_eq!(fixture.shutdowns(), 2);
}

#[test]
fn two_uploads_of_a_key_keep_their_results_apart_whatever_the_order() {
    let fixture = Fixture::new();
    let command = Some(r#"cp "$S3SPOT_INPUT" "$S3SPOT_OUTPUT_DIR/copy.csv""#);
    let upload = |content: &[u8], job_id: &str, uploaded_at: &str| {
        let etag = fixture.put("data", "in/data.csv", content);
        let mut job = fixture.job("in/data.csv", command);
        job.etag = Some(etag);
        job.job_id = job_id.repeat(32);
        job.uploaded_at = Some(uploaded_at.into());
        job
    };
    let first = upload(b"first upload\n", "1", "2026-11-30T10:00:00.000Z");
    let second = upload(b"second upload\n", "2", "2026-11-30T11:00:00.000Z");
    assert_ne!(first.results_key_prefix(), second.results_key_prefix());

    // The newer upload's job runs first; the older one's, delivered late, runs after it.
    let output = fixture.run_job(&second, &[]);
    assert!(output.status.success(), "{}", show(&output));
    let output = fixture.run_job(&first, &[]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));

    let second_prefix = second.results_key_prefix();
    let newer = fixture.status("data", &second_prefix);
    assert_eq!(newer.state, State::Succeeded);
    assert_eq!(newer.job_id, second.job_id);
    assert_eq!(
        fixture.text("data", &format!("{second_prefix}copy.csv")),
        "second upload\n"
    );
    let older = fixture.status("data", &first.results_key_prefix());
    assert_eq!(older.state, State::Failed, "its object was replaced");
    assert_eq!(older.job_id, first.job_id);
    let listed = fixture.keys("data", "analysis/in/data.csv/");
    assert!(
        listed
            .iter()
            .all(|k| k.starts_with(&second_prefix) || k.starts_with(&first.results_key_prefix())),
        "{listed:?}"
    );
    assert_eq!(
        fixture.keys("data", &second_prefix).len(),
        4,
        "the newer upload's results alone in its folder: {listed:?}"
    );
}

#[test]
fn an_input_named_like_the_workers_own_files_is_processed_as_it_is() {
    let fixture = Fixture::new();
    let command = Some(r#"cp "$S3SPOT_INPUT" "$S3SPOT_OUTPUT_DIR/copy"; echo copied"#);
    for name in [
        "stdout.log",
        "stderr.log",
        "output",
        "status.json",
        "input",
        "copy",
    ] {
        let key = format!("x/{name}");
        let content = format!("12 bytes of {name}\n");
        fixture.put("data", &key, content.as_bytes());
        let output = fixture.run_job(&fixture.job(&key, command), &[]);
        assert!(output.status.success(), "{key}: {}", show(&output));
        let prefix = format!("analysis/{key}/{}/", common::UPLOAD);
        let status = fixture.status("data", &prefix);
        assert_eq!(status.state, State::Succeeded, "{key}: {status:#?}");
        assert_eq!(
            fixture.text("data", &format!("{prefix}copy")),
            content,
            "{key}: the command saw the whole input"
        );
        assert_eq!(
            fixture.text("data", &format!("{prefix}stdout.log")),
            "copied\n"
        );
    }
}

#[test]
fn a_commands_files_where_s3spot_keeps_its_own_are_not_uploaded() {
    let fixture = Fixture::new();
    fixture.put("data", "x/in.csv", CSV);
    let prefix = format!("analysis/x/in.csv/{}/", common::UPLOAD);
    let claim = format!("{prefix}.s3spot/attempt-1.json");
    fixture.put("data", &claim, b"the launcher's claim");
    let command = Some(
        r#"cd "$S3SPOT_OUTPUT_DIR" && mkdir -p .s3spot sub/.s3spot && echo forged > .s3spot/attempt-1.json && echo forged > .s3spot/attempt-2.json && echo forged > sub/.s3spot/attempt-1.json && echo forged > status.json && echo forged > stdout.log && echo kept > kept.txt"#,
    );
    let output = fixture.run_job(&fixture.job("x/in.csv", command), &[]);
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(fixture.text("data", &claim), "the launcher's claim");
    assert_eq!(fixture.keys("data", &format!("{prefix}.s3spot/")), [claim]);
    assert_eq!(
        fixture.keys("data", &format!("{prefix}sub/")),
        Vec::<String>::new()
    );
    let status = fixture.status("data", &prefix);
    assert_eq!(status.state, State::Succeeded, "{status:#?}");
    assert_eq!(
        status.outputs,
        [
            format!("{prefix}kept.txt"),
            format!("{prefix}stdout.log"),
            format!("{prefix}stderr.log"),
        ]
    );
    assert_eq!(fixture.text("data", &format!("{prefix}stdout.log")), "");
}

/// Starts `job` with `args`, and returns the child once its command has finished (its
/// `process` stage line has come), with the rest of its stderr collected on a thread.
fn start_until_processed(
    fixture: &Fixture,
    job: &s3spot_bootstrap::JobSpec,
    args: &[&str],
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    use std::io::BufRead as _;
    let encoded = job.encode();
    let mut all = vec!["run", "--job", &encoded];
    all.extend_from_slice(args);
    let mut child = fixture
        .command(&all, &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if matches!(
            s3spot_bootstrap::Stage::from_line(&line),
            Some(s3spot_bootstrap::Stage::Process { .. })
        ) {
            let rest = std::thread::spawn(move || {
                lines.map_while(Result::ok).fold(seen, |mut all, line| {
                    all.push_str(&line);
                    all.push('\n');
                    all
                })
            });
            return (child, rest);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the command never finished: {seen}");
}

/// A hundred outputs on a link where each write takes 300 ms: half a minute of uploads.
const MANY_OUTPUTS: &str =
    r#"for i in $(seq 1 100); do echo "$i" > "$S3SPOT_OUTPUT_DIR/part-$i"; done"#;

#[test]
fn a_stop_signal_during_uploads_still_leaves_status_json_in_time() {
    let fixture = Fixture::slow(Duration::from_millis(300));
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job("in/data.csv", Some(MANY_OUTPUTS));
    let (mut child, stderr) = start_until_processed(&fixture, &job, &["--upload-grace", "2"]);
    std::thread::sleep(Duration::from_millis(500));
    let signalled = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = child.wait().unwrap();
    let took = signalled.elapsed();
    let stderr = stderr.join().unwrap();
    assert!(
        took < Duration::from_secs(8),
        "the bootstrap kills 30 s after its SIGTERM; this took {took:?}: {stderr}"
    );
    assert_eq!(exit.code(), Some(1), "{stderr}");
    let status = fixture.status("data", &job.results_key_prefix());
    assert_eq!(status.state, State::Interrupted, "{status:#?}");
    assert!(!status.spot_interruption, "a signal is not EC2's notice");
    let error = status.error.unwrap();
    assert!(error.contains("uploads stopped"), "{error}");
    assert!(error.contains("SIGTERM"), "{error}");
    assert!(
        status.outputs.len() < 100,
        "{} outputs uploaded",
        status.outputs.len()
    );
}

#[test]
fn uploads_stop_before_the_hard_limit_so_that_status_json_is_written() {
    let fixture = Fixture::slow(Duration::from_millis(300));
    fixture.put("data", "in/data.csv", CSV);
    let mut job = fixture.job("in/data.csv", Some(MANY_OUTPUTS));
    job.max_runtime_secs = 1;
    let started = Instant::now();
    let output = fixture.run_job(&job, &[("S3SPOT_HARD_LIMIT", "8".into())]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "killed at the hard limit, it would leave no status: {took:?}\n{}",
        show(&output)
    );
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let status = fixture.status("data", &job.results_key_prefix());
    assert_eq!(status.state, State::TimedOut, "{status:#?}");
    let error = status.error.unwrap();
    assert!(
        error.contains("uploads stopped (the hard time limit comes next)"),
        "{error}"
    );
    assert_eq!(fixture.shutdowns(), 1);
}

/// A stop that comes while the worker is still asking IMDS who it is (up to a second where
/// IMDS does not answer) is the job's to record, not the end of the process with no account.
#[test]
fn a_stop_signal_while_the_worker_starts_is_recorded() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job("in/data.csv", None);
    // An IMDS that takes the connection and never answers.
    let imds = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", imds.local_addr().unwrap());
    let mut child = fixture
        .command(
            &["run", "--job", &job.encode()],
            &[
                ("AWS_EC2_METADATA_DISABLED", "false".into()),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint),
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    imds.set_nonblocking(true).unwrap();
    let asked = Instant::now();
    let _held = loop {
        match imds.accept() {
            Ok((held, _)) => break held,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                if asked.elapsed() > Duration::from_secs(30) {
                    let _ = child.kill();
                    panic!("the worker never asked IMDS");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => panic!("{error}"),
        }
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let exit = child.wait().unwrap();
    assert_eq!(exit.code(), Some(1), "{stderr}");
    let status = fixture.status("data", &job.results_key_prefix());
    assert_eq!(status.state, State::Interrupted, "{status:#?}\n{stderr}");
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("SIGTERM")),
        "{status:#?}"
    );
    assert_eq!(fixture.shutdowns(), 1);
}

/// A shell starts its background jobs with SIGINT and SIGQUIT ignored, and the bootstrap starts
/// the worker as one. The command still gets every signal's default.
#[test]
fn the_command_gets_default_signals_when_the_worker_is_a_background_job() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", CSV);
    let job = fixture.job(
        "in/data.csv",
        Some(r#"grep '^SigIgn:' /proc/self/status > "$S3SPOT_OUTPUT_DIR/ignored""#),
    );
    let encoded = job.encode();
    let worker = fixture.command(&["run", "--job", &encoded], &[]);
    let mut shell = std::process::Command::new("bash");
    shell
        .env_clear()
        .envs(
            worker
                .get_envs()
                .filter_map(|(name, value)| Some((name, value?))),
        )
        .arg("-c")
        .arg(r#""$0" "$@" & wait "$!""#)
        .arg(worker.get_program())
        .args(worker.get_args());
    let output = shell.output().unwrap();
    assert!(output.status.success(), "{}", show(&output));
    let ignored = fixture.text("data", &format!("{}ignored", job.results_key_prefix()));
    let mask = u64::from_str_radix(ignored.trim().trim_start_matches("SigIgn:").trim(), 16)
        .unwrap_or_else(|e| panic!("{e}: {ignored}"));
    // Bit n - 1 of the mask is signal n.
    for (name, number) in [("SIGINT", 2), ("SIGQUIT", 3), ("SIGTERM", 15)] {
        assert_eq!(mask & (1 << (number - 1)), 0, "{name} ignored: {ignored}");
    }
}
