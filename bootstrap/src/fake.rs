//! `status.json` documents in memory, with the store's conditional writes (feature `fake`): for
//! tests of the launcher and the worker that need no S3.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::status::Status;
use crate::store::{Expect, StatusError, StatusStore, Stored};

/// A stored document: its ETag, and the status or why it is not one.
type Document = (String, Result<Status, String>);

#[derive(Default)]
pub struct MemoryStatuses {
    /// (bucket, key) → document.
    documents: Mutex<BTreeMap<(String, String), Document>>,
    next_etag: Mutex<u64>,
    /// Every write, in order.
    writes: Mutex<Vec<(String, String)>>,
    /// Text documents (logs) by bucket and key.
    texts: Mutex<BTreeMap<(String, String), String>>,
}

impl MemoryStatuses {
    pub fn get(&self, bucket: &str, key: &str) -> Option<Status> {
        self.documents
            .lock()
            .unwrap()
            .get(&(bucket.to_owned(), key.to_owned()))
            .and_then(|(_, status)| status.clone().ok())
    }

    /// Stores `status` as it is, as a writer that follows no rule would.
    pub fn put(&self, bucket: &str, key: &str, status: Status) {
        self.store(bucket, key, Ok(status));
    }

    /// Stores a document that is not a status.
    pub fn put_damaged(&self, bucket: &str, key: &str) {
        self.store(bucket, key, Err("expected value at line 1 column 1".into()));
    }

    pub fn put_text(&self, bucket: &str, key: &str, text: &str) {
        self.texts
            .lock()
            .unwrap()
            .insert((bucket.to_owned(), key.to_owned()), text.to_owned());
    }

    pub fn writes(&self) -> Vec<(String, String)> {
        self.writes.lock().unwrap().clone()
    }

    fn store(&self, bucket: &str, key: &str, status: Result<Status, String>) {
        let etag = self.next_etag();
        self.documents
            .lock()
            .unwrap()
            .insert((bucket.to_owned(), key.to_owned()), (etag, status));
    }

    fn next_etag(&self) -> String {
        let mut next = self.next_etag.lock().unwrap();
        *next += 1;
        format!("\"etag-{next}\"")
    }
}

impl StatusStore for MemoryStatuses {
    async fn read(&self, bucket: &str, key: &str) -> Result<Option<Stored>, StatusError> {
        Ok(self
            .documents
            .lock()
            .unwrap()
            .get(&(bucket.to_owned(), key.to_owned()))
            .map(|(etag, status)| Stored {
                etag: Some(etag.clone()),
                status: status.clone(),
            }))
    }

    /// Checks the condition and stores under one lock, as S3 does a conditional write: at once.
    async fn write(
        &self,
        bucket: &str,
        key: &str,
        status: &Status,
        expect: &Expect,
    ) -> Result<(), StatusError> {
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
        documents.insert(place, (self.next_etag(), Ok(status.clone())));
        Ok(())
    }

    async fn tail(
        &self,
        bucket: &str,
        key: &str,
        bytes: u64,
    ) -> Result<Option<String>, StatusError> {
        let texts = self.texts.lock().unwrap();
        Ok(texts.get(&(bucket.to_owned(), key.to_owned())).map(|text| {
            let from = text
                .len()
                .saturating_sub(usize::try_from(bytes).unwrap_or(usize::MAX));
            String::from_utf8_lossy(&text.as_bytes()[from..]).into_owned()
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
