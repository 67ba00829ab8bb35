//! [`Launcher`] on EC2: an instant `CreateFleet` from a launch template over every pool,
//! `DescribeInstances` for the guard and the job commands, `TerminateInstances` for cancelling
//! and reaping, and the spot price history.

use aws_sdk_ec2::config::interceptors::InterceptorContext;
use aws_sdk_ec2::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::create_fleet::{CreateFleetError, CreateFleetOutput};
use aws_sdk_ec2::types::{
    BurstablePerformance, CpuManufacturer, DefaultTargetCapacityType, Filter,
    FleetBlockDeviceMappingRequest, FleetEbsBlockDeviceRequest, FleetHttpTokensState,
    FleetInstanceMetadataEndpointState, FleetInstanceMetadataOptionsRequest,
    FleetLaunchTemplateConfigRequest, FleetLaunchTemplateOverridesRequest,
    FleetLaunchTemplateSpecificationRequest, FleetOnDemandAllocationStrategy, FleetType,
    InstanceAttributeName, InstanceGeneration, InstanceLifecycle, InstanceLifecycleType,
    InstanceRequirementsRequest, InstanceType, MemoryMiBRequest, OnDemandOptionsRequest,
    ResourceType, SpotAllocationStrategy, SpotInstanceInterruptionBehavior, SpotOptionsRequest,
    Tag, TagSpecification, TargetCapacitySpecificationRequest, VCpuCountRangeRequest, VolumeType,
};

use crate::config::{LaunchTemplate, MarketType};
use crate::fleet::{Burstable, InstanceRequirements, Pool, manufacturers};
use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PoolError, PriceQuery, Refusal,
    SpotPrice, StateReason, TAG_JOB, TAG_PIPELINE,
};

/// The spot prices s3spot compares: those of the Linux images that jobs run on.
const PRODUCT_DESCRIPTION: &str = "Linux/UNIX";

/// Spot through the API needs this service-linked role, which a fresh account does not have
/// (only the console creates it on the fly). Without it, spot can never launch, but on-demand
/// can.
pub const SPOT_ROLE_MISSING: &str = "AuthFailure.ServiceLinkedRoleCreationNotPermitted";

/// What to do about [`SPOT_ROLE_MISSING`], in the error the launcher logs and reports.
const SPOT_ROLE_REMEDY: &str = "spot needs the service-linked role AWSServiceRoleForEC2Spot, \
     which this account does not have: create it once with `aws iam create-service-linked-role \
     --aws-service-name spot.amazonaws.com` (scripts/deploy does), then redrive the dead-letter \
     queue";

/// Codes that are worth retrying later even after the SDK's own retries ran out.
const TRANSIENT_ERRORS: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "InternalError",
    "ServiceUnavailable",
    "Unavailable",
    // AWS Batch's throttling.
    "TooManyRequestsException",
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
/// An instant fleet reports each pool's capacity error in its answer. Should EC2 answer the
/// whole request with `InsufficientInstanceCapacity` (HTTP 500), the SDK would retry it three
/// times with backoff; capacity seldom returns within seconds, and the queue tries again later.
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
                .and_then(|e| e.downcast_ref::<CreateFleetError>())
                .and_then(ProvideErrorMetadata::code),
            _ => None,
        };
        match code {
            Some(code) if matches!(Refusal::of(code), Refusal::Capacity | Refusal::Quota) => {
                RetryAction::RetryForbidden
            }
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
        let output = create_fleet(&self.client, request)
            .send()
            .await
            .map_err(classify_create_fleet)?;
        fleet_outcome(request, &output)
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
            .set_end_time(
                query
                    .until
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

/// The `CreateFleet` call for `request`: the function's launches, and `s3spot doctor`'s dry runs
/// of them, are the same request.
///
/// One instance (`TotalTargetCapacity=1`) of type `instant`: EC2 answers at once with the
/// instance, or with each pool's error, and keeps nothing running that would launch later.
pub(crate) fn create_fleet(
    client: &aws_sdk_ec2::Client,
    request: &LaunchRequest,
) -> aws_sdk_ec2::operation::create_fleet::builders::CreateFleetFluentBuilder {
    let template = match &request.template {
        LaunchTemplate::Id(id) => {
            FleetLaunchTemplateSpecificationRequest::builder().launch_template_id(id)
        }
        LaunchTemplate::Name(name) => {
            FleetLaunchTemplateSpecificationRequest::builder().launch_template_name(name)
        }
    }
    .version(&request.template_version)
    .launch_template_specification_user_data(&request.user_data)
    .build();
    let requirements = request.requirements.as_ref().map(requirements_request);
    let volume = request.volume_gib.map(|gib| {
        vec![
            FleetBlockDeviceMappingRequest::builder()
                .device_name(&request.root_device)
                .ebs(
                    FleetEbsBlockDeviceRequest::builder()
                        .volume_size(i32::try_from(gib).unwrap_or(i32::MAX))
                        .volume_type(VolumeType::Gp3)
                        .encrypted(true)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        ]
    });
    let overrides: Vec<FleetLaunchTemplateOverridesRequest> = request
        .pools
        .iter()
        .map(|pool| {
            FleetLaunchTemplateOverridesRequest::builder()
                .set_instance_type(pool.instance_type.as_deref().map(InstanceType::from))
                .set_subnet_id(pool.subnet_id.clone())
                .set_instance_requirements(requirements.clone())
                .set_block_device_mappings(volume.clone())
                // The template is trusted for image, network and profile, but IMDSv2 is what
                // keeps the instance's credentials from leaking: state it in every request.
                .metadata_options(
                    FleetInstanceMetadataOptionsRequest::builder()
                        .http_tokens(FleetHttpTokensState::Required)
                        .http_endpoint(FleetInstanceMetadataEndpointState::Enabled)
                        .build(),
                )
                .build()
        })
        .collect();
    let tags: Vec<Tag> = request
        .tags
        .iter()
        .map(|(key, value)| Tag::builder().key(key).value(value).build())
        .collect();
    let capacity_type = match request.market {
        MarketType::Spot => DefaultTargetCapacityType::Spot,
        MarketType::OnDemand => DefaultTargetCapacityType::OnDemand,
    };
    client
        .create_fleet()
        .r#type(FleetType::Instant)
        .client_token(&request.client_token)
        .launch_template_configs(
            FleetLaunchTemplateConfigRequest::builder()
                .launch_template_specification(template)
                .set_overrides(Some(overrides))
                .build(),
        )
        .target_capacity_specification(
            TargetCapacitySpecificationRequest::builder()
                .total_target_capacity(1)
                .default_target_capacity_type(capacity_type)
                .build(),
        )
        .spot_options(
            SpotOptionsRequest::builder()
                // AWS's advice for spot: the pools least likely to be interrupted, among the
                // cheapest.
                .allocation_strategy(SpotAllocationStrategy::PriceCapacityOptimized)
                .instance_interruption_behavior(SpotInstanceInterruptionBehavior::Terminate)
                .build(),
        )
        .on_demand_options(
            OnDemandOptionsRequest::builder()
                .allocation_strategy(FleetOnDemandAllocationStrategy::LowestPrice)
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .set_tags(Some(tags))
                .build(),
        )
}

/// `S3SPOT_INSTANCE_REQUIREMENTS` as EC2's `InstanceRequirements`.
fn requirements_request(requirements: &InstanceRequirements) -> InstanceRequirementsRequest {
    let clamp = |n: u64| i32::try_from(n).unwrap_or(i32::MAX);
    InstanceRequirementsRequest::builder()
        .v_cpu_count(
            VCpuCountRangeRequest::builder()
                .min(clamp(requirements.vcpu.min))
                .set_max(requirements.vcpu.max.map(clamp))
                .build(),
        )
        .memory_mib(
            MemoryMiBRequest::builder()
                .min(clamp(requirements.memory_mib.min))
                .set_max(requirements.memory_mib.max.map(clamp))
                .build(),
        )
        .set_cpu_manufacturers((!requirements.architectures.is_empty()).then(|| {
            requirements
                .architectures
                .iter()
                .flat_map(|arch| manufacturers(arch))
                .map(|m| CpuManufacturer::from(*m))
                .collect()
        }))
        .set_excluded_instance_types(
            (!requirements.excluded.is_empty()).then(|| requirements.excluded.clone()),
        )
        .burstable_performance(match requirements.burstable {
            Burstable::Excluded => BurstablePerformance::Excluded,
            Burstable::Included => BurstablePerformance::Included,
            Burstable::Required => BurstablePerformance::Required,
        })
        .set_instance_generations(
            requirements
                .current_generation
                .then(|| vec![InstanceGeneration::Current]),
        )
        .build()
}

/// The instance the fleet launched, or why each pool it tried launched none.
fn fleet_outcome(
    request: &LaunchRequest,
    output: &CreateFleetOutput,
) -> Result<Launched, LaunchError> {
    if let Some((instance, id)) = output.instances().iter().find_map(|instance| {
        instance
            .instance_ids()
            .first()
            .map(|id| (instance, id.clone()))
    }) {
        let overrides = instance
            .launch_template_and_overrides()
            .and_then(|lt| lt.overrides());
        return Ok(Launched {
            instance_id: id,
            instance_type: instance
                .instance_type()
                .map(|t| t.as_str().to_owned())
                .or_else(|| {
                    overrides
                        .and_then(|o| o.instance_type())
                        .map(|t| t.as_str().to_owned())
                }),
            placement: instance
                .availability_zone()
                .or_else(|| instance.subnet_id())
                .or_else(|| overrides.and_then(|o| o.subnet_id()))
                .map(str::to_owned),
        });
    }
    let pools: Vec<PoolError> = output
        .errors()
        .iter()
        .map(|error| {
            let overrides = error
                .launch_template_and_overrides()
                .and_then(|lt| lt.overrides());
            let pool = Pool {
                instance_type: overrides
                    .and_then(|o| o.instance_type())
                    .map(|t| t.as_str().to_owned()),
                subnet_id: overrides
                    .and_then(|o| o.subnet_id().or(o.availability_zone()))
                    .map(str::to_owned),
            };
            let market = match error.lifecycle() {
                Some(InstanceLifecycle::Spot) => "spot",
                Some(InstanceLifecycle::OnDemand) => "on-demand",
                _ => request.market.as_str(),
            };
            let code = error.error_code().unwrap_or("Unknown").to_owned();
            let mut message = error.error_message().unwrap_or_default().to_owned();
            if code == SPOT_ROLE_MISSING {
                message = format!("{SPOT_ROLE_REMEDY} ({message})");
            }
            PoolError {
                pool: format!("{market} {pool}"),
                code,
                message,
            }
        })
        .collect();
    if pools.is_empty() {
        // Neither an instance nor a reason. The answer is final all the same (its token gets it
        // again), so it counts as a refusal: the next try gets a token of its own.
        return Err(LaunchError::NoInstance {
            pools: vec![PoolError {
                pool: format!("{} request", request.market),
                code: "NoInstance".into(),
                message: "the fleet launched no instance and gave no error".into(),
            }],
        });
    }
    Err(LaunchError::NoInstance { pools })
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
        match create_fleet(&self.client, request)
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
                _ => DryRun::Failed(match api_error("CreateFleet", &error) {
                    LaunchError::Api { message, .. } => message,
                    other => other.to_string(),
                }),
            },
        }
    }
}

/// A refusal of the whole request. Pools are refused in the answer (see [`fleet_outcome`]); a
/// code here that names capacity or a quota applies to every pool at once.
fn classify_create_fleet(error: SdkError<CreateFleetError>) -> LaunchError {
    let message = || error.message().unwrap_or_default().to_owned();
    match error.code() {
        Some("IdempotentParameterMismatch") => {
            LaunchError::ParameterMismatch { message: message() }
        }
        Some(code) if matches!(Refusal::of(code), Refusal::Capacity) => LaunchError::Capacity {
            code: code.to_owned(),
            message: message(),
        },
        Some(code) if matches!(Refusal::of(code), Refusal::Quota) => LaunchError::Quota {
            code: code.to_owned(),
            message: message(),
        },
        Some(SPOT_ROLE_MISSING) => LaunchError::NotAvailable {
            code: SPOT_ROLE_MISSING.to_owned(),
            message: format!("{SPOT_ROLE_REMEDY} ({})", message()),
        },
        _ => api_error("CreateFleet", &error),
    }
}

pub(crate) fn api_error<E>(operation: &'static str, error: &SdkError<E>) -> LaunchError
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
