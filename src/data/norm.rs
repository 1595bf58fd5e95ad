//! `--normalize`: the per-channel normalisation a model's inputs get, as the user states it or
//! as a model file records it.
//!
//! A model is trained on inputs normalised one way, and every later use of it (evaluation, the
//! accuracy check of an export, a compress run from its architecture) must normalise the same
//! way. [`NormSpec`] is that choice: a named set (`cifar10`, `imagenet`, `none`) or explicit
//! values `M1,M2,M3/S1,S2,S3` (means and standard deviations of `0..1` pixels, one per channel).
//! `elrt train` records it in the trained file's `metadata_props` ([`NormSpec::metadata`]), and
//! the commands that read a model take the recorded one when `--normalize` is absent
//! ([`NormSpec::for_model`]); a file without it gets today's default
//! ([`NormSpec::default_for`]: the CIFAR values for 3 channels).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::augment::{Normalize, CIFAR_MEAN, CIFAR_STD};

/// ImageNet channel means (R, G, B), as torchvision's pretrained models expect.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (R, G, B).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Metadata key holding the spec as `--normalize` writes it (`imagenet`, `M1,M2/S1,S2`).
pub const META_SPEC: &str = "elrt.normalize";
/// Metadata key holding the per-channel means, a comma list.
pub const META_MEAN: &str = "elrt.normalize.mean";
/// Metadata key holding the per-channel standard deviations, a comma list.
pub const META_STD: &str = "elrt.normalize.std";

const FORMS: &str =
    "expected cifar10, imagenet, none or M1,M2,M3/S1,S2,S3 (mean/std of 0..1 pixels per channel)";

/// Which normalisation `(x / 255 - mean[c]) / std[c]` a model's inputs get.
#[derive(Clone, Debug, PartialEq)]
pub enum NormSpec {
    /// [`CIFAR_MEAN`], [`CIFAR_STD`] (3 channels).
    Cifar10,
    /// [`IMAGENET_MEAN`], [`IMAGENET_STD`] (3 channels).
    Imagenet,
    /// Mean 0, std 1 for any channel count: pixels scaled to `[0, 1]` only.
    None,
    /// Explicit values, one mean and one std per channel.
    Values { mean: Vec<f32>, std: Vec<f32> },
}

impl NormSpec {
    /// Parses `--normalize`: `cifar10`, `imagenet`, `none` (any case) or `M1,M2,.../S1,S2,...`.
    /// Explicit values equal to a named set become that name, so `imagenet` and its numbers
    /// compare equal.
    pub fn parse(s: &str) -> Result<NormSpec> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "cifar10" => return Ok(NormSpec::Cifar10),
            "imagenet" => return Ok(NormSpec::Imagenet),
            "none" => return Ok(NormSpec::None),
            _ => {}
        }
        let Some((m, sd)) = t.split_once('/') else {
            bail!("{FORMS}");
        };
        let mean = parse_list(m, "mean")?;
        let std = parse_list(sd, "std")?;
        NormSpec::from_values(mean, std)
    }

    /// Explicit values, checked (as many means as stds, all finite, every std positive) and
    /// turned into a name when they equal a named set.
    pub fn from_values(mean: Vec<f32>, std: Vec<f32>) -> Result<NormSpec> {
        if mean.len() != std.len() {
            bail!(
                "{} mean value(s) but {} std value(s): give one of each per channel, M1,M2,M3/S1,S2,S3",
                mean.len(),
                std.len()
            );
        }
        Normalize::new(mean.clone(), std.clone())?;
        Ok(if mean == CIFAR_MEAN && std == CIFAR_STD {
            NormSpec::Cifar10
        } else if mean == IMAGENET_MEAN && std == IMAGENET_STD {
            NormSpec::Imagenet
        } else if mean.iter().all(|&m| m == 0.0) && std.iter().all(|&s| s == 1.0) {
            NormSpec::None
        } else {
            NormSpec::Values { mean, std }
        })
    }

    /// The default when neither the user nor the model file says: [`Normalize::for_channels`]
    /// (the CIFAR values for 3 channels, their averages for any other count).
    pub fn default_for(channels: usize) -> NormSpec {
        if channels == 3 {
            return NormSpec::Cifar10;
        }
        let n = Normalize::for_channels(channels);
        NormSpec::Values {
            mean: n.mean().to_vec(),
            std: n.std().to_vec(),
        }
    }

    /// The normalisation for `channels`-channel inputs; an error when the spec has another
    /// channel count (`none` fits any).
    pub fn resolve(&self, channels: usize) -> Result<Normalize> {
        let (mean, std) = match self {
            NormSpec::None => return Ok(Normalize::identity(channels)),
            NormSpec::Cifar10 => (CIFAR_MEAN.to_vec(), CIFAR_STD.to_vec()),
            NormSpec::Imagenet => (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec()),
            NormSpec::Values { mean, std } => (mean.clone(), std.clone()),
        };
        if mean.len() != channels {
            bail!(
                "normalisation {self} has {} channel(s), but the model's input has {channels}",
                mean.len()
            );
        }
        Normalize::new(mean, std)
    }

    /// The `metadata_props` entries that record this spec for `channels`-channel inputs:
    /// [`META_SPEC`] (the spec as written on the command line), [`META_MEAN`] and [`META_STD`]
    /// (comma lists of the values in use).
    pub fn metadata(&self, channels: usize) -> Result<Vec<(String, String)>> {
        let n = self.resolve(channels)?;
        Ok(vec![
            (META_SPEC.to_string(), self.to_string()),
            (META_MEAN.to_string(), join(n.mean())),
            (META_STD.to_string(), join(n.std())),
        ])
    }

    /// Replaces any recorded normalisation in `props` by this one.
    pub fn record(&self, props: &mut Vec<(String, String)>, channels: usize) -> Result<()> {
        let entries = self.metadata(channels)?;
        props.retain(|(k, _)| k != META_SPEC && k != META_MEAN && k != META_STD);
        props.extend(entries);
        Ok(())
    }

    /// The normalisation a model file records, if any: [`META_MEAN`] and [`META_STD`] when
    /// both are there (the values are what counts), else [`META_SPEC`]. A malformed entry is an
    /// error naming the key.
    pub fn from_metadata(props: &[(String, String)]) -> Result<Option<NormSpec>> {
        let get = |k: &str| {
            props
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.as_str())
        };
        match (get(META_MEAN), get(META_STD)) {
            (Some(m), Some(s)) => {
                let mean =
                    parse_list(m, "mean").with_context(|| format!("metadata {META_MEAN}"))?;
                let std = parse_list(s, "std").with_context(|| format!("metadata {META_STD}"))?;
                NormSpec::from_values(mean, std)
                    .with_context(|| format!("metadata {META_MEAN}, {META_STD}"))
                    .map(Some)
            }
            (Some(_), None) => bail!("metadata {META_MEAN} without {META_STD}"),
            (None, Some(_)) => bail!("metadata {META_STD} without {META_MEAN}"),
            (None, None) => match get(META_SPEC) {
                Some(s) => NormSpec::parse(s)
                    .with_context(|| format!("metadata {META_SPEC} '{s}'"))
                    .map(Some),
                None => Ok(None),
            },
        }
    }

    /// The normalisation to use for a model: `flag` (`--normalize`) when given, else the one
    /// `file`'s `props` record, else [`NormSpec::default_for`]; checked against the model's
    /// input `channels`. The second value is a one-line note when the file's record was taken.
    pub fn for_model(
        flag: Option<&NormSpec>,
        file: &Path,
        props: &[(String, String)],
        channels: usize,
    ) -> Result<(NormSpec, Option<String>)> {
        if let Some(f) = flag {
            f.resolve(channels).context("--normalize")?;
            return Ok((f.clone(), None));
        }
        let recorded = NormSpec::from_metadata(props)
            .with_context(|| format!("{}: recorded normalisation", file.display()))?;
        match recorded {
            Some(r) => {
                r.resolve(channels)
                    .with_context(|| format!("{}: recorded normalisation", file.display()))?;
                let note = format!(
                    "normalisation: {r}, as {} records it ({META_SPEC}; --normalize overrides)",
                    file.display()
                );
                Ok((r, Some(note)))
            }
            None => Ok((NormSpec::default_for(channels), None)),
        }
    }
}

fn join(v: &[f32]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_list(s: &str, what: &str) -> Result<Vec<f32>> {
    s.split(',')
        .map(|x| {
            let x = x.trim();
            let v: f32 = x
                .parse()
                .map_err(|_| anyhow!("{what} value '{x}' is not a number; {FORMS}"))?;
            if !v.is_finite() {
                bail!("{what} value '{x}' is not finite");
            }
            Ok(v)
        })
        .collect()
}

impl fmt::Display for NormSpec {
    /// The `--normalize` form: the name, or `M1,M2,.../S1,S2,...` (each value in its shortest
    /// exact form, so the text parses back to the same numbers).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NormSpec::Cifar10 => write!(f, "cifar10"),
            NormSpec::Imagenet => write!(f, "imagenet"),
            NormSpec::None => write!(f, "none"),
            NormSpec::Values { mean, std } => write!(f, "{}/{}", join(mean), join(std)),
        }
    }
}

impl FromStr for NormSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<NormSpec> {
        NormSpec::parse(s)
    }
}

/// As its `--normalize` text, so that run.json and reports read like the command line.
impl Serialize for NormSpec {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for NormSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<NormSpec, D::Error> {
        let s = String::deserialize(d)?;
        NormSpec::parse(&s).map_err(|e| serde::de::Error::custom(format!("normalize '{s}': {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_parse() {
        assert_eq!(NormSpec::parse("cifar10").unwrap(), NormSpec::Cifar10);
        assert_eq!(NormSpec::parse("ImageNet").unwrap(), NormSpec::Imagenet);
        assert_eq!(NormSpec::parse("none").unwrap(), NormSpec::None);
        let v = NormSpec::parse("0.5, 0.25/0.2,0.3").unwrap();
        assert_eq!(
            v,
            NormSpec::Values {
                mean: vec![0.5, 0.25],
                std: vec![0.2, 0.3]
            }
        );
        assert_eq!(v.to_string(), "0.5,0.25/0.2,0.3");
        assert_eq!(NormSpec::parse("0.5/0.25").unwrap().to_string(), "0.5/0.25");
        // Explicit values of a named set are that set.
        assert_eq!(
            NormSpec::parse("0.485,0.456,0.406/0.229,0.224,0.225").unwrap(),
            NormSpec::Imagenet
        );
        assert_eq!(NormSpec::parse("0,0/1,1").unwrap(), NormSpec::None);
        for s in ["cifar10", "imagenet", "none", "0.1,0.2,0.3/0.4,0.5,0.6"] {
            assert_eq!(NormSpec::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn bad_specs_say_why() {
        let e = |s: &str| NormSpec::parse(s).unwrap_err().to_string();
        assert!(
            e("cifar").contains("expected cifar10, imagenet, none"),
            "{}",
            e("cifar")
        );
        assert!(e("0.5,0.5/0.2").contains("2 mean value(s) but 1 std"));
        assert!(
            e("0.5/0").contains("std must be positive"),
            "{}",
            e("0.5/0")
        );
        assert!(e("0.5/-1").contains("std must be positive"));
        assert!(e("nan/1").contains("not finite"), "{}", e("nan/1"));
        assert!(e("0.5/inf").contains("not finite"));
        assert!(e("0.5/x").contains("'x' is not a number"));
        assert!(e("/1").contains("'' is not a number"));
        assert!(e("0.5/1/2").contains("not a number"));
    }

    #[test]
    fn resolve_checks_channels() {
        let n = NormSpec::Imagenet.resolve(3).unwrap();
        assert_eq!(n.mean(), &IMAGENET_MEAN);
        assert_eq!(n.std(), &IMAGENET_STD);
        assert_eq!(NormSpec::None.resolve(1).unwrap(), Normalize::identity(1));
        let e = NormSpec::Imagenet.resolve(1).unwrap_err().to_string();
        assert!(
            e.contains("imagenet has 3 channel(s), but the model's input has 1"),
            "{e}"
        );
        let two = NormSpec::parse("0.5,0.5/0.2,0.2").unwrap();
        assert!(two.resolve(3).is_err() && two.resolve(2).is_ok());
        // The default is today's: CIFAR for 3 channels, the averages otherwise.
        assert_eq!(NormSpec::default_for(3), NormSpec::Cifar10);
        assert_eq!(
            NormSpec::default_for(1).resolve(1).unwrap(),
            Normalize::for_channels(1)
        );
    }

    #[test]
    fn metadata_round_trips() {
        for spec in [
            NormSpec::Cifar10,
            NormSpec::Imagenet,
            NormSpec::None,
            NormSpec::parse("0.1,0.2,0.3/0.4,0.5,0.6").unwrap(),
        ] {
            let mut props = vec![("other".to_string(), "x".to_string())];
            NormSpec::Cifar10.record(&mut props, 3).unwrap();
            spec.record(&mut props, 3).unwrap();
            assert_eq!(props.len(), 4, "{props:?}");
            assert_eq!(NormSpec::from_metadata(&props).unwrap(), Some(spec.clone()));
        }
        let m = NormSpec::Imagenet.metadata(3).unwrap();
        assert_eq!(m[1], (META_MEAN.into(), "0.485,0.456,0.406".into()));
        assert_eq!(m[2], (META_STD.into(), "0.229,0.224,0.225".into()));
        assert_eq!(NormSpec::from_metadata(&[]).unwrap(), None);
        let only_spec = vec![(META_SPEC.to_string(), "imagenet".to_string())];
        assert_eq!(
            NormSpec::from_metadata(&only_spec).unwrap(),
            Some(NormSpec::Imagenet)
        );
        let bad = vec![
            (META_MEAN.to_string(), "0.5".to_string()),
            (META_STD.to_string(), "0".to_string()),
        ];
        let e = format!("{:#}", NormSpec::from_metadata(&bad).unwrap_err());
        assert!(e.contains(META_MEAN) && e.contains("positive"), "{e}");
        let half = vec![(META_MEAN.to_string(), "0.5".to_string())];
        assert!(NormSpec::from_metadata(&half).is_err());
    }

    #[test]
    fn flag_then_file_then_default() {
        let file = Path::new("m.onnx");
        let mut props = Vec::new();
        let (s, note) = NormSpec::for_model(None, file, &props, 3).unwrap();
        assert_eq!((s, note), (NormSpec::Cifar10, None));
        NormSpec::Imagenet.record(&mut props, 3).unwrap();
        let (s, note) = NormSpec::for_model(None, file, &props, 3).unwrap();
        assert_eq!(s, NormSpec::Imagenet);
        assert!(note.unwrap().contains("imagenet, as m.onnx records it"));
        let (s, note) = NormSpec::for_model(Some(&NormSpec::None), file, &props, 3).unwrap();
        assert_eq!((s, note), (NormSpec::None, None));
        let e = NormSpec::for_model(Some(&NormSpec::Imagenet), file, &[], 1).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("--normalize: normalisation imagenet"),
            "{e:#}"
        );
        let e = NormSpec::for_model(None, file, &props, 1).unwrap_err();
        assert!(
            format!("{e:#}").contains("m.onnx: recorded normalisation"),
            "{e:#}"
        );
    }

    #[test]
    fn serde_as_text() {
        let v = serde_json::to_string(&NormSpec::Imagenet).unwrap();
        assert_eq!(v, "\"imagenet\"");
        let back: NormSpec = serde_json::from_str("\"0.5/0.25\"").unwrap();
        assert_eq!(back.to_string(), "0.5/0.25");
        assert!(serde_json::from_str::<NormSpec>("\"0.5/0\"").is_err());
    }
}
