//! `--run-as`: the worker (root) does the S3 I/O; the command runs as an unprivileged user that
//! sees its own directory and nothing else of the worker's. These tests start the worker as root
//! (the test command runs as root, as the bootstrap does on EC2), in mount and PID namespaces of
//! their own, with a user they add there: the worker kills every process of that user.

mod common;

use std::os::unix::fs::PermissionsExt as _;

use common::{Fixture, UPLOAD, show};
use s3spot_bootstrap::State;

const USER: &str = "s3spot-test-job";

/// The test's user, added in the test's own /etc.
fn add_user() {
    let output = std::process::Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", USER])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));
}

/// A fixture whose directories the command's user may pass through, as it may /var/tmp.
fn fixture() -> Fixture {
    add_user();
    let fixture = Fixture::new();
    std::fs::set_permissions(fixture.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(
        fixture.dir.path().join("work"),
        std::fs::Permissions::from_mode(0o1777),
    )
    .unwrap();
    fixture
}

fn uid_of(name: &str) -> u32 {
    nix::unistd::User::from_name(name)
        .unwrap()
        .unwrap()
        .uid
        .as_raw()
}

/// Processes whose command line is exactly `words`.
fn processes_running(words: &[&str]) -> usize {
    let wanted: Vec<u8> = words
        .iter()
        .flat_map(|w| [w.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| std::fs::read(entry.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| *cmdline == wanted)
        .count()
}

#[test]
fn the_command_runs_as_the_user_and_reaches_only_its_own_directory() {
    if !common::in_namespaces(
        "the_command_runs_as_the_user_and_reaches_only_its_own_directory",
        false,
    ) {
        return;
    }
    let fixture = fixture();
    fixture.put("data", "in/data.csv", b"a,b\n1,2\n");
    let root = fixture.dir.path();
    // Files of the worker's that the command must not read: one beside the work directories,
    // and another job's work directory.
    let secret = root.join("secret");
    std::fs::write(&secret, "root only\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let other_job = root.join("work/s3spot-job-other");
    std::fs::create_dir(&other_job).unwrap();
    std::fs::set_permissions(&other_job, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(other_job.join("input.csv"), "another job's\n").unwrap();

    let command = format!(
        r#"
        out="$S3SPOT_OUTPUT_DIR"
        id -u > "$out/uid"
        id -G > "$out/groups"
        env | cut -d= -f1 | sort > "$out/env"
        pwd > "$out/pwd"
        echo scratch > in-the-working-directory && echo yes > "$out/cwd-writable"
        gzip "$S3SPOT_INPUT" && echo yes > "$out/input-reworked"
        leak() {{ echo "$1" >> "$out/leaks"; }}
        for file in {secret} {other}/input.csv ../stdout.log; do
          cat "$file" > /dev/null 2>&1 && leak "read $file"
        done
        ls .. > /dev/null 2>&1 && leak "listed the work directory"
        touch ../planted 2> /dev/null && leak "wrote into the work directory"
        ln -s {secret} "$out/link-to-secret"
        ln {secret} "$out/hard-link-to-secret" 2> /dev/null
        setsid sleep 31337 > /dev/null 2>&1 < /dev/null &
        echo done
        "#,
        secret = secret.display(),
        other = other_job.display(),
    );
    let job = fixture.job("in/data.csv", Some(&command));
    let output = fixture.run_job(&job, &[("S3SPOT_RUN_AS", USER.to_owned())]);
    assert!(output.status.success(), "{}", show(&output));

    let prefix = format!("analysis/in/data.csv/{UPLOAD}/");
    let status = fixture.status("data", &prefix);
    assert_eq!(status.state, State::Succeeded, "{status:#?}");
    let text = |name: &str| fixture.text("data", &format!("{prefix}{name}"));
    let nobody = uid_of(USER);
    assert_eq!(text("uid").trim(), nobody.to_string());
    let gid = nix::unistd::User::from_name(USER).unwrap().unwrap().gid;
    assert_eq!(
        text("groups").trim(),
        gid.to_string(),
        "no supplementary group of root's"
    );
    let env = text("env");
    assert!(
        !env.lines().any(|name| name.starts_with("AWS_")),
        "no AWS variable of the worker's reaches the command: {env}"
    );
    assert!(env.lines().any(|name| name == "S3SPOT_INPUT"), "{env}");
    assert!(text("pwd").trim().ends_with("/job"), "{}", text("pwd"));
    assert_eq!(text("cwd-writable").trim(), "yes");
    assert_eq!(text("input-reworked").trim(), "yes");
    let keys = fixture.keys("data", &prefix);
    assert!(
        !keys.iter().any(|key| key.ends_with("/leaks")),
        "the command read or wrote what it must not: {}",
        fixture.text("data", &format!("{prefix}leaks"))
    );
    assert!(
        !keys.iter().any(|key| key.contains("secret")),
        "a link to a file the command may not read is not published: {keys:?}"
    );
    assert_eq!(text("stdout.log").trim(), "done");
    assert_eq!(
        processes_running(&["sleep", "31337"]),
        0,
        "a process the command left behind, outside its group, is killed with the job"
    );
}

#[test]
fn a_file_the_user_does_not_own_is_not_published() {
    if !common::in_namespaces("a_file_the_user_does_not_own_is_not_published", false) {
        return;
    }
    add_user();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mine"), "x").unwrap();
    std::fs::write(dir.path().join("roots"), "x").unwrap();
    let nobody = uid_of(USER);
    std::os::unix::fs::chown(dir.path().join("mine"), Some(nobody), None).unwrap();
    let names: Vec<String> = s3spot_worker::upload::files_under(dir.path(), Some(nobody))
        .unwrap()
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    assert_eq!(names, ["mine"]);
    let all = s3spot_worker::upload::files_under(dir.path(), None).unwrap();
    assert_eq!(all.len(), 2, "without a user, every regular file goes");
}

#[test]
fn a_bad_run_as_is_refused_before_any_work_with_what_to_do() {
    if !common::in_namespaces(
        "a_bad_run_as_is_refused_before_any_work_with_what_to_do",
        false,
    ) {
        return;
    }
    let fixture = fixture();
    fixture.put("data", "in/data.csv", b"a,b\n");
    let job = fixture.job("in/data.csv", Some("true"));
    for (user, says) in [
        (
            "s3spot-no-such-user",
            "useradd --system s3spot-no-such-user",
        ),
        ("root", "must run as an unprivileged user"),
    ] {
        let output = fixture.run_job(&job, &[("S3SPOT_RUN_AS", user.to_owned())]);
        assert_eq!(output.status.code(), Some(2), "{user}: {}", show(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{user}: {stderr}");
    }
    // Started as a user that cannot switch users.
    let worker = fixture.command(&["run", "--job", &job.encode(), "--run-as", USER], &[]);
    let user = nix::unistd::User::from_name(USER).unwrap().unwrap();
    let output = std::process::Command::new("setpriv")
        .arg(format!("--reuid={}", user.uid))
        .arg(format!("--regid={}", user.gid))
        .args(["--clear-groups", "--"])
        .arg(worker.get_program())
        .args(worker.get_args())
        .env_clear()
        .envs(
            worker
                .get_envs()
                .filter_map(|(name, value)| Some((name, value?))),
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("only root can start the command as another user"),
        "{stderr}"
    );
}

#[test]
fn without_a_command_the_workers_own_report_is_published() {
    if !common::in_namespaces(
        "without_a_command_the_workers_own_report_is_published",
        false,
    ) {
        return;
    }
    let fixture = fixture();
    fixture.put("data", "in/data.csv", b"a,b\n1,2\n");
    let job = fixture.job("in/data.csv", None);
    let output = fixture.run_job(&job, &[("S3SPOT_RUN_AS", USER.to_owned())]);
    assert!(output.status.success(), "{}", show(&output));
    let prefix = format!("analysis/in/data.csv/{UPLOAD}/");
    assert_eq!(fixture.status("data", &prefix).state, State::Succeeded);
    let report: serde_json::Value =
        serde_json::from_str(&fixture.text("data", &format!("{prefix}report.json"))).unwrap();
    assert_eq!(report["table"]["rows"], 1, "{report}");
}
