//! The SAM template and the launcher agree: the environment `infra/template.yaml` gives the
//! function (resolved by `infra/tests/resolve.py` as a deployed stack would) is accepted by the
//! real configuration, and the handler built from it launches from the launch template on moto.

use std::collections::HashMap;

use s3spot_bootstrap::job_from_user_data;
use s3spot_lambda::{Config, Ec2Launcher, Handler, Response, S3Statuses};
use s3spot_tests::{Moto, REGION, create_launch_template, event};

const SHA256: &str = "5a3c1f0e9b8d7c6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa9988";
const WORKER_KEY: &str = "workers/5a3c1f0e/s3spot-worker";

/// The function's environment from the template, with `params` on top of the defaults.
/// A subnet moto knows (of its default VPC): the fleet request names it, and EC2 checks it.
async fn a_subnet(ec2: &aws_sdk_ec2::Client) -> (String, String) {
    let subnets = ec2
        .describe_subnets()
        .send()
        .await
        .expect("describe subnets");
    let subnet = &subnets.subnets()[0];
    (
        subnet.subnet_id().unwrap().to_owned(),
        subnet.vpc_id().unwrap().to_owned(),
    )
}

fn template_environment(
    template_id: &str,
    (subnet, vpc): &(String, String),
    params: &[&str],
) -> HashMap<String, String> {
    let mut all: Vec<(&str, &str)> = vec![
        ("WorkerKey", WORKER_KEY),
        ("WorkerSha256", SHA256),
        ("VpcId", vpc),
        ("SubnetId", subnet),
    ];
    all.extend(
        params
            .iter()
            .map(|p| p.split_once('=').expect("NAME=VALUE")),
    );
    s3spot_tests::template::resolve(
        &all,
        &[
            ("WorkerLaunchTemplate", template_id),
            ("WorkerLaunchTemplate.LatestVersionNumber", "1"),
            ("ArtifactsBucket", "s3spot-artifacts-x"),
            // The console event's bucket: the stack's data bucket.
            ("DataBucket", "example-bucket"),
        ],
        &[],
    )
    .environment
}

struct Launch {
    instance_type: String,
    market: String,
    lifecycle: Option<String>,
    user_data: String,
    tags: HashMap<String, String>,
}

/// Configures the handler from `environment` exactly as the function does at start-up, and runs
/// the console's test event through it against moto.
async fn launch_with(moto: &Moto, environment: &HashMap<String, String>) -> Launch {
    let sdk = moto.sdk_config().await;
    let mut config = Config::from_lookup(|name| environment.get(name).cloned())
        .unwrap_or_else(|e| panic!("the template's environment is refused: {e}\n{environment:#?}"));
    config.job.region = Some(REGION.into());
    moto.create_buckets(&["example-bucket"]).await;
    let handler = Handler::new(config, Ec2Launcher::new(&sdk), S3Statuses::new(&sdk));
    let report = match handler.handle(event("s3-put.json")).await {
        Ok(Response::Report(report)) => report,
        other => panic!("expected a report, got {other:?}"),
    };
    assert!(report.failed.is_empty(), "{report:?}");
    let [launched] = report.launched.as_slice() else {
        panic!("expected one launch: {report:?}");
    };
    let ec2 = aws_sdk_ec2::Client::new(&sdk);
    let described = ec2
        .describe_instances()
        .instance_ids(&launched.instance_id)
        .send()
        .await
        .expect("describe the instance");
    let instance = described.reservations()[0].instances()[0].clone();
    let user_data = ec2
        .describe_instance_attribute()
        .instance_id(&launched.instance_id)
        .attribute(aws_sdk_ec2::types::InstanceAttributeName::UserData)
        .send()
        .await
        .expect("read user data")
        .user_data()
        .and_then(|u| u.value())
        .map(|encoded| {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .expect("base64 user data");
            String::from_utf8(bytes).expect("UTF-8 user data")
        })
        .expect("the instance has user data");
    Launch {
        instance_type: instance
            .instance_type()
            .map(|t| t.as_str().to_owned())
            .unwrap_or_default(),
        market: launched.market.clone(),
        lifecycle: instance.instance_lifecycle().map(|l| l.as_str().to_owned()),
        user_data,
        tags: instance
            .tags()
            .iter()
            .map(|t| {
                (
                    t.key().unwrap_or_default().to_owned(),
                    t.value().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
    }
}

#[tokio::test]
async fn the_templates_defaults_configure_the_launcher_and_launch_spot_from_the_template() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let template_id = create_launch_template(&ec2, "s3spot-worker").await;
    let environment = template_environment(&template_id, &a_subnet(&ec2).await, &[]);

    let launch = launch_with(&moto, &environment).await;
    // The first of the template's instance types, on the spot market, tagged for the pipeline.
    assert_eq!(launch.instance_type, "m7i.large");
    assert_eq!(launch.market, "spot");
    assert_eq!(launch.lifecycle.as_deref(), Some("spot"));
    assert_eq!(
        launch.tags.get("s3spot:pipeline").map(String::as_str),
        Some("s3spot")
    );
    // The instance fetches the worker from the stack's artifacts bucket, checked by sha256, and
    // writes results where the instance role allows.
    let job = job_from_user_data(&launch.user_data).expect("a JobSpec in the user data");
    assert_eq!(
        job.worker.uri,
        format!("s3://s3spot-artifacts-x/{WORKER_KEY}")
    );
    assert_eq!(job.worker.sha256, SHA256);
    assert_eq!(job.results_prefix, "analysis/");
    assert_eq!(
        job.results_bucket, "example-bucket",
        "results beside the input"
    );
    assert_eq!(job.max_runtime_secs, 3600);
}

#[tokio::test]
async fn the_templates_parameters_reach_the_launcher() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let template_id = create_launch_template(&ec2, "s3spot-worker").await;
    let environment = template_environment(
        &template_id,
        &a_subnet(&ec2).await,
        &[
            "Market=on-demand",
            "InstanceTypes=c6i.large,c5.large",
            "MaxRuntime=900",
            "Command=/opt/tools/analyse --fast",
            "PipelineName=genomics",
        ],
    );

    let launch = launch_with(&moto, &environment).await;
    assert_eq!(launch.instance_type, "c6i.large");
    assert_eq!(launch.market, "on-demand");
    assert_eq!(launch.lifecycle, None);
    assert_eq!(
        launch.tags.get("s3spot:pipeline").map(String::as_str),
        Some("genomics")
    );
    let job = job_from_user_data(&launch.user_data).expect("a JobSpec in the user data");
    assert_eq!(job.max_runtime_secs, 900);
    assert_eq!(job.command.as_deref(), Some("/opt/tools/analyse --fast"));
}

#[tokio::test]
async fn the_templates_fleet_parameters_reach_the_launcher() {
    let subnets = ("subnet-0aaa".to_owned(), "vpc-0bbb".to_owned());
    let environment = template_environment(
        "lt-0123456789abcdef0",
        &subnets,
        &[
            "InstanceRequirements=vcpu=2-8 memory=4GiB- arch=x86_64 exclude=t2.*",
            "SubnetIds=subnet-0aaa,subnet-0ccc",
            "DiskPerObject=2x",
            "RootVolumeSize=20",
            "MaxDiskGiB=4096",
            "MaxWaitMinutes=90",
        ],
    );
    let config = Config::from_lookup(|name| environment.get(name).cloned())
        .unwrap_or_else(|e| panic!("the template's environment is refused: {e}\n{environment:#?}"));
    let launch = config.launch;
    assert!(
        launch.instance_types.is_empty(),
        "types by attributes, not by name"
    );
    let requirements = launch.requirements.expect("requirements");
    assert_eq!(requirements.vcpu.max, Some(8));
    assert_eq!(requirements.excluded, ["t2.*"]);
    assert_eq!(launch.subnets, ["subnet-0aaa", "subnet-0ccc"]);
    assert_eq!(launch.disk.unwrap().to_string(), "2x+20GiB");
    assert_eq!(launch.max_disk_gib, 4096);
    assert_eq!(launch.max_wait, std::time::Duration::from_secs(90 * 60));
    assert_eq!(launch.retry_after, std::time::Duration::from_secs(300));
    assert_eq!(config.job.results_bucket.as_deref(), Some("example-bucket"));

    // Without SubnetIds, the one SubnetId.
    let environment = template_environment("lt-0123456789abcdef0", &subnets, &[]);
    assert_eq!(environment["S3SPOT_SUBNETS"], "subnet-0aaa");
    assert_eq!(
        environment["S3SPOT_DISK"], "3x+16GiB",
        "never below RootVolumeSize"
    );
    let environment = template_environment("lt-0123456789abcdef0", &subnets, &["DiskPerObject="]);
    assert_eq!(
        environment["S3SPOT_DISK"], "",
        "the template's volume alone"
    );
    assert_eq!(
        environment["S3SPOT_INSTANCE_TYPES"],
        "m7i.large,m6i.large,m5.large"
    );
}

/// With `Backend=batch`, the function's environment configures the Batch backend on the stack's
/// queue and job definition, and nothing of EC2's market.
#[test]
fn the_templates_batch_backend_configures_the_launcher_for_its_queue() {
    let mut all: Vec<(&str, &str)> = vec![
        ("WorkerKey", WORKER_KEY),
        ("WorkerSha256", SHA256),
        ("VpcId", "vpc-0123456789abcdef0"),
        ("SubnetId", "subnet-0123456789abcdef0"),
        ("Backend", "batch"),
    ];
    let environment = s3spot_tests::template::resolve(
        &all,
        &[
            ("WorkerLaunchTemplate", "lt-0123456789abcdef0"),
            ("WorkerLaunchTemplate.LatestVersionNumber", "1"),
            ("ArtifactsBucket", "s3spot-artifacts-x"),
            ("DataBucket", "example-bucket"),
            (
                "BatchJobQueue",
                "arn:aws:batch:us-east-1:123456789012:job-queue/s3spot-jobs",
            ),
            (
                "BatchJobDefinition",
                "arn:aws:batch:us-east-1:123456789012:job-definition/s3spot-job:1",
            ),
        ],
        &[],
    )
    .environment;
    let config = Config::from_lookup(|name| environment.get(name).cloned())
        .unwrap_or_else(|e| panic!("the template's environment is refused: {e}\n{environment:#?}"));
    assert_eq!(
        config.backend,
        s3spot_lambda::Backend::Batch(s3spot_lambda::BatchTarget {
            job_queue: "arn:aws:batch:us-east-1:123456789012:job-queue/s3spot-jobs".into(),
            job_definition: "arn:aws:batch:us-east-1:123456789012:job-definition/s3spot-job:1"
                .into(),
        })
    );
    // And the default stack stays on EC2.
    all.pop();
    let environment = s3spot_tests::template::resolve(
        &all,
        &[
            ("WorkerLaunchTemplate", "lt-0123456789abcdef0"),
            ("WorkerLaunchTemplate.LatestVersionNumber", "1"),
            ("ArtifactsBucket", "s3spot-artifacts-x"),
            ("DataBucket", "example-bucket"),
        ],
        &[],
    )
    .environment;
    let config = Config::from_lookup(|name| environment.get(name).cloned()).unwrap();
    assert_eq!(config.backend, s3spot_lambda::Backend::Ec2);
}

/// The job definition's script in the template is the container script as s3spot renders it
/// (`s3spot render --container`), its command only starts it, and the Batch hosts' user data is
/// `infra/batch-host-firewall.sh`: none of them drifts apart from its source.
#[test]
fn the_templates_batch_resources_carry_the_rendered_script_and_the_host_firewall() {
    let output =
        std::process::Command::new(s3spot_tests::workspace_root().join(".venv/bin/python"))
            .current_dir(s3spot_tests::workspace_root())
            .args([
                "-c",
                "import json; from infra.tests.template import source; r = source()['Resources']; \
             print(json.dumps([r['BatchJobDefinition']['Properties']['ContainerProperties'], \
             r['BatchLaunchTemplate']['Properties']['LaunchTemplateData']['UserData']]))",
            ])
            .output()
            .expect("run the template reader");
    assert!(output.status.success(), "{}", s3spot_tests::show(&output));
    let (container, user_data): (serde_json::Value, serde_json::Value) =
        serde_json::from_slice(&output.stdout).unwrap();
    let script = s3spot_bootstrap::render_container_script(None).unwrap();
    let environment = container["Environment"].as_array().unwrap();
    let value = |name: &str| {
        environment
            .iter()
            .find(|pair| pair["Name"] == name)
            .and_then(|pair| pair["Value"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        value("S3SPOT_BOOTSTRAP_SCRIPT") == script,
        "the template's S3SPOT_BOOTSTRAP_SCRIPT differs from `s3spot render --container`; run \
         scripts/sync-batch-command"
    );
    assert_eq!(
        container["Command"],
        serde_json::json!([
            "bash",
            "-c",
            "exec bash -c \"$S3SPOT_BOOTSTRAP_SCRIPT\" s3spot-batch"
        ]),
        "the command, sent with every job's overrides, only starts the script"
    );
    let firewall = std::fs::read_to_string(
        s3spot_tests::workspace_root().join("infra/batch-host-firewall.sh"),
    )
    .unwrap();
    let user_data = user_data["Fn::Base64"].as_str().unwrap();
    assert!(
        user_data.contains(&format!(
            "Content-Type: text/x-shellscript; charset=\"us-ascii\"\n\n{firewall}--==S3SPOT==--"
        )),
        "the Batch hosts' user data is not infra/batch-host-firewall.sh; run \
         scripts/sync-batch-command\n{user_data}"
    );
}
