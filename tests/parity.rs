//! PyTorch parity on ResNet-20: same weights and batch give the same logits, losses, every
//! parameter gradient, BN running statistics and one optimiser step. The fixtures were made
//! by scripts/make_parity_fixtures.py (see tests/fixtures/resnet20_parity/README.md).

mod common;

use std::collections::HashMap;

use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::engine::ops::SoftmaxCrossEntropy;
use elrt::train::optim::{OptimKind, Optimizer};
use elrt::train::step::TrainStep;
use ndarray::{ArrayD, Ix2, IxDyn};
use serde_json::Value;

struct Fixture {
    index: Value,
    blob: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        let dir = common::repo().join("tests/fixtures/resnet20_parity");
        let index = serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap())
            .unwrap();
        let blob = std::fs::read(dir.join("tensors.bin")).unwrap();
        Fixture { index, blob }
    }

    fn tensor(&self, key: &str) -> ArrayD<f32> {
        common::fixture_tensor(&self.index, &self.blob, key)
            .unwrap_or_else(|| panic!("no fixture tensor '{key}'"))
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

/// Tensor-wise relative error (see the fixture README).
fn rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    common::rel_err(a, b)
}

fn model(batch: usize) -> Model {
    let path = common::repo().join("tests/fixtures/resnet20_parity/model.onnx");
    Model::load(&path, batch).unwrap()
}

/// Logits, loss and gradients from the training step `elrt train` runs (`TrainStep`,
/// without DSO or label smoothing, which PyTorch's fixture does not have).
#[test]
fn logits_losses_gradients_and_statistics_match_pytorch() {
    let f = Fixture::load();
    let labels = f.labels();
    let mut m = model(labels.len());
    let mut step = TrainStep::new(&m.session.program, 0.0, 0.0);
    let stats = step.gradients(&mut m, f.tensor("input"), &labels).unwrap();
    let logits = &stats.logits;
    assert!(
        rel(logits, &f.tensor("logits")) < 1e-5,
        "logits {}",
        rel(logits, &f.tensor("logits"))
    );
    let loss = stats.loss;
    let want = f.tensor("loss")[IxDyn(&[])];
    assert!(((loss - want) / want).abs() < 1e-5, "loss {loss} vs {want}");
    let l2 = logits.view().into_dimensionality::<Ix2>().unwrap();
    let ls = SoftmaxCrossEntropy {
        label_smoothing: 0.1,
    }
    .loss(l2, &labels)
    .unwrap();
    let want_ls = f.tensor("loss_ls")[IxDyn(&[])];
    assert!(
        ((ls - want_ls) / want_ls).abs() < 1e-5,
        "loss_ls {ls} vs {want_ls}"
    );

    let mut worst = (0f32, String::new());
    for p in &m.session.program.params {
        let e = rel(&p.grad, &f.tensor(&format!("grad/{}", p.name)));
        if e > worst.0 {
            worst = (e, p.name.clone());
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
    assert_eq!(m.session.program.params.len(), 65);

    for (name, v) in &m.session.program.state {
        let key = if name.ends_with("running_mean") {
            "running_mean_after"
        } else {
            "running_var_after"
        };
        let e = rel(v, &f.tensor(&format!("{key}/{name}")));
        assert!(e < 1e-5, "{name}: {e:.2e}");
    }
}

fn step_and_compare(
    f: &Fixture,
    kind: OptimKind,
    lr: f32,
    wd: f32,
    key: &str,
    from_fixture_grads: bool,
) {
    let labels = f.labels();
    let mut m = model(labels.len());
    let mut opt = Optimizer::new(kind, wd);
    if from_fixture_grads {
        // The optimiser alone, on PyTorch's gradients.
        m.forward(f.tensor("input"), Mode::Train).unwrap();
        for p in &mut m.session.program.params {
            p.grad = f.tensor(&format!("grad/{}", p.name));
        }
        opt.step_program(lr, &mut m.session.program).unwrap();
    } else {
        // The whole training step, update included.
        TrainStep::new(&m.session.program, 0.0, 0.0)
            .run(&mut m, f.tensor("input"), &labels, &mut opt, lr)
            .unwrap();
    }
    let decay: HashMap<String, bool> = f.index["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["decay"].as_bool().unwrap(),
            )
        })
        .collect();
    for p in &m.session.program.params {
        assert_eq!(p.decay, decay[&p.name], "decay flag of {}", p.name);
    }
    for p in &m.session.program.params {
        let e = rel(&p.value, &f.tensor(&format!("{key}/{}", p.name)));
        assert!(e < 1e-5, "{key}: {} off by {e:.2e}", p.name);
    }
}

#[test]
fn one_sgd_step_matches_pytorch() {
    let f = Fixture::load();
    step_and_compare(
        &f,
        OptimKind::Sgd {
            momentum: 0.9,
            nesterov: false,
        },
        0.1,
        5e-4,
        "after_sgd",
        false,
    );
    step_and_compare(
        &f,
        OptimKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        },
        0.1,
        5e-4,
        "after_sgd_nesterov",
        false,
    );
}

#[test]
fn one_adamw_step_matches_pytorch() {
    // AdamW's first step is lr * sign(g) elementwise, so it is fed PyTorch's own gradients
    // (gradients at float32 noise level would flip signs; see the fixture README).
    let f = Fixture::load();
    let kind = OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    step_and_compare(&f, kind, 1e-3, 0.05, "after_adamw", true);
}
