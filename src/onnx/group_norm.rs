//! PyTorch's `nn.GroupNorm` and `nn.InstanceNorm2d(affine=False)` as its exporters write
//! them, with parameters as PyTorch has them.
//!
//! ONNX had no per-channel group norm before opset 21, and PyTorch's exporters (dynamo and
//! TorchScript) write one as `Reshape [N, G, -1]` -> `InstanceNormalization` with a scale of
//! ones and a bias of zeros (`[G]` constants, shared by every GroupNorm of the same group
//! count) -> `Reshape` back -> `Mul` by the module's weight -> `Add` of its bias. Read as
//! written, the instance norm's ones and zeros would be trained as parameters: 2G values that
//! PyTorch does not have, tied across layers, beside the weight and bias that already scale
//! and shift every channel. This pass gives such an instance norm frozen copies (named with
//! [`FROZEN_SUFFIX`], so the exported file read again keeps them frozen).
//!
//! `nn.InstanceNorm2d` has no parameters unless `affine=True` (its default is False), and the
//! exporters then write ones and zeros of their own making: dynamo as initializers named
//! `val_<n>`, TorchScript as Constant nodes. Those are frozen too. An affine instance norm's
//! weight and bias, ones and zeros as well before training, are initializers under the
//! module's names (`stem.1.weight`) and stay trainable.

use std::collections::{BTreeMap, HashSet};

use crate::ir::params::{param_slots, FROZEN_SUFFIX};
use crate::ir::{Node, Op, Tensor};

/// Whether an initializer's name is one PyTorch's dynamo exporter makes up (`val_12`), not a
/// parameter's.
fn exporter_named(name: &str) -> bool {
    name.strip_prefix("val_")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Freezes the constant affine of every instance norm written for a GroupNorm or an
/// `InstanceNorm2d` without parameters (module docs); `constant_nodes` holds the values of the
/// file's Constant nodes, `taken` every value name in the graph. Returns how many instance
/// norms it froze.
pub(super) fn freeze_constant_affine(
    nodes: &mut [Node],
    consts: &mut BTreeMap<String, Tensor>,
    constant_nodes: &HashSet<String>,
    graph_inputs: &HashSet<String>,
    taken: &mut HashSet<String>,
) -> usize {
    let producer = |v: &str| nodes.iter().find(|n| n.outputs.iter().any(|o| o == v));
    let readers = |v: &str| -> Vec<&Node> {
        nodes
            .iter()
            .filter(|n| n.inputs.iter().any(|i| i == v))
            .collect()
    };
    let is_const = |name: Option<&str>, want: f32| {
        name.and_then(|n| consts.get(n))
            .is_some_and(|t| t.elem_type().is_float() && t.to_f32s().iter().all(|&v| v == want))
    };
    let mut group_norms = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        if !matches!(n.op, Op::InstanceNorm { .. })
            || !is_const(n.input(1), 1.0)
            || !is_const(n.input(2), 0.0)
            || n.input(1).is_some_and(|v| v.ends_with(FROZEN_SUFFIX))
        {
            continue;
        }
        let from_reshape = n
            .input(0)
            .and_then(&producer)
            .is_some_and(|p| matches!(p.op, Op::Reshape { .. }));
        // The instance norm's only reader reshapes back, and that is scaled by a parameter.
        let scaled_after = match readers(&n.outputs[0]).as_slice() {
            [back] if matches!(back.op, Op::Reshape { .. }) => {
                readers(&back.outputs[0]).iter().any(|m| {
                    matches!(m.op, Op::Mul)
                        && !param_slots(m, |v| consts.get(v), |v| graph_inputs.contains(v))
                            .is_empty()
                })
            }
            _ => false,
        };
        let made_up = [n.input(1), n.input(2)]
            .into_iter()
            .flatten()
            .all(|v| constant_nodes.contains(v) || exporter_named(v));
        if (from_reshape && scaled_after) || made_up {
            group_norms.push(i);
        }
    }
    // One frozen copy per constant: GroupNorms of one group count share it, as in the file.
    let mut frozen: BTreeMap<String, String> = BTreeMap::new();
    for &i in &group_norms {
        for slot in [1, 2] {
            let name = nodes[i].inputs[slot].clone();
            let copy = frozen.entry(name.clone()).or_insert_with(|| {
                let base = name.clone();
                let fresh = std::iter::once(format!("{base}{FROZEN_SUFFIX}"))
                    .chain((2..).map(|k| format!("{base}_{k}{FROZEN_SUFFIX}")))
                    .find(|f| !taken.contains(f))
                    .expect("an unused name");
                taken.insert(fresh.clone());
                consts.insert(fresh.clone(), consts[&name].clone());
                fresh
            });
            nodes[i].inputs[slot] = copy.clone();
        }
    }
    group_norms.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::params::param_slots;

    fn node(name: &str, op: Op, inputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![format!("{name}_out")],
        }
    }

    /// Frozen: GroupNorm's pattern (shared constants, one frozen copy each), dynamo's made-up
    /// `val_` names and TorchScript's Constant nodes. Trainable: an affine InstanceNorm2d's
    /// module-named ones and zeros, and a GroupNorm-like pattern whose scale is not all ones.
    #[test]
    fn constant_ones_and_zeros_are_frozen_and_module_parameters_are_not() {
        let t = |v: f32, n: usize| Tensor::f32(&[n], vec![v; n]).unwrap();
        let mut consts: BTreeMap<String, Tensor> = [
            ("ones", t(1.0, 2)),
            ("zeros", t(0.0, 2)),
            ("gamma", t(0.5, 4)),
            ("val_7", t(1.0, 4)),
            ("val_8", t(0.0, 4)),
            ("/i/Constant_output_0", t(1.0, 4)),
            ("/i/Constant_1_output_0", t(0.0, 4)),
            ("inorm.weight", t(1.0, 4)),
            ("inorm.bias", t(0.0, 4)),
            ("half", t(0.5, 2)),
            ("shape", Tensor::i64_vec(&[1, 2, -1])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let inorm = |name: &str, x: &str, s: &str, b: &str| {
            node(name, Op::InstanceNorm { epsilon: 1e-5 }, &[x, s, b])
        };
        let reshape =
            |name: &str, x: &str| node(name, Op::Reshape { allowzero: false }, &[x, "shape"]);
        let mut nodes = vec![
            reshape("r0", "x"),
            inorm("gn0", "r0_out", "ones", "zeros"),
            reshape("r1", "gn0_out"),
            node("mul0", Op::Mul, &["r1_out", "gamma"]),
            reshape("r2", "mul0_out"),
            inorm("gn1", "r2_out", "ones", "zeros"),
            reshape("r3", "gn1_out"),
            node("mul1", Op::Mul, &["r3_out", "gamma"]),
            inorm("dynamo", "mul1_out", "val_7", "val_8"),
            inorm(
                "ts",
                "dynamo_out",
                "/i/Constant_output_0",
                "/i/Constant_1_output_0",
            ),
            inorm("affine", "ts_out", "inorm.weight", "inorm.bias"),
            reshape("r4", "affine_out"),
            inorm("scaled", "r4_out", "half", "zeros"),
            reshape("r5", "scaled_out"),
            node("mul2", Op::Mul, &["r5_out", "gamma"]),
        ];
        let constant_nodes: HashSet<String> = ["/i/Constant_output_0", "/i/Constant_1_output_0"]
            .map(String::from)
            .into();
        let inputs: HashSet<String> = ["x".to_string()].into();
        let mut taken: HashSet<String> = consts.keys().cloned().collect();
        let frozen = freeze_constant_affine(
            &mut nodes,
            &mut consts,
            &constant_nodes,
            &inputs,
            &mut taken,
        );
        assert_eq!(frozen, 4);
        let slots = |name: &str| {
            let n = nodes.iter().find(|n| n.name == name).unwrap();
            param_slots(n, |v| consts.get(v), |v| inputs.contains(v))
        };
        for name in ["gn0", "gn1", "dynamo", "ts"] {
            assert!(slots(name).is_empty(), "{name} trains its constants");
        }
        assert_eq!(slots("affine"), [1, 2]);
        assert_eq!(slots("scaled"), [1, 2]);
        assert_eq!(nodes[1].inputs[1..], ["ones.const", "zeros.const"]);
        assert_eq!(nodes[5].inputs[1..], ["ones.const", "zeros.const"]);
        assert_eq!(consts["ones.const"], consts["ones"]);
    }
}
