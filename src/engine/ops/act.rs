//! Elementwise activations on tensors of any rank.
//!
//! Derivatives at kinks follow PyTorch (the parity fixtures come from it): ReLU, LeakyReLU and
//! Clip pass the gradient only strictly inside their linear region, HardSigmoid likewise, and
//! HardSwish uses PyTorch's piecewise form, which is `2*alpha*x + beta` on the closed middle
//! interval.

use super::{contiguous, par_map, par_zip_map};
use crate::engine::{attr_err, shape_err, Result};
use ndarray::{ArrayD, ArrayViewD, NdFloat};

/// One elementwise activation with its attributes (ONNX names and defaults).
/// `max(0, v)` with NaN kept, as PyTorch's and ONNX's ReLU do: `f32::max` returns the 0 for
/// a NaN and would hide a diverging activation from the loss's finiteness check. Every ReLU of
/// the engine (the op and its fusions into BatchNorm and Add) calls this.
#[inline]
pub fn relu(v: f32) -> f32 {
    if v > 0.0 || v.is_nan() {
        v
    } else {
        0.0
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    /// `min(max(x, min), max)`; ReLU6 is `Clip { min: 0, max: 6 }`.
    Clip {
        min: f32,
        max: f32,
    },
    /// `x` for `x > 0`, else `alpha * x` (ONNX default alpha 0.01).
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    /// `max(0, min(1, alpha * x + beta))` (ONNX defaults 0.2, 0.5; PyTorch's is 1/6, 0.5).
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    /// `x * HardSigmoid(x)` with alpha 1/6 and beta 0.5.
    HardSwish,
    /// `x * HardSigmoid(x)` with the HardSigmoid's own alpha and beta: HardSwish as exporters
    /// that decompose it spell it (HardSigmoid then Mul, MobileNet-V3's every block), put back
    /// together by the program's gate fusion pass. Forward and backward are bitwise the pair's
    /// (the Mul's gradient plus the HardSigmoid's, as the executor sums them): one pass each way
    /// instead of two and three, and no gate tensor kept for backward.
    HardSigmoidMul {
        alpha: f32,
        beta: f32,
    },
    /// SiLU (swish), `x * sigmoid(x)`. No ONNX op: exports spell it Sigmoid then Mul, and the
    /// program's SiLU fusion pass puts the pair back together (EfficientNet's every block). One
    /// pass over the activation forward instead of two, and backward recomputes the sigmoid from
    /// `x` in one pass where the pair took three (the Mul's two gradients, the Sigmoid's, and the
    /// sum of the two paths into `x`), and no sigmoid tensor is kept alive for backward.
    Silu,
}

impl Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "Relu",
            Activation::Clip { .. } => "Clip",
            Activation::LeakyRelu { .. } => "LeakyRelu",
            Activation::Sigmoid => "Sigmoid",
            Activation::HardSigmoid { .. } => "HardSigmoid",
            Activation::HardSwish => "HardSwish",
            Activation::HardSigmoidMul { .. } => "HardSigmoid+Mul",
            Activation::Silu => "Silu",
        }
    }

    /// Rejects attributes that make the function meaningless (NaN bounds, `min > max`).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Activation::Clip { min, max } if min.is_nan() || max.is_nan() || min > max => Err(
                attr_err(self.name(), format!("min {min} must not exceed max {max}")),
            ),
            Activation::LeakyRelu { alpha } if !alpha.is_finite() => Err(attr_err(
                self.name(),
                format!("alpha {alpha} must be finite"),
            )),
            Activation::HardSigmoid { alpha, beta }
            | Activation::HardSigmoidMul { alpha, beta }
                if !alpha.is_finite() || !beta.is_finite() =>
            {
                Err(attr_err(
                    self.name(),
                    format!("alpha {alpha} and beta {beta} must be finite"),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Elementwise, so the output shape is the input's.
    pub fn output_shape(&self, x: &[usize]) -> Result<Vec<usize>> {
        self.validate()?;
        Ok(x.to_vec())
    }

    /// `y = f(x)`. Keeps nothing: backward recomputes what it needs from `x`.
    pub fn forward(&self, x: ArrayViewD<f32>) -> Result<ArrayD<f32>> {
        self.validate()?;
        let xs = contiguous(&x);
        let y = match *self {
            Activation::Relu => par_map(&xs, relu),
            // NaN stays NaN, as in [`relu`].
            Activation::Clip { min, max } => {
                par_map(
                    &xs,
                    move |v| {
                        if v.is_nan() {
                            v
                        } else {
                            v.max(min).min(max)
                        }
                    },
                )
            }
            Activation::LeakyRelu { alpha } => {
                par_map(&xs, move |v| if v > 0.0 { v } else { alpha * v })
            }
            Activation::Sigmoid => par_map(&xs, sigmoid),
            Activation::HardSigmoid { alpha, beta } => {
                par_map(&xs, move |v| (alpha * v + beta).clamp(0.0, 1.0))
            }
            Activation::HardSwish => par_map(&xs, |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0)),
            // Bitwise the pair's `Mul(x, HardSigmoid(x))` (either operand order).
            Activation::HardSigmoidMul { alpha, beta } => {
                par_map(&xs, move |v| v * (alpha * v + beta).clamp(0.0, 1.0))
            }
            // Bitwise the separate pair's `Mul(x, Sigmoid(x))` (either operand order).
            Activation::Silu => par_map(&xs, |v| v * sigmoid(v)),
        };
        Ok(ArrayD::from_shape_vec(x.raw_dim(), y)
            .expect("elementwise output has the input's length"))
    }

    /// `dx = dy * f'(x)`, with `x` the forward input.
    pub fn backward(&self, x: ArrayViewD<f32>, dy: ArrayViewD<f32>) -> Result<ArrayD<f32>> {
        self.validate()?;
        if x.shape() != dy.shape() {
            return Err(shape_err(
                self.name(),
                format!(
                    "output gradient shape {:?} differs from input shape {:?}",
                    dy.shape(),
                    x.shape()
                ),
            ));
        }
        let (xs, gs) = (contiguous(&x), contiguous(&dy));
        let dx = match *self {
            Activation::Relu => par_zip_map(&xs, &gs, |x, g| if x > 0.0 { g } else { 0.0 }),
            Activation::Clip { min, max } => {
                par_zip_map(
                    &xs,
                    &gs,
                    move |x, g| if x > min && x < max { g } else { 0.0 },
                )
            }
            Activation::LeakyRelu { alpha } => {
                par_zip_map(&xs, &gs, move |x, g| if x > 0.0 { g } else { alpha * g })
            }
            Activation::Sigmoid => par_zip_map(&xs, &gs, |x, g| {
                let s = sigmoid(x);
                g * s * (1.0 - s)
            }),
            Activation::HardSigmoid { alpha, beta } => par_zip_map(&xs, &gs, move |x, g| {
                let h = alpha * x + beta;
                if h > 0.0 && h < 1.0 {
                    alpha * g
                } else {
                    0.0
                }
            }),
            Activation::HardSwish => par_zip_map(&xs, &gs, |x, g| {
                if x < -3.0 {
                    0.0
                } else if x <= 3.0 {
                    g * (x / 3.0 + 0.5)
                } else {
                    g
                }
            }),
            // The Mul's gradient into `x` (`g h`) plus the HardSigmoid's (`alpha (g x)` strictly
            // inside its linear part, else 0), summed as the executor sums the two paths.
            Activation::HardSigmoidMul { alpha, beta } => par_zip_map(&xs, &gs, move |x, g| {
                let h = alpha * x + beta;
                let through_gate = if h > 0.0 && h < 1.0 {
                    alpha * (g * x)
                } else {
                    0.0
                };
                g * h.clamp(0.0, 1.0) + through_gate
            }),
            // d/dx x s(x) = s + x s (1 - s). The separate pair sums `g s` (the Mul's gradient)
            // and `g x s (1 - s)` (through the Sigmoid) in the executor; here it is one
            // expression, so results differ from the pair's by rounding only.
            Activation::Silu => par_zip_map(&xs, &gs, |x, g| {
                let s = sigmoid(x);
                g * (s + x * s * (1.0 - s))
            }),
        };
        Ok(ArrayD::from_shape_vec(x.raw_dim(), dx)
            .expect("elementwise gradient has the input's length"))
    }

    /// Textbook definitions, generic for f64 finite differences. Test oracle only.
    pub fn reference<T: NdFloat>(&self, x: ArrayViewD<T>) -> ArrayD<T> {
        let c = |v: f32| T::from(v).expect("f32 fits any float");
        let (zero, one) = (T::zero(), T::one());
        let clamp01 = move |v: T| v.max(zero).min(one);
        match *self {
            Activation::Relu => x.mapv(|v| if v.is_nan() { v } else { v.max(zero) }),
            Activation::Clip { min, max } => x.mapv(|v| {
                if v.is_nan() {
                    v
                } else {
                    v.max(c(min)).min(c(max))
                }
            }),
            Activation::LeakyRelu { alpha } => x.mapv(|v| if v > zero { v } else { c(alpha) * v }),
            Activation::Sigmoid => x.mapv(|v| one / (one + (-v).exp())),
            Activation::HardSigmoid { alpha, beta } => x.mapv(|v| clamp01(c(alpha) * v + c(beta))),
            Activation::HardSwish => x.mapv(|v| v * clamp01(v / c(6.0) + c(0.5))),
            Activation::HardSigmoidMul { alpha, beta } => {
                x.mapv(|v| v * clamp01(c(alpha) * v + c(beta)))
            }
            Activation::Silu => x.mapv(|v| v / (one + (-v).exp())),
        }
    }
}

/// Logistic function without overflow for large |x|: `1 / (1 + e)` for `x >= 0`, `e / (1 + e)`
/// below, with `e = exp(-|x|) <= 1`. Branch-free over [`exp_nonpositive`], so the loops over a
/// tensor vectorise: with libm's scalar `expf` and a branch, Sigmoid forward and backward took
/// a third of EfficientNet-B0's training step (SiLU is Sigmoid then Mul in its exports).
/// Within 2 ulp of the f64 logistic (`sigmoid_is_within_two_ulp_of_f64`); NaN stays NaN.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    let e = exp_nonpositive(-x.abs());
    let r = 1.0 / (1.0 + e);
    let s = if x >= 0.0 { r } else { e * r };
    if x.is_nan() {
        x
    } else {
        s
    }
}

/// `e^a` for `a <= 0` (NaN for NaN is the caller's business), flushed to 0 where the result
/// would be subnormal (`a < -87.34`). Cephes' `expf`: `a = n ln2 + r` with `|r| <= ln2 / 2`, a
/// degree-6 polynomial for `e^r`, and `2^n` put straight into the exponent bits. Rounding to
/// `n` adds and subtracts 1.5 * 2^23 (no `floor` call, which would keep the loop scalar on
/// x86-64's baseline SSE2), and `n` is read from the sum's mantissa bits.
#[inline(always)]
fn exp_nonpositive(a: f32) -> f32 {
    const LO: f32 = -87.336_55; // ln(2^-126)
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let ac = if a < LO { LO } else { a };
    let t = ac * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = ac - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let v = y * f32::from_bits(((ni + 127) as u32) << 23);
    if a < LO {
        0.0
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;
    use ndarray::{Array, IxDyn};

    /// Random input of the given rank with entries kept 0.05 away from the op's kinks.
    fn input(rng: &mut Rng, shape: &[usize], kinks: &[f32]) -> ArrayD<f32> {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| rng.away_from(-8.0, 8.0, kinks, 0.05))
            .collect();
        Array::from_shape_vec(IxDyn(shape), v).unwrap()
    }

    fn check(act: Activation, kinks: &[f32], seed: u64) {
        let mut rng = Rng::new(seed);
        for shape in [&[3, 4, 5, 7][..], &[13][..], &[2, 9, 3][..], &[100_003][..]] {
            let x = input(&mut rng, shape, kinks);
            let y = act.forward(x.view()).unwrap();
            assert_close("forward", &y.view(), &act.reference(x.view()).view(), 1e-6);
            assert_eq!(act.output_shape(shape).unwrap(), shape);
            if x.len() > 1000 {
                continue;
            }
            let r = rand_array(&mut rng, IxDyn(shape), -1.0, 1.0);
            let dx = act.backward(x.view(), r.view()).unwrap();
            let r64 = to_f64(&r.view());
            let fd = fd_grad(&to_f64(&x.view()), |x| {
                dot_loss(&act.reference(x.view()), &r64)
            });
            assert_grad("dx", &dx.view(), &fd.view());
        }
    }

    #[test]
    fn relu() {
        check(Activation::Relu, &[0.0], 1);
    }

    /// PyTorch: relu(nan) = nan, clamp(nan) = nan; -1 and 7 map to the bounds.
    #[test]
    fn relu_and_clip_keep_nan() {
        let x = ndarray::arr1(&[f32::NAN, -1.0, 7.0]).into_dyn();
        for act in [Activation::Relu, Activation::Clip { min: 0.0, max: 6.0 }] {
            let y = act.forward(x.view()).unwrap();
            assert!(y[0].is_nan(), "{act:?}: {y}");
            assert_eq!(y[1], 0.0, "{act:?}");
            assert!(y[2] == 7.0 || y[2] == 6.0, "{act:?}");
            assert!(act.reference(x.view())[0].is_nan(), "{act:?} reference");
        }
    }

    #[test]
    fn relu6_clip() {
        check(Activation::Clip { min: 0.0, max: 6.0 }, &[0.0, 6.0], 2);
    }

    #[test]
    fn clip_negative_range() {
        check(
            Activation::Clip {
                min: -2.5,
                max: 1.5,
            },
            &[-2.5, 1.5],
            3,
        );
    }

    #[test]
    fn leaky_relu() {
        check(Activation::LeakyRelu { alpha: 0.1 }, &[0.0], 4);
    }

    #[test]
    fn sigmoid() {
        check(Activation::Sigmoid, &[], 5);
    }

    #[test]
    fn silu() {
        check(Activation::Silu, &[], 10);
    }

    /// The fused SiLU against the two ops it replaces, `Mul(x, Sigmoid(x))`, run through their
    /// own kernels: forward bitwise, backward (the Mul's gradient plus the Sigmoid's, as the
    /// executor sums them) within a few ulp, including saturated and NaN inputs.
    #[test]
    fn silu_matches_sigmoid_then_mul() {
        use crate::engine::tensor_ops::{binary_backward, binary_forward, BinOp};
        let mut rng = Rng::new(11);
        let mut x = input(&mut rng, &[4, 6, 9, 9], &[]);
        x.as_slice_mut().unwrap()[..6].copy_from_slice(&[-100.0, 100.0, -0.0, 0.0, 1e-3, -20.0]);
        let g = rand_array(&mut rng, IxDyn(x.shape()), -1.0, 1.0);
        let s = Activation::Sigmoid.forward(x.view()).unwrap();
        let pair = binary_forward(BinOp::Mul, x.view(), s.view()).unwrap();
        let fused = Activation::Silu.forward(x.view()).unwrap();
        assert_eq!(fused, pair);
        let (gx, gs) = binary_backward(BinOp::Mul, x.view(), s.view(), g.clone());
        let pair_dx = gx + Activation::Sigmoid.backward(x.view(), gs.view()).unwrap();
        let dx = Activation::Silu.backward(x.view(), g.view()).unwrap();
        assert_close("dx", &dx.view(), &pair_dx.view(), 1e-6);
        let nan = ndarray::arr1(&[f32::NAN]).into_dyn();
        assert!(Activation::Silu.forward(nan.view()).unwrap()[0].is_nan());
        assert!(Activation::Silu.backward(nan.view(), nan.view()).unwrap()[0].is_nan());
    }

    #[test]
    fn hard_sigmoid_mul() {
        let pytorch = Activation::HardSigmoidMul {
            alpha: 1.0 / 6.0,
            beta: 0.5,
        };
        check(pytorch, &[-3.0, 3.0], 12);
        check(
            Activation::HardSigmoidMul {
                alpha: 0.2,
                beta: 0.5,
            },
            &[-2.5, 2.5],
            13,
        );
    }

    /// The fused HardSwish against the two ops it replaces, `Mul(x, HardSigmoid(x))`, run
    /// through their own kernels: forward and backward (the Mul's gradient plus the
    /// HardSigmoid's, as the executor sums them) bitwise, at and around the kinks, with NaN.
    #[test]
    fn hard_sigmoid_mul_equals_hard_sigmoid_then_mul_bitwise() {
        use crate::engine::tensor_ops::{binary_backward, binary_forward, BinOp};
        let mut rng = Rng::new(14);
        for (alpha, beta) in [(1.0f32 / 6.0, 0.5f32), (0.2, 0.5), (0.3, -0.1)] {
            let mut x = input(&mut rng, &[4, 6, 9, 9], &[]);
            let kinks = [
                -3.0,
                3.0,
                -2.5,
                2.5,
                -3.0000002,
                2.9999998,
                0.0,
                -0.0,
                f32::NAN,
            ];
            x.as_slice_mut().unwrap()[..kinks.len()].copy_from_slice(&kinks);
            let g = rand_array(&mut rng, IxDyn(x.shape()), -1.0, 1.0);
            let gate = Activation::HardSigmoid { alpha, beta };
            let fused = Activation::HardSigmoidMul { alpha, beta };
            let h = gate.forward(x.view()).unwrap();
            for (a, b) in [(&x, &h), (&h, &x)] {
                let pair = binary_forward(BinOp::Mul, a.view(), b.view()).unwrap();
                let y = fused.forward(x.view()).unwrap();
                let bits = |t: &ArrayD<f32>| t.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&pair), "forward, alpha {alpha}");
                let (ga, gb) = binary_backward(BinOp::Mul, a.view(), b.view(), g.clone());
                let (gx, gh) = if std::ptr::eq(a, &x) {
                    (ga, gb)
                } else {
                    (gb, ga)
                };
                let pair_dx = gx + gate.backward(x.view(), gh.view()).unwrap();
                let dx = fused.backward(x.view(), g.view()).unwrap();
                assert_eq!(bits(&dx), bits(&pair_dx), "backward, alpha {alpha}");
            }
        }
    }

    #[test]
    fn hard_sigmoid_onnx_defaults() {
        check(
            Activation::HardSigmoid {
                alpha: 0.2,
                beta: 0.5,
            },
            &[-2.5, 2.5],
            6,
        );
    }

    #[test]
    fn hard_sigmoid_pytorch_constants() {
        check(
            Activation::HardSigmoid {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            },
            &[-3.0, 3.0],
            7,
        );
    }

    #[test]
    fn hard_swish() {
        check(Activation::HardSwish, &[-3.0, 3.0], 8);
    }

    /// The vectorisable logistic against f64 over a dense sweep of [-100, 100], the
    /// flush-to-zero edge and both infinities: within 2 ulp (or both below f32's normal range).
    #[test]
    fn sigmoid_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        let sweep = (0..=2_000_000).map(|i| -100.0 + i as f32 * 1e-4);
        let edges = [-87.34f32, -87.33, -88.0, -103.0, -0.0, 0.0, 1e-30, -1e-30];
        for x in sweep.chain(edges) {
            let want = 1.0 / (1.0 + (-(x as f64)).exp());
            let got = super::sigmoid(x) as f64;
            if want < f32::MIN_POSITIVE as f64 {
                assert!(got < 2.0 * f32::MIN_POSITIVE as f64, "{x}: {got} vs {want}");
                continue;
            }
            let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
            let e = (got - want).abs() / ulp.max(f32::MIN_POSITIVE as f64);
            worst = worst.max(e);
            assert!(
                e <= 2.0,
                "sigmoid({x}) = {got}, f64 says {want} ({e:.2} ulp)"
            );
        }
        assert!(worst > 0.0);
        assert_eq!(super::sigmoid(f32::INFINITY), 1.0);
        assert_eq!(super::sigmoid(f32::NEG_INFINITY), 0.0);
        assert!(super::sigmoid(f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_saturates_without_nan() {
        let x = Array::from_shape_vec(IxDyn(&[4]), vec![-1e4f32, -100.0, 100.0, 1e4]).unwrap();
        let y = Activation::Sigmoid.forward(x.view()).unwrap();
        let y = y.as_slice().unwrap();
        assert!(
            y[0] == 0.0 && y[1] < 1e-40 && y[2] == 1.0 && y[3] == 1.0,
            "{y:?}"
        );
        let dx = Activation::Sigmoid.backward(x.view(), x.view()).unwrap();
        assert!(dx.iter().all(|v| v.is_finite()));
    }

    /// Kinks: the subgradient picked must be PyTorch's.
    #[test]
    fn gradients_at_kinks_follow_pytorch() {
        let x = Array::from_shape_vec(IxDyn(&[3]), vec![-3.0f32, 0.0, 3.0]).unwrap();
        let ones = ArrayD::from_elem(IxDyn(&[3]), 1.0f32);
        let g = |a: Activation| {
            a.backward(x.view(), ones.view())
                .unwrap()
                .into_raw_vec_and_offset()
                .0
        };
        assert_eq!(g(Activation::Relu), [0.0, 0.0, 1.0]);
        assert_eq!(g(Activation::Clip { min: 0.0, max: 3.0 }), [0.0, 0.0, 0.0]);
        assert_eq!(g(Activation::HardSwish), [-0.5, 0.5, 1.5]);
    }

    #[test]
    fn shape_mismatch_and_bad_attributes_are_errors() {
        let x = ArrayD::<f32>::zeros(IxDyn(&[2, 3]));
        let dy = ArrayD::<f32>::zeros(IxDyn(&[3, 2]));
        assert!(Activation::Relu.backward(x.view(), dy.view()).is_err());
        assert!(Activation::Clip { min: 1.0, max: 0.0 }
            .forward(x.view())
            .is_err());
        assert!(Activation::LeakyRelu { alpha: f32::NAN }
            .forward(x.view())
            .is_err());
    }

    #[test]
    fn transposed_views_keep_logical_order() {
        let mut rng = Rng::new(9);
        let x = rand_array(&mut rng, IxDyn(&[3, 5]), -2.0, 2.0);
        let xt = x.t();
        let y = Activation::Relu.forward(xt.view()).unwrap();
        assert_eq!(y, xt.mapv(|v| v.max(0.0)));
    }
}
