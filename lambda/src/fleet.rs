//! What one fleet request may launch: its pools (instance type × subnet), the attributes that
//! choose types by themselves, and the size of the job's disk.

use std::fmt;

/// GiB, in bytes.
const GIB: u64 = 1 << 30;
/// MiB, in bytes.
const MIB: u64 = 1 << 20;

/// gp3, gp2 and io volumes hold at most 16 TiB.
pub const EBS_MAX_GIB: u64 = 16 * 1024;

/// One pool of capacity: an instance type (or any type the requirements allow) in a subnet (or
/// the template's). Spot capacity is counted per pool; each fails or launches on its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    /// `None`: the template's type, or any type matching `S3SPOT_INSTANCE_REQUIREMENTS`.
    pub instance_type: Option<String>,
    /// `None`: the template's subnet.
    pub subnet_id: Option<String>,
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.instance_type.as_deref().unwrap_or("any type"))?;
        if let Some(subnet) = &self.subnet_id {
            write!(f, " in {subnet}")?;
        }
        Ok(())
    }
}

/// Every instance type in every subnet: the fleet request's overrides.
pub fn pools(instance_types: &[String], subnets: &[String]) -> Vec<Pool> {
    let types: Vec<Option<String>> = if instance_types.is_empty() {
        vec![None]
    } else {
        instance_types.iter().cloned().map(Some).collect()
    };
    let subnets: Vec<Option<String>> = if subnets.is_empty() {
        vec![None]
    } else {
        subnets.iter().cloned().map(Some).collect()
    };
    types
        .iter()
        .flat_map(|instance_type| {
            subnets.iter().map(move |subnet_id| Pool {
                instance_type: instance_type.clone(),
                subnet_id: subnet_id.clone(),
            })
        })
        .collect()
}

/// An inclusive range; `max` `None`: no upper bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Range {
    pub min: u64,
    pub max: Option<u64>,
}

/// Whether burstable (T) types may be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Burstable {
    Excluded,
    Included,
    Required,
}

/// `S3SPOT_INSTANCE_REQUIREMENTS`: the attributes EC2 chooses instance types by (the fleet's
/// `InstanceRequirements`), e.g. `vcpu=2-8 memory=4GiB-32GiB arch=x86_64 exclude=t2.*,m4.*
/// burstable=false`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InstanceRequirements {
    pub vcpu: Range,
    /// In MiB.
    pub memory_mib: Range,
    /// `x86_64` (Intel and AMD) or `arm64` (Graviton); empty: any.
    pub architectures: Vec<String>,
    /// Types or patterns such as `t2.*`.
    pub excluded: Vec<String>,
    /// EC2's default is excluded.
    pub burstable: Burstable,
    /// Only current-generation types.
    pub current_generation: bool,
}

/// The CPU manufacturers of an architecture, as EC2's `CpuManufacturers` names them.
pub fn manufacturers(architecture: &str) -> &'static [&'static str] {
    match architecture {
        "x86_64" => &["intel", "amd"],
        "arm64" => &["amazon-web-services"],
        _ => &[],
    }
}

const REQUIREMENTS_EXAMPLE: &str =
    "e.g. \"vcpu=2-8 memory=4GiB-32GiB arch=x86_64 exclude=t2.*,m4.* burstable=false\"";

impl InstanceRequirements {
    pub fn parse(text: &str) -> Result<InstanceRequirements, String> {
        let mut requirements = InstanceRequirements {
            vcpu: Range { min: 0, max: None },
            memory_mib: Range { min: 0, max: None },
            architectures: Vec::new(),
            excluded: Vec::new(),
            burstable: Burstable::Excluded,
            current_generation: false,
        };
        let mut vcpu_given = false;
        for item in text.split_whitespace() {
            let (name, value) = item.split_once('=').ok_or_else(|| {
                format!("{item:?} is not name=value; expected {REQUIREMENTS_EXAMPLE}")
            })?;
            match name {
                "vcpu" => {
                    requirements.vcpu = parse_range(value, |n| {
                        n.parse::<u64>()
                            .map_err(|_| format!("{n:?} is not a whole number of vCPUs"))
                    })?;
                    vcpu_given = true;
                }
                "memory" => requirements.memory_mib = parse_memory(value)?,
                "arch" => {
                    for arch in value.split(',') {
                        if manufacturers(arch).is_empty() {
                            return Err(format!(
                                "arch={arch:?}: expected x86_64 or arm64 (the image's architecture)"
                            ));
                        }
                        requirements.architectures.push(arch.to_owned());
                    }
                }
                "exclude" => {
                    for pattern in value.split(',') {
                        let ok = !pattern.is_empty()
                            && pattern.len() <= 30
                            && pattern.bytes().all(|b| {
                                b.is_ascii_lowercase() || b.is_ascii_digit() || b".*-".contains(&b)
                            });
                        if !ok {
                            return Err(format!(
                                "exclude={pattern:?}: expected instance types or patterns such as \
                                 t2.* or m5.large, separated by commas"
                            ));
                        }
                        requirements.excluded.push(pattern.to_owned());
                    }
                }
                "burstable" => {
                    requirements.burstable = match value {
                        "false" | "excluded" => Burstable::Excluded,
                        "true" | "included" => Burstable::Included,
                        "only" | "required" => Burstable::Required,
                        other => {
                            return Err(format!(
                                "burstable={other:?}: expected false, true or only"
                            ));
                        }
                    }
                }
                "generation" => {
                    requirements.current_generation = match value {
                        "current" => true,
                        "any" => false,
                        other => {
                            return Err(format!("generation={other:?}: expected current or any"));
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "{other:?} is not a requirement; expected vcpu, memory, arch, exclude, \
                         burstable or generation, {REQUIREMENTS_EXAMPLE}"
                    ));
                }
            }
        }
        if !vcpu_given {
            return Err(format!("vcpu is required, {REQUIREMENTS_EXAMPLE}"));
        }
        if requirements.vcpu.min == 0 {
            return Err("vcpu: the least number of vCPUs is at least 1".into());
        }
        Ok(requirements)
    }
}

fn parse_range(value: &str, number: impl Fn(&str) -> Result<u64, String>) -> Result<Range, String> {
    let (min, max) = match value.split_once('-') {
        Some((min, "")) => (number(min)?, None),
        Some((min, max)) => (number(min)?, Some(number(max)?)),
        None => {
            let exact = number(value)?;
            (exact, Some(exact))
        }
    };
    if max.is_some_and(|max| max < min) {
        return Err(format!(
            "{value:?}: the range's upper end is below its lower end"
        ));
    }
    Ok(Range { min, max })
}

/// `4GiB-16GiB`, `4-16GiB`, `512MiB-`, `8GiB`.
fn parse_memory(value: &str) -> Result<Range, String> {
    // A unit after the range applies to both ends.
    let (range, unit) = ["GiB", "MiB"]
        .iter()
        .find_map(|unit| value.strip_suffix(unit).map(|range| (range, *unit)))
        .unwrap_or((value, ""));
    let to_mib = |n: &str| -> Result<u64, String> {
        let (digits, unit) = match ["GiB", "MiB"]
            .iter()
            .find_map(|u| n.strip_suffix(u).map(|d| (d, *u)))
        {
            Some(found) => found,
            None if !unit.is_empty() => (n, unit),
            None => {
                return Err(format!(
                    "memory={value:?}: give a unit, GiB or MiB, e.g. memory=4GiB-16GiB"
                ));
            }
        };
        let amount: u64 = digits
            .parse()
            .map_err(|_| format!("memory={value:?}: {digits:?} is not a whole number"))?;
        if unit == "GiB" {
            amount.checked_mul(1024).ok_or_else(|| {
                format!("memory={value:?}: {digits} GiB is more than any instance has")
            })
        } else {
            Ok(amount)
        }
    };
    parse_range(range, to_mib)
}

impl fmt::Display for InstanceRequirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let range = |range: Range, unit: &str| match range.max {
            Some(max) if max == range.min => format!("{}{unit}", range.min),
            Some(max) => format!("{}{unit}-{max}{unit}", range.min),
            None => format!("{}{unit}-", range.min),
        };
        write!(f, "vcpu={}", range(self.vcpu, ""))?;
        if self.memory_mib != (Range { min: 0, max: None }) {
            write!(f, " memory={}", range(self.memory_mib, "MiB"))?;
        }
        if !self.architectures.is_empty() {
            write!(f, " arch={}", self.architectures.join(","))?;
        }
        if !self.excluded.is_empty() {
            write!(f, " exclude={}", self.excluded.join(","))?;
        }
        let burstable = match self.burstable {
            Burstable::Excluded => "false",
            Burstable::Included => "true",
            Burstable::Required => "only",
        };
        write!(f, " burstable={burstable}")?;
        if self.current_generation {
            f.write_str(" generation=current")?;
        }
        Ok(())
    }
}

/// `S3SPOT_DISK`: the job's root volume, as a multiple of the object's size plus a base, e.g.
/// `3x+8GiB` (room for the input, its outputs and the system).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DiskRule {
    /// Thousandths: 3x is 3000.
    pub per_mille: u64,
    pub base_gib: u64,
}

impl DiskRule {
    pub fn parse(text: &str) -> Result<DiskRule, String> {
        let example =
            "expected a multiple of the object's size plus a base, e.g. 3x+8GiB, 2x or 50GiB";
        let mut rule = DiskRule {
            per_mille: 0,
            base_gib: 0,
        };
        for term in text.split('+').map(str::trim) {
            if let Some(factor) = term.strip_suffix('x') {
                let value: f64 = factor
                    .parse()
                    .ok()
                    .filter(|f: &f64| f.is_finite() && *f > 0.0 && *f <= 100.0)
                    .ok_or_else(|| format!("{term:?}: {example}"))?;
                // At most 100, so the product fits.
                let per_mille = (value * 1000.0).round() as u64;
                rule.per_mille += per_mille;
            } else if let Some(gib) = term.strip_suffix("GiB") {
                rule.base_gib += gib
                    .parse::<u64>()
                    .ok()
                    .filter(|g| *g <= EBS_MAX_GIB)
                    .ok_or_else(|| format!("{term:?}: {example}"))?;
            } else {
                return Err(format!("{term:?}: {example}"));
            }
        }
        if rule.base_gib == 0 {
            return Err(format!(
                "{text:?} has no base: the system needs room too, {example}"
            ));
        }
        Ok(rule)
    }

    /// The volume for an object of `size` bytes, in whole GiB, rounded up. An object of unknown
    /// size gets the base.
    pub fn size_gib(&self, size: Option<u64>) -> u64 {
        let bytes = u128::from(size.unwrap_or(0)) * u128::from(self.per_mille) / 1000;
        let scaled = bytes.div_ceil(u128::from(GIB));
        self.base_gib
            .saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX))
    }
}

impl fmt::Display for DiskRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per_mille > 0 {
            if self.per_mille.is_multiple_of(1000) {
                write!(f, "{}x+", self.per_mille / 1000)?;
            } else {
                let factor = self.per_mille as f64 / 1000.0;
                write!(f, "{factor}x+")?;
            }
        }
        write!(f, "{}GiB", self.base_gib)
    }
}

/// Bytes as people read them: `1.5 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    let value = bytes as f64;
    if bytes >= GIB {
        format!("{:.1} GiB", value / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", value / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_in_every_subnet() {
        let types = ["m5.large".to_owned(), "c5.large".to_owned()];
        let subnets = ["subnet-a".to_owned(), "subnet-b".to_owned()];
        let pools = pools(&types, &subnets);
        assert_eq!(pools.len(), 4);
        assert_eq!(pools[0].to_string(), "m5.large in subnet-a");
        assert_eq!(pools[3].to_string(), "c5.large in subnet-b");
        assert_eq!(
            super::pools(&[], &[]),
            [Pool {
                instance_type: None,
                subnet_id: None
            }]
        );
    }

    #[test]
    fn requirements_read_as_written() {
        let r = InstanceRequirements::parse(
            "vcpu=2-8 memory=4GiB-32GiB arch=x86_64 exclude=t2.*,m4.large burstable=false \
             generation=current",
        )
        .unwrap();
        assert_eq!(
            r.vcpu,
            Range {
                min: 2,
                max: Some(8)
            }
        );
        assert_eq!(
            r.memory_mib,
            Range {
                min: 4096,
                max: Some(32768)
            }
        );
        assert_eq!(r.architectures, ["x86_64"]);
        assert_eq!(r.excluded, ["t2.*", "m4.large"]);
        assert_eq!(r.burstable, Burstable::Excluded);
        assert!(r.current_generation);
        assert_eq!(InstanceRequirements::parse(&r.to_string()).unwrap(), r);
        let open = InstanceRequirements::parse("vcpu=4- memory=512-MiB burstable=only").unwrap();
        assert_eq!(open.vcpu, Range { min: 4, max: None });
        assert_eq!(
            open.memory_mib,
            Range {
                min: 512,
                max: None
            }
        );
        assert_eq!(open.burstable, Burstable::Required);
        let exact = InstanceRequirements::parse("vcpu=2 memory=4-8GiB").unwrap();
        assert_eq!(
            exact.vcpu,
            Range {
                min: 2,
                max: Some(2)
            }
        );
        assert_eq!(exact.memory_mib.max, Some(8192));
    }

    #[test]
    fn bad_requirements_say_what_is_wrong() {
        for (text, expected) in [
            ("memory=4GiB", "vcpu is required"),
            ("vcpu=0-4", "at least 1"),
            ("vcpu=8-2", "upper end is below"),
            ("vcpu=two", "whole number of vCPUs"),
            ("vcpu=2 memory=4", "give a unit"),
            ("vcpu=2 arch=sparc", "x86_64 or arm64"),
            (
                "vcpu=2 memory=99999999999999999GiB",
                "more than any instance",
            ),
            ("vcpu=2 exclude=T2.*", "instance types or patterns"),
            ("vcpu=2 gpu=1", "not a requirement"),
            ("vcpu", "not name=value"),
            ("vcpu=2 burstable=maybe", "false, true or only"),
        ] {
            let error = InstanceRequirements::parse(text).unwrap_err();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    const KB: u64 = 1000;
    const GB: u64 = 1000 * 1000 * 1000;
    const TB: u64 = 1000 * GB;

    #[test]
    fn the_disk_fits_the_object() {
        let rule = DiskRule::parse("3x+8GiB").unwrap();
        assert_eq!(
            rule,
            DiskRule {
                per_mille: 3000,
                base_gib: 8
            }
        );
        // 3 KB rounds up to a whole GiB.
        assert_eq!(rule.size_gib(Some(KB)), 9);
        // 30 GB is 27.9 GiB: 28 + 8.
        assert_eq!(rule.size_gib(Some(10 * GB)), 36);
        // 6 TB is 5587.9 GiB: 5588 + 8.
        assert_eq!(rule.size_gib(Some(2 * TB)), 5596);
        assert_eq!(rule.size_gib(None), 8);
        assert_eq!(rule.size_gib(Some(0)), 8);
        assert_eq!(DiskRule::parse(&rule.to_string()).unwrap(), rule);
        let half = DiskRule::parse("1.5x + 20GiB").unwrap();
        assert_eq!(half.size_gib(Some(2 * GIB)), 23);
        assert_eq!(half.to_string(), "1.5x+20GiB");
        assert_eq!(DiskRule::parse("50GiB").unwrap().size_gib(Some(TB)), 50);
    }

    #[test]
    fn bad_disk_rules_say_what_is_wrong() {
        for text in [
            "3x",
            "3y+8GiB",
            "x+8GiB",
            "-1x+8GiB",
            "3x+8GB",
            "",
            "3x+99999GiB",
        ] {
            let error = DiskRule::parse(text).unwrap_err();
            assert!(
                error.contains("3x+8GiB") || error.contains("no base"),
                "{text}: {error}"
            );
        }
    }
}
