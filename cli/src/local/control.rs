//! How `s3spot jobs --local DIR` reaches a running local pipeline: a Unix socket in its data
//! directory, readable by its owner alone, carrying one JSON request and one JSON answer per
//! connection. The pipeline runs the request on its own handler, launcher and status store.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use s3spot_lambda::{Handler, S3Statuses};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, broadcast};

use super::{LocalError, LocalLauncher, Progress};
use crate::jobs::{Request, on_handler};

/// The socket's name in the data directory.
pub const SOCKET: &str = "control.sock";

/// A request is a few hundred bytes; this bounds what a confused client can make us buffer.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET)
}

/// Binds the socket, replacing one left by a pipeline that has gone; refuses while another
/// pipeline still answers on it, since two on one data directory would trample each other.
pub async fn listen(data_dir: &Path) -> Result<UnixListener, LocalError> {
    let path = socket_path(data_dir);
    if UnixStream::connect(&path).await.is_ok() {
        return Err(LocalError::InUse {
            data_dir: data_dir.to_path_buf(),
        });
    }
    let failed = |source| LocalError::Dir {
        path: path.clone(),
        source,
    };
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(failed(error)),
    }
    let listener = UnixListener::bind(&path).map_err(failed)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(failed)?;
    Ok(listener)
}

pub type LocalHandler = Handler<Arc<LocalLauncher>, S3Statuses>;

/// Answers requests until the task is dropped.
pub async fn serve(
    listener: UnixListener,
    handler: Arc<LocalHandler>,
    serial: Arc<Mutex<()>>,
    progress: broadcast::Sender<Progress>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (handler, serial, progress) =
            (Arc::clone(&handler), Arc::clone(&serial), progress.clone());
        tokio::spawn(async move {
            if let Err(error) = answer(stream, &handler, &serial, &progress).await {
                tracing::warn!(%error, "control request failed");
            }
        });
    }
}

async fn answer(
    stream: UnixStream,
    handler: &LocalHandler,
    serial: &Mutex<()>,
    progress: &broadcast::Sender<Progress>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST_BYTES))
        .read_line(&mut line)
        .await?;
    let outcome = match serde_json::from_str::<Request>(&line) {
        Err(error) => Err(format!("malformed request: {error}")),
        Ok(request) if request.launches() => {
            let received = Instant::now();
            // One launch at a time, as for uploads: the guard's count stays exact.
            let answer = {
                let _one_at_a_time = serial.lock().await;
                on_handler(handler, &request).await
            };
            if let Ok(report) = &answer
                && let Ok(report) = serde_json::from_value(report.clone())
            {
                super::announce(&report, received, progress, &mut false);
            }
            answer
        }
        Ok(request) => on_handler(handler, &request).await,
    };
    let reply = match outcome {
        Ok(value) => json!({ "ok": value }),
        Err(error) => json!({ "error": error }),
    };
    let mut bytes = serde_json::to_vec(&reply).expect("JSON values serialize");
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

/// Sends `request` to the pipeline of `data_dir` and returns its answer.
pub async fn ask(data_dir: &Path, request: &Request) -> anyhow::Result<Value> {
    let path = socket_path(data_dir);
    let stream = UnixStream::connect(&path).await.with_context(|| {
        format!(
            "no `s3spot local serve` answers on {}: start one with --data-dir {}",
            path.display(),
            data_dir.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut bytes = serde_json::to_vec(request)?;
    bytes.push(b'\n');
    write
        .write_all(&bytes)
        .await
        .context("cannot send the request")?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .context("cannot read the answer")?;
    let mut reply: Value = serde_json::from_str(&line)
        .with_context(|| format!("the local pipeline's answer is not JSON: {line:?}"))?;
    if let Some(error) = reply.get("error").and_then(Value::as_str) {
        anyhow::bail!("{error}");
    }
    Ok(reply["ok"].take())
}
