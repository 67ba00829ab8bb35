//! The contract that travels to the instance: a [`JobSpec`] and the bootstrap script that carries it
//! in EC2 user-data.

mod job;
mod render;

pub use job::{DEFAULT_RESULTS_PREFIX, JobDecodeError, JobSpec, WorkerArtifact};
pub use render::{
    HARD_LIMIT_GRACE_SECS, KILL_AFTER_SECS, MAX_USER_DATA_BYTES, RenderError, UserData,
    job_from_user_data, render_user_data,
};
