//! The contracts between the launcher and the instance: the [`JobSpec`] that travels out in EC2
//! user-data (with the bootstrap script that carries it), and the [`Status`] that comes back as
//! `status.json` next to the results.

mod job;
mod render;
mod status;

pub use job::{DEFAULT_RESULTS_PREFIX, JobDecodeError, JobSpec, WorkerArtifact};
pub use render::{
    HARD_LIMIT_GRACE_SECS, KILL_AFTER_SECS, MAX_USER_DATA_BYTES, RenderError, UserData,
    job_from_user_data, render_user_data,
};
pub use status::{
    Input, Instance, REPORT_FILE, STATUS_FILE, STDERR_FILE, STDOUT_FILE, State, Status, Timings,
};
