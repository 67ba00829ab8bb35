//! The built-in analysis keeps bounded memory on any input: a header name of 64 MiB, then a
//! quote that is never closed and runs 64 MiB to the end. Alone in its test binary, so that the
//! peak RSS of this process's children is the worker's.

mod common;

use std::io::Write as _;

use common::{Fixture, show};
use s3spot_bootstrap::State;

const PART: usize = 64 * 1024 * 1024;

#[test]
fn a_csv_of_one_huge_name_and_one_unclosed_quote_is_analysed_in_under_64_mib() {
    let fixture = Fixture::new();
    let source = fixture.dir.path().join("huge.csv");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&source).unwrap());
    let block = vec![b'h'; 1024 * 1024];
    for _ in 0..PART / block.len() {
        file.write_all(&block).unwrap();
    }
    file.write_all(b",second\n1,\"").unwrap();
    let block = vec![b'x'; 1024 * 1024];
    for _ in 0..PART / block.len() {
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    fixture.put_file("data", "in/huge.csv", &source);

    let job = fixture.job("in/huge.csv", None);
    let output = fixture.run_job(&job, &[]);
    assert!(output.status.success(), "{}", show(&output));
    common::assert_children_peak_rss_bounded();

    let prefix = job.results_key_prefix();
    assert_eq!(fixture.status("data", &prefix).state, State::Succeeded);
    let report: serde_json::Value =
        serde_json::from_str(&fixture.text("data", &format!("{prefix}report.json"))).unwrap();
    let table = &report["table"];
    assert_eq!(
        table["columns"][0].as_str().unwrap().len(),
        256 + "…".len(),
        "the name is cut"
    );
    assert_eq!(table["columns"][1], "second");
    assert_eq!(table["column_count"], 2);
    assert_eq!(table["rows"], 1, "the open quote runs to the end");
    assert!(
        table["note"].as_str().unwrap().contains("cut"),
        "the report says so: {table}"
    );
}
