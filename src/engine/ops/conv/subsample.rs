//! Strided 1x1 convs (ResNet's downsample shortcuts, 1x1 stride 2) as a subsample of the input
//! and a stride-1 pointwise conv on it.
//!
//! A 1x1 conv with stride `(sh, sw)` and no padding reads only the input pixels
//! `(oy * sh, ox * sw)`: it is the pointwise conv of the subsampled input `xs[n][c][oy][ox] =
//! x[n][c][oy * sh][ox * sw]`. Its input gradient is the pointwise input gradient scattered
//! back to those pixels (zero elsewhere), its weight and bias gradients the pointwise ones.
//! One gather of `n * ci * oh * ow` floats buys the pointwise paths: a GEMM per image, several
//! images per GEMM on small planes (`block.rs`), or the direct dot products (`pointwise.rs`).
//! Before, such layers went to im2col, whose small planes took the small-plane path
//! (`small_plane.rs`): one GEMM of `batch x ci` by `ci x co` per output pixel, 21-26 GFLOP/s
//! on ResNet-18's 64 -> 128 shortcut at 64x64 input (8x8 output), against ~45-55 for a
//! pointwise GEMM of the same size (AVX2 Zen host, 1 thread, batch 64).

use super::Geom;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the subsample path off (`false`: strided 1x1 convs go back to im2col and its
/// small-plane and blocked variants) or on; for benchmarks and tests that compare the two.
pub fn set_subsample_pointwise(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// Whether the choice is the speed rule's (no override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    !DISABLED.load(Ordering::Relaxed)
}

impl Geom {
    /// Whether this layer runs here: an ungrouped 1x1 conv with a stride above 1 on some axis
    /// and no padding (dilation does not matter for a 1x1 kernel).
    pub(super) fn subsample_eligible(&self) -> bool {
        self.group == 1
            && self.kh == 1
            && self.kw == 1
            && (self.sh > 1 || self.sw > 1)
            && [self.pt, self.pl, self.pb, self.pr] == [0; 4]
            && !DISABLED.load(Ordering::Relaxed)
    }

    /// Whether the subsampled conv runs faster than im2col: where it takes several images per
    /// GEMM (`block.rs`) or the direct dot products (`pointwise.rs`). Best of 15 calls, batch
    /// 64, stride 2, AVX2 Zen host, im2col -> subsample, forward / backward in ms, 1 thread:
    /// 64 -> 128 from 16x16 1.99 / 4.00 -> 1.40 / 3.20; 128 -> 256 from 8x8 1.36 / 2.46 ->
    /// 1.10 / 2.36; 256 -> 512 from 4x4 1.36 / 2.45 -> 1.08 / 2.14; 128 -> 256 from 16x16
    /// 7.32 / 12.76 -> 4.48 / 9.91; 512 -> 1024 from 8x8 19.9 / 34.8 -> 13.6 / 28.8; 16 -> 32
    /// from 32x32 (direct) 1.00 / 2.44 -> 0.49 / 1.25. At 2 threads the same or larger gains,
    /// except where the subsampled plane is 16x16 or more and takes a GEMM per image: 64 -> 128
    /// from 32x32 3.19 / 7.87 -> 4.34 / 9.04 (im2col gathers one image at a time, in cache for
    /// its GEMM; the subsample writes the whole batch first), so those stay on im2col.
    pub(super) fn subsample_pays(&self) -> bool {
        let inner = self.subsampled();
        inner.block_images() > 1 || inner.pointwise_direct()
    }

    /// The stride-1 pointwise conv on the subsampled input `[n, ci, oh, ow]`.
    pub(super) fn subsampled(&self) -> Geom {
        super::Conv2d {
            group: 1,
            strides: [1, 1],
            pads: [0; 4],
            dilations: [1, 1],
        }
        .geom(
            &[self.n, self.ci, self.oh, self.ow],
            &[self.co, self.ci, 1, 1],
        )
        .expect("a pointwise conv on the subsampled shape is valid")
    }

    /// `xs[n][c][oy][ox] = x[n][c][oy * sh][ox * sw]`, image by image in parallel.
    pub(super) fn subsample(&self, x: &[f32]) -> Vec<f32> {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut xs = vec![0.0f32; self.n * self.ci * ohw];
        xs.par_chunks_mut(self.ci * ohw)
            .zip(x.par_chunks(self.ci * hw))
            .with_max_len(1)
            .for_each(|(dst, src)| {
                for (d, s) in dst.chunks_mut(ohw).zip(src.chunks(hw)) {
                    for (drow, oy) in d.chunks_mut(self.ow).zip(0..) {
                        let srow = &s[oy * self.sh * self.w..];
                        for (v, ox) in drow.iter_mut().zip(0..) {
                            *v = srow[ox * self.sw];
                        }
                    }
                }
            });
        xs
    }

    /// The adjoint of [`Self::subsample`]: `dxs` (`[n, ci, oh, ow]`) placed at the sampled
    /// pixels of a zero `[n, ci, h, w]` gradient.
    pub(super) fn unsample(&self, dxs: &[f32]) -> Vec<f32> {
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut dx = super::zeros(self.n * self.ci * hw);
        dx.par_chunks_mut(self.ci * hw)
            .zip(dxs.par_chunks(self.ci * ohw))
            .with_max_len(1)
            .for_each(|(dst, src)| {
                for (d, s) in dst.chunks_mut(hw).zip(src.chunks(ohw)) {
                    for (srow, oy) in s.chunks(self.ow).zip(0..) {
                        let drow = &mut d[oy * self.sh * self.w..];
                        for (&v, ox) in srow.iter().zip(0..) {
                            drow[ox * self.sw] = v;
                        }
                    }
                }
            });
        dx
    }
}
