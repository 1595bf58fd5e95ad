//! The export stage: a trained model -> a deployment ONNX file (BN folded, the chosen forms,
//! fixed shapes), validated against the engine in tract and, with data, its top-1 accuracy
//! measured there and recorded in the file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::data::loader::{Loader, LoaderConfig};
use crate::data::{DataSpec, NormSpec};
use crate::export::validate::{Validation, Validator};
use crate::export::{export as export_graph, forms_summary, ExportReport, FormsPolicy};
use crate::inspect::group_digits;

/// Opsets [`ExportOptions::opset`] may ask for: those both tract and onnxruntime load, and that
/// elrt writes every op of a classifier in (a file at opset 5 or 99 was written and then refused
/// by onnxruntime).
pub const EXPORT_OPSETS: std::ops::RangeInclusive<i64> = 9..=21;

/// What [`export`] writes and checks; the defaults are `elrt export`'s.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The trained ONNX model.
    pub model: PathBuf,
    /// The deployment ONNX file to write.
    pub output: PathBuf,
    /// Batch size fixed in the file; `None` keeps the source model's convention.
    pub batch: Option<usize>,
    /// Declare the batch dimension symbolic whatever the source did.
    pub dynamic_batch: bool,
    /// `[C, H, W]` when the file's own input shape leaves dimensions unknown.
    pub input_shape: Option<Vec<usize>>,
    /// ONNX opset to write (`None`: 13, or the source file's when the model's ops need more); within
    /// [`EXPORT_OPSETS`].
    pub opset: Option<i64>,
    pub forms: FormsPolicy,
    /// Threads the deployment runs with (tract times the forms with this many; the engine's
    /// side of the validation runs on a pool of this size).
    pub threads: usize,
    /// Also measure the file's top-1 on this data's test split, in tract.
    pub data: Option<DataSpec>,
    /// Budget for decoded images, MiB: a `data` folder whose test split is larger at the input
    /// size streams ([`crate::data::source`]).
    pub cache_mb: usize,
    /// Input normalisation recorded in the file and used for the accuracy (`None`: what the
    /// model file records, else the default for its channels).
    pub normalize: Option<NormSpec>,
    /// Test images used for the accuracy (0 = the whole test split).
    pub data_images: usize,
    /// Random batches compared between the engine and tract.
    pub check_batches: usize,
    /// Largest relative difference allowed between tract's and the engine's outputs.
    pub tolerance: f64,
    /// Extra `metadata_props`.
    pub meta: Vec<(String, String)>,
    /// No progress messages on stderr.
    pub quiet: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            model: PathBuf::new(),
            output: PathBuf::new(),
            batch: None,
            dynamic_batch: false,
            input_shape: None,
            opset: None,
            forms: FormsPolicy::Fastest,
            threads: 1,
            data: None,
            cache_mb: crate::data::DEFAULT_CACHE_MB,
            normalize: None,
            data_images: 0,
            check_batches: 4,
            tolerance: 1e-4,
            meta: Vec::new(),
            quiet: false,
        }
    }
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

/// Exports as `elrt export` does, on a pool of `threads` compute threads (the engine's side of
/// the validation), and writes the file.
pub fn export(a: &ExportOptions) -> Result<ExportSummary> {
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
    if let Some(s) = a.input_shape.as_ref().filter(|s| s.len() != 3) {
        bail!(
            "--input-shape '{}': expected C,H,W",
            s.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    crate::engine::with_threads(a.threads, || export_on_pool(a))?
}

impl ExportOptions {
    /// How the `data` test split is loaded (`cache_mb`).
    pub fn data_options(&self) -> crate::data::DataOptions {
        crate::data::DataOptions {
            cache_mb: self.cache_mb,
        }
    }
}

fn export_on_pool(a: &ExportOptions) -> Result<ExportSummary> {
    let image_shape = a.input_shape.clone();
    let data_text = a.data.as_ref().map(|d| d.to_string()).unwrap_or_default();
    let graph = crate::onnx::read_file(&a.model)?;
    // The --data check prepares images as the model was trained (a streamed folder's centre
    // crops, or resizing).
    let prep = crate::data::source::prep_of_model(&graph.meta.metadata_props);
    // A --normalize that cannot fit the model fails before the (timed) export.
    if let Some(c) = declared_channels(&graph, image_shape.as_deref()) {
        NormSpec::for_model(
            a.normalize.as_ref(),
            &a.model,
            &graph.meta.metadata_props,
            c,
        )?;
    }
    let opts = crate::export::ExportOptions {
        batch: a.batch,
        dynamic_batch: a.dynamic_batch,
        image_shape,
        opset: a.opset,
        forms: a.forms,
        threads: a.threads,
        metadata: a.meta.clone(),
    };
    let say = |m: &str| {
        if !a.quiet {
            eprintln!("{m}");
        }
    };
    let (mut out, report) =
        export_graph(graph.clone(), &opts, say).with_context(|| a.model.display().to_string())?;
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
    if let Some(spec) = &a.data {
        let shape = v.input_shape().to_vec();
        if let Some(n) = &note {
            say(n);
        }
        say(&format!(
            "measuring top-1 in tract on {data_text} (normalisation {normalize})"
        ));
        let test = spec.open_test([shape[1], shape[2], shape[3]], &a.data_options(), prep)?;
        let mut lcfg = LoaderConfig::eval(shape[0]);
        lcfg.normalize = Some(normalize.resolve(channels)?);
        let loader = Loader::new(test, lcfg)?;
        let (mut n, mut correct) = (0usize, 0usize);
        let mut batches = loader.epoch(0);
        while let Some(b) = batches.next_batch()? {
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
            format!("{data_text} ({n} test images, tract, normalisation {normalize})"),
        );
        data_check = Some(DataCheck {
            data: data_text.clone(),
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

impl ExportSummary {
    /// The lines `elrt export` prints; `threads` is the deployment thread count the forms were
    /// timed with.
    pub fn to_text(&self, threads: usize) -> String {
        let s = self;
        let e = &s.export;
        let mut out = format!(
            "wrote {}: input {:?}{}, opset {}, {} BN folded{}{}, forms {}\n",
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
            [
                (e.prelu_split, "PRelu as Relu + Mul"),
                (e.elu_split, "Elu as Relu + Exp")
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!(", {n} {what}"))
            .collect::<String>(),
            forms_summary(&e.layers)
        );
        if !e.whole_model_p50_ms.is_empty() {
            let t: Vec<String> = e
                .whole_model_p50_ms
                .iter()
                .map(|(k, v)| format!("{k} {v:.3} ms"))
                .collect();
            out += &format!(
                "whole model in tract ({} thread(s)): {}\n",
                threads,
                t.join(", ")
            );
        }
        out += &format!(
            "params {}, MACs {} per image, {} nodes\n",
            group_digits(e.params),
            group_digits(e.macs),
            e.nodes
        );
        out += &format!(
            "tract agrees with the engine: max relative difference {:.2e} over {} random batches (limit {:.0e})\n",
            s.validation.max_rel_diff, s.validation.random_batches, s.validation.tolerance
        );
        if let Some(d) = &s.data_check {
            out += &format!(
                "{}: top-1 {:.2}% in tract on {} test images (normalisation {}); top-1 class agrees with the engine on {:.2}%, outputs within {:.1e} relative (limit {:.0e})\n",
                d.data,
                100.0 * d.top1,
                d.images,
                d.normalize,
                100.0 * d.top1_agreement,
                s.validation.data_max_rel_diff.unwrap_or(0.0),
                s.validation.tolerance.max(crate::export::validate::DATA_TOLERANCE)
            );
        }
        out
    }
}
