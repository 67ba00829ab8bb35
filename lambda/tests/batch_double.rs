//! The Batch backend against the Batch double (`s3spot_tests::BatchDouble`), where jobs wait on
//! the queue until the test moves them and Batch's request rate holds: what moto's Docker-less
//! Batch, which finishes every job as it is submitted, cannot show.

use s3spot_bootstrap::State;
use s3spot_lambda::{
    BatchLauncher, Clock, Config, Handler, HandlerError, Response, S3Statuses, Target,
};
use s3spot_tests::batch::SubmitFault;
use s3spot_tests::{BatchDouble, REGION, S3Server, s3spot_lookup};
use serde_json::json;

const QUEUE: &str = "s3spot-jobs";

struct Setup {
    double: BatchDouble,
    _s3: S3Server,
    s3_client: aws_sdk_s3::Client,
    sdk: aws_config::SdkConfig,
}

async fn setup(double: BatchDouble) -> Setup {
    let sdk = double.sdk_config().await;
    let s3 = S3Server::start(&["data"]);
    let s3_client = s3.client().await;
    Setup {
        double,
        _s3: s3,
        s3_client,
        sdk,
    }
}

impl Setup {
    fn config(&self, overrides: &[(&str, &str)]) -> Config {
        let mut vars = vec![
            ("S3SPOT_BACKEND", "batch"),
            ("S3SPOT_BATCH_JOB_QUEUE", QUEUE),
            ("S3SPOT_BATCH_JOB_DEFINITION", "s3spot-job"),
            ("S3SPOT_RESULTS_BUCKET", "data"),
        ];
        vars.extend_from_slice(overrides);
        let mut config = Config::from_lookup(s3spot_lookup("", &vars)).unwrap();
        config.job.region = Some(REGION.into());
        config
    }

    fn launcher(&self) -> BatchLauncher {
        let s3spot_lambda::Backend::Batch(target) = self.config(&[]).backend else {
            unreachable!()
        };
        BatchLauncher::from_client(aws_sdk_batch::Client::new(&self.sdk), target)
    }

    fn handler(&self, overrides: &[(&str, &str)]) -> Handler<BatchLauncher, S3Statuses> {
        Handler::new(
            self.config(overrides),
            self.launcher(),
            S3Statuses::from_client(self.s3_client.clone()),
        )
    }
}

fn upload(key: &str, sequencer: &str) -> serde_json::Value {
    json!({"eventName": "ObjectCreated:Put", "eventTime": "2026-11-30T10:19:37.123Z",
           "s3": {"bucket": {"name": "data"},
                  "object": {"key": key, "eTag": "e", "size": 10, "sequencer": sequencer}}})
}

/// The job's status.json: the one in its upload folder under the key's results.
async fn status_of(setup: &Setup, key: &str) -> s3spot_bootstrap::Status {
    let listed = setup
        .s3_client
        .list_objects_v2()
        .bucket("data")
        .prefix(format!("analysis/{key}/"))
        .send()
        .await
        .unwrap();
    let status_key = listed
        .contents()
        .iter()
        .filter_map(|object| object.key())
        .find(|k| k.ends_with("/status.json") && !k.contains("/.s3spot/"))
        .unwrap_or_else(|| panic!("no status.json for {key}"))
        .to_owned();
    let body = setup
        .s3_client
        .get_object()
        .bucket("data")
        .key(status_key)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_job_still_on_the_queue_is_found_by_its_name_and_never_submitted_twice() {
    let setup = setup(BatchDouble::start()).await;
    let launcher = setup.launcher();
    let request = request_for(&setup, "in/a.csv", "01");
    let first = s3spot_lambda::Launcher::launch(&launcher, &request)
        .await
        .unwrap();
    // The launcher died before it recorded the submit; the next delivery launches again.
    let again = s3spot_lambda::Launcher::launch(&launcher, &request)
        .await
        .unwrap();
    assert_eq!(again.instance_id, first.instance_id);
    let jobs = setup.double.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0].status, "RUNNABLE");
    // Running, the same.
    setup.double.set_status(&first.instance_id, "RUNNING", None);
    let running = s3spot_lambda::Launcher::launch(&launcher, &request)
        .await
        .unwrap();
    assert_eq!(running.instance_id, first.instance_id);
    assert_eq!(setup.double.jobs().len(), 1);
}

#[tokio::test]
async fn cancelling_a_queued_job_terminates_it_and_records_why() {
    let setup = setup(BatchDouble::start()).await;
    let events = s3spot_bootstrap::fake::RecordedEvents::new();
    let handler = setup.handler(&[]).with_events(events.events());
    let event = json!({"Records": [upload("in/a.csv", "01"), upload("in/b.csv", "02")]});
    let Ok(Response::Report(report)) = handler.handle(event).await else {
        panic!("the handler failed");
    };
    assert_eq!(report.launched.len(), 2, "{report:#?}");
    let jobs = handler.jobs();
    let clock = Clock::now(jobs.config());
    let listed = jobs.list(clock).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed.iter().all(|job| job.state == "pending"),
        "{listed:#?}"
    );

    let stopped = jobs
        .cancel(
            &Target::Object {
                bucket: Some("data".into()),
                key: "in/b.csv".into(),
            },
            clock,
        )
        .await
        .unwrap();
    assert_eq!(stopped.instances.len(), 1, "{stopped:#?}");
    let b = setup
        .double
        .jobs()
        .into_iter()
        .find(|job| job.id == stopped.instances[0].instance_id)
        .unwrap();
    assert_eq!(b.status, "FAILED", "TerminateJob ends a queued job");
    assert!(b.status_reason.is_some_and(|r| r.contains("s3spot")));
    let status = status_of(&setup, "in/b.csv").await;
    assert_eq!(status.state, State::Cancelled, "{status:#?}");
    // The same state changes as on EC2: each submit is `launched` (its instance the Batch
    // job), and the cancel `cancelled`, each valid against the events' schema.
    let mut states: Vec<String> = events.all().iter().map(|e| e.state.to_string()).collect();
    states.sort();
    assert_eq!(states, ["cancelled", "launched", "launched"]);
    for event in events.all() {
        s3spot_tests::events::assert_valid(&event.envelope("123456789012", REGION));
    }
    let cancelled = events
        .all()
        .into_iter()
        .find(|e| e.state.to_string() == "cancelled")
        .unwrap();
    assert_eq!(
        cancelled.instance.map(|i| i.id),
        Some(Some(stopped.instances[0].instance_id.clone()))
    );
    // The other job is untouched.
    assert_eq!(
        setup
            .double
            .jobs()
            .iter()
            .filter(|job| job.status == "RUNNABLE")
            .count(),
        1
    );
}

/// A job Batch gave up on (its host lost on every retry) and whose worker wrote nothing: the
/// reaper records it failed, with Batch's reason.
#[tokio::test]
async fn the_reaper_gives_a_silently_failed_batch_job_its_reason() {
    let setup = setup(BatchDouble::start()).await;
    let handler = setup.handler(&[]);
    let Ok(Response::Report(report)) = handler
        .handle(json!({"Records": [upload("in/a.csv", "01")]}))
        .await
    else {
        panic!("the handler failed");
    };
    let id = &report.launched[0].instance_id;
    setup.double.set_status(id, "RUNNING", None);
    setup
        .double
        .set_status(id, "FAILED", Some("Host EC2 (instance i-0abc) terminated."));
    let clock = Clock::now(handler.jobs().config());
    let stopped = handler.reap(clock, false).await.unwrap();
    assert_eq!(stopped.ended.len(), 1, "{stopped:#?}");
    let status = status_of(&setup, "in/a.csv").await;
    assert_eq!(status.state, State::Failed, "{status:#?}");
    let error = status.error.unwrap_or_default();
    assert!(
        error.contains("Host EC2 (instance i-0abc) terminated."),
        "{error}"
    );
    // A second sweep finds the verdict and records nothing more.
    let again = handler.reap(clock, false).await.unwrap();
    assert!(again.ended.is_empty(), "{again:#?}");
    // An hour after its end the job leaves the pipeline's list (Batch keeps it for days, and
    // each sweep would read its status again), as EC2 forgets an instance; named by its Batch
    // job id, it is still found.
    setup.double.ended_ago(
        id,
        s3spot_lambda::batch::LISTED_AFTER_END + std::time::Duration::from_secs(60),
    );
    let jobs = handler.jobs();
    assert!(jobs.list(clock).await.unwrap().is_empty());
    let found = jobs
        .find(&Target::Instance(id.clone()), clock)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "{found:#?}");

    // A job the queue cancelled after it waited RUNNABLE for hours never ran: Batch gives it no
    // stop time. It is still listed, so the reaper records it.
    let Ok(Response::Report(report)) = handler
        .handle(json!({"Records": [upload("in/b.csv", "02")]}))
        .await
    else {
        panic!("the handler failed");
    };
    let waited = &report.launched[0].instance_id;
    setup
        .double
        .created_ago(waited, std::time::Duration::from_secs(6 * 3600));
    setup.double.set_status(
        waited,
        "FAILED",
        Some("Job canceled: CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY"),
    );
    let stopped = handler.reap(clock, false).await.unwrap();
    assert_eq!(stopped.ended.len(), 1, "{stopped:#?}");
    let status = status_of(&setup, "in/b.csv").await;
    assert_eq!(status.state, State::Failed, "{status:#?}");
    assert!(
        status
            .error
            .is_some_and(|e| e.contains("CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY")),
        "Batch's reason"
    );
}

/// A submit refused for Batch's rate did nothing: its record waits for its next delivery, and
/// the records after it in the invocation too (no more calls into the throttling); a submit
/// whose answer is lost may have been made, and is never made again: the next launch of it
/// finds it by its name. No upload is lost, none is submitted twice.
#[tokio::test]
async fn throttled_and_lost_submits_lose_nothing_and_submit_each_upload_once() {
    let setup = setup(BatchDouble::start()).await;
    let handler = setup.handler(&[]);
    let uploads: Vec<serde_json::Value> = (0..6)
        .map(|n| upload(&format!("in/{n:03}.csv"), &format!("{n:04}")))
        .collect();
    setup.double.fail_submits(&[SubmitFault::Throttled]);
    let report = match handler.handle(json!({ "Records": uploads.clone() })).await {
        Ok(Response::Report(report)) | Err(HandlerError::Retryable(report)) => report,
        other => panic!("{other:?}"),
    };
    assert!(report.launched.is_empty(), "{report:#?}");
    assert_eq!(
        report.failed.len(),
        6,
        "the first throttled, the rest held back"
    );
    assert!(report.failed.iter().all(|f| f.retryable), "{report:#?}");
    assert!(setup.double.jobs().is_empty());

    // The next delivery: the first submit's answer is lost.
    setup.double.fail_submits(&[SubmitFault::AnswerLost]);
    let report = match handler.handle(json!({ "Records": uploads.clone() })).await {
        Ok(Response::Report(report)) | Err(HandlerError::Retryable(report)) => report,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.launched.len(), 5, "{report:#?}");
    assert_eq!(report.failed.len(), 1, "{report:#?}");
    assert_eq!(
        setup.double.jobs().len(),
        6,
        "the lost answer's job was submitted"
    );

    // Its record's claim is pending until its lease is out; then the launch looks it up, and
    // finds it, rather than submitting it again.
    let lost = report.failed[0].key.clone();
    let launcher = setup.launcher();
    let n: usize = lost["in/".len()..lost.len() - ".csv".len()]
        .parse()
        .unwrap();
    let request = request_for(&setup, &lost, &format!("{n:04}"));
    let again = s3spot_lambda::Launcher::launch(&launcher, &request)
        .await
        .unwrap();
    let jobs = setup.double.jobs();
    assert_eq!(jobs.len(), 6, "none submitted twice: {jobs:#?}");
    assert!(jobs.iter().any(|job| job.id == again.instance_id));
    let mut names: Vec<&str> = jobs.iter().map(|job| job.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 6, "one job per upload");
    assert_eq!(
        setup.double.calls().1,
        1,
        "one refusal, never retried into the throttling"
    );
}

/// The launch request the handler makes for `key`, uploaded with `sequencer`.
fn request_for(setup: &Setup, key: &str, sequencer: &str) -> s3spot_lambda::LaunchRequest {
    let event = json!({"Records": [upload(key, sequencer)]});
    let s3spot_lambda::event::Invocation::Direct(records) =
        s3spot_lambda::event::parse(event).unwrap()
    else {
        unreachable!()
    };
    let Some(s3spot_lambda::event::Record::Created(object)) = records.into_iter().next() else {
        unreachable!()
    };
    s3spot_lambda::launch_requests(&setup.config(&[]), object)
        .unwrap()
        .unwrap()
        .remove(0)
}

/// `s3spot jobs retry` of a job Batch ended submits its next attempt as a job of its own; a
/// job still on the queue is not retried.
#[tokio::test]
async fn retry_submits_the_next_attempt_as_a_new_job() {
    let setup = setup(BatchDouble::start()).await;
    let handler = setup.handler(&[]);
    let Ok(Response::Report(report)) = handler
        .handle(json!({"Records": [upload("in/a.csv", "01")]}))
        .await
    else {
        panic!("the handler failed");
    };
    let first = report.launched[0].instance_id.clone();
    let target = Target::Object {
        bucket: Some("data".into()),
        key: "in/a.csv".into(),
    };
    let still = handler.retry(&target).await;
    assert!(
        matches!(still, Err(s3spot_lambda::JobsError::StillActive { .. })),
        "{still:?}"
    );
    setup
        .double
        .set_status(&first, "FAILED", Some("Essential container in task exited"));
    let retried = handler.retry(&target).await.unwrap();
    assert_eq!(retried.launched.len(), 1, "{retried:#?}");
    let jobs = setup.double.jobs();
    assert_eq!(jobs.len(), 2);
    let second = jobs.iter().find(|job| job.id != first).unwrap();
    assert!(second.name.ends_with("-2"), "attempt 2: {}", second.name);
    assert_eq!(
        second
            .tags
            .iter()
            .find(|(k, _)| k == "s3spot:attempt")
            .map(|(_, v)| v.as_str()),
        Some("2")
    );
}

/// EC2's spot warnings reach the intake queue whatever the backend; with Batch they are for
/// Batch's hosts, whose jobs Batch retries: skipped, not failed, and nothing launched.
#[tokio::test]
async fn a_spot_warning_for_a_batch_host_is_skipped() {
    let setup = setup(BatchDouble::start()).await;
    let handler = setup.handler(&[]);
    let Ok(Response::Report(report)) = handler
        .handle(s3spot_tests::event("spot-interruption.json"))
        .await
    else {
        panic!("the handler failed");
    };
    assert!(report.failed.is_empty(), "{report:#?}");
    assert_eq!(report.skipped.len(), 1, "{report:#?}");
    assert!(setup.double.jobs().is_empty());
}
