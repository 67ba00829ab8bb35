//! A real S3 server for tests: s3s-fs (a third-party S3 protocol implementation over a
//! directory) on a loopback port, with signature checking on.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Method, Request};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

use crate::http::ServerThread;
use crate::{ACCESS_KEY, SECRET_KEY};

pub struct S3Server {
    server: ServerThread,
    root: tempfile::TempDir,
}

impl S3Server {
    /// A server over a fresh directory, with `buckets` created.
    pub fn start(buckets: &[&str]) -> S3Server {
        Self::start_slow(buckets, Duration::ZERO)
    }

    /// The same, but each write (PUT or POST) is answered only after `write_delay`: a slow
    /// link, for what must end in time however long uploads take.
    pub fn start_slow(buckets: &[&str], write_delay: Duration) -> S3Server {
        let root = tempfile::tempdir().expect("a directory for the S3 server");
        for bucket in buckets {
            std::fs::create_dir(root.path().join(bucket)).expect("create a bucket directory");
        }
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the directory");
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            builder.build()
        };
        let slow = hyper::service::service_fn(move |request: Request<Incoming>| {
            let service = service.clone();
            async move {
                if request.method() == Method::PUT || request.method() == Method::POST {
                    tokio::time::sleep(write_delay).await;
                }
                Service::call(&service, request).await
            }
        });
        S3Server {
            server: ServerThread::start("s3s-fs", slow),
            root,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.address)
    }

    /// The directory behind the server.
    pub fn root(&self) -> &std::path::Path {
        self.root.path()
    }

    /// An aws-sdk-s3 client for this server.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let sdk = crate::sdk_config(&self.endpoint()).await;
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .force_path_style(true)
                .build(),
        )
    }

    /// Environment for a child process that talks to this server, and to no IMDS.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        crate::child_env(&self.endpoint())
    }
}
