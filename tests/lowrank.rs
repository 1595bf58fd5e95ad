//! The low-rank rewrite: a factorized conv computes the conv of its composed kernel, its
//! factor gradients follow the chain rule through that kernel, every model converts and runs
//! in onnxruntime, and bad requests fail clearly.

mod common;

use std::collections::BTreeMap;

use common::succeeds;
use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::ir::ops::{AutoPad, Conv};
use elrt::ir::{Dim, ElemType, Graph, ModelMeta, Node, Op, Tensor, ValueInfo};
use elrt::lowrank::rank::RankPolicy;
use elrt::lowrank::{convert, ConvertOptions, Format, InitMode};
use elrt::rng::Rng;
use ndarray::{Array4, ArrayD, Ix4, IxDyn};

fn rand(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut r = Rng::new(seed);
    ArrayD::from_shape_fn(IxDyn(shape), |_| r.normal())
}

/// x [2, 8, 11, 10] -> Conv(12 out, 3x3, attrs) -> Flatten (the engine wants 2-D logits).
fn one_conv(strides: [usize; 2], pads: [usize; 4], dil: [usize; 2], bias: bool) -> Graph {
    let mut init = BTreeMap::new();
    init.insert(
        "conv.weight".to_string(),
        Tensor::F32(rand(&[12, 8, 3, 3], 1)),
    );
    let mut inputs = vec!["x".to_string(), "conv.weight".to_string()];
    if bias {
        init.insert("conv.bias".to_string(), Tensor::F32(rand(&[12], 2)));
        inputs.push("conv.bias".into());
    }
    let vi = |n: &str, d: Vec<usize>| ValueInfo {
        name: n.into(),
        elem: ElemType::F32,
        shape: Some(d.into_iter().map(Dim::Fixed).collect()),
    };
    let mut out = vi("y", vec![]);
    out.shape = None;
    Graph {
        name: "one_conv".into(),
        opset: 13,
        inputs: vec![vi("x", vec![2, 8, 11, 10])],
        outputs: vec![out],
        nodes: vec![
            Node {
                name: "conv".into(),
                op: Op::Conv(Conv {
                    kernel_shape: Some(vec![3, 3]),
                    strides: strides.to_vec(),
                    pads: pads.to_vec(),
                    dilations: dil.to_vec(),
                    group: 1,
                    auto_pad: AutoPad::NotSet,
                }),
                inputs,
                outputs: vec!["c".into()],
            },
            Node {
                name: "flat".into(),
                op: Op::Flatten { axis: 1 },
                inputs: vec!["c".into()],
                outputs: vec!["y".into()],
            },
        ],
        initializers: init,
        meta: ModelMeta::default(),
    }
}

/// Simplifies `g` for one input of `shape` and converts it with `opts`.
/// Folds `g` for one input shape, as the converter's callers do, and returns the shape facts.
fn simplified(g: &mut Graph, shape: &[usize]) -> elrt::ir::shape::Facts {
    elrt::ir::fold::simplify(
        g,
        &[shape.to_vec()],
        elrt::ir::fold::FoldOptions {
            remove_dropout: false,
        },
    )
    .unwrap()
}

fn convert_with(g: &Graph, shape: &[usize], opts: &ConvertOptions) -> Graph {
    let mut g = g.clone();
    let facts = simplified(&mut g, shape);
    let rep = convert(&mut g, &facts, opts).unwrap();
    assert!(rep.iter().any(|l| l.status == "factorized"), "{rep:?}");
    g
}

/// Tucker-2/CP at half the channels, every rank allowed, from-scratch factors.
fn convert_opts(format: Format) -> ConvertOptions {
    ConvertOptions {
        format,
        ranks: RankPolicy::Ratio(0.5),
        rank_multiple: 1,
        include_first: true,
        include_pointwise: false,
        include_gemm: false,
        init: InitMode::Scratch,
        seed: 3,
        hooi_iters: 5,
        cp_iters: 10,
    }
}

fn convert_graph(g: &Graph, format: Format) -> Graph {
    convert_with(g, &[2, 8, 11, 10], &convert_opts(format))
}

fn w4(g: &Graph, name: &str) -> Array4<f32> {
    g.initializers[name]
        .as_f32()
        .unwrap()
        .clone()
        .into_dimensionality::<Ix4>()
        .unwrap()
}

/// The kernel a Tucker-2 chain computes, and the chain rule from dL/dW to each factor.
fn tucker_compose(u1: &Array4<f32>, g: &Array4<f32>, u2: &Array4<f32>) -> Array4<f32> {
    let (ri, ci) = (u1.shape()[0], u1.shape()[1]);
    let (ro, kh, kw) = (g.shape()[0], g.shape()[2], g.shape()[3]);
    let co = u2.shape()[0];
    Array4::from_shape_fn((co, ci, kh, kw), |(o, i, h, w)| {
        let mut s = 0.0f64;
        for b in 0..ro {
            for a in 0..ri {
                s += (u2[[o, b, 0, 0]] * g[[b, a, h, w]] * u1[[a, i, 0, 0]]) as f64;
            }
        }
        s as f32
    })
}

fn cp_compose(
    u1: &Array4<f32>,
    v: &Array4<f32>,
    hz: &Array4<f32>,
    u2: &Array4<f32>,
) -> Array4<f32> {
    let (r, ci) = (u1.shape()[0], u1.shape()[1]);
    let (kh, kw, co) = (v.shape()[2], hz.shape()[3], u2.shape()[0]);
    Array4::from_shape_fn((co, ci, kh, kw), |(o, i, h, w)| {
        (0..r)
            .map(|a| {
                (u2[[o, a, 0, 0]] * v[[a, 0, h, 0]] * hz[[a, 0, 0, w]] * u1[[a, i, 0, 0]]) as f64
            })
            .sum::<f64>() as f32
    })
}

/// `max |a - b| / max |b|`; NaN when either side holds a value that is not finite.
fn max_rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    if a.iter().chain(b.iter()).any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

fn params(m: &Model) -> BTreeMap<String, (ArrayD<f32>, ArrayD<f32>)> {
    m.session
        .program
        .params
        .iter()
        .map(|p| (p.name.clone(), (p.value.clone(), p.grad.clone())))
        .collect()
}

#[test]
fn factorized_conv_equals_dense_conv_of_composed_kernel_with_chain_rule_gradients() {
    let cases = [
        ([1, 1], [1, 1, 1, 1], [1, 1]),
        ([2, 2], [1, 1, 1, 1], [1, 1]),
        ([1, 2], [0, 2, 1, 0], [1, 1]),
        ([1, 1], [2, 2, 2, 2], [2, 2]),
        ([2, 1], [2, 1, 2, 1], [2, 1]),
    ];
    for (strides, pads, dil) in cases {
        for bias in [false, true] {
            for format in [Format::Tucker2, Format::Cp] {
                let what = format!(
                    "{format:?} strides {strides:?} pads {pads:?} dilations {dil:?} bias {bias}"
                );
                let fg = convert_graph(&one_conv(strides, pads, dil, bias), format);
                let tag = if format == Format::Tucker2 {
                    "tucker2"
                } else {
                    "cp"
                };
                let w = match format {
                    Format::Tucker2 => tucker_compose(
                        &w4(&fg, &format!("conv/{tag}/u1.weight")),
                        &w4(&fg, &format!("conv/{tag}/core.weight")),
                        &w4(&fg, &format!("conv/{tag}/u2.weight")),
                    ),
                    Format::Cp => cp_compose(
                        &w4(&fg, "conv/cp/u1.weight"),
                        &w4(&fg, "conv/cp/vertical.weight"),
                        &w4(&fg, "conv/cp/horizontal.weight"),
                        &w4(&fg, "conv/cp/u2.weight"),
                    ),
                };
                let mut dense = one_conv(strides, pads, dil, bias);
                dense
                    .initializers
                    .insert("conv.weight".into(), Tensor::F32(w.clone().into_dyn()));
                let mut mf = Model::from_graph(fg, 2).unwrap();
                let mut md = Model::from_graph(dense, 2).unwrap();
                let x = rand(&[2, 8, 11, 10], 9);
                let yf = mf.forward(x.clone(), Mode::Train).unwrap();
                let yd = md.forward(x, Mode::Train).unwrap();
                assert!(
                    max_rel(&yf, &yd) < 1e-4,
                    "{what}: outputs differ by {}",
                    max_rel(&yf, &yd)
                );
                let dy = rand(yf.shape(), 10);
                mf.session.backward(dy.clone()).unwrap();
                md.session.backward(dy).unwrap();
                let pf = params(&mf);
                let pd = params(&md);
                let dw = pd["conv.weight"]
                    .1
                    .clone()
                    .into_dimensionality::<Ix4>()
                    .unwrap();
                if bias {
                    assert!(
                        max_rel(&pf["conv.bias"].1, &pd["conv.bias"].1) < 1e-4,
                        "{what}: bias grad"
                    );
                }
                if format == Format::Tucker2 {
                    let u1 = w4(&mf.graph, "conv/tucker2/u1.weight");
                    let g = w4(&mf.graph, "conv/tucker2/core.weight");
                    let u2 = w4(&mf.graph, "conv/tucker2/u2.weight");
                    // dL/dU2[o,b] = sum dW[o,i,h,w] G[b,a,h,w] U1[a,i], and so on.
                    let (co, ci, kh, kw) = dw.dim();
                    let (ro, ri) = (g.shape()[0], g.shape()[1]);
                    let du2 = ArrayD::from_shape_fn(IxDyn(&[co, ro, 1, 1]), |ix| {
                        let (o, b) = (ix[0], ix[1]);
                        let mut s = 0.0f64;
                        for i in 0..ci {
                            for a in 0..ri {
                                for h in 0..kh {
                                    for q in 0..kw {
                                        s += (dw[[o, i, h, q]] * g[[b, a, h, q]] * u1[[a, i, 0, 0]])
                                            as f64;
                                    }
                                }
                            }
                        }
                        s as f32
                    });
                    let dg = ArrayD::from_shape_fn(IxDyn(&[ro, ri, kh, kw]), |ix| {
                        let (b, a, h, q) = (ix[0], ix[1], ix[2], ix[3]);
                        let mut s = 0.0f64;
                        for o in 0..co {
                            for i in 0..ci {
                                s +=
                                    (u2[[o, b, 0, 0]] * dw[[o, i, h, q]] * u1[[a, i, 0, 0]]) as f64;
                            }
                        }
                        s as f32
                    });
                    let du1 = ArrayD::from_shape_fn(IxDyn(&[ri, ci, 1, 1]), |ix| {
                        let (a, i) = (ix[0], ix[1]);
                        let mut s = 0.0f64;
                        for o in 0..co {
                            for b in 0..ro {
                                for h in 0..kh {
                                    for q in 0..kw {
                                        s += (dw[[o, i, h, q]] * u2[[o, b, 0, 0]] * g[[b, a, h, q]])
                                            as f64;
                                    }
                                }
                            }
                        }
                        s as f32
                    });
                    for (name, want) in [("u1", du1), ("core", dg), ("u2", du2)] {
                        let got = &pf[&format!("conv/tucker2/{name}.weight")].1;
                        assert!(
                            max_rel(got, &want) < 1e-3,
                            "{what}: d{name} off by {}",
                            max_rel(got, &want)
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_zoo_model_converts_and_runs_in_onnxruntime() {
    let python = common::require_python(&["onnx", "onnxruntime", "numpy"]);
    let dir = common::repo().join("models");
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = 0;
    let entries = common::manifest(&dir);
    for e in &entries {
        let path = dir.join(&e.file);
        if !path.exists() {
            continue;
        }
        for (format, ranks) in [("tucker2", "ratio=0.5"), ("cp", "ratio=0.5")] {
            let out = tmp.path().join(format!("{format}_{}", e.file));
            let o = std::process::Command::new(env!("CARGO_BIN_EXE_elrt"))
                .args([
                    "convert",
                    path.to_str().unwrap(),
                    "--format",
                    format,
                    "--ranks",
                    ranks,
                    "-o",
                ])
                .arg(&out)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{}: {}",
                e.file,
                String::from_utf8_lossy(&o.stderr)
            );
            // The converted file loads in the engine, and passes onnx.checker (full check) and
            // computes in onnxruntime what the engine computes, at a batch it was not written
            // for (the source is no reference here: ranks at half the parameters change the
            // outputs).
            let batch = 3;
            let mut m =
                Model::load(&out, batch).unwrap_or_else(|err| panic!("{}: {err:#}", out.display()));
            checked += 1;
            if python {
                let mut shape = e.input_shape.clone();
                shape[0] = batch;
                let mut r = elrt::rng::Rng::new(5);
                let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&shape), |_| r.normal());
                let mode = if e.file.contains("eval") {
                    elrt::engine::exec::Mode::Eval
                } else {
                    elrt::engine::exec::Mode::Train
                };
                let ours = m.forward(x.clone(), mode).unwrap();
                let theirs = common::ort_forward_checked(&out, &x, true);
                let d = common::rel_diff(&ours, &theirs);
                assert!(
                    d < 1e-4,
                    "{format} {}: engine vs onnxruntime {d:.2e}",
                    e.file
                );
            }
        }
    }
    let want = 2 * common::zoo_minimum(entries.len());
    assert!(
        checked >= want,
        "only {checked} of {want} conversions checked"
    );
}

fn convert_fails(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_elrt"))
        .arg("convert")
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

/// A ranks file that names some layers leaves the others dense, and the report says why
/// (an empty status read as if the layer had been forgotten).
#[test]
fn ranks_file_leaves_unlisted_layers_dense_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ranks.json");
    std::fs::write(&path, r#"{"layer2.0.conv2": [16, 16]}"#).unwrap();
    let mut g = elrt::onnx::read_file(&common::repo().join("models/resnet20.onnx")).unwrap();
    let facts = simplified(&mut g, &[1, 3, 32, 32]);
    let opts = ConvertOptions {
        ranks: RankPolicy::File(path),
        rank_multiple: 8,
        include_first: false,
        ..convert_opts(Format::Tucker2)
    };
    let rep = convert(&mut g, &facts, &opts).unwrap();
    let status = |layer: &str| {
        rep.iter()
            .find(|l| l.layer == layer)
            .map(|l| l.status.clone())
            .unwrap()
    };
    assert_eq!(status("layer2.0.conv2"), "factorized");
    assert_eq!(
        status("layer1.0.conv1"),
        "not in the ranks file: left as it is"
    );
    assert!(
        status("conv1").starts_with("first conv"),
        "{}",
        status("conv1")
    );
    assert_eq!(rep.iter().filter(|l| l.status == "factorized").count(), 1);
}

#[test]
fn bad_requests_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let r20 = common::repo().join("models/resnet20.onnx");
    let mb = common::repo().join("models/mobilenetv2.onnx");
    let out = tmp.path().join("o.onnx");
    let (r20, mb, out) = (
        r20.to_str().unwrap(),
        mb.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    for bad in ["ratio=0", "ratio=1.2", "ratio=-1", "ratio=abc"] {
        let e = convert_fails(&[r20, "--ranks", bad, "-o", out]);
        assert!(e.contains("--ranks"), "{e}");
    }
    let ranks = tmp.path().join("ranks.json");
    std::fs::write(
        &ranks,
        r#"{"layer1.0.conv1": [8, 8], "layer9.conv": [8, 8]}"#,
    )
    .unwrap();
    let e = convert_fails(&[r20, "--ranks", ranks.to_str().unwrap(), "-o", out]);
    assert!(e.contains("unknown layer 'layer9.conv'"), "{e}");
    // A depthwise conv of MobileNetV2 named for CP.
    let g = elrt::onnx::read_file(std::path::Path::new(mb)).unwrap();
    let dw = g
        .nodes
        .iter()
        .find(|n| matches!(&n.op, Op::Conv(c) if c.group > 1))
        .map(|n| n.inputs[1].strip_suffix(".weight").unwrap().to_string())
        .unwrap();
    std::fs::write(&ranks, format!(r#"{{"{dw}": 8}}"#)).unwrap();
    let e = convert_fails(&[
        mb,
        "--format",
        "cp",
        "--ranks",
        ranks.to_str().unwrap(),
        "-o",
        out,
    ]);
    assert!(e.contains("CP asked of a grouped conv"), "{e}");
    let e = convert_fails(&[r20, "--format", "svd", "-o", out]);
    assert!(e.contains("tucker2 or cp"), "{e}");
    let e = convert_fails(&[r20, "--ranks", "energy=0.9", "-o", out]);
    assert!(e.contains("--init decompose"), "{e}");
    assert!(
        !std::path::Path::new(out).exists(),
        "a failed convert must not write"
    );
}

#[test]
fn inspect_compares_original_and_factorized_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let r20 = common::repo().join("models/resnet20.onnx");
    let out = tmp.path().join("t2.onnx");
    succeeds([
        "convert",
        r20.to_str().unwrap(),
        "--ranks",
        "ratio=0.5",
        "-o",
        out.to_str().unwrap(),
    ]);
    let c = elrt::inspect::compare(&r20, &out, &[]).unwrap();
    assert_eq!(c.totals_a.params, 272_474);
    assert_eq!(c.totals_b.params, 102_362);
    let l = c
        .layers
        .iter()
        .find(|l| l.layer == "layer1.0.conv1")
        .unwrap();
    // 16 -> 8 -> 8 -> 16 channels, 3x3 core: 128 + 576 + 128 params.
    assert_eq!((l.params_a, l.params_b), (2304, 832));
    let first = c.layers.iter().find(|l| l.layer == "conv1").unwrap();
    assert_eq!(
        first.params_a, first.params_b,
        "the first conv stays full rank"
    );
    // Every factor is grouped under a source layer: no layer exists only in B.
    assert!(
        c.layers.iter().all(|l| l.params_a > 0 || l.macs_a > 0),
        "{:?}",
        c.layers
    );
    // SVD factors too: the classifier factorized by --include-gemm groups under `fc`.
    let svd = tmp.path().join("svd.onnx");
    succeeds([
        "convert",
        r20.to_str().unwrap(),
        "--ranks",
        "ratio=0.5",
        "--include-gemm",
        "-o",
        svd.to_str().unwrap(),
    ]);
    let c = elrt::inspect::compare(&r20, &svd, &[]).unwrap();
    let fc = c.layers.iter().find(|l| l.layer == "fc").unwrap();
    assert!(fc.params_b > 0 && fc.params_b < fc.params_a, "{fc:?}");
    assert!(
        c.layers.iter().all(|l| l.params_a > 0 || l.macs_a > 0),
        "{:?}",
        c.layers
    );
}

/// x [2, 8, 11, 10] -> Conv 1x1 (12 out, stride 2, pads 1) -> Flatten.
fn one_pointwise(bias: bool) -> Graph {
    let mut g = one_conv([2, 2], [1, 1, 1, 1], [1, 1], bias);
    g.initializers
        .insert("conv.weight".into(), Tensor::F32(rand(&[12, 8, 1, 1], 4)));
    if let Op::Conv(c) = &mut g.nodes[0].op {
        c.kernel_shape = Some(vec![1, 1]);
    }
    g
}

#[test]
fn pointwise_svd_equals_its_composed_kernel_and_decomposes_exactly() {
    for bias in [false, true] {
        for init in [InitMode::Scratch, InitMode::Orthogonal, InitMode::Decompose] {
            let mut src = one_pointwise(bias);
            if init == InitMode::Decompose {
                // A rank-4 kernel, so that the rank-4 SVD must reproduce it exactly.
                let (a, b) = (rand(&[12, 4], 6), rand(&[4, 8], 7));
                let w = Array4::from_shape_fn((12, 8, 1, 1), |(o, i, _, _)| {
                    (0..4).map(|k| a[[o, k]] * b[[k, i]]).sum::<f32>()
                });
                src.initializers
                    .insert("conv.weight".into(), Tensor::F32(w.into_dyn()));
            }
            let mut g = src.clone();
            let facts = simplified(&mut g, &[2, 8, 11, 10]);
            let r = 4;
            let opts = ConvertOptions {
                format: Format::Tucker2,
                ranks: RankPolicy::Explicit(BTreeMap::from([("conv".to_string(), vec![r])])),
                rank_multiple: 1,
                include_first: true,
                include_pointwise: true,
                include_gemm: false,
                init,
                seed: 5,
                hooi_iters: 5,
                cp_iters: 10,
            };
            let rep = convert(&mut g, &facts, &opts).unwrap();
            assert_eq!(rep[0].status, "factorized", "{rep:?}");
            assert_eq!(
                rep[0].params_after,
                (8 * r + r * 12 + if bias { 12 } else { 0 }) as u64
            );
            let u1 = w4(&g, "conv/svd/u1.weight");
            let u2 = w4(&g, "conv/svd/u2.weight");
            assert_eq!(u1.shape(), [r, 8, 1, 1]);
            assert_eq!(u2.shape(), [12, r, 1, 1]);
            let w = Array4::from_shape_fn((12, 8, 1, 1), |(o, i, _, _)| {
                (0..r)
                    .map(|a| u2[[o, a, 0, 0]] * u1[[a, i, 0, 0]])
                    .sum::<f32>()
            });
            if init == InitMode::Decompose {
                let e = rep[0].rel_error.unwrap();
                assert!(e < 1e-5, "rank-4 SVD of a rank-4 kernel: error {e}");
                let orig = w4(&src, "conv.weight");
                let d = max_rel(&w.clone().into_dyn(), &orig.into_dyn());
                assert!(d < 1e-4, "composed kernel vs original: {d}");
            }
            let mut dense = src.clone();
            dense
                .initializers
                .insert("conv.weight".into(), Tensor::F32(w.into_dyn()));
            let x = rand(&[2, 8, 11, 10], 9);
            let mut mf = Model::from_graph(g, 2).unwrap();
            let mut md = Model::from_graph(dense, 2).unwrap();
            let yf = mf.forward(x.clone(), Mode::Eval).unwrap();
            let yd = md.forward(x, Mode::Eval).unwrap();
            let d = max_rel(&yf, &yd);
            assert!(d < 1e-5, "bias {bias} {init:?}: {d}");
            // DSO sees both factors, with rank r.
            let terms = elrt::train::dso::terms(&mf.session.program);
            assert_eq!(terms.len(), 2);
            assert!(terms.iter().all(|t| t.rank == r));
        }
    }
}

#[test]
fn mobilenetv2_factorizes_its_pointwise_convs_with_include_1x1() {
    let tmp = tempfile::tempdir().unwrap();
    let m = common::repo().join("models/mobilenetv2.onnx");
    let o = tmp.path().join("mb.onnx");
    let out = succeeds([
        "convert",
        m.to_str().unwrap(),
        "--include-1x1",
        "--ranks",
        "params=0.5",
        "--json",
        "-o",
        o.to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (p0, p1) = (
        r["params_before"].as_u64().unwrap(),
        r["params_after"].as_u64().unwrap(),
    );
    assert!(p1 as f64 <= 0.52 * p0 as f64, "{p0} -> {p1}");
    let svd = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["status"] == "factorized")
        .count();
    assert!(svd >= 30, "{svd} pointwise convs factorized");
    if common::require_python(&["onnxruntime", "numpy"]) {
        let mut e = Model::load(&o, 2).unwrap();
        let x = rand(&[2, 3, 32, 32], 3);
        let want = e.forward(x.clone(), Mode::Train).unwrap();
        let got = common::ort_forward(&o, &x);
        let d = max_rel(&got, &want);
        assert!(d < 1e-4, "onnxruntime vs engine {d}");
    }
}

#[test]
fn gemm_svd_equals_its_composed_weight() {
    let r20 = common::repo().join("models/resnet20.onnx");
    let src = elrt::onnx::read_file(&r20).unwrap();
    let mut g = src.clone();
    let facts = simplified(&mut g, &[2, 3, 32, 32]);
    let dense_src = g.clone();
    let opts = ConvertOptions {
        format: Format::Tucker2,
        ranks: RankPolicy::Explicit(BTreeMap::from([("fc".to_string(), vec![6])])),
        rank_multiple: 1,
        include_first: false,
        include_pointwise: false,
        include_gemm: true,
        init: InitMode::Decompose,
        seed: 1,
        hooi_iters: 5,
        cp_iters: 10,
    };
    let rep = convert(&mut g, &facts, &opts).unwrap();
    let fc = rep.iter().find(|l| l.layer == "fc").unwrap();
    assert_eq!(fc.status, "factorized");
    assert_eq!(fc.params_after, 64 * 6 + 6 * 10 + 10);
    assert!(fc.rel_error.unwrap() < 1.0);
    let u1 = g.initializers["fc/svd/u1.weight"].as_f32().unwrap().clone();
    let u2 = g.initializers["fc/svd/u2.weight"].as_f32().unwrap().clone();
    assert_eq!((u1.shape(), u2.shape()), (&[6, 64][..], &[10, 6][..]));
    let u1 = u1.into_dimensionality::<ndarray::Ix2>().unwrap();
    let u2 = u2.into_dimensionality::<ndarray::Ix2>().unwrap();
    // The dense model with W = U2 U1 (in the file's own Gemm layout) computes the same.
    let mut dense = dense_src;
    let fc_node = dense
        .nodes
        .iter()
        .find(|n| matches!(n.op, Op::Gemm(_)))
        .unwrap()
        .clone();
    let Op::Gemm(gm) = &fc_node.op else {
        unreachable!()
    };
    let w = u2.dot(&u1);
    let w = if gm.trans_b { w } else { w.t().to_owned() };
    dense
        .initializers
        .insert(fc_node.inputs[1].clone(), Tensor::F32(w.into_dyn()));
    let x = rand(&[2, 3, 32, 32], 4);
    let mut mf = Model::from_graph(g, 2).unwrap();
    let mut md = Model::from_graph(dense, 2).unwrap();
    let yf = mf.forward(x.clone(), Mode::Eval).unwrap();
    let yd = md.forward(x, Mode::Eval).unwrap();
    let d = max_rel(&yf, &yd);
    assert!(d < 1e-5, "{d}");
    let terms = elrt::train::dso::terms(&mf.session.program);
    assert_eq!(
        terms.iter().filter(|t| t.rank == 6).count(),
        2,
        "DSO on both Gemm factors"
    );
}

fn std_of(a: &Array4<f32>) -> f32 {
    let n = a.len() as f32;
    let mean = a.sum() / n;
    (a.mapv(|v| (v - mean) * (v - mean)).sum() / n).sqrt()
}

/// The converter's from-scratch factors compose to a kernel with Kaiming's fan-out variance;
/// `train --init factors` keeps them while re-initialising everything else, and
/// `train --init scratch` treats each factor as its own conv, which doubles the composed std;
/// `--orth-no-decay` takes exactly U1 and U2 out of weight decay.
#[test]
fn factor_init_composes_to_kaiming_train_init_factors_keeps_it_and_orth_no_decay_spares_u() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/resnet20.onnx");
    let r20 = elrt::onnx::read_file(&path).unwrap();
    let opts = ConvertOptions {
        rank_multiple: 8,
        include_first: false,
        seed: 0,
        ..convert_opts(Format::Tucker2)
    };
    let g = convert_with(&r20, &[1, 3, 32, 32], &opts);
    let layer = "layer3.1.conv1/tucker2";
    let composed = |g: &Graph| {
        tucker_compose(
            &w4(g, &format!("{layer}/u1.weight")),
            &w4(g, &format!("{layer}/core.weight")),
            &w4(g, &format!("{layer}/u2.weight")),
        )
    };
    let kaiming = (2.0f32 / (64.0 * 9.0)).sqrt();
    let s = std_of(&composed(&g));
    assert!(
        (s / kaiming - 1.0).abs() < 0.1,
        "converter: {s} vs {kaiming}"
    );

    let mut kept = g.clone();
    elrt::train::init::init_except_factors(&mut kept, 5).unwrap();
    let mut fresh = g.clone();
    elrt::train::init::init_from_scratch(&mut fresh, 5).unwrap();
    for (name, t) in &g.initializers {
        if elrt::lowrank::naming::is_factor_weight(name) {
            assert_eq!(&kept.initializers[name], t, "{name} kept");
        } else {
            assert_eq!(kept.initializers[name], fresh.initializers[name], "{name}");
        }
    }
    assert!(g.initializers.keys().any(|n| n == "bn1.running_var"));
    // --orth-no-decay: U1 and U2 leave weight decay, the core and the other weights keep it.
    let mut m = Model::from_graph(fresh.clone(), 1).unwrap();
    let before: Vec<bool> = m.session.program.params.iter().map(|p| p.decay).collect();
    let terms = elrt::train::dso::terms(&m.session.program);
    assert_eq!(terms.len(), 2 * 18, "U1 and U2 of 18 layers");
    elrt::train::dso::exempt_from_decay(&mut m.session.program, &terms);
    for (p, was) in m.session.program.params.iter().zip(before) {
        let factor_matrix = p.name.ends_with("/u1.weight") || p.name.ends_with("/u2.weight");
        assert_eq!(p.decay, was && !factor_matrix, "{}", p.name);
        if p.name.ends_with("/core.weight") {
            assert!(p.decay, "{}", p.name);
        }
    }
    let s = std_of(&composed(&fresh));
    assert!(
        (s / kaiming - 2.0).abs() < 0.2,
        "per-conv: {s} vs 2 x {kaiming}"
    );
}

/// Any ratio/params/macs policy, rank multiple, format, init and include flags on the committed
/// models: the rewrite either reports valid ranks (1 to the channel count, fewer params and
/// MACs per factorized layer) on a graph the engine compiles and runs, or returns an error;
/// never a panic. `ELRT_PROPTEST_CASES` runs more cases.
#[test]
fn any_rank_request_on_the_zoo_converts_validly_or_is_refused() {
    use proptest::prelude::*;
    let files = ["resnet20.onnx", "resnet20_eval.onnx", "mobilenetv2.onnx"];
    let graphs: Vec<Graph> = files
        .iter()
        .map(|f| elrt::onnx::read_file(&common::repo().join("models").join(f)).unwrap())
        .collect();
    // ELRT_PROPTEST_CASES=N for a longer (still deterministic) hunt.
    let (mut runner, cases) = common::prop_runner(24);
    let request = (
        (0..files.len(), 0..3usize, 0.0f32..1.2, 1..17usize),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
        ),
    );
    let converted = std::cell::Cell::new(0);
    runner
        .run(
            &request,
            |((file, policy, f, multiple), (cp, first, pw, gemm, orth))| {
                let ranks = match policy {
                    0 => RankPolicy::Ratio(f),
                    1 => RankPolicy::Params(f),
                    _ => RankPolicy::Macs(f),
                };
                let opts = ConvertOptions {
                    format: if cp { Format::Cp } else { Format::Tucker2 },
                    ranks,
                    rank_multiple: multiple,
                    include_first: first,
                    include_pointwise: pw,
                    include_gemm: gemm,
                    init: if orth {
                        InitMode::Orthogonal
                    } else {
                        InitMode::Scratch
                    },
                    seed: 1,
                    hooi_iters: 2,
                    cp_iters: 2,
                };
                let mut g = graphs[file].clone();
                let facts = simplified(&mut g, &[1, 3, 32, 32]);
                let Ok(report) = convert(&mut g, &facts, &opts) else {
                    return Ok(());
                };
                for l in report.iter().filter(|l| l.status == "factorized") {
                    prop_assert!(l.ranks.iter().all(|&r| r >= 1), "{l:?}");
                    // Tucker-2 ranks are bounded by the channels they compress (r_in <= C_in,
                    // r_out <= C_out); a CP rank is not bounded by any one mode.
                    if !cp && l.ranks.len() == 2 {
                        let (co, ci) = (l.weight_shape[0], l.weight_shape[1]);
                        prop_assert!(l.ranks[0] <= ci && l.ranks[1] <= co, "{l:?}");
                    }
                    prop_assert!(
                        l.params_after < l.params_before || l.macs_after < l.macs_before,
                        "{l:?}"
                    );
                }
                let mut m = Model::from_graph(g, 1).unwrap();
                let y = m.forward(rand(&[1, 3, 32, 32], 4), Mode::Eval).unwrap();
                prop_assert!(y.iter().all(|v| v.is_finite()));
                converted.set(converted.get() + 1);
                Ok(())
            },
        )
        .unwrap();
    assert!(
        converted.get() * 4 >= cases as usize,
        "{} converted",
        converted.get()
    );
}
