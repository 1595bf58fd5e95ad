//! Training-mode BatchNormalization (forward, then backward through the batch statistics) on
//! MobileNet / EfficientNet activation shapes at batch 64 (96 channels on 32x32, 96 on 4x4,
//! 576 and 1152 on 2x2), at 1 and 2 threads as a training step runs them (the allocator tuned,
//! the other worker kept awake): `cargo run --release --example bn_probe
//! [none|relu|clip|hs|silu]` (the fused activation, default SiLU) prints, per shape and thread
//! count, the fastest of 40 calls in ms and the other thread's idle ms in that call. Unlike
//! `benches/bn_relu.rs` (criterion, no allocator tuning) it times a call as a step makes it:
//! fresh output buffers from the tuned heap, `dy` handed over by value. Session 28's batch-norm
//! numbers in docs/results.md.

use elrt::engine::ops::{BatchNorm2d, BnAct};
use elrt::rng::Rng;
use ndarray::{Array1, Array4};
use std::time::Instant;
fn main() {
    elrt::engine::tune_allocator();
    let act = match std::env::args().nth(1).as_deref() {
        Some("hs") => BnAct::HardSwish,
        Some("none") => BnAct::None,
        Some("clip") => BnAct::Clip { min: 0.0, max: 6.0 },
        Some("relu") => BnAct::Relu,
        _ => BnAct::Silu,
    };
    let bn = BatchNorm2d {
        act,
        ..BatchNorm2d::default()
    };
    for (ch, s) in [(96usize, 32usize), (96, 4), (576, 2), (1152, 2)] {
        let shape = [64, ch, s, s];
        let mut rng = Rng::new(3);
        let x = Array4::from_shape_fn(shape, |_| -1.0 + 4.0 * rng.uniform());
        let dy = Array4::from_shape_fn(shape, |_| -1.0 + 2.0 * rng.uniform());
        let scale = Array1::from_shape_fn(ch, |_| 0.5 + rng.uniform());
        let bias = Array1::from_shape_fn(ch, |_| rng.uniform() - 0.5);
        let mut line = format!("{ch}x{s}x{s}:");
        for t in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            let (fwd, bwd) = pool.install(|| {
                elrt::engine::awake::keep_awake(|| {
                    let (mut rm, mut rv) = (Array1::<f32>::zeros(ch), Array1::<f32>::ones(ch));
                    let (mut fwd, mut bwd) = (Best::default(), Best::default());
                    for _ in 0..40 {
                        let (y, saved) = fwd.time(|| {
                            bn.forward_train(
                                x.view(),
                                scale.view(),
                                bias.view(),
                                rm.view_mut(),
                                rv.view_mut(),
                            )
                            .unwrap()
                        });
                        std::hint::black_box(&y);
                        let d = dy.clone();
                        let g = bwd.time(|| {
                            bn.backward_train_synced(x.view(), scale.view(), &saved, d, None)
                                .unwrap()
                        });
                        std::hint::black_box(&g);
                    }
                    (fwd, bwd)
                })
            });
            line += &format!(
                "  {t}T fwd {:.3} ms (idle {:.3}) bwd {:.3} ms (idle {:.3})",
                fwd.ms, fwd.idle_ms, bwd.ms, bwd.idle_ms
            );
        }
        println!("{line}");
    }
}

/// The fastest call so far and the other thread's idle time in it, ms.
struct Best {
    ms: f64,
    idle_ms: f64,
}

impl Default for Best {
    fn default() -> Self {
        Best {
            ms: f64::INFINITY,
            idle_ms: 0.0,
        }
    }
}

impl Best {
    /// Runs `f`, keeping its time and idle time if it is the fastest call so far.
    fn time<R>(&mut self, f: impl FnOnce() -> R) -> R {
        let (i0, t0) = (elrt::engine::awake::idle_time(), Instant::now());
        let r = f();
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if ms < self.ms {
            self.ms = ms;
            self.idle_ms = elrt::engine::awake::idle_time()
                .saturating_sub(i0)
                .as_secs_f64()
                * 1e3;
        }
        r
    }
}
