//! Downloading the job's object to disk, hashing it on the way, in bounded memory.
//!
//! Chunks reach a writer thread in object order through a short channel; the thread writes and
//! hashes them while the next ones download. Large objects come in as parallel ranged GETs,
//! polled in order by `buffered`, into buffers from a fixed pool: the writer hands each buffer
//! back once written, so a download allocates its buffers once, whatever the object's size.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use s3spot_bootstrap::JobSpec;
use sha2::{Digest as _, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::settings::DownloadSettings;

/// The object, on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
    pub etag: Option<String>,
    pub version_id: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("object not found: s3://{bucket}/{key}{}", version_suffix(.version_id))]
    NotFound {
        bucket: String,
        key: String,
        version_id: Option<String>,
    },
    #[error(
        "object changed since the event: its ETag is now {found}, not {expected}; the new \
         upload has an event of its own"
    )]
    Changed { expected: String, found: String },
    #[error("S3 {operation} failed: {message}")]
    S3 {
        operation: &'static str,
        message: String,
    },
    #[error("download incomplete: {got} of {expected} bytes")]
    Short { got: u64, expected: u64 },
    #[error("cannot write the object to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn version_suffix(version_id: &Option<String>) -> String {
    version_id
        .as_ref()
        .map(|v| format!(" (version {v})"))
        .unwrap_or_default()
}

/// ETags come quoted from S3 and unquoted in events.
fn bare_etag(etag: &str) -> &str {
    etag.trim_matches('"')
}

pub async fn download(
    s3: &Client,
    job: &JobSpec,
    dest: &Path,
    settings: &DownloadSettings,
) -> Result<Downloaded, DownloadError> {
    let not_found = || not_found(job);
    let head = s3
        .head_object()
        .bucket(&job.bucket)
        .key(&job.key)
        .set_version_id(job.version_id.clone())
        .send()
        .await
        .map_err(|e| s3_error("HeadObject", e, not_found))?;
    let size = u64::try_from(head.content_length().unwrap_or_default()).unwrap_or_default();
    let etag = head.e_tag().map(|e| bare_etag(e).to_owned());
    // Without a version id, an unversioned key may have been overwritten since the event. Its
    // ETag tells; processing the newer content would attribute it to the wrong upload.
    if job.version_id.is_none()
        && let (Some(expected), Some(found)) = (&job.etag, &etag)
        && bare_etag(expected) != found
    {
        return Err(DownloadError::Changed {
            expected: bare_etag(expected).to_owned(),
            found: found.clone(),
        });
    }
    // Every GET reads the object HEAD described: its version if the bucket has versions,
    // otherwise the same ETag.
    let version_id = head
        .version_id()
        .map(str::to_owned)
        .or(job.version_id.clone());
    let source = Source {
        s3,
        job,
        if_match: version_id.is_none().then(|| etag.clone()).flatten(),
        version_id: version_id.clone(),
    };

    let (chunks, writer) = spawn_writer(dest.to_path_buf());
    let fetched = if size > settings.ranged_above {
        fetch_ranges(&source, size, settings, &chunks).await
    } else {
        fetch_whole(&source, &chunks).await
    };
    drop(chunks);
    let written = writer.await.expect("the writer thread does not panic");
    // A write error stops the writer, which makes the fetch fail too: report the cause.
    let (got, sha256) = written?;
    fetched?;
    if got != size {
        return Err(DownloadError::Short {
            got,
            expected: size,
        });
    }
    Ok(Downloaded {
        path: dest.to_path_buf(),
        size,
        sha256,
        etag,
        version_id,
        content_type: head.content_type().map(str::to_owned),
    })
}

type Writer = tokio::task::JoinHandle<Result<(u64, String), DownloadError>>;

/// A piece of the object, in order.
enum Chunk {
    /// As the HTTP client delivered it (single GETs).
    Received(Bytes),
    /// A whole range, in a buffer that goes back to its pool once written.
    Pooled(PooledBuffer),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Received(bytes) => bytes,
            Chunk::Pooled(buffer) => &buffer.buffer,
        }
    }
}

/// A fixed number of range buffers, made on first use and recycled after.
struct BufferPool {
    free: Mutex<Vec<BytesMut>>,
    available: Arc<Semaphore>,
    capacity: usize,
}

struct PooledBuffer {
    buffer: BytesMut,
    pool: Arc<BufferPool>,
    _permit: OwnedSemaphorePermit,
}

impl BufferPool {
    fn new(buffers: usize, capacity: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::with_capacity(buffers)),
            available: Arc::new(Semaphore::new(buffers)),
            capacity,
        })
    }

    /// Waits for a buffer to be free.
    async fn take(self: &Arc<Self>) -> PooledBuffer {
        let permit = Arc::clone(&self.available)
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        let buffer = self
            .free
            .lock()
            .expect("no panics while holding the lock")
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(self.capacity));
        PooledBuffer {
            buffer,
            pool: Arc::clone(self),
            _permit: permit,
        }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        let mut buffer = std::mem::take(&mut self.buffer);
        buffer.clear();
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(buffer);
        }
    }
}

/// A blocking thread that writes chunks in the order it gets them and hashes them as it goes.
fn spawn_writer(path: PathBuf) -> (mpsc::Sender<Chunk>, Writer) {
    let (sender, mut receiver) = mpsc::channel::<Chunk>(1);
    let writer = tokio::task::spawn_blocking(move || {
        let write_error = |source| DownloadError::Write {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::File::create(&path).map_err(write_error)?;
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = receiver.blocking_recv() {
            let bytes = chunk.bytes();
            file.write_all(bytes).map_err(write_error)?;
            hasher.update(bytes);
            written += bytes.len() as u64;
        }
        file.flush().map_err(write_error)?;
        Ok((written, hex::encode(hasher.finalize())))
    });
    (sender, writer)
}

/// The object as HEAD described it.
struct Source<'a> {
    s3: &'a Client,
    job: &'a JobSpec,
    version_id: Option<String>,
    if_match: Option<String>,
}

impl Source<'_> {
    /// The body of the whole object, or of `[start, end)`.
    async fn get(&self, range: Option<(u64, u64)>) -> Result<ByteStream, DownloadError> {
        self.s3
            .get_object()
            .bucket(&self.job.bucket)
            .key(&self.job.key)
            .set_version_id(self.version_id.clone())
            .set_if_match(self.if_match.clone())
            .set_range(range.map(|(start, end)| format!("bytes={start}-{}", end - 1)))
            .send()
            .await
            .map(|object| object.body)
            .map_err(|e| s3_error("GetObject", e, || not_found(self.job)))
    }
}

async fn next_piece(body: &mut ByteStream) -> Result<Option<Bytes>, DownloadError> {
    body.try_next().await.map_err(|e| DownloadError::S3 {
        operation: "GetObject",
        message: format!("reading the body: {}", DisplayErrorContext(&e)),
    })
}

async fn fetch_whole(
    source: &Source<'_>,
    chunks: &mpsc::Sender<Chunk>,
) -> Result<(), DownloadError> {
    let mut body = source.get(None).await?;
    while let Some(piece) = next_piece(&mut body).await? {
        if chunks.send(Chunk::Received(piece)).await.is_err() {
            break; // The writer stopped; its error is the one to report.
        }
    }
    Ok(())
}

async fn fetch_ranges(
    source: &Source<'_>,
    size: u64,
    settings: &DownloadSettings,
    chunks: &mpsc::Sender<Chunk>,
) -> Result<(), DownloadError> {
    let chunk_size = settings.chunk_size.max(1);
    let concurrency = settings.concurrency.max(1);
    // One buffer per range in flight, one queued for the writer, one being written.
    let pool = BufferPool::new(
        concurrency + 2,
        usize::try_from(chunk_size).unwrap_or(usize::MAX),
    );
    let ranges = (0..size)
        .step_by(usize::try_from(chunk_size).unwrap_or(usize::MAX))
        .map(|start| (start, (start + chunk_size).min(size)));
    let mut in_order = futures_util::stream::iter(ranges)
        .map(|range| {
            let pool = &pool;
            async move {
                let mut buffer = pool.take().await;
                let mut body = source.get(Some(range)).await?;
                while let Some(piece) = next_piece(&mut body).await? {
                    buffer.buffer.extend_from_slice(&piece);
                }
                Ok::<_, DownloadError>(buffer)
            }
        })
        .buffered(concurrency);
    while let Some(chunk) = in_order.next().await {
        if chunks.send(Chunk::Pooled(chunk?)).await.is_err() {
            break;
        }
    }
    Ok(())
}

fn not_found(job: &JobSpec) -> DownloadError {
    DownloadError::NotFound {
        bucket: job.bucket.clone(),
        key: job.key.clone(),
        version_id: job.version_id.clone(),
    }
}

fn s3_error<E>(
    operation: &'static str,
    error: SdkError<E>,
    not_found: impl Fn() -> DownloadError,
) -> DownloadError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = error.raw_response().map(|r| r.status().as_u16());
    let code = error.code();
    if status == Some(404) || matches!(code, Some("NoSuchKey" | "NoSuchVersion" | "NotFound")) {
        return not_found();
    }
    if status == Some(412) {
        return DownloadError::S3 {
            operation,
            message: "the object changed while it was being downloaded (ETag no longer matches)"
                .into(),
        };
    }
    let message = crate::sdk_message(&error);
    DownloadError::S3 { operation, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_object_and_its_version() {
        let error = DownloadError::NotFound {
            bucket: "data".into(),
            key: "in/a.csv".into(),
            version_id: Some("v1".into()),
        };
        assert_eq!(
            error.to_string(),
            "object not found: s3://data/in/a.csv (version v1)"
        );
    }

    #[test]
    fn etags_compare_without_quotes() {
        assert_eq!(bare_etag("\"abc\""), "abc");
        assert_eq!(bare_etag("abc-3"), "abc-3");
    }
}
