//! The `s3spot` command, built in this package so that the end-to-end tests here can run it:
//! Cargo gives a package's tests the paths of that package's own binaries only.

fn main() -> std::process::ExitCode {
    s3spot::command::main()
}
