//! `s3spot doctor`: what we cannot test for a person, checked in their own account. Each check
//! reads a deployed stack through [`Account`], a narrow seam over the AWS APIs ([`aws`] in AWS,
//! doubles and moto in the tests), and says pass or fail, and for a failure, what to do.

pub mod aws;

use std::collections::BTreeMap;

use s3spot_lambda::event::ObjectCreated;
use s3spot_lambda::{Config, LaunchRequest, launch_requests};

/// The service-linked role EC2 needs before spot is requested through its API.
pub const SPOT_ROLE: &str = "AWSServiceRoleForEC2Spot";

/// What a call to AWS could not tell.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct AccountError {
    pub operation: &'static str,
    /// AWS refused the caller (AccessDenied, UnauthorizedOperation, a 403): the person's
    /// credentials are what to fix, not the stack.
    pub denied: bool,
    pub message: String,
}

/// A deployed stack, as `DescribeStacks` tells it.
#[derive(Debug, Clone, Default)]
pub struct Stack {
    pub outputs: BTreeMap<String, String>,
    pub parameters: BTreeMap<String, String>,
}

/// What a launch template version says of the instances it makes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TemplateFacts {
    pub version: String,
    pub http_tokens: Option<String>,
    pub shutdown_behavior: Option<String>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
    pub image_id: Option<String>,
    /// The VPC of the pipeline's subnets (the stack's `VpcId` output): the launch policy's
    /// `ec2:Vpc` condition on the subnets and network interfaces the request overrides.
    pub vpc_id: Option<String>,
    /// The root volume's size in the template, in GiB, if it names one.
    pub root_volume_gib: Option<u64>,
}

/// An EventBridge rule and its targets: (target ARN, its dead-letter queue ARN).
#[derive(Debug, Clone, Default)]
pub struct RuleFacts {
    pub enabled: bool,
    pub pattern: String,
    pub targets: Vec<(String, Option<String>)>,
}

/// An event source mapping of the function: (source ARN, state).
pub type EventSource = (String, String);

/// Whether the launcher may launch, and how that was found out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// "a DryRun under the launcher's role", or "IAM's policy simulator".
    pub how: String,
    /// What was refused, one entry per action and resource; empty when all is allowed.
    pub denied: Vec<String>,
}

/// The calls `s3spot doctor` makes. Every answer is the account's; none is inferred.
#[async_trait::async_trait]
pub trait Account: Send + Sync {
    async fn stack(&self, name: &str) -> Result<Option<Stack>, AccountError>;
    async fn role_exists(&self, name: &str) -> Result<bool, AccountError>;
    async fn launch_template(
        &self,
        id: &str,
        version: &str,
    ) -> Result<Option<TemplateFacts>, AccountError>;
    async fn function_environment(
        &self,
        function: &str,
    ) -> Result<BTreeMap<String, String>, AccountError>;
    /// The sha256 of the object's bytes, hex; `None` when there is no such object.
    async fn object_sha256(&self, bucket: &str, key: &str) -> Result<Option<String>, AccountError>;
    async fn bucket_sends_to_eventbridge(&self, bucket: &str) -> Result<bool, AccountError>;
    async fn rule(&self, name: &str) -> Result<Option<RuleFacts>, AccountError>;
    /// The queue's redrive target, from its `RedrivePolicy`.
    async fn dead_letter_target(&self, queue_url: &str) -> Result<Option<String>, AccountError>;
    async fn event_sources(&self, function: &str) -> Result<Vec<EventSource>, AccountError>;
    /// Whether the role may make each of `requests`, as the function makes them.
    async fn may_launch(
        &self,
        role_arn: &str,
        instance_role_arn: &str,
        template: &TemplateFacts,
        requests: &[LaunchRequest],
    ) -> Result<Permission, AccountError>;
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub check: &'static str,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pass(String),
    Fail { problem: String, fix: String },
}

impl Line {
    fn pass(check: &'static str, detail: impl Into<String>) -> Line {
        Line {
            check,
            outcome: Outcome::Pass(detail.into()),
        }
    }

    fn fail(check: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> Line {
        Line {
            check,
            outcome: Outcome::Fail {
                problem: problem.into(),
                fix: fix.into(),
            },
        }
    }

    pub fn passed(&self) -> bool {
        matches!(self.outcome, Outcome::Pass(_))
    }
}

const REDEPLOY: &str = "deploy the stack again with scripts/deploy";

/// A check that AWS could not answer: the person's credentials when AWS refused them,
/// `otherwise` when something else went wrong.
fn trouble(check: &'static str, error: &AccountError, otherwise: impl Into<String>) -> Line {
    if error.denied {
        Line::fail(
            check,
            error.to_string(),
            format!(
                "your credentials may not call {}: allow it to whoever runs s3spot doctor (the \
                 README lists what it reads)",
                error.operation
            ),
        )
    } else {
        Line::fail(check, error.to_string(), otherwise)
    }
}

/// The stack outputs the checks read; a stack without one predates them.
const OUTPUTS: &[&str] = &[
    "LauncherFunctionName",
    "LauncherRoleArn",
    "InstanceRoleArn",
    "DataBucketName",
    "UploadsRuleName",
    "IntakeQueueUrl",
    "IntakeQueueArn",
    "DeadLetterQueueArn",
    "VpcId",
];

/// Every check, in order. A check that cannot run because an earlier one failed is left out:
/// the earlier failure says what to fix first.
pub async fn check(account: &impl Account, stack_name: &str) -> Vec<Line> {
    let mut lines = Vec::new();
    let stack = match account.stack(stack_name).await {
        Ok(Some(stack)) => stack,
        Ok(None) => {
            lines.push(Line::fail(
                "stack",
                format!("there is no stack {stack_name:?} in this account and region"),
                "pass --stack NAME, set AWS_REGION to the stack's region, or deploy it with \
                 scripts/deploy",
            ));
            return lines;
        }
        Err(error) => {
            lines.push(trouble(
                "stack",
                &error,
                "check the credentials and region (aws sts get-caller-identity)",
            ));
            return lines;
        }
    };
    let missing: Vec<&str> = OUTPUTS
        .iter()
        .copied()
        .filter(|name| !stack.outputs.contains_key(*name))
        .collect();
    if !missing.is_empty() {
        lines.push(Line::fail(
            "stack",
            format!(
                "stack {stack_name:?} has no output {}: an older s3spot deployed it",
                missing.join(", ")
            ),
            REDEPLOY,
        ));
        return lines;
    }
    lines.push(Line::pass("stack", format!("{stack_name:?} found")));
    let output = |name: &str| stack.outputs[name].as_str();

    let function = output("LauncherFunctionName");
    let environment = match account.function_environment(function).await {
        Ok(environment) => environment,
        Err(error) => {
            lines.push(trouble(
                "launcher function",
                &error,
                format!("check that the function {function} exists; {REDEPLOY}"),
            ));
            return lines;
        }
    };
    let setting = |name: &str| {
        environment
            .get(name)
            .map(String::as_str)
            .unwrap_or_default()
    };

    lines.push(spot_role(account, setting("S3SPOT_MARKET")).await);
    let template = launch_template(
        account,
        setting("S3SPOT_LAUNCH_TEMPLATE"),
        setting("S3SPOT_LAUNCH_TEMPLATE_VERSION"),
        setting("S3SPOT_SUBNETS"),
    )
    .await;
    lines.push(template.0);
    lines.push(
        worker_artifact(
            account,
            setting("S3SPOT_WORKER_URI"),
            setting("S3SPOT_WORKER_SHA256"),
        )
        .await,
    );
    let results_prefix = match setting("S3SPOT_RESULTS_PREFIX") {
        "" => s3spot_bootstrap::DEFAULT_RESULTS_PREFIX,
        prefix => prefix,
    };
    lines.extend(intake(account, &stack, function, results_prefix).await);
    if let Some(facts) = template.1 {
        lines.push(permissions(account, &stack, &environment, &facts).await);
    }
    lines
}

async fn spot_role(account: &impl Account, market: &str) -> Line {
    const CHECK: &str = "spot service-linked role";
    if market == "on-demand" {
        return Line::pass(CHECK, "not needed: the market is on-demand");
    }
    match account.role_exists(SPOT_ROLE).await {
        Ok(true) => Line::pass(CHECK, format!("{SPOT_ROLE} exists")),
        Ok(false) => Line::fail(
            CHECK,
            format!(
                "{SPOT_ROLE} does not exist, and EC2 refuses spot requests without it \
                 (AuthFailure.ServiceLinkedRoleCreationNotPermitted)"
            ),
            "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com",
        ),
        Err(error) => trouble(
            CHECK,
            &error,
            "retry; if it persists, create it: aws iam create-service-linked-role \
             --aws-service-name spot.amazonaws.com",
        ),
    }
}

async fn launch_template(
    account: &impl Account,
    id: &str,
    version: &str,
    subnets: &str,
) -> (Line, Option<TemplateFacts>) {
    const CHECK: &str = "launch template";
    let facts = match account.launch_template(id, version).await {
        Ok(Some(facts)) => facts,
        Ok(None) => {
            return (
                Line::fail(
                    CHECK,
                    format!(
                        "the function's S3SPOT_LAUNCH_TEMPLATE {id:?} version {version:?} does not \
                         exist"
                    ),
                    REDEPLOY,
                ),
                None,
            );
        }
        Err(error) => return (trouble(CHECK, &error, REDEPLOY), None),
    };
    let mut problems = Vec::new();
    if facts.http_tokens.as_deref() != Some("required") {
        problems.push(format!(
            "IMDSv2 is not required (HttpTokens {:?})",
            facts.http_tokens
        ));
    }
    if facts.shutdown_behavior.as_deref() != Some("terminate") {
        problems.push(format!(
            "shutdown does not terminate ({:?}): a finished instance would stay, stopped, with \
             its volume billed",
            facts.shutdown_behavior
        ));
    }
    // The fleet request names the subnets (S3SPOT_SUBNETS); without them, the template must.
    let subnets = if subnets.is_empty() {
        facts.subnet_id.clone().unwrap_or_default()
    } else {
        subnets.to_owned()
    };
    if subnets.is_empty() {
        problems.push(
            "it names no subnet, and neither does S3SPOT_SUBNETS, so EC2 would choose one itself"
                .into(),
        );
    }
    let line = if problems.is_empty() {
        Line::pass(
            CHECK,
            format!(
                "{id} version {}: IMDSv2 required, terminates on shutdown, subnets {subnets}",
                facts.version,
            ),
        )
    } else {
        Line::fail(
            CHECK,
            format!("{id} version {}: {}", facts.version, problems.join("; ")),
            REDEPLOY,
        )
    };
    (line, Some(facts))
}

async fn worker_artifact(account: &impl Account, uri: &str, sha256: &str) -> Line {
    const CHECK: &str = "worker artifact";
    let fix = "run scripts/deploy again: it uploads the worker and sets its sha256 together";
    let Some((bucket, key)) = uri
        .strip_prefix("s3://")
        .and_then(|rest| rest.split_once('/'))
    else {
        return Line::fail(
            CHECK,
            format!("the function's S3SPOT_WORKER_URI {uri:?} is not s3://bucket/key"),
            fix,
        );
    };
    match account.object_sha256(bucket, key).await {
        Ok(Some(actual)) if actual.eq_ignore_ascii_case(sha256) => {
            Line::pass(CHECK, format!("{uri} has the sha256 the function expects"))
        }
        Ok(Some(actual)) => Line::fail(
            CHECK,
            format!(
                "{uri} has sha256 {actual}, the function expects {sha256}: every instance would \
                 refuse to run it"
            ),
            fix,
        ),
        Ok(None) => Line::fail(CHECK, format!("{uri} does not exist"), fix),
        Err(error) => trouble(CHECK, &error, fix),
    }
}

async fn intake(
    account: &impl Account,
    stack: &Stack,
    function: &str,
    results_prefix: &str,
) -> Vec<Line> {
    let output = |name: &str| stack.outputs[name].as_str();
    let (bucket, rule_name) = (output("DataBucketName"), output("UploadsRuleName"));
    let (queue_url, queue_arn, dead_letter) = (
        output("IntakeQueueUrl"),
        output("IntakeQueueArn"),
        output("DeadLetterQueueArn"),
    );
    let mut lines = Vec::new();
    lines.push(match account.bucket_sends_to_eventbridge(bucket).await {
        Ok(true) => Line::pass(
            "intake: bucket",
            format!("{bucket} sends its events to EventBridge"),
        ),
        Ok(false) => Line::fail(
            "intake: bucket",
            format!("{bucket} does not send its events to EventBridge: no upload starts a job"),
            REDEPLOY,
        ),
        Err(error) => trouble("intake: bucket", &error, REDEPLOY),
    });
    lines.push(match account.rule(rule_name).await {
        Ok(Some(rule)) => {
            let target = rule.targets.iter().find(|(arn, _)| arn == queue_arn);
            // The template's pattern exactly: the data bucket's uploads, but not the results.
            let expected = serde_json::json!({
                "source": ["aws.s3"],
                "detail-type": ["Object Created"],
                "detail": {
                    "bucket": {"name": [bucket]},
                    "object": {"key": [{"anything-but": {"prefix": results_prefix}}]},
                },
            });
            let filtered = serde_json::from_str::<serde_json::Value>(&rule.pattern)
                .is_ok_and(|pattern| pattern == expected);
            match target {
                Some((_, Some(dlq))) if rule.enabled && filtered && dlq == dead_letter => {
                    Line::pass(
                        "intake: filter",
                        format!(
                            "rule {rule_name} sends uploads to the intake queue, results left out, \
                             undeliverable ones to the dead-letter queue"
                        ),
                    )
                }
                _ => Line::fail(
                    "intake: filter",
                    format!(
                        "rule {rule_name} is {}, {}, targets {:?}",
                        if rule.enabled { "enabled" } else { "DISABLED" },
                        if filtered {
                            "matches the data bucket's uploads but not the results".to_owned()
                        } else {
                            format!(
                                "has the pattern {}, not the data bucket's uploads without \
                                 {results_prefix}",
                                rule.pattern
                            )
                        },
                        rule.targets
                    ),
                    REDEPLOY,
                ),
            }
        }
        Ok(None) => Line::fail(
            "intake: filter",
            format!("there is no rule {rule_name}"),
            REDEPLOY,
        ),
        Err(error) => trouble("intake: filter", &error, REDEPLOY),
    });
    lines.push(match account.dead_letter_target(queue_url).await {
        Ok(Some(target)) if target == dead_letter => Line::pass(
            "intake: dead-letter queue",
            "messages that keep failing move to the dead-letter queue",
        ),
        Ok(other) => Line::fail(
            "intake: dead-letter queue",
            format!("the intake queue's redrive target is {other:?}, not {dead_letter}"),
            REDEPLOY,
        ),
        Err(error) => trouble("intake: dead-letter queue", &error, REDEPLOY),
    });
    lines.push(match account.event_sources(function).await {
        Ok(sources) => match sources.iter().find(|(arn, _)| arn == queue_arn) {
            Some((_, state)) if state.eq_ignore_ascii_case("enabled") => Line::pass(
                "intake: function",
                format!("{function} polls the intake queue"),
            ),
            Some((_, state)) => Line::fail(
                "intake: function",
                format!("{function}'s mapping from the intake queue is {state}"),
                format!(
                    "aws lambda update-event-source-mapping --enabled --uuid <its id> (aws lambda \
                     list-event-source-mappings --function-name {function})"
                ),
            ),
            None => Line::fail(
                "intake: function",
                format!("{function} does not poll the intake queue"),
                REDEPLOY,
            ),
        },
        Err(error) => trouble("intake: function", &error, REDEPLOY),
    });
    lines
}

/// The object a dry run launches for: under no prefix a job would skip.
const DRY_RUN_KEY: &str = "s3spot-doctor/dry-run.csv";

async fn permissions(
    account: &impl Account,
    stack: &Stack,
    environment: &BTreeMap<String, String>,
    template: &TemplateFacts,
) -> Line {
    const CHECK: &str = "launcher permissions";
    let config = match Config::from_lookup(|name| environment.get(name).cloned()) {
        Ok(config) => config,
        Err(error) => {
            return Line::fail(
                CHECK,
                format!(
                    "the function's configuration is refused: {}",
                    s3spot_lambda::error_chain(&error)
                ),
                REDEPLOY,
            );
        }
    };
    let object = ObjectCreated {
        bucket: stack.outputs["DataBucketName"].clone(),
        key: DRY_RUN_KEY.into(),
        version_id: None,
        etag: None,
        size: Some(0),
        sequencer: Some("0".into()),
        event_time: None,
    };
    let requests = match launch_requests(&config, object) {
        Ok(Some(requests)) => requests,
        Ok(None) => {
            return Line::fail(
                CHECK,
                format!("the function would skip {DRY_RUN_KEY}, so nothing could be tried"),
                "report this to s3spot's maintainers",
            );
        }
        Err(error) => return Line::fail(CHECK, error, REDEPLOY),
    };
    let role = &stack.outputs["LauncherRoleArn"];
    let template = TemplateFacts {
        vpc_id: stack.outputs.get("VpcId").cloned(),
        ..template.clone()
    };
    match account
        .may_launch(
            role,
            &stack.outputs["InstanceRoleArn"],
            &template,
            &requests,
        )
        .await
    {
        Ok(permission) if permission.denied.is_empty() => Line::pass(
            CHECK,
            format!(
                "{role} may make each of the function's {} launch request(s) ({})",
                requests.len(),
                permission.how
            ),
        ),
        Ok(permission) => Line::fail(
            CHECK,
            format!(
                "{role} may not launch ({}): {}",
                permission.how,
                permission.denied.join("; ")
            ),
            format!(
                "{REDEPLOY}; if it still fails, compare the role's policy with the template's \
                 LauncherRole (aws sts decode-authorization-message decodes EC2's message)"
            ),
        ),
        Err(error) => trouble(CHECK, &error, "retry; the error says what failed"),
    }
}

/// The report as a person reads it: one line per check, and for a failure, what to do.
pub fn render(lines: &[Line]) -> String {
    let mut text = String::new();
    for line in lines {
        match &line.outcome {
            Outcome::Pass(detail) => text.push_str(&format!("ok    {}: {detail}\n", line.check)),
            Outcome::Fail { problem, fix } => text.push_str(&format!(
                "FAIL  {}: {problem}\n      to fix: {fix}\n",
                line.check
            )),
        }
    }
    let failed = lines.iter().filter(|l| !l.passed()).count();
    if failed == 0 {
        text.push_str("all checks passed\n");
    } else {
        text.push_str(&format!("{failed} of {} checks failed\n", lines.len()));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An account whose every answer is the same error.
    struct Refusing(bool);

    fn refused(denied: bool) -> AccountError {
        AccountError {
            operation: "cloudformation:DescribeStacks",
            denied,
            message: "AccessDenied: no".into(),
        }
    }

    #[async_trait::async_trait]
    impl Account for Refusing {
        async fn stack(&self, _: &str) -> Result<Option<Stack>, AccountError> {
            Err(refused(self.0))
        }
        async fn role_exists(&self, _: &str) -> Result<bool, AccountError> {
            Err(refused(self.0))
        }
        async fn launch_template(
            &self,
            _: &str,
            _: &str,
        ) -> Result<Option<TemplateFacts>, AccountError> {
            Err(refused(self.0))
        }
        async fn function_environment(
            &self,
            _: &str,
        ) -> Result<BTreeMap<String, String>, AccountError> {
            Err(refused(self.0))
        }
        async fn object_sha256(&self, _: &str, _: &str) -> Result<Option<String>, AccountError> {
            Err(refused(self.0))
        }
        async fn bucket_sends_to_eventbridge(&self, _: &str) -> Result<bool, AccountError> {
            Err(refused(self.0))
        }
        async fn rule(&self, _: &str) -> Result<Option<RuleFacts>, AccountError> {
            Err(refused(self.0))
        }
        async fn dead_letter_target(&self, _: &str) -> Result<Option<String>, AccountError> {
            Err(refused(self.0))
        }
        async fn event_sources(&self, _: &str) -> Result<Vec<EventSource>, AccountError> {
            Err(refused(self.0))
        }
        async fn may_launch(
            &self,
            _: &str,
            _: &str,
            _: &TemplateFacts,
            _: &[LaunchRequest],
        ) -> Result<Permission, AccountError> {
            Err(refused(self.0))
        }
    }

    #[tokio::test]
    async fn a_refusal_of_the_callers_credentials_names_the_call_to_allow() {
        let lines = check(&Refusing(true), "s3spot").await;
        let [
            Line {
                outcome: Outcome::Fail { fix, .. },
                ..
            },
        ] = lines.as_slice()
        else {
            panic!("{lines:?}")
        };
        assert!(
            fix.contains("your credentials may not call cloudformation:DescribeStacks"),
            "{fix}"
        );
        let lines = check(&Refusing(false), "s3spot").await;
        let [
            Line {
                outcome: Outcome::Fail { fix, .. },
                ..
            },
        ] = lines.as_slice()
        else {
            panic!("{lines:?}")
        };
        assert!(fix.contains("check the credentials and region"), "{fix}");
        assert!(render(&lines).ends_with("1 of 1 checks failed\n"));
    }
}
