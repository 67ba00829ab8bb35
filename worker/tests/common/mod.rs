//! A worker under test: the real binary, a real S3 server (s3s-fs), and a shutdown command that
//! records each call.

#![allow(dead_code)] // Each test binary uses its own part of this.

use std::path::PathBuf;
use std::process::{Command, Output};

use s3spot_bootstrap::{JobSpec, Status, WorkerArtifact};
use s3spot_tests::S3Server;

/// Every fixture job's id, and so its upload folder under its key's results.
pub const JOB_ID: &str = "6f1c2a3b4c5d6e7f8091a2b3c4d5e6f7";
pub const UPLOADED_AT: &str = "2026-11-30T10:19:37.123Z";
pub const UPLOAD: &str = "20261130T101937.123Z-6f1c2a3b4c5d6e7f";

pub struct Fixture {
    pub s3: S3Server,
    pub client: aws_sdk_s3::Client,
    pub runtime: tokio::runtime::Runtime,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// Buckets `data` and `results`.
    pub fn new() -> Fixture {
        Self::with(S3Server::start(&["data", "results"]))
    }

    /// The same, with each write to S3 taking `write_delay`.
    pub fn slow(write_delay: std::time::Duration) -> Fixture {
        Self::with(S3Server::start_slow(&["data", "results"], write_delay))
    }

    fn with(s3: S3Server) -> Fixture {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let client = runtime.block_on(s3.client());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("work")).unwrap();
        Fixture {
            s3,
            client,
            runtime,
            dir,
        }
    }

    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) -> String {
        let output = self
            .runtime
            .block_on(
                self.client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(body.to_vec().into())
                    .send(),
            )
            .unwrap();
        output.e_tag().unwrap().trim_matches('"').to_owned()
    }

    /// Uploads the file at `path` as `bucket/key`, streamed from disk, and removes the file.
    pub fn put_file(&self, bucket: &str, key: &str, path: &std::path::Path) {
        self.runtime.block_on(async {
            let body = aws_sdk_s3::primitives::ByteStream::from_path(path)
                .await
                .unwrap();
            self.client
                .put_object()
                .bucket(bucket)
                .key(key)
                .body(body)
                .send()
                .await
                .unwrap();
        });
        std::fs::remove_file(path).unwrap();
    }

    /// A job as the launcher would make it, for `data/<key>`.
    pub fn job(&self, key: &str, command: Option<&str>) -> JobSpec {
        JobSpec {
            bucket: "data".into(),
            key: key.into(),
            version_id: None,
            etag: None,
            size: None,
            sequencer: None,
            job_id: JOB_ID.into(),
            uploaded_at: Some(UPLOADED_AT.into()),
            results_bucket: "data".into(),
            results_prefix: "analysis/".into(),
            command: command.map(Into::into),
            max_runtime_secs: 60,
            worker: WorkerArtifact {
                uri: "s3://artifacts/s3spot-worker".into(),
                sha256: "0".repeat(64),
            },
            attempt: 1,
            pipeline: None,
            events_off: false,
        }
    }

    pub fn shutdown_log(&self) -> PathBuf {
        self.dir.path().join("shutdowns")
    }

    /// `s3spot-worker` with a clean environment: the S3 server's, and `env`.
    pub fn command(&self, args: &[&str], env: &[(&str, String)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_s3spot-worker"));
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env(
                "S3SPOT_SHUTDOWN_COMMAND",
                format!("echo shutdown >> '{}'", self.shutdown_log().display()),
            )
            .env("S3SPOT_WORK_DIR", self.dir.path().join("work"))
            .env(
                "S3SPOT_EVENTS",
                format!("file:{}", self.events_file().display()),
            );
        for (name, value) in self.s3.env() {
            command.env(name, value);
        }
        for (name, value) in env {
            command.env(name, value);
        }
        command
    }

    pub fn run(&self, args: &[&str], env: &[(&str, String)]) -> Output {
        self.command(args, env).output().unwrap()
    }

    pub fn run_job(&self, job: &JobSpec, env: &[(&str, String)]) -> Output {
        self.run(&["run", "--job", &job.encode()], env)
    }

    /// Where the worker's job events go.
    pub fn events_file(&self) -> PathBuf {
        self.dir.path().join("events.jsonl")
    }

    /// The job events written, each checked against the schema: (state, previous state).
    pub fn events(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.events_file())
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .inspect(s3spot_tests::events::assert_valid)
            .map(|event| {
                let detail = &event["detail"];
                (
                    detail["state"].as_str().unwrap().to_owned(),
                    detail["previous_state"]
                        .as_str()
                        .unwrap_or("none")
                        .to_owned(),
                )
            })
            .collect()
    }

    pub fn shutdowns(&self) -> usize {
        std::fs::read_to_string(self.shutdown_log())
            .map(|log| log.lines().count())
            .unwrap_or(0)
    }

    pub fn get(&self, bucket: &str, key: &str) -> Option<(Vec<u8>, Option<String>)> {
        let output = self
            .runtime
            .block_on(self.client.get_object().bucket(bucket).key(key).send())
            .ok()?;
        let content_type = output.content_type().map(str::to_owned);
        let body = self
            .runtime
            .block_on(output.body.collect())
            .unwrap()
            .into_bytes()
            .to_vec();
        Some((body, content_type))
    }

    pub fn text(&self, bucket: &str, key: &str) -> String {
        let (body, _) = self
            .get(bucket, key)
            .unwrap_or_else(|| panic!("no s3://{bucket}/{key}"));
        String::from_utf8(body).unwrap()
    }

    pub fn status(&self, bucket: &str, results_prefix: &str) -> Status {
        let json = self.text(bucket, &format!("{results_prefix}status.json"));
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"))
    }

    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let output = self
            .runtime
            .block_on(
                self.client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(prefix)
                    .send(),
            )
            .unwrap();
        let mut keys: Vec<String> = output
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect();
        keys.sort();
        keys
    }
}

pub use s3spot_tests::show;

/// The worker's memory bound, in KiB.
pub const RSS_LIMIT_KIB: i64 = 64 * 1024;

/// Asserts that no child process of this test has peaked over [`RSS_LIMIT_KIB`].
pub fn assert_children_peak_rss_bounded() {
    let peak_kib = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .unwrap()
        .max_rss();
    eprintln!("peak RSS of the worker: {} MiB", peak_kib / 1024);
    assert!(
        peak_kib < RSS_LIMIT_KIB,
        "peak RSS {} MiB is over {} MiB",
        peak_kib / 1024,
        RSS_LIMIT_KIB / 1024
    );
}

/// Set in the copy of a test binary that runs inside namespaces of its own.
const IN_NAMESPACES: &str = "S3SPOT_TEST_IN_NAMESPACES";

/// Runs the test `name` again, in mount and PID namespaces of its own (and a network one when
/// `network`), with a private copy of /etc: users it adds and processes it kills are its own.
/// Returns true in that copy, where the test goes on; false in the original, once the copy has
/// passed.
pub fn in_namespaces(name: &str, network: bool) -> bool {
    if std::env::var_os(IN_NAMESPACES).is_some() {
        // In a tmpfs of this mount namespace: nothing of it is left on the machine.
        let output = Command::new("sh")
            .args([
                "-ec",
                "mount -t tmpfs s3spot-test /mnt && mkdir /mnt/etc && cp -a /etc/. /mnt/etc \
                 && mount --bind /mnt/etc /etc",
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "a private /etc: {}", show(&output));
        return true;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "{name} makes namespaces, users and firewall rules: run the test command as root (CI does)"
    );
    let mut namespaces = vec!["--mount", "--pid", "--mount-proc", "--fork"];
    if network {
        namespaces.push("--net");
    }
    let output = Command::new("unshare")
        .args(namespaces)
        .arg("--")
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACES, "1")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("1 passed"),
        "the test ran inside the namespaces: {}",
        show(&output)
    );
    false
}
