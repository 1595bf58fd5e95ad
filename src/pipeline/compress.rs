//! The compress stage, `elrt compress`: the main job. One command from an ONNX architecture to a trained compact
//! ONNX file and a report, through every stage: convert -> train -> export (validated in
//! tract) -> bench -> report, each stage's output kept in the run folder so that `--resume`
//! carries on from where a run stopped. The run record (run.json: the model, the data and the
//! recipe) drives the stages: each one's options ([`ConvertOptions`], [`TrainOptions`],
//! [`ExportOptions`], [`BenchOptions`]) are derived from it, and the stages run through the
//! pipeline's own entry points.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::bench::{bench, BenchOptions};
use super::convert::{convert_graph, ConvertOptions, ConvertReport};
use super::export::{export, ExportOptions, ExportSummary};
use super::train::{train, Optim, TrainInit, TrainOptions};
use crate::data::{DataSpec, NormSpec};
use crate::export::FormsPolicy;
use crate::inspect::group_digits;
use crate::ir::bn_insert::BnPolicy;
use crate::lowrank::rank::RankPolicy;
use crate::lowrank::{Format, InitMode};
use crate::train::schedule::{default_sgd_lr, Schedule};
use crate::util::write_atomic;

/// DSO strength used when `--orth` is not given: the best of the README's rho sweep (Tucker-2
/// ResNet-20 on CIFAR-10, 10 epochs: no DSO 78.73%, rho 1e-4 79.25%, 1e-3 79.78%, 1e-2 81.00%,
/// 1e-1 80.82%).
pub const DEFAULT_ORTH: f32 = 1e-2;

/// The embedded default's data: the built-in synthetic set, sized so that the whole job runs
/// in a couple of minutes on two cores.
pub const EMBEDDED_DATA: &str = "synthetic:4000,1000";

/// The rank policy when `--ranks` is not given.
pub const DEFAULT_RANKS: &str = "params=0.4";

/// How the random factors start (`--factor-init`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FactorInit {
    /// Kaiming fan-out on each factor conv, as for any conv.
    PerConv,
    /// The converter's init: the composed kernel has Kaiming's variance and U1, U2 start near
    /// orthonormal.
    Composed,
    /// U1, U2 orthonormal, core scaled to match.
    Orthogonal,
}

impl FactorInit {
    /// The converter's init and the trainer's init that make this one.
    fn stages(self) -> (InitMode, TrainInit) {
        match self {
            FactorInit::PerConv => (InitMode::Scratch, TrainInit::Scratch),
            FactorInit::Composed => (InitMode::Scratch, TrainInit::Factors),
            FactorInit::Orthogonal => (InitMode::Orthogonal, TrainInit::Factors),
        }
    }
}

impl std::str::FromStr for FactorInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<FactorInit> {
        Ok(match s {
            "per-conv" => FactorInit::PerConv,
            "composed" => FactorInit::Composed,
            "orthogonal" => FactorInit::Orthogonal,
            o => bail!("--factor-init '{o}': expected per-conv, composed or orthogonal"),
        })
    }
}

impl std::fmt::Display for FactorInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FactorInit::PerConv => "per-conv",
            FactorInit::Composed => "composed",
            FactorInit::Orthogonal => "orthogonal",
        })
    }
}

/// A value written in run.json as its command-line text (`Display`) and read back with
/// `FromStr`, so that the record reads as the flags did.
mod text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<T: std::fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What [`compress`] does; the defaults are `elrt compress`'s.
#[derive(Clone, Debug)]
pub struct CompressOptions {
    /// The ONNX architecture (weights are not needed: training starts from random factors).
    pub model: PathBuf,
    /// The data (`None`: the built-in synthetic set, [`EMBEDDED_DATA`], and a short schedule).
    pub data: Option<DataSpec>,
    /// Budget for decoded images, MiB: an image folder larger than this at the model's input
    /// size streams ([`crate::data::source`]).
    pub cache_mb: usize,
    /// Input normalisation for training, evaluation and the tract accuracy check (`None`: what
    /// the model file records, else the default for its channels).
    pub normalize: Option<NormSpec>,
    pub format: Format,
    /// The rank policy (`None`: [`DEFAULT_RANKS`], widened to the 1x1 convs and then the Gemm
    /// layers on models whose convs alone cannot reach it).
    pub ranks: Option<RankPolicy>,
    /// Factorize 1x1 convs too, by SVD.
    pub include_pointwise: bool,
    /// Factorize Gemm (fully connected) layers too, by SVD.
    pub include_gemm: bool,
    /// Factorize the first conv (the one reading the image) too.
    pub include_first: bool,
    /// Image shape for a model whose file leaves input dimensions unknown (or to train it at
    /// another input size).
    pub input_shape: Option<Vec<usize>>,
    /// Run even when the rank policy factorizes no layer.
    pub allow_dense: bool,
    /// Epochs (`None`: 30 on real data, 4 on the synthetic set).
    pub epochs: Option<u64>,
    /// Batch size (`None`: 128 on real data, 64 on the synthetic set).
    pub batch: Option<usize>,
    /// Base learning rate, SGD with Nesterov momentum 0.9 (`None`: 0.1 on real data at batch
    /// 128, 0.05 on the synthetic set at batch 64, each scaled down linearly for a smaller batch:
    /// [`crate::train::schedule::default_sgd_lr`]).
    pub lr: Option<f32>,
    /// Double soft orthogonality strength rho (0: off).
    pub orth: f32,
    pub factor_init: FactorInit,
    /// No weight decay on the factor matrices under DSO.
    pub orth_no_decay: bool,
    /// Where training puts BatchNormalizations back (`elrt train --bn`).
    pub bn: BnPolicy,
    /// Every BatchNormalization's running-statistics momentum while training (`elrt train
    /// --bn-momentum`; `None`: the model's own).
    pub bn_momentum: Option<f32>,
    /// Training images over which each evaluation first recomputes the batch norms' running
    /// statistics (`elrt train --bn-recalibrate`; 0: off).
    pub bn_recalibrate: usize,
    /// Weight decay on conv and linear weights.
    pub wd: f32,
    pub schedule: Schedule,
    /// Training threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Threads for the deployment latency (tract).
    pub bench_threads: usize,
    /// How the compact file writes each factorized layer.
    pub forms: FormsPolicy,
    /// Seed of the random factors, the data order and the augmentation.
    pub seed: u64,
    /// Stop training after this many steps (smoke runs).
    pub max_steps: Option<u64>,
    /// Also train the full-rank model with the same recipe.
    pub baseline: bool,
    /// Keep the model's classifier as it is.
    pub keep_head: bool,
    /// The run folder.
    pub out: PathBuf,
    /// Continue a stopped run in `out` from its last finished stage.
    pub resume: bool,
    /// With `resume`: accept a changed `epochs` or `max_steps`.
    pub allow_recipe_change: bool,
    /// No stage messages or progress bars.
    pub quiet: bool,
    /// Under mpirun: BN with the global batch's statistics ([`TrainOptions::sync_bn`]).
    pub sync_bn: bool,
    /// The command recorded in run.json and the report (`None`: this process's arguments,
    /// with `argv[0]` as `elrt`).
    pub command: Option<String>,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            model: PathBuf::new(),
            data: None,
            cache_mb: crate::data::DEFAULT_CACHE_MB,
            normalize: None,
            format: Format::Tucker2,
            ranks: None,
            include_pointwise: false,
            include_gemm: false,
            include_first: false,
            input_shape: None,
            allow_dense: false,
            epochs: None,
            batch: None,
            lr: None,
            orth: DEFAULT_ORTH,
            factor_init: FactorInit::PerConv,
            orth_no_decay: false,
            bn: BnPolicy::Auto,
            bn_momentum: None,
            bn_recalibrate: crate::train::precise_bn::DEFAULT_IMAGES,
            wd: 5e-4,
            schedule: Schedule::Cosine { min_ratio: 0.0 },
            threads: None,
            bench_threads: 1,
            forms: FormsPolicy::Fastest,
            seed: 0,
            max_steps: None,
            baseline: false,
            keep_head: false,
            sync_bn: false,
            out: PathBuf::new(),
            resume: false,
            allow_recipe_change: false,
            quiet: false,
            command: None,
        }
    }
}

/// What the run folder records about itself, so that `--resume` can check it is the same run.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunManifest {
    elrt: String,
    model: String,
    /// FNV-1a of the model file's bytes.
    model_fingerprint: String,
    #[serde(with = "text")]
    data: DataSpec,
    recipe: Recipe,
    /// Stages finished, in order.
    done: Vec<String>,
    command: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Recipe {
    #[serde(with = "text")]
    format: Format,
    #[serde(default)]
    include_pointwise: bool,
    #[serde(with = "text")]
    ranks: RankPolicy,
    epochs: u64,
    batch: usize,
    lr: f32,
    orth: f32,
    /// Absent in run folders written before the option existed: they used per-conv.
    #[serde(default = "per_conv", with = "text")]
    factor_init: FactorInit,
    #[serde(default)]
    orth_no_decay: bool,
    wd: f32,
    #[serde(with = "text")]
    schedule: Schedule,
    seed: u64,
    #[serde(with = "text")]
    forms: FormsPolicy,
    baseline: bool,
    max_steps: Option<u64>,
    /// Absent in run folders written before the option existed: they used the default for the
    /// model's channels, which a resume fills in before comparing.
    #[serde(default)]
    normalize: Option<NormSpec>,
    #[serde(default)]
    include_gemm: bool,
    #[serde(default)]
    include_first: bool,
    #[serde(default)]
    input_shape: Option<String>,
    #[serde(default)]
    keep_head: bool,
    /// Absent in run folders written before the option existed: they used auto.
    #[serde(default = "bn_auto", with = "text")]
    bn: BnPolicy,
    /// Absent in run folders written before the option existed: they kept the model's own.
    #[serde(default)]
    bn_momentum: Option<f32>,
    /// Absent in run folders written before the option existed: the default, which changes
    /// only the running statistics, never the weights.
    #[serde(default = "bn_recalibrate_default")]
    bn_recalibrate: usize,
}

fn bn_recalibrate_default() -> usize {
    crate::train::precise_bn::DEFAULT_IMAGES
}

fn bn_auto() -> BnPolicy {
    BnPolicy::Auto
}

impl Recipe {
    /// The convert stage's options: the model's factorization as the recipe gives it.
    fn convert_options(&self, model: &Path, output: PathBuf) -> ConvertOptions {
        ConvertOptions {
            model: model.to_path_buf(),
            output,
            format: self.format,
            ranks: self.ranks.clone(),
            include_first: self.include_first,
            include_pointwise: self.include_pointwise,
            include_gemm: self.include_gemm,
            init: self.factor_init.stages().0,
            seed: self.seed,
            ..ConvertOptions::default()
        }
    }

    /// The train stage's options (the factorized model, or the full-rank baseline with
    /// `orth` 0): SGD with Nesterov momentum 0.9 and the recipe's schedule, the classifier as
    /// the run's model.onnx has it.
    fn train_options(
        &self,
        data: &DataSpec,
        model: PathBuf,
        output: PathBuf,
        orth: f32,
        resume: bool,
    ) -> TrainOptions {
        TrainOptions {
            model,
            data: data.clone(),
            epochs: self.epochs,
            batch: self.batch,
            lr: Some(self.lr),
            optimizer: Optim::Sgd,
            momentum: 0.9,
            nesterov: true,
            wd: Some(self.wd),
            schedule: self.schedule.clone(),
            warmup: 0.0,
            label_smoothing: 0.0,
            workers: 2,
            seed: self.seed,
            max_steps: self.max_steps,
            init: self.factor_init.stages().1,
            bn: self.bn,
            bn_momentum: self.bn_momentum,
            bn_recalibrate: self.bn_recalibrate,
            augment: true,
            normalize: self.normalize.clone(),
            orth,
            orth_no_decay: self.orth_no_decay,
            keep_head: true,
            resume,
            output: Some(output),
            ..TrainOptions::default()
        }
    }

    /// The export stage's options: validated in tract at the source's batch, the recipe's
    /// normalisation recorded in the file.
    fn export_options(
        &self,
        model: PathBuf,
        output: PathBuf,
        forms: FormsPolicy,
        data: Option<DataSpec>,
        meta: Vec<(String, String)>,
    ) -> ExportOptions {
        ExportOptions {
            model,
            output,
            forms,
            data,
            normalize: self.normalize.clone(),
            meta,
            ..ExportOptions::default()
        }
    }
}

/// Recipe fields `--allow-recipe-change` lets a resumed run change.
const CHANGEABLE: &[&str] = &["epochs", "max_steps"];

/// `field: old -> new` for every recipe field (and the data) that differs.
fn recipe_changes(old: &RunManifest, new: &RunManifest) -> Vec<(String, String)> {
    let as_map = |m: &RunManifest| {
        let mut v = serde_json::to_value(&m.recipe).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("data".into(), m.data.to_string().into());
        }
        v.as_object().cloned().unwrap_or_default()
    };
    let (a, b) = (as_map(old), as_map(new));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("-".into(), |v| v.to_string());
            (
                k.clone(),
                format!("{k}: {} -> {}", show(a.get(k)), show(b.get(k))),
            )
        })
        .collect()
}

fn per_conv() -> FactorInit {
    FactorInit::PerConv
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
    /// How to feed compact.onnx (also in its metadata_props).
    #[serde(default)]
    pub input: Option<InputFacts>,
    /// Compute threads the training ran on, counted from the OS's thread list.
    #[serde(default)]
    pub train_threads: Option<usize>,
    /// Set when the classifier was re-sized to the data: `(node, from, to)`.
    #[serde(default)]
    pub head: Option<(String, usize, usize)>,
}

/// What a deployment must do to an image before compact.onnx sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InputFacts {
    pub name: String,
    pub layout: String,
    pub shape: String,
    pub resize: String,
    pub normalize_mean: String,
    pub normalize_std: String,
    pub classes: Vec<String>,
}

impl InputFacts {
    /// From an exported file's metadata.
    fn of(g: &crate::ir::Graph) -> InputFacts {
        let get = |k: &str| {
            g.meta
                .metadata_props
                .iter()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        InputFacts {
            name: g.inputs.first().map(|i| i.name.clone()).unwrap_or_default(),
            layout: "NCHW".into(),
            shape: get("elrt.export.input_shape"),
            resize: get(crate::data::RESIZE_KEY),
            normalize_mean: get("elrt.normalize.mean"),
            normalize_std: get("elrt.normalize.std"),
            classes: serde_json::from_str(&get(crate::data::CLASSES_KEY)).unwrap_or_default(),
        }
    }
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

/// This process's command line, shell-quoted, with `argv[0]` as `elrt` so that the report's
/// command reads the same wherever the binary is.
pub fn command_line() -> String {
    std::iter::once("elrt".to_string())
        .chain(std::env::args().skip(1))
        .map(|s| shell_quote(&s))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything a run needs, checked before the run folder is touched: flags, model, data, the
/// classifier fitted to the data, and (for a new run) the converted model, in memory.
struct Plan {
    /// Set when the default budget needed a wider layer selection.
    selection_note: Option<String>,
    synthetic: bool,
    synthetic_default: bool,
    normalize: NormSpec,
    note: Option<String>,
    /// The model as the stages use it: the file, with --input-shape applied and the classifier
    /// re-sized to the data. Written to the run folder as model.onnx when it differs from the
    /// file.
    source: crate::ir::Graph,
    source_changed: bool,
    head: Option<crate::ir::head::HeadChange>,
    manifest: RunManifest,
    /// The first stage's result, computed before anything is written (None on a resume that
    /// is past it).
    convert: Option<(crate::ir::Graph, ConvertReport)>,
}

fn positive_finite(flag: &str, v: f32) -> Result<f32> {
    if !(v.is_finite() && v > 0.0) {
        bail!("{flag} must be a positive number, got {v}");
    }
    Ok(v)
}

fn non_negative_finite(flag: &str, v: f32) -> Result<f32> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{flag} must be zero or a positive number, got {v}");
    }
    Ok(v)
}

fn plan(a: &CompressOptions) -> Result<Plan> {
    let synthetic_default = a.data.is_none();
    let spec = match &a.data {
        Some(d) => d.clone(),
        None => DataSpec::parse(EMBEDDED_DATA)?,
    };
    let data = spec.to_string();
    let synthetic = matches!(spec, DataSpec::Synthetic(_));
    let epochs = a.epochs.unwrap_or(if synthetic { 4 } else { 30 });
    let batch = a.batch.unwrap_or(if synthetic { 64 } else { 128 });
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    // The recipe's rates at its default batches, linearly less for a smaller --batch.
    let (base_lr, base_batch) = if synthetic { (0.05, 64) } else { (0.1, 128) };
    let lr = positive_finite(
        "--lr",
        a.lr.unwrap_or(default_sgd_lr(base_lr, base_batch, batch)),
    )?;
    if epochs == 0 {
        bail!("--epochs must be at least 1");
    }
    if a.max_steps == Some(0) {
        bail!("--max-steps must be at least 1");
    }
    if a.bench_threads == 0 {
        bail!("--bench-threads must be at least 1");
    }
    crate::engine::thread_count(a.threads)?;
    non_negative_finite("--orth", a.orth)?;
    non_negative_finite("--wd", a.wd)?;
    let what = || a.model.display().to_string();
    let model_bytes =
        std::fs::read(&a.model).with_context(|| format!("cannot read {}", a.model.display()))?;
    let mut source = crate::onnx::read_bytes_in(
        &model_bytes,
        Some(a.model.parent().unwrap_or(Path::new("."))),
    )
    .with_context(what)?;
    let original = source.clone();
    if let Some(s) = &a.input_shape {
        crate::ir::shape::set_image_shape(&mut source, s).with_context(what)?;
    }
    let shapes = crate::ir::shape::default_input_shapes(&source).with_context(what)?;
    let chw = match shapes.first().map(Vec::as_slice) {
        Some([_, c, h, w]) => [*c, *h, *w],
        _ => bail!(
            "{}: the model has {} input(s); elrt trains image classifiers with one [N, C, H, W] input",
            a.model.display(),
            shapes.len()
        ),
    };
    if shapes.len() != 1 {
        bail!(
            "{}: the model has {} inputs; elrt trains image classifiers with one image input",
            a.model.display(),
            shapes.len()
        );
    }
    // The whole graph must make sense at the training batch before anything else is done.
    crate::ir::shape::infer(&source, &shapes).with_context(what)?;
    let (normalize, note) = NormSpec::for_model(
        a.normalize.as_ref(),
        &a.model,
        &source.meta.metadata_props,
        chw[0],
    )?;
    // Bad data fails here, before anything is written.
    let splits = spec
        .open(
            chw,
            &crate::data::DataOptions {
                cache_mb: a.cache_mb,
            },
        )
        .with_context(|| format!("--data {data}"))?;
    super::train::check_split_sizes(&splits, batch, &data)?;
    let head = super::train::fit_head(&mut source, &shapes, &splits, a.keep_head, a.seed)
        .with_context(what)?;
    let source_changed = source != original;

    let command = a.command.clone().unwrap_or_else(command_line);
    let ranks = match &a.ranks {
        Some(r) => r.clone(),
        None => DEFAULT_RANKS.parse()?,
    };
    let recipe = Recipe {
        format: a.format,
        include_pointwise: a.include_pointwise,
        ranks: ranks.clone(),
        epochs,
        batch,
        lr,
        orth: a.orth,
        factor_init: a.factor_init,
        orth_no_decay: a.orth_no_decay,
        bn: a.bn,
        bn_momentum: a.bn_momentum,
        bn_recalibrate: a.bn_recalibrate,
        wd: a.wd,
        schedule: a.schedule.clone(),
        seed: a.seed,
        forms: a.forms,
        baseline: a.baseline,
        max_steps: a.max_steps,
        normalize: Some(normalize.clone()),
        include_gemm: a.include_gemm,
        include_first: a.include_first,
        input_shape: a.input_shape.as_ref().map(|s| {
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        }),
        keep_head: a.keep_head,
    };
    let manifest = RunManifest {
        elrt: env!("CARGO_PKG_VERSION").into(),
        model: a.model.display().to_string(),
        model_fingerprint: fingerprint(&model_bytes),
        data: spec.clone(),
        recipe,
        done: Vec::new(),
        command,
    };
    // The first stage, in memory: a rank policy that cannot be met or a layer selection that
    // factorizes nothing fails here, not after the folder is made.
    let resuming_past_convert =
        a.resume && read_manifest(&a.out).is_ok_and(|m| m.done.iter().any(|s| s == "convert"));
    let mut selection_note = None;
    let convert = if resuming_past_convert {
        None
    } else {
        // The first stage's options come from the run record, as every later stage's do.
        let mut args = manifest
            .recipe
            .convert_options(&a.model, a.out.join("factorized.onnx"));
        // --quiet covers the latency search's rounds too.
        args.quiet = a.quiet;
        // The default budget widens the layer selection where the convs alone cannot meet it
        // (models whose weight sits in 1x1 convs or the classifier), so that a first run
        // goes through; a --ranks the user gave is never widened.
        let mut result = convert_graph(source.clone(), &args);
        if a.ranks.is_none() {
            for widen in ["--include-1x1", "--include-gemm"] {
                let unreachable =
                    matches!(&result, Err(e) if format!("{e:#}").contains("unreachable"));
                if !unreachable {
                    break;
                }
                match widen {
                    "--include-1x1" if !args.include_pointwise => args.include_pointwise = true,
                    "--include-gemm" if !args.include_gemm => args.include_gemm = true,
                    _ => continue,
                }
                result = convert_graph(source.clone(), &args);
                selection_note = Some(format!(
                    "the default --ranks {DEFAULT_RANKS} needs more than the kxk convs on this model: factorizing{}{} too (give --ranks to choose yourself)",
                    if args.include_pointwise { " the 1x1 convs" } else { "" },
                    if args.include_gemm { " and the Gemm layers" } else { "" },
                ));
            }
        }
        let (g, r) = result?;
        let factorized = r.layers.iter().filter(|l| !l.ranks.is_empty()).count();
        if factorized == 0 && !a.allow_dense {
            let mut why: Vec<String> = r
                .layers
                .iter()
                .map(|l| l.status.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if why.is_empty() {
                why.push("the model has no conv or Gemm layer".into());
            }
            bail!(
                "--ranks {} factorizes no layer of {} ({}); the compact model would be the \
                 dense one: choose another --ranks or layer selection (--include-1x1, \
                 --include-gemm, --include-first), or pass --allow-dense to run anyway",
                ranks,
                a.model.display(),
                why.join("; ")
            );
        }
        Some((g, r))
    };
    Ok(Plan {
        selection_note,
        synthetic,
        synthetic_default,
        normalize,
        note,
        source,
        source_changed,
        head,
        manifest,
        convert,
    })
}

fn read_manifest(dir: &Path) -> Result<RunManifest> {
    let text = std::fs::read_to_string(dir.join("run.json")).map_err(|_| {
        anyhow!(
            "--resume: {} is not a run folder (no run.json)",
            dir.display()
        )
    })?;
    serde_json::from_str(&text).with_context(|| format!("{}: unreadable run.json", dir.display()))
}

/// An exclusive lock on a run folder (`.lock`, flock): a second run into the same folder fails
/// at once, whatever the timing; the OS releases it when the process ends, however it ends, so
/// a killed run can be resumed.
struct RunLock {
    _file: std::fs::File,
    path: PathBuf,
    created: bool,
}

impl RunLock {
    fn take(dir: &Path) -> Result<RunLock> {
        let path = dir.join(".lock");
        let created = !path.exists();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot create the run folder's lock", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a file descriptor this function owns.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r != 0 {
                bail!(
                    "{}: another elrt compress is running in this folder; wait for it, or choose another --out",
                    dir.display()
                );
            }
        }
        Ok(RunLock {
            _file: file,
            path,
            created,
        })
    }
}

/// Opens the run folder: takes its lock, checks the manifest, and for a new run writes the
/// first stage's files and then run.json. Anything failing before that leaves the folder as it
/// was (a folder this call made is removed again).
fn open_run(a: &CompressOptions, p: &mut Plan, quiet: bool) -> Result<(Run, RunLock)> {
    let created_dir = !a.out.exists();
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create the run folder", a.out.display()))?;
    let mut written: Vec<PathBuf> = Vec::new();
    let mut lock = None;
    let attempt = (|| -> Result<Run> {
        lock = Some(RunLock::take(&a.out)?);
        let manifest_path = a.out.join("run.json");
        let manifest = if a.resume {
            let mut old = read_manifest(&a.out)?;
            let channels = p.source.inputs[0]
                .shape
                .as_ref()
                .and_then(|s| s.get(1))
                .and_then(|d| match d {
                    crate::ir::Dim::Fixed(c) => Some(*c),
                    _ => None,
                })
                .unwrap_or(3);
            old.recipe
                .normalize
                .get_or_insert_with(|| NormSpec::default_for(channels));
            if old.model_fingerprint != p.manifest.model_fingerprint {
                bail!(
                    "--resume: {} was made from {} (a different model than {}); use a new --out",
                    a.out.display(),
                    old.model,
                    a.model.display()
                );
            }
            let changes = recipe_changes(&old, &p.manifest);
            let refused: Vec<&str> = changes
                .iter()
                .filter(|(k, _)| !(a.allow_recipe_change && CHANGEABLE.contains(&k.as_str())))
                .map(|(_, d)| d.as_str())
                .collect();
            if !refused.is_empty() {
                bail!(
                    "--resume: {} was made with another recipe ({}){}",
                    a.out.display(),
                    refused.join(", "),
                    if refused
                        .iter()
                        .all(|d| CHANGEABLE.iter().any(|c| d.starts_with(c)))
                    {
                        "; pass --allow-recipe-change to continue with the new value"
                    } else {
                        "; use the original flags, or a new --out"
                    }
                );
            }
            let mut m = old;
            m.recipe = p.manifest.recipe.clone();
            if !changes.is_empty() {
                // A longer run, on purpose: training continues from its checkpoint, and
                // everything after it is redone.
                m.done.retain(|s| s == "convert");
            }
            m
        } else {
            if manifest_path.exists() {
                bail!(
                    "{} already holds a run; pass --resume to continue it or choose another --out",
                    a.out.display()
                );
            }
            p.manifest.clone()
        };
        let mut run = Run {
            dir: a.out.clone(),
            manifest,
            quiet,
        };
        if let Some((g, r)) = p.convert.take() {
            // 1. convert, committed: the files first, run.json (which makes it a run) last.
            run.say("convert");
            if p.source_changed {
                let path = run.path("model.onnx");
                written.push(path.clone());
                crate::onnx::write_file(&p.source, &path)?;
            }
            let ranks: serde_json::Map<String, serde_json::Value> = r
                .layers
                .iter()
                .filter(|l| !l.ranks.is_empty())
                .map(|l| (l.layer.clone(), serde_json::json!(l.ranks)))
                .collect();
            for (name, bytes) in [
                (
                    "ranks.json",
                    serde_json::to_string_pretty(&ranks)?.into_bytes(),
                ),
                ("convert.txt", r.to_text().into_bytes()),
            ] {
                written.push(run.path(name));
                write_atomic(&run.path(name), &bytes)?;
            }
            written.push(run.path("factorized.onnx"));
            crate::onnx::write_file(&g, &run.path("factorized.onnx"))?;
            run.manifest.done.retain(|s| s != "convert");
            run.manifest.done.insert(0, "convert".into());
        }
        run.save()?;
        Ok(run)
    })();
    match attempt {
        Ok(run) => Ok((run, lock.expect("taken"))),
        Err(e) => {
            for f in &written {
                let _ = std::fs::remove_file(f);
            }
            if let Some(l) = lock {
                if l.created {
                    let _ = std::fs::remove_file(&l.path);
                }
            }
            if created_dir {
                let _ = std::fs::remove_dir_all(&a.out);
            }
            Err(e)
        }
    }
}

/// Runs the main job as `elrt compress` does: checks everything, then convert -> train (and
/// the baseline) -> export -> bench -> report in the run folder, each stage through the
/// pipeline's entry point with options derived from the run record; writes report.json and
/// report.md and returns the report.
///
/// Under mpirun, rank 0 does all of that, training with every rank; the other ranks wait until
/// rank 0 has opened the run folder (converted, or found the run to resume), then train the
/// same stages from its files (so the folder must be on a file system every rank sees) and
/// return `None`: they write nothing.
pub fn compress(a: &CompressOptions) -> Result<Option<CompressReport>> {
    match crate::dist::world() {
        Some(w) if w.rank() != 0 => follow(a, w.as_ref()).map(|_| None),
        _ => lead(a).map(Some),
    }
}

/// The training stages of a run that rank 0 leads (see [`compress`]).
fn follow(a: &CompressOptions, comm: &dyn crate::train::parallel::Collective) -> Result<()> {
    comm.barrier()?;
    let m = read_manifest(&a.out)?;
    let run = Run {
        dir: a.out.clone(),
        manifest: m,
        quiet: true,
    };
    let (recipe, spec) = (&run.manifest.recipe, &run.manifest.data);
    let options = |model: PathBuf, output: &str, orth: f32| TrainOptions {
        threads: a.threads,
        allow_recipe_change: a.allow_recipe_change,
        quiet: true,
        sync_bn: a.sync_bn,
        ..recipe.train_options(
            spec,
            model,
            run.path(output),
            orth,
            run.path(output).with_extension("ckpt").exists(),
        )
    };
    if !run.done("train") {
        train(&options(
            run.path("factorized.onnx"),
            "trained.onnx",
            recipe.orth,
        ))?;
    }
    if recipe.baseline && !run.done("baseline") {
        let source = match run.path("model.onnx") {
            p if p.exists() => p,
            _ => a.model.clone(),
        };
        train(&options(source, "baseline/trained.onnx", 0.0))?;
    }
    Ok(())
}

fn lead(a: &CompressOptions) -> Result<CompressReport> {
    let quiet = a.quiet;
    let mut p = plan(a)?;
    let (mut run, _lock) = open_run(a, &mut p, quiet)?;
    if let Some(w) = crate::dist::world() {
        w.barrier()?; // the other ranks may read the run folder now
    }
    // From here on the stages follow the run record.
    let recipe = run.manifest.recipe.clone();
    let spec = run.manifest.data.clone();
    let data = spec.to_string();
    let (epochs, batch, lr) = (recipe.epochs, recipe.batch, recipe.lr);
    let normalize = p.normalize.clone();
    if let Some(n) = &p.note {
        run.say(n);
    }
    if p.synthetic_default {
        run.say(
            "no --data: the built-in synthetic set with a short schedule (the embedded default)",
        );
    }
    if let Some(n) = &p.selection_note {
        run.say(n);
    }
    if let Some(h) = &p.head {
        run.say(&format!(
            "the data has {} classes: the classifier '{}' has {} outputs instead of {} (model.onnx)",
            h.to, h.node, h.to, h.from
        ));
    }
    run.say(&format!(
        "recipe: {} {} | {} epochs, batch {}, SGD Nesterov lr {} {} wd {} | DSO rho {}{} | factors {} | normalize {} | bn {} | seed {}",
        recipe.format,
        recipe.ranks,
        epochs,
        batch,
        lr,
        recipe.schedule,
        recipe.wd,
        recipe.orth,
        if recipe.orth_no_decay { " (no wd on U1/U2)" } else { "" },
        recipe.factor_init,
        normalize,
        match recipe.bn_momentum {
            Some(m) => format!("{}, momentum {m}", recipe.bn),
            None => recipe.bn.to_string(),
        } + &match recipe.bn_recalibrate {
            0 => String::new(),
            n => format!(", stats over {n} images"),
        },
        recipe.seed
    ));
    let mut stage_seconds = Vec::new();
    // The model every stage starts from: the file, or model.onnx when --input-shape or the
    // classifier changed it.
    let source = if run.path("model.onnx").exists() {
        run.path("model.onnx")
    } else {
        a.model.clone()
    };
    let factorized = run.path("factorized.onnx");

    // 2. train (and the baseline)
    let train_options = |model: PathBuf, output: PathBuf, orth: f32, resume: bool| TrainOptions {
        threads: a.threads,
        cache_mb: a.cache_mb,
        allow_recipe_change: a.allow_recipe_change,
        quiet,
        sync_bn: a.sync_bn,
        ..recipe.train_options(&spec, model, output, orth, resume)
    };
    let trained = run.path("trained.onnx");
    let mut compact_top1 = None;
    let mut train_threads = None;
    if !run.done("train") {
        run.say("train the factorized model from random factors");
        let t0 = Instant::now();
        let resume = run.path("trained.ckpt").exists();
        let r = train(&train_options(
            factorized.clone(),
            trained.clone(),
            recipe.orth,
            resume,
        ))?;
        if matches!(r.outcome, crate::train::run::Outcome::Interrupted) {
            bail!("training was interrupted; continue with the same command and --resume");
        }
        compact_top1 = r.history.last().map(|m| m.test_acc);
        train_threads = Some(r.threads);
        stage_seconds.push(("train".to_string(), t0.elapsed().as_secs_f64()));
        run.mark("train")?;
    }
    let baseline_trained = run.path("baseline/trained.onnx");
    let mut baseline_top1 = None;
    if recipe.baseline && !run.done("baseline") {
        run.say("train the full-rank baseline with the same recipe");
        let t0 = Instant::now();
        std::fs::create_dir_all(run.path("baseline"))?;
        let resume = run.path("baseline/trained.ckpt").exists();
        let r = train(&train_options(
            source.clone(),
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
    if recipe.baseline && baseline_top1.is_none() {
        baseline_top1 = last_acc(&run.path("baseline/trained.metrics.jsonl"));
    }

    // 3. export (validated in tract) the compact model and the original for latency
    let compact = run.path("compact.onnx");
    let original = run.path("original.onnx");
    // The compact file's accuracy is measured in tract on the whole test split (`data`), with
    // the run's normalisation: the synthetic set too, since it costs seconds and shows that the
    // written file, not only the engine's model, classifies.
    let export_options = |model: PathBuf,
                          output: PathBuf,
                          forms: FormsPolicy,
                          data: Option<DataSpec>,
                          meta: Vec<(String, String)>,
                          quiet: bool| ExportOptions {
        threads: a.bench_threads,
        cache_mb: a.cache_mb,
        quiet,
        ..recipe.export_options(model, output, forms, data, meta)
    };
    if !run.done("export") {
        run.say(
            "export the compact model (BN folded, forms timed in tract), validate it in tract and measure its top-1 there",
        );
        let t0 = Instant::now();
        let mut meta = vec![
            ("elrt.data".to_string(), data.clone()),
            ("elrt.epochs".to_string(), epochs.to_string()),
            ("elrt.orth".to_string(), recipe.orth.to_string()),
            (
                "elrt.factor_init".to_string(),
                recipe.factor_init.to_string(),
            ),
        ];
        // elrt.accuracy.top1 is tract's, measured on this file by the export; the engine's
        // figure for the trained model sits beside it.
        if let Some(t) = compact_top1 {
            meta.push(("elrt.accuracy.engine_top1".to_string(), format!("{t:.4}")));
        }
        let s: ExportSummary = export(&export_options(
            trained.clone(),
            compact.clone(),
            recipe.forms,
            Some(spec.clone()),
            meta,
            quiet,
        ))?;
        write_atomic(
            &run.path("export.json"),
            serde_json::to_string_pretty(&s)?.as_bytes(),
        )?;
        // The original architecture, exported the same way (BN folded, fixed shapes), for the
        // latency side of the comparison: the trained baseline when there is one, else the
        // model as given. Its layers stay as the source has them: the dense forms would merge
        // two consecutive linear 1x1 convs of the source (EfficientNet-B0's 1152 -> 320
        // projection and 320 -> 1280 head: 0.78M weights become 1.47M), and the report's
        // "original" row would no longer count the user's model.
        run.say("export the original architecture the same way, for the latency comparison");
        let src = if recipe.baseline {
            baseline_trained.clone()
        } else {
            source.clone()
        };
        export(&export_options(
            src,
            original.clone(),
            FormsPolicy::Factorized,
            None,
            vec![],
            true,
        ))?;
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
    // The forms written and how to feed the file, as the export recorded them in it (also for
    // a resumed run).
    let compact_graph = crate::onnx::read_file(&compact)?;
    let forms_text = compact_graph
        .meta
        .metadata_props
        .iter()
        .find(|(k, _)| k == "elrt.export.forms")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let input = InputFacts::of(&compact_graph);

    // 4. bench
    run.say("benchmark original and compact in tract (batch 1, interleaved)");
    let t0 = Instant::now();
    let b = bench(&BenchOptions {
        files: vec![original.clone(), compact.clone()],
        threads: a.bench_threads,
        quiet: run.quiet,
        ..BenchOptions::default()
    })?;
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
        synthetic: p.synthetic,
        command: run.manifest.command.clone(),
        format: recipe.format.to_string(),
        ranks: recipe.ranks.to_string(),
        epochs,
        orth: recipe.orth,
        normalize: normalize.to_string(),
        original: facts(&b.rows[0], baseline_top1, None),
        compact: facts(&b.rows[1], compact_top1, tract_top1),
        baseline_top1,
        tract_images,
        tract_top1_agreement,
        forms: forms_text,
        stage_seconds,
        files,
        input: Some(input),
        train_threads,
        head: p.head.as_ref().map(|h| (h.node.clone(), h.from, h.to)),
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
    if let Some((node, from, to)) = &r.head {
        s += &format!(
            "\nThe data has {to} classes: the classifier `{node}` was re-sized from {from} outputs \
             (model.onnx in the run folder is the model as trained from).\n"
        );
    }
    if let Some(i) = &r.input {
        s += &format!(
            "\n## Feeding compact.onnx\n\n- input `{}`, layout {}, shape {}\n- resize: {}\n\
             - normalisation: (x / 255 - mean) / std per channel, mean {}, std {}\n\
             - classes (label order): {}\n",
            i.name,
            i.layout,
            i.shape,
            if i.resize.is_empty() { "-" } else { &i.resize },
            i.normalize_mean,
            i.normalize_std,
            i.classes.join(", ")
        );
    }
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
