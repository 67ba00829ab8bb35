//! An attempt's claim: written by the launcher, on the condition that there is none yet, before
//! it launches the attempt. Whatever deliveries of an upload's event race each other (S3 sends
//! duplicates, SQS redelivers, two launch options, a warning and the reaper at once), one of
//! them holds the claim, and only it launches. The claim keeps the attempt's `JobSpec` and its
//! instance where S3 keeps them for good, unlike EC2, which forgets instances an hour after they
//! end, and their `ClientToken`s a day after.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
use serde::{Deserialize, Serialize};

use crate::cost::LaunchPrice;
use crate::job::JobSpec;
use crate::store::{Expect, StatusError, StatusStore};

/// The folder, in a job's, of its attempts' claims. No output is ever written there.
pub const RECORDS_FOLDER: &str = ".s3spot/";

/// The folder, under the results prefix, that lists the jobs waiting for an instance: one
/// folder per job, holding a copy of its `waiting` status. It is there only while the job waits.
pub const WAITING_FOLDER: &str = ".s3spot/waiting/";

/// Where the waiting jobs are listed, in a results bucket.
pub fn waiting_prefix(results_prefix: &str) -> String {
    format!("{results_prefix}{WAITING_FOLDER}")
}

impl JobSpec {
    /// This job's entry in the list of waiting jobs, in `results_bucket`.
    pub fn waiting_key(&self) -> String {
        format!(
            "{}{}/status.json",
            waiting_prefix(&self.results_prefix),
            self.job_id
        )
    }

    /// Where this attempt's claim lives, in `results_bucket`.
    pub fn claim_key(&self) -> String {
        format!(
            "{}{RECORDS_FOLDER}attempt-{}.json",
            self.results_key_prefix(),
            self.attempt
        )
    }
}

/// One attempt's claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The attempt, exactly as it was launched.
    pub job: JobSpec,
    /// When the launcher that holds it began the launch (RFC 3339, UTC).
    pub claimed_at: String,
    /// When the attempt was first claimed, if a launcher has taken the claim over since: how
    /// long the attempt has waited for an instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The instance launched for the attempt, once there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Why the attempt needs no launch, though its instance is not known: EC2 answered that its
    /// `ClientToken` belongs to an instance that has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<String>,
    /// Why the launch gave up, when nothing was launched: whoever comes next takes it over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<String>,
    /// How many launches of the attempt EC2 answered with no instance before this one. A fleet
    /// request repeated with its `ClientToken` gets the first answer again, so each try after a
    /// refusal needs a token of its own; a try whose outcome is unknown keeps its token.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused: u32,
    /// What the instance was launched at, for the attempt's cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<LaunchPrice>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Claim {
    /// A new claim on `job`'s attempt, from now.
    pub fn new(job: JobSpec) -> Claim {
        Claim {
            job,
            claimed_at: crate::status::timestamp(SystemTime::now()),
            since: None,
            instance_id: None,
            done: None,
            released: None,
            refused: 0,
            price: None,
        }
    }

    /// A new claim on the same attempt, taking this one over: it keeps [`Claim::since`], and
    /// counts this one's launch as refused if it was released.
    pub fn take_over(&self, job: JobSpec) -> Claim {
        Claim {
            since: Some(
                self.since
                    .clone()
                    .unwrap_or_else(|| self.claimed_at.clone()),
            ),
            refused: self.refused + u32::from(self.released.is_some()),
            ..Claim::new(job)
        }
    }

    /// How long ago the launch began; `None` if that cannot be told (the claim is then as old
    /// as can be).
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        age(&self.claimed_at, now)
    }

    /// How long the attempt has been claimed, by this launcher and those before it.
    pub fn waited(&self, now: SystemTime) -> Option<Duration> {
        age(self.since.as_deref().unwrap_or(&self.claimed_at), now)
    }

    /// Held by a launch that is (or was) under way, with nothing on record yet.
    pub fn is_pending(&self) -> bool {
        self.instance_id.is_none() && self.done.is_none() && self.released.is_none()
    }
}

fn age(timestamp: &str, now: SystemTime) -> Option<Duration> {
    let then = DateTime::from_str(timestamp, DateTimeFormat::DateTime).ok()?;
    let then = SystemTime::try_from(then).ok()?;
    Some(now.duration_since(then).unwrap_or_default())
}

/// A claim as read: the claim, or why it is not one, and what a write over it must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredClaim {
    pub claim: Result<Claim, String>,
    pub expect: Expect,
}

/// The claim at `key`; `None` if there is none.
pub async fn read_claim<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
) -> Result<Option<StoredClaim>, StatusError> {
    let Some(document) = store.get(bucket, key).await? else {
        return Ok(None);
    };
    Ok(Some(StoredClaim {
        claim: serde_json::from_slice(&document.body).map_err(|e| e.to_string()),
        expect: Expect::over(Some(&document)),
    }))
}

/// Writes `claim` at `key` if what is stored is still as `expect` says (nothing, for a new
/// claim). Returns what a write over it must match next.
pub async fn write_claim<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
    claim: &Claim,
    expect: &Expect,
) -> Result<Expect, StatusError> {
    let body = serde_json::to_vec_pretty(claim).expect("a claim serialises");
    store.put(bucket, key, body, expect).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::MemoryStatuses;

    #[test]
    fn claims_live_beside_the_jobs_status_apart_from_its_outputs() {
        let mut job = crate::job::tests::sample();
        job.attempt = 2;
        assert_eq!(
            job.claim_key(),
            "analysis/in/report 2024.csv/20261130T101937.123Z-6f1c2a3b4c5d6e7f/.s3spot/attempt-2.json"
        );
    }

    #[tokio::test]
    async fn one_claim_per_attempt_whoever_comes_second() {
        let store = MemoryStatuses::default();
        let job = crate::job::tests::sample();
        let key = job.claim_key();
        let claim = Claim::new(job.clone());
        let ours = write_claim(&store, "data", &key, &claim, &Expect::Nothing)
            .await
            .unwrap();
        let error = write_claim(&store, "data", &key, &claim, &Expect::Nothing)
            .await
            .unwrap_err();
        assert!(matches!(error, StatusError::Conflict { .. }), "{error}");
        let stored = read_claim(&store, "data", &key).await.unwrap().unwrap();
        let held = stored.claim.unwrap();
        assert_eq!(held, claim);
        assert_eq!(stored.expect, ours);
        assert!(held.is_pending());
        assert!(held.age(SystemTime::now()).unwrap() < Duration::from_secs(60));
        let mut launched = held.clone();
        launched.instance_id = Some("i-1".into());
        write_claim(&store, "data", &key, &launched, &ours)
            .await
            .unwrap();
        let stored = read_claim(&store, "data", &key).await.unwrap().unwrap();
        assert!(!stored.claim.unwrap().is_pending());
        store.put_damaged("data", &key);
        let damaged = read_claim(&store, "data", &key).await.unwrap().unwrap();
        assert!(damaged.claim.is_err());
        assert!(matches!(damaged.expect, Expect::ETag(_)));
        let stale = Claim {
            claimed_at: "2020-01-01T00:00:00Z".into(),
            ..claim
        };
        assert!(stale.age(SystemTime::now()).unwrap() > Duration::from_secs(3600));
        // Taken over, the claim is new, and still says since when the attempt has waited.
        let taken = stale.take_over(job.clone());
        assert!(taken.is_pending());
        assert!(taken.age(SystemTime::now()).unwrap() < Duration::from_secs(60));
        assert!(taken.waited(SystemTime::now()).unwrap() > Duration::from_secs(3600));
        let again = taken.take_over(job.clone());
        assert_eq!(again.since.as_deref(), Some("2020-01-01T00:00:00Z"));
        // A launch of unknown outcome keeps its token; one EC2 refused gets a new one.
        assert_eq!(again.refused, 0);
        let refused = Claim {
            released: Some("no capacity".into()),
            ..again
        };
        assert_eq!(refused.take_over(job).refused, 1);
    }
}
