//! Running the operator's command on the downloaded object.

use std::future::Future;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::settings::RunAs;

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
    /// Set when processes of the command's user may have survived it: they could change its
    /// outputs while the worker reads them, so none may be read.
    pub survivors: Option<String>,
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

/// The environment variables a command run as another user keeps from the worker's: nothing
/// that could carry a credential.
const KEPT_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ"];

/// Runs `sh -c <command>` in `work_dir`, in a process group of its own, with stdout and stderr
/// copied to the two log files and echoed to the worker's own. When `stop` completes first, the
/// group gets SIGTERM, then SIGKILL after `kill_grace`.
///
/// With `run_as`, the command runs as that user, with no supplementary groups and a minimal
/// environment, and once it has ended every process of that user is killed: nothing it started
/// can change its outputs while they are read, or outlive the job.
pub async fn run_command(
    command: &str,
    env: &CommandEnv<'_>,
    work_dir: &Path,
    logs: (&Path, &Path),
    stop: impl Future<Output = Stop>,
    kill_grace: Duration,
    run_as: Option<&RunAs>,
) -> std::io::Result<CommandRun> {
    let stdout_log = private_file(logs.0).await?;
    let stderr_log = private_file(logs.1).await?;
    let mut command_line = tokio::process::Command::new("sh");
    if let Some(user) = run_as {
        command_line.env_clear();
        for name in KEPT_ENV {
            if let Some(value) = std::env::var_os(name) {
                command_line.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command_line.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }
        // The standard library drops the supplementary groups when root sets a uid.
        command_line
            .uid(user.uid)
            .gid(user.gid)
            .env("HOME", work_dir)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    let mut child = command_line
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

    let waited: std::io::Result<(ExitStatus, Option<Stop>)> = async {
        Ok(tokio::select! {
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
        })
    }
    .await;
    // Whatever the shell left behind in its group would hold the log pipes open and outlive the
    // job: it goes too, however the wait ended.
    signal(group, Signal::SIGKILL);
    let survivors = match run_as {
        Some(user) => end_processes_of(user).await.err().map(|e| e.to_string()),
        None => None,
    };
    let (status, stopped) = waited?;
    // A process that left the group (setsid) could keep the pipes open forever; the logs then
    // end here.
    match tokio::time::timeout(LOG_DRAIN, copies).await {
        Ok(copied) => copied.expect("the log copies do not panic")?,
        Err(_) => {
            tracing::warn!("a process outside the command's group holds its output open; logs cut")
        }
    }
    Ok(CommandRun {
        status,
        stopped,
        survivors,
    })
}

/// Log files only the worker can read: they sit beside the command's directory, not in it.
async fn private_file(path: &Path) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .await
}

/// Runs `program` as `user`, with nothing of the worker's environment and no input or output:
/// the worker's own checks and kills on that user's behalf.
async fn run_as_user(user: &RunAs, program: &str, args: &[&str]) -> std::io::Result<ExitStatus> {
    tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .uid(user.uid)
        .gid(user.gid)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
}

/// The instance metadata service's addresses.
pub const IMDS_ADDRESSES: [&str; 2] = ["169.254.169.254", "fd00:ec2::254"];

/// Whether `user` can open a connection to the instance metadata service: the check that the
/// bootstrap's block still holds (a network manager may remove rules it did not make).
pub async fn reaches_imds(user: &RunAs) -> bool {
    for address in IMDS_ADDRESSES {
        let probe = run_as_user(
            user,
            "timeout",
            &["3", "bash", "-c", &format!("exec 3<>/dev/tcp/{address}/80")],
        )
        .await;
        // A probe that could not run (no `timeout` or `bash` in the image: 126, 127) proves
        // nothing, and counts as a reach: the command runs only where the block is shown.
        match probe {
            Ok(status) if status.success() || matches!(status.code(), Some(126 | 127)) => {
                return true;
            }
            Err(_) => return true,
            Ok(_) => {}
        }
    }
    false
}

/// How long a user's killed processes get to go (a large memory footprint takes time to free)
/// before the worker says they survive.
const KILL_BUDGET: Duration = Duration::from_secs(30);

/// Kills every process of `user`, including those that left the command's process group
/// (`setsid`, a double fork), by sending SIGKILL to -1 as that user, until none is left. An
/// error when some may be left.
pub async fn end_processes_of(user: &RunAs) -> std::io::Result<()> {
    let survive = |why: String| {
        std::io::Error::other(format!(
            "processes of {} may survive ({why}); the command's outputs are not read",
            user.name
        ))
    };
    let started = std::time::Instant::now();
    loop {
        // Always at least once: what /proc shows can lag behind what runs.
        // kill(-1) reaches every process the sender may signal, except itself: run as the user,
        // that is exactly the user's processes.
        let killed = run_as_user(user, "sh", &["-c", "kill -9 -1 2>/dev/null; exit 0"]).await;
        if let Err(error) = killed {
            return Err(survive(format!("cannot kill them: {error}")));
        }
        match live_processes_of(user.uid) {
            Ok(0) => return Ok(()),
            Ok(live) if started.elapsed() > KILL_BUDGET => {
                return Err(survive(format!(
                    "{live} still run {}s after SIGKILL",
                    KILL_BUDGET.as_secs()
                )));
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => return Err(survive(format!("cannot list them: {error}"))),
        }
    }
}

/// The processes of `uid` with a thread that is not a zombie, from `/proc`: a process whose
/// main thread has exited shows as a zombie while its other threads go on.
fn live_processes_of(uid: u32) -> std::io::Result<usize> {
    let numeric = |entry: &std::fs::DirEntry| {
        entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
    };
    let mut live = 0;
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        if !numeric(&entry) {
            continue;
        }
        // A process that ended while this looks is not live.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        // "Uid:\treal\teffective\tsaved\tfs": any of them makes it the user's to signal.
        let owned = field(&status, "Uid:").is_some_and(|ids| {
            ids.split_whitespace()
                .any(|id| id.parse::<u32>().ok() == Some(uid))
        });
        if !owned {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        let running = tasks.filter_map(Result::ok).filter(numeric).any(|task| {
            std::fs::read_to_string(task.path().join("status")).is_ok_and(|status| {
                field(&status, "State:").is_some_and(|state| !state.starts_with('Z'))
            })
        });
        if running {
            live += 1;
        }
    }
    Ok(live)
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(name))
        .map(str::trim)
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
