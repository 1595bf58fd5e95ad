//! PReLU and ELU written out by elrt's export, read back as PRelu and Elu.
//!
//! The export writes `Relu(x) + slope * (x - Relu(x))` for a PRelu and
//! `Relu(x) + (alpha * Exp(x - Relu(x)) - alpha)` for an Elu (`export::act_split`: faster in
//! tract and onnxruntime). A compact file read again for more training should train as the net
//! it came from: one kernel instead of four or six, the ELU's `expm1` accuracy, and the slope a
//! parameter of the PRelu, which a single-value slope as a Mul operand would not be
//! (`ir::params`: single numbers in an elementwise op are constants). Both patterns are the
//! functions exactly (the ELU's up to `e^x - 1` against `expm1`), so fusing a user's own
//! hand-written one is harmless too.

use crate::ir::{Graph, Node, Op};
use std::collections::HashMap;

/// Who reads and writes each value of a graph.
struct Uses<'a> {
    g: &'a Graph,
    readers: HashMap<&'a str, usize>,
    writer: HashMap<&'a str, usize>,
}

impl<'a> Uses<'a> {
    fn of(g: &'a Graph) -> Self {
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for i in g.nodes.iter().flat_map(|n| &n.inputs) {
            *readers.entry(i.as_str()).or_default() += 1;
        }
        for o in &g.outputs {
            *readers.entry(o.name.as_str()).or_default() += 1;
        }
        let writer = (g.nodes.iter().enumerate())
            .flat_map(|(k, n)| n.outputs.iter().map(move |o| (o.as_str(), k)))
            .collect();
        Uses { g, readers, writer }
    }

    /// Read by exactly `count` nodes (graph outputs count as readers).
    fn only(&self, name: &str, count: usize) -> bool {
        self.readers.get(name).copied().unwrap_or(0) == count
    }

    /// The node that writes `name`, if its op is `op`.
    fn written_by(&self, name: &str, op: &Op) -> Option<usize> {
        (self.writer.get(name).copied()).filter(|&k| self.g.nodes[k].op == *op)
    }

    /// A float initializer's name.
    fn float_const(&self, name: &str) -> bool {
        self.g
            .initializers
            .get(name)
            .is_some_and(|t| t.elem_type().is_float())
    }

    /// For an `Add(r, q)` (either order) with `r = Relu(x)` read only there and by one more
    /// node: (the Relu's index, x, q).
    fn relu_plus(&self, add: &'a Node) -> Option<(usize, &'a String, &'a String)> {
        let (Op::Add, [a, b]) = (&add.op, add.inputs.as_slice()) else {
            return None;
        };
        [(a, b), (b, a)].into_iter().find_map(|(r, q)| {
            let relu = self.written_by(r, &Op::Relu)?;
            let x = self.g.nodes[relu].inputs.first()?;
            self.only(r, 2).then_some((relu, x, q))
        })
    }

    /// `Sub(x, Relu(x))` writing `d`, read only once: the Sub's node.
    fn neg_part(&self, d: &str, x: &str, relu: usize) -> Option<usize> {
        let sub = self.written_by(d, &Op::Sub)?;
        let r = &self.g.nodes[relu].outputs[0];
        (self.g.nodes[sub].inputs.as_slice() == [x.to_string(), r.clone()] && self.only(d, 1))
            .then_some(sub)
    }

    /// `Mul(v, k)` (either order) with `k` a float initializer, writing `m`: (node, v, k).
    fn times_const(&self, m: &str) -> Option<(usize, &'a String, &'a String)> {
        let mul = self.written_by(m, &Op::Mul)?;
        let [p, q] = self.g.nodes[mul].inputs.as_slice() else {
            return None;
        };
        if self.float_const(q) {
            Some((mul, p, q))
        } else if self.float_const(p) {
            Some((mul, q, p))
        } else {
            None
        }
    }
}

/// One match: the Relu's index (where the fused node goes), the other nodes it replaces, and
/// the fused node.
type Fused = (usize, Vec<usize>, Node);

fn prelu_at(u: &Uses, add: usize) -> Option<Fused> {
    let n = &u.g.nodes[add];
    let (relu, x, q) = u.relu_plus(n)?;
    let (mul, d, slope) = u.times_const(q)?;
    let sub = u.neg_part(d, x, relu)?;
    u.only(q, 1).then_some(())?;
    let node = Node {
        name: n.name.strip_suffix(".add").unwrap_or(&n.name).to_string(),
        op: Op::PRelu,
        inputs: vec![x.clone(), slope.clone()],
        outputs: n.outputs.clone(),
    };
    Some((relu, vec![sub, mul, add], node))
}

fn elu_at(u: &Uses, add: usize) -> Option<Fused> {
    let n = &u.g.nodes[add];
    let (relu, x, q) = u.relu_plus(n)?;
    let shift = u.written_by(q, &Op::Sub)?;
    let [scaled, a] = u.g.nodes[shift].inputs.as_slice() else {
        return None;
    };
    let (mul, e, a2) = u.times_const(scaled)?;
    let alpha = match u.g.initializers.get(a)?.to_f32s()[..] {
        [v] if a == a2 => v,
        _ => return None,
    };
    let exp = u.written_by(e, &Op::Exp)?;
    let sub = u.neg_part(u.g.nodes[exp].inputs.first()?, x, relu)?;
    (u.only(q, 1) && u.only(scaled, 1) && u.only(e, 1)).then_some(())?;
    let node = Node {
        name: n.name.strip_suffix(".add").unwrap_or(&n.name).to_string(),
        op: Op::Elu { alpha },
        inputs: vec![x.clone()],
        outputs: n.outputs.clone(),
    };
    Some((relu, vec![sub, exp, mul, shift, add], node))
}

/// Fuses every written-out PReLU and ELU (module docs) in place; returns how many of each.
pub fn fuse_split_activations(g: &mut Graph) -> (usize, usize) {
    let (mut fused, mut counts) = (Vec::new(), (0, 0));
    {
        let u = Uses::of(g);
        for add in 0..g.nodes.len() {
            if let Some(f) = prelu_at(&u, add) {
                fused.push(f);
                counts.0 += 1;
            } else if let Some(f) = elu_at(&u, add) {
                fused.push(f);
                counts.1 += 1;
            }
        }
    }
    let mut drop = vec![false; g.nodes.len()];
    let mut at: HashMap<usize, Node> = HashMap::new();
    for (relu, rest, node) in fused {
        rest.iter().for_each(|&k| drop[k] = true);
        at.insert(relu, node);
    }
    let nodes = std::mem::take(&mut g.nodes);
    g.nodes = (nodes.into_iter().enumerate())
        .filter(|(k, _)| !drop[*k])
        .map(|(k, n)| at.remove(&k).unwrap_or(n))
        .collect();
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, ElemType, ModelMeta, Tensor, ValueInfo};
    use std::collections::BTreeMap;

    fn graph(nodes: Vec<Node>) -> Graph {
        let vi = |n: &str| ValueInfo {
            name: n.into(),
            elem: ElemType::F32,
            shape: Some([1, 2, 3, 3].map(Dim::Fixed).to_vec()),
        };
        let mut initializers = BTreeMap::new();
        initializers.insert("s1".to_string(), Tensor::f32(&[1], vec![0.25]).unwrap());
        initializers.insert(
            "s2".to_string(),
            Tensor::f32(&[1, 2, 1, 1], vec![0.5, 0.1]).unwrap(),
        );
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

    fn node(name: &str, op: Op, inputs: &[&str], out: &str) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
        }
    }

    /// The PReLU pattern with a value read elsewhere too, or a Sub of other operands, is left
    /// alone; so is an ELU pattern whose two alphas differ.
    #[test]
    fn near_misses_are_not_fused() {
        let split = |extra: Option<Node>, sub_inputs: [&str; 2]| {
            let mut nodes = vec![
                node("r", Op::Relu, &["x"], "r"),
                node("d", Op::Sub, &sub_inputs, "d"),
                node("m", Op::Mul, &["d", "s2"], "m"),
                node("a", Op::Add, &["r", "m"], "y0"),
            ];
            nodes.extend(extra);
            nodes.push(node("o", Op::Add, &["y0", "y0"], "y"));
            graph(nodes)
        };
        let mut ok = split(None, ["x", "r"]);
        assert_eq!(fuse_split_activations(&mut ok), (1, 0));
        // x - Relu(x) read by another node as well.
        let mut g = split(Some(node("e", Op::Relu, &["d"], "e")), ["x", "r"]);
        assert_eq!(fuse_split_activations(&mut g), (0, 0));
        // Relu(x) - x is not PReLU's.
        let mut g = split(None, ["r", "x"]);
        assert_eq!(fuse_split_activations(&mut g), (0, 0));
        // ELU written out, with the shift's constant `shift` and the scale's `s1`.
        let elu = |shift: &str| {
            let mut g = graph(vec![
                node("r", Op::Relu, &["x"], "r"),
                node("d", Op::Sub, &["x", "r"], "d"),
                node("e", Op::Exp, &["d"], "e"),
                node("m", Op::Mul, &["e", "s1"], "m"),
                node("s", Op::Sub, &["m", shift], "s"),
                node("a", Op::Add, &["r", "s"], "y"),
            ]);
            g.initializers
                .insert("s3".into(), Tensor::f32(&[], vec![0.25]).unwrap());
            g
        };
        let mut g = elu("s1");
        assert_eq!(fuse_split_activations(&mut g), (0, 1));
        assert_eq!(g.nodes[0].op, Op::Elu { alpha: 0.25 });
        // The same value in another constant is not the pattern's one alpha.
        let mut g = elu("s3");
        assert_eq!(fuse_split_activations(&mut g), (0, 0));
    }
}
