//! MaxPool forward and backward on ResNet-18's stem at 64x64 input (3x3, stride 2, pad 1 over
//! a 32x32 plane, 64 channels, batch 64), beside the naive `MaxPool2d::reference`, at 1 thread.
//!
//!     cargo bench --bench pool [-- FILTER]
//!
//! Measured 2026-12-02 (2-core AMD EPYC, load ~3.7, same session): the forward went from 36.3 ms
//! (window by window, a running (value, index) pair: a chain of dependent, mispredicted
//! compare-and-branches per output) to 25.6 ms (row at a time, max then first index holding it);
//! the naive reference (values only, no argmax) 15.6 ms; backward 1.4 ms. MaxPool forward was
//! 4-7% of a ResNet-18 training step at 64x64.
//!
//! 2026-12-02, session 5 (same machine kind, allocator tuned as the binary does): 17.8 ms (row
//! at a time, two passes) -> 5.4 ms (the plane split once into padded stride phases, one flat
//! vector loop per tap over the whole plane, running (value, tap) pair by selects, compiled for
//! AVX2), then 4.0 ms with the layout's -inf padding written once per scratch buffer instead
//! of per plane; the naive reference 11.6-12.2 ms. In the training step of resnet18_tucker2 at
//! 128x128 (batch 64, 1 thread) MaxPool forward went 55 -> 14.5 ms and backward 50 -> 5.3 ms
//! (the backward's gain is the allocator change, whose faults it used to take).
//!
//! 2026-12-04, session 13, on an AVX2-only AMD EPYC (Zen kernels; the figures above were on an
//! AVX-512 host): the forward took 13.8 ms here, half its perf samples on the masked store
//! (`vmaskmovps`) LLVM made of the in-place select, plus per-row divisions in the layout fill
//! and per-plane re-initialisation of the running pairs. Ping-pong buffers (each tap reads one,
//! writes the other), the fill's divisions done once per call and the first tap initialising
//! the pairs: 13.8 -> 8.0 ms (noisy shared machine; the reference moved +14% in the same run).
//! In the training step of resnet18 at 64x64 (batch 64, 1 thread, old/new binaries
//! alternating) MaxPool forward went 12.3 / 14.8 -> 7.3 / 5.8 ms.
//!
//! 2026-12-07, session 34, Intel Xeon (AVX-512): the plane loop also compiled for AVX-512 and
//! the argmax buffer no longer filled before the planes write it (a serial 4 MB fill at
//! batch 64): forward 4.46 -> 4.04 ms here; in resnet18@64 training steps (batch 64, three
//! alternating pairs on a noisy host) MaxPool forward 3.38 / 3.99 / 3.32 -> 2.60 / 3.26 / 2.74
//! ms at 2 threads, 6.36 / 5.80 / 6.66 -> 5.18 / 7.04 / 5.71 at 1.
//!

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use elrt::engine::ops::MaxPool2d;
use elrt::rng::Rng;
use ndarray::Array4;

fn pool(c: &mut Criterion) {
    // As the binary runs: large blocks reused from the heap, not mapped and faulted each call.
    elrt::engine::tune_allocator();
    let shape = [64, 64, 32, 32];
    let mut rng = Rng::new(3);
    let x = Array4::from_shape_fn(shape, |_| rng.uniform() - 0.5);
    let mp = MaxPool2d {
        kernel: [3, 3],
        strides: [2, 2],
        pads: [1; 4],
        dilations: [1, 1],
        ceil_mode: false,
    };
    let (y, saved) = mp.forward(x.view()).expect("forward");
    let dy = y.mapv(|v| v * 0.5);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("thread pool");
    let mut g = c.benchmark_group("maxpool_3x3s2_64x64x32x32");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(x.len() as u64));
    g.bench_function("forward", |b| {
        b.iter(|| pool.install(|| black_box(mp.forward(x.view()).expect("forward"))))
    });
    g.bench_function("backward", |b| {
        b.iter(|| pool.install(|| black_box(mp.backward(&saved, dy.view()).expect("backward"))))
    });
    g.bench_function("reference_forward", |b| {
        b.iter(|| black_box(mp.reference(x.view()).expect("reference")))
    });
    g.finish();
}

criterion_group!(benches, pool);
criterion_main!(benches);
