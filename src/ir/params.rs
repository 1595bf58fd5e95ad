//! Which inputs of a node hold trainable parameters.
//!
//! ONNX does not mark parameters: an initializer is a parameter because of where it is read.
//! Conv, Gemm and MatMul weights and biases and the scale and shift of BatchNormalization and
//! LayerNormalization are ([`Op::param_inputs`]). So is a tensor that an elementwise Add, Sub
//! or Mul applies to an activation inside the network: PyTorch exports a `Linear` on an image
//! laid out channels-last as MatMul then Add of its bias, and ConvNeXt's layer scale (a
//! `[C, 1, 1]` parameter) as a Mul. Left out are single numbers (the constants of a decomposed
//! GELU, `x * 0.5`) and a tensor applied straight to the graph's input (a normalization of the
//! image by a fixed mean and deviation, which is preprocessing, not a layer), and a tensor whose
//! name ends in [`FROZEN_SUFFIX`]: the masks elrt's own rewrites make, the frozen copy of a
//! parameter that some op reads as a plain operand (`onnx::untie`), and the constant scale and
//! shift of the instance norm that a GroupNorm exports as (`onnx::group_norm`). The name
//! travels with the exported file, so reading it again keeps them frozen.

/// The name suffix of an elementwise constant that is never trained.
pub const FROZEN_SUFFIX: &str = ".const";

use super::{Graph, Node, Op, Tensor};

/// The input slots of `node` that hold parameters, given how to look up a constant by name and
/// whether a name is a graph input.
pub fn param_slots<'a>(
    node: &Node,
    konst: impl Fn(&str) -> Option<&'a Tensor>,
    is_graph_input: impl Fn(&str) -> bool,
) -> Vec<usize> {
    match node.op {
        Op::Add | Op::Sub | Op::Mul => {
            let (Some(a), Some(b)) = (node.input(0), node.input(1)) else {
                return Vec::new();
            };
            let trainable = |name: &str, t: Option<&Tensor>| {
                !name.ends_with(FROZEN_SUFFIX)
                    && t.is_some_and(|t| t.elem_type().is_float() && t.len() > 1)
            };
            match (konst(a), konst(b)) {
                (ka @ Some(_), None) if trainable(a, ka) && !is_graph_input(b) => vec![0],
                (None, kb @ Some(_)) if trainable(b, kb) && !is_graph_input(a) => vec![1],
                _ => Vec::new(),
            }
        }
        // GroupNorm's constant ones and zeros (`onnx::group_norm`).
        Op::InstanceNorm { .. } | Op::GroupNorm { .. } => node
            .op
            .param_inputs()
            .iter()
            .copied()
            .filter(|&s| node.input(s).is_some_and(|n| !n.ends_with(FROZEN_SUFFIX)))
            .collect(),
        _ => node.op.param_inputs().to_vec(),
    }
}

/// What a parameter slot holds, for naming untied copies (`<module>.<role>`, PyTorch's names).
pub fn param_role(op: &Op, slot: usize) -> &'static str {
    match (op, slot) {
        (Op::Mul, _) => "scale",
        (Op::Add | Op::Sub, _) => "bias",
        (Op::MatMul, _) => "weight",
        (_, 1) => "weight",
        _ => "bias",
    }
}

impl Graph {
    /// [`param_slots`] of `node` in this graph.
    pub fn param_slots(&self, node: &Node) -> Vec<usize> {
        param_slots(
            node,
            |n| self.initializers.get(n),
            |n| self.inputs.iter().any(|i| i.name == n),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn node(op: Op, inputs: &[&str]) -> Node {
        Node {
            name: "n".into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec!["y".into()],
        }
    }

    /// A per-channel tensor applied to an activation is a parameter; a single number, a tensor
    /// applied to the graph's input, and an operation of two activations are not.
    #[test]
    fn elementwise_operand_is_a_parameter_only_on_an_activation_and_when_not_a_scalar() {
        let mut c = BTreeMap::new();
        c.insert(
            "gamma".to_string(),
            Tensor::f32(&[4, 1, 1], vec![1e-6; 4]).unwrap(),
        );
        c.insert("half".to_string(), Tensor::f32(&[], vec![0.5]).unwrap());
        c.insert("shape".to_string(), Tensor::i64_vec(&[1, 2]));
        c.insert(
            "mask.const".to_string(),
            Tensor::f32(&[2], vec![0.0, 1.0]).unwrap(),
        );
        let slots =
            |op: Op, ins: &[&str]| param_slots(&node(op, ins), |n| c.get(n), |n| n == "image");
        assert_eq!(slots(Op::Mul, &["gamma", "act"]), [0]);
        assert_eq!(slots(Op::Add, &["act", "gamma"]), [1]);
        assert_eq!(slots(Op::Sub, &["act", "gamma"]), [1]);
        assert!(slots(Op::Div, &["act", "gamma"]).is_empty());
        assert!(slots(Op::Mul, &["act", "half"]).is_empty());
        assert!(slots(Op::Mul, &["act", "shape"]).is_empty());
        assert!(slots(Op::Mul, &["act", "mask.const"]).is_empty());
        assert!(slots(Op::Sub, &["image", "gamma"]).is_empty());
        assert!(slots(Op::Add, &["act", "other"]).is_empty());
        assert!(slots(Op::Add, &["gamma", "gamma"]).is_empty());
        assert_eq!(slots(Op::MatMul, &["act", "gamma"]), [0, 1]);
    }
}
