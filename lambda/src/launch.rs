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
    Claim, EventInstance, Expect, Instance, JobEvent, JobSpec, JobState, LaunchPrice, Recorded,
    State, Status, StatusError, StatusStore, Usd, Waiting, WaitingPool, Writer, error_chain,
    parse_timestamp, read_claim, read_status, timestamp, write_claim,
};

use crate::config::{Config, LaunchConfig, MarketType};
use crate::event::ObjectCreated;
use crate::handler::Handler;
use crate::jobs::record_announced;
use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launcher, PoolError, PriceQuery, Refusal, job_tags,
};
use crate::plan::PlannedJob;
use crate::report::{FailedRecord, LaunchedJob, Report};
use crate::token::{RequestShape, client_token};

/// A claim with no instance and no release is taken to be abandoned after this long: longer
/// than any launch takes (the template's function timeout is 50 s), and shorter than the
/// queue's visibility timeout (300 s), so the redelivery of an event whose launcher died finds
/// it abandoned.
pub const CLAIM_LEASE: Duration = Duration::from_secs(180);

/// What one invocation learns from EC2 and keeps: the guard's count, whether EC2 is throttling
/// launches, and when the next launch may go.
#[derive(Default)]
pub(crate) struct InvocationState {
    guard: RunawayGuard,
    /// EC2 refused a launch for its request rate: the rest of the invocation's records wait
    /// for the queue to bring them back, rather than add to the throttling.
    throttled: Option<String>,
    next_launch: Option<tokio::time::Instant>,
}

impl InvocationState {
    /// Spaces this invocation's launches `1 / rate` seconds apart: EC2 refills its launch
    /// bucket at about 2 instances a second, and a burst past it is refused.
    async fn pace(&mut self, interval: Duration) {
        let now = tokio::time::Instant::now();
        let at = self.next_launch.map_or(now, |next| next.max(now));
        tokio::time::sleep_until(at).await;
        self.next_launch = Some(at + interval);
    }
}

/// Why a launch is made, which decides whether the runaway guard applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A job's attempt from its upload's event: bounded by `S3SPOT_MAX_INSTANCES`. While it
    /// cannot launch, its status says `waiting`, and the event's next delivery tries again.
    New,
    /// An attempt an operator asked for (`s3spot jobs retry`): bounded by the cap too, but
    /// answered there and then; no delivery comes back for it.
    Retry,
    /// The next attempt of one that EC2 took back. Not bounded by the cap: it replaces an
    /// instance rather than adding one, and refusing it would leave its job without an outcome.
    Replacement,
}

/// What became of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    /// On this instance: a new one, or the one EC2 already had for the same request.
    Started(String, Box<Placed>),
    /// Nothing launched: the attempt has an instance, has run, or is being launched by another
    /// delivery. Reported as skipped.
    AlreadyDone {
        instance_id: Option<String>,
        reason: String,
    },
}

/// Where a launched instance landed, as EC2's answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Placed {
    instance_type: Option<String>,
    /// A zone, or a subnet when EC2 named no zone.
    placement: Option<String>,
    market: MarketType,
    /// When EC2 answered with it.
    at: SystemTime,
}

/// How long the price of a launched instance is looked for: the claim waits for it. Within
/// the pause between two launches at the slowest launch rate, so it costs the batch no time.
const PRICE_LOOKUP: Duration = Duration::from_secs(2);

/// A launch that failed.
struct Failed {
    record: FailedRecord,
    /// The outcome is not known: an instance may have been launched.
    maybe_launched: bool,
    /// What each pool tried said, when a fleet request was made.
    pools: Vec<PoolError>,
    /// No launch of this attempt can ever succeed (every pool refused for good, an object too
    /// big for any disk): its status says `failed` and no delivery tries again.
    for_good: bool,
    /// EC2 refused the request for its rate: a wait, though an earlier try of the SDK's may have
    /// launched (the claim stays pending, and its token unused if none did).
    throttled: bool,
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
        let (mut done, waiting_since, found) = already_done.await?;
        let waited = waiting_since.is_some();
        let mut held = None;
        if done.is_none() {
            let claimed: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(self.claim(job));
            match claimed.await? {
                Claimed::Held { claim, expect } => held = Some((claim, expect)),
                Claimed::Elsewhere(launch) => done = Some(launch),
            }
        }
        if let Some(done) = done {
            if let Launch::AlreadyDone {
                reason,
                instance_id,
            } = &done
            {
                // Listed as waiting, yet launched (by a delivery whose outcome was unknown, or
                // one whose list update was lost): it waits no more.
                if let (Some(since), Some(instance_id)) = (waiting_since, instance_id) {
                    self.stop_waiting(spec, since, instance_id).await;
                }
                report.skip(&spec.bucket, &spec.key, reason.clone());
            }
            if let Some(found) = &found {
                let adopted: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                    Box::pin(self.adopt(spec, found, waited));
                adopted.await;
            }
            return Ok(done);
        }
        let (mut claim, expect) = held.expect("a launch that is not done holds the claim");
        let launched: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(self.launch_held(job, purpose, claim.refused, state, report));
        let mut launched = launched.await;
        match &mut launched {
            // Only an event's delivery comes back to try again; a replacement's wait is the
            // recovery's to account for (see `recover`), and a retry answers the operator. A
            // launch whose outcome is unknown is looked up again before anything is said.
            Err(failure)
                if failure.record.retryable
                    && (!failure.maybe_launched || failure.throttled)
                    && purpose == Purpose::New =>
            {
                self.wait_or_give_up(job, &mut claim, failure).await;
            }
            Err(failure) if failure.for_good && purpose != Purpose::Replacement => {
                let error = failure.record.error.clone();
                self.fail_for_good(spec, &mut claim, &error).await;
            }
            Ok(Launch::Started(instance_id, _)) => {
                if let Some(since) = claim.since.clone().or(waiting_since.clone()) {
                    self.stop_waiting(spec, since, instance_id).await;
                }
            }
            _ => {}
        }
        let waited = claim.since.is_some() || waited;
        match &launched {
            Ok(Launch::Started(instance_id, placed)) => {
                claim.instance_id = Some(instance_id.clone());
                let volume_gib = self.config.launch.volume_gib(spec.size).ok().flatten();
                let price: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                    Box::pin(self.price_at_launch(placed, volume_gib));
                claim.price = Some(price.await);
            }
            Ok(Launch::AlreadyDone {
                instance_id: Some(instance_id),
                ..
            }) => claim.instance_id = Some(instance_id.clone()),
            Ok(Launch::AlreadyDone { reason, .. }) => claim.done = Some(reason.clone()),
            // Failed for good, or given up after waiting: no delivery launches it any more.
            Err(failure) if !failure.record.retryable && claim.done.is_some() => {}
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
        if let Ok(Launch::Started(instance_id, placed)) = &launched {
            let announced: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                Box::pin(self.announce_launch(spec, instance_id, placed, &claim, waited));
            announced.await;
        }
        launched.map_err(|failure| failure.record)
    }

    /// `launched`, for the instance `claim` now names.
    async fn announce_launch(
        &self,
        spec: &JobSpec,
        instance_id: &str,
        placed: &Placed,
        claim: &Claim,
        waited: bool,
    ) {
        let mut event = JobEvent::new(
            &self.config.job.pipeline,
            spec,
            JobState::Launched,
            waited.then_some(JobState::Waiting),
            Writer::Launcher,
        );
        event.time = timestamp(placed.at);
        event.instance = Some(EventInstance {
            id: Some(instance_id.to_owned()),
            instance_type: placed.instance_type.clone(),
            market: Some(placed.market.to_string()),
            zone: claim.price.as_ref().and_then(|p| p.zone.clone()),
        });
        self.events.emit(event).await;
    }

    /// An instance of this attempt that EC2 lists, though the attempt's claim, abandoned, names
    /// none: a delivery launched it, did not learn so (a timeout, a lost answer), and died. The
    /// claim gets the instance and its price, and the launch is announced: once, by whichever
    /// delivery's write of the claim holds. A claim still within its lease belongs to a launch
    /// under way, which records its own instance.
    async fn adopt(&self, spec: &JobSpec, instance: &InstanceInfo, waited: bool) {
        let key = spec.claim_key();
        let Ok(Some(stored)) = read_claim(&self.statuses, &spec.results_bucket, &key).await else {
            return;
        };
        let Ok(mut claim) = stored.claim else { return };
        let abandoned = claim
            .age(SystemTime::now())
            .is_none_or(|age| age >= CLAIM_LEASE);
        if !claim.is_pending() || !abandoned {
            return;
        }
        let waited = waited || claim.since.is_some();
        // Found after its worker reported (a short job, a redelivery minutes later): the
        // claim still gets the instance, but `launched` would come after the outcome.
        let ended = !instance.is_active()
            || read_status(
                &self.statuses,
                &spec.results_bucket,
                &spec.status_key(),
                &spec.job_id,
            )
            .await
            .ok()
            .flatten()
            .is_some_and(|status| status.outcome_of(spec.attempt).is_some());
        let placed = Placed {
            instance_type: instance.instance_type.clone(),
            placement: None,
            market: if instance.market == "on-demand" {
                MarketType::OnDemand
            } else {
                MarketType::Spot
            },
            at: instance
                .launched_at
                .and_then(|secs| u64::try_from(secs).ok())
                .map_or_else(SystemTime::now, |secs| {
                    std::time::UNIX_EPOCH + Duration::from_secs(secs)
                }),
        };
        let volume_gib = self.config.launch.volume_gib(spec.size).ok().flatten();
        claim.instance_id = Some(instance.instance_id.clone());
        claim.price = Some(self.price_at_launch(&placed, volume_gib).await);
        match write_claim(
            &self.statuses,
            &spec.results_bucket,
            &key,
            &claim,
            &stored.expect,
        )
        .await
        {
            Ok(_) => {
                tracing::info!(
                    instance_id = instance.instance_id,
                    "an instance launched by an earlier delivery is the attempt's"
                );
                if !ended {
                    self.announce_launch(spec, &instance.instance_id, &placed, &claim, waited)
                        .await;
                }
            }
            Err(error) => tracing::info!(
                error = error_chain(&error),
                "the claim changed meanwhile: whoever changed it records the instance"
            ),
        }
    }

    /// What the instance EC2 placed costs an hour: the spot price of its type in its zone in
    /// effect now (the highest among the zones when EC2 named only a subnet), or the on-demand
    /// list price for an on-demand instance, or for a spot one whose price EC2 did not give.
    /// Never fails: a price that cannot be found says why, and the attempt has no cost.
    async fn price_at_launch(&self, placed: &Placed, volume_gib: Option<u64>) -> LaunchPrice {
        let Some(instance_type) = placed.instance_type.clone() else {
            // A Batch job: Batch places it on an instance that its jobs share, later.
            return LaunchPrice {
                instance_type: String::new(),
                zone: None,
                market: placed.market.to_string(),
                usd_per_hour: None,
                source: "no instance of its own to price: the provider places the job on \
                         instances its jobs share"
                    .to_owned(),
                on_demand_usd_per_hour: None,
                launched_at: timestamp(placed.at),
                volume_gib,
            };
        };
        let region = self.config.job.region.as_deref().unwrap_or_default();
        let zone = placed
            .placement
            .clone()
            .filter(|p| !p.starts_with("subnet-"));
        let on_demand = crate::prices::on_demand_usd_per_hour(region, &instance_type).map(Usd);
        let spot = match placed.market {
            MarketType::OnDemand => Err("an on-demand instance".to_owned()),
            MarketType::Spot => {
                let at = placed.at;
                self.spot_price(&instance_type, zone.as_deref(), region, at)
                    .await
            }
        };
        let (usd_per_hour, source) = match (spot, on_demand) {
            (Ok(found), _) => (Some(found.0), found.1),
            (Err(_), Some(usd)) if placed.market == MarketType::OnDemand => {
                (Some(usd), "on-demand list price".to_owned())
            }
            (Err(why), Some(usd)) => (Some(usd), format!("on-demand list price ({why})")),
            (Err(why), None) => (
                None,
                format!("{why}, and no on-demand price known for {instance_type} in {region:?}"),
            ),
        };
        LaunchPrice {
            instance_type,
            zone,
            market: placed.market.to_string(),
            usd_per_hour,
            source,
            on_demand_usd_per_hour: on_demand,
            launched_at: timestamp(placed.at),
            volume_gib,
        }
    }

    /// The spot price of `instance_type` in effect `at` the launch, in `zone` or the highest
    /// among zones, and where it comes from; or why there is none.
    async fn spot_price(
        &self,
        instance_type: &str,
        zone: Option<&str>,
        region: &str,
        at: SystemTime,
    ) -> Result<(Usd, String), String> {
        let at = at
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|d| i64::try_from(d.as_secs()).ok());
        // The same start and end: the price in effect then in each zone (EC2 answers with the
        // last change before it), one page, not the history.
        let query = PriceQuery {
            instance_types: vec![instance_type.to_owned()],
            availability_zone: zone.map(str::to_owned),
            since: at,
            until: at,
        };
        let history =
            match tokio::time::timeout(PRICE_LOOKUP, self.launcher.spot_prices(&query)).await {
                Ok(Ok(history)) => history,
                Ok(Err(error)) => return Err(format!("no spot price: {error}")),
                Err(_) => return Err("no spot price: EC2 did not answer in time".to_owned()),
            };
        crate::prices::current(&history, region)
            .iter()
            .filter(|q| q.instance_type == instance_type)
            .filter(|q| zone.is_none_or(|z| z == q.availability_zone))
            .map(|q| q.spot_usd_per_hour)
            .reduce(f64::max)
            .map(|usd| match zone {
                Some(_) => (Usd(usd), "spot price at launch".to_owned()),
                None => (
                    Usd(usd),
                    "spot price at launch, the highest among zones (EC2 named no zone)".to_owned(),
                ),
            })
            .ok_or_else(|| format!("EC2 gave no spot price for {instance_type}"))
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

    /// The launch itself, under the attempt's claim: the guard, then one fleet request per
    /// market, on-demand only when spot launched nothing.
    async fn launch_held(
        &self,
        job: &PlannedJob,
        purpose: Purpose,
        tries_refused: u32,
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
            pools: Vec::new(),
            for_good: false,
            throttled: false,
        };
        let launch = &self.config.launch;
        let pipeline = &self.config.job.pipeline;
        if purpose != Purpose::Replacement {
            state
                .guard
                .check(&self.launcher, pipeline, launch.max_instances)
                .await
                .map_err(|error| failed(error_chain(&error), true))?;
        }
        if let Some(reason) = &state.throttled {
            return Err(failed(reason.clone(), true));
        }
        let volume_gib = launch.volume_gib(spec.size).map_err(|reason| Failed {
            for_good: true,
            ..failed(format!("cannot size the job's disk: {reason}"), false)
        })?;

        let tags = job_tags(pipeline, spec);
        let user_data = job.user_data.to_base64();
        let mut refused: Vec<PoolError> = Vec::new();
        for &market in launch.markets() {
            let request = launch_request(
                launch,
                spec,
                &user_data,
                &tags,
                market,
                volume_gib,
                tries_refused,
            );
            state.pace(launch.launch_interval).await;
            match self.launcher.launch(&request).await {
                Ok(launched) => {
                    state.guard.launched();
                    tracing::info!(
                        bucket = spec.bucket,
                        key = ?spec.key,
                        job_id = spec.job_id,
                        attempt = spec.attempt,
                        instance_id = launched.instance_id,
                        instance_type = launched.instance_type,
                        placement = launched.placement,
                        market = %market,
                        client_token = request.client_token,
                        "launched"
                    );
                    report.launched.push(LaunchedJob {
                        bucket: spec.bucket.clone(),
                        key: spec.key.clone(),
                        instance_id: launched.instance_id.clone(),
                        instance_type: launched.instance_type.clone(),
                        market: market.to_string(),
                        client_token: request.client_token,
                    });
                    return Ok(Launch::Started(
                        launched.instance_id,
                        Box::new(Placed {
                            instance_type: launched.instance_type,
                            placement: launched.placement,
                            market,
                            at: SystemTime::now(),
                        }),
                    ));
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
                Err(LaunchError::NoInstance { pools }) => {
                    tracing::warn!(market = %market, pools = ?pools, "the fleet request launched no instance");
                    refused.extend(pools);
                }
                Err(
                    LaunchError::Capacity { code, message }
                    | LaunchError::Quota { code, message }
                    | LaunchError::NotAvailable { code, message },
                ) => {
                    tracing::warn!(market = %market, code, message, "the fleet request was refused");
                    refused.push(PoolError {
                        pool: format!("{market}, every pool"),
                        code,
                        message,
                    });
                }
                Err(error) => {
                    if error.is_throttling() {
                        state.throttled = Some(format!(
                            "EC2 is throttling launches ({error}); the records after it wait \
                             for their next delivery"
                        ));
                    }
                    return Err(Failed {
                        maybe_launched: error.may_have_launched(),
                        throttled: error.is_throttling(),
                        ..failed(error.to_string(), error.is_retryable())
                    });
                }
            }
        }
        let retryable = refused.iter().any(|pool| pool.refusal().is_retryable());
        // A refusal of the account's setup (a permission, the spot role, an opt-in) is fixed by
        // its owner, who then redrives the dead-letter queue: that must launch, so it is not
        // recorded as final.
        let setup = refused.iter().any(|pool| {
            ["Unauthorized", "AuthFailure", "OptInRequired", "Blocked"]
                .iter()
                .any(|code| pool.code.starts_with(code))
        });
        Err(Failed {
            pools: refused.clone(),
            for_good: !retryable && !setup,
            ..failed(refusal_reason(&refused), retryable)
        })
    }

    /// A launch that may succeed later: past `S3SPOT_MAX_WAIT` since the attempt was first
    /// claimed, it fails for good with its last reason; before, its status says `waiting`, why,
    /// and when it is tried again.
    async fn wait_or_give_up(&self, job: &PlannedJob, claim: &mut Claim, failure: &mut Failed) {
        let spec = &job.spec;
        let launch = &self.config.launch;
        let now = SystemTime::now();
        let since = claim
            .since
            .clone()
            .unwrap_or_else(|| claim.claimed_at.clone());
        let waited = claim.waited(now).unwrap_or_default();
        if waited >= launch.max_wait && !failure.maybe_launched {
            let error = format!(
                "waited {} for an instance, past S3SPOT_MAX_WAIT={}; last: {}",
                humantime::format_duration(Duration::from_secs(waited.as_secs())),
                humantime::format_duration(launch.max_wait),
                failure.record.error
            );
            tracing::warn!(
                job_id = spec.job_id,
                attempt = spec.attempt,
                error,
                "giving up"
            );
            failure.record.error.clone_from(&error);
            failure.record.retryable = false;
            claim.done = Some(error.clone());
            let status = Status::verdict(spec, Instance::default(), State::Failed, error);
            self.record_and_unlist(spec, status, "the failure").await;
            return;
        }
        let at = |after: Duration| {
            parse_timestamp(&since)
                .map(|start| timestamp(start + after))
                .unwrap_or_default()
        };
        let status = Status::waiting(
            spec,
            Waiting {
                reason: failure.record.error.clone(),
                pools: failure
                    .pools
                    .iter()
                    .map(|pool| WaitingPool {
                        pool: pool.pool.clone(),
                        code: pool.code.clone(),
                        message: pool.message.clone(),
                    })
                    .collect(),
                since: since.clone(),
                next_try: Some(timestamp(now + launch.retry_after)),
                gives_up_at: Some(at(launch.max_wait)).filter(|t| !t.is_empty()),
                instance_id: None,
            },
        );
        // The claim carries the wait on: a delivery that takes it over keeps its `since`.
        if claim.since.is_none() {
            claim.since = Some(since);
        }
        let bucket = &spec.results_bucket;
        let recorded: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(record_announced(
            &self.statuses,
            &self.events,
            &self.config.job.pipeline,
            spec,
            status.clone(),
        ));
        match recorded.await {
            Ok(Recorded::Written(_)) => {}
            // The status moved on (a later attempt, an outcome): nothing to list.
            Ok(Recorded::Kept { .. }) => return,
            Err(error) => {
                tracing::warn!(
                    error = error_chain(&error),
                    "cannot record the wait in status.json"
                );
            }
        }
        let key = spec.waiting_key();
        let body = serde_json::to_vec_pretty(&status).expect("a Status always serializes");
        let listed: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(self.statuses.put(bucket, &key, body, &Expect::Anything));
        if let Err(error) = listed.await {
            tracing::warn!(
                error = error_chain(&error),
                "cannot update the list of waiting jobs"
            );
        }
    }

    /// No launch of this attempt can succeed: its status says `failed`, with why, its claim
    /// that it is done, and it leaves the list of waiting jobs.
    async fn fail_for_good(&self, spec: &JobSpec, claim: &mut Claim, error: &str) {
        claim.done = Some(format!("failed for good: {error}"));
        let status = Status::verdict(spec, Instance::default(), State::Failed, error.to_owned());
        self.record_and_unlist(spec, status, "the failure").await;
    }

    /// The job launched after waiting: its status says so until its worker reports, and it
    /// leaves the list of waiting jobs.
    async fn stop_waiting(&self, spec: &JobSpec, since: String, instance_id: &str) {
        let status = Status::waiting(
            spec,
            Waiting {
                reason: format!(
                    "launched on {instance_id} after waiting since {since}; its worker has not \
                     reported yet"
                ),
                pools: Vec::new(),
                since,
                next_try: None,
                gives_up_at: None,
                instance_id: Some(instance_id.to_owned()),
            },
        );
        self.record_and_unlist(spec, status, "the launch").await;
    }

    /// Records `status` (`what` it says, for the log), then takes the job off the list of
    /// waiting jobs. If the status cannot be written, the job stays listed: the reaper looks at
    /// it again once its wait is over, and finds what became of it.
    async fn record_and_unlist(&self, spec: &JobSpec, status: Status, what: &str) {
        let recorded: Pin<Box<dyn Future<Output = _> + Send + '_>> = Box::pin(record_announced(
            &self.statuses,
            &self.events,
            &self.config.job.pipeline,
            spec,
            status,
        ));
        if let Err(error) = recorded.await {
            tracing::warn!(
                error = error_chain(&error),
                "cannot record {what} in status.json"
            );
            return;
        }
        let key = spec.waiting_key();
        let deleted: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(self.statuses.delete(&spec.results_bucket, &key));
        if let Err(error) = deleted.await {
            tracing::warn!(
                error = error_chain(&error),
                "cannot update the list of waiting jobs"
            );
        }
    }

    /// Whether the job's attempt already has an instance (in any state EC2 still lists), or
    /// an outcome in its status.json (which outlives EC2's memory of instances and tokens).
    ///
    /// Also says since when the job has waited, if its status.json says it waits.
    async fn already_done(
        &self,
        job: &PlannedJob,
    ) -> Result<(Option<Launch>, Option<String>, Option<InstanceInfo>), FailedRecord> {
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
        // An instance of a later attempt means this one is behind the job too: an operator's
        // retry, or a replacement, launched after it.
        let mut of_attempt: Vec<_> = instances
            .iter()
            .filter(|i| i.attempt().is_some_and(|a| a >= spec.attempt))
            .collect();
        // This attempt's own, and an active one, first: it is the one that counts.
        of_attempt.sort_by_key(|i| (i.attempt() != Some(spec.attempt), !i.is_active()));
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
            // With an instance found, the status only says whether the job was listed waiting.
            Err(_) if !of_attempt.is_empty() => None,
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
        // The wait of this attempt, or of one this launch supersedes (an operator's retry).
        let waiting_since = status
            .as_ref()
            .filter(|status| status.is_waiting() && status.attempt <= spec.attempt)
            .and_then(|status| status.waiting.as_ref())
            .filter(|waiting| waiting.instance_id.is_none())
            .map(|waiting| waiting.since.clone());
        if let Some(instance) = of_attempt.first() {
            let own = (instance.attempt() == Some(spec.attempt)).then(|| (*instance).clone());
            return Ok((
                Some(Launch::AlreadyDone {
                    instance_id: Some(instance.instance_id.clone()),
                    reason: format!(
                        "already launched: attempt {} of job {} is on {} ({})",
                        instance.attempt().unwrap_or(spec.attempt),
                        spec.job_id,
                        instance.instance_id,
                        instance.state
                    ),
                }),
                waiting_since,
                own,
            ));
        }
        let done = status
            // A waiting status is no outcome: the attempt is still to launch.
            .filter(|status| {
                status.attempt > spec.attempt || status.outcome_of(spec.attempt).is_some()
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
            });
        Ok((done, waiting_since, None))
    }
}

/// The reason, in words, that no pool launched: what most of them said, with the count.
fn refusal_reason(refused: &[PoolError]) -> String {
    let mut codes: Vec<(String, usize)> = Vec::new();
    for pool in refused {
        match codes.iter_mut().find(|(code, _)| *code == pool.code) {
            Some((_, n)) => *n += 1,
            None => codes.push((pool.code.clone(), 1)),
        }
    }
    let kinds: Vec<Refusal> = refused.iter().map(PoolError::refusal).collect();
    let what = if kinds.contains(&Refusal::Capacity) {
        "no capacity"
    } else if kinds.contains(&Refusal::Quota) {
        "an account quota is reached"
    } else if kinds.contains(&Refusal::Transient) {
        "EC2 could not launch for now"
    } else {
        "no pool can launch here"
    };
    let tally = codes
        .iter()
        .map(|(code, n)| format!("{code} \u{d7}{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let detail = refused
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    format!(
        "{what}: {} pool(s) tried, none launched ({tally}): {detail}",
        refused.len()
    )
}

/// The fleet request for one market of a planned job.
fn launch_request(
    launch: &LaunchConfig,
    spec: &JobSpec,
    user_data: &str,
    tags: &[(String, String)],
    market: MarketType,
    volume_gib: Option<u64>,
    refused: u32,
) -> LaunchRequest {
    let pools = launch.pools();
    LaunchRequest {
        template: launch.template.clone(),
        template_version: launch.template_version.clone(),
        client_token: client_token(
            &spec.job_id,
            spec.attempt,
            RequestShape {
                market,
                pools: &pools,
                requirements: launch.requirements.as_ref(),
                volume_gib,
                refused,
            },
        ),
        market,
        pools,
        requirements: launch.requirements.clone(),
        volume_gib,
        root_device: launch.root_device.clone(),
        user_data: user_data.to_owned(),
        tags: tags.to_vec(),
    }
}

/// The requests the function would make, market by market, for the first attempt of `object`:
/// for `s3spot doctor` to try with `DryRun`. `None` when the function would skip the object.
pub fn launch_requests(
    config: &Config,
    object: ObjectCreated,
) -> Result<Option<Vec<LaunchRequest>>, String> {
    match crate::plan::decide(&config.job, crate::event::Record::Created(object), 1) {
        crate::plan::Decision::Launch { job, .. } => {
            let tags = job_tags(&config.job.pipeline, &job.spec);
            let user_data = job.user_data.to_base64();
            let volume_gib = config.launch.volume_gib(job.spec.size)?;
            Ok(Some(
                config
                    .launch
                    .markets()
                    .iter()
                    .map(|&market| {
                        launch_request(
                            &config.launch,
                            &job.spec,
                            &user_data,
                            &tags,
                            market,
                            volume_gib,
                            0,
                        )
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
