//! The contracts between the launcher and the instance: the [`JobSpec`] that travels out in EC2
//! user-data (with the bootstrap script that carries it), and the [`Status`] that comes back as
//! `status.json` next to the results.

mod job;
mod render;
mod status;

pub use job::{
    DEFAULT_RESULTS_PREFIX, JobDecodeError, JobSpec, MAX_KEY_BYTES, WorkerArtifact,
    results_key_prefix,
};
pub use render::{
    HARD_LIMIT_GRACE_SECS, KILL_AFTER_SECS, MAX_USER_DATA_BYTES, RenderError, UserData,
    job_from_user_data, render_user_data,
};
pub use status::{
    Attempt, Input, Instance, REPORT_FILE, STATUS_FILE, STDERR_FILE, STDOUT_FILE, State, Status,
    Timings,
};

/// An error and its sources, joined with ": ". Every s3spot crate reports errors this way, so that
/// the cause, usually at the end of the chain, is never lost.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
