//! Rendering a [`JobSpec`] into EC2 user-data.

use std::collections::HashMap;
use std::sync::LazyLock;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tera::{Context, Tera, Value};

use crate::job::{JobDecodeError, JobSpec};

/// EC2 refuses user-data over 16 KiB, counted before base64.
pub const MAX_USER_DATA_BYTES: usize = 16_384;

/// Time the worker gets after its own max runtime to stop the command and upload its status,
/// before the bootstrap script's hard limit kills it.
pub const HARD_LIMIT_GRACE_SECS: u64 = 300;

/// Time between the hard limit's SIGTERM and its SIGKILL.
pub const KILL_AFTER_SECS: u64 = 30;

const TEMPLATE_NAME: &str = "bootstrap.sh";
const TEMPLATE: &str = include_str!("../bootstrap.sh.tera");

/// Parsed once per process: the Lambda renders on every event.
static TERA: LazyLock<Tera> = LazyLock::new(|| {
    let mut tera = Tera::default();
    tera.register_filter("shell_quote", shell_quote);
    tera.add_raw_template(TEMPLATE_NAME, TEMPLATE)
        .expect("bootstrap.sh.tera is a valid template (checked by the tests)");
    tera
});

/// The one way a string enters the script: as a single shell word that the shell reads as
/// literal text. Quoting is `shlex`'s, which refuses what cannot be quoted (NUL bytes).
fn shell_quote(value: &Value, _args: &HashMap<String, Value>) -> tera::Result<Value> {
    let text = value
        .as_str()
        .ok_or_else(|| tera::Error::msg(format!("shell_quote takes a string, got {value}")))?;
    let quoted = shlex::try_quote(text)
        .map_err(|e| tera::Error::msg(format!("cannot shell-quote {text:?}: {e}")))?;
    Ok(Value::String(quoted.into_owned()))
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(
        "rendered user-data is {size} bytes, over the EC2 limit of {limit} bytes (counted before \
         base64); shorten S3SPOT_COMMAND, or the object key"
    )]
    TooLarge { size: usize, limit: usize },
    #[error(
        "the job's container environment is {size} bytes, over the {limit} bytes a Batch job's \
         overrides leave it; shorten S3SPOT_COMMAND, or the object key"
    )]
    OverridesTooLarge { size: usize, limit: usize },
    #[error("cannot render the bootstrap script")]
    Template(#[source] tera::Error),
}

/// A rendered bootstrap script, known to fit EC2's user-data limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserData(String);

impl UserData {
    pub fn script(&self) -> &str {
        &self.0
    }

    /// What `RunInstances` takes: the Rust SDK, unlike boto3, does not encode it for us.
    pub fn to_base64(&self) -> String {
        BASE64.encode(&self.0)
    }
}

/// Renders the bootstrap script for `job`. `region` is exported for the AWS CLI on the instance.
///
/// The output depends on nothing but the arguments (no clock, no randomness), so a redelivered
/// event produces byte-identical user-data, which `RunInstances` idempotency requires.
pub fn render_user_data(job: &JobSpec, region: Option<&str>) -> Result<UserData, RenderError> {
    let mut context = Context::new();
    context.insert("container", &false);
    context.insert("job", &job.encode());
    context.insert("region", &region);
    context.insert("worker_uri", &job.worker.uri);
    context.insert("worker_sha256", &job.worker.sha256);
    context.insert("attempt", &job.attempt);
    context.insert("max_runtime_secs", &job.max_runtime_secs);
    context.insert(
        "hard_limit_secs",
        &job.max_runtime_secs.saturating_add(HARD_LIMIT_GRACE_SECS),
    );
    context.insert("kill_after_secs", &KILL_AFTER_SECS);
    let script = TERA
        .render(TEMPLATE_NAME, &context)
        .map_err(RenderError::Template)?;
    if script.len() > MAX_USER_DATA_BYTES {
        return Err(RenderError::TooLarge {
            size: script.len(),
            limit: MAX_USER_DATA_BYTES,
        });
    }
    Ok(UserData(script))
}

/// What a job's own environment may take of a Batch job's overrides. ECS caps a task's
/// overrides at 8,192 characters of JSON, and Batch sends the job's command (the job
/// definition's short one) and its own variables (`AWS_BATCH_JOB_ID`, ...) there too.
pub const MAX_CONTAINER_OVERRIDES_BYTES: usize = 7_168;

/// The command of a container that runs s3spot jobs (an AWS Batch job definition's): the
/// bootstrap script without a job in it. Each job brings its own in the container's environment
/// ([`container_environment`]). `region` is exported for the fetch of the worker.
pub fn render_container_script(region: Option<&str>) -> Result<String, RenderError> {
    let mut context = Context::new();
    context.insert("container", &true);
    context.insert("region", &region);
    context.insert("kill_after_secs", &KILL_AFTER_SECS);
    TERA.render(TEMPLATE_NAME, &context)
        .map_err(RenderError::Template)
}

/// A job's environment in a container that runs [`render_container_script`]: the job itself,
/// the worker to fetch, and the hard limit. Refused when it would not fit a task's overrides.
pub fn container_environment(job: &JobSpec) -> Result<Vec<(String, String)>, RenderError> {
    let environment = vec![
        ("S3SPOT_JOB".to_owned(), job.encode()),
        ("S3SPOT_WORKER_URI".to_owned(), job.worker.uri.clone()),
        ("S3SPOT_WORKER_SHA256".to_owned(), job.worker.sha256.clone()),
        (
            "S3SPOT_HARD_LIMIT_SECS".to_owned(),
            job.max_runtime_secs
                .saturating_add(HARD_LIMIT_GRACE_SECS)
                .to_string(),
        ),
    ];
    // {"name":"...","value":"..."}, with the list's brackets and commas: the JSON the
    // overrides take, as ECS counts it.
    let size = environment
        .iter()
        .map(|(name, value)| name.len() + value.len() + r#"{"name":"","value":""},"#.len())
        .sum::<usize>()
        + r#"{"containerOverrides":[{"environment":[]}]}"#.len();
    if size > MAX_CONTAINER_OVERRIDES_BYTES {
        return Err(RenderError::OverridesTooLarge {
            size,
            limit: MAX_CONTAINER_OVERRIDES_BYTES,
        });
    }
    Ok(environment)
}

/// The [`JobSpec`] an instance was launched with, from its user-data as EC2 returns it: base64
/// of the rendered script.
pub fn job_from_base64_user_data(encoded: &str) -> Result<JobSpec, JobDecodeError> {
    let script = BASE64
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or(JobDecodeError::NotAScript)?;
    job_from_user_data(&script)
}

/// Reads the [`JobSpec`] back out of a rendered script.
pub fn job_from_user_data(script: &str) -> Result<JobSpec, JobDecodeError> {
    let word = script
        .lines()
        .find_map(|line| line.strip_prefix("S3SPOT_JOB="))
        .and_then(shlex::split)
        .and_then(|words| words.into_iter().next())
        .ok_or(JobDecodeError::NotInUserData)?;
    JobSpec::decode(&word)
}
