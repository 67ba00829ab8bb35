//! A Lambda Runtime API emulator: enough of
//! <https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html> to run a real function binary
//! and see what it answers to each event.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify};

/// What the function posted for one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Response(Value),
    /// `errorType` and `errorMessage` of the posted error.
    Error {
        error_type: String,
        error_message: String,
    },
}

#[derive(Default)]
struct State {
    queue: Mutex<VecDeque<(String, Bytes)>>,
    queued: Notify,
    outcomes: Mutex<HashMap<String, Outcome>>,
    posted: Notify,
    next_calls: AtomicUsize,
    first_next: Mutex<Option<Instant>>,
    init_error: Mutex<Option<String>>,
}

pub struct RuntimeApi {
    address: SocketAddr,
    state: Arc<State>,
    ids: AtomicUsize,
    server: tokio::task::JoinHandle<()>,
}

impl RuntimeApi {
    pub async fn start() -> RuntimeApi {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the runtime API emulator");
        let address = listener.local_addr().expect("emulator address");
        let state = Arc::new(State::default());
        let shared = Arc::clone(&state);
        let service = hyper::service::service_fn(move |request| {
            let state = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(route(request, state).await) }
        });
        let server = tokio::spawn(crate::http::serve(listener, service));
        RuntimeApi {
            address,
            state,
            ids: AtomicUsize::new(0),
            server,
        }
    }

    /// The environment a function process needs to find this API.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_LAMBDA_RUNTIME_API", self.address.to_string()),
            ("AWS_LAMBDA_FUNCTION_NAME", "s3spot-launcher".into()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128".into()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
        ]
    }

    /// Queues an event (raw bytes: malformed JSON is a valid test) and returns its request id.
    pub async fn invoke(&self, payload: impl Into<Bytes>) -> String {
        let id = format!(
            "00000000-0000-4000-8000-{:012}",
            self.ids.fetch_add(1, Ordering::SeqCst)
        );
        self.state
            .queue
            .lock()
            .await
            .push_back((id.clone(), payload.into()));
        self.state.queued.notify_one();
        id
    }

    /// Waits for the function's answer to `request_id`.
    pub async fn outcome(&self, request_id: &str, timeout: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let posted = self.state.posted.notified();
            if let Some(outcome) = self.state.outcomes.lock().await.get(request_id) {
                return outcome.clone();
            }
            if let Some(error) = self.state.init_error.lock().await.clone() {
                panic!("the function reported an init error: {error}");
            }
            if tokio::time::timeout_at(deadline, posted).await.is_err() {
                panic!("no answer to {request_id} within {timeout:?}");
            }
        }
    }

    /// How many times the function has asked for its next event.
    pub fn next_calls(&self) -> usize {
        self.state.next_calls.load(Ordering::SeqCst)
    }

    /// Waits until the function has asked for its `n`th event, i.e. it is ready for more.
    pub async fn wait_for_next_call(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.next_calls() < n {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// When the function first asked for an event: the end of its cold start.
    pub async fn first_next(&self) -> Option<Instant> {
        *self.state.first_next.lock().await
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn route(request: Request<Incoming>, state: Arc<State>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method(), parts.as_slice()) {
        (&Method::GET, ["2018-06-01", "runtime", "invocation", "next"]) => next(&state).await,
        (&Method::POST, ["2018-06-01", "runtime", "invocation", id, kind]) => {
            let id = (*id).to_owned();
            let is_error = *kind == "error";
            let value: Value = serde_json::from_slice(&body(request).await).unwrap_or(Value::Null);
            let outcome = if is_error {
                Outcome::Error {
                    error_type: value["errorType"].as_str().unwrap_or_default().to_owned(),
                    error_message: value["errorMessage"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                }
            } else {
                Outcome::Response(value)
            };
            state.outcomes.lock().await.insert(id, outcome);
            state.posted.notify_waiters();
            reply(
                StatusCode::ACCEPTED,
                Bytes::from_static(b"{\"status\":\"OK\"}"),
            )
        }
        (&Method::POST, ["2018-06-01", "runtime", "init", "error"]) => {
            let body = body(request).await;
            *state.init_error.lock().await = Some(String::from_utf8_lossy(&body).into_owned());
            state.posted.notify_waiters();
            reply(
                StatusCode::ACCEPTED,
                Bytes::from_static(b"{\"status\":\"OK\"}"),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, Bytes::from_static(b"{}")),
    }
}

async fn body(request: Request<Incoming>) -> Bytes {
    request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// Long-polls like Lambda: the function waits here until an event is queued.
async fn next(state: &State) -> Response<Full<Bytes>> {
    state.next_calls.fetch_add(1, Ordering::SeqCst);
    state
        .first_next
        .lock()
        .await
        .get_or_insert_with(Instant::now);
    let (id, payload) = loop {
        let queued = state.queued.notified();
        if let Some(item) = state.queue.lock().await.pop_front() {
            break item;
        }
        queued.await;
    };
    let deadline = SystemTime::now() + Duration::from_secs(300);
    let deadline_ms = deadline
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("lambda-runtime-aws-request-id", id)
        .header("lambda-runtime-deadline-ms", deadline_ms.to_string())
        .header(
            "lambda-runtime-invoked-function-arn",
            "arn:aws:lambda:us-east-1:123456789012:function:s3spot-launcher",
        )
        .header(
            "lambda-runtime-trace-id",
            "Root=1-00000000-000000000000000000000000",
        )
        .body(Full::new(payload))
        .expect("a valid response")
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("a valid response")
}
