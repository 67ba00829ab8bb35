//! `s3spot invoke`: the Lambda handler, in-process.

use std::path::Path;

use anyhow::Context as _;
use s3spot_lambda::{AwsLauncher, Config, Handler, HandlerError, Response, S3Statuses};

/// Returns whether every record succeeded.
pub fn run(event: &Path) -> anyhow::Result<bool> {
    let event = super::read_event(event)?;
    let mut config = Config::from_env().context("bad configuration")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        config.job.region = sdk.region().map(ToString::to_string);
        let launcher = AwsLauncher::new(&sdk, &config.backend);
        let handler = Handler::new(config, launcher, S3Statuses::new(&sdk))
            .with_events(s3spot_lambda::events_from_env(&sdk)?);
        let outcome = handler.handle(event).await;
        // A retryable failure still has a report, and it is the useful part.
        let printed = match &outcome {
            Ok(response) => Some(serde_json::to_value(response)?),
            Err(HandlerError::Retryable(report)) => Some(serde_json::to_value(report)?),
            Err(_) => None,
        };
        if let Some(printed) = &printed {
            println!("{}", serde_json::to_string_pretty(printed)?);
        }
        match outcome {
            Ok(Response::Report(report)) => Ok(report.failed.is_empty()),
            Ok(Response::Batch(batch)) => Ok(batch.batch_item_failures.is_empty()),
            Err(error) => {
                eprintln!(
                    "s3spot: the handler failed ({}): {}",
                    error.kind(),
                    s3spot_lambda::error_chain(&error)
                );
                Ok(false)
            }
        }
    })
}
