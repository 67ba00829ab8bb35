//! The jobs' documents in memory, with the store's conditional writes (feature `fake`): for
//! tests of the launcher and the worker that need no S3.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::status::Status;
use crate::store::{Document, Expect, StatusError, StatusStore};

/// (bucket, key) → (ETag, body).
type Documents = BTreeMap<(String, String), (String, Vec<u8>)>;

#[derive(Default)]
pub struct MemoryStatuses {
    documents: Mutex<Documents>,
    next_etag: Mutex<u64>,
    /// Every conditional write through the seam, in order.
    writes: Mutex<Vec<(String, String)>>,
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

    pub fn writes(&self) -> Vec<(String, String)> {
        self.writes.lock().unwrap().clone()
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
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Document>, StatusError> {
        Ok(self
            .documents
            .lock()
            .unwrap()
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|(etag, body)| Document {
                body: body.clone(),
                etag: Some(etag.clone()),
            }))
    }

    /// Checks the condition and stores under one lock, as S3 does a conditional write: at once.
    async fn put(
        &self,
        bucket: &str,
        key: &str,
        body: Vec<u8>,
        expect: &Expect,
    ) -> Result<Expect, StatusError> {
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
}
