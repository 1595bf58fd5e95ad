//! Pooling over NCHW: MaxPool, AveragePool, GlobalAveragePool.
//!
//! Every (image, channel) plane is independent, so planes run in parallel and each output is a
//! short loop over its window. Windows follow PyTorch's conventions (the models come from it):
//! `ceil_mode` never starts a window inside the end padding, and with `count_include_pad` the
//! divisor counts the padding but not the part of a window hanging past it.

use super::simd::simd_dispatch;
use super::{contiguous, deinterleave, unzeroed, unzeroed_indices, window_out_len, zeros};
use crate::engine::{shape_err, Result};
use ndarray::{Array4, ArrayView4, NdFloat};
use rayon::prelude::*;

/// Resolved window geometry of one pooling call.
#[derive(Clone, Copy, Debug)]
struct Win {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    dh: usize,
    dw: usize,
    pt: usize,
    pl: usize,
    pb: usize,
    pr: usize,
}

#[allow(clippy::too_many_arguments)]
fn window(
    op: &'static str,
    x: &[usize],
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: [usize; 4],
    ceil_mode: bool,
) -> Result<Win> {
    let &[n, c, h, w] = x else {
        return Err(shape_err(
            op,
            format!("input {x:?} must have rank 4 (NCHW)"),
        ));
    };
    if c == 0 || h == 0 || w == 0 {
        return Err(shape_err(op, format!("empty input {x:?}")));
    }
    let [pt, pl, pb, pr] = pads;
    let oh = window_out_len(
        op,
        "height",
        h,
        kernel[0],
        strides[0],
        dilations[0],
        pt,
        pb,
        ceil_mode,
    )?;
    let ow = window_out_len(
        op,
        "width",
        w,
        kernel[1],
        strides[1],
        dilations[1],
        pl,
        pr,
        ceil_mode,
    )?;
    Ok(Win {
        n,
        c,
        h,
        w,
        oh,
        ow,
        kh: kernel[0],
        kw: kernel[1],
        sh: strides[0],
        sw: strides[1],
        dh: dilations[0],
        dw: dilations[1],
        pt,
        pl,
        pb,
        pr,
    })
}

impl Win {
    fn planes(&self) -> usize {
        self.n * self.c
    }

    fn check_dy(&self, op: &'static str, dy: &[usize]) -> Result<()> {
        let want = [self.n, self.c, self.oh, self.ow];
        if dy != want {
            return Err(shape_err(
                op,
                format!("output gradient has shape {dy:?}, expected {want:?}"),
            ));
        }
        Ok(())
    }
}

/// Max pooling with dilations and `ceil_mode` (ONNX `MaxPool`, opset 12+ attributes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub dilations: [usize; 2],
    pub ceil_mode: bool,
}

/// Which input element each output took, as an index into its input plane; `u32::MAX` marks a
/// window with no input element (only possible with pads wider than the kernel), which outputs 0
/// and passes no gradient.
#[derive(Clone, Debug)]
pub struct MaxPoolSaved {
    pub argmax: Vec<u32>,
    pub input_shape: [usize; 4],
}

impl MaxPool2d {
    const OP: &'static str = "MaxPool";

    fn win(&self, x: &[usize]) -> Result<Win> {
        window(
            Self::OP,
            x,
            self.kernel,
            self.strides,
            self.dilations,
            self.pads,
            self.ceil_mode,
        )
    }

    pub fn output_shape(&self, x: &[usize]) -> Result<[usize; 4]> {
        let g = self.win(x)?;
        Ok([g.n, g.c, g.oh, g.ow])
    }

    /// Returns the pooled tensor and the argmax backward routes through. Ties go to the first
    /// element in window order (row-major), as PyTorch does.
    pub fn forward(&self, x: ArrayView4<f32>) -> Result<(Array4<f32>, MaxPoolSaved)> {
        let g = self.win(x.shape())?;
        if g.h * g.w > u32::MAX as usize {
            return Err(shape_err(
                Self::OP,
                "input plane too large for 32-bit argmax",
            ));
        }
        let xs = contiguous(&x);
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let mut y = unzeroed(g.planes() * ohw);
        // Every entry is written by `max_plane` or `max_plane_direct` (a 4 MB serial fill of
        // ResNet-18's stem pooling at batch 64, while the planes run in parallel).
        let mut arg = unzeroed_indices(g.planes() * ohw);
        if g.planes() > 0 {
            let lay = MaxLayout::new(&g);
            y.par_chunks_mut(ohw)
                .zip(arg.par_chunks_mut(ohw))
                .zip(xs.par_chunks(hw))
                .for_each_init(MaxScratch::default, |s, ((yp, ap), xp)| match &lay {
                    Some(lay) => max_plane(&g, lay, xp, yp, ap, s),
                    None => max_plane_direct(&g, xp, yp, ap),
                });
        }
        let y = Array4::from_shape_vec((g.n, g.c, g.oh, g.ow), y)
            .expect("output length follows from the geometry");
        Ok((
            y,
            MaxPoolSaved {
                argmax: arg,
                input_shape: [g.n, g.c, g.h, g.w],
            },
        ))
    }

    /// Routes each output gradient to its argmax (summing where windows overlap).
    pub fn backward(&self, saved: &MaxPoolSaved, dy: ArrayView4<f32>) -> Result<Array4<f32>> {
        let g = self.win(&saved.input_shape)?;
        g.check_dy(Self::OP, dy.shape())?;
        if saved.argmax.len() != g.planes() * g.oh * g.ow {
            return Err(shape_err(
                Self::OP,
                "saved argmax does not match the input shape",
            ));
        }
        let gs = contiguous(&dy);
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let mut dx = zeros(g.planes() * hw);
        if g.planes() > 0 {
            dx.par_chunks_mut(hw)
                .zip(gs.par_chunks(ohw).zip(saved.argmax.par_chunks(ohw)))
                .for_each(|(dp, (gp, ap))| {
                    for (&grad, &a) in gp.iter().zip(ap) {
                        if a != u32::MAX {
                            dp[a as usize] += grad;
                        }
                    }
                });
        }
        Ok(Array4::from_shape_vec((g.n, g.c, g.h, g.w), dx)
            .expect("dx length follows from the geometry"))
    }

    /// Direct definition. Test oracle only.
    pub fn reference<T: NdFloat>(&self, x: ArrayView4<T>) -> Result<Array4<T>> {
        let g = self.win(x.shape())?;
        let mut y = Array4::zeros((g.n, g.c, g.oh, g.ow));
        for ((n, c, oy, ox), out) in y.indexed_iter_mut() {
            let mut best: Option<T> = None;
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let iy = (oy * g.sh + ki * g.dh) as isize - g.pt as isize;
                    let ix = (ox * g.sw + kj * g.dw) as isize - g.pl as isize;
                    if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                        let v = x[[n, c, iy as usize, ix as usize]];
                        best = Some(best.map_or(v, |b: T| b.max(v)));
                    }
                }
            }
            *out = best.unwrap_or(T::zero());
        }
        Ok(y)
    }
}

/// Average pooling (ONNX `AveragePool`; no dilations, as in PyTorch).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AveragePool2d {
    pub kernel: [usize; 2],
    pub strides: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
    pub ceil_mode: bool,
    pub count_include_pad: bool,
}

impl AveragePool2d {
    const OP: &'static str = "AveragePool";

    fn win(&self, x: &[usize]) -> Result<Win> {
        window(
            Self::OP,
            x,
            self.kernel,
            self.strides,
            [1, 1],
            self.pads,
            self.ceil_mode,
        )
    }

    pub fn output_shape(&self, x: &[usize]) -> Result<[usize; 4]> {
        let g = self.win(x)?;
        Ok([g.n, g.c, g.oh, g.ow])
    }

    /// Divisor for output `(oy, ox)` and its input window `(y0..y1, x0..x1)`, PyTorch's rule.
    fn cell(&self, g: &Win, oy: usize, ox: usize) -> (f32, [usize; 4]) {
        let span = |o: usize, s: usize, p: usize, k: usize, n_in: usize, p_end: usize| {
            let start = (o * s) as isize - p as isize;
            let end = (start + k as isize).min((n_in + p_end) as isize);
            let padded_len = (end - start) as usize;
            // Both ends clamped into the input: a window wholly in the end padding (pads wider
            // than the kernel) is an empty range at `n_in`, not one starting past the row.
            let (a, b) = (
                (start.max(0) as usize).min(n_in),
                (end.max(0) as usize).min(n_in),
            );
            (padded_len, a, b.max(a))
        };
        let (ph, y0, y1) = span(oy, g.sh, g.pt, g.kh, g.h, g.pb);
        let (pw, x0, x1) = span(ox, g.sw, g.pl, g.kw, g.w, g.pr);
        let count = if self.count_include_pad {
            ph * pw
        } else {
            (y1 - y0) * (x1 - x0)
        };
        (count as f32, [y0, y1, x0, x1])
    }

    /// Whether every window is the 2x2 block at `(2 oy, 2 ox)` inside the input (PyTorch's
    /// `nn.AvgPool2d(2)`, unpadded, the last row or column of an odd size left out): the case
    /// [`Self::forward`] and [`Self::backward`] run without the per-cell window arithmetic
    /// (7 ns an output, 1.2 ms of a user CNN's 19 ms step each way), with the same sums in the
    /// same order, so the same bits.
    fn halving(&self, g: &Win) -> bool {
        self.kernel == [2, 2]
            && self.strides == [2, 2]
            && self.pads == [0; 4]
            && 2 * g.oh <= g.h
            && 2 * g.ow <= g.w
    }

    pub fn forward(&self, x: ArrayView4<f32>) -> Result<Array4<f32>> {
        let g = self.win(x.shape())?;
        self.forward_with(&g, x, self.halving(&g))
    }

    /// Forward through the 2x2 fast path when `halving` (see [`Self::halving`]), else through
    /// each cell's window.
    fn forward_with(&self, g: &Win, x: ArrayView4<f32>, halving: bool) -> Result<Array4<f32>> {
        let xs = contiguous(&x);
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let mut y = unzeroed(g.planes() * ohw);
        if g.planes() > 0 && halving {
            y.par_chunks_mut(ohw)
                .zip(xs.par_chunks(hw))
                .for_each(|(yp, xp)| {
                    for (oy, yr) in yp.chunks_exact_mut(g.ow).enumerate() {
                        let r0 = &xp[2 * oy * g.w..];
                        let r1 = &xp[(2 * oy + 1) * g.w..];
                        for (ox, o) in yr.iter_mut().enumerate() {
                            let s = (r0[2 * ox] + r0[2 * ox + 1]) + (r1[2 * ox] + r1[2 * ox + 1]);
                            *o = s / 4.0;
                        }
                    }
                });
        } else if g.planes() > 0 {
            y.par_chunks_mut(ohw)
                .zip(xs.par_chunks(hw))
                .for_each(|(yp, xp)| {
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let (count, [y0, y1, x0, x1]) = self.cell(g, oy, ox);
                            let s: f32 = (y0..y1)
                                .map(|iy| xp[iy * g.w + x0..iy * g.w + x1].iter().sum::<f32>())
                                .sum();
                            yp[oy * g.ow + ox] = if count > 0.0 { s / count } else { 0.0 };
                        }
                    }
                });
        }
        Ok(Array4::from_shape_vec((g.n, g.c, g.oh, g.ow), y)
            .expect("output length follows from the geometry"))
    }

    /// Spreads each output gradient evenly (by the forward divisor) over its window.
    pub fn backward(&self, x_shape: &[usize], dy: ArrayView4<f32>) -> Result<Array4<f32>> {
        let g = self.win(x_shape)?;
        g.check_dy(Self::OP, dy.shape())?;
        self.backward_with(&g, dy, self.halving(&g))
    }

    /// Backward through the 2x2 fast path when `halving`, else through each cell's window.
    fn backward_with(&self, g: &Win, dy: ArrayView4<f32>, halving: bool) -> Result<Array4<f32>> {
        let gs = contiguous(&dy);
        let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
        let mut dx = zeros(g.planes() * hw);
        if g.planes() > 0 && halving {
            dx.par_chunks_mut(hw)
                .zip(gs.par_chunks(ohw))
                .for_each(|(dp, gp)| {
                    for (oy, gr) in gp.chunks_exact(g.ow).enumerate() {
                        let rows = &mut dp[2 * oy * g.w..(2 * oy + 2) * g.w];
                        let (top, bottom) = rows.split_at_mut(g.w);
                        for (ox, &gv) in gr.iter().enumerate() {
                            // `0.0 + v`, as the cell path's `+=` on zeros (-0.0 becomes 0.0).
                            let v = 0.0 + gv / 4.0;
                            top[2 * ox] = v;
                            top[2 * ox + 1] = v;
                            bottom[2 * ox] = v;
                            bottom[2 * ox + 1] = v;
                        }
                    }
                });
        } else if g.planes() > 0 {
            dx.par_chunks_mut(hw)
                .zip(gs.par_chunks(ohw))
                .for_each(|(dp, gp)| {
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let (count, [y0, y1, x0, x1]) = self.cell(g, oy, ox);
                            if count == 0.0 {
                                continue;
                            }
                            let v = gp[oy * g.ow + ox] / count;
                            for iy in y0..y1 {
                                dp[iy * g.w + x0..iy * g.w + x1]
                                    .iter_mut()
                                    .for_each(|d| *d += v);
                            }
                        }
                    }
                });
        }
        Ok(Array4::from_shape_vec((g.n, g.c, g.h, g.w), dx)
            .expect("dx length follows from the geometry"))
    }

    /// Direct definition: visits every tap, counts padded and real ones. Test oracle only.
    pub fn reference<T: NdFloat>(&self, x: ArrayView4<T>) -> Result<Array4<T>> {
        let g = self.win(x.shape())?;
        let mut y = Array4::zeros((g.n, g.c, g.oh, g.ow));
        for ((n, c, oy, ox), out) in y.indexed_iter_mut() {
            let (mut s, mut real, mut padded) = (T::zero(), 0usize, 0usize);
            for ki in 0..g.kh {
                for kj in 0..g.kw {
                    let iy = (oy * g.sh + ki) as isize - g.pt as isize;
                    let ix = (ox * g.sw + kj) as isize - g.pl as isize;
                    // Taps past the end padding (ceil_mode overhang) count for nothing.
                    if iy >= (g.h + g.pb) as isize || ix >= (g.w + g.pr) as isize {
                        continue;
                    }
                    padded += 1;
                    if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                        s += x[[n, c, iy as usize, ix as usize]];
                        real += 1;
                    }
                }
            }
            let count = if self.count_include_pad { padded } else { real };
            *out = if count > 0 {
                s / T::from(count).expect("count fits a float")
            } else {
                T::zero()
            };
        }
        Ok(y)
    }
}

/// Mean over each plane, `[N, C, H, W] -> [N, C, 1, 1]` (ONNX `GlobalAveragePool`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GlobalAveragePool;

impl GlobalAveragePool {
    const OP: &'static str = "GlobalAveragePool";

    pub fn output_shape(&self, x: &[usize]) -> Result<[usize; 4]> {
        match *x {
            [n, c, h, w] if h > 0 && w > 0 => Ok([n, c, 1, 1]),
            _ => Err(shape_err(
                Self::OP,
                format!("input {x:?} must be NCHW with non-empty planes"),
            )),
        }
    }

    pub fn forward(&self, x: ArrayView4<f32>) -> Result<Array4<f32>> {
        let [n, c, _, _] = self.output_shape(x.shape())?;
        let xs = contiguous(&x);
        let hw = x.shape()[2] * x.shape()[3];
        let y: Vec<f32> = xs
            .par_chunks(hw)
            .map(|p| super::sum(p) / hw as f32)
            .collect();
        Ok(Array4::from_shape_vec((n, c, 1, 1), y).expect("one value per plane"))
    }

    pub fn backward(&self, x_shape: &[usize], dy: ArrayView4<f32>) -> Result<Array4<f32>> {
        let [n, c, _, _] = self.output_shape(x_shape)?;
        if dy.shape() != [n, c, 1, 1] {
            return Err(shape_err(
                Self::OP,
                format!(
                    "output gradient has shape {:?}, expected {:?}",
                    dy.shape(),
                    [n, c, 1, 1]
                ),
            ));
        }
        let (h, w) = (x_shape[2], x_shape[3]);
        let inv = 1.0 / (h * w) as f32;
        let gs = contiguous(&dy);
        let mut dx = unzeroed(n * c * h * w);
        if n * c > 0 {
            dx.par_chunks_mut(h * w)
                .zip(gs.par_iter())
                .for_each(|(dp, &g)| dp.fill(g * inv));
        }
        Ok(Array4::from_shape_vec((n, c, h, w), dx).expect("dx has the input's length"))
    }

    /// Direct definition. Test oracle only.
    pub fn reference<T: NdFloat>(&self, x: ArrayView4<T>) -> Result<Array4<T>> {
        let [n, c, _, _] = self.output_shape(x.shape())?;
        let hw = T::from(x.shape()[2] * x.shape()[3]).expect("count fits a float");
        let mut y = Array4::zeros((n, c, 1, 1));
        for ((i, j, _, _), out) in y.indexed_iter_mut() {
            *out = x.slice(ndarray::s![i, j, .., ..]).sum() / hw;
        }
        Ok(y)
    }
}

/// The layout [`max_plane`] pools from: the padded plane split into its stride phases, so that
/// every tap of the window reads one contiguous run for the whole output plane.
///
/// Padded input row `r' = iy + pt` lies in row phase `r' % sh` at row `r' / sh`, and likewise
/// for columns; output `(oy, ox)`'s tap `(ki, kj)` then reads row phase `ki*dh % sh`, row
/// `oy + ki*dh / sh`, column phase `kj*dw % sw`, column `ox + kj*dw / sw`. With every phase
/// `rows x stride` and outputs laid out with the same row stride, a tap is one flat run of
/// `(oh-1)*stride + ow` values for the whole plane: long vector loops instead of `ow`-long rows
/// with a scalar tail (ResNet's stem pool has 16-wide rows, one AVX-512 vector or less once
/// the padding trims a tap). Only the phases some tap reads are kept; padding and columns past
/// the input read as -inf, which the strict compare never takes.
struct MaxLayout {
    /// The row phases some tap reads, in slot order.
    row_phases: Vec<usize>,
    /// The column phases some tap reads, in slot order.
    col_phases: Vec<usize>,
    /// Rows per phase.
    rows: usize,
    /// Row stride of every phase and of the output scratch.
    stride: usize,
    /// Per tap in window order: its run's start in the buffer and its offset in the input plane
    /// from the window's origin (`ki*dh*w + kj*dw`, modulo 2^32 like the index arithmetic).
    taps: Vec<(usize, u32)>,
    /// Where [`MaxLayout::fill`] copies each input row: `(input row, buffer offset of its row
    /// in column phase 0)`, for the rows some tap reads.
    row_dst: Vec<(usize, usize)>,
    /// Per column phase: its offset from phase 0's row, its first input column, and that
    /// column's position in the row; the divisions done once per call, not per plane row.
    col_src: Vec<(usize, usize, usize)>,
}

impl MaxLayout {
    /// `None` when the layout would be much larger than the padded plane (a dilation or stride
    /// far beyond the input, as a hostile file may declare): [`max_plane_direct`] then.
    fn new(g: &Win) -> Option<Self> {
        let phases = |k: usize, d: usize, s: usize| {
            let mut ph: Vec<usize> = Vec::new();
            for t in 0..k {
                if !ph.contains(&((t * d) % s)) {
                    ph.push((t * d) % s);
                }
            }
            ph
        };
        let row_phases = phases(g.kh, g.dh, g.sh);
        let col_phases = phases(g.kw, g.dw, g.sw);
        let rows = g.oh + (g.kh - 1) * g.dh / g.sh;
        let stride = g.ow + (g.kw - 1) * g.dw / g.sw;
        let len = row_phases.len() * col_phases.len() * rows * stride;
        let padded = (g.h + g.pt + g.pb) * (g.w + g.pl + g.pr);
        if len > 4 * padded.max(g.oh * g.ow) + 4096 {
            return None;
        }
        let slot = |ph: &[usize], p: usize| ph.iter().position(|&q| q == p).expect("tap phase");
        let mut taps = Vec::with_capacity(g.kh * g.kw);
        for ki in 0..g.kh {
            let rs = slot(&row_phases, (ki * g.dh) % g.sh);
            let a = ki * g.dh / g.sh;
            for kj in 0..g.kw {
                let cs = slot(&col_phases, (kj * g.dw) % g.sw);
                let q = kj * g.dw / g.sw;
                let start = ((rs * col_phases.len() + cs) * rows + a) * stride + q;
                taps.push((start, (ki * g.dh * g.w + kj * g.dw) as u32));
            }
        }
        let nc = col_phases.len();
        let row_dst = (0..g.h)
            .filter_map(|iy| {
                let r = iy + g.pt;
                let a = r / g.sh;
                let rs = row_phases.iter().position(|&p| p == r % g.sh)?;
                (a < rows).then_some((iy, (rs * nc * rows + a) * stride))
            })
            .collect();
        let col_src = col_phases
            .iter()
            .enumerate()
            .filter_map(|(cs, &ph)| {
                // Input columns ix with (ix + pl) % sw == ph, from the first one.
                let ix0 = (ph + g.sw - g.pl % g.sw) % g.sw;
                let j0 = (ix0 + g.pl) / g.sw;
                (ix0 < g.w && j0 < stride).then_some((cs * rows * stride, ix0, j0))
            })
            .collect();
        Some(MaxLayout {
            row_phases,
            col_phases,
            rows,
            stride,
            taps,
            row_dst,
            col_src,
        })
    }

    fn buf_len(&self) -> usize {
        self.row_phases.len() * self.col_phases.len() * self.rows * self.stride
    }

    /// The flat run length of one tap: `oh` output rows at the layout's stride.
    fn run_len(&self, g: &Win) -> usize {
        (g.oh - 1) * self.stride + g.ow
    }

    /// Copies plane `xp` into the input positions of `buf`; the rest of `buf` (padding, columns
    /// past the input) must hold -inf, which [`max_plane`] writes once per scratch buffer: those
    /// positions are the same for every plane.
    #[inline(always)]
    fn fill(&self, g: &Win, xp: &[f32], buf: &mut [f32]) {
        for &(iy, base) in &self.row_dst {
            let row = &xp[iy * g.w..][..g.w];
            for &(cs_off, ix0, j0) in &self.col_src {
                let dst = &mut buf[base + cs_off..][j0..self.stride];
                deinterleave(&row[ix0..], g.sw, dst);
            }
        }
    }
}

/// One output's window, element by element: the first input element in window order holding
/// the max (NaN propagating) and its index, or `(0, u32::MAX)` for a window with no input
/// element (pads wider than the kernel: 0, and no gradient).
fn window_max(g: &Win, xp: &[f32], oy: usize, ox: usize) -> (f32, u32) {
    let (mut m, mut k) = (f32::NEG_INFINITY, u32::MAX);
    for ki in 0..g.kh {
        let iy = (oy * g.sh + ki * g.dh) as isize - g.pt as isize;
        if iy < 0 || iy as usize >= g.h {
            continue;
        }
        for kj in 0..g.kw {
            let ix = (ox * g.sw + kj * g.dw) as isize - g.pl as isize;
            if ix < 0 || ix as usize >= g.w {
                continue;
            }
            let i = iy as usize * g.w + ix as usize;
            let v = xp[i];
            if k == u32::MAX || v > m || (v.is_nan() && !m.is_nan()) {
                (m, k) = (v, i as u32);
            }
        }
    }
    if k == u32::MAX {
        (0.0, k)
    } else {
        (m, k)
    }
}

/// One plane of [`MaxPool2d::forward`] window by window ([`window_max`]), for geometries
/// whose [`MaxLayout`] would be too large.
fn max_plane_direct(g: &Win, xp: &[f32], yp: &mut [f32], ap: &mut [u32]) {
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let o = oy * g.ow + ox;
            (yp[o], ap[o]) = window_max(g, xp, oy, ox);
        }
    }
}

/// Scratch of one rayon task for [`max_plane`].
#[derive(Default)]
struct MaxScratch {
    buf: Vec<f32>,
    /// Running (value, tap) pairs, two of each: every tap reads one and writes the other.
    best: [Vec<f32>; 2],
    tap: [Vec<u32>; 2],
}

simd_dispatch! {
    /// One plane of [`MaxPool2d::forward`]: values into `yp`, first-max indices into `ap`.
    /// Compiled for AVX2 where the CPU has it (the crate's baseline is SSE2, whose lack of
    /// blends keeps the select loop scalar); compares and selects only, so the results are the
    /// same either way.
    fn max_plane(
        g: &Win,
        lay: &MaxLayout,
        xp: &[f32],
        yp: &mut [f32],
        ap: &mut [u32],
        s: &mut MaxScratch,
    ) => max_plane_body, (g, lay, xp, yp, ap, s); ["avx512f", "avx2"]
}

#[inline(always)]
fn max_plane_body(
    g: &Win,
    lay: &MaxLayout,
    xp: &[f32],
    yp: &mut [f32],
    ap: &mut [u32],
    s: &mut MaxScratch,
) {
    // One tap at a time over the whole plane, keeping a running (value, tap) pair per output
    // with branch-free selects: every lane is independent, so the loop vectorises. (Window
    // after window with a branchy running pair made each output a chain of dependent,
    // mispredicted compare-and-branches; see benches/pool.rs for the history.)
    if s.buf.len() != lay.buf_len() {
        s.buf.clear();
        s.buf.resize(lay.buf_len(), f32::NEG_INFINITY);
    }
    lay.fill(g, xp, &mut s.buf);
    let len = lay.run_len(g);
    if s.best[0].len() != len {
        // Every entry is written by the first tap before it is read.
        for (b, t) in s.best.iter_mut().zip(&mut s.tap) {
            b.resize(len, f32::NEG_INFINITY);
            t.resize(len, u32::MAX);
        }
    }
    // Each tap reads the running pairs from one buffer and writes them to the other: selected
    // back in place, LLVM stores them with AVX2's masked store (`vmaskmovps`), which is slow on
    // AMD Zen (perf: half the forward's samples on it; see benches/pool.rs).
    let [best_a, best_b] = &mut s.best;
    let [tap_a, tap_b] = &mut s.tap;
    let (mut best, mut next_best) = (&mut best_a[..len], &mut best_b[..len]);
    let (mut tap, mut next_tap) = (&mut tap_a[..len], &mut tap_b[..len]);
    let Some(&(start0, off0)) = lay.taps.first() else {
        // No taps (an empty kernel): every output is untaken.
        fix_untaken(g, xp, yp, ap);
        return;
    };
    // The first tap against the (-inf, none) start: taken unless -inf (padding).
    for ((b, t), &v) in best
        .iter_mut()
        .zip(tap.iter_mut())
        .zip(&s.buf[start0..][..len])
    {
        let take = (v > f32::NEG_INFINITY) | v.is_nan();
        *b = v;
        *t = if take { off0 } else { u32::MAX };
    }
    for &(start, off) in &lay.taps[1..] {
        let src = &s.buf[start..][..len];
        for i in 0..len {
            let (v, m, t) = (src[i], best[i], tap[i]);
            // The first tap in window order holding the max: a later tap takes over only when
            // strictly larger, or as the first NaN (NaN propagates). Padding is -inf, so it is
            // never taken; nor is a real -inf, which the fix-up below finds.
            let take = (v > m) | (v.is_nan() & !m.is_nan());
            next_best[i] = if take { v } else { m };
            next_tap[i] = if take { off } else { t };
        }
        std::mem::swap(&mut best, &mut next_best);
        std::mem::swap(&mut tap, &mut next_tap);
    }
    let sw = g.sw as u32;
    let mut untaken = false;
    for (oy, (yr, ar)) in yp
        .chunks_exact_mut(g.ow)
        .zip(ap.chunks_exact_mut(g.ow))
        .enumerate()
    {
        let at = oy * lay.stride;
        yr.copy_from_slice(&best[at..][..g.ow]);
        // Input index = window origin (oy*sh - pt, ox*sw - pl) + the tap's offset, in wrapping
        // u32 arithmetic (the origin may lie in the padding; the sum is inside the plane).
        let origin = ((oy * g.sh * g.w) as i64 - (g.pt * g.w + g.pl) as i64) as u32;
        for (ox, (a, &t)) in ar.iter_mut().zip(&tap[at..][..g.ow]).enumerate() {
            let idx = origin.wrapping_add(ox as u32 * sw).wrapping_add(t);
            *a = if t == u32::MAX { u32::MAX } else { idx };
            untaken |= t == u32::MAX;
        }
    }
    if untaken {
        fix_untaken(g, xp, yp, ap);
    }
}

/// Outputs no tap took: windows whose input elements are all -inf (the first one is the max)
/// or that hold no input element at all; [`window_max`] settles both.
#[cold]
fn fix_untaken(g: &Win, xp: &[f32], yp: &mut [f32], ap: &mut [u32]) {
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let o = oy * g.ow + ox;
            if ap[o] == u32::MAX {
                (yp[o], ap[o]) = window_max(g, xp, oy, ox);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;
    use crate::engine::EngineError;

    /// Distinct values at least 1e-3 apart (a shuffled ramp), so max pooling has no near-ties
    /// that a finite-difference step could flip.
    fn distinct(rng: &mut Rng, shape: [usize; 4]) -> Array4<f32> {
        let n: usize = shape.iter().product();
        let mut v: Vec<f32> = (0..n)
            .map(|i| i as f32 * 1e-3 - 0.5 * n as f32 * 1e-3)
            .collect();
        for i in (1..n).rev() {
            v.swap(i, rng.below(i + 1));
        }
        Array4::from_shape_vec(shape, v).unwrap()
    }

    type GradCheck = fn(&str, &ndarray::ArrayView4<f32>, &ndarray::ArrayView4<f64>);

    fn check_max(p: MaxPool2d, xs: [usize; 4], seed: u64) {
        check_max_with(p, xs, seed, assert_grad);
    }

    fn check_max_with(p: MaxPool2d, xs: [usize; 4], seed: u64, grad_check: GradCheck) {
        let mut rng = Rng::new(seed);
        let x = distinct(&mut rng, xs);
        let (y, saved) = p.forward(x.view()).unwrap();
        assert_eq!(y.shape(), p.output_shape(&xs).unwrap());
        assert_close(
            "forward",
            &y.view(),
            &p.reference(x.view()).unwrap().view(),
            1e-6,
        );
        let r = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
        let dx = p.backward(&saved, r.view()).unwrap();
        let r64 = to_f64(&r.view());
        let fd = fd_grad(&to_f64(&x.view()), |x| {
            dot_loss(&p.reference(x.view()).unwrap(), &r64)
        });
        grad_check("dx", &dx.view(), &fd.view());
    }

    fn check_avg(p: AveragePool2d, xs: [usize; 4], seed: u64) {
        check_avg_with(p, xs, seed, assert_grad);
    }

    fn check_avg_with(p: AveragePool2d, xs: [usize; 4], seed: u64, grad_check: GradCheck) {
        let mut rng = Rng::new(seed);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let y = p.forward(x.view()).unwrap();
        assert_eq!(y.shape(), p.output_shape(&xs).unwrap());
        assert_close(
            "forward",
            &y.view(),
            &p.reference(x.view()).unwrap().view(),
            1e-6,
        );
        let r = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
        let dx = p.backward(&xs, r.view()).unwrap();
        let r64 = to_f64(&r.view());
        let fd = fd_grad(&to_f64(&x.view()), |x| {
            dot_loss(&p.reference(x.view()).unwrap(), &r64)
        });
        grad_check("dx", &dx.view(), &fd.view());
    }

    fn maxp(
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        dilations: [usize; 2],
        ceil_mode: bool,
    ) -> MaxPool2d {
        MaxPool2d {
            kernel,
            strides,
            pads,
            dilations,
            ceil_mode,
        }
    }

    fn avgp(
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        ceil_mode: bool,
        count_include_pad: bool,
    ) -> AveragePool2d {
        AveragePool2d {
            kernel,
            strides,
            pads,
            ceil_mode,
            count_include_pad,
        }
    }

    /// Any pooling geometry the ops accept matches the reference and finite differences; any
    /// they refuse gives an error, never a panic (the property that found the depthwise conv's
    /// out-of-row tap, run over the window arithmetic pooling shares with it).
    #[test]
    fn any_pool_geometry_matches_the_reference_or_is_refused() {
        use proptest::prelude::*;
        // ELRT_PROPTEST_CASES=N for a longer (still deterministic) hunt.
        let (mut runner, cases) = prop_runner(256);
        let geometry = (
            (1..3usize, 1..3usize, 1..8usize, 1..8usize),
            (
                [1..4usize, 1..4usize],
                [1..3usize, 1..3usize],
                [1..3usize, 1..3usize],
            ),
            (
                [0..3usize, 0..3usize, 0..3usize, 0..3usize],
                any::<bool>(),
                any::<bool>(),
            ),
            any::<u64>(),
        );
        let accepted = std::cell::Cell::new(0);
        runner
            .run(
                &geometry,
                |((n, c, h, w), (k, s, d), (pads, ceil, incl), seed)| {
                    let xs = [n, c, h, w];
                    let max = maxp(k, s, pads, d, ceil);
                    let avg = avgp(k, s, pads, ceil, incl);
                    let zeros = Array4::<f32>::zeros(xs);
                    match max.output_shape(&xs) {
                        Ok(_) => {
                            accepted.set(accepted.get() + 1);
                            check_max_with(max, xs, seed, assert_grad_or_zero);
                        }
                        Err(_) => prop_assert!(max.forward(zeros.view()).is_err()),
                    }
                    match avg.output_shape(&xs) {
                        Ok(_) => check_avg_with(avg, xs, seed, assert_grad_or_zero),
                        Err(_) => prop_assert!(avg.forward(zeros.view()).is_err()),
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert!(
            accepted.get() * 3 >= cases,
            "only {} of {cases} geometries accepted",
            accepted.get()
        );
    }

    /// Found by the geometry property: with pads wider than the kernel, a window lying wholly in
    /// the end padding sliced from past the row and panicked.
    #[test]
    fn avg_window_wholly_in_end_padding() {
        for incl in [false, true] {
            check_avg(
                avgp([2, 1], [1, 1], [0, 0, 1, 2], false, incl),
                [1, 1, 1, 1],
                5,
            );
            check_avg(
                avgp([1, 1], [1, 1], [0, 0, 2, 2], false, incl),
                [1, 2, 2, 2],
                6,
            );
        }
    }

    #[test]
    fn max_2x2_stride2() {
        check_max(maxp([2, 2], [2, 2], [0; 4], [1, 1], false), [3, 2, 6, 8], 1);
    }

    #[test]
    fn max_3x3_stride2_pad1_resnet_stem() {
        check_max(maxp([3, 3], [2, 2], [1; 4], [1, 1], false), [3, 2, 9, 7], 2);
    }

    #[test]
    fn max_overlapping_stride1_asymmetric_pads() {
        check_max(
            maxp([3, 2], [1, 1], [1, 0, 0, 1], [1, 1], false),
            [3, 2, 5, 6],
            3,
        );
    }

    #[test]
    fn max_dilation2() {
        check_max(
            maxp([2, 3], [1, 2], [1, 1, 1, 1], [2, 2], false),
            [3, 2, 7, 8],
            4,
        );
    }

    #[test]
    fn max_ceil_mode() {
        check_max(maxp([3, 3], [2, 2], [0; 4], [1, 1], true), [3, 2, 8, 7], 5);
        check_max(
            maxp([2, 2], [2, 2], [1, 1, 1, 1], [1, 1], true),
            [3, 2, 5, 6],
            6,
        );
    }

    #[test]
    fn max_ties_go_to_the_first_element() {
        let p = maxp([2, 2], [1, 1], [0; 4], [1, 1], false);
        let x =
            Array4::from_shape_vec((1, 1, 2, 3), vec![1.0f32, 5.0, 5.0, 5.0, 5.0, 5.0]).unwrap();
        let (y, saved) = p.forward(x.view()).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[5.0, 5.0]);
        assert_eq!(saved.argmax, vec![1, 1]);
        let dy = Array4::from_shape_vec((1, 1, 1, 2), vec![1.0f32, 2.0]).unwrap();
        let dx = p.backward(&saved, dy.view()).unwrap();
        assert_eq!(dx.as_slice().unwrap(), &[0.0, 3.0, 0.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn max_nan_propagates_and_takes_the_gradient() {
        // Windows [1, NaN, 4, 2] and [NaN, 3, 2, NaN]: NaN wins, at its first position; a
        // window of -inf still picks its first element.
        let p = maxp([2, 2], [1, 1], [0; 4], [1, 1], false);
        let x = Array4::from_shape_vec(
            (1, 1, 2, 3),
            vec![1.0f32, f32::NAN, 3.0, 4.0, 2.0, f32::NAN],
        )
        .unwrap();
        let (y, saved) = p.forward(x.view()).unwrap();
        assert!(y.iter().all(|v| v.is_nan()));
        assert_eq!(saved.argmax, vec![1, 1]);
        let inf = Array4::from_elem((1, 1, 2, 2), f32::NEG_INFINITY);
        let (y, saved) = p.forward(inf.view()).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[f32::NEG_INFINITY]);
        assert_eq!(saved.argmax, vec![0]);
    }

    #[test]
    fn max_negative_inputs_ignore_padding() {
        // Padding must not act as a zero candidate.
        let p = maxp([3, 3], [1, 1], [1; 4], [1, 1], false);
        let x = Array4::from_elem((1, 1, 2, 2), -3.0f32);
        let (y, _) = p.forward(x.view()).unwrap();
        assert!(y.iter().all(|&v| v == -3.0));
    }

    /// Strides, dilations and pads far beyond the plane, as a hostile file may declare: no
    /// stride-sized allocation (the phase layout keeps only the phases a tap reads), and the
    /// values and gradients of the reference.
    #[test]
    fn max_stride_or_dilation_far_beyond_the_plane_matches_the_reference() {
        check_max(
            maxp([1, 1], [1 << 40, 1 << 40], [0; 4], [1, 1], false),
            [1, 2, 3, 4],
            21,
        );
        check_max(
            maxp([2, 2], [1 << 40, 1], [0; 4], [1, 1], true),
            [1, 2, 3, 4],
            22,
        );
        check_max(
            maxp([2, 1], [1, 1], [50_000, 0, 0, 0], [50_000, 1], false),
            [1, 2, 3, 4],
            23,
        );
    }

    /// The window-by-window fallback (for layouts far larger than the plane) gives the phase
    /// layout's values and argmax bit for bit, ties, NaN, -inf and padding included.
    #[test]
    fn max_direct_fallback_equals_the_phase_layout() {
        let mut rng = Rng::new(24);
        for (k, st, pads, dil, ceil) in [
            ([3, 3], [2, 2], [1; 4], [1, 1], false),
            ([2, 3], [1, 2], [0, 1, 1, 0], [2, 1], true),
            ([3, 1], [3, 1], [2, 0, 2, 0], [1, 1], false),
            ([5, 5], [1, 1], [4; 4], [1, 1], false),
        ] {
            let p = maxp(k, st, pads, dil, ceil);
            let mut x = distinct(&mut rng, [1, 2, 7, 6]);
            // Ties, NaN and -inf in every plane.
            for c in 0..2 {
                x[[0, c, 1, 1]] = x[[0, c, 1, 2]];
                x[[0, c, 3, 3]] = f32::NAN;
                x[[0, c, 5, 0]] = f32::NEG_INFINITY;
            }
            let g = p.win(x.shape()).unwrap();
            let lay = MaxLayout::new(&g).expect("small layout");
            let xs = x.as_slice().unwrap();
            let ohw = g.oh * g.ow;
            for xp in xs.chunks(g.h * g.w) {
                let (mut y1, mut a1) = (vec![0.0f32; ohw], vec![u32::MAX; ohw]);
                let (mut y2, mut a2) = (vec![0.0f32; ohw], vec![u32::MAX; ohw]);
                max_plane(&g, &lay, xp, &mut y1, &mut a1, &mut MaxScratch::default());
                max_plane_direct(&g, xp, &mut y2, &mut a2);
                assert_eq!(a1, a2, "{k:?} {st:?} {pads:?} {dil:?}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y1), bits(&y2), "{k:?} {st:?} {pads:?} {dil:?}");
            }
        }
    }

    #[test]
    fn max_window_of_only_neg_infinity_takes_its_first_input_element() {
        // 3x3 stride 2 pad 1 over a 3x4 plane whose top-left 2x2 is -inf: output (0, 0)'s
        // window holds only -inf (and padding); it must take the first input element in
        // window order, (0, 0), not the padding and not "no element" (0, no gradient).
        let p = maxp([3, 3], [2, 2], [1; 4], [1, 1], false);
        let ninf = f32::NEG_INFINITY;
        let x = Array4::from_shape_vec(
            (1, 1, 3, 4),
            vec![
                ninf, ninf, 2.0, 1.0, ninf, ninf, 3.0, 0.5, 4.0, 5.0, 6.0, 7.0,
            ],
        )
        .unwrap();
        let (y, saved) = p.forward(x.view()).unwrap();
        assert_eq!(y.as_slice().unwrap(), &[ninf, 3.0, 5.0, 7.0]);
        assert_eq!(saved.argmax, vec![0, 6, 9, 11]);
        let dy = Array4::from_shape_vec((1, 1, 2, 2), vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let dx = p.backward(&saved, dy.view()).unwrap();
        let mut want = [0.0f32; 12];
        (want[0], want[6], want[9], want[11]) = (1.0, 2.0, 3.0, 4.0);
        assert_eq!(dx.as_slice().unwrap(), &want[..]);
    }

    /// The 2x2 fast path against the cell path, bit for bit: even and odd sizes (the last
    /// row / column left out), with ceil_mode on even sizes (the same windows), negative zeros
    /// in the output gradient; and that padded or 3x3 pools do not take it.
    #[test]
    fn avg_2x2_fast_path_equals_the_cell_path_bitwise() {
        let mut rng = Rng::new(77);
        for (shape, ceil) in [
            ([2, 3, 8, 6], false),
            ([1, 4, 7, 9], false),
            ([3, 2, 24, 28], false),
            ([2, 2, 6, 4], true),
            ([1, 1, 2, 2], false),
        ] {
            let p = AveragePool2d {
                kernel: [2, 2],
                strides: [2, 2],
                pads: [0; 4],
                ceil_mode: ceil,
                count_include_pad: false,
            };
            let g = p.win(&shape).unwrap();
            assert!(p.halving(&g), "{shape:?}");
            let x = rand_array(&mut rng, shape, -3.0, 3.0)
                .into_dimensionality::<ndarray::Ix4>()
                .unwrap();
            let fast = p.forward(x.view()).unwrap();
            let cells = p.forward_with(&g, x.view(), false).unwrap();
            let bits = |a: &Array4<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&cells), "forward {shape:?}");
            let mut dy = rand_array(&mut rng, fast.shape(), -1.0, 1.0)
                .into_dimensionality::<ndarray::Ix4>()
                .unwrap();
            dy[[0, 0, 0, 0]] = -0.0;
            let fast = p.backward(&shape, dy.view()).unwrap();
            let cells = p.backward_with(&g, dy.view(), false).unwrap();
            assert_eq!(bits(&fast), bits(&cells), "backward {shape:?}");
        }
        let padded = AveragePool2d {
            kernel: [2, 2],
            strides: [2, 2],
            pads: [1, 1, 1, 1],
            ceil_mode: false,
            count_include_pad: false,
        };
        assert!(!padded.halving(&padded.win(&[1, 1, 6, 6]).unwrap()));
        let wide = AveragePool2d {
            kernel: [3, 3],
            ..padded.clone()
        };
        assert!(!wide.halving(&wide.win(&[1, 1, 6, 6]).unwrap()));
        let ceil_odd = AveragePool2d {
            pads: [0; 4],
            ceil_mode: true,
            ..padded
        };
        assert!(!ceil_odd.halving(&ceil_odd.win(&[1, 1, 7, 7]).unwrap()));
    }

    #[test]
    fn avg_2x2_stride2() {
        check_avg(avgp([2, 2], [2, 2], [0; 4], false, false), [3, 2, 6, 8], 7);
    }

    #[test]
    fn avg_3x3_pad1_excluding_pad() {
        check_avg(avgp([3, 3], [1, 1], [1; 4], false, false), [3, 2, 5, 6], 8);
    }

    #[test]
    fn avg_3x3_pad1_including_pad() {
        check_avg(avgp([3, 3], [2, 2], [1; 4], false, true), [3, 2, 7, 6], 9);
    }

    #[test]
    fn avg_asymmetric_pads() {
        check_avg(
            avgp([2, 3], [1, 2], [0, 2, 1, 1], false, true),
            [3, 2, 5, 7],
            10,
        );
        check_avg(
            avgp([2, 3], [1, 2], [0, 2, 1, 1], false, false),
            [3, 2, 5, 7],
            11,
        );
    }

    #[test]
    fn avg_ceil_mode_with_and_without_pad_count() {
        check_avg(avgp([3, 3], [2, 2], [1; 4], true, true), [3, 2, 6, 5], 12);
        check_avg(avgp([3, 3], [2, 2], [0; 4], true, true), [3, 2, 6, 8], 13);
        check_avg(avgp([3, 3], [2, 2], [1; 4], true, false), [3, 2, 6, 5], 14);
    }

    /// PyTorch's divisor rule, worked by hand from its kernel (`hend = min(hstart + k, H + pad)`,
    /// divisor taken before clipping to the input): `avg_pool2d(ones(1,1,6,6), 3, 2, padding=1,
    /// ceil_mode=True, count_include_pad=True)` is 4x4 with corner 4/9 and, where the last window
    /// hangs past the padding, 2/6.
    #[test]
    fn avg_ceil_mode_divisor_matches_pytorch() {
        let p = avgp([3, 3], [2, 2], [1; 4], true, true);
        let y = p.forward(Array4::ones((1, 1, 6, 6)).view()).unwrap();
        assert_eq!(y.shape(), &[1, 1, 4, 4]);
        assert!((y[[0, 0, 0, 0]] - 4.0 / 9.0).abs() < 1e-6);
        assert!((y[[0, 0, 1, 1]] - 1.0).abs() < 1e-6);
        assert!((y[[0, 0, 0, 3]] - 2.0 / 6.0).abs() < 1e-6);
        assert!((y[[0, 0, 3, 3]] - 1.0 / 4.0).abs() < 1e-6);
        let excl = avgp([3, 3], [2, 2], [1; 4], true, false);
        let y = excl.forward(Array4::ones((1, 1, 6, 6)).view()).unwrap();
        assert!(y.iter().all(|&v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn global_average() {
        let p = GlobalAveragePool;
        let mut rng = Rng::new(15);
        let x = rand_array(&mut rng, [3, 4, 5, 7], -1.0, 1.0);
        let y = p.forward(x.view()).unwrap();
        assert_close(
            "forward",
            &y.view(),
            &p.reference(x.view()).unwrap().view(),
            1e-6,
        );
        let r = rand_array(&mut rng, [3, 4, 1, 1], -1.0, 1.0);
        let dx = p.backward(&[3, 4, 5, 7], r.view()).unwrap();
        let r64 = to_f64(&r.view());
        let fd = fd_grad(&to_f64(&x.view()), |x| {
            dot_loss(&p.reference(x.view()).unwrap(), &r64)
        });
        assert_grad("dx", &dx.view(), &fd.view());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let p = maxp([3, 3], [1, 1], [0; 4], [1, 1], false);
        assert!(matches!(
            p.output_shape(&[1, 1, 2, 5]),
            Err(EngineError::Shape { .. })
        ));
        assert!(matches!(
            p.output_shape(&[1, 1, 5]),
            Err(EngineError::Shape { .. })
        ));
        let zero_stride = maxp([3, 3], [0, 1], [0; 4], [1, 1], false);
        assert!(matches!(
            zero_stride.output_shape(&[1, 1, 5, 5]),
            Err(EngineError::Attribute { .. })
        ));
        let a = avgp([2, 2], [2, 2], [0; 4], false, false);
        let dy = Array4::<f32>::zeros((1, 1, 3, 3));
        assert!(a.backward(&[1, 1, 4, 4], dy.view()).is_err());
        assert!(GlobalAveragePool.output_shape(&[1, 2, 0, 3]).is_err());
        let gdy = Array4::<f32>::zeros((1, 2, 2, 1));
        assert!(GlobalAveragePool
            .backward(&[1, 2, 3, 3], gdy.view())
            .is_err());
    }
}
