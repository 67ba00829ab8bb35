//! The event shapes the launcher accepts, reduced to one record type.
//!
//! S3 notification records are read with our own lenient types rather than
//! `aws_lambda_events::s3::S3EventRecord`, which requires `eventTime`, `userIdentity` and
//! `requestParameters`: the awsfun and console test events, and emulators such as moto, leave
//! those out. A record needs only `eventName`, the bucket name and the key. The SQS and EventBridge
//! envelopes are `aws_lambda_events`' own types.

use aws_lambda_events::eventbridge::EventBridgeEvent;
use aws_lambda_events::sqs::SqsEvent;
use serde::Deserialize;
use serde_json::Value;

use crate::key::decode_key;

/// A created object: one candidate job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectCreated {
    pub bucket: String,
    /// Decoded: exactly the key stored in S3.
    pub key: String,
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub size: Option<u64>,
    pub sequencer: Option<String>,
    pub event_time: Option<String>,
}

/// One record of an event, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Created(ObjectCreated),
    /// Not an object creation (a test event, a deletion, ...): nothing to do.
    Ignored {
        bucket: String,
        key: String,
        reason: String,
    },
    /// Malformed: reported as a failure of this record alone. `bucket` and `key` are whatever
    /// could be read, for the report.
    Invalid {
        bucket: String,
        key: String,
        error: String,
    },
    /// EC2's two-minute warning that it is taking back a spot instance: the launcher re-launches
    /// its job, if the instance is one of this pipeline's.
    Interrupted {
        instance_id: String,
    },
    /// The reaper's schedule: terminate the pipeline's stuck instances.
    Reap,
}

/// EventBridge's name for a spot instance's two-minute warning.
pub const SPOT_INTERRUPTION: &str = "EC2 Spot Instance Interruption Warning";
/// What an EventBridge schedule sends.
pub const SCHEDULED_EVENT: &str = "Scheduled Event";

/// A whole invocation payload.
#[derive(Debug)]
pub enum Invocation {
    /// An S3 notification or an EventBridge event, invoked directly.
    Direct(Vec<Record>),
    /// An SQS batch whose bodies are S3 notifications or EventBridge events.
    Sqs(Vec<SqsItem>),
}

#[derive(Debug)]
pub struct SqsItem {
    pub message_id: Option<String>,
    pub records: Result<Vec<Record>, EventError>,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(
        "unrecognised event: {found}; expected an S3 notification (Records[].s3), an SQS batch \
         (Records[].body), or an EventBridge \"Object Created\", \"EC2 Spot Instance \
         Interruption Warning\" or \"Scheduled Event\" event"
    )]
    Unrecognised { found: String },
    #[error("malformed SQS event")]
    Sqs(#[source] serde_json::Error),
    #[error("SQS message body is not JSON")]
    BodyNotJson(#[source] serde_json::Error),
    #[error("SQS message has no body")]
    NoBody,
    #[error("malformed EventBridge event")]
    EventBridge(#[source] serde_json::Error),
}

/// Classifies an invocation payload. Only a payload of no known shape is an error; a bad record
/// or message is reported in its place, so it cannot hide the others.
pub fn parse(event: Value) -> Result<Invocation, EventError> {
    let is_sqs = event
        .get("Records")
        .and_then(Value::as_array)
        .and_then(|records| records.first())
        .is_some_and(|first| {
            first.get("eventSource").and_then(Value::as_str) == Some("aws:sqs")
                || first.get("body").is_some()
        });
    if !is_sqs {
        return parse_s3_payload(&event).map(Invocation::Direct);
    }
    let sqs: SqsEvent = serde_json::from_value(event).map_err(EventError::Sqs)?;
    let items = sqs
        .records
        .into_iter()
        .map(|message| SqsItem {
            records: match message.body.as_deref() {
                None => Err(EventError::NoBody),
                Some(body) => serde_json::from_str::<Value>(body)
                    .map_err(EventError::BodyNotJson)
                    .and_then(|body| parse_s3_payload(&body)),
            },
            message_id: message.message_id,
        })
        .collect();
    Ok(Invocation::Sqs(items))
}

/// An S3 notification, an S3 test event or an EventBridge event.
fn parse_s3_payload(value: &Value) -> Result<Vec<Record>, EventError> {
    let Some(object) = value.as_object() else {
        return Err(EventError::Unrecognised {
            found: format!("a JSON {}", json_kind(value)),
        });
    };
    if let Some(records) = object.get("Records") {
        let records = records.as_array().ok_or_else(|| EventError::Unrecognised {
            found: format!("\"Records\" is a JSON {}", json_kind(records)),
        })?;
        return Ok(records.iter().map(parse_notification_record).collect());
    }
    // S3 sends this once when a notification target is configured (to SQS, not to Lambda).
    if object.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(vec![Record::Ignored {
            bucket: string_at(value, &["Bucket"]),
            key: String::new(),
            reason: "s3:TestEvent".into(),
        }]);
    }
    if object.contains_key("detail-type") {
        return parse_eventbridge(value).map(|record| vec![record]);
    }
    let mut keys: Vec<&str> = object.keys().map(String::as_str).take(8).collect();
    keys.sort_unstable();
    Err(EventError::Unrecognised {
        found: format!("an object with keys {keys:?}"),
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationRecord {
    event_name: Option<String>,
    event_time: Option<String>,
    s3: Option<NotificationEntity>,
}

#[derive(Deserialize)]
struct NotificationEntity {
    bucket: NotificationBucket,
    object: NotificationObject,
}

#[derive(Deserialize)]
struct NotificationBucket {
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationObject {
    key: Option<String>,
    size: Option<u64>,
    #[serde(rename = "eTag")]
    etag: Option<String>,
    version_id: Option<String>,
    sequencer: Option<String>,
}

fn parse_notification_record(value: &Value) -> Record {
    let bucket = string_at(value, &["s3", "bucket", "name"]);
    let raw_key = string_at(value, &["s3", "object", "key"]);
    let invalid = |error: String| Record::Invalid {
        bucket: bucket.clone(),
        key: raw_key.clone(),
        error,
    };
    let record: NotificationRecord = match serde_path_to_error::deserialize(value) {
        Ok(record) => record,
        Err(e) => return invalid(format!("malformed S3 notification record: {e}")),
    };
    let Some(event_name) = record.event_name else {
        return invalid("S3 notification record has no eventName".into());
    };
    // Records say "ObjectCreated:Put"; configurations and some emulators say "s3:ObjectCreated:Put".
    let name = event_name.strip_prefix("s3:").unwrap_or(&event_name);
    if !name.starts_with("ObjectCreated:") {
        return Record::Ignored {
            bucket,
            key: raw_key,
            reason: format!("{event_name} is not an ObjectCreated event"),
        };
    }
    let Some(NotificationEntity { bucket: b, object }) = record.s3 else {
        return invalid("S3 notification record has no s3 section".into());
    };
    let (Some(bucket_name), Some(key)) = (b.name.filter(|n| !n.is_empty()), object.key) else {
        return invalid("S3 notification record needs s3.bucket.name and s3.object.key".into());
    };
    match decode_key(&key) {
        Ok(key) => Record::Created(ObjectCreated {
            bucket: bucket_name,
            key,
            version_id: real_version(object.version_id),
            etag: object.etag,
            size: object.size,
            sequencer: object.sequencer,
            event_time: record.event_time,
        }),
        Err(e) => invalid(e.to_string()),
    }
}

#[derive(Deserialize)]
struct EventBridgeDetail {
    bucket: NotificationBucket,
    object: EventBridgeObject,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct EventBridgeObject {
    key: Option<String>,
    size: Option<u64>,
    etag: Option<String>,
    version_id: Option<String>,
    sequencer: Option<String>,
}

fn parse_eventbridge(value: &Value) -> Result<Record, EventError> {
    let event: EventBridgeEvent<Value> =
        serde_json::from_value(value.clone()).map_err(EventError::EventBridge)?;
    if event.source == "aws.ec2" && event.detail_type == SPOT_INTERRUPTION {
        let instance_id = string_at(&event.detail, &["instance-id"]);
        if instance_id.is_empty() {
            return Ok(Record::Invalid {
                bucket: String::new(),
                key: String::new(),
                error: format!("{SPOT_INTERRUPTION} event without detail.instance-id"),
            });
        }
        return Ok(Record::Interrupted { instance_id });
    }
    if event.source == "aws.events" && event.detail_type == SCHEDULED_EVENT {
        return Ok(Record::Reap);
    }
    if event.source != "aws.s3" {
        return Err(EventError::Unrecognised {
            found: format!(
                "an EventBridge event from {:?} ({:?})",
                event.source, event.detail_type
            ),
        });
    }
    let bucket = string_at(&event.detail, &["bucket", "name"]);
    let key = string_at(&event.detail, &["object", "key"]);
    if event.detail_type != "Object Created" {
        return Ok(Record::Ignored {
            bucket,
            key,
            reason: format!("{:?} is not an Object Created event", event.detail_type),
        });
    }
    let detail: EventBridgeDetail = match serde_path_to_error::deserialize(&event.detail) {
        Ok(detail) => detail,
        Err(e) => {
            return Ok(Record::Invalid {
                bucket,
                key,
                error: format!("malformed EventBridge Object Created detail: {e}"),
            });
        }
    };
    let (Some(bucket_name), Some(object_key)) = (
        detail.bucket.name.filter(|n| !n.is_empty()),
        detail.object.key.filter(|k| !k.is_empty()),
    ) else {
        return Ok(Record::Invalid {
            bucket,
            key,
            error:
                "EventBridge Object Created event needs detail.bucket.name and detail.object.key"
                    .into(),
        });
    };
    // EventBridge carries the key as stored: decoding it would corrupt keys with '+' or '%'.
    Ok(Record::Created(ObjectCreated {
        bucket: bucket_name,
        key: object_key,
        version_id: real_version(detail.object.version_id),
        etag: detail.object.etag,
        size: detail.object.size,
        sequencer: detail.object.sequencer,
        event_time: event.time.map(|t| t.to_rfc3339()),
    }))
}

/// With versioning suspended every upload is version "null": it identifies nothing, and as part
/// of a job's identity it would make later uploads of the key look like repeats.
fn real_version(version_id: Option<String>) -> Option<String> {
    version_id.filter(|v| !v.is_empty() && v != "null")
}

fn string_at(value: &Value, path: &[&str]) -> String {
    path.iter()
        .try_fold(value, |v, name| v.get(name))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn direct(event: Value) -> Vec<Record> {
        match parse(event).unwrap() {
            Invocation::Direct(records) => records,
            other => panic!("expected a direct invocation, got {other:?}"),
        }
    }

    fn created(record: &Record) -> &ObjectCreated {
        match record {
            Record::Created(object) => object,
            other => panic!("expected a created object, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_record_is_enough() {
        let records = direct(json!({"Records": [{
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "data"}, "object": {"key": "in/a+b%2Bc.csv"}}
        }]}));
        assert_eq!(
            records,
            [Record::Created(ObjectCreated {
                bucket: "data".into(),
                key: "in/a b+c.csv".into(),
                version_id: None,
                etag: None,
                size: None,
                sequencer: None,
                event_time: None,
            })]
        );
    }

    #[test]
    fn every_field_is_read() {
        let records = direct(json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": "2024-05-01T12:00:00.000Z", "eventName": "ObjectCreated:CompleteMultipartUpload",
            "userIdentity": {"principalId": "AWS:X"}, "requestParameters": {"sourceIPAddress": "1.2.3.4"},
            "responseElements": {"x-amz-request-id": "R"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "c",
                "bucket": {"name": "data", "ownerIdentity": {"principalId": "P"}, "arn": "arn:aws:s3:::data"},
                "object": {"key": "k", "size": 1048576, "eTag": "e", "versionId": "v", "sequencer": "0A"}}
        }]}));
        let object = created(&records[0]);
        assert_eq!(object.size, Some(1_048_576));
        assert_eq!(object.etag.as_deref(), Some("e"));
        assert_eq!(object.version_id.as_deref(), Some("v"));
        assert_eq!(object.sequencer.as_deref(), Some("0A"));
        assert_eq!(
            object.event_time.as_deref(),
            Some("2024-05-01T12:00:00.000Z")
        );
    }

    #[test]
    fn the_null_version_of_a_suspended_bucket_is_no_version() {
        let records = direct(json!({"Records": [{
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "data"}, "object": {"key": "k", "versionId": "null", "sequencer": "0A"}}
        }]}));
        assert_eq!(created(&records[0]).version_id, None);
        assert_eq!(created(&records[0]).sequencer.as_deref(), Some("0A"));
    }

    #[test]
    fn other_records_are_ignored_with_a_reason() {
        let records = direct(json!({"Records": [
            {"eventName": "ObjectRemoved:Delete", "s3": {"bucket": {"name": "data"}, "object": {"key": "gone"}}},
            {"eventName": "s3:ObjectCreated:Copy", "s3": {"bucket": {"name": "data"}, "object": {"key": "copied"}}},
        ]}));
        assert!(matches!(&records[0], Record::Ignored { reason, key, .. }
            if reason.contains("ObjectRemoved:Delete") && key == "gone"));
        assert_eq!(created(&records[1]).key, "copied");
    }

    #[test]
    fn a_bad_record_is_invalid_alone() {
        let records = direct(json!({"Records": [
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "data"}, "object": {"key": "bad%C3"}}},
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "data"}, "object": {"key": "k", "size": "big"}}},
            {"s3": {"bucket": {"name": "data"}, "object": {"key": "no-name"}}},
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {}, "object": {"key": "k"}}},
            "not a record",
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "data"}, "object": {"key": "good"}}},
        ]}));
        let errors: Vec<&str> = records[..5]
            .iter()
            .map(|r| match r {
                Record::Invalid { error, .. } => error.as_str(),
                other => panic!("expected invalid, got {other:?}"),
            })
            .collect();
        assert!(
            errors[0].contains("\"bad%C3\" does not decode to UTF-8"),
            "{}",
            errors[0]
        );
        assert!(errors[1].contains("s3.object.size"), "{}", errors[1]);
        assert!(errors[2].contains("no eventName"), "{}", errors[2]);
        assert!(errors[3].contains("s3.bucket.name"), "{}", errors[3]);
        assert!(errors[4].contains("malformed"), "{}", errors[4]);
        assert_eq!(created(&records[5]).key, "good");
    }

    #[test]
    fn s3_test_events_are_ignored() {
        let records = direct(json!({"Service": "Amazon S3", "Event": "s3:TestEvent",
            "Time": "2024-05-01T12:00:00.000Z", "Bucket": "data", "RequestId": "R", "HostId": "H"}));
        assert_eq!(
            records,
            [Record::Ignored {
                bucket: "data".into(),
                key: String::new(),
                reason: "s3:TestEvent".into()
            }]
        );
    }

    #[test]
    fn eventbridge_keys_are_taken_raw() {
        let records = direct(json!({
            "version": "0", "id": "1", "detail-type": "Object Created", "source": "aws.s3",
            "account": "123456789012", "time": "2024-05-01T12:00:00Z", "region": "us-east-1",
            "resources": ["arn:aws:s3:::data"],
            "detail": {"version": "0", "bucket": {"name": "data"},
                "object": {"key": "in/a+b%2B.csv", "size": 5, "etag": "e", "version-id": "v", "sequencer": "0B"},
                "request-id": "R", "requester": "123456789012", "reason": "PutObject"}
        }));
        let object = created(&records[0]);
        assert_eq!(object.key, "in/a+b%2B.csv");
        assert_eq!(object.version_id.as_deref(), Some("v"));
        assert_eq!(object.sequencer.as_deref(), Some("0B"));
        assert_eq!(object.size, Some(5));
        assert_eq!(
            object.event_time.as_deref(),
            Some("2024-05-01T12:00:00+00:00")
        );
    }

    #[test]
    fn other_eventbridge_s3_events_are_ignored() {
        let records = direct(json!({"detail-type": "Object Deleted", "source": "aws.s3",
            "detail": {"bucket": {"name": "data"}, "object": {"key": "k"}}}));
        assert!(
            matches!(&records[0], Record::Ignored { reason, .. } if reason.contains("Object Deleted"))
        );
    }

    #[test]
    fn sqs_bodies_are_parsed_one_by_one() {
        let body = json!({"Records": [{"eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "data"}, "object": {"key": "a%3Ab"}}}]})
        .to_string();
        let event = json!({"Records": [
            {"messageId": "m1", "eventSource": "aws:sqs", "body": body},
            {"messageId": "m2", "eventSource": "aws:sqs", "body": "{not json"},
            {"messageId": "m3", "eventSource": "aws:sqs", "body": "{\"Service\":\"Amazon S3\",\"Event\":\"s3:TestEvent\",\"Bucket\":\"data\"}"},
            {"messageId": "m4", "eventSource": "aws:sqs"},
        ]});
        let Invocation::Sqs(items) = parse(event).unwrap() else {
            panic!("expected SQS")
        };
        assert_eq!(items[0].message_id.as_deref(), Some("m1"));
        assert_eq!(created(&items[0].records.as_ref().unwrap()[0]).key, "a:b");
        assert!(matches!(items[1].records, Err(EventError::BodyNotJson(_))));
        assert!(matches!(
            items[2].records.as_ref().unwrap()[0],
            Record::Ignored { .. }
        ));
        assert!(matches!(items[3].records, Err(EventError::NoBody)));
    }

    #[test]
    fn a_schedule_is_the_reapers() {
        let event = json!({"detail-type": "Scheduled Event", "source": "aws.events", "detail": {}});
        assert!(matches!(
            parse(event).unwrap(),
            Invocation::Direct(records) if matches!(records[..], [Record::Reap])
        ));
    }

    #[test]
    fn unknown_payloads_say_what_was_expected() {
        for event in [
            json!({"hello": "world"}),
            json!([1, 2]),
            json!({"Records": "x"}),
            json!({"detail-type": "Scheduled Event", "source": "aws.something", "detail": {}}),
        ] {
            let err = parse(event.clone()).unwrap_err().to_string();
            assert!(err.starts_with("unrecognised event:"), "{event}: {err}");
            assert!(err.contains("expected an S3 notification"), "{err}");
        }
    }
}
