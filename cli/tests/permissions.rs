//! The template's policies, enforced: the launcher (`s3spot invoke`, as the function) and an
//! operator (`s3spot jobs`, `s3spot prices`) run against an EC2 double and an S3 server that
//! allow each of them exactly what its policy in `infra/template.yaml` allows, as IAM would.

use std::collections::HashMap;
use std::process::{Command, Output};

use s3spot_tests::iam::Policy;
use s3spot_tests::{Ec2Double, S3Server, show};
use serde_json::{Value, json};

const BUCKET: &str = "data";
const TEMPLATE_ID: &str = "lt-0123456789abcdef0";
const LAUNCHER: &str = "AKIALAUNCHERROLE0001";
const OPERATOR: &str = "AKIAOPERATORPOLICY01";
/// The operator policy without `TerminateOwnInstances`: the double must deny the cancel.
const WEAKENED: &str = "AKIAWEAKENEDPOLICY01";
const INSTANCE_ROLE: &str = "arn:aws:iam::123456789012:role/s3spot-InstanceRole";

/// The function's environment and the named policies, resolved from the template as a deployed
/// stack would have them.
fn resolve(policies: &[&str]) -> (HashMap<String, String>, HashMap<String, Value>) {
    let sha256 = "e".repeat(64);
    let resolved = s3spot_tests::template::resolve(
        &[
            ("WorkerKey", "workers/w/s3spot-worker"),
            ("WorkerSha256", &sha256),
            ("VpcId", "vpc-0123456789abcdef0"),
            ("SubnetId", "subnet-0123456789abcdef0"),
        ],
        &[
            ("WorkerLaunchTemplate", TEMPLATE_ID),
            ("WorkerLaunchTemplate.LatestVersionNumber", "1"),
            ("ArtifactsBucket", "artifacts"),
            ("DataBucket", BUCKET),
            ("DataBucket.Arn", &format!("arn:aws:s3:::{BUCKET}")),
            ("InstanceRole.Arn", INSTANCE_ROLE),
            (
                "IntakeQueue.Arn",
                "arn:aws:sqs:us-east-1:123456789012:s3spot-intake",
            ),
            (
                "LauncherLogGroup.Arn",
                "arn:aws:logs:us-east-1:123456789012:log-group:s3spot:*",
            ),
        ],
        policies,
    );
    (resolved.environment, resolved.policies)
}

struct Account {
    ec2: Ec2Double,
    s3: S3Server,
    environment: HashMap<String, String>,
}

impl Account {
    fn start() -> Account {
        let (environment, policies) = resolve(&["LauncherRole/launch", "OperatorPolicy"]);
        let launcher = Policy::from_document(&policies["LauncherRole/launch"]);
        let operator = Policy::from_document(&policies["OperatorPolicy"]);
        let mut weakened = policies["OperatorPolicy"].clone();
        weakened["Statement"]
            .as_array_mut()
            .unwrap()
            .retain(|s| s["Sid"] != "TerminateOwnInstances");
        let weakened = Policy::from_document(&weakened);
        let ec2 = Ec2Double::start();
        ec2.set_policy(LAUNCHER, launcher.clone());
        ec2.set_policy(OPERATOR, operator.clone());
        ec2.set_policy(WEAKENED, weakened.clone());
        let s3 = S3Server::start_with_principals(
            &[BUCKET],
            vec![
                (LAUNCHER.into(), launcher),
                (OPERATOR.into(), operator),
                (WEAKENED.into(), weakened),
            ],
        );
        Account {
            ec2,
            s3,
            environment,
        }
    }

    /// `s3spot` as the principal with `access_key`, configured as the function is.
    fn run(&self, access_key: &str, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_s3spot"));
        command.args(args).env_clear().envs(&self.environment);
        for (name, value) in self.s3.env() {
            command.env(name, value);
        }
        command
            .env("AWS_ACCESS_KEY_ID", access_key)
            .env("AWS_ENDPOINT_URL_EC2", self.ec2.endpoint());
        command.output().unwrap()
    }

    fn json(&self, access_key: &str, args: &[&str]) -> Value {
        let output = self.run(access_key, args);
        assert!(output.status.success(), "{args:?}: {}", show(&output));
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", show(&output)))
    }
}

fn upload_event(dir: &std::path::Path) -> String {
    let path = dir.join("event.json");
    let event = json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
        "eventTime": "2026-11-30T10:19:37.123Z", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": BUCKET}, "object": {
            "key": "in/f.csv", "size": 42, "eTag": "0123456789abcdef0123456789abcdef",
            "sequencer": "0062E99A88DC407460"}}
    }]});
    std::fs::write(&path, event.to_string()).unwrap();
    path.display().to_string()
}

#[test]
fn the_launcher_and_an_operator_can_do_their_work_with_exactly_their_policies() {
    let account = Account::start();
    let dir = tempfile::tempdir().unwrap();

    // The function launches with its role's policy: the guard's count, the claim, the launch
    // from the template, the tags, the record.
    let launched = account.json(LAUNCHER, &["invoke", "--event", &upload_event(dir.path())]);
    assert_eq!(launched["failed"], json!([]), "{launched:#}");
    let first = launched["launched"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The worker's logs, as the instance role writes them.
    let shown = account.json(OPERATOR, &["jobs", "show", "in/f.csv", "--json"]);
    let folder = shown["status_url"]
        .as_str()
        .unwrap()
        .strip_prefix(&format!("s3://{BUCKET}/"))
        .unwrap()
        .strip_suffix("status.json")
        .unwrap()
        .to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let admin = runtime.block_on(account.s3.client());
    runtime
        .block_on(
            admin
                .put_object()
                .bucket(BUCKET)
                .key(format!("{folder}stdout.log"))
                .body(b"processed 2 rows\n".to_vec().into())
                .send(),
        )
        .unwrap();

    // The operator: everything `s3spot jobs` and `s3spot prices` do.
    let rows = account.json(OPERATOR, &["jobs", "list", "--json"]);
    assert_eq!(rows[0]["instance_id"], first.as_str(), "{rows:#}");
    let shown = account.json(OPERATOR, &["jobs", "show", "in/f.csv", "--json"]);
    assert_eq!(shown["logs"][0]["tail"], "processed 2 rows\n", "{shown:#}");
    account
        .ec2
        .set_spot_prices(&[("m7i.large", "us-east-1a", 0.05)]);
    let prices = account.json(OPERATOR, &["prices", "--json"]);
    assert_eq!(
        prices["prices"][0]["instance_type"], "m7i.large",
        "{prices:#}"
    );
    let dry = account.json(
        OPERATOR,
        &["jobs", "reap", "--dry-run", "--stuck-after", "0s", "--json"],
    );
    assert_eq!(
        dry["instances"][0]["instance_id"],
        first.as_str(),
        "{dry:#}"
    );

    // Without the statement that allows it, the double refuses: the check above can fail.
    let output = account.run(WEAKENED, &["jobs", "cancel", "in/f.csv"]);
    assert!(!output.status.success(), "{}", show(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("UnauthorizedOperation") && stderr.contains("ec2:TerminateInstances"),
        "{stderr}"
    );

    let cancelled = account.run(OPERATOR, &["jobs", "cancel", "in/f.csv"]);
    assert!(cancelled.status.success(), "{}", show(&cancelled));
    let retried = account.json(OPERATOR, &["jobs", "retry", &first, "--json"]);
    assert_eq!(retried["failed"], json!([]), "{retried:#}");
    let second = retried["launched"][0]["instance_id"].as_str().unwrap();
    assert_ne!(second, first);
    let reaped = account.json(OPERATOR, &["jobs", "reap", "--stuck-after", "0s", "--json"]);
    assert_eq!(reaped["instances"][0]["instance_id"], second, "{reaped:#}");

    // With the launcher's permissions alone, `show` prints the status it may read and names
    // the logs it may not.
    let output = account.run(LAUNCHER, &["jobs", "show", "in/f.csv"]);
    assert!(output.status.success(), "{}", show(&output));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("status.json"), "{text}");
    assert!(
        text.contains("\"state\": \"failed\""),
        "the status it could read: {text}"
    );
    assert!(
        text.contains("stdout.log")
            && text.contains("cannot be read")
            && text.contains("AccessDenied")
            && text.contains("OperatorPolicyArn"),
        "the log it could not read, named, and what allows it: {text}"
    );
}
