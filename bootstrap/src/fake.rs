//! The jobs' documents in memory, with the store's conditional writes (feature `fake`): for
//! tests of the launcher and the worker that need no S3. It plays S3's faults on request: reads
//! that fail, a 403 for a missing document, a rival writer in every race.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::status::Status;
use crate::store::{Document, Expect, StatusError, StatusStore};

/// (bucket, key) → (ETag, body).
type Documents = BTreeMap<(String, String), (String, Vec<u8>)>;

#[derive(Default)]
pub struct MemoryStatuses {
    documents: Mutex<Documents>,
    next_etag: Mutex<u64>,
    /// Every conditional write through the seam that held, in order.
    writes: Mutex<Vec<(String, String)>>,
    /// The condition of every write tried, whether it held or not.
    tried: Mutex<Vec<Expect>>,
    /// Every read fails, as S3's can (a 500).
    failing_reads: AtomicBool,
    /// A read of a missing document is 403, as S3 answers a role without `s3:ListBucket`.
    missing_is_denied: AtomicBool,
    /// Written by another writer just before each of the next writes, last first.
    rivals: Mutex<Vec<Status>>,
}

impl MemoryStatuses {
    /// The status at `key`, if there is one that reads as a status.
    pub fn status(&self, bucket: &str, key: &str) -> Option<Status> {
        let documents = self.documents.lock().unwrap();
        let (_, body) = documents.get(&(bucket.to_owned(), key.to_owned()))?;
        serde_json::from_slice(body).ok()
    }

    /// The document at `key`, as JSON.
    pub fn json(&self, bucket: &str, key: &str) -> Option<serde_json::Value> {
        let documents = self.documents.lock().unwrap();
        let (_, body) = documents.get(&(bucket.to_owned(), key.to_owned()))?;
        serde_json::from_slice(body).ok()
    }

    /// Stores `status` as it is, as a writer that follows no rule would.
    pub fn put_status(&self, bucket: &str, key: &str, status: Status) {
        self.store(
            bucket,
            key,
            serde_json::to_vec(&status).expect("a status serialises"),
        );
    }

    /// Stores a document that is not a status.
    pub fn put_damaged(&self, bucket: &str, key: &str) {
        self.store(bucket, key, b"{\"not\": \"a status\"".to_vec());
    }

    /// Stores a text document (a log).
    pub fn put_text(&self, bucket: &str, key: &str, text: &str) {
        self.store(bucket, key, text.as_bytes().to_vec());
    }

    /// Every conditional write through the seam that held, in order.
    pub fn writes(&self) -> Vec<(String, String)> {
        self.writes.lock().unwrap().clone()
    }

    /// The conditions of every write tried, in order, whether they held or not.
    pub fn conditions(&self) -> Vec<Expect> {
        self.tried.lock().unwrap().clone()
    }

    /// Makes every read fail, or work again.
    pub fn fail_reads(&self, failing: bool) {
        self.failing_reads.store(failing, Ordering::SeqCst);
    }

    /// Makes every read of a missing document a 403.
    pub fn deny_missing(&self) {
        self.missing_is_denied.store(true, Ordering::SeqCst);
    }

    /// Has another writer store `rivals`, one before each of the next writes, in order.
    pub fn rivals_before_writes(&self, mut rivals: Vec<Status>) {
        rivals.reverse();
        *self.rivals.lock().unwrap() = rivals;
    }

    fn store(&self, bucket: &str, key: &str, body: Vec<u8>) {
        let etag = self.next_etag();
        self.documents
            .lock()
            .unwrap()
            .insert((bucket.to_owned(), key.to_owned()), (etag, body));
    }

    fn next_etag(&self) -> String {
        let mut next = self.next_etag.lock().unwrap();
        *next += 1;
        format!("\"etag-{next}\"")
    }
}

impl StatusStore for MemoryStatuses {
    async fn delete(&self, bucket: &str, key: &str) -> Result<(), StatusError> {
        self.documents
            .lock()
            .unwrap()
            .remove(&(bucket.to_owned(), key.to_owned()));
        Ok(())
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Document>, StatusError> {
        let read_error = |message: &str, denied| StatusError::Read {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            message: message.to_owned(),
            denied,
        };
        if self.failing_reads.load(Ordering::SeqCst) {
            return Err(read_error(
                "InternalError: We encountered an internal error",
                false,
            ));
        }
        let document = self
            .documents
            .lock()
            .unwrap()
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|(etag, body)| Document {
                body: body.clone(),
                etag: Some(etag.clone()),
            });
        if document.is_none() && self.missing_is_denied.load(Ordering::SeqCst) {
            return Err(read_error("AccessDenied", true));
        }
        Ok(document)
    }

    /// Checks the condition and stores under one lock, as S3 does a conditional write: at once.
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        expect: &Expect,
    ) -> Result<Expect, StatusError> {
        let rival = self.rivals.lock().unwrap().pop();
        if let Some(rival) = rival {
            self.put_status(bucket, key, rival);
        }
        self.tried.lock().unwrap().push(expect.clone());
        let mut documents = self.documents.lock().unwrap();
        let place = (bucket.to_owned(), key.to_owned());
        let stored = documents.get(&place).map(|(etag, _)| etag);
        let holds = match expect {
            Expect::Nothing => stored.is_none(),
            Expect::ETag(etag) => stored == Some(etag),
            Expect::Anything => true,
        };
        if !holds {
            return Err(StatusError::Conflict {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
            });
        }
        self.writes.lock().unwrap().push(place.clone());
        let etag = self.next_etag();
        documents.insert(place, (etag.clone(), body));
        Ok(Expect::ETag(etag))
    }

    async fn tail(
        &self,
        bucket: &str,
        key: &str,
        bytes: u64,
    ) -> Result<Option<String>, StatusError> {
        let documents = self.documents.lock().unwrap();
        Ok(documents
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|(_, body)| {
                let from = body
                    .len()
                    .saturating_sub(usize::try_from(bytes).unwrap_or(usize::MAX));
                String::from_utf8_lossy(&body[from..]).into_owned()
            }))
    }

    async fn folders(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, StatusError> {
        let documents = self.documents.lock().unwrap();
        let mut folders: Vec<String> = documents
            .keys()
            .filter(|(b, _)| b == bucket)
            .filter_map(|(_, key)| key.strip_prefix(prefix)?.split_once('/'))
            .map(|(folder, _)| folder.to_owned())
            .collect();
        folders.dedup();
        Ok(folders)
    }

    /// Every document counts as just written.
    async fn named(
        &self,
        bucket: &str,
        prefix: &str,
        name: &str,
        _since: std::time::SystemTime,
    ) -> Result<Vec<String>, StatusError> {
        let documents = self.documents.lock().unwrap();
        Ok(documents
            .keys()
            .filter(|(b, key)| {
                b == bucket && key.starts_with(prefix) && key.rsplit('/').next() == Some(name)
            })
            .map(|(_, key)| key.clone())
            .collect())
    }
}

/// Every event emitted, in memory, in order; or, if told to, none: each `put` fails as
/// EventBridge can.
#[derive(Default, Clone)]
pub struct RecordedEvents {
    events: std::sync::Arc<Mutex<Vec<crate::events::JobEvent>>>,
    failing: std::sync::Arc<AtomicBool>,
}

impl RecordedEvents {
    pub fn new() -> RecordedEvents {
        RecordedEvents::default()
    }

    /// A handle for the emitters that records into this.
    pub fn events(&self) -> crate::events::Events {
        crate::events::Events::to(self.clone())
    }

    pub fn all(&self) -> Vec<crate::events::JobEvent> {
        self.events.lock().unwrap().clone()
    }

    /// `(attempt, state)` of each event, in order.
    pub fn states(&self) -> Vec<(u32, String)> {
        self.all()
            .iter()
            .map(|e| (e.attempt, e.state.to_string()))
            .collect()
    }

    pub fn fail(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl crate::events::EventSink for RecordedEvents {
    async fn put(&self, event: &crate::events::JobEvent) -> Result<(), crate::events::EventError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(crate::events::EventError::Refused {
                code: "InternalException".into(),
                message: "the test said so".into(),
            });
        }
        self.events.lock().unwrap().push(event.clone());
        Ok(())
    }
}
