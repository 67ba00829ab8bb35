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

/// A PUT of `body` at `bucket`/`key`, `If-Match` `etag` if given.
async fn put(
    client: &Client,
    bucket: &str,
    key: &str,
    body: &str,
    etag: Option<String>,
) -> Result<(), String> {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .set_if_match(etag)
        .body(ByteStream::from(body.as_bytes().to_vec()))
        .send()
        .await
        .map(drop)
        .map_err(|error| error.code().unwrap_or("none").to_owned())
}

/// The body and ETag at `bucket`/`key`, or the error's code.
async fn get(client: &Client, bucket: &str, key: &str) -> Result<(String, String), String> {
    let object = client
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|error| error.code().unwrap_or("none").to_owned())?;
    let etag = object.e_tag().unwrap_or_default().to_owned();
    let body = object.body.collect().await.map_err(|e| e.to_string())?;
    Ok((String::from_utf8(body.to_vec()).unwrap(), etag))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bucket_that_does_not_exist_is_no_such_bucket() {
    let server = S3Server::start(&["data"]);
    let client = server.client().await;
    let missing = Err("NoSuchBucket".to_owned());
    assert_eq!(get(&client, "missing", "a/status.json").await, missing);
    assert_eq!(
        put(&client, "missing", "a/status.json", "{}", None).await,
        missing.clone().map(drop)
    );
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
    assert_eq!(
        get(&client, "data", "a/status.json").await,
        Err("NoSuchKey".to_owned())
    );
}

/// Read-modify-write with `If-Match`, by many writers at once: every increment that S3 accepts
/// is in the final count. A read that paired one write's body with another's ETag would let an
/// increment overwrite another unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_never_pair_one_writes_body_with_anothers_etag() {
    const INCREMENTERS: usize = 8;
    const EACH: usize = 25;
    let server = S3Server::start(&["data"]);
    let client = server.client().await;
    put(&client, "data", "counter", "0", None).await.unwrap();
    let tasks: Vec<_> = (0..INCREMENTERS)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut done = 0;
                while done < EACH {
                    let (body, etag) = get(&client, "data", "counter").await.unwrap();
                    let value: usize = body.parse().unwrap();
                    let next = (value + 1).to_string();
                    match put(&client, "data", "counter", &next, Some(etag)).await {
                        Ok(()) => done += 1,
                        Err(code) => assert_eq!(code, "PreconditionFailed"),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (body, _) = get(&client, "data", "counter").await.unwrap();
    assert_eq!(body, (INCREMENTERS * EACH).to_string(), "no increment lost");
}

/// A server killed between putting an object's new body in place and writing its ETag and
/// checksum (the local pipeline stopped mid-write): the next reads serve the body that is there,
/// with its own ETag, rather than a checksum the body fails; a conditional write then matches
/// that ETag.
#[tokio::test(flavor = "multi_thread")]
async fn a_body_whose_etag_was_never_written_is_served_with_its_own() {
    let server = S3Server::start(&["data"]);
    let client = server.client().await;
    put(&client, "data", "claim.json", r#"{"refused":1}"#, None)
        .await
        .unwrap();
    let (_, first) = get(&client, "data", "claim.json").await.unwrap();
    // What the killed write left: the new body, and the last one's internal info.
    std::fs::write(server.root().join("data/claim.json"), r#"{"refused":22}"#).unwrap();
    let (body, etag) = get(&client, "data", "claim.json").await.unwrap();
    assert_eq!(body, r#"{"refused":22}"#);
    assert_ne!(etag, first, "the ETag of the body that is there");
    assert_eq!(
        put(&client, "data", "claim.json", "{}", Some(first)).await,
        Err("PreconditionFailed".to_owned()),
        "the last write's ETag no longer matches"
    );
    put(&client, "data", "claim.json", "{}", Some(etag))
        .await
        .unwrap();
    assert_eq!(get(&client, "data", "claim.json").await.unwrap().0, "{}");
}
