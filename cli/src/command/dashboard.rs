//! `s3spot dashboard`: the job commands as a web page on loopback (see [`crate::dashboard`]).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;

use crate::dashboard::{Ask, Info};
use crate::jobs::Request;
use crate::local::control;

#[derive(Args)]
pub struct DashboardArgs {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// The jobs of the `s3spot local serve` that keeps its data in DIR, instead of AWS.
    #[arg(long, value_name = "DIR")]
    local: Option<PathBuf>,
    /// Seconds between the page's refreshes.
    #[arg(long, value_name = "SECONDS", default_value_t = 3)]
    refresh: u64,
}

pub fn run(args: DashboardArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (ask, info) = match args.local {
            Some(dir) => (local_ask(dir), local_info(args.refresh)),
            None => {
                let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
                let config = s3spot_lambda::JobsConfig::from_env().context("bad configuration")?;
                let info = Info {
                    pipeline: config.pipeline,
                    mode: "aws".into(),
                    region: sdk.region().map(ToString::to_string),
                    refresh_secs: args.refresh,
                };
                let ask: Ask = Arc::new(move |request: Request| {
                    let sdk = sdk.clone();
                    Box::pin(async move {
                        super::jobs::in_aws_with(&sdk, &request)
                            .await
                            .map_err(|error| format!("{error:#}"))
                    })
                });
                (ask, info)
            }
        };
        let (dashboard, task) = crate::dashboard::start(args.port, info, ask)
            .await
            .with_context(|| format!("cannot serve the dashboard on 127.0.0.1:{}", args.port))?;
        println!("s3spot dashboard: {}", dashboard.url());
        println!("Open it in your browser; Ctrl-C stops it.");
        let _ = tokio::signal::ctrl_c().await;
        task.abort();
        Ok(true)
    })
}

/// Job commands sent to the local pipeline of `data_dir`, as `s3spot jobs --local` sends them.
pub(super) fn local_ask(data_dir: PathBuf) -> Ask {
    Arc::new(move |request: Request| {
        let data_dir = data_dir.clone();
        Box::pin(async move {
            control::ask(&data_dir, &request)
                .await
                .map_err(|error| format!("{error:#}"))
        })
    })
}

pub(super) fn local_info(refresh_secs: u64) -> Info {
    Info {
        pipeline: crate::local::PIPELINE.into(),
        mode: "local".into(),
        region: None,
        refresh_secs,
    }
}
