//! One upload, at most one instance: the launcher against a double of EC2's documented
//! `ClientToken` behaviour (which moto lacks) and a real S3 server, through the deliveries AWS
//! really makes. Each sequence ends with exactly one instance.

use std::time::{Duration, SystemTime};

use s3spot_bootstrap::{
    JobSpec, S3Statuses, State, Status, Writer, job_from_base64_user_data, record,
};
use s3spot_lambda::{Config, Ec2Launcher, Handler, Report, Response};
use s3spot_tests::ec2::TOKEN_AFTER_TERMINATION;
use s3spot_tests::{Ec2Double, REGION, S3Server, s3spot_lookup};
use serde_json::{Value, json};

const BUCKET: &str = "data";

struct Setup {
    ec2: Ec2Double,
    s3: S3Server,
}

impl Setup {
    fn start() -> Setup {
        Setup {
            ec2: Ec2Double::start(),
            s3: S3Server::start(&[BUCKET]),
        }
    }

    /// The handler as the function builds it, on the double and the S3 server.
    async fn handler(&self, overrides: &[(&str, &str)]) -> Handler<Ec2Launcher, S3Statuses> {
        let mut config = Config::from_lookup(s3spot_lookup("s3spot-worker", overrides)).unwrap();
        config.job.region = Some(REGION.into());
        Handler::new(
            config,
            Ec2Launcher::new(&self.ec2.sdk_config().await),
            S3Statuses::from_client(self.s3.client().await),
        )
    }

    /// The job an instance of the double was launched with.
    fn job_of(&self, instance_id: &str) -> JobSpec {
        let instance = self
            .ec2
            .instances()
            .into_iter()
            .find(|i| i.id == instance_id)
            .unwrap();
        job_from_base64_user_data(&instance.user_data).unwrap()
    }
}

/// The S3 notification of one upload of `in/f.csv`, as S3 delivers it (again and again).
fn upload_event() -> Value {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": REGION,
        "eventTime": "2026-11-30T10:19:37.123Z", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": BUCKET}, "object": {
            "key": "in/f.csv", "size": 42, "eTag": "0123456789abcdef0123456789abcdef",
            "sequencer": "0062E99A88DC407460"}}
    }]})
}

async fn deliver(handler: &Handler<Ec2Launcher, S3Statuses>) -> Report {
    match handler.handle(upload_event()).await {
        Ok(Response::Report(report)) => report,
        other => panic!("expected a report, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn spot_back_after_an_on_demand_fallback_launches_nothing_more() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[("S3SPOT_MARKET", "spot-then-on-demand")])
        .await;
    // 1. Spot has no capacity: the job launches on demand.
    setup.ec2.set_capacity("spot", false);
    let first = deliver(&handler).await;
    assert_eq!(first.failed, []);
    assert_eq!(first.launched[0].market, "on-demand");

    // 2. The message comes again (a batch timeout, an S3 duplicate, a redrive), and 3. spot has
    // capacity now: its token was never used, so only the lookup stands in the way.
    setup.ec2.set_capacity("spot", true);
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert!(
        again.skipped[0].reason.starts_with("already launched")
            && again.skipped[0]
                .reason
                .contains(&first.launched[0].instance_id),
        "{:?}",
        again.skipped
    );
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn prices_that_move_between_deliveries_launch_nothing_more() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large"),
            ("S3SPOT_ORDER_BY_PRICE", "true"),
        ])
        .await;
    setup.ec2.set_spot_prices(&[
        ("m7i.large", "us-east-1a", 0.05),
        ("m6i.large", "us-east-1a", 0.04),
    ]);
    let first = deliver(&handler).await;
    assert_eq!(
        first.launched[0].instance_type.as_deref(),
        Some("m6i.large"),
        "the cheaper type first"
    );

    // Prices move: the cheaper type is the other one now, and its token is new.
    setup.ec2.set_spot_prices(&[
        ("m7i.large", "us-east-1a", 0.03),
        ("m6i.large", "us-east-1a", 0.04),
    ]);
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert!(again.skipped[0].reason.starts_with("already launched"));
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_days_later_launches_nothing_for_a_job_that_ran() {
    let setup = Setup::start();
    let handler = setup.handler(&[]).await;
    let first = deliver(&handler).await;
    let id = first.launched[0].instance_id.clone();

    // The worker succeeds, writes its status and powers the instance off.
    let job = setup.job_of(&id);
    let mut done = Status::initial(&job, Writer::Worker, SystemTime::now());
    done.state = State::Succeeded;
    record(
        &S3Statuses::from_client(setup.s3.client().await),
        &job.results_bucket,
        &job.status_key(),
        done,
    )
    .await
    .unwrap();
    setup.ec2.end(
        &id,
        "Client.InstanceInitiatedShutdown",
        "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
    );

    // A DLQ redrive a day and more later: EC2 has forgotten the instance and its token.
    setup
        .ec2
        .advance(TOKEN_AFTER_TERMINATION + Duration::from_secs(3600));
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert!(
        again.skipped[0].reason.starts_with("already ran")
            && again.skipped[0].reason.contains("(succeeded)"),
        "{:?}",
        again.skipped
    );
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redrive_after_an_instance_died_without_a_word_launches_nothing_more() {
    let setup = Setup::start();
    let handler = setup.handler(&[]).await;
    let id = deliver(&handler).await.launched[0].instance_id.clone();
    // The worker was killed (out of memory, say): the instance powered off with no status.
    setup
        .ec2
        .set_console(&id, "Out of memory: Killed process 1234 (s3spot-worker)\n");
    setup.ec2.end(
        &id,
        "Client.InstanceInitiatedShutdown",
        "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
    );
    // Within one period, while EC2 still lists it, the reaper gives the attempt its status.
    setup.ec2.advance(Duration::from_secs(15 * 60));
    let reaped = match handler
        .handle(
            json!({"source": "aws.events", "detail-type": "Scheduled Event",
            "id": "1", "version": "0", "account": "123456789012",
            "time": "2026-11-30T10:35:00Z", "region": REGION, "resources": [], "detail": {}}),
        )
        .await
    {
        Ok(Response::Report(report)) => report,
        other => panic!("{other:?}"),
    };
    assert_eq!(reaped.failed, [], "{reaped:?}");
    assert_eq!(reaped.ended.len(), 1, "{reaped:?}");
    let job = setup.job_of(&id);
    let status = s3spot_bootstrap::read_status(
        &S3Statuses::from_client(setup.s3.client().await),
        &job.results_bucket,
        &job.status_key(),
        &job.job_id,
    )
    .await
    .unwrap()
    .expect("a final status");
    assert_eq!(status.state, State::Failed);
    let error = status.error.unwrap();
    assert!(error.contains(&id) && error.contains("Client.InstanceInitiatedShutdown"));
    assert!(error.contains("Out of memory"), "{error}");

    setup
        .ec2
        .advance(TOKEN_AFTER_TERMINATION + Duration::from_secs(3600));
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert!(again.skipped[0].reason.starts_with("already ran"));
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_instance_taken_back_is_relaunched_once_however_often_it_is_told() {
    let setup = Setup::start();
    let handler = setup.handler(&[]).await;
    let id = deliver(&handler).await.launched[0].instance_id.clone();
    let warning = json!({"version": "0", "id": "w", "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2", "account": "123456789012", "time": "2026-11-30T10:30:00Z",
        "region": REGION, "resources": [format!("arn:aws:ec2:{REGION}a:instance/{id}")],
        "detail": {"instance-id": id, "instance-action": "terminate"}});
    for _ in 0..2 {
        let Ok(Response::Report(report)) = handler.handle(warning.clone()).await else {
            panic!("a report")
        };
        assert_eq!(report.failed, []);
    }
    setup.ec2.end(
        &id,
        "Server.SpotInstanceTermination",
        "Server.SpotInstanceTermination: Spot instance termination",
    );
    // The reaper sees the reclaimed instance too, and the upload's event comes again.
    let Ok(Response::Report(reaped)) = handler
        .handle(
            json!({"source": "aws.events", "detail-type": "Scheduled Event",
            "id": "1", "version": "0", "account": "123456789012",
            "time": "2026-11-30T10:35:00Z", "region": REGION, "resources": [], "detail": {}}),
        )
        .await
    else {
        panic!("a report")
    };
    assert_eq!(reaped.failed, [], "{reaped:?}");
    deliver(&handler).await;
    let attempts: Vec<Option<String>> = setup
        .ec2
        .instances()
        .iter()
        .map(|i| i.tag("s3spot:attempt").map(str::to_owned))
        .collect();
    assert_eq!(
        attempts,
        [Some("1".into()), Some("2".into())],
        "the second attempt, once"
    );
    assert_eq!(setup.ec2.running().len(), 1, "exactly one instance runs");
}
