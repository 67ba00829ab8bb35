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
fn template_environment(template_id: &str, params: &[&str]) -> HashMap<String, String> {
    let mut all: Vec<(&str, &str)> = vec![
        ("WorkerKey", WORKER_KEY),
        ("WorkerSha256", SHA256),
        ("VpcId", "vpc-0123456789abcdef0"),
        ("SubnetId", "subnet-0123456789abcdef0"),
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
    let environment = template_environment(&template_id, &[]);

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
    assert_eq!(job.max_runtime_secs, 3600);
}

#[tokio::test]
async fn the_templates_parameters_reach_the_launcher() {
    let moto = Moto::start();
    let ec2 = aws_sdk_ec2::Client::new(&moto.sdk_config().await);
    let template_id = create_launch_template(&ec2, "s3spot-worker").await;
    let environment = template_environment(
        &template_id,
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
