//! Folds each BatchNormalization into the convolution that feeds it, for deployment.
//!
//! In eval form BN is a per-channel affine map `y = s * (x - mean) + beta` with
//! `s = gamma / sqrt(var + eps)`. When `x` is a conv output used by nothing else, the map moves
//! into the conv: `W'[o] = s[o] * W[o]`, `b'[o] = s[o] * (b[o] - mean[o]) + beta[o]`. The result
//! is the same function with one node and one pass over memory fewer. A BN that does not follow
//! such a conv stays, switched to its inference form.

use anyhow::{anyhow, Result};
use ndarray::{ArrayD, Axis, IxDyn};

use crate::ir::{Graph, Op, Tensor};

/// What the pass did, for the export report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FoldReport {
    pub folded: usize,
    /// BN nodes left as they are (no conv before them, or the conv output has other uses).
    pub kept: Vec<String>,
}

fn f32_init<'a>(g: &'a Graph, name: &str, node: &str) -> Result<&'a ArrayD<f32>> {
    g.initializers
        .get(name)
        .and_then(Tensor::as_f32)
        .ok_or_else(|| anyhow!("node '{node}': '{name}' is not a float initializer"))
}

/// Runs the pass. `g` must be simplified (constants are initializers, no Identity).
pub fn fold_batchnorm(g: &mut Graph) -> Result<FoldReport> {
    let mut report = FoldReport::default();
    let mut i = 0;
    while i < g.nodes.len() {
        let Op::BatchNorm(bn) = &g.nodes[i].op else {
            i += 1;
            continue;
        };
        let eps = bn.epsilon;
        let bn_node = g.nodes[i].clone();
        let x = bn_node.inputs[0].clone();
        let producer = g.producers().get(x.as_str()).copied();
        let uses = g.use_counts().get(x.as_str()).copied().unwrap_or(0);
        let conv_ix = producer.filter(|&p| {
            matches!(g.nodes[p].op, Op::Conv(_))
                && uses == 1
                && g.initializers.contains_key(&g.nodes[p].inputs[1])
                && g.nodes[p]
                    .input(2)
                    .is_none_or(|b| g.initializers.contains_key(b))
        });
        let Some(p) = conv_ix else {
            // Inference form: batch statistics off, no statistics outputs.
            if let Op::BatchNorm(b) = &mut g.nodes[i].op {
                b.training_mode = false;
            }
            g.nodes[i].outputs.truncate(1);
            report.kept.push(bn_node.name.clone());
            i += 1;
            continue;
        };
        let name = &bn_node.name;
        let gamma = f32_init(g, &bn_node.inputs[1], name)?;
        let beta = f32_init(g, &bn_node.inputs[2], name)?;
        let mean = f32_init(g, &bn_node.inputs[3], name)?;
        let var = f32_init(g, &bn_node.inputs[4], name)?;
        let conv = g.nodes[p].clone();
        let w = f32_init(g, &conv.inputs[1], &conv.name)?;
        let co = w.shape()[0];
        if [gamma, beta, mean, var].iter().any(|t| t.len() != co) {
            return Err(anyhow!(
                "node '{name}': {} statistics for a conv with {co} output channels",
                gamma.len()
            ));
        }
        let s: Vec<f32> = (0..co)
            .map(|o| gamma[[o]] / (var[[o]] + eps).sqrt())
            .collect();
        let mut w2 = w.clone();
        for (o, mut row) in w2.axis_iter_mut(Axis(0)).enumerate() {
            row.mapv_inplace(|v| v * s[o]);
        }
        let b_old: Vec<f32> = match conv.input(2) {
            Some(b) => f32_init(g, b, &conv.name)?.iter().copied().collect(),
            None => vec![0.0; co],
        };
        let b2: Vec<f32> = (0..co)
            .map(|o| s[o] * (b_old[o] - mean[[o]]) + beta[[o]])
            .collect();
        // The old initializers go if this conv was their only user; the new ones get fresh
        // names so that a weight shared with another node is left untouched.
        let counts = g.use_counts();
        let sole: Vec<String> = conv.inputs[1..]
            .iter()
            .filter(|n| !n.is_empty() && counts.get(n.as_str()) == Some(&1))
            .cloned()
            .collect();
        drop(counts);
        for n in &sole {
            g.initializers.remove(n);
        }
        let old_w = &conv.inputs[1];
        let wname = if sole.contains(old_w) {
            old_w.clone()
        } else {
            fresh(g, &format!("{}.weight", conv.name))
        };
        let bname = match conv.input(2) {
            Some(b) if sole.iter().any(|n| n == b) => b.to_string(),
            _ => fresh(
                g,
                &match wname.strip_suffix(".weight") {
                    Some(stem) => format!("{stem}.bias"),
                    None => format!("{wname}.bias"),
                },
            ),
        };
        g.initializers.insert(wname.clone(), Tensor::F32(w2));
        g.initializers.insert(
            bname.clone(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[co]), b2)?),
        );
        let c = &mut g.nodes[p];
        c.inputs.truncate(2);
        c.inputs[1] = wname;
        c.inputs.push(bname);
        // The conv now produces what the BN produced.
        c.outputs[0] = bn_node.outputs[0].clone();
        g.nodes.remove(i);
        report.folded += 1;
    }
    g.prune();
    Ok(report)
}

/// `want` if no value has that name yet, else a suffixed variant ([`Graph::fresh_value_name`]).
pub(crate) fn fresh(g: &Graph, want: &str) -> String {
    g.fresh_value_name(want)
}
