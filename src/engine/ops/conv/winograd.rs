//! Winograd F(2x2, 3x3) for ungrouped, stride-1, undilated 3x3 convolutions: forward and input
//! gradient.
//!
//! im2col + GEMM spends `9 * ci` multiply-adds per output; Winograd computes each 2x2 output tile
//! from a 4x4 input tile with 16 multiply-adds per channel pair in the transformed domain, 2.25x
//! fewer (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015):
//!
//! - weight transform, once per call: `U[k][o][c] = (G g G^T)[k]` for each 3x3 kernel `g`;
//! - input transform: `V[k][c][t] = (B^T d B)[k]` for each 4x4 input tile `d` (stride 2 over the
//!   padded input, partial tiles at odd output edges read zeros);
//! - 16 GEMMs `M[k] = U[k] · V[k]` (`co x ci` times `ci x tiles`), the same sgemm as im2col;
//! - output transform: `y = A^T m A + bias` per tile, clipped at the edges.
//!
//! The transforms run over whole rows of tiles so that their arithmetic is contiguous in the tile
//! index and vectorises: the input's rows are first transformed horizontally (even/odd columns
//! split once per row), then four transformed rows combine into one row of tiles.
//!
//! The input gradient is the same machinery applied to `dy`: `dx` is the correlation of `dy`
//! with the kernel rotated 180 degrees and its channel axes swapped, over `dy` padded by
//! `2 - pad` on each side (the "full" convolution relation), so pads of at most 2 qualify.
//! The weight gradient stays on im2col (it would need a third, differently shaped transform).
//!
//! Several images share one set of 16 GEMMs when an image has few tiles (as `block.rs` does for
//! im2col), inside the fixed parts of the batch, so results never depend on the thread count.
//!
//! Numerics: the transforms add and halve, so the error is a small multiple of im2col's; the
//! tests bound it per output by `WINO_REL_TOL * sum |w| |x|` against an f64 reference.

use super::{mat, mat_mut, Geom};
use ndarray::linalg::general_mat_mul;
use std::sync::atomic::{AtomicU8, Ordering};

/// Tiles per set of 16 GEMMs that a block of images aims for: below this the GEMMs' packing
/// dominates (as with im2col's `block::BLOCK_COLS`).
pub(super) const WINO_TILES: usize = 256;

/// One stride-1 3x3 correlation as the kernels see it: `cin` planes of `h x w` in, padded by
/// `pt` / `pl` at the top / left (the far pads follow from the output size), `cout` planes of
/// `oh x ow` out.
#[derive(Clone, Copy, Debug)]
pub(super) struct Plane {
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub pt: usize,
    pub pl: usize,
}

impl Plane {
    fn th(&self) -> usize {
        self.oh.div_ceil(2)
    }

    fn tw(&self) -> usize {
        self.ow.div_ceil(2)
    }

    pub fn tiles(&self) -> usize {
        self.th() * self.tw()
    }
}

/// Scratch of one rayon task.
pub(super) struct WinoScratch {
    /// Transformed inputs `[16][cin][T]`.
    v: Vec<f32>,
    /// Products `[16][cout][T]`.
    m: Vec<f32>,
    /// One padded input row, then its even and odd columns.
    prow: Vec<f32>,
    ev: Vec<f32>,
    od: Vec<f32>,
    /// Horizontally transformed rows of one channel: `[2*th+2][4][tw]`.
    hrows: Vec<f32>,
    /// Output transform temporaries: `[8][tw]`.
    tmp: Vec<f32>,
}

impl WinoScratch {
    /// Room for `images` images of every plane in `planes`.
    pub fn new(planes: &[Plane], images: usize) -> Self {
        let mut s = WinoScratch {
            v: Vec::new(),
            m: Vec::new(),
            prow: Vec::new(),
            ev: Vec::new(),
            od: Vec::new(),
            hrows: Vec::new(),
            tmp: Vec::new(),
        };
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        };
        for p in planes {
            let (th, tw, t) = (p.th(), p.tw(), p.tiles() * images);
            grow(&mut s.v, 16 * p.cin * t);
            grow(&mut s.m, 16 * p.cout * t);
            grow(&mut s.prow, 2 * tw + 2);
            grow(&mut s.ev, tw + 1);
            grow(&mut s.od, tw + 1);
            grow(&mut s.hrows, (2 * th + 2) * 4 * tw);
            grow(&mut s.tmp, 8 * tw);
        }
        s
    }
}

/// `G g G^T` for one 3x3 kernel `g` (row-major), `G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]`.
fn transform_kernel(g: &[f32; 9]) -> [f32; 16] {
    // Rows: t = G g (4x3).
    let mut t = [0.0f32; 12];
    for j in 0..3 {
        let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
        t[j] = a;
        t[3 + j] = 0.5 * (a + b + c);
        t[6 + j] = 0.5 * (a - b + c);
        t[9 + j] = c;
    }
    let mut u = [0.0f32; 16];
    for i in 0..4 {
        let (a, b, c) = (t[3 * i], t[3 * i + 1], t[3 * i + 2]);
        u[4 * i] = a;
        u[4 * i + 1] = 0.5 * (a + b + c);
        u[4 * i + 2] = 0.5 * (a - b + c);
        u[4 * i + 3] = c;
    }
    u
}

/// Transformed weights `U[16][rows][cols]` of ONNX weights `w` `[co, ci, 3, 3]`. Forward:
/// `rows = co`, `cols = ci`. With `flip` (input gradient): the kernel rotated 180 degrees with
/// its channel axes swapped, `rows = ci`, `cols = co`.
pub(super) fn transform_weights(w: &[f32], co: usize, ci: usize, flip: bool) -> Vec<f32> {
    let mut u = vec![0.0f32; 16 * co * ci];
    let plane = co * ci;
    for o in 0..co {
        for c in 0..ci {
            let src = &w[(o * ci + c) * 9..][..9];
            let mut g = [0.0f32; 9];
            for (i, gi) in g.iter_mut().enumerate() {
                *gi = if flip { src[8 - i] } else { src[i] };
            }
            let t = transform_kernel(&g);
            let at = if flip { c * co + o } else { o * ci + c };
            for (k, &tk) in t.iter().enumerate() {
                u[k * plane + at] = tk;
            }
        }
    }
    u
}

/// `dst[i] = f(a[i], b[i])`: one destination per loop, so that each is a plain vectorisable zip.
#[inline(always)]
fn comb(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    dst.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(d, (&a, &b))| *d = f(a, b))
}

impl Plane {
    /// Input transform of one channel plane `x` (`h x w`) into `v`, the `[16][cin][T]` buffer,
    /// at channel `c` and tiles `t0..t0 + tiles`.
    fn transform_input(&self, x: &[f32], c: usize, t0: usize, nt: usize, s: &mut WinoScratch) {
        let (th, tw) = (self.th(), self.tw());
        let wp = 2 * tw + 2;
        let rows = 2 * th + 2;
        let hrows = &mut s.hrows[..rows * 4 * tw];
        let (prow, ev, od) = (&mut s.prow[..wp], &mut s.ev[..tw + 1], &mut s.od[..tw + 1]);
        // Horizontal pass: each padded row r becomes four rows of tw values (d B per tile).
        let xw = self.w.min(wp.saturating_sub(self.pl));
        for r in 0..rows {
            let hr = &mut hrows[r * 4 * tw..(r + 1) * 4 * tw];
            let iy = r as isize - self.pt as isize;
            if iy < 0 || iy >= self.h as isize {
                hr.fill(0.0);
                continue;
            }
            let src = &x[iy as usize * self.w..][..self.w];
            prow.fill(0.0);
            prow[self.pl..self.pl + xw].copy_from_slice(&src[..xw]);
            for m in 0..=tw {
                ev[m] = prow[2 * m];
                od[m] = prow[2 * m + 1];
            }
            let (h0, rest) = hr.split_at_mut(tw);
            let (h1, rest) = rest.split_at_mut(tw);
            let (h2, h3) = rest.split_at_mut(tw);
            for t in 0..tw {
                let (e0, o0, e1, o1) = (ev[t], od[t], ev[t + 1], od[t + 1]);
                h0[t] = e0 - e1;
                h1[t] = o0 + e1;
                h2[t] = e1 - o0;
                h3[t] = o0 - o1;
            }
        }
        // Vertical pass: rows 2ty..2ty+4 of the horizontal pass give tile row ty (B^T . d B).
        let plane = self.cin * nt;
        let mut kp = s.v[..16 * plane].chunks_mut(plane);
        let v: [&mut [f32]; 16] = std::array::from_fn(|_| kp.next().expect("16 planes"));
        for ty in 0..th {
            let base = c * nt + t0 + ty * tw;
            for j in 0..4 {
                let row = |i: usize| &hrows[((2 * ty + i) * 4 + j) * tw..][..tw];
                let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
                comb(&mut v[j][base..base + tw], d0, d2, |a, b| a - b);
                comb(&mut v[4 + j][base..base + tw], d1, d2, |a, b| a + b);
                comb(&mut v[8 + j][base..base + tw], d2, d1, |a, b| a - b);
                comb(&mut v[12 + j][base..base + tw], d1, d3, |a, b| a - b);
            }
        }
    }

    /// Output transform of channel `o`, tiles `t0..`, into the plane `y` (`oh x ow`), plus `bias`.
    fn transform_output(
        &self,
        o: usize,
        t0: usize,
        nt: usize,
        bias: f32,
        y: &mut [f32],
        s: &mut WinoScratch,
    ) {
        let (th, tw) = (self.th(), self.tw());
        let plane = self.cout * nt;
        let m = &s.m[..16 * plane];
        let tmp = &mut s.tmp[..8 * tw];
        for ty in 0..th {
            let base = o * nt + t0 + ty * tw;
            let mk = |k: usize| &m[k * plane + base..][..tw];
            // Vertical pass (A^T m): s0 = m0 + m1 + m2, s1 = m1 - m2 - m3, per column j.
            for j in 0..4 {
                let (m0, m1, m2, m3) = (mk(j), mk(4 + j), mk(8 + j), mk(12 + j));
                let (s0, s1) = tmp.split_at_mut(4 * tw);
                let (s0, s1) = (&mut s0[j * tw..][..tw], &mut s1[j * tw..][..tw]);
                for t in 0..tw {
                    s0[t] = m0[t] + m1[t] + m2[t];
                    s1[t] = m1[t] - m2[t] - m3[t];
                }
            }
            // Horizontal pass (. A) and store, clipping the last tile row / column.
            for (r, sr) in tmp.chunks(4 * tw).enumerate() {
                let oy = 2 * ty + r;
                if oy >= self.oh {
                    break;
                }
                let (a, b, c, d) = (
                    &sr[..tw],
                    &sr[tw..2 * tw],
                    &sr[2 * tw..3 * tw],
                    &sr[3 * tw..],
                );
                let out = &mut y[oy * self.ow..][..self.ow];
                let full = self.ow / 2;
                for t in 0..full {
                    out[2 * t] = a[t] + b[t] + c[t] + bias;
                    out[2 * t + 1] = b[t] - c[t] - d[t] + bias;
                }
                if self.ow % 2 == 1 {
                    out[2 * full] = a[full] + b[full] + c[full] + bias;
                }
            }
        }
    }

    /// The correlation of the images in `x` (`[B, cin, h, w]`) with transformed weights `u`
    /// (`[16][cout][cin]`) into `y` (`[B, cout, oh, ow]`, every entry written), plus `bias`.
    pub(super) fn run(
        &self,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut WinoScratch,
    ) {
        let (xlen, ylen) = (self.cin * self.h * self.w, self.cout * self.oh * self.ow);
        let (hw, ohw) = (self.h * self.w, self.oh * self.ow);
        let nb = x.len() / xlen;
        let tpi = self.tiles();
        let nt = nb * tpi;
        for (j, xb) in x.chunks(xlen).enumerate() {
            for (c, plane) in xb.chunks(hw).enumerate() {
                self.transform_input(plane, c, j * tpi, nt, s);
            }
        }
        let (vp, mp, up) = (self.cin * nt, self.cout * nt, self.cout * self.cin);
        for k in 0..16 {
            general_mat_mul(
                1.0,
                &mat(&u[k * up..], self.cout, self.cin),
                &mat(&s.v[k * vp..], self.cin, nt),
                0.0,
                &mut mat_mut(&mut s.m[k * mp..], self.cout, nt),
            );
        }
        for (j, yb) in y.chunks_mut(ylen).enumerate() {
            for (o, plane) in yb.chunks_mut(ohw).enumerate() {
                let b = bias.map_or(0.0, |b| b[o]);
                self.transform_output(o, j * tpi, nt, b, plane, s);
            }
        }
    }
}

impl Geom {
    /// Whether the geometry can run through Winograd at all: ungrouped, 3x3, stride 1, no
    /// dilation, pads of at most 2 (so that the input gradient's "full" padding `2 - pad` exists).
    pub(super) fn winograd_eligible(&self) -> bool {
        self.group == 1
            && self.kh == 3
            && self.kw == 3
            && self.sh == 1
            && self.sw == 1
            && self.dh == 1
            && self.dw == 1
            && self.pt <= 2
            && self.pl <= 2
            && self.pb <= 2
            && self.pr <= 2
    }

    /// The forward correlation: `x` to `y`.
    pub(super) fn wino_forward_plane(&self) -> Plane {
        Plane {
            cin: self.ci,
            cout: self.co,
            h: self.h,
            w: self.w,
            oh: self.oh,
            ow: self.ow,
            pt: self.pt,
            pl: self.pl,
        }
    }

    /// The input gradient's correlation: `dy` to `dx`, over `dy` padded by `2 - pad`.
    pub(super) fn wino_backward_plane(&self) -> Plane {
        Plane {
            cin: self.co,
            cout: self.ci,
            h: self.oh,
            w: self.ow,
            oh: self.h,
            ow: self.w,
            pt: 2 - self.pt,
            pl: 2 - self.pl,
        }
    }

    /// Images per set of 16 GEMMs: enough for about [`WINO_TILES`] tiles, but never so many
    /// that the batch falls into fewer than `block::MIN_PARTS` parts.
    pub(super) fn wino_block_images(&self) -> usize {
        if !self.winograd {
            return 1;
        }
        let tiles = self.wino_forward_plane().tiles().max(1);
        WINO_TILES
            .div_ceil(tiles)
            .min(self.n.div_ceil(super::block::MIN_PARTS))
            .max(1)
    }

    pub(super) fn wino_scratch(&self, backward: bool) -> WinoScratch {
        let p = if backward {
            self.wino_backward_plane()
        } else {
            self.wino_forward_plane()
        };
        WinoScratch::new(&[p], self.wino_block_images())
    }
}

/// Which 3x3 convolutions run through Winograd; `Auto` (the default) picks by measured shape
/// thresholds ([`Geom::winograd_pays`]). The others exist for benchmarks and A/B timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WinogradMode {
    Auto = 0,
    Never = 1,
    /// Every eligible geometry, whatever its shape.
    Always = 2,
}

static MODE: AtomicU8 = AtomicU8::new(WinogradMode::Auto as u8);

/// Process-wide override of the Winograd choice (benchmarks, A/B timing); not for library users.
#[doc(hidden)]
pub fn set_winograd(mode: WinogradMode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

impl Geom {
    /// Whether Winograd is faster than im2col for this shape (see the thresholds below).
    pub(super) fn winograd_pays(&self) -> bool {
        match MODE.load(Ordering::Relaxed) {
            1 => false,
            2 => true,
            _ => self.ci >= 16 && self.co >= 16,
        }
    }
}

/// Whether the thresholds decide (no benchmark override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    MODE.load(Ordering::Relaxed) == WinogradMode::Auto as u8
}

/// Bound on Winograd's error per output, relative to the sum of the absolute products that make
/// it (`sum |w| |x| + |b|`; `sum |w| |dy|` for the input gradient), checked against f64 in the
/// tests.
#[cfg(test)]
pub(super) const WINO_REL_TOL: f64 = 1e-5;
