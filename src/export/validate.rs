//! Checks an exported file in tract against the engine.
//!
//! The reference is the engine's eval output of the model as trained (BN unfolded, factors as
//! trained); the candidate is tract's optimised run of the exported bytes. Agreement means the
//! export (BN folding, forms, opset) and tract's reading of it are right together. On a
//! disagreement the first node whose output diverges is named: the engine runs the exported
//! graph and tract runs it unoptimised, node outputs compared by name in run order.

use anyhow::{bail, Result};
use ndarray::ArrayD;
use serde::Serialize;

use crate::engine::exec::Mode;
use crate::engine::model::Model;
use crate::ir::Graph;
use crate::runtime::timing::random_input;
use crate::runtime::{trace_plain, TractModel};

#[derive(Clone, Debug, Serialize)]
pub struct Validation {
    /// Largest |tract - engine| over the largest |engine|, across every checked batch.
    pub max_rel_diff: f64,
    pub random_batches: usize,
    /// Real images checked (with `--data`), and how often the top-1 class agreed.
    pub data_images: usize,
    pub data_top1_agreement: Option<f64>,
    /// Largest relative difference on those images (held to [`DATA_TOLERANCE`]).
    pub data_max_rel_diff: Option<f64>,
    pub tolerance: f64,
}

/// `max |a - b| / max |b|` (b the reference; a floor keeps all-zero outputs finite). NaN when
/// either side holds a value that is not finite: `f32::max` would drop a NaN and call two
/// outputs full of NaN equal.
pub fn rel_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f64 {
    if a.iter().chain(b.iter()).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    diff / scale
}

fn argmax_rows(a: &ArrayD<f32>) -> Vec<usize> {
    a.outer_iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0
        })
        .collect()
}

/// Relative difference allowed on real images in the accuracy check. Measured: EfficientNet-B0
/// in Tucker-2/SVD form after 10 training steps agrees with tract to 1.4e-5 on the random
/// batches but reaches 1.0e-3 on one of 1,000 synthetic test images (every top-1 class equal),
/// through its 16 squeeze-excitation Sigmoids; a broken export differs by far more.
pub const DATA_TOLERANCE: f64 = 1e-2;

/// Logits beyond this magnitude are no classifier's working range (see [`Validator`]'s
/// diagnosis of a difference).
const HUGE_LOGIT: f32 = 1e6;

pub struct Validator {
    reference: Model,
    tract: TractModel,
    exported: Graph,
    bytes: Vec<u8>,
    pub tolerance: f64,
    report: Validation,
}

impl Validator {
    /// `reference`: the graph as trained; `exported`/`bytes`: the export of it. `input_shape`
    /// is the batch shape both run at.
    pub fn new(
        reference: Graph,
        exported: Graph,
        bytes: Vec<u8>,
        input_shape: &[usize],
        tolerance: f64,
    ) -> Result<Validator> {
        // Both sides run at the export's shape, which may differ from the file's declared one
        // (symbolic dimensions fixed with --input-shape).
        let mut reference = reference;
        if let Some(vi) = reference.inputs.first_mut() {
            vi.shape = Some(
                input_shape
                    .iter()
                    .map(|&d| crate::ir::Dim::Fixed(d))
                    .collect(),
            );
        }
        let reference = Model::from_graph(reference, input_shape[0])?;
        let tract = TractModel::from_bytes(&bytes, input_shape, 1)?;
        Ok(Validator {
            reference,
            tract,
            exported,
            bytes,
            tolerance,
            report: Validation {
                max_rel_diff: 0.0,
                random_batches: 0,
                data_images: 0,
                data_top1_agreement: None,
                data_max_rel_diff: None,
                tolerance,
            },
        })
    }

    pub fn input_shape(&self) -> &[usize] {
        &self.tract.input_shape
    }

    /// Compares one batch; fails past the tolerance, naming the first diverging node.
    pub fn check(&mut self, x: &ArrayD<f32>) -> Result<(Vec<usize>, Vec<usize>)> {
        let tol = self.tolerance;
        self.check_within(x, tol, false)
    }

    fn check_within(
        &mut self,
        x: &ArrayD<f32>,
        tolerance: f64,
        data: bool,
    ) -> Result<(Vec<usize>, Vec<usize>)> {
        let want = self.reference.forward_output(x.clone(), Mode::Eval)?;
        let got = self.tract.run(x)?;
        if got.shape() != want.shape() {
            bail!(
                "tract's output has shape {:?}, the engine's {:?}",
                got.shape(),
                want.shape()
            );
        }
        let d = rel_diff(&got, &want);
        let max = if data {
            self.report.data_max_rel_diff.get_or_insert(0.0)
        } else {
            &mut self.report.max_rel_diff
        };
        *max = max.max(d);
        if d > tolerance || !d.is_finite() {
            let tol = tolerance;
            let place = self.locate(x);
            if !d.is_finite() {
                bail!("the outputs hold values that are not finite (NaN or infinity; a weight or an activation overflowed); {place}");
            }
            bail!("tract's output differs from the engine's by {d:.2e} relative (limit {tol:.0e}); {place}");
        }
        Ok((argmax_rows(&got), argmax_rows(&want)))
    }

    /// Checks `batches` random normal batches.
    pub fn check_random(&mut self, batches: usize, seed: u64) -> Result<()> {
        for k in 0..batches {
            let x = random_input(&self.tract.input_shape.clone(), seed.wrapping_add(k as u64));
            self.check(&x)?;
            self.report.random_batches += 1;
        }
        Ok(())
    }

    /// Checks one batch of real images (already normalised), counts top-1 agreement and returns
    /// tract's top-1 class per image. The outputs are held to [`DATA_TOLERANCE`] (or the
    /// validation's own, if looser): real images reach further into the nonlinearities than
    /// the random batches, and a thousand of them find the tail of the rounding differences.
    pub fn check_images_pred(&mut self, x: &ArrayD<f32>) -> Result<Vec<usize>> {
        let tol = self.tolerance.max(DATA_TOLERANCE);
        let (a, b) = self.check_within(x, tol, true)?;
        let agree = a.iter().zip(&b).filter(|(p, q)| p == q).count();
        let n0 = self.report.data_images as f64;
        let prev = self.report.data_top1_agreement.unwrap_or(0.0) * n0;
        self.report.data_images += a.len();
        self.report.data_top1_agreement =
            Some((prev + agree as f64) / self.report.data_images as f64);
        Ok(a)
    }

    pub fn report(&self) -> Validation {
        self.report.clone()
    }

    /// Names the first node of the exported graph whose output differs between the engine and
    /// tract's plain (unoptimised) run; if none does, the difference comes from the export
    /// itself (engine on the exported graph vs the trained graph) or from tract's optimiser.
    fn locate(&mut self, x: &ArrayD<f32>) -> String {
        let engine = Model::from_graph(self.exported.clone(), x.shape()[0])
            .and_then(|mut m| m.session.forward_trace(x.clone()));
        let tract = trace_plain(&self.bytes, x);
        let (engine, tract) = match (engine, tract) {
            (Ok(e), Ok(t)) => (e, t),
            (Err(e), _) | (_, Err(e)) => return format!("no per-node trace ({e:#})"),
        };
        let tmap: std::collections::HashMap<&str, &ArrayD<f32>> =
            tract.iter().map(|(n, a)| (n.as_str(), a)).collect();
        for (name, e) in &engine {
            if let Some(t) = tmap.get(name.as_str()) {
                if t.shape() == e.shape() {
                    let d = rel_diff(t, e);
                    if d > self.tolerance || !d.is_finite() {
                        let op = self
                            .exported
                            .node(name)
                            .map(|n| n.op.onnx_type())
                            .unwrap_or("?");
                        if !d.is_finite() {
                            return format!(
                                "first node with a value that is not finite: '{name}' ({op})"
                            );
                        }
                        return format!("first diverging node: '{name}' ({op}), {d:.2e} relative");
                    }
                }
            }
        }
        let exported_out = engine.last().map(|(_, a)| a.clone());
        let reference_out = self.reference.forward_output(x.clone(), Mode::Eval);
        match (exported_out, reference_out) {
            // Logits this large come from a model whose BN running statistics do not fit the
            // inputs yet (a few steps of training): each folded BN's rounding is then amplified
            // layer after layer, and the difference says nothing about the export.
            (Some(e), Ok(r))
                if rel_diff(&e, &r) > self.tolerance
                    && r.iter().fold(0f32, |m, v| m.max(v.abs())) > HUGE_LOGIT =>
            {
                format!(
                    "the exported graph differs from the trained one by {:.2e} relative in the \
                     engine, on logits as large as {:.1e}: the trained model's BN running \
                     statistics do not fit these inputs yet (train longer), and at that scale \
                     the rounding of folded BNs is amplified",
                    rel_diff(&e, &r),
                    r.iter().fold(0f32, |m, v| m.max(v.abs()))
                )
            }
            (Some(e), Ok(r)) if rel_diff(&e, &r) > self.tolerance => format!(
                "the exported graph itself differs from the trained one by {:.2e} relative in \
                 the engine (BN folding or a form rewrite changed the function)",
                rel_diff(&e, &r)
            ),
            _ => "every node agrees in tract's unoptimised run: the difference comes from \
                  tract's optimiser"
                .to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::Gemm;
    use crate::ir::{Dim, ElemType, ModelMeta, Node, Op, Tensor, ValueInfo};
    use std::collections::BTreeMap;

    /// x [1, 4] -> Gemm(weight `w`, 3 classes).
    fn linear(w: Vec<f32>) -> Graph {
        let io = |name: &str, dims: &[usize]| ValueInfo {
            name: name.into(),
            elem: ElemType::F32,
            shape: Some(dims.iter().map(|&d| Dim::Fixed(d)).collect()),
        };
        let mut initializers = BTreeMap::new();
        initializers.insert("w".to_string(), Tensor::f32(&[3, 4], w).unwrap());
        Graph {
            name: "linear".into(),
            opset: 13,
            inputs: vec![io("x", &[1, 4])],
            outputs: vec![io("y", &[1, 3])],
            nodes: vec![Node {
                name: "fc".into(),
                op: Op::Gemm(Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                }),
                inputs: vec!["x".into(), "w".into()],
                outputs: vec!["y".into()],
            }],
            initializers,
            meta: ModelMeta::default(),
        }
    }

    /// The diagnosis of an export that differs from the trained graph: a changed function at
    /// ordinary logits, the amplification warning at logits past HUGE_LOGIT.
    #[test]
    fn a_difference_on_huge_logits_is_diagnosed_as_untrained_statistics() {
        let x = ArrayD::from_shape_vec(vec![1, 4], vec![1.0, -0.5, 0.25, 2.0]).unwrap();
        for (scale, says) in [(1.0f32, "itself differs"), (1e8, "logits as large as")] {
            let w: Vec<f32> = (0..12).map(|i| scale * (i as f32 * 0.37).sin()).collect();
            let mut bent = w.clone();
            bent[0] += scale; // a changed function: 3x more than any tolerance
            let exported = linear(bent);
            let bytes = crate::onnx::write_bytes(&exported).unwrap();
            let mut v = Validator::new(linear(w), exported, bytes, &[1, 4], 1e-2).unwrap();
            let err = v.check(&x).unwrap_err().to_string();
            assert!(err.contains(says), "scale {scale}: {err}");
        }
    }
}
