//! Group normalisation (ONNX `GroupNormalization`, opset 21) and instance normalisation
//! (`InstanceNormalization`, the same with one group per channel): the channels of an
//! `[N, C, D1, ..]` input split into `G` groups, every `(n, g)` group normalised by its own mean
//! and biased variance, then each channel scaled and shifted by `scale[c]`, `bias[c]`.
//! PyTorch's `nn.InstanceNorm2d` exports as an instance norm; `nn.GroupNorm` exports as
//! `GroupNormalization` at opset 21 and later, and before that as `Reshape [N, G, -1]`, an
//! instance norm of the `G` groups (with a scale of ones and a bias of zeros that
//! `onnx::group_norm` freezes) and a `Reshape` back followed by the per-channel `Mul` and `Add`.
//!
//! The row math is layer norm's ([`super::layernorm`]: two-pass statistics in f32 lanes and
//! f64 across blocks, the same `dx` formula) with one scale and shift per channel, i.e. per
//! segment of a row. Rows run in parallel; the parameter gradients are summed per segment (f32
//! lanes, f64 across blocks, as the statistics) and over the batch in f64 in image order, so
//! every result is independent of the thread count and reproducible run to run.

use super::layernorm::{check_backward, row_stats, LayerNormGrads, LayerNormSaved, STAT_BLOCK};
use super::simd::simd_dispatch;
use super::{contiguous, ELEMWISE_CHUNK};
use crate::engine::{attr_err, shape_err, Result};
use ndarray::{ArrayD, ArrayViewD, IxDyn, NdFloat};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Attributes of a group norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNorm {
    /// Added to the variance (ONNX's and PyTorch's default 1e-5).
    pub epsilon: f32,
    /// Groups of channels normalised together; `None` = one per channel (instance norm).
    pub groups: Option<usize>,
}

/// How an input splits into rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupGeometry {
    /// `N * G`, one per `(n, g)` group.
    pub rows: usize,
    pub channels: usize,
    /// Channels per group, the segments of a row.
    pub per_group: usize,
    /// Values per channel and image, `D1 * D2 * ..`: a segment.
    pub plane: usize,
}

impl GroupNorm {
    /// The op's ONNX name, for errors.
    fn name(&self) -> &'static str {
        if self.groups.is_some() {
            "GroupNormalization"
        } else {
            "InstanceNormalization"
        }
    }

    /// Validates `x` (`[N, C, D1, ..]`, rank 3 or more as ONNX requires) against the attributes
    /// and the element counts of the scale and bias, one value per channel each.
    pub fn geometry(
        &self,
        x: &[usize],
        scale_len: usize,
        bias_len: usize,
    ) -> Result<GroupGeometry> {
        let op = self.name();
        if !self.epsilon.is_finite() || self.epsilon < 0.0 {
            return Err(attr_err(
                op,
                format!("epsilon {} must be finite and >= 0", self.epsilon),
            ));
        }
        if x.len() < 3 {
            return Err(shape_err(
                op,
                format!("input {x:?} needs rank 3 or more ([N, C, D1, ..])"),
            ));
        }
        let plane: usize = x[2..].iter().product();
        if plane == 0 {
            return Err(shape_err(op, format!("input {x:?} has empty planes")));
        }
        let channels = x[1];
        let groups = self.groups.unwrap_or(channels);
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(attr_err(
                op,
                format!(
                    "num_groups {groups} does not divide the {channels} channels of input {x:?}"
                ),
            ));
        }
        for (what, n) in [("scale", scale_len), ("bias", bias_len)] {
            if n != channels {
                return Err(shape_err(
                    op,
                    format!("{what} has {n} entries for the {channels} channels of input {x:?}"),
                ));
            }
        }
        Ok(GroupGeometry {
            rows: x[0] * groups,
            channels,
            per_group: channels / groups,
            plane,
        })
    }

    /// Elementwise over groups, so the output shape is the input's.
    pub fn output_shape(
        &self,
        x: &[usize],
        scale_len: usize,
        bias_len: usize,
    ) -> Result<Vec<usize>> {
        self.geometry(x, scale_len, bias_len)?;
        Ok(x.to_vec())
    }

    /// `y = (x - mean) * inv_std * scale[c] + bias[c]` per group. Training and inference
    /// alike (no running statistics).
    pub fn forward(
        &self,
        x: ArrayViewD<f32>,
        scale: ArrayViewD<f32>,
        bias: ArrayViewD<f32>,
    ) -> Result<(ArrayD<f32>, LayerNormSaved)> {
        let geo = self.geometry(x.shape(), scale.len(), bias.len())?;
        let (rows, d, k) = (geo.rows, geo.per_group * geo.plane, geo.per_group);
        let xs = contiguous(&x);
        let (ss, bs) = (contiguous(&scale), contiguous(&bias));
        // Each segment's (scale, bias) in row order (image by image, channel by channel), so
        // a task needs no channel arithmetic.
        let affine: Vec<(f32, f32)> = (0..rows * k)
            .map(|i| (ss[i % geo.channels], bs[i % geo.channels]))
            .collect();
        let n = rows * d;
        let mut out: Vec<f32> = Vec::with_capacity(n);
        let mut mean = vec![0.0f32; rows];
        let mut inv_std = vec![0.0f32; rows];
        let per_task = (ELEMWISE_CHUNK / d).max(1);
        let eps = self.epsilon;
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(per_task * d)
            .zip(xs.par_chunks(per_task * d))
            .zip(mean.par_chunks_mut(per_task))
            .zip(inv_std.par_chunks_mut(per_task))
            .zip(affine.par_chunks(per_task * k))
            .for_each(|((((o, x), m), r), a)| forward_rows(o, x, m, r, a, geo.plane, eps));
        // SAFETY: the chunks of `out[..n]` are whole rows of `x`, and `forward_rows` writes
        // every entry of every row.
        unsafe { out.set_len(n) };
        let y = ArrayD::from_shape_vec(x.raw_dim(), out).expect("output has the input's length");
        Ok((y, LayerNormSaved { mean, inv_std }))
    }

    /// Gradients from the forward input `x`, its statistics and `dy`:
    /// `dx = inv_std (g - mean(g) - x_hat mean(g x_hat))` over each group with
    /// `g = dy * scale[c]`, `dscale[c] = sum of dy x_hat`, `dbias[c] = sum of dy` over the
    /// channel's planes.
    pub fn backward(
        &self,
        x: ArrayViewD<f32>,
        scale: ArrayViewD<f32>,
        saved: &LayerNormSaved,
        dy: ArrayViewD<f32>,
    ) -> Result<LayerNormGrads> {
        let op = self.name();
        let geo = self.geometry(x.shape(), scale.len(), scale.len())?;
        let (rows, d, k) = (geo.rows, geo.per_group * geo.plane, geo.per_group);
        check_backward(op, x.shape(), dy.shape(), saved, rows)?;
        let (xs, gs, ss) = (contiguous(&x), contiguous(&dy), contiguous(&scale));
        let seg_scale: Vec<f32> = (0..rows * k).map(|i| ss[i % geo.channels]).collect();
        let n = rows * d;
        let per_task = (ELEMWISE_CHUNK / d).max(1);
        let mut dx: Vec<f32> = Vec::with_capacity(n);
        // Each segment's f64 (sum dy x_hat, sum dy), `[N, C]` in order.
        let mut sums = vec![(0.0f64, 0.0f64); rows * k];
        dx.spare_capacity_mut()[..n]
            .par_chunks_mut(per_task * d)
            .zip(xs.par_chunks(per_task * d))
            .zip(gs.par_chunks(per_task * d))
            .zip(saved.mean.par_chunks(per_task))
            .zip(saved.inv_std.par_chunks(per_task))
            .zip(seg_scale.par_chunks(per_task * k))
            .zip(sums.par_chunks_mut(per_task * k))
            .for_each(|((((((o, x), g), m), r), s), acc)| {
                backward_rows(o, x, g, m, r, s, acc, geo.plane)
            });
        // SAFETY: the chunks of `dx[..n]` are whole rows, and `backward_rows` writes every
        // entry of every row.
        unsafe { dx.set_len(n) };
        let (mut dscale, mut dbias) = (vec![0.0f64; geo.channels], vec![0.0f64; geo.channels]);
        for image in sums.chunks_exact(geo.channels) {
            for (c, &(gx, g)) in image.iter().enumerate() {
                dscale[c] += gx;
                dbias[c] += g;
            }
        }
        let to_param = |v: Vec<f64>| {
            ArrayD::from_shape_vec(scale.raw_dim(), v.into_iter().map(|v| v as f32).collect())
                .expect("one gradient per scale entry")
        };
        Ok(LayerNormGrads {
            dx: ArrayD::from_shape_vec(x.raw_dim(), dx).expect("dx has the input's length"),
            dscale: to_param(dscale),
            dbias: to_param(dbias),
        })
    }

    /// Textbook definition, generic for f64 finite differences. Test oracle only; panics on
    /// shapes [`Self::geometry`] rejects.
    pub fn reference<T: NdFloat>(
        &self,
        x: ArrayViewD<T>,
        scale: ArrayViewD<T>,
        bias: ArrayViewD<T>,
    ) -> ArrayD<T> {
        let c = x.shape()[1];
        let plane: usize = x.shape()[2..].iter().product();
        let d = plane * c / self.groups.unwrap_or(c);
        let xs: Vec<T> = x.iter().copied().collect();
        let s: Vec<T> = scale.iter().copied().collect();
        let b: Vec<T> = bias.iter().copied().collect();
        let eps = T::from(self.epsilon).expect("f32 fits any float");
        let nd = T::from(d).expect("group size fits");
        let mut y = Vec::with_capacity(xs.len());
        for (r, row) in xs.chunks(d).enumerate() {
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
            for (j, &v) in row.iter().enumerate() {
                let ch = (r * d + j) / plane % c;
                y.push((v - mean) * inv * s[ch] + b[ch]);
            }
        }
        ArrayD::from_shape_vec(IxDyn(x.shape()), y).expect("output has the input's length")
    }
}

simd_dispatch! {
    /// [`forward_rows_body`] built for AVX2 where the CPU has it.
    fn forward_rows(
        o: &mut [MaybeUninit<f32>],
        x: &[f32],
        mean: &mut [f32],
        inv_std: &mut [f32],
        affine: &[(f32, f32)],
        plane: usize,
        eps: f32,
    ) => forward_rows_body, (o, x, mean, inv_std, affine, plane, eps); ["avx2"]
}

/// Normalises the whole rows of `x` into `o` (each row the `affine.len() / mean.len()`
/// segments of `plane` values of its channels), recording each row's statistics.
#[inline(always)]
fn forward_rows_body(
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    mean: &mut [f32],
    inv_std: &mut [f32],
    affine: &[(f32, f32)],
    plane: usize,
    eps: f32,
) {
    let k = affine.len() / mean.len();
    let d = k * plane;
    let rows = o.chunks_exact_mut(d).zip(x.chunks_exact(d));
    let stats = mean
        .iter_mut()
        .zip(inv_std.iter_mut())
        .zip(affine.chunks_exact(k));
    for ((o, x), ((m, r), affine)) in rows.zip(stats) {
        let (mu, inv) = row_stats(x, eps);
        (*m, *r) = (mu, inv);
        let segments = o.chunks_exact_mut(plane).zip(x.chunks_exact(plane));
        for ((o, x), &(s, b)) in segments.zip(affine) {
            for j in 0..plane {
                o[j].write((x[j] - mu) * inv * s + b);
            }
        }
    }
}

/// `(sum(dy x_hat), sum(dy))` over one segment: eight f32 lanes within a block of
/// [`STAT_BLOCK`] values, f64 across blocks.
#[inline(always)]
fn segment_grad_sums(x: &[f32], g: &[f32], mu: f32, inv: f32) -> (f64, f64) {
    let (mut sum_gx, mut sum_g) = (0.0f64, 0.0f64);
    for (xb, gb) in x.chunks(STAT_BLOCK).zip(g.chunks(STAT_BLOCK)) {
        let (mut a, mut b) = ([0.0f32; 8], [0.0f32; 8]);
        let (cx, cg) = (xb.chunks_exact(8), gb.chunks_exact(8));
        let (rx, rg) = (cx.remainder(), cg.remainder());
        for (x8, g8) in cx.zip(cg) {
            for k in 0..8 {
                a[k] += g8[k] * ((x8[k] - mu) * inv);
                b[k] += g8[k];
            }
        }
        for k in 0..rx.len() {
            a[k] += rg[k] * ((rx[k] - mu) * inv);
            b[k] += rg[k];
        }
        sum_gx += f64::from(a.iter().sum::<f32>());
        sum_g += f64::from(b.iter().sum::<f32>());
    }
    (sum_gx, sum_g)
}

simd_dispatch! {
    /// [`backward_rows_body`] built for AVX2 where the CPU has it.
    #[allow(clippy::too_many_arguments)]
    fn backward_rows(
        o: &mut [MaybeUninit<f32>],
        x: &[f32],
        g: &[f32],
        mean: &[f32],
        inv_std: &[f32],
        scale: &[f32],
        sums: &mut [(f64, f64)],
        plane: usize,
    ) => backward_rows_body, (o, x, g, mean, inv_std, scale, sums, plane); ["avx2"]
}

/// `dx` of the whole rows of `x` into `o`, and each segment's `(sum dy x_hat, sum dy)`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_rows_body(
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    g: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    scale: &[f32],
    sums: &mut [(f64, f64)],
    plane: usize,
) {
    let k = scale.len() / mean.len();
    let d = k * plane;
    let nd = d as f64;
    let rows = o
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d).zip(g.chunks_exact(d)));
    let per_row = mean
        .iter()
        .zip(inv_std)
        .zip(scale.chunks_exact(k).zip(sums.chunks_exact_mut(k)));
    for ((o, (x, g)), ((&mu, &inv), (s, acc))) in rows.zip(per_row) {
        let (mut sum_gs, mut sum_gsx) = (0.0f64, 0.0f64);
        let segments = x.chunks_exact(plane).zip(g.chunks_exact(plane));
        for (((x, g), &s), acc) in segments.zip(s).zip(acc.iter_mut()) {
            let (gx, g) = segment_grad_sums(x, g, mu, inv);
            *acc = (gx, g);
            sum_gs += f64::from(s) * g;
            sum_gsx += f64::from(s) * gx;
        }
        let mean_gs = (sum_gs / nd) as f32;
        let mean_gsx = (sum_gsx / nd) as f32;
        let segments = o
            .chunks_exact_mut(plane)
            .zip(x.chunks_exact(plane).zip(g.chunks_exact(plane)));
        for ((o, (x, g)), &s) in segments.zip(s) {
            for j in 0..plane {
                let xh = (x[j] - mu) * inv;
                o[j].write(inv * (g[j] * s - mean_gs - xh * mean_gsx));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;

    /// Random `x` (offset by `mean`), `scale`, `bias` for an `[N, C, ..]` shape.
    fn inputs(
        rng: &mut Rng,
        shape: &[usize],
        mean: f32,
    ) -> (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) {
        let x = rand_array(rng, IxDyn(shape), -2.0, 2.0).mapv(|v| v + mean);
        let scale = rand_array(rng, IxDyn(&[shape[1]]), 0.5, 1.5);
        let bias = rand_array(rng, IxDyn(&[shape[1]]), -0.5, 0.5);
        (x, scale, bias)
    }

    fn op(groups: Option<usize>) -> GroupNorm {
        GroupNorm {
            epsilon: 1e-5,
            groups,
        }
    }

    /// Forward against the f64 reference: instance norms (GroupNorm's `[N, G, C/G * H * W]`
    /// rows, one longer than a [`STAT_BLOCK`], and InstanceNorm2d's planes), group norms of 1,
    /// several and every channel, planes of fewer values than the 8 lanes, and inputs with a
    /// large mean (a one-pass variance would lose them).
    #[test]
    fn forward_matches_the_f64_reference() {
        let mut rng = Rng::new(31);
        let cases: [(&[usize], Option<usize>, f32); 9] = [
            (&[4, 4, 8 * 24 * 28], None, 0.0),
            (&[2, 2, 5000], None, 0.0),
            (&[3, 16, 7, 7], None, 0.0),
            (&[2, 5, 1, 3], None, 0.0),
            (&[3, 8, 8, 8], None, 500.0),
            (&[2, 12, 6, 6], Some(4), 0.0),
            (&[2, 12, 6, 6], Some(1), 0.0),
            (&[3, 6, 2, 1], Some(6), 0.0),
            (&[2, 32, 24, 28], Some(4), -300.0),
        ];
        for (shape, groups, mean) in cases {
            let op = op(groups);
            let (x, s, b) = inputs(&mut rng, shape, mean);
            let (y, saved) = op.forward(x.view(), s.view(), b.view()).unwrap();
            let want = op
                .reference(
                    to_f64(&x.view()).view(),
                    to_f64(&s.view()).view(),
                    to_f64(&b.view()).view(),
                )
                .mapv(|v| v as f32);
            let what = format!("y {shape:?} groups {groups:?} mean {mean}");
            let tol = if mean.abs() > 100.0 { 2e-5 } else { 2e-6 };
            assert_close(&what, &y.view(), &want.view(), tol);
            assert_eq!(saved.mean.len(), shape[0] * groups.unwrap_or(shape[1]));
        }
    }

    /// Central differences in f64 of the generic reference for dx, dscale and dbias, on
    /// several images (the parameter gradients sum over the batch), instance and group norms.
    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = Rng::new(32);
        let cases: [(&[usize], Option<usize>); 7] = [
            (&[3, 2, 10], None),
            (&[2, 3, 3, 3], None),
            (&[1, 4, 2, 5], None),
            (&[2, 1, 17], None),
            (&[2, 6, 3, 3], Some(2)),
            (&[2, 4, 2, 3], Some(1)),
            (&[3, 6, 5], Some(3)),
        ];
        for (shape, groups) in cases {
            let op = op(groups);
            let (x, s, b) = inputs(&mut rng, shape, 0.3);
            let r = rand_array(&mut rng, IxDyn(shape), -1.0, 1.0);
            let (_, saved) = op.forward(x.view(), s.view(), b.view()).unwrap();
            let g = op.backward(x.view(), s.view(), &saved, r.view()).unwrap();
            let (x64, s64, b64, r64) = (
                to_f64(&x.view()),
                to_f64(&s.view()),
                to_f64(&b.view()),
                to_f64(&r.view()),
            );
            let loss = |x: &ArrayD<f64>, s: &ArrayD<f64>, b: &ArrayD<f64>| {
                dot_loss(&op.reference(x.view(), s.view(), b.view()), &r64)
            };
            let what = format!("{shape:?} groups {groups:?}");
            let fd = fd_grad(&x64, |x| loss(x, &s64, &b64));
            assert_grad(&format!("dx {what}"), &g.dx.view(), &fd.view());
            let fd = fd_grad(&s64, |s| loss(&x64, s, &b64));
            assert_grad(&format!("dscale {what}"), &g.dscale.view(), &fd.view());
            let fd = fd_grad(&b64, |b| loss(&x64, &s64, b));
            assert_grad(&format!("dbias {what}"), &g.dbias.view(), &fd.view());
        }
    }

    /// The same bits on 1 and 3 threads (the resume test's reproducibility rests on it).
    #[test]
    fn results_do_not_depend_on_threads() {
        let mut rng = Rng::new(33);
        for (shape, groups) in [([16, 4, 162], None), ([16, 8, 81], Some(2))] {
            let op = op(groups);
            let (x, s, b) = inputs(&mut rng, &shape, 0.0);
            let dy = rand_array(&mut rng, IxDyn(&shape), -1.0, 1.0);
            let run = || {
                let (y, saved) = op.forward(x.view(), s.view(), b.view()).unwrap();
                let g = op.backward(x.view(), s.view(), &saved, dy.view()).unwrap();
                (y, g.dx, g.dscale, g.dbias)
            };
            let one = on_threads(1, run);
            let three = on_threads(3, run);
            assert_eq!(one.0, three.0);
            assert_eq!(one.1, three.1);
            assert_eq!(one.2, three.2);
            assert_eq!(one.3, three.3);
        }
    }

    /// Scale, bias, groups and rank that do not fit are errors naming the op, not panics.
    #[test]
    fn bad_shapes_are_errors() {
        for (x, groups, s, b, name) in [
            (vec![2, 3, 4], None, 2, 3, "InstanceNormalization"),
            (vec![2, 3, 4], None, 3, 4, "InstanceNormalization"),
            (vec![2, 3], None, 3, 3, "InstanceNormalization"),
            (vec![2, 3, 0], None, 3, 3, "InstanceNormalization"),
            (vec![2, 6, 4], Some(4), 6, 6, "GroupNormalization"),
            (vec![2, 6, 4], Some(0), 6, 6, "GroupNormalization"),
            (vec![2, 6, 4], Some(3), 3, 3, "GroupNormalization"),
        ] {
            let e = op(groups).geometry(&x, s, b).unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        let e = GroupNorm {
            epsilon: f32::NAN,
            groups: None,
        }
        .geometry(&[1, 1, 1], 1, 1)
        .unwrap_err()
        .to_string();
        assert!(e.contains("epsilon"), "{e}");
    }
}
