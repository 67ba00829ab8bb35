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
}
