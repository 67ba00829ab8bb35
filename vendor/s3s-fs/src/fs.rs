use crate::error::*;
use crate::utils::hex;

use s3s::auth::Credentials;
use s3s::crypto::Checksum;
use s3s::crypto::Md5;
use s3s::dto;
use s3s::dto::PartNumber;

use std::env;
use std::ops::Not;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::fs;
use tokio::fs::File;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};

use path_absolutize::Absolutize;
use uuid::Uuid;

#[derive(Debug)]
pub struct FileSystem {
    pub(crate) root: PathBuf,
    tmp_file_counter: AtomicU64,
    /// S3SPOT-PATCH: conditional writes check their condition and write holding this lock, one
    /// at a time, as S3 does a conditional write: at once. GET and HEAD share it, so that an
    /// object's body and ETag are never read halfway through one.
    pub(crate) conditional: tokio::sync::RwLock<()>,
}

pub(crate) type InternalInfo = serde_json::Map<String, serde_json::Value>;

/// s3spot: which file an object's internal info was written for (see `load_internal_info`).
const FILE_STAMP: &str = "s3spot_file";

/// The object file's length and modification time, to the nanosecond.
fn file_stamp(metadata: &std::fs::Metadata) -> serde_json::Value {
    let modified = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    serde_json::json!([metadata.len(), modified.to_string()])
}

/// Stores standard object attributes alongside user metadata
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ObjectAttributes {
    /// User-defined metadata (x-amz-meta-*)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_metadata: Option<dto::Metadata>,

    /// Standard object attributes
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_encoding: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_disposition: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_language: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub website_redirect_location: Option<String>,
}

impl ObjectAttributes {
    /// Convert expires Timestamp to String for storage
    pub fn set_expires_timestamp(&mut self, expires: Option<dto::Timestamp>) {
        self.expires = expires.and_then(|ts| {
            let mut buf = Vec::new();
            match ts.format(dto::TimestampFormat::DateTime, &mut buf) {
                Ok(()) => Some(String::from_utf8_lossy(&buf).into_owned()),
                Err(_) => None,
            }
        });
    }

    /// Parse expires String back to Timestamp
    pub fn get_expires_timestamp(&self) -> Option<dto::Timestamp> {
        self.expires
            .as_ref()
            .and_then(|s| dto::Timestamp::parse(dto::TimestampFormat::DateTime, s).ok())
    }
}

fn clean_old_tmp_files(root: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => Ok(entries),
        Err(ref io_err) if io_err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(io_err) => Err(io_err),
    }?;
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        // See `FileSystem::prepare_file_write`
        if file_name.starts_with(".tmp.") && file_name.ends_with(".internal.part") {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

impl FileSystem {
    pub fn new(root: impl AsRef<Path>) -> Result<Self> {
        let root = env::current_dir()?.join(root).canonicalize()?;
        clean_old_tmp_files(&root)?;
        let tmp_file_counter = AtomicU64::new(0);
        Ok(Self {
            root,
            tmp_file_counter,
            conditional: tokio::sync::RwLock::new(()),
        })
    }

    pub(crate) fn resolve_abs_path(&self, path: impl AsRef<Path>) -> Result<PathBuf> {
        Ok(path.as_ref().absolutize_virtually(&self.root)?.into_owned())
    }

    pub(crate) fn resolve_upload_part_path(&self, upload_id: Uuid, part_number: PartNumber) -> Result<PathBuf> {
        self.resolve_abs_path(format!(".upload_id-{upload_id}.part-{part_number}"))
    }

    /// resolve object path under the virtual root
    pub(crate) fn get_object_path(&self, bucket: &str, key: &str) -> Result<PathBuf> {
        let dir = Path::new(&bucket);
        self.resolve_abs_path(dir.join(key_path(key)))
    }

    /// resolve bucket path under the virtual root
    pub(crate) fn get_bucket_path(&self, bucket: &str) -> Result<PathBuf> {
        let dir = Path::new(&bucket);
        self.resolve_abs_path(dir)
    }

    /// resolve metadata path under the virtual root (custom format)
    pub(crate) fn get_metadata_path(&self, bucket: &str, key: &str, upload_id: Option<Uuid>) -> Result<PathBuf> {
        let u_ext = upload_id.map(|u| format!(".upload-{u}")).unwrap_or_default();
        let file_path = format!("{}{u_ext}.metadata.json", object_file_stem(bucket, key));
        self.resolve_abs_path(file_path)
    }

    /// S3SPOT-PATCH: where a bucket's notification configuration is kept, beside the objects'
    /// metadata files.
    pub(crate) fn get_notification_path(&self, bucket: &str) -> Result<PathBuf> {
        let encoded = base64_simd::URL_SAFE_NO_PAD.encode_to_string(bucket);
        self.resolve_abs_path(format!(".bucket-{encoded}.notification.json"))
    }

    pub(crate) fn get_internal_info_path(&self, bucket: &str, key: &str) -> Result<PathBuf> {
        let file_path = format!("{}.internal.json", object_file_stem(bucket, key));
        self.resolve_abs_path(file_path)
    }

    /// load object attributes from fs (with backward compatibility)
    pub(crate) async fn load_object_attributes(
        &self,
        bucket: &str,
        key: &str,
        upload_id: Option<Uuid>,
    ) -> Result<Option<ObjectAttributes>> {
        let path = self.get_metadata_path(bucket, key, upload_id)?;
        if path.exists().not() {
            return Ok(None);
        }
        let content = fs::read(&path).await?;

        // Try to deserialize as ObjectAttributes first (new format)
        if let Ok(attrs) = serde_json::from_slice::<ObjectAttributes>(&content) {
            return Ok(Some(attrs));
        }

        // Fall back to old format (just user metadata)
        if let Ok(user_metadata) = serde_json::from_slice::<dto::Metadata>(&content) {
            return Ok(Some(ObjectAttributes {
                user_metadata: Some(user_metadata),
                ..Default::default()
            }));
        }

        Ok(None)
    }

    /// save object attributes to fs
    pub(crate) async fn save_object_attributes(
        &self,
        bucket: &str,
        key: &str,
        attrs: &ObjectAttributes,
        upload_id: Option<Uuid>,
    ) -> Result<()> {
        let path = self.get_metadata_path(bucket, key, upload_id)?;
        let content = serde_json::to_vec(attrs)?;
        let mut file_writer = self.prepare_file_write(&path).await?;
        file_writer.writer().write_all(&content).await?;
        file_writer.writer().flush().await?;
        file_writer.done().await?;
        Ok(())
    }

    /// remove metadata from fs
    pub(crate) fn delete_metadata(&self, bucket: &str, key: &str, upload_id: Option<Uuid>) -> Result<()> {
        let path = self.get_metadata_path(bucket, key, upload_id)?;
        std::fs::remove_file(path)?;
        Ok(())
    }

    pub(crate) async fn load_internal_info(&self, bucket: &str, key: &str) -> Result<Option<InternalInfo>> {
        let path = self.get_internal_info_path(bucket, key)?;
        if path.exists().not() {
            return Ok(None);
        }
        let content = fs::read(&path).await?;
        let map: InternalInfo = serde_json::from_slice(&content)?;
        // s3spot: the object's file is renamed into place before its internal info is written;
        // a process killed in between leaves the last write's ETag and checksum beside the new
        // body. Info that names another file than the one there is no info: the ETag is then
        // computed from the file, and no checksum is claimed.
        if let Some(stamp) = map.get(FILE_STAMP) {
            let object_path = self.get_object_path(bucket, key)?;
            let current = fs::metadata(&object_path).await.ok().map(|m| file_stamp(&m));
            if current.as_ref() != Some(stamp) {
                return Ok(None);
            }
        }
        Ok(Some(map))
    }

    pub(crate) async fn save_internal_info(&self, bucket: &str, key: &str, info: &InternalInfo) -> Result<()> {
        let path = self.get_internal_info_path(bucket, key)?;
        let mut info = info.clone();
        if let Ok(metadata) = fs::metadata(self.get_object_path(bucket, key)?).await {
            info.insert(FILE_STAMP.to_owned(), file_stamp(&metadata));
        }
        let content = serde_json::to_vec(&info)?;
        let mut file_writer = self.prepare_file_write(&path).await?;
        file_writer.writer().write_all(&content).await?;
        file_writer.writer().flush().await?;
        file_writer.done().await?;
        Ok(())
    }

    /// get md5 sum
    pub(crate) async fn get_md5_sum(&self, bucket: &str, key: &str) -> Result<String> {
        let object_path = self.get_object_path(bucket, key)?;
        let mut file = File::open(&object_path).await?;
        let mut buf = vec![0; 65536];
        let mut md5_hash = Md5::new();
        loop {
            let nread = file.read(&mut buf).await?;
            if nread == 0 {
                break;
            }
            md5_hash.update(&buf[..nread]);
        }
        Ok(hex(md5_hash.finalize()))
    }

    fn get_upload_info_path(&self, upload_id: &Uuid) -> Result<PathBuf> {
        self.resolve_abs_path(format!(".upload-{upload_id}.json"))
    }

    pub(crate) async fn create_upload_id(&self, cred: Option<&Credentials>) -> Result<Uuid> {
        let upload_id = Uuid::new_v4();
        let upload_info_path = self.get_upload_info_path(&upload_id)?;

        let ak: Option<&str> = cred.map(|c| c.access_key.as_str());

        let content = serde_json::to_vec(&ak)?;
        let mut file_writer = self.prepare_file_write(&upload_info_path).await?;
        file_writer.writer().write_all(&content).await?;
        file_writer.writer().flush().await?;
        file_writer.done().await?;

        Ok(upload_id)
    }

    pub(crate) async fn verify_upload_id(&self, cred: Option<&Credentials>, upload_id: &Uuid) -> Result<bool> {
        let upload_info_path = self.get_upload_info_path(upload_id)?;
        if upload_info_path.exists().not() {
            return Ok(false);
        }

        let content = fs::read(&upload_info_path).await?;
        let ak: Option<String> = serde_json::from_slice(&content)?;

        Ok(ak.as_deref() == cred.map(|c| c.access_key.as_str()))
    }

    pub(crate) async fn delete_upload_id(&self, upload_id: &Uuid) -> Result<()> {
        let upload_info_path = self.get_upload_info_path(upload_id)?;
        if upload_info_path.exists() {
            fs::remove_file(&upload_info_path).await?;
        }
        Ok(())
    }

    /// Write to the filesystem atomically.
    /// This is done by first writing to a temporary location and then moving the file.
    pub(crate) async fn prepare_file_write<'a>(&self, path: &'a Path) -> Result<FileWriter<'a>> {
        let tmp_name = format!(".tmp.{}.internal.part", self.tmp_file_counter.fetch_add(1, Ordering::SeqCst));
        let tmp_path = self.resolve_abs_path(tmp_name)?;
        let file = File::create(&tmp_path).await?;
        let writer = BufWriter::new(file);
        Ok(FileWriter {
            tmp_path,
            dest_path: path,
            writer,
            clean_tmp: true,
        })
    }
}

pub(crate) struct FileWriter<'a> {
    tmp_path: PathBuf,
    dest_path: &'a Path,
    writer: BufWriter<File>,
    clean_tmp: bool,
}

impl<'a> FileWriter<'a> {
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    pub(crate) fn dest_path(&self) -> &'a Path {
        self.dest_path
    }

    pub(crate) fn writer(&mut self) -> &mut BufWriter<File> {
        &mut self.writer
    }

    pub(crate) async fn done(mut self) -> Result<()> {
        if let Some(final_dir_path) = self.dest_path().parent() {
            fs::create_dir_all(&final_dir_path).await?;
        }

        fs::rename(&self.tmp_path, self.dest_path()).await?;
        self.clean_tmp = false;
        Ok(())
    }
}

impl Drop for FileWriter<'_> {
    fn drop(&mut self) {
        if self.clean_tmp {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// s3spot patch: the start of the names of an object's metadata files.
///
/// Upstream names them after base64 of the bucket and the key, in a single file name. A file
/// name holds 255 bytes and an S3 key 1,024, so every key longer than about 165 bytes failed with
/// `InternalError` (ENAMETOOLONG). Names that would not leave room for the longest suffix
/// (`.upload-<uuid>.metadata.json`) use the key's sha256 instead; shorter ones are unchanged.
fn object_file_stem(bucket: &str, key: &str) -> String {
    const MAX_STEM: usize = 255 - ".upload-00000000-0000-0000-0000-000000000000.metadata.json".len();
    let encode = |s: &str| base64_simd::URL_SAFE_NO_PAD.encode_to_string(s);
    let stem = format!(".bucket-{}.object-{}", encode(bucket), encode(key));
    if stem.len() <= MAX_STEM {
        return stem;
    }
    let mut digest = s3s::crypto::Sha256::new();
    digest.update(key.as_bytes());
    format!(".bucket-{}.object-sha256-{}", encode(bucket), hex(digest.finalize()))
}

/// s3spot patch: keys are literal.
///
/// Upstream joined the key to the bucket's directory as a path, so `..`, `.`, empty segments
/// and a leading `/` were read as path syntax: `../artifacts/evil` in bucket `data` was stored
/// in bucket `artifacts`, and `a//b` was the same object as `a/b`. Each `/`-separated segment
/// is now one path component, taken literally: a segment that a file system would not take
/// literally (`""`, `.`, `..`), and one that starts with the escape character `%`, is stored as
/// `%` followed by the segment with `%` written `%25` and `.` written `%2E`. A key's trailing
/// `/` (a folder marker) keeps upstream's meaning, the directory itself. Keys without such
/// segments are stored exactly as before.
pub fn key_path(key: &str) -> PathBuf {
    let segments: Vec<&str> = key.split('/').collect();
    let last = segments.len() - 1;
    let mut path = PathBuf::new();
    for (i, segment) in segments.iter().enumerate() {
        if i == last && segment.is_empty() && i > 0 {
            // "a/": the directory "a" itself.
            path.push("");
        } else if segment.is_empty() || *segment == "." || *segment == ".." || segment.starts_with('%') {
            path.push(format!("%{}", segment.replace('%', "%25").replace('.', "%2E")));
        } else {
            path.push(segment);
        }
    }
    path
}

/// s3spot patch: the key stored at `path` (relative to its bucket's directory, components
/// joined with `/`), the inverse of [`key_path`]; `None` for what no key maps to.
pub(crate) fn path_key(path: &str) -> Option<String> {
    let segments: Option<Vec<String>> = path
        .split('/')
        .map(|segment| match segment.strip_prefix('%') {
            Some(escaped) => {
                let mut literal = String::with_capacity(escaped.len());
                let mut rest = escaped;
                while let Some(at) = rest.find('%') {
                    literal.push_str(&rest[..at]);
                    match rest.get(at..at + 3) {
                        Some("%25") => literal.push('%'),
                        Some("%2E") => literal.push('.'),
                        _ => return None,
                    }
                    rest = &rest[at + 3..];
                }
                literal.push_str(rest);
                Some(literal)
            }
            None => Some(segment.to_owned()),
        })
        .collect();
    Some(segments?.join("/"))
}
