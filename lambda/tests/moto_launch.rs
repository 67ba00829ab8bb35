//! The launcher against a real EC2 API (moto): every `events/` file goes through the production
//! handler and `Ec2Launcher`, and the assertions are on the instances moto then holds.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_ec2::types::{Instance, InstanceLifecycleType, InstanceStateName, InstanceType};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use s3spot_bootstrap::{JobSpec, job_from_user_data};
use s3spot_lambda::Report;
use s3spot_lambda::{Config, Ec2Launcher, Handler, HandlerError, Response, S3Statuses};
use s3spot_tests::{
    Moto, REGION, S3Server, create_launch_template, event, events_dir, s3spot_lookup,
};

const TEMPLATE: &str = "s3spot-worker";

struct Setup {
    _moto: Moto,
    _s3: S3Server,
    sdk: aws_config::SdkConfig,
    ec2: aws_sdk_ec2::Client,
    s3_client: aws_sdk_s3::Client,
    template_id: String,
}

async fn setup() -> Setup {
    let moto = Moto::start();
    let sdk = moto.sdk_config().await;
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let template_id = create_launch_template(&ec2, TEMPLATE).await;
    // The claims and statuses go to s3s-fs: moto's S3 answers 404 to any request for a key
    // with a line break in it (hostile-key.json has one), where S3 takes any UTF-8 key.
    let s3 = S3Server::start(&["example-bucket", "data", "su2c-data"]);
    let s3_client = s3.client().await;
    Setup {
        _moto: moto,
        _s3: s3,
        sdk,
        ec2,
        s3_client,
        template_id,
    }
}

impl Setup {
    /// The handler as the binary builds it, with `S3SPOT_*` overrides.
    fn handler(&self, overrides: &[(&str, &str)]) -> Handler<Ec2Launcher, S3Statuses> {
        let mut config = Config::from_lookup(s3spot_lookup(TEMPLATE, overrides)).unwrap();
        config.job.region = Some(REGION.into());
        Handler::new(
            config,
            Ec2Launcher::new(&self.sdk),
            S3Statuses::from_client(self.s3_client.clone()),
        )
    }

    async fn instances(&self) -> Vec<Instance> {
        let output = self.ec2.describe_instances().send().await.unwrap();
        output
            .reservations()
            .iter()
            .flat_map(|r| r.instances().iter().cloned())
            .collect()
    }

    /// Terminates an instance, as EC2 does when it takes a spot instance back.
    async fn end(&self, id: &str) {
        self.ec2
            .terminate_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
    }

    async fn instance(&self, id: &str) -> Instance {
        let output = self
            .ec2
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap();
        output.reservations()[0].instances()[0].clone()
    }

    async fn user_data(&self, id: &str) -> String {
        let attribute = self
            .ec2
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let encoded = attribute.user_data().and_then(|u| u.value()).unwrap();
        String::from_utf8(BASE64.decode(encoded).unwrap()).unwrap()
    }

    /// Everything a launched job's instance must be, checked on what moto stored. Returns the
    /// JobSpec decoded from its user-data.
    async fn check_launched(&self, id: &str, bucket: &str, key: &str) -> JobSpec {
        self.check_attempt(id, bucket, key, 1).await
    }

    /// [`Self::check_launched`], for the job's `attempt`.
    async fn check_attempt(&self, id: &str, bucket: &str, key: &str, attempt: u32) -> JobSpec {
        let instance = self.instance(id).await;
        assert_eq!(
            instance.instance_lifecycle(),
            Some(&InstanceLifecycleType::Spot),
            "{key}: not spot"
        );
        let state = instance.state().and_then(|s| s.name()).unwrap();
        assert!(
            [InstanceStateName::Pending, InstanceStateName::Running].contains(state),
            "{state:?}"
        );
        // moto's instant fleets apply neither the overrides' metadata options nor the
        // template's shutdown behavior, nor tag the template's id: the request's IMDSv2 is
        // asserted in ec2_mocks.rs, and the template's settings by `s3spot doctor`'s tests.
        let tags = tag_map(instance.tags());
        assert_eq!(tags["s3spot:pipeline"], "s3spot");
        assert_eq!(tags["s3spot:bucket"], bucket);
        let bounded: String = key.chars().take(256).collect();
        assert_eq!(tags["s3spot:key"], bounded);
        assert_eq!(tags["s3spot:attempt"], attempt.to_string());
        assert_eq!(tags["s3spot:job"].len(), 32);
        assert!(tags["Name"].starts_with("s3spot: "));

        let script = self.user_data(id).await;
        assert!(script.starts_with("#!/bin/bash\n"));
        assert!(script.len() <= 16_384);
        let job = job_from_user_data(&script).unwrap();
        assert_eq!((job.bucket.as_str(), job.key.as_str()), (bucket, key));
        assert_eq!(job.worker.uri, "s3://artifacts/s3spot-worker");
        assert_eq!(job.attempt, attempt);
        assert_eq!(job.job_id, tags["s3spot:job"]);
        assert_eq!(tags["s3spot:upload"], job.upload());
        assert_eq!(tags["s3spot:max-runtime"], job.max_runtime_secs.to_string());
        job
    }
}

fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> HashMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn report(handler: &Handler<Ec2Launcher, S3Statuses>, name: &str) -> Report {
    match handler.handle(event(name)).await {
        Ok(Response::Report(report)) => report,
        other => panic!("{name}: expected a report, got {other:?}"),
    }
}

/// What one file in `events/` must do.
struct Expected {
    file: &'static str,
    /// (bucket, key) of each launch, in order.
    launches: &'static [(&'static str, &'static str)],
    skipped: usize,
    failed: usize,
}

const fn expect(
    file: &'static str,
    launches: &'static [(&'static str, &'static str)],
    skipped: usize,
) -> Expected {
    Expected {
        file,
        launches,
        skipped,
        failed: 0,
    }
}

const EXPECTED: &[Expected] = &[
    expect("s3-put.json", &[("example-bucket", "test/key")], 0),
    expect(
        "awsfun-put.json",
        &[("su2c-data", "samples/patient1.txt")],
        0,
    ),
    expect(
        "url-encoded-keys.json",
        &[
            ("data", "in/quarterly report 2024.csv"),
            ("data", "in/c++ notes+draft.txt"),
            ("data", "in/run-2024-05-01T12:00:00Z.log"),
            ("data", "in/café/名前 📊.csv"),
        ],
        0,
    ),
    expect(
        "hostile-key.json",
        &[(
            "data",
            "in/$(touch /tmp/pwned); `id` 'quoted' \"dq\"\nnext line.csv",
        )],
        0,
    ),
    expect("analysis-key.json", &[], 1),
    expect(
        "multi-record.json",
        &[("data", "in/first.csv"), ("data", "in/second.csv")],
        3,
    ),
    expect(
        "eventbridge-object-created.json",
        &[("data", "in/raw key+plus%percent.csv")],
        0,
    ),
    // Its instance is not one moto knows: whose it was cannot be told, which a person must see.
    Expected {
        file: "spot-interruption.json",
        launches: &[],
        skipped: 0,
        failed: 1,
    },
    // The reaper's schedule: the instances launched above are young, so none is reaped.
    expect("scheduled-reap.json", &[], 0),
];

#[tokio::test]
async fn every_event_file_launches_real_spot_instances_from_the_template() {
    let setup = setup().await;
    let handler = setup.handler(&[]);

    let mut files: BTreeSet<String> = std::fs::read_dir(events_dir())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect();
    assert!(files.remove("sqs-wrapped.json"), "checked below");
    assert!(files.remove("sqs-eventbridge-upload.json"), "checked below");
    let covered: BTreeSet<String> = EXPECTED.iter().map(|e| e.file.to_owned()).collect();
    assert_eq!(files, covered, "every event file has expectations here");

    for &Expected {
        file: name,
        launches,
        skipped,
        failed,
    } in EXPECTED
    {
        let report = report(&handler, name).await;
        assert_eq!(report.failed.len(), failed, "{name}: {:?}", report.failed);
        assert!(report.failed.iter().all(|f| !f.retryable), "{name}");
        assert_eq!(report.reaped, [], "{name}");
        assert_eq!(
            report.skipped.len(),
            skipped,
            "{name}: {:?}",
            report.skipped
        );
        let got: Vec<(&str, &str)> = report
            .launched
            .iter()
            .map(|l| (l.bucket.as_str(), l.key.as_str()))
            .collect();
        assert_eq!(got, launches, "{name}");
        for launched in &report.launched {
            assert!(launched.instance_id.starts_with("i-"));
            assert_eq!(launched.market, "spot");
            assert_eq!(
                launched.instance_type.as_deref(),
                Some("t3.micro"),
                "the template's type"
            );
            let job = setup
                .check_launched(&launched.instance_id, &launched.bucket, &launched.key)
                .await;
            if name == "awsfun-put.json" {
                assert_eq!(
                    job.version_id.as_deref(),
                    Some("096fKKXTRTtl3on89fVO.nfljtsv6qko")
                );
                assert_eq!(job.sequencer, None);
            }
        }
    }

    // The deployed shape: S3's EventBridge event, through the uploads rule, in an SQS body. Its
    // key is as stored, '+' and '%' included.
    let response = handler
        .handle(event("sqs-eventbridge-upload.json"))
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&response).unwrap(),
        serde_json::json!({"batchItemFailures": []})
    );
    let deployed: Vec<Instance> = setup
        .instances()
        .await
        .into_iter()
        .filter(|i| {
            tag_map(i.tags()).get("s3spot:key").map(String::as_str)
                == Some("in/deployed 2026+final%.csv")
        })
        .collect();
    assert_eq!(deployed.len(), 1);
    let job = setup
        .check_launched(
            deployed[0].instance_id().unwrap(),
            "data",
            "in/deployed 2026+final%.csv",
        )
        .await;
    assert_eq!(
        job.version_id.as_deref(),
        Some("Ke5bTyuAh7Nl3VtHXcOEZJqA1sxf8pT2")
    );

    // SQS: the reply is the partial-batch response; the instance is found by its tags.
    let response = handler.handle(event("sqs-wrapped.json")).await.unwrap();
    assert_eq!(
        serde_json::to_value(&response).unwrap(),
        serde_json::json!({"batchItemFailures": []})
    );
    let queued: Vec<Instance> = setup
        .instances()
        .await
        .into_iter()
        .filter(|i| {
            tag_map(i.tags()).get("s3spot:key").map(String::as_str) == Some("in/queued file.csv")
        })
        .collect();
    assert_eq!(queued.len(), 1);
    let job = setup
        .check_launched(
            queued[0].instance_id().unwrap(),
            "data",
            "in/queued file.csv",
        )
        .await;
    assert_eq!(
        job.version_id.as_deref(),
        Some("3sL4kqtJlcpXroDTDmJ.rmSpXd3dIbrHY")
    );

    // And one for each of the two SQS batches.
    let expected_total: usize = EXPECTED.iter().map(|e| e.launches.len()).sum::<usize>() + 2;
    assert_eq!(
        setup.instances().await.len(),
        expected_total,
        "nothing else was launched"
    );
}

/// moto records the ClientToken but does not de-duplicate: the launcher finds the job's instance
/// before it sends anything.
#[tokio::test]
async fn a_redelivered_event_launches_nothing_more() {
    let setup = setup().await;
    let first = report(&setup.handler(&[]), "hostile-key.json").await;
    let again = report(&setup.handler(&[]), "hostile-key.json").await;
    assert_eq!(again.launched, [], "{again:?}");
    let instance_id = &first.launched[0].instance_id;
    assert!(
        again.skipped[0].reason.starts_with("already launched")
            && again.skipped[0].reason.contains(instance_id.as_str()),
        "{:?}",
        again.skipped
    );
    assert_eq!(setup.instances().await.len(), 1);
}

#[tokio::test]
async fn the_runaway_guard_counts_the_real_instances_of_its_pipeline() {
    let setup = setup().await;
    // Another pipeline's instances do not count against this one's cap.
    let other = report(
        &setup.handler(&[("S3SPOT_PIPELINE", "other")]),
        "multi-record.json",
    )
    .await;
    assert_eq!(other.launched.len(), 2);

    let handler = setup.handler(&[("S3SPOT_MAX_INSTANCES", "3")]);
    let Err(HandlerError::Retryable(report)) = handler.handle(event("url-encoded-keys.json")).await
    else {
        panic!("the fourth launch must be refused")
    };
    assert_eq!(report.launched.len(), 3);
    assert_eq!(report.failed.len(), 1);
    assert!(report.failed[0].retryable);
    assert!(
        report.failed[0].error.contains("cap of 3"),
        "{}",
        report.failed[0].error
    );

    // A new invocation sees the three running instances.
    let Err(HandlerError::Retryable(report)) = handler.handle(event("s3-put.json")).await else {
        panic!("at the cap")
    };
    assert!(
        report.failed[0]
            .error
            .contains("3 instances of pipeline \"s3spot\"")
    );

    // Terminated instances free the cap.
    let ids: Vec<String> = setup
        .instances()
        .await
        .iter()
        .filter(|i| tag_map(i.tags())["s3spot:pipeline"] == "s3spot")
        .map(|i| i.instance_id().unwrap().to_owned())
        .collect();
    setup
        .ec2
        .terminate_instances()
        .set_instance_ids(Some(ids))
        .send()
        .await
        .unwrap();
    let report = self::report(&handler, "s3-put.json").await;
    assert_eq!(report.launched.len(), 1);
}

#[tokio::test]
async fn on_demand_with_an_instance_type_and_a_template_id() {
    let setup = setup().await;
    let template_id = setup.template_id.clone();
    let handler = setup.handler(&[
        ("S3SPOT_LAUNCH_TEMPLATE", &template_id),
        ("S3SPOT_LAUNCH_TEMPLATE_VERSION", "1"),
        ("S3SPOT_MARKET", "on-demand"),
        ("S3SPOT_INSTANCE_TYPES", "m5.large"),
    ]);
    let report = report(&handler, "s3-put.json").await;
    let launched = &report.launched[0];
    assert_eq!(launched.market, "on-demand");
    let instance = setup.instance(&launched.instance_id).await;
    assert_eq!(instance.instance_lifecycle(), None, "on-demand");
    assert_eq!(instance.instance_type(), Some(&InstanceType::M5Large));
}

#[tokio::test]
async fn a_missing_launch_template_is_a_clear_permanent_failure() {
    let setup = setup().await;
    let handler = setup.handler(&[("S3SPOT_LAUNCH_TEMPLATE", "no-such-template")]);
    let report = report(&handler, "s3-put.json").await;
    assert_eq!(report.launched, []);
    let failed = &report.failed[0];
    assert!(!failed.retryable);
    assert!(
        failed
            .error
            .starts_with("CreateFleet failed: InvalidLaunchTemplateName.NotFoundException: "),
        "{}",
        failed.error
    );
    assert!(setup.instances().await.is_empty());
}

fn interruption_of(instance_id: &str) -> serde_json::Value {
    let mut event = event("spot-interruption.json");
    event["detail"]["instance-id"] = instance_id.into();
    event["resources"][0] = format!("arn:aws:ec2:{REGION}a:instance/{instance_id}").into();
    event
}

async fn status(setup: &Setup, job: &JobSpec) -> s3spot_bootstrap::Status {
    let object = setup
        .s3_client
        .get_object()
        .bucket(&job.results_bucket)
        .key(job.status_key())
        .send()
        .await
        .expect("status.json written");
    serde_json::from_slice(&object.body.collect().await.unwrap().into_bytes()).unwrap()
}

#[tokio::test]
async fn a_spot_interruption_relaunches_the_job_once_until_its_last_attempt() {
    let setup = setup().await;
    let handler = setup.handler(&[("S3SPOT_MAX_ATTEMPTS", "2")]);
    let first = report(&handler, "s3-put.json").await.launched[0]
        .instance_id
        .clone();

    // While the instance runs, the next attempt waits for it to end.
    match handler.handle(interruption_of(&first)).await {
        Err(HandlerError::Retryable(report)) => {
            assert!(
                report.failed[0].error.contains("still on it (running)"),
                "{report:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(setup.instances().await.len(), 1);
    setup.end(&first).await;

    // The same warning twice (EventBridge delivers at least once): one new instance.
    for _ in 0..2 {
        match handler.handle(interruption_of(&first)).await {
            Ok(Response::Report(report)) => assert_eq!(report.failed, []),
            other => panic!("{other:?}"),
        }
    }
    let instances = setup.instances().await;
    assert_eq!(instances.len(), 2, "one re-launch");
    let second = instances
        .iter()
        .find(|i| i.instance_id() != Some(first.as_str()))
        .unwrap();
    let second_id = second.instance_id().unwrap().to_owned();
    let (tags, first_tags) = (
        tag_map(second.tags()),
        tag_map(setup.instance(&first).await.tags()),
    );
    assert_eq!(tags["s3spot:attempt"], "2");
    assert_eq!(tags["s3spot:job"], first_tags["s3spot:job"]);
    let job = setup
        .check_attempt(&second_id, "example-bucket", "test/key", 2)
        .await;
    let recorded = status(&setup, &job).await;
    assert_eq!(
        (recorded.state, recorded.attempt),
        (s3spot_bootstrap::State::Interrupted, 1)
    );
    assert!(
        recorded.error.as_deref().unwrap().contains(&second_id),
        "{:?}",
        recorded.error
    );

    // Attempt 2 is the last: it is marked failed, with attempt 1 in its history.
    setup.end(&second_id).await;
    match handler.handle(interruption_of(&second_id)).await {
        Ok(Response::Report(report)) => {
            assert_eq!((report.launched.len(), report.failed.len()), (0, 0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(setup.instances().await.len(), 2, "not re-launched");
    let failed = status(&setup, &job).await;
    assert_eq!(
        (failed.state, failed.attempt),
        (s3spot_bootstrap::State::Failed, 2)
    );
    assert_eq!(failed.history.len(), 1);
    assert_eq!(failed.history[0].attempt, 1);
    assert_eq!(
        failed.history[0].instance_id.as_deref(),
        Some(first.as_str())
    );
}

#[tokio::test]
async fn the_fleet_request_moto_keeps_is_instant_price_capacity_optimized_over_every_pool() {
    let setup = setup().await;
    let subnets: Vec<String> = setup
        .ec2
        .describe_subnets()
        .send()
        .await
        .unwrap()
        .subnets()
        .iter()
        .take(2)
        .map(|s| s.subnet_id().unwrap().to_owned())
        .collect();
    assert_eq!(subnets.len(), 2, "moto's default VPC has a subnet per zone");
    let subnet_list = subnets.join(",");
    let handler = setup.handler(&[
        ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large"),
        ("S3SPOT_SUBNETS", &subnet_list),
    ]);
    let report = report(&handler, "s3-put.json").await;
    let launched = &report.launched[0];
    let instance = setup.instance(&launched.instance_id).await;
    assert!(
        subnets
            .iter()
            .any(|s| Some(s.as_str()) == instance.subnet_id()),
        "launched in one of the pools: {:?}",
        instance.subnet_id()
    );
    setup
        .check_launched(&launched.instance_id, &launched.bucket, &launched.key)
        .await;

    let fleets = setup.ec2.describe_fleets().send().await.unwrap();
    let [fleet] = fleets.fleets() else {
        panic!("one fleet request: {fleets:?}")
    };
    assert_eq!(fleet.r#type().map(|t| t.as_str()), Some("instant"));
    assert_eq!(
        fleet
            .spot_options()
            .and_then(|o| o.allocation_strategy())
            .map(|a| a.as_str()),
        Some("price-capacity-optimized")
    );
    let [config] = fleet.launch_template_configs() else {
        panic!("one launch template config: {fleet:?}")
    };
    let template = config.launch_template_specification().unwrap();
    assert!(
        template.launch_template_name() == Some(TEMPLATE)
            || template.launch_template_id() == Some(setup.template_id.as_str()),
        "the function's launch template: {template:?}"
    );
    let pools: BTreeSet<(String, String)> = config
        .overrides()
        .iter()
        .map(|o| {
            (
                o.instance_type().unwrap().as_str().to_owned(),
                o.subnet_id().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(pools.len(), 4, "every type in every subnet: {pools:?}");
    assert_eq!(
        fleet
            .target_capacity_specification()
            .and_then(|t| t.total_target_capacity()),
        Some(1)
    );
}
