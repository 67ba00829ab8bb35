//! The credentials endpoint ECS serves a task (`AWS_CONTAINER_CREDENTIALS_FULL_URI` on
//! loopback, as the SDKs allow): the role's keys as JSON, the form Batch jobs get theirs in.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;

use crate::http::ServerThread;

pub struct ContainerCredentials {
    server: ServerThread,
    requests: Arc<AtomicUsize>,
}

impl ContainerCredentials {
    /// Serves `access_key` and `secret_key`, with a session token, at every path.
    pub fn start(access_key: &str, secret_key: &str) -> ContainerCredentials {
        Self::start_on(
            std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0)),
            access_key,
            secret_key,
        )
    }

    /// On `address`: ECS's own, 169.254.170.2:80, where `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
    /// points (in a network namespace of the test's own).
    pub fn start_on(
        address: std::net::SocketAddr,
        access_key: &str,
        secret_key: &str,
    ) -> ContainerCredentials {
        let body = serde_json::json!({
            "AccessKeyId": access_key,
            "SecretAccessKey": secret_key,
            "Token": "s3spot-test-session-token",
            "Expiration": "2099-01-01T00:00:00Z",
            "RoleArn": "arn:aws:iam::123456789012:role/s3spot-batch-job",
        })
        .to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        let service = hyper::service::service_fn(move |_request| {
            counted.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                        .expect("a valid response"),
                )
            }
        });
        ContainerCredentials {
            server: ServerThread::start_on("container-credentials", address, service),
            requests,
        }
    }

    /// For `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`, on 169.254.170.2:80.
    pub const RELATIVE_URI: &str = "/v2/credentials/0f1e2d3c-s3spot-test";

    /// For `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn uri(&self) -> String {
        format!("http://{}{}", self.server.address, Self::RELATIVE_URI)
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
