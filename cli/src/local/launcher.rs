//! [`Launcher`] on this machine: each "instance" is bash running the rendered user-data in a
//! directory of its own, with the local endpoint and credentials in its environment.
//!
//! EC2's bookkeeping is kept too, on disk beside each instance, so that it outlives the pipeline
//! as EC2's outlives a Lambda: tags, states and their reasons, and `ClientToken` idempotency
//! (the same token and request give the same instance, a different request is a mismatch, and a
//! terminated one is reported as such). Like EC2, the launcher lists a terminated instance for
//! an hour. An instance that was running when its pipeline died is ended when the next one
//! starts on the same data directory, with that reason.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use s3spot_bootstrap::{JobSpec, Stage, Status, job_from_user_data};
use s3spot_lambda::launcher::{TAG_BUCKET, TAG_JOB, TAG_KEY, TAG_PIPELINE};
use s3spot_lambda::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PriceQuery, SpotPrice,
    StateReason,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::broadcast;

use super::progress::Progress;

/// How long a terminated instance stays listed, as EC2 lists one for about an hour.
const LISTED_AFTER_TERMINATION: i64 = 3600;

/// Where every local instance is.
const LOCAL_ZONE: &str = "local";

/// The file beside each instance that keeps its bookkeeping.
const RECORD_FILE: &str = "instance.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Running,
    /// Told to terminate; its script is still finishing.
    ShuttingDown,
    Terminated,
}

/// What the launcher knows of one instance; [`Record`] is what of it is kept on disk.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub state: InstanceState,
    pub tags: Vec<(String, String)>,
    pub client_token: String,
    pub dir: PathBuf,
    /// The job's exact key and where its results and status go, from the user-data.
    pub bucket: String,
    pub key: String,
    pub results_bucket: String,
    /// `<results prefix><key>/<upload>/`.
    pub results_prefix: String,
    status_path: PathBuf,
    /// For progress lines; since the launch, or since this pipeline found the instance.
    launched_at: Instant,
    record: Record,
    session: Option<Pid>,
}

/// An instance's bookkeeping, as kept on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    id: String,
    state: InstanceState,
    tags: Vec<(String, String)>,
    client_token: String,
    /// What makes a later request with the same token the same request.
    fingerprint: String,
    /// The market the request asked for.
    market: String,
    /// Seconds since the Unix epoch.
    launched_unix: i64,
    terminated_unix: Option<i64>,
    state_reason: Option<StateReason>,
    /// The script's session (its pid: it leads it), while it may run. Everything an instance
    /// runs is in it, the command's own process group too.
    session: Option<i32>,
}

impl Instance {
    /// As EC2 would describe it.
    pub fn info(&self) -> InstanceInfo {
        InstanceInfo {
            instance_id: self.id.clone(),
            state: match self.state {
                InstanceState::Running => "running",
                InstanceState::ShuttingDown => "shutting-down",
                InstanceState::Terminated => "terminated",
            }
            .into(),
            instance_type: Some("local".into()),
            market: self.record.market.clone(),
            launched_at: Some(self.record.launched_unix),
            tags: self.tags.clone(),
            state_reason: self.record.state_reason.clone(),
        }
    }

    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn from_record(record: Record, dir: PathBuf, job: &JobSpec, s3_root: &Path) -> Instance {
        Instance {
            id: record.id.clone(),
            state: record.state,
            tags: record.tags.clone(),
            client_token: record.client_token.clone(),
            dir,
            bucket: job.bucket.clone(),
            key: job.key.clone(),
            results_bucket: job.results_bucket.clone(),
            results_prefix: job.results_key_prefix(),
            status_path: s3_root
                .join(&job.results_bucket)
                .join(s3s_fs::key_path(&job.status_key())),
            launched_at: Instant::now(),
            session: record.session.map(Pid::from_raw),
            record,
        }
    }

    /// Ends the bookkeeping of the instance: terminated, for `reason`.
    fn terminated(&mut self, code: &str, message: &str) {
        self.state = InstanceState::Terminated;
        self.record.state = InstanceState::Terminated;
        self.record.terminated_unix = Some(unix_now());
        self.record.state_reason = Some(StateReason {
            code: code.into(),
            message: message.into(),
        });
        self.record.session = None;
        self.session = None;
    }

    /// Writes the bookkeeping beside the instance, whole or not at all.
    fn save(&mut self) -> std::io::Result<()> {
        self.record.state = self.state;
        let json = serde_json::to_vec_pretty(&self.record).expect("a record serialises");
        let partial = self.dir.join(format!("{RECORD_FILE}.partial"));
        std::fs::write(&partial, json)?;
        std::fs::rename(partial, self.dir.join(RECORD_FILE))
    }

    /// Listed as EC2 lists: not terminated, or terminated within the last hour.
    fn listed(&self, now: i64) -> bool {
        self.record
            .terminated_unix
            .is_none_or(|at| now - at < LISTED_AFTER_TERMINATION)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[derive(Default)]
struct Table {
    next: u64,
    instances: BTreeMap<String, Instance>,
    /// Token -> (request fingerprint, instance id).
    tokens: HashMap<String, (String, String)>,
    most_running: usize,
}

impl Table {
    fn running(&self, pipeline: &str) -> usize {
        self.instances
            .values()
            .filter(|i| i.state == InstanceState::Running && i.tag(TAG_PIPELINE) == Some(pipeline))
            .count()
    }

    fn running_any(&self) -> bool {
        self.instances
            .values()
            .any(|i| i.state != InstanceState::Terminated)
    }
}

pub struct LocalLauncher {
    table: Arc<Mutex<Table>>,
    instances_dir: PathBuf,
    /// Where the S3 server keeps objects: status.json is read from there.
    s3_root: PathBuf,
    /// The environment of every instance, besides its own paths.
    env: Vec<(String, String)>,
    progress: broadcast::Sender<Progress>,
}

impl LocalLauncher {
    /// A launcher over `instances_dir`, with the instances an earlier pipeline left there. Any
    /// that was still running when that pipeline died is ended now, processes and all, and
    /// recorded as terminated with that reason: nothing is left "running" that runs no more.
    pub fn new(
        instances_dir: PathBuf,
        s3_root: PathBuf,
        env: Vec<(String, String)>,
        progress: broadcast::Sender<Progress>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&instances_dir)?;
        let mut table = Table::default();
        for entry in std::fs::read_dir(&instances_dir)? {
            let entry = entry?;
            let Some(number) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.strip_prefix("i-local-")?.parse::<u64>().ok())
            else {
                continue;
            };
            // Ids continue from the earlier runs, whatever became of those instances.
            table.next = table.next.max(number);
            let dir = entry.path();
            let Some(mut instance) = load(&dir, &s3_root) else {
                continue;
            };
            if instance.state != InstanceState::Terminated {
                end_orphan(&instance);
                instance.terminated(
                    "Server.LocalServeStopped",
                    "s3spot local serve stopped while the instance ran; the next serve on the \
                     same data directory ended what was left of it",
                );
                instance.save()?;
            }
            table.tokens.insert(
                instance.client_token.clone(),
                (instance.record.fingerprint.clone(), instance.id.clone()),
            );
            table.instances.insert(instance.id.clone(), instance);
        }
        Ok(LocalLauncher {
            table: Arc::new(Mutex::new(table)),
            instances_dir,
            s3_root,
            env,
            progress,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .expect("no panics while holding the table")
    }

    /// Every instance this launcher knows of, listed or not, oldest first.
    pub fn instances(&self) -> Vec<Instance> {
        self.table().instances.values().cloned().collect()
    }

    /// The most instances that ever ran at once.
    pub fn most_running(&self) -> usize {
        self.table().most_running
    }

    /// Stops every running instance: SIGTERM to its script, which passes it on to the worker
    /// (the worker then uploads what it has and its status), and SIGKILL for what is left after
    /// `grace`. Only the script gets the TERM: its log pipe must live until it has shut down.
    pub async fn stop_all(&self, grace: Duration) {
        let groups: Vec<Pid> = self
            .table()
            .instances
            .values()
            .filter(|i| i.state != InstanceState::Terminated)
            .filter_map(|i| i.session)
            .collect();
        for group in &groups {
            // The script leads its group: its pid is the group's id.
            let _ = nix::sys::signal::kill(*group, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && self.table().running_any() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for group in &groups {
            kill_session(*group, None);
        }
    }

    /// How long a terminated instance's script has to shut down (its worker uploads what it
    /// has) before it is killed, as EC2 gives an instance time to shut down.
    const TERMINATE_GRACE: Duration = Duration::from_secs(20);

    fn start(
        &self,
        id: &str,
        request: &LaunchRequest,
        fingerprint: String,
    ) -> Result<Instance, LaunchError> {
        let failed = |what: &str, error: &dyn std::fmt::Display| LaunchError::Api {
            operation: "RunInstances",
            message: format!("local instance {id}: {what}: {error}"),
            retryable: false,
        };
        let script = BASE64
            .decode(&request.user_data)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| failed("user-data", &"not base64 of UTF-8 text"))?;
        let job = job_from_user_data(&script).map_err(|e| failed("user-data", &e))?;
        let dir = self.instances_dir.join(id);
        std::fs::create_dir_all(dir.join("work")).map_err(|e| failed("directory", &e))?;
        let user_data = dir.join("user-data.sh");
        std::fs::write(&user_data, &script).map_err(|e| failed("user-data", &e))?;

        let quote = |path: &Path| {
            shlex::try_quote(&path.to_string_lossy())
                .map(|q| q.into_owned())
                .unwrap_or_default()
        };
        // A session of its own (util-linux's setsid execs the script in it): everything the
        // instance runs, the command's own process group included, can be found and ended by it.
        let mut command = tokio::process::Command::new("setsid");
        command
            .arg("--wait")
            .arg("bash")
            .arg(&user_data)
            .current_dir(&dir)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("S3SPOT_HOME", dir.join("home"))
            .env("S3SPOT_LOG", dir.join("s3spot.log"))
            .env("S3SPOT_WORK_DIR", dir.join("work"))
            // A local instance is the person's own machine: the command runs as they do.
            .env("S3SPOT_RUN_AS", "")
            // "Powering off" a local instance: its script exits right after this.
            .env(
                "S3SPOT_SHUTDOWN_COMMAND",
                format!(": > {}", quote(&dir.join("shutdown"))),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in ["PATH", "HOME", "LANG", "TMPDIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let mut child = command
            .spawn()
            .map_err(|e| failed("setsid bash (util-linux and bash are needed)", &e))?;
        let session = child.id().and_then(|pid| i32::try_from(pid).ok());

        let record = Record {
            id: id.to_owned(),
            state: InstanceState::Running,
            tags: request.tags.clone(),
            client_token: request.client_token.clone(),
            fingerprint,
            market: request.market.to_string(),
            launched_unix: unix_now(),
            terminated_unix: None,
            state_reason: None,
            session,
        };
        let mut instance = Instance::from_record(record, dir.clone(), &job, &self.s3_root);
        instance.save().map_err(|e| failed("bookkeeping", &e))?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let watched = instance.clone();
        let table = Arc::clone(&self.table);
        let progress = self.progress.clone();
        tokio::spawn(async move {
            let console = dir.join("console.log");
            let (out, err) = tokio::join!(
                follow(stdout, &console, &watched, &progress),
                follow(stderr, &console, &watched, &progress)
            );
            if let Err(error) = out.and(err) {
                tracing::warn!(instance = watched.id, %error, "cannot keep the console log");
            }
            let _ = child.wait().await;
            let shut_down = dir.join("shutdown").exists();
            let state = std::fs::read(&watched.status_path)
                .ok()
                .and_then(|json| serde_json::from_slice::<Status>(&json).ok())
                .map(|status| status.state);
            if let Ok(mut table) = table.lock()
                && let Some(instance) = table.instances.get_mut(&watched.id)
            {
                let (code, message) = match instance.state {
                    InstanceState::ShuttingDown => (
                        "Client.UserInitiatedShutdown",
                        "Client.UserInitiatedShutdown: User initiated shutdown",
                    ),
                    _ if shut_down => (
                        "Client.InstanceInitiatedShutdown",
                        "Client.InstanceInitiatedShutdown: Instance initiated shutdown",
                    ),
                    _ => (
                        "Server.InternalError",
                        "the instance's script ended without shutting down",
                    ),
                };
                instance.terminated(code, message);
                if let Err(error) = instance.save() {
                    tracing::warn!(instance = watched.id, %error, "cannot keep the instance's record");
                }
            }
            let _ = progress.send(Progress::Shutdown {
                instance_id: watched.id.clone(),
                key: watched.key.clone(),
                ms: millis(watched.launched_at.elapsed()),
                state,
                shut_down,
            });
        });
        Ok(instance)
    }
}

/// The instance an earlier pipeline left in `dir`, if it left one.
fn load(dir: &Path, s3_root: &Path) -> Option<Instance> {
    let read = || -> Result<Instance, String> {
        let record: Record = serde_json::from_slice(
            &std::fs::read(dir.join(RECORD_FILE)).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let script =
            std::fs::read_to_string(dir.join("user-data.sh")).map_err(|e| e.to_string())?;
        let job = job_from_user_data(&script).map_err(|e| e.to_string())?;
        Ok(Instance::from_record(
            record,
            dir.to_path_buf(),
            &job,
            s3_root,
        ))
    };
    match read() {
        Ok(instance) => Some(instance),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), error, "not an instance this pipeline can read; left alone");
            None
        }
    }
}

/// Ends what is left of an instance whose pipeline died: its whole session (its script, its
/// worker, and the command, which runs in a process group of its own), when the session's
/// leader is still this instance's script (it runs in the instance's directory: a process id
/// may have been reused since). With the leader gone, only the session's processes still
/// working in the instance's directory are ended.
fn end_orphan(instance: &Instance) {
    let Some(session) = instance.session else {
        return;
    };
    let leader_is_ours =
        std::fs::read_link(format!("/proc/{session}/cwd")).is_ok_and(|cwd| cwd == instance.dir);
    tracing::warn!(
        instance = instance.id,
        "ending an instance whose pipeline died"
    );
    kill_session(session, (!leader_is_ours).then_some(instance.dir.as_path()));
}

/// SIGKILL to every process of `session`, or only to those working under `inside`.
fn kill_session(session: Pid, inside: Option<&Path>) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
            .map(Pid::from_raw)
        else {
            continue;
        };
        if session_of(pid) != Some(session) {
            continue;
        }
        if let Some(dir) = inside
            && !std::fs::read_link(entry.path().join("cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        {
            continue;
        }
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
}

/// A process's session, from `/proc/<pid>/stat` (the fourth field after the command name in
/// parentheses, which may hold anything).
fn session_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let session = after_name.split_whitespace().nth(3)?.parse().ok()?;
    Some(Pid::from_raw(session))
}

/// Copies an instance's output to its console log and turns the worker's stage lines into
/// progress.
async fn follow(
    from: impl tokio::io::AsyncRead + Unpin,
    console: &Path,
    instance: &Instance,
    progress: &broadcast::Sender<Progress>,
) -> std::io::Result<()> {
    let mut log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
        .await?;
    let mut lines = BufReader::new(from).lines();
    while let Some(line) = lines.next_line().await? {
        log.write_all(line.as_bytes()).await?;
        log.write_all(b"\n").await?;
        if let Some(stage) = stage_event(&line, instance) {
            let _ = progress.send(stage);
        }
    }
    log.flush().await
}

fn stage_event(line: &str, instance: &Instance) -> Option<Progress> {
    let stage = Stage::from_line(line)?;
    let (instance_id, key) = (instance.id.clone(), instance.key.clone());
    Some(match stage {
        Stage::Download { ms, .. } => Progress::Download {
            instance_id,
            key,
            ms,
        },
        Stage::Process { ms, exit_code } => Progress::Process {
            instance_id,
            key,
            ms,
            exit_code,
        },
        Stage::Upload { ms, .. } => Progress::Upload {
            instance_id,
            key,
            ms,
        },
    })
}

/// What makes two requests with the same token the same request.
fn fingerprint(request: &LaunchRequest) -> String {
    let parts = serde_json::json!([
        format!("{:?}", request.template),
        request.template_version,
        request.market,
        request.pools,
        request.requirements.as_ref().map(ToString::to_string),
        request.volume_gib,
        request.user_data,
        request.tags,
    ]);
    hex::encode(Sha256::digest(parts.to_string()))
}

impl Launcher for LocalLauncher {
    async fn count_active(&self, pipeline: &str, _enough: usize) -> Result<usize, LaunchError> {
        Ok(self.table().running(pipeline))
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Launched, LaunchError> {
        let fingerprint = fingerprint(request);
        let mut table = self.table();
        if let Some((seen, id)) = table.tokens.get(&request.client_token) {
            if *seen != fingerprint {
                return Err(LaunchError::ParameterMismatch {
                    message: format!("ClientToken {} was used for {id}", request.client_token),
                });
            }
            let instance = &table.instances[id];
            if instance.state == InstanceState::Terminated {
                return Err(LaunchError::AlreadyLaunched);
            }
            return Ok(Launched {
                instance_id: id.clone(),
                instance_type: Some("local".into()),
                placement: Some(LOCAL_ZONE.into()),
            });
        }
        table.next += 1;
        let id = format!("i-local-{:06}", table.next);
        let instance = self.start(&id, request, fingerprint.clone())?;
        tracing::info!(instance = id, bucket = ?instance.tag(TAG_BUCKET), key = ?instance.tag(TAG_KEY), "local instance started");
        table
            .tokens
            .insert(request.client_token.clone(), (fingerprint, id.clone()));
        table.instances.insert(id.clone(), instance);
        let running = table
            .instances
            .values()
            .filter(|i| i.state == InstanceState::Running)
            .count();
        table.most_running = table.most_running.max(running);
        Ok(Launched {
            instance_id: id,
            instance_type: Some("local".into()),
            placement: Some(LOCAL_ZONE.into()),
        })
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, LaunchError> {
        let now = unix_now();
        Ok(self
            .table()
            .instances
            .get(instance_id)
            .filter(|i| i.listed(now))
            .map(Instance::info))
    }

    async fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, LaunchError> {
        let now = unix_now();
        Ok(self
            .table()
            .instances
            .values()
            .filter(|i| i.listed(now))
            .filter(|i| i.tag(TAG_PIPELINE) == Some(pipeline))
            .filter(|i| job.is_none() || i.tag(TAG_JOB) == job)
            .map(Instance::info)
            .collect())
    }

    /// SIGTERM to each running instance's script, as a shutdown sends it, and SIGKILL to what
    /// is left of it after a grace period.
    async fn terminate(&self, instance_ids: &[String]) -> Result<(), LaunchError> {
        let mut groups = Vec::new();
        {
            let mut table = self.table();
            for id in instance_ids {
                let instance = table
                    .instances
                    .get_mut(id)
                    .ok_or_else(|| LaunchError::Api {
                        operation: "TerminateInstances",
                        message: format!("InvalidInstanceID.NotFound: no local instance {id}"),
                        retryable: false,
                    })?;
                if instance.state == InstanceState::Running {
                    instance.state = InstanceState::ShuttingDown;
                    if let Err(error) = instance.save() {
                        tracing::warn!(instance = id, %error, "cannot keep the instance's record");
                    }
                    groups.extend(instance.session);
                }
            }
        }
        for group in &groups {
            let _ = nix::sys::signal::kill(*group, Signal::SIGTERM);
        }
        if !groups.is_empty() {
            tokio::spawn(async move {
                tokio::time::sleep(Self::TERMINATE_GRACE).await;
                for group in groups {
                    kill_session(group, None);
                }
            });
        }
        Ok(())
    }

    /// There is no spot market on this machine: no prices, so a configured order stands. A
    /// local instance itself costs nothing, and says so, so that its job's cost is $0.
    async fn spot_prices(&self, query: &PriceQuery) -> Result<Vec<SpotPrice>, LaunchError> {
        if query.instance_types != ["local"] {
            return Ok(Vec::new());
        }
        Ok(vec![SpotPrice {
            instance_type: "local".into(),
            availability_zone: LOCAL_ZONE.into(),
            usd_per_hour: 0.0,
            at: unix_now(),
        }])
    }

    async fn console_output(&self, instance_id: &str) -> Result<Option<String>, LaunchError> {
        match std::fs::read(self.instances_dir.join(instance_id).join("console.log")) {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(LaunchError::Api {
                operation: "GetConsoleOutput",
                message: format!("local instance {instance_id}: {error}"),
                retryable: false,
            }),
        }
    }

    async fn user_data(&self, instance_id: &str) -> Result<String, LaunchError> {
        let dir = self.instances_dir.join(instance_id);
        let script = std::fs::read(dir.join("user-data.sh")).map_err(|e| LaunchError::Api {
            operation: "DescribeInstanceAttribute",
            message: format!("local instance {instance_id}: no user-data: {e}"),
            retryable: false,
        })?;
        Ok(BASE64.encode(script))
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
