//! The local pipeline, as `s3spot local serve` runs it: from the end of an upload to the job's
//! `status.json` in the results.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aws_sdk_s3::primitives::ByteStream;

use crate::{Options, Table, median, sibling};

pub async fn run(options: &Options) -> anyhow::Result<Table> {
    let s3spot = sibling("s3spot")?;
    std::fs::create_dir_all(&options.scratch)?;
    let scratch = tempfile::tempdir_in(&options.scratch)?;
    // Port 0: the server picks a free one and names its endpoint in its first JSON line.
    let mut serve = Serve(
        Command::new(&s3spot)
            .args(["local", "serve", "--json", "--port", "0"])
            .arg("--data-dir")
            .arg(scratch.path().join("local"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start s3spot local serve")?,
    );
    let stdout = serve.0.stdout.take().context("serve's stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines
        .next()
        .context("s3spot local serve exited before it was ready")??;
    let ready: serde_json::Value = serde_json::from_str(&first)?;
    let endpoint = ready["ready"]["endpoint"]
        .as_str()
        .with_context(|| format!("no endpoint in {ready}"))?
        .to_owned();
    // Progress lines keep coming; drain them so that the server never blocks on its stdout.
    std::thread::spawn(move || lines.for_each(drop));
    // The pipeline's credentials, as its ready line gives them.
    let mut credentials = s3spot::local::Options::new(PathBuf::new());
    if let Some(key) = ready["ready"]["access_key"].as_str() {
        credentials.access_key = key.to_owned();
    }
    credentials.secret_key = ready["ready"]["secret_key"].as_str().map(str::to_owned);
    let s3 = s3spot::local::client(&endpoint, &credentials).await;

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
    // The upload's own folder under the key's results holds it.
    let key_results = format!("analysis/{key}/");
    let deadline = uploaded + Duration::from_secs(120);
    loop {
        let listed = s3
            .list_objects_v2()
            .bucket("data")
            .prefix(&key_results)
            .send()
            .await
            .with_context(|| format!("list {key_results}"))?;
        if listed
            .contents()
            .iter()
            .any(|o| o.key().is_some_and(|k| k.ends_with("/status.json")))
        {
            return Ok(uploaded.elapsed().as_secs_f64() * 1e3);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no status.json under {key_results} after 120 s"
        );
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
