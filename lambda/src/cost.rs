//! `s3spot jobs cost`: what the jobs cost, from the estimates in their `status.json` (see
//! [`s3spot_bootstrap::Cost`]), summed by day, results prefix, state or instance type, beside
//! what the same hours would have cost on demand.

use std::collections::BTreeMap;
use std::time::SystemTime;

use futures_util::{StreamExt as _, TryStreamExt as _};
use s3spot_bootstrap::{
    Cost, STATUS_FILE, Status, StatusStore, WAITING_FOLDER, parse_timestamp, timestamp,
    upload_order,
};
use serde::{Deserialize, Serialize};

use crate::jobs::{Jobs, JobsError};
use crate::launcher::Launcher;

/// How many status documents are read at once.
const READS_AT_ONCE: usize = 16;

/// What the costs are summed by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CostBy {
    /// The UTC day each attempt ended.
    #[default]
    Day,
    /// The first folder of the object's key (`in/` for `in/a.csv`).
    Prefix,
    /// How the job ended.
    State,
    /// The instance type.
    Type,
}

impl std::str::FromStr for CostBy {
    type Err = String;

    fn from_str(text: &str) -> Result<CostBy, String> {
        match text {
            "day" => Ok(CostBy::Day),
            "prefix" => Ok(CostBy::Prefix),
            "state" => Ok(CostBy::State),
            "type" => Ok(CostBy::Type),
            other => Err(format!("{other:?} is not one of day, prefix, state, type")),
        }
    }
}

/// One group's sums.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CostGroup {
    pub group: String,
    /// Attempts counted, with or without a price.
    pub attempts: usize,
    /// Attempts with an estimate: the sums are theirs.
    pub priced: usize,
    pub seconds: u64,
    pub usd: f64,
    /// The same seconds at the on-demand price; an attempt whose on-demand price is not known
    /// counts at its own.
    pub on_demand_usd: f64,
    pub saving_usd: f64,
}

impl CostGroup {
    fn add(&mut self, cost: Option<&Cost>) {
        self.attempts += 1;
        let Some(cost) = cost else { return };
        self.priced += 1;
        self.seconds += cost.seconds;
        self.usd += cost.usd.0;
        self.on_demand_usd += cost.on_demand_usd.unwrap_or(cost.usd).0;
        self.saving_usd = self.on_demand_usd - self.usd;
    }

    /// The saving as a share of the on-demand cost, in percent.
    pub fn saving_percent(&self) -> Option<f64> {
        (self.on_demand_usd > 0.0).then(|| 100.0 * self.saving_usd / self.on_demand_usd)
    }
}

/// What `s3spot jobs cost` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    /// RFC 3339: status documents written since then are counted.
    pub since: String,
    pub by: CostBy,
    pub groups: Vec<CostGroup>,
    pub total: CostGroup,
    /// Jobs counted, and status documents that could not be read (skipped).
    pub jobs: usize,
    pub unreadable: Vec<String>,
}

/// One attempt, as the report counts it.
#[derive(Debug, Clone, PartialEq)]
pub struct CostedAttempt {
    pub key: String,
    pub state: String,
    /// RFC 3339; empty if not known.
    pub ended_at: String,
    pub cost: Option<Cost>,
}

/// Each attempt of a job's status: its earlier attempts (from its history) and its last.
/// A `waiting` status has no attempt that ended.
pub fn attempts_of(status: &Status) -> Vec<CostedAttempt> {
    let mut attempts: Vec<CostedAttempt> = status
        .history
        .iter()
        .map(|a| CostedAttempt {
            key: status.input.key.clone(),
            state: a.state.to_string(),
            ended_at: a.finished_at.clone(),
            cost: a.cost.clone(),
        })
        .collect();
    if !status.is_waiting() {
        attempts.push(CostedAttempt {
            key: status.input.key.clone(),
            state: status.state.to_string(),
            ended_at: status.finished_at.clone(),
            cost: status.cost.clone(),
        });
    }
    attempts
}

/// Sums `attempts` by `by`, groups in name order (days oldest first).
pub fn summarize(attempts: &[CostedAttempt], by: CostBy) -> (Vec<CostGroup>, CostGroup) {
    let mut groups: BTreeMap<String, CostGroup> = BTreeMap::new();
    let mut total = CostGroup {
        group: "total".into(),
        ..CostGroup::default()
    };
    for attempt in attempts {
        let name = match by {
            CostBy::Day => day_of(&attempt.ended_at),
            CostBy::Prefix => match attempt.key.split_once('/') {
                Some((folder, _)) => format!("{folder}/"),
                None => "(top level)".to_owned(),
            },
            CostBy::State => attempt.state.clone(),
            CostBy::Type => attempt
                .cost
                .as_ref()
                .map_or_else(|| "(unknown)".to_owned(), |c| c.instance_type.clone()),
        };
        groups
            .entry(name.clone())
            .or_insert_with(|| CostGroup {
                group: name,
                ..CostGroup::default()
            })
            .add(attempt.cost.as_ref());
        total.add(attempt.cost.as_ref());
    }
    (groups.into_values().collect(), total)
}

/// The job id part of the upload folder that holds `key`, if `key` is a status.json directly
/// in one (`<stamp>-<16 hex digits>/status.json`).
fn upload_of(key: &str) -> Option<&str> {
    let folder = key.strip_suffix(STATUS_FILE)?.strip_suffix('/')?;
    let name = folder.rsplit('/').next()?;
    upload_order(name)?;
    name.rsplit('-').next()
}

/// `2026-11-30` of an RFC 3339 time; `(unknown)` if it is not one.
fn day_of(time: &str) -> String {
    match parse_timestamp(time) {
        Some(at) => timestamp(at).chars().take("2026-11-30".len()).collect(),
        None => "(unknown)".to_owned(),
    }
}

impl<L: Launcher, S: StatusStore> Jobs<L, S> {
    /// The cost of every job whose status.json was written at `since` or later, in the results
    /// bucket, summed `by` a key. Documents that cannot be read are named and skipped.
    pub async fn cost(&self, since: SystemTime, by: CostBy) -> Result<CostReport, JobsError> {
        let config = self.config();
        let bucket = config
            .results_bucket
            .clone()
            .ok_or(JobsError::NoResultsBucket)?;
        let prefix = &config.results_prefix;
        let waiting = format!("{prefix}{WAITING_FOLDER}");
        // A job's status.json is directly in its upload's folder; a command's output of that
        // name is deeper, or in a folder of another shape.
        let keys: Vec<String> = self
            .statuses()
            .named(&bucket, prefix, STATUS_FILE, since)
            .await?
            .into_iter()
            .filter(|key| !key.starts_with(&waiting) && upload_of(key).is_some())
            .collect();
        let read: Vec<(String, Result<Option<Status>, String>)> =
            futures_util::stream::iter(keys.into_iter().map(|key| {
                let bucket = &bucket;
                async move {
                    // Any job's: the id check is for writers, and the key says which job it is.
                    let status = match self.statuses().get(bucket, &key).await {
                        Ok(Some(document)) => serde_json::from_slice::<Status>(&document.body)
                            .map_err(|e| format!("not a status: {e}"))
                            .and_then(|status| {
                                // The folder names the job: a copy of another's is not this one.
                                let id = upload_of(&key).unwrap_or_default();
                                if status.job_id.starts_with(id) {
                                    Ok(Some(status))
                                } else {
                                    Err(format!(
                                        "the status of job {}, not of its folder's",
                                        status.job_id
                                    ))
                                }
                            }),
                        Ok(None) => Ok(None),
                        Err(error) => Err(s3spot_bootstrap::error_chain(&error)),
                    };
                    Ok::<_, JobsError>((key, status))
                }
            }))
            .buffered(READS_AT_ONCE)
            .try_collect()
            .await?;
        let mut attempts = Vec::new();
        let mut unreadable = Vec::new();
        let mut jobs = 0;
        for (key, status) in read {
            match status {
                Ok(Some(status)) => {
                    // A document written lately can hold attempts that ended long before.
                    let recent: Vec<CostedAttempt> = attempts_of(&status)
                        .into_iter()
                        .filter(|attempt| {
                            parse_timestamp(&attempt.ended_at).is_none_or(|ended| ended >= since)
                        })
                        .collect();
                    jobs += usize::from(!recent.is_empty());
                    attempts.extend(recent);
                }
                Ok(None) => {}
                Err(error) => unreadable.push(format!("s3://{bucket}/{key}: {error}")),
            }
        }
        let (groups, total) = summarize(&attempts, by);
        Ok(CostReport {
            since: timestamp(since),
            by,
            groups,
            total,
            jobs,
            unreadable,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3spot_bootstrap::{LaunchPrice, Usd};

    fn cost(instance_type: &str, usd_per_hour: f64, on_demand: Option<f64>, secs: u64) -> Cost {
        let price = LaunchPrice {
            instance_type: instance_type.into(),
            zone: Some("us-east-1a".into()),
            market: "spot".into(),
            usd_per_hour: Some(Usd(usd_per_hour)),
            source: "spot price at launch".into(),
            on_demand_usd_per_hour: on_demand.map(Usd),
            launched_at: "2026-11-30T10:00:00Z".into(),
            volume_gib: None,
        };
        let ended =
            parse_timestamp("2026-11-30T10:00:00Z").unwrap() + std::time::Duration::from_secs(secs);
        Cost::estimate(&price, ended).unwrap()
    }

    fn attempt(key: &str, state: &str, ended_at: &str, cost: Option<Cost>) -> CostedAttempt {
        CostedAttempt {
            key: key.into(),
            state: state.into(),
            ended_at: ended_at.into(),
            cost,
        }
    }

    #[test]
    fn only_a_status_directly_in_an_upload_folder_is_a_jobs() {
        let folder = "analysis/in/a.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f";
        assert_eq!(
            upload_of(&format!("{folder}/status.json")),
            Some("6f1c2a3b4c5d6e7f")
        );
        assert_eq!(
            upload_of("analysis/in/a.csv/undated-6f1c2a3b4c5d6e7f/status.json"),
            Some("6f1c2a3b4c5d6e7f")
        );
        for not in [
            format!("{folder}/sub/status.json"),
            format!("{folder}/attempt-1-stopped/status.json"),
            "analysis/in/a.csv/status.json".to_owned(),
            "status.json".to_owned(),
            format!("{folder}/status.json.bak"),
        ] {
            assert_eq!(upload_of(&not), None, "{not}");
        }
    }

    #[test]
    fn known_prices_and_durations_give_known_sums() {
        let attempts = [
            // 1 h at $0.036 spot, $0.096 on demand.
            attempt(
                "in/a.csv",
                "succeeded",
                "2026-11-29T23:00:00Z",
                Some(cost("m5.large", 0.036, Some(0.096), 3600)),
            ),
            // 30 min at $0.05 spot, on-demand price not known: no saving counted.
            attempt(
                "in/b.csv",
                "failed",
                "2026-11-30T01:00:00Z",
                Some(cost("x9.huge", 0.05, None, 1800)),
            ),
            // 10 s, billed as a minute: $0.06/h for 60 s.
            attempt(
                "other.csv",
                "succeeded",
                "2026-11-30T02:00:00Z",
                Some(cost("m5.large", 0.06, Some(0.096), 10)),
            ),
            // No price: counted, not summed.
            attempt("in/c.csv", "cancelled", "2026-11-30T03:00:00Z", None),
        ];
        let (days, total) = summarize(&attempts, CostBy::Day);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(total.attempts, 4);
        assert_eq!(total.priced, 3);
        assert_eq!(total.seconds, 3600 + 1800 + 10);
        assert!(close(total.usd, 0.036 + 0.025 + 0.001), "{total:?}");
        assert!(
            close(total.on_demand_usd, 0.096 + 0.025 + 0.0016),
            "{total:?}"
        );
        assert!(close(total.saving_usd, 0.06 + 0.0006), "{total:?}");
        let names: Vec<&str> = days.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(names, ["2026-11-29", "2026-11-30"]);
        assert!(close(days[1].usd, 0.026));
        assert_eq!(days[1].attempts, 3);

        let (prefixes, _) = summarize(&attempts, CostBy::Prefix);
        let names: Vec<(&str, usize)> = prefixes
            .iter()
            .map(|g| (g.group.as_str(), g.attempts))
            .collect();
        assert_eq!(names, [("(top level)", 1), ("in/", 3)]);
        let (states, _) = summarize(&attempts, CostBy::State);
        let names: Vec<&str> = states.iter().map(|g| g.group.as_str()).collect();
        assert_eq!(names, ["cancelled", "failed", "succeeded"]);
        let (types, _) = summarize(&attempts, CostBy::Type);
        let names: Vec<(&str, usize)> =
            types.iter().map(|g| (g.group.as_str(), g.priced)).collect();
        assert_eq!(names, [("(unknown)", 0), ("m5.large", 2), ("x9.huge", 1)]);
    }

    #[test]
    fn a_job_counts_its_earlier_attempts_and_not_a_wait() {
        let mut status: Status = serde_json::from_value(serde_json::json!({
            "state": "succeeded", "job_id": "0".repeat(32), "written_by": "worker",
            "input": {"bucket": "data", "key": "in/a.csv", "version_id": null, "etag": null,
                      "size": null, "sha256": null},
            "outputs": [], "exit_code": 0, "error": null,
            "timings": {"download_ms": 0, "process_ms": 0, "upload_ms": 0},
            "instance": null, "attempt": 2, "worker_version": "0.1.0",
            "started_at": "", "finished_at": "2026-11-30T11:00:00Z"
        }))
        .unwrap();
        status.cost = Some(cost("m5.large", 0.036, Some(0.096), 3600));
        status.history = vec![s3spot_bootstrap::Attempt {
            attempt: 1,
            state: s3spot_bootstrap::State::Interrupted,
            instance_id: Some("i-1".into()),
            error: None,
            finished_at: "2026-11-30T09:00:00Z".into(),
            cost: Some(cost("m5.large", 0.036, Some(0.096), 1800)),
        }];
        let attempts = attempts_of(&status);
        assert_eq!(attempts.len(), 2);
        let (_, total) = summarize(&attempts, CostBy::State);
        assert_eq!(total.seconds, 5400);
        status.state = s3spot_bootstrap::State::Waiting;
        assert_eq!(attempts_of(&status).len(), 1, "a wait has not ended");
    }
}
