//! Layout transposes of the channels-last kernels (`depthwise_cl.rs`, `small_plane.rs`).

use crate::engine::ops::simd::simd_dispatch;

/// `[c][p] -> [p][c]`: `co` planes of `n` pixels (plane `c` is `plane(c)`) into pixel rows of
/// `co` values, in 8x8 blocks (AVX shuffles where the CPU has them). One float at a time, the scattered stores stalled: that transpose took 41%
/// of a 32x32 depthwise layer's time, and 10% of ResNet-18's training step at 64x64 as
/// `small_plane.rs`'s layout change. Inlined, so that callers compiled for AVX get its
/// shuffles at their width.
#[inline(always)]
pub(super) fn planes_to_pixels<'a>(
    n: usize,
    co: usize,
    plane: impl Fn(usize) -> &'a [f32],
    out: &mut [f32],
) {
    planes_to_pixels_with(has_avx(), n, co, plane, out)
}

/// [`planes_to_pixels`], with the AVX blocks on or off (`avx` only where the CPU has AVX).
#[inline(always)]
fn planes_to_pixels_with<'a>(
    avx: bool,
    n: usize,
    co: usize,
    plane: impl Fn(usize) -> &'a [f32],
    out: &mut [f32],
) {
    let (cfull, pfull) = (co - co % 8, n - n % 8);
    let out = &mut out[..n * co];
    for c0 in (0..cfull).step_by(8) {
        let rows: [&[f32]; 8] = std::array::from_fn(|l| &plane(c0 + l)[..n]);
        for p0 in (0..pfull).step_by(8) {
            #[cfg(target_arch = "x86_64")]
            if avx {
                // SAFETY: the CPU has AVX (`has_avx`); each row holds `p0 + 8 <= n` floats and
                // `out` the eight rows of `co >= c0 + 8` floats from pixel `p0`.
                unsafe { transpose8x8_avx(&rows, p0, &mut out[p0 * co..], co, c0) };
                continue;
            }
            let a: [[f32; 8]; 8] =
                std::array::from_fn(|l| rows[l][p0..p0 + 8].try_into().expect("8 pixels"));
            for j in 0..8 {
                let d: &mut [f32; 8] = (&mut out[(p0 + j) * co + c0..][..8])
                    .try_into()
                    .expect("8 lanes");
                *d = std::array::from_fn(|l| a[l][j]);
            }
        }
        // The last `n % 8` pixels, as 8-channel runs from this block's rows: a separate loop
        // per channel over them took longer than the 8x8 blocks when they are few (the 9th tap
        // of every channel in `small_plane.rs`'s weight layout change).
        for p in pfull..n {
            let d: &mut [f32; 8] = (&mut out[p * co + c0..][..8]).try_into().expect("8 lanes");
            *d = std::array::from_fn(|l| rows[l][p]);
        }
    }
    // Every pixel of the last `co % 8` channels (fewer than 8 output columns, whose lines stay
    // in cache).
    for c in cfull..co {
        for (p, &v) in plane(c)[..n].iter().enumerate() {
            out[p * co + c] = v;
        }
    }
}

/// Whether the CPU has AVX (cached by the standard library after the first query).
#[inline(always)]
fn has_avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::engine::isa::cpu_has!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One 8x8 block: pixels `p0 .. p0 + 8` of the eight `rows` into `out`'s rows `0..8` (stride
/// `co`) at columns `c0 .. c0 + 8`. Eight loads, [`transpose8`], eight stores; the compiler kept the portable version scalar (64 single-float
/// moves through the stack).
///
/// # Safety
/// The CPU must support AVX; every row needs `p0 + 8` floats and `out` `7 * co + c0 + 8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
unsafe fn transpose8x8_avx(rows: &[&[f32]; 8], p0: usize, out: &mut [f32], co: usize, c0: usize) {
    use std::arch::x86_64::*;
    assert!(rows.iter().all(|r| r.len() >= p0 + 8) && out.len() >= 7 * co + c0 + 8);
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(rows[i].as_ptr().add(p0)));
    let cols = transpose8(r);
    for (j, v) in cols.into_iter().enumerate() {
        _mm256_storeu_ps(out.as_mut_ptr().add(j * co + c0), v);
    }
}

/// Eight vectors of eight lanes transposed: lane `j` of `r[i]` is lane `i` of the result's
/// `j`th (the textbook unpack / shuffle / lane-permute network, 24 shuffles).
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
#[inline]
pub(super) unsafe fn transpose8(
    r: [std::arch::x86_64::__m256; 8],
) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

simd_dispatch! {
    /// [`planes_to_pixels`] of one contiguous `[co][n]` block, for callers outside a vector
    /// build: compiled for AVX-512 / AVX2 where the CPU has them.
    pub(super) fn transpose_block(n: usize, co: usize, src: &[f32], out: &mut [f32])
        => transpose_block_body, (n, co, src, out); ["avx512f", "avx2"]
}

#[inline(always)]
fn transpose_block_body(n: usize, co: usize, src: &[f32], out: &mut [f32]) {
    planes_to_pixels(n, co, |c| &src[c * n..][..n], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block shape and remainder (fewer than 8 pixels or channels, multiples of 8, both
    /// ragged), with and without the AVX blocks, against the plain double loop, bit for bit.
    #[test]
    fn transposes_match_the_plain_loop() {
        for n in [1, 3, 7, 8, 9, 16, 21] {
            for co in [1, 5, 8, 12, 16, 19] {
                let src: Vec<f32> = (0..n * co).map(|i| i as f32 * 0.5 - 3.0).collect();
                let mut want = vec![0.0f32; n * co];
                for c in 0..co {
                    for p in 0..n {
                        want[p * co + c] = src[c * n + p];
                    }
                }
                let avx = [false, has_avx()];
                for a in avx {
                    let mut got = vec![f32::NAN; n * co];
                    planes_to_pixels_with(a, n, co, |c| &src[c * n..][..n], &mut got);
                    assert_eq!(got, want, "n {n} co {co} avx {a}");
                }
                let mut got = vec![f32::NAN; n * co];
                transpose_block(n, co, &src, &mut got);
                assert_eq!(got, want, "transpose_block n {n} co {co}");
            }
        }
    }
}
