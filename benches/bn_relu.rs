//! The memory-bound ops of a training step: BatchNormalization (training mode, forward and
//! backward through the batch statistics) and ReLU (forward and backward) on a ResNet-20
//! stage-1 activation, 128x16x32x32, at 1 and 2 threads; and BatchNormalization with its fused
//! Clip (ReLU6) on three MobileNet-V2 activations at 64x64 input, batch 64 (expansion 96 on
//! 32x32, 144 on 16x16, 384 on 4x4): planes from 1024 values down to 16.
//!
//!     cargo bench --bench bn_relu [-- FILTER]
//!
//! (Was an ignored unit test in src/engine/ops/batchnorm.rs that only printed these times.)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use elrt::engine::ops::{Activation, BatchNorm2d, BnAct};
use elrt::rng::Rng;
use ndarray::{Array1, Array4};

fn bn_relu(c: &mut Criterion) {
    let shape = [128, 16, 32, 32];
    let mut rng = Rng::new(9);
    // An offset mean and non-unit spread, as real activations have.
    let x = Array4::from_shape_fn(shape, |_| -1.0 + 4.0 * rng.uniform());
    let dy = Array4::from_shape_fn(shape, |_| -1.0 + 2.0 * rng.uniform());
    let scale = Array1::from_shape_fn(16, |_| 0.5 + rng.uniform());
    let bias = Array1::from_shape_fn(16, |_| rng.uniform() - 0.5);
    let bn = BatchNorm2d::default();
    let stats = || (Array1::<f32>::zeros(16), Array1::<f32>::ones(16));
    let (mut rm, mut rv) = stats();
    let (_, saved) = bn
        .forward_train(
            x.view(),
            scale.view(),
            bias.view(),
            rm.view_mut(),
            rv.view_mut(),
        )
        .expect("forward");
    let (xd, dyd) = (x.clone().into_dyn(), dy.clone().into_dyn());
    let mut g = c.benchmark_group("bn_relu_128x16x32x32");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(x.len() as u64));
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        g.bench_function(format!("bn_train_forward_{threads}t"), |b| {
            b.iter(|| {
                let (mut rm, mut rv) = stats();
                pool.install(|| {
                    black_box(
                        bn.forward_train(
                            x.view(),
                            scale.view(),
                            bias.view(),
                            rm.view_mut(),
                            rv.view_mut(),
                        )
                        .expect("forward"),
                    )
                })
            })
        });
        g.bench_function(format!("bn_train_backward_{threads}t"), |b| {
            b.iter(|| {
                pool.install(|| {
                    black_box(
                        bn.backward_train(x.view(), scale.view(), &saved, dy.view())
                            .expect("backward"),
                    )
                })
            })
        });
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
        let shape = [64, ch, s, s];
        let mut rng = Rng::new(11);
        let x = Array4::from_shape_fn(shape, |_| -1.0 + 4.0 * rng.uniform());
        let dy = Array4::from_shape_fn(shape, |_| -1.0 + 2.0 * rng.uniform());
        let scale = Array1::from_shape_fn(ch, |_| 0.5 + rng.uniform());
        let bias = Array1::from_shape_fn(ch, |_| rng.uniform() - 0.5);
        let stats = || (Array1::<f32>::zeros(ch), Array1::<f32>::ones(ch));
        let (mut rm, mut rv) = stats();
        let (_, saved) = bn
            .forward_train(
                x.view(),
                scale.view(),
                bias.view(),
                rm.view_mut(),
                rv.view_mut(),
            )
            .expect("forward");
        g.throughput(Throughput::Elements(x.len() as u64));
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            g.bench_function(format!("{ch}x{s}x{s}_forward_{threads}t"), |b| {
                b.iter(|| {
                    let (mut rm, mut rv) = stats();
                    pool.install(|| {
                        black_box(
                            bn.forward_train(
                                x.view(),
                                scale.view(),
                                bias.view(),
                                rm.view_mut(),
                                rv.view_mut(),
                            )
                            .expect("forward"),
                        )
                    })
                })
            });
            g.bench_function(format!("{ch}x{s}x{s}_backward_{threads}t"), |b| {
                b.iter(|| {
                    pool.install(|| {
                        black_box(
                            bn.backward_train(x.view(), scale.view(), &saved, dy.view())
                                .expect("backward"),
                        )
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bn_relu, bn_clip);
criterion_main!(benches);
