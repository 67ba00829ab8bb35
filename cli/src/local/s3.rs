//! The embedded S3 server: s3s-fs (a real S3 protocol implementation over a directory), wrapped
//! so that every object created in the data bucket sends an event notification.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use aws_sdk_s3::primitives::{DateTime, DateTimeFormat};
use s3s::dto::*;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use serde_json::Value;
use tokio::sync::mpsc;

use super::notification::{Created, notification};

/// s3s-fs, plus notifications for the data bucket.
pub struct NotifyingFs {
    inner: s3s_fs::FileSystem,
    root: PathBuf,
    region: String,
    data_bucket: String,
    /// Seeded from the clock, so that sequencers keep increasing across restarts.
    sequencer: AtomicU64,
    queue: Queue,
    events: mpsc::UnboundedSender<Notification>,
}

/// An event notification on its way to the handler, and where it waits on disk until the
/// handler is done with it.
#[derive(Debug)]
pub struct Notification {
    pub event: Value,
    pub queued: Option<PathBuf>,
}

/// The notifications not yet handled, one file each, as SQS keeps messages until they are
/// deleted: a pipeline stopped or killed with uploads still waiting (at the instance cap, say)
/// handles them when it starts again.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

impl Queue {
    pub fn new(dir: PathBuf) -> std::io::Result<Queue> {
        std::fs::create_dir_all(&dir)?;
        Ok(Queue { dir })
    }

    /// Keeps `event` on disk, whole or not at all, named so that names sort as events came.
    fn keep(&self, sequence: u64, event: &Value) -> std::io::Result<PathBuf> {
        let path = self.dir.join(format!("{sequence:020}.json"));
        let partial = self.dir.join(format!("{sequence:020}.partial"));
        std::fs::write(
            &partial,
            serde_json::to_vec(event).expect("JSON values serialise"),
        )?;
        std::fs::rename(&partial, &path)?;
        Ok(path)
    }

    /// What an earlier pipeline left unhandled, oldest first. A file that is not an event is
    /// set aside with a `.unreadable` name, and reported.
    pub fn waiting(&self) -> std::io::Result<(Vec<Notification>, Vec<String>)> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        let mut waiting = Vec::new();
        let mut unreadable = Vec::new();
        for path in paths {
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            {
                Ok(event) => waiting.push(Notification {
                    event,
                    queued: Some(path),
                }),
                Err(error) => {
                    let _ = std::fs::rename(&path, path.with_extension("unreadable"));
                    unreadable.push(format!("{}: {error}", path.display()));
                }
            }
        }
        Ok((waiting, unreadable))
    }

    /// The handler is done with a notification: it launched, was skipped, or failed for good.
    pub fn done(path: &std::path::Path) {
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), %error, "cannot remove a handled notification");
        }
    }
}

impl NotifyingFs {
    pub fn new(
        root: PathBuf,
        region: &str,
        data_bucket: &str,
        queue: Queue,
        events: mpsc::UnboundedSender<Notification>,
    ) -> std::io::Result<Self> {
        // s3s-fs errors are Debug only.
        let inner =
            s3s_fs::FileSystem::new(&root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(NotifyingFs {
            inner,
            root,
            region: region.to_owned(),
            data_bucket: data_bucket.to_owned(),
            sequencer: AtomicU64::new(u64::try_from(now.as_nanos()).unwrap_or(u64::MAX)),
            queue,
            events,
        })
    }

    /// Sends the notification of an object created in the data bucket, kept on disk first: an
    /// upload the client was told succeeded is never without its event.
    fn notify(&self, bucket: &str, key: &str, method: &str, etag: Option<&ETag>) -> S3Result<()> {
        if bucket != self.data_bucket {
            return Ok(());
        }
        // s3s-fs keeps each object in one file under <root>/<bucket>/.
        let size = std::fs::metadata(self.root.join(bucket).join(s3s_fs::key_path(key)))
            .map(|m| m.len())
            .unwrap_or_default();
        let sequence = self.sequencer.fetch_add(1, Ordering::SeqCst);
        let sequencer = format!("{sequence:016X}");
        // To the millisecond, as S3 writes eventTime.
        let millis = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let event_time = DateTime::from_millis(millis)
            .fmt(DateTimeFormat::DateTime)
            .unwrap_or_default();
        let etag = etag.map(ETag::value).unwrap_or_default();
        let event = notification(&Created {
            region: &self.region,
            bucket,
            key,
            size,
            etag,
            method,
            sequencer: &sequencer,
            event_time: &event_time,
            request_id: &sequencer,
        });
        let queued = self.queue.keep(sequence, &event).map_err(|error| {
            s3_error!(
                InternalError,
                "the object is stored, but its event could not be queued: {error}"
            )
        })?;
        // Nobody listening any more means the pipeline is stopping: the queue keeps the event.
        let _ = self.events.send(Notification {
            event,
            queued: Some(queued),
        });
        Ok(())
    }
}

/// s3s-fs keeps a key as a path, so each '/'-separated segment must fit in a file name.
const MAX_SEGMENT_BYTES: usize = 255;

/// Refuses keys the store cannot hold, with a reason, before anything is written.
fn check_key(key: &str) -> S3Result<()> {
    // As stored: a segment that s3s-fs escapes (see `s3s_fs::key_path`) is a little longer.
    if s3s_fs::key_path(key)
        .iter()
        .any(|segment| segment.len() > MAX_SEGMENT_BYTES)
    {
        return Err(s3_error!(
            KeyTooLongError,
            "the local S3 server stores keys as files: each '/'-separated part of a key must be \
             at most {MAX_SEGMENT_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The `S3` implementation: the listed operations pass through to s3s-fs unchanged, the given
/// ones are written out. (The whole impl is generated so that `async_trait` sees every method.)
macro_rules! s3_impl {
    (pass through { $($operation:ident($input:ty) -> $output:ty;)* } $($own:item)*) => {
        #[async_trait::async_trait]
        impl S3 for NotifyingFs {
            $(
                async fn $operation(&self, req: S3Request<$input>) -> S3Result<S3Response<$output>> {
                    self.inner.$operation(req).await
                }
            )*
            $($own)*
        }
    };
}

s3_impl! {
    pass through {
        create_bucket(CreateBucketInput) -> CreateBucketOutput;
        delete_bucket(DeleteBucketInput) -> DeleteBucketOutput;
        delete_object(DeleteObjectInput) -> DeleteObjectOutput;
        delete_objects(DeleteObjectsInput) -> DeleteObjectsOutput;
        get_bucket_location(GetBucketLocationInput) -> GetBucketLocationOutput;
        get_object(GetObjectInput) -> GetObjectOutput;
        head_bucket(HeadBucketInput) -> HeadBucketOutput;
        head_object(HeadObjectInput) -> HeadObjectOutput;
        list_buckets(ListBucketsInput) -> ListBucketsOutput;
        list_objects(ListObjectsInput) -> ListObjectsOutput;
        list_objects_v2(ListObjectsV2Input) -> ListObjectsV2Output;
        upload_part(UploadPartInput) -> UploadPartOutput;
        upload_part_copy(UploadPartCopyInput) -> UploadPartCopyOutput;
        list_parts(ListPartsInput) -> ListPartsOutput;
        abort_multipart_upload(AbortMultipartUploadInput) -> AbortMultipartUploadOutput;
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        check_key(&req.input.key)?;
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let response = self.inner.put_object(req).await?;
        self.notify(&bucket, &key, "Put", response.output.e_tag.as_ref())?;
        Ok(response)
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        check_key(&req.input.key)?;
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let response = self.inner.copy_object(req).await?;
        let etag = response
            .output
            .copy_object_result
            .as_ref()
            .and_then(|r| r.e_tag.as_ref());
        self.notify(&bucket, &key, "Copy", etag)?;
        Ok(response)
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        check_key(&req.input.key)?;
        self.inner.create_multipart_upload(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let response = self.inner.complete_multipart_upload(req).await?;
        self.notify(&bucket, &key, "CompleteMultipartUpload", response.output.e_tag.as_ref())?;
        Ok(response)
    }
}

/// Serves HTTP/1.1 with `service` on every connection `listener` accepts, until the task is
/// dropped.
pub async fn serve<S, B>(listener: tokio::net::TcpListener, service: S)
where
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the server's port on loopback; 0 picks a free one.
pub async fn bind(port: u16) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let address = listener.local_addr()?;
    Ok((listener, address))
}
