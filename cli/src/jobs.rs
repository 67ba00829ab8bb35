//! The job commands as requests: what `s3spot jobs` asks, and how it is carried out on a
//! [`Jobs`] or a [`Handler`], in this process (AWS) or in `s3spot local serve` (which receives
//! the request over its control socket).

use s3spot_lambda::{Clock, Handler, Jobs, Launcher, StatusStore, Target};
use serde::{Deserialize, Serialize};

/// One job command, as `s3spot local serve` receives it over its control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    List {
        stuck_after_secs: Option<u64>,
    },
    Show {
        job: String,
    },
    Cancel {
        job: String,
    },
    Retry {
        job: String,
    },
    Reap {
        dry_run: bool,
        stuck_after_secs: Option<u64>,
    },
}

/// Runs every request but `retry` on `jobs`; the answer as JSON, or the error's whole chain.
pub async fn execute<L: Launcher, S: StatusStore>(
    jobs: &Jobs<L, S>,
    request: &Request,
) -> Result<serde_json::Value, String> {
    let clock = |stuck_after_secs: Option<u64>| {
        let mut clock = Clock::now(jobs.config());
        if let Some(secs) = stuck_after_secs {
            clock.stuck_after_secs = secs;
        }
        clock
    };
    let value = match request {
        Request::List { stuck_after_secs } => jobs
            .list(clock(*stuck_after_secs))
            .await
            .map(serde_json::to_value),
        Request::Show { job } => jobs
            .show(&Target::parse(job), clock(None))
            .await
            .map(serde_json::to_value),
        Request::Cancel { job } => jobs
            .cancel(&Target::parse(job), clock(None))
            .await
            .map(serde_json::to_value),
        Request::Reap {
            dry_run,
            stuck_after_secs,
        } => jobs
            .reap(clock(*stuck_after_secs), *dry_run)
            .await
            .map(serde_json::to_value),
        // A launch: it needs the whole configuration, which a `Jobs` does not have.
        Request::Retry { .. } => return Err("retry runs on a handler: see `retry`".into()),
    };
    value
        .map_err(|error| s3spot_lambda::error_chain(&error))?
        .map_err(|error| error.to_string())
}

/// Runs `retry` on `handler`.
pub async fn retry<L: Launcher, S: StatusStore>(
    handler: &Handler<L, S>,
    job: &str,
) -> Result<serde_json::Value, String> {
    let report = handler
        .retry(&Target::parse(job))
        .await
        .map_err(|error| s3spot_lambda::error_chain(&error))?;
    serde_json::to_value(report).map_err(|error| error.to_string())
}
