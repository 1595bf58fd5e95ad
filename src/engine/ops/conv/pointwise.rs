//! Few-channel pointwise (1x1, stride 1, unpadded) convs as direct dot products on the NCHW
//! planes, through the register tiles of `direct.rs` (forward and input gradient) and
//! `weight_grad.rs` (weight gradient): a 1x1 conv is their `y[o][p] = sum_j w[o][j] *
//! x[offs[j] + p]` with one tap per input channel at `offs[c] = c * h * w`, so no copy, no
//! padding and no GEMM packing. On 8x8 to 15x16 planes (64 to 255 outputs) it also takes
//! wide layers (up to 256 channels, MobileNets' expansions and projections, ResNet-18 Tucker-2's
//! middle stages): there the alternative is the blocked GEMM (`block.rs`) with its copies.
//!
//! Why: the factors of a low-rank layer are 1x1 convs with few channels on one side (ResNet-20
//! at Tucker-2 ratio 0.5: 16 -> 8, 8 -> 16, 32 -> 16, ..., 64 -> 32), where a GEMM per image
//! of `co x ci` by `ci x hw` spends its time packing: `Conv 1x1` was 30% of the Tucker-2 step on
//! an AVX2 host. Every output is one f32 dot product over the input channels in order, so the
//! results do not depend on the thread count or the batch; the weight gradient sums fixed
//! parts of the batch (`part_len`) in part order.
//!
//! Measured on an AVX2-only AMD EPYC (Zen kernels), batch 64, 1 thread, forward then backward
//! (criterion, `conv_kernels` group `direct_forward`), GEMM -> direct: 16 -> 8 on 32x32 2.77 ->
//! 2.36 ms, 8 -> 16 on 32x32 3.60 -> 2.81, 64 -> 32 on 8x8 1.46 -> 0.80. ResNet-20 Tucker-2
//! (ratio 0.5) training step, batch 128, old/new alternating: 1 thread 415-504 -> 360-414
//! ms/step, its 1x1 time 154-183 -> 118-135 ms; 2 threads a tie.

use super::block::BLOCK_COLS;
use super::direct::Taps;
use super::weight_grad::{dot_tiles, Runs};
use super::{add_bias, Geom, Override, Path};
use crate::engine::ops::linear::Gemm;
use ndarray::{ArrayView1, ArrayViewMut2};
use rayon::prelude::*;

/// Benchmark override of [`Geom::pointwise_direct`]'s speed rule.
static MODE: Override = Override::new();

/// Widest side (input or output channels) this path takes. Criterion, AVX2 Zen, batch 64, 1
/// thread, forward then backward, GEMM -> direct: 32 -> 64 on 8x8 1.50 -> 0.94 ms; losses
/// 128 -> 64 on 16x16 17.6 -> 19.9, 64 -> 128 19.5 -> 21.3, 24 -> 144 11.2 -> 12.6, a tie at
/// 256 -> 128 on 8x8 (a GEMM with many output rows packs well). Wins not taken: 96 -> 24 on
/// 16x16 7.50 -> 6.05 and 192 -> 32 on 8x8 5.26 -> 3.03 (few outputs from many inputs): with
/// them, EfficientNet-B0's and MobileNetV2's whole steps showed no gain within the noise. Since
/// session 16 this bound holds on planes of [`BLOCK_COLS`] outputs and more only: smaller ones
/// follow [`MAX_CHANNELS_BLOCKED_PLANES`], measured per node rather than by whole steps.
const MAX_CHANNELS: usize = 64;

/// Multiply-adds per image (`ci * co * h * w`) from which a GEMM per image wins again: with
/// enough channels on both sides and a large plane, packing is a small share of the GEMM and
/// its kernel beats the direct tiles. Criterion, AVX2 Zen, batch 64, 1 thread, forward then
/// backward, GEMM / direct: 64 -> 40 on 32x32 23.4 / 27.9 ms, 40 -> 64 21.7 / 27.1, on 16x16
/// 5.03 / 5.77 and 4.99 / 5.75, 24 -> 32 on 32x32 8.68 / 10.9; ties at 2^19 (32 -> 16 on 32x32
/// 7.59 / 7.90, 32 -> 64 on 16x16 5.27 / 5.47); below it direct wins (48 -> 24 on 16x16 2.51 /
/// 2.37, 16 -> 8 on 32x32 2.30 / 1.72, 64 -> 32 on 8x8 1.15 / 0.74). ResNet-18's Tucker-2 form
/// (64 <-> 40 factors of its first stage) is where this moves layers back to GEMM. On an
/// AVX-512 Zen 4 (criterion, batch 64, 1 thread: the bench's pool, which this note called 2
/// threads; GEMM / direct) the large planes stay mixed, so the rule stands: 16 -> 96 on 32x32 15.0 / 16.2 ms, 24 -> 144 on 16x16 5.36 / 6.87,
/// 144 -> 24 7.94 / 6.96, 48 -> 24 1.66 / 1.36, 16 -> 8 on 32x32 1.14 / 1.22.
const MAX_MACS_PER_IMAGE: usize = 1 << 19;

/// Widest side taken on planes of 64 to [`BLOCK_COLS`] outputs (8x8 to 15x16), whatever the
/// multiply-adds: the alternative there is not a GEMM per image but `block.rs`'s several images
/// per GEMM, which pays a copy in and out of the wide column matrices on top of the packing.
/// Measured on an AVX-512 AMD EPYC (Zen 4, OpenBLAS Cooperlake), batch 64, 1 thread, per node
/// (`elrt speed --profile-nodes`), blocked -> direct, backward / forward in ms: MobileNetV2's
/// 192 -> 32 on 8x8 2.17 -> 1.34 / 0.96 -> 0.49, 32 -> 192 1.91 -> 1.18 / 0.92 -> 0.59;
/// ResNet-18 Tucker-2's 128 -> 72 on 8x8 2.64 -> 1.91 / 1.12 -> 0.80; EfficientNet-B0's 240 ->
/// 40 on 8x8 3.13 -> 1.87 / 1.16 -> 0.77. criterion `direct_forward` (`1x1_*_8px`) has the
/// kernel pairs, up to 256 channels.
const MAX_CHANNELS_BLOCKED_PLANES: usize = 256;

/// The direct pointwise path: `Some(false)` off (such layers go back to a GEMM per image or
/// blocked), `Some(true)` on for every layer of a shape its kernels take whatever its size,
/// `None` the speed rule; for benchmarks and tests that compare them.
pub fn set_direct_pointwise(mode: Option<bool>) {
    MODE.set(mode);
}

impl Geom {
    /// Whether this layer runs here: an ungrouped pointwise conv on planes of 64+ outputs whose
    /// size is a multiple of 16 (the kernels' vector runs) with, on planes smaller than
    /// [`BLOCK_COLS`], at most [`MAX_CHANNELS_BLOCKED_PLANES`] channels on either side, and on
    /// larger ones at most [`MAX_CHANNELS`] and fewer than [`MAX_MACS_PER_IMAGE`] multiply-adds
    /// per image.
    pub(super) fn pointwise_direct(&self) -> bool {
        let hw = self.oh * self.ow;
        let shape =
            self.path == Path::Pointwise && self.group == 1 && hw >= 64 && hw.is_multiple_of(16);
        let pays = || {
            let widest = self.ci.max(self.co);
            if hw < BLOCK_COLS {
                widest <= MAX_CHANNELS_BLOCKED_PLANES
            } else {
                widest <= MAX_CHANNELS && self.ci * self.co * hw < MAX_MACS_PER_IMAGE
            }
        };
        shape && MODE.decide(pays)
    }

    fn channel_offsets(&self, channels: usize) -> Vec<usize> {
        let hw = self.h * self.w;
        (0..channels).map(|c| c * hw).collect()
    }

    /// Forward: `y` (`[n, co, h, w]`, every entry written) `= conv(x, w) + bias`.
    pub(super) fn pointwise_forward(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let (xlen, ylen, hw) = (self.x_len(), self.y_len(), self.oh * self.ow);
        let offs = self.channel_offsets(self.ci);
        y.par_chunks_mut(ylen)
            .zip(x.par_chunks(xlen))
            .with_max_len(1)
            .for_each(|(yi, xi)| {
                let t = Taps {
                    x: xi,
                    offs: &offs,
                    w,
                    run: hw,
                };
                t.check();
                super::direct::dot_rows(&t, yi);
                if let Some(b) = bias {
                    add_bias(yi, hw, b);
                }
            });
    }

    /// Backward: `dx` (`[n, ci, h, w]`, every entry written) when given, and `dw` (`[co, ci]`,
    /// overwritten).
    pub(super) fn pointwise_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (xlen, ylen, hw) = (self.x_len(), self.y_len(), self.oh * self.ow);
        let (ci, co) = (self.ci, self.co);
        if let Some(dx) = dx {
            // dx = conv(dy, w^T): a pointwise conv from co to ci channels (a 1x1 kernel's
            // flip is itself, so the direct input gradient's weights are the transpose).
            let wt = self.flipped_transposed(w);
            let offs = self.channel_offsets(co);
            dx.par_chunks_mut(xlen)
                .zip(dy.par_chunks(ylen))
                .with_max_len(1)
                .for_each(|(dxi, dyi)| {
                    let t = Taps {
                        x: dyi,
                        offs: &offs,
                        w: &wt,
                        run: hw,
                    };
                    t.check();
                    super::direct::dot_rows(&t, dxi);
                });
        }
        let part = super::super::part_len(self.n);
        let offs = self.channel_offsets(ci);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(part * xlen)
            .zip(dy.par_chunks(part * ylen))
            .with_max_len(1)
            .map(|(xp, dyp)| {
                let mut d = vec![0.0f32; co * ci];
                let r = Runs {
                    x: xp,
                    dy: dyp,
                    offs: &offs,
                    run: hw,
                    dyrow: hw,
                    rows: co,
                    images: xp.len() / xlen,
                    xstride: xlen,
                    dystride: ylen,
                };
                r.check();
                dot_tiles(&r, &mut d);
                d
            })
            .collect();
        // Summed in part order, element by element: the same sums whatever the thread count.
        let parts: Vec<&[f32]> = partials.iter().map(Vec::as_slice).collect();
        super::sum_parts_in_order(&parts, dw);
    }
}

/// `v` as a `rows x cols` matrix (row-major) to write into.
fn mat_mut(v: &mut [f32], rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, cols), v).expect("a one-pixel conv's buffer shape")
}

/// Benchmark override of [`Geom::pointwise_one_pixel`].
static ONE_PIXEL: Override = Override::new();

/// A one-pixel layer as a Gemm: `y = x w^T + b`, the weight `[co, ci]` transposed.
const ONE_PIXEL_GEMM: Gemm = Gemm {
    alpha: 1.0,
    beta: 1.0,
    trans_a: false,
    trans_b: true,
};

/// The one-pixel pointwise path ([`Geom::pointwise_one_pixel`]): `Some(false)` off (such
/// layers go back to the blocked GEMMs of `block.rs`), `Some(true)` or `None` on; for
/// benchmarks and tests that compare them.
pub fn set_pointwise_one_pixel(mode: Option<bool>) {
    ONE_PIXEL.set(mode);
}

impl Geom {
    /// Whether this layer is an ungrouped pointwise conv on 1x1 planes: squeeze-excitation's
    /// two convs after the global pool (MobileNet-V3, EfficientNet), a classifier written as a
    /// conv. Its input and output are the matrices `[n, ci]` and `[n, co]`, so the layer is a
    /// `Gemm` (`linear.rs`: `y = x w^T + b`, its products split in fixed ranges across threads)
    /// with no copy at all. The blocked path (`block.rs`) laid 16 images' pixels side by side
    /// one value at a time and ran GEMMs of 16 columns: about 30 GFLOP/s, against 75-85 for
    /// the blocked convs of 16+ pixels.
    pub(super) fn pointwise_one_pixel(&self) -> bool {
        self.path == Path::Pointwise
            && self.group == 1
            && self.h * self.w == 1
            && ONE_PIXEL.decide(|| true)
    }

    /// Forward of a one-pixel layer: `x w^T + bias` (`[n, co]`), the Gemm's own buffer.
    pub(super) fn one_pixel_forward(&self, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let b = bias.map(|b| ArrayView1::from(b).into_dyn());
        let (y, offset) = ONE_PIXEL_GEMM
            .forward(
                super::mat(x, self.n, self.ci),
                super::mat(w, self.co, self.ci),
                b,
            )
            .expect("a one-pixel conv's shapes make a valid Gemm")
            .into_raw_vec_and_offset();
        debug_assert!(
            offset.unwrap_or(0) == 0,
            "a fresh Gemm output starts its buffer"
        );
        y
    }

    /// Backward of a one-pixel layer: `dx` (`[n, ci]`, every entry written) `= dy w` when
    /// given, and `dw` (`[co, ci]`, overwritten) `= dy^T x`.
    pub(super) fn one_pixel_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        ONE_PIXEL_GEMM
            .backward_into(
                super::mat(x, self.n, self.ci),
                super::mat(w, self.co, self.ci),
                super::mat(dy, self.n, self.co),
                dx.map(|d| mat_mut(d, self.n, self.ci)),
                mat_mut(dw, self.co, self.ci),
            )
            .expect("a one-pixel conv's shapes make a valid Gemm");
    }
}
