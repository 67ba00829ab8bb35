//! The job commands and the scheduled reaper, through a scripted launcher and statuses in
//! memory: what is listed, stopped, recorded and re-launched.

use s3spot_bootstrap::{Attempt, State, Status};
use s3spot_lambda::event::ObjectCreated;
use s3spot_lambda::fake::{MemoryStatuses, ScriptedLauncher};
use s3spot_lambda::handler::Report;
use s3spot_lambda::plan::{Plan, plan};
use s3spot_lambda::{
    Clock, Config, Handler, InstanceInfo, Jobs, JobsError, Response, SpotPrice, Target,
};
use s3spot_tests::{event, s3spot_lookup};
use serde_json::json;

fn config(overrides: &[(&str, &str)]) -> Config {
    Config::from_lookup(s3spot_lookup("s3spot-worker", overrides)).unwrap()
}

const BUCKET: &str = "data";
const NOW: i64 = 1_800_000_000;
/// The default max runtime (an hour) plus the grace: older and still active is stuck.
const STUCK_AFTER: u64 = 3600 + s3spot_lambda::jobs::STUCK_GRACE_SECS;

fn clock() -> Clock {
    Clock {
        now: NOW,
        stuck_after_secs: STUCK_AFTER,
    }
}

/// An instance of the default pipeline running `key`'s job on `attempt`, launched `age` seconds
/// before [`NOW`], with the user-data the handler would have given it.
fn instance(id: &str, key: &str, attempt: u32, state: &str, age: i64) -> (InstanceInfo, String) {
    launched(id, key, attempt, state, NOW - age)
}

fn launched(
    id: &str,
    key: &str,
    attempt: u32,
    state: &str,
    launched_at: i64,
) -> (InstanceInfo, String) {
    let object = ObjectCreated {
        bucket: BUCKET.into(),
        key: key.into(),
        version_id: Some("v1".into()),
        etag: None,
        size: Some(10),
        sequencer: None,
        event_time: None,
    };
    let Ok(Plan::Launch(job)) = plan(&config(&[]).job, &object, attempt) else {
        panic!("{key} is a job")
    };
    let tags = [
        ("s3spot:pipeline", "s3spot"),
        ("s3spot:bucket", BUCKET),
        ("s3spot:key", key),
        ("s3spot:job", &format!("job-{key}")),
        ("s3spot:attempt", &attempt.to_string()),
    ];
    let info = InstanceInfo {
        instance_id: id.into(),
        state: state.into(),
        instance_type: Some("m5.large".into()),
        market: "spot".into(),
        launched_at: Some(launched_at),
        tags: tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    };
    (info, job.user_data.to_base64())
}

fn launcher(instances: Vec<(InstanceInfo, String)>) -> ScriptedLauncher {
    ScriptedLauncher {
        instances,
        ..Default::default()
    }
}

fn status_key(key: &str) -> String {
    format!("analysis/{key}/status.json")
}

/// A status.json as a worker writes it.
fn worker_status(key: &str, state: &str, attempt: u32, instance_id: &str) -> Status {
    serde_json::from_value(json!({
        "state": state, "input": {"bucket": BUCKET, "key": key, "version_id": "v1",
        "etag": null, "size": 10, "sha256": null}, "outputs": ["analysis/x/stdout.log"],
        "exit_code": 0, "error": null, "timings": {"download_ms": 1, "process_ms": 2,
        "upload_ms": 3}, "instance": {"id": instance_id, "type": "m5.large", "lifecycle": "spot"},
        "attempt": attempt, "worker_version": "0.1.0", "started_at": "s", "finished_at": "f"
    }))
    .unwrap()
}

fn jobs<'a>(
    launcher: &'a ScriptedLauncher,
    statuses: &'a MemoryStatuses,
) -> Jobs<&'a ScriptedLauncher, &'a MemoryStatuses> {
    Jobs::new(config(&[]).jobs(), launcher, statuses)
}

fn key(text: &str) -> Target {
    Target::parse(text)
}

#[tokio::test]
async fn list_shows_every_instance_with_its_result_and_flags_the_stuck_ones() {
    let launcher = launcher(vec![
        instance("i-new", "in/b.csv", 1, "running", 60),
        instance("i-old", "in/a.csv", 1, "running", 7200),
        instance("i-done", "in/c.csv", 2, "terminated", 9000),
        instance("i-first", "in/c.csv", 1, "terminated", 9999),
    ]);
    let statuses = MemoryStatuses::default();
    let mut status = worker_status("in/c.csv", "succeeded", 2, "i-done");
    status.history = vec![Attempt {
        attempt: 1,
        state: State::Interrupted,
        instance_id: Some("i-first".into()),
        error: None,
        finished_at: "t".into(),
    }];
    statuses.put(BUCKET, &status_key("in/c.csv"), status);

    let rows = jobs(&launcher, &statuses).list(clock()).await.unwrap();
    type Row<'a> = (&'a str, &'a str, bool, Option<State>, Option<u64>);
    let summary: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.instance_id.as_str(),
                r.key.as_str(),
                r.stuck,
                r.result,
                r.age_secs,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                "i-first",
                "in/c.csv",
                false,
                Some(State::Interrupted),
                Some(9999)
            ),
            (
                "i-done",
                "in/c.csv",
                false,
                Some(State::Succeeded),
                Some(9000)
            ),
            ("i-old", "in/a.csv", true, None, Some(7200)),
            ("i-new", "in/b.csv", false, None, Some(60)),
        ],
        "oldest first; a terminated instance is never stuck"
    );
    assert_eq!(rows[2].attempt, Some(1));
    assert_eq!(rows[2].market, "spot");
}

#[tokio::test]
async fn cancel_terminates_the_active_instance_and_records_cancelled() {
    let launcher = launcher(vec![
        instance("i-1", "in/a.csv", 1, "terminated", 900),
        instance("i-2", "in/a.csv", 2, "running", 300),
        instance("i-other", "in/b.csv", 1, "running", 300),
    ]);
    let statuses = MemoryStatuses::default();
    statuses.put(
        BUCKET,
        &status_key("in/a.csv"),
        worker_status("in/a.csv", "interrupted", 1, "i-1"),
    );
    let jobs = jobs(&launcher, &statuses);

    // By key, and by the id of any instance of the job: the same job.
    for target in ["in/a.csv", "i-1"] {
        let found = jobs.find(&key(target), clock()).await.unwrap();
        let ids: Vec<&str> = found.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(ids, ["i-1", "i-2"], "{target}");
    }

    let stopped = jobs.cancel(&key("in/a.csv"), clock()).await.unwrap();
    assert_eq!(stopped.errors, Vec::<String>::new());
    assert_eq!(launcher.terminated(), ["i-2"], "only the active one");
    let status = statuses.get(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!((status.state, status.attempt), (State::Cancelled, 2));
    assert!(status.error.unwrap().contains("s3spot jobs cancel"));
    assert_eq!(
        status.history.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1],
        "attempt 1 kept"
    );
    assert_eq!(
        status.input.version_id.as_deref(),
        Some("v1"),
        "from the user-data"
    );
}

#[tokio::test]
async fn cancel_with_nothing_running_says_what_it_found() {
    let launcher = launcher(vec![instance("i-1", "in/a.csv", 1, "terminated", 900)]);
    let statuses = MemoryStatuses::default();
    let jobs = jobs(&launcher, &statuses);
    let error = jobs.cancel(&key("in/a.csv"), clock()).await.unwrap_err();
    assert!(matches!(error, JobsError::NothingToCancel { .. }));
    assert!(error.to_string().contains("i-1 terminated"), "{error}");
    assert_eq!(launcher.terminated(), Vec::<String>::new());

    let error = jobs.cancel(&key("in/none.csv"), clock()).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("name the object as s3://bucket/key"),
        "{error}"
    );
    // Another pipeline's instance is not ours to touch.
    let mut foreign = instance("i-foreign", "in/a.csv", 1, "running", 9999);
    foreign.0.tags[0].1 = "someone-else".into();
    let launcher = self::launcher(vec![foreign]);
    let error = self::jobs(&launcher, &statuses)
        .cancel(&key("i-foreign"), clock())
        .await
        .unwrap_err();
    assert!(matches!(error, JobsError::NotFound { .. }), "{error}");
    assert_eq!(launcher.terminated(), Vec::<String>::new());
}

#[tokio::test]
async fn reap_terminates_only_stuck_instances_and_keeps_a_finished_verdict() {
    let launcher = launcher(vec![
        instance("i-hung", "in/a.csv", 1, "running", 7200),
        // Its worker succeeded, but the instance never powered off.
        instance("i-no-poweroff", "in/b.csv", 1, "running", 8000),
        instance("i-young", "in/c.csv", 1, "running", 600),
    ]);
    let statuses = MemoryStatuses::default();
    statuses.put(
        BUCKET,
        &status_key("in/b.csv"),
        worker_status("in/b.csv", "succeeded", 1, "i-no-poweroff"),
    );
    let jobs = jobs(&launcher, &statuses);

    let listed = jobs.reap(clock(), true).await.unwrap();
    let ids: Vec<&str> = listed
        .instances
        .iter()
        .map(|i| i.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["i-no-poweroff", "i-hung"], "oldest first");
    assert_eq!(launcher.terminated(), Vec::<String>::new(), "a dry run");
    assert_eq!(statuses.writes(), []);

    jobs.reap(clock(), false).await.unwrap();
    assert_eq!(launcher.terminated(), ["i-no-poweroff", "i-hung"]);
    let hung = statuses.get(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!(hung.state, State::Failed);
    assert!(hung.error.unwrap().starts_with("reaped: running for 7200s"));
    let finished = statuses.get(BUCKET, &status_key("in/b.csv")).unwrap();
    assert_eq!(finished.state, State::Succeeded, "not overwritten");
    assert_eq!(statuses.writes().len(), 1);
}

#[tokio::test]
async fn the_scheduled_event_runs_the_reaper() {
    // The Lambda reads the real clock.
    let now = Clock::now(&config(&[]).jobs()).now;
    let launcher = launcher(vec![
        launched("i-hung", "in/a.csv", 1, "running", now - 100_000),
        launched("i-young", "in/c.csv", 1, "running", now - 60),
    ]);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let Ok(Response::Report(report)) = handler.handle(event("scheduled-reap.json")).await else {
        panic!("a report")
    };
    assert_eq!(report.failed, []);
    assert_eq!(report.launched, []);
    let reaped: Vec<&str> = report
        .reaped
        .iter()
        .map(|i| i.instance_id.as_str())
        .collect();
    assert_eq!(reaped, ["i-hung"]);
    assert_eq!(launcher.terminated(), ["i-hung"]);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["reaped"][0]["key"], "in/a.csv");
}

fn launched_attempt(report: &Report, launcher: &ScriptedLauncher) -> (String, String) {
    assert_eq!(report.failed, [], "{report:?}");
    let request = launcher.requests().pop().expect("a launch");
    let tag = |name: &str| {
        request
            .tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    (tag("s3spot:attempt"), request.client_token)
}

#[tokio::test]
async fn retry_launches_the_next_attempt_through_the_handler() {
    let launcher = launcher(vec![
        instance("i-1", "in/a.csv", 1, "terminated", 900),
        instance("i-2", "in/a.csv", 2, "running", 300),
    ]);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let error = handler.retry(&key("in/a.csv")).await.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("still running on i-2 (attempt 2)"),
        "{error}"
    );
    assert_eq!(launcher.requests(), []);

    let launcher = self::launcher(vec![
        instance("i-1", "in/a.csv", 1, "terminated", 900),
        instance("i-2", "in/a.csv", 2, "terminated", 300),
    ]);
    let handler = Handler::new(config(&[]), &launcher, MemoryStatuses::default());
    let report = handler.retry(&key("i-1")).await.unwrap();
    let (attempt, token) = launched_attempt(&report, &launcher);
    assert_eq!(attempt, "3");
    assert!(token.starts_with("job-in/a.csv-3-"), "{token}");
    assert_eq!(report.launched[0].key, "in/a.csv");
}

#[tokio::test]
async fn retry_after_ec2_forgot_the_instances_reads_status_json() {
    let statuses = MemoryStatuses::default();
    let mut status = worker_status("in/a.csv", "failed", 4, "i-4");
    status.history = vec![];
    statuses.put(BUCKET, &status_key("in/a.csv"), status);
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, statuses);

    let error = handler.retry(&key("in/a.csv")).await.unwrap_err();
    assert!(error.to_string().contains("s3://bucket/key"), "{error}");

    let report = handler.retry(&key("s3://data/in/a.csv")).await.unwrap();
    let (attempt, _) = launched_attempt(&report, &launcher);
    assert_eq!(attempt, "5", "after the 4 attempts on record");
    let job = s3spot_bootstrap::job_from_user_data(
        &String::from_utf8(
            base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                &launcher.requests()[0].user_data,
            )
            .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (job.key.as_str(), job.version_id.as_deref()),
        ("in/a.csv", Some("v1"))
    );

    let error = handler
        .retry(&key("s3://data/in/unknown.csv"))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("upload the object again"),
        "{error}"
    );
}

#[tokio::test]
async fn show_has_the_instances_status_and_log_tails() {
    let launcher = launcher(vec![instance("i-1", "in/a.csv", 1, "terminated", 900)]);
    let statuses = MemoryStatuses::default();
    statuses.put(
        BUCKET,
        &status_key("in/a.csv"),
        worker_status("in/a.csv", "failed", 1, "i-1"),
    );
    let long_log = format!("{}\nthe last line\n", "x".repeat(10_000));
    statuses.put_text(BUCKET, "analysis/in/a.csv/stderr.log", &long_log);
    let detail = jobs(&launcher, &statuses)
        .show(&key("in/a.csv"), clock())
        .await
        .unwrap();
    assert_eq!(detail.instances.len(), 1);
    assert_eq!(detail.status.unwrap().state, State::Failed);
    assert_eq!(detail.status_url, "s3://data/analysis/in/a.csv/status.json");
    assert_eq!(detail.logs.len(), 1, "no stdout.log was written");
    assert_eq!(detail.logs[0].url, "s3://data/analysis/in/a.csv/stderr.log");
    assert!(detail.logs[0].tail.ends_with("the last line\n"));
    assert_eq!(
        detail.logs[0].tail.len() as u64,
        s3spot_lambda::jobs::LOG_TAIL_BYTES
    );
}

fn price(instance_type: &str, usd: f64) -> SpotPrice {
    SpotPrice {
        instance_type: instance_type.into(),
        availability_zone: "us-east-1a".into(),
        usd_per_hour: usd,
        at: NOW,
    }
}

#[tokio::test]
async fn order_by_price_tries_the_cheapest_spot_type_first() {
    let types = [
        ("S3SPOT_INSTANCE_TYPES", "m5.large,c5.large,t3.micro"),
        ("S3SPOT_ORDER_BY_PRICE", "true"),
    ];
    let launcher = ScriptedLauncher {
        prices: Some(vec![
            price("m5.large", 0.04),
            price("c5.large", 0.03),
            price("t3.micro", 0.05),
        ]),
        ..Default::default()
    };
    let handler = Handler::new(config(&types), &launcher, MemoryStatuses::default());
    handler.handle(event("s3-put.json")).await.unwrap();
    let first = &launcher.requests()[0].option;
    assert_eq!(first.instance_type.as_deref(), Some("c5.large"));

    // Without prices, the configured order stands and the job still launches.
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&types), &launcher, MemoryStatuses::default());
    handler.handle(event("s3-put.json")).await.unwrap();
    let first = &launcher.requests()[0].option;
    assert_eq!(first.instance_type.as_deref(), Some("m5.large"));

    // Off by default.
    let launcher = ScriptedLauncher {
        prices: Some(vec![price("t3.micro", 0.001)]),
        ..Default::default()
    };
    let handler = Handler::new(config(&types[..1]), &launcher, MemoryStatuses::default());
    handler.handle(event("s3-put.json")).await.unwrap();
    assert_eq!(
        launcher.requests()[0].option.instance_type.as_deref(),
        Some("m5.large")
    );
}

#[tokio::test]
async fn keys_longer_than_a_tag_are_read_whole_from_the_user_data() {
    let long = format!("in/{}.csv", "k".repeat(300));
    let mut instance = instance("i-long", &long, 1, "running", 60);
    for (name, value) in &mut instance.0.tags {
        if name == "s3spot:key" {
            *value = long.chars().take(256).collect();
        }
    }
    let launcher = launcher(vec![instance]);
    let statuses = MemoryStatuses::default();
    let jobs = jobs(&launcher, &statuses);
    let rows = jobs.list(clock()).await.unwrap();
    assert_eq!(rows[0].key, long);
    let found = jobs.find(&key(&long), clock()).await.unwrap();
    assert_eq!(found.len(), 1);
    // A key that shares the tag's 256 characters but not the rest is another job.
    let other = format!("{}other", &long[..256]);
    assert_eq!(jobs.find(&key(&other), clock()).await.unwrap(), []);
}
