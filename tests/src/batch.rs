//! An AWS Batch double: the part of the Batch API (REST-JSON) that s3spot calls, with the
//! behaviour Batch documents and moto's Docker-less Batch leaves out.
//!
//! - Jobs stay on the queue (`RUNNABLE`) until a test moves them ([`BatchDouble::set_status`]);
//!   moto finishes each job as it is submitted, so nothing there is ever queued or running.
//! - Batch has no client token: `SubmitJob` with a name already on the queue submits a second
//!   job (<https://docs.aws.amazon.com/batch/latest/APIReference/API_SubmitJob.html>).
//! - `ListJobs` with a `JOB_NAME` filter: case-insensitive, a trailing `*` a prefix, every
//!   status (<https://docs.aws.amazon.com/batch/latest/APIReference/API_KeyValuesPair.html>);
//!   pages of `maxResults` (default 100) with a `nextToken`.
//! - `TerminateJob` ends a job in any state: `FAILED`, with its reason.
//! - `stoppedAt` is set only for a job that ran (went through `RUNNING`).
//! - Faults a test sets for the next `SubmitJob`s ([`SubmitFault`]): a refusal for the rate,
//!   and a submit whose answer is lost.
//! - Batch's request rate (<https://repost.aws/knowledge-center/aws-batch-requests-error>): 50
//!   API calls a second per account, every operation counted; a call over it is HTTP 429
//!   `TooManyRequestsException`, and does nothing.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::http::ServerThread;

/// Batch's fixed API rate per account, in calls a second.
pub const CALLS_PER_SECOND: f64 = 50.0;

/// One job, as the double keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleJob {
    pub id: String,
    pub name: String,
    pub queue: String,
    pub definition: String,
    /// `SUBMITTED` ... `SUCCEEDED`, `FAILED`.
    pub status: String,
    pub status_reason: Option<String>,
    pub environment: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
    pub attempt_duration_secs: Option<i64>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub stopped_at: Option<i64>,
}

#[derive(Default)]
struct State {
    jobs: Vec<DoubleJob>,
    /// (calls a second, tokens, last refill); `None`: no rate limit.
    rate: Option<(f64, f64, Instant)>,
    calls: usize,
    throttled: usize,
    /// What the next `SubmitJob`s meet, first first.
    submit_faults: std::collections::VecDeque<SubmitFault>,
}

/// A fault of one `SubmitJob`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitFault {
    /// Refused for the rate (HTTP 429): nothing is submitted.
    Throttled,
    /// The job is submitted, and the answer is an internal error (HTTP 500): the caller cannot
    /// tell it from a submit that failed.
    AnswerLost,
}

pub struct BatchDouble {
    server: ServerThread,
    state: Arc<Mutex<State>>,
}

impl BatchDouble {
    /// Without a rate limit.
    pub fn start() -> BatchDouble {
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let service = hyper::service::service_fn(move |request| {
            let state = Arc::clone(&shared);
            async move { Ok::<_, Infallible>(handle(request, &state).await) }
        });
        BatchDouble {
            server: ServerThread::start("batch-double", service),
            state,
        }
    }

    /// Batch's own: [`CALLS_PER_SECOND`], starting full.
    pub fn start_rate_limited() -> BatchDouble {
        Self::start_with_rate(CALLS_PER_SECOND)
    }

    /// `per_second` calls a second, a second's worth at most in hand.
    fn start_with_rate(per_second: f64) -> BatchDouble {
        let double = Self::start();
        double.state().rate = Some((per_second, per_second, Instant::now()));
        double
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("no panic holding the double's state")
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.server.address)
    }

    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        crate::sdk_config(&self.endpoint()).await
    }

    pub fn jobs(&self) -> Vec<DoubleJob> {
        self.state().jobs.clone()
    }

    /// Changes job `id` with `edit`.
    fn edit_job(&self, id: &str, edit: impl FnOnce(&mut DoubleJob)) {
        let mut state = self.state();
        let job = state
            .jobs
            .iter_mut()
            .find(|job| job.id == id)
            .unwrap_or_else(|| panic!("no job {id}"));
        edit(job);
    }

    /// Moves a job on, as Batch's scheduler would: `RUNNING` also starts its clock.
    pub fn set_status(&self, id: &str, status: &str, reason: Option<&str>) {
        self.edit_job(id, |job| {
            job.status = status.to_owned();
            job.status_reason = reason.map(str::to_owned);
            if status == "RUNNING" {
                job.started_at = Some(now_ms());
            }
            // Batch gives a stop time only to a job that ran.
            if matches!(status, "SUCCEEDED" | "FAILED") && job.started_at.is_some() {
                job.stopped_at = Some(now_ms());
            }
        });
    }

    /// Moves a job's creation `ago` into the past.
    pub fn created_ago(&self, id: &str, ago: std::time::Duration) {
        self.edit_job(id, |job| job.created_at = ms_ago(ago));
    }

    /// Moves a job's end `ago` into the past.
    pub fn ended_ago(&self, id: &str, ago: std::time::Duration) {
        self.edit_job(id, |job| job.stopped_at = Some(ms_ago(ago)));
    }

    /// The next `SubmitJob`s meet `faults`, one each.
    pub fn fail_submits(&self, faults: &[SubmitFault]) {
        self.state().submit_faults.extend(faults);
    }

    /// API calls answered, and refused for the rate.
    pub fn calls(&self) -> (usize, usize) {
        let state = self.state();
        (state.calls, state.throttled)
    }
}

fn ms_ago(ago: std::time::Duration) -> i64 {
    now_ms() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn answer(status: StatusCode, body: &Value, error: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(kind) = error {
        response = response.header("x-amzn-errortype", kind);
    }
    response
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

fn client_error(message: &str) -> Response<Full<Bytes>> {
    answer(
        StatusCode::BAD_REQUEST,
        &json!({"message": message}),
        Some("ClientException"),
    )
}

fn take_token(state: &mut State) -> bool {
    let Some((per_second, tokens, last)) = state.rate.as_mut() else {
        return true;
    };
    let now = Instant::now();
    *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * *per_second).min(*per_second);
    *last = now;
    if *tokens >= 1.0 {
        *tokens -= 1.0;
        true
    } else {
        false
    }
}

async fn handle(
    request: Request<hyper::body::Incoming>,
    state: &Mutex<State>,
) -> Response<Full<Bytes>> {
    let operation = request.uri().path().trim_start_matches("/v1/").to_owned();
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let Ok(input) = serde_json::from_slice::<Value>(&body) else {
        return client_error("the request body is not JSON");
    };
    let mut state = state.lock().expect("no panic holding the double's state");
    state.calls += 1;
    if !take_token(&mut state) {
        state.throttled += 1;
        return answer(
            StatusCode::TOO_MANY_REQUESTS,
            &json!({"message": "Too Many Requests"}),
            Some("TooManyRequestsException"),
        );
    }
    match operation.as_str() {
        "submitjob" => match state.submit_faults.pop_front() {
            None => submit(&mut state, &input),
            Some(SubmitFault::Throttled) => {
                state.throttled += 1;
                answer(
                    StatusCode::TOO_MANY_REQUESTS,
                    &json!({"message": "Too Many Requests"}),
                    Some("TooManyRequestsException"),
                )
            }
            Some(SubmitFault::AnswerLost) => {
                let _ = submit(&mut state, &input);
                answer(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"message": "internal error"}),
                    Some("ServerException"),
                )
            }
        },
        "listjobs" => list(&state, &input),
        "describejobs" => describe(&state, &input),
        "terminatejob" | "canceljob" => {
            let Some(id) = input["jobId"].as_str() else {
                return client_error("jobId is required");
            };
            let Some(job) = state.jobs.iter_mut().find(|job| job.id == id) else {
                return client_error(&format!("Job {id} not found"));
            };
            if !matches!(job.status.as_str(), "SUCCEEDED" | "FAILED") {
                job.status = "FAILED".into();
                job.status_reason = input["reason"].as_str().map(str::to_owned);
                if job.started_at.is_some() {
                    job.stopped_at = Some(now_ms());
                }
            }
            answer(StatusCode::OK, &json!({}), None)
        }
        other => client_error(&format!("the double does not do {other}")),
    }
}

fn pairs(value: &Value, key: &str, value_key: &str) -> Vec<(String, String)> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|pair| {
            Some((
                pair[key].as_str()?.to_owned(),
                pair[value_key].as_str()?.to_owned(),
            ))
        })
        .collect()
}

fn submit(state: &mut State, input: &Value) -> Response<Full<Bytes>> {
    let (Some(name), Some(queue), Some(definition)) = (
        input["jobName"].as_str(),
        input["jobQueue"].as_str(),
        input["jobDefinition"].as_str(),
    ) else {
        return client_error("jobName, jobQueue and jobDefinition are required");
    };
    let valid_name = name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid_name {
        return client_error(&format!("invalid job name {name:?}"));
    }
    let tags: Vec<(String, String)> = input["tags"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    if let Some((key, value)) = tags.iter().find(|(_, value)| {
        !value
            .chars()
            .all(|c| c.is_alphanumeric() || c == ' ' || "_.:/=+-@".contains(c))
    }) {
        return client_error(&format!("tag {key} has an invalid value {value:?}"));
    }
    let id = format!(
        "{:08x}-0000-4000-8000-{:012x}",
        state.jobs.len() + 1,
        state.jobs.len() + 1
    );
    state.jobs.push(DoubleJob {
        id: id.clone(),
        name: name.to_owned(),
        queue: queue.to_owned(),
        definition: definition.to_owned(),
        status: "RUNNABLE".into(),
        status_reason: None,
        environment: pairs(&input["containerOverrides"]["environment"], "name", "value"),
        tags,
        attempt_duration_secs: input["timeout"]["attemptDurationSeconds"].as_i64(),
        created_at: now_ms(),
        started_at: None,
        stopped_at: None,
    });
    answer(
        StatusCode::OK,
        &json!({"jobArn": format!("arn:aws:batch:us-east-1:123456789012:job/{id}"),
                "jobName": name, "jobId": id}),
        None,
    )
}

fn list(state: &State, input: &Value) -> Response<Full<Bytes>> {
    let Some(queue) = input["jobQueue"].as_str() else {
        return client_error("the double lists by jobQueue only");
    };
    let names: Vec<String> = input["filters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|filter| filter["name"] == "JOB_NAME")
        .flat_map(|filter| filter["values"].as_array().cloned().unwrap_or_default())
        .filter_map(|value| value.as_str().map(str::to_lowercase))
        .collect();
    // Without a filter, Batch lists one status: RUNNING unless another is named.
    let status = input["jobStatus"].as_str().unwrap_or("RUNNING");
    let matching: Vec<&DoubleJob> = state
        .jobs
        .iter()
        .filter(|job| job.queue == queue || queue.ends_with(&format!("/{}", job.queue)))
        .filter(|job| {
            if names.is_empty() {
                return job.status == status;
            }
            let name = job.name.to_lowercase();
            names.iter().any(|filter| match filter.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == *filter,
            })
        })
        .collect();
    let start: usize = input["nextToken"]
        .as_str()
        .and_then(|token| token.parse().ok())
        .unwrap_or(0);
    let page = usize::try_from(input["maxResults"].as_u64().unwrap_or(100))
        .unwrap_or(100)
        .min(1000);
    let summaries: Vec<Value> = matching
        .iter()
        .skip(start)
        .take(page)
        .map(|job| {
            json!({"jobArn": format!("arn:aws:batch:us-east-1:123456789012:job/{}", job.id),
                   "jobId": job.id, "jobName": job.name, "status": job.status,
                   "statusReason": job.status_reason, "createdAt": job.created_at,
                   "stoppedAt": job.stopped_at})
        })
        .collect();
    let mut body = json!({ "jobSummaryList": summaries });
    if start + page < matching.len() {
        body["nextToken"] = json!((start + page).to_string());
    }
    answer(StatusCode::OK, &body, None)
}

fn describe(state: &State, input: &Value) -> Response<Full<Bytes>> {
    let ids: Vec<&str> = input["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if ids.len() > 100 {
        return client_error("at most 100 jobs a call");
    }
    let jobs: Vec<Value> = state
        .jobs
        .iter()
        .filter(|job| ids.contains(&job.id.as_str()))
        .map(|job| {
            json!({
                "jobArn": format!("arn:aws:batch:us-east-1:123456789012:job/{}", job.id),
                "jobId": job.id, "jobName": job.name, "jobQueue": job.queue,
                "jobDefinition": job.definition, "status": job.status,
                "statusReason": job.status_reason, "createdAt": job.created_at,
                "startedAt": job.started_at, "stoppedAt": job.stopped_at,
                "tags": job.tags.iter()
                    .map(|(k, v)| (k.clone(), json!(v)))
                    .collect::<serde_json::Map<_, _>>(),
                "timeout": {"attemptDurationSeconds": job.attempt_duration_secs},
                "container": {"environment": job.environment.iter()
                    .map(|(name, value)| json!({"name": name, "value": value}))
                    .collect::<Vec<_>>()},
            })
        })
        .collect();
    answer(StatusCode::OK, &json!({ "jobs": jobs }), None)
}
