//! Running the operator's command on the downloaded object.

use std::future::Future;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// How long the logs may keep flowing after the command has ended.
const LOG_DRAIN: Duration = Duration::from_secs(5);

/// Why a command was stopped before it finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    TimedOut,
    Interrupted(String),
}

#[derive(Debug)]
pub struct CommandRun {
    pub status: ExitStatus,
    /// Set when the command was stopped rather than left to finish.
    pub stopped: Option<Stop>,
}

/// The job's values, as the command sees them: environment variables only. The command text is
/// the operator's and is never altered, so an uploader's key cannot become code.
pub struct CommandEnv<'a> {
    pub input: &'a Path,
    pub output_dir: &'a Path,
    pub bucket: &'a str,
    pub key: &'a str,
    pub version_id: Option<&'a str>,
}

/// Runs `sh -c <command>` in `work_dir`, in a process group of its own, with stdout and stderr
/// copied to the two log files and echoed to the worker's own. When `stop` completes first, the
/// group gets SIGTERM, then SIGKILL after `kill_grace`.
pub async fn run_command(
    command: &str,
    env: &CommandEnv<'_>,
    work_dir: &Path,
    logs: (&Path, &Path),
    stop: impl Future<Output = Stop>,
    kill_grace: Duration,
) -> std::io::Result<CommandRun> {
    let stdout_log = tokio::fs::File::create(logs.0).await?;
    let stderr_log = tokio::fs::File::create(logs.1).await?;
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(work_dir)
        .env("S3SPOT_INPUT", env.input)
        .env("S3SPOT_OUTPUT_DIR", env.output_dir)
        .env("S3SPOT_BUCKET", env.bucket)
        .env("S3SPOT_KEY", env.key)
        .env("S3SPOT_VERSION_ID", env.version_id.unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let group = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let copies = tokio::spawn(async move {
        let (out, err) = tokio::join!(
            tee(stdout, stdout_log, tokio::io::stdout()),
            tee(stderr, stderr_log, tokio::io::stderr())
        );
        out.and(err)
    });

    let (status, stopped) = tokio::select! {
        status = child.wait() => (status?, None),
        reason = stop => {
            tracing::warn!(?reason, "stopping the command");
            signal(group, Signal::SIGTERM);
            let status = match tokio::time::timeout(kill_grace, child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    tracing::warn!(grace = ?kill_grace, "the command ignored SIGTERM; killing it");
                    signal(group, Signal::SIGKILL);
                    child.wait().await?
                }
            };
            (status, Some(reason))
        }
    };
    // Whatever the shell left behind in its group would hold the log pipes open and outlive the
    // job: it goes too.
    signal(group, Signal::SIGKILL);
    // A process that left the group (setsid) could keep the pipes open forever; the logs then
    // end here.
    match tokio::time::timeout(LOG_DRAIN, copies).await {
        Ok(copied) => copied.expect("the log copies do not panic")?,
        Err(_) => {
            tracing::warn!("a process outside the command's group holds its output open; logs cut")
        }
    }
    Ok(CommandRun { status, stopped })
}

fn signal(group: Option<Pid>, signal: Signal) {
    if let Some(group) = group
        && let Err(error) = killpg(group, signal)
        && error != nix::errno::Errno::ESRCH
    {
        tracing::warn!(%error, ?signal, "cannot signal the command's process group");
    }
}

/// Copies `from` to a log file and echoes it, in fixed-size pieces.
async fn tee(
    mut from: impl AsyncRead + Unpin,
    mut log: tokio::fs::File,
    mut echo: impl AsyncWrite + Unpin,
) -> std::io::Result<()> {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        log.write_all(&buffer[..n]).await?;
        // The echo is a courtesy for the console log; a closed console must not fail the job.
        let _ = echo.write_all(&buffer[..n]).await;
    }
    log.flush().await?;
    let _ = echo.flush().await;
    Ok(())
}
