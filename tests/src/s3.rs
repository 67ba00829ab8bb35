//! A real S3 server for tests: s3s-fs (a third-party S3 protocol implementation over a
//! directory) on a loopback port, with signature checking on.

use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper::{Method, Request};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

use crate::http::ServerThread;
use crate::iam::{Authorization, Policy};
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
        Self::start_with(buckets, write_delay, Vec::new())
    }

    /// The same, with a principal for each (access key, policy): requests signed with that key
    /// are allowed only what the policy allows, as IAM decides. The test's own key (the one
    /// [`S3Server::client`] uses) stays allowed everything.
    pub fn start_with_principals(buckets: &[&str], principals: Vec<(String, Policy)>) -> S3Server {
        Self::start_with(buckets, Duration::ZERO, principals)
    }

    fn start_with(
        buckets: &[&str],
        write_delay: Duration,
        principals: Vec<(String, Policy)>,
    ) -> S3Server {
        let root = tempfile::tempdir().expect("a directory for the S3 server");
        for bucket in buckets {
            std::fs::create_dir(root.path().join(bucket)).expect("create a bucket directory");
        }
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the directory");
        let service = {
            let mut builder = S3ServiceBuilder::new(fs);
            let mut auth = SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY);
            for (access_key, _) in &principals {
                auth.register(access_key.clone(), SECRET_KEY.into());
            }
            builder.set_auth(auth);
            builder.set_access(PolicyAccess {
                principals,
                root: root.path().to_path_buf(),
            });
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

/// IAM in front of S3, for the principals that have a policy.
struct PolicyAccess {
    principals: Vec<(String, Policy)>,
    root: std::path::PathBuf,
}

/// The IAM action an S3 operation is authorized as
/// (<https://docs.aws.amazon.com/service-authorization/latest/reference/list_amazons3.html>).
fn s3_action(operation: &str, versioned: bool) -> String {
    match operation {
        "GetObject" | "HeadObject" if versioned => "s3:GetObjectVersion".into(),
        "GetObject" | "HeadObject" => "s3:GetObject".into(),
        "PutObject"
        | "CreateMultipartUpload"
        | "UploadPart"
        | "CompleteMultipartUpload"
        | "CopyObject" => "s3:PutObject".into(),
        "ListObjects" | "ListObjectsV2" | "HeadBucket" => "s3:ListBucket".into(),
        "ListObjectVersions" => "s3:ListBucketVersions".into(),
        other => format!("s3:{other}"),
    }
}

#[async_trait::async_trait]
impl s3s::access::S3Access for PolicyAccess {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> s3s::S3Result<()> {
        let Some(credentials) = cx.credentials() else {
            return Err(s3s::s3_error!(AccessDenied, "anonymous request"));
        };
        let Some((_, policy)) = self
            .principals
            .iter()
            .find(|(key, _)| *key == credentials.access_key)
        else {
            return Ok(());
        };
        let versioned = cx
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("versionId=")));
        let operation = cx.s3_op().name();
        let action = s3_action(operation, versioned);
        let (resource, object) = match cx.s3_path() {
            s3s::path::S3Path::Root => ("*".to_owned(), None),
            s3s::path::S3Path::Bucket { bucket } => (format!("arn:aws:s3:::{bucket}"), None),
            s3s::path::S3Path::Object { bucket, key } => (
                format!("arn:aws:s3:::{bucket}/{key}"),
                Some((bucket.to_string(), key.to_string())),
            ),
        };
        if !policy.allows(&Authorization::new(&action, &resource)) {
            return Err(s3s::s3_error!(
                AccessDenied,
                "not authorized to perform: {action} on resource: {resource}"
            ));
        }
        // Without s3:ListBucket, S3 answers a read of a missing object 403, not 404: whether a
        // key exists is the listing's to tell.
        if let Some((bucket, key)) = object
            && action.starts_with("s3:GetObject")
            && !self.root.join(&bucket).join(&key).exists()
            && !policy.allows(&Authorization::new(
                "s3:ListBucket",
                &format!("arn:aws:s3:::{bucket}"),
            ))
        {
            return Err(s3s::s3_error!(
                AccessDenied,
                "not authorized to perform: s3:ListBucket on resource: arn:aws:s3:::{bucket}"
            ));
        }
        Ok(())
    }
}
