//! `status.json` documents in memory, for handler tests that need no S3.

use std::collections::BTreeMap;
use std::sync::Mutex;

use s3spot_bootstrap::Status;
use s3spot_lambda::{StatusError, StatusStore};

#[derive(Default)]
pub struct MemoryStatuses {
    documents: Mutex<BTreeMap<(String, String), Status>>,
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
            .cloned()
    }

    pub fn put(&self, bucket: &str, key: &str, status: Status) {
        self.documents
            .lock()
            .unwrap()
            .insert((bucket.to_owned(), key.to_owned()), status);
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
}

impl StatusStore for MemoryStatuses {
    async fn read(&self, bucket: &str, key: &str) -> Result<Option<Status>, StatusError> {
        Ok(self.get(bucket, key))
    }

    async fn write(&self, bucket: &str, key: &str, status: &Status) -> Result<(), StatusError> {
        self.writes
            .lock()
            .unwrap()
            .push((bucket.to_owned(), key.to_owned()));
        self.put(bucket, key, status.clone());
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
}
