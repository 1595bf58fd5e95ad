//! The engine's forward pass against onnxruntime on every model in models/ (the outside
//! judge): training-form files (BN with batch statistics) in train mode, the eval export in
//! eval mode.

mod common;

use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::rng::Rng;
use ndarray::{ArrayD, IxDyn};

#[test]
fn forward_matches_onnxruntime() {
    if !common::require_python(&["onnxruntime", "numpy"]) {
        return;
    }
    let dir = common::repo().join("models");
    let entries = common::manifest(&dir);
    let mut checked = Vec::new();
    for e in &entries {
        let path = dir.join(&e.file);
        if !path.exists() {
            continue;
        }
        let batch = 4;
        let mut m = Model::load(&path, batch).unwrap();
        let mut shape = e.input_shape.clone();
        shape[0] = batch;
        let mut r = Rng::new(11);
        let x = ArrayD::from_shape_fn(IxDyn(&shape), |_| r.normal());
        let mode = if e.file.contains("eval") {
            Mode::Eval
        } else {
            Mode::Train
        };
        let ours = m.forward(x.clone(), mode).unwrap();
        let theirs = common::ort_forward(&path, &x);
        assert_eq!(ours.shape(), theirs.shape());
        assert!(
            ours.iter().chain(theirs.iter()).all(|v| v.is_finite()),
            "{}: an output that is not finite",
            e.file
        );
        let scale = theirs.iter().fold(0f32, |a, &b| a.max(b.abs())).max(1e-3);
        let diff = ours
            .iter()
            .zip(theirs.iter())
            .fold(0f32, |a, (&p, &q)| a.max((p - q).abs()));
        eprintln!(
            "{}: max |engine - onnxruntime| = {diff:.2e} (max |y| {scale:.2e})",
            e.file
        );
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{}: {diff} vs scale {scale}",
            e.file
        );
        checked.push(e.file.as_str());
    }
    let want = common::zoo_minimum(entries.len());
    assert!(
        checked.len() >= want,
        "only {} of {want} models checked: {checked:?}",
        checked.len()
    );
}
