//! PReLU and ELU written out in ops the deployment runtimes run fast.
//!
//! tract 0.23 runs PRelu and Elu as a comparison into a boolean tensor and a select (GT/LT +
//! Iff, 1.6 ns a value on a 2-core EPYC: a quarter of a PReLU/ELU CNN's latency, session 31),
//! and onnxruntime 1.32's CPU PRelu is slower still; Relu, Sub, Mul, Add and Exp are each on
//! both runtimes' fast elementwise paths. Measured on user-style 64x64 CNNs of six conv + act
//! layers (batch 1, one thread, Intel Xeon with AVX-512; docs/results.md, session 32):
//!
//! - PReLU as `Relu(x) + slope * (x - Relu(x))`: tract 4.35 -> 3.92 ms (1.11x; 1.14x at two
//!   threads), onnxruntime 3.27 -> 1.92 ms. The values are PReLU's bit for bit (apart from the
//!   sign of a zero): for `x > 0` the sum is `x + slope * 0`, otherwise `0 + slope * x`. The
//!   slope stays one initializer, read by the Mul, so the file has the same parameters.
//! - ELU as `Relu(x) + (alpha * Exp(x - Relu(x)) - alpha)`: tract 4.97-5.01 -> 4.48-4.51 ms
//!   (1.11x, `elrt bench`), onnxruntime 2.43 -> 2.04 ms (1.19x). `e^x - 1` where ELU has
//!   `expm1(x)`: the same within 1.2e-7 absolute (an ELU output is at least `-alpha`), which
//!   the tract validation after export checks like every other difference.
//!
//! LeakyRelu is left as it is: tract runs it natively, and the same net with LeakyReLU(0.1)
//! ran 3.72 ms as LeakyRelu against 3.93 written out.
//!
//! The reader puts both back together (`onnx::act_fuse`), so a file read again for more
//! training trains the PReLU/ELU net it came from. NaN stays NaN in both forms.

use crate::ir::params::FROZEN_SUFFIX;
use crate::ir::{Graph, Node, Op, Tensor};

/// Rewrites every PRelu and Elu node (module docs) in place; returns how many of each. An Elu
/// gets its alpha as a scalar constant (named with [`FROZEN_SUFFIX`]: never a parameter).
pub fn split_activations(g: &mut Graph) -> (usize, usize) {
    let mut counts = (0, 0);
    let mut k = 0;
    while k < g.nodes.len() {
        let replacement = match g.nodes[k].op {
            Op::PRelu => split_prelu_node(g, k).inspect(|_| counts.0 += 1),
            Op::Elu { alpha } => split_elu_node(g, k, alpha).inspect(|_| counts.1 += 1),
            _ => None,
        };
        match replacement {
            Some(nodes) => {
                let len = nodes.len();
                g.nodes.splice(k..k + 1, nodes);
                k += len;
            }
            None => k += 1,
        }
    }
    counts
}

/// The nodes of one output each that replace a node, named after it. New values are named
/// after the node's output `y` with distinct suffixes, by [`Graph::fresh_value_name`] (which
/// sees the replacements already spliced in).
struct Writer<'a> {
    g: &'a Graph,
    name: String,
    y: String,
    nodes: Vec<Node>,
}

impl Writer<'_> {
    /// Appends `op(inputs)` writing `out`; returns `out`.
    fn push(&mut self, suffix: &str, op: Op, inputs: &[&str], out: String) -> String {
        self.nodes.push(Node {
            name: format!("{}{suffix}", self.name),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.clone()],
        });
        out
    }

    /// Appends `op(inputs)` writing a new value; returns its name.
    fn push_new(&mut self, suffix: &str, op: Op, inputs: &[&str]) -> String {
        let out = self.g.fresh_value_name(&format!("{}{suffix}", self.y));
        self.push(suffix, op, inputs, out)
    }
}

/// `Relu(x) + slope * (x - Relu(x))` for the PRelu at `k`.
fn split_prelu_node(g: &Graph, k: usize) -> Option<Vec<Node>> {
    let n = &g.nodes[k];
    let ([x, slope], [y]) = (n.inputs.as_slice(), n.outputs.as_slice()) else {
        return None;
    };
    let mut w = Writer {
        g,
        name: n.name.clone(),
        y: y.clone(),
        nodes: Vec::with_capacity(4),
    };
    let pos = w.push_new(".relu", Op::Relu, &[x]);
    let neg = w.push_new(".neg", Op::Sub, &[x, &pos]);
    let scaled = w.push_new(".scale", Op::Mul, &[&neg, slope]);
    w.push(".add", Op::Add, &[&pos, &scaled], y.clone());
    Some(w.nodes)
}

/// `Relu(x) + (alpha * Exp(x - Relu(x)) - alpha)` for the Elu at `k`; adds the alpha constant.
fn split_elu_node(g: &mut Graph, k: usize, alpha: f32) -> Option<Vec<Node>> {
    let ([x], [y]) = (g.nodes[k].inputs.as_slice(), g.nodes[k].outputs.as_slice()) else {
        return None;
    };
    let (x, y) = (x.clone(), y.clone());
    let a = g.fresh_value_name(&format!("{y}.alpha{FROZEN_SUFFIX}"));
    let scalar = Tensor::f32(&[], vec![alpha]).expect("one value for a scalar");
    g.initializers.insert(a.clone(), scalar);
    let mut w = Writer {
        g,
        name: g.nodes[k].name.clone(),
        y: y.clone(),
        nodes: Vec::with_capacity(6),
    };
    let pos = w.push_new(".relu", Op::Relu, &[&x]);
    let neg = w.push_new(".neg", Op::Sub, &[&x, &pos]);
    let exp = w.push_new(".exp", Op::Exp, &[&neg]);
    let scaled = w.push_new(".scale", Op::Mul, &[&exp, &a]);
    let shifted = w.push_new(".shift", Op::Sub, &[&scaled, &a]);
    w.push(".add", Op::Add, &[&pos, &shifted], y);
    Some(w.nodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::exec::Mode;
    use crate::engine::model::Model;
    use crate::ir::{Dim, ElemType, ModelMeta, Tensor, ValueInfo};
    use std::collections::BTreeMap;

    fn prelu_graph(slope_shape: &[usize], slope: Vec<f32>) -> Graph {
        let vi = |n: &str, shape: &[usize]| ValueInfo {
            name: n.into(),
            elem: ElemType::F32,
            shape: Some(shape.iter().map(|&d| Dim::Fixed(d)).collect()),
        };
        let mut initializers = BTreeMap::new();
        initializers.insert(
            "slope".to_string(),
            Tensor::f32(slope_shape, slope).unwrap(),
        );
        Graph {
            name: "g".into(),
            opset: 13,
            inputs: vec![vi("x", &[2, 3, 2, 2])],
            outputs: vec![vi("y", &[2, 12])],
            // Flattened, so that every value is an output the engine returns.
            nodes: vec![
                Node {
                    name: "p".into(),
                    op: Op::PRelu,
                    inputs: vec!["x".into(), "slope".into()],
                    outputs: vec!["a".into()],
                },
                Node {
                    name: "f".into(),
                    op: Op::Flatten { axis: 1 },
                    inputs: vec!["a".into()],
                    outputs: vec!["y".into()],
                },
            ],
            initializers,
            meta: ModelMeta::default(),
        }
    }

    /// Negative, positive, zero, tiny and huge inputs, `[2, 3, 2, 2]`.
    fn inputs() -> Vec<f32> {
        (0..24)
            .map(|i| match i % 6 {
                0 => -3.5 + i as f32 * 0.1,
                1 => 2.25 * i as f32,
                2 => 0.0,
                3 => -1e-38,
                4 => -3.0e38,
                _ => 1e-30,
            })
            .collect()
    }

    fn run(g: Graph) -> Vec<f32> {
        let mut m = Model::from_graph(g, 2).unwrap();
        let x = ndarray::Array4::from_shape_vec((2, 3, 2, 2), inputs()).unwrap();
        m.forward(x.into_dyn(), Mode::Eval)
            .unwrap()
            .iter()
            .copied()
            .collect()
    }

    /// Per-channel and single slopes, on [`inputs`]: the split graph's outputs are the PRelu
    /// graph's, bit for bit (zeros compared by value).
    #[test]
    fn split_prelu_computes_prelus_values_bitwise() {
        for (shape, slope) in [
            (vec![3, 1, 1], vec![0.25, -0.5, 1.75]),
            (vec![1], vec![0.1]),
        ] {
            let g = prelu_graph(&shape, slope);
            let mut split = g.clone();
            assert_eq!(split_activations(&mut split), (1, 0));
            let ops: Vec<&Op> = split.nodes.iter().map(|n| &n.op).collect();
            assert_eq!(
                ops,
                [
                    &Op::Relu,
                    &Op::Sub,
                    &Op::Mul,
                    &Op::Add,
                    &Op::Flatten { axis: 1 }
                ]
            );
            assert_eq!(split.initializers.len(), 1, "no new parameters");
            let (a, b) = (run(g), run(split));
            for (p, q) in a.iter().zip(b.iter()) {
                assert!(p == q, "{p} vs {q} (slope {shape:?})");
            }
        }
    }

    /// On [`inputs`], the split ELU is the engine's Elu within 1.2e-7 (`e^x - 1` for
    /// `expm1(x)`), and adds one frozen scalar constant, no parameter.
    #[test]
    fn split_elu_is_elu_within_a_few_ulp_of_alpha() {
        for alpha in [1.0f32, 0.8] {
            let mut g = prelu_graph(&[1], vec![0.1]);
            g.nodes[0].op = Op::Elu { alpha };
            g.nodes[0].inputs.truncate(1);
            g.initializers.clear();
            let mut split = g.clone();
            assert_eq!(split_activations(&mut split), (0, 1));
            let ops: Vec<&Op> = split.nodes.iter().map(|n| &n.op).collect();
            assert_eq!(
                ops,
                [
                    &Op::Relu,
                    &Op::Sub,
                    &Op::Exp,
                    &Op::Mul,
                    &Op::Sub,
                    &Op::Add,
                    &Op::Flatten { axis: 1 }
                ]
            );
            let (name, t) = split.initializers.iter().next().unwrap();
            assert!(
                name.ends_with(FROZEN_SUFFIX) && t.shape().is_empty(),
                "{name}"
            );
            let (a, b) = (run(g), run(split));
            for (p, q) in a.iter().zip(&b) {
                let tol = if p.abs() > 1.0 {
                    1.2e-7 * p.abs()
                } else {
                    1.2e-7
                };
                assert!((p - q).abs() <= tol, "{p} vs {q} (alpha {alpha})");
            }
        }
    }

    #[test]
    fn graphs_without_prelu_are_unchanged() {
        let mut g = prelu_graph(&[1], vec![0.1]);
        g.nodes[0].op = Op::Relu;
        g.nodes[0].inputs.truncate(1);
        let before = format!("{:?}", g.nodes);
        assert!(!before.contains("PRelu"));
        assert_eq!(split_activations(&mut g), (0, 0));
        assert_eq!(format!("{:?}", g.nodes), before);
    }

    /// Two PReLUs (a single and a per-channel slope) and two ELUs split by the export passes
    /// come back as the same nodes, in place (`onnx::act_fuse`).
    #[test]
    fn split_activations_fuse_back_into_the_nodes_they_were() {
        let n = |name: &str, op: Op, inputs: &[&str], out: &str| Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
        };
        let mut original = prelu_graph(&[3, 1, 1], vec![0.5, 0.1, 0.2]);
        original.nodes = vec![
            n("p1", Op::PRelu, &["x", "s1"], "a"),
            n("e1", Op::Elu { alpha: 1.0 }, &["a"], "b"),
            n("c", Op::Relu, &["b"], "c"),
            n("e2", Op::Elu { alpha: 0.8 }, &["c"], "d"),
            n("p2", Op::PRelu, &["d", "slope"], "y"),
        ];
        original
            .initializers
            .insert("s1".into(), Tensor::f32(&[1], vec![0.25]).unwrap());
        let mut g = original.clone();
        assert_eq!(split_activations(&mut g), (2, 2));
        assert_eq!(g.nodes.len(), 2 * 4 + 2 * 6 + 1);
        assert_eq!(
            crate::onnx::act_fuse::fuse_split_activations(&mut g),
            (2, 2)
        );
        assert_eq!(format!("{:?}", g.nodes), format!("{:?}", original.nodes));
    }
}
