//! Shape-moving and elementwise ops the executor runs directly on `ArrayD<f32>`: broadcast
//! arithmetic, concat/split, slice, pad, transpose, reshape and mean reduction, each with its
//! backward. They are memory-bound one-liners over ndarray; the fast paths are same-shape
//! binary arithmetic (residual joins) and per-plane broadcasts (squeeze-excitation scales),
//! run in parallel. The tests check each backward against
//! finite differences.

use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice as NdSlice};
use rayon::prelude::*;

use super::{shape_err, Result};
use crate::engine::ops::{unzeroed, zeros};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    /// ONNX `PRelu`: the first operand where positive, else its product with the second (the
    /// slope, which broadcasts to the first).
    PRelu,
}

/// PRelu's forward: `x` where positive, else `s * x`.
#[inline(always)]
fn prelu(x: f32, s: f32) -> f32 {
    if x > 0.0 {
        x
    } else {
        s * x
    }
}

/// PRelu's gradients at `x` (slope `s`, output gradient `g`): `(d x, d s)`.
#[inline(always)]
fn prelu_grads(g: f32, x: f32, s: f32) -> (f32, f32) {
    if x > 0.0 {
        (g, 0.0)
    } else {
        (g * s, g * x)
    }
}

/// Sums `g` down to `shape` over the axes that broadcasting expanded.
pub fn reduce_to(g: ArrayD<f32>, shape: &[usize]) -> ArrayD<f32> {
    let mut g = g;
    while g.ndim() > shape.len() {
        g = g.sum_axis(Axis(0));
    }
    for (ax, &d) in shape.iter().enumerate() {
        if d == 1 && g.shape()[ax] != 1 {
            g = g.sum_axis(Axis(ax)).insert_axis(Axis(ax));
        }
    }
    g
}

pub fn binary_forward(op: BinOp, a: ArrayViewD<f32>, b: ArrayViewD<f32>) -> Result<ArrayD<f32>> {
    let shape = crate::ir::shape::broadcast(a.shape(), b.shape())
        .map_err(|e| shape_err("Binary", e.to_string()))?;
    // Same shapes, both contiguous (a residual join): one parallel pass. The general path below
    // copies `a` and then updates it on one thread; at two threads the residual Adds of a
    // ResNet-20 step took as long as at one (7 ms).
    if let (true, Some(xs), Some(ys)) = (a.shape() == b.shape(), a.as_slice(), b.as_slice()) {
        let out = match op {
            BinOp::Add => crate::engine::ops::par_zip_map(xs, ys, |x, y| x + y),
            BinOp::Sub => crate::engine::ops::par_zip_map(xs, ys, |x, y| x - y),
            BinOp::Mul => crate::engine::ops::par_zip_map(xs, ys, |x, y| x * y),
            BinOp::Div => crate::engine::ops::par_zip_map(xs, ys, |x, y| x / y),
            BinOp::PRelu => crate::engine::ops::par_zip_map(xs, ys, prelu),
        };
        return Ok(ArrayD::from_shape_vec(IxDyn(&shape), out).expect("same length"));
    }
    if let Some(y) = plane_forward(op, &a, &b) {
        return Ok(y);
    }
    let av = a.broadcast(IxDyn(&shape)).expect("broadcast shape");
    let bv = b.broadcast(IxDyn(&shape)).expect("broadcast shape");
    let mut out = av.to_owned();
    ndarray::Zip::from(&mut out).and(&bv).for_each(|o, &y| {
        *o = match op {
            BinOp::Add => *o + y,
            BinOp::Sub => *o - y,
            BinOp::Mul => *o * y,
            BinOp::Div => *o / y,
            BinOp::PRelu => prelu(*o, y),
        }
    });
    Ok(out)
}

/// Gradients of both operands, each summed to its own shape.
/// Gradients of both operands. Takes `dy` by value: for Add (and Sub's first operand) the
/// gradient *is* `dy`, so it moves instead of being copied, a whole activation per residual
/// join saved on every backward.
pub fn binary_backward(
    op: BinOp,
    a: ArrayViewD<f32>,
    b: ArrayViewD<f32>,
    dy: ArrayD<f32>,
) -> (ArrayD<f32>, ArrayD<f32>) {
    let dy = match plane_backward(op, &a, &b, dy) {
        Ok(grads) => return grads,
        Err(dy) => dy,
    };
    let shape = dy.shape().to_vec();
    let av = a.broadcast(IxDyn(&shape)).expect("broadcast shape");
    let bv = b.broadcast(IxDyn(&shape)).expect("broadcast shape");
    let (da, db) = match op {
        BinOp::Add => (par_clone(&dy), dy),
        BinOp::Sub => (par_clone(&dy), -dy),
        BinOp::Mul => (&dy * &bv, dy * &av),
        BinOp::Div => {
            let da = &dy / &bv;
            let mut db = dy;
            ndarray::Zip::from(&mut db)
                .and(&av)
                .and(&bv)
                .for_each(|g, &x, &y| *g = -*g * x / (y * y));
            (da, db)
        }
        BinOp::PRelu => {
            let mut da = dy;
            let mut db = ArrayD::zeros(da.raw_dim());
            ndarray::Zip::from(&mut da)
                .and(&mut db)
                .and(&av)
                .and(&bv)
                .for_each(|ga, gb, &x, &s| (*ga, *gb) = prelu_grads(*ga, x, s));
            (da, db)
        }
    };
    (reduce_to(da, a.shape()), reduce_to(db, b.shape()))
}

/// A copy of `x`, in parallel chunks when contiguous: `clone` is one `memcpy` on the calling
/// thread, and Add's backward (every residual connection) copies its output gradient once per
/// step; at 2 threads the serial copy held Add+Relu's backward to 1.3x its 1-thread speed
/// (ResNet-20 Tucker-2, batch 128).
fn par_clone(x: &ArrayD<f32>) -> ArrayD<f32> {
    let Some(xs) = x.as_slice() else {
        return x.clone();
    };
    // SAFETY: the kernel writes every entry of its output chunk.
    let out = unsafe {
        crate::engine::ops::par_zip_chunks(xs, xs, |o, a, _| {
            for (o, &a) in o.iter_mut().zip(a) {
                o.write(a);
            }
        })
    };
    ArrayD::from_shape_vec(x.raw_dim(), out).expect("same length")
}

/// How `small` broadcasts onto `big` plane by plane: `(reps, plane)` when `small`'s shape,
/// with 1s prepended to `big`'s rank, is 1s, then `big`'s axes, then 1s: `plane` elements of
/// `big` share one element of `small`, and `small` repeats `reps` times along `big`.
/// `[N, C, 1, 1]` against `[N, C, H, W]` (squeeze-excitation's per-image scale) is `(1, H W)`;
/// `[C, 1, 1]` or `[1, C, 1, 1]` (GroupNorm's weight and bias as PyTorch exports them, a
/// PReLU slope, a layer scale) is `(N, H W)`.
fn plane_of(big: &[usize], small: &[usize]) -> Option<(usize, usize)> {
    if small.len() > big.len() || big == small {
        return None;
    }
    let full: Vec<usize> = std::iter::repeat_n(1, big.len() - small.len())
        .chain(small.iter().copied())
        .collect();
    let k = full.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
    let j = full.iter().position(|&d| d != 1).unwrap_or(k);
    if big[j..k] != full[j..k] {
        return None;
    }
    let reps: usize = big[..j].iter().product();
    let plane: usize = big[k..].iter().product();
    (plane > 1).then_some((reps, plane))
}

/// `small` repeated `reps` times (borrowed when once), so that a repeated operand runs the
/// per-plane loops of one that is not.
fn repeated(small: &[f32], reps: usize) -> std::borrow::Cow<'_, [f32]> {
    if reps == 1 {
        std::borrow::Cow::Borrowed(small)
    } else {
        std::borrow::Cow::Owned(
            std::iter::repeat_n(small, reps)
                .flatten()
                .copied()
                .collect(),
        )
    }
}

/// Planes per parallel task of `total` elements: about [`crate::engine::ops::elemwise_chunk`]
/// elements, whole planes (so each plane's sum is one task's, whatever the split).
fn planes_per_task(plane: usize, total: usize) -> usize {
    (crate::engine::ops::elemwise_chunk(total) / plane).max(1)
}

/// The per-plane broadcast (see [`plane_of`]) in one parallel pass, for contiguous operands;
/// `None` for other shapes. Elementwise the same arithmetic as the general path, so bitwise
/// equal to it. The general path copies the broadcast operand first and runs on one thread:
/// EfficientNet-B0's squeeze-excitation Muls took 8% of its training step through it.
fn plane_forward(op: BinOp, a: &ArrayViewD<f32>, b: &ArrayViewD<f32>) -> Option<ArrayD<f32>> {
    let (xs, ys) = (a.as_slice()?, b.as_slice()?);
    let (big_is_a, (reps, plane)) = match plane_of(a.shape(), b.shape()) {
        Some(p) => (true, p),
        None => (false, plane_of(b.shape(), a.shape())?),
    };
    let (big, small, shape) = if big_is_a {
        (xs, ys, a.raw_dim())
    } else {
        (ys, xs, b.raw_dim())
    };
    let small = &*repeated(small, reps);
    // One instance of `plane_map` per rule (`x` the big operand's element, `s` the plane's
    // value), so that the rule inlines into a plain loop: with the op matched per element
    // inside the loop, whether it vectorised was up to the optimiser's unswitching, and
    // MobileNet-V3-Small's squeeze-excitation Mul forward ran 0.8 or 1.8 ms a step (1 thread)
    // depending on code elsewhere in the build.
    let out = match (op, big_is_a) {
        (BinOp::Add, true) => plane_map(big, small, plane, |x, s| x + s),
        (BinOp::Add, false) => plane_map(big, small, plane, |x, s| s + x),
        (BinOp::Sub, true) => plane_map(big, small, plane, |x, s| x - s),
        (BinOp::Sub, false) => plane_map(big, small, plane, |x, s| s - x),
        (BinOp::Mul, true) => plane_map(big, small, plane, |x, s| x * s),
        (BinOp::Mul, false) => plane_map(big, small, plane, |x, s| s * x),
        (BinOp::Div, true) => plane_map(big, small, plane, |x, s| x / s),
        (BinOp::Div, false) => plane_map(big, small, plane, |x, s| s / x),
        (BinOp::PRelu, true) => plane_map(big, small, plane, prelu),
        // The slope bigger than the input: not a valid PRelu (the shape rule of `ir::shape`
        // refuses such a graph before it runs).
        (BinOp::PRelu, false) => return None,
    };
    Some(ArrayD::from_shape_vec(shape, out).expect("same length"))
}

/// `out[i] = f(big[i], small[i / plane])` in parallel over whole planes.
fn plane_map(
    big: &[f32],
    small: &[f32],
    plane: usize,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    let mut out = unzeroed(big.len());
    let k = planes_per_task(plane, big.len());
    out.par_chunks_mut(k * plane)
        .zip(big.par_chunks(k * plane))
        .zip(small.par_chunks(k))
        .for_each(|((o, g), s)| {
            for ((o, g), &s) in o.chunks_mut(plane).zip(g.chunks(plane)).zip(s) {
                o.iter_mut().zip(g).for_each(|(o, &g)| *o = f(g, s));
            }
        });
    out
}

/// Gradients of [`plane_forward`]'s cases: the big operand's elementwise, the small one's one
/// sum per plane (in order, so reproducible). Hands `dy` back for other shapes.
fn plane_backward(
    op: BinOp,
    a: &ArrayViewD<f32>,
    b: &ArrayViewD<f32>,
    dy: ArrayD<f32>,
) -> std::result::Result<(ArrayD<f32>, ArrayD<f32>), ArrayD<f32>> {
    let (Some(xs), Some(ys), Some(gs)) = (a.as_slice(), b.as_slice(), dy.as_slice()) else {
        return Err(dy);
    };
    let (big_is_a, (reps, plane)) = match (
        plane_of(a.shape(), b.shape()),
        plane_of(b.shape(), a.shape()),
    ) {
        (Some(p), _) => (true, p),
        (None, Some(p)) => (false, p),
        (None, None) => return Err(dy),
    };
    let (big, small) = if big_is_a { (xs, ys) } else { (ys, xs) };
    if gs.len() != big.len() {
        return Err(dy);
    }
    let m = small.len();
    let small = &*repeated(small, reps);
    // d(big) elementwise and d(small) per plane, as functions of (dy, big, small); each pair
    // of rules is its own instance of `plane_grads`, so the rules inline into its loops.
    let (d_big, d_small) = match (op, big_is_a) {
        (BinOp::Add, _) => plane_grads(gs, big, small, plane, |g, _, _| g, |g, _, _| g),
        (BinOp::Sub, true) => plane_grads(gs, big, small, plane, |g, _, _| g, |g, _, _| -g),
        (BinOp::Sub, false) => plane_grads(gs, big, small, plane, |g, _, _| -g, |g, _, _| g),
        (BinOp::Mul, _) => plane_grads(gs, big, small, plane, |g, _, s| g * s, |g, x, _| g * x),
        // a / b with a big: da = g / b, db = -g a / b^2 (summed per plane).
        (BinOp::Div, true) => plane_grads(
            gs,
            big,
            small,
            plane,
            |g, _, s| g / s,
            |g, x, s| -g * x / (s * s),
        ),
        // a / b with b big: db = -g a / b^2, da = g / b (summed per plane).
        (BinOp::Div, false) => plane_grads(
            gs,
            big,
            small,
            plane,
            |g, x, s| -g * s / (x * x),
            |g, x, _| g / x,
        ),
        (BinOp::PRelu, true) => plane_grads(
            gs,
            big,
            small,
            plane,
            |g, x, s| prelu_grads(g, x, s).0,
            |g, x, s| prelu_grads(g, x, s).1,
        ),
        (BinOp::PRelu, false) => return Err(dy),
    };
    let d_big = ArrayD::from_shape_vec(dy.raw_dim(), d_big).expect("same length");
    // A repeated operand's gradient: its repetitions' sums added in order (reproducible).
    let d_small = if reps == 1 {
        d_small
    } else {
        let mut sum = d_small[..m].to_vec();
        for rep in d_small[m..].chunks_exact(m) {
            sum.iter_mut().zip(rep).for_each(|(s, &v)| *s += v);
        }
        sum
    };
    let small_shape = if big_is_a { b.raw_dim() } else { a.raw_dim() };
    let d_small = ArrayD::from_shape_vec(small_shape, d_small).expect("one per plane");
    Ok(if big_is_a {
        (d_big, d_small)
    } else {
        (d_small, d_big)
    })
}

/// [`plane_backward`]'s two results for one pair of rules: `dbig(g, x, s)` per element of the
/// big operand, `dsmall(g, x, s)` summed per plane in eight lanes ([`reduce_pairs`]; one running
/// sum is a chain of dependent adds, and behind a function pointer neither loop vectorised:
/// EfficientNet-B0's squeeze-excitation Mul backward took 14% of its training step).
fn plane_grads(
    gs: &[f32],
    big: &[f32],
    small: &[f32],
    plane: usize,
    dbig: impl Fn(f32, f32, f32) -> f32 + Sync,
    dsmall: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> (Vec<f32>, Vec<f32>) {
    use crate::engine::ops::reduce_pairs;
    use rayon::prelude::*;
    let k = planes_per_task(plane, big.len());
    let mut d_big = unzeroed(big.len());
    let mut d_small = vec![0.0f32; small.len()];
    d_big
        .par_chunks_mut(k * plane)
        .zip(d_small.par_chunks_mut(k))
        .zip(gs.par_chunks(k * plane).zip(big.par_chunks(k * plane)))
        .zip(small.par_chunks(k))
        .for_each(|(((db, ds), (g, x)), s)| {
            for ((((db, ds), g), x), &s) in db
                .chunks_mut(plane)
                .zip(ds)
                .zip(g.chunks(plane))
                .zip(x.chunks(plane))
                .zip(s)
            {
                for ((d, &g), &x) in db.iter_mut().zip(g).zip(x) {
                    *d = dbig(g, x, s);
                }
                *ds = reduce_pairs(g, x, |g, x| dsmall(g, x, s));
            }
        });
    (d_big, d_small)
}

/// `max(0, a + b)` in one pass: a residual join and the ReLU after it (the program's fusion pass
/// makes this one step, so the sum before the ReLU is never stored). Same-shape contiguous
/// operands take one parallel pass; others broadcast through [`binary_forward`] first. Bitwise
/// the Add op followed by the Relu op.
pub fn add_relu_forward(a: ArrayViewD<f32>, b: ArrayViewD<f32>) -> Result<ArrayD<f32>> {
    if let (true, Some(xs), Some(ys)) = (a.shape() == b.shape(), a.as_slice(), b.as_slice()) {
        let out =
            crate::engine::ops::par_zip_map(xs, ys, |x, y| crate::engine::ops::act::relu(x + y));
        return Ok(ArrayD::from_shape_vec(a.raw_dim(), out).expect("same length"));
    }
    let mut y = binary_forward(BinOp::Add, a, b)?;
    y.mapv_inplace(crate::engine::ops::act::relu);
    Ok(y)
}

/// Gradients of [`add_relu_forward`] from its output `z`: the ReLU passes `dz` where `z > 0`
/// (which is exactly where the sum was positive: `max(s, 0) > 0` iff `s > 0`, NaN included),
/// then the Add hands the masked gradient to both operands, each summed to its own shape.
pub fn add_relu_backward(
    a: ArrayViewD<f32>,
    b: ArrayViewD<f32>,
    z: ArrayViewD<f32>,
    dz: ArrayD<f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    if z.shape() != dz.shape() {
        return Err(shape_err(
            "Add+Relu",
            format!(
                "output {:?} and its gradient {:?} differ",
                z.shape(),
                dz.shape()
            ),
        ));
    }
    if a.shape() == z.shape() && b.shape() == z.shape() {
        let mut dz = dz;
        if let (Some(zs), Some(gs)) = (z.as_slice(), dz.as_slice_mut()) {
            let db = mask_in_place_and_copy(zs, gs);
            let db = ArrayD::from_shape_vec(dz.raw_dim(), db).expect("same length");
            return Ok((dz, db));
        }
        return add_relu_backward_masked(a, b, z, dz);
    }
    add_relu_backward_masked(a, b, z, dz)
}

/// Same-shape Add+Relu backward in one pass: `g` becomes the masked gradient in place (`g`
/// where `z > 0`, else 0.0), and a copy of it comes back, the other operand's gradient. The
/// general path below reads and writes the whole tensor three times (mask into a new buffer,
/// then Add's copy of it); every residual connection of a ResNet runs this once per step.
fn mask_in_place_and_copy(z: &[f32], g: &mut [f32]) -> Vec<f32> {
    assert_eq!(z.len(), g.len(), "output and its gradient differ in length");
    let n = z.len();
    let chunk = crate::engine::ops::elemwise_chunk(n);
    let mut copy: Vec<f32> = Vec::with_capacity(n);
    copy.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk)
        .zip(g.par_chunks_mut(chunk).zip(z.par_chunks(chunk)))
        .for_each(|(c, (g, z))| {
            for ((c, g), &z) in c.iter_mut().zip(g.iter_mut()).zip(z) {
                let v = if z > 0.0 { *g } else { 0.0 };
                *g = v;
                c.write(v);
            }
        });
    // SAFETY: the chunks of `copy[..n]`, `g` and `z` pair up one to one with equal lengths, and
    // the loop writes every entry of each chunk of `copy`.
    unsafe { copy.set_len(n) };
    copy
}

/// [`add_relu_backward`]'s general path (broadcast operands, non-contiguous tensors): the
/// mask, then Add's backward.
fn add_relu_backward_masked(
    a: ArrayViewD<f32>,
    b: ArrayViewD<f32>,
    z: ArrayViewD<f32>,
    dz: ArrayD<f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    let masked = match (z.as_slice(), dz.as_slice()) {
        (Some(zs), Some(gs)) => {
            let m = crate::engine::ops::par_zip_map(zs, gs, |z, g| if z > 0.0 { g } else { 0.0 });
            ArrayD::from_shape_vec(dz.raw_dim(), m).expect("same length")
        }
        _ => {
            let mut m = dz;
            ndarray::Zip::from(&mut m)
                .and(&z)
                .for_each(|g, &z| *g = if z > 0.0 { *g } else { 0.0 });
            m
        }
    };
    Ok(binary_backward(BinOp::Add, a, b, masked))
}

/// Concatenates along `axis`. Inputs in standard layout go by block copy (`concat_blocks`);
/// others through ndarray's generic concatenate, the reference the tests hold it to.
pub fn concat(axis: usize, xs: &[ArrayViewD<f32>]) -> Result<ArrayD<f32>> {
    let same_frame = xs.first().is_some_and(|x0| {
        axis < x0.ndim()
            && xs.iter().all(|x| {
                x.ndim() == x0.ndim()
                    && (0..x0.ndim()).all(|d| d == axis || x.shape()[d] == x0.shape()[d])
            })
    });
    if same_frame && xs.iter().all(|x| x.is_standard_layout()) {
        return Ok(concat_blocks(axis, xs));
    }
    ndarray::concatenate(Axis(axis), xs).map_err(|e| shape_err("Concat", e.to_string()))
}

/// Concat of standard-layout inputs that agree off `axis`: for each index of the dimensions
/// before `axis` (an image, for a channel concat), each input's contiguous run in turn, the
/// images in parallel, the output never zero-filled. DenseNet concatenates all earlier
/// features at every layer, so its copies grow with the square of the depth: through
/// ndarray's generic concatenate they took 19% of a DenseNet-121 step (and Split, its
/// backward, 21%).
fn concat_blocks(axis: usize, xs: &[ArrayViewD<f32>]) -> ArrayD<f32> {
    let mut shape = xs[0].shape().to_vec();
    shape[axis] = xs.iter().map(|x| x.shape()[axis]).sum();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let runs: Vec<usize> = xs.iter().map(|x| x.shape()[axis] * inner).collect();
    let row: usize = runs.iter().sum();
    let srcs: Vec<&[f32]> = xs
        .iter()
        .map(|x| x.as_slice().expect("standard layout"))
        .collect();
    // SAFETY: each row is written whole: the inputs' runs fill it one after the other.
    let out = unsafe {
        fill_rows(outer * row, row, |o, dst| {
            let mut at = 0;
            for (src, &r) in srcs.iter().zip(&runs) {
                write_run(&mut dst[at..at + r], &src[o * r..(o + 1) * r]);
                at += r;
            }
        })
    };
    ArrayD::from_shape_vec(IxDyn(&shape), out).expect("the shape covers the data")
}

/// Below this many elements, copies stay on the calling thread.
const PAR_COPY_MIN: usize = 1 << 16;

/// A vector of `n` elements written row by row (`row` elements each) by `fill(index, row)`,
/// the rows in parallel from [`PAR_COPY_MIN`] elements on, never zero-filled first.
///
/// # Safety
/// `fill` must write every element of the row it is given.
unsafe fn fill_rows(
    n: usize,
    row: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if row > 0 {
        let dst = &mut out.spare_capacity_mut()[..n];
        if n >= PAR_COPY_MIN {
            dst.par_chunks_mut(row)
                .enumerate()
                .for_each(|(i, d)| fill(i, d));
        } else {
            dst.chunks_mut(row)
                .enumerate()
                .for_each(|(i, d)| fill(i, d));
        }
    }
    // SAFETY: `n` is within the capacity, and the caller's `fill` wrote every row of it (with
    // `row` 0, `n` is 0 too: no row, no element).
    unsafe { out.set_len(n) };
    out
}

fn write_run(dst: &mut [std::mem::MaybeUninit<f32>], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: equal lengths (checked), distinct allocations; f32 has no invalid bit patterns.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<f32>(), src.len())
    };
}

/// Splits `g` along `axis` into parts of the given sizes (Concat's backward, Split's forward).
pub fn split(axis: usize, sizes: &[usize], g: ArrayViewD<f32>) -> Result<Vec<ArrayD<f32>>> {
    if axis >= g.ndim() || sizes.iter().sum::<usize>() != g.shape()[axis] {
        return Err(shape_err(
            "Split",
            format!(
                "sizes {sizes:?} do not cover axis {axis} of {:?}",
                g.shape()
            ),
        ));
    }
    if let Some(src) = g.as_slice().filter(|_| g.is_standard_layout()) {
        return Ok(split_blocks(axis, sizes, g.shape(), src));
    }
    let mut start = 0;
    Ok(sizes
        .iter()
        .map(|&s| {
            let part = g
                .slice_axis(Axis(axis), NdSlice::from(start..start + s))
                .to_owned();
            start += s;
            part
        })
        .collect())
}

/// [`split`] of a standard-layout `src`: each part gathers its run of every row (image), the
/// rows in parallel ([`concat_blocks`] in reverse).
fn split_blocks(axis: usize, sizes: &[usize], shape: &[usize], src: &[f32]) -> Vec<ArrayD<f32>> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let row = shape[axis] * inner;
    let mut start = 0;
    sizes
        .iter()
        .map(|&size| {
            let (r, at) = (size * inner, start);
            start += r;
            // SAFETY: write_run fills the row whole (its lengths are checked equal).
            let out = unsafe {
                fill_rows(outer * r, r, |o, dst| {
                    write_run(dst, &src[o * row + at..o * row + at + r]);
                })
            };
            let mut part_shape = shape.to_vec();
            part_shape[axis] = size;
            ArrayD::from_shape_vec(IxDyn(&part_shape), out).expect("the shape covers the data")
        })
        .collect()
}

/// Selects the given index list on every axis (Slice's forward). Lists that are runs of
/// consecutive indices (every step-1 slice: ShuffleNet's channel split) are a window of `x`,
/// copied row by row ([`to_standard`]); other steps go through `select`, axis by axis.
pub fn take(x: ArrayViewD<f32>, idx: &[Vec<usize>]) -> ArrayD<f32> {
    if let Some(win) = unit_windows(idx) {
        return to_standard(x.slice_each_axis(|ax| win[ax.axis.index()]));
    }
    let mut out = x.to_owned();
    for (ax, list) in idx.iter().enumerate() {
        if list.len() != out.shape()[ax] || list.iter().enumerate().any(|(i, &j)| i != j) {
            out = out.select(Axis(ax), list);
        }
    }
    out
}

/// Each axis's index list as a slice when every list is a run of consecutive indices.
fn unit_windows(idx: &[Vec<usize>]) -> Option<Vec<NdSlice>> {
    idx.iter()
        .map(|l| {
            let s = l.first().copied().unwrap_or(0);
            l.iter()
                .enumerate()
                .all(|(i, &j)| j == s + i)
                .then(|| NdSlice::from(s..s + l.len()))
        })
        .collect()
}

/// Scatters `g` back to the positions `take` read from (Slice's backward): a window of zeros
/// assigned at once for runs of consecutive indices, element by element otherwise (where an
/// index list may repeat an index, whose gradients then add up).
pub fn take_backward(x_shape: &[usize], idx: &[Vec<usize>], g: ArrayViewD<f32>) -> ArrayD<f32> {
    let mut out = ArrayD::<f32>::zeros(IxDyn(x_shape));
    if let Some(win) = unit_windows(idx) {
        out.slice_each_axis_mut(|ax| win[ax.axis.index()])
            .assign(&g);
        return out;
    }
    let rank = x_shape.len();
    let mut pos = vec![0usize; rank];
    let mut src = vec![0usize; rank];
    for (k, &v) in g.iter().enumerate() {
        let mut rem = k;
        for ax in (0..rank).rev() {
            let d = g.shape()[ax];
            pos[ax] = rem % d;
            rem /= d;
            src[ax] = idx[ax][pos[ax]];
        }
        out[IxDyn(&src)] += v;
    }
    out
}

/// Constant padding; `pads` holds (begin, end) per axis, negative values crop.
pub fn pad(x: ArrayViewD<f32>, pads: &[(i64, i64)], value: f32) -> ArrayD<f32> {
    let out_shape: Vec<usize> = x
        .shape()
        .iter()
        .zip(pads)
        .map(|(&d, &(b, e))| (d as i64 + b + e) as usize)
        .collect();
    let mut out = ArrayD::<f32>::from_elem(IxDyn(&out_shape), value);
    let (src, dst) = pad_windows(x.shape(), pads);
    let mut xs = x.view();
    let mut os = out.view_mut();
    for ax in 0..x.ndim() {
        xs.slice_axis_inplace(Axis(ax), src[ax]);
        os.slice_axis_inplace(Axis(ax), dst[ax]);
    }
    os.assign(&xs);
    out
}

pub fn pad_backward(x_shape: &[usize], pads: &[(i64, i64)], g: ArrayViewD<f32>) -> ArrayD<f32> {
    let mut out = ArrayD::<f32>::zeros(IxDyn(x_shape));
    let (src, dst) = pad_windows(x_shape, pads);
    let mut gs = g.view();
    let mut os = out.view_mut();
    for ax in 0..x_shape.len() {
        gs.slice_axis_inplace(Axis(ax), dst[ax]);
        os.slice_axis_inplace(Axis(ax), src[ax]);
    }
    os.assign(&gs);
    out
}

/// The ranges of the input and of the padded output that hold the same elements.
fn pad_windows(x_shape: &[usize], pads: &[(i64, i64)]) -> (Vec<NdSlice>, Vec<NdSlice>) {
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for (&d, &(b, e)) in x_shape.iter().zip(pads) {
        let d = d as i64;
        let s0 = (-b).max(0);
        let s1 = d - (-e).max(0);
        let o0 = b.max(0);
        src.push(NdSlice::from(s0 as usize..s1.max(s0) as usize));
        dst.push(NdSlice::from(o0 as usize..(o0 + (s1 - s0).max(0)) as usize));
    }
    (src, dst)
}

pub fn transpose(x: ArrayViewD<f32>, perm: &[usize]) -> ArrayD<f32> {
    to_standard(x.permuted_axes(IxDyn(perm)))
}

/// A copy of `v` in standard layout. When its innermost axes are contiguous in memory (a
/// channel shuffle's transpose keeps each H x W plane whole; a channel slice keeps whole
/// planes) the copy goes run by run, the images in parallel; ndarray's generic
/// `as_standard_layout` otherwise. Through that generic copy ShuffleNet's Transpose, Slice and
/// Reshape took half of its training step.
pub fn to_standard(v: ArrayViewD<f32>) -> ArrayD<f32> {
    if let Some(s) = v.as_slice() {
        return ArrayD::from_shape_vec(v.raw_dim(), s.to_vec()).expect("same shape");
    }
    let (shape, strides) = (v.shape(), v.strides());
    // The trailing axes that lie contiguously: `run` elements per innermost block.
    let (mut run, mut k) = (1usize, shape.len());
    while k > 0 && (shape[k - 1] == 1 || strides[k - 1] == run as isize) {
        run *= shape[k - 1];
        k -= 1;
    }
    if run < 16 || k == 0 {
        return v.as_standard_layout().into_owned();
    }
    let n = v.len();
    // Copies the runs of `sub` (axes 0..k of it outer, in standard order) into `dst`.
    let copy_runs = |sub: ArrayViewD<f32>, dst: &mut [std::mem::MaybeUninit<f32>]| {
        let outer = &sub.shape()[..sub.ndim() - (shape.len() - k)];
        let st = &sub.strides()[..outer.len()];
        let mut at = vec![0usize; outer.len()];
        for row in dst.chunks_mut(run) {
            let off: isize = at.iter().zip(st).map(|(&i, &s)| i as isize * s).sum();
            // SAFETY: `off` addresses a row of `run` contiguous elements inside `sub` (the
            // trailing axes are contiguous; every outer index is within its axis).
            let src = unsafe { std::slice::from_raw_parts(sub.as_ptr().offset(off), run) };
            write_run(row, src);
            for d in (0..at.len()).rev() {
                at[d] += 1;
                if at[d] < outer[d] {
                    break;
                }
                at[d] = 0;
            }
        }
    };
    // SAFETY: copy_runs writes every run of the part it is given (part length / run rows).
    let out = unsafe {
        if shape[0] > 1 && k > 1 {
            fill_rows(n, n / shape[0], |i, d| {
                copy_runs(v.index_axis(Axis(0), i), d)
            })
        } else {
            fill_rows(n, n, |_, d| copy_runs(v.view(), d))
        }
    };
    ArrayD::from_shape_vec(IxDyn(shape), out).expect("the shape covers the data")
}

pub fn inverse_perm(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

pub fn reshape(x: ArrayViewD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    // The copy in parallel chunks: GroupNorm's exports reshape whole activations twice a
    // layer, and a one-thread `to_vec` left the other thread idle (0.8 ms of a 28 ms step).
    let data: Vec<f32> = match x.as_slice() {
        // SAFETY: the kernel writes every entry of its output chunk.
        Some(s) => unsafe {
            crate::engine::ops::par_zip_chunks(s, s, |o, a, _| {
                for (o, &a) in o.iter_mut().zip(a) {
                    o.write(a);
                }
            })
        },
        None => to_standard(x.view()).into_raw_vec_and_offset().0,
    };
    ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|_| {
        shape_err(
            "Reshape",
            format!("cannot reshape {:?} to {shape:?}", x.shape()),
        )
    })
}

/// [`reshape`] of an array the caller gives up: the same buffer under the new shape when it is
/// in standard layout (a Reshape's backward hands its output gradient on this way, no copy).
pub fn reshape_owned(x: ArrayD<f32>, shape: &[usize]) -> Result<ArrayD<f32>> {
    if !x.is_standard_layout() {
        return reshape(x.view(), shape);
    }
    let from = x.shape().to_vec();
    x.into_shape_with_order(IxDyn(shape))
        .map_err(|_| shape_err("Reshape", format!("cannot reshape {from:?} to {shape:?}")))
}

/// Mean over `axes` (sorted, unique), keeping them as size-1 axes.
/// Over trailing axes of a standard-layout input (the dynamo exporter's form of global average
/// pooling: ReduceMean over [2, 3], keepdims) each mean is one contiguous block, summed as
/// GlobalAveragePool sums its planes, the blocks in parallel; the general case sums axis by
/// axis. Through the general case the squeeze-excitation pools of EfficientNet-B0 from the
/// dynamo exporter took a fifth of its training step.
pub fn reduce_mean(x: ArrayViewD<f32>, axes: &[usize]) -> ArrayD<f32> {
    if let (Some(group), Some(xs)) = (trailing_group(x.shape(), axes), x.as_slice()) {
        let y: Vec<f32> = xs
            .par_chunks(group)
            .map(|p| crate::engine::ops::sum(p) / group as f32)
            .collect();
        let kept: Vec<usize> = kept_shape(x.shape(), axes);
        return ArrayD::from_shape_vec(IxDyn(&kept), y).expect("one value per block");
    }
    let mut out = x.to_owned();
    let mut count = 1usize;
    for &ax in axes {
        count *= out.shape()[ax];
        out = out.sum_axis(Axis(ax)).insert_axis(Axis(ax));
    }
    out.mapv_inplace(|v| v / count as f32);
    out
}

/// The block size when `axes` are the trailing axes of `shape` (sorted, unique) and not empty.
fn trailing_group(shape: &[usize], axes: &[usize]) -> Option<usize> {
    let k = shape.len().checked_sub(axes.len())?;
    let trailing = !axes.is_empty() && axes.iter().enumerate().all(|(i, &a)| a == k + i);
    let group: usize = shape[k..].iter().product();
    (trailing && group > 0).then_some(group)
}

fn kept_shape(shape: &[usize], axes: &[usize]) -> Vec<usize> {
    shape
        .iter()
        .enumerate()
        .map(|(i, &d)| if axes.contains(&i) { 1 } else { d })
        .collect()
}

pub fn reduce_mean_backward(x_shape: &[usize], axes: &[usize], g: ArrayViewD<f32>) -> ArrayD<f32> {
    let count: usize = axes.iter().map(|&a| x_shape[a]).product();
    let n: usize = x_shape.iter().product();
    let blocks = trailing_group(x_shape, axes).zip(g.as_slice());
    if let Some((group, gs)) = blocks.filter(|&(group, gs)| gs.len() * group == n) {
        let inv = 1.0 / group as f32;
        let mut dx = zeros(n);
        dx.par_chunks_mut(group)
            .zip(gs.par_iter())
            .for_each(|(d, &v)| d.fill(v * inv));
        return ArrayD::from_shape_vec(IxDyn(x_shape), dx).expect("dx has the input's length");
    }
    let kept = kept_shape(x_shape, axes);
    let g = g
        .into_shape_with_order(IxDyn(&kept))
        .expect("kept-dims gradient");
    g.broadcast(IxDyn(x_shape))
        .expect("broadcast back")
        .mapv(|v| v / count as f32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand(shape: &[usize], seed: u64) -> ArrayD<f32> {
        let mut r = Rng::new(seed);
        ArrayD::from_shape_fn(IxDyn(shape), |_| r.range(-1.0, 1.0))
    }

    /// Central differences of L = sum(f(x) * w) in f64 arithmetic on f32 data.
    fn check_grad(
        x: &ArrayD<f32>,
        f: &dyn Fn(&ArrayD<f32>) -> ArrayD<f32>,
        analytic: &ArrayD<f32>,
    ) {
        let y = f(x);
        let w = rand(y.shape(), 99);
        let loss = |x: &ArrayD<f32>| -> f64 {
            f(x).iter()
                .zip(w.iter())
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum()
        };
        let _ = loss(x);
        let mut worst = 0.0f64;
        for i in 0..x.len() {
            let mut xp = x.clone();
            let mut xm = x.clone();
            let eps = 1e-2f32;
            xp.as_slice_mut().unwrap()[i] += eps;
            xm.as_slice_mut().unwrap()[i] -= eps;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * eps as f64);
            let an = analytic.as_slice().unwrap()[i] as f64;
            worst = worst.max((fd - an).abs() / (fd.abs().max(an.abs()).max(1e-2)));
        }
        assert!(worst < 1e-3, "relative error {worst}");
    }

    fn weights_for(y: &ArrayD<f32>) -> ArrayD<f32> {
        rand(y.shape(), 99)
    }

    #[test]
    fn same_shape_binary_fast_path_equals_elementwise_and_strided_inputs() {
        let mut r = crate::rng::Rng::new(4);
        let shape = [3, 5, 7, 11];
        let a = ArrayD::from_shape_fn(IxDyn(&shape), |_| r.normal());
        let b = ArrayD::from_shape_fn(IxDyn(&shape), |_| r.normal() + 3.0);
        // A non-contiguous copy of `b` takes the general path.
        let bt = b.t().to_owned();
        let b_strided = bt.t();
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
            let fast = binary_forward(op, a.view(), b.view()).unwrap();
            let general = binary_forward(op, a.view(), b_strided.view()).unwrap();
            let want = match op {
                BinOp::Add => &a + &b,
                BinOp::Sub => &a - &b,
                BinOp::Mul => &a * &b,
                BinOp::Div => &a / &b,
                BinOp::PRelu => unreachable!("not in the list"),
            };
            assert_eq!(fast, want, "{op:?}");
            assert_eq!(general, want, "{op:?}");
        }
    }

    /// The fused Add + ReLU is bitwise Add then Relu, forward and backward, same-shape and
    /// broadcast; its backward also matches finite differences away from the kink.
    #[test]
    fn add_relu_equals_add_then_relu_and_finite_differences() {
        use crate::engine::ops::Activation;
        let relu = Activation::Relu;
        // The last shape spans several parallel chunks of the same-shape single pass.
        for (sa, sb) in [
            (vec![2, 3, 4, 5], vec![2, 3, 4, 5]),
            (vec![2, 3, 4, 4], vec![1, 3, 1, 1]),
            (vec![3, 5, 40, 41], vec![3, 5, 40, 41]),
        ] {
            let a = rand(&sa, 5);
            let b = rand(&sb, 6);
            let y = binary_forward(BinOp::Add, a.view(), b.view()).unwrap();
            let z = relu.forward(y.view()).unwrap();
            let zf = add_relu_forward(a.view(), b.view()).unwrap();
            assert_eq!(zf, z, "forward {sa:?} + {sb:?}");
            assert!(z.iter().any(|&v| v == 0.0) && z.iter().any(|&v| v > 0.0));
            let dz = weights_for(&z);
            let dy = relu.backward(y.view(), dz.view()).unwrap();
            let (da, db) = binary_backward(BinOp::Add, a.view(), b.view(), dy);
            let (fa, fb) = add_relu_backward(a.view(), b.view(), zf.view(), dz.clone()).unwrap();
            assert_eq!((fa, fb), (da, db), "backward {sa:?} + {sb:?}");
        }
        // Finite differences, with every sum at least 0.1 from the kink (the step is 1e-2).
        let b = rand(&[2, 3, 4, 5], 8);
        let a = rand(&[2, 3, 4, 5], 7)
            .iter()
            .zip(b.iter())
            .map(|(&a, &b)| if (a + b).abs() < 0.1 { a + 0.3 } else { a })
            .collect::<Vec<_>>();
        let a = ArrayD::from_shape_vec(IxDyn(&[2, 3, 4, 5]), a).unwrap();
        let z = add_relu_forward(a.view(), b.view()).unwrap();
        let (da, db) = add_relu_backward(a.view(), b.view(), z.view(), weights_for(&z)).unwrap();
        check_grad(&a, &|x| add_relu_forward(x.view(), b.view()).unwrap(), &da);
        check_grad(&b, &|x| add_relu_forward(a.view(), x.view()).unwrap(), &db);
        assert!(add_relu_backward(a.view(), b.view(), z.view(), rand(&[2, 3], 1)).is_err());
    }

    /// Per-plane broadcasts (`[N, C, 1, 1]` with `[N, C, H, W]`, either side, and per-channel
    /// `[C, 1, 1]` / `[1, C, 1, 1]` repeated over the images) take the parallel path:
    /// forward bitwise equal to the general path (fed a non-contiguous copy),
    /// gradients equal to it within summation order and to finite differences.
    #[test]
    fn per_plane_broadcast_matches_general_path_and_finite_differences() {
        let big = rand(&[2, 3, 4, 5], 11);
        let small = rand(&[2, 3, 1, 1], 12).mapv(|v| v + 2.0);
        assert_eq!(plane_of(&[2, 3, 4, 5], &[2, 3, 1, 1]), Some((1, 20)));
        assert_eq!(plane_of(&[2, 3, 4, 5], &[1, 3, 1, 1]), Some((2, 20)));
        assert_eq!(plane_of(&[2, 3, 4, 5], &[3, 1, 1]), Some((2, 20)));
        assert_eq!(plane_of(&[2, 3, 4, 5], &[3, 4, 1]), Some((2, 5)));
        assert_eq!(plane_of(&[2, 3, 4, 5], &[2, 1, 1, 1]), Some((1, 60)));
        assert_eq!(plane_of(&[2, 3, 4, 5], &[2, 1, 4, 1]), None);
        assert_eq!(plane_of(&[2, 3, 4, 5], &[1, 1, 1, 5]), None);
        assert_eq!(plane_of(&[3, 1, 1], &[2, 3, 4, 5]), None);
        let per_channel = rand(&[3, 1, 1], 13).mapv(|v| v + 2.0);
        let per_channel4 = rand(&[1, 3, 1, 1], 14).mapv(|v| v + 2.0);
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
            for (a, b) in [
                (&big, &small),
                (&small.mapv(|v| v - 1.0), &big.mapv(|v| v + 3.0)),
                (&big, &per_channel),
                (&per_channel, &big.mapv(|v| v + 3.0)),
                (&big, &per_channel4),
            ] {
                assert!(plane_forward(op, &a.view(), &b.view()).is_some());
                let y = binary_forward(op, a.view(), b.view()).unwrap();
                // The general path: `b` as a transposed view is not contiguous.
                let bt = b.t().to_owned();
                let general = binary_forward(op, a.view(), bt.t()).unwrap();
                assert_eq!(y, general, "{op:?} forward");
                let w = weights_for(&y);
                let (da, db) = binary_backward(op, a.view(), b.view(), w.clone());
                let (ga, gb) = binary_backward(op, a.view(), bt.t(), w.clone());
                for (x, g) in [(&da, &ga), (&db, &gb)] {
                    assert_eq!(x.shape(), g.shape());
                    for (p, q) in x.iter().zip(g) {
                        assert!(
                            (p - q).abs() <= 1e-5 * q.abs().max(1.0),
                            "{op:?}: {p} vs {q}"
                        );
                    }
                }
                check_grad(a, &|x| binary_forward(op, x.view(), b.view()).unwrap(), &da);
                check_grad(b, &|x| binary_forward(op, a.view(), x.view()).unwrap(), &db);
            }
        }
    }

    /// PRelu (`BinOp::PRelu`) on each path the executor can take: slopes of the input's
    /// shape, per plane (`[N, C, 1, 1]`), per channel as PyTorch exports `nn.PReLU(C)`
    /// (`[C, 1, 1]`, the general broadcast) and one shared value (`[1]`): the forward equals
    /// the definition bit for bit, the gradients of both operands match finite differences
    /// (inputs kept 0.05 or more from the kink, farther than the difference step of 1e-2).
    #[test]
    fn prelu_forward_is_the_definition_and_gradients_match_finite_differences() {
        let shape = [2, 3, 4, 5];
        // Inputs at least 0.05 from 0, so a central difference never crosses the kink.
        let x = rand(&shape, 21).mapv(|v| if v.abs() < 0.05 { v + 0.1 } else { v });
        for slope_shape in [vec![2, 3, 4, 5], vec![2, 3, 1, 1], vec![3, 1, 1], vec![1]] {
            let s = rand(&slope_shape, 22).mapv(|v| 0.25 * v + 0.1);
            let y = binary_forward(BinOp::PRelu, x.view(), s.view()).unwrap();
            assert_eq!(y.shape(), &shape);
            let sb = s.broadcast(IxDyn(&shape)).unwrap();
            for ((&yv, &xv), &sv) in y.iter().zip(&x).zip(sb.iter()) {
                let want = if xv > 0.0 { xv } else { sv * xv };
                assert_eq!(yv.to_bits(), want.to_bits(), "{slope_shape:?}");
            }
            assert!(x.iter().any(|&v| v < 0.0) && x.iter().any(|&v| v > 0.0));
            let w = weights_for(&y);
            let (dx, ds) = binary_backward(BinOp::PRelu, x.view(), s.view(), w.clone());
            assert_eq!(ds.shape(), &slope_shape[..]);
            check_grad(
                &x,
                &|v| binary_forward(BinOp::PRelu, v.view(), s.view()).unwrap(),
                &dx,
            );
            check_grad(
                &s,
                &|v| binary_forward(BinOp::PRelu, x.view(), v.view()).unwrap(),
                &ds,
            );
        }
    }

    /// The owned reshape gives the copying one's result (standard and transposed inputs) and
    /// the same one-line error for a size that does not fit.
    #[test]
    fn owned_reshape_equals_the_copying_one() {
        let x = rand(&[2, 6, 5], 31);
        for input in [
            x.clone(),
            x.t().to_owned(),
            x.t().to_owned().reversed_axes(),
        ] {
            let want = reshape(input.view(), &[2, 3, 10]).unwrap();
            assert_eq!(reshape_owned(input.clone(), &[2, 3, 10]).unwrap(), want);
        }
        let bad = reshape_owned(x.t().to_owned().reversed_axes(), &[7, 9]).unwrap_err();
        assert!(bad.to_string().contains("cannot reshape"), "{bad}");
        let bad = reshape_owned(x, &[7, 9]).unwrap_err();
        assert!(
            bad.to_string()
                .contains("cannot reshape [2, 6, 5] to [7, 9]"),
            "{bad}"
        );
    }

    #[test]
    fn broadcast_binary_backward() {
        let a = rand(&[2, 3, 4, 4], 1);
        let b = rand(&[1, 3, 1, 1], 2).mapv(|v| v + 2.0);
        for op in [BinOp::Add, BinOp::Sub, BinOp::Mul, BinOp::Div] {
            let y = binary_forward(op, a.view(), b.view()).unwrap();
            let w = weights_for(&y);
            let (da, db) = binary_backward(op, a.view(), b.view(), w.clone());
            check_grad(
                &a,
                &|x| binary_forward(op, x.view(), b.view()).unwrap(),
                &da,
            );
            check_grad(
                &b,
                &|x| binary_forward(op, a.view(), x.view()).unwrap(),
                &db,
            );
        }
    }

    #[test]
    fn slice_pad_transpose_reduce_backward() {
        let x = rand(&[2, 5, 3, 4], 3);
        let idx = vec![vec![0, 1], vec![4, 2, 0], vec![1, 2], vec![0, 1, 2, 3]];
        let y = take(x.view(), &idx);
        let w = weights_for(&y);
        check_grad(
            &x,
            &|x| take(x.view(), &idx),
            &take_backward(x.shape(), &idx, w.view()),
        );

        let pads = [(0, 0), (1, -1), (2, 0), (-1, 3)];
        let y = pad(x.view(), &pads, 0.5);
        assert_eq!(y.shape(), &[2, 5, 5, 6]);
        let w = weights_for(&y);
        check_grad(
            &x,
            &|x| pad(x.view(), &pads, 0.5),
            &pad_backward(x.shape(), &pads, w.view()),
        );

        let perm = [0, 2, 3, 1];
        let y = transpose(x.view(), &perm);
        let w = weights_for(&y);
        let back = transpose(w.view(), &inverse_perm(&perm));
        check_grad(&x, &|x| transpose(x.view(), &perm), &back);

        let axes = [2, 3];
        let y = reduce_mean(x.view(), &axes);
        let w = weights_for(&y);
        check_grad(
            &x,
            &|x| reduce_mean(x.view(), &axes),
            &reduce_mean_backward(x.shape(), &axes, w.view()),
        );
    }

    /// The block copies against ndarray's generic concatenate and slicing (the reference), on
    /// every axis, with empty parts, and above the size where the rows go parallel.
    #[test]
    fn block_concat_and_split_equal_the_generic_ones() {
        let cases: [(&[usize], &[usize], usize); 5] = [
            (&[2, 3, 4, 5], &[3, 1, 2], 1),
            (&[2, 3, 4, 5], &[1, 0, 2], 0),
            (&[2, 3, 4, 5], &[2, 3], 3),
            (&[1, 7, 3], &[4, 3], 1),
            (&[64, 40, 8, 8], &[32, 8], 1), // 164k elements: parallel rows
        ];
        for (seed, (frame, sizes, axis)) in cases.into_iter().enumerate() {
            let parts: Vec<ArrayD<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(k, &s)| {
                    let mut sh = frame.to_vec();
                    sh[axis] = s;
                    rand(&sh, 10 * seed as u64 + k as u64)
                })
                .collect();
            let views: Vec<ArrayViewD<f32>> = parts.iter().map(|p| p.view()).collect();
            let want = ndarray::concatenate(Axis(axis), &views).unwrap();
            let got = concat(axis, &views).unwrap();
            assert_eq!(got, want, "concat, axis {axis}, sizes {sizes:?}");
            let back = split(axis, sizes, got.view()).unwrap();
            assert_eq!(back, parts, "split, axis {axis}, sizes {sizes:?}");
        }
        // A transposed (non-standard) input takes the generic path, with the same result.
        let a = rand(&[3, 4], 1);
        let b = rand(&[4, 4], 2);
        let at = a.t(); // [4, 3], column-major
        assert!(!at.is_standard_layout());
        let got = concat(1, &[at.view(), b.view()]).unwrap();
        let want = ndarray::concatenate(Axis(1), &[at.view(), b.view()]).unwrap();
        assert_eq!(got, want);
        assert!(concat(1, &[a.view(), rand(&[2, 4], 3).view()]).is_err());
        assert!(split(2, &[1], a.view()).is_err());
    }

    /// Row-by-row copies against ndarray's generic ones: transposes that keep inner planes
    /// (ShuffleNet's channel shuffle) and ones that do not, windows, a reversed axis, and sizes
    /// on both sides of the parallel threshold.
    #[test]
    fn row_copies_equal_the_generic_layout_change() {
        for (seed, shape) in [vec![2, 3, 4, 5], vec![64, 2, 40, 8, 8], vec![3, 1, 40]]
            .into_iter()
            .enumerate()
        {
            let x = rand(&shape, seed as u64);
            let n = shape.len();
            let mut perms = vec![(0..n).rev().collect::<Vec<_>>()];
            let mut swap = (0..n).collect::<Vec<_>>();
            swap.swap(1, 2.min(n - 1));
            perms.push(swap);
            for perm in perms {
                let v = x.view().permuted_axes(IxDyn(&perm));
                assert_eq!(to_standard(v.clone()), v.as_standard_layout().into_owned());
                assert_eq!(
                    transpose(x.view(), &perm),
                    v.as_standard_layout().into_owned()
                );
            }
            let win = x.slice_each_axis(|ax| {
                let d = shape[ax.axis.index()];
                NdSlice::from(d / 3..d)
            });
            assert_eq!(to_standard(win.clone()), win.to_owned());
            let channels = x.slice_axis(Axis(1), NdSlice::from(shape[1] / 2..shape[1]));
            assert_eq!(to_standard(channels.clone()), channels.to_owned());
            let rev = x.slice_axis(Axis(0), NdSlice::new(0, None, -1));
            assert_eq!(to_standard(rev.clone()), rev.to_owned());
        }
    }

    /// Step-1 slices (the window path) against the element-by-element scatter and `select`.
    #[test]
    fn window_take_and_its_backward_equal_the_general_paths() {
        let x = rand(&[4, 6, 5, 20], 7);
        let idx: Vec<Vec<usize>> = vec![
            (0..4).collect(),
            (3..6).collect(),
            (1..5).collect(),
            (0..20).collect(),
        ];
        let mut want = x.clone();
        for (ax, list) in idx.iter().enumerate() {
            want = want.select(Axis(ax), list);
        }
        let got = take(x.view(), &idx);
        assert_eq!(got, want);
        let g = rand(got.shape(), 8);
        let mut scattered = ArrayD::<f32>::zeros(x.raw_dim());
        for (pos, &v) in g.indexed_iter() {
            let at: Vec<usize> = (0..4).map(|ax| idx[ax][pos[ax]]).collect();
            scattered[IxDyn(&at)] += v;
        }
        assert_eq!(take_backward(x.shape(), &idx, g.view()), scattered);
    }

    /// The block path (trailing axes, standard layout) against means taken axis by axis in
    /// f64 and the broadcast backward; a leading or transposed case takes the general path.
    #[test]
    fn trailing_reduce_mean_equals_the_axis_by_axis_mean() {
        let x = rand(&[3, 4, 5, 6], 11);
        for axes in [vec![2, 3], vec![3], vec![1, 2, 3], vec![1], vec![1, 3]] {
            let got = reduce_mean(x.view(), &axes);
            let mut want = x.mapv(f64::from);
            for &ax in &axes {
                want = want.mean_axis(Axis(ax)).unwrap().insert_axis(Axis(ax));
            }
            assert_eq!(got.shape(), want.shape(), "axes {axes:?}");
            for (a, b) in got.iter().zip(want.iter()) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-6,
                    "axes {axes:?}: {a} vs {b}"
                );
            }
            let g = rand(got.shape(), 12);
            let count: usize = axes.iter().map(|&a| x.shape()[a]).product();
            let back = reduce_mean_backward(x.shape(), &axes, g.view());
            let bw = g.broadcast(x.raw_dim()).unwrap().mapv(|v| v / count as f32);
            for (a, b) in back.iter().zip(bw.iter()) {
                assert!((a - b).abs() <= 1e-7 * b.abs().max(1.0), "axes {axes:?}");
            }
        }
        let t = x.view().permuted_axes(IxDyn(&[0, 1, 3, 2]));
        let got = reduce_mean(t.clone(), &[2, 3]);
        let want = reduce_mean(t.as_standard_layout().view(), &[2, 3]);
        for (a, b) in got.iter().zip(want.iter()) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    /// A Gather's index list with repeats (an adaptive pool's overlapping windows): the
    /// backward adds the gradients of every copy, checked by finite differences.
    #[test]
    fn take_with_repeated_indices_backward() {
        let x = rand(&[2, 3, 4], 13);
        let idx: Vec<Vec<usize>> = vec![vec![0, 1], vec![0, 1, 2], vec![0, 0, 2, 1, 1, 3]];
        let y = take(x.view(), &idx);
        assert_eq!(y.shape(), &[2, 3, 6]);
        let w = weights_for(&y);
        check_grad(
            &x,
            &|x| take(x.view(), &idx),
            &take_backward(x.shape(), &idx, w.view()),
        );
    }

    #[test]
    fn concat_split_are_inverse() {
        let a = rand(&[2, 3, 2], 4);
        let b = rand(&[2, 1, 2], 5);
        let c = concat(1, &[a.view(), b.view()]).unwrap();
        let parts = split(1, &[3, 1], c.view()).unwrap();
        assert_eq!(parts[0], a);
        assert_eq!(parts[1], b);
        assert!(split(1, &[2, 1], c.view()).is_err());
    }
}
