//! Fakes of the launcher's seams, for tests that need neither EC2 nor S3 (feature `fake`): a
//! [`Launcher`] that answers from a script and records what it is asked, and `status.json`
//! documents in memory.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use s3spot_bootstrap::Status;

use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PriceQuery, SpotPrice,
};
use crate::statuses::{StatusError, StatusStore};

/// Answers `count_active` with `active` and each launch with the next scripted result (success
/// once the script runs out), recording every request.
#[derive(Default)]
pub struct ScriptedLauncher {
    pub active: usize,
    pub count_fails: bool,
    pub script: Mutex<VecDeque<Result<Launched, LaunchError>>>,
    pub requests: Mutex<Vec<LaunchRequest>>,
    pub counts: Mutex<usize>,
    /// What `describe` and `user_data` know: instances and their base64 user-data.
    pub instances: Vec<(InstanceInfo, String)>,
    /// The spot price history `spot_prices` answers with; `None`: it fails.
    pub prices: Option<Vec<SpotPrice>>,
    /// Every instance id passed to `terminate`, in order.
    pub terminated: Mutex<Vec<String>>,
}

impl ScriptedLauncher {
    pub fn with_script(script: Vec<Result<Launched, LaunchError>>) -> Self {
        ScriptedLauncher {
            script: Mutex::new(script.into()),
            ..Default::default()
        }
    }

    pub fn requests(&self) -> Vec<LaunchRequest> {
        self.requests.lock().unwrap().clone()
    }

    pub fn terminated(&self) -> Vec<String> {
        self.terminated.lock().unwrap().clone()
    }
}

impl Launcher for ScriptedLauncher {
    async fn terminate(&self, instance_ids: &[String]) -> Result<(), LaunchError> {
        self.terminated
            .lock()
            .unwrap()
            .extend(instance_ids.iter().cloned());
        Ok(())
    }

    async fn spot_prices(&self, _query: &PriceQuery) -> Result<Vec<SpotPrice>, LaunchError> {
        self.prices.clone().ok_or_else(|| LaunchError::Api {
            operation: "DescribeSpotPriceHistory",
            message: "UnauthorizedOperation: not allowed".into(),
            retryable: false,
        })
    }

    async fn describe(&self, instance_id: &str) -> Result<Option<InstanceInfo>, LaunchError> {
        Ok(self
            .instances
            .iter()
            .find(|i| i.0.instance_id == instance_id)
            .map(|i| i.0.clone()))
    }

    async fn instances(
        &self,
        pipeline: &str,
        job: Option<&str>,
    ) -> Result<Vec<InstanceInfo>, LaunchError> {
        Ok(self
            .instances
            .iter()
            .map(|i| i.0.clone())
            .filter(|i| i.tag("s3spot:pipeline") == Some(pipeline))
            .filter(|i| job.is_none() || i.tag("s3spot:job") == job)
            .collect())
    }

    async fn user_data(&self, instance_id: &str) -> Result<String, LaunchError> {
        let found = self
            .instances
            .iter()
            .find(|i| i.0.instance_id == instance_id);
        Ok(found.map(|i| i.1.clone()).unwrap_or_default())
    }

    async fn count_active(&self, _pipeline: &str, _enough: usize) -> Result<usize, LaunchError> {
        *self.counts.lock().unwrap() += 1;
        if self.count_fails {
            return Err(LaunchError::Api {
                operation: "DescribeInstances",
                message: "UnauthorizedOperation: not allowed".into(),
                retryable: false,
            });
        }
        Ok(self.active)
    }

    async fn launch(&self, request: &LaunchRequest) -> Result<Launched, LaunchError> {
        let mut requests = self.requests.lock().unwrap();
        requests.push(request.clone());
        let n = requests.len();
        self.script.lock().unwrap().pop_front().unwrap_or_else(|| {
            Ok(Launched {
                instance_id: format!("i-{n:017x}"),
                instance_type: Some(
                    request
                        .option
                        .instance_type
                        .clone()
                        .unwrap_or_else(|| "t3.micro".into()),
                ),
            })
        })
    }
}

#[derive(Default)]
pub struct MemoryStatuses {
    documents: Mutex<BTreeMap<(String, String), Status>>,
    /// Every write, in order.
    writes: Mutex<Vec<(String, String)>>,
    /// Text documents (logs) by bucket and key.
    texts: Mutex<BTreeMap<(String, String), String>>,
}

impl MemoryStatuses {
    pub fn get(&self, bucket: &str, key: &str) -> Option<Status> {
        self.documents
            .lock()
            .unwrap()
            .get(&(bucket.to_owned(), key.to_owned()))
            .cloned()
    }

    pub fn put(&self, bucket: &str, key: &str, status: Status) {
        self.documents
            .lock()
            .unwrap()
            .insert((bucket.to_owned(), key.to_owned()), status);
    }

    pub fn put_text(&self, bucket: &str, key: &str, text: &str) {
        self.texts
            .lock()
            .unwrap()
            .insert((bucket.to_owned(), key.to_owned()), text.to_owned());
    }

    pub fn writes(&self) -> Vec<(String, String)> {
        self.writes.lock().unwrap().clone()
    }
}

impl StatusStore for MemoryStatuses {
    async fn read(&self, bucket: &str, key: &str) -> Result<Option<Status>, StatusError> {
        Ok(self.get(bucket, key))
    }

    async fn write(&self, bucket: &str, key: &str, status: &Status) -> Result<(), StatusError> {
        self.writes
            .lock()
            .unwrap()
            .push((bucket.to_owned(), key.to_owned()));
        self.put(bucket, key, status.clone());
        Ok(())
    }

    async fn tail(
        &self,
        bucket: &str,
        key: &str,
        bytes: u64,
    ) -> Result<Option<String>, StatusError> {
        let texts = self.texts.lock().unwrap();
        Ok(texts.get(&(bucket.to_owned(), key.to_owned())).map(|text| {
            let from = text
                .len()
                .saturating_sub(usize::try_from(bytes).unwrap_or(usize::MAX));
            String::from_utf8_lossy(&text.as_bytes()[from..]).into_owned()
        }))
    }
}
