//! The `s3spot` command: the launcher and the rendering driven by hand ([`command`]), and the
//! whole pipeline on one machine ([`local`]).

pub mod command;
pub mod dashboard;
pub mod doctor;
pub mod jobs;
pub mod local;
