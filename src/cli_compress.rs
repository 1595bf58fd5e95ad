//! `elrt compress`: the main job. One command from an ONNX architecture to a trained compact
//! ONNX file and a report, through every stage: convert -> train -> export (validated in
//! tract) -> bench -> report, each stage's output kept in the run folder so that `--resume`
//! carries on from where a run stopped.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cli_convert::{ConvertArgs, ConvertReport};
use crate::cli_export::{run_bench, run_export, BenchArgs, ExportArgs, ExportSummary};
use crate::cli_train::{run_train, TrainArgs};
use crate::data::{DataSpec, NormSpec};
use crate::inspect::group_digits;
use crate::util::write_atomic;

/// DSO strength used when `--orth` is not given: the best of the README's rho sweep (Tucker-2
/// ResNet-20 on CIFAR-10, 10 epochs: no DSO 78.73%, rho 1e-4 79.25%, 1e-3 79.78%, 1e-2 81.00%,
/// 1e-1 80.82%).
pub const DEFAULT_ORTH: f32 = 1e-2;

/// The embedded default's data: the built-in synthetic set, sized so that the whole job runs
/// in a couple of minutes on two cores.
pub const EMBEDDED_DATA: &str = "synthetic:4000,1000";

#[derive(Args, Debug, Clone)]
pub struct CompressArgs {
    /// The ONNX architecture (weights are not needed: training starts from random factors).
    pub model: PathBuf,
    /// synthetic | synthetic:TRAIN,TEST | cifar10:PATH | cifar100:PATH | folder:PATH. Without
    /// it: the built-in synthetic set and a short schedule (the embedded default).
    #[arg(long)]
    pub data: Option<String>,
    /// Input normalisation for training, evaluation and the tract accuracy check, recorded in
    /// run.json, the report and the compact file: cifar10 | imagenet | none | M1,M2,M3/S1,S2,S3
    /// (mean/std of 0..1 pixels). Default: what the model file records, else cifar10.
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// tucker2 | cp
    #[arg(long, default_value = "tucker2")]
    pub format: String,
    /// ratio=F | params=F | macs=F | latency=F (measured in tract) | a JSON file of per-layer ranks
    #[arg(long, default_value = "params=0.4")]
    pub ranks: String,
    /// Factorize 1x1 convs too, by SVD (for MobileNet-like networks).
    #[arg(long = "include-1x1")]
    pub include_pointwise: bool,
    /// Epochs (default: 30 on real data, 4 on the synthetic set).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Batch size (default: 128 on real data, 64 on the synthetic set).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Base learning rate, SGD with Nesterov momentum 0.9 (default: 0.1 on real data at batch
    /// 128, 0.05 on the synthetic set, whose small training split wants smaller steps).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Double soft orthogonality strength rho (0: off).
    #[arg(long, default_value_t = DEFAULT_ORTH)]
    pub orth: f32,
    /// How the random factors start: per-conv (Kaiming fan-out on each factor conv, as for any
    /// conv), composed (the converter's init: the composed kernel has Kaiming's variance and U1,
    /// U2 start near orthonormal), orthogonal (U1, U2 orthonormal, core scaled to match).
    #[arg(long, default_value = "per-conv")]
    pub factor_init: String,
    /// No weight decay on the factor matrices under DSO (see `elrt train --orth-no-decay`).
    #[arg(long)]
    pub orth_no_decay: bool,
    #[arg(long, default_value_t = 5e-4)]
    pub wd: f32,
    /// constant | step | cosine | onecycle
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Training threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads for the deployment latency (tract).
    #[arg(long, default_value_t = 1)]
    pub bench_threads: usize,
    /// fastest | factorized | dense (how the compact file writes each factorized layer).
    #[arg(long, default_value = "fastest")]
    pub forms: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop training after N steps (smoke runs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Also train the full-rank model with the same recipe, for the accuracy comparison.
    #[arg(long)]
    pub baseline: bool,
    /// Keep the model's classifier as it is (an error when its output width differs from the
    /// data's class count); without it, the classifier is re-sized to the data.
    #[arg(long)]
    pub keep_head: bool,
    /// The run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue a stopped run in --out from its last finished stage.
    #[arg(long)]
    pub resume: bool,
    /// Print the report as JSON (stage messages are silenced).
    #[arg(long)]
    pub json: bool,
    /// No stage messages or progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// What the run folder records about itself, so that `--resume` can check it is the same run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunManifest {
    elrt: String,
    model: String,
    /// FNV-1a of the model file's bytes.
    model_fingerprint: String,
    data: String,
    recipe: Recipe,
    /// Stages finished, in order.
    done: Vec<String>,
    command: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Recipe {
    format: String,
    #[serde(default)]
    include_pointwise: bool,
    ranks: String,
    epochs: u64,
    batch: usize,
    lr: f32,
    orth: f32,
    /// Absent in run folders written before the option existed: they used per-conv.
    #[serde(default = "per_conv")]
    factor_init: String,
    #[serde(default)]
    orth_no_decay: bool,
    wd: f32,
    schedule: String,
    seed: u64,
    forms: String,
    baseline: bool,
    max_steps: Option<u64>,
    /// Absent in run folders written before the option existed: they used the default for the
    /// model's channels, which a resume fills in before comparing.
    #[serde(default)]
    normalize: Option<NormSpec>,
}

fn per_conv() -> String {
    "per-conv".into()
}

fn fingerprint(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The report's facts, also written as report.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompressReport {
    pub model: String,
    pub data: String,
    pub synthetic: bool,
    pub command: String,
    pub format: String,
    pub ranks: String,
    pub epochs: u64,
    pub orth: f32,
    /// The input normalisation (`--normalize` form) used for training and both accuracies.
    #[serde(default)]
    pub normalize: String,
    pub original: ModelFacts,
    pub compact: ModelFacts,
    pub baseline_top1: Option<f64>,
    /// Test images behind `compact.tract_top1`, and how often tract's top-1 class equals the
    /// engine's on them.
    #[serde(default)]
    pub tract_images: Option<usize>,
    #[serde(default)]
    pub tract_top1_agreement: Option<f64>,
    pub forms: String,
    pub stage_seconds: Vec<(String, f64)>,
    pub files: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelFacts {
    pub file: String,
    pub params: u64,
    pub macs: u64,
    /// Test top-1 in the engine (the trained model's last evaluation).
    pub top1: Option<f64>,
    /// Test top-1 of the written file run in tract (compact.onnx; measured by the export).
    #[serde(default)]
    pub tract_top1: Option<f64>,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub bench_threads: usize,
}

struct Run {
    dir: PathBuf,
    manifest: RunManifest,
    quiet: bool,
}

impl Run {
    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    fn done(&self, stage: &str) -> bool {
        self.manifest.done.iter().any(|s| s == stage)
    }

    fn mark(&mut self, stage: &str) -> Result<()> {
        if !self.done(stage) {
            self.manifest.done.push(stage.to_string());
        }
        self.save()
    }

    fn save(&self) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.manifest)?;
        write_atomic(&self.path("run.json"), text.as_bytes())
            .with_context(|| format!("{}: cannot write the run folder", self.dir.display()))
    }

    fn say(&self, m: &str) {
        if !self.quiet {
            eprintln!("[compress] {m}");
        }
    }
}

fn shell_quote(a: &str) -> String {
    if a.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', "'\\''"))
    }
}

pub fn compress(a: CompressArgs) -> Result<()> {
    let report = run_compress(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report_table(&report));
        println!("run folder: {}", a.out.display());
    }
    Ok(())
}

pub fn run_compress(a: &CompressArgs) -> Result<CompressReport> {
    let synthetic_default = a.data.is_none();
    let data = a.data.clone().unwrap_or_else(|| EMBEDDED_DATA.to_string());
    let spec = DataSpec::parse(&data)?;
    let synthetic = data.starts_with("synthetic");
    let epochs = a.epochs.unwrap_or(if synthetic { 4 } else { 30 });
    let batch = a.batch.unwrap_or(if synthetic { 64 } else { 128 });
    let lr = a.lr.unwrap_or(if synthetic { 0.05 } else { 0.1 });
    if batch == 0 || !(lr > 0.0 && lr.is_finite()) {
        bail!("--batch must be at least 1 and --lr positive");
    }
    if epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if a.bench_threads == 0 {
        bail!("--bench-threads must be at least 1");
    }
    crate::export::FormsPolicy::from_str_checked(&a.forms)?;
    // (the converter's init, the trainer's init)
    let (convert_init, train_init) = match a.factor_init.as_str() {
        "per-conv" => ("scratch", "scratch"),
        "composed" => ("scratch", "factors"),
        "orthogonal" => ("orthogonal", "factors"),
        o => bail!("--factor-init '{o}': expected per-conv, composed or orthogonal"),
    };
    let model_bytes =
        std::fs::read(&a.model).with_context(|| format!("cannot read {}", a.model.display()))?;
    // Fail on bad data before anything is written: load it once for the model's input shape.
    let graph = crate::onnx::read_bytes_in(
        &model_bytes,
        Some(a.model.parent().unwrap_or(Path::new("."))),
    )
    .with_context(|| a.model.display().to_string())?;
    let shape = crate::ir::shape::default_input_shapes(&graph)
        .with_context(|| a.model.display().to_string())?;
    let chw = [shape[0][1], shape[0][2], shape[0][3]];
    let (normalize, note) = NormSpec::for_model(
        a.normalize.as_ref(),
        &a.model,
        &graph.meta.metadata_props,
        chw[0],
    )?;
    spec.load(chw).with_context(|| format!("--data {data}"))?;

    // argv[0] as `elrt`, so that the report's command reads the same wherever the binary is.
    let command = std::iter::once("elrt".to_string())
        .chain(std::env::args().skip(1))
        .map(|s| shell_quote(&s))
        .collect::<Vec<_>>()
        .join(" ");
    let recipe = Recipe {
        format: a.format.clone(),
        include_pointwise: a.include_pointwise,

        ranks: a.ranks.clone(),
        epochs,
        batch,
        lr,
        orth: a.orth,
        factor_init: a.factor_init.clone(),
        orth_no_decay: a.orth_no_decay,
        wd: a.wd,
        schedule: a.schedule.clone(),
        seed: a.seed,
        forms: a.forms.clone(),
        baseline: a.baseline,
        max_steps: a.max_steps,
        normalize: Some(normalize.clone()),
    };
    let manifest_path = a.out.join("run.json");
    let manifest = if a.resume {
        let text = std::fs::read_to_string(&manifest_path).map_err(|_| {
            anyhow!(
                "--resume: {} is not a run folder (no run.json)",
                a.out.display()
            )
        })?;
        let mut m: RunManifest = serde_json::from_str(&text)
            .with_context(|| format!("{}: unreadable run.json", a.out.display()))?;
        let was = m
            .recipe
            .normalize
            .get_or_insert_with(|| NormSpec::default_for(chw[0]))
            .clone();
        if was != normalize {
            bail!(
                "--resume: {} was made with --normalize {was}, this run asks for {normalize}; \
                 use a new --out or the original normalisation",
                a.out.display()
            );
        }
        if m.model_fingerprint != fingerprint(&model_bytes) {
            bail!(
                "--resume: {} was made from {} (a different model than {}); use a new --out",
                a.out.display(),
                m.model,
                a.model.display()
            );
        }
        if m.recipe != recipe || m.data != data {
            bail!(
                "--resume: {} was made with a different recipe or data ({}); use a new --out \
                 or the original flags",
                a.out.display(),
                m.command
            );
        }
        m
    } else {
        if manifest_path.exists() {
            bail!(
                "{} already holds a run; pass --resume to continue it or choose another --out",
                a.out.display()
            );
        }
        std::fs::create_dir_all(&a.out)
            .with_context(|| format!("{}: cannot create the run folder", a.out.display()))?;
        RunManifest {
            elrt: env!("CARGO_PKG_VERSION").into(),
            model: a.model.display().to_string(),
            model_fingerprint: fingerprint(&model_bytes),
            data: data.clone(),
            recipe: recipe.clone(),
            done: Vec::new(),
            command: command.clone(),
        }
    };
    let mut run = Run {
        dir: a.out.clone(),
        manifest,
        quiet: a.quiet || a.json,
    };
    run.save()?;
    if let Some(n) = &note {
        run.say(n);
    }
    if synthetic_default {
        run.say(
            "no --data: the built-in synthetic set with a short schedule (the embedded default)",
        );
    }
    run.say(&format!(
        "recipe: {} {} | {} epochs, batch {}, SGD Nesterov lr {} {} wd {} | DSO rho {}{} | factors {} | normalize {} | seed {}",
        a.format,
        a.ranks,
        epochs,
        batch,
        lr,
        a.schedule,
        a.wd,
        a.orth,
        if a.orth_no_decay { " (no wd on U1/U2)" } else { "" },
        a.factor_init,
        normalize,
        a.seed
    ));
    let mut stage_seconds = Vec::new();

    // 1. convert
    let factorized = run.path("factorized.onnx");
    if !run.done("convert") {
        run.say("convert");
        let t0 = Instant::now();
        let r: ConvertReport = crate::cli_convert::run(ConvertArgs {
            model: a.model.clone(),
            format: a.format.clone(),
            ranks: a.ranks.clone(),
            rank_multiple: 8,
            include_first: false,
            include_pointwise: a.include_pointwise,
            include_gemm: false,
            init: convert_init.into(),
            seed: a.seed,
            hooi_iters: 10,
            cp_iters: 50,
            latency_threads: 1,
            output: factorized.clone(),
            json: false,
        })?;
        let ranks: serde_json::Map<String, serde_json::Value> = r
            .layers
            .iter()
            .filter(|l| !l.ranks.is_empty())
            .map(|l| (l.layer.clone(), serde_json::json!(l.ranks)))
            .collect();
        write_atomic(
            &run.path("ranks.json"),
            serde_json::to_string_pretty(&ranks)?.as_bytes(),
        )?;
        write_atomic(&run.path("convert.txt"), r.to_text().as_bytes())?;
        stage_seconds.push(("convert".to_string(), t0.elapsed().as_secs_f64()));
        run.mark("convert")?;
    }

    // 2. train (and the baseline)
    let train_args = |model: PathBuf, output: PathBuf, orth: f32, resume: bool| TrainArgs {
        model,
        data: data.clone(),
        epochs,
        batch,
        lr: Some(lr),
        optimizer: "sgd".into(),
        momentum: 0.9,
        no_nesterov: false,
        wd: Some(a.wd),
        schedule: a.schedule.clone(),
        warmup: 0.0,
        label_smoothing: 0.0,
        threads: a.threads,
        workers: 2,
        seed: a.seed,
        max_steps: a.max_steps,
        init: train_init.into(),
        bn: "auto".into(),
        no_augment: false,
        normalize: Some(normalize.clone()),
        orth,
        orth_no_decay: a.orth_no_decay,
        keep_head: a.keep_head,
        resume,
        output: Some(output),
        json: false,
        quiet: a.quiet || a.json,
    };
    let trained = run.path("trained.onnx");
    let mut compact_top1 = None;
    if !run.done("train") {
        run.say("train the factorized model from random factors");
        let t0 = Instant::now();
        let resume = run.path("trained.ckpt").exists();
        let r = run_train(&train_args(
            factorized.clone(),
            trained.clone(),
            a.orth,
            resume,
        ))?;
        if matches!(r.outcome, crate::train::run::Outcome::Interrupted) {
            bail!("training was interrupted; continue with the same command and --resume");
        }
        compact_top1 = r.history.last().map(|m| m.test_acc);
        stage_seconds.push(("train".to_string(), t0.elapsed().as_secs_f64()));
        run.mark("train")?;
    }
    let baseline_trained = run.path("baseline/trained.onnx");
    let mut baseline_top1 = None;
    if a.baseline && !run.done("baseline") {
        run.say("train the full-rank baseline with the same recipe");
        let t0 = Instant::now();
        std::fs::create_dir_all(run.path("baseline"))?;
        let resume = run.path("baseline/trained.ckpt").exists();
        let r = run_train(&train_args(
            a.model.clone(),
            baseline_trained.clone(),
            0.0,
            resume,
        ))?;
        if matches!(r.outcome, crate::train::run::Outcome::Interrupted) {
            bail!("training was interrupted; continue with the same command and --resume");
        }
        baseline_top1 = r.history.last().map(|m| m.test_acc);
        stage_seconds.push(("baseline".to_string(), t0.elapsed().as_secs_f64()));
        run.mark("baseline")?;
    }
    // Accuracies of stages finished in an earlier process come from their metrics files.
    let last_acc = |metrics: &Path| -> Option<f64> {
        let text = std::fs::read_to_string(metrics).ok()?;
        let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        v.get("test_acc")?.as_f64()
    };
    if compact_top1.is_none() {
        compact_top1 = last_acc(&run.path("trained.metrics.jsonl"));
    }
    if a.baseline && baseline_top1.is_none() {
        baseline_top1 = last_acc(&run.path("baseline/trained.metrics.jsonl"));
    }

    // 3. export (validated in tract) the compact model and the original for latency
    let compact = run.path("compact.onnx");
    let original = run.path("original.onnx");
    // The compact file's accuracy is measured in tract on the whole test split (`data`), with
    // the run's normalisation: the synthetic set too, since it costs seconds and shows that the
    // written file, not only the engine's model, classifies.
    let export_args =
        |model: PathBuf, output: PathBuf, forms: &str, data: Option<String>, meta: Vec<String>| {
            ExportArgs {
                model,
                output,
                batch: None,
                dynamic_batch: false,
                input_shape: None,
                opset: None,
                forms: forms.to_string(),
                threads: a.bench_threads,
                data,
                normalize: Some(normalize.clone()),
                data_images: 0,
                check_batches: 4,
                tolerance: 1e-4,
                meta,
                json: false,
                quiet: a.quiet || a.json,
            }
        };
    if !run.done("export") {
        run.say(
            "export the compact model (BN folded, forms timed in tract) and validate it in tract",
        );
        let t0 = Instant::now();
        let mut meta = vec![
            format!("elrt.data={data}"),
            format!("elrt.epochs={epochs}"),
            format!("elrt.orth={}", a.orth),
            format!("elrt.factor_init={}", a.factor_init),
        ];
        // elrt.accuracy.top1 is tract's, measured on this file by the export; the engine's
        // figure for the trained model sits beside it.
        if let Some(t) = compact_top1 {
            meta.push(format!("elrt.accuracy.engine_top1={t:.4}"));
        }
        let s: ExportSummary = run_export(&export_args(
            trained.clone(),
            compact.clone(),
            &a.forms,
            Some(data.clone()),
            meta,
        ))?;
        write_atomic(
            &run.path("export.json"),
            serde_json::to_string_pretty(&s)?.as_bytes(),
        )?;
        // The original architecture, exported the same way (dense), for the latency side of
        // the comparison: the trained baseline when there is one, else the file as given.
        let src = if a.baseline {
            baseline_trained.clone()
        } else {
            a.model.clone()
        };
        run_export(&export_args(src, original.clone(), "dense", None, vec![]))?;
        stage_seconds.push(("export".to_string(), t0.elapsed().as_secs_f64()));
        run.mark("export")?;
    }
    // Tract's accuracy of the compact file, as the export measured it (also for a resumed run).
    let data_check: Option<serde_json::Value> = std::fs::read_to_string(run.path("export.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| v["data_check"].clone())
        .filter(|d| !d.is_null());
    let check_f64 = |k: &str| data_check.as_ref().and_then(|d| d[k].as_f64());
    let tract_top1 = check_f64("top1");
    let tract_images = check_f64("images").map(|n| n as usize);
    let tract_top1_agreement = check_f64("top1_agreement");
    // The forms written, as the export recorded them in the file (also for a resumed run).
    let forms_text = crate::onnx::read_file(&compact)?
        .meta
        .metadata_props
        .into_iter()
        .find(|(k, _)| k == "elrt.export.forms")
        .map(|(_, v)| v)
        .unwrap_or_default();

    // 4. bench
    run.say("benchmark original and compact in tract (batch 1, interleaved)");
    let t0 = Instant::now();
    let b = run_bench(
        &BenchArgs {
            files: vec![original.clone(), compact.clone()],
            batch: vec![1],
            threads: a.bench_threads,
            warmup: 20,
            runs: 200,
            min_seconds: 1.0,
            profile: false,
            json: false,
        },
        run.quiet,
    )?;
    write_atomic(
        &run.path("bench.json"),
        serde_json::to_string_pretty(&b.rows)?.as_bytes(),
    )?;
    stage_seconds.push(("bench".to_string(), t0.elapsed().as_secs_f64()));
    run.mark("bench")?;

    let facts = |row: &crate::bench::BenchRow, top1: Option<f64>, tract_top1| ModelFacts {
        file: row.file.clone(),
        params: row.params,
        macs: row.macs,
        top1,
        tract_top1,
        p50_ms: row.p50_ms,
        p90_ms: row.p90_ms,
        bench_threads: row.threads,
    };
    let mut files: Vec<String> = std::fs::read_dir(&run.dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect();
    files.push("report.md".into());
    files.push("report.json".into());
    files.sort();
    files.dedup();
    let report = CompressReport {
        model: a.model.display().to_string(),
        data: data.clone(),
        synthetic,
        command: run.manifest.command.clone(),
        format: a.format.clone(),
        ranks: a.ranks.clone(),
        epochs,
        orth: a.orth,
        normalize: normalize.to_string(),
        original: facts(&b.rows[0], baseline_top1, None),
        compact: facts(&b.rows[1], compact_top1, tract_top1),
        baseline_top1,
        tract_images,
        tract_top1_agreement,
        forms: forms_text,
        stage_seconds,
        files,
    };
    write_atomic(
        &run.path("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomic(&run.path("report.md"), report_markdown(&report).as_bytes())?;
    run.mark("report")?;
    Ok(report)
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.2}%", 100.0 * x))
        .unwrap_or_else(|| "-".into())
}

pub fn report_table(r: &CompressReport) -> String {
    let o = &r.original;
    let c = &r.compact;
    let mut s = String::new();
    s += &format!(
        "| | params | MACs | test top-1, engine | test top-1, tract | tract p50 (batch 1, {} thread) |\n|---|---:|---:|---:|---:|---:|\n",
        c.bench_threads
    );
    s += &format!(
        "| original | {} | {} | {} | - | {:.3} ms |\n",
        group_digits(o.params),
        group_digits(o.macs),
        if r.baseline_top1.is_some() {
            pct(o.top1)
        } else {
            "not trained (--baseline)".into()
        },
        o.p50_ms
    );
    s += &format!(
        "| compact | {} | {} | {} | {} | {:.3} ms |\n",
        group_digits(c.params),
        group_digits(c.macs),
        pct(c.top1),
        pct(c.tract_top1),
        c.p50_ms
    );
    s += &format!(
        "| ratio | {:.2}x fewer | {:.2}x fewer | {} | - | {:.2}x faster |\n",
        o.params as f64 / c.params.max(1) as f64,
        o.macs as f64 / c.macs.max(1) as f64,
        match (o.top1, c.top1) {
            (Some(a), Some(b)) => format!("{:+.2} points", 100.0 * (b - a)),
            _ => "-".into(),
        },
        o.p50_ms / c.p50_ms
    );
    s
}

pub fn report_markdown(r: &CompressReport) -> String {
    let mut s = format!("# elrt compress: {}\n\n", r.model);
    if r.synthetic {
        s += "**Data: the built-in synthetic set** (procedural 10-class images, not a real data \
              set): the accuracies show that every stage works, not what the model reaches on \
              real images.\n\n";
    } else {
        s += &format!("Data: `{}` (accuracies on its test split).\n\n", r.data);
    }
    s += &format!(
        "Input normalisation: `{}` (training, both accuracies; recorded in compact.onnx as \
         `elrt.normalize`).\n\n",
        r.normalize
    );
    s += &report_table(r);
    if let (Some(n), Some(t)) = (r.tract_images, r.compact.tract_top1) {
        s += &format!(
            "\nTest top-1: engine = the trained model's last evaluation in elrt's engine; tract = \
             compact.onnx (the written file) run in tract, {:.2}% on {} test images{}.\n",
            100.0 * t,
            n,
            r.tract_top1_agreement
                .map(|g| format!(", top-1 class equal to the engine's on {:.2}%", 100.0 * g))
                .unwrap_or_default()
        );
    }
    s += &format!(
        "\nFormat {} with ranks `{}`, trained from random factors for {} epochs with DSO rho {}; \
         compact file forms: {}.\nLatency: tract, batch 1, {} thread(s), original and compact \
         interleaved, median (p90: {:.3} / {:.3} ms). The original is the same architecture \
         exported the same way (BN folded, fixed shapes).\n",
        r.format,
        r.ranks,
        r.epochs,
        r.orth,
        if r.forms.is_empty() { "-" } else { &r.forms },
        r.compact.bench_threads,
        r.original.p90_ms,
        r.compact.p90_ms
    );
    s += "\nStage wall times (this process):\n\n";
    for (k, v) in &r.stage_seconds {
        s += &format!("- {k}: {v:.1} s\n");
    }
    s += &format!(
        "\nCommand:\n\n    {}\n\nFiles: {}\n",
        r.command,
        r.files.join(", ")
    );
    s
}
