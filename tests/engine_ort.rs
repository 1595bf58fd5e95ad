//! The engine's forward pass against onnxruntime on every model in models/ (the outside
//! judge): training-form files (BN with batch statistics) in train mode, the eval export in
//! eval mode.

mod common;

use std::process::Command;

use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::rng::Rng;
use ndarray::{ArrayD, IxDyn};

fn ort_forward(model: &std::path::Path, x: &ArrayD<f32>) -> ArrayD<f32> {
    let tmp = tempfile::tempdir().unwrap();
    let (inp, out) = (tmp.path().join("x.bin"), tmp.path().join("y.bin"));
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&inp, bytes).unwrap();
    let shape: Vec<String> = x.shape().iter().map(|d| d.to_string()).collect();
    let o = Command::new("python3")
        .arg(common::repo().join("scripts/ort_forward.py"))
        .arg(model)
        .arg(&inp)
        .arg(shape.join(","))
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dims: Vec<usize> = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(',')
        .map(|d| d.parse().unwrap())
        .collect();
    let raw = std::fs::read(&out).unwrap();
    let v: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ArrayD::from_shape_vec(IxDyn(&dims), v).unwrap()
}

#[test]
fn forward_matches_onnxruntime() {
    if !common::require_python(&["onnxruntime", "numpy"]) {
        return;
    }
    let dir = common::repo().join("models");
    for e in common::manifest(&dir) {
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
        let theirs = ort_forward(&path, &x);
        assert_eq!(ours.shape(), theirs.shape());
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
    }
}
