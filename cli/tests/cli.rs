//! The `s3spot` binary, run the way a person runs it.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use s3spot_tests::{Moto, create_launch_template, events_dir, s3spot_env, show};
use serde_json::Value;

/// `s3spot` with a clean environment: only what the test passes.
fn s3spot(args: &[&str], env: &[(&str, String)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_s3spot"));
    command.args(args).env_clear();
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

fn run(args: &[&str], env: &[(&str, String)]) -> Output {
    s3spot(args, env).output().unwrap()
}

fn event_path(name: &str) -> String {
    events_dir().join(name).display().to_string()
}

fn stdout_json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", show(output)))
}

/// A moto EC2 with the launch template, and the environment for `s3spot` to use it.
struct Ec2 {
    _moto: Moto,
    runtime: tokio::runtime::Runtime,
    client: aws_sdk_ec2::Client,
    env: Vec<(&'static str, String)>,
}

impl Ec2 {
    fn start() -> Ec2 {
        let moto = Moto::start();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let client = runtime.block_on(async {
            let client = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
            create_launch_template(&client, "s3spot-worker").await;
            moto.create_buckets(&["example-bucket", "data"]).await;
            client
        });
        let mut env = job_env();
        env.extend(moto.env());
        Ec2 {
            _moto: moto,
            runtime,
            client,
            env,
        }
    }
}

fn job_env() -> Vec<(&'static str, String)> {
    s3spot_env("s3spot-worker")
}

#[test]
fn render_shows_the_job_and_script_without_any_aws_access() {
    // No credentials, no region, no endpoint: render must not need them.
    let output = run(
        &[
            "render",
            "--event",
            &event_path("hostile-key.json"),
            "--json",
        ],
        &job_env(),
    );
    assert!(output.status.success(), "{}", show(&output));
    let rendered = stdout_json(&output);
    let key = "in/$(touch /tmp/pwned); `id` 'quoted' \"dq\"\nnext line.csv";
    assert_eq!(rendered[0]["action"], "launch");
    assert_eq!(rendered[0]["job"]["key"], key);
    assert_eq!(rendered[0]["job"]["results_prefix"], "analysis/");
    let script = rendered[0]["user_data"].as_str().unwrap();
    assert!(
        !script.contains("pwned"),
        "the key is not in the script text"
    );
    let job = s3spot_bootstrap::job_from_user_data(script).unwrap();
    assert_eq!(job.key, key);
    let check = Command::new("bash")
        .args(["-n", "-c", script])
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", show(&check));
}

#[test]
fn render_prints_scripts_and_says_why_records_are_skipped() {
    let output = run(
        &["render", "--event", &event_path("multi-record.json")],
        &job_env(),
    );
    assert!(output.status.success(), "{}", show(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.matches("# launch s3://data/").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("#!/bin/bash").count(), 2);
    assert!(stdout.contains("## JobSpec"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "skip s3://data/\"analysis/in/first.csv/report.json\": under the results prefix"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("skip s3://data/\"in/new-folder/\": folder marker"),
        "{stderr}"
    );
}

#[test]
fn render_reads_sqs_batches_and_stdin() {
    let event = std::fs::read(events_dir().join("sqs-wrapped.json")).unwrap();
    let mut child = s3spot(&["render", "--event", "-", "--json"], &job_env())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&event).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{}", show(&output));
    let rendered = stdout_json(&output);
    assert_eq!(rendered[0]["job"]["key"], "in/queued file.csv");
    assert_eq!(rendered[1]["action"], "skip");
    assert_eq!(rendered[1]["reason"], "s3:TestEvent");
}

#[test]
fn bad_configuration_names_the_variable_and_exits_2() {
    let mut env = job_env();
    env.retain(|(name, _)| *name != "S3SPOT_WORKER_SHA256");
    let output = run(&["render", "--event", &event_path("s3-put.json")], &env);
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("s3spot: error: bad configuration: S3SPOT_WORKER_SHA256 is not set"),
        "{stderr}"
    );

    let mut env = job_env();
    env.push(("S3SPOT_MARKET", "cheap".into()));
    let output = run(&["invoke", "--event", &event_path("s3-put.json")], &env);
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains(
        "S3SPOT_MARKET=\"cheap\" is invalid: expected spot, on-demand or spot-then-on-demand"
    ));
}

#[test]
fn unreadable_events_are_clear_errors() {
    let output = run(
        &["render", "--event", "/nonexistent/event.json"],
        &job_env(),
    );
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("cannot read event file /nonexistent/event.json: No such file")
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.json");
    std::fs::write(&path, "{\"Records\": [").unwrap();
    let output = run(&["render", "--event", path.to_str().unwrap()], &job_env());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("broken.json is not valid JSON: EOF while parsing"),
        "{stderr}"
    );
}

#[test]
fn invoke_launches_through_ec2_and_prints_the_report() {
    let ec2 = Ec2::start();
    let env = ec2.env.clone();

    let output = run(&["invoke", "--event", &event_path("s3-put.json")], &env);
    assert!(output.status.success(), "{}", show(&output));
    let report = stdout_json(&output);
    assert_eq!(report["skipped"], Value::Array(vec![]));
    assert_eq!(report["failed"], Value::Array(vec![]));
    let launched = &report["launched"][0];
    assert_eq!(launched["key"], "test/key");
    assert_eq!(launched["market"], "spot");
    let id = launched["instance_id"].as_str().unwrap();
    let described = ec2
        .runtime
        .block_on(ec2.client.describe_instances().instance_ids(id).send())
        .unwrap();
    let instance = &described.reservations()[0].instances()[0];
    // Launched by the fleet request, tagged in it.
    assert!(
        instance
            .tags()
            .iter()
            .any(|t| t.key() == Some("s3spot:key") && t.value() == Some("test/key")),
        "{instance:?}"
    );

    // SQS batches print the partial batch response.
    let output = run(
        &["invoke", "--event", &event_path("sqs-wrapped.json")],
        &env,
    );
    assert!(output.status.success(), "{}", show(&output));
    assert_eq!(
        stdout_json(&output),
        serde_json::json!({"batchItemFailures": []})
    );
}

#[test]
fn invoke_exits_1_with_the_report_when_records_fail() {
    let ec2 = Ec2::start();
    // The service-specific endpoint variables work as well as the general one: the launcher
    // asks EC2, and S3 for the job's status.json.
    let mut env: Vec<(&str, String)> = ec2
        .env
        .iter()
        .flat_map(|(name, value)| match *name {
            "AWS_ENDPOINT_URL" => vec![
                ("AWS_ENDPOINT_URL_EC2", value.clone()),
                ("AWS_ENDPOINT_URL_S3", value.clone()),
            ],
            _ => vec![(*name, value.clone())],
        })
        .collect();
    env.push(("S3SPOT_MAX_INSTANCES", "1".into()));

    let output = run(
        &["invoke", "--event", &event_path("url-encoded-keys.json")],
        &env,
    );
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let report = stdout_json(&output);
    assert_eq!(report["launched"].as_array().unwrap().len(), 1);
    assert_eq!(report["failed"].as_array().unwrap().len(), 3);
    assert_eq!(report["failed"][0]["retryable"], true);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the handler failed (S3spot.RetryableFailure): 3 of 4 records failed"),
        "{stderr}"
    );

    let output = run(
        &["invoke", "--event", &event_path("analysis-key.json")],
        &env,
    );
    assert!(
        output.status.success(),
        "a skip is not a failure: {}",
        show(&output)
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.json");
    std::fs::write(&path, "{\"hello\": \"world\"}").unwrap();
    let output = run(&["invoke", "--event", path.to_str().unwrap()], &env);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("(S3spot.MalformedEvent): unrecognised event"),
        "{stderr}"
    );
}

#[test]
fn prices_follow_every_page_and_recommend_within_the_configured_types() {
    let ec2 = Ec2::start();
    let mut env = ec2.env.clone();
    env.push(("S3SPOT_INSTANCE_TYPES", "t3.micro,m5.large".into()));

    let output = run(&["prices", "--json", "--recommend"], &env);
    assert!(output.status.success(), "{}", show(&output));
    let document = stdout_json(&output);
    assert_eq!(document["region"], "us-east-1");
    let prices = document["prices"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for price in prices {
        let instance_type = price["instance_type"].as_str().unwrap();
        assert!(["t3.micro", "m5.large"].contains(&instance_type), "{price}");
        assert!(
            price["spot_usd_per_hour"].as_f64().unwrap() > 0.0,
            "{price}"
        );
        let zone = price["availability_zone"].as_str().unwrap().to_owned();
        assert!(zone.starts_with("us-east-1"), "{price}");
        assert!(
            seen.insert((instance_type.to_owned(), zone)),
            "one row per type and zone"
        );
        let on_demand = price["on_demand_usd_per_hour"].as_f64();
        match instance_type {
            "t3.micro" => assert_eq!(on_demand, Some(0.0104)),
            _ => assert_eq!(on_demand, Some(0.096)),
        }
    }
    assert!(seen.iter().any(|(t, _)| t == "t3.micro"));
    assert!(seen.iter().any(|(t, _)| t == "m5.large"));
    let best = &document["recommendation"];
    assert_eq!(
        best["spot_usd_per_hour"], prices[0]["spot_usd_per_hour"],
        "the cheapest"
    );
    let pools = document["pools"].as_array().unwrap();
    assert_eq!(
        pools.len(),
        prices.len(),
        "every type in every zone is a pool"
    );
    assert_eq!(pools[0], prices[0], "cheapest first");

    // One zone, as a table.
    let output = run(
        &[
            "prices",
            "--instance-types",
            "t3.micro",
            "--az",
            "us-east-1a",
        ],
        &env,
    );
    assert!(output.status.success(), "{}", show(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TYPE"), "{text}");
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[1].starts_with("t3.micro  us-east-1a"), "{text}");
    assert!(lines[1].contains("0.0104"), "the on-demand price: {text}");

    // No types anywhere: a clear error naming both ways to give them.
    let output = run(&["prices"], &ec2.env);
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--instance-types"), "{stderr}");
}

#[test]
fn jobs_list_cancel_retry_and_reap_instances_in_ec2() {
    let ec2 = Ec2::start();
    let env = ec2.env.clone();
    let jobs = |args: &[&str]| {
        let mut all = vec!["jobs"];
        all.extend_from_slice(args);
        run(&all, &env)
    };
    let json = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--json");
        let output = jobs(&all);
        assert!(output.status.success(), "{args:?}: {}", show(&output));
        stdout_json(&output)
    };
    let state = |id: &str| {
        let described = ec2
            .runtime
            .block_on(ec2.client.describe_instances().instance_ids(id).send())
            .unwrap();
        described.reservations()[0].instances()[0]
            .state()
            .unwrap()
            .name()
            .unwrap()
            .as_str()
            .to_owned()
    };

    let output = run(&["invoke", "--event", &event_path("s3-put.json")], &env);
    assert!(output.status.success(), "{}", show(&output));
    let first = stdout_json(&output)["launched"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let rows = json(&["list"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows:#}");
    assert_eq!(rows[0]["instance_id"], first.as_str());
    assert_eq!(rows[0]["key"], "test/key");
    assert_eq!(rows[0]["market"], "spot");
    assert_eq!(rows[0]["stuck"], false);

    let dry = json(&["reap", "--dry-run", "--stuck-after", "0s"]);
    assert_eq!(dry["instances"][0]["instance_id"], first.as_str());
    assert_eq!(state(&first), "running", "a dry run terminates nothing");

    let output = jobs(&["cancel", "test/key"]);
    assert!(output.status.success(), "{}", show(&output));
    assert_ne!(state(&first), "running");
    let shown = json(&["show", "test/key"]);
    assert_eq!(shown["status"]["state"], "cancelled", "{shown:#}");
    let status_url = shown["status_url"].as_str().unwrap();
    assert!(
        status_url.starts_with("s3://example-bucket/analysis/test/key/19700101T000000.000Z-")
            && status_url.ends_with("/status.json"),
        "the console event's upload has its own folder: {status_url}"
    );

    let retried = json(&["retry", &first]);
    let second = retried["launched"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(second, first);
    let token = retried["launched"][0]["client_token"].as_str().unwrap();
    assert!(token.contains("-2-"), "attempt 2's token: {token}");
    let output = jobs(&["retry", "test/key"]);
    assert_eq!(output.status.code(), Some(2), "{}", show(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cancel it first"),
        "{}",
        show(&output)
    );

    let reaped = json(&["reap", "--stuck-after", "0s"]);
    assert_eq!(reaped["instances"][0]["instance_id"], second.as_str());
    assert_ne!(state(&second), "running");
    let shown = json(&["show", &second]);
    assert_eq!(shown["status"]["state"], "failed", "{shown:#}");
    assert_eq!(shown["status"]["attempt"], 2);
    assert_eq!(shown["status"]["history"][0]["state"], "cancelled");
    let output = jobs(&["reap", "--stuck-after", "0s"]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "reaped: none\n");
}
