//! The `s3spot` command line. It lives in the library so that more than one binary can be this
//! program: the `s3spot` binary, and the copy the end-to-end tests build and run.

mod dashboard;
mod doctor;
mod invoke;
mod jobs;
mod local;
mod prices;
mod render;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "s3spot",
    version,
    about = "S3 object in, spot instance out: run and inspect the s3spot pipeline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the Lambda handler in-process on an event, with the same S3SPOT_* and AWS
    /// configuration as the function, and print its response.
    ///
    /// Exits 0 when every record was launched or skipped, 1 when the handler failed or reported
    /// a failed record, 2 when it could not run at all.
    Invoke {
        /// Event JSON file (S3 notification, SQS batch or EventBridge event); - for stdin.
        #[arg(long, value_name = "FILE")]
        event: PathBuf,
    },
    /// Show the user-data script and JobSpec each record of an event would launch with. Calls
    /// nothing in AWS; needs only the job settings (S3SPOT_WORKER_URI, S3SPOT_WORKER_SHA256, ...).
    ///
    /// With --container, print instead the command of an AWS Batch job definition (or of any
    /// container) that runs s3spot jobs: the bootstrap script that takes its job from the
    /// environment. Needs no settings.
    Render {
        /// Event JSON file; - for stdin.
        #[arg(long, value_name = "FILE", required_unless_present = "container")]
        event: Option<PathBuf>,
        /// Print one JSON document instead of the scripts.
        #[arg(long, conflicts_with = "container")]
        json: bool,
        /// Print the container command (S3SPOT_BACKEND=batch's job definition).
        #[arg(long, conflicts_with = "event")]
        container: bool,
    },
    /// The whole pipeline on this machine: an embedded S3 server, the handler, and local
    /// "instances" that run the bootstrap script and the worker. No AWS account needed.
    #[command(subcommand)]
    Local(local::LocalCommand),
    /// Run one job locally on a bundled sample CSV, with the built-in analysis.
    Demo(local::DemoArgs),
    /// The pipeline's jobs: list, show, cancel, retry, reap. In AWS, with the same S3SPOT_*
    /// settings as the function; with --local DIR, in a running `s3spot local serve`.
    ///
    /// Exits 0 when the command did all it was asked, 1 when part of it failed, 2 when it could
    /// not run.
    Jobs(jobs::JobsArgs),
    /// Current spot prices per instance type and availability zone, cheapest first, with the
    /// on-demand price beside them where s3spot knows it.
    Prices(prices::PricesArgs),
    /// Check a deployed stack in your own account, one line per check: the spot
    /// service-linked role, the launch template, the worker artifact, the intake wiring, and
    /// whether the launcher's role may make the function's launch requests (a DryRun, or IAM's
    /// policy simulator).
    ///
    /// Exits 0 only when every check passed, 1 when one failed.
    Doctor(doctor::DoctorArgs),
    /// A web page of the pipeline's jobs (state, instance, duration, cost), each job's status
    /// and logs, and a chart of jobs and cost by day, served on 127.0.0.1 with your own AWS
    /// credentials (or a local pipeline's, with --local DIR). Prints its address, with a token
    /// that each run makes anew. Ctrl-C stops it.
    Dashboard(dashboard::DashboardArgs),
}

/// The run produced an answer, but not a clean one.
const EXIT_FAILED: u8 = 1;
/// Nothing could be run: bad arguments, configuration or input.
const EXIT_ERROR: u8 = 2;

/// Runs the `s3spot` command with the process's arguments.
pub fn main() -> ExitCode {
    // Local instances download this program as their worker and run it under that name.
    if invoked_as_worker() {
        return s3spot_worker::cli::main();
    }
    let cli = Cli::parse();
    // `invoke` shows the handler's decisions as it logs them; the local commands print progress
    // lines of their own instead.
    let default_filter = match cli.command {
        Command::Invoke { .. } => "warn,s3spot_lambda=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let result = match cli.command {
        Command::Invoke { event } => invoke::run(&event),
        Command::Render {
            event: Some(event),
            json,
            container: false,
        } => render::run(&event, json),
        Command::Render { .. } => render::container(),
        Command::Local(command) => local::run(command),
        Command::Demo(args) => local::demo(args),
        Command::Jobs(args) => jobs::run(args),
        Command::Prices(args) => prices::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Dashboard(args) => dashboard::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILED),
        Err(error) => {
            eprintln!("s3spot: error: {error:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn invoked_as_worker() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|program| Path::new(&program).file_name() == Some("s3spot-worker".as_ref()))
}

/// Reads an event file, or stdin for `-`.
fn read_event(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the event from stdin")?;
        text
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read event file {}", path.display()))?
    };
    serde_json::from_str(&text)
        .with_context(|| format!("event file {} is not valid JSON", path.display()))
}
