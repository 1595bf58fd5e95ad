//! Elementwise activations on tensors of any rank.
//!
//! Derivatives at kinks follow PyTorch (the parity fixtures come from it): ReLU, LeakyReLU and
//! Clip pass the gradient only strictly inside their linear region, HardSigmoid likewise, and
//! HardSwish uses PyTorch's piecewise form, which is `2*alpha*x + beta` on the closed middle
//! interval.

use super::simd::simd_dispatch;
use super::{contiguous, par_map, par_zip_chunks, par_zip_map};
use crate::engine::{attr_err, shape_err, Result};
use ndarray::{ArrayD, ArrayViewD, NdFloat};
use std::mem::MaybeUninit;

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

/// The smooth gates' values and gradients, one value at a time: every caller (the ops here
/// and their fusions into BatchNorm) calls these, so that fused and separate ops compute the
/// same f32 operations, bit for bit.
pub(crate) mod gate {
    use super::sigmoid;

    /// SiLU, `x * sigmoid(x)`: the separate pair's `Mul(x, Sigmoid(x))`, bitwise.
    #[inline(always)]
    pub(crate) fn silu(v: f32) -> f32 {
        v * sigmoid(v)
    }

    /// `dy * d/dx (x s(x)) = dy * (s + x s (1 - s))`. The separate pair sums `g s` (the Mul's
    /// gradient) and `g x s (1 - s)` (through the Sigmoid) in the executor; here it is one
    /// expression, so results differ from the pair's by rounding only.
    #[inline(always)]
    pub(crate) fn silu_grad(x: f32, g: f32) -> f32 {
        let s = sigmoid(x);
        g * (s + x * s * (1.0 - s))
    }

    /// `x * HardSigmoid(x)`: the pair's `Mul(x, HardSigmoid(x))` (either operand order).
    #[inline(always)]
    pub(crate) fn hard_sigmoid_mul(v: f32, alpha: f32, beta: f32) -> f32 {
        v * (alpha * v + beta).clamp(0.0, 1.0)
    }

    /// The Mul's gradient into `x` (`g h`) plus the HardSigmoid's (`alpha (g x)` strictly
    /// inside its linear part, else 0), summed as the executor sums the two paths.
    #[inline(always)]
    pub(crate) fn hard_sigmoid_mul_grad(x: f32, g: f32, alpha: f32, beta: f32) -> f32 {
        let h = alpha * x + beta;
        let through_gate = if h > 0.0 && h < 1.0 {
            alpha * (g * x)
        } else {
            0.0
        };
        g * h.clamp(0.0, 1.0) + through_gate
    }

    /// ONNX HardSwish, `x * max(0, min(1, x / 6 + 1/2))`.
    #[inline(always)]
    pub(crate) fn hard_swish(v: f32) -> f32 {
        v * (v / 6.0 + 0.5).clamp(0.0, 1.0)
    }

    /// PyTorch's piecewise HardSwish gradient.
    #[inline(always)]
    pub(crate) fn hard_swish_grad(x: f32, g: f32) -> f32 {
        if x < -3.0 {
            0.0
        } else if x <= 3.0 {
            g * (x / 3.0 + 0.5)
        } else {
            g
        }
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
    /// `x` for `x > 0`, else `alpha * (exp(x) - 1)` (ONNX `Elu`, default alpha 1); derivative
    /// `alpha * exp(x)` below 0, as PyTorch's `EluBackward` (an `exp_m1`, so small negative
    /// inputs keep their digits: [`elu`]).
    Elu {
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
    /// GELU (ONNX `Gelu`, opset 20). `tanh: false` (`approximate = "none"`) is the exact
    /// `0.5 x (1 + erf(x / sqrt 2))`; `tanh: true` (`approximate = "tanh"`) is
    /// `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`. Derivatives as PyTorch's
    /// `GeluBackward`: `Phi(x) + x phi(x)`, and the tanh form's derivative term for term. Over
    /// a branch-free erf and exp of this file, which vectorise: with libm's scalar `erff` and
    /// `expf`, forward and backward took about 60 ns a value on one thread, these about 7
    /// (exact) and 4 (tanh) (`benches/layernorm.rs`); ConvNeXt-T runs about 275M values
    /// through GELU per batch of 32 at 224x224.
    Gelu {
        tanh: bool,
    },
    /// The error function (ONNX `Erf`): what a GELU becomes when an exporter spells it out
    /// (`Div`, `Erf`, `Add`, `Mul`, `Mul`). Derivative `2 / sqrt(pi) exp(-x^2)`.
    Erf,
    /// `x ^ exponent` (ONNX `Pow` with a constant scalar exponent). Derivative
    /// `exponent x^(exponent - 1)`; squaring (LayerNormalization's variance as exporters below
    /// opset 17 spell it) multiplies, as PyTorch's `pow(x, 2)` does.
    Pow {
        exponent: f32,
    },
    /// Square root (ONNX `Sqrt`); derivative `0.5 / sqrt(x)`.
    Sqrt,
    /// `e^x` (ONNX `Exp`); derivative `e^x`. libm's `expf` per value: it appears in the graph
    /// only where a file spells an activation out (an exported ELU reads back fused).
    Exp,
}

impl Activation {
    fn name(&self) -> &'static str {
        match self {
            Activation::Relu => "Relu",
            Activation::Clip { .. } => "Clip",
            Activation::LeakyRelu { .. } => "LeakyRelu",
            Activation::Elu { .. } => "Elu",
            Activation::Sigmoid => "Sigmoid",
            Activation::HardSigmoid { .. } => "HardSigmoid",
            Activation::HardSwish => "HardSwish",
            Activation::HardSigmoidMul { .. } => "HardSigmoid+Mul",
            Activation::Silu => "Silu",
            Activation::Gelu { .. } => "Gelu",
            Activation::Erf => "Erf",
            Activation::Pow { .. } => "Pow",
            Activation::Sqrt => "Sqrt",
            Activation::Exp => "Exp",
        }
    }

    /// Rejects attributes that make the function meaningless (NaN bounds, `min > max`).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Activation::Clip { min, max } if min.is_nan() || max.is_nan() || min > max => Err(
                attr_err(self.name(), format!("min {min} must not exceed max {max}")),
            ),
            Activation::LeakyRelu { alpha } | Activation::Elu { alpha } if !alpha.is_finite() => {
                Err(attr_err(
                    self.name(),
                    format!("alpha {alpha} must be finite"),
                ))
            }
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
            Activation::Elu { alpha } => par_map(&xs, move |v| elu(v, alpha)),
            Activation::Sigmoid => par_map(&xs, sigmoid),
            Activation::HardSigmoid { alpha, beta } => {
                par_map(&xs, move |v| (alpha * v + beta).clamp(0.0, 1.0))
            }
            Activation::HardSwish => par_map(&xs, gate::hard_swish),
            Activation::HardSigmoidMul { alpha, beta } => {
                par_map(&xs, move |v| gate::hard_sigmoid_mul(v, alpha, beta))
            }
            Activation::Silu => par_map(&xs, gate::silu),
            Activation::Gelu { tanh: false } => par_erf_map(&xs, &xs, ErfMap::Gelu),
            Activation::Gelu { tanh: true } => par_erf_map(&xs, &xs, ErfMap::GeluTanh),
            Activation::Erf => par_erf_map(&xs, &xs, ErfMap::Erf),
            Activation::Pow { exponent: 2.0 } => par_map(&xs, |v| v * v),
            Activation::Pow { exponent } => par_map(&xs, move |v| v.powf(exponent)),
            Activation::Sqrt => par_map(&xs, f32::sqrt),
            Activation::Exp => par_map(&xs, f32::exp),
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
            Activation::Elu { alpha } => {
                par_zip_map(&xs, &gs, move |x, g| {
                    if x > 0.0 {
                        g
                    } else {
                        // NaN for NaN; above 0 the value is computed and not used.
                        g * (alpha * exp_nonpositive(x))
                    }
                })
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
            Activation::HardSwish => par_zip_map(&xs, &gs, gate::hard_swish_grad),
            Activation::HardSigmoidMul { alpha, beta } => par_zip_map(&xs, &gs, move |x, g| {
                gate::hard_sigmoid_mul_grad(x, g, alpha, beta)
            }),
            Activation::Silu => par_zip_map(&xs, &gs, gate::silu_grad),
            Activation::Gelu { tanh: false } => par_erf_map(&xs, &gs, ErfMap::GeluGrad),
            Activation::Gelu { tanh: true } => par_erf_map(&xs, &gs, ErfMap::GeluTanhGrad),
            Activation::Erf => par_erf_map(&xs, &gs, ErfMap::ErfGrad),
            Activation::Pow { exponent: 2.0 } => par_zip_map(&xs, &gs, |x, g| g * (2.0 * x)),
            Activation::Pow { exponent } => par_zip_map(&xs, &gs, move |x, g| {
                g * (exponent * x.powf(exponent - 1.0))
            }),
            Activation::Sqrt => par_zip_map(&xs, &gs, |x, g| g * (0.5 / x.sqrt())),
            Activation::Exp => par_zip_map(&xs, &gs, |x, g| g * x.exp()),
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
            Activation::Elu { alpha } => x.mapv(|v| {
                if v > zero {
                    v
                } else {
                    c(alpha) * (v.exp() - one)
                }
            }),
            Activation::Sigmoid => x.mapv(|v| one / (one + (-v).exp())),
            Activation::HardSigmoid { alpha, beta } => x.mapv(|v| clamp01(c(alpha) * v + c(beta))),
            Activation::HardSwish => x.mapv(|v| v * clamp01(v / c(6.0) + c(0.5))),
            Activation::HardSigmoidMul { alpha, beta } => {
                x.mapv(|v| v * clamp01(c(alpha) * v + c(beta)))
            }
            Activation::Silu => x.mapv(|v| v / (one + (-v).exp())),
            // libm's f64 `erf` (NdFloat has none); exact for f64, rounded once for f32.
            Activation::Gelu { tanh: false } => {
                let half = c(0.5);
                let sqrt2 = T::from(std::f64::consts::SQRT_2).expect("fits");
                x.mapv(|v| half * v * (one + erf_t(v / sqrt2)))
            }
            Activation::Gelu { tanh: true } => {
                let half = c(0.5);
                let k = T::from((2.0 / std::f64::consts::PI).sqrt()).expect("fits");
                let kappa = T::from(0.044715f64).expect("fits");
                x.mapv(|v| half * v * (one + (k * (v + kappa * v * v * v)).tanh()))
            }
            Activation::Erf => x.mapv(erf_t),
            Activation::Pow { exponent } => x.mapv(|v| v.powf(c(exponent))),
            Activation::Sqrt => x.mapv(|v| v.sqrt()),
            Activation::Exp => x.mapv(|v| v.exp()),
        }
    }
}

/// libm's f64 `erf` for any float type (the reference's oracle).
fn erf_t<T: NdFloat>(v: T) -> T {
    T::from(libm::erf(v.to_f64().expect("a float converts to f64"))).expect("f64 fits any float")
}

/// The maps of GELU and Erf, forward and backward, which [`erf_map`] runs.
#[derive(Clone, Copy, Debug)]
enum ErfMap {
    /// `erf(a)`.
    Erf,
    /// `b erf'(a)`.
    ErfGrad,
    /// `gelu(a)`.
    Gelu,
    /// `b gelu'(a)`.
    GeluGrad,
    /// `gelu_tanh(a)`.
    GeluTanh,
    /// `b gelu_tanh'(a)`.
    GeluTanhGrad,
}

/// `map` over `a` (and `b`, the upstream gradient, for the gradients; ignored otherwise), in
/// parallel chunks.
fn par_erf_map(a: &[f32], b: &[f32], map: ErfMap) -> Vec<f32> {
    // SAFETY: erf_map writes every entry of its output chunk.
    unsafe { par_zip_chunks(a, b, |o, a, b| erf_map(o, a, b, map)) }
}

simd_dispatch! {
    /// [`erf_map_body`] built for AVX-512 or AVX2 where the CPU has them. These maps do not go
    /// through [`super::wide_map`]: a map of [`erf`] and an exp is over the inliner's size
    /// threshold as a closure (or a function's `Fn::call`), and the call left in
    /// `wide_map`'s loop kept it scalar, 20x slower (GELU backward 22 ns a value). Here each
    /// loop calls the `inline(always)` functions directly. No FMA in any build, so every build
    /// computes the same bits.
    fn erf_map(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], map: ErfMap)
        => erf_map_body, (o, a, b, map); ["avx512f", "avx2"]
}

#[inline(always)]
fn erf_map_body(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], map: ErfMap) {
    assert!(
        o.len() == a.len() && a.len() == b.len(),
        "erf_map lengths differ"
    );
    let n = o.len();
    let (a, b) = (&a[..n], &b[..n]);
    match map {
        ErfMap::Erf => {
            for i in 0..n {
                o[i].write(erf(a[i]));
            }
        }
        ErfMap::ErfGrad => {
            for i in 0..n {
                o[i].write(b[i] * erf_grad(a[i]));
            }
        }
        ErfMap::Gelu => {
            for i in 0..n {
                o[i].write(gelu(a[i]));
            }
        }
        ErfMap::GeluGrad => {
            for i in 0..n {
                o[i].write(b[i] * gelu_grad(a[i]));
            }
        }
        ErfMap::GeluTanh => {
            for i in 0..n {
                o[i].write(gelu_tanh(a[i]));
            }
        }
        ErfMap::GeluTanhGrad => {
            for i in 0..n {
                o[i].write(b[i] * gelu_tanh_grad(a[i]));
            }
        }
    }
}

/// `erf'(x) = 2 / sqrt(pi) exp(-x^2)`.
#[inline(always)]
fn erf_grad(x: f32) -> f32 {
    std::f32::consts::FRAC_2_SQRT_PI * exp_nonpositive(-(x * x))
}

/// `sqrt(2 / pi)`, the tanh GELU's inner scale (PyTorch's `kBeta = M_SQRT2 * M_2_SQRTPI * 0.5`).
const GELU_BETA: f32 = std::f32::consts::SQRT_2 * std::f32::consts::FRAC_2_SQRT_PI * 0.5;
/// The tanh GELU's cubic coefficient.
const GELU_KAPPA: f32 = 0.044715;

/// Exact GELU, `x * 0.5 * (1 + erf(x / sqrt 2))` as PyTorch's kernel writes it. NaN stays NaN;
/// `-inf` gives NaN, as PyTorch.
#[inline(always)]
fn gelu(x: f32) -> f32 {
    x * 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `d gelu / dx = Phi(x) + x phi(x)`: PyTorch's `GeluBackward` with `approximate = "none"`
/// (`cdf + x * exp(-x^2 / 2) / sqrt(2 pi)`).
#[inline(always)]
fn gelu_grad(x: f32) -> f32 {
    // PyTorch's kAlpha = M_2_SQRTPI * M_SQRT1_2 * 0.5 = 1 / sqrt(2 pi).
    const ALPHA: f32 = std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2 * 0.5;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = exp_nonpositive(-0.5 * x * x) * ALPHA;
    cdf + x * pdf
}

/// Tanh GELU, `0.5 x (1 + tanh(u))` with `u = sqrt(2/pi) (x + 0.044715 x^3)`, computed as
/// the equal `x sigmoid(2 u)`: [`sigmoid`] vectorises where `tanhf` does not, and keeps its
/// relative accuracy where `1 + tanh(u)` cancels (large negative `x`).
#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    let inner = GELU_BETA * (x + GELU_KAPPA * (x * x * x));
    x * sigmoid(2.0 * inner)
}

/// Derivative of [`gelu_tanh`], PyTorch's `GeluBackward` with `approximate = "tanh"`,
/// `0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)` with `t = tanh(u)`, term
/// for term through `0.5 (1 + t) = s` and `1 - t^2 = 4 s (1 - s)`, `s = sigmoid(2 u)`.
#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    let x_sq = x * x;
    let inner = GELU_BETA * (x + GELU_KAPPA * (x_sq * x));
    let s = sigmoid(2.0 * inner);
    let left_derivative = s;
    let tanh_derivative = 4.0 * s * (1.0 - s);
    let inner_derivative = GELU_BETA * (1.0 + 3.0 * GELU_KAPPA * x_sq);
    let right_derivative = 0.5 * x * tanh_derivative * inner_derivative;
    left_derivative + right_derivative
}

/// The error function in f32 operations only and without branches, so that loops over a
/// tensor vectorise (libm's `erff` is four intervals of rational functions behind branches:
/// about 20 ns a value here). Two fits, both evaluated and one selected: `x P(x^2)` for
/// `|x| < 0.9`, and `1 - exp(L(|x|))` above, `L` a degree-9 fit of `ln erfc` on `[0.9, 4]`
/// (`|x|` clamped to 4, where `erf` rounds to 1 in f32). The fits' own errors are below 1e-9;
/// f32 rounding leaves 1.5 ulp at most against the f64 `erf` (`erf_is_within_two_ulp_of_f64`).
/// NaN stays NaN, `erf(+-inf) = +-1`.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const SMALL: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI, // the fit's own constant term, to the last bit
        -0.376_126_35,
        0.112_837_15,
        -0.026_860_513,
        0.005_203_868,
        -0.000_817_572_3,
        8.513_421e-5,
    ];
    const LARGE: [f32; 10] = [
        8.594_203e-5,
        -1.128_979_7,
        -0.634_753_6,
        -0.106_167_34,
        0.023_122_657,
        -0.002_940_612_8,
        -5.952_672e-5,
        1.034_066_7e-4,
        -1.786_236_7e-5,
        1.110_767_4e-6,
    ];
    let a = x.abs();
    let s = x * x;
    // Horner's rule written out: a loop over the coefficients would be the innermost loop,
    // which the vectoriser tries (and fails) to widen instead of the loop over the tensor.
    let [s0, s1, s2, s3, s4, s5, s6] = SMALL;
    let p = ((((((s6 * s + s5) * s + s4) * s + s3) * s + s2) * s + s1) * s) + s0;
    let small = x * p;
    let t = if a < 4.0 { a } else { 4.0 };
    let [l0, l1, l2, l3, l4, l5, l6, l7, l8, l9] = LARGE;
    let l = l9 * t + l8;
    let l = ((((l * t + l7) * t + l6) * t + l5) * t + l4) * t + l3;
    let l = ((l * t + l2) * t + l1) * t + l0;
    let large = (1.0 - exp_nonpositive(l)).copysign(x);
    let e = if a < 0.9 { small } else { large };
    if x.is_nan() {
        x
    } else {
        e
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

/// ELU, `x` above 0, else `alpha (e^x - 1)`, branch-free over [`exp_m1_nonpositive`] so that the
/// loops over a tensor vectorise: with libm's scalar `expm1` ELU forward took 21% of a user
/// CNN's training step (6 ms of 28 at 2 threads, batch 32). NaN stays NaN.
#[inline(always)]
pub(crate) fn elu(x: f32, alpha: f32) -> f32 {
    let e = alpha * exp_m1_nonpositive(x.min(0.0));
    if x > 0.0 || x.is_nan() {
        x
    } else {
        e
    }
}

/// `e^a - 1` for `a <= 0` on [`exp_nonpositive`]'s reduction `a = n ln2 + r`: for `n = 0`
/// (`|a| < ln2 / 2`) the polynomial without its leading 1, so that small inputs keep their
/// digits (`e^a - 1` computed as such loses them all below 1e-4); otherwise `e^a - 1`, which
/// is at most -0.29 there and loses nothing. -1 below `ln(2^-126)`. Within 2 ulp of f64's
/// `exp_m1` (`exp_m1_is_within_two_ulp_of_f64`).
#[inline(always)]
fn exp_m1_nonpositive(a: f32) -> f32 {
    let (em1_r, scale, n) = exp_reduced(a);
    if a < EXP_LO {
        -1.0
    } else if n == 0 {
        em1_r
    } else {
        (em1_r + 1.0) * scale - 1.0
    }
}

/// `e^a` for `a <= 0` (NaN for NaN is the caller's business), flushed to 0 where the result
/// would be subnormal (`a < -87.34`): `(e^r - 1 + 1) 2^n` from [`exp_reduced`].
#[inline(always)]
fn exp_nonpositive(a: f32) -> f32 {
    let (em1_r, scale, _) = exp_reduced(a);
    let v = (em1_r + 1.0) * scale;
    if a < EXP_LO {
        0.0
    } else {
        v
    }
}

/// `ln(2^-126)`: below it `e^a` is subnormal, and [`exp_reduced`] clamps to it.
const EXP_LO: f32 = -87.336_55;

/// Cephes' `expf` reduction of `a` (clamped to [`EXP_LO`]): `a = n ln2 + r` with
/// `|r| <= ln2 / 2`; returns `(e^r - 1, 2^n, n)`, `e^r - 1` as `p(r) r^2 + r` with a degree-5
/// `p`, and `2^n` put straight into the exponent bits. Rounding to `n` adds and subtracts
/// 1.5 * 2^23 (no `floor` call, which would keep the loop scalar on x86-64's baseline SSE2),
/// and `n` is read from the sum's mantissa bits. Branch-free, so loops over it vectorise.
#[inline(always)]
fn exp_reduced(a: f32) -> (f32, f32, i32) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let ac = if a < EXP_LO { EXP_LO } else { a };
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
    (p * r * r + r, f32::from_bits(((ni + 127) as u32) << 23), ni)
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
    fn elu() {
        check(Activation::Elu { alpha: 1.0 }, &[0.0], 14);
        check(Activation::Elu { alpha: 0.7 }, &[0.0], 15);
    }

    #[test]
    fn sigmoid() {
        check(Activation::Sigmoid, &[], 5);
    }

    #[test]
    fn silu() {
        check(Activation::Silu, &[], 10);
    }

    #[test]
    fn gelu_exact() {
        check(Activation::Gelu { tanh: false }, &[], 15);
    }

    #[test]
    fn gelu_tanh() {
        check(Activation::Gelu { tanh: true }, &[], 16);
    }

    #[test]
    fn erf() {
        check(Activation::Erf, &[], 17);
    }

    #[test]
    fn exp() {
        check(Activation::Exp, &[], 21);
    }

    #[test]
    fn pow_square_and_cube() {
        check(Activation::Pow { exponent: 2.0 }, &[], 18);
        check(Activation::Pow { exponent: 3.0 }, &[], 19);
    }

    /// Square root and a fractional power on positive inputs (0.5 to 8.5), against the f64
    /// reference and finite differences.
    #[test]
    fn sqrt_and_fractional_pow_on_positive_inputs() {
        let mut rng = Rng::new(20);
        for act in [Activation::Sqrt, Activation::Pow { exponent: 1.5 }] {
            let x = rand_array(&mut rng, IxDyn(&[3, 4, 5]), 0.5, 8.5);
            let y = act.forward(x.view()).unwrap();
            assert_close("forward", &y.view(), &act.reference(x.view()).view(), 1e-6);
            let r = rand_array(&mut rng, IxDyn(&[3, 4, 5]), -1.0, 1.0);
            let dx = act.backward(x.view(), r.view()).unwrap();
            let r64 = to_f64(&r.view());
            let fd = fd_grad(&to_f64(&x.view()), |x| {
                dot_loss(&act.reference(x.view()), &r64)
            });
            assert_grad("dx", &dx.view(), &fd.view());
        }
    }

    /// Values and derivatives against PyTorch (float64 `F.gelu`, `torch.erf` and autograd),
    /// within a few f32 ulp.
    #[test]
    fn gelu_and_erf_match_pytorch_values() {
        let x = ndarray::arr1(&[1.0f32, -0.5, 3.0, -3.0, 0.0]).into_dyn();
        let ones = ArrayD::from_elem(x.raw_dim(), 1.0f32);
        #[rustfmt::skip]
        let cases: [(Activation, [f64; 5], [f64; 5]); 3] = [
            (
                Activation::Gelu { tanh: false },
                [0.8413447460685429, -0.15426876936299347, 2.99595030590511, -0.00404969409489031, 0.0],
                [1.0833154705876864, 0.13250487534383712, 1.011945647204184, -0.01194564720418392, 0.5],
            ),
            (
                Activation::Gelu { tanh: true },
                [0.8411919906082768, -0.15428599017485606, 2.996362607918227, -0.0036373920817729943, 0.0],
                [1.0829640838457826, 0.13263009646535764, 1.0115841666309695, -0.011584166630969648, 0.5],
            ),
            (
                Activation::Erf,
                [0.8427007929497149, -0.5204998778130465, 0.9999779095030014, -0.9999779095030014, 0.0],
                [0.4151074974205947, 0.8787825789354448, 0.00013925305194674786, 0.00013925305194674786, std::f64::consts::FRAC_2_SQRT_PI],
            ),
        ];
        for (act, want_y, want_d) in cases {
            let y = act.forward(x.view()).unwrap();
            let d = act.backward(x.view(), ones.view()).unwrap();
            for i in 0..5 {
                for (what, got, want) in [("y", y[i], want_y[i]), ("dy/dx", d[i], want_d[i])] {
                    // 4 ulp of the value, or of the terms it is a difference of: at -3 the
                    // GELU is `-1.5 (1 + erf(-2.12))` and its derivative a sum of terms of
                    // size ~|x|/2 that nearly cancel, exact in f32 to an ulp of those terms
                    // only (PyTorch's f32 kernels round the same way).
                    let scale = want.abs().max(0.5 * f64::from(x[i].abs())).max(0.1);
                    let tol = 4.0 * f64::from(f32::EPSILON) * scale;
                    assert!(
                        (f64::from(got) - want).abs() <= tol,
                        "{act:?} {what} at {}: {got} vs {want}",
                        x[i]
                    );
                }
            }
        }
    }

    /// NaN in, NaN out, forward and backward; saturated inputs give the limits, not NaN (up
    /// to |x| = 1e15: past 1.8e19 `x^2` overflows f32 and the tanh form's derivative is
    /// `0 * inf`, NaN, in PyTorch's formula as here).
    #[test]
    fn gelu_and_erf_keep_nan_and_saturate() {
        let x = ndarray::arr1(&[f32::NAN, -30.0, 30.0, 1e15, -1e15]).into_dyn();
        let ones = ArrayD::from_elem(x.raw_dim(), 1.0f32);
        for act in [
            Activation::Gelu { tanh: false },
            Activation::Gelu { tanh: true },
            Activation::Erf,
        ] {
            let y = act.forward(x.view()).unwrap();
            let d = act.backward(x.view(), ones.view()).unwrap();
            assert!(y[0].is_nan() && d[0].is_nan(), "{act:?}: {y} {d}");
            assert!(act.reference(x.view())[0].is_nan(), "{act:?} reference");
            assert!(y.iter().skip(1).all(|v| v.is_finite()), "{act:?}: {y}");
            assert!(d.iter().skip(1).all(|v| v.is_finite()), "{act:?}: {d}");
            if act == Activation::Erf {
                assert_eq!(&y.as_slice().unwrap()[1..], [-1.0, 1.0, 1.0, -1.0]);
            } else {
                assert_eq!(&y.as_slice().unwrap()[1..], [0.0, 30.0, 1e15, 0.0]);
                assert_eq!(&d.as_slice().unwrap()[1..], [0.0, 1.0, 1.0, 0.0]);
            }
        }
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
    /// The vectorisable `e^a - 1` against f64 over a dense sweep of [-100, 0], tiny inputs
    /// (where `e^a - 1` in f32 would keep no digit) and the edges: within 2 ulp.
    #[test]
    fn exp_m1_is_within_two_ulp_of_f64() {
        let mut worst = 0.0f64;
        let sweep = (0..=1_000_000).map(|i| -100.0 + i as f32 * 1e-4);
        let tiny = (1..=300).map(|i| -(10f32).powf(-(i as f32) / 10.0));
        let edges = [-87.34f32, -87.33, -88.0, -0.0, 0.0, -0.346, -0.347, -1e-38];
        for x in sweep.chain(tiny).chain(edges) {
            let want = (x as f64).exp_m1();
            let got = super::exp_m1_nonpositive(x) as f64;
            let ulp = ((want as f32).abs() as f64 * f32::EPSILON as f64).max(1e-45);
            let e = (got - want).abs() / ulp;
            worst = worst.max(e);
            assert!(
                e <= 2.0,
                "exp_m1({x}) = {got}, f64 says {want} ({e:.2} ulp)"
            );
        }
        assert!(worst > 0.0);
        assert_eq!(super::exp_m1_nonpositive(f32::NEG_INFINITY), -1.0);
        assert!(super::exp_m1_nonpositive(f32::NAN).is_nan());
        assert!(super::elu(f32::NAN, 1.0).is_nan());
        assert_eq!(super::elu(f32::INFINITY, 1.0), f32::INFINITY);
    }

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

    /// The vectorisable erf against libm's f64 `erf` over a dense sweep of [-6, 6], the
    /// switch between its two fits, tiny values and both infinities.
    #[test]
    fn erf_is_within_two_ulp_of_f64() {
        let mut worst = (0.0f64, 0.0f32);
        let sweep = (0..=1_200_000).map(|i| -6.0 + i as f32 * 1e-5);
        let near_switch = (-64..64).map(|i| 0.9 + i as f32 * 6e-8);
        let edges = [
            0.0f32, -0.0, 1e-30, -1e-30, 1e-6, 3.9, 4.0, 4.1, 10.0, -10.0,
        ];
        for x in sweep.chain(near_switch).chain(edges) {
            let want = libm::erf(f64::from(x));
            let got = f64::from(super::erf(x));
            let ulp = f64::from((want as f32).abs()) * f64::from(f32::EPSILON);
            let e = (got - want).abs() / ulp.max(f64::from(f32::MIN_POSITIVE));
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 2.0, "erf({}) is {:.2} ulp off", worst.1, worst.0);
        assert_eq!(super::erf(f32::INFINITY), 1.0);
        assert_eq!(super::erf(f32::NEG_INFINITY), -1.0);
        assert!(super::erf(f32::NAN).is_nan());
        assert_eq!(super::erf(-0.0).to_bits(), (-0.0f32).to_bits());
    }

    /// The vector builds of the GELU and Erf maps give the baseline (SSE2) build's results bit
    /// for bit (NaN for NaN), over ordinary values, extremes, infinities, subnormals and NaN,
    /// at lengths that leave vector remainders.
    #[test]
    fn erf_maps_equal_the_baseline_build_bitwise() {
        let mut rng = crate::rng::Rng::new(18);
        let mut a: Vec<f32> = (0..4099).map(|_| 3.0 * rng.normal()).collect();
        let b: Vec<f32> = (0..4099).map(|_| rng.normal()).collect();
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            1e-40,
            0.9,
            -0.9,
            4.0,
            -13.0,
        ];
        a[..special.len()].copy_from_slice(&special);
        let maps = [
            ErfMap::Erf,
            ErfMap::ErfGrad,
            ErfMap::Gelu,
            ErfMap::GeluGrad,
            ErfMap::GeluTanh,
            ErfMap::GeluTanhGrad,
        ];
        for map in maps {
            for len in [4099, 4096, 17, 1] {
                let run = |wide: bool| {
                    let mut o = vec![MaybeUninit::new(0.0f32); len];
                    if wide {
                        erf_map(&mut o, &a[..len], &b[..len], map);
                    } else {
                        erf_map_body(&mut o, &a[..len], &b[..len], map);
                    }
                    // SAFETY: initialised above (and every entry rewritten by the map).
                    o.iter()
                        .map(|v| unsafe { v.assume_init() }.to_bits())
                        .collect::<Vec<u32>>()
                };
                let (wide, plain) = (run(true), run(false));
                for (i, (p, q)) in wide.iter().zip(&plain).enumerate() {
                    let (p, q, x) = (f32::from_bits(*p), f32::from_bits(*q), a[i]);
                    // A NaN's sign and payload are whatever the instructions propagate.
                    assert!(
                        p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()),
                        "{map:?}, len {len}, x = {x:e}: {p:e} vs {q:e}"
                    );
                }
            }
        }
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
