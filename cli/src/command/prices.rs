//! `s3spot prices`: the spot price history, as the current price per type and zone.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use aws_sdk_ec2::primitives::{DateTime, DateTimeFormat};
use clap::Args;
use s3spot_lambda::prices::{self, Quote};
use s3spot_lambda::{Ec2Launcher, Launcher as _, PriceQuery};

#[derive(Args)]
pub struct PricesArgs {
    /// Comma-separated instance types; default: the launcher's S3SPOT_INSTANCE_TYPES.
    #[arg(
        long,
        value_name = "TYPES",
        env = "S3SPOT_INSTANCE_TYPES",
        value_delimiter = ',',
        required = true
    )]
    instance_types: Vec<String>,
    /// Default: the AWS configuration's region.
    #[arg(long)]
    region: Option<String>,
    /// Only this availability zone, e.g. us-east-1a.
    #[arg(long, value_name = "AZ")]
    az: Option<String>,
    /// Also read the history this far back (e.g. 1d) and show its lowest and highest price;
    /// default: only the prices in effect now.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Also name the cheapest pool (type and zone) and every pool the launcher's fleet request
    /// chooses among, cheapest first. Exits 1 if none has a price.
    #[arg(long)]
    recommend: bool,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PricesArgs) -> anyhow::Result<bool> {
    let types: Vec<String> = args
        .instance_types
        .iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if types.is_empty() {
        anyhow::bail!(
            "no instance types: give --instance-types t3.micro,m5.large or set S3SPOT_INSTANCE_TYPES"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (quotes, region) = runtime.block_on(async {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &args.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let region = sdk.region().map(ToString::to_string).unwrap_or_default();
        let now = SystemTime::now();
        let since = now - args.since.unwrap_or_default();
        let query = PriceQuery {
            instance_types: types.clone(),
            availability_zone: args.az.clone(),
            since: Some(DateTime::from(since).secs()),
            until: None,
        };
        let history = Ec2Launcher::new(&sdk)
            .spot_prices(&query)
            .await
            .map_err(|error| anyhow::anyhow!("cannot read spot prices in {region:?}: {error}"))?;
        anyhow::Ok((prices::current(&history, &region), region))
    })?;
    let recommended = prices::recommend(&quotes, &types);
    let pools = prices::pools(&quotes, &types);
    if args.json {
        let mut document = serde_json::json!({ "region": region, "prices": quotes });
        if args.recommend {
            document["recommendation"] = serde_json::json!(recommended);
            document["pools"] = serde_json::json!(pools);
        }
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print!("{}", table(&quotes, args.since.is_some()));
        if args.recommend {
            match recommended {
                Some(best) => println!(
                    "recommended: {} in {} at ${}/h\npools of the fleet request, cheapest \
                     first (price-capacity-optimized takes the cheapest with capacity): {}",
                    best.instance_type,
                    best.availability_zone,
                    best.spot_usd_per_hour,
                    pools
                        .iter()
                        .map(|q| format!(
                            "{} in {} ${}/h",
                            q.instance_type, q.availability_zone, q.spot_usd_per_hour
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => println!("recommended: none of {} has a spot price", types.join(",")),
            }
        }
    }
    Ok(!args.recommend || recommended.is_some())
}

fn table(quotes: &[Quote], with_range: bool) -> String {
    if quotes.is_empty() {
        return "no spot prices for these types here\n".into();
    }
    // As EC2 gives them: spot prices have up to six decimals, list prices three to five.
    let dollars = |usd: f64| format!("{usd}");
    let mut header = vec!["TYPE", "ZONE", "SPOT $/H", "ON-DEMAND $/H", "SAVING"];
    if with_range {
        header.extend(["LOW", "HIGH"]);
    }
    header.push("SINCE");
    let rows: Vec<Vec<String>> = quotes
        .iter()
        .map(|q| {
            let mut row = vec![
                q.instance_type.clone(),
                q.availability_zone.clone(),
                dollars(q.spot_usd_per_hour),
                q.on_demand_usd_per_hour.map_or_else(|| "-".into(), dollars),
                q.on_demand_usd_per_hour.filter(|od| *od > 0.0).map_or_else(
                    || "-".into(),
                    |od| format!("{:.0}%", 100.0 * (1.0 - q.spot_usd_per_hour / od)),
                ),
            ];
            if with_range {
                row.extend([dollars(q.low_usd_per_hour), dollars(q.high_usd_per_hour)]);
            }
            row.push(
                DateTime::from_secs(q.since)
                    .fmt(DateTimeFormat::DateTime)
                    .unwrap_or_default(),
            );
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(header.iter().map(|h| (*h).to_owned()).collect()).chain(rows) {
        let row: Vec<String> = row;
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}
