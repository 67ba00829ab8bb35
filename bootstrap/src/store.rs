//! Where a job's documents are kept (its `status.json`, its attempts' claims, its logs), and how
//! each writer records a status: [`StatusStore`] is the seam (S3 in AWS and locally, memory in
//! tests), [`record`] the one way to write a status through it.
//!
//! Writes are conditional (`If-None-Match: *` for a document that is not there yet, `If-Match`
//! with the ETag read otherwise), so that two writers racing on one job (the worker finishing
//! while the reaper gives up on it, say) cannot overwrite each other unseen: the loser reads
//! again and [`settle`]s against what won.

use std::future::Future;
use std::time::SystemTime;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::{ByteStream, DateTime};

use crate::events::JobState;
use crate::status::{OtherJob, Settled, Status, settle};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read s3://{bucket}/{key}: {message}")]
    Read {
        bucket: String,
        key: String,
        message: String,
        /// S3 answered 403. Without `s3:ListBucket` it does so for a key that does not exist.
        denied: bool,
    },
    #[error("s3://{bucket}/{key} is not what s3spot writes there: {reason}")]
    Invalid {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("cannot write s3://{bucket}/{key}: {message}")]
    Write {
        bucket: String,
        key: String,
        message: String,
    },
    /// The document changed since it was read (a failed write precondition).
    #[error("s3://{bucket}/{key} changed while it was being written")]
    Conflict { bucket: String, key: String },
    #[error("s3://{bucket}/{key}")]
    OtherJob {
        bucket: String,
        key: String,
        #[source]
        source: OtherJob,
    },
    #[error(
        "s3://{bucket}/{key} kept changing under {tries} attempts to record a status; nothing \
         was written"
    )]
    Contended {
        bucket: String,
        key: String,
        tries: usize,
    },
}

/// A stored document, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub body: Vec<u8>,
    /// What a conditional write must match; `None` if the store has no ETags.
    pub etag: Option<String>,
}

/// A stored status document, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// What a conditional write must match; `None` if the store has no ETags.
    pub etag: Option<String>,
    /// The document, or why it is not a status.
    pub status: Result<Status, String>,
}

/// What a write requires of the stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// That there is none yet.
    Nothing,
    /// That it is still the one with this ETag.
    ETag(String),
    /// Nothing: the store cannot tell.
    Anything,
}

impl Expect {
    /// What a write over `document` (or none) requires.
    pub fn over(document: Option<&Document>) -> Expect {
        match document {
            None => Expect::Nothing,
            Some(Document {
                etag: Some(etag), ..
            }) => Expect::ETag(etag.clone()),
            Some(Document { etag: None, .. }) => Expect::Anything,
        }
    }
}

/// The jobs' documents: `status.json`, the attempts' claims, the tails of the logs, and the
/// upload folders of a key.
pub trait StatusStore: Send + Sync {
    /// The document at `key`, `None` if there is none.
    fn get(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Document>, StatusError>> + Send;

    /// Writes a JSON document at `key` if the stored one is still as `expect` says; otherwise
    /// fails with [`StatusError::Conflict`]. Returns what a write over it must match next.
    fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        expect: &Expect,
    ) -> impl Future<Output = Result<Expect, StatusError>> + Send;

    /// The last `bytes` of a text document (a log), lossily decoded; `None` if there is none.
    fn tail(
        &self,
        bucket: &str,
        key: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<Option<String>, StatusError>> + Send;

    /// The folders directly under `prefix` (which ends in `/`), in name order: the uploads of a
    /// key, oldest first.
    fn folders(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<String>, StatusError>> + Send;

    /// Removes the document at `key`; one that is not there is fine.
    fn delete(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<(), StatusError>> + Send;

    /// Every key under `prefix` whose name is `name` (the last segment), modified at `since`
    /// or later, across every page of the listing, in key order.
    fn named(
        &self,
        bucket: &str,
        prefix: &str,
        name: &str,
        since: SystemTime,
    ) -> impl Future<Output = Result<Vec<String>, StatusError>> + Send;
}

macro_rules! delegate_status_store {
    ($($pointer:ty),*) => {$(
        impl<S: StatusStore + ?Sized> StatusStore for $pointer {
            fn get(
                &self,
                bucket: &str,
                key: &str,
            ) -> impl Future<Output = Result<Option<Document>, StatusError>> + Send {
                (**self).get(bucket, key)
            }

            fn put(
                &self,
                bucket: &str,
                key: &str,
                body: Vec<u8>,
                expect: &Expect,
            ) -> impl Future<Output = Result<Expect, StatusError>> + Send {
                (**self).put(bucket, key, body, expect)
            }

            fn tail(
                &self,
                bucket: &str,
                key: &str,
                bytes: u64,
            ) -> impl Future<Output = Result<Option<String>, StatusError>> + Send {
                (**self).tail(bucket, key, bytes)
            }

            fn folders(
                &self,
                bucket: &str,
                prefix: &str,
            ) -> impl Future<Output = Result<Vec<String>, StatusError>> + Send {
                (**self).folders(bucket, prefix)
            }

            fn delete(
                &self,
                bucket: &str,
                key: &str,
            ) -> impl Future<Output = Result<(), StatusError>> + Send {
                (**self).delete(bucket, key)
            }

            fn named(
                &self,
                bucket: &str,
                prefix: &str,
                name: &str,
                since: SystemTime,
            ) -> impl Future<Output = Result<Vec<String>, StatusError>> + Send {
                (**self).named(bucket, prefix, name, since)
            }
        }
    )*};
}

delegate_status_store!(&S, std::sync::Arc<S>);

/// The status at `key` as stored: its ETag, and the document or why it is not a status.
pub async fn read_stored<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
) -> Result<Option<Stored>, StatusError> {
    Ok(store.get(bucket, key).await?.map(|document| Stored {
        etag: document.etag,
        status: serde_json::from_slice(&document.body).map_err(|e| e.to_string()),
    }))
}

/// Writes `status` at `key` if the stored document is still as `expect` says.
pub async fn write_status<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
    status: &Status,
    expect: &Expect,
) -> Result<(), StatusError> {
    let body = serde_json::to_vec_pretty(status).expect("a Status always serializes");
    store.put(bucket, key, body, expect).await.map(drop)
}

/// The status of job `job_id` at `key`, `None` if there is none. A document that is not a status,
/// or that belongs to another job, is an error: no reader acts on it as if it were this job's.
pub async fn read_status<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
    job_id: &str,
) -> Result<Option<Status>, StatusError> {
    let Some(stored) = read_stored(store, bucket, key).await? else {
        return Ok(None);
    };
    let status = stored.status.map_err(|reason| StatusError::Invalid {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        reason,
    })?;
    if !status.belongs_to(job_id) {
        return Err(StatusError::OtherJob {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            source: OtherJob {
                expected: job_id.to_owned(),
                found: status.job_id,
            },
        });
    }
    Ok(Some(status))
}

/// What [`record`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    /// This document is stored now: the new status, or what [`settle`] made of it and the one
    /// before.
    Written(Box<Status>),
    /// The stored document stays, for this reason.
    Kept { reason: String },
}

/// Conditional writes that lose a race are tried again this often, each against what won.
const RECORD_TRIES: usize = 5;

/// Records `status` at `key` by the one rule, [`settle`]: reads what is stored, settles, and
/// writes on the condition that nothing changed in between.
pub async fn record<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
    status: Status,
) -> Result<Recorded, StatusError> {
    record_change(store, bucket, key, status)
        .await
        .map(|(recorded, _)| recorded)
}

/// The state (as events name it) and attempt of a stored status, before a write over it.
pub type Before = Option<(JobState, u32)>;

/// [`record`], and what the job's status was before: a write changed the job's state when
/// it is [`Recorded::Written`] with another state or attempt than that (see
/// [`changed_state`]).
pub async fn record_change<S: StatusStore + ?Sized>(
    store: &S,
    bucket: &str,
    key: &str,
    status: Status,
) -> Result<(Recorded, Before), StatusError> {
    for _ in 0..RECORD_TRIES {
        let (current, expect) = match read_stored(store, bucket, key).await {
            Ok(None) => (None, Expect::Nothing),
            Ok(Some(stored)) => {
                let expect = stored.etag.map_or(Expect::Anything, Expect::ETag);
                match stored.status {
                    Ok(current) => (Some(current), expect),
                    // A damaged document must not keep the job from its record.
                    Err(reason) => {
                        tracing::warn!(bucket, key, reason, "replacing a damaged status.json");
                        (None, expect)
                    }
                }
            }
            // Absent or forbidden: a write that requires absence tells which.
            Err(StatusError::Read { denied: true, .. }) => (None, Expect::Nothing),
            Err(error) => return Err(error),
        };
        let before = current.as_ref().map(|c| (JobState::of(c), c.attempt));
        let document = match settle(current, status.clone()) {
            Ok(Settled::Write(document)) => document,
            Ok(Settled::Keep { reason }) => return Ok((Recorded::Kept { reason }, before)),
            Err(source) => {
                return Err(StatusError::OtherJob {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                    source,
                });
            }
        };
        match write_status(store, bucket, key, &document, &expect).await {
            Ok(()) => return Ok((Recorded::Written(document), before)),
            Err(StatusError::Conflict { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Err(StatusError::Contended {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        tries: RECORD_TRIES,
    })
}

/// The status that `recorded` wrote, if it changed the job's state from `before`: another
/// state, or another attempt.
pub fn changed_state(recorded: &Recorded, before: Before) -> Option<&Status> {
    match recorded {
        Recorded::Written(status) if before != Some((JobState::of(status), status.attempt)) => {
            Some(status)
        }
        _ => None,
    }
}

/// `status.json` in S3 (or any S3 API: the local mode's server, moto).
#[derive(Debug, Clone)]
pub struct S3Statuses {
    client: aws_sdk_s3::Client,
    /// Keys per page of a listing; S3's own (1,000) unless a test asks for less.
    page_size: Option<i32>,
}

impl S3Statuses {
    /// A client on the standard AWS configuration. With a custom endpoint (an emulator, the
    /// local mode) buckets go in the path, since `<bucket>.127.0.0.1` resolves nowhere.
    pub fn new(sdk: &aws_config::SdkConfig) -> Self {
        let config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .build();
        Self::from_client(aws_sdk_s3::Client::from_conf(config))
    }

    pub fn from_client(client: aws_sdk_s3::Client) -> Self {
        S3Statuses {
            client,
            page_size: None,
        }
    }

    /// Lists `keys` keys a page: for tests of what spans pages.
    pub fn with_page_size(mut self, keys: i32) -> Self {
        self.page_size = Some(keys);
        self
    }

    /// An object's bytes (from byte `from` on) and ETag; `None` if there is no such object.
    async fn get_from(
        &self,
        bucket: &str,
        key: &str,
        from: Option<u64>,
    ) -> Result<Option<(Vec<u8>, Option<String>)>, StatusError> {
        let object = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .set_range(from.map(|from| format!("bytes={from}-")))
            .send()
            .await
        {
            Ok(object) => object,
            Err(error) if no_such_key(&error) => return Ok(None),
            Err(error) => return Err(read_error(bucket, key, &error)),
        };
        let etag = object.e_tag().map(str::to_owned);
        let body = object.body.collect().await.map_err(|e| StatusError::Read {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            message: e.to_string(),
            denied: false,
        })?;
        Ok(Some((body.to_vec(), etag)))
    }
}

fn http_status<E>(
    error: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<u16> {
    error.raw_response().map(|r| r.status().as_u16())
}

/// A 404 for the key, not for the bucket: a bucket that does not exist is a setting to fix,
/// never "no document yet".
fn no_such_key<E: ProvideErrorMetadata>(
    error: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    http_status(error) == Some(404) && error.code() != Some("NoSuchBucket")
}

fn read_error<E>(
    bucket: &str,
    key: &str,
    error: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StatusError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let denied = http_status(error) == Some(403);
    // A HEAD answer has no body, so S3's own code and message are absent from a denied one.
    let message = match error.code() {
        None if denied => "AccessDenied (403): these credentials may not read it".to_owned(),
        _ => DisplayErrorContext(error).to_string(),
    };
    StatusError::Read {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        message,
        denied,
    }
}

impl StatusStore for S3Statuses {
    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StatusError> {
        self.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map(drop)
            .map_err(|error| StatusError::Write {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                message: DisplayErrorContext(&error).to_string(),
            })
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Document>, StatusError> {
        Ok(self
            .get_from(bucket, key, None)
            .await?
            .map(|(body, etag)| Document { body, etag }))
    }

    async fn put(
        &self,
        bucket: &str,
        key: &str,
        json: Vec<u8>,
        expect: &Expect,
    ) -> Result<Expect, StatusError> {
        let request = self
            .client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(json));
        let request = match expect {
            Expect::Nothing => request.if_none_match("*"),
            Expect::ETag(etag) => request.if_match(etag),
            Expect::Anything => request,
        };
        match request.send().await {
            Ok(output) => Ok(output
                .e_tag()
                .map_or(Expect::Anything, |etag| Expect::ETag(etag.to_owned()))),
            // 412: the precondition failed. 409: a concurrent conditional write won. 404: an
            // If-Match on a document that has since gone (S3 and moto answer so).
            Err(error)
                if matches!(http_status(&error), Some(412 | 409))
                    || (matches!(expect, Expect::ETag(_)) && no_such_key(&error)) =>
            {
                Err(StatusError::Conflict {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                })
            }
            Err(error) => Err(StatusError::Write {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                message: DisplayErrorContext(&error).to_string(),
            }),
        }
    }

    async fn tail(
        &self,
        bucket: &str,
        key: &str,
        bytes: u64,
    ) -> Result<Option<String>, StatusError> {
        // The size first, then a range from a position: suffix ranges of empty objects are
        // errors in S3 and worse in some emulators.
        let head = match self
            .client
            .head_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(head) => head,
            Err(error) if http_status(&error) == Some(404) => return Ok(None),
            Err(error) => return Err(read_error(bucket, key, &error)),
        };
        let size = head
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        let from = size.checked_sub(bytes).filter(|from| *from > 0);
        Ok(self
            .get_from(bucket, key, from)
            .await?
            .map(|(body, _)| String::from_utf8_lossy(&body).into_owned()))
    }

    async fn folders(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StatusError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .delimiter("/")
            .into_paginator()
            .send();
        let mut folders = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| read_error(bucket, prefix, &error))?;
            folders.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix())
                    .filter_map(|p| p.strip_prefix(prefix))
                    .map(|p| p.trim_end_matches('/').to_owned()),
            );
        }
        folders.sort();
        Ok(folders)
    }

    async fn named(
        &self,
        bucket: &str,
        prefix: &str,
        name: &str,
        since: SystemTime,
    ) -> Result<Vec<String>, StatusError> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_max_keys(self.page_size)
            .into_paginator()
            .send();
        let since = DateTime::from(since);
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|error| read_error(bucket, prefix, &error))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter(|o| o.last_modified().is_none_or(|at| *at >= since))
                    .filter_map(|o| o.key())
                    .filter(|key| key.rsplit('/').next() == Some(name))
                    .map(str::to_owned),
            );
        }
        keys.sort();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::fake::MemoryStatuses;
    use crate::status::{Instance, State, Writer};

    const BUCKET: &str = "data";

    fn job() -> crate::JobSpec {
        crate::job::tests::sample()
    }

    fn worker(state: State) -> Status {
        let mut status = Status::initial(&job(), Writer::Worker, SystemTime::UNIX_EPOCH);
        status.state = state;
        status
    }

    fn verdict(state: State, why: &str) -> Status {
        Status::verdict(&job(), Instance::default(), state, why.into())
    }

    /// A store where another writer gets in between each read and the next write, once per
    /// status in `rivals`.
    fn racing(rivals: Vec<Status>) -> MemoryStatuses {
        let store = MemoryStatuses::default();
        store.rivals_before_writes(rivals);
        store
    }

    #[tokio::test]
    async fn a_write_that_loses_a_race_settles_against_the_winner() {
        // The reaper read nothing, then the worker's success landed before the reaper's write.
        let store = racing(vec![worker(State::Succeeded)]);
        let key = job().status_key();
        let recorded = record(&store, BUCKET, &key, verdict(State::Failed, "reaped"))
            .await
            .unwrap();
        assert!(
            matches!(&recorded, Recorded::Kept { reason } if reason.contains("own account")),
            "{recorded:?}"
        );
        assert_eq!(store.status(BUCKET, &key).unwrap().state, State::Succeeded);
        assert!(store.writes().is_empty(), "the verdict was never written");
    }

    #[tokio::test]
    async fn a_stopped_workers_account_completes_a_verdict_that_won_the_race() {
        let store = racing(vec![verdict(State::Cancelled, "cancelled")]);
        let key = job().status_key();
        let mut stopped = worker(State::Interrupted);
        stopped.error = Some("SIGTERM".into());
        let Recorded::Written(written) = record(&store, BUCKET, &key, stopped).await.unwrap()
        else {
            panic!("the worker's account must be written");
        };
        let written = *written;
        assert_eq!(written.state, State::Cancelled);
        assert_eq!(written.error.as_deref(), Some("cancelled; SIGTERM"));
        assert_eq!(store.status(BUCKET, &key), Some(written));
    }

    #[tokio::test]
    async fn endless_races_end_in_an_error_that_says_so() {
        let store = racing(vec![verdict(State::Cancelled, "cancelled"); RECORD_TRIES]);
        let key = job().status_key();
        // Every rival verdict is met with a worker account that must then be written again.
        let error = record(&store, BUCKET, &key, worker(State::Interrupted))
            .await
            .unwrap_err();
        assert!(
            matches!(
                error,
                StatusError::Contended {
                    tries: RECORD_TRIES,
                    ..
                }
            ),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_damaged_document_is_replaced_and_another_jobs_is_not() {
        let store = MemoryStatuses::default();
        let key = job().status_key();
        store.put_damaged(BUCKET, &key);
        let error = read_status(&store, BUCKET, &key, &job().job_id)
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("is not what s3spot writes"),
            "{error}"
        );
        record(&store, BUCKET, &key, worker(State::Succeeded))
            .await
            .unwrap();
        assert_eq!(store.status(BUCKET, &key).unwrap().state, State::Succeeded);

        let mut theirs = worker(State::Succeeded);
        theirs.job_id = "f".repeat(32);
        store.put_status(BUCKET, &key, theirs.clone());
        let error = record(&store, BUCKET, &key, worker(State::Failed))
            .await
            .unwrap_err();
        assert!(
            crate::error_chain(&error).contains("belongs to job"),
            "{error}"
        );
        let error = read_status(&store, BUCKET, &key, &job().job_id)
            .await
            .unwrap_err();
        assert!(matches!(error, StatusError::OtherJob { .. }), "{error}");
        assert_eq!(store.status(BUCKET, &key), Some(theirs), "left as it was");
    }

    #[tokio::test]
    async fn a_forbidden_read_of_a_missing_document_still_records_the_first_status() {
        // As S3 answers a role without `s3:ListBucket`.
        let store = MemoryStatuses::default();
        store.deny_missing();
        let key = job().status_key();
        record(&store, BUCKET, &key, worker(State::Succeeded))
            .await
            .unwrap();
        assert_eq!(store.status(BUCKET, &key).unwrap().state, State::Succeeded);
        assert_eq!(
            store.conditions(),
            [Expect::Nothing],
            "a forbidden read writes only if absent"
        );
    }
}
