//! Layer normalisation (ONNX `LayerNormalization`, opset 17): every row, the flattened trailing
//! axes `axis..rank`, normalised by its own mean and biased variance, then scaled and shifted
//! per position in the row. ConvNeXt normalises channels-last `[N, H, W, C]` over `C` (96 to
//! 768 values a row; its `LayerNorm2d` permutes NCHW to that and back) and `[N, 1, 1, C]` before
//! the classifier; `axis = 1` over NCHW (a row of `C * H * W`) is the other form seen.
//!
//! No running statistics, so training and inference are the same function; forward keeps the
//! mean and inverse standard deviation of each row for backward (and for the op's optional
//! `Mean` / `InvStdDev` outputs).
//!
//! Statistics are two-pass per row: the mean, then the mean squared deviation from it, each
//! summed in f32 lanes over blocks of [`STAT_BLOCK`] values and in f64 across blocks (a row
//! with a large mean and a small spread keeps its variance; one pass of `E[x^2] - E[x]^2` would
//! cancel it away). Rows run in parallel; the parameter gradients are summed per row in f64
//! within each of a fixed partition of the rows ([`super::part_len`]) and across parts in part
//! order, so every result is independent of the thread count and reproducible run to run.
//! The row loops are built for AVX2 where the CPU has it (`simd_dispatch!`; no FMA, so the same
//! bits as the baseline build).

use super::simd::simd_dispatch;
use super::{contiguous, part_len, sum, ELEMWISE_CHUNK};
use crate::engine::{attr_err, shape_err, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn, NdFloat};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const OP: &str = "LayerNormalization";

/// Values per f32 partial sum of the row statistics; blocks are summed in f64. A row of up to
/// this many values (every channels-last LayerNorm) is one block.
pub(super) const STAT_BLOCK: usize = 4096;

/// Attributes of a layer norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNorm {
    /// Added to the variance (PyTorch's default 1e-5; ConvNeXt uses 1e-6).
    pub epsilon: f32,
    /// The first normalised axis, already made non-negative: rows are the flattened axes
    /// `axis..rank`, and there are `product(shape[..axis])` of them.
    pub axis: usize,
}

/// What backward needs besides `x`: each row's statistics, in row order (the rows are the
/// leading axes `..axis` flattened). Also the op's optional `Mean` and `InvStdDev` outputs, of
/// shape `shape[..axis]` followed by ones.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormSaved {
    pub mean: Vec<f32>,
    /// `1 / sqrt(biased_var + epsilon)`.
    pub inv_std: Vec<f32>,
}

/// Gradients of a layer norm: `dscale` and `dbias` have the scale's shape.
#[derive(Clone, Debug)]
pub struct LayerNormGrads {
    pub dx: ArrayD<f32>,
    pub dscale: ArrayD<f32>,
    pub dbias: ArrayD<f32>,
}

impl LayerNorm {
    /// Validates `x` against the attributes and the element counts of the scale and the
    /// (optional) bias, which must each hold one value per row position; returns
    /// `(rows, row length)`.
    pub fn geometry(
        &self,
        x: &[usize],
        scale_len: usize,
        bias_len: Option<usize>,
    ) -> Result<(usize, usize)> {
        if !self.epsilon.is_finite() || self.epsilon < 0.0 {
            return Err(attr_err(
                OP,
                format!("epsilon {} must be finite and >= 0", self.epsilon),
            ));
        }
        if self.axis >= x.len() {
            return Err(attr_err(
                OP,
                format!("axis {} out of range for input {x:?}", self.axis),
            ));
        }
        let rows: usize = x[..self.axis].iter().product();
        let d: usize = x[self.axis..].iter().product();
        if d == 0 {
            return Err(shape_err(
                OP,
                format!(
                    "input {x:?} normalises over no values from axis {}",
                    self.axis
                ),
            ));
        }
        for (what, len) in [("scale", Some(scale_len)), ("bias", bias_len)] {
            if let Some(len) = len.filter(|&l| l != d) {
                return Err(shape_err(
                    OP,
                    format!(
                        "{what} has {len} entries for rows of {d} ({:?} of input {x:?})",
                        &x[self.axis..]
                    ),
                ));
            }
        }
        Ok((rows, d))
    }

    /// Elementwise over rows, so the output shape is the input's.
    pub fn output_shape(
        &self,
        x: &[usize],
        scale_len: usize,
        bias_len: Option<usize>,
    ) -> Result<Vec<usize>> {
        self.geometry(x, scale_len, bias_len)?;
        Ok(x.to_vec())
    }

    /// The shape of the `Mean` / `InvStdDev` outputs: `x`'s with the normalised axes set to 1.
    pub fn stat_shape(&self, x: &[usize]) -> Vec<usize> {
        x.iter()
            .enumerate()
            .map(|(i, &n)| if i < self.axis { n } else { 1 })
            .collect()
    }

    /// `y = (x - mean) * inv_std * scale + bias` per row. Training and inference alike.
    pub fn forward(
        &self,
        x: ArrayViewD<f32>,
        scale: ArrayViewD<f32>,
        bias: Option<ArrayViewD<f32>>,
    ) -> Result<(ArrayD<f32>, LayerNormSaved)> {
        let (rows, d) = self.geometry(x.shape(), scale.len(), bias.as_ref().map(|b| b.len()))?;
        let xs = contiguous(&x);
        let ss = contiguous(&scale);
        let bs = match &bias {
            Some(b) => contiguous(b),
            None => std::borrow::Cow::Owned(vec![0.0; d]),
        };
        let n = rows * d;
        let mut out: Vec<f32> = Vec::with_capacity(n);
        let mut mean = vec![0.0f32; rows];
        let mut inv_std = vec![0.0f32; rows];
        let per_task = rows_per_task(d);
        let eps = self.epsilon;
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(per_task * d)
            .zip(xs.par_chunks(per_task * d))
            .zip(mean.par_chunks_mut(per_task))
            .zip(inv_std.par_chunks_mut(per_task))
            .for_each(|(((o, x), m), r)| forward_rows(o, x, m, r, &ss, &bs, eps));
        // SAFETY: the chunks of `out[..n]` are whole rows of `x`, and `forward_rows` writes
        // every entry of every row.
        unsafe { out.set_len(n) };
        let y = ArrayD::from_shape_vec(x.raw_dim(), out).expect("output has the input's length");
        Ok((y, LayerNormSaved { mean, inv_std }))
    }

    /// Gradients from the forward input `x`, its statistics and `dy`:
    /// `dx = inv_std (g - mean(g) - x_hat mean(g x_hat))` with `g = dy * scale`,
    /// `dscale = sum over rows of dy x_hat`, `dbias = sum over rows of dy`.
    pub fn backward(
        &self,
        x: ArrayViewD<f32>,
        scale: ArrayViewD<f32>,
        saved: &LayerNormSaved,
        dy: ArrayViewD<f32>,
    ) -> Result<LayerNormGrads> {
        let (rows, d) = self.geometry(x.shape(), scale.len(), None)?;
        check_backward(OP, x.shape(), dy.shape(), saved, rows)?;
        let (xs, gs, ss) = (contiguous(&x), contiguous(&dy), contiguous(&scale));
        let n = rows * d;
        let part = part_len(rows);
        let mut dx: Vec<f32> = Vec::with_capacity(n);
        // Each part's f64 sums: `dscale` then `dbias`, `2 d` values.
        let partial: Vec<Vec<f64>> = dx.spare_capacity_mut()[..n]
            .par_chunks_mut(part * d)
            .zip(xs.par_chunks(part * d))
            .zip(gs.par_chunks(part * d))
            .zip(saved.mean.par_chunks(part))
            .zip(saved.inv_std.par_chunks(part))
            .map(|((((o, x), g), m), r)| {
                let mut acc = vec![0.0f64; 2 * d];
                backward_rows(o, x, g, m, r, &ss, &mut acc);
                acc
            })
            .collect();
        // SAFETY: the chunks of `dx[..n]` are whole rows, and `backward_rows` writes every entry
        // of every row.
        unsafe { dx.set_len(n) };
        let mut total = vec![0.0f64; 2 * d];
        for p in &partial {
            for (t, v) in total.iter_mut().zip(p) {
                *t += v;
            }
        }
        let to_param = |v: &[f64]| {
            ArrayD::from_shape_vec(scale.raw_dim(), v.iter().map(|&v| v as f32).collect())
                .expect("one gradient per scale entry")
        };
        Ok(LayerNormGrads {
            dx: ArrayD::from_shape_vec(x.raw_dim(), dx).expect("dx has the input's length"),
            dscale: to_param(&total[..d]),
            dbias: to_param(&total[d..]),
        })
    }

    /// Textbook definition, generic for f64 finite differences. Test oracle only; panics on
    /// shapes [`Self::geometry`] rejects.
    pub fn reference<T: NdFloat>(
        &self,
        x: ArrayViewD<T>,
        scale: ArrayViewD<T>,
        bias: Option<ArrayViewD<T>>,
    ) -> ArrayD<T> {
        let d: usize = x.shape()[self.axis..].iter().product();
        let xs: Vec<T> = x.iter().copied().collect();
        let s: Vec<T> = scale.iter().copied().collect();
        let b: Vec<T> = match bias {
            Some(b) => b.iter().copied().collect(),
            None => vec![T::zero(); d],
        };
        let eps = T::from(self.epsilon).expect("f32 fits any float");
        let nd = T::from(d).expect("row length fits");
        let mut y = Vec::with_capacity(xs.len());
        for row in xs.chunks(d) {
            let mut mean = T::zero();
            for &v in row {
                mean += v;
            }
            mean /= nd;
            let mut var = T::zero();
            for &v in row {
                var += (v - mean) * (v - mean);
            }
            var /= nd;
            let inv = T::one() / (var + eps).sqrt();
            for j in 0..d {
                y.push((row[j] - mean) * inv * s[j] + b[j]);
            }
        }
        ArrayD::from_shape_vec(IxDyn(x.shape()), y).expect("output has the input's length")
    }
}

/// A norm's backward inputs against its forward: `dy` shaped as `x`, statistics for each of
/// the `rows` rows (layer norm's and group norm's, which share [`LayerNormSaved`]).
pub(super) fn check_backward(
    op: &'static str,
    x: &[usize],
    dy: &[usize],
    saved: &LayerNormSaved,
    rows: usize,
) -> Result<()> {
    if dy != x {
        return Err(shape_err(
            op,
            format!("output gradient shape {dy:?} differs from input shape {x:?}"),
        ));
    }
    if saved.mean.len() != rows || saved.inv_std.len() != rows {
        return Err(shape_err(
            op,
            format!(
                "saved statistics for {} / {} rows, input {x:?} has {rows}",
                saved.mean.len(),
                saved.inv_std.len(),
            ),
        ));
    }
    Ok(())
}

/// Rows per parallel task of forward: about [`ELEMWISE_CHUNK`] values, at least one row.
fn rows_per_task(d: usize) -> usize {
    (ELEMWISE_CHUNK / d).max(1)
}

/// Mean and inverse standard deviation of one row, two-pass (module docs). The second pass
/// sums the deviations `x - mu` as well as their squares and corrects both statistics with
/// them (the "corrected two-pass" algorithm): the f32 sum of the first pass is off by a few
/// ulp of the row's sum, which for a row with a large mean is a visible shift of every output;
/// the deviations from an f32 mean near the values are exact, so the corrected mean is off by
/// its own final rounding only.
#[inline(always)]
pub(super) fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f64;
    let mut s = 0.0f64;
    for block in x.chunks(STAT_BLOCK) {
        s += f64::from(sum(block));
    }
    let mu = (s / n) as f32;
    let (mut dev, mut sq) = (0.0f64, 0.0f64);
    for block in x.chunks(STAT_BLOCK) {
        let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
        let c = block.chunks_exact(8);
        let rest = c.remainder();
        for x8 in c {
            for k in 0..8 {
                let d = x8[k] - mu;
                a[k] += d;
                b[k] += d * d;
            }
        }
        for k in 0..rest.len() {
            let d = rest[k] - mu;
            a[k] += d;
            b[k] += d * d;
        }
        dev += f64::from(a.iter().sum::<f32>());
        sq += f64::from(b.iter().sum::<f32>());
    }
    let mean = f64::from(mu) + dev / n;
    let var = ((sq - dev * dev / n) / n).max(0.0);
    let inv_std = 1.0 / (var + f64::from(eps)).sqrt();
    (mean as f32, inv_std as f32)
}

simd_dispatch! {
    /// [`forward_rows_body`] built for AVX2 where the CPU has it.
    fn forward_rows(
        o: &mut [MaybeUninit<f32>],
        x: &[f32],
        mean: &mut [f32],
        inv_std: &mut [f32],
        scale: &[f32],
        bias: &[f32],
        eps: f32,
    ) => forward_rows_body, (o, x, mean, inv_std, scale, bias, eps); ["avx2"]
}

/// Normalises the whole rows of `x` into `o`, recording each row's statistics.
#[inline(always)]
fn forward_rows_body(
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    mean: &mut [f32],
    inv_std: &mut [f32],
    scale: &[f32],
    bias: &[f32],
    eps: f32,
) {
    let d = scale.len();
    let rows = o.chunks_exact_mut(d).zip(x.chunks_exact(d));
    for ((o, x), (m, r)) in rows.zip(mean.iter_mut().zip(inv_std.iter_mut())) {
        let (mu, inv) = row_stats(x, eps);
        (*m, *r) = (mu, inv);
        for j in 0..d {
            o[j].write((x[j] - mu) * inv * scale[j] + bias[j]);
        }
    }
}

/// `(sum(g s), sum(g s x_hat))` over one row, `g = dy`, `x_hat = (x - mu) inv`: eight f32
/// lanes within a block, f64 across blocks, as [`row_stats`].
#[inline(always)]
fn row_grad_sums(x: &[f32], g: &[f32], s: &[f32], mu: f32, inv: f32) -> (f64, f64) {
    let (mut sum_gs, mut sum_gsx) = (0.0f64, 0.0f64);
    for ((xb, gb), sb) in x
        .chunks(STAT_BLOCK)
        .zip(g.chunks(STAT_BLOCK))
        .zip(s.chunks(STAT_BLOCK))
    {
        let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
        let (cx, cg, cs) = (xb.chunks_exact(8), gb.chunks_exact(8), sb.chunks_exact(8));
        let (rx, rg, rs) = (cx.remainder(), cg.remainder(), cs.remainder());
        for ((x8, g8), s8) in cx.zip(cg).zip(cs) {
            for k in 0..8 {
                let gs = g8[k] * s8[k];
                a[k] += gs;
                b[k] += gs * ((x8[k] - mu) * inv);
            }
        }
        for k in 0..rx.len() {
            let gs = rg[k] * rs[k];
            a[k] += gs;
            b[k] += gs * ((rx[k] - mu) * inv);
        }
        sum_gs += f64::from(a.iter().sum::<f32>());
        sum_gsx += f64::from(b.iter().sum::<f32>());
    }
    (sum_gs, sum_gsx)
}

simd_dispatch! {
    /// [`backward_rows_body`] built for AVX2 where the CPU has it.
    fn backward_rows(
        o: &mut [MaybeUninit<f32>],
        x: &[f32],
        g: &[f32],
        mean: &[f32],
        inv_std: &[f32],
        scale: &[f32],
        acc: &mut [f64],
    ) => backward_rows_body, (o, x, g, mean, inv_std, scale, acc); ["avx2"]
}

/// `dx` of the whole rows of `x` into `o`, adding each row's `dy x_hat` and `dy` to
/// `acc[..d]` and `acc[d..]` (f64, row by row in order).
#[inline(always)]
fn backward_rows_body(
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    g: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    scale: &[f32],
    acc: &mut [f64],
) {
    let d = scale.len();
    let nd = d as f64;
    let (dscale, dbias) = acc.split_at_mut(d);
    let rows = o
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d).zip(g.chunks_exact(d)));
    for ((o, (x, g)), (&mu, &inv)) in rows.zip(mean.iter().zip(inv_std)) {
        let (sum_gs, sum_gsx) = row_grad_sums(x, g, scale, mu, inv);
        let mean_gs = (sum_gs / nd) as f32;
        let mean_gsx = (sum_gsx / nd) as f32;
        for j in 0..d {
            let xh = (x[j] - mu) * inv;
            o[j].write(inv * (g[j] * scale[j] - mean_gs - xh * mean_gsx));
            dscale[j] += f64::from(g[j] * xh);
            dbias[j] += f64::from(g[j]);
        }
    }
}

/// Naive layer norm for tests and `benches/layernorm.rs`: obvious loops in f64 over f32
/// tensors, row by row on one thread. The oracle of the fast kernels, not for production.
#[doc(hidden)]
pub mod naive {
    use super::{LayerNorm, Result};
    use ndarray::{ArrayD, ArrayViewD};

    /// `(y, mean, inv_std)`, the statistics in f64 rounded once to f32.
    pub fn forward(
        op: &LayerNorm,
        x: ArrayViewD<f32>,
        scale: ArrayViewD<f32>,
        bias: Option<ArrayViewD<f32>>,
    ) -> Result<(ArrayD<f32>, Vec<f32>, Vec<f32>)> {
        let (rows, d) = op.geometry(x.shape(), scale.len(), bias.as_ref().map(|b| b.len()))?;
        let xs: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let s: Vec<f64> = scale.iter().map(|&v| f64::from(v)).collect();
        let b: Vec<f64> = match bias {
            Some(b) => b.iter().map(|&v| f64::from(v)).collect(),
            None => vec![0.0; d],
        };
        let mut y = vec![0.0f32; rows * d];
        let (mut means, mut invs) = (vec![0.0f32; rows], vec![0.0f32; rows]);
        for r in 0..rows {
            let (mean, inv) = stats(&xs[r * d..(r + 1) * d], op.epsilon);
            for j in 0..d {
                y[r * d + j] = ((xs[r * d + j] - mean) * inv * s[j] + b[j]) as f32;
            }
            means[r] = mean as f32;
            invs[r] = inv as f32;
        }
        let y = ArrayD::from_shape_vec(x.raw_dim(), y).expect("output has the input's length");
        Ok((y, means, invs))
    }

    /// `(dx, dscale, dbias)`, the statistics recomputed from `x` in f64.
    pub fn backward(
        op: &LayerNorm,
        x: ArrayViewD<f32>,
        scale: ArrayViewD<f32>,
        dy: ArrayViewD<f32>,
    ) -> Result<(ArrayD<f32>, ArrayD<f32>, ArrayD<f32>)> {
        let (rows, d) = op.geometry(x.shape(), scale.len(), None)?;
        assert_eq!(x.shape(), dy.shape(), "dy has the input's shape");
        let xs: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let gs: Vec<f64> = dy.iter().map(|&v| f64::from(v)).collect();
        let s: Vec<f64> = scale.iter().map(|&v| f64::from(v)).collect();
        let mut dx = vec![0.0f32; rows * d];
        let (mut dscale, mut dbias) = (vec![0.0f64; d], vec![0.0f64; d]);
        for r in 0..rows {
            let row = &xs[r * d..(r + 1) * d];
            let g = &gs[r * d..(r + 1) * d];
            let (mean, inv) = stats(row, op.epsilon);
            let xhat: Vec<f64> = row.iter().map(|v| (v - mean) * inv).collect();
            let (mut mean_gs, mut mean_gsx) = (0.0, 0.0);
            for j in 0..d {
                mean_gs += g[j] * s[j] / d as f64;
                mean_gsx += g[j] * s[j] * xhat[j] / d as f64;
            }
            for j in 0..d {
                dx[r * d + j] = (inv * (g[j] * s[j] - mean_gs - xhat[j] * mean_gsx)) as f32;
                dscale[j] += g[j] * xhat[j];
                dbias[j] += g[j];
            }
        }
        let param = |v: Vec<f64>| {
            ArrayD::from_shape_vec(scale.raw_dim(), v.into_iter().map(|v| v as f32).collect())
                .expect("one gradient per scale entry")
        };
        Ok((
            ArrayD::from_shape_vec(x.raw_dim(), dx).expect("dx has the input's length"),
            param(dscale),
            param(dbias),
        ))
    }

    fn stats(row: &[f64], eps: f32) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().sum::<f64>() / n;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
        (mean, 1.0 / (var + f64::from(eps)).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;
    use ndarray::{Array, Axis};

    fn op(axis: usize, epsilon: f32) -> LayerNorm {
        LayerNorm { epsilon, axis }
    }

    /// Random `x`, `scale`, `bias` for `shape` normalised from `axis`; `x` offset by `mean`.
    fn inputs(
        rng: &mut Rng,
        shape: &[usize],
        axis: usize,
        mean: f32,
    ) -> (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) {
        let x = rand_array(rng, IxDyn(shape), -2.0, 2.0).mapv(|v| v + mean);
        let pshape = &shape[axis..];
        let scale = rand_array(rng, IxDyn(pshape), 0.5, 1.5);
        let bias = rand_array(rng, IxDyn(pshape), -0.5, 0.5);
        (x, scale, bias)
    }

    /// Fast forward and backward against the f64 naive kernels: channels-last rows of
    /// ConvNeXt's sizes, `[N, 1, 1, C]`, NCHW from axis 1 (long rows, more than one
    /// [`STAT_BLOCK`]), rank 2, rows not a multiple of the 8 lanes, one row, and inputs with a
    /// large mean (a one-pass variance would lose them).
    #[test]
    fn fast_matches_naive() {
        let mut rng = Rng::new(21);
        let cases: [(&[usize], usize, f32); 8] = [
            (&[4, 8, 8, 96], 3, 0.0),
            (&[8, 1, 1, 768], 3, 0.0),
            (&[2, 16, 24, 24], 1, 0.0),
            (&[37, 13], 1, 0.0),
            (&[3, 5, 7], 0, 0.0),
            (&[4, 8, 8, 96], 3, 1000.0),
            (&[6, 384], 1, -300.0),
            (&[5, 3, 2, 3], 2, 0.5),
        ];
        for (shape, axis, mean) in cases {
            let ln = op(axis, 1e-6);
            let (x, s, b) = inputs(&mut rng, shape, axis, mean);
            let dy = rand_array(&mut rng, IxDyn(shape), -1.0, 1.0);
            let (y, saved) = ln.forward(x.view(), s.view(), Some(b.view())).unwrap();
            let (ny, nm, ni) = naive::forward(&ln, x.view(), s.view(), Some(b.view())).unwrap();
            let what = format!("{shape:?} axis {axis} mean {mean}");
            // A large mean: the f32 mean is off by up to half its ulp (3e-5 at 1000), which
            // shifts every output by that over the row's std (about 1.15 here).
            let tol = if mean.abs() > 100.0 { 2e-5 } else { 2e-6 };
            assert_close(&format!("y {what}"), &y.view(), &ny.view(), tol);
            let close = |a: &[f32], b: &[f32], tol: f32| {
                a.iter()
                    .zip(b)
                    .all(|(p, q)| (p - q).abs() <= tol * q.abs().max(1.0))
            };
            assert!(close(&saved.mean, &nm, 1e-6), "mean {what}");
            assert!(close(&saved.inv_std, &ni, 2e-6), "inv_std {what}");
            let g = ln.backward(x.view(), s.view(), &saved, dy.view()).unwrap();
            let (ndx, nds, ndb) = naive::backward(&ln, x.view(), s.view(), dy.view()).unwrap();
            // A large mean costs the f32 kernel what `x - mean` keeps of x's digits.
            let tol = if mean.abs() > 100.0 { 1e-4 } else { 1e-5 };
            assert_close(&format!("dx {what}"), &g.dx.view(), &ndx.view(), tol);
            assert_close(
                &format!("dscale {what}"),
                &g.dscale.view(),
                &nds.view(),
                tol,
            );
            assert_close(&format!("dbias {what}"), &g.dbias.view(), &ndb.view(), 1e-6);
            assert_eq!(g.dscale.shape(), s.shape());
            assert_eq!(g.dbias.shape(), s.shape());
        }
    }

    /// Central differences in f64 of the generic reference for dx, dscale and dbias.
    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(22);
        let cases: [(&[usize], usize); 6] = [
            (&[5, 7], 1),
            (&[2, 3, 2, 6], 3),
            (&[2, 3, 3, 3], 1),
            (&[3, 11], 0),
            (&[2, 2, 2, 17], 3),
            (&[4, 1, 1, 24], 3),
        ];
        for (shape, axis) in cases {
            let ln = op(axis, 1e-5);
            let (x, s, b) = inputs(&mut rng, shape, axis, 0.3);
            let r = rand_array(&mut rng, IxDyn(shape), -1.0, 1.0);
            let (_, saved) = ln.forward(x.view(), s.view(), Some(b.view())).unwrap();
            let g = ln.backward(x.view(), s.view(), &saved, r.view()).unwrap();
            let (x64, s64, b64, r64) = (
                to_f64(&x.view()),
                to_f64(&s.view()),
                to_f64(&b.view()),
                to_f64(&r.view()),
            );
            let loss = |x: &ArrayD<f64>, s: &ArrayD<f64>, b: &ArrayD<f64>| {
                dot_loss(&ln.reference(x.view(), s.view(), Some(b.view())), &r64)
            };
            let what = format!("{shape:?} axis {axis}");
            let fd = fd_grad(&x64, |x| loss(x, &s64, &b64));
            assert_grad(&format!("dx {what}"), &g.dx.view(), &fd.view());
            let fd = fd_grad(&s64, |s| loss(&x64, s, &b64));
            assert_grad(&format!("dscale {what}"), &g.dscale.view(), &fd.view());
            let fd = fd_grad(&b64, |b| loss(&x64, &s64, b));
            assert_grad(&format!("dbias {what}"), &g.dbias.view(), &fd.view());
        }
    }

    /// PyTorch's `F.layer_norm` (float64) on a fixed input: values and statistics.
    #[test]
    fn normalises_each_row() {
        let x =
            Array::from_shape_vec(IxDyn(&[2, 3]), vec![1.0f32, 2.0, 3.0, -1.0, 0.0, 5.0]).unwrap();
        let s = ndarray::arr1(&[1.0f32, 2.0, 0.5]).into_dyn();
        let b = ndarray::arr1(&[0.0f32, 0.1, -0.1]).into_dyn();
        let ln = op(1, 1e-5);
        let (y, saved) = ln.forward(x.view(), s.view(), Some(b.view())).unwrap();
        // Row 0: mean 2, var 2/3; row 1: mean 4/3, var 62/9.
        let want = [
            -1.224_735_7,
            0.1,
            0.512_367_84,
            -0.889_000_24,
            -0.916_000_3,
            0.598_500_2,
        ];
        for (got, want) in y.iter().zip(want) {
            assert!((got - want).abs() < 2e-6, "{y}");
        }
        assert_eq!(saved.mean[0], 2.0);
        assert!((saved.mean[1] - 4.0 / 3.0).abs() <= f32::EPSILON);
        assert!((saved.inv_std[0] - 1.2247357).abs() < 2e-6);
        assert_eq!(ln.stat_shape(x.shape()), [2, 1]);
        // Without a bias, the scaled normalisation alone.
        let (y0, _) = ln.forward(x.view(), s.view(), None).unwrap();
        assert_close("no bias", &y0.view(), &(&y - &b).view(), 1e-6);
    }

    /// Non-standard-layout views are read in logical order.
    #[test]
    fn transposed_input_keeps_logical_order() {
        let mut rng = Rng::new(23);
        let x = rand_array(&mut rng, IxDyn(&[9, 6]), -1.0, 1.0);
        let xt = x.t();
        let s = rand_array(&mut rng, IxDyn(&[9]), 0.5, 1.5);
        let ln = op(1, 1e-5);
        let (y, _) = ln.forward(xt.view(), s.view(), None).unwrap();
        let (want, _) = ln
            .forward(xt.as_standard_layout().view(), s.view(), None)
            .unwrap();
        assert_eq!(y, want);
        let dy = rand_array(&mut rng, IxDyn(&[9, 6]), -1.0, 1.0);
        let saved = ln.forward(xt.view(), s.view(), None).unwrap().1;
        let g = ln.backward(xt.view(), s.view(), &saved, dy.t()).unwrap();
        let g2 = ln
            .backward(
                xt.as_standard_layout().view(),
                s.view(),
                &saved,
                dy.t().as_standard_layout().view(),
            )
            .unwrap();
        assert_eq!(g.dx, g2.dx);
        assert_eq!(g.dscale, g2.dscale);
    }

    /// Bitwise the same on 1, 2 and 3 threads, and run to run (the resume test's premise):
    /// the parameter gradients' partition depends on the row count only.
    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = Rng::new(24);
        let shape = [16, 7, 7, 96];
        let ln = op(3, 1e-6);
        let (x, s, b) = inputs(&mut rng, &shape, 3, 0.1);
        let dy = rand_array(&mut rng, IxDyn(&shape), -1.0, 1.0);
        let run = |threads: usize| {
            on_threads(threads, || {
                let (y, saved) = ln.forward(x.view(), s.view(), Some(b.view())).unwrap();
                let g = ln.backward(x.view(), s.view(), &saved, dy.view()).unwrap();
                let bits = |a: &ArrayD<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                (bits(&y), bits(&g.dx), bits(&g.dscale), bits(&g.dbias))
            })
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
        assert_eq!(one, run(2));
    }

    /// A constant row has zero variance: `y = bias` (for `epsilon > 0`), no NaN; NaN in a row
    /// stays in that row.
    #[test]
    fn constant_rows_and_nan() {
        let ln = op(1, 1e-5);
        let mut x = ArrayD::from_elem(IxDyn(&[3, 8]), 4.0f32);
        x[[2, 3]] = f32::NAN;
        let s = ArrayD::from_elem(IxDyn(&[8]), 2.0f32);
        let b = ArrayD::from_elem(IxDyn(&[8]), 0.25f32);
        let (y, saved) = ln.forward(x.view(), s.view(), Some(b.view())).unwrap();
        assert!(y.index_axis(Axis(0), 0).iter().all(|&v| v == 0.25), "{y}");
        assert!(y.index_axis(Axis(0), 2).iter().all(|v| v.is_nan()), "{y}");
        let dy = ArrayD::from_elem(IxDyn(&[3, 8]), 1.0f32);
        let g = ln.backward(x.view(), s.view(), &saved, dy.view()).unwrap();
        assert!(g.dx.index_axis(Axis(0), 0).iter().all(|v| v.is_finite()));
        assert!(g.dscale.iter().all(|v| v.is_nan()), "NaN reaches the sums");
    }

    #[test]
    fn bad_shapes_and_attributes_are_errors() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3, 4]));
        let s4 = ArrayD::<f32>::ones(IxDyn(&[4]));
        let s12 = ArrayD::<f32>::ones(IxDyn(&[3, 4]));
        let fwd = |ln: LayerNorm, s: &ArrayD<f32>, b: Option<&ArrayD<f32>>| {
            ln.forward(x.view(), s.view(), b.map(|b| b.view()))
        };
        assert!(fwd(op(2, 1e-5), &s4, Some(&s4)).is_ok());
        assert!(fwd(op(1, 1e-5), &s12, None).is_ok());
        assert!(fwd(op(1, 1e-5), &s4, None).is_err(), "scale too short");
        assert!(fwd(op(2, 1e-5), &s4, Some(&s12)).is_err(), "bias too long");
        assert!(fwd(op(3, 1e-5), &s4, None).is_err(), "axis past the rank");
        assert!(fwd(op(2, f32::NAN), &s4, None).is_err());
        assert!(fwd(op(2, -1.0), &s4, None).is_err());
        let empty = ArrayD::<f32>::zeros(IxDyn(&[2, 0]));
        let s0 = ArrayD::<f32>::zeros(IxDyn(&[0]));
        assert!(op(1, 1e-5).forward(empty.view(), s0.view(), None).is_err());
        // No rows is fine: an empty output.
        let (y, saved) = op(1, 1e-5)
            .forward(ArrayD::zeros(IxDyn(&[0, 4])).view(), s4.view(), None)
            .unwrap();
        assert_eq!(y.shape(), [0, 4]);
        assert!(saved.mean.is_empty());
        let ln = op(2, 1e-5);
        let (_, saved) = fwd(ln, &s4, None).unwrap();
        let wrong = ArrayD::<f32>::zeros(IxDyn(&[2, 4, 3]));
        assert!(ln
            .backward(x.view(), s4.view(), &saved, wrong.view())
            .is_err());
        let short = LayerNormSaved {
            mean: vec![0.0; 5],
            inv_std: vec![1.0; 5],
        };
        assert!(ln.backward(x.view(), s4.view(), &short, x.view()).is_err());
    }
}
