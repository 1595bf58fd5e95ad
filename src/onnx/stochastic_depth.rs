//! Stochastic depth in a training-mode export. torchvision's `StochasticDepth` (EfficientNet,
//! ConvNeXt, Swin, ...) exported with `training=TrainingMode.TRAINING` writes, per block,
//! `RandomUniformLike -> Less(p) -> Cast -> Div(p) -> Mul(block, .)`: a random keep-mask on the
//! block's output. elrt has no random ops (a deployed file must compute the same every run), and
//! the model's eval-mode function is the block output itself, so the pattern is read as an
//! Identity of the block: the architecture and its deployed function are the user's; only the
//! regulariser of their training recipe is left out, and the reader says so.

use std::collections::HashMap;

use onnx_protobuf::NodeProto;

const RANDOM: &[&str] = &["RandomUniformLike", "RandomUniform"];

/// The nodes with every stochastic-depth pattern replaced by an Identity of the block output
/// (named and writing as the pattern's Mul did), and how many were replaced. Anything else
/// random stays, and the reader refuses it by name.
pub fn strip(nodes: &[NodeProto]) -> (Vec<NodeProto>, usize) {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in nodes.iter().enumerate() {
        for x in &n.input {
            consumers.entry(x.as_str()).or_default().push(i);
        }
    }
    // The one node reading `value`, if it is of type `op`.
    let only = |value: &str, op: &str| -> Option<usize> {
        match consumers.get(value).map(Vec::as_slice) {
            Some([i]) if nodes[*i].op_type == op => Some(*i),
            _ => None,
        }
    };
    let out = |i: usize| {
        nodes[i]
            .output
            .first()
            .map(String::as_str)
            .unwrap_or_default()
    };
    let mut drop = vec![false; nodes.len()];
    let mut identity: HashMap<usize, String> = HashMap::new();
    for (r, n) in nodes.iter().enumerate() {
        if !RANDOM.contains(&n.op_type.as_str()) || n.output.len() != 1 {
            continue;
        }
        let Some(less) = only(out(r), "Less")
            .filter(|&l| nodes[l].input.first().map(String::as_str) == Some(out(r)))
        else {
            continue;
        };
        let Some(cast) = only(out(less), "Cast") else {
            continue;
        };
        // `noise.div_(survival_rate)` is skipped by torchvision when the rate is 0.
        let (scale, mask) = match only(out(cast), "Div") {
            Some(d) if nodes[d].input.first().map(String::as_str) == Some(out(cast)) => {
                (Some(d), out(d))
            }
            _ => (None, out(cast)),
        };
        let Some(mul) = only(mask, "Mul") else {
            continue;
        };
        let m = &nodes[mul];
        let Some(block) = m.input.iter().find(|x| x.as_str() != mask).cloned() else {
            continue;
        };
        if m.input.len() != 2 || m.output.len() != 1 {
            continue;
        }
        for i in [Some(r), Some(less), Some(cast), scale]
            .into_iter()
            .flatten()
        {
            drop[i] = true;
        }
        identity.insert(mul, block);
    }
    let kept = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| !drop[*i])
        .map(|(i, n)| match identity.get(&i) {
            Some(block) => {
                let mut id = NodeProto::new();
                id.name = n.name.clone();
                id.op_type = "Identity".into();
                id.input = vec![block.clone()];
                id.output = n.output.clone();
                id
            }
            None => n.clone(),
        })
        .collect();
    (kept, identity.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        let mut n = NodeProto::new();
        n.name = format!("/sd/{op}");
        n.op_type = op.into();
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![output.into()];
        n
    }

    fn pattern(with_div: bool) -> Vec<NodeProto> {
        let mut v = vec![
            node("Relu", &["x"], "block"),
            node("RandomUniformLike", &["shape_like"], "r"),
            node("Less", &["r", "p"], "keep"),
            node("Cast", &["keep"], "maskb"),
        ];
        if with_div {
            v.push(node("Div", &["maskb", "p"], "mask"));
            v.push(node("Mul", &["block", "mask"], "y"));
        } else {
            v.push(node("Mul", &["maskb", "block"], "y"));
        }
        v.push(node("Add", &["y", "x"], "z"));
        v
    }

    #[test]
    fn the_pattern_becomes_an_identity_of_the_block() {
        for with_div in [true, false] {
            let (nodes, n) = strip(&pattern(with_div));
            assert_eq!(n, 1);
            let ops: Vec<&str> = nodes.iter().map(|n| n.op_type.as_str()).collect();
            assert_eq!(ops, ["Relu", "Identity", "Add"], "div {with_div}");
            assert_eq!(nodes[1].input, ["block"]);
            assert_eq!(nodes[1].output, ["y"]);
        }
    }

    /// A random value read by anything else than the pattern stays (and is refused by name).
    #[test]
    fn other_random_uses_stay() {
        let mut v = pattern(true);
        v.push(node("Add", &["r", "x"], "leak"));
        let (nodes, n) = strip(&v);
        assert_eq!(n, 0);
        assert_eq!(nodes.len(), v.len());
    }
}
