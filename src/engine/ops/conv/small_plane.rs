//! Convolutions with small output planes as GEMMs over the whole batch, one per output pixel
//! and kernel row, in channels-last layout: no im2col and no multiply-adds on padding.
//!
//! In ResNet-18's last stages at 64x64 input (4x4 and 2x2 planes, 256 and 512 channels) the
//! im2col path spends `kh * kw` multiply-adds per output and channel pair whether the tap lands
//! in the padding or not: 1.44x the useful work on a 4x4 plane under a 3x3 kernel, 2.25x on a
//! 2x2 plane, 9x on a 1x1 plane (32x32 input). And its blocked GEMMs (`block.rs`) packed the
//! whole weight matrix (9.4 MB at 512 channels) again for every block of 64 columns.
//!
//! Here, with the batch's images channels-last (`X[n][q][c]`, `Y[n][p][o]`) and the taps of
//! each weight row outside its channels (`W2[o][t][c]`), the output pixel `p` of every image is
//! `Y[:, p, :]^T = sum over kernel rows a of W2[:, t(a, b0) .. t(a, b1), :] ·
//! X[:, q(p, a, b0) .. q(p, a, b1), :]^T`, where `b0 .. b1` are the taps of row `a` that land
//! inside the input: consecutive taps read consecutive input pixels (undilated), so each term
//! is one GEMM over plain strided views, with the batch as one dimension and `(b1 - b0) * ci`
//! as the inner one. The backward pass uses the same terms: `dX[:, q, :] += dY[:, p, :] ·
//! W2[:, t, :]` per tap, `dW2[:, run, :] += dY[:, p, :]^T · X[:, run, :]`. The layout changes
//! (NCHW to channels-last and back, the weights' taps outward and back) copy each tensor once.
//! Pointwise layers stay on their blocked GEMMs, which measured 1.3-2x faster than this.
//! Stride-1 3x3 layers of 64+ channels on 4x4 to 7x7 planes (72+ on 8x8 and up) run channels-
//! last Winograd over the batch instead (`winograd_cl.rs`, which borrows this file's layout
//! helpers and, under its benchmark override, this path's weight gradient).
//!
//! Threads: each product is split into fixed tasks by output channel range (input channels for
//! `dX`) and by group of output pixels (input pixels for `dX`, kernel rows for `dW`), each task
//! looping over its share of the terms in the one global order, so every output is the same sum
//! whatever the thread count.

use super::layout::transpose_block;
use super::{add_bias, Geom, Path};
use crate::engine::ops::{unzeroed, zeros};
use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Most channels per task (a fixed split, independent of the thread count).
const CHANNEL_CHUNK: usize = 128;

/// Channels per task for `channels`: the fewest tasks of at most [`CHANNEL_CHUNK`], of even
/// size (rounded up to 16 rows, the GEMM kernels' block). Plain chunks of 128 split ResNet-18
/// Tucker-2's 152 channels 128 : 24 and its 304 channels 128 : 128 : 48, and with four pixel
/// groups per chunk two threads got unequal halves (those layers' forward at 1.5-1.6x the
/// one-thread speed on two).
fn channel_chunk(channels: usize) -> usize {
    let tasks = channels.div_ceil(CHANNEL_CHUNK).max(1);
    channels
        .div_ceil(tasks)
        .next_multiple_of(16)
        .min(CHANNEL_CHUNK)
}

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the small-plane path off (`false`: such layers go back to blocked im2col) or on; for
/// benchmarks and tests that compare the two.
pub fn set_small_plane(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// Whether the choice is the speed rule's (no override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    !DISABLED.load(Ordering::Relaxed)
}

/// One GEMM term of an output pixel: input pixels `q0 .. q0 + len` (in one input row) meet
/// kernel taps `t0 .. t0 + len`.
#[derive(Clone, Copy, Debug)]
struct Run {
    p: usize,
    q0: usize,
    t0: usize,
    len: usize,
}

/// Fixed ranges of `0..total` of at most `chunk`.
fn chunks(total: usize, chunk: usize) -> Vec<(usize, usize)> {
    (0..total)
        .step_by(chunk)
        .map(|c0| (c0, chunk.min(total - c0)))
        .collect()
}

/// Output channels per weight-gradient task: [`CHANNEL_CHUNK`], or half the channels below
/// twice that. Its tasks are (channel range, kernel row): with one range, a 3x3 layer of up to
/// 128 channels made 3 tasks, and two threads split them 2 : 1 (ResNet-20's 64-channel 8x8
/// stage: its backward at 1.65x the one-thread speed on two, the step's worst op).
fn dw_chunk(co: usize) -> usize {
    channel_chunk(co).min(co.div_ceil(2)).max(1)
}

/// Pixel groups per product: tasks are (channel range, group of output pixels, input pixels or
/// kernel rows), so that a 128-channel layer still splits into several tasks without shrinking
/// its GEMMs (one 128-channel task per product left a second thread idle on ResNet-18's 8x8
/// stage: its backward ran at 1.08x the one-thread speed on two).
const PIXEL_GROUPS: usize = 4;

/// The tasks: every channel range with every group index below `groups`.
fn tasks(channels: usize, chunk: usize, groups: usize) -> Vec<((usize, usize), usize)> {
    chunks(channels, chunk)
        .into_iter()
        .flat_map(|c| (0..groups).map(move |g| (c, g)))
        .collect()
}

/// Group of pixel `p` of `pixels`: contiguous ranges.
fn group_of(p: usize, pixels: usize, groups: usize) -> usize {
    p * groups / pixels
}

/// A `rows x cols` view at `off` with row stride `ld` (unit column stride).
pub(super) fn view(
    a: &[f32],
    off: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ArrayView2<'_, f32> {
    let len = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    ArrayView2::from_shape((rows, cols).strides((ld, 1)), &a[off..off + len])
        .expect("view fits its slice")
}

/// Mutable [`view`], from a raw pointer: tasks write disjoint column ranges of the same rows.
///
/// # Safety
/// The caller's tasks write disjoint elements, and `a` outlives the view.
pub(super) unsafe fn view_mut<'a>(
    a: *mut f32,
    off: usize,
    rows: usize,
    cols: usize,
    ld: usize,
) -> ArrayViewMut2<'a, f32> {
    ArrayViewMut2::from_shape_ptr((rows, cols).strides((ld, 1)), a.add(off))
}

/// A raw pointer that tasks may share (they write disjoint elements).
#[derive(Clone, Copy)]
pub(super) struct Shared(pub(super) *mut f32);
// SAFETY: only used for disjoint writes, see `view_mut`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the `Send` wrapper, not its field).
    pub(super) fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl Geom {
    /// Whether the layer can run here: ungrouped, on the im2col path (any stride, dilation and
    /// padding), with an output plane small enough that im2col would block images (`block.rs`).
    pub(super) fn small_plane_eligible(&self) -> bool {
        self.group == 1 && self.path == Path::Im2col && self.block_images() > 1
    }

    /// Whether it pays over blocked im2col (or, for the backward of an 8x8 Winograd layer, over
    /// Winograd's input gradient plus the direct weight gradient): from 32 channels in and out.
    /// Measured per layer (1 thread, batch 64 unless said, AVX-512 kernels; blocked or Winograd
    /// -> small-plane, forward / backward in ms): 512 ch on 2x2 11.8 / 19.8 -> 5.0 / 11.9; 256 ch on
    /// 4x4 7.2 / 18.2 -> 5.9 / 11.0; 256 -> 512 ch stride 2 from 4x4 5.7 / 11.4 -> 3.6 / 8.1;
    /// 512 ch on 1x1 4.2 / 8.8 -> 2.0 / 6.8; 32 ch on 4x4 0.47 / 1.07 -> 0.18 / 0.29; backward
    /// of Winograd layers at batch 128: 64 ch on 8x8 9.4 -> 7.3, 128 ch 29.0 -> 26.1, 32 ch 2.6
    /// -> 1.9; but 16 ch on 8x8 forward 0.43 -> 0.72 (GEMMs of 16 x 16 blocks).
    pub(super) fn small_plane_pays(&self) -> bool {
        self.ci >= 32 && self.co >= 32 && !DISABLED.load(Ordering::Relaxed)
    }

    /// Every output pixel's GEMM terms, in pixel then kernel-row order.
    fn small_plane_runs(&self) -> Vec<Run> {
        let mut runs = Vec::new();
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                let p = oy * self.ow + ox;
                for a in 0..self.kh {
                    let iy = (oy * self.sh + a * self.dh) as isize - self.pt as isize;
                    if iy < 0 || iy >= self.h as isize {
                        continue;
                    }
                    let ix = |b: usize| (ox * self.sw + b * self.dw) as isize - self.pl as isize;
                    let valid: Vec<usize> = (0..self.kw)
                        .filter(|&b| (0..self.w as isize).contains(&ix(b)))
                        .collect();
                    let row = iy as usize * self.w;
                    let mut i = 0;
                    while i < valid.len() {
                        // Consecutive taps read consecutive pixels only without dilation.
                        let mut len = 1;
                        while self.dw == 1
                            && i + len < valid.len()
                            && valid[i + len] == valid[i] + len
                        {
                            len += 1;
                        }
                        let b = valid[i];
                        runs.push(Run {
                            p,
                            q0: row + ix(b) as usize,
                            t0: a * self.kw + b,
                            len,
                        });
                        i += len;
                    }
                }
            }
        }
        runs
    }

    /// The weights with the taps outside the channels: `W2[o][t][c] = W[o][c][t]`, so that a
    /// run of taps `t0 .. t0 + len` is the strided matrix `W2[:, t0 .. t0 + len, :]`. A
    /// transpose within each output channel's row (a full tap-major transpose, `Wt[t][c][o]`,
    /// took 2-4 ms at 512 channels: its reads or writes stride across the whole tensor).
    pub(super) fn taps_outside(&self, w: &[f32]) -> Vec<f32> {
        to_channels_last(w, self.co, self.ci, self.kh * self.kw)
    }

    /// Forward: `y` (`[n, co, oh, ow]`, every entry written) `= conv(x, w) + bias`.
    pub(super) fn small_plane_forward(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let (n, hw, ohw, kk) = (
            self.n,
            self.h * self.w,
            self.oh * self.ow,
            self.kh * self.kw,
        );
        let (ci, co) = (self.ci, self.co);
        let xn = to_channels_last(x, n, ci, hw);
        let w2 = self.taps_outside(w);
        let runs = self.small_plane_runs();
        let mut yn = zeros(n * ohw * co);
        let yp = Shared(yn.as_mut_ptr());
        let groups = PIXEL_GROUPS.min(ohw);
        tasks(co, channel_chunk(co), groups)
            .into_par_iter()
            .with_max_len(1)
            .for_each(|((o0, no), grp)| {
                for r in runs.iter().filter(|r| group_of(r.p, ohw, groups) == grp) {
                    // Y[:, p, o0..]^T += W2[o0.., t0..t0+len, :] . X[:, q0..q0+len, :]^T
                    let a = view(&w2, o0 * kk * ci + r.t0 * ci, no, r.len * ci, kk * ci);
                    let b = view(&xn, r.q0 * ci, n, r.len * ci, hw * ci);
                    // SAFETY: this task alone writes output channels o0..o0+no.
                    let mut c = unsafe { view_mut(yp.ptr(), r.p * co + o0, n, no, ohw * co) };
                    general_mat_mul(1.0, &a, &b.t(), 1.0, &mut c.view_mut().reversed_axes());
                }
            });
        // [n][p][o] -> [n][o][p] through the 8x8 transposes (a strided gather per entry before),
        // then the bias, which leaves every sum as it was (0.0 + v is v: no sum here is -0.0).
        swap_inner(&yn, y, n, ohw, co);
        if let Some(b) = bias {
            y.par_chunks_mut(co * ohw)
                .for_each(|yi| add_bias(yi, ohw, b));
        }
    }

    /// Backward: `dx` (`[n, ci, h, w]`, overwritten) when given, and `dw` (`[co, ci, kh, kw]`,
    /// overwritten).
    pub(super) fn small_plane_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (n, hw, ohw, kk) = (
            self.n,
            self.h * self.w,
            self.oh * self.ow,
            self.kh * self.kw,
        );
        let (ci, co) = (self.ci, self.co);
        let runs = self.small_plane_runs();
        let xn = to_channels_last(x, n, ci, hw);
        let dyn_ = to_channels_last(dy, n, co, ohw);
        if let Some(dx) = dx {
            let w2 = self.taps_outside(w);
            let mut dxn = zeros(n * hw * ci);
            let dp = Shared(dxn.as_mut_ptr());
            let groups = PIXEL_GROUPS.min(hw);
            tasks(ci, channel_chunk(ci), groups)
                .into_par_iter()
                .with_max_len(1)
                .for_each(|((c0, nc), grp)| {
                    for r in &runs {
                        let g = view(&dyn_, r.p * co, n, co, ohw * co);
                        for j in (0..r.len).filter(|j| group_of(r.q0 + j, hw, groups) == grp) {
                            // dX[:, q, c0..] += dY[:, p, :] . W2[:, t, c0..]
                            let wj = view(&w2, (r.t0 + j) * ci + c0, co, nc, kk * ci);
                            // SAFETY: this task alone writes input channels c0..c0+nc.
                            let mut d =
                                unsafe { view_mut(dp.ptr(), (r.q0 + j) * ci + c0, n, nc, hw * ci) };
                            general_mat_mul(1.0, &g, &wj, 1.0, &mut d);
                        }
                    }
                });
            // Back to NCHW: [n][q][c] -> [n][c][q].
            swap_inner(&dxn, dx, n, hw, ci);
        }
        // Each task zeroes its own share (its output channels' taps of its kernel row) before
        // adding into it: zeroed serially up front, a 512-channel layer's 9.4 MB left the
        // other threads idle.
        let mut dw2 = unzeroed(co * kk * ci);
        let wp = Shared(dw2.as_mut_ptr());
        tasks(co, dw_chunk(co), self.kh)
            .into_par_iter()
            .with_max_len(1)
            .for_each(|((o0, no), a)| {
                for o in o0..o0 + no {
                    // SAFETY: this task alone writes output channels o0..o0+no, kernel row a.
                    unsafe {
                        std::slice::from_raw_parts_mut(
                            wp.ptr().add((o * kk + a * self.kw) * ci),
                            self.kw * ci,
                        )
                    }
                    .fill(0.0);
                }
                for r in runs.iter().filter(|r| r.t0 / self.kw == a) {
                    // dW2[o0.., t0..t0+len, :] += dY[:, p, o0..]^T . X[:, q0..q0+len, :]
                    let g = view(&dyn_, r.p * co + o0, n, no, ohw * co);
                    let a = view(&xn, r.q0 * ci, n, r.len * ci, hw * ci);
                    // SAFETY: this task alone writes output channels o0..o0+no.
                    let mut d = unsafe {
                        view_mut(wp.ptr(), o0 * kk * ci + r.t0 * ci, no, r.len * ci, kk * ci)
                    };
                    general_mat_mul(1.0, &g.t(), &a, 1.0, &mut d);
                }
            });
        // [o][t][c] -> [o][c][t].
        swap_inner(&dw2, dw, co, kk, ci);
    }
}

/// `[n][c][q]` -> `[n][q][c]`, one `n` per task.
pub(super) fn to_channels_last(a: &[f32], n: usize, c: usize, q: usize) -> Vec<f32> {
    let mut out = unzeroed(n * c * q);
    swap_inner(a, &mut out, n, c, q);
    out
}

/// Writes `a` (`[n][c][q]`) into `out` as `[n][q][c]` (so `[n][q][c]` back to `[n][c][q]` is
/// the same call with `c` and `q` swapped).
pub(super) fn swap_inner(a: &[f32], out: &mut [f32], n: usize, c: usize, q: usize) {
    debug_assert!(a.len() == n * c * q && out.len() == a.len());
    out.par_chunks_mut(c * q)
        .zip(a.par_chunks(c * q))
        .for_each(|(o, a)| transpose_block(q, c, a, o));
}
