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

/// Set in the copy of this test binary that runs inside the namespaces.
const IN_NAMESPACES: &str = "S3SPOT_TEST_IN_NAMESPACES";

/// On EC2 the script makes the command's user and keeps it away from IMDS. That changes the
/// machine (a user, a firewall rule, IMDS's address), so the test runs again in network and mount
/// namespaces of its own: a loopback holding 169.254.169.254, and a private copy of /etc.
#[test]
fn on_ec2_the_command_runs_as_its_own_user_and_cannot_reach_imds() {
    if std::env::var_os(IN_NAMESPACES).is_none() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test makes a network namespace, a user and firewall rules; run the test command \
             as root"
        );
        let name = "on_ec2_the_command_runs_as_its_own_user_and_cannot_reach_imds";
        let output = Command::new("unshare")
            .args(["--net", "--mount", "--fork", "--"])
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
        return;
    }
    inside_namespaces();
}

fn sh(script: &str) {
    let output = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(output.status.success(), "{script}: {}", show(&output));
}

fn inside_namespaces() {
    sh("ip link set lo up && ip addr add 169.254.169.254/32 dev lo");
    let etc = tempfile::tempdir().unwrap();
    sh(&format!(
        "cp -a /etc/. '{0}' && mount --bind '{0}' /etc",
        etc.path().display()
    ));
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
    // Debian has no dnf; this one records that it was asked, and installs nothing.
    std::fs::write(
        bin.join("dnf"),
        format!(
            "#!/bin/sh\necho \"$@\" >> '{}'\nexit 1\n",
            fixture.dir.path().join("dnf-calls").display()
        ),
    )
    .unwrap();
    for tool in ["aws", "dnf"] {
        std::fs::set_permissions(bin.join(tool), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
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
        sh("nft flush ruleset");
        // The system's tools, less the hidden ones: /usr/sbin is left out of PATH, and a folder
        // of links stands for it.
        let sbin = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir("/usr/sbin").unwrap() {
            let name = entry.unwrap().file_name();
            if !hidden.iter().any(|tool| name == *tool) {
                std::os::unix::fs::symlink(
                    Path::new("/usr/sbin").join(&name),
                    sbin.path().join(&name),
                )
                .unwrap();
            }
        }
        let _ = std::fs::remove_file(&log);
        let mut command = Command::new("bash");
        command
            .args(["-c", script.script()])
            .env_clear()
            .env(
                "PATH",
                format!(
                    "{}:{}:/usr/local/bin:/usr/bin",
                    bin.display(),
                    sbin.path().display()
                ),
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

    // Without either tool, the script asks dnf for nftables; when that fails, it says plainly
    // what the command can reach. The command's own view proves the check above can fail.
    let (imds_seen, log_text) = run("in/neither.csv", &["nft", "iptables", "ip6tables"]);
    assert_eq!(imds_seen.trim(), "reachable", "{log_text}");
    assert!(
        log_text.contains("WARNING: this image has neither nft nor iptables"),
        "{log_text}"
    );
    let dnf = std::fs::read_to_string(fixture.dir.path().join("dnf-calls")).unwrap();
    assert_eq!(dnf.trim(), "install --assumeyes --quiet nftables");
}
