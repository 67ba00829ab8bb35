//! Spot prices: the current one per type and zone, the cheapest fit, and the order to try types
//! in. Used by `s3spot prices`.

use std::collections::HashMap;

use serde::Serialize;

use crate::launcher::SpotPrice;

/// Linux on-demand list prices in us-east-1, US dollars per hour, as AWS published them in
/// 2026. Only for comparison beside a spot price: the Pricing API would need an account-wide
/// permission and a second SDK for a number that changes once in years. Other regions show none.
const ON_DEMAND_US_EAST_1: &[(&str, f64)] = &[
    ("t3.nano", 0.0052),
    ("t3.micro", 0.0104),
    ("t3.small", 0.0208),
    ("t3.medium", 0.0416),
    ("t3.large", 0.0832),
    ("t3.xlarge", 0.1664),
    ("t3.2xlarge", 0.3328),
    ("t3a.micro", 0.0094),
    ("t3a.small", 0.0188),
    ("t3a.medium", 0.0376),
    ("t3a.large", 0.0752),
    ("t4g.micro", 0.0084),
    ("t4g.small", 0.0168),
    ("t4g.medium", 0.0336),
    ("m5.large", 0.096),
    ("m5.xlarge", 0.192),
    ("m5.2xlarge", 0.384),
    ("m5.4xlarge", 0.768),
    ("m6i.large", 0.096),
    ("m6i.xlarge", 0.192),
    ("m6i.2xlarge", 0.384),
    ("m6g.large", 0.077),
    ("m7i.large", 0.1008),
    ("m7i.xlarge", 0.2016),
    ("m7i.2xlarge", 0.4032),
    ("c5.large", 0.085),
    ("c5.xlarge", 0.17),
    ("c5.2xlarge", 0.34),
    ("c6i.large", 0.085),
    ("c6i.xlarge", 0.17),
    ("c6g.large", 0.068),
    ("c7i.large", 0.08925),
    ("c7i.xlarge", 0.1785),
    ("r5.large", 0.126),
    ("r5.xlarge", 0.252),
    ("r6i.large", 0.126),
    ("r6i.xlarge", 0.252),
];

/// The on-demand price of a type, where s3spot knows it.
pub fn on_demand_usd_per_hour(region: &str, instance_type: &str) -> Option<f64> {
    if region != "us-east-1" {
        return None;
    }
    ON_DEMAND_US_EAST_1
        .iter()
        .find(|(name, _)| *name == instance_type)
        .map(|(_, price)| *price)
}

/// One row of `s3spot prices`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quote {
    pub instance_type: String,
    pub availability_zone: String,
    pub spot_usd_per_hour: f64,
    pub on_demand_usd_per_hour: Option<f64>,
    /// Seconds since the Unix epoch: when this price took effect.
    pub since: i64,
    /// The lowest and highest price in the history read.
    pub low_usd_per_hour: f64,
    pub high_usd_per_hour: f64,
}

/// The price in effect now for each type and zone (the newest entry of the history), cheapest
/// first; ties by type, then zone, so that the order is stable.
pub fn current(history: &[SpotPrice], region: &str) -> Vec<Quote> {
    // The newest entry, the lowest and the highest price, per type and zone.
    let mut seen: HashMap<(&str, &str), (&SpotPrice, f64, f64)> = HashMap::new();
    for price in history {
        let usd = price.usd_per_hour;
        let (newest, low, high) = seen
            .entry((&price.instance_type, &price.availability_zone))
            .or_insert((price, usd, usd));
        if price.at > newest.at {
            *newest = price;
        }
        *low = low.min(usd);
        *high = high.max(usd);
    }
    let mut quotes: Vec<Quote> = seen
        .into_values()
        .map(|(price, low, high)| Quote {
            instance_type: price.instance_type.clone(),
            availability_zone: price.availability_zone.clone(),
            spot_usd_per_hour: price.usd_per_hour,
            on_demand_usd_per_hour: on_demand_usd_per_hour(region, &price.instance_type),
            since: price.at,
            low_usd_per_hour: low,
            high_usd_per_hour: high,
        })
        .collect();
    quotes.sort_by(|a, b| {
        a.spot_usd_per_hour
            .total_cmp(&b.spot_usd_per_hour)
            .then_with(|| a.instance_type.cmp(&b.instance_type))
            .then_with(|| a.availability_zone.cmp(&b.availability_zone))
    });
    quotes
}

/// The cheapest current quote among `allowed` types (any type when `allowed` is empty). Among
/// equally cheap types, the one listed first in `allowed` wins.
pub fn recommend<'q>(quotes: &'q [Quote], allowed: &[String]) -> Option<&'q Quote> {
    let rank = |q: &Quote| allowed.iter().position(|t| *t == q.instance_type);
    let fitting = || {
        quotes
            .iter()
            .filter(move |q| allowed.is_empty() || rank(q).is_some())
    };
    let cheapest = fitting().map(|q| q.spot_usd_per_hour).reduce(f64::min)?;
    // `quotes` is sorted cheapest first, so the zone is the first one listed at that price.
    fitting()
        .filter(|q| q.spot_usd_per_hour == cheapest)
        .min_by_key(|q| rank(q))
}

/// The pools (type × zone) of `allowed` types (any type when empty), cheapest first: what the
/// fleet request's price-capacity-optimized strategy chooses among, the cheapest pools that
/// have capacity first.
pub fn pools<'q>(quotes: &'q [Quote], allowed: &[String]) -> Vec<&'q Quote> {
    quotes
        .iter()
        .filter(|q| allowed.is_empty() || allowed.contains(&q.instance_type))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(instance_type: &str, zone: &str, usd: f64, at: i64) -> SpotPrice {
        SpotPrice {
            instance_type: instance_type.into(),
            availability_zone: zone.into(),
            usd_per_hour: usd,
            at,
        }
    }

    #[test]
    fn the_newest_price_per_type_and_zone_counts_cheapest_first() {
        let history = [
            price("m5.large", "us-east-1a", 0.050, 100),
            price("m5.large", "us-east-1a", 0.030, 200),
            price("m5.large", "us-east-1b", 0.020, 150),
            price("t3.micro", "us-east-1a", 0.004, 50),
            price("t3.micro", "us-east-1a", 0.009, 10),
        ];
        let quotes = current(&history, "us-east-1");
        let rows: Vec<(&str, &str, f64)> = quotes
            .iter()
            .map(|q| {
                (
                    q.instance_type.as_str(),
                    q.availability_zone.as_str(),
                    q.spot_usd_per_hour,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                ("t3.micro", "us-east-1a", 0.004),
                ("m5.large", "us-east-1b", 0.020),
                ("m5.large", "us-east-1a", 0.030),
            ]
        );
        assert_eq!(quotes[1].on_demand_usd_per_hour, Some(0.096));
        let a = &quotes[2];
        assert_eq!(
            (a.low_usd_per_hour, a.high_usd_per_hour, a.since),
            (0.030, 0.050, 200)
        );
        assert_eq!(
            current(&history, "eu-west-1")[1].on_demand_usd_per_hour,
            None
        );
    }

    #[test]
    fn recommendations_stay_within_the_configured_types() {
        let quotes = current(
            &[
                price("t3.micro", "a", 0.004, 1),
                price("m5.large", "b", 0.02, 1),
                price("c5.large", "a", 0.03, 1),
            ],
            "us-east-1",
        );
        assert_eq!(recommend(&quotes, &[]).unwrap().instance_type, "t3.micro");
        let allowed = ["c5.large".to_owned(), "m5.large".to_owned()];
        let best = recommend(&quotes, &allowed).unwrap();
        assert_eq!(
            (best.instance_type.as_str(), best.availability_zone.as_str()),
            ("m5.large", "b")
        );
        assert_eq!(recommend(&quotes, &["x1.32xlarge".to_owned()]), None);

        // A tie goes to the type listed first, as in the launch order.
        let tied = current(
            &[
                price("c5.large", "a", 0.02, 1),
                price("m5.large", "a", 0.02, 1),
            ],
            "us-east-1",
        );
        let allowed = ["m5.large".to_owned(), "c5.large".to_owned()];
        assert_eq!(
            recommend(&tied, &allowed).unwrap().instance_type,
            "m5.large"
        );
    }

    #[test]
    fn pools_are_each_type_in_each_zone_cheapest_first() {
        let quotes = current(
            &[
                price("c5.large", "a", 0.03, 1),
                price("c5.large", "b", 0.01, 1),
                price("m5.large", "b", 0.02, 1),
                price("x1.large", "a", 0.001, 1),
            ],
            "us-east-1",
        );
        let allowed = ["m5.large", "c5.large"].map(String::from);
        let pools: Vec<(&str, &str)> = pools(&quotes, &allowed)
            .iter()
            .map(|q| (q.instance_type.as_str(), q.availability_zone.as_str()))
            .collect();
        assert_eq!(
            pools,
            [("c5.large", "b"), ("m5.large", "b"), ("c5.large", "a")]
        );
    }
}
