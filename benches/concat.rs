//! Channel Concat and its backward (Split) on DenseNet-121's widest concat at 64x64 input
//! (denseblock2's last layer: [32, 480, 8, 8] and [32, 32, 8, 8] -> [32, 512, 8, 8]), the block
//! copy of `tensor_ops::concat` / `split` beside ndarray's generic concatenate and slicing (the
//! reference the unit tests hold them to), at 1 and 2 threads.
//!
//!     cargo bench --bench concat [-- FILTER]
//!
//! Measured 2026-12-03 (2-core AMD EPYC with AVX-512, medians): concat 1T 2.68 ms (reference)
//! -> 0.108 ms (blocks), 2T 2.99 -> 0.050; split 1T 2.77 -> 0.108, 2T 3.07 -> 0.063. In whole
//! DenseNet-121 training steps (64x64, batch 32, 2 threads) Concat forward + backward had been
//! 40% of the step (196 of 492 ms).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use elrt::engine::tensor_ops::{concat, split};
use elrt::rng::Rng;
use ndarray::{ArrayD, Axis, IxDyn, Slice};

fn bench(c: &mut Criterion) {
    elrt::engine::tune_allocator();
    let mut rng = Rng::new(5);
    let a = ArrayD::from_shape_fn(IxDyn(&[32, 480, 8, 8]), |_| rng.uniform());
    let b = ArrayD::from_shape_fn(IxDyn(&[32, 32, 8, 8]), |_| rng.uniform());
    let y = concat(1, &[a.view(), b.view()]).expect("concat");
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        let mut g = c.benchmark_group(format!("densenet_concat_512ch_8x8_b32_{threads}t"));
        g.sample_size(30)
            .measurement_time(Duration::from_secs(3))
            .throughput(Throughput::Bytes(4 * y.len() as u64));
        g.bench_function("concat_blocks", |bn| {
            bn.iter(|| pool.install(|| black_box(concat(1, &[a.view(), b.view()]).unwrap())))
        });
        g.bench_function("concat_reference", |bn| {
            bn.iter(|| {
                pool.install(|| {
                    black_box(ndarray::concatenate(Axis(1), &[a.view(), b.view()]).unwrap())
                })
            })
        });
        g.bench_function("split_blocks", |bn| {
            bn.iter(|| pool.install(|| black_box(split(1, &[480, 32], y.view()).unwrap())))
        });
        g.bench_function("split_reference", |bn| {
            bn.iter(|| {
                pool.install(|| {
                    black_box([
                        y.slice_axis(Axis(1), Slice::from(0..480)).to_owned(),
                        y.slice_axis(Axis(1), Slice::from(480..512)).to_owned(),
                    ])
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
