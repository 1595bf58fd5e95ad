//! Image-folder data sets: one sub-folder of JPEG/PNG files per class.
//!
//! Two layouts are accepted:
//! - `PATH/train/<class>/*` and `PATH/test/<class>/*`: the splits as given. Class names come from
//!   `train/`; a class folder in `test/` that `train/` lacks is an error.
//! - `PATH/<class>/*`: one pool, split deterministically. A file goes to test when the FNV-1a
//!   hash of `"<class>/<file name>"` modulo 100 is below [`TEST_PERCENT`] (20). The rule needs
//!   no seed, does not depend on the folder's location or on listing order, and keeps each
//!   file's side when files are added or removed, so a test image never turns into a training
//!   image as the data set grows. The split is about 80/20 per class, not exact.
//!
//! Class names are the sorted sub-folder names (byte order), labels their positions. Files are
//! taken when their extension is `jpg`, `jpeg` or `png` (any case); other files (`.DS_Store`,
//! notes) are ignored. Each image is decoded by the `image` crate (format guessed from the
//! content), converted to RGB (or luma for 1-channel models) and resized to the model's H, W
//! with the bilinear filter of [`super::pixels::resize_chw`]. Decoding runs in parallel on rayon.
//!
//! Errors name the file or folder: an unreadable or corrupt image, a class folder without
//! images, a folder without class sub-folders.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;

use super::{pixels, Dataset, Splits};

/// Percentage of each class that goes to the test split in the single-pool layout.
pub const TEST_PERCENT: u64 = 20;

/// Whether `file_name` of class `class` belongs to the test split in the single-pool layout.
pub fn is_test_file(class: &str, file_name: &str) -> bool {
    // FNV-1a, 64 bit: stable across platforms and Rust versions (unlike `DefaultHasher`).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in class.bytes().chain([b'/']).chain(file_name.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h % 100 < TEST_PERCENT
}

/// Loads both splits from `root`, images conformed to `input` (`[C, H, W]`, C = 1 or 3).
pub fn load(root: &Path, input: [usize; 3]) -> Result<Splits> {
    let (names, train_files, test_files) = list(root, input)?;
    decode_splits(root, &names, &train_files, &test_files, input)
}

/// Both listed splits decoded into memory.
pub(super) fn decode_splits(
    root: &Path,
    names: &[String],
    train: &[Item],
    test: &[Item],
    input: [usize; 3],
) -> Result<Splits> {
    Ok(Splits {
        train: decode_split(root, "train", names, train, input)?,
        test: decode_split(root, "test", names, test, input)?,
    })
}

/// One listed split decoded into memory, named `"<root> <what>"`.
pub(super) fn decode_split(
    root: &Path,
    what: &str,
    names: &[String],
    items: &[Item],
    input: [usize; 3],
) -> Result<Dataset> {
    decode_all(&format!("{} {what}", root.display()), items, names, input)
}

/// Class names and the files of each split (nothing is decoded).
pub(super) fn list(root: &Path, input: [usize; 3]) -> Result<(Vec<String>, Vec<Item>, Vec<Item>)> {
    if !root.is_dir() {
        bail!("{}: no such folder", root.display());
    }
    if input[0] != 1 && input[0] != 3 {
        bail!(
            "{}: the model expects {}-channel images; image folders give RGB (3) or grayscale (1)",
            root.display(),
            input[0]
        );
    }
    let (train_dir, test_dir) = (root.join("train"), root.join("test"));
    let (names, train_files, test_files) = match (train_dir.is_dir(), test_dir.is_dir()) {
        (true, true) => {
            let names = class_dirs(&train_dir)?;
            let train = list_split(&train_dir, &names, &names)?;
            let test_names = class_dirs(&test_dir)?;
            if let Some(extra) = test_names.iter().find(|n| !names.contains(n)) {
                bail!(
                    "{}: class folder '{extra}' has no counterpart in {}",
                    test_dir.display(),
                    train_dir.display()
                );
            }
            let test = list_split(&test_dir, &test_names, &names)?;
            (names, train, test)
        }
        (true, false) | (false, true) => bail!(
            "{}: has {} but no {}; use train/<class>/ and test/<class>/, or put the class folders directly in {}",
            root.display(),
            if train_dir.is_dir() { "train/" } else { "test/" },
            if train_dir.is_dir() { "test/" } else { "train/" },
            root.display()
        ),
        (false, false) => {
            let names = class_dirs(root)?;
            let all = list_split(root, &names, &names)?;
            let (test, train): (Vec<_>, Vec<_>) = all.into_iter().partition(|f| {
                let file = f.path.file_name().unwrap_or_default().to_string_lossy();
                is_test_file(&names[f.label], &file)
            });
            (names, train, test)
        }
    };
    Ok((names, train_files, test_files))
}

/// The test split alone: the same listing and split rule, only the test images decoded.
pub fn load_test(root: &Path, input: [usize; 3]) -> Result<super::Dataset> {
    let (names, _, test_files) = list(root, input)?;
    decode_split(root, "test", &names, &test_files, input)
}

/// One image file and its label.
pub(super) struct Item {
    pub(super) path: PathBuf,
    pub(super) label: usize,
}

/// Sorted names of the sub-folders of `dir` (hidden ones skipped); an error when there are none.
fn class_dirs(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?
    {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            names.push(name);
        }
    }
    if names.is_empty() {
        bail!(
            "{}: no class sub-folders (expected <class>/ folders of JPEG or PNG images, or train/ and test/ holding them)",
            dir.display()
        );
    }
    names.sort();
    Ok(names)
}

fn is_image_name(p: &Path) -> bool {
    let ext = p
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"))
        && !p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// The image files of each class folder `dir/<name>` for `names`, labelled by their position in
/// `all_names`, in (label, file name) order. A class folder without images is an error.
fn list_split(dir: &Path, names: &[String], all_names: &[String]) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for name in names {
        let label = all_names
            .iter()
            .position(|n| n == name)
            .expect("names is a subset of all_names");
        let cdir = dir.join(name);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cdir)
            .with_context(|| format!("{}: cannot list", cdir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("{}: cannot list", cdir.display()))?;
        files.retain(|p| p.is_file() && is_image_name(p));
        if files.is_empty() {
            bail!(
                "{}: empty class folder (no .jpg, .jpeg or .png files)",
                cdir.display()
            );
        }
        files.sort();
        items.extend(files.into_iter().map(|path| Item { path, label }));
    }
    Ok(items)
}

/// A decoder's message on one line (some end theirs with a newline or span several).
fn one_line(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    s.split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Decodes one file to 8-bit RGB; errors name the file.
pub(super) fn decode_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::ImageReader::open(path)
        .map_err(|e| anyhow!("{}: cannot read: {}", path.display(), one_line(e)))?
        .with_guessed_format()
        .map_err(|e| anyhow!("{}: cannot read: {}", path.display(), one_line(e)))?
        .decode()
        .map_err(|e| {
            anyhow!(
                "{}: corrupt or unsupported image: {}",
                path.display(),
                one_line(e)
            )
        })?
        .to_rgb8())
}

/// An interleaved RGB image (`h * w * 3` bytes) as CHW planes.
pub(super) fn hwc_to_chw(raw: &[u8], h: usize, w: usize) -> Vec<u8> {
    let mut chw = vec![0u8; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        chw[i] = px[0];
        chw[h * w + i] = px[1];
        chw[2 * h * w + i] = px[2];
    }
    chw
}

/// Decodes one file to a CHW `u8` image of `shape`.
fn decode(path: &Path, shape: [usize; 3]) -> Result<Vec<u8>> {
    let img = decode_rgb(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let chw = hwc_to_chw(img.as_raw(), h, w);
    let mut out = vec![0u8; shape.iter().product()];
    pixels::convert(&chw, [3, h, w], shape, &mut out)
        .with_context(|| format!("{}: cannot convert", path.display()))?;
    Ok(out)
}

/// Decodes `items` in parallel straight into one pixel buffer. When several files are bad, the
/// first in listing order is reported, whatever the thread timing. An empty split is allowed
/// (the single-pool rule can leave a tiny set without test images); the trainer reports an
/// empty training set itself.
fn decode_all(name: &str, items: &[Item], names: &[String], shape: [usize; 3]) -> Result<Dataset> {
    let size = shape.iter().product::<usize>();
    let mut pixels = vec![0u8; items.len() * size];
    let results: Vec<Result<()>> = pixels
        .par_chunks_mut(size)
        .zip(items.par_iter())
        .map(|(dst, it)| {
            dst.copy_from_slice(&decode(&it.path, shape)?);
            Ok(())
        })
        .collect();
    results.into_iter().collect::<Result<()>>()?;
    let labels = items.iter().map(|it| it.label).collect();
    Dataset::new(name, shape, pixels, labels, names.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rule_is_stable_and_near_20_percent() {
        let n = (0..10_000)
            .filter(|i| is_test_file("cat", &format!("{i:05}.jpg")))
            .count();
        assert!((1800..2200).contains(&n), "{n}");
        // The class is part of the key: the same file names split differently in two classes
        // (values from an independent FNV-1a in Python).
        let split = |class: &str| -> Vec<usize> {
            (0..40)
                .filter(|i| is_test_file(class, &format!("{i:05}.jpg")))
                .collect()
        };
        assert_eq!(split("cat"), vec![3, 11, 16, 22, 24, 26, 28, 31, 33, 34]);
        assert_eq!(split("dog"), vec![9, 12, 23, 25, 27, 30, 31, 32, 35, 38]);
        // Known values pin the rule, so the split cannot drift between versions (computed
        // independently from the FNV-1a definition).
        let test: Vec<usize> = (0..40)
            .filter(|i| is_test_file("dog", &format!("{i}.png")))
            .collect();
        assert_eq!(test, vec![3, 6, 20, 29, 31, 39]);
    }

    #[test]
    fn image_names() {
        assert!(is_image_name(Path::new("a/b.JPG")));
        assert!(is_image_name(Path::new("b.png")));
        assert!(!is_image_name(Path::new("b.txt")));
        assert!(!is_image_name(Path::new(".hidden.png")));
        assert!(!is_image_name(Path::new("noext")));
    }
}
