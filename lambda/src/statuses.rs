//! The seam to the jobs' documents in S3: `status.json`, read to carry a job's history forward
//! and written when the launcher itself ends a job (a spot interruption on its last attempt, a
//! cancel, a reap); and the tails of its logs, for `s3spot jobs show`.

use std::future::Future;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use s3spot_bootstrap::Status;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read s3://{bucket}/{key}: {message}")]
    Read {
        bucket: String,
        key: String,
        message: String,
    },
    #[error("s3://{bucket}/{key} is not a status.json")]
    Invalid {
        bucket: String,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write s3://{bucket}/{key}: {message}")]
    Write {
        bucket: String,
        key: String,
        message: String,
    },
}

pub trait StatusStore: Send + Sync {
    /// The status at `key`, `None` if there is none yet.
    fn read(
        &self,
        bucket: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Status>, StatusError>> + Send;

    fn write(
        &self,
        bucket: &str,
        key: &str,
        status: &Status,
    ) -> impl Future<Output = Result<(), StatusError>> + Send;

    /// The last `bytes` of a text document (a log), lossily decoded; `None` if there is none.
    fn tail(
        &self,
        bucket: &str,
        key: &str,
        bytes: u64,
    ) -> impl Future<Output = Result<Option<String>, StatusError>> + Send;
}

macro_rules! delegate_status_store {
    ($($pointer:ty),*) => {$(
        impl<S: StatusStore + ?Sized> StatusStore for $pointer {
            fn read(
                &self,
                bucket: &str,
                key: &str,
            ) -> impl Future<Output = Result<Option<Status>, StatusError>> + Send {
                (**self).read(bucket, key)
            }

            fn write(
                &self,
                bucket: &str,
                key: &str,
                status: &Status,
            ) -> impl Future<Output = Result<(), StatusError>> + Send {
                (**self).write(bucket, key, status)
            }

            fn tail(
                &self,
                bucket: &str,
                key: &str,
                bytes: u64,
            ) -> impl Future<Output = Result<Option<String>, StatusError>> + Send {
                (**self).tail(bucket, key, bytes)
            }
        }
    )*};
}

delegate_status_store!(&S, std::sync::Arc<S>);

/// `status.json` in S3 (or any S3 API: the local mode's server, moto).
#[derive(Debug, Clone)]
pub struct S3Statuses {
    client: aws_sdk_s3::Client,
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
        S3Statuses { client }
    }
}

impl S3Statuses {
    /// An object's bytes, from byte `from` on; `None` if there is no such object.
    async fn get(
        &self,
        bucket: &str,
        key: &str,
        from: Option<u64>,
    ) -> Result<Option<Vec<u8>>, StatusError> {
        let read_error = |message: String| StatusError::Read {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            message,
        };
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
            Err(error) if is_not_found(&error) => return Ok(None),
            Err(error) => return Err(read_error(DisplayErrorContext(&error).to_string())),
        };
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| read_error(e.to_string()))?;
        Ok(Some(body.to_vec()))
    }
}

fn is_not_found<E: ProvideErrorMetadata>(
    error: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    error.code() == Some("NoSuchKey")
        || error.code() == Some("NotFound")
        || error.raw_response().map(|r| r.status().as_u16()) == Some(404)
}

impl StatusStore for S3Statuses {
    async fn read(&self, bucket: &str, key: &str) -> Result<Option<Status>, StatusError> {
        let Some(body) = self.get(bucket, key, None).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|source| StatusError::Invalid {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                source,
            })
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
            Err(error) if is_not_found(&error) => return Ok(None),
            Err(error) => {
                return Err(StatusError::Read {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                    message: DisplayErrorContext(&error).to_string(),
                });
            }
        };
        let size = head
            .content_length()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        let from = size.checked_sub(bytes).filter(|from| *from > 0);
        Ok(self
            .get(bucket, key, from)
            .await?
            .map(|body| String::from_utf8_lossy(&body).into_owned()))
    }

    async fn write(&self, bucket: &str, key: &str, status: &Status) -> Result<(), StatusError> {
        let json = serde_json::to_vec_pretty(status).expect("a Status always serializes");
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type("application/json")
            .body(ByteStream::from(json))
            .send()
            .await
            .map(|_| ())
            .map_err(|error| StatusError::Write {
                bucket: bucket.to_owned(),
                key: key.to_owned(),
                message: DisplayErrorContext(&error).to_string(),
            })
    }
}
