//! The CPU backend: host `ArrayD<f32>` tensors and the kernels of [`crate::engine::ops`] and
//! [`crate::engine::tensor_ops`] (OpenBLAS GEMMs, rayon loops). Each method is the body of what
//! the executor's match arm ran before the boundary existed, so training is bit-identical.

use anyhow::{anyhow, bail, Result};
use ndarray::parallel::prelude::*;
use ndarray::{ArrayD, ArrayView1, ArrayView2, ArrayView4, Ix1, Ix2, Ix4, Zip};

use super::{Backend, BnGrads, ConvGrads, GemmGrads, LnGrads, Update};
use crate::engine::ops::{
    Activation, AveragePool2d, BatchNorm2d, BatchNormSaved, Conv2d, Gemm, GlobalAveragePool,
    GroupNorm, LayerNorm, LayerNormSaved, MaxPool2d, MaxPoolSaved,
};
use crate::engine::stat_sync::StatSync;
use crate::engine::tensor_ops as t;
use crate::engine::tensor_ops::BinOp;

/// Host memory, OpenBLAS and rayon: the engine's kernels as they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuBackend;

fn view4(a: &ArrayD<f32>) -> Result<ArrayView4<'_, f32>> {
    a.view()
        .into_dimensionality::<Ix4>()
        .map_err(|_| anyhow!("expected a rank-4 tensor, got {:?}", a.shape()))
}

fn view2(a: &ArrayD<f32>) -> Result<ArrayView2<'_, f32>> {
    a.view()
        .into_dimensionality::<Ix2>()
        .map_err(|_| anyhow!("expected a rank-2 tensor, got {:?}", a.shape()))
}

fn view1(a: &ArrayD<f32>) -> Result<ArrayView1<'_, f32>> {
    a.view()
        .into_dimensionality::<Ix1>()
        .map_err(|_| anyhow!("expected a rank-1 parameter, got {:?}", a.shape()))
}

fn same_shape(op: &str, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<()> {
    if a.shape() != b.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", a.shape(), b.shape());
    }
    Ok(())
}

/// Fewest elements per task of the parallel elementwise loops below (ndarray's `Zip` on rayon);
/// shorter tensors run on the calling thread.
///
/// The optimiser update, the gradient accumulation (a value read twice, every residual join) and
/// the gradients' zeroing ran on one thread, outside any op's time in `--profile`: an update of
/// resnet18's 11.2M parameters reads and writes five streams of 45 MB, which a second thread
/// could only wait on. Elementwise, so the same results on any thread count.
const CHUNK: usize = crate::engine::ops::ELEMWISE_CHUNK;

impl Backend for CpuBackend {
    type Tensor = ArrayD<f32>;
    type BnSaved = BatchNormSaved;
    type PoolSaved = MaxPoolSaved;
    type LnSaved = LayerNormSaved;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn upload(&self, a: ArrayD<f32>) -> ArrayD<f32> {
        a
    }

    fn download(&self, t: &ArrayD<f32>) -> ArrayD<f32> {
        t.clone()
    }

    fn with_host<R>(&self, t: &ArrayD<f32>, f: impl FnOnce(&ArrayD<f32>) -> R) -> R {
        f(t)
    }

    fn with_host_mut<R>(&self, t: &mut ArrayD<f32>, f: impl FnOnce(&mut ArrayD<f32>) -> R) -> R {
        f(t)
    }

    fn dims<'a>(&self, t: &'a ArrayD<f32>) -> &'a [usize] {
        t.shape()
    }

    fn zeros(&self, shape: &[usize]) -> ArrayD<f32> {
        ArrayD::zeros(shape)
    }

    fn fill(&self, t: &mut ArrayD<f32>, value: f32) {
        Zip::from(t)
            .into_par_iter()
            .with_min_len(CHUNK)
            .for_each(|(v,)| *v = value);
    }

    fn add_assign(&self, acc: &mut ArrayD<f32>, g: &ArrayD<f32>) -> Result<()> {
        same_shape("gradient accumulation", acc, g)?;
        if let (Some(a), Some(g)) = (acc.as_slice_mut(), g.as_slice()) {
            crate::engine::ops::par_add_assign(a, g);
            return Ok(());
        }
        Zip::from(acc)
            .and(g)
            .into_par_iter()
            .with_min_len(CHUNK)
            .for_each(|(a, &b)| *a += b);
        Ok(())
    }

    fn mul(&self, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        same_shape("Mul", a, b)?;
        Ok(a * b)
    }

    fn conv_forward(
        &self,
        op: &Conv2d,
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        b: Option<&ArrayD<f32>>,
    ) -> Result<ArrayD<f32>> {
        let b = b.map(view1).transpose()?;
        Ok(op.forward(view4(x)?, view4(w)?, b)?.into_dyn())
    }

    fn conv_backward(
        &self,
        op: &Conv2d,
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        dy: ArrayD<f32>,
        needs_dx: bool,
        needs_db: bool,
    ) -> Result<ConvGrads<ArrayD<f32>>> {
        let g = op.backward_with(view4(x)?, view4(w)?, view4(&dy)?, needs_dx, needs_db)?;
        Ok(conv_grads(g))
    }

    fn conv_backward_adding(
        &self,
        op: &Conv2d,
        x: &ArrayD<f32>,
        w: &ArrayD<f32>,
        dy: ArrayD<f32>,
        acc: ArrayD<f32>,
        needs_db: bool,
    ) -> Result<ConvGrads<ArrayD<f32>>> {
        let acc = acc.into_dimensionality::<Ix4>()?;
        let g = op.backward_adding(view4(x)?, view4(w)?, view4(&dy)?, acc, needs_db)?;
        Ok(conv_grads(g))
    }

    fn gemm_forward(
        &self,
        op: &Gemm,
        a: &ArrayD<f32>,
        b: &ArrayD<f32>,
        c: Option<&ArrayD<f32>>,
    ) -> Result<ArrayD<f32>> {
        Ok(op
            .forward(view2(a)?, view2(b)?, c.map(|c| c.view()))?
            .into_dyn())
    }

    fn gemm_backward(
        &self,
        op: &Gemm,
        a: &ArrayD<f32>,
        b: &ArrayD<f32>,
        c_shape: Option<&[usize]>,
        dy: ArrayD<f32>,
    ) -> Result<GemmGrads<ArrayD<f32>>> {
        let g = op.backward(view2(a)?, view2(b)?, c_shape, view2(&dy)?)?;
        Ok(GemmGrads {
            da: g.da.into_dyn(),
            db: g.db.into_dyn(),
            dc: g.dc,
        })
    }

    fn bn_forward_train(
        &self,
        op: &BatchNorm2d,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        bias: &ArrayD<f32>,
        running_mean: &mut ArrayD<f32>,
        running_var: &mut ArrayD<f32>,
        sync: Option<&dyn StatSync>,
    ) -> Result<(ArrayD<f32>, BatchNormSaved)> {
        let (y, saved) = op.forward_train_synced(
            view4(x)?,
            view1(scale)?,
            view1(bias)?,
            running_mean.view_mut().into_dimensionality::<Ix1>()?,
            running_var.view_mut().into_dimensionality::<Ix1>()?,
            sync,
        )?;
        Ok((y.into_dyn(), saved))
    }

    fn bn_add_forward_train(
        &self,
        op: &BatchNorm2d,
        x: &ArrayD<f32>,
        r: &ArrayD<f32>,
        relu: bool,
        scale: &ArrayD<f32>,
        bias: &ArrayD<f32>,
        running_mean: &mut ArrayD<f32>,
        running_var: &mut ArrayD<f32>,
        sync: Option<&dyn StatSync>,
    ) -> Result<(ArrayD<f32>, BatchNormSaved)> {
        // One pass where the join needs no broadcast; else the two ops.
        if r.shape() != x.shape() {
            let (y, saved) =
                self.bn_forward_train(op, x, scale, bias, running_mean, running_var, sync)?;
            return Ok((self.residual_join(&y, r, relu)?, saved));
        }
        let (z, saved) = op.forward_train_add_synced(
            view4(x)?,
            view4(r)?,
            relu,
            view1(scale)?,
            view1(bias)?,
            running_mean.view_mut().into_dimensionality::<Ix1>()?,
            running_var.view_mut().into_dimensionality::<Ix1>()?,
            sync,
        )?;
        Ok((z.into_dyn(), saved))
    }

    fn bn_forward_eval(
        &self,
        op: &BatchNorm2d,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        bias: &ArrayD<f32>,
        mean: &ArrayD<f32>,
        var: &ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(op
            .forward_eval(
                view4(x)?,
                view1(scale)?,
                view1(bias)?,
                view1(mean)?,
                view1(var)?,
            )?
            .into_dyn())
    }

    fn bn_backward_train(
        &self,
        op: &BatchNorm2d,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        saved: &BatchNormSaved,
        dy: ArrayD<f32>,
        sync: Option<&dyn StatSync>,
    ) -> Result<BnGrads<ArrayD<f32>>> {
        // `dy` is taken: batch norm writes `dx` into its buffer.
        let shape = dy.shape().to_vec();
        let dy = dy
            .into_dimensionality::<Ix4>()
            .map_err(|_| anyhow!("expected a rank-4 tensor, got {shape:?}"))?;
        let g = op.backward_train_synced(view4(x)?, view1(scale)?, saved, dy, sync)?;
        Ok(BnGrads {
            dx: g.dx.into_dyn(),
            dscale: g.dscale.into_dyn(),
            dbias: g.dbias.into_dyn(),
        })
    }

    fn layer_norm_forward(
        &self,
        op: &LayerNorm,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        bias: &ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, LayerNormSaved)> {
        Ok(op.forward(x.view(), scale.view(), Some(bias.view()))?)
    }

    fn layer_norm_backward(
        &self,
        op: &LayerNorm,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        saved: &LayerNormSaved,
        dy: ArrayD<f32>,
    ) -> Result<LnGrads<ArrayD<f32>>> {
        let g = op.backward(x.view(), scale.view(), saved, dy.view())?;
        Ok(LnGrads {
            dx: g.dx,
            dscale: g.dscale,
            dbias: g.dbias,
        })
    }

    fn group_norm_forward(
        &self,
        op: &GroupNorm,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        bias: &ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, LayerNormSaved)> {
        Ok(op.forward(x.view(), scale.view(), bias.view())?)
    }

    fn group_norm_backward(
        &self,
        op: &GroupNorm,
        x: &ArrayD<f32>,
        scale: &ArrayD<f32>,
        saved: &LayerNormSaved,
        dy: ArrayD<f32>,
    ) -> Result<LnGrads<ArrayD<f32>>> {
        let g = op.backward(x.view(), scale.view(), saved, dy.view())?;
        Ok(LnGrads {
            dx: g.dx,
            dscale: g.dscale,
            dbias: g.dbias,
        })
    }

    fn act_forward(&self, op: &Activation, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(op.forward(x.view())?)
    }

    fn act_backward(
        &self,
        op: &Activation,
        x: &ArrayD<f32>,
        dy: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(op.backward(x.view(), dy.view())?)
    }

    fn binary_forward(&self, op: BinOp, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(t::binary_forward(op, a.view(), b.view())?)
    }

    fn binary_backward(
        &self,
        op: BinOp,
        a: &ArrayD<f32>,
        b: &ArrayD<f32>,
        dy: ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        Ok(t::binary_backward(op, a.view(), b.view(), dy))
    }

    fn add_relu_forward(&self, a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(t::add_relu_forward(a.view(), b.view())?)
    }

    fn add_relu_backward(
        &self,
        a: &ArrayD<f32>,
        b: &ArrayD<f32>,
        z: &ArrayD<f32>,
        dz: ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        Ok(t::add_relu_backward(a.view(), b.view(), z.view(), dz)?)
    }

    fn max_pool_forward(
        &self,
        op: &MaxPool2d,
        x: &ArrayD<f32>,
    ) -> Result<(ArrayD<f32>, MaxPoolSaved)> {
        let (y, saved) = op.forward(view4(x)?)?;
        Ok((y.into_dyn(), saved))
    }

    fn max_pool_backward(
        &self,
        op: &MaxPool2d,
        saved: &MaxPoolSaved,
        dy: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(op.backward(saved, view4(&dy)?)?.into_dyn())
    }

    fn avg_pool_forward(&self, op: &AveragePool2d, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(op.forward(view4(x)?)?.into_dyn())
    }

    fn avg_pool_backward(
        &self,
        op: &AveragePool2d,
        x_shape: &[usize],
        dy: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(op.backward(x_shape, view4(&dy)?)?.into_dyn())
    }

    fn global_avg_pool_forward(&self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(GlobalAveragePool.forward(view4(x)?)?.into_dyn())
    }

    fn global_avg_pool_backward(&self, x_shape: &[usize], dy: ArrayD<f32>) -> Result<ArrayD<f32>> {
        Ok(GlobalAveragePool.backward(x_shape, view4(&dy)?)?.into_dyn())
    }

    fn reduce_mean(&self, x: &ArrayD<f32>, axes: &[usize]) -> Result<ArrayD<f32>> {
        Ok(t::reduce_mean(x.view(), axes))
    }

    fn reduce_mean_backward(
        &self,
        x_shape: &[usize],
        axes: &[usize],
        dy: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(t::reduce_mean_backward(x_shape, axes, dy.view()))
    }

    fn reshape(&self, x: &ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
        Ok(t::reshape(x.view(), shape)?)
    }

    fn reshape_owned(&self, x: ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
        Ok(t::reshape_owned(x, shape)?)
    }

    fn transpose(&self, x: &ArrayD<f32>, perm: &[usize]) -> Result<ArrayD<f32>> {
        Ok(t::transpose(x.view(), perm))
    }

    fn concat(&self, axis: usize, xs: &[&ArrayD<f32>]) -> Result<ArrayD<f32>> {
        let views: Vec<_> = xs.iter().map(|a| a.view()).collect();
        Ok(t::concat(axis, &views)?)
    }

    fn split(&self, axis: usize, sizes: &[usize], x: &ArrayD<f32>) -> Result<Vec<ArrayD<f32>>> {
        Ok(t::split(axis, sizes, x.view())?)
    }

    fn take(&self, x: &ArrayD<f32>, idx: &[Vec<usize>]) -> Result<ArrayD<f32>> {
        Ok(t::take(x.view(), idx))
    }

    fn take_backward(
        &self,
        x_shape: &[usize],
        idx: &[Vec<usize>],
        dy: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(t::take_backward(x_shape, idx, dy.view()))
    }

    fn pad(&self, x: &ArrayD<f32>, pads: &[(i64, i64)], value: f32) -> Result<ArrayD<f32>> {
        Ok(t::pad(x.view(), pads, value))
    }

    fn pad_backward(
        &self,
        x_shape: &[usize],
        pads: &[(i64, i64)],
        dy: ArrayD<f32>,
    ) -> Result<ArrayD<f32>> {
        Ok(t::pad_backward(x_shape, pads, dy.view()))
    }

    fn update(
        &self,
        rule: &Update,
        w: &mut ArrayD<f32>,
        g: &ArrayD<f32>,
        m: &mut ArrayD<f32>,
        v: Option<&mut ArrayD<f32>>,
    ) -> Result<()> {
        same_shape("optimiser update", w, g)?;
        same_shape("optimiser update", w, m)?;
        let value = w
            .as_slice_mut()
            .ok_or_else(|| anyhow!("parameters are contiguous"))?;
        let grad = g
            .as_slice()
            .ok_or_else(|| anyhow!("gradients are contiguous"))?;
        let m = m
            .as_slice_mut()
            .ok_or_else(|| anyhow!("moments are contiguous"))?;
        match *rule {
            Update::Sgd {
                lr,
                decay,
                momentum,
                nesterov,
                first,
            } => {
                Zip::from(value)
                    .and(grad)
                    .and(m)
                    .into_par_iter()
                    .with_min_len(CHUNK)
                    .for_each(|(w, &g, b)| {
                        let g = g + decay * *w;
                        *b = if first || momentum == 0.0 {
                            g
                        } else {
                            momentum * *b + g
                        };
                        let d = if nesterov { g + momentum * *b } else { *b };
                        *w -= lr * d;
                    });
            }
            Update::AdamW {
                lr,
                decay,
                beta1,
                beta2,
                eps,
                step,
                bc2_sqrt,
            } => {
                let v = v.ok_or_else(|| anyhow!("AdamW needs its second moment"))?;
                same_shape("optimiser update", g, v)?;
                let v = v
                    .as_slice_mut()
                    .ok_or_else(|| anyhow!("moments are contiguous"))?;
                Zip::from(value)
                    .and(grad)
                    .and(m)
                    .and(v)
                    .into_par_iter()
                    .with_min_len(CHUNK)
                    .for_each(|(w, &g, m, v)| {
                        *w *= 1.0 - lr * decay;
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        *w -= step * *m / ((*v).sqrt() / bc2_sqrt + eps);
                    });
            }
        }
        Ok(())
    }
}

/// A conv's gradients as the backend's dynamic-rank tensors.
fn conv_grads(g: crate::engine::ops::Conv2dGrads) -> ConvGrads<ArrayD<f32>> {
    ConvGrads {
        dx: g.dx.map(|d| d.into_dyn()),
        dw: g.dw.into_dyn(),
        db: g.db.into_dyn(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{s, IxDyn};

    fn ramp(n: usize, k: f32) -> ArrayD<f32> {
        let v = (0..n).map(|i| ((i % 977) as f32 - 400.0) * k).collect();
        ArrayD::from_shape_vec(IxDyn(&[n]), v).unwrap()
    }

    fn bits(a: &ArrayD<f32>) -> Vec<u32> {
        a.iter().map(|v| v.to_bits()).collect()
    }

    /// The chunked parallel update, accumulation and fill on two threads equal the same calls on
    /// pieces short enough to run on the calling thread, bit for bit (SGD with Nesterov, AdamW).
    #[test]
    fn parallel_elementwise_helpers_equal_the_serial_path_bitwise() {
        let n = 5 * CHUNK + 123;
        let piece = CHUNK + 7; // below 2 * CHUNK: one task on the calling thread
        let rules = [
            Update::Sgd {
                lr: 0.05,
                decay: 5e-4,
                momentum: 0.9,
                nesterov: true,
                first: false,
            },
            Update::AdamW {
                lr: 1e-3,
                decay: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                step: 1e-2,
                bc2_sqrt: 0.3,
            },
        ];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let be = CpuBackend;
        for rule in rules {
            let (w0, g, m0) = (ramp(n, 1e-3), ramp(n, 3e-4), ramp(n, 1e-4));
            let v0 = ramp(n, 2e-6).mapv(f32::abs);
            let (mut w, mut m, mut v) = (w0.clone(), m0.clone(), v0.clone());
            let mut acc = ramp(n, 7e-4);
            let acc0 = acc.clone();
            pool.install(|| {
                be.update(&rule, &mut w, &g, &mut m, Some(&mut v)).unwrap();
                be.add_assign(&mut acc, &g).unwrap();
            });
            for a in (0..n).step_by(piece) {
                let r = s![a..(a + piece).min(n)];
                let part = |t: &ArrayD<f32>| t.slice(r).to_owned().into_dyn();
                let (mut pw, pg, mut pm, mut pv) = (part(&w0), part(&g), part(&m0), part(&v0));
                be.update(&rule, &mut pw, &pg, &mut pm, Some(&mut pv))
                    .unwrap();
                assert_eq!(bits(&pw), bits(&part(&w)), "{rule:?} w at {a}");
                assert_eq!(bits(&pm), bits(&part(&m)), "{rule:?} m at {a}");
                assert_eq!(bits(&pv), bits(&part(&v)), "{rule:?} v at {a}");
                let mut pacc = part(&acc0);
                be.add_assign(&mut pacc, &pg).unwrap();
                assert_eq!(bits(&pacc), bits(&part(&acc)), "accumulation at {a}");
            }
            pool.install(|| be.fill(&mut acc, 0.25));
            assert!(acc.iter().all(|&v| v == 0.25));
        }
    }
}
