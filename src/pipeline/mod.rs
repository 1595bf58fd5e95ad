//! The pipeline: one entry function per stage, each taking typed options whose `Default` is
//! the command line's, and returning the report the command prints (text via `to_text`, JSON
//! via `serde`). The `elrt` binary's clap definitions (src/cli/) only turn flags into these
//! options; tests and benches call the same functions.
//!

pub mod bench;
pub mod export;

pub use bench::{bench, BenchOptions};
pub use export::{export, ExportOptions, ExportSummary};
