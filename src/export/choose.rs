//! Picks, per factorized layer, the form that tract runs fastest on this machine.
//!
//! Each layer is cut out into a one-layer model (its input at the shape it has in the full
//! model), written in every exact form, and the forms are timed against each other in tract,
//! interleaved. Per-layer winners need not compose into the fastest model (tract fuses a conv
//! with what follows it, and memory traffic depends on neighbours), so the caller also times
//! the whole model with the per-layer choice, all-factorized and all-dense, and keeps the
//! fastest of the three: the export is never slower than either uniform choice.
//!
//! "Fastest" allows for timing noise: among the forms within [`TIE_MARGIN`] of the fastest, the
//! one with the fewest weights wins. Merging a Tucker-2 core into U2 can multiply a layer's
//! weights for a latency gain of a few percent; measured beside a training run, a strict
//! fastest-median rule once took 7 such merges for a 1.0% faster model with 24% more params
//! (0.730 against 0.737 ms, 166,218 against 134,282 weights).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::forms::{apply, Chain, Form};
use crate::ir::shape::Facts;
use crate::ir::{Dim, Graph, ValueInfo};
use crate::runtime::timing::{time_interleaved, TimingOptions};
use crate::runtime::TractModel;

/// How much slower than the fastest a form may be and still count as tied with it (then the
/// fewer weights decide). Repeated medians of one file in this machine's benches vary by 1-3%.
pub const TIE_MARGIN: f64 = 0.03;

/// Float initializer elements: the weights a deployed file carries.
pub fn weight_count(g: &Graph) -> usize {
    g.initializers
        .values()
        .filter(|t| t.elem_type().is_float())
        .map(|t| t.len())
        .sum()
}

/// Index of the candidate to keep among `(median ms, weights)`: the fewest weights among those
/// within [`TIE_MARGIN`] of the fastest, the faster on equal weights.
pub fn pick(candidates: &[(f64, usize)]) -> usize {
    let fastest = candidates.iter().map(|c| c.0).fold(f64::INFINITY, f64::min);
    (0..candidates.len())
        .filter(|&k| candidates[k].0 <= fastest * (1.0 + TIE_MARGIN))
        .min_by(|&a, &b| {
            let (ta, wa) = candidates[a];
            let (tb, wb) = candidates[b];
            wa.cmp(&wb).then(ta.total_cmp(&tb))
        })
        .unwrap_or(0)
}

/// Timed forms of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerTiming {
    pub layer: String,
    /// Median milliseconds per form, at the export batch size.
    pub p50_ms: BTreeMap<String, f64>,
    pub chosen: Form,
}

/// The layer alone: its convs and initializers, input and output declared with fixed shapes.
pub fn layer_graph(g: &Graph, facts: &Facts, chain: &Chain) -> Result<Graph> {
    let nodes: Vec<_> = chain
        .nodes
        .iter()
        .map(|n| g.node(n).cloned().context("chain node missing"))
        .collect::<Result<_>>()?;
    layer_graph_of_nodes(g, facts, &chain.layer, &nodes)
}

/// A graph of `nodes` (a chain, each feeding the next) cut out of `g`, named `name`.
pub fn layer_graph_of_nodes(
    g: &Graph,
    facts: &Facts,
    name: &str,
    nodes: &[crate::ir::Node],
) -> Result<Graph> {
    let nodes = nodes.to_vec();
    let input = nodes[0].inputs[0].clone();
    let output = nodes[nodes.len() - 1].outputs[0].clone();
    let shape_of = |v: &str| -> Result<Vec<Dim>> {
        Ok(facts
            .get(v)
            .with_context(|| format!("no shape for '{v}'"))?
            .shape
            .iter()
            .map(|&d| Dim::Fixed(d))
            .collect())
    };
    let mut sub = Graph {
        name: name.to_string(),
        opset: 13,
        inputs: vec![ValueInfo {
            name: input.clone(),
            elem: crate::ir::ElemType::F32,
            shape: Some(shape_of(&input)?),
        }],
        outputs: vec![ValueInfo {
            name: output.clone(),
            elem: crate::ir::ElemType::F32,
            shape: Some(shape_of(&output)?),
        }],
        nodes: nodes.clone(),
        initializers: Default::default(),
        meta: Default::default(),
    };
    for n in &nodes {
        for i in &n.inputs[1..] {
            if let Some(t) = g.initializers.get(i) {
                sub.initializers.insert(i.clone(), t.clone());
            }
        }
    }
    Ok(sub)
}

/// Times the exact forms of `chain` and returns them with their medians, fastest first.
pub fn time_forms(g: &Graph, facts: &Facts, chain: &Chain, threads: usize) -> Result<LayerTiming> {
    let sub = layer_graph(g, facts, chain)?;
    let shape: Vec<usize> = facts[&sub.inputs[0].name].shape.clone();
    let forms = chain.forms(g);
    let mut models = Vec::new();
    let mut weights = Vec::new();
    for &f in &forms {
        let mut s = sub.clone();
        apply(&mut s, chain, f)?;
        weights.push(weight_count(&s));
        let bytes = crate::onnx::write_bytes(&s)?;
        models.push(
            TractModel::from_bytes(&bytes, &shape, threads)
                .with_context(|| format!("layer '{}', form {}", chain.layer, f.name()))?,
        );
    }
    let opts = TimingOptions {
        warmup: 5,
        runs: 30,
        chunk: 3,
        min_time: Duration::from_millis(60),
    };
    let times = time_interleaved(&mut models, &opts)?;
    let p50: BTreeMap<String, f64> = forms
        .iter()
        .zip(&times)
        .map(|(f, t)| (f.name().to_string(), t.p50()))
        .collect();
    let scored: Vec<(f64, usize)> = times.iter().map(|t| t.p50()).zip(weights).collect();
    Ok(LayerTiming {
        layer: chain.layer.clone(),
        p50_ms: p50,
        chosen: forms[pick(&scored)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_prefers_fewer_weights_within_the_noise_margin() {
        // A form 1% faster with twice the weights loses to the smaller one.
        assert_eq!(pick(&[(1.00, 100), (0.99, 200)]), 0);
        // 10% faster wins whatever its size.
        assert_eq!(pick(&[(1.00, 100), (0.90, 200)]), 1);
        // Among tied forms of equal size, the faster.
        assert_eq!(pick(&[(1.00, 100), (0.99, 100), (0.995, 300)]), 1);
        // The smallest form inside the margin, even if not the fastest of the tied ones.
        assert_eq!(pick(&[(0.98, 150), (0.97, 300), (0.99, 120)]), 2);
        // Just outside the margin (1.00 > 0.97 * 1.03): excluded.
        assert_eq!(pick(&[(0.98, 150), (0.97, 300), (1.00, 120)]), 0);
        assert_eq!(pick(&[(2.0, 10)]), 0);
    }
}
