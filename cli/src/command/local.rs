//! `s3spot local serve | run | fetch` and `s3spot demo`: printing around [`crate::local`].

use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::local::{Finished, Options, Pipeline};
use anyhow::Context as _;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum LocalCommand {
    /// Start the embedded S3 server and the pipeline, and run a job for every upload to the data
    /// bucket until Ctrl-C.
    Serve(ServeArgs),
    /// Upload one file, wait for its job, and print its status.json and results.
    ///
    /// Exits 0 when the job succeeded, 1 when it did not.
    Run(RunArgs),
    /// How local instances download the worker (used by their bootstrap script).
    #[command(hide = true)]
    Fetch { uri: String, dest: PathBuf },
}

#[derive(Args)]
pub struct Shared {
    /// Where the buckets, the instances and their logs are kept.
    #[arg(long, value_name = "DIR", default_value = ".s3spot-local")]
    data_dir: PathBuf,
    /// At most this many local instances run at once; later jobs wait for room.
    #[arg(long, value_name = "N", default_value_t = 4)]
    max_instances: u32,
    /// Progress as one JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    shared: Shared,
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 9190)]
    port: u16,
    /// Processing command for every job; default: S3SPOT_COMMAND, else the built-in analysis.
    #[arg(long)]
    command: Option<String>,
    #[arg(long, default_value = "data")]
    data_bucket: String,
    #[arg(long, default_value = "artifacts")]
    artifacts_bucket: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, default_value = "s3spot")]
    access_key: String,
    /// Default: a random secret of the data directory's own, made on its first start and kept
    /// in DIR/secret-key; serve prints it.
    #[arg(long)]
    secret_key: Option<String>,
    /// The dashboard's port on 127.0.0.1; 0 picks a free one.
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    dashboard_port: u16,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    shared: Shared,
    /// The file to upload.
    file: PathBuf,
    /// Its key in the data bucket; default: in/<file name>.
    #[arg(long)]
    key: Option<String>,
    /// Processing command; default: S3SPOT_COMMAND, else the built-in analysis.
    #[arg(long)]
    command: Option<String>,
}

#[derive(Args)]
pub struct DemoArgs {
    #[command(flatten)]
    shared: Shared,
}

/// The demo's input: a small CSV, bundled so that the demo needs nothing but this program.
const SAMPLE: &[u8] = include_bytes!("../../../events/sample/measurements.csv");
const SAMPLE_KEY: &str = "in/measurements.csv";

pub fn run(command: LocalCommand) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match command {
            LocalCommand::Serve(args) => serve(args).await,
            LocalCommand::Run(args) => {
                let key = match &args.key {
                    Some(key) => key.clone(),
                    None => default_key(&args.file)?,
                };
                one_job(&args.shared, args.command.clone(), &args.file, &key, false).await
            }
            LocalCommand::Fetch { uri, dest } => fetch(&uri, &dest).await.map(|()| true),
        }
    })
}

pub fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let sample = tempfile::Builder::new()
        .prefix("s3spot-demo-")
        .suffix(".csv")
        .tempfile()
        .context("cannot write the demo's sample file")?;
    std::fs::write(sample.path(), SAMPLE).context("cannot write the demo's sample file")?;
    // The demo shows the built-in analysis, whatever S3SPOT_COMMAND says.
    runtime.block_on(one_job(
        &args.shared,
        Some(String::new()),
        sample.path(),
        SAMPLE_KEY,
        true,
    ))
}

fn options(shared: &Shared, command: Option<String>) -> anyhow::Result<Options> {
    let worker =
        std::env::current_exe().context("cannot find this program to publish it as the worker")?;
    let mut options = Options::new(worker);
    options.data_dir = shared.data_dir.clone();
    options.max_instances = shared.max_instances;
    options.command = command;
    Ok(options)
}

fn default_key(file: &Path) -> anyhow::Result<String> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name; give --key", file.display()))?;
    Ok(format!("in/{name}"))
}

/// Prints progress as it comes, until the pipeline goes away.
fn print_progress(pipeline: &Pipeline, json: bool, to_stderr: bool) -> tokio::task::JoinHandle<()> {
    let mut progress = pipeline.subscribe();
    tokio::spawn(async move {
        while let Ok(line) = progress.recv().await {
            let text = if json { line.json() } else { line.human() };
            if to_stderr {
                eprintln!("{text}");
            } else {
                println!("{text}");
                let _ = std::io::stdout().flush();
            }
        }
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<bool> {
    let mut options = options(&args.shared, args.command.clone())?;
    options.port = args.port;
    options.data_bucket = args.data_bucket;
    options.artifacts_bucket = args.artifacts_bucket;
    options.region = args.region;
    options.access_key = args.access_key;
    options.secret_key = args.secret_key;
    let pipeline = Pipeline::start(options).await?;
    let options = pipeline.options();
    let endpoint = pipeline.endpoint();
    // The same page as `s3spot dashboard --local`, through the same control socket.
    let (dashboard, dashboard_task) = crate::dashboard::start(
        args.dashboard_port,
        super::dashboard::local_info(3),
        super::dashboard::local_ask(options.data_dir.clone()),
    )
    .await
    .with_context(|| {
        format!(
            "cannot serve the dashboard on 127.0.0.1:{}",
            args.dashboard_port
        )
    })?;
    if args.shared.json {
        println!(
            "{}",
            serde_json::json!({"ready": {
                "endpoint": endpoint, "region": options.region,
                "access_key": options.access_key, "secret_key": options.secret(),
                "data_bucket": options.data_bucket, "artifacts_bucket": options.artifacts_bucket,
                "data_dir": options.data_dir, "dashboard": dashboard.url(),
                "events": options.data_dir.join(crate::local::EVENTS_FILE),
            }})
        );
    } else {
        let data = &options.data_bucket;
        println!(
            "s3spot local: S3 at {endpoint}, region {}, kept in {}",
            options.region,
            options.data_dir.display()
        );
        println!(
            "  buckets      {data} (every upload starts a job), {} (the worker)",
            options.artifacts_bucket
        );
        println!(
            "  credentials  export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY={} AWS_REGION={}",
            options.access_key,
            options.secret(),
            options.region
        );
        println!("  upload       aws --endpoint-url {endpoint} s3 cp FILE s3://{data}/in/FILE");
        println!("               s5cmd --endpoint-url {endpoint} cp FILE s3://{data}/in/FILE");
        println!(
            "  results      aws --endpoint-url {endpoint} s3 ls --recursive s3://{data}/analysis/"
        );
        println!("  dashboard    {}", dashboard.url());
        println!(
            "  events       {}",
            options.data_dir.join(crate::local::EVENTS_FILE).display()
        );
        println!("Waiting for uploads; Ctrl-C stops.");
    }
    let printer = print_progress(&pipeline, args.shared.json, false);
    wait_for_stop_signal().await;
    eprintln!("s3spot local: stopping; running jobs upload what they have");
    dashboard_task.abort();
    pipeline.shutdown().await;
    printer.abort();
    Ok(true)
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn one_job(
    shared: &Shared,
    command: Option<String>,
    file: &Path,
    key: &str,
    show_report: bool,
) -> anyhow::Result<bool> {
    let pipeline = Pipeline::start(options(shared, command)?).await?;
    eprintln!(
        "s3spot local: S3 at {}, kept in {}",
        pipeline.endpoint(),
        pipeline.options().data_dir.display()
    );
    let printer = print_progress(&pipeline, shared.json, true);
    let finished = pipeline.run_one(file, key).await;
    // Let the last progress lines out before the results.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    printer.abort();
    let finished = match finished {
        Ok(finished) => finished,
        Err(error) => {
            pipeline.shutdown().await;
            return Err(error.into());
        }
    };
    let report = if show_report {
        std::fs::read_to_string(finished.local_dir.join(s3spot_bootstrap::REPORT_FILE)).ok()
    } else {
        None
    };
    print_finished(&finished, report.as_deref(), shared.json)?;
    pipeline.shutdown().await;
    Ok(finished.succeeded())
}

fn print_finished(finished: &Finished, report: Option<&str>, json: bool) -> anyhow::Result<()> {
    let results: Vec<String> = finished
        .status
        .iter()
        .flat_map(|s| s.outputs.iter().cloned())
        .collect();
    if json {
        let report: Option<serde_json::Value> = report.and_then(|r| serde_json::from_str(r).ok());
        println!(
            "{}",
            serde_json::json!({
                "status": finished.status,
                "results": results,
                "results_prefix": format!("s3://{}/{}", finished.results_bucket, finished.results_prefix),
                "local_dir": finished.local_dir,
                "report": report,
            })
        );
        return Ok(());
    }
    match &finished.status {
        Some(status) => {
            println!("status.json:\n{}", serde_json::to_string_pretty(status)?);
        }
        None => println!("no status.json: {}", finished.last.human()),
    }
    if let Some(report) = report {
        println!("report.json:\n{}", report.trim_end());
    }
    println!(
        "results in s3://{}/{}:",
        finished.results_bucket, finished.results_prefix
    );
    for key in &results {
        println!("  {key}");
    }
    println!("on this machine: {}", finished.local_dir.display());
    Ok(())
}

/// Downloads `uri` to `dest` with the endpoint and credentials of the environment.
async fn fetch(uri: &str, dest: &Path) -> anyhow::Result<()> {
    let (bucket, key) =
        s3spot_lambda::config::parse_s3_uri(uri).map_err(|e| anyhow::anyhow!("{uri:?}: {e}"))?;
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .build(),
    );
    let object = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(&e)))
        .with_context(|| format!("cannot get {uri}"))?;
    let mut file = tokio::fs::File::create(dest)
        .await
        .with_context(|| format!("cannot create {}", dest.display()))?;
    let mut body = object.body.into_async_read();
    tokio::io::copy(&mut body, &mut file)
        .await
        .with_context(|| format!("cannot download {uri} to {}", dest.display()))?;
    Ok(())
}
