//! Untying initializers that an exporter shared between distinct parameters.
//!
//! PyTorch's dynamo exporter (its default) stores tensors of equal contents once. On an
//! untrained model, which is what elrt is given, every BatchNorm's scale is all ones like its
//! running variance and its shift all zeros like its running mean, so each BN that is not
//! folded into a conv (DenseNet's pre-activation BNs, for one) reads its scale and its
//! variance from one initializer, and BNs of equal width share them across layers. Read as
//! written, training would tie parameters PyTorch keeps apart, and the written file would
//! hold a BN's trained scale where its variance belongs: DenseNet-121's compact file then
//! overflowed to NaN on every input.
//!
//! The pass gives each parameter or statistic slot its own tensor, named as PyTorch names it
//! (`features.denseblock1.denselayer3.norm1.running_var`) from the module path that the exporter
//! records on each node (`pkg.torch.onnx.name_scopes`), else `<node>.<role>`. Uses that the
//! exporter attributes to one module and role (a module called twice: real weight sharing)
//! stay shared.

use std::collections::{BTreeMap, HashSet};

use crate::ir::params::{param_role, param_slots, FROZEN_SUFFIX};
use crate::ir::{Node, Op, Tensor};

/// The role of each input slot of `n` that holds a parameter or a BN statistic.
fn roles(
    n: &Node,
    consts: &BTreeMap<String, Tensor>,
    graph_inputs: &HashSet<String>,
) -> Vec<(usize, &'static str)> {
    let mut out: Vec<(usize, &'static str)> =
        param_slots(n, |v| consts.get(v), |v| graph_inputs.contains(v))
            .into_iter()
            .map(|slot| (slot, param_role(&n.op, slot)))
            .collect();
    if matches!(n.op, Op::BatchNorm(_)) {
        out.extend([(3, "running_mean"), (4, "running_var")]);
    }
    out
}

/// The module path of a node from the dynamo exporter's `pkg.torch.onnx.name_scopes`, a
/// Python list such as `['', 'features', 'features.norm0', '_native_batch_norm_...']`: its
/// next-to-last entry (the last is the op).
pub(super) fn module_path(name_scopes: &str) -> Option<String> {
    let entries: Vec<&str> = name_scopes.split('\'').skip(1).step_by(2).collect();
    match entries.as_slice() {
        [.., module, _op] if !module.is_empty() => Some(module.to_string()),
        _ => None,
    }
}

/// Gives every parameter and BN-statistic use of a shared initializer its own copy (see the
/// module docs), and other ops' uses of a parameter one frozen copy; `modules[i]` is node
/// `i`'s module path where the file records one, `taken` every value name in the graph.
/// Returns how many copies were made.
pub(super) fn untie(
    nodes: &mut [Node],
    consts: &mut BTreeMap<String, Tensor>,
    modules: &[Option<String>],
    graph_inputs: &HashSet<String>,
    taken: &mut HashSet<String>,
) -> usize {
    // Each node's parameter and statistic slots, decided on the file as read.
    let node_roles: Vec<Vec<(usize, &'static str)>> = nodes
        .iter()
        .map(|n| roles(n, consts, graph_inputs))
        .collect();
    let role = |ni: usize, slot: usize| {
        node_roles[ni]
            .iter()
            .find(|&&(s, _)| s == slot)
            .map(|&(_, r)| r)
    };
    // Uses of each initializer in parameter or statistic slots, in graph order.
    let mut uses: BTreeMap<String, Vec<(usize, usize, &'static str)>> = BTreeMap::new();
    for (ni, n) in nodes.iter().enumerate() {
        for slot in 0..n.inputs.len() {
            if let (Some(role), Some(name)) = (role(ni, slot), n.input(slot)) {
                if consts.contains_key(name) {
                    uses.entry(name.to_string())
                        .or_default()
                        .push((ni, slot, role));
                }
            }
        }
    }
    let copies_before = consts.len();
    // A parameter that another op also reads as a plain operand: the engine computes that op
    // with the value the file holds, so the operand keeps it in a copy of its own.
    let mut frozen: BTreeMap<String, String> = BTreeMap::new();
    for (ni, n) in nodes.iter_mut().enumerate() {
        for slot in 0..n.inputs.len() {
            let name = n.inputs[slot].clone();
            if role(ni, slot).is_none() && uses.contains_key(&name) {
                let value = consts[&name].clone();
                n.inputs[slot] = frozen
                    .entry(name.clone())
                    .or_insert_with(|| {
                        fresh_copy(&format!("{name}{FROZEN_SUFFIX}"), &value, consts, taken)
                    })
                    .clone();
            }
        }
    }
    for (name, us) in uses.into_iter().filter(|(_, us)| us.len() > 1) {
        // Uses that name the same module and role are one PyTorch parameter; a use the file
        // says nothing about is its own. (grouping key, name for a copy)
        let wanted: Vec<(String, String)> = us
            .iter()
            .map(
                |&(ni, slot, role)| match modules.get(ni).cloned().flatten() {
                    Some(m) => (format!("{m}.{role}"), format!("{m}.{role}")),
                    None => (
                        format!("{}#{slot}", nodes[ni].name),
                        format!("{}.{role}", nodes[ni].name),
                    ),
                },
            )
            .collect();
        // The group whose name is the initializer's own keeps it, else the first use's.
        let keeper = wanted
            .iter()
            .find(|(key, _)| *key == name)
            .unwrap_or(&wanted[0])
            .0
            .clone();
        let value = consts[&name].clone();
        let mut renamed: BTreeMap<&str, String> = BTreeMap::new();
        for (&(ni, slot, _), (key, base)) in us.iter().zip(&wanted) {
            if *key == keeper {
                continue;
            }
            let fresh = renamed
                .entry(key)
                .or_insert_with(|| fresh_copy(base, &value, consts, taken));
            nodes[ni].inputs[slot] = fresh.clone();
        }
    }
    consts.len() - copies_before
}

/// Adds a copy of `value` under `base`, or `base_2`, `base_3`... if that value name is taken.
/// Gives a parameter the exporter named itself (`val_4`: dynamo's name for a Linear's weight
/// it stored transposed, as MatMul reads it) PyTorch's name, `<module>.<role>`, where the file
/// records the module of its only reader. Layer names (and so factor names, ranks files and
/// reports) come from weight names. Returns how many were renamed.
pub(super) fn name_generated_params(
    nodes: &mut [Node],
    consts: &mut BTreeMap<String, Tensor>,
    modules: &[Option<String>],
    graph_inputs: &HashSet<String>,
    taken: &mut HashSet<String>,
) -> usize {
    let generated = |n: &str| n.starts_with("val_") || n.starts_with("_val_");
    let mut readers: BTreeMap<String, usize> = BTreeMap::new();
    for n in nodes.iter() {
        for i in n.inputs.iter().filter(|i| consts.contains_key(*i)) {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    let mut renamed = 0;
    for (node, module) in nodes.iter_mut().zip(modules) {
        let Some(module) = module else {
            continue;
        };
        for (slot, role) in roles(node, consts, graph_inputs) {
            let Some(name) = node.input(slot).map(str::to_string) else {
                continue;
            };
            if !generated(&name) || readers.get(&name) != Some(&1) {
                continue;
            }
            let Some(value) = consts.remove(&name) else {
                continue;
            };
            let fresh = fresh_copy(&format!("{module}.{role}"), &value, consts, taken);
            node.inputs[slot] = fresh;
            renamed += 1;
        }
    }
    renamed
}

fn fresh_copy(
    base: &str,
    value: &Tensor,
    consts: &mut BTreeMap<String, Tensor>,
    taken: &mut HashSet<String>,
) -> String {
    let mut fresh = base.to_string();
    let mut i = 2;
    while taken.contains(&fresh) {
        fresh = format!("{base}_{i}");
        i += 1;
    }
    taken.insert(fresh.clone());
    consts.insert(fresh.clone(), value.clone());
    fresh
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::BatchNorm;

    fn bn(name: &str, inputs: [&str; 5]) -> Node {
        Node {
            name: name.into(),
            op: Op::BatchNorm(BatchNorm {
                epsilon: 1e-5,
                momentum: 0.9,
                training_mode: false,
            }),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![format!("{name}_out")],
        }
    }

    fn consts(names: &[&str]) -> BTreeMap<String, Tensor> {
        names
            .iter()
            .map(|n| (n.to_string(), Tensor::f32(&[2], vec![1.0, 1.0]).unwrap()))
            .collect()
    }

    #[test]
    fn module_path_is_the_next_to_last_scope() {
        assert_eq!(
            module_path("['', 'features', 'features.norm0', '_native_batch_norm_legit_1']"),
            Some("features.norm0".into())
        );
        assert_eq!(module_path("['', 'conv2d']"), None);
        assert_eq!(module_path("[]"), None);
    }

    #[test]
    fn a_bn_reading_scale_and_variance_from_one_tensor_gets_pytorch_names() {
        let mut nodes = vec![
            bn("bn_a", ["x", "a.weight", "a.bias", "a.bias", "a.weight"]),
            bn(
                "bn_b",
                ["bn_a_out", "a.weight", "a.bias", "a.bias", "a.weight"],
            ),
        ];
        let mut c = consts(&["a.weight", "a.bias"]);
        let mut taken: HashSet<String> = c.keys().cloned().collect();
        let modules = vec![Some("a".to_string()), Some("b".to_string())];
        let copies = untie(&mut nodes, &mut c, &modules, &HashSet::new(), &mut taken);
        assert_eq!(copies, 6);
        assert_eq!(
            nodes[0].inputs[1..],
            ["a.weight", "a.bias", "a.running_mean", "a.running_var"]
        );
        assert_eq!(
            nodes[1].inputs[1..],
            ["b.weight", "b.bias", "b.running_mean", "b.running_var"]
        );
        assert_eq!(c.len(), 8);
    }

    #[test]
    fn one_module_called_twice_stays_shared() {
        let mut nodes = vec![
            bn(
                "bn_1",
                ["x", "m.weight", "m.bias", "m.running_mean", "m.running_var"],
            ),
            bn(
                "bn_2",
                [
                    "bn_1_out",
                    "m.weight",
                    "m.bias",
                    "m.running_mean",
                    "m.running_var",
                ],
            ),
        ];
        let mut c = consts(&["m.weight", "m.bias", "m.running_mean", "m.running_var"]);
        let mut taken: HashSet<String> = c.keys().cloned().collect();
        let modules = vec![Some("m".to_string()), Some("m".to_string())];
        assert_eq!(
            untie(&mut nodes, &mut c, &modules, &HashSet::new(), &mut taken),
            0
        );
        assert_eq!(nodes[0].inputs[1..], nodes[1].inputs[1..]);
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn without_module_paths_each_use_is_its_own_and_names_do_not_collide() {
        let mut nodes = vec![
            bn("bn", ["x", "s", "z", "z", "s"]),
            bn("bn2", ["bn_out", "s", "z", "z", "s"]),
        ];
        let mut c = consts(&["s", "z"]);
        let mut taken: HashSet<String> = c.keys().cloned().collect();
        taken.insert("bn.running_var".into()); // a value of that name already exists
        assert_eq!(
            untie(
                &mut nodes,
                &mut c,
                &[None, None],
                &HashSet::new(),
                &mut taken
            ),
            6
        );
        assert_eq!(
            nodes[0].inputs[1..],
            ["s", "z", "bn.running_mean", "bn.running_var_2"]
        );
        assert_eq!(
            nodes[1].inputs[1..],
            [
                "bn2.weight",
                "bn2.bias",
                "bn2.running_mean",
                "bn2.running_var"
            ]
        );
    }

    #[test]
    fn another_ops_operand_that_is_a_parameter_gets_a_frozen_copy() {
        let mut nodes = vec![
            bn("bn", ["x", "s", "z", "m", "v"]),
            Node {
                name: "div".into(),
                op: Op::Div,
                inputs: vec!["bn_out".into(), "s".into()],
                outputs: vec!["y".into()],
            },
        ];
        let mut c = consts(&["s", "z", "m", "v"]);
        let mut taken: HashSet<String> = c.keys().cloned().collect();
        assert_eq!(
            untie(
                &mut nodes,
                &mut c,
                &[None, None],
                &HashSet::new(),
                &mut taken
            ),
            1
        );
        assert_eq!(nodes[0].inputs[1..], ["s", "z", "m", "v"]);
        assert_eq!(nodes[1].inputs, ["bn_out", "s.const"]);
    }

    /// An Add of a tensor to an activation trains it (a Linear's bias after a MatMul, as the
    /// dynamo exporter writes a Linear on channels-last pixels), so when the exporter shared it
    /// with a BN's shift (both zeros) the Add gets a parameter of its own, not a frozen copy.
    #[test]
    fn an_elementwise_parameter_shared_with_a_bn_gets_its_own_copy() {
        let mut nodes = vec![
            bn("bn", ["x", "s", "z", "m", "v"]),
            Node {
                name: "add".into(),
                op: Op::Add,
                inputs: vec!["bn_out".into(), "z".into()],
                outputs: vec!["y".into()],
            },
        ];
        let mut c = consts(&["s", "z", "m", "v"]);
        let mut taken: HashSet<String> = c.keys().cloned().collect();
        assert_eq!(
            untie(
                &mut nodes,
                &mut c,
                &[None, None],
                &HashSet::new(),
                &mut taken
            ),
            1
        );
        assert_eq!(nodes[0].inputs[1..], ["s", "z", "m", "v"]);
        assert_eq!(nodes[1].inputs, ["bn_out", "add.bias"]);
    }

    /// A weight under a generated name (`val_4`) read by one node of a known module takes
    /// PyTorch's name; one read twice, or without a module, keeps its own.
    #[test]
    fn generated_parameter_names_become_module_names() {
        let mm = |name: &str, w: &str| Node {
            name: name.into(),
            op: Op::MatMul,
            inputs: vec!["x".into(), w.into()],
            outputs: vec![format!("{name}_out")],
        };
        let mut nodes = vec![
            mm("a", "val_4"),
            mm("b", "val_6"),
            mm("c", "val_6"),
            mm("d", "val_8"),
        ];
        let mut c = consts(&["val_4", "val_6", "val_8"]);
        let mut taken: HashSet<String> = c.keys().cloned().collect();
        let modules = [
            Some("features.1.0.block.3".to_string()),
            Some("m".to_string()),
            Some("m".to_string()),
            None,
        ];
        let n = name_generated_params(&mut nodes, &mut c, &modules, &HashSet::new(), &mut taken);
        assert_eq!(n, 1);
        assert_eq!(nodes[0].inputs[1], "features.1.0.block.3.weight");
        assert!(c.contains_key("features.1.0.block.3.weight") && !c.contains_key("val_4"));
        assert_eq!(
            (nodes[1].inputs[1].as_str(), nodes[3].inputs[1].as_str()),
            ("val_6", "val_8")
        );
    }
}
