//! 2-D convolution (ONNX `Conv`): any group count, strides, asymmetric pads, dilations, bias.
//!
//! Layout: NCHW, one image at a time. For one image the convolution is, per group,
//! `Y[co, oh*ow] = W[co, ci*kh*kw] · col[ci*kh*kw, oh*ow]`, and both `W` (as stored by ONNX) and
//! `Y` (a slice of the NCHW output) are already row-major matrices, so no layout conversion is
//! ever needed. Measured on this machine (1 thread, OpenBLAS 0.3.21, 2026-11): the per-image
//! GEMMs of ResNet-20's three stages (forward 16x144x1024, 32x288x256, 64x576x64, and the two
//! backward products) run at 80-122 GFLOP/s against 125 for 1024^3, and batching 8 or 32 images
//! into one wider GEMM is no faster (72-122), while one image's im2col buffer (at most 576 KiB
//! there) stays in L2 and a batched one would not. NHWC would only transpose the same GEMMs.
//! Small planes are the exception: below 256 outputs per image (the 2x2 and 4x4 stages of
//! ResNet-18 at 64x64, 4 to 16 GEMM columns) packing dominates, and `block.rs` puts several
//! images in one GEMM; that doubled ResNet-18's training step at 64x64 (README, speed). From
//! 32 channels, such layers (not pointwise) now go further: `small_plane.rs` runs the whole
//! batch channels-last as one GEMM per output pixel and kernel row, with no multiply-adds on
//! padding (ResNet-18 at 64x64: 501 -> 370 ms per training step, 1 thread). Among those, the
//! stride-1 3x3 ones of 64+ channels on 4x4 to 7x7 planes run Winograd F(4x4, 3x3)
//! channels-last over the whole batch instead, forward and both gradients (`winograd_cl.rs`: 36
//! multiply-adds per channel pair and 4x4 plane against 100), and so do Winograd layers of 72+
//! channels on 8x8 to 15x15 planes and 128+ on 16x16 (ResNet-18 at 64x64: 487-496 -> 447-455
//! ms per training step, 1 thread, from its 4x4 layers alone).
//!
//! Three paths, chosen from the attributes:
//! - pointwise (1x1, stride 1, no pads): the image itself is the column matrix, no im2col;
//!   strided 1x1 convs (ResNet shortcuts) whose subsampled plane is small become a subsample
//!   and a pointwise conv (`subsample.rs`);
//! - depthwise (one input channel per group): direct loops, since a GEMM with an inner dimension
//!   of `kh*kw` would be all overhead;
//! - everything else: im2col + sgemm per group, except that ungrouped stride-1 3x3 convs with
//!   at least 16 channels in and out on planes of at least 8x8 (those the direct kernel below
//!   does not take: at most 16 channels, or 24 on planes up to 16x16) run their forward and
//!   input gradient through Winograd F(2x2, 3x3) (2.25x fewer multiply-adds; `winograd.rs` has
//!   the measurements behind the thresholds), or F(4x4, 3x3) (4x fewer; `winograd4.rs`) on
//!   32x32+ planes of 24+ channels, where it measured faster.
//!
//! Those Winograd layers take their weight gradient in Winograd's transformed domain as well
//! (`winograd_dw.rs`, 1.15-1.5x faster than the direct kernel below on 32-128 channels, 16x16
//! and 32x32 planes), except small-plane ones (8x8) under 128 channels, which keep the
//! small-plane path's backward.
//!
//! The weight gradient of other stride-1 layers (with planes of at least about 8x8) and of
//! large-kernel strided image stems (ResNet's 7x7) does not use im2col either: `weight_grad.rs`
//! computes it
//! as dot products over the padded input (split into stride phases), 1.1-3x faster than packing
//! a column matrix that each feeds only `co` multiply-adds. Such stems, and stride-1 3x3
//! layers of up to 16 channels (24 on small planes), run their forward (and the latter their
//! input gradient) the same way (`direct.rs`: 1.4x faster than im2col + GEMM on ResNet-18's
//! stem, 1.2-1.8x faster than Winograd F(2x2) at 8-16 channels).
//!
//! Strided layers of 16+ input channels (ResNet's stride-2 3x3 convs, within a bound on their
//! weights) run as channels-last column blocks of a few images, one GEMM each (`cols_cl.rs`:
//! ResNet-18's 128 -> 256 stride-2 layer at 128x128 input, batch 64, 1 thread, forward 19.1 ->
//! 15.3 ms against the small-plane path).
//!
//! Files: this one holds the op (shapes, forward, backward, the GEMM paths); `im2col.rs` the
//! column gathers and their adjoint; `block.rs` several images per GEMM; `small_plane.rs` small
//! planes channels-last; `cols_cl.rs` strided layers as channels-last column blocks; `subsample.rs` strided 1x1 convs; `winograd.rs` the Winograd kernels
//! (`winograd4.rs` F(4x4)'s transforms, `winograd_dw.rs` the weight gradient; `winograd_cl.rs`
//! the channels-last whole-batch form for small planes); `weight_grad.rs`
//! the direct weight gradient and its
//! stride-phase layout; `direct.rs` the direct forward (and input gradient) on that layout;
//! `depthwise.rs` the direct depthwise loops; `depthwise_cl.rs` the channels-last depthwise
//! kernels for small and strided planes; `tests.rs` the checks against [`Conv2d::reference`]
//! and finite differences.
//!
//! Parallelism: rayon over fixed parts of the batch (see the [`super`] module notes); BLAS is
//! single-threaded inside (see [`crate::engine::init`]).

use super::{contiguous, part_len, sum, unzeroed, window_out_len, zeros};
use crate::engine::{attr_err, init, shape_err, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{
    Array1, Array2, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut2, Axis, Ix4, NdFloat,
};
use rayon::prelude::*;

/// Splits `rows x cols` outputs into register tiles of `mi` rows by `span` columns and runs the
/// body on each, with `m` the tile's height and `big_c` whether it is full across (else a
/// `rem`-column step): the direct kernels of `weight_grad.rs`, whose columns are taps, and
/// `direct.rs`, whose columns are positions. The last rows (fewer than `mi`) run as one tile
/// of their own height, not row by row: a 1-row tile has too few independent accumulators to
/// hide the multiply-add latency (16 rows on AVX2's 6-row tiles went 6 + 6 + 1 + 1 + 1 + 1,
/// and that forward ran 1.5x slower than with a 4-row last tile). [`row_tiles!`] turns the
/// run-time height into the tile's constant one.
macro_rules! for_each_row_tile {
    ($rows:expr, $cols:expr, $mi:expr, $span:expr, $rem:expr, |$o:ident, $m:ident, $c:ident, $big_c:ident| $body:block) => {{
        let (rows, cols) = ($rows, $cols);
        let mut $o = 0;
        while $o < rows {
            let $m = (rows - $o).min($mi);
            let mut $c = 0;
            while $c < cols {
                let $big_c = $c + $span <= cols;
                $body
                $c += if $big_c { $span } else { $rem };
            }
            $o += $m;
        }
    }};
}

/// Calls `$f::<M, N>(args)` for the run-time tile height `$m` (one of the listed heights) and
/// width `$n` when `$big`, else 1.
macro_rules! row_tiles {
    ($m:expr, $big:expr, $n:expr, $f:ident $args:tt, [$($k:literal),*]) => {
        match ($m, $big) {
            $(
                ($k, true) => $f::<$k, $n> $args,
                ($k, false) => $f::<$k, 1> $args,
            )*
            _ => unreachable!("tile height above the kernel's"),
        }
    };
}

mod block;
mod cols_cl;
mod depthwise;
mod depthwise_cl;
mod direct;
mod im2col;
mod layout;
mod pointwise;
mod small_plane;
mod subsample;
#[cfg(test)]
mod tests;
mod weight_grad;
mod winograd;
mod winograd4;
mod winograd_cl;
mod winograd_dw;
mod winograd_fused;

pub use cols_cl::set_cols_channels_last;
pub use depthwise_cl::set_depthwise_channels_last;
pub use direct::set_direct_forward;
pub use pointwise::{set_direct_pointwise, set_pointwise_one_pixel};
pub use small_plane::set_small_plane;
pub use subsample::set_subsample_pointwise;
pub use weight_grad::set_direct_weight_grad;
pub use winograd::{set_winograd, WinogradMode};
pub use winograd_cl::{set_winograd_cl, set_winograd_cl_weight_grad};
pub use winograd_dw::{
    set_winograd_weight_grad, set_winograd_weight_grad_f4, set_winograd_weight_grad_small_planes,
};
pub use winograd_fused::{set_winograd_fused, set_winograd_fused_weight_grad};

const OP: &str = "Conv";

/// Elements per task when the parts' weight gradients are summed: 64 KiB of output, which
/// stays in L1/L2 while the parts' slices stream past it.
const REDUCE_CHUNK: usize = 16 * 1024;

/// Overwrites `out` with the element-wise sum of `parts` (each at least `out.len()` long),
/// added in part order with the elements split across threads in [`REDUCE_CHUNK`] ranges: the
/// same sums as a serial loop, bit for bit, whatever the thread count, but no serial tail.
fn sum_parts_in_order(parts: &[&[f32]], out: &mut [f32]) {
    out.par_chunks_mut(REDUCE_CHUNK)
        .enumerate()
        .for_each(|(c, out)| {
            out.fill(0.0);
            for p in parts {
                out.iter_mut()
                    .zip(&p[c * REDUCE_CHUNK..])
                    .for_each(|(a, b)| *a += b);
            }
        });
}

/// Attributes of a 2-D convolution. Weights `[C_out, C_in / group, kH, kW]` and bias `[C_out]` are
/// inputs, as in ONNX, so one op value serves every layer with the same attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub group: usize,
    /// `[height, width]`.
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]` (ONNX's `[x1_begin, x2_begin, x1_end, x2_end]`).
    pub pads: [usize; 4],
    /// `[height, width]`.
    pub dilations: [usize; 2],
}

impl Default for Conv2d {
    fn default() -> Self {
        Conv2d {
            group: 1,
            strides: [1, 1],
            pads: [0; 4],
            dilations: [1, 1],
        }
    }
}

/// An array's values in standard (row-major) order, moved out without a copy when it is laid
/// out that way from the start of its buffer.
fn standard_vec(a: Array4<f32>) -> Vec<f32> {
    if !a.is_standard_layout() {
        return a.iter().copied().collect();
    }
    let n = a.len();
    let (v, off) = a.into_raw_vec_and_offset();
    let o = off.unwrap_or(0);
    if o == 0 && v.len() == n {
        v
    } else {
        v[o..o + n].to_vec()
    }
}

/// Gradients of a convolution with respect to its inputs.
#[derive(Clone, Debug)]
pub struct Conv2dGrads {
    /// `None` when the caller said it does not need it (the network's first layer).
    pub dx: Option<Array4<f32>>,
    pub dw: Array4<f32>,
    /// Always computed (one pass over `dy`); ignore it for a conv without bias.
    pub db: Array1<f32>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Path {
    Pointwise,
    Depthwise,
    Im2col,
}

/// Everything the kernels need, resolved and validated once per call.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    group: usize,
    cig: usize,
    cog: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    pt: usize,
    pl: usize,
    pb: usize,
    pr: usize,
    path: Path,
    /// An im2col geometry whose forward and input gradient run through Winograd F(2x2, 3x3)
    /// (`winograd.rs`); its weight gradient is im2col's or the direct one (`direct_dw`).
    winograd: bool,
    /// Winograd's output tile side: 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3), `winograd4.rs`).
    wino_tile: usize,
    /// Whether the weight gradient runs on the padded input (`weight_grad.rs`) rather than on
    /// im2col columns.
    direct_dw: bool,
    /// A Winograd layer whose weight gradient runs in the transformed domain too
    /// (`winograd_dw.rs`), over the whole batch after the parts' input gradients.
    wino_dw: bool,
    /// That weight gradient's tile side: 2 (F(2x2, 3x3)) or 4 (F(4x4, 3x3)), whatever the
    /// forward's `wino_tile`.
    wino_dw_tile: usize,
    /// Whether the forward runs as direct dot products on the padded input (`direct.rs`), and
    /// so the input gradient too where `Geom::direct_dx_geom` allows (stride 1, 8+ inputs).
    direct_fwd: bool,
    /// A stride-1 3x3 layer of at most 64 channels (128 on 16x16+ planes) whose forward, input
    /// gradient and (where `Geom::wino_fused_dw_pays`) weight gradient run as Winograd F(4x4,
    /// 3x3) one image at a time, all in cache (`winograd_fused.rs`); it runs through the direct
    /// path's branches (`direct_fwd` set too).
    wino_fused: bool,
    /// A small output plane run as channels-last GEMMs over the whole batch (`small_plane.rs`): its
    /// backward always, its forward unless Winograd runs it.
    small_plane: bool,
    /// A layer run as channels-last Winograd over the whole batch (`winograd_cl.rs`, tile side
    /// `wino_tile`): forward, input gradient and weight gradient (the last on the small-plane
    /// path where `Geom::wino_cl_dw_pays` says no); its backward takes the whole batch at once.
    wino_cl: bool,
    /// A strided 1x1 conv run as a subsample of the input and a stride-1 pointwise conv
    /// (`subsample.rs`); none of the other paths' flags apply.
    subsample: bool,
    /// A strided layer run as channels-last column blocks of a few images, one GEMM per block
    /// (`cols_cl.rs`): forward and both gradients; none of the other paths' flags apply.
    cols_cl: bool,
}

impl Conv2d {
    /// Output shape `[N, C_out, H_out, W_out]` for input shape `x` and weight shape `w`.
    pub fn output_shape(&self, x: &[usize], w: &[usize]) -> Result<[usize; 4]> {
        let g = self.geom(x, w)?;
        Ok([g.n, g.co, g.oh, g.ow])
    }

    /// Which kernel runs this conv, as a profile label: "Conv 1x1" (one GEMM per image),
    /// "Conv 1x1 direct" (few-channel pointwise layers as direct dot products, `pointwise.rs`),
    /// "Conv 1x1 gemm" (pointwise layers on 1x1 planes as one Gemm over the batch, the same),
    /// "Conv depthwise" (direct loops), "Conv winograd" (F(2x2, 3x3), `winograd.rs`; its weight
    /// gradient, direct or im2col's, is timed under the same label), "Conv winograd4"
    /// (F(4x4, 3x3), `winograd4.rs`), "Conv small-plane" (small planes as
    /// channels-last GEMMs over the batch, `small_plane.rs`), "Conv winograd+small-plane" (Winograd forward,
    /// small-plane backward), "Conv winograd4-cl" (F(4x4, 3x3) channels-last over the batch,
    /// `winograd_cl.rs`), "Conv im2col-cl" (strided layers as channels-last column blocks of a
    /// few images, `cols_cl.rs`), "Conv winograd4-fused" (F(4x4, 3x3) one image, or on small planes a
    /// few, at a time for layers of at most 64 channels, 128 on 16x16+ planes: forward, input
    /// and weight gradients, `winograd_fused.rs`), "Conv direct" (direct dot products on the padded input,
    /// forward and weight gradient, `direct.rs`), "Conv 1x1 strided" (a subsample, then a pointwise path,
    /// `subsample.rs`) or "Conv im2col" (im2col + GEMM), with " blocked" when
    /// small output planes put several images in one GEMM (`block.rs`). `elrt speed --profile` splits conv
    /// time this way, since the paths differ by 10x in GFLOP/s.
    pub fn kernel_label(&self, x: &[usize], w: &[usize]) -> Result<&'static str> {
        let g = self.geom(x, w)?;
        if g.subsample {
            return Ok("Conv 1x1 strided");
        }
        let blocked = g.block_images() > 1;
        if g.cols_cl {
            return Ok("Conv im2col-cl");
        }
        if g.wino_cl {
            return Ok(if g.wino_tile == 4 {
                "Conv winograd4-cl"
            } else {
                "Conv winograd-cl"
            });
        }
        match (g.winograd, g.small_plane) {
            (true, true) if g.wino_tile == 4 => return Ok("Conv winograd4+small-plane"),
            (true, true) => return Ok("Conv winograd+small-plane"),
            (true, false) if g.wino_tile == 4 => return Ok("Conv winograd4"),
            (true, false) => return Ok("Conv winograd"),
            (false, true) => return Ok("Conv small-plane"),
            _ => {}
        }
        if g.wino_fused {
            return Ok("Conv winograd4-fused");
        }
        if g.direct_fwd {
            return Ok("Conv direct");
        }
        if g.pointwise_one_pixel() {
            return Ok("Conv 1x1 gemm");
        }
        if g.pointwise_direct() {
            return Ok("Conv 1x1 direct");
        }
        Ok(match (g.path, blocked) {
            (Path::Pointwise, false) => "Conv 1x1",
            (Path::Pointwise, true) => "Conv 1x1 blocked",
            (Path::Depthwise, _) => "Conv depthwise",
            (Path::Im2col, false) => "Conv im2col",
            (Path::Im2col, true) => "Conv im2col blocked",
        })
    }

    fn geom(&self, x: &[usize], w: &[usize]) -> Result<Geom> {
        let (&[n, ci, h, wd], &[co, cig, kh, kw]) = (x, w) else {
            return Err(shape_err(
                OP,
                format!("input {x:?} and weight {w:?} must both have rank 4"),
            ));
        };
        let group = self.group;
        if group == 0 {
            return Err(attr_err(OP, "group must be at least 1"));
        }
        if ci == 0 || h == 0 || wd == 0 || co == 0 || kh == 0 || kw == 0 {
            return Err(shape_err(OP, format!("empty input {x:?} or weight {w:?}")));
        }
        if cig * group != ci {
            return Err(shape_err(
                OP,
                format!(
                    "input has {ci} channels but weight {w:?} with group {group} expects {}",
                    cig * group
                ),
            ));
        }
        if co % group != 0 {
            return Err(shape_err(
                OP,
                format!("{co} output channels are not divisible by group {group}"),
            ));
        }
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        let [pt, pl, pb, pr] = self.pads;
        let oh = window_out_len(OP, "height", h, kh, sh, dh, pt, pb, false)?;
        let ow = window_out_len(OP, "width", wd, kw, sw, dw, pl, pr, false)?;
        let path = if group > 1 && cig == 1 {
            Path::Depthwise
        } else if kh == 1 && kw == 1 && sh == 1 && sw == 1 && self.pads == [0; 4] {
            Path::Pointwise
        } else {
            Path::Im2col
        };
        let mut g = Geom {
            n,
            ci,
            h,
            w: wd,
            co,
            kh,
            kw,
            oh,
            ow,
            group,
            cig,
            cog: co / group,
            sh,
            sw,
            dh,
            dw,
            pt,
            pl,
            pb,
            pr,
            path,
            winograd: false,
            wino_tile: 2,
            direct_dw: false,
            wino_dw: false,
            wino_dw_tile: 2,
            direct_fwd: false,
            wino_fused: false,
            small_plane: false,
            wino_cl: false,
            subsample: false,
            cols_cl: false,
        };
        g.subsample = g.subsample_eligible() && g.subsample_pays();
        if g.subsample {
            return Ok(g);
        }
        // The direct forward first: where it pays it beats Winograd too (few channels).
        g.direct_fwd = g.direct_fwd_eligible() && g.direct_fwd_pays();
        g.winograd =
            !g.direct_fwd && g.path == Path::Im2col && g.winograd_eligible() && g.winograd_pays();
        if g.winograd && g.wino4_pays() {
            g.wino_tile = 4;
        }
        g.small_plane = !g.direct_fwd && g.small_plane_eligible() && g.small_plane_pays();
        g.wino_dw = g.winograd && g.wino_dw_pays();
        if g.wino_dw && g.wino_dw4_pays() {
            g.wino_dw_tile = 4;
        }
        // A Winograd layer's small-plane flag only chooses its backward.
        g.small_plane &= !g.wino_dw;
        g.direct_dw = !g.small_plane && !g.wino_dw && g.direct_dw_eligible() && g.direct_dw_pays();
        // Small planes that Winograd fills: channels-last Winograd over the batch.
        if g.wino_cl_eligible() && g.wino_cl_pays() {
            (g.wino_cl, g.wino_tile) = (true, 4);
            (g.winograd, g.wino_dw, g.direct_dw) = (false, false, false);
        }
        // Layers the fused Winograd path takes (ahead of the channels-last Winograd where both
        // could) run through the direct path's branches (which ask for it first), its input
        // gradient through `Geom::direct_dx_geom`.
        // Its weight gradient where `Geom::wino_fused_dw_pays`, else the Winograd one the
        // layer had, else the direct one.
        if g.wino_fused_eligible() && g.wino_fused_pays() {
            (g.wino_fused, g.direct_fwd, g.wino_cl) = (true, true, false);
            (g.winograd, g.small_plane) = (false, false);
            if g.wino_fused_dw_pays() {
                (g.wino_dw, g.direct_dw) = (false, false);
            } else {
                g.direct_dw = !g.wino_dw;
            }
        }
        // Strided layers of 16+ input channels that no direct kernel took.
        if !g.direct_fwd && !g.wino_cl && g.cols_cl_eligible() && g.cols_cl_pays() {
            g.cols_cl = true;
            (g.winograd, g.wino_dw, g.direct_dw, g.small_plane) = (false, false, false, false);
        }
        Ok(g)
    }

    fn check_bias(g: &Geom, len: Option<usize>) -> Result<()> {
        match len {
            Some(l) if l != g.co => Err(shape_err(
                OP,
                format!("bias has {l} entries for {} output channels", g.co),
            )),
            _ => Ok(()),
        }
    }

    /// `y = conv(x, w) + b`. Keeps nothing for backward: backward recomputes im2col columns from
    /// `x`, which is cheaper than holding `kh*kw` times the activation for the whole batch.
    pub fn forward(
        &self,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        b: Option<ArrayView1<f32>>,
    ) -> Result<Array4<f32>> {
        let g = self.geom(x.shape(), w.shape())?;
        Self::check_bias(&g, b.map(|b| b.len()))?;
        Ok(Self::forward_geom(&g, x, w, b))
    }

    /// [`Self::forward`] on a validated geometry (tests force a path through it).
    fn forward_geom(
        g: &Geom,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        b: Option<ArrayView1<f32>>,
    ) -> Array4<f32> {
        let g = *g;
        init();
        if g.subsample && g.n > 0 {
            let inner = g.subsampled();
            let xs = g.subsample(&contiguous(&x));
            let xs = Array4::from_shape_vec((g.n, g.ci, g.oh, g.ow), xs)
                .expect("subsampled length follows from the geometry");
            return Self::forward_geom(&inner, xs.view(), w, b);
        }
        let (xs, ws) = (contiguous(&x), contiguous(&w));
        let bias = b.map(|b| b.to_vec());
        if g.pointwise_one_pixel() && g.n > 0 {
            // The Gemm's own output buffer.
            let y = g.one_pixel_forward(&xs, &ws, bias.as_deref());
            return Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
                .expect("output length follows from the geometry");
        }
        let (xlen, ylen) = (g.x_len(), g.y_len());
        let mut y = unzeroed(g.n * ylen);
        if g.pointwise_direct() && g.n > 0 {
            g.pointwise_forward(&xs, &ws, bias.as_deref(), &mut y);
            return Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
                .expect("output length follows from the geometry");
        }
        if g.wino_cl && g.n > 0 {
            g.wino_cl_forward(&xs, &ws, bias.as_deref(), &mut y);
            return Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
                .expect("output length follows from the geometry");
        }
        if g.cols_cl && g.n > 0 {
            g.cols_cl_forward(&xs, &ws, bias.as_deref(), &mut y);
            return Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
                .expect("output length follows from the geometry");
        }
        if g.small_plane && !g.winograd && g.n > 0 {
            g.small_plane_forward(&xs, &ws, bias.as_deref(), &mut y);
            return Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
                .expect("output length follows from the geometry");
        }
        let (part, blk) = (g.part_images(), g.block_images());
        // Transformed once per call, shared by every part of the batch.
        let wino = (g.winograd && g.n > 0)
            .then(|| winograd::transform_weights(&ws, g.co, g.ci, false, g.wino_tile));
        let fused =
            (g.wino_fused && g.n > 0).then(|| winograd_fused::fused_weights(g.co, g.ci, &ws));
        if g.n > 0 {
            y.par_chunks_mut(part * ylen)
                .zip(xs.par_chunks(part * xlen))
                .with_max_len(1)
                .for_each(|(yp, xp)| {
                    // `y` came unzeroed: every path writes each entry of its part but the
                    // depthwise kernels, which skip outputs whose window lies in the padding.
                    if g.path == Path::Depthwise {
                        yp.fill(0.0);
                    }
                    if let Some(u) = &wino {
                        let (p, wb) = (g.wino_forward_plane(), g.wino_block_images());
                        winograd::with_scratch(&p, wb, |s| {
                            for (yb, xb) in yp.chunks_mut(wb * ylen).zip(xp.chunks(wb * xlen)) {
                                p.run(xb, u, bias.as_deref(), yb, s);
                            }
                        });
                        return;
                    }
                    if g.path == Path::Depthwise && g.depthwise_channels_last() {
                        return g.depthwise_forward_cl(xp, &ws, bias.as_deref(), yp);
                    }
                    if let Some(u) = &fused {
                        let p = g.fused_plane();
                        let mut s = p.fused_scratch();
                        let b = s.images();
                        for (yb, xb) in yp.chunks_mut(b * ylen).zip(xp.chunks(b * xlen)) {
                            p.fused_run(xb, u, bias.as_deref(), yb, &mut s);
                        }
                        return;
                    }
                    if g.direct_fwd {
                        let (mut s, b) = (g.dw_scratch(), g.dw_images());
                        for (yb, xb) in yp.chunks_mut(b * ylen).zip(xp.chunks(b * xlen)) {
                            g.forward_direct(xb, &ws, bias.as_deref(), yb, &mut s);
                        }
                        return;
                    }
                    if blk > 1 {
                        let mut s = g.block_scratch(true);
                        for (yb, xb) in yp.chunks_mut(blk * ylen).zip(xp.chunks(blk * xlen)) {
                            g.forward_block(xb, &ws, bias.as_deref(), yb, &mut s);
                        }
                        return;
                    }
                    let mut col = vec![0.0f32; g.col_len()];
                    for (yb, xb) in yp.chunks_mut(ylen).zip(xp.chunks(xlen)) {
                        g.forward_image(xb, &ws, bias.as_deref(), yb, &mut col);
                    }
                });
        }
        Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
            .expect("output length follows from the geometry")
    }

    /// Gradients for `L` given `dy = dL/dy`. `x` and `w` are the forward inputs; `need_dx` is
    /// false for a layer whose input is data, which skips the col2im half of the work.
    pub fn backward(
        &self,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        need_dx: bool,
    ) -> Result<Conv2dGrads> {
        self.backward_with(x, w, dy, need_dx, true)
    }

    /// [`Self::backward`], skipping the bias gradient (`db` all zeros) unless `need_db`: a pass
    /// over `dy` that a conv without a bias (every one before a BatchNormalization) throws away.
    pub fn backward_with(
        &self,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        need_dx: bool,
        need_db: bool,
    ) -> Result<Conv2dGrads> {
        let g = self.backward_geom_of(x, w, dy)?;
        Ok(Self::backward_geom_db(&g, x, w, dy, need_dx, need_db))
    }

    /// The geometry of a backward call, `dy` checked against it.
    fn backward_geom_of(
        &self,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
    ) -> Result<Geom> {
        let g = self.geom(x.shape(), w.shape())?;
        let want = [g.n, g.co, g.oh, g.ow];
        if dy.shape() != want {
            return Err(shape_err(
                OP,
                format!(
                    "output gradient has shape {:?}, expected {want:?}",
                    dy.shape()
                ),
            ));
        }
        Ok(g)
    }

    /// [`Self::backward_with`] with the input gradient added to `acc`, the gradient the
    /// input's other readers already gave it (a residual block's input: its Add's gradient,
    /// then its first conv's): `dx = acc + this layer's input gradient`, each entry the one f32
    /// add a separate accumulation would do, so the same bits. The fused Winograd path adds
    /// as it copies its result out (`Plane::fused_run_adding`): the separate pass read both
    /// tensors and wrote one, and the layer's own input gradient was a fresh tensor besides.
    /// Other paths add after. `acc` has `x`'s shape.
    pub fn backward_adding(
        &self,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        acc: Array4<f32>,
        need_db: bool,
    ) -> Result<Conv2dGrads> {
        if acc.shape() != x.shape() {
            return Err(shape_err(
                OP,
                format!(
                    "the input gradient to add to has shape {:?}, the input {:?}",
                    acc.shape(),
                    x.shape()
                ),
            ));
        }
        let g = self.backward_geom_of(x, w, dy)?;
        let mut acc = Some(standard_vec(acc));
        let mut grads = Self::backward_geom_inner(&g, x, w, dy, true, need_db, &mut acc);
        if let Some(mut a) = acc {
            let dx = grads.dx.take().expect("the input gradient was asked for");
            super::par_add_assign(
                &mut a,
                dx.as_slice().expect("fresh gradients are contiguous"),
            );
            grads.dx = Some(
                Array4::from_shape_vec((g.n, g.ci, g.h, g.w), a)
                    .expect("acc has the input's shape"),
            );
        }
        Ok(grads)
    }

    /// [`Self::backward`] on a validated geometry (tests force a path through it).
    #[cfg(test)]
    fn backward_geom(
        g: &Geom,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        need_dx: bool,
    ) -> Conv2dGrads {
        Self::backward_geom_db(g, x, w, dy, need_dx, true)
    }

    /// [`Self::backward_geom`], with the bias gradient only if `need_db`.
    fn backward_geom_db(
        g: &Geom,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        need_dx: bool,
        need_db: bool,
    ) -> Conv2dGrads {
        Self::backward_geom_inner(g, x, w, dy, need_dx, need_db, &mut None)
    }

    /// [`Self::backward_geom_db`]; where the fused Winograd path makes the input gradient and
    /// `acc` holds a gradient to add it to, it takes `acc` and adds into it
    /// ([`Self::backward_adding`]), else leaves `acc` as it was.
    fn backward_geom_inner(
        g: &Geom,
        x: ArrayView4<f32>,
        w: ArrayView4<f32>,
        dy: ArrayView4<f32>,
        need_dx: bool,
        need_db: bool,
        acc: &mut Option<Vec<f32>>,
    ) -> Conv2dGrads {
        let g = *g;
        init();
        if g.subsample && g.n > 0 {
            let inner = g.subsampled();
            let xs = g.subsample(&contiguous(&x));
            let xs = Array4::from_shape_vec((g.n, g.ci, g.oh, g.ow), xs)
                .expect("subsampled length follows from the geometry");
            let mut grads = Self::backward_geom_db(&inner, xs.view(), w, dy, need_dx, need_db);
            grads.dx = grads.dx.map(|dxs| {
                let dx = g.unsample(dxs.as_slice().expect("fresh gradients are contiguous"));
                Array4::from_shape_vec((g.n, g.ci, g.h, g.w), dx)
                    .expect("dx length follows from the geometry")
            });
            return grads;
        }
        let (xs, ws, dys) = (contiguous(&x), contiguous(&w), contiguous(&dy));
        if (g.small_plane || g.wino_cl || g.cols_cl) && g.n > 0 {
            return Self::backward_whole_batch(
                &g,
                &dys,
                need_dx,
                need_db,
                w.raw_dim(),
                |dx, dw| {
                    if g.cols_cl {
                        g.cols_cl_backward(&xs, &ws, &dys, dx, dw)
                    } else if g.wino_cl {
                        g.wino_cl_backward(&xs, &ws, &dys, dx, dw)
                    } else {
                        g.small_plane_backward(&xs, &ws, &dys, dx, dw)
                    }
                },
            );
        }
        if (g.pointwise_one_pixel() || g.pointwise_direct()) && g.n > 0 {
            return Self::backward_whole_batch(
                &g,
                &dys,
                need_dx,
                need_db,
                w.raw_dim(),
                |dx, dw| {
                    if g.pointwise_one_pixel() {
                        g.one_pixel_backward(&xs, &ws, &dys, dx, dw)
                    } else {
                        g.pointwise_backward(&xs, &ws, &dys, dx, dw)
                    }
                },
            );
        }
        let (xlen, ylen) = (g.x_len(), g.y_len());
        let (part, blk) = (g.part_images(), g.block_images());
        // The direct, Winograd and fused weight gradients replace the blocked one too.
        let blk = if g.direct_dw || g.wino_dw || g.wino_fused_dw_pays() {
            1
        } else {
            blk
        };
        // Winograd geometries: dx through Winograd on dy with the flipped kernel, dw below.
        // Direct geometries with a direct input gradient: the transposed conv's geometry and
        // its flipped, transposed weights, once per call.
        let direct_dx = (need_dx && g.n > 0)
            .then(|| g.direct_dx_geom())
            .flatten()
            .map(|gt| {
                let wt = g.flipped_transposed(&ws);
                // The fused Winograd path takes its own transform of the flipped weights.
                let ut = gt
                    .wino_fused
                    .then(|| winograd_fused::fused_weights(gt.co, gt.ci, &wt));
                (gt, wt, ut)
            });
        // The fused Winograd weight gradient where its rule says and the input gradient (if
        // wanted) comes from the direct branch (a fused layer's, unless it has under 8 input
        // channels): the parts are its own (`Geom::fused_dw_part`), and each returns its
        // transformed sums (`[36][CI][CO]`) in place of a weight gradient, computed after the
        // part's input gradient in the same task (the part's `dy` still in cache, one
        // parallel loop instead of two; the same sums in the same order). Against a second
        // loop over the batch, the fused layers' backward per step at 2 threads (best /
        // median of 4 alternating runs): ResNet-20 56.1 / 59.3 -> 54.5 / 56.0 ms,
        // resnet18@64 (best of 3) 21.6 -> 20.4; at 1 thread a tie (ResNet-20 89.1 / 96.5
        // -> 89.6 / 92.4).
        let fused_dw = g.wino_fused_dw_pays() && (!need_dx || direct_dx.is_some());
        let part = if fused_dw { g.fused_dw_part() } else { part };
        // The fused input gradient adds into `acc` where given.
        let fused_dx = direct_dx.as_ref().is_some_and(|(_, _, ut)| ut.is_some());
        let adding = need_dx && fused_dx && acc.as_ref().is_some_and(|a| a.len() == g.n * xlen);
        let mut dx = if adding {
            acc.take().expect("checked above")
        } else if need_dx {
            unzeroed(g.n * xlen)
        } else {
            Vec::new()
        };
        let dx_parts: Vec<Option<&mut [f32]>> = if need_dx {
            dx.chunks_mut(part * xlen).map(Some).collect()
        } else {
            (0..g.n.div_ceil(part)).map(|_| None).collect()
        };
        let wino = (g.winograd && need_dx && g.n > 0)
            .then(|| winograd::transform_weights(&ws, g.co, g.ci, true, g.wino_tile));
        // Small planes: every part lays its columns and output gradients into its column range
        // of two batch-wide matrices, and the weight gradient is one GEMM over them afterwards
        // (`block.rs`).
        let ohw = g.oh * g.ow;
        // Every column of both is written by its part (`backward_part_blocked`).
        let batch_wide = |rows: usize| {
            Array2::from_shape_vec((rows, g.n * ohw), unzeroed(rows * g.n * ohw))
                .expect("length follows from the shape")
        };
        let (mut cols_all, mut dys_all) = if blk > 1 {
            (batch_wide(g.k_rows()), batch_wide(g.co))
        } else {
            (Array2::zeros((0, 0)), Array2::zeros((0, 0)))
        };
        let mut part_views = Vec::with_capacity(g.n.div_ceil(part));
        if blk > 1 {
            let (mut c, mut d) = (cols_all.view_mut(), dys_all.view_mut());
            for p0 in (0..g.n).step_by(part) {
                let width = part.min(g.n - p0) * ohw;
                let (ch, ct) = c.split_at(Axis(1), width);
                let (dh, dt) = d.split_at(Axis(1), width);
                part_views.push(Some((ch, dh)));
                (c, d) = (ct, dt);
            }
        } else {
            part_views.resize_with(g.n.div_ceil(part), || None);
        }
        // `dx` came unzeroed: the direct and Winograd input gradients, a blocked pointwise
        // conv's copies and the channels-last depthwise kernel write every entry of their part;
        // the other paths add into it (col2im), so each part is zeroed by the task that then
        // fills it.
        let dx_written_in_full = direct_dx.is_some()
            || wino.is_some()
            || (blk > 1 && g.path == Path::Pointwise)
            || (g.path == Path::Depthwise && g.depthwise_channels_last());
        let partials: Vec<(Vec<f32>, Vec<f64>)> = dx_parts
            .into_par_iter()
            .zip(part_views)
            .zip(xs.par_chunks(part * xlen))
            .zip(dys.par_chunks(part * ylen))
            .with_max_len(1)
            .map(|(((dxp, views), xp), dyp)| {
                let mut dxp = dxp;
                if !dx_written_in_full {
                    if let Some(d) = dxp.as_deref_mut() {
                        d.fill(0.0);
                    }
                }
                if let Some((gt, wt, ut)) = &direct_dx {
                    // Taken, as for Winograd below.
                    let dxw = dxp.take().expect("direct_dx is only set when dx is wanted");
                    if let Some(u) = ut {
                        let p = gt.fused_plane();
                        let mut s = p.fused_scratch();
                        let b = s.images();
                        for (dxb, dyb) in dxw.chunks_mut(b * xlen).zip(dyp.chunks(b * ylen)) {
                            if adding {
                                p.fused_run_adding(dyb, u, dxb, &mut s);
                            } else {
                                p.fused_run(dyb, u, None, dxb, &mut s);
                            }
                        }
                    } else {
                        let (mut s, b) = (gt.dw_scratch(), gt.dw_images());
                        for (dxb, dyb) in dxw.chunks_mut(b * xlen).zip(dyp.chunks(b * ylen)) {
                            gt.forward_direct(dyb, wt, None, dxb, &mut s);
                        }
                    }
                }
                if let Some(u) = &wino {
                    // Taken, so that the im2col code below computes the weight gradient only.
                    let dxw = dxp.take().expect("wino is only set when dx is wanted");
                    let (p, wb) = (g.wino_backward_plane(), g.wino_block_images());
                    winograd::with_scratch(&p, wb, |s| {
                        for (dxb, dyb) in dxw.chunks_mut(wb * xlen).zip(dyp.chunks(wb * ylen)) {
                            p.run(dyb, u, None, dxb, s);
                        }
                    });
                }
                let mut db = vec![0.0f64; g.co];
                if need_db {
                    g.add_bias_grad(dyp, &mut db);
                }
                if g.wino_dw {
                    // The weight gradient comes after the parts, over the whole batch; the input
                    // gradient was Winograd's or the direct kernel's, above.
                    debug_assert!(
                        dxp.is_none(),
                        "a wino_dw layer's dx is Winograd's or direct"
                    );
                    return (Vec::new(), db);
                }
                if let Some((cv, dv)) = views {
                    let mut s = g.block_scratch(false);
                    g.backward_part_blocked(xp, &ws, dyp, dxp, cv, dv, &mut s);
                    return (Vec::new(), db);
                }
                if fused_dw {
                    // The part's transformed sums; its input gradient came above.
                    return (g.fused_dw_part_sums(xp, dyp), db);
                }
                let mut dw = vec![0.0f32; ws.len()];
                if g.path == Path::Depthwise && g.depthwise_channels_last() {
                    g.depthwise_backward_cl(xp, &ws, dyp, dxp, &mut dw);
                    return (dw, db);
                }
                let mut dcol = vec![0.0f32; if dxp.is_some() { g.col_len() } else { 0 }];
                if g.direct_dw {
                    // The weight gradient from the padded input (`weight_grad.rs`), a few
                    // images per pass; the input gradient, if not Winograd's, per image.
                    let mut s = g.dw_scratch();
                    let b = g.dw_images();
                    for (xb, dyb) in xp.chunks(b * xlen).zip(dyp.chunks(b * ylen)) {
                        g.weight_grad_direct(xb, dyb, &mut dw, &mut s);
                    }
                    if let Some(dxp) = dxp {
                        for (dxb, dyb) in dxp.chunks_mut(xlen).zip(dyp.chunks(ylen)) {
                            g.input_grad_image(&ws, dyb, dxb, &mut dcol);
                        }
                    }
                    return (dw, db);
                }
                let mut col = vec![0.0f32; g.col_len()];
                for (i, (xb, dyb)) in xp.chunks(xlen).zip(dyp.chunks(ylen)).enumerate() {
                    let dxb = dxp.as_deref_mut().map(|d| &mut d[i * xlen..(i + 1) * xlen]);
                    g.backward_image(xb, &ws, dyb, dxb, &mut dw, &mut col, &mut dcol);
                }
                (dw, db)
            })
            .collect();
        let mut dw = vec![0.0f32; ws.len()];
        let mut db = vec![0.0f64; g.co];
        // The parts' weight gradients are summed in part order, element by element, with the
        // elements split across threads: the same sums as a serial loop, bit for bit, but not a
        // serial tail (up to 16 parts x the weight count; 9.4 M adds for one 512-channel 3x3
        // conv of ResNet-18, whose step at two threads would otherwise wait on one core).
        if g.wino_dw && g.n > 0 {
            g.weight_grad_winograd(&xs, &dys, &mut dw);
        } else if fused_dw && g.n > 0 {
            let parts: Vec<&[f32]> = partials.iter().map(|(du, _)| du.as_slice()).collect();
            g.fused_dw_from_parts(&parts, &mut dw);
        } else if blk > 1 {
            g.weight_grad_blocked(cols_all.view(), dys_all.view(), &mut dw);
        } else {
            let parts: Vec<&[f32]> = partials.iter().map(|(pdw, _)| pdw.as_slice()).collect();
            sum_parts_in_order(&parts, &mut dw);
        }
        for (_, pdb) in &partials {
            db.iter_mut().zip(pdb).for_each(|(a, b)| *a += b);
        }
        g.grads(need_dx.then_some(dx), dw, db, w.raw_dim())
    }

    /// [`Self::backward_geom`] for kernels that take the whole batch at once (`small_plane.rs`,
    /// `pointwise.rs`): `run` writes every entry of `dx` (when wanted) and of `dw`; the bias
    /// gradient is summed here.
    fn backward_whole_batch(
        g: &Geom,
        dys: &[f32],
        need_dx: bool,
        need_db: bool,
        wdim: Ix4,
        run: impl FnOnce(Option<&mut [f32]>, &mut [f32]),
    ) -> Conv2dGrads {
        let mut dx = unzeroed(if need_dx { g.n * g.x_len() } else { 0 });
        // Not zeroed: every `run` overwrites it (zeroed, a 512-channel 3x3 layer's 9.4 MB ran
        // serially with the other threads idle).
        let mut dw = unzeroed(ndarray::Dimension::size(&wdim));
        run(need_dx.then_some(&mut dx[..]), &mut dw);
        let mut db = vec![0.0f64; g.co];
        if need_db {
            g.add_bias_grad(dys, &mut db);
        }
        g.grads(need_dx.then_some(dx), dw, db, wdim)
    }

    /// Direct definition, seven nested loops. Test oracle only.
    pub fn reference<T: NdFloat>(
        &self,
        x: ArrayView4<T>,
        w: ArrayView4<T>,
        b: Option<ArrayView1<T>>,
    ) -> Result<Array4<T>> {
        let g = self.geom(x.shape(), w.shape())?;
        Self::check_bias(&g, b.map(|b| b.len()))?;
        let mut y = Array4::<T>::zeros((g.n, g.co, g.oh, g.ow));
        for n in 0..g.n {
            for oc in 0..g.co {
                let grp = oc / g.cog;
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut acc = b.map_or(T::zero(), |b| b[oc]);
                        for icg in 0..g.cig {
                            let ic = grp * g.cig + icg;
                            for ki in 0..g.kh {
                                let iy = (oy * g.sh + ki * g.dh) as isize - g.pt as isize;
                                if iy < 0 || iy >= g.h as isize {
                                    continue;
                                }
                                for kj in 0..g.kw {
                                    let ix = (ox * g.sw + kj * g.dw) as isize - g.pl as isize;
                                    if ix < 0 || ix >= g.w as isize {
                                        continue;
                                    }
                                    acc +=
                                        x[[n, ic, iy as usize, ix as usize]] * w[[oc, icg, ki, kj]];
                                }
                            }
                        }
                        y[[n, oc, oy, ox]] = acc;
                    }
                }
            }
        }
        Ok(y)
    }
}

/// `dst = src` for a short run (a small plane, an image row): `copy_from_slice` is a `memcpy`
/// call per run, whose fixed cost dominated short copies (blocked convs' 4- and 16-float runs
/// of 2x2 and 4x4 planes: `memmove` was 4% of mobilenet_v3_small's step; F(4x4) Winograd's
/// padded rows: 13% of a 16-channel 32x32 forward's samples). The sizes of small planes copy
/// as one fixed-size block, other runs as fixed 8-float blocks and an element-wise tail, all of
/// which the compiler turns into plain vector moves.
#[inline(always)]
pub(super) fn copy_run(dst: &mut [f32], src: &[f32]) {
    fn fixed<const N: usize>(dst: &mut [f32], src: &[f32]) {
        let s: [f32; N] = src.try_into().expect("run of N floats");
        let d: &mut [f32; N] = dst.try_into().expect("run of N floats");
        *d = s;
    }
    match src.len() {
        1 => dst[0] = src[0],
        4 => fixed::<4>(dst, src),
        9 => fixed::<9>(dst, src),
        16 => fixed::<16>(dst, src),
        n => {
            let dst = &mut dst[..n];
            let full = n / 8 * 8;
            for (d, s) in dst[..full]
                .chunks_exact_mut(8)
                .zip(src[..full].chunks_exact(8))
            {
                // Through a local array: a direct 8-float block copy in this loop became one
                // `memcpy` call again (perf: 8% `memmove` in a 16-channel F(4x4) forward).
                let v: [f32; 8] = s.try_into().expect("8 floats");
                d.copy_from_slice(&v);
            }
            for (d, s) in dst[full..].iter_mut().zip(&src[full..]) {
                *d = *s;
            }
        }
    }
}

fn mat(s: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), &s[..rows * cols]).expect("matrix fits its slice")
}

/// Adds `bias[c]` to every entry of channel `c`'s planes (`plane` entries each) in `y`, whole
/// images `[.., co, plane]`: the bias pass of kernels that write their sums without it.
fn add_bias(y: &mut [f32], plane: usize, bias: &[f32]) {
    if plane == 0 {
        return;
    }
    for (p, &bv) in y.chunks_exact_mut(plane).zip(bias.iter().cycle()) {
        p.iter_mut().for_each(|v| *v += bv);
    }
}

/// A benchmark override of a kernel choice: `None` leaves it to the speed rule, `Some(false)`
/// never takes the kernel, `Some(true)` always does (where its shapes allow).
struct Override(std::sync::atomic::AtomicU8);

impl Override {
    const fn new() -> Self {
        Override(std::sync::atomic::AtomicU8::new(0))
    }

    fn set(&self, mode: Option<bool>) {
        let v = match mode {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        };
        self.0.store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// The override if one is set, else `rule()`.
    fn decide(&self, rule: impl FnOnce() -> bool) -> bool {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => rule(),
        }
    }
}

fn mat_mut(s: &mut [f32], rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, cols), &mut s[..rows * cols]).expect("matrix fits its slice")
}

impl Geom {
    /// Adds each output channel's gradient sum over the images in `dy` to `db`, image by image.
    fn add_bias_grad(&self, dy: &[f32], db: &mut [f64]) {
        if self.oh * self.ow == 1 {
            // One value per plane (squeeze-excitation's convs): a row of `dy` per image added
            // as it lies, the same sums as one-value planes' `sum`, which per value was a
            // serial 64 x 1152-call loop after EfficientNet-B0's largest such backward.
            for dyb in dy.chunks(self.co) {
                db.iter_mut()
                    .zip(dyb)
                    .for_each(|(acc, &v)| *acc += f64::from(v));
            }
            return;
        }
        for dyb in dy.chunks(self.y_len()) {
            for (acc, row) in db.iter_mut().zip(dyb.chunks(self.oh * self.ow)) {
                *acc += f64::from(sum(row));
            }
        }
    }

    /// The gradients as arrays (`dx` when it was wanted).
    fn grads(&self, dx: Option<Vec<f32>>, dw: Vec<f32>, db: Vec<f64>, wdim: Ix4) -> Conv2dGrads {
        Conv2dGrads {
            dx: dx.map(|dx| {
                Array4::from_shape_vec((self.n, self.ci, self.h, self.w), dx)
                    .expect("dx length follows from the geometry")
            }),
            dw: Array4::from_shape_vec(wdim, dw).expect("dw has the weight's length"),
            db: db.into_iter().map(|v| v as f32).collect(),
        }
    }

    fn x_len(&self) -> usize {
        self.ci * self.h * self.w
    }

    fn y_len(&self) -> usize {
        self.co * self.oh * self.ow
    }

    /// Rows of one group's column matrix.
    fn k_rows(&self) -> usize {
        self.cig * self.kh * self.kw
    }

    fn col_len(&self) -> usize {
        match self.path {
            Path::Im2col => self.ci * self.kh * self.kw * self.oh * self.ow,
            _ => 0,
        }
    }

    /// One image: `x` is `[ci, h, w]`, `y` is `[co, oh, ow]` (zeroed), `col` is scratch.
    fn forward_image(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        col: &mut [f32],
    ) {
        let ohw = self.oh * self.ow;
        if let Some(b) = bias {
            for (row, &bv) in y.chunks_mut(ohw).zip(b) {
                row.fill(bv);
            }
        }
        let beta = if bias.is_some() { 1.0 } else { 0.0 };
        let cols: &[f32] = match self.path {
            Path::Depthwise => return self.depthwise_forward(x, w, y),
            Path::Pointwise => x,
            Path::Im2col => {
                self.im2col(x, col);
                col
            }
        };
        let k = self.k_rows();
        for grp in 0..self.group {
            let wg = mat(&w[grp * self.cog * k..], self.cog, k);
            let cg = mat(&cols[grp * k * ohw..], k, ohw);
            let mut yg = mat_mut(&mut y[grp * self.cog * ohw..], self.cog, ohw);
            general_mat_mul(1.0, &wg, &cg, beta, &mut yg);
        }
    }

    /// One image's contribution: adds to `dw`, writes `dx` (zeroed) when given.
    #[allow(clippy::too_many_arguments)]
    fn backward_image(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        col: &mut [f32],
        dcol: &mut [f32],
    ) {
        let (ohw, k) = (self.oh * self.ow, self.k_rows());
        let cols: &[f32] = match self.path {
            Path::Depthwise => return self.depthwise_backward(x, w, dy, dx, dw),
            Path::Pointwise => x,
            Path::Im2col => {
                self.im2col(x, col);
                col
            }
        };
        for grp in 0..self.group {
            let dyg = mat(&dy[grp * self.cog * ohw..], self.cog, ohw);
            let cg = mat(&cols[grp * k * ohw..], k, ohw);
            let mut dwg = mat_mut(&mut dw[grp * self.cog * k..], self.cog, k);
            general_mat_mul(1.0, &dyg, &cg.t(), 1.0, &mut dwg);
        }
        let Some(dx) = dx else { return };
        self.input_grad_image(w, dy, dx, dcol);
    }

    /// One image's input gradient `dx` (overwritten) on the GEMM paths: `W^T · dy`, then col2im
    /// unless the layer is pointwise.
    fn input_grad_image(&self, w: &[f32], dy: &[f32], dx: &mut [f32], dcol: &mut [f32]) {
        match self.path {
            Path::Pointwise => self.weight_t_dy(w, dy, dx),
            _ => {
                self.weight_t_dy(w, dy, dcol);
                self.col2im(dcol, dx);
            }
        }
    }

    /// `out[g] = W[g]^T · dy[g]` per group: the column gradient (or, for a pointwise conv, `dx`).
    fn weight_t_dy(&self, w: &[f32], dy: &[f32], out: &mut [f32]) {
        let (ohw, k) = (self.oh * self.ow, self.k_rows());
        for grp in 0..self.group {
            let wg = mat(&w[grp * self.cog * k..], self.cog, k);
            let dyg = mat(&dy[grp * self.cog * ohw..], self.cog, ohw);
            let mut og = mat_mut(&mut out[grp * k * ohw..], k, ohw);
            general_mat_mul(1.0, &wg.t(), &dyg, 0.0, &mut og);
        }
    }
}
