//! `s3spot doctor`: checks a deployed stack from a person's shell, with their credentials.

use anyhow::Context as _;
use clap::Args;

use crate::doctor::{self, aws::AwsAccount};

#[derive(Args)]
pub struct DoctorArgs {
    /// The stack scripts/deploy deployed (its --stack).
    #[arg(long, value_name = "NAME", default_value = "s3spot")]
    stack: String,
    /// Default: the AWS configuration's region.
    #[arg(long)]
    region: Option<String>,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let lines = runtime.block_on(async {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &args.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        doctor::check(&AwsAccount::new(&sdk), &args.stack).await
    });
    print!("{}", doctor::render(&lines));
    Ok(lines.iter().all(doctor::Line::passed))
}
