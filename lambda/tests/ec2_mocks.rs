//! EC2 error sequences, played by aws-smithy-mocks to the real `Ec2Launcher` and SDK client (with
//! s3spot's retry configuration), under the real handler: the fleet request's shape, and what
//! becomes of each mix of pool errors EC2 answers with.

use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::operation::create_fleet::{CreateFleetInput, CreateFleetOutput};
use aws_sdk_ec2::operation::describe_instances::{DescribeInstancesInput, DescribeInstancesOutput};
use aws_sdk_ec2::operation::describe_spot_price_history::{
    DescribeSpotPriceHistoryInput, DescribeSpotPriceHistoryOutput,
};
use aws_sdk_ec2::types::{
    CreateFleetError, CreateFleetInstance, DefaultTargetCapacityType, FleetHttpTokensState,
    FleetLaunchTemplateOverrides, FleetType, Instance, InstanceLifecycle, InstanceType,
    LaunchTemplateAndOverridesResponse, Reservation, ResourceType, SpotAllocationStrategy,
    SpotPrice,
};
use aws_smithy_mocks::{Rule, RuleMode, mock, mock_client};
use s3spot_bootstrap::fake::MemoryStatuses;
use s3spot_lambda::Report;
use s3spot_lambda::{Config, Ec2Launcher, Handler, HandlerError, Response, ec2};
use s3spot_tests::{event, s3spot_lookup};
use serde_json::Value;

fn config(overrides: &[(&str, &str)]) -> Config {
    let mut overrides = overrides.to_vec();
    overrides.push(("S3SPOT_LAUNCH_TEMPLATE_VERSION", "4"));
    Config::from_lookup(s3spot_lookup("s3spot-worker", &overrides)).unwrap()
}

fn console_event() -> Value {
    event("s3-put.json")
}

/// An EC2 Query-protocol error response.
fn ec2_error(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{message}</Message></Error></Errors><RequestID>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</RequestID></Response>"
    )
}

fn overrides(instance_type: &str, subnet: &str) -> LaunchTemplateAndOverridesResponse {
    LaunchTemplateAndOverridesResponse::builder()
        .overrides(
            FleetLaunchTemplateOverrides::builder()
                .instance_type(InstanceType::from(instance_type))
                .subnet_id(subnet)
                .build(),
        )
        .build()
}

fn launched(id: &str, instance_type: &str) -> CreateFleetOutput {
    CreateFleetOutput::builder()
        .fleet_id("fleet-0123")
        .instances(
            CreateFleetInstance::builder()
                .instance_ids(id)
                .instance_type(InstanceType::from(instance_type))
                .lifecycle(InstanceLifecycle::Spot)
                .launch_template_and_overrides(overrides(instance_type, "subnet-0a"))
                .build(),
        )
        .build()
}

/// A pool's error in the fleet's answer: (lifecycle, type, subnet, code).
fn pool_error(lifecycle: &str, instance_type: &str, subnet: &str, code: &str) -> CreateFleetError {
    CreateFleetError::builder()
        .lifecycle(InstanceLifecycle::from(lifecycle))
        .launch_template_and_overrides(overrides(instance_type, subnet))
        .error_code(code)
        .error_message(format!("{code} for {instance_type} in {subnet}"))
        .build()
}

/// An answer with no instance, and these errors.
fn refused(errors: Vec<CreateFleetError>) -> CreateFleetOutput {
    CreateFleetOutput::builder()
        .fleet_id("fleet-0123")
        .set_errors(Some(errors))
        .build()
}

/// What every fleet request s3spot makes must look like.
fn well_formed(request: &CreateFleetInput) -> bool {
    let [config] = request.launch_template_configs() else {
        return false;
    };
    let Some(template) = config.launch_template_specification() else {
        return false;
    };
    let tagged = request.tag_specifications().iter().any(|spec| {
        spec.resource_type() == Some(&ResourceType::Instance)
            && spec
                .tags()
                .iter()
                .any(|t| t.key() == Some("s3spot:pipeline"))
            && spec.tags().iter().any(|t| t.key() == Some("s3spot:job"))
    });
    let target = request.target_capacity_specification();
    template.launch_template_name() == Some("s3spot-worker")
        && template.version() == Some("4")
        && template
            .launch_template_specification_user_data()
            .is_some_and(|u| {
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, u)
                    .is_ok_and(|script| script.starts_with(b"#!/bin/bash\n"))
            })
        && request.r#type() == Some(&FleetType::Instant)
        && target.and_then(|t| t.total_target_capacity()) == Some(1)
        && request.client_token().is_some_and(|t| t.len() <= 64)
        && request.spot_options().and_then(|o| o.allocation_strategy())
            == Some(&SpotAllocationStrategy::PriceCapacityOptimized)
        && !config.overrides().is_empty()
        && config.overrides().iter().all(|o| {
            o.metadata_options().and_then(|m| m.http_tokens())
                == Some(&FleetHttpTokensState::Required)
                && o.image_id().is_none()
                && o.iam_instance_profile().is_none()
        })
        && tagged
}

fn is_spot(request: &CreateFleetInput) -> bool {
    request
        .target_capacity_specification()
        .and_then(|t| t.default_target_capacity_type())
        == Some(&DefaultTargetCapacityType::Spot)
}

fn is_on_demand(request: &CreateFleetInput) -> bool {
    request
        .target_capacity_specification()
        .and_then(|t| t.default_target_capacity_type())
        == Some(&DefaultTargetCapacityType::OnDemand)
}

fn none_running() -> Rule {
    mock!(Client::describe_instances).then_output(|| DescribeInstancesOutput::builder().build())
}

/// The launcher's look for the job's own instances before it launches: none.
fn no_instance_of_the_job() -> Rule {
    mock!(Client::describe_instances)
        .match_requests(|r| {
            r.filters()
                .iter()
                .any(|f| f.name() == Some("tag:s3spot:job"))
        })
        .then_output(|| DescribeInstancesOutput::builder().build())
}

/// The price the launcher looks up for the instance it got, for the attempt's cost.
fn price_at_launch() -> Rule {
    mock!(Client::describe_spot_price_history).then_output(|| {
        DescribeSpotPriceHistoryOutput::builder()
            .spot_price_history(
                SpotPrice::builder()
                    .instance_type(InstanceType::M7iLarge)
                    .availability_zone("us-east-1a")
                    .spot_price("0.041200")
                    .timestamp(aws_sdk_ec2::primitives::DateTime::from_secs(1_800_000_000))
                    .build(),
            )
            .build()
    })
}

/// The production configuration, with backoff shortened so that retried sequences run fast.
/// The job's own instances are looked up first, and there are none.
fn handler(config: Config, rules: &[&Rule]) -> Handler<Ec2Launcher, MemoryStatuses> {
    let lookup = no_instance_of_the_job();
    let price = price_at_launch();
    let rules: Vec<&Rule> = std::iter::once(&lookup)
        .chain(rules.iter().copied())
        .chain(std::iter::once(&price))
        .collect();
    let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, &rules, |builder| {
        ec2::configure(builder).retry_config(
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(1)),
        )
    });
    let mut config = config;
    config.job.region = Some("us-east-1".into());
    Handler::new(
        config,
        Ec2Launcher::from_client(client),
        MemoryStatuses::default(),
    )
}

async fn report(handler: &Handler<Ec2Launcher, MemoryStatuses>) -> Report {
    match handler.handle(console_event()).await {
        Ok(Response::Report(report)) => report,
        other => panic!("expected a report, got {other:?}"),
    }
}

const TYPES: (&str, &str) = ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large");
const SUBNETS: (&str, &str) = ("S3SPOT_SUBNETS", "subnet-0a,subnet-0b");

#[tokio::test]
async fn one_request_names_every_type_in_every_subnet_with_the_job() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .match_requests(|r| {
            let pools: Vec<(String, String)> = r.launch_template_configs()[0]
                .overrides()
                .iter()
                .map(|o| {
                    (
                        o.instance_type().unwrap().as_str().to_owned(),
                        o.subnet_id().unwrap().to_owned(),
                    )
                })
                .collect();
            let volume = &r.launch_template_configs()[0].overrides()[0].block_device_mappings()[0];
            well_formed(r)
                && is_spot(r)
                && pools
                    == [
                        ("m7i.large".into(), "subnet-0a".into()),
                        ("m7i.large".into(), "subnet-0b".into()),
                        ("m6i.large".into(), "subnet-0a".into()),
                        ("m6i.large".into(), "subnet-0b".into()),
                    ]
                && volume.device_name() == Some("/dev/xvda")
                // The console event's object is 1024 bytes: 3 KiB and the 8 GiB base.
                && volume.ebs().and_then(|e| e.volume_size()) == Some(9)
                && volume.ebs().and_then(|e| e.encrypted()) == Some(true)
        })
        .then_output(|| launched("i-0fleet", "m6i.large"));
    let handler = handler(
        config(&[TYPES, SUBNETS, ("S3SPOT_DISK", "3x+8GiB")]),
        &[&describe, &fleet],
    );
    let report = report(&handler).await;
    assert_eq!(report.failed, []);
    assert_eq!(report.launched[0].instance_id, "i-0fleet");
    assert_eq!(
        report.launched[0].instance_type.as_deref(),
        Some("m6i.large")
    );
    assert_eq!(fleet.num_calls(), 1);
    // EC2 gave no spot price for the type it chose: the on-demand list price, and why.
    let price = claim_price(&handler);
    assert_eq!(price["usd_per_hour"], 0.096, "{price}");
    assert_eq!(
        price["source"],
        "on-demand list price (EC2 gave no spot price for m6i.large)"
    );
}

/// The price the launch kept in the attempt's claim.
fn claim_price(handler: &Handler<Ec2Launcher, MemoryStatuses>) -> Value {
    let (bucket, key) = handler
        .statuses()
        .writes()
        .into_iter()
        .rfind(|(_, key)| key.ends_with("/.s3spot/attempt-1.json"))
        .expect("a claim");
    handler.statuses().json(&bucket, &key).unwrap()["price"].clone()
}

#[tokio::test]
async fn requirements_become_the_fleets_instance_requirements() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .match_requests(|r| {
            let overrides = r.launch_template_configs()[0].overrides();
            let requirements = overrides[0].instance_requirements().unwrap();
            well_formed(r)
                && overrides.len() == 2
                && overrides.iter().all(|o| o.instance_type().is_none())
                && requirements.v_cpu_count().and_then(|v| v.min()) == Some(2)
                && requirements.v_cpu_count().and_then(|v| v.max()) == Some(8)
                && requirements.memory_mib().and_then(|m| m.min()) == Some(4096)
                && requirements
                    .cpu_manufacturers()
                    .iter()
                    .map(|m| m.as_str())
                    .eq(["amazon-web-services"])
                && requirements.excluded_instance_types() == ["t4g.*"]
        })
        .then_output(|| launched("i-0abs", "m7g.large"));
    let handler = handler(
        config(&[
            (
                "S3SPOT_INSTANCE_REQUIREMENTS",
                "vcpu=2-8 memory=4GiB- arch=arm64 exclude=t4g.*",
            ),
            SUBNETS,
        ]),
        &[&describe, &fleet],
    );
    let report = report(&handler).await;
    assert_eq!(
        report.launched[0].instance_type.as_deref(),
        Some("m7g.large")
    );
}

#[tokio::test]
async fn some_pools_out_of_capacity_still_launch_from_the_others() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet).then_output(|| {
        let mut output = launched("i-0some", "m6i.large");
        output.errors = Some(vec![
            pool_error(
                "spot",
                "m7i.large",
                "subnet-0a",
                "InsufficientInstanceCapacity",
            ),
            pool_error(
                "spot",
                "m7i.large",
                "subnet-0b",
                "InsufficientInstanceCapacity",
            ),
        ]);
        output
    });
    let handler = handler(
        config(&[TYPES, SUBNETS, ("S3SPOT_MARKET", "spot-then-on-demand")]),
        &[&describe, &fleet],
    );
    let report = report(&handler).await;
    assert_eq!(report.launched[0].instance_id, "i-0some");
    assert_eq!(
        fleet.num_calls(),
        1,
        "no on-demand request once spot launched"
    );
}

#[tokio::test]
async fn all_pools_out_is_retryable_and_names_each_pool_then_on_demand_is_asked() {
    let describe = none_running();
    let spot = mock!(Client::create_fleet)
        .match_requests(is_spot)
        .then_output(|| {
            refused(vec![
                pool_error(
                    "spot",
                    "m7i.large",
                    "subnet-0a",
                    "InsufficientInstanceCapacity",
                ),
                pool_error(
                    "spot",
                    "m6i.large",
                    "subnet-0a",
                    "InsufficientInstanceCapacity",
                ),
            ])
        });
    let on_demand = mock!(Client::create_fleet)
        .match_requests(|r| well_formed(r) && is_on_demand(r))
        .then_output(|| {
            let mut output = launched("i-0od", "m7i.large");
            output.instances.as_mut().unwrap()[0].lifecycle = Some(InstanceLifecycle::OnDemand);
            output
        });
    let handler = handler(
        config(&[TYPES, ("S3SPOT_MARKET", "spot-then-on-demand")]),
        &[&describe, &spot, &on_demand],
    );
    let report = report(&handler).await;
    assert_eq!(report.launched[0].market, "on-demand");
    assert_eq!((spot.num_calls(), on_demand.num_calls()), (1, 1));
    // On demand, the list price; no spot price is asked for.
    let price = claim_price(&handler);
    assert_eq!(
        (&price["market"], &price["usd_per_hour"], &price["source"]),
        (
            &"on-demand".into(),
            &0.1008.into(),
            &"on-demand list price".into()
        ),
        "{price}"
    );

    // Spot alone: the record waits for capacity, every pool's answer in its error.
    let spot = mock!(Client::create_fleet).then_output(|| {
        refused(vec![
            pool_error(
                "spot",
                "m7i.large",
                "subnet-0a",
                "InsufficientInstanceCapacity",
            ),
            pool_error(
                "spot",
                "m6i.large",
                "subnet-0a",
                "MaxSpotInstanceCountExceeded",
            ),
        ])
    });
    let handler = self::handler(config(&[TYPES]), &[&describe, &spot]);
    let Err(HandlerError::Retryable(report)) = handler.handle(console_event()).await else {
        panic!("expected a retryable failure")
    };
    let error = &report.failed[0].error;
    assert!(error.starts_with("no capacity: 2 pool(s) tried"), "{error}");
    assert!(
        error.contains("spot m7i.large in subnet-0a: InsufficientInstanceCapacity"),
        "{error}"
    );
    assert!(
        error.contains("spot m6i.large in subnet-0a: MaxSpotInstanceCountExceeded"),
        "{error}"
    );
    assert_eq!(
        spot.num_calls(),
        1,
        "pool errors are answers, not retried by the SDK"
    );
}

#[tokio::test]
async fn the_vcpu_quota_waits_and_says_so() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet).then_output(|| {
        refused(vec![pool_error(
            "on-demand",
            "m7i.large",
            "subnet-0a",
            "VcpuLimitExceeded",
        )])
    });
    let handler = handler(
        config(&[TYPES, ("S3SPOT_MARKET", "on-demand")]),
        &[&describe, &fleet],
    );
    let Err(HandlerError::Retryable(report)) = handler.handle(console_event()).await else {
        panic!("expected a retryable failure")
    };
    assert!(
        report.failed[0]
            .error
            .starts_with("an account quota is reached: 1 pool(s) tried"),
        "{}",
        report.failed[0].error
    );
}

#[tokio::test]
async fn a_missing_spot_role_falls_back_to_on_demand_and_says_what_to_do() {
    let describe = none_running();
    let spot = mock!(Client::create_fleet)
        .match_requests(is_spot)
        .then_output(|| {
            refused(vec![pool_error(
                "spot",
                "m7i.large",
                "subnet-0a",
                ec2::SPOT_ROLE_MISSING,
            )])
        });
    let on_demand = mock!(Client::create_fleet)
        .match_requests(is_on_demand)
        .then_output(|| launched("i-0od", "m7i.large"));
    let handler = handler(
        config(&[("S3SPOT_MARKET", "spot-then-on-demand")]),
        &[&describe, &spot, &on_demand],
    );
    let report = report(&handler).await;
    assert_eq!(report.launched[0].instance_id, "i-0od");

    // Spot alone can never launch without the role: a permanent failure that names the fix.
    let handler = self::handler(config(&[]), &[&describe, &spot]);
    let report = self::report(&handler).await;
    let failed = &report.failed[0];
    assert!(!failed.retryable);
    assert!(
        failed.error.starts_with("no pool can launch here"),
        "{}",
        failed.error
    );
    assert!(
        failed
            .error
            .contains("aws iam create-service-linked-role --aws-service-name spot.amazonaws.com"),
        "{}",
        failed.error
    );
}

#[tokio::test]
async fn throttling_is_retried_by_the_sdk() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .match_requests(|r| well_formed(r) && is_spot(r))
        .sequence()
        .http_status(
            503,
            Some(ec2_error("RequestLimitExceeded", "Request limit exceeded.")),
        )
        .times(2)
        .output(|| launched("i-0fedcba9876543210", "t3.micro"))
        .build();
    let handler = handler(config(&[]), &[&describe, &fleet]);
    let report = report(&handler).await;
    assert_eq!(report.launched[0].instance_id, "i-0fedcba9876543210");
    assert_eq!(fleet.num_calls(), 3);
}

#[tokio::test]
async fn throttling_that_outlasts_the_sdk_retries_waits_and_spares_the_other_records() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .sequence()
        .http_status(
            503,
            Some(ec2_error("RequestLimitExceeded", "Request limit exceeded.")),
        )
        .repeatedly()
        .build();
    let handler = handler(config(&[]), &[&describe, &fleet]);
    let Err(HandlerError::Retryable(report)) = handler.handle(event("multi-record.json")).await
    else {
        panic!("expected a retryable failure")
    };
    assert_eq!(report.failed.len(), 2, "{report:?}");
    assert!(report.failed.iter().all(|f| f.retryable));
    assert!(
        report.failed[0].error.contains("RequestLimitExceeded"),
        "{}",
        report.failed[0].error
    );
    assert!(
        report.failed[1]
            .error
            .starts_with("EC2 is throttling launches"),
        "{}",
        report.failed[1].error
    );
    assert_eq!(
        fleet.num_calls(),
        3,
        "the second record does not add to the throttling"
    );
}

#[tokio::test]
async fn a_parameter_mismatch_is_a_clear_permanent_error() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .sequence()
        .http_status(
            400,
            Some(ec2_error(
                "IdempotentParameterMismatch",
                "Arguments on this idempotent request are inconsistent with arguments used in \
                 previous request(s).",
            )),
        )
        .build();
    let handler = handler(config(&[]), &[&describe, &fleet]);
    let report = report(&handler).await;
    assert!(!report.failed[0].retryable);
    assert!(
        report.failed[0]
            .error
            .contains("IdempotentParameterMismatch")
    );
}

#[tokio::test]
async fn other_client_errors_are_permanent_and_quote_ec2() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .sequence()
        .http_status(
            400,
            Some(ec2_error(
                "InvalidLaunchTemplateName.NotFoundException",
                "The specified launch template, with template name s3spot-worker, does not exist.",
            )),
        )
        .build();
    let handler = handler(config(&[]), &[&describe, &fleet]);
    let report = report(&handler).await;
    assert!(!report.failed[0].retryable);
    assert_eq!(
        report.failed[0].error,
        "CreateFleet failed: InvalidLaunchTemplateName.NotFoundException: The specified launch \
         template, with template name s3spot-worker, does not exist."
    );
}

#[tokio::test]
async fn an_object_too_big_for_the_largest_disk_fails_before_any_launch() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet).then_output(|| launched("i-0big", "m7i.large"));
    // The console event's object is 1024 bytes; a 1 GiB ceiling on a 1000x rule cannot hold it.
    let handler = handler(
        config(&[("S3SPOT_DISK", "100x+1GiB"), ("S3SPOT_MAX_DISK", "1")]),
        &[&describe, &fleet],
    );
    let report = report(&handler).await;
    let failed = &report.failed[0];
    assert!(!failed.retryable);
    assert!(
        failed.error.contains("above S3SPOT_MAX_DISK=1 GiB"),
        "{}",
        failed.error
    );
    assert_eq!(fleet.num_calls(), 0);
}

#[tokio::test]
async fn the_guard_counts_every_page_of_instances() {
    let page = |next: Option<&str>, instances: usize| {
        let mut reservation = Reservation::builder();
        for i in 0..instances {
            reservation =
                reservation.instances(Instance::builder().instance_id(format!("i-{i}")).build());
        }
        DescribeInstancesOutput::builder()
            .reservations(reservation.build())
            .set_next_token(next.map(Into::into))
            .build()
    };
    let filtered = |r: &DescribeInstancesInput| {
        r.filters()
            .iter()
            .any(|f| f.name() == Some("tag:s3spot:pipeline") && f.values() == ["s3spot"])
            && r.filters().iter().any(|f| {
                f.name() == Some("instance-state-name") && f.values() == ["pending", "running"]
            })
    };
    let first = mock!(Client::describe_instances)
        .match_requests(move |r| filtered(r) && r.next_token().is_none())
        .then_output(move || page(Some("page-2"), 2));
    let second = mock!(Client::describe_instances)
        .match_requests(move |r| filtered(r) && r.next_token() == Some("page-2"))
        .then_output(move || page(None, 1));
    let run = mock!(Client::create_fleet).then_output(|| launched("i-1", "t3.micro"));
    let handler = handler(
        config(&[("S3SPOT_MAX_INSTANCES", "3")]),
        &[&first, &second, &run],
    );
    let Err(HandlerError::Retryable(report)) = handler.handle(console_event()).await else {
        panic!("expected the guard to stop the launch")
    };
    assert!(
        report.failed[0]
            .error
            .contains("3 instances of pipeline \"s3spot\""),
        "{}",
        report.failed[0].error
    );
    assert_eq!(
        (first.num_calls(), second.num_calls(), run.num_calls()),
        (1, 1, 0)
    );
}

/// A page of `n` running instances, with a token for more.
fn page_of(n: usize, next_token: Option<&str>) -> DescribeInstancesOutput {
    let instances = (0..n).map(|i| {
        Instance::builder()
            .instance_id(format!("i-{i:017}"))
            .build()
    });
    DescribeInstancesOutput::builder()
        .reservations(
            Reservation::builder()
                .set_instances(Some(instances.collect()))
                .build(),
        )
        .set_next_token(next_token.map(str::to_owned))
        .build()
}

/// DescribeInstances answering with two pages of 5 running instances. The first page answers
/// only a request for pages of `page_size`.
fn two_pages_of_five(page_size: i32) -> (Rule, Rule) {
    let first = mock!(Client::describe_instances)
        .match_requests(move |r: &DescribeInstancesInput| {
            r.max_results() == Some(page_size) && r.next_token().is_none()
        })
        .then_output(|| page_of(5, Some("more")));
    let next = mock!(Client::describe_instances)
        .match_requests(|r: &DescribeInstancesInput| r.next_token() == Some("more"))
        .then_output(|| page_of(5, None));
    (first, next)
}

#[tokio::test]
async fn the_runaway_guard_reads_no_more_instances_than_its_cap() {
    // Cap 3: one page of at most 5 (EC2's smallest page) settles it; the next page is never
    // asked for, and nothing is launched.
    let (first_page, next_page) = two_pages_of_five(5);
    let run = mock!(Client::create_fleet).then_output(|| launched("i-0new", "t3.micro"));
    let handler = handler(
        config(&[("S3SPOT_MAX_INSTANCES", "3")]),
        &[&first_page, &next_page, &run],
    );

    let report = match handler.handle(console_event()).await {
        Err(HandlerError::Retryable(report)) => report,
        other => panic!("at the cap the event must be retried, got {other:?}"),
    };
    assert_eq!(first_page.num_calls(), 1);
    assert_eq!(next_page.num_calls(), 0, "counted past the cap");
    assert_eq!(run.num_calls(), 0);
    let [failed] = report.failed.as_slice() else {
        panic!("{report:?}")
    };
    assert!(
        failed
            .error
            .starts_with("runaway guard: at least 5 instances of pipeline \"s3spot\""),
        "{}",
        failed.error
    );
}

#[tokio::test]
async fn under_the_cap_the_guard_follows_every_page() {
    // Cap 12: pages of 12 asked for; 5 + 5 instances are fewer, so both pages are read and the
    // launch goes ahead.
    let (first_page, next_page) = two_pages_of_five(12);
    let run = mock!(Client::create_fleet).then_output(|| launched("i-0new", "t3.micro"));
    let handler = handler(
        config(&[("S3SPOT_MAX_INSTANCES", "12")]),
        &[&first_page, &next_page, &run],
    );

    let report = report(&handler).await;
    assert_eq!(report.launched.len(), 1, "{report:?}");
    assert_eq!((first_page.num_calls(), next_page.num_calls()), (1, 1));
}

/// A page of spot price history: `(type, zone, price)` entries, and the token of the next page.
fn price_page(
    entries: &[(&str, &str, &str)],
    next_token: Option<&str>,
) -> DescribeSpotPriceHistoryOutput {
    DescribeSpotPriceHistoryOutput::builder()
        .set_spot_price_history(Some(
            entries
                .iter()
                .map(|(instance_type, zone, price)| {
                    SpotPrice::builder()
                        .instance_type(InstanceType::from(*instance_type))
                        .availability_zone(*zone)
                        .spot_price(*price)
                        .timestamp(aws_sdk_ec2::primitives::DateTime::from_secs(1_800_000_000))
                        .build()
                })
                .collect(),
        ))
        .set_next_token(next_token.map(str::to_owned))
        .build()
}

/// Two pages of prices; the cheapest type is on the second.
fn two_pages_of_prices() -> (Rule, Rule) {
    let first = mock!(Client::describe_spot_price_history)
        .match_requests(|r: &DescribeSpotPriceHistoryInput| {
            r.next_token().is_none() && r.product_descriptions() == ["Linux/UNIX"]
        })
        .then_output(|| {
            price_page(
                &[
                    ("m5.large", "us-east-1a", "0.0400"),
                    ("c5.large", "us-east-1a", "0.0350"),
                ],
                Some("page-2"),
            )
        });
    let second = mock!(Client::describe_spot_price_history)
        .match_requests(|r: &DescribeSpotPriceHistoryInput| r.next_token() == Some("page-2"))
        .then_output(|| price_page(&[("t3.large", "us-east-1b", "0.0200")], None));
    (first, second)
}

#[tokio::test]
async fn spot_prices_follow_every_page() {
    use s3spot_lambda::{Launcher as _, PriceQuery};
    let (first, second) = two_pages_of_prices();
    let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, &[&first, &second]);
    let prices = Ec2Launcher::from_client(client)
        .spot_prices(&PriceQuery::default())
        .await
        .unwrap();
    let types: Vec<&str> = prices.iter().map(|p| p.instance_type.as_str()).collect();
    assert_eq!(types, ["m5.large", "c5.large", "t3.large"]);
    assert_eq!(prices[2].usd_per_hour, 0.02);
    assert_eq!(prices[2].at, 1_800_000_000);
    assert_eq!((first.num_calls(), second.num_calls()), (1, 1));
}

#[tokio::test]
async fn an_answer_with_neither_instance_nor_error_is_a_refusal_to_try_again() {
    let describe = none_running();
    let fleet = mock!(Client::create_fleet)
        .then_output(|| CreateFleetOutput::builder().fleet_id("fleet-0").build());
    let handler = handler(config(&[]), &[&describe, &fleet]);
    let Err(HandlerError::Retryable(report)) = handler.handle(console_event()).await else {
        panic!("expected a retryable failure")
    };
    assert!(
        report.failed[0].error.contains("spot request: NoInstance"),
        "{}",
        report.failed[0].error
    );
}
