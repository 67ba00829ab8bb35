//! One upload, at most one instance: the launcher against a double of EC2's documented
//! `ClientToken` behaviour (which moto lacks) and a real S3 server, through the deliveries AWS
//! really makes. Each sequence ends with exactly one instance.

use std::time::{Duration, SystemTime};

use s3spot_bootstrap::fake::RecordedEvents;
use s3spot_bootstrap::{
    Claim, JobSpec, JobState, S3Statuses, State, Status, Usd, Writer, changed_state,
    job_from_base64_user_data, read_claim, record, record_change, write_claim,
};
use s3spot_lambda::jobs::JobInstance;
use s3spot_lambda::plan::{Decision, preview};
use s3spot_lambda::{
    CLAIM_LEASE, Clock, Config, Ec2Launcher, Handler, HandlerError, Jobs, REPLACEMENT_WAIT, Report,
    Response, Target,
};
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

    /// EC2 takes a spot instance back.
    fn take_back(&self, id: &str) {
        self.ec2.end(
            id,
            "Server.SpotInstanceTermination",
            "Server.SpotInstanceTermination: Spot instance termination",
        );
    }

    /// The instance powers itself off (the bootstrap, once its worker is done or dead).
    fn power_off(&self, id: &str) {
        self.ec2.end(
            id,
            "Client.InstanceInitiatedShutdown",
            "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
        );
    }

    /// The worker's account of `job`, recorded as the worker records it.
    async fn worker_writes(&self, job: &JobSpec, account: Status) {
        record(
            &S3Statuses::from_client(self.s3.client().await),
            &job.results_bucket,
            &job.status_key(),
            account,
        )
        .await
        .unwrap();
    }

    /// The job's status.json, which must be there.
    async fn status(&self, job: &JobSpec) -> Status {
        s3spot_bootstrap::read_status(
            &S3Statuses::from_client(self.s3.client().await),
            &job.results_bucket,
            &job.status_key(),
            &job.job_id,
        )
        .await
        .unwrap()
        .expect("a status")
    }

    /// The `s3spot:attempt` of every instance launched, oldest first.
    fn attempts(&self) -> Vec<String> {
        self.ec2
            .instances()
            .iter()
            .map(|i| i.tag("s3spot:attempt").unwrap_or("none").to_owned())
            .collect()
    }

    /// The job commands, on the double and the S3 server, with `handler`'s configuration.
    async fn jobs(
        &self,
        handler: &Handler<Ec2Launcher, S3Statuses>,
    ) -> Jobs<Ec2Launcher, S3Statuses> {
        Jobs::new(
            handler.config().jobs(),
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
    upload_event_of("in/f.csv")
}

fn upload_event_of(key: &str) -> Value {
    json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": REGION,
        "eventTime": "2026-11-30T10:19:37.123Z", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": BUCKET}, "object": {
            "key": key, "size": 42, "eTag": "0123456789abcdef0123456789abcdef",
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
    // EC2's answer, before the claim is read: the lookup alone stops it.
    assert_eq!(
        again.skipped[0].reason,
        format!(
            "already launched: attempt 1 of job {} is on {} (running)",
            setup.job_of(&first.launched[0].instance_id).job_id,
            first.launched[0].instance_id
        ),
    );
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn pools_that_change_between_deliveries_launch_nothing_more() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large")])
        .await;
    setup
        .ec2
        .set_pool_capacity("spot", "m7i.large", None, false);
    let first = deliver(&handler).await;
    assert_eq!(
        first.launched[0].instance_type.as_deref(),
        Some("m6i.large"),
        "the pool that had capacity"
    );

    // The function is redeployed with other pools: the request, and its token, are new.
    let handler = setup
        .handler(&[("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large,m5.large")])
        .await;
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    let reason = &again.skipped[0].reason;
    assert!(
        reason.starts_with("already launched") && reason.ends_with("(running)"),
        "EC2's answer, before the claim is read: {reason}"
    );
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
    setup.worker_writes(&job, done).await;
    setup.power_off(&id);

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
    setup.power_off(&id);
    // Within one period, while EC2 still lists it, the reaper gives the attempt its status.
    setup.ec2.advance(Duration::from_secs(15 * 60));
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.failed, [], "{reaped:?}");
    assert_eq!(reaped.ended.len(), 1, "{reaped:?}");
    let job = setup.job_of(&id);
    let status = setup.status(&job).await;
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
    // The warning comes (twice): the instance still runs, so nothing is launched beside it.
    for _ in 0..2 {
        let report = handled(&handler, warning_event(&id)).await;
        assert!(report.failed[0].retryable, "{report:?}");
        assert_eq!(report.launched, []);
        assert_eq!(setup.ec2.running().len(), 1, "never two instances at once");
    }
    setup.take_back(&id);
    // Its redeliveries launch the next attempt once; the reaper sees the reclaimed instance
    // too, and the upload's event comes again.
    for _ in 0..2 {
        let report = handled(&handler, warning_event(&id)).await;
        assert_eq!(report.failed, [], "{report:?}");
    }
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.failed, [], "{reaped:?}");
    deliver(&handler).await;
    let attempts = setup.attempts();
    assert_eq!(attempts, ["1", "2"], "the second attempt, once");
    assert_eq!(setup.ec2.running().len(), 1, "exactly one instance runs");
}

/// The planned first attempt of the upload, as the handler plans it.
fn planned(handler: &Handler<Ec2Launcher, S3Statuses>) -> JobSpec {
    match preview(&handler.config().job, upload_event())
        .unwrap()
        .remove(0)
    {
        Decision::Launch { job, .. } => job.spec,
        other => panic!("{other:?}"),
    }
}

fn reaper_event() -> Value {
    json!({"source": "aws.events", "detail-type": "Scheduled Event",
        "id": "1", "version": "0", "account": "123456789012",
        "time": "2026-11-30T10:35:00Z", "region": REGION, "resources": [], "detail": {}})
}

fn warning_event(id: &str) -> Value {
    json!({"version": "0", "id": "w", "detail-type": "EC2 Spot Instance Interruption Warning",
        "source": "aws.ec2", "account": "123456789012", "time": "2026-11-30T10:30:00Z",
        "region": REGION, "resources": [format!("arn:aws:ec2:{REGION}a:instance/{id}")],
        "detail": {"instance-id": id, "instance-action": "terminate"}})
}

/// A report, whether the invocation asked for a retry or not.
async fn handled(handler: &Handler<Ec2Launcher, S3Statuses>, event: Value) -> Report {
    match handler.handle(event).await {
        Ok(Response::Report(report)) | Err(HandlerError::Retryable(report)) => report,
        other => panic!("expected a report, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redelivery_before_ec2_lists_the_first_instance_launches_nothing_more() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[("S3SPOT_MARKET", "spot-then-on-demand")])
        .await;
    // EC2 is eventually consistent: for a while, no query by tags finds the new instance.
    setup.ec2.set_listing_lag(Duration::from_secs(60));
    setup.ec2.set_capacity("spot", false);
    let first = deliver(&handler).await;
    assert_eq!(first.launched[0].market, "on-demand", "{first:?}");
    setup.ec2.set_capacity("spot", true);
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    let reason = &again.skipped[0].reason;
    assert!(
        reason.starts_with("already launched")
            && reason.contains(&first.launched[0].instance_id)
            && reason.contains("/.s3spot/attempt-1.json"),
        "{reason}"
    );
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_at_the_same_time_launch_once_whatever_capacity_does_between_them() {
    let setup = Setup::start();
    // Two invocations of the function, each with its own clients, as Lambda runs them.
    let one = setup
        .handler(&[("S3SPOT_MARKET", "spot-then-on-demand")])
        .await;
    let two = setup
        .handler(&[("S3SPOT_MARKET", "spot-then-on-demand")])
        .await;
    setup.ec2.set_listing_lag(Duration::from_secs(60));
    // Whichever asks first finds no spot capacity; the other would find it, with a token of its
    // own.
    setup.ec2.fail_next("spot", 1);
    let (a, b) = tokio::join!(handled(&one, upload_event()), handled(&two, upload_event()));
    assert_eq!(
        a.launched.len() + b.launched.len(),
        1,
        "one launches: {a:?} {b:?}"
    );
    // The other found the claim: held (it is retried, and then finds the instance), or with
    // the instance on it.
    let other = if a.launched.is_empty() { &a } else { &b };
    let held = other
        .failed
        .first()
        .is_some_and(|f| f.retryable && f.error.starts_with("being launched by another delivery"));
    let launched = other
        .skipped
        .first()
        .is_some_and(|s| s.reason.starts_with("already launched"));
    assert!(held || launched, "{other:?}");
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launch_that_died_holding_its_claim_is_taken_over_once_its_lease_is_out() {
    let setup = Setup::start();
    let handler = setup.handler(&[]).await;
    let statuses = S3Statuses::from_client(setup.s3.client().await);
    let job = planned(&handler);
    let key = job.claim_key();

    // A launch that fails releases its claim: the event's next delivery takes it over.
    setup.ec2.set_capacity("spot", false);
    let failed = handled(&handler, upload_event()).await;
    assert!(failed.failed[0].retryable, "{failed:?}");
    let stored = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    let released = stored.claim.unwrap();
    assert!(
        released
            .released
            .as_deref()
            .is_some_and(|why| why.contains("InsufficientInstanceCapacity")),
        "{released:?}"
    );

    // A launcher that took it over died mid-way (its invocation timed out), and left a pending
    // claim.
    let mut pending = released.take_over(job.clone());
    assert_eq!(pending.refused, 1, "its try has a token of its own");
    write_claim(&statuses, BUCKET, &key, &pending, &stored.expect)
        .await
        .unwrap();
    setup.ec2.set_capacity("spot", true);
    let waiting = handled(&handler, upload_event()).await;
    assert_eq!(waiting.launched, [], "{waiting:?}");
    assert!(
        waiting.failed[0].retryable
            && waiting.failed[0]
                .error
                .starts_with("being launched by another delivery"),
        "{waiting:?}"
    );
    assert_eq!(setup.ec2.instances().len(), 0);

    // Past its lease, the claim is taken over, after EC2 is asked again.
    let stored = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    pending.claimed_at =
        s3spot_bootstrap::timestamp(SystemTime::now() - CLAIM_LEASE - Duration::from_secs(1));
    write_claim(&statuses, BUCKET, &key, &pending, &stored.expect)
        .await
        .unwrap();
    let launched = deliver(&handler).await;
    assert_eq!(launched.launched.len(), 1, "{launched:?}");
    let id = &launched.launched[0].instance_id;
    let held = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    assert_eq!(held.claim.unwrap().instance_id.as_ref(), Some(id));

    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");

    // A launcher that died after RunInstances and before recording its instance: past the
    // lease, EC2 lists the instance, and nothing more is launched.
    let stored = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    write_claim(&statuses, BUCKET, &key, &pending, &stored.expect)
        .await
        .unwrap();
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert!(
        again.skipped[0]
            .reason
            .ends_with(&format!("is on {id} (running)")),
        "{again:?}"
    );
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spot_instance_taken_back_is_replaced_though_new_uploads_fill_the_cap_and_a_deploy_changed_the_worker()
 {
    let setup = Setup::start();
    let handler = setup.handler(&[("S3SPOT_MAX_INSTANCES", "1")]).await;
    let id = deliver(&handler).await.launched[0].instance_id.clone();
    setup.take_back(&id);
    // Another upload takes the place it left, up to the cap.
    let other = handled(&handler, upload_event_of("in/g.csv")).await;
    assert_eq!(other.launched.len(), 1, "{other:?}");
    // A deploy since then ships another worker; the instance role can read only that one.
    let new_worker = "f".repeat(64);
    let deployed = setup
        .handler(&[
            ("S3SPOT_MAX_INSTANCES", "1"),
            (
                "S3SPOT_WORKER_URI",
                "s3://artifacts/workers/new/s3spot-worker",
            ),
            ("S3SPOT_WORKER_SHA256", &new_worker),
        ])
        .await;
    let report = handled(&deployed, warning_event(&id)).await;
    assert_eq!(report.failed, [], "{report:?}");
    assert_eq!(report.launched.len(), 1, "{report:?}");
    let job = setup.job_of(&report.launched[0].instance_id);
    let first = setup.job_of(&id);
    assert_eq!(job.attempt, 2);
    assert_eq!(job.worker.sha256, new_worker);
    assert_eq!(job.worker.uri, "s3://artifacts/workers/new/s3spot-worker");
    assert_eq!(
        job,
        JobSpec {
            attempt: 2,
            worker: job.worker.clone(),
            ..first
        },
        "otherwise the job as it was launched"
    );
}

/// The worker's account of attempt 1, stopped by the spot notice; a worker from before
/// `spot_interruption` (still running through a deploy) does not say it was the notice.
async fn worker_stopped_by_the_notice(setup: &Setup, job: &JobSpec, says_so: bool) {
    let mut stopped = Status::initial(job, Writer::Worker, SystemTime::now());
    stopped.state = State::Interrupted;
    stopped.error = Some("spot interruption notice (terminate) after 61 s".into());
    stopped.spot_interruption = says_so;
    setup.worker_writes(job, stopped).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_that_powers_itself_off_after_the_notice_is_replaced_whoever_comes_first() {
    for (reaper_first, says_so) in [(true, true), (false, true), (true, false)] {
        let setup = Setup::start();
        let handler = setup.handler(&[]).await;
        let id = deliver(&handler).await.launched[0].instance_id.clone();
        let job = setup.job_of(&id);
        let waiting = handled(&handler, warning_event(&id)).await;
        assert!(waiting.failed[0].retryable, "{waiting:?}");
        // The worker stops at the notice and says so; the bootstrap powers the instance off
        // before EC2 takes it.
        worker_stopped_by_the_notice(&setup, &job, says_so).await;
        setup.power_off(&id);
        let (first, second) = if reaper_first {
            (reaper_event(), warning_event(&id))
        } else {
            (warning_event(&id), reaper_event())
        };
        for event in [first, second] {
            let report = handled(&handler, event).await;
            assert_eq!(
                report.failed,
                [],
                "reaper first: {reaper_first}: {report:?}"
            );
        }
        // Later periods, while attempt 2 runs and before its worker writes a word.
        setup.ec2.advance(Duration::from_secs(15 * 60));
        let report = handled(&handler, reaper_event()).await;
        assert_eq!(report.ended, [], "reaper first: {reaper_first}: {report:?}");
        let attempts = setup.attempts();
        assert_eq!(attempts, ["1", "2"], "{reaper_first}");
        let status = setup.status(&job).await;
        assert_eq!(
            (status.state, status.attempt),
            (State::Interrupted, 1),
            "reaper first: {reaper_first}: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replacement_that_cannot_launch_yet_is_launched_by_the_reaper_later() {
    let setup = Setup::start();
    let handler = setup.handler(&[]).await;
    let id = deliver(&handler).await.launched[0].instance_id.clone();
    let job = setup.job_of(&id);
    setup.take_back(&id);

    // No spot capacity when the warning comes back: the attempt is recorded interrupted, with
    // why, and the warning is retried.
    setup.ec2.set_capacity("spot", false);
    let warned = handled(&handler, warning_event(&id)).await;
    assert!(warned.failed[0].retryable, "{warned:?}");
    let status = setup.status(&job).await;
    assert_eq!(status.state, State::Interrupted);
    let error = status.error.unwrap_or_default();
    assert!(error.contains("attempt 2 not launched yet"), "{error}");

    // Capacity is back by the reaper's next period, while EC2 still lists the instance, and
    // whatever became of the warning (its deliveries may have run out).
    setup.ec2.set_capacity("spot", true);
    setup.ec2.advance(Duration::from_secs(15 * 60));
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.failed, [], "{reaped:?}");
    assert_eq!(reaped.ended.len(), 1, "{reaped:?}");
    let attempts = setup.attempts();
    assert_eq!(attempts, ["1", "2"]);

    // The next period finds the second attempt launched, and launches nothing more.
    setup.ec2.advance(Duration::from_secs(15 * 60));
    handled(&handler, reaper_event()).await;
    assert_eq!(setup.ec2.instances().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replacement_that_waits_too_long_for_capacity_fails_the_job_while_ec2_lists_it() {
    let setup = Setup::start();
    let handler = setup.handler(&[]).await;
    let statuses = S3Statuses::from_client(setup.s3.client().await);
    let id = deliver(&handler).await.launched[0].instance_id.clone();
    let job = setup.job_of(&id);
    setup.take_back(&id);
    setup.ec2.set_capacity("spot", false);
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.failed.len(), 1, "{reaped:?}");
    assert_eq!(setup.ec2.instances().len(), 1);

    // The second attempt has waited for capacity since its first claim, REPLACEMENT_WAIT ago:
    // the reaper's next look, before EC2 forgets the instance, fails the job, and says how to
    // run it again.
    let next = JobSpec {
        attempt: 2,
        ..job.clone()
    };
    let stored = read_claim(&statuses, BUCKET, &next.claim_key())
        .await
        .unwrap()
        .unwrap();
    let released = stored.claim.unwrap();
    assert!(released.released.is_some(), "{released:?}");
    let since = Some(s3spot_bootstrap::timestamp(
        SystemTime::now() - REPLACEMENT_WAIT - Duration::from_secs(1),
    ));

    // As long as a launch of it may be under way (its outcome unknown), the job waits on.
    let pending = Claim {
        since: since.clone(),
        ..Claim::new(next.clone())
    };
    let expect = write_claim(
        &statuses,
        BUCKET,
        &next.claim_key(),
        &pending,
        &stored.expect,
    )
    .await
    .unwrap();
    setup.ec2.advance(Duration::from_secs(5 * 60));
    handled(&handler, reaper_event()).await;
    assert_eq!(setup.status(&job).await.state, State::Interrupted);

    // Refused by EC2 for all that time, it fails.
    let claim = Claim { since, ..released };
    write_claim(&statuses, BUCKET, &next.claim_key(), &claim, &expect)
        .await
        .unwrap();
    setup.ec2.advance(Duration::from_secs(5 * 60));
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.failed, [], "{reaped:?}");
    let status = setup.status(&job).await;
    assert_eq!(status.state, State::Failed, "{status:?}");
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains("attempt 2 could not be launched in 25 minutes")
            && error.contains("InsufficientInstanceCapacity")
            && error.contains("s3spot jobs retry s3://data/in/f.csv"),
        "{error}"
    );
    // Final: the reaper leaves it, and nothing is launched.
    setup.ec2.set_capacity("spot", true);
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.ended, [], "{reaped:?}");
    assert_eq!(setup.ec2.instances().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_results_bucket_that_does_not_exist_stops_the_launch_and_says_so() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[("S3SPOT_RESULTS_BUCKET", "no-such-results")])
        .await;
    let report = handled(&handler, upload_event()).await;
    assert_eq!(report.launched, [], "{report:?}");
    let error = &report.failed[0].error;
    assert!(
        error.contains("s3://no-such-results/") && error.contains("NoSuchBucket"),
        "{error}"
    );
    assert_eq!(setup.ec2.instances().len(), 0);
}

/// The deployed shape: several launchers at once (the queue's pollers, the reaper, an operator's
/// retry), each with a batch of uploads, against one EC2. Each counts again before every launch,
/// so the pipeline ends at most `C - 1` instances over the cap with C launchers, never a cap per
/// launcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_launchers_overshoot_the_cap_by_at_most_one_each_but_the_first() {
    const MAX: usize = 5;
    const LAUNCHERS: usize = 4;
    let setup = Setup::start();
    // Round trips long enough that the launchers' counts and launches interleave.
    setup.ec2.set_latency(Duration::from_millis(40));
    let mut handlers = Vec::new();
    for _ in 0..LAUNCHERS {
        handlers.push(setup.handler(&[("S3SPOT_MAX_INSTANCES", "5")]).await);
    }
    let batch = |launcher: usize| {
        let records: Vec<Value> = (0..10)
            .map(|i| upload_event_of(&format!("in/{launcher}-{i}.csv"))["Records"][0].clone())
            .collect();
        json!({ "Records": records })
    };
    let results = tokio::join!(
        handlers[0].handle(batch(0)),
        handlers[1].handle(batch(1)),
        handlers[2].handle(batch(2)),
        handlers[3].handle(batch(3)),
    );
    for result in [&results.0, &results.1, &results.2, &results.3] {
        match result {
            Ok(_) | Err(HandlerError::Retryable(_)) => {}
            Err(other) => panic!("{other}"),
        }
    }
    let running = setup.ec2.running().len();
    assert!(running >= MAX, "the cap is reached: {running}");
    assert!(
        running < MAX + LAUNCHERS,
        "{running} instances: over the cap of {MAX} by more than one per other launcher"
    );
}

/// The job's entries in the list of waiting jobs, as `s3spot jobs list` shows them.
async fn waiting_rows(
    setup: &Setup,
    handler: &Handler<Ec2Launcher, S3Statuses>,
) -> Vec<JobInstance> {
    setup
        .jobs(handler)
        .await
        .list(Clock::now(&handler.config().jobs()))
        .await
        .unwrap()
        .into_iter()
        .filter(|row| row.waiting.is_some())
        .collect()
}

/// A handler whose upload finds no spot capacity on its first delivery, and so waits: the
/// handler, and the job, whose status.json says `waiting`.
async fn waiting_job(
    setup: &Setup,
    overrides: &[(&str, &str)],
) -> (Handler<Ec2Launcher, S3Statuses>, JobSpec) {
    let mut overrides = overrides.to_vec();
    overrides.push(("S3SPOT_RESULTS_BUCKET", BUCKET));
    let handler = setup.handler(&overrides).await;
    let job = planned(&handler);
    setup.ec2.set_capacity("spot", false);
    let waited = handled(&handler, upload_event()).await;
    assert!(waited.failed[0].retryable, "{waited:?}");
    assert_eq!(setup.status(&job).await.state, State::Waiting);
    (handler, job)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_with_no_capacity_in_any_pool_waits_says_why_and_launches_when_it_returns() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large"),
            ("S3SPOT_SUBNETS", "subnet-0a,subnet-0b"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
        ])
        .await;
    let job = planned(&handler);
    setup.ec2.set_capacity("spot", false);
    let waited = handled(&handler, upload_event()).await;
    assert!(waited.failed[0].retryable, "{waited:?}");

    let status = setup.status(&job).await;
    assert_eq!(status.state, State::Waiting, "{status:?}");
    let waiting = status.waiting.expect("why it waits");
    assert!(
        waiting.reason.starts_with("no capacity: 4 pool(s) tried"),
        "{waiting:?}"
    );
    let pools: Vec<&str> = waiting.pools.iter().map(|p| p.pool.as_str()).collect();
    assert_eq!(
        pools,
        [
            "spot m7i.large in subnet-0a",
            "spot m7i.large in subnet-0b",
            "spot m6i.large in subnet-0a",
            "spot m6i.large in subnet-0b"
        ]
    );
    assert!(
        waiting
            .pools
            .iter()
            .all(|p| p.code == "InsufficientInstanceCapacity")
    );
    let since = s3spot_bootstrap::parse_timestamp(&waiting.since).unwrap();
    let next = s3spot_bootstrap::parse_timestamp(waiting.next_try.as_deref().unwrap()).unwrap();
    let gives_up =
        s3spot_bootstrap::parse_timestamp(waiting.gives_up_at.as_deref().unwrap()).unwrap();
    assert!(
        next >= since + Duration::from_secs(299),
        "the queue's visibility timeout"
    );
    assert_eq!(
        gives_up.duration_since(since).unwrap(),
        Duration::from_secs(6 * 3600)
    );

    let rows = waiting_rows(&setup, &handler).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    let row = rows[0].waiting.as_ref().unwrap();
    assert_eq!((row.reason.as_str(), row.pools_tried), ("no capacity", 4));
    assert_eq!(rows[0].key, "in/f.csv");

    // The queue brings it back, still without capacity: the same wait, the same since.
    let again = handled(&handler, upload_event()).await;
    assert!(again.failed[0].retryable, "{again:?}");
    let still = setup.status(&job).await.waiting.unwrap();
    assert_eq!(still.since, waiting.since);

    // Capacity returns: it launches (with a token of its own: EC2 answers a repeated token with
    // its first answer), leaves the list, and its status says so until its worker reports.
    setup.ec2.set_capacity("spot", true);
    let launched = handled(&handler, upload_event()).await;
    assert_eq!(launched.launched.len(), 1, "{launched:?}");
    assert_eq!(waiting_rows(&setup, &handler).await, []);
    let status = setup.status(&job).await;
    assert!(
        status
            .error
            .as_deref()
            .unwrap_or_default()
            .starts_with(&format!(
                "launched on {} after waiting since",
                launched.launched[0].instance_id
            )),
        "{status:?}"
    );
    // The worker's account replaces it.
    let mut account = Status::initial(&job, Writer::Worker, SystemTime::now());
    account.state = State::Succeeded;
    setup.worker_writes(&job, account).await;
    assert_eq!(setup.status(&job).await.state, State::Succeeded);
    assert_eq!(setup.ec2.instances().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_at_the_cap_or_over_a_quota_waits_and_says_which() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[
            ("S3SPOT_MAX_INSTANCES", "1"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
        ])
        .await;
    let first = handled(&handler, upload_event_of("in/first.csv")).await;
    assert_eq!(first.launched.len(), 1);
    let capped = handled(&handler, upload_event()).await;
    assert!(capped.failed[0].retryable, "{capped:?}");
    let job = planned(&handler);
    let waiting = setup.status(&job).await.waiting.unwrap();
    assert!(
        waiting
            .reason
            .starts_with("runaway guard: at least 1 instances"),
        "{waiting:?}"
    );
    assert_eq!(waiting.pools, []);
    let rows = waiting_rows(&setup, &handler).await;
    assert_eq!(rows[0].waiting.as_ref().unwrap().reason, "runaway guard");

    // Room at the cap, but a spot vCPU quota that is full.
    setup.power_off(&first.launched[0].instance_id);
    setup.ec2.set_quota("spot", Some(0));
    let quota = handled(&handler, upload_event()).await;
    assert!(quota.failed[0].retryable, "{quota:?}");
    let waiting = setup.status(&job).await.waiting.unwrap();
    assert!(
        waiting.reason.starts_with("an account quota is reached"),
        "{waiting:?}"
    );
    assert_eq!(waiting.pools[0].code, "VcpuLimitExceeded");

    setup.ec2.set_quota("spot", None);
    let launched = handled(&handler, upload_event()).await;
    assert_eq!(launched.launched.len(), 1, "{launched:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_waits_past_max_wait_fails_with_its_last_reason() {
    let setup = Setup::start();
    let (handler, job) = waiting_job(&setup, &[("S3SPOT_MAX_WAIT", "1s")]).await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let gave_up = handled(&handler, upload_event()).await;
    let failed = &gave_up.failed[0];
    assert!(!failed.retryable, "{gave_up:?}");
    assert!(
        failed
            .error
            .contains("past S3SPOT_MAX_WAIT=1s; last: no capacity"),
        "{}",
        failed.error
    );
    let status = setup.status(&job).await;
    assert_eq!(status.state, State::Failed);
    assert!(
        status
            .error
            .unwrap()
            .contains("InsufficientInstanceCapacity")
    );
    assert_eq!(waiting_rows(&setup, &handler).await, []);

    // Final: capacity coming back launches nothing for it.
    setup.ec2.set_capacity("spot", true);
    let later = handled(&handler, upload_event()).await;
    assert_eq!(later.launched, [], "{later:?}");
    assert_eq!(setup.ec2.instances().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_fails_a_waiting_job_whose_deliveries_ran_out_before_its_wait() {
    let setup = Setup::start();
    let (handler, job) = waiting_job(&setup, &[("S3SPOT_MAX_WAIT", "1s")]).await;

    // Its message went to the dead-letter queue: no delivery comes back. Before the wait is
    // out, the reaper leaves the job waiting.
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.ended, [], "{reaped:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.ended.len(), 1, "{reaped:?}");
    let status = setup.status(&job).await;
    assert_eq!(status.state, State::Failed, "{status:?}");
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains("past S3SPOT_MAX_WAIT") && error.contains("InsufficientInstanceCapacity"),
        "{error}"
    );
    assert_eq!(waiting_rows(&setup, &handler).await, []);
    // A redrive of the message then launches nothing.
    setup.ec2.set_capacity("spot", true);
    let redriven = handled(&handler, upload_event()).await;
    assert_eq!(redriven.launched, [], "{redriven:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operators_retry_of_a_waiting_job_is_its_one_launch() {
    let setup = Setup::start();
    let (handler, job) = waiting_job(&setup, &[]).await;

    // Capacity returns, and an operator retries the job before its next delivery: attempt 2.
    setup.ec2.set_capacity("spot", true);
    let target = s3spot_lambda::Target::parse(&format!("s3://{BUCKET}/in/f.csv"));
    let retried = handler.retry(&target).await.unwrap();
    assert_eq!(retried.launched.len(), 1, "{retried:?}");
    assert_eq!(
        waiting_rows(&setup, &handler).await,
        [],
        "no longer waiting"
    );
    let status = setup.status(&job).await;
    assert_eq!(status.attempt, 2, "{status:?}");

    // The first attempt's delivery comes back: it finds the later attempt, and launches nothing.
    let again = handled(&handler, upload_event()).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert!(
        again.skipped[0]
            .reason
            .starts_with("already launched: attempt 2"),
        "{again:?}"
    );
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_that_can_never_launch_fails_once_and_says_so() {
    let setup = Setup::start();
    // The event's 42-byte object asks 1x+1GiB for 2 GiB, above a 1 GiB ceiling.
    let handler = setup
        .handler(&[
            ("S3SPOT_DISK", "1x+1GiB"),
            ("S3SPOT_MAX_DISK", "1"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
        ])
        .await;
    let job = planned(&handler);
    let failed = handled(&handler, upload_event()).await;
    assert!(!failed.failed[0].retryable, "{failed:?}");
    let status = setup.status(&job).await;
    assert_eq!(status.state, State::Failed);
    assert!(
        status
            .error
            .unwrap_or_default()
            .contains("above S3SPOT_MAX_DISK=1 GiB"),
    );
    // The queue delivers it again: nothing is tried, nothing launched.
    let calls = setup.ec2.create_fleet_calls();
    let again = handled(&handler, upload_event()).await;
    assert_eq!(again.failed, [], "{again:?}");
    assert_eq!(again.launched, []);
    assert_eq!(setup.ec2.create_fleet_calls(), calls);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_job_can_be_cancelled_before_it_launches() {
    let setup = Setup::start();
    let (handler, job) = waiting_job(&setup, &[]).await;
    let jobs = setup.jobs(&handler).await;
    let target = s3spot_lambda::Target::parse(&format!("s3://{BUCKET}/in/f.csv"));
    let stopped = jobs
        .cancel(&target, Clock::now(&handler.config().jobs()))
        .await
        .unwrap();
    assert_eq!(stopped.ended.len(), 1, "{stopped:?}");
    assert_eq!(setup.status(&job).await.state, State::Cancelled);
    assert_eq!(waiting_rows(&setup, &handler).await, []);
    // Capacity returns, and the queue delivers the event again: nothing is launched.
    setup.ec2.set_capacity("spot", true);
    let again = handled(&handler, upload_event()).await;
    assert_eq!(again.launched, [], "{again:?}");
    assert_eq!(setup.ec2.instances().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_that_outlasts_the_sdk_makes_the_job_wait_and_says_so() {
    let setup = Setup::start();
    let handler = setup.handler(&[("S3SPOT_RESULTS_BUCKET", BUCKET)]).await;
    let job = planned(&handler);
    // An account whose launch bucket is empty, and refills too slowly to matter here.
    setup.ec2.set_launch_bucket(1000.0, 0.0, 0.001);
    let waited = handled(&handler, upload_event()).await;
    assert!(waited.failed[0].retryable, "{waited:?}");
    let waiting = setup.status(&job).await.waiting.expect("waiting");
    assert!(
        waiting.reason.contains("RequestLimitExceeded"),
        "{waiting:?}"
    );
    assert_eq!(waiting_rows(&setup, &handler).await.len(), 1);
    assert_eq!(setup.ec2.instances().len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_leaves_a_waiting_job_that_ec2_lists_an_instance_of() {
    let setup = Setup::start();
    let (handler, job) = waiting_job(&setup, &[("S3SPOT_MAX_WAIT", "1s")]).await;
    let waiting = setup.status(&job).await;
    assert_eq!(waiting.state, State::Waiting);
    // A delivery launches it and dies before it says so: its status and the list still say it
    // waits.
    setup.ec2.set_capacity("spot", true);
    let launched = handled(&handler, upload_event()).await;
    assert_eq!(launched.launched.len(), 1);
    let statuses = S3Statuses::from_client(setup.s3.client().await);
    record(&statuses, BUCKET, &job.status_key(), waiting.clone())
        .await
        .unwrap();
    let body = serde_json::to_vec(&waiting).unwrap();
    s3spot_bootstrap::StatusStore::put(
        &statuses,
        BUCKET,
        &job.waiting_key(),
        body,
        &s3spot_bootstrap::Expect::Anything,
    )
    .await
    .unwrap();
    assert_eq!(waiting_rows(&setup, &handler).await.len(), 1);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let reaped = handled(&handler, reaper_event()).await;
    assert_eq!(reaped.ended, [], "{reaped:?}");
    assert_ne!(setup.status(&job).await.state, State::Failed);
    assert_eq!(
        waiting_rows(&setup, &handler).await,
        [],
        "the stale entry is gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refusal_of_the_accounts_setup_launches_once_it_is_fixed_and_redriven() {
    let setup = Setup::start();
    let handler = setup
        .handler(&[
            ("S3SPOT_INSTANCE_TYPES", "m7i.large"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
        ])
        .await;
    // A launcher policy that allows the fleet but no instance of this type.
    let policy = s3spot_tests::iam::Policy::from_document(&json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "ec2:*", "Resource": "*"},
            {"Effect": "Deny", "Action": ["ec2:RunInstances", "ec2:CreateFleet"],
             "Resource": "arn:aws:ec2:*:*:instance/*",
             "Condition": {"StringEquals": {"ec2:InstanceType": "m7i.large"}}}
        ]
    }));
    setup.ec2.set_policy(s3spot_tests::ACCESS_KEY, policy);
    let refused = handled(&handler, upload_event()).await;
    assert!(!refused.failed[0].retryable, "{refused:?}");
    assert!(
        refused.failed[0].error.contains("UnauthorizedOperation"),
        "{refused:?}"
    );
    // The owner fixes the policy and redrives the dead-letter queue: it launches.
    setup.ec2.set_policy(
        s3spot_tests::ACCESS_KEY,
        s3spot_tests::iam::Policy::from_document(&json!({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]
        })),
    );
    let redriven = handled(&handler, upload_event()).await;
    assert_eq!(redriven.launched.len(), 1, "{redriven:?}");
}

/// The handler of `setup`, announcing job state changes to `events`.
async fn announcing(
    setup: &Setup,
    events: &RecordedEvents,
    overrides: &[(&str, &str)],
) -> Handler<Ec2Launcher, S3Statuses> {
    setup.handler(overrides).await.with_events(events.events())
}

/// A job that waits, launches, and is cancelled, delivered again at every step: one event per
/// change, from whoever made it.
#[tokio::test(flavor = "multi_thread")]
async fn every_change_of_a_jobs_state_is_one_event_however_often_it_is_delivered() {
    let setup = Setup::start();
    let events = RecordedEvents::new();
    let handler = announcing(
        &setup,
        &events,
        &[
            ("S3SPOT_INSTANCE_TYPES", "m7i.large"),
            ("S3SPOT_RESULTS_BUCKET", BUCKET),
        ],
    )
    .await;
    setup.ec2.set_spot_prices(&[
        ("m7i.large", "us-east-1a", 0.04),
        ("m7i.large", "us-east-1b", 0.05),
        ("m5.large", "us-east-1a", 0.9),
    ]);
    let job = planned(&handler);
    setup.ec2.set_capacity("spot", false);
    handled(&handler, upload_event()).await;
    handled(&handler, upload_event()).await;
    assert_eq!(events.states(), [(1, "waiting".into())]);

    setup.ec2.set_capacity("spot", true);
    let launched = handled(&handler, upload_event()).await;
    let instance_id = launched.launched[0].instance_id.clone();
    handled(&handler, upload_event()).await;
    assert_eq!(
        events.states(),
        [(1, "waiting".into()), (1, "launched".into())]
    );
    // The launch kept its price: the double names a subnet, not a zone, so the dearest zone's.
    let statuses = S3Statuses::from_client(setup.s3.client().await);
    let claim = read_claim(&statuses, BUCKET, &job.claim_key())
        .await
        .unwrap()
        .unwrap()
        .claim
        .unwrap();
    let price = claim.price.expect("the launch price");
    assert_eq!(price.usd_per_hour, Some(Usd(0.05)));
    assert_eq!(price.instance_type, "m7i.large");
    assert_eq!(price.on_demand_usd_per_hour, Some(Usd(0.1008)));

    let jobs = setup.jobs(&handler).await.with_events(events.events());
    let target = Target::parse("in/f.csv");
    let stopped = jobs
        .cancel(&target, Clock::now(jobs.config()))
        .await
        .unwrap();
    assert_eq!(stopped.errors, Vec::<String>::new());
    // The cancelled worker's own account keeps the state: no change, no event.
    let mut account = Status::initial(&job, Writer::Worker, SystemTime::now());
    account.state = State::Interrupted;
    account.error = Some("stopped by SIGTERM".into());
    let (recorded, before) = record_change(&statuses, BUCKET, &job.status_key(), account)
        .await
        .unwrap();
    assert_eq!(changed_state(&recorded, before), None);
    assert_eq!(
        events.states(),
        [
            (1, "waiting".into()),
            (1, "launched".into()),
            (1, "cancelled".into())
        ]
    );

    let all = events.all();
    assert_eq!(all[0].previous_state, None);
    assert!(all[0].error.as_deref().unwrap().starts_with("no capacity"));
    assert_eq!(all[1].previous_state, Some(JobState::Waiting));
    let instance = all[1].instance.clone().unwrap();
    assert_eq!(instance.id.as_deref(), Some(instance_id.as_str()));
    assert_eq!(instance.market.as_deref(), Some("spot"));
    assert_eq!(instance.instance_type.as_deref(), Some("m7i.large"));
    assert_eq!(all[2].previous_state, Some(JobState::Launched));
    let cost = all[2].cost.clone().expect("a cancel costs until now");
    assert_eq!(cost.usd_per_hour, Usd(0.05));
    assert!(cost.usd.0 >= 0.05 / 60.0, "at least a minute: {cost:?}");
    for event in &all {
        assert_eq!(event.pipeline, "s3spot");
        assert_eq!(event.job_id, job.job_id);
        assert_eq!(event.results.status, job.status_key());
        s3spot_tests::events::assert_valid(&event.envelope("123456789012", REGION));
    }
}

/// EventBridge down: the job waits, launches and is cancelled as it would be, and nothing is
/// sent.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_that_cannot_be_sent_changes_nothing_of_the_jobs_outcome() {
    let setup = Setup::start();
    let events = RecordedEvents::new();
    events.fail(true);
    let handler = announcing(&setup, &events, &[("S3SPOT_RESULTS_BUCKET", BUCKET)]).await;
    let job = planned(&handler);
    setup.ec2.set_capacity("spot", false);
    let waited = handled(&handler, upload_event()).await;
    assert!(waited.failed[0].retryable, "{waited:?}");
    assert_eq!(setup.status(&job).await.state, State::Waiting);
    setup.ec2.set_capacity("spot", true);
    let launched = handled(&handler, upload_event()).await;
    assert_eq!(launched.launched.len(), 1, "{launched:?}");
    assert_eq!(launched.failed, []);
    let jobs = setup.jobs(&handler).await.with_events(events.events());
    let stopped = jobs
        .cancel(&Target::parse("in/f.csv"), Clock::now(jobs.config()))
        .await
        .unwrap();
    assert_eq!(stopped.errors, Vec::<String>::new());
    assert_eq!(setup.status(&job).await.state, State::Cancelled);
    assert_eq!(setup.ec2.instances().len(), 1);
    assert_eq!(events.all(), []);
}

/// A launcher that died after `CreateFleet` and before it recorded the instance: once its
/// claim's lease is out, the delivery that finds the instance in EC2 records it, with its
/// price, and announces the launch, once.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_whose_launcher_died_unknowing_is_recorded_and_announced_once() {
    let setup = Setup::start();
    let types = [("S3SPOT_INSTANCE_TYPES", "m7i.large")];
    setup
        .ec2
        .set_spot_prices(&[("m7i.large", "us-east-1c", 0.03)]);
    // The first delivery's launcher: it launches, and dies before recording or announcing.
    let silent = setup.handler(&types).await;
    let launched = deliver(&silent).await;
    let id = launched.launched[0].instance_id.clone();
    let statuses = S3Statuses::from_client(setup.s3.client().await);
    let job = planned(&silent);
    let key = job.claim_key();
    let stored = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    let mut pending = stored.claim.unwrap();
    pending.instance_id = None;
    pending.price = None;
    write_claim(&statuses, BUCKET, &key, &pending, &stored.expect)
        .await
        .unwrap();

    let events = RecordedEvents::new();
    let handler = announcing(&setup, &events, &types).await;
    // Within its lease, the claim is a launch under way's: left alone.
    let skipped = deliver(&handler).await;
    assert_eq!(skipped.launched, [], "{skipped:?}");
    let claim = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    assert_eq!(claim.claim.unwrap().instance_id, None);
    assert_eq!(events.all(), []);

    let stored = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    pending.claimed_at =
        s3spot_bootstrap::timestamp(SystemTime::now() - CLAIM_LEASE - Duration::from_secs(1));
    write_claim(&statuses, BUCKET, &key, &pending, &stored.expect)
        .await
        .unwrap();
    for _ in 0..2 {
        let again = deliver(&handler).await;
        assert_eq!(again.launched, [], "{again:?}");
    }
    assert_eq!(setup.ec2.instances().len(), 1, "exactly one instance");
    let claim = read_claim(&statuses, BUCKET, &key)
        .await
        .unwrap()
        .unwrap()
        .claim
        .unwrap();
    assert_eq!(claim.instance_id.as_deref(), Some(id.as_str()));
    let price = claim.price.expect("its price");
    assert_eq!(price.usd_per_hour, Some(Usd(0.03)));
    assert_eq!(events.states(), [(1, "launched".into())]);
    let event = &events.all()[0];
    assert_eq!(
        event.instance.as_ref().and_then(|i| i.id.as_deref()),
        Some(id.as_str())
    );
    assert_eq!(event.time, price.launched_at, "the launch's own time");
}

/// Found only once its worker has reported: the claim gets the instance and its price, but no
/// `launched` comes after the outcome.
#[tokio::test(flavor = "multi_thread")]
async fn an_instance_found_after_its_job_ended_is_recorded_but_not_announced() {
    let setup = Setup::start();
    let silent = setup.handler(&[]).await;
    let launched = deliver(&silent).await;
    let id = launched.launched[0].instance_id.clone();
    let statuses = S3Statuses::from_client(setup.s3.client().await);
    let job = planned(&silent);
    let key = job.claim_key();
    let stored = read_claim(&statuses, BUCKET, &key).await.unwrap().unwrap();
    let mut pending = stored.claim.unwrap();
    pending.instance_id = None;
    pending.price = None;
    pending.claimed_at =
        s3spot_bootstrap::timestamp(SystemTime::now() - CLAIM_LEASE - Duration::from_secs(1));
    write_claim(&statuses, BUCKET, &key, &pending, &stored.expect)
        .await
        .unwrap();
    let mut account = Status::initial(&job, Writer::Worker, SystemTime::now());
    account.state = State::Succeeded;
    setup.worker_writes(&job, account).await;

    let events = RecordedEvents::new();
    let handler = announcing(&setup, &events, &[]).await;
    let again = deliver(&handler).await;
    assert_eq!(again.launched, [], "{again:?}");
    let claim = read_claim(&statuses, BUCKET, &key)
        .await
        .unwrap()
        .unwrap()
        .claim
        .unwrap();
    assert_eq!(claim.instance_id.as_deref(), Some(id.as_str()));
    assert!(claim.price.is_some());
    assert_eq!(events.all(), [], "no launch announced after the outcome");
}
