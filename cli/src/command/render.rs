//! `s3spot render`: what each record would launch with, without calling AWS.

use std::path::Path;

use anyhow::Context as _;
use s3spot_lambda::JobConfig;
use s3spot_lambda::plan::{Decision, preview};
use serde_json::json;

/// Returns whether every record would launch or be skipped (none would fail).
pub fn run(event: &Path, as_json: bool) -> anyhow::Result<bool> {
    let event = super::read_event(event)?;
    let mut config = JobConfig::from_env().context("bad configuration")?;
    config.region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .ok();
    let decisions = preview(&config, event)?;
    let all_ok = !decisions.iter().any(|d| matches!(d, Decision::Fail { .. }));
    if as_json {
        let documents: Vec<_> = decisions.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&documents)?);
        return Ok(all_ok);
    }
    for decision in &decisions {
        match decision {
            Decision::Launch { job, .. } => {
                println!(
                    "# launch s3://{}/{:?} (attempt {}, {} bytes of user-data)",
                    job.spec.bucket,
                    job.spec.key,
                    job.spec.attempt,
                    job.user_data.script().len()
                );
                println!("## JobSpec");
                println!("{}", serde_json::to_string_pretty(&job.spec)?);
                println!("## user-data");
                println!("{}", job.user_data.script());
            }
            Decision::Skip {
                bucket,
                key,
                reason,
            } => eprintln!("skip s3://{bucket}/{key:?}: {reason}"),
            Decision::Fail { bucket, key, error } => {
                eprintln!("fail s3://{bucket}/{key:?}: {error}");
            }
        }
    }
    Ok(all_ok)
}

/// The job definition's command for the Batch backend. The stack's is this, with the region
/// left to the job definition's environment (a template test keeps the two equal).
pub fn container() -> anyhow::Result<bool> {
    print!("{}", s3spot_bootstrap::render_container_script(None)?);
    Ok(true)
}

fn to_json(decision: &Decision) -> serde_json::Value {
    match decision {
        Decision::Launch { job, .. } => json!({
            "action": "launch",
            "bucket": job.spec.bucket,
            "key": job.spec.key,
            "job": job.spec,
            "user_data": job.user_data.script(),
        }),
        Decision::Skip {
            bucket,
            key,
            reason,
        } => json!({"action": "skip", "bucket": bucket, "key": key, "reason": reason}),
        Decision::Fail { bucket, key, error } => {
            json!({"action": "fail", "bucket": bucket, "key": key, "error": error})
        }
    }
}
