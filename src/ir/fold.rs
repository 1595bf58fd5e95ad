//! Graph simplification once shapes are concrete: constant sub-graphs become initializers,
//! and Identity (and, for inference, Dropout) nodes disappear.

use anyhow::{Context, Result};

use super::ops::SoftmaxAxes;
use super::shape::{dyn_slice_params, infer, Facts};
use super::{Graph, Op, Tensor};

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
