//! The writer's per-opset forms: one graph, written at opsets 7 to 21, reads back as the same
//! graph, passes onnx.checker, and gives the same outputs in onnxruntime at every opset.

mod common;

use std::collections::BTreeMap;

use elrt::ir::ops::*;
use elrt::ir::{Dim, ElemType, Graph, ModelMeta, Node, Op, Tensor, ValueInfo};

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn node(name: &str, op: Op, inputs: &[&str], outputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    }
}

/// A small CNN touching every op whose ONNX form changed across opsets.
fn graph(opset: i64) -> Graph {
    let mut init = BTreeMap::new();
    let mut t = |name: &str, shape: &[usize], seed| {
        let n = shape.iter().product();
        init.insert(
            name.to_string(),
            Tensor::f32(shape, values(n, seed)).unwrap(),
        );
    };
    t("w", &[4, 3, 3, 3], 1);
    t("b", &[4], 2);
    t("scale", &[4], 3);
    t("shift", &[4], 4);
    t("mean", &[4], 5);
    t("fc_w", &[5, 4], 7);
    t("fc_b", &[5], 8);
    // Variances must be positive.
    let var: Vec<f32> = values(4, 6).iter().map(|v| v.abs() + 0.5).collect();
    init.insert("var".into(), Tensor::f32(&[4], var).unwrap());
    let nodes = vec![
        node(
            "conv",
            Op::Conv(Conv {
                kernel_shape: Some(vec![3, 3]),
                strides: vec![1, 1],
                pads: vec![1, 1, 1, 1],
                dilations: vec![1, 1],
                group: 1,
                auto_pad: AutoPad::NotSet,
            }),
            &["x", "w", "b"],
            &["c"],
        ),
        node(
            "bn",
            Op::BatchNorm(BatchNorm {
                epsilon: 1e-5,
                momentum: 0.9,
                training_mode: false,
            }),
            &["c", "scale", "shift", "mean", "var"],
            &["bn"],
        ),
        node(
            "clip",
            Op::Clip(Clip {
                min: Some(0.0),
                max: Some(6.0),
            }),
            &["bn"],
            &["r"],
        ),
        node(
            "pad",
            Op::Pad(Pad {
                pads: vec![0, 0, 1, 0, 0, 0, 0, 1],
                axes: None,
                mode: PadMode::Constant,
                value: 0.5,
            }),
            &["r"],
            &["p"],
        ),
        node(
            "pool",
            Op::Pool(Pool {
                kind: PoolKind::Max,
                kernel_shape: vec![3, 3],
                strides: vec![2, 2],
                pads: vec![0, 0, 0, 0],
                dilations: vec![],
                ceil_mode: false,
                auto_pad: AutoPad::NotSet,
                count_include_pad: false,
                storage_order: 0,
            }),
            &["p"],
            &["mp"],
        ),
        node(
            "split",
            Op::Split(Split {
                axis: 1,
                split: Some(vec![1, 3]),
            }),
            &["mp"],
            &["s0", "s1"],
        ),
        node("sig", Op::Sigmoid, &["s0"], &["a"]),
        node(
            "hsig",
            Op::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            &["s1"],
            &["h"],
        ),
        node("cat", Op::Concat { axis: 1 }, &["h", "a"], &["cat"]),
        node(
            "slice",
            Op::Slice(Slice {
                starts: vec![1],
                ends: vec![-1],
                axes: Some(vec![3]),
                steps: None,
            }),
            &["cat"],
            &["sl"],
        ),
        node("unsq", Op::Unsqueeze { axes: vec![0] }, &["sl"], &["u"]),
        node(
            "sq",
            Op::Squeeze {
                axes: Some(vec![0]),
            },
            &["u"],
            &["q"],
        ),
        node(
            "mean",
            Op::ReduceMean(ReduceMean {
                axes: Some(vec![2, 3]),
                keepdims: true,
                noop_with_empty_axes: false,
            }),
            &["q"],
            &["m"],
        ),
        node("drop", Op::Dropout { ratio: 0.25 }, &["m"], &["d"]),
        node("flat", Op::Flatten { axis: 1 }, &["d"], &["f"]),
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
    ];
    let io = |name: &str, shape: Vec<Dim>| ValueInfo {
        name: name.into(),
        elem: ElemType::F32,
        shape: Some(shape),
    };
    Graph {
        name: "opsets".into(),
        opset,
        inputs: vec![io(
            "x",
            vec![
                Dim::Sym("batch".into()),
                Dim::Fixed(3),
                Dim::Fixed(8),
                Dim::Fixed(8),
            ],
        )],
        outputs: vec![io("logits", vec![Dim::Sym("batch".into()), Dim::Fixed(5)])],
        nodes,
        initializers: init,
        meta: ModelMeta::default(),
    }
}

#[test]
fn every_opset_form_reads_back_and_runs_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let python = common::require_python(&["onnx", "onnxruntime", "numpy"]);
    let reference = tmp.path().join("op13.onnx");
    elrt::onnx::write_file(&graph(13), &reference).unwrap();
    for opset in [7, 8, 9, 10, 11, 12, 13, 14, 17, 18, 19, 21] {
        let g = graph(opset);
        let path = tmp.path().join(format!("op{opset}.onnx"));
        elrt::onnx::write_file(&g, &path).unwrap();
        let back = elrt::onnx::read_file(&path).unwrap();
        let mut want = g.clone();
        want.meta.producer_name = "elrt".into();
        want.meta.ir_version = back.meta.ir_version;
        assert_eq!(back, want, "opset {opset}");
        let r = elrt::inspect::inspect(&path, &[vec![2, 3, 8, 8]]).unwrap();
        assert_eq!(r.layers.last().unwrap().output_shape, vec![2, 5]);
        if python {
            common::roundtrip_check(&reference, &path);
        }
    }
}

#[test]
fn writer_refuses_what_the_opset_cannot_express() {
    let mut g = graph(13);
    g.nodes.push(node("hs", Op::HardSwish, &["logits"], &["z"]));
    g.outputs[0].name = "z".into();
    let err = elrt::onnx::write_bytes(&g).unwrap_err();
    assert!(
        format!("{err:#}").contains("HardSwish needs opset 14"),
        "{err:#}"
    );
    g.opset = 14;
    elrt::onnx::write_bytes(&g).unwrap();
}
