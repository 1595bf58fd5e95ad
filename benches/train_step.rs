//! One training step of ResNet-20 (models/resnet20.onnx) at batch 32: forward in training mode,
//! softmax cross-entropy, backward (no optimiser update), on a fixed random batch, through the
//! library's one training step (`elrt::train::step::TrainStep::gradients`). The same work as `elrt speed` and scripts/bench_train.py time at batch 128.
//!
//!     cargo bench --bench train_step
//!
//! Threads: ELRT_BENCH_THREADS (default: every available core); the engine runs rayon over the
//! batch with single-threaded OpenBLAS. Criterion reports the time per step and the throughput
//! in images per second ("elem/s"). A small flat sample keeps the run to about a minute. With
//! two or more threads a second case runs the step with the idle workers sleeping between
//! parallel loops (`engine::awake` off).

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use elrt::engine::model::Model;
use elrt::train::step::TrainStep;
use ndarray::{ArrayD, IxDyn};

const BATCH: usize = 32;

fn train_step(c: &mut Criterion) {
    // As the binary does, so the bench measures what `elrt train` runs.
    elrt::engine::tune_allocator();
    let threads = std::env::var("ELRT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok());
    // The bench process is all one measurement: one global pool of the asked size.
    let threads = elrt::engine::thread_count(threads).expect("thread count");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    elrt::engine::init();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/resnet20.onnx");
    let mut m = Model::load(&path, BATCH).expect("load models/resnet20.onnx");
    let mut r = elrt::rng::Rng::new(1);
    let x = ArrayD::from_shape_fn(IxDyn(&m.input_shape), |_| r.normal());
    let labels: Vec<usize> = (0..BATCH).map(|i| i % m.classes).collect();
    // The training step of `elrt train` (train::step) without the optimiser's update.
    let mut train_step = TrainStep::new(&m.session.program, 0.0, 0.0);
    let mut step = move || -> f32 {
        train_step
            .gradients(&mut m, x.clone(), &labels)
            .expect("training step")
            .loss
    };
    let loss = elrt::engine::on_pool(&mut step);
    assert!(loss.is_finite(), "loss {loss}");

    let mut g = c.benchmark_group("train_step");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(BATCH as u64));
    g.bench_function(format!("resnet20_b{BATCH}_t{threads}"), |b| {
        // Inside the pool, as `elrt train` runs its steps (see engine::on_pool).
        b.iter(|| black_box(elrt::engine::on_pool(&mut step)))
    });
    if threads > 1 {
        // The same step with idle workers sleeping between parallel loops, as rayon has them
        // do: what `engine::awake` saves.
        elrt::engine::awake::set_keep_awake(Some(false));
        g.bench_function(
            format!("resnet20_b{BATCH}_t{threads}_workers_sleeping"),
            |b| b.iter(|| black_box(elrt::engine::on_pool(&mut step))),
        );
        elrt::engine::awake::set_keep_awake(None);
    }
    g.finish();
}

criterion_group!(benches, train_step);
// criterion_main!, with the binary's OpenBLAS kernel check first: on a CPU newer than the
// OpenBLAS build the sgemm-backed kernels would otherwise be timed on its generic SSE3 kernels
// (src/engine/blas_kernels.rs).
fn main() {
    elrt::engine::blas_kernels::reexec_if_generic();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
