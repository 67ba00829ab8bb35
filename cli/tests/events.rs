//! Job events through a real EventBridge API (moto's): a rule on the default bus that matches
//! s3spot's source and detail type delivers what the sink sent to an SQS queue, whole, and it
//! matches the event's schema.

use std::time::Duration;

use aws_sdk_eventbridge::types::Target;
use s3spot_bootstrap::{
    EVENT_DETAIL_TYPE, EVENT_SOURCE, EventBridge, Events, JobEvent, JobSpec, JobState,
    WorkerArtifact, Writer,
};
use s3spot_tests::Moto;
use serde_json::{Value, json};

fn job() -> JobSpec {
    JobSpec {
        bucket: "data".into(),
        key: "in/\"quoted\" & <odd> key.csv".into(),
        version_id: Some("v1".into()),
        etag: Some("0123456789abcdef0123456789abcdef".into()),
        size: Some(42),
        sequencer: None,
        job_id: "6f1c2a3b4c5d6e7f8091a2b3c4d5e6f7".into(),
        uploaded_at: Some("2026-11-30T10:19:37.123Z".into()),
        results_bucket: "data".into(),
        results_prefix: "analysis/".into(),
        command: None,
        max_runtime_secs: 60,
        worker: WorkerArtifact {
            uri: String::new(),
            sha256: String::new(),
        },
        attempt: 2,
        pipeline: Some("p".into()),
        events_off: false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_on_the_default_bus_delivers_each_event_whole_to_its_queue() {
    let moto = Moto::start();
    let sdk = moto.sdk_config().await;
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let bridge = aws_sdk_eventbridge::Client::new(&sdk);
    let queue = sqs
        .create_queue()
        .queue_name("succeeded")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    // The README's chaining rule: this pipeline's succeeded jobs.
    let pattern = json!({
        "source": [EVENT_SOURCE],
        "detail-type": [EVENT_DETAIL_TYPE],
        "detail": {"pipeline": ["p"], "state": ["succeeded"]}
    });
    bridge
        .put_rule()
        .name("p-succeeded")
        .event_pattern(pattern.to_string())
        .send()
        .await
        .unwrap();
    bridge
        .put_targets()
        .rule("p-succeeded")
        .targets(
            Target::builder()
                .id("queue")
                .arn(queue_arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    let events = Events::to(EventBridge::new(&sdk));
    let mut succeeded = JobEvent::new(
        "p",
        &job(),
        JobState::Succeeded,
        Some(JobState::Running),
        Writer::Worker,
    );
    succeeded.error = None;
    // Another state, and another pipeline's success: the rule matches neither.
    let failed = JobEvent::new("p", &job(), JobState::Failed, None, Writer::Worker);
    let other = JobEvent::new("q", &job(), JobState::Succeeded, None, Writer::Worker);
    for event in [failed, succeeded.clone(), other] {
        events.emit(event).await;
    }

    // Until the queue has stayed empty for a while after the first message: a second match
    // would show up.
    let mut received: Vec<Value> = Vec::new();
    let mut quiet = 0;
    for _ in 0..40 {
        let messages = sqs
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(10)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default();
        received.extend(
            messages
                .iter()
                .map(|m| serde_json::from_str(m.body().unwrap()).unwrap()),
        );
        quiet = if messages.is_empty() { quiet + 1 } else { 0 };
        if !received.is_empty() && quiet >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received.len(), 1, "{received:#?}");
    let mut delivered = received[0].clone();
    // moto's delivery leaves out the envelope's `version` and `account`, which EventBridge
    // always sends; the rest is as it arrived.
    for (field, value) in [("version", "0"), ("account", "123456789012")] {
        if delivered.get(field).is_none() {
            delivered[field] = json!(value);
        }
    }
    assert_eq!(delivered["source"], EVENT_SOURCE);
    assert_eq!(delivered["detail-type"], EVENT_DETAIL_TYPE);
    let detail: JobEvent = serde_json::from_value(delivered["detail"].clone()).unwrap();
    assert_eq!(detail, succeeded);
    s3spot_tests::events::assert_valid(&delivered);
}
