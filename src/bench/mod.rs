//! `elrt bench`: the latency report of ONNX files in tract, built on [`crate::runtime`]
//! (loading, running, timing).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::inspect::group_digits;
use crate::runtime::timing::{time_interleaved, TimingOptions};
use crate::runtime::TractModel;

/// The runtime reports name; Cargo.toml asks for tract-onnx 0.23 (tract exports no version).
pub const TRACT: &str = "tract 0.23 (tract-onnx)";

/// One file at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub file: String,
    pub batch: usize,
    pub threads: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    /// Images per second at the median latency.
    pub throughput: f64,
    pub runs: usize,
    /// Parameters and MACs per image (elrt's count, the one `elrt inspect` prints).
    pub params: u64,
    pub macs: u64,
    /// Against the first file at the same batch size: its p50 over this one's.
    pub speedup: f64,
    /// Against the first file: its MACs over this one's.
    pub mac_ratio: f64,
    pub tract_nodes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub runtime: String,
    pub threads: usize,
    pub rows: Vec<BenchRow>,
}

/// The input shape `[C, H, W]` (batch excluded) a file declares.
pub fn image_shape(path: &Path) -> Result<Vec<usize>> {
    Ok(file_shape(path)?.1)
}

/// The batch size a file fixes (None when symbolic) and its `[C, H, W]`.
pub fn file_shape(path: &Path) -> Result<(Option<usize>, Vec<usize>)> {
    let g = crate::onnx::read_file(path)?;
    // tract reads BatchNormalization in inference form only; say what to do instead of
    // passing on tract's "wrong number of outputs".
    if let Some(n) = g.nodes.iter().find(|n| match &n.op {
        crate::ir::Op::BatchNorm(b) => b.training_mode || n.outputs.len() > 1,
        _ => false,
    }) {
        bail!(
            "{}: node '{}' is a BatchNormalization in training form, which tract does not run; \
             make a deployment file first with `elrt export {} -o FILE`",
            path.display(),
            n.name,
            path.display()
        );
    }
    let shapes =
        crate::ir::shape::default_input_shapes(&g).with_context(|| path.display().to_string())?;
    if shapes.len() != 1 {
        bail!(
            "{}: {} graph inputs; elrt benchmarks models with one input",
            path.display(),
            shapes.len()
        );
    }
    let fixed = match g.inputs[0].shape.as_ref().and_then(|d| d.first()) {
        Some(crate::ir::Dim::Fixed(n)) => Some(*n),
        _ => None,
    };
    Ok((fixed, shapes[0][1..].to_vec()))
}

pub fn bench(
    files: &[PathBuf],
    batches: &[usize],
    threads: usize,
    timing: &TimingOptions,
    mut progress: impl FnMut(&str),
) -> Result<BenchReport> {
    if files.is_empty() {
        bail!("no model to benchmark");
    }
    let mut costs = Vec::new();
    let mut shapes = Vec::new();
    let mut fixed_batch = Vec::new();
    for f in files {
        let (fixed, shape) = file_shape(f)?;
        // Costs per image: counted at the file's own batch, then divided.
        let b0 = fixed.unwrap_or(1);
        let mut s1 = vec![b0];
        s1.extend(&shape);
        let r = crate::inspect::inspect(f, &[s1])?;
        costs.push((r.totals.params, r.totals.macs / b0 as u64));
        shapes.push(shape);
        fixed_batch.push(fixed);
    }
    let mut rows = Vec::new();
    for &b in batches {
        let mut models = Vec::new();
        for ((f, shape), fixed) in files.iter().zip(&shapes).zip(&fixed_batch) {
            let mut s = vec![b];
            s.extend(shape);
            progress(&format!("loading {} (batch {b})", f.display()));
            // A file that fixes another batch is freed by elrt first (from_path), or refused
            // with the node that keeps it from running at this batch.
            let m = TractModel::from_path(f, &s, threads).map_err(|e| match fixed {
                Some(b0) if *b0 != b => e.context(format!(
                    "{}: the file fixes the batch at {b0} and does not run at batch {b}; \
                     bench it with --batch {b0}",
                    f.display()
                )),
                _ => e,
            })?;
            models.push(m);
        }
        progress(&format!(
            "timing {} files at batch {b}, {threads} thread(s)",
            files.len()
        ));
        let times = time_interleaved(&mut models, timing)?;
        let base_p50 = times[0].p50();
        for (k, (f, t)) in files.iter().zip(&times).enumerate() {
            let (params, macs) = costs[k];
            rows.push(BenchRow {
                file: f.display().to_string(),
                batch: b,
                threads: models[k].threads,
                p50_ms: t.p50(),
                p90_ms: t.percentile(90.0),
                p99_ms: t.percentile(99.0),
                mean_ms: t.mean(),
                throughput: b as f64 * 1e3 / t.p50(),
                runs: t.0.len(),
                params,
                macs,
                speedup: base_p50 / t.p50(),
                mac_ratio: costs[0].1 as f64 / macs.max(1) as f64,
                tract_nodes: models[k].node_count(),
            });
        }
    }
    Ok(BenchReport {
        runtime: TRACT.to_string(),
        threads,
        rows,
    })
}

impl BenchReport {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}, {} thread(s); latency per batch, percentiles over the runs\n",
            self.runtime, self.threads
        );
        let w = self
            .rows
            .iter()
            .map(|r| r.file.len())
            .max()
            .unwrap_or(4)
            .max(4);
        s += &format!(
            "{:<w$}  {:>5}  {:>9}  {:>9}  {:>9}  {:>9}  {:>10}  {:>13}  {:>7}  {:>9}\n",
            "file",
            "batch",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "img/s",
            "params",
            "MACs",
            "speedup",
            "MAC ratio"
        );
        for r in &self.rows {
            s += &format!(
                "{:<w$}  {:>5}  {:>9.3}  {:>9.3}  {:>9.3}  {:>9.1}  {:>10}  {:>13}  {:>6.2}x  {:>8.2}x\n",
                r.file,
                r.batch,
                r.p50_ms,
                r.p90_ms,
                r.p99_ms,
                r.throughput,
                group_digits(r.params),
                group_digits(r.macs),
                r.speedup,
                r.mac_ratio
            );
        }
        s
    }
}
