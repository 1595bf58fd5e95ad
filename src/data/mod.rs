//! Labelled image data for training and evaluation.
//!
//! Every source (CIFAR binaries, an image folder, the built-in synthetic set) ends up as the
//! same [`Dataset`]: `N` images of one fixed shape `[C, H, W]` (the model's input shape), stored
//! as `u8` in CHW order. `u8` is what the sources hold anyway (8-bit JPEG/PNG/CIFAR pixels, and
//! the synthetic set is quantised like a real image), and it keeps memory low: CIFAR-10's 50,000
//! training images take 150 MB as `u8` against 600 MB as `f32`. The conversion to `f32`,
//! augmentation and per-channel normalisation happen per batch in [`loader`], on worker threads.
//!
//! [`DataSpec`] is the CLI's `--data` string; [`DataSpec::load`] returns the train and test
//! [`Splits`] already conformed to the model's input shape. An image folder too large for
//! memory is not a [`Dataset`] but a [`StreamSet`], decoded on the fly ([`stream`]);
//! [`DataSpec::open`] applies the rule that picks one ([`source`]) and returns [`Sources`].

pub mod augment;
pub mod cache;
pub mod cifar;
pub mod folder;
pub mod loader;
pub mod norm;
pub mod pixels;
pub mod source;
pub mod stream;
pub mod synthetic;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

pub use augment::{Augment, Normalize};
pub use loader::{Batch, Epoch, Loader, LoaderConfig};
pub use norm::NormSpec;
pub use source::{DataOptions, Source, Sources, DEFAULT_CACHE_MB};
pub use stream::{Prep, StreamSet};
pub use synthetic::SyntheticConfig;

/// One split of a labelled image data set: `len()` images of shape `[C, H, W]`, `u8` CHW.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    name: String,
    shape: [usize; 3],
    pixels: Vec<u8>,
    labels: Vec<usize>,
    class_names: Vec<String>,
}

impl Dataset {
    /// Checks that `pixels` holds `labels.len()` images of `shape` and that every label names
    /// one of `class_names`. `name` appears in error messages and logs ("cifar10 train").
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        pixels: Vec<u8>,
        labels: Vec<usize>,
        class_names: Vec<String>,
    ) -> Result<Dataset> {
        let name = name.into();
        if shape.contains(&0) {
            bail!("{name}: image shape {shape:?} has a zero dimension");
        }
        if class_names.is_empty() {
            bail!("{name}: no classes");
        }
        let size = shape.iter().product::<usize>();
        if pixels.len() != labels.len() * size {
            bail!(
                "{name}: {} pixel bytes do not hold {} images of shape {shape:?}",
                pixels.len(),
                labels.len()
            );
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l >= class_names.len())
        {
            bail!(
                "{name}: image {i} has label {l}, outside 0..{} ({} classes)",
                class_names.len() - 1,
                class_names.len()
            );
        }
        Ok(Dataset {
            name,
            shape,
            pixels,
            labels,
            class_names,
        })
    }

    /// The same images labelled by `model_classes` (a model's class names in its label order):
    /// a folder holding some of the classes, or in another order, is scored against the right
    /// outputs. A class the model does not know is an error naming it.
    pub fn relabelled(self, model_classes: &[String]) -> Result<Dataset> {
        if model_classes == self.class_names.as_slice() {
            return Ok(self);
        }
        let map = label_map(&self.name, &self.class_names, model_classes)?;
        let labels = self.labels.iter().map(|&l| map[l]).collect();
        Dataset::new(
            self.name,
            self.shape,
            self.pixels,
            labels,
            model_classes.to_vec(),
        )
    }

    /// Short description used in logs and errors, e.g. `cifar10 train`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[C, H, W]` of every image.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// `C * H * W`.
    pub fn image_size(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn classes(&self) -> usize {
        self.class_names.len()
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    pub fn label(&self, i: usize) -> usize {
        self.labels[i]
    }

    /// Image `i`, CHW, `u8`.
    pub fn image(&self, i: usize) -> &[u8] {
        let s = self.image_size();
        &self.pixels[i * s..(i + 1) * s]
    }

    /// All images back to back, CHW each.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes()];
        for &l in &self.labels {
            counts[l] += 1;
        }
        counts
    }

    /// Mean of each channel over all images, in `[0, 1]`.
    pub fn channel_means(&self) -> Vec<f64> {
        let [c, h, w] = self.shape;
        let mut sums = vec![0u64; c];
        for img in self.pixels.chunks_exact(c * h * w) {
            for (ch, plane) in img.chunks_exact(h * w).enumerate() {
                sums[ch] += plane.iter().map(|&v| v as u64).sum::<u64>();
            }
        }
        let n = (self.len() * h * w).max(1) as f64;
        sums.iter().map(|&s| s as f64 / n / 255.0).collect()
    }

    /// The images at `indices`, in that order (a smaller set for smoke runs or a held-out part).
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let mut pixels = Vec::with_capacity(indices.len() * self.image_size());
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        Dataset {
            name: self.name.clone(),
            shape: self.shape,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            class_names: self.class_names.clone(),
        }
    }

    /// This set with every image converted to `shape`: channels 3 -> 1 by luma, 1 -> 3 by
    /// repetition, and H, W by bilinear resizing (see [`pixels::resize_chw`]). A set already of
    /// that shape is returned unchanged.
    pub fn conform(self, shape: [usize; 3]) -> Result<Dataset> {
        if shape == self.shape {
            return Ok(self);
        }
        if shape.contains(&0) {
            bail!("{}: cannot convert to shape {shape:?}", self.name);
        }
        let from = self.shape;
        let size = shape.iter().product::<usize>();
        let mut pixels = vec![0u8; self.len() * size];
        let name = self.name.clone();
        pixels
            .par_chunks_mut(size)
            .zip(self.pixels.par_chunks(from.iter().product()))
            .try_for_each(|(dst, src)| pixels::convert(src, from, shape, dst))
            .with_context(|| format!("{name}: the model expects {shape:?} images"))?;
        Ok(Dataset {
            shape,
            pixels,
            ..self
        })
    }
}

/// For each of `class_names`, its position in `model_classes`; a class the model does not know
/// is an error naming it (`name`: the data set, for the message).
fn label_map(name: &str, class_names: &[String], model_classes: &[String]) -> Result<Vec<usize>> {
    class_names
        .iter()
        .map(|n| {
            model_classes.iter().position(|m| m == n).ok_or_else(|| {
                anyhow::anyhow!(
                    "{name}: class '{n}' is not one of the model's classes ({})",
                    model_classes.join(", ")
                )
            })
        })
        .collect()
}

/// The train and test splits of one data set, conformed to the same image shape.
#[derive(Clone, Debug)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

/// Which data set to use, as given on the command line with `--data`.
#[derive(Clone, Debug, PartialEq)]
pub enum DataSpec {
    /// `synthetic` or `synthetic:TRAIN,TEST` (image counts): the built-in procedural set.
    Synthetic(SyntheticConfig),
    /// `cifar10:PATH`: the CIFAR-10 binary version (`data_batch_1..5.bin`, `test_batch.bin`).
    Cifar10(PathBuf),
    /// `cifar100:PATH`: the CIFAR-100 binary version (`train.bin`, `test.bin`), fine labels.
    Cifar100(PathBuf),
    /// `folder:PATH`: one sub-folder of JPEG/PNG images per class (see [`folder`]).
    Folder(PathBuf),
}

/// `metadata_props` key of a trained or exported model: its class names in label order, as a
/// JSON array.
pub const CLASSES_KEY: &str = "elrt.classes";
/// `metadata_props` key: how an image is brought to the model's input size.
pub const RESIZE_KEY: &str = "elrt.input.resize";

/// Marks the [`RESIZE_KEY`] text of a model trained on a streamed folder ([`Prep::Crop`]).
pub const CROP_RULE_MARK: &str = "centre crop then bilinear resize";

const SPEC_FORMS: &str =
    "synthetic, synthetic:TRAIN,TEST, cifar10:PATH, cifar100:PATH or folder:PATH";

impl DataSpec {
    /// Parses `--data`. Anything but the forms above is an error that lists them.
    pub fn parse(s: &str) -> Result<DataSpec> {
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a)),
            None => (s, None),
        };
        let path = |what: &str| -> Result<PathBuf> {
            match arg {
                Some(a) if !a.is_empty() => Ok(PathBuf::from(a)),
                _ => bail!("--data {what} needs a path: {what}:PATH"),
            }
        };
        Ok(match kind {
            "synthetic" => {
                let mut cfg = SyntheticConfig::default();
                if let Some(a) = arg {
                    let bad = || {
                        anyhow::anyhow!(
                            "--data '{s}': expected synthetic:TRAIN,TEST with two image counts, e.g. synthetic:5000,1000"
                        )
                    };
                    let (tr, te) = a.split_once(',').ok_or_else(bad)?;
                    cfg.train = tr.trim().parse().map_err(|_| bad())?;
                    cfg.test = te.trim().parse().map_err(|_| bad())?;
                }
                DataSpec::Synthetic(cfg)
            }
            "cifar10" => DataSpec::Cifar10(path("cifar10")?),
            "cifar100" => DataSpec::Cifar100(path("cifar100")?),
            "folder" => DataSpec::Folder(path("folder")?),
            _ => bail!("unknown data set '{s}': expected {SPEC_FORMS}"),
        })
    }

    /// How this source's images are brought to the model's input `[C, H, W]`, in words a
    /// deployment can follow (recorded in the model file, [`RESIZE_KEY`]).
    pub fn resize_rule(&self, [c, h, w]: [usize; 3]) -> String {
        let color = if c == 1 { "grayscale" } else { "RGB" };
        match self {
            DataSpec::Synthetic(_) => format!("none: images are made at {h}x{w} ({color})"),
            DataSpec::Cifar10(_) | DataSpec::Cifar100(_) if (h, w) == (32, 32) => {
                format!("none: 32x32 images ({color})")
            }
            DataSpec::Cifar10(_) | DataSpec::Cifar100(_) => {
                format!("bilinear resize of the 32x32 images to {h}x{w} ({color})")
            }
            DataSpec::Folder(_) => format!(
                "decode as {color}, bilinear resize to {h}x{w} (height x width; aspect ratio not kept)"
            ),
        }
    }

    /// How images are brought to `[C, H, W]` when the folder streams ([`Prep::Crop`]); other
    /// sources as [`DataSpec::resize_rule`].
    pub fn resize_rule_for(&self, chw: [usize; 3], streamed: bool) -> String {
        let [c, h, w] = chw;
        if !streamed {
            return self.resize_rule(chw);
        }
        let color = if c == 1 { "grayscale" } else { "RGB" };
        let (rh, rw) = (
            (h as f64 / stream::EVAL_CROP_FRACTION).round(),
            (w as f64 / stream::EVAL_CROP_FRACTION).round(),
        );
        format!(
            "decode as {color}, {CROP_RULE_MARK} to {h}x{w}: an image larger than {h}x{w} is \
             scaled to cover {rh}x{rw} (for a square input: its shorter side to {rh}) and its \
             centred {h}x{w} kept (torchvision Resize + CenterCrop; elrt cuts that window from \
             the original and resizes it); a smaller image is resized whole (aspect ratio not kept)"
        )
    }

    /// Both splits, in memory or streamed by the `--cache-mb` rule ([`source::open`]).
    pub fn open(&self, input: [usize; 3], opts: &DataOptions) -> Result<Sources> {
        if input.contains(&0) {
            bail!("model input shape {input:?} has a zero dimension");
        }
        source::open(self, input, opts)
    }

    /// The test split, prepared as a model trained with `prep` expects ([`source::open_test`]).
    pub fn open_test(&self, input: [usize; 3], opts: &DataOptions, prep: Prep) -> Result<Source> {
        if input.contains(&0) {
            bail!("model input shape {input:?} has a zero dimension");
        }
        source::open_test(self, input, opts, prep)
    }

    /// The test split alone, for evaluation: nothing of the training split is read.
    pub fn load_test(&self, input: [usize; 3]) -> Result<Dataset> {
        if input.contains(&0) {
            bail!("model input shape {input:?} has a zero dimension");
        }
        match self {
            DataSpec::Synthetic(cfg) => Ok(synthetic::generate(
                &SyntheticConfig {
                    train: 0,
                    ..cfg.clone()
                },
                input,
            )?
            .test),
            DataSpec::Cifar10(p) => cifar::load_test(p, cifar::CifarKind::Cifar10, input),
            DataSpec::Cifar100(p) => cifar::load_test(p, cifar::CifarKind::Cifar100, input),
            DataSpec::Folder(p) => folder::load_test(p, input),
        }
    }

    /// Loads the train and test splits with images of the model's input shape `[C, H, W]`.
    pub fn load(&self, input: [usize; 3]) -> Result<Splits> {
        if input.contains(&0) {
            bail!("model input shape {input:?} has a zero dimension");
        }
        match self {
            DataSpec::Synthetic(cfg) => synthetic::generate(cfg, input),
            DataSpec::Cifar10(p) => cifar::load(p, cifar::CifarKind::Cifar10, input),
            DataSpec::Cifar100(p) => cifar::load(p, cifar::CifarKind::Cifar100, input),
            DataSpec::Folder(p) => folder::load(p, input),
        }
    }
}

impl Default for DataSpec {
    /// The built-in synthetic set, so that a run needs no download.
    fn default() -> DataSpec {
        DataSpec::Synthetic(SyntheticConfig::default())
    }
}

impl FromStr for DataSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<DataSpec> {
        DataSpec::parse(s)
    }
}

impl fmt::Display for DataSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataSpec::Synthetic(c) if *c == SyntheticConfig::default() => write!(f, "synthetic"),
            DataSpec::Synthetic(c) => write!(f, "synthetic:{},{}", c.train, c.test),
            DataSpec::Cifar10(p) => write!(f, "cifar10:{}", p.display()),
            DataSpec::Cifar100(p) => write!(f, "cifar100:{}", p.display()),
            DataSpec::Folder(p) => write!(f, "folder:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(
            DataSpec::parse("synthetic").unwrap(),
            DataSpec::Synthetic(SyntheticConfig::default())
        );
        match DataSpec::parse("synthetic:200,50").unwrap() {
            DataSpec::Synthetic(c) => assert_eq!((c.train, c.test), (200, 50)),
            o => panic!("{o:?}"),
        }
        assert_eq!(
            DataSpec::parse("cifar10:/a/b").unwrap(),
            DataSpec::Cifar10("/a/b".into())
        );
        assert_eq!(
            DataSpec::parse("cifar100:x").unwrap(),
            DataSpec::Cifar100("x".into())
        );
        assert_eq!(
            DataSpec::parse("folder:C:\\imgs").unwrap(),
            DataSpec::Folder("C:\\imgs".into())
        );
        for s in ["synthetic", "synthetic:10,5", "cifar10:/d", "folder:f"] {
            assert_eq!(DataSpec::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn parse_errors_are_clear() {
        let e = DataSpec::parse("imagenet:/x").unwrap_err().to_string();
        assert!(e.contains("unknown data set 'imagenet:/x'") && e.contains("cifar10:PATH"));
        let e = DataSpec::parse("cifar10").unwrap_err().to_string();
        assert!(e.contains("needs a path"), "{e}");
        let e = DataSpec::parse("folder:").unwrap_err().to_string();
        assert!(e.contains("needs a path"), "{e}");
        let e = DataSpec::parse("synthetic:abc").unwrap_err().to_string();
        assert!(e.contains("synthetic:TRAIN,TEST"), "{e}");
    }

    #[test]
    fn dataset_checks_and_helpers() {
        let names = vec!["a".to_string(), "b".to_string()];
        let e = Dataset::new("t", [1, 2, 2], vec![0; 7], vec![0, 1], names.clone()).unwrap_err();
        assert!(e.to_string().contains("do not hold 2 images"), "{e}");
        let e = Dataset::new("t", [1, 2, 2], vec![0; 8], vec![0, 2], names.clone()).unwrap_err();
        assert!(e.to_string().contains("image 1 has label 2"), "{e}");
        let d = Dataset::new("t", [1, 2, 2], (0..12).collect(), vec![1, 0, 1], names).unwrap();
        assert_eq!(d.image(1), &[4, 5, 6, 7]);
        assert_eq!(d.class_counts(), vec![1, 2]);
        let s = d.subset(&[2, 0]);
        assert_eq!(s.labels(), &[1, 1]);
        assert_eq!(s.image(0), &[8, 9, 10, 11]);
        let big = d.clone().conform([3, 4, 4]).unwrap();
        assert_eq!(big.shape(), [3, 4, 4]);
        assert_eq!(big.len(), 3);
        assert_eq!(big.labels(), d.labels());
    }
}
