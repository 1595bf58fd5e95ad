//! The runtime: tract, behind one narrow door. Loads an ONNX file (or bytes) for a fixed input
//! shape, optimises it and runs it with a stated number of threads ([`TractModel`]); per-node
//! traces and profiles; and latency measurement ([`timing`]).
//!
//! A leaf of the module graph: it imports only [`crate::onnx`], [`crate::ir`] and
//! [`crate::rng`], so that `export` (form choice, validation) and `bench` (the latency report)
//! both build on it without importing each other.
//!
//! Threads: tract's matmuls run on the executor of the plan. A plan built here always carries
//! one explicitly, `SingleThread` for one thread or a private rayon pool of exactly `threads`
//! workers, so that the count a report prints is the count used (tract's default executor is a
//! process-wide setting that other code could change).

pub mod timing;

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::*;

/// How far tract transforms the model before running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Typed only: node names and boundaries as in the file (for locating a divergence).
    Plain,
    /// Decluttered and optimised: what deployment runs.
    Optimized,
}

pub struct TractModel {
    plan: Arc<TypedRunnableModel>,
    state: TypedSimpleState,
    pub input_shape: Vec<usize>,
    pub threads: usize,
}

fn executor(threads: usize) -> Executor {
    if threads <= 1 {
        Executor::SingleThread
    } else {
        Executor::multithread(threads)
    }
}

/// Parses ONNX bytes in tract with the input fixed to `input_shape`.
pub fn typed_model(bytes: &[u8], input_shape: &[usize], level: Level) -> Result<TypedModel> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .map_err(|e| anyhow!("tract cannot read the model: {e:#}"))?;
    let model = model
        .with_input_fact(0, f32::fact(input_shape).into())
        .map_err(|e| anyhow!("tract rejects the input shape {input_shape:?}: {e:#}"))?;
    let typed = model
        .into_typed()
        .map_err(|e| anyhow!("tract cannot type the model: {e:#}"))?;
    Ok(match level {
        Level::Plain => typed,
        Level::Optimized => typed
            .into_optimized()
            .map_err(|e| anyhow!("tract cannot optimise the model: {e:#}"))?,
    })
}

impl TractModel {
    pub fn from_bytes(bytes: &[u8], input_shape: &[usize], threads: usize) -> Result<TractModel> {
        let typed = typed_model(bytes, input_shape, Level::Optimized)?;
        TractModel::from_typed(typed, input_shape, threads)
    }

    /// Loads a file as it is, external data included ([`crate::onnx::read::self_contained_bytes`]).
    /// A file that fixes its batch at another size than `input_shape` is first made
    /// batch-agnostic by elrt ([`crate::ir::batch::free_batch`]) and handed over as bytes, since
    /// tract cannot rewrite the constants that carry the batch.
    pub fn from_path(
        path: &std::path::Path,
        input_shape: &[usize],
        threads: usize,
    ) -> Result<Self> {
        let what = || path.display().to_string();
        let mut g = crate::onnx::read_file(path)?;
        let mut shapes = vec![input_shape.to_vec()];
        shapes.extend(
            crate::ir::shape::default_input_shapes(&g)
                .with_context(what)?
                .into_iter()
                .skip(1),
        );
        if crate::ir::batch::needs_freeing(&g, &shapes) {
            crate::ir::batch::free_batch(&mut g, &shapes).with_context(what)?;
            let bytes = crate::onnx::write_bytes(&g).with_context(what)?;
            return TractModel::from_bytes(&bytes, input_shape, threads).with_context(what);
        }
        let bytes = crate::onnx::read::self_contained_bytes(path)?;
        TractModel::from_bytes(&bytes, input_shape, threads).with_context(what)
    }

    pub fn from_typed(typed: TypedModel, input_shape: &[usize], threads: usize) -> Result<Self> {
        let options = RunOptions {
            executor: Some(executor(threads)),
            ..Default::default()
        };
        let plan = typed
            .into_runnable_with_options(&options)
            .map_err(|e| anyhow!("tract cannot plan the model: {e:#}"))?;
        let state = plan.spawn().map_err(|e| anyhow!("{e:#}"))?;
        Ok(TractModel {
            plan,
            state,
            input_shape: input_shape.to_vec(),
            threads: threads.max(1),
        })
    }

    /// Runs one batch; `x` must have the shape the model was loaded for.
    pub fn run(&mut self, x: &ArrayD<f32>) -> Result<ArrayD<f32>> {
        if x.shape() != self.input_shape.as_slice() {
            bail!(
                "input shape {:?}, the model was loaded for {:?}",
                x.shape(),
                self.input_shape
            );
        }
        let data: Vec<f32> = x.iter().copied().collect();
        let t = Tensor::from_shape(x.shape(), &data)?;
        let out = self
            .state
            .run(tvec!(t.into_tvalue()))
            .map_err(|e| anyhow!("tract failed to run the model: {e:#}"))?;
        to_array(&out[0])
    }

    /// Runs once on a prepared input, for timing (no conversion on the timed path).
    pub fn run_prepared(&mut self, input: &TValue) -> Result<()> {
        self.state
            .run(tvec!(input.clone()))
            .map_err(|e| anyhow!("tract failed to run the model: {e:#}"))?;
        Ok(())
    }

    pub fn prepare(&self, x: &ArrayD<f32>) -> Result<TValue> {
        let data: Vec<f32> = x.iter().copied().collect();
        Ok(Tensor::from_shape(x.shape(), &data)?.into_tvalue())
    }

    /// Number of nodes tract runs (after optimisation), for reports.
    pub fn node_count(&self) -> usize {
        self.plan.model().nodes().len()
    }
}

pub fn to_array(t: &TValue) -> Result<ArrayD<f32>> {
    let v = t
        .to_plain_array_view::<f32>()
        .map_err(|e| anyhow!("tract output is not f32: {e:#}"))?;
    let data: Vec<f32> = v.iter().copied().collect();
    Ok(ArrayD::from_shape_vec(IxDyn(v.shape()), data)?)
}

/// Every node output of the plain (unoptimised) model on `x`, by tract node name, in run order.
/// Used to find the first node where tract and the engine part ways.
pub fn trace_plain(bytes: &[u8], x: &ArrayD<f32>) -> Result<Vec<(String, ArrayD<f32>)>> {
    let typed = typed_model(bytes, x.shape(), Level::Plain)?;
    let plan = typed.into_runnable_with_options(&RunOptions {
        executor: Some(Executor::SingleThread),
        ..Default::default()
    })?;
    let mut state = plan.spawn()?;
    let data: Vec<f32> = x.iter().copied().collect();
    let input = Tensor::from_shape(x.shape(), &data)?.into_tvalue();
    let mut trace: Vec<(String, ArrayD<f32>)> = Vec::new();
    state.run_plan_with_eval(tvec!(input), |session, op_state, node, inputs| {
        let outs = tract_onnx::tract_core::plan::eval(session, op_state, node, inputs)?;
        if let Some(o) = outs.first() {
            if let Ok(a) = to_array(o) {
                trace.push((node.name.clone(), a));
            }
        }
        Ok::<_, anyhow::Error>(outs)
    })?;
    Ok(trace)
}

/// Time per node of the optimised model, summed over `runs` runs after a warm-up, as
/// `(node name, op name, ms per run)` in run order. The per-node clock adds a little overhead
/// of its own; the total is reported beside the plain latency for that reason.
pub fn profile(model: &mut TractModel, runs: usize) -> Result<Vec<(String, String, f64)>> {
    use std::collections::HashMap;
    use std::time::Instant;
    let x = timing::random_input(&model.input_shape, 7);
    let input = model.prepare(&x)?;
    for _ in 0..5 {
        model.run_prepared(&input)?;
    }
    let mut order: Vec<(String, String)> = Vec::new();
    let mut total: HashMap<String, f64> = HashMap::new();
    for _ in 0..runs.max(1) {
        model
            .state
            .run_plan_with_eval(tvec!(input.clone()), |session, op_state, node, inputs| {
                let t0 = Instant::now();
                let outs = tract_onnx::tract_core::plan::eval(session, op_state, node, inputs)?;
                let dt = t0.elapsed().as_secs_f64() * 1e3;
                let e = total.entry(node.name.clone()).or_insert_with(|| {
                    order.push((node.name.clone(), node.op.name().to_string()));
                    0.0
                });
                *e += dt;
                Ok::<_, anyhow::Error>(outs)
            })
            .map_err(|e| anyhow!("tract failed to run the model: {e:#}"))?;
    }
    Ok(order
        .into_iter()
        .map(|(n, op)| {
            let t = total[&n] / runs.max(1) as f64;
            (n, op, t)
        })
        .collect())
}
