//! Constant operands of elementwise ops written at the rank of the activation they apply to.
//!
//! PyTorch's exporters write a per-channel constant as `[C, 1, 1]` against an `[N, C, H, W]`
//! activation (GroupNorm's weight and bias after its instance norm, ConvNeXt's layer scale,
//! PReLU's slope). tract 0.23 runs that as a general broadcast: GroupNorm's `Mul` + `Add` took
//! 122 us on a `[1, 32, 24, 28]` activation (5.7 ns a value) and cost a small user CNN 1.35x of
//! its whole latency, where the same constants written `[1, C, 1, 1]` run on its per-channel
//! path (same values, same results; measured with `elrt bench`, see docs/results.md). This
//! pass prepends the ones: an initializer read only as an operand of Add, Sub, Mul, Div and
//! PRelu, at a lower rank than their output and at the same rank in every use, gets that rank.

use crate::ir::shape::Facts;
use crate::ir::{Graph, Op};
use std::collections::BTreeMap;

/// Reshapes every such initializer (module docs); returns how many it reshaped.
pub fn align_constant_ranks(g: &mut Graph, facts: &Facts) -> usize {
    // Per initializer: the rank of every use's output, or None where a use is not elementwise.
    let mut wanted: BTreeMap<&str, Vec<Option<usize>>> = BTreeMap::new();
    for n in &g.nodes {
        let elementwise = matches!(n.op, Op::Add | Op::Sub | Op::Mul | Op::Div | Op::PRelu);
        let out_rank = n
            .outputs
            .first()
            .and_then(|o| facts.get(o))
            .map(|f| f.shape.len());
        for input in &n.inputs {
            if g.initializers.contains_key(input) {
                wanted
                    .entry(input.as_str())
                    .or_default()
                    .push(if elementwise { out_rank } else { None });
            }
        }
    }
    let mut reshaped = Vec::new();
    for (name, uses) in wanted {
        let (Some(&Some(rank)), true) = (uses.first(), uses.windows(2).all(|w| w[0] == w[1]))
        else {
            continue;
        };
        let t = &g.initializers[name];
        let shape = t.shape();
        // A scalar is already on every runtime's fast path.
        if shape.len() >= rank || t.len() <= 1 {
            continue;
        }
        let mut full = vec![1; rank - shape.len()];
        full.extend_from_slice(shape);
        if let Ok(r) = t.reshaped(&full) {
            reshaped.push((name.to_string(), r));
        }
    }
    let count = reshaped.len();
    for (name, t) in reshaped {
        g.initializers.insert(name, t);
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{shape::infer, Dim, ElemType, ModelMeta, Node, Tensor, ValueInfo};

    fn graph(nodes: Vec<Node>, inits: &[(&str, Vec<usize>)]) -> Graph {
        let vi = |n: &str| ValueInfo {
            name: n.into(),
            elem: ElemType::F32,
            shape: Some([2, 3, 4, 4].map(Dim::Fixed).to_vec()),
        };
        let mut initializers = BTreeMap::new();
        for (name, shape) in inits {
            let n: usize = shape.iter().product();
            initializers.insert(name.to_string(), Tensor::f32(shape, vec![0.5; n]).unwrap());
        }
        Graph {
            name: "g".into(),
            opset: 13,
            inputs: vec![vi("x")],
            outputs: vec![vi("y")],
            nodes,
            initializers,
            meta: ModelMeta::default(),
        }
    }

    fn node(op: Op, inputs: &[&str], out: &str) -> Node {
        Node {
            name: format!("n_{out}"),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.to_string()],
        }
    }

    /// `[C, 1, 1]` operands of Mul, Add and PRelu become `[1, C, 1, 1]`; a scalar, an operand
    /// already at full rank and one that another op also reads keep their shapes.
    #[test]
    fn per_channel_operands_get_the_activation_rank() {
        let mut g = graph(
            vec![
                node(Op::Mul, &["x", "gamma"], "a"),
                node(Op::Add, &["beta", "a"], "b"),
                node(Op::PRelu, &["b", "slope"], "c"),
                node(Op::Mul, &["c", "half"], "d"),
                node(Op::Add, &["d", "full"], "e"),
                node(Op::Mul, &["e", "shared"], "f"),
                node(Op::Concat { axis: 0 }, &["shared", "shared"], "s2"),
                node(Op::Identity, &["f"], "y"),
            ],
            &[
                ("gamma", vec![3, 1, 1]),
                ("beta", vec![3, 1, 1]),
                ("slope", vec![3, 1, 1]),
                ("half", vec![]),
                ("full", vec![1, 3, 1, 1]),
                ("shared", vec![3, 1, 1]),
            ],
        );
        let facts = infer(&g, &[vec![2, 3, 4, 4]]).unwrap();
        assert_eq!(align_constant_ranks(&mut g, &facts), 3);
        for (name, want) in [
            ("gamma", &[1, 3, 1, 1][..]),
            ("beta", &[1, 3, 1, 1]),
            ("slope", &[1, 3, 1, 1]),
            ("half", &[]),
            ("full", &[1, 3, 1, 1]),
            ("shared", &[3, 1, 1]),
        ] {
            assert_eq!(g.initializers[name].shape(), want, "{name}");
        }
    }
}
