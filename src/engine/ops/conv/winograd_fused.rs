//! Winograd F(4x4, 3x3) for stride-1 3x3 layers of at most 16 channels in and out (ResNet-20's
//! first stage, low-rank Tucker-2 cores), one image at a time with every intermediate kept in
//! cache: forward and input gradient (the weight gradient stays the direct one,
//! `weight_grad.rs`).
//!
//! Why: those layers ran on the direct kernel (`direct.rs`) at the sgemm ceiling (ResNet-20's
//! 16ch 32x32, 84 GFLOP/s, 33% of its training step with the weight gradient), 144
//! multiply-adds per output and channel pair. F(4x4) needs 36 per 16 outputs, but the other
//! Winograd paths lost at 16 channels: `winograd.rs` transforms plane by plane with GEMMs of
//! 16 x 16 per tap, and `winograd_cl.rs` writes the transformed batch (2.25x the activation)
//! out and reads it back. Here 16 channels are one vector (one AVX-512 register), so:
//!
//! - the image is copied channels-last into a zero-padded buffer `P[py][px][16]` (rows and
//!   columns of whole tiles, the padding's zeros around it);
//! - per block of [`TB`] tiles: the input transform `V = B^T d B` along the 16 channel lanes,
//!   into `[TB][36][16]`; for each of the 36 transformed taps, `M[t][k] = sum_c V[t][k][c] *
//!   U[k][c]` (a broadcast of `V[t][k][c]` times the weight vector `U[k][c]` over the output
//!   channels: 16 products per tile, tap and input channel); the output transform `y = A^T M A`
//!   plus the bias into a channels-last output `O[oy][ox][16]`;
//! - `O` is copied back to NCHW.
//!
//! Transformed weights `U[k][c][o]` (36 x 16 x 16, zero-padded) are made once per call. The
//! block of tiles stays in L1 (2 x 18 KB) and the padded image in L2, so nothing but the image
//! and its output crosses memory.
//!
//! Numerics: F(4x4)'s transforms (`winograd4.rs`'s matrices in this file's summation order),
//! within `WINO4_REL_TOL` of each output's tile scale as the other F(4x4) paths. Each output
//! is a fixed sequence of operations on its own image: results do not depend on the thread
//! count or the batch.

use super::winograd::Plane;
use super::winograd4::transform_kernel4;
use super::{Geom, Override};

/// Channels per vector: the widest layer this path takes, in and out.
pub(super) const LANES: usize = 16;
/// Tiles per block of products: `TB` accumulators (plus the weight vector and the broadcast)
/// of the 32 AVX-512 registers, and 2 x 18 KB of transformed tiles that stay in L1.
const TB: usize = 8;
/// Transformed taps per F(4x4, 3x3) tile.
const TAPS: usize = 36;

/// The override of [`Geom::wino_fused_pays`].
static FUSED: Override = Override::new();

/// Benchmark override of this path: `Some(true)` on every layer it can take, `Some(false)`
/// never (the direct kernel runs them), `None` the speed rule.
#[doc(hidden)]
pub fn set_winograd_fused(mode: Option<bool>) {
    FUSED.set(mode);
}

/// Which build of the kernels runs: the products' AVX-512 tile, or plain Rust (the transforms
/// compiled for AVX-512 / AVX2 where the CPU has them in both).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Build {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Build {
    /// The fastest build this CPU runs.
    pub(super) fn best() -> Build {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Build::Avx512;
        }
        Build::Portable
    }

    /// Every build this CPU runs (the tests compare them).
    #[cfg(test)]
    pub(super) fn available() -> Vec<Build> {
        let mut v = vec![Build::Portable];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            v.push(Build::Avx512);
        }
        v
    }
}

impl Geom {
    /// Whether this path can run the layer (as forward and, through `Geom::direct_dx_geom`,
    /// input gradient): a direct-forward layer, stride 1, undilated 3x3, at most [`LANES`]
    /// channels in and out, pads within the kernel's extent.
    pub(super) fn wino_fused_eligible(&self) -> bool {
        self.direct_fwd
            && self.group == 1
            && [self.kh, self.kw, self.sh, self.sw, self.dh, self.dw] == [3, 3, 1, 1, 1, 1]
            && self.ci.max(self.co) <= LANES
            && [self.pt, self.pl, self.pb, self.pr].iter().all(|&p| p <= 2)
    }

    /// Whether it beats the direct kernel here: on AVX-512 (its products' tile), planes of
    /// 16x16 and up (blocks of [`TB`] tiles filled), and 12 channels or more each way. Criterion
    /// (`direct_forward`, forward alone, batch 64, 1 thread, AVX-512 AMD EPYC), direct ->
    /// fused: 16ch 32x32 3.20 -> 1.83 ms, 16ch 16x16 0.91 -> 0.385, rank-12 core on 32x32 2.20
    /// -> 1.58; lost: rank-8 core on 32x32 0.91 -> 0.98 (the transforms and layout copies per
    /// channel stay while the products halve). Inside training steps (`elrt speed`, batch
    /// 128, alternating builds, direct -> fused): ResNet-20 1 thread 326-335 -> 363-369 img/s,
    /// 2 threads 599-622 -> 689-715 (its 16-channel layers' forward 44.9 -> 22.4 ms per step,
    /// backward with the direct weight gradient 86.7 -> 67.8); resnet20_tucker2 1 thread
    /// 538-551 -> 582.
    pub(super) fn wino_fused_pays(&self) -> bool {
        FUSED.decide(|| {
            Build::best() != Build::Portable
                && self.oh * self.ow >= 256
                && self.ci.min(self.co) >= 12
        })
    }

    /// The forward's plane (F(4x4) tiles) for this path.
    pub(super) fn fused_plane(&self) -> Plane {
        Plane {
            cin: self.ci,
            cout: self.co,
            h: self.h,
            w: self.w,
            oh: self.oh,
            ow: self.ow,
            pt: self.pt,
            pl: self.pl,
            m: 4,
        }
    }
}

/// `U[k][c][o] = (G w[o][c] G^T)[k]`, zero for `c >= cin` or `o >= cout`: `w` is ONNX's
/// `[cout][cin][3][3]`.
pub(super) fn fused_weights(cout: usize, cin: usize, w: &[f32]) -> Vec<f32> {
    assert!(cout <= LANES && cin <= LANES && w.len() == cout * cin * 9);
    let mut u = vec![0.0f32; TAPS * LANES * LANES];
    for o in 0..cout {
        for c in 0..cin {
            let g: &[f32; 9] = w[(o * cin + c) * 9..][..9].try_into().expect("9 taps");
            for (k, v) in transform_kernel4(g).into_iter().enumerate() {
                u[(k * LANES + c) * LANES + o] = v;
            }
        }
    }
    u
}

/// One image's buffers, kept across the images of a part.
pub(super) struct FusedScratch {
    /// The padded channels-last input, `[4 th + 2][4 tw + 2][16]`.
    p: Vec<f32>,
    /// A block's transformed tiles, `[TB][36][16]`.
    v: Vec<f32>,
    /// A block's products, `[TB][36][16]`.
    m: Vec<f32>,
    /// The channels-last output, `[4 th][4 tw][16]`.
    o: Vec<f32>,
}

impl Plane {
    pub(super) fn fused_scratch(&self) -> FusedScratch {
        let (hp, wp) = (4 * self.th() + 2, 4 * self.tw() + 2);
        FusedScratch {
            p: vec![0.0; hp * wp * LANES],
            v: vec![0.0; TB * TAPS * LANES],
            m: vec![0.0; TB * TAPS * LANES],
            o: vec![0.0; 16 * self.th() * self.tw() * LANES],
        }
    }

    /// The correlation of one image `x` (`[cin][h][w]`) with the transformed weights `u`
    /// ([`fused_weights`]) plus `bias`, into `y` (`[cout][oh][ow]`, every entry written).
    pub(super) fn fused_run(
        &self,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut FusedScratch,
    ) {
        self.fused_run_with(Build::best(), x, u, bias, y, s);
    }

    /// [`Self::fused_run`] on a given build (the tests run each).
    pub(super) fn fused_run_with(
        &self,
        build: Build,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut FusedScratch,
    ) {
        assert!(
            self.m == 4
                && self.cin <= LANES
                && self.cout <= LANES
                && x.len() == self.cin * self.h * self.w
                && y.len() == self.cout * self.oh * self.ow
                && u.len() == TAPS * LANES * LANES
                && bias.is_none_or(|b| b.len() == self.cout),
            "fused Winograd buffers do not match the plane"
        );
        let mut b = [0.0f32; LANES];
        if let Some(bias) = bias {
            b[..self.cout].copy_from_slice(bias);
        }
        let tiles = self.tiles();
        match build {
            Build::Portable => {
                pack(self, x, &mut s.p);
                for t0 in (0..tiles).step_by(TB) {
                    let nb = TB.min(tiles - t0);
                    input_block(self, &s.p, t0, nb, &mut s.v);
                    products_portable(self.cin, u, &s.v, &mut s.m);
                    output_block(self, &s.m, t0, nb, &b, &mut s.o);
                }
                unpack(self, &s.o, y);
            }
            // SAFETY: `Build::Avx512` exists only where the CPU has AVX-512F; the buffers'
            // lengths were checked above (`x`, `y`, `u`) and set by `fused_scratch` (the rest).
            #[cfg(target_arch = "x86_64")]
            Build::Avx512 => unsafe {
                avx512::pack(self, x, &mut s.p);
                for t0 in (0..tiles).step_by(TB) {
                    let nb = TB.min(tiles - t0);
                    avx512::input_block(self, &s.p, t0, nb, &mut s.v);
                    avx512::products(self.cin, u, &s.v, &mut s.m);
                    avx512::output_block(self, &s.m, t0, nb, &b, &mut s.o);
                }
                avx512::unpack(self, &s.o, y);
            },
        }
    }
}

/// One vector of channel lanes.
type V16 = [f32; LANES];

#[inline(always)]
fn load(s: &[f32]) -> V16 {
    s[..LANES].try_into().expect("a vector's lanes")
}

#[inline(always)]
fn add(a: V16, b: V16) -> V16 {
    std::array::from_fn(|i| a[i] + b[i])
}

#[inline(always)]
fn sub(a: V16, b: V16) -> V16 {
    std::array::from_fn(|i| a[i] - b[i])
}

/// `a + k * b`.
#[inline(always)]
fn add_k(a: V16, k: f32, b: V16) -> V16 {
    std::array::from_fn(|i| a[i] + k * b[i])
}

/// `B^T d` for one column (or row) of six input vectors (`winograd4.rs`'s `B^T`, rows
/// `[4 0 -5 0 1 0]`, `[0 -4 -4 1 1 0]`, `[0 4 -4 -1 1 0]`, `[0 -2 -1 2 1 0]`,
/// `[0 2 -1 -2 1 0]`, `[0 4 0 -5 0 1]`).
#[inline(always)]
fn bt6(d: [V16; 6]) -> [V16; 6] {
    let d4_d2 = sub(d[4], d[2]);
    let d3_d1 = sub(d[3], d[1]);
    [
        add_k(add_k(d[4], 4.0, d[0]), -5.0, d[2]),
        add_k(add(d[3], d[4]), -4.0, add(d[1], d[2])),
        add_k(sub(d[4], d[3]), 4.0, sub(d[1], d[2])),
        add_k(d4_d2, 2.0, d3_d1),
        add_k(d4_d2, -2.0, d3_d1),
        add_k(add_k(d[5], 4.0, d[1]), -5.0, d[3]),
    ]
}

/// `A^T m` for one column (or row) of six products (`A^T` rows `[1 1 1 1 1 0]`,
/// `[0 1 -1 2 -2 0]`, `[0 1 1 4 4 0]`, `[0 1 -1 8 -8 1]`).
#[inline(always)]
fn at6(m: [V16; 6]) -> [V16; 4] {
    let (a, b) = (add(m[1], m[2]), sub(m[1], m[2]));
    let (c, e) = (add(m[3], m[4]), sub(m[3], m[4]));
    [
        add(add(m[0], a), c),
        add_k(b, 2.0, e),
        add_k(a, 4.0, c),
        add(add_k(b, 8.0, e), m[5]),
    ]
}

use crate::engine::ops::simd::simd_dispatch;

simd_dispatch! {
    /// [`pack_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn pack(p: &Plane, x: &[f32], dst: &mut [f32]) => pack_body, (p, x, dst); ["avx512f", "avx2"]
}

/// `x` (`[cin][h][w]`) into the padded channels-last `dst` (`[4 th + 2][4 tw + 2][16]`):
/// input pixel `(iy, ix)` at `(iy + pt, ix + pl)`. The rest (the padding, the lanes past
/// `cin`, the columns and rows past the plane that whole tiles read) is never written: zeros
/// from [`Plane::fused_scratch`], whose buffer serves this plane only.
#[inline(always)]
fn pack_body(p: &Plane, x: &[f32], dst: &mut [f32]) {
    let wp = 4 * p.tw() + 2;
    let hw = p.h * p.w;
    for iy in 0..p.h {
        let row = &mut dst[((iy + p.pt) * wp + p.pl) * LANES..][..p.w * LANES];
        for (ix, px) in row.chunks_exact_mut(LANES).enumerate() {
            for (c, v) in px[..p.cin].iter_mut().enumerate() {
                *v = x[c * hw + iy * p.w + ix];
            }
        }
    }
}

simd_dispatch! {
    /// [`input_block_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn input_block(p: &Plane, pp: &[f32], t0: usize, nb: usize, v: &mut [f32])
        => input_block_body, (p, pp, t0, nb, v); ["avx512f", "avx2"]
}

/// Tiles `t0..t0 + nb` (row-major over the plane's tiles) of the padded input `pp` through
/// `B^T d B` into `v` (`[TB][36][16]`, the first `nb` tiles written).
#[inline(always)]
fn input_block_body(p: &Plane, pp: &[f32], t0: usize, nb: usize, v: &mut [f32]) {
    let (tw, wp) = (p.tw(), 4 * p.tw() + 2);
    for t in 0..nb {
        let (ty, tx) = ((t0 + t) / tw, (t0 + t) % tw);
        let base = (4 * ty * wp + 4 * tx) * LANES;
        // Columns first: tmp[u][b] = sum_a BT[u][a] d[a][b].
        let mut tmp = [[[0.0f32; LANES]; 6]; 6];
        for b in 0..6 {
            let d: [V16; 6] = std::array::from_fn(|a| load(&pp[base + (a * wp + b) * LANES..]));
            for (u, r) in bt6(d).into_iter().enumerate() {
                tmp[u][b] = r;
            }
        }
        // Then rows: V[u][w] = sum_b tmp[u][b] BT[w][b].
        let vt = &mut v[t * TAPS * LANES..][..TAPS * LANES];
        for (u, row) in tmp.into_iter().enumerate() {
            for (w, r) in bt6(row).into_iter().enumerate() {
                vt[(6 * u + w) * LANES..][..LANES].copy_from_slice(&r);
            }
        }
    }
}

simd_dispatch! {
    /// [`output_block_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn output_block(p: &Plane, m: &[f32], t0: usize, nb: usize, bias: &V16, o: &mut [f32])
        => output_block_body, (p, m, t0, nb, bias, o); ["avx512f", "avx2"]
}

/// The products of tiles `t0..t0 + nb` (`m`: `[TB][36][16]`) through `A^T M A`, plus `bias`,
/// into the channels-last output `o` (`[4 th][4 tw][16]`).
#[inline(always)]
fn output_block_body(p: &Plane, m: &[f32], t0: usize, nb: usize, bias: &V16, o: &mut [f32]) {
    let tw = p.tw();
    let wo = 4 * tw;
    for t in 0..nb {
        let (ty, tx) = ((t0 + t) / tw, (t0 + t) % tw);
        let mt = &m[t * TAPS * LANES..][..TAPS * LANES];
        // Columns first: tmp[r][w] = sum_u AT[r][u] M[u][w].
        let mut tmp = [[[0.0f32; LANES]; 6]; 4];
        for w in 0..6 {
            let col: [V16; 6] = std::array::from_fn(|u| load(&mt[(6 * u + w) * LANES..]));
            for (r, val) in at6(col).into_iter().enumerate() {
                tmp[r][w] = val;
            }
        }
        // Then rows: y[r][q] = sum_w tmp[r][w] AT[q][w], plus the bias.
        for (r, row) in tmp.into_iter().enumerate() {
            let out = &mut o[((4 * ty + r) * wo + 4 * tx) * LANES..][..4 * LANES];
            for (q, val) in at6(row).into_iter().enumerate() {
                out[q * LANES..][..LANES].copy_from_slice(&add(val, *bias));
            }
        }
    }
}

simd_dispatch! {
    /// [`unpack_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn unpack(p: &Plane, o: &[f32], y: &mut [f32]) => unpack_body, (p, o, y); ["avx512f", "avx2"]
}

/// The channels-last output `o` back to NCHW `y` (`[cout][oh][ow]`), the plane's part of the
/// whole tiles.
#[inline(always)]
fn unpack_body(p: &Plane, o: &[f32], y: &mut [f32]) {
    let wo = 4 * p.tw();
    let ohw = p.oh * p.ow;
    for oy in 0..p.oh {
        let row = &o[oy * wo * LANES..][..p.ow * LANES];
        for (ox, px) in row.chunks_exact(LANES).enumerate() {
            for (c, &v) in px[..p.cout].iter().enumerate() {
                y[c * ohw + oy * p.ow + ox] = v;
            }
        }
    }
}

/// `M[t][k] = sum_c V[t][k][c] * U[k][c]` for every tile slot of the block (`v`, `m`:
/// `[TB][36][16]`, `u`: `[36][16][16]`), `c` over the first `cin` lanes; a multiply and an
/// add per term (the AVX-512 tile fuses them).
fn products_portable(cin: usize, u: &[f32], v: &[f32], m: &mut [f32]) {
    for k in 0..TAPS {
        let uk = &u[k * LANES * LANES..][..LANES * LANES];
        for t in 0..TB {
            let vt = &v[(t * TAPS + k) * LANES..][..LANES];
            let mut acc = [0.0f32; LANES];
            for c in 0..cin {
                let uc = load(&uk[c * LANES..]);
                acc = add_k(acc, vt[c], uc);
            }
            m[(t * TAPS + k) * LANES..][..LANES].copy_from_slice(&acc);
        }
    }
}

// The kernels index their register arrays by constant bounds on purpose: the loops unroll and
// the arrays live in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{Plane, LANES, TAPS, TB};
    use std::arch::x86_64::*;

    /// The first `n` (at most 16) lanes.
    #[inline(always)]
    fn first(n: usize) -> __mmask16 {
        ((1u32 << n) - 1) as __mmask16
    }

    /// Transposes 16 vectors of 16 lanes in place: lane `j` of vector `i` goes to lane `i` of
    /// vector `j` (unpacks within 128-bit blocks, then 128-bit block shuffles).
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(r: &mut [__m512; 16]) {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // s[4i + j], block k: column 4k + j of rows 4i..4i + 4.
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        let mut s = [_mm512_setzero_ps(); 16];
        for i in 0..4 {
            let (a, b, c, d) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
            s[4 * i] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
            s[4 * i + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
            s[4 * i + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
            s[4 * i + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        }
        for j in 0..4 {
            let u0 = _mm512_shuffle_f32x4::<0x88>(s[j], s[4 + j]);
            let u1 = _mm512_shuffle_f32x4::<0xdd>(s[j], s[4 + j]);
            let v0 = _mm512_shuffle_f32x4::<0x88>(s[8 + j], s[12 + j]);
            let v1 = _mm512_shuffle_f32x4::<0xdd>(s[8 + j], s[12 + j]);
            r[j] = _mm512_shuffle_f32x4::<0x88>(u0, v0);
            r[4 + j] = _mm512_shuffle_f32x4::<0x88>(u1, v1);
            r[8 + j] = _mm512_shuffle_f32x4::<0xdd>(u0, v0);
            r[12 + j] = _mm512_shuffle_f32x4::<0xdd>(u1, v1);
        }
    }

    /// [`super::pack_body`], 16 pixels of a row at a time through [`transpose16`] (which
    /// writes every lane, zeros past `cin`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack(p: &Plane, x: &[f32], dst: &mut [f32]) {
        let wp = 4 * p.tw() + 2;
        let hw = p.h * p.w;
        assert!(x.len() >= p.cin * hw && dst.len() >= (4 * p.th() + 2) * wp * LANES);
        assert!(p.pt + p.h <= 4 * p.th() + 2 && p.pl + p.w <= wp);
        let (xp, dp) = (x.as_ptr(), dst.as_mut_ptr());
        let mut r = [_mm512_setzero_ps(); 16];
        for iy in 0..p.h {
            for ix0 in (0..p.w).step_by(LANES) {
                let n = LANES.min(p.w - ix0);
                for c in 0..LANES {
                    r[c] = if c < p.cin {
                        _mm512_maskz_loadu_ps(first(n), xp.add(c * hw + iy * p.w + ix0))
                    } else {
                        _mm512_setzero_ps()
                    };
                }
                transpose16(&mut r);
                let row = dp.add(((iy + p.pt) * wp + p.pl + ix0) * LANES);
                for j in 0..n {
                    _mm512_storeu_ps(row.add(j * LANES), r[j]);
                }
            }
        }
    }

    /// [`super::unpack_body`] through [`transpose16`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpack(p: &Plane, o: &[f32], y: &mut [f32]) {
        let wo = 4 * p.tw();
        let ohw = p.oh * p.ow;
        assert!(o.len() >= 4 * p.th() * wo * LANES && y.len() >= p.cout * ohw);
        let (op, yp) = (o.as_ptr(), y.as_mut_ptr());
        let mut r = [_mm512_setzero_ps(); 16];
        for oy in 0..p.oh {
            for ox0 in (0..p.ow).step_by(LANES) {
                let n = LANES.min(p.ow - ox0);
                for j in 0..LANES {
                    r[j] = if j < n {
                        _mm512_loadu_ps(op.add((oy * wo + ox0 + j) * LANES))
                    } else {
                        _mm512_setzero_ps()
                    };
                }
                transpose16(&mut r);
                for c in 0..p.cout {
                    _mm512_mask_storeu_ps(yp.add(c * ohw + oy * p.ow + ox0), first(n), r[c]);
                }
            }
        }
    }

    /// `a + k * b`.
    #[inline(always)]
    unsafe fn fma_k(a: __m512, k: f32, b: __m512) -> __m512 {
        _mm512_fmadd_ps(_mm512_set1_ps(k), b, a)
    }

    /// [`super::bt6`] on vectors.
    #[inline(always)]
    unsafe fn bt6(d: [__m512; 6]) -> [__m512; 6] {
        let d4_d2 = _mm512_sub_ps(d[4], d[2]);
        let d3_d1 = _mm512_sub_ps(d[3], d[1]);
        [
            fma_k(fma_k(d[4], 4.0, d[0]), -5.0, d[2]),
            fma_k(_mm512_add_ps(d[3], d[4]), -4.0, _mm512_add_ps(d[1], d[2])),
            fma_k(_mm512_sub_ps(d[4], d[3]), 4.0, _mm512_sub_ps(d[1], d[2])),
            fma_k(d4_d2, 2.0, d3_d1),
            fma_k(d4_d2, -2.0, d3_d1),
            fma_k(fma_k(d[5], 4.0, d[1]), -5.0, d[3]),
        ]
    }

    /// [`super::at6`] on vectors.
    #[inline(always)]
    unsafe fn at6(m: [__m512; 6]) -> [__m512; 4] {
        let (a, b) = (_mm512_add_ps(m[1], m[2]), _mm512_sub_ps(m[1], m[2]));
        let (c, e) = (_mm512_add_ps(m[3], m[4]), _mm512_sub_ps(m[3], m[4]));
        [
            _mm512_add_ps(_mm512_add_ps(m[0], a), c),
            fma_k(b, 2.0, e),
            fma_k(a, 4.0, c),
            _mm512_add_ps(fma_k(b, 8.0, e), m[5]),
        ]
    }

    /// [`super::input_block_body`] on vectors.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_block(p: &Plane, pp: &[f32], t0: usize, nb: usize, v: &mut [f32]) {
        let (tw, wp) = (p.tw(), 4 * p.tw() + 2);
        assert!(
            nb <= TB
                && t0 + nb <= p.tiles()
                && v.len() >= TB * TAPS * LANES
                && pp.len() >= (4 * p.th() + 2) * wp * LANES
        );
        let (src, vp) = (pp.as_ptr(), v.as_mut_ptr());
        let mut tmp = [[_mm512_setzero_ps(); 6]; 6];
        for t in 0..nb {
            let (ty, tx) = ((t0 + t) / tw, (t0 + t) % tw);
            let base = src.add((4 * ty * wp + 4 * tx) * LANES);
            for b in 0..6 {
                let d: [__m512; 6] =
                    std::array::from_fn(|a| _mm512_loadu_ps(base.add((a * wp + b) * LANES)));
                let r = bt6(d);
                for u in 0..6 {
                    tmp[u][b] = r[u];
                }
            }
            let vt = vp.add(t * TAPS * LANES);
            for u in 0..6 {
                let r = bt6(tmp[u]);
                for w in 0..6 {
                    _mm512_storeu_ps(vt.add((6 * u + w) * LANES), r[w]);
                }
            }
        }
    }

    /// [`super::output_block_body`] on vectors.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn output_block(
        p: &Plane,
        m: &[f32],
        t0: usize,
        nb: usize,
        bias: &[f32; LANES],
        o: &mut [f32],
    ) {
        let tw = p.tw();
        let wo = 4 * tw;
        assert!(
            nb <= TB
                && t0 + nb <= p.tiles()
                && m.len() >= TB * TAPS * LANES
                && o.len() >= 4 * p.th() * wo * LANES
        );
        let (mp, op) = (m.as_ptr(), o.as_mut_ptr());
        let bv = _mm512_loadu_ps(bias.as_ptr());
        let mut tmp = [[_mm512_setzero_ps(); 6]; 4];
        for t in 0..nb {
            let (ty, tx) = ((t0 + t) / tw, (t0 + t) % tw);
            let mt = mp.add(t * TAPS * LANES);
            for w in 0..6 {
                let col: [__m512; 6] =
                    std::array::from_fn(|u| _mm512_loadu_ps(mt.add((6 * u + w) * LANES)));
                let r = at6(col);
                for i in 0..4 {
                    tmp[i][w] = r[i];
                }
            }
            for i in 0..4 {
                let out = op.add(((4 * ty + i) * wo + 4 * tx) * LANES);
                let r = at6(tmp[i]);
                for q in 0..4 {
                    _mm512_storeu_ps(out.add(q * LANES), _mm512_add_ps(r[q], bv));
                }
            }
        }
    }

    /// [`super::products_portable`] with one fused multiply-add per term: per tap, the
    /// [`TB`] tiles' accumulators stay in registers while the `cin` weight vectors stream by.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn products(cin: usize, u: &[f32], v: &[f32], m: &mut [f32]) {
        assert!(
            cin <= LANES
                && u.len() >= TAPS * LANES * LANES
                && v.len() >= TB * TAPS * LANES
                && m.len() >= TB * TAPS * LANES
        );
        let (up, vp, mp) = (u.as_ptr(), v.as_ptr(), m.as_mut_ptr());
        for k in 0..TAPS {
            let uk = up.add(k * LANES * LANES);
            let mut acc = [_mm512_setzero_ps(); TB];
            for c in 0..cin {
                let uc = _mm512_loadu_ps(uk.add(c * LANES));
                for t in 0..TB {
                    let vb = _mm512_set1_ps(*vp.add((t * TAPS + k) * LANES + c));
                    acc[t] = _mm512_fmadd_ps(vb, uc, acc[t]);
                }
            }
            for t in 0..TB {
                _mm512_storeu_ps(mp.add((t * TAPS + k) * LANES), acc[t]);
            }
        }
    }
}
