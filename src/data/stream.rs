//! Image folders decoded on the fly, for data sets larger than memory.
//!
//! A [`StreamSet`] holds the file list and labels of one split, never all its pixels. The
//! loader's workers ([`super::loader`]) decode each image when a batch needs it, through a
//! [`Cache`] that keeps what fits under a byte budget (`--cache-mb`), and the loader's bounded
//! queues prefetch the next batches. Memory is then the cache budget plus the batches in flight
//! (queues and workers), whatever the folder's size.
//!
//! How an image becomes the model's `[C, H, W]` input is the [`Prep`]:
//! - [`Prep::Crop`], ImageNet-style, for folders streamed by `elrt train`: an image larger than
//!   `H x W` (taller or wider) is, in training, a random resized crop ([`rrc_window`]: area 8% to
//!   100%, aspect ratio 3/4 to 4/3, as torchvision's `RandomResizedCrop`) resized to `H x W`,
//!   then flipped left-right with probability 1/2; in evaluation, the centre window that
//!   torchvision's `Resize(H / 0.875)` + `CenterCrop(H)` keeps ([`centre_window`]), resized to
//!   `H x W`. An image that fits inside `H x W` is resized to it (aspect ratio not kept) and
//!   augmented as the in-memory path does (pad 4, random crop, flip), so a folder of small
//!   images gives the very batches the in-memory path gives.
//! - [`Prep::Resize`]: every image resized to `H x W`, as the in-memory path
//!   ([`super::folder`]) does; used to evaluate, on a test split too large for memory, a model
//!   that was trained in memory.
//!
//! Resizing is the `image` crate's bilinear (`Triangle`) filter throughout, as elsewhere.
//! The random draws of an image come from the loader's per-image stream `(seed, epoch, image)`,
//! so batches stay a pure function of `(seed, epoch, batch)`, cached or not.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Rgb};

use super::augment::{self, Augment, Choice};
use super::cache::{Cache, CacheStats, Decoded};
use super::{folder, pixels};
use crate::rng::Rng;

/// torchvision's evaluation recipe resizes to `H / 0.875` (256 for 224) before the centre crop.
pub const EVAL_CROP_FRACTION: f64 = 0.875;
/// Random resized crop: the crop's share of the image area, torchvision's default.
pub const RRC_SCALE: (f64, f64) = (0.08, 1.0);
/// Random resized crop: the crop's aspect ratio (width / height), torchvision's default.
pub const RRC_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// How a streamed image is brought to the model's input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prep {
    /// ImageNet-style: random resized crop + flip (training), centre crop (evaluation) for
    /// images larger than the input; smaller ones resized.
    Crop,
    /// Every image resized to the input size, as the in-memory path.
    Resize,
}

/// A window of an image: top row, left column, height, width (in pixels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub top: usize,
    pub left: usize,
    pub h: usize,
    pub w: usize,
}

/// torchvision's `RandomResizedCrop.get_params` for an `h x w` image: up to ten tries of an
/// area share in [`RRC_SCALE`] and a log-uniform aspect ratio in [`RRC_RATIO`], the first
/// window that fits placed uniformly; after ten misses, the centre window with the aspect ratio
/// clamped to the range.
pub fn rrc_window(h: usize, w: usize, rng: &mut Rng) -> Window {
    let area = (h * w) as f64;
    let (lr0, lr1) = (RRC_RATIO.0.ln(), RRC_RATIO.1.ln());
    for _ in 0..10 {
        let target = area * (RRC_SCALE.0 + (RRC_SCALE.1 - RRC_SCALE.0) * rng.uniform() as f64);
        let ratio = (lr0 + (lr1 - lr0) * rng.uniform() as f64).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.below(h - ch + 1);
            let left = rng.below(w - cw + 1);
            return Window {
                top,
                left,
                h: ch,
                w: cw,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < RRC_RATIO.0 {
        ((w as f64 / RRC_RATIO.0).round() as usize, w)
    } else if in_ratio > RRC_RATIO.1 {
        (h, (h as f64 * RRC_RATIO.1).round() as usize)
    } else {
        (h, w)
    };
    let (ch, cw) = (ch.clamp(1, h), cw.clamp(1, w));
    Window {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        h: ch,
        w: cw,
    }
}

/// The part of an `h x w` image that torchvision's `Resize(H / 0.875)` followed by
/// `CenterCrop((H, W))` keeps, in source pixels: the image scaled by `s` so that it covers
/// `H / 0.875 x W / 0.875` (for a square input: its shorter side becomes `H / 0.875`), and the
/// centred `H x W` window of that, i.e. `H / s x W / s` source pixels (rounded).
pub fn centre_window(h: usize, w: usize, [th, tw]: [usize; 2]) -> Window {
    let s =
        (th as f64 / EVAL_CROP_FRACTION / h as f64).max(tw as f64 / EVAL_CROP_FRACTION / w as f64);
    let ch = ((th as f64 / s).round() as usize).clamp(1, h);
    let cw = ((tw as f64 / s).round() as usize).clamp(1, w);
    Window {
        top: (h - ch) / 2,
        left: (w - cw) / 2,
        h: ch,
        w: cw,
    }
}

/// `window` of an HWC RGB image, resized (bilinear) to `shape`'s `H x W` and laid out CHW with
/// `shape`'s channels (1: luma after resizing, as [`pixels::convert`]).
fn crop_resize(src: &Decoded, win: Window, [c, th, tw]: [usize; 3]) -> Vec<u8> {
    let mut rows = Vec::with_capacity(win.h * win.w * 3);
    for y in win.top..win.top + win.h {
        let row = (y * src.w + win.left) * 3;
        rows.extend_from_slice(&src.pixels[row..row + win.w * 3]);
    }
    let crop: ImageBuffer<Rgb<u8>, Vec<u8>> =
        ImageBuffer::from_raw(win.w as u32, win.h as u32, rows).expect("window inside the image");
    let r = if (win.h, win.w) == (th, tw) {
        crop
    } else {
        imageops::resize(&crop, tw as u32, th as u32, FilterType::Triangle)
    };
    let chw = folder::hwc_to_chw(r.as_raw(), th, tw);
    if c == 3 {
        return chw;
    }
    let mut out = vec![0u8; c * th * tw];
    pixels::convert(&chw, [3, th, tw], [c, th, tw], &mut out).expect("3 -> 1 channel is supported");
    out
}

/// One split of an image folder, decoded when its images are asked for.
pub struct StreamSet {
    name: String,
    shape: [usize; 3],
    prep: Prep,
    files: Arc<Vec<PathBuf>>,
    labels: Vec<usize>,
    class_names: Vec<String>,
    cache: Arc<Cache>,
}

impl std::fmt::Debug for StreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSet")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("prep", &self.prep)
            .field("images", &self.files.len())
            .finish()
    }
}

/// Cache keys: the image index and what is kept of it.
const KEY_SOURCE: u64 = 0;
const KEY_FINISHED: u64 = 1;

impl StreamSet {
    /// `files[i]` has label `labels[i]`; images come out as `shape` (`[C, H, W]`, C = 1 or 3);
    /// up to `cache_bytes` of decoded images are kept.
    pub fn new(
        name: impl Into<String>,
        shape: [usize; 3],
        prep: Prep,
        files: Vec<PathBuf>,
        labels: Vec<usize>,
        class_names: Vec<String>,
        cache_bytes: usize,
    ) -> Result<StreamSet> {
        let name = name.into();
        if files.len() != labels.len() {
            return Err(anyhow!(
                "{name}: {} files, {} labels",
                files.len(),
                labels.len()
            ));
        }
        if let Some(l) = labels.iter().find(|&&l| l >= class_names.len()) {
            return Err(anyhow!("{name}: label {l} without a class name"));
        }
        if shape[0] != 1 && shape[0] != 3 {
            return Err(anyhow!(
                "{name}: the model expects {}-channel images; image folders give RGB (3) or grayscale (1)",
                shape[0]
            ));
        }
        Ok(StreamSet {
            name,
            shape,
            prep,
            files: Arc::new(files),
            labels,
            class_names,
            cache: Arc::new(Cache::new(cache_bytes)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    pub fn prep(&self) -> Prep {
        self.prep
    }

    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// The file of image `i`.
    pub fn file(&self, i: usize) -> &std::path::Path {
        &self.files[i]
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// The same files labelled by `model_classes` (see [`super::Dataset::relabelled`]); the
    /// cache is shared.
    pub fn relabelled(&self, model_classes: &[String]) -> Result<StreamSet> {
        let map = super::label_map(&self.name, &self.class_names, model_classes)?;
        Ok(StreamSet {
            name: self.name.clone(),
            shape: self.shape,
            prep: self.prep,
            files: self.files.clone(),
            labels: self.labels.iter().map(|&l| map[l]).collect(),
            class_names: model_classes.to_vec(),
            cache: self.cache.clone(),
        })
    }

    /// Image `i` decoded, HWC RGB at its file's size.
    fn source(&self, i: usize) -> Result<Arc<Decoded>> {
        self.cache
            .get_or_insert_with(i as u64 * 2 + KEY_SOURCE, || {
                let img = folder::decode_rgb(&self.files[i])?;
                Ok(Decoded {
                    h: img.height() as usize,
                    w: img.width() as usize,
                    pixels: img.into_raw(),
                })
            })
    }

    /// Whether an `h x w` image is brought to the input by resizing alone.
    fn resized_only(&self, h: usize, w: usize) -> bool {
        self.prep == Prep::Resize || (h <= self.shape[1] && w <= self.shape[2])
    }

    /// A decoded source resized to the input shape, CHW (the in-memory path's conversion).
    fn resized(&self, i: usize, src: &Decoded) -> Result<Vec<u8>> {
        let chw = folder::hwc_to_chw(&src.pixels, src.h, src.w);
        let mut out = vec![0u8; self.shape.iter().product()];
        pixels::convert(&chw, [3, src.h, src.w], self.shape, &mut out)
            .map_err(|e| anyhow!("{}: cannot convert: {e}", self.files[i].display()))?;
        Ok(out)
    }

    /// Image `i` as evaluation sees it, CHW `u8` of the input shape (cached as such: an
    /// evaluation image is the same every epoch).
    pub fn eval_image(&self, i: usize) -> Result<Arc<Decoded>> {
        let [_, h, w] = self.shape;
        self.cache
            .get_or_insert_with(i as u64 * 2 + KEY_FINISHED, || {
                let src = folder::decode_rgb(&self.files[i])?;
                let src = Decoded {
                    h: src.height() as usize,
                    w: src.width() as usize,
                    pixels: src.into_raw(),
                };
                let pixels = if self.resized_only(src.h, src.w) {
                    self.resized(i, &src)?
                } else {
                    crop_resize(&src, centre_window(src.h, src.w, [h, w]), self.shape)
                };
                Ok(Decoded { h, w, pixels })
            })
    }

    /// Writes image `i`, normalised by `table`, into `out` (`f32` CHW of the input shape):
    /// augmented with draws from `rng` when `augment` is given, as evaluation sees it otherwise.
    pub fn write(
        &self,
        i: usize,
        augment: Option<(&Augment, &mut Rng)>,
        table: &[[f32; 256]],
        out: &mut [f32],
    ) -> Result<()> {
        let Some((aug, rng)) = augment else {
            let img = self.eval_image(i)?;
            augment::apply(&img.pixels, self.shape, 0, None, table, out);
            return Ok(());
        };
        let src = self.source(i)?;
        if self.resized_only(src.h, src.w) {
            let img = self.resized(i, &src)?;
            let choice = aug.draw(rng);
            augment::apply(&img, self.shape, aug.pad, Some(choice), table, out);
        } else {
            let win = rrc_window(src.h, src.w, rng);
            let flip = aug.flip && rng.uniform() < 0.5;
            let img = crop_resize(&src, win, self.shape);
            let choice = Choice { dy: 0, dx: 0, flip };
            augment::apply(&img, self.shape, 0, Some(choice), table, out);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rrc_windows_follow_torchvision_ranges() {
        let mut rng = Rng::new(11);
        let (h, w) = (375, 500);
        let mut shares = Vec::new();
        for _ in 0..4000 {
            let win = rrc_window(h, w, &mut rng);
            assert!(win.h >= 1 && win.w >= 1 && win.top + win.h <= h && win.left + win.w <= w);
            let share = (win.h * win.w) as f64 / (h * w) as f64;
            let ratio = win.w as f64 / win.h as f64;
            // Rounding to whole pixels moves both by a little.
            assert!((0.075..=1.0).contains(&share), "{share}");
            assert!((0.74..=1.36).contains(&ratio), "{ratio} {win:?}");
            shares.push(share);
        }
        // Area shares are uniform on [0.08, 1] among the windows that fit (large ones miss more
        // often, so the mean sits a little below 0.54).
        let mean = shares.iter().sum::<f64>() / shares.len() as f64;
        assert!((0.42..0.56).contains(&mean), "{mean}");
        assert!(shares.iter().any(|&s| s < 0.12) && shares.iter().any(|&s| s > 0.9));
    }

    #[test]
    fn rrc_falls_back_to_the_clamped_centre_window() {
        // A 1-pixel-high strip: no drawn window fits (height 1 needs an area under 4/3 px²
        // with ratio <= 4/3), so the fallback takes the whole height and width = h * 4/3.
        let mut rng = Rng::new(0);
        let win = rrc_window(1, 1000, &mut rng);
        assert_eq!(
            win,
            Window {
                top: 0,
                left: 499,
                h: 1,
                w: 1
            }
        );
        // Tall strip: width kept, height = w / (3/4).
        let win = rrc_window(1000, 3, &mut rng);
        assert_eq!(
            win,
            Window {
                top: 498,
                left: 0,
                h: 4,
                w: 3
            }
        );
    }

    #[test]
    fn centre_window_is_resize_then_centre_crop() {
        // 224 input, 500x375 photo: the shorter side 375 -> 256, so 224 of 256 = 328 source rows
        // and columns, centred.
        let win = centre_window(375, 500, [224, 224]);
        assert_eq!(
            win,
            Window {
                top: 23,
                left: 86,
                h: 328,
                w: 328
            }
        );
        // Non-square input: the scale covers both sides.
        let win = centre_window(96, 96, [64, 32]);
        assert_eq!((win.h, win.w), (84, 42));
    }
}
