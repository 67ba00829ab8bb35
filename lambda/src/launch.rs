//! Launching one planned job: at most one instance per attempt, through the runaway guard and
//! the launch options in order.
//!
//! One attempt is one launch because of three checks, each for what the others miss:
//! - EC2 is asked for the attempt's instances (by its `s3spot:job` and `s3spot:attempt` tags):
//!   each launch option has its own `ClientToken`, so a redelivery after a fallback to on-demand
//!   (or after prices changed the order) would otherwise start a second instance;
//! - status.json is read for the attempt's outcome: it outlives EC2's memory of instances (about
//!   an hour) and of tokens (about a day), so a redrive from the dead-letter queue days later
//!   launches nothing;
//! - the attempt's claim (`.s3spot/attempt-N.json`, written only if there is none) lets exactly
//!   one of the deliveries that race each other launch: duplicates delivered to two invocations
//!   at once both find no instance.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use s3spot_bootstrap::{
    Claim, Expect, JobSpec, StatusError, StatusStore, error_chain, read_claim, read_status,
    write_claim,
};

use crate::config::{Config, LaunchConfig, LaunchOption};
use crate::event::ObjectCreated;
use crate::handler::Handler;
use crate::launcher::{LaunchError, LaunchRequest, Launcher, PriceQuery, job_tags};
use crate::plan::PlannedJob;
use crate::prices;
use crate::report::{FailedRecord, LaunchedJob, Report};
use crate::token::client_token;

/// A claim with no instance and no release is taken to be abandoned after this long: longer
/// than any launch takes (the template's function timeout is 50 s), and shorter than the
/// queue's visibility timeout (300 s), so the redelivery of an event whose launcher died finds
/// it abandoned.
pub const CLAIM_LEASE: Duration = Duration::from_secs(180);

/// What one invocation reads from EC2 once and then keeps: the guard's count, and the order of
/// the instance types by price.
#[derive(Default)]
pub(crate) struct InvocationState {
    guard: RunawayGuard,
    price_order: Option<Vec<String>>,
}

/// Why a launch is made, which decides whether the runaway guard applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A job's first attempt, or one an operator asked for: bounded by `S3SPOT_MAX_INSTANCES`.
    New,
    /// The next attempt of one that EC2 took back. Not bounded by the cap: it replaces an
    /// instance rather than adding one, and refusing it would leave its job without an outcome.
    Replacement,
}

/// What became of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    /// On this instance: a new one, or the one EC2 already had for the same request.
    Started(String),
    /// Nothing launched: the attempt has an instance, has run, or is being launched by another
    /// delivery. Reported as skipped.
    AlreadyDone {
        instance_id: Option<String>,
        reason: String,
    },
}

/// A launch that failed.
struct Failed {
    record: FailedRecord,
    /// The outcome is not known: an instance may have been launched.
    maybe_launched: bool,
}

/// What [`Handler::claim`] found.
enum Claimed {
    /// This launch holds the attempt's claim.
    Held { claim: Box<Claim>, expect: Expect },
    /// Another held it and launched, or found nothing to launch.
    Elsewhere(Launch),
}

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    /// Launches `job` unless its attempt already has an instance, an outcome or another
    /// launcher, and records in `report` what became of it.
    pub(crate) async fn launch(
        &self,
        job: &PlannedJob,
        purpose: Purpose,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<Launch, FailedRecord> {
        let spec = &job.spec;
        // Type-erased: the S3 and EC2 calls in them would otherwise nest every launch's future
        // deeper than the compiler follows.
        let already_done: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(self.already_done(job));
        let mut done = already_done.await?;
        let mut held = None;
        if done.is_none() {
            let claimed: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(self.claim(job));
            match claimed.await? {
                Claimed::Held { claim, expect } => held = Some((claim, expect)),
                Claimed::Elsewhere(launch) => done = Some(launch),
            }
        }
        if let Some(done) = done {
            if let Launch::AlreadyDone { reason, .. } = &done {
                report.skip(&spec.bucket, &spec.key, reason.clone());
            }
            return Ok(done);
        }
        let (mut claim, expect) = held.expect("a launch that is not done holds the claim");
        let launched: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(self.launch_held(job, purpose, state, report));
        let launched = launched.await;
        match &launched {
            Ok(Launch::Started(instance_id))
            | Ok(Launch::AlreadyDone {
                instance_id: Some(instance_id),
                ..
            }) => claim.instance_id = Some(instance_id.clone()),
            Ok(Launch::AlreadyDone { reason, .. }) => claim.done = Some(reason.clone()),
            Err(failure) if !failure.maybe_launched => {
                claim.released = Some(failure.record.error.clone());
            }
            // Left pending: whoever takes it over once its lease is out asks EC2 first, which
            // lists the instance by then if there is one.
            Err(_) => return launched.map_err(|failure| failure.record),
        }
        // A claim left pending is taken over once its lease is out, after EC2 is asked again:
        // nothing is lost if this write is.
        let key = spec.claim_key();
        let recorded: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(write_claim(
            &self.statuses,
            &spec.results_bucket,
            &key,
            &claim,
            &expect,
        ));
        if let Err(error) = recorded.await {
            tracing::warn!(
                error = error_chain(&error),
                "cannot record the launch in the attempt's claim"
            );
        }
        launched.map_err(|failure| failure.record)
    }

    /// Takes the claim on `job`'s attempt: a new one, or one that was released, damaged or
    /// abandoned (pending past [`CLAIM_LEASE`]).
    async fn claim(&self, job: &PlannedJob) -> Result<Claimed, FailedRecord> {
        let spec = &job.spec;
        let bucket = &spec.results_bucket;
        let key = spec.claim_key();
        let failed = |error: &StatusError| FailedRecord {
            bucket: spec.bucket.clone(),
            key: spec.key.clone(),
            error: format!(
                "cannot claim attempt {} of job {}: {}",
                spec.attempt,
                spec.job_id,
                error_chain(error)
            ),
            retryable: true,
        };
        let mut ours = Claim::new(spec.clone());
        let mut expect = Expect::Nothing;
        let mut contended = None;
        let mut vanished = false;
        // A new claim, then at most one take-over: a launcher that loses that race to another
        // leaves the attempt to it.
        for _ in 0..2 {
            match write_claim(&self.statuses, bucket, &key, &ours, &expect).await {
                Ok(expect) => {
                    return Ok(Claimed::Held {
                        claim: Box::new(ours),
                        expect,
                    });
                }
                Err(StatusError::Conflict { .. }) => {}
                Err(error) => return Err(failed(&error)),
            }
            let Some(stored) = read_claim(&self.statuses, bucket, &key)
                .await
                .map_err(|error| failed(&error))?
            else {
                // Deleted in between, or a store that refuses the write and holds nothing.
                vanished = true;
                expect = Expect::Nothing;
                continue;
            };
            vanished = false;
            expect = stored.expect;
            let held = match stored.claim {
                Ok(held) if held.job.job_id == spec.job_id => held,
                // Not what a launcher wrote: the folder is s3spot's own, so it is replaced.
                Ok(_) | Err(_) => {
                    tracing::warn!(key, "replacing a damaged claim");
                    continue;
                }
            };
            if let Some(instance_id) = held.instance_id {
                return Ok(Claimed::Elsewhere(Launch::AlreadyDone {
                    reason: format!(
                        "already launched: attempt {} of job {} is on {instance_id} (s3://{bucket}/{key})",
                        spec.attempt, spec.job_id
                    ),
                    instance_id: Some(instance_id),
                }));
            }
            if let Some(done) = held.done {
                return Ok(Claimed::Elsewhere(Launch::AlreadyDone {
                    reason: format!("{done} (s3://{bucket}/{key})"),
                    instance_id: None,
                }));
            }
            let age = held.age(SystemTime::now()).unwrap_or(Duration::MAX);
            if held.is_pending() && age < CLAIM_LEASE {
                contended = Some(held.claimed_at);
                break;
            }
            tracing::info!(
                key,
                released = held.released,
                claimed_at = held.claimed_at,
                "taking over the attempt's claim"
            );
            ours = held.take_over(spec.clone());
        }
        if vanished {
            return Err(failed(&StatusError::Write {
                bucket: bucket.clone(),
                key: key.clone(),
                message: "the write was refused as if a claim were there, and none is".into(),
            }));
        }
        // Retried, not skipped: if that launch comes to nothing (its outcome unknown, its
        // invocation gone), this delivery may be the event's last, as Lambda's retries of a
        // direct invocation are.
        Err(FailedRecord {
            bucket: spec.bucket.clone(),
            key: spec.key.clone(),
            error: format!(
                "being launched by another delivery: attempt {} of job {} was claimed{} \
                 (s3://{bucket}/{key}); this delivery looks again when it is retried",
                spec.attempt,
                spec.job_id,
                contended.map_or_else(String::new, |at| format!(" at {at}")),
            ),
            retryable: true,
        })
    }

    /// The launch itself, under the attempt's claim: the guard, then each option in order.
    async fn launch_held(
        &self,
        job: &PlannedJob,
        purpose: Purpose,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<Launch, Failed> {
        let spec = &job.spec;
        let failed = |error: String, retryable: bool| Failed {
            record: FailedRecord {
                bucket: spec.bucket.clone(),
                key: spec.key.clone(),
                error,
                retryable,
            },
            maybe_launched: false,
        };
        let launch = &self.config.launch;
        let pipeline = &self.config.job.pipeline;
        if purpose == Purpose::New {
            state
                .guard
                .check(&self.launcher, pipeline, launch.max_instances)
                .await
                .map_err(|error| failed(error_chain(&error), true))?;
        }
        let options = self.options(state).await;

        let tags = job_tags(pipeline, spec);
        let user_data = job.user_data.to_base64();
        let mut no_capacity = Vec::new();
        let mut capacity_may_return = false;
        for option in options {
            let request = launch_request(launch, spec, &user_data, &tags, option);
            match self.launcher.launch(&request).await {
                Ok(launched) => {
                    state.guard.launched();
                    tracing::info!(
                        bucket = spec.bucket,
                        key = ?spec.key,
                        job_id = spec.job_id,
                        attempt = spec.attempt,
                        instance_id = launched.instance_id,
                        option = %request.option,
                        client_token = request.client_token,
                        "launched"
                    );
                    report.launched.push(LaunchedJob {
                        bucket: spec.bucket.clone(),
                        key: spec.key.clone(),
                        instance_id: launched.instance_id.clone(),
                        instance_type: launched.instance_type,
                        market: request.option.market.to_string(),
                        client_token: request.client_token,
                    });
                    return Ok(Launch::Started(launched.instance_id));
                }
                Err(LaunchError::AlreadyLaunched) => {
                    let reason = format!(
                        "already launched: ClientToken {} belongs to an instance that has \
                         terminated",
                        request.client_token
                    );
                    report.skip(&spec.bucket, &spec.key, reason.clone());
                    return Ok(Launch::AlreadyDone {
                        instance_id: None,
                        reason,
                    });
                }
                Err(error @ LaunchError::Capacity { .. }) => {
                    tracing::warn!(option = %request.option, error = %error, "no capacity; trying the next option");
                    capacity_may_return = true;
                    no_capacity.push(format!("{}: {error}", request.option));
                }
                Err(error @ LaunchError::NotAvailable { .. }) => {
                    tracing::warn!(option = %request.option, error = %error, "option cannot launch here; trying the next option");
                    no_capacity.push(format!("{}: {error}", request.option));
                }
                Err(error) => {
                    return Err(Failed {
                        maybe_launched: error.may_have_launched(),
                        ..failed(error.to_string(), error.is_retryable())
                    });
                }
            }
        }
        // Capacity comes back; a type that is not offered, or a missing spot role, does not.
        let what = if capacity_may_return {
            "no launch option had capacity"
        } else {
            "no launch option can launch here"
        };
        Err(failed(
            format!("{what}: {}", no_capacity.join("; ")),
            capacity_may_return,
        ))
    }

    /// Whether the job's attempt already has an instance (in any state EC2 still lists), or
    /// an outcome in its status.json (which outlives EC2's memory of instances and tokens).
    async fn already_done(&self, job: &PlannedJob) -> Result<Option<Launch>, FailedRecord> {
        let spec = &job.spec;
        let failed = |error: String, retryable: bool| FailedRecord {
            bucket: spec.bucket.clone(),
            key: spec.key.clone(),
            error,
            retryable,
        };
        let instances = self
            .launcher
            .instances(&self.config.job.pipeline, Some(&spec.job_id))
            .await
            .map_err(|error| {
                failed(
                    format!("cannot look up the job's instances: {error}"),
                    error.is_retryable(),
                )
            })?;
        let mut of_attempt: Vec<_> = instances
            .iter()
            .filter(|i| i.attempt() == Some(spec.attempt))
            .collect();
        // An active one first: it is the one that counts.
        of_attempt.sort_by_key(|i| !i.is_active());
        if let Some(instance) = of_attempt.first() {
            return Ok(Some(Launch::AlreadyDone {
                instance_id: Some(instance.instance_id.clone()),
                reason: format!(
                    "already launched: attempt {} of job {} is on {} ({})",
                    spec.attempt, spec.job_id, instance.instance_id, instance.state
                ),
            }));
        }
        let status = match read_status(
            &self.statuses,
            &spec.results_bucket,
            &spec.status_key(),
            &spec.job_id,
        )
        .await
        {
            Ok(status) => status,
            // A damaged document tells nothing; the ClientToken still guards the launch.
            Err(error @ StatusError::Invalid { .. }) => {
                tracing::warn!(
                    error = error_chain(&error),
                    "ignoring a damaged status.json"
                );
                None
            }
            Err(error @ StatusError::OtherJob { .. }) => {
                return Err(failed(error_chain(&error), false));
            }
            Err(error) => {
                return Err(failed(
                    format!("cannot read the job's status.json: {}", error_chain(&error)),
                    true,
                ));
            }
        };
        Ok(status
            .filter(|status| {
                status.attempt >= spec.attempt || status.outcome_of(spec.attempt).is_some()
            })
            .map(|status| Launch::AlreadyDone {
                instance_id: None,
                reason: format!(
                    "already ran: s3://{}/{} records attempt {} ({})",
                    spec.results_bucket,
                    spec.status_key(),
                    status.attempt,
                    status.state
                ),
            }))
    }

    /// The launch options in the order to try them: as configured, or with the spot types
    /// cheapest first when `S3SPOT_ORDER_BY_PRICE` is on. Prices are read once per invocation;
    /// when they cannot be read, the configured order stands.
    async fn options(&self, state: &mut InvocationState) -> Vec<LaunchOption> {
        let launch = &self.config.launch;
        if !launch.order_by_price || launch.instance_types.len() < 2 {
            return launch.options();
        }
        if state.price_order.is_none() {
            let query = PriceQuery {
                instance_types: launch.instance_types.clone(),
                ..PriceQuery::default()
            };
            let order = match self.launcher.spot_prices(&query).await {
                Ok(history) => {
                    let quotes =
                        prices::current(&history, self.config.job.region.as_deref().unwrap_or(""));
                    prices::order_by_price(&launch.instance_types, &quotes)
                }
                Err(error) => {
                    tracing::warn!(error = %error, "cannot read spot prices; trying the instance types in the configured order");
                    launch.instance_types.clone()
                }
            };
            tracing::info!(order = ?order, "instance types by current spot price");
            state.price_order = Some(order);
        }
        let mut ordered = launch.clone();
        ordered.instance_types = state.price_order.clone().unwrap_or_default();
        ordered.options()
    }
}

/// The `RunInstances` request for one launch option of a planned job.
fn launch_request(
    launch: &LaunchConfig,
    spec: &JobSpec,
    user_data: &str,
    tags: &[(String, String)],
    option: LaunchOption,
) -> LaunchRequest {
    LaunchRequest {
        template: launch.template.clone(),
        template_version: launch.template_version.clone(),
        client_token: client_token(&spec.job_id, spec.attempt, &option),
        user_data: user_data.to_owned(),
        tags: tags.to_vec(),
        option,
    }
}

/// The requests the function would make, option by option, for the first attempt of `object`:
/// for `s3spot doctor` to try with `DryRun`. `None` when the function would skip the object.
pub fn launch_requests(
    config: &Config,
    object: ObjectCreated,
) -> Result<Option<Vec<LaunchRequest>>, String> {
    match crate::plan::decide(&config.job, crate::event::Record::Created(object), 1) {
        crate::plan::Decision::Launch { job, .. } => {
            let tags = job_tags(&config.job.pipeline, &job.spec);
            let user_data = job.user_data.to_base64();
            Ok(Some(
                config
                    .launch
                    .options()
                    .into_iter()
                    .map(|option| {
                        launch_request(&config.launch, &job.spec, &user_data, &tags, option)
                    })
                    .collect(),
            ))
        }
        crate::plan::Decision::Skip { .. } => Ok(None),
        crate::plan::Decision::Fail { error, .. } => Err(error),
    }
}

/// The cap on pending and running instances of the pipeline.
///
/// The count is read again before every launch, because other launchers run at the same time:
/// the queue's pollers, the reaper, an operator's `retry`. Between a launcher's count and its
/// instance showing in EC2's answers, each of the others may launch once on the same count, so
/// with C launchers at once the pipeline can reach `max + C - 1` instances, never more (beyond
/// EC2 listing a new instance late: its API is eventually consistent). Counted once per
/// invocation instead, each concurrent invocation could fill the whole cap.
#[derive(Default)]
struct RunawayGuard {
    /// The first count of this invocation, and the launches made since: an instance launched a
    /// moment ago may not be listed yet, and this invocation knows of it all the same.
    first: Option<usize>,
    launched: usize,
    /// The count that found the cap: the rest of the invocation's records wait too, without
    /// asking EC2 again.
    full: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
enum GuardError {
    #[error(
        "runaway guard: at least {active} instances of pipeline {pipeline:?} are pending or running, at \
         the S3SPOT_MAX_INSTANCES cap of {max}; not launching now, the event will be retried"
    )]
    AtCap {
        active: usize,
        max: u32,
        pipeline: String,
    },
    #[error("runaway guard: cannot count running instances, so not launching")]
    Count(#[source] LaunchError),
}

impl RunawayGuard {
    async fn check(
        &mut self,
        launcher: &impl Launcher,
        pipeline: &str,
        max: u32,
    ) -> Result<(), GuardError> {
        let active = match self.full {
            Some(full) => full,
            None => {
                let listed = launcher
                    .count_active(pipeline, max as usize)
                    .await
                    .map_err(GuardError::Count)?;
                let first = *self.first.get_or_insert(listed);
                listed.max(first + self.launched)
            }
        };
        if active >= max as usize {
            self.full = Some(active);
            return Err(GuardError::AtCap {
                active,
                max,
                pipeline: pipeline.into(),
            });
        }
        Ok(())
    }

    fn launched(&mut self) {
        self.launched += 1;
    }
}
