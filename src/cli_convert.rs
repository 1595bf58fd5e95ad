//! `elrt convert`: the low-rank rewrite as a command.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::inspect::group_digits;
use crate::ir::Graph;
use crate::lowrank::rank::RankPolicy;
use crate::lowrank::{convert, ConvertOptions, Format, InitMode, LayerReport};
use crate::tune::latency::LatencySearch;
use crate::tune::LatencyReached;

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
    // Policies resolved by measurement (latency=F) become per-layer ranks here.
    let say = |m: &str| {
        if !a.json {
            eprintln!("{m}");
        }
    };
    let (latency, latency_reached) =
        match crate::tune::resolve(&g, &facts, &mut opts, a.latency_threads, say)
            .with_context(what)?
        {
            Some(o) => (Some(o.search), Some(o.reached)),
            None => (None, None),
        };
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
