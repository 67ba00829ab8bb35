//! The bootstrap script and the worker together: the script as rendered for EC2, with only the
//! AWS CLI stubbed (it "downloads" this build's worker), runs a job against s3s-fs. The script and
//! the worker agree on the flags, and the machine is shut down exactly once in all.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

use common::{Fixture, show};
use s3spot_bootstrap::{State, render_user_data};
use sha2::{Digest as _, Sha256};

#[test]
fn the_rendered_script_runs_the_real_worker_and_shuts_down_once() {
    let fixture = Fixture::new();
    fixture.put("data", "in/data.csv", b"a,b\n1,2\n");
    let worker = env!("CARGO_BIN_EXE_s3spot-worker");
    let bin = fixture.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let aws = bin.join("aws");
    std::fs::write(&aws, format!("#!/bin/sh\ncp '{worker}' \"$5\"\n")).unwrap();
    std::fs::set_permissions(&aws, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut job = fixture.job(
        "in/data.csv",
        Some(r#"wc -c < "$S3SPOT_INPUT" > "$S3SPOT_OUTPUT_DIR/bytes""#),
    );
    job.worker.sha256 = hex::encode(Sha256::digest(std::fs::read(worker).unwrap()));
    let script = render_user_data(&job, Some("us-east-1")).unwrap();

    let mut command = Command::new("bash");
    command
        .args(["-c", script.script()])
        .env_clear()
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("S3SPOT_HOME", fixture.dir.path().join("home"))
        .env("S3SPOT_LOG", fixture.dir.path().join("s3spot.log"))
        .env("S3SPOT_RUN_AS", "")
        .env(
            "S3SPOT_SHUTDOWN_COMMAND",
            format!("echo shutdown >> '{}'", fixture.shutdown_log().display()),
        )
        .env("S3SPOT_WORK_DIR", fixture.dir.path().join("work"));
    for (name, value) in fixture.s3.env() {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", show(&output));
    let status = fixture.status(
        "data",
        "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/",
    );
    assert_eq!(status.state, State::Succeeded);
    assert_eq!(
        fixture
            .text(
                "data",
                "analysis/in/data.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/bytes"
            )
            .trim(),
        "8"
    );
    assert_eq!(
        fixture.shutdowns(),
        1,
        "the script shuts down; the worker, told so, does not"
    );
    let log = std::fs::read_to_string(fixture.dir.path().join("s3spot.log")).unwrap();
    assert!(
        log.contains("job finished"),
        "the worker's log is in the bootstrap log: {log}"
    );
}

/// On EC2 the script makes the command's user and keeps it away from IMDS. That changes the
/// machine (a user, a firewall rule, IMDS's address), so the test runs again in namespaces of its
/// own: a network with a loopback that holds 169.254.169.254, a private /etc, and its own PIDs
/// (the worker kills every process of the command's user, whose uid may be someone else's here).
#[test]
fn on_ec2_the_command_runs_as_its_own_user_and_cannot_reach_imds() {
    if common::in_namespaces(
        "on_ec2_the_command_runs_as_its_own_user_and_cannot_reach_imds",
        true,
    ) {
        inside_namespaces();
    }
}

/// Removes whatever a run of the bootstrap blocked IMDS with, whichever way it did.
const UNBLOCK: &str = "nft flush ruleset; iptables -F OUTPUT || true; ip6tables -F OUTPUT || true; \
    ip rule del pref 100 2> /dev/null || true; ip route flush table 7100 || true; \
    ip -6 rule del pref 100 2> /dev/null || true; ip -6 route flush table 7100 2> /dev/null || true";

fn sh(script: &str) {
    let output = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(output.status.success(), "{script}: {}", show(&output));
}

fn inside_namespaces() {
    sh("ip link set lo up && ip addr add 169.254.169.254/32 dev lo");
    // On EC2 the metadata address is not the instance's own: routing rules, not the local
    // table, decide its packets. Here it is on loopback, so the local table moves after the
    // place the bootstrap's rule takes.
    sh("ip rule del pref 0 table local && ip rule add pref 200 table local");
    let _imds = s3spot_tests::FakeImds::start_on("169.254.169.254:80".parse().unwrap());

    let fixture = Fixture::new();
    std::fs::set_permissions(fixture.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let worker = env!("CARGO_BIN_EXE_s3spot-worker");
    let bin = fixture.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(
        bin.join("aws"),
        format!("#!/bin/sh\ncp '{worker}' \"$5\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(bin.join("aws"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = fixture.dir.path().join("home");
    let log = fixture.dir.path().join("s3spot.log");
    let command = format!(
        r#"
        out="$S3SPOT_OUTPUT_DIR"
        id -un > "$out/user"
        if bash -c 'exec 3<> /dev/tcp/169.254.169.254/80' 2> /dev/null; then
          echo reachable > "$out/imds"
        else
          echo blocked > "$out/imds"
        fi
        for file in {home}/s3spot-worker {log}; do
          cat "$file" > /dev/null 2>&1 && echo "read $file" >> "$out/leaks"
        done
        ls {home} > /dev/null 2>&1 && echo "listed {home}" >> "$out/leaks"
        true
        "#,
        home = home.display(),
        log = log.display(),
    );
    // Runs the script as cloud-init would, with S3SPOT_RUN_AS unset, for an object of its own;
    // returns what the command found about IMDS, and the bootstrap log.
    let run = |key: &str, hidden: &[&str]| -> (String, String) {
        fixture.put("data", key, b"a,b\n1,2\n");
        let mut job = fixture.job(key, Some(&command));
        job.worker.sha256 = hex::encode(Sha256::digest(std::fs::read(worker).unwrap()));
        let script = render_user_data(&job, Some("us-east-1")).unwrap();
        let prefix = format!("analysis/{key}/{}/", common::UPLOAD);
        sh(UNBLOCK);
        // The system's tools, less the hidden ones: PATH holds a folder of links to them, and
        // not the system's own folders.
        let tools = tempfile::tempdir().unwrap();
        for dir in ["/usr/sbin", "/usr/bin"] {
            for entry in std::fs::read_dir(dir).unwrap() {
                let name = entry.unwrap().file_name();
                let link = tools.path().join(&name);
                if !hidden.iter().any(|tool| name == *tool) && link.symlink_metadata().is_err() {
                    std::os::unix::fs::symlink(Path::new(dir).join(&name), link).unwrap();
                }
            }
        }
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new("bash");
        command
            .args(["-c", script.script()])
            .env_clear()
            .env(
                "PATH",
                format!("{}:{}", bin.display(), tools.path().display()),
            )
            .env("S3SPOT_HOME", &home)
            .env("S3SPOT_LOG", &log)
            .env("S3SPOT_SHUTDOWN_COMMAND", "true")
            .env("S3SPOT_WORK_DIR", "/var/tmp");
        // IMDS at its own address, as on EC2.
        for (name, value) in fixture.s3.env() {
            if name != "AWS_EC2_METADATA_DISABLED" {
                command.env(name, value);
            }
        }
        let output = command.output().unwrap();
        let log_text = std::fs::read_to_string(&log).unwrap();
        assert!(output.status.success(), "{}\n{log_text}", show(&output));
        let status = fixture.status("data", &prefix);
        assert_eq!(status.state, State::Succeeded, "{status:#?}\n{log_text}");
        assert_eq!(
            status.instance.and_then(|i| i.id).as_deref(),
            Some(s3spot_tests::imds::INSTANCE_ID),
            "the worker, root, still reads IMDS"
        );
        assert_eq!(
            fixture.text("data", &format!("{prefix}user")).trim(),
            "s3spot-job"
        );
        assert!(
            fixture.get("data", &format!("{prefix}leaks")).is_none(),
            "{}",
            fixture.text("data", &format!("{prefix}leaks"))
        );
        let mode = std::fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o077,
            0,
            "the bootstrap log is root's alone: {mode:o}"
        );
        (fixture.text("data", &format!("{prefix}imds")), log_text)
    };

    let (imds_seen, log_text) = run("in/nft.csv", &[]);
    assert_eq!(imds_seen.trim(), "blocked", "{log_text}");
    assert!(log_text.contains("nftables rejects uid"), "{log_text}");

    let (imds_seen, log_text) = run("in/iptables.csv", &["nft"]);
    assert_eq!(
        imds_seen.trim(),
        "blocked",
        "with iptables alone: {log_text}"
    );
    assert!(log_text.contains("iptables rejects uid"), "{log_text}");

    let (imds_seen, log_text) = run("in/ip.csv", &["nft", "iptables", "ip6tables"]);
    assert_eq!(
        imds_seen.trim(),
        "blocked",
        "with iproute alone: {log_text}"
    );
    assert!(
        log_text.contains("a routing rule forbids uid"),
        "{log_text}"
    );

    // With none of them, the script says plainly what the command can reach. The command's own
    // view proves that the checks above can fail.
    let (imds_seen, log_text) = run("in/none.csv", &["nft", "iptables", "ip6tables", "ip"]);
    assert!(
        !log_text.contains("S3SPOT_IMDS_BLOCKED"),
        "nothing blocked, nothing for the worker to check"
    );
    assert_eq!(imds_seen.trim(), "reachable", "{log_text}");
    assert!(
        log_text.contains("WARNING: this image has none of nft, iptables and ip"),
        "{log_text}"
    );

    // A block that the bootstrap made and something then removed (a network manager that
    // deletes rules it did not make): the worker checks before the command runs, and refuses.
    sh(UNBLOCK);
    fixture.put("data", "in/unblocked.csv", b"a\n");
    let job = fixture.job(
        "in/unblocked.csv",
        Some("echo ran > \"$S3SPOT_OUTPUT_DIR/ran\""),
    );
    let output = fixture.run_job(
        &job,
        &[
            ("S3SPOT_RUN_AS", "s3spot-job".to_owned()),
            ("S3SPOT_IMDS_BLOCKED", "1".to_owned()),
        ],
    );
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let prefix = format!("analysis/in/unblocked.csv/{}/", common::UPLOAD);
    let status = fixture.status("data", &prefix);
    assert_eq!(status.state, State::Failed);
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("can reach the instance metadata service")),
        "{status:#?}"
    );
    assert!(
        fixture.get("data", &format!("{prefix}ran")).is_none(),
        "the command never ran"
    );
}

/// The AWS Batch job definition's command, run with bash as the container runs it, in a
/// network namespace of its own that stands for a Batch host: the host's firewall
/// (`infra/batch-host-firewall.sh`, the launch template's user data) applied, IMDS at
/// 169.254.169.254 and the ECS credentials endpoint at 169.254.170.2, where a task with a job
/// role finds them. The job comes only in the environment the launcher submits it with; there
/// is no AWS CLI (the stock image has none), so the worker is fetched with curl's SigV4 signing
/// and the container's credentials, which the S3 server checks; the command runs as `nobody`.
#[test]
fn the_batch_command_fetches_the_worker_with_curl_and_runs_the_job_from_its_environment() {
    if common::in_namespaces(
        "the_batch_command_fetches_the_worker_with_curl_and_runs_the_job_from_its_environment",
        true,
    ) {
        batch_command_inside_namespaces();
    }
}

/// The system's tools less `hidden`: a folder of links to them, for a PATH without the rest.
fn tools_without(hidden: &[&str]) -> tempfile::TempDir {
    let tools = tempfile::tempdir().unwrap();
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name();
            let link = tools.path().join(&name);
            if !hidden.iter().any(|tool| name == *tool) && link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new(dir).join(&name), link).unwrap();
            }
        }
    }
    tools
}

/// The container of a Batch job, as far as the command sees it: the job definition's command
/// (which starts its script, `S3SPOT_BOOTSTRAP_SCRIPT`) under bash, with what ECS gives a task
/// with a job role (its credentials' address), the job definition's environment, and the job's.
struct Container {
    script: String,
    tools: tempfile::TempDir,
    home: std::path::PathBuf,
    log: std::path::PathBuf,
    /// The credentials' variable and its value.
    credentials: (&'static str, String),
    endpoint: String,
}

/// A change to a job's environment before its container starts.
type Edit<'a> = &'a dyn Fn(&mut Vec<(String, String)>);

impl Container {
    fn new(fixture: &Fixture, credentials: (&'static str, String)) -> Container {
        Container {
            script: s3spot_bootstrap::render_container_script(None).unwrap(),
            // The stock image has no AWS CLI.
            tools: tools_without(&["aws"]),
            home: fixture.dir.path().join("home"),
            log: fixture.dir.path().join("s3spot.log"),
            credentials,
            endpoint: fixture
                .s3
                .env()
                .into_iter()
                .find(|(name, _)| *name == "AWS_ENDPOINT_URL")
                .unwrap()
                .1,
        }
    }

    fn command(&self, job: &s3spot_bootstrap::JobSpec, edit: Edit<'_>) -> Command {
        let mut environment = s3spot_bootstrap::container_environment(job).unwrap();
        edit(&mut environment);
        let _ = std::fs::remove_file(&self.log);
        let mut command = Command::new("bash");
        command
            // The job definition's command, as the template has it.
            .args([
                "-c",
                "exec bash -c \"$S3SPOT_BOOTSTRAP_SCRIPT\" s3spot-batch",
            ])
            .env_clear()
            .env("S3SPOT_BOOTSTRAP_SCRIPT", &self.script)
            .env("PATH", self.tools.path())
            .env("S3SPOT_HOME", &self.home)
            .env("S3SPOT_LOG", &self.log)
            .env("S3SPOT_WORK_DIR", "/var/tmp")
            .env(self.credentials.0, &self.credentials.1)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_S3", &self.endpoint)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_BATCH_JOB_ATTEMPT", "1")
            .envs(environment);
        command
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn batch_command_inside_namespaces() {
    // The host: IMDS and the ECS credentials endpoint at their own addresses, and the firewall
    // the launch template's user data sets up.
    sh(
        "ip link set lo up && ip addr add 169.254.169.254/32 dev lo && ip addr add 169.254.170.2/32 dev lo",
    );
    let _imds = s3spot_tests::FakeImds::start_on("169.254.169.254:80".parse().unwrap());
    let credentials = s3spot_tests::ContainerCredentials::start_on(
        "169.254.170.2:80".parse().unwrap(),
        s3spot_tests::ACCESS_KEY,
        s3spot_tests::SECRET_KEY,
    );
    let firewall = s3spot_tests::workspace_root().join("infra/batch-host-firewall.sh");
    let output = Command::new("bash").arg(&firewall).output().unwrap();
    assert!(output.status.success(), "{}", show(&output));

    let fixture = Fixture::new();
    std::fs::set_permissions(fixture.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let worker = env!("CARGO_BIN_EXE_s3spot-worker");
    let worker_bytes = std::fs::read(worker).unwrap();
    fixture.put("results", "workers/abc/s3spot-worker", &worker_bytes);
    let container = Container::new(
        &fixture,
        (
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            s3spot_tests::ContainerCredentials::RELATIVE_URI.to_owned(),
        ),
    );
    let job = |key: &str, command: &str| {
        fixture.put("data", key, b"a,b\n1,2\n");
        let mut job = fixture.job(key, Some(command));
        job.worker.uri = "s3://results/workers/abc/s3spot-worker".into();
        job.worker.sha256 = hex::encode(Sha256::digest(&worker_bytes));
        job
    };
    // What the command can reach, written to its outputs.
    let probe = r#"
        out="$S3SPOT_OUTPUT_DIR"
        id -un > "$out/user"
        wc -c < "$S3SPOT_INPUT" > "$out/bytes"
        for address in 169.254.169.254 169.254.170.2; do
          if bash -c "exec 3<> /dev/tcp/$address/80" 2> /dev/null; then
            echo "reachable $address" >> "$out/reach"
          else
            echo "blocked $address" >> "$out/reach"
          fi
        done
        env > "$out/env"
        "#;
    // Runs the command for `key`, as Batch would with the job's environment overrides; `edit`
    // changes that environment first. Returns the output and the bootstrap log.
    let run = |key: &str, edit: Edit<'_>| {
        let job = job(key, probe);
        let output = container.command(&job, edit).output().unwrap();
        (output, container.log())
    };

    let (output, log_text) = run("in/batch.csv", &|_| {});
    assert!(output.status.success(), "{}\n{log_text}", show(&output));
    let prefix = format!("analysis/in/batch.csv/{}/", common::UPLOAD);
    let status = fixture.status("data", &prefix);
    assert_eq!(status.state, State::Succeeded, "{status:#?}\n{log_text}");
    assert_eq!(fixture.text("data", &format!("{prefix}bytes")).trim(), "8");
    assert_eq!(
        fixture.text("data", &format!("{prefix}user")).trim(),
        "nobody",
        "the command runs as another user than the worker"
    );
    assert_eq!(
        fixture.text("data", &format!("{prefix}reach")),
        "blocked 169.254.169.254\nblocked 169.254.170.2\n",
        "the host's firewall keeps the command from IMDS and the ECS credentials"
    );
    let command_env = fixture.text("data", &format!("{prefix}env"));
    assert!(
        !command_env.contains("AWS_CONTAINER_CREDENTIALS") && !command_env.contains("S3SPOT_JOB="),
        "the command's environment names no credentials: {command_env}"
    );
    assert_eq!(
        status.instance.and_then(|i| i.id).as_deref(),
        Some(s3spot_tests::imds::INSTANCE_ID),
        "the worker, root, still reads IMDS (who it runs on, spot notices)"
    );
    assert!(
        log_text.contains("fetching the worker from s3://results/workers/abc/s3spot-worker"),
        "{log_text}"
    );
    assert!(
        !log_text.contains(s3spot_tests::SECRET_KEY) && !log_text.contains("session-token"),
        "no credential reaches the log: {log_text}"
    );
    assert!(
        credentials.requests() >= 2,
        "the script's fetch and the worker both took the container's credentials"
    );

    // Without the host's firewall, the worker's check finds IMDS in reach of the command's
    // user, and refuses to run the command.
    sh("nft flush ruleset");
    let (output, log_text) = run("in/unblocked.csv", &|_| {});
    assert!(!output.status.success(), "{log_text}");
    let status = fixture.status(
        "data",
        &format!("analysis/in/unblocked.csv/{}/", common::UPLOAD),
    );
    assert_eq!(status.state, State::Failed, "{status:#?}");
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("can reach the instance metadata service")),
        "{status:#?}"
    );
    let output = Command::new("bash").arg(&firewall).output().unwrap();
    assert!(output.status.success(), "{}", show(&output));

    // The job is data: a hostile key reaches the worker intact through the environment.
    let hostile = "in/$(touch /tmp/pwned-batch)`id`;'\"\n.csv";
    let (output, log_text) = run(hostile, &|_| {});
    assert!(output.status.success(), "{}\n{log_text}", show(&output));
    assert!(!Path::new("/tmp/pwned-batch").exists());
    let status = fixture.status("data", &format!("analysis/{hostile}/{}/", common::UPLOAD));
    assert_eq!(status.state, State::Succeeded, "{status:#?}");

    // A worker that is not the one named is never run.
    let (output, log_text) = run("in/wrong-sha.csv", &|env| {
        env.iter_mut()
            .find(|(name, _)| name == "S3SPOT_WORKER_SHA256")
            .unwrap()
            .1 = "0".repeat(64);
    });
    assert!(!output.status.success());
    assert!(log_text.contains("worker sha256 mismatch"), "{log_text}");

    // The container runtime's SIGTERM (TerminateJob, a spot host drained, Batch's timeout) is
    // the interruption notice on Batch: the worker stops the command and records the stop.
    let stopped = job(
        "in/stopped.csv",
        "touch \"$S3SPOT_OUTPUT_DIR/started\"; sleep 120",
    );
    let mut child = container
        .command(&stopped, &|_| {})
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !container.log().contains("running the worker") {
        assert!(started.elapsed().as_secs() < 60, "the worker never started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Time for the worker to fetch the input and start the command.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let signalled = std::time::Instant::now();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            signalled.elapsed().as_secs() < 45,
            "the worker did not stop on the container's SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let log_text = container.log();
    assert!(!exit.success(), "{log_text}");
    let status = fixture.status(
        "data",
        &format!("analysis/in/stopped.csv/{}/", common::UPLOAD),
    );
    assert_eq!(status.state, State::Interrupted, "{status:#?}\n{log_text}");
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("SIGTERM")),
        "{status:#?}"
    );

    // A container started without a job says which variable is missing.
    let (output, log_text) = run("in/no-job.csv", &|env| {
        env.retain(|(name, _)| name != "S3SPOT_JOB");
    });
    assert!(!output.status.success());
    assert!(log_text.contains("S3SPOT_JOB is not set"), "{log_text}");
}

/// The signature is checked: with credentials S3 does not know, the fetch fails and nothing
/// runs. (It proves the test above could fail.)
#[test]
fn the_batch_command_refuses_to_run_without_a_worker_it_could_fetch() {
    let fixture = Fixture::new();
    let worker = b"#!/bin/sh\necho ran > \"$0.ran\"\n";
    fixture.put("results", "workers/abc/s3spot-worker", worker);
    let credentials = s3spot_tests::ContainerCredentials::start("someone-else", "wrong-secret");
    let container = Container::new(
        &fixture,
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", credentials.uri()),
    );
    let mut job = fixture.job("in/x.csv", None);
    job.worker.uri = "s3://results/workers/abc/s3spot-worker".into();
    // The right sha256: only the signature stands between the script and the worker.
    job.worker.sha256 = hex::encode(Sha256::digest(worker));
    let output = container
        .command(&job, &|_| {})
        .env("S3SPOT_RUN_AS", "")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let log_text = container.log();
    assert!(!output.status.success(), "{log_text}");
    assert!(credentials.requests() >= 1, "{log_text}");
    assert!(
        log_text.contains("403"),
        "S3 refused the signature: {log_text}"
    );
    assert!(!log_text.contains("running the worker"), "{log_text}");
    assert!(
        !container.home.join("s3spot-worker.ran").exists(),
        "{log_text}"
    );
}
