//! CIFAR-10 and CIFAR-100 in their "binary version" layout.
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` (train) and `test_batch.bin` (test); each
//! record is 1 label byte followed by 3,072 pixel bytes: the 1,024 red values, then green, then
//! blue, each plane row-major 32x32. That is already CHW, so records are copied as they are.
//! Class names come from `batches.meta.txt` when present.
//!
//! CIFAR-100: `train.bin` and `test.bin`; each record is a coarse label byte, a fine label byte
//! and the same 3,072 pixel bytes. The fine label (100 classes) is used; names come from
//! `fine_label_names.txt` when present.
//!
//! Every error is one line naming the file: missing files (listing what a folder must hold), a
//! size that is not a whole number of records, a label out of range (with its record index).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::{Dataset, Splits};

/// Pixel bytes per record: 3 planes of 32x32.
pub const PIXELS: usize = 3 * 32 * 32;
/// Image shape of every CIFAR record, `[C, H, W]`.
pub const SHAPE: [usize; 3] = [3, 32, 32];

/// Which of the two CIFAR layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    Cifar10,
    Cifar100,
}

impl CifarKind {
    /// Short name used in messages and data set names.
    pub fn name(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar10",
            CifarKind::Cifar100 => "cifar100",
        }
    }

    /// Bytes per record: label byte(s) then [`PIXELS`].
    pub fn record_size(self) -> usize {
        self.label_bytes() + PIXELS
    }

    fn label_bytes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 1,
            CifarKind::Cifar100 => 2,
        }
    }

    pub fn classes(self) -> usize {
        match self {
            CifarKind::Cifar10 => 10,
            CifarKind::Cifar100 => 100,
        }
    }

    /// The training files, in the order their records are concatenated.
    pub fn train_files(self) -> Vec<String> {
        match self {
            CifarKind::Cifar10 => (1..=5).map(|i| format!("data_batch_{i}.bin")).collect(),
            CifarKind::Cifar100 => vec!["train.bin".into()],
        }
    }

    pub fn test_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "test_batch.bin",
            CifarKind::Cifar100 => "test.bin",
        }
    }

    fn names_file(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "batches.meta.txt",
            CifarKind::Cifar100 => "fine_label_names.txt",
        }
    }

    /// The folder name the official archive unpacks to; accepted one level below `PATH`.
    fn archive_dir(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => "cifar-10-batches-bin",
            CifarKind::Cifar100 => "cifar-100-binary",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            CifarKind::Cifar10 => {
                "data_batch_1.bin .. data_batch_5.bin and test_batch.bin (the CIFAR-10 binary version)"
            }
            CifarKind::Cifar100 => "train.bin and test.bin (the CIFAR-100 binary version)",
        }
    }
}

const CIFAR10_NAMES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// CIFAR-100 fine label names in label order (alphabetical), used when
/// `fine_label_names.txt` is absent.
const CIFAR100_NAMES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// Loads both splits from `dir` and conforms them to `input` (`[C, H, W]`; H, W other than 32
/// are resized bilinearly, C = 1 takes the luma).
pub fn load(dir: &Path, kind: CifarKind, input: [usize; 3]) -> Result<Splits> {
    let dir = locate(dir, kind)?;
    let names = class_names(&dir, kind)?;
    let train_paths: Vec<PathBuf> = kind.train_files().iter().map(|f| dir.join(f)).collect();
    let train = read_files(&train_paths, kind)?;
    let test = read_files(&[dir.join(kind.test_file())], kind)?;
    let make = |split: &str, (pixels, labels): (Vec<u8>, Vec<usize>)| {
        Dataset::new(
            format!("{} {split}", kind.name()),
            SHAPE,
            pixels,
            labels,
            names.clone(),
        )?
        .conform(input)
    };
    Ok(Splits {
        train: make("train", train)?,
        test: make("test", test)?,
    })
}

/// The test split alone (evaluation needs nothing else: a damaged training file is not read).
pub fn load_test(dir: &Path, kind: CifarKind, input: [usize; 3]) -> Result<Dataset> {
    let dir = locate(dir, kind)?;
    let names = class_names(&dir, kind)?;
    let (pixels, labels) = read_files(&[dir.join(kind.test_file())], kind)?;
    Dataset::new(
        format!("{} test", kind.name()),
        SHAPE,
        pixels,
        labels,
        names,
    )?
    .conform(input)
}

/// The folder that holds the files: `dir` itself, or the archive's folder inside it. Errors
/// list the files that are missing and what the folder should hold.
fn locate(dir: &Path, kind: CifarKind) -> Result<PathBuf> {
    if !dir.is_dir() {
        bail!(
            "{}: no such folder (--data {}:PATH expects a folder with {})",
            dir.display(),
            kind.name(),
            kind.expected()
        );
    }
    let mut files = kind.train_files();
    files.push(kind.test_file().into());
    let missing = |d: &Path| -> Vec<String> {
        files
            .iter()
            .filter(|f| !d.join(f).is_file())
            .cloned()
            .collect()
    };
    let here = missing(dir);
    if here.is_empty() {
        return Ok(dir.to_path_buf());
    }
    let nested = dir.join(kind.archive_dir());
    if nested.is_dir() && missing(&nested).is_empty() {
        return Ok(nested);
    }
    bail!(
        "{}: missing {}; a {} folder holds {}",
        dir.display(),
        here.join(", "),
        kind.name(),
        kind.expected()
    )
}

/// Class names from the names file when present (one per line, blank lines ignored), else the
/// standard names.
fn class_names(dir: &Path, kind: CifarKind) -> Result<Vec<String>> {
    let path = dir.join(kind.names_file());
    if !path.is_file() {
        let names: &[&str] = match kind {
            CifarKind::Cifar10 => &CIFAR10_NAMES,
            CifarKind::Cifar100 => &CIFAR100_NAMES,
        };
        return Ok(names.iter().map(|s| s.to_string()).collect());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if names.len() != kind.classes() {
        bail!(
            "{}: lists {} class names, {} has {} classes",
            path.display(),
            names.len(),
            kind.name(),
            kind.classes()
        );
    }
    Ok(names)
}

/// Reads and concatenates the records of `paths`: CHW pixels and labels.
fn read_files(paths: &[PathBuf], kind: CifarKind) -> Result<(Vec<u8>, Vec<usize>)> {
    let total: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let records = total as usize / kind.record_size();
    let mut pixels = Vec::with_capacity(records * PIXELS);
    let mut labels = Vec::with_capacity(records);
    for p in paths {
        read_file(p, kind, &mut pixels, &mut labels)?;
    }
    Ok((pixels, labels))
}

/// Appends the records of one CIFAR binary file to `pixels` and `labels`.
pub fn read_file(
    path: &Path,
    kind: CifarKind,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<usize>,
) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let rs = kind.record_size();
    if bytes.is_empty() {
        bail!("{}: empty file, no {}-byte records", path.display(), rs);
    }
    if bytes.len() % rs != 0 {
        bail!(
            "{}: size {} bytes is not a multiple of the {}-byte {} record ({} records and {} bytes left over); is this the {} binary version?",
            path.display(),
            bytes.len(),
            rs,
            kind.name(),
            bytes.len() / rs,
            bytes.len() % rs,
            kind.name()
        );
    }
    let lb = kind.label_bytes();
    for (i, rec) in bytes.chunks_exact(rs).enumerate() {
        // CIFAR-100 records are coarse label, fine label, pixels: the fine label is the last.
        let label = rec[lb - 1] as usize;
        if label >= kind.classes() {
            bail!(
                "{}: record {i} has label {label}, outside 0..{} ({} classes)",
                path.display(),
                kind.classes() - 1,
                kind.classes()
            );
        }
        labels.push(label);
        pixels.extend_from_slice(&rec[lb..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_names() {
        assert_eq!(CIFAR100_NAMES.len(), 100);
        let mut sorted = CIFAR100_NAMES.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, CIFAR100_NAMES.to_vec(), "alphabetical, unique");
        assert_eq!(CifarKind::Cifar10.record_size(), 3073);
        assert_eq!(CifarKind::Cifar100.record_size(), 3074);
    }
}
