//! Direct weight gradient: `dW[o][c][a][b] = sum_p dy[o][p] * x[c][p shifted by tap (a, b)]`,
//! computed from the padded input without an im2col matrix.
//!
//! Why: im2col + GEMM spends its time outside the multiply-adds when a layer has few output
//! channels. The GEMM `dW (co x k) = dy (co x ohw) . col^T` packs the `k x ohw` column matrix,
//! and each packed value then feeds only `co` multiply-adds; on ResNet-20's 16-channel stage
//! (perf, 1 thread, AVX-512 OpenBLAS) packing took 2.3x the time of the GEMM kernel and im2col's
//! copies another 0.8x, so the weight gradient ran at 44 GFLOP/s against 220 for sgemm, and was
//! most of the Winograd layers' backward pass.
//!
//! The trick that makes it one flat loop: lay every padded input plane out with its row stride
//! `wp` (the padded width) and the output gradient with the same row stride (zeros in the
//! `wp - ow` extra columns). Then tap `(a, b)` reads the input at a fixed flat offset
//! `a * dh * wp + b * dw` from the output position, for every position, and each weight-gradient
//! entry is a dot product of two contiguous runs of `oh * wp` floats, summed over a few images
//! per pass for small planes. A register tile of `MI` output channels by `NJ` taps (4 x 4
//! AVX-512 vectors, 3 x 4 with AVX2) loads each run once per tile and does `MI * NJ` fused
//! multiply-adds per `MI + NJ` loads. The extra columns cost
//! `(wp - ow) / ow` more multiply-adds (6% at 32 wide, 25% at 8 wide), and both runs are
//! padded to a whole number of vectors with zeros, so there are no tails or masks: the zero
//! output gradients cancel whatever the shifted input holds there, and every plane carries its
//! own zeroed slack so that a read never reaches the next channel.
//!
//! Strides: a stride-`s` layer's padded input is split into its `sh x sw` phases (the rows and
//! columns of each residue mod the stride), each its own plane. Tap `(a, b)` of output `(oy,
//! ox)` reads padded row `oy * sh + a * dh`, which is row `oy + a * dh / sh` of phase `a * dh %
//! sh` (columns alike): within a phase the layer is a stride-1 one, so the same fixed-offset
//! runs apply, with the phase width as the row stride. The speed rule uses it for ResNet-18's
//! 7x7 stride-2 stem (3 input channels: im2col's GEMM packed each 147-deep column for only 64
//! multiply-adds); strided 3x3 layers lost to im2col and stay there (`direct_dw_pays`).
//!
//! Numerics: each entry is a sum over one image's positions in vector lanes, reduced once and
//! added to the part's running gradient, image by image, so results depend on the CPU's vector
//! width (as BLAS's do on its kernel set) but never on the thread count.

use super::Geom;

/// Floats in the widest vector any kernel here uses; runs are padded to a multiple of it.
pub(super) const LANES: usize = 16;

/// A few images' padded input planes and output gradients, reused across the images of a part:
/// only the interiors are rewritten, so the zero borders and slack are written once.
pub(super) struct DwScratch {
    /// `[images][ci][sh * sw][pstride]`: each plane's padded phase copies, then zero slack.
    pub(super) xp: Vec<f32>,
    /// `[images][co][run]`: each output-gradient plane with row stride `wp`, zero columns and
    /// tail (the direct forward, `direct.rs`, writes its outputs here instead, in a scratch of
    /// its own).
    pub(super) dyp: Vec<f32>,
    /// Flat input offset of each row of the (per-group) column matrix, channel then tap.
    pub(super) offs: Vec<usize>,
}

/// The flat layout of one geometry.
#[derive(Clone, Copy, Debug)]
pub(super) struct Layout {
    /// Width of one column phase of the padded input (the padded width at stride 1), the row
    /// stride of both runs.
    pub(super) wp: usize,
    /// Floats per dot product: `oh * wp` rounded up to whole vectors.
    pub(super) run: usize,
    /// Floats per padded input phase plane with its slack (a channel has `sh * sw` of them).
    pub(super) pstride: usize,
    /// Padded input rows and columns any tap of any output reads; the rest are never copied.
    rows_used: usize,
    cols_used: usize,
    /// Images per register-tile pass: enough that a dot product spans about `TARGET_RUN`
    /// floats, so that the tile's final reductions stay a small part of its work.
    pub(super) images: usize,
}

/// Floats a tile's dot products aim to span (a few images of a small plane): at ResNet's 8x8
/// planes one image gives runs of 80 floats, 5 vector steps per 16 horizontal sums.
const TARGET_RUN: usize = 1024;
/// At most this many images per pass (the scratch holds them all).
const MAX_IMAGES: usize = 16;

impl Geom {
    /// Whether the weight gradient can run here: any stride, kernel size, dilation, padding and
    /// group count on the im2col path (depthwise and pointwise layers have their own).
    pub(super) fn direct_dw_eligible(&self) -> bool {
        self.path == super::Path::Im2col
    }

    /// Whether it is faster here than on im2col: planes wide enough that the padded rows add
    /// at most half again the multiply-adds (8x8 outputs with pads of 1 add a quarter; 4x4 add
    /// a double and lost 2x to the batch-wide GEMM of `block.rs` at 256 channels). A small-plane
    /// layer keeps its blocked GEMMs unless Winograd computes its input gradient: on im2col the
    /// input gradient would fall back to one small GEMM per image. criterion `weight_grad`
    /// (batch 64, 1 thread, AVX-512 kernels), im2col -> direct: ResNet-20's 16 channels on
    /// 32x32 5.2 -> 1.75 ms, 32 on 16x16 2.8 -> 2.0, 64 on 8x8 3.2 -> 2.4; ResNet-18's 64 on
    /// 16x16 8.2 -> 7.0, 128 on 8x8 9.6 -> 8.8; 256 on 4x4 lost 2x (batch 128).
    ///
    /// Strided layers only as image stems with large kernels (at most 4 input channels, 5x5
    /// and up), where im2col's GEMM packs each column for few multiply-adds and the phase copy
    /// is small beside the taps. Backward at batch 64, AVX-512 kernels, im2col -> direct (1 / 2
    /// threads, ms): ResNet-18's 7x7 stride-2 stem on 64x64 12.7 -> 9.1 / 7.3 -> 5.0, on
    /// 128x128 50.7 -> 38.4 / 28.8 -> 19.4. Lost: 3x3 stride-2 stems of 3 -> 32 and 3 -> 16
    /// channels (MobileNet's, 64x64) 2.1 -> 2.7 and 1.4 -> 2.0 (the copy into phase planes
    /// outweighs 27 taps), ResNet-18's 64 -> 128 stride-2 3x3 on 32x32 39.8 -> 50.2 with the
    /// input gradient; ResNet-20's 16 -> 32 on 32x32 (batch 128) 14.3 -> 13.2, within noise.
    pub(super) fn direct_dw_pays(&self) -> bool {
        2 * self.dw_layout().run <= 3 * self.oh * self.ow
            && (self.block_images() == 1 || self.winograd || self.direct_fwd)
            && (self.sh * self.sw == 1 || self.large_kernel_stem())
            && dw_mode_allows()
    }

    /// An image stem with a large kernel (at most 4 input channels, 5x5 and up, like
    /// ResNet's 7x7): the strided layers where the direct kernels beat im2col + GEMM, forward
    /// (`direct.rs`) and weight gradient alike.
    pub(super) fn large_kernel_stem(&self) -> bool {
        self.cig <= 4 && self.kh * self.kw >= 25
    }

    pub(super) fn dw_layout(&self) -> Layout {
        let wp = (self.w + self.pl + self.pr).div_ceil(self.sw);
        let run = (self.oh * wp).div_ceil(LANES) * LANES;
        // The furthest read: the last tap's offset within its phase plus a whole run.
        let (ra, rb) = self.dw_phase_shift(self.kh - 1, self.kw - 1);
        let pstride = ra * wp + rb + run;
        let images = TARGET_RUN.div_ceil(run).clamp(1, MAX_IMAGES);
        Layout {
            wp,
            run,
            pstride,
            rows_used: (self.oh - 1) * self.sh + (self.kh - 1) * self.dh + 1,
            cols_used: (self.ow - 1) * self.sw + (self.kw - 1) * self.dw + 1,
            images,
        }
    }

    /// Row and column offset of tap `(a, b)` within its phase plane.
    fn dw_phase_shift(&self, a: usize, b: usize) -> (usize, usize) {
        (a * self.dh / self.sh, b * self.dw / self.sw)
    }

    /// Index of the phase plane of padded row `r` and column `q` among a channel's planes.
    fn dw_phase(&self, r: usize, q: usize) -> usize {
        (r % self.sh) * self.sw + q % self.sw
    }

    /// Scratch for [`Self::weight_grad_direct`], zeroed.
    pub(super) fn dw_scratch(&self) -> DwScratch {
        let l = self.dw_layout();
        let cstride = self.sh * self.sw * l.pstride;
        let offs = (0..self.cig)
            .flat_map(|c| {
                (0..self.kh * self.kw).map(move |t| {
                    let (a, b) = (t / self.kw, t % self.kw);
                    let (ra, rb) = self.dw_phase_shift(a, b);
                    let phase = self.dw_phase(a * self.dh, b * self.dw);
                    c * cstride + phase * l.pstride + ra * l.wp + rb
                })
            })
            .collect();
        DwScratch {
            xp: vec![0.0; l.images * self.ci * cstride],
            dyp: vec![0.0; l.images * self.co * l.run],
            offs,
        }
    }

    /// Images per call of [`Self::weight_grad_direct`].
    pub(super) fn dw_images(&self) -> usize {
        self.dw_layout().images
    }

    /// Copies `x` (`[images, ci, h, w]`) into the padded phase planes of `xp`
    /// (`[images][ci][sh * sw][pstride]`, see [`Layout`]; `l` is [`Self::dw_layout`]); entries
    /// outside the copied interior keep what they held (zeros from [`Self::dw_scratch`], or this
    /// geometry's earlier copies).
    pub(super) fn fill_phase_planes(&self, x: &[f32], xp: &mut [f32], l: &Layout) {
        let cstride = self.sh * self.sw * l.pstride;
        let xstride = self.ci * cstride;
        // Input columns that land in read columns: `q = x + pl < cols_used`.
        let xcols = self.w.min(l.cols_used.saturating_sub(self.pl));
        for (c, plane) in x.chunks(self.h * self.w).enumerate() {
            let (i, c) = (c / self.ci, c % self.ci);
            let base = i * xstride + c * cstride;
            for (y, row) in plane.chunks(self.w).enumerate() {
                let r = y + self.pt;
                if r >= l.rows_used {
                    break;
                }
                let rowbase = base + (r / self.sh) * l.wp;
                if self.sw == 1 {
                    let dst = rowbase + self.dw_phase(r, 0) * l.pstride + self.pl;
                    xp[dst..][..xcols].copy_from_slice(&row[..xcols]);
                    continue;
                }
                for (xi, &v) in row[..xcols].iter().enumerate() {
                    let q = xi + self.pl;
                    xp[rowbase + self.dw_phase(r, q) * l.pstride + q / self.sw] = v;
                }
            }
        }
    }

    /// Adds the weight gradient of a few images (at most [`Self::dw_images`]) to `dw`
    /// (`[co, cig, kh, kw]`): `x` is `[images, ci, h, w]`, `dy` is `[images, co, oh, ow]`.
    pub(super) fn weight_grad_direct(
        &self,
        x: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        s: &mut DwScratch,
    ) {
        let l = self.dw_layout();
        let images = x.len() / self.x_len();
        debug_assert!(images <= l.images && dy.len() == images * self.y_len());
        let cstride = self.sh * self.sw * l.pstride;
        let (xstride, dystride) = (self.ci * cstride, self.co * l.run);
        self.fill_phase_planes(x, &mut s.xp, &l);
        for (o, plane) in dy.chunks(self.oh * self.ow).enumerate() {
            let (i, o) = (o / self.co, o % self.co);
            for (r, row) in plane.chunks(self.ow).enumerate() {
                s.dyp[i * dystride + o * l.run + r * l.wp..][..self.ow].copy_from_slice(row);
            }
        }
        let k = self.k_rows();
        for grp in 0..self.group {
            let runs = Runs {
                x: &s.xp[grp * self.cig * cstride..],
                dy: &s.dyp[grp * self.cog * l.run..],
                offs: &s.offs,
                run: l.run,
                dyrow: l.run,
                rows: self.cog,
                images,
                xstride,
                dystride,
            };
            runs.check();
            dot_tiles(&runs, &mut dw[grp * self.cog * k..(grp + 1) * self.cog * k]);
        }
    }
}

/// The dot products of one group over a few images: output row `o`, column-matrix row `j` and
/// image `i` pair `dy[i * dystride + o * dyrow ..][..run]` with
/// `x[i * xstride + offs[j] ..][..run]`.
pub(super) struct Runs<'a> {
    pub x: &'a [f32],
    pub dy: &'a [f32],
    pub offs: &'a [usize],
    pub run: usize,
    /// Distance between consecutive output rows' runs in `dy`: `run` where they are packed,
    /// more where another axis sits between them (the Winograd weight gradient's taps,
    /// `winograd_dw.rs`).
    pub dyrow: usize,
    pub rows: usize,
    pub images: usize,
    pub xstride: usize,
    pub dystride: usize,
}

impl Runs<'_> {
    /// Every read in bounds: the vector kernels rely on it.
    pub(super) fn check(&self) {
        let last = self.images.saturating_sub(1);
        let xmax = self
            .offs
            .iter()
            .max()
            .map_or(0, |&o| last * self.xstride + o + self.run);
        let dymax = last * self.dystride + self.rows.saturating_sub(1) * self.dyrow + self.run;
        assert!(
            self.run.is_multiple_of(LANES) && xmax <= self.x.len() && dymax <= self.dy.len(),
            "weight-gradient runs out of bounds"
        );
    }
}

/// `dw[o][j] += sum_i sum_p dy(i, o)[p] * x(i, j)[p]` for every output row `o` and column-
/// matrix row `j` (see [`Runs`]), on the widest vector unit the CPU has.
pub(super) fn dot_tiles(r: &Runs, dw: &mut [f32]) {
    debug_assert_eq!(dw.len(), r.rows * r.offs.len());
    #[cfg(target_arch = "x86_64")]
    {
        if crate::engine::isa::cpu_has!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked); `Runs::check` bounds every read.
            unsafe { avx512::dot_tiles(r, dw) };
            return;
        }
        if crate::engine::isa::avx2_fma() {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { avx2::dot_tiles(r, dw) };
            return;
        }
    }
    dot_tiles_scalar(r, dw);
}

/// Portable version, and the test reference for the vector ones: eight partial sums per entry,
/// so that it also vectorises where no kernel below applies.
fn dot_tiles_scalar(r: &Runs, dw: &mut [f32]) {
    let k = r.offs.len();
    for o in 0..r.rows {
        for (j, &off) in r.offs.iter().enumerate() {
            let mut acc = [0.0f32; 8];
            for i in 0..r.images {
                let d = &r.dy[i * r.dystride + o * r.dyrow..][..r.run];
                let xs = &r.x[i * r.xstride + off..][..r.run];
                for (dc, xc) in d.chunks_exact(8).zip(xs.chunks_exact(8)) {
                    for l in 0..8 {
                        acc[l] += dc[l] * xc[l];
                    }
                }
            }
            dw[o * k + j] += acc.iter().sum::<f32>();
        }
    }
}

// The register tiles index their accumulator arrays by constant bounds on purpose: the loops
// unroll and the arrays live in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::Runs;
    use std::arch::x86_64::*;

    /// Output rows and taps per register tile: 16 accumulators + 4 + 1 of the 32 registers
    /// (4 x 6 spilled accumulators to the stack and ran slower).
    const MI: usize = 4;
    const NJ: usize = 4;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_tiles(r: &Runs, dw: &mut [f32]) {
        for_each_row_tile!(r.rows, r.offs.len(), MI, NJ, 1, |o, m, j, big_j| {
            row_tiles!(m, big_j, NJ, tile(r, dw, o, j), [4, 3, 2, 1])
        });
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const M: usize, const N: usize>(r: &Runs, dw: &mut [f32], o: usize, j: usize) {
        let k = r.offs.len();
        let mut acc = [[_mm512_setzero_ps(); N]; M];
        for i in 0..r.images {
            let xp = r.x.as_ptr().add(i * r.xstride);
            let dp = r.dy.as_ptr().add(i * r.dystride + o * r.dyrow);
            let xs: [*const f32; N] = std::array::from_fn(|n| xp.add(r.offs[j + n]));
            let mut p = 0;
            while p < r.run {
                let d: [__m512; M] =
                    std::array::from_fn(|m| _mm512_loadu_ps(dp.add(m * r.dyrow + p)));
                for n in 0..N {
                    let xv = _mm512_loadu_ps(xs[n].add(p));
                    for m in 0..M {
                        acc[m][n] = _mm512_fmadd_ps(d[m], xv, acc[m][n]);
                    }
                }
                p += 16;
            }
        }
        for m in 0..M {
            for n in 0..N {
                *dw.get_unchecked_mut((o + m) * k + j + n) += _mm512_reduce_add_ps(acc[m][n]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::Runs;
    use std::arch::x86_64::*;

    /// Output rows and taps per register tile: 12 accumulators + 3 + 1 of the 16 registers.
    const MI: usize = 3;
    const NJ: usize = 4;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_tiles(r: &Runs, dw: &mut [f32]) {
        for_each_row_tile!(r.rows, r.offs.len(), MI, NJ, 1, |o, m, j, big_j| {
            row_tiles!(m, big_j, NJ, tile(r, dw, o, j), [3, 2, 1])
        });
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const M: usize, const N: usize>(r: &Runs, dw: &mut [f32], o: usize, j: usize) {
        let k = r.offs.len();
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        for i in 0..r.images {
            let xp = r.x.as_ptr().add(i * r.xstride);
            let dp = r.dy.as_ptr().add(i * r.dystride + o * r.dyrow);
            let xs: [*const f32; N] = std::array::from_fn(|n| xp.add(r.offs[j + n]));
            let mut p = 0;
            while p < r.run {
                let d: [__m256; M] =
                    std::array::from_fn(|m| _mm256_loadu_ps(dp.add(m * r.dyrow + p)));
                for n in 0..N {
                    let xv = _mm256_loadu_ps(xs[n].add(p));
                    for m in 0..M {
                        acc[m][n] = _mm256_fmadd_ps(d[m], xv, acc[m][n]);
                    }
                }
                p += 8;
            }
        }
        for m in 0..M {
            for n in 0..N {
                // Horizontal sum: 8 -> 4 -> 2 -> 1 lanes.
                let v = acc[m][n];
                let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                *dw.get_unchecked_mut((o + m) * k + j + n) += _mm_cvtss_f32(s1);
            }
        }
    }
}

/// Benchmark and test override of the choice between this kernel and im2col.
static MODE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn dw_mode_allows() -> bool {
    MODE.load(std::sync::atomic::Ordering::Relaxed) == 0
}

/// Turns the direct weight gradient off (`false`: every stride-1 layer's weight gradient on
/// im2col + GEMM, as before it existed) or back on; for benchmarks and tests that compare the two.
pub fn set_direct_weight_grad(on: bool) {
    MODE.store(u8::from(!on), std::sync::atomic::Ordering::Relaxed);
}

/// Whether the speed rule decides (no benchmark override in force).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    dw_mode_allows()
}

/// The kernels a test can call directly.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
pub(super) enum Kernel {
    Portable,
    Avx2,
    Avx512,
}

#[cfg(test)]
impl Kernel {
    /// The vector kernels this CPU can run.
    pub(super) fn available() -> Vec<Kernel> {
        let mut k = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if crate::engine::isa::avx2_fma() {
                k.push(Kernel::Avx2);
            }
            if crate::engine::isa::cpu_has!("avx512f") {
                k.push(Kernel::Avx512);
            }
        }
        k
    }
}

#[cfg(test)]
pub(super) fn dot_tiles_for_test(r: &Runs, dw: &mut [f32], kernel: Kernel) {
    r.check();
    match kernel {
        Kernel::Portable => dot_tiles_scalar(r, dw),
        // SAFETY: only called for kernels `Kernel::available` lists.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { avx2::dot_tiles(r, dw) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { avx512::dot_tiles(r, dw) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("no such kernel on this architecture"),
    }
}
