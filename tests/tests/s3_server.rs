//! The S3 server behaves as S3 does where s3spot relies on it: conditional writes that race
//! each other let exactly one through, and a bucket that does not exist is `NoSuchBucket`.

use aws_sdk_s3::Client;
use aws_sdk_s3::error::ProvideErrorMetadata as _;
use aws_sdk_s3::primitives::ByteStream;
use s3spot_tests::S3Server;

const WRITERS: usize = 16;

/// Sends `WRITERS` PUTs of `key` at once, each made by `condition`, with bodies named by
/// `round` (an ETag is its body's MD5: a body written twice would match twice); returns how many
/// succeeded, and the error codes of the others.
async fn race(
    client: &Client,
    key: &str,
    round: &str,
    condition: impl Fn(
        aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
) -> (usize, Vec<String>) {
    let writes: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let request = condition(client.put_object().bucket("data").key(key).body(
                ByteStream::from(format!("{round}: writer {writer}").into_bytes()),
            ));
            tokio::spawn(async move { request.send().await })
        })
        .collect();
    let mut won = 0;
    let mut lost = Vec::new();
    for write in writes {
        match write.await.unwrap() {
            Ok(_) => won += 1,
            Err(error) => lost.push(error.code().unwrap_or("none").to_owned()),
        }
    }
    (won, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_writes_that_race_let_exactly_one_through() {
    let server = S3Server::start(&["data"]);
    let client = server.client().await;
    for round in 0..5 {
        let key = format!("claims/{round}.json");
        let (won, lost) = race(&client, &key, "create", |put| put.if_none_match("*")).await;
        assert_eq!(won, 1, "If-None-Match, round {round}: {lost:?}");
        assert!(
            lost.iter().all(|code| code == "PreconditionFailed"),
            "{lost:?}"
        );

        let etag = client
            .head_object()
            .bucket("data")
            .key(&key)
            .send()
            .await
            .unwrap()
            .e_tag()
            .unwrap()
            .to_owned();
        let (won, lost) = race(&client, &key, "update", |put| put.if_match(&etag)).await;
        assert_eq!(won, 1, "If-Match, round {round}: {lost:?}");
        assert!(
            lost.iter().all(|code| code == "PreconditionFailed"),
            "{lost:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_does_not_exist_is_no_such_bucket() {
    let server = S3Server::start(&["data"]);
    let client = server.client().await;
    let read = client
        .get_object()
        .bucket("missing")
        .key("a/status.json")
        .send()
        .await
        .unwrap_err();
    assert_eq!(read.code(), Some("NoSuchBucket"), "{read:?}");
    let write = client
        .put_object()
        .bucket("missing")
        .key("a/status.json")
        .body(ByteStream::from_static(b"{}"))
        .send()
        .await
        .unwrap_err();
    assert_eq!(write.code(), Some("NoSuchBucket"), "{write:?}");
    let multipart = client
        .create_multipart_upload()
        .bucket("missing")
        .key("a/big")
        .send()
        .await
        .unwrap_err();
    assert_eq!(multipart.code(), Some("NoSuchBucket"), "{multipart:?}");
    assert!(
        !server.root().join("missing").exists(),
        "no bucket is made by a write"
    );
    // A key that is not there, in a bucket that is, is NoSuchKey still.
    let read = client
        .get_object()
        .bucket("data")
        .key("a/status.json")
        .send()
        .await
        .unwrap_err();
    assert_eq!(read.code(), Some("NoSuchKey"), "{read:?}");
}
