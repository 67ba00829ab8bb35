//! What an attempt cost: the price its instance ran at, for how long, and its volume.
//!
//! The launcher knows the price when it launches (the spot price of the type and zone EC2
//! chose, or the on-demand list price) and keeps it in the attempt's claim as a
//! [`LaunchPrice`]; whoever writes the attempt's outcome turns it into a [`Cost`] in
//! `status.json`. It is an estimate: see [`Cost::estimate`] for what it counts.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::status::{parse_timestamp, timestamp};

/// US dollars. Compared by their bits, so that the documents that hold them can be `Eq`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Usd(pub f64);

impl PartialEq for Usd {
    fn eq(&self, other: &Usd) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Usd {}

impl std::fmt::Display for Usd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Jobs of a few minutes cost fractions of a cent: four decimals say something.
        if self.0.abs() < 1.0 {
            write!(f, "${:.4}", self.0)
        } else {
            write!(f, "${:.2}", self.0)
        }
    }
}

/// gp3 storage in us-east-1, per GiB-month, as AWS published it in 2026.
pub const EBS_GP3_USD_PER_GIB_MONTH: f64 = 0.08;
/// EBS prorates a GiB-month by the second over a month of 730 hours.
const SECONDS_PER_MONTH: f64 = 730.0 * 3600.0;
/// EC2 bills Linux instances by the second, with a minimum of one minute.
pub const MIN_BILLED_SECS: u64 = 60;

/// The price an attempt's instance was launched at, as the launcher found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPrice {
    pub instance_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// `spot` or `on-demand`.
    pub market: String,
    /// `None` when it could not be found: `source` says why.
    pub usd_per_hour: Option<Usd>,
    /// Where the price comes from: `spot price at launch`, `on-demand list price`, or why
    /// there is none.
    pub source: String,
    /// What the type costs on demand, where s3spot knows it: the comparison `jobs cost` shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_usd_per_hour: Option<Usd>,
    /// RFC 3339, UTC.
    pub launched_at: String,
    /// The job's volume, when the launch sized it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_gib: Option<u64>,
}

/// An attempt's estimated cost, as `status.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    pub market: String,
    pub instance_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The price the instance ran at.
    pub usd_per_hour: Usd,
    /// Where that price comes from.
    pub price: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_usd_per_hour: Option<Usd>,
    /// RFC 3339, UTC: the launch, and when the attempt's account was written.
    pub launched_at: String,
    pub ended_at: String,
    /// From the launch to the end.
    pub seconds: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_gib: Option<u64>,
    pub compute_usd: Usd,
    pub ebs_usd: Usd,
    /// Compute plus EBS.
    pub usd: Usd,
    /// The same time at the on-demand price, where it is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_demand_usd: Option<Usd>,
}

impl Cost {
    /// The cost of an instance launched at `price` that ran until `ended`: its price per hour
    /// for the seconds from launch to `ended` (at least EC2's minute), plus its gp3 volume for
    /// as long. `None` without a price, or without a readable launch time.
    ///
    /// Left out: data transfer, requests, the Lambda, the seconds between the account and the
    /// instance's power-off, and the root volume when the launch did not size it.
    pub fn estimate(price: &LaunchPrice, ended: SystemTime) -> Option<Cost> {
        let usd_per_hour = price.usd_per_hour?;
        let launched = parse_timestamp(&price.launched_at)?;
        let seconds = ended
            .duration_since(launched)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let billed = seconds.max(MIN_BILLED_SECS) as f64;
        let compute = usd_per_hour.0 * billed / 3600.0;
        let ebs = price.volume_gib.map_or(0.0, |gib| {
            gib as f64 * EBS_GP3_USD_PER_GIB_MONTH * seconds as f64 / SECONDS_PER_MONTH
        });
        Some(Cost {
            market: price.market.clone(),
            instance_type: price.instance_type.clone(),
            zone: price.zone.clone(),
            usd_per_hour,
            price: price.source.clone(),
            on_demand_usd_per_hour: price.on_demand_usd_per_hour,
            launched_at: price.launched_at.clone(),
            ended_at: timestamp(ended),
            seconds,
            volume_gib: price.volume_gib,
            compute_usd: Usd(compute),
            ebs_usd: Usd(ebs),
            usd: Usd(compute + ebs),
            on_demand_usd: price
                .on_demand_usd_per_hour
                .map(|od| Usd(od.0 * billed / 3600.0 + ebs)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn price(usd: Option<f64>, volume_gib: Option<u64>) -> LaunchPrice {
        LaunchPrice {
            instance_type: "m5.large".into(),
            zone: Some("us-east-1a".into()),
            market: "spot".into(),
            usd_per_hour: usd.map(Usd),
            source: "spot price at launch".into(),
            on_demand_usd_per_hour: Some(Usd(0.096)),
            launched_at: "2026-11-30T10:00:00Z".into(),
            volume_gib,
        }
    }

    fn at(secs: u64) -> SystemTime {
        parse_timestamp("2026-11-30T10:00:00Z").unwrap() + Duration::from_secs(secs)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn an_hour_costs_the_hourly_price_plus_the_volume() {
        let cost = Cost::estimate(&price(Some(0.036), Some(730)), at(3600)).unwrap();
        assert_eq!(cost.seconds, 3600);
        assert!(close(cost.compute_usd.0, 0.036));
        // 730 GiB for one hour of a 730-hour month: 1 GiB-month.
        assert!(close(cost.ebs_usd.0, 0.08));
        assert!(close(cost.usd.0, 0.116));
        assert!(close(cost.on_demand_usd.unwrap().0, 0.096 + 0.08));
        assert_eq!(cost.ended_at, "2026-11-30T11:00:00Z");
    }

    #[test]
    fn less_than_a_minute_is_billed_as_one() {
        let cost = Cost::estimate(&price(Some(0.06), None), at(10)).unwrap();
        assert_eq!(cost.seconds, 10);
        assert!(close(cost.compute_usd.0, 0.001));
        assert!(close(cost.ebs_usd.0, 0.0));
    }

    #[test]
    fn no_price_or_no_launch_time_is_no_estimate() {
        assert_eq!(Cost::estimate(&price(None, Some(8)), at(60)), None);
        let mut undated = price(Some(0.1), None);
        undated.launched_at = "yesterday".into();
        assert_eq!(Cost::estimate(&undated, at(60)), None);
        // A clock behind the launch counts no time rather than wrapping.
        let early = Cost::estimate(&price(Some(0.06), None), at(0) - Duration::from_secs(5));
        assert_eq!(early.unwrap().seconds, 0);
    }

    #[test]
    fn dollars_read_as_people_write_them() {
        assert_eq!(Usd(0.00312).to_string(), "$0.0031");
        assert_eq!(Usd(12.345).to_string(), "$12.35");
    }
}
