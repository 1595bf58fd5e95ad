//! The classifier head: the layer whose outputs are the class scores, re-sized to the data.
//!
//! Users train these models from scratch on their own data, whose class count rarely matches
//! the 1000 (ImageNet) or 10 (CIFAR) the architecture was exported with. [`resize`] walks back
//! from the graph's output through the ops that keep the class axis (activations, pools,
//! flattens, Dropout, a final Softmax, a bias Add, a BatchNormalization) to the Gemm, MatMul
//! or convolution that makes the scores, and gives it, and everything on the way that is sized
//! by the class count, the new count. The re-sized weights are freshly initialised (PyTorch's
//! defaults for the layer kind), since nothing learned for the old classes carries over.

use anyhow::{anyhow, bail, Result};
use ndarray::{ArrayD, IxDyn};

use super::shape::{infer, Facts};
use super::{Dim, Graph, Op, Tensor};
use crate::rng::Rng;

/// What [`resize`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadChange {
    /// The layer that makes the class scores.
    pub node: String,
    pub from: usize,
    pub to: usize,
}

/// How a tensor on the head's path is re-sized and re-initialised.
enum Fill {
    /// PyTorch's Linear/Conv default: uniform in +-1/sqrt(fan_in).
    Uniform(f32),
    Const(f32),
}

/// Re-sizes the classifier so that the model outputs `classes` scores. `input_shapes` are the
/// shapes to infer at. Returns `None` when the model already has that many.
pub fn resize(
    graph: &mut Graph,
    input_shapes: &[Vec<usize>],
    classes: usize,
    seed: u64,
) -> Result<Option<HeadChange>> {
    let facts = infer(graph, input_shapes)?;
    let out = graph
        .outputs
        .first()
        .ok_or_else(|| anyhow!("the model has no output"))?
        .name
        .clone();
    let from = *facts
        .get(&out)
        .and_then(|f| f.shape.get(1))
        .ok_or_else(|| anyhow!("the output '{out}' has no class axis"))?;
    if from == classes {
        return Ok(None);
    }
    if classes == 0 {
        bail!("the data has no classes");
    }
    // Weights made by constant subgraphs (ConstantOfShape in the onnx test models) become
    // initializers first, so that the classifier's weight can be found and re-sized.
    super::fold::fold_input_free(graph, &facts);
    let mut plan: Vec<(String, usize, Fill)> = Vec::new(); // (initializer, axis, fill)
    let mut targets: Vec<String> = Vec::new(); // Reshape targets with the class count at axis 1
    let mut value = out;
    let head = loop {
        let n = graph
            .nodes
            .iter()
            .find(|n| n.outputs.first() == Some(&value))
            .ok_or_else(|| {
                anyhow!("no classifier layer found before the output (value '{value}' is not computed by a node)")
            })?;
        let init = |i: usize| n.input(i).filter(|v| graph.initializers.contains_key(*v));
        let shape = |v: &str| facts.get(v).map(|f| f.shape.clone()).unwrap_or_default();
        match &n.op {
            Op::Gemm(g) => {
                let w = init(1).ok_or_else(|| {
                    anyhow!("the classifier Gemm '{}' has a computed weight", n.name)
                })?;
                let ws = shape(w);
                let (axis, fan_in) = if g.trans_b { (0, ws[1]) } else { (1, ws[0]) };
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                plan.push((w.to_string(), axis, Fill::Uniform(bound)));
                if let Some(b) = init(2) {
                    let bs = shape(b);
                    if bs.last() == Some(&from) {
                        plan.push((b.to_string(), bs.len() - 1, Fill::Uniform(bound)));
                    }
                }
                break n.name.clone();
            }
            Op::MatMul => {
                let w = init(1).ok_or_else(|| {
                    anyhow!("the classifier MatMul '{}' has a computed weight", n.name)
                })?;
                let ws = shape(w);
                let bound = 1.0 / (ws[0].max(1) as f32).sqrt();
                plan.push((w.to_string(), ws.len() - 1, Fill::Uniform(bound)));
                break n.name.clone();
            }
            Op::Conv(c) if c.group == 1 => {
                let w = init(1).ok_or_else(|| {
                    anyhow!("the classifier conv '{}' has a computed weight", n.name)
                })?;
                let ws = shape(w);
                let fan_in: usize = ws[1..].iter().product();
                let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                plan.push((w.to_string(), 0, Fill::Uniform(bound)));
                if let Some(b) = init(2) {
                    plan.push((b.to_string(), 0, Fill::Uniform(bound)));
                }
                break n.name.clone();
            }
            Op::Add => {
                // A bias after a MatMul: the constant side is sized by the classes.
                let (data, bias) = match (init(0), init(1)) {
                    (None, Some(b)) => (&n.inputs[0], b),
                    (Some(b), None) => (&n.inputs[1], b),
                    _ => bail!(
                        "node '{}' (Add) before the output is not a classifier bias",
                        n.name
                    ),
                };
                let bs = shape(bias);
                if bs.last() == Some(&from) {
                    plan.push((bias.to_string(), bs.len() - 1, Fill::Const(0.0)));
                }
                value = data.clone();
            }
            Op::BatchNorm(_) => {
                for (i, v) in [(1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0)] {
                    if let Some(t) = init(i) {
                        plan.push((t.to_string(), 0, Fill::Const(v)));
                    }
                }
                value = n.inputs[0].clone();
            }
            Op::Reshape { .. } => {
                if let Some(t) = init(1) {
                    targets.push(t.to_string());
                }
                value = n.inputs[0].clone();
            }
            Op::Relu
            | Op::Sigmoid
            | Op::Clip(_)
            | Op::LeakyRelu { .. }
            | Op::Elu { .. }
            | Op::HardSigmoid { .. }
            | Op::HardSwish
            | Op::Flatten { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::GlobalAveragePool
            | Op::Pool(_)
            | Op::ReduceMean(_)
            | Op::Dropout { .. }
            | Op::Identity
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. } => value = n.inputs[0].clone(),
            other => bail!(
                "no classifier layer found: node '{}' ({}) stands between it and the output",
                n.name,
                other.onnx_type()
            ),
        }
    };
    for (k, (name, axis, fill)) in plan.into_iter().enumerate() {
        let old = graph
            .initializers
            .get(&name)
            .expect("planned from an initializer");
        let mut shape = old.shape().to_vec();
        if shape.get(axis) != Some(&from) {
            bail!(
                "'{name}' of the classifier has shape {shape:?}, not {from} classes at axis {axis}"
            );
        }
        shape[axis] = classes;
        let mut rng = Rng::derive(seed, &[0x6865_6164, k as u64]);
        let t = ArrayD::from_shape_fn(IxDyn(&shape), |_| match fill {
            Fill::Uniform(b) => rng.range(-b, b),
            Fill::Const(v) => v,
        });
        graph.initializers.insert(name, Tensor::F32(t));
    }
    for name in targets {
        if let Some(Tensor::I64(t)) = graph.initializers.get_mut(&name) {
            if t.len() > 1 && t[1] == from as i64 {
                t[1] = classes as i64;
            }
        }
    }
    if let Some(Dim::Fixed(k)) = graph.outputs[0].shape.as_mut().and_then(|s| s.get_mut(1)) {
        *k = classes;
    }
    let check: Facts = infer(graph, input_shapes)?;
    let got = check[&graph.outputs[0].name].shape.get(1).copied();
    if got != Some(classes) {
        bail!("re-sizing the classifier '{head}' to {classes} classes left the output at {got:?}");
    }
    Ok(Some(HeadChange {
        node: head,
        from,
        to: classes,
    }))
}
