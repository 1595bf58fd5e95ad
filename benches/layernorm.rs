//! ConvNeXt's elementwise and row kernels: LayerNormalization over channels-last rows (fast
//! kernel against the f64 naive loops of `ops::layernorm::naive`) at a stage-1 block's
//! `[32, 16, 16, 96]` and the head's `[32, 2, 2, 768]`, forward and backward; GELU (exact)
//! forward plus backward on the 4x-expanded `[32, 16, 16, 384]`, the kernel against a plain
//! serial loop of the same formulas.
//!
//!     cargo bench --bench layernorm [-- FILTER]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use elrt::engine::ops::layernorm::naive;
use elrt::engine::ops::{Activation, LayerNorm};
use elrt::rng::Rng;
use ndarray::{ArrayD, IxDyn};

fn rand(rng: &mut Rng, shape: &[usize], lo: f32, hi: f32) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| lo + (hi - lo) * rng.uniform())
}

fn layernorm(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    for shape in [[32, 16, 16, 96], [32, 2, 2, 768]] {
        let ch = shape[3];
        let x = rand(&mut rng, &shape, -1.0, 3.0);
        let dy = rand(&mut rng, &shape, -1.0, 1.0);
        let scale = rand(&mut rng, &[ch], 0.5, 1.5);
        let bias = rand(&mut rng, &[ch], -0.5, 0.5);
        let ln = LayerNorm {
            epsilon: 1e-6,
            axis: 3,
        };
        let (_, saved) = ln
            .forward(x.view(), scale.view(), Some(bias.view()))
            .expect("forward");
        let name = format!("layernorm_{}x{}x{}x{}", shape[0], shape[1], shape[2], ch);
        let mut g = c.benchmark_group(name);
        g.sample_size(20)
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Elements(x.len() as u64));
        g.bench_function("forward_fast", |b| {
            b.iter(|| black_box(ln.forward(x.view(), scale.view(), Some(bias.view()))))
        });
        g.bench_function("forward_naive", |b| {
            b.iter(|| {
                black_box(naive::forward(
                    &ln,
                    x.view(),
                    scale.view(),
                    Some(bias.view()),
                ))
            })
        });
        g.bench_function("backward_fast", |b| {
            b.iter(|| black_box(ln.backward(x.view(), scale.view(), &saved, dy.view())))
        });
        g.bench_function("backward_naive", |b| {
            b.iter(|| black_box(naive::backward(&ln, x.view(), scale.view(), dy.view())))
        });
        g.finish();
    }
}

/// The exact GELU and its derivative as a plain loop over the elements (one thread).
fn gelu_naive(x: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let y = x
        .iter()
        .map(|&v| v * 0.5 * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2)))
        .collect();
    let alpha = std::f32::consts::FRAC_2_SQRT_PI * std::f32::consts::FRAC_1_SQRT_2 * 0.5;
    let dx = x
        .iter()
        .zip(dy)
        .map(|(&v, &g)| {
            let cdf = 0.5 * (1.0 + libm::erff(v * std::f32::consts::FRAC_1_SQRT_2));
            g * (cdf + v * libm::expf(-0.5 * v * v) * alpha)
        })
        .collect();
    (y, dx)
}

fn gelu(c: &mut Criterion) {
    let mut rng = Rng::new(4);
    let shape = [32, 16, 16, 384];
    let x = rand(&mut rng, &shape, -4.0, 4.0);
    let dy = rand(&mut rng, &shape, -1.0, 1.0);
    let act = Activation::Gelu { tanh: false };
    let mut g = c.benchmark_group("gelu_32x16x16x384");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(x.len() as u64));
    g.bench_function("fwd_bwd_fast", |b| {
        b.iter(|| {
            black_box(act.forward(x.view()).expect("forward"));
            black_box(act.backward(x.view(), dy.view()).expect("backward"))
        })
    });
    let tanh = Activation::Gelu { tanh: true };
    g.bench_function("fwd_bwd_fast_tanh", |b| {
        b.iter(|| {
            black_box(tanh.forward(x.view()).expect("forward"));
            black_box(tanh.backward(x.view(), dy.view()).expect("backward"))
        })
    });
    let (xs, gs) = (
        x.as_slice().expect("standard"),
        dy.as_slice().expect("standard"),
    );
    g.bench_function("fwd_bwd_naive", |b| {
        b.iter(|| black_box(gelu_naive(xs, gs)))
    });
    g.finish();
}

criterion_group!(benches, layernorm, gelu);
criterion_main!(benches);
