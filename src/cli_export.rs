//! `elrt export` and `elrt bench`: the deployment file and what it gains, in tract.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::bench::{bench, BenchReport};
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::{DataSpec, NormSpec};
use crate::export::validate::{Validation, Validator};
use crate::export::{export, forms_summary, ExportOptions, ExportReport, FormsPolicy};
use crate::inspect::group_digits;
use crate::runtime::timing::TimingOptions;
use crate::runtime::TractModel;

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The trained ONNX model (from `elrt train`).
    pub model: PathBuf,
    /// The deployment ONNX file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Batch size fixed in the file. Default: the source model's convention, i.e. the batch
    /// its file fixes (PyTorch's exporters fix 1 unless given dynamic axes), or a symbolic batch
    /// when its file has one.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Declare the batch dimension symbolic (N) whatever the source did; the other dimensions
    /// stay fixed.
    #[arg(long)]
    pub dynamic_batch: bool,
    /// Image shape when the file's own input shape leaves dimensions unknown.
    #[arg(long, value_name = "C,H,W")]
    pub input_shape: Option<String>,
    /// ONNX opset to write (default 13, or the lowest above it the model's ops need).
    #[arg(long)]
    pub opset: Option<i64>,
    /// fastest (timed in tract on this machine) | factorized | dense
    #[arg(long, default_value = "fastest")]
    pub forms: String,
    /// Threads the deployment runs with (tract times the forms with this many).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also check on real test images and record the measured top-1 accuracy in the file:
    /// synthetic | cifar10:PATH | cifar100:PATH | folder:PATH.
    #[arg(long)]
    pub data: Option<String>,
    /// Input normalisation, recorded in the file and used for the --data accuracy: cifar10 |
    /// imagenet | none | M1,M2,M3/S1,S2,S3 (mean/std of 0..1 pixels). Default: what the model
    /// file records (`elrt train` writes it), else cifar10.
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// Test images used for the accuracy (0 = the whole test split).
    #[arg(long, default_value_t = 0)]
    pub data_images: usize,
    /// Random batches compared between the engine and tract.
    #[arg(long, default_value_t = 4)]
    pub check_batches: usize,
    /// Largest relative difference allowed between tract's and the engine's outputs.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Extra metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Print the export and validation report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress messages.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct DataCheck {
    pub data: String,
    /// The input normalisation the images got (`--normalize`).
    pub normalize: NormSpec,
    pub images: usize,
    /// Top-1 accuracy of the exported file, run in tract.
    pub top1: f64,
    /// How often tract's top-1 class equals the engine's (trained model).
    pub top1_agreement: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportSummary {
    pub model: String,
    pub output: String,
    pub export: ExportReport,
    pub validation: Validation,
    pub data_check: Option<DataCheck>,
    /// The input normalisation recorded in the file (`elrt.normalize*` metadata).
    pub normalize: NormSpec,
}

/// Sets `key` in `props`, replacing an earlier value.
fn set_prop(props: &mut Vec<(String, String)>, key: &str, value: String) {
    props.retain(|(k, _)| k != key);
    props.push((key.to_string(), value));
}

/// The input channel count the file declares, when it is fixed (or given by --input-shape).
fn declared_channels(graph: &crate::ir::Graph, image_shape: Option<&[usize]>) -> Option<usize> {
    if let Some(s) = image_shape {
        return s.first().copied();
    }
    match graph.inputs.first()?.shape.as_ref()?.get(1)? {
        crate::ir::Dim::Fixed(c) => Some(*c),
        _ => None,
    }
}

fn parse_meta(v: &[String]) -> Result<Vec<(String, String)>> {
    v.iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--meta '{kv}': expected KEY=VALUE"))
        })
        .collect()
}

/// Opsets `--opset` may ask for: those both tract and onnxruntime load, and that elrt writes
/// every op of a classifier in (a file at opset 5 or 99 was written and then refused by
/// onnxruntime).
pub const EXPORT_OPSETS: std::ops::RangeInclusive<i64> = 9..=21;

/// Exports as `elrt export` does, on a pool of `--threads` compute threads (the engine's side of
/// the validation).
pub fn run_export(a: &ExportArgs) -> Result<ExportSummary> {
    if a.output.extension().is_none_or(|e| e != "onnx") {
        bail!(
            "-o {}: the output must be an .onnx file",
            a.output.display()
        );
    }
    if a.batch == Some(0) || a.threads == 0 {
        bail!("--batch and --threads must be at least 1");
    }
    if !(a.tolerance.is_finite() && a.tolerance >= 0.0) {
        bail!(
            "--tolerance must be a finite number >= 0, got {}",
            a.tolerance
        );
    }
    if let Some(o) = a.opset.filter(|o| !EXPORT_OPSETS.contains(o)) {
        bail!(
            "--opset {o}: elrt writes opsets {} to {} (those tract and onnxruntime load)",
            EXPORT_OPSETS.start(),
            EXPORT_OPSETS.end()
        );
    }
    crate::engine::with_threads(a.threads, || export_on_pool(a))?
}

fn export_on_pool(a: &ExportArgs) -> Result<ExportSummary> {
    let forms: FormsPolicy = a.forms.parse()?;
    let image_shape = match &a.input_shape {
        Some(s) => {
            let v = crate::inspect::parse_shape(s)?;
            if v.len() != 3 {
                bail!("--input-shape '{s}': expected C,H,W");
            }
            Some(v)
        }
        None => None,
    };
    let spec = a.data.as_deref().map(DataSpec::parse).transpose()?;
    let graph = crate::onnx::read_file(&a.model)?;
    // A --normalize that cannot fit the model fails before the (timed) export.
    if let Some(c) = declared_channels(&graph, image_shape.as_deref()) {
        NormSpec::for_model(
            a.normalize.as_ref(),
            &a.model,
            &graph.meta.metadata_props,
            c,
        )?;
    }
    let opts = ExportOptions {
        batch: a.batch,
        dynamic_batch: a.dynamic_batch,
        image_shape,
        opset: a.opset,
        forms,
        threads: a.threads,
        metadata: parse_meta(&a.meta)?,
    };
    let quiet = a.quiet || a.json;
    let say = |m: &str| {
        if !quiet {
            eprintln!("{m}");
        }
    };
    let (mut out, report) =
        export(graph.clone(), &opts, say).with_context(|| a.model.display().to_string())?;
    let channels = report.input_shape[1];
    let (normalize, note) = NormSpec::for_model(
        a.normalize.as_ref(),
        &a.model,
        &graph.meta.metadata_props,
        channels,
    )?;
    // The deployment file states how its inputs are to be normalised.
    normalize.record(&mut out.meta.metadata_props, channels)?;
    set_prop(
        &mut out.meta.metadata_props,
        "elrt.export.source",
        a.model.display().to_string(),
    );
    let bytes = crate::onnx::write_bytes(&out)?;
    say(&format!(
        "validating in tract: {} random batches of {:?}",
        a.check_batches, report.input_shape
    ));
    let mut v = Validator::new(graph, out.clone(), bytes, &report.input_shape, a.tolerance)
        .with_context(|| format!("{}: validation", a.output.display()))?;
    v.check_random(a.check_batches, 0x7661_6c69)
        .with_context(|| format!("{}: validation", a.output.display()))?;
    let mut data_check = None;
    if let Some(spec) = spec {
        let shape = v.input_shape().to_vec();
        if let Some(n) = &note {
            say(n);
        }
        say(&format!(
            "measuring top-1 in tract on {} (normalisation {normalize})",
            a.data.as_deref().unwrap_or("")
        ));
        let splits = spec.load([shape[1], shape[2], shape[3]])?;
        let mut lcfg = LoaderConfig::eval(shape[0]);
        lcfg.normalize = Some(normalize.resolve(channels)?);
        let loader = Loader::new(Arc::new(splits.test), lcfg)?;
        let (mut n, mut correct) = (0usize, 0usize);
        for b in loader.epoch(0) {
            if b.labels.len() != shape[0] {
                break; // the file's batch is fixed; a short last batch is skipped
            }
            let x = b.images.into_dyn();
            let pred = v.check_images_pred(&x)?;
            correct += pred.iter().zip(&b.labels).filter(|(p, l)| p == l).count();
            n += b.labels.len();
            if a.data_images > 0 && n >= a.data_images {
                break;
            }
        }
        if n == 0 {
            bail!(
                "the test split has fewer images than one batch of {}",
                shape[0]
            );
        }
        let top1 = correct as f64 / n as f64;
        let rep = v.report();
        let props = &mut out.meta.metadata_props;
        set_prop(props, "elrt.accuracy.top1", format!("{top1:.4}"));
        set_prop(
            props,
            "elrt.accuracy.data",
            format!(
                "{} ({n} test images, tract, normalisation {normalize})",
                a.data.as_deref().unwrap_or("")
            ),
        );
        data_check = Some(DataCheck {
            data: a.data.clone().unwrap_or_default(),
            normalize: normalize.clone(),
            images: n,
            top1,
            top1_agreement: rep.data_top1_agreement.unwrap_or(0.0),
        });
    }
    crate::onnx::write_file(&out, &a.output)?;
    Ok(ExportSummary {
        model: a.model.display().to_string(),
        output: a.output.display().to_string(),
        export: report,
        validation: v.report(),
        data_check,
        normalize,
    })
}

pub fn export_cmd(a: ExportArgs) -> Result<()> {
    let s = run_export(&a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let e = &s.export;
    println!(
        "wrote {}: input {:?}{}, opset {}, {} BN folded{}, forms {}",
        s.output,
        e.input_shape,
        if e.dynamic_batch {
            " (batch symbolic)"
        } else {
            ""
        },
        e.opset,
        e.bn_folded,
        if e.bn_kept.is_empty() {
            String::new()
        } else {
            format!(" ({} kept)", e.bn_kept.len())
        },
        forms_summary(&e.layers)
    );
    if !e.whole_model_p50_ms.is_empty() {
        let t: Vec<String> = e
            .whole_model_p50_ms
            .iter()
            .map(|(k, v)| format!("{k} {v:.3} ms"))
            .collect();
        println!(
            "whole model in tract ({} thread(s)): {}",
            a.threads,
            t.join(", ")
        );
    }
    println!(
        "params {}, MACs {} per image, {} nodes",
        group_digits(e.params),
        group_digits(e.macs),
        e.nodes
    );
    println!(
        "tract agrees with the engine: max relative difference {:.2e} over {} random batches (limit {:.0e})",
        s.validation.max_rel_diff, s.validation.random_batches, s.validation.tolerance
    );
    if let Some(d) = &s.data_check {
        println!(
            "{}: top-1 {:.2}% in tract on {} test images (normalisation {}); top-1 class agrees with the engine on {:.2}%, outputs within {:.1e} relative (limit {:.0e})",
            d.data,
            100.0 * d.top1,
            d.images,
            d.normalize,
            100.0 * d.top1_agreement,
            s.validation.data_max_rel_diff.unwrap_or(0.0),
            s.validation.tolerance.max(crate::export::validate::DATA_TOLERANCE)
        );
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// ONNX files to compare; the first is the baseline for speedup and MAC ratio.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Batch sizes (comma-separated).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Threads tract uses (a private pool of exactly this size; 1 = single-threaded).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Untimed runs of each file first.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Timed runs of each file (at least).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Keep timing until each file has at least this many seconds measured.
    #[arg(long, default_value_t = 1.0)]
    pub min_seconds: f64,
    /// Also print tract's time per node (optimised model, first batch size), per file.
    #[arg(long)]
    pub profile: bool,
    /// Print the rows as JSON (with --profile: {"rows", "profile"}).
    #[arg(long)]
    pub json: bool,
}

pub fn run_bench(a: &BenchArgs, quiet: bool) -> Result<BenchReport> {
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
    bench(&a.files, &a.batch, a.threads, &timing, |m| {
        if !quiet {
            eprintln!("{m}");
        }
    })
}

pub fn bench_cmd(a: BenchArgs) -> Result<()> {
    let r = run_bench(&a, a.json)?;
    if !a.json {
        print!("{}", r.to_text());
    }
    if a.profile {
        let mut all = Vec::new();
        for f in &a.files {
            let mut shape = vec![a.batch[0]];
            shape.extend(crate::bench::image_shape(f)?);
            let mut m = TractModel::from_path(f, &shape, a.threads)?;
            let p = crate::runtime::profile(&mut m, 200)?;
            if !a.json {
                let sum: f64 = p.iter().map(|r| r.2).sum();
                println!(
                    "\n{} (batch {}): time per node, {:.3} ms in all",
                    f.display(),
                    shape[0],
                    sum
                );
                for (n, op, t) in &p {
                    println!(
                        "  {:>8.1} us  {:>5.1}%  {:<24} {}",
                        t * 1e3,
                        100.0 * t / sum,
                        op,
                        n
                    );
                }
            }
            all.push(serde_json::json!({"file": f.display().to_string(), "nodes": p.iter().map(|(n, op, t)| serde_json::json!({"node": n, "op": op, "ms": t})).collect::<Vec<_>>()}));
        }
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"rows": r.rows, "profile": all}))?
            );
            return Ok(());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r.rows)?);
    }
    Ok(())
}

/// Loads a file in tract for one input shape (used by tests and the compress report).
pub fn tract_load(path: &std::path::Path, shape: &[usize]) -> Result<TractModel> {
    TractModel::from_path(path, shape, 1)
}
