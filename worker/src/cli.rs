//! The `s3spot-worker` command line: one job, then the shutdown. It lives in the library so that
//! the `s3spot` binary can act as the worker too (see its `main`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::settings::RunAs;
use crate::{Metadata, Settings, StopSignals, Worker, shut_down};
use anyhow::{Context as _, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use s3spot_bootstrap::{DEFAULT_RESULTS_PREFIX, Events, JobSpec, State, WorkerArtifact};

#[derive(Parser)]
#[command(
    name = "s3spot-worker",
    version,
    about = "Runs one s3spot job: download, process, upload results, shut down"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job, given as --job (what the bootstrap script passes) or as --bucket and --key.
    ///
    /// Exits 0 when the job succeeded, 1 when it failed, timed out or was interrupted, 2 when it
    /// could not start.
    Run(RunArgs),
}

/// The flags that describe a job; with --job they come from the job instead.
const JOB_FLAGS: &[&str] = &[
    "bucket",
    "key",
    "version_id",
    "results_bucket",
    "results_prefix",
    "command",
    "max_runtime",
];

#[derive(Args)]
struct RunArgs {
    /// The job: base64 of its JobSpec JSON, exactly as the bootstrap script passes it. S3SPOT_*
    /// job variables in the environment are then ignored.
    #[arg(long, env = "S3SPOT_JOB", value_name = "BASE64")]
    job: Option<String>,
    /// Input bucket.
    #[arg(long, env = "S3SPOT_BUCKET")]
    bucket: Option<String>,
    /// Input key, as stored (not URL-encoded).
    #[arg(long, env = "S3SPOT_KEY")]
    key: Option<String>,
    /// Input version; default: the latest.
    #[arg(long, env = "S3SPOT_VERSION_ID")]
    version_id: Option<String>,
    /// Where results go; default: the input bucket.
    #[arg(long, env = "S3SPOT_RESULTS_BUCKET")]
    results_bucket: Option<String>,
    /// Results go under <prefix><key>/.
    #[arg(long, env = "S3SPOT_RESULTS_PREFIX", default_value = DEFAULT_RESULTS_PREFIX)]
    results_prefix: String,
    /// Processing command, run with `sh -c`; without one, the built-in analysis writes
    /// report.json. It reads the job from S3SPOT_INPUT, S3SPOT_OUTPUT_DIR, S3SPOT_BUCKET,
    /// S3SPOT_KEY and S3SPOT_VERSION_ID.
    #[arg(long, env = "S3SPOT_COMMAND")]
    command: Option<String>,
    /// Seconds before the job is stopped and marked timed_out.
    #[arg(
        long,
        env = "S3SPOT_MAX_RUNTIME",
        value_name = "SECS",
        default_value_t = 3600
    )]
    max_runtime: u64,
    /// Run with `sh -c` when the job is over.
    #[arg(
        long,
        env = "S3SPOT_SHUTDOWN_COMMAND",
        default_value = "shutdown -h now"
    )]
    shutdown_command: String,
    /// Do not shut down at the end (local runs; the bootstrap script shuts down itself).
    #[arg(long, env = "S3SPOT_NO_SHUTDOWN")]
    no_shutdown: bool,
    /// Where the job's work directory is made.
    #[arg(long, env = "S3SPOT_WORK_DIR", default_value = "/var/tmp")]
    work_dir: PathBuf,
    /// Seconds between SIGTERM and SIGKILL when the command must stop.
    #[arg(
        long,
        env = "S3SPOT_KILL_GRACE",
        value_name = "SECS",
        default_value_t = 10
    )]
    kill_grace: u64,
    /// Seconds the outputs keep uploading after SIGTERM or SIGINT, before status.json is
    /// written. The bootstrap script kills the worker 30 s after its SIGTERM.
    #[arg(
        long,
        env = "S3SPOT_UPLOAD_GRACE",
        value_name = "SECS",
        default_value_t = 15
    )]
    upload_grace: u64,
    /// Seconds after its start at which something outside kills the worker; uploads stop in
    /// time for status.json to be written before then. Default: the max runtime plus the 300 s
    /// the bootstrap script allows.
    #[arg(long, env = "S3SPOT_HARD_LIMIT", value_name = "SECS")]
    hard_limit: Option<u64>,
    /// Run the command as this unprivileged user; the worker itself stays root for the S3 I/O.
    /// Empty: the command runs as the worker's user.
    #[arg(long, env = "S3SPOT_RUN_AS", value_name = "USER")]
    run_as: Option<String>,
    /// The --run-as user's way to the instance metadata service is blocked (the bootstrap sets
    /// it once its rule is in place): the command does not run if that user reaches it anyway.
    #[arg(
        long,
        env = "S3SPOT_IMDS_BLOCKED",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    imds_blocked: bool,
}

/// Parses the process's arguments, runs the job and shuts down: the whole `s3spot-worker`.
pub fn main() -> ExitCode {
    // Held back from the start, and let through once the job's handlers have them (`run`): a
    // stop that comes while the worker starts is then the job's to record, rather than the end
    // of the process with no account. Threads started meanwhile inherit the mask, so the main
    // thread alone takes these signals; processes started later get an empty one.
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&StopSignals::set()),
        None,
    );
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let Command::Run(args) = cli.command;
    let run_matches = matches
        .subcommand_matches("run")
        .expect("run is the only command");
    init_logging();

    let code = match job(&args, run_matches) {
        Ok(job) => match run(job, &args) {
            Ok(State::Succeeded) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("s3spot-worker: error: {error:#}");
                ExitCode::from(2)
            }
        },
        Err(error) => {
            eprintln!("s3spot-worker: error: {error:#}");
            ExitCode::from(2)
        }
    };
    // The one shutdown, on every path that got this far.
    if !args.no_shutdown {
        match shut_down(&args.shutdown_command) {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("s3spot-worker: the shutdown command failed ({status})"),
            Err(error) => eprintln!("s3spot-worker: cannot run the shutdown command: {error}"),
        }
    }
    code
}

fn job(args: &RunArgs, matches: &ArgMatches) -> anyhow::Result<JobSpec> {
    if let Some(encoded) = &args.job {
        let typed: Vec<String> = JOB_FLAGS
            .iter()
            .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(|id| format!("--{}", id.replace('_', "-")))
            .collect();
        if !typed.is_empty() {
            bail!("--job describes the whole job; drop {}", typed.join(", "));
        }
        return JobSpec::decode(encoded).context("--job is not a job from s3spot");
    }
    let (Some(bucket), Some(key)) = (&args.bucket, &args.key) else {
        bail!("give the job: --job BASE64, or --bucket and --key");
    };
    if args.results_prefix.is_empty() || !args.results_prefix.ends_with('/') {
        bail!(
            "--results-prefix {:?} must end with '/', e.g. {DEFAULT_RESULTS_PREFIX:?}",
            args.results_prefix
        );
    }
    if args.max_runtime == 0 {
        bail!("--max-runtime must be at least 1 second");
    }
    Ok(JobSpec {
        bucket: bucket.clone(),
        key: key.clone(),
        version_id: args.version_id.clone(),
        etag: None,
        size: None,
        sequencer: None,
        // A job run by hand belongs to no pipeline; it is named by its object alone, so that
        // running it again replaces its results rather than adding to them.
        job_id: s3spot_bootstrap::job_id(
            "s3spot-worker run",
            bucket,
            key,
            s3spot_bootstrap::UploadIdentity {
                version_id: args.version_id.as_deref(),
                ..Default::default()
            },
        ),
        uploaded_at: None,
        results_bucket: args
            .results_bucket
            .clone()
            .unwrap_or_else(|| bucket.clone()),
        results_prefix: args.results_prefix.clone(),
        command: args.command.clone(),
        max_runtime_secs: args.max_runtime,
        // Only the bootstrap script uses these: it has already fetched this binary.
        worker: WorkerArtifact {
            uri: String::new(),
            sha256: String::new(),
        },
        attempt: 1,
        pipeline: None,
        events_off: false,
    })
}

fn run(job: JobSpec, args: &RunArgs) -> anyhow::Result<State> {
    let run_as = match args.run_as.as_deref() {
        None | Some("") => None,
        Some(name) => Some(RunAs::lookup(name)?),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let status = runtime.block_on(async {
        let signals = StopSignals::take();
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
            Some(&StopSignals::set()),
            None,
        );
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        // A custom endpoint (an S3-compatible server, a local one) seldom has per-bucket DNS.
        let path_style = sdk.endpoint_url().is_some();
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(path_style)
                .build(),
        );
        let worker = Arc::new(Worker {
            s3,
            metadata: Metadata::from_env(),
            // The instance's own setting (the local pipeline's file) first, then the
            // launcher's word in the job.
            events: match std::env::var("S3SPOT_EVENTS").ok() {
                None if job.events_off => Events::off(),
                setting => Events::from_setting(setting.as_deref(), &sdk).unwrap_or_else(|error| {
                    // A bad setting costs the events, never the job.
                    tracing::warn!(error, "no job events");
                    Events::off()
                }),
            },
            settings: Settings {
                work_root: args.work_dir.clone(),
                kill_grace: Duration::from_secs(args.kill_grace),
                upload_grace: Duration::from_secs(args.upload_grace),
                hard_limit: args.hard_limit.map(Duration::from_secs),
                run_as,
                imds_blocked: args.imds_blocked,
                ..Settings::default()
            },
        });
        worker.run_guarded(Arc::new(job), signals).await
    });
    // An analysis abandoned at the deadline may still be reading on a blocking thread; it must
    // not hold back the exit, and with it the shutdown.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Some(error) = &status.error {
        eprintln!("s3spot-worker: {:?}: {error}", status.state);
    }
    Ok(status.state)
}

/// Human-readable logs on stderr; one JSON object per line with `S3SPOT_LOG_FORMAT=json`, for
/// whatever watches the instance (the local pipeline reads the `stage` events).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,s3spot_worker=info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    if std::env::var("S3SPOT_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder.init();
    }
}
