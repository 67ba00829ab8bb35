//! The built-in analysis: what a job does when no command is configured. One streaming pass in
//! fixed-size buffers, then a CSV/TSV pass for tables.

use std::io::Read as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub size: u64,
    pub sha256: String,
    /// Newline-terminated lines, plus a last line without one.
    pub lines: u64,
    /// Whether the whole content is valid UTF-8.
    pub utf8: bool,
    /// Sniffed from the content first (magic numbers, then text or not), then the key's extension.
    pub content_type: String,
    /// For CSV and TSV content.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<Table>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub delimiter: String,
    pub columns: Vec<String>,
    /// Records after the header.
    pub rows: u64,
    /// Set when the table could not be read to the end; `rows` counts up to there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

const BUFFER: usize = 256 * 1024;
/// What content sniffing looks at.
const SNIFF: usize = 8 * 1024;

/// Analyses the file at `path`, whose S3 key is `key` (for its extension) and whose sha256 is
/// already known from the download.
pub fn analyse(path: &Path, key: &str, sha256: &str) -> std::io::Result<Report> {
    let mut file = std::fs::File::open(path)?;
    let mut head = Vec::with_capacity(SNIFF);
    let mut utf8 = Utf8Check::default();
    let (mut size, mut newlines, mut last) = (0u64, 0u64, None);
    // Room in front for the bytes of a UTF-8 sequence split across reads.
    let mut buffer = vec![0u8; BUFFER + 3];
    loop {
        let carried = utf8.carry.len();
        buffer[..carried].copy_from_slice(&utf8.carry);
        let n = file.read(&mut buffer[carried..])?;
        if n == 0 {
            break;
        }
        let read = &buffer[carried..carried + n];
        if head.len() < SNIFF {
            let take = (SNIFF - head.len()).min(n);
            head.extend_from_slice(&read[..take]);
        }
        size += n as u64;
        newlines += read.iter().filter(|&&b| b == b'\n').count() as u64;
        last = read.last().copied();
        utf8.feed(&buffer[..carried + n]);
    }
    let utf8 = utf8.finish();
    let lines = newlines + u64::from(last.is_some_and(|b| b != b'\n'));
    let content_type = sniff(&head, utf8, key);
    let table = delimiter_for(&content_type).map(|delimiter| read_table(path, delimiter));
    Ok(Report {
        size,
        sha256: sha256.to_owned(),
        lines,
        utf8,
        content_type,
        table,
    })
}

/// UTF-8 validation over a stream: a sequence cut by the end of one read is completed by the
/// next.
#[derive(Default)]
struct Utf8Check {
    carry: Vec<u8>,
    invalid: bool,
}

impl Utf8Check {
    fn feed(&mut self, bytes: &[u8]) {
        self.carry.clear();
        if self.invalid {
            return;
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => {}
            // An incomplete sequence at the very end: wait for the rest.
            Err(error) if error.error_len().is_none() => {
                self.carry.extend_from_slice(&bytes[error.valid_up_to()..]);
            }
            Err(_) => self.invalid = true,
        }
    }

    fn finish(self) -> bool {
        !self.invalid && self.carry.is_empty()
    }
}

const TEXT_TYPES: &[&str] = &[
    "application/json",
    "application/xml",
    "application/javascript",
    "application/x-yaml",
    "application/toml",
];

fn sniff(head: &[u8], utf8: bool, key: &str) -> String {
    if let Some(kind) = infer::get(head) {
        return kind.mime_type().to_owned();
    }
    let by_extension = mime_guess::from_path(key).first_raw();
    let textual = |mime: &str| mime.starts_with("text/") || TEXT_TYPES.contains(&mime);
    match (utf8, by_extension) {
        (true, Some(mime)) if textual(mime) => mime.to_owned(),
        (true, _) => {
            let start = head.iter().find(|b| !b.is_ascii_whitespace());
            if matches!(start, Some(b'{' | b'[')) {
                "application/json".to_owned()
            } else {
                "text/plain".to_owned()
            }
        }
        (false, Some(mime)) => mime.to_owned(),
        (false, None) => "application/octet-stream".to_owned(),
    }
}

fn delimiter_for(content_type: &str) -> Option<u8> {
    match content_type {
        "text/csv" => Some(b','),
        "text/tab-separated-values" => Some(b'\t'),
        _ => None,
    }
}

fn read_table(path: &Path, delimiter: u8) -> Table {
    let mut table = Table {
        delimiter: char::from(delimiter).to_string(),
        columns: Vec::new(),
        rows: 0,
        error: None,
    };
    let reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(true)
        .from_path(path);
    let mut reader = match reader {
        Ok(reader) => reader,
        Err(error) => {
            table.error = Some(error.to_string());
            return table;
        }
    };
    match reader.byte_headers() {
        Ok(headers) => {
            table.columns = headers
                .iter()
                .map(|h| String::from_utf8_lossy(h).into_owned())
                .collect();
        }
        Err(error) => {
            table.error = Some(error.to_string());
            return table;
        }
    }
    let mut record = csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => table.rows += 1,
            Ok(false) => break,
            Err(error) => {
                table.error = Some(error.to_string());
                break;
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyse_bytes(bytes: &[u8], key: &str) -> Report {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input");
        std::fs::write(&path, bytes).unwrap();
        analyse(&path, key, "00").unwrap()
    }

    #[test]
    fn csv_header_columns_and_rows() {
        let report = analyse_bytes(
            b"id,name,note\n1,ada,\"multi\nline\"\n2,bob,plain\n",
            "in/people.csv",
        );
        assert_eq!(report.content_type, "text/csv");
        assert!(report.utf8);
        assert_eq!(report.lines, 4);
        let table = report.table.unwrap();
        assert_eq!(table.columns, ["id", "name", "note"]);
        assert_eq!(table.rows, 2, "a quoted newline is inside one row");
        assert_eq!(table.delimiter, ",");
        assert_eq!(table.error, None);
    }

    #[test]
    fn tsv_by_extension() {
        let report = analyse_bytes(b"a\tb\n1\t2", "x.tsv");
        assert_eq!(report.content_type, "text/tab-separated-values");
        assert_eq!(report.lines, 2, "the last line has no newline");
        let table = report.table.unwrap();
        assert_eq!(
            (table.columns.len(), table.rows, table.delimiter.as_str()),
            (2, 1, "\t")
        );
    }

    #[test]
    fn binary_content_is_sniffed_by_its_magic_number() {
        let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\xff\xfe";
        let report = analyse_bytes(png, "upload.csv");
        assert_eq!(
            report.content_type, "image/png",
            "content wins over the extension"
        );
        assert!(!report.utf8);
        assert_eq!(report.table, None);
    }

    #[test]
    fn text_without_a_known_extension() {
        assert_eq!(
            analyse_bytes(b"  {\"a\": 1}", "data").content_type,
            "application/json"
        );
        assert_eq!(
            analyse_bytes(b"hello\n", "notes").content_type,
            "text/plain"
        );
        assert_eq!(
            analyse_bytes(b"\xff\xfe\x00", "blob").content_type,
            "application/octet-stream"
        );
        let empty = analyse_bytes(b"", "empty.txt");
        assert_eq!((empty.lines, empty.utf8, empty.size), (0, true, 0));
    }

    #[test]
    fn utf8_is_checked_across_read_boundaries() {
        // "é" (2 bytes) and "名" (3 bytes) straddle the 256 KiB read boundary.
        for offset in 1..=3 {
            let mut text = vec![b'a'; BUFFER - offset];
            text.extend("é名前".as_bytes());
            text.extend(vec![b'b'; 10]);
            assert!(analyse_bytes(&text, "t.txt").utf8, "offset {offset}");
        }
        let mut broken = vec![b'a'; BUFFER - 1];
        broken.extend(b"\xc3"); // a sequence that never ends
        assert!(!analyse_bytes(&broken, "t.txt").utf8);
        let mut bad = "ok".repeat(10).into_bytes();
        bad.push(0xff);
        assert!(!analyse_bytes(&bad, "t.txt").utf8);
    }
}
