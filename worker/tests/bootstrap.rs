//! The bootstrap script and the worker together: the script as rendered for EC2, with only the
//! AWS CLI stubbed (it "downloads" this build's worker), runs a job against s3s-fs. The script and
//! the worker agree on the flags, and the machine is shut down exactly once in all.

mod common;

use std::os::unix::fs::PermissionsExt as _;
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
