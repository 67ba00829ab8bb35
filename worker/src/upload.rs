//! Uploading results under the job's results prefix.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::settings::UploadSettings;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot upload {path} to s3://{bucket}/{key}: {message}")]
    Put {
        path: String,
        bucket: String,
        key: String,
        message: String,
    },
    #[error("cannot read the output directory {path}")]
    Walk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes files under `s3://<bucket>/<prefix>`.
pub struct Uploader<'a> {
    pub s3: &'a Client,
    pub bucket: &'a str,
    /// `<results prefix><key>/<upload>/`.
    pub prefix: String,
    pub settings: UploadSettings,
    /// Multipart uploads begun and not yet completed or aborted: (key, upload id). An upload
    /// stopped halfway (at a deadline) leaves its entry here for [`Uploader::abort_unfinished`].
    unfinished: Mutex<Vec<(String, String)>>,
}

/// How long aborting the unfinished multipart uploads may take: the time is status.json's.
const ABORT_TIME: Duration = Duration::from_secs(5);

impl<'a> Uploader<'a> {
    pub fn new(s3: &'a Client, bucket: &'a str, prefix: String, settings: UploadSettings) -> Self {
        Uploader {
            s3,
            bucket,
            prefix,
            settings,
            unfinished: Mutex::default(),
        }
    }

    /// Aborts the multipart uploads that were stopped halfway: an incomplete one would be
    /// stored, and billed, until the bucket's lifecycle rule removes it.
    pub async fn abort_unfinished(&self) {
        let unfinished = std::mem::take(&mut *self.unfinished.lock().expect("not poisoned"));
        let aborts = unfinished
            .iter()
            .map(|(key, upload_id)| self.abort(key, upload_id));
        if tokio::time::timeout(ABORT_TIME, futures_util::future::join_all(aborts))
            .await
            .is_err()
        {
            tracing::warn!("unfinished multipart uploads were not all aborted in time");
        }
    }

    async fn abort(&self, key: &str, upload_id: &str) {
        if let Err(abort) = self
            .s3
            .abort_multipart_upload()
            .bucket(self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            tracing::error!(key = ?key, error = crate::sdk_message(&abort), "cannot abort the multipart upload");
        }
    }

    pub fn key_for(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Uploads one file as `<prefix><name>`, with a content type from its name. Returns the key.
    pub async fn file(&self, path: &Path, name: &str) -> Result<String, UploadError> {
        let key = self.key_for(name);
        let fail = |message: String| UploadError::Put {
            path: path.display().to_string(),
            bucket: self.bucket.to_owned(),
            key: key.clone(),
            message,
        };
        let size = tokio::fs::metadata(path)
            .await
            .map_err(|e| fail(e.to_string()))?
            .len();
        let content_type = mime_guess::from_path(name)
            .first_raw()
            .unwrap_or("application/octet-stream");
        if size > self.settings.multipart_above {
            self.multipart(path, &key, size, content_type)
                .await
                .map_err(fail)?;
        } else {
            let body = ByteStream::from_path(path)
                .await
                .map_err(|e| fail(e.to_string()))?;
            self.s3
                .put_object()
                .bucket(self.bucket)
                .key(&key)
                .content_type(content_type)
                .body(body)
                .send()
                .await
                .map_err(|e| fail(crate::sdk_message(&e)))?;
        }
        tracing::info!(key = ?key, size, "uploaded");
        Ok(key)
    }

    /// Uploads bytes (status.json) as `<prefix><name>`.
    pub async fn bytes(
        &self,
        bytes: Vec<u8>,
        name: &str,
        content_type: &str,
    ) -> Result<String, UploadError> {
        let key = self.key_for(name);
        self.s3
            .put_object()
            .bucket(self.bucket)
            .key(&key)
            .content_type(content_type)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|e| UploadError::Put {
                path: name.to_owned(),
                bucket: self.bucket.to_owned(),
                key: key.clone(),
                message: crate::sdk_message(&e),
            })?;
        Ok(key)
    }

    /// Parts are read from the file as they are sent, so memory stays at a few parts whatever
    /// the size. A failed upload is aborted: an incomplete one would be stored, and billed.
    async fn multipart(
        &self,
        path: &Path,
        key: &str,
        size: u64,
        content_type: &str,
    ) -> Result<(), String> {
        let created = self
            .s3
            .create_multipart_upload()
            .bucket(self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| crate::sdk_message(&e))?;
        let upload_id = created
            .upload_id()
            .ok_or("CreateMultipartUpload returned no upload id")?
            .to_owned();
        let entry = (key.to_owned(), upload_id.clone());
        self.unfinished
            .lock()
            .expect("not poisoned")
            .push(entry.clone());
        let part_size = self.settings.part_size.max(5 * 1024 * 1024);
        let parts = (0..size.div_ceil(part_size)).map(|index| {
            let offset = index * part_size;
            (index + 1, offset, part_size.min(size - offset))
        });
        let uploaded: Result<Vec<CompletedPart>, String> = futures_util::stream::iter(parts)
            .map(|(number, offset, length)| {
                let upload_id = &upload_id;
                async move {
                    let number = i32::try_from(number).map_err(|_| "too many parts".to_owned())?;
                    let body = ByteStream::read_from()
                        .path(path)
                        .offset(offset)
                        .length(Length::Exact(length))
                        .build()
                        .await
                        .map_err(|e| e.to_string())?;
                    let part = self
                        .s3
                        .upload_part()
                        .bucket(self.bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| format!("part {number}: {}", crate::sdk_message(&e)))?;
                    Ok(CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(part.e_tag().map(str::to_owned))
                        .build())
                }
            })
            .buffered(self.settings.concurrency.max(1))
            .try_collect()
            .await;
        let completed = match uploaded {
            Ok(parts) => self
                .s3
                .complete_multipart_upload()
                .bucket(self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| crate::sdk_message(&e)),
            Err(error) => Err(error),
        };
        if let Err(error) = &completed {
            tracing::warn!(key = ?key, error, "multipart upload failed; aborting it");
            self.abort(key, &upload_id).await;
        }
        self.unfinished
            .lock()
            .expect("not poisoned")
            .retain(|open| *open != entry);
        completed
    }
}

/// The regular files under `dir`, as (path, name relative to `dir` with '/' separators), in a
/// stable order. Symbolic links and special files are left out: a command must not be able to
/// publish, say, `/etc/shadow` by linking to it. With `owner`, so are files that user does not
/// own: a command run as that user could otherwise hard-link, or swap in a directory of, files
/// it may not read, for the worker (root) to publish.
pub fn files_under(dir: &Path, owner: Option<u32>) -> Result<Vec<(PathBuf, String)>, UploadError> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        let walk_error = |source| UploadError::Walk {
            path: current.clone(),
            source,
        };
        let mut entries: Vec<_> = std::fs::read_dir(&current)
            .map_err(walk_error)?
            .collect::<Result<_, _>>()
            .map_err(walk_error)?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for entry in entries {
            let kind = entry.file_type().map_err(walk_error)?;
            let path = entry.path();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                if let Some(owner) = owner {
                    let uid = entry.metadata().map_err(walk_error)?.uid();
                    if uid != owner {
                        tracing::warn!(
                            path = %path.display(),
                            uid,
                            "not the command's own file; not uploaded"
                        );
                        continue;
                    }
                }
                let name = path
                    .strip_prefix(dir)
                    .expect("entries are under dir")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                found.push((path, name));
            } else {
                tracing::warn!(path = %path.display(), "not a regular file; not uploaded");
            }
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_listed_with_relative_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
        std::fs::write(dir.path().join("b.txt"), "b").unwrap();
        std::fs::write(dir.path().join("sub/a.csv"), "a").unwrap();
        std::fs::write(dir.path().join("sub/deeper/c.json"), "c").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("sub"), dir.path().join("dirlink")).unwrap();
        let names: Vec<String> = files_under(dir.path(), None)
            .unwrap()
            .into_iter()
            .map(|(_, name)| name)
            .collect();
        assert_eq!(names, ["b.txt", "sub/a.csv", "sub/deeper/c.json"]);
    }
}
