//! The EC2 double behaves as EC2 documents: what s3spot's exactly-once tests rely on, checked
//! through the real SDK client.

use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata as _;
use aws_sdk_ec2::operation::create_fleet::CreateFleetOutput;
use aws_sdk_ec2::operation::create_fleet::builders::CreateFleetFluentBuilder;
use aws_sdk_ec2::types::{
    DefaultTargetCapacityType, Filter, FleetLaunchTemplateConfigRequest,
    FleetLaunchTemplateOverridesRequest, FleetLaunchTemplateSpecificationRequest, FleetType,
    InstanceStateName, InstanceType, ResourceType, Tag, TagSpecification,
    TargetCapacitySpecificationRequest,
};
use s3spot_tests::Ec2Double;
use s3spot_tests::ec2::{LISTED_AFTER_TERMINATION, TOKEN_AFTER_TERMINATION};

async fn client(double: &Ec2Double) -> Client {
    Client::new(&double.sdk_config().await)
}

/// An instant fleet of one instance over `pools` (type, subnet), in `market`.
fn fleet(
    client: &Client,
    token: &str,
    market: DefaultTargetCapacityType,
    pools: &[(&str, &str)],
) -> CreateFleetFluentBuilder {
    let overrides = pools
        .iter()
        .map(|(instance_type, subnet)| {
            FleetLaunchTemplateOverridesRequest::builder()
                .instance_type(InstanceType::from(*instance_type))
                .subnet_id(*subnet)
                .build()
        })
        .collect();
    client
        .create_fleet()
        .r#type(FleetType::Instant)
        .client_token(token)
        .launch_template_configs(
            FleetLaunchTemplateConfigRequest::builder()
                .launch_template_specification(
                    FleetLaunchTemplateSpecificationRequest::builder()
                        .launch_template_name("s3spot-worker")
                        .version("1")
                        .launch_template_specification_user_data("IyEvYmluL2Jhc2gK")
                        .build(),
                )
                .set_overrides(Some(overrides))
                .build(),
        )
        .target_capacity_specification(
            TargetCapacitySpecificationRequest::builder()
                .total_target_capacity(1)
                .default_target_capacity_type(market)
                .build(),
        )
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("s3spot:job").value("job-1").build())
                .build(),
        )
}

fn instance_of(output: &CreateFleetOutput) -> Option<String> {
    output
        .instances()
        .first()
        .map(|i| i.instance_ids()[0].clone())
}

fn error_codes(output: &CreateFleetOutput) -> Vec<String> {
    output
        .errors()
        .iter()
        .map(|e| e.error_code().unwrap_or_default().to_owned())
        .collect()
}

async fn launch(client: &Client, token: &str, instance_type: &str) -> Result<String, String> {
    fleet(
        client,
        token,
        DefaultTargetCapacityType::OnDemand,
        &[(instance_type, "subnet-0a")],
    )
    .send()
    .await
    .map(|output| instance_of(&output).expect("an instance"))
    .map_err(|error| error.code().unwrap_or("no code").to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn client_tokens_are_idempotent_as_ec2_documents() {
    let double = Ec2Double::start();
    let ec2 = client(&double).await;
    let first = launch(&ec2, "token-1", "m7i.large").await.unwrap();
    assert_eq!(
        launch(&ec2, "token-1", "m7i.large").await,
        Ok(first.clone()),
        "the same request again: the same answer"
    );
    assert_eq!(
        launch(&ec2, "token-1", "m6i.large").await,
        Err("IdempotentParameterMismatch".into()),
        "the same token with other parameters"
    );
    assert_eq!(double.instances().len(), 1);

    ec2.terminate_instances()
        .instance_ids(&first)
        .send()
        .await
        .unwrap();
    double.advance(TOKEN_AFTER_TERMINATION - Duration::from_secs(60));
    assert_eq!(
        launch(&ec2, "token-1", "m7i.large").await,
        Ok(first.clone()),
        "kept for at least 24 hours"
    );
    double.advance(Duration::from_secs(120));
    let second = launch(&ec2, "token-1", "m7i.large").await.unwrap();
    assert_ne!(second, first, "then forgotten: a new instance");
    assert_eq!(double.instances().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn terminated_instances_are_listed_for_an_hour_then_forgotten() {
    let double = Ec2Double::start();
    let ec2 = client(&double).await;
    let id = launch(&ec2, "t", "t3.micro").await.unwrap();
    double.end(
        &id,
        "Server.SpotInstanceTermination",
        "Server.SpotInstanceTermination: Spot instance termination",
    );
    double.set_console(&id, "worker sha256 mismatch\n");
    let by_tag = || async {
        ec2.describe_instances()
            .filters(
                Filter::builder()
                    .name("tag:s3spot:job")
                    .values("job-1")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect::<Vec<_>>()
    };
    let listed = by_tag().await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        listed[0].state().and_then(|s| s.name()),
        Some(&InstanceStateName::Terminated)
    );
    assert_eq!(
        listed[0].state_reason().and_then(|r| r.code()),
        Some("Server.SpotInstanceTermination")
    );
    let console = ec2
        .get_console_output()
        .instance_id(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(console.output(), Some("d29ya2VyIHNoYTI1NiBtaXNtYXRjaAo="));
    let by_state = ec2
        .describe_instances()
        .filters(
            Filter::builder()
                .name("instance-state-name")
                .values("pending")
                .values("running")
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert!(by_state.reservations().is_empty());

    double.advance(LISTED_AFTER_TERMINATION);
    assert!(by_tag().await.is_empty(), "forgotten");
    let error = ec2
        .describe_instances()
        .instance_ids(&id)
        .send()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some("InvalidInstanceID.NotFound"));
}

#[tokio::test(flavor = "multi_thread")]
async fn each_pool_answers_for_itself_and_a_refused_token_answers_the_same_again() {
    let double = Ec2Double::start();
    let ec2 = client(&double).await;
    let spot = DefaultTargetCapacityType::Spot;
    let pools = [("m7i.large", "subnet-0a"), ("m6i.large", "subnet-0b")];
    double.set_pool_capacity("spot", "m7i.large", None, false);
    let output = fleet(&ec2, "a", spot.clone(), &pools).send().await.unwrap();
    assert_eq!(error_codes(&output), ["InsufficientInstanceCapacity"]);
    let launched = &output.instances()[0];
    assert_eq!(launched.instance_type(), Some(&InstanceType::M6iLarge));
    let overrides = launched
        .launch_template_and_overrides()
        .and_then(|l| l.overrides())
        .unwrap();
    assert_eq!(overrides.subnet_id(), Some("subnet-0b"));
    let id = instance_of(&output).unwrap();
    let instance = double.instances().into_iter().find(|i| i.id == id).unwrap();
    assert_eq!(
        (instance.market.as_str(), instance.subnet_id.as_deref()),
        ("spot", Some("subnet-0b"))
    );
    assert_eq!(instance.user_data, "IyEvYmluL2Jhc2gK");

    // No pool has capacity: every pool's error, and no instance.
    double.set_capacity("spot", false);
    let refused = fleet(&ec2, "b", spot.clone(), &pools).send().await.unwrap();
    assert_eq!(instance_of(&refused), None);
    assert_eq!(error_codes(&refused).len(), 2);
    // Capacity returns, but the same token gets its first answer again.
    double.set_capacity("spot", true);
    double.set_pool_capacity("spot", "m7i.large", None, true);
    let again = fleet(&ec2, "b", spot.clone(), &pools).send().await.unwrap();
    assert_eq!(instance_of(&again), None, "the same answer as the first");
    let new_token = fleet(&ec2, "c", spot, &pools).send().await.unwrap();
    assert!(instance_of(&new_token).is_some());

    // A full quota answers every pool with it.
    double.set_quota("on-demand", Some(0));
    let output = fleet(
        &ec2,
        "e",
        DefaultTargetCapacityType::OnDemand,
        &[("m5.large", "subnet-0a")],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(error_codes(&output), ["VcpuLimitExceeded"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn launches_past_the_bucket_are_throttled_until_it_refills() {
    let double = Ec2Double::start();
    let ec2 = client(&double).await;
    // No SDK retries here: each refusal is seen.
    let ec2 = Client::from_conf(
        ec2.config()
            .to_builder()
            .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
            .build(),
    );
    double.set_launch_bucket(1000.0, 2.0, 20.0);
    assert!(launch(&ec2, "1", "m5.large").await.is_ok());
    assert!(launch(&ec2, "2", "m5.large").await.is_ok());
    assert_eq!(
        launch(&ec2, "3", "m5.large").await,
        Err("RequestLimitExceeded".into())
    );
    assert_eq!(double.throttled_requests(), 1);
    assert_eq!(
        double.instances().len(),
        2,
        "a refused request launches nothing"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(launch(&ec2, "3", "m5.large").await.is_ok(), "refilled");
}
