//! Winograd F(m x m, 3x3) in channels-last layout over the whole batch: the forward, input
//! gradient and weight gradient of stride-1 3x3 layers on small planes (those
//! `small_plane.rs` would run).
//!
//! `winograd.rs` transforms one image plane at a time, vectorised along its tiles, and runs
//! its GEMMs on blocks of at most 8 images: on a 4x4 plane (one F(4x4) tile, four F(2x2) ones)
//! that leaves GEMMs of 8-32 columns and transforms of 1-4 lanes, and it lost to the
//! small-plane path there (ResNet-18's 256-channel 4x4 stage at 64x64, batch 64, 1 thread,
//! forward 10.3 -> 12.5-21.8 ms). Here the batch is channels-last (`X[n][q][c]`, as
//! `small_plane.rs` lays it), so a tile's transform runs along its channels (64-512 lanes on
//! those layers), and each transformed tap is one GEMM over every tile of the batch:
//!
//! - weights: `U_k[o][c] = (G g G^T)[k]` for each kernel `g = w[o][c]` (rotated 180 degrees
//!   for the input gradient), vectorised along `c`, one tap row at a time inside the GEMM tasks;
//! - input: `V[r][k][c] = (B^T d B)[k]` for the `t x t` input tile `d` of tile row `r` (image
//!   and tile), zeros outside the plane (`t = m + 2`);
//! - `t * t` GEMMs `M[:, k, :] = V[:, k, :] . U_k^T` (`tiles x cin` times `cin x cout`, every
//!   tile of the batch as rows);
//! - output: `y = A^T m A` per tile, clipped at the plane's edges.
//!
//! On a 4x4 plane with a 3x3 kernel and pad 1 the small-plane path spends 100 multiply-adds per
//! channel pair and image (the taps inside the plane); F(2x2) spends 64, F(4x4) 36. The input
//! gradient is the same correlation of `dy` with the rotated kernel, channel axes swapped, over
//! `dy` padded by `2 - pad` (as in `winograd.rs`). The weight gradient is the forward's adjoint
//! in `U`, `dU_k = dM_k^T . V_k` with `dM = A dy A^T` per tile, one GEMM per tap over the
//! batch's tiles, then `dg = G^T dU G` ([`Plane::cl_weight_grad`]).
//!
//! Numerics: the transforms are `winograd.rs`'s and `winograd4.rs`'s matrices in a different
//! summation order; the tests bound the errors against f64 by `WINO_REL_TOL` (F(2x2)) or
//! `WINO4_REL_TOL` (F(4x4)) times the magnitudes of each output's tile, and the weight
//! gradient's by `CL_DW_TOL` times the largest `sum |dy| |x|` over each entry's kernel window.
//! Every GEMM is one task whatever the thread count, and sums across tasks run in a fixed
//! order, so results do not depend on the thread count; they do depend on the batch size (the
//! GEMMs' row count), as the small-plane path's already do.

use super::small_plane::{swap_inner, to_channels_last, view, view_mut, Shared};
use super::winograd::Plane;
use super::{add_bias, Geom, Override};
use crate::engine::ops::simd::simd_dispatch;
use crate::engine::ops::{unzeroed, zeros};
use ndarray::linalg::general_mat_mul;
use rayon::prelude::*;

/// F(2x2, 3x3) (Lavin & Gray 2015): `B^T`, `G`, `A^T`.
const BT2: [[f32; 4]; 4] = [
    [1.0, 0.0, -1.0, 0.0],
    [0.0, 1.0, 1.0, 0.0],
    [0.0, -1.0, 1.0, 0.0],
    [0.0, 1.0, 0.0, -1.0],
];
const G2: [[f32; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];
const AT2: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
/// `A` (`A^T` transposed), for the weight gradient's `dM = A dy A^T`.
const A2: [[f32; 2]; 4] = [[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, -1.0]];

/// F(4x4, 3x3), the points 0, 1, -1, 2, -2 and infinity (`winograd4.rs`'s matrices).
const BT4: [[f32; 6]; 6] = [
    [4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
    [0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
    [0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
    [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
    [0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
    [0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
];
const G4: [[f32; 3]; 6] = f32_rows(super::winograd4::G);

/// `m` rounded to f32, entry by entry.
const fn f32_rows<const R: usize>(m: [[f64; 3]; R]) -> [[f32; 3]; R] {
    let mut out = [[0.0f32; 3]; R];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < 3 {
            out[i][j] = m[i][j] as f32;
            j += 1;
        }
        i += 1;
    }
    out
}
const AT4: [[f32; 6]; 4] = [
    [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
    [0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
    [0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
    [0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
];
const A4: [[f32; 4]; 6] = [
    [1.0, 0.0, 0.0, 0.0],
    [1.0, 1.0, 1.0, 1.0],
    [1.0, -1.0, 1.0, -1.0],
    [1.0, 2.0, 4.0, 8.0],
    [1.0, -2.0, 4.0, -8.0],
    [0.0, 0.0, 0.0, 1.0],
];

/// The matrices of one tile size, as row slices: `B^T`, `G`, `A^T` and `A`.
struct Mats {
    bt: &'static [&'static [f32]],
    g: &'static [&'static [f32]],
    at: &'static [&'static [f32]],
    a: &'static [&'static [f32]],
}

static MATS2: Mats = Mats {
    bt: &[&BT2[0], &BT2[1], &BT2[2], &BT2[3]],
    g: &[&G2[0], &G2[1], &G2[2], &G2[3]],
    at: &[&AT2[0], &AT2[1]],
    a: &[&A2[0], &A2[1], &A2[2], &A2[3]],
};
static MATS4: Mats = Mats {
    bt: &[&BT4[0], &BT4[1], &BT4[2], &BT4[3], &BT4[4], &BT4[5]],
    g: &[&G4[0], &G4[1], &G4[2], &G4[3], &G4[4], &G4[5]],
    at: &[&AT4[0], &AT4[1], &AT4[2], &AT4[3]],
    a: &[&A4[0], &A4[1], &A4[2], &A4[3], &A4[4], &A4[5]],
};

fn mats(m: usize) -> &'static Mats {
    if m == 4 {
        &MATS4
    } else {
        &MATS2
    }
}

/// `dst += a * src` along a channel run (a plain zip the compiler vectorises at the width the
/// caller is compiled for).
#[inline(always)]
fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += a * s;
    }
}

/// The first `n` runs of `s` at `stride` apart (the rest `None`); a run is `stride` floats
/// long but the last, which ends with `s`.
#[inline(always)]
fn runs<const N: usize>(s: &[f32], n: usize, stride: usize) -> [Option<&[f32]>; N] {
    std::array::from_fn(|j| (j < n).then(|| &s[j * stride..]))
}

/// `out[i] = sum_j mat[i][j] * src[j]` over runs of `len` floats (output row `i` at `i *
/// stride_o` in `out`), skipping zero coefficients and absent (`None`, all-zero) sources; the
/// rows of `out` are overwritten.
#[inline(always)]
fn apply_rows(
    mat: &[&[f32]],
    src: &[Option<&[f32]>],
    out: &mut [f32],
    stride_o: usize,
    len: usize,
) {
    for (i, row) in mat.iter().enumerate() {
        let o = &mut out[i * stride_o..][..len];
        o.fill(0.0);
        for (&a, s) in row.iter().zip(src) {
            if let (true, Some(s)) = (a != 0.0, s) {
                axpy(o, a, &s[..len]);
            }
        }
    }
}

impl Plane {
    /// The `t x t` input tiles of one image (`x`: `[h*w][cin]`) into `v` (`[tiles][t*t][cin]`),
    /// `tmp`: `t * t * cin` scratch.
    #[inline(always)]
    fn cl_input_body(&self, x: &[f32], v: &mut [f32], tmp: &mut [f32]) {
        let (m, cin) = (self.m, self.cin);
        let (t, mt) = (m + 2, mats(m));
        let taps = t * t;
        for ty in 0..self.th() {
            for tx in 0..self.tw() {
                let vt = &mut v[(ty * self.tw() + tx) * taps * cin..][..taps * cin];
                // Vertical first: tmp[u][b] = sum_a BT[u][a] d[a][b], per input column b
                // (rows and columns outside the plane are the padding's zeros).
                for b in 0..t {
                    let ix = (tx * m + b) as isize - self.pl as isize;
                    let mut src: [Option<&[f32]>; 6] = [None; 6];
                    if ix >= 0 && (ix as usize) < self.w {
                        for (a, s) in src[..t].iter_mut().enumerate() {
                            let iy = (ty * m + a) as isize - self.pt as isize;
                            if iy >= 0 && (iy as usize) < self.h {
                                *s = Some(&x[(iy as usize * self.w + ix as usize) * cin..][..cin]);
                            }
                        }
                    }
                    // tmp laid out [u][b][cin]: row u of column b at (u * t + b) * cin.
                    apply_rows(mt.bt, &src[..t], &mut tmp[b * cin..], t * cin, cin);
                }
                // Then horizontal: V[u][v] = sum_b tmp[u][b] BT[v][b].
                for u in 0..t {
                    let rows = &tmp[u * t * cin..][..t * cin];
                    let src = runs::<6>(rows, t, cin);
                    apply_rows(mt.bt, &src[..t], &mut vt[u * t * cin..], cin, cin);
                }
            }
        }
    }

    /// The output gradient's tiles of one image (`dy`: `[oh*ow][cout]`) through `A dy A^T` into
    /// `dm` (`[tiles][t*t][cout]`), zeros outside the plane; `tmp`: `t * m * cout`.
    #[inline(always)]
    fn cl_dy_body(&self, dy: &[f32], dm: &mut [f32], tmp: &mut [f32]) {
        let (m, cout) = (self.m, self.cout);
        let (t, mt) = (m + 2, mats(m));
        let taps = t * t;
        for ty in 0..self.th() {
            for tx in 0..self.tw() {
                let dmt = &mut dm[(ty * self.tw() + tx) * taps * cout..][..taps * cout];
                // tmp[u][q] = sum_p A[u][p] dy[p][q], per output column q.
                for q in 0..m {
                    let ox = tx * m + q;
                    let mut src: [Option<&[f32]>; 4] = [None; 4];
                    if ox < self.ow {
                        for (p, s) in src[..m].iter_mut().enumerate() {
                            let oy = ty * m + p;
                            if oy < self.oh {
                                *s = Some(&dy[(oy * self.ow + ox) * cout..][..cout]);
                            }
                        }
                    }
                    apply_rows(mt.a, &src[..m], &mut tmp[q * cout..], m * cout, cout);
                }
                // dM[u][v] = sum_q tmp[u][q] A[v][q].
                for u in 0..t {
                    let src = runs::<4>(&tmp[u * m * cout..], m, cout);
                    apply_rows(mt.a, &src[..m], &mut dmt[u * t * cout..], cout, cout);
                }
            }
        }
    }

    /// The weight gradient of the forward correlation: `dw2` (`[co][9][ci]`, taps outside,
    /// overwritten) from channels-last `x` (`[n][h*w][cin]`) and `dy` (`[n][oh*ow][cout]`).
    ///
    /// The forward is `y = A^T [U ⊙ V] A` per tile, so `dU = sum over tiles of dM ⊙ V` with
    /// `dM = A dy A^T`, and `dg = G^T dU G` (Lavin & Gray 2015): per transformed tap `k`, `dU_k
    /// = dM_k^T . V_k`, one GEMM over every tile of the batch (`cout x tiles` times `tiles x
    /// cin`). Each tap row `i` is one task: its `t` GEMMs and its share of `G^T dU G`'s first
    /// pass, `P_i[b] = sum_j dU_ij G[j][b]`; the rows' shares are then summed in row order
    /// (`dg[a][b] = sum_i G[i][a] P_i[b]`), so results do not depend on the thread count.
    pub(super) fn cl_weight_grad(&self, n: usize, x: &[f32], dy: &[f32], dw2: &mut [f32]) {
        let (ci, co, m) = (self.cin, self.cout, self.m);
        let t = m + 2;
        let taps = t * t;
        let tiles = self.tiles();
        let rows = n * tiles;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut v = unzeroed(rows * taps * ci);
        v.par_chunks_mut(tiles * taps * ci)
            .zip(x.par_chunks(hw * ci))
            .with_max_len(1)
            .for_each_init(
                || vec![0.0f32; taps * ci],
                |tmp, (vi, xi)| cl_input(self, xi, vi, tmp),
            );
        let mut dm = unzeroed(rows * taps * co);
        dm.par_chunks_mut(tiles * taps * co)
            .zip(dy.par_chunks(ohw * co))
            .with_max_len(1)
            .for_each_init(
                || vec![0.0f32; t * m * co],
                |tmp, (di, dyi)| cl_dy(self, dyi, di, tmp),
            );
        let plane = co * ci;
        let mut shares = zeros(t * 3 * plane);
        shares
            .par_chunks_mut(3 * plane)
            .enumerate()
            .with_max_len(1)
            .for_each(|(i, pi)| {
                let mut du = vec![0.0f32; plane];
                for j in 0..t {
                    let k = i * t + j;
                    let a = view(&dm, k * co, rows, co, taps * co);
                    let b = view(&v, k * ci, rows, ci, taps * ci);
                    general_mat_mul(
                        1.0,
                        &a.t(),
                        &b,
                        0.0,
                        &mut ndarray::ArrayViewMut2::from_shape((co, ci), &mut du[..])
                            .expect("dU fits its buffer"),
                    );
                    add_share(m, j, &du, pi);
                }
            });
        drop((v, dm));
        dw2.par_chunks_mut(9 * ci)
            .enumerate()
            .for_each(|(o, d)| collect_shares(m, o, co, ci, &shares, d));
    }

    /// The products of one image (`mm`: `[tiles][t*t][cout]`) through `A^T m A` into its
    /// channels-last output (`y`: `[oh*ow][cout]`, every entry written); `tmp`: `m * t * cout`.
    #[inline(always)]
    fn cl_output_body(&self, mm: &[f32], y: &mut [f32], tmp: &mut [f32]) {
        let (m, cout) = (self.m, self.cout);
        let (t, mt) = (m + 2, mats(m));
        let taps = t * t;
        let mut out = vec![0.0f32; m * cout];
        for ty in 0..self.th() {
            for tx in 0..self.tw() {
                let mt_ = &mm[(ty * self.tw() + tx) * taps * cout..][..taps * cout];
                // tmp[p][v] = sum_u AT[p][u] M[u][v], per column v.
                for vv in 0..t {
                    let src = runs::<6>(&mt_[vv * cout..], t, t * cout);
                    apply_rows(mt.at, &src[..t], &mut tmp[vv * cout..], t * cout, cout);
                }
                // y[p][q] = sum_v tmp[p][v] AT[q][v], the rows inside the plane.
                for p in 0..m {
                    let oy = ty * m + p;
                    if oy >= self.oh {
                        break;
                    }
                    let rows = &tmp[p * t * cout..][..t * cout];
                    let src = runs::<6>(rows, t, cout);
                    apply_rows(mt.at, &src[..t], &mut out, cout, cout);
                    for q in 0..m {
                        let ox = tx * m + q;
                        if ox >= self.ow {
                            break;
                        }
                        y[(oy * self.ow + ox) * cout..][..cout]
                            .copy_from_slice(&out[q * cout..][..cout]);
                    }
                }
            }
        }
    }

    /// The correlation of `n` channels-last images `x` (`[n][h*w][cin]`) with ONNX weights
    /// given taps-outside (`w2`: `[co][9][ci]`), channels-last out (`[n][oh*ow][cout]`).
    /// `flip`: the input gradient's correlation (`cin = co`, `cout = ci`, the kernel rotated);
    /// else the forward's (`cin = ci`, `cout = co`).
    ///
    /// The weights are transformed one tap row `i` at a time inside the GEMM tasks, each tap's
    /// `co x ci` matrix just before its GEMM: the whole transform (`t * t / 9` times the
    /// weights, 9.4 MB for 256 channels under F(4x4)) written out and read back took as long
    /// as a third of the GEMMs.
    pub(super) fn cl_run(&self, n: usize, x: &[f32], w2: &[f32], flip: bool) -> Vec<f32> {
        let (cin, cout, m) = (self.cin, self.cout, self.m);
        let (co, ci) = if flip { (cin, cout) } else { (cout, cin) };
        let t = m + 2;
        let taps = t * t;
        let tiles = self.tiles();
        let rows = n * tiles;
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let mut v = unzeroed(rows * taps * cin);
        v.par_chunks_mut(tiles * taps * cin)
            .zip(x.par_chunks(hw * cin))
            .with_max_len(1)
            .for_each_init(
                || vec![0.0f32; taps * cin],
                |tmp, (vi, xi)| cl_input(self, xi, vi, tmp),
            );
        let mut mm = unzeroed(rows * taps * cout);
        let mp = Shared(mm.as_mut_ptr());
        (0..t).into_par_iter().for_each(|i| {
            let mut ti = vec![0.0f32; 3 * co * ci];
            let mut u = vec![0.0f32; co * ci];
            tap_row(m, flip, i, co, ci, w2, &mut ti);
            for j in 0..t {
                tap(m, j, co, ci, &ti, &mut u);
                let k = i * t + j;
                // M[:, k, :] = V[:, k, :] . W_k, W_k = U^T (forward) or U (input gradient).
                let a = view(&v, k * cin, rows, cin, taps * cin);
                // SAFETY: this task alone writes tap k's columns of every row.
                let mut c = unsafe { view_mut(mp.ptr(), k * cout, rows, cout, taps * cout) };
                let b = view(&u, 0, co, ci, ci);
                if flip {
                    general_mat_mul(1.0, &a, &b, 0.0, &mut c);
                } else {
                    general_mat_mul(1.0, &a, &b.t(), 0.0, &mut c);
                }
            }
        });
        drop(v);
        let mut y = unzeroed(n * ohw * cout);
        y.par_chunks_mut(ohw * cout)
            .zip(mm.par_chunks(tiles * taps * cout))
            .with_max_len(1)
            .for_each_init(
                || vec![0.0f32; t * m * cout],
                |tmp, (yi, mi)| cl_output(self, mi, yi, tmp),
            );
        y
    }
}

simd_dispatch! {
    /// [`Plane::cl_input_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn cl_input(p: &Plane, x: &[f32], v: &mut [f32], tmp: &mut [f32])
        => Plane::cl_input_body, (p, x, v, tmp); ["avx512f", "avx2"]
}

simd_dispatch! {
    /// [`Plane::cl_dy_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn cl_dy(p: &Plane, dy: &[f32], dm: &mut [f32], tmp: &mut [f32])
        => Plane::cl_dy_body, (p, dy, dm, tmp); ["avx512f", "avx2"]
}

/// `P[b] += G[j][b] dU` for `b` in 0..3 (`p`: `[3][co*ci]`, `du`: `[co*ci]`).
#[inline(always)]
fn add_share_body(m: usize, j: usize, du: &[f32], p: &mut [f32]) {
    let g = mats(m).g[j];
    for (b, pb) in p.chunks_exact_mut(du.len()).enumerate() {
        if g[b] != 0.0 {
            axpy(pb, g[b], du);
        }
    }
}

/// Output channel `o` of `dg[a][b] = sum_i G[i][a] P_i[b]` (`shares`: `[t][3][co][ci]`) into
/// `d` (`[9][ci]`, overwritten), summed in row order `i`.
#[inline(always)]
fn collect_shares_body(m: usize, o: usize, co: usize, ci: usize, shares: &[f32], d: &mut [f32]) {
    let (t, g) = (m + 2, mats(m).g);
    d.fill(0.0);
    for (i, gi) in g.iter().enumerate().take(t) {
        for b in 0..3 {
            let pib = &shares[((i * 3 + b) * co + o) * ci..][..ci];
            for (a, &ga) in gi.iter().enumerate() {
                if ga != 0.0 {
                    axpy(&mut d[(3 * a + b) * ci..][..ci], ga, pib);
                }
            }
        }
    }
}

simd_dispatch! {
    /// [`add_share_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn add_share(m: usize, j: usize, du: &[f32], p: &mut [f32])
        => add_share_body, (m, j, du, p); ["avx512f", "avx2"]
}

simd_dispatch! {
    /// [`collect_shares_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn collect_shares(m: usize, o: usize, co: usize, ci: usize, shares: &[f32], d: &mut [f32])
        => collect_shares_body, (m, o, co, ci, shares, d); ["avx512f", "avx2"]
}

simd_dispatch! {
    /// [`Plane::cl_output_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn cl_output(p: &Plane, mm: &[f32], y: &mut [f32], tmp: &mut [f32])
        => Plane::cl_output_body, (p, mm, y, tmp); ["avx512f", "avx2"]
}

/// Tap row `i` of the weight transform, half done: `T[b][o][c] = sum_a G[i][a] g[a][b]` for
/// each kernel `g = w[o][c]` (rotated 180 degrees with `flip`, the input gradient's), from the
/// weights taps-outside (`w2`: `[co][9][ci]`) into `ti` (`[3][co][ci]`).
#[inline(always)]
fn tap_row_body(m: usize, flip: bool, i: usize, co: usize, ci: usize, w2: &[f32], ti: &mut [f32]) {
    let g = &mats(m).g[i..=i];
    for o in 0..co {
        let wo = &w2[o * 9 * ci..][..9 * ci];
        for b in 0..3 {
            let src: [Option<&[f32]>; 3] = std::array::from_fn(|a| {
                let k = if flip { 8 - (3 * a + b) } else { 3 * a + b };
                Some(&wo[k * ci..][..ci])
            });
            apply_rows(g, &src, &mut ti[(b * co + o) * ci..], 0, ci);
        }
    }
}

/// The transformed weights of tap `(i, j)`: `U[o][c] = sum_b T[b][o][c] G[j][b]` (`ti` from
/// [`tap_row_body`]) into `u` (`[co][ci]`).
#[inline(always)]
fn tap_body(m: usize, j: usize, co: usize, ci: usize, ti: &[f32], u: &mut [f32]) {
    let g = &mats(m).g[j..=j];
    for o in 0..co {
        let src: [Option<&[f32]>; 3] =
            std::array::from_fn(|b| Some(&ti[(b * co + o) * ci..][..ci]));
        apply_rows(g, &src, &mut u[o * ci..], 0, ci);
    }
}

simd_dispatch! {
    /// [`tap_row_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn tap_row(m: usize, flip: bool, i: usize, co: usize, ci: usize, w2: &[f32], ti: &mut [f32])
        => tap_row_body, (m, flip, i, co, ci, w2, ti); ["avx512f", "avx2"]
}

simd_dispatch! {
    /// [`tap_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn tap(m: usize, j: usize, co: usize, ci: usize, ti: &[f32], u: &mut [f32])
        => tap_body, (m, j, co, ci, ti, u); ["avx512f", "avx2"]
}

impl Geom {
    /// Forward: `y` (`[n, co, oh, ow]`, every entry written) `= conv(x, w) + bias`.
    pub(super) fn wino_cl_forward(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let p = self.wino_forward_plane();
        let (n, hw, ohw) = (self.n, self.h * self.w, self.oh * self.ow);
        let xn = to_channels_last(x, n, self.ci, hw);
        let yn = p.cl_run(n, &xn, &self.taps_outside(w), false);
        swap_inner(&yn, y, n, ohw, self.co);
        if let Some(b) = bias {
            y.par_chunks_mut(self.co * ohw)
                .for_each(|yi| add_bias(yi, ohw, b));
        }
    }

    /// Backward: `dx` (`[n, ci, h, w]`, every entry written) when given, and `dw` (`[co, ci,
    /// 3, 3]`, overwritten), from `dy`: the input gradient here; the weight gradient here too
    /// where [`Geom::wino_cl_dw_pays`], else the small-plane path's.
    pub(super) fn wino_cl_backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
    ) {
        let (n, hw, ohw) = (self.n, self.h * self.w, self.oh * self.ow);
        let dyn_ = to_channels_last(dy, n, self.co, ohw);
        if let Some(dx) = dx {
            let p = self.wino_backward_plane();
            let dxn = p.cl_run(n, &dyn_, &self.taps_outside(w), true);
            swap_inner(&dxn, dx, n, hw, self.ci);
        }
        if !self.wino_cl_dw_pays() {
            return self.small_plane_backward(x, w, dy, None, dw);
        }
        let mut p = self.wino_forward_plane();
        p.m = CL_DW_TILE;
        let xn = to_channels_last(x, n, self.ci, hw);
        let mut dw2 = zeros(self.co * 9 * self.ci);
        p.cl_weight_grad(n, &xn, &dyn_, &mut dw2);
        // [o][t][c] -> [o][c][t].
        swap_inner(&dw2, dw, self.co, 9, self.ci);
    }
}

/// Output tile side of the weight gradient here.
const CL_DW_TILE: usize = 4;

/// Benchmark override of [`Geom::wino_cl_dw_pays`]: `Some(true)` this path's weight gradient on
/// every layer here, `Some(false)` the small-plane path's, `None` the speed rule.
static CL_DW: Override = Override::new();

/// Sets the override of [`Geom::wino_cl_dw_pays`] (benchmarks, A/B timing); not for library
/// users.
#[doc(hidden)]
pub fn set_winograd_cl_weight_grad(mode: Option<bool>) {
    CL_DW.set(mode);
}

/// Benchmark override of [`Geom::wino_cl_pays`]: `Some(true)` every eligible layer here,
/// `Some(false)` none, `None` the speed rule.
static CL: Override = Override::new();

/// Sets the override of which small-plane layers run here (benchmarks, A/B timing); not for
/// library users.
#[doc(hidden)]
pub fn set_winograd_cl(mode: Option<bool>) {
    CL.set(mode);
}

/// Fewest channels in and out for this path on planes under 8x8 (where the small-plane path
/// runs the forward otherwise), see [`Geom::wino_cl_pays`].
const CL_MIN_CHANNELS: usize = 64;
/// Fewest channels in and out on 8x8 to 15x15 planes, where Winograd's plane-wise path runs
/// otherwise: 64 channels lost or tied in training steps, 72 won.
const CL_MIN_CHANNELS_8PX: usize = 72;
/// Fewest channels in and out on 16x16 planes: 128 won, 64 and 72 lost.
const CL_MIN_CHANNELS_16PX: usize = 128;
/// Largest output plane (pixels) for this path: 16x16. Its GEMMs have `n * tiles` rows, and on
/// larger planes its transforms and buffers grow with them (32x32 layers were not timed).
const CL_MAX_PLANE: usize = 256;
/// Smallest output side: a 4x4 plane fills one F(4x4) tile; 2x2 planes cost the small-plane
/// path only the 16 products per channel pair that Winograd would spend as well.
const CL_MIN_SIDE: usize = 4;

/// Whether the speed rule decides (no benchmark override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    CL.decide(|| true) && !CL.decide(|| false)
}

impl Geom {
    /// Whether a layer can run here: a stride-1 3x3 layer that Winograd can take, on the
    /// small-plane path or a Winograd one, with output planes of at most [`CL_MAX_PLANE`]
    /// pixels that fill a tile.
    pub(super) fn wino_cl_eligible(&self) -> bool {
        (self.small_plane || (self.winograd && self.oh * self.ow <= CL_MAX_PLANE))
            && self.winograd_eligible()
            && self.oh.min(self.ow) >= CL_MIN_SIDE
            && self.h.min(self.w) >= CL_MIN_SIDE
    }

    /// Whether it pays over the small-plane path (planes under 8x8) or Winograd's plane-wise
    /// path (with, under 128 channels on 8x8 to 15x15 planes, the small-plane weight gradient):
    /// from [`CL_MIN_CHANNELS`] channels in and out under 8x8, [`CL_MIN_CHANNELS_8PX`] under
    /// 16x16, [`CL_MIN_CHANNELS_16PX`] on 16x16. 1 thread, AVX-512 host (Cooperlake kernels),
    /// F(4x4), criterion (`conv_kernels` group `winograd_cl`), the rule without this path ->
    /// this path with the small-plane weight gradient -> this path's weight gradient too, ms:
    ///
    /// | layer (batch)            | forward       | backward               |
    /// |--------------------------|---------------|------------------------|
    /// | 256ch 4x4 (64)           | 10.6 -> 6.07  | 19.95 -> 16.2 -> 12.7  |
    /// | 512ch 4x4 (64)           | 41.9 -> 25.8  | 84.9 -> 62.7 -> 47-48  |
    /// | 152ch 4x4 (64)           | 3.68 -> 2.19  | 6.96 -> 5.65 -> 4.16   |
    /// | 72ch 8x8 (64)            | 3.15 -> 3.15  | 7.17 -> 6.96 -> 6.2-6.4|
    /// | 64ch 8x8 (128)           | 5.39 -> 5.06  | 12.1 -> 11.4 -> 9.5    |
    /// | 128ch 8x8 (64)           | 9.31 -> 7.57  | 21.3 -> 22.3 -> 14.4   |
    /// | 128ch 16x16 (64)         | 37.2 -> 30.7  | 71.0 -> 95.6 -> 60.5   |
    ///
    /// Winograd layers of 128+ channels in training steps (`--profile-nodes`, 1 thread, batch
    /// 64, per layer, plane-wise Winograd with its own weight gradient -> here): resnet18@64's
    /// 128ch 8x8 forward 9.3-11.0 -> 6.2-7.5 ms, backward 19.0-20.3 -> 11.5-17.6;
    /// resnet18@128's 256ch 8x8 35.3-37.2 -> 21.6-22.3 and 68.9-73.5 -> 40.3-51.6, its 128ch
    /// 16x16 31.1-31.7 -> 29.6-30.2 and 67.8-69.4 -> 55.2-56.9; its Tucker-2 form's 152ch 8x8
    /// cores 11.8-11.9 -> 8.7-9.2 and 28.0-30.7 -> 16.8-17.3. But 16x16 planes of fewer
    /// channels lost: resnet18@64's 64ch 9.4-9.6 -> 12.3-14.7 forward, 19.0-19.4 -> 20.9-23.1
    /// backward; the Tucker-2 form's 72ch cores at 128x128 11.1-11.3 -> 13.3-14.2 and 22.4-24.1
    /// -> 26.4-28.1.
    /// Under 128 channels, in training steps (`elrt speed --profile-nodes`, 1 thread,
    /// alternating builds), the changed layers, old -> new ms per step: resnet18@64 (256ch 4x4) 89.2-90.1 -> 49.6-51.5;
    /// resnet18_tucker2@64 (152ch 4x4, 72ch 8x8 cores) 61.1-62.6 -> 46.3-48.5, per 72ch core
    /// forward 3.2-3.3 -> 2.9-3.1, backward 7.0-7.1 -> 5.2-6.0. But ResNet-20's 64-channel 8x8
    /// stage (batch 128) lost its forward (25.9-26.9 -> 28.1-28.9 ms per step over its 5
    /// layers) and its backward was noise (55.8-57.2 -> 48.0-57.0): 64 channels stay on the
    /// plane-wise path on 8x8 planes. 32-channel 8x8 cores (ResNet-20's Tucker-2 form) lost
    /// forward and backward (1.9 / 3.1 -> 2.2 / 3.6 ms, with the small-plane weight gradient).
    /// F(2x2) here lost to F(4x4) (resnet18@64's 4x4 layers forward 8.5 against 7.7 in a first
    /// version).
    /// Whether the weight gradient runs here too (rather than on the small-plane path): on
    /// every layer this path takes (see the table above).
    pub(super) fn wino_cl_dw_pays(&self) -> bool {
        CL_DW.decide(|| true)
    }

    pub(super) fn wino_cl_pays(&self) -> bool {
        !super::winograd::switched_off()
            && CL.decide(|| {
                let ch = self.ci.min(self.co);
                match self.oh * self.ow {
                    p if p < 64 => ch >= CL_MIN_CHANNELS,
                    p if p < CL_MAX_PLANE => ch >= CL_MIN_CHANNELS_8PX,
                    _ => ch >= CL_MIN_CHANNELS_16PX,
                }
            })
    }
}
