//! Test helpers shared by the op tests: a seeded RNG (no `rand` dependency), closeness checks and
//! an f64 central-difference gradient checker.

use ndarray::{Array, ArrayView, Dimension, IntoDimension};

/// Runs `f` on a fresh rayon pool of `threads` threads (for the thread-count-independence
/// tests: the same bits on 1 thread and on several).
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

/// SplitMix64: tiny, seeded, good enough to make test tensors.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.uniform() as f32
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [lo, hi) with entries in (-gap, gap) pushed out of it, so that ReLU-like kinks at
    /// 0 stay far from the finite-difference step.
    pub fn away_from(&mut self, lo: f32, hi: f32, kinks: &[f32], gap: f32) -> f32 {
        loop {
            let v = self.range(lo, hi);
            if kinks.iter().all(|k| (v - k).abs() > gap) {
                return v;
            }
        }
    }
}

pub fn rand_array<Sh: IntoDimension>(
    rng: &mut Rng,
    shape: Sh,
    lo: f32,
    hi: f32,
) -> Array<f32, Sh::Dim> {
    let dim = shape.into_dimension();
    let n = dim.size();
    let v: Vec<f32> = (0..n).map(|_| rng.range(lo, hi)).collect();
    Array::from_shape_vec(dim, v).unwrap()
}

pub fn to_f64<D: Dimension>(a: &ArrayView<f32, D>) -> Array<f64, D> {
    a.mapv(f64::from)
}

/// Largest |a - b| over the largest |b| (1 when b is all zeros). NaN when either side holds a
/// value that is not finite, so that no tolerance passes it: `f32::max` drops a NaN, and a
/// kernel that read its output before writing it (NaN under `cfg(test)`, `unzeroed`) passed.
pub fn rel_max_diff<D: Dimension>(a: &ArrayView<f32, D>, b: &ArrayView<f32, D>) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    if a.iter().chain(b.iter()).any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    if scale < 1e-20 {
        diff
    } else {
        diff / scale
    }
}

pub fn assert_close<D: Dimension>(
    what: &str,
    fast: &ArrayView<f32, D>,
    reference: &ArrayView<f32, D>,
    tol: f32,
) {
    let r = rel_max_diff(fast, reference);
    assert!(r <= tol, "{what}: relative max difference {r:e} > {tol:e}");
}

/// Central differences of `loss` with respect to every element of `p`, in f64.
pub fn fd_grad<D: Dimension>(
    p: &Array<f64, D>,
    loss: impl Fn(&Array<f64, D>) -> f64,
) -> Array<f64, D> {
    const EPS: f64 = 1e-6;
    let mut q = p.clone();
    let mut g = Array::zeros(p.raw_dim());
    for (i, gi) in g.iter_mut().enumerate() {
        let orig = p.as_slice_memory_order().unwrap()[i];
        q.as_slice_memory_order_mut().unwrap()[i] = orig + EPS;
        let lp = loss(&q);
        q.as_slice_memory_order_mut().unwrap()[i] = orig - EPS;
        let lm = loss(&q);
        q.as_slice_memory_order_mut().unwrap()[i] = orig;
        *gi = (lp - lm) / (2.0 * EPS);
    }
    g
}

/// `sum(y * r)`: the scalar whose gradient with respect to `y` is `r`.
pub fn dot_loss<D: Dimension>(y: &Array<f64, D>, r: &Array<f64, D>) -> f64 {
    assert_eq!(y.shape(), r.shape());
    y.iter().zip(r.iter()).map(|(a, b)| a * b).sum()
}

/// Relative gradient tolerance demanded by issue 3.
pub const GRAD_RTOL: f64 = 1e-3;

/// Worst elementwise error of `analytic` against `fd`, each relative to `max(|fd_i|, 1% of
/// max|fd|)`: strict per element, yet not fooled by entries that are tiny by cancellation.
pub fn grad_error<D: Dimension>(analytic: &ArrayView<f32, D>, fd: &ArrayView<f64, D>) -> f64 {
    assert_eq!(analytic.shape(), fd.shape(), "gradient shapes differ");
    let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = (1e-2 * scale).max(1e-12);
    analytic
        .iter()
        .zip(fd.iter())
        .map(|(&a, &f)| (f64::from(a) - f).abs() / f.abs().max(floor))
        .fold(0.0, f64::max)
}

/// As [`assert_grad`], for random geometries where a gradient can legitimately vanish (every
/// tap of a conv in the padding): then the analytic gradient must be exactly zero too.
pub fn assert_grad_or_zero<D: Dimension>(
    what: &str,
    analytic: &ArrayView<f32, D>,
    fd: &ArrayView<f64, D>,
) {
    if fd.iter().all(|v| v.abs() <= 1e-9) {
        assert!(
            analytic.iter().all(|&v| v == 0.0),
            "{what}: finite differences are zero, the analytic gradient is not"
        );
    } else {
        assert_grad(what, analytic, fd);
    }
}

pub fn assert_grad<D: Dimension>(what: &str, analytic: &ArrayView<f32, D>, fd: &ArrayView<f64, D>) {
    let scale = fd.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 1e-6,
        "{what}: finite-difference gradient is all ~0; the test is vacuous"
    );
    let e = grad_error(analytic, fd);
    assert!(
        e <= GRAD_RTOL,
        "{what}: gradient relative error {e:e} > {GRAD_RTOL:e}"
    );
}

/// A proptest runner with a fixed seed, so that CI sees the same cases on every run (a failure
/// is reproducible, never flaky), and `default_cases` cases unless `ELRT_PROPTEST_CASES` asks
/// for more (a longer hunt, still deterministic). Returns the runner and its case count.
pub fn prop_runner(default_cases: u32) -> (proptest::test_runner::TestRunner, u32) {
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let cases = std::env::var("ELRT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    (TestRunner::new_with_rng(config, rng), cases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    #[test]
    fn fd_of_a_quadratic_is_exact_enough() {
        let p = Array1::from(vec![0.3, -1.2, 2.0]);
        let g = fd_grad(&p, |q| q.iter().map(|v| v * v * v).sum());
        for (gi, pi) in g.iter().zip(p.iter()) {
            assert!((gi - 3.0 * pi * pi).abs() < 1e-8);
        }
    }

    /// The gradient checks would be worthless if a slightly wrong gradient passed: a 0.5% error
    /// in one entry of normal size, or a missing entry, must fail.
    #[test]
    fn grad_check_rejects_perturbed_gradients() {
        let mut rng = Rng::new(7);
        let fd = rand_array(&mut rng, 50, -1.0, 1.0).mapv(f64::from);
        let exact = fd.mapv(|v| v as f32);
        assert!(grad_error(&exact.view(), &fd.view()) < 1e-6);
        let i = (0..50).find(|&i| fd[i].abs() > 0.1).unwrap();
        let mut wrong = exact.clone();
        wrong[i] *= 1.005;
        assert!(grad_error(&wrong.view(), &fd.view()) > GRAD_RTOL);
        let mut dropped = exact.clone();
        dropped[i] = 0.0;
        assert!(grad_error(&dropped.view(), &fd.view()) > GRAD_RTOL);
    }
}
