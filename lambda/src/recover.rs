//! Jobs whose attempts end before their work does: spot instances taken back (with a warning or
//! without), instances that stop without a word, and the operator's retry. Each is launched
//! again as its next attempt, through the same guard and options as a new job, or given a final
//! status.

use std::future::Future;
use std::pin::Pin;

use std::time::{Duration, SystemTime};

use s3spot_bootstrap::{
    JobSpec, RECORDS_FOLDER, RenderError, State, Status, StatusError, StatusStore, StoredClaim,
    error_chain, read_claim, read_status, render_user_data,
};

use crate::config::JobConfig;
use crate::event::ObjectCreated;
use crate::handler::Handler;
use crate::jobs::{Clock, EndedAttempt, JobInstance, JobLocation, JobsError, Stopped, Target};
use crate::launch::{InvocationState, Launch, Purpose};
use crate::launcher::{InstanceInfo, Launcher, TAG_PIPELINE, is_ended_state};
use crate::plan::{Plan, PlannedJob, plan};
use crate::report::{FailedRecord, Report};

/// How long the next attempt of a job whose instance EC2 took back may wait for capacity
/// before the job is failed. EC2 lists an ended instance for about an hour, and the reaper,
/// which launches the next attempt while it can see the instance, runs at least every 15
/// minutes: it gets to try after this, before the instance is forgotten.
pub const REPLACEMENT_WAIT: Duration = Duration::from_secs(25 * 60);

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    /// EC2's two-minute warning for `instance_id`: if it is one of this pipeline's, its job is
    /// launched again as its next attempt (see [`Handler::relaunch`]).
    pub(crate) async fn recover(
        &self,
        instance_id: &str,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<(), FailedRecord> {
        let pipeline = &self.config.job.pipeline;
        let failed = |error: String, retryable: bool| FailedRecord {
            bucket: String::new(),
            key: String::new(),
            error: format!("spot interruption of {instance_id}: {error}"),
            retryable,
        };
        let instance = match self.launcher.describe(instance_id).await {
            Ok(Some(instance)) => instance,
            // Never dropped in silence: whose it was cannot be told any more, so a person must
            // look (the reaper has recovered the pipeline's own reclaimed instances while EC2
            // listed them).
            Ok(None) => {
                return Err(failed(
                    "EC2 does not list the instance (it forgets instances about an hour after \
                     they end), so its job cannot be told from here. If it was one of this \
                     pipeline's, the reaper re-launched or failed its job while EC2 still listed \
                     it: check with `s3spot jobs show s3://BUCKET/KEY`, and re-run a job left \
                     without a final status with `s3spot jobs retry`"
                        .into(),
                    false,
                ));
            }
            Err(error) => return Err(failed(error.to_string(), error.is_retryable())),
        };
        // The rule sees every spot interruption in the account and region.
        if instance.tag(TAG_PIPELINE) != Some(pipeline.as_str()) {
            report.skip(
                "",
                "",
                format!(
                    "spot interruption of {instance_id}: not an instance of pipeline {pipeline:?}"
                ),
            );
            return Ok(());
        }
        let spec = self
            .jobs()
            .spec_of(instance_id)
            .await
            .map_err(|error| failed(error_chain(&error), is_retryable(&error)))?;
        // The next attempt waits for this one to end (EC2 takes the instance two minutes after
        // its warning; its worker stops at the warning): one upload never has two instances at
        // once, and a worker that finishes within the two minutes needs no next attempt.
        if !is_ended_state(&instance.state) {
            let waiting = format!(
                "attempt {} of job {} is still on it ({}); the next attempt is launched once it \
                 has ended, when the queue delivers this warning again (or the reaper finds it \
                 ended)",
                spec.attempt, spec.job_id, instance.state
            );
            // On record at once: whatever the worker manages to write before the instance goes
            // (an old worker, one killed at the notice), the reaper knows that EC2 is taking the
            // attempt back. A worker that finishes first keeps its own account.
            let next = if spec.attempt >= self.config.launch.max_attempts {
                "the job fails once the instance has ended: it is on its last attempt \
                 (S3SPOT_MAX_ATTEMPTS)"
                    .to_owned()
            } else {
                format!(
                    "attempt {} is launched once the instance has ended",
                    spec.attempt + 1
                )
            };
            let verdict = Status::verdict(
                &spec,
                instance_of(&instance),
                State::Interrupted,
                format!("spot interruption warning; {next}"),
            );
            if let Err(error) = self.jobs().record_verdict(&spec, verdict).await {
                tracing::warn!(
                    error = error_chain(&error),
                    "cannot record the spot interruption warning"
                );
            }
            return Err(failed(waiting, true));
        }
        self.relaunch(&spec, &instance, "spot interruption warning", state, report)
            .await
            .map(|_| ())
    }

    /// Attempt `spec.attempt` was taken back by EC2 (`why` says how it is known): launches
    /// the next attempt, or on the last one (`S3SPOT_MAX_ATTEMPTS`) marks the job failed, and
    /// records the attempt. A repeated warning launches nothing more: the next attempt's
    /// launch finds it. Returns what was recorded, as a sentence.
    ///
    /// The next attempt is the job as it was launched (its command, limits and results folder,
    /// whatever the function's settings are now), with the current worker binary. When it cannot be launched,
    /// the attempt is recorded `interrupted` with the reason, and the error is returned for the
    /// caller to try again (the queue redelivers the warning; the reaper looks again each
    /// period while EC2 lists the instance); a launch that can never succeed fails the job.
    pub(crate) async fn relaunch(
        &self,
        spec: &JobSpec,
        instance: &InstanceInfo,
        why: &str,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<String, FailedRecord> {
        let instance_id = &instance.instance_id;
        let failed = |error: String, retryable: bool| FailedRecord {
            bucket: spec.bucket.clone(),
            key: spec.key.clone(),
            error: format!("{why} for {instance_id}: {error}"),
            retryable,
        };
        let previous = match read_status(
            &self.statuses,
            &spec.results_bucket,
            &spec.status_key(),
            &spec.job_id,
        )
        .await
        {
            Ok(previous) => previous,
            // A damaged status.json must not keep the job from its next attempt.
            Err(StatusError::Invalid { .. }) => None,
            Err(error @ StatusError::OtherJob { .. }) => {
                return Err(failed(error_chain(&error), false));
            }
            Err(error) => return Err(failed(error_chain(&error), true)),
        };
        if let Some(previous) = &previous {
            let ended = previous
                .outcome_of(spec.attempt)
                .filter(|state| *state != State::Interrupted);
            if previous.attempt > spec.attempt || ended.is_some() {
                let reason = format!(
                    "{why} for {instance_id}: attempt {} of this job already ended ({})",
                    spec.attempt,
                    ended.unwrap_or(State::Interrupted)
                );
                report.skip(&spec.bucket, &spec.key, reason.clone());
                return Ok(reason);
            }
        }

        let record = |state: State, error: String| async move {
            let verdict = Status::verdict(spec, instance_of(instance), state, error);
            self.jobs()
                .record_verdict(spec, verdict)
                .await
                .map_err(|e| failed(error_chain(&e), true))
        };
        let max = self.config.launch.max_attempts;
        if spec.attempt >= max {
            let error = format!(
                "{why} for {instance_id} on attempt {} of {max} (S3SPOT_MAX_ATTEMPTS); not \
                 re-launched",
                spec.attempt
            );
            return give_up(error, record, spec, report).await;
        }

        let next_attempt = spec.attempt + 1;
        let launched = match next_attempt_of(spec, &self.config.job) {
            Ok(job) => {
                // Type-erased, as the handler's rare paths are: this one nests a launch inside
                // a recovery.
                let launch: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                    Box::pin(self.launch(&job, Purpose::Replacement, state, report));
                launch.await
            }
            Err(error) => Err(failed(error_chain(&error), false)),
        };
        let next = match launched {
            Ok(Launch::Started(instance_id, _)) => format!("re-launched on {instance_id}"),
            Ok(Launch::AlreadyDone {
                instance_id: Some(instance_id),
                ..
            }) => format!("already launched on {instance_id}"),
            Ok(Launch::AlreadyDone { reason, .. }) => reason,
            Err(failure) if failure.retryable && !self.waited_too_long(spec).await => {
                let note = format!(
                    "{why}; attempt {next_attempt} not launched yet: {}",
                    failure.error
                );
                record(State::Interrupted, note).await?;
                return Err(failure);
            }
            Err(failure) => {
                let cannot = if failure.retryable {
                    format!(
                        "could not be launched in {} minutes",
                        REPLACEMENT_WAIT.as_secs() / 60
                    )
                } else {
                    "cannot be launched".to_owned()
                };
                let error = format!(
                    "{why}; attempt {next_attempt} {cannot}: {}; `s3spot jobs retry \
                     s3://{}/{}` runs the job again",
                    failure.error, spec.bucket, spec.key
                );
                return give_up(error, record, spec, report).await;
            }
        };
        let note = format!("{why}; attempt {next_attempt} {next}");
        record(State::Interrupted, note.clone()).await?;
        Ok(note)
    }

    /// The last attempt of job `job_id` that has run or been launched, from `known` (what EC2
    /// and status.json say) and the attempts' claims after it: EC2 forgets instances, and a
    /// claim records an instance, or a token whose instance ended, that nothing else may.
    async fn last_claimed(
        &self,
        location: &JobLocation,
        job_id: &str,
        known: u32,
    ) -> Result<u32, JobsError> {
        let mut last = known;
        loop {
            let key = format!(
                "{}{RECORDS_FOLDER}attempt-{}.json",
                location.prefix,
                last + 1
            );
            match read_claim(&self.statuses, &location.results_bucket, &key).await? {
                Some(StoredClaim {
                    claim: Ok(claim), ..
                }) if claim.job.job_id == job_id
                    && (claim.instance_id.is_some() || claim.done.is_some()) =>
                {
                    last += 1;
                }
                _ => return Ok(last),
            }
        }
    }

    /// Whether the attempt after `spec`'s has waited [`REPLACEMENT_WAIT`] for an instance, by
    /// its claim, and EC2 refused its last launch: a claim with an instance, or a launch whose
    /// outcome is not known yet, has not given up.
    async fn waited_too_long(&self, spec: &JobSpec) -> bool {
        let next = JobSpec {
            attempt: spec.attempt + 1,
            ..spec.clone()
        };
        match read_claim(&self.statuses, &next.results_bucket, &next.claim_key()).await {
            Ok(Some(StoredClaim {
                claim: Ok(claim), ..
            })) => {
                claim.released.is_some()
                    && claim
                        .waited(SystemTime::now())
                        .is_some_and(|waited| waited >= REPLACEMENT_WAIT)
            }
            // No claim to tell by: the next try will have one.
            _ => false,
        }
    }

    /// Launches a job again, with the attempt after the last one EC2 or its status.json knows
    /// of: a new ClientToken, through the same guard and options as any launch. Refused while
    /// an instance of the job is still pending or running. `S3SPOT_MAX_ATTEMPTS` does not
    /// apply: that bounds automatic re-launches, and this one is asked for. An object's newest
    /// upload is the job retried.
    pub async fn retry(&self, target: &Target) -> Result<Report, JobsError> {
        let jobs = self.jobs();
        let found = jobs.find(target, Clock::now(jobs.config())).await?;
        let location = jobs.newest_job(target, &found).await?;
        let instances: Vec<&JobInstance> = found
            .iter()
            .filter(|i| location.job_id.is_some() && i.job_id == location.job_id)
            .collect();
        if let Some(active) = instances.iter().find(|i| i.is_active()) {
            return Err(JobsError::StillActive {
                bucket: active.bucket.clone(),
                key: active.key.clone(),
                instance_id: active.instance_id.clone(),
                state: active.state.clone(),
                attempt: active.attempt.unwrap_or(1),
            });
        }
        let status = match &location.job_id {
            Some(job_id) => match read_status(
                &self.statuses,
                &location.results_bucket,
                &location.status_key(),
                job_id,
            )
            .await
            {
                Ok(status) => status,
                Err(StatusError::Invalid { .. }) => None,
                Err(error) => return Err(error.into()),
            },
            None => None,
        };
        let newest = instances.iter().max_by_key(|i| i.attempt.unwrap_or(0));
        let (object, job_id) = match (newest, &status) {
            (Some(newest), _) => {
                let spec = jobs.spec_of(&newest.instance_id).await?;
                (object_of(&spec), spec.job_id)
            }
            (None, Some(status)) => (
                ObjectCreated {
                    bucket: status.input.bucket.clone(),
                    key: status.input.key.clone(),
                    version_id: status.input.version_id.clone(),
                    etag: status.input.etag.clone(),
                    size: status.input.size,
                    sequencer: None,
                    event_time: status.uploaded_at.clone(),
                },
                status.job_id.clone(),
            ),
            (None, None) => {
                return Err(JobsError::NotFound {
                    target: target.to_string(),
                    pipeline: self.config.job.pipeline.clone(),
                    hint: ", and it has no status.json: upload the object again to run it",
                });
            }
        };
        let last_attempt = instances
            .iter()
            .filter_map(|i| i.attempt)
            .chain(status.iter().map(|s| s.attempt))
            .chain(
                status
                    .iter()
                    .flat_map(|s| s.history.iter().map(|a| a.attempt)),
            )
            .max()
            .unwrap_or(0);
        let last_attempt = self.last_claimed(&location, &job_id, last_attempt).await?;
        let mut report = Report::default();
        match plan(&self.config.job, &object, last_attempt + 1, &job_id) {
            Ok(Plan::Launch(job)) => {
                // A job that waits for an instance: its attempt's deliveries must launch nothing
                // once this retry supersedes it, so its claim says so first.
                if let Some(waiting) = status.as_ref().filter(|s| {
                    s.is_waiting()
                        && s.attempt == last_attempt
                        && s.waiting.as_ref().is_some_and(|w| w.instance_id.is_none())
                }) {
                    let waited = JobSpec {
                        attempt: waiting.attempt,
                        ..job.spec.clone()
                    };
                    self.supersede_wait(&waited, last_attempt + 1).await?;
                }
                let mut state = InvocationState::default();
                if let Err(failure) = self
                    .launch(&job, Purpose::Retry, &mut state, &mut report)
                    .await
                {
                    report.fail(failure);
                }
            }
            Ok(Plan::Skip(reason)) => report.skip(&object.bucket, &object.key, reason),
            Err(error) => report.fail(FailedRecord {
                bucket: object.bucket,
                key: object.key,
                error: error_chain(&error),
                retryable: false,
            }),
        }
        report.log();
        Ok(report)
    }

    /// Marks the claim of `waited`'s attempt done, superseded by attempt `next`: the event's
    /// later deliveries then launch nothing for it. Refused while a delivery holds the claim,
    /// or once it has launched: that delivery decides.
    async fn supersede_wait(&self, waited: &JobSpec, next: u32) -> Result<(), JobsError> {
        let bucket = &waited.results_bucket;
        let key = waited.claim_key();
        let busy = || JobsError::Busy {
            bucket: waited.bucket.clone(),
            key: waited.key.clone(),
        };
        let stored = s3spot_bootstrap::read_claim(&self.statuses, bucket, &key).await?;
        let (mut claim, expect) = match stored {
            Some(stored) => match stored.claim {
                Ok(claim) => (claim, stored.expect),
                Err(_) => (s3spot_bootstrap::Claim::new(waited.clone()), stored.expect),
            },
            None => (
                s3spot_bootstrap::Claim::new(waited.clone()),
                s3spot_bootstrap::Expect::Nothing,
            ),
        };
        let held = claim.is_pending()
            && claim
                .age(std::time::SystemTime::now())
                .is_some_and(|age| age < crate::launch::CLAIM_LEASE)
            && expect != s3spot_bootstrap::Expect::Nothing;
        if claim.instance_id.is_some() || held {
            return Err(busy());
        }
        claim.done = Some(format!(
            "superseded by `s3spot jobs retry`, as attempt {next}"
        ));
        match s3spot_bootstrap::write_claim(&self.statuses, bucket, &key, &claim, &expect).await {
            Ok(_) => Ok(()),
            Err(StatusError::Conflict { .. }) => Err(busy()),
            Err(error) => Err(error.into()),
        }
    }

    /// The reaper: terminates the pipeline's stuck instances and marks their attempts failed;
    /// gives every attempt whose instance ended without its worker's account a final status
    /// (a spot instance taken back, warned of or not, is launched again as its next attempt);
    /// with `dry_run`, only says what it would do.
    pub async fn reap(&self, clock: Clock, dry_run: bool) -> Result<Stopped, JobsError> {
        let jobs = self.jobs();
        let sweep = jobs.sweep(clock).await?;
        if dry_run {
            return Ok(sweep.planned());
        }
        let mut stopped = jobs.reap_stuck(sweep.stuck, clock).await?;
        let mut state = InvocationState::default();
        for instance in sweep.ended {
            match self.settle_ended(&instance, &mut state).await {
                Ok(outcome) => {
                    tracing::warn!(
                        instance_id = instance.instance_id,
                        key = ?instance.key,
                        outcome,
                        "an instance ended without its worker's account"
                    );
                    stopped.ended.push(EndedAttempt { instance, outcome });
                }
                Err(error) => stopped
                    .errors
                    .push(format!("{}: {error}", instance.instance_id)),
            }
        }
        // After the instances: the jobs EC2 took back come first.
        match jobs.expire_waiting(std::time::SystemTime::now()).await {
            Ok((expired, errors)) => {
                stopped.ended.extend(expired);
                stopped.errors.extend(errors);
            }
            Err(error) => stopped
                .errors
                .push(format!("the list of waiting jobs: {}", error_chain(&error))),
        }
        Ok(stopped)
    }

    /// Gives the attempt of `instance`, which ended without an account, its final status.
    async fn settle_ended(
        &self,
        instance: &JobInstance,
        state: &mut InvocationState,
    ) -> Result<String, String> {
        let jobs = self.jobs();
        // Taken back by EC2: by its reason, or by its worker's account of the notice (the
        // bootstrap powers the instance off once the worker is done, often before EC2 does).
        let reclaimed = instance.spot_interruption
            || instance
                .state_reason
                .as_ref()
                .is_some_and(|reason| reason.is_spot_reclaim());
        if !reclaimed {
            return jobs
                .record_silent_end(instance)
                .await
                .map_err(|error| error_chain(&error));
        }
        let spec = jobs
            .spec_of(&instance.instance_id)
            .await
            .map_err(|error| error_chain(&error))?;
        let info = InstanceInfo {
            instance_id: instance.instance_id.clone(),
            state: instance.state.clone(),
            instance_type: instance.instance_type.clone(),
            market: instance.market.clone(),
            launched_at: instance.launched_at,
            tags: Vec::new(),
            state_reason: instance.state_reason.clone(),
        };
        // The reaper's findings are reported in its own list, not as records.
        let mut report = Report::default();
        let outcome = self
            .relaunch(&spec, &info, "taken back by EC2", state, &mut report)
            .await
            .map_err(|failure| failure.error)?;
        Ok(match report.launched.first() {
            Some(launched) => format!("{outcome} ({} {})", launched.market, launched.client_token),
            None => outcome,
        })
    }
}

/// Ends `spec`'s job: `failed`, with `error`, recorded through `record` and reported as
/// skipped.
async fn give_up<F: Future<Output = Result<String, FailedRecord>>>(
    error: String,
    record: impl FnOnce(State, String) -> F,
    spec: &JobSpec,
    report: &mut Report,
) -> Result<String, FailedRecord> {
    let recorded = record(State::Failed, error.clone()).await?;
    report.skip(
        &spec.bucket,
        &spec.key,
        format!("{error}; status.json: {recorded}"),
    );
    Ok(format!("failed: {error}"))
}

/// The attempt after `spec`'s: the job as it was launched (its command, limits and results
/// folder), with the worker binary of `config`. A deploy replaces the worker, and the instance
/// role may read only the current one; it speaks the same contract.
fn next_attempt_of(spec: &JobSpec, config: &JobConfig) -> Result<PlannedJob, RenderError> {
    let spec = JobSpec {
        attempt: spec.attempt + 1,
        worker: config.worker.clone(),
        ..spec.clone()
    };
    let user_data = render_user_data(&spec, config.region.as_deref())?;
    Ok(PlannedJob { spec, user_data })
}

/// The object a job was launched for, as its event described it.
pub(crate) fn object_of(spec: &JobSpec) -> ObjectCreated {
    ObjectCreated {
        bucket: spec.bucket.clone(),
        key: spec.key.clone(),
        version_id: spec.version_id.clone(),
        etag: spec.etag.clone(),
        size: spec.size,
        sequencer: spec.sequencer.clone(),
        event_time: spec.uploaded_at.clone(),
    }
}

fn instance_of(instance: &InstanceInfo) -> s3spot_bootstrap::Instance {
    s3spot_bootstrap::Instance {
        id: Some(instance.instance_id.clone()),
        instance_type: instance.instance_type.clone(),
        lifecycle: Some(instance.market.clone()),
    }
}

fn is_retryable(error: &JobsError) -> bool {
    match error {
        JobsError::Launcher(error) => error.is_retryable(),
        JobsError::Status(_) => true,
        _ => false,
    }
}
