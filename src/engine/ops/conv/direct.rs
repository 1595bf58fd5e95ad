//! Direct convolution forward on the padded stride-phase planes of `weight_grad.rs`: `y[o][p] =
//! sum_j w[o][j] * xp[offs[j] + p]`, with `j` running over (input channel, tap) and `p` over
//! the flat output positions (row stride `wp`), no im2col matrix and no GEMM packing.
//!
//! Why: im2col + GEMM feeds each packed column value to only `co` multiply-adds, so layers with
//! few output channels run far below the GEMM's speed, and Winograd's transforms cost more
//! than its GEMMs at 16 channels. Here a register tile of `MI` output channels by `NP` vectors
//! of positions loads each input vector once per tile and broadcasts each weight, `MI * NP`
//! fused multiply-adds per `MI + NP` loads. It runs (see the rules below) ResNet's 7x7
//! stride-2 stem, and stride-1 3x3 layers of up to 16 channels (ResNet-20's first stage,
//! Tucker-2 cores of low rank), where it beat Winograd F(2x2) despite 2.25x the
//! multiply-adds. Their input gradient is the same kind of conv, run here too
//! ([`Geom::direct_dx_geom`]).
//!
//! The layout is the weight gradient's: every tap `(a, b)` of a stride-`s` conv reads its phase
//! plane at a fixed offset from the output position, so every output entry is one dot product
//! of `ci * kh * kw` terms, summed in that order (channel, then tap): results never depend on
//! the thread count or the batch. Positions in the `wp - ow` padding columns and the run's tail
//! are computed and dropped.

use super::weight_grad::DwScratch;
use super::{Geom, Path};
use std::sync::atomic::{AtomicBool, Ordering};

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the direct forward off (`false`: those layers go back to im2col + GEMM) or on; for
/// benchmarks and tests that compare the two.
pub fn set_direct_forward(on: bool) {
    DISABLED.store(!on, Ordering::Relaxed);
}

/// Whether the speed rule decides (no override in force) and may choose the direct forward
/// (on this CPU, under `ELRT_MAX_ISA`: [`crate::engine::isa::fast_fma`]).
#[cfg(test)]
pub(super) fn auto_mode() -> bool {
    !DISABLED.load(Ordering::Relaxed) && crate::engine::isa::fast_fma()
}

impl Geom {
    /// Whether the forward can run here: ungrouped im2col layers (any stride, dilation and
    /// padding).
    pub(super) fn direct_fwd_eligible(&self) -> bool {
        self.path == Path::Im2col && self.group == 1
    }

    /// Whether it is faster here than im2col + GEMM: on large-kernel image stems. Best of 12
    /// alternating calls, AVX-512 kernels, im2col -> direct (1 / 2 threads, ms): ResNet-18's 7x7
    /// stride-2 stem, batch 64, on 64x64 13.6 -> 9.4 / 7.1 -> 4.8, on 128x128 44.4 -> 31.2 /
    /// 23.0 -> 17.3. Not taken: 3x3 stride-2 stems (MobileNet's 3 -> 32 on 64x64 1.6 -> 2.3,
    /// 3 -> 16 1.1 -> 1.8: the phase copy and the output copy outweigh 27 taps), ResNet-20's
    /// 16 -> 32 stride-2 (5.1 -> 5.3, 2 threads 3.3 -> 3.2) and ResNet-18's 64 -> 128 stride-2
    /// on 32x32 (19.7 -> 21.2 / 10.9 -> 10.7), ties within noise; ResNet-20's 3 -> 16 3x3
    /// stride-1 stem 1.16 -> 1.07 / 0.72 -> 0.59, a gain of 0.1 ms left for a later rule.
    /// Never without a hardware FMA ([`crate::engine::isa::fast_fma`]): the portable build's
    /// FMAs are then library calls.
    pub(super) fn direct_fwd_pays(&self) -> bool {
        (self.large_kernel_stem() || self.few_channel_3x3())
            && crate::engine::isa::fast_fma()
            && !DISABLED.load(Ordering::Relaxed)
    }

    /// A stride-1, undilated 3x3 conv with at most 16 channels in and out (24 on planes up to
    /// 16x16), on planes of 8x8 and up: there the direct forward beat Winograd, whose
    /// transforms outweigh its GEMMs at so few channels. Best of 10 alternating calls, batch
    /// 128, AVX-512 kernels, Winograd (or blocked im2col) -> direct, 1 / 2 threads, ms: 16ch
    /// 32x32 4.56 -> 3.81 / 2.51 -> 2.15, 16x16 1.44 -> 0.94 / 0.85 -> 0.54, 8x8 0.74 -> 0.42 /
    /// 0.41 -> 0.20; 8ch 32x32 1.54 -> 0.97 / 0.85 -> 0.57; 24ch 16x16 2.45 -> 2.03 / 1.44 ->
    /// 1.15, 8x8 0.87 -> 0.69 / 0.50 -> 0.42. Ties or losses: 24ch 32x32 8.21 -> 8.11 (batch 64
    /// 3.72 -> 3.79), 32ch 16x16 3.84 -> 3.72 / 1.99 -> 1.83, 32ch 32x32 11.9 -> 13.8, 64ch
    /// 16x16 12.6 -> 13.6. The input gradient of such a layer is the same kind of conv (see
    /// [`Geom::direct_dx_geom`]). On an AVX2-only AMD EPYC (Zen kernels, batch 64, 1 thread,
    /// criterion group `direct_forward`, after the last-tile fix of `for_each_row_tile!`):
    /// 16ch 32x32 Winograd 8.96 -> direct 5.98 ms, rank-8 core 8.25 -> 1.60, rank-12 core 4.73
    /// -> 3.16; 24ch 32x32 and 32ch 16x16 stayed on Winograd (19.4 -> 26.9 and a tie at
    /// 10.9 -> 9.1 on a loaded machine).
    fn few_channel_3x3(&self) -> bool {
        let widest = self.ci.max(self.co);
        [self.sh, self.sw, self.dh, self.dw, self.kh, self.kw] == [1, 1, 1, 1, 3, 3]
            && self.oh * self.ow >= 64
            && (widest <= 16 || (widest <= 24 && self.oh * self.ow <= 256))
    }

    /// For a direct layer of stride 1, the geometry of its input gradient as a direct forward:
    /// `dx = conv(dy, w')` with `w'[c][o][a][b] = w[o][c][kh-1-a][kw-1-b]` and pads
    /// `dilation * (k - 1) - pad` ([`Geom::flipped_transposed`] makes `w'`). `None` where the
    /// layer is not direct, strided, padded beyond its kernel's extent, or has fewer than 8
    /// input channels: its transposed conv would fill only part of a register tile's rows
    /// (ResNet-20's 3 -> 16 stem, batch 128, 1 thread: backward 2.28 -> 2.92 ms with it, while
    /// the forward went 1.32 -> 1.00; a stem needs no input gradient anyway).
    pub(super) fn direct_dx_geom(&self) -> Option<Geom> {
        let (eh, ew) = (self.dh * (self.kh - 1), self.dw * (self.kw - 1));
        let fits = self.pt.max(self.pb) <= eh && self.pl.max(self.pr) <= ew;
        let direct = self.direct_fwd && self.sh == 1 && self.sw == 1 && self.ci >= 8;
        (direct && fits).then(|| Geom {
            ci: self.co,
            co: self.ci,
            cig: self.co,
            cog: self.ci,
            h: self.oh,
            w: self.ow,
            oh: self.h,
            ow: self.w,
            pt: eh - self.pt,
            pb: eh - self.pb,
            pl: ew - self.pl,
            pr: ew - self.pr,
            winograd: false,
            small_plane: false,
            direct_dw: false,
            direct_fwd: true,
            ..*self
        })
    }

    /// `w'[c][o][a][b] = w[o][c][kh-1-a][kw-1-b]` for [`Geom::direct_dx_geom`].
    pub(super) fn flipped_transposed(&self, w: &[f32]) -> Vec<f32> {
        let kk = self.kh * self.kw;
        let mut out = vec![0.0f32; w.len()];
        for o in 0..self.co {
            for c in 0..self.ci {
                let src = &w[(o * self.ci + c) * kk..][..kk];
                let dst = &mut out[(c * self.co + o) * kk..][..kk];
                for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = v;
                }
            }
        }
        out
    }

    /// Forward of a few images (at most [`Geom::dw_images`]): `x` is `[images, ci, h, w]`, `y`
    /// (`[images, co, oh, ow]`) is overwritten; `s` is a scratch of [`Geom::dw_scratch`] kept
    /// for this geometry's forward only (its output buffer loses the zero columns the weight
    /// gradient relies on).
    pub(super) fn forward_direct(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut DwScratch,
    ) {
        debug_assert_eq!(self.group, 1);
        let l = self.dw_layout();
        let images = x.len() / self.x_len();
        let xstride = self.ci * self.sh * self.sw * l.pstride;
        self.fill_phase_planes(x, &mut s.xp, &l);
        let k = self.k_rows();
        for (i, yi) in y.chunks_mut(self.y_len()).enumerate().take(images) {
            let out = &mut s.dyp[..self.co * l.run];
            let t = Taps {
                x: &s.xp[i * xstride..],
                offs: &s.offs,
                w: &w[..self.co * k],
                run: l.run,
            };
            t.check();
            dot_rows(&t, out);
            for (o, plane) in yi.chunks_mut(self.oh * self.ow).enumerate() {
                let bv = bias.map_or(0.0, |b| b[o]);
                for (r, row) in plane.chunks_mut(self.ow).enumerate() {
                    let src = &out[o * l.run + r * l.wp..][..self.ow];
                    for (d, &v) in row.iter_mut().zip(src) {
                        *d = v + bv;
                    }
                }
            }
        }
    }
}

/// One image's products: output row `o` at position `p` is `sum_j w[o * k + j] * x[offs[j] +
/// p]`, `k = offs.len()`, for `p` in `0..run`.
pub(super) struct Taps<'a> {
    pub x: &'a [f32],
    pub offs: &'a [usize],
    pub w: &'a [f32],
    pub run: usize,
}

impl Taps<'_> {
    fn rows(&self) -> usize {
        self.w.len() / self.offs.len().max(1)
    }

    /// Every read in bounds: the vector kernels rely on it.
    pub(super) fn check(&self) {
        let xmax = self.offs.iter().max().map_or(0, |&o| o + self.run);
        assert!(
            self.run.is_multiple_of(16)
                && xmax <= self.x.len()
                && self.w.len() == self.rows() * self.offs.len(),
            "direct conv taps out of bounds"
        );
    }
}

/// Writes every output row (`out` is `[rows][run]`) on the widest vector unit the CPU has.
pub(super) fn dot_rows(t: &Taps, out: &mut [f32]) {
    assert!(out.len() >= t.rows() * t.run);
    #[cfg(target_arch = "x86_64")]
    {
        if crate::engine::isa::cpu_has!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked); `Taps::check` and the assert above bound
            // every read and write.
            unsafe { avx512::dot_rows(t, out) };
            return;
        }
        if crate::engine::isa::avx2_fma() {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { avx2::dot_rows(t, out) };
            return;
        }
    }
    dot_rows_scalar(t, out);
}

/// Portable version and the vector kernels' test reference: the same sums in the same order
/// (one fused multiply-add per term, channel then tap), so all three agree bit for bit.
fn dot_rows_scalar(t: &Taps, out: &mut [f32]) {
    let k = t.offs.len();
    for o in 0..t.rows() {
        let row = &mut out[o * t.run..][..t.run];
        row.fill(0.0);
        for (j, &off) in t.offs.iter().enumerate() {
            let wv = t.w[o * k + j];
            for (d, &xv) in row.iter_mut().zip(&t.x[off..off + t.run]) {
                *d = wv.mul_add(xv, *d);
            }
        }
    }
}

// The register tiles index their accumulator arrays by constant bounds on purpose: the loops
// unroll and the arrays live in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::Taps;
    use std::arch::x86_64::*;

    /// Output rows and position vectors per tile: 24 accumulators + 3 inputs + 1 weight of the
    /// 32 registers.
    const MI: usize = 8;
    const NP: usize = 3;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot_rows(t: &Taps, out: &mut [f32]) {
        for_each_row_tile!(t.rows(), t.run, MI, NP * 16, 16, |o, m, p, big_p| {
            row_tiles!(m, big_p, NP, tile(t, out, o, p), [8, 7, 6, 5, 4, 3, 2, 1])
        });
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const M: usize, const P: usize>(t: &Taps, out: &mut [f32], o: usize, p: usize) {
        let k = t.offs.len();
        let mut acc = [[_mm512_setzero_ps(); P]; M];
        let (xp, wp) = (t.x.as_ptr(), t.w.as_ptr().add(o * k));
        for j in 0..k {
            let xj = xp.add(*t.offs.get_unchecked(j) + p);
            let xv: [__m512; P] = std::array::from_fn(|v| _mm512_loadu_ps(xj.add(16 * v)));
            for m in 0..M {
                let wv = _mm512_set1_ps(*wp.add(m * k + j));
                for v in 0..P {
                    acc[m][v] = _mm512_fmadd_ps(wv, xv[v], acc[m][v]);
                }
            }
        }
        let op = out.as_mut_ptr();
        for m in 0..M {
            for v in 0..P {
                _mm512_storeu_ps(op.add((o + m) * t.run + p + 16 * v), acc[m][v]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::Taps;
    use std::arch::x86_64::*;

    /// Output rows and position vectors per tile: 12 accumulators + 2 inputs + 1 weight of the
    /// 16 registers.
    const MI: usize = 6;
    const NP: usize = 2;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(t: &Taps, out: &mut [f32]) {
        for_each_row_tile!(t.rows(), t.run, MI, NP * 8, 8, |o, m, p, big_p| {
            row_tiles!(m, big_p, NP, tile(t, out, o, p), [6, 5, 4, 3, 2, 1])
        });
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const M: usize, const P: usize>(t: &Taps, out: &mut [f32], o: usize, p: usize) {
        let k = t.offs.len();
        let mut acc = [[_mm256_setzero_ps(); P]; M];
        let (xp, wp) = (t.x.as_ptr(), t.w.as_ptr().add(o * k));
        for j in 0..k {
            let xj = xp.add(*t.offs.get_unchecked(j) + p);
            let xv: [__m256; P] = std::array::from_fn(|v| _mm256_loadu_ps(xj.add(8 * v)));
            for m in 0..M {
                let wv = _mm256_set1_ps(*wp.add(m * k + j));
                for v in 0..P {
                    acc[m][v] = _mm256_fmadd_ps(wv, xv[v], acc[m][v]);
                }
            }
        }
        let op = out.as_mut_ptr();
        for m in 0..M {
            for v in 0..P {
                _mm256_storeu_ps(op.add((o + m) * t.run + p + 8 * v), acc[m][v]);
            }
        }
    }
}

/// The kernels a test can call directly.
#[cfg(test)]
pub(super) fn dot_rows_for_test(t: &Taps, out: &mut [f32], kernel: super::weight_grad::Kernel) {
    use super::weight_grad::Kernel;
    t.check();
    match kernel {
        Kernel::Portable => dot_rows_scalar(t, out),
        // SAFETY: only called for kernels `Kernel::available` lists.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { avx2::dot_rows(t, out) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { avx512::dot_rows(t, out) },
        #[allow(unreachable_patterns)]
        _ => unreachable!("no such kernel on this architecture"),
    }
}
