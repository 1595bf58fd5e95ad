//! Graph simplification once shapes are concrete: constant sub-graphs become initializers,
//! and Identity (and, for inference, Dropout) nodes disappear.

use anyhow::{Context, Result};

use super::ops::SoftmaxAxes;
use super::params::FROZEN_SUFFIX;
use super::shape::{dyn_slice_params, infer, Facts};
use super::{Graph, Node, Op, Tensor};

#[derive(Clone, Copy, Debug)]
pub struct FoldOptions {
    /// Dropout is the identity at inference; a graph kept for training must keep it.
    pub remove_dropout: bool,
}

/// Folds and cleans the graph for the given input shapes, returning the facts of the result.
/// A file that fixes its batch at another size than asked is first made batch-agnostic
/// ([`super::batch::free_batch`]).
pub fn simplify(
    graph: &mut Graph,
    input_shapes: &[Vec<usize>],
    opts: FoldOptions,
) -> Result<Facts> {
    rewrite_for_training(graph, input_shapes)?;
    if super::batch::needs_freeing(graph, input_shapes) {
        super::batch::free_batch(graph, input_shapes)?;
    }
    let facts = infer(graph, input_shapes)?;
    let folded = fold_constants(graph, &facts);
    keep_batch_in_folded_reshapes(graph, &facts, &folded);
    resolve_dynamic(graph, &facts)?;
    clear_needless_allowzero(graph);
    modernize_softmax(graph, &facts);
    remove_passthrough(graph, opts);
    graph.prune();
    graph.check()?;
    infer(graph, input_shapes)
}

/// Rewrites of exporter patterns the engine cannot train into equivalent ones it can
/// ([`gather_nd_to_gather`], [`where_to_mask`], [`strided_view_to_reshape`]). They run first, on shapes inferred at the
/// batch the file declares (1 when it leaves it free), because the patterns move the batch
/// axis, which [`super::batch::free_batch`] refuses; a graph whose shapes do not infer there is
/// left as it is (the steps after say what is wrong with it).
fn rewrite_for_training(graph: &mut Graph, input_shapes: &[Vec<usize>]) -> Result<()> {
    if !graph
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::GatherNd | Op::Where | Op::Gather { .. }))
    {
        return Ok(());
    }
    let declared: Vec<Vec<usize>> = input_shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let fixed = graph
                .inputs
                .get(i)
                .and_then(|d| d.shape.as_ref())
                .and_then(|dims| match dims.first() {
                    Some(super::Dim::Fixed(b)) => Some(*b),
                    _ => None,
                });
            let mut s = s.clone();
            if let Some(b) = s.first_mut() {
                *b = fixed.unwrap_or(1);
            }
            s
        })
        .collect();
    let Ok(facts) = infer(graph, &declared) else {
        return Ok(());
    };
    gather_nd_to_gather(graph, &facts)?;
    where_to_mask(graph, &facts)?;
    strided_view_to_reshape(graph, &facts)?;
    graph.prune();
    Ok(())
}

/// Replaces every node whose outputs are all known before run time by initializers; returns
/// the names of the initializers it made.
fn fold_constants(graph: &mut Graph, facts: &Facts) -> Vec<String> {
    let mut made = Vec::new();
    let mut kept = Vec::with_capacity(graph.nodes.len());
    for node in std::mem::take(&mut graph.nodes) {
        let values: Option<Vec<_>> = node
            .outputs
            .iter()
            .filter(|o| !o.is_empty())
            .map(|o| facts.get(o).and_then(|f| f.value.clone()))
            .collect();
        match values {
            Some(vals) if !vals.is_empty() && !is_graph_output(graph, &node.outputs) => {
                for (name, v) in node.outputs.iter().filter(|o| !o.is_empty()).zip(vals) {
                    graph.initializers.insert(name.clone(), v);
                    made.push(name.clone());
                }
            }
            _ => kept.push(node),
        }
    }
    graph.nodes = kept;
    made
}

/// A Reshape target computed from the activation's shape (`Shape -> Gather -> Concat`) folds to
/// the batch size it was inferred at. Writing its batch entry as 0 ("copy the input's") keeps
/// the folded graph valid for every batch size, as the computed form was.
fn keep_batch_in_folded_reshapes(graph: &mut Graph, facts: &Facts, folded: &[String]) {
    for n in &graph.nodes {
        let Op::Reshape { allowzero: false } = n.op else {
            continue;
        };
        let Some(shape_name) = n.input(1) else {
            continue;
        };
        if !folded.iter().any(|f| f == shape_name) {
            continue;
        }
        let Some(x) = facts.get(&n.inputs[0]) else {
            continue;
        };
        if let Some(Tensor::I64(t)) = graph.initializers.get_mut(shape_name) {
            if t.ndim() == 1 && t.len() > 1 && !x.shape.is_empty() && t[0] == x.shape[0] as i64 {
                t[0] = 0;
            }
        }
    }
}

/// Turns ops whose operands were computed at run time into their constant-operand form, now
/// that constant propagation knows the operands.
fn resolve_dynamic(graph: &mut Graph, facts: &Facts) -> Result<()> {
    for n in &mut graph.nodes {
        if let Op::DynSlice = n.op {
            let ins: Vec<_> = n
                .inputs
                .iter()
                .map(|i| if i.is_empty() { None } else { facts.get(i) })
                .collect();
            let s = dyn_slice_params(&ins).with_context(|| format!("node '{}' (Slice)", n.name))?;
            n.op = Op::Slice(s);
            n.inputs.truncate(1);
        }
    }
    Ok(())
}

/// Replaces the nodes that compute from constants alone (not from any graph input, not even
/// through `Shape`) by initializers: their values are the same at every batch, and a Reshape
/// target built that way (`Unsqueeze`s of constants into a `Concat`, as an export without
/// constant folding writes it) becomes a constant later passes can see (the batch rewrite, the classifier's re-sizing).
pub fn fold_input_free(graph: &mut Graph, facts: &Facts) {
    let mut kept = Vec::with_capacity(graph.nodes.len());
    for n in std::mem::take(&mut graph.nodes) {
        let input_free = n
            .inputs
            .iter()
            .all(|i| i.is_empty() || graph.initializers.contains_key(i));
        let values: Option<Vec<Tensor>> = n
            .outputs
            .iter()
            .map(|o| facts.get(o).and_then(|f| f.value.clone()))
            .collect();
        let is_output = graph.outputs.iter().any(|o| n.outputs.contains(&o.name));
        match values {
            Some(v) if input_free && !is_output && !n.outputs.iter().any(String::is_empty) => {
                for (o, t) in n.outputs.iter().zip(v) {
                    graph.initializers.insert(o.clone(), t);
                }
            }
            _ => kept.push(n),
        }
    }
    graph.nodes = kept;
}

/// `allowzero` only changes what a 0 in a Reshape target means; with a constant target that
/// holds no 0 it is dropped, so the node can be written below opset 14 (PyTorch's dynamo
/// exporter sets it on every Reshape).
fn clear_needless_allowzero(graph: &mut Graph) {
    for n in &mut graph.nodes {
        if let Op::Reshape { allowzero } = &mut n.op {
            let target = n.inputs.get(1).and_then(|t| graph.initializers.get(t));
            if *allowzero && target.is_some_and(|t| !t.to_i64s().contains(&0)) {
                *allowzero = false;
            }
        }
    }
}

/// A Softmax with the pre-opset-13 meaning (the input flattened to 2-D from `axis` on) means
/// the same as one along `axis` alone when the axes after it all have size 1 (a classifier's
/// `[N, K, 1, 1]` scores) or there are none; it is marked so, and can then be written at any
/// opset.
fn modernize_softmax(graph: &mut Graph, facts: &Facts) {
    for n in &mut graph.nodes {
        if let Op::Softmax { axis, axes } | Op::LogSoftmax { axis, axes } = &mut n.op {
            let Some(x) = facts.get(&n.inputs[0]) else {
                continue;
            };
            let Ok(a) = super::shape::norm_axis(*axis, x.shape.len()) else {
                continue;
            };
            if x.shape[a + 1..].iter().all(|&d| d == 1) {
                *axes = SoftmaxAxes::Either;
            }
        }
    }
}

fn is_graph_output(graph: &Graph, names: &[String]) -> bool {
    graph.outputs.iter().any(|o| names.contains(&o.name))
}

/// Removes Identity and (optionally) Dropout by wiring consumers to the node's input. When the
/// node's output is a graph output, the producer of its input is renamed instead, so the graph's
/// interface keeps its names.
fn remove_passthrough(graph: &mut Graph, opts: FoldOptions) {
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        let removable = match n.op {
            Op::Identity => true,
            // A used mask output keeps the node.
            Op::Dropout { .. } => {
                opts.remove_dropout
                    && n.outputs
                        .iter()
                        .skip(1)
                        .all(|o| o.is_empty() || !graph.use_counts().contains_key(o.as_str()))
            }
            _ => false,
        };
        if !removable {
            i += 1;
            continue;
        }
        let (src, dst) = (n.inputs[0].clone(), n.outputs[0].clone());
        if graph.outputs.iter().any(|o| o.name == dst) {
            let producer = graph.producers().get(src.as_str()).copied();
            let src_is_interface = graph.outputs.iter().any(|o| o.name == src);
            match producer {
                Some(p) if !src_is_interface => {
                    for o in &mut graph.nodes[p].outputs {
                        if *o == src {
                            *o = dst.clone();
                        }
                    }
                    graph.nodes.remove(i);
                    graph.rename_uses(&src, &dst);
                }
                // Input or initializer passed straight out: the node must stay.
                _ => i += 1,
            }
        } else {
            graph.nodes.remove(i);
            graph.rename_uses(&dst, &src);
        }
    }
}

/// The dynamo exporter's adaptive average pool whose output size does not divide the input's
/// (VGG's 7x7 pool, AlexNet's 6x6, on inputs smaller than 224) reads its windows' elements as
///
/// ```text
/// Transpose(x [N, C, H, W], perm [2, 3, 0, 1]) -> GatherND(constant (row, col) pairs, shape
/// [..., 2]) -> Transpose(the indices' axes behind N, C) -> ReduceMean
/// ```
///
/// Moving the batch axis is nothing the engine trains; the same values come from
/// `Reshape(x, [0, C, H*W]) -> Gather(axis 2, row * W + col)`, which it does (and tract and
/// onnxruntime run). The rewrite keeps the second Transpose's output name.
/// (`t1` below is the first Transpose, `t2` the second.)
fn gather_nd_to_gather(graph: &mut Graph, facts: &Facts) -> Result<()> {
    loop {
        let uses = graph.use_counts();
        let producers = graph.producers();
        let mut found = None;
        for (gi, g) in graph.nodes.iter().enumerate() {
            if !matches!(g.op, Op::GatherNd) {
                continue;
            }
            let (Some(t1), Some(idx)) = (
                producers
                    .get(g.inputs[0].as_str())
                    .map(|&i| &graph.nodes[i]),
                g.input(1).and_then(|i| graph.initializers.get(i)),
            ) else {
                continue;
            };
            let Some(x) = facts.get(&t1.inputs[0]) else {
                continue;
            };
            let q = idx.shape().len();
            let pairs = q >= 1 && idx.shape()[q - 1] == 2;
            if !(matches!(&t1.op, Op::Transpose { perm: Some(p) } if p == &[2, 3, 0, 1])
                && x.shape.len() == 4
                && pairs
                && uses.get(g.outputs[0].as_str()) == Some(&1))
            {
                continue;
            }
            // The indices' axes go behind N, C: perm [r, r + 1, 0, .., r - 1].
            let r = q - 1;
            let back: Vec<usize> = [r, r + 1].into_iter().chain(0..r).collect();
            let Some(t2) = graph.nodes.iter().find(|n| {
                n.inputs.first() == Some(&g.outputs[0])
                    && matches!(&n.op, Op::Transpose { perm: Some(p) } if p == &back)
            }) else {
                continue;
            };
            found = Some((gi, t1.name.clone(), t2.name.clone(), x.shape.clone()));
            break;
        }
        let Some((gi, t1_name, t2_name, xs)) = found else {
            return Ok(());
        };
        let g = graph.nodes[gi].clone();
        let t1 = graph.node(&t1_name).expect("found").clone();
        let t2 = graph.node(&t2_name).expect("found").clone();
        let idx = &graph.initializers[&g.inputs[1]];
        let (h, w) = (xs[2] as i64, xs[3] as i64);
        let flat: Vec<i64> = idx
            .to_i64s()
            .chunks_exact(2)
            .map(|p| {
                let (i, j) = (
                    if p[0] < 0 { p[0] + h } else { p[0] },
                    if p[1] < 0 { p[1] + w } else { p[1] },
                );
                if !(0..h).contains(&i) || !(0..w).contains(&j) {
                    anyhow::bail!(
                        "node '{}' (GatherND): index ({}, {}) is outside the {h}x{w} plane",
                        g.name,
                        p[0],
                        p[1]
                    );
                }
                Ok(i * w + j)
            })
            .collect::<Result<_>>()?;
        let idx_shape = idx.shape()[..idx.shape().len() - 1].to_vec();
        let (shape_name, flat_idx_name, flat_out) = (
            graph.fresh_value_name(&format!("{}/plane_shape", g.name)),
            graph.fresh_value_name(&format!("{}/plane_indices", g.name)),
            graph.fresh_value_name(&format!("{}/planes", g.name)),
        );
        graph.initializers.insert(
            shape_name.clone(),
            Tensor::i64_vec(&[0, xs[1] as i64, h * w]),
        );
        graph
            .initializers
            .insert(flat_idx_name.clone(), Tensor::i64(&idx_shape, flat)?);
        let reshape = Node {
            name: format!("{}/planes", g.name),
            op: Op::Reshape { allowzero: false },
            inputs: vec![t1.inputs[0].clone(), shape_name],
            outputs: vec![flat_out.clone()],
        };
        let gather = Node {
            name: g.name.clone(),
            op: Op::Gather { axis: 2 },
            inputs: vec![flat_out, flat_idx_name],
            outputs: t2.outputs.clone(),
        };
        // The first Transpose may feed other pools (the exporter shares it); `prune` drops it
        // once nothing reads it.
        graph
            .nodes
            .retain(|n| n.name != t2.name && n.name != g.name);
        // Where the first Transpose was: after x, before every use of the result.
        let at = graph
            .nodes
            .iter()
            .position(|n| n.inputs.iter().any(|i| t2.outputs.contains(i)))
            .unwrap_or(graph.nodes.len());
        graph.nodes.insert(at, gather);
        graph.nodes.insert(at, reshape);
    }
}

/// `Where(constant condition, a, b)` with one branch a constant scalar and the other an
/// activation of the output's shape (the masked_fill of the same adaptive pool, zeroing the
/// padding of uneven windows) is `x * keep + fill`, `keep` 1 where the activation is chosen
/// and `fill` the scalar where it is not: elementwise ops the engine trains. (The two agree
/// for finite activations; an infinite one times 0 would be NaN where Where gives the fill.)
fn where_to_mask(graph: &mut Graph, facts: &Facts) -> Result<()> {
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        if !matches!(n.op, Op::Where) || n.inputs.len() != 3 {
            i += 1;
            continue;
        }
        let konst = |k: usize| graph.initializers.get(&n.inputs[k]);
        let (Some(cond), Some(out)) = (konst(0), facts.get(&n.outputs[0])) else {
            i += 1;
            continue;
        };
        // (activation slot, scalar slot): the activation is taken where cond is true (slot 1)
        // or false (slot 2).
        let pick = [(1usize, 2usize), (2, 1)].into_iter().find(|&(act, fill)| {
            konst(act).is_none()
                && konst(fill).is_some_and(|t| t.shape().iter().product::<usize>() == 1)
                && facts
                    .get(&n.inputs[act])
                    .is_some_and(|f| f.shape == out.shape)
        });
        let Some((act, fill_slot)) = pick else {
            i += 1;
            continue;
        };
        let fill = konst(fill_slot).expect("checked").to_f32s()[0];
        let cshape = cond.shape().to_vec();
        let keep: Vec<f32> = cond
            .to_i64s()
            .iter()
            .map(|&c| if (c != 0) == (act == 1) { 1.0 } else { 0.0 })
            .collect();
        let fills: Vec<f32> = keep.iter().map(|&k| (1.0 - k) * fill).collect();
        let node = n.clone();
        let keep_name = graph.fresh_value_name(&format!("{}/keep{FROZEN_SUFFIX}", node.name));
        graph
            .initializers
            .insert(keep_name.clone(), Tensor::f32(&cshape, keep)?);
        let mut replacement = vec![Node {
            name: node.name.clone(),
            op: Op::Mul,
            inputs: vec![node.inputs[act].clone(), keep_name],
            outputs: node.outputs.clone(),
        }];
        if fill != 0.0 {
            let (fill_name, masked) = (
                graph.fresh_value_name(&format!("{}/fill{FROZEN_SUFFIX}", node.name)),
                graph.fresh_value_name(&format!("{}/masked", node.name)),
            );
            graph
                .initializers
                .insert(fill_name.clone(), Tensor::f32(&cshape, fills)?);
            replacement[0].outputs = vec![masked.clone()];
            replacement.push(Node {
                name: format!("{}/fill", node.name),
                op: Op::Add,
                inputs: vec![masked, fill_name],
                outputs: node.outputs.clone(),
            });
        }
        let count = replacement.len();
        graph.nodes.splice(i..=i, replacement);
        i += count;
    }
    Ok(())
}

/// The dynamo exporter writes an `as_strided` view (ConvNeXt's classifier reads its pooled
/// `[1, C, 1, 1]` mean so) as a flatten and a gather of every element in order:
///
/// ```text
/// Reshape(x, [-1]) -> Gather(axis 0, constant indices = 0, 1, .., numel - 1 in shape S)
/// ```
///
/// which is `Reshape(x, S)`, and `x` itself when S is x's shape. The gather along the flattened
/// axis mixes batch and features (the engine cannot train it, and at another batch size the
/// indices would read the first image only); the reshape or identity it stands for carries
/// the batch through.
fn strided_view_to_reshape(graph: &mut Graph, facts: &Facts) -> Result<()> {
    let mut i = 0;
    while i < graph.nodes.len() {
        let n = &graph.nodes[i];
        let found = (|| {
            if !matches!(n.op, Op::Gather { axis: 0 }) {
                return None;
            }
            let idx = graph.initializers.get(n.input(1)?)?;
            let flat_name = n.input(0)?;
            let producers = graph.producers();
            let r = &graph.nodes[*producers.get(flat_name)?];
            if !matches!(r.op, Op::Reshape { .. }) || graph.use_counts().get(flat_name) != Some(&1)
            {
                return None;
            }
            let x = facts.get(r.input(0)?)?;
            let flat = facts.get(flat_name)?;
            let numel: usize = x.shape.iter().product();
            let in_order = idx
                .to_i64s()
                .iter()
                .enumerate()
                .all(|(k, &v)| v == k as i64);
            (flat.shape == [numel] && idx.len() == numel && in_order).then(|| {
                (
                    r.name.clone(),
                    r.inputs[0].clone(),
                    idx.shape().to_vec(),
                    x.shape.clone(),
                )
            })
        })();
        let Some((reshape_name, x_name, target, x_shape)) = found else {
            i += 1;
            continue;
        };
        let node = graph.nodes[i].clone();
        graph.nodes[i] = if target == x_shape {
            Node {
                name: node.name.clone(),
                op: Op::Identity,
                inputs: vec![x_name],
                outputs: node.outputs.clone(),
            }
        } else {
            let shape_name = graph.fresh_value_name(&format!("{}/shape", node.name));
            let dims: Vec<i64> = target.iter().map(|&d| d as i64).collect();
            graph
                .initializers
                .insert(shape_name.clone(), Tensor::i64_vec(&dims));
            Node {
                name: node.name.clone(),
                op: Op::Reshape { allowzero: false },
                inputs: vec![x_name, shape_name],
                outputs: node.outputs.clone(),
            }
        };
        graph.nodes.retain(|m| m.name != reshape_name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, ElemType, ModelMeta, ValueInfo};

    /// dynamo's `as_strided` read (flatten, then gather every element in order into the
    /// input's shape) folds away, and the graph then runs at any batch; gathered into another
    /// shape it becomes a Reshape.
    #[test]
    fn strided_view_of_every_element_in_order_is_a_reshape() {
        // (gathered shape, the op left: the input is the output here, so an Identity stays)
        for (target, want_op) in [
            (vec![1usize, 3, 2, 2], "Identity"),
            (vec![1, 12], "Reshape"),
        ] {
            let io = |name: &str, dims: &[usize]| ValueInfo {
                name: name.into(),
                elem: ElemType::F32,
                shape: Some(dims.iter().map(|&d| Dim::Fixed(d)).collect()),
            };
            let node = |name: &str, op: Op, inputs: &[&str], output: &str| Node {
                name: name.into(),
                op,
                inputs: inputs.iter().map(|s| s.to_string()).collect(),
                outputs: vec![output.into()],
            };
            let mut g = Graph {
                name: "g".into(),
                opset: 20,
                inputs: vec![io("x", &[1, 3, 2, 2])],
                outputs: vec![io("y", &target)],
                nodes: vec![
                    node(
                        "flat",
                        Op::Reshape { allowzero: false },
                        &["x", "minus1"],
                        "f",
                    ),
                    node("view", Op::Gather { axis: 0 }, &["f", "idx"], "y"),
                ],
                initializers: Default::default(),
                meta: ModelMeta::default(),
            };
            g.initializers
                .insert("minus1".into(), Tensor::i64_vec(&[-1]));
            g.initializers.insert(
                "idx".into(),
                Tensor::i64(&target, (0..12).collect()).unwrap(),
            );
            let facts = simplify(
                &mut g,
                &[vec![5, 3, 2, 2]],
                FoldOptions {
                    remove_dropout: false,
                },
            )
            .unwrap();
            assert!(
                g.nodes.iter().all(|n| !matches!(n.op, Op::Gather { .. })),
                "{:?}",
                g.nodes
            );
            let ops: Vec<&str> = g.nodes.iter().map(|n| n.op.onnx_type()).collect();
            assert_eq!(ops, [want_op]);
            let mut want = target.clone();
            want[0] = 5;
            assert_eq!(facts[&g.outputs[0].name].shape, want);
        }
    }
}
