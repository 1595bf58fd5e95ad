//! Winograd F(2x2, 3x3) and F(4x4, 3x3) weight gradients of stride-1 3x3 convolutions.
//!
//! F(4x4) (`Geom::wino_dw4_pays` says where) is the same scheme with 36 taps: `V` from the
//! forward's input transform (`winograd4.rs`), `dM = A dy A^T` with F(4x4)'s `A` (6x4), and
//! `dg = G^T dU G` in f64; its error is bounded in the tests by `WINO4_DW_REL_TOL` (worst
//! 1.4e-6 over the random geometries, F(2x2) 2.0e-7). The rest of this note is F(2x2)'s.
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

/// Bound on the F(4x4) weight gradient's error per entry, as `winograd::WINO_REL_TOL` for
/// F(2x2): relative to the largest `sum |dy| |x|` over the entry's kernel window.
#[cfg(test)]
pub(super) const WINO4_DW_REL_TOL: f64 = 1e-5;

/// Tiles a chunk of images aims for: long enough runs that a register tile's final horizontal
/// sums are a small part of its work, short enough that one tap's `V` and `dM` rows
/// (`(ci + co) * Tp` floats, 512 KiB at 64 channels) stay in L2 while its tiles pass over them.
const DW_TILES: usize = 1024;

/// Floats from one channel's `[taps][tp]` block to the next: one vector more than the block, so
/// that the rows a register tile reads together (the same tap of 4 + 4 channels) do not sit a
/// multiple of 4 KiB apart, where they would share an L1 set (`tp` is often a multiple of 256).
fn channel_stride(taps: usize, tp: usize) -> usize {
    taps * tp + LANES
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
    /// [`input4_planes_body`] compiled for AVX2 where the CPU has it.
    fn input4_planes(p: &Plane, x: &[f32], c: usize, images: usize, tp: usize, v: &mut [f32], s: &mut WinoScratch)
        => input4_planes_body, (p, x, c, images, tp, v, s); ["avx2"]
}

/// F(4x4)'s [`input_planes_body`]: channel `c` of the chunk's images into `v` (`[36][tp]`,
/// tap `6 * row + col`) through the forward's input transform (`winograd4.rs`), zeros from the
/// last tile to `tp`.
#[inline(always)]
fn input4_planes_body(
    p: &Plane,
    x: &[f32],
    c: usize,
    images: usize,
    tp: usize,
    v: &mut [f32],
    s: &mut WinoScratch,
) {
    let nt = images * p.tiles();
    let WinoScratch {
        hrows, prow, ev, ..
    } = s;
    p.transform_input4_to(x, c, nt, hrows, prow, ev, v, tp, 0);
    for row in v[..36 * tp].chunks_mut(tp) {
        row[nt..].fill(0.0);
    }
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

/// Lanes per step of [`a6`]'s fixed-array loop (which the compiler vectorises).
const A6_LANES: usize = 8;

/// [`a6`] on elements `t..t + L`.
#[inline(always)]
fn a6_at<const L: usize>(p: &[&[f32]; 4], o: &mut [&mut [f32]; 6], t: usize) {
    let lane = |s: &[f32]| -> [f32; L] { std::array::from_fn(|l| s[t + l]) };
    let (a, b, c, d) = (lane(p[0]), lane(p[1]), lane(p[2]), lane(p[3]));
    let mut r = [[0.0f32; L]; 6];
    for l in 0..L {
        let (s02, s13) = (a[l] + c[l], b[l] + d[l]);
        let (e, f) = (a[l] + 4.0 * c[l], 2.0 * b[l] + 8.0 * d[l]);
        r[0][l] = a[l];
        r[1][l] = s02 + s13;
        r[2][l] = s02 - s13;
        r[3][l] = e + f;
        r[4][l] = e - f;
        r[5][l] = d[l];
    }
    for (ok, rk) in o.iter_mut().zip(&r) {
        ok[t..t + L].copy_from_slice(rk);
    }
}

/// `out[q][t] = sum_j A[q][j] p[j][t]` with F(4x4)'s `A` (6x4, the transpose of `A^T` in
/// `winograd4.rs`): the adjoint of its output transform, over runs of the length of `out[0]`.
#[inline(always)]
fn a6(p: [&[f32]; 4], mut out: [&mut [f32]; 6]) {
    let n = out[0].len();
    let mut t = 0;
    while t + A6_LANES <= n {
        a6_at::<A6_LANES>(&p, &mut out, t);
        t += A6_LANES;
    }
    while t < n {
        a6_at::<1>(&p, &mut out, t);
        t += 1;
    }
}

simd_dispatch! {
    /// [`dy4_planes_body`] compiled for AVX2 where the CPU has it.
    fn dy4_planes(p: &Plane, dy: &[f32], o: usize, images: usize, tp: usize, m: &mut [f32], tmp: &mut Vec<f32>)
        => dy4_planes_body, (p, dy, o, images, tp, m, tmp); ["avx2"]
}

/// F(4x4)'s [`dy_planes_body`]: channel `o` of the chunk's output gradients into `m`
/// (`[36][tp]`, tap `6 * row + col`): `A dy_t A^T` per 4x4 tile (`A` 6x4), image `j`'s tiles at
/// `j * tiles()`, zeros from the last tile to `tp`. Each of a tile's 16 positions is first
/// gathered into its own run over the image's tiles (zeros past the plane, which the forward
/// clips), so that both passes of the transform are long loops over the tiles.
#[inline(always)]
fn dy4_planes_body(
    p: &Plane,
    dy: &[f32],
    o: usize,
    images: usize,
    tp: usize,
    m: &mut [f32],
    tmp: &mut Vec<f32>,
) {
    let (th, tw) = (p.th(), p.tw());
    let (ohw, tiles) = (p.oh * p.ow, th * tw);
    // 16 position runs, 24 row-transformed runs, one zero-padded output row.
    grow(tmp, 40 * tiles + 4 * tw);
    let (pos, rest) = tmp.split_at_mut(16 * tiles);
    let (hor, row) = rest.split_at_mut(24 * tiles);
    let row = &mut row[..4 * tw];
    for j in 0..images {
        let plane = &dy[(j * p.cout + o) * ohw..][..ohw];
        for ty in 0..th {
            for r in 0..4 {
                let y = 4 * ty + r;
                row.fill(0.0);
                if y < p.oh {
                    row[..p.ow].copy_from_slice(&plane[y * p.ow..][..p.ow]);
                }
                for (tx, q) in row.chunks_exact(4).enumerate() {
                    for (l, &v) in q.iter().enumerate() {
                        pos[(4 * r + l) * tiles + ty * tw + tx] = v;
                    }
                }
            }
        }
        // Rows: hor[r][q] = sum_l A[q][l] pos[r][l].
        for r in 0..4 {
            let pr = |l: usize| &pos[(4 * r + l) * tiles..][..tiles];
            let mut hs = hor[r * 6 * tiles..(r + 1) * 6 * tiles].chunks_exact_mut(tiles);
            let out: [&mut [f32]; 6] = std::array::from_fn(|_| hs.next().expect("6 runs"));
            a6([pr(0), pr(1), pr(2), pr(3)], out);
        }
        // Columns: m[6 a + q] = sum_r A[a][r] hor[r][q].
        let at = j * tiles;
        for q in 0..6 {
            let hr = |r: usize| &hor[(6 * r + q) * tiles..][..tiles];
            let (first, rest) = m[q * tp..].split_at_mut(6 * tp);
            let mut outs = std::iter::once(&mut first[at..at + tiles]).chain(
                rest.chunks_mut(6 * tp)
                    .take(5)
                    .map(|c| &mut c[at..at + tiles]),
            );
            let out: [&mut [f32]; 6] = std::array::from_fn(|_| outs.next().expect("6 rows"));
            a6([hr(0), hr(1), hr(2), hr(3)], out);
        }
    }
    for r in m[..36 * tp].chunks_mut(tp) {
        r[images * tiles..].fill(0.0);
    }
}

/// `G^T u G` for one transformed gradient `u` (6x6, row-major) with F(4x4)'s `G`
/// (`winograd4::G`), in f64 and rounded once: the 3x3 kernel gradient.
fn untransform4(u: &[f32; 36]) -> [f32; 9] {
    use super::winograd4::G;
    // t = G^T u (3x6).
    let mut t = [[0.0f64; 6]; 3];
    for (r, tr) in t.iter_mut().enumerate() {
        for (b, tb) in tr.iter_mut().enumerate() {
            *tb = (0..6).map(|a| G[a][r] * f64::from(u[6 * a + b])).sum();
        }
    }
    let mut g = [0.0f32; 9];
    for r in 0..3 {
        for s in 0..3 {
            g[3 * r + s] = (0..6).map(|b| t[r][b] * G[b][s]).sum::<f64>() as f32;
        }
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
    /// The forward correlation as this weight gradient's tile (`wino_dw_tile`) sees it,
    /// whatever tile the forward runs with.
    fn wino_dw_plane(&self) -> Plane {
        Plane {
            m: self.wino_dw_tile,
            ..self.wino_forward_plane()
        }
    }

    /// Images per chunk: about [`DW_TILES`] tiles (the geometry's, not the batch's, so that
    /// the summation order depends on the geometry and the batch only).
    fn wino_dw_images(&self) -> usize {
        DW_TILES.div_ceil(self.wino_dw_plane().tiles().max(1))
    }

    /// `dw` (`[co, ci, 3, 3]`, overwritten) of the whole batch: `x` is `[n, ci, h, w]`, `dy`
    /// `[n, co, oh, ow]`. F(2x2) or F(4x4) as `wino_dw_tile` says: 16 or 36 taps.
    pub(super) fn weight_grad_winograd(&self, x: &[f32], dy: &[f32], dw: &mut [f32]) {
        let p = self.wino_dw_plane();
        let (ci, co, tpi, taps) = (self.ci, self.co, p.tiles(), p.taps());
        let (xlen, ylen) = (self.x_len(), self.y_len());
        let chunk = self.wino_dw_images().min(self.n.max(1));
        let tp_max = (chunk * tpi).next_multiple_of(LANES);
        let mut bufs = BUFS.with(|b| b.take());
        let (v, m) = &mut bufs;
        grow(v, ci * channel_stride(taps, tp_max));
        grow(m, co * channel_stride(taps, tp_max));
        // The F(4x4) transforms' scratch rows, sized by tiles (one channel each way).
        let p_rows = Plane {
            cin: 1,
            cout: 1,
            ..p
        };
        let mut du = vec![0.0f32; taps * co * ci];
        for (xc, dyc) in x.chunks(chunk * xlen).zip(dy.chunks(chunk * ylen)) {
            let images = xc.len() / xlen;
            let tp = (images * tpi).next_multiple_of(LANES);
            let cs = channel_stride(taps, tp);
            let (v, m) = (&mut v[..ci * cs], &mut m[..co * cs]);
            v.par_chunks_mut(cs).enumerate().for_each(|(c, vc)| {
                let vc = &mut vc[..taps * tp];
                if p.m == 4 {
                    with_scratch(&p_rows, images, |s| {
                        input4_planes(&p, xc, c, images, tp, vc, s)
                    });
                } else {
                    with_scratch(&p, 1, |s| input_planes(&p, xc, c, images, tp, vc, s));
                }
            });
            m.par_chunks_mut(cs)
                .enumerate()
                .for_each_init(Vec::new, |tmp, (o, mo)| {
                    let mo = &mut mo[..taps * tp];
                    if p.m == 4 {
                        dy4_planes(&p, dyc, o, images, tp, mo, tmp);
                    } else {
                        with_scratch(&p, 1, |s| dy_planes(&p, dyc, o, images, tp, mo, s));
                    }
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
                let at = |k: usize| du[(k * co + o) * ci + c];
                if p.m == 4 {
                    let u: [f32; 36] = std::array::from_fn(at);
                    g.copy_from_slice(&untransform4(&u));
                } else {
                    let u: [f32; 16] = std::array::from_fn(|k| TAP_SIGN[k] * at(k));
                    g.copy_from_slice(&untransform(&u));
                }
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

    /// Whether that weight gradient runs as F(4x4) rather than F(2x2): 36 products per 16
    /// outputs instead of 16 per 4, but transforms over 6x6 tiles, which the dot products
    /// outweigh only with many channels on large planes. Measured inside training steps
    /// (`elrt speed --profile`, 1 thread, F(2x2) -> F(4x4), the layers' backward in ms per
    /// step): resnet18 at 128x128 (batch 64) 64ch 32x32 250.6-253.5 -> 235.7-237.8 (step
    /// 1534-1605 -> 1493-1539); resnet18 at 224x224 (batch 16) 64ch 56x56 176.6-179.9 ->
    /// 164.0-167.3 and 128ch 28x28 141.8-153.5 -> 123.6-127.2 (step 1256-1268 -> 1196-1231).
    /// Lost: resnet18 at 64x64, 64ch 16x16, 66.6-74.8 -> 69.9-80.8; resnet18_tucker2 at 128x128
    /// (40ch 32x32 and 72ch 16x16 cores) 162.7-164.6 -> 166.2-172.3; criterion (`weight_grad`,
    /// 1 thread, batch 64) 32ch 16x16 2.82 -> 4.31 ms, 64ch 16x16 9.08 -> 10.4; 64ch 32x32 a
    /// tie there (33.7 -> 33.0-35.3, where the training step gained), 128ch 28x28 113.5 ->
    /// 87.1. So: from [`DW4_MIN_CHANNELS`] channels in and out on 32x32 planes and larger, from
    /// [`DW4_MIN_CHANNELS_MID`] on planes over 16x16.
    pub(super) fn wino_dw4_pays(&self) -> bool {
        let (plane, ch) = (self.oh * self.ow, self.ci.min(self.co));
        DW4.decide(|| {
            (plane >= 1024 && ch >= DW4_MIN_CHANNELS) || (plane > 256 && ch >= DW4_MIN_CHANNELS_MID)
        })
    }
}

/// Fewest channels in and out for the F(4x4) weight gradient on 32x32 planes and larger.
const DW4_MIN_CHANNELS: usize = 64;
/// Fewest channels in and out for it on planes over 16x16 and under 32x32.
const DW4_MIN_CHANNELS_MID: usize = 128;

static MODE: AtomicU8 = AtomicU8::new(0);
/// The override of [`Geom::wino_dw4_pays`].
static DW4: Override = Override::new();

/// Benchmark override of the Winograd weight gradient's tile: `Some(true)` F(4x4) on every
/// layer it runs on, `Some(false)` F(2x2), `None` the speed rule.
#[doc(hidden)]
pub fn set_winograd_weight_grad_f4(mode: Option<bool>) {
    DW4.set(mode);
}
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
