//! ConvNeXt as PyTorch's exporters write it (tests/fixtures/convnext_parity, made by
//! scripts/make_convnext_fixture.py): LayerNormalization over channels-last activations, Linear
//! layers on every pixel (MatMul of a rank-4 activation), GELU (the op, and TorchScript's Erf
//! spelling), the layer scale, and the dynamo exporter's `as_strided` read of the pooled features.

mod common;

use std::collections::{HashMap, HashSet};

use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::train::step::TrainStep;
use ndarray::{ArrayD, IxDyn};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    common::repo().join("tests/fixtures/convnext_parity")
}

struct Fixture {
    index: Value,
    blob: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        let index =
            serde_json::from_str(&std::fs::read_to_string(dir().join("index.json")).unwrap())
                .unwrap();
        let blob = std::fs::read(dir().join("tensors.bin")).unwrap();
        Fixture { index, blob }
    }

    fn tensor(&self, key: &str) -> Option<ArrayD<f32>> {
        common::fixture_tensor(&self.index, &self.blob, key)
    }

    fn labels(&self) -> Vec<usize> {
        self.index["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }
}

use common::rel_err as rel;

/// Logits and loss of one training-mode forward, and the parameter gradients by name.
fn step(file: &str, f: &Fixture) -> (ArrayD<f32>, f32, HashMap<String, ArrayD<f32>>) {
    let labels = f.labels();
    let mut m = Model::load(&dir().join(file), labels.len()).unwrap();
    let mut step = TrainStep::new(&m.session.program, 0.0, 0.0);
    let stats = step
        .gradients(&mut m, f.tensor("input").unwrap(), &labels)
        .unwrap();
    let grads = m
        .session
        .program
        .params
        .iter()
        .map(|p| (p.name.clone(), p.grad.clone()))
        .collect();
    (stats.logits.clone(), stats.loss, grads)
}

fn assert_logits_and_loss(file: &str, f: &Fixture, logits: &ArrayD<f32>, loss: f32) {
    let e = rel(logits, &f.tensor("logits").unwrap());
    assert!(e < 1e-5, "{file}: logits off by {e:.2e}");
    let want = *f.tensor("loss").unwrap().iter().next().unwrap();
    assert!(
        ((loss - want) / want).abs() < 1e-5,
        "{file}: loss {loss} vs {want}"
    );
}

/// Every PyTorch parameter of the dynamo file is one elrt parameter, named as PyTorch names it
/// (the per-pixel Linear weights, which the exporter stored transposed under generated names,
/// included), with PyTorch's gradient. The exporter dropped nothing here: the weights are
/// random, so no bias is all zeros.
#[test]
fn dynamo_convnext_logits_loss_and_every_gradient_match_pytorch() {
    let f = Fixture::load();
    let (logits, loss, grads) = step("model.onnx", &f);
    assert_logits_and_loss("model.onnx", &f, &logits, loss);
    let torch: Vec<&str> = f.index["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mine: HashSet<&str> = grads.keys().map(String::as_str).collect();
    let missing: Vec<&&str> = torch.iter().filter(|n| !mine.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "parameters not found by PyTorch's name: {missing:?} (have {mine:?})"
    );
    assert_eq!(grads.len(), torch.len(), "{mine:?}");
    let mut worst = (0f32, String::new());
    for name in &torch {
        let e = rel(&grads[*name], &f.tensor(&format!("grad/{name}")).unwrap());
        if e > worst.0 {
            worst = (e, name.to_string());
        }
    }
    eprintln!(
        "worst gradient relative error {:.2e} ({})",
        worst.0, worst.1
    );
    assert!(
        worst.0 < 1e-4,
        "gradient of {} off by {:.2e}",
        worst.1,
        worst.0
    );
}

/// The TorchScript export of the same weights (opset 17, GELU spelled with Erf) computes the
/// same logits, loss and gradients.
#[test]
fn torchscript_convnext_with_erf_gelu_matches_pytorch() {
    let f = Fixture::load();
    let (logits, loss, grads) = step("model_ts.onnx", &f);
    assert_logits_and_loss("model_ts.onnx", &f, &logits, loss);
    // Parameters the exporter names as PyTorch does (all but the transposed Linear weights).
    let mut compared = 0;
    for (name, g) in &grads {
        if let Some(want) = f.tensor(&format!("grad/{name}")) {
            let e = rel(g, &want);
            assert!(e < 1e-4, "gradient of {name} off by {e:.2e}");
            compared += 1;
        }
    }
    assert!(compared >= 20, "only {compared} gradients compared");
}

/// On torchvision's own initialisation the dynamo exporter shares equal tensors (every
/// LayerNorm scale of one width is one initializer, and the shifts share one with the Linear
/// biases) and drops every conv's and the classifier's bias (all zeros): each of PyTorch's 30
/// parameters is elrt's, under PyTorch's name and with its size: shared ones untied, dropped
/// biases restored as zeros.
#[test]
fn untrained_convnext_has_every_pytorch_parameter_by_name_and_size() {
    let f = Fixture::load();
    let m = Model::load(&dir().join("untrained.onnx"), 2).unwrap();
    let sizes: HashMap<&str, usize> = m
        .session
        .program
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.value.len()))
        .collect();
    let wanted: Vec<(&str, usize)> = f.index["untrained_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v[0].as_str().unwrap(), v[1].as_u64().unwrap() as usize))
        .collect();
    assert_eq!(wanted.len(), 30);
    let wrong: Vec<(&str, usize, Option<usize>)> = wanted
        .iter()
        .filter_map(|&(n, size)| {
            // The layer scale is read by a Mul: `<module>.scale` when untied, else its own name.
            let got = sizes
                .get(n)
                .or_else(|| sizes.get(n.replace("layer_scale", "scale").as_str()))
                .copied();
            (got != Some(size)).then_some((n, size, got))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "(PyTorch name, size, elrt's size): {wrong:?} (elrt has {sizes:?})"
    );
    assert_eq!(
        sizes.values().sum::<usize>(),
        wanted.iter().map(|w| w.1).sum::<usize>(),
        "elrt has parameters PyTorch does not: {sizes:?}"
    );
    // A batch of two runs, and the outputs are finite.
    let mut m = m;
    let y = m
        .forward(ArrayD::from_elem(IxDyn(&[2, 3, 32, 32]), 0.5), Mode::Eval)
        .unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
}
