//! The job commands and the scheduled reaper, through a scripted launcher and statuses in
//! memory: what is listed, stopped, recorded and re-launched.

use s3spot_bootstrap::fake::MemoryStatuses;
use s3spot_bootstrap::{Attempt, JobSpec, State, Status, Writer};
use s3spot_lambda::event::ObjectCreated;
use s3spot_lambda::fake::ScriptedLauncher;
use s3spot_lambda::launcher::job_tags;
use s3spot_lambda::plan::{Plan, plan};
use s3spot_lambda::token::job_id;
use s3spot_lambda::{
    Clock, Config, Handler, InstanceInfo, Jobs, JobsError, Report, Response, StateReason, Target,
};
use s3spot_tests::{event, s3spot_lookup};
use serde_json::json;

fn config(overrides: &[(&str, &str)]) -> Config {
    Config::from_lookup(s3spot_lookup("s3spot-worker", overrides)).unwrap()
}

const BUCKET: &str = "data";
const NOW: i64 = 1_800_000_000;
/// When every key in these tests was uploaded, unless a test says otherwise.
const UPLOADED_AT: &str = "2026-11-30T10:00:00.000Z";

fn clock() -> Clock {
    Clock {
        now: NOW,
        stuck_after_secs: None,
        default_max_runtime_secs: 3600,
    }
}

/// The upload of `key` at `uploaded_at`, as its event describes it.
fn upload(key: &str, uploaded_at: &str) -> ObjectCreated {
    ObjectCreated {
        bucket: BUCKET.into(),
        key: key.into(),
        version_id: None,
        etag: Some(format!("etag of {key} at {uploaded_at}")),
        size: Some(10),
        sequencer: None,
        event_time: Some(uploaded_at.into()),
    }
}

/// Attempt `attempt` of the job of `object`, as the handler plans it.
fn spec_of(object: &ObjectCreated, attempt: u32, overrides: &[(&str, &str)]) -> (JobSpec, String) {
    let config = config(overrides);
    let id = job_id(&config.job.pipeline, object);
    let Ok(Plan::Launch(job)) = plan(&config.job, object, attempt, &id) else {
        panic!("{} is a job", object.key)
    };
    (job.spec, job.user_data.to_base64())
}

fn spec(key: &str, attempt: u32) -> JobSpec {
    spec_of(&upload(key, UPLOADED_AT), attempt, &[]).0
}

/// An instance of the default pipeline running `key`'s job on `attempt`, launched `age` seconds
/// before [`NOW`], with the tags and user-data the handler would have given it.
fn instance(id: &str, key: &str, attempt: u32, state: &str, age: i64) -> (InstanceInfo, String) {
    launched(
        id,
        &upload(key, UPLOADED_AT),
        attempt,
        state,
        NOW - age,
        &[],
    )
}

fn launched(
    id: &str,
    object: &ObjectCreated,
    attempt: u32,
    state: &str,
    launched_at: i64,
    overrides: &[(&str, &str)],
) -> (InstanceInfo, String) {
    let (spec, user_data) = spec_of(object, attempt, overrides);
    let info = InstanceInfo {
        instance_id: id.into(),
        state: state.into(),
        instance_type: Some("m5.large".into()),
        market: "spot".into(),
        launched_at: Some(launched_at),
        tags: job_tags("s3spot", &spec),
        state_reason: None,
    };
    (info, user_data)
}

fn ended_by(mut instance: (InstanceInfo, String), code: &str) -> (InstanceInfo, String) {
    instance.0.state_reason = Some(StateReason {
        code: code.into(),
        message: format!("{code}: as EC2 says it"),
    });
    instance
}

fn launcher(instances: Vec<(InstanceInfo, String)>) -> ScriptedLauncher {
    ScriptedLauncher {
        instances,
        ..Default::default()
    }
}

fn status_key(key: &str) -> String {
    spec(key, 1).status_key()
}

/// A status.json as a worker writes it.
fn worker_status(key: &str, state: &str, attempt: u32, instance_id: &str) -> Status {
    let spec = spec(key, attempt);
    serde_json::from_value(json!({
        "state": state, "job_id": spec.job_id, "uploaded_at": spec.uploaded_at,
        "written_by": "worker",
        "input": {"bucket": BUCKET, "key": key, "version_id": null,
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
        cost: None,
    }];
    statuses.put_status(BUCKET, &status_key("in/c.csv"), status);

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
    statuses.put_status(
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
    let status = statuses.status(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!((status.state, status.attempt), (State::Cancelled, 2));
    assert!(status.error.unwrap().contains("s3spot jobs cancel"));
    assert_eq!(
        status.history.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1],
        "attempt 1 kept"
    );
    assert_eq!(
        status.input.etag,
        spec("in/a.csv", 2).etag,
        "from the user-data"
    );
    assert_eq!(status.written_by, Writer::Launcher);
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
    for (name, value) in &mut foreign.0.tags {
        if name == "s3spot:pipeline" {
            *value = "someone-else".into();
        }
    }
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
    statuses.put_status(
        BUCKET,
        &status_key("in/b.csv"),
        worker_status("in/b.csv", "succeeded", 1, "i-no-poweroff"),
    );
    let handler = Handler::new(config(&[]), &launcher, &statuses);

    let listed = handler.reap(clock(), true).await.unwrap();
    let ids: Vec<&str> = listed
        .instances
        .iter()
        .map(|i| i.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["i-no-poweroff", "i-hung"], "oldest first");
    assert_eq!(launcher.terminated(), Vec::<String>::new(), "a dry run");
    assert_eq!(statuses.writes(), []);

    handler.reap(clock(), false).await.unwrap();
    assert_eq!(launcher.terminated(), ["i-no-poweroff", "i-hung"]);
    let hung = statuses.status(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!(hung.state, State::Failed);
    assert!(hung.error.unwrap().starts_with("reaped: running for 7200s"));
    let finished = statuses.status(BUCKET, &status_key("in/b.csv")).unwrap();
    assert_eq!(finished.state, State::Succeeded, "not overwritten");
    assert_eq!(statuses.writes().len(), 1);
}

#[tokio::test]
async fn the_scheduled_event_runs_the_reaper() {
    // The Lambda reads the real clock.
    let now = Clock::now(&config(&[]).jobs()).now;
    let launcher = launcher(vec![
        launched(
            "i-hung",
            &upload("in/a.csv", UPLOADED_AT),
            1,
            "running",
            now - 100_000,
            &[],
        ),
        launched(
            "i-young",
            &upload("in/c.csv", UPLOADED_AT),
            1,
            "running",
            now - 60,
            &[],
        ),
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
    assert!(
        token.starts_with(&format!("{}-3-", spec("in/a.csv", 1).job_id)),
        "{token}"
    );
    assert_eq!(report.launched[0].key, "in/a.csv");
}

#[tokio::test]
async fn retry_after_ec2_forgot_the_instances_reads_status_json() {
    let statuses = MemoryStatuses::default();
    let mut status = worker_status("in/a.csv", "failed", 4, "i-4");
    status.history = vec![];
    statuses.put_status(BUCKET, &status_key("in/a.csv"), status);
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
    let first = spec("in/a.csv", 1);
    assert_eq!(
        (job.key.as_str(), &job.job_id, job.results_key_prefix()),
        ("in/a.csv", &first.job_id, first.results_key_prefix()),
        "the same job, in the same folder"
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
    statuses.put_status(
        BUCKET,
        &status_key("in/a.csv"),
        worker_status("in/a.csv", "failed", 1, "i-1"),
    );
    let long_log = format!("{}\nthe last line\n", "x".repeat(10_000));
    let prefix = spec("in/a.csv", 1).results_key_prefix();
    statuses.put_text(BUCKET, &format!("{prefix}stderr.log"), &long_log);
    let detail = jobs(&launcher, &statuses)
        .show(&key("in/a.csv"), clock())
        .await
        .unwrap();
    assert_eq!(detail.instances.len(), 1);
    assert_eq!(detail.status.unwrap().state, State::Failed);
    assert_eq!(detail.status_url, format!("s3://data/{prefix}status.json"));
    assert_eq!(detail.logs.len(), 1, "no stdout.log was written");
    assert_eq!(detail.logs[0].url, format!("s3://data/{prefix}stderr.log"));
    assert!(detail.logs[0].tail.ends_with("the last line\n"));
    assert_eq!(
        detail.logs[0].tail.len() as u64,
        s3spot_lambda::jobs::LOG_TAIL_BYTES
    );
}

#[tokio::test]
async fn one_fleet_request_names_every_type_in_every_subnet() {
    let launcher = ScriptedLauncher::default();
    let vars = [
        ("S3SPOT_INSTANCE_TYPES", "m5.large,c5.large,m6i.large"),
        ("S3SPOT_SUBNETS", "subnet-0a,subnet-0b"),
    ];
    let handler = Handler::new(config(&vars), &launcher, MemoryStatuses::default());
    handler.handle(event("s3-put.json")).await.unwrap();
    let requests = launcher.requests();
    assert_eq!(
        requests.len(),
        1,
        "one request, whatever the number of pools"
    );
    let pools: Vec<String> = requests[0].pools.iter().map(ToString::to_string).collect();
    assert_eq!(
        pools,
        [
            "m5.large in subnet-0a",
            "m5.large in subnet-0b",
            "c5.large in subnet-0a",
            "c5.large in subnet-0b",
            "m6i.large in subnet-0a",
            "m6i.large in subnet-0b",
        ]
    );
    assert_eq!(requests[0].market, s3spot_lambda::config::MarketType::Spot);
    assert_eq!(requests[0].requirements, None);
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

#[tokio::test]
async fn two_uploads_of_one_key_are_two_jobs_each_with_its_own_status() {
    let first = upload("in/a.csv", "2026-11-30T10:00:00.000Z");
    let second = upload("in/a.csv", "2026-11-30T11:00:00.000Z");
    let launcher = launcher(vec![
        launched("i-first", &first, 1, "running", NOW - 300, &[]),
        launched("i-second", &second, 1, "running", NOW - 60, &[]),
    ]);
    let statuses = MemoryStatuses::default();
    let (first_spec, _) = spec_of(&first, 1, &[]);
    let (second_spec, _) = spec_of(&second, 1, &[]);
    assert_ne!(first_spec.job_id, second_spec.job_id);
    assert_ne!(first_spec.status_key(), second_spec.status_key());
    let mut done = worker_status("in/a.csv", "succeeded", 1, "i-first");
    done.job_id = first_spec.job_id.clone();
    done.uploaded_at = first_spec.uploaded_at.clone();
    statuses.put_status(BUCKET, &first_spec.status_key(), done);

    let jobs = jobs(&launcher, &statuses);
    let rows = jobs.list(clock()).await.unwrap();
    let results: Vec<(&str, Option<State>)> = rows
        .iter()
        .map(|r| (r.instance_id.as_str(), r.result))
        .collect();
    assert_eq!(
        results,
        [("i-first", Some(State::Succeeded)), ("i-second", None)],
        "each instance shows its own upload's result"
    );

    // The key names its newest upload; an instance names its own.
    let newest = jobs.show(&key("in/a.csv"), clock()).await.unwrap();
    assert_eq!(newest.job_id.as_deref(), Some(second_spec.job_id.as_str()));
    assert_eq!(newest.status, None, "the newest upload has no status yet");
    let older = jobs.show(&key("i-first"), clock()).await.unwrap();
    assert_eq!(older.status.unwrap().state, State::Succeeded);
    assert_eq!(older.instances.len(), 1);

    // Cancelling the key stops whatever runs for it, each in its own status.json.
    let stopped = jobs.cancel(&key("in/a.csv"), clock()).await.unwrap();
    assert_eq!(stopped.errors, Vec::<String>::new());
    assert_eq!(launcher.terminated(), ["i-first", "i-second"]);
    let first_status = statuses.status(BUCKET, &first_spec.status_key()).unwrap();
    assert_eq!(
        first_status.state,
        State::Succeeded,
        "a finished upload's account stands"
    );
    let second_status = statuses.status(BUCKET, &second_spec.status_key()).unwrap();
    assert_eq!(second_status.state, State::Cancelled);
    assert_eq!(second_status.job_id, second_spec.job_id);
}

#[tokio::test]
async fn a_status_of_another_job_is_never_read_as_this_ones_nor_overwritten() {
    let launcher = launcher(vec![instance("i-1", "in/a.csv", 1, "running", 60)]);
    let statuses = MemoryStatuses::default();
    let mut foreign = worker_status("in/a.csv", "succeeded", 1, "i-0");
    foreign.job_id = "f".repeat(32);
    statuses.put_status(BUCKET, &status_key("in/a.csv"), foreign.clone());
    let jobs = jobs(&launcher, &statuses);
    let rows = jobs.list(clock()).await.unwrap();
    assert_eq!(rows[0].result, None, "not this job's result");
    let error = jobs.show(&key("i-1"), clock()).await.unwrap_err();
    assert!(
        s3spot_lambda::error_chain(&error).contains("belongs to job"),
        "{error}"
    );
    let stopped = jobs.cancel(&key("i-1"), clock()).await.unwrap();
    assert_eq!(launcher.terminated(), ["i-1"]);
    assert!(
        stopped.errors[0].contains("belongs to job"),
        "{:?}",
        stopped.errors
    );
    assert_eq!(
        statuses.status(BUCKET, &status_key("in/a.csv")),
        Some(foreign)
    );
}

#[tokio::test]
async fn stuck_is_judged_by_each_jobs_own_max_runtime() {
    // Launched under a 4-hour limit, 3 hours ago: the function's 1-hour setting must not reap it.
    let long = launched(
        "i-long",
        &upload("in/long.csv", UPLOADED_AT),
        1,
        "running",
        NOW - 3 * 3600,
        &[("S3SPOT_MAX_RUNTIME", "14400")],
    );
    // Launched under a 60-second limit, 20 minutes ago: past its 60 s and the grace.
    let short = launched(
        "i-short",
        &upload("in/short.csv", UPLOADED_AT),
        1,
        "running",
        NOW - 1200,
        &[("S3SPOT_MAX_RUNTIME", "60")],
    );
    let launcher = launcher(vec![long, short]);
    let statuses = MemoryStatuses::default();
    let rows = jobs(&launcher, &statuses).list(clock()).await.unwrap();
    let stuck: Vec<(&str, bool, Option<u64>)> = rows
        .iter()
        .map(|r| (r.instance_id.as_str(), r.stuck, r.max_runtime_secs))
        .collect();
    assert_eq!(
        stuck,
        [("i-long", false, Some(14_400)), ("i-short", true, Some(60))]
    );
    let handler = Handler::new(config(&[]), &launcher, &statuses);
    let reaped = handler.reap(clock(), false).await.unwrap();
    assert_eq!(launcher.terminated(), ["i-short"]);
    assert_eq!(reaped.instances.len(), 1);
    let status = statuses
        .status(BUCKET, &status_key("in/short.csv"))
        .unwrap();
    assert!(
        status.error.unwrap().contains("past the 660s"),
        "its own limit and the grace"
    );
}

#[tokio::test]
async fn the_reaper_gives_an_attempt_that_ended_without_a_word_a_final_status() {
    let mut gone = ended_by(
        instance("i-oom", "in/a.csv", 1, "terminated", 900),
        "Client.InstanceInitiatedShutdown",
    );
    gone.0.market = "on-demand".into();
    let finished = ended_by(
        instance("i-fine", "in/b.csv", 1, "terminated", 900),
        "Client.InstanceInitiatedShutdown",
    );
    let still_going = instance("i-going", "in/c.csv", 1, "shutting-down", 900);
    let launcher = ScriptedLauncher {
        instances: vec![gone, finished, still_going],
        consoles: vec![(
            "i-oom".into(),
            format!(
                "{}\ns3spot-bootstrap: worker sha256 mismatch: expected ab, got cd; not running it\n",
                "boot noise\n".repeat(1000)
            ),
        )],
        ..Default::default()
    };
    let statuses = MemoryStatuses::default();
    statuses.put_status(
        BUCKET,
        &status_key("in/b.csv"),
        worker_status("in/b.csv", "succeeded", 1, "i-fine"),
    );
    let handler = Handler::new(config(&[]), &launcher, &statuses);

    let planned = handler.reap(clock(), true).await.unwrap();
    let ids: Vec<&str> = planned
        .ended
        .iter()
        .map(|e| e.instance.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["i-oom"], "only the attempt without an account");
    assert_eq!(statuses.writes(), [], "a dry run");

    let reaped = handler.reap(clock(), false).await.unwrap();
    assert_eq!(reaped.errors, Vec::<String>::new());
    assert_eq!(reaped.ended.len(), 1);
    assert_eq!(launcher.terminated(), Vec::<String>::new());
    let status = statuses.status(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!((status.state, status.attempt), (State::Failed, 1));
    assert_eq!(status.written_by, Writer::Launcher);
    let error = status.error.unwrap();
    for part in [
        "instance i-oom ended (terminated) without a status from its worker",
        "Client.InstanceInitiatedShutdown",
        "worker sha256 mismatch",
    ] {
        assert!(error.contains(part), "{part:?} in {error}");
    }
    assert!(
        error.len() < 3000,
        "only the end of the console: {}",
        error.len()
    );
    assert_eq!(
        status.instance.unwrap().id.as_deref(),
        Some("i-oom"),
        "the instance is named"
    );
    assert_eq!(
        statuses
            .status(BUCKET, &status_key("in/b.csv"))
            .unwrap()
            .state,
        State::Succeeded
    );

    // Once recorded, later runs find the attempt accounted for.
    let again = handler.reap(clock(), false).await.unwrap();
    assert_eq!(again.ended, []);
}

#[tokio::test]
async fn a_spot_instance_taken_back_without_a_warning_is_launched_again() {
    // Reclaimed while pending: EC2 sends no warning then.
    let reclaimed = ended_by(
        instance("i-1", "in/a.csv", 1, "terminated", 900),
        "Server.SpotInstanceTermination",
    );
    let launcher = launcher(vec![reclaimed]);
    let statuses = MemoryStatuses::default();
    let handler = Handler::new(config(&[]), &launcher, &statuses);
    let reaped = handler.reap(clock(), false).await.unwrap();
    assert_eq!(reaped.errors, Vec::<String>::new());
    let requests = launcher.requests();
    assert_eq!(requests.len(), 1, "the next attempt");
    let attempt = requests[0]
        .tags
        .iter()
        .find(|(k, _)| k == "s3spot:attempt")
        .unwrap();
    assert_eq!(attempt.1, "2");
    assert!(reaped.ended[0].outcome.contains("attempt 2 re-launched"));
    let status = statuses.status(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!((status.state, status.attempt), (State::Interrupted, 1));

    // On the last attempt it is failed instead, with EC2's reason.
    let last = ended_by(
        instance("i-3", "in/b.csv", 3, "terminated", 900),
        "Server.SpotInstanceTermination",
    );
    let launcher = self::launcher(vec![last]);
    let statuses = MemoryStatuses::default();
    let handler = Handler::new(config(&[]), &launcher, &statuses);
    handler.reap(clock(), false).await.unwrap();
    assert_eq!(launcher.requests(), []);
    let status = statuses
        .status(BUCKET, &spec("in/b.csv", 3).status_key())
        .unwrap();
    assert_eq!((status.state, status.attempt), (State::Failed, 3));
    assert!(
        status.error.unwrap().contains("S3SPOT_MAX_ATTEMPTS"),
        "why it stopped"
    );
}

#[tokio::test]
async fn an_interruption_of_a_newer_upload_is_not_mistaken_for_the_older_ones_end() {
    let older = upload("in/a.csv", "2026-11-30T10:00:00.000Z");
    let newer = upload("in/a.csv", "2026-11-30T11:00:00.000Z");
    // The warning's redelivery, after EC2 took the instance.
    let interrupted = launched("i-newer", &newer, 1, "terminated", NOW - 60, &[]);
    let launcher = ScriptedLauncher {
        instances: vec![interrupted],
        ..Default::default()
    };
    let statuses = MemoryStatuses::default();
    // The older upload's job finished.
    let (older_spec, _) = spec_of(&older, 1, &[]);
    let mut done = Status::initial(&older_spec, Writer::Worker, std::time::SystemTime::now());
    done.state = State::Succeeded;
    statuses.put_status(BUCKET, &older_spec.status_key(), done.clone());

    let handler = Handler::new(config(&[]), &launcher, &statuses);
    let mut warning = event("spot-interruption.json");
    warning["detail"]["instance-id"] = "i-newer".into();
    let Ok(Response::Report(report)) = handler.handle(warning).await else {
        panic!("a report")
    };
    assert_eq!(report.failed, []);
    assert_eq!(report.launched.len(), 1, "the newer upload's next attempt");
    let (newer_spec, _) = spec_of(&newer, 1, &[]);
    let recorded = statuses.status(BUCKET, &newer_spec.status_key()).unwrap();
    assert_eq!((recorded.state, recorded.attempt), (State::Interrupted, 1));
    assert_eq!(
        statuses.status(BUCKET, &older_spec.status_key()),
        Some(done),
        "the older upload's status is untouched"
    );
}

#[tokio::test]
async fn a_status_that_cannot_be_read_is_no_reason_to_settle_an_attempt() {
    let launcher = launcher(vec![ended_by(
        instance("i-1", "in/a.csv", 1, "terminated", 900),
        "Client.InstanceInitiatedShutdown",
    )]);
    // S3's reads fail for a while.
    let statuses = MemoryStatuses::default();
    statuses.fail_reads(true);
    statuses.put_status(
        BUCKET,
        &status_key("in/a.csv"),
        worker_status("in/a.csv", "succeeded", 1, "i-1"),
    );
    let handler = Handler::new(config(&[]), &launcher, &statuses);
    let reaped = handler.reap(clock(), false).await.unwrap();
    assert_eq!(
        reaped.ended,
        [],
        "nothing is known of it, so nothing is decided"
    );
    statuses.fail_reads(false);
    let reaped = handler.reap(clock(), false).await.unwrap();
    assert_eq!(reaped.ended, [], "it had its account all along");
    assert_eq!(
        statuses
            .status(BUCKET, &status_key("in/a.csv"))
            .unwrap()
            .state,
        State::Succeeded
    );
    assert_eq!(statuses.writes(), []);
}

#[tokio::test]
async fn the_newest_upload_is_never_a_longer_keys_folder() {
    let statuses = MemoryStatuses::default();
    let upload = spec("in/a.csv", 1);
    statuses.put_status(
        BUCKET,
        &upload.status_key(),
        worker_status("in/a.csv", "succeeded", 1, "i-1"),
    );
    // `in/a.csv/zzz`'s results are under `in/a.csv`'s folder, and sort after its uploads.
    let longer = spec("in/a.csv/zzz", 1);
    statuses.put_status(
        BUCKET,
        &longer.status_key(),
        worker_status("in/a.csv/zzz", "failed", 1, "i-2"),
    );
    let launcher = ScriptedLauncher::default();
    let detail = jobs(&launcher, &statuses)
        .show(&key("s3://data/in/a.csv"), clock())
        .await
        .unwrap();
    assert_eq!(detail.job_id.as_deref(), Some(upload.job_id.as_str()));
    assert_eq!(detail.status.unwrap().state, State::Succeeded);
    assert_eq!(detail.uploads, [upload.upload()]);
}

#[tokio::test]
async fn retry_counts_the_attempts_that_only_their_claims_remember() {
    let statuses = MemoryStatuses::default();
    statuses.put_status(
        BUCKET,
        &status_key("in/a.csv"),
        worker_status("in/a.csv", "failed", 1, "i-1"),
    );
    // Attempt 2 was launched (and its instance forgotten by EC2) before any status of its own;
    // attempt 3's token was found spent.
    let mut launched = s3spot_bootstrap::Claim::new(spec("in/a.csv", 2));
    launched.instance_id = Some("i-2".into());
    let mut spent = s3spot_bootstrap::Claim::new(spec("in/a.csv", 3));
    spent.done =
        Some("already launched: ClientToken … belongs to an instance that has terminated".into());
    for claim in [launched, spent] {
        s3spot_bootstrap::write_claim(
            &statuses,
            BUCKET,
            &claim.job.claim_key(),
            &claim,
            &s3spot_bootstrap::Expect::Nothing,
        )
        .await
        .unwrap();
    }
    let launcher = ScriptedLauncher::default();
    let handler = Handler::new(config(&[]), &launcher, statuses);
    let report = handler.retry(&key("s3://data/in/a.csv")).await.unwrap();
    let (attempt, _) = launched_attempt(&report, &launcher);
    assert_eq!(attempt, "4", "after the attempts claimed: {report:?}");
}

#[tokio::test]
async fn an_attempt_stopped_by_other_than_a_spot_notice_is_failed_with_what_happened() {
    // The worker was stopped (someone terminated the instance) and said so; no spot notice.
    let launcher = launcher(vec![ended_by(
        instance("i-1", "in/a.csv", 1, "terminated", 900),
        "Client.UserInitiatedShutdown",
    )]);
    let statuses = MemoryStatuses::default();
    let mut stopped = worker_status("in/a.csv", "interrupted", 1, "i-1");
    stopped.error = Some("the worker received SIGTERM".into());
    statuses.put_status(BUCKET, &status_key("in/a.csv"), stopped);
    let handler = Handler::new(config(&[]), &launcher, &statuses);
    let reaped = handler.reap(clock(), false).await.unwrap();
    assert_eq!(reaped.ended.len(), 1, "{reaped:?}");
    assert_eq!(launcher.requests(), [], "no next attempt");
    let status = statuses.status(BUCKET, &status_key("in/a.csv")).unwrap();
    assert_eq!(status.state, State::Failed);
    let error = status.error.unwrap();
    assert!(
        error.contains("after its worker was stopped, and not by a spot interruption")
            && error.contains("Client.UserInitiatedShutdown")
            && error.contains("the worker received SIGTERM"),
        "{error}"
    );
}

/// `s3spot jobs cost` over a real S3 listing two keys a page: every job's status.json is read
/// whatever page it is on, a job's earlier attempts count too, and waits and other files do not.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_cost_sums_known_prices_and_durations_across_pages() {
    use s3spot_bootstrap::{Cost, LaunchPrice, S3Statuses, Usd, parse_timestamp};
    use s3spot_lambda::cost::CostBy;
    use std::time::{Duration, SystemTime};

    let server = s3spot_tests::S3Server::start(&[BUCKET]);
    let client = server.client().await;
    let statuses = S3Statuses::from_client(client.clone()).with_page_size(2);
    let cost = |usd_per_hour: f64, on_demand: Option<f64>, secs: u64| {
        let price = LaunchPrice {
            instance_type: "m7i.large".into(),
            zone: Some("us-east-1a".into()),
            market: "spot".into(),
            usd_per_hour: Some(Usd(usd_per_hour)),
            source: "spot price at launch".into(),
            on_demand_usd_per_hour: on_demand.map(Usd),
            launched_at: "2026-11-30T10:00:00Z".into(),
            volume_gib: None,
        };
        let ended = parse_timestamp("2026-11-30T10:00:00Z").unwrap() + Duration::from_secs(secs);
        Cost::estimate(&price, ended).unwrap()
    };
    // Five jobs: 1 h, 2 h and 30 min at $0.04/h ($0.10/h on demand); one with an earlier
    // interrupted attempt of 15 min; one without a price.
    let plans = [
        ("in/a.csv", Some(cost(0.04, Some(0.1), 3600)), None),
        ("in/b.csv", Some(cost(0.04, Some(0.1), 7200)), None),
        (
            "other/c.csv",
            Some(cost(0.04, Some(0.1), 1800)),
            Some(cost(0.04, Some(0.1), 900)),
        ),
        ("in/d.csv", None, None),
        ("in/e.csv", Some(cost(0.04, Some(0.1), 60)), None),
    ];
    for (key, last, earlier) in plans {
        let attempt = if earlier.is_some() { 2 } else { 1 };
        let (spec, _) = spec_of(&upload(key, UPLOADED_AT), attempt, &[]);
        let mut status = Status::initial(&spec, Writer::Worker, SystemTime::now());
        status.state = State::Succeeded;
        status.finished_at = s3spot_bootstrap::timestamp(SystemTime::now());
        status.cost = last;
        if let Some(earlier) = earlier {
            status.history = vec![Attempt {
                attempt: 1,
                state: State::Interrupted,
                instance_id: Some("i-1".into()),
                error: None,
                finished_at: s3spot_bootstrap::timestamp(
                    SystemTime::now() - Duration::from_secs(600),
                ),
                cost: Some(earlier),
            }];
        }
        s3spot_bootstrap::write_status(
            &statuses,
            BUCKET,
            &spec.status_key(),
            &status,
            &s3spot_bootstrap::Expect::Anything,
        )
        .await
        .unwrap();
    }
    // What is not a job's account: a wait's list entry, a command's output named status.json
    // in a folder of its own, a file elsewhere, and an unrelated file.
    let (waiting, _) = spec_of(&upload("in/w.csv", UPLOADED_AT), 1, &[]);
    let (a, _) = spec_of(&upload("in/a.csv", UPLOADED_AT), 1, &[]);
    for key in [
        waiting.waiting_key(),
        format!("{}sub/status.json", a.results_key_prefix()),
        format!("{}attempt-1-stopped/status.json", a.results_key_prefix()),
        "elsewhere/status.json".into(),
        "analysis/in/a.csv/notes.txt".into(),
    ] {
        client
            .put_object()
            .bucket(BUCKET)
            .key(key)
            .body(b"{}".to_vec().into())
            .send()
            .await
            .unwrap();
    }

    let jobs = Jobs::new(
        config(&[("S3SPOT_RESULTS_BUCKET", BUCKET)]).jobs(),
        ScriptedLauncher::default(),
        statuses,
    );
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let report = jobs.cost(an_hour_ago, CostBy::Prefix).await.unwrap();
    assert_eq!(report.unreadable, Vec::<String>::new());
    assert_eq!(report.jobs, 5);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    let total = &report.total;
    assert_eq!((total.attempts, total.priced), (6, 5));
    assert_eq!(total.seconds, 3600 + 7200 + 1800 + 900 + 60);
    let hours = 13_560.0 / 3600.0;
    assert!(close(total.usd, 0.04 * hours), "{total:?}");
    assert!(close(total.on_demand_usd, 0.1 * hours), "{total:?}");
    assert!(close(total.saving_usd, 0.06 * hours), "{total:?}");
    let groups: Vec<(&str, usize, u64)> = report
        .groups
        .iter()
        .map(|g| (g.group.as_str(), g.attempts, g.seconds))
        .collect();
    assert_eq!(
        groups,
        [("in/", 4, 3600 + 7200 + 60), ("other/", 2, 1800 + 900)]
    );

    // Attempts that ended before `since` are left out, though their document is recent.
    let report = jobs
        .cost(SystemTime::now() - Duration::from_secs(300), CostBy::State)
        .await
        .unwrap();
    assert_eq!((report.jobs, report.total.attempts), (5, 5), "{report:?}");
    // Written before `since`: left out.
    let later = jobs
        .cost(SystemTime::now() + Duration::from_secs(3600), CostBy::Day)
        .await
        .unwrap();
    assert_eq!((later.jobs, later.total.attempts), (0, 0));
    // Without a results bucket, it says which setting to give.
    let error = Jobs::new(
        config(&[]).jobs(),
        ScriptedLauncher::default(),
        MemoryStatuses::default(),
    )
    .cost(an_hour_ago, CostBy::Day)
    .await
    .unwrap_err();
    assert!(
        error.to_string().contains("S3SPOT_RESULTS_BUCKET"),
        "{error}"
    );
}
