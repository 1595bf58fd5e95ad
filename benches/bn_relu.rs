//! The memory-bound ops of a training step: BatchNormalization (training mode, forward and
//! backward through the batch statistics) and ReLU (forward and backward) on a ResNet-20
//! stage-1 activation, 128x16x32x32, at 1 and 2 threads; and BatchNormalization with its fused
//! Clip (ReLU6) on three MobileNet-V2 activations at 64x64 input, batch 64 (expansion 96 on
//! 32x32, 144 on 16x16, 384 on 4x4): planes from 1024 values down to 16; and BatchNormalization
//! with its fused SiLU against the separate ops on three EfficientNet-B0 activations; and a
//! residual block's end, BatchNormalization joined to its Add + ReLU (the program's
//! `BatchNormAdd` step) against the two ops run separately.
//!
//!     cargo bench --bench bn_relu [-- FILTER]
//!
//! (Was an ignored unit test in src/engine/ops/batchnorm.rs that only printed these times.)

use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, Criterion, Throughput,
};
use elrt::engine::ops::{Activation, BatchNorm2d, BatchNormSaved, BnAct};
use elrt::engine::tensor_ops::add_relu_forward;
use elrt::rng::Rng;
use ndarray::{Array1, Array4};
use rayon::ThreadPool;

/// A batch norm with random inputs and the saved statistics of one forward, ready to time.
struct BnCase {
    bn: BatchNorm2d,
    x: Array4<f32>,
    dy: Array4<f32>,
    scale: Array1<f32>,
    bias: Array1<f32>,
    saved: BatchNormSaved,
}

impl BnCase {
    fn new(bn: BatchNorm2d, shape: [usize; 4], seed: u64) -> BnCase {
        let c = shape[1];
        let mut rng = Rng::new(seed);
        // An offset mean and non-unit spread, as real activations have.
        let x = Array4::from_shape_fn(shape, |_| -1.0 + 4.0 * rng.uniform());
        let dy = Array4::from_shape_fn(shape, |_| -1.0 + 2.0 * rng.uniform());
        let scale = Array1::from_shape_fn(c, |_| 0.5 + rng.uniform());
        let bias = Array1::from_shape_fn(c, |_| rng.uniform() - 0.5);
        let (_, saved) = Self::forward(&bn, &x, &scale, &bias);
        BnCase {
            bn,
            x,
            dy,
            scale,
            bias,
            saved,
        }
    }

    /// One training-mode forward, on fresh running statistics.
    fn forward(
        bn: &BatchNorm2d,
        x: &Array4<f32>,
        scale: &Array1<f32>,
        bias: &Array1<f32>,
    ) -> (Array4<f32>, BatchNormSaved) {
        let c = x.shape()[1];
        let (mut rm, mut rv) = (Array1::<f32>::zeros(c), Array1::<f32>::ones(c));
        bn.forward_train(
            x.view(),
            scale.view(),
            bias.view(),
            rm.view_mut(),
            rv.view_mut(),
        )
        .expect("forward")
    }

    /// Registers `{prefix}forward_{threads}t` and `{prefix}backward_{threads}t` on `pool`.
    fn bench(&self, g: &mut BenchmarkGroup<WallTime>, prefix: &str, pool: &ThreadPool) {
        let threads = pool.current_num_threads();
        g.bench_function(format!("{prefix}forward_{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    black_box(Self::forward(&self.bn, &self.x, &self.scale, &self.bias))
                })
            })
        });
        // The engine hands backward its own `dy` and gets `dx` back in that buffer: each
        // iteration gets a fresh copy, made outside the timing.
        g.bench_function(format!("{prefix}backward_{threads}t"), |b| {
            b.iter_batched(
                || self.dy.clone(),
                |dy| {
                    pool.install(|| {
                        black_box(
                            self.bn
                                .backward_train_synced(
                                    self.x.view(),
                                    self.scale.view(),
                                    &self.saved,
                                    dy,
                                    None,
                                )
                                .expect("backward"),
                        )
                    })
                },
                BatchSize::LargeInput,
            )
        });
    }
}

fn pool(threads: usize) -> ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn bn_relu(c: &mut Criterion) {
    let case = BnCase::new(BatchNorm2d::default(), [128, 16, 32, 32], 9);
    let (xd, dyd) = (case.x.clone().into_dyn(), case.dy.clone().into_dyn());
    let mut g = c.benchmark_group("bn_relu_128x16x32x32");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(case.x.len() as u64));
    for threads in [1, 2] {
        let pool = pool(threads);
        case.bench(&mut g, "bn_train_", &pool);
        g.bench_function(format!("relu_forward_{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| black_box(Activation::Relu.forward(xd.view()).expect("relu")))
            })
        });
        g.bench_function(format!("relu_backward_{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    black_box(
                        Activation::Relu
                            .backward(xd.view(), dyd.view())
                            .expect("relu backward"),
                    )
                })
            })
        });
    }
    g.finish();
}

/// Forward and backward of BN + Clip(0, 6) (MobileNet-V2's pair, fused by the program) on
/// `[64, c, s, s]`.
fn bn_clip(c: &mut Criterion) {
    let bn = BatchNorm2d {
        act: BnAct::Clip { min: 0.0, max: 6.0 },
        ..BatchNorm2d::default()
    };
    let mut g = c.benchmark_group("bn_clip_mobilenet_v2");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    for (ch, s) in [(96, 32), (144, 16), (384, 4)] {
        let case = BnCase::new(bn.clone(), [64, ch, s, s], 11);
        g.throughput(Throughput::Elements(case.x.len() as u64));
        for threads in [1, 2] {
            case.bench(&mut g, &format!("{ch}x{s}x{s}_"), &pool(threads));
        }
    }
    g.finish();
}

/// BatchNormalization with its fused SiLU (EfficientNet-B0's pair, fused by the program)
/// against the two ops run separately (BN, then `Activation::Silu`; backward in reverse), on
/// three EfficientNet-B0 activations at 64x64 input, batch 64: planes of 1024, 64 and 4 values.
fn bn_silu(c: &mut Criterion) {
    let fused = BatchNorm2d {
        act: BnAct::Silu,
        ..BatchNorm2d::default()
    };
    let mut g = c.benchmark_group("bn_silu_efficientnet_b0");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let pool = pool(1);
    for (ch, s) in [(96, 32), (240, 8), (1152, 2)] {
        let case = BnCase::new(fused.clone(), [64, ch, s, s], 12);
        g.throughput(Throughput::Elements(case.x.len() as u64));
        case.bench(&mut g, &format!("{ch}x{s}x{s}_fused_"), &pool);
        let plain = BatchNorm2d::default();
        let (t, saved) = BnCase::forward(&plain, &case.x, &case.scale, &case.bias);
        let t = t.into_dyn();
        g.bench_function(format!("{ch}x{s}x{s}_separate_forward_1t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    let (t, _) = BnCase::forward(&plain, &case.x, &case.scale, &case.bias);
                    black_box(Activation::Silu.forward(t.into_dyn().view()).expect("silu"))
                })
            })
        });
        g.bench_function(format!("{ch}x{s}x{s}_separate_backward_1t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    let dt = Activation::Silu
                        .backward(t.view(), case.dy.view().into_dyn())
                        .expect("silu backward")
                        .into_dimensionality()
                        .expect("rank 4");
                    black_box(
                        plain
                            .backward_train_synced(
                                case.x.view(),
                                case.scale.view(),
                                &saved,
                                dt,
                                None,
                            )
                            .expect("backward"),
                    )
                })
            })
        });
    }
    g.finish();
}

/// A residual block's end: BatchNormalization joined to the Add + ReLU after it
/// (`forward_train_add_synced`, one output pass) against BN's forward and then
/// `tensor_ops::add_relu_forward` (the separate ops, the join's reference: the same bits, tested
/// in `residual_join_equals_batch_norm_then_add_bitwise`), on ResNet-20's stage-1 activation
/// (batch 128) and resnet18's 64-channel stage at 64x64 input (batch 64), 1 and 2 threads.
fn bn_add(c: &mut Criterion) {
    let mut g = c.benchmark_group("bn_add_relu");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let bn = BatchNorm2d::default();
    for shape in [[128, 16, 32, 32], [64, 64, 16, 16]] {
        let case = BnCase::new(bn.clone(), shape, 13);
        let r = case.dy.clone();
        let name = format!("{}x{}x{}", shape[1], shape[2], shape[3]);
        g.throughput(Throughput::Elements(case.x.len() as u64));
        for threads in [1, 2] {
            let pool = pool(threads);
            g.bench_function(format!("{name}_joined_forward_{threads}t"), |b| {
                b.iter(|| {
                    pool.install(|| {
                        let c = shape[1];
                        let (mut rm, mut rv) = (Array1::<f32>::zeros(c), Array1::<f32>::ones(c));
                        black_box(
                            bn.forward_train_add_synced(
                                case.x.view(),
                                r.view(),
                                true,
                                case.scale.view(),
                                case.bias.view(),
                                rm.view_mut(),
                                rv.view_mut(),
                                None,
                            )
                            .expect("joined forward"),
                        )
                    })
                })
            });
            g.bench_function(format!("{name}_separate_forward_{threads}t"), |b| {
                b.iter(|| {
                    pool.install(|| {
                        let (y, _) = BnCase::forward(&bn, &case.x, &case.scale, &case.bias);
                        black_box(
                            add_relu_forward(y.view().into_dyn(), r.view().into_dyn())
                                .expect("add relu"),
                        )
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bn_relu, bn_clip, bn_silu, bn_add);
criterion_main!(benches);
