//! A large object streams through the worker in bounded memory. Alone in its test binary, so
//! that the peak RSS of this process's children is the worker's.

mod common;

use std::io::Write as _;

use common::{Fixture, show};
use s3spot_bootstrap::State;
use sha2::{Digest as _, Sha256};

const SIZE: u64 = 256 * 1024 * 1024;

#[test]
fn a_256_mib_object_goes_through_in_under_64_mib() {
    let fixture = Fixture::new();
    // Pseudo-random bytes, so that nothing on the way can make them small.
    let source = fixture.dir.path().join("big.bin");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&source).unwrap());
    let mut hasher = Sha256::new();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1024 * 1024];
    for _ in 0..SIZE / block.len() as u64 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        hasher.update(&block);
        file.write_all(&block).unwrap();
    }
    file.flush().unwrap();
    drop(file);
    let expected = hex::encode(hasher.finalize());
    fixture.put_file("data", "in/big.bin", &source);

    // The copy makes the results a 256 MiB multipart upload as well.
    let job = fixture.job(
        "in/big.bin",
        Some(r#"cp "$S3SPOT_INPUT" "$S3SPOT_OUTPUT_DIR/copy.bin""#),
    );
    let output = fixture.run_job(&job, &[]);
    assert!(output.status.success(), "{}", show(&output));
    common::assert_children_peak_rss_bounded();

    let status = fixture.status(
        "data",
        "analysis/in/big.bin/20261130T101937.123Z-6f1c2a3b4c5d6e7f/",
    );
    assert_eq!(status.state, State::Succeeded);
    assert_eq!(status.input.size, Some(SIZE));
    assert_eq!(status.input.sha256.as_deref(), Some(expected.as_str()));
    let copy = fixture
        .runtime
        .block_on(
            fixture
                .client
                .head_object()
                .bucket("data")
                .key("analysis/in/big.bin/20261130T101937.123Z-6f1c2a3b4c5d6e7f/copy.bin")
                .send(),
        )
        .unwrap();
    assert_eq!(copy.content_length(), Some(SIZE as i64));
    assert_eq!(copy.content_type(), Some("application/octet-stream"));
    assert!(
        copy.e_tag().unwrap().contains('-'),
        "uploaded in parts: {:?}",
        copy.e_tag()
    );
}
