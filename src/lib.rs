//! elrt: compact CNNs by low-rank training.
//!
//! One IR flows one way through the stages: [`onnx`] (read/write) -> [`ir`] (graph, shapes,
//! cost) -> low-rank rewrite -> engine (train) -> export -> bench.

// Links OpenBLAS into every binary, test and bench that uses the library; without it ndarray's
// BLAS calls fail to link (undefined `cblas_sgemm`).
extern crate blas_src;

pub mod bench;
pub mod cli_args;
pub mod cli_compress;
pub mod cli_convert;
pub mod cli_export;
pub mod cli_train;
pub mod data;
pub mod engine;
pub mod export;
pub mod inspect;
pub mod ir;
pub mod lowrank;
pub mod onnx;
pub mod pipeline;
pub mod rng;
pub mod train;
pub mod util;
