//! The bench stage: latency of ONNX files in tract, interleaved (p50/p90/p99, throughput,
//! params, MACs), and optionally tract's time per node.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::bench::BenchReport;
use crate::runtime::timing::TimingOptions;
use crate::runtime::TractModel;

/// What [`bench()`] times; the defaults are `elrt bench`'s.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// ONNX files to compare; the first is the baseline for speedup and MAC ratio.
    pub files: Vec<PathBuf>,
    /// Batch sizes.
    pub batch: Vec<usize>,
    /// Threads tract uses (a private pool of exactly this size).
    pub threads: usize,
    /// Untimed runs of each file first.
    pub warmup: usize,
    /// Timed runs of each file (at least).
    pub runs: usize,
    /// Keep timing until each file has at least this many seconds measured.
    pub min_seconds: f64,
    /// No progress messages on stderr.
    pub quiet: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            files: Vec::new(),
            batch: vec![1],
            threads: 1,
            warmup: 20,
            runs: 200,
            min_seconds: 1.0,
            quiet: false,
        }
    }
}

/// Times the files as `elrt bench` does.
pub fn bench(a: &BenchOptions) -> Result<BenchReport> {
    if a.threads == 0 || a.batch.contains(&0) {
        bail!("--threads and --batch must be at least 1");
    }
    if !(a.min_seconds.is_finite() && a.min_seconds >= 0.0 && a.min_seconds <= 86_400.0) {
        bail!(
            "--min-seconds must be between 0 and 86400 (a day), got {}",
            a.min_seconds
        );
    }
    let timing = TimingOptions {
        warmup: a.warmup,
        runs: a.runs.max(1),
        chunk: 5,
        min_time: Duration::from_secs_f64(a.min_seconds),
    };
    crate::bench::bench(&a.files, &a.batch, a.threads, &timing, |m| {
        if !a.quiet {
            eprintln!("{m}");
        }
    })
}

/// One node's time in tract's optimised model.
#[derive(Clone, Debug, Serialize)]
pub struct NodeTime {
    pub ms: f64,
    pub node: String,
    pub op: String,
}

/// Tract's time per node for one file, at one batch size.
#[derive(Clone, Debug, Serialize)]
pub struct FileProfile {
    pub file: String,
    #[serde(skip)]
    pub batch: usize,
    pub nodes: Vec<NodeTime>,
}

/// Tract's time per node of each file (optimised model, the first batch size, 200 runs), as
/// `elrt bench --profile` prints it.
pub fn profile(a: &BenchOptions) -> Result<Vec<FileProfile>> {
    let mut all = Vec::new();
    for f in &a.files {
        let mut shape = vec![a.batch[0]];
        shape.extend(crate::bench::image_shape(f)?);
        let mut m = TractModel::from_path(f, &shape, a.threads)?;
        let p = crate::runtime::profile(&mut m, 200)?;
        all.push(FileProfile {
            file: f.display().to_string(),
            batch: shape[0],
            nodes: p
                .into_iter()
                .map(|(node, op, ms)| NodeTime { ms, node, op })
                .collect(),
        });
    }
    Ok(all)
}

impl FileProfile {
    pub fn to_text(&self) -> String {
        let sum: f64 = self.nodes.iter().map(|r| r.ms).sum();
        let mut out = format!(
            "\n{} (batch {}): time per node, {:.3} ms in all\n",
            self.file, self.batch, sum
        );
        for n in &self.nodes {
            out += &format!(
                "  {:>8.1} us  {:>5.1}%  {:<24} {}\n",
                n.ms * 1e3,
                100.0 * n.ms / sum,
                n.op,
                n.node
            );
        }
        out
    }
}
