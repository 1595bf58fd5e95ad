//! `--ranks latency=F`: per-layer ranks chosen by latency measured in tract, not by MACs.
//!
//! Why: a runtime's speed per MAC falls with the channel count (tract's AVX-512 kernels work
//! on 16-row panels, so a rank-8 factor wastes half of each), so a uniform MAC cut buys less
//! time than it promises, and unevenly across layers. The search measures instead:
//!
//! 1. the whole model, dense, in tract (`T_model`), and each eligible layer alone, dense and at
//!    every rank option (ratios 1/16 .. 15/16 of its channels), factorized, in tract. Layers of
//!    the same shape share their measurements.
//! 2. The time outside the eligible layers is `T_rest = T_model - sum(dense layer times)`; the
//!    layers must fit in `F * T_model - T_rest`.
//! 3. Greedy: every layer starts dense; the move taken each round is the rank cut, over all
//!    layers, that saves the most time per parameter it removes (parameters stand for
//!    capacity), until the budget is met. Cuts that do not save time are never taken, so a
//!    layer whose factorization runs no faster stays dense.
//!
//! The caller ([`super::resolve`]) converts with the chosen ranks and measures the whole result
//! again, so the report shows the latency reached, not only the one predicted.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::export::choose::layer_graph_of_nodes;
use crate::export::{export, ExportOptions, FormsPolicy};
use crate::ir::shape::Facts;
use crate::ir::Graph;
use crate::lowrank::rank::RankPolicy;
use crate::lowrank::{convert, eligible_layers, ConvertOptions};
use crate::runtime::timing::{time_interleaved, TimingOptions};
use crate::runtime::TractModel;

#[derive(Clone, Debug, Serialize)]
pub struct LayerChoice {
    pub layer: String,
    /// Empty: left dense.
    pub ranks: Vec<usize>,
    pub dense_ms: f64,
    pub chosen_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencySearch {
    pub target: f32,
    pub model_dense_ms: f64,
    pub rest_ms: f64,
    pub predicted_ms: f64,
    pub layers: Vec<LayerChoice>,
}

/// One rank option of a layer: (ranks, params, measured ms).
type RankTiming = (Vec<usize>, u64, f64);

fn timing() -> TimingOptions {
    TimingOptions {
        warmup: 3,
        runs: 20,
        chunk: 2,
        min_time: Duration::from_millis(25),
    }
}

fn time_graph(g: &Graph, shape: &[usize], threads: usize) -> Result<f64> {
    let mut c = g.clone();
    c.opset = c.opset.max(13);
    let bytes = crate::onnx::write_bytes(&c)?;
    let mut m = vec![TractModel::from_bytes(&bytes, shape, threads)?];
    Ok(time_interleaved(&mut m, &timing())?[0].p50())
}

/// `graph` exported for deployment (batch 1, BN folded, layer forms per `forms`) and timed in
/// tract: the latency the search aims at and the one it reaches.
pub fn deployed_ms(
    graph: &Graph,
    forms: FormsPolicy,
    threads: usize,
    timing: &TimingOptions,
) -> Result<f64> {
    let (exp, rep) = export(
        graph.clone(),
        &ExportOptions {
            forms,
            threads,
            ..Default::default()
        },
        |_| {},
    )
    .context("exporting the model for timing")?;
    let bytes = crate::onnx::write_bytes(&exp)?;
    let mut m = vec![TractModel::from_bytes(&bytes, &rep.input_shape, threads)?];
    Ok(time_interleaved(&mut m, timing)?[0].p50())
}

/// Searches per-layer ranks for `graph` (simplified for `facts`, batch 1).
pub fn latency_ranks(
    graph: &Graph,
    facts: &Facts,
    opts: &ConvertOptions,
    target: f32,
    threads: usize,
    mut progress: impl FnMut(&str),
) -> Result<(BTreeMap<String, Vec<usize>>, LatencySearch)> {
    let layers = eligible_layers(graph, facts, opts)?;
    if layers.is_empty() {
        bail!("--ranks latency={target}: the model has no layer to factorize");
    }
    // 1. The whole model, dense, as deployment would run it.
    progress("timing the dense model in tract");
    let model_ms = deployed_ms(graph, FormsPolicy::Factorized, threads, &timing())?;
    // 2. Each layer alone: dense and at each rank option (cached by shape).
    let mut cache: HashMap<String, f64> = HashMap::new();
    let mut table: Vec<(f64, Vec<RankTiming>)> = Vec::new();
    for (k, l) in layers.iter().enumerate() {
        progress(&format!(
            "timing {} at {} ranks ({}/{})",
            l.layer,
            l.options.len(),
            k + 1,
            layers.len()
        ));
        let node = &graph.nodes[l.node];
        let sub = layer_graph_of_nodes(graph, facts, &l.layer, std::slice::from_ref(node))?;
        let shape = facts[&node.inputs[0]].shape.clone();
        let conv = match &node.op {
            crate::ir::Op::Conv(c) => format!("{:?}", c),
            _ => String::new(),
        };
        let sig = format!("{:?}|{:?}|{conv}", l.weight, shape);
        let dense_ms = match cache.get(&sig) {
            Some(&t) => t,
            None => {
                let t = time_graph(&sub, &shape, threads)?;
                cache.insert(sig.clone(), t);
                t
            }
        };
        let mut opts_ms = Vec::new();
        for (r, params, _) in &l.options {
            let key = format!("{sig}|{r:?}");
            let t = match cache.get(&key) {
                Some(&t) => t,
                None => {
                    let mut s = sub.clone();
                    let f = crate::ir::shape::infer(&s, std::slice::from_ref(&shape))?;
                    let mut o = opts.clone();
                    o.include_first = true;
                    o.ranks = RankPolicy::Explicit(BTreeMap::from([(l.layer.clone(), r.clone())]));
                    convert(&mut s, &f, &o)?;
                    let t = time_graph(&s, &shape, threads)?;
                    cache.insert(key, t);
                    t
                }
            };
            opts_ms.push((r.clone(), *params, t));
        }
        table.push((dense_ms, opts_ms));
    }
    let layers_dense: f64 = table.iter().map(|t| t.0).sum();
    let rest = (model_ms - layers_dense).max(0.0);
    let budget = target as f64 * model_ms - rest;
    // 3. Greedy cuts. State per layer: None = dense, Some(i) = option i.
    let mut state: Vec<Option<usize>> = vec![None; layers.len()];
    let time_of = |k: usize, s: Option<usize>| s.map_or(table[k].0, |i| table[k].1[i].2);
    let params_of =
        |k: usize, s: Option<usize>| s.map_or(layers[k].params_dense, |i| table[k].1[i].1);
    let total = |state: &[Option<usize>]| -> f64 {
        state.iter().enumerate().map(|(k, &s)| time_of(k, s)).sum()
    };
    while total(&state) > budget {
        let mut best: Option<(f64, usize, usize)> = None;
        for (k, &s) in state.iter().enumerate() {
            let start = s.map_or(0, |i| i + 1);
            for i in start..table[k].1.len() {
                let dt = time_of(k, s) - time_of(k, Some(i));
                if dt <= 0.0 {
                    continue;
                }
                let dp = params_of(k, s).saturating_sub(params_of(k, Some(i))).max(1) as f64;
                let score = dt / dp;
                if best.is_none_or(|b| score > b.0) {
                    best = Some((score, k, i));
                }
            }
        }
        let Some((_, k, i)) = best else {
            let fastest = rest + total(&state);
            bail!(
                "--ranks latency={target}: unreachable in tract on this machine; the fastest ranks \
                 predict {:.3} ms of the dense {:.3} ms ({:.2})",
                fastest,
                model_ms,
                fastest / model_ms
            );
        };
        state[k] = Some(i);
    }
    let mut map = BTreeMap::new();
    let mut choices = Vec::new();
    for (k, l) in layers.iter().enumerate() {
        let ranks = state[k]
            .map(|i| table[k].1[i].0.clone())
            .unwrap_or_default();
        if !ranks.is_empty() {
            map.insert(l.layer.clone(), ranks.clone());
        }
        choices.push(LayerChoice {
            layer: l.layer.clone(),
            ranks,
            dense_ms: table[k].0,
            chosen_ms: time_of(k, state[k]),
        });
    }
    Ok((
        map,
        LatencySearch {
            target,
            model_dense_ms: model_ms,
            rest_ms: rest,
            predicted_ms: rest + total(&state),
            layers: choices,
        },
    ))
}
