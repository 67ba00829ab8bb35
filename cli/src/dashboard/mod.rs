//! `s3spot dashboard`, and the page `s3spot local serve` serves: the jobs, a job's status and
//! logs, and a chart of jobs and cost by day, refreshed as jobs run.
//!
//! The page is a front-end to the job commands: each API call is a [`Request`], run by whatever
//! [`Ask`] the dashboard was given (this process's AWS credentials, or a local pipeline's
//! control socket), exactly as `s3spot jobs` runs it. It is read-only but for cancel and retry,
//! which the page asks to confirm.
//!
//! It binds to loopback only, and every request must carry the run's random token: another
//! user of the machine, or a web page in the person's browser, can reach 127.0.0.1 but not
//! guess it. The `Host` header must name loopback (a DNS-rebinding page cannot send one that
//! does), and a POST must come from the page's own origin, as JSON.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request as HttpRequest, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::Request;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Every response says so: nothing but the page's own script and style, no framing, no
/// referrer that would carry the token elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// What the dashboard answers at.
const PATHS: &[&str] = &[
    "/",
    "/app.js",
    "/app.css",
    "/api/info",
    "/api/jobs",
    "/api/job",
    "/api/cost",
    "/api/cancel",
    "/api/retry",
];

/// A cancel or retry names one job: a few hundred bytes.
const MAX_BODY_BYTES: usize = 16 * 1024;

/// Runs one job command and answers with its JSON, or the error's whole chain.
pub type Ask = Arc<
    dyn Fn(Request) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send>> + Send + Sync,
>;

/// What the page shows in its header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub pipeline: String,
    /// `aws` or `local`.
    pub mode: String,
    pub region: Option<String>,
    pub refresh_secs: u64,
}

pub struct Dashboard {
    token: String,
    info: Info,
    ask: Ask,
    port: u16,
}

impl Dashboard {
    /// The page's address, with its token.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/?token={}", self.port, self.token)
    }
}

/// A new random token: 32 bytes from the operating system, as hex.
fn new_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
    Ok(hex::encode(bytes))
}

/// Binds 127.0.0.1:`port` (0 picks a free one) and serves the dashboard there until the
/// returned task is dropped or aborted.
pub async fn start(
    port: u16,
    info: Info,
    ask: Ask,
) -> std::io::Result<(Arc<Dashboard>, tokio::task::JoinHandle<()>)> {
    let (listener, address): (_, SocketAddr) = crate::local::bind(port).await?;
    let dashboard = Arc::new(Dashboard {
        token: new_token()?,
        info,
        ask,
        port: address.port(),
    });
    let service = {
        let dashboard = Arc::clone(&dashboard);
        hyper::service::service_fn(move |request| {
            let dashboard = Arc::clone(&dashboard);
            async move { Ok::<_, std::convert::Infallible>(dashboard.answer(request).await) }
        })
    };
    let task = tokio::spawn(crate::local::serve(listener, service));
    Ok((dashboard, task))
}

type Answer = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> Answer {
    with_headers(
        Response::builder().status(status),
        "text/plain; charset=utf-8",
        body.into().into(),
    )
}

fn json(value: &Value) -> Answer {
    with_headers(
        Response::builder().status(StatusCode::OK),
        "application/json",
        serde_json::to_vec(value).expect("JSON serialises").into(),
    )
}

fn with_headers(
    builder: hyper::http::response::Builder,
    content_type: &str,
    body: Bytes,
) -> Answer {
    builder
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_SECURITY_POLICY, CSP)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::X_FRAME_OPTIONS, "DENY")
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::REFERRER_POLICY, "no-referrer")
        .body(Full::new(body))
        .expect("a response of fixed parts builds")
}

/// Equal, in a time that does not tell how much of a guess was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Dashboard {
    fn query(request: &HttpRequest<Incoming>) -> Vec<(String, String)> {
        form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    }

    /// Why the request may not be answered, if it may not.
    fn refusal(
        &self,
        request: &HttpRequest<Incoming>,
        query: &[(String, String)],
    ) -> Option<Answer> {
        let loopback = [
            format!("127.0.0.1:{}", self.port),
            format!("localhost:{}", self.port),
        ];
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok());
        if !host.is_some_and(|h| loopback.iter().any(|l| l == h)) {
            return Some(text(
                StatusCode::MISDIRECTED_REQUEST,
                "the dashboard answers only at 127.0.0.1 or localhost, on its own port",
            ));
        }
        let token = query.iter().find(|(k, _)| k == "token").map(|(_, v)| v);
        if !token.is_some_and(|t| same(t, &self.token)) {
            return Some(text(
                StatusCode::FORBIDDEN,
                "missing or wrong token: open the URL that s3spot printed when it started the \
                 dashboard (each run has a new one)",
            ));
        }
        if request.method() == Method::POST {
            let origin = request
                .headers()
                .get(header::ORIGIN)
                .and_then(|o| o.to_str().ok());
            let own = origin.is_some_and(|o| loopback.iter().any(|l| o == format!("http://{l}")));
            let json = request
                .headers()
                .get(header::CONTENT_TYPE)
                .is_some_and(|t| t == HeaderValue::from_static("application/json"));
            if !own || !json {
                return Some(text(
                    StatusCode::FORBIDDEN,
                    "a change must come from the dashboard's own page, as JSON",
                ));
            }
        }
        None
    }

    async fn answer(&self, request: HttpRequest<Incoming>) -> Answer {
        let query = Dashboard::query(&request);
        if let Some(refusal) = self.refusal(&request, &query) {
            return refusal;
        }
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let job_request = match (&method, path.as_str()) {
            (&Method::GET, "/") => {
                let page = INDEX.replace("{{TOKEN}}", &self.token);
                return with_headers(Response::builder(), "text/html; charset=utf-8", page.into());
            }
            (&Method::GET, "/app.js") => {
                return with_headers(Response::builder(), "text/javascript", SCRIPT.into());
            }
            (&Method::GET, "/app.css") => {
                return with_headers(Response::builder(), "text/css", STYLE.into());
            }
            (&Method::GET, "/api/info") => {
                return json(&serde_json::to_value(&self.info).expect("info serialises"));
            }
            (&Method::GET, "/api/jobs") => Request::List {
                stuck_after_secs: None,
            },
            (&Method::GET, "/api/job") => match param("job") {
                Some(job) if !job.is_empty() => Request::Show { job },
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "api/job needs ?job=s3://bucket/key",
                    );
                }
            },
            (&Method::GET, "/api/cost") => {
                let since = param("since").unwrap_or_else(|| "30d".into());
                let since = match humantime::parse_duration(&since) {
                    Ok(since) => since.as_secs(),
                    Err(error) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("since={since:?} is not a duration such as 30d: {error}"),
                        );
                    }
                };
                let by = match param("by").unwrap_or_else(|| "day".into()).parse() {
                    Ok(by) => by,
                    Err(error) => return text(StatusCode::BAD_REQUEST, format!("by: {error}")),
                };
                Request::Cost { since, by }
            }
            (&Method::POST, "/api/cancel" | "/api/retry") => {
                let job = match job_of(request).await {
                    Ok(job) => job,
                    Err(error) => return text(StatusCode::BAD_REQUEST, error),
                };
                if path == "/api/cancel" {
                    Request::Cancel { job }
                } else {
                    Request::Retry { job }
                }
            }
            _ if PATHS.contains(&path.as_str()) => {
                return text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not how {path} is used"),
                );
            }
            _ => return text(StatusCode::NOT_FOUND, format!("no {path} here")),
        };
        let changes = matches!(job_request, Request::Cancel { .. } | Request::Retry { .. });
        if changes {
            tracing::info!(request = ?job_request, "dashboard: a change asked for");
        }
        match (self.ask)(job_request).await {
            Ok(value) => json(&value),
            Err(error) => text(StatusCode::BAD_GATEWAY, error),
        }
    }
}

/// The job a cancel or retry names: `{"job": "s3://bucket/key"}`.
async fn job_of(request: HttpRequest<Incoming>) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Body {
        job: String,
    }
    let bytes = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|error| format!("cannot read the request: {error}"))?
        .to_bytes();
    let body: Body = serde_json::from_slice(&bytes)
        .map_err(|error| format!("expected {{\"job\": \"s3://bucket/key\"}}: {error}"))?;
    if body.job.trim().is_empty() {
        return Err("the job is empty".into());
    }
    Ok(body.job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_compared_whole() {
        let (a, b) = (new_token().unwrap(), new_token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &b));
        assert!(!same(&a, &a[..63]));
        assert!(!same(&a, ""));
    }

    #[test]
    fn the_page_loads_its_assets_with_the_token() {
        assert_eq!(INDEX.matches("{{TOKEN}}").count(), 2);
        let page = INDEX.replace("{{TOKEN}}", "abc");
        assert!(page.contains("app.js?token=abc"));
        assert!(page.contains("app.css?token=abc"));
    }
}
