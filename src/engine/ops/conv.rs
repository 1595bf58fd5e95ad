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
//!
//! Three paths, chosen from the attributes:
//! - pointwise (1x1, stride 1, no pads): the image itself is the column matrix, no im2col;
//! - depthwise (one input channel per group): direct loops, since a GEMM with an inner dimension
//!   of `kh*kw` would be all overhead;
//! - everything else: im2col + sgemm per group.
//!
//! Parallelism: rayon over fixed parts of the batch (see the [`super`] module notes); BLAS is
//! single-threaded inside (see [`crate::engine::init`]).

use super::{contiguous, dot, part_len, sum, valid_range, window_out_len};
use crate::engine::{attr_err, init, shape_err, Result};
use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array4, ArrayView1, ArrayView2, ArrayView4, ArrayViewMut2, NdFloat};
use rayon::prelude::*;

const OP: &str = "Conv";

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

/// One tap of a flat-tap geometry (see `Geom::flat_tap`).
struct FlatTap {
    shift: isize,
    rows: (usize, usize),
    cols: (usize, usize),
    span: (usize, usize),
    empty: bool,
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
    path: Path,
}

impl Conv2d {
    /// Output shape `[N, C_out, H_out, W_out]` for input shape `x` and weight shape `w`.
    pub fn output_shape(&self, x: &[usize], w: &[usize]) -> Result<[usize; 4]> {
        let g = self.geom(x, w)?;
        Ok([g.n, g.co, g.oh, g.ow])
    }

    /// Which kernel runs this conv, as a profile label: "Conv 1x1" (one GEMM per image),
    /// "Conv depthwise" (direct loops) or "Conv im2col" (im2col + GEMM). `elrt speed --profile`
    /// splits conv time this way, since the three differ by 10x in GFLOP/s.
    pub fn kernel_label(&self, x: &[usize], w: &[usize]) -> Result<&'static str> {
        Ok(match self.geom(x, w)?.path {
            Path::Pointwise => "Conv 1x1",
            Path::Depthwise => "Conv depthwise",
            Path::Im2col => "Conv im2col",
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
        Ok(Geom {
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
            path,
        })
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
        init();
        let (xs, ws) = (contiguous(&x), contiguous(&w));
        let bias = b.map(|b| b.to_vec());
        let (xlen, ylen) = (g.x_len(), g.y_len());
        let mut y = vec![0.0f32; g.n * ylen];
        let part = part_len(g.n);
        if g.n > 0 {
            y.par_chunks_mut(part * ylen)
                .zip(xs.par_chunks(part * xlen))
                .for_each(|(yp, xp)| {
                    let mut col = vec![0.0f32; g.col_len()];
                    for (yb, xb) in yp.chunks_mut(ylen).zip(xp.chunks(xlen)) {
                        g.forward_image(xb, &ws, bias.as_deref(), yb, &mut col);
                    }
                });
        }
        Ok(Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y)
            .expect("output length follows from the geometry"))
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
        init();
        let (xs, ws, dys) = (contiguous(&x), contiguous(&w), contiguous(&dy));
        let (xlen, ylen) = (g.x_len(), g.y_len());
        let part = part_len(g.n);
        let mut dx = if need_dx {
            vec![0.0f32; g.n * xlen]
        } else {
            Vec::new()
        };
        let dx_parts: Vec<Option<&mut [f32]>> = if need_dx {
            dx.chunks_mut(part * xlen).map(Some).collect()
        } else {
            (0..g.n.div_ceil(part)).map(|_| None).collect()
        };
        let partials: Vec<(Vec<f32>, Vec<f64>)> = dx_parts
            .into_par_iter()
            .zip(xs.par_chunks(part * xlen))
            .zip(dys.par_chunks(part * ylen))
            .map(|((mut dxp, xp), dyp)| {
                let mut dw = vec![0.0f32; ws.len()];
                let mut db = vec![0.0f64; g.co];
                let mut col = vec![0.0f32; g.col_len()];
                let mut dcol = vec![0.0f32; if need_dx { g.col_len() } else { 0 }];
                for (i, (xb, dyb)) in xp.chunks(xlen).zip(dyp.chunks(ylen)).enumerate() {
                    let dxb = dxp.as_deref_mut().map(|d| &mut d[i * xlen..(i + 1) * xlen]);
                    g.backward_image(xb, &ws, dyb, dxb, &mut dw, &mut col, &mut dcol);
                    for (acc, row) in db.iter_mut().zip(dyb.chunks(g.oh * g.ow)) {
                        *acc += f64::from(sum(row));
                    }
                }
                (dw, db)
            })
            .collect();
        let mut dw = vec![0.0f32; ws.len()];
        let mut db = vec![0.0f64; g.co];
        for (pdw, pdb) in &partials {
            dw.iter_mut().zip(pdw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pdb).for_each(|(a, b)| *a += b);
        }
        Ok(Conv2dGrads {
            dx: need_dx.then(|| {
                Array4::from_shape_vec((g.n, g.ci, g.h, g.w), dx)
                    .expect("dx length follows from the geometry")
            }),
            dw: Array4::from_shape_vec(w.raw_dim(), dw).expect("dw has the weight's length"),
            db: db.into_iter().map(|v| v as f32).collect(),
        })
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

fn mat(s: &[f32], rows: usize, cols: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((rows, cols), &s[..rows * cols]).expect("matrix fits its slice")
}

fn mat_mut(s: &mut [f32], rows: usize, cols: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((rows, cols), &mut s[..rows * cols]).expect("matrix fits its slice")
}

impl Geom {
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

    /// Column offsets of tap `(ki, kj)`: input row/col = output index * stride + offset.
    fn tap_offsets(&self, ki: usize, kj: usize) -> (isize, isize) {
        (
            (ki * self.dh) as isize - self.pt as isize,
            (kj * self.dw) as isize - self.pl as isize,
        )
    }

    /// Whether a tap's column row is the input plane shifted by one flat offset: stride 1 and an
    /// output as wide as the input ("same" padding), the common 3x3 case. Then im2col is one
    /// contiguous copy per tap plus a few zeroed border columns, instead of a copy and two fills
    /// per output row; measured on ResNet-20 (1 thread, AVX-512 OpenBLAS), the per-row version
    /// with its small memcpy/memset calls took about a fifth of a training step.
    fn flat_taps(&self) -> bool {
        self.sh == 1 && self.sw == 1 && self.ow == self.w
    }

    /// For tap `(ki, kj)` in a [`Self::flat_taps`] geometry: the flat shift `s` (column `j` of
    /// the tap's row reads input `j + s`), the valid output rows and columns, and the range of
    /// `j` whose source lies inside the plane.
    fn flat_tap(&self, ki: usize, kj: usize) -> FlatTap {
        let (yoff, xoff) = self.tap_offsets(ki, kj);
        let (ylo, yhi) = valid_range(self.oh, self.h, 1, yoff);
        let (xlo, xhi) = valid_range(self.ow, self.w, 1, xoff);
        let shift = yoff * self.w as isize + xoff;
        let hw = (self.h * self.w) as isize;
        let (a, b) = ((ylo * self.ow) as isize, (yhi * self.ow) as isize);
        let lo = a.max(-shift).min(b);
        let hi = b.min(hw - shift).max(lo);
        FlatTap {
            shift,
            rows: (ylo, yhi),
            cols: (xlo, xhi),
            span: (lo as usize, hi as usize),
            empty: ylo >= yhi || xlo >= xhi,
        }
    }

    /// Every tap's [`FlatTap`], in column-row order; the same for every channel, so computed once
    /// per image rather than once per channel and tap.
    fn flat_taps_all(&self) -> Vec<FlatTap> {
        (0..self.kh * self.kw)
            .map(|t| self.flat_tap(t / self.kw, t % self.kw))
            .collect()
    }

    /// Zeroes the entries of one flat tap row that lie outside the valid output region.
    fn zero_outside(&self, t: &FlatTap, row: &mut [f32]) {
        let (ylo, yhi) = t.rows;
        let (xlo, xhi) = t.cols;
        let ow = self.ow;
        row[..ylo * ow].fill(0.0);
        row[yhi * ow..].fill(0.0);
        if xlo == 0 && xhi == ow {
            return;
        }
        // Column by column with a stride of one row: a 3x3 kernel has one such column per side,
        // and this order keeps the compiler from turning each one-entry run into a memset call.
        let band = &mut row[ylo * ow..yhi * ow];
        for ox in (0..xlo).chain(xhi..ow) {
            band[ox..].iter_mut().step_by(ow).for_each(|v| *v = 0.0);
        }
    }

    /// Column matrix of one image (see [`Self::im2col_rows`]), through flat taps where possible.
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        if !self.flat_taps() {
            return self.im2col_rows(x, col);
        }
        let (ohw, hw) = (self.oh * self.ow, self.h * self.w);
        let taps = self.flat_taps_all();
        for (c, plane) in x.chunks(hw).enumerate() {
            for (t, tap) in taps.iter().enumerate() {
                let r = c * taps.len() + t;
                let row = &mut col[r * ohw..(r + 1) * ohw];
                if tap.empty {
                    row.fill(0.0);
                    continue;
                }
                let (lo, hi) = tap.span;
                let src = (lo as isize + tap.shift) as usize;
                row[lo..hi].copy_from_slice(&plane[src..src + (hi - lo)]);
                self.zero_outside(tap, row);
            }
        }
    }

    /// Adjoint of [`Self::im2col`]: scatter-adds `col` into `dx` (which the caller zeroed). `col`
    /// is scratch: the flat path zeroes its entries outside the valid region first, so that one
    /// contiguous add per tap carries nothing into the wrong pixel.
    fn col2im(&self, col: &mut [f32], dx: &mut [f32]) {
        if !self.flat_taps() {
            return self.col2im_rows(col, dx);
        }
        let (ohw, hw) = (self.oh * self.ow, self.h * self.w);
        let taps = self.flat_taps_all();
        for (c, plane) in dx.chunks_mut(hw).enumerate() {
            for (t, tap) in taps.iter().enumerate() {
                let r = c * taps.len() + t;
                let row = &mut col[r * ohw..(r + 1) * ohw];
                if tap.empty {
                    continue;
                }
                self.zero_outside(tap, row);
                let (lo, hi) = tap.span;
                let dst = (lo as isize + tap.shift) as usize;
                plane[dst..dst + (hi - lo)]
                    .iter_mut()
                    .zip(&row[lo..hi])
                    .for_each(|(d, s)| *d += s);
            }
        }
    }

    /// `col[(c, ki, kj), (oy, ox)] = x[c, oy*sh + ki*dh - pt, ox*sw + kj*dw - pl]`, zero in the
    /// pads; row by row, for any geometry (the flat path's reference in the tests).
    fn im2col_rows(&self, x: &[f32], col: &mut [f32]) {
        let (ohw, hw) = (self.oh * self.ow, self.h * self.w);
        for (c, plane) in x.chunks(hw).enumerate() {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let (yoff, xoff) = self.tap_offsets(ki, kj);
                    let (ylo, yhi) = valid_range(self.oh, self.h, self.sh, yoff);
                    let (xlo, xhi) = valid_range(self.ow, self.w, self.sw, xoff);
                    let r = (c * self.kh + ki) * self.kw + kj;
                    let row = &mut col[r * ohw..(r + 1) * ohw];
                    if ylo >= yhi || xlo >= xhi {
                        // The tap misses the input (e.g. a dilated kernel wider than it).
                        row.fill(0.0);
                        continue;
                    }
                    row[..ylo * self.ow].fill(0.0);
                    row[yhi * self.ow..].fill(0.0);
                    for oy in ylo..yhi {
                        let iy = ((oy * self.sh) as isize + yoff) as usize;
                        let src = &plane[iy * self.w..(iy + 1) * self.w];
                        let dst = &mut row[oy * self.ow..(oy + 1) * self.ow];
                        dst[..xlo].fill(0.0);
                        dst[xhi..].fill(0.0);
                        if self.sw == 1 {
                            let start = (xlo as isize + xoff) as usize;
                            dst[xlo..xhi].copy_from_slice(&src[start..start + (xhi - xlo)]);
                        } else {
                            for (ox, d) in dst.iter_mut().enumerate().take(xhi).skip(xlo) {
                                *d = src[((ox * self.sw) as isize + xoff) as usize];
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adjoint of [`Self::im2col_rows`]: scatter-adds `col` into `dx` (which the caller zeroed).
    fn col2im_rows(&self, col: &[f32], dx: &mut [f32]) {
        let (ohw, hw) = (self.oh * self.ow, self.h * self.w);
        for (c, plane) in dx.chunks_mut(hw).enumerate() {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let (yoff, xoff) = self.tap_offsets(ki, kj);
                    let (ylo, yhi) = valid_range(self.oh, self.h, self.sh, yoff);
                    let (xlo, xhi) = valid_range(self.ow, self.w, self.sw, xoff);
                    let r = (c * self.kh + ki) * self.kw + kj;
                    let row = &col[r * ohw..(r + 1) * ohw];
                    if xlo >= xhi {
                        continue;
                    }
                    for oy in ylo..yhi {
                        let iy = ((oy * self.sh) as isize + yoff) as usize;
                        let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                        let src = &row[oy * self.ow..(oy + 1) * self.ow];
                        if self.sw == 1 {
                            let start = (xlo as isize + xoff) as usize;
                            dst[start..start + (xhi - xlo)]
                                .iter_mut()
                                .zip(&src[xlo..xhi])
                                .for_each(|(d, s)| *d += s);
                        } else {
                            for (ox, s) in src.iter().enumerate().take(xhi).skip(xlo) {
                                dst[((ox * self.sw) as isize + xoff) as usize] += s;
                            }
                        }
                    }
                }
            }
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

    /// Visits every tap `(ki, kj)` and valid output row `oy` of a depthwise plane, handing over
    /// the input row index and the valid output column range, so the three depthwise kernels
    /// share one piece of window arithmetic.
    fn for_each_tap_row(&self, mut f: impl FnMut(usize, usize, usize, (usize, usize), isize)) {
        for ki in 0..self.kh {
            for kj in 0..self.kw {
                let (yoff, xoff) = self.tap_offsets(ki, kj);
                let (ylo, yhi) = valid_range(self.oh, self.h, self.sh, yoff);
                let xr = valid_range(self.ow, self.w, self.sw, xoff);
                for oy in ylo..yhi {
                    let iy = ((oy * self.sh) as isize + yoff) as usize;
                    f(ki * self.kw + kj, oy, iy, xr, xoff);
                }
            }
        }
    }

    /// Padded width and height of a stride-1 plane, and the length of one flat tap: with the
    /// input zero-padded to `hp x wp` and the output computed at width `wp` (its last `wp - ow`
    /// columns are junk, dropped when cropping), tap `(ki, kj)` is the contiguous slice starting at
    /// `ki*dh*wp + kj*dw`. One long axpy per tap instead of `oh` short row loops: on 8x8 planes
    /// the row loops are all overhead.
    fn flat_geometry(&self) -> (usize, usize, usize) {
        let hp = self.oh + (self.kh - 1) * self.dh;
        let wp = self.ow + (self.kw - 1) * self.dw;
        (hp, wp, (self.oh - 1) * wp + self.ow)
    }

    fn flat_shift(&self, t: usize, wp: usize) -> usize {
        (t / self.kw) * self.dh * wp + (t % self.kw) * self.dw
    }

    /// Copies `plane` into the interior of `padded`; the border is never written, so it stays 0.
    fn pad_plane(&self, plane: &[f32], wp: usize, padded: &mut [f32]) {
        for (iy, row) in plane.chunks(self.w).enumerate() {
            padded[(iy + self.pt) * wp + self.pl..][..self.w].copy_from_slice(row);
        }
    }

    /// Stride-1 depthwise forward for one image via flat taps; `y` holds the bias on entry.
    fn depthwise_forward_flat(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        self.depthwise_forward_flat_with(x, w, y, true)
    }

    /// [`Self::depthwise_forward_flat`]; `fused: false` keeps to the generic per-tap passes (the
    /// test oracle of [`Self::depthwise_rows`]).
    fn depthwise_forward_flat_with(&self, x: &[f32], w: &[f32], y: &mut [f32], fused: bool) {
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        let (hp, wp, len) = self.flat_geometry();
        let mut xpad = vec![0.0f32; hp * wp];
        let mut wide = vec![0.0f32; len];
        for (ic, plane) in x.chunks(hw).enumerate() {
            self.pad_plane(plane, wp, &mut xpad);
            for oc in ic * self.cog..(ic + 1) * self.cog {
                let (wk, yp) = (&w[oc * taps..][..taps], &mut y[oc * ohw..][..ohw]);
                match taps {
                    _ if !fused => {}
                    3 => {
                        self.depthwise_rows::<3>(&xpad, wp, wk, yp);
                        continue;
                    }
                    9 => {
                        self.depthwise_rows::<9>(&xpad, wp, wk, yp);
                        continue;
                    }
                    _ => {}
                }
                wide.fill(0.0);
                for (t, &wv) in w[oc * taps..][..taps].iter().enumerate() {
                    let src = &xpad[self.flat_shift(t, wp)..][..len];
                    wide.iter_mut().zip(src).for_each(|(o, &i)| *o += wv * i);
                }
                for (oy, yrow) in y[oc * ohw..][..ohw].chunks_mut(self.ow).enumerate() {
                    yrow.iter_mut()
                        .zip(&wide[oy * wp..])
                        .for_each(|(o, &v)| *o += v);
                }
            }
        }
    }

    /// One output channel of [`Self::depthwise_forward_flat`] for a kernel of `T` taps (3: CP's
    /// kx1 and 1xk factors; 9: 3x3) in one pass, straight into `y`'s rows: the generic path
    /// makes a pass over a wide buffer per tap, then one more to copy it out, which for three
    /// taps is as much traffic as arithmetic. Adds the taps in the same order, from 0, before
    /// adding to `y`, so results are bitwise those of the generic path.
    fn depthwise_rows<const T: usize>(&self, xpad: &[f32], wp: usize, wk: &[f32], yp: &mut [f32]) {
        let wv: [f32; T] = std::array::from_fn(|t| wk[t]);
        let shifts: [usize; T] = std::array::from_fn(|t| self.flat_shift(t, wp));
        let ow = self.ow;
        for (oy, yrow) in yp.chunks_exact_mut(ow).enumerate() {
            let src: [&[f32]; T] = std::array::from_fn(|t| &xpad[oy * wp + shifts[t]..][..ow]);
            for (ox, o) in yrow.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for t in 0..T {
                    acc += wv[t] * src[t][ox];
                }
                *o += acc;
            }
        }
    }

    /// Stride-1 depthwise backward for one image via flat taps: adds to `dw`, writes `dx`.
    fn depthwise_backward_flat(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        let (hp, wp, len) = self.flat_geometry();
        let mut xpad = vec![0.0f32; hp * wp];
        // Junk columns of the wide gradient are never written, so they stay 0 and add nothing.
        let mut dy_wide = vec![0.0f32; len];
        let mut dxpad = vec![0.0f32; if dx.is_some() { hp * wp } else { 0 }];
        for (ic, plane) in x.chunks(hw).enumerate() {
            self.pad_plane(plane, wp, &mut xpad);
            dxpad.fill(0.0);
            for oc in ic * self.cog..(ic + 1) * self.cog {
                for (oy, row) in dy[oc * ohw..][..ohw].chunks(self.ow).enumerate() {
                    dy_wide[oy * wp..][..self.ow].copy_from_slice(row);
                }
                for t in 0..taps {
                    let shift = self.flat_shift(t, wp);
                    dw[oc * taps + t] += dot(&dy_wide, &xpad[shift..][..len]);
                    if dx.is_some() {
                        let wv = w[oc * taps + t];
                        dxpad[shift..][..len]
                            .iter_mut()
                            .zip(&dy_wide)
                            .for_each(|(d, &g)| *d += wv * g);
                    }
                }
            }
            if let Some(dx) = dx.as_deref_mut() {
                for (iy, row) in dx[ic * hw..][..hw].chunks_mut(self.w).enumerate() {
                    row.copy_from_slice(&dxpad[(iy + self.pt) * wp + self.pl..][..self.w]);
                }
            }
        }
    }

    /// Depthwise forward for one image; `y` holds the bias (or zeros) on entry.
    fn depthwise_forward(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        if self.sh == 1 && self.sw == 1 {
            return self.depthwise_forward_flat(x, w, y);
        }
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        for (oc, yp) in y.chunks_mut(ohw).enumerate() {
            let xp = &x[(oc / self.cog) * hw..][..hw];
            let wk = &w[oc * taps..][..taps];
            self.for_each_tap_row(|t, oy, iy, (xlo, xhi), xoff| {
                let wv = wk[t];
                let xrow = &xp[iy * self.w..][..self.w];
                let yrow = &mut yp[oy * self.ow..][..self.ow];
                if self.sw == 1 {
                    let start = (xlo as isize + xoff) as usize;
                    yrow[xlo..xhi]
                        .iter_mut()
                        .zip(&xrow[start..])
                        .for_each(|(o, &i)| *o += wv * i);
                } else {
                    for (ox, o) in yrow.iter_mut().enumerate().take(xhi).skip(xlo) {
                        *o += wv * xrow[((ox * self.sw) as isize + xoff) as usize];
                    }
                }
            });
        }
    }

    /// Depthwise backward for one image: adds to `dw`, writes `dx` (zeroed) when given.
    fn depthwise_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        if self.sh == 1 && self.sw == 1 {
            return self.depthwise_backward_flat(x, w, dy, dx, dw);
        }
        let (hw, ohw, taps) = (self.h * self.w, self.oh * self.ow, self.kh * self.kw);
        for (oc, dyp) in dy.chunks(ohw).enumerate() {
            let ic = oc / self.cog;
            let xp = &x[ic * hw..][..hw];
            let wk = &w[oc * taps..][..taps];
            let dwk = &mut dw[oc * taps..][..taps];
            let mut dxp = dx.as_deref_mut().map(|d| &mut d[ic * hw..][..hw]);
            self.for_each_tap_row(|t, oy, iy, (xlo, xhi), xoff| {
                let dyrow = &dyp[oy * self.ow..][..self.ow];
                let xrow = &xp[iy * self.w..][..self.w];
                if self.sw == 1 {
                    let start = (xlo as isize + xoff) as usize;
                    let n = xhi - xlo;
                    dwk[t] += dot(&dyrow[xlo..xhi], &xrow[start..start + n]);
                    if let Some(dxp) = dxp.as_deref_mut() {
                        let wv = wk[t];
                        dxp[iy * self.w + start..][..n]
                            .iter_mut()
                            .zip(&dyrow[xlo..xhi])
                            .for_each(|(d, &g)| *d += wv * g);
                    }
                } else {
                    let mut acc = 0.0f32;
                    for (ox, &g) in dyrow.iter().enumerate().take(xhi).skip(xlo) {
                        let ix = ((ox * self.sw) as isize + xoff) as usize;
                        acc += g * xrow[ix];
                        if let Some(dxp) = dxp.as_deref_mut() {
                            dxp[iy * self.w + ix] += wk[t] * g;
                        }
                    }
                    dwk[t] += acc;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;
    use crate::engine::EngineError;
    use ndarray::{Array1, Array4, Axis};

    fn conv(group: usize, strides: [usize; 2], pads: [usize; 4], dilations: [usize; 2]) -> Conv2d {
        Conv2d {
            group,
            strides,
            pads,
            dilations,
        }
    }

    /// Fast forward against the reference, then every gradient against f64 finite differences of
    /// `sum(reference(x, w, b) * r)`.
    fn check(c: &Conv2d, xs: [usize; 4], ws: [usize; 4], bias: bool, expect: Path, seed: u64) {
        let g = c.geom(&xs, &ws).unwrap();
        assert_eq!(g.path, expect, "path chosen for {c:?}");
        let mut rng = Rng::new(seed);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let b = bias.then(|| rand_array(&mut rng, ws[0], -1.0, 1.0));
        let y = c
            .forward(x.view(), w.view(), b.as_ref().map(|b| b.view()))
            .unwrap();
        let yr = c
            .reference(x.view(), w.view(), b.as_ref().map(|b| b.view()))
            .unwrap();
        assert_eq!(y.shape(), c.output_shape(&xs, &ws).unwrap());
        assert_close("forward", &y.view(), &yr.view(), 1e-5);

        let r = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
        let grads = c.backward(x.view(), w.view(), r.view(), true).unwrap();
        let (x64, w64, r64) = (to_f64(&x.view()), to_f64(&w.view()), to_f64(&r.view()));
        let b64 = b.as_ref().map(|b| to_f64(&b.view()));
        let loss = |x: &Array4<f64>, w: &Array4<f64>, b: Option<&Array1<f64>>| {
            dot_loss(
                &c.reference(x.view(), w.view(), b.map(|b| b.view()))
                    .unwrap(),
                &r64,
            )
        };
        let fdx = fd_grad(&x64, |x| loss(x, &w64, b64.as_ref()));
        assert_grad("dx", &grads.dx.as_ref().unwrap().view(), &fdx.view());
        let fdw = fd_grad(&w64, |w| loss(&x64, w, b64.as_ref()));
        assert_grad("dw", &grads.dw.view(), &fdw.view());
        if let Some(b64) = &b64 {
            let fdb = fd_grad(b64, |b| loss(&x64, &w64, Some(b)));
            assert_grad("db", &grads.db.view(), &fdb.view());
        }
        // Without dx the weight gradient is unchanged.
        let no_dx = c.backward(x.view(), w.view(), r.view(), false).unwrap();
        assert!(no_dx.dx.is_none());
        assert_eq!(no_dx.dw, grads.dw);
    }

    #[test]
    fn k3_pad1_group1_with_bias() {
        check(
            &conv(1, [1, 1], [1, 1, 1, 1], [1, 1]),
            [3, 5, 7, 6],
            [4, 5, 3, 3],
            true,
            Path::Im2col,
            1,
        );
    }

    #[test]
    fn k3_no_pad_no_bias() {
        check(
            &conv(1, [1, 1], [0; 4], [1, 1]),
            [3, 3, 6, 7],
            [5, 3, 3, 3],
            false,
            Path::Im2col,
            2,
        );
    }

    #[test]
    fn stride2_asymmetric_pads() {
        check(
            &conv(1, [2, 2], [1, 0, 2, 1], [1, 1]),
            [3, 4, 7, 9],
            [6, 4, 3, 3],
            true,
            Path::Im2col,
            3,
        );
    }

    #[test]
    fn dilation2() {
        check(
            &conv(1, [1, 1], [2, 2, 2, 2], [2, 2]),
            [3, 3, 7, 6],
            [4, 3, 3, 3],
            true,
            Path::Im2col,
            4,
        );
    }

    #[test]
    fn rectangular_kernel_mixed_strides_and_dilations() {
        check(
            &conv(1, [2, 1], [0, 1, 1, 0], [1, 2]),
            [3, 3, 8, 7],
            [4, 3, 3, 2],
            true,
            Path::Im2col,
            5,
        );
    }

    #[test]
    fn pointwise_plain_gemm() {
        check(
            &conv(1, [1, 1], [0; 4], [1, 1]),
            [3, 6, 5, 7],
            [9, 6, 1, 1],
            true,
            Path::Pointwise,
            6,
        );
    }

    #[test]
    fn pointwise_grouped() {
        check(
            &conv(2, [1, 1], [0; 4], [1, 1]),
            [3, 6, 5, 3],
            [4, 3, 1, 1],
            true,
            Path::Pointwise,
            7,
        );
    }

    #[test]
    fn pointwise_stride2_goes_through_im2col() {
        check(
            &conv(1, [2, 2], [0; 4], [1, 1]),
            [3, 5, 7, 6],
            [8, 5, 1, 1],
            false,
            Path::Im2col,
            8,
        );
    }

    #[test]
    fn grouped2_k3_stride2() {
        check(
            &conv(2, [2, 2], [1, 1, 1, 1], [1, 1]),
            [3, 4, 7, 5],
            [6, 2, 3, 3],
            true,
            Path::Im2col,
            9,
        );
    }

    #[test]
    fn grouped4_dilated() {
        check(
            &conv(4, [1, 1], [2, 1, 0, 2], [2, 2]),
            [3, 8, 6, 5],
            [8, 2, 3, 3],
            false,
            Path::Im2col,
            10,
        );
    }

    #[test]
    fn depthwise_k3_pad1() {
        check(
            &conv(5, [1, 1], [1, 1, 1, 1], [1, 1]),
            [3, 5, 7, 6],
            [5, 1, 3, 3],
            true,
            Path::Depthwise,
            11,
        );
    }

    #[test]
    fn depthwise_stride2_asymmetric_pads() {
        check(
            &conv(4, [2, 2], [0, 1, 1, 2], [1, 1]),
            [3, 4, 9, 7],
            [4, 1, 3, 3],
            true,
            Path::Depthwise,
            12,
        );
    }

    #[test]
    fn depthwise_dilation2_no_bias() {
        check(
            &conv(3, [1, 1], [2, 2, 2, 2], [2, 2]),
            [3, 3, 7, 8],
            [3, 1, 3, 3],
            false,
            Path::Depthwise,
            13,
        );
    }

    #[test]
    fn depthwise_channel_multiplier2() {
        check(
            &conv(3, [1, 2], [1, 1, 1, 1], [1, 1]),
            [3, 3, 6, 7],
            [6, 1, 3, 3],
            true,
            Path::Depthwise,
            14,
        );
    }

    #[test]
    fn depthwise_multiplier3_stride1_asymmetric_dilated() {
        check(
            &conv(2, [1, 1], [2, 0, 1, 3], [2, 1]),
            [3, 2, 7, 6],
            [6, 1, 3, 2],
            true,
            Path::Depthwise,
            22,
        );
    }

    /// Vertical stride only: the row loops with contiguous rows (the flat path needs stride 1).
    #[test]
    fn depthwise_vertical_stride2() {
        check(
            &conv(3, [2, 1], [1, 2, 0, 1], [1, 1]),
            [3, 3, 8, 6],
            [3, 1, 3, 3],
            true,
            Path::Depthwise,
            23,
        );
    }

    #[test]
    fn depthwise_k5_stride2() {
        check(
            &conv(4, [2, 2], [2, 2, 2, 2], [1, 1]),
            [3, 4, 9, 8],
            [4, 1, 5, 5],
            true,
            Path::Depthwise,
            15,
        );
    }

    #[test]
    fn single_input_channel_is_plain_conv() {
        check(
            &conv(1, [1, 1], [1, 1, 1, 1], [1, 1]),
            [3, 1, 6, 5],
            [4, 1, 3, 3],
            true,
            Path::Im2col,
            16,
        );
    }

    /// ResNet-20's first layer and a wider layer, forward only (FD would be slow): exercises long
    /// rows and the BLAS path with many parts of the batch.
    #[test]
    fn resnet_sized_forward_matches_reference() {
        let mut rng = Rng::new(17);
        for (c, xs, ws) in [
            (
                conv(1, [1, 1], [1; 4], [1, 1]),
                [17, 3, 32, 32],
                [16, 3, 3, 3],
            ),
            (
                conv(1, [2, 2], [1; 4], [1, 1]),
                [5, 16, 16, 16],
                [32, 16, 3, 3],
            ),
            (
                conv(1, [1, 1], [0; 4], [1, 1]),
                [5, 32, 8, 8],
                [64, 32, 1, 1],
            ),
            (
                conv(32, [1, 1], [1; 4], [1, 1]),
                [5, 32, 8, 8],
                [32, 1, 3, 3],
            ),
        ] {
            let x = rand_array(&mut rng, xs, -1.0, 1.0);
            let w = rand_array(&mut rng, ws, -1.0, 1.0);
            let b = rand_array(&mut rng, ws[0], -1.0, 1.0);
            let y = c.forward(x.view(), w.view(), Some(b.view())).unwrap();
            let yr = c.reference(x.view(), w.view(), Some(b.view())).unwrap();
            assert_close("forward", &y.view(), &yr.view(), 1e-5);
        }
    }

    #[test]
    fn non_standard_layout_inputs_are_accepted() {
        let mut rng = Rng::new(18);
        let c = conv(1, [1, 1], [1; 4], [1, 1]);
        let x = rand_array(&mut rng, [4, 3, 5, 6], -1.0, 1.0);
        let w = rand_array(&mut rng, [4, 3, 3, 3], -1.0, 1.0);
        // Same logical tensor stored NHWC-style: permuted view of a permuted copy.
        let x_nhwc = x
            .view()
            .permuted_axes([0, 2, 3, 1])
            .as_standard_layout()
            .into_owned();
        let x_view = x_nhwc.view().permuted_axes([0, 3, 1, 2]);
        assert!(!x_view.is_standard_layout());
        let y = c.forward(x_view, w.view(), None).unwrap();
        let yr = c.forward(x.view(), w.view(), None).unwrap();
        assert_eq!(y, yr);
    }

    /// Weight gradients are summed over a fixed partition of the batch, so they must not depend
    /// on how many threads ran or how work was stolen.
    #[test]
    fn backward_is_bitwise_reproducible_across_thread_counts() {
        let mut rng = Rng::new(19);
        let c = conv(1, [1, 1], [1; 4], [1, 1]);
        let x = rand_array(&mut rng, [37, 8, 8, 8], -1.0, 1.0);
        let w = rand_array(&mut rng, [16, 8, 3, 3], -1.0, 1.0);
        let dy = rand_array(&mut rng, [37, 16, 8, 8], -1.0, 1.0);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| c.backward(x.view(), w.view(), dy.view(), true).unwrap())
        };
        let (a, b) = (run(1), run(3));
        assert_eq!(a.dw, b.dw);
        assert_eq!(a.db, b.db);
        assert_eq!(a.dx, b.dx);
    }

    /// The FD tests use batch 3, one image per part; this covers parts of several images (scratch
    /// buffers reused across images, weight gradients accumulated): the batch's gradients must
    /// equal the per-image ones, summed for the weights.
    #[test]
    fn batched_backward_equals_per_image_backward() {
        let mut rng = Rng::new(21);
        for (c, xs, ws) in [
            (conv(1, [1, 1], [1; 4], [1, 1]), [37, 4, 6, 5], [6, 4, 3, 3]),
            (
                conv(2, [2, 1], [0, 1, 1, 0], [1, 2]),
                [37, 4, 7, 6],
                [6, 2, 3, 2],
            ),
            (conv(1, [1, 1], [0; 4], [1, 1]), [37, 8, 3, 5], [9, 8, 1, 1]),
            (conv(4, [1, 2], [1; 4], [1, 1]), [37, 4, 6, 7], [8, 1, 3, 3]),
            (conv(4, [1, 1], [1; 4], [1, 1]), [37, 4, 6, 7], [8, 1, 3, 3]),
        ] {
            let x = rand_array(&mut rng, xs, -1.0, 1.0);
            let w = rand_array(&mut rng, ws, -1.0, 1.0);
            let dy = rand_array(&mut rng, c.output_shape(&xs, &ws).unwrap(), -1.0, 1.0);
            let all = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
            let mut dw = Array4::<f32>::zeros(w.raw_dim());
            let mut db = Array1::<f32>::zeros(ws[0]);
            for i in 0..xs[0] {
                let one = |a: &Array4<f32>| a.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
                let g = c
                    .backward(one(&x).view(), w.view(), one(&dy).view(), true)
                    .unwrap();
                let dxi = one(all.dx.as_ref().unwrap());
                assert_close("dx", &dxi.view(), &g.dx.unwrap().view(), 1e-6);
                dw += &g.dw;
                db += &g.db;
            }
            assert_close("dw", &all.dw.view(), &dw.view(), 1e-5);
            assert_close("db", &all.db.view(), &db.view(), 1e-5);
        }
    }

    #[test]
    fn empty_batch_gives_empty_output() {
        let c = Conv2d::default();
        let x = Array4::<f32>::zeros((0, 3, 4, 4));
        let w = Array4::<f32>::zeros((2, 3, 1, 1));
        assert_eq!(
            c.forward(x.view(), w.view(), None).unwrap().shape(),
            &[0, 2, 4, 4]
        );
        let dy = Array4::<f32>::zeros((0, 2, 4, 4));
        let g = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
        assert_eq!(g.dw, Array4::<f32>::zeros((2, 3, 1, 1)));
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        let c = Conv2d::default();
        let shape = |r: Result<[usize; 4]>| matches!(r, Err(EngineError::Shape { .. }));
        let attr = |r: Result<[usize; 4]>| matches!(r, Err(EngineError::Attribute { .. }));
        assert!(shape(c.output_shape(&[1, 3, 8, 8], &[4, 2, 3, 3])));
        assert!(shape(c.output_shape(&[1, 3, 8], &[4, 3, 3, 3])));
        assert!(shape(c.output_shape(&[1, 3, 2, 8], &[4, 3, 3, 3])));
        assert!(shape(c.output_shape(&[1, 0, 8, 8], &[4, 0, 3, 3])));
        assert!(shape(
            conv(2, [1, 1], [0; 4], [1, 1]).output_shape(&[1, 4, 8, 8], &[3, 2, 3, 3])
        ));
        assert!(attr(
            conv(0, [1, 1], [0; 4], [1, 1]).output_shape(&[1, 4, 8, 8], &[4, 4, 3, 3])
        ));
        assert!(attr(
            conv(1, [0, 1], [0; 4], [1, 1]).output_shape(&[1, 4, 8, 8], &[4, 4, 3, 3])
        ));
        assert!(attr(
            conv(1, [1, 1], [0; 4], [1, 0]).output_shape(&[1, 4, 8, 8], &[4, 4, 3, 3])
        ));
        let x = Array4::<f32>::zeros((1, 3, 8, 8));
        let w = Array4::<f32>::zeros((4, 3, 3, 3));
        let b = Array1::<f32>::zeros(5);
        assert!(c.forward(x.view(), w.view(), Some(b.view())).is_err());
        let dy = Array4::<f32>::zeros((1, 4, 8, 8));
        assert!(c.backward(x.view(), w.view(), dy.view(), true).is_err());
    }

    /// The bias gradient is the sum of `dy` over everything but channels.
    #[test]
    fn bias_gradient_is_channel_sum() {
        let mut rng = Rng::new(20);
        let c = Conv2d::default();
        let x = rand_array(&mut rng, [3, 2, 4, 4], -1.0, 1.0);
        let w = rand_array(&mut rng, [5, 2, 1, 1], -1.0, 1.0);
        let dy = rand_array(&mut rng, [3, 5, 4, 4], -1.0, 1.0);
        let g = c.backward(x.view(), w.view(), dy.view(), false).unwrap();
        let want = dy.sum_axis(Axis(0)).sum_axis(Axis(1)).sum_axis(Axis(1));
        assert_close("db", &g.db.view(), &want.view(), 1e-6);
    }

    /// The fused 3- and 9-tap depthwise forward gives bitwise the generic per-tap result.
    #[test]
    fn fused_depthwise_rows_equal_generic_passes_bitwise() {
        let mut rng = Rng::new(21);
        for (ws, pads, dil) in [
            ([6, 1, 3, 1], [1, 0, 1, 0], 1),
            ([6, 1, 1, 3], [0, 1, 0, 1], 1),
            ([6, 1, 3, 3], [1, 1, 1, 1], 1),
            ([6, 1, 3, 3], [2, 2, 2, 2], 2),
            ([12, 1, 3, 3], [0, 1, 2, 1], 1),
        ] {
            let c = conv(6, [1, 1], pads, [dil, dil]);
            let xs = [1, 6, 7, 9];
            let g = c.geom(&xs, &ws).unwrap();
            assert_eq!(g.path, Path::Depthwise);
            let x = rand_array(&mut rng, xs, -1.0, 1.0);
            let w = rand_array(&mut rng, ws, -1.0, 1.0);
            let bias = rand_array(&mut rng, g.y_len(), -1.0, 1.0).to_vec();
            let (mut fused, mut generic) = (bias.clone(), bias);
            let (xv, wv) = (x.as_slice().unwrap(), w.as_slice().unwrap());
            g.depthwise_forward_flat_with(xv, wv, &mut fused, true);
            g.depthwise_forward_flat_with(xv, wv, &mut generic, false);
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fused), bits(&generic), "{ws:?} {pads:?} dil {dil}");
        }
    }

    /// A dilated kernel wider than a tiny input: some taps miss it entirely (this panicked in the
    /// row-by-row im2col before it skipped such taps).
    #[test]
    fn kernel_labels_name_the_path_that_runs() {
        let x = [2, 8, 6, 6];
        let label = |c: Conv2d, w: [usize; 4]| c.kernel_label(&x, &w).unwrap();
        assert_eq!(
            label(conv(1, [1, 1], [0; 4], [1, 1]), [4, 8, 1, 1]),
            "Conv 1x1"
        );
        // A strided or padded 1x1 gathers its pixels through im2col.
        assert_eq!(
            label(conv(1, [2, 2], [0; 4], [1, 1]), [4, 8, 1, 1]),
            "Conv im2col"
        );
        assert_eq!(
            label(conv(1, [1, 1], [1; 4], [1, 1]), [4, 8, 3, 3]),
            "Conv im2col"
        );
        assert_eq!(
            label(conv(8, [1, 1], [1; 4], [1, 1]), [8, 1, 3, 3]),
            "Conv depthwise"
        );
        assert_eq!(
            label(conv(2, [1, 1], [1; 4], [1, 1]), [4, 4, 3, 3]),
            "Conv im2col"
        );
        assert!(conv(3, [1, 1], [0; 4], [1, 1])
            .kernel_label(&x, &[4, 8, 1, 1])
            .is_err());
    }

    #[test]
    fn taps_that_miss_the_input() {
        for (stride, seed) in [(1, 5), (2, 6)] {
            let c = conv(1, [stride, stride], [2; 4], [2, 2]);
            check(&c, [2, 2, 5, 1], [3, 2, 3, 3], true, Path::Im2col, seed);
            check(
                &c,
                [1, 2, 1, 5],
                [2, 2, 3, 3],
                false,
                Path::Im2col,
                seed + 10,
            );
        }
    }

    /// The flat-tap im2col/col2im equal the row-by-row ones wherever they apply, including
    /// asymmetric pads, dilation, kernels as large as the input and taps that miss it entirely.
    #[test]
    fn flat_taps_equal_row_by_row_im2col_and_col2im() {
        let mut rng = Rng::new(11);
        let mut flat_cases = 0;
        for (h, w) in [(1, 1), (2, 3), (5, 4), (7, 7), (6, 9)] {
            for (kh, kw) in [(1, 1), (3, 3), (1, 3), (3, 1), (5, 5), (3, 5)] {
                for dil in [1, 2] {
                    for pads in [
                        [0, 0, 0, 0],
                        [1, 1, 1, 1],
                        [2, 0, 0, 2],
                        [0, 1, 2, 3],
                        [4, 4, 4, 4],
                    ] {
                        let c = conv(1, [1, 1], pads, [dil, dil]);
                        let (xs, ws) = ([1, 2, h, w], [3, 2, kh, kw]);
                        let Ok(g) = c.geom(&xs, &ws) else { continue };
                        if g.path != Path::Im2col || !g.flat_taps() {
                            continue;
                        }
                        flat_cases += 1;
                        let x = rand_array(&mut rng, xs, -1.0, 1.0);
                        let xv = x.as_slice().unwrap();
                        let mut a = vec![f32::NAN; g.col_len()];
                        let mut b = vec![f32::NAN; g.col_len()];
                        g.im2col(xv, &mut a);
                        g.im2col_rows(xv, &mut b);
                        assert_eq!(a, b, "im2col {xs:?} {ws:?} {pads:?} dil {dil}");
                        let col = rand_array(&mut rng, g.col_len(), -1.0, 1.0).to_vec();
                        let (mut da, mut db) = (vec![0.0; g.x_len()], vec![0.0; g.x_len()]);
                        g.col2im(&mut col.clone(), &mut da);
                        g.col2im_rows(&col, &mut db);
                        for (i, (p, q)) in da.iter().zip(&db).enumerate() {
                            assert!((p - q).abs() <= 1e-6, "col2im {xs:?} {ws:?} {pads:?} [{i}]");
                        }
                    }
                }
            }
        }
        assert!(flat_cases > 40, "only {flat_cases} flat geometries tried");
    }

    /// Not a check: prints forward/backward time and GFLOP/s for ResNet-20-sized layers at batch
    /// 128 on 1 and 2 rayon threads. Run with
    /// `cargo test --release --lib conv_speed -- --ignored --nocapture --test-threads=1` on an
    /// otherwise idle machine.
    #[test]
    #[ignore]
    fn conv_speed_report() {
        use std::time::Instant;
        let layers = [
            (
                "stem 3->16 k3 32x32",
                conv(1, [1, 1], [1; 4], [1, 1]),
                [128, 3, 32, 32],
                [16, 3, 3, 3],
            ),
            (
                "16->16 k3 32x32",
                conv(1, [1, 1], [1; 4], [1, 1]),
                [128, 16, 32, 32],
                [16, 16, 3, 3],
            ),
            (
                "16->32 k3 s2 ->16x16",
                conv(1, [2, 2], [1; 4], [1, 1]),
                [128, 16, 32, 32],
                [32, 16, 3, 3],
            ),
            (
                "32->32 k3 16x16",
                conv(1, [1, 1], [1; 4], [1, 1]),
                [128, 32, 16, 16],
                [32, 32, 3, 3],
            ),
            (
                "64->64 k3 8x8",
                conv(1, [1, 1], [1; 4], [1, 1]),
                [128, 64, 8, 8],
                [64, 64, 3, 3],
            ),
            (
                "1x1 64->32 8x8",
                conv(1, [1, 1], [0; 4], [1, 1]),
                [128, 64, 8, 8],
                [32, 64, 1, 1],
            ),
            (
                "1x1 16->8 32x32",
                conv(1, [1, 1], [0; 4], [1, 1]),
                [128, 16, 32, 32],
                [8, 16, 1, 1],
            ),
            (
                "core 8->8 k3 32x32",
                conv(1, [1, 1], [1; 4], [1, 1]),
                [128, 8, 32, 32],
                [8, 8, 3, 3],
            ),
            (
                "dw 64 k3 8x8",
                conv(64, [1, 1], [1; 4], [1, 1]),
                [128, 64, 8, 8],
                [64, 1, 3, 3],
            ),
        ];
        let median = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            println!("--- {threads} thread(s), batch 128");
            for (name, c, xs, ws) in &layers {
                let mut rng = Rng::new(1);
                let x = rand_array(&mut rng, *xs, -1.0, 1.0);
                let w = rand_array(&mut rng, *ws, -1.0, 1.0);
                let y = c.forward(x.view(), w.view(), None).unwrap();
                let dy = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
                let macs = (y.len() * ws[1] * ws[2] * ws[3]) as f64;
                let time = |f: &(dyn Fn() + Sync)| {
                    pool.install(f);
                    median(
                        (0..5)
                            .map(|_| {
                                let t = Instant::now();
                                pool.install(f);
                                t.elapsed().as_secs_f64()
                            })
                            .collect(),
                    )
                };
                let tf = time(&|| {
                    c.forward(x.view(), w.view(), None).unwrap();
                });
                let tb = time(&|| {
                    c.backward(x.view(), w.view(), dy.view(), true).unwrap();
                });
                println!(
                    "{name:24} fwd {:7.2} ms {:6.1} GFLOP/s | bwd(dx+dw) {:7.2} ms {:6.1} GFLOP/s",
                    tf * 1e3,
                    2.0 * macs / tf / 1e9,
                    tb * 1e3,
                    4.0 * macs / tb / 1e9
                );
            }
        }
    }
}
