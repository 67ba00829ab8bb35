//! One job, start to end: identify, download, process, upload, report. Every path ends with
//! `status.json` uploaded (best effort); shutting down is the caller's last step.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use s3spot_bootstrap::{
    Cost, EventInstance, Events, HARD_LIMIT_GRACE_SECS, JobEvent, JobSpec, JobState, LaunchPrice,
    RECORDS_FOLDER, REPORT_FILE, Recorded, S3Statuses, STATUS_FILE, STDERR_FILE, STDOUT_FILE,
    Stage, State, Status, Writer, changed_state, read_claim, record_change, timestamp,
};
use tokio::sync::watch;

use crate::analysis::analyse;
use crate::download::download;
use crate::instance::Metadata;
use crate::process::{CommandEnv, Stop, run_command};
use crate::settings::{RunAs, Settings};
use crate::upload::{Uploader, files_under};

/// Gives `dirs` to the command's user, and lets that user through `work` to them, but not list
/// or read what else `work` holds.
fn hand_over(work: &Path, dirs: &[&Path], user: &RunAs) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o711))?;
    for dir in dirs {
        std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Names the worker writes itself under the results prefix; a command's files of the same name
/// would be overwritten by them, so they are not uploaded. Nor is anything in a folder named as
/// [`RECORDS_FOLDER`], where the launcher keeps the attempts' claims (and the instance role may
/// not write).
const RESERVED: &[&str] = &[STATUS_FILE, STDOUT_FILE, STDERR_FILE];

/// How long the attempt's claim, and its price, may take to read.
const PRICE_READ: Duration = Duration::from_secs(3);

/// Time kept before the hard limit for writing status.json, at most.
const STATUS_RESERVE: Duration = Duration::from_secs(20);

/// How long status.json may take once the outputs have stopped: within the bootstrap script's
/// 30 s between its SIGTERM and its SIGKILL, after the 15 s of a stop signal's upload grace.
const STATUS_TIME: Duration = Duration::from_secs(10);

/// How long outputs keep uploading after a spot interruption notice: EC2 takes the instance two
/// minutes after it.
const SPOT_UPLOAD_GRACE: Duration = Duration::from_secs(90);

/// When the phases of one job must end.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// The job's max runtime: its command is stopped here.
    runtime: Instant,
    /// Something outside kills the worker here: the bootstrap script's hard limit.
    hard: Instant,
    /// Outputs stop uploading here at the latest, so that status.json is written before
    /// `hard`, however large they are.
    outputs: Instant,
}

impl Limits {
    fn new(started: Instant, job: &JobSpec, settings: &Settings) -> Limits {
        let runtime = Duration::from_secs(job.max_runtime_secs);
        let hard = settings
            .hard_limit
            .unwrap_or(runtime + Duration::from_secs(HARD_LIMIT_GRACE_SECS));
        let reserve = STATUS_RESERVE.min(hard / 4);
        Limits {
            runtime: started + runtime,
            hard: started + hard,
            outputs: started + hard.saturating_sub(reserve),
        }
    }
}

/// A stop from outside: a signal, or EC2's notice that it takes the spot instance back.
#[derive(Debug, Clone)]
struct Interruption {
    why: String,
    /// EC2's spot interruption notice, rather than a signal.
    spot: bool,
    at: Instant,
    /// How long outputs may keep uploading after it.
    upload_grace: Duration,
}

impl Interruption {
    /// When uploads of outputs must stop, given this interruption or none.
    fn outputs_cutoff(this: Option<&Interruption>, limits: &Limits) -> Instant {
        this.map_or(limits.outputs, |i| {
            (i.at + i.upload_grace).min(limits.outputs)
        })
    }
}

pub struct Worker {
    pub s3: aws_sdk_s3::Client,
    pub metadata: Metadata,
    pub settings: Settings,
    /// Where the job's `running` and outcome events go.
    pub events: Events,
}

impl Worker {
    /// Runs `job`, catching a panic anywhere in it: the status still says what happened.
    pub async fn run_guarded(self: Arc<Self>, job: Arc<JobSpec>, signals: StopSignals) -> Status {
        let started = SystemTime::now();
        let worker = Arc::clone(&self);
        let task_job = Arc::clone(&job);
        match catch_panic(async move { worker.run(&task_job, signals).await }).await {
            Ok(status) => status,
            Err(panic) => {
                let mut status = Status::initial(&job, Writer::Worker, started);
                status.error = Some(format!("the worker failed unexpectedly: {panic}"));
                self.finish(&job, &mut status, Instant::now() + STATUS_TIME, None)
                    .await;
                status
            }
        }
    }

    /// Runs `job`; a stop that `signals` receives (from their taking, which may be before this
    /// call) stops it the way an interruption does.
    pub async fn run(&self, job: &JobSpec, signals: StopSignals) -> Status {
        let started = SystemTime::now();
        let limits = Limits::new(Instant::now(), job, &self.settings);
        let (interrupt, interrupted) = watch::channel(None);
        let signals = tokio::spawn(watch_for_signals(
            signals,
            interrupt.clone(),
            self.settings.upload_grace,
        ));
        let mut status = Status::initial(job, Writer::Worker, started);
        status.instance = self.metadata.identify().await;
        tracing::info!(bucket = job.bucket, key = ?job.key, attempt = job.attempt, instance = ?status.instance, "job started");
        let mut running = JobEvent::new(
            pipeline(job),
            job,
            JobState::Running,
            Some(JobState::Launched),
            Writer::Worker,
        );
        running.instance = status.instance.as_ref().map(|i| EventInstance {
            id: i.id.clone(),
            instance_type: i.instance_type.clone(),
            market: i.lifecycle.clone(),
            zone: None,
        });
        // Beside the job, not before it: neither may hold up its command or its watchers.
        let beside = async {
            self.events.emit(running).await;
            // The price is for the cost written at the end.
            self.launch_price(job).await
        };

        let watcher = status.instance.is_some().then(|| {
            tokio::spawn(watch_for_interruption(
                self.metadata.clone(),
                self.settings.interruption_poll,
                interrupt,
            ))
        });
        let stop = || stop_signal(limits.runtime, job.max_runtime_secs, interrupted.clone());
        let cutoff = || outputs_cutoff(limits, interrupted.clone());

        let main = async {
            match tempfile::Builder::new()
                .prefix("s3spot-job-")
                .tempdir_in(&self.settings.work_root)
            {
                Ok(work) => {
                    self.work(job, work.path(), &mut status, stop, cutoff).await;
                }
                Err(error) => {
                    status.error = Some(format!(
                        "cannot create a work directory in {}: {error}",
                        self.settings.work_root.display()
                    ));
                }
            }
        };
        let (price, ()) = tokio::join!(beside, main);
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        signals.abort();
        // status.json goes up before the hard limit, and soon after a stop signal: what killed
        // the worker's uploads would kill it next.
        let cutoff = Interruption::outputs_cutoff(interrupted.borrow().as_ref(), &limits);
        // The launcher launches the next attempt of a job that EC2 is taking back, whichever
        // powers the instance off first: EC2, or the bootstrap once the worker is done.
        status.spot_interruption = status.state == State::Interrupted
            && interrupted.borrow().as_ref().is_some_and(|i| i.spot);
        let by = (cutoff + STATUS_TIME).min(limits.hard);
        self.finish(job, &mut status, by, price).await;
        status
    }

    /// Download, process and upload, recording each step in `status`. `stop` completes when
    /// the job must stop; `cutoff`, when its outputs must stop uploading.
    async fn work<S: Future<Output = Stop>, C: Future<Output = Stop>>(
        &self,
        job: &JobSpec,
        work: &Path,
        status: &mut Status,
        stop: impl Fn() -> S,
        cutoff: impl FnOnce() -> C,
    ) {
        // The command gets a directory of its own, `job/`, its working directory. The input has
        // one inside it: whatever the key's last segment, its file cannot be the output
        // directory. The logs stay outside, where a command run as another user cannot reach.
        let job_dir = work.join("job");
        let output_dir = job_dir.join("output");
        let input_dir = job_dir.join("input");
        let input = input_dir.join(local_name(&job.key));
        for dir in [&job_dir, &output_dir, &input_dir] {
            if let Err(error) = std::fs::create_dir(dir) {
                status.error = Some(format!("cannot create {}: {error}", dir.display()));
                return;
            }
        }
        if let Some(user) = &self.settings.run_as
            && let Err(error) = hand_over(work, &[&job_dir, &output_dir, &input_dir], user)
        {
            status.error = Some(format!(
                "cannot hand the work directory over to {}: {error}",
                user.name
            ));
            return;
        }

        let clock = Instant::now();
        let downloaded = tokio::select! {
            downloaded = download(&self.s3, job, &input, &self.settings.download) => downloaded,
            stopped = stop() => {
                stopped_by(status, &stopped, "while downloading");
                return;
            }
        };
        status.timings.download_ms = elapsed_ms(clock);
        let downloaded = match downloaded {
            Ok(downloaded) => downloaded,
            // No object (or not the right one), no processing: an "analysis" of nothing is worse
            // than none.
            Err(error) => {
                status.error = Some(crate::error_chain(&error));
                return;
            }
        };
        status.input.size = Some(downloaded.size);
        status.input.sha256 = Some(downloaded.sha256.clone());
        status.input.etag = downloaded.etag.clone();
        status.input.version_id = downloaded.version_id.clone();
        tracing::info!(
            ms = status.timings.download_ms,
            size = downloaded.size,
            sha256 = downloaded.sha256,
            "downloaded"
        );
        report_stage(Stage::Download {
            ms: status.timings.download_ms,
            size: downloaded.size,
        });

        let clock = Instant::now();
        let logs = (work.join(STDOUT_FILE), work.join(STDERR_FILE));
        let mut outputs_trusted = true;
        let processed = match &job.command {
            Some(_)
                if self.settings.imds_blocked
                    && let Some(user) = &self.settings.run_as
                    && crate::process::reaches_imds(user).await =>
            {
                status.error = Some(format!(
                    "{} can reach the instance metadata service, which the bootstrap had blocked \
                     (did something remove its rule?); not running the command next to the \
                     instance role's credentials",
                    user.name
                ));
                false
            }
            Some(command) => {
                // The command may rework its input in place (gunzip, say).
                if let Some(user) = &self.settings.run_as
                    && let Err(error) =
                        std::os::unix::fs::chown(&downloaded.path, Some(user.uid), Some(user.gid))
                {
                    status.error = Some(format!(
                        "cannot hand {} over to {}: {error}",
                        downloaded.path.display(),
                        user.name
                    ));
                    return;
                }
                let env = CommandEnv {
                    input: &downloaded.path,
                    output_dir: &output_dir,
                    bucket: &job.bucket,
                    key: &job.key,
                    version_id: downloaded.version_id.as_deref(),
                };
                match run_command(
                    command,
                    &env,
                    &job_dir,
                    (&logs.0, &logs.1),
                    stop(),
                    self.settings.kill_grace,
                    self.settings.run_as.as_ref(),
                )
                .await
                {
                    Ok(run) => {
                        status.exit_code = run.status.code();
                        match run.stopped {
                            Some(stopped) => stopped_by(status, &stopped, "while the command ran"),
                            None if run.status.success() => status.state = State::Succeeded,
                            None => {
                                status.error = Some(match run.status.code() {
                                    Some(code) => format!("the command exited with status {code}"),
                                    None => format!(
                                        "the command was ended by a signal ({})",
                                        run.status
                                    ),
                                });
                            }
                        }
                        if let Some(survivors) = run.survivors {
                            // A live process of the user could swap an output for a link to a
                            // root file while the worker reads it. The logs are the worker's own.
                            outputs_trusted = false;
                            fail(status, survivors);
                        }
                        true
                    }
                    Err(error) => {
                        status.error = Some(format!("cannot run the command: {error}"));
                        false
                    }
                }
            }
            None => {
                let (path, key, sha256) = (
                    downloaded.path.clone(),
                    job.key.clone(),
                    downloaded.sha256.clone(),
                );
                let report_path = output_dir.join(REPORT_FILE);
                // Written in the work directory and moved into the outputs whole: an analysis
                // stopped at the deadline goes on in its thread, and must not leave half a
                // report to upload.
                let partial = work.join(format!("{REPORT_FILE}.partial"));
                let analysis = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let report = analyse(&path, &key, &sha256)?;
                    let json = serde_json::to_vec_pretty(&report).map_err(std::io::Error::other)?;
                    std::fs::write(&partial, json)?;
                    std::fs::rename(&partial, &report_path)
                });
                tokio::select! {
                    analysed = analysis => match analysed.expect("the analysis does not panic") {
                        Ok(()) => status.state = State::Succeeded,
                        Err(error) => status.error = Some(format!("the built-in analysis failed: {error}")),
                    },
                    stopped = stop() => stopped_by(status, &stopped, "during the built-in analysis"),
                }
                false
            }
        };
        status.timings.process_ms = elapsed_ms(clock);
        tracing::info!(
            ms = status.timings.process_ms,
            exit_code = status.exit_code,
            "processed"
        );
        report_stage(Stage::Process {
            ms: status.timings.process_ms,
            exit_code: status.exit_code,
        });

        // Outputs go up whatever happened: after a failure or a stop they are what is left to
        // understand it by. An attempt stopped from outside writes them apart: the job's next
        // attempt may already be writing its own into the job's folder.
        let clock = Instant::now();
        let uploader = if status.state == State::Interrupted {
            self.uploader_at(job, job.stopped_outputs_prefix())
        } else {
            self.uploader(job)
        };
        // What the command wrote must be its user's own; the built-in analysis writes as the
        // worker.
        let owner = match (&job.command, &self.settings.run_as) {
            (Some(_), Some(user)) => Some(user.uid),
            _ => None,
        };
        let mut files = if !outputs_trusted {
            Vec::new()
        } else {
            match files_under(&output_dir, owner) {
                Ok(files) => files,
                Err(error) => {
                    fail(status, crate::error_chain(&error));
                    Vec::new()
                }
            }
        };
        files.retain(|(_, name)| {
            let reserved = RESERVED.contains(&name.as_str())
                || name
                    .split('/')
                    .any(|segment| RECORDS_FOLDER.strip_suffix('/') == Some(segment));
            if reserved {
                tracing::warn!(
                    name,
                    "the command wrote a file with a name s3spot uses; not uploaded"
                );
            }
            !reserved
        });
        if processed {
            files.push((logs.0.clone(), STDOUT_FILE.to_owned()));
            files.push((logs.1.clone(), STDERR_FILE.to_owned()));
        }
        let count = files.len();
        let uploaded = {
            let uploads = async {
                for (path, name) in files {
                    match uploader.file(&path, &name).await {
                        Ok(key) => status.outputs.push(key),
                        Err(error) => fail(status, crate::error_chain(&error)),
                    }
                }
            };
            tokio::select! {
                () = uploads => Ok(()),
                why = cutoff() => Err(why),
            }
        };
        if let Err(stop) = uploaded {
            uploader.abort_unfinished().await;
            let why = match &stop {
                Stop::TimedOut => "the hard time limit comes next".to_owned(),
                Stop::Interrupted(why) => why.clone(),
            };
            let note = format!(
                "uploads stopped ({why}): {} of {count} outputs uploaded, so that status.json \
                 could be",
                status.outputs.len()
            );
            // Stopped from outside, or out of time: not a failure of the job's own.
            if !matches!(status.state, State::TimedOut | State::Interrupted) {
                status.state = match stop {
                    Stop::TimedOut => State::TimedOut,
                    Stop::Interrupted(_) => State::Interrupted,
                };
            }
            fail(status, note);
        }
        status.timings.upload_ms = elapsed_ms(clock);
        tracing::info!(
            ms = status.timings.upload_ms,
            outputs = status.outputs.len(),
            "uploaded"
        );
        report_stage(Stage::Upload {
            ms: status.timings.upload_ms,
            outputs: status.outputs.len(),
        });
    }

    /// Stamps the end, records `status.json` by the contract's rule (see
    /// [`s3spot_bootstrap::settle`]) by `by` at the latest, and logs the outcome. The launcher
    /// may have written a verdict on this attempt first (a cancel, the reaper, a spot
    /// interruption's re-launch): a worker stopped from outside then takes its state, and adds
    /// its own account.
    async fn finish(
        &self,
        job: &JobSpec,
        status: &mut Status,
        by: Instant,
        price: Option<LaunchPrice>,
    ) {
        let ended = SystemTime::now();
        status.finished_at = timestamp(ended);
        let statuses = S3Statuses::from_client(self.s3.clone());
        // The launcher may have kept the price after the worker began (a local instance starts
        // at once); one more look, if there is time for it besides status.json.
        let price = match price {
            Some(price) => Some(price),
            None if by > Instant::now() + PRICE_READ + Duration::from_secs(2) => {
                self.launch_price(job).await
            }
            None => None,
        };
        status.cost = price.and_then(|price| Cost::estimate(&price, ended));
        // A moment at least, even past the deadline: without status.json nobody learns anything.
        let by = by.max(Instant::now() + Duration::from_secs(2));
        let recorded = tokio::time::timeout_at(by.into(), async {
            record_change(
                &statuses,
                &job.results_bucket,
                &job.status_key(),
                status.clone(),
            )
            .await
        })
        .await;
        if let Ok(Ok((recorded, before))) = &recorded
            && let Some(written) = changed_state(recorded, *before)
        {
            // The worker ran: what is on record of this attempt before its account is the
            // launcher's (a verdict), or nothing, or the launcher's note of the launch, which
            // is the worker's own `running`; another attempt's is not this one's past.
            let previous = match *before {
                Some((state, attempt)) if attempt == written.attempt => match state {
                    JobState::Launched | JobState::Waiting => JobState::Running,
                    state => state,
                },
                _ => JobState::Running,
            };
            let event =
                JobEvent::of_status(pipeline(job), job, written, Some(previous), Writer::Worker);
            self.events.emit(event).await;
        }
        match recorded.map(|r| r.map(|(recorded, _)| recorded)) {
            Ok(Ok(Recorded::Written(written))) => *status = *written,
            Ok(Ok(Recorded::Kept { reason })) => {
                tracing::warn!(reason, "status.json keeps what it holds");
            }
            Ok(Err(error)) => {
                let error = crate::error_chain(&error);
                tracing::error!(error, "cannot record status.json");
                fail(status, format!("cannot record status.json: {error}"));
            }
            Err(_) => {
                tracing::error!("status.json was not recorded in time");
                fail(status, "cannot record status.json: out of time".into());
            }
        }
        tracing::info!(state = ?status.state, error = ?status.error, outputs = status.outputs.len(), "job finished");
    }

    /// The price the launcher kept in the attempt's claim; `None` if there is none (a job run
    /// by hand, a launcher before prices, a claim not written yet) or it cannot be read in
    /// [`PRICE_READ`].
    async fn launch_price(&self, job: &JobSpec) -> Option<LaunchPrice> {
        let statuses = S3Statuses::from_client(self.s3.clone());
        let key = job.claim_key();
        let read = read_claim(&statuses, &job.results_bucket, &key);
        match tokio::time::timeout(PRICE_READ, read).await {
            Ok(Ok(Some(stored))) => stored.claim.ok()?.price,
            Ok(Ok(None)) => None,
            Ok(Err(error)) => {
                tracing::warn!(
                    error = crate::error_chain(&error),
                    "cannot read the attempt's claim: no cost in status.json"
                );
                None
            }
            Err(_) => {
                tracing::warn!("the attempt's claim took too long to read: no cost in status.json");
                None
            }
        }
    }

    fn uploader<'a>(&'a self, job: &'a JobSpec) -> Uploader<'a> {
        self.uploader_at(job, job.results_key_prefix())
    }

    fn uploader_at<'a>(&'a self, job: &'a JobSpec, prefix: String) -> Uploader<'a> {
        Uploader::new(&self.s3, &job.results_bucket, prefix, self.settings.upload)
    }
}

/// The pipeline a job's events name: none for a job run by hand.
fn pipeline(job: &JobSpec) -> &str {
    job.pipeline.as_deref().unwrap_or_default()
}

/// One stage line on the log stream, in order with the logs around it.
fn report_stage(stage: Stage) {
    eprintln!("{}", stage.to_line());
}

/// A failure after the fact (an upload) turns success into failure but keeps an earlier, more
/// telling error.
fn fail(status: &mut Status, error: String) {
    if status.state == State::Succeeded {
        status.state = State::Failed;
    }
    match &mut status.error {
        Some(existing) => {
            existing.push_str("; ");
            existing.push_str(&error);
        }
        None => status.error = Some(error),
    }
}

fn stopped_by(status: &mut Status, stop: &Stop, when: &str) {
    let (state, error) = match stop {
        Stop::TimedOut => (State::TimedOut, format!("max runtime exceeded {when}")),
        Stop::Interrupted(why) => (State::Interrupted, format!("{why} {when}")),
    };
    status.state = state;
    status.error = Some(error);
}

/// Completes at the deadline, or when an interruption is announced, whichever is first.
async fn stop_signal(
    deadline: Instant,
    max_runtime_secs: u64,
    mut interrupted: watch::Receiver<Option<Interruption>>,
) -> Stop {
    let interruption = async {
        let notice = interrupted
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|notice| notice.clone());
        match notice {
            Some(notice) => notice.why,
            // The sender is gone: no interruption can come any more.
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        () = tokio::time::sleep_until(deadline.into()) => {
            tracing::warn!(max_runtime_secs, "max runtime exceeded");
            Stop::TimedOut
        }
        notice = interruption => Stop::Interrupted(notice),
    }
}

/// Completes when outputs must stop uploading: before the hard limit, or a while after an
/// interruption. Says why.
async fn outputs_cutoff(
    limits: Limits,
    mut interrupted: watch::Receiver<Option<Interruption>>,
) -> Stop {
    loop {
        let current = interrupted.borrow_and_update().clone();
        let at = Interruption::outputs_cutoff(current.as_ref(), &limits);
        let why = match current {
            Some(interruption) if at < limits.outputs => Stop::Interrupted(interruption.why),
            _ => Stop::TimedOut,
        };
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => return why,
            changed = interrupted.changed() => {
                if changed.is_err() {
                    // No interruption can come any more: only the limit is left.
                    tokio::time::sleep_until(at.into()).await;
                    return why;
                }
            }
        }
    }
}

async fn watch_for_interruption(
    metadata: Metadata,
    every: Duration,
    interrupt: watch::Sender<Option<Interruption>>,
) {
    loop {
        tokio::time::sleep(every).await;
        if let Some(notice) = metadata.interruption_notice().await {
            tracing::warn!(notice, "spot interruption notice");
            // A signal that came first stands, with its shorter grace: what sent it kills next.
            interrupt.send_if_modified(|current| {
                if current.is_some() {
                    return false;
                }
                *current = Some(Interruption {
                    why: format!("spot interruption notice ({notice})"),
                    spot: true,
                    at: Instant::now(),
                    upload_grace: SPOT_UPLOAD_GRACE,
                });
                true
            });
            return;
        }
    }
}

/// The signals that stop a job, taken over from their default action (the end of the process,
/// with no account of the job) by [`StopSignals::take`].
pub struct StopSignals {
    term: std::io::Result<tokio::signal::unix::Signal>,
    int: std::io::Result<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// SIGTERM and SIGINT, from now on: a signal that comes before the job starts is still
    /// received. SIGQUIT is taken too, and nothing is done with it: a worker started as a
    /// shell's background job inherits SIGQUIT (and SIGINT) ignored, and the command would
    /// inherit that from it; a handled signal is reset to its default at the command's exec.
    /// Needs a Tokio runtime.
    pub fn take() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        if let Err(error) = signal(SignalKind::quit()) {
            tracing::warn!(%error, "cannot take over SIGQUIT; the command may inherit it ignored");
        }
        StopSignals {
            term: signal(SignalKind::terminate()),
            int: signal(SignalKind::interrupt()),
        }
    }

    /// The signals `take` takes over, for a process to hold back until it has.
    pub fn set() -> nix::sys::signal::SigSet {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for signal in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT] {
            set.add(signal);
        }
        set
    }
}

/// SIGTERM (the bootstrap's hard limit, a shutdown) and SIGINT (Ctrl-C in a local run) stop the
/// job the way an interruption does: outputs and status are still uploaded, within
/// `upload_grace`.
async fn watch_for_signals(
    signals: StopSignals,
    interrupt: watch::Sender<Option<Interruption>>,
    upload_grace: Duration,
) {
    let (Ok(mut term), Ok(mut int)) = (signals.term, signals.int) else {
        return;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::warn!(signal = name, "stopping the job");
    let at = Instant::now();
    interrupt.send_modify(|current| {
        // A signal on top of a spot notice: the signal's shorter grace holds.
        let why = current.as_ref().map_or_else(
            || format!("the worker received {name}"),
            |earlier| earlier.why.clone(),
        );
        *current = Some(Interruption {
            why,
            spot: current.as_ref().is_some_and(|earlier| earlier.spot),
            at,
            upload_grace: upload_grace.min(current.as_ref().map_or(upload_grace, |e| {
                (e.at + e.upload_grace).saturating_duration_since(at)
            })),
        });
    });
}

/// Runs `future` on its own task, so that a panic in it becomes an error value.
pub async fn catch_panic<T: Send + 'static>(
    future: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    tokio::spawn(future).await.map_err(|error| {
        if error.is_panic() {
            let panic = error.into_panic();
            panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_owned())
        } else {
            error.to_string()
        }
    })
}

/// A file name for the downloaded object that is safe whatever the key: its last segment, with
/// anything but ASCII letters, digits, '.', '-' and '_' replaced, no leading dots, at most 100
/// bytes, and the extension kept.
pub fn local_name(key: &str) -> String {
    const MAX: usize = 100;
    let last = key.rsplit('/').next().unwrap_or_default();
    let cleaned: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        return "input".to_owned();
    }
    if cleaned.len() <= MAX {
        return cleaned.to_owned();
    }
    let extension = cleaned
        .rsplit_once('.')
        .map(|(_, ext)| ext)
        .filter(|ext| ext.len() <= 16)
        .unwrap_or_default();
    let stem_len = MAX - extension.len() - 1;
    format!("{}.{extension}", &cleaned[..stem_len])
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_names_are_safe_and_keep_the_extension() {
        let cases = [
            ("in/data.csv", "data.csv"),
            ("in/$(touch x).csv", "__touch_x_.csv"),
            ("in/a b\nc;d`e'f\".tsv", "a_b_c_d_e_f_.tsv"),
            ("in/ünï cödé.json", "_n__c_d_.json"),
            ("in/..", "input"),
            ("in/.hidden", "hidden"),
            ("folder/", "input"),
            ("../../etc/passwd", "passwd"),
            ("plain", "plain"),
        ];
        for (key, expected) in cases {
            assert_eq!(local_name(key), expected, "{key:?}");
        }
        let long = format!("in/{}.parquet", "x".repeat(300));
        let name = local_name(&long);
        assert_eq!(name.len(), 100);
        assert!(name.ends_with(".parquet"));
    }

    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        let caught = catch_panic(async { panic!("boom at step 3") }).await;
        assert_eq!(caught, Err::<(), _>("boom at step 3".to_owned()));
        let caught = catch_panic(async { panic!("{} {}", "formatted", 7) }).await;
        assert_eq!(caught, Err::<(), _>("formatted 7".to_owned()));
        assert_eq!(catch_panic(async { 5 }).await, Ok(5));
    }

    #[test]
    fn a_late_failure_keeps_the_first_error() {
        let job = JobSpec {
            bucket: "b".into(),
            key: "k".into(),
            version_id: None,
            etag: None,
            size: None,
            sequencer: None,
            job_id: "0".repeat(32),
            uploaded_at: None,
            results_bucket: "b".into(),
            results_prefix: "analysis/".into(),
            command: None,
            max_runtime_secs: 1,
            worker: s3spot_bootstrap::WorkerArtifact {
                uri: String::new(),
                sha256: String::new(),
            },
            attempt: 2,
            pipeline: None,
            events_off: false,
        };
        let mut status = Status::initial(&job, Writer::Worker, SystemTime::UNIX_EPOCH);
        assert_eq!(status.started_at, "1970-01-01T00:00:00Z");
        assert_eq!(status.attempt, 2);
        status.state = State::Succeeded;
        fail(&mut status, "upload failed".into());
        assert_eq!(status.state, State::Failed);
        status.state = State::TimedOut;
        fail(&mut status, "status upload failed".into());
        assert_eq!(status.state, State::TimedOut, "a stop stays a stop");
        assert_eq!(
            status.error.as_deref(),
            Some("upload failed; status upload failed")
        );
    }
}
