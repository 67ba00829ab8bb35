//! Configuration: `S3SPOT_*` environment variables, read and checked once at start-up.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use s3spot_bootstrap::{DEFAULT_RESULTS_PREFIX, WorkerArtifact};

use crate::fleet::{DiskRule, EBS_MAX_GIB, InstanceRequirements, Pool};

/// Every variable this crate reads, so that the process environment is read in one place.
pub const VARIABLES: &[&str] = &[
    "S3SPOT_BACKEND",
    "S3SPOT_BATCH_JOB_QUEUE",
    "S3SPOT_BATCH_JOB_DEFINITION",
    "S3SPOT_LAUNCH_TEMPLATE",
    "S3SPOT_LAUNCH_TEMPLATE_VERSION",
    "S3SPOT_WORKER_URI",
    "S3SPOT_WORKER_SHA256",
    "S3SPOT_COMMAND",
    "S3SPOT_MAX_RUNTIME",
    "S3SPOT_RESULTS_BUCKET",
    "S3SPOT_RESULTS_PREFIX",
    "S3SPOT_SKIP_SUBSTRING",
    "S3SPOT_MARKET",
    "S3SPOT_INSTANCE_TYPES",
    "S3SPOT_MAX_INSTANCES",
    "S3SPOT_MAX_ATTEMPTS",
    "S3SPOT_PIPELINE",
    "S3SPOT_ORDER_BY_PRICE",
    "S3SPOT_INSTANCE_REQUIREMENTS",
    "S3SPOT_SUBNETS",
    "S3SPOT_DISK",
    "S3SPOT_MAX_DISK",
    "S3SPOT_ROOT_DEVICE",
    "S3SPOT_MAX_WAIT",
    "S3SPOT_RETRY_AFTER",
    "S3SPOT_LAUNCH_RATE",
    "S3SPOT_EVENTS",
];

const DEFAULT_MAX_RUNTIME_SECS: u64 = 3600;
/// A week. A longer limit is almost certainly a typo, and it would let a hung job bill for it.
const MAX_MAX_RUNTIME_SECS: u64 = 7 * 24 * 3600;
const DEFAULT_MAX_INSTANCES: u32 = 20;
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const DEFAULT_SKIP_SUBSTRING: &str = "analysis";
const DEFAULT_PIPELINE: &str = "s3spot";
const DEFAULT_TEMPLATE_VERSION: &str = "$Default";
const DEFAULT_MAX_DISK_GIB: u64 = 2048;
/// The root device of Amazon Linux (and of the template s3spot deploys).
const DEFAULT_ROOT_DEVICE: &str = "/dev/xvda";
/// How long a job may wait for an instance before it fails: AWS Batch users' most common
/// complaint is a job stuck in RUNNABLE for days with nothing saying why.
const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(6 * 3600);
/// The queue's visibility timeout in the template: when a record that is waiting comes back.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(300);
/// EC2 refills its launch bucket at 2 instances a second.
const DEFAULT_LAUNCH_RATE: f64 = 2.0;
/// How many pools (instance types × subnets) one fleet request may name.
pub const MAX_POOLS: usize = 300;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{var} is not set; {hint}")]
    Missing {
        var: &'static str,
        hint: &'static str,
    },
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: &'static str,
        value: String,
        reason: String,
    },
}

/// `S3SPOT_EVENTS`: whether it turns events off; a value that is none of the settings
/// [`s3spot_bootstrap::Events::from_setting`] takes is refused here, at start-up.
fn parse_events(lookup: &impl Fn(&str) -> Option<String>) -> Result<bool, ConfigError> {
    match lookup("S3SPOT_EVENTS").as_deref().map(str::trim) {
        None | Some("" | "eventbridge") => Ok(false),
        Some("off") => Ok(true),
        Some(file) if file.strip_prefix("file:").is_some_and(|p| !p.is_empty()) => Ok(false),
        Some(other) => Err(invalid(
            "S3SPOT_EVENTS",
            other,
            "expected eventbridge (the default bus), off, or file:<path>",
        )),
    }
}

fn invalid(var: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        var,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// The whole configuration: what a job is, and how it is launched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub job: JobConfig,
    pub launch: LaunchConfig,
    pub backend: Backend,
}

/// The launch template a Batch configuration reports when none is set: Batch's compute
/// environment names its own.
const BATCH_TEMPLATE: &str = "s3spot-batch-compute-environment";

/// Batch answers 50 API calls a second per account, and a launch makes three (the job's
/// attempts listed, the lookup by name, the submit): 6 a second per invocation leaves room for
/// two concurrent invocations, the reaper and the job commands.
const BATCH_LAUNCH_RATE: f64 = 6.0;

/// Where jobs run (`S3SPOT_BACKEND`): one EC2 instance each, or an AWS Batch queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Ec2,
    Batch(BatchTarget),
}

/// The queue jobs are submitted to, and the job definition that runs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchTarget {
    /// `S3SPOT_BATCH_JOB_QUEUE`: a name or an ARN.
    pub job_queue: String,
    /// `S3SPOT_BATCH_JOB_DEFINITION`: `name`, `name:revision` or an ARN.
    pub job_definition: String,
}

impl Backend {
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars = read_env()?;
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        match non_empty(lookup("S3SPOT_BACKEND")).as_deref() {
            None | Some("ec2") => Ok(Backend::Ec2),
            Some("batch") => Ok(Backend::Batch(BatchTarget {
                job_queue: required(
                    &lookup,
                    "S3SPOT_BATCH_JOB_QUEUE",
                    "S3SPOT_BACKEND=batch submits jobs to this AWS Batch job queue (the stack's \
                     BatchJobQueue output)",
                )?,
                job_definition: required(
                    &lookup,
                    "S3SPOT_BATCH_JOB_DEFINITION",
                    "S3SPOT_BACKEND=batch runs jobs with this AWS Batch job definition (the \
                     stack's BatchJobDefinition output)",
                )?,
            })),
            Some(other) => Err(invalid(
                "S3SPOT_BACKEND",
                other,
                "expected ec2 (one spot instance per object) or batch (jobs on an AWS Batch \
                 queue)",
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Ec2 => "ec2",
            Backend::Batch(_) => "batch",
        }
    }
}

/// What goes into every [`s3spot_bootstrap::JobSpec`], and which objects are not jobs at all.
/// `s3spot render` needs only this part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobConfig {
    /// The `s3spot:pipeline` tag; part of every job's identity.
    pub pipeline: String,
    pub worker: WorkerArtifact,
    pub command: Option<String>,
    pub max_runtime_secs: u64,
    /// `None`: results go to the input bucket.
    pub results_bucket: Option<String>,
    pub results_prefix: String,
    /// Lowercased; `None` when the rule is switched off with an empty value.
    pub skip_substring: Option<String>,
    /// Exported for the AWS CLI on the instance. Not an `S3SPOT_*` variable: the binary fills it
    /// in from the SDK's region.
    pub region: Option<String>,
    /// `S3SPOT_EVENTS=off`: no job events, from the launcher or, told by the JobSpec, from the
    /// worker.
    pub events_off: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchConfig {
    pub template: LaunchTemplate,
    /// `$Default`, `$Latest` or a version number.
    pub template_version: String,
    pub market: Market,
    /// Override types, every one a pool of the fleet request; empty: the template's type, or
    /// the types that match `requirements`.
    pub instance_types: Vec<String>,
    /// EC2 chooses the types by these attributes instead.
    pub requirements: Option<InstanceRequirements>,
    /// Subnets (one per zone) to spread launches across; empty: the template's.
    pub subnets: Vec<String>,
    pub max_instances: u32,
    /// Launches of one job, the first included, before a spot interruption fails it.
    pub max_attempts: u32,
    /// The job's root volume, sized from the object; `None`: the template's volume.
    pub disk: Option<DiskRule>,
    /// The largest volume the rule may ask for; the IAM policy bounds `ec2:VolumeSize` alike.
    pub max_disk_gib: u64,
    /// The device the volume override applies to: the image's root device.
    pub root_device: String,
    /// How long a job may wait for an instance (no capacity, a quota, the cap) before it fails.
    pub max_wait: Duration,
    /// When a waiting record is tried again: the queue's visibility timeout.
    pub retry_after: Duration,
    /// The least time between two launches of one invocation: 1 / `S3SPOT_LAUNCH_RATE`.
    pub launch_interval: Duration,
}

/// What the job commands (`s3spot jobs`, the scheduled reaper) need: which instances are the
/// pipeline's, where their status.json is, and how long a job may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsConfig {
    pub pipeline: String,
    pub results_bucket: Option<String>,
    pub results_prefix: String,
    pub max_runtime_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchTemplate {
    Id(String),
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Market {
    Spot,
    OnDemand,
    SpotThenOnDemand,
}

/// The market a single launch attempt uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MarketType {
    Spot,
    OnDemand,
}

impl MarketType {
    pub fn as_str(self) -> &'static str {
        match self {
            MarketType::Spot => "spot",
            MarketType::OnDemand => "on-demand",
        }
    }
}

impl fmt::Display for MarketType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl LaunchConfig {
    /// The markets to request, in order: on-demand after spot only when spot launched nothing.
    pub fn markets(&self) -> &'static [MarketType] {
        match self.market {
            Market::Spot => &[MarketType::Spot],
            Market::OnDemand => &[MarketType::OnDemand],
            Market::SpotThenOnDemand => &[MarketType::Spot, MarketType::OnDemand],
        }
    }

    /// The fleet request's pools: every instance type in every subnet.
    pub fn pools(&self) -> Vec<Pool> {
        crate::fleet::pools(&self.instance_types, &self.subnets)
    }

    /// The root volume for an object of `size` bytes; `Err` says why it cannot be had.
    pub fn volume_gib(&self, size: Option<u64>) -> Result<Option<u64>, String> {
        let Some(rule) = self.disk else {
            return Ok(None);
        };
        let gib = rule.size_gib(size);
        if gib > self.max_disk_gib {
            return Err(format!(
                "the object is {} and S3SPOT_DISK={rule} asks for a {gib} GiB volume, above \
                 S3SPOT_MAX_DISK={} GiB; raise S3SPOT_MAX_DISK (the template's MaxDiskGiB, up \
                 to {EBS_MAX_GIB}) or lower S3SPOT_DISK",
                size.map_or_else(|| "of unknown size".into(), crate::fleet::human_bytes),
                self.max_disk_gib
            ));
        }
        Ok(Some(gib))
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars = read_env()?;
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    /// Reads variables through `lookup`, so tests need not touch the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let backend = Backend::from_lookup(&lookup)?;
        let launch = match backend {
            Backend::Ec2 => LaunchConfig::from_lookup(&lookup)?,
            // Batch launches from its compute environment's own template; the function needs
            // none, and the one it is given (the stack's) is never named in a request.
            Backend::Batch(_) => {
                if let Some(market) = non_empty(lookup("S3SPOT_MARKET")).filter(|m| m != "spot") {
                    return Err(invalid(
                        "S3SPOT_MARKET",
                        &market,
                        "with S3SPOT_BACKEND=batch the compute environment chooses the market \
                         (the stack's is spot); leave S3SPOT_MARKET unset",
                    ));
                }
                LaunchConfig::from_lookup(|name| match name {
                    "S3SPOT_LAUNCH_TEMPLATE" => {
                        non_empty(lookup(name)).or_else(|| Some(BATCH_TEMPLATE.to_owned()))
                    }
                    "S3SPOT_LAUNCH_RATE" => {
                        non_empty(lookup(name)).or_else(|| Some(BATCH_LAUNCH_RATE.to_string()))
                    }
                    // The stack says "" for none.
                    "S3SPOT_MARKET" => non_empty(lookup(name)),
                    _ => lookup(name),
                })?
            }
        };
        Ok(Config {
            job: JobConfig::from_lookup(&lookup)?,
            launch,
            backend,
        })
    }
}

impl Config {
    pub fn jobs(&self) -> JobsConfig {
        JobsConfig {
            pipeline: self.job.pipeline.clone(),
            results_bucket: self.job.results_bucket.clone(),
            results_prefix: self.job.results_prefix.clone(),
            max_runtime_secs: self.job.max_runtime_secs,
        }
    }
}

impl JobsConfig {
    /// Reads the process environment: S3SPOT_PIPELINE, S3SPOT_RESULTS_BUCKET,
    /// S3SPOT_RESULTS_PREFIX and S3SPOT_MAX_RUNTIME, as the function has them.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars = read_env()?;
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let (results_bucket, results_prefix) = parse_results(&lookup)?;
        Ok(JobsConfig {
            pipeline: parse_pipeline(&lookup)?,
            results_bucket,
            results_prefix,
            max_runtime_secs: parse_max_runtime(&lookup)?,
        })
    }
}

impl JobConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars = read_env()?;
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let uri = required(
            &lookup,
            "S3SPOT_WORKER_URI",
            "set it to the s3://bucket/key of the s3spot-worker binary",
        )?;
        parse_s3_uri(&uri).map_err(|reason| invalid("S3SPOT_WORKER_URI", &uri, reason))?;
        let sha256 = required(
            &lookup,
            "S3SPOT_WORKER_SHA256",
            "set it to the output of `sha256sum s3spot-worker`",
        )?;
        let sha256 = parse_sha256(&sha256)
            .map_err(|reason| invalid("S3SPOT_WORKER_SHA256", &sha256, reason))?;

        let max_runtime_secs = parse_max_runtime(&lookup)?;
        let (results_bucket, results_prefix) = parse_results(&lookup)?;

        let skip_substring = match lookup("S3SPOT_SKIP_SUBSTRING") {
            None => Some(DEFAULT_SKIP_SUBSTRING.to_owned()),
            Some(value) if value.is_empty() => None,
            Some(value) => Some(value.to_lowercase()),
        };

        Ok(JobConfig {
            pipeline: parse_pipeline(&lookup)?,
            worker: WorkerArtifact { uri, sha256 },
            command: non_empty(lookup("S3SPOT_COMMAND")),
            max_runtime_secs,
            results_bucket,
            results_prefix,
            skip_substring,
            region: None,
            events_off: parse_events(&lookup)?,
        })
    }
}

impl LaunchConfig {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let template = required(
            &lookup,
            "S3SPOT_LAUNCH_TEMPLATE",
            "set it to the launch template's name or its lt- id",
        )?;
        let template = parse_launch_template(&template)
            .map_err(|reason| invalid("S3SPOT_LAUNCH_TEMPLATE", &template, reason))?;

        let template_version = lookup("S3SPOT_LAUNCH_TEMPLATE_VERSION")
            .unwrap_or_else(|| DEFAULT_TEMPLATE_VERSION.to_owned());
        let version_ok = template_version == "$Default"
            || template_version == "$Latest"
            || template_version.parse::<u64>().is_ok_and(|v| v >= 1);
        if !version_ok {
            return Err(invalid(
                "S3SPOT_LAUNCH_TEMPLATE_VERSION",
                &template_version,
                "expected $Default, $Latest or a version number such as 3",
            ));
        }

        let market = match lookup("S3SPOT_MARKET").as_deref() {
            None | Some("spot") => Market::Spot,
            Some("on-demand") => Market::OnDemand,
            Some("spot-then-on-demand") => Market::SpotThenOnDemand,
            Some(other) => {
                return Err(invalid(
                    "S3SPOT_MARKET",
                    other,
                    "expected spot, on-demand or spot-then-on-demand",
                ));
            }
        };

        let instance_types = match non_empty(lookup("S3SPOT_INSTANCE_TYPES")) {
            None => Vec::new(),
            Some(list) => parse_instance_types(&list)
                .map_err(|reason| invalid("S3SPOT_INSTANCE_TYPES", &list, reason))?,
        };

        let max_instances = match lookup("S3SPOT_MAX_INSTANCES") {
            None => DEFAULT_MAX_INSTANCES,
            Some(value) => value
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    invalid(
                        "S3SPOT_MAX_INSTANCES",
                        &value,
                        "expected a whole number of instances, at least 1",
                    )
                })?,
        };

        let max_attempts = match lookup("S3SPOT_MAX_ATTEMPTS") {
            None => DEFAULT_MAX_ATTEMPTS,
            Some(value) => value
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=100).contains(n))
                .ok_or_else(|| {
                    invalid(
                        "S3SPOT_MAX_ATTEMPTS",
                        &value,
                        "expected a whole number of launches from 1 to 100 (1: never re-launch)",
                    )
                })?,
        };

        if lookup("S3SPOT_ORDER_BY_PRICE").is_some_and(|v| !v.is_empty() && v != "false") {
            return Err(invalid(
                "S3SPOT_ORDER_BY_PRICE",
                &lookup("S3SPOT_ORDER_BY_PRICE").unwrap_or_default(),
                "it is no longer read: launches are one fleet request whose price-capacity-optimized \
                 strategy picks the cheapest pools that have capacity; remove it",
            ));
        }

        let requirements = match non_empty(lookup("S3SPOT_INSTANCE_REQUIREMENTS")) {
            None => None,
            Some(text) => Some(
                InstanceRequirements::parse(&text)
                    .map_err(|reason| invalid("S3SPOT_INSTANCE_REQUIREMENTS", &text, reason))?,
            ),
        };
        if requirements.is_some() && !instance_types.is_empty() {
            return Err(invalid(
                "S3SPOT_INSTANCE_REQUIREMENTS",
                &lookup("S3SPOT_INSTANCE_REQUIREMENTS").unwrap_or_default(),
                "S3SPOT_INSTANCE_TYPES is set too; choose types by name or by attributes, not both",
            ));
        }

        let subnets = match non_empty(lookup("S3SPOT_SUBNETS")) {
            None => Vec::new(),
            Some(list) => {
                parse_subnets(&list).map_err(|reason| invalid("S3SPOT_SUBNETS", &list, reason))?
            }
        };
        let pool_count = instance_types.len().max(1) * subnets.len().max(1);
        if pool_count > MAX_POOLS {
            let (var, value) = if subnets.len() > 1 {
                ("S3SPOT_SUBNETS", subnets.join(","))
            } else {
                ("S3SPOT_INSTANCE_TYPES", instance_types.join(","))
            };
            return Err(invalid(
                var,
                &value,
                format!(
                    "{} instance types in {} subnets make {pool_count} pools; one fleet request \
                     takes at most {MAX_POOLS}",
                    instance_types.len(),
                    subnets.len()
                ),
            ));
        }

        let max_disk_gib = match non_empty(lookup("S3SPOT_MAX_DISK")) {
            None => DEFAULT_MAX_DISK_GIB,
            Some(value) => value
                .parse::<u64>()
                .ok()
                .filter(|gib| (1..=EBS_MAX_GIB).contains(gib))
                .ok_or_else(|| {
                    invalid(
                        "S3SPOT_MAX_DISK",
                        &value,
                        format!("expected whole GiB from 1 to {EBS_MAX_GIB}, e.g. 2048"),
                    )
                })?,
        };
        // Off unless set: only the deployer knows the image's root device and the template's
        // own volume, which a rule must not shrink.
        let disk = match non_empty(lookup("S3SPOT_DISK")) {
            None => None,
            Some(value) => Some(
                DiskRule::parse(&value).map_err(|reason| invalid("S3SPOT_DISK", &value, reason))?,
            ),
        };
        if let Some(rule) = disk
            && rule.base_gib > max_disk_gib
        {
            return Err(invalid(
                "S3SPOT_DISK",
                &rule.to_string(),
                format!("its base alone is above S3SPOT_MAX_DISK={max_disk_gib} GiB"),
            ));
        }
        let root_device = non_empty(lookup("S3SPOT_ROOT_DEVICE"))
            .unwrap_or_else(|| DEFAULT_ROOT_DEVICE.to_owned());
        if !root_device.starts_with("/dev/") || root_device.len() > 32 {
            return Err(invalid(
                "S3SPOT_ROOT_DEVICE",
                &root_device,
                "expected the image's root device name, e.g. /dev/xvda",
            ));
        }

        let max_wait = parse_duration(&lookup, "S3SPOT_MAX_WAIT", DEFAULT_MAX_WAIT, "6h")?;
        let retry_after = parse_duration(&lookup, "S3SPOT_RETRY_AFTER", DEFAULT_RETRY_AFTER, "5m")?;

        let launch_rate: f64 = match non_empty(lookup("S3SPOT_LAUNCH_RATE")) {
            None => DEFAULT_LAUNCH_RATE,
            Some(value) => value
                .parse::<f64>()
                .ok()
                // A batch of 10 records, on two markets, paced at 0.5 a second takes 40 s: within
                // the template's 50 s function timeout.
                .filter(|rate| rate.is_finite() && (0.5..=1000.0).contains(rate))
                .ok_or_else(|| {
                    invalid(
                        "S3SPOT_LAUNCH_RATE",
                        &value,
                        "expected launches per second, from 0.5 to 1000, e.g. 2 (slower pacing \
                         would outlast the function's timeout with a full batch)",
                    )
                })?,
        };

        Ok(LaunchConfig {
            template,
            template_version,
            market,
            instance_types,
            requirements,
            subnets,
            max_instances,
            max_attempts,
            disk,
            max_disk_gib,
            root_device,
            max_wait,
            retry_after,
            launch_interval: Duration::from_secs_f64(1.0 / launch_rate),
        })
    }
}

fn parse_max_runtime(lookup: impl Fn(&str) -> Option<String>) -> Result<u64, ConfigError> {
    let Some(value) = lookup("S3SPOT_MAX_RUNTIME") else {
        return Ok(DEFAULT_MAX_RUNTIME_SECS);
    };
    value
        .parse::<u64>()
        .ok()
        .filter(|secs| (1..=MAX_MAX_RUNTIME_SECS).contains(secs))
        .ok_or_else(|| {
            invalid(
                "S3SPOT_MAX_RUNTIME",
                &value,
                format!("expected whole seconds from 1 to {MAX_MAX_RUNTIME_SECS}, e.g. 3600"),
            )
        })
}

/// The results bucket (`None`: the input's) and prefix.
fn parse_results(
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(Option<String>, String), ConfigError> {
    let results_bucket = non_empty(lookup("S3SPOT_RESULTS_BUCKET"));
    if let Some(bucket) = &results_bucket {
        check_bucket_name(bucket)
            .map_err(|reason| invalid("S3SPOT_RESULTS_BUCKET", bucket, reason))?;
    }
    let results_prefix =
        lookup("S3SPOT_RESULTS_PREFIX").unwrap_or_else(|| DEFAULT_RESULTS_PREFIX.to_owned());
    if results_prefix.is_empty()
        || !results_prefix.ends_with('/')
        || results_prefix.starts_with('/')
    {
        return Err(invalid(
            "S3SPOT_RESULTS_PREFIX",
            &results_prefix,
            "expected a folder-style prefix that ends with '/' and does not start with one, e.g. \"analysis/\"",
        ));
    }
    Ok((results_bucket, results_prefix))
}

fn parse_pipeline(lookup: impl Fn(&str) -> Option<String>) -> Result<String, ConfigError> {
    let pipeline = lookup("S3SPOT_PIPELINE").unwrap_or_else(|| DEFAULT_PIPELINE.to_owned());
    if pipeline.is_empty() || pipeline.chars().count() > 256 {
        return Err(invalid(
            "S3SPOT_PIPELINE",
            &pipeline,
            "expected 1 to 256 characters (it is a tag value)",
        ));
    }
    Ok(pipeline)
}

fn read_env() -> Result<HashMap<&'static str, String>, ConfigError> {
    let mut vars = HashMap::new();
    for &name in VARIABLES {
        match std::env::var(name) {
            Ok(value) => {
                vars.insert(name, value);
            }
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(value)) => {
                return Err(invalid(
                    name,
                    &value.to_string_lossy(),
                    "it is not valid UTF-8",
                ));
            }
        }
    }
    Ok(vars)
}

fn required(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    hint: &'static str,
) -> Result<String, ConfigError> {
    non_empty(lookup(var)).ok_or(ConfigError::Missing { var, hint })
}

/// Deployment templates pass "" for "not set"; treat it so.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Splits `s3://bucket/key` into its parts.
pub fn parse_s3_uri(uri: &str) -> Result<(&str, &str), String> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or("expected s3://bucket/key")?;
    let (bucket, key) = rest
        .split_once('/')
        .filter(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
        .ok_or("expected s3://bucket/key, with both a bucket and a key")?;
    check_bucket_name(bucket)?;
    Ok((bucket, key))
}

fn parse_sha256(value: &str) -> Result<String, String> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err("expected 64 hex digits, as printed by `sha256sum`".into())
    }
}

fn check_bucket_name(bucket: &str) -> Result<(), String> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{bucket:?} is not an S3 bucket name (3 to 63 lowercase letters, digits, '.' or '-')"
        ))
    }
}

fn parse_launch_template(value: &str) -> Result<LaunchTemplate, String> {
    if let Some(id) = value.strip_prefix("lt-") {
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(LaunchTemplate::Id(value.to_owned()));
        }
        return Err("an lt- id is followed by hex digits, e.g. lt-0abcd1234ef567890".into());
    }
    let name_ok = (3..=128).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"()./_-".contains(&b));
    if name_ok {
        Ok(LaunchTemplate::Name(value.to_owned()))
    } else {
        Err(
            "expected a launch template name (3 to 128 of A-Z a-z 0-9 ( ) . / _ -) or an lt- id"
                .into(),
        )
    }
}

/// `6h`, `90m`, `3600s` or whole seconds.
fn parse_duration(
    lookup: &impl Fn(&str) -> Option<String>,
    var: &'static str,
    default: Duration,
    example: &str,
) -> Result<Duration, ConfigError> {
    let Some(value) = non_empty(lookup(var)) else {
        return Ok(default);
    };
    let parsed = match value.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(&value).map_err(|e| e.to_string()),
    };
    parsed
        .ok()
        .filter(|d| !d.is_zero() && *d <= Duration::from_secs(30 * 24 * 3600))
        .ok_or_else(|| {
            invalid(
                var,
                &value,
                format!("expected a duration from 1s to 30 days, e.g. {example} or 3600"),
            )
        })
}

fn parse_subnets(list: &str) -> Result<Vec<String>, String> {
    let mut subnets: Vec<String> = Vec::new();
    for item in list.split(',').map(str::trim) {
        let ok = item
            .strip_prefix("subnet-")
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(format!(
                "{item:?} is not a subnet id; expected a comma-separated list such as \
                 subnet-0abc1234,subnet-0def5678"
            ));
        }
        if subnets.iter().any(|s| s == item) {
            return Err(format!("{item} is listed twice"));
        }
        subnets.push(item.to_owned());
    }
    Ok(subnets)
}

fn parse_instance_types(list: &str) -> Result<Vec<String>, String> {
    let mut types = Vec::new();
    for item in list.split(',').map(str::trim) {
        let ok = item.split_once('.').is_some_and(|(family, size)| {
            !family.is_empty()
                && !size.is_empty()
                && item
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        });
        if !ok {
            return Err(format!(
                "{item:?} is not an instance type; expected a comma-separated list such as m7i.large,m6i.large"
            ));
        }
        if types.iter().any(|t| t == item) {
            return Err(format!("{item} is listed twice"));
        }
        types.push(item.to_owned());
    }
    Ok(types)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const MINIMAL: &[(&str, &str)] = &[
        ("S3SPOT_LAUNCH_TEMPLATE", "s3spot-worker"),
        ("S3SPOT_WORKER_URI", "s3://artifacts/s3spot-worker"),
        (
            "S3SPOT_WORKER_SHA256",
            "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
        ),
    ];

    fn with(extra: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let mut vars: Vec<(&str, &str)> = extra.to_vec();
        vars.extend_from_slice(MINIMAL);
        Config::from_lookup(lookup(&vars))
    }

    #[test]
    fn defaults() {
        let config = with(&[]).unwrap();
        assert_eq!(
            config.launch.template,
            LaunchTemplate::Name("s3spot-worker".into())
        );
        assert_eq!(config.launch.template_version, "$Default");
        assert_eq!(config.launch.market, Market::Spot);
        assert!(config.launch.instance_types.is_empty());
        assert_eq!(config.launch.max_instances, 20);
        assert_eq!(config.launch.max_attempts, 3);
        assert_eq!(config.job.pipeline, "s3spot");
        assert_eq!(config.job.max_runtime_secs, 3600);
        assert_eq!(config.job.results_bucket, None);
        assert_eq!(config.job.results_prefix, "analysis/");
        assert_eq!(config.job.skip_substring.as_deref(), Some("analysis"));
        assert_eq!(config.job.command, None);
        assert_eq!(
            config.job.worker.sha256,
            "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789"
        );
    }

    #[test]
    fn events_are_on_unless_turned_off_and_a_bad_setting_is_refused() {
        assert!(!with(&[]).unwrap().job.events_off);
        for on in ["eventbridge", "", "file:/tmp/events.jsonl"] {
            assert!(
                !with(&[("S3SPOT_EVENTS", on)]).unwrap().job.events_off,
                "{on}"
            );
        }
        assert!(with(&[("S3SPOT_EVENTS", "off")]).unwrap().job.events_off);
        for bad in ["sns", "file:", "OFF"] {
            let error = with(&[("S3SPOT_EVENTS", bad)]).unwrap_err().to_string();
            assert!(
                error.starts_with(&format!("S3SPOT_EVENTS={bad:?} is invalid")),
                "{error}"
            );
            assert!(error.contains("eventbridge"), "{error}");
        }
    }

    #[test]
    fn every_variable_is_read() {
        let config = with(&[
            ("S3SPOT_LAUNCH_TEMPLATE_VERSION", "7"),
            ("S3SPOT_COMMAND", "./process \"$S3SPOT_INPUT\""),
            ("S3SPOT_MAX_RUNTIME", "60"),
            ("S3SPOT_RESULTS_BUCKET", "results-bucket"),
            ("S3SPOT_RESULTS_PREFIX", "out/"),
            ("S3SPOT_SKIP_SUBSTRING", "Processed"),
            ("S3SPOT_EVENTS", "off"),
            ("S3SPOT_MARKET", "spot-then-on-demand"),
            ("S3SPOT_INSTANCE_TYPES", "m7i.large, m6i.large"),
            ("S3SPOT_MAX_INSTANCES", "3"),
            ("S3SPOT_MAX_ATTEMPTS", "5"),
            ("S3SPOT_PIPELINE", "genomics"),
            ("S3SPOT_SUBNETS", "subnet-0a1, subnet-0b2"),
            ("S3SPOT_DISK", "2x+10GiB"),
            ("S3SPOT_MAX_DISK", "500"),
            ("S3SPOT_ROOT_DEVICE", "/dev/sda1"),
            ("S3SPOT_MAX_WAIT", "90m"),
            ("S3SPOT_RETRY_AFTER", "120"),
            ("S3SPOT_LAUNCH_RATE", "4"),
        ])
        .unwrap();
        assert_eq!(config.launch.template_version, "7");
        assert_eq!(
            config.job.command.as_deref(),
            Some("./process \"$S3SPOT_INPUT\"")
        );
        assert_eq!(config.job.max_runtime_secs, 60);
        assert_eq!(config.job.results_bucket.as_deref(), Some("results-bucket"));
        assert_eq!(config.job.results_prefix, "out/");
        assert_eq!(config.job.skip_substring.as_deref(), Some("processed"));
        assert_eq!(config.launch.market, Market::SpotThenOnDemand);
        assert_eq!(config.launch.instance_types, ["m7i.large", "m6i.large"]);
        assert_eq!(config.launch.max_instances, 3);
        assert_eq!(config.launch.max_attempts, 5);
        assert_eq!(config.job.pipeline, "genomics");
        assert_eq!(config.launch.subnets, ["subnet-0a1", "subnet-0b2"]);
        assert_eq!(config.launch.pools().len(), 4);
        assert_eq!(config.launch.disk.unwrap().to_string(), "2x+10GiB");
        assert_eq!(config.launch.max_disk_gib, 500);
        assert_eq!(config.launch.root_device, "/dev/sda1");
        assert_eq!(config.launch.max_wait, Duration::from_secs(5400));
        assert_eq!(config.launch.retry_after, Duration::from_secs(120));
        assert_eq!(config.launch.launch_interval, Duration::from_millis(250));
        let jobs = config.jobs();
        assert_eq!(
            (
                jobs.pipeline.as_str(),
                jobs.results_prefix.as_str(),
                jobs.max_runtime_secs
            ),
            ("genomics", "out/", 60)
        );
        assert!(config.job.events_off);
        // The three of S3SPOT_BACKEND=batch are read in the Batch backend's test.
        assert_eq!(VARIABLES.len(), 27);
        let by_attributes = with(&[(
            "S3SPOT_INSTANCE_REQUIREMENTS",
            "vcpu=2-8 memory=4GiB- arch=arm64",
        )])
        .unwrap();
        let requirements = by_attributes.launch.requirements.unwrap();
        assert_eq!(requirements.architectures, ["arm64"]);
    }

    #[test]
    fn template_ids_and_names() {
        let config = with(&[("S3SPOT_LAUNCH_TEMPLATE", "lt-0abcdef1234567890")]).unwrap();
        assert_eq!(
            config.launch.template,
            LaunchTemplate::Id("lt-0abcdef1234567890".into())
        );
    }

    #[test]
    fn empty_values_mean_unset_or_off() {
        let config = with(&[
            ("S3SPOT_COMMAND", ""),
            ("S3SPOT_RESULTS_BUCKET", ""),
            ("S3SPOT_INSTANCE_TYPES", ""),
            ("S3SPOT_SKIP_SUBSTRING", ""),
        ])
        .unwrap();
        assert_eq!(config.job.command, None);
        assert_eq!(config.job.results_bucket, None);
        assert!(config.launch.instance_types.is_empty());
        assert_eq!(config.job.skip_substring, None);
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let cases: &[(&str, &str, &str)] = &[
            ("S3SPOT_LAUNCH_TEMPLATE", "lt-xyz", "lt- id"),
            ("S3SPOT_LAUNCH_TEMPLATE", "a b", "launch template name"),
            ("S3SPOT_LAUNCH_TEMPLATE_VERSION", "latest", "$Latest"),
            ("S3SPOT_LAUNCH_TEMPLATE_VERSION", "0", "version number"),
            (
                "S3SPOT_WORKER_URI",
                "https://example.com/worker",
                "s3://bucket/key",
            ),
            (
                "S3SPOT_WORKER_URI",
                "s3://artifacts/",
                "both a bucket and a key",
            ),
            ("S3SPOT_WORKER_URI", "s3://Artifacts/w", "bucket name"),
            ("S3SPOT_WORKER_SHA256", "abc", "64 hex digits"),
            ("S3SPOT_MAX_RUNTIME", "1h", "whole seconds"),
            ("S3SPOT_MAX_RUNTIME", "0", "whole seconds"),
            ("S3SPOT_MAX_RUNTIME", "99999999", "whole seconds"),
            ("S3SPOT_RESULTS_BUCKET", "My_Bucket", "bucket name"),
            ("S3SPOT_RESULTS_PREFIX", "analysis", "ends with '/'"),
            ("S3SPOT_RESULTS_PREFIX", "/analysis/", "does not start"),
            ("S3SPOT_ORDER_BY_PRICE", "true", "no longer read"),
            (
                "S3SPOT_INSTANCE_REQUIREMENTS",
                "vcpus=2",
                "not a requirement",
            ),
            ("S3SPOT_SUBNETS", "subnet-xyz", "not a subnet id"),
            ("S3SPOT_SUBNETS", "subnet-0a,subnet-0a", "listed twice"),
            ("S3SPOT_DISK", "3x", "no base"),
            ("S3SPOT_MAX_DISK", "20000", "from 1 to 16384"),
            ("S3SPOT_ROOT_DEVICE", "xvda", "root device"),
            ("S3SPOT_MAX_WAIT", "forever", "duration"),
            ("S3SPOT_MAX_WAIT", "0", "duration"),
            ("S3SPOT_RETRY_AFTER", "-5", "duration"),
            ("S3SPOT_LAUNCH_RATE", "0", "launches per second"),
            (
                "S3SPOT_MARKET",
                "spot-only",
                "spot, on-demand or spot-then-on-demand",
            ),
            (
                "S3SPOT_INSTANCE_TYPES",
                "m5.large,,c5.large",
                "not an instance type",
            ),
            (
                "S3SPOT_INSTANCE_TYPES",
                "m5.large;c5.large",
                "not an instance type",
            ),
            ("S3SPOT_INSTANCE_TYPES", "m5.large,m5.large", "listed twice"),
            ("S3SPOT_MAX_INSTANCES", "0", "at least 1"),
            ("S3SPOT_MAX_INSTANCES", "-1", "at least 1"),
            ("S3SPOT_MAX_ATTEMPTS", "0", "from 1 to 100"),
            ("S3SPOT_MAX_ATTEMPTS", "many", "from 1 to 100"),
            ("S3SPOT_PIPELINE", "", "1 to 256"),
        ];
        for &(var, value, expected) in cases {
            let err = with(&[(var, value)]).unwrap_err();
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("{var}={value:?} is invalid")),
                "{var}={value:?}: {message}"
            );
            assert!(message.contains(expected), "{var}={value:?}: {message}");
        }
    }

    #[test]
    fn missing_required_variables_say_what_to_set() {
        for var in [
            "S3SPOT_LAUNCH_TEMPLATE",
            "S3SPOT_WORKER_URI",
            "S3SPOT_WORKER_SHA256",
        ] {
            let vars: Vec<(&str, &str)> =
                MINIMAL.iter().copied().filter(|(n, _)| *n != var).collect();
            let err = Config::from_lookup(lookup(&vars)).unwrap_err();
            assert!(
                matches!(err, ConfigError::Missing { var: v, .. } if v == var),
                "{err}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("{var} is not set; set it to"))
            );
        }
    }

    #[test]
    fn the_job_part_needs_no_launch_template() {
        let vars: Vec<(&str, &str)> = MINIMAL[1..].to_vec();
        assert!(JobConfig::from_lookup(lookup(&vars)).is_ok());
        assert!(Config::from_lookup(lookup(&vars)).is_err());
    }

    #[test]
    fn on_demand_comes_after_spot_and_only_then() {
        let mut launch = with(&[]).unwrap().launch;
        assert_eq!(launch.markets(), [MarketType::Spot]);
        launch.market = Market::OnDemand;
        assert_eq!(launch.markets(), [MarketType::OnDemand]);
        launch.market = Market::SpotThenOnDemand;
        assert_eq!(launch.markets(), [MarketType::Spot, MarketType::OnDemand]);
    }

    #[test]
    fn types_by_name_or_by_attributes_not_both() {
        let error = with(&[
            ("S3SPOT_INSTANCE_TYPES", "m5.large"),
            ("S3SPOT_INSTANCE_REQUIREMENTS", "vcpu=2"),
        ])
        .unwrap_err();
        assert!(error.to_string().contains("not both"), "{error}");
    }

    #[test]
    fn the_volume_is_bounded_by_the_max() {
        let gb = 1000 * 1000 * 1000;
        assert_eq!(
            with(&[]).unwrap().launch.volume_gib(Some(gb)),
            Ok(None),
            "off by default"
        );
        let launch = with(&[("S3SPOT_DISK", "3x+8GiB")]).unwrap().launch;
        assert_eq!(launch.volume_gib(Some(1000)), Ok(Some(9)));
        assert_eq!(launch.volume_gib(Some(10 * gb)), Ok(Some(36)));
        let error = launch.volume_gib(Some(2000 * gb)).unwrap_err();
        assert!(
            error.contains("asks for a 5596 GiB volume, above S3SPOT_MAX_DISK=2048 GiB"),
            "{error}"
        );
        assert!(error.contains("1862.6 GiB"), "{error}");
        let bigger = with(&[("S3SPOT_DISK", "3x+8GiB"), ("S3SPOT_MAX_DISK", "16384")])
            .unwrap()
            .launch;
        assert_eq!(bigger.volume_gib(Some(2000 * gb)), Ok(Some(5596)));
        let off = with(&[("S3SPOT_DISK", "")]).unwrap().launch;
        assert_eq!(
            off.volume_gib(Some(2000 * gb)),
            Ok(None),
            "the template's volume"
        );
        let base_too_big = with(&[("S3SPOT_DISK", "100GiB"), ("S3SPOT_MAX_DISK", "50")]);
        assert!(base_too_big.is_err());
    }

    #[test]
    fn the_batch_backend_needs_its_queue_and_job_definition_and_no_launch_template() {
        assert_eq!(with(&[]).unwrap().backend, Backend::Ec2);
        assert_eq!(
            with(&[("S3SPOT_BACKEND", "ec2")]).unwrap().backend,
            Backend::Ec2
        );
        let error = with(&[("S3SPOT_BACKEND", "batch")]).unwrap_err();
        assert!(
            matches!(
                error,
                ConfigError::Missing {
                    var: "S3SPOT_BATCH_JOB_QUEUE",
                    ..
                }
            ),
            "{error}"
        );
        let error =
            with(&[("S3SPOT_BACKEND", "batch"), ("S3SPOT_BATCH_JOB_QUEUE", "q")]).unwrap_err();
        assert!(
            error.to_string().contains("S3SPOT_BATCH_JOB_DEFINITION"),
            "{error}"
        );
        let error = with(&[("S3SPOT_BACKEND", "fargate")])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("\"fargate\"") && error.contains("ec2") && error.contains("batch"),
            "{error}"
        );

        let batch = Config::from_lookup(lookup(&[
            ("S3SPOT_BACKEND", "batch"),
            ("S3SPOT_BATCH_JOB_QUEUE", "s3spot-jobs"),
            ("S3SPOT_BATCH_JOB_DEFINITION", "s3spot-job:3"),
            ("S3SPOT_LAUNCH_TEMPLATE", ""),
            ("S3SPOT_WORKER_URI", "s3://artifacts/s3spot-worker"),
            ("S3SPOT_WORKER_SHA256", &"a".repeat(64)),
        ]))
        .unwrap();
        assert_eq!(
            batch.backend,
            Backend::Batch(BatchTarget {
                job_queue: "s3spot-jobs".into(),
                job_definition: "s3spot-job:3".into(),
            })
        );
        assert_eq!(
            batch.launch.launch_interval,
            Duration::from_secs_f64(1.0 / BATCH_LAUNCH_RATE),
            "Batch's own API rate, not EC2's launch bucket"
        );
        let error = with(&[
            ("S3SPOT_BACKEND", "batch"),
            ("S3SPOT_BATCH_JOB_QUEUE", "q"),
            ("S3SPOT_BATCH_JOB_DEFINITION", "d"),
            ("S3SPOT_MARKET", "on-demand"),
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("compute environment chooses"), "{error}");
    }
}
