//! The whole pipeline on one machine: uploads to the embedded S3 server go through the Lambda
//! handler to local instances that run the bootstrap script, which fetches and runs the worker.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use s3spot::local::{Options, Pipeline, Progress};
use s3spot_bootstrap::State;
use s3spot_tests::{show, workspace_root};

/// The `s3spot` command, as this package builds it: it is also the worker local instances run.
const S3SPOT: &str = env!("CARGO_BIN_EXE_s3spot");

struct Local {
    pipeline: Pipeline,
    dir: tempfile::TempDir,
}

async fn start(max_instances: u32, command: Option<&str>) -> Local {
    let dir = tempfile::tempdir().unwrap();
    let mut options = Options::new(PathBuf::from(S3SPOT));
    options.data_dir = dir.path().join("local");
    options.max_instances = max_instances;
    options.command = command.map(Into::into);
    let pipeline = Pipeline::start(options).await.unwrap();
    Local { pipeline, dir }
}

impl Local {
    fn file(&self, name: &str, content: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    /// The results folder of the newest job of `key`: in S3, and on this machine.
    fn results(&self, key: &str) -> (String, PathBuf) {
        let instance = self
            .pipeline
            .instances()
            .into_iter()
            .rfind(|i| i.key == key)
            .unwrap_or_else(|| panic!("no job of {key:?}"));
        let dir = self
            .pipeline
            .local_dir(&instance.results_bucket, &instance.results_prefix);
        (instance.results_prefix, dir)
    }

    async fn upload(&self, key: &str, content: &[u8]) {
        let client = self.pipeline.client().await;
        client
            .put_object()
            .bucket("data")
            .key(key)
            .body(content.to_vec().into())
            .send()
            .await
            .unwrap();
    }
}

/// The AWS CLI from the test tools, as a person runs it against the pipeline's endpoint with the
/// credentials it printed.
fn aws(local: &Local, args: &[&str]) -> std::process::Output {
    let program = workspace_root().join(".venv/bin/aws");
    assert!(
        program.is_file(),
        "the AWS CLI is not at {}; run scripts/test, which installs the test tools",
        program.display()
    );
    let options = local.pipeline.options();
    let output = Command::new(&program)
        .args(["--endpoint-url", local.pipeline.endpoint()])
        .args(args)
        .env_clear()
        .env("AWS_ACCESS_KEY_ID", &options.access_key)
        .env("AWS_SECRET_ACCESS_KEY", options.secret())
        .env("AWS_DEFAULT_REGION", &options.region)
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    assert!(output.status.success(), "aws {args:?}: {}", show(&output));
    output
}

/// Waits until `count` instances have ended; returns every progress line seen.
async fn until_ended(
    progress: &mut tokio::sync::broadcast::Receiver<Progress>,
    count: usize,
) -> Vec<Progress> {
    let mut seen = Vec::new();
    let mut ended = 0;
    tokio::time::timeout(Duration::from_secs(120), async {
        while ended < count {
            let line = progress.recv().await.unwrap();
            if matches!(line, Progress::Shutdown { .. }) {
                ended += 1;
            }
            seen.push(line);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {ended} of {count} instances ended: {seen:#?}"));
    seen
}

const CSV: &[u8] = b"id,value\n1,10\n2,20\n";

/// The events in the pipeline's `events.jsonl` about `key`, each checked against the schema,
/// as (attempt, state, previous state) in the order of a job's life (the launcher and the
/// worker append them from two processes, so the file's own order may differ by a hair).
fn events_of(local: &Local, key: &str) -> Vec<(u64, String, String)> {
    let path = local.pipeline.options().data_dir.join("events.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let rank = |state: &str| {
        ["waiting", "launched", "running"]
            .iter()
            .position(|s| *s == state)
            .unwrap_or(3)
    };
    let mut events: Vec<(u64, String, String)> = text
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .inspect(s3spot_tests::events::assert_valid)
        .filter(|event| event["detail"]["key"] == key)
        .map(|event| {
            let detail = &event["detail"];
            (
                detail["attempt"].as_u64().unwrap(),
                detail["state"].as_str().unwrap().to_owned(),
                detail["previous_state"]
                    .as_str()
                    .unwrap_or("none")
                    .to_owned(),
            )
        })
        .collect();
    events.sort_by_key(|(attempt, state, _)| (*attempt, rank(state)));
    events
}

/// Waits a little for the events of `key` to be `expected` (the launcher's may be appended a
/// moment after the instance is done), then checks them.
async fn assert_events(local: &Local, key: &str, expected: &[(u64, String, String)]) {
    for _ in 0..50 {
        if events_of(local, key) == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(events_of(local, key), expected);
}

fn event(attempt: u64, state: &str, previous: &str) -> (u64, String, String) {
    (attempt, state.to_owned(), previous.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_runs_through_the_whole_pipeline() {
    let local = start(4, None).await;
    let finished = local
        .pipeline
        .run_one(&local.file("f.csv", CSV), "in/f.csv")
        .await
        .unwrap();
    let status = finished.status.clone().expect("status.json");
    assert_eq!(status.state, State::Succeeded, "{status:#?}");
    assert_eq!(status.input.key, "in/f.csv");
    let (prefix, dir) = local.results("in/f.csv");
    assert!(
        prefix.starts_with("analysis/in/f.csv/")
            && prefix.ends_with(&format!("-{}/", &status.job_id[..16])),
        "one folder per upload under the key's: {prefix}"
    );
    assert_eq!(status.outputs, [format!("{prefix}report.json")]);
    assert!(
        matches!(
            finished.last,
            Progress::Shutdown {
                shut_down: true,
                ..
            }
        ),
        "{:?}",
        finished.last
    );
    assert_eq!(finished.local_dir, dir);
    assert!(
        dir.starts_with(
            local
                .dir
                .path()
                .join("local")
                .canonicalize()
                .unwrap()
                .join("s3/data/analysis/in/f.csv/")
        ),
        "{}",
        dir.display()
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(finished.local_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["table"]["rows"], 2);
    assert_events(
        &local,
        "in/f.csv",
        &[
            event(1, "launched", "none"),
            event(1, "running", "launched"),
            event(1, "succeeded", "running"),
        ],
    )
    .await;
    let cost = status.cost.expect("a local instance costs $0, and says so");
    assert_eq!((cost.usd.0, cost.instance_type.as_str()), (0.0, "local"));

    let instances = local.pipeline.instances();
    assert_eq!(instances.len(), 1);
    let instance = &instances[0];
    assert_eq!(instance.id, "i-local-000001");
    assert_eq!(instance.tag("s3spot:pipeline"), Some("s3spot-local"));
    assert_eq!(instance.tag("s3spot:key"), Some("in/f.csv"));
    let console = std::fs::read_to_string(instance.dir.join("console.log")).unwrap();
    assert!(console.contains("fetching the worker"), "{console}");
    assert!(
        instance.dir.join("shutdown").exists(),
        "the bootstrap's shutdown ended the instance"
    );
    local.pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_keys_are_data_all_the_way_through() {
    let local = start(
        4,
        Some(r#"printf '%s' "$S3SPOT_KEY" > "$S3SPOT_OUTPUT_DIR/key.txt""#),
    )
    .await;
    let marker = local.dir.path().join("pwned");
    // Between 1,000 and S3's 1,024 bytes, in segments under the 255 bytes a file name (s3s-fs
    // stores keys as paths) allows.
    let mut long = String::from("in/");
    while long.len() < 900 {
        long.push_str(&"ünïcödé $(x) ".repeat(8));
        long.push('/');
    }
    while long.len() < 1010 {
        long.push('k');
    }
    long.push_str(".csv");
    let keys = [
        format!("in/$(touch {})", marker.display()),
        format!("in/`touch {}`; it's \"quoted\".csv", marker.display()),
        "in/a+b c%2B d&e=f?.csv".to_owned(),
        "in/名前 📊 ünïcödé.csv".to_owned(),
        long,
    ];
    for key in &keys {
        let finished = local
            .pipeline
            .run_one(&local.file("input.csv", CSV), key)
            .await
            .unwrap();
        let status = finished
            .status
            .clone()
            .unwrap_or_else(|| panic!("no status for {key:?}: {:?}", finished.last));
        assert_eq!(status.state, State::Succeeded, "{key:?}: {status:#?}");
        assert_eq!(&status.input.key, key, "status.json holds the exact key");
        let seen = std::fs::read_to_string(finished.local_dir.join("key.txt")).unwrap();
        assert_eq!(&seen, key, "the command saw the exact key");
    }
    assert!(!marker.exists(), "part of a key was run");
    assert!((1000..=1024).contains(&keys[4].len()), "{}", keys[4].len());
    local.pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_s3_client_uploads_and_downloads() {
    let local = start(4, None).await;
    let aws = |args: &[&str]| aws(&local, args);
    let mut progress = local.pipeline.subscribe();
    let file = local.file("f.csv", CSV);
    aws(&[
        "s3",
        "cp",
        file.to_str().unwrap(),
        "s3://data/in/by the cli.csv",
    ]);
    until_ended(&mut progress, 1).await;
    let (prefix, _) = local.results("in/by the cli.csv");
    let status = aws(&["s3", "cp", &format!("s3://data/{prefix}status.json"), "-"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["state"], "succeeded");
    assert_eq!(status["input"]["key"], "in/by the cli.csv");
    let listing = aws(&["s3", "ls", "--recursive", "s3://data/analysis/"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains(&format!("{prefix}report.json")),
        "{listing}"
    );
    local.pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_uploads_of_a_key_are_two_jobs_and_a_repeated_notification_is_one() {
    let local = start(4, None).await;
    let mut progress = local.pipeline.subscribe();
    local.upload("in/same.csv", CSV).await;
    until_ended(&mut progress, 1).await;
    local.upload("in/same.csv", b"id\n1\n").await;
    until_ended(&mut progress, 1).await;
    assert_eq!(local.pipeline.instances().len(), 2, "two uploads, two jobs");
    let key_dir = local.pipeline.local_dir("data", "analysis/in/same.csv/");
    let mut folders: Vec<PathBuf> = std::fs::read_dir(&key_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    folders.sort();
    assert_eq!(folders.len(), 2, "a folder per upload: {folders:?}");
    let statuses: Vec<serde_json::Value> = folders
        .iter()
        .map(|f| serde_json::from_slice(&std::fs::read(f.join("status.json")).unwrap()).unwrap())
        .collect();
    assert_ne!(statuses[0]["job_id"], statuses[1]["job_id"]);
    for (folder, status) in folders.iter().zip(&statuses) {
        assert_eq!(status["state"], "succeeded", "{status:#}");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(folder.join("report.json")).unwrap()).unwrap();
        assert_eq!(
            report["size"], status["input"]["size"],
            "each its own upload's"
        );
    }
    assert_eq!(
        statuses[1]["input"]["size"], 5,
        "the newer upload lists last"
    );

    // One notification, delivered twice: the same ClientToken, so no second instance.
    let head = local
        .pipeline
        .client()
        .await
        .head_object()
        .bucket("data")
        .key("in/same.csv")
        .send()
        .await
        .unwrap();
    let notification = serde_json::json!({"Records": [{
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "data"}, "object": {
            "key": "in/same.csv", "size": head.content_length(),
            "eTag": head.e_tag().unwrap().trim_matches('"'), "sequencer": "00000000000000AA"}}
    }]});
    let mut progress = local.pipeline.subscribe();
    local.pipeline.deliver(notification.clone());
    until_ended(&mut progress, 1).await;
    local.pipeline.deliver(notification);
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = progress.recv().await.unwrap();
            if matches!(line, Progress::Launched { .. } | Progress::Skipped { .. }) {
                return line;
            }
        }
    })
    .await
    .unwrap();
    assert!(
        matches!(&outcome, Progress::Skipped { reason, .. } if reason.starts_with("already launched")),
        "{outcome:?}"
    );
    assert_eq!(
        local.pipeline.instances().len(),
        3,
        "the repeat launched nothing"
    );
    local.pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_concurrent_uploads_all_run_within_the_cap() {
    const JOBS: usize = 20;
    const CAP: u32 = 3;
    let local = start(
        CAP,
        Some(r#"sleep 0.2; wc -l < "$S3SPOT_INPUT" > "$S3SPOT_OUTPUT_DIR/lines""#),
    )
    .await;
    let mut progress = local.pipeline.subscribe();
    let uploads = (0..JOBS).map(|i| {
        let local = &local;
        async move { local.upload(&format!("in/batch/{i:02}.csv"), CSV).await }
    });
    futures_util::future::join_all(uploads).await;
    let seen = until_ended(&mut progress, JOBS).await;

    assert!(
        seen.iter().any(|l| matches!(l, Progress::Waiting { .. })),
        "some jobs waited for room"
    );
    assert!(
        local.pipeline.most_running() <= CAP as usize,
        "{} ran at once",
        local.pipeline.most_running()
    );
    assert_eq!(local.pipeline.instances().len(), JOBS);
    let client = local.pipeline.client().await;
    for i in 0..JOBS {
        let (prefix, _) = local.results(&format!("in/batch/{i:02}.csv"));
        let key = format!("{prefix}status.json");
        let object = client
            .get_object()
            .bucket("data")
            .key(&key)
            .send()
            .await
            .unwrap();
        let status: serde_json::Value =
            serde_json::from_slice(&object.body.collect().await.unwrap().into_bytes()).unwrap();
        assert_eq!(status["state"], "succeeded", "{key}");
    }
    local.pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copies_and_multipart_uploads_start_jobs_too() {
    let local = start(4, None).await;
    let client = local.pipeline.client().await;
    let mut progress = local.pipeline.subscribe();
    local.upload("staging/source.csv", CSV).await;
    until_ended(&mut progress, 1).await;
    client
        .copy_object()
        .bucket("data")
        .key("in/copied.csv")
        .copy_source("data/staging/source.csv")
        .send()
        .await
        .unwrap();
    let created = client
        .create_multipart_upload()
        .bucket("data")
        .key("in/parts.csv")
        .send()
        .await
        .unwrap();
    let upload_id = created.upload_id().unwrap();
    let part = client
        .upload_part()
        .bucket("data")
        .key("in/parts.csv")
        .upload_id(upload_id)
        .part_number(1)
        .body(CSV.to_vec().into())
        .send()
        .await
        .unwrap();
    client
        .complete_multipart_upload()
        .bucket("data")
        .key("in/parts.csv")
        .upload_id(upload_id)
        .multipart_upload(
            aws_sdk_s3::types::CompletedMultipartUpload::builder()
                .parts(
                    aws_sdk_s3::types::CompletedPart::builder()
                        .part_number(1)
                        .set_e_tag(part.e_tag().map(Into::into))
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let seen = until_ended(&mut progress, 2).await;
    let events: Vec<(&str, &str)> = seen
        .iter()
        .filter_map(|line| match line {
            Progress::Event { key, event, .. } if key.starts_with("in/") => {
                Some((key.as_str(), event.as_str()))
            }
            _ => None,
        })
        .collect();
    assert!(
        events.contains(&("in/copied.csv", "ObjectCreated:Copy")),
        "{events:?}"
    );
    assert!(
        events.contains(&("in/parts.csv", "ObjectCreated:CompleteMultipartUpload")),
        "{events:?}"
    );
    local.pipeline.shutdown().await;
}

#[test]
fn local_run_exits_non_zero_when_the_job_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.csv");
    std::fs::write(&file, CSV).unwrap();
    let output = Command::new(S3SPOT)
        .args([
            "local",
            "run",
            file.to_str().unwrap(),
            "--command",
            "echo broken >&2; exit 3",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("local"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("\"state\": \"failed\""), "{stdout}");
    assert!(stdout.contains("\"exit_code\": 3"), "{stdout}");
    let logged = stdout
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("analysis/in/f.csv/") && line.ends_with("/stderr.log"))
        .unwrap_or_else(|| panic!("no stderr.log among the results: {stdout}"));
    let stderr_log = dir.path().join("local/s3/data").join(logged);
    assert_eq!(std::fs::read_to_string(stderr_log).unwrap(), "broken\n");
}

#[test]
fn the_demo_runs_the_bundled_sample_with_nothing_but_this_program() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(S3SPOT)
        .arg("demo")
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("\"state\": \"succeeded\""), "{stdout}");
    assert!(
        stdout.contains("\"temperature_c\""),
        "the report's columns: {stdout}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    for stage in [
        "event ",
        "launched ",
        "download ",
        "process ",
        "upload ",
        "shutdown ",
    ] {
        assert!(stderr.contains(stage), "no {stage:?} line: {stderr}");
    }
    let uploads: Vec<_> = std::fs::read_dir(
        dir.path()
            .join(".s3spot-local/s3/data/analysis/in/measurements.csv"),
    )
    .unwrap()
    .collect();
    assert_eq!(uploads.len(), 1, "one upload, one folder");
    assert!(
        uploads[0]
            .as_ref()
            .unwrap()
            .path()
            .join("report.json")
            .exists()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_part_longer_than_a_file_name_is_refused_with_a_reason() {
    let local = start(4, None).await;
    let client = local.pipeline.client().await;
    let key = format!("in/{}.csv", "x".repeat(300));
    let error = client
        .put_object()
        .bucket("data")
        .key(&key)
        .body(CSV.to_vec().into())
        .send()
        .await
        .unwrap_err();
    let error = aws_sdk_s3::error::DisplayErrorContext(&error).to_string();
    assert!(error.contains("KeyTooLongError"), "{error}");
    assert!(error.contains("at most 255 bytes"), "{error}");
    assert!(local.pipeline.instances().is_empty());
    local.pipeline.shutdown().await;
}

/// The command lines (arguments joined by spaces) of this machine's processes.
fn command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_pipeline_stops_its_jobs_and_leaves_nothing_running() {
    // A duration no other process on the machine would sleep for.
    let needle = "987.654321";
    let local = start(
        4,
        Some(&format!(
            r#"echo started > "$S3SPOT_OUTPUT_DIR/partial"; sleep {needle}"#
        )),
    )
    .await;
    let mut progress = local.pipeline.subscribe();
    local.upload("in/long.csv", CSV).await;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Progress::Download { .. } = progress.recv().await.unwrap() {
                break;
            }
        }
    })
    .await
    .unwrap();
    // The sleep itself, not the shell that runs it: the partial output is written by then.
    let sleeping = format!("sleep {needle} ");
    while !command_lines()
        .iter()
        .any(|line| line.starts_with(&sleeping))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, results) = local.results("in/long.csv");
    local.pipeline.shutdown().await;

    let left: Vec<String> = command_lines()
        .into_iter()
        .filter(|line| line.contains(needle))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "the job outlived the pipeline");
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(results.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "interrupted", "{status:#}");
    assert!(
        status["error"].as_str().unwrap().contains("SIGTERM"),
        "{status:#}"
    );
    assert_eq!(
        std::fs::read_to_string(results.join("attempt-1-stopped/partial")).unwrap(),
        "started\n",
        "a stopped attempt's outputs, apart from the job's own"
    );
}

/// `s3spot local serve --json` as a person runs it, on `data_dir`.
struct Served {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    ready: serde_json::Value,
    runtime: tokio::runtime::Runtime,
}

impl Served {
    fn start(data_dir: &std::path::Path, args: &[&str]) -> Served {
        use std::io::BufRead as _;
        let mut child = Command::new(S3SPOT)
            .args(["local", "serve", "--port", "0", "--json", "--data-dir"])
            .arg(data_dir)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        Served {
            child,
            lines,
            ready,
            runtime: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn ready(&self, field: &str) -> String {
        self.ready["ready"][field].as_str().unwrap().to_owned()
    }

    /// An S3 client with the credentials serve printed.
    fn client(&self) -> aws_sdk_s3::Client {
        let mut options = Options::new(PathBuf::from(S3SPOT));
        options.secret_key = Some(self.ready("secret_key"));
        self.runtime
            .block_on(s3spot::local::client(&self.ready("endpoint"), &options))
    }

    fn upload(&self, key: &str, body: &[u8]) {
        self.runtime
            .block_on(
                self.client()
                    .put_object()
                    .bucket("data")
                    .key(key)
                    .body(body.to_vec().into())
                    .send(),
            )
            .unwrap();
    }

    fn status(&self, key: &str) -> Option<serde_json::Value> {
        let client = self.client();
        self.runtime.block_on(async {
            let listed = client
                .list_objects_v2()
                .bucket("data")
                .prefix(format!("analysis/{key}/"))
                .send()
                .await
                .unwrap();
            let status_key = listed
                .contents()
                .iter()
                .filter_map(|o| o.key())
                .find(|k| k.ends_with("/status.json"))?
                .to_owned();
            let object = client
                .get_object()
                .bucket("data")
                .key(status_key)
                .send()
                .await
                .unwrap();
            serde_json::from_slice(&object.body.collect().await.unwrap().into_bytes()).ok()
        })
    }

    /// Progress lines until one matches, which is returned.
    fn until(&mut self, mut done: impl FnMut(&serde_json::Value) -> bool) -> serde_json::Value {
        for line in self.lines.by_ref() {
            let line: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            if done(&line) {
                return line;
            }
        }
        panic!("serve ended first");
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, signal).unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn local_serve_prints_where_it_listens_reports_progress_as_json_and_stops_on_a_signal() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = Served::start(&dir.path().join("local"), &[]);
    let endpoint = serve.ready("endpoint");
    assert!(endpoint.starts_with("http://127.0.0.1:"), "{}", serve.ready);
    assert_eq!(serve.ready("access_key"), "s3spot");
    assert_eq!(serve.ready("data_bucket"), "data");

    serve.upload("in/served.csv", CSV);
    let mut stages = Vec::new();
    let mut jobs = Vec::new();
    let last = serve.until(|line| {
        stages.push(line["stage"].as_str().unwrap().to_owned());
        if line["stage"] == "job" {
            jobs.push(line["state"].as_str().unwrap().to_owned());
        }
        // The events file is read a few times a second: its last line may follow the shutdown.
        jobs.last().is_some_and(|state| state == "succeeded")
    });
    assert_eq!(last["key"], "in/served.csv", "{last}");
    // The launcher and the worker write from two processes: `launched` and `running` may
    // land in either order.
    jobs.sort();
    assert_eq!(jobs, ["launched", "running", "succeeded"]);
    assert!(
        serve.ready("dashboard").starts_with("http://127.0.0.1:"),
        "{}",
        serve.ready
    );
    assert!(serve.ready("events").ends_with("events.jsonl"));
    for stage in ["event", "launched", "download", "process", "upload", "job"] {
        assert!(
            stages.iter().any(|s| s == stage),
            "no {stage} in {stages:?}"
        );
    }
    serve.signal(nix::sys::signal::Signal::SIGINT);
    let status = serve.child.wait().unwrap();
    assert!(status.success(), "Ctrl-C is a normal end: {status:?}");
}

/// The dashboard of `local serve`, in Debian's chromium (tests/browser/dashboard.mjs): it
/// lists the jobs just run, shows one's status, refuses requests without the run's token, and
/// cancels only after the confirmation. Its screenshot is the README's.
#[test]
fn the_dashboard_shows_the_jobs_in_a_real_browser_and_cancels_only_when_confirmed() {
    let browser_tests = workspace_root().join("tests/browser");
    assert!(
        browser_tests.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed in {}; run scripts/test, which installs it and \
         chromium",
        browser_tests.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let command = r#"case "$S3SPOT_KEY" in *slow*) sleep 876.25;; esac; echo done > "$S3SPOT_OUTPUT_DIR/out.txt""#;
    let mut serve = Served::start(&dir.path().join("local"), &["--command", command]);
    let url = serve.ready("dashboard");
    let token = url.rsplit_once("token=").unwrap().1.to_owned();
    assert_eq!(token.len(), 64, "{url}");

    let job_state = |line: &serde_json::Value, key: &str, state: &str| {
        line["stage"] == "job" && line["key"] == key && line["state"] == state
    };
    serve.upload("in/done.csv", CSV);
    serve.until(|line| job_state(line, "in/done.csv", "succeeded"));
    serve.upload("in/slow.csv", CSV);
    serve.until(|line| job_state(line, "in/slow.csv", "running"));

    let screenshot = dir.path().join("dashboard.png");
    let browser = Command::new("node")
        .arg(browser_tests.join("dashboard.mjs"))
        .current_dir(&browser_tests)
        .env("DASHBOARD_URL", &url)
        .env("DONE_KEY", "in/done.csv")
        .env("RUNNING_KEY", "in/slow.csv")
        .env("SCREENSHOT", &screenshot)
        .output()
        .expect("node, to drive the browser (scripts/test installs it)");
    assert!(browser.status.success(), "{}", show(&browser));
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000);
    serve.until(|line| job_state(line, "in/slow.csv", "cancelled"));
    assert_eq!(serve.status("in/slow.csv").unwrap()["state"], "cancelled");
    assert_eq!(serve.status("in/done.csv").unwrap()["state"], "succeeded");
    // Where the README's picture comes from.
    if let Some(keep) = std::env::var_os("S3SPOT_KEEP_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
    serve.signal(nix::sys::signal::Signal::SIGINT);
    assert!(serve.child.wait().unwrap().success());
}

#[test]
fn each_data_directory_has_a_secret_of_its_own_and_is_its_owners_alone() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let first = Served::start(&one, &[]);
    let secret = first.ready("secret_key");
    assert!(secret.len() >= 32, "{secret}");
    assert_ne!(secret, "s3spot-local");
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&one), 0o700);
    assert_eq!(mode(&one.join("secret-key")), 0o600);
    first.upload("in/a.csv", CSV);

    // The old shared secret is no key to it.
    let mut options = Options::new(PathBuf::from(S3SPOT));
    options.secret_key = Some("s3spot-local".into());
    let stranger = first
        .runtime
        .block_on(s3spot::local::client(&first.ready("endpoint"), &options));
    let refused = first
        .runtime
        .block_on(stranger.list_objects_v2().bucket("data").send());
    assert!(
        refused.is_err(),
        "a request with the shared secret was served"
    );

    let second = Served::start(&two, &[]);
    assert_ne!(
        second.ready("secret_key"),
        secret,
        "another directory, another secret"
    );
    drop(first);
    let again = Served::start(&one, &[]);
    assert_eq!(again.ready("secret_key"), secret, "kept with the directory");
    let given = Served::start(
        &dir.path().join("three"),
        &["--secret-key", "chosen-secret"],
    );
    assert_eq!(given.ready("secret_key"), "chosen-secret");
}

#[test]
fn uploads_waiting_at_the_cap_survive_a_stop_and_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("local");
    // A needle no other process on the machine would sleep for.
    let hang = ["--max-instances", "1", "--command", "sleep 765.4321"];
    for stop in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let waiting = format!("in/waiting-{stop}.csv");
        let mut serve = Served::start(&data_dir, &hang);
        serve.upload(&format!("in/running-{stop}.csv"), CSV);
        serve.until(|line| line["stage"] == "launched");
        serve.upload(&waiting, CSV);
        serve.until(|line| line["stage"] == "waiting" && line["key"] == waiting.as_str());
        serve.signal(stop);
        serve.child.wait().unwrap();
        drop(serve);

        // The next serve on the directory runs what was waiting.
        let mut serve = Served::start(&data_dir, &["--max-instances", "1", "--command", "true"]);
        let done =
            serve.until(|line| line["stage"] == "shutdown" && line["key"] == waiting.as_str());
        assert_eq!(done["state"], "succeeded", "{done}");
        assert_eq!(serve.status(&waiting).unwrap()["state"], "succeeded");
        serve.signal(nix::sys::signal::Signal::SIGINT);
        serve.child.wait().unwrap();
    }
    assert!(
        !command_lines().iter().any(|line| line.contains("765.4321")),
        "a job outlived its pipeline"
    );
}

#[test]
fn instances_running_when_serve_died_are_ended_and_failed_on_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("local");
    let mut serve = Served::start(&data_dir, &["--command", "echo started; sleep 654.321"]);
    serve.upload("in/orphan.csv", CSV);
    let launched = serve.until(|line| line["stage"] == "launched");
    let id = launched["instance_id"].as_str().unwrap().to_owned();
    while !command_lines()
        .iter()
        .any(|line| line.starts_with("sleep 654.321"))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    serve.signal(nix::sys::signal::Signal::SIGKILL);
    serve.child.wait().unwrap();
    drop(serve);
    assert!(
        command_lines()
            .iter()
            .any(|line| line.starts_with("sleep 654.321")),
        "kill -9 leaves the instance running"
    );

    let mut serve = Served::start(&data_dir, &[]);
    let failed = serve.until(|line| line["stage"] == "failed");
    assert_eq!(failed["key"], "in/orphan.csv", "{failed}");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains(&id) && error.contains("Server.LocalServeStopped"),
        "{error}"
    );
    assert!(
        !command_lines()
            .iter()
            .any(|line| line.starts_with("sleep 654.321")),
        "never left running"
    );
    let status = serve.status("in/orphan.csv").expect("a final status");
    assert_eq!(status["state"], "failed", "{status:#}");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("s3spot local serve stopped while the instance ran"),
        "{error}"
    );
    assert!(error.contains("started"), "the end of its console: {error}");
    let listed = Command::new(S3SPOT)
        .args(["jobs", "--json", "--local"])
        .arg(&data_dir)
        .arg("list")
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows[0]["instance_id"], id.as_str());
    assert_eq!(rows[0]["state"], "terminated", "{rows:#}");
    assert_eq!(rows[0]["result"], "failed");
}

/// `s3spot jobs --local <the pipeline's data dir> ARGS`, as a person runs it next to `serve`.
/// Waits until a command line on this machine starts with `prefix`.
async fn until_sleeping(prefix: &str) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !command_lines().iter().any(|line| line.starts_with(prefix)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no command {prefix:?} started"));
}

async fn jobs(local: &Local, args: &[&str]) -> std::process::Output {
    let data_dir = local.pipeline.options().data_dir.clone();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(S3SPOT)
            .arg("jobs")
            .arg("--local")
            .arg(data_dir)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

async fn jobs_json(local: &Local, args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.push("--json");
    let output = jobs(local, &args).await;
    assert!(output.status.success(), "{args:?}: {}", show(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Waits for the instance `id` to end; returns its status.json.
async fn ended(
    local: &Local,
    progress: &mut tokio::sync::broadcast::Receiver<Progress>,
    id: &str,
    key: &str,
) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Progress::Shutdown { instance_id, .. } = progress.recv().await.unwrap()
                && instance_id == id
            {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} did not end"));
    let (_, results) = local.results(key);
    serde_json::from_slice(&std::fs::read(results.join("status.json")).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_lists_cancels_retries_and_reaps_the_jobs_of_a_running_pipeline() {
    let local = start(
        4,
        Some(r#"echo started > "$S3SPOT_OUTPUT_DIR/partial"; echo working >&2; sleep 876.5"#),
    )
    .await;
    let mut progress = local.pipeline.subscribe();
    local.upload("in/hangs.csv", CSV).await;
    // Until the command hangs in its sleep.
    until_sleeping("sleep 876.5 ").await;

    let rows = jobs_json(&local, &["list"]).await;
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows:#}");
    let first = &rows[0];
    assert_eq!(
        (
            &first["key"],
            &first["state"],
            &first["attempt"],
            &first["stuck"]
        ),
        (
            &"in/hangs.csv".into(),
            &"running".into(),
            &1.into(),
            &false.into()
        )
    );
    let id = first["instance_id"].as_str().unwrap().to_owned();

    // Stuck only by a deliberately short threshold; a dry run stops nothing.
    let stuck = jobs_json(&local, &["reap", "--dry-run", "--stuck-after", "0s"]).await;
    assert_eq!(stuck["instances"][0]["instance_id"], id.as_str());
    let text = jobs(&local, &["list", "--stuck-after", "0s"]).await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.starts_with("INSTANCE"), "{text}");
    assert!(text.contains("running STUCK"), "{text}");
    assert!(text.contains("s3://data/in/hangs.csv"), "{text}");

    let cancelled = jobs(&local, &["cancel", "in/hangs.csv"]).await;
    assert!(cancelled.status.success(), "{}", show(&cancelled));
    assert!(
        String::from_utf8_lossy(&cancelled.stdout).starts_with(&format!("cancelled {id} ")),
        "{}",
        show(&cancelled)
    );
    let status = ended(&local, &mut progress, &id, "in/hangs.csv").await;
    assert_eq!(status["state"], "cancelled", "{status:#}");
    let error = status["error"].as_str().unwrap();
    assert!(error.contains("s3spot jobs cancel"), "{error}");
    assert!(
        error.contains("SIGTERM"),
        "the worker's own account is kept: {error}"
    );
    assert!(
        status["outputs"].to_string().contains("partial"),
        "the worker's outputs are kept: {status:#}"
    );

    let again = jobs(&local, &["cancel", &id]).await;
    assert_eq!(again.status.code(), Some(2), "{}", show(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to cancel"));

    let shown = jobs(&local, &["show", "in/hangs.csv"]).await;
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("\"state\": \"cancelled\""), "{shown}");
    assert!(shown.contains("stderr.log"), "{shown}");
    assert!(shown.contains("working"), "the log's tail: {shown}");

    let retried = jobs_json(&local, &["retry", "in/hangs.csv"]).await;
    let second = retried["launched"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(second, id);
    let rows = jobs_json(&local, &["list"]).await;
    let attempts: Vec<(String, u64)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["instance_id"].as_str().unwrap().to_owned(),
                r["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(attempts, [(id.clone(), 1), (second.clone(), 2)]);

    // Reaped once its command runs (the first attempt's has ended): its worker has begun.
    until_sleeping("sleep 876.5 ").await;
    let reaped = jobs_json(&local, &["reap", "--stuck-after", "0s"]).await;
    assert_eq!(reaped["instances"][0]["instance_id"], second.as_str());
    let status = ended(&local, &mut progress, &second, "in/hangs.csv").await;
    assert_eq!(
        (&status["state"], &status["attempt"]),
        (&"failed".into(), &2.into())
    );
    assert!(
        status["error"].as_str().unwrap().starts_with("reaped: "),
        "{status:#}"
    );
    assert_eq!(status["history"][0]["state"], "cancelled", "{status:#}");
    // The launcher's verdicts find the attempts launched: the worker keeps no record of its
    // start in status.json.
    assert_events(
        &local,
        "in/hangs.csv",
        &[
            event(1, "launched", "none"),
            event(1, "running", "launched"),
            event(1, "cancelled", "launched"),
            event(2, "launched", "none"),
            event(2, "running", "launched"),
            event(2, "failed", "launched"),
        ],
    )
    .await;
    let cost = jobs_json(&local, &["cost", "--by", "state"]).await;
    let groups: Vec<(&str, u64, u64)> = cost["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["group"].as_str().unwrap(),
                g["attempts"].as_u64().unwrap(),
                g["priced"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(groups, [("cancelled", 1, 1), ("failed", 1, 1)], "{cost:#}");
    assert_eq!(cost["total"]["usd"], 0.0);
    let text = jobs(&local, &["cost"]).await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.starts_with("1 job whose status.json"), "{text}");
    assert!(text.contains("DAY"), "{text}");
    let data_dir = local.pipeline.options().data_dir.display().to_string();
    local.pipeline.shutdown().await;

    let gone = tokio::task::spawn_blocking(move || {
        Command::new(S3SPOT)
            .args(["jobs", "--local", &data_dir, "list"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(gone.status.code(), Some(2), "{}", show(&gone));
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no `s3spot local serve` answers"),
        "{}",
        show(&gone)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_literal_in_the_embedded_s3_server() {
    let local = start(4, None).await;
    let mut progress = local.pipeline.subscribe();
    let evil = local.file("evil", b"not for the artifacts bucket\n");
    // As a new user would try it: the AWS CLI sends the key as it is.
    aws(
        &local,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "data",
            "--key",
            "../artifacts/evil",
            "--body",
            evil.to_str().unwrap(),
        ],
    );
    // And through the SDK: keys that a path would fold into others.
    let literal = ["/abs", "a//b", "a/b", "./x", "x", "a/./b", "%2E%2E"];
    for (i, key) in literal.iter().enumerate() {
        local.upload(key, format!("object {i}\n").as_bytes()).await;
    }
    until_ended(&mut progress, 1 + literal.len()).await;

    let s3 = local.pipeline.options().s3_root();
    assert!(
        !s3.join("artifacts/evil").exists(),
        "the key left its bucket's folder"
    );
    let client = local.pipeline.client().await;
    let get = |bucket: &'static str, key: String| {
        let client = client.clone();
        async move {
            let object = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .ok()?;
            Some(object.body.collect().await.unwrap().into_bytes().to_vec())
        }
    };
    assert_eq!(
        get("data", "../artifacts/evil".into()).await.as_deref(),
        Some(&b"not for the artifacts bucket\n"[..])
    );
    assert_eq!(get("artifacts", "evil".into()).await, None);
    for (i, key) in literal.iter().enumerate() {
        assert_eq!(
            get("data", (*key).to_owned()).await,
            Some(format!("object {i}\n").into_bytes()),
            "{key:?} is its own object"
        );
    }
    let listed: Vec<String> = client
        .list_objects_v2()
        .bucket("data")
        .send()
        .await
        .unwrap()
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .filter(|k| !k.starts_with("analysis/"))
        .collect();
    let mut expected: Vec<String> = literal.iter().map(|k| (*k).to_owned()).collect();
    expected.push("../artifacts/evil".into());
    expected.sort();
    let mut listed = listed;
    listed.sort();
    assert_eq!(listed, expected, "listed as they were written");

    // The job of the evil key ran, and its results stayed in the data bucket too.
    let (prefix, dir) = local.results("../artifacts/evil");
    assert!(
        prefix.starts_with("analysis/../artifacts/evil/"),
        "{prefix}"
    );
    assert!(dir.starts_with(s3.join("data")), "{}", dir.display());
    let status = get("data", format!("{prefix}status.json")).await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["state"], "succeeded", "{status:#}");
    assert_eq!(status["input"]["key"], "../artifacts/evil");
    let artifacts: Vec<String> = std::fs::read_dir(s3.join("artifacts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(artifacts, ["s3spot-worker"], "only the worker is there");
    local.pipeline.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_ends_without_a_status_gets_one_from_the_reaper() {
    let local = start(4, None).await;
    // The worker is gone from the artifacts bucket: the instance cannot fetch it, and powers
    // off before any worker could write a status.
    local
        .pipeline
        .client()
        .await
        .delete_object()
        .bucket("artifacts")
        .key(s3spot::local::WORKER_KEY)
        .send()
        .await
        .unwrap();
    let mut progress = local.pipeline.subscribe();
    local.upload("in/unfetched.csv", CSV).await;
    let ended = until_ended(&mut progress, 1).await;
    assert!(
        ended
            .iter()
            .any(|line| matches!(line, Progress::Shutdown { state: None, .. })),
        "no status when it ended: {ended:#?}"
    );
    let (_, dir) = local.results("in/unfetched.csv");
    let status = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(json) = std::fs::read(dir.join("status.json")) {
                return serde_json::from_slice::<serde_json::Value>(&json).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the reaper gives the attempt a status within its period");
    assert_eq!(status["state"], "failed", "{status:#}");
    assert_eq!(status["written_by"], "launcher");
    let error = status["error"].as_str().unwrap();
    assert!(
        error.contains("Client.InstanceInitiatedShutdown"),
        "{error}"
    );
    assert!(
        error.contains("cannot get s3://artifacts/s3spot-worker"),
        "the console's end: {error}"
    );
    local.pipeline.shutdown().await;
}
