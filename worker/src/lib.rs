//! s3spot's worker: on the instance, one job from download to `status.json`.
//!
//! [`Worker::run`] identifies the instance ([`instance`]), downloads the object ([`download`]),
//! runs the command or the built-in analysis ([`process`], [`analysis`]), and uploads the results
//! and the status ([`upload`]). Shutting the machine down is left to the caller, so that it
//! happens exactly once, after everything else.

pub mod analysis;
pub mod cli;
pub mod download;
pub mod instance;
pub mod process;
pub mod run;
pub mod settings;
pub mod upload;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

pub use instance::Metadata;
pub use run::{StopSignals, Worker, catch_panic, local_name};
pub use s3spot_bootstrap::error_chain;
pub use settings::Settings;

/// Runs the operator's shutdown command through `sh -c`.
pub fn shut_down(command: &str) -> std::io::Result<std::process::ExitStatus> {
    tracing::info!(command, "shutting down");
    std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
}

/// An S3 error as `Code: message`, or its whole context when S3 sent no code.
fn sdk_message<E>(error: &SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match (error.code(), error.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => DisplayErrorContext(error).to_string(),
    }
}
