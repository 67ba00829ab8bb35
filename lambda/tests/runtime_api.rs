//! The `s3spot-lambda` binary, served events by a Lambda Runtime API emulator, launching into moto.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use s3spot_tests::{Moto, Outcome, RuntimeApi, create_launch_template, event, s3spot_env};

const ANSWER_WITHIN: Duration = Duration::from_secs(30);

fn spawn_function(env: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_s3spot-lambda"));
    command
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    command.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_event_fails_only_its_invocation() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    create_launch_template(&ec2, "s3spot-worker").await;
    moto.create_buckets(&["example-bucket", "data", "su2c-data"])
        .await;
    let api = RuntimeApi::start().await;
    let mut env = s3spot_env("s3spot-worker");
    env.extend(moto.env());
    env.extend(api.env());
    env.push(("S3SPOT_MAX_INSTANCES", "2".into()));
    env.push(("AWS_LAMBDA_LOG_FORMAT", "JSON".into()));
    let mut function = spawn_function(&env);

    let not_json = api.invoke("this is not JSON").await;
    let wrong_shape = api.invoke(r#"{"hello": "world"}"#).await;
    let put = api.invoke(event("s3-put.json").to_string()).await;
    let sqs = api.invoke(event("sqs-wrapped.json").to_string()).await;
    let over_cap = api.invoke(event("awsfun-put.json").to_string()).await;

    assert!(
        matches!(
            api.outcome(&not_json, ANSWER_WITHIN).await,
            Outcome::Error { .. }
        ),
        "a payload that is not JSON is an invocation error"
    );
    match api.outcome(&wrong_shape, ANSWER_WITHIN).await {
        Outcome::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(error_type, "S3spot.MalformedEvent");
            assert!(
                error_message.starts_with("unrecognised event: an object with keys [\"hello\"]"),
                "{error_message}"
            );
        }
        other => panic!("{other:?}"),
    }
    let Outcome::Response(report) = api.outcome(&put, ANSWER_WITHIN).await else {
        panic!("the function kept serving after the malformed events")
    };
    assert_eq!(report["launched"][0]["key"], "test/key");
    assert!(
        report["launched"][0]["instance_id"]
            .as_str()
            .unwrap()
            .starts_with("i-")
    );
    assert_eq!(
        api.outcome(&sqs, ANSWER_WITHIN).await,
        Outcome::Response(serde_json::json!({"batchItemFailures": []}))
    );
    match api.outcome(&over_cap, ANSWER_WITHIN).await {
        Outcome::Error {
            error_type,
            error_message,
        } => {
            assert_eq!(
                error_type, "S3spot.RetryableFailure",
                "so that Lambda retries it"
            );
            assert!(
                error_message.contains("S3SPOT_MAX_INSTANCES cap of 2"),
                "{error_message}"
            );
        }
        other => panic!("{other:?}"),
    }

    assert!(
        api.wait_for_next_call(6, ANSWER_WITHIN).await,
        "asks for a sixth event after five answers"
    );
    assert!(function.try_wait().unwrap().is_none(), "still serving");
    function.kill().unwrap();
    let output = function.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "launched" && l["fields"]["key"] == "\"test/key\""),
        "{logs}"
    );
    // One Embedded Metric Format line per invocation the handler saw, with `_aws` at the top of
    // its own line as CloudWatch Logs requires. The payload that is not JSON never reached the
    // handler: Lambda's own Errors metric counts that one.
    let metrics: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l.get("_aws").is_some()).collect();
    assert_eq!(metrics.len(), 4, "{logs}");
    for line in &metrics {
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], s3spot_lambda::METRICS_NAMESPACE);
        assert_eq!(directive["Dimensions"], serde_json::json!([["Pipeline"]]));
        assert!(line["_aws"]["Timestamp"].as_u64().unwrap() > 1_700_000_000_000);
        assert_eq!(line["Pipeline"], "s3spot");
        for metric in directive["Metrics"].as_array().unwrap() {
            let name = metric["Name"].as_str().unwrap();
            assert!(line[name].is_u64(), "{name} has a value: {line}");
        }
    }
    let counts = |line: &serde_json::Value| {
        [
            "LaunchedRecords",
            "SkippedRecords",
            "FailedRecords",
            "RetryableRecords",
        ]
        .map(|name| line[name].as_u64().unwrap())
    };
    assert_eq!(
        counts(metrics[0]),
        [0, 0, 1, 0],
        "the wrong shape: one failed record"
    );
    assert_eq!(counts(metrics[1]), [1, 0, 0, 0], "the put launched");
    assert_eq!(
        counts(metrics[3]),
        [0, 0, 1, 1],
        "over the cap: failed, and retryable"
    );
}

#[test]
fn bad_configuration_stops_start_up_with_the_variable_named() {
    let mut env = s3spot_env("s3spot-worker");
    env.push(("S3SPOT_MAX_RUNTIME", "1h".into()));
    env.push(("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9".into()));
    let output = spawn_function(&env).wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("s3spot-lambda: bad configuration: S3SPOT_MAX_RUNTIME=\"1h\" is invalid: expected whole seconds"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
