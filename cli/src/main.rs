//! `s3spot`: the pipeline's code, driven by a person.

fn main() -> std::process::ExitCode {
    s3spot::command::main()
}
