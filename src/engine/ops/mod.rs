//! Numeric kernels of the CPU engine, one op family per file.
//!
//! Conventions shared by every op:
//! - a struct holds the op's attributes; `output_shape` validates shapes and returns an
//!   [`EngineError`](super::EngineError) rather than panicking, because shapes come from user
//!   models;
//! - `forward` returns the output plus whatever `backward` needs beyond the op's inputs (often
//!   nothing: recomputing is cheaper than keeping, e.g. im2col columns are 9x the activation);
//! - `backward` takes the upstream gradient and returns the gradients of inputs and parameters;
//! - `reference` is a naive, obviously-correct forward, generic over the float type so tests can
//!   run finite differences in f64. It is the oracle for the fast path, not for production use.
//!
//! Tensors are NCHW at every boundary, which is ONNX's layout and what the per-image GEMM of the
//! convolution wants (see [`conv`] for why NHWC would not pay here). Inputs in any memory order
//! are accepted; non-standard-layout views are copied once on entry.
//!
//! Reductions over the batch (weight gradients, BN statistics) run over a fixed partition of the
//! batch and are summed in a fixed order, so results do not depend on rayon's work stealing:
//! training with a fixed seed is reproducible, which the resume test relies on.

pub mod act;
pub mod batchnorm;
pub mod conv;
pub mod groupnorm;
pub mod layernorm;
pub mod linear;
pub mod loss;
mod plane_sums;
pub mod pool;
pub(crate) mod simd;

#[cfg(test)]
pub(crate) mod testutil;

pub use act::Activation;
pub use batchnorm::{BatchNorm2d, BatchNormGrads, BatchNormSaved, BnAct};
pub use conv::{Conv2d, Conv2dGrads};
pub use groupnorm::GroupNorm;
pub use layernorm::{LayerNorm, LayerNormGrads, LayerNormSaved};
pub use linear::{Gemm, GemmGrads};
pub use loss::{top1_correct, topk_correct, SoftmaxCrossEntropy};
pub use pool::{AveragePool2d, GlobalAveragePool, MaxPool2d, MaxPoolSaved};

use super::{attr_err, shape_err, Result};
use ndarray::{ArrayBase, Data, Dimension};
use rayon::prelude::*;
use std::borrow::Cow;
use std::mem::MaybeUninit;

/// The elements of `a` in logical (row-major) order, borrowed when `a` is already contiguous.
pub(crate) fn contiguous<S, D>(a: &ArrayBase<S, D>) -> Cow<'_, [f32]>
where
    S: Data<Elem = f32>,
    D: Dimension,
{
    match a.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(a.iter().copied().collect()),
    }
}

/// `dst[j] = src[j * step]` as far as both reach. Stride 1 and 2 (nearly every pool) get
/// loops the compiler vectorises; a `step_by` walk is a scalar gather.
#[inline(always)]
pub(crate) fn deinterleave(src: &[f32], step: usize, dst: &mut [f32]) {
    match step {
        1 => {
            let n = src.len().min(dst.len());
            dst[..n].copy_from_slice(&src[..n]);
        }
        2 => {
            let n = src.len().div_ceil(2).min(dst.len());
            let full = (src.len() / 2).min(n);
            for (d, pair) in dst[..full].iter_mut().zip(src.chunks_exact(2)) {
                *d = pair[0];
            }
            if full < n {
                dst[full] = src[2 * full];
            }
        }
        _ => {
            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(step)) {
                *d = v;
            }
        }
    }
}

/// Output indices `o` in `lo..hi` for which the input index `o * stride + offset` lies in
/// `0..n_in`; every window loop uses this to skip padding without a per-element branch.
pub(crate) fn valid_range(
    n_out: usize,
    n_in: usize,
    stride: usize,
    offset: isize,
) -> (usize, usize) {
    let s = stride as isize;
    let lo = if offset >= 0 {
        0
    } else {
        ((-offset + s - 1) / s) as usize
    };
    let room = n_in as isize - offset;
    let hi = if room <= 0 {
        0
    } else {
        ((room + s - 1) / s) as usize
    };
    let hi = hi.min(n_out);
    (lo.min(hi), hi)
}

/// Sliding-window output length along one axis (ONNX / PyTorch rule). With `ceil_mode` a last
/// window that would start inside the end padding is dropped, as PyTorch does, so every window
/// overlaps the input or the begin padding.
#[allow(clippy::too_many_arguments)]
pub(crate) fn window_out_len(
    op: &'static str,
    axis: &str,
    n_in: usize,
    kernel: usize,
    stride: usize,
    dilation: usize,
    pad_begin: usize,
    pad_end: usize,
    ceil_mode: bool,
) -> Result<usize> {
    if kernel == 0 || stride == 0 || dilation == 0 {
        return Err(attr_err(
            op,
            format!("kernel {kernel}, stride {stride} and dilation {dilation} along {axis} must be positive"),
        ));
    }
    let extent = dilation * (kernel - 1) + 1;
    let padded = n_in + pad_begin + pad_end;
    if padded < extent {
        return Err(shape_err(
            op,
            format!(
                "{axis}: input {n_in} plus pads {pad_begin}+{pad_end} is smaller than the kernel extent {extent}"
            ),
        ));
    }
    let span = padded - extent;
    let mut out = if ceil_mode {
        span.div_ceil(stride)
    } else {
        span / stride
    } + 1;
    if ceil_mode && (out - 1) * stride >= n_in + pad_begin {
        out -= 1;
    }
    Ok(out)
}

/// Elements per rayon task for elementwise kernels: large enough that task overhead vanishes,
/// small enough that two cores share a 128x16x32x32 activation evenly. The most per task of
/// [`elemwise_chunk`]'s split, and the fixed task size of the loops that do not split by length
/// (LayerNorm's rows, the CPU backend's update and accumulation loops).
pub(crate) const ELEMWISE_CHUNK: usize = 1 << 15;

/// Fewest elements per task of [`elemwise_chunk`]'s split.
const ELEMWISE_MIN_CHUNK: usize = 1 << 13;

/// Elements per rayon task for an elementwise loop over `n` entries: an eighth of them, between
/// [`ELEMWISE_MIN_CHUNK`] and [`ELEMWISE_CHUNK`], a multiple of 64. At a fixed
/// [`ELEMWISE_CHUNK`] the activations of MobileNet-V3's late stages (64-150K values at batch 64)
/// made 2 to 5 tasks: with 3 tasks two threads finish at 2 of 3, and anything under 32K values
/// ran on one thread. Where each task goes does not change any result (elementwise).
pub(crate) fn elemwise_chunk(n: usize) -> usize {
    n.div_ceil(8)
        .next_multiple_of(64)
        .clamp(ELEMWISE_MIN_CHUNK, ELEMWISE_CHUNK)
}

/// A zeroed vector of `n` floats, zeroed in parallel when large. `vec![0.0; n]` is a calloc,
/// which memsets in the calling thread once the allocator reuses heap memory (it always does
/// here: `tune_allocator` keeps large blocks off mmap): 3-4% of a ResNet-18 step at 1 thread,
/// all of it serial, so twice that share at 2 threads.
pub(crate) fn zeros(n: usize) -> Vec<f32> {
    if n < 4 * ELEMWISE_CHUNK || rayon::current_num_threads() < 2 {
        return vec![0.0; n];
    }
    let mut v: Vec<f32> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(4 * ELEMWISE_CHUNK)
        // SAFETY: writes zero bytes (0.0f32) over exactly this chunk.
        .for_each(|c| unsafe { std::ptr::write_bytes(c.as_mut_ptr(), 0, c.len()) });
    // SAFETY: every one of the first `n` entries was written just above.
    unsafe { v.set_len(n) };
    v
}

/// A vector of `n` floats for a kernel that writes every entry before anything reads it (a
/// GEMM's output with beta 0, a copy's destination, an elementwise map's output). Not zeroed:
/// the zeroing pass of [`zeros`] streamed each output through memory once more before its
/// kernel wrote it, 5-10% of the CPU time of MobileNet-V2, MobileNet-V3, EfficientNet-B0 and
/// ResNet-18 Tucker-2 training steps at 64x64 (perf, `__memset` under these calls).
///
/// The entries start uninitialised, as tract's `Tensor::uninitialized` does for its kernels'
/// outputs: the kernels write them through `&mut [f32]` (BLAS among them), and nothing reads
/// one before it is written. A read before the write would see garbage, so under `cfg(test)`
/// every entry is NaN instead: a kernel that accumulates into its output (and so needs
/// [`zeros`]) fails its tests (against references, bitwise across thread counts) rather than
/// passing on memory that happened to be zero. Dropping the vector reads nothing.
pub(crate) fn unzeroed(n: usize) -> Vec<f32> {
    // SAFETY: f32 has no invalid bit patterns; the contract above is the callers'.
    unsafe { uninit_or(n, f32::NAN) }
}

/// [`unzeroed`] for indices (MaxPool's argmax, every entry written by its forward): under
/// `cfg(test)` each entry is `u32::MAX - 1`, an index past any plane, so a read before the
/// write panics in the backward's indexing instead of routing a gradient.
pub(crate) fn unzeroed_indices(n: usize) -> Vec<u32> {
    // SAFETY: u32 has no invalid bit patterns; the contract above is the callers'.
    unsafe { uninit_or(n, u32::MAX - 1) }
}

/// `n` entries left uninitialised, or `test_fill` under `cfg(test)` (see [`unzeroed`]).
///
/// # Safety
/// `T` must have no invalid bit patterns, and the caller must write every entry before
/// reading it.
#[allow(clippy::uninit_vec)]
unsafe fn uninit_or<T: Copy>(n: usize, test_fill: T) -> Vec<T> {
    if cfg!(test) {
        return vec![test_fill; n];
    }
    let mut v: Vec<T> = Vec::with_capacity(n);
    // SAFETY: `n` is within the capacity; the entries are uninitialised until the caller
    // writes them, which this function's contract requires before any read.
    unsafe { v.set_len(n) };
    v
}

/// `out[i] = f(x[i])`, in parallel over contiguous chunks, each compiled for the widest vectors
/// the CPU has ([`wide_map`]).
pub(crate) fn par_map(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    par_zip_map(x, x, move |a, _| f(a))
}

/// `o[i] = f(a[i], b[i])` (every entry written; the three lengths must agree), compiled for AVX-512 or AVX2 where the CPU has them (the crate's
/// baseline is SSE2, 4 lanes). Elementwise maps such as the sigmoid's branch-free `exp` are
/// compute-bound there: EfficientNet-B0's SiLU forward and backward were a quarter of its
/// training step. Rust never fuses a multiply and an add on its own and these features add no
/// FMA, so every lane computes the same f32 operations as the SSE2 build: results are
/// identical on every path (`wide_map_equals_the_plain_loop_bitwise`).
#[inline]
pub(crate) fn wide_map<F: Fn(f32, f32) -> f32>(
    o: &mut [MaybeUninit<f32>],
    a: &[f32],
    b: &[f32],
    f: &F,
) {
    assert!(
        o.len() == a.len() && a.len() == b.len(),
        "wide_map lengths differ"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if crate::engine::isa::cpu_has!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, checked just above.
            return unsafe { wide_map_avx512(o, a, b, f) };
        }
        if crate::engine::isa::cpu_has!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { wide_map_avx2(o, a, b, f) };
        }
    }
    wide_map_body(o, a, b, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn wide_map_avx512<F: Fn(f32, f32) -> f32>(
    o: &mut [MaybeUninit<f32>],
    a: &[f32],
    b: &[f32],
    f: &F,
) {
    wide_map_body(o, a, b, f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn wide_map_avx2<F: Fn(f32, f32) -> f32>(
    o: &mut [MaybeUninit<f32>],
    a: &[f32],
    b: &[f32],
    f: &F,
) {
    wide_map_body(o, a, b, f)
}

#[inline(always)]
fn wide_map_body<F: Fn(f32, f32) -> f32>(o: &mut [MaybeUninit<f32>], a: &[f32], b: &[f32], f: &F) {
    let n = o.len().min(a.len()).min(b.len());
    let (o, a, b) = (&mut o[..n], &a[..n], &b[..n]);
    for i in 0..n {
        o[i].write(f(a[i], b[i]));
    }
}

/// `out[i] = f(a[i], b[i])`, in parallel over contiguous chunks ([`wide_map`]). The output is
/// never zero-filled: every entry is written once, by the map.
pub(crate) fn par_zip_map(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    // SAFETY: wide_map writes every entry of its output chunk.
    unsafe { par_zip_chunks(a, b, |o, a, b| wide_map(o, a, b, &f)) }
}

/// `acc[i] += g[i]` (same lengths), in parallel over chunks of [`elemwise_chunk`] entries: the
/// engine's gradient accumulation (`CpuBackend::add_assign`, and a conv's input gradient added
/// to the one its input already holds, `Conv2d::backward_adding`).
pub(crate) fn par_add_assign(acc: &mut [f32], g: &[f32]) {
    assert_eq!(acc.len(), g.len(), "gradients of one tensor");
    let chunk = elemwise_chunk(acc.len());
    acc.par_chunks_mut(chunk)
        .zip(g.par_chunks(chunk))
        .for_each(|(a, g)| a.iter_mut().zip(g).for_each(|(a, &g)| *a += g));
}

/// `kernel(out, a, b)` over matching chunks of [`elemwise_chunk`] entries of a new output and
/// of `a` and `b` (same lengths), in parallel: [`par_zip_map`] for kernels that bring their own
/// vector builds (a map too large for the inliner to put into [`wide_map`]'s loop runs scalar
/// there, see `act::erf_map`).
///
/// # Safety
///
/// `kernel` must write every entry of its output chunk: the output is never zero-filled.
pub(crate) unsafe fn par_zip_chunks(
    a: &[f32],
    b: &[f32],
    kernel: impl Fn(&mut [MaybeUninit<f32>], &[f32], &[f32]) + Sync,
) -> Vec<f32> {
    assert_eq!(a.len(), b.len(), "elementwise operands differ in length");
    let n = a.len();
    let chunk = elemwise_chunk(n);
    let mut out: Vec<f32> = Vec::with_capacity(n);
    out.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
        .for_each(|(o, (a, b))| kernel(o, a, b));
    // SAFETY: the chunks of `out[..n]`, `a` and `b` pair up one to one with equal lengths, and
    // the caller's kernel writes every entry of its output chunk.
    unsafe { out.set_len(n) };
    out
}

/// `sum_i f(a[i], b[i])` with eight independent accumulators, which the compiler vectorises (a
/// single running sum must stay sequential under IEEE rules, about 8x slower). Also more accurate
/// than one running sum. `a` and `b` must have the same length.
#[inline(always)]
pub(crate) fn reduce_pairs(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += f(x[k], y[k]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    reduce_pairs(a, a, |x, _| x)
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    reduce_pairs(a, b, |x, y| x * y)
}

/// Splits `n` items into at most `MAX_PARTS` contiguous runs of equal length (the last may be
/// shorter). The count depends only on `n`, never on the thread count, so sums over parts are
/// bitwise reproducible across `--threads` settings too.
///
/// Loops over such parts, over images or over other coarse tasks (tens of them, each tens of
/// microseconds or more) take `.with_max_len(1)`: rayon's default splitting stops at about a
/// quarter of the items per leaf on two threads, and a leaf runs whole on the thread that
/// started it, so a thread slowed by the host (or a costlier leaf) left the other with nothing
/// to steal for up to a quarter of the loop. Split to single items, the other thread takes over
/// the rest: the second thread idle less in each of 11 alternating pairs, MobileNet-V2's median
/// 9.8% -> 5.8% of a step, ResNet-18 Tucker-2's 8.4% -> 6.1% (session 29). Not on per-plane,
/// per-row or other cheap per-item loops (a bias add per image, thousands of planes): MaxPool's
/// per-plane loop went 3.0-3.6 -> 9.3-10.5 ms a step so.
pub(crate) fn part_len(n: usize) -> usize {
    const MAX_PARTS: usize = 16;
    n.div_ceil(MAX_PARTS).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector builds of [`wide_map`] give the SSE2 loop's results bit for bit, on the
    /// maps the engine sends through it (sigmoid, SiLU and its gradient, a residual ReLU), over
    /// ordinary values, both signs' extremes, infinities, subnormals and NaN, at lengths that
    /// leave vector remainders.
    #[test]
    fn wide_map_equals_the_plain_loop_bitwise() {
        let mut rng = crate::rng::Rng::new(5);
        let mut a: Vec<f32> = (0..4099).map(|_| 40.0 * rng.normal()).collect();
        let b: Vec<f32> = (0..4099).map(|_| rng.normal()).collect();
        let special = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            1e-40,
            -87.5,
            88.8,
        ];
        a[..special.len()].copy_from_slice(&special);
        let silu_grad = |x: f32, g: f32| {
            let s = act::sigmoid(x);
            g * (s + x * s * (1.0 - s))
        };
        type Map<'a> = &'a dyn Fn(&mut [MaybeUninit<f32>], &[f32], &[f32], bool);
        let maps: [Map; 3] = [
            &|o, a, b, plain| {
                let f = |x: f32, _| x * act::sigmoid(x);
                if plain {
                    wide_map_body(o, a, b, &f)
                } else {
                    wide_map(o, a, b, &f)
                }
            },
            &|o, a, b, plain| {
                if plain {
                    wide_map_body(o, a, b, &silu_grad)
                } else {
                    wide_map(o, a, b, &silu_grad)
                }
            },
            &|o, a, b, plain| {
                let f = |x: f32, y: f32| act::relu(x + y);
                if plain {
                    wide_map_body(o, a, b, &f)
                } else {
                    wide_map(o, a, b, &f)
                }
            },
        ];
        for (m, map) in maps.iter().enumerate() {
            for len in [4099, 4096, 17, 1] {
                let mut wide = vec![MaybeUninit::new(0.0f32); len];
                let mut plain = vec![MaybeUninit::new(0.0f32); len];
                map(&mut wide, &a[..len], &b[..len], false);
                map(&mut plain, &a[..len], &b[..len], true);
                // SAFETY: initialised above (and every entry rewritten by the maps).
                let (wide, plain) = unsafe {
                    (
                        wide.iter().map(|v| v.assume_init()).collect::<Vec<f32>>(),
                        plain.iter().map(|v| v.assume_init()).collect::<Vec<f32>>(),
                    )
                };
                for (i, (p, q)) in wide.iter().zip(&plain).enumerate() {
                    assert_eq!(
                        p.to_bits(),
                        q.to_bits(),
                        "map {m}, len {len}, [{i}]: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// Brute force over all output positions.
    fn valid_brute(n_out: usize, n_in: usize, s: usize, off: isize) -> (usize, usize) {
        let ok: Vec<usize> = (0..n_out)
            .filter(|&o| {
                let i = (o * s) as isize + off;
                i >= 0 && i < n_in as isize
            })
            .collect();
        match (ok.first(), ok.last()) {
            (Some(&a), Some(&b)) => (a, b + 1),
            _ => (0, 0),
        }
    }

    #[test]
    fn valid_range_matches_brute_force() {
        for n_out in 1..7 {
            for n_in in 1..7 {
                for s in 1..4 {
                    for off in -8..8 {
                        let (lo, hi) = valid_range(n_out, n_in, s, off);
                        let (blo, bhi) = valid_brute(n_out, n_in, s, off);
                        if bhi == 0 {
                            assert_eq!(lo, hi, "{n_out} {n_in} {s} {off}");
                        } else {
                            assert_eq!((lo, hi), (blo, bhi), "{n_out} {n_in} {s} {off}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn window_out_len_follows_pytorch() {
        // floor mode: (32 + 2 - 3) / 1 + 1
        assert_eq!(
            window_out_len("t", "h", 32, 3, 1, 1, 1, 1, false).unwrap(),
            32
        );
        assert_eq!(
            window_out_len("t", "h", 32, 3, 2, 1, 1, 1, false).unwrap(),
            16
        );
        // ceil mode: 5 with k=2 s=2 -> ceil(3/2)+1 = 3
        assert_eq!(window_out_len("t", "h", 5, 2, 2, 1, 0, 0, true).unwrap(), 3);
        // ceil mode dropping a window that would start in the end padding: in 4, k 2, s 2, pad 1+1
        // -> ceil((6-2)/2)+1 = 3, last window starts at 4 >= 4 + 1? no -> kept (starts at 3 in input)
        assert_eq!(window_out_len("t", "h", 4, 2, 2, 1, 1, 1, true).unwrap(), 3);
        // in 3, k 2, s 2, pad 0+1 (asymmetric) -> ceil((4-2)/2)+1 = 2
        assert_eq!(window_out_len("t", "h", 3, 2, 2, 1, 0, 1, true).unwrap(), 2);
        // PyTorch drop rule: in 5, k 3, s 3, pads 1+1, ceil: span 4 -> ceil(4/3)+1 = 3; last
        // window starts at 2*3 = 6 >= 5 + 1 -> dropped.
        assert_eq!(window_out_len("t", "h", 5, 3, 3, 1, 1, 1, true).unwrap(), 2);
        // dilation: extent 5
        assert_eq!(
            window_out_len("t", "h", 7, 3, 1, 2, 0, 0, false).unwrap(),
            3
        );
        assert!(window_out_len("t", "h", 2, 3, 1, 1, 0, 0, false).is_err());
        assert!(window_out_len("t", "h", 8, 3, 0, 1, 0, 0, false).is_err());
    }

    #[test]
    fn part_len_is_thread_independent() {
        assert_eq!(part_len(128), 8);
        assert_eq!(part_len(3), 1);
        assert_eq!(part_len(0), 1);
        assert_eq!(part_len(17), 2);
    }
}
