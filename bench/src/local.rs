//! The local pipeline, as `s3spot local serve` runs it: from the end of an upload to the job's
//! `status.json` in the results.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;

use crate::{Options, Table, median, sibling};

const ACCESS_KEY: &str = "s3spot";
const SECRET_KEY: &str = "s3spot-local";

pub async fn run(options: &Options) -> anyhow::Result<Table> {
    let s3spot = sibling("s3spot")?;
    std::fs::create_dir_all(&options.scratch)?;
    let scratch = tempfile::tempdir_in(&options.scratch)?;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let mut serve = Serve(
        Command::new(&s3spot)
            .args(["local", "serve", "--json", "--port", &port.to_string()])
            .arg("--data-dir")
            .arg(scratch.path().join("local"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start s3spot local serve")?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "s3spot local serve did not start listening"
        );
        if let Some(status) = serve.0.try_wait()? {
            anyhow::bail!("s3spot local serve exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            ACCESS_KEY, SECRET_KEY, None, None, "bench",
        ))
        .load()
        .await;
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&config)
            .force_path_style(true)
            .build(),
    );

    let small = std::fs::read("events/sample/measurements.csv")
        .context("read events/sample/measurements.csv (run from the workspace root)")?;
    let mut small_ms = Vec::new();
    for n in 0..options.uploads {
        small_ms.push(upload_to_status(&s3, &format!("in/small-{n}.csv"), small.clone()).await?);
    }
    let large: Vec<u8> = (0..options.large_mib * 1024 * 1024)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut large_ms = Vec::new();
    for n in 0..3 {
        large_ms.push(upload_to_status(&s3, &format!("in/large-{n}.bin"), large.clone()).await?);
    }
    drop(serve);

    let mut table = Table::new(
        "Local pipeline: end of upload to status.json",
        &["file", "median", "min", "max", "target"],
    );
    for (name, values, target) in [
        (
            format!("small ({} bytes, {} uploads)", small.len(), options.uploads),
            &mut small_ms,
            "< 1 s",
        ),
        (
            format!("{} MiB (3 uploads)", options.large_mib),
            &mut large_ms,
            "",
        ),
    ] {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        table.row(vec![
            name,
            format!("{:.0} ms", median(values)),
            format!("{min:.0} ms"),
            format!("{max:.0} ms"),
            target.into(),
        ]);
    }
    Ok(table)
}

/// Uploads `body` as `key` and waits for its status.json; returns the milliseconds between.
async fn upload_to_status(
    s3: &aws_sdk_s3::Client,
    key: &str,
    body: Vec<u8>,
) -> anyhow::Result<f64> {
    s3.put_object()
        .bucket("data")
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .with_context(|| format!("upload {key}"))?;
    let uploaded = Instant::now();
    let status_key = format!("analysis/{key}/status.json");
    let deadline = uploaded + Duration::from_secs(120);
    loop {
        if s3
            .head_object()
            .bucket("data")
            .key(&status_key)
            .send()
            .await
            .is_ok()
        {
            return Ok(uploaded.elapsed().as_secs_f64() * 1e3);
        }
        anyhow::ensure!(Instant::now() < deadline, "no {status_key} after 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        // SIGTERM, so that it stops its instances; then make sure.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
