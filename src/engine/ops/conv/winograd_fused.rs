//! Winograd F(4x4, 3x3) for stride-1 3x3 layers of up to 64 channels in and out on 8x8 and
//! larger planes, up to 128 on 16x16 and larger (ResNet-20, ResNet-18's 64-channel layers and
//! its 128-channel ones from 128x128 inputs, low-rank Tucker-2 cores), one
//! image (on small planes a few, see [`Plane::fused_images`]) at a time with every
//! intermediate kept in cache: forward, input gradient and weight gradient.
//!
//! Why: ResNet-20's 16-channel layers ran on the direct kernel (`direct.rs`) at the sgemm
//! ceiling (16ch 32x32, 84 GFLOP/s, 33% of its training step with the weight gradient), 144
//! multiply-adds per output and channel pair. F(4x4) needs 36 per 16 outputs, but the other
//! Winograd paths lost at 16 channels: `winograd.rs` transforms plane by plane with GEMMs of
//! 16 x 16 per tap, and `winograd_cl.rs` writes the transformed batch (2.25x the activation)
//! out and reads it back. Here 16 channels are one vector (one AVX-512 register), wider layers
//! a few vectors per pixel (`CI`, `CO`: the channels rounded up to whole vectors), so:
//!
//! - the image is copied channels-last into a zero-padded buffer `P[py][px][CI]` (rows and
//!   columns of whole tiles, the padding's zeros around it; a slot per image of the group);
//! - per block of [`TB`] tiles: the input transform `V = B^T d B` along the channel lanes,
//!   into `[TB][36][CI]`; for each of the 36 transformed taps and vector of output channels,
//!   `M[t][k] = sum_c V[t][k][c] * U[k][c]` (a broadcast of `V[t][k][c]` times the weight
//!   vector `U[k][c]` over 16 output channels, the block's 8 accumulators in registers); the
//!   output transform `y = A^T M A` plus the bias into a channels-last output `O[oy][ox][CO]`;
//! - `O` is copied back to NCHW.
//!
//! Transformed weights `U[k][c][o]` (36 x CI x CO, zero-padded) are made once per call. At 16
//! channels the block of tiles stays in L1 (2 x 18 KB) and the padded image in L2, so nothing
//! but the image and its output crosses memory. The weight gradient runs the same way over a
//! part of the batch: per sweep of [`DW_SWEEP`] tiles, `V` from the images and `dM = A dy A^T`
//! from the channels-last output gradients, `dU_k += V_k dM_k^T` with 16 sums of a tap in
//! registers ([`Plane::fused_weight_grad_sums`]); the parts' `dU` (36 x CI x CO) are summed
//! in part order and `G^T dU G` taken once per call ([`fused_untransform`]); its parts, of at
//! least [`DW_PART_TILES`] tiles, are the backward's parts, each task the part's input gradient
//! and then its sums ([`Geom::fused_dw_part_sums`], [`Geom::fused_dw_from_parts`]).
//! Taken per part and pair `(o, c)` (36 loads 16 KB apart at 64 channels), that last step had
//! cost 3x the sums themselves and made this weight gradient lose from 32 channels; plane by
//! plane and once (and with 16-tile sweeps), criterion `weight_grad` (batch 64, 1 thread) went 9.4 ->
//! 1.76 ms on ResNet-20's 64ch 8x8 layer (its small-plane one: 4.4) and 15.0 -> 5.3 on
//! ResNet-18's 64ch 16x16 (Winograd's own, `winograd_dw.rs`: 9.9), 3.2 -> 1.49 on 32ch 16x16
//! (Winograd's: 2.9).
//!
//! Builds ([`Build`]): AVX-512 runs every pass in its intrinsics; AVX2 + FMA too, its
//! products and weight-gradient sums on tiles of half the AVX-512 ones (16 registers of 8
//! lanes), its transforms on 8-lane vectors and its layout copies through 8x8 transposes; the
//! portable build is the reference the tests hold the others to. Without the AVX2 build this
//! path was off on AVX2 CPUs. ResNet-20's training step on an AVX2 EPYC (batch 128, 1 thread):
//! 483-536 ms with the other kernels, 347-349 with the AVX2 tiles and transposes (the
//! transforms still plain Rust), 301-328 with the transforms in intrinsics too (see
//! [`Geom::wino_fused_pays`] for which layers).
//!
//! Numerics: F(4x4)'s transforms (`winograd4.rs`'s matrices in this file's summation order),
//! within `WINO4_REL_TOL` of each output's tile scale as the other F(4x4) paths, the weight
//! gradient within `CL_DW_TOL` of its window's `sum |dy| |x|`. Each output is a fixed sequence
//! of operations on its own image (whichever images share its blocks), and a part's weight
//! gradient sums its images' tiles in order (the parts then in part order): results do not
//! depend on the thread count, and the forward and input gradient not on the batch either.

use super::winograd::Plane;
use super::{Geom, Override};
use crate::engine::ops::unzeroed;
use rayon::prelude::*;

/// Channels per vector.
pub(super) const LANES: usize = 16;
/// The widest layer this path takes, in and out (16 vectors; benchmarks force it there).
pub(super) const MAX_CHANNELS: usize = 256;
/// The widest layer the speed rule sends here (8 vectors).
const WIDEST_BY_RULE: usize = 128;
/// The widest on Intel CPUs of the layers the channels-last Winograd takes (see
/// [`Geom::wino_fused_pays`]).
pub(super) const WIDEST_ON_INTEL: usize = 96;
/// The widest layer the speed rule sends here on planes under [`WIDE_MIN_PIXELS`] (4 vectors).
const WIDEST_ON_SMALL_PLANES: usize = 64;
/// Fewest output pixels of a layer wider than [`WIDEST_ON_SMALL_PLANES`] that the speed rule
/// sends here.
const WIDE_MIN_PIXELS: usize = 256;
/// Tiles per block of products: `TB` accumulators (plus the weight vector and the broadcast)
/// of the 32 AVX-512 registers, and 2 x 18 KB of transformed tiles that stay in L1.
const TB: usize = 8;
/// Tiles per pass of the weight gradient over its sums `dU` (36 x CI x CO): two blocks.
/// Criterion `weight_grad` (batch 64, 1 thread, AVX-512), 1 -> 2 -> 4 blocks, ms: 16ch 32x32
/// 2.13 -> 2.01 -> 1.90, 32ch 16x16 1.66 -> 1.49 -> 1.49, 64ch 8x8 1.83 -> 1.76 -> 1.97, 64ch
/// 16x16 6.37 -> 5.30 -> 5.79.
const DW_SWEEP: usize = 2 * TB;
/// Fewest tiles per part of the weight gradient ([`Geom::fused_dw_part`]). ResNet-18 at 64x64
/// (batch 64, 1 thread, `elrt speed --profile-nodes`), its 128-channel 8x8 layers' backward
/// with 16 / 4 / 2 parts (16 / 64 / 128 tiles): 14.9-15.1 / 10.2-11.2 / 10.2-10.3 ms. From 64
/// to 128 tiles (Intel Xeon, AVX-512; each part's sums `dU` are 590 KB at 64 channels, zeroed,
/// filled and read back once more by the ordered sum): the fused layers' backward in training
/// steps at 2 threads (best / median of 6 alternating runs on a noisy host), resnet18@64 (its
/// 64-channel 16x16 layers, 16 -> 8 parts) 20.4 / 23.0 -> 19.4 / 20.4 ms, resnet18_tucker2@64
/// (best of 5) 11.2 -> 10.6 ms; ResNet-20 (its 64-channel 8x8 layers, 8 -> 4 parts) a tie
/// within the noise (best of 5 and of 4: 58.3 -> 55.2, then 54.0 -> 56.6 ms); at 1 thread
/// resnet18@64 a tie (33.8-38.6 against 34.3-36.5 ms).
const DW_PART_TILES: usize = 128;
/// Fewest parts of the weight gradient (so that [`DW_PART_TILES`] leaves work for 4 threads
/// on small planes: 8x8 at batch 64 would otherwise be 2 parts).
const DW_MIN_PARTS: usize = 4;
/// Transformed taps per F(4x4, 3x3) tile.
const TAPS: usize = 36;

/// The override of [`Geom::wino_fused_pays`].
static FUSED: Override = Override::new();
/// The override of [`Geom::wino_fused_dw_pays`].
static FUSED_DW: Override = Override::new();

/// Benchmark override of this path's weight gradient on the layers it runs: `Some(true)`
/// always, `Some(false)` never (the direct weight gradient), `None` the speed rule.
#[doc(hidden)]
pub fn set_winograd_fused_weight_grad(mode: Option<bool>) {
    FUSED_DW.set(mode);
}

/// Benchmark override of this path: `Some(true)` on every layer it can take, `Some(false)`
/// never (the direct kernel runs them), `None` the speed rule.
#[doc(hidden)]
pub fn set_winograd_fused(mode: Option<bool>) {
    FUSED.set(mode);
}

/// Which build of the kernels runs: the AVX-512 one (every pass in AVX-512 intrinsics), the
/// AVX2 one (the products' and sums' tiles in AVX2 + FMA intrinsics, the transforms' plain
/// Rust compiled for AVX2), or plain Rust (the transforms compiled for AVX-512 / AVX2 where
/// the CPU has them).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Build {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Build {
    /// The fastest build this CPU runs.
    pub(super) fn best() -> Build {
        #[cfg(target_arch = "x86_64")]
        {
            if crate::engine::isa::cpu_has!("avx512f") {
                return Build::Avx512;
            }
            if crate::engine::isa::avx2_fma() {
                return Build::Avx2;
            }
        }
        Build::Portable
    }

    /// The fewest and most channels (each way) of the layers [`Geom::wino_fused_pays`] sends
    /// here on this build, if any (its doc has the measurements).
    pub(super) fn rule_channels(self) -> Option<(usize, usize)> {
        match self {
            Build::Portable => None,
            #[cfg(target_arch = "x86_64")]
            Build::Avx2 => Some((16, WIDEST_BY_RULE)),
            #[cfg(target_arch = "x86_64")]
            Build::Avx512 => Some((12, WIDEST_BY_RULE)),
        }
    }

    /// Every build this CPU runs (the tests compare them).
    #[cfg(test)]
    pub(super) fn available() -> Vec<Build> {
        let mut v = vec![Build::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if crate::engine::isa::avx2_fma() {
                v.push(Build::Avx2);
            }
            if crate::engine::isa::cpu_has!("avx512f") {
                v.push(Build::Avx512);
            }
        }
        v
    }
}

/// Whether the CPU is an Intel one (`cpuid` vendor "GenuineIntel"), whose caches the speed rule
/// treats apart ([`Geom::wino_fused_pays`]).
pub(super) fn intel_cpu() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static INTEL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *INTEL.get_or_init(|| {
            let r = std::arch::x86_64::__cpuid(0);
            // The vendor string is EBX, EDX, ECX: "Genu", "ineI", "ntel".
            (r.ebx, r.edx, r.ecx) == (0x756e_6547, 0x4965_6e69, 0x6c65_746e)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`pack`] on `build`'s transposes.
fn pack_on(build: Build, p: &Plane, x: &[f32], dst: &mut [f32]) {
    match build {
        // SAFETY: `Build::Avx2` exists only where the CPU has AVX2 and FMA (`Build::Avx512`
        // where it has AVX-512F); each pass checks the buffers' lengths itself.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::pack(p, x, dst) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::pack(p, x, dst) },
        Build::Portable => pack(p, x, dst),
    }
}

/// [`pack_dy`] on `build`'s transposes.
fn pack_dy_on(build: Build, p: &Plane, dy: &[f32], dst: &mut [f32]) {
    match build {
        // SAFETY: as in `pack_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::pack_dy(p, dy, dst) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::pack_dy(p, dy, dst) },
        Build::Portable => pack_dy(p, dy, dst),
    }
}

/// [`unpack`] on `build`'s transposes.
fn unpack_on(build: Build, p: &Plane, o: &[f32], y: &mut [f32], add: bool) {
    match build {
        // SAFETY: as in `pack_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::unpack(p, o, y, add) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::unpack(p, o, y, add) },
        Build::Portable => unpack(p, o, y, add),
    }
}

/// [`input_block`] on `build`'s vectors.
fn input_block_on(build: Build, p: &Plane, pp: &[f32], t0: usize, nb: usize, v: &mut [f32]) {
    match build {
        // SAFETY: as in `pack_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::input_block(p, pp, t0, nb, v) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::input_block(p, pp, t0, nb, v) },
        Build::Portable => input_block(p, pp, t0, nb, v),
    }
}

/// [`dy_block`] on `build`'s vectors.
fn dy_block_on(build: Build, p: &Plane, d: &[f32], t0: usize, nb: usize, dm: &mut [f32]) {
    match build {
        // SAFETY: as in `pack_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::dy_block(p, d, t0, nb, dm) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::dy_block(p, d, t0, nb, dm) },
        Build::Portable => dy_block(p, d, t0, nb, dm),
    }
}

/// [`output_block`] on `build`'s vectors.
#[allow(clippy::too_many_arguments)]
fn output_block_on(
    build: Build,
    p: &Plane,
    m: &[f32],
    t0: usize,
    nb: usize,
    bias: &[f32],
    o: &mut [f32],
) {
    match build {
        // SAFETY: as in `pack_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::output_block(p, m, t0, nb, bias, o) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::output_block(p, m, t0, nb, bias, o) },
        Build::Portable => output_block(p, m, t0, nb, bias, o),
    }
}

/// The products of a block ([`products_portable`]) on `build`'s tile.
fn products_on(
    build: Build,
    cin: usize,
    ci: usize,
    co: usize,
    u: &[f32],
    v: &[f32],
    m: &mut [f32],
) {
    match build {
        // SAFETY: `Build::Avx2` exists only where the CPU has AVX2 and FMA; the tile checks
        // the buffers' lengths itself.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::products(cin, ci, co, u, v, m) },
        // SAFETY: as above, for AVX-512F.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::products(cin, ci, co, u, v, m) },
        Build::Portable => products_portable(cin, ci, co, u, v, m),
    }
}

/// A sweep's weight-gradient sums ([`accumulate_portable`]) on `build`'s tile.
#[allow(clippy::too_many_arguments)]
fn accumulate_on(
    build: Build,
    cin: usize,
    ci: usize,
    co: usize,
    nb: usize,
    v: &[f32],
    dm: &[f32],
    du: &mut [f32],
) {
    match build {
        // SAFETY: as in `products_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx2 => unsafe { avx2::accumulate(cin, ci, co, nb, v, dm, du) },
        // SAFETY: as in `products_on`.
        #[cfg(target_arch = "x86_64")]
        Build::Avx512 => unsafe { avx512::accumulate(cin, ci, co, nb, v, dm, du) },
        Build::Portable => accumulate_portable(cin, ci, co, nb, v, dm, du),
    }
}

impl Geom {
    /// Whether this path can run the layer (forward, input gradient through
    /// `Geom::direct_dx_geom`, weight gradient): one Winograd can take
    /// (`Geom::winograd_eligible`: ungrouped, undilated stride-1 3x3, pads of at most 2), of at
    /// most [`MAX_CHANNELS`] channels in and out.
    pub(super) fn wino_fused_eligible(&self) -> bool {
        self.winograd_eligible() && self.ci.max(self.co) <= MAX_CHANNELS
    }

    /// Whether it beats the kernels the other rules choose: on AVX-512 (its products' tile),
    /// planes of 8x8 and up (4x4 ones tied: 32ch 0.21 -> 0.22 ms, 64ch 0.66 -> 0.70, against
    /// small-plane / channels-last Winograd), 12 to [`WIDEST_BY_RULE`] channels each way.
    /// Criterion (`direct_forward`, forward alone, batch 64, 1 thread,
    /// AVX-512 AMD EPYC), the rule's path -> fused: direct 16ch 32x32 3.20 -> 1.83 ms, 16ch
    /// 16x16 0.91 -> 0.385, rank-12 core on 32x32 2.20 -> 1.58; Winograd (plane-wise F(2x2) or
    /// F(4x4)) 24ch 32x32 6.2 -> 4.4, 32ch 16x16 2.84 -> 1.40, 32ch 32x32 8.9 -> 5.8, 64ch
    /// 16x16 7.6 -> 5.2, 64ch 32x32 28.0 -> 21.6. Lost or near ties, left out: a rank-8 core
    /// on 32x32 0.91 -> 0.98 (the transforms and layout copies per channel stay while the
    /// products halve). 8x8 planes (4 tiles each) first ran half-empty blocks (64ch 2.73 ->
    /// 2.47); with two images per block ([`Plane::fused_images`]) 64ch 8x8 2.73 -> 1.54, 32ch
    /// 0.99 -> 0.44, 16ch (direct) 0.33 -> 0.16. Inside training steps (`elrt speed`,
    /// alternating builds): ResNet-20 (batch 128), 16-channel layers direct -> fused, 1 thread
    /// 326-335 -> 363-369 img/s, 2 threads 599-622 -> 689-715 (those layers' forward 44.9 ->
    /// 22.4 ms per step, backward with the direct weight gradient 86.7 -> 67.8); then its
    /// 32-channel layers too, 1 thread 359-372 -> 334-359 ms per step; resnet18 at 64x64
    /// (batch 64), its 64-channel 16x16 layers forward 29.8-32.2 -> 23.9-24.1 ms per step,
    /// backward 70.7-77.3 -> 66.4-68.4. Then 8x8 planes with the weight gradient of every
    /// width (below): ResNet-20's 64-channel stage forward 5.5 -> 2.85 ms per layer, 1 thread
    /// 296-315 -> 250-268 ms per step, 2 threads 159-213 -> 136-149.
    ///
    /// Wider than 64 channels (up to [`WIDEST_BY_RULE`]), against the channels-last Winograd
    /// (`winograd_cl.rs`), only on planes of [`WIDE_MIN_PIXELS`] and up: there the
    /// transformed weights (36 x CI x CO, 2.4 MB at 128 channels) no longer fit in L2 and
    /// every block of 8 tiles streams them from L3, which two threads share. Criterion
    /// (batch 64, 1 thread), forward / weight gradient: 128ch 16x16 29.1 -> 16.5 / 31.1 ->
    /// 26.3 ms, 128ch 8x8 7.2 -> 4.9 / 8.6 -> 7.3, 256ch 8x8 forward 22.0 -> 22.4. In training
    /// steps (`elrt speed --profile-nodes`, 3 alternating rounds), ResNet-18's 128-channel
    /// stage at 128x128 (16x16 planes) 249-267 -> 183-185 ms per step at 1 thread, 123-125 ->
    /// 94-99 at 2; at 64x64 (8x8 planes) 58-63 -> 52-55 at 1 thread but 28.6-29.2 -> 29.4-30.1
    /// at 2, so 8x8 planes stay with 64 channels at most.
    ///
    /// On AVX2 (its build's tiles hold half the sums, [`avx2`]) the same, but from 16 channels
    /// each way: criterion forward (batch 64, 1 thread, AVX2 AMD EPYC, the transforms still
    /// plain Rust), the rule's path -> fused: direct 16ch 32x32 4.65 -> 4.43 ms, rank-12 core
    /// on 32x32 2.21 -> 2.86 (so left out), Winograd 32ch 16x16 5.44 -> 2.95, 32ch 32x32
    /// 12.3-15.2 -> 8.4-8.8, 64ch 16x16 9.74 -> 7.56, 64ch 8x8 4.05 -> 2.09, 128ch 16x16 31.0
    /// -> 25.1, 24ch 32x32 8.1-9.1 -> 7.3-11.6 (noisy), 64ch 32x32 31.9 -> 33.0; criterion
    /// `weight_grad` 16ch 32x32 4.21 -> 3.49, 32ch 16x16 3.68 -> 2.30, 64ch 8x8 4.75 -> 2.34,
    /// 64ch 16x16 12.2 -> 9.6, but 128ch 16x16 28.0 -> 36.3 (the AVX2 tile passes over the 2.4
    /// MB of sums four input channels at a time). In training steps (`elrt speed`, alternating
    /// builds, AVX2 EPYC): ResNet-20 (batch 128) 1 thread 483-536 -> 347-349 ms per step, 2
    /// threads 255-289 -> 195; its Tucker-2 form 274-278 -> 250-258; resnet18@64 475-485 ->
    /// 442-450; resnet18_tucker2@64 358-362 -> 338-345. 65-128 channels (on 16x16 planes and
    /// up, as on AVX-512) only once the transforms ran on FMA vectors: with the plain ones
    /// resnet18@128's 128-channel layers' backward went 53-57 -> 60-64 ms per layer; with
    /// them (`--profile-nodes`, 1 thread, three alternating pairs) those three layers 268-283
    /// -> 257, the step 1715-1802 -> 1609-1679 ms, 2 threads a tie (971-995 / 930-1037), and
    /// resnet18_tucker2@128 (its 72-channel 32x32 cores) a tie (1316-1340 / 1301-1368).
    ///
    /// On Intel the other way round for the widest: on a Xeon with AVX-512 (family 6 model
    /// 207, 2 MB L2, a mesh L3; Cooperlake kernels), 128ch 16x16 (batch 64, median of 20
    /// calls, forward / backward with the input gradient, fused -> channels-last Winograd)
    /// 20.6 / 47.5 -> 17.2 / 30.5 ms at 1 thread, 10.9 / 22.2 -> 8.2 / 16.1 at 2, where the
    /// AMD EPYC had the fused path 1.8x faster; 96ch 16x16 (which the channels-last path does
    /// not take) 9.8 / 22.9 -> 11.4 / 21.7, a tie; 64ch 16x16 3.5 / 7.7 -> 6.1 / 12.0 and 64ch
    /// 8x8 1.9 / 4.4 -> 2.9 / 5.7 stay fused. So on Intel CPUs the layers wider than
    /// [`WIDEST_ON_INTEL`] that the channels-last path takes stay there (resnet18@128's
    /// 128-channel stage; its training step in `cols_cl.rs`'s doc).
    pub(super) fn wino_fused_pays(&self) -> bool {
        FUSED.decide(|| {
            let (pixels, widest) = (self.oh * self.ow, self.ci.max(self.co));
            let Some((fewest, most)) = Build::best().rule_channels() else {
                return false;
            };
            // On Intel, the layers above `WIDEST_ON_INTEL` that the channels-last Winograd
            // took stay there.
            let most = if intel_cpu() && self.wino_cl {
                most.min(WIDEST_ON_INTEL)
            } else {
                most
            };
            pixels >= 64
                && self.ci.min(self.co) >= fewest
                && widest <= most
                && (widest <= WIDEST_ON_SMALL_PLANES || pixels >= WIDE_MIN_PIXELS)
        })
    }

    /// Whether a layer of this path ([`Self::wino_fused_pays`]) takes its weight gradient here
    /// too rather than from the kernel the other rules chose: always. Criterion `weight_grad`
    /// (batch 64, 1 thread, AVX-512), ResNet-20's 16ch 32x32 direct 3.77 -> 2.03 ms; inside
    /// ResNet-20's training step (batch 128, 1 thread) its 16-channel layers' backward
    /// 61.4-61.8 -> 44.3-45.1 ms per step. Wider layers once the untransform ran once per call
    /// (module doc): 32ch 16x16 Winograd 2.90 -> 1.49, 64ch 16x16 9.86 -> 5.30, 64ch 8x8
    /// small-plane 4.4 -> 1.76; in training steps (1 thread, alternating builds) resnet18@64's
    /// 64-channel layers' backward 54.9-55.7 -> 43.2-44.3 ms per step, resnet18@128's 215-218
    /// -> 195-201, resnet18_tucker2@128's fused cores 104-107 -> 98-101.
    pub(super) fn wino_fused_dw_pays(&self) -> bool {
        self.wino_fused && FUSED_DW.decide(|| true)
    }

    /// Images per part of the fused weight gradient: the batch's fixed parts
    /// ([`part_len`](super::super::part_len)), widened to at least [`DW_PART_TILES`] tiles
    /// unless that leaves fewer than [`DW_MIN_PARTS`] parts.
    /// Each part zeroes, fills and hands over its own sums `dU` (36 x CI x CO), which then
    /// are added in part order: with four tiles per image (8x8 planes) and 128 channels that
    /// was 9 MB of traffic per part for 19 MFLOP of sums.
    pub(super) fn fused_dw_part(&self) -> usize {
        let tiles = self.fused_plane().tiles().max(1);
        let part = super::super::part_len(self.n);
        part.max(
            DW_PART_TILES
                .div_ceil(tiles)
                .min(self.n.div_ceil(DW_MIN_PARTS)),
        )
    }

    /// One part's transformed weight-gradient sums `dU` (`[36][CI][CO]`,
    /// [`Plane::fused_weight_grad_sums`]) over its images `x` (`[n][ci][h][w]`) and `dy`
    /// (`[n][co][oh][ow]`), the part being one of [`Self::fused_dw_part`]'s. The backward runs
    /// it in the same task as the part's input gradient, so the part's `dy` is still in cache
    /// and the two passes share one parallel loop.
    pub(super) fn fused_dw_part_sums(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let p = self.fused_plane();
        let mut s = p.fused_scratch();
        let mut du = unzeroed(p.fused_sums_len());
        p.fused_weight_grad_sums(x, dy, &mut du, &mut s);
        du
    }

    /// The weight gradient `dw` (`[co][ci][3][3]`, overwritten) from the parts' sums in part
    /// order, untransformed once ([`fused_untransform`]). The parts follow the batch and the
    /// geometry only, so the result does not depend on the thread count.
    pub(super) fn fused_dw_from_parts(&self, parts: &[&[f32]], dw: &mut [f32]) {
        let mut du = unzeroed(self.fused_plane().fused_sums_len());
        super::sum_parts_in_order(parts, &mut du);
        fused_untransform(self.co, self.ci, &du, dw);
    }

    /// The forward's plane (F(4x4) tiles) for this path.
    pub(super) fn fused_plane(&self) -> Plane {
        Plane {
            m: 4,
            ..self.wino_forward_plane()
        }
    }
}

/// The greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// `n` channels rounded up to whole vectors: the lanes a pixel takes in this path's buffers.
fn wide(n: usize) -> usize {
    n.div_ceil(LANES) * LANES
}

/// `U[k][c][o] = (G w[o][c] G^T)[k]` (`[36][wide(cin)][wide(cout)]`), zero for `c >= cin` or
/// `o >= cout`: `w` is ONNX's `[cout][cin][3][3]`.
///
/// Plane by plane over `(c, o)`, in f64, each entry's sums in `transform_kernel4`'s order (`t =
/// G g`, then `t G^T`), rounded once: one pair at a time wrote its 36 taps a plane apart (16 KB
/// at 64 channels). It runs before every forward and input gradient, so its six tap rows run in
/// parallel ([`fused_weights_row`]; serial, it left the other threads idle for most of the
/// fused path's idle time: resnet18 at 64x64, batch 64, 2 threads). Each entry is the same
/// sequence of operations whatever the thread count.
pub(super) fn fused_weights(cout: usize, cin: usize, w: &[f32]) -> Vec<f32> {
    assert!(cout <= MAX_CHANNELS && cin <= MAX_CHANNELS && w.len() == cout * cin * 9);
    let (ci, co) = (wide(cin), wide(cout));
    let plane = ci * co;
    // The kernel's taps as planes: wp[a][b][c][o] = w[o][c][a][b], zero past the channels.
    let mut wp = vec![0.0f64; 9 * plane];
    wp.par_chunks_mut(plane).enumerate().for_each(|(ab, p)| {
        for o in 0..cout {
            for c in 0..cin {
                p[c * co + o] = f64::from(w[(o * cin + c) * 9 + ab]);
            }
        }
    });
    let mut u = unzeroed(TAPS * plane);
    u.par_chunks_mut(6 * plane)
        .enumerate()
        .with_max_len(1)
        .for_each(|(i, ui)| fused_weights_row(i, plane, &wp, ui));
    u
}

simd_dispatch! {
    /// Tap row `i` of [`fused_weights`] (`ui`: `U[6 i .. 6 i + 6]`, every entry written) from
    /// the taps as planes `wp`: [`fused_weights_row_body`] compiled for AVX-512 / AVX2 where
    /// the CPU has them (its plane loops vectorise; Rust contracts no multiply-add, so every
    /// build gives the same bits).
    fn fused_weights_row(i: usize, plane: usize, wp: &[f64], ui: &mut [f32])
        => fused_weights_row_body, (i, plane, wp, ui); ["avx512f", "avx2"]
}

#[inline(always)]
fn fused_weights_row_body(i: usize, plane: usize, wp: &[f64], ui: &mut [f32]) {
    let g = &super::winograd4::G;
    // t[j] = sum_k G[i][k] wp[k][j].
    let mut t = vec![0.0f64; 3 * plane];
    for j in 0..3 {
        let tj = &mut t[j * plane..][..plane];
        for (k, &gik) in g[i].iter().enumerate() {
            let wk = &wp[(3 * k + j) * plane..][..plane];
            for (v, &x) in tj.iter_mut().zip(wk) {
                *v += gik * x;
            }
        }
    }
    // U[6 i + j] = sum_k t[k] G[j][k].
    let mut acc = vec![0.0f64; plane];
    for (j, gj) in g.iter().enumerate() {
        acc.fill(0.0);
        for (k, &gjk) in gj.iter().enumerate() {
            let tk = &t[k * plane..][..plane];
            for (v, &x) in acc.iter_mut().zip(tk) {
                *v += x * gjk;
            }
        }
        for (d, &v) in ui[j * plane..][..plane].iter_mut().zip(&acc) {
            *d = v as f32;
        }
    }
}

/// One group's buffers ([`Plane::fused_images`] images), kept across the groups of a part
/// (`CI`, `CO`: the channels rounded up to whole vectors).
pub(super) struct FusedScratch {
    /// Images per group: the slots of `p` and `o`.
    images: usize,
    /// The padded channels-last inputs, `[images][4 th + 2][4 tw + 2][CI]`.
    p: Vec<f32>,
    /// A block's transformed tiles, `[TB][36][CI]`.
    v: Vec<f32>,
    /// A block's products (the transformed output gradient in the weight gradient),
    /// `[TB][36][CO]`.
    m: Vec<f32>,
    /// The channels-last outputs (output gradients in the weight gradient),
    /// `[images][4 th][4 tw][CO]`.
    o: Vec<f32>,
}

impl FusedScratch {
    /// Images per group: the most [`Plane::fused_run`] takes per call (the weight gradient
    /// groups its own, `Plane::fused_dw_images`, growing the slots to fit).
    pub(super) fn images(&self) -> usize {
        self.images
    }
}

impl Plane {
    /// Images whose tiles share blocks of products: 1 where a plane has at least `2 TB` tiles,
    /// else the fewest that fill whole blocks (8x8 planes, 4 tiles each: 2 images; 12x12, 9
    /// tiles: 8), so that small planes do not run half-empty blocks. Tiles run in order
    /// image by image, whatever the grouping: outputs do not depend on it.
    pub(super) fn fused_images(&self) -> usize {
        self.images_to_fill(TB)
    }

    /// Images per group in the weight gradient: enough to fill a sweep (at most 8).
    fn fused_dw_images(&self) -> usize {
        self.images_to_fill(DW_SWEEP).min(8)
    }

    /// 1 where the plane has at least two passes of `pass` tiles, else the fewest images
    /// whose tiles fill whole passes.
    fn images_to_fill(&self, pass: usize) -> usize {
        let tiles = self.tiles().max(1);
        if tiles >= 2 * pass {
            1
        } else {
            pass / gcd(tiles, pass)
        }
    }

    /// Tile `t` of a group (numbered image by image, row-major within an image): its image
    /// slot and its tile row and column.
    #[inline(always)]
    fn fused_tile(&self, t: usize) -> (usize, usize, usize) {
        let (tiles, tw) = (self.tiles(), self.tw());
        let (i, tt) = (t / tiles, t % tiles);
        (i, tt / tw, tt % tw)
    }

    /// Floats per image slot of the padded input and of the channels-last output.
    fn fused_slots(&self) -> (usize, usize) {
        let (hp, wp) = (4 * self.th() + 2, 4 * self.tw() + 2);
        let (ci, co) = (wide(self.cin), wide(self.cout));
        (hp * wp * ci, 16 * self.th() * self.tw() * co)
    }

    pub(super) fn fused_scratch(&self) -> FusedScratch {
        let (ci, co) = (wide(self.cin), wide(self.cout));
        let images = self.fused_images();
        let (ps, os) = self.fused_slots();
        FusedScratch {
            images,
            p: vec![0.0; images * ps],
            v: vec![0.0; TB * TAPS * ci],
            m: vec![0.0; TB * TAPS * co],
            o: vec![0.0; images * os],
        }
    }

    /// The correlation of up to [`FusedScratch::images`] images `x` (`[n][cin][h][w]`) with
    /// the transformed weights `u` ([`fused_weights`]) plus `bias`, into `y`
    /// (`[n][cout][oh][ow]`, every entry written).
    pub(super) fn fused_run(
        &self,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut FusedScratch,
    ) {
        self.fused_run_with(Build::best(), x, u, bias, y, s, false);
    }

    /// [`Self::fused_run`] added to what `y` holds (`y + result`, each entry one f32 add):
    /// the input gradient of a layer whose input has other readers, added to the gradient
    /// they gave as it is copied out, where a separate pass read both tensors and wrote one
    /// (`Conv2d::backward_adding`).
    pub(super) fn fused_run_adding(
        &self,
        x: &[f32],
        u: &[f32],
        y: &mut [f32],
        s: &mut FusedScratch,
    ) {
        self.fused_run_with(Build::best(), x, u, None, y, s, true);
    }

    /// [`Self::fused_run`] on a given build (the tests run each); `add`: as
    /// [`Self::fused_run_adding`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fused_run_with(
        &self,
        build: Build,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut FusedScratch,
        add: bool,
    ) {
        let (ci, co) = (wide(self.cin), wide(self.cout));
        let (xlen, ylen) = (self.cin * self.h * self.w, self.cout * self.oh * self.ow);
        let images = x.len() / xlen.max(1);
        let (ps, os) = self.fused_slots();
        assert!(
            self.m == 4
                && self.cin <= MAX_CHANNELS
                && self.cout <= MAX_CHANNELS
                && (1..=s.images).contains(&images)
                && x.len() == images * xlen
                && y.len() == images * ylen
                && s.p.len() >= s.images * ps
                && s.o.len() >= s.images * os
                && u.len() == TAPS * ci * co
                && s.v.len() >= TB * TAPS * ci
                && s.m.len() >= TB * TAPS * co
                && bias.is_none_or(|b| b.len() == self.cout),
            "fused Winograd buffers do not match the plane"
        );
        let mut b = vec![0.0f32; co];
        if let Some(bias) = bias {
            b[..self.cout].copy_from_slice(bias);
        }
        // Tiles numbered image by image over the group.
        let tiles = images * self.tiles();
        for (xi, pi) in x.chunks_exact(xlen).zip(s.p.chunks_exact_mut(ps)) {
            pack_on(build, self, xi, pi);
        }
        for t0 in (0..tiles).step_by(TB) {
            let nb = TB.min(tiles - t0);
            input_block_on(build, self, &s.p, t0, nb, &mut s.v);
            products_on(build, self.cin, ci, co, u, &s.v, &mut s.m);
            output_block_on(build, self, &s.m, t0, nb, &b, &mut s.o);
        }
        for (yi, oi) in y.chunks_exact_mut(ylen).zip(s.o.chunks_exact(os)) {
            unpack_on(build, self, oi, yi, add);
        }
    }

    /// The weight gradient of the forward correlation over `n` images: `x` (`[n][cin][h][w]`),
    /// `dy` (`[n][cout][oh][ow]`), `dw` (`[cout][cin][3][3]`) overwritten: the transformed
    /// sums of [`Self::fused_weight_grad_sums`], then [`fused_untransform`].
    #[cfg(test)]
    pub(super) fn fused_weight_grad_with(
        &self,
        build: Build,
        x: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        s: &mut FusedScratch,
    ) {
        let mut du = vec![f32::NAN; self.fused_sums_len()];
        self.fused_weight_grad_sums_with(build, x, dy, &mut du, s);
        fused_untransform(self.cout, self.cin, &du, dw);
    }

    /// Floats of the weight gradient's transformed sums `dU` (`[36][CI][CO]`).
    pub(super) fn fused_sums_len(&self) -> usize {
        TAPS * wide(self.cin) * wide(self.cout)
    }

    /// The weight gradient's transformed sums over `n` images: `x` (`[n][cin][h][w]`), `dy`
    /// (`[n][cout][oh][ow]`), `du` ([`Self::fused_sums_len`]) overwritten.
    ///
    /// The forward is `y = A^T [U ⊙ V] A` per tile, so `dU_k = sum over tiles of V_k dM_k^T`
    /// with `dM = A dy A^T` (Lavin & Gray 2015): per block of tiles, the input transform as in
    /// the forward, `dM` from the channels-last `dy`, and for each tap the `cin` sums (one
    /// vector over 16 output channels each) accumulated in f32, tile by tile in order over
    /// the images. Summation order is fixed by the images given, so a part's sums do not
    /// depend on the thread count; the caller sums the parts' in part order and takes
    /// `dg = G^T dU G` once ([`fused_untransform`]): per part, that untransform cost as much
    /// as the sums on 64 channels (ResNet-20's 8x8 layers, 16 parts at batch 64).
    pub(super) fn fused_weight_grad_sums(
        &self,
        x: &[f32],
        dy: &[f32],
        du: &mut [f32],
        s: &mut FusedScratch,
    ) {
        self.fused_weight_grad_sums_with(Build::best(), x, dy, du, s);
    }

    /// [`Self::fused_weight_grad_sums`] on a given build (the tests run each).
    pub(super) fn fused_weight_grad_sums_with(
        &self,
        build: Build,
        x: &[f32],
        dy: &[f32],
        du: &mut [f32],
        s: &mut FusedScratch,
    ) {
        let (xlen, ylen) = (self.cin * self.h * self.w, self.cout * self.oh * self.ow);
        let (ci, co) = (wide(self.cin), wide(self.cout));
        let (ps, os) = self.fused_slots();
        assert!(
            self.m == 4
                && self.cin <= MAX_CHANNELS
                && self.cout <= MAX_CHANNELS
                && xlen > 0
                && x.len().is_multiple_of(xlen)
                && dy.len() == x.len() / xlen * ylen
                && s.p.len() >= s.images * ps
                && s.o.len() >= s.images * os
                && s.v.len() >= TB * TAPS * ci
                && s.m.len() >= TB * TAPS * co
                && du.len() == TAPS * ci * co,
            "fused Winograd weight-gradient buffers do not match the plane"
        );
        let (sweep, g) = (DW_SWEEP, self.fused_dw_images());
        du.fill(0.0);
        // A sweep's transformed tiles; more image slots than a forward's (their padding zeros
        // as `fused_scratch` left them: `pack` writes the plane only).
        s.v.resize(sweep * TAPS * ci, 0.0);
        s.m.resize(sweep * TAPS * co, 0.0);
        s.p.resize(g.max(s.images) * ps, 0.0);
        s.o.resize(g.max(s.images) * os, 0.0);
        // `pack_dy` writes the plane only; the rest of whole tiles must be zeros (a forward on
        // this scratch leaves its tiles' overhang there).
        s.o.fill(0.0);
        // A group of images at a time, their tiles in order, in sweeps of `sweep` tiles that
        // each pass over `dU` once: the sums run tile by tile over the images whatever the
        // group or sweep.
        for (xg, dyg) in x.chunks(g * xlen).zip(dy.chunks(g * ylen)) {
            let tiles = xg.len() / xlen * self.tiles();
            let inputs = xg.chunks_exact(xlen).zip(s.p.chunks_exact_mut(ps));
            let grads = dyg.chunks_exact(ylen).zip(s.o.chunks_exact_mut(os));
            inputs.for_each(|(xi, pi)| pack_on(build, self, xi, pi));
            grads.for_each(|(di, oi)| pack_dy_on(build, self, di, oi));
            for t0 in (0..tiles).step_by(sweep) {
                let ns = sweep.min(tiles - t0);
                for b0 in (0..ns).step_by(TB) {
                    let nb = TB.min(ns - b0);
                    let v = &mut s.v[b0 * TAPS * ci..];
                    input_block_on(build, self, &s.p, t0 + b0, nb, v);
                    let m = &mut s.m[b0 * TAPS * co..];
                    dy_block_on(build, self, &s.o, t0 + b0, nb, m);
                }
                accumulate_on(build, self.cin, ci, co, ns, &s.v, &s.m, du);
            }
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

/// `A d` for one column (or row) of four output-gradient vectors (`A`'s rows `[1 0 0 0]`,
/// `[1 1 1 1]`, `[1 -1 1 -1]`, `[1 2 4 8]`, `[1 -2 4 -8]`, `[0 0 0 1]`).
#[inline(always)]
fn a4(d: [V16; 4]) -> [V16; 6] {
    let (e, o) = (add(d[0], d[2]), add(d[1], d[3]));
    let e4 = add_k(d[0], 4.0, d[2]);
    let o8 = add_k(add(d[1], d[1]), 8.0, d[3]);
    [d[0], add(e, o), sub(e, o), add(e4, o8), sub(e4, o8), d[3]]
}

use crate::engine::ops::simd::simd_dispatch;

simd_dispatch! {
    /// [`pack_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn pack(p: &Plane, x: &[f32], dst: &mut [f32]) => pack_body, (p, x, dst); ["avx512f", "avx2"]
}

/// `x` (`[cin][h][w]`) into the padded channels-last `dst` (`[4 th + 2][4 tw + 2][CI]`):
/// input pixel `(iy, ix)` at `(iy + pt, ix + pl)`. The rest (the padding, the lanes past
/// `cin`, the columns and rows past the plane that whole tiles read) is never written: zeros
/// from [`Plane::fused_scratch`], whose buffer serves this plane only.
#[inline(always)]
fn pack_body(p: &Plane, x: &[f32], dst: &mut [f32]) {
    let (wp, ci) = (4 * p.tw() + 2, wide(p.cin));
    let hw = p.h * p.w;
    for iy in 0..p.h {
        let row = &mut dst[((iy + p.pt) * wp + p.pl) * ci..][..p.w * ci];
        for (ix, px) in row.chunks_exact_mut(ci).enumerate() {
            for (c, v) in px[..p.cin].iter_mut().enumerate() {
                *v = x[c * hw + iy * p.w + ix];
            }
        }
    }
}

simd_dispatch! {
    /// [`pack_dy_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn pack_dy(p: &Plane, dy: &[f32], dst: &mut [f32]) => pack_dy_body, (p, dy, dst);
        ["avx512f", "avx2"]
}

/// `dy` (`[cout][oh][ow]`) channels-last into `dst` (`[4 th][4 tw][CO]`), the lanes past
/// `cout` and the pixels past the plane never written (zeros from [`Plane::fused_scratch`]).
#[inline(always)]
fn pack_dy_body(p: &Plane, dy: &[f32], dst: &mut [f32]) {
    let (wo, co) = (4 * p.tw(), wide(p.cout));
    let ohw = p.oh * p.ow;
    for oy in 0..p.oh {
        let row = &mut dst[oy * wo * co..][..p.ow * co];
        for (ox, px) in row.chunks_exact_mut(co).enumerate() {
            for (o, v) in px[..p.cout].iter_mut().enumerate() {
                *v = dy[o * ohw + oy * p.ow + ox];
            }
        }
    }
}

simd_dispatch! {
    /// [`input_block_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn input_block(p: &Plane, pp: &[f32], t0: usize, nb: usize, v: &mut [f32])
        => input_block_body, (p, pp, t0, nb, v); ["avx512f", "avx2"]
}

/// Tiles `t0..t0 + nb` (numbered image by image over the group's slots in `pp`, row-major
/// within an image) of the padded inputs `pp` through
/// `B^T d B` into `v` (`[TB][36][CI]`, the first `nb` tiles written), a vector of channels at
/// a time.
#[inline(always)]
fn input_block_body(p: &Plane, pp: &[f32], t0: usize, nb: usize, v: &mut [f32]) {
    let (wp, ci) = (4 * p.tw() + 2, wide(p.cin));
    let ps = p.fused_slots().0;
    for t in 0..nb {
        let (i, ty, tx) = p.fused_tile(t0 + t);
        for j in (0..ci).step_by(LANES) {
            let base = i * ps + (4 * ty * wp + 4 * tx) * ci + j;
            // Columns first: tmp[u][b] = sum_a BT[u][a] d[a][b].
            let mut tmp = [[[0.0f32; LANES]; 6]; 6];
            for b in 0..6 {
                let d: [V16; 6] = std::array::from_fn(|a| load(&pp[base + (a * wp + b) * ci..]));
                for (u, r) in bt6(d).into_iter().enumerate() {
                    tmp[u][b] = r;
                }
            }
            // Then rows: V[u][w] = sum_b tmp[u][b] BT[w][b].
            let vt = &mut v[t * TAPS * ci..][..TAPS * ci];
            for (u, row) in tmp.into_iter().enumerate() {
                for (w, r) in bt6(row).into_iter().enumerate() {
                    vt[(6 * u + w) * ci + j..][..LANES].copy_from_slice(&r);
                }
            }
        }
    }
}

simd_dispatch! {
    /// [`dy_block_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn dy_block(p: &Plane, d: &[f32], t0: usize, nb: usize, dm: &mut [f32])
        => dy_block_body, (p, d, t0, nb, dm); ["avx512f", "avx2"]
}

/// Tiles `t0..t0 + nb` (numbered as in [`input_block_body`]) of the channels-last output
/// gradients `d` through `A dy A^T` into `dm`
/// (`[TB][36][CO]`).
#[inline(always)]
fn dy_block_body(p: &Plane, d: &[f32], t0: usize, nb: usize, dm: &mut [f32]) {
    let (tw, co) = (p.tw(), wide(p.cout));
    let wo = 4 * tw;
    let os = p.fused_slots().1;
    for t in 0..nb {
        let (i, ty, tx) = p.fused_tile(t0 + t);
        for j in (0..co).step_by(LANES) {
            let base = i * os + (4 * ty * wo + 4 * tx) * co + j;
            let mut tmp = [[[0.0f32; LANES]; 4]; 6];
            for q in 0..4 {
                let col: [V16; 4] = std::array::from_fn(|r| load(&d[base + (r * wo + q) * co..]));
                for (u, v) in a4(col).into_iter().enumerate() {
                    tmp[u][q] = v;
                }
            }
            let mt = &mut dm[t * TAPS * co..][..TAPS * co];
            for (u, row) in tmp.into_iter().enumerate() {
                for (w, v) in a4(row).into_iter().enumerate() {
                    mt[(6 * u + w) * co + j..][..LANES].copy_from_slice(&v);
                }
            }
        }
    }
}

simd_dispatch! {
    /// [`output_block_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn output_block(p: &Plane, m: &[f32], t0: usize, nb: usize, bias: &[f32], o: &mut [f32])
        => output_block_body, (p, m, t0, nb, bias, o); ["avx512f", "avx2"]
}

/// The products of tiles `t0..t0 + nb` (numbered as in [`input_block_body`]; `m`:
/// `[TB][36][CO]`) through `A^T M A`, plus `bias` (`CO` lanes), into the channels-last
/// outputs `o` (`[images][4 th][4 tw][CO]`).
#[inline(always)]
fn output_block_body(p: &Plane, m: &[f32], t0: usize, nb: usize, bias: &[f32], o: &mut [f32]) {
    let (tw, co) = (p.tw(), wide(p.cout));
    let wo = 4 * tw;
    let os = p.fused_slots().1;
    for t in 0..nb {
        let (i, ty, tx) = p.fused_tile(t0 + t);
        let o = &mut o[i * os..][..os];
        let mt = &m[t * TAPS * co..][..TAPS * co];
        for j in (0..co).step_by(LANES) {
            let bj = load(&bias[j..]);
            // Columns first: tmp[r][w] = sum_u AT[r][u] M[u][w].
            let mut tmp = [[[0.0f32; LANES]; 6]; 4];
            for w in 0..6 {
                let col: [V16; 6] = std::array::from_fn(|u| load(&mt[(6 * u + w) * co + j..]));
                for (r, val) in at6(col).into_iter().enumerate() {
                    tmp[r][w] = val;
                }
            }
            // Then rows: y[r][q] = sum_w tmp[r][w] AT[q][w], plus the bias.
            for (r, row) in tmp.into_iter().enumerate() {
                let out = &mut o[((4 * ty + r) * wo + 4 * tx) * co..][..4 * co];
                for (q, val) in at6(row).into_iter().enumerate() {
                    out[q * co + j..][..LANES].copy_from_slice(&add(val, bj));
                }
            }
        }
    }
}

simd_dispatch! {
    /// [`unpack_body`] compiled for AVX-512 / AVX2 where the CPU has them.
    fn unpack(p: &Plane, o: &[f32], y: &mut [f32], add: bool)
        => unpack_body, (p, o, y, add); ["avx512f", "avx2"]
}

/// The channels-last output `o` back to NCHW `y` (`[cout][oh][ow]`), the plane's part of the
/// whole tiles; with `add`, each entry added to what `y` holds (`y + o`).
#[inline(always)]
fn unpack_body(p: &Plane, o: &[f32], y: &mut [f32], add: bool) {
    let (wo, co) = (4 * p.tw(), wide(p.cout));
    let ohw = p.oh * p.ow;
    for oy in 0..p.oh {
        let row = &o[oy * wo * co..][..p.ow * co];
        for (ox, px) in row.chunks_exact(co).enumerate() {
            for (c, &v) in px[..p.cout].iter().enumerate() {
                let d = &mut y[c * ohw + oy * p.ow + ox];
                *d = if add { *d + v } else { v };
            }
        }
    }
}

/// `M[t][k][j..j + 16] = sum_c V[t][k][c] * U[k][c][j..j + 16]` for every tile slot of the
/// block (`v`: `[TB][36][ci]`, `m`: `[TB][36][co]`, `u`: `[36][ci][co]`; `ci`, `co` the
/// padded widths), `c` over the first `cin` lanes; a multiply and an add per term (the
/// AVX-512 tile fuses them).
fn products_portable(cin: usize, ci: usize, co: usize, u: &[f32], v: &[f32], m: &mut [f32]) {
    for k in 0..TAPS {
        for j in (0..co).step_by(LANES) {
            for t in 0..TB {
                let vt = &v[(t * TAPS + k) * ci..][..ci];
                let mut acc = [0.0f32; LANES];
                for c in 0..cin {
                    acc = add_k(acc, vt[c], load(&u[(k * ci + c) * co + j..]));
                }
                m[(t * TAPS + k) * co + j..][..LANES].copy_from_slice(&acc);
            }
        }
    }
}

/// `dU[k][c][j..j + 16] += sum over the block's first nb tiles of V[t][k][c] * dM[t][k][j..j +
/// 16]`, tiles in order; a multiply and an add per term.
fn accumulate_portable(
    cin: usize,
    ci: usize,
    co: usize,
    nb: usize,
    v: &[f32],
    dm: &[f32],
    du: &mut [f32],
) {
    for k in 0..TAPS {
        for c in 0..cin {
            for j in (0..co).step_by(LANES) {
                let acc = &mut du[(k * ci + c) * co + j..][..LANES];
                let mut a = load(acc);
                for t in 0..nb {
                    let d = load(&dm[(t * TAPS + k) * co + j..]);
                    a = add_k(a, v[(t * TAPS + k) * ci + c], d);
                }
                acc.copy_from_slice(&a);
            }
        }
    }
}

/// `dw[o][c]` (`[cout][cin][3][3]`, overwritten) `= G^T dU[..][c][o] G`, in f64 and rounded
/// once (`du`: `[36][CI][CO]`).
///
/// Plane by plane over `(c, o)`, `dU` read in its own order (entry by entry, a pair's 36 taps
/// lie a plane apart: 16 KB at 64 channels, a cache miss each): `t[i][b] = sum_j dU[i][j]
/// G[j][b]`, six tap rows in parallel ([`untransform_row`]), then `dg[a][b] = sum_i G[i][a]
/// t[i][b]` per block of output channels in parallel ([`untransform_out`]), each sum in index
/// order, so each entry is the same sequence of operations whatever the thread count. Serial,
/// it ran once per fused layer's backward with the other threads idle.
pub(super) fn fused_untransform(cout: usize, cin: usize, du: &[f32], dw: &mut [f32]) {
    let plane = wide(cin) * wide(cout);
    let mut t = vec![0.0f64; 18 * plane];
    t.par_chunks_mut(3 * plane)
        .enumerate()
        .with_max_len(1)
        .for_each(|(i, ti)| untransform_row(i, plane, du, ti));
    dw.par_chunks_mut(UNTRANSFORM_OUTS * cin * 9)
        .enumerate()
        .with_max_len(1)
        .for_each(|(b, d)| untransform_out(b * UNTRANSFORM_OUTS, cout, cin, &t, d));
}

/// Output channels per task of [`untransform_out`]: its reads of `t` run along the output
/// channels, so a task's channels share cache lines.
const UNTRANSFORM_OUTS: usize = 16;

simd_dispatch! {
    /// Row `i` of `t` (`ti`: `t[i][0..3]`, accumulated into zeros) from `du`:
    /// [`untransform_row_body`] compiled for AVX-512 / AVX2 where the CPU has them (its plane
    /// loops vectorise; Rust contracts no multiply-add, so every build gives the same bits).
    fn untransform_row(i: usize, plane: usize, du: &[f32], ti: &mut [f64])
        => untransform_row_body, (i, plane, du, ti); ["avx512f", "avx2"]
}

#[inline(always)]
fn untransform_row_body(i: usize, plane: usize, du: &[f32], ti: &mut [f64]) {
    let g = &super::winograd4::G;
    for (b, tb) in ti.chunks_exact_mut(plane).enumerate() {
        for (j, gj) in g.iter().enumerate() {
            let dj = &du[(6 * i + j) * plane..][..plane];
            for (v, &d) in tb.iter_mut().zip(dj) {
                *v += f64::from(d) * gj[b];
            }
        }
    }
}

simd_dispatch! {
    /// Output channels `o0..` of `dg[a][b] = sum_i G[i][a] t[i][b]` into `d` (`[outs][cin][3]
    /// [3]`, overwritten), each sum from zero in `i` order: [`untransform_out_body`] compiled
    /// for AVX-512 / AVX2 where the CPU has them.
    fn untransform_out(o0: usize, cout: usize, cin: usize, t: &[f64], d: &mut [f32])
        => untransform_out_body, (o0, cout, cin, t, d); ["avx512f", "avx2"]
}

#[inline(always)]
fn untransform_out_body(o0: usize, cout: usize, cin: usize, t: &[f64], d: &mut [f32]) {
    let g = &super::winograd4::G;
    let co = wide(cout);
    let plane = wide(cin) * co;
    let outs = d.len() / (cin * 9);
    let mut r = [0.0f64; UNTRANSFORM_OUTS];
    for c in 0..cin {
        for a in 0..3 {
            for b in 0..3 {
                // Along the block's output channels, which lie side by side in `t`.
                let r = &mut r[..outs];
                r.fill(0.0);
                for (i, gi) in g.iter().enumerate() {
                    let ti = &t[(3 * i + b) * plane + c * co + o0..][..outs];
                    for (v, &x) in r.iter_mut().zip(ti) {
                        *v += gi[a] * x;
                    }
                }
                for (k, &v) in r.iter().enumerate() {
                    d[(k * cin + c) * 9 + 3 * a + b] = v as f32;
                }
            }
        }
    }
}

/// The F(4x4) transforms on one instruction set's vectors, for the module that invokes it
/// (`avx512`, `avx2`): `fma_k`, `bt6`, `at6` and `a4` on vectors, and `input_block`, `dy_block`
/// and `output_block`, the plain bodies' passes a vector of `lanes` channels at a time with
/// fused multiply-adds. One text for both builds (the AVX2 one once ran the plain bodies, whose
/// zeroed 2.3 KB temporary per tile and vector took a `memset` each: 5% of ResNet-20's step).
#[cfg(target_arch = "x86_64")]
macro_rules! vector_transforms {
    (
        vec: $v:ty, feature: $feat:literal, lanes: $lanes:expr,
        loadu: $loadu:ident, storeu: $storeu:ident, add: $add:ident, sub: $sub:ident,
        fmadd: $fmadd:ident, set1: $set1:ident, zero: $zero:ident $(,)?
    ) => {
        /// `a + k * b`.
        #[inline(always)]
        unsafe fn fma_k(a: $v, k: f32, b: $v) -> $v {
            $fmadd($set1(k), b, a)
        }

        /// [`super::bt6`] on vectors.
        #[inline(always)]
        unsafe fn bt6(d: [$v; 6]) -> [$v; 6] {
            let d4_d2 = $sub(d[4], d[2]);
            let d3_d1 = $sub(d[3], d[1]);
            [
                fma_k(fma_k(d[4], 4.0, d[0]), -5.0, d[2]),
                fma_k($add(d[3], d[4]), -4.0, $add(d[1], d[2])),
                fma_k($sub(d[4], d[3]), 4.0, $sub(d[1], d[2])),
                fma_k(d4_d2, 2.0, d3_d1),
                fma_k(d4_d2, -2.0, d3_d1),
                fma_k(fma_k(d[5], 4.0, d[1]), -5.0, d[3]),
            ]
        }

        /// [`super::at6`] on vectors.
        #[inline(always)]
        unsafe fn at6(m: [$v; 6]) -> [$v; 4] {
            let (a, b) = ($add(m[1], m[2]), $sub(m[1], m[2]));
            let (c, e) = ($add(m[3], m[4]), $sub(m[3], m[4]));
            [
                $add($add(m[0], a), c),
                fma_k(b, 2.0, e),
                fma_k(a, 4.0, c),
                $add(fma_k(b, 8.0, e), m[5]),
            ]
        }

        /// [`super::a4`] on vectors.
        #[inline(always)]
        unsafe fn a4(d: [$v; 4]) -> [$v; 6] {
            let (e, o) = ($add(d[0], d[2]), $add(d[1], d[3]));
            let e4 = fma_k(d[0], 4.0, d[2]);
            let o8 = fma_k($add(d[1], d[1]), 8.0, d[3]);
            [
                d[0],
                $add(e, o),
                $sub(e, o),
                $add(e4, o8),
                $sub(e4, o8),
                d[3],
            ]
        }

        /// [`super::input_block_body`] on vectors.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn input_block(
            p: &Plane,
            pp: &[f32],
            t0: usize,
            nb: usize,
            v: &mut [f32],
        ) {
            let (wp, ci) = (4 * p.tw() + 2, wide(p.cin));
            let (ps, tiles) = (p.fused_slots().0, p.tiles());
            assert!(
                nb <= TB && v.len() >= nb * TAPS * ci && pp.len() >= (t0 + nb).div_ceil(tiles) * ps
            );
            let (src, vp) = (pp.as_ptr(), v.as_mut_ptr());
            let mut tmp = [[$zero(); 6]; 6];
            for t in 0..nb {
                let (i, ty, tx) = p.fused_tile(t0 + t);
                for j in (0..ci).step_by($lanes) {
                    let base = src.add(i * ps + (4 * ty * wp + 4 * tx) * ci + j);
                    for b in 0..6 {
                        let d: [$v; 6] =
                            std::array::from_fn(|a| $loadu(base.add((a * wp + b) * ci)));
                        let r = bt6(d);
                        for u in 0..6 {
                            tmp[u][b] = r[u];
                        }
                    }
                    let vt = vp.add(t * TAPS * ci + j);
                    for u in 0..6 {
                        let r = bt6(tmp[u]);
                        for w in 0..6 {
                            $storeu(vt.add((6 * u + w) * ci), r[w]);
                        }
                    }
                }
            }
        }

        /// [`super::dy_block_body`] on vectors.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn dy_block(p: &Plane, d: &[f32], t0: usize, nb: usize, dm: &mut [f32]) {
            let (tw, co) = (p.tw(), wide(p.cout));
            let wo = 4 * tw;
            let (os, tiles) = (p.fused_slots().1, p.tiles());
            assert!(
                nb <= TB && dm.len() >= nb * TAPS * co && d.len() >= (t0 + nb).div_ceil(tiles) * os
            );
            let (src, mp) = (d.as_ptr(), dm.as_mut_ptr());
            let mut tmp = [[$zero(); 4]; 6];
            for t in 0..nb {
                let (i, ty, tx) = p.fused_tile(t0 + t);
                for j in (0..co).step_by($lanes) {
                    let base = src.add(i * os + (4 * ty * wo + 4 * tx) * co + j);
                    for q in 0..4 {
                        let col: [$v; 4] =
                            std::array::from_fn(|r| $loadu(base.add((r * wo + q) * co)));
                        let r6 = a4(col);
                        for u in 0..6 {
                            tmp[u][q] = r6[u];
                        }
                    }
                    let mt = mp.add(t * TAPS * co + j);
                    for u in 0..6 {
                        let r6 = a4(tmp[u]);
                        for w in 0..6 {
                            $storeu(mt.add((6 * u + w) * co), r6[w]);
                        }
                    }
                }
            }
        }

        /// [`super::output_block_body`] on vectors.
        #[target_feature(enable = $feat)]
        pub(super) unsafe fn output_block(
            p: &Plane,
            m: &[f32],
            t0: usize,
            nb: usize,
            bias: &[f32],
            o: &mut [f32],
        ) {
            let (tw, co) = (p.tw(), wide(p.cout));
            let wo = 4 * tw;
            let (os, tiles) = (p.fused_slots().1, p.tiles());
            assert!(
                nb <= TB
                    && m.len() >= TB * TAPS * co
                    && bias.len() >= co
                    && o.len() >= (t0 + nb).div_ceil(tiles) * os
            );
            let (mp, op) = (m.as_ptr(), o.as_mut_ptr());
            let mut tmp = [[$zero(); 6]; 4];
            for t in 0..nb {
                let (i, ty, tx) = p.fused_tile(t0 + t);
                let op = op.add(i * os);
                for j in (0..co).step_by($lanes) {
                    let bv = $loadu(bias.as_ptr().add(j));
                    let mt = mp.add(t * TAPS * co + j);
                    for w in 0..6 {
                        let col: [$v; 6] =
                            std::array::from_fn(|u| $loadu(mt.add((6 * u + w) * co)));
                        let r = at6(col);
                        for i in 0..4 {
                            tmp[i][w] = r[i];
                        }
                    }
                    for i in 0..4 {
                        let out = op.add(((4 * ty + i) * wo + 4 * tx) * co + j);
                        let r = at6(tmp[i]);
                        for q in 0..4 {
                            $storeu(out.add(q * co), $add(r[q], bv));
                        }
                    }
                }
            }
        }
    };
}

// The kernels index their register arrays by constant bounds on purpose: the loops unroll and
// the arrays live in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::{wide, Plane, LANES, TAPS, TB};
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

    /// [`super::pack_body`], 16 pixels by 16 channels at a time through [`transpose16`]
    /// (which writes every lane, zeros past `cin`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack(p: &Plane, x: &[f32], dst: &mut [f32]) {
        let wp = 4 * p.tw() + 2;
        assert!(dst.len() >= (4 * p.th() + 2) * wp * wide(p.cin));
        assert!(p.pt + p.h <= 4 * p.th() + 2 && p.pl + p.w <= wp);
        pack_into(x, p.cin, p.h, p.w, dst, wp, p.pt, p.pl);
    }

    /// [`super::pack_dy_body`] through [`transpose16`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_dy(p: &Plane, dy: &[f32], dst: &mut [f32]) {
        let wo = 4 * p.tw();
        assert!(dst.len() >= 4 * p.th() * wo * wide(p.cout));
        pack_into(dy, p.cout, p.oh, p.ow, dst, wo, 0, 0);
    }

    /// `src` (`[ch][h][w]`) channels-last into `dst` (rows of `dst_w` pixels of `wide(ch)`
    /// lanes), pixel `(iy, ix)` at `(iy + oy, ix + ox)`, every lane of those pixels written.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_into(
        src: &[f32],
        ch: usize,
        h: usize,
        w: usize,
        dst: &mut [f32],
        dst_w: usize,
        oy: usize,
        ox: usize,
    ) {
        let (hw, cw) = (h * w, wide(ch));
        assert!(src.len() >= ch * hw && ox + w <= dst_w);
        assert!(dst.len() >= (oy + h) * dst_w * cw);
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let mut r = [_mm512_setzero_ps(); 16];
        for iy in 0..h {
            for ix0 in (0..w).step_by(LANES) {
                let n = LANES.min(w - ix0);
                for j in (0..cw).step_by(LANES) {
                    for c in 0..LANES {
                        r[c] = if j + c < ch {
                            _mm512_maskz_loadu_ps(first(n), sp.add((j + c) * hw + iy * w + ix0))
                        } else {
                            _mm512_setzero_ps()
                        };
                    }
                    transpose16(&mut r);
                    let row = dp.add(((iy + oy) * dst_w + ox + ix0) * cw + j);
                    for q in 0..n {
                        _mm512_storeu_ps(row.add(q * cw), r[q]);
                    }
                }
            }
        }
    }

    /// [`super::unpack_body`] through [`transpose16`], a tile row (4 output rows) of 16
    /// channels at a time: the transposed vectors go to a staging block, then each channel's
    /// 4 rows (contiguous in `y`) are copied out in one run. Stored straight from the
    /// transposes, each 16 pixels wrote 16 lines of 16 channel planes, 4 KB apart on 32x32
    /// planes (one L1 set); an odd 31x31 plane ran the 16-channel forward 12% faster than
    /// 32x32. With the staging (forward, median of 20 calls, 1 thread, Intel AVX-512 host,
    /// three alternating pairs): 16ch 32x32 batch 128 4.42-4.51 -> 4.08-4.14 ms, 64ch 32x32
    /// batch 64 16.9-20.2 -> 16.4-17.4, 32ch 16x16 2.56-2.57 -> 2.40-2.42; 64ch 16x16 and 8x8
    /// ties. ResNet-20's training step (batch 128, 1 thread, four pairs) 525-531 -> 527-537
    /// img/s; resnet18@128 at 2 threads 92.5-93.7 -> 95.1-98.4.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn unpack(p: &Plane, o: &[f32], y: &mut [f32], add: bool) {
        const ROWS: usize = 4;
        let (wo, co) = (4 * p.tw(), wide(p.cout));
        let ohw = p.oh * p.ow;
        assert!(o.len() >= 4 * p.th() * wo * co && y.len() >= p.cout * ohw);
        // Staging rows padded to whole vectors plus one, so that the channels' rows do not
        // start at the same offset modulo 4 KB.
        let sw = p.ow.div_ceil(LANES) * LANES + LANES;
        // Every value copied out was written by a transpose first.
        let mut stage = super::unzeroed(LANES * ROWS * sw);
        let (op, yp, sp) = (o.as_ptr(), y.as_mut_ptr(), stage.as_mut_ptr());
        let mut r = [_mm512_setzero_ps(); 16];
        for oy0 in (0..p.oh).step_by(ROWS) {
            let rows = ROWS.min(p.oh - oy0);
            for j in (0..co).step_by(LANES) {
                for dr in 0..rows {
                    let oy = oy0 + dr;
                    for ox0 in (0..p.ow).step_by(LANES) {
                        let n = LANES.min(p.ow - ox0);
                        for q in 0..LANES {
                            r[q] = if q < n {
                                _mm512_loadu_ps(op.add((oy * wo + ox0 + q) * co + j))
                            } else {
                                _mm512_setzero_ps()
                            };
                        }
                        transpose16(&mut r);
                        for c in 0..LANES {
                            _mm512_storeu_ps(sp.add((c * ROWS + dr) * sw + ox0), r[c]);
                        }
                    }
                }
                for c in 0..LANES.min(p.cout.saturating_sub(j)) {
                    let dst = yp.add((j + c) * ohw + oy0 * p.ow);
                    for dr in 0..rows {
                        let src = sp.add((c * ROWS + dr) * sw);
                        let d = dst.add(dr * p.ow);
                        let mut x0 = 0;
                        while x0 + LANES <= p.ow {
                            let mut v = _mm512_loadu_ps(src.add(x0));
                            if add {
                                v = _mm512_add_ps(_mm512_loadu_ps(d.add(x0)), v);
                            }
                            _mm512_storeu_ps(d.add(x0), v);
                            x0 += LANES;
                        }
                        if x0 < p.ow {
                            let m = first(p.ow - x0);
                            let mut v = _mm512_loadu_ps(src.add(x0));
                            if add {
                                v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, d.add(x0)), v);
                            }
                            _mm512_mask_storeu_ps(d.add(x0), m, v);
                        }
                    }
                }
            }
        }
    }

    vector_transforms! {
        vec: __m512, feature: "avx512f", lanes: LANES,
        loadu: _mm512_loadu_ps, storeu: _mm512_storeu_ps, add: _mm512_add_ps,
        sub: _mm512_sub_ps, fmadd: _mm512_fmadd_ps, set1: _mm512_set1_ps,
        zero: _mm512_setzero_ps,
    }

    /// [`super::products_portable`] with one fused multiply-add per term: per tap and vector
    /// of output channels, the [`TB`] tiles' accumulators stay in registers while the `cin`
    /// weight vectors stream by.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn products(
        cin: usize,
        ci: usize,
        co: usize,
        u: &[f32],
        v: &[f32],
        m: &mut [f32],
    ) {
        assert!(
            cin <= ci
                && u.len() >= TAPS * ci * co
                && v.len() >= TB * TAPS * ci
                && m.len() >= TB * TAPS * co
        );
        let (up, vp, mp) = (u.as_ptr(), v.as_ptr(), m.as_mut_ptr());
        for k in 0..TAPS {
            for j in (0..co).step_by(LANES) {
                let uk = up.add(k * ci * co + j);
                let mut acc = [_mm512_setzero_ps(); TB];
                for c in 0..cin {
                    let uc = _mm512_loadu_ps(uk.add(c * co));
                    for t in 0..TB {
                        let vb = _mm512_set1_ps(*vp.add((t * TAPS + k) * ci + c));
                        acc[t] = _mm512_fmadd_ps(vb, uc, acc[t]);
                    }
                }
                for t in 0..TB {
                    _mm512_storeu_ps(mp.add((t * TAPS + k) * co + j), acc[t]);
                }
            }
        }
    }

    /// [`super::accumulate_portable`] with one fused multiply-add per term: per tap and pair
    /// of 16-channel groups, the 16 input channels' sums (each a vector over 16 output
    /// channels) stay in registers while the block's `nb` tiles stream by.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn accumulate(
        cin: usize,
        ci: usize,
        co: usize,
        nb: usize,
        v: &[f32],
        dm: &[f32],
        du: &mut [f32],
    ) {
        assert!(
            cin <= ci
                && v.len() >= nb * TAPS * ci
                && dm.len() >= nb * TAPS * co
                && du.len() >= TAPS * ci * co
        );
        let (vp, mp, up) = (v.as_ptr(), dm.as_ptr(), du.as_mut_ptr());
        for k in 0..TAPS {
            for jc in (0..cin).step_by(LANES) {
                let nc = LANES.min(cin - jc);
                for jo in (0..co).step_by(LANES) {
                    let uk = up.add((k * ci + jc) * co + jo);
                    let mut acc = [_mm512_setzero_ps(); LANES];
                    for c in 0..LANES {
                        acc[c] = _mm512_loadu_ps(uk.add(c * co));
                    }
                    for t in 0..nb {
                        let d = _mm512_loadu_ps(mp.add((t * TAPS + k) * co + jo));
                        let vt = vp.add((t * TAPS + k) * ci + jc);
                        for c in 0..LANES {
                            if c < nc {
                                acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(*vt.add(c)), d, acc[c]);
                            }
                        }
                    }
                    for c in 0..LANES {
                        _mm512_storeu_ps(uk.add(c * co), acc[c]);
                    }
                }
            }
        }
    }
}

/// The AVX2 build's tiles: [`products_portable`] and [`accumulate_portable`] with one fused
/// multiply-add per term, in the AVX-512 tiles' order (so the same bits as theirs). AVX2 has
/// 16 registers of 8 lanes, so a 16-lane vector is two of them and a tile holds half the
/// AVX-512 one's sums: 4 tiles (products) or 4 input channels (sums) by 16 output lanes, 8
/// accumulators, two FMA pipes times a 4-cycle latency.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::super::layout::transpose8;
    use super::{wide, Plane, LANES, TAPS, TB};
    use std::arch::x86_64::*;

    /// Tiles (products) or input channels (sums) per register tile.
    const ROWS: usize = 4;

    /// A mask of the first `n` (at most 8) lanes for `_mm256_mask{load,store}_ps`.
    #[inline(always)]
    unsafe fn first(n: usize) -> __m256i {
        _mm256_cmpgt_epi32(
            _mm256_set1_epi32(n as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        )
    }

    /// [`super::pack_body`] through 8x8 transposes (the plain loop gathers one float at a
    /// time: 15% of ResNet-20's training step on an AVX2 EPYC, with `unpack` another 20%).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack(p: &Plane, x: &[f32], dst: &mut [f32]) {
        let wp = 4 * p.tw() + 2;
        assert!(dst.len() >= (4 * p.th() + 2) * wp * wide(p.cin));
        assert!(p.pt + p.h <= 4 * p.th() + 2 && p.pl + p.w <= wp);
        pack_into(x, p.cin, p.h, p.w, dst, wp, p.pt, p.pl);
    }

    /// [`super::pack_dy_body`] through 8x8 transposes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_dy(p: &Plane, dy: &[f32], dst: &mut [f32]) {
        let wo = 4 * p.tw();
        assert!(dst.len() >= 4 * p.th() * wo * wide(p.cout));
        pack_into(dy, p.cout, p.oh, p.ow, dst, wo, 0, 0);
    }

    /// `src` (`[ch][h][w]`) channels-last into `dst` (rows of `dst_w` pixels of `wide(ch)`
    /// lanes), pixel `(iy, ix)` at `(iy + oy, ix + ox)`, every lane of those pixels written.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pack_into(
        src: &[f32],
        ch: usize,
        h: usize,
        w: usize,
        dst: &mut [f32],
        dst_w: usize,
        oy: usize,
        ox: usize,
    ) {
        let (hw, cw) = (h * w, wide(ch));
        assert!(src.len() >= ch * hw && ox + w <= dst_w);
        assert!(dst.len() >= (oy + h) * dst_w * cw);
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let mut r = [_mm256_setzero_ps(); 8];
        for iy in 0..h {
            for ix0 in (0..w).step_by(8) {
                let n = 8.min(w - ix0);
                let mask = first(n);
                for j in (0..cw).step_by(8) {
                    for c in 0..8 {
                        let at = sp.add((j + c) * hw + iy * w + ix0);
                        r[c] = if j + c >= ch {
                            _mm256_setzero_ps()
                        } else if n == 8 {
                            _mm256_loadu_ps(at)
                        } else {
                            _mm256_maskload_ps(at, mask)
                        };
                    }
                    let t = transpose8(r);
                    let row = dp.add(((iy + oy) * dst_w + ox + ix0) * cw + j);
                    for q in 0..n {
                        _mm256_storeu_ps(row.add(q * cw), t[q]);
                    }
                }
            }
        }
    }

    /// [`super::unpack_body`] through 8x8 transposes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn unpack(p: &Plane, o: &[f32], y: &mut [f32], add: bool) {
        let (wo, co) = (4 * p.tw(), wide(p.cout));
        let ohw = p.oh * p.ow;
        assert!(o.len() >= 4 * p.th() * wo * co && y.len() >= p.cout * ohw);
        let (op, yp) = (o.as_ptr(), y.as_mut_ptr());
        let mut r = [_mm256_setzero_ps(); 8];
        for oy in 0..p.oh {
            for ox0 in (0..p.ow).step_by(8) {
                let n = 8.min(p.ow - ox0);
                let mask = first(n);
                for j in (0..p.cout).step_by(8) {
                    for q in 0..8 {
                        r[q] = if q < n {
                            _mm256_loadu_ps(op.add((oy * wo + ox0 + q) * co + j))
                        } else {
                            _mm256_setzero_ps()
                        };
                    }
                    let t = transpose8(r);
                    // Masked stores only for a row's last pixels: AMD runs them as
                    // microcode, many times slower than a plain store.
                    for c in 0..8.min(p.cout - j) {
                        let at = yp.add((j + c) * ohw + oy * p.ow + ox0);
                        if n == 8 {
                            let v = if add {
                                _mm256_add_ps(_mm256_loadu_ps(at), t[c])
                            } else {
                                t[c]
                            };
                            _mm256_storeu_ps(at, v);
                        } else {
                            let v = if add {
                                _mm256_add_ps(_mm256_maskload_ps(at, mask), t[c])
                            } else {
                                t[c]
                            };
                            _mm256_maskstore_ps(at, mask, v);
                        }
                    }
                }
            }
        }
    }

    vector_transforms! {
        vec: __m256, feature: "avx2,fma", lanes: 8,
        loadu: _mm256_loadu_ps, storeu: _mm256_storeu_ps, add: _mm256_add_ps,
        sub: _mm256_sub_ps, fmadd: _mm256_fmadd_ps, set1: _mm256_set1_ps,
        zero: _mm256_setzero_ps,
    }

    /// [`super::products_portable`]: per tap and vector of 16 output channels, the block's
    /// [`TB`] tiles in groups of [`ROWS`], whose 2 x `ROWS` accumulators stay in registers while
    /// the `cin` weight vectors stream by.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn products(
        cin: usize,
        ci: usize,
        co: usize,
        u: &[f32],
        v: &[f32],
        m: &mut [f32],
    ) {
        assert!(
            cin <= ci
                && u.len() >= TAPS * ci * co
                && v.len() >= TB * TAPS * ci
                && m.len() >= TB * TAPS * co
                && co.is_multiple_of(LANES)
        );
        let (up, vp, mp) = (u.as_ptr(), v.as_ptr(), m.as_mut_ptr());
        for k in 0..TAPS {
            for j in (0..co).step_by(LANES) {
                let uk = up.add(k * ci * co + j);
                for t0 in (0..TB).step_by(ROWS) {
                    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
                    for c in 0..cin {
                        let u0 = _mm256_loadu_ps(uk.add(c * co));
                        let u1 = _mm256_loadu_ps(uk.add(c * co + 8));
                        for t in 0..ROWS {
                            let vb = _mm256_broadcast_ss(&*vp.add(((t0 + t) * TAPS + k) * ci + c));
                            acc[t][0] = _mm256_fmadd_ps(vb, u0, acc[t][0]);
                            acc[t][1] = _mm256_fmadd_ps(vb, u1, acc[t][1]);
                        }
                    }
                    for t in 0..ROWS {
                        let dst = mp.add(((t0 + t) * TAPS + k) * co + j);
                        _mm256_storeu_ps(dst, acc[t][0]);
                        _mm256_storeu_ps(dst.add(8), acc[t][1]);
                    }
                }
            }
        }
    }

    /// [`super::accumulate_portable`]: per tap, vector of 16 output channels and group of
    /// [`ROWS`] input channels, those channels' sums (each two registers over the 16 output
    /// channels) stay in registers while the sweep's `nb` tiles stream by.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn accumulate(
        cin: usize,
        ci: usize,
        co: usize,
        nb: usize,
        v: &[f32],
        dm: &[f32],
        du: &mut [f32],
    ) {
        assert!(
            cin <= ci
                && v.len() >= nb * TAPS * ci
                && dm.len() >= nb * TAPS * co
                && du.len() >= TAPS * ci * co
                && co.is_multiple_of(LANES)
        );
        let (vp, mp, up) = (v.as_ptr(), dm.as_ptr(), du.as_mut_ptr());
        for k in 0..TAPS {
            for c0 in (0..cin).step_by(ROWS) {
                let nc = ROWS.min(cin - c0);
                for jo in (0..co).step_by(LANES) {
                    let uk = up.add((k * ci + c0) * co + jo);
                    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
                    for c in 0..nc {
                        acc[c][0] = _mm256_loadu_ps(uk.add(c * co));
                        acc[c][1] = _mm256_loadu_ps(uk.add(c * co + 8));
                    }
                    for t in 0..nb {
                        let d = mp.add((t * TAPS + k) * co + jo);
                        let (d0, d1) = (_mm256_loadu_ps(d), _mm256_loadu_ps(d.add(8)));
                        let vt = vp.add((t * TAPS + k) * ci + c0);
                        for c in 0..ROWS {
                            if c < nc {
                                let vb = _mm256_broadcast_ss(&*vt.add(c));
                                acc[c][0] = _mm256_fmadd_ps(vb, d0, acc[c][0]);
                                acc[c][1] = _mm256_fmadd_ps(vb, d1, acc[c][1]);
                            }
                        }
                    }
                    for c in 0..nc {
                        _mm256_storeu_ps(uk.add(c * co), acc[c][0]);
                        _mm256_storeu_ps(uk.add(c * co + 8), acc[c][1]);
                    }
                }
            }
        }
    }
}
