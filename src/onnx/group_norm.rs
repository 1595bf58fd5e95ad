//! PyTorch's `nn.GroupNorm` as its exporters write it, with parameters as PyTorch has them.
//!
//! ONNX had no per-channel group norm before opset 21, and PyTorch's exporters (dynamo and
//! TorchScript) write one as `Reshape [N, G, -1]` -> `InstanceNormalization` with a scale of
//! ones and a bias of zeros (`[G]` constants, shared by every GroupNorm of the same group
//! count) -> `Reshape` back -> `Mul` by the module's weight -> `Add` of its bias. Read as
//! written, the instance norm's ones and zeros would be trained as parameters: 2G values that
//! PyTorch does not have, tied across layers, beside the weight and bias that already scale
//! and shift every channel. This pass gives such an instance norm frozen copies (named with
//! [`FROZEN_SUFFIX`], so the exported file read again keeps them frozen). An instance norm in
//! any other setting (`nn.InstanceNorm2d(affine=True)`, whose weight also starts at ones)
//! keeps trainable scale and bias.

use std::collections::{BTreeMap, HashSet};

use crate::ir::params::{param_slots, FROZEN_SUFFIX};
use crate::ir::{Node, Op, Tensor};

/// Freezes the constant affine of every instance norm written for a GroupNorm (module docs);
/// `taken` is every value name in the graph. Returns how many instance norms it froze.
pub(super) fn freeze_group_norm_affine(
    nodes: &mut [Node],
    consts: &mut BTreeMap<String, Tensor>,
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
        if from_reshape && scaled_after {
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
