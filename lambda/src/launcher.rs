//! The seam between deciding and launching: everything the handler asks of EC2.

use std::future::Future;

use crate::config::{LaunchOption, LaunchTemplate};

/// Tags s3spot puts on every instance and volume it launches.
pub const TAG_NAME: &str = "Name";
pub const TAG_PIPELINE: &str = "s3spot:pipeline";
pub const TAG_BUCKET: &str = "s3spot:bucket";
pub const TAG_KEY: &str = "s3spot:key";
pub const TAG_JOB: &str = "s3spot:job";
pub const TAG_ATTEMPT: &str = "s3spot:attempt";

/// EC2 tag values hold at most 256 Unicode characters.
pub const MAX_TAG_VALUE_CHARS: usize = 256;

/// One `RunInstances` call, fully decided: a launcher adds nothing of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub template: LaunchTemplate,
    pub template_version: String,
    pub option: LaunchOption,
    /// Base64 of the bootstrap script.
    pub user_data: String,
    pub client_token: String,
    /// For the instance and its volumes, in this order.
    pub tags: Vec<(String, String)>,
}

/// A running (or pending) instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    pub instance_id: String,
    pub instance_type: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No capacity for this option; the next option may have some.
    #[error("no capacity ({code}): {message}")]
    Capacity { code: String, message: String },
    /// An account limit; it frees up as instances finish, so retry later.
    #[error("account limit reached ({code}): {message}")]
    Quota { code: String, message: String },
    /// The token's instance was launched and has since terminated: this job already ran.
    #[error("already launched: the instance for this ClientToken has already terminated")]
    AlreadyLaunched,
    #[error(
        "ClientToken was already used with different parameters (IdempotentParameterMismatch): \
         this event was launched before, under a different configuration (launch template, \
         instance types, command or worker changed since); {message}"
    )]
    ParameterMismatch { message: String },
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
            LaunchError::Capacity { .. } | LaunchError::Quota { .. } => true,
            LaunchError::AlreadyLaunched | LaunchError::ParameterMismatch { .. } => false,
            LaunchError::Api { retryable, .. } => *retryable,
        }
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

    /// Launches one instance, idempotently per `request.client_token`.
    fn launch(
        &self,
        request: &LaunchRequest,
    ) -> impl Future<Output = Result<Launched, LaunchError>> + Send;
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
        }
    )*};
}

delegate_launcher!(&L, std::sync::Arc<L>);
