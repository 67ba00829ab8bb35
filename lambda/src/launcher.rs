//! The seam between deciding and launching: everything the handler asks of EC2.

use std::future::Future;

use s3spot_bootstrap::JobSpec;

use crate::config::{LaunchTemplate, MarketType};
use crate::fleet::{InstanceRequirements, Pool};

/// Tags s3spot puts on every instance and volume it launches.
pub const TAG_NAME: &str = "Name";
pub const TAG_PIPELINE: &str = "s3spot:pipeline";
pub const TAG_BUCKET: &str = "s3spot:bucket";
pub const TAG_KEY: &str = "s3spot:key";
pub const TAG_JOB: &str = "s3spot:job";
pub const TAG_ATTEMPT: &str = "s3spot:attempt";
/// The job's upload folder under its key's results (see `JobSpec::upload`).
pub const TAG_UPLOAD: &str = "s3spot:upload";
/// The job's own max runtime, in seconds: whether it is stuck is judged by the limit it was
/// launched with, not by the function's current one.
pub const TAG_MAX_RUNTIME: &str = "s3spot:max-runtime";

/// EC2 tag values hold at most 256 Unicode characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;

/// Tags for a job's instance and its volumes: enough to find, count, judge and re-run the job.
pub fn job_tags(pipeline: &str, spec: &JobSpec) -> Vec<(String, String)> {
    let bounded = |value: String| value.chars().take(MAX_TAG_VALUE_CHARS).collect::<String>();
    vec![
        (TAG_NAME.into(), bounded(format!("s3spot: {}", spec.key))),
        (TAG_PIPELINE.into(), pipeline.into()),
        (TAG_BUCKET.into(), spec.bucket.clone()),
        (TAG_KEY.into(), bounded(spec.key.clone())),
        (TAG_JOB.into(), spec.job_id.clone()),
        (TAG_UPLOAD.into(), spec.upload()),
        (TAG_ATTEMPT.into(), spec.attempt.to_string()),
        (TAG_MAX_RUNTIME.into(), spec.max_runtime_secs.to_string()),
    ]
}

/// One fleet request for one instance (EC2's `CreateFleet` of type `instant`), fully decided: a
/// launcher adds nothing of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub template: LaunchTemplate,
    pub template_version: String,
    pub market: MarketType,
    /// Where the instance may come from; EC2 picks among them (price-capacity-optimized for
    /// spot, the lowest price on demand).
    pub pools: Vec<Pool>,
    /// With these, EC2 chooses the types of each pool itself.
    pub requirements: Option<InstanceRequirements>,
    /// The root volume's size in GiB, on `root_device`; `None`: the template's volume.
    pub volume_gib: Option<u64>,
    pub root_device: String,
    /// Base64 of the bootstrap script.
    pub user_data: String,
    pub client_token: String,
    /// For the instance.
    pub tags: Vec<(String, String)>,
}

/// A running (or pending) instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    pub instance_id: String,
    pub instance_type: Option<String>,
    /// The zone or subnet it came from, as far as the provider says.
    pub placement: Option<String>,
}

/// Why one pool gave no instance, as EC2 said it in the fleet's answer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolError {
    /// `spot m5.large in subnet-0abc`.
    pub pool: String,
    /// `InsufficientInstanceCapacity`, `VcpuLimitExceeded`, ...
    pub code: String,
    pub message: String,
}

/// What kind of refusal a code is, which decides whether waiting helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No capacity in that pool now; it comes back.
    Capacity,
    /// An account limit; it frees up as instances end.
    Quota,
    /// EC2 is throttling requests (its bucket refills), failed for a moment, or said something
    /// s3spot does not know.
    Transient,
    /// Never here: a type not offered, a missing role, a denied permission. Waiting does not
    /// help.
    Permanent,
}

impl Refusal {
    pub fn of(code: &str) -> Refusal {
        const CAPACITY: &[&str] = &[
            "InsufficientInstanceCapacity",
            "InsufficientCapacity",
            "InsufficientHostCapacity",
            "SpotMaxPriceTooLow",
            "UnfulfillableCapacity",
        ];
        const QUOTA: &[&str] = &[
            "VcpuLimitExceeded",
            "InstanceLimitExceeded",
            "MaxSpotInstanceCountExceeded",
        ];
        // What no wait fixes: a malformed request, a resource that is not there, a type not
        // offered, a refused permission, an account not set up for it.
        const PERMANENT_PREFIXES: &[&str] = &[
            "Invalid",
            "Unsupported",
            "Unauthorized",
            "AuthFailure",
            "OptInRequired",
            "Blocked",
            "MissingParameter",
        ];
        if CAPACITY.contains(&code) {
            Refusal::Capacity
        } else if QUOTA.contains(&code) {
            Refusal::Quota
        } else if PERMANENT_PREFIXES.iter().any(|p| code.starts_with(p)) {
            Refusal::Permanent
        } else {
            // Throttling, an internal error, or a code s3spot does not know: waiting is the safe
            // side, bounded by S3SPOT_MAX_WAIT, where failing for good would lose the job.
            Refusal::Transient
        }
    }

    pub fn is_retryable(self) -> bool {
        self != Refusal::Permanent
    }
}

impl PoolError {
    pub fn refusal(&self) -> Refusal {
        Refusal::of(&self.code)
    }
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.pool, self.code)?;
        if !self.message.is_empty() && self.message != self.code {
            write!(f, " ({})", self.message)?;
        }
        Ok(())
    }
}

/// Pending or running: the states that bill, or are about to.
pub fn is_active_state(state: &str) -> bool {
    matches!(state, "pending" | "running")
}

/// Ended for good: an instance in this state runs no job any more, and never will.
pub fn is_ended_state(state: &str) -> bool {
    matches!(state, "terminated" | "stopped")
}

/// An instance as the compute provider describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, ...
    pub state: String,
    pub instance_type: Option<String>,
    /// `spot` or `on-demand`.
    pub market: String,
    /// Seconds since the Unix epoch.
    pub launched_at: Option<i64>,
    pub tags: Vec<(String, String)>,
    /// Why it last changed state, as EC2 says: e.g. `Server.SpotInstanceTermination`.
    pub state_reason: Option<StateReason>,
}

/// EC2's reason for an instance's last state change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateReason {
    /// `Server.SpotInstanceTermination`, `Client.InstanceInitiatedShutdown`, ...
    pub code: String,
    pub message: String,
}

impl StateReason {
    /// EC2 took a spot instance back: a spot interruption, announced or not.
    pub fn is_spot_reclaim(&self) -> bool {
        self.code == "Server.SpotInstanceTermination"
    }
}

impl std::fmt::Display for StateReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // EC2's messages usually repeat the code: "Client.UserInitiatedShutdown: User ...".
        if self.message.is_empty() || self.message.starts_with(&self.code) {
            f.write_str(if self.message.is_empty() {
                &self.code
            } else {
                &self.message
            })
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

impl InstanceInfo {
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_active(&self) -> bool {
        is_active_state(&self.state)
    }

    /// The job's attempt this instance runs, from its tag.
    pub fn attempt(&self) -> Option<u32> {
        self.tag(TAG_ATTEMPT)?.parse().ok()
    }

    /// The job's max runtime it was launched with, from its tag.
    pub fn max_runtime_secs(&self) -> Option<u64> {
        self.tag(TAG_MAX_RUNTIME)?.parse().ok()
    }
}

/// One entry of EC2's spot price history: the Linux/UNIX price of a type in a zone, from `at`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SpotPrice {
    pub instance_type: String,
    pub availability_zone: String,
    /// US dollars per hour.
    pub usd_per_hour: f64,
    /// Seconds since the Unix epoch.
    pub at: i64,
}

/// Which spot prices to look up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceQuery {
    /// Empty: every type.
    pub instance_types: Vec<String>,
    pub availability_zone: Option<String>,
    /// Seconds since the Unix epoch: prices in effect from then on. `None`: EC2's default, the
    /// current price of each type and zone.
    pub since: Option<i64>,
    /// Seconds since the Unix epoch: prices in effect until then. With `since` the same
    /// instant, the price in effect at that instant in each zone.
    pub until: Option<i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The fleet request launched nothing: each pool it tried said why.
    #[error("no instance from {} pool(s): {}", pools.len(), pools.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    NoInstance { pools: Vec<PoolError> },
    /// No capacity for this option; the next option may have some.
    #[error("no capacity ({code}): {message}")]
    Capacity { code: String, message: String },
    /// An account limit; it frees up as instances finish, so retry later.
    #[error("account limit reached ({code}): {message}")]
    Quota { code: String, message: String },
    /// This option can never launch here: its type is not offered in the zone or does not fit
    /// the image, or spot is not set up in the account. The next option may launch; waiting
    /// does not help, so when no option launches for this reason alone the event fails for good.
    #[error("cannot launch here ({code}): {message}")]
    NotAvailable { code: String, message: String },
    /// The token's instance was launched and has since terminated: this job already ran.
    #[error("already launched: the instance for this ClientToken has already terminated")]
    AlreadyLaunched,
    #[error(
        "ClientToken was already used with different parameters (IdempotentParameterMismatch): \
         this event was launched before, under a different configuration (launch template, \
         instance types, command or worker changed since); {message}"
    )]
    ParameterMismatch { message: String },
    /// The provider refused the call for its request rate, and did nothing: a call made once,
    /// without the SDK's retries (Batch's `SubmitJob`, which has no client token).
    #[error("{operation} was throttled: {message}")]
    Throttled {
        operation: &'static str,
        message: String,
    },
    #[error("{operation} failed: {message}")]
    Api {
        operation: &'static str,
        message: String,
        retryable: bool,
    },
}

impl LaunchError {
    /// Whether trying the whole event again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            LaunchError::Capacity { .. }
            | LaunchError::Quota { .. }
            | LaunchError::Throttled { .. } => true,
            LaunchError::NoInstance { pools } => {
                pools.iter().any(|pool| pool.refusal().is_retryable())
            }
            LaunchError::AlreadyLaunched
            | LaunchError::ParameterMismatch { .. }
            | LaunchError::NotAvailable { .. } => false,
            LaunchError::Api { retryable, .. } => *retryable,
        }
    }

    /// Whether an instance may exist although the call failed: a timeout, a dropped connection
    /// or a server error can come after EC2 has launched it. EC2's refusals say it has not.
    /// Throttling counts as unknown: the SDK retries it, and an earlier try may have timed out
    /// after EC2 launched the instance.
    pub fn is_throttling(&self) -> bool {
        matches!(self, LaunchError::Throttled { .. })
            || matches!(
                self,
                LaunchError::Api { message, .. }
                    if message.starts_with("RequestLimitExceeded")
                        || message.starts_with("Throttling")
                        || message.starts_with("TooManyRequestsException")
            )
    }

    pub fn may_have_launched(&self) -> bool {
        matches!(
            self,
            LaunchError::Api {
                retryable: true,
                ..
            }
        )
    }
}

/// What the handler needs from a compute provider. EC2 implements it for AWS; the local mode and
/// tests implement it too, so they run the handler exactly as AWS does.
pub trait Launcher: Send + Sync {
    /// How many instances tagged with this pipeline are pending or running. Counting may stop
    /// once it reaches `enough` (the guard's cap): any count from there on means "at the cap",
    /// and a pipeline at its cap may have many instances, each one costing time to read.
    fn count_active(
        &self,
        pipeline: &str,
        enough: usize,
    ) -> impl Future<Output = Result<usize, LaunchError>> + Send;

    /// Launches one instance from one of the request's pools, idempotently per
    /// `request.client_token`.
    fn launch(
        &self,
        request: &LaunchRequest,
    ) -> impl Future<Output = Result<Launched, LaunchError>> + Send;

    /// One instance, whatever its pipeline; `None` if the provider does not know it (any more).
    fn describe(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<InstanceInfo>, LaunchError>> + Send;

    /// The instances of `pipeline`, in any state (EC2 lists terminated ones for about an hour),
    /// only those of one job if `job` is given.
    fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> impl Future<Output = Result<Vec<InstanceInfo>, LaunchError>> + Send;

    /// The base64 user-data an instance was launched with: it holds the job.
    fn user_data(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<String, LaunchError>> + Send;

    /// What the instance wrote to its console (the bootstrap script and the worker log there),
    /// as far as the provider keeps it; `None` if it has none.
    fn console_output(
        &self,
        instance_id: &str,
    ) -> impl Future<Output = Result<Option<String>, LaunchError>> + Send;

    /// Terminates instances (already terminated ones are fine). Callers pass only instances of
    /// their pipeline; EC2's policy allows no others.
    fn terminate(
        &self,
        instance_ids: &[String],
    ) -> impl Future<Output = Result<(), LaunchError>> + Send;

    /// The spot price history, every page of it.
    fn spot_prices(
        &self,
        query: &PriceQuery,
    ) -> impl Future<Output = Result<Vec<SpotPrice>, LaunchError>> + Send;
}

/// Launchers behind a reference or an `Arc` launch the same way: callers keep theirs (to inspect
/// it, or to share it) while a handler uses it.
macro_rules! delegate_launcher {
    ($($pointer:ty),*) => {$(
        impl<L: Launcher + ?Sized> Launcher for $pointer {
            fn count_active(
                &self,
                pipeline: &str,
                enough: usize,
            ) -> impl Future<Output = Result<usize, LaunchError>> + Send {
                (**self).count_active(pipeline, enough)
            }

            fn launch(
                &self,
                request: &LaunchRequest,
            ) -> impl Future<Output = Result<Launched, LaunchError>> + Send {
                (**self).launch(request)
            }

            fn describe(
                &self,
                instance_id: &str,
            ) -> impl Future<Output = Result<Option<InstanceInfo>, LaunchError>> + Send {
                (**self).describe(instance_id)
            }

            fn user_data(
                &self,
                instance_id: &str,
            ) -> impl Future<Output = Result<String, LaunchError>> + Send {
                (**self).user_data(instance_id)
            }

            fn instances(
                &self,
                pipeline: &str,
                job: Option<&str>,
            ) -> impl Future<Output = Result<Vec<InstanceInfo>, LaunchError>> + Send {
                (**self).instances(pipeline, job)
            }

            fn console_output(
                &self,
                instance_id: &str,
            ) -> impl Future<Output = Result<Option<String>, LaunchError>> + Send {
                (**self).console_output(instance_id)
            }

            fn terminate(
                &self,
                instance_ids: &[String],
            ) -> impl Future<Output = Result<(), LaunchError>> + Send {
                (**self).terminate(instance_ids)
            }

            fn spot_prices(
                &self,
                query: &PriceQuery,
            ) -> impl Future<Output = Result<Vec<SpotPrice>, LaunchError>> + Send {
                (**self).spot_prices(query)
            }
        }
    )*};
}

delegate_launcher!(&L, std::sync::Arc<L>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pool_error_is_a_kind_of_wait_or_a_refusal_for_good() {
        for (code, kind) in [
            ("InsufficientInstanceCapacity", Refusal::Capacity),
            ("UnfulfillableCapacity", Refusal::Capacity),
            ("VcpuLimitExceeded", Refusal::Quota),
            ("MaxSpotInstanceCountExceeded", Refusal::Quota),
            ("RequestLimitExceeded", Refusal::Transient),
            ("InternalError", Refusal::Transient),
            ("SomethingNew", Refusal::Transient),
            ("Unsupported", Refusal::Permanent),
            ("InvalidParameterValue", Refusal::Permanent),
            ("UnauthorizedOperation", Refusal::Permanent),
            (
                "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
                Refusal::Permanent,
            ),
        ] {
            assert_eq!(Refusal::of(code), kind, "{code}");
        }
        let mixed = LaunchError::NoInstance {
            pools: vec![
                PoolError {
                    pool: "spot a".into(),
                    code: "Unsupported".into(),
                    message: String::new(),
                },
                PoolError {
                    pool: "spot b".into(),
                    code: "InsufficientInstanceCapacity".into(),
                    message: String::new(),
                },
            ],
        };
        assert!(mixed.is_retryable(), "one pool may have capacity later");
        let LaunchError::NoInstance { mut pools } = mixed else {
            unreachable!()
        };
        pools.pop();
        assert!(!LaunchError::NoInstance { pools }.is_retryable());
    }
}
