//! Strided convolutions as channels-last column blocks of a few images: one GEMM per block with the
//! block's output pixels as rows, forward and both gradients.
//!
//! Why: a stride-2 3x3 layer's NCHW im2col gathers every other float of every input row one at a
//! time into per-image GEMMs of few columns, and the small-plane path (`small_plane.rs`) runs one
//! GEMM per output pixel, kernel row and (for the input gradient) tap, of `3 * ci` inner terms with
//! the batch as columns. Both ran below the GEMM's speed: ResNet-20's 32 -> 64 stride-2 layer
//! (batch 128, 1 thread) took 3.4 + 8.1 ms forward + backward inside a training step against
//! PyTorch's 1.8 + 5.7, ResNet-18's 128 -> 256 stride-2 layer at 128x128 input (batch 64, 2
//! threads) 11.7 + 18.0 against 6.9 + 17.4.
//!
//! Channels-last, a column row is cheap to build: with the input padded (`Xp[img][py][px][ci]`, the
//! pads' zeros around each image), the `kw` taps of kernel row `a` at output pixel `(oy, ox)` are
//! `kw * ci` consecutive floats (undilated; `kw` runs of `ci` otherwise), so a row of `K = kh * kw
//! * ci` column values is `kh` copies. A block of a few images (about [`BLOCK_FLOATS`] column
//! values, at least [`MIN_ROWS`] rows) is then one GEMM `Y[rows][co] = col[rows][K] · W2[K][co]`
//! (`W2[(a, b, c)][o] = w[o][c][a][b]`); the backward `dcol = dY · W2^T`, added back into the
//! padded input gradient run by run, and `dW2 += col^T · dY`. The layout changes (NCHW to
//! channels-last and back, `layout.rs`'s 8x8 transposes) copy each tensor once per pass.
//!
//! Measured per layer (a loop of `Conv2d::forward` and `backward` calls, median of 20, forward /
//! backward with the input gradient in ms, the rule's previous path -> this one; Intel Xeon with
//! AVX-512, OpenBLAS Cooperlake kernels; 1 thread, then 2): ResNet-20 (batch 128) 16 -> 32 from
//! 32x32, im2col 4.57 / 10.75 -> 4.07 / 8.76, 2 threads 2.45 / 5.80 -> 2.17 / 4.99; 32 -> 64 from
//! 16x16, small-plane 2.72 / 6.15 -> 2.85 / 5.76 (2 threads 2.54 / 5.62 -> 2.70 / 6.08, a tie
//! within the host's noise); ResNet-18 (batch 64) 64 -> 128 from 32x32, im2col 18.2 / 41.1 -> 18.4
//! / 35.9, 2 threads 9.18 / 20.5 -> 9.01 / 18.7; 128 -> 256 from 16x16, small-plane 19.1 / 31.4 ->
//! 15.3 / 31.0, 2 threads 10.4 / 17.3 -> 8.36 / 16.3; its Tucker-2 cores 40 -> 72 from 32x32 7.55 /
//! 17.8 -> 7.17 / 14.7, 72 -> 152 from 16x16 6.61 / 10.9 -> 5.59 / 11.4 (2 threads 3.82 / 7.82 ->
//! 2.90 / 6.27), 72 -> 152 from 8x8 1.96 / 3.94 -> 1.38 / 2.93. Lost, and left to the small-plane
//! path by [`Geom::cols_cl_pays`]: 256 -> 512 from 8x8 17.3 / 29.9 -> 19.4 / 38.4 and from 4x4 4.0
//! / 7.0 -> 8.7 / 17.2 (2.4 M weights packed again per block, and a `K x co` weight-gradient sum
//! per part), 128 -> 256 from 8x8 4.24 / 7.12 -> 4.14 / 8.55, 152 -> 304 from 4x4 1.43 / 2.45 ->
//! 1.80 / 3.44; a strided 1x1 (64 -> 128 from 32x32, im2col 3.09 / 8.79 -> 5.13 / 11.6). In
//! training steps (`elrt speed`, three alternating pairs, with the Intel rule of
//! `winograd_fused.rs` of the same change): resnet18@128 2 threads 98-104 -> 108-110 img/s, 1
//! thread 51.5-53.7 -> 53.2-55.4; ResNet-20 2 threads 939-952 -> 960-970; resnet18_tucker2@128 2
//! threads 132-133 -> 135-136; resnet18@64, resnet18_tucker2@64 and ResNet-20's Tucker-2 form ties.
//!
//! Other kernels of user CNNs (session 34, same host, 1 thread, forward / backward with the input
//! gradient, the previous path -> this one): 5x5 stride 2 pad 2, 48 -> 96 from 32x32 (batch 32),
//! im2col 15.8-16.2 / 35.2-36.4 -> 14.1-14.6 / 28.8-29.5 ms; 16 -> 32 from 64x64 (batch 64),
//! im2col 24.2-24.5 / 54.7-54.8 -> 19.2-20.4 / 38.0-40.5; 4x4 stride 2 pad 2, 32 -> 64 from 32x32
//! (batch 32), im2col 6.1-6.2 / 13.6-13.8 -> 5.1-5.3 / 10.5-10.9; 3x3 stride 2, 96 -> 128 from
//! 16x16 (batch 32), small-plane 5.1-5.5 / 7.6-7.9 -> 3.6-3.7 / 7.3-7.6. Under 16 input channels
//! (an RGB stem, 3 -> 32 3x3 stride 2 from 64x64) it loses, 1.5 / 4.0 -> 2.7-3.0 / 6.2-6.7.
//!
//! Numerics: each output is one GEMM dot product of `K` terms; the blocks and parts (fixed ranges
//! of the batch, see [`super::part_len`]) follow from the shapes alone and the parts' weight
//! gradients are summed in part order: results do not depend on the thread count.

use super::layout::transpose_block;
use super::small_plane::swap_inner;
use super::{add_bias, copy_run, mat, mat_mut, sum_parts_in_order, Geom, Override, Path};
use crate::engine::ops::simd::simd_dispatch;
use crate::engine::ops::{part_len, unzeroed};
use ndarray::linalg::general_mat_mul;
use rayon::prelude::*;

/// Column values per block: 1 MB, half the L2 of the Intel host measured.
const BLOCK_FLOATS: usize = 256 * 1024;
/// Fewest rows per block (unless the batch has fewer): each block's GEMM packs the whole
/// weight matrix again, and its weight gradient reads and writes the whole `K x co` sum.
/// Capped at a part (4 images at batch 64) instead, 128 -> 256 from 8x8 ran its backward in
/// 11.7 ms against 9.2 (1 thread), 72 -> 152 from 8x8 in 3.9 against 3.4 (parts of 64 rows
/// there). Where a part has this many rows it is the cap ([`Geom::cl_part_and_block`]):
/// ResNet-20 (batch 128), its two strided layers in a training step (`elrt speed
/// --profile-nodes`, blocks of 7 and 14 images in 10 parts -> 4 and 8 in 16), backward 9.71 /
/// 6.93 -> 9.28 / 6.30 ms at 1 thread, 5.53 / 3.71 -> 4.76 / 3.21 at 2, forward 3.25 / 1.96 ->
/// 2.47 / 1.57 at 2; the step at 2 threads 867-976 -> 932-1000 img/s (three alternating pairs).
const MIN_ROWS: usize = 512;
/// Most column values per block of several images (16 MB; only layers of thousands of input
/// channels reach it, and only the benchmark override sends those here).
const MAX_BLOCK_FLOATS: usize = 4 << 20;

/// The most weights (`K * co`) of a layer the speed rule sends here: a 128 -> 256 3x3 layer's.
const MAX_WEIGHTS: usize = 9 * 128 * 256;
/// The most on output planes under 8x8.
const MAX_WEIGHTS_SMALL_PLANES: usize = 128 * 1024;

/// The override of [`Geom::cols_cl_pays`].
static COLS_CL: Override = Override::new();

/// Benchmark override of this path: `Some(true)` on every layer it can take, `Some(false)`
/// never, `None` the speed rule.
#[doc(hidden)]
pub fn set_cols_channels_last(mode: Option<bool>) {
    COLS_CL.set(mode);
}

/// Whether the speed rule decides (no override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    COLS_CL.decide(|| true) && !COLS_CL.decide(|| false)
}

/// Per-block scratch: the padded channels-last images, their columns, the channels-last
/// output (or output gradient) block, and one image's channels-last plane.
struct Scratch {
    xp: Vec<f32>,
    col: Vec<f32>,
    yc: Vec<f32>,
    tmp: Vec<f32>,
}

impl Geom {
    /// Whether a layer can run here: ungrouped, on the im2col path (any kernel, stride,
    /// dilation and padding).
    pub(super) fn cols_cl_eligible(&self) -> bool {
        self.group == 1 && self.path == Path::Im2col
    }

    /// Whether it pays (the module doc has the measurements): strided layers with a kernel
    /// wider than 1x1, 16+ input channels, at most [`MAX_WEIGHTS`] weights and, on output
    /// planes under 8x8, at most [`MAX_WEIGHTS_SMALL_PLANES`]; the small-plane path keeps the
    /// others (few images' rows per block there, and many weights packed again per block).
    pub(super) fn cols_cl_pays(&self) -> bool {
        COLS_CL.decide(|| {
            let weights = self.cl_k() * self.co;
            self.sh * self.sw > 1
                && self.kh * self.kw > 1
                && self.ci >= 16
                && weights <= MAX_WEIGHTS
                && (self.oh * self.ow >= 64 || weights <= MAX_WEIGHTS_SMALL_PLANES)
        })
    }

    /// Column values per output pixel: `kh * kw * ci`, tap-major.
    fn cl_k(&self) -> usize {
        self.kh * self.kw * self.ci
    }

    /// Padded input height and width.
    fn cl_padded(&self) -> (usize, usize) {
        (self.h + self.pt + self.pb, self.w + self.pl + self.pr)
    }

    /// Images per part (the fixed ranges of the batch that run in parallel and sum their
    /// weight gradients in order) and per block. Blocks hold about [`BLOCK_FLOATS`] column
    /// values but at least [`MIN_ROWS`] rows unless that passes [`MAX_BLOCK_FLOATS`] (at least
    /// one image, at most the batch). Where a part ([`part_len`]) has [`MIN_ROWS`] rows, the
    /// parts stay [`part_len`] and their blocks split them evenly; else a part is [`part_len`]
    /// rounded up to whole blocks. Rounded up, ResNet-20's layers (batch 128: blocks of 7 and 14
    /// images against parts of 8) made 10 parts, 5 : 4 and a sliver at two threads.
    pub(super) fn cl_part_and_block(&self) -> (usize, usize) {
        let ohw = (self.oh * self.ow).max(1);
        let per_image = (ohw * self.cl_k()).max(1);
        let min_images = MIN_ROWS.div_ceil(ohw);
        let b = (BLOCK_FLOATS / per_image)
            .max(min_images)
            .min(MAX_BLOCK_FLOATS / per_image)
            .clamp(1, self.n.max(1));
        let p = part_len(self.n);
        if p >= min_images {
            let even = p.div_ceil(p.div_ceil(b));
            (p, even.max(min_images).min(p))
        } else {
            (p.div_ceil(b) * b, b)
        }
    }

    /// Scratch for blocks of up to `b` images.
    fn cl_scratch(&self, b: usize) -> Scratch {
        let (hp, wp) = self.cl_padded();
        let ohw = self.oh * self.ow;
        Scratch {
            // The padding stays zero: only the interior is ever written.
            xp: vec![0.0; b * hp * wp * self.ci],
            col: unzeroed(b * ohw * self.cl_k()),
            yc: unzeroed(b * ohw * self.co),
            tmp: unzeroed(self.h * self.w * self.ci),
        }
    }

    /// `W2[(a, b, c)][o] = w[o][c][a][b]`: the GEMM's `K x co` weight matrix, the
    /// small-plane path's taps-outside layout (`[o][t][c]`) transposed.
    fn cl_weights(&self, w: &[f32]) -> Vec<f32> {
        let (k, co) = (self.cl_k(), self.co);
        let mut w2 = unzeroed(k * co);
        transpose_block(k, co, &self.taps_outside(w), &mut w2);
        w2
    }

    /// `images` NCHW images `x` into the interior of the padded channels-last `xp`, through
    /// `tmp` (a plain transpose, then row copies).
    fn cl_pad_images(&self, x: &[f32], images: usize, xp: &mut [f32], tmp: &mut [f32]) {
        let (hw, ci) = (self.h * self.w, self.ci);
        let (hp, wp) = self.cl_padded();
        let tmp = &mut tmp[..hw * ci];
        for i in 0..images {
            transpose_block(hw, ci, &x[i * ci * hw..][..ci * hw], tmp);
            let img = &mut xp[i * hp * wp * ci..][..hp * wp * ci];
            for y in 0..self.h {
                let dst = ((y + self.pt) * wp + self.pl) * ci;
                img[dst..dst + self.w * ci].copy_from_slice(&tmp[y * self.w * ci..][..self.w * ci]);
            }
        }
    }

    /// For output pixel `(oy, ox)` of an image, the start of each run of its column row in the
    /// padded image and the run's length: one run per kernel row (undilated), else per tap.
    #[inline(always)]
    fn cl_runs(&self, oy: usize, ox: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (ci, wp) = (self.ci, self.cl_padded().1);
        let mut k = 0;
        for a in 0..self.kh {
            let py = oy * self.sh + a * self.dh;
            if self.dw == 1 {
                f(k, (py * wp + ox * self.sw) * ci, self.kw * ci);
                k += self.kw * ci;
            } else {
                for b in 0..self.kw {
                    f(k, (py * wp + ox * self.sw + b * self.dw) * ci, ci);
                    k += ci;
                }
            }
        }
    }

    /// The column rows of `images` padded images.
    fn cl_cols(&self, xp: &[f32], images: usize, col: &mut [f32]) {
        cols_fill(self, xp, images, col)
    }

    /// Adds the column gradients `dcol` back into `images` padded images `dxp` (zeroed by the
    /// caller): the adjoint of [`Self::cl_cols`].
    fn cl_uncols(&self, dcol: &[f32], images: usize, dxp: &mut [f32]) {
        cols_add_back(self, dcol, images, dxp)
    }

    /// Forward: `y` (`[n, co, oh, ow]`, every entry written) `= conv(x, w) + bias`.
    pub(super) fn cols_cl_forward(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let (xlen, ylen) = (self.x_len(), self.y_len());
        let (ohw, k, co) = (self.oh * self.ow, self.cl_k(), self.co);
        let w2 = self.cl_weights(w);
        let w2v = mat(&w2, k, co);
        let (part, blk) = self.cl_part_and_block();
        y.par_chunks_mut(part * ylen)
            .zip(x.par_chunks(part * xlen))
            .with_max_len(1)
            .for_each(|(yp, xp)| {
                let mut s = self.cl_scratch(blk);
                for (yb, xb) in yp.chunks_mut(blk * ylen).zip(xp.chunks(blk * xlen)) {
                    let images = xb.len() / xlen;
                    let rows = images * ohw;
                    self.cl_pad_images(xb, images, &mut s.xp, &mut s.tmp);
                    self.cl_cols(&s.xp, images, &mut s.col);
                    let mut yc = mat_mut(&mut s.yc, rows, co);
                    general_mat_mul(1.0, &mat(&s.col, rows, k), &w2v, 0.0, &mut yc);
                    for (yi, yci) in yb.chunks_mut(ylen).zip(s.yc.chunks(ohw * co)) {
                        transpose_block(co, ohw, yci, yi);
                        if let Some(b) = bias {
                            add_bias(yi, ohw, b);
                        }
                    }
                }
            });
    }

    /// Backward: `dx` (`[n, ci, h, w]`, overwritten) when given, and `dw` (`[co, ci, kh, kw]`,
    /// overwritten).
    pub(super) fn cols_cl_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (xlen, ylen) = (self.x_len(), self.y_len());
        let (ohw, hw, k, ci, co) = (
            self.oh * self.ow,
            self.h * self.w,
            self.cl_k(),
            self.ci,
            self.co,
        );
        let (hp, wp) = self.cl_padded();
        let w2 = self.cl_weights(w);
        let w2v = mat(&w2, k, co);
        let (part, blk) = self.cl_part_and_block();
        let parts = self.n.div_ceil(part);
        let mut dx_parts: Vec<Option<&mut [f32]>> = match dx {
            Some(d) => d.chunks_mut(part * xlen).map(Some).collect(),
            None => (0..parts).map(|_| None).collect(),
        };
        let partials: Vec<Vec<f32>> = dx_parts
            .par_iter_mut()
            .zip(x.par_chunks(part * xlen))
            .zip(dy.par_chunks(part * ylen))
            .with_max_len(1)
            .map(|((dxp, xp), dyp)| {
                let mut s = self.cl_scratch(blk);
                let mut dcol = if dxp.is_some() {
                    unzeroed(blk * ohw * k)
                } else {
                    Vec::new()
                };
                // Zeroed per block below.
                let mut dxc = if dxp.is_some() {
                    unzeroed(blk * hp * wp * ci)
                } else {
                    Vec::new()
                };
                let mut dw2 = vec![0.0f32; k * co];
                for (b, (xb, dyb)) in xp
                    .chunks(blk * xlen)
                    .zip(dyp.chunks(blk * ylen))
                    .enumerate()
                {
                    let images = xb.len() / xlen;
                    let rows = images * ohw;
                    // dY channels-last: [rows][co].
                    for (dyi, yci) in dyb.chunks(ylen).zip(s.yc.chunks_mut(ohw * co)) {
                        transpose_block(ohw, co, dyi, yci);
                    }
                    let dyc = mat(&s.yc, rows, co);
                    self.cl_pad_images(xb, images, &mut s.xp, &mut s.tmp);
                    self.cl_cols(&s.xp, images, &mut s.col);
                    general_mat_mul(
                        1.0,
                        &mat(&s.col, rows, k).t(),
                        &dyc,
                        1.0,
                        &mut mat_mut(&mut dw2, k, co),
                    );
                    if let Some(dxp) = dxp.as_deref_mut() {
                        general_mat_mul(1.0, &dyc, &w2v.t(), 0.0, &mut mat_mut(&mut dcol, rows, k));
                        let dxc = &mut dxc[..images * hp * wp * ci];
                        dxc.fill(0.0);
                        self.cl_uncols(&dcol, images, dxc);
                        // The interior back to NCHW.
                        let dxb = &mut dxp[b * blk * xlen..][..images * xlen];
                        for (i, dxi) in dxb.chunks_mut(xlen).enumerate() {
                            let img = &dxc[i * hp * wp * ci..][..hp * wp * ci];
                            let tmp = &mut s.tmp[..hw * ci];
                            for yy in 0..self.h {
                                let src = ((yy + self.pt) * wp + self.pl) * ci;
                                tmp[yy * self.w * ci..][..self.w * ci]
                                    .copy_from_slice(&img[src..src + self.w * ci]);
                            }
                            transpose_block(ci, hw, tmp, dxi);
                        }
                    }
                }
                dw2
            })
            .collect();
        let parts: Vec<&[f32]> = partials.iter().map(Vec::as_slice).collect();
        let mut dw2 = unzeroed(k * co);
        sum_parts_in_order(&parts, &mut dw2);
        // [t][c][o] -> [o][t][c] -> [o][c][t].
        let mut dw_taps = unzeroed(k * co);
        transpose_block(co, k, &dw2, &mut dw_taps);
        swap_inner(&dw_taps, dw, co, self.kh * self.kw, ci);
    }
}

/// Calls `f(at, src, len)` for every run of the column rows of `images` padded images: `len`
/// values at `at` in the columns (rows of `cl_k()`) that are the `len` values at `src` in the
/// padded images, in row order.
#[inline(always)]
fn for_each_run(g: &Geom, images: usize, mut f: impl FnMut(usize, usize, usize)) {
    let (hp, wp) = g.cl_padded();
    let (k, img_len) = (g.cl_k(), hp * wp * g.ci);
    let mut r = 0;
    for i in 0..images {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                g.cl_runs(oy, ox, |at, src, len| f(r * k + at, i * img_len + src, len));
                r += 1;
            }
        }
    }
}

simd_dispatch! {
    /// [`Geom::cl_cols`], compiled for AVX-512 / AVX2 where the CPU has them.
    fn cols_fill(g: &Geom, xp: &[f32], images: usize, col: &mut [f32])
        => cols_fill_body, (g, xp, images, col); ["avx512f", "avx2"]
}

#[inline(always)]
fn cols_fill_body(g: &Geom, xp: &[f32], images: usize, col: &mut [f32]) {
    for_each_run(g, images, |at, src, len| {
        copy_run(&mut col[at..at + len], &xp[src..src + len]);
    });
}

simd_dispatch! {
    /// [`Geom::cl_uncols`], compiled for AVX-512 / AVX2 where the CPU has them.
    fn cols_add_back(g: &Geom, dcol: &[f32], images: usize, dxp: &mut [f32])
        => cols_add_back_body, (g, dcol, images, dxp); ["avx512f", "avx2"]
}

#[inline(always)]
fn cols_add_back_body(g: &Geom, dcol: &[f32], images: usize, dxp: &mut [f32]) {
    for_each_run(g, images, |at, dst, len| {
        dxp[dst..dst + len]
            .iter_mut()
            .zip(&dcol[at..at + len])
            .for_each(|(d, s)| *d += s);
    });
}
