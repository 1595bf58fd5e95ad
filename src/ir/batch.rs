//! The batch size a file declares is a property of the export, not of the model.
//!
//! Most ONNX files in the wild fix the batch: PyTorch's exporters take it from the example
//! input (`torch.randn(1, 3, H, W)`) unless told otherwise, and write constants that carry it
//! (a flatten's Reshape target `[1, 512]`, a channel shuffle's `[1, 2, 58, 28, 28]`). Training
//! needs other batch sizes. [`free_batch`] makes such a graph batch-agnostic: it declares the
//! batch axis symbolic, rewrites the constants that carry the export batch, and then *proves*
//! the result: shapes inferred at two batch sizes must differ in the batch axis only, and
//! exactly by it. A graph that mixes the batch into other axes is refused, naming the first
//! node whose output shape breaks the rule, rather than trained on silently wrong shapes.
//!
//! The batch the file was exported with is recorded in `metadata_props` ([`SOURCE_BATCH_KEY`]),
//! so that the deployment export can keep the source's convention.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use super::shape::{fmt_dims, infer, infer_into, Facts};
use super::{Dim, Graph, Op, Tensor};

/// `metadata_props` key holding the fixed batch of the file a graph was freed from.
pub const SOURCE_BATCH_KEY: &str = "elrt.source_batch";

/// Name given to the freed batch axis.
pub const BATCH_DIM: &str = "N";

/// The batch convention of the model's source file: `Some(n)` when the file (or the file a
/// graph was freed from, per its metadata) fixes the batch at `n`, `None` when it is symbolic.
pub fn source_batch(graph: &Graph) -> Option<usize> {
    let recorded = graph
        .meta
        .metadata_props
        .iter()
        .find(|(k, _)| k == SOURCE_BATCH_KEY)
        .and_then(|(_, v)| v.parse().ok());
    recorded.or_else(|| declared_batch(graph))
}

/// The fixed batch the first input declares, if any.
pub fn declared_batch(graph: &Graph) -> Option<usize> {
    match graph.inputs.first()?.shape.as_ref()?.first()? {
        Dim::Fixed(n) => Some(*n),
        _ => None,
    }
}

/// Whether running `graph` at `input_shapes` needs its declared batch freed: some input fixes
/// axis 0 at a value other than the one asked for (its other dimensions are left for shape
/// inference to check).
pub fn needs_freeing(graph: &Graph, input_shapes: &[Vec<usize>]) -> bool {
    graph.inputs.iter().zip(input_shapes).any(|(i, s)| {
        matches!(
            (i.shape.as_deref(), s.first()),
            (Some([Dim::Fixed(b), ..]), Some(&want)) if *b != want
        )
    })
}

/// Frees the batch axis of a graph whose inputs declare a fixed batch; see the module doc.
/// `input_shapes` gives the other dimensions (where the file leaves them unknown); their batch
/// entries are ignored. Does nothing when no input fixes its batch.
pub fn free_batch(graph: &mut Graph, input_shapes: &[Vec<usize>]) -> Result<()> {
    let mut b0 = None;
    for i in &graph.inputs {
        if let Some([Dim::Fixed(b), ..]) = i.shape.as_deref() {
            if b0.is_some_and(|x| x != *b) {
                bail!(
                    "the inputs declare different batch sizes ({} and {b}); elrt cannot tell which axis is the batch",
                    b0.unwrap_or(0)
                );
            }
            b0 = Some(*b);
        }
    }
    let Some(b0) = b0 else { return Ok(()) };
    let at = |b: usize| -> Vec<Vec<usize>> {
        input_shapes
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if let Some(d) = s.first_mut() {
                    *d = b;
                }
                s
            })
            .collect()
    };
    let facts0 = infer(graph, &at(b0))
        .with_context(|| format!("at batch {b0}, the batch the file declares"))?;
    super::fold::fold_input_free(graph, &facts0);
    rewrite_batch_constants(graph, &facts0, b0);
    for vi in graph.inputs.iter_mut().chain(graph.outputs.iter_mut()) {
        if let Some(Dim::Fixed(b)) = vi.shape.as_mut().and_then(|s| s.first_mut()) {
            if *b == b0 {
                vi.shape.as_mut().expect("has a shape")[0] = Dim::Sym(BATCH_DIM.into());
            }
        }
    }
    // The proof: at another batch every value keeps its shape, or changes in axis 0 only,
    // from b0 to b1 there. b0 + 2 avoids 2, a common group count, when b0 = 1.
    // When inference at b1 fails, the values inferred before the failure still name the
    // first node that mixed the batch in, which is where the fault usually lies.
    let b1 = b0 + 2;
    let mut facts1 = Facts::new();
    let inferred = infer_into(graph, &at(b1), &mut facts1);
    check_batch_major(graph, &facts0, &facts1, b0, b1, inferred.is_ok())?;
    inferred.with_context(|| {
        format!(
            "the file fixes the batch at {b0} and does not run at batch {b1}, even with its \
             batch-sized constants rewritten; re-export it with a dynamic batch axis \
             (torch.onnx.export(..., dynamic_axes={{'input': {{0: 'batch'}}}}) or dynamic_shapes)"
        )
    })?;
    if !graph
        .meta
        .metadata_props
        .iter()
        .any(|(k, _)| k == SOURCE_BATCH_KEY)
    {
        graph
            .meta
            .metadata_props
            .push((SOURCE_BATCH_KEY.into(), b0.to_string()));
    }
    Ok(())
}

/// Rewrites a Reshape target whose first entry is the export batch, applied to a value whose
/// first axis is that batch, to "copy the input's batch": 0, or -1 under `allowzero` (where 0
/// would mean an empty axis) when the target has no other -1. A target shared with other
/// readers gets a copy of its own.
fn rewrite_batch_constants(graph: &mut Graph, facts: &Facts, b0: usize) {
    let mut uses: HashMap<String, usize> = HashMap::new();
    for n in &graph.nodes {
        for i in &n.inputs {
            *uses.entry(i.clone()).or_default() += 1;
        }
    }
    let mut taken: Vec<(usize, String, Tensor)> = Vec::new();
    for (k, n) in graph.nodes.iter().enumerate() {
        let Op::Reshape { allowzero } = n.op else {
            continue;
        };
        let Some(target) = n.input(1) else { continue };
        let Some(Tensor::I64(t)) = graph.initializers.get(target) else {
            continue;
        };
        let x0 = facts
            .get(&n.inputs[0])
            .and_then(|f| f.shape.first().copied());
        let y0 = facts
            .get(&n.outputs[0])
            .and_then(|f| f.shape.first().copied());
        if t.ndim() != 1 || t.is_empty() || x0 != Some(b0) || y0 != Some(b0) {
            continue;
        }
        if t[0] != b0 as i64 {
            continue;
        }
        let copy = if !allowzero {
            0
        } else if !t.iter().any(|&v| v == -1) {
            -1
        } else {
            continue; // left as it is: the proof below names it if it matters
        };
        let mut t = t.clone();
        t[0] = copy;
        taken.push((k, target.to_string(), Tensor::I64(t)));
    }
    for (k, target, t) in taken {
        let name = if uses.get(&target).copied().unwrap_or(0) > 1 {
            let mut name = format!("{target}/any_batch");
            let mut i = 1;
            while graph.initializers.contains_key(&name) {
                i += 1;
                name = format!("{target}/any_batch_{i}");
            }
            graph.nodes[k].inputs[1] = name.clone();
            name
        } else {
            target
        };
        graph.initializers.insert(name, t);
    }
}

/// Every node output's shape at batch `b1` equals its shape at `b0`, or differs in axis 0 only,
/// as `b0` -> `b1`; with `complete` facts, the graph's output follows the batch.
fn check_batch_major(
    graph: &Graph,
    f0: &Facts,
    f1: &Facts,
    b0: usize,
    b1: usize,
    complete: bool,
) -> Result<()> {
    for n in &graph.nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            let (Some(s0), Some(s1)) = (f0.get(o), f1.get(o)) else {
                continue;
            };
            let (s0, s1) = (&s0.shape, &s1.shape);
            let batch_major = s0.len() == s1.len()
                && s0.first() == Some(&b0)
                && s1.first() == Some(&b1)
                && s0[1..] == s1[1..];
            if s0 != s1 && !batch_major {
                bail!(
                    "node '{}' ({}): the file fixes the batch at {b0}, and this node's output does \
                     not keep the batch in its first axis (shape {:?} at batch {b0}, {:?} at \
                     batch {b1}), so elrt cannot run it at another batch; re-export the model \
                     with a dynamic batch axis",
                    n.name,
                    n.op.onnx_type(),
                    s0,
                    s1
                );
            }
        }
    }
    for o in graph.outputs.iter().filter(|_| complete) {
        if let (Some(s0), Some(s1)) = (f0.get(&o.name), f1.get(&o.name)) {
            if s0.shape.first() != Some(&b0) || s1.shape.first() != Some(&b1) {
                bail!(
                    "graph output '{}' does not follow the batch (shape {:?} at batch {b0}, {:?} \
                     at batch {b1}); declared as {}",
                    o.name,
                    s0.shape,
                    s1.shape,
                    o.shape.as_deref().map(fmt_dims).unwrap_or_default()
                );
            }
        }
    }
    Ok(())
}
