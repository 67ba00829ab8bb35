//! `s3spot-worker`: runs one job on the instance, then shuts it down.

fn main() -> std::process::ExitCode {
    s3spot_worker::cli::main()
}
