//! Files as users' exporters write them: weights in an external data file, a batch fixed at
//! export (with constants that carry it), a final Softmax over `[N, K, 1, 1]` scores, opset 8.
//! Each is built here from elrt's IR or from ResNet-20's protobuf, so the tests need no PyTorch;
//! onnxruntime (when installed) is the judge of what the files compute.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::ir::ops::*;
use elrt::ir::{Dim, ElemType, Graph, ModelMeta, Node, Op, Tensor, ValueInfo};
use elrt::rng::Rng;
use ndarray::{ArrayD, Axis, IxDyn};
use onnx_protobuf::{Message, ModelProto, StringStringEntryProto};

fn node(name: &str, op: Op, inputs: &[&str], outputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    }
}

fn conv(pads: usize) -> Op {
    Op::Conv(Conv {
        kernel_shape: None,
        strides: vec![],
        pads: vec![pads; 4],
        dilations: vec![],
        group: 1,
        auto_pad: AutoPad::NotSet,
    })
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::f32(shape, (0..n).map(|_| 0.3 * r.normal()).collect()).unwrap()
}

fn io(name: &str, dims: &[Dim]) -> ValueInfo {
    ValueInfo {
        name: name.into(),
        elem: ElemType::F32,
        shape: Some(dims.to_vec()),
    }
}

/// Conv 3 -> 4 (3x3) -> Relu -> Reshape to `target` -> Gemm to 10 classes, input `[1, 3, 8, 8]`
/// fixed: the flatten of a fixed-batch export, whose target carries the batch.
fn fixed_batch_graph(target: &[i64], allowzero: bool) -> Graph {
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), random(&[4, 3, 3, 3], 1));
    init.insert("fc_w".to_string(), random(&[10, 256], 2));
    init.insert("fc_b".to_string(), random(&[10], 3));
    init.insert("target".to_string(), Tensor::i64_vec(target));
    Graph {
        name: "fixed".into(),
        opset: 14,
        inputs: vec![io(
            "x",
            &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)],
        )],
        outputs: vec![io("logits", &[Dim::Fixed(1), Dim::Fixed(10)])],
        nodes: vec![
            node("conv", conv(1), &["x", "w"], &["c"]),
            node("relu", Op::Relu, &["c"], &["r"]),
            node(
                "flatten",
                Op::Reshape { allowzero },
                &["r", "target"],
                &["f"],
            ),
            node(
                "fc",
                Op::Gemm(Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                }),
                &["f", "fc_w", "fc_b"],
                &["logits"],
            ),
        ],
        initializers: init,
        meta: ModelMeta::default(),
    }
}

fn images(n: usize, seed: u64) -> ArrayD<f32> {
    let mut r = Rng::new(seed);
    ArrayD::from_shape_fn(IxDyn(&[n, 3, 8, 8]), |_| r.normal())
}

/// The freed graph at batch 5 gives, image by image, what the file gives at its own batch 1.
fn assert_batch_independent(g: &Graph) {
    let x = images(5, 9);
    let mut m5 = Model::from_graph(g.clone(), 5).unwrap();
    let y5 = m5.forward(x.clone(), Mode::Eval).unwrap();
    let mut m1 = Model::from_graph(g.clone(), 1).unwrap();
    for i in 0..5 {
        let xi = x.index_axis(Axis(0), i).insert_axis(Axis(0)).to_owned();
        let yi = m1.forward(xi, Mode::Eval).unwrap();
        let want = yi.index_axis(Axis(0), 0);
        let got = y5.index_axis(Axis(0), i);
        assert!(got.iter().all(|v| v.is_finite()), "image {i}: not finite");
        let d = want
            .iter()
            .zip(got.iter())
            .fold(0f32, |a, (p, q)| a.max((p - q).abs()));
        assert!(d < 1e-5, "image {i}: {d}");
    }
}

#[test]
fn a_file_with_a_fixed_batch_runs_at_any_batch() {
    // TorchScript export: Reshape [1, -1]; dynamo export: [1, 256] with allowzero (0 would mean
    // an empty axis there, so the batch entry becomes -1).
    for (target, allowzero) in [(vec![1, -1], false), (vec![1, 256], true)] {
        let g = fixed_batch_graph(&target, allowzero);
        assert_batch_independent(&g);
        let m = Model::from_graph(g.clone(), 5).unwrap();
        assert!(m
            .graph
            .meta
            .metadata_props
            .contains(&("elrt.source_batch".into(), "1".into())));
        assert_eq!(
            m.graph.inputs[0].shape.as_ref().unwrap()[0],
            Dim::Sym("N".into())
        );
    }
}

#[test]
fn a_graph_that_mixes_the_batch_is_refused_naming_the_node() {
    // A ReduceMean over axis 0 (keepdims): [1, 4, 8, 8] at every batch, so the output does not
    // follow the batch.
    let mut g = fixed_batch_graph(&[1, -1], false);
    g.nodes.insert(
        2,
        node(
            "batch_mean",
            Op::ReduceMean(ReduceMean {
                axes: Some(vec![0]),
                keepdims: true,
                noop_with_empty_axes: false,
            }),
            &["r"],
            &["rm"],
        ),
    );
    g.nodes[3].inputs[0] = "rm".into();
    let err = format!("{:#}", Model::from_graph(g, 4).err().unwrap());
    assert!(err.contains("'logits' does not follow the batch"), "{err}");
    // A Reshape that folds the batch into the channels: [1, 4, 8, 8] -> [4, 64] does not run at
    // another batch, and the message says to re-export.
    let mut g = fixed_batch_graph(&[4, -1], false);
    g.initializers.insert("fc_w".into(), random(&[10, 64], 2));
    g.outputs[0].shape = Some(vec![Dim::Fixed(4), Dim::Fixed(10)]);
    let err = format!("{:#}", Model::from_graph(g, 3).err().unwrap());
    assert!(
        err.contains("node 'flatten' (Reshape)") && err.contains("dynamic batch"),
        "{err}"
    );
}

#[test]
fn the_export_keeps_the_source_batch_convention() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("fixed.onnx");
    elrt::onnx::write_file(&fixed_batch_graph(&[1, -1], false), &src).unwrap();
    // Trained at batch 4, written freed (symbolic batch, source batch in the metadata).
    let trained = tmp.path().join("trained.onnx");
    common::succeeds([
        "train",
        src.to_str().unwrap(),
        "--data",
        "synthetic:32,8",
        "--batch",
        "4",
        "--epochs",
        "1",
        "--quiet",
        "-o",
        trained.to_str().unwrap(),
    ]);
    let declared = |p: &Path| {
        elrt::onnx::read_file(p).unwrap().inputs[0]
            .shape
            .clone()
            .unwrap()[0]
            .clone()
    };
    assert_eq!(declared(&trained), Dim::Sym("N".into()));
    for (extra, want) in [
        (vec![], Dim::Fixed(1)),
        (vec!["--batch", "3"], Dim::Fixed(3)),
        (vec!["--dynamic-batch"], Dim::Sym("N".into())),
    ] {
        let out = tmp.path().join("compact.onnx");
        let mut args = vec![
            "export",
            trained.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--forms",
            "factorized",
            "--quiet",
        ];
        args.extend(&extra);
        common::succeeds(&args);
        assert_eq!(declared(&out), want, "{extra:?}");
    }
}

/// ResNet-20 (eval form) with every float initializer moved to side files: most into `weights.bin` with
/// offsets (as PyTorch writes `model.onnx.data`), one into a file of its own with neither
/// offset nor length (the whole file).
fn with_external_data(dir: &Path) -> std::path::PathBuf {
    let bytes = std::fs::read(common::repo().join("models/resnet20_eval.onnx")).unwrap();
    let mut m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let mut blob = Vec::new();
    let entry = |k: &str, v: String| {
        let mut e = StringStringEntryProto::new();
        e.key = k.into();
        e.value = v;
        e
    };
    for (i, t) in m.graph.as_mut().unwrap().initializer.iter_mut().enumerate() {
        if t.raw_data.is_empty() || t.data_type != 1 {
            continue;
        }
        let data = std::mem::take(&mut t.raw_data);
        if i == 0 {
            std::fs::write(dir.join("first.bin"), &data).unwrap();
            t.external_data = vec![entry("location", "first.bin".into())];
        } else {
            t.external_data = vec![
                entry("location", "weights.bin".into()),
                entry("offset", blob.len().to_string()),
                entry("length", data.len().to_string()),
            ];
            blob.extend(data);
        }
        t.data_location = onnx_protobuf::tensor_proto::DataLocation::EXTERNAL.into();
    }
    std::fs::write(dir.join("weights.bin"), blob).unwrap();
    let path = dir.join("external.onnx");
    std::fs::write(&path, m.write_to_bytes().unwrap()).unwrap();
    path
}

#[test]
fn external_data_is_read_from_beside_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let path = with_external_data(tmp.path());
    assert!(
        std::fs::metadata(&path).unwrap().len() < 100_000,
        "weights left inline"
    );
    let inline = elrt::onnx::read_file(&common::repo().join("models/resnet20_eval.onnx")).unwrap();
    let ext = elrt::onnx::read_file(&path).unwrap();
    assert_eq!(ext.initializers, inline.initializers);
    assert_eq!(ext.nodes, inline.nodes);
    // Every command reads it; tract too (bench), and onnxruntime agrees with the engine.
    let params = |p: &Path| {
        let out = common::succeeds(["inspect", p.to_str().unwrap(), "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        r["totals"]["params"].as_u64().unwrap()
    };
    assert_eq!(
        params(&path),
        params(&common::repo().join("models/resnet20_eval.onnx"))
    );
    common::succeeds([
        "bench",
        path.to_str().unwrap(),
        "--runs",
        "3",
        "--min-seconds",
        "0",
        "--warmup",
        "1",
    ]);
    if common::require_python(&["onnxruntime", "numpy"]) {
        let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 32, 32]), |i| (i[3] as f32 * 0.1).sin());
        let mut m = Model::load(&path, 2).unwrap();
        let ours = m.forward(x.clone(), Mode::Eval).unwrap();
        let theirs = common::ort_forward(&path, &x);
        assert!(common::rel_diff(&ours, &theirs) < 1e-4);
    }
}

#[test]
fn bad_external_data_gets_one_line_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = with_external_data(tmp.path());
    let bytes = std::fs::read(&path).unwrap();
    let cases: [(&str, &str, &str); 4] = [
        ("location", "../weights.bin", "inside the model's folder"),
        ("location", "/etc/hostname", "inside the model's folder"),
        (
            "location",
            "missing.bin",
            "cannot read its external data file",
        ),
        ("offset", "999999999", "beyond the end"),
    ];
    for (key, value, want) in cases {
        let mut m = ModelProto::parse_from_bytes(&bytes).unwrap();
        let t = &mut m.graph.as_mut().unwrap().initializer[1];
        let name = t.name.clone();
        for e in t.external_data.iter_mut().filter(|e| e.key == key) {
            e.value = value.into();
        }
        let bad = tmp.path().join("bad.onnx");
        std::fs::write(&bad, m.write_to_bytes().unwrap()).unwrap();
        let err = common::fails_cleanly(&["inspect", bad.to_str().unwrap()]);
        assert!(
            err.contains(&format!("initializer '{name}'")) && err.contains(want),
            "{key}={value}: {err}"
        );
    }
}

/// A Caffe2-era classifier: conv -> global pool -> Softmax (opset 9, the input seen as 2-D)
/// over `[N, 10, 1, 1]` scores, the file's output.
fn softmax_graph() -> Graph {
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), random(&[10, 3, 3, 3], 4));
    Graph {
        name: "caffe2".into(),
        opset: 9,
        inputs: vec![io(
            "x",
            &[
                Dim::Sym("N".into()),
                Dim::Fixed(3),
                Dim::Fixed(8),
                Dim::Fixed(8),
            ],
        )],
        outputs: vec![io(
            "prob",
            &[
                Dim::Sym("N".into()),
                Dim::Fixed(5),
                Dim::Fixed(1),
                Dim::Fixed(1),
            ],
        )],
        nodes: vec![
            node("conv", conv(0), &["x", "w"], &["c"]),
            node("gap", Op::GlobalAveragePool, &["c"], &["g"]),
            node(
                "softmax",
                Op::Softmax {
                    axis: 1,
                    axes: SoftmaxAxes::Flattened,
                },
                &["g"],
                &["prob"],
            ),
        ],
        initializers: init,
        meta: ModelMeta::default(),
    }
}

#[test]
fn a_final_softmax_is_trained_through_its_logits_and_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("softmax.onnx");
    elrt::onnx::write_file(&softmax_graph(), &path).unwrap();
    let mut m = Model::load(&path, 3).unwrap();
    assert_eq!(m.classes, 10);
    let x = images(3, 5);
    // forward gives the logits (what cross-entropy wants); forward_output the file's output.
    let logits = m.forward(x.clone(), Mode::Eval).unwrap();
    assert_eq!(logits.shape(), [3, 10]);
    let probs = m.forward_output(x.clone(), Mode::Eval).unwrap();
    assert_eq!(probs.shape(), [3, 10, 1, 1]);
    for row in probs.outer_iter() {
        assert!((row.sum() - 1.0).abs() < 1e-5);
    }
    if common::require_python(&["onnxruntime", "numpy"]) {
        let theirs = common::ort_forward(&path, &x);
        assert!(common::rel_diff(&probs, &theirs) < 1e-5);
    }
    // Trains, and exports at opset 13 (the Softmax now along axis 1, which means the same on
    // [N, 10, 1, 1]), validated in tract against the engine's file output.
    let trained = tmp.path().join("trained.onnx");
    common::succeeds([
        "train",
        path.to_str().unwrap(),
        "--data",
        "synthetic:32,8",
        "--batch",
        "4",
        "--epochs",
        "1",
        "--quiet",
        "-o",
        trained.to_str().unwrap(),
    ]);
    let compact = tmp.path().join("compact.onnx");
    common::succeeds([
        "export",
        trained.to_str().unwrap(),
        "-o",
        compact.to_str().unwrap(),
        "--forms",
        "factorized",
        "--quiet",
    ]);
    assert_eq!(elrt::onnx::read_file(&compact).unwrap().opset, 13);
}

/// The ONNX model zoo's MNIST (opset 8) in miniature: conv with its bias as a separate Add of a
/// `[C, 1, 1]` constant, max pool, and a classifier weight reshaped from a 4-D initializer by a
/// Reshape node (computed, then folded).
fn opset8_graph() -> Graph {
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), random(&[4, 3, 3, 3], 6));
    init.insert("b".to_string(), random(&[4, 1, 1], 7));
    init.insert("fc_w4".to_string(), random(&[4, 4, 4, 10], 8));
    init.insert("fc_shape".to_string(), Tensor::i64_vec(&[64, 10]));
    init.insert("flat_shape".to_string(), Tensor::i64_vec(&[1, 64]));
    init.insert("fc_b".to_string(), random(&[1, 10], 9));
    let pool = Op::Pool(Pool {
        kind: PoolKind::Max,
        kernel_shape: vec![2, 2],
        strides: vec![2, 2],
        pads: vec![0; 4],
        dilations: vec![],
        ceil_mode: false,
        auto_pad: AutoPad::NotSet,
        count_include_pad: false,
        storage_order: 0,
    });
    Graph {
        name: "mnist8".into(),
        opset: 8,
        inputs: vec![io(
            "x",
            &[Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(8), Dim::Fixed(8)],
        )],
        outputs: vec![io("logits", &[Dim::Fixed(1), Dim::Fixed(10)])],
        nodes: vec![
            node(
                "fc_weight",
                Op::Reshape { allowzero: false },
                &["fc_w4", "fc_shape"],
                &["fc_w"],
            ),
            node("conv", conv(1), &["x", "w"], &["c"]),
            node("plus", Op::Add, &["c", "b"], &["cb"]),
            node("relu", Op::Relu, &["cb"], &["r"]),
            node("pool", pool, &["r"], &["p"]),
            node(
                "flat",
                Op::Reshape { allowzero: false },
                &["p", "flat_shape"],
                &["f"],
            ),
            node("times", Op::MatMul, &["f", "fc_w"], &["t"]),
            node("plus2", Op::Add, &["t", "fc_b"], &["logits"]),
        ],
        initializers: init,
        meta: ModelMeta::default(),
    }
}

#[test]
fn an_opset_8_model_reads_trains_and_matches_onnxruntime() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mnist8.onnx");
    elrt::onnx::write_file(&opset8_graph(), &path).unwrap();
    assert_eq!(elrt::onnx::read_file(&path).unwrap().opset, 8);
    assert_batch_independent(&opset8_graph());
    if common::require_python(&["onnx", "onnxruntime", "numpy"]) {
        let x = images(1, 3);
        let mut m = Model::load(&path, 1).unwrap();
        let ours = m.forward(x.clone(), Mode::Eval).unwrap();
        let theirs = common::ort_forward_checked(&path, &x, true);
        assert!(common::rel_diff(&ours, &theirs) < 1e-5);
    }
    let out = tmp.path().join("trained.onnx");
    common::succeeds([
        "train",
        path.to_str().unwrap(),
        "--data",
        "synthetic:32,8",
        "--batch",
        "8",
        "--epochs",
        "1",
        "--quiet",
        "-o",
        out.to_str().unwrap(),
    ]);
}

/// Two convs whose TorchScript scopes give the same module path (exporters repeat
/// `block.0.0` across blocks) and whose weights have generated names: the converter names
/// them apart, and a ranks file addresses each.
#[test]
fn repeated_layer_names_are_made_unique() {
    let mut init = BTreeMap::new();
    init.insert("onnx::Conv_1".to_string(), random(&[16, 3, 3, 3], 1));
    init.insert("onnx::Conv_2".to_string(), random(&[16, 16, 3, 3], 2));
    init.insert("onnx::Conv_3".to_string(), random(&[16, 16, 3, 3], 3));
    let mut g = softmax_graph();
    g.initializers = init;
    g.nodes = vec![
        node("/stem/Conv", conv(1), &["x", "onnx::Conv_1"], &["a"]),
        node(
            "/block/block.0/Conv",
            conv(1),
            &["a", "onnx::Conv_2"],
            &["b"],
        ),
        node(
            "/block/block.0/Conv_1",
            conv(1),
            &["b", "onnx::Conv_3"],
            &["c"],
        ),
        node("gap", Op::GlobalAveragePool, &["c"], &["prob"]),
    ];
    g.outputs[0].shape = Some(vec![
        Dim::Sym("N".into()),
        Dim::Fixed(16),
        Dim::Fixed(1),
        Dim::Fixed(1),
    ]);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("repeated.onnx");
    elrt::onnx::write_file(&g, &path).unwrap();
    let ranks = tmp.path().join("ranks.json");
    std::fs::write(&ranks, r#"{"block.0": [8, 8], "block.0_2": [4, 4]}"#).unwrap();
    let out = tmp.path().join("t2.onnx");
    let o = common::succeeds([
        "convert",
        path.to_str().unwrap(),
        "--ranks",
        ranks.to_str().unwrap(),
        "--rank-multiple",
        "1",
        "--json",
        "-o",
        out.to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let layers: Vec<(String, serde_json::Value)> = r["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["status"] == "factorized")
        .map(|l| (l["layer"].as_str().unwrap().to_string(), l["ranks"].clone()))
        .collect();
    assert_eq!(
        layers,
        [
            ("block.0".to_string(), serde_json::json!([8, 8])),
            ("block.0_2".to_string(), serde_json::json!([4, 4]))
        ]
    );
}

/// The onnx package's own test models (opset 9, Caffe2-era: weights made by ConstantOfShape,
/// a Softmax over `[N, 1000, 1, 1]` or `[N, 1000]`, Sum for the residual joins) read, train a
/// step and export. They stopped at "op 'ConstantOfShape' is not supported".
#[test]
fn onnx_package_light_models_read_train_and_export() {
    if !common::require_python(&["onnx"]) {
        return;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import onnx, os; print(os.path.join(os.path.dirname(onnx.__file__), 'backend', 'test', 'data', 'light'))",
        ])
        .output()
        .unwrap();
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for name in ["light_squeezenet.onnx", "light_resnet50.onnx"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        seen += 1;
        let p = path.to_str().unwrap();
        let trained = tmp.path().join(name);
        let t = trained.to_str().unwrap();
        common::succeeds(["inspect", p]);
        common::succeeds([
            "train",
            p,
            "--data",
            "synthetic:8,4",
            "--batch",
            "4",
            "--epochs",
            "1",
            "--quiet",
            "-o",
            t,
        ]);
        let compact = tmp.path().join(format!("compact_{name}"));
        common::succeeds([
            "export",
            t,
            "-o",
            compact.to_str().unwrap(),
            "--forms",
            "factorized",
            "--quiet",
        ]);
    }
    assert_eq!(
        seen,
        2,
        "the onnx package holds both light models in {}",
        dir.display()
    );
}

/// PyTorch's dynamo exporter stores equal tensors once: on an untrained model each BN's scale
/// and running variance are one initializer (ones), and BNs of equal width share theirs
/// (tests/fixtures/dynamo_shared_bn, made by scripts/make_dynamo_fixtures.py).
fn dynamo_shared_bn() -> std::path::PathBuf {
    common::repo().join("tests/fixtures/dynamo_shared_bn/model.onnx")
}

#[test]
fn initializers_the_dynamo_exporter_shared_are_read_as_pytorch_parameters() {
    let g = elrt::onnx::read_file(&dynamo_shared_bn()).unwrap();
    let bns: Vec<&Node> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm(_)))
        .collect();
    assert_eq!(bns.len(), 4);
    let modules = ["layer1.norm1", "transition.norm", "layer2.norm1", "norm5"];
    for (n, module) in bns.iter().zip(modules) {
        let want: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|role| format!("{module}.{role}"))
            .collect();
        assert_eq!(n.inputs[1..], want[..], "node '{}'", n.name);
    }
}

#[test]
fn bn_statistics_the_dynamo_exporter_shared_survive_training_and_export() {
    let tmp = tempfile::tempdir().unwrap();
    let mut m = Model::load(&dynamo_shared_bn(), 4).unwrap();
    // Training-mode passes move the running statistics away from the scale they shared a
    // tensor with (no optimiser step: the scales stay at one).
    for seed in 0..3 {
        let x = ArrayD::from_shape_fn(IxDyn(&[4, 3, 16, 16]), |i| {
            ((i[0] * 7 + i[1] * 3 + i[2] + 2 * i[3]) as f32 * 0.37 + seed as f32).sin() * 2.0 + 0.5
        });
        m.forward(x, Mode::Train).unwrap();
    }
    let path = tmp.path().join("trained.onnx");
    m.save(&path).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[4, 3, 16, 16]), |i| {
        ((i[1] + i[2] * i[3]) as f32 * 0.11).cos()
    });
    let ours = m.forward(x.clone(), Mode::Eval).unwrap();
    let mut back = Model::load(&path, 4).unwrap();
    let reread = back.forward(x.clone(), Mode::Eval).unwrap();
    assert!(
        common::rel_diff(&ours, &reread) < 1e-6,
        "the written file computes another function: {}",
        common::rel_diff(&ours, &reread)
    );
    if common::require_python(&["onnxruntime", "numpy"]) {
        let theirs = common::ort_forward(&path, &x);
        assert!(common::rel_diff(&ours, &theirs) < 1e-4);
    }
}

/// The engine's eval forward of `x` (a batch) equals, image by image within 1e-5 relative,
/// what tract computes on the ONNX file at `path` itself (batch 1).
fn engine_matches_tract_on_the_file(m: &mut Model, path: &Path, x: ArrayD<f32>) {
    let shape: Vec<usize> = std::iter::once(1)
        .chain(x.shape()[1..].iter().copied())
        .collect();
    let ours = m.forward(x.clone(), Mode::Eval).unwrap();
    let bytes = elrt::onnx::read::self_contained_bytes(path).unwrap();
    let mut tract = elrt::runtime::TractModel::from_bytes(&bytes, &shape, 1).unwrap();
    for (i, image) in x.outer_iter().enumerate() {
        let theirs = tract.run(&image.insert_axis(Axis(0)).to_owned()).unwrap();
        let mine = ours.index_axis(Axis(0), i).insert_axis(Axis(0)).to_owned();
        let d = common::rel_diff(&mine, &theirs);
        assert!(d < 1e-5, "image {i}: {d}");
    }
}

/// Adaptive average pools whose output does not divide the input (3x3 to 6x6 and to 5x5), as
/// the dynamo exporter writes them: Transpose, GatherND, Where masks, means
/// (tests/fixtures/dynamo_adaptive_pool, made by scripts/make_dynamo_fixtures.py).
#[test]
fn uneven_adaptive_pools_from_the_dynamo_exporter_compute_what_tract_computes_on_the_file() {
    let path = common::repo().join("tests/fixtures/dynamo_adaptive_pool/model.onnx");
    let mut m = Model::load(&path, 3).unwrap();
    let ops: Vec<&str> = m.graph.nodes.iter().map(|n| n.op.onnx_type()).collect();
    assert!(
        !ops.contains(&"GatherND") && !ops.contains(&"Where") && ops.contains(&"Gather"),
        "rewritten into Reshape + Gather and Mul: {ops:?}"
    );
    let mut r = Rng::new(9);
    let x = ArrayD::from_shape_fn(IxDyn(&[3, 3, 12, 12]), |_| r.normal());
    // tract reads GatherND and Where itself: the file as exported (batch 1) is the judge.
    engine_matches_tract_on_the_file(&mut m, &path, x);
    // Gradients flow through the rewritten pools: a short compress trains, exports and
    // validates the compact file in tract against the engine.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    common::succeeds([
        "compress",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--max-steps",
        "3",
        "--include-gemm",
        "--ranks",
        "ratio=0.5",
        "--quiet",
    ]);
    assert!(out.join("compact.onnx").exists());
}

/// PReLU (a slope per channel and one shared), ELU (alpha 0.8) and LeakyReLU as the dynamo
/// exporter writes them (tests/fixtures/dynamo_prelu_elu, made by
/// scripts/make_dynamo_fixtures.py): the engine's forward is tract's on the file itself, and a
/// short compress trains the slopes as parameters and writes each PRelu as Relu + Sub + Mul + Add
/// with its trained slope as the Mul's operand, and the Elu with an Exp (`export::act_split`);
/// read back, the file has its PRelu (slopes trainable) and Elu nodes again.
#[test]
fn prelu_and_elu_from_the_dynamo_exporter_compute_what_tract_computes_and_train() {
    let path = common::repo().join("tests/fixtures/dynamo_prelu_elu/model.onnx");
    let mut m = Model::load(&path, 5).unwrap();
    let ops: Vec<&str> = m.graph.nodes.iter().map(|n| n.op.onnx_type()).collect();
    assert!(ops.contains(&"PRelu") && ops.contains(&"Elu"), "{ops:?}");
    let mut r = Rng::new(4);
    let x = ArrayD::from_shape_fn(IxDyn(&[3, 3, 12, 12]), |_| r.normal());
    engine_matches_tract_on_the_file(&mut m, &path, x);
    let slopes = |g: &Graph| -> Vec<Vec<f32>> {
        g.nodes
            .iter()
            .filter(|n| n.op == Op::PRelu)
            .map(|n| g.initializers[&n.inputs[1]].to_f32s())
            .collect()
    };
    let source = elrt::onnx::read::read_file(&path).unwrap();
    let before = slopes(&source);
    assert_eq!(before.iter().map(Vec::len).collect::<Vec<_>>(), [8, 1]);
    let slope_names: Vec<&String> = source
        .nodes
        .iter()
        .filter(|n| n.op == Op::PRelu)
        .map(|n| &n.inputs[1])
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    common::succeeds([
        "compress",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--ranks",
        "ratio=0.5",
        "--quiet",
    ]);
    // The file: no PRelu; each slope read by exactly one Mul, whose other operand is a Sub.
    let bytes = std::fs::read(out.join("compact.onnx")).unwrap();
    let file = ModelProto::parse_from_bytes(&bytes).unwrap().graph.unwrap();
    let ops: Vec<&str> = file.node.iter().map(|n| n.op_type.as_str()).collect();
    assert!(
        !ops.contains(&"PRelu") && !ops.contains(&"Elu") && ops.contains(&"Exp"),
        "{ops:?}"
    );
    for name in &slope_names {
        let readers: Vec<_> = file
            .node
            .iter()
            .filter(|n| n.input.contains(name))
            .collect();
        assert_eq!(readers.len(), 1, "{name}");
        assert_eq!(readers[0].op_type, "Mul", "{name}");
        let sub = file
            .node
            .iter()
            .find(|n| n.output[0] == readers[0].input[0]);
        assert_eq!(sub.unwrap().op_type, "Sub", "{name}");
    }
    // Read back (for more training): PRelu again, with the trained slopes as its parameters.
    let compact = elrt::onnx::read::read_file(&out.join("compact.onnx")).unwrap();
    let elus: Vec<&Op> = (compact.nodes.iter())
        .map(|n| &n.op)
        .filter(|op| matches!(op, Op::Elu { .. }))
        .collect();
    assert_eq!(elus, [&Op::Elu { alpha: 0.8 }], "the ELU reads back whole");
    assert!(!compact.nodes.iter().any(|n| n.op == Op::Exp));
    let after = slopes(&compact);
    assert_eq!(after.len(), 2);
    let trainable = param_sizes(&out.join("compact.onnx"));
    for (name, b) in slope_names.iter().zip(&before) {
        assert_eq!(
            trainable.get(*name),
            Some(&b.len()),
            "{name} trains: {trainable:?}"
        );
    }
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a.len(), b.len());
        assert!(a != b, "a PReLU slope did not train: {b:?} -> {a:?}");
    }
}

/// A GroupNorm / InstanceNorm fixture as the dynamo exporter writes it (made by
/// scripts/make_dynamo_fixtures.py with PyTorch's parameter list in params.json): the engine's
/// forward is tract's on the file, the trainable parameters are PyTorch's in number and sizes,
/// and a short compress trains every norm's affine (leaving frozen constants as they were),
/// writes the per-channel operands at the activation's rank (`export::rank_align`) and keeps
/// the norm ops; onnxruntime runs the compact file as the engine does. Returns the compact
/// graph.
fn group_norm_fixture_trains_with_pytorchs_parameters(fixture: &str) -> Graph {
    let dir = common::repo().join("tests/fixtures").join(fixture);
    let path = dir.join("model.onnx");
    let mut m = Model::load(&path, 4).unwrap();
    let mut r = Rng::new(6);
    let x = ArrayD::from_shape_fn(IxDyn(&[3, 3, 12, 12]), |_| r.normal());
    engine_matches_tract_on_the_file(&mut m, &path, x);

    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
    let mut theirs: Vec<usize> = index["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[1].as_u64().unwrap() as usize)
        .collect();
    let mut ours: Vec<usize> = param_sizes(&path).into_values().collect();
    theirs.sort_unstable();
    ours.sort_unstable();
    assert_eq!(ours, theirs, "parameter sizes, elrt vs PyTorch");

    let is_norm = |n: &Node| matches!(n.op, Op::InstanceNorm { .. } | Op::GroupNorm { .. });
    // (name, values) of each norm's scale and bias.
    let norm_affine = |g: &Graph| -> Vec<(String, Vec<f32>)> {
        g.nodes
            .iter()
            .filter(|n| is_norm(n))
            .flat_map(|n| n.inputs[1..].to_vec())
            .map(|v| (v.clone(), g.initializers[&v].to_f32s()))
            .collect()
    };
    // Operands of each Mul by a parameter (more than one value).
    let scales = |g: &Graph| -> Vec<Tensor> {
        g.nodes
            .iter()
            .filter(|n| n.op == Op::Mul)
            .filter_map(|n| n.inputs.iter().find_map(|v| g.initializers.get(v)))
            .filter(|t| t.len() > 1)
            .cloned()
            .collect()
    };
    let source = elrt::onnx::read::read_file(&path).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    common::succeeds([
        "compress",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--max-steps",
        "4",
        "--ranks",
        "ratio=0.5",
        "--quiet",
    ]);
    let compact_path = out.join("compact.onnx");
    let compact = elrt::onnx::read::read_file(&compact_path).unwrap();
    let norm_ops = |g: &Graph| -> Vec<&'static str> {
        g.nodes
            .iter()
            .filter(|n| is_norm(n))
            .map(|n| n.op.onnx_type())
            .collect()
    };
    assert_eq!(norm_ops(&compact), norm_ops(&source));
    let (before, after) = (norm_affine(&source), norm_affine(&compact));
    assert_eq!(before.len(), 6);
    assert_eq!(after.len(), 6);
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if name.ends_with(".const") {
            assert_eq!(a, b, "GroupNorm's frozen {name} changed");
        } else {
            assert!(a != b, "{name} did not train");
        }
    }
    let (before, after) = (scales(&source), scales(&compact));
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.shape().len(), 3, "the exporter's [C, 1, 1]");
        assert_eq!(
            a.shape(),
            [&[1][..], b.shape()].concat(),
            "written at rank 4"
        );
        assert!(
            a.to_f32s() != b.to_f32s(),
            "a GroupNorm weight did not train"
        );
    }
    if common::require_python(&["onnx", "onnxruntime"]) {
        let mut m = Model::load(&compact_path, 10).unwrap();
        let mut r = Rng::new(7);
        let x = ArrayD::from_shape_fn(IxDyn(&[2, 3, 12, 12]), |_| r.normal());
        let ours = m.forward(x.clone(), Mode::Eval).unwrap();
        for (i, image) in x.outer_iter().enumerate() {
            let image = image.insert_axis(Axis(0)).to_owned();
            let theirs = common::ort_forward_checked(&compact_path, &image, true);
            let mine = ours.index_axis(Axis(0), i).insert_axis(Axis(0)).to_owned();
            let d = common::rel_diff(&mine, &theirs);
            assert!(d < 1e-5, "compact, onnxruntime vs engine, image {i}: {d}");
        }
    }
    compact
}

/// GroupNorm as the dynamo exporter writes it at its default opset (Reshape, an
/// InstanceNormalization of the groups with constant ones and zeros shared by both
/// GroupNorms, Reshape, Mul, Add) and an affine InstanceNorm2d
/// (tests/fixtures/dynamo_group_norm).
#[test]
fn group_and_instance_norm_from_the_dynamo_exporter_compute_what_tract_computes_with_pytorchs_parameters(
) {
    let compact = group_norm_fixture_trains_with_pytorchs_parameters("dynamo_group_norm");
    let frozen = compact
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::InstanceNorm { .. }) && n.inputs[1].ends_with(".const"))
        .count();
    assert_eq!(frozen, 2, "GroupNorm's two instance norms");
}

/// GroupNormalization as the dynamo exporter writes it at opset 21
/// (tests/fixtures/dynamo_group_norm_opset21); the compact file is written at opset 21.
#[test]
fn group_normalization_at_opset_21_computes_what_tract_computes_with_pytorchs_parameters() {
    let compact = group_norm_fixture_trains_with_pytorchs_parameters("dynamo_group_norm_opset21");
    assert!(compact.opset >= 21, "opset {}", compact.opset);
    let groups = compact
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::GroupNorm { groups: 4, .. }))
        .count();
    assert_eq!(groups, 2);
}

/// A MobileNetV3-style net as the dynamo exporter writes it untrained (each BN folded into
/// its conv, every all-zero bias dropped: the squeeze-excitation convs', a plain conv's, the
/// classifier's; tests/fixtures/dynamo_folded_bn, made by scripts/make_dynamo_fixtures.py with
/// PyTorch's parameter list in params.json).
fn dynamo_folded_bn() -> (std::path::PathBuf, serde_json::Value) {
    let dir = common::repo().join("tests/fixtures/dynamo_folded_bn");
    let index = std::fs::read_to_string(dir.join("params.json")).unwrap();
    (
        dir.join("model.onnx"),
        serde_json::from_str(&index).unwrap(),
    )
}

/// (name, size) of each trainable parameter of a model file, as elrt's engine holds them.
fn param_sizes(path: &Path) -> BTreeMap<String, usize> {
    let m = Model::load(path, 2).unwrap();
    m.session
        .program
        .params
        .iter()
        .map(|p| (p.name.clone(), p.value.len()))
        .collect()
}

#[test]
fn zero_biases_the_dynamo_exporter_dropped_are_restored_under_pytorch_names() {
    let (path, _) = dynamo_folded_bn();
    let g = elrt::onnx::read_file(&path).unwrap();
    let biases: Vec<(&str, Option<&str>)> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv(_) | Op::Gemm(_)))
        .map(|n| (n.inputs[1].as_str(), n.input(2)))
        .collect();
    assert_eq!(
        biases,
        [
            ("stem.0.weight", None),
            ("se.fc1.weight", Some("se.fc1.bias")),
            ("se.fc2.weight", Some("se.fc2.bias")),
            ("block.0.weight", None),
            ("plain.weight", Some("plain.bias")),
            ("fc.weight", Some("fc.bias")),
        ]
    );
    let zeros = |name: &str| {
        g.initializers[name]
            .as_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0)
    };
    assert!(["se.fc1.bias", "se.fc2.bias", "plain.bias", "fc.bias"]
        .into_iter()
        .all(zeros));
}

/// Trained by `elrt train` as a user runs it, directly and after `elrt convert` to Tucker-2:
/// a BatchNormalization goes back exactly where PyTorch has one (after the stem's and the
/// block's conv, after the last factor of a factorized layer; not after the SE convs), named
/// as PyTorch names it, so the full-rank trained file has PyTorch's parameters, by name and
/// size.
#[test]
fn a_dynamo_file_trains_with_pytorchs_batchnorms_and_parameters() {
    let (path, index) = dynamo_folded_bn();
    let tmp = tempfile::tempdir().unwrap();
    let train = |model: &Path, out: &Path| {
        common::succeeds([
            "train".as_ref(),
            model.as_os_str(),
            "--data".as_ref(),
            "synthetic:16,8".as_ref(),
            "--batch".as_ref(),
            "4".as_ref(),
            "--epochs".as_ref(),
            "1".as_ref(),
            "--max-steps".as_ref(),
            "2".as_ref(),
            "--quiet".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
    };
    let trained = tmp.path().join("trained.onnx");
    train(&path, &trained);
    let want: BTreeMap<String, usize> = index["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_u64().unwrap() as usize,
            )
        })
        .collect();
    assert_eq!(param_sizes(&trained), want);
    let bn_nodes = |p: &Path| -> Vec<(String, String)> {
        let g = elrt::onnx::read_file(p).unwrap();
        let producers = g.producers();
        g.nodes
            .iter()
            .filter(|n| matches!(n.op, Op::BatchNorm(_)))
            .map(|n| {
                (
                    g.nodes[producers[n.inputs[0].as_str()]].name.clone(),
                    n.name.clone(),
                )
            })
            .collect()
    };
    let bns = bn_nodes(&trained);
    let names: Vec<&str> = bns.iter().map(|(_, bn)| bn.as_str()).collect();
    assert_eq!(names, ["stem.1", "block.1"]);

    let converted = tmp.path().join("tucker2.onnx");
    common::succeeds([
        "convert".as_ref(),
        path.as_os_str(),
        "--ranks".as_ref(),
        "ratio=0.5".as_ref(),
        "-o".as_ref(),
        converted.as_os_str(),
    ]);
    let trained2 = tmp.path().join("trained2.onnx");
    train(&converted, &trained2);
    let bns = bn_nodes(&trained2);
    assert_eq!(
        bns.iter().map(|(_, bn)| bn.as_str()).collect::<Vec<_>>(),
        ["stem.1", "block.1"]
    );
    // The block's 3x3 conv is factorized: its BN follows the chain's last factor.
    assert!(
        bns[1].0.ends_with("/tucker2/u2"),
        "the block's BN follows '{}'",
        bns[1].0
    );
}
