//! Rank policies: how many components each factorized layer keeps.
//!
//! The rewrite resolves them per layer from the graph alone, except `latency=F`, which needs
//! tract and the export to measure and is resolved one layer up, in [`crate::tune`] (the
//! reason is in that module's doc).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// `--ranks` as given on the command line.
#[derive(Clone, Debug, PartialEq)]
pub enum RankPolicy {
    /// `ratio=F`: ranks are F times the channel counts (r_in = F*C_in, r_out = F*C_out).
    Ratio(f32),
    /// `params=F`: one ratio for every layer, solved so the whole model keeps F of its params.
    Params(f32),
    /// `macs=F`: likewise for multiply-accumulates.
    Macs(f32),
    /// `energy=F`: per layer, the smallest ranks keeping F of the squared singular values of
    /// the trained kernel's unfoldings (needs `--init decompose`).
    Energy(f32),
    /// A JSON file `{"layer": [r_in, r_out]}` (Tucker-2) or `{"layer": r}` (CP).
    File(PathBuf),
    /// `latency=F`: per-layer ranks chosen so that the model runs in F of its dense latency,
    /// measured in tract on this machine (resolved by [`crate::tune::resolve`] into
    /// [`Self::Explicit`]).
    Latency(f32),
    /// Per-layer ranks given by a caller, in the ranks-file form.
    Explicit(BTreeMap<String, Vec<usize>>),
}

fn fraction(what: &str, v: &str) -> Result<f32> {
    let f: f32 = v
        .trim()
        .parse()
        .with_context(|| format!("--ranks {what}={v}: not a number"))?;
    if !(f > 0.0 && f <= 1.0) {
        bail!("--ranks {what}={v}: must lie in (0, 1]");
    }
    Ok(f)
}

impl std::str::FromStr for RankPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<RankPolicy> {
        Ok(match s.split_once('=') {
            Some(("ratio", v)) => RankPolicy::Ratio(fraction("ratio", v)?),
            Some(("params", v)) => RankPolicy::Params(fraction("params", v)?),
            Some(("macs", v)) => RankPolicy::Macs(fraction("macs", v)?),
            Some(("energy", v)) => RankPolicy::Energy(fraction("energy", v)?),
            Some(("latency", v)) => RankPolicy::Latency(fraction("latency", v)?),
            Some(("file", v)) => RankPolicy::File(PathBuf::from(v)),
            _ if s.ends_with(".json") => RankPolicy::File(PathBuf::from(s)),
            _ => bail!(
                "--ranks '{s}': expected ratio=F, params=F, macs=F, energy=F, latency=F or a JSON file of per-layer ranks"
            ),
        })
    }
}

impl std::fmt::Display for RankPolicy {
    /// The `--ranks` form, which parses back to the same policy (fractions in their shortest
    /// exact form); per-layer ranks given by a caller show as `explicit`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RankPolicy::Ratio(v) => write!(f, "ratio={v}"),
            RankPolicy::Params(v) => write!(f, "params={v}"),
            RankPolicy::Macs(v) => write!(f, "macs={v}"),
            RankPolicy::Energy(v) => write!(f, "energy={v}"),
            RankPolicy::Latency(v) => write!(f, "latency={v}"),
            RankPolicy::File(p) if p.to_string_lossy().ends_with(".json") => {
                write!(f, "{}", p.display())
            }
            RankPolicy::File(p) => write!(f, "file={}", p.display()),
            RankPolicy::Explicit(_) => f.write_str("explicit"),
        }
    }
}

/// Rounds `x` to the nearest multiple of `multiple` (at least one multiple), capped at `max`.
pub fn round_rank(x: f64, multiple: usize, max: usize) -> usize {
    let m = multiple.max(1);
    let r = ((x / m as f64).round() as usize).max(1) * m;
    r.min(max).max(1)
}

/// Per-layer ranks read from a JSON file: each value a number (CP) or a list (Tucker-2).
pub fn read_rank_file(path: &std::path::Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the ranks file", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let obj = v.as_object().with_context(|| {
        format!(
            "{}: expected an object of layer names to ranks",
            path.display()
        )
    })?;
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        let ranks: Vec<usize> = match v {
            serde_json::Value::Number(n) => vec![n.as_u64().unwrap_or(0) as usize],
            serde_json::Value::Array(a) => {
                a.iter().map(|x| x.as_u64().unwrap_or(0) as usize).collect()
            }
            _ => bail!(
                "{}: layer '{k}': ranks must be a number or a list",
                path.display()
            ),
        };
        if ranks.is_empty() || ranks.contains(&0) {
            bail!(
                "{}: layer '{k}': ranks must be positive integers",
                path.display()
            );
        }
        out.insert(k.clone(), ranks);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_round() {
        assert_eq!(
            "ratio=0.5".parse::<RankPolicy>().unwrap(),
            RankPolicy::Ratio(0.5)
        );
        assert_eq!(
            "params=0.4".parse::<RankPolicy>().unwrap(),
            RankPolicy::Params(0.4)
        );
        assert!("ratio=0".parse::<RankPolicy>().is_err());
        assert!("ratio=1.5".parse::<RankPolicy>().is_err());
        assert!("ratio=-0.1".parse::<RankPolicy>().is_err());
        assert!("half".parse::<RankPolicy>().is_err());
        assert_eq!(round_rank(12.0, 8, 64), 16);
        assert_eq!(round_rank(3.0, 8, 64), 8);
        assert_eq!(round_rank(3.0, 8, 3), 3);
        assert_eq!(round_rank(40.0, 8, 32), 32);
    }
}
