//! Depthwise convolution channels-last: each image is transposed to `[pixel][channel]`, and
//! every (output pixel, tap) pair is then one multiply-add over all the channels at once, a
//! vector loop as long as the channel count (96 to 1152 in the MobileNets and EfficientNets),
//! compiled for AVX-512 / AVX2 where the CPU has them.
//!
//! Why: the tiled path (`depthwise.rs`) interleaves 8 channels per tile, so on the 2x2 and 4x4
//! planes where most of these networks' depthwise channels live its loops run 2 to 4
//! iterations of 8 lanes, it multiplies every tap that falls on padding (a 5x5 kernel on a 2x2
//! plane reads 25 taps per output, of which at most 9 touch the plane), and it gathers and
//! scatters each tile lane by lane. Here padding is skipped by range (`valid_range`), the
//! transposes are one pass per image, and the weights are transposed once per part of the
//! batch. Measured in `benches/conv_kernels.rs` (`depthwise`, `auto` against
//! `no_channels_last`; batch 32, forward + backward, AVX-512 build, 2026-12-03), tiled ->
//! channels-last: 96 channels 3x3 stride 2 on 32x32 9.5 -> 7.5 ms, 144 5x5 s2 on 16x16 6.2 ->
//! 4.4, 240 5x5 on 8x8 7.8 -> 4.1, 480 3x3 on 4x4 2.4 -> 1.2, 672 5x5 on 4x4 5.5 -> 2.3, 672
//! 5x5 s2 on 4x4 2.7 -> 1.3, 1152 5x5 on 2x2 3.7 -> 1.5. Stride-1 planes wider than 8 outputs
//! keep the flat taps (`depthwise.rs`): 144 3x3 on 16x16 ran 5.3 ms flat, 5.9 here (8 wide came
//! here in session 16, see [`Geom::depthwise_channels_last`]).
//! Training step, 1 thread, batch 64 at 64x64: depthwise fwd + bwd 125 -> 85 ms on
//! EfficientNet-B0, 32 -> 19 on MobileNet-V3-Small, 91 -> 70 on MobileNet-V2.
//!
//! The transposes and multiply-adds are compiled for AVX-512 / AVX2 at run time; the scratch
//! is borrowed before the dispatch, because a closure does not inherit its caller's target
//! features (inside `with_scratch`'s closure the loops ran as SSE and gained nothing).
//!
//! Numerics: every output sums its taps in the tiled path's order (ascending tap, from 0) and
//! the input gradient its contributions in the same (row, tap, column) order; skipping a padded
//! tap skips adding an exact zero product, so forward and input gradient are bitwise the tiled
//! path's for finite weights. The weight gradient sums over a part's images before adding to
//! `dw` (the tiled path adds per image): the same terms, grouped differently, within f32
//! rounding of it (`channels_last_depthwise_matches_the_tiled_path`).

use super::layout::planes_to_pixels;
use super::{add_bias, Geom};
use crate::engine::ops::simd::simd_dispatch;
use crate::engine::ops::valid_range;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the channels-last depthwise path off (`false`: its layers go back to the tiled
/// kernels) or on; for benchmarks that compare the two.
pub fn set_depthwise_channels_last(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// One thread's buffers, kept across calls (the largest is one image's `[pixel][channel]`
/// activations, 384 KiB for 96 channels on 32x32). Every entry a call reads it writes first.
#[derive(Default)]
struct Scratch {
    /// The image's input, `[h*w][co]` (input channel `oc / cog` in column `oc`).
    xt: Vec<f32>,
    /// Forward: the outputs `[oh*ow][co]`; backward: the output gradient, same layout.
    yt: Vec<f32>,
    /// The input gradient `[h*w][co]`.
    dxt: Vec<f32>,
    /// Weights `[tap][co]`.
    wt: Vec<f32>,
    /// Weight gradient of the part `[tap][co]`.
    dwt: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (a fresh one if re-entered).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Grows `v` to at least `n` entries.
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// `o[i] += a[i] * b[i]`: a multiply and an add (no FMA, so results do not depend on the CPU).
#[inline(always)]
fn mul_add(o: &mut [f32], a: &[f32], b: &[f32]) {
    let n = o.len().min(a.len()).min(b.len());
    let (o, a, b) = (&mut o[..n], &a[..n], &b[..n]);
    for i in 0..n {
        o[i] += a[i] * b[i];
    }
}

/// `[p][c] -> [c][p]`, the way back: pixel rows of `co` values in `src` to `dst[plane_of(c)]`
/// (planes of `n` pixels), each entry set to `f(its old value, c, value)`. Plane by plane over
/// blocks of [`PIXEL_BLOCK`] pixels: the writes run contiguously along each plane and the
/// strided reads stay within the block's rows, in cache (eight channels at a time, as
/// [`planes_to_pixels`] writes, scattered the stores and was 1.7x slower on 32x32 planes).
#[inline(always)]
fn pixels_to_planes(
    n: usize,
    co: usize,
    src: &[f32],
    dst: &mut [f32],
    plane_of: impl Fn(usize) -> usize,
    f: impl Fn(f32, usize, f32) -> f32,
) {
    for p0 in (0..n).step_by(PIXEL_BLOCK) {
        let np = PIXEL_BLOCK.min(n - p0);
        let rows = &src[p0 * co..][..np * co];
        for c in 0..co {
            let d = &mut dst[plane_of(c) * n + p0..][..np];
            for (d, row) in d.iter_mut().zip(rows.chunks_exact(co)) {
                *d = f(*d, c, row[c]);
            }
        }
    }
}

/// `[p][c] -> [c][p]` as a plain copy (`dst` the `co` planes of `n` pixels, in order): the
/// transpose [`planes_to_pixels`] does the other way, with pixels and channels swapped, so
/// its 8x8 AVX blocks. [`pixels_to_planes`]' strided gather, one float at a time, was a third
/// of the channels-last backward's time (perf, MobileNetV2 at 64x64: the input gradient of
/// its 96-channel stride-2 layer on 32x32 planes).
#[inline(always)]
fn pixels_to_planes_copy(n: usize, co: usize, src: &[f32], dst: &mut [f32]) {
    planes_to_pixels(co, n, |p| &src[p * co..][..co], &mut dst[..co * n]);
}

/// Pixels per block of [`pixels_to_planes`]: 64 rows of up to 1152 channels (288 KiB, in L2;
/// 24 KiB at 96 channels).
const PIXEL_BLOCK: usize = 64;

simd_dispatch! {
    /// [`Geom::depthwise_forward_cl`] with this thread's scratch, in a vector build.
    fn forward_cl(
        g: &Geom,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut Scratch,
    ) => Geom::forward_cl_body, (g, x, w, bias, y, s); ["avx512f", "avx2"]
}

simd_dispatch! {
    /// [`Geom::depthwise_backward_cl`] with this thread's scratch, in a vector build.
    fn backward_cl(
        g: &Geom,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        s: &mut Scratch,
    ) => Geom::backward_cl_body, (g, x, w, dy, dx, dw, s); ["avx512f", "avx2"]
}

impl Geom {
    /// Whether a depthwise layer runs channels-last: where the tiled path would (strided convs,
    /// planes narrower than 8 outputs, see [`Self::depthwise_tiles`]), and on stride-1 planes
    /// 8 outputs wide whatever the kernel, which the flat taps took before the transposes back
    /// were vectorised. Per node, AVX-512 Zen 4, batch 64, 1 thread, flat -> channels-last:
    /// MobileNetV2's 192-channel 3x3 layers on 8x8 forward 2.96 -> 1.29 and 2.67 -> 1.25 ms,
    /// backward 2.59 -> 2.18 and 2.77 -> 2.16; on wider planes the flat taps stay (its 32
    /// channels on 32x32: forward 2.61 -> 4.35, backward 5.13 -> 7.05).
    pub(super) fn depthwise_channels_last(&self) -> bool {
        (self.depthwise_tiles() || self.ow <= 8) && !DISABLED.load(Ordering::Relaxed)
    }

    /// Input row of output row `oy` and kernel row `ki`, if it is inside the plane.
    #[inline(always)]
    fn dw_row(&self, oy: usize, ki: usize) -> Option<usize> {
        let iy = (oy * self.sh + ki * self.dh) as isize - self.pt as isize;
        (0..self.h as isize).contains(&iy).then_some(iy as usize)
    }

    /// `[c][p] -> [p][c]` for the image's `co` output channels (input plane `oc / cog`).
    #[inline(always)]
    fn image_to_pixels(&self, x: &[f32], xt: &mut [f32]) {
        let hw = self.h * self.w;
        planes_to_pixels(hw, self.co, |oc| &x[(oc / self.cog) * hw..][..hw], xt);
    }

    /// The weights `[co][tap]` as `[tap][co]`.
    fn taps_by_channel(&self, w: &[f32], wt: &mut [f32]) {
        let (taps, co) = (self.kh * self.kw, self.co);
        for (oc, wk) in w.chunks_exact(taps).take(co).enumerate() {
            for (t, &v) in wk.iter().enumerate() {
                wt[t * co + oc] = v;
            }
        }
    }

    /// Forward for a run of whole images (`x` `[n][ci][h][w]`, `y` `[n][co][oh][ow]`): `y` is
    /// written (bias plus the taps' sum), whatever it held.
    pub(super) fn depthwise_forward_cl(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        // The scratch is borrowed outside the vector builds (see the module notes).
        with_scratch(|s| forward_cl(self, x, w, bias, y, s))
    }

    #[inline(always)]
    fn forward_cl_body(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut Scratch,
    ) {
        let (hw, ohw, co) = (self.h * self.w, self.oh * self.ow, self.co);
        let (xlen, ylen) = (self.ci * hw, co * ohw);
        grow(&mut s.xt, hw * co);
        grow(&mut s.yt, ohw * co);
        grow(&mut s.wt, self.kh * self.kw * co);
        self.taps_by_channel(w, &mut s.wt);
        for (xi, yi) in x.chunks_exact(xlen).zip(y.chunks_exact_mut(ylen)) {
            self.image_to_pixels(xi, &mut s.xt);
            let yt = &mut s.yt[..ohw * co];
            yt.fill(0.0);
            for oy in 0..self.oh {
                for ki in 0..self.kh {
                    let Some(iy) = self.dw_row(oy, ki) else {
                        continue;
                    };
                    for kj in 0..self.kw {
                        let xoff = (kj * self.dw) as isize - self.pl as isize;
                        let (lo, hi) = valid_range(self.ow, self.w, self.sw, xoff);
                        let wv = &s.wt[(ki * self.kw + kj) * co..][..co];
                        for ox in lo..hi {
                            let ix = ((ox * self.sw) as isize + xoff) as usize;
                            mul_add(
                                &mut yt[(oy * self.ow + ox) * co..][..co],
                                wv,
                                &s.xt[(iy * self.w + ix) * co..][..co],
                            );
                        }
                    }
                }
            }
            pixels_to_planes_copy(ohw, co, yt, yi);
            if let Some(b) = bias {
                add_bias(yi, ohw, b);
            }
        }
    }

    /// Backward for a run of whole images: adds the weight gradient to `dw` (`[co][tap]`) and
    /// writes `dx` when given.
    pub(super) fn depthwise_backward_cl(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        // As in the forward: scratch first, then the vector builds.
        with_scratch(|s| backward_cl(self, x, w, dy, dx, dw, s))
    }

    #[inline(always)]
    fn backward_cl_body(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
        s: &mut Scratch,
    ) {
        let (hw, ohw, co, taps) = (
            self.h * self.w,
            self.oh * self.ow,
            self.co,
            self.kh * self.kw,
        );
        let (xlen, ylen) = (self.ci * hw, co * ohw);
        grow(&mut s.xt, hw * co);
        grow(&mut s.yt, ohw * co);
        grow(&mut s.wt, taps * co);
        grow(&mut s.dwt, taps * co);
        if dx.is_some() {
            grow(&mut s.dxt, hw * co);
        }
        self.taps_by_channel(w, &mut s.wt);
        let dwt = &mut s.dwt[..taps * co];
        dwt.fill(0.0);
        for (i, (xi, dyi)) in x.chunks_exact(xlen).zip(dy.chunks_exact(ylen)).enumerate() {
            self.image_to_pixels(xi, &mut s.xt);
            let gt = &mut s.yt[..ohw * co];
            planes_to_pixels(ohw, co, |oc| &dyi[oc * ohw..][..ohw], gt);
            let mut dxt = dx.is_some().then(|| {
                let d = &mut s.dxt[..hw * co];
                d.fill(0.0);
                d
            });
            for oy in 0..self.oh {
                for ki in 0..self.kh {
                    let Some(iy) = self.dw_row(oy, ki) else {
                        continue;
                    };
                    for kj in 0..self.kw {
                        let t = ki * self.kw + kj;
                        let xoff = (kj * self.dw) as isize - self.pl as isize;
                        let (lo, hi) = valid_range(self.ow, self.w, self.sw, xoff);
                        let dwv = &mut dwt[t * co..][..co];
                        for ox in lo..hi {
                            let ix = ((ox * self.sw) as isize + xoff) as usize;
                            let (g, at) = (
                                &gt[(oy * self.ow + ox) * co..][..co],
                                (iy * self.w + ix) * co,
                            );
                            mul_add(dwv, g, &s.xt[at..][..co]);
                        }
                        if let Some(dxt) = dxt.as_deref_mut() {
                            let wv = &s.wt[t * co..][..co];
                            for ox in lo..hi {
                                let ix = ((ox * self.sw) as isize + xoff) as usize;
                                let g = &gt[(oy * self.ow + ox) * co..][..co];
                                mul_add(&mut dxt[(iy * self.w + ix) * co..][..co], wv, g);
                            }
                        }
                    }
                }
            }
            if let (Some(dx), Some(dxt)) = (dx.as_deref_mut(), dxt) {
                // A channel multiplier above 1 sends several channels to one input plane:
                // the first writes it, the others add, in channel order.
                let dxi = &mut dx[i * xlen..][..xlen];
                let cog = self.cog;
                if cog == 1 {
                    pixels_to_planes_copy(hw, co, dxt, dxi);
                } else {
                    let add =
                        |d: f32, oc: usize, v: f32| if oc.is_multiple_of(cog) { v } else { d + v };
                    pixels_to_planes(hw, co, dxt, dxi, |oc| oc / cog, add);
                }
            }
        }
        for (oc, dwk) in dw.chunks_exact_mut(taps).take(co).enumerate() {
            for (t, d) in dwk.iter_mut().enumerate() {
                *d += dwt[t * co + oc];
            }
        }
    }
}
