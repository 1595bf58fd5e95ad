//! Initialisation from scratch, as the ResNet recipes and PyTorch do it: Kaiming-normal
//! (fan_out, ReLU gain) for conv weights, zero conv biases, PyTorch's Linear default for
//! Gemm/MatMul weights and biases (uniform in ±1/sqrt(fan_in)), BN scale 1 and shift 0 with
//! fresh running statistics (mean 0, variance 1).

use anyhow::Result;
use ndarray::ArrayD;

use crate::ir::{Graph, Op, Tensor};
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
    let mut plan: Vec<(String, Init)> = Vec::new();
    for n in &graph.nodes {
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
                    let fan_out = s[0] * s[2..].iter().product::<usize>();
                    plan.push((
                        n.inputs[1].clone(),
                        Init::Normal((2.0 / fan_out as f32).sqrt()),
                    ));
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
}
