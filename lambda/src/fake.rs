//! A fake of the launcher's seam, for tests that need no EC2 (feature `fake`): a [`Launcher`]
//! that answers from a script and records what it is asked. Its status store's fake is the
//! contract crate's (`s3spot_bootstrap::fake`).

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::launcher::{
    InstanceInfo, LaunchError, LaunchRequest, Launched, Launcher, PriceQuery, SpotPrice,
};

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
    /// What `console_output` answers, by instance id.
    pub consoles: Vec<(String, String)>,
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

    async fn console_output(&self, instance_id: &str) -> Result<Option<String>, LaunchError> {
        Ok(self
            .consoles
            .iter()
            .find(|(id, _)| id == instance_id)
            .map(|(_, text)| text.clone()))
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
            // The first pool, as EC2 would pick it were it the only one with capacity.
            let pool = request.pools.first();
            Ok(Launched {
                instance_id: format!("i-{n:017x}"),
                instance_type: Some(
                    pool.and_then(|p| p.instance_type.clone())
                        .unwrap_or_else(|| "t3.micro".into()),
                ),
                placement: pool.and_then(|p| p.subnet_id.clone()),
            })
        })
    }
}
