//! The instance the worker runs on, through IMDSv2: who it is, and whether it is about to be
//! reclaimed. Off EC2 there is no IMDS, and that is not an error.

use std::time::Duration;

use aws_config::imds;
use s3spot_bootstrap::Instance;

/// IMDS answers in milliseconds on EC2; off EC2 nothing should wait on it for long.
const IMDS_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Metadata {
    client: Option<imds::Client>,
}

impl Metadata {
    /// IMDS at the standard address, or `AWS_EC2_METADATA_SERVICE_ENDPOINT`; none at all when
    /// `AWS_EC2_METADATA_DISABLED=true`.
    pub fn from_env() -> Self {
        let disabled = std::env::var("AWS_EC2_METADATA_DISABLED")
            .is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        let client = (!disabled).then(|| {
            imds::Client::builder()
                .connect_timeout(IMDS_TIMEOUT)
                .read_timeout(IMDS_TIMEOUT)
                .max_attempts(1)
                .build()
        });
        Metadata { client }
    }

    /// No IMDS at all.
    pub fn none() -> Self {
        Metadata { client: None }
    }

    /// The instance's id, type and lifecycle, or `None` when there is no IMDS to ask.
    pub async fn identify(&self) -> Option<Instance> {
        let client = self.client.as_ref()?;
        let id = match get(client, "/latest/meta-data/instance-id").await {
            Ok(id) => id,
            Err(error) => {
                tracing::info!(error = %error, "no instance metadata (not on EC2?)");
                return None;
            }
        };
        Some(Instance {
            id: Some(id),
            instance_type: get(client, "/latest/meta-data/instance-type").await.ok(),
            lifecycle: get(client, "/latest/meta-data/instance-life-cycle")
                .await
                .ok(),
        })
    }

    /// The spot interruption notice, once EC2 has posted one. The path is a 404 until then; any
    /// other failure is logged and read as "no notice".
    pub async fn interruption_notice(&self) -> Option<String> {
        let client = self.client.as_ref()?;
        match get(client, "/latest/meta-data/spot/instance-action").await {
            Ok(notice) => Some(notice),
            Err(imds::client::error::ImdsError::ErrorResponse(response))
                if response.response().status().as_u16() == 404 =>
            {
                None
            }
            Err(error) => {
                tracing::debug!(error = %error, "cannot read the spot interruption notice");
                None
            }
        }
    }

    pub fn is_available(&self) -> bool {
        self.client.is_some()
    }
}

async fn get(client: &imds::Client, path: &str) -> Result<String, imds::client::error::ImdsError> {
    client
        .get(path)
        .await
        .map(|value| value.as_ref().to_owned())
}
