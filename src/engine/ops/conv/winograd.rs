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
//! The transforms run over a whole image plane at a time so that their arithmetic is contiguous
//! in the tile index and vectorises (compiled for AVX2 where the CPU has it): the input's rows
//! are first transformed horizontally (even/odd columns split once per row) and stored by row
//! parity, so that the vertical pass reads every tile row's four source rows as four contiguous
//! runs. A first version that looped per tile row (2 to 8 tiles long on ResNet planes) spent
//! more time in the transforms than in the GEMMs and was no faster than im2col.
//!
//! The input gradient is the same machinery applied to `dy`: `dx` is the correlation of `dy`
//! with the kernel rotated 180 degrees and its channel axes swapped, over `dy` padded by
//! `2 - pad` on each side (the "full" convolution relation), so pads of at most 2 qualify.
//! The weight gradient is Winograd's too on layers that are not small-plane ones
//! (`winograd_dw.rs`: the transformed-domain dot products on the direct weight gradient's
//! register tiles). A first version that ran them as GEMMs (commit 5da356f) was slower, up to
//! 1.9x on ResNet-20's 16-channel stage, since those GEMMs have a small `co x ci` output and a
//! long inner dimension.
//!
//! Several images share one set of 16 GEMMs when an image has few tiles (as `block.rs` does for
//! im2col), inside the fixed parts of the batch, so results never depend on the thread count.
//!
//! Numerics: the transforms add and halve, so the error is a small multiple of im2col's (about
//! 3x at worst in the tests); the tests bound it per output by `WINO_REL_TOL * sum |w| |x|`
//! (2e-6) against an f64 reference, forward and input gradient.
//!
//! F(4x4, 3x3) (`Plane::m == 4`) shares the GEMMs, the scratch and the blocking; its transforms
//! are in `winograd4.rs`, and `Geom::wino4_pays` says where it runs.

use super::winograd4::transform_kernel4;
use super::{mat, mat_mut, Geom};
use crate::engine::ops::simd::simd_dispatch;
use ndarray::linalg::general_mat_mul;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};

/// Tiles per set of 16 GEMMs that a block of images aims for: below this the GEMMs' packing
/// dominates (as with im2col's `block::BLOCK_COLS`).
pub(super) const WINO_TILES: usize = 256;
/// Most images per block: 8 images of 8x8 (128 tiles); at batch 16 and up, still at least two
/// parts of the batch for the threads.
pub(super) const WINO_MAX_IMAGES: usize = 8;

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
    /// Output tile side: 2 for F(2x2, 3x3) (this file's transforms), 4 for F(4x4, 3x3)
    /// (`winograd4.rs`).
    pub m: usize,
}

simd_dispatch! {
    /// [`Plane::run`] with its transforms compiled for AVX2 where the CPU has it.
    fn run_simd(
        p: &Plane,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut WinoScratch,
    ) => Plane::run_body, (p, x, u, bias, y, s); ["avx2"]
}

impl Plane {
    pub(super) fn th(&self) -> usize {
        self.oh.div_ceil(self.m)
    }

    pub(super) fn tw(&self) -> usize {
        self.ow.div_ceil(self.m)
    }

    /// Transformed taps per tile: 16 for F(2x2), 36 for F(4x4).
    pub(super) fn taps(&self) -> usize {
        (self.m + 2) * (self.m + 2)
    }

    pub fn tiles(&self) -> usize {
        self.th() * self.tw()
    }
}

/// Scratch of one thread (see `SCRATCH`); it keeps its largest size for the life of the
/// thread, a few MiB at most on ResNet layers (`taps x channels x tiles` floats, twice).
pub(super) struct WinoScratch {
    /// Transformed inputs `[taps][cin][T]`.
    pub(super) v: Vec<f32>,
    /// Products `[taps][cout][T]`.
    pub(super) m: Vec<f32>,
    /// One padded input row, then its even and odd columns (F(4x4): its four column phases,
    /// all in `ev`).
    pub(super) prow: Vec<f32>,
    pub(super) ev: Vec<f32>,
    od: Vec<f32>,
    /// Horizontally transformed rows of one channel: `[row parity][4][th+1][tw]` (F(4x4), for
    /// all the block's images: `[slot][6][T]`, see `Plane::transform_input4`).
    pub(super) hrows: Vec<f32>,
    /// Output transform temporaries: `[2][4][th*tw]` (F(4x4), for all the block's images:
    /// `[4][6][T]` then `[4][T]`).
    pub(super) tmp: Vec<f32>,
}

thread_local! {
    /// Each rayon worker's scratch, kept across calls: allocating and zeroing it per part of the
    /// batch (two buffers of 16 x channels x tiles) took 8% of a forward at 64 channels on
    /// 16x16. Every entry a call reads it has written first, so reuse cannot leak values.
    static SCRATCH: RefCell<WinoScratch> = const { RefCell::new(WinoScratch::empty()) };
}

/// Runs `f` with this thread's scratch, grown to hold `images` images of `plane`.
pub(super) fn with_scratch<R>(
    plane: &Plane,
    images: usize,
    f: impl FnOnce(&mut WinoScratch) -> R,
) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => {
            s.reserve(plane, images);
            f(&mut s)
        }
        // Re-entered on this thread (not expected: nothing inside calls back into rayon).
        Err(_) => {
            let mut s = WinoScratch::empty();
            s.reserve(plane, images);
            f(&mut s)
        }
    })
}

impl WinoScratch {
    const fn empty() -> Self {
        WinoScratch {
            v: Vec::new(),
            m: Vec::new(),
            prow: Vec::new(),
            ev: Vec::new(),
            od: Vec::new(),
            hrows: Vec::new(),
            tmp: Vec::new(),
        }
    }

    /// Grows the buffers to hold `images` images of `p`.
    fn reserve(&mut self, p: &Plane, images: usize) {
        let s = self;
        let (th, tw, t, k) = (p.th(), p.tw(), p.tiles() * images, p.taps());
        grow(&mut s.v, k * p.cin * t);
        grow(&mut s.m, k * p.cout * t);
        grow(&mut s.prow, p.m * (tw + 1));
        grow(&mut s.ev, (p.m * (tw + 1)).max(tw + 1));
        grow(&mut s.od, tw + 1);
        if p.m == 4 {
            grow(&mut s.hrows, 36 * t);
            grow(&mut s.tmp, 28 * t);
        } else {
            grow(&mut s.hrows, 8 * (th + 1) * tw);
            grow(&mut s.tmp, 8 * th * tw);
        }
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

/// Transformed weights `U[taps][rows][cols]` of ONNX weights `w` `[co, ci, 3, 3]` for output
/// tiles of side `m` (2 or 4). Forward: `rows = co`, `cols = ci`. With `flip` (input gradient):
/// the kernel rotated 180 degrees with its channel axes swapped, `rows = ci`, `cols = co`.
pub(super) fn transform_weights(w: &[f32], co: usize, ci: usize, flip: bool, m: usize) -> Vec<f32> {
    let taps = (m + 2) * (m + 2);
    let mut u = vec![0.0f32; taps * co * ci];
    let plane = co * ci;
    for o in 0..co {
        for c in 0..ci {
            let src = &w[(o * ci + c) * 9..][..9];
            let mut g = [0.0f32; 9];
            for (i, gi) in g.iter_mut().enumerate() {
                *gi = if flip { src[8 - i] } else { src[i] };
            }
            let t4;
            let t2;
            let t: &[f32] = if m == 4 {
                t4 = transform_kernel4(&g);
                &t4
            } else {
                t2 = transform_kernel(&g);
                &t2
            };
            let at = if flip { c * co + o } else { o * ci + c };
            for (k, &tk) in t.iter().enumerate() {
                u[k * plane + at] = tk;
            }
        }
    }
    u
}

/// Grows `v` to at least `n` floats (scratch that keeps its largest size).
pub(super) fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// `dst[i] = f(a[i], b[i])`: one destination per loop, so that each is a plain vectorisable zip.
#[inline(always)]
pub(super) fn comb(dst: &mut [f32], a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) {
    dst.iter_mut()
        .zip(a.iter().zip(b))
        .for_each(|(d, (&a, &b))| *d = f(a, b))
}

/// `dst[i] = f(a[i], b[i], c[i])`.
#[inline(always)]
fn comb3(dst: &mut [f32], a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) {
    dst.iter_mut()
        .zip(a.iter().zip(b.iter().zip(c)))
        .for_each(|(d, (&a, (&b, &c)))| *d = f(a, b, c))
}

impl Plane {
    /// Input transform of one channel plane `x` (`h x w`) into `v`: tap `k` of tile `t` goes to
    /// `v[k * kstride + base + t]` (the forward's `[16][cin][nt]` buffer has `kstride = cin * nt`
    /// and `base = c * nt + t0`; the weight gradient's `[cin][16][Tp]` has its own, see
    /// `winograd_dw.rs`). Uses `s`'s row buffers, not `s.v`.
    ///
    /// Horizontal pass first: each padded row, split once into even and odd columns, becomes
    /// four rows of `tw` values (`d B` per tile), stored by row parity, so that the vertical pass
    /// (`B^T .`) reads rows `2ty, 2ty+1, 2ty+2, 2ty+3` of every tile row as four contiguous
    /// runs of `th*tw` values: 16 long, vectorisable loops per channel.
    #[inline(always)]
    pub(super) fn transform_input(
        &self,
        x: &[f32],
        v: &mut [f32],
        kstride: usize,
        base: usize,
        s: &mut WinoScratch,
    ) {
        let (th, tw) = (self.th(), self.tw());
        let wp = 2 * tw + 2;
        let hs = (th + 1) * tw;
        let hb = &mut s.hrows[..8 * hs];
        let (prow, ev, od) = (&mut s.prow[..wp], &mut s.ev[..tw + 1], &mut s.od[..tw + 1]);
        let xw = self.w.min(wp.saturating_sub(self.pl));
        for r in 0..2 * th + 2 {
            let (m, par) = (r / 2, r % 2);
            let at = |j: usize| (par * 4 + j) * hs + m * tw;
            let iy = r as isize - self.pt as isize;
            if iy < 0 || iy >= self.h as isize {
                for j in 0..4 {
                    hb[at(j)..][..tw].fill(0.0);
                }
                continue;
            }
            let src = &x[iy as usize * self.w..][..self.w];
            prow.fill(0.0);
            prow[self.pl..self.pl + xw].copy_from_slice(&src[..xw]);
            for ((e, o), pair) in ev.iter_mut().zip(od.iter_mut()).zip(prow.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
            let (e0, e1, o0, o1) = (&ev[..tw], &ev[1..], &od[..tw], &od[1..]);
            comb(&mut hb[at(0)..][..tw], e0, e1, |a, b| a - b);
            comb(&mut hb[at(1)..][..tw], o0, e1, |a, b| a + b);
            comb(&mut hb[at(2)..][..tw], e1, o0, |a, b| a - b);
            comb(&mut hb[at(3)..][..tw], o0, o1, |a, b| a - b);
        }
        let tiles = th * tw;
        let mut kp = v.chunks_mut(kstride);
        let v: [&mut [f32]; 16] = std::array::from_fn(|_| kp.next().expect("16 planes"));
        for j in 0..4 {
            let (e, o) = (&hb[j * hs..][..hs], &hb[(4 + j) * hs..][..hs]);
            let (d0, d1, d2, d3) = (&e[..tiles], &o[..tiles], &e[tw..], &o[tw..]);
            comb(&mut v[j][base..base + tiles], d0, d2, |a, b| a - b);
            comb(&mut v[4 + j][base..base + tiles], d1, d2, |a, b| a + b);
            comb(&mut v[8 + j][base..base + tiles], d2, d1, |a, b| a - b);
            comb(&mut v[12 + j][base..base + tiles], d1, d3, |a, b| a - b);
        }
    }

    /// Output transform of channel `o`, tiles `t0..t0 + tiles()`, into the plane `y`
    /// (`oh x ow`), plus `bias`: `A^T m A` as long loops over all the image's tiles, then one
    /// interleaving store per output row, clipping the last tile row and column.
    #[inline(always)]
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
        let tiles = th * tw;
        let plane = self.cout * nt;
        let base = o * nt + t0;
        let m = &s.m[..16 * plane];
        let mk = |k: usize| &m[k * plane + base..][..tiles];
        let mut tp = s.tmp[..8 * tiles].chunks_mut(tiles);
        let t: [&mut [f32]; 8] = std::array::from_fn(|_| tp.next().expect("8 rows"));
        let [a0, b0, c0, d0, a1, b1, c1, d1] = t;
        // Vertical pass (A^T m): row 0 = m0 + m1 + m2, row 1 = m1 - m2 - m3, per column j.
        for (j, (r0, r1)) in [a0, b0, c0, d0]
            .into_iter()
            .zip([a1, b1, c1, d1])
            .enumerate()
        {
            let (m0, m1, m2, m3) = (mk(j), mk(4 + j), mk(8 + j), mk(12 + j));
            comb3(r0, m0, m1, m2, |a, b, c| a + b + c);
            comb3(r1, m1, m2, m3, |a, b, c| a - b - c);
        }
        // Horizontal pass (. A), in place: column 0 = a + b + c, column 1 = b - c - d.
        for r in 0..2 {
            let row = &mut s.tmp[r * 4 * tiles..(r + 1) * 4 * tiles];
            let (a, rest) = row.split_at_mut(tiles);
            let (b, rest) = rest.split_at_mut(tiles);
            let (c, d) = rest.split_at_mut(tiles);
            a.iter_mut()
                .zip(d.iter_mut())
                .zip(b.iter().zip(c.iter()))
                .for_each(|((a, d), (&b, &c))| {
                    let (a0, d0) = (*a, *d);
                    *a = a0 + b + c + bias;
                    *d = b - c - d0 + bias;
                });
        }
        let full = self.ow / 2;
        for ty in 0..th {
            for r in 0..2 {
                let oy = 2 * ty + r;
                if oy >= self.oh {
                    break;
                }
                let q0 = &s.tmp[r * 4 * tiles + ty * tw..][..tw];
                let q1 = &s.tmp[(r * 4 + 3) * tiles + ty * tw..][..tw];
                let out = &mut y[oy * self.ow..][..self.ow];
                out[..2 * full]
                    .chunks_exact_mut(2)
                    .zip(q0.iter().zip(q1))
                    .for_each(|(o, (&a, &b))| {
                        o[0] = a;
                        o[1] = b;
                    });
                if self.ow % 2 == 1 {
                    out[2 * full] = q0[full];
                }
            }
        }
    }

    /// The correlation of the images in `x` (`[B, cin, h, w]`) with transformed weights `u`
    /// (`[16][cout][cin]`) into `y` (`[B, cout, oh, ow]`, every entry written), plus `bias`.
    /// The transforms are compiled for AVX2 where the CPU has it (the crate's baseline is SSE2,
    /// 4 lanes; they are plain adds, so the results are the same either way).
    pub(super) fn run(
        &self,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut WinoScratch,
    ) {
        run_simd(self, x, u, bias, y, s)
    }

    #[inline(always)]
    fn run_body(
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
        if self.m == 4 {
            for c in 0..self.cin {
                self.transform_input4(x, c, nt, s);
            }
        } else {
            let mut v = std::mem::take(&mut s.v);
            for (j, xb) in x.chunks(xlen).enumerate() {
                for (c, plane) in xb.chunks(hw).enumerate() {
                    self.transform_input(plane, &mut v, self.cin * nt, c * nt + j * tpi, s);
                }
            }
            s.v = v;
        }
        let (vp, mp, up) = (self.cin * nt, self.cout * nt, self.cout * self.cin);
        for k in 0..self.taps() {
            general_mat_mul(
                1.0,
                &mat(&u[k * up..], self.cout, self.cin),
                &mat(&s.v[k * vp..], self.cin, nt),
                0.0,
                &mut mat_mut(&mut s.m[k * mp..], self.cout, nt),
            );
        }
        if self.m == 4 {
            for o in 0..self.cout {
                let b = bias.map_or(0.0, |b| b[o]);
                self.transform_output4(o, nt, b, y, s);
            }
            return;
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
            m: self.wino_tile,
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
            m: self.wino_tile,
        }
    }

    /// Images per set of 16 GEMMs: enough for about [`WINO_TILES`] tiles, at most
    /// [`WINO_MAX_IMAGES`]. It depends on the geometry only, never on the batch size, so that an
    /// image's result does not depend on how many images share its step (batches that are whole
    /// numbers of blocks). OpenBLAS's result for one GEMM column depends on the matrix's width
    /// (and on the column's place in it): with blocks capped at a quarter of the batch, as
    /// `block.rs` does, a 64-channel 8x8 layer gave results 1e-5 apart at batch 16 and 32.
    pub(super) fn wino_block_images(&self) -> usize {
        if !self.winograd {
            return 1;
        }
        let tiles = self.wino_forward_plane().tiles().max(1);
        WINO_TILES.div_ceil(tiles).clamp(1, WINO_MAX_IMAGES)
    }
}

/// Which 3x3 convolutions run through Winograd; `Auto` (the default) picks by measured shape
/// thresholds (`Geom::winograd_pays` in `conv/winograd.rs`). The others exist for benchmarks and A/B timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum WinogradMode {
    Auto = 0,
    Never = 1,
    /// Every eligible geometry, whatever its shape, as F(2x2, 3x3).
    Always = 2,
    /// Every eligible geometry, whatever its shape, as F(4x4, 3x3).
    Always4 = 3,
    /// Where `Auto` picks Winograd, always as F(2x2, 3x3) (to time F(4x4)'s share).
    AutoF2 = 4,
}

static MODE: AtomicU8 = AtomicU8::new(WinogradMode::Auto as u8);

/// Process-wide override of the Winograd choice (benchmarks, A/B timing); not for library users.
#[doc(hidden)]
pub fn set_winograd(mode: WinogradMode) {
    MODE.store(mode as u8, Ordering::Relaxed);
}

/// Fewest input and output channels for Winograd: below this the GEMMs' inner dimension is
/// too short for the 2.25x fewer multiply-adds to pay for the transforms (untimed below 16;
/// ResNet-20's 16-channel stage already wins, see `Geom::winograd_pays`).
const WINO_MIN_CHANNELS: usize = 16;
/// Fewest outputs per image plane: 8x8, 16 tiles. On 4x4 planes (4 tiles) Winograd lost.
const WINO_MIN_PLANE: usize = 64;

impl Geom {
    /// Whether Winograd is faster than im2col for this shape. Criterion, `benches/conv_kernels.rs`
    /// group `winograd`, batch 64, 1 thread, 3x3 pad 1, im2col vs Winograd (ms, forward;
    /// backward = input gradient on Winograd + weight gradient on im2col against all-im2col),
    /// measured 2026-12-02 on a shared 2-core machine (load 4.8, so +-15%):
    ///
    /// | layer            | forward        | backward       |
    /// |------------------|----------------|----------------|
    /// | 64ch 16x16       | 23.7 -> 15.6   | 46.2 -> 45.0   |
    /// | 128ch 8x8        | 23.1 -> 14.2   | 43.6 -> 40.9   |
    /// | 256ch 4x4        | 21.6 -> 22.8   | 47.8 -> 49.4   |
    /// | 16ch 32x32       | 8.00 -> 6.36   | 19.0 -> 15.9   |
    /// | 32ch 16x16       | 6.88 -> 5.17   | 14.7 -> 11.9   |
    /// | 64ch 8x8         | 5.86 -> 4.34   | 12.2 -> 10.3   |
    ///
    /// Those had blocks of up to 16 images of 8x8; capped at [`WINO_MAX_IMAGES`] (8), rerun at
    /// load 3.1: 128ch 8x8 14.0 -> 11.5 forward, 34.7 -> 28.9 backward; 64ch 8x8 4.05 -> 3.60,
    /// 9.04 -> 7.89.
    ///
    /// So: planes of at least [`WINO_MIN_PLANE`] outputs, at least [`WINO_MIN_CHANNELS`]
    /// channels in and out. Layers of up to 16 channels (24 on planes up to 16x16) go to the
    /// direct kernel instead, which later measured faster than Winograd there (`direct.rs`,
    /// `Geom::few_channel_3x3`): `Geom::geom` asks it first.
    pub(super) fn winograd_pays(&self) -> bool {
        match MODE.load(Ordering::Relaxed) {
            1 => false,
            2 | 3 => true,
            _ => {
                self.ci >= WINO_MIN_CHANNELS
                    && self.co >= WINO_MIN_CHANNELS
                    && self.oh * self.ow >= WINO_MIN_PLANE
            }
        }
    }
}

/// Whether Winograd is switched off (`WinogradMode::Never`): the channels-last path
/// (`winograd_cl.rs`) stays off too, so that `Never` times the paths without any Winograd.
pub(super) fn switched_off() -> bool {
    MODE.load(Ordering::Relaxed) == WinogradMode::Never as u8
}

/// Whether the thresholds decide (no benchmark override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    MODE.load(Ordering::Relaxed) == WinogradMode::Auto as u8
}

/// Bound on Winograd's error per output, relative to the sum of the absolute products that make
/// it (`sum |w| |x| + |b|`; `sum |w| |dy|` for the input gradient), checked against f64 in the
/// tests. Measured worst over the tests' 60 random geometries (1-70 channels, planes 1-13,
/// pads 0-2): 7.6e-7 forward, 6.2e-7 input gradient, against im2col's 2.4e-7 and 1.7e-7 on the
/// same geometries (Winograd's transforms add and halve in the transformed domain, about 3x the
/// rounding); on ResNet-sized layers (16-256 channels) about 1.5e-7 for both.
#[cfg(test)]
pub(super) const WINO_REL_TOL: f64 = 2e-6;

impl Geom {
    /// Whether a Winograd layer runs as F(4x4, 3x3) rather than F(2x2, 3x3): where it measured
    /// about 10% faster or more, since its error is about 20x F(2x2)'s (`WINO4_REL_TOL`).
    /// Best of 25 alternating calls, 1 thread, batch 128, 3x3 pad 1, Cooperlake kernels, shared
    /// host (load 1.2-1.7, about +-10% between runs), F(2x2) -> F(4x4), forward / backward
    /// (input gradient by Winograd, weight gradient the same direct kernel) in ms:
    ///
    /// | layer       | forward        | backward        |
    /// |-------------|----------------|-----------------|
    /// | 64ch 32x32  | 56.8 -> 48.4   | 115.1 -> 107.4  |
    /// | 32ch 32x32  | 13.5 -> 11.6   | 27.4 -> 25.6    |
    /// | 24ch 32x32  | 8.75 -> 8.12   | 17.1 -> 16.0    |
    /// | 16ch 32x32  | 5.6-5.9 -> 5.0-6.4 | 10.0-10.2 -> 8.8-10.7 |
    /// | 64ch 16x16  | 11.8-12.7 -> 10.4-11.3 | 25.5-27.1 -> 25.6-26.2 |
    /// | 128ch 16x16 | 34.0-37.9 -> 33.1-35.9 | 92.1-107.6 -> 93.1-103.9 |
    /// | 32ch 16x16  | 3.97-4.16 -> 4.00-4.18 | 7.8-8.0 -> 8.2-8.4 |
    /// | 64ch 8x8    | 3.48-3.78 -> 3.72-3.98 | 6.8-7.1 -> 6.6-6.9 |
    /// | 128ch 8x8   | 11.4-13.4 -> 11.3-12.3 | 25.8-29.5 -> 25.2-26.0 |
    ///
    /// At batch 64 (1 thread): 64ch 32x32 21.0 / 49.2 -> 18.0 / 48.1, 32ch 32x32 6.9 / 15.3 ->
    /// 6.8 / 13.8, but 128ch 16x16 18.4 / 49.5 -> 22.8 / 54.8; at 2 threads, batch 128: 128ch 8x8
    /// forward 7.9 -> 9.9 (F(4x4)'s 4 tiles per image leave 32-column GEMMs). So F(4x4) on
    /// 32x32 and larger planes of [`WINO4_MIN_CHANNELS`] or more; 16x16 planes stay on F(2x2)
    /// (a gain at 64 channels, batch 128, a loss at 128 channels, batch 64). ResNet-20's
    /// 16-channel stage is a tie (its transforms, not its GEMMs, take most of the time) and
    /// stays on F(2x2). Whole training steps, F(2x2) only -> this rule (1 thread, best of 2):
    /// resnet18_tucker2@128 1246 -> 1170 ms, resnet20_tucker2 249 -> 241 ms.
    ///
    /// 16x16 to 31x31 planes of [`WINO4_MIN_CHANNELS_16PX`] to 127 channels run F(4x4) too
    /// (from 128 on 16x16 the channels-last path takes them, `winograd_cl.rs`): inside training
    /// steps the 64-channel 16x16 layers gained where criterion's repeated calls on a warm cache
    /// had shown a tie. `elrt speed --profile`, alternating builds, F(2x2) -> F(4x4), the
    /// Winograd layers' ms per step (forward + backward): resnet18@64's layer1 (four 64ch
    /// layers, batch 64) 1 thread 113-129 -> 96-119, forward 37.2-40.9 -> 29.0-32.6; 2 threads
    /// 62-66 -> 52-54, forward 40.1-44.3 -> 35.7-37.4 (whole step 234-249 -> 221-234);
    /// resnet18_tucker2@128's 72-channel 16x16 cores (with its F(4x4) 32x32 layers) 1 thread
    /// 254-264 -> 234-237 (step 1152-1225 -> 1134-1160).
    pub(super) fn wino4_pays(&self) -> bool {
        match MODE.load(Ordering::Relaxed) {
            2 | 4 => false,
            3 => true,
            _ => {
                let (plane, ch) = (self.oh * self.ow, self.ci.min(self.co));
                (plane >= WINO4_MIN_PLANE && ch >= WINO4_MIN_CHANNELS)
                    || (plane >= WINO4_MIN_PLANE_16PX
                        && (WINO4_MIN_CHANNELS_16PX..128).contains(&ch))
            }
        }
    }
}

/// Fewest outputs per image plane for F(4x4, 3x3) from [`WINO4_MIN_CHANNELS`] channels: 32x32.
const WINO4_MIN_PLANE: usize = 1024;
/// Fewest channels in and out for F(4x4, 3x3) on 32x32 planes and larger.
const WINO4_MIN_CHANNELS: usize = 24;
/// Fewest outputs per image plane for F(4x4, 3x3) from [`WINO4_MIN_CHANNELS_16PX`] channels:
/// 16x16.
const WINO4_MIN_PLANE_16PX: usize = 256;
/// Fewest channels in and out for F(4x4, 3x3) on 16x16 to 31x31 planes (ResNet-20's 32
/// channels on 16x16 tied and stay on F(2x2)).
const WINO4_MIN_CHANNELS_16PX: usize = 64;

/// Bound on F(4x4, 3x3)'s error per output, as [`WINO_REL_TOL`] for F(2x2, 3x3). Measured
/// worst over the same 60 random geometries: 1.7e-5 forward, 7.5e-6 input gradient (F(2x2):
/// 7.6e-7, 6.2e-7); on ResNet-sized layers 1.9e-6 to 3.6e-6 (F(2x2): 1.1e-7 to 1.6e-7). The
/// larger interpolation points (2 and -2) cost the accuracy: `A^T`'s 8 and `B^T`'s 5 scale
/// the rounding of the transformed products.
#[cfg(test)]
pub(super) const WINO4_REL_TOL: f64 = 4e-5;
