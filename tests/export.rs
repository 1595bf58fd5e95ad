//! Export and tract (issue 5): BN folding and every layer form keep the function; every model
//! in models/, converted to Tucker-2 and to CP and exported, passes onnx.checker and runs in
//! onnxruntime and tract within 1e-4 of the engine; bad requests fail in one line.

mod common;

use common::{fails_cleanly, succeeds};

use std::path::{Path, PathBuf};

use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::export::forms::{apply, find_chains, Form};
use elrt::ir::{Graph, Op, Tensor};
use elrt::pipeline::{export as run_export, ConvertOptions, ExportOptions};
use elrt::rng::Rng;
use ndarray::{ArrayD, IxDyn};

/// Gives every BN non-trivial statistics and affine parameters (as training would), so that
/// folding them is tested on values that matter.
fn randomize_bn(g: &mut Graph, seed: u64) {
    let mut r = Rng::new(seed);
    let bns: Vec<Vec<String>> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm(_)))
        .map(|n| n.inputs.clone())
        .collect();
    for ins in bns {
        for (k, name) in ins.iter().enumerate().skip(1) {
            let t = g.initializers.get_mut(name).unwrap();
            if let Tensor::F32(a) = t {
                a.mapv_inplace(|_| match k {
                    1 => r.range(0.5, 1.5),
                    2 => r.range(-0.2, 0.2),
                    3 => r.range(-0.3, 0.3),
                    _ => r.range(0.5, 2.0),
                });
            }
        }
    }
}

fn convert(model: &Path, format: &str, out: &Path) {
    elrt::pipeline::convert(&ConvertOptions {
        model: model.to_path_buf(),
        format: format.parse().unwrap(),
        ranks: "ratio=0.5".parse().unwrap(),
        seed: 3,
        output: out.to_path_buf(),
        ..ConvertOptions::default()
    })
    .unwrap();
}

fn export_args(model: &Path, out: &Path, forms: &str) -> ExportOptions {
    ExportOptions {
        model: model.to_path_buf(),
        output: out.to_path_buf(),
        batch: Some(1),
        forms: forms.parse().unwrap(),
        check_batches: 2,
        meta: vec![("elrt.test".into(), "yes".into())],
        quiet: true,
        ..ExportOptions::default()
    }
}

fn input(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut r = Rng::new(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| r.normal())
}

/// Eval output of the engine on a graph.
fn engine(g: &Graph, x: &ArrayD<f32>) -> ArrayD<f32> {
    let mut m = Model::from_graph(g.clone(), x.shape()[0]).unwrap();
    m.forward(x.clone(), Mode::Eval).unwrap()
}

fn trained_like(model: &Path, format: &str, dir: &Path) -> (PathBuf, Graph) {
    let conv = dir.join(format!("{format}.onnx"));
    convert(model, format, &conv);
    let mut g = elrt::onnx::read_file(&conv).unwrap();
    randomize_bn(&mut g, 5);
    let path = dir.join(format!("{format}.trained.onnx"));
    elrt::onnx::write_file(&g, &path).unwrap();
    (path, g)
}

#[test]
fn bn_folding_keeps_the_function() {
    let mut g = elrt::onnx::read_file(&common::repo().join("models/resnet20.onnx")).unwrap();
    randomize_bn(&mut g, 1);
    let x = input(&[2, 3, 32, 32], 2);
    let want = engine(&g, &x);
    let mut shapes = vec![vec![2, 3, 32, 32]];
    shapes[0][0] = 2;
    elrt::ir::fold::simplify(
        &mut g,
        &shapes,
        elrt::ir::fold::FoldOptions {
            remove_dropout: true,
        },
    )
    .unwrap();
    let bns = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm(_)))
        .count();
    assert_eq!(
        bns, 21,
        "ResNet-20 (models/) has a BN after each of its 21 convs"
    );
    let r = elrt::export::fold_bn::fold_batchnorm(&mut g).unwrap();
    assert_eq!(r.folded, bns);
    assert!(r.kept.is_empty());
    assert!(!g.nodes.iter().any(|n| matches!(n.op, Op::BatchNorm(_))));
    let got = engine(&g, &x);
    let d = common::rel_diff(&got, &want);
    assert!(d < 1e-5, "folded BN changes the output by {d:.2e}");
}

#[test]
fn every_form_keeps_the_function() {
    let tmp = tempfile::tempdir().unwrap();
    let r20 = common::repo().join("models/resnet20.onnx");
    let x = input(&[2, 3, 32, 32], 4);
    for format in ["tucker2", "cp"] {
        let (_, g) = trained_like(&r20, format, tmp.path());
        let want = engine(&g, &x);
        let mut base = g.clone();
        elrt::ir::fold::simplify(
            &mut base,
            &[vec![2, 3, 32, 32]],
            elrt::ir::fold::FoldOptions {
                remove_dropout: true,
            },
        )
        .unwrap();
        elrt::export::fold_bn::fold_batchnorm(&mut base).unwrap();
        let chains = find_chains(&base);
        assert_eq!(
            chains.len(),
            18,
            "{format}: every 3x3 conv but the first is a chain"
        );
        let forms: &[Form] = if format == "tucker2" {
            &[
                Form::Factorized,
                Form::MergeFirst,
                Form::MergeLast,
                Form::Dense,
            ]
        } else {
            &[Form::Factorized, Form::Dense]
        };
        for &f in forms {
            let mut h = base.clone();
            for c in find_chains(&h) {
                apply(&mut h, &c, f).unwrap();
            }
            let got = engine(&h, &x);
            let d = common::rel_diff(&got, &want);
            assert!(d < 1e-4, "{format} form {}: {d:.2e}", f.name());
            if f == Form::Dense {
                assert!(find_chains(&h).is_empty());
            }
        }
    }
}

/// The CI check: convert (Tucker-2, CP) -> export -> onnx.checker, onnxruntime and
/// tract agree with the engine within 1e-4.
#[test]
fn zoo_converts_exports_and_agrees_in_three_runtimes() {
    let python = common::require_python(&["onnx", "onnxruntime", "numpy"]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::repo().join("models");
    let entries = common::manifest(&dir);
    let mut checked = 0;
    for e in &entries {
        let path = dir.join(&e.file);
        if !path.exists() {
            continue;
        }
        checked += 1;
        for format in ["tucker2", "cp"] {
            let sub = tmp.path().join(format!("{}_{format}", e.file));
            std::fs::create_dir_all(&sub).unwrap();
            let (trained, g) = trained_like(&path, format, &sub);
            // Fastest forms on the small model (times every form in tract), fixed forms on the
            // rest to keep the test short.
            let forms = match (e.file.as_str(), format) {
                ("resnet20.onnx", _) => "fastest",
                (_, "cp") => "dense",
                _ => "factorized",
            };
            let out = sub.join("compact.onnx");
            let s = run_export(&export_args(&trained, &out, forms))
                .unwrap_or_else(|err| panic!("{} {format}: {err:#}", e.file));
            assert!(s.validation.max_rel_diff <= 1e-4);
            let exported = elrt::onnx::read_file(&out).unwrap();
            let had_bn = g.nodes.iter().any(|n| matches!(n.op, Op::BatchNorm(_)));
            assert_eq!(s.export.bn_folded > 0, had_bn, "{}", e.file);
            assert!(
                !exported
                    .nodes
                    .iter()
                    .any(|n| matches!(n.op, Op::BatchNorm(_))),
                "{}: a BN is left after export",
                e.file
            );
            assert_eq!(exported.opset, 13.max(exported.opset.min(14)));
            assert!(exported
                .meta
                .metadata_props
                .iter()
                .any(|(k, v)| k == "elrt.test" && v == "yes"));
            assert!(exported
                .meta
                .metadata_props
                .iter()
                .any(|(k, _)| k == "elrt.format"));
            let mut shape = e.input_shape.clone();
            shape[0] = 1;
            let x = input(&shape, 9);
            let want = engine(&g, &x);
            let mut t = elrt::runtime::TractModel::from_path(&out, &shape, 1).unwrap();
            let got = t.run(&x).unwrap();
            let d = common::rel_diff(&got, &want);
            assert!(d < 1e-4, "{} {format}: tract {d:.2e}", e.file);
            if python {
                let ort = common::ort_forward_checked(&out, &x, true);
                let d = common::rel_diff(&ort, &want);
                assert!(d < 1e-4, "{} {format}: onnxruntime {d:.2e}", e.file);
            }
        }
    }
    let want = common::zoo_minimum(entries.len());
    assert!(checked >= want, "only {checked} of {want} models checked");
}

#[test]
fn bench_reports_every_file_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    let r20 = common::repo().join("models/resnet20.onnx");
    let t2 = tmp.path().join("t2.onnx");
    convert(&r20, "tucker2", &t2);
    // Training-form files are refused with a pointer to `elrt export`.
    let e = fails_cleanly(&["bench", r20.to_str().unwrap()]);
    assert!(e.contains("elrt export"), "{e}");
    let (a, b) = (tmp.path().join("a.onnx"), tmp.path().join("b.onnx"));
    run_export(&export_args(&r20, &a, "factorized")).unwrap();
    run_export(&export_args(&t2, &b, "factorized")).unwrap();
    let out = succeeds([
        "bench",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--batch",
        "1,2",
        "--runs",
        "10",
        "--warmup",
        "2",
        "--min-seconds",
        "0",
        "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4, "two files at two batch sizes");
    for r in rows {
        for k in [
            "file", "p50_ms", "p90_ms", "p99_ms", "params", "macs", "threads", "batch",
        ] {
            assert!(!r[k].is_null(), "missing {k} in {r}");
        }
        assert!(r["p50_ms"].as_f64().unwrap() > 0.0);
        assert!(r["p50_ms"].as_f64().unwrap() <= r["p99_ms"].as_f64().unwrap());
        assert_eq!(r["threads"], 1);
    }
    // BN folded: the 21 BN (scale, shift) pairs become conv biases on convs without one.
    assert_eq!(rows[0]["params"], 271_690);
    assert_eq!(rows[1]["params"], 101_578);
}

#[test]
fn bad_requests_fail_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let r20 = common::repo().join("models/resnet20.onnx");
    let o = tmp.path().join("o.onnx");
    // An input shape that cannot be fixed: symbolic H and W.
    let mut g = elrt::onnx::read_file(&r20).unwrap();
    g.inputs[0].shape = Some(vec![
        elrt::ir::Dim::Sym("N".into()),
        elrt::ir::Dim::Fixed(3),
        elrt::ir::Dim::Sym("H".into()),
        elrt::ir::Dim::Sym("W".into()),
    ]);
    let sym = tmp.path().join("sym.onnx");
    elrt::onnx::write_file(&g, &sym).unwrap();
    let e = fails_cleanly(&["export", sym.to_str().unwrap(), "-o", o.to_str().unwrap()]);
    assert!(e.contains("--input-shape") && e.contains("'H'"), "{e}");
    assert!(!o.exists(), "nothing may be written on failure");
    // ... which --input-shape fixes.
    succeeds([
        "export",
        sym.to_str().unwrap(),
        "-o",
        o.to_str().unwrap(),
        "--input-shape",
        "3,32,32",
        "--forms",
        "factorized",
        "--quiet",
    ]);
    assert!(o.exists());
    let e = fails_cleanly(&[
        "export",
        r20.to_str().unwrap(),
        "-o",
        o.to_str().unwrap(),
        "--forms",
        "smallest",
    ]);
    assert!(e.contains("--forms 'smallest'"), "{e}");
    // An op the runtimes cannot run, named: an unknown op type.
    let bad = tmp.path().join("bad.onnx");
    let mut bytes = std::fs::read(&r20).unwrap();
    // NodeProto.op_type is field 4 (tag 0x22); same length, so the protobuf stays valid.
    let pos = bytes.windows(6).position(|w| w == b"\x22\x04Relu").unwrap();
    bytes[pos + 2..pos + 6].copy_from_slice(b"Rel0");
    std::fs::write(&bad, &bytes).unwrap();
    let e = fails_cleanly(&["bench", bad.to_str().unwrap()]);
    assert!(e.contains("Rel0"), "{e}");
    // A file exported at batch 2 benches at batch 1 too (tract overrides the declared batch),
    // with MACs counted per image.
    let b2 = tmp.path().join("b2.onnx");
    succeeds([
        "export",
        r20.to_str().unwrap(),
        "-o",
        b2.to_str().unwrap(),
        "--batch",
        "2",
        "--forms",
        "factorized",
        "--quiet",
    ]);
    let out = succeeds([
        "bench",
        b2.to_str().unwrap(),
        "--runs",
        "5",
        "--min-seconds",
        "0",
        "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["macs"], 40_813_184);
    let e = fails_cleanly(&["bench", "/nonexistent.onnx"]);
    assert!(e.contains("/nonexistent.onnx"), "{e}");
}

#[test]
fn latency_rank_policy_measures_and_explains() {
    let tmp = tempfile::tempdir().unwrap();
    let r20 = common::repo().join("models/resnet20.onnx");
    let o = tmp.path().join("lat.onnx");
    // Timing-based: on a heavily loaded machine a layer's factorized form can time no faster
    // than its dense one, and the search then rightly keeps everything dense, or finds the 10%
    // cut unreachable (the fastest ranks predicting 0.93 of dense at load 7 on 2 cores). Up to
    // three measurements; every assertion holds on the last.
    let mut attempt = 0;
    let (r, chosen, done) = loop {
        attempt += 1;
        let args = [
            "convert",
            r20.to_str().unwrap(),
            "--ranks",
            "latency=0.9",
            "--json",
            "-o",
            o.to_str().unwrap(),
        ];
        let out = common::elrt().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() && stderr.contains("unreachable in tract") && attempt < 3 {
            eprintln!(
                "attempt {attempt}: {} (timing under load?), measuring again",
                stderr.trim()
            );
            continue;
        }
        assert!(out.status.success(), "{stderr}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let search = &r["latency_search"];
        let layers = search["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 18, "every eligible layer is measured");
        for l in layers {
            assert!(l["dense_ms"].as_f64().unwrap() > 0.0);
            assert!(l["chosen_ms"].as_f64().unwrap() <= l["dense_ms"].as_f64().unwrap());
        }
        // The layers the search factorized are exactly the ones the rewrite factorized.
        let chosen: std::collections::BTreeSet<String> = layers
            .iter()
            .filter(|l| !l["ranks"].as_array().unwrap().is_empty())
            .map(|l| l["layer"].as_str().unwrap().to_string())
            .collect();
        let done: std::collections::BTreeSet<String> = r["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["status"] == "factorized")
            .map(|l| l["layer"].as_str().unwrap().to_string())
            .collect();
        if !done.is_empty() || attempt == 3 {
            break (r, chosen, done);
        }
        eprintln!("attempt {attempt}: no layer factorized (timing under load?), measuring again");
    };
    assert_eq!(chosen, done);
    assert!(
        !done.is_empty(),
        "a 10% latency cut needs some layer factorized"
    );
    let reached = &r["latency_reached"];
    assert!(reached["measured_ms"].as_f64().unwrap() > 0.0);
    // An unreachable target: one line saying what the fastest ranks give.
    let e = fails_cleanly(&[
        "convert",
        r20.to_str().unwrap(),
        "--ranks",
        "latency=0.05",
        "-o",
        o.to_str().unwrap(),
    ]);
    assert!(
        e.contains("unreachable") && e.contains("latency=0.05"),
        "{e}"
    );
}

#[test]
fn svd_pairs_export_in_both_forms() {
    let tmp = tempfile::tempdir().unwrap();
    let mb = common::repo().join("models/mobilenetv2.onnx");
    let conv = tmp.path().join("mb.svd.onnx");
    let a = ConvertOptions {
        model: mb.clone(),
        ranks: "params=0.5".parse().unwrap(),
        include_pointwise: true,
        seed: 3,
        output: conv.clone(),
        ..ConvertOptions::default()
    };
    elrt::pipeline::convert(&a).unwrap();
    let mut g = elrt::onnx::read_file(&conv).unwrap();
    randomize_bn(&mut g, 8);
    let trained = tmp.path().join("mb.trained.onnx");
    elrt::onnx::write_file(&g, &trained).unwrap();
    let x = input(&[1, 3, 32, 32], 1);
    let want = engine(&g, &x);
    for forms in ["factorized", "dense"] {
        let out = tmp.path().join(format!("{forms}.onnx"));
        let s = run_export(&export_args(&trained, &out, forms)).unwrap();
        let svd = s
            .export
            .layers
            .iter()
            .filter(|l| l.kind == elrt::export::forms::ChainKind::Svd)
            .count();
        assert!(svd >= 30, "{forms}: {svd} SVD pairs");
        let exported = elrt::onnx::read_file(&out).unwrap();
        let got = engine(&exported, &x);
        let d = common::rel_diff(&got, &want);
        assert!(d < 1e-4, "{forms}: {d:.2e}");
        if forms == "dense" {
            // Every factor pair merged (the architecture's own linear bottlenecks, a project
            // conv feeding the next expand conv, may remain as pairs).
            assert!(!exported.nodes.iter().any(|n| n.name.contains("/svd/")));
        }
    }
}
