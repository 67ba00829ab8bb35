//! The EC2 double behaves as EC2 documents: what s3spot's exactly-once tests rely on, checked
//! through the real SDK client.

use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata as _;
use aws_sdk_ec2::operation::run_instances::builders::RunInstancesFluentBuilder;
use aws_sdk_ec2::types::{
    Filter, InstanceMarketOptionsRequest, InstanceStateName, InstanceType,
    LaunchTemplateSpecification, MarketType, ResourceType, Tag, TagSpecification,
};
use s3spot_tests::Ec2Double;
use s3spot_tests::ec2::{LISTED_AFTER_TERMINATION, TOKEN_AFTER_TERMINATION};

async fn client(double: &Ec2Double) -> Client {
    Client::new(&double.sdk_config().await)
}

fn run(client: &Client, token: &str, instance_type: &str) -> RunInstancesFluentBuilder {
    client
        .run_instances()
        .launch_template(
            LaunchTemplateSpecification::builder()
                .launch_template_name("s3spot-worker")
                .build(),
        )
        .min_count(1)
        .max_count(1)
        .client_token(token)
        .instance_type(InstanceType::from(instance_type))
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key("s3spot:job").value("job-1").build())
                .build(),
        )
}

async fn launch(client: &Client, token: &str, instance_type: &str) -> Result<String, String> {
    run(client, token, instance_type)
        .send()
        .await
        .map(|output| output.instances()[0].instance_id().unwrap().to_owned())
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
        "the same request again: the same instance"
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
    assert_eq!(
        launch(&ec2, "token-1", "m7i.large").await,
        Err("IdempotentInstanceTerminated".into())
    );
    double.advance(TOKEN_AFTER_TERMINATION - Duration::from_secs(60));
    assert_eq!(
        launch(&ec2, "token-1", "m7i.large").await,
        Err("IdempotentInstanceTerminated".into()),
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
async fn capacity_comes_and_goes_per_market() {
    let double = Ec2Double::start();
    let ec2 = client(&double).await;
    double.set_capacity("spot", false);
    let spot = |token: &'static str| {
        run(&ec2, token, "m7i.large").instance_market_options(
            InstanceMarketOptionsRequest::builder()
                .market_type(MarketType::Spot)
                .build(),
        )
    };
    let error = spot("a").send().await.unwrap_err();
    assert_eq!(error.code(), Some("InsufficientInstanceCapacity"));
    assert!(
        launch(&ec2, "b", "m7i.large").await.is_ok(),
        "on demand has some"
    );
    double.set_capacity("spot", true);
    let launched = spot("a").send().await.unwrap();
    assert_eq!(
        launched.instances()[0]
            .instance_lifecycle()
            .map(|l| l.as_str()),
        Some("spot"),
        "a token whose request failed for capacity launches once there is some"
    );
    assert_eq!(double.running().len(), 2);
}
