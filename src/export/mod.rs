//! Export: a trained graph -> a deployment ONNX file.
//!
//! Passes, in order: simplify for the deployment input shape (constants folded, Dropout and
//! Identity gone), fold every BatchNormalization into the conv before it ([`fold_bn`]), put
//! each factorized layer in its chosen form ([`forms`], [`choose`]), fix the declared input
//! and output shapes, write at opset 13 (or the source's when the graph's ops need more), and record where
//! the file came from in `metadata_props`.

pub mod act_split;
pub mod choose;
pub mod fold_bn;
pub mod forms;
pub mod rank_align;
pub mod validate;

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::ir::fold::{simplify, FoldOptions};
use crate::ir::shape::{default_input_shapes, norm_axis, Facts};
use crate::ir::{Dim, Graph, Op};
use crate::runtime::timing::{time_interleaved, TimingOptions};
use crate::runtime::TractModel;
use forms::{apply, find_chains, ChainKind, Form};

/// `metadata_props` key of an exported file: the name of its (single) graph input.
pub const INPUT_NAME_KEY: &str = "elrt.input.name";
/// `metadata_props` key of an exported file: the input's layout, `NCHW`.
pub const INPUT_LAYOUT_KEY: &str = "elrt.input.layout";
/// `metadata_props` key of an exported file: what its output holds per image, `logits`, or
/// `probabilities` / `log-probabilities` where the model ends in a Softmax / LogSoftmax over the
/// classes (kept from the source file).
pub const OUTPUT_KEY: &str = "elrt.output";

/// Which form each factorized layer is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FormsPolicy {
    /// Measure in tract and keep the fastest (per layer, then checked on the whole model).
    Fastest,
    /// Keep the factors as trained (fewest parameters).
    Factorized,
    /// Rebuild every full kernel (the architecture before factorization).
    Dense,
}

impl FromStr for FormsPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "fastest" => FormsPolicy::Fastest,
            "factorized" => FormsPolicy::Factorized,
            "dense" => FormsPolicy::Dense,
            o => bail!("--forms '{o}': expected fastest, factorized or dense"),
        })
    }
}

impl std::fmt::Display for FormsPolicy {
    /// The `--forms` form: parses back to the same value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FormsPolicy::Fastest => "fastest",
            FormsPolicy::Factorized => "factorized",
            FormsPolicy::Dense => "dense",
        })
    }
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Batch size fixed in the file; `None` keeps the source model's convention
    /// ([`crate::ir::batch::source_batch`]): its fixed batch, or a symbolic one.
    pub batch: Option<usize>,
    /// Declare the batch symbolic (`N`) whatever the source did; the other dimensions stay
    /// fixed.
    pub dynamic_batch: bool,
    /// `[C, H, W]` when the file's own input shape has unknown dimensions.
    pub image_shape: Option<Vec<usize>>,
    /// Target opset; `None` = 13, or the source file's opset when the graph's ops need more
    /// (LayerNormalization 17, Gelu 20).
    pub opset: Option<i64>,
    pub forms: FormsPolicy,
    /// Threads tract uses while timing forms (the deployment's thread count).
    pub threads: usize,
    /// Extra `metadata_props` (accuracy, command, ...), added after elrt's own.
    pub metadata: Vec<(String, String)>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            batch: None,
            dynamic_batch: false,
            image_shape: None,
            opset: None,
            forms: FormsPolicy::Fastest,
            threads: 1,
            metadata: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerForm {
    pub layer: String,
    pub kind: ChainKind,
    pub form: Form,
    /// Median ms of each exact form of the layer alone (with `--forms fastest`).
    pub p50_ms: std::collections::BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub input_shape: Vec<usize>,
    pub dynamic_batch: bool,
    pub opset: i64,
    pub bn_folded: usize,
    pub bn_kept: Vec<String>,
    /// PRelu nodes written as Relu + Sub + Mul + Add ([`act_split`]).
    pub prelu_split: usize,
    /// Elu nodes written as Relu + Sub + Exp + Mul + Sub + Add ([`act_split`]).
    pub elu_split: usize,
    pub forms_policy: FormsPolicy,
    pub layers: Vec<LayerForm>,
    /// With `--forms fastest`: whole-model medians (ms) of the candidates compared.
    pub whole_model_p50_ms: std::collections::BTreeMap<String, f64>,
    pub params: u64,
    pub macs: u64,
    pub nodes: usize,
}

impl ExportOptions {
    /// The batch the file is checked and declared at, and whether it is declared symbolic:
    /// `--batch N` fixes N, `--dynamic-batch` declares it symbolic, and neither keeps the
    /// source's convention (a fixed batch, or a symbolic one checked at 1).
    pub fn batch_for(&self, g: &Graph) -> (usize, bool) {
        let source = crate::ir::batch::source_batch(g);
        match (self.batch, self.dynamic_batch) {
            (b, true) => (b.unwrap_or(1), true),
            (Some(b), false) => (b, false),
            (None, false) => (source.unwrap_or(1), source.is_none()),
        }
    }
}

/// The deployment input shape: `[batch, C, H, W]`.
pub fn input_shape(g: &Graph, opts: &ExportOptions) -> Result<Vec<usize>> {
    if g.inputs.len() != 1 {
        bail!(
            "the model has {} inputs; elrt exports image classifiers with one input",
            g.inputs.len()
        );
    }
    let mut s = match &opts.image_shape {
        Some(chw) => {
            let mut s = vec![1];
            s.extend(chw);
            s
        }
        None => default_input_shapes(g)
            .context("the input shape cannot be fixed; give --input-shape C,H,W")?
            .remove(0),
    };
    s[0] = opts.batch_for(g).0;
    Ok(s)
}

/// Rewrites every chain into `form_of(chain)` (or the nearest exact form); returns the form
/// each layer got.
fn rewrite_all(
    g: &mut Graph,
    form_of: &dyn Fn(&forms::Chain) -> Form,
) -> Result<std::collections::HashMap<String, Form>> {
    let mut applied = std::collections::HashMap::new();
    for c in find_chains(g) {
        let f = form_of(&c);
        let avail = c.forms(g);
        let f = if avail.contains(&f) {
            f
        } else if f == Form::Dense && avail.contains(&Form::MergeLast) {
            // Dense asked where a bias before a padded conv blocks it: the nearest exact merge.
            Form::MergeLast
        } else {
            Form::Factorized
        };
        apply(g, &c, f)?;
        applied.insert(c.layer.clone(), f);
    }
    Ok(applied)
}

/// Bytes for tract: opset 13 when the ops allow it, else the graph's own.
fn bytes_for_tract(g: &Graph) -> Result<Vec<u8>> {
    let mut c = g.clone();
    c.opset = 13;
    crate::onnx::write_bytes(&c).or_else(|_| crate::onnx::write_bytes(g))
}

fn refacts(g: &mut Graph, shape: &[usize]) -> Result<Facts> {
    simplify(
        g,
        &[shape.to_vec()],
        FoldOptions {
            remove_dropout: true,
        },
    )
}

/// Runs the export passes on a trained graph (as read from its file).
pub fn export(
    mut g: Graph,
    opts: &ExportOptions,
    mut progress: impl FnMut(&str),
) -> Result<(Graph, ExportReport)> {
    check_finite(&g)?;
    let shape = input_shape(&g, opts)?;
    let dynamic_batch = opts.batch_for(&g).1;
    refacts(&mut g, &shape)?;
    let fold = fold_bn::fold_batchnorm(&mut g)?;
    let (prelu_split, elu_split) = act_split::split_activations(&mut g);
    let mut facts = refacts(&mut g, &shape)?;
    if rank_align::align_constant_ranks(&mut g, &facts) > 0 {
        facts = refacts(&mut g, &shape)?;
    }
    let chains = find_chains(&g);
    let mut layers = Vec::new();
    let mut whole = std::collections::BTreeMap::new();
    match opts.forms {
        FormsPolicy::Factorized => {
            for c in &chains {
                layers.push(LayerForm {
                    layer: c.layer.clone(),
                    kind: c.kind,
                    form: Form::Factorized,
                    p50_ms: Default::default(),
                });
            }
        }
        FormsPolicy::Dense => {
            let applied = rewrite_all(&mut g, &|_| Form::Dense)?;
            for c in &chains {
                layers.push(LayerForm {
                    layer: c.layer.clone(),
                    kind: c.kind,
                    form: applied[&c.layer],
                    p50_ms: Default::default(),
                });
            }
        }
        FormsPolicy::Fastest if chains.is_empty() => {}
        FormsPolicy::Fastest => {
            let mut chosen = std::collections::HashMap::new();
            for (k, c) in chains.iter().enumerate() {
                progress(&format!(
                    "timing forms of {} ({}/{})",
                    c.layer,
                    k + 1,
                    chains.len()
                ));
                let t = choose::time_forms(&g, &facts, c, opts.threads)?;
                chosen.insert(c.layer.clone(), t.chosen);
                layers.push(LayerForm {
                    layer: c.layer.clone(),
                    kind: c.kind,
                    form: t.chosen,
                    p50_ms: t.p50_ms,
                });
            }
            // Whole-model check: the per-layer choice against the uniform ones.
            progress("timing the whole model: per-layer choice, factorized, dense");
            let mut per_layer = g.clone();
            let a1 = rewrite_all(&mut per_layer, &|c| chosen[&c.layer])?;
            let mut dense = g.clone();
            let a3 = rewrite_all(&mut dense, &|_| Form::Dense)?;
            let a2 = chosen
                .keys()
                .map(|k| (k.clone(), Form::Factorized))
                .collect();
            let candidates = [
                ("per-layer", per_layer, a1),
                ("factorized", g.clone(), a2),
                ("dense", dense, a3),
            ];
            // A candidate tract cannot optimise is left out, not fatal: tract 0.23's axis pass
            // fails on some merged forms once a plane is 1x1 (resnet18 at 32x32 input: "Conv:
            // Bias should be scalar or a vector with one value per output channel"), while the
            // other forms of the same layers load.
            let mut models = Vec::new();
            let mut kept = Vec::new();
            let mut refused = Vec::new();
            for (k, (name, cand, _)) in candidates.iter().enumerate() {
                match TractModel::from_bytes(&bytes_for_tract(cand)?, &shape, opts.threads) {
                    Ok(m) => {
                        models.push(m);
                        kept.push(k);
                    }
                    Err(e) => {
                        progress(&format!("left out the {name} form: {e:#}"));
                        refused.push(format!("{name}: {e:#}"));
                    }
                }
            }
            if models.is_empty() {
                bail!(
                    "tract cannot run any form of the model: {}",
                    refused.join("; ")
                );
            }
            let times = time_interleaved(
                &mut models,
                &TimingOptions {
                    warmup: 5,
                    runs: 60,
                    chunk: 3,
                    min_time: std::time::Duration::from_millis(300),
                },
            )?;
            let mut scored = Vec::new();
            for (&k, t) in kept.iter().zip(&times) {
                whole.insert(candidates[k].0.to_string(), t.p50());
                scored.push((t.p50(), choose::weight_count(&candidates[k].1)));
            }
            // The fewest weights among the candidates tied with the fastest.
            let best = kept[choose::pick(&scored)];
            let (_, graph, applied) = candidates.into_iter().nth(best).expect("three candidates");
            for l in &mut layers {
                l.form = applied[&l.layer];
            }
            g = graph;
        }
    }
    let facts = refacts(&mut g, &shape)?;
    // Declared shapes: fixed, or a symbolic batch.
    let batch_dim = |d: usize| {
        if dynamic_batch {
            Dim::Sym("N".into())
        } else {
            Dim::Fixed(d)
        }
    };
    for vi in g.inputs.iter_mut().chain(g.outputs.iter_mut()) {
        if let Some(f) = facts.get(&vi.name) {
            let mut dims: Vec<Dim> = f.shape.iter().map(|&d| Dim::Fixed(d)).collect();
            if let Some(d0) = dims.first_mut() {
                *d0 = batch_dim(f.shape[0]);
            }
            vi.shape = Some(dims);
        }
    }
    // Opset: 13 unless asked otherwise or the ops need more.
    let original = g.opset;
    g.opset = opts.opset.unwrap_or(13);
    if let Err(e) = crate::onnx::write::to_model(&g) {
        if opts.opset.is_some() {
            return Err(e.context(format!("cannot write the model at opset {}", g.opset)));
        }
        g.opset = original.max(13);
        crate::onnx::write::to_model(&g).context("cannot write the model")?;
    }
    let cost = crate::ir::cost::cost(&g, &facts);
    let per_image = if shape[0] > 0 {
        cost.totals.macs / shape[0] as u64
    } else {
        0
    };
    // How to feed the file: the input's name and layout beside its shape, so that a deployment
    // needs nothing but the file (the trained model's `elrt.classes`, `elrt.input.resize` and
    // `elrt.normalize*` entries are kept as they are).
    let input_name = g.inputs[0].name.clone();
    let output = output_kind(&g, &facts);
    g.meta.metadata_props.retain(|(k, _)| {
        !k.starts_with("elrt.export")
            && k != INPUT_NAME_KEY
            && k != INPUT_LAYOUT_KEY
            && k != OUTPUT_KEY
            // A file exported untrained still carries its reader's record of folded BNs.
            && k != crate::ir::bn_insert::BN_FOLDED_KEY
    });
    g.meta.metadata_props.extend([
        (INPUT_NAME_KEY.to_string(), input_name),
        (INPUT_LAYOUT_KEY.to_string(), "NCHW".to_string()),
        (OUTPUT_KEY.to_string(), output.to_string()),
        ("elrt.export.forms".to_string(), forms_summary(&layers)),
        (
            "elrt.export.input_shape".to_string(),
            if dynamic_batch {
                format!("N,{}", join(&shape[1..]))
            } else {
                join(&shape)
            },
        ),
        (
            "elrt.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    for (k, v) in &opts.metadata {
        g.meta.metadata_props.retain(|(kk, _)| kk != k);
        g.meta.metadata_props.push((k.clone(), v.clone()));
    }
    let report = ExportReport {
        input_shape: shape,
        dynamic_batch,
        opset: g.opset,
        bn_folded: fold.folded,
        bn_kept: fold.kept,
        prelu_split,
        elu_split,
        forms_policy: opts.forms,
        layers,
        whole_model_p50_ms: whole,
        params: cost.totals.params,
        macs: per_image,
        nodes: g.nodes.len(),
    };
    Ok((g, report))
}

/// What the graph's output holds ([`OUTPUT_KEY`]): `probabilities` or `log-probabilities` when
/// it is made by a Softmax or LogSoftmax over axis 1 of `[N, K]` (or `[N, K, 1, 1]`) scores,
/// the head the engine recognises; `logits` otherwise.
fn output_kind(g: &Graph, facts: &Facts) -> &'static str {
    let head = g.outputs.first().and_then(|out| {
        g.nodes
            .iter()
            .find(|n| n.outputs.first() == Some(&out.name))
    });
    let Some(n) = head else { return "logits" };
    let (kind, axis) = match n.op {
        Op::Softmax { axis, .. } => ("probabilities", axis),
        Op::LogSoftmax { axis, .. } => ("log-probabilities", axis),
        _ => return "logits",
    };
    let over_classes = n
        .inputs
        .first()
        .and_then(|x| facts.get(x))
        .is_some_and(|f| {
            f.shape.len() >= 2
                && f.shape[2..].iter().all(|&d| d == 1)
                && norm_axis(axis, f.shape.len()).ok() == Some(1)
        });
    if over_classes {
        kind
    } else {
        "logits"
    }
}

/// A weight that is NaN or infinite (a diverged training run) makes a file that computes
/// nothing useful; refuse it, naming the weight and a node that reads it.
fn check_finite(g: &Graph) -> Result<()> {
    for (name, t) in &g.initializers {
        let Some(a) = t.as_f32() else { continue };
        if let Some(v) = a.iter().find(|v| !v.is_finite()) {
            let reader = g
                .nodes
                .iter()
                .find(|n| n.inputs.contains(name))
                .map(|n| format!(" (read by node '{}', {})", n.name, n.op.onnx_type()))
                .unwrap_or_default();
            bail!("initializer '{name}'{reader} holds {v}: the model's weights are not finite (did training diverge?)");
        }
    }
    Ok(())
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `factorized: 12, dense: 6` style count of the forms written.
pub fn forms_summary(layers: &[LayerForm]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for l in layers {
        *counts.entry(l.form.name()).or_insert(0) += 1;
    }
    if counts.is_empty() {
        return "no factorized layers".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
