//! Batch norm's per-plane f32 sums: `sum(x)`, `sum((x - mu)^2)` and the gradient pair
//! `(sum(g'), sum(g' * (x - mu)))`, where `g'` is `dy` gated by a fused activation's mask.
//!
//! Why not [`super::reduce_pairs`]: its one 8-lane accumulator is one chain of dependent adds,
//! 8 values per add latency (3-4 cycles). A C loop of that shape sums an L3-resident 8 MiB at
//! 38 GB/s on this project's 2-core EPYC hosts; with four accumulators at 85-98 GB/s (from DRAM
//! both run at ~25). Written generically over `[[f32; 8]; 4]` the compiler kept the
//! accumulators on the stack and shuffled lanes (MobileNet-V2's BN + Clip backward went from
//! 7.0 to 11 ms), so the AVX2 build is explicit intrinsics, and [`Scalar`] is the same lane
//! arithmetic written out: the baseline for CPUs without AVX2 and the oracle of the bitwise
//! test.
//!
//! Lane order, the same in both: lane `l` of accumulator `q` takes entries `32t + 8q + l`; a
//! tail under 32 entries goes 8 at a time into accumulator 0, its last `r < 8` entries into
//! lanes `0..r` of accumulator 0 (the other lanes add +0.0: a masked vector step, so that
//! MobileNet's 2x2 planes, four values each, take no scalar loop). The accumulators are folded
//! lane by lane as `(q0 + q1) + (q2 + q3)`, then the 8 lanes as a tree: `l + (l + 4)`, then
//! `+ (l + 2)`, then the last two. No fused multiply-add.

/// `b * (x - shift) + k`: the fused activation's input, rebuilt from BN's input with the
/// forward's own coefficients (batch norm's `pre_activation`, the same f32 operations).
#[derive(Clone, Copy, Debug)]
pub(super) struct Pre {
    pub b: f32,
    pub shift: f32,
    pub k: f32,
}

impl Pre {
    #[inline(always)]
    fn at(&self, x: f32) -> f32 {
        self.b * (x - self.shift) + self.k
    }
}

/// Where `dy` passes into the gradient sums: everywhere, or where a fused activation passed the
/// gradient at its input (batch norm's `BnAct::passes`: strictly inside the linear region).
#[derive(Clone, Copy, Debug)]
pub(super) enum Gate {
    All,
    /// ReLU: `pre > 0`.
    Relu(Pre),
    /// Clip: `min < pre < max`.
    Clip(Pre, f32, f32),
}

impl Gate {
    /// `g` where the gate passes at `x`, else 0.0 (the separate activation's backward).
    #[inline(always)]
    fn apply(&self, g: f32, x: f32) -> f32 {
        let keep = match *self {
            Gate::All => true,
            Gate::Relu(p) => p.at(x) > 0.0,
            Gate::Clip(p, min, max) => {
                let v = p.at(x);
                v > min && v < max
            }
        };
        if keep {
            g
        } else {
            0.0
        }
    }
}

/// One implementation of the three plane sums (see the module doc for the lane order every
/// implementation follows, so that all give the same bits).
pub(super) trait PlaneSums: Copy {
    fn sum(self, p: &[f32]) -> f32;
    fn dev(self, p: &[f32], mu: f32) -> f32;
    /// `g` and `x` have the same length.
    fn grad(self, g: &[f32], x: &[f32], mu: f32, gate: Gate) -> [f32; 2];
}

/// Plain Rust, lane by lane.
#[derive(Clone, Copy, Debug)]
pub(super) struct Scalar;

/// Sums `f(g[i], x[i])` (each a `K`-vector) in the module's lane order.
#[inline(always)]
fn scalar_lanes<const K: usize>(
    g: &[f32],
    x: &[f32],
    f: impl Fn(f32, f32) -> [f32; K],
) -> [f32; K] {
    assert_eq!(g.len(), x.len(), "plane operands differ in length");
    let mut acc = [[[0.0f32; 8]; 4]; K];
    let n = g.len();
    let mut i = 0;
    while i + 32 <= n {
        for q in 0..4 {
            for l in 0..8 {
                let v = f(g[i + 8 * q + l], x[i + 8 * q + l]);
                acc.iter_mut().zip(v).for_each(|(a, v)| a[q][l] += v);
            }
        }
        i += 32;
    }
    while i < n {
        for l in 0..8 {
            let v = if i + l < n {
                f(g[i + l], x[i + l])
            } else {
                [0.0; K]
            };
            acc.iter_mut().zip(v).for_each(|(a, v)| a[0][l] += v);
        }
        i += 8;
    }
    std::array::from_fn(|k| fold(&acc[k]))
}

/// The accumulators' fold: lane by lane `(q0 + q1) + (q2 + q3)`, then the 8 lanes as a tree.
#[inline(always)]
fn fold(q: &[[f32; 8]; 4]) -> f32 {
    let v: [f32; 8] = std::array::from_fn(|l| (q[0][l] + q[1][l]) + (q[2][l] + q[3][l]));
    let h: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    (h[0] + h[2]) + (h[1] + h[3])
}

impl PlaneSums for Scalar {
    fn sum(self, p: &[f32]) -> f32 {
        scalar_lanes(p, p, |v, _| [v])[0]
    }

    fn dev(self, p: &[f32], mu: f32) -> f32 {
        scalar_lanes(p, p, |v, _| [(v - mu) * (v - mu)])[0]
    }

    fn grad(self, g: &[f32], x: &[f32], mu: f32, gate: Gate) -> [f32; 2] {
        scalar_lanes(g, x, |g, x| {
            let g = gate.apply(g, x);
            [g, g * (x - mu)]
        })
    }
}

/// The AVX2 build; only made by [`Avx2::detect`], on a CPU that has AVX2.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
pub(super) struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    pub(super) fn detect() -> Option<Avx2> {
        crate::engine::isa::cpu_has!("avx2").then_some(Avx2(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl PlaneSums for Avx2 {
    #[inline(always)]
    fn sum(self, p: &[f32]) -> f32 {
        // SAFETY: an `Avx2` exists only where the CPU has AVX2.
        unsafe { avx2::sums::<0>(p, p, 0.0, Gate::All)[0] }
    }

    #[inline(always)]
    fn dev(self, p: &[f32], mu: f32) -> f32 {
        // SAFETY: as in `sum`.
        unsafe { avx2::sums::<1>(p, p, mu, Gate::All)[0] }
    }

    #[inline(always)]
    fn grad(self, g: &[f32], x: &[f32], mu: f32, gate: Gate) -> [f32; 2] {
        assert_eq!(g.len(), x.len(), "plane operands differ in length");
        // SAFETY: as in `sum`; `g` and `x` have the same length (checked above).
        unsafe {
            match gate {
                Gate::All => avx2::sums::<2>(g, x, mu, gate),
                Gate::Relu(_) => avx2::sums::<3>(g, x, mu, gate),
                Gate::Clip(..) => avx2::sums::<4>(g, x, mu, gate),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Gate;
    use std::arch::x86_64::*;

    /// What [`sums`] adds per entry, by `MODE`: 0 `x` (`g` unused), 1 `(x - mu)^2`, and
    /// `[g', g' * (x - mu)]` with `g'` gated by 2 nothing, 3 ReLU, 4 Clip (the gate's kind, which
    /// the caller matched, so the loop holds no branch).
    ///
    /// Inlined, with the channel loop around it, into a function built for AVX2 (batch norm's
    /// `with_plane_sums!`), where the intrinsics inline too: a `#[target_feature]` function
    /// cannot be `#[inline(always)]`, and plain `#[inline]` left the sums out of line, a call
    /// per plane. No closures in here: a closure is not built for its caller's features.
    ///
    /// # Safety
    /// The CPU has AVX2, and `g.len() == x.len()`.
    #[inline(always)]
    pub(super) unsafe fn sums<const MODE: u8>(
        g: &[f32],
        x: &[f32],
        mu: f32,
        gate: Gate,
    ) -> [f32; 2] {
        let n = x.len();
        debug_assert_eq!(g.len(), n);
        let (gp, xp) = (g.as_ptr(), x.as_ptr());
        let (pre, min, max) = match gate {
            Gate::All => (
                super::Pre {
                    b: 0.0,
                    shift: 0.0,
                    k: 0.0,
                },
                0.0,
                0.0,
            ),
            Gate::Relu(p) => (p, 0.0, 0.0),
            Gate::Clip(p, min, max) => (p, min, max),
        };
        let c = Consts {
            b: _mm256_set1_ps(pre.b),
            shift: _mm256_set1_ps(pre.shift),
            k: _mm256_set1_ps(pre.k),
            min: _mm256_set1_ps(min),
            max: _mm256_set1_ps(max),
            mu: _mm256_set1_ps(mu),
        };
        let zero = _mm256_setzero_ps();
        let (mut a, mut b) = ([zero; 4], [zero; 4]);
        let mut i = 0;
        while i + 32 <= n {
            for q in 0..4 {
                let xv = _mm256_loadu_ps(xp.add(i + 8 * q));
                let gv = if MODE >= 2 {
                    _mm256_loadu_ps(gp.add(i + 8 * q))
                } else {
                    zero
                };
                let (da, db) = terms::<MODE>(xv, gv, &c);
                a[q] = _mm256_add_ps(a[q], da);
                b[q] = _mm256_add_ps(b[q], db);
            }
            i += 32;
        }
        while i + 8 <= n {
            let xv = _mm256_loadu_ps(xp.add(i));
            let gv = if MODE >= 2 {
                _mm256_loadu_ps(gp.add(i))
            } else {
                zero
            };
            let (da, db) = terms::<MODE>(xv, gv, &c);
            a[0] = _mm256_add_ps(a[0], da);
            b[0] = _mm256_add_ps(b[0], db);
            i += 8;
        }
        if i < n {
            // Lanes 0..n - i: masked loads read only those (no access past the plane), and the
            // terms of the other lanes are cleared to +0.0.
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let m = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - i) as i32), lane);
            let xv = _mm256_maskload_ps(xp.add(i), m);
            let gv = if MODE >= 2 {
                _mm256_maskload_ps(gp.add(i), m)
            } else {
                zero
            };
            let (da, db) = terms::<MODE>(xv, gv, &c);
            let mf = _mm256_castsi256_ps(m);
            a[0] = _mm256_add_ps(a[0], _mm256_and_ps(mf, da));
            b[0] = _mm256_add_ps(b[0], _mm256_and_ps(mf, db));
        }
        [fold(a), if MODE >= 2 { fold(b) } else { 0.0 }]
    }

    /// [`sums`]' broadcast constants.
    struct Consts {
        b: __m256,
        shift: __m256,
        k: __m256,
        min: __m256,
        max: __m256,
        mu: __m256,
    }

    /// The terms 8 entries add to the two sums (see [`sums`] for `MODE`).
    #[inline(always)]
    unsafe fn terms<const MODE: u8>(xv: __m256, gv: __m256, c: &Consts) -> (__m256, __m256) {
        let zero = _mm256_setzero_ps();
        match MODE {
            0 => (xv, zero),
            1 => {
                let d = _mm256_sub_ps(xv, c.mu);
                (_mm256_mul_ps(d, d), zero)
            }
            _ => {
                let mut gv = gv;
                if MODE >= 3 {
                    let v = _mm256_add_ps(_mm256_mul_ps(c.b, _mm256_sub_ps(xv, c.shift)), c.k);
                    let keep = if MODE == 3 {
                        _mm256_cmp_ps::<_CMP_GT_OQ>(v, zero)
                    } else {
                        _mm256_and_ps(
                            _mm256_cmp_ps::<_CMP_GT_OQ>(v, c.min),
                            _mm256_cmp_ps::<_CMP_LT_OQ>(v, c.max),
                        )
                    };
                    gv = _mm256_and_ps(keep, gv);
                }
                (gv, _mm256_mul_ps(gv, _mm256_sub_ps(xv, c.mu)))
            }
        }
    }

    /// The module's fold: `(q0 + q1) + (q2 + q3)`, then lanes `l + (l + 4)`, then
    /// `(h0 + h2) + (h1 + h3)`.
    #[inline(always)]
    unsafe fn fold(q: [__m256; 4]) -> f32 {
        let v = _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3]));
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        // [h0 + h2, h1 + h3, ..]
        let t = _mm_add_ps(h, _mm_movehl_ps(h, h));
        _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps::<0b01>(t, t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The AVX2 build against [`Scalar`], bit for bit, on every plane length from 0 to 80 (each
    /// mix of 32-entry steps, 8-entry steps and a tail), every gate, with some entries on the
    /// gates' edges and a NaN.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_equals_scalar_bitwise() {
        let Some(avx2) = Avx2::detect() else {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        };
        let mut rng = Rng::new(5);
        // Exact in f32: x = 0.25 puts the pre-activation on ReLU's edge (0), x = 0 on Clip's
        // min (-0.5), x = 0.625 on its max (0.75).
        let pre = Pre {
            b: 2.0,
            shift: 0.25,
            k: 0.0,
        };
        let gates = [Gate::All, Gate::Relu(pre), Gate::Clip(pre, -0.5, 0.75)];
        let bits = |v: [f32; 2]| v.map(f32::to_bits);
        for n in 0..=80 {
            let mut x: Vec<f32> = (0..n).map(|_| -2.0 + 4.0 * rng.uniform()).collect();
            let g: Vec<f32> = (0..n).map(|_| -1.0 + 2.0 * rng.uniform()).collect();
            if n > 10 {
                (x[3], x[5], x[7]) = (0.25, 0.0, 0.625);
            }
            if n > 40 {
                x[37] = f32::NAN;
            }
            assert_eq!(
                avx2.sum(&x).to_bits(),
                Scalar.sum(&x).to_bits(),
                "sum, n {n}"
            );
            assert_eq!(
                avx2.dev(&x, 0.3).to_bits(),
                Scalar.dev(&x, 0.3).to_bits(),
                "dev, n {n}"
            );
            for gate in gates {
                assert_eq!(
                    bits(avx2.grad(&g, &x, 0.3, gate)),
                    bits(Scalar.grad(&g, &x, 0.3, gate)),
                    "grad, n {n}, {gate:?}"
                );
            }
        }
    }

    /// The lane sums against an f64 sum: 32 lanes keep the f32 error far under the parity
    /// tests' budget on a 128x128 plane of offset values.
    #[test]
    fn sums_are_close_to_f64() {
        let mut rng = Rng::new(8);
        let x: Vec<f32> = (0..128 * 128).map(|_| 3.0 + rng.uniform()).collect();
        let exact: f64 = x.iter().map(|&v| f64::from(v)).sum();
        let got = f64::from(Scalar.sum(&x));
        assert!((got - exact).abs() / exact < 1e-6, "{got} vs {exact}");
        let mu = (exact / x.len() as f64) as f32;
        let dev: f64 = x
            .iter()
            .map(|&v| (f64::from(v) - f64::from(mu)).powi(2))
            .sum();
        let got = f64::from(Scalar.dev(&x, mu));
        assert!((got - dev).abs() / dev < 1e-5, "{got} vs {dev}");
    }
}
