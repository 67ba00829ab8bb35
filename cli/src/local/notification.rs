//! S3 event notifications with the exact shape AWS sends.

use serde_json::{Value, json};

/// What a notification says about one created object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created<'a> {
    pub region: &'a str,
    pub bucket: &'a str,
    /// As stored; the notification form-encodes it, as S3 does.
    pub key: &'a str,
    pub size: u64,
    /// Without quotes, as in S3's notifications.
    pub etag: &'a str,
    /// `Put`, `Copy` or `CompleteMultipartUpload`.
    pub method: &'a str,
    /// Upper-case hex; orders the events of one key.
    pub sequencer: &'a str,
    /// RFC 3339 with milliseconds.
    pub event_time: &'a str,
    pub request_id: &'a str,
}

/// A one-record notification for an unversioned bucket, so without `versionId`.
pub fn notification(created: &Created<'_>) -> Value {
    let key: String = form_urlencoded::byte_serialize(created.key.as_bytes()).collect();
    json!({"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": created.region,
        "eventTime": created.event_time,
        "eventName": format!("ObjectCreated:{}", created.method),
        "userIdentity": {"principalId": "s3spot-local"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": created.request_id,
            "x-amz-id-2": format!("s3spot-local/{}", created.request_id),
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "s3spot-local",
            "bucket": {
                "name": created.bucket,
                "ownerIdentity": {"principalId": "s3spot-local"},
                "arn": format!("arn:aws:s3:::{}", created.bucket),
            },
            "object": {
                "key": key,
                "size": created.size,
                "eTag": created.etag,
                "sequencer": created.sequencer,
            },
        },
    }]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn created(key: &str) -> Value {
        notification(&Created {
            region: "us-east-1",
            bucket: "data",
            key,
            size: 42,
            etag: "d41d8cd98f00b204e9800998ecf8427e",
            method: "Put",
            sequencer: "0187C2A3F5E20001",
            event_time: "2026-11-21T12:00:00.000Z",
            request_id: "0000000000000001",
        })
    }

    #[test]
    fn the_shape_is_aws_s() {
        let event = created("in/f.csv");
        let record = &event["Records"][0];
        assert_eq!(record["eventName"], "ObjectCreated:Put");
        assert_eq!(record["eventSource"], "aws:s3");
        assert_eq!(record["s3"]["bucket"]["arn"], "arn:aws:s3:::data");
        assert_eq!(record["s3"]["object"]["size"], 42);
        assert_eq!(
            record["s3"]["object"]["eTag"],
            "d41d8cd98f00b204e9800998ecf8427e"
        );
        assert_eq!(record["s3"]["object"]["sequencer"], "0187C2A3F5E20001");
        assert!(
            record["s3"]["object"].get("versionId").is_none(),
            "unversioned"
        );
    }

    #[test]
    fn keys_are_form_encoded_and_decode_back() {
        for key in [
            "in/my file+1.csv",
            "in/$(touch x); `id` 'q' \"d\"\n.csv",
            "in/café/名前 📊.csv",
            "in/100%.txt",
        ] {
            let event = created(key);
            let encoded = event["Records"][0]["s3"]["object"]["key"].as_str().unwrap();
            assert!(
                !encoded.contains(' ') && !encoded.contains('\n'),
                "{encoded}"
            );
            assert_eq!(s3spot_lambda::key::decode_key(encoded).unwrap(), key);
        }
        let event = created("in/my file+1.csv");
        assert_eq!(
            event["Records"][0]["s3"]["object"]["key"],
            "in%2Fmy+file%2B1.csv"
        );
    }
}
