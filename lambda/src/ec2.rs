//! [`Launcher`] on EC2: `RunInstances` from a launch template, `DescribeInstances` for the guard
//! and the job commands, `TerminateInstances` for cancelling and reaping, and the spot price
//! history.

use aws_sdk_ec2::config::interceptors::InterceptorContext;
use aws_sdk_ec2::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::run_instances::RunInstancesError;
use aws_sdk_ec2::types::{
    Filter, HttpTokensState, InstanceAttributeName, InstanceInterruptionBehavior,
    InstanceLifecycleType, InstanceMarketOptionsRequest, InstanceMetadataEndpointState,
    InstanceMetadataOptionsRequest, InstanceType, LaunchTemplateSpecification,
    MarketType as Ec2MarketType, ResourceType, ShutdownBehavior, SpotInstanceType,
    SpotMarketOptions, Tag, TagSpecification,
};

use crate::config::{LaunchTemplate, MarketType};
use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PriceQuery, SpotPrice,
    StateReason, TAG_JOB, TAG_PIPELINE,
};

/// The spot prices s3spot compares: those of the Linux images that jobs run on.
const PRODUCT_DESCRIPTION: &str = "Linux/UNIX";

/// Errors that mean "no capacity for this option": move on to the next one.
const CAPACITY_ERRORS: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "SpotMaxPriceTooLow",
    "MaxSpotInstanceCountExceeded",
    "UnfulfillableCapacity",
];

/// Account limits: another option would hit the same wall, and waiting frees them up.
const QUOTA_ERRORS: &[&str] = &["VcpuLimitExceeded", "InstanceLimitExceeded"];

/// Spot through the API needs this service-linked role, which a fresh account does not have
/// (only the console creates it on the fly). Without it, spot can never launch, but on-demand
/// can.
pub const SPOT_ROLE_MISSING: &str = "AuthFailure.ServiceLinkedRoleCreationNotPermitted";

/// What to do about [`SPOT_ROLE_MISSING`], in the error the launcher logs and reports.
const SPOT_ROLE_REMEDY: &str = "spot needs the service-linked role AWSServiceRoleForEC2Spot, \
     which this account does not have: create it once with `aws iam create-service-linked-role \
     --aws-service-name spot.amazonaws.com` (scripts/deploy does), then redrive the dead-letter \
     queue";

/// Whether EC2 refused this option for good: a type not offered in the zone (`Unsupported`),
/// or an instance type EC2 rejects as a value (unknown here, or not the image's architecture).
fn not_offered(code: &str, message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    code == "Unsupported"
        || (code == "InvalidParameterValue"
            && (message.contains("instance type") || message.contains("instancetype")))
}

/// Codes that are worth retrying later even after the SDK's own retries ran out.
const TRANSIENT_ERRORS: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
];

#[derive(Debug, Clone)]
pub struct Ec2Launcher {
    client: aws_sdk_ec2::Client,
}

impl Ec2Launcher {
    /// A launcher on the standard AWS configuration (region, credential chain, `AWS_ENDPOINT_URL`
    /// / `AWS_ENDPOINT_URL_EC2`, retries), tuned by [`configure`].
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        let config = configure(aws_sdk_ec2::config::Builder::from(sdk)).build();
        Self::from_client(aws_sdk_ec2::Client::from_conf(config))
    }

    /// For clients built elsewhere, e.g. with [`configure`] applied to a test configuration.
    pub fn from_client(client: aws_sdk_ec2::Client) -> Self {
        Ec2Launcher { client }
    }
}

/// What s3spot changes in the SDK's EC2 configuration: capacity errors are final.
///
/// `InsufficientInstanceCapacity` comes back as HTTP 500, which the SDK would retry three times
/// with backoff. Capacity seldom returns within seconds; the next instance type or market
/// often has it now.
pub fn configure(builder: aws_sdk_ec2::config::Builder) -> aws_sdk_ec2::config::Builder {
    builder.retry_classifier(CapacityIsFinal)
}

#[derive(Debug)]
struct CapacityIsFinal;

impl ClassifyRetry for CapacityIsFinal {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let code = match ctx.output_or_error() {
            Some(Err(error)) => error
                .as_operation_error()
                .and_then(|e| e.downcast_ref::<RunInstancesError>())
                .and_then(ProvideErrorMetadata::code),
            _ => None,
        };
        match code {
            Some(code) if CAPACITY_ERRORS.contains(&code) => RetryAction::RetryForbidden,
            _ => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "s3spot: capacity errors are not retried"
    }
}

impl Launcher for Ec2Launcher {
    async fn count_active(&self, pipeline: &str, enough: usize) -> Result<usize, LaunchError> {
        let mut pages = self
            .client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{TAG_PIPELINE}"))
                    .values(pipeline)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name("instance-state-name")
                    .values("pending")
                    .values("running")
                    .build(),
            )
            // EC2 pages hold 5 to 1000 instances. Parsing an instance is most of this call's
            // cost, so ask for no more than the cap needs.
            .max_results(i32::try_from(enough.clamp(5, 1000)).unwrap_or(1000))
            .into_paginator()
            .send();
        let mut count = 0;
        while count < enough
            && let Some(page) = pages.next().await
        {
            let page = page.map_err(|e| api_error("DescribeInstances", &e))?;
            count += page
                .reservations()
                .iter()
                .map(|r| r.instances().len())
                .sum::<usize>();
        }
        Ok(count)
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Launched, LaunchError> {
        let output = run_instances(&self.client, request)
            .send()
            .await
            .map_err(classify_run_instances)?;
        let instance = output.instances().first().ok_or_else(|| LaunchError::Api {
            operation: "RunInstances",
            message: "the response lists no instance".into(),
            retryable: true,
        })?;
        Ok(Launched {
            instance_id: instance.instance_id().unwrap_or_default().to_owned(),
            instance_type: instance.instance_type().map(|t| t.as_str().to_owned()),
        })
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, LaunchError> {
        let output = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await;
        let output = match output {
            Ok(output) => output,
            // EC2 forgets terminated instances after about an hour.
            Err(error) if error.code() == Some("InvalidInstanceID.NotFound") => return Ok(None),
            Err(error) => return Err(api_error("DescribeInstances", &error)),
        };
        Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .map(instance_info))
    }

    async fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, LaunchError> {
        let tag = |name: &str, value: &str| {
            Filter::builder()
                .name(format!("tag:{name}"))
                .values(value)
                .build()
        };
        let mut filters = vec![tag(TAG_PIPELINE, pipeline)];
        filters.extend(job.map(|job| tag(TAG_JOB, job)));
        let mut pages = self
            .client
            .describe_instances()
            .set_filters(Some(filters))
            .into_paginator()
            .send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("DescribeInstances", &e))?;
            instances.extend(
                page.reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .map(instance_info),
            );
        }
        Ok(instances)
    }

    async fn user_data(&self, instance_id: &str) -> Result<String, LaunchError> {
        let output = self
            .client
            .describe_instance_attribute()
            .instance_id(instance_id)
            .attribute(InstanceAttributeName::UserData)
            .send()
            .await
            .map_err(|e| api_error("DescribeInstanceAttribute", &e))?;
        output
            .user_data()
            .and_then(|u| u.value())
            .map(str::to_owned)
            .ok_or_else(|| LaunchError::Api {
                operation: "DescribeInstanceAttribute",
                message: format!("instance {instance_id} has no user-data"),
                retryable: false,
            })
    }

    async fn console_output(&self, instance_id: &str) -> Result<Option<String>, LaunchError> {
        let output = match self
            .client
            .get_console_output()
            .instance_id(instance_id)
            .send()
            .await
        {
            Ok(output) => output,
            Err(error) if error.code() == Some("InvalidInstanceID.NotFound") => return Ok(None),
            Err(error) => return Err(api_error("GetConsoleOutput", &error)),
        };
        // EC2 sends the output base64-encoded, as the console wrote it (not always UTF-8).
        Ok(output
            .output()
            .and_then(|encoded| {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .ok()
            })
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .filter(|text| !text.is_empty()))
    }

    async fn terminate(&self, instance_ids: &[String]) -> Result<(), LaunchError> {
        if instance_ids.is_empty() {
            return Ok(());
        }
        self.client
            .terminate_instances()
            .set_instance_ids(Some(instance_ids.to_vec()))
            .send()
            .await
            .map_err(|e| api_error("TerminateInstances", &e))?;
        Ok(())
    }

    async fn spot_prices(&self, query: &PriceQuery) -> Result<Vec<SpotPrice>, LaunchError> {
        let mut pages = self
            .client
            .describe_spot_price_history()
            .product_descriptions(PRODUCT_DESCRIPTION)
            .set_instance_types(Some(
                query
                    .instance_types
                    .iter()
                    .map(|t| InstanceType::from(t.as_str()))
                    .collect(),
            ))
            // The filter rather than the parameter of the same name: both mean the same to EC2,
            // and emulators know the filter.
            .set_filters(query.availability_zone.as_ref().map(|zone| {
                vec![
                    Filter::builder()
                        .name("availability-zone")
                        .values(zone)
                        .build(),
                ]
            }))
            .set_start_time(
                query
                    .since
                    .map(aws_sdk_ec2::primitives::DateTime::from_secs),
            )
            .into_paginator()
            .send();
        let mut prices = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| api_error("DescribeSpotPriceHistory", &e))?;
            for entry in page.spot_price_history() {
                let (Some(instance_type), Some(zone), Some(price)) = (
                    entry.instance_type(),
                    entry.availability_zone(),
                    entry.spot_price(),
                ) else {
                    continue;
                };
                let usd_per_hour = price.parse::<f64>().map_err(|_| LaunchError::Api {
                    operation: "DescribeSpotPriceHistory",
                    message: format!("unreadable price {price:?} for {instance_type} in {zone}"),
                    retryable: false,
                })?;
                prices.push(SpotPrice {
                    instance_type: instance_type.as_str().to_owned(),
                    availability_zone: zone.to_owned(),
                    usd_per_hour,
                    at: entry.timestamp().map_or(0, |t| t.secs()),
                });
            }
        }
        Ok(prices)
    }
}

fn instance_info(instance: &aws_sdk_ec2::types::Instance) -> InstanceInfo {
    InstanceInfo {
        instance_id: instance.instance_id().unwrap_or_default().to_owned(),
        state: instance
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap_or_default(),
        instance_type: instance.instance_type().map(|t| t.as_str().to_owned()),
        market: match instance.instance_lifecycle() {
            Some(InstanceLifecycleType::Spot) => "spot",
            _ => "on-demand",
        }
        .to_owned(),
        launched_at: instance.launch_time().map(|t| t.secs()),
        state_reason: instance.state_reason().and_then(|reason| {
            Some(StateReason {
                code: reason.code()?.to_owned(),
                message: reason.message().unwrap_or_default().to_owned(),
            })
        }),
        tags: instance
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    }
}

/// The `RunInstances` call for `request`: the function's launches, and `s3spot doctor`'s dry
/// runs of them, are the same request.
fn run_instances(
    client: &aws_sdk_ec2::Client,
    request: &LaunchRequest,
) -> aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder {
    let template = match &request.template {
        LaunchTemplate::Id(id) => LaunchTemplateSpecification::builder().launch_template_id(id),
        LaunchTemplate::Name(name) => {
            LaunchTemplateSpecification::builder().launch_template_name(name)
        }
    }
    .version(&request.template_version)
    .build();
    let tags: Vec<Tag> = request
        .tags
        .iter()
        .map(|(key, value)| Tag::builder().key(key).value(value).build())
        .collect();
    let tag = |resource: ResourceType| {
        TagSpecification::builder()
            .resource_type(resource)
            .set_tags(Some(tags.clone()))
            .build()
    };
    let spot = (request.option.market == MarketType::Spot).then(|| {
        InstanceMarketOptionsRequest::builder()
            .market_type(Ec2MarketType::Spot)
            .spot_options(
                SpotMarketOptions::builder()
                    .spot_instance_type(SpotInstanceType::OneTime)
                    .instance_interruption_behavior(InstanceInterruptionBehavior::Terminate)
                    .build(),
            )
            .build()
    });
    client
        .run_instances()
        .launch_template(template)
        .min_count(1)
        .max_count(1)
        .client_token(&request.client_token)
        .user_data(&request.user_data)
        // The template is trusted for image, network and profile, but these two are what
        // keep a finished job from billing and its credentials from leaking: state them.
        .instance_initiated_shutdown_behavior(ShutdownBehavior::Terminate)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .build(),
        )
        .set_instance_market_options(spot)
        .set_instance_type(
            request
                .option
                .instance_type
                .as_deref()
                .map(InstanceType::from),
        )
        .tag_specifications(tag(ResourceType::Instance))
        .tag_specifications(tag(ResourceType::Volume))
}

/// What EC2 answered a `DryRun` of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DryRun {
    /// `DryRunOperation`: the request would have succeeded, IAM included.
    WouldSucceed,
    /// `UnauthorizedOperation`, with EC2's message (and its encoded authorization message).
    Unauthorized(String),
    /// Any other answer, as `Code: message`.
    Failed(String),
    /// No answer: a timeout, a connection that failed.
    Unreachable(String),
}

impl Ec2Launcher {
    /// Makes `request` exactly as a launch would, with `DryRun=true`: EC2 checks IAM and the
    /// parameters, and launches nothing.
    pub async fn dry_run(&self, request: &LaunchRequest) -> DryRun {
        match run_instances(&self.client, request)
            .dry_run(true)
            .send()
            .await
        {
            Ok(_) => DryRun::Failed("EC2 launched instead of a dry run".into()),
            Err(
                error @ (SdkError::TimeoutError(_)
                | SdkError::DispatchFailure(_)
                | SdkError::ResponseError(_)),
            ) => DryRun::Unreachable(aws_sdk_ec2::error::DisplayErrorContext(&error).to_string()),
            Err(error) => match error.code() {
                Some("DryRunOperation") => DryRun::WouldSucceed,
                Some("UnauthorizedOperation") => {
                    DryRun::Unauthorized(error.message().unwrap_or_default().to_owned())
                }
                _ => DryRun::Failed(match api_error("RunInstances", &error) {
                    LaunchError::Api { message, .. } => message,
                    other => other.to_string(),
                }),
            },
        }
    }
}

fn classify_run_instances(error: SdkError<RunInstancesError>) -> LaunchError {
    let message = || error.message().unwrap_or_default().to_owned();
    match error.code() {
        Some(code) if CAPACITY_ERRORS.contains(&code) => LaunchError::Capacity {
            code: code.to_owned(),
            message: message(),
        },
        Some(code) if QUOTA_ERRORS.contains(&code) => LaunchError::Quota {
            code: code.to_owned(),
            message: message(),
        },
        Some(SPOT_ROLE_MISSING) => LaunchError::NotAvailable {
            code: SPOT_ROLE_MISSING.to_owned(),
            message: format!("{SPOT_ROLE_REMEDY} ({})", message()),
        },
        Some(code) if not_offered(code, error.message().unwrap_or_default()) => {
            LaunchError::NotAvailable {
                code: code.to_owned(),
                message: message(),
            }
        }
        Some("IdempotentInstanceTerminated") => LaunchError::AlreadyLaunched,
        Some("IdempotentParameterMismatch") => {
            LaunchError::ParameterMismatch { message: message() }
        }
        _ => api_error("RunInstances", &error),
    }
}

fn api_error<E>(operation: &'static str, error: &SdkError<E>) -> LaunchError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let retryable = match error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => {
            service.raw().status().is_server_error()
                || error
                    .code()
                    .is_some_and(|code| TRANSIENT_ERRORS.contains(&code))
        }
        _ => false,
    };
    let message = match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(error).to_string(),
    };
    LaunchError::Api {
        operation,
        message,
        retryable,
    }
}
