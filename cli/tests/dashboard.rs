//! The dashboard's server over real HTTP, with a recording stand-in for the job commands: what
//! reaches them, and what is refused before it can.

use std::sync::{Arc, Mutex};

use s3spot::dashboard::{Ask, Info, start};
use s3spot::jobs::Request;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

struct Served {
    port: u16,
    token: String,
    asked: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

async fn serve() -> Served {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&asked);
    let ask: Ask = Arc::new(move |request: Request| {
        let seen = Arc::clone(&seen);
        Box::pin(async move {
            let text = serde_json::to_string(&request).unwrap();
            seen.lock().unwrap().push(text);
            match request {
                Request::Show { job } if job.contains("missing") => {
                    Err(format!("no job {job:?} in pipeline \"p\""))
                }
                _ => Ok(serde_json::json!({"instances": [], "errors": []})),
            }
        })
    });
    let info = Info {
        pipeline: "p".into(),
        mode: "local".into(),
        region: None,
        refresh_secs: 3,
    };
    let (dashboard, task) = start(0, info, ask).await.unwrap();
    let url = dashboard.url();
    let port = url
        .trim_start_matches("http://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let token = url.rsplit_once("token=").unwrap().1.to_owned();
    Served {
        port,
        token,
        asked,
        _task: task,
    }
}

/// One HTTP/1.1 exchange: the status code and the whole response.
async fn exchange(port: u16, request: String) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response[9..12].parse().unwrap();
    (code, response)
}

impl Served {
    async fn get(&self, path_and_query: &str, host: &str) -> (u16, String) {
        exchange(
            self.port,
            format!("GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    async fn post(
        &self,
        path: &str,
        origin: &str,
        content_type: &str,
        body: &str,
    ) -> (u16, String) {
        exchange(
            self.port,
            format!(
                "POST {path}?token={} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: {origin}\r\n\
                 Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                self.token,
                self.port,
                body.len()
            ),
        )
        .await
    }

    fn own(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn the_page_and_its_api_answer_only_with_the_token_at_loopback() {
    let served = serve().await;
    let own = served.own();
    let token = served.token.clone();

    let (code, page) = served.get(&format!("/?token={token}"), &own).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(&format!("app.js?token={token}")), "{page}");
    for header in [
        "content-security-policy: default-src 'none'; script-src 'self'",
        "x-frame-options: DENY",
        "cache-control: no-store",
        "referrer-policy: no-referrer",
        "x-content-type-options: nosniff",
    ] {
        assert!(
            page.to_lowercase().contains(&header.to_lowercase()),
            "{header}: {page}"
        );
    }
    let (code, script) = served.get(&format!("/app.js?token={token}"), &own).await;
    assert_eq!(code, 200);
    assert!(script.contains("content-type: text/javascript"), "{script}");
    let (code, _) = served
        .get(
            &format!("/?token={token}"),
            &format!("localhost:{}", served.port),
        )
        .await;
    assert_eq!(code, 200);

    for (path, host, want) in [
        ("/".to_owned(), own.clone(), 403),
        ("/api/jobs".into(), own.clone(), 403),
        (
            format!("/api/jobs?token={}", "0".repeat(64)),
            own.clone(),
            403,
        ),
        (
            format!("/api/jobs?token={}", &token[..63]),
            own.clone(),
            403,
        ),
        // A page that rebinds its own name to 127.0.0.1 sends its own name as the host.
        (
            format!("/api/jobs?token={token}"),
            format!("evil.example:{}", served.port),
            421,
        ),
        (
            format!("/api/jobs?token={token}"),
            "127.0.0.1:1".into(),
            421,
        ),
        (format!("/api/cancel?token={token}"), own.clone(), 405),
        (format!("/nothing?token={token}"), own.clone(), 404),
        (format!("/api/job?token={token}"), own.clone(), 400),
        (
            format!("/api/cost?token={token}&since=fortnight"),
            own.clone(),
            400,
        ),
        (
            format!("/api/cost?token={token}&by=colour"),
            own.clone(),
            400,
        ),
    ] {
        let (code, response) = served.get(&path, &host).await;
        assert_eq!(code, want, "{path} at {host}: {response}");
    }
    assert_eq!(
        served.asked(),
        Vec::<String>::new(),
        "nothing refused reached a command"
    );
    let (_, refused) = served.get("/api/jobs", &own).await;
    assert!(
        refused.contains("open the URL that s3spot printed"),
        "{refused}"
    );
    let (_, bad) = served
        .get(&format!("/api/cost?token={token}&since=fortnight"), &own)
        .await;
    assert!(bad.contains("\"fortnight\""), "names the bad value: {bad}");
}

#[tokio::test]
async fn each_api_call_is_one_job_command_and_changes_come_only_from_the_page() {
    let served = serve().await;
    let own = served.own();
    let token = served.token.clone();
    for path in [
        format!("/api/jobs?token={token}"),
        format!("/api/job?token={token}&job=s3%3A%2F%2Fdata%2Fin%2Fa%20b%2B.csv"),
        format!("/api/cost?token={token}&since=7d&by=type"),
    ] {
        let (code, response) = served.get(&path, &own).await;
        assert_eq!(code, 200, "{path}: {response}");
    }
    let (code, info) = served.get(&format!("/api/info?token={token}"), &own).await;
    assert_eq!(code, 200);
    assert!(info.contains(r#""pipeline":"p""#), "{info}");
    let (code, missing) = served
        .get(&format!("/api/job?token={token}&job=missing"), &own)
        .await;
    assert_eq!(code, 502, "{missing}");
    assert!(
        missing.contains("no job \"missing\""),
        "the command's error: {missing}"
    );

    let body = r#"{"job": "s3://data/in/a.csv"}"#;
    let origin = format!("http://{own}");
    let (code, response) = served
        .post("/api/cancel", &origin, "application/json", body)
        .await;
    assert_eq!(code, 200, "{response}");
    let (code, _) = served
        .post("/api/retry", &origin, "application/json", body)
        .await;
    assert_eq!(code, 200);
    for (origin, content_type, body) in [
        // Another site's page, a form post (no preflight), no origin at all, a body that is
        // not a job.
        ("http://evil.example", "application/json", body),
        (origin.as_str(), "text/plain", body),
        ("", "application/json", body),
    ] {
        let (code, response) = served.post("/api/cancel", origin, content_type, body).await;
        assert_eq!(code, 403, "{origin} {content_type}: {response}");
    }
    let (code, response) = served
        .post("/api/cancel", &origin, "application/json", r#"{"job": 7}"#)
        .await;
    assert_eq!(code, 400, "{response}");

    assert_eq!(
        served.asked(),
        [
            r#"{"command":"list","stuck_after_secs":null}"#,
            r#"{"command":"show","job":"s3://data/in/a b+.csv"}"#,
            r#"{"command":"cost","since":604800,"by":"type"}"#,
            r#"{"command":"show","job":"missing"}"#,
            r#"{"command":"cancel","job":"s3://data/in/a.csv"}"#,
            r#"{"command":"retry","job":"s3://data/in/a.csv"}"#,
        ]
    );
}
