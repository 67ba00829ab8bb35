//! `s3spot-worker`: downloads the job's object, processes it, uploads the results. Not built yet;
//! until it is, it refuses to run rather than report a job as done.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("s3spot-worker: this build has no worker yet; the job was not processed");
    ExitCode::FAILURE
}
