//! The rendered bootstrap script, checked by bash itself: it parses, it carries hostile keys to
//! the worker byte for byte without running any of them, and it shuts down on every exit path.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use s3spot_bootstrap::{
    JobSpec, KILL_AFTER_SECS, MAX_USER_DATA_BYTES, RenderError, WorkerArtifact,
    container_environment, job_from_user_data, render_container_script, render_user_data,
};
use sha2::{Digest as _, Sha256};

/// Keys an uploader can choose. Each would run `touch` (creating a file named `pwned-*`) if the
/// shell ever read it as code.
fn hostile_keys() -> Vec<String> {
    // The longest key S3 allows: 1,024 bytes of UTF-8.
    let mut longest = String::from("in/");
    while longest.len() + "$(touch pwned-long)é".len() <= 1024 {
        longest.push_str("$(touch pwned-long)é");
    }
    while longest.len() < 1024 {
        longest.push('a');
    }
    vec![
        "in/it's \"quoted\".csv".into(),
        "in/$(touch pwned-subst).csv".into(),
        "in/`touch pwned-backtick`.csv".into(),
        "in/x; touch pwned-semicolon; .csv".into(),
        "in/x\ntouch pwned-newline\n.csv".into(),
        "in/${IFS}$HOME && touch pwned-and || touch pwned-or | touch pwned-pipe".into(),
        "in/x' ; touch pwned-single '".into(),
        "in/\\'$'\\x41'\\\\.csv".into(),
        "in/tab\there and *glob* ?[a] {b,c} ~ # %".into(),
        "in/ünïcödé ✓ 名前.csv".into(),
        "in/nul\u{0}byte".into(),
        longest,
    ]
}

fn job(key: &str, worker_sha256: &str) -> JobSpec {
    JobSpec {
        bucket: "data".into(),
        key: key.into(),
        version_id: Some("v1".into()),
        etag: Some("d41d8cd98f00b204e9800998ecf8427e".into()),
        size: Some(42),
        sequencer: Some("0055AED6DCD90281E5".into()),
        job_id: "6f1c2a3b4c5d6e7f8091a2b3c4d5e6f7".into(),
        uploaded_at: Some("2026-11-30T10:19:37.123Z".into()),
        results_bucket: "data".into(),
        results_prefix: "analysis/".into(),
        command: Some("wc -l \"$S3SPOT_INPUT\" > \"$S3SPOT_OUTPUT_DIR/lines\"".into()),
        max_runtime_secs: 60,
        worker: WorkerArtifact {
            uri: "s3://artifacts/workers/s3spot-worker".into(),
            sha256: worker_sha256.into(),
        },
        attempt: 1,
        pipeline: None,
        events_off: false,
    }
}

/// A directory with stub `aws` and worker binaries, and the environment that points the script at
/// them instead of at EC2.
struct Sandbox {
    dir: tempfile::TempDir,
    worker_sha256: String,
}

const STUB_WORKER: &str = "#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$STUB_DIR/worker-args\"\nexit \"${STUB_WORKER_EXIT:-0}\"\n";

/// `aws s3 cp --only-show-errors SRC DEST`: records its arguments and "downloads" the stub worker.
const STUB_AWS: &str = "#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$STUB_DIR/aws-args\"\n[ -n \"${STUB_AWS_FAIL:-}\" ] && exit 1\ncp \"$STUB_DIR/worker-binary\" \"$5\"\n";

impl Sandbox {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("bin")).unwrap();
        write_executable(&dir.path().join("bin/aws"), STUB_AWS);
        write_executable(&dir.path().join("worker-binary"), STUB_WORKER);
        let worker_sha256 = hex::encode(Sha256::digest(STUB_WORKER));
        Sandbox { dir, worker_sha256 }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, script: &str, env: &[(&str, &str)]) -> Output {
        self.command(script, env).output().unwrap()
    }

    /// bash running `script` in the sandbox, not started yet.
    fn command(&self, script: &str, env: &[(&str, &str)]) -> Command {
        let script_path = self.path("user-data.sh");
        fs::write(&script_path, script).unwrap();
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap()
        );
        let shutdown = format!("touch {}", self.path("shutdown-ran").display());
        let mut command = Command::new("bash");
        command
            // A group of its own, so that a failed test can stop all of it.
            .process_group(0)
            .arg(&script_path)
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("STUB_DIR", self.dir.path())
            .env("S3SPOT_HOME", self.path("home"))
            .env("S3SPOT_LOG", self.path("log/s3spot.log"))
            .env("S3SPOT_RUN_AS", "")
            .env("S3SPOT_SHUTDOWN_COMMAND", shutdown);
        for (name, value) in env {
            command.env(name, value);
        }
        command
    }

    /// Starts `script` with output to the log only, and returns once the stub worker has
    /// touched `worker-started`.
    fn start_until_worker_runs(&self, script: &str, env: &[(&str, &str)]) -> std::process::Child {
        let mut child = self
            .command(script, env)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !self.path("worker-started").exists() {
            if started.elapsed().as_secs() >= 30 {
                kill_group(&mut child);
                panic!("the worker never started");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child
    }
}

/// `child`'s exit status, or a failed test (with everything in its group killed) after `secs`.
fn exit_within(child: &mut std::process::Child, secs: u64, what: &str) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed().as_secs() >= secs {
            kill_group(child);
            panic!("{what}: still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// SIGKILL to `child`'s group: the script and all it started, a stub worker left behind too.
fn kill_group(child: &mut std::process::Child) {
    let group = nix::unistd::Pid::from_raw(-i32::try_from(child.id()).unwrap());
    let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
}

impl Sandbox {
    fn args(&self, name: &str) -> Vec<String> {
        let raw = fs::read(self.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        raw.split(|b| *b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8(arg.to_vec()).unwrap())
            .collect()
    }

    /// Every file anywhere in the sandbox whose name says an injection ran.
    fn pwned(&self) -> Vec<String> {
        fn walk(dir: &Path, found: &mut Vec<String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.contains("pwned") {
                    found.push(name);
                }
                if entry.file_type().unwrap().is_dir() {
                    walk(&entry.path(), found);
                }
            }
        }
        let mut found = Vec::new();
        walk(self.dir.path(), &mut found);
        found
    }
}

fn write_executable(path: &Path, content: &str) {
    fs::write(path, content).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

fn show(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn hostile_keys_never_appear_in_the_script_and_it_parses() {
    for key in hostile_keys() {
        let script = render_user_data(&job(&key, &"0".repeat(64)), Some("us-east-1"))
            .unwrap()
            .script()
            .to_owned();
        let visible = key.trim_start_matches("in/");
        assert!(
            !script.contains(visible),
            "key {key:?} leaked into the script"
        );
        assert!(
            !script.contains("pwned"),
            "key {key:?} leaked into the script"
        );
        let check = Command::new("bash")
            .args(["-n", "-c", &script])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "bash -n, key {key:?}: {}",
            show(&check)
        );
        assert_eq!(job_from_user_data(&script).unwrap().key, key);
    }
}

#[test]
fn hostile_keys_reach_the_worker_intact_and_are_never_run() {
    let sandbox = Sandbox::new();
    for key in hostile_keys() {
        let spec = job(&key, &sandbox.worker_sha256);
        let user_data = render_user_data(&spec, Some("eu-west-1")).unwrap();
        let output = sandbox.run(user_data.script(), &[]);
        assert!(output.status.success(), "key {key:?}: {}", show(&output));

        let args = sandbox.args("worker-args");
        assert_eq!(args.len(), 4, "{args:?}");
        assert_eq!(args[..3], ["run", "--no-shutdown", "--job"]);
        assert_eq!(JobSpec::decode(&args[3]).unwrap(), spec, "key {key:?}");
        assert!(
            sandbox.path("shutdown-ran").exists(),
            "no shutdown for {key:?}"
        );
        fs::remove_file(sandbox.path("shutdown-ran")).unwrap();
    }
    assert_eq!(
        sandbox.pwned(),
        Vec::<String>::new(),
        "the shell ran part of a key"
    );
}

#[test]
fn the_script_fetches_the_configured_worker_and_logs_to_its_file() {
    let sandbox = Sandbox::new();
    let mut spec = job("in/data.csv", &sandbox.worker_sha256);
    // Operator-configured, yet still only ever data to the shell.
    spec.worker.uri = "s3://artifacts/it's $(touch pwned-uri)/worker".into();
    let output = sandbox.run(
        render_user_data(&spec, Some("eu-west-1")).unwrap().script(),
        &[],
    );
    assert!(output.status.success(), "{}", show(&output));
    let aws = sandbox.args("aws-args");
    assert_eq!(
        aws[..4],
        ["s3", "cp", "--only-show-errors", spec.worker.uri.as_str()]
    );
    assert!(aws[4].ends_with("s3spot-worker.download"), "{aws:?}");
    assert!(sandbox.path("home/s3spot-worker").exists());
    assert_eq!(sandbox.pwned(), Vec::<String>::new());

    let log = fs::read_to_string(sandbox.path("log/s3spot.log")).unwrap();
    assert!(log.contains("worker finished with status 0"), "{log}");
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn an_operator_fetch_command_replaces_the_aws_cli_and_gets_its_arguments_as_data() {
    let sandbox = Sandbox::new();
    std::fs::remove_file(sandbox.path("bin/aws")).unwrap();
    let mut spec = job("in/data.csv", &sandbox.worker_sha256);
    spec.worker.uri = "s3://artifacts/it's $(touch pwned-fetch)".into();
    let fetch = format!(
        "printf '%s\\0' \"$@\" > '{}'; cp '{}' \"$2\"",
        sandbox.path("fetch-args").display(),
        sandbox.path("worker-binary").display()
    );
    let output = sandbox.run(
        render_user_data(&spec, None).unwrap().script(),
        &[("S3SPOT_FETCH_COMMAND", &fetch)],
    );
    assert!(output.status.success(), "{}", show(&output));
    let args = sandbox.args("fetch-args");
    assert_eq!(args[0], spec.worker.uri);
    assert!(args[1].ends_with("s3spot-worker.download"), "{args:?}");
    assert_eq!(sandbox.args("worker-args")[..2], ["run", "--no-shutdown"]);
    assert_eq!(sandbox.pwned(), Vec::<String>::new());
}

#[test]
fn a_worker_with_the_wrong_sha256_is_never_run_and_the_instance_still_shuts_down() {
    let sandbox = Sandbox::new();
    let spec = job("in/data.csv", &"0".repeat(64));
    let output = sandbox.run(render_user_data(&spec, None).unwrap().script(), &[]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("sha256 mismatch"));
    assert!(
        !sandbox.path("worker-args").exists(),
        "the unverified worker ran"
    );
    assert!(!sandbox.path("home/s3spot-worker").exists());
    assert!(sandbox.path("shutdown-ran").exists());
}

#[test]
fn a_failed_download_still_shuts_down() {
    let sandbox = Sandbox::new();
    let spec = job("in/data.csv", &sandbox.worker_sha256);
    let output = sandbox.run(
        render_user_data(&spec, None).unwrap().script(),
        &[("STUB_AWS_FAIL", "1")],
    );
    assert!(!output.status.success(), "{}", show(&output));
    assert!(!sandbox.path("worker-args").exists());
    assert!(sandbox.path("shutdown-ran").exists());
}

#[test]
fn the_workers_exit_status_is_kept_and_the_instance_still_shuts_down() {
    let sandbox = Sandbox::new();
    let spec = job("in/data.csv", &sandbox.worker_sha256);
    let output = sandbox.run(
        render_user_data(&spec, None).unwrap().script(),
        &[("STUB_WORKER_EXIT", "3")],
    );
    assert_eq!(output.status.code(), Some(3), "{}", show(&output));
    assert!(sandbox.path("shutdown-ran").exists());
}

impl Sandbox {
    /// Runs the EC2 script with `worker` as the worker, sends the script a TERM once the worker
    /// has started, and returns the script's exit status and log. The instance shut down.
    fn stopped_once_the_worker_runs(&self, worker: &str) -> (std::process::ExitStatus, String) {
        fs::write(self.path("worker-binary"), worker).unwrap();
        let spec = job("in/data.csv", &hex::encode(Sha256::digest(worker)));
        let mut child =
            self.start_until_worker_runs(render_user_data(&spec, None).unwrap().script(), &[]);
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        // Well before the hard limit (the job's max runtime plus 300 s).
        let status = exit_within(&mut child, 20, "the stop never ended the worker");
        let log = fs::read_to_string(self.path("log/s3spot.log")).unwrap();
        assert!(self.path("shutdown-ran").exists(), "{log}");
        assert!(!log.contains("hard limit"), "{log}");
        (status, log)
    }
}

#[test]
fn a_signal_to_the_script_reaches_the_worker_which_then_finishes_before_the_shutdown() {
    let sandbox = Sandbox::new();
    // A worker that takes its time, notes the TERM, and exits as the real one does after
    // uploading what it has.
    let (status, log) = sandbox.stopped_once_the_worker_runs(
        "#!/bin/sh\ntrap 'echo term > \"$STUB_DIR/worker-got-term\"; sleep 0.2; exit 1' TERM\ntouch \"$STUB_DIR/worker-started\"\nwhile :; do sleep 0.05; done\n",
    );
    assert_eq!(status.code(), Some(1), "the worker's exit status: {log}");
    assert!(
        sandbox.path("worker-got-term").exists(),
        "the TERM reached the worker"
    );
    assert!(log.contains("worker finished with status 1"), "{log}");
}

/// A TERM can reach the worker before it listens for one (the moment it starts), and be lost:
/// the script sends it again until the worker ends.
#[test]
fn a_stop_the_worker_missed_is_sent_again() {
    let sandbox = Sandbox::new();
    // A worker deaf to its first TERM.
    let (status, log) = sandbox.stopped_once_the_worker_runs(
        "#!/bin/sh\ntrap 'echo term >> \"$STUB_DIR/worker-terms\"; [ \"$(wc -l < \"$STUB_DIR/worker-terms\")\" -ge 2 ] && exit 1' TERM\ntouch \"$STUB_DIR/worker-started\"\nwhile :; do sleep 0.05; done\n",
    );
    assert_eq!(status.code(), Some(1), "{log}");
    let terms = fs::read_to_string(sandbox.path("worker-terms")).unwrap();
    assert!(terms.lines().count() >= 2, "{terms}");
}

/// A TERM in the instant after the worker's start, before it can catch one, would end it with
/// no account of the job: the script holds the stop until the worker catches TERM.
#[test]
fn a_stop_waits_until_the_worker_catches_term() {
    let sandbox = Sandbox::new();
    // A worker that takes a second and a half to start listening. (bash: dash blocks every
    // signal while it waits for a command, which reads as "holding TERM back".)
    let (status, log) = sandbox.stopped_once_the_worker_runs(
        "#!/bin/bash\ntouch \"$STUB_DIR/worker-started\"\nsleep 1.5\ntrap 'echo term >> \"$STUB_DIR/worker-terms\"; exit 1' TERM\nwhile :; do sleep 0.05; done\n",
    );
    assert_eq!(status.code(), Some(1), "killed before it listened: {log}");
    assert!(sandbox.path("worker-terms").exists(), "{log}");
}

/// The hard limit catches a worker that hangs even past its own stop: TERM at the limit, KILL
/// `KILL_AFTER_SECS` later, and the instance still shuts down. (The container form takes the
/// limit from its environment, so a test can make it short.)
#[test]
fn a_worker_that_hangs_past_the_hard_limit_is_stopped_then_killed() {
    let sandbox = Sandbox::new();
    let worker = "#!/bin/sh\ntrap 'echo term >> \"$STUB_DIR/worker-terms\"' TERM\ntouch \"$STUB_DIR/worker-started\"\nwhile :; do sleep 0.1; done\n";
    fs::write(sandbox.path("worker-binary"), worker).unwrap();
    let spec = job("in/data.csv", &hex::encode(Sha256::digest(worker)));
    let limit = 3;
    let mut env = container_environment(&spec).unwrap();
    env.iter_mut()
        .find(|(name, _)| name == "S3SPOT_HARD_LIMIT_SECS")
        .unwrap()
        .1 = limit.to_string();
    let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let started = std::time::Instant::now();
    let mut child = sandbox.start_until_worker_runs(&render_container_script(None).unwrap(), &env);
    let status = exit_within(&mut child, limit + KILL_AFTER_SECS + 30, "the hung worker");
    let took = started.elapsed();
    let log = fs::read_to_string(sandbox.path("log/s3spot.log")).unwrap();
    assert_eq!(status.code(), Some(137), "{log}");
    assert_eq!(
        fs::read_to_string(sandbox.path("worker-terms")).unwrap(),
        "term\n",
        "one TERM at the limit"
    );
    assert!(
        log.contains(&format!(
            "worker passed the hard limit of {limit}s; stopping it"
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "worker still running {KILL_AFTER_SECS}s after the hard limit; killing it"
        )),
        "{log}"
    );
    assert!(log.contains("worker finished with status 137"), "{log}");
    assert!(sandbox.path("shutdown-ran").exists());
    assert!(
        took >= std::time::Duration::from_secs(limit + KILL_AFTER_SECS),
        "took {took:?}"
    );
}

#[test]
fn rendering_is_deterministic() {
    let spec = job("in/$(x).csv", &"ab".repeat(32));
    let first = render_user_data(&spec, Some("us-east-1")).unwrap();
    for _ in 0..3 {
        assert_eq!(
            render_user_data(&spec.clone(), Some("us-east-1")).unwrap(),
            first
        );
    }
    let mut next_attempt = spec.clone();
    next_attempt.attempt = 2;
    assert_ne!(
        render_user_data(&next_attempt, Some("us-east-1")).unwrap(),
        first
    );
}

#[test]
fn user_data_over_16_kib_is_refused_with_the_limit_named() {
    let mut spec = job("in/data.csv", &"ab".repeat(32));
    spec.command = Some("x".repeat(MAX_USER_DATA_BYTES));
    let err = render_user_data(&spec, None).unwrap_err();
    assert!(
        matches!(err, RenderError::TooLarge { size, limit: MAX_USER_DATA_BYTES } if size > MAX_USER_DATA_BYTES)
    );
    assert!(err.to_string().contains("16384 bytes"), "{err}");

    // The limit is on the script, not on its base64 (which is a third larger).
    let base = render_user_data(&job("in/data.csv", &"ab".repeat(32)), None)
        .unwrap()
        .script()
        .len();
    let mut fits = job("in/data.csv", &"ab".repeat(32));
    // The command is base64 inside the JSON: 3 bytes of command become 4 bytes of script.
    fits.command = Some("x".repeat((MAX_USER_DATA_BYTES - base) / 4 * 3 - 120));
    let user_data = render_user_data(&fits, None).unwrap();
    assert!(user_data.script().len() <= MAX_USER_DATA_BYTES);
    assert!(user_data.to_base64().len() > MAX_USER_DATA_BYTES);
}

#[test]
fn a_nul_byte_in_an_operator_value_is_an_error_not_a_truncated_script() {
    let mut spec = job("in/data.csv", &"ab".repeat(32));
    spec.worker.uri = "s3://artifacts/w\u{0}rker".into();
    let err = render_user_data(&spec, None).unwrap_err();
    let chain = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ");
    assert!(chain.contains("cannot shell-quote"), "{chain}");
}

/// The template's own rule: every value that is not a number passes through `shell_quote`.
#[test]
fn every_template_expression_is_a_number_or_shell_quoted() {
    let template = include_str!("../bootstrap.sh.tera");
    let numbers = [
        "attempt",
        "max_runtime_secs",
        "hard_limit_secs",
        "kill_after_secs",
    ];
    let mut expressions = 0;
    for expression in template.split("{{").skip(1) {
        let expression = expression.split("}}").next().unwrap().trim();
        expressions += 1;
        assert!(
            numbers.contains(&expression) || expression.ends_with("| shell_quote"),
            "unquoted template expression: {{{{ {expression} }}}}"
        );
    }
    assert!(expressions >= 6, "found only {expressions} expressions");
}
