//! Deciding what one created object becomes: nothing (skipped), or a job with its user-data.

use s3spot_bootstrap::{JobSpec, RenderError, UserData, render_user_data};

use crate::config::JobConfig;
use crate::event::{self, EventError, Invocation, ObjectCreated, Record};

/// A job ready to launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedJob {
    pub spec: JobSpec,
    pub user_data: UserData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Skip(String),
    Launch(Box<PlannedJob>),
}

/// [`s3spot_bootstrap::RECORDS_FOLDER`], as a key's part.
const RECORDS_SEGMENT: &str = ".s3spot";

/// Why a key is not a job, if it is not.
///
/// Results are written under `<results prefix><key>/`, which the results-prefix rule covers
/// whatever the skip substring is. That is what ends the loop awsfun had, where results named
/// `.analyzed.` slipped past a rule looking for `analysis`.
pub fn skip_reason(config: &JobConfig, key: &str) -> Option<String> {
    if key.ends_with('/') {
        return Some("folder marker (key ends with '/')".into());
    }
    if key.starts_with(&config.results_prefix) {
        return Some(format!(
            "under the results prefix {:?} (S3SPOT_RESULTS_PREFIX)",
            config.results_prefix
        ));
    }
    // The instance role may not write where the launcher keeps its claims
    // (`analysis/*/.s3spot/attempt-*.json`), which such a key's results could match.
    if key.split('/').any(|segment| segment == RECORDS_SEGMENT) {
        return Some(format!(
            "a part of the key is {RECORDS_SEGMENT:?}, the name of the folder where s3spot keeps \
             its records; rename the object"
        ));
    }
    if let Some(substring) = &config.skip_substring
        && key.to_lowercase().contains(substring.as_str())
    {
        return Some(format!(
            "key contains {substring:?} (S3SPOT_SKIP_SUBSTRING, any case)"
        ));
    }
    None
}

/// Applies the skip rules, then builds and renders the job `job_id` (the object's upload, see
/// [`crate::token::job_id`]). Rendering fails only when the user-data would be over EC2's limit,
/// which no retry can fix.
pub fn plan(
    config: &JobConfig,
    object: &ObjectCreated,
    attempt: u32,
    job_id: &str,
) -> Result<Plan, RenderError> {
    if let Some(reason) = skip_reason(config, &object.key) {
        return Ok(Plan::Skip(reason));
    }
    let spec = JobSpec {
        bucket: object.bucket.clone(),
        key: object.key.clone(),
        version_id: object.version_id.clone(),
        etag: object.etag.clone(),
        size: object.size,
        sequencer: object.sequencer.clone(),
        job_id: job_id.to_owned(),
        uploaded_at: object.event_time.clone(),
        results_bucket: config
            .results_bucket
            .clone()
            .unwrap_or_else(|| object.bucket.clone()),
        results_prefix: config.results_prefix.clone(),
        command: config.command.clone(),
        max_runtime_secs: config.max_runtime_secs,
        worker: config.worker.clone(),
        attempt,
        pipeline: Some(config.pipeline.clone()),
        events_off: config.events_off,
    };
    let user_data = render_user_data(&spec, config.region.as_deref())?;
    Ok(Plan::Launch(Box::new(PlannedJob { spec, user_data })))
}

/// What becomes of one record of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Launch {
        object: ObjectCreated,
        job: Box<PlannedJob>,
    },
    Skip {
        bucket: String,
        key: String,
        reason: String,
    },
    /// Never retryable: the record itself is at fault.
    Fail {
        bucket: String,
        key: String,
        error: String,
    },
}

/// Decides a record without calling AWS: the handler's first step, and all of `s3spot render`.
pub fn decide(config: &JobConfig, record: Record, attempt: u32) -> Decision {
    match record {
        Record::Created(object) => match plan(
            config,
            &object,
            attempt,
            &crate::token::job_id(&config.pipeline, &object),
        ) {
            Ok(Plan::Launch(job)) => Decision::Launch { object, job },
            Ok(Plan::Skip(reason)) => Decision::Skip {
                bucket: object.bucket,
                key: object.key,
                reason,
            },
            Err(error) => Decision::Fail {
                bucket: object.bucket,
                key: object.key,
                error: s3spot_bootstrap::error_chain(&error),
            },
        },
        Record::Ignored {
            bucket,
            key,
            reason,
        } => Decision::Skip {
            bucket,
            key,
            reason,
        },
        Record::Invalid { bucket, key, error } => Decision::Fail { bucket, key, error },
        // Which job it was is known only to EC2 (the instance's tags and user-data).
        Record::Interrupted { instance_id } => Decision::Skip {
            bucket: String::new(),
            key: String::new(),
            reason: format!(
                "spot interruption warning for {instance_id}: the launcher re-launches its job"
            ),
        },
        Record::Reap => Decision::Skip {
            bucket: String::new(),
            key: String::new(),
            reason: "scheduled event: the launcher terminates the pipeline's stuck instances"
                .into(),
        },
    }
}

/// Decides every record of an event, SQS batches included, for a first attempt: what
/// `s3spot render` shows. An unreadable SQS message is a failure in its place.
pub fn preview(config: &JobConfig, event: serde_json::Value) -> Result<Vec<Decision>, EventError> {
    let decide = |record| decide(config, record, 1);
    Ok(match event::parse(event)? {
        Invocation::Direct(records) => records.into_iter().map(decide).collect(),
        Invocation::Sqs(items) => items
            .into_iter()
            .flat_map(|item| match item.records {
                Ok(records) => records.into_iter().map(decide).collect(),
                Err(error) => vec![Decision::Fail {
                    bucket: String::new(),
                    key: String::new(),
                    error: s3spot_bootstrap::error_chain(&error),
                }],
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(overrides: &[(&str, &str)]) -> JobConfig {
        Config::from_lookup(s3spot_tests::s3spot_lookup("s3spot-worker", overrides))
            .unwrap()
            .job
    }

    const JOB: &str = "0123456789abcdef0123456789abcdef";

    fn object(key: &str) -> ObjectCreated {
        ObjectCreated {
            bucket: "data".into(),
            key: key.into(),
            version_id: None,
            etag: Some("e".into()),
            size: Some(3),
            sequencer: None,
            event_time: None,
        }
    }

    #[test]
    fn skip_rules() {
        let config = config(&[]);
        let cases = [
            ("in/data.csv", None),
            ("in/", Some("folder marker")),
            ("analysis/in/data.csv/report.json", Some("results prefix")),
            ("in/ANALYSIS-2024.csv", Some("contains \"analysis\"")),
            ("in/Analysis/data.csv", Some("contains \"analysis\"")),
            ("in/data.analyzed.1700000000", None),
            ("in/analy sis.csv", None),
            (
                "in/.s3spot/attempt-1.json",
                Some("\".s3spot\", the name of the folder"),
            ),
            (".s3spot/x.csv", Some("\".s3spot\"")),
            ("in/x.s3spot/a.csv", None),
        ];
        for (key, expected) in cases {
            let reason = skip_reason(&config, key);
            match expected {
                None => assert_eq!(reason, None, "{key}"),
                Some(text) => assert!(
                    reason.as_deref().is_some_and(|r| r.contains(text)),
                    "{key}: {reason:?}"
                ),
            }
        }
    }

    #[test]
    fn the_results_prefix_rule_holds_whatever_the_substring() {
        let config = config(&[
            ("S3SPOT_RESULTS_PREFIX", "out/"),
            ("S3SPOT_SKIP_SUBSTRING", ""),
        ]);
        assert_eq!(skip_reason(&config, "in/analysis.csv"), None);
        assert!(skip_reason(&config, "out/in/x.csv/status.json").is_some());
    }

    /// Every result a job writes is skipped when its upload notifies the pipeline again.
    #[test]
    fn results_never_re_trigger_the_pipeline() {
        for extra in [
            vec![],
            vec![
                ("S3SPOT_RESULTS_PREFIX", "results/"),
                ("S3SPOT_SKIP_SUBSTRING", ""),
            ],
            vec![
                ("S3SPOT_RESULTS_PREFIX", "x/"),
                ("S3SPOT_SKIP_SUBSTRING", "zzz"),
            ],
        ] {
            let config = config(&extra);
            for key in [
                "in/data.csv",
                "data.analyzed.1700000000",
                "ünï/cödé +$(x).csv",
            ] {
                let Plan::Launch(job) = plan(&config, &object(key), 1, JOB).unwrap() else {
                    panic!("{key} should launch")
                };
                for output in [
                    "report.json",
                    "status.json",
                    "stdout.log",
                    "sub/dir/out.bin",
                ] {
                    let result_key = format!("{}{output}", job.spec.results_key_prefix());
                    assert!(
                        skip_reason(&config, &result_key).is_some(),
                        "{result_key} would re-trigger the pipeline"
                    );
                }
            }
        }
    }

    #[test]
    fn a_job_carries_the_object_and_the_configuration() {
        let config = config(&[
            ("S3SPOT_RESULTS_BUCKET", "results"),
            ("S3SPOT_COMMAND", "true"),
        ]);
        let Plan::Launch(job) = plan(&config, &object("in/x.csv"), 2, JOB).unwrap() else {
            panic!()
        };
        assert_eq!(job.spec.bucket, "data");
        assert_eq!(job.spec.results_bucket, "results");
        assert_eq!(job.spec.command.as_deref(), Some("true"));
        assert_eq!(job.spec.attempt, 2);
        assert_eq!(
            s3spot_bootstrap::job_from_user_data(job.user_data.script()).unwrap(),
            job.spec
        );
        let default_bucket = plan(&self::config(&[]), &object("in/x.csv"), 1, JOB).unwrap();
        let Plan::Launch(job) = default_bucket else {
            panic!()
        };
        assert_eq!(job.spec.results_bucket, "data");
    }
}
