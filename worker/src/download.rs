//! Downloading the job's object to disk, hashing it on the way, in bounded memory.
//!
//! Large objects come in as parallel ranged GETs. Each range streams its pieces, as the HTTP
//! client reads them, through a short channel to a writer thread, which writes each at its
//! offset and hashes the file in order behind them. Nothing waits for a whole range to arrive,
//! so ranges can be large and many without costing memory, and a slow range holds up neither
//! the others nor the disk.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use s3spot_bootstrap::JobSpec;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

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
    #[error(
        "the object is {} but {} has {} free: give the instances a bigger volume (the launch \
         template's), or point --work-dir at one",
        gib(*size),
        dir.display(),
        gib(*available)
    )]
    NoSpace {
        size: u64,
        dir: PathBuf,
        available: u64,
    },
    #[error("cannot write the object to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Bytes as people read them: "7.3 GiB", "512 KiB".
fn gib(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Fails before any byte is fetched when the object cannot fit where it goes: otherwise the
/// download would fill the disk, and the job fail late with a write error.
fn check_space(dest: &Path, size: u64) -> Result<(), DownloadError> {
    let dir = dest.parent().unwrap_or(dest);
    let stats = nix::sys::statvfs::statvfs(dir).map_err(|errno| DownloadError::Write {
        path: dir.to_path_buf(),
        source: std::io::Error::from(errno),
    })?;
    let available = stats
        .blocks_available()
        .saturating_mul(stats.fragment_size());
    if size > available {
        return Err(DownloadError::NoSpace {
            size,
            dir: dir.to_path_buf(),
            available,
        });
    }
    Ok(())
}

fn version_suffix(version_id: &Option<String>) -> String {
    version_id
        .as_ref()
        .map(|v| format!(" (version {v})"))
        .unwrap_or_default()
}

/// A version id that names one upload. With versioning suspended S3 reports "null": every new
/// upload of the key replaces that version, so it pins nothing.
fn real_version(version_id: Option<&str>) -> Option<String> {
    version_id
        .filter(|v| !v.is_empty() && *v != "null")
        .map(str::to_owned)
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
    let job_version = real_version(job.version_id.as_deref());
    let head = s3
        .head_object()
        .bucket(&job.bucket)
        .key(&job.key)
        .set_version_id(job_version.clone())
        .send()
        .await
        .map_err(|e| s3_error("HeadObject", e, not_found))?;
    let size = u64::try_from(head.content_length().unwrap_or_default()).unwrap_or_default();
    let etag = head.e_tag().map(|e| bare_etag(e).to_owned());
    // Without a version id, an unversioned key may have been overwritten since the event. Its
    // ETag tells; processing the newer content would attribute it to the wrong upload.
    if job_version.is_none()
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
    let version_id = real_version(head.version_id()).or(job_version);
    let source = Source {
        s3,
        job,
        if_match: version_id.is_none().then(|| etag.clone()).flatten(),
        version_id: version_id.clone(),
    };

    check_space(dest, size)?;
    let (pieces, writer) = spawn_writer(dest.to_path_buf());
    let fetched = fetch(&source, size, settings, &pieces).await;
    drop(pieces);
    let written = writer.await.expect("the writer thread does not panic");
    // A write error stops the writer, which makes the fetch fail too: report the cause.
    let written = written?;
    fetched?;
    if written.bytes != size || written.hashed != size {
        return Err(DownloadError::Short {
            got: written.hashed.min(written.bytes),
            expected: size,
        });
    }
    Ok(Downloaded {
        path: dest.to_path_buf(),
        size,
        sha256: written.sha256,
        etag,
        version_id,
        content_type: head.content_type().map(str::to_owned),
    })
}

type Writer = tokio::task::JoinHandle<Result<Written, DownloadError>>;

/// What the writer thread wrote and hashed.
struct Written {
    bytes: u64,
    hashed: u64,
    sha256: String,
}

/// Bytes of the object and where they go in it.
struct Piece {
    offset: u64,
    bytes: Bytes,
}

/// Pieces between the downloads and the writer. With hyper's reads of at most a few hundred KiB,
/// this bounds the memory a download holds, whatever the object's size or the number of ranges.
const PIECES_QUEUED: usize = 32;

/// A blocking thread that writes each piece at its offset as it arrives, and hashes the file in
/// order behind them: a piece that continues the hashed prefix is hashed from memory, and what
/// arrived ahead of it (later ranges) is read back from the page cache once the gap closes.
fn spawn_writer(path: PathBuf) -> (mpsc::Sender<Piece>, Writer) {
    let (sender, mut receiver) = mpsc::channel::<Piece>(PIECES_QUEUED);
    let writer = tokio::task::spawn_blocking(move || {
        let write_error = |source| DownloadError::Write {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(write_error)?;
        let mut hash = InOrderHash::default();
        let mut bytes = 0u64;
        while let Some(piece) = receiver.blocking_recv() {
            file.write_all_at(&piece.bytes, piece.offset)
                .map_err(write_error)?;
            bytes += piece.bytes.len() as u64;
            hash.add(&file, piece).map_err(write_error)?;
        }
        Ok(Written {
            bytes,
            hashed: hash.hashed,
            sha256: hex::encode(hash.hasher.finalize()),
        })
    });
    (sender, writer)
}

/// SHA-256 of the file's prefix that has no gaps yet.
#[derive(Default)]
struct InOrderHash {
    hasher: Sha256,
    hashed: u64,
    /// Written but not yet hashed: start → end, for runs that began past the hashed prefix.
    ahead: BTreeMap<u64, u64>,
    read_back: Vec<u8>,
}

impl InOrderHash {
    /// Takes a piece that has just been written to `file`.
    fn add(&mut self, file: &File, piece: Piece) -> std::io::Result<()> {
        let end = piece.offset + piece.bytes.len() as u64;
        if piece.offset != self.hashed {
            // Pieces of one range come in order, so a piece usually extends a run.
            match self.ahead.range_mut(..piece.offset).next_back() {
                Some((_, run_end)) if *run_end == piece.offset => *run_end = end,
                _ => {
                    self.ahead.insert(piece.offset, end);
                }
            }
            return Ok(());
        }
        self.hasher.update(&piece.bytes);
        self.hashed = end;
        while let Some(run_end) = self.ahead.remove(&self.hashed) {
            self.hash_from(file, run_end)?;
        }
        Ok(())
    }

    /// Hashes `[hashed, end)` as written to `file`.
    fn hash_from(&mut self, file: &File, end: u64) -> std::io::Result<()> {
        const BLOCK: u64 = 1024 * 1024;
        if self.read_back.is_empty() {
            self.read_back = vec![0; BLOCK as usize];
        }
        while self.hashed < end {
            let n = (end - self.hashed).min(BLOCK) as usize;
            let block = &mut self.read_back[..n];
            file.read_exact_at(block, self.hashed)?;
            self.hasher.update(&*block);
            self.hashed += n as u64;
        }
        Ok(())
    }
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

    /// Sends `[start, end)` to the writer as it arrives: with a Range header unless it is the
    /// whole object.
    async fn fetch(
        &self,
        (start, end): (u64, u64),
        whole: bool,
        pieces: &mpsc::Sender<Piece>,
    ) -> Result<(), DownloadError> {
        let mut body = self.get((!whole).then_some((start, end))).await?;
        let mut offset = start;
        while let Some(bytes) = body.try_next().await.map_err(|e| DownloadError::S3 {
            operation: "GetObject",
            message: format!("reading the body: {}", DisplayErrorContext(&e)),
        })? {
            let piece_end = offset + bytes.len() as u64;
            // Past the end would overwrite the next range: the object is not what HEAD said.
            if piece_end > end {
                return Err(DownloadError::S3 {
                    operation: "GetObject",
                    message: format!(
                        "the server sent more than bytes {start}-{}; the object changed while \
                         it was being downloaded",
                        end - 1
                    ),
                });
            }
            if pieces.send(Piece { offset, bytes }).await.is_err() {
                break; // The writer stopped; its error is the one to report.
            }
            offset = piece_end;
        }
        Ok(())
    }
}

/// The whole object in one GET, or, above `ranged_above`, in ranges of `chunk_size` of which
/// `concurrency` are in flight at once.
async fn fetch(
    source: &Source<'_>,
    size: u64,
    settings: &DownloadSettings,
    pieces: &mpsc::Sender<Piece>,
) -> Result<(), DownloadError> {
    if size <= settings.ranged_above {
        return source.fetch((0, size), true, pieces).await;
    }
    let chunk_size = settings.chunk_size.max(1);
    let ranges = (0..size)
        .step_by(usize::try_from(chunk_size).unwrap_or(usize::MAX))
        .map(|start| (start, (start + chunk_size).min(size)));
    futures_util::stream::iter(ranges)
        .map(|range| source.fetch(range, false, pieces))
        .buffer_unordered(settings.concurrency.max(1))
        .try_collect()
        .await
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

    /// Writes `object` as `ranges` ranges arriving interleaved in `order` (a range's pieces in
    /// order, as HTTP delivers them), and returns the hash and what is still unhashed.
    fn hash_interleaved(object: &[u8], piece: usize, order: &[usize]) -> (String, u64, usize) {
        let file = tempfile::tempfile().unwrap();
        let range = object.len().div_ceil(order.iter().max().unwrap() + 1);
        let mut next: Vec<usize> = (0..object.len()).step_by(range).collect();
        let mut hash = InOrderHash::default();
        for &r in order {
            let start = next[r];
            let end = (start + piece).min((r + 1) * range).min(object.len());
            next[r] = end;
            file.write_all_at(&object[start..end], start as u64)
                .unwrap();
            let bytes = Bytes::copy_from_slice(&object[start..end]);
            let offset = start as u64;
            hash.add(&file, Piece { offset, bytes }).unwrap();
        }
        let left = hash.ahead.len();
        (hex::encode(hash.hasher.finalize()), hash.hashed, left)
    }

    #[test]
    fn ranges_that_arrive_out_of_order_hash_as_the_object() {
        let object: Vec<u8> = (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let expected = hex::encode(Sha256::digest(&object));
        // Three ranges of 1000 bytes in pieces of 300 (4 each): the last range first, then the
        // middle one, then the first; and a mix of all three.
        let backwards = [2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0];
        let mixed = [1, 0, 2, 1, 2, 0, 0, 1, 2, 2, 1, 0];
        for order in [&backwards, &mixed] {
            assert_eq!(
                hash_interleaved(&object, 300, order),
                (expected.clone(), 3000, 0),
                "{order:?}"
            );
        }
    }

    #[test]
    fn a_gap_keeps_what_follows_it_unhashed() {
        let object = vec![7u8; 3000];
        // The first range never arrives.
        let (_, hashed, left) = hash_interleaved(&object, 500, &[1, 2, 1, 2]);
        assert_eq!((hashed, left), (0, 2), "runs 1000..2000 and 2000..3000");
    }

    #[test]
    fn etags_compare_without_quotes() {
        assert_eq!(bare_etag("\"abc\""), "abc");
        assert_eq!(bare_etag("abc-3"), "abc-3");
    }
}
