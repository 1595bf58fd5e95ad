//! Picks, per factorized layer, the form that tract runs fastest on this machine.
//!
//! Each layer is cut out into a one-layer model (its input at the shape it has in the full
//! model), written in every exact form, and the forms are timed against each other in tract,
//! interleaved. Per-layer winners need not compose into the fastest model (tract fuses a conv
//! with what follows it, and memory traffic depends on neighbours), so the caller also times
//! the whole model with the per-layer choice, all-factorized and all-dense, and keeps the
//! fastest of the three: the export is never slower than either uniform choice.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::forms::{apply, Chain, Form};
use crate::bench::latency::{time_interleaved, TimingOptions};
use crate::bench::tract_rt::TractModel;
use crate::ir::shape::Facts;
use crate::ir::{Dim, Graph, ValueInfo};

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
    for &f in &forms {
        let mut s = sub.clone();
        apply(&mut s, chain, f)?;
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
    let mut best = (f64::INFINITY, Form::Factorized);
    let mut p50 = BTreeMap::new();
    for (f, t) in forms.iter().zip(&times) {
        let m = t.p50();
        p50.insert(f.name().to_string(), m);
        if m < best.0 {
            best = (m, *f);
        }
    }
    Ok(LayerTiming {
        layer: chain.layer.clone(),
        p50_ms: p50,
        chosen: best.1,
    })
}
