//! Winograd F(4x4, 3x3): the transforms of [`Plane`]s whose output tile is 4x4 (`m == 4`).
//!
//! Each 4x4 output tile comes from a 6x6 input tile through 36 GEMMs (one per transformed tap),
//! 36 multiply-adds per channel pair for 16 outputs against F(2x2, 3x3)'s 16 for 4: 1.78x fewer
//! GEMM flops, and transformed buffers 2.25x the input instead of 4x (Lavin & Gray 2015, the
//! interpolation points 0, 1, -1, 2, -2 and infinity):
//!
//! ```text
//!        [4  0 -5  0  1  0]        [ 1/4    0    0 ]
//!        [0 -4 -4  1  1  0]        [-1/6 -1/6 -1/6 ]       [1  1  1  1  1  0]
//! B^T =  [0  4 -4 -1  1  0]   G =  [-1/6  1/6 -1/6 ]  A^T = [0  1 -1  2 -2  0]
//!        [0 -2 -1  2  1  0]        [1/24 1/12  1/6 ]       [0  1  1  4  4  0]
//!        [0  2 -1 -2  1  0]        [1/24 -1/12 1/6 ]       [0  1 -1  8 -8  1]
//!        [0  4  0 -5  0  1]        [  0    0    1  ]
//! ```
//!
//! The layout follows F(2x2)'s (`winograd.rs`): a padded input row is split once into its four
//! column phases (`col % 4`), so that the six columns of every tile are six contiguous runs
//! (phases 0-3 at tile `tx`, phases 0-1 at `tx + 1`); the horizontally transformed rows are
//! stored by row phase, so that the vertical pass reads each tile row's six source rows as six
//! contiguous runs over the tiles of all the block's images (on an 8x8 plane an image has only 4
//! tiles). The output transform runs over all the block's images too.
//!
//! Numerics: the larger coefficients (up to 8 in `A^T`, 5 in `B^T`, 1/24 in `G`) cost accuracy:
//! the error per output is about 20x F(2x2)'s (`WINO4_REL_TOL` in the tests bounds it), which is
//! why the speed rule takes F(4x4) only where it measured faster (`Geom::wino4_pays`).

use super::copy_run;
use super::winograd::{Plane, WinoScratch};

/// F(4x4, 3x3)'s `G` (also `winograd_cl.rs`'s, rounded to f32).
pub(super) const G: [[f64; 3]; 6] = [
    [0.25, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `G g G^T` for one 3x3 kernel `g` (row-major), in f64 and rounded once, so that the 1/6 and
/// 1/24 factors add no rounding of their own.
pub(super) fn transform_kernel4(g: &[f32; 9]) -> [f32; 36] {
    // t = G g (6x3)
    let mut t = [[0.0f64; 3]; 6];
    for (i, gi) in G.iter().enumerate() {
        for j in 0..3 {
            t[i][j] = (0..3).map(|k| gi[k] * f64::from(g[3 * k + j])).sum();
        }
    }
    let mut u = [0.0f32; 36];
    for i in 0..6 {
        for (j, gj) in G.iter().enumerate() {
            u[6 * i + j] = (0..3).map(|k| t[i][k] * gj[k]).sum::<f64>() as f32;
        }
    }
    u
}

/// Lanes per step of the transforms' fixed-array loops: the compiler turns them into vector
/// code, where plain loops over many streams (or iterator chains not inlined into the AVX2
/// build) stayed scalar.
const LANES: usize = 8;

/// `L` elements of `s` from `t`.
#[inline(always)]
fn lanes<const L: usize>(s: &[f32], t: usize) -> [f32; L] {
    let mut v = [0.0f32; L];
    v.copy_from_slice(&s[t..t + L]);
    v
}

/// `q[0..P][t]` interleaved into `out[P t + l]` for the `out.len() / P` whole tiles.
#[inline(always)]
fn merge_phases<const P: usize>(q: [&[f32]; P], out: &mut [f32]) {
    let full = out.len() / P;
    let mut t = 0;
    while t + LANES <= full {
        let v: [[f32; LANES]; P] = std::array::from_fn(|l| lanes::<LANES>(q[l], t));
        for i in 0..LANES {
            for l in 0..P {
                out[P * (t + i) + l] = v[l][i];
            }
        }
        t += LANES;
    }
    while t < full {
        for l in 0..P {
            out[P * t + l] = q[l][t];
        }
        t += 1;
    }
}

/// `p[l][k] = row[P k + l]` for the `row.len() / P` whole groups: all `P` column phases in
/// one pass, 8 groups per step (`ops::deinterleave` takes one phase per call, and a stride of 4
/// as a scalar `step_by` walk).
#[inline(always)]
fn split_phases<const P: usize>(row: &[f32], p: [&mut [f32]; P]) {
    let full = row.len() / P;
    let mut k = 0;
    while k + LANES <= full {
        let mut o = [[0.0f32; LANES]; P];
        let v = &row[P * k..P * (k + LANES)];
        for i in 0..LANES {
            for l in 0..P {
                o[l][i] = v[P * i + l];
            }
        }
        for l in 0..P {
            p[l][k..k + LANES].copy_from_slice(&o[l]);
        }
        k += LANES;
    }
    while k < full {
        for l in 0..P {
            p[l][k] = row[P * k + l];
        }
        k += 1;
    }
}

/// [`bt6`] on elements `t..t + L`.
#[inline(always)]
fn bt6_at<const L: usize>(d: &[&[f32]; 6], o: &mut [&mut [f32]; 6], t: usize) {
    let (a, b, c) = (
        lanes::<L>(d[0], t),
        lanes::<L>(d[1], t),
        lanes::<L>(d[2], t),
    );
    let (e, f, g) = (
        lanes::<L>(d[3], t),
        lanes::<L>(d[4], t),
        lanes::<L>(d[5], t),
    );
    let mut r = [[0.0f32; L]; 6];
    for l in 0..L {
        let (t1, t2) = (f[l] - 4.0 * c[l], e[l] - 4.0 * b[l]);
        let (t3, t4) = (f[l] - c[l], 2.0 * (e[l] - b[l]));
        r[0][l] = 4.0 * a[l] - 5.0 * c[l] + f[l];
        r[1][l] = t1 + t2;
        r[2][l] = t1 - t2;
        r[3][l] = t3 + t4;
        r[4][l] = t3 - t4;
        r[5][l] = 4.0 * b[l] - 5.0 * e[l] + g[l];
    }
    for (ok, rk) in o.iter_mut().zip(&r) {
        ok[t..t + L].copy_from_slice(rk);
    }
}

/// `out[i][t] = sum_j B^T[i][j] d[j][t]` over runs of the length of `out[0]`: one 6-point
/// input transform per `t`, [`LANES`] at a time.
#[inline(always)]
fn bt6(d: [&[f32]; 6], mut out: [&mut [f32]; 6]) {
    let n = out[0].len();
    let mut t = 0;
    while t + LANES <= n {
        bt6_at::<LANES>(&d, &mut out, t);
        t += LANES;
    }
    while t < n {
        bt6_at::<1>(&d, &mut out, t);
        t += 1;
    }
}

/// [`at6`] on elements `t..t + L`.
#[inline(always)]
fn at6_at<const L: usize>(m: &[&[f32]; 6], o: &mut [&mut [f32]; 4], t: usize, bias: f32) {
    let (m0, m1, m2) = (
        lanes::<L>(m[0], t),
        lanes::<L>(m[1], t),
        lanes::<L>(m[2], t),
    );
    let (m3, m4, m5) = (
        lanes::<L>(m[3], t),
        lanes::<L>(m[4], t),
        lanes::<L>(m[5], t),
    );
    let mut r = [[0.0f32; L]; 4];
    for l in 0..L {
        let (s12, d12) = (m1[l] + m2[l], m1[l] - m2[l]);
        let (s34, d34) = (m3[l] + m4[l], m3[l] - m4[l]);
        r[0][l] = m0[l] + s12 + s34 + bias;
        r[1][l] = d12 + 2.0 * d34 + bias;
        r[2][l] = s12 + 4.0 * s34 + bias;
        r[3][l] = d12 + 8.0 * d34 + m5[l] + bias;
    }
    for (ok, rk) in o.iter_mut().zip(&r) {
        ok[t..t + L].copy_from_slice(rk);
    }
}

/// `out[k][t] = sum_j A^T[k][j] m[j][t] + bias` over runs of the length of `out[0]`.
#[inline(always)]
fn at6(m: [&[f32]; 6], mut out: [&mut [f32]; 4], bias: f32) {
    let n = out[0].len();
    let mut t = 0;
    while t + LANES <= n {
        at6_at::<LANES>(&m, &mut out, t, bias);
        t += LANES;
    }
    while t < n {
        at6_at::<1>(&m, &mut out, t, bias);
        t += 1;
    }
}

/// The runs `at..at + len` of the chunks `0, stride, .., 5 * stride` of `s`: six distinct
/// mutable runs by splitting (no iterator adaptors: whatever is not inlined into the AVX2 build
/// runs as baseline code, and a per-row `array::from_fn` over `chunks_mut` took 7% of a 16ch
/// forward out of line).
#[inline(always)]
fn split6(s: &mut [f32], stride: usize, at: usize, len: usize) -> [&mut [f32]; 6] {
    let (a, s) = s.split_at_mut(stride);
    let (b, s) = s.split_at_mut(stride);
    let (c, s) = s.split_at_mut(stride);
    let (d, s) = s.split_at_mut(stride);
    let (e, f) = s.split_at_mut(stride);
    [
        &mut a[at..at + len],
        &mut b[at..at + len],
        &mut c[at..at + len],
        &mut d[at..at + len],
        &mut e[at..at + len],
        &mut f[at..at + len],
    ]
}

/// Four runs, as [`split6`].
#[inline(always)]
fn split4(s: &mut [f32], stride: usize, at: usize, len: usize) -> [&mut [f32]; 4] {
    let (a, s) = s.split_at_mut(stride);
    let (b, s) = s.split_at_mut(stride);
    let (c, d) = s.split_at_mut(stride);
    [
        &mut a[at..at + len],
        &mut b[at..at + len],
        &mut c[at..at + len],
        &mut d[at..at + len],
    ]
}

impl Plane {
    /// Input transform of channel `c` of every image in `x` (`[nb, cin, h, w]`) into `s.v`
    /// (`[36][cin][nt]`, `nt = nb * tiles()`).
    ///
    /// Horizontal pass per padded row: its four column phases, then six transformed rows of `tw`
    /// values, stored in `s.hrows` as `[slot][6][nb][th][tw]`, where slots 0-3 hold the rows
    /// of phase 0-3 of each tile row and slots 4-5 a second copy of phases 0-1 one tile row up
    /// (the fifth and sixth rows of a tile). So the vertical pass reads all images' tiles as six
    /// contiguous runs of `nt` values: long loops even on 8x8 planes (4 tiles per image).
    #[inline(always)]
    pub(super) fn transform_input4(&self, x: &[f32], c: usize, nt: usize, s: &mut WinoScratch) {
        let plane = self.cin * nt;
        let WinoScratch {
            v, hrows, prow, ev, ..
        } = s;
        self.transform_input4_to(
            x,
            c,
            nt,
            hrows,
            prow,
            ev,
            &mut v[..36 * plane],
            plane,
            c * nt,
        );
    }

    /// [`Self::transform_input4`] into `out`: tap `k`'s `nt` values at `k * kstride + base`
    /// (the forward's `[36][cin][nt]` has `kstride = cin * nt`, `base = c * nt`; the weight
    /// gradient's per-channel `[36][tp]` blocks `kstride = tp`, `base = 0`, `winograd_dw.rs`).
    /// `hrows`, `prow` and `ev` are the scratch rows [`WinoScratch`] holds for F(4x4).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) fn transform_input4_to(
        &self,
        x: &[f32],
        c: usize,
        nt: usize,
        hrows: &mut [f32],
        prow: &mut [f32],
        ev: &mut [f32],
        out: &mut [f32],
        kstride: usize,
        base: usize,
    ) {
        let (th, tw) = (self.th(), self.tw());
        let tiles = th * tw;
        let (hw, xlen) = (self.h * self.w, self.cin * self.h * self.w);
        let wp = 4 * (tw + 1);
        let (hb, prow, ph) = (
            &mut hrows[..36 * nt],
            &mut prow[..wp],
            &mut ev[..4 * (tw + 1)],
        );
        let xw = self.w.min(wp.saturating_sub(self.pl));
        // The padding columns of `prow` stay zero: each row writes only `pl..pl + xw`.
        prow.fill(0.0);
        for (img, xi) in x.chunks(xlen).enumerate() {
            let plane = &xi[c * hw..][..hw];
            for r in 0..4 * th + 2 {
                let (mr, par) = (r / 4, r % 4);
                // Slot `par` at tile row `mr`, and for phases 0-1 slot `4 + par` at `mr - 1`.
                let at = |slot: usize, row: usize| slot * 6 * nt + img * tiles + row * tw;
                let main = (mr < th).then(|| at(par, mr));
                let up = (par < 2 && mr >= 1).then(|| at(4 + par, mr - 1));
                let first = main.or(up).expect("every row has a slot");
                let iy = r as isize - self.pt as isize;
                if iy < 0 || iy >= self.h as isize {
                    for o in split6(&mut hb[first..], nt, 0, tw) {
                        o.fill(0.0);
                    }
                } else {
                    let src = &plane[iy as usize * self.w..][..xw];
                    copy_run(&mut prow[self.pl..self.pl + xw], src);
                    let (p0, rest) = ph.split_at_mut(tw + 1);
                    let (p1, rest) = rest.split_at_mut(tw + 1);
                    let (p2, p3) = rest.split_at_mut(tw + 1);
                    split_phases(prow, [&mut *p0, &mut *p1, &mut *p2, &mut *p3]);
                    let out = split6(&mut hb[first..], nt, 0, tw);
                    bt6(
                        [&p0[..tw], &p1[..tw], &p2[..tw], p3, &p0[1..], &p1[1..]],
                        out,
                    );
                }
                if let (Some(_), Some(u)) = (main, up) {
                    for i in 0..6 {
                        hb.copy_within(first + i * nt..first + i * nt + tw, u + i * nt);
                    }
                }
            }
        }
        let hb = &*hb;
        for i in 0..6 {
            let row = |slot: usize| &hb[(slot * 6 + i) * nt..][..nt];
            let d = [row(0), row(1), row(2), row(3), row(4), row(5)];
            bt6(d, split6(&mut out[i * kstride..], 6 * kstride, base, nt));
        }
    }

    /// Output transform of channel `o` of every image in `y` (`[nb, cout, oh, ow]`), plus
    /// `bias`: `A^T m A` as long loops over all the images' tiles, then one interleaving store
    /// per output row, clipping the last tile row and column.
    #[inline(always)]
    pub(super) fn transform_output4(
        &self,
        o: usize,
        nt: usize,
        bias: f32,
        y: &mut [f32],
        s: &mut WinoScratch,
    ) {
        let (th, tw) = (self.th(), self.tw());
        let tiles = th * tw;
        let plane = self.cout * nt;
        let (ohw, ylen) = (self.oh * self.ow, self.cout * self.oh * self.ow);
        let m = &s.m[..36 * plane];
        let (vert, horiz) = s.tmp[..28 * nt].split_at_mut(24 * nt);
        // Vertical pass: tile row k, column j of A^T m is vert[k * 6 + j].
        for j in 0..6 {
            let mk = |a: usize| &m[(6 * a + j) * plane + o * nt..][..nt];
            let ins = [mk(0), mk(1), mk(2), mk(3), mk(4), mk(5)];
            at6(ins, split4(&mut vert[j * nt..], 6 * nt, 0, nt), 0.0);
        }
        let full = self.ow / 4;
        for k in 0..4 {
            let vk = |j: usize| &vert[(6 * k + j) * nt..][..nt];
            let ins = [vk(0), vk(1), vk(2), vk(3), vk(4), vk(5)];
            at6(ins, split4(horiz, nt, 0, nt), bias);
            for (img, yi) in y.chunks_mut(ylen).enumerate() {
                let yp = &mut yi[o * ohw..][..ohw];
                for ty in 0..th {
                    let oy = 4 * ty + k;
                    if oy >= self.oh {
                        break;
                    }
                    let ql = |l: usize| &horiz[l * nt + img * tiles + ty * tw..][..tw];
                    let out = &mut yp[oy * self.ow..][..self.ow];
                    merge_phases([ql(0), ql(1), ql(2), ql(3)], &mut out[..4 * full]);
                    for l in 0..self.ow % 4 {
                        out[4 * full + l] = ql(l)[full];
                    }
                }
            }
        }
    }
}
