//! `s3spot-lambda`: serves the Lambda Runtime API with the s3spot handler.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use lambda_runtime::{LambdaEvent, service_fn};
use s3spot_lambda::{AwsLauncher, Config, Handler, S3Statuses};
use serde_json::Value;

// One thread: the function handles one event at a time, and Lambda gives a small function a
// fraction of a vCPU. Worker threads would only add wake-ups and hand-offs to each event's CPU.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // JSON when AWS_LAMBDA_LOG_FORMAT=JSON; level from AWS_LAMBDA_LOG_LEVEL or RUST_LOG.
    lambda_runtime::tracing::init_default_subscriber();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("s3spot-lambda: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let mut config = Config::from_env().context("bad configuration")?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    config.job.region = sdk.region().map(ToString::to_string);
    // Embedded Metric Format must be a log line of its own with `_aws` at the top, so it goes
    // to stdout beside the tracing subscriber's lines rather than through it.
    let launcher = AwsLauncher::new(&sdk, &config.backend);
    let handler = Arc::new(
        Handler::new(config, launcher, S3Statuses::new(&sdk))
            .with_events(s3spot_lambda::events_from_env(&sdk)?)
            .with_metrics(Arc::new(|line: &str| println!("{line}"))),
    );
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let handler = Arc::clone(&handler);
        async move { handler.handle(event.payload).await }
    }))
    .await
    .map_err(|error| anyhow::anyhow!(error))
    .context("the Lambda runtime stopped")
}
