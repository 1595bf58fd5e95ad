//! Undoes two edits that PyTorch's dynamo exporter (its default) makes to an eval-mode model,
//! from the module records it leaves on each node (`pkg.torch.onnx.name_scopes` and
//! `pkg.torch.onnx.class_hierarchy`).
//!
//! - Its graph optimiser folds each BatchNorm into the conv before it; the folded conv then
//!   names the BN module as its origin. The reader records which convs those are
//!   ([`BN_FOLDED_KEY`]), so that training re-inserts a BN there and nowhere else: not after
//!   a squeeze-excitation conv (MobileNetV3, EfficientNet), not in SqueezeNet, which never had
//!   one, and after DenseNet's bottleneck convs although the file keeps its other BNs.
//! - The optimiser also drops a Conv's or Gemm's bias operand when it is all zeros, which is
//!   how torchvision initialises many (every ConvNeXt and SqueezeNet conv, the SE convs and
//!   classifiers of MobileNet and EfficientNet, DenseNet's classifier). Read as written, such
//!   a layer would train without its bias. A zero bias is restored on a Conv or Gemm that the
//!   exporter attributes to a convolution or linear op, unless a normalization follows (every
//!   use of the output reaches a BatchNormalization, an InstanceNormalization, a
//!   GroupNormalization or GroupNorm's `Reshape` before its InstanceNormalization, through
//!   Concat and pooling only), where PyTorch models are built with `bias=False`: a BN's or an
//!   instance norm's shift absorbs a bias; a GroupNorm's does not exactly (channels of one group
//!   share a mean), but a conv before one is built without (a user's GroupNorm ResNet got 672
//!   parameters PyTorch does not have). A zero bias changes no output, so the file computes
//!   what it computed before.

use std::collections::{BTreeMap, HashSet};

use crate::ir::bn_insert::BN_FOLDED_KEY;
use crate::ir::uses::UseWalk;
use crate::ir::{Node, Op, Tensor};

/// Where the exporter says a node came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Origin {
    /// The module path (`features.1.block.1.fc1`), from `name_scopes`.
    pub module: Option<String>,
    /// The module's class (`torch.nn.modules.conv.Conv2d`) and the aten op
    /// (`aten.conv2d.default`), from `class_hierarchy`.
    pub class: Option<(String, String)>,
}

/// The last two entries of a `class_hierarchy` list, a Python list of quoted names ending in
/// the module's class and the aten op.
pub(super) fn class_and_op(class_hierarchy: &str) -> Option<(String, String)> {
    let entries: Vec<&str> = class_hierarchy.split('\'').skip(1).step_by(2).collect();
    match entries.as_slice() {
        [.., class, op] => Some((class.to_string(), op.to_string())),
        _ => None,
    }
}

/// What [`restore`] did.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Restored {
    /// Zero biases put back.
    pub biases: usize,
    /// The [`BN_FOLDED_KEY`] entry: `None` when the file's convs do not all carry a record.
    pub bn_folded: Option<(String, String)>,
}

fn folds_bn(o: &Origin) -> bool {
    o.class
        .as_ref()
        .is_some_and(|(class, _)| class.to_ascii_lowercase().contains("batchnorm"))
}

/// Restores dropped zero biases in `nodes` (adding their initializers to `consts`) and
/// returns the folded-BN record; see the module docs. `origins[i]` is node `i`'s,
/// `graph_outputs` the graph's output names, `taken` every name in use.
pub(super) fn restore(
    nodes: &mut [Node],
    consts: &mut BTreeMap<String, Tensor>,
    origins: &[Origin],
    graph_outputs: &HashSet<String>,
    taken: &mut HashSet<String>,
) -> Restored {
    let convs: Vec<usize> = (0..nodes.len())
        .filter(|&i| matches!(nodes[i].op, Op::Conv(_)))
        .collect();
    if convs.is_empty() || convs.iter().any(|&i| origins[i].class.is_none()) {
        return Restored::default();
    }
    let folded: BTreeMap<&str, String> = convs
        .iter()
        .filter(|&&i| folds_bn(&origins[i]))
        .map(|&i| {
            let module = origins[i]
                .module
                .clone()
                .unwrap_or_else(|| format!("{}/bn", nodes[i].name));
            (nodes[i].outputs[0].as_str(), module)
        })
        .collect();
    let bn_folded = Some((
        BN_FOLDED_KEY.to_string(),
        serde_json::to_string(&folded).expect("a map of strings"),
    ));

    // A conv needs no bias when every use of the output reaches a normalization's input
    // through ops that carry a per-channel constant through unchanged (Concat, pooling); a
    // Reshape that only an InstanceNormalization reads is GroupNorm's (`onnx::group_norm`).
    let group_norm_reshapes: HashSet<&str> = nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Reshape { .. }))
        .filter(|r| {
            let mut readers = nodes
                .iter()
                .filter(|n| n.inputs.iter().any(|i| *i == r.outputs[0]))
                .peekable();
            readers.peek().is_some()
                && readers
                    .all(|n| matches!(n.op, Op::InstanceNorm { .. }) && n.inputs[0] == r.outputs[0])
        })
        .map(|r| r.name.as_str())
        .collect();
    let mut absorbed = UseWalk::new(
        &*nodes,
        graph_outputs.iter().map(String::as_str),
        |next: &Node, v: &str| {
            next.inputs[0] == v
                && (matches!(
                    next.op,
                    Op::BatchNorm(_) | Op::InstanceNorm { .. } | Op::GroupNorm { .. }
                ) || group_norm_reshapes.contains(next.name.as_str()))
        },
        |_: &Node, next: &Node| {
            matches!(
                next.op,
                Op::Concat { .. } | Op::Pool(_) | Op::GlobalAveragePool
            )
        },
    );
    // (node, bias length) of each layer to restore.
    let mut wanted: Vec<(usize, usize)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let Some((_, op)) = &origins[i].class else {
            continue;
        };
        let width = match &n.op {
            Op::Conv(_) if n.input(2).is_none() && op.starts_with("aten.conv") => {
                consts.get(&n.inputs[1]).map(|w| w.shape()[0])
            }
            Op::Gemm(g) if n.input(2).is_none() && g.beta != 0.0 && op == "aten.linear.default" => {
                consts
                    .get(&n.inputs[1])
                    .filter(|w| w.shape().len() == 2)
                    .map(|w| w.shape()[if g.trans_b { 0 } else { 1 }])
            }
            _ => None,
        };
        if let Some(width) = width {
            if !absorbed.all_reach(i) {
                wanted.push((i, width));
            }
        }
    }
    for &(i, width) in &wanted {
        let base = origins[i]
            .module
            .clone()
            .unwrap_or_else(|| nodes[i].name.clone());
        let mut name = format!("{base}.bias");
        let mut k = 1;
        while taken.contains(&name) {
            name = format!("{base}.bias.{k}");
            k += 1;
        }
        taken.insert(name.clone());
        consts.insert(
            name.clone(),
            Tensor::f32(&[width], vec![0.0; width]).expect("1-D"),
        );
        let n = &mut nodes[i];
        n.inputs.truncate(2);
        n.inputs.push(name);
    }
    Restored {
        biases: wanted.len(),
        bn_folded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{AutoPad, BatchNorm, Conv, Gemm};

    fn conv(name: &str, x: &str, w: &str, y: &str) -> Node {
        Node {
            name: name.into(),
            op: Op::Conv(Conv {
                kernel_shape: None,
                strides: vec![],
                pads: vec![],
                dilations: vec![],
                group: 1,
                auto_pad: AutoPad::NotSet,
            }),
            inputs: vec![x.into(), w.into()],
            outputs: vec![y.into()],
        }
    }

    fn origin(module: &str, class: &str, op: &str) -> Origin {
        Origin {
            module: Some(module.into()),
            class: Some((class.into(), op.into())),
        }
    }

    const CONV2D: &str = "torch.nn.modules.conv.Conv2d";
    const BN2D: &str = "torch.nn.modules.batchnorm.BatchNorm2d";

    #[test]
    fn class_and_op_are_the_last_two_entries() {
        assert_eq!(
            class_and_op("['torchvision.models.resnet.ResNet', 'torch.nn.modules.conv.Conv2d', 'aten.conv2d.default']"),
            Some((CONV2D.to_string(), "aten.conv2d.default".to_string()))
        );
        assert_eq!(class_and_op("['only']"), None);
        assert_eq!(class_and_op(""), None);
    }

    /// conv0 (BN folded) -> conv1 (Conv2d, bias dropped) -> relu; conv2 (Conv2d, no bias)
    /// -> Concat -> MaxPool -> BatchNormalization (absorbed, left alone); Gemm (Linear, bias
    /// dropped) as the graph output.
    #[test]
    fn restores_unabsorbed_biases_and_records_folded_bns() {
        let t = |shape: &[usize]| Tensor::f32(shape, vec![0.5; shape.iter().product()]).unwrap();
        let mut consts: BTreeMap<String, Tensor> = [
            ("w0", t(&[4, 3, 1, 1])),
            ("w1", t(&[5, 4, 1, 1])),
            ("w2", t(&[6, 5, 1, 1])),
            ("fc", t(&[7, 6])),
            ("s", t(&[6])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bn = Node {
            name: "bn".into(),
            op: Op::BatchNorm(BatchNorm {
                epsilon: 1e-5,
                momentum: 0.9,
                training_mode: false,
            }),
            inputs: vec!["p".into(), "s".into(), "s".into(), "s".into(), "s".into()],
            outputs: vec!["b".into()],
        };
        let mut nodes = vec![
            conv("c0", "x", "w0", "y0"),
            conv("c1", "y0", "w1", "y1"),
            Node {
                name: "relu".into(),
                op: Op::Relu,
                inputs: vec!["y1".into()],
                outputs: vec!["r".into()],
            },
            conv("c2", "r", "w2", "y2"),
            Node {
                name: "cat".into(),
                op: Op::Concat { axis: 1 },
                inputs: vec!["y2".into()],
                outputs: vec!["k".into()],
            },
            Node {
                name: "pool".into(),
                op: Op::Pool(crate::ir::ops::Pool {
                    kind: crate::ir::ops::PoolKind::Max,
                    kernel_shape: vec![1, 1],
                    strides: vec![],
                    pads: vec![],
                    dilations: vec![],
                    ceil_mode: false,
                    auto_pad: AutoPad::NotSet,
                    count_include_pad: false,
                    storage_order: 0,
                }),
                inputs: vec!["k".into()],
                outputs: vec!["p".into()],
            },
            bn,
            Node {
                name: "fc".into(),
                op: Op::Gemm(Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                }),
                inputs: vec!["b".into(), "fc".into()],
                outputs: vec!["logits".into()],
            },
        ];
        let origins = vec![
            origin(
                "features.0.1",
                BN2D,
                "aten._native_batch_norm_legit_no_training.default",
            ),
            origin("features.1.fc1", CONV2D, "aten.conv2d.default"),
            Origin::default(),
            origin("features.2", CONV2D, "aten.conv2d.default"),
            Origin::default(),
            Origin::default(),
            Origin::default(),
            origin(
                "classifier",
                "torch.nn.modules.linear.Linear",
                "aten.linear.default",
            ),
        ];
        let outputs: HashSet<String> = ["logits".to_string()].into();
        let mut taken: HashSet<String> = consts.keys().cloned().collect();
        let r = restore(&mut nodes, &mut consts, &origins, &outputs, &mut taken);
        assert_eq!(r.biases, 2);
        assert_eq!(
            r.bn_folded,
            Some((
                BN_FOLDED_KEY.to_string(),
                r#"{"y0":"features.0.1"}"#.to_string()
            ))
        );
        assert_eq!(nodes[0].inputs.len(), 2, "a folded BN's conv gets no bias");
        assert_eq!(nodes[1].inputs[2], "features.1.fc1.bias");
        assert_eq!(nodes[3].inputs.len(), 2, "BN absorbs conv2's bias");
        assert_eq!(nodes[7].inputs[2], "classifier.bias");
        assert_eq!(consts["features.1.fc1.bias"].shape(), [5]);
        assert_eq!(consts["classifier.bias"].shape(), [7]);
        assert!(consts["classifier.bias"]
            .as_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }

    /// Convs without a bias before an InstanceNormalization, a GroupNormalization and
    /// GroupNorm's Reshape -> InstanceNormalization keep none; one before a Reshape that
    /// something else reads gets its zero bias back.
    #[test]
    fn no_bias_is_restored_before_instance_and_group_norms() {
        let t = |shape: &[usize]| Tensor::f32(shape, vec![0.5; shape.iter().product()]).unwrap();
        let mut consts: BTreeMap<String, Tensor> = [
            ("w", t(&[4, 4, 1, 1])),
            ("s", t(&[4])),
            ("g", t(&[2])),
            ("shape", Tensor::i64_vec(&[1, 2, -1])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let node = |name: &str, op: Op, inputs: &[&str], out: &str| Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
        };
        let reshape = || Op::Reshape { allowzero: false };
        let mut nodes = vec![
            conv("c0", "x", "w", "y0"),
            node(
                "in",
                Op::InstanceNorm { epsilon: 1e-5 },
                &["y0", "s", "s"],
                "n0",
            ),
            conv("c1", "n0", "w", "y1"),
            node(
                "gn",
                Op::GroupNorm {
                    epsilon: 1e-5,
                    groups: 2,
                },
                &["y1", "s", "s"],
                "n1",
            ),
            conv("c2", "n1", "w", "y2"),
            node("r", reshape(), &["y2", "shape"], "r2"),
            node(
                "in2",
                Op::InstanceNorm { epsilon: 1e-5 },
                &["r2", "g", "g"],
                "n2",
            ),
            conv("c3", "n2", "w", "y3"),
            node("flat", reshape(), &["y3", "shape"], "logits"),
        ];
        let origins: Vec<Origin> = nodes
            .iter()
            .map(|n| match n.op {
                Op::Conv(_) => origin(&n.name, CONV2D, "aten.conv2d.default"),
                _ => Origin::default(),
            })
            .collect();
        let outputs: HashSet<String> = ["logits".to_string()].into();
        let mut taken: HashSet<String> = consts.keys().cloned().collect();
        let r = restore(&mut nodes, &mut consts, &origins, &outputs, &mut taken);
        assert_eq!(r.biases, 1);
        for i in [0, 2, 4] {
            assert_eq!(nodes[i].inputs.len(), 2, "{}", nodes[i].name);
        }
        assert_eq!(nodes[7].inputs[2], "c3.bias");
    }

    #[test]
    fn a_file_without_records_on_every_conv_is_left_alone() {
        let mut consts: BTreeMap<String, Tensor> = [(
            "w".to_string(),
            Tensor::f32(&[2, 2, 1, 1], vec![1.0; 4]).unwrap(),
        )]
        .into();
        let mut nodes = vec![conv("a", "x", "w", "y"), conv("b", "y", "w", "z")];
        let origins = vec![
            origin("a", CONV2D, "aten.conv2d.default"),
            Origin::default(),
        ];
        let outputs: HashSet<String> = ["z".to_string()].into();
        let r = restore(
            &mut nodes,
            &mut consts,
            &origins,
            &outputs,
            &mut HashSet::new(),
        );
        assert_eq!(r, Restored::default());
        assert!(nodes.iter().all(|n| n.inputs.len() == 2));
    }
}
