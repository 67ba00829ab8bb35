//! `s3spot doctor` against a stack as the template deploys it: moto holds the stack's outputs,
//! buckets, queues, rule and function; the EC2 double holds the launch template and evaluates
//! DryRun launches with IAM's logic; the IAM double answers GetRole, AssumeRole and the policy
//! simulator with the template's own launcher policy. Then the faults a real account can have.

use std::process::{Command, Output};

use s3spot_tests::ec2::LaunchTemplateVersion;
use s3spot_tests::iam::Policy;
use s3spot_tests::{Ec2Double, IamDouble, Moto, S3Server, show};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

const STACK: &str = "s3spot";
const DATA: &str = "s3spot-data-123456789012-us-east-1";
const ARTIFACTS: &str = "s3spot-artifacts-123456789012-us-east-1";
const WORKER_KEY: &str = "workers/5a3c1f0e/s3spot-worker";
const TEMPLATE_ID: &str = "lt-0aa1bb2cc3dd4ee5f";
const FUNCTION: &str = "s3spot-launcher";
const LAUNCHER_ROLE: &str = "arn:aws:iam::123456789012:role/s3spot-LauncherRole-1A2B3C";
const INSTANCE_ROLE: &str = "arn:aws:iam::123456789012:role/s3spot-InstanceRole-4D5E6F";
const SPOT_ROLE_PATH: &str = "/aws-service-role/spot.amazonaws.com/";
/// The access key of a session as the launcher's role, when it may be assumed.
const AS_LAUNCHER: &str = "ASIALAUNCHERSESSION1";
const WORKER: &[u8] = b"the s3spot worker binary";

struct Account {
    moto: Moto,
    s3: S3Server,
    ec2: Ec2Double,
    iam: IamDouble,
    runtime: tokio::runtime::Runtime,
    launcher_policy: Value,
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Account {
    /// Everything as scripts/deploy leaves it.
    fn deployed() -> Account {
        let moto = Moto::start();
        // s3s-fs for S3: moto's GetBucketNotificationConfiguration leaves EventBridge out.
        let s3_server = S3Server::start(&[DATA, ARTIFACTS]);
        let ec2 = Ec2Double::start();
        let iam = IamDouble::start();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let resolved = s3spot_tests::template::resolve(
            &[
                ("WorkerKey", WORKER_KEY),
                ("WorkerSha256", &sha256(WORKER)),
                ("VpcId", "vpc-0123456789abcdef0"),
                ("SubnetId", "subnet-0123456789abcdef0"),
            ],
            &[
                ("WorkerLaunchTemplate", TEMPLATE_ID),
                ("WorkerLaunchTemplate.LatestVersionNumber", "1"),
                ("ArtifactsBucket", ARTIFACTS),
                ("DataBucket", DATA),
                ("DataBucket.Arn", &format!("arn:aws:s3:::{DATA}")),
                ("InstanceRole.Arn", INSTANCE_ROLE),
                (
                    "IntakeQueue.Arn",
                    "arn:aws:sqs:us-east-1:123456789012:s3spot-intake",
                ),
                (
                    "LauncherLogGroup.Arn",
                    "arn:aws:logs:us-east-1:123456789012:log-group:/aws/lambda/s3spot-launcher:*",
                ),
            ],
            &["LauncherRole/launch"],
        );
        let launcher_policy = resolved.policies["LauncherRole/launch"].clone();
        runtime.block_on(async {
            let sdk = moto.sdk_config().await;
            let s3 = s3_server.client().await;
            s3.put_object()
                .bucket(ARTIFACTS)
                .key(WORKER_KEY)
                .body(WORKER.to_vec().into())
                .send()
                .await
                .unwrap();
            s3.put_bucket_notification_configuration()
                .bucket(DATA)
                .notification_configuration(
                    aws_sdk_s3::types::NotificationConfiguration::builder()
                        .event_bridge_configuration(
                            aws_sdk_s3::types::EventBridgeConfiguration::builder().build(),
                        )
                        .build(),
                )
                .send()
                .await
                .unwrap();

            let sqs = aws_sdk_sqs::Client::new(&sdk);
            let dead_letter = sqs
                .create_queue()
                .queue_name("s3spot-dead-letter")
                .send()
                .await
                .unwrap();
            let dead_letter_arn = queue_arn(&sqs, dead_letter.queue_url().unwrap()).await;
            let intake = sqs
                .create_queue()
                .queue_name("s3spot-intake")
                .attributes(
                    aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                    json!({"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": 12})
                        .to_string(),
                )
                .send()
                .await
                .unwrap();
            let intake_url = intake.queue_url().unwrap().to_owned();
            let intake_arn = queue_arn(&sqs, &intake_url).await;

            let events = aws_sdk_eventbridge::Client::new(&sdk);
            let pattern = json!({
                "source": ["aws.s3"], "detail-type": ["Object Created"],
                "detail": {"bucket": {"name": [DATA]},
                           "object": {"key": [{"anything-but": {"prefix": "analysis/"}}]}}
            });
            events
                .put_rule()
                .name("s3spot-UploadsRule-7G8H9I")
                .event_pattern(pattern.to_string())
                .state(aws_sdk_eventbridge::types::RuleState::Enabled)
                .send()
                .await
                .unwrap();
            events
                .put_targets()
                .rule("s3spot-UploadsRule-7G8H9I")
                .targets(
                    aws_sdk_eventbridge::types::Target::builder()
                        .id("intake")
                        .arn(&intake_arn)
                        .dead_letter_config(
                            aws_sdk_eventbridge::types::DeadLetterConfig::builder()
                                .arn(&dead_letter_arn)
                                .build(),
                        )
                        .build()
                        .unwrap(),
                )
                .send()
                .await
                .unwrap();

            // moto's Lambda wants its role to exist in moto's IAM.
            let moto_iam = aws_sdk_iam::Client::new(&sdk);
            let role = moto_iam
                .create_role()
                .role_name("s3spot-LauncherRole-1A2B3C")
                .assume_role_policy_document(
                    json!({"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
                        "Principal": {"Service": "lambda.amazonaws.com"},
                        "Action": "sts:AssumeRole"}]})
                    .to_string(),
                )
                .send()
                .await
                .unwrap();
            let lambda = aws_sdk_lambda::Client::new(&sdk);
            let mut environment = aws_sdk_lambda::types::Environment::builder();
            for (name, value) in &resolved.environment {
                environment = environment.variables(name, value);
            }
            lambda
                .create_function()
                .function_name(FUNCTION)
                .runtime(aws_sdk_lambda::types::Runtime::Providedal2023)
                .handler("bootstrap")
                .role(role.role().unwrap().arn())
                .code(
                    aws_sdk_lambda::types::FunctionCode::builder()
                        .zip_file(aws_sdk_lambda::primitives::Blob::new(empty_zip()))
                        .build(),
                )
                .environment(environment.build())
                .send()
                .await
                .unwrap();
            lambda
                .create_event_source_mapping()
                .function_name(FUNCTION)
                .event_source_arn(&intake_arn)
                .batch_size(10)
                .send()
                .await
                .unwrap();

            let outputs = [
                ("LauncherFunctionName", FUNCTION.to_owned()),
                ("LauncherRoleArn", LAUNCHER_ROLE.to_owned()),
                ("InstanceRoleArn", INSTANCE_ROLE.to_owned()),
                ("DataBucketName", DATA.to_owned()),
                ("UploadsRuleName", "s3spot-UploadsRule-7G8H9I".to_owned()),
                ("IntakeQueueUrl", intake_url),
                ("IntakeQueueArn", intake_arn),
                ("DeadLetterQueueArn", dead_letter_arn),
                ("LaunchTemplateId", TEMPLATE_ID.to_owned()),
                ("VpcId", "vpc-0123456789abcdef0".to_owned()),
            ];
            let template = json!({
                "Resources": {"Marker": {"Type": "AWS::SQS::Queue",
                                          "Properties": {"QueueName": "s3spot-stack-marker"}}},
                "Outputs": outputs.iter().map(|(k, v)| (k.to_string(), json!({"Value": v})))
                    .collect::<serde_json::Map<_, _>>(),
            });
            aws_sdk_cloudformation::Client::new(&sdk)
                .create_stack()
                .stack_name(STACK)
                .template_body(template.to_string())
                .send()
                .await
                .unwrap();
        });
        ec2.add_launch_template(LaunchTemplateVersion {
            id: TEMPLATE_ID.into(),
            version: 1,
            image_id: "ami-0123456789abcdef0".into(),
            shutdown_behavior: "terminate".into(),
            http_tokens: "required".into(),
            subnet_id: "subnet-0123456789abcdef0".into(),
            security_group_id: "sg-0123456789abcdef0".into(),
        });
        iam.add_role(s3spot::doctor::SPOT_ROLE, SPOT_ROLE_PATH);
        iam.set_role_policy(LAUNCHER_ROLE, Policy::from_document(&launcher_policy));
        ec2.set_policy(AS_LAUNCHER, Policy::from_document(&launcher_policy));
        Account {
            moto,
            s3: s3_server,
            ec2,
            iam,
            runtime,
            launcher_policy,
        }
    }

    fn doctor(&self, args: &[&str]) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_s3spot"));
        command.arg("doctor").args(args).env_clear();
        for (name, value) in self.moto.env() {
            command.env(name, value);
        }
        command
            .env("AWS_ENDPOINT_URL_S3", self.s3.endpoint())
            .env("AWS_ENDPOINT_URL_EC2", self.ec2.endpoint())
            .env("AWS_ENDPOINT_URL_IAM", self.iam.endpoint())
            .env("AWS_ENDPOINT_URL_STS", self.iam.endpoint());
        command.output().unwrap()
    }

    fn sdk(&self) -> aws_config::SdkConfig {
        self.runtime.block_on(self.moto.sdk_config())
    }
}

async fn queue_arn(sqs: &aws_sdk_sqs::Client, url: &str) -> String {
    sqs.get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone()
}

/// A zip archive with nothing in it: moto stores the function's code, and runs none of it.
fn empty_zip() -> Vec<u8> {
    let mut zip = b"PK\x05\x06".to_vec();
    zip.extend([0; 18]);
    zip
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The report's line for `check`, and what follows it up to the next check.
fn line<'a>(report: &'a str, check: &str) -> &'a str {
    let start = report
        .find(&format!("  {check}: "))
        .unwrap_or_else(|| panic!("no line for {check}:\n{report}"));
    let start = report[..start].rfind('\n').map_or(0, |i| i + 1);
    let end = report[start..]
        .find("\nok ")
        .or_else(|| report[start..].find("\nFAIL "))
        .map_or(report.len(), |i| start + i);
    &report[start..end]
}

#[test]
fn a_deployed_stack_passes_every_check_with_the_launch_simulated_or_dry_run() {
    let account = Account::deployed();
    let output = account.doctor(&[]);
    let report = stdout(&output);
    assert!(output.status.success(), "{}", show(&output));
    for check in [
        "stack",
        "spot service-linked role",
        "launch template",
        "worker artifact",
        "intake: bucket",
        "intake: filter",
        "intake: dead-letter queue",
        "intake: function",
        "launcher permissions",
    ] {
        assert!(
            line(&report, check).starts_with("ok "),
            "{check}:\n{report}"
        );
    }
    assert!(report.contains("IAM's policy simulator"), "{report}");
    assert!(account.iam.simulations() > 0);
    assert!(report.ends_with("all checks passed\n"), "{report}");

    // Where the person may assume the launcher's role: the function's own requests, DryRun.
    account.iam.allow_assume(LAUNCHER_ROLE, AS_LAUNCHER);
    let simulations = account.iam.simulations();
    let output = account.doctor(&["--stack", STACK]);
    let report = stdout(&output);
    assert!(output.status.success(), "{}", show(&output));
    assert!(
        line(&report, "launcher permissions").contains("a DryRun of each request"),
        "{report}"
    );
    assert_eq!(
        account.iam.simulations() - simulations,
        4,
        "the launch is not simulated; only what no DryRun can try"
    );
    assert_eq!(
        account.ec2.create_fleet_calls(),
        0,
        "a dry run launches nothing"
    );
    assert!(account.ec2.instances().is_empty());
}

#[test]
fn each_fault_fails_its_check_and_says_what_to_do() {
    let account = Account::deployed();
    // A launcher policy without its instance statement: the simulator and the DryRun refuse.
    let mut weakened = account.launcher_policy.clone();
    weakened["Statement"].as_array_mut().unwrap().retain(|s| {
        s["Sid"] != "OnlyTemplateInstances" && s["Sid"] != "DescribeInstancesRequiresWildcard"
    });
    account
        .iam
        .set_role_policy(LAUNCHER_ROLE, Policy::from_document(&weakened));
    // A worker replaced without the function being told.
    let sdk = account.sdk();
    account.runtime.block_on(async {
        let s3 = account.s3.client().await;
        s3.put_object()
            .bucket(ARTIFACTS)
            .key(WORKER_KEY)
            .body(b"another build".to_vec().into())
            .send()
            .await
            .unwrap();
    });
    // A template version that allows IMDSv1 and stops instead of terminating.
    account.ec2.add_launch_template(LaunchTemplateVersion {
        id: TEMPLATE_ID.into(),
        version: 2,
        image_id: "ami-0123456789abcdef0".into(),
        shutdown_behavior: "stop".into(),
        http_tokens: "optional".into(),
        ..LaunchTemplateVersion::default()
    });
    let mut output = account.doctor(&[]);
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let worker = line(&report, "worker artifact");
    assert!(
        worker.starts_with("FAIL") && worker.contains(&sha256(b"another build")),
        "{report}"
    );
    assert!(
        worker.contains("to fix: run scripts/deploy again"),
        "{report}"
    );
    let permissions = line(&report, "launcher permissions");
    assert!(
        permissions.starts_with("FAIL")
            && permissions
                .contains("ec2:RunInstances on arn:aws:ec2:us-east-1:123456789012:instance/*"),
        "{report}"
    );

    assert!(
        permissions.contains("ec2:DescribeInstances on * is implicitDeny"),
        "the runaway guard's count, which no DryRun tries: {report}"
    );

    // The same policy, found by a DryRun under the role where the person may assume it.
    account
        .ec2
        .set_policy("ASIAWEAKENEDSESSION1", Policy::from_document(&weakened));
    account
        .iam
        .allow_assume(LAUNCHER_ROLE, "ASIAWEAKENEDSESSION1");
    let dry = stdout(&account.doctor(&[]));
    let permissions = line(&dry, "launcher permissions");
    assert!(
        permissions.starts_with("FAIL")
            && permissions.contains("a DryRun of each request")
            && permissions.contains("UnauthorizedOperation")
            && permissions.contains("ec2:RunInstances"),
        "{dry}"
    );
    assert_eq!(
        account.ec2.create_fleet_calls(),
        0,
        "a dry run launches nothing"
    );

    // No spot service-linked role: an IAM that has none.
    let iam = IamDouble::start();
    iam.set_role_policy(LAUNCHER_ROLE, Policy::from_document(&weakened));
    let mut command = Command::new(env!("CARGO_BIN_EXE_s3spot"));
    command.arg("doctor").env_clear();
    for (name, value) in account.moto.env() {
        command.env(name, value);
    }
    output = command
        .env("AWS_ENDPOINT_URL_S3", account.s3.endpoint())
        .env("AWS_ENDPOINT_URL_EC2", account.ec2.endpoint())
        .env("AWS_ENDPOINT_URL_IAM", iam.endpoint())
        .env("AWS_ENDPOINT_URL_STS", iam.endpoint())
        .output()
        .unwrap();
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let spot = line(&report, "spot service-linked role");
    assert!(
        spot.starts_with("FAIL")
            && spot.contains(
                "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com"
            ),
        "{report}"
    );

    // The function pointed at the bad template version.
    account.runtime.block_on(async {
        let lambda = aws_sdk_lambda::Client::new(&sdk);
        let current = lambda
            .get_function_configuration()
            .function_name(FUNCTION)
            .send()
            .await
            .unwrap();
        let mut variables = current.environment().unwrap().variables().unwrap().clone();
        variables.insert("S3SPOT_LAUNCH_TEMPLATE_VERSION".into(), "2".into());
        // Nor does the function name the subnets.
        variables.remove("S3SPOT_SUBNETS");
        lambda
            .update_function_configuration()
            .function_name(FUNCTION)
            .environment(
                aws_sdk_lambda::types::Environment::builder()
                    .set_variables(Some(variables))
                    .build(),
            )
            .send()
            .await
            .unwrap();
    });
    let output = account.doctor(&[]);
    let report = stdout(&output);
    let template = line(&report, "launch template");
    assert!(
        template.starts_with("FAIL")
            && template.contains("IMDSv2 is not required")
            && template.contains("shutdown does not terminate")
            && template.contains("names no subnet"),
        "{report}"
    );

    // A stack that is not there.
    let output = account.doctor(&["--stack", "nothing-here"]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        stdout(&output).contains("there is no stack \"nothing-here\""),
        "{}",
        show(&output)
    );
}

#[test]
fn a_broken_intake_fails_the_check_of_its_link() {
    let account = Account::deployed();
    let sdk = account.sdk();
    account.runtime.block_on(async {
        // The bucket no longer sends to EventBridge.
        account
            .s3
            .client()
            .await
            .put_bucket_notification_configuration()
            .bucket(DATA)
            .notification_configuration(
                aws_sdk_s3::types::NotificationConfiguration::builder().build(),
            )
            .send()
            .await
            .unwrap();
        // The uploads rule is disabled, and lets results through.
        let events = aws_sdk_eventbridge::Client::new(&sdk);
        events
            .put_rule()
            .name("s3spot-UploadsRule-7G8H9I")
            .event_pattern(
                json!({"source": ["aws.s3"], "detail-type": ["Object Created"],
                       "detail": {"bucket": {"name": [DATA]}}})
                .to_string(),
            )
            .state(aws_sdk_eventbridge::types::RuleState::Disabled)
            .send()
            .await
            .unwrap();
        // The function's mapping from the queue is off.
        let lambda = aws_sdk_lambda::Client::new(&sdk);
        let mappings = lambda
            .list_event_source_mappings()
            .function_name(FUNCTION)
            .send()
            .await
            .unwrap();
        lambda
            .update_event_source_mapping()
            .uuid(mappings.event_source_mappings()[0].uuid().unwrap())
            .enabled(false)
            .send()
            .await
            .unwrap();
    });
    let output = account.doctor(&[]);
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    assert!(
        line(&report, "intake: bucket").starts_with("FAIL"),
        "{report}"
    );
    let filter = line(&report, "intake: filter");
    assert!(
        filter.starts_with("FAIL")
            && filter.contains("DISABLED")
            && filter.contains("not the data bucket's uploads without analysis/"),
        "{report}"
    );
    let function = line(&report, "intake: function");
    assert!(
        function.starts_with("FAIL") && function.contains("update-event-source-mapping"),
        "{report}"
    );
    assert!(
        line(&report, "intake: dead-letter queue").starts_with("ok "),
        "{report}"
    );
}
