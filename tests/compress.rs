//! `elrt compress` end to end (issue 6): the synthetic set, ResNet-20, a short schedule; every
//! output file checked; resume and bad input.

mod common;

use common::{fails_cleanly, succeeds};

fn compress_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let model = common::repo().join("models/resnet20.onnx");
    let mut v: Vec<String> = [
        "compress",
        model.to_str().unwrap(),
        "--data",
        "synthetic:2000,500",
        "--epochs",
        "3",
        "--batch",
        "32",
        "--lr",
        "0.05",
        "--ranks",
        "ratio=0.5",
        "--out",
        out,
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn compress_runs_every_stage_and_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let r = succeeds(compress_args(o, &["--json"]));
    let rep: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    for f in [
        "run.json",
        "factorized.onnx",
        "ranks.json",
        "trained.onnx",
        "trained.ckpt",
        "trained.metrics.jsonl",
        "trained.curve.png",
        "compact.onnx",
        "original.onnx",
        "export.json",
        "bench.json",
        "report.md",
        "report.json",
    ] {
        let p = out.join(f);
        assert!(
            p.exists() && std::fs::metadata(&p).unwrap().len() > 0,
            "missing {f}"
        );
    }
    // Params: at least 2x fewer; accuracy far above chance (10%).
    let (po, pc) = (
        rep["original"]["params"].as_u64().unwrap(),
        rep["compact"]["params"].as_u64().unwrap(),
    );
    assert!(po as f64 / pc as f64 >= 2.0, "{po} -> {pc}");
    let acc = rep["compact"]["top1"].as_f64().unwrap();
    assert!(
        acc > 0.25,
        "compact top-1 {acc} on the synthetic test split (chance 0.1)"
    );
    assert!(rep["synthetic"].as_bool().unwrap());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("synthetic") && md.contains("compress"), "{md}");
    // ranks.json is a valid --ranks file.
    let ranks: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ranks.json")).unwrap()).unwrap();
    assert_eq!(ranks.as_object().unwrap().len(), 18);
    // The compact file: loads in tract (and onnxruntime), and its accuracy on the synthetic test
    // split, measured in tract by `elrt export --data`, is far above chance.
    let ex = tmp.path().join("again.onnx");
    let r2 = succeeds([
        "export",
        out.join("trained.onnx").to_str().unwrap(),
        "-o",
        ex.to_str().unwrap(),
        "--data",
        "synthetic:2000,500",
        "--forms",
        "factorized",
        "--json",
        "--quiet",
    ]);
    let s: serde_json::Value = serde_json::from_slice(&r2.stdout).unwrap();
    let tract_top1 = s["data_check"]["top1"].as_f64().unwrap();
    assert!(tract_top1 > 0.25, "tract top-1 {tract_top1}");
    assert!(
        (tract_top1 - acc).abs() < 0.01,
        "tract {tract_top1} vs engine {acc}"
    );
    if common::require_python(&["onnx", "onnxruntime", "numpy"]) {
        let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 32, 32]));
        let y = common::ort_forward_checked(&out.join("compact.onnx"), &x, true);
        assert_eq!(y.shape(), [1, 10]);
    }
    // Resume of a finished run: nothing retrained, report rewritten.
    let before = std::fs::read(out.join("trained.onnx")).unwrap();
    succeeds(compress_args(o, &["--resume"]));
    assert_eq!(before, std::fs::read(out.join("trained.onnx")).unwrap());
    // Same folder without --resume: refused.
    let e = fails_cleanly(&compress_args(o, &[]));
    assert!(e.contains("--resume"), "{e}");
    // --resume with another model: refused.
    let other = common::repo().join("models/resnet56.onnx");
    let mut args = compress_args(o, &["--resume"]);
    args[1] = other.to_str().unwrap().to_string();
    let e = fails_cleanly(&args);
    assert!(e.contains("different model"), "{e}");
}

#[test]
fn compress_bad_input_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // --data pointing at nothing: fails before the run folder exists.
    let out = tmp.path().join("run");
    let o = out.to_str().unwrap();
    let mut args = compress_args(o, &[]);
    args[3] = "cifar10:/nonexistent/cifar".into();
    let e = fails_cleanly(&args);
    assert!(e.contains("/nonexistent/cifar"), "{e}");
    assert!(
        !out.exists(),
        "nothing may be written when the data is missing"
    );
    // An unknown --factor-init: named, nothing written.
    let e = fails_cleanly(&compress_args(o, &["--factor-init", "xavier"]));
    assert!(e.contains("--factor-init 'xavier'"), "{e}");
    assert!(!out.exists());
    // An unwritable output folder (a path under a regular file).
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("run");
    let e = fails_cleanly(&compress_args(bad.to_str().unwrap(), &[]));
    assert!(e.contains(bad.to_str().unwrap()), "{e}");
    // --resume of a folder that holds no run.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = fails_cleanly(&compress_args(empty.to_str().unwrap(), &["--resume"]));
    assert!(e.contains("not a run folder"), "{e}");
}
