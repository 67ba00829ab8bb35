//! The contract between the launcher and the instance, and the protocol that comes back:
//!
//! - the [`JobSpec`] that travels out in EC2 user-data, with the bootstrap script that carries
//!   it out ([`render_user_data`]), and where the job's results live
//!   ([`JobSpec::results_key_prefix`]);
//! - the [`Status`] that comes back as `status.json`: what each writer starts from, the
//!   launcher's verdicts, and the one rule for which status replaces which ([`settle`]), applied
//!   through the [`StatusStore`] seam by [`record`];
//! - each attempt's [`Claim`], which makes one attempt one launch;
//! - the worker's [`Stage`] events;
//! - the jobs' state-change [`JobEvent`]s, and what each attempt cost ([`Cost`]).

mod claim;
mod cost;
mod events;
#[cfg(any(test, feature = "fake"))]
pub mod fake;
mod job;
mod render;
mod stage;
mod status;
mod store;

pub use claim::{
    Claim, RECORDS_FOLDER, StoredClaim, WAITING_FOLDER, read_claim, waiting_prefix, write_claim,
};
pub use cost::{Cost, EBS_GP3_USD_PER_GIB_MONTH, LaunchPrice, MIN_BILLED_SECS, Usd};
pub use events::{
    EVENT_DETAIL_TYPE, EVENT_SOURCE, EventBridge, EventError, EventInstance, EventResults,
    EventSink, Events, JobEvent, JobState, JsonLines,
};
pub use job::{
    DEFAULT_RESULTS_PREFIX, JobDecodeError, JobSpec, MAX_KEY_BYTES, UploadIdentity, WorkerArtifact,
    job_id, key_results_prefix, stopped_folder, upload_folder, upload_order,
};
pub use render::{
    HARD_LIMIT_GRACE_SECS, KILL_AFTER_SECS, MAX_CONTAINER_OVERRIDES_BYTES, MAX_USER_DATA_BYTES,
    RenderError, UserData, container_environment, job_from_base64_user_data, job_from_user_data,
    render_container_script, render_user_data,
};
pub use stage::Stage;
pub use status::{
    Attempt, Input, Instance, OtherJob, REPORT_FILE, STATUS_FILE, STDERR_FILE, STDOUT_FILE,
    Settled, State, Status, Timings, Waiting, WaitingPool, Writer, parse_timestamp, settle,
    timestamp,
};
pub use store::{
    Before, Document, Expect, Recorded, S3Statuses, StatusError, StatusStore, Stored,
    changed_state, read_status, read_stored, record, record_change, write_status,
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
