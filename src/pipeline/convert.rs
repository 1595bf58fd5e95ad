//! The convert stage: every eligible conv (and, on request, 1x1 conv and Gemm) rewritten into
//! Tucker-2 or CP form with fresh or decomposed factors, ranks from a policy (`latency=F`
//! measured in tract).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::inspect::group_digits;
use crate::ir::Graph;
use crate::lowrank::rank::RankPolicy;
use crate::lowrank::{self, Format, InitMode, LayerReport};
use crate::tune::latency::LatencySearch;
use crate::tune::LatencyReached;

/// What [`convert`] does; the defaults are `elrt convert`'s.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The ONNX model (an architecture, or a trained model with [`InitMode::Decompose`]).
    pub model: PathBuf,
    /// The ONNX file to write.
    pub output: PathBuf,
    pub format: Format,
    pub ranks: RankPolicy,
    /// Round ranks to a multiple of this.
    pub rank_multiple: usize,
    /// Factorize the first conv (the one reading the image) too.
    pub include_first: bool,
    /// Factorize 1x1 convs too, by SVD.
    pub include_pointwise: bool,
    /// Factorize Gemm (fully connected) layers too, by SVD.
    pub include_gemm: bool,
    pub init: InitMode,
    /// Seed of the fresh factors and of CP-ALS's start.
    pub seed: u64,
    /// HOOI sweeps after HOSVD (decompose, Tucker-2).
    pub hooi_iters: usize,
    /// ALS sweeps (decompose, CP).
    pub cp_iters: usize,
    /// Threads tract times with for `latency=F` ranks.
    pub latency_threads: usize,
    /// Image shape for a model whose file leaves input dimensions unknown (or to convert it
    /// for another input size).
    pub input_shape: Option<Vec<usize>>,
    /// No latency-search progress on stderr.
    pub quiet: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            model: PathBuf::new(),
            output: PathBuf::new(),
            format: Format::Tucker2,
            ranks: RankPolicy::Ratio(0.5),
            rank_multiple: 8,
            include_first: false,
            include_pointwise: false,
            include_gemm: false,
            init: InitMode::Scratch,
            seed: 0,
            hooi_iters: 10,
            cp_iters: 50,
            latency_threads: 1,
            input_shape: None,
            quiet: false,
        }
    }
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

/// Converts the model as `elrt convert` does and writes the output.
pub fn convert(a: &ConvertOptions) -> Result<ConvertReport> {
    if a.output.extension().is_none_or(|e| e != "onnx") {
        bail!(
            "-o {}: the output must be an .onnx file",
            a.output.display()
        );
    }
    let g = crate::onnx::read_file(&a.model)?;
    let (g, report) = convert_graph(g, a)?;
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
    }
    crate::onnx::write_file(&g, &a.output)?;
    Ok(report)
}

/// Converts a model read from `a.model` as [`convert`] does, in memory: nothing is written,
/// so a caller (compress) can check the result before it commits to files.
pub fn convert_graph(mut g: Graph, a: &ConvertOptions) -> Result<(Graph, ConvertReport)> {
    let (format, init) = (a.format, a.init);
    let what = || a.model.display().to_string();
    if let Some(s) = &a.input_shape {
        crate::ir::shape::set_image_shape(&mut g, s).with_context(what)?;
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
    let mut opts = lowrank::ConvertOptions {
        format,
        ranks: a.ranks.clone(),
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
        if !a.quiet {
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
    let layers = lowrank::convert(&mut g, &facts, &opts).with_context(what)?;
    let facts2 = crate::ir::shape::infer(&g, &shapes)?;
    let after = crate::ir::cost::cost(&g, &facts2).totals;
    // elrt's records of an earlier stage go, except the input normalisation: the converted
    // model takes its inputs as the original did.
    g.meta.metadata_props.retain(|(k, _)| {
        !k.starts_with("elrt.")
            || k.starts_with("elrt.normalize")
            || k.starts_with("elrt.input.")
            || k == crate::data::CLASSES_KEY
            || k == crate::ir::bn_insert::BN_FOLDED_KEY
    });
    g.meta.metadata_props.extend([
        ("elrt.source".to_string(), a.model.display().to_string()),
        ("elrt.format".to_string(), a.format.to_string()),
        ("elrt.ranks".to_string(), a.ranks.to_string()),
        ("elrt.init".to_string(), a.init.to_string()),
    ]);
    let report = ConvertReport {
        model: a.model.display().to_string(),
        output: a.output.display().to_string(),
        format,
        ranks: a.ranks.to_string(),
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
