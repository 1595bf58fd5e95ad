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
    // --quiet (here with --json) reaches the training stage: no data line, progress or
    // per-epoch lines on stderr.
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !err.lines()
            .any(|l| l.starts_with("epoch ") || l.contains("img/s") || l.contains("OpenBLAS")),
        "{err}"
    );
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
    // The compact file's top-1 in tract, measured by compress on the whole test split with the
    // run's normalisation, is reported beside the engine's and agrees with it: the same
    // function on the same images, so only near-ties may flip (a few of 500).
    let tract_top1 = rep["compact"]["tract_top1"].as_f64().unwrap();
    assert_eq!(rep["tract_images"].as_u64(), Some(500));
    assert!(
        (tract_top1 - acc).abs() <= 0.006,
        "tract {tract_top1} vs engine {acc}"
    );
    assert!(rep["tract_top1_agreement"].as_f64().unwrap() >= 0.99);
    assert_eq!(rep["normalize"], "cifar10");
    assert!(
        md.contains("test top-1, tract") && md.contains(&format!("{:.2}%", 100.0 * tract_top1)),
        "{md}"
    );
    let export: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("export.json")).unwrap()).unwrap();
    assert_eq!(export["data_check"]["top1"].as_f64(), Some(tract_top1));
    assert_eq!(export["data_check"]["normalize"], "cifar10");
    // The compact file records tract's accuracy, the engine's, and the normalisation.
    let props = elrt::onnx::read_file(&out.join("compact.onnx"))
        .unwrap()
        .meta
        .metadata_props;
    let prop = |k: &str| {
        let v: Vec<&String> = props
            .iter()
            .filter(|(kk, _)| kk == k)
            .map(|(_, v)| v)
            .collect();
        assert_eq!(v.len(), 1, "{k} in {props:?}");
        v[0].clone()
    };
    assert_eq!(prop("elrt.accuracy.top1"), format!("{tract_top1:.4}"));
    assert_eq!(prop("elrt.accuracy.engine_top1"), format!("{acc:.4}"));
    assert!(prop("elrt.accuracy.data").contains("500 test images, tract"));
    assert_eq!(prop("elrt.normalize"), "cifar10");
    assert_eq!(prop("elrt.normalize.mean"), "0.4914,0.4822,0.4465");
    if common::require_python(&["onnx", "onnxruntime", "numpy"]) {
        let x = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&[1, 3, 32, 32]));
        let y = common::ort_forward_checked(&out.join("compact.onnx"), &x, true);
        assert_eq!(y.shape(), [1, 10]);
    }
    // --resume with another normalisation: refused by name, before any work.
    let e = fails_cleanly(&compress_args(o, &["--resume", "--normalize", "imagenet"]));
    assert!(
        e.contains("--normalize cifar10") && e.contains("imagenet"),
        "{e}"
    );
    // Resume of a finished run: nothing retrained, report rewritten. Its run.json loses the
    // normalisation first, as one written before the option: it loads as the default.
    let manifest = out.join("run.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert_eq!(m["recipe"]["normalize"], "cifar10");
    m["recipe"].as_object_mut().unwrap().remove("normalize");
    std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
    let before = std::fs::read(out.join("trained.onnx")).unwrap();
    let r = succeeds(compress_args(o, &["--resume", "--json"]));
    assert_eq!(before, std::fs::read(out.join("trained.onnx")).unwrap());
    let again: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(again["compact"]["tract_top1"].as_f64(), Some(tract_top1));
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
