//! The worker checks the free space before it downloads: an object that cannot fit fails at
//! once, with a message that says how big it is and how much room there is, instead of filling
//! the disk. The work directory is a 1 MiB tmpfs, in a mount namespace of the test's own.

mod common;

use common::{Fixture, UPLOAD, show};
use s3spot_bootstrap::State;

#[test]
fn an_object_larger_than_the_free_space_fails_before_the_download() {
    if !common::in_namespaces(
        "an_object_larger_than_the_free_space_fails_before_the_download",
        false,
    ) {
        return;
    }
    let fixture = Fixture::new();
    let work = fixture.dir.path().join("work");
    let output = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "s3spot-test-work"])
        .arg(&work)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", show(&output));

    fixture.put("data", "in/small.csv", &vec![b'x'; 10 * 1024]);
    let output = fixture.run_job(&fixture.job("in/small.csv", None), &[]);
    assert!(output.status.success(), "{}", show(&output));

    fixture.put("data", "in/large.csv", &vec![b'x'; 2 * 1024 * 1024]);
    let output = fixture.run_job(&fixture.job("in/large.csv", None), &[]);
    assert_eq!(output.status.code(), Some(1), "{}", show(&output));
    let status = fixture.status("data", &format!("analysis/in/large.csv/{UPLOAD}/"));
    assert_eq!(status.state, State::Failed);
    let error = status.error.clone().unwrap_or_default();
    assert!(
        error.contains("the object is 2.0 MiB but")
            && error.contains("free: give the instances a bigger volume"),
        "{error}"
    );
}
