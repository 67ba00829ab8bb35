//! [`Launcher`] on this machine: each "instance" is bash running the rendered user-data in a
//! directory of its own, with the local endpoint and credentials in its environment.
//!
//! EC2's bookkeeping is kept too: tags, states, and `ClientToken` idempotency (the same token and
//! request give the same instance, a different request is a mismatch, and a terminated one is
//! reported as such), so the handler's guard and retries behave as they do in AWS.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use s3spot_bootstrap::{Stage, Status, job_from_user_data};
use s3spot_lambda::launcher::{TAG_BUCKET, TAG_JOB, TAG_KEY, TAG_PIPELINE};
use s3spot_lambda::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PriceQuery, SpotPrice,
};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::broadcast;

use super::progress::Progress;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    Running,
    /// Told to terminate; its script is still finishing.
    ShuttingDown,
    Terminated,
}

/// What the launcher knows of one instance.
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
    launched_at: Instant,
    /// Seconds since the Unix epoch.
    launched_unix: i64,
    /// The market the request asked for.
    market: String,
    process_group: Option<Pid>,
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
            market: self.market.clone(),
            launched_at: Some(self.launched_unix),
            tags: self.tags.clone(),
            state_reason: None,
        }
    }

    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
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
    pub fn new(
        instances_dir: PathBuf,
        s3_root: PathBuf,
        env: Vec<(String, String)>,
        progress: broadcast::Sender<Progress>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&instances_dir)?;
        // Ids continue from an earlier run in the same data directory.
        let next = std::fs::read_dir(&instances_dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("i-local-")?
                    .parse::<u64>()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        Ok(LocalLauncher {
            table: Arc::new(Mutex::new(Table {
                next,
                ..Table::default()
            })),
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

    /// Every instance launched in this session, oldest first.
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
            .filter_map(|i| i.process_group)
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
            let _ = killpg(*group, Signal::SIGKILL);
        }
    }

    /// How long a terminated instance's script has to shut down (its worker uploads what it
    /// has) before it is killed, as EC2 gives an instance time to shut down.
    const TERMINATE_GRACE: Duration = Duration::from_secs(20);

    fn start(&self, id: &str, request: &LaunchRequest) -> Result<Instance, LaunchError> {
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
        let mut command = tokio::process::Command::new("bash");
        command
            .arg(&user_data)
            .current_dir(&dir)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("S3SPOT_HOME", dir.join("home"))
            .env("S3SPOT_LOG", dir.join("s3spot.log"))
            .env("S3SPOT_WORK_DIR", dir.join("work"))
            // "Powering off" a local instance: its script exits right after this.
            .env(
                "S3SPOT_SHUTDOWN_COMMAND",
                format!(": > {}", quote(&dir.join("shutdown"))),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for name in ["PATH", "HOME", "LANG", "TMPDIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        let mut child = command.spawn().map_err(|e| failed("bash", &e))?;
        let process_group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);

        let instance = Instance {
            id: id.to_owned(),
            state: InstanceState::Running,
            tags: request.tags.clone(),
            client_token: request.client_token.clone(),
            dir: dir.clone(),
            bucket: job.bucket.clone(),
            status_path: self
                .s3_root
                .join(&job.results_bucket)
                .join(job.status_key()),
            results_bucket: job.results_bucket.clone(),
            results_prefix: job.results_key_prefix(),
            key: job.key,
            launched_at: Instant::now(),
            launched_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
            market: request.option.market.to_string(),
            process_group,
        };
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
                instance.state = InstanceState::Terminated;
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

/// Copies an instance's output to its console log and turns the worker's stage events (JSON
/// lines with `fields.stage`) into progress.
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
        request.option.market,
        request.option.instance_type,
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
            });
        }
        table.next += 1;
        let id = format!("i-local-{:06}", table.next);
        let instance = self.start(&id, request)?;
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
        })
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, LaunchError> {
        Ok(self.table().instances.get(instance_id).map(|i| i.info()))
    }

    async fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, LaunchError> {
        Ok(self
            .table()
            .instances
            .values()
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
                    groups.extend(instance.process_group);
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
                    let _ = killpg(group, Signal::SIGKILL);
                }
            });
        }
        Ok(())
    }

    /// There is no spot market on this machine: no prices, so a configured order stands.
    async fn spot_prices(&self, _query: &PriceQuery) -> Result<Vec<SpotPrice>, LaunchError> {
        Ok(Vec::new())
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
