//! A small seeded random number generator (SplitMix64).
//!
//! Training must be reproducible from `--seed` alone, across machines and crate upgrades, and
//! resumable mid-epoch: every consumer derives its own stream with [`Rng::derive`] from the seed
//! and a few integers (epoch, batch index, layer index) instead of sharing one mutable
//! generator whose state would depend on thread timing.

/// SplitMix64's state increment per draw.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// An independent stream for `(seed, keys...)`.
    pub fn derive(seed: u64, keys: &[u64]) -> Rng {
        let mut r = Rng::new(seed);
        for &k in keys {
            r.state ^= k.wrapping_mul(0xD1B5_4A32_D192_ED03);
            r.next_u64();
        }
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The stream `n` draws further on: what this one would be after `n` calls of
    /// [`Self::next_u64`] (SplitMix64's state moves by a constant per draw). Lets a long run of
    /// draws be made in parallel pieces with the bits of the serial loop.
    pub fn skipped(&self, n: u64) -> Rng {
        Rng {
            state: self.state.wrapping_add(n.wrapping_mul(GAMMA)),
        }
    }

    /// `out[i] = f(i-th uniform draw)`, in parallel pieces ([`Self::skipped`]): the values of a
    /// serial loop of [`Self::uniform`] over `out`, bit for bit. Leaves this stream where it was.
    pub fn par_fill_uniform(&self, out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
        use rayon::prelude::*;
        const PIECE: usize = 1 << 14;
        out.par_chunks_mut(PIECE)
            .enumerate()
            .for_each(|(i, piece)| {
                let mut r = self.skipped((i * PIECE) as u64);
                piece.iter_mut().for_each(|v| *v = f(r.uniform()));
            });
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_and_parallel_fill_continue_the_serial_stream() {
        let r = Rng::derive(3, &[1, 2]);
        let mut serial = r.clone();
        let draws: Vec<f32> = (0..40_000).map(|_| serial.uniform()).collect();
        let mut s = r.skipped(12_345);
        assert_eq!(s.uniform(), draws[12_345]);
        let mut filled = vec![0.0f32; draws.len()];
        r.par_fill_uniform(&mut filled, |u| u * 2.0);
        let want: Vec<f32> = draws.iter().map(|u| u * 2.0).collect();
        assert_eq!(filled, want);
    }

    #[test]
    fn moments_and_determinism() {
        let mut r = Rng::new(7);
        let n = 200_000;
        let xs: Vec<f32> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f32>() / n as f32;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.02, "{var}");
        let u: Vec<usize> = (0..10_000).map(|_| r.below(10)).collect();
        for k in 0..10 {
            let c = u.iter().filter(|&&x| x == k).count();
            assert!((900..1100).contains(&c), "{k}: {c}");
        }
        let a: Vec<u64> = (0..5).map(|_| Rng::derive(1, &[2, 3]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::derive(1, &[2, 3]).next_u64(),
            Rng::derive(1, &[3, 2]).next_u64()
        );
    }
}
