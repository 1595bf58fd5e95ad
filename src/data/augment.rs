//! Training-time augmentation and per-channel normalisation of one image.
//!
//! Follows the standard CIFAR recipe (torchvision `RandomCrop(32, padding=4)`,
//! `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(mean, std)`): the image is padded with
//! black (raw 0, before normalisation, as torchvision pads the PIL image), a window of the
//! original size is cut at a random offset, mirrored left-right with probability 1/2, scaled to
//! `[0, 1]` and normalised. All three steps are fused into one pass that writes `f32` straight
//! into the batch, through a per-channel 256-entry lookup table.
//!
//! The random draws per image are fixed in number and order (crop row, crop column, flip), so
//! an image's augmentation is a function of the [`Rng`] stream it is given and nothing else.

use anyhow::{bail, Result};

use crate::rng::Rng;

/// CIFAR-10 training-set channel means (R, G, B), the usual defaults.
pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
/// CIFAR-10 training-set channel standard deviations (R, G, B).
pub const CIFAR_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// Random crop with zero padding and random horizontal flip.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Zero padding on each side before the random crop; 0 disables cropping.
    pub pad: usize,
    /// Mirror left-right with probability 1/2.
    pub flip: bool,
}

impl Default for Augment {
    /// Pad 4 and flip: the CIFAR recipe.
    fn default() -> Augment {
        Augment { pad: 4, flip: true }
    }
}

/// Per-channel normalisation `(x / 255 - mean[c]) / std[c]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Default for Normalize {
    fn default() -> Normalize {
        Normalize::cifar()
    }
}

impl Normalize {
    /// One mean and one standard deviation (in `[0, 1]` pixel units) per channel.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Normalize> {
        if mean.is_empty() || mean.len() != std.len() {
            bail!(
                "normalisation needs one mean and one std per channel, got {} and {}",
                mean.len(),
                std.len()
            );
        }
        if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            bail!("normalisation std must be positive and finite, got {s}");
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            bail!("normalisation mean must be finite, got {m}");
        }
        Ok(Normalize { mean, std })
    }

    /// The CIFAR-10 defaults [`CIFAR_MEAN`], [`CIFAR_STD`].
    pub fn cifar() -> Normalize {
        Normalize {
            mean: CIFAR_MEAN.to_vec(),
            std: CIFAR_STD.to_vec(),
        }
    }

    /// The default for `c`-channel images: the CIFAR values for 3 channels, otherwise their
    /// averages (0.4734, 0.2507) for every channel.
    pub fn for_channels(c: usize) -> Normalize {
        if c == 3 {
            return Normalize::cifar();
        }
        Normalize {
            mean: vec![CIFAR_MEAN.iter().sum::<f32>() / 3.0; c],
            std: vec![CIFAR_STD.iter().sum::<f32>() / 3.0; c],
        }
    }

    /// Mean 0, std 1: pixels scaled to `[0, 1]` only.
    pub fn identity(c: usize) -> Normalize {
        Normalize {
            mean: vec![0.0; c],
            std: vec![1.0; c],
        }
    }

    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    pub fn mean(&self) -> &[f32] {
        &self.mean
    }

    pub fn std(&self) -> &[f32] {
        &self.std
    }

    /// `table[c][v]` is the normalised value of raw pixel `v` in channel `c`.
    pub fn table(&self) -> Vec<[f32; 256]> {
        self.mean
            .iter()
            .zip(&self.std)
            .map(|(&m, &s)| {
                let mut t = [0f32; 256];
                for (v, x) in t.iter_mut().enumerate() {
                    *x = (v as f32 / 255.0 - m) / s;
                }
                t
            })
            .collect()
    }
}

/// The random choices for one image: crop offsets into the padded image and the flip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
}

impl Augment {
    /// Draws this image's crop offsets (each in `0..=2*pad`) and flip, in that order.
    pub fn draw(&self, rng: &mut Rng) -> Choice {
        let span = 2 * self.pad + 1;
        let dy = if self.pad > 0 { rng.below(span) } else { 0 };
        let dx = if self.pad > 0 { rng.below(span) } else { 0 };
        let flip = self.flip && rng.uniform() < 0.5;
        Choice { dy, dx, flip }
    }

    /// The identity choice (no shift, no flip) for this padding.
    pub fn center(&self) -> Choice {
        Choice {
            dy: self.pad,
            dx: self.pad,
            flip: false,
        }
    }
}

/// Writes image `src` (`u8` CHW of `shape`) into `out` (`f32` CHW, same shape), cropped and
/// flipped per `choice` with padding `pad`, and normalised by `table` (from
/// [`Normalize::table`]). With `choice = None` the image is only normalised.
pub fn apply(
    src: &[u8],
    [c, h, w]: [usize; 3],
    pad: usize,
    choice: Option<Choice>,
    table: &[[f32; 256]],
    out: &mut [f32],
) {
    debug_assert_eq!(src.len(), c * h * w);
    debug_assert_eq!(out.len(), c * h * w);
    debug_assert_eq!(table.len(), c);
    let plane = h * w;
    for ch in 0..c {
        let t = &table[ch];
        let s = &src[ch * plane..(ch + 1) * plane];
        let o = &mut out[ch * plane..(ch + 1) * plane];
        let Some(Choice { dy, dx, flip }) = choice else {
            for (x, &v) in o.iter_mut().zip(s) {
                *x = t[v as usize];
            }
            continue;
        };
        let zero = t[0];
        for y in 0..h {
            let orow = &mut o[y * w..(y + 1) * w];
            // Source row in the unpadded image; outside it the padding is black.
            let sy = (y + dy).wrapping_sub(pad);
            if sy >= h {
                orow.fill(zero);
                continue;
            }
            let srow = &s[sy * w..(sy + 1) * w];
            for (x, ov) in orow.iter_mut().enumerate() {
                let xx = if flip { w - 1 - x } else { x };
                let sx = (xx + dx).wrapping_sub(pad);
                *ov = if sx < w { t[srow[sx] as usize] } else { zero };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Vec<u8> {
        (0..c * h * w).map(|i| (i % 251) as u8 + 1).collect()
    }

    #[test]
    fn center_choice_is_identity_and_normalises() {
        let shape = [3, 5, 6];
        let src = ramp(3, 5, 6);
        let norm = Normalize::cifar();
        let t = norm.table();
        let mut a = vec![0f32; 90];
        let mut b = vec![0f32; 90];
        let aug = Augment::default();
        apply(&src, shape, aug.pad, Some(aug.center()), &t, &mut a);
        apply(&src, shape, aug.pad, None, &t, &mut b);
        assert_eq!(a, b);
        for (i, (&v, &x)) in src.iter().zip(&a).enumerate() {
            let ch = i / 30;
            let want = (v as f32 / 255.0 - CIFAR_MEAN[ch]) / CIFAR_STD[ch];
            assert!((x - want).abs() < 1e-6);
        }
    }

    #[test]
    fn shift_pads_with_black_and_flip_mirrors() {
        let shape = [1, 3, 4];
        let src: Vec<u8> = (1..=12).collect();
        let t = Normalize::identity(1).table();
        let mut o = vec![0f32; 12];
        // Shift down-right by one: output (y, x) = src(y - 1, x - 1).
        apply(
            &src,
            shape,
            2,
            Some(Choice {
                dy: 1,
                dx: 1,
                flip: false,
            }),
            &t,
            &mut o,
        );
        let raw: Vec<u8> = o.iter().map(|v| (v * 255.0).round() as u8).collect();
        assert_eq!(raw, vec![0, 0, 0, 0, 0, 1, 2, 3, 0, 5, 6, 7]);
        apply(
            &src,
            shape,
            2,
            Some(Choice {
                dy: 2,
                dx: 2,
                flip: true,
            }),
            &t,
            &mut o,
        );
        let raw: Vec<u8> = o.iter().map(|v| (v * 255.0).round() as u8).collect();
        assert_eq!(raw, vec![4, 3, 2, 1, 8, 7, 6, 5, 12, 11, 10, 9]);
    }

    #[test]
    fn draws_cover_the_range() {
        let aug = Augment::default();
        let mut rng = Rng::new(3);
        let cs: Vec<Choice> = (0..2000).map(|_| aug.draw(&mut rng)).collect();
        assert!(cs.iter().all(|c| c.dy <= 8 && c.dx <= 8));
        assert!(cs.iter().any(|c| c.dy == 0) && cs.iter().any(|c| c.dx == 8));
        let flips = cs.iter().filter(|c| c.flip).count();
        assert!((850..1150).contains(&flips), "{flips}");
        let none = Augment {
            pad: 0,
            flip: false,
        };
        assert_eq!(none.draw(&mut rng), none.center());
    }

    #[test]
    fn normalize_validation() {
        assert!(Normalize::new(vec![0.5], vec![0.0]).is_err());
        assert!(Normalize::new(vec![0.5, 0.5], vec![1.0]).is_err());
        assert_eq!(Normalize::for_channels(3), Normalize::cifar());
        assert_eq!(Normalize::for_channels(1).channels(), 1);
    }
}
