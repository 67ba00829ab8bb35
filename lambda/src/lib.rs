//! s3spot's launcher: S3 "object created" events in, one spot instance per upload out.
//!
//! An event is parsed into records ([`event`]), each record is skipped or planned into a job
//! with its user-data ([`plan`]), and each job is launched through a [`Launcher`] with a
//! deterministic `ClientToken` ([`token`]), at most once per attempt ([`launch`]). Jobs whose
//! attempts end early are launched again or given a final status ([`recover`]); [`jobs`] is the
//! operator's view. [`Handler`] dispatches each record to these; [`Ec2Launcher`] is the launcher
//! for AWS. The status protocol is the contract crate's ([`s3spot_bootstrap`]).

pub mod batch;
pub mod config;
pub mod cost;
pub mod ec2;
pub mod event;
#[cfg(feature = "fake")]
pub mod fake;
pub mod fleet;
pub mod handler;
pub mod jobs;
pub mod key;
mod launch;
pub mod launcher;
pub mod plan;
pub mod prices;
mod recover;
pub mod report;
pub mod token;

pub use batch::{AwsLauncher, BatchLauncher};
pub use config::{Backend, BatchTarget, Config, ConfigError, JobConfig, JobsConfig};
pub use ec2::Ec2Launcher;
pub use handler::{Handler, error_chain};
pub use jobs::{Clock, Jobs, JobsError, Target};
pub use launch::{CLAIM_LEASE, launch_requests};
pub use launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PoolError, PriceQuery, Refusal,
    SpotPrice, StateReason,
};
pub use recover::REPLACEMENT_WAIT;
pub use report::{HandlerError, METRICS_NAMESPACE, MetricsSink, RecordCounts, Report, Response};
pub use s3spot_bootstrap::{Events, S3Statuses, StatusError, StatusStore};

/// Where the jobs' state-change events go, from `S3SPOT_EVENTS` (see [`Events::from_setting`]):
/// the default EventBridge bus of `sdk`'s account and region unless it says otherwise.
pub fn events_from_env(sdk: &aws_config::SdkConfig) -> anyhow::Result<Events> {
    let setting = std::env::var("S3SPOT_EVENTS").ok();
    Events::from_setting(setting.as_deref(), sdk)
        .map_err(anyhow::Error::msg)
        .map_err(|error| error.context("bad configuration"))
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(error: HandlerError) -> Self {
        lambda_runtime::Diagnostic {
            error_type: error.kind().to_owned(),
            error_message: error_chain(&error),
        }
    }
}
