//! Where a split's images come from: all decoded in memory ([`Dataset`]) or decoded on the fly
//! from an image folder ([`StreamSet`]), and the rule that picks one.
//!
//! The rule (`--cache-mb`, default [`DEFAULT_CACHE_MB`]): an image folder whose images, at the
//! model's input size, take more bytes than the cache budget (`N * C * H * W` over both splits)
//! is streamed, with ImageNet-style crops ([`Prep::Crop`]); one that fits is decoded into
//! memory at the input size, as always ([`super::folder`]). CIFAR and the synthetic set always
//! load into memory. `--cache-mb 0` streams every folder. The training run prints which path
//! was taken, and records it in the model file ([`super::RESIZE_KEY`]), which later commands
//! (`eval`, `export --data`) follow so that a model is evaluated as it was trained.

use std::sync::Arc;

use anyhow::Result;

use super::cache::CacheStats;
use super::stream::{Prep, StreamSet};
use super::{folder, DataSpec, Dataset};

/// Default `--cache-mb`: the byte budget for decoded images that decides whether a folder
/// streams, and the size of the streamed folder's cache.
pub const DEFAULT_CACHE_MB: usize = 2048;

/// Options of how data is loaded (`--cache-mb`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataOptions {
    /// Budget for decoded images, MiB.
    pub cache_mb: usize,
}

impl Default for DataOptions {
    fn default() -> DataOptions {
        DataOptions {
            cache_mb: DEFAULT_CACHE_MB,
        }
    }
}

impl DataOptions {
    pub fn cache_bytes(&self) -> usize {
        self.cache_mb.saturating_mul(1 << 20)
    }
}

/// One split, in memory or streamed. Cloning shares the images.
#[derive(Clone, Debug)]
pub enum Source {
    Memory(Arc<Dataset>),
    Stream(Arc<StreamSet>),
}

impl From<Arc<Dataset>> for Source {
    fn from(d: Arc<Dataset>) -> Source {
        Source::Memory(d)
    }
}

impl From<Dataset> for Source {
    fn from(d: Dataset) -> Source {
        Source::Memory(Arc::new(d))
    }
}

impl From<StreamSet> for Source {
    fn from(s: StreamSet) -> Source {
        Source::Stream(Arc::new(s))
    }
}

impl Source {
    pub fn name(&self) -> &str {
        match self {
            Source::Memory(d) => d.name(),
            Source::Stream(s) => s.name(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[C, H, W]` of the images as the loader gives them.
    pub fn shape(&self) -> [usize; 3] {
        match self {
            Source::Memory(d) => d.shape(),
            Source::Stream(s) => s.shape(),
        }
    }

    pub fn classes(&self) -> usize {
        self.class_names().len()
    }

    pub fn class_names(&self) -> &[String] {
        match self {
            Source::Memory(d) => d.class_names(),
            Source::Stream(s) => s.class_names(),
        }
    }

    /// What identifies image `i` to another process training on the same data (MPI ranks check
    /// they were started on the same data): its pixels in memory; streamed, its file's name
    /// (not the folder, which may be mounted elsewhere on another machine).
    pub fn identity(&self, i: usize) -> Vec<u8> {
        match self {
            Source::Memory(d) => d.image(i).to_vec(),
            Source::Stream(s) => s
                .file(i)
                .file_name()
                .map(|n| n.to_string_lossy().as_bytes().to_vec())
                .unwrap_or_default(),
        }
    }

    pub fn labels(&self) -> &[usize] {
        match self {
            Source::Memory(d) => d.labels(),
            Source::Stream(s) => s.labels(),
        }
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes()];
        for &l in self.labels() {
            counts[l] += 1;
        }
        counts
    }

    pub fn is_streamed(&self) -> bool {
        matches!(self, Source::Stream(_))
    }

    /// The streamed set's cache so far; `None` in memory.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        match self {
            Source::Memory(_) => None,
            Source::Stream(s) => Some(s.cache_stats()),
        }
    }

    /// The same images labelled by a model's class names (see [`Dataset::relabelled`]).
    pub fn relabelled(self, model_classes: &[String]) -> Result<Source> {
        Ok(match self {
            Source::Memory(d) => {
                Source::Memory(Arc::new(Arc::unwrap_or_clone(d).relabelled(model_classes)?))
            }
            Source::Stream(s) => Source::Stream(Arc::new(s.relabelled(model_classes)?)),
        })
    }
}

/// The train and test splits, each in memory or streamed, and the line that says which.
#[derive(Clone, Debug)]
pub struct Sources {
    pub train: Source,
    pub test: Source,
    /// Which path was taken and why, for image folders (printed by `elrt train`).
    pub plan: Option<String>,
}

impl Sources {
    /// Whether the folder streams (then with [`Prep::Crop`]).
    pub fn streamed(&self) -> bool {
        self.train.is_streamed()
    }
}

fn mib(bytes: usize) -> String {
    let m = bytes as f64 / (1u64 << 20) as f64;
    if m < 10.0 {
        format!("{m:.1} MB")
    } else {
        format!("{m:.0} MB")
    }
}

/// Both splits of `spec` for a model input `input`, per the rule in the module header.
pub fn open(spec: &DataSpec, input: [usize; 3], opts: &DataOptions) -> Result<Sources> {
    let DataSpec::Folder(root) = spec else {
        let s = spec.load(input)?;
        return Ok(Sources {
            train: s.train.into(),
            test: s.test.into(),
            plan: None,
        });
    };
    let (names, train, test) = folder::list(root, input)?;
    let image = input.iter().product::<usize>();
    let n = train.len() + test.len();
    let bytes = n.saturating_mul(image);
    let budget = opts.cache_bytes();
    let [c, h, w] = input;
    if bytes <= budget {
        let s = folder::decode_splits(root, &names, &train, &test, input)?;
        return Ok(Sources {
            train: s.train.into(),
            test: s.test.into(),
            plan: Some(format!(
                "{spec}: {n} images take {} at {c}x{h}x{w}, within --cache-mb {}: decoded into memory, resized to {h}x{w}",
                mib(bytes),
                opts.cache_mb
            )),
        });
    }
    // The budget is shared in proportion to the images of each split.
    let share = |k: usize| (budget as u128 * k as u128 / n.max(1) as u128) as usize;
    let (train_budget, test_budget) = (share(train.len()), share(test.len()));
    let make = |what: &str, items: Vec<folder::Item>, budget: usize| {
        let (files, labels) = items.into_iter().map(|it| (it.path, it.label)).unzip();
        StreamSet::new(
            format!("{} {what}", root.display()),
            input,
            Prep::Crop,
            files,
            labels,
            names.clone(),
            budget,
        )
    };
    Ok(Sources {
        train: make("train", train, train_budget)?.into(),
        test: make("test", test, test_budget)?.into(),
        plan: Some(format!(
            "{spec}: {n} images would take {} at {c}x{h}x{w}, more than --cache-mb {}: streamed \
             (decoded on the fly by the loader's workers, a cache of {} MB, ImageNet-style random \
             resized crops for training and centre crops for testing)",
            mib(bytes),
            opts.cache_mb,
            opts.cache_mb
        )),
    })
}

/// The test split of `spec` alone, prepared as a model trained with `prep` expects:
/// [`Prep::Crop`] (the model was trained on a streamed folder) streams it, whatever its size;
/// otherwise it loads into memory unless it is a folder whose images at the input size exceed
/// the budget, which then streams with [`Prep::Resize`] (the same images, decoded on the fly).
pub fn open_test(
    spec: &DataSpec,
    input: [usize; 3],
    opts: &DataOptions,
    prep: Prep,
) -> Result<Source> {
    let DataSpec::Folder(root) = spec else {
        return Ok(spec.load_test(input)?.into());
    };
    let (names, _, test) = folder::list(root, input)?;
    let bytes = test.len().saturating_mul(input.iter().product());
    if prep == Prep::Resize && bytes <= opts.cache_bytes() {
        return Ok(folder::decode_split(root, "test", &names, &test, input)?.into());
    }
    let (files, labels) = test.into_iter().map(|it| (it.path, it.label)).unzip();
    Ok(StreamSet::new(
        format!("{} test", root.display()),
        input,
        prep,
        files,
        labels,
        names,
        opts.cache_bytes(),
    )?
    .into())
}

/// How the model recorded in `props` was trained: [`Prep::Crop`] when its
/// [`super::RESIZE_KEY`] is the streamed folder's rule, [`Prep::Resize`] otherwise.
pub fn prep_of_model(props: &[(String, String)]) -> Prep {
    let streamed = props
        .iter()
        .any(|(k, v)| k == super::RESIZE_KEY && v.contains(super::CROP_RULE_MARK));
    if streamed {
        Prep::Crop
    } else {
        Prep::Resize
    }
}
