//! Batch normalisation over NCHW (ONNX `BatchNormalization`), training and eval mode.
//!
//! Statistics are summed in f32 lanes within a plane and in f64 across planes: a channel of a
//! 128x32x32 batch has 131072 values, and one f32 running sum would lose about 1e-4 relative,
//! the whole budget of the PyTorch parity test.
//! Reductions run over fixed parts of the batch in parallel (`part_channel_sums`: each part's
//! channels in order, the parts' f64 sums added in part order), the elementwise passes per
//! image in parallel; neither depends on thread scheduling, so results are reproducible.
//! Both are built for AVX2 where the CPU has it (same lanes and operations, no FMA, so the same
//! bits as the baseline SSE2 build): at four lanes their compute, not memory, bounded them (a
//! 128x16x32x32 forward 1.35 -> 0.82 ms, backward 1.68 -> 1.12 ms; AVX-512 measured no
//! faster). The elementwise passes through `simd_dispatch!` (`ops/simd.rs`); the per-plane sums
//! are `ops/plane_sums.rs`, 32 lanes in four accumulators, explicit AVX2, with a fused
//! activation's mask applied inside the one gradient-sums pass: MobileNet-V2's BN + Clip
//! backward per step 36-42 -> 26-29 ms at 1 thread (`elrt speed --profile`, alternating runs).
//! The forward passes are also built for AVX-512, for the smooth gates' `exp`.
//!
//! Backward writes `dx` into the buffer of the `dy` it is given (`grad_pass_in_place`), and a
//! fused smooth gate (SiLU, HardSwish: [`BnAct`]) turns `dy` into the gradient at its input in
//! the same buffer first: these passes are memory-bound on the large activations, and a new
//! output tensor costs a read of every line before it is written.

use super::act::gate;
use super::plane_sums::{self, Gate, PlaneSums, Pre, Scalar};
use super::simd::simd_dispatch;
use super::{contiguous, part_len};
use crate::engine::stat_sync::StatSync;
use crate::engine::{attr_err, shape_err, Result};
use ndarray::{Array1, Array4, ArrayView1, ArrayView4, ArrayViewMut1, NdFloat};
use rayon::prelude::*;
use std::mem::MaybeUninit;

const OP: &str = "BatchNormalization";

/// Attributes of a batch norm.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm2d {
    pub epsilon: f32,
    /// ONNX convention: the weight of the *old* running value,
    /// `running = momentum * running + (1 - momentum) * batch`. PyTorch's `momentum=0.1` is
    /// ONNX's 0.9, which is what a PyTorch export writes.
    pub momentum: f32,
    /// An activation fused after the normalisation (the program's BN + ReLU / Clip pass sets
    /// it): the output is `act(bn(x))`, and the pre-activation tensor is never stored. Backward
    /// rebuilds the activation's mask from `x` with the forward's own coefficients, so the
    /// gradients are bitwise those of the two separate ops.
    pub act: BnAct,
}

/// The activation a batch norm may carry: ReLU (ResNets, MobileNet-V3) or Clip (ReLU6 after
/// every BN of MobileNet-V2, where the separate Clip cost 7% of a training step: one more pass
/// forward, two more backward), whose backward masks `dy`; or a smooth gate, SiLU (after every
/// BN of EfficientNet) or HardSwish (MobileNet-V3), whose backward turns `dy` into the gradient
/// at the gate's input in one pass over `x` and `dy` before the batch norm's own. Fused, the
/// gate's input is neither written nor kept for backward: EfficientNet-B0's BN + SiLU pairs
/// wrote, kept and read back one activation-sized tensor each.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum BnAct {
    #[default]
    None,
    /// [`super::act::relu`].
    Relu,
    /// `min(max(v, min), max)` with NaN kept, as [`super::Activation::Clip`].
    Clip { min: f32, max: f32 },
    /// [`super::Activation::Silu`].
    Silu,
    /// [`super::Activation::HardSigmoidMul`].
    HardSigmoidMul { alpha: f32, beta: f32 },
    /// [`super::Activation::HardSwish`].
    HardSwish,
}

impl BnAct {
    /// The activation of `v`, the same f32 operations as the separate op's forward.
    #[inline(always)]
    fn apply(self, v: f32) -> f32 {
        match self {
            BnAct::None => v,
            BnAct::Relu => super::act::relu(v),
            BnAct::Clip { min, max } => {
                if v.is_nan() {
                    v
                } else {
                    v.max(min).min(max)
                }
            }
            BnAct::Silu => gate::silu(v),
            BnAct::HardSigmoidMul { alpha, beta } => gate::hard_sigmoid_mul(v, alpha, beta),
            BnAct::HardSwish => gate::hard_swish(v),
        }
    }

    /// Whether the gradient passes at pre-activation `v`: the separate op's backward condition
    /// (strictly inside the linear region, as PyTorch). Only for the masking activations
    /// ([`Self::masks`]); the smooth gates pass everything here and scale `dy` in
    /// [`Self::grad`] instead.
    #[inline(always)]
    fn passes(self, v: f32) -> bool {
        match self {
            BnAct::Relu => v > 0.0,
            BnAct::Clip { min, max } => v > min && v < max,
            _ => true,
        }
    }

    /// Whether backward masks `dy` (ReLU, Clip) rather than scaling it by a derivative.
    fn masks(self) -> bool {
        matches!(self, BnAct::Relu | BnAct::Clip { .. })
    }

    /// The gradient at the gate's input `v` from `g` at its output, the same f32 operations as
    /// the separate op's backward (the identity for the masking activations, whose mask the
    /// batch norm's passes apply).
    #[inline(always)]
    fn grad(self, v: f32, g: f32) -> f32 {
        match self {
            BnAct::Silu => gate::silu_grad(v, g),
            BnAct::HardSigmoidMul { alpha, beta } => gate::hard_sigmoid_mul_grad(v, g, alpha, beta),
            BnAct::HardSwish => gate::hard_swish_grad(v, g),
            _ => g,
        }
    }

    /// The separate op this activation stands for (the test oracles apply its reference).
    fn activation(self) -> Option<super::Activation> {
        use super::Activation as A;
        Some(match self {
            BnAct::None => return None,
            BnAct::Relu => A::Relu,
            BnAct::Clip { min, max } => A::Clip { min, max },
            BnAct::Silu => A::Silu,
            BnAct::HardSigmoidMul { alpha, beta } => A::HardSigmoidMul { alpha, beta },
            BnAct::HardSwish => A::HardSwish,
        })
    }
}

impl Default for BatchNorm2d {
    fn default() -> Self {
        BatchNorm2d {
            epsilon: 1e-5,
            momentum: 0.9,
            act: BnAct::None,
        }
    }
}

/// What training-mode backward needs besides `x`: the batch statistics forward used. `x_hat` is
/// not kept, it costs a full activation and is one multiply-add away from `x`.
#[derive(Clone, Debug)]
pub struct BatchNormSaved {
    pub mean: Array1<f32>,
    /// `1 / sqrt(biased_var + epsilon)`.
    pub inv_std: Array1<f32>,
    /// With a fused activation: the forward's per-channel coefficients, from which backward
    /// rebuilds the pre-activation exactly as forward computed it.
    act_coef: Option<Vec<Coef>>,
}

/// Gradients of a batch norm with respect to its input and affine parameters.
#[derive(Clone, Debug)]
pub struct BatchNormGrads {
    pub dx: Array4<f32>,
    pub dscale: Array1<f32>,
    pub dbias: Array1<f32>,
}

/// Per-channel coefficients of the one elementwise pass every BN direction needs:
/// `out = a * dy + b * (x - shift) + k`. Subtracting the mean before scaling (rather than folding
/// it into `k`) avoids cancellation for activations with a large mean.
#[derive(Clone, Copy, Debug, Default)]
struct Coef {
    a: f32,
    b: f32,
    shift: f32,
    k: f32,
}

/// The pre-activation of a fused BN + activation, computed exactly as the forward pass computes
/// it (same f32 operations in the same order), so the activation's mask is rebuilt bit for bit.
#[inline(always)]
fn pre_activation(cf: &Coef, x: f32) -> f32 {
    cf.b * (x - cf.shift) + cf.k
}

/// Evaluates `$body` with `$f` bound to a closure calling `$method` of `act`, built per variant
/// so that the loop in `$body` is monomorphic (no match per element) and vectorises.
macro_rules! per_act {
    ($act:expr, $method:ident, $f:ident => $body:expr) => {
        match $act {
            BnAct::None => {
                let $f = |v: f32| BnAct::None.$method(v);
                $body
            }
            BnAct::Relu => {
                let $f = |v: f32| BnAct::Relu.$method(v);
                $body
            }
            BnAct::Clip { min, max } => {
                let $f = move |v: f32| BnAct::Clip { min, max }.$method(v);
                $body
            }
            BnAct::Silu => {
                let $f = |v: f32| BnAct::Silu.$method(v);
                $body
            }
            BnAct::HardSigmoidMul { alpha, beta } => {
                let $f = move |v: f32| BnAct::HardSigmoidMul { alpha, beta }.$method(v);
                $body
            }
            BnAct::HardSwish => {
                let $f = |v: f32| BnAct::HardSwish.$method(v);
                $body
            }
        }
    };
}

/// What [`channel_pass`] does to its result: nothing, an activation on the forward output, or
/// (backward of a fused activation) `dy` masked where the activation did not pass the gradient
/// at the forward pre-activation, rebuilt from `x` with these coefficients.
#[derive(Clone, Copy)]
enum Fused<'a> {
    None,
    Act(BnAct),
    Mask(&'a [Coef], BnAct),
    /// (Forward) a residual join after the normalisation: `out = bn(x) + r`, through a ReLU
    /// where the flag says so. [`channel_pass`] takes the whole batch's `r` and hands each
    /// image its own.
    Add(&'a [f32], bool),
}

/// `g = a * g' + b * (x - shift) + k` in place, `g'` = `g` where `keep(pre-activation)`, else
/// 0. Inlined per activation so that each loop is monomorphic and vectorises.
#[inline(always)]
fn masked_pass(g: &mut [f32], x: &[f32], f: &Coef, cf: &Coef, keep: impl Fn(f32) -> bool) {
    g.iter_mut().zip(x).for_each(|(g, &x)| {
        let gv = if keep(pre_activation(f, x)) { *g } else { 0.0 };
        *g = cf.a * gv + cf.b * (x - cf.shift) + cf.k;
    });
}

/// `o = act(pre-activation(x))`, inlined per activation like [`masked_pass`].
#[inline(always)]
fn act_pass(o: &mut [MaybeUninit<f32>], x: &[f32], cf: &Coef, act: impl Fn(f32) -> f32) {
    o.iter_mut().zip(x).for_each(|(o, &x)| {
        o.write(act(pre_activation(cf, x)));
    });
}

/// `o = bn(x) + r`, through a ReLU if `relu`: value by value the f32 operations of the
/// separate BatchNormalization (its `act_pass` without activation) and then the Add or the
/// Add and Relu on its output (`tensor_ops::add_relu_forward`; f32 addition commutes, so the
/// operands' order in the file does not matter), so the same bits.
#[inline(always)]
fn add_pass(o: &mut [MaybeUninit<f32>], x: &[f32], r: &[f32], cf: &Coef, relu: bool) {
    let r = &r[..o.len()];
    if relu {
        act_pass_add(o, x, r, cf, super::act::relu);
    } else {
        act_pass_add(o, x, r, cf, |v| v);
    }
}

/// The loop of [`add_pass`], monomorphic in its activation so that it vectorises.
#[inline(always)]
fn act_pass_add(
    o: &mut [MaybeUninit<f32>],
    x: &[f32],
    r: &[f32],
    cf: &Coef,
    act: impl Fn(f32) -> f32,
) {
    o.iter_mut().zip(x).zip(r).for_each(|((o, &x), &r)| {
        o.write(act(pre_activation(cf, x) + r));
    });
}

/// Forward: `coef` (and a fused activation or residual join) over NCHW data into a new tensor,
/// images in parallel.
fn channel_pass(xs: &[f32], c: usize, hw: usize, coef: &[Coef], fused: Fused) -> Vec<f32> {
    let n = xs.len();
    let img = c * hw;
    if img == 0 {
        return vec![0.0; n];
    }
    assert!(
        coef.len() == c && n.is_multiple_of(img),
        "one coefficient per channel of whole images"
    );
    // Not zeroed first: every entry is written below (a memset of the whole activation was 5%
    // of MobileNet-V2's training step).
    let below = match fused {
        Fused::Act(act) if !act.masks() && act != BnAct::None => GATE_SPREAD_BELOW,
        _ => SPREAD_BELOW,
    };
    if let Fused::Add(r, _) = fused {
        assert_eq!(r.len(), n, "the residual has the input's length");
    }
    let spread = (hw < below).then(|| Spread::new(coef, fused, hw));
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(img)
        .zip(xs.par_chunks(img))
        .enumerate()
        .with_max_len(1)
        .for_each(|(i, (oi, xi))| {
            let fused = match fused {
                Fused::Add(r, relu) => Fused::Add(&r[i * img..(i + 1) * img], relu),
                f => f,
            };
            match &spread {
                Some(sp) => spread_pass(oi, xi, sp, fused),
                None => image_pass(oi, xi, hw, coef, fused),
            }
        });
    // SAFETY: the chunks cover `out[..n]` image by image, and `image_pass` and `spread_pass`
    // write each image's `c` planes of `hw` entries in full.
    unsafe { out.set_len(n) };
    out
}

/// Backward: `gs` (the output gradient, NCHW like `xs`) becomes `coef`'s `a * dy' + b * (x -
/// shift) + k` in place, images in parallel; `dy'` is `dy` masked by a fused activation
/// (`Fused::Mask`). In place, the pass reads two tensors and writes one it has just read:
/// written to a new tensor, every line of it was first read from memory too, and MobileNet-V2's
/// batch norms are memory-bound (their backward 1.4-1.6x faster on two threads than on one).
fn grad_pass_in_place(
    xs: &[f32],
    gs: &mut [f32],
    c: usize,
    hw: usize,
    coef: &[Coef],
    fused: Fused,
) {
    let img = c * hw;
    if img == 0 {
        return;
    }
    assert!(
        coef.len() == c && xs.len() == gs.len() && xs.len().is_multiple_of(img),
        "one coefficient per channel of whole images"
    );
    let spread = (hw < SPREAD_BELOW).then(|| Spread::new(coef, fused, hw));
    gs.par_chunks_mut(img)
        .zip(xs.par_chunks(img))
        .with_max_len(1)
        .for_each(|(gi, xi)| match &spread {
            Some(sp) => spread_grad(gi, xi, sp, fused),
            None => image_grad(gi, xi, hw, coef, fused),
        });
}

/// Planes with fewer values than this run [`spread_pass`] / [`spread_grad`], not
/// [`image_pass`] / [`image_grad`].
const SPREAD_BELOW: usize = 8;

/// Per-value coefficients of one image (each channel's repeated over its plane), so that
/// [`spread_pass`] runs over the image as one vectorised loop. For planes under 8 values
/// (MobileNet's and EfficientNet's 2x2 stages at 64x64 input) the per-channel loop of
/// [`image_pass`] is a scalar loop of a few values per channel: MobileNet-V2's 1280-channel 2x2
/// BN + Clip ran at 3.7 ns a value backward, 3x its 32x32 layers.
struct Spread {
    a: Vec<f32>,
    b: Vec<f32>,
    shift: Vec<f32>,
    k: Vec<f32>,
    /// The forward's coefficients, for a fused activation's mask (empty otherwise).
    fwd: [Vec<f32>; 3],
}

impl Spread {
    fn new(coef: &[Coef], fused: Fused, hw: usize) -> Spread {
        // Filled channel by channel into a sized buffer: collected from `flat_map(repeat_n)`,
        // whose length the iterator does not know, these four arrays were a serial 14 us of a
        // 576-channel 2x2 forward (the other thread idle through it).
        let spread = |f: &dyn Fn(&Coef) -> f32, cs: &[Coef]| -> Vec<f32> {
            let mut v = vec![0.0f32; cs.len() * hw];
            v.chunks_exact_mut(hw)
                .zip(cs)
                .for_each(|(p, c)| p.fill(f(c)));
            v
        };
        let fwd = match fused {
            Fused::Mask(fwd, _) => [
                spread(&|c| c.b, fwd),
                spread(&|c| c.shift, fwd),
                spread(&|c| c.k, fwd),
            ],
            _ => Default::default(),
        };
        Spread {
            a: spread(&|c| c.a, coef),
            b: spread(&|c| c.b, coef),
            shift: spread(&|c| c.shift, coef),
            k: spread(&|c| c.k, coef),
            fwd,
        }
    }
}

simd_dispatch! {
    /// [`spread_pass_body`] built for AVX2 where the CPU has it, like [`image_pass`].
    fn spread_pass(
        o: &mut [MaybeUninit<f32>],
        x: &[f32],
        sp: &Spread,
        fused: Fused,
    ) => spread_pass_body, (o, x, sp, fused); ["avx512f", "avx2"]
}

/// One image of [`channel_pass`] with per-value coefficients: value by value the f32
/// operations of [`image_pass_body`] (the same bits), in one loop over the image.
#[inline(always)]
fn spread_pass_body(o: &mut [MaybeUninit<f32>], x: &[f32], sp: &Spread, fused: Fused) {
    let n = o.len();
    let (x, b, sh, k) = (&x[..n], &sp.b[..n], &sp.shift[..n], &sp.k[..n]);
    match fused {
        Fused::Act(act) => per_act!(act, apply, f => {
            for i in 0..n {
                o[i].write(f(b[i] * (x[i] - sh[i]) + k[i]));
            }
        }),
        Fused::Add(r, true) => {
            let r = &r[..n];
            for i in 0..n {
                o[i].write(super::act::relu(b[i] * (x[i] - sh[i]) + k[i] + r[i]));
            }
        }
        Fused::Add(r, false) => {
            let r = &r[..n];
            for i in 0..n {
                o[i].write(b[i] * (x[i] - sh[i]) + k[i] + r[i]);
            }
        }
        _ => {
            for i in 0..n {
                o[i].write(b[i] * (x[i] - sh[i]) + k[i]);
            }
        }
    }
}

simd_dispatch! {
    /// [`spread_grad_body`] built for AVX2 where the CPU has it, like [`image_pass`].
    fn spread_grad(g: &mut [f32], x: &[f32], sp: &Spread, fused: Fused)
        => spread_grad_body, (g, x, sp, fused); ["avx2"]
}

/// One image of [`grad_pass_in_place`] with per-value coefficients: value by value the f32
/// operations of [`image_grad_body`] (the same bits), in one loop over the image.
#[inline(always)]
fn spread_grad_body(g: &mut [f32], x: &[f32], sp: &Spread, fused: Fused) {
    let n = g.len();
    let (x, a, b, sh, k) = (&x[..n], &sp.a[..n], &sp.b[..n], &sp.shift[..n], &sp.k[..n]);
    match fused {
        Fused::Mask(_, act) => {
            let (fb, fs, fk) = (&sp.fwd[0][..n], &sp.fwd[1][..n], &sp.fwd[2][..n]);
            per_act!(act, passes, keep => {
                for i in 0..n {
                    let pre = fb[i] * (x[i] - fs[i]) + fk[i];
                    let gi = if keep(pre) { g[i] } else { 0.0 };
                    g[i] = a[i] * gi + b[i] * (x[i] - sh[i]) + k[i];
                }
            })
        }
        _ => {
            for i in 0..n {
                g[i] = a[i] * g[i] + b[i] * (x[i] - sh[i]) + k[i];
            }
        }
    }
}

simd_dispatch! {
    /// [`image_pass_body`] built for AVX2 where the CPU has it. Elementwise with
    /// no fused multiply-add, so every build computes the same f32 operations, bitwise.
    fn image_pass(
        oi: &mut [MaybeUninit<f32>],
        xi: &[f32],
        hw: usize,
        coef: &[Coef],
        fused: Fused,
    ) => image_pass_body, (oi, xi, hw, coef, fused); ["avx512f", "avx2"]
}

/// One image of [`channel_pass`]: channel by channel.
#[inline(always)]
fn image_pass_body(
    oi: &mut [MaybeUninit<f32>],
    xi: &[f32],
    hw: usize,
    coef: &[Coef],
    fused: Fused,
) {
    for (ch, cf) in coef.iter().enumerate() {
        let r = ch * hw..(ch + 1) * hw;
        let (o, x) = (&mut oi[r.clone()], &xi[r]);
        match fused {
            Fused::Act(act) => per_act!(act, apply, f => act_pass(o, x, cf, f)),
            Fused::Add(r, relu) => add_pass(o, x, &r[ch * hw..(ch + 1) * hw], cf, relu),
            _ => act_pass(o, x, cf, |v| v),
        }
    }
}

simd_dispatch! {
    /// [`image_grad_body`] built for AVX2 where the CPU has it, like [`image_pass`].
    fn image_grad(gi: &mut [f32], xi: &[f32], hw: usize, coef: &[Coef], fused: Fused)
        => image_grad_body, (gi, xi, hw, coef, fused); ["avx2"]
}

/// One image of [`grad_pass_in_place`]: channel by channel, `gi` the image's `dy` on entry and
/// its `dx` on return.
#[inline(always)]
fn image_grad_body(gi: &mut [f32], xi: &[f32], hw: usize, coef: &[Coef], fused: Fused) {
    for (ch, cf) in coef.iter().enumerate() {
        let r = ch * hw..(ch + 1) * hw;
        let (g, x) = (&mut gi[r.clone()], &xi[r]);
        match fused {
            Fused::Mask(fwd, act) => {
                let f = &fwd[ch];
                per_act!(act, passes, keep => masked_pass(g, x, f, cf, keep))
            }
            _ => g.iter_mut().zip(x).for_each(|(g, &x)| {
                *g = cf.a * *g + cf.b * (x - cf.shift) + cf.k;
            }),
        }
    }
}

/// `with_plane_sums! { fn name(params..) -> Ret => body }` defines `name`, which runs
/// `body(sums, params..)` with the [`PlaneSums`] this CPU runs: the AVX2 build where it
/// has AVX2 (inside a function built for AVX2, so the channel's plane loop and the sums inline
/// into one loop: called per plane, the 16-value planes of MobileNet-V2's late layers lost
/// more to the calls than the wider sums won), else [`Scalar`] (the same lane arithmetic, so
/// the same bits).
macro_rules! with_plane_sums {
    (
        $(#[$attr:meta])*
        fn $name:ident($($p:ident: $t:ty),* $(,)?) -> $ret:ty => $body:ident
    ) => {
        $(#[$attr])*
        fn $name($($p: $t),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if let Some(l) = plane_sums::Avx2::detect() {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn build(l: plane_sums::Avx2, $($p: $t),*) -> $ret {
                    $body(l, $($p),*)
                }
                // SAFETY: an `Avx2` exists only where the CPU has AVX2.
                return unsafe { build(l, $($p),*) };
            }
            $body(Scalar, $($p),*)
        }
    };
}

with_plane_sums! {
    /// `sum over planes of f64(sum(plane))` for one channel: within a plane in f32 lanes
    /// ([`PlaneSums`]), across planes in f64.
    fn channel_sum(xs: &[f32], c: usize, hw: usize, ch: usize) -> f64 => channel_sum_with
}

#[inline(always)]
fn channel_sum_with(l: impl PlaneSums, xs: &[f32], c: usize, hw: usize, ch: usize) -> f64 {
    // A loop, not `map(..).sum()`: the closure went to an out-of-line `Map::fold`, which is not
    // built for AVX2, and the intrinsics in the sums became calls.
    let mut s = 0.0f64;
    for p in channel_planes(xs, c, hw, ch) {
        s += f64::from(l.sum(p));
    }
    s
}

with_plane_sums! {
    /// `sum over planes of f64(sum((x - mu)^2))` for one channel, like [`channel_sum`].
    fn channel_dev(xs: &[f32], c: usize, hw: usize, ch: usize, mu: f32) -> f64
        => channel_dev_with
}

#[inline(always)]
fn channel_dev_with(l: impl PlaneSums, xs: &[f32], c: usize, hw: usize, ch: usize, mu: f32) -> f64 {
    let mut s = 0.0f64;
    for p in channel_planes(xs, c, hw, ch) {
        s += f64::from(l.dev(p, mu));
    }
    s
}

with_plane_sums! {
    /// One channel's `(sum(dy), sum(dy * (x - mu)))` for [`BatchNorm2d::grad_sums`], like
    /// [`channel_sum`]. A fused activation's mask gates `dy` inside the one pass (`dy` where the
    /// gradient passes, else 0.0: exactly the separate activation's backward), so the sums are
    /// those of the separate ops, bit for bit.
    fn channel_grad_sums(
        xs: &[f32],
        gs: &[f32],
        c: usize,
        hw: usize,
        ch: usize,
        mu: f32,
        fused: Fused,
    ) -> (f64, f64) => channel_grad_sums_with
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn channel_grad_sums_with(
    l: impl PlaneSums,
    xs: &[f32],
    gs: &[f32],
    c: usize,
    hw: usize,
    ch: usize,
    mu: f32,
    fused: Fused,
) -> (f64, f64) {
    let gate = match fused {
        Fused::Mask(fwd, act) => {
            let f = &fwd[ch];
            let pre = Pre {
                b: f.b,
                shift: f.shift,
                k: f.k,
            };
            match act {
                BnAct::Relu => Gate::Relu(pre),
                BnAct::Clip { min, max } => Gate::Clip(pre, min, max),
                _ => Gate::All,
            }
        }
        _ => Gate::All,
    };
    let (mut sdy, mut sdyx) = (0.0f64, 0.0f64);
    for (xp, gp) in channel_planes(xs, c, hw, ch).zip(channel_planes(gs, c, hw, ch)) {
        let [a, b] = l.grad(gp, xp, mu, gate);
        sdy += f64::from(a);
        sdyx += f64::from(b);
    }
    (sdy, sdyx)
}

/// Backward of a fused smooth gate ([`BnAct::grad`]): `gs` (`dy` at the gate's output) becomes
/// the gradient at its input, the pre-activation rebuilt from `xs` with the forward's
/// coefficients `fwd` exactly as forward computed it; and, while each image is in cache, its
/// planes' gradient sums around `mean` (as [`channel_grad_sums`]), per channel over the fixed
/// parts of the batch as [`part_channel_sums`] adds them: the same sums, bit for bit, as the
/// batch norm's own pass over the transformed `dy`, without reading `x` and `dy` again.
#[allow(clippy::too_many_arguments)]
fn gate_grad_sums_in_place(
    xs: &[f32],
    gs: &mut [f32],
    c: usize,
    hw: usize,
    fwd: &[Coef],
    act: BnAct,
    mean: &[f32],
) -> Vec<[f64; 2]> {
    let img = c * hw;
    if img == 0 {
        return vec![[0.0; 2]; c];
    }
    assert!(
        fwd.len() == c && mean.len() == c && xs.len() == gs.len() && xs.len().is_multiple_of(img),
        "one coefficient per channel of whole images"
    );
    let part = part_len(xs.len() / img) * img;
    // Small planes as one loop over the image with per-value coefficients (as
    // [`spread_pass`]): per channel, a 2x2 plane's 4 values ran the sigmoid scalar, and
    // EfficientNet-B0's BN + SiLU backward took 90 ms a step at 1 thread against 52 for the
    // separate ops.
    let spread = (hw < GATE_SPREAD_BELOW).then(|| Spread::new(fwd, Fused::None, hw));
    // Planes under SMALL_PLANE_MOMENTS values: the sums per value, as `grad_sums` takes them.
    let small = (hw < SMALL_PLANE_MOMENTS).then(|| spread_mean(mean, hw));
    let partials: Vec<Vec<[f64; 2]>> = gs
        .par_chunks_mut(part)
        .zip(xs.par_chunks(part))
        .with_max_len(1)
        .map(|(gp, xp)| {
            let mut acc = vec![[0.0f64; 2]; c];
            let mut per_value = GradValues::new(if small.is_some() { img } else { 0 });
            for (gi, xi) in gp.chunks_exact_mut(img).zip(xp.chunks_exact(img)) {
                match &spread {
                    Some(sp) => spread_gate_grad(gi, xi, sp, act),
                    None => image_gate_grad(gi, xi, hw, fwd, act),
                }
                match &small {
                    Some(mu) => per_value.add(xi, gi, mu),
                    None => image_grad_sums(xi, gi, hw, mean, &mut acc),
                }
            }
            if small.is_some() {
                acc = per_value.channel_totals(hw);
            }
            acc
        })
        .collect();
    merge_parts(&partials, c)
}

with_plane_sums! {
    /// Adds each plane's `(sum(g), sum(g * (x - mean)))` of one image to its channel's `acc`.
    fn image_grad_sums(xi: &[f32], gi: &[f32], hw: usize, mean: &[f32], acc: &mut [[f64; 2]])
        -> () => image_grad_sums_with
}

#[inline(always)]
fn image_grad_sums_with(
    l: impl PlaneSums,
    xi: &[f32],
    gi: &[f32],
    hw: usize,
    mean: &[f32],
    acc: &mut [[f64; 2]],
) {
    for (ch, (a, &mu)) in acc.iter_mut().zip(mean).enumerate() {
        let r = ch * hw..(ch + 1) * hw;
        let [sdy, sdyx] = l.grad(&gi[r.clone()], &xi[r], mu, Gate::All);
        a[0] += f64::from(sdy);
        a[1] += f64::from(sdyx);
    }
}

/// Planes with fewer values than this run a smooth gate's passes ([`spread_pass`],
/// [`spread_gate_grad`]) over the whole image with per-value coefficients: the gates' `exp`
/// is compute-bound, so a per-channel loop's scalar remainder costs more than for the plain
/// passes ([`SPREAD_BELOW`]).
const GATE_SPREAD_BELOW: usize = 64;

simd_dispatch! {
    /// [`spread_gate_grad_body`] built for AVX-512 / AVX2 where the CPU has them.
    fn spread_gate_grad(g: &mut [f32], x: &[f32], sp: &Spread, act: BnAct)
        => spread_gate_grad_body, (g, x, sp, act); ["avx512f", "avx2"]
}

/// One image of [`gate_grad_sums_in_place`] with per-value forward coefficients (in the
/// [`Spread`]'s `b`, `shift`, `k`): value by value the f32 operations of
/// [`image_gate_grad_body`] (the same bits), in one loop over the image.
#[inline(always)]
fn spread_gate_grad_body(g: &mut [f32], x: &[f32], sp: &Spread, act: BnAct) {
    let n = g.len();
    let (x, b, sh, k) = (&x[..n], &sp.b[..n], &sp.shift[..n], &sp.k[..n]);
    macro_rules! run {
        ($grad:expr) => {{
            let grad = $grad;
            for i in 0..n {
                g[i] = grad(b[i] * (x[i] - sh[i]) + k[i], g[i]);
            }
        }};
    }
    match act {
        BnAct::Silu => run!(|v, g| BnAct::Silu.grad(v, g)),
        BnAct::HardSigmoidMul { alpha, beta } => {
            run!(move |v, g| BnAct::HardSigmoidMul { alpha, beta }.grad(v, g))
        }
        BnAct::HardSwish => run!(|v, g| BnAct::HardSwish.grad(v, g)),
        _ => {}
    }
}

simd_dispatch! {
    /// [`image_gate_grad_body`] built for AVX-512 / AVX2 where the CPU has them.
    fn image_gate_grad(gi: &mut [f32], xi: &[f32], hw: usize, fwd: &[Coef], act: BnAct)
        => image_gate_grad_body, (gi, xi, hw, fwd, act); ["avx512f", "avx2"]
}

/// One image of [`gate_grad_sums_in_place`], channel by channel (a loop per gate kind, so that
/// none holds a branch on the kind per value).
#[inline(always)]
fn image_gate_grad_body(gi: &mut [f32], xi: &[f32], hw: usize, fwd: &[Coef], act: BnAct) {
    match act {
        BnAct::Silu => gate_pass(gi, xi, hw, fwd, |v, g| BnAct::Silu.grad(v, g)),
        BnAct::HardSigmoidMul { alpha, beta } => gate_pass(gi, xi, hw, fwd, |v, g| {
            BnAct::HardSigmoidMul { alpha, beta }.grad(v, g)
        }),
        BnAct::HardSwish => gate_pass(gi, xi, hw, fwd, |v, g| BnAct::HardSwish.grad(v, g)),
        _ => {}
    }
}

/// `g = grad(pre-activation(x), g)` over one image, channel by channel.
#[inline(always)]
fn gate_pass(gi: &mut [f32], xi: &[f32], hw: usize, fwd: &[Coef], grad: impl Fn(f32, f32) -> f32) {
    for (ch, f) in fwd.iter().enumerate() {
        let r = ch * hw..(ch + 1) * hw;
        for (g, &x) in gi[r.clone()].iter_mut().zip(&xi[r]) {
            *g = grad(pre_activation(f, x), *g);
        }
    }
}

/// `a` itself when its elements lie in standard (C) order, else a standard-order copy.
fn standard_layout(a: Array4<f32>) -> Array4<f32> {
    if a.is_standard_layout() {
        a
    } else {
        a.as_standard_layout().into_owned()
    }
}

/// [`BatchNorm2d::grad_sums`] for planes under [`SMALL_PLANE_MOMENTS`] values: per fixed part
/// of the batch, per-value f64 sums ([`GradValues`]) of `dy` (masked by a fused
/// activation: `dy` where it passes at the rebuilt pre-activation, else 0.0, as the separate
/// op's backward gives), then channel totals, merged in part order. Plane by plane (a call
/// per 2x2 plane) these sums were, like the forward's, several times the `dx` pass.
fn small_plane_grad_sums(
    xs: &[f32],
    gs: &[f32],
    c: usize,
    hw: usize,
    mean: ArrayView1<f32>,
    fused: Fused,
) -> Vec<[f64; 2]> {
    let img = c * hw;
    let n = xs.len() / img;
    let part = part_len(n) * img;
    let mu = spread_mean(&mean.to_vec(), hw);
    let mask = match fused {
        Fused::Mask(fwd, act) => Some((Spread::new(fwd, Fused::None, hw), act)),
        _ => None,
    };
    let partials: Vec<Vec<[f64; 2]>> = gs
        .par_chunks(part)
        .zip(xs.par_chunks(part))
        .with_max_len(1)
        .map(|(gp, xp)| {
            let mut per_value = GradValues::new(img);
            let mut masked = vec![0.0f32; if mask.is_some() { img } else { 0 }];
            for (gi, xi) in gp.chunks_exact(img).zip(xp.chunks_exact(img)) {
                match &mask {
                    Some((sp, act)) => {
                        let (b, sh, k) = (&sp.b[..img], &sp.shift[..img], &sp.k[..img]);
                        let (xi, gi, m) = (&xi[..img], &gi[..img], &mut masked[..img]);
                        // `dy` or +0.0 by a bit mask, without a branch per value.
                        per_act!(*act, passes, keep => {
                            for i in 0..img {
                                let pre = b[i] * (xi[i] - sh[i]) + k[i];
                                let bits = u32::from(keep(pre)).wrapping_neg();
                                m[i] = f32::from_bits(gi[i].to_bits() & bits);
                            }
                        });
                        per_value.add(xi, m, &mu);
                    }
                    None => per_value.add(xi, gi, &mu),
                }
            }
            per_value.channel_totals(hw)
        })
        .collect();
    merge_parts(&partials, c)
}

/// Sums `values` across processes through `sync`, as an engine error.
fn sync_sums(sync: &dyn StatSync, values: &mut [f64]) -> Result<()> {
    sync.sum(values)
        .map_err(|msg| crate::engine::EngineError::Sync { op: OP, msg })
}

/// Per-channel f64 sums `f(images, ch)` over fixed parts of the batch ([`part_len`] images):
/// the parts in parallel, each part's channels in order, then each channel's part sums added in
/// part order (so the same bits whatever the thread count). Each task streams whole images: run
/// per channel in parallel instead, every task read one plane per image at a stride of the
/// whole image, and on small planes those scattered reads made the statistics passes slower
/// than the elementwise pass that reads and writes more (perf on ResNet-18 Tucker-2 at 64x64:
/// the gradient sums 3.1% of the step, the dx pass 2.0%).
fn part_channel_sums<const K: usize>(
    n: usize,
    c: usize,
    f: impl Fn(std::ops::Range<usize>, usize) -> [f64; K] + Sync,
) -> Vec<[f64; K]> {
    let part = part_len(n);
    let partials: Vec<Vec<[f64; K]>> = (0..n.div_ceil(part))
        .into_par_iter()
        .with_max_len(1)
        .map(|p| {
            let images = p * part..((p + 1) * part).min(n);
            (0..c).map(|ch| f(images.clone(), ch)).collect()
        })
        .collect();
    merge_parts(&partials, c)
}

/// Each channel's sums of the parts' `partials` (one `[f64; K]` per channel each), added in
/// part order.
fn merge_parts<const K: usize>(partials: &[Vec<[f64; K]>], c: usize) -> Vec<[f64; K]> {
    // Parts in the outer loop, as `batch_moments`' merge (independent adds in flight).
    let mut totals = vec![[0.0f64; K]; c];
    for p in partials {
        totals.iter_mut().zip(p).for_each(|(t, v)| {
            t.iter_mut().zip(v).for_each(|(t, v)| *t += v);
        });
    }
    totals
}

/// Planes with fewer values than this take [`small_plane_moments`]. 4x4 planes (two AVX2
/// vectors each) keep the plane sums: the per-value path measured 30% slower there (96
/// channels, batch 64) and MobileNet-V3-Small's 2-thread step slower with it.
const SMALL_PLANE_MOMENTS: usize = 8;

simd_dispatch! {
    /// One part's `(sum, M2 around the part's mean, that mean)` per channel for planes under
    /// [`SMALL_PLANE_MOMENTS`] values, as per-value f64 accumulators over the part's images (one
    /// vector loop over each whole image, then `hw` adds per channel). Plane by plane, a 2x2
    /// plane's four values were a call and a horizontal sum each: MobileNet-V3-Small's 576-channel
    /// 2x2 BN + HardSwish spent 170-186 us of its 2-thread forward in its statistics against 50 in
    /// the output pass. In f64 throughout, so the deviations need no correction for a rounded mean.
    ///
    /// Built for AVX2 where the CPU has it: the baseline build's f64 loops are SSE2, two values
    /// an instruction, and were half of the 576-channel 2x2 BN + HardSwish forward at one thread
    /// (perf). Per-value adds and multiplies without fused multiply-add: every build the same bits.
    fn small_plane_moments(xp: &[f32], c: usize, hw: usize, cnt: f64) -> Vec<[f64; 3]>
        => small_plane_moments_body, (xp, c, hw, cnt); ["avx2"]
}

/// [`small_plane_moments`]' loops (the baseline build on CPUs without AVX2).
#[inline(always)]
fn small_plane_moments_body(xp: &[f32], c: usize, hw: usize, cnt: f64) -> Vec<[f64; 3]> {
    let len = c * hw;
    let mut acc = vec![0.0f64; len];
    for xi in xp.chunks_exact(len) {
        acc.iter_mut()
            .zip(xi)
            .for_each(|(a, &v)| *a += f64::from(v));
    }
    let sums: Vec<f64> = acc.chunks_exact(hw).map(|p| p.iter().sum()).collect();
    // The divisions in a loop of their own (vector divides), not one between each sum and
    // the fill of its mean.
    let means: Vec<f64> = sums.iter().map(|s| s / cnt).collect();
    let mut mu = vec![0.0f64; len];
    mu.chunks_exact_mut(hw)
        .zip(&means)
        .for_each(|(p, &m)| p.fill(m));
    acc.fill(0.0);
    for xi in xp.chunks_exact(len) {
        acc.iter_mut().zip(xi).zip(&mu).for_each(|((a, &v), &m)| {
            let d = f64::from(v) - m;
            *a += d * d;
        });
    }
    acc.chunks_exact(hw)
        .zip(sums.iter().zip(&means))
        .map(|(p, (&s, &m))| [s, p.iter().sum(), m])
        .collect()
}

/// `mean` (one per channel) repeated over each channel's `hw` values, in f64.
fn spread_mean(mean: &[f32], hw: usize) -> Vec<f64> {
    let mut v = vec![0.0f64; mean.len() * hw];
    v.chunks_exact_mut(hw)
        .zip(mean)
        .for_each(|(p, &m)| p.fill(f64::from(m)));
    v
}

/// Per-value f64 gradient sums `(sum g, sum g * (x - mean))` over a part's images, for planes
/// under [`SMALL_PLANE_MOMENTS`] values (like [`small_plane_moments`]): one vector loop over
/// each image, then `hw` adds per channel. Two arrays, not one of pairs: interleaved, the AVX2
/// build spent its time shuffling lanes between the pairs.
struct GradValues {
    g: Vec<f64>,
    gx: Vec<f64>,
}

impl GradValues {
    /// Zero sums for images of `len` values.
    fn new(len: usize) -> GradValues {
        GradValues {
            g: vec![0.0; len],
            gx: vec![0.0; len],
        }
    }

    /// Adds one image's `g` and `g * (x - mu)` per value (`mu`: the channels' means spread per
    /// value, [`spread_mean`]).
    fn add(&mut self, x: &[f32], g: &[f32], mu: &[f64]) {
        add_grad_values(&mut self.g, &mut self.gx, x, g, mu)
    }

    /// Each channel's totals (`hw` values per channel, added in order).
    fn channel_totals(&self, hw: usize) -> Vec<[f64; 2]> {
        self.g
            .chunks_exact(hw)
            .zip(self.gx.chunks_exact(hw))
            .map(|(g, gx)| {
                let total = |v: &[f64]| v.iter().fold(0.0, |t, &x| t + x);
                [total(g), total(gx)]
            })
            .collect()
    }
}

simd_dispatch! {
    /// [`add_grad_values_body`], built for AVX2 where the CPU has it: the baseline build's f64
    /// loop is SSE2, two values an instruction (as [`small_plane_moments`]). Per-value adds and
    /// multiplies without fused multiply-add: every build the same bits.
    fn add_grad_values(sg: &mut [f64], sgx: &mut [f64], x: &[f32], g: &[f32], mu: &[f64])
        => add_grad_values_body, (sg, sgx, x, g, mu); ["avx2"]
}

/// [`GradValues::add`]'s loop (the baseline build on CPUs without AVX2).
#[inline(always)]
fn add_grad_values_body(sg: &mut [f64], sgx: &mut [f64], x: &[f32], g: &[f32], mu: &[f64]) {
    let n = sg.len();
    let (sgx, x, g, mu) = (&mut sgx[..n], &x[..n], &g[..n], &mu[..n]);
    for i in 0..n {
        let gv = f64::from(g[i]);
        sg[i] += gv;
        sgx[i] += gv * (f64::from(x[i]) - mu[i]);
    }
}

/// Values per channel block of [`batch_moments`]'s parts (32 KiB of f32, L1's size).
const MOMENT_BLOCK: usize = 8192;

/// Per-channel batch mean and biased variance (f64) of NCHW `xs`, and the value count, for a
/// training-mode forward.
struct Moments {
    mean: Vec<f64>,
    var: Vec<f64>,
    count: usize,
}

/// [`Moments`] of `xs` in one parallel pass: each fixed part of the batch ([`part_len`] images)
/// takes, channel by channel, its sum and then its squared deviations from its own mean while
/// that channel's planes of the part are still in cache; the parts then merge in part order
/// (Chan et al.: `M2 = sum of (M2_p + n_p (mean_p - mean)^2)`, every term non-negative, so no
/// cancellation for activations with a large mean). Two passes over the whole batch (sums, then
/// deviations from the batch mean) read `x` from memory twice, and with the output pass a
/// training-mode BN forward read its input three times: these layers are memory-bound.
///
/// `sync` sums the parts' totals across processes (`--sync-bn`): first the sums and the value
/// count, then each process's `M2` around the global mean (itself the merge above), so the
/// statistics are those of every process's batch together.
fn batch_moments(
    xs: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    sync: Option<&dyn StatSync>,
) -> Result<Moments> {
    let img = c * hw;
    let part = part_len(n);
    // Per part and channel: (sum, M2 around the part's own mean, that mean).
    let partials: Vec<Vec<[f64; 3]>> = (0..n.div_ceil(part))
        .into_par_iter()
        .with_max_len(1)
        .map(|p| {
            let images = p * part..((p + 1) * part).min(n);
            let xp = &xs[images.start * img..images.end * img];
            let cnt = (images.len() * hw) as f64;
            if hw < SMALL_PLANE_MOMENTS {
                return small_plane_moments(xp, c, hw, cnt);
            }
            // Channels in blocks of about L1's size of the part's values: each block's sums,
            // then its deviations. One channel at a time, small planes (a 2x2 plane's 16 values
            // over four images) left each deviation pass waiting on its own sum and division.
            let block = (MOMENT_BLOCK / (images.len() * hw)).max(1);
            let mut out = vec![[0.0f64; 3]; c];
            for (b, ob) in out.chunks_mut(block).enumerate() {
                let ch0 = b * block;
                for (j, o) in ob.iter_mut().enumerate() {
                    o[0] = channel_sum(xp, c, hw, ch0 + j);
                }
                for (j, o) in ob.iter_mut().enumerate() {
                    let mu = o[0] / cnt;
                    o[2] = mu;
                    // Deviations from mu rounded to f32 (the lanes' arithmetic), corrected:
                    // sum (x - mu)^2 = sum (x - mu32)^2 - cnt (mu - mu32)^2.
                    let mu32 = mu as f32;
                    let shift = mu - f64::from(mu32);
                    let dev = channel_dev(xp, c, hw, ch0 + j, mu32);
                    o[1] = (dev - cnt * shift * shift).max(0.0);
                }
            }
            out
        })
        .collect();
    // The parts' terms added channel by channel in part order (the bits of a per-channel
    // `sum()`, which starts at -0.0), parts in the outer loop: per channel, a chain of dependent
    // adds over 16 parts was a serial section of 20-40 us at 576-1152 channels, the other
    // thread idle through it.
    let mut sums = vec![-0.0f64; c];
    for pt in &partials {
        sums.iter_mut().zip(pt).for_each(|(s, v)| *s += v[0]);
    }
    let count = match sync {
        Some(s) => {
            sums.push((n * hw) as f64);
            sync_sums(s, &mut sums)?;
            sums.pop().expect("count pushed") as usize
        }
        None => n * hw,
    };
    let mean: Vec<f64> = sums.iter().map(|s| s / count as f64).collect();
    let mut m2 = vec![-0.0f64; c];
    for (p, pt) in partials.iter().enumerate() {
        let cnt = (part.min(n - p * part) * hw) as f64;
        m2.iter_mut().zip(pt).zip(&mean).for_each(|((m, v), &mu)| {
            let d = v[2] - mu;
            *m += v[1] + cnt * d * d;
        });
    }
    if let Some(s) = sync {
        sync_sums(s, &mut m2)?;
    }
    let var = m2.iter().map(|v| (v / count as f64).max(0.0)).collect();
    Ok(Moments { mean, var, count })
}

/// The `hw`-long planes of channel `ch` in an NCHW slice, image by image.
fn channel_planes(xs: &[f32], c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    xs.chunks_exact(c * hw)
        .map(move |img| &img[ch * hw..(ch + 1) * hw])
}

impl BatchNorm2d {
    /// Validates `x` (rank 4) against the per-channel parameters; returns `[N, C, H, W]`.
    pub fn output_shape(&self, x: &[usize], param_lens: &[usize]) -> Result<[usize; 4]> {
        let &[n, c, h, w] = x else {
            return Err(shape_err(
                OP,
                format!("input {x:?} must have rank 4 (NCHW)"),
            ));
        };
        if c == 0 || h == 0 || w == 0 {
            return Err(shape_err(OP, format!("empty input {x:?}")));
        }
        if let Some(&l) = param_lens.iter().find(|&&l| l != c) {
            return Err(shape_err(
                OP,
                format!("a parameter has {l} entries for {c} channels"),
            ));
        }
        if self.epsilon < 0.0 || !self.epsilon.is_finite() {
            return Err(attr_err(
                OP,
                format!("epsilon {} must be finite and >= 0", self.epsilon),
            ));
        }
        if !(0.0..=1.0).contains(&self.momentum) {
            return Err(attr_err(
                OP,
                format!("momentum {} must lie in [0, 1]", self.momentum),
            ));
        }
        Ok([n, c, h, w])
    }

    /// Training mode: normalises with the batch's mean and biased variance, and updates the
    /// running statistics with the *unbiased* variance, as PyTorch does.
    pub fn forward_train(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        bias: ArrayView1<f32>,
        running_mean: ArrayViewMut1<f32>,
        running_var: ArrayViewMut1<f32>,
    ) -> Result<(Array4<f32>, BatchNormSaved)> {
        self.forward_train_synced(x, scale, bias, running_mean, running_var, None)
    }

    /// [`Self::forward_train`], with the per-channel sums (and the value count) summed through
    /// `sync` before use: the statistics are then those of every process's batch together
    /// (`--sync-bn`). `None` is [`Self::forward_train`], bit for bit.
    pub fn forward_train_synced(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        bias: ArrayView1<f32>,
        running_mean: ArrayViewMut1<f32>,
        running_var: ArrayViewMut1<f32>,
        sync: Option<&dyn StatSync>,
    ) -> Result<(Array4<f32>, BatchNormSaved)> {
        let fused = self.fwd_fused();
        self.forward_train_fused(x, scale, bias, running_mean, running_var, sync, fused)
    }

    /// [`Self::forward_train_synced`] followed by a residual join: `act(bn(x) + r)`, `act` a
    /// ReLU where `relu` (ResNet's blocks end in BN, Add, ReLU; MobileNet-V2's and
    /// EfficientNet's in BN, Add), in the normalising pass itself: the batch norm's output is
    /// neither written nor read back by the Add, nor kept until backward. Bitwise the separate
    /// ops' output (see `add_pass`). The batch norm carries no activation of its own here, and
    /// `r` has `x`'s shape. Backward is the separate ops' (the Add's, then
    /// [`Self::backward_train_synced`] on its gradient): the same bits there too.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_train_add_synced(
        &self,
        x: ArrayView4<f32>,
        r: ArrayView4<f32>,
        relu: bool,
        scale: ArrayView1<f32>,
        bias: ArrayView1<f32>,
        running_mean: ArrayViewMut1<f32>,
        running_var: ArrayViewMut1<f32>,
        sync: Option<&dyn StatSync>,
    ) -> Result<(Array4<f32>, BatchNormSaved)> {
        if self.act != BnAct::None {
            return Err(attr_err(
                OP,
                "a batch norm joined to a residual carries no activation of its own",
            ));
        }
        if r.shape() != x.shape() {
            return Err(shape_err(
                OP,
                format!(
                    "the residual {:?} joined to the output differs from the input {:?}",
                    r.shape(),
                    x.shape()
                ),
            ));
        }
        let rs = contiguous(&r);
        let fused = Fused::Add(&rs, relu);
        self.forward_train_fused(x, scale, bias, running_mean, running_var, sync, fused)
    }

    /// The training forward with its output pass `fused` (the op's activation, or a residual
    /// join).
    #[allow(clippy::too_many_arguments)]
    fn forward_train_fused(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        bias: ArrayView1<f32>,
        mut running_mean: ArrayViewMut1<f32>,
        mut running_var: ArrayViewMut1<f32>,
        sync: Option<&dyn StatSync>,
        fused: Fused,
    ) -> Result<(Array4<f32>, BatchNormSaved)> {
        let [n, c, h, w] = self.output_shape(
            x.shape(),
            &[
                scale.len(),
                bias.len(),
                running_mean.len(),
                running_var.len(),
            ],
        )?;
        let (hw, m) = (h * w, n * h * w);
        if m < 2 {
            return Err(shape_err(
                OP,
                format!(
                    "training needs more than one value per channel, got input {:?}",
                    x.shape()
                ),
            ));
        }
        let xs = contiguous(&x);
        let stats = batch_moments(&xs, n, c, hw, sync)?;
        let m = stats.count;
        let eps = f64::from(self.epsilon);
        let inv_std: Vec<f64> = stats
            .var
            .iter()
            .map(|var| 1.0 / (var + eps).sqrt())
            .collect();
        let coef: Vec<Coef> = (0..c)
            .map(|ch| Coef {
                b: (f64::from(scale[ch]) * inv_std[ch]) as f32,
                shift: stats.mean[ch] as f32,
                k: bias[ch],
                ..Coef::default()
            })
            .collect();
        let y = channel_pass(&xs, c, hw, &coef, fused);

        let mom = f64::from(self.momentum);
        let unbias = m as f64 / (m - 1) as f64;
        for ch in 0..c {
            let (mean, var) = (stats.mean[ch], stats.var[ch]);
            running_mean[ch] = (mom * f64::from(running_mean[ch]) + (1.0 - mom) * mean) as f32;
            running_var[ch] =
                (mom * f64::from(running_var[ch]) + (1.0 - mom) * var * unbias) as f32;
        }
        let saved = BatchNormSaved {
            mean: stats.mean.iter().map(|&v| v as f32).collect(),
            inv_std: inv_std.iter().map(|&v| v as f32).collect(),
            act_coef: (self.act != BnAct::None).then_some(coef),
        };
        Ok((
            Array4::from_shape_vec((n, c, h, w), y).expect("output has the input's length"),
            saved,
        ))
    }

    /// Eval mode: a fixed per-channel affine map from the running statistics.
    pub fn forward_eval(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        bias: ArrayView1<f32>,
        mean: ArrayView1<f32>,
        var: ArrayView1<f32>,
    ) -> Result<Array4<f32>> {
        let [n, c, h, w] =
            self.output_shape(x.shape(), &[scale.len(), bias.len(), mean.len(), var.len()])?;
        let coef: Vec<Coef> = (0..c)
            .map(|ch| Coef {
                b: (f64::from(scale[ch]) * self.inv_std(var[ch])) as f32,
                shift: mean[ch],
                k: bias[ch],
                ..Coef::default()
            })
            .collect();
        let y = channel_pass(&contiguous(&x), c, h * w, &coef, self.fwd_fused());
        Ok(Array4::from_shape_vec((n, c, h, w), y).expect("output has the input's length"))
    }

    fn fwd_fused(&self) -> Fused<'static> {
        match self.act {
            BnAct::None => Fused::None,
            act => Fused::Act(act),
        }
    }

    fn inv_std(&self, var: f32) -> f64 {
        1.0 / (f64::from(var) + f64::from(self.epsilon)).sqrt()
    }

    /// Training-mode backward, through the batch statistics:
    /// `dx = scale * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))`. `dx` is written
    /// into a copy of `dy`; [`Self::backward_train_synced`] takes `dy` and writes into it.
    pub fn backward_train(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        saved: &BatchNormSaved,
        dy: ArrayView4<f32>,
    ) -> Result<BatchNormGrads> {
        self.backward_train_synced(x, scale, saved, dy.to_owned(), None)
    }

    /// [`Self::backward_train`] after a [`Self::forward_train_synced`]: `dx` comes from the sums
    /// of `dy` and `dy * x_hat` over every process (and the global count), as the statistics it
    /// differentiates were global; `dscale` and `dbias` stay this process's own sums, which the
    /// gradient all-reduce then combines like every other parameter's gradient (as PyTorch's
    /// `SyncBatchNorm`). `None` is [`Self::backward_train`], bit for bit. `dx` is computed in
    /// `dy`'s buffer (see `grad_pass_in_place`).
    pub fn backward_train_synced(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        saved: &BatchNormSaved,
        dy: Array4<f32>,
        sync: Option<&dyn StatSync>,
    ) -> Result<BatchNormGrads> {
        let [_, c, h, w] = self.output_shape(
            x.shape(),
            &[scale.len(), saved.mean.len(), saved.inv_std.len()],
        )?;
        Self::check_dy(x.shape(), dy.shape())?;
        let hw = h * w;
        let m = (x.len() / c) as f64;
        let xs = contiguous(&x);
        let mut dx = standard_layout(dy);
        let gs = dx.as_slice_mut().expect("standard layout");
        let mask = match (self.act, &saved.act_coef) {
            (BnAct::None, _) => Fused::None,
            (act, Some(fwd)) if act.masks() => Fused::Mask(fwd, act),
            (_, Some(_)) => Fused::None,
            (_, None) => {
                return Err(attr_err(
                    OP,
                    "the forward pass ran without the fused activation this backward expects",
                ))
            }
        };
        let sums = match (&saved.act_coef, self.act.masks()) {
            // A smooth gate: `dy` becomes the gradient at the gate's input, in place, and the
            // batch norm's sums come from the same pass; the dx pass below then sees it as its
            // `dy`, as after the separate op.
            (Some(fwd), false) => {
                let mean = saved.mean.as_slice().expect("a fresh 1-D array");
                gate_grad_sums_in_place(&xs, gs, c, hw, fwd, self.act, mean)
                    .into_iter()
                    .zip(&saved.inv_std)
                    .map(|([sdy, sdyx], &is)| (sdy, sdyx * f64::from(is)))
                    .collect()
            }
            _ => self.grad_sums(
                &xs,
                gs,
                c,
                hw,
                saved.mean.view(),
                saved.inv_std.view(),
                mask,
            ),
        };
        let (global, m) = match sync {
            Some(s) => {
                let mut v: Vec<f64> = sums.iter().flat_map(|&(a, b)| [a, b]).collect();
                v.push(m);
                sync_sums(s, &mut v)?;
                let m = v.pop().expect("count pushed");
                (v.chunks_exact(2).map(|p| (p[0], p[1])).collect(), m)
            }
            None => (Vec::new(), m),
        };
        let dx_sums = if sync.is_some() { &global } else { &sums };
        // dx = g*is*dy - g*is*mean(dy) - g*is*x_hat*mean(dy*x_hat), x_hat = (x - mean)*is.
        let coef: Vec<Coef> = (0..c)
            .map(|ch| {
                let (sdy, sdyxh) = dx_sums[ch];
                let gis = f64::from(scale[ch]) * f64::from(saved.inv_std[ch]);
                Coef {
                    a: gis as f32,
                    b: (-gis * f64::from(saved.inv_std[ch]) * sdyxh / m) as f32,
                    shift: saved.mean[ch],
                    k: (-gis * sdy / m) as f32,
                }
            })
            .collect();
        grad_pass_in_place(&xs, gs, c, hw, &coef, mask);
        Ok(BatchNormGrads {
            dx,
            dscale: sums.iter().map(|s| s.1 as f32).collect(),
            dbias: sums.iter().map(|s| s.0 as f32).collect(),
        })
    }

    /// Eval-mode backward: statistics are constants, so `dx = dy * scale * inv_std`.
    pub fn backward_eval(
        &self,
        x: ArrayView4<f32>,
        scale: ArrayView1<f32>,
        mean: ArrayView1<f32>,
        var: ArrayView1<f32>,
        dy: ArrayView4<f32>,
    ) -> Result<BatchNormGrads> {
        let [_, c, h, w] = self.output_shape(x.shape(), &[scale.len(), mean.len(), var.len()])?;
        Self::check_dy(x.shape(), dy.shape())?;
        if self.act != BnAct::None {
            // The training step never runs BN in eval mode; a fused activation's mask would need
            // the shift parameter, which this signature does not take.
            return Err(attr_err(
                OP,
                "eval-mode backward of a fused BN + activation",
            ));
        }
        let hw = h * w;
        let inv_std: Array1<f32> = var.mapv(|v| self.inv_std(v) as f32);
        let xs = contiguous(&x);
        let mut dx = standard_layout(dy.to_owned());
        let gs = dx.as_slice_mut().expect("standard layout");
        let sums = self.grad_sums(&xs, gs, c, hw, mean, inv_std.view(), Fused::None);
        let coef: Vec<Coef> = (0..c)
            .map(|ch| Coef {
                a: scale[ch] * inv_std[ch],
                ..Coef::default()
            })
            .collect();
        grad_pass_in_place(&xs, gs, c, hw, &coef, Fused::None);
        Ok(BatchNormGrads {
            dx,
            dscale: sums.iter().map(|s| s.1 as f32).collect(),
            dbias: sums.iter().map(|s| s.0 as f32).collect(),
        })
    }

    fn check_dy(x: &[usize], dy: &[usize]) -> Result<()> {
        if x != dy {
            return Err(shape_err(
                OP,
                format!("output gradient shape {dy:?} differs from input shape {x:?}"),
            ));
        }
        Ok(())
    }

    /// Per channel: `(sum(dy), sum(dy * x_hat))` in f64; with `Fused::Mask`, of the masked `dy`
    /// (the activation's backward), formed plane by plane so that the sums are bitwise those of
    /// the separate activation and BN.
    #[allow(clippy::too_many_arguments)]
    fn grad_sums(
        &self,
        xs: &[f32],
        gs: &[f32],
        c: usize,
        hw: usize,
        mean: ArrayView1<f32>,
        inv_std: ArrayView1<f32>,
        fused: Fused,
    ) -> Vec<(f64, f64)> {
        let img = c * hw;
        let n = xs.len().checked_div(img).unwrap_or(0);
        let sums = if hw < SMALL_PLANE_MOMENTS && n > 0 {
            small_plane_grad_sums(xs, gs, c, hw, mean, fused)
        } else {
            part_channel_sums(n, c, |r, ch| {
                let (xp, gp) = (
                    &xs[r.start * img..r.end * img],
                    &gs[r.start * img..r.end * img],
                );
                let (sdy, sdyx) = channel_grad_sums(xp, gp, c, hw, ch, mean[ch], fused);
                [sdy, sdyx]
            })
        };
        sums.into_iter()
            .zip(inv_std)
            .map(|([sdy, sdyx], &is)| (sdy, sdyx * f64::from(is)))
            .collect()
    }

    /// Training-mode forward from the definition (two-pass mean and variance). Test oracle only.
    pub fn reference_train<T: NdFloat>(
        &self,
        x: ArrayView4<T>,
        scale: ArrayView1<T>,
        bias: ArrayView1<T>,
    ) -> Result<Array4<T>> {
        let [n, c, h, w] = self.output_shape(x.shape(), &[scale.len(), bias.len()])?;
        let m = T::from(n * h * w).expect("count fits a float");
        let eps = T::from(self.epsilon).expect("f32 fits any float");
        let mut y = Array4::zeros((n, c, h, w));
        for ch in 0..c {
            let plane = x.index_axis(ndarray::Axis(1), ch);
            let mean = plane.sum() / m;
            let var = plane.mapv(|v| (v - mean) * (v - mean)).sum() / m;
            let inv = T::one() / (var + eps).sqrt();
            y.index_axis_mut(ndarray::Axis(1), ch)
                .assign(&plane.mapv(|v| (v - mean) * inv * scale[ch] + bias[ch]));
        }
        Ok(self.reference_act(y))
    }

    /// Eval-mode forward from the definition. Test oracle only.
    pub fn reference_eval<T: NdFloat>(
        &self,
        x: ArrayView4<T>,
        scale: ArrayView1<T>,
        bias: ArrayView1<T>,
        mean: ArrayView1<T>,
        var: ArrayView1<T>,
    ) -> Result<Array4<T>> {
        self.output_shape(x.shape(), &[scale.len(), bias.len(), mean.len(), var.len()])?;
        let eps = T::from(self.epsilon).expect("f32 fits any float");
        let mut y = x.to_owned();
        for ((_, ch, _, _), v) in y.indexed_iter_mut() {
            *v = (*v - mean[ch]) / (var[ch] + eps).sqrt() * scale[ch] + bias[ch];
        }
        Ok(self.reference_act(y))
    }

    /// The fused activation's reference ([`super::Activation::reference`]) over `y`.
    fn reference_act<T: NdFloat>(&self, y: Array4<T>) -> Array4<T> {
        match self.act {
            BnAct::None => y,
            BnAct::Relu => y.mapv(|v| v.max(T::zero())),
            BnAct::Clip { min, max } => {
                let (lo, hi) = (T::from(min).expect("f32"), T::from(max).expect("f32"));
                y.mapv(|v| v.max(lo).min(hi))
            }
            act => {
                let a = act.activation().expect("a smooth gate is an activation");
                a.reference(y.into_dyn().view())
                    .into_dimensionality()
                    .expect("elementwise keeps the rank")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;
    use crate::engine::EngineError;
    use ndarray::Array1;

    struct Case {
        x: Array4<f32>,
        scale: Array1<f32>,
        bias: Array1<f32>,
        r: Array4<f32>,
    }

    /// A training forward's output, saved statistics and updated running mean and variance.
    type Trained = (Array4<f32>, BatchNormSaved, Array1<f32>, Array1<f32>);

    fn case(shape: [usize; 4], seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        // An offset mean and non-unit spread, as real activations have.
        let x = rand_array(&mut rng, shape, -1.0, 3.0);
        Case {
            scale: rand_array(&mut rng, shape[1], 0.5, 1.5),
            bias: rand_array(&mut rng, shape[1], -0.5, 0.5),
            r: rand_array(&mut rng, shape, -1.0, 1.0),
            x,
        }
    }

    impl Case {
        /// Training-mode forward from fresh running statistics (mean 0, variance 1): the
        /// output, what backward needs, and the updated statistics.
        fn train(
            &self,
            bn: &BatchNorm2d,
        ) -> (Array4<f32>, BatchNormSaved, Array1<f32>, Array1<f32>) {
            let c = self.x.shape()[1];
            let (mut rm, mut rv) = (Array1::zeros(c), Array1::ones(c));
            let (y, saved) = bn
                .forward_train(
                    self.x.view(),
                    self.scale.view(),
                    self.bias.view(),
                    rm.view_mut(),
                    rv.view_mut(),
                )
                .unwrap();
            (y, saved, rm, rv)
        }

        /// [`Self::train`] with the residual join (`forward_train_add_synced`) to `r`.
        fn train_joined(
            &self,
            bn: &BatchNorm2d,
            r: ArrayView4<f32>,
            relu: bool,
        ) -> Result<Trained> {
            let c = self.x.shape()[1];
            let (mut rm, mut rv) = (Array1::zeros(c), Array1::ones(c));
            let (z, saved) = bn.forward_train_add_synced(
                self.x.view(),
                r,
                relu,
                self.scale.view(),
                self.bias.view(),
                rm.view_mut(),
                rv.view_mut(),
                None,
            )?;
            Ok((z, saved, rm, rv))
        }
    }

    fn check_train(shape: [usize; 4], seed: u64) {
        check_train_with(BatchNorm2d::default(), shape, seed);
    }

    fn check_train_with(bn: BatchNorm2d, shape: [usize; 4], seed: u64) {
        let t = case(shape, seed);
        let (y, saved, _, _) = t.train(&bn);
        let yr = bn
            .reference_train(t.x.view(), t.scale.view(), t.bias.view())
            .unwrap();
        assert_close("forward", &y.view(), &yr.view(), 1e-5);

        let g = bn
            .backward_train(t.x.view(), t.scale.view(), &saved, t.r.view())
            .unwrap();
        let (x64, s64, b64, r64) = (
            to_f64(&t.x.view()),
            to_f64(&t.scale.view()),
            to_f64(&t.bias.view()),
            to_f64(&t.r.view()),
        );
        let loss = |x: &Array4<f64>, s: &Array1<f64>, b: &Array1<f64>| {
            dot_loss(
                &bn.reference_train(x.view(), s.view(), b.view()).unwrap(),
                &r64,
            )
        };
        assert_grad(
            "dx",
            &g.dx.view(),
            &fd_grad(&x64, |x| loss(x, &s64, &b64)).view(),
        );
        assert_grad(
            "dscale",
            &g.dscale.view(),
            &fd_grad(&s64, |s| loss(&x64, s, &b64)).view(),
        );
        assert_grad(
            "dbias",
            &g.dbias.view(),
            &fd_grad(&b64, |b| loss(&x64, &s64, b)).view(),
        );
    }

    #[test]
    fn train_forward_and_backward() {
        check_train([3, 4, 5, 7], 1);
        check_train([4, 3, 2, 2], 4);
    }

    /// A Clip whose bounds both cut BN outputs of the test cases (about N(bias, scale)).
    const CLIP: BnAct = BnAct::Clip {
        min: -0.5,
        max: 0.7,
    };

    /// The smooth gates a batch norm may carry.
    const SMOOTH: [BnAct; 3] = [
        BnAct::Silu,
        BnAct::HardSigmoidMul {
            alpha: 0.2,
            beta: 0.5,
        },
        BnAct::HardSwish,
    ];

    #[test]
    fn fused_relu_and_clip_forward_and_backward() {
        for act in [BnAct::Relu, CLIP] {
            let bn = BatchNorm2d {
                act,
                ..BatchNorm2d::default()
            };
            check_train_with(bn.clone(), [3, 4, 5, 7], 11);
            check_train_with(bn.clone(), [4, 3, 2, 2], 16);
            check_train_with(bn, [5, 3, 1, 1], 12);
        }
    }

    /// The AVX2 builds of the passes and reductions against their baseline bodies (what a CPU
    /// without AVX2 runs), on ragged planes (7x7: one 32-entry step of the wide reductions, two
    /// 8-entry steps and a remainder) and every fused mode, and the small-plane statistics on
    /// 2x2 and 1x3 planes.
    #[test]
    fn dispatched_builds_equal_the_baseline_bodies_bitwise() {
        let (n, c, hw) = (3, 4, 49);
        let case = case([n, c, 7, 7], 21);
        let (xs, gs) = (case.x.as_slice().unwrap(), case.r.as_slice().unwrap());
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let coef: Vec<Coef> = (0..c)
            .map(|ch| Coef {
                a: 0.7 + ch as f32 * 0.1,
                b: -1.3 + ch as f32 * 0.2,
                shift: 0.9,
                k: 0.05 * ch as f32,
            })
            .collect();
        for ch in 0..c {
            assert_eq!(
                channel_sum(xs, c, hw, ch).to_bits(),
                channel_sum_with(Scalar, xs, c, hw, ch).to_bits()
            );
            assert_eq!(
                channel_dev(xs, c, hw, ch, 0.9).to_bits(),
                channel_dev_with(Scalar, xs, c, hw, ch, 0.9).to_bits()
            );
        }
        let acts = [BnAct::None, BnAct::Relu, BnAct::Clip { min: 0.0, max: 1.5 }];
        let mut modes = vec![Fused::None];
        modes.extend(acts.iter().map(|&a| Fused::Act(a)));
        modes.extend(acts.iter().map(|&a| Fused::Mask(&coef, a)));
        for fused in modes {
            for ch in 0..c {
                let a = channel_grad_sums(xs, gs, c, hw, ch, 0.9, fused);
                let b = channel_grad_sums_with(Scalar, xs, gs, c, hw, ch, 0.9, fused);
                assert_eq!(
                    (a.0.to_bits(), a.1.to_bits()),
                    (b.0.to_bits(), b.1.to_bits())
                );
            }
            let x = &xs[..c * hw];
            if !matches!(fused, Fused::Mask(..)) {
                let zero = MaybeUninit::new(0.0f32);
                let (mut o1, mut o2) = (vec![zero; c * hw], vec![zero; c * hw]);
                image_pass(&mut o1, x, hw, &coef, fused);
                image_pass_body(&mut o2, x, hw, &coef, fused);
                // SAFETY: initialised to 0 above (and overwritten by the passes).
                let init = |o: &[MaybeUninit<f32>]| -> Vec<f32> {
                    o.iter().map(|v| unsafe { v.assume_init() }).collect()
                };
                assert_eq!(bits(&init(&o1)), bits(&init(&o2)));
            }
            if !matches!(fused, Fused::Act(_)) {
                let (mut g1, mut g2) = (gs[..c * hw].to_vec(), gs[..c * hw].to_vec());
                image_grad(&mut g1, x, hw, &coef, fused);
                image_grad_body(&mut g2, x, hw, &coef, fused);
                assert_eq!(bits(&g1), bits(&g2));
            }
        }
        // The small-plane statistics (2x2 and 1x3 planes over the three images).
        for hw in [4, 3] {
            let len = (xs.len() / (c * hw)) * c * hw;
            let (xp, gp) = (&xs[..len], &gs[..len]);
            let to_bits =
                |v: &[[f64; 3]]| -> Vec<u64> { v.iter().flatten().map(|x| x.to_bits()).collect() };
            assert_eq!(
                to_bits(&small_plane_moments(xp, c, hw, 7.0)),
                to_bits(&small_plane_moments_body(xp, c, hw, 7.0))
            );
            let mu: Vec<f64> = (0..c * hw).map(|i| 0.1 * i as f64 - 0.3).collect();
            let (mut a, mut b) = (GradValues::new(c * hw), GradValues::new(c * hw));
            for (xi, gi) in xp.chunks_exact(c * hw).zip(gp.chunks_exact(c * hw)) {
                a.add(xi, gi, &mu);
                add_grad_values_body(&mut b.g, &mut b.gx, xi, gi, &mu);
            }
            let f64_bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(f64_bits(&a.g), f64_bits(&b.g));
            assert_eq!(f64_bits(&a.gx), f64_bits(&b.gx));
        }
        for act in SMOOTH {
            let zero = MaybeUninit::new(0.0f32);
            let (mut o1, mut o2) = (vec![zero; c * hw], vec![zero; c * hw]);
            image_pass(&mut o1, &xs[..c * hw], hw, &coef, Fused::Act(act));
            image_pass_body(&mut o2, &xs[..c * hw], hw, &coef, Fused::Act(act));
            // SAFETY: initialised to 0 above (and overwritten by the passes).
            let init = |o: &[MaybeUninit<f32>]| -> Vec<u32> {
                o.iter()
                    .map(|v| unsafe { v.assume_init() }.to_bits())
                    .collect()
            };
            assert_eq!(init(&o1), init(&o2), "{act:?} forward");
            let (mut g1, mut g2) = (gs[..c * hw].to_vec(), gs[..c * hw].to_vec());
            image_gate_grad(&mut g1, &xs[..c * hw], hw, &coef, act);
            image_gate_grad_body(&mut g2, &xs[..c * hw], hw, &coef, act);
            assert_eq!(bits(&g1), bits(&g2), "{act:?} backward");
        }
    }

    /// The per-value pass of planes under 8 values ([`spread_pass`], AVX2 build) against the
    /// per-channel baseline body, bit for bit, on 1x1, 2x2 and 2x3 planes in every fused mode.
    #[test]
    fn spread_pass_equals_the_per_channel_pass_bitwise() {
        for (h, w) in [(1, 1), (2, 2), (2, 3)] {
            let (c, hw) = (5, h * w);
            let case = case([1, c, h, w], 31);
            let (xs, gs) = (case.x.as_slice().unwrap(), case.r.as_slice().unwrap());
            let coef: Vec<Coef> = (0..c)
                .map(|ch| Coef {
                    a: 0.7 + ch as f32 * 0.1,
                    b: -1.3 + ch as f32 * 0.2,
                    shift: 0.1 * ch as f32,
                    k: 0.05 * ch as f32,
                })
                .collect();
            let acts = [BnAct::None, BnAct::Relu, BnAct::Clip { min: 0.0, max: 1.5 }];
            let mut modes = vec![Fused::None];
            modes.extend(acts.iter().map(|&a| Fused::Act(a)));
            modes.extend(acts.iter().map(|&a| Fused::Mask(&coef, a)));
            for fused in modes {
                let sp = Spread::new(&coef, fused, hw);
                if !matches!(fused, Fused::Mask(..)) {
                    let zero = MaybeUninit::new(0.0f32);
                    let (mut o1, mut o2) = (vec![zero; c * hw], vec![zero; c * hw]);
                    spread_pass(&mut o1, xs, &sp, fused);
                    image_pass_body(&mut o2, xs, hw, &coef, fused);
                    // SAFETY: initialised to 0 above (and overwritten by the passes).
                    let bits = |o: &[MaybeUninit<f32>]| -> Vec<u32> {
                        o.iter()
                            .map(|v| unsafe { v.assume_init() }.to_bits())
                            .collect()
                    };
                    assert_eq!(bits(&o1), bits(&o2), "{h}x{w} forward");
                }
                if !matches!(fused, Fused::Act(_)) {
                    let (mut g1, mut g2) = (gs.to_vec(), gs.to_vec());
                    spread_grad(&mut g1, xs, &sp, fused);
                    image_grad_body(&mut g2, xs, hw, &coef, fused);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&g1), bits(&g2), "{h}x{w} backward");
                }
            }
            for act in SMOOTH {
                let (fwd, sp) = (Fused::Act(act), Spread::new(&coef, Fused::None, hw));
                let zero = MaybeUninit::new(0.0f32);
                let (mut o1, mut o2) = (vec![zero; c * hw], vec![zero; c * hw]);
                spread_pass(&mut o1, xs, &sp, fwd);
                image_pass_body(&mut o2, xs, hw, &coef, fwd);
                // SAFETY: initialised to 0 above (and overwritten by the passes).
                let init = |o: &[MaybeUninit<f32>]| -> Vec<u32> {
                    o.iter()
                        .map(|v| unsafe { v.assume_init() }.to_bits())
                        .collect()
                };
                assert_eq!(init(&o1), init(&o2), "{h}x{w} {act:?} forward");
                // The gate's backward reads the forward's coefficients from the spread's b,
                // shift and k.
                let (mut g1, mut g2) = (gs.to_vec(), gs.to_vec());
                spread_gate_grad(&mut g1, xs, &sp, act);
                image_gate_grad_body(&mut g2, xs, hw, &coef, act);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&g1), bits(&g2), "{h}x{w} {act:?} backward");
            }
        }
    }

    /// The fused BN + ReLU (or Clip) gives bitwise the values and gradients of BN followed by
    /// the activation op, in training and in eval mode: the program may fuse without changing
    /// any result.
    #[test]
    fn fused_relu_and_clip_equal_separate_ops_bitwise() {
        use crate::engine::ops::Activation;
        let plain = BatchNorm2d::default();
        for (act, op) in [
            (BnAct::Relu, Activation::Relu),
            (
                CLIP,
                Activation::Clip {
                    min: -0.5,
                    max: 0.7,
                },
            ),
        ] {
            fused_equals_separate(&plain, act, op);
        }
    }

    /// The smooth gates' fused BN + SiLU / HardSwish give bitwise the values and gradients of
    /// BN followed by the gate op (one loop over each image on planes under 64 values, per
    /// channel from 64: both are among the shapes), in training and in eval mode.
    #[test]
    fn fused_smooth_gates_equal_separate_ops_bitwise() {
        use crate::engine::ops::Activation;
        let plain = BatchNorm2d::default();
        let (alpha, beta) = (1.0 / 6.0, 0.5);
        for (act, op) in [
            (BnAct::Silu, Activation::Silu),
            (
                BnAct::HardSigmoidMul { alpha, beta },
                Activation::HardSigmoidMul { alpha, beta },
            ),
            (BnAct::HardSwish, Activation::HardSwish),
        ] {
            fused_equals_separate(&plain, act, op);
        }
    }

    /// The fused smooth gates against the f64 reference and finite differences, on a plane
    /// under 64 values, one of 72 and 1x1 planes.
    #[test]
    fn fused_smooth_gates_forward_and_backward() {
        for act in [
            BnAct::Silu,
            BnAct::HardSigmoidMul {
                alpha: 0.2,
                beta: 0.5,
            },
            BnAct::HardSwish,
        ] {
            let bn = BatchNorm2d {
                act,
                ..BatchNorm2d::default()
            };
            check_train_with(bn.clone(), [3, 4, 5, 7], 13);
            check_train_with(bn.clone(), [2, 3, 9, 8], 14);
            check_train_with(bn.clone(), [4, 3, 2, 2], 17);
            check_train_with(bn, [5, 3, 1, 1], 15);
        }
    }

    /// `fused_relu_and_clip_equal_separate_ops_bitwise` for one activation.
    fn fused_equals_separate(plain: &BatchNorm2d, act: BnAct, op: crate::engine::ops::Activation) {
        let fused = BatchNorm2d {
            act,
            ..BatchNorm2d::default()
        };
        let lo = match act {
            BnAct::Clip { min, .. } => min,
            _ => 0.0,
        };
        for (shape, seed) in [
            ([4, 6, 5, 7], 21),
            ([2, 3, 8, 8], 22),
            ([5, 4, 2, 2], 24),
            ([6, 2, 1, 1], 23),
        ] {
            let t = case(shape, seed);
            let (y, saved, rm, rv) = t.train(plain);
            let z = op.forward(y.view().into_dyn()).unwrap();
            let dy = op
                .backward(y.view().into_dyn(), t.r.view().into_dyn())
                .unwrap()
                .into_dimensionality()
                .unwrap();
            let g = plain
                .backward_train(t.x.view(), t.scale.view(), &saved, dy.view())
                .unwrap();
            let (zf, saved_f, rmf, rvf) = t.train(&fused);
            let gf = fused
                .backward_train(t.x.view(), t.scale.view(), &saved_f, t.r.view())
                .unwrap();
            assert_eq!(zf.into_dyn(), z, "forward {shape:?}");
            assert_eq!((rmf, rvf), (rm.clone(), rv.clone()), "running statistics");
            assert_eq!(gf.dx, g.dx, "dx {shape:?}");
            assert_eq!(gf.dscale, g.dscale, "dscale {shape:?}");
            assert_eq!(gf.dbias, g.dbias, "dbias {shape:?}");
            // The activation really cut something (or changed the values, for a smooth gate),
            // or the test would prove nothing.
            if act.masks() {
                assert!(z.iter().any(|&v| v == lo) && z.iter().any(|&v| v > lo));
            } else {
                assert!(z.iter().zip(y.iter()).filter(|(a, b)| a != b).count() > z.len() / 2);
            }
            if let BnAct::Clip { max, .. } = act {
                assert!(z.iter().any(|&v| v == max) && z.iter().any(|&v| v < max));
            }

            let ev = |bn: &BatchNorm2d| {
                bn.forward_eval(
                    t.x.view(),
                    t.scale.view(),
                    t.bias.view(),
                    rm.view(),
                    rv.view(),
                )
                .unwrap()
            };
            let ze = op.forward(ev(plain).into_dyn().view()).unwrap();
            assert_eq!(ev(&fused).into_dyn(), ze, "eval forward {shape:?}");
        }
        // A backward that expects the fused activation refuses a forward that ran without it.
        let t = case([2, 2, 3, 3], 24);
        let (_, saved, _, _) = t.train(plain);
        assert!(fused
            .backward_train(t.x.view(), t.scale.view(), &saved, t.r.view())
            .is_err());
    }

    /// The residual join fused into the batch norm's pass gives bitwise the output of the
    /// batch norm followed by the separate Add (or Add + Relu), with the residual as either
    /// operand, and the same running statistics and saved statistics; on planes of 8 values
    /// or more (per channel) and under 8 (one loop over the image), with and without the ReLU.
    /// A batch norm with its own activation, or a residual of another shape, is refused.
    #[test]
    fn residual_join_equals_batch_norm_then_add_bitwise() {
        use crate::engine::tensor_ops::{add_relu_forward, binary_forward, BinOp};
        let bn = BatchNorm2d::default();
        for (shape, seed) in [([4, 6, 5, 7], 31), ([3, 5, 2, 2], 32), ([2, 3, 8, 8], 33)] {
            let t = case(shape, seed);
            let (y, saved, rm, rv) = t.train(&bn);
            for relu in [false, true] {
                let (z, saved_f, rmf, rvf) = t.train_joined(&bn, t.r.view(), relu).unwrap();
                let (yd, rd) = (y.view().into_dyn(), t.r.view().into_dyn());
                for (a, b) in [(yd.clone(), rd.clone()), (rd.clone(), yd.clone())] {
                    let separate = if relu {
                        add_relu_forward(a, b).unwrap()
                    } else {
                        binary_forward(BinOp::Add, a, b).unwrap()
                    };
                    assert_eq!(
                        z.view()
                            .into_dyn()
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        separate.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{shape:?} relu {relu}"
                    );
                }
                assert_eq!((&rmf, &rvf), (&rm, &rv), "running statistics");
                assert_eq!(saved_f.mean, saved.mean);
                assert_eq!(saved_f.inv_std, saved.inv_std);
                // The ReLU really cut something, and the join really added.
                if relu {
                    assert!(z.iter().any(|&v| v == 0.0) && z.iter().any(|&v| v > 0.0));
                }
                assert!(z.iter().zip(y.iter()).filter(|(a, b)| a != b).count() > z.len() / 2);
            }
        }
        let t = case([2, 3, 4, 4], 34);
        let with_act = BatchNorm2d {
            act: BnAct::Relu,
            ..BatchNorm2d::default()
        };
        let join = |bn: &BatchNorm2d, r: ArrayView4<f32>| t.train_joined(bn, r, true).map(|_| ());
        assert!(join(&with_act, t.r.view()).is_err());
        let other = Array4::<f32>::zeros((2, 3, 4, 2));
        let err = join(&bn, other.view()).unwrap_err();
        assert!(err.to_string().contains("residual"), "{err}");
    }

    /// Sums vectors across the threads that share it: each caller adds its vector, waits for
    /// the others, and reads the total (a stand-in for an all-reduce between processes).
    struct ThreadSum {
        total: std::sync::Mutex<Vec<f64>>,
        arrived: std::sync::Barrier,
        read: std::sync::Barrier,
    }

    impl StatSync for ThreadSum {
        fn sum(&self, values: &mut [f64]) -> std::result::Result<(), String> {
            {
                let mut t = self.total.lock().unwrap();
                t.resize(values.len(), 0.0);
                t.iter_mut().zip(values.iter()).for_each(|(t, v)| *t += v);
            }
            self.arrived.wait();
            values.copy_from_slice(&self.total.lock().unwrap());
            if self.read.wait().is_leader() {
                self.total.lock().unwrap().clear();
            }
            self.read.wait();
            Ok(())
        }
    }

    /// `--sync-bn`: two halves of a batch, normalised in two threads whose sums meet through a
    /// [`StatSync`], give the whole batch's output, running statistics and input gradient, and
    /// their local `dscale`/`dbias` add up to the whole batch's.
    #[test]
    fn synced_halves_equal_the_whole_batch() {
        for bn in [
            BatchNorm2d::default(),
            BatchNorm2d {
                act: BnAct::Relu,
                ..BatchNorm2d::default()
            },
            BatchNorm2d {
                act: CLIP,
                ..BatchNorm2d::default()
            },
        ] {
            let t = case([6, 3, 4, 5], 31);
            let (y, saved, rm, rv) = t.train(&bn);
            let g = bn
                .backward_train(t.x.view(), t.scale.view(), &saved, t.r.view())
                .unwrap();
            let sync = ThreadSum {
                total: std::sync::Mutex::new(Vec::new()),
                arrived: std::sync::Barrier::new(2),
                read: std::sync::Barrier::new(2),
            };
            let half = |k: usize| {
                let rows = ndarray::s![3 * k..3 * (k + 1), .., .., ..];
                let (x, r) = (t.x.slice(rows), t.r.slice(rows));
                let (mut rm, mut rv) = (Array1::zeros(3), Array1::ones(3));
                let (y, saved) = bn
                    .forward_train_synced(
                        x,
                        t.scale.view(),
                        t.bias.view(),
                        rm.view_mut(),
                        rv.view_mut(),
                        Some(&sync),
                    )
                    .unwrap();
                let g = bn
                    .backward_train_synced(x, t.scale.view(), &saved, r.to_owned(), Some(&sync))
                    .unwrap();
                (y, rm, rv, g)
            };
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| half(0));
                let b = s.spawn(|| half(1));
                (a.join().unwrap(), b.join().unwrap())
            });
            let cat = |p: &Array4<f32>, q: &Array4<f32>| {
                ndarray::concatenate(ndarray::Axis(0), &[p.view(), q.view()]).unwrap()
            };
            assert_close("forward", &cat(&a.0, &b.0).view(), &y.view(), 1e-5);
            assert_close("dx", &cat(&a.3.dx, &b.3.dx).view(), &g.dx.view(), 1e-5);
            for (what, p, q, whole) in [
                ("running mean", &a.1, &b.1, &rm),
                ("running var", &a.2, &b.2, &rv),
            ] {
                assert_eq!(p, q, "{what}: the same on both");
                assert_close(what, &p.view(), &whole.view(), 1e-6);
            }
            let dscale = &a.3.dscale + &b.3.dscale;
            let dbias = &a.3.dbias + &b.3.dbias;
            assert_close("dscale", &dscale.view(), &g.dscale.view(), 1e-5);
            assert_close("dbias", &dbias.view(), &g.dbias.view(), 1e-5);
            // Local statistics (no sync) would differ: the halves' outputs are not the whole's.
            let (mut rm0, mut rv0) = (Array1::zeros(3), Array1::ones(3));
            let (y0, _) = bn
                .forward_train(
                    t.x.slice(ndarray::s![0..3, .., .., ..]),
                    t.scale.view(),
                    t.bias.view(),
                    rm0.view_mut(),
                    rv0.view_mut(),
                )
                .unwrap();
            assert!((&y0 - &a.0).iter().any(|d| d.abs() > 1e-3));
        }
    }

    #[test]
    fn train_one_by_one_spatial() {
        // After global pooling: statistics over the batch only.
        check_train([5, 3, 1, 1], 2);
    }

    /// `dx` is computed in `dy`'s buffer: a `dy` whose elements are not in standard order
    /// (column-major, made standard-order by a copy first) gives the same gradients.
    #[test]
    fn backward_takes_any_dy_layout() {
        use ndarray::ShapeBuilder;
        let bn = BatchNorm2d::default();
        let t = case([3, 4, 5, 5], 41);
        let (_, saved, _, _) = t.train(&bn);
        let g = bn
            .backward_train(t.x.view(), t.scale.view(), &saved, t.r.view())
            .unwrap();
        let mut dy = Array4::zeros((3, 4, 5, 5).f());
        dy.assign(&t.r);
        assert!(!dy.is_standard_layout());
        let gf = bn
            .backward_train_synced(t.x.view(), t.scale.view(), &saved, dy, None)
            .unwrap();
        let bits = |a: &Array4<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&gf.dx), bits(&g.dx));
        assert_eq!((gf.dscale, gf.dbias), (g.dscale, g.dbias));
    }

    #[test]
    fn train_batch_one() {
        check_train([1, 2, 3, 5], 3);
    }

    /// PyTorch: running_mean = 0.9 * old + 0.1 * batch_mean; running_var uses the unbiased
    /// variance (divisor M - 1); normalisation uses the biased one.
    #[test]
    fn running_statistics_follow_pytorch() {
        let bn = BatchNorm2d {
            epsilon: 1e-5,
            momentum: 0.9,
            ..BatchNorm2d::default()
        };
        // One channel, values 1, 2, 3, 4: mean 2.5, biased var 1.25, unbiased 5/3.
        let x = Array4::from_shape_vec((2, 1, 1, 2), vec![1.0f32, 2.0, 3.0, 4.0]).unwrap();
        let (mut rm, mut rv) = (Array1::from(vec![1.0f32]), Array1::from(vec![2.0f32]));
        let one = Array1::from(vec![1.0f32]);
        let zero = Array1::from(vec![0.0f32]);
        let (y, saved) = bn
            .forward_train(
                x.view(),
                one.view(),
                zero.view(),
                rm.view_mut(),
                rv.view_mut(),
            )
            .unwrap();
        assert!((rm[0] - (0.9 + 0.25)).abs() < 1e-6);
        assert!((rv[0] - (1.8 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
        assert!((saved.mean[0] - 2.5).abs() < 1e-7);
        let inv = 1.0 / (1.25f32 + 1e-5).sqrt();
        assert!((saved.inv_std[0] - inv).abs() < 1e-6);
        assert!((y[[0, 0, 0, 0]] + 1.5 * inv).abs() < 1e-6);
    }

    #[test]
    fn eval_forward_and_backward() {
        let bn = BatchNorm2d {
            epsilon: 1e-3,
            momentum: 0.9,
            ..BatchNorm2d::default()
        };
        let t = case([3, 4, 5, 6], 4);
        let mut rng = Rng::new(5);
        let mean = rand_array(&mut rng, 4, -0.5, 0.5);
        let var = rand_array(&mut rng, 4, 0.5, 2.0);
        let y = bn
            .forward_eval(
                t.x.view(),
                t.scale.view(),
                t.bias.view(),
                mean.view(),
                var.view(),
            )
            .unwrap();
        let yr = bn
            .reference_eval(
                t.x.view(),
                t.scale.view(),
                t.bias.view(),
                mean.view(),
                var.view(),
            )
            .unwrap();
        assert_close("forward", &y.view(), &yr.view(), 1e-5);

        let g = bn
            .backward_eval(
                t.x.view(),
                t.scale.view(),
                mean.view(),
                var.view(),
                t.r.view(),
            )
            .unwrap();
        let (x64, s64, b64, r64) = (
            to_f64(&t.x.view()),
            to_f64(&t.scale.view()),
            to_f64(&t.bias.view()),
            to_f64(&t.r.view()),
        );
        let (m64, v64) = (to_f64(&mean.view()), to_f64(&var.view()));
        let loss = |x: &Array4<f64>, s: &Array1<f64>, b: &Array1<f64>| {
            dot_loss(
                &bn.reference_eval(x.view(), s.view(), b.view(), m64.view(), v64.view())
                    .unwrap(),
                &r64,
            )
        };
        assert_grad(
            "dx",
            &g.dx.view(),
            &fd_grad(&x64, |x| loss(x, &s64, &b64)).view(),
        );
        assert_grad(
            "dscale",
            &g.dscale.view(),
            &fd_grad(&s64, |s| loss(&x64, s, &b64)).view(),
        );
        assert_grad(
            "dbias",
            &g.dbias.view(),
            &fd_grad(&b64, |b| loss(&x64, &s64, b)).view(),
        );
    }

    /// A large batch with a big mean offset (mean / std ~ 170): the statistics and the
    /// subtract-then-scale pass keep the output within a few f32 ulps of the input.
    #[test]
    fn large_batch_statistics_are_accurate() {
        let bn = BatchNorm2d::default();
        let mut rng = Rng::new(6);
        let x = rand_array(&mut rng, [64, 2, 32, 32], 99.0, 101.0);
        let (y, yr, _, _) = unit_forward_and_reference(&bn, &x);
        assert_close("forward", &y.view(), &yr.view(), 5e-6);
    }

    /// Parts whose channels split into several blocks of the statistics pass (3 channels of
    /// 48x48 planes per block here, 6 channels) give the f64 reference's output: every channel
    /// of every block is summed, and around its own part's mean.
    #[test]
    fn statistics_over_several_channel_blocks_match_the_reference() {
        let bn = BatchNorm2d::default();
        let mut rng = Rng::new(10);
        let x = Array4::from_shape_fn((8, 6, 48, 48), |(i, ch, _, _)| {
            10.0 * ch as f32 + i as f32 + rng.range(-1.0, 1.0)
        });
        assert!(MOMENT_BLOCK / (part_len(8) * 48 * 48) < 6);
        let (y, yr, _, _) = unit_forward_and_reference(&bn, &x);
        assert_close("forward", &y.view(), &yr.view(), 1e-5);
    }

    /// Training-mode forward of `x` with unit scale and zero bias, from zero running mean and
    /// unit running variance: its output, the f64 reference's output (as f32), and the updated
    /// running mean and variance.
    fn unit_forward_and_reference(
        bn: &BatchNorm2d,
        x: &Array4<f32>,
    ) -> (Array4<f32>, Array4<f32>, Array1<f32>, Array1<f32>) {
        let c = x.shape()[1];
        let (one, zero) = (Array1::ones(c), Array1::zeros(c));
        let (mut rm, mut rv) = (Array1::zeros(c), Array1::ones(c));
        let (y, _) = bn
            .forward_train(
                x.view(),
                one.view(),
                zero.view(),
                rm.view_mut(),
                rv.view_mut(),
            )
            .unwrap();
        let yr = bn
            .reference_train(
                to_f64(&x.view()).view(),
                one.mapv(f64::from).view(),
                zero.mapv(f64::from).view(),
            )
            .unwrap();
        (y, yr.mapv(|v| v as f32), rm, rv)
    }

    /// Planes whose means differ by far more than their spread, around a large offset, give
    /// the f64 reference's output and unbiased running variance (the statistics are the
    /// batch's, not an average of per-plane or per-part ones): on 5x7 planes, and on 2x2 ones
    /// (under [`SMALL_PLANE_MOMENTS`]: their own statistics pass).
    #[test]
    fn planes_with_different_means_combine_into_the_batch_statistics() {
        let bn = BatchNorm2d {
            momentum: 0.0,
            ..BatchNorm2d::default()
        };
        let mut rng = Rng::new(8);
        for (n, c, h, w) in [(9, 3, 5, 7), (9, 3, 2, 2)] {
            let x = Array4::from_shape_fn((n, c, h, w), |(i, ch, _, _)| {
                50.0 + 20.0 * i as f32 - 7.0 * ch as f32 + rng.range(-0.1, 0.1)
            });
            let (y, yr, rm, rv) = unit_forward_and_reference(&bn, &x);
            assert_close("forward", &y.view(), &yr.view(), 1e-6);
            let x64 = to_f64(&x.view());
            let m = (n * h * w) as f64;
            for ch in 0..c {
                let v = x64.index_axis(ndarray::Axis(1), ch);
                let mean = v.sum() / m;
                let var = v.mapv(|a| (a - mean) * (a - mean)).sum() / (m - 1.0);
                assert!((f64::from(rm[ch]) - mean).abs() <= 1e-6 * mean.abs());
                assert!(
                    (f64::from(rv[ch]) - var).abs() <= 1e-6 * var,
                    "{h}x{w}: {} {var}",
                    rv[ch]
                );
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let bn = BatchNorm2d::default();
        let x = Array4::<f32>::zeros((2, 3, 4, 4));
        let (p3, p2) = (Array1::<f32>::ones(3), Array1::<f32>::ones(2));
        let (mut rm, mut rv) = (Array1::<f32>::zeros(3), Array1::<f32>::ones(3));
        assert!(matches!(
            bn.forward_train(x.view(), p2.view(), p3.view(), rm.view_mut(), rv.view_mut()),
            Err(EngineError::Shape { .. })
        ));
        let single = Array4::<f32>::zeros((1, 3, 1, 1));
        assert!(bn
            .forward_train(
                single.view(),
                p3.view(),
                p3.view(),
                rm.view_mut(),
                rv.view_mut()
            )
            .is_err());
        assert!(bn.output_shape(&[2, 3, 4], &[3]).is_err());
        let bad = BatchNorm2d {
            epsilon: 1e-5,
            momentum: 1.5,
            ..BatchNorm2d::default()
        };
        assert!(matches!(
            bad.output_shape(&[2, 3, 4, 4], &[3]),
            Err(EngineError::Attribute { .. })
        ));
        let (_, saved) = bn
            .forward_train(x.view(), p3.view(), p3.view(), rm.view_mut(), rv.view_mut())
            .unwrap();
        let dy = Array4::<f32>::zeros((2, 3, 4, 5));
        assert!(bn
            .backward_train(x.view(), p3.view(), &saved, dy.view())
            .is_err());
    }
}
