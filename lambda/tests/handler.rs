//! The handler's decisions, through a scripted launcher: what is launched, skipped and failed,
//! and what a retry sees.

use s3spot_bootstrap::fake::MemoryStatuses;
use s3spot_bootstrap::{Attempt, JobSpec, State, Status, Writer, job_from_user_data};
use s3spot_lambda::config::MarketType;
use s3spot_lambda::event::ObjectCreated;
use s3spot_lambda::fake::ScriptedLauncher;
use s3spot_lambda::launcher::job_tags;
use s3spot_lambda::plan::{Plan, plan};
use s3spot_lambda::report::{FailedRecord, Report};
use s3spot_lambda::token::job_id;
use s3spot_lambda::{
    Config, Handler, HandlerError, InstanceInfo, LaunchError, LaunchRequest, Launched, PoolError,
    Response,
};
use s3spot_tests::{event, s3spot_lookup};
use serde_json::{Value, json};

fn config(overrides: &[(&str, &str)]) -> Config {
    Config::from_lookup(s3spot_lookup("s3spot-worker", overrides)).unwrap()
}

fn capacity() -> Result<Launched, LaunchError> {
    Err(LaunchError::Capacity {
        code: "InsufficientInstanceCapacity".into(),
        message: "no t3.micro capacity".into(),
    })
}

/// A fleet answer with no instance: each of `pools` out of capacity.
fn no_capacity_in(market: &str, pools: &[&str]) -> Result<Launched, LaunchError> {
    Err(LaunchError::NoInstance {
        pools: pools
            .iter()
            .map(|pool| PoolError {
                pool: format!("{market} {pool}"),
                code: "InsufficientInstanceCapacity".into(),
                message: format!("We currently do not have sufficient {pool} capacity."),
            })
            .collect(),
    })
}

async fn report(handler: &Handler<&ScriptedLauncher, MemoryStatuses>, event: Value) -> Report {
    match handler.handle(event).await {
        Ok(Response::Report(report)) => report,
        other => panic!("expected a report, got {other:?}"),
    }
}

fn keys<T>(items: &[T], key: impl Fn(&T) -> &str) -> Vec<String> {
    items.iter().map(|i| key(i).to_owned()).collect()
}

#[tokio::test]
async fn the_console_test_event_launches_one_spot_instance() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("s3-put.json")).await;
    assert_eq!(report.skipped, []);
    assert_eq!(report.failed, []);
    assert_eq!(report.launched.len(), 1);
    let launched = &report.launched[0];
    assert_eq!(
        (launched.bucket.as_str(), launched.key.as_str()),
        ("example-bucket", "test/key")
    );
    assert_eq!(launched.market, "spot");
    assert_eq!(launched.instance_id, "i-00000000000000001");

    let request = &launcher.requests()[0];
    assert_eq!(request.market, MarketType::Spot);
    assert_eq!(
        request.pools,
        [s3spot_lambda::fleet::Pool {
            instance_type: None,
            subnet_id: None
        }],
        "the template's type and subnet are kept"
    );
    assert_eq!(request.template_version, "$Default");
    assert_eq!(request.client_token, launched.client_token);
    let job = job_of(request);
    assert_eq!(
        (job.bucket.as_str(), job.key.as_str()),
        ("example-bucket", "test/key")
    );
    assert_eq!(job.sequencer.as_deref(), Some("0A1B2C3D4E5F678901"));
    assert_eq!(job.attempt, 1);
}

#[tokio::test]
async fn tags_name_the_pipeline_the_object_and_the_job() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(
        config(&[("S3SPOT_PIPELINE", "genomics")]),
        &launcher,
        MemoryStatuses::default(),
    );
    let long_key = format!("in/{}", "é".repeat(400));
    let event = json!({"Records": [
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "data"}, "object": {"key": "in/a.csv", "eTag": "e"}}},
        {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "data"}, "object": {"key": long_key, "eTag": "e"}}},
    ]});
    report(&handler, event).await;
    let requests = launcher.requests();
    let tag = |request: &LaunchRequest, name: &str| {
        request
            .tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {name} tag"))
    };
    assert_eq!(tag(&requests[0], "Name"), "s3spot: in/a.csv");
    assert_eq!(tag(&requests[0], "s3spot:pipeline"), "genomics");
    assert_eq!(tag(&requests[0], "s3spot:bucket"), "data");
    assert_eq!(tag(&requests[0], "s3spot:key"), "in/a.csv");
    assert_eq!(tag(&requests[0], "s3spot:attempt"), "1");
    assert_eq!(tag(&requests[0], "s3spot:job").len(), 32);
    assert!(
        requests[0]
            .client_token
            .starts_with(&tag(&requests[0], "s3spot:job"))
    );
    assert_ne!(
        tag(&requests[0], "s3spot:job"),
        tag(&requests[1], "s3spot:job")
    );
    for name in ["Name", "s3spot:key"] {
        let value = tag(&requests[1], name);
        assert_eq!(value.chars().count(), 256, "{name} is bounded");
    }
    assert!(long_key.starts_with(&tag(&requests[1], "s3spot:key")));
}

#[tokio::test]
async fn a_redelivered_event_sends_identical_requests() {
    for name in [
        "s3-put.json",
        "awsfun-put.json",
        "eventbridge-object-created.json",
        "multi-record.json",
    ] {
        // Each delivery with a store of its own: the requests themselves are what is compared,
        // so that EC2's ClientToken finds them the same where nothing else stops a second.
        let launcher = ScriptedLauncher::default();
        for _ in 0..2 {
            let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
            report(&handler, event(name)).await;
        }
        let requests = launcher.requests();
        assert!(!requests.is_empty(), "{name}");
        let (first, second) = requests.split_at(requests.len() / 2);
        assert_eq!(first, second, "{name}");

        // With one store, the attempts' claims stop the second delivery before EC2.
        let launcher = ScriptedLauncher::default();
        let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
        report(&handler, event(name)).await;
        let launched = launcher.requests().len();
        let second = report(&handler, event(name)).await;
        assert_eq!(launcher.requests().len(), launched, "{name}");
        assert!(second.launched.is_empty(), "{name}: {second:?}");
        assert_eq!(
            second
                .skipped
                .iter()
                .filter(|s| s.reason.starts_with("already launched: ")
                    && s.reason.contains("/.s3spot/attempt-1.json"))
                .count(),
            launched,
            "{name}: {second:?}"
        );
    }
}

#[tokio::test]
async fn skipped_and_ignored_records_do_not_stop_the_ones_after_them() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("multi-record.json")).await;
    assert_eq!(
        keys(&report.launched, |l| &l.key),
        ["in/first.csv", "in/second.csv"]
    );
    assert_eq!(
        keys(&report.skipped, |s| &s.key),
        [
            "analysis/in/first.csv/report.json",
            "in/old.csv",
            "in/new-folder/"
        ]
    );
    assert!(report.skipped[0].reason.contains("results prefix"));
    assert!(report.skipped[1].reason.contains("ObjectRemoved:Delete"));
    assert!(report.skipped[2].reason.contains("folder marker"));
    assert_eq!(report.failed, []);
}

#[tokio::test]
async fn analysis_keys_are_skipped_in_any_case() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("analysis-key.json")).await;
    assert_eq!(report.launched, []);
    assert!(report.skipped[0].reason.contains("\"analysis\""));
    assert!(launcher.requests().is_empty());
    assert_eq!(
        *launcher.counts.lock().unwrap(),
        0,
        "no AWS call for a skipped key"
    );
}

#[tokio::test]
async fn url_encoded_keys_are_decoded_and_eventbridge_keys_are_not() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("url-encoded-keys.json")).await;
    assert_eq!(
        keys(&report.launched, |l| &l.key),
        [
            "in/quarterly report 2024.csv",
            "in/c++ notes+draft.txt",
            "in/run-2024-05-01T12:00:00Z.log",
            "in/café/名前 📊.csv"
        ]
    );
    let report = self::report(&handler, event("eventbridge-object-created.json")).await;
    assert_eq!(
        keys(&report.launched, |l| &l.key),
        ["in/raw key+plus%percent.csv"]
    );
}

#[tokio::test]
async fn on_demand_is_requested_only_when_spot_launched_nothing() {
    let launcher =
        ScriptedLauncher::with_script(vec![no_capacity_in("spot", &["m7i.large", "m6i.large"])]);
    let handler = Handler::new(
        config(&[
            ("S3SPOT_MARKET", "spot-then-on-demand"),
            ("S3SPOT_INSTANCE_TYPES", "m7i.large,m6i.large"),
        ]),
        &launcher,
        MemoryStatuses::default(),
    );
    let report = report(&handler, event("s3-put.json")).await;
    let tried: Vec<(MarketType, usize)> = launcher
        .requests()
        .iter()
        .map(|r| (r.market, r.pools.len()))
        .collect();
    assert_eq!(tried, [(MarketType::Spot, 2), (MarketType::OnDemand, 2)]);
    let tokens: std::collections::HashSet<_> = launcher
        .requests()
        .iter()
        .map(|r| r.client_token.clone())
        .collect();
    assert_eq!(tokens.len(), 2, "one token per market");
    assert_eq!(report.launched[0].market, "on-demand");

    // Spot that launches asks nothing of on-demand.
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(
        config(&[("S3SPOT_MARKET", "spot-then-on-demand")]),
        &launcher,
        MemoryStatuses::default(),
    );
    let report = self::report(&handler, event("s3-put.json")).await;
    assert_eq!(launcher.requests().len(), 1);
    assert_eq!(report.launched[0].market, "spot");
}

#[tokio::test]
async fn no_capacity_anywhere_is_a_retryable_failure_that_names_every_pool() {
    let launcher = ScriptedLauncher::with_script(vec![no_capacity_in(
        "spot",
        &["c7i.large in subnet-0a", "c6i.large in subnet-0a"],
    )]);
    let handler = Handler::new(
        config(&[
            ("S3SPOT_INSTANCE_TYPES", "c7i.large,c6i.large"),
            ("S3SPOT_SUBNETS", "subnet-0a"),
        ]),
        &launcher,
        MemoryStatuses::default(),
    );
    let Err(HandlerError::Retryable(report)) = handler.handle(event("s3-put.json")).await else {
        panic!("expected a retryable failure")
    };
    let failed = &report.failed[0];
    assert!(failed.retryable);
    assert!(
        failed.error.starts_with(
            "no capacity: 2 pool(s) tried, none launched (InsufficientInstanceCapacity \u{d7}2)"
        ),
        "{}",
        failed.error
    );
    assert!(
        failed
            .error
            .contains("spot c7i.large in subnet-0a: InsufficientInstanceCapacity"),
        "{}",
        failed.error
    );
    assert!(
        failed.error.contains("spot c6i.large in subnet-0a"),
        "{}",
        failed.error
    );
}

#[tokio::test]
async fn a_retryable_failure_finishes_the_other_records_then_fails_the_invocation() {
    let quota = || {
        Err(LaunchError::Quota {
            code: "VcpuLimitExceeded".into(),
            message: "You have requested more vCPU capacity than your current vCPU limit".into(),
        })
    };
    let launcher = ScriptedLauncher::with_script(vec![quota(), quota()]);
    let handler = Handler::new(
        config(&[("S3SPOT_MARKET", "spot-then-on-demand")]),
        &launcher,
        MemoryStatuses::default(),
    );
    let error = handler
        .handle(event("multi-record.json"))
        .await
        .unwrap_err();
    let HandlerError::Retryable(report) = &error else {
        panic!("{error}")
    };
    assert_eq!(
        launcher.requests().len(),
        3,
        "spot and on-demand have quotas of their own: a spot quota falls back to on-demand"
    );
    assert_eq!(keys(&report.failed, |f| &f.key), ["in/first.csv"]);
    assert!(report.failed[0].error.contains("VcpuLimitExceeded"));
    assert_eq!(keys(&report.launched, |l| &l.key), ["in/second.csv"]);
    assert_eq!(report.skipped.len(), 3);

    let message = error.to_string();
    assert!(
        message.starts_with("1 of 5 records failed with retryable errors"),
        "{message}"
    );
    assert!(message.contains("in/first.csv"), "{message}");
    let diagnostic = lambda_runtime::Diagnostic::from(error);
    assert_eq!(diagnostic.error_type, "S3spot.RetryableFailure");
}

#[tokio::test]
async fn non_retryable_failures_are_reported_without_failing_the_invocation() {
    let mismatch = Err(LaunchError::ParameterMismatch {
        message: "Arguments on this idempotent request are inconsistent".into(),
    });
    let launcher = ScriptedLauncher::with_script(vec![mismatch]);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("s3-put.json")).await;
    assert_eq!(report.launched, []);
    let FailedRecord {
        error, retryable, ..
    } = &report.failed[0];
    assert!(!retryable);
    assert!(error.contains("IdempotentParameterMismatch"), "{error}");
    assert!(error.contains("configuration"), "{error}");
}

#[tokio::test]
async fn an_already_terminated_launch_is_not_an_error() {
    let launcher = ScriptedLauncher::with_script(vec![Err(LaunchError::AlreadyLaunched)]);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("s3-put.json")).await;
    assert_eq!(report.failed, []);
    assert_eq!(report.launched, []);
    assert!(report.skipped[0].reason.starts_with("already launched"));
}

#[tokio::test]
async fn the_runaway_guard_stops_launches_at_the_cap() {
    let launcher = ScriptedLauncher {
        active: 1,
        ..Default::default()
    };
    let handler = Handler::new(
        config(&[("S3SPOT_MAX_INSTANCES", "2")]),
        &launcher,
        MemoryStatuses::default(),
    );
    let Err(HandlerError::Retryable(report)) = handler.handle(event("url-encoded-keys.json")).await
    else {
        panic!("expected a retryable failure")
    };
    assert_eq!(
        report.launched.len(),
        1,
        "1 running + 1 launched = the cap of 2"
    );
    assert_eq!(report.failed.len(), 3);
    for failed in &report.failed {
        assert!(failed.retryable);
        assert!(
            failed.error.contains("S3SPOT_MAX_INSTANCES cap of 2"),
            "{}",
            failed.error
        );
    }
    assert_eq!(
        *launcher.counts.lock().unwrap(),
        2,
        "counted again before each launch (other launchers run at the same time), and not \
         again once at the cap"
    );
    assert_eq!(launcher.requests().len(), 1);
}

#[tokio::test]
async fn the_guard_fails_closed_when_it_cannot_count() {
    let launcher = ScriptedLauncher {
        count_fails: true,
        ..Default::default()
    };
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let Err(HandlerError::Retryable(report)) = handler.handle(event("s3-put.json")).await else {
        panic!("expected a retryable failure")
    };
    assert!(launcher.requests().is_empty());
    assert!(
        report.failed[0]
            .error
            .contains("cannot count running instances")
    );
    assert!(
        report.failed[0].error.contains("UnauthorizedOperation"),
        "the cause is kept"
    );
}

#[tokio::test]
async fn oversized_user_data_fails_the_record_before_any_aws_call() {
    let command = "x".repeat(20_000);
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(
        config(&[("S3SPOT_COMMAND", &command)]),
        &launcher,
        MemoryStatuses::default(),
    );
    let report = report(&handler, event("s3-put.json")).await;
    assert!(
        report.failed[0].error.contains("16384"),
        "{}",
        report.failed[0].error
    );
    assert!(!report.failed[0].retryable);
    assert!(launcher.requests().is_empty());
    assert_eq!(*launcher.counts.lock().unwrap(), 0);
}

#[tokio::test]
async fn sqs_batches_report_only_the_failed_messages() {
    let launcher = ScriptedLauncher::default();
    let metrics = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let written = std::sync::Arc::clone(&metrics);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default()).with_metrics(
        std::sync::Arc::new(move |line: &str| written.lock().unwrap().push(line.to_owned())),
    );
    let mut batch = event("sqs-wrapped.json");
    let records = batch["Records"].as_array_mut().unwrap();
    let mut poison = records[0].clone();
    poison["messageId"] = json!("poison");
    poison["body"] = json!(
        "{\"Records\": [{\"eventName\": \"ObjectCreated:Put\", \"s3\": {\"bucket\": {\"name\": \"data\"}, \"object\": {\"key\": \"bad%C3\"}}}]}"
    );
    let mut garbage = records[0].clone();
    garbage["messageId"] = json!("garbage");
    garbage["body"] = json!("not json");
    records.push(poison);
    records.push(garbage);

    let response = handler.handle(batch).await.unwrap();
    let Response::Batch(batch) = &response else {
        panic!("{response:?}")
    };
    let failed: Vec<&str> = batch
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(failed, ["poison", "garbage"]);
    assert_eq!(
        serde_json::to_value(&response).unwrap(),
        json!({"batchItemFailures": [{"itemIdentifier": "poison"}, {"itemIdentifier": "garbage"}]})
    );
    let launched: Vec<String> = launcher.requests().iter().map(job_key).collect();
    assert_eq!(launched, ["in/queued file.csv"]);
    // A partial batch failure is no function error: the function's own metric counts it.
    let metrics = metrics.lock().unwrap();
    assert_eq!(metrics.len(), 1, "one metric line per invocation");
    let line: Value = serde_json::from_str(&metrics[0]).unwrap();
    assert_eq!(
        (
            &line["LaunchedRecords"],
            &line["FailedRecords"],
            &line["RetryableRecords"]
        ),
        (&json!(1), &json!(2), &json!(0))
    );
}

#[tokio::test]
async fn sqs_messages_that_hit_the_guard_go_back_to_the_queue() {
    let launcher = ScriptedLauncher {
        active: 20,
        ..Default::default()
    };
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let Response::Batch(batch) = handler.handle(event("sqs-wrapped.json")).await.unwrap() else {
        panic!()
    };
    assert_eq!(
        batch.batch_item_failures.len(),
        1,
        "the test event message succeeds"
    );
    assert!(
        batch.batch_item_failures[0]
            .item_identifier
            .ends_with("0000001")
    );
}

#[tokio::test]
async fn a_failed_sqs_message_without_an_id_fails_the_whole_batch() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let event = json!({"Records": [{"eventSource": "aws:sqs", "body": "not json"}]});
    let error = handler.handle(event).await.unwrap_err();
    assert!(
        matches!(error, HandlerError::UnidentifiedMessage),
        "{error}"
    );
    assert!(error.to_string().contains("whole batch must be retried"));
}

#[tokio::test]
async fn a_malformed_event_is_an_invocation_error_that_says_what_it_expected() {
    let handler = Handler::new(
        config(&[]),
        ScriptedLauncher::default(),
        MemoryStatuses::default(),
    );
    let error = handler.handle(json!({"hello": "world"})).await.unwrap_err();
    assert!(matches!(error, HandlerError::Event(_)));
    assert!(
        error.to_string().contains("expected an S3 notification"),
        "{error}"
    );
    assert_eq!(
        lambda_runtime::Diagnostic::from(error).error_type,
        "S3spot.MalformedEvent"
    );
}

#[tokio::test]
async fn hostile_keys_reach_the_job_intact() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("hostile-key.json")).await;
    let key = "in/$(touch /tmp/pwned); `id` 'quoted' \"dq\"\nnext line.csv";
    assert_eq!(report.launched[0].key, key);
    assert_eq!(job_key(&launcher.requests()[0]), key);
}

fn job_key(request: &LaunchRequest) -> String {
    job_of(request).key
}

/// The job a request's user-data carries.
fn job_of(request: &LaunchRequest) -> s3spot_bootstrap::JobSpec {
    let script = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        &request.user_data,
    )
    .unwrap();
    job_from_user_data(&String::from_utf8(script).unwrap()).unwrap()
}

const INTERRUPTED: &str = "i-1234567890abcdef0";

/// `s3-put.json`'s job on its `attempt`, as the handler plans it.
fn interrupted_job(attempt: u32) -> (JobSpec, String) {
    let config = config(&[]);
    let object = ObjectCreated {
        bucket: "example-bucket".into(),
        key: "test/key".into(),
        version_id: None,
        etag: Some("0123456789abcdef0123456789abcdef".into()),
        size: Some(1024),
        sequencer: Some("0A1B2C3D4E5F678901".into()),
        event_time: Some("1970-01-01T00:00:00.000Z".into()),
    };
    let id = job_id(&config.job.pipeline, &object);
    let Ok(Plan::Launch(job)) = plan(&config.job, &object, attempt, &id) else {
        panic!("s3-put.json's key is a job")
    };
    (job.spec, job.user_data.to_base64())
}

/// The instance of `events/spot-interruption.json`: `s3-put.json`'s job on its `attempt`, as
/// EC2 would describe it, with its user-data.
/// The instance of a spot interruption warning, as the warning's redelivery finds it: ended.
fn interrupted(pipeline: &str, attempt: u32) -> (InstanceInfo, String) {
    let (spec, user_data) = interrupted_job(attempt);
    let info = InstanceInfo {
        instance_id: INTERRUPTED.into(),
        state: "terminated".into(),
        instance_type: Some("m7i.large".into()),
        market: "spot".into(),
        launched_at: Some(1_714_564_800),
        tags: job_tags(pipeline, &spec),
        state_reason: None,
    };
    (info, user_data)
}

fn launcher_with(instance: (InstanceInfo, String)) -> ScriptedLauncher {
    ScriptedLauncher {
        instances: vec![instance],
        ..Default::default()
    }
}

fn status_key() -> String {
    interrupted_job(1).0.status_key()
}

#[tokio::test]
async fn a_spot_interruption_relaunches_the_job_as_its_next_attempt() {
    let launcher = launcher_with(interrupted("s3spot", 1));
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("spot-interruption.json")).await;
    assert_eq!(
        (report.failed.len(), report.skipped.len()),
        (0, 0),
        "{report:?}"
    );
    assert_eq!(keys(&report.launched, |l| &l.key), ["test/key"]);

    let request = &launcher.requests()[0];
    let tag = |name: &str| {
        request
            .tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(tag("s3spot:attempt"), Some("2"));
    let job_id = interrupted_job(1).0.job_id;
    assert_eq!(tag("s3spot:job"), Some(job_id.as_str()));
    assert!(
        request.client_token.starts_with(&format!("{job_id}-2-")),
        "{}",
        request.client_token
    );
    let job = job_of(request);
    assert_eq!((job.key.as_str(), job.attempt), ("test/key", 2));
    assert_eq!(
        job.etag.as_deref(),
        Some("0123456789abcdef0123456789abcdef")
    );

    // The interrupted attempt is on record, with where the next one went.
    let status = handler_status(&handler);
    assert_eq!((status.state, status.attempt), (State::Interrupted, 1));
    let error = status.error.unwrap();
    assert!(
        error.contains("attempt 2 re-launched on i-00000000000000001"),
        "{error}"
    );
    assert_eq!(
        status.instance.and_then(|i| i.id).as_deref(),
        Some(INTERRUPTED)
    );
}

#[tokio::test]
async fn the_next_attempt_waits_for_the_interrupted_one_to_end() {
    let (mut info, user_data) = interrupted("s3spot", 1);
    info.state = "running".into();
    let launcher = launcher_with((info, user_data));
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = match handler.handle(event("spot-interruption.json")).await {
        Err(HandlerError::Retryable(report)) => report,
        other => panic!("expected a retry, got {other:?}"),
    };
    assert_eq!(report.launched, []);
    let error = &report.failed[0].error;
    assert!(
        error.contains("still on it (running)") && error.contains("once it has ended"),
        "{error}"
    );
    assert_eq!(launcher.requests(), []);
    // On record at once, whatever the worker manages to write before the instance goes.
    let status = handler_status(&handler);
    assert_eq!(
        (status.state, status.written_by, status.attempt),
        (State::Interrupted, Writer::Launcher, 1)
    );
    assert!(status.taken_back(), "{status:?}");
    assert!(
        status
            .error
            .as_deref()
            .is_some_and(|e| e.contains("attempt 2 is launched once the instance has ended")),
        "{status:?}"
    );

    // A worker that finishes inside the two minutes keeps its own account, and its job needs
    // no next attempt.
    let mut done = worker_status("succeeded", 1);
    done.written_by = Writer::Worker;
    s3spot_bootstrap::record(handler.statuses(), "example-bucket", &status_key(), done)
        .await
        .unwrap();
    let status = handler_status(&handler);
    assert_eq!(status.state, State::Succeeded);
    assert!(!status.taken_back());
}

/// A status.json a worker wrote for `s3-put.json`'s job.
fn worker_status(state: &str, attempt: u32) -> Status {
    let (spec, _) = interrupted_job(attempt);
    serde_json::from_value(json!({
        "state": state, "job_id": spec.job_id, "uploaded_at": spec.uploaded_at,
        "input": {"bucket": "example-bucket", "key": "test/key",
        "version_id": null, "etag": null, "size": null, "sha256": null}, "outputs": [],
        "exit_code": null, "error": null, "timings": {"download_ms": 1, "process_ms": 2,
        "upload_ms": 3}, "instance": {"id": INTERRUPTED, "type": "m7i.large", "lifecycle": "spot"},
        "attempt": attempt, "worker_version": "0.1.0", "started_at": "s", "finished_at": "f"
    }))
    .unwrap()
}

fn handler_status(handler: &Handler<&ScriptedLauncher, MemoryStatuses>) -> Status {
    handler
        .statuses()
        .status("example-bucket", &status_key())
        .expect("status.json written")
}

#[tokio::test]
async fn the_last_attempt_interrupted_marks_the_job_failed_with_its_history() {
    let launcher = launcher_with(interrupted("s3spot", 3));
    let statuses = MemoryStatuses::default();
    // What the worker of attempt 3 wrote, carrying attempts 1 and 2.
    let mut worker_status = worker_status("interrupted", 3);
    worker_status.outputs = vec!["analysis/test/key/partial.csv".into()];
    worker_status.error = Some("spot interruption notice".into());
    worker_status.history = (1..=2)
        .map(|attempt| Attempt {
            attempt,
            state: State::Interrupted,
            instance_id: Some(format!("i-{attempt}")),
            error: None,
            finished_at: String::new(),
            cost: None,
        })
        .collect();
    statuses.put_status("example-bucket", &status_key(), worker_status);
    let handler = Handler::new(config(&[]), &launcher, statuses);

    let report = report(&handler, event("spot-interruption.json")).await;
    assert_eq!(launcher.requests(), [], "not re-launched");
    assert_eq!(report.failed, []);
    assert!(
        report.skipped[0]
            .reason
            .contains("on attempt 3 of 3 (S3SPOT_MAX_ATTEMPTS)"),
        "{:?}",
        report.skipped
    );
    let status = handler_status(&handler);
    assert_eq!((status.state, status.attempt), (State::Failed, 3));
    assert_eq!(status.history.len(), 2);
    assert_eq!(status.outputs, ["analysis/test/key/partial.csv"], "kept");
}

#[tokio::test]
async fn more_attempts_allowed_means_another_launch() {
    let launcher = launcher_with(interrupted("s3spot", 3));
    let handler = Handler::new(
        config(&[("S3SPOT_MAX_ATTEMPTS", "4")]),
        &launcher,
        MemoryStatuses::default(),
    );
    let report = report(&handler, event("spot-interruption.json")).await;
    assert_eq!(report.launched.len(), 1, "{report:?}");
    assert!(launcher.requests()[0].client_token.contains("-4-"));
}

#[tokio::test]
async fn interruptions_of_other_pipelines_instances_are_skipped() {
    let launcher = launcher_with(interrupted("another-pipeline", 1));
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("spot-interruption.json")).await;
    assert_eq!(launcher.requests(), []);
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0]
            .reason
            .contains("not an instance of pipeline \"s3spot\""),
        "{:?}",
        report.skipped
    );
    assert_eq!(handler.statuses().writes(), []);
}

#[tokio::test]
async fn an_interruption_of_an_instance_ec2_no_longer_lists_is_never_dropped_in_silence() {
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = report(&handler, event("spot-interruption.json")).await;
    assert_eq!(launcher.requests(), []);
    assert_eq!(report.skipped, []);
    let FailedRecord {
        error, retryable, ..
    } = &report.failed[0];
    assert!(!retryable, "retrying cannot bring the instance back");
    for part in [
        "spot interruption of i-1234567890abcdef0",
        "EC2 does not list the instance",
        "s3spot jobs retry",
    ] {
        assert!(error.contains(part), "{part:?} in {error}");
    }
}

#[tokio::test]
async fn a_job_that_already_finished_is_not_relaunched() {
    let launcher = launcher_with(interrupted("s3spot", 1));
    let statuses = MemoryStatuses::default();
    let mut done = worker_status("succeeded", 1);
    done.exit_code = Some(0);
    statuses.put_status("example-bucket", &status_key(), done.clone());
    let handler = Handler::new(config(&[]), &launcher, statuses);
    let report = report(&handler, event("spot-interruption.json")).await;
    assert_eq!(launcher.requests(), []);
    assert!(
        report.skipped[0]
            .reason
            .contains("already ended (succeeded)")
    );
    assert_eq!(handler_status(&handler), done, "left as it was");
}

/// What the attempt's claim says after a launch ends in `outcome`, and what the event's next
/// delivery then does.
async fn claim_after(outcome: Result<Launched, LaunchError>) -> (s3spot_bootstrap::Claim, Report) {
    let launcher = ScriptedLauncher::with_script(vec![outcome]);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let _ = handler.handle(event("s3-put.json")).await;
    let key = interrupted_job(1).0.claim_key();
    let claim: s3spot_bootstrap::Claim =
        serde_json::from_value(handler.statuses().json("example-bucket", &key).unwrap()).unwrap();
    let again = match handler.handle(event("s3-put.json")).await {
        Ok(Response::Report(report)) | Err(HandlerError::Retryable(report)) => report,
        other => panic!("{other:?}"),
    };
    (claim, again)
}

#[tokio::test]
async fn a_claim_is_released_only_when_ec2_said_no() {
    // Refused: nothing was launched, and the next delivery takes the attempt over.
    let (claim, again) = claim_after(capacity()).await;
    assert!(
        claim
            .released
            .as_deref()
            .is_some_and(|why| why.contains("InsufficientInstanceCapacity")),
        "{claim:?}"
    );
    assert_eq!(again.launched.len(), 1, "{again:?}");

    // A timeout or a server error may come after EC2 launched the instance: the claim stays
    // pending, and the next delivery within its lease launches nothing.
    let (claim, again) = claim_after(Err(LaunchError::Api {
        operation: "RunInstances",
        message: "dispatch failure: timed out".into(),
        retryable: true,
    }))
    .await;
    assert!(claim.is_pending(), "{claim:?}");
    assert_eq!(again.launched, [], "{again:?}");
    assert!(
        again.failed[0].retryable
            && again.failed[0]
                .error
                .starts_with("being launched by another delivery"),
        "{again:?}"
    );

    // Throttled after the SDK's own retries: an earlier try may have timed out after EC2
    // launched, so the claim stays pending too, with its token (unused, if nothing launched).
    let (claim, again) = claim_after(Err(LaunchError::Api {
        operation: "RunInstances",
        message: "RequestLimitExceeded: Request limit exceeded.".into(),
        retryable: true,
    }))
    .await;
    assert!(claim.is_pending(), "{claim:?}");
    assert_eq!(again.launched, [], "{again:?}");

    // EC2 says the attempt's instance ran and ended: nothing is ever launched for it again.
    let (claim, again) = claim_after(Err(LaunchError::AlreadyLaunched)).await;
    assert!(claim.done.is_some() && !claim.is_pending(), "{claim:?}");
    assert_eq!(again.launched, [], "{again:?}");
    assert!(
        again.skipped[0]
            .reason
            .starts_with("already launched: ClientToken"),
        "{again:?}"
    );
}
