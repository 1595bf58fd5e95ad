//! Training-step throughput (img/s) and peak memory on random data, optionally per op: the
//! figure the benchmarks compare with PyTorch.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::engine::model::Model;
use crate::ir::bn_insert::{self, BnPolicy};

/// What [`speed`] times; the defaults are `elrt speed`'s.
#[derive(Clone, Debug)]
pub struct SpeedOptions {
    /// The ONNX model to time.
    pub model: PathBuf,
    /// Images per training step.
    pub batch: usize,
    /// Compute threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Timed training steps (after one warm-up step).
    pub steps: usize,
    /// Per-op forward/backward times.
    pub profile: bool,
    /// Per-node forward/backward times (implies `profile`).
    pub profile_nodes: bool,
}

impl Default for SpeedOptions {
    fn default() -> Self {
        SpeedOptions {
            model: PathBuf::new(),
            batch: 128,
            threads: None,
            steps: 10,
            profile: false,
            profile_nodes: false,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SpeedReport {
    pub model: String,
    pub batch: usize,
    pub threads: usize,
    pub steps: usize,
    pub ms_per_step: f64,
    pub img_per_s: f64,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// OpenBLAS's kernel set ([`crate::engine::blas_core`]) and whether OPENBLAS_CORETYPE set it.
    pub blas_core: String,
    pub blas_core_pinned: bool,
    /// The kernel set OpenBLAS picked by itself when elrt replaced it with one as wide as the
    /// CPU ([`crate::engine::blas_kernels`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blas_core_replaced: Option<String>,
    /// The widest vector instructions the engine's kernels run here ([`crate::engine::isa`]):
    /// avx512, avx2 or sse2.
    pub isa: String,
    /// `ELRT_MAX_ISA`'s cap, when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isa_cap: Option<String>,
    /// (op, forward | backward, ms per step), slowest first; an op is the op type, or for a
    /// conv the kernel that runs it.
    pub profile: Vec<(String, String, f64)>,
    /// With `profile_nodes`: (node, op, forward | backward, ms per step), slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<(String, String, String, f64)>,
    /// At two or more threads: the share of the other compute threads' time (all but the one
    /// that runs the step's serial code) spent idle, waiting for work, over the timed steps.
    /// What two threads lose against twice one thread's speed is mostly this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_idle_pct: Option<f64>,
    /// With `profile` at two or more threads: (op, forward | backward, the other workers' idle
    /// ms per step inside it), most idle first (the idle time between ops is in
    /// `worker_idle_pct` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile_idle: Vec<(String, String, f64)>,
}

/// Peak resident set size of this process in MiB, from /proc (Linux).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// Times training steps as `elrt speed` does (no data loading), on a pool of `threads`
/// compute threads.
pub fn speed(a: &SpeedOptions) -> Result<SpeedReport> {
    let threads = crate::engine::thread_count(a.threads)?;
    crate::engine::with_threads(threads, || speed_on_pool(a))?
}

fn speed_on_pool(a: &SpeedOptions) -> Result<SpeedReport> {
    use ndarray::{ArrayD, IxDyn};
    let mut graph = crate::onnx::read_file(&a.model)?;
    bn_insert::apply(
        &mut graph,
        BnPolicy::Auto,
        crate::lowrank::naming::is_inner_factor,
    )
    .with_context(|| a.model.display().to_string())?;
    let mut m = Model::from_graph(graph, a.batch).with_context(|| a.model.display().to_string())?;
    let mut r = crate::rng::Rng::new(1);
    let x = ArrayD::from_shape_fn(IxDyn(&m.input_shape), |_| r.normal());
    let labels: Vec<usize> = (0..a.batch).map(|i| i % m.classes).collect();
    // The training step without the optimiser's update, as scripts/bench_train.py times
    // PyTorch's.
    let mut train_step = crate::train::step::TrainStep::new(&m.session.program, 0.0, 0.0);
    let mut step =
        |m: &mut Model| -> Result<()> { train_step.gradients(m, x.clone(), &labels).map(|_| ()) };
    let (total, idle) = crate::engine::on_pool(|| -> Result<(f64, f64)> {
        step(&mut m)?;
        if a.profile || a.profile_nodes {
            m.session.profile = Some(vec![[0.0; 4]; m.session.program.steps.len()]);
        }
        let (t0, idle0) = (std::time::Instant::now(), crate::engine::awake::idle_time());
        for _ in 0..a.steps {
            step(&mut m)?;
        }
        Ok((
            t0.elapsed().as_secs_f64(),
            crate::engine::awake::idle_time()
                .saturating_sub(idle0)
                .as_secs_f64(),
        ))
    })?;
    let alive = crate::engine::compute_threads_alive();
    let others = alive.saturating_sub(1);
    let times = m.session.profile.take().unwrap_or_default();
    let per_step = |s: f64| 1e3 * s / a.steps as f64;
    let dirs = ["forward", "backward"];
    let mut by_op = std::collections::BTreeMap::<(&str, usize), f64>::new();
    let mut idle_by_op = std::collections::BTreeMap::<(&str, usize), f64>::new();
    let mut nodes = Vec::new();
    for (step, t) in m.session.program.steps.iter().zip(&times) {
        for (d, &secs) in t[..2].iter().enumerate() {
            if secs == 0.0 {
                continue;
            }
            *by_op.entry((step.profile_key, d)).or_default() += secs;
            *idle_by_op.entry((step.profile_key, d)).or_default() += t[2 + d];
            if a.profile_nodes {
                let node = step.name.clone();
                nodes.push((
                    node,
                    step.profile_key.to_string(),
                    dirs[d].to_string(),
                    per_step(secs),
                ));
            }
        }
    }
    let mut profile: Vec<(String, String, f64)> = by_op
        .into_iter()
        .map(|((op, d), s)| (op.to_string(), dirs[d].to_string(), per_step(s)))
        .collect();
    profile.sort_by(|x, y| y.2.total_cmp(&x.2));
    nodes.sort_by(|x, y| y.3.total_cmp(&x.3));
    let mut profile_idle: Vec<(String, String, f64)> = if others > 0 {
        idle_by_op
            .into_iter()
            .map(|((op, d), s)| (op.to_string(), dirs[d].to_string(), per_step(s)))
            .collect()
    } else {
        Vec::new()
    };
    profile_idle.sort_by(|x, y| y.2.total_cmp(&x.2));
    let (blas_core, blas_core_pinned) = crate::engine::blas_core();
    Ok(SpeedReport {
        model: a.model.display().to_string(),
        batch: a.batch,
        threads: alive,
        steps: a.steps,
        ms_per_step: 1e3 * total / a.steps as f64,
        img_per_s: (a.batch * a.steps) as f64 / total,
        peak_rss_mib: peak_rss_mib(),
        blas_core,
        blas_core_pinned,
        blas_core_replaced: crate::engine::blas_kernels::replaced_pick(),
        isa: crate::engine::isa::in_use().name().to_string(),
        isa_cap: crate::engine::isa::cap().map(|c| c.name().to_string()),
        profile,
        nodes,
        worker_idle_pct: (others > 0).then(|| 100.0 * idle / (others as f64 * total)),
        profile_idle,
    })
}

impl SpeedReport {
    pub fn to_text(&self) -> String {
        let rep = self;
        let mut out = format!(
            "{}: batch {}, {} threads: {:.1} ms/step, {:.0} img/s, peak RSS {:.0} MiB, OpenBLAS {}{}, {}\n",
            rep.model,
            rep.batch,
            rep.threads,
            rep.ms_per_step,
            rep.img_per_s,
            rep.peak_rss_mib,
            rep.blas_core,
            crate::engine::blas_core_origin(
                rep.blas_core_pinned,
                rep.blas_core_replaced.as_deref()
            ),
            crate::engine::vectors_line(&rep.isa, rep.isa_cap.as_deref())
        );
        if let Some(p) = rep.worker_idle_pct {
            out += &format!(
                "  the other {} compute thread(s) idle {p:.1}% of the time\n",
                rep.threads.saturating_sub(1)
            );
        }
        for (op, dir, ms) in &rep.profile {
            out += &format!(
                "  {op:<27} {dir:<8} {ms:>8.1} ms/step {:>5.1}%",
                100.0 * ms / rep.ms_per_step
            );
            let idle = rep
                .profile_idle
                .iter()
                .find(|(o, d, _)| o == op && d == dir);
            if let Some((_, _, idle)) = idle {
                out += &format!("  (others idle {idle:.1} ms)");
            }
            out += "\n";
        }
        if !rep.nodes.is_empty() {
            out += "per node:\n";
        }
        for (node, op, dir, ms) in &rep.nodes {
            out += &format!(
                "  {node:<40} {op:<27} {dir:<8} {ms:>8.2} ms/step {:>5.1}%\n",
                100.0 * ms / rep.ms_per_step
            );
        }
        out
    }
}
