//! The Batch backend against a real AWS Batch API (moto, without Docker: each job it is given
//! is marked succeeded or, with MOTO_SIMPLE_BATCH_FAIL_AFTER, failed). The production handler
//! and `BatchLauncher` submit; the assertions are on the jobs moto then holds.

use std::collections::HashMap;

use aws_sdk_batch::types::{
    CeState, CeType, ContainerProperties, JobDefinitionType, JobStateTimeLimitActionsAction,
    JobStatus, KeyValuesPair,
};
use s3spot_bootstrap::{JobSpec, job_from_base64_user_data, job_id};
use s3spot_lambda::{
    BatchLauncher, Clock, Config, Handler, Jobs, Launcher as _, Response, S3Statuses, Target,
};
use s3spot_tests::{Moto, REGION, S3Server, s3spot_lookup};
use serde_json::json;

const QUEUE: &str = "s3spot-jobs";
const DEFINITION: &str = "s3spot-job";

struct Setup {
    _moto: Moto,
    _s3: S3Server,
    batch: aws_sdk_batch::Client,
    s3_client: aws_sdk_s3::Client,
}

/// moto's Batch without Docker, and the queue and job definition a stack would have.
async fn setup() -> Setup {
    let moto = Moto::start();
    let configured = std::process::Command::new("curl")
        .args(["-fsS", "-X", "POST", "-H", "content-type: application/json"])
        .args(["-d", r#"{"batch": {"use_docker": false}}"#])
        .arg(format!("{}/moto-api/config", moto.endpoint()))
        .output()
        .unwrap();
    assert!(configured.status.success(), "{configured:?}");
    let sdk = moto.sdk_config().await;
    let iam = aws_sdk_iam::Client::new(&sdk);
    let role = iam
        .create_role()
        .role_name("batch")
        .assume_role_policy_document("{}")
        .send()
        .await
        .unwrap();
    let batch = aws_sdk_batch::Client::new(&sdk);
    let environment = batch
        .create_compute_environment()
        .compute_environment_name("s3spot")
        .r#type(CeType::Unmanaged)
        .state(CeState::Enabled)
        .service_role(role.role().unwrap().arn())
        .send()
        .await
        .unwrap();
    batch
        .create_job_queue()
        .job_queue_name(QUEUE)
        .state(aws_sdk_batch::types::JqState::Enabled)
        .priority(1)
        .compute_environment_order(
            aws_sdk_batch::types::ComputeEnvironmentOrder::builder()
                .order(1)
                .compute_environment(environment.compute_environment_arn().unwrap())
                .build(),
        )
        .job_state_time_limit_actions(
            aws_sdk_batch::types::JobStateTimeLimitAction::builder()
                .reason("CAPACITY:INSUFFICIENT_INSTANCE_CAPACITY")
                .state(aws_sdk_batch::types::JobStateTimeLimitActionsState::Runnable)
                .max_time_seconds(21_600)
                .action(JobStateTimeLimitActionsAction::Cancel)
                .build(),
        )
        .send()
        .await
        .unwrap();
    batch
        .register_job_definition()
        .job_definition_name(DEFINITION)
        .r#type(JobDefinitionType::Container)
        .container_properties(
            ContainerProperties::builder()
                .image("public.ecr.aws/amazonlinux/amazonlinux:2023")
                .command("bash")
                .resource_requirements(
                    aws_sdk_batch::types::ResourceRequirement::builder()
                        .r#type(aws_sdk_batch::types::ResourceType::Vcpu)
                        .value("1")
                        .build(),
                )
                .resource_requirements(
                    aws_sdk_batch::types::ResourceRequirement::builder()
                        .r#type(aws_sdk_batch::types::ResourceType::Memory)
                        .value("2048")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let s3 = S3Server::start(&["data"]);
    let s3_client = s3.client().await;
    Setup {
        _moto: moto,
        _s3: s3,
        batch,
        s3_client,
    }
}

impl Setup {
    fn config(&self) -> Config {
        let mut config = Config::from_lookup(s3spot_lookup(
            "",
            &[
                ("S3SPOT_BACKEND", "batch"),
                ("S3SPOT_BATCH_JOB_QUEUE", QUEUE),
                ("S3SPOT_BATCH_JOB_DEFINITION", DEFINITION),
                ("S3SPOT_PIPELINE", "genomics"),
                ("S3SPOT_RESULTS_BUCKET", "data"),
            ],
        ))
        .unwrap();
        config.job.region = Some(REGION.into());
        config
    }

    fn launcher(&self) -> BatchLauncher {
        let s3spot_lambda::Backend::Batch(target) = self.config().backend else {
            panic!("S3SPOT_BACKEND=batch makes a Batch backend");
        };
        BatchLauncher::from_client(self.batch.clone(), target)
    }

    fn handler(&self) -> Handler<BatchLauncher, S3Statuses> {
        Handler::new(
            self.config(),
            self.launcher(),
            S3Statuses::from_client(self.s3_client.clone()),
        )
    }

    /// Every job on the queue, whatever its state, as DescribeJobs has it.
    async fn jobs(&self) -> Vec<aws_sdk_batch::types::JobDetail> {
        let listed = self
            .batch
            .list_jobs()
            .job_queue(QUEUE)
            .filters(
                KeyValuesPair::builder()
                    .name("JOB_NAME")
                    .values("*")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let ids: Vec<String> = listed
            .job_summary_list()
            .iter()
            .map(|job| job.job_id().unwrap().to_owned())
            .collect();
        if ids.is_empty() {
            return Vec::new();
        }
        let described = self
            .batch
            .describe_jobs()
            .set_jobs(Some(ids))
            .send()
            .await
            .unwrap();
        described.jobs().to_vec()
    }
}

fn upload(key: &str, etag: &str) -> serde_json::Value {
    json!({"eventName": "ObjectCreated:Put", "eventTime": "2026-11-30T10:19:37.123Z",
           "s3": {"bucket": {"name": "data"},
                  "object": {"key": key, "eTag": etag, "size": 10, "sequencer": format!("00{etag}")}}})
}

fn env_of(job: &aws_sdk_batch::types::JobDetail) -> HashMap<String, String> {
    job.container()
        .unwrap()
        .environment()
        .iter()
        .map(|pair| {
            (
                pair.name().unwrap().to_owned(),
                pair.value().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn each_object_becomes_one_named_tagged_batch_job_and_redelivery_submits_none() {
    let setup = setup().await;
    let handler = setup.handler();
    let keys = ["in/a.csv", "in/photos (1).jpg", "in/ünïcode & co.csv"];
    let event = json!({"Records": keys.iter().enumerate().map(|(i, key)| upload(key, &format!("e{i}"))).collect::<Vec<_>>()});
    let Ok(Response::Report(report)) = handler.handle(event.clone()).await else {
        panic!("the handler failed");
    };
    assert_eq!(report.launched.len(), 3, "{report:#?}");
    assert!(report.failed.is_empty(), "{report:#?}");

    let jobs = setup.jobs().await;
    assert_eq!(jobs.len(), 3);
    for key in keys {
        let job = jobs
            .iter()
            .find(|job| {
                JobSpec::decode(&env_of(job)["S3SPOT_JOB"]).is_ok_and(|spec| spec.key == key)
            })
            .unwrap_or_else(|| panic!("no job for {key}"));
        let spec = JobSpec::decode(&env_of(job)["S3SPOT_JOB"]).unwrap();
        assert_eq!(spec.pipeline.as_deref(), Some("genomics"));
        assert_eq!(spec.attempt, 1);
        // The name is the job's identity, and what the lookup before each submit finds.
        assert_eq!(job.job_name().unwrap(), format!("s3spot-{}-1", spec.job_id));
        let tags = job.tags().unwrap();
        assert_eq!(tags["s3spot:job"], spec.job_id);
        assert_eq!(tags["s3spot:attempt"], "1");
        assert_eq!(tags["s3spot:pipeline"], "genomics");
        assert_eq!(tags["s3spot:upload"], spec.upload());
        // Never the key or the bucket, whose characters Batch's tag rules may refuse: the
        // environment has them whole.
        assert!(
            !tags.contains_key("s3spot:key") && !tags.contains_key("s3spot:bucket"),
            "{tags:?}"
        );
        let env = env_of(job);
        assert_eq!(env["S3SPOT_WORKER_URI"], "s3://artifacts/s3spot-worker");
        assert_eq!(env["S3SPOT_WORKER_SHA256"], "e".repeat(64));
        assert_eq!(
            env["S3SPOT_HARD_LIMIT_SECS"],
            (spec.max_runtime_secs + s3spot_bootstrap::HARD_LIMIT_GRACE_SECS).to_string()
        );
        assert!(
            job.timeout()
                .and_then(|t| t.attempt_duration_seconds())
                .is_some_and(|secs| secs as u64 > spec.max_runtime_secs),
            "Batch stops a container that hangs past the script's own limit"
        );
        assert_eq!(job.job_queue().unwrap().rsplit('/').next(), Some(QUEUE));
    }

    // The same event again (SQS delivers at least once): no second job for any upload.
    let Ok(Response::Report(again)) = handler.handle(event).await else {
        panic!("the handler failed");
    };
    assert!(again.launched.is_empty(), "{again:#?}");
    assert_eq!(setup.jobs().await.len(), 3);
}

/// The claims are lost (a launcher that died between its submit and its record): the lookup by
/// name still finds the job, and submits nothing.
#[tokio::test]
async fn a_submit_the_launcher_did_not_record_is_found_by_its_name() {
    let setup = setup().await;
    let launcher = setup.launcher();
    let handler = setup.handler();
    let event = json!({"Records": [upload("in/a.csv", "e1")]});
    let Ok(Response::Report(report)) = handler.handle(event).await else {
        panic!("the handler failed");
    };
    let submitted = &report.launched[0].instance_id;
    // The request the handler would make for that record again.
    let config = setup.config();
    let s3spot_lambda::event::Invocation::Direct(records) =
        s3spot_lambda::event::parse(json!({"Records": [upload("in/a.csv", "e1")]})).unwrap()
    else {
        panic!("a direct S3 event");
    };
    let Some(s3spot_lambda::event::Record::Created(object)) = records.into_iter().next() else {
        panic!("an object created");
    };
    let requests = s3spot_lambda::launch_requests(&config, object)
        .unwrap()
        .unwrap();
    let request = &requests[0];
    let spec = job_from_base64_user_data(&request.user_data).unwrap();
    assert_eq!(
        spec.job_id,
        job_id(
            "genomics",
            "data",
            "in/a.csv",
            s3spot_bootstrap::UploadIdentity {
                sequencer: Some("00e1"),
                ..Default::default()
            }
        )
    );
    // moto finishes each job at once: the job found has run, so this launch is already done.
    let again = launcher.launch(request).await;
    assert!(
        matches!(again, Err(s3spot_lambda::LaunchError::AlreadyLaunched)),
        "{again:?}"
    );
    assert_eq!(setup.jobs().await.len(), 1);
    // The job commands see it, with its object, through the same launcher.
    let info = launcher.describe(submitted).await.unwrap().unwrap();
    assert_eq!(info.tag("s3spot:key"), Some("in/a.csv"));
    assert_eq!(info.state, "terminated");
    let user_data = launcher.user_data(submitted).await.unwrap();
    assert_eq!(job_from_base64_user_data(&user_data).unwrap(), spec);
}

#[tokio::test]
async fn jobs_list_show_and_cancel_work_on_batch_jobs() {
    let setup = setup().await;
    let handler = setup.handler();
    let event = json!({"Records": [upload("in/a.csv", "e1"), upload("in/b.csv", "e2")]});
    let Ok(Response::Report(report)) = handler.handle(event).await else {
        panic!("the handler failed");
    };
    assert_eq!(report.launched.len(), 2);
    let jobs = Jobs::new(
        setup.config().jobs(),
        setup.launcher(),
        S3Statuses::from_client(setup.s3_client.clone()),
    );
    let clock = Clock::now(jobs.config());
    let listed = jobs.list(clock).await.unwrap();
    let mut keys: Vec<&str> = listed.iter().map(|job| job.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["in/a.csv", "in/b.csv"], "{listed:#?}");
    assert!(listed.iter().all(|job| job.market == "batch"));

    let shown = jobs
        .show(
            &Target::Instance(report.launched[0].instance_id.clone()),
            clock,
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&shown).unwrap()["instances"][0]["key"],
        report.launched[0].key
    );

    // Cancel by object: moto has run the job already, so there is nothing left to stop, and
    // the command says so, naming the job's state. (Cancelling a queued job is tested against
    // the Batch double, whose jobs wait on the queue.)
    let stopped = jobs
        .cancel(
            &Target::Object {
                bucket: Some("data".into()),
                key: "in/b.csv".into(),
            },
            clock,
        )
        .await;
    let Err(s3spot_lambda::JobsError::NothingToCancel { states, .. }) = stopped else {
        panic!("{stopped:?}");
    };
    assert!(states.ends_with("terminated"), "{states}");
    let b = setup
        .jobs()
        .await
        .into_iter()
        .find(|job| JobSpec::decode(&env_of(job)["S3SPOT_JOB"]).unwrap().key == "in/b.csv")
        .unwrap();
    assert_eq!(b.status(), Some(&JobStatus::Succeeded));
}
