//! Runs a [`Program`]: forward keeps what backward needs; backward runs the steps in reverse,
//! accumulating gradients into slots (a value read twice sums both gradients) and parameters.
//!
//! The walk is backend-generic: every kernel runs through [`Backend`], so the same executor
//! drives the CPU kernels and, later, a device backend. Its public face takes and returns host
//! arrays (the input batch, the logits and their gradient); parameters, activations and
//! gradients stay in the backend's memory.

use anyhow::{anyhow, bail, Context, Result};
use ndarray::ArrayD;

use super::backend::{Backend, CpuBackend};
use super::program::{Kernel, Param, Program, Src};
use crate::engine::tensor_ops::BinOp;
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
enum Saved<B: Backend> {
    None,
    Bn(B::BnSaved),
    Ln(B::LnSaved),
    MaxPool(B::PoolSaved),
    Mask(B::Tensor),
}

/// Forward/backward state over one program, on backend `B` (the CPU unless said otherwise).
pub struct Session<B: Backend = CpuBackend> {
    pub backend: B,
    /// The program with its tensors in the backend's memory.
    pub program: Program<B::Tensor>,
    values: Vec<Option<B::Tensor>>,
    saved: Vec<Saved<B>>,
    /// Step at which each slot is read for the last time (for freeing in eval).
    last_use: Vec<usize>,
    /// Dropout masks come from `(dropout_seed, dropout_step, node)`, so a resumed run draws the
    /// same masks as an uninterrupted one; the trainer sets the step before each forward.
    pub dropout_seed: u64,
    pub dropout_step: u64,
    /// Seconds spent in each program step, `[forward, backward]`, then the other workers' idle
    /// seconds in them ([`super::awake::idle_time`]), when profiling is on (set it to a vector
    /// as long as the program's steps; `elrt speed --profile` sums it by kernel).
    pub profile: Option<Vec<[f64; 4]>>,
    /// `--sync-bn`: training-mode BN sums its per-channel statistics through this (over the
    /// processes of a data-parallel run); `None`, the default, keeps them local.
    pub stat_sync: Option<std::sync::Arc<dyn super::stat_sync::StatSync>>,
}

/// The tensor a step input names, from the session's parts (split so that BN can update the
/// running statistics while reading its inputs).
fn get<'a, T>(
    values: &'a [Option<T>],
    params: &'a [Param<T>],
    consts: &'a [T],
    src: Src,
) -> Result<&'a T> {
    Ok(match src {
        Src::Slot(k) => values[k].as_ref().ok_or_else(|| {
            anyhow!("value slot {k} read before it was computed or after it was freed")
        })?,
        Src::Param(p) => &params[p].value,
        Src::Const(c) => &consts[c],
    })
}

impl Session<CpuBackend> {
    /// A session on the CPU backend (the program's host arrays are moved in, not copied).
    pub fn new(program: Program) -> Session<CpuBackend> {
        Session::with_backend(CpuBackend, program)
    }
}

impl<B: Backend> Session<B> {
    /// A session on `backend`, the program's tensors uploaded to it.
    pub fn with_backend(backend: B, program: Program) -> Session<B> {
        let mut last_use = vec![0; program.n_slots];
        for (i, s) in program.steps.iter().enumerate() {
            for src in &s.inputs {
                if let Src::Slot(k) = src {
                    last_use[*k] = i;
                }
            }
        }
        last_use[program.output_slot] = usize::MAX;
        let program = program.map_tensors(|a| backend.upload(a));
        Session {
            values: (0..program.n_slots).map(|_| None).collect(),
            saved: Vec::new(),
            last_use,
            program,
            backend,
            dropout_seed: 0,
            dropout_step: 0,
            profile: None,
            stat_sync: None,
        }
    }

    fn get(&self, src: Src) -> Result<&B::Tensor> {
        get(
            &self.values,
            &self.program.params,
            &self.program.consts,
            src,
        )
    }

    /// Runs the network on a batch `[N, C, H, W]`, returning the logits `[N, K]`. The pool's
    /// other workers spin between the ops' parallel loops instead of sleeping
    /// ([`super::awake`]), as in [`Self::backward`].
    pub fn forward(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        super::awake::keep_awake(|| self.forward_awake(x, mode))
    }

    fn forward_awake(&mut self, x: ArrayD<f32>, mode: Mode) -> Result<ArrayD<f32>> {
        self.values.iter_mut().for_each(|v| *v = None);
        self.saved.clear();
        self.values[self.program.input_slot] = Some(self.backend.upload(x));
        for i in 0..self.program.steps.len() {
            // The idle clock's reading (64 atomics) only when profiling.
            let idle0 = self.profile.is_some().then(super::awake::idle_time);
            let t0 = std::time::Instant::now();
            let (outs, saved) = self.run_step(i, mode).with_context(|| {
                format!(
                    "node '{}' ({})",
                    self.program.steps[i].name, self.program.steps[i].op_type
                )
            })?;
            if let Some(t) = self.profile.as_mut().and_then(|p| p.get_mut(i)) {
                let wall = t0.elapsed().as_secs_f64();
                t[0] += wall;
                t[2] += idle_within(idle0.unwrap_or_default(), wall);
            }
            let step = &self.program.steps[i];
            for (slot, v) in step.outputs.iter().zip(outs) {
                self.values[*slot] = Some(v);
            }
            if mode == Mode::Eval {
                for src in &step.inputs {
                    if let Src::Slot(k) = *src {
                        if self.last_use[k] == i {
                            self.values[k] = None;
                        }
                    }
                }
            } else {
                self.saved.push(saved);
            }
        }
        let out = self.values[self.program.output_slot]
            .as_ref()
            .ok_or_else(|| anyhow!("the output was not computed"))?;
        Ok(self.backend.download(out))
    }

    /// Eval-mode forward that keeps every step's first output, by node name, in run order: the
    /// engine's side of locating where another runtime's outputs part from ours.
    pub fn forward_trace(&mut self, x: ArrayD<f32>) -> Result<Vec<(String, ArrayD<f32>)>> {
        self.values.iter_mut().for_each(|v| *v = None);
        self.saved.clear();
        self.values[self.program.input_slot] = Some(self.backend.upload(x));
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
                trace.push((name.clone(), self.backend.download(o)));
            }
            for (slot, v) in step.outputs.iter().zip(outs) {
                self.values[*slot] = Some(v);
            }
        }
        Ok(trace)
    }

    fn run_step(&mut self, i: usize, mode: Mode) -> Result<(Vec<B::Tensor>, Saved<B>)> {
        let Session {
            backend: be,
            program,
            values,
            ..
        } = self;
        let step = &program.steps[i];
        let get = |src: Src| get(values, &program.params, &program.consts, src);
        let x = get(step.inputs[0])?;
        let one = |a: B::Tensor| (vec![a], Saved::None);
        Ok(match &step.kernel {
            Kernel::Conv(op) => {
                let w = get(step.inputs[1])?;
                let b = step.inputs.get(2).map(|&s| get(s)).transpose()?;
                one(be.conv_forward(op, x, w, b)?)
            }
            Kernel::BatchNorm { op, mean, var } => {
                let scale = get(step.inputs[1])?;
                let bias = get(step.inputs[2])?;
                if mode == Mode::Train {
                    let (rm, rv) = running_stats(&mut program.state, *mean, *var)?;
                    let sync = self.stat_sync.as_deref();
                    let (y, saved) = be.bn_forward_train(op, x, scale, bias, rm, rv, sync)?;
                    (vec![y], Saved::Bn(saved))
                } else {
                    let rm = &program.state[*mean].1;
                    let rv = &program.state[*var].1;
                    one(be.bn_forward_eval(op, x, scale, bias, rm, rv)?)
                }
            }
            Kernel::BatchNormAdd {
                op,
                mean,
                var,
                relu,
            } => {
                let scale = get(step.inputs[1])?;
                let bias = get(step.inputs[2])?;
                let r = get(step.inputs[3])?;
                if mode == Mode::Train {
                    let (rm, rv) = running_stats(&mut program.state, *mean, *var)?;
                    let sync = self.stat_sync.as_deref();
                    let (z, saved) =
                        be.bn_add_forward_train(op, x, r, *relu, scale, bias, rm, rv, sync)?;
                    (vec![z], Saved::Bn(saved))
                } else {
                    let rm = &program.state[*mean].1;
                    let rv = &program.state[*var].1;
                    let y = be.bn_forward_eval(op, x, scale, bias, rm, rv)?;
                    one(be.residual_join(&y, r, *relu)?)
                }
            }
            Kernel::Act(a) => one(be.act_forward(a, x)?),
            Kernel::LayerNorm(op) => {
                let scale = get(step.inputs[1])?;
                let bias = get(step.inputs[2])?;
                let (y, saved) = be.layer_norm_forward(op, x, scale, bias)?;
                (vec![y], Saved::Ln(saved))
            }
            Kernel::GroupNorm(op) => {
                let scale = get(step.inputs[1])?;
                let bias = get(step.inputs[2])?;
                let (y, saved) = be.group_norm_forward(op, x, scale, bias)?;
                (vec![y], Saved::Ln(saved))
            }
            Kernel::Binary(op) => one(be.binary_forward(*op, x, get(step.inputs[1])?)?),
            Kernel::AddRelu => one(be.add_relu_forward(x, get(step.inputs[1])?)?),
            Kernel::Concat { axis } => {
                let xs: Vec<&B::Tensor> =
                    step.inputs.iter().map(|&s| get(s)).collect::<Result<_>>()?;
                one(be.concat(*axis, &xs)?)
            }
            Kernel::Split { axis, sizes } => (be.split(*axis, sizes, x)?, Saved::None),
            Kernel::MaxPool(op) => {
                let (y, saved) = be.max_pool_forward(op, x)?;
                (vec![y], Saved::MaxPool(saved))
            }
            Kernel::AvgPool(op) => one(be.avg_pool_forward(op, x)?),
            Kernel::GlobalAvgPool => one(be.global_avg_pool_forward(x)?),
            Kernel::ReduceMean { axes, out_tail } => {
                let y = be.reduce_mean(x, axes)?;
                let mut shape = vec![be.dims(x)[0]];
                shape.extend(out_tail);
                one(be.reshape(&y, &shape)?)
            }
            Kernel::Reshape {
                tail,
                batch_major,
                fixed,
            } => {
                let shape = if *batch_major {
                    let mut s = vec![be.dims(x)[0]];
                    s.extend(tail);
                    s
                } else {
                    fixed.clone()
                };
                one(be.reshape(x, &shape)?)
            }
            Kernel::Transpose { perm } => one(be.transpose(x, perm)?),
            Kernel::Slice(s) => {
                let idx = crate::ir::shape::slice_indices(be.dims(x), s)?;
                one(be.take(x, &idx)?)
            }
            Kernel::Gather {
                axis,
                list,
                out_tail,
            } => {
                let dims = be.dims(x).to_vec();
                let y = be.take(x, &gather_lists(&dims, *axis, list))?;
                let mut shape = vec![dims[0]];
                shape.extend(out_tail);
                one(be.reshape(&y, &shape)?)
            }
            Kernel::Pad { pads, value } => one(be.pad(x, pads, *value)?),
            Kernel::Gemm(op) => {
                let b = get(step.inputs[1])?;
                let c = step.inputs.get(2).map(|&s| get(s)).transpose()?;
                let dims = be.dims(x);
                if dims.len() > 2 {
                    // A MatMul of a channels-last activation by a weight: one GEMM over all
                    // its rows (every pixel of every image).
                    let rows = dims[..dims.len() - 1].iter().product();
                    let x2 = be.reshape(x, &[rows, dims[dims.len() - 1]])?;
                    let y = be.gemm_forward(op, &x2, b, c)?;
                    let mut shape = dims[..dims.len() - 1].to_vec();
                    shape.push(be.dims(&y)[1]);
                    one(be.reshape(&y, &shape)?)
                } else {
                    one(be.gemm_forward(op, x, b, c)?)
                }
            }
            Kernel::Dropout { ratio } => {
                if mode == Mode::Eval || *ratio <= 0.0 {
                    one(x.clone())
                } else {
                    // The mask is drawn on the host from the keyed stream, so every backend
                    // drops the same units for the same (seed, step, node); in parallel pieces
                    // with the bits of a serial loop (`Rng::par_fill_uniform`: drawn one by one
                    // through an n-dimensional index it took 0.4 ms per step of MobileNet-V3 at
                    // any thread count).
                    let keep = 1.0 - ratio;
                    let rng = Rng::derive(self.dropout_seed, &[self.dropout_step, i as u64]);
                    let dims = be.dims(x);
                    let mut mask = crate::engine::ops::unzeroed(dims.iter().product());
                    rng.par_fill_uniform(&mut mask, |u| if u < keep { 1.0 / keep } else { 0.0 });
                    let mask = ArrayD::from_shape_vec(ndarray::IxDyn(dims), mask)
                        .expect("the mask has the input's length");
                    let mask = be.upload(mask);
                    (vec![be.mul(x, &mask)?], Saved::Mask(mask))
                }
            }
        })
    }

    /// Backward from `dlogits`; parameter gradients are overwritten (not accumulated across
    /// calls). Must follow a `Train` forward.
    pub fn backward(&mut self, dlogits: ArrayD<f32>) -> Result<()> {
        super::awake::keep_awake(|| self.backward_awake(dlogits))
    }

    fn backward_awake(&mut self, dlogits: ArrayD<f32>) -> Result<()> {
        if self.saved.len() != self.program.steps.len() {
            bail!("backward needs a training-mode forward first");
        }
        for p in &mut self.program.params {
            self.backend.fill(&mut p.grad, 0.0);
        }
        let mut grads: Vec<Option<B::Tensor>> = (0..self.program.n_slots).map(|_| None).collect();
        grads[self.program.output_slot] = Some(self.backend.upload(dlogits));
        for i in (0..self.program.steps.len()).rev() {
            let step = &self.program.steps[i];
            let dys: Vec<Option<B::Tensor>> =
                step.outputs.iter().map(|&o| grads[o].take()).collect();
            if dys.iter().all(Option::is_none) {
                continue;
            }
            // The idle clock's reading (64 atomics) only when profiling.
            let idle0 = self.profile.is_some().then(super::awake::idle_time);
            let t0 = std::time::Instant::now();
            // A conv's input gradient is added to what the input's other readers gave it
            // inside the conv's backward (`Backend::conv_backward_adding`), not in a pass of
            // its own below.
            let acc = match (&step.kernel, step.inputs[0]) {
                (Kernel::Conv(_), Src::Slot(k)) if k != self.program.input_slot => grads[k].take(),
                _ => None,
            };
            let din = self
                .step_backward(i, dys, acc)
                .with_context(|| format!("backward of node '{}' ({})", step.name, step.op_type))?;
            if let Some(t) = self.profile.as_mut().and_then(|p| p.get_mut(i)) {
                let wall = t0.elapsed().as_secs_f64();
                t[1] += wall;
                t[3] += idle_within(idle0.unwrap_or_default(), wall);
            }
            let step = &self.program.steps[i];
            for (src, g) in step.inputs.iter().zip(din) {
                let Some(g) = g else { continue };
                match *src {
                    Src::Slot(k) => match &mut grads[k] {
                        Some(acc) => self.backend.add_assign(acc, &g)?,
                        slot @ None => *slot = Some(g),
                    },
                    Src::Param(p) => self
                        .backend
                        .add_assign(&mut self.program.params[p].grad, &g)?,
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
        mut dys: Vec<Option<B::Tensor>>,
        acc: Option<B::Tensor>,
    ) -> Result<Vec<Option<B::Tensor>>> {
        let be = &self.backend;
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
        let mut dy = || -> Result<B::Tensor> {
            dy0.take()
                .ok_or_else(|| anyhow!("no gradient for the output"))
        };
        Ok(match (&step.kernel, &self.saved[i]) {
            (Kernel::Conv(op), _) => {
                let w = self.get(step.inputs[1])?;
                // The bias gradient (a pass over dy) only for a conv with a bias: the convs
                // before a BatchNormalization have none.
                let has_bias = step.inputs.len() > 2;
                let g = match acc {
                    Some(acc) => be.conv_backward_adding(op, x, w, dy()?, acc, has_bias)?,
                    None => be.conv_backward(op, x, w, dy()?, needs_dx, has_bias)?,
                };
                let mut out = vec![g.dx, Some(g.dw)];
                if has_bias {
                    out.push(Some(g.db));
                }
                out
            }
            (Kernel::BatchNorm { op, .. }, Saved::Bn(saved)) => {
                let scale = self.get(step.inputs[1])?;
                let sync = self.stat_sync.as_deref();
                let g = be.bn_backward_train(op, x, scale, saved, dy()?, sync)?;
                vec![Some(g.dx), Some(g.dscale), Some(g.dbias)]
            }
            (Kernel::BatchNormAdd { op, relu, .. }, Saved::Bn(saved)) => {
                // The join's backward, then the batch norm's on its gradient: the separate
                // steps' calls. The batch norm's output (not kept) has `x`'s shape, all the
                // Add's backward reads of it.
                let scale = self.get(step.inputs[1])?;
                let r = self.get(step.inputs[3])?;
                let (g, dr) = if *relu {
                    let z = self.get(Src::Slot(step.outputs[0]))?;
                    be.add_relu_backward(x, r, z, dy()?)?
                } else {
                    be.binary_backward(BinOp::Add, x, r, dy()?)?
                };
                let sync = self.stat_sync.as_deref();
                let g = be.bn_backward_train(op, x, scale, saved, g, sync)?;
                vec![Some(g.dx), Some(g.dscale), Some(g.dbias), Some(dr)]
            }
            (Kernel::Act(a), _) => vec![Some(be.act_backward(a, x, dy()?)?)],
            (Kernel::LayerNorm(op), Saved::Ln(saved)) => {
                let scale = self.get(step.inputs[1])?;
                let g = be.layer_norm_backward(op, x, scale, saved, dy()?)?;
                vec![Some(g.dx), Some(g.dscale), Some(g.dbias)]
            }
            (Kernel::GroupNorm(op), Saved::Ln(saved)) => {
                let scale = self.get(step.inputs[1])?;
                let g = be.group_norm_backward(op, x, scale, saved, dy()?)?;
                vec![Some(g.dx), Some(g.dscale), Some(g.dbias)]
            }
            (Kernel::Binary(op), _) => {
                let y = self.get(step.inputs[1])?;
                let (da, db) = be.binary_backward(*op, x, y, dy()?)?;
                vec![Some(da), Some(db)]
            }
            (Kernel::AddRelu, _) => {
                let y = self.get(step.inputs[1])?;
                let z = self.get(Src::Slot(step.outputs[0]))?;
                let (da, db) = be.add_relu_backward(x, y, z, dy()?)?;
                vec![Some(da), Some(db)]
            }
            (Kernel::Concat { axis }, _) => {
                let sizes: Vec<usize> = step
                    .inputs
                    .iter()
                    .map(|&s| self.get(s).map(|a| be.dims(a)[*axis]))
                    .collect::<Result<_>>()?;
                be.split(*axis, &sizes, &dy()?)?
                    .into_iter()
                    .map(Some)
                    .collect()
            }
            (Kernel::Split { axis, sizes }, _) => {
                let parts: Vec<B::Tensor> = dys
                    .into_iter()
                    .enumerate()
                    .map(|(k, g)| {
                        g.unwrap_or_else(|| {
                            let mut shape = be.dims(x).to_vec();
                            shape[*axis] = sizes[k];
                            be.zeros(&shape)
                        })
                    })
                    .collect();
                let refs: Vec<&B::Tensor> = parts.iter().collect();
                vec![Some(be.concat(*axis, &refs)?)]
            }
            (Kernel::MaxPool(op), Saved::MaxPool(saved)) => {
                vec![Some(be.max_pool_backward(op, saved, dy()?)?)]
            }
            (Kernel::AvgPool(op), _) => {
                vec![Some(be.avg_pool_backward(op, be.dims(x), dy()?)?)]
            }
            (Kernel::GlobalAvgPool, _) => {
                vec![Some(be.global_avg_pool_backward(be.dims(x), dy()?)?)]
            }
            (Kernel::ReduceMean { axes, .. }, _) => {
                vec![Some(be.reduce_mean_backward(be.dims(x), axes, dy()?)?)]
            }
            (Kernel::Reshape { .. }, _) => {
                let dims = be.dims(x).to_vec();
                vec![Some(be.reshape_owned(dy()?, &dims)?)]
            }
            (Kernel::Transpose { perm }, _) => {
                let inv = super::tensor_ops::inverse_perm(perm);
                vec![Some(be.transpose(&dy()?, &inv)?)]
            }
            (Kernel::Slice(s), _) => {
                let idx = crate::ir::shape::slice_indices(be.dims(x), s)?;
                vec![Some(be.take_backward(be.dims(x), &idx, dy()?)?)]
            }
            (Kernel::Gather { axis, list, .. }, _) => {
                let dims = be.dims(x).to_vec();
                let mut taken = dims.clone();
                taken[*axis] = list.len();
                let g = be.reshape(&dy()?, &taken)?;
                let idx = gather_lists(&dims, *axis, list);
                vec![Some(be.take_backward(&dims, &idx, g)?)]
            }
            (Kernel::Pad { pads, .. }, _) => {
                vec![Some(be.pad_backward(be.dims(x), pads, dy()?)?)]
            }
            (Kernel::Gemm(op), _) => {
                let b = self.get(step.inputs[1])?;
                let c_shape = match step.inputs.get(2) {
                    Some(&s) => Some(be.dims(self.get(s)?).to_vec()),
                    None => None,
                };
                let dims = be.dims(x);
                let g = if dims.len() > 2 {
                    let rows: usize = dims[..dims.len() - 1].iter().product();
                    let x2 = be.reshape(x, &[rows, dims[dims.len() - 1]])?;
                    let dy = dy()?;
                    let n = *be.dims(&dy).last().expect("rank > 2");
                    let dy2 = be.reshape(&dy, &[rows, n])?;
                    let mut g = be.gemm_backward(op, &x2, b, c_shape.as_deref(), dy2)?;
                    g.da = be.reshape(&g.da, dims)?;
                    g
                } else {
                    be.gemm_backward(op, x, b, c_shape.as_deref(), dy()?)?
                };
                let mut out = vec![Some(g.da), Some(g.db)];
                if step.inputs.len() > 2 {
                    out.push(g.dc);
                }
                out
            }
            (Kernel::Dropout { .. }, Saved::Mask(mask)) => vec![Some(be.mul(&dy()?, mask)?)],
            (Kernel::Dropout { .. }, _) => vec![Some(dy()?)],
            (Kernel::BatchNorm { .. }, _)
            | (Kernel::BatchNormAdd { .. }, _)
            | (Kernel::LayerNorm(_), _)
            | (Kernel::GroupNorm(_), _)
            | (Kernel::MaxPool(_), _) => {
                bail!("forward did not keep what backward needs")
            }
        })
    }
}

/// The running mean and variance (state `mean` and `var`), both mutable.
fn running_stats<T>(
    state: &mut [(String, T)],
    mean: usize,
    var: usize,
) -> Result<(&mut T, &mut T)> {
    let (m, v) = (mean, var);
    let (lo, hi) = state.split_at_mut(m.max(v));
    Ok(if m < v {
        (&mut lo[m].1, &mut hi[0].1)
    } else if m > v {
        (&mut hi[0].1, &mut lo[v].1)
    } else {
        bail!("the running mean and variance are one tensor");
    })
}

/// The per-axis index lists of a Gather along `axis`: `list` there, every index elsewhere.
fn gather_lists(dims: &[usize], axis: usize, list: &[usize]) -> Vec<Vec<usize>> {
    dims.iter()
        .enumerate()
        .map(|(a, &d)| {
            if a == axis {
                list.to_vec()
            } else {
                (0..d).collect()
            }
        })
        .collect()
}

/// The other workers' idle time (s) since the reading `idle0`, over a stretch of `wall`
/// seconds, at most `wall` per other worker: a spinner counts each gap between two of its
/// looks at the later one, so a gap that began before the stretch (a spinner descheduled by
/// the OS, on a host with more busy threads than cores) would otherwise count in full.
fn idle_within(idle0: std::time::Duration, wall: f64) -> f64 {
    let others = rayon::current_num_threads().saturating_sub(1) as f64;
    let idle = super::awake::idle_time()
        .saturating_sub(idle0)
        .as_secs_f64();
    idle.min(wall * others)
}
