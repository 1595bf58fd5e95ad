//! Inserts a BatchNormalization after every convolution that lacks one.
//!
//! An eval-mode PyTorch export has its BN folded into conv biases; such a graph trains badly
//! from scratch. Re-inserting BN (and dropping the conv bias, which BN's shift makes redundant)
//! restores the architecture as it was trained; export folds BN back in.

use std::collections::HashMap;

use super::ops::BatchNorm;
use super::{Graph, Node, Op, Tensor};

/// Whether `--bn` inserts, given the policy name and the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnPolicy {
    /// Insert only when the graph has no BatchNormalization (nor LayerNormalization) at all.
    Auto,
    /// Leave the graph as it is.
    Keep,
    /// Insert after every conv not already followed by one.
    Insert,
}

impl std::str::FromStr for BnPolicy {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<BnPolicy> {
        Ok(match s {
            "auto" => BnPolicy::Auto,
            "keep" => BnPolicy::Keep,
            "insert" => BnPolicy::Insert,
            o => anyhow::bail!("--bn '{o}': expected auto, keep or insert"),
        })
    }
}

impl std::fmt::Display for BnPolicy {
    /// The `--bn` form: parses back to the same value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BnPolicy::Auto => "auto",
            BnPolicy::Keep => "keep",
            BnPolicy::Insert => "insert",
        })
    }
}

/// Applies the policy; returns the number of BN nodes inserted.
pub fn apply(graph: &mut Graph, policy: BnPolicy) -> usize {
    // A network normalized by LayerNormalization (ConvNeXt) has its normalization already.
    let has_bn = graph
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::BatchNorm(_) | Op::LayerNorm(_)));
    match policy {
        BnPolicy::Keep => 0,
        BnPolicy::Auto if has_bn => 0,
        _ => insert(graph),
    }
}

fn insert(graph: &mut Graph) -> usize {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for inp in &n.inputs {
            consumers.entry(inp.as_str()).or_default().push(i);
        }
    }
    // Convs whose only consumer is already a BN keep their form.
    let has_bn: Vec<bool> = graph
        .nodes
        .iter()
        .map(|n| {
            consumers
                .get(n.outputs[0].as_str())
                .is_some_and(|c| c.len() == 1 && matches!(graph.nodes[c[0]].op, Op::BatchNorm(_)))
        })
        .collect();
    let mut nodes = Vec::with_capacity(graph.nodes.len() * 2);
    let mut count = 0;
    for (mut n, followed) in std::mem::take(&mut graph.nodes).into_iter().zip(has_bn) {
        let Op::Conv(_) = n.op else {
            nodes.push(n);
            continue;
        };
        let out = n.outputs[0].clone();
        if followed {
            nodes.push(n);
            continue;
        }
        let Some(w) = graph.initializers.get(&n.inputs[1]) else {
            nodes.push(n);
            continue;
        };
        let c = w.shape()[0];
        if n.inputs.len() > 2 {
            n.inputs.truncate(2);
        }
        let base = format!("{}/bn", n.name);
        let conv_out = format!("{out}/prebn");
        n.outputs[0] = conv_out.clone();
        let mut init = |suffix: &str, v: f32| {
            let name = format!("{base}/{suffix}");
            graph
                .initializers
                .insert(name.clone(), Tensor::f32(&[c], vec![v; c]).expect("1-D"));
            name
        };
        let inputs = vec![
            conv_out,
            init("scale", 1.0),
            init("bias", 0.0),
            init("mean", 0.0),
            init("var", 1.0),
        ];
        nodes.push(n);
        nodes.push(Node {
            name: base,
            op: Op::BatchNorm(BatchNorm {
                epsilon: 1e-5,
                momentum: 0.9,
                training_mode: false,
            }),
            inputs,
            outputs: vec![out.clone()],
        });
        count += 1;
    }
    graph.nodes = nodes;
    graph.prune();
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{AutoPad, Conv};
    use crate::ir::{Dim, ElemType, ModelMeta, ValueInfo};
    use std::collections::BTreeMap;

    fn conv_graph() -> Graph {
        let mut init = BTreeMap::new();
        init.insert(
            "w".to_string(),
            Tensor::f32(&[4, 3, 3, 3], vec![0.1; 108]).unwrap(),
        );
        init.insert("b".to_string(), Tensor::f32(&[4], vec![0.5; 4]).unwrap());
        let vi = |n: &str| ValueInfo {
            name: n.into(),
            elem: ElemType::F32,
            shape: Some(vec![
                Dim::Fixed(1),
                Dim::Fixed(3),
                Dim::Fixed(8),
                Dim::Fixed(8),
            ]),
        };
        Graph {
            name: "g".into(),
            opset: 13,
            inputs: vec![vi("x")],
            outputs: vec![vi("r")],
            nodes: vec![
                Node {
                    name: "conv".into(),
                    op: Op::Conv(Conv {
                        kernel_shape: None,
                        strides: vec![],
                        pads: vec![1, 1, 1, 1],
                        dilations: vec![],
                        group: 1,
                        auto_pad: AutoPad::NotSet,
                    }),
                    inputs: vec!["x".into(), "w".into(), "b".into()],
                    outputs: vec!["c".into()],
                },
                Node {
                    name: "relu".into(),
                    op: Op::Relu,
                    inputs: vec!["c".into()],
                    outputs: vec!["r".into()],
                },
            ],
            initializers: init,
            meta: ModelMeta::default(),
        }
    }

    #[test]
    fn inserts_after_conv_and_drops_bias() {
        let mut g = conv_graph();
        assert_eq!(apply(&mut g, BnPolicy::Keep), 0);
        assert_eq!(apply(&mut g, BnPolicy::Auto), 1);
        g.check().unwrap();
        assert!(!g.initializers.contains_key("b"), "bias should go");
        let ops: Vec<_> = g.nodes.iter().map(|n| n.op.onnx_type()).collect();
        assert_eq!(ops, ["Conv", "BatchNormalization", "Relu"]);
        // Already followed by BN: nothing more, whatever the policy.
        assert_eq!(apply(&mut g, BnPolicy::Insert), 0);
        assert_eq!(apply(&mut g, BnPolicy::Auto), 0);
    }
}
