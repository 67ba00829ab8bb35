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
    /// The header's names: at most [`MAX_COLUMNS`] of them, each cut at [`MAX_COLUMN_NAME`]
    /// bytes. `column_count` says how many there are.
    pub columns: Vec<String>,
    /// Fields in the header, listed or not.
    pub column_count: u64,
    /// Records after the header.
    pub rows: u64,
    /// What was left out, when the header was too large to list whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Set when the table could not be read to the end; `rows` counts up to there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Header names listed in the report; any past these are counted only.
pub const MAX_COLUMNS: usize = 1000;
/// Bytes of each header name kept in the report.
pub const MAX_COLUMN_NAME: usize = 256;

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

/// Reads the header's names and counts the records after it, in fixed-size buffers whatever
/// the file holds: a field of gigabytes (an unclosed quote makes the rest of the file one field)
/// or a header of millions of columns costs no more memory than a small one. Names past the
/// caps are counted, not kept.
fn read_table(path: &Path, delimiter: u8) -> Table {
    let mut table = Table {
        delimiter: char::from(delimiter).to_string(),
        columns: Vec::new(),
        column_count: 0,
        rows: 0,
        note: None,
        error: None,
    };
    if let Err(error) = scan_table(path, delimiter, &mut table) {
        table.error = Some(error.to_string());
    }
    let mut left_out = Vec::new();
    if table.column_count > MAX_COLUMNS as u64 {
        left_out.push(format!(
            "the header has {} columns; the first {MAX_COLUMNS} are listed",
            table.column_count
        ));
    }
    if table.columns.iter().any(|c| c.ends_with(CUT)) {
        left_out.push(format!(
            "names longer than {MAX_COLUMN_NAME} bytes are cut, ending in \"{CUT}\""
        ));
    }
    if !left_out.is_empty() {
        table.note = Some(left_out.join("; "));
    }
    table
}

/// What ends a header name cut at [`MAX_COLUMN_NAME`] bytes.
const CUT: &str = "…";

fn scan_table(path: &Path, delimiter: u8, table: &mut Table) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut reader = csv_core::ReaderBuilder::new().delimiter(delimiter).build();
    let mut input = vec![0u8; BUFFER];
    // Where csv-core puts a field's bytes, a piece at a time; a header name keeps its first
    // MAX_COLUMN_NAME bytes, and nothing else is kept.
    let mut output = vec![0u8; BUFFER];
    let mut name: Vec<u8> = Vec::with_capacity(MAX_COLUMN_NAME);
    let mut cut = false;
    let mut in_header = true;
    let (mut start, mut filled, mut at_end) = (0, 0, false);
    loop {
        if start == filled && !at_end {
            filled = file.read(&mut input)?;
            start = 0;
            at_end = filled == 0;
        }
        let (result, read, written) = reader.read_field(&input[start..filled], &mut output);
        start += read;
        if in_header {
            let room = MAX_COLUMN_NAME - name.len();
            name.extend_from_slice(&output[..written.min(room)]);
            cut |= written > room;
        }
        match result {
            csv_core::ReadFieldResult::InputEmpty | csv_core::ReadFieldResult::OutputFull => {}
            csv_core::ReadFieldResult::Field { record_end } if in_header => {
                table.column_count += 1;
                if table.columns.len() < MAX_COLUMNS {
                    let mut text = String::from_utf8_lossy(&name).into_owned();
                    if cut {
                        text.push_str(CUT);
                    }
                    table.columns.push(text);
                }
                name.clear();
                cut = false;
                in_header = !record_end;
            }
            csv_core::ReadFieldResult::Field { record_end } => {
                table.rows += u64::from(record_end);
            }
            csv_core::ReadFieldResult::End => return Ok(()),
        }
    }
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
    fn a_header_too_large_to_list_is_capped_and_said_so() {
        let mut wide = (0..5000)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(",");
        wide.push_str("\n1,2\n3,4\n");
        let table = analyse_bytes(wide.as_bytes(), "wide.csv").table.unwrap();
        assert_eq!(table.columns.len(), MAX_COLUMNS);
        assert_eq!(table.columns[999], "c999");
        assert_eq!(table.column_count, 5000);
        assert_eq!(table.rows, 2);
        assert_eq!(
            table.note.as_deref(),
            Some("the header has 5000 columns; the first 1000 are listed")
        );

        let long_name = format!("{},b\n1,2\n", "n".repeat(10_000));
        let table = analyse_bytes(long_name.as_bytes(), "long.csv")
            .table
            .unwrap();
        assert_eq!(
            table.columns[0],
            format!("{}…", "n".repeat(MAX_COLUMN_NAME))
        );
        assert_eq!(table.columns[1], "b");
        assert_eq!((table.column_count, table.rows), (2, 1));
        assert!(table.note.unwrap().contains("cut"));
    }

    #[test]
    fn an_unclosed_quote_is_one_long_last_field() {
        let mut unclosed = b"a,b\n1,2\n3,\"never closed".to_vec();
        unclosed.extend(std::iter::repeat_n(b'x', 3 * BUFFER));
        unclosed.extend(b"\n4,5\n");
        let table = analyse_bytes(&unclosed, "broken.csv").table.unwrap();
        assert_eq!(table.columns, ["a", "b"]);
        assert_eq!(table.rows, 2, "the open quote runs to the end: one record");
        assert_eq!(table.note, None);
    }

    #[test]
    fn crlf_and_quoted_delimiters_count_as_csv_does() {
        let table = analyse_bytes(b"x,\"y,z\"\r\n1,\"2,3\"\r\n\r\n4,5\r\n", "w.csv")
            .table
            .unwrap();
        assert_eq!(table.columns, ["x", "y,z"]);
        assert_eq!(table.rows, 2, "an empty line is no record");
        let empty = analyse_bytes(b"", "empty.csv").table.unwrap();
        assert_eq!((empty.column_count, empty.rows), (0, 0));
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
