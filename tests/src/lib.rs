//! The servers s3spot's tests run against: real third-party servers (moto for EC2, s3s-fs for
//! S3), a double of EC2's documented behaviour where moto has none, a Lambda Runtime API
//! emulator, a fake IMDSv2, and paths into the workspace. It depends on
//! no s3spot crate, so that any crate's tests can use it without building the others; the fakes
//! of s3spot's own seams live beside those seams.

pub mod batch;
pub mod credentials;
pub mod ec2;
pub mod events;
mod http;
pub mod iam;
pub mod iam_double;
pub mod imds;
mod runtime_api;
mod s3;
pub mod template;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use batch::BatchDouble;
pub use credentials::ContainerCredentials;
pub use ec2::Ec2Double;
pub use iam_double::IamDouble;
pub use imds::FakeImds;
pub use runtime_api::{Outcome, RuntimeApi};
pub use s3::S3Server;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The paste-able test events.
pub fn events_dir() -> PathBuf {
    workspace_root().join("events")
}

/// An event from `events/`, parsed.
pub fn event(name: &str) -> serde_json::Value {
    let path = events_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Credentials moto accepts (it accepts any).
pub const ACCESS_KEY: &str = "s3spot-test";
pub const SECRET_KEY: &str = "s3spot-test-secret";
pub const REGION: &str = "us-east-1";

/// A `moto_server` on a free loopback port, stopped on drop. Each test gets its own, so state
/// never leaks between tests running in parallel.
pub struct Moto {
    child: Child,
    endpoint: String,
    _log: tempfile::NamedTempFile,
}

impl Moto {
    /// Starts moto from the project's virtualenv (`.venv`, made by the test command), or from
    /// `S3SPOT_MOTO_SERVER`. A missing moto fails the test: it is never a reason to skip.
    pub fn start() -> Moto {
        let program = std::env::var_os("S3SPOT_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".venv/bin/moto_server"));
        assert!(
            program.is_file(),
            "moto_server not found at {}. Run the test command from the README (scripts/test), \
             which installs the pinned moto into .venv, or point S3SPOT_MOTO_SERVER at a moto_server.",
            program.display()
        );
        // Another process may take the free port between probe and bind; try a few.
        let mut last_log = String::new();
        for _ in 0..5 {
            let port = free_port();
            let log = tempfile::NamedTempFile::new().expect("temp file for moto's log");
            let mut child = Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("moto log"))
                .stderr(log.reopen().expect("moto log"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                    return Moto {
                        child,
                        endpoint: format!("http://{address}"),
                        _log: log,
                    };
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(log.path()).unwrap_or_default();
        }
        panic!("moto_server did not start listening; its log:\n{last_log}");
    }

    /// `http://127.0.0.1:<port>`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// An SDK configuration for this server, built the way the binaries build theirs.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        sdk_config(&self.endpoint).await
    }

    /// Environment for a child process (a binary under test) that talks to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        child_env(&self.endpoint)
    }

    /// Creates S3 buckets, as a deployed stack has them: the launcher keeps each job's claim
    /// and status.json in its results bucket.
    pub async fn create_buckets(&self, buckets: &[&str]) {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.sdk_config().await)
                .force_path_style(true)
                .build(),
        );
        for bucket in buckets {
            s3.create_bucket()
                .bucket(*bucket)
                .send()
                .await
                .unwrap_or_else(|e| panic!("create bucket {bucket} in moto: {e:?}"));
        }
    }
}

/// An SDK configuration for a test server at `endpoint`, with the test credentials.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(aws_credential_types::Credentials::new(
            ACCESS_KEY,
            SECRET_KEY,
            None,
            None,
            "s3spot-tests",
        ))
        .load()
        .await
}

/// Environment for a child process that talks to a test server at `endpoint`, and to no IMDS.
pub fn child_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_REGION", REGION.into()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        // Keep the developer's own AWS setup out of the tests.
        ("AWS_CONFIG_FILE", "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

/// An EC2 launch template in moto like the one the SAM template creates, using one of moto's
/// stock images. Returns its id.
pub async fn create_launch_template(ec2: &aws_sdk_ec2::Client, name: &str) -> String {
    use aws_sdk_ec2::types::{InstanceType, RequestLaunchTemplateData};
    let images = ec2
        .describe_images()
        .owners("amazon")
        .send()
        .await
        .expect("moto lists its stock images");
    let image = images
        .images()
        .first()
        .and_then(|image| image.image_id())
        .expect("moto has stock images")
        .to_owned();
    let output = ec2
        .create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(image)
                .instance_type(InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .expect("moto creates the launch template");
    output
        .launch_template()
        .and_then(|template| template.launch_template_id())
        .expect("a launch template id")
        .to_owned()
}

/// The standard `S3SPOT_*` settings for tests, with the template name given.
pub fn s3spot_env(template: &str) -> Vec<(&'static str, String)> {
    vec![
        ("S3SPOT_LAUNCH_TEMPLATE", template.into()),
        ("S3SPOT_WORKER_URI", "s3://artifacts/s3spot-worker".into()),
        ("S3SPOT_WORKER_SHA256", "e".repeat(64)),
    ]
}

/// A lookup for `Config::from_lookup`: `overrides` first, then [`s3spot_env`] for `template`.
pub fn s3spot_lookup(
    template: &str,
    overrides: &[(&str, &str)],
) -> impl Fn(&str) -> Option<String> + use<> {
    let mut vars: HashMap<String, String> = s3spot_env(template)
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect();
    for (name, value) in overrides {
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    move |name| vars.get(name).cloned()
}

/// A finished process's status and output, for assertion messages.
pub fn show(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
