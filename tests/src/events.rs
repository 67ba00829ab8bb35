//! The job state-change event's schema, `events/schema/job-state-change.json`, as a check.

use std::sync::OnceLock;

/// The errors of `event` against the schema, one line each; empty if it is valid.
pub fn schema_errors(event: &serde_json::Value) -> Vec<String> {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let path = crate::events_dir().join("schema/job-state-change.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let schema: serde_json::Value = serde_json::from_str(&text).expect("the schema is JSON");
        jsonschema::validator_for(&schema).expect("the schema is a valid JSON schema")
    });
    validator
        .iter_errors(event)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

/// Panics, naming each error, unless `event` is valid.
pub fn assert_valid(event: &serde_json::Value) {
    let errors = schema_errors(event);
    assert!(
        errors.is_empty(),
        "the event does not match events/schema/job-state-change.json:\n{}\n{event:#}",
        errors.join("\n")
    );
}
