//! `elrt convert`: the low-rank rewrite as a command.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::bench::rank_search::LatencySearch;
use crate::inspect::group_digits;
use crate::ir::Graph;
use crate::lowrank::rank::RankPolicy;
use crate::lowrank::{convert, ConvertOptions, Format, InitMode, LayerReport};

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The ONNX model (an architecture, or a trained model with --init decompose).
    pub model: PathBuf,
    /// tucker2 | cp
    #[arg(long, default_value = "tucker2")]
    pub format: String,
    /// ratio=F (each layer keeps F of its ranks) | params=F | macs=F (a whole-model budget) |
    /// energy=F | latency=F (measured in tract) | a JSON file of per-layer ranks. The default
    /// is a per-layer rule; `elrt compress` defaults to params=0.4, a whole-model budget.
    #[arg(long, default_value = "ratio=0.5")]
    pub ranks: String,
    /// Round ranks to a multiple of this.
    #[arg(long, default_value_t = 8)]
    pub rank_multiple: usize,
    /// Factorize the first conv (the one reading the image) too.
    #[arg(long)]
    pub include_first: bool,
    /// Factorize 1x1 convs too, by SVD (1x1 C_in -> r, 1x1 r -> C_out): for networks whose
    /// weight sits in pointwise convs, such as MobileNetV2.
    #[arg(long = "include-1x1")]
    pub include_pointwise: bool,
    /// Factorize Gemm (fully connected) layers too, by SVD (two Gemms through rank r).
    #[arg(long)]
    pub include_gemm: bool,
    /// scratch | orthogonal | decompose (factors of the file's trained kernels)
    #[arg(long, default_value = "scratch")]
    pub init: String,
    /// Seed of the fresh factors (scratch and orthogonal init) and of CP-ALS's start.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// HOOI sweeps after HOSVD (--init decompose, Tucker-2).
    #[arg(long, default_value_t = 10)]
    pub hooi_iters: usize,
    /// ALS sweeps (--init decompose, CP).
    #[arg(long, default_value_t = 50)]
    pub cp_iters: usize,
    /// Threads tract times with for --ranks latency=F (the deployment's thread count).
    #[arg(long, default_value_t = 1)]
    pub latency_threads: usize,
    /// Image shape C,H,W for a model whose file leaves input dimensions unknown (or to convert
    /// it for another input size).
    #[arg(long, value_name = "C,H,W")]
    pub input_shape: Option<String>,
    /// Output ONNX file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the per-layer report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
pub struct ConvertReport {
    pub model: String,
    pub output: String,
    pub format: Format,
    pub ranks: String,
    pub init: InitMode,
    pub params_before: u64,
    pub params_after: u64,
    pub macs_before: u64,
    pub macs_after: u64,
    pub layers: Vec<LayerReport>,
    /// With `--ranks latency=F`: the chosen round's measurements and the latency reached.
    pub latency_search: Option<LatencySearch>,
    pub latency_reached: Option<LatencyReached>,
}

#[derive(Serialize)]
pub struct LatencyReached {
    pub target: f32,
    pub dense_ms: f64,
    pub predicted_ms: f64,
    /// The converted model, exported with its fastest forms, timed in tract.
    pub measured_ms: f64,
    pub ratio: f64,
}

pub fn run(a: ConvertArgs) -> Result<ConvertReport> {
    if a.output.extension().is_none_or(|e| e != "onnx") {
        bail!(
            "-o {}: the output must be an .onnx file",
            a.output.display()
        );
    }
    let g = crate::onnx::read_file(&a.model)?;
    let (g, report) = convert_graph(g, &a)?;
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
    }
    crate::onnx::write_file(&g, &a.output)?;
    Ok(report)
}

/// Converts a model read from `a.model` as `elrt convert` does, in memory: nothing is written,
/// so a caller (compress) can check the result before it commits to files.
pub fn convert_graph(mut g: Graph, a: &ConvertArgs) -> Result<(Graph, ConvertReport)> {
    let format: Format = a.format.parse()?;
    let ranks: RankPolicy = a.ranks.parse()?;
    let init: InitMode = a.init.parse()?;
    let what = || a.model.display().to_string();
    if let Some(s) = &a.input_shape {
        crate::ir::shape::set_image_shape(&mut g, &crate::inspect::parse_shape(s)?)
            .with_context(what)?;
    }
    let shapes = crate::ir::shape::default_input_shapes(&g).with_context(what)?;
    let facts = crate::ir::fold::simplify(
        &mut g,
        &shapes,
        crate::ir::fold::FoldOptions {
            remove_dropout: false,
        },
    )
    .with_context(what)?;
    let before = crate::ir::cost::cost(&g, &facts).totals;
    let mut opts = ConvertOptions {
        format,
        ranks,
        rank_multiple: a.rank_multiple,
        include_first: a.include_first,
        include_pointwise: a.include_pointwise,
        include_gemm: a.include_gemm,
        init,
        seed: a.seed,
        hooi_iters: a.hooi_iters,
        cp_iters: a.cp_iters,
    };
    // latency=F: ranks from tract measurements on this machine. Layers timed alone run slower
    // than inside the model, so the search's prediction is pessimistic: each round converts,
    // measures the whole model, and rescales the budget it gives the search, keeping the
    // result that meets the target most closely from below (at most 4 rounds).
    let mut latency = None;
    let mut latency_reached = None;
    if let RankPolicy::Latency(target) = opts.ranks {
        let say = |m: &str| {
            if !a.json {
                eprintln!("{m}");
            }
        };
        let mut budget = target;
        let mut best: Option<LatencyRound> = None;
        for round in 0..4 {
            let found = crate::bench::rank_search::latency_ranks(
                &g,
                &facts,
                &opts,
                budget,
                a.latency_threads,
                say,
            );
            let (map, search) = match found {
                Ok(x) => x,
                // A rescaled budget out of reach: keep what the earlier rounds found.
                Err(e) if round > 0 => {
                    say(&format!("round {}: {e:#}", round + 1));
                    break;
                }
                Err(e) => return Err(e.context(a.model.display().to_string())),
            };
            let mut trial = g.clone();
            let mut o = opts.clone();
            o.ranks = RankPolicy::Explicit(map.clone());
            convert(&mut trial, &facts, &o)?;
            let t = crate::bench::rank_search::deployed_ms(
                &trial,
                crate::export::FormsPolicy::Fastest,
                a.latency_threads,
                &Default::default(),
            )?;
            let ratio = t / search.model_dense_ms;
            say(&format!(
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
        latency_reached = Some(LatencyReached {
            dense_ms: search.model_dense_ms,
            predicted_ms: search.predicted_ms,
            measured_ms: t,
            ratio,
            target,
        });
        opts.ranks = RankPolicy::Explicit(map);
        latency = Some(search);
    }
    let layers = convert(&mut g, &facts, &opts).with_context(what)?;
    let facts2 = crate::ir::shape::infer(&g, &shapes)?;
    let after = crate::ir::cost::cost(&g, &facts2).totals;
    // elrt's records of an earlier stage go, except the input normalisation: the converted
    // model takes its inputs as the original did.
    g.meta.metadata_props.retain(|(k, _)| {
        !k.starts_with("elrt.")
            || k.starts_with("elrt.normalize")
            || k.starts_with("elrt.input.")
            || k == crate::data::CLASSES_KEY
    });
    g.meta.metadata_props.extend([
        ("elrt.source".to_string(), a.model.display().to_string()),
        ("elrt.format".to_string(), a.format.clone()),
        ("elrt.ranks".to_string(), a.ranks.clone()),
        ("elrt.init".to_string(), a.init.clone()),
    ]);
    let report = ConvertReport {
        model: a.model.display().to_string(),
        output: a.output.display().to_string(),
        format,
        ranks: a.ranks.clone(),
        init,
        params_before: before.params,
        params_after: after.params,
        macs_before: before.macs,
        macs_after: after.macs,
        layers,
        latency_search: latency,
        latency_reached,
    };
    Ok((g, report))
}

/// One round of the latency search: measured ratio, ranks, the search, measured ms.
type LatencyRound = (f64, BTreeMap<String, Vec<usize>>, LatencySearch, f64);

impl ConvertReport {
    pub fn to_text(&self) -> String {
        let mut rows = vec![[
            "layer".to_string(),
            "weight".into(),
            "ranks".into(),
            "params".into(),
            "MACs".into(),
            "status".into(),
        ]];
        for l in &self.layers {
            let err = l
                .rel_error
                .map(|e| format!(" (rel. error {e:.3})"))
                .unwrap_or_default();
            rows.push([
                l.layer.clone(),
                format!("{:?}", l.weight_shape),
                if l.ranks.is_empty() {
                    "-".into()
                } else {
                    format!("{:?}", l.ranks)
                },
                format!(
                    "{} -> {}",
                    group_digits(l.params_before),
                    group_digits(l.params_after)
                ),
                format!(
                    "{} -> {}",
                    group_digits(l.macs_before),
                    group_digits(l.macs_after)
                ),
                format!("{}{err}", l.status),
            ]);
        }
        let mut w = [0usize; 6];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<width$}", width = w[i]))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
        }
        out.push_str(&format!(
            "total: params {} -> {} ({:.2}x fewer), MACs {} -> {} ({:.2}x fewer)\nwrote {}\n",
            group_digits(self.params_before),
            group_digits(self.params_after),
            self.params_before as f64 / self.params_after.max(1) as f64,
            group_digits(self.macs_before),
            group_digits(self.macs_after),
            self.macs_before as f64 / self.macs_after.max(1) as f64,
            self.output
        ));
        if let Some(l) = &self.latency_reached {
            out.push_str(&format!(
                "latency in tract (batch 1): dense {:.3} ms -> {:.3} ms measured ({:.2} of dense; target {}, predicted {:.3} ms)\n",
                l.dense_ms, l.measured_ms, l.ratio, l.target, l.predicted_ms
            ));
        }
        out
    }
}
