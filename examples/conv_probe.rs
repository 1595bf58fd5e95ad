//! Training-mode convolutions (forward, then backward with the input gradient) on the layer
//! shapes where two threads gained least over one, at 1 and 2 threads as a training step runs
//! them (the allocator tuned, the other worker kept awake): `cargo run --release --example
//! conv_probe [batch]` prints, per layer and thread count, the median of 30 calls in ms and
//! the other thread's idle ms in those calls (median too). Medians, not minima: on a shared
//! host the fastest call of many is the one a neighbour left alone, and an uneven split of
//! work between the threads shows in the typical call. Session 29's numbers in
//! docs/results.md.

use elrt::engine::ops::conv::Conv2d;
use elrt::rng::Rng;
use ndarray::Array4;
use std::time::Instant;

fn main() {
    elrt::engine::blas_kernels::reexec_if_generic();
    elrt::engine::tune_allocator();
    elrt::engine::init();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    // (name, ci, co, input side, stride): ResNet-18 Tucker-2's cores at 64x64 input.
    let layers = [
        ("r18t layer3.0 core 72->152 s2 8x8", 72, 152, 8, 2),
        ("r18t layer4.0 core 152->304 s2 4x4", 152, 304, 4, 2),
        ("r18t layer4 core 304->304 2x2", 304, 304, 2, 1),
        ("r18 layer4 512->512 2x2", 512, 512, 2, 1),
    ];
    for (name, ci, co, side, stride) in layers {
        let op = Conv2d {
            group: 1,
            strides: [stride, stride],
            pads: [1; 4],
            dilations: [1, 1],
        };
        let mut rng = Rng::new(3);
        let x = Array4::from_shape_fn([n, ci, side, side], |_| 2.0 * rng.uniform() - 1.0);
        let w = Array4::from_shape_fn([co, ci, 3, 3], |_| 0.2 * rng.uniform() - 0.1);
        let mut line = format!("{name}:");
        for t in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("a thread pool");
            let (fwd, bwd) = pool.install(|| {
                elrt::engine::awake::keep_awake(|| {
                    let (mut fwd, mut bwd) = (Calls::default(), Calls::default());
                    for _ in 0..30 {
                        let y = fwd.time(|| op.forward(x.view(), w.view(), None).expect("forward"));
                        let g = bwd.time(|| {
                            op.backward(x.view(), w.view(), y.view(), true)
                                .expect("backward")
                        });
                        std::hint::black_box(&g);
                    }
                    (fwd, bwd)
                })
            });
            let ((f, fi), (b, bi)) = (fwd.median(), bwd.median());
            line += &format!("  {t}T fwd {f:.3} ms (idle {fi:.3}) bwd {b:.3} ms (idle {bi:.3})");
        }
        println!("{line}");
    }
}

/// Every call's time and the other thread's idle time in it, ms.
#[derive(Default)]
struct Calls {
    ms: Vec<f64>,
    idle_ms: Vec<f64>,
}

impl Calls {
    /// Runs `f`, recording its time and idle time.
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let (i0, t0) = (elrt::engine::awake::idle_time(), Instant::now());
        let r = f();
        self.ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let idle = elrt::engine::awake::idle_time().saturating_sub(i0);
        self.idle_ms.push(idle.as_secs_f64() * 1e3);
        r
    }

    /// The median call time and the median idle time.
    fn median(&self) -> (f64, f64) {
        let mid = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        (mid(&self.ms), mid(&self.idle_ms))
    }
}
