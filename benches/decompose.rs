//! The decompositions `elrt convert` runs per layer, on a random 64x64x3x3 kernel (the largest
//! conv of ResNet-20) at rank 32: truncated HOSVD, HOOI (5 sweeps) and CP-ALS (25 sweeps, SVD
//! initialisation). Their errors are checked by the unit tests in src/lowrank/decompose.rs;
//! this only times them.
//!
//!     cargo bench --bench decompose [-- FILTER]
//!
//! (Was an ignored unit test that only printed these times.)

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
use elrt::lowrank::decompose::{cp_als_with, hooi, hosvd, CpInit};
use elrt::rng::Rng;
use ndarray::Array4;

fn decompose(c: &mut Criterion) {
    let mut rng = Rng::new(123);
    let w = Array4::from_shape_fn([64, 64, 3, 3], |_| rng.normal());
    let mut g = c.benchmark_group("decompose_64x64x3x3_rank32");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.bench_function("hosvd", |b| {
        b.iter(|| black_box(hosvd(w.view(), 32, 32).expect("hosvd")))
    });
    g.bench_function("hooi_5", |b| {
        b.iter(|| black_box(hooi(w.view(), 32, 32, 5, 0.0).expect("hooi")))
    });
    g.bench_function("cp_als_25", |b| {
        b.iter(|| black_box(cp_als_with(w.view(), 32, 25, 0.0, 0, CpInit::Svd).expect("cp")))
    });
    g.finish();
}

criterion_group!(benches, decompose);
// criterion_main!, with the binary's OpenBLAS kernel check first: on a CPU newer than the
// OpenBLAS build the sgemm-backed kernels would otherwise be timed on its generic SSE3 kernels
// (src/engine/blas_kernels.rs).
fn main() {
    elrt::engine::blas_kernels::reexec_if_generic();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
