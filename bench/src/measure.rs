//! Wall time, CPU time and peak RSS of one command. The command runs under a fresh copy of this
//! binary (`s3spot-bench measure`), whose only child it is, so that getrusage(RUSAGE_CHILDREN)
//! describes that command and the processes it waited for, and nothing else.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::resource::{UsageWho, getrusage};

#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub wall: Duration,
    pub cpu: Duration,
    pub max_rss_kib: u64,
}

/// In the child: runs `sh -c command`, then prints the measurements as JSON.
pub fn measure_child(command: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let status = Command::new("sh").arg("-c").arg(command).status()?;
    let wall = start.elapsed();
    anyhow::ensure!(status.success(), "`{command}` failed: {status}");
    let usage = getrusage(UsageWho::RUSAGE_CHILDREN)?;
    let cpu = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    let out = serde_json::json!({
        "wall_secs": wall.as_secs_f64(),
        "cpu_secs": (cpu(usage.user_time()) + cpu(usage.system_time())).as_secs_f64(),
        "max_rss_kib": usage.max_rss(),
    });
    println!("{out}");
    Ok(())
}

/// Runs `command` with `sh -c` under `s3spot-bench measure`, with `envs` added.
pub fn measure(command: &str, envs: &[(&str, String)]) -> anyhow::Result<Measured> {
    let exe = std::env::current_exe()?;
    let output = Command::new(exe)
        .args(["measure", command])
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .with_context(|| format!("measuring `{command}`"))?;
    anyhow::ensure!(
        output.status.success(),
        "`{command}` failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let value: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("measure printed {line:?}"))?;
    Ok(Measured {
        wall: Duration::from_secs_f64(value["wall_secs"].as_f64().unwrap_or(f64::NAN)),
        cpu: Duration::from_secs_f64(value["cpu_secs"].as_f64().unwrap_or(f64::NAN)),
        max_rss_kib: value["max_rss_kib"].as_u64().unwrap_or(0),
    })
}
