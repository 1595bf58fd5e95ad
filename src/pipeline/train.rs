//! The train stage: a model (any supported architecture) trained on CIFAR, an image folder or
//! the synthetic set, written as ONNX with its checkpoint, metrics and curve beside it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::data::{DataSpec, NormSpec};
use crate::engine::model::Model;
use crate::ir::bn_insert::{self, BnPolicy};
use crate::train::optim::OptimKind;
use crate::train::parallel::{CommStats, DataParallel};
use crate::train::run::{ctrlc_flag, EpochMetrics, Outcome, RunFiles, TrainConfig, Trainer};
use crate::train::schedule::Schedule;

/// The optimiser family (`--optimizer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Optim {
    /// SGD with momentum (Nesterov's unless [`TrainOptions::nesterov`] is off).
    Sgd,
    /// AdamW (beta1 0.9, beta2 0.999, eps 1e-8).
    AdamW,
}

impl std::str::FromStr for Optim {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Optim> {
        Ok(match s {
            "sgd" => Optim::Sgd,
            "adamw" => Optim::AdamW,
            o => bail!("--optimizer '{o}': expected sgd or adamw"),
        })
    }
}

impl std::fmt::Display for Optim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Optim::Sgd => "sgd",
            Optim::AdamW => "adamw",
        })
    }
}

/// How the weights start (`elrt train --init`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainInit {
    /// Kaiming init of every weight (low-rank factors too, each as its own conv).
    Scratch,
    /// The same, but low-rank factors keep the file's values (the converter's init).
    Factors,
    /// Keep all the file's weights.
    File,
}

impl std::str::FromStr for TrainInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<TrainInit> {
        Ok(match s {
            "scratch" => TrainInit::Scratch,
            "factors" => TrainInit::Factors,
            "file" => TrainInit::File,
            o => bail!("--init '{o}': expected scratch, factors or file"),
        })
    }
}

impl std::fmt::Display for TrainInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TrainInit::Scratch => "scratch",
            TrainInit::Factors => "factors",
            TrainInit::File => "file",
        })
    }
}

/// What [`train`] does; the defaults are `elrt train`'s.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The ONNX architecture to train.
    pub model: PathBuf,
    pub data: DataSpec,
    /// Passes over the training split (the learning-rate schedule spans them all).
    pub epochs: u64,
    /// Images per optimiser step.
    pub batch: usize,
    /// Base learning rate (`None`: 0.1 for SGD at batch 128 and above, linearly less below,
    /// [`crate::train::schedule::default_sgd_lr`]; 1e-3 for AdamW).
    pub lr: Option<f32>,
    pub optimizer: Optim,
    /// SGD momentum.
    pub momentum: f32,
    /// Nesterov's momentum rather than plain momentum (SGD).
    pub nesterov: bool,
    /// Weight decay on conv and linear weights (`None`: 5e-4 for SGD, 0.05 for AdamW).
    pub wd: Option<f32>,
    pub schedule: Schedule,
    /// Linear warm-up, in epochs.
    pub warmup: f32,
    /// Label smoothing of the cross-entropy loss (0: none).
    pub label_smoothing: f32,
    /// Compute threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Data loader threads (they also decode a streamed folder).
    pub workers: usize,
    /// Budget for decoded images, MiB: an image folder larger than this at the model's input
    /// size streams ([`crate::data::source`]), and its cache holds this much.
    pub cache_mb: usize,
    /// Seed of the initialisation, the data order, the augmentation and the dropout masks.
    pub seed: u64,
    /// Stop after this many optimiser steps (smoke runs).
    pub max_steps: Option<u64>,
    pub init: TrainInit,
    pub bn: BnPolicy,
    /// Every BatchNormalization's running-statistics momentum while training, PyTorch's
    /// convention (`None`: each keeps the model's own).
    pub bn_momentum: Option<f32>,
    /// Training images over which every evaluation first recomputes the batch norms' running
    /// statistics from the current weights (0: the training's running averages as they are;
    /// [`crate::train::precise_bn`]).
    pub bn_recalibrate: usize,
    /// Random crop and flip.
    pub augment: bool,
    /// Input normalisation (`None`: what the model file records, else the default for its
    /// channels).
    pub normalize: Option<NormSpec>,
    /// Double soft orthogonality strength rho on the factor matrices (0: off).
    pub orth: f32,
    /// No weight decay on the factor matrices under DSO.
    pub orth_no_decay: bool,
    /// Keep the model's classifier (an error when its width differs from the data's classes);
    /// otherwise it is re-sized to the data.
    pub keep_head: bool,
    /// Continue from the checkpoint beside the output.
    pub resume: bool,
    /// With `resume`: accept a changed `epochs` or `max_steps`.
    pub allow_recipe_change: bool,
    /// Output ONNX file (`None`: the model file's stem + ".trained.onnx", in the current
    /// folder).
    pub output: Option<PathBuf>,
    /// No progress, data, resume or per-epoch lines on stderr.
    pub quiet: bool,
    /// Under mpirun: BatchNormalization with the global batch's statistics (summed over the
    /// ranks) instead of each rank's own. No effect in one process.
    pub sync_bn: bool,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            model: PathBuf::new(),
            data: DataSpec::default(),
            epochs: 30,
            batch: 128,
            lr: None,
            optimizer: Optim::Sgd,
            momentum: 0.9,
            nesterov: true,
            wd: None,
            schedule: Schedule::Cosine { min_ratio: 0.0 },
            warmup: 0.0,
            label_smoothing: 0.0,
            threads: None,
            workers: 2,
            cache_mb: crate::data::DEFAULT_CACHE_MB,
            seed: 0,
            max_steps: None,
            init: TrainInit::Scratch,
            bn: BnPolicy::Auto,
            bn_momentum: None,
            bn_recalibrate: crate::train::precise_bn::DEFAULT_IMAGES,
            augment: true,
            normalize: None,
            orth: 0.0,
            orth_no_decay: false,
            keep_head: false,
            resume: false,
            allow_recipe_change: false,
            output: None,
            quiet: false,
            sync_bn: false,
        }
    }
}

impl TrainOptions {
    /// How the data is loaded (`--cache-mb`).
    pub fn data_options(&self) -> crate::data::DataOptions {
        crate::data::DataOptions {
            cache_mb: self.cache_mb,
        }
    }
}

/// How the training data was loaded, for `--json` and the tests that bound memory.
#[derive(Clone, Debug, Serialize)]
pub struct DataLoading {
    /// The folder streamed (decoded on the fly) rather than decoded into memory.
    pub streamed: bool,
    /// The streamed splits' caches (train, then test) at the end of the run.
    pub train_cache: Option<crate::data::cache::CacheStats>,
    pub test_cache: Option<crate::data::cache::CacheStats>,
    /// Peak resident memory of the process (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

impl DataLoading {
    fn of(s: &crate::data::Sources) -> DataLoading {
        DataLoading {
            streamed: s.streamed(),
            train_cache: s.train.cache_stats(),
            test_cache: s.test.cache_stats(),
            peak_rss_mib: super::speed::peak_rss_mib(),
        }
    }
}

/// Re-sizes the classifier to the data's class count (or, with `keep_head`, refuses a
/// mismatch).
pub(crate) fn fit_head(
    graph: &mut crate::ir::Graph,
    shapes: &[Vec<usize>],
    splits: &crate::data::Sources,
    keep_head: bool,
    seed: u64,
) -> Result<Option<crate::ir::head::HeadChange>> {
    let classes = splits.train.classes();
    if keep_head {
        let facts = crate::ir::shape::infer(graph, shapes)?;
        let outputs = graph
            .outputs
            .first()
            .and_then(|o| facts.get(&o.name))
            .and_then(|f| f.shape.get(1).copied())
            .unwrap_or(0);
        if outputs != classes {
            bail!(
                "the data has {classes} classes but the model has {outputs} outputs; drop \
                 --keep-head to re-size the classifier to the data"
            );
        }
        return Ok(None);
    }
    crate::ir::head::resize(graph, shapes, classes, seed)
}

/// A training split smaller than one batch trains one short step per epoch, and BN's running
/// statistics never settle (a test loss in the thousands): refuse it. A class without
/// training images cannot be learned: say which.
pub(crate) fn check_split_sizes(
    splits: &crate::data::Sources,
    batch: usize,
    data: &str,
) -> Result<()> {
    let n = splits.train.len();
    if n < batch {
        bail!(
            "--data {data}: the training split has {n} images, fewer than one batch of {batch}; \
             pass --batch {} or smaller",
            n.max(1)
        );
    }
    let empty: Vec<&str> = splits
        .train
        .class_counts()
        .iter()
        .zip(splits.train.class_names())
        .filter(|(c, _)| **c == 0)
        .map(|(_, name)| name.as_str())
        .collect();
    if !empty.is_empty() {
        eprintln!(
            "warning: --data {data}: {} class(es) have no training image and cannot be learned: {}",
            empty.len(),
            empty.join(", ")
        );
    }
    Ok(())
}

/// What a deployment needs to know of the data, recorded in the trained file's metadata: the
/// class names in label order and how an image is brought to the input size.
fn record_data_facts(
    graph: &mut crate::ir::Graph,
    spec: &DataSpec,
    train: &crate::data::Source,
    chw: [usize; 3],
) {
    let names = serde_json::to_string(train.class_names()).unwrap_or_default();
    let meta = &mut graph.meta.metadata_props;
    for (k, v) in [
        (crate::data::CLASSES_KEY, names),
        (
            crate::data::RESIZE_KEY,
            spec.resize_rule_for(chw, train.is_streamed()),
        ),
    ] {
        meta.retain(|(kk, _)| kk != k);
        meta.push((k.to_string(), v));
    }
}

/// Outputs are complete or absent: a run that fails before its first checkpoint removes the
/// metrics and curve it wrote (they belong to nothing); one that fails later keeps them beside
/// the checkpoint, and the error says so and how to go on.
fn with_outputs_accounted(e: anyhow::Error, files: &RunFiles) -> anyhow::Error {
    if !files.checkpoint.exists() {
        for f in [&files.metrics, &files.curve] {
            let _ = std::fs::remove_file(f);
        }
        return e;
    }
    let kept: Vec<String> = [&files.checkpoint, &files.metrics, &files.curve]
        .into_iter()
        .filter(|f| f.exists())
        .map(|f| f.display().to_string())
        .collect();
    anyhow::anyhow!(
        "{e:#}; kept {} (the run so far, for --resume)",
        kept.join(", ")
    )
}

fn default_output(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map_or("model".into(), |s| s.to_string_lossy().into_owned());
    PathBuf::from(format!("{stem}.trained.onnx"))
}

/// The summary `elrt train --json` prints.
#[derive(Serialize)]
pub struct TrainSummary<'a> {
    model: String,
    output: String,
    data: String,
    outcome: String,
    threads: usize,
    config: &'a TrainConfig,
    last: Option<&'a EpochMetrics>,
    metrics_file: String,
    checkpoint: String,
    data_loading: &'a DataLoading,
    #[serde(skip_serializing_if = "Option::is_none")]
    mpi: Option<CommStats>,
}

/// What a finished (or stopped) training run gives back to its caller.
pub struct TrainReport {
    /// The model file trained, and the data (in `--data` form).
    pub model: PathBuf,
    pub data: String,
    pub outcome: Outcome,
    pub history: Vec<EpochMetrics>,
    pub output: PathBuf,
    pub files: RunFiles,
    /// Compute threads alive at the end of training, counted from the OS's thread list
    /// ([`crate::engine::compute_threads_alive`]): the count used, not the count asked for.
    pub threads: usize,
    pub config: TrainConfig,
    /// In memory or streamed, the caches, peak memory.
    pub loading: DataLoading,
    /// Under mpirun: the all-reduce traffic and time the run measured.
    pub comm: Option<CommStats>,
}

impl TrainReport {
    /// The summary `--json` prints.
    pub fn summary(&self) -> TrainSummary<'_> {
        TrainSummary {
            model: self.model.display().to_string(),
            output: self.output.display().to_string(),
            data: self.data.clone(),
            outcome: format!("{:?}", self.outcome),
            threads: self.threads,
            config: &self.config,
            last: self.history.last(),
            metrics_file: self.files.metrics.display().to_string(),
            checkpoint: self.files.checkpoint.display().to_string(),
            data_loading: &self.loading,
            mpi: self.comm.clone(),
        }
    }

    /// The final line (and, when stopped by Ctrl-C, how to go on).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if let Some(m) = self.history.last() {
            out += &format!(
                "{}: test top-1 {:.2}%  top-5 {:.2}%  ({} epochs, {} steps, {:.0}s)\n",
                self.output.display(),
                100.0 * m.test_acc,
                100.0 * m.test_top5,
                m.epoch,
                m.step,
                m.wall_s
            );
        }
        if let Some(c) = &self.comm {
            out += &comm_line(c);
        }
        if matches!(self.outcome, Outcome::Interrupted) {
            out += "stopped early; continue with the same command and --resume\n";
        }
        out
    }
}

/// What data-parallel training sent per step, and how long the calls took.
pub fn comm_line(c: &CommStats) -> String {
    let steps = c.steps.max(1) as f64;
    format!(
        "MPI: {} ranks, all-reduce {:.2} MB per step in {} call(s), {:.2} ms per step \
         (+{:.2} ms waiting for the slowest rank; {} steps); weights identical on every rank\n",
        c.ranks,
        c.bytes_per_step as f64 / 1e6,
        c.calls_per_step,
        1e3 * c.seconds / steps,
        1e3 * c.wait_seconds / steps,
        c.steps
    )
}

/// Trains as `elrt train` does and saves the output; prints nothing but progress. Runs on a
/// pool of exactly `threads` compute threads.
pub fn train(a: &TrainOptions) -> Result<TrainReport> {
    let threads = crate::engine::thread_count(a.threads.or_else(crate::dist::default_threads))?;
    crate::engine::with_threads(threads, || train_on_pool(a, threads))?
}

fn train_on_pool(a: &TrainOptions, threads: usize) -> Result<TrainReport> {
    // Under mpirun: every rank trains its shard; rank 0 alone prints and writes.
    let parallel = crate::dist::world().map(|comm| DataParallel {
        comm,
        sync_bn: a.sync_bn,
    });
    let writer = parallel.as_ref().is_none_or(|p| p.is_writer());
    let quiet = a.quiet || !writer;
    if a.epochs == 0 {
        bail!("--epochs must be at least 1 (0 would write the model untrained)");
    }
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    if !(a.momentum.is_finite() && (0.0..1.0).contains(&a.momentum)) {
        bail!("--momentum must be in [0, 1), got {}", a.momentum);
    }
    if !(a.label_smoothing.is_finite() && (0.0..1.0).contains(&a.label_smoothing)) {
        bail!(
            "--label-smoothing must be in [0, 1), got {}",
            a.label_smoothing
        );
    }
    if !(a.warmup.is_finite() && a.warmup >= 0.0) {
        bail!(
            "--warmup must be zero or a positive number of epochs, got {}",
            a.warmup
        );
    }
    if let Some(wd) = a.wd.filter(|w| !(w.is_finite() && *w >= 0.0)) {
        bail!("--wd must be zero or a positive number, got {wd}");
    }
    let spec = &a.data;
    let data = spec.to_string();
    let output = a.output.clone().unwrap_or_else(|| default_output(&a.model));
    if output.extension().is_none_or(|e| e != "onnx") {
        bail!("-o {}: the output must be an .onnx file", output.display());
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create the output folder", dir.display()))?;
    }
    let mut graph = crate::onnx::read_file(&a.model)?;
    let what = || a.model.display().to_string();
    // The data first: the classifier follows its class count.
    crate::engine::model::one_image_input(&graph).with_context(what)?;
    let shapes = crate::ir::shape::default_input_shapes(&graph).with_context(what)?;
    let chw = match shapes.first().map(Vec::as_slice) {
        Some([_, c, h, w]) => [*c, *h, *w],
        _ => bail!(
            "{}: the model's input is not an image batch [N, C, H, W]",
            a.model.display()
        ),
    };
    let splits = spec.open(chw, &a.data_options())?;
    check_split_sizes(&splits, a.batch, &data)?;
    if let Some(change) = fit_head(&mut graph, &shapes, &splits, a.keep_head, a.seed)
        .with_context(what)?
        .filter(|_| writer)
    {
        eprintln!(
            "the data has {} classes: the classifier '{}' now has {} outputs instead of {} (freshly initialised)",
            change.to, change.node, change.to, change.from
        );
    }
    record_data_facts(&mut graph, spec, &splits.train, chw);
    let inserted = bn_insert::apply(&mut graph, a.bn, crate::lowrank::naming::is_inner_factor)
        .with_context(what)?;
    if inserted.count > 0 && !quiet {
        eprintln!(
            "inserted {} BatchNormalization nodes {}",
            inserted.count, inserted.why
        );
    }
    if let Some(m) = a.bn_momentum {
        bn_insert::set_momentum(&mut graph, m)?;
    }
    // The optimiser steps of the whole run, for the running statistics' note.
    let steps = (a.epochs * (splits.train.len() / a.batch.max(1)).max(1) as u64)
        .min(a.max_steps.unwrap_or(u64::MAX));
    // A note (shown under --quiet too, as every `note:`), unless the momentum was chosen or
    // evaluation recomputes the statistics anyway (`--bn-recalibrate`).
    let noted = writer && a.bn_momentum.is_none() && a.bn_recalibrate == 0;
    if let Some(note) = bn_insert::momentum_note(&graph, steps).filter(|_| noted) {
        eprintln!("{note}");
    }
    match a.init {
        TrainInit::Scratch => crate::train::init::init_from_scratch(&mut graph, a.seed)?,
        TrainInit::Factors => crate::train::init::init_except_factors(&mut graph, a.seed)?,
        TrainInit::File => {}
    }
    let mut model =
        Model::from_graph(graph, a.batch).with_context(|| a.model.display().to_string())?;
    let ([c, h, w], normalize) =
        super::model_input_and_normalization(&model, a.normalize.as_ref(), &a.model, quiet)?;
    // The trained file says how its inputs are normalised, for every later use of it.
    normalize.record(&mut model.graph.meta.metadata_props, c)?;
    debug_assert_eq!([c, h, w], chw);
    let (core, pinned) = crate::engine::blas_core();
    // The data line is progress output: quiet drops it.
    let say = |line: String| {
        if !quiet {
            eprintln!("{line}")
        }
    };
    if let Some(plan) = &splits.plan {
        say(plan.clone());
    }
    say(format!(
        "{}: {} train / {} test images, {} classes, normalisation {}; {} threads, batch {}; OpenBLAS {}{}, {}",
        data,
        splits.train.len(),
        splits.test.len(),
        splits.train.classes(),
        normalize,
        threads,
        match &parallel {
            Some(p) => format!(
                "{} (over {} MPI ranks: {} images and {threads} threads each; BN statistics {})",
                a.batch,
                p.size(),
                a.batch / p.size().max(1),
                if p.sync_bn { "global (--sync-bn)" } else { "per rank" }
            ),
            None => a.batch.to_string(),
        },
        core,
        crate::engine::blas_core_origin(
            pinned,
            crate::engine::blas_kernels::replaced_pick().as_deref()
        ),
        crate::engine::vectors_line(
            crate::engine::isa::in_use().name(),
            crate::engine::isa::cap().map(|c| c.name())
        )
    ));
    let (optimizer, lr, wd) = match a.optimizer {
        Optim::Sgd => (
            OptimKind::Sgd {
                momentum: a.momentum,
                nesterov: a.nesterov,
            },
            a.lr.unwrap_or(crate::train::schedule::default_sgd_lr(0.1, 128, a.batch)),
            a.wd.unwrap_or(5e-4),
        ),
        Optim::AdamW => (
            OptimKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            a.lr.unwrap_or(1e-3),
            a.wd.unwrap_or(0.05),
        ),
    };
    if !(lr > 0.0 && lr.is_finite()) {
        bail!("--lr must be a positive number, got {lr}");
    }
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch: a.batch,
        lr,
        optimizer,
        weight_decay: wd,
        schedule: a.schedule.clone(),
        warmup_epochs: a.warmup,
        label_smoothing: a.label_smoothing,
        seed: a.seed,
        max_steps: a.max_steps,
        workers: a.workers,
        augment: a.augment,
        bn_recalibrate: a.bn_recalibrate,
        orth: a.orth,
        orth_no_decay: a.orth_no_decay,
        normalize: Some(normalize),
        data_streamed: splits.streamed(),
        allow_recipe_change: a.allow_recipe_change,
    };
    if !(a.orth >= 0.0 && a.orth.is_finite()) {
        bail!("--orth must be a non-negative number");
    }
    let files = RunFiles::beside(&output);
    if a.resume && !files.checkpoint.exists() {
        bail!("--resume: no checkpoint at {}", files.checkpoint.display());
    }
    let mut trainer = Trainer {
        model: &mut model,
        cfg: cfg.clone(),
        files: files.clone(),
        stop: ctrlc_flag()?,
        progress: !quiet,
        model_name: a.model.file_name().map_or_else(
            || a.model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        history: Vec::new(),
        parallel,
        comm: None,
    };
    let (train, test) = (splits.train.clone(), splits.test.clone());
    let ran = crate::engine::on_pool(|| trainer.run(train, test, a.resume));
    let loading = DataLoading::of(&splits);
    let history = trainer.history.clone();
    let comm = trainer.comm.take();
    let outcome = ran
        .and_then(|o| {
            if writer {
                model.save(&output).map(|_| o)
            } else {
                Ok(o)
            }
        })
        .map_err(|e| with_outputs_accounted(e, &files))?;
    debug_assert_eq!(rayon::current_num_threads(), threads);
    Ok(TrainReport {
        model: a.model.clone(),
        data,
        outcome,
        history,
        output,
        files,
        threads: crate::engine::compute_threads_alive(),
        config: cfg,
        loading,
        comm,
    })
}
