//! The EventBridge sink against scripted answers: what it sends, and every way PutEvents can
//! refuse, which the emitter logs without failing anything.

use std::sync::{Arc, Mutex};

use aws_sdk_eventbridge::Client;
use aws_sdk_eventbridge::operation::put_events::{PutEventsError, PutEventsOutput};
use aws_sdk_eventbridge::types::PutEventsResultEntry;
use aws_sdk_eventbridge::types::error::InternalException;
use aws_smithy_mocks::{RuleMode, mock, mock_client};
use s3spot_bootstrap::{
    EVENT_DETAIL_TYPE, EVENT_SOURCE, EventBridge, EventError, EventSink, Events, JobEvent, JobSpec,
    JobState, WorkerArtifact, Writer,
};

fn job() -> JobSpec {
    JobSpec {
        bucket: "data".into(),
        key: "in/a b.csv".into(),
        version_id: None,
        etag: Some("0123".into()),
        size: Some(4),
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
        attempt: 1,
        pipeline: Some("p".into()),
        events_off: false,
    }
}

fn event() -> JobEvent {
    JobEvent::new(
        "p",
        &job(),
        JobState::Running,
        Some(JobState::Launched),
        Writer::Worker,
    )
}

#[tokio::test]
async fn one_entry_of_the_s3spot_source_and_detail_type_carries_the_event() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&sent);
    let rule = mock!(Client::put_events)
        .match_requests(move |request| {
            seen.lock()
                .unwrap()
                .extend(request.entries().iter().cloned());
            true
        })
        .then_output(|| {
            PutEventsOutput::builder()
                .failed_entry_count(0)
                .entries(PutEventsResultEntry::builder().event_id("e-1").build())
                .build()
        });
    let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, &[&rule]);
    let event = event();
    EventBridge::from_client(client).put(&event).await.unwrap();
    let sent = sent.lock().unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].source(), Some(EVENT_SOURCE));
    assert_eq!(sent[0].detail_type(), Some(EVENT_DETAIL_TYPE));
    assert_eq!(sent[0].event_bus_name(), None, "the default bus");
    assert!(sent[0].time().is_some(), "the change's own time");
    let detail: JobEvent = serde_json::from_str(sent[0].detail().unwrap()).unwrap();
    assert_eq!(detail, event);
}

#[tokio::test]
async fn a_refused_entry_and_a_failed_call_are_errors_that_say_why_and_are_only_logged() {
    let refused = mock!(Client::put_events).then_output(|| {
        PutEventsOutput::builder()
            .failed_entry_count(1)
            .entries(
                PutEventsResultEntry::builder()
                    .error_code("NotAuthorizedForSourceException")
                    .error_message("Not authorized for the source.")
                    .build(),
            )
            .build()
    });
    let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, &[&refused]);
    let error = EventBridge::from_client(client)
        .put(&event())
        .await
        .unwrap_err();
    assert!(matches!(error, EventError::Refused { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "EventBridge refused the event: NotAuthorizedForSourceException: Not authorized for the \
         source."
    );

    let failing = mock!(Client::put_events).then_error(|| {
        PutEventsError::InternalException(
            InternalException::builder()
                .message("We encountered an internal error.")
                .build(),
        )
    });
    let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, &[&failing]);
    let sink = EventBridge::from_client(client);
    let error = sink.put(&event()).await.unwrap_err();
    assert!(
        s3spot_bootstrap::error_chain(&error).contains("internal error"),
        "{}",
        s3spot_bootstrap::error_chain(&error)
    );
    // Through the emitters' handle, the same failure is a log line and nothing else.
    Events::to(sink).emit(event()).await;
}

#[tokio::test]
async fn an_entry_refused_for_a_passing_reason_is_sent_again() {
    let throttled = mock!(Client::put_events)
        .sequence()
        .output(|| {
            PutEventsOutput::builder()
                .failed_entry_count(1)
                .entries(
                    PutEventsResultEntry::builder()
                        .error_code("ThrottlingException")
                        .error_message("Rate exceeded")
                        .build(),
                )
                .build()
        })
        .output(|| {
            PutEventsOutput::builder()
                .failed_entry_count(0)
                .entries(PutEventsResultEntry::builder().event_id("e-2").build())
                .build()
        })
        .build();
    let client = mock_client!(aws_sdk_eventbridge, RuleMode::MatchAny, &[&throttled]);
    EventBridge::from_client(client)
        .put(&event())
        .await
        .unwrap();
    assert_eq!(throttled.num_calls(), 2);
}
