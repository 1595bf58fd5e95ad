//! Winograd F(2x2, 3x3) weight gradient of stride-1 3x3 convolutions.
//!
//! The forward is `y_t = A^T [U ⊙ V_t] A` per 2x2 output tile `t`, with `U = G g G^T` and
//! `V_t = B^T d_t B` (`winograd.rs`). Its adjoint in `U` is `dU = sum_t dM_t ⊙ V_t` with
//! `dM_t = A dy_t A^T`, and the kernel's gradient is `dg = G^T dU G`. So per tap `k` of the 16,
//! `dU[k][o][c] = sum_t dM[k][o][t] * V[k][c][t]`: a `co x ci` block of dot products over the
//! batch's tiles, 16 multiply-adds per channel pair and tile where the direct kernel
//! (`weight_grad.rs`) spends 36 per 2x2 outputs (plus its padded columns): 2.25x fewer or more.
//!
//! Why not as GEMMs: a first version (commit 5da356f, reverted in 5c2ecb2) ran the 16 products
//! through sgemm and lost, since each GEMM has a small `co x ci` output and a long inner
//! dimension, a shape whose packing costs as much as its multiply-adds. Here they run on the
//! direct weight gradient's register tiles (`weight_grad::dot_tiles`: 4 output channels x 4
//! input channels per tile, no packing), which need only contiguous runs: `V` is laid out
//! `[ci][16][Tp]` and `dM` `[co][16][Tp]` (`Tp`: the chunk's tiles rounded up to whole
//! vectors, zero beyond; each channel's block followed by one vector of slack, see
//! [`channel_stride`]), so tap `k` is rows `c * channel_stride(Tp) + k * Tp` of both.
//!
//! Work split: the batch goes through in chunks of [`DW_TILES`] tiles or so; per chunk the
//! channels' transforms run in parallel, then the 16 taps' dot products, one task per tap, each
//! adding to its own `dU[k]`. The sums run over the chunks in order and within a chunk in one
//! fixed order, so results never depend on the thread count; the chunk size depends on the
//! geometry (and on the batch, when it is smaller than one chunk) only.
//!
//! Numerics: the transforms add, subtract and halve, like the forward's; the error per entry
//! is bounded in the tests by `WINO_REL_TOL` times the largest `sum |dy| |x|` over the entry's
//! 3x3 window (Winograd mixes the window's taps), against an f64 reference: worst 2.0e-7 over
//! 60 random geometries.

use super::weight_grad::{dot_tiles, Runs, LANES};
use super::winograd::{comb, grow, with_scratch, Plane, WinoScratch};
use super::{Geom, Override};
use crate::engine::ops::simd::simd_dispatch;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

/// Tiles a chunk of images aims for: long enough runs that a register tile's final horizontal
/// sums are a small part of its work, short enough that one tap's `V` and `dM` rows
/// (`(ci + co) * Tp` floats, 512 KiB at 64 channels) stay in L2 while its tiles pass over them.
const DW_TILES: usize = 1024;

/// Floats from one channel's `[16][tp]` block to the next: one vector more than the block, so
/// that the rows a register tile reads together (the same tap of 4 + 4 channels) do not sit a
/// multiple of 4 KiB apart, where they would share an L1 set (`tp` is often a multiple of 256).
fn channel_stride(tp: usize) -> usize {
    16 * tp + LANES
}

/// `(-1)^(row == 3) * (-1)^(col == 3)` for tap `k = 4 * row + col`: `A`'s last row is
/// `[0, -1]`, and the transform below leaves that sign out (exact) and puts it back on `dU`.
const TAP_SIGN: [f32; 16] = [
    1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0,
];

simd_dispatch! {
    /// [`input_planes_body`] compiled for AVX2 where the CPU has it.
    fn input_planes(p: &Plane, x: &[f32], c: usize, images: usize, tp: usize, v: &mut [f32], s: &mut WinoScratch)
        => input_planes_body, (p, x, c, images, tp, v, s); ["avx2"]
}

simd_dispatch! {
    /// [`dy_planes_body`] compiled for AVX2 where the CPU has it.
    fn dy_planes(p: &Plane, dy: &[f32], o: usize, images: usize, tp: usize, m: &mut [f32], s: &mut WinoScratch)
        => dy_planes_body, (p, dy, o, images, tp, m, s); ["avx2"]
}

/// Channel `c` of the chunk's images `x` (`[images, cin, h, w]`) into `v` (`[16][tp]`): image
/// `j`'s tiles at `j * tiles()`, zeros from the last tile to `tp`.
#[inline(always)]
fn input_planes_body(
    p: &Plane,
    x: &[f32],
    c: usize,
    images: usize,
    tp: usize,
    v: &mut [f32],
    s: &mut WinoScratch,
) {
    let (hw, tpi) = (p.h * p.w, p.tiles());
    for j in 0..images {
        let plane = &x[(j * p.cin + c) * hw..][..hw];
        p.transform_input(plane, v, tp, j * tpi, s);
    }
    for row in v.chunks_mut(tp) {
        row[images * tpi..].fill(0.0);
    }
}

/// Channel `o` of the chunk's output gradients `dy` (`[images, cout, oh, ow]`) into `m`
/// (`[16][tp]`): `A dy_t A^T` per 2x2 tile without the signs of [`TAP_SIGN`], image `j`'s tiles
/// at `j * tiles()`, zeros from the last tile to `tp`. A tile's rows and columns past the plane
/// read zeros (the forward clips them, so their gradient is zero).
#[inline(always)]
fn dy_planes_body(
    p: &Plane,
    dy: &[f32],
    o: usize,
    images: usize,
    tp: usize,
    m: &mut [f32],
    s: &mut WinoScratch,
) {
    let (th, tw) = (p.th(), p.tw());
    let (ohw, tiles) = (p.oh * p.ow, th * tw);
    let half = p.ow / 2;
    let mut rows = m.chunks_mut(tp);
    let r: [&mut [f32]; 16] = std::array::from_fn(|_| rows.next().expect("16 taps"));
    let [m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15] = r;
    for j in 0..images {
        let plane = &dy[(j * p.cout + o) * ohw..][..ohw];
        // Even and odd columns of even and odd rows, each `[th][tw]`.
        let (ee, rest) = s.tmp[..4 * tiles].split_at_mut(tiles);
        let (eo, rest) = rest.split_at_mut(tiles);
        let (oe, oo) = rest.split_at_mut(tiles);
        for ty in 0..th {
            for (par, (e, od)) in [(&mut *ee, &mut *oe), (&mut *eo, &mut *oo)]
                .into_iter()
                .enumerate()
            {
                let (e, od) = (&mut e[ty * tw..][..tw], &mut od[ty * tw..][..tw]);
                let y = 2 * ty + par;
                if y >= p.oh {
                    e.fill(0.0);
                    od.fill(0.0);
                    continue;
                }
                let src = &plane[y * p.ow..][..p.ow];
                for ((e, od), pair) in e.iter_mut().zip(od.iter_mut()).zip(src.chunks_exact(2)) {
                    *e = pair[0];
                    *od = pair[1];
                }
                if p.ow % 2 == 1 {
                    e[half] = src[p.ow - 1];
                    od[half] = 0.0;
                }
            }
        }
        let (ee, eo, oe, oo) = (&*ee, &*eo, &*oe, &*oo);
        let at = j * tiles;
        // Row i of `A dy` is (p_i, q_i) on even and odd columns; tap (i, 0..4) of the tile is
        // p_i, p_i + q_i, p_i - q_i, q_i. Row 0: the even row.
        m0[at..][..tiles].copy_from_slice(ee);
        m3[at..][..tiles].copy_from_slice(oe);
        comb(&mut m1[at..][..tiles], ee, oe, |a, b| a + b);
        comb(&mut m2[at..][..tiles], ee, oe, |a, b| a - b);
        // Row 1: the rows' sum (p1 = ee + eo, q1 = oe + oo).
        comb(&mut m4[at..][..tiles], ee, eo, |a, b| a + b);
        comb(&mut m7[at..][..tiles], oe, oo, |a, b| a + b);
        comb(
            &mut m5[at..][..tiles],
            &m4[at..][..tiles],
            &m7[at..][..tiles],
            |a, b| a + b,
        );
        comb(
            &mut m6[at..][..tiles],
            &m4[at..][..tiles],
            &m7[at..][..tiles],
            |a, b| a - b,
        );
        // Row 2: their difference (p2 = ee - eo, q2 = oe - oo).
        comb(&mut m8[at..][..tiles], ee, eo, |a, b| a - b);
        comb(&mut m11[at..][..tiles], oe, oo, |a, b| a - b);
        comb(
            &mut m9[at..][..tiles],
            &m8[at..][..tiles],
            &m11[at..][..tiles],
            |a, b| a + b,
        );
        comb(
            &mut m10[at..][..tiles],
            &m8[at..][..tiles],
            &m11[at..][..tiles],
            |a, b| a - b,
        );
        // Row 3: the odd row, sign left out (p3 = eo, q3 = oo).
        m12[at..][..tiles].copy_from_slice(eo);
        m15[at..][..tiles].copy_from_slice(oo);
        comb(&mut m13[at..][..tiles], eo, oo, |a, b| a + b);
        comb(&mut m14[at..][..tiles], eo, oo, |a, b| a - b);
    }
    for row in [
        m0, m1, m2, m3, m4, m5, m6, m7, m8, m9, m10, m11, m12, m13, m14, m15,
    ] {
        row[images * tiles..].fill(0.0);
    }
}

/// `G^T u G` for one transformed gradient `u` (4x4, row-major), `G` as in `winograd.rs`:
/// the 3x3 kernel gradient.
fn untransform(u: &[f32; 16]) -> [f32; 9] {
    // t = G^T u (3x4).
    let mut t = [0.0f32; 12];
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        t[j] = a + 0.5 * (b + c);
        t[4 + j] = 0.5 * (b - c);
        t[8 + j] = 0.5 * (b + c) + d;
    }
    let mut g = [0.0f32; 9];
    for i in 0..3 {
        let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        g[3 * i] = a + 0.5 * (b + c);
        g[3 * i + 1] = 0.5 * (b - c);
        g[3 * i + 2] = 0.5 * (b + c) + d;
    }
    g
}

thread_local! {
    /// The transformed inputs and output gradients (`V`, `dM`) of the calling thread, kept
    /// across calls: 4 MiB each for a 64-channel 16x16 layer, whose zeroing and first-touch
    /// page faults cost 5% of the weight gradient when allocated per call. Every entry a call
    /// reads it has written first (the tiles, then zeros up to the run's end).
    static BUFS: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Geom {
    /// The forward correlation as F(2x2, 3x3) sees it, whatever tile the forward runs with.
    fn wino_dw_plane(&self) -> Plane {
        Plane {
            m: 2,
            ..self.wino_forward_plane()
        }
    }

    /// Images per chunk: about [`DW_TILES`] tiles (the geometry's, not the batch's, so that
    /// the summation order depends on the geometry and the batch only).
    fn wino_dw_images(&self) -> usize {
        DW_TILES.div_ceil(self.wino_dw_plane().tiles().max(1))
    }

    /// `dw` (`[co, ci, 3, 3]`, overwritten) of the whole batch: `x` is `[n, ci, h, w]`, `dy`
    /// `[n, co, oh, ow]`.
    pub(super) fn weight_grad_winograd(&self, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        let p = self.wino_dw_plane();
        let (ci, co, tpi) = (self.ci, self.co, p.tiles());
        let (xlen, ylen) = (self.x_len(), self.y_len());
        let chunk = self.wino_dw_images().min(self.n.max(1));
        let tp_max = (chunk * tpi).next_multiple_of(LANES);
        let mut bufs = BUFS.with(|b| b.take());
        let (v, m) = &mut bufs;
        grow(v, ci * channel_stride(tp_max));
        grow(m, co * channel_stride(tp_max));
        let mut du = vec![0.0f32; 16 * co * ci];
        for (xc, dyc) in x.chunks(chunk * xlen).zip(dy.chunks(chunk * ylen)) {
            let images = xc.len() / xlen;
            let tp = (images * tpi).next_multiple_of(LANES);
            let cs = channel_stride(tp);
            let (v, m) = (&mut v[..ci * cs], &mut m[..co * cs]);
            v.par_chunks_mut(cs).enumerate().for_each(|(c, vc)| {
                let vc = &mut vc[..16 * tp];
                with_scratch(&p, 1, |s| input_planes(&p, xc, c, images, tp, vc, s));
            });
            m.par_chunks_mut(cs).enumerate().for_each(|(o, mo)| {
                let mo = &mut mo[..16 * tp];
                with_scratch(&p, 1, |s| dy_planes(&p, dyc, o, images, tp, mo, s));
            });
            let (v, m) = (&*v, &*m);
            du.par_chunks_mut(co * ci).enumerate().for_each(|(k, duk)| {
                let offs: Vec<usize> = (0..ci).map(|c| c * cs + k * tp).collect();
                let runs = Runs {
                    x: v,
                    dy: &m[k * tp..],
                    offs: &offs,
                    run: tp,
                    dyrow: cs,
                    rows: co,
                    images: 1,
                    xstride: 0,
                    dystride: 0,
                };
                runs.check();
                dot_tiles(&runs, duk);
            });
        }
        BUFS.with(|b| b.replace(bufs));
        let du = &du;
        dw.par_chunks_mut(9 * ci).enumerate().for_each(|(o, dwo)| {
            for (c, g) in dwo.chunks_mut(9).enumerate() {
                let u: [f32; 16] = std::array::from_fn(|k| TAP_SIGN[k] * du[(k * co + o) * ci + c]);
                g.copy_from_slice(&untransform(&u));
            }
        });
    }

    /// Whether the weight gradient of a Winograd layer runs here rather than on the direct
    /// kernel (`weight_grad.rs`), measured with criterion on an AVX-512 host (batch 64 unless
    /// said, 1 thread: the bench's pool, which an earlier note here took for rayon's default of
    /// 2; 2026-12-04):
    ///
    /// - layers that are not small-plane ones, always: group `weight_grad`, direct -> Winograd
    ///   (ms): ResNet-20's 32 channels on 16x16 4.26 -> 3.69; ResNet-18's 64 on 16x16 15.0 ->
    ///   11.3, 64 on 32x32 (an F(4x4) forward) 55.0 -> 47.0, 128 on 16x16 56.0 -> 37.8 (before
    ///   the channel stride of [`channel_stride`] the 64-channel 16x16 case ran 13.7 ms);
    /// - small-plane layers (8x8) from [`SMALL_PLANE_MIN_CHANNELS`] channels, with Winograd's
    ///   input gradient in place of the small-plane path's backward: group
    ///   `winograd_small_plane_backward`, small-plane -> Winograd, input and weight gradients
    ///   (ms): 128 channels 27.0 -> 19.9, 256 channels 102 -> 87; 64 channels lost (6.3 ->
    ///   6.6; at batch 128 11.5 -> 12.9), 32 channels too (batch 128, 3.2 -> 4.7).
    pub(super) fn wino_dw_pays(&self) -> bool {
        let small_ok = SMALL_PLANES.decide(|| self.ci.min(self.co) >= SMALL_PLANE_MIN_CHANNELS);
        MODE.load(Ordering::Relaxed) == 0 && (!self.small_plane || small_ok)
    }
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// Small-plane Winograd layers: the override of [`Geom::wino_dw_pays`]' channel rule.
static SMALL_PLANES: Override = Override::new();

/// Fewest input and output channels for a small-plane Winograd layer (8x8 planes) to take
/// Winograd's input and weight gradients rather than the small-plane path's backward.
const SMALL_PLANE_MIN_CHANNELS: usize = 128;

/// Benchmark override for small-plane Winograd layers' backward: `Some(true)` Winograd's input
/// and weight gradients on every one, `Some(false)` the small-plane path on every one, `None`
/// the speed rule.
#[doc(hidden)]
pub fn set_winograd_weight_grad_small_planes(mode: Option<bool>) {
    SMALL_PLANES.set(mode);
}

/// Turns the Winograd weight gradient off (`false`: Winograd layers' weight gradients on the
/// direct kernel, as before it existed) or back on; for benchmarks and tests that compare them.
pub fn set_winograd_weight_grad(on: bool) {
    MODE.store(u8::from(!on), Ordering::Relaxed);
}
