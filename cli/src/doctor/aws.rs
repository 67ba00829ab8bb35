//! [`Account`] over the AWS SDK, with the person's own credentials.

use std::collections::BTreeMap;

use aws_sdk_iam::types::{ContextEntry, ContextKeyTypeEnum, PolicyEvaluationDecisionType};
use s3spot_lambda::config::{LaunchTemplate, MarketType};
use s3spot_lambda::ec2::DryRun;
use s3spot_lambda::{Ec2Launcher, LaunchRequest};
use sha2::{Digest as _, Sha256};

use super::{Account, AccountError, EventSource, Permission, RuleFacts, Stack, TemplateFacts};

pub struct AwsAccount {
    sdk: aws_config::SdkConfig,
    cloudformation: aws_sdk_cloudformation::Client,
    ec2: aws_sdk_ec2::Client,
    events: aws_sdk_eventbridge::Client,
    iam: aws_sdk_iam::Client,
    lambda: aws_sdk_lambda::Client,
    s3: aws_sdk_s3::Client,
    sqs: aws_sdk_sqs::Client,
    sts: aws_sdk_sts::Client,
}

impl AwsAccount {
    pub fn new(sdk: &aws_config::SdkConfig) -> AwsAccount {
        // A custom endpoint (an S3-compatible server, an emulator) seldom has per-bucket DNS.
        let s3 = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .build();
        AwsAccount {
            sdk: sdk.clone(),
            cloudformation: aws_sdk_cloudformation::Client::new(sdk),
            ec2: aws_sdk_ec2::Client::new(sdk),
            events: aws_sdk_eventbridge::Client::new(sdk),
            iam: aws_sdk_iam::Client::new(sdk),
            lambda: aws_sdk_lambda::Client::new(sdk),
            s3: aws_sdk_s3::Client::from_conf(s3),
            sqs: aws_sdk_sqs::Client::new(sdk),
            sts: aws_sdk_sts::Client::new(sdk),
        }
    }

    fn region(&self) -> String {
        self.sdk
            .region()
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// The launch as the launcher's own role, with DryRun; `None` when that role cannot be
    /// assumed by this caller (the usual case: only Lambda is trusted to assume it).
    async fn dry_run_as(
        &self,
        role_arn: &str,
        requests: &[LaunchRequest],
    ) -> Result<Option<Permission>, AccountError> {
        let assumed = match self
            .sts
            .assume_role()
            .role_arn(role_arn)
            .role_session_name("s3spot-doctor")
            .duration_seconds(900)
            .send()
            .await
        {
            Ok(assumed) => assumed,
            Err(error) if error.code() == Some("AccessDenied") => return Ok(None),
            Err(error) => return Err(sdk_error("sts:AssumeRole", &error)),
        };
        let credentials = assumed.credentials().ok_or_else(|| AccountError {
            operation: "sts:AssumeRole",
            denied: false,
            message: "the answer holds no credentials".into(),
        })?;
        let credentials = aws_credential_types::Credentials::new(
            credentials.access_key_id(),
            credentials.secret_access_key(),
            Some(credentials.session_token().to_owned()),
            std::time::SystemTime::try_from(*credentials.expiration()).ok(),
            "s3spot-doctor",
        );
        let as_launcher = self
            .sdk
            .to_builder()
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(credentials),
            )
            .build();
        let launcher = Ec2Launcher::new(&as_launcher);
        let mut denied = Vec::new();
        for request in requests {
            match launcher.dry_run(request).await {
                DryRun::WouldSucceed => {}
                DryRun::Unauthorized(message) => denied.push(format!(
                    "{} request: UnauthorizedOperation: {message}",
                    request.market
                )),
                DryRun::Failed(message) => {
                    denied.push(format!("{} request: {message}", request.market));
                }
                DryRun::Unreachable(message) => {
                    return Err(AccountError {
                        operation: "ec2:CreateFleet (DryRun)",
                        denied: false,
                        message,
                    });
                }
            }
        }
        Ok(Some(Permission {
            how: "launches by a DryRun of each request under the launcher's role".into(),
            denied,
        }))
    }

    /// IAM's policy simulator, for the role's own policies, with the context keys the launch
    /// template's conditions read.
    async fn simulate(
        &self,
        role_arn: &str,
        instance_role_arn: &str,
        template: &TemplateFacts,
        requests: &[LaunchRequest],
    ) -> Result<Permission, AccountError> {
        // arn:<partition>:iam::<account>:role/<name>
        let parts: Vec<&str> = role_arn.split(':').collect();
        let (partition, account) = match parts.as_slice() {
            ["arn", partition, "iam", "", account, ..] => (*partition, *account),
            _ => {
                return Err(AccountError {
                    operation: "iam:SimulatePrincipalPolicy",
                    denied: false,
                    message: format!("{role_arn:?} is not an IAM role ARN"),
                });
            }
        };
        let region = self.region();
        let ec2 = |resource: &str| format!("arn:{partition}:ec2:{region}:{account}:{resource}");
        let mut denied = Vec::new();
        for request in requests {
            let template_arn = match &request.template {
                LaunchTemplate::Id(id) => ec2(&format!("launch-template/{id}")),
                LaunchTemplate::Name(name) => ec2(&format!("launch-template/{name}")),
            };
            let common = vec![
                entry(
                    "ec2:LaunchTemplate",
                    &template_arn,
                    ContextKeyTypeEnum::String,
                ),
                entry(
                    "ec2:MetadataHttpTokens",
                    "required",
                    ContextKeyTypeEnum::String,
                ),
                entry(
                    "ec2:CreateAction",
                    "RunInstances",
                    ContextKeyTypeEnum::String,
                ),
                entry(
                    "iam:PassedToService",
                    "ec2.amazonaws.com",
                    ContextKeyTypeEnum::String,
                ),
            ];
            let with = |mut context: Vec<ContextEntry>, extra: Vec<ContextEntry>| {
                context.extend(extra);
                context
            };
            let from_template = || {
                vec![entry(
                    "ec2:IsLaunchTemplateResource",
                    "true",
                    ContextKeyTypeEnum::Boolean,
                )]
            };
            // What the request overrides is not the template's: the volume, when sized, and the
            // network, when the request names subnets. A context that cannot be known here (the
            // template's volume size, the VPC) leaves its resources out rather than reporting
            // a refusal IAM would not make.
            let volume = request
                .volume_gib
                .map(|gib| (gib, false))
                .or(template.root_volume_gib.map(|gib| (gib, true)))
                .map(|(gib, from_template)| {
                    vec![
                        entry(
                            "ec2:IsLaunchTemplateResource",
                            if from_template { "true" } else { "false" },
                            ContextKeyTypeEnum::Boolean,
                        ),
                        entry(
                            "ec2:VolumeSize",
                            &gib.to_string(),
                            ContextKeyTypeEnum::Numeric,
                        ),
                    ]
                });
            let subnets: Vec<String> = {
                let named: Vec<String> = request
                    .pools
                    .iter()
                    .filter_map(|p| p.subnet_id.clone())
                    .collect();
                if named.is_empty() {
                    template.subnet_id.iter().cloned().collect()
                } else {
                    named
                }
            };
            let network = template.vpc_id.as_ref().map(|vpc| {
                vec![
                    entry(
                        "ec2:IsLaunchTemplateResource",
                        "false",
                        ContextKeyTypeEnum::Boolean,
                    ),
                    entry(
                        "ec2:Vpc",
                        &ec2(&format!("vpc/{vpc}")),
                        ContextKeyTypeEnum::String,
                    ),
                ]
            });
            let images: Vec<String> = template
                .image_id
                .iter()
                .map(|i| format!("arn:{partition}:ec2:{region}::image/{i}"))
                .collect();
            let mut launch = vec![template_arn.clone()];
            launch.extend(
                template
                    .security_group_ids
                    .iter()
                    .map(|g| ec2(&format!("security-group/{g}"))),
            );
            launch.extend(images.iter().cloned());
            if request.market == MarketType::Spot {
                launch.push(ec2("spot-instances-request/*"));
            }
            let mut fleet_from_template = vec![template_arn.clone()];
            fleet_from_template.extend(images);
            let types: Vec<Option<&str>> = {
                let mut types: Vec<Option<&str>> = request
                    .pools
                    .iter()
                    .map(|p| p.instance_type.as_deref())
                    .collect();
                types.dedup();
                types
            };
            let mut calls = vec![
                ("ec2:CreateFleet", vec![ec2("fleet/*")], common.clone()),
                (
                    "ec2:RunInstances",
                    launch,
                    with(common.clone(), from_template()),
                ),
                (
                    "ec2:CreateFleet",
                    fleet_from_template,
                    with(common.clone(), from_template()),
                ),
                ("ec2:CreateTags", vec![ec2("instance/*")], common.clone()),
                (
                    "iam:PassRole",
                    vec![instance_role_arn.to_owned()],
                    common.clone(),
                ),
            ];
            if let Some(context) = volume {
                for action in ["ec2:RunInstances", "ec2:CreateFleet"] {
                    calls.push((
                        action,
                        vec![ec2("volume/*")],
                        with(common.clone(), context.clone()),
                    ));
                }
            }
            if let Some(context) = network {
                let subnet_arns: Vec<String> = subnets
                    .iter()
                    .map(|s| ec2(&format!("subnet/{s}")))
                    .collect();
                let mut interfaces = subnet_arns.clone();
                interfaces.push(ec2("network-interface/*"));
                calls.push((
                    "ec2:RunInstances",
                    interfaces,
                    with(common.clone(), context.clone()),
                ));
                if !subnet_arns.is_empty() {
                    calls.push((
                        "ec2:CreateFleet",
                        subnet_arns,
                        with(common.clone(), context),
                    ));
                }
            }
            for instance_type in types {
                let mut context = common.clone();
                if let Some(instance_type) = instance_type {
                    context.push(entry(
                        "ec2:InstanceType",
                        instance_type,
                        ContextKeyTypeEnum::String,
                    ));
                }
                for action in ["ec2:RunInstances", "ec2:CreateFleet"] {
                    calls.push((action, vec![ec2("instance/*")], context.clone()));
                }
            }
            for (action, resources, context) in calls {
                let answer = self
                    .iam
                    .simulate_principal_policy()
                    .policy_source_arn(role_arn)
                    .action_names(action)
                    .set_resource_arns(Some(resources))
                    .set_context_entries(Some(context))
                    .send()
                    .await
                    .map_err(|e| sdk_error("iam:SimulatePrincipalPolicy", &e))?;
                denied.extend(
                    refusals(answer.evaluation_results())
                        .into_iter()
                        .map(|refusal| format!("{} request: {refusal}", request.market)),
                );
            }
        }
        Ok(Permission {
            how: "by IAM's policy simulator, as the launcher's role cannot be assumed here".into(),
            denied,
        })
    }
}

impl AwsAccount {
    async fn simulate_rest(
        &self,
        role_arn: &str,
        requests: &[LaunchRequest],
    ) -> Result<Vec<String>, AccountError> {
        let Some(request) = requests.first() else {
            return Ok(Vec::new());
        };
        let job = s3spot_bootstrap::job_from_base64_user_data(&request.user_data).map_err(|e| {
            AccountError {
                operation: "iam:SimulatePrincipalPolicy",
                denied: false,
                message: format!("the dry run's job cannot be read back: {e}"),
            }
        })?;
        let pipeline = request
            .tags
            .iter()
            .find(|(k, _)| k == s3spot_lambda::launcher::TAG_PIPELINE)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let partition = role_arn.split(':').nth(1).unwrap_or("aws");
        let account = role_arn.split(':').nth(4).unwrap_or_default();
        let region = self.region();
        let instances = format!("arn:{partition}:ec2:{region}:{account}:instance/*");
        let bucket = format!("arn:{partition}:s3:::{}", job.results_bucket);
        let objects = vec![
            format!("{bucket}/{}", job.status_key()),
            format!("{bucket}/{}", job.claim_key()),
        ];
        let tagged = vec![entry(
            &format!("ec2:ResourceTag/{}", s3spot_lambda::launcher::TAG_PIPELINE),
            &pipeline,
            ContextKeyTypeEnum::String,
        )];
        let mut denied = Vec::new();
        for (actions, resources, context) in [
            (
                vec!["ec2:DescribeInstances"],
                vec!["*".to_owned()],
                Vec::new(),
            ),
            (
                vec![
                    "ec2:TerminateInstances",
                    "ec2:DescribeInstanceAttribute",
                    "ec2:GetConsoleOutput",
                ],
                vec![instances],
                tagged,
            ),
            (vec!["s3:GetObject", "s3:PutObject"], objects, Vec::new()),
            (vec!["s3:ListBucket"], vec![bucket], Vec::new()),
        ] {
            let answer = self
                .iam
                .simulate_principal_policy()
                .policy_source_arn(role_arn)
                .set_action_names(Some(actions.iter().map(|a| (*a).to_owned()).collect()))
                .set_resource_arns(Some(resources))
                .set_context_entries((!context.is_empty()).then_some(context))
                .send()
                .await
                .map_err(|e| sdk_error("iam:SimulatePrincipalPolicy", &e))?;
            denied.extend(refusals(answer.evaluation_results()));
        }
        Ok(denied)
    }
}

/// What the simulator refused, one line per action and resource. IAM may answer one result per
/// action, with the resources inside it; each of those is named.
fn refusals(results: &[aws_sdk_iam::types::EvaluationResult]) -> Vec<String> {
    let mut refused = Vec::new();
    for result in results {
        let action = result.eval_action_name();
        let per_resource = result.resource_specific_results();
        if per_resource.is_empty() {
            if result.eval_decision() != &PolicyEvaluationDecisionType::Allowed {
                refused.push(format!(
                    "{action} on {} is {}",
                    result.eval_resource_name().unwrap_or("*"),
                    result.eval_decision().as_str()
                ));
            }
        } else {
            for resource in per_resource {
                if resource.eval_resource_decision() != &PolicyEvaluationDecisionType::Allowed {
                    refused.push(format!(
                        "{action} on {} is {}",
                        resource.eval_resource_name(),
                        resource.eval_resource_decision().as_str()
                    ));
                }
            }
        }
    }
    refused
}

fn entry(name: &str, value: &str, kind: ContextKeyTypeEnum) -> ContextEntry {
    ContextEntry::builder()
        .context_key_name(name)
        .context_key_values(value)
        .context_key_type(kind)
        .build()
}

fn sdk_error<E>(operation: &'static str, error: &aws_sdk_s3::error::SdkError<E>) -> AccountError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    let denied = error.code().is_some_and(|code| {
        code.starts_with("AccessDenied")
            || code.starts_with("Unauthorized")
            || code == "AuthorizationError"
    }) || error
        .raw_response()
        .is_some_and(|r| r.status().as_u16() == 403);
    AccountError {
        operation,
        denied,
        message: match (error.code(), error.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_owned(),
            _ => aws_sdk_s3::error::DisplayErrorContext(error).to_string(),
        },
    }
}

use aws_sdk_s3::error::ProvideErrorMetadata as _;

#[async_trait::async_trait]
impl Account for AwsAccount {
    async fn stack(&self, name: &str) -> Result<Option<Stack>, AccountError> {
        let answer = match self
            .cloudformation
            .describe_stacks()
            .stack_name(name)
            .send()
            .await
        {
            Ok(answer) => answer,
            // "Stack with id NAME does not exist"
            Err(error)
                if error.code() == Some("ValidationError")
                    && error
                        .message()
                        .is_some_and(|m| m.contains("does not exist")) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(sdk_error("cloudformation:DescribeStacks", &error)),
        };
        Ok(answer.stacks().first().map(|stack| Stack {
            outputs: stack
                .outputs()
                .iter()
                .filter_map(|o| Some((o.output_key()?.to_owned(), o.output_value()?.to_owned())))
                .collect(),
            parameters: stack
                .parameters()
                .iter()
                .filter_map(|p| {
                    Some((
                        p.parameter_key()?.to_owned(),
                        p.parameter_value()?.to_owned(),
                    ))
                })
                .collect(),
        }))
    }

    async fn role_exists(&self, name: &str) -> Result<bool, AccountError> {
        match self.iam.get_role().role_name(name).send().await {
            Ok(_) => Ok(true),
            Err(error) if error.code() == Some("NoSuchEntity") => Ok(false),
            Err(error) => Err(sdk_error("iam:GetRole", &error)),
        }
    }

    async fn launch_template(
        &self,
        id: &str,
        version: &str,
    ) -> Result<Option<TemplateFacts>, AccountError> {
        let answer = match self
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(id)
            .versions(version)
            .send()
            .await
        {
            Ok(answer) => answer,
            Err(error)
                if error
                    .code()
                    .is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(sdk_error("ec2:DescribeLaunchTemplateVersions", &error)),
        };
        Ok(answer.launch_template_versions().first().map(|found| {
            let data = found.launch_template_data();
            let interface = data.and_then(|d| d.network_interfaces().first());
            TemplateFacts {
                version: found
                    .version_number()
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| version.to_owned()),
                http_tokens: data
                    .and_then(|d| d.metadata_options())
                    .and_then(|m| m.http_tokens())
                    .map(|t| t.as_str().to_owned()),
                shutdown_behavior: data
                    .and_then(|d| d.instance_initiated_shutdown_behavior())
                    .map(|b| b.as_str().to_owned()),
                subnet_id: interface.and_then(|i| i.subnet_id()).map(str::to_owned),
                vpc_id: None,
                root_volume_gib: data
                    .and_then(|d| {
                        d.block_device_mappings()
                            .iter()
                            .find_map(|m| m.ebs().and_then(|e| e.volume_size()))
                    })
                    .and_then(|gib| u64::try_from(gib).ok()),
                security_group_ids: interface
                    .map(|i| i.groups().to_vec())
                    .filter(|g| !g.is_empty())
                    .or_else(|| data.map(|d| d.security_group_ids().to_vec()))
                    .unwrap_or_default(),
                image_id: data.and_then(|d| d.image_id()).map(str::to_owned),
            }
        }))
    }

    async fn function_environment(
        &self,
        function: &str,
    ) -> Result<BTreeMap<String, String>, AccountError> {
        let answer = self
            .lambda
            .get_function_configuration()
            .function_name(function)
            .send()
            .await
            .map_err(|e| sdk_error("lambda:GetFunctionConfiguration", &e))?;
        Ok(answer
            .environment()
            .and_then(|e| e.variables())
            .map(|v| v.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    async fn object_sha256(&self, bucket: &str, key: &str) -> Result<Option<String>, AccountError> {
        let answer = match self.s3.get_object().bucket(bucket).key(key).send().await {
            Ok(answer) => answer,
            Err(error) if error.code() == Some("NoSuchKey") => return Ok(None),
            Err(error) => return Err(sdk_error("s3:GetObject", &error)),
        };
        let mut body = answer.body;
        let mut hash = Sha256::new();
        while let Some(chunk) = body.try_next().await.map_err(|e| AccountError {
            operation: "s3:GetObject",
            denied: false,
            message: e.to_string(),
        })? {
            hash.update(&chunk);
        }
        Ok(Some(hex::encode(hash.finalize())))
    }

    async fn bucket_sends_to_eventbridge(&self, bucket: &str) -> Result<bool, AccountError> {
        let answer = self
            .s3
            .get_bucket_notification_configuration()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| sdk_error("s3:GetBucketNotificationConfiguration", &e))?;
        Ok(answer.event_bridge_configuration().is_some())
    }

    async fn rule(&self, name: &str) -> Result<Option<RuleFacts>, AccountError> {
        let rule = match self.events.describe_rule().name(name).send().await {
            Ok(rule) => rule,
            Err(error) if error.code() == Some("ResourceNotFoundException") => return Ok(None),
            Err(error) => return Err(sdk_error("events:DescribeRule", &error)),
        };
        let targets = self
            .events
            .list_targets_by_rule()
            .rule(name)
            .send()
            .await
            .map_err(|e| sdk_error("events:ListTargetsByRule", &e))?;
        Ok(Some(RuleFacts {
            enabled: rule
                .state()
                .is_some_and(|s| s.as_str().eq_ignore_ascii_case("ENABLED")),
            pattern: rule.event_pattern().unwrap_or_default().to_owned(),
            targets: targets
                .targets()
                .iter()
                .map(|t| {
                    (
                        t.arn().to_owned(),
                        t.dead_letter_config()
                            .and_then(|d| d.arn())
                            .map(str::to_owned),
                    )
                })
                .collect(),
        }))
    }

    async fn dead_letter_target(&self, queue_url: &str) -> Result<Option<String>, AccountError> {
        let answer = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue_url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
            .send()
            .await
            .map_err(|e| sdk_error("sqs:GetQueueAttributes", &e))?;
        let policy = answer
            .attributes()
            .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy));
        Ok(policy
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|p| p["deadLetterTargetArn"].as_str().map(str::to_owned)))
    }

    async fn event_sources(&self, function: &str) -> Result<Vec<EventSource>, AccountError> {
        let answer = self
            .lambda
            .list_event_source_mappings()
            .function_name(function)
            .send()
            .await
            .map_err(|e| sdk_error("lambda:ListEventSourceMappings", &e))?;
        Ok(answer
            .event_source_mappings()
            .iter()
            .map(|m| {
                (
                    m.event_source_arn().unwrap_or_default().to_owned(),
                    m.state().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    async fn may_launch(
        &self,
        role_arn: &str,
        instance_role_arn: &str,
        template: &TemplateFacts,
        requests: &[LaunchRequest],
    ) -> Result<Permission, AccountError> {
        let mut permission = match self.dry_run_as(role_arn, requests).await? {
            Some(mut permission) => {
                permission.how = format!("{}, the rest by IAM's policy simulator", permission.how);
                permission
            }
            None => {
                self.simulate(role_arn, instance_role_arn, template, requests)
                    .await?
            }
        };
        // What else a launch needs, which no DryRun can try: the runaway guard's count, the
        // claim and the status, and the reaper's actions on the pipeline's instances.
        permission
            .denied
            .extend(self.simulate_rest(role_arn, requests).await?);
        Ok(permission)
    }
}
