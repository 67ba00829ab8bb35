//! Deterministic identities: the job id (an instance tag, and the job's results folder) and the
//! `CreateFleet` `ClientToken`.
//!
//! S3 delivers each event at least once and Lambda retries, so the same object may be handled
//! several times. EC2 answers a repeated fleet request with the first one's fleet, so the token
//! must come from the event and the request alone.

use s3spot_bootstrap::UploadIdentity;
use sha2::{Digest as _, Sha256};

use crate::config::MarketType;
use crate::event::ObjectCreated;
use crate::fleet::{InstanceRequirements, Pool};

/// 32 hex digits naming one upload of one object in one pipeline; see [`s3spot_bootstrap::job_id`].
pub fn job_id(pipeline: &str, object: &ObjectCreated) -> String {
    s3spot_bootstrap::job_id(
        pipeline,
        &object.bucket,
        &object.key,
        UploadIdentity {
            version_id: object.version_id.as_deref(),
            sequencer: object.sequencer.as_deref(),
            etag: object.etag.as_deref(),
            event_time: object.event_time.as_deref(),
        },
    )
}

/// What a fleet request asks for, beyond the job: its token changes with any of it.
#[derive(Debug, Clone, Copy)]
pub struct RequestShape<'a> {
    pub market: MarketType,
    pub pools: &'a [Pool],
    pub requirements: Option<&'a InstanceRequirements>,
    pub volume_gib: Option<u64>,
    /// Earlier tries of the attempt that EC2 answered with no instance (see
    /// `s3spot_bootstrap::Claim::refused`).
    pub refused: u32,
}

/// `<job id>-<attempt>-<request>`: at most 32 + 1 + 10 + 1 + 12 = 56 characters, within EC2's
/// 64. Each market gets its own token, so falling back from spot to on-demand is a new request
/// rather than a parameter mismatch; so does a changed set of pools, and a try after EC2
/// refused the last one (a repeated token gets the first answer again).
pub fn client_token(job_id: &str, attempt: u32, shape: RequestShape<'_>) -> String {
    let parts = serde_json::json!([
        shape.market,
        shape.pools,
        shape.requirements.map(ToString::to_string),
        shape.volume_gib,
        shape.refused
    ]);
    let option_digest = hex::encode(Sha256::digest(parts.to_string()));
    format!("{job_id}-{attempt}-{}", &option_digest[..12])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object() -> ObjectCreated {
        ObjectCreated {
            bucket: "data".into(),
            key: "in/data.csv".into(),
            version_id: Some("v1".into()),
            etag: Some("e1".into()),
            size: Some(10),
            sequencer: Some("0A".into()),
            event_time: Some("2024-05-01T12:00:00.000Z".into()),
        }
    }

    fn spot() -> RequestShape<'static> {
        RequestShape {
            market: MarketType::Spot,
            pools: &[],
            requirements: None,
            volume_gib: Some(9),
            refused: 0,
        }
    }

    #[test]
    fn the_same_event_gives_the_same_token() {
        let id = job_id("s3spot", &object());
        assert_eq!(id, job_id("s3spot", &object()));
        assert_eq!(id.len(), 32);
        assert_eq!(client_token(&id, 1, spot()), client_token(&id, 1, spot()));
    }

    #[test]
    fn tokens_fit_ec2s_limit_even_at_the_largest_attempt() {
        let id = job_id("s3spot", &object());
        let pools = crate::fleet::pools(&["u-24tb1.224xlarge".into()], &["subnet-0abc".into()]);
        let shape = RequestShape {
            market: MarketType::OnDemand,
            pools: &pools,
            ..spot()
        };
        let token = client_token(&id, u32::MAX, shape);
        assert!(token.len() <= 64, "{token}");
        assert!(token.is_ascii());
    }

    #[test]
    fn every_input_changes_the_token() {
        let base = object();
        let id = job_id("s3spot", &base);
        let token = client_token(&id, 1, spot());
        let pools = crate::fleet::pools(&["m7i.large".into()], &[]);
        let zones = crate::fleet::pools(&["m7i.large".into()], &["subnet-1".into()]);
        let requirements = InstanceRequirements::parse("vcpu=2-4").unwrap();
        let mut variants = vec![
            client_token(&job_id("other-pipeline", &base), 1, spot()),
            client_token(&id, 2, spot()),
            client_token(
                &id,
                1,
                RequestShape {
                    market: MarketType::OnDemand,
                    ..spot()
                },
            ),
            client_token(
                &id,
                1,
                RequestShape {
                    pools: &pools,
                    ..spot()
                },
            ),
            client_token(
                &id,
                1,
                RequestShape {
                    pools: &zones,
                    ..spot()
                },
            ),
            client_token(
                &id,
                1,
                RequestShape {
                    requirements: Some(&requirements),
                    ..spot()
                },
            ),
            client_token(
                &id,
                1,
                RequestShape {
                    volume_gib: Some(10),
                    ..spot()
                },
            ),
            client_token(
                &id,
                1,
                RequestShape {
                    refused: 1,
                    ..spot()
                },
            ),
        ];
        for change in [
            |o: &mut ObjectCreated| o.bucket = "data2".into(),
            |o: &mut ObjectCreated| o.key = "in/data.csv2".into(),
            |o: &mut ObjectCreated| o.version_id = Some("v2".into()),
        ] {
            let mut changed = base.clone();
            change(&mut changed);
            variants.push(client_token(&job_id("s3spot", &changed), 1, spot()));
        }
        for variant in &variants {
            assert_ne!(variant, &token);
        }
        let mut unique = variants.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), variants.len());
    }
}
