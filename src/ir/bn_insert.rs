//! Re-inserts the BatchNormalizations that an eval-mode export folded into its convs.
//!
//! An eval-mode PyTorch export has its BN folded into conv biases; such a graph trains badly
//! from scratch. Re-inserting BN (and dropping the conv bias, which BN's shift makes redundant)
//! restores the architecture as it was trained; export folds BN back in. Where the file says
//! which convs had a BN ([`BN_FOLDED_KEY`], from the dynamo exporter's module records) exactly
//! those get one; otherwise, in a graph with no normalization, every conv layer does (after the
//! last factor of a factorized layer).

use std::collections::{BTreeMap, HashMap, HashSet};

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

/// `metadata_props` key of a graph read from a file whose exporter folded BatchNorms into
/// convs and said which (PyTorch's dynamo exporter, see `onnx::dynamo_restore`): a JSON object
/// from each such conv's output value to the BN module's path (`{"conv2d_3": "layer1.0.bn1"}`),
/// possibly empty. Value names survive `convert` (a factorized layer's last factor produces
/// the layer's output value), so the record still places each BN after its layer's chain.
/// [`apply`] consumes it.
pub const BN_FOLDED_KEY: &str = "elrt.bn_folded";

/// What [`apply`] did: how many BNs it inserted, and why there (for the user's log line).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inserted {
    pub count: usize,
    pub why: &'static str,
}

/// Applies the policy. `inner_factor` says whether a conv node is a low-rank factor that
/// another factor of its layer follows: a BN never goes between the factors of one layer.
///
/// Under `Auto`, a graph that records where its exporter folded BatchNorms
/// ([`BN_FOLDED_KEY`]) gets exactly those back, named as PyTorch named them. A graph with no
/// normalization at all gets a BN after every conv layer: an eval-mode export that folded them
/// all without saying where, or a network built without any (SqueezeNet), which trains from
/// scratch only badly as built (PyTorch's own run of torchvision squeezenet1_0 collapses to a
/// constant output); the export folds them into the convs, so the deployed file has the
/// architecture it came with. A graph normalized already (BN, LayerNorm, InstanceNorm or
/// GroupNorm) is left alone.
pub fn apply(
    graph: &mut Graph,
    policy: BnPolicy,
    inner_factor: impl Fn(&str) -> bool,
) -> anyhow::Result<Inserted> {
    // Absent and empty records mean the same: no BN to put back where it was.
    let folded = take_folded_record(graph)?;
    let has_norm = graph.nodes.iter().any(|n| {
        matches!(
            n.op,
            Op::BatchNorm(_) | Op::LayerNorm(_) | Op::InstanceNorm { .. } | Op::GroupNorm { .. }
        )
    });
    let every_layer = |graph: &Graph| -> Vec<String> {
        graph
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Conv(_)) && !inner_factor(&n.name))
            .map(|n| n.outputs[0].clone())
            .collect()
    };
    let (targets, why): (Vec<String>, &'static str) = match policy {
        BnPolicy::Keep => {
            return Ok(Inserted {
                count: 0,
                why: "--bn keep",
            })
        }
        BnPolicy::Auto if !folded.is_empty() => {
            let producers = graph.producers();
            for v in folded.keys() {
                let conv = producers.get(v.as_str()).map(|&i| &graph.nodes[i]);
                if !conv.is_some_and(|n| matches!(n.op, Op::Conv(_))) {
                    anyhow::bail!(
                        "metadata '{BN_FOLDED_KEY}': value '{v}' should be a conv's output, and no conv produces it"
                    );
                }
            }
            (
                folded.keys().cloned().collect(),
                "where the exporter folded them into convs (--bn auto)",
            )
        }
        BnPolicy::Auto if has_norm => {
            return Ok(Inserted {
                count: 0,
                why: "the model is normalized already (--bn auto)",
            })
        }
        BnPolicy::Auto => (
            every_layer(graph),
            "after every conv layer: the model has no normalization layer (--bn auto; export folds \
             them into the convs; --bn keep trains the model as built)",
        ),
        BnPolicy::Insert => (every_layer(graph), "after every conv layer lacking one (--bn insert)"),
    };
    Ok(Inserted {
        count: insert(graph, &targets, &folded),
        why,
    })
}

/// Removes and parses the [`BN_FOLDED_KEY`] record (empty when the graph has none).
fn take_folded_record(graph: &mut Graph) -> anyhow::Result<BTreeMap<String, String>> {
    let props = &mut graph.meta.metadata_props;
    let Some(i) = props.iter().position(|(k, _)| k == BN_FOLDED_KEY) else {
        return Ok(BTreeMap::new());
    };
    let (_, json) = props.remove(i);
    let record = serde_json::from_str(&json).map_err(|e| {
        anyhow::anyhow!("metadata '{BN_FOLDED_KEY}': not a JSON object of value names: {e}")
    })?;
    Ok(record)
}

/// Inserts a BN after the conv producing each of `targets` that is not already followed by
/// one; a BN is named after its PyTorch module where `modules` has one for the value.
fn insert(graph: &mut Graph, targets: &[String], modules: &BTreeMap<String, String>) -> usize {
    let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        for inp in &n.inputs {
            consumers.entry(inp.as_str()).or_default().push(i);
        }
    }
    let targets: HashSet<&str> = targets.iter().map(String::as_str).collect();
    // Convs whose only consumer is already a BN keep their form.
    let wanted: Vec<bool> = graph
        .nodes
        .iter()
        .map(|n| {
            matches!(n.op, Op::Conv(_))
                && targets.contains(n.outputs[0].as_str())
                && !consumers.get(n.outputs[0].as_str()).is_some_and(|c| {
                    c.len() == 1 && matches!(graph.nodes[c[0]].op, Op::BatchNorm(_))
                })
        })
        .collect();
    let mut taken: HashSet<String> = graph
        .initializers
        .keys()
        .cloned()
        .chain(graph.nodes.iter().map(|n| n.name.clone()))
        .collect();
    let mut nodes = Vec::with_capacity(graph.nodes.len() * 2);
    let mut count = 0;
    for (mut n, wanted) in std::mem::take(&mut graph.nodes).into_iter().zip(wanted) {
        let Some(c) = wanted
            .then(|| graph.initializers.get(&n.inputs[1]))
            .flatten()
            .map(|w| w.shape()[0])
        else {
            nodes.push(n);
            continue;
        };
        let out = n.outputs[0].clone();
        if n.inputs.len() > 2 {
            n.inputs.truncate(2);
        }
        // PyTorch's names (`layer1.0.bn1`, `layer1.0.bn1.weight`) where the record has the
        // module and they are free, else `<conv>/bn` and `<conv>/bn/scale`.
        let (base, names) = match modules.get(&out) {
            Some(m)
                if !taken.contains(m)
                    && BN_ROLES
                        .iter()
                        .all(|(_, torch, _)| !taken.contains(&format!("{m}.{torch}"))) =>
            {
                (
                    m.clone(),
                    BN_ROLES.map(|(_, torch, _)| format!("{m}.{torch}")),
                )
            }
            _ => {
                let base = format!("{}/bn", n.name);
                let names = BN_ROLES.map(|(elrt, _, _)| format!("{base}/{elrt}"));
                (base, names)
            }
        };
        let conv_out = format!("{out}/prebn");
        n.outputs[0] = conv_out.clone();
        let mut inputs = vec![conv_out];
        for (name, (_, _, v)) in names.into_iter().zip(BN_ROLES) {
            graph
                .initializers
                .insert(name.clone(), Tensor::f32(&[c], vec![v; c]).expect("1-D"));
            taken.insert(name.clone());
            inputs.push(name);
        }
        taken.insert(base.clone());
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

/// Sets every BatchNormalization's running-statistics momentum to PyTorch's `m` (the new
/// batch's weight; ONNX's attribute is the old value's, `1 - m`). Returns how many it set.
pub fn set_momentum(graph: &mut Graph, m: f32) -> anyhow::Result<usize> {
    check_momentum(m)?;
    let mut count = 0;
    for n in &mut graph.nodes {
        if let Op::BatchNorm(b) = &mut n.op {
            b.momentum = 1.0 - m;
            count += 1;
        }
    }
    Ok(count)
}

/// `m` when it is a `--bn-momentum` value: in (0, 1], PyTorch's convention.
pub fn check_momentum(m: f32) -> anyhow::Result<f32> {
    anyhow::ensure!(
        m > 0.0 && m <= 1.0,
        "--bn-momentum {m}: expected a value in (0, 1], PyTorch's convention (0.1 is its default)"
    );
    Ok(m)
}

/// A note for the log when the graph's BatchNormalizations average their running statistics
/// over many more steps than elrt's own (PyTorch momentum 0.1, about 10 steps) and than a
/// quarter of the run's `steps`: evaluation then normalises with statistics of weights long
/// gone. A torchvision MobileNet-V3 exported with its BNs (PyTorch momentum 0.01, about 100
/// steps) trained 225 steps to 86% on its training images and tested at chance; with momentum
/// 0.1, 82%.
pub fn momentum_note(graph: &Graph, steps: u64) -> Option<String> {
    let slow: Vec<f32> = graph
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            Op::BatchNorm(b) if b.momentum > 0.9 + 1e-6 => Some(b.momentum),
            _ => None,
        })
        .collect();
    if slow.is_empty() {
        return None;
    }
    let slowest = slow.iter().copied().fold(0.0f32, f32::max);
    let window = 1.0 / (1.0 - f64::from(slowest)).max(1e-9);
    (window > steps as f64 / 4.0).then(|| {
        format!(
            "note: {} BatchNormalization nodes update their running statistics with momentum as \
             low as {:.3} (PyTorch's convention; the file says {slowest}), an average over about \
             {:.0} steps, and this run has {steps}: evaluation would normalise with statistics \
             that lag the weights. --bn-momentum 0.1 (PyTorch's default) makes them follow, and \
             --bn-recalibrate (on by default) recomputes them before each evaluation",
            slow.len(),
            1.0 - slowest,
            window.min(1e9),
        )
    })
}

/// A BN's inputs after X: elrt's name suffix, PyTorch's, and the fresh value (PyTorch's
/// defaults: scale 1, shift 0, statistics of a standard normal).
const BN_ROLES: [(&str, &str, f32); 4] = [
    ("scale", "weight", 1.0),
    ("bias", "bias", 0.0),
    ("mean", "running_mean", 0.0),
    ("var", "running_var", 1.0),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::ops::{AutoPad, Conv};
    use crate::ir::{Dim, ElemType, ModelMeta, ValueInfo};

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

    /// `--bn-momentum` sets every BN's ONNX momentum to one minus PyTorch's value; a slow BN
    /// (ONNX 0.99) in a short run gets a note that names the flag, elrt's own 0.9 none.
    #[test]
    fn bn_momentum_is_set_and_a_slow_one_noted() {
        let mut g = conv_graph();
        apply(&mut g, BnPolicy::Insert, |_| false).unwrap();
        assert_eq!(momentum_note(&g, 50), None, "elrt's own BNs");
        assert_eq!(set_momentum(&mut g, 0.01).unwrap(), 1);
        let Op::BatchNorm(b) = &g.nodes[1].op else {
            panic!("not a BN")
        };
        assert!((b.momentum - 0.99).abs() < 1e-6);
        let note = momentum_note(&g, 225).expect("100 steps of 225");
        assert!(
            note.contains("--bn-momentum 0.1") && note.contains("225"),
            "{note}"
        );
        assert_eq!(momentum_note(&g, 1000), None, "a long run catches up");
        set_momentum(&mut g, 0.1).unwrap();
        assert_eq!(momentum_note(&g, 225), None);
        assert!(set_momentum(&mut g, 0.0).is_err() && set_momentum(&mut g, 1.5).is_err());
    }

    #[test]
    fn inserts_after_conv_and_drops_bias() {
        let mut g = conv_graph();
        assert_eq!(apply(&mut g, BnPolicy::Keep, |_| false).unwrap().count, 0);
        assert_eq!(apply(&mut g, BnPolicy::Auto, |_| false).unwrap().count, 1);
        g.check().unwrap();
        assert!(!g.initializers.contains_key("b"), "bias should go");
        let ops: Vec<_> = g.nodes.iter().map(|n| n.op.onnx_type()).collect();
        assert_eq!(ops, ["Conv", "BatchNormalization", "Relu"]);
        // Already followed by BN: nothing more, whatever the policy.
        assert_eq!(apply(&mut g, BnPolicy::Insert, |_| false).unwrap().count, 0);
        assert_eq!(apply(&mut g, BnPolicy::Auto, |_| false).unwrap().count, 0);
    }

    /// The conv graph with a second conv `conv2` reading `c` (so the chain is conv -> conv2 ->
    /// relu), as a factorized layer's `u1` -> `u2` is.
    fn two_conv_graph(first: &str, second: &str) -> Graph {
        let mut g = conv_graph();
        g.nodes[0].name = first.into();
        g.initializers.insert(
            "w2".to_string(),
            Tensor::f32(&[4, 4, 1, 1], vec![0.1; 16]).unwrap(),
        );
        let mut conv2 = g.nodes[0].clone();
        conv2.name = second.into();
        conv2.inputs = vec!["c".into(), "w2".into()];
        conv2.outputs = vec!["c2".into()];
        g.nodes[1].inputs = vec!["c2".into()];
        g.nodes.insert(1, conv2);
        g
    }

    #[test]
    fn inserts_after_a_factor_chain_not_inside_it() {
        let mut g = two_conv_graph("l/tucker2/u1", "l/tucker2/u2");
        // What lowrank::naming::is_inner_factor says of these two (ir may not import it).
        let inner = |n: &str| n == "l/tucker2/u1";
        assert_eq!(apply(&mut g, BnPolicy::Auto, inner).unwrap().count, 1);
        let ops: Vec<_> = g
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.op.onnx_type()))
            .collect();
        assert_eq!(
            ops,
            [
                ("l/tucker2/u1", "Conv"),
                ("l/tucker2/u2", "Conv"),
                ("l/tucker2/u2/bn", "BatchNormalization"),
                ("relu", "Relu")
            ]
        );
    }

    #[test]
    fn a_folded_bn_record_places_and_names_each_bn_and_is_consumed() {
        let mut g = two_conv_graph("conv1", "conv2");
        g.meta.metadata_props.push((
            BN_FOLDED_KEY.to_string(),
            r#"{"c2": "block.bn"}"#.to_string(),
        ));
        assert_eq!(apply(&mut g, BnPolicy::Auto, |_| false).unwrap().count, 1);
        g.check().unwrap();
        let ops: Vec<_> = g
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.op.onnx_type()))
            .collect();
        assert_eq!(
            ops,
            [
                ("conv1", "Conv"),
                ("conv2", "Conv"),
                ("block.bn", "BatchNormalization"),
                ("relu", "Relu")
            ]
        );
        assert_eq!(
            g.nodes[2].inputs[1..],
            [
                "block.bn.weight",
                "block.bn.bias",
                "block.bn.running_mean",
                "block.bn.running_var"
            ]
        );
        assert!(g.meta.metadata_props.is_empty(), "the record is spent");
        // An empty record of a graph with no normalization (SqueezeNet): one after every conv.
        let mut g = two_conv_graph("conv1", "conv2");
        g.meta
            .metadata_props
            .push((BN_FOLDED_KEY.to_string(), "{}".to_string()));
        let done = apply(&mut g, BnPolicy::Auto, |_| false).unwrap();
        assert_eq!(done.count, 2);
        assert!(done.why.contains("no normalization"), "{}", done.why);
        // An empty record of a normalized graph (a training-mode export): nothing.
        let mut g = two_conv_graph("conv1", "conv2");
        apply(&mut g, BnPolicy::Insert, |n| n == "conv1").unwrap();
        g.meta
            .metadata_props
            .push((BN_FOLDED_KEY.to_string(), "{}".to_string()));
        assert_eq!(apply(&mut g, BnPolicy::Auto, |_| false).unwrap().count, 0);
        // --bn insert still puts one after every conv.
        let mut g = two_conv_graph("conv1", "conv2");
        g.meta
            .metadata_props
            .push((BN_FOLDED_KEY.to_string(), "{}".to_string()));
        assert_eq!(apply(&mut g, BnPolicy::Insert, |_| false).unwrap().count, 2);
    }

    #[test]
    fn a_record_naming_no_conv_output_is_an_error() {
        let mut g = conv_graph();
        g.meta
            .metadata_props
            .push((BN_FOLDED_KEY.to_string(), r#"{"r": "bn"}"#.to_string()));
        let e = apply(&mut g, BnPolicy::Auto, |_| false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'r'") && e.contains(BN_FOLDED_KEY), "{e}");
        let mut g = conv_graph();
        g.meta
            .metadata_props
            .push((BN_FOLDED_KEY.to_string(), "[1]".to_string()));
        assert!(apply(&mut g, BnPolicy::Auto, |_| false).is_err());
    }
}
