//! EC2 error sequences, played by aws-smithy-mocks to the real `Ec2Launcher` and SDK client (with
//! s3spot's retry configuration), under the real handler.

use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::operation::describe_instances::{DescribeInstancesInput, DescribeInstancesOutput};
use aws_sdk_ec2::operation::describe_spot_price_history::{
    DescribeSpotPriceHistoryInput, DescribeSpotPriceHistoryOutput,
};
use aws_sdk_ec2::operation::run_instances::{RunInstancesInput, RunInstancesOutput};
use aws_sdk_ec2::types::{
    HttpTokensState, Instance, InstanceType, MarketType, Reservation, ResourceType,
    ShutdownBehavior, SpotInstanceType, SpotPrice,
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

fn launched(id: &str, instance_type: &str) -> RunInstancesOutput {
    RunInstancesOutput::builder()
        .instances(
            Instance::builder()
                .instance_id(id)
                .instance_type(InstanceType::from(instance_type))
                .build(),
        )
        .build()
}

/// What every RunInstances call s3spot makes must look like.
fn well_formed(request: &RunInstancesInput) -> bool {
    let template = request.launch_template().unwrap();
    let tagged = |resource: ResourceType| {
        request.tag_specifications().iter().any(|spec| {
            spec.resource_type() == Some(&resource)
                && spec
                    .tags()
                    .iter()
                    .any(|t| t.key() == Some("s3spot:pipeline"))
                && spec.tags().iter().any(|t| t.key() == Some("s3spot:job"))
        })
    };
    template.launch_template_name() == Some("s3spot-worker")
        && template.version() == Some("4")
        && request.min_count() == Some(1)
        && request.max_count() == Some(1)
        && request.client_token().is_some_and(|t| t.len() <= 64)
        && request.image_id().is_none()
        && request.user_data().is_some_and(|u| {
            base64::Engine::decode(&base64::engine::general_purpose::STANDARD, u)
                .is_ok_and(|script| script.starts_with(b"#!/bin/bash\n"))
        })
        && request.instance_initiated_shutdown_behavior() == Some(&ShutdownBehavior::Terminate)
        && request.metadata_options().and_then(|m| m.http_tokens())
            == Some(&HttpTokensState::Required)
        && tagged(ResourceType::Instance)
        && tagged(ResourceType::Volume)
}

fn is_spot(request: &RunInstancesInput) -> bool {
    request.instance_market_options().is_some_and(|m| {
        m.market_type() == Some(&MarketType::Spot)
            && m.spot_options().and_then(|s| s.spot_instance_type())
                == Some(&SpotInstanceType::OneTime)
    })
}

/// RunInstances answers once with this EC2 error.
fn run_instances_fails(status: u16, code: &str, message: &str) -> Rule {
    mock!(Client::run_instances)
        .sequence()
        .http_status(status, Some(ec2_error(code, message)))
        .build()
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

/// The production configuration, with backoff shortened so that retried sequences run fast.
/// The job's own instances are looked up first, and there are none.
fn handler(config: Config, rules: &[&Rule]) -> Handler<Ec2Launcher, MemoryStatuses> {
    let lookup = no_instance_of_the_job();
    let rules: Vec<&Rule> = std::iter::once(&lookup)
        .chain(rules.iter().copied())
        .collect();
    let client = mock_client!(aws_sdk_ec2, RuleMode::MatchAny, &rules, |builder| {
        ec2::configure(builder).retry_config(
            RetryConfig::standard()
                .with_max_attempts(3)
                .with_initial_backoff(Duration::from_millis(1)),
        )
    });
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

#[tokio::test]
async fn capacity_errors_fall_back_at_once_without_sdk_retries() {
    let describe = none_running();
    let spot = mock!(Client::run_instances)
        .match_requests(|r| well_formed(r) && is_spot(r))
        .sequence()
        .http_status(
            500,
            Some(ec2_error(
                "InsufficientInstanceCapacity",
                "We currently do not have sufficient m7i.large capacity in the Availability Zone you requested.",
            )),
        )
        .http_status(400, Some(ec2_error("SpotMaxPriceTooLow", "Your Spot request price is lower than the minimum required Spot request fulfillment price.")))
        .build();
    let on_demand = mock!(Client::run_instances)
        .match_requests(|r| {
            well_formed(r)
                && r.instance_market_options().is_none()
                && r.instance_type() == Some(&InstanceType::from("m7i.large"))
        })
        .then_output(|| launched("i-0123456789abcdef0", "m7i.large"));
    let handler = handler(
        config(&[
            ("S3SPOT_MARKET", "spot-then-on-demand"),
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large"),
        ]),
        &[&describe, &spot, &on_demand],
    );

    let report = report(&handler).await;
    assert_eq!(report.failed, []);
    assert_eq!(report.launched[0].instance_id, "i-0123456789abcdef0");
    assert_eq!(report.launched[0].market, "on-demand");
    assert_eq!(
        report.launched[0].instance_type.as_deref(),
        Some("m7i.large")
    );
    assert_eq!(
        spot.num_calls(),
        2,
        "one call per spot option: the 500 was not retried"
    );
    assert_eq!(on_demand.num_calls(), 1);
    assert_eq!(describe.num_calls(), 1);
}

const SPOT_ROLE_MISSING: &str = "The provided credentials do not have permission to create the service-linked role for EC2 Spot Instances.";

#[tokio::test]
async fn a_missing_spot_role_falls_back_to_on_demand_and_says_what_to_do() {
    let describe = none_running();
    let spot = mock!(Client::run_instances)
        .match_requests(|r| well_formed(r) && is_spot(r))
        .sequence()
        .http_status(
            403,
            Some(ec2_error(
                "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
                SPOT_ROLE_MISSING,
            )),
        )
        .repeatedly()
        .build();
    let on_demand = mock!(Client::run_instances)
        .match_requests(|r| well_formed(r) && r.instance_market_options().is_none())
        .then_output(|| launched("i-0123456789abcdef0", "m7i.large"));
    let under_test = handler(
        config(&[
            ("S3SPOT_MARKET", "spot-then-on-demand"),
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large"),
        ]),
        &[&describe, &spot, &on_demand],
    );
    let outcome = report(&under_test).await;
    assert_eq!(outcome.failed, []);
    assert_eq!(outcome.launched[0].market, "on-demand");
    assert_eq!(spot.num_calls(), 2, "each spot option was tried once");
    assert_eq!(on_demand.num_calls(), 1);

    // Spot alone: nothing can launch until the role exists, and the error says how to make it.
    let describe = none_running();
    let spot = run_instances_fails(
        403,
        "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
        SPOT_ROLE_MISSING,
    );
    let under_test = handler(config(&[("S3SPOT_MARKET", "spot")]), &[&describe, &spot]);
    let outcome = report(&under_test).await;
    let failed = &outcome.failed[0];
    assert!(!failed.retryable, "{failed:?}");
    for needle in [
        "no launch option can launch here",
        "AWSServiceRoleForEC2Spot",
        "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com",
        "redrive",
    ] {
        assert!(
            failed.error.contains(needle),
            "{needle} not in {}",
            failed.error
        );
    }
}

#[tokio::test]
async fn a_type_not_offered_here_moves_on_to_the_next_option() {
    let describe = none_running();
    let offered =
        |r: &RunInstancesInput, t: &str| r.instance_type() == Some(&InstanceType::from(t));
    let unsupported = mock!(Client::run_instances)
        .match_requests(move |r| well_formed(r) && offered(r, "m7i.large"))
        .sequence()
        .http_status(400, Some(ec2_error(
                    "Unsupported",
                    "Your requested instance type (m7i.large) is not supported in your requested Availability Zone (us-east-1e).",
                )))
        .repeatedly()
        .build();
    let wrong_arch = mock!(Client::run_instances)
        .match_requests(move |r| well_formed(r) && offered(r, "m7g.large"))
        .sequence()
        .http_status(400, Some(ec2_error(
                    "InvalidParameterValue",
                    "The architecture 'arm64' of the specified instance type does not match the architecture 'x86_64' of the specified AMI.",
                )))
        .repeatedly()
        .build();
    let fits = mock!(Client::run_instances)
        .match_requests(move |r| well_formed(r) && offered(r, "m6i.large"))
        .then_output(|| launched("i-0123456789abcdef0", "m6i.large"));
    let under_test = handler(
        config(&[
            ("S3SPOT_MARKET", "spot"),
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m7g.large,m6i.large"),
        ]),
        &[&describe, &unsupported, &wrong_arch, &fits],
    );
    let outcome = report(&under_test).await;
    assert_eq!(outcome.failed, []);
    assert_eq!(
        outcome.launched[0].instance_type.as_deref(),
        Some("m6i.large")
    );
    assert_eq!((unsupported.num_calls(), wrong_arch.num_calls()), (1, 1));
}

#[tokio::test]
async fn an_event_fails_for_good_only_when_no_option_can_ever_launch() {
    // Every type unknown or not offered: waiting does not help.
    let describe = none_running();
    let run = mock!(Client::run_instances)
        .sequence()
        .http_status(400, Some(ec2_error("Unsupported", "Your requested instance type (m7i.large) is not supported in your requested Availability Zone (us-east-1e).")))
        .http_status(400, Some(ec2_error("InvalidParameterValue", "Invalid value 'm6i.huge' for InstanceType.")))
        .build();
    let under_test = handler(
        config(&[("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.huge")]),
        &[&describe, &run],
    );
    let outcome = report(&under_test).await;
    assert!(!outcome.failed[0].retryable, "{:?}", outcome.failed[0]);
    assert!(
        outcome.failed[0]
            .error
            .starts_with("no launch option can launch here: ")
    );
    assert!(
        outcome.failed[0]
            .error
            .contains("Invalid value 'm6i.huge' for InstanceType.")
    );

    // One of them out of capacity: capacity comes back, so the event is retried.
    let describe = none_running();
    let run = mock!(Client::run_instances)
        .sequence()
        .http_status(400, Some(ec2_error("Unsupported", "Your requested instance type (m7i.large) is not supported in your requested Availability Zone (us-east-1e).")))
        .http_status(500, Some(ec2_error("InsufficientInstanceCapacity", "We currently do not have sufficient m6i.large capacity.")))
        .build();
    let under_test = handler(
        config(&[("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large")]),
        &[&describe, &run],
    );
    let Err(HandlerError::Retryable(outcome)) = under_test.handle(console_event()).await else {
        panic!("expected a retryable failure")
    };
    assert!(
        outcome.failed[0]
            .error
            .starts_with("no launch option had capacity: ")
    );

    // Any other bad value is the configuration's, and stops at once.
    let describe = none_running();
    let run = run_instances_fails(
        400,
        "InvalidParameterValue",
        "Value (x) for parameter iamInstanceProfile.name is invalid.",
    );
    let under_test = handler(
        config(&[("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large")]),
        &[&describe, &run],
    );
    let outcome = report(&under_test).await;
    assert!(!outcome.failed[0].retryable);
    assert_eq!(run.num_calls(), 1);
}

#[tokio::test]
async fn throttling_is_retried_by_the_sdk() {
    let describe = none_running();
    let run = mock!(Client::run_instances)
        .match_requests(|r| well_formed(r) && is_spot(r))
        .sequence()
        .http_status(
            503,
            Some(ec2_error("RequestLimitExceeded", "Request limit exceeded.")),
        )
        .times(2)
        .output(|| launched("i-0fedcba9876543210", "t3.micro"))
        .build();
    let handler = handler(config(&[]), &[&describe, &run]);
    let report = report(&handler).await;
    assert_eq!(report.launched[0].instance_id, "i-0fedcba9876543210");
    assert_eq!(run.num_calls(), 3);
}

#[tokio::test]
async fn throttling_that_outlasts_the_sdk_retries_is_retryable() {
    let describe = none_running();
    let run = mock!(Client::run_instances)
        .sequence()
        .http_status(
            503,
            Some(ec2_error("RequestLimitExceeded", "Request limit exceeded.")),
        )
        .repeatedly()
        .build();
    let handler = handler(config(&[]), &[&describe, &run]);
    let Err(HandlerError::Retryable(report)) = handler.handle(console_event()).await else {
        panic!("expected a retryable failure")
    };
    assert!(
        report.failed[0].error.contains("RequestLimitExceeded"),
        "{}",
        report.failed[0].error
    );
    assert_eq!(run.num_calls(), 3);
}

#[tokio::test]
async fn an_instance_already_launched_and_terminated_is_not_an_error() {
    let describe = none_running();
    let run = run_instances_fails(
        400,
        "IdempotentInstanceTerminated",
        "The client token you provided is associated with a resource that is already deleted.",
    );
    let handler = handler(
        config(&[("S3SPOT_MARKET", "spot-then-on-demand")]),
        &[&describe, &run],
    );
    let report = report(&handler).await;
    assert_eq!(report.failed, []);
    assert_eq!(report.launched, []);
    assert!(report.skipped[0].reason.starts_with("already launched"));
    assert_eq!(
        run.num_calls(),
        1,
        "no on-demand launch for a job that already ran"
    );
}

#[tokio::test]
async fn the_vcpu_quota_fails_the_record_as_retryable_without_falling_back() {
    let describe = none_running();
    let run = run_instances_fails(
        400,
        "VcpuLimitExceeded",
        "You have requested more vCPU capacity than your current vCPU limit of 32 allows.",
    );
    let handler = handler(
        config(&[("S3SPOT_MARKET", "spot-then-on-demand")]),
        &[&describe, &run],
    );
    let Err(HandlerError::Retryable(report)) = handler.handle(console_event()).await else {
        panic!("expected a retryable failure")
    };
    assert!(report.failed[0].retryable);
    assert!(
        report.failed[0]
            .error
            .contains("account limit reached (VcpuLimitExceeded)")
    );
    assert_eq!(run.num_calls(), 1);
}

#[tokio::test]
async fn a_parameter_mismatch_is_a_clear_permanent_error() {
    let describe = none_running();
    let run = run_instances_fails(
        400,
        "IdempotentParameterMismatch",
        "The arguments on this idempotent request are inconsistent with arguments used in previous request(s).",
    );
    let handler = handler(config(&[]), &[&describe, &run]);
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
    let run = run_instances_fails(
        400,
        "InvalidLaunchTemplateName.NotFoundException",
        "The specified launch template, with template name s3spot-worker, does not exist.",
    );
    let handler = handler(config(&[]), &[&describe, &run]);
    let report = report(&handler).await;
    assert!(!report.failed[0].retryable);
    assert_eq!(
        report.failed[0].error,
        "RunInstances failed: InvalidLaunchTemplateName.NotFoundException: The specified launch \
         template, with template name s3spot-worker, does not exist."
    );
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
    let run = mock!(Client::run_instances).then_output(|| launched("i-1", "t3.micro"));
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
    let run = mock!(Client::run_instances).then_output(|| launched("i-0new", "t3.micro"));
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
    let run = mock!(Client::run_instances).then_output(|| launched("i-0new", "t3.micro"));
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
async fn order_by_price_launches_the_cheapest_type_of_any_page_first() {
    let (first, second) = two_pages_of_prices();
    let run = mock!(Client::run_instances)
        .match_requests(|r: &RunInstancesInput| r.instance_type() == Some(&InstanceType::T3Large))
        .then_output(|| launched("i-0cheap", "t3.large"));
    let describe = none_running();
    let handler = handler(
        config(&[
            ("S3SPOT_INSTANCE_TYPES", "m5.large,c5.large,t3.large"),
            ("S3SPOT_ORDER_BY_PRICE", "true"),
        ]),
        &[&describe, &first, &second, &run],
    );
    let report = report(&handler).await;
    assert_eq!(report.launched.len(), 1, "{report:?}");
    assert_eq!(
        report.launched[0].instance_type.as_deref(),
        Some("t3.large")
    );
    assert_eq!(run.num_calls(), 1, "the cheapest type, first");
}
