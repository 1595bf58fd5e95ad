//! `elrt train` and `elrt eval`: the command-line side of [`crate::train::run`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::data::{DataSpec, NormSpec};
use crate::engine::model::Model;
use crate::ir::bn_insert::{self, BnPolicy};
use crate::train::optim::OptimKind;
use crate::train::run::{
    ctrlc_flag, evaluate, EvalResult, Outcome, RunFiles, TrainConfig, Trainer,
};
use crate::train::schedule::Schedule;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The ONNX architecture to train.
    pub model: PathBuf,
    /// The data: synthetic (the built-in procedural set, 5,000 train / 1,000 test images; compress's
    /// embedded default uses 4,000 / 1,000 to stay short) | synthetic:TRAIN,TEST (image counts) |
    /// cifar10:PATH | cifar100:PATH (the binary versions) | folder:PATH (one sub-folder of
    /// JPEG/PNG images per class, or train/<class>/ and test/<class>/).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Passes over the training split (the learning-rate schedule spans them all).
    #[arg(long, default_value_t = 30)]
    pub epochs: u64,
    /// Images per optimiser step (the training split must hold at least one batch).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Base learning rate (default 0.1 for SGD, 1e-3 for AdamW).
    #[arg(long)]
    pub lr: Option<f32>,
    /// sgd | adamw
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// SGD momentum (Nesterov's unless --no-nesterov).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Plain momentum instead of Nesterov's.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Weight decay on conv and linear weights (default 5e-4 for SGD, 0.05 for AdamW).
    #[arg(long)]
    pub wd: Option<f32>,
    /// constant | step | cosine | onecycle
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Linear warm-up, in epochs.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f32,
    /// Label smoothing of the cross-entropy loss (0: none), as torch.nn.CrossEntropyLoss.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Seed of the initialisation, the data order, the augmentation and the dropout masks (a
    /// run is reproducible from it, bit for bit, whatever the thread count).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after N optimiser steps (smoke runs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// scratch: Kaiming init of every weight (low-rank factors too, each as its own conv);
    /// factors: the same, but low-rank factors keep the file's values (the init `elrt convert`
    /// wrote: composed-Kaiming or orthogonal); file: keep all the file's weights.
    #[arg(long, default_value = "scratch")]
    pub init: String,
    /// auto: insert BatchNormalization after every conv when the graph has none (eval-mode
    /// exports with BN folded); insert: after every conv lacking one; keep: as it is.
    #[arg(long, default_value = "auto")]
    pub bn: String,
    /// No random crop and flip.
    #[arg(long)]
    pub no_augment: bool,
    /// Input normalisation, recorded in the output file: cifar10 | imagenet | none |
    /// M1,M2,M3/S1,S2,S3 (mean/std of 0..1 pixels, one per input channel). Default: what the
    /// model file records, else cifar10 (3 channels).
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// Double soft orthogonality strength rho on the Tucker-2/CP factor matrices (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub orth: f32,
    /// No weight decay on the factor matrices under DSO (U1, U2 of Tucker-2, the 1x1 factors of
    /// CP); the core and every other weight keep it.
    #[arg(long)]
    pub orth_no_decay: bool,
    /// Keep the model's classifier as it is. Without it, a model whose output width differs
    /// from the data's class count gets its last Gemm / MatMul / conv re-sized to the data
    /// (freshly initialised; said in one line); with it, that is an error.
    #[arg(long)]
    pub keep_head: bool,
    /// Continue from the checkpoint beside the output. The recipe must be the one it was
    /// trained with (the differences are listed otherwise).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: accept a changed --epochs or --max-steps (to train further on purpose);
    /// every other change is still refused.
    #[arg(long, requires = "resume")]
    pub allow_recipe_change: bool,
    /// Output ONNX file (default: the model file's stem + ".trained.onnx", in the current folder).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the final summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress, data, resume or per-epoch lines: stderr keeps errors and warnings only,
    /// stdout the final line.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// The ONNX model to evaluate (any file elrt wrote, or a trained model of your own); its
    /// batch size is free whatever the file declares.
    pub model: PathBuf,
    /// The data whose test split is scored: synthetic | synthetic:TRAIN,TEST | cifar10:PATH |
    /// cifar100:PATH | folder:PATH (see `elrt train --help`).
    #[arg(long)]
    pub data: String,
    /// Input normalisation: cifar10 | imagenet | none | M1,M2,M3/S1,S2,S3 (mean/std of 0..1
    /// pixels). Default: what the model file records (`elrt train` writes it), else cifar10.
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// Images per forward pass (any value; the model's declared batch does not limit it).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Re-sizes the classifier to the data's class count (or, with `keep_head`, refuses a
/// mismatch).
pub(crate) fn fit_head(
    graph: &mut crate::ir::Graph,
    shapes: &[Vec<usize>],
    splits: &crate::data::Splits,
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
    splits: &crate::data::Splits,
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
    train: &crate::data::Dataset,
    chw: [usize; 3],
) {
    let names = serde_json::to_string(train.class_names()).unwrap_or_default();
    let meta = &mut graph.meta.metadata_props;
    for (k, v) in [
        (crate::data::CLASSES_KEY, names),
        (crate::data::RESIZE_KEY, spec.resize_rule(chw)),
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

#[derive(Serialize)]
struct TrainSummary<'a> {
    model: String,
    output: String,
    data: String,
    outcome: String,
    threads: usize,
    config: &'a TrainConfig,
    last: Option<&'a crate::train::run::EpochMetrics>,
    metrics_file: String,
    checkpoint: String,
}

/// What a finished (or stopped) training run gives back to its caller.
pub struct TrainResult {
    pub outcome: Outcome,
    pub history: Vec<crate::train::run::EpochMetrics>,
    pub output: PathBuf,
    pub files: RunFiles,
    /// Compute threads alive at the end of training, counted from the OS's thread list
    /// ([`crate::engine::compute_threads_alive`]): the count used, not the count asked for.
    pub threads: usize,
    pub config: TrainConfig,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let r = run_train(&a)?;
    let (history, output, outcome) = (&r.history, &r.output, r.outcome);
    let summary = TrainSummary {
        model: a.model.display().to_string(),
        output: output.display().to_string(),
        data: a.data.clone(),
        outcome: format!("{outcome:?}"),
        threads: r.threads,
        config: &r.config,
        last: history.last(),
        metrics_file: r.files.metrics.display().to_string(),
        checkpoint: r.files.checkpoint.display().to_string(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        if let Some(m) = history.last() {
            println!(
                "{}: test top-1 {:.2}%  top-5 {:.2}%  ({} epochs, {} steps, {:.0}s)",
                output.display(),
                100.0 * m.test_acc,
                100.0 * m.test_top5,
                m.epoch,
                m.step,
                m.wall_s
            );
        }
        if matches!(outcome, Outcome::Interrupted) {
            println!("stopped early; continue with the same command and --resume");
        }
    }
    Ok(())
}

/// Trains as `elrt train` does and saves the output; prints nothing but progress. Runs on a
/// pool of exactly `--threads` compute threads.
pub fn run_train(a: &TrainArgs) -> Result<TrainResult> {
    let threads = crate::engine::thread_count(a.threads)?;
    crate::engine::with_threads(threads, || train_on_pool(a, threads))?
}

fn train_on_pool(a: &TrainArgs, threads: usize) -> Result<TrainResult> {
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
    let spec = DataSpec::parse(&a.data)?;
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
    let shapes = crate::ir::shape::default_input_shapes(&graph).with_context(what)?;
    if shapes.len() != 1 {
        bail!(
            "{}: the model has {} inputs ({}); elrt trains image classifiers with one image input",
            a.model.display(),
            shapes.len(),
            graph
                .inputs
                .iter()
                .map(|i| format!("'{}'", i.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let chw = match shapes.first().map(Vec::as_slice) {
        Some([_, c, h, w]) => [*c, *h, *w],
        _ => bail!(
            "{}: the model's input is not an image batch [N, C, H, W]",
            a.model.display()
        ),
    };
    let splits = spec.load(chw)?;
    check_split_sizes(&splits, a.batch, &a.data)?;
    if let Some(change) =
        fit_head(&mut graph, &shapes, &splits, a.keep_head, a.seed).with_context(what)?
    {
        eprintln!(
            "the data has {} classes: the classifier '{}' now has {} outputs instead of {} (freshly initialised)",
            change.to, change.node, change.to, change.from
        );
    }
    record_data_facts(&mut graph, &spec, &splits.train, chw);
    let policy: BnPolicy = a.bn.parse()?;
    let inserted = bn_insert::apply(&mut graph, policy);
    if inserted > 0 && !a.quiet {
        eprintln!(
            "inserted {inserted} BatchNormalization nodes (--bn {})",
            a.bn
        );
    }
    match a.init.as_str() {
        "scratch" => crate::train::init::init_from_scratch(&mut graph, a.seed)?,
        "factors" => crate::train::init::init_except_factors(&mut graph, a.seed)?,
        "file" => {}
        o => bail!("--init '{o}': expected scratch, factors or file"),
    }
    let mut model =
        Model::from_graph(graph, a.batch).with_context(|| a.model.display().to_string())?;
    let [c, h, w] = [
        model.input_shape[1],
        model.input_shape[2],
        model.input_shape[3],
    ];
    let (normalize, note) = NormSpec::for_model(
        a.normalize.as_ref(),
        &a.model,
        &model.graph.meta.metadata_props,
        c,
    )?;
    if let Some(n) = note.filter(|_| !a.quiet) {
        eprintln!("{n}");
    }
    // The trained file says how its inputs are normalised, for every later use of it.
    normalize.record(&mut model.graph.meta.metadata_props, c)?;
    debug_assert_eq!([c, h, w], chw);
    let (core, pinned) = crate::engine::blas_core();
    // The data line is progress output: --quiet drops it.
    let say = |line: String| {
        if !a.quiet {
            eprintln!("{line}")
        }
    };
    say(format!(
        "{}: {} train / {} test images, {} classes, normalisation {}; {} threads, batch {}; OpenBLAS {}{}",
        a.data,
        splits.train.len(),
        splits.test.len(),
        splits.train.classes(),
        normalize,
        threads,
        a.batch,
        core,
        if pinned {
            " (set by OPENBLAS_CORETYPE)"
        } else {
            ""
        }
    ));
    let (optimizer, lr, wd) = match a.optimizer.as_str() {
        "sgd" => (
            OptimKind::Sgd {
                momentum: a.momentum,
                nesterov: !a.no_nesterov,
            },
            a.lr.unwrap_or(0.1),
            a.wd.unwrap_or(5e-4),
        ),
        "adamw" => (
            OptimKind::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            a.lr.unwrap_or(1e-3),
            a.wd.unwrap_or(0.05),
        ),
        o => bail!("--optimizer '{o}': expected sgd or adamw"),
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
        schedule: Schedule::parse(&a.schedule)?,
        warmup_epochs: a.warmup,
        label_smoothing: a.label_smoothing,
        seed: a.seed,
        max_steps: a.max_steps,
        workers: a.workers,
        augment: !a.no_augment,
        orth: a.orth,
        orth_no_decay: a.orth_no_decay,
        normalize: Some(normalize),
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
        progress: !a.quiet,
        model_name: a.model.file_name().map_or_else(
            || a.model.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        history: Vec::new(),
    };
    let (train, test) = (Arc::new(splits.train), Arc::new(splits.test));
    let ran = crate::engine::on_pool(|| trainer.run(train, test, a.resume));
    let history = trainer.history.clone();
    let outcome = ran
        .and_then(|o| model.save(&output).map(|_| o))
        .map_err(|e| with_outputs_accounted(e, &files))?;
    debug_assert_eq!(rayon::current_num_threads(), threads);
    Ok(TrainResult {
        outcome,
        history,
        output,
        files,
        threads: crate::engine::compute_threads_alive(),
        config: cfg,
    })
}

#[derive(Serialize)]
struct EvalReport {
    model: String,
    data: String,
    normalize: NormSpec,
    #[serde(flatten)]
    result: EvalResult,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let threads = crate::engine::thread_count(a.threads)?;
    crate::engine::with_threads(threads, || eval_on_pool(a))?
}

fn eval_on_pool(a: EvalArgs) -> Result<()> {
    let spec = DataSpec::parse(&a.data)?;
    let mut model = Model::load(&a.model, a.batch)?;
    let [c, h, w] = [
        model.input_shape[1],
        model.input_shape[2],
        model.input_shape[3],
    ];
    let (normalize, note) = NormSpec::for_model(
        a.normalize.as_ref(),
        &a.model,
        &model.graph.meta.metadata_props,
        c,
    )?;
    if let Some(n) = note {
        eprintln!("{n}");
    }
    let norm = normalize.resolve(c)?;
    let mut test = spec.load_test([c, h, w])?;
    // A model that records its class names is scored by name: a folder with some of the
    // classes, or with them in another order, still lands on the right outputs.
    let recorded = model
        .graph
        .meta
        .metadata_props
        .iter()
        .find(|(k, _)| k == crate::data::CLASSES_KEY)
        .and_then(|(_, v)| serde_json::from_str::<Vec<String>>(v).ok());
    if let Some(names) = recorded {
        test = test.relabelled(&names)?;
    }
    let test = Arc::new(test);
    let workers = 2;
    let result =
        crate::engine::on_pool(|| evaluate(&mut model, test, a.batch, workers, Some(norm)))?;
    let report = EvalReport {
        model: a.model.display().to_string(),
        data: a.data.clone(),
        normalize,
        result,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{}: {} test images, top-1 {:.2}%, top-5 {:.2}%, loss {:.4} (normalisation {})",
            report.model,
            report.result.images,
            100.0 * report.result.top1,
            100.0 * report.result.top5,
            report.result.loss,
            report.normalize
        );
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct SpeedArgs {
    /// The ONNX model to time.
    pub model: PathBuf,
    /// Images per training step.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Compute threads (default: all cores); the report gives the count that ran.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Print per-op forward/backward times.
    #[arg(long)]
    pub profile: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct SpeedReport {
    model: String,
    batch: usize,
    threads: usize,
    steps: usize,
    ms_per_step: f64,
    img_per_s: f64,
    /// Peak resident memory of the process (VmHWM), MiB.
    peak_rss_mib: f64,
    /// OpenBLAS's kernel set ([`crate::engine::blas_core`]) and whether OPENBLAS_CORETYPE set it.
    blas_core: String,
    blas_core_pinned: bool,
    profile: Vec<(String, String, f64)>,
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

/// `elrt speed`: training-step throughput on random data (no data loading), the figure the
/// benchmarks compare with PyTorch.
pub fn speed(a: SpeedArgs) -> Result<()> {
    let threads = crate::engine::thread_count(a.threads)?;
    crate::engine::with_threads(threads, || speed_on_pool(a))?
}

fn speed_on_pool(a: SpeedArgs) -> Result<()> {
    use ndarray::{ArrayD, IxDyn};
    let mut graph = crate::onnx::read_file(&a.model)?;
    bn_insert::apply(&mut graph, BnPolicy::Auto);
    let mut m = Model::from_graph(graph, a.batch).with_context(|| a.model.display().to_string())?;
    let mut r = crate::rng::Rng::new(1);
    let x = ArrayD::from_shape_fn(IxDyn(&m.input_shape), |_| r.normal());
    let labels: Vec<usize> = (0..a.batch).map(|i| i % m.classes).collect();
    // The training step without the optimiser's update, as scripts/bench_train.py times
    // PyTorch's.
    let mut train_step = crate::train::step::TrainStep::new(&m.session.program, 0.0, 0.0);
    let mut step =
        |m: &mut Model| -> Result<()> { train_step.gradients(m, x.clone(), &labels).map(|_| ()) };
    let total = crate::engine::on_pool(|| -> Result<f64> {
        step(&mut m)?;
        if a.profile {
            m.session.profile = Some(Default::default());
        }
        let t0 = std::time::Instant::now();
        for _ in 0..a.steps {
            step(&mut m)?;
        }
        Ok(t0.elapsed().as_secs_f64())
    })?;
    let mut profile: Vec<(String, String, f64)> = m
        .session
        .profile
        .take()
        .unwrap_or_default()
        .into_iter()
        .map(|((op, bwd), s)| {
            let dir = if bwd { "backward" } else { "forward" };
            (op.to_string(), dir.to_string(), 1e3 * s / a.steps as f64)
        })
        .collect();
    profile.sort_by(|x, y| y.2.total_cmp(&x.2));
    let (blas_core, blas_core_pinned) = crate::engine::blas_core();
    let rep = SpeedReport {
        model: a.model.display().to_string(),
        batch: a.batch,
        threads: crate::engine::compute_threads_alive(),
        steps: a.steps,
        ms_per_step: 1e3 * total / a.steps as f64,
        img_per_s: (a.batch * a.steps) as f64 / total,
        peak_rss_mib: peak_rss_mib(),
        blas_core,
        blas_core_pinned,
        profile,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "{}: batch {}, {} threads: {:.1} ms/step, {:.0} img/s, peak RSS {:.0} MiB, OpenBLAS {}{}",
            rep.model,
            rep.batch,
            rep.threads,
            rep.ms_per_step,
            rep.img_per_s,
            rep.peak_rss_mib,
            rep.blas_core,
            if rep.blas_core_pinned {
                " (set by OPENBLAS_CORETYPE)"
            } else {
                ""
            }
        );
        for (op, dir, ms) in &rep.profile {
            println!(
                "  {op:<20} {dir:<8} {ms:>8.1} ms/step {:>5.1}%",
                100.0 * ms / rep.ms_per_step
            );
        }
    }
    Ok(())
}
