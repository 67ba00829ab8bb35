//! A fake EC2 instance metadata service that insists on IMDSv2 tokens, and whose spot
//! interruption notice a test can post.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

use crate::http::ServerThread;

const TOKEN: &str = "AQAEAFake-IMDSv2-token==";
pub const INSTANCE_ID: &str = "i-0fa4e5c0ffee12345";
pub const INSTANCE_TYPE: &str = "m7i.large";

#[derive(Default)]
struct State {
    interrupted: AtomicBool,
    tokenless: AtomicUsize,
    notice_polls: AtomicUsize,
}

pub struct FakeImds {
    server: ServerThread,
    state: Arc<State>,
}

impl FakeImds {
    pub fn start() -> FakeImds {
        Self::start_on(std::net::SocketAddr::from((
            std::net::Ipv4Addr::LOCALHOST,
            0,
        )))
    }

    /// On `address`: IMDS's own, 169.254.169.254:80, where nothing needs telling where it is.
    pub fn start_on(address: std::net::SocketAddr) -> FakeImds {
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let service = hyper::service::service_fn(move |request| {
            let state = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(answer(&request, &state)) }
        });
        FakeImds {
            server: ServerThread::start_on("fake-imds", address, service),
            state,
        }
    }

    /// For `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.address)
    }

    /// Posts a spot interruption notice, as EC2 does two minutes before reclaiming.
    pub fn interrupt(&self) {
        self.state.interrupted.store(true, Ordering::SeqCst);
    }

    /// Requests that came without a valid token (IMDSv1 style); they were refused.
    pub fn tokenless_requests(&self) -> usize {
        self.state.tokenless.load(Ordering::SeqCst)
    }

    /// How often the interruption notice was asked for.
    pub fn notice_polls(&self) -> usize {
        self.state.notice_polls.load(Ordering::SeqCst)
    }
}

fn answer(request: &Request<hyper::body::Incoming>, state: &State) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if request.method() == Method::PUT && path == "/latest/api/token" {
        // Like IMDS: the TTL asked for comes back in the same header.
        return match request
            .headers()
            .get("x-aws-ec2-metadata-token-ttl-seconds")
        {
            Some(ttl) => Response::builder()
                .status(StatusCode::OK)
                .header("x-aws-ec2-metadata-token-ttl-seconds", ttl)
                .body(Full::new(Bytes::from_static(TOKEN.as_bytes())))
                .expect("a valid response"),
            None => reply(StatusCode::BAD_REQUEST, ""),
        };
    }
    let token = request.headers().get("x-aws-ec2-metadata-token");
    if token.is_none_or(|t| t.as_bytes() != TOKEN.as_bytes()) {
        state.tokenless.fetch_add(1, Ordering::SeqCst);
        return reply(StatusCode::UNAUTHORIZED, "");
    }
    match path {
        "/latest/meta-data/instance-id" => reply(StatusCode::OK, INSTANCE_ID),
        "/latest/meta-data/instance-type" => reply(StatusCode::OK, INSTANCE_TYPE),
        "/latest/meta-data/instance-life-cycle" => reply(StatusCode::OK, "spot"),
        "/latest/meta-data/spot/instance-action" => {
            state.notice_polls.fetch_add(1, Ordering::SeqCst);
            if state.interrupted.load(Ordering::SeqCst) {
                reply(
                    StatusCode::OK,
                    r#"{"action": "terminate", "time": "2026-11-21T12:02:00Z"}"#,
                )
            } else {
                reply(StatusCode::NOT_FOUND, "")
            }
        }
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("a valid response")
}
