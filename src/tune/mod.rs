//! Rank policies resolved by measurement: `--ranks latency=F` ([`latency`]).
//!
//! The rank policies live in [`crate::lowrank::rank`], and most resolve inside the rewrite
//! from the graph alone (a ratio, a parameter or MAC budget, the trained kernel's energy, a
//! file). `latency=F` cannot: it times candidate ranks in tract, exported as deployment runs
//! them, so it needs [`crate::export`] (the deployed form) and [`crate::runtime`] (tract).
//! The modules are layered in the pipeline's order (convert, train, export), and export
//! imports lowrank (it reads the factor names the rewrite writes, [`crate::lowrank::naming`]),
//! so the search inside lowrank would make the cycle lowrank -> export -> lowrank. It lives
//! here instead, one layer above export: [`resolve`] is the one entry that turns a
//! [`RankPolicy`] into what the rewrite takes, and lowrank keeps the pure policies and the
//! pass, which only need the graph.

pub mod latency;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::ir::shape::Facts;
use crate::ir::Graph;
use crate::lowrank::rank::RankPolicy;
use crate::lowrank::{convert, ConvertOptions};
use latency::LatencySearch;

/// With `--ranks latency=F`: the latency the chosen ranks reach, measured on the whole model.
#[derive(Clone, Debug, Serialize)]
pub struct LatencyReached {
    pub target: f32,
    pub dense_ms: f64,
    pub predicted_ms: f64,
    /// The converted model, exported with its fastest forms, timed in tract.
    pub measured_ms: f64,
    pub ratio: f64,
}

/// What [`resolve`] measured for `latency=F`: the chosen round's search and the latency reached.
#[derive(Clone, Debug)]
pub struct LatencyOutcome {
    pub search: LatencySearch,
    pub reached: LatencyReached,
}

/// One round of the latency search: measured ratio, ranks, the search, measured ms.
type LatencyRound = (f64, BTreeMap<String, Vec<usize>>, LatencySearch, f64);

/// Resolves the policies that need measurements: `latency=F` becomes
/// [`RankPolicy::Explicit`] per-layer ranks in `opts.ranks`, with what was measured; every
/// other policy is left as it is for [`convert`], which resolves it per layer. `threads`: the
/// thread count tract times with (the deployment's).
///
/// latency=F: ranks from tract measurements on this machine. Layers timed alone run slower
/// than inside the model, so the search's prediction is pessimistic: each round converts,
/// measures the whole model, and rescales the budget it gives the search, keeping the result
/// that meets the target most closely from below (at most 4 rounds).
pub fn resolve(
    g: &Graph,
    facts: &Facts,
    opts: &mut ConvertOptions,
    threads: usize,
    mut progress: impl FnMut(&str),
) -> Result<Option<LatencyOutcome>> {
    let RankPolicy::Latency(target) = opts.ranks else {
        return Ok(None);
    };
    let mut budget = target;
    let mut best: Option<LatencyRound> = None;
    for round in 0..4 {
        let found = latency::latency_ranks(g, facts, opts, budget, threads, &mut progress);
        let (map, search) = match found {
            Ok(x) => x,
            // A rescaled budget out of reach: keep what the earlier rounds found.
            Err(e) if round > 0 => {
                progress(&format!("round {}: {e:#}", round + 1));
                break;
            }
            Err(e) => return Err(e),
        };
        let mut trial = g.clone();
        let mut o = opts.clone();
        o.ranks = RankPolicy::Explicit(map.clone());
        convert(&mut trial, facts, &o)?;
        let t = latency::deployed_ms(
            &trial,
            crate::export::FormsPolicy::Fastest,
            threads,
            &Default::default(),
        )?;
        let ratio = t / search.model_dense_ms;
        progress(&format!(
            "round {}: budget {budget:.3} -> measured {ratio:.3} of the dense latency (target {target})",
            round + 1
        ));
        // Closest to the target from below wins; while nothing meets it, the fastest.
        let better = match &best {
            None => true,
            Some((r, ..)) => match (ratio <= target as f64, *r <= target as f64) {
                (true, true) => ratio > *r,
                (true, false) => true,
                (false, true) => false,
                (false, false) => ratio < *r,
            },
        };
        if better {
            best = Some((ratio, map, search, t));
        }
        if ratio <= target as f64 && target as f64 - ratio < 0.03 {
            break;
        }
        budget = ((budget as f64) * target as f64 / ratio).min(1.0) as f32;
    }
    let (ratio, map, search, t) = best.expect("one round ran");
    opts.ranks = RankPolicy::Explicit(map);
    Ok(Some(LatencyOutcome {
        reached: LatencyReached {
            dense_ms: search.model_dense_ms,
            predicted_ms: search.predicted_ms,
            measured_ms: t,
            ratio,
            target,
        },
        search,
    }))
}
