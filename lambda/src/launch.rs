//! Launching one planned job: at most one instance per attempt, through the runaway guard and
//! the launch options in order.

use std::future::Future;
use std::pin::Pin;

use s3spot_bootstrap::{StatusError, StatusStore, error_chain, read_status};

use crate::config::LaunchOption;
use crate::handler::Handler;
use crate::launcher::{LaunchError, LaunchRequest, Launcher, PriceQuery, job_tags};
use crate::plan::PlannedJob;
use crate::prices;
use crate::report::{FailedRecord, LaunchedJob, Report};
use crate::token::client_token;

/// What one invocation reads from EC2 once and then keeps: the guard's count, and the order of
/// the instance types by price.
#[derive(Default)]
pub(crate) struct InvocationState {
    guard: RunawayGuard,
    price_order: Option<Vec<String>>,
}

/// What became of a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Launch {
    /// On this instance: a new one, or the one EC2 already had for the same request.
    Started(String),
    /// Nothing launched: the attempt has an instance, or has run. Reported as skipped.
    AlreadyDone {
        instance_id: Option<String>,
        reason: String,
    },
}

impl<L: Launcher, S: StatusStore> Handler<L, S> {
    /// Launches `job` unless its attempt already has an instance or an outcome, and records in
    /// `report` what became of it.
    ///
    /// `ClientToken`s alone cannot promise one instance per attempt: each launch option has its
    /// own (falling back from spot to on-demand is a new request), EC2 forgets them about 24
    /// hours after the instance ends, and moto never de-duplicates. So EC2 and status.json are
    /// asked first.
    pub(crate) async fn launch(
        &self,
        job: &PlannedJob,
        state: &mut InvocationState,
        report: &mut Report,
    ) -> Result<Launch, FailedRecord> {
        let spec = &job.spec;
        let failed = |error: String, retryable: bool| FailedRecord {
            bucket: spec.bucket.clone(),
            key: spec.key.clone(),
            error,
            retryable,
        };
        // Type-erased: the S3 and EC2 calls in it would otherwise nest every launch's future
        // deeper than the compiler follows.
        let already_done: Pin<Box<dyn Future<Output = _> + Send + '_>> =
            Box::pin(self.already_done(job));
        if let Some(done) = already_done.await? {
            if let Launch::AlreadyDone { reason, .. } = &done {
                report.skip(&spec.bucket, &spec.key, reason.clone());
            }
            return Ok(done);
        }
        let launch = &self.config.launch;
        let pipeline = &self.config.job.pipeline;
        state
            .guard
            .check(&self.launcher, pipeline, launch.max_instances)
            .await
            .map_err(|error| failed(error_chain(&error), true))?;
        let options = self.options(state).await;

        let tags = job_tags(pipeline, spec);
        let user_data = job.user_data.to_base64();
        let mut no_capacity = Vec::new();
        for option in options {
            let request = LaunchRequest {
                template: launch.template.clone(),
                template_version: launch.template_version.clone(),
                client_token: client_token(&spec.job_id, spec.attempt, &option),
                user_data: user_data.clone(),
                tags: tags.clone(),
                option,
            };
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
                    no_capacity.push(format!("{}: {error}", request.option));
                }
                Err(error) => return Err(failed(error.to_string(), error.is_retryable())),
            }
        }
        Err(failed(
            format!("no launch option had capacity: {}", no_capacity.join("; ")),
            true,
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

/// The cap on pending and running instances of the pipeline. The count is read once per
/// invocation, on the first launch, and then kept up to date locally.
#[derive(Default)]
struct RunawayGuard {
    active: Option<usize>,
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
        let active = match self.active {
            Some(active) => active,
            None => {
                let active = launcher
                    .count_active(pipeline, max as usize)
                    .await
                    .map_err(GuardError::Count)?;
                *self.active.insert(active)
            }
        };
        if active >= max as usize {
            return Err(GuardError::AtCap {
                active,
                max,
                pipeline: pipeline.into(),
            });
        }
        Ok(())
    }

    fn launched(&mut self) {
        if let Some(active) = &mut self.active {
            *active += 1;
        }
    }
}
