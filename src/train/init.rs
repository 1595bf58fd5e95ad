//! Initialisation from scratch, as the ResNet recipes and PyTorch do it: Kaiming-normal
//! (fan_out, ReLU gain) for the weights of convs that a normalization follows, zero conv
//! biases, PyTorch's Linear default for Gemm/MatMul weights and biases (uniform in
//! ±1/sqrt(fan_in)), BN scale 1 and shift 0 with fresh running statistics (mean 0, variance 1).
//!
//! A conv that no BatchNorm or LayerNorm follows (SqueezeNet's, which has none; squeeze-
//! excitation convs) gets Kaiming fan_in instead, as torchvision initialises SqueezeNet: there
//! nothing rescales the activations, and fan_out would multiply their variance by
//! fan_in/fan_out at every layer (16x at SqueezeNet's 512 -> 32 squeeze convs, so the logits
//! overflowed before the first step). Of such a layer's low-rank factors only the last carries
//! the ReLU gain, so the chain keeps its input's variance as one conv would.

use anyhow::Result;
use ndarray::ArrayD;

use crate::ir::uses::UseWalk;
use crate::ir::{Graph, Node, Op, Tensor};
use crate::lowrank::naming::is_inner_factor;
use crate::rng::Rng;

/// Re-initialises every trainable tensor and BN statistic of the graph, deterministically from
/// `seed` (each tensor draws from its own stream keyed by its name). The factors of low-rank
/// layers are treated as the plain convs they are (Kaiming fan-out each).
pub fn init_from_scratch(graph: &mut Graph, seed: u64) -> Result<()> {
    init_except(graph, seed, |_| false)
}

/// As [`init_from_scratch`], but the low-rank factor weights (`<layer>/tucker2/*.weight`,
/// `/cp/*`, `/svd/*`) keep the values in the file: the converter's from-scratch init, which gives
/// the composed kernel Kaiming's variance with U1 and U2 near DSO's orthogonal target, or its
/// orthogonal init. Per-conv Kaiming on each factor instead makes the composed variance 4x
/// Kaiming's (each factor gets the ReLU gain 2) and U1's singular values about sqrt(2 C_in / r).
pub fn init_except_factors(graph: &mut Graph, seed: u64) -> Result<()> {
    init_except(graph, seed, crate::lowrank::naming::is_factor_weight)
}

fn init_except(graph: &mut Graph, seed: u64, keep: impl Fn(&str) -> bool) -> Result<()> {
    let normalized = normalized_convs(graph);
    let mut plan: Vec<(String, Init)> = Vec::new();
    for (ni, n) in graph.nodes.iter().enumerate() {
        let shape_of = |i: usize| {
            n.input(i)
                .and_then(|name| graph.initializers.get(name))
                .map(|t| t.shape().to_vec())
        };
        // A weight of the wrong rank is refused here as every other stage refuses it, rather
        // than indexed past its end.
        let rank_at_least = |s: &[usize], r: usize| -> Result<()> {
            if s.len() < r || s.contains(&0) {
                anyhow::bail!(
                    "node '{}' ({}): weight '{}' has shape {s:?}, which this op cannot use",
                    n.name,
                    n.op.onnx_type(),
                    n.inputs[1]
                );
            }
            Ok(())
        };
        match &n.op {
            Op::Conv(_) => {
                if let Some(s) = shape_of(1) {
                    rank_at_least(&s, 3)?;
                    let area = s[2..].iter().product::<usize>();
                    let var = if normalized[ni] {
                        2.0 / (s[0] * area) as f32
                    } else if is_inner_factor(&n.name) {
                        1.0 / (s[1] * area) as f32
                    } else {
                        2.0 / (s[1] * area) as f32
                    };
                    plan.push((n.inputs[1].clone(), Init::Normal(var.sqrt())));
                }
                if shape_of(2).is_some() {
                    plan.push((n.inputs[2].clone(), Init::Const(0.0)));
                }
            }
            Op::BatchNorm(_) => {
                for (i, v) in [(1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0)] {
                    if shape_of(i).is_some() {
                        plan.push((n.inputs[i].clone(), Init::Const(v)));
                    }
                }
            }
            Op::Gemm(g) => {
                if let Some(s) = shape_of(1) {
                    rank_at_least(&s, 2)?;
                    let fan_in = if g.trans_b { s[1] } else { s[0] };
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    plan.push((n.inputs[1].clone(), Init::Uniform(bound)));
                    if shape_of(2).is_some() {
                        plan.push((n.inputs[2].clone(), Init::Uniform(bound)));
                    }
                }
            }
            Op::MatMul => {
                if let Some(s) = shape_of(1) {
                    rank_at_least(&s, 1)?;
                    let bound = 1.0 / (s[0] as f32).sqrt();
                    plan.push((n.inputs[1].clone(), Init::Uniform(bound)));
                }
            }
            _ => {}
        }
    }
    for (name, how) in plan {
        if keep(&name) {
            continue;
        }
        let Some(Tensor::F32(a)) = graph.initializers.get(&name) else {
            continue;
        };
        let key = name.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
        let mut rng = Rng::derive(seed, &[key]);
        let fresh: ArrayD<f32> = ArrayD::from_shape_fn(a.raw_dim(), |_| match how {
            Init::Normal(std) => std * rng.normal(),
            Init::Uniform(b) => rng.range(-b, b),
            Init::Const(v) => v,
        });
        graph.initializers.insert(name, Tensor::F32(fresh));
    }
    Ok(())
}

/// For each node, whether it is a conv whose layer's output only normalizations (BatchNorm,
/// LayerNorm, InstanceNorm, GroupNorm) read, directly or through layout ops, Concat and pooling
/// (ConvNeXt's Transpose before its LayerNorm, GroupNorm's Reshape before its InstanceNorm,
/// DenseNet's concatenations before each BN); a low-rank factor's layer output is its chain's
/// last factor's.
fn normalized_convs(graph: &Graph) -> Vec<bool> {
    let mut walk = UseWalk::new(
        &graph.nodes,
        graph.outputs.iter().map(|o| o.name.as_str()),
        |next: &Node, v: &str| {
            matches!(
                next.op,
                Op::BatchNorm(_)
                    | Op::LayerNorm(_)
                    | Op::InstanceNorm { .. }
                    | Op::GroupNorm { .. }
            ) && next.inputs[0] == v
        },
        |from: &Node, next: &Node| match next.op {
            Op::Conv(_) => is_inner_factor(&from.name),
            Op::Transpose { .. }
            | Op::Reshape { .. }
            | Op::Identity
            | Op::Concat { .. }
            | Op::Pool(_) => true,
            _ => false,
        },
    );
    (0..graph.nodes.len())
        .map(|i| matches!(graph.nodes[i].op, Op::Conv(_)) && walk.all_reach(i))
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Init {
    Normal(f32),
    Uniform(f32),
    Const(f32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kaiming_fan_out_statistics_on_resnet20() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/resnet20.onnx");
        let mut g = crate::onnx::read_file(&path).unwrap();
        init_from_scratch(&mut g, 3).unwrap();
        // layer3 convs: 64 out channels, 3x3 -> std sqrt(2/576).
        let w = g.initializers["layer3.1.conv1.weight"].as_f32().unwrap();
        let n = w.len() as f32;
        let mean = w.sum() / n;
        let std = (w.mapv(|v| (v - mean) * (v - mean)).sum() / n).sqrt();
        assert!((std - (2.0f32 / 576.0).sqrt()).abs() < 0.003, "{std}");
        assert!(g.initializers["bn1.weight"]
            .as_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 1.0));
        assert!(g.initializers["bn1.running_var"]
            .as_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 1.0));
        let fc = g.initializers["fc.weight"].as_f32().unwrap();
        assert!(fc.iter().all(|v| v.abs() <= 0.125) && fc.iter().any(|v| v.abs() > 0.1));
        let mut g2 = crate::onnx::read_file(&path).unwrap();
        init_from_scratch(&mut g2, 3).unwrap();
        assert_eq!(
            g.initializers, g2.initializers,
            "deterministic from the seed"
        );
    }

    fn std_of(g: &Graph, name: &str) -> f32 {
        let w = g.initializers[name].as_f32().unwrap();
        let n = w.len() as f32;
        let mean = w.sum() / n;
        (w.mapv(|v| (v - mean) * (v - mean)).sum() / n).sqrt()
    }

    /// x -> conv `a` (256 -> 16, 1x1) -> `next` -> ..., where `next` is a BatchNormalization or a
    /// Relu; plus a factor chain `l/tucker2/u1` (16 -> 64) -> `l/tucker2/u2` (64 -> 64) -> Relu.
    fn graph(next: Op) -> Graph {
        use crate::ir::ops::{AutoPad, Conv};
        use crate::ir::{Dim, ElemType, ModelMeta, Node, ValueInfo};
        let conv = || {
            Op::Conv(Conv {
                kernel_shape: None,
                strides: vec![],
                pads: vec![],
                dilations: vec![],
                group: 1,
                auto_pad: AutoPad::NotSet,
            })
        };
        let node = |name: &str, op: Op, i: &[&str], o: &str| Node {
            name: name.into(),
            op,
            inputs: i.iter().map(|s| s.to_string()).collect(),
            outputs: vec![o.into()],
        };
        let t = |shape: &[usize]| Tensor::f32(shape, vec![0.0; shape.iter().product()]).unwrap();
        let mut initializers: std::collections::BTreeMap<String, Tensor> = [
            ("a.weight", t(&[16, 256, 1, 1])),
            ("u1.weight", t(&[64, 16, 1, 1])),
            ("u2.weight", t(&[64, 64, 1, 1])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut next_inputs = vec!["y"];
        if matches!(next, Op::BatchNorm(_)) {
            for k in ["s", "b", "m", "v"] {
                initializers.insert(k.to_string(), t(&[16]));
            }
            next_inputs.extend(["s", "b", "m", "v"]);
        }
        let vi = |n: &str| ValueInfo {
            name: n.into(),
            elem: ElemType::F32,
            shape: Some(vec![
                Dim::Fixed(1),
                Dim::Fixed(256),
                Dim::Fixed(4),
                Dim::Fixed(4),
            ]),
        };
        Graph {
            name: "g".into(),
            opset: 13,
            inputs: vec![vi("x")],
            outputs: vec![vi("r")],
            nodes: vec![
                node("a", conv(), &["x", "a.weight"], "y"),
                node("next", next, &next_inputs, "z"),
                node("l/tucker2/u1", conv(), &["z", "u1.weight"], "f1"),
                node("l/tucker2/u2", conv(), &["f1", "u2.weight"], "f2"),
                node("relu", Op::Relu, &["f2"], "r"),
            ],
            initializers,
            meta: ModelMeta::default(),
        }
    }

    #[test]
    fn kaiming_fan_in_where_no_normalization_follows_with_the_gain_on_a_chains_last_factor() {
        use crate::ir::ops::BatchNorm;
        let close = |got: f32, want: f32| (got / want - 1.0).abs() < 0.06;
        let mut g = graph(Op::BatchNorm(BatchNorm {
            epsilon: 1e-5,
            momentum: 0.9,
            training_mode: false,
        }));
        init_from_scratch(&mut g, 1).unwrap();
        // A BN follows: fan_out (16 outputs).
        let s = std_of(&g, "a.weight");
        assert!(close(s, (2.0f32 / 16.0).sqrt()), "{s}");
        let mut g = graph(Op::Relu);
        init_from_scratch(&mut g, 1).unwrap();
        // Nothing follows but a Relu: fan_in (256 inputs).
        let s = std_of(&g, "a.weight");
        assert!(close(s, (2.0f32 / 256.0).sqrt()), "{s}");
        // The chain: u1 without the ReLU gain, u2 with it, each on its fan_in.
        let s = std_of(&g, "u1.weight");
        assert!(close(s, (1.0f32 / 16.0).sqrt()), "{s}");
        let s = std_of(&g, "u2.weight");
        assert!(close(s, (2.0f32 / 64.0).sqrt()), "{s}");
    }
}
