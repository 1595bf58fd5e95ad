//! elrt: compact CNNs by low-rank training.
//!
//! One IR flows one way through the stages: [`onnx`] (read/write) -> [`ir`] (graph, shapes,
//! cost) -> low-rank rewrite -> engine (train) -> export -> bench. The modules are layered in
//! that order (`tests/module_layers.rs` holds the order and checks it): [`runtime`] is the
//! tract leaf that export and bench share, and [`tune`] resolves `--ranks latency=F` above
//! export; [`dist`] runs training data-parallel over MPI above [`train`]. [`pipeline`] is the API over them: one entry function per stage (convert, train,
//! eval, speed, export, bench, compress) with typed options; the `elrt` binary (src/main.rs,
//! src/cli/) only turns flags into those options.

// Links OpenBLAS into every binary, test and bench that uses the library; without it ndarray's
// BLAS calls fail to link (undefined `cblas_sgemm`).
extern crate blas_src;

pub mod bench;
pub mod data;
pub mod dist;
pub mod engine;
pub mod export;
pub mod inspect;
pub mod ir;
pub mod lowrank;
pub mod onnx;
pub mod pipeline;
pub mod report;
pub mod rng;
pub mod runtime;
pub mod train;
pub mod tune;
pub mod util;
