//! An EC2 double: the part of the EC2 Query API that s3spot calls, with the behaviour EC2
//! documents and moto leaves out.
//!
//! - `CreateFleet` of type `instant` (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instant-fleet.html>):
//!   its pools (overrides) are tried in turn; each without capacity, over a quota or refused by
//!   IAM is an entry of the answer's `errorSet`, and the first that has capacity launches the
//!   instance, with the request's user-data, tags, subnet and volume size. Its `ClientToken`
//!   (<https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-idempotency.html>): the same token
//!   with the same parameters answers as the first request did; with other parameters,
//!   `IdempotentParameterMismatch`. A token is kept for 24 hours after its instance terminates,
//!   the least EC2 promises, and then forgotten.
//! - EC2's launch throttling (<https://docs.aws.amazon.com/ec2/latest/devguide/ec2-api-throttling.html>):
//!   a token bucket of instances launched, refilled at a steady rate; a request it cannot pay
//!   for is `RequestLimitExceeded` (HTTP 503), and launches nothing.
//! - EC2 lists a terminated instance for about an hour, then no more: `DescribeInstances`
//!   leaves it out, and naming it is `InvalidInstanceID.NotFound`.
//! - Capacity comes and goes (`InsufficientInstanceCapacity`), per market.
//! - Instances end for EC2's reasons (`Server.SpotInstanceTermination`, ...) with their
//!   state reason, and keep their console output.
//!
//! - IAM, for a principal given a policy ([`Ec2Double::set_policy`]): each action is authorized
//!   as EC2 documents it (<https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazonec2.html>).
//!   `CreateFleet` needs `ec2:CreateFleet` on the fleet, and each pool is launched as a
//!   `RunInstances` (and a `CreateFleet` on the instance, volume, subnet, image and launch
//!   template) that authorizes every resource it touches (the instance with
//!   `ec2:InstanceType`, `ec2:MetadataHttpTokens`, `ec2:LaunchTemplate` and the request's tags;
//!   the launch template; a spot request; the volume with `ec2:VolumeSize`, and the network
//!   interface and subnet with `ec2:Vpc`, from the template unless the request overrides them;
//!   the security group and image from the template, with `ec2:IsLaunchTemplateResource`), and
//!   `ec2:CreateTags` with `ec2:CreateAction`; a pool IAM refuses is an `UnauthorizedOperation`
//!   entry of the answer. Actions on an instance carry its tags as `ec2:ResourceTag/...`. A
//!   denial of the request itself is `UnauthorizedOperation`. The instance profile's
//!   `iam:PassRole` is not checked: the double does not know the template's profile.
//!
//! Its clock starts at the real time and moves only when a test moves it ([`Ec2Double::advance`]).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};

use crate::http::{ServerThread, param, query_params};
use crate::iam::{Authorization, Policy};

/// How long EC2 keeps listing a terminated instance.
pub const LISTED_AFTER_TERMINATION: Duration = Duration::from_secs(3600);
/// How long EC2 keeps a terminated instance's `ClientToken`, at least.
pub const TOKEN_AFTER_TERMINATION: Duration = Duration::from_secs(24 * 3600);

/// One instance, as the double keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubleInstance {
    pub id: String,
    /// `running`, `shutting-down` or `terminated`.
    pub state: String,
    pub instance_type: String,
    /// `spot` or `on-demand`.
    pub market: String,
    pub client_token: String,
    pub tags: Vec<(String, String)>,
    /// Base64, as it was sent.
    pub user_data: String,
    /// Seconds on the double's clock.
    pub launched_at: i64,
    pub terminated_at: Option<i64>,
    /// (code, message).
    pub state_reason: Option<(String, String)>,
    pub console: Option<String>,
    /// The subnet the request's pool named, if it named one.
    pub subnet_id: Option<String>,
    /// The root volume the request asked for, in GiB, if it asked.
    pub volume_gib: Option<u64>,
}

impl DoubleInstance {
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What EC2 keeps of a request by its token: its parameters, its answer's XML, and its
/// instance if it launched one.
type Remembered = (Vec<(String, String)>, String, Option<String>);

#[derive(Default)]
struct State {
    /// Seconds added to the real time of the double's start.
    offset: i64,
    started: i64,
    next_id: u64,
    instances: BTreeMap<String, DoubleInstance>,
    tokens: HashMap<String, Remembered>,
    /// Markets ("spot", "on-demand") or pools ("spot:m5.large", "spot:m5.large:subnet-0a")
    /// without capacity.
    no_capacity: Vec<String>,
    /// Market -> how many of its instances may run at once (a vCPU quota, counted in instances).
    quotas: HashMap<String, usize>,
    /// EC2's bucket of instance launches: (tokens now, capacity, refill per second, last refill).
    launch_bucket: Option<(f64, f64, f64, std::time::Instant)>,
    throttled_requests: usize,
    /// Markets whose next requests (this many) find no capacity.
    capacity_failures: HashMap<String, usize>,
    /// (instance type, zone, USD per hour).
    spot_prices: Vec<(String, String, f64)>,
    create_fleet_calls: usize,
    /// Seconds after its launch for which a filtered DescribeInstances does not list an
    /// instance yet.
    listing_lag: i64,
    /// How long each answer takes, outside the lock: requests of concurrent callers interleave.
    latency: Duration,
    /// Access key -> what that principal may do. Keys with none may do anything.
    policies: HashMap<String, Policy>,
    launch_templates: Vec<LaunchTemplateVersion>,
}

impl State {
    fn now(&self) -> i64 {
        self.started + self.offset
    }

    /// Listed: not terminated, or terminated within the last hour.
    fn listed(&self, instance: &DoubleInstance) -> bool {
        instance.terminated_at.is_none_or(|at| {
            self.now() - at < i64::try_from(LISTED_AFTER_TERMINATION.as_secs()).unwrap()
        })
    }

    /// Listed by a query on its tags or state: EC2's API is eventually consistent, and a
    /// new instance can be missing from DescribeInstances for a while after RunInstances.
    fn found(&self, instance: &DoubleInstance) -> bool {
        self.listed(instance) && self.now() - instance.launched_at >= self.listing_lag
    }

    fn forget_expired_tokens(&mut self) {
        let now = self.now();
        let keep = i64::try_from(TOKEN_AFTER_TERMINATION.as_secs()).unwrap();
        let instances = &self.instances;
        self.tokens.retain(|_, (_, _, id)| {
            id.as_ref().is_none_or(|id| {
                instances[id.as_str()]
                    .terminated_at
                    .is_none_or(|at| now - at < keep)
            })
        });
    }
}

/// A launch template version, as far as `DescribeLaunchTemplateVersions` tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchTemplateVersion {
    pub id: String,
    pub version: u32,
    pub image_id: String,
    /// `terminate` or `stop`; empty: not set.
    pub shutdown_behavior: String,
    /// `required` or `optional`; empty: not set.
    pub http_tokens: String,
    /// Empty: no network interface is named.
    pub subnet_id: String,
    pub security_group_id: String,
}

pub struct Ec2Double {
    server: ServerThread,
    state: Arc<Mutex<State>>,
}

impl Ec2Double {
    pub fn start() -> Ec2Double {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let state = Arc::new(Mutex::new(State {
            started: i64::try_from(started).expect("a sane clock"),
            ..State::default()
        }));
        let shared = Arc::clone(&state);
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let state = Arc::clone(&shared);
            // SigV4: "AWS4-HMAC-SHA256 Credential=<access key>/<date>/...".
            let principal = request
                .headers()
                .get("authorization")
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.split("Credential=").nth(1))
                .and_then(|c| c.split('/').next())
                .map(str::to_owned);
            async move {
                let params = query_params(request).await;
                let latency = state.lock().expect("no panic holding the state").latency;
                tokio::time::sleep(latency).await;
                let mut state = state.lock().expect("no panic holding the state");
                let policy = principal.and_then(|key| state.policies.get(&key).cloned());
                if let Some(policy) = &policy
                    && let Some(denied) = denial(&state, policy, &params)
                {
                    return Ok::<_, Infallible>(denied);
                }
                Ok::<_, Infallible>(answer(&mut state, &params, policy.as_ref()))
            }
        });
        Ec2Double {
            server: ServerThread::start("ec2-double", service),
            state,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.address)
    }

    /// An SDK configuration for this double, built the way the binaries build theirs.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        crate::sdk_config(&self.endpoint()).await
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("no panic holding the state")
    }

    /// Moves the double's clock on.
    pub fn advance(&self, by: Duration) {
        self.state().offset += i64::try_from(by.as_secs()).expect("a sane duration");
    }

    /// Whether `market` ("spot" or "on-demand") has capacity; it has, until told otherwise.
    pub fn set_capacity(&self, market: &str, available: bool) {
        let mut state = self.state();
        state.no_capacity.retain(|m| m != market);
        if !available {
            state.no_capacity.push(market.to_owned());
        }
    }

    /// Whether one pool has capacity: `instance_type` in `subnet` (any subnet if `None`).
    pub fn set_pool_capacity(
        &self,
        market: &str,
        instance_type: &str,
        subnet: Option<&str>,
        available: bool,
    ) {
        let pool = match subnet {
            Some(subnet) => format!("{market}:{instance_type}:{subnet}"),
            None => format!("{market}:{instance_type}"),
        };
        let mut state = self.state();
        state.no_capacity.retain(|p| *p != pool);
        if !available {
            state.no_capacity.push(pool);
        }
    }

    /// At most `instances` of `market` run at once; beyond, each pool answers
    /// `VcpuLimitExceeded`. `None`: no limit.
    pub fn set_quota(&self, market: &str, instances: Option<usize>) {
        let mut state = self.state();
        match instances {
            Some(n) => state.quotas.insert(market.to_owned(), n),
            None => state.quotas.remove(market),
        };
    }

    /// Throttles launches as EC2 does: a bucket of `capacity` instances holding `tokens` now
    /// (an account that launched recently has used some), refilled at `per_second` in real time.
    /// EC2's own: 1000 instances, 2 a second.
    pub fn set_launch_bucket(&self, capacity: f64, tokens: f64, per_second: f64) {
        self.state().launch_bucket = Some((
            tokens.min(capacity),
            capacity,
            per_second,
            std::time::Instant::now(),
        ));
    }

    /// How many fleet requests the bucket refused.
    pub fn throttled_requests(&self) -> usize {
        self.state().throttled_requests
    }

    /// The next `requests` launches in `market` find no capacity, whatever comes after: capacity
    /// that churns between two requests made at nearly the same time.
    pub fn fail_next(&self, market: &str, requests: usize) {
        self.state()
            .capacity_failures
            .insert(market.to_owned(), requests);
    }

    /// The current spot prices: (instance type, availability zone, USD per hour).
    pub fn set_spot_prices(&self, prices: &[(&str, &str, f64)]) {
        self.state().spot_prices = prices
            .iter()
            .map(|(t, z, p)| ((*t).to_owned(), (*z).to_owned(), *p))
            .collect();
    }

    /// Ends an instance for EC2's reason, as EC2 does when it takes back a spot instance
    /// (`Server.SpotInstanceTermination`) or the instance powers itself off
    /// (`Client.InstanceInitiatedShutdown`).
    pub fn end(&self, id: &str, code: &str, message: &str) {
        let mut state = self.state();
        let now = state.now();
        let instance = state
            .instances
            .get_mut(id)
            .expect("an instance of the double");
        instance.state = "terminated".into();
        instance.terminated_at = Some(now);
        instance.state_reason = Some((code.into(), message.into()));
    }

    pub fn set_console(&self, id: &str, text: &str) {
        self.state()
            .instances
            .get_mut(id)
            .expect("an instance of the double")
            .console = Some(text.into());
    }

    /// Every instance ever launched, forgotten ones too, oldest first.
    pub fn instances(&self) -> Vec<DoubleInstance> {
        let mut instances: Vec<DoubleInstance> = self.state().instances.values().cloned().collect();
        instances.sort_by(|a, b| (a.launched_at, &a.id).cmp(&(b.launched_at, &b.id)));
        instances
    }

    /// The instances that are pending or running.
    pub fn running(&self) -> Vec<DoubleInstance> {
        self.instances()
            .into_iter()
            .filter(|i| i.state == "running")
            .collect()
    }

    /// How long a new instance stays out of DescribeInstances' answers to a query by tags or
    /// state (EC2's eventual consistency); none until told otherwise. The double's clock
    /// ([`Ec2Double::advance`]) ends it.
    pub fn set_listing_lag(&self, lag: Duration) {
        self.state().listing_lag = i64::try_from(lag.as_secs()).expect("a sane duration");
    }

    /// How long every request takes before the double acts on it, as EC2's round trips do.
    pub fn set_latency(&self, latency: Duration) {
        self.state().latency = latency;
    }

    /// A launch template version for `DescribeLaunchTemplateVersions`.
    pub fn add_launch_template(&self, version: LaunchTemplateVersion) {
        self.state().launch_templates.push(version);
    }

    /// Requests signed with `access_key` are allowed only what `policy` allows.
    pub fn set_policy(&self, access_key: &str, policy: Policy) {
        self.state().policies.insert(access_key.to_owned(), policy);
    }

    pub fn create_fleet_calls(&self) -> usize {
        self.state().create_fleet_calls
    }
}

/// The values of a list parameter: `Name.1`, `Name.2`, ...
fn list(params: &[(String, String)], name: &str) -> Vec<String> {
    (1..)
        .map_while(|i| param(params, &format!("{name}.{i}")).map(str::to_owned))
        .collect()
}

fn answer(
    state: &mut State,
    params: &[(String, String)],
    policy: Option<&Policy>,
) -> Response<Full<Bytes>> {
    let action = param(params, "Action").unwrap_or_default();
    match action {
        // After IAM, as EC2 does: the request would have succeeded.
        "CreateFleet" if param(params, "DryRun") == Some("true") => error(
            StatusCode::PRECONDITION_FAILED,
            "DryRunOperation",
            "Request would have succeeded, but DryRun flag is set.",
        ),
        "CreateFleet" => create_fleet(state, params, policy),
        "DescribeLaunchTemplateVersions" => describe_launch_template_versions(state, params),
        "DescribeInstances" => describe_instances(state, params),
        "DescribeInstanceAttribute" => describe_instance_attribute(state, params),
        "TerminateInstances" => terminate_instances(state, params),
        "GetConsoleOutput" => get_console_output(state, params),
        "DescribeSpotPriceHistory" => describe_spot_price_history(state),
        other => error(
            StatusCode::BAD_REQUEST,
            "InvalidAction",
            &format!("the EC2 double does not answer {other:?}"),
        ),
    }
}

const ARN_PREFIX: &str = "arn:aws:ec2:us-east-1:123456789012";

/// What IAM would ask of the request, in order: the first denial, as EC2 answers it.
fn denial(
    state: &State,
    policy: &Policy,
    params: &[(String, String)],
) -> Option<Response<Full<Bytes>>> {
    let action = param(params, "Action").unwrap_or_default();
    let ec2 = format!("ec2:{action}");
    let instance_arn = |id: &str| format!("{ARN_PREFIX}:instance/{id}");
    let with_resource_tags = |request: Authorization, id: &str| {
        state.instances.get(id).map_or(request.clone(), |instance| {
            instance.tags.iter().fold(request, |request, (k, v)| {
                request
                    .with(&format!("ec2:ResourceTag/{k}"), v)
                    .with(&format!("aws:ResourceTag/{k}"), v)
            })
        })
    };
    let requests: Vec<Authorization> = match action {
        "DescribeInstances" | "DescribeSpotPriceHistory" => vec![Authorization::new(&ec2, "*")],
        "TerminateInstances" | "DescribeInstanceAttribute" | "GetConsoleOutput" => {
            let mut ids = list(params, "InstanceId");
            ids.extend(param(params, "InstanceId").map(str::to_owned));
            ids.iter()
                .map(|id| with_resource_tags(Authorization::new(&ec2, &instance_arn(id)), id))
                .collect()
        }
        "CreateFleet" => {
            let mut requests = vec![Authorization::new(
                "ec2:CreateFleet",
                &format!("{ARN_PREFIX}:fleet/*"),
            )];
            // A dry run answers for every pool; a real request, pool by pool in its answer.
            if param(params, "DryRun") == Some("true") {
                for pool in 1..=overrides(params).len() {
                    requests.extend(pool_authorizations(params, pool));
                }
            }
            requests
        }
        _ => Vec::new(),
    };
    requests
        .iter()
        .find(|request| !policy.allows(request))
        .map(|denied| {
            error(
                StatusCode::FORBIDDEN,
                "UnauthorizedOperation",
                &format!(
                    "You are not authorized to perform this operation. User is not authorized to \
                 perform: {} on resource: {}",
                    denied.action, denied.resource
                ),
            )
        })
}

/// The overrides of the request's one launch template config: `(prefix of its parameters)`.
fn overrides(params: &[(String, String)]) -> Vec<String> {
    (1..)
        .map(|n| format!("LaunchTemplateConfigs.1.Overrides.{n}."))
        .take_while(|prefix| params.iter().any(|(k, _)| k.starts_with(prefix.as_str())))
        .collect()
}

/// The tags of the request's tag specification for `kind`.
fn request_tags(params: &[(String, String)], kind: &str) -> Vec<(String, String)> {
    let mut tags = Vec::new();
    for spec in 1.. {
        let Some(resource) = param(params, &format!("TagSpecification.{spec}.ResourceType")) else {
            break;
        };
        if resource != kind {
            continue;
        }
        for n in 1.. {
            let prefix = format!("TagSpecification.{spec}.Tag.{n}");
            let Some(key) = param(params, &format!("{prefix}.Key")) else {
                break;
            };
            let value = param(params, &format!("{prefix}.Value")).unwrap_or_default();
            tags.push((key.to_owned(), value.to_owned()));
        }
    }
    tags
}

/// What launching pool `pool` (1-based) asks of IAM: a `RunInstances` on the caller's behalf.
fn pool_authorizations(params: &[(String, String)], pool: usize) -> Vec<Authorization> {
    let spec = "LaunchTemplateConfigs.1.LaunchTemplateSpecification";
    let template_id = param(params, &format!("{spec}.LaunchTemplateId"))
        .or_else(|| param(params, &format!("{spec}.LaunchTemplateName")))
        .unwrap_or_default();
    let template_arn = format!("{ARN_PREFIX}:launch-template/{template_id}");
    let prefix = format!("LaunchTemplateConfigs.1.Overrides.{pool}.");
    let over = |name: &str| param(params, &format!("{prefix}{name}"));
    let run = |resource: String| {
        Authorization::new("ec2:RunInstances", &resource).with("ec2:LaunchTemplate", &template_arn)
    };
    let from_template =
        |resource: String| run(resource).with("ec2:IsLaunchTemplateResource", "true");
    let instance_tags = request_tags(params, "instance");
    let mut instance = run(format!("{ARN_PREFIX}:instance/*"))
        .with(
            "ec2:InstanceType",
            over("InstanceType").unwrap_or(
                if over("InstanceRequirements.VCpuCount.Min").is_some() {
                    "m7i.large"
                } else {
                    "t3.micro"
                },
            ),
        )
        .with(
            "ec2:MetadataHttpTokens",
            over("MetadataOptions.HttpTokens").unwrap_or("optional"),
        )
        .with_all(
            "aws:TagKeys",
            instance_tags.iter().map(|(k, _)| k.clone()).collect(),
        );
    for (key, value) in &instance_tags {
        instance = instance.with(&format!("aws:RequestTag/{key}"), value);
    }
    let mut requests = vec![
        instance,
        Authorization::new("ec2:RunInstances", &template_arn),
    ];
    if param(
        params,
        "TargetCapacitySpecification.DefaultTargetCapacityType",
    ) == Some("spot")
    {
        requests.push(Authorization::new(
            "ec2:RunInstances",
            &format!("{ARN_PREFIX}:spot-instances-request/*"),
        ));
    }
    // The template's root volume is 8 GiB; a block device override replaces it.
    let volume = match over("BlockDeviceMapping.1.Ebs.VolumeSize") {
        Some(size) => run(format!("{ARN_PREFIX}:volume/*"))
            .with("ec2:IsLaunchTemplateResource", "false")
            .with("ec2:VolumeSize", size),
        None => from_template(format!("{ARN_PREFIX}:volume/*")).with("ec2:VolumeSize", "8"),
    };
    requests.push(volume);
    // The VPC the tests deploy their resolved templates with.
    let vpc = format!("{ARN_PREFIX}:vpc/vpc-0123456789abcdef0");
    let in_vpc = |resource: String| match over("SubnetId") {
        Some(_) => run(resource)
            .with("ec2:IsLaunchTemplateResource", "false")
            .with("ec2:Vpc", &vpc),
        None => from_template(resource).with("ec2:Vpc", &vpc),
    };
    let subnet = over("SubnetId").unwrap_or("subnet-of-the-template");
    requests.push(in_vpc(format!("{ARN_PREFIX}:subnet/{subnet}")));
    requests.push(in_vpc(format!("{ARN_PREFIX}:network-interface/*")));
    requests.push(from_template(format!(
        "{ARN_PREFIX}:security-group/sg-of-the-template"
    )));
    requests.push(from_template(
        "arn:aws:ec2:us-east-1::image/ami-of-the-template".into(),
    ));
    // CreateFleet itself is authorized on what the request names or launches, with the same
    // context as the launch.
    let fleet: Vec<Authorization> = requests
        .iter()
        .filter(|r| {
            [
                "instance/",
                "volume/",
                "subnet/",
                "image/",
                "launch-template/",
            ]
            .iter()
            .any(|kind| r.resource.contains(kind))
        })
        .map(|r| Authorization {
            action: "ec2:CreateFleet".into(),
            ..r.clone()
        })
        .collect();
    requests.extend(fleet);
    if !instance_tags.is_empty() {
        requests.push(
            Authorization::new("ec2:CreateTags", &format!("{ARN_PREFIX}:instance/*"))
                .with("ec2:CreateAction", "RunInstances"),
        );
    }
    requests
}

/// Whether `market`'s pool of `instance_type` in `subnet` has capacity now.
fn has_capacity(state: &mut State, market: &str, instance_type: &str, subnet: &str) -> bool {
    let failing = state
        .capacity_failures
        .get_mut(market)
        .filter(|left| **left > 0)
        .map(|left| *left -= 1)
        .is_some();
    let out = [
        market.to_owned(),
        format!("{market}:{instance_type}"),
        format!("{market}:{instance_type}:{subnet}"),
    ];
    !failing && !state.no_capacity.iter().any(|p| out.contains(p))
}

/// Takes one launch from EC2's bucket, if it has one to give.
fn take_launch_token(state: &mut State) -> bool {
    let Some((tokens, capacity, per_second, last)) = state.launch_bucket.as_mut() else {
        return true;
    };
    let now = std::time::Instant::now();
    *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * *per_second).min(*capacity);
    *last = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

fn create_fleet(
    state: &mut State,
    params: &[(String, String)],
    policy: Option<&Policy>,
) -> Response<Full<Bytes>> {
    state.create_fleet_calls += 1;
    state.forget_expired_tokens();
    if param(params, "Type") != Some("instant")
        || param(params, "TargetCapacitySpecification.TotalTargetCapacity") != Some("1")
    {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            "the EC2 double answers instant fleets of one instance only",
        );
    }
    let market = match param(
        params,
        "TargetCapacitySpecification.DefaultTargetCapacityType",
    ) {
        Some("spot") => "spot",
        _ => "on-demand",
    };
    let token = param(params, "ClientToken").unwrap_or_default().to_owned();
    // What makes a repeat the same request: every parameter but the token.
    let mut request: Vec<(String, String)> = params
        .iter()
        .filter(|(k, _)| k != "ClientToken")
        .cloned()
        .collect();
    request.sort();
    if !token.is_empty()
        && let Some((seen, xml, _)) = state.tokens.get(&token)
    {
        if *seen != request {
            return error(
                StatusCode::BAD_REQUEST,
                "IdempotentParameterMismatch",
                "Arguments on this idempotent request are inconsistent with arguments used in \
                 previous request(s).",
            );
        }
        return ok("CreateFleetResponse", xml);
    }
    if !take_launch_token(state) {
        state.throttled_requests += 1;
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "RequestLimitExceeded",
            "Request limit exceeded.",
        );
    }
    let spec = "LaunchTemplateConfigs.1.LaunchTemplateSpecification";
    let user_data = param(
        params,
        &format!("{spec}.LaunchTemplateSpecificationUserData"),
    )
    .unwrap_or_default()
    .to_owned();
    let running = state
        .instances
        .values()
        .filter(|i| i.market == market && i.state == "running")
        .count();
    let over_quota = state.quotas.get(market).is_some_and(|max| running >= *max);
    let fleet_id = format!("fleet-{:08x}", state.create_fleet_calls);
    let mut errors = String::new();
    let mut launched = None;
    for (index, prefix) in overrides(params).iter().enumerate() {
        let over = |name: &str| param(params, &format!("{prefix}{name}")).map(str::to_owned);
        let instance_type = over("InstanceType").unwrap_or_else(|| {
            if over("InstanceRequirements.VCpuCount.Min").is_some() {
                "m7i.large".into()
            } else {
                "t3.micro".into()
            }
        });
        let subnet = over("SubnetId");
        let pool_xml = format!(
            "<launchTemplateAndOverrides><overrides>{}{}</overrides></launchTemplateAndOverrides>",
            over("InstanceType")
                .map(|t| format!("<instanceType>{t}</instanceType>"))
                .unwrap_or_default(),
            subnet
                .as_ref()
                .map(|s| format!("<subnetId>{s}</subnetId>"))
                .unwrap_or_default(),
        );
        let refused = if let Some(denied) = policy.and_then(|policy| {
            pool_authorizations(params, index + 1)
                .into_iter()
                .find(|request| !policy.allows(request))
        }) {
            Some((
                "UnauthorizedOperation",
                format!(
                    "You are not authorized to perform this operation. User is not authorized \
                     to perform: {} on resource: {}",
                    denied.action, denied.resource
                ),
            ))
        } else if over_quota {
            Some((
                "VcpuLimitExceeded",
                "You have requested more vCPU capacity than your current vCPU limit allows."
                    .to_owned(),
            ))
        } else if !has_capacity(
            state,
            market,
            &instance_type,
            subnet.as_deref().unwrap_or_default(),
        ) {
            Some((
                "InsufficientInstanceCapacity",
                format!(
                    "We currently do not have sufficient {instance_type} capacity in the pool you requested."
                ),
            ))
        } else {
            None
        };
        if let Some((code, message)) = refused {
            let _ = write!(
                errors,
                "<item>{pool_xml}<lifecycle>{market}</lifecycle><errorCode>{code}</errorCode>\
                 <errorMessage>{}</errorMessage></item>",
                escape(&message)
            );
            continue;
        }
        state.next_id += 1;
        let id = format!("i-0d{:015x}", state.next_id);
        let instance = DoubleInstance {
            id: id.clone(),
            state: "running".into(),
            instance_type: instance_type.clone(),
            market: market.into(),
            client_token: token.clone(),
            tags: request_tags(params, "instance"),
            user_data: user_data.clone(),
            launched_at: state.now(),
            terminated_at: None,
            state_reason: None,
            console: None,
            subnet_id: subnet.clone(),
            volume_gib: over("BlockDeviceMapping.1.Ebs.VolumeSize").and_then(|v| v.parse().ok()),
        };
        state.instances.insert(id.clone(), instance);
        launched = Some((id, instance_type, pool_xml));
        break;
    }
    let instances = launched
        .as_ref()
        .map(|(id, instance_type, pool_xml)| {
            format!(
                "<item>{pool_xml}<lifecycle>{market}</lifecycle><instanceIds><item>{id}</item>\
                 </instanceIds><instanceType>{instance_type}</instanceType></item>"
            )
        })
        .unwrap_or_default();
    let xml = format!(
        "<fleetId>{fleet_id}</fleetId><errorSet>{errors}</errorSet>\
         <fleetInstanceSet>{instances}</fleetInstanceSet>"
    );
    if !token.is_empty() {
        state
            .tokens
            .insert(token, (request, xml.clone(), launched.map(|(id, _, _)| id)));
    }
    ok("CreateFleetResponse", &xml)
}

fn describe_instances(state: &mut State, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let ids = list(params, "InstanceId");
    for id in &ids {
        if !state.instances.get(id).is_some_and(|i| state.listed(i)) {
            return not_found(id);
        }
    }
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for n in 1.. {
        let Some(name) = param(params, &format!("Filter.{n}.Name")) else {
            break;
        };
        filters.push((name.to_owned(), list(params, &format!("Filter.{n}.Value"))));
    }
    let matches = |instance: &DoubleInstance| {
        filters.iter().all(|(name, values)| {
            let value = match name.strip_prefix("tag:") {
                Some(tag) => instance.tag(tag),
                None if name == "instance-state-name" => Some(instance.state.as_str()),
                None => None,
            };
            value.is_some_and(|v| values.iter().any(|w| w == v))
        })
    };
    let items: String = state
        .instances
        .values()
        .filter(|i| {
            if ids.is_empty() {
                state.found(i)
            } else {
                state.listed(i) && ids.contains(&i.id)
            }
        })
        .filter(|i| matches(i))
        .map(|i| {
            format!(
                "<item><reservationId>r-{}</reservationId><ownerId>123456789012</ownerId>\
                 <instancesSet>{}</instancesSet></item>",
                &i.id[2..],
                instance_xml(i)
            )
        })
        .collect();
    ok(
        "DescribeInstancesResponse",
        &format!("<reservationSet>{items}</reservationSet>"),
    )
}

fn describe_instance_attribute(
    state: &mut State,
    params: &[(String, String)],
) -> Response<Full<Bytes>> {
    let id = param(params, "InstanceId").unwrap_or_default();
    let Some(instance) = state.instances.get(id).filter(|i| state.listed(i)) else {
        return not_found(id);
    };
    ok(
        "DescribeInstanceAttributeResponse",
        &format!(
            "<instanceId>{}</instanceId><userData><value>{}</value></userData>",
            instance.id,
            escape(&instance.user_data)
        ),
    )
}

fn terminate_instances(state: &mut State, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let now = state.now();
    let mut items = String::new();
    for id in list(params, "InstanceId") {
        let listed = state.instances.get(&id).is_some_and(|i| state.listed(i));
        let Some(instance) = state.instances.get_mut(&id).filter(|_| listed) else {
            return not_found(&id);
        };
        let previous = instance.state.clone();
        if instance.terminated_at.is_none() {
            instance.state = "terminated".into();
            instance.terminated_at = Some(now);
            instance.state_reason = Some((
                "Client.UserInitiatedShutdown".into(),
                "Client.UserInitiatedShutdown: User initiated shutdown".into(),
            ));
        }
        let _ = write!(
            items,
            "<item><instanceId>{id}</instanceId><currentState>{}</currentState>\
             <previousState>{}</previousState></item>",
            state_xml(&instance.state),
            state_xml(&previous)
        );
    }
    ok(
        "TerminateInstancesResponse",
        &format!("<instancesSet>{items}</instancesSet>"),
    )
}

fn get_console_output(state: &mut State, params: &[(String, String)]) -> Response<Full<Bytes>> {
    let id = param(params, "InstanceId").unwrap_or_default();
    let Some(instance) = state.instances.get(id).filter(|i| state.listed(i)) else {
        return not_found(id);
    };
    let output = instance
        .console
        .as_ref()
        .map(|text| format!("<output>{}</output>", BASE64.encode(text)))
        .unwrap_or_default();
    ok(
        "GetConsoleOutputResponse",
        &format!(
            "<instanceId>{id}</instanceId><timestamp>{}</timestamp>{output}",
            time(state.now())
        ),
    )
}

fn describe_spot_price_history(state: &mut State) -> Response<Full<Bytes>> {
    let items: String = state
        .spot_prices
        .iter()
        .map(|(instance_type, zone, price)| {
            format!(
                "<item><instanceType>{instance_type}</instanceType>\
                 <productDescription>Linux/UNIX</productDescription>\
                 <spotPrice>{price:.6}</spotPrice><timestamp>{}</timestamp>\
                 <availabilityZone>{zone}</availabilityZone></item>",
                time(state.now())
            )
        })
        .collect();
    ok(
        "DescribeSpotPriceHistoryResponse",
        &format!("<spotPriceHistorySet>{items}</spotPriceHistorySet>"),
    )
}

fn state_xml(name: &str) -> String {
    let code = match name {
        "pending" => 0,
        "running" => 16,
        "shutting-down" => 32,
        "terminated" => 48,
        _ => 80,
    };
    format!("<code>{code}</code><name>{name}</name>")
}

fn instance_xml(instance: &DoubleInstance) -> String {
    let tags: String = instance
        .tags
        .iter()
        .map(|(k, v)| {
            format!(
                "<item><key>{}</key><value>{}</value></item>",
                escape(k),
                escape(v)
            )
        })
        .collect();
    let lifecycle = if instance.market == "spot" {
        "<instanceLifecycle>spot</instanceLifecycle>"
    } else {
        ""
    };
    let reason = instance
        .state_reason
        .as_ref()
        .map(|(code, message)| {
            format!(
                "<stateReason><code>{}</code><message>{}</message></stateReason>",
                escape(code),
                escape(message)
            )
        })
        .unwrap_or_default();
    format!(
        "<item><instanceId>{}</instanceId><instanceType>{}</instanceType>\
         <instanceState>{}</instanceState><launchTime>{}</launchTime>{lifecycle}{reason}\
         <clientToken>{}</clientToken><tagSet>{tags}</tagSet></item>",
        instance.id,
        instance.instance_type,
        state_xml(&instance.state),
        time(instance.launched_at),
        escape(&instance.client_token),
    )
}

fn time(secs: i64) -> String {
    DateTime::from_secs(secs)
        .fmt(DateTimeFormat::DateTime)
        .expect("a representable time")
}

/// Text as XML character data.
pub(crate) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            '\n' => escaped.push_str("&#10;"),
            '\r' => escaped.push_str("&#13;"),
            c => escaped.push(c),
        }
    }
    escaped
}

fn describe_launch_template_versions(
    state: &State,
    params: &[(String, String)],
) -> Response<Full<Bytes>> {
    let id = param(params, "LaunchTemplateId").unwrap_or_default();
    let wanted = list(params, "LaunchTemplateVersion");
    let known: Vec<&LaunchTemplateVersion> = state
        .launch_templates
        .iter()
        .filter(|t| t.id == id)
        .collect();
    if known.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidLaunchTemplateId.NotFound",
            &format!("The specified launch template, with template ID {id}, does not exist."),
        );
    }
    let mut items = String::new();
    for template in known {
        if !wanted.is_empty()
            && !wanted.iter().any(|v| {
                *v == template.version.to_string()
                    || ((v == "$Latest" || v == "$Default") && template.version == 1)
            })
        {
            continue;
        }
        let optional = |tag: &str, value: &str| {
            if value.is_empty() {
                String::new()
            } else {
                format!("<{tag}>{}</{tag}>", escape(value))
            }
        };
        let network = if template.subnet_id.is_empty() {
            String::new()
        } else {
            format!(
                "<networkInterfaceSet><item><deviceIndex>0</deviceIndex><subnetId>{}</subnetId>\
                 <groupSet><item>{}</item></groupSet></item></networkInterfaceSet>",
                escape(&template.subnet_id),
                escape(&template.security_group_id)
            )
        };
        let metadata = if template.http_tokens.is_empty() {
            String::new()
        } else {
            format!(
                "<metadataOptions><httpTokens>{}</httpTokens></metadataOptions>",
                escape(&template.http_tokens)
            )
        };
        let _ = write!(
            items,
            "<item><launchTemplateId>{}</launchTemplateId><versionNumber>{}</versionNumber>\
             <launchTemplateData>{}{}{}{}</launchTemplateData></item>",
            escape(&template.id),
            template.version,
            optional("imageId", &template.image_id),
            optional(
                "instanceInitiatedShutdownBehavior",
                &template.shutdown_behavior
            ),
            metadata,
            network,
        );
    }
    if items.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidLaunchTemplateId.VersionNotFound",
            &format!("Could not find launch template version {wanted:?} of {id}."),
        );
    }
    ok(
        "DescribeLaunchTemplateVersionsResponse",
        &format!("<launchTemplateVersionSet>{items}</launchTemplateVersionSet>"),
    )
}

fn ok(root: &str, inner: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{root} \
         xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>ec2-double</requestId>\
         {inner}</{root}>"
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

fn not_found(id: &str) -> Response<Full<Bytes>> {
    error(
        StatusCode::BAD_REQUEST,
        "InvalidInstanceID.NotFound",
        &format!("The instance ID '{id}' does not exist"),
    )
}

/// An EC2 Query-protocol error response.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code>\
         <Message>{}</Message></Error></Errors><RequestID>ec2-double</RequestID></Response>",
        escape(message)
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml;charset=UTF-8")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}
