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
