//! Runs a [`Program`]: forward keeps what backward needs; backward runs the steps in reverse,
//! accumulating gradients into slots (a value read twice sums both gradients) and parameters.

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, ArrayView1, ArrayView2, ArrayView4, ArrayViewD, Ix1, Ix2, Ix4, IxDyn};

use super::ops::{BatchNormSaved, GlobalAveragePool, MaxPoolSaved};
use super::program::{Kernel, Program, Src, Step};
use super::tensor_ops as t;
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Batch statistics in BN (running statistics updated), dropout active, values kept for
    /// backward.
    Train,
    /// Running statistics, no dropout, values freed as soon as they are dead.
    Eval,
}

/// What a step kept from forward for its backward, beyond its inputs.
enum Saved {
    None,
    Bn(BatchNormSaved),
    MaxPool(MaxPoolSaved),
    Mask(ArrayD<f32>),
}

/// Forward/backward state over one program.
pub struct Session {
    pub program: Program,
    values: Vec<Option<ArrayD<f32>>>,
    saved: Vec<Saved>,
    /// Step at which each slot is read for the last time (for freeing in eval).
    last_use: Vec<usize>,
    /// Dropout masks come from `(dropout_seed, dropout_step, node)`, so a resumed run draws the
    /// same masks as an uninterrupted one; the trainer sets the step before each forward.
    pub dropout_seed: u64,
    pub dropout_step: u64,
    /// Seconds spent per op type, forward and backward, when profiling is on.
    pub profile: Option<std::collections::BTreeMap<(&'static str, bool), f64>>,
    /// `--sync-bn`: training-mode BN sums its per-channel statistics through this (over the
    /// processes of a data-parallel run); `None`, the default, keeps them local.
    pub stat_sync: Option<std::sync::Arc<dyn super::stat_sync::StatSync>>,
}

fn view4<'a>(a: &'a ArrayD<f32>, step: &Step) -> Result<ArrayView4<'a, f32>> {
    a.view().into_dimensionality::<Ix4>().map_err(|_| {
        anyhow!(
            "node '{}': expected a rank-4 tensor, got {:?}",
            step.name,
            a.shape()
        )
    })
}

fn view2<'a>(a: &'a ArrayD<f32>, step: &Step) -> Result<ArrayView2<'a, f32>> {
    a.view().into_dimensionality::<Ix2>().map_err(|_| {
        anyhow!(
            "node '{}': expected a rank-2 tensor, got {:?}",
            step.name,
            a.shape()
        )
    })
}

fn view1<'a>(a: &'a ArrayD<f32>) -> ArrayView1<'a, f32> {
    a.view()
        .into_dimensionality::<Ix1>()
        .expect("rank-1 parameter")
}

impl Session {
    pub fn new(program: Program) -> Session {
        let mut last_use = vec![0; program.n_slots];
        for (i, s) in program.steps.iter().enumerate() {
            for src in &s.inputs {
                if let Src::Slot(k) = src {
                    last_use[*k] = i;
                }
            }
        }
        last_use[program.output_slot] = usize::MAX;
        Session {
            values: vec![None; program.n_slots],
            saved: Vec::new(),
            last_use,
            program,
            dropout_seed: 0,
            dropout_step: 0,
            profile: None,
            stat_sync: None,
        }
    }

    fn get(&self, src: Src) -> Result<&ArrayD<f32>> {
        Ok(match src {
            Src::Slot(k) => self.values[k].as_ref().ok_or_else(|| {
                anyhow!("value slot {k} read before it was computed or after it was freed")
            })?,
            Src::Param(p) => &self.program.params[p].value,
            Src::Const(c) => &self.program.consts[c],
        })
    }

    /// Runs the network on a batch `[N, C, H, W]`, returning the logits `[N, K]`.
    pub fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.values.iter_mut().for_each(|v| *v = None);
        self.saved.clear();
        self.values[self.program.input_slot] = Some(x);
        for i in 0..self.program.steps.len() {
            let t0 = std::time::Instant::now();
            let (outs, saved) = self.run_step(i, mode).with_context(|| {
                format!(
                    "node '{}' ({})",
                    self.program.steps[i].name, self.program.steps[i].op_type
                )
            })?;
            if let Some(p) = &mut self.profile {
                *p.entry((self.program.steps[i].profile_key, false))
                    .or_default() += t0.elapsed().as_secs_f64();
            }
            let step = &self.program.steps[i];
            for (slot, v) in step.outputs.clone().into_iter().zip(outs) {
                self.values[slot] = Some(v);
            }
            if mode == Mode::Eval {
                for src in step.inputs.clone() {
                    if let Src::Slot(k) = src {
                        if self.last_use[k] == i {
                            self.values[k] = None;
                        }
                    }
                }
            } else {
                self.saved.push(saved);
            }
        }
        self.values[self.program.output_slot]
            .clone()
            .ok_or_else(|| anyhow!("the output was not computed"))
    }

    /// Eval-mode forward that keeps every step's first output, by node name, in run order: the
    /// engine's side of locating where another runtime's outputs part from ours.
    pub fn forward_trace(&mut self, x: ArrayD<f32>) -> Result<Vec<(String, ArrayD<f32>)>> {
        self.values.iter_mut().for_each(|v| *v = None);
        self.saved.clear();
        self.values[self.program.input_slot] = Some(x);
        let mut trace = Vec::with_capacity(self.program.steps.len());
        for i in 0..self.program.steps.len() {
            let (outs, _) = self.run_step(i, Mode::Eval).with_context(|| {
                format!(
                    "node '{}' ({})",
                    self.program.steps[i].name, self.program.steps[i].op_type
                )
            })?;
            let step = &self.program.steps[i];
            if let Some(o) = outs.first() {
                // A fused step's output is its absorbed node's (the Relu after a BN).
                let name = step.absorbed.as_ref().unwrap_or(&step.name);
                trace.push((name.clone(), o.clone()));
            }
            for (slot, v) in step.outputs.clone().into_iter().zip(outs) {
                self.values[slot] = Some(v);
            }
        }
        Ok(trace)
    }

    fn run_step(&mut self, i: usize, mode: Mode) -> Result<(Vec<ArrayD<f32>>, Saved)> {
        let step = &self.program.steps[i];
        let x = self.get(step.inputs[0])?;
        let one = |a: ArrayD<f32>| (vec![a], Saved::None);
        Ok(match &step.kernel {
            Kernel::Conv(op) => {
                let w = self.get(step.inputs[1])?;
                let b = match step.inputs.get(2) {
                    Some(&s) => Some(view1(self.get(s)?)),
                    None => None,
                };
                one(op.forward(view4(x, step)?, view4(w, step)?, b)?.into_dyn())
            }
            Kernel::BatchNorm { op, mean, var } => {
                let scale = view1(self.get(step.inputs[1])?);
                let bias = view1(self.get(step.inputs[2])?);
                let x4 = view4(x, step)?;
                if mode == Mode::Train {
                    let (m, v) = (*mean, *var);
                    let (mut rm, mut rv) = (
                        self.program.state[m].1.clone(),
                        self.program.state[v].1.clone(),
                    );
                    let (y, saved) = op.forward_train_synced(
                        x4,
                        scale,
                        bias,
                        rm.view_mut().into_dimensionality::<Ix1>()?,
                        rv.view_mut().into_dimensionality::<Ix1>()?,
                        self.stat_sync.as_deref(),
                    )?;
                    self.program.state[m].1 = rm;
                    self.program.state[v].1 = rv;
                    (vec![y.into_dyn()], Saved::Bn(saved))
                } else {
                    let rm = view1(&self.program.state[*mean].1);
                    let rv = view1(&self.program.state[*var].1);
                    one(op.forward_eval(x4, scale, bias, rm, rv)?.into_dyn())
                }
            }
            Kernel::Act(a) => one(a.forward(x.view())?),
            Kernel::Binary(op) => {
                let y = self.get(step.inputs[1])?;
                one(t::binary_forward(*op, x.view(), y.view())?)
            }
            Kernel::AddRelu => {
                let y = self.get(step.inputs[1])?;
                one(t::add_relu_forward(x.view(), y.view())?)
            }
            Kernel::Concat { axis } => {
                let views: Vec<ArrayViewD<f32>> = step
                    .inputs
                    .iter()
                    .map(|&s| self.get(s).map(|a| a.view()))
                    .collect::<Result<_>>()?;
                one(t::concat(*axis, &views)?)
            }
            Kernel::Split { axis, sizes } => (t::split(*axis, sizes, x.view())?, Saved::None),
            Kernel::MaxPool(op) => {
                let (y, saved) = op.forward(view4(x, step)?)?;
                (vec![y.into_dyn()], Saved::MaxPool(saved))
            }
            Kernel::AvgPool(op) => one(op.forward(view4(x, step)?)?.into_dyn()),
            Kernel::GlobalAvgPool => one(GlobalAveragePool.forward(view4(x, step)?)?.into_dyn()),
            Kernel::ReduceMean { axes, out_tail } => {
                let y = t::reduce_mean(x.view(), axes);
                let mut shape = vec![x.shape()[0]];
                shape.extend(out_tail);
                one(t::reshape(y.view(), &shape)?)
            }
            Kernel::Reshape {
                tail,
                batch_major,
                fixed,
            } => {
                let shape = if *batch_major {
                    let mut s = vec![x.shape()[0]];
                    s.extend(tail);
                    s
                } else {
                    fixed.clone()
                };
                one(t::reshape(x.view(), &shape)?)
            }
            Kernel::Transpose { perm } => one(t::transpose(x.view(), perm)),
            Kernel::Slice(s) => {
                let idx = crate::ir::shape::slice_indices(x.shape(), s)?;
                one(t::take(x.view(), &idx))
            }
            Kernel::Pad { pads, value } => one(t::pad(x.view(), pads, *value)),
            Kernel::Gemm(op) => {
                let b = self.get(step.inputs[1])?;
                let c = match step.inputs.get(2) {
                    Some(&s) => Some(self.get(s)?.view()),
                    None => None,
                };
                one(op.forward(view2(x, step)?, view2(b, step)?, c)?.into_dyn())
            }
            Kernel::Dropout { ratio } => {
                if mode == Mode::Eval || *ratio <= 0.0 {
                    one(x.clone())
                } else {
                    let keep = 1.0 - ratio;
                    let mut rng = Rng::derive(self.dropout_seed, &[self.dropout_step, i as u64]);
                    let mask = ArrayD::from_shape_fn(x.raw_dim(), |_| {
                        if rng.uniform() < keep {
                            1.0 / keep
                        } else {
                            0.0
                        }
                    });
                    (vec![x * &mask], Saved::Mask(mask))
                }
            }
        })
    }

    /// Backward from `dlogits`; parameter gradients are overwritten (not accumulated across
    /// calls). Must follow a `Train` forward.
    pub fn backward(&mut self, dlogits: ArrayD<f32>) -> Result<()> {
        if self.saved.len() != self.program.steps.len() {
            bail!("backward needs a training-mode forward first");
        }
        for p in &mut self.program.params {
            p.grad.fill(0.0);
        }
        let mut grads: Vec<Option<ArrayD<f32>>> = vec![None; self.program.n_slots];
        grads[self.program.output_slot] = Some(dlogits);
        for i in (0..self.program.steps.len()).rev() {
            let step = &self.program.steps[i];
            let dys: Vec<Option<ArrayD<f32>>> =
                step.outputs.iter().map(|&o| grads[o].take()).collect();
            if dys.iter().all(Option::is_none) {
                continue;
            }
            let t0 = std::time::Instant::now();
            let din = self
                .step_backward(i, dys)
                .with_context(|| format!("backward of node '{}' ({})", step.name, step.op_type))?;
            if let Some(p) = &mut self.profile {
                *p.entry((self.program.steps[i].profile_key, true))
                    .or_default() += t0.elapsed().as_secs_f64();
            }
            let step = &self.program.steps[i];
            for (src, g) in step.inputs.clone().into_iter().zip(din) {
                let Some(g) = g else { continue };
                match src {
                    Src::Slot(k) => match &mut grads[k] {
                        Some(acc) => *acc += &g,
                        slot @ None => *slot = Some(g),
                    },
                    Src::Param(p) => self.program.params[p].grad += &g,
                    Src::Const(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Gradients of the step's inputs (None where no gradient flows or none is needed).
    fn step_backward(
        &self,
        i: usize,
        mut dys: Vec<Option<ArrayD<f32>>>,
    ) -> Result<Vec<Option<ArrayD<f32>>>> {
        let step = &self.program.steps[i];
        let x = self.get(step.inputs[0])?;
        let needs_dx = step.inputs[0] != Src::Slot(self.program.input_slot);
        // Single-output steps: the one gradient, moved out (each branch takes it at most once;
        // a clone here used to copy a whole activation per step).
        let mut dy0 = if matches!(step.kernel, Kernel::Split { .. }) {
            None
        } else {
            dys.first_mut().and_then(Option::take)
        };
        let mut dy = || -> Result<ArrayD<f32>> {
            dy0.take()
                .ok_or_else(|| anyhow!("no gradient for the output"))
        };
        Ok(match (&step.kernel, &self.saved[i]) {
            (Kernel::Conv(op), _) => {
                let w = self.get(step.inputs[1])?;
                let dy = dy()?;
                let g = op.backward(
                    view4(x, step)?,
                    view4(w, step)?,
                    view4(&dy, step)?,
                    needs_dx,
                )?;
                let mut out = vec![g.dx.map(|d| d.into_dyn()), Some(g.dw.into_dyn())];
                if step.inputs.len() > 2 {
                    out.push(Some(g.db.into_dyn()));
                }
                out
            }
            (Kernel::BatchNorm { op, .. }, Saved::Bn(saved)) => {
                let scale = view1(self.get(step.inputs[1])?);
                let dy = dy()?;
                let g = op.backward_train_synced(
                    view4(x, step)?,
                    scale,
                    saved,
                    view4(&dy, step)?,
                    self.stat_sync.as_deref(),
                )?;
                vec![
                    Some(g.dx.into_dyn()),
                    Some(g.dscale.into_dyn()),
                    Some(g.dbias.into_dyn()),
                ]
            }
            (Kernel::Act(a), _) => vec![Some(a.backward(x.view(), dy()?.view())?)],
            (Kernel::Binary(op), _) => {
                let y = self.get(step.inputs[1])?;
                let (da, db) = t::binary_backward(*op, x.view(), y.view(), dy()?);
                vec![Some(da), Some(db)]
            }
            (Kernel::AddRelu, _) => {
                let y = self.get(step.inputs[1])?;
                let z = self.get(Src::Slot(step.outputs[0]))?;
                let (da, db) = t::add_relu_backward(x.view(), y.view(), z.view(), dy()?)?;
                vec![Some(da), Some(db)]
            }
            (Kernel::Concat { axis }, _) => {
                let sizes: Vec<usize> = step
                    .inputs
                    .iter()
                    .map(|&s| self.get(s).map(|a| a.shape()[*axis]))
                    .collect::<Result<_>>()?;
                t::split(*axis, &sizes, dy()?.view())?
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            (Kernel::Split { axis, .. }, _) => {
                let parts: Vec<ArrayD<f32>> = dys
                    .iter()
                    .enumerate()
                    .map(|(k, g)| {
                        g.clone().unwrap_or_else(|| {
                            let mut shape = x.shape().to_vec();
                            if let Kernel::Split { sizes, .. } = &step.kernel {
                                shape[*axis] = sizes[k];
                            }
                            ArrayD::zeros(IxDyn(&shape))
                        })
                    })
                    .collect();
                let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
                vec![Some(t::concat(*axis, &views)?)]
            }
            (Kernel::MaxPool(op), Saved::MaxPool(saved)) => {
                let dy = dy()?;
                vec![Some(op.backward(saved, view4(&dy, step)?)?.into_dyn())]
            }
            (Kernel::AvgPool(op), _) => {
                let dy = dy()?;
                vec![Some(op.backward(x.shape(), view4(&dy, step)?)?.into_dyn())]
            }
            (Kernel::GlobalAvgPool, _) => {
                let dy = dy()?;
                vec![Some(
                    GlobalAveragePool
                        .backward(x.shape(), view4(&dy, step)?)?
                        .into_dyn(),
                )]
            }
            (Kernel::ReduceMean { axes, .. }, _) => {
                vec![Some(t::reduce_mean_backward(x.shape(), axes, dy()?.view()))]
            }
            (Kernel::Reshape { .. }, _) => vec![Some(t::reshape(dy()?.view(), x.shape())?)],
            (Kernel::Transpose { perm }, _) => {
                vec![Some(t::transpose(dy()?.view(), &t::inverse_perm(perm)))]
            }
            (Kernel::Slice(s), _) => {
                let idx = crate::ir::shape::slice_indices(x.shape(), s)?;
                vec![Some(t::take_backward(x.shape(), &idx, dy()?.view()))]
            }
            (Kernel::Pad { pads, .. }, _) => {
                vec![Some(t::pad_backward(x.shape(), pads, dy()?.view()))]
            }
            (Kernel::Gemm(op), _) => {
                let b = self.get(step.inputs[1])?;
                let c_shape = match step.inputs.get(2) {
                    Some(&s) => Some(self.get(s)?.shape().to_vec()),
                    None => None,
                };
                let dy = dy()?;
                let g = op.backward(
                    view2(x, step)?,
                    view2(b, step)?,
                    c_shape.as_deref(),
                    view2(&dy, step)?,
                )?;
                let mut out = vec![Some(g.da.into_dyn()), Some(g.db.into_dyn())];
                if step.inputs.len() > 2 {
                    out.push(g.dc);
                }
                out
            }
            (Kernel::Dropout { .. }, Saved::Mask(mask)) => vec![Some(dy()? * mask)],
            (Kernel::Dropout { .. }, _) => vec![Some(dy()?)],
            (Kernel::BatchNorm { .. }, _) | (Kernel::MaxPool(_), _) => {
                bail!("forward did not keep what backward needs")
            }
        })
    }
}
