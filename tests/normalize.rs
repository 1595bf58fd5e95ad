//! `--normalize` (issue 14): input normalisation is the model's, stated by the user or recorded
//! in the file.
//!
//! The outside judge is onnxruntime: scripts/make_norm_fixture.py makes, at test time, a small
//! BN-free CIFAR-size classifier fitted to ImageNet-normalised inputs, 300 PNG test images in an
//! image-folder layout (already 32x32: nothing is resized) and onnxruntime's results on them with
//! x / 255 and the ImageNet mean/std. elrt must reproduce them with `--normalize imagenet`, and
//! its default (CIFAR mean/std) must not (the fixture checks that this changes 61 of the 300
//! predictions, so a flag that did nothing would fail here).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{elrt, fails_cleanly, repo, succeeds};
use elrt::data::{DataSpec, Loader, LoaderConfig, NormSpec};
use elrt::engine::exec::Mode;
use elrt::engine::model::Model;

#[derive(serde::Deserialize)]
struct Expected {
    images: usize,
    labels: Vec<usize>,
    pred: Vec<usize>,
    top1: f64,
    top5: f64,
    loss: f64,
    cifar_pred: Vec<usize>,
    cifar_top1: f64,
    cifar_loss: f64,
}

/// Runs scripts/make_norm_fixture.py into `dir`; None (skip) without numpy/onnx/onnxruntime.
fn fixture(dir: &Path) -> Option<Expected> {
    if !common::require_python(&["numpy", "onnx", "onnxruntime"]) {
        return None;
    }
    let o = Command::new("python3")
        .arg(repo().join("scripts/make_norm_fixture.py"))
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "make_norm_fixture.py: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    Some(serde_json::from_str(&text).unwrap())
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn meta(file: &Path, key: &str) -> Option<String> {
    elrt::onnx::read_file(file)
        .unwrap()
        .meta
        .metadata_props
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Top-1 / top-5 / loss of an `elrt eval --json` run against onnxruntime's: the same top-1 and
/// top-5 (as counts of 300 images: equal, not close) and the same mean cross-entropy.
fn assert_same_scores(got: &serde_json::Value, top1: f64, top5: f64, loss: f64, n: usize) {
    let count = |v: f64| (v * n as f64).round() as usize;
    assert_eq!(got["images"].as_u64().unwrap() as usize, n, "{got}");
    assert_eq!(count(got["top1"].as_f64().unwrap()), count(top1), "{got}");
    assert_eq!(count(got["top5"].as_f64().unwrap()), count(top5), "{got}");
    let l = got["loss"].as_f64().unwrap();
    assert!(
        (l - loss).abs() <= 1e-4 * loss.max(1.0),
        "loss {l} against onnxruntime's {loss}"
    );
}

#[test]
fn imagenet_model_evaluates_as_onnxruntime_does() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(want) = fixture(tmp.path()) else {
        return;
    };
    let model = tmp.path().join("model.onnx");
    let images = tmp.path().join("images");
    let data = format!("folder:{}", images.display());
    let m = model.to_str().unwrap();
    // The fixture is one where the normalisation matters.
    assert_eq!(want.images, 300);
    let changed = want
        .pred
        .iter()
        .zip(&want.cifar_pred)
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed >= 30 && want.top1 - want.cifar_top1 >= 0.1,
        "fixture: {changed} predictions change, top-1 {} vs {}",
        want.top1,
        want.cifar_top1
    );

    // elrt eval --normalize imagenet gives onnxruntime's scores with ImageNet mean/std ...
    let r = succeeds([
        "eval",
        m,
        "--data",
        &data,
        "--normalize",
        "imagenet",
        "--json",
    ]);
    let got = json(&r);
    assert_eq!(got["normalize"], "imagenet");
    assert_same_scores(&got, want.top1, want.top5, want.loss, want.images);
    // ... and so do the same values written out.
    let r = succeeds([
        "eval",
        m,
        "--data",
        &data,
        "--normalize",
        "0.485,0.456,0.406/0.229,0.224,0.225",
        "--json",
    ]);
    assert_same_scores(&json(&r), want.top1, want.top5, want.loss, want.images);
    // The default (CIFAR mean/std) gives onnxruntime's CIFAR-normalised scores instead.
    let r = succeeds(["eval", m, "--data", &data, "--json"]);
    let got = json(&r);
    assert_eq!(got["normalize"], "cifar10");
    let cifar_top1 = got["top1"].as_f64().unwrap();
    assert!(
        (cifar_top1 - want.cifar_top1).abs() < 1e-9 && (cifar_top1 - want.top1).abs() > 0.05,
        "default normalisation: top-1 {cifar_top1}, onnxruntime with CIFAR mean/std {}, with ImageNet {}",
        want.cifar_top1,
        want.top1
    );
    assert!((got["loss"].as_f64().unwrap() - want.cifar_loss).abs() < 1e-4);

    // Per image: the loader's batches (the path eval takes) through the engine give
    // onnxruntime's top-1 class for every image, in the folder's order.
    let splits = DataSpec::Folder(images.clone()).load([3, 32, 32]).unwrap();
    assert_eq!(splits.test.labels(), &want.labels[..]);
    let mut cfg = LoaderConfig::eval(want.images);
    cfg.normalize = Some(NormSpec::Imagenet.resolve(3).unwrap());
    let loader = Loader::new(Arc::new(splits.test), cfg).unwrap();
    let mut engine = Model::load(&model, want.images).unwrap();
    let batch = loader.epoch(0).next().unwrap();
    let logits = engine.forward(batch.images.into_dyn(), Mode::Eval).unwrap();
    let pred: Vec<usize> = logits
        .outer_iter()
        .map(|row| {
            (0..row.len())
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap()
        })
        .collect();
    let differ: Vec<usize> = (0..pred.len())
        .filter(|&i| pred[i] != want.pred[i])
        .collect();
    assert!(
        differ.is_empty(),
        "images {differ:?} differ from onnxruntime"
    );

    // export: tract's top-1 with --normalize imagenet is onnxruntime's, and the file records it.
    let compact = tmp.path().join("compact.onnx");
    let r = succeeds([
        "export",
        m,
        "-o",
        compact.to_str().unwrap(),
        "--forms",
        "dense",
        "--data",
        &data,
        "--normalize",
        "imagenet",
        "--json",
        "--quiet",
    ]);
    let s = json(&r);
    let count = |v: f64| (v * want.images as f64).round() as usize;
    assert_eq!(
        count(s["data_check"]["top1"].as_f64().unwrap()),
        count(want.top1),
        "{}",
        s["data_check"]
    );
    assert_eq!(s["data_check"]["normalize"], "imagenet");
    assert_eq!(
        meta(&compact, "elrt.normalize").as_deref(),
        Some("imagenet")
    );
    assert_eq!(
        meta(&compact, "elrt.normalize.mean").as_deref(),
        Some("0.485,0.456,0.406")
    );
    assert_eq!(
        meta(&compact, "elrt.normalize.std").as_deref(),
        Some("0.229,0.224,0.225")
    );
    // The exported file, evaluated without the flag, takes its recorded normalisation.
    let r = succeeds([
        "eval",
        compact.to_str().unwrap(),
        "--data",
        &data,
        "--batch",
        "1",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("normalisation: imagenet, as"), "{err}");
    assert_same_scores(&json(&r), want.top1, want.top5, want.loss, want.images);
}

fn model20() -> PathBuf {
    repo().join("models/resnet20.onnx")
}

const DATA: &str = "synthetic:200,100";

fn eval_json(model: &Path, extra: &[&str]) -> (serde_json::Value, String) {
    let mut args = vec![
        "eval",
        model.to_str().unwrap(),
        "--data",
        DATA,
        "--batch",
        "50",
        "--json",
    ];
    args.extend_from_slice(extra);
    let r = succeeds(args);
    (json(&r), String::from_utf8_lossy(&r.stderr).into_owned())
}

#[test]
fn train_records_the_normalisation_and_later_commands_use_it() {
    let tmp = tempfile::tempdir().unwrap();
    let trained = tmp.path().join("t.onnx");
    let train = |norm: &str, extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "train".into(),
            model20().to_str().unwrap().to_string(),
            "--data".into(),
            DATA.into(),
            "--epochs".into(),
            "1".into(),
            "--batch".into(),
            "50".into(),
            "--max-steps".into(),
            "2".into(),
            "--normalize".into(),
            norm.into(),
            "--quiet".into(),
            "-o".into(),
            trained.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    succeeds(train("imagenet", &[]));
    assert_eq!(
        meta(&trained, "elrt.normalize").as_deref(),
        Some("imagenet")
    );
    assert_eq!(
        meta(&trained, "elrt.normalize.std").as_deref(),
        Some("0.229,0.224,0.225")
    );
    // eval without the flag: the recorded normalisation, said in one line.
    let (rec, err) = eval_json(&trained, &[]);
    assert_eq!(rec["normalize"], "imagenet");
    assert_eq!(
        err.lines()
            .filter(|l| l.contains("as") && l.contains("records it"))
            .count(),
        1,
        "{err}"
    );
    let (flag, _) = eval_json(&trained, &["--normalize", "imagenet"]);
    assert_eq!(rec["loss"], flag["loss"]);
    // The flag overrides the record, and another normalisation gives another result.
    let (cifar, err) = eval_json(&trained, &["--normalize", "cifar10"]);
    assert_eq!(cifar["normalize"], "cifar10");
    assert!(!err.contains("records it"), "{err}");
    assert_ne!(cifar["loss"], rec["loss"]);
    // convert keeps the record, so the factorized model takes its inputs as the original did.
    let conv = tmp.path().join("f.onnx");
    succeeds([
        "convert",
        trained.to_str().unwrap(),
        "--format",
        "tucker2",
        "--ranks",
        "ratio=0.5",
        "-o",
        conv.to_str().unwrap(),
    ]);
    assert_eq!(meta(&conv, "elrt.normalize").as_deref(), Some("imagenet"));
    // Resuming the training under another normalisation is refused.
    let e = fails_cleanly(&train("cifar10", &["--resume"]));
    assert!(
        e.contains("--resume") && e.contains(r#"normalize: "imagenet" -> "cifar10""#),
        "{e}"
    );
    // A spec with the wrong channel count for the model: one line naming the flag.
    let e = fails_cleanly(&[
        "eval",
        trained.to_str().unwrap(),
        "--data",
        DATA,
        "--normalize",
        "0.5/0.25",
    ]);
    assert!(
        e.contains("--normalize") && e.contains("has 1 channel(s), but the model's input has 3"),
        "{e}"
    );
}

#[test]
fn bad_normalize_values_are_refused_by_every_command() {
    let m = model20();
    let m = m.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.onnx");
    let out = out.to_str().unwrap();
    let run = tmp.path().join("run");
    let commands: [Vec<&str>; 4] = [
        vec!["train", m, "-o", out],
        vec!["eval", m, "--data", "synthetic"],
        vec!["export", m, "-o", out],
        vec!["compress", m, "--out", run.to_str().unwrap()],
    ];
    for (bad, why) in [
        ("0.5,0.5/0.2", "2 mean value(s) but 1 std"),
        ("0.5,0.5,0.5/0.2,0,0.2", "std must be positive"),
        ("0.5,0.5,0.5/0.2,-1,0.2", "std must be positive"),
        ("nan,0.5,0.5/1,1,1", "not finite"),
        ("0.5,0.5,0.5/1,inf,1", "not finite"),
        (
            "imagenett",
            "expected cifar10, imagenet, none or M1,M2,M3/S1,S2,S3",
        ),
    ] {
        for c in &commands {
            let mut args = c.clone();
            args.extend(["--normalize", bad]);
            let o = elrt().args(&args).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{args:?} should fail");
            assert!(!err.contains("panicked"), "{err}");
            let first = err.lines().next().unwrap_or_default();
            assert!(
                first.starts_with("error: invalid value")
                    && first.contains("--normalize")
                    && first.contains(why),
                "{args:?}: {err}"
            );
        }
    }
    assert!(!Path::new(out).exists() && !run.exists());
}
