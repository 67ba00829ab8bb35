//! How the worker works, as opposed to what it works on (the `JobSpec`).

use std::path::PathBuf;
use std::time::Duration;

const MIB: u64 = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct Settings {
    /// Where each job's fresh work directory is made. `/var/tmp` by default: on Amazon Linux
    /// `/tmp` is a RAM-backed tmpfs, and objects can be large.
    pub work_root: PathBuf,
    /// Between SIGTERM and SIGKILL when a command must stop.
    pub kill_grace: Duration,
    /// How often to ask IMDS for a spot interruption notice while working.
    pub interruption_poll: Duration,
    /// How long outputs keep uploading after SIGTERM or SIGINT, before status.json. The
    /// bootstrap script kills the worker 30 s after its own SIGTERM.
    pub upload_grace: Duration,
    /// When, after it starts, something outside kills the worker: the bootstrap script's hard
    /// limit. `None`: the job's max runtime plus the bootstrap's grace, as the script has it.
    pub hard_limit: Option<Duration>,
    /// The unprivileged user the command runs as, when the worker runs as root. `None`: the
    /// command runs as the worker's own user (local mode, a person's shell).
    pub run_as: Option<RunAs>,
    /// The bootstrap blocked the `run_as` user's way to the instance metadata service: the
    /// command does not run if that user can reach it all the same.
    pub imds_blocked: bool,
    pub download: DownloadSettings,
    pub upload: UploadSettings,
}

#[derive(Debug, Clone, Copy)]
pub struct DownloadSettings {
    /// Objects larger than this are fetched with parallel ranged GETs.
    pub ranged_above: u64,
    pub chunk_size: u64,
    /// Ranged GETs in flight. Ranges stream to disk as they arrive, so neither this nor
    /// `chunk_size` changes the memory a download uses.
    pub concurrency: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct UploadSettings {
    /// Files larger than this are uploaded in parts.
    pub multipart_above: u64,
    pub part_size: u64,
    pub concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            work_root: PathBuf::from("/var/tmp"),
            kill_grace: Duration::from_secs(10),
            interruption_poll: Duration::from_secs(5),
            upload_grace: Duration::from_secs(15),
            hard_limit: None,
            run_as: None,
            imds_blocked: false,
            download: DownloadSettings {
                ranged_above: 64 * MIB,
                // S3 serves one connection at around 100 MB/s; throughput grows with more.
                chunk_size: 8 * MIB,
                concurrency: 8,
            },
            upload: UploadSettings {
                multipart_above: 64 * MIB,
                part_size: 16 * MIB,
                concurrency: 4,
            },
        }
    }
}

/// A user for the command: the object is attacker-chosen, and the command that parses it must
/// not hold the instance's keys. The worker stays root for the S3 I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunAsError {
    #[error(
        "--run-as {0:?}: there is no such user; create it (useradd --system {0}) or leave --run-as out"
    )]
    NoSuchUser(String),
    #[error("--run-as {name:?}: cannot look the user up")]
    Lookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("--run-as {name:?} is uid 0; the command must run as an unprivileged user")]
    Root { name: String },
    #[error(
        "--run-as {name:?}: the worker runs as uid {uid}, and only root can start the command as another user; run the worker as root or leave --run-as out"
    )]
    NotRoot { name: String, uid: u32 },
}

impl RunAs {
    /// Looks `name` up in the user database, for a worker running as root.
    pub fn lookup(name: &str) -> Result<RunAs, RunAsError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|source| RunAsError::Lookup {
                name: name.to_owned(),
                source,
            })?
            .ok_or_else(|| RunAsError::NoSuchUser(name.to_owned()))?;
        if user.uid.is_root() {
            return Err(RunAsError::Root {
                name: name.to_owned(),
            });
        }
        let me = nix::unistd::geteuid();
        if !me.is_root() {
            return Err(RunAsError::NotRoot {
                name: name.to_owned(),
                uid: me.as_raw(),
            });
        }
        Ok(RunAs {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }
}
