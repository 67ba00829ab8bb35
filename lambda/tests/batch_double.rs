//! The Batch backend against the Batch double (`s3spot_tests::BatchDouble`), where jobs wait on
//! the queue until the test moves them and Batch's request rate holds: what moto's Docker-less
//! Batch, which finishes every job as it is submitted, cannot show.

use s3spot_bootstrap::State;
use s3spot_lambda::{
    BatchLauncher, Clock, Config, Handler, HandlerError, Response, S3Statuses, Target,
};
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
    let event = json!({"Records": [upload("in/a.csv", "01")]});
    let s3spot_lambda::event::Invocation::Direct(records) =
        s3spot_lambda::event::parse(event).unwrap()
    else {
        unreachable!()
    };
    let Some(s3spot_lambda::event::Record::Created(object)) = records.into_iter().next() else {
        unreachable!()
    };
    let request = s3spot_lambda::launch_requests(&setup.config(&[]), object)
        .unwrap()
        .unwrap()
        .remove(0);
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
}

/// Batch answers 50 calls a second per account (the double, 2 here, so that the burst goes over
/// it on any machine). A burst over it is throttled: the SDK retries, and what still fails waits
/// for its next delivery; nothing is lost or submitted twice.
#[tokio::test]
async fn a_burst_over_batchs_rate_loses_nothing_and_submits_each_upload_once() {
    let setup = setup(BatchDouble::start_with_rate(2.0)).await;
    // No pacing of our own: Batch's rate alone holds the burst back.
    let handler = setup.handler(&[("S3SPOT_LAUNCH_RATE", "1000")]);
    let uploads: Vec<serde_json::Value> = (0..20)
        .map(|n| upload(&format!("in/{n:03}.csv"), &format!("{n:04}")))
        .collect();
    let mut pending = uploads.clone();
    for _delivery in 0..60 {
        if pending.is_empty() {
            break;
        }
        let report = match handler.handle(json!({ "Records": pending })).await {
            Ok(Response::Report(report)) | Err(HandlerError::Retryable(report)) => report,
            other => panic!("{other:?}"),
        };
        assert!(
            report.failed.iter().all(|f| f.retryable),
            "throttling is never final: {:#?}",
            report.failed
        );
        let failed: Vec<&str> = report.failed.iter().map(|f| f.key.as_str()).collect();
        pending = uploads
            .iter()
            .filter(|u| failed.contains(&u["s3"]["object"]["key"].as_str().unwrap()))
            .cloned()
            .collect();
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(pending.is_empty(), "{} never launched", pending.len());
    let jobs = setup.double.jobs();
    let mut names: Vec<&str> = jobs.iter().map(|job| job.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 20, "one job per upload");
    assert_eq!(jobs.len(), 20, "none submitted twice");
    let (_, throttled) = setup.double.calls();
    assert!(throttled > 0, "the burst went over Batch's rate");
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
