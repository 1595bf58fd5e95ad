//! The pipeline: one entry function per stage, each taking typed options whose `Default` is
//! the command line's, and returning the report the command prints (text via `to_text`, JSON
//! via `serde`). The `elrt` binary's clap definitions (src/cli/) only turn flags into these
//! options; tests and benches call the same functions.
//!
//! - [`convert()`]: an ONNX model -> its low-rank form ([`ConvertOptions`] -> [`ConvertReport`])
//! - [`train()`]: a model trained on a data set ([`TrainOptions`] -> [`TrainReport`])
//! - [`eval()`]: test accuracy of a model ([`EvalOptions`] -> [`EvalReport`])
//! - [`speed()`]: training-step throughput ([`SpeedOptions`] -> [`SpeedReport`])
//! - [`export()`]: a deployment file, validated in tract ([`ExportOptions`] -> [`ExportSummary`])
//! - [`bench()`]: latency in tract ([`BenchOptions`] -> [`crate::bench::BenchReport`])
//! - [`compress()`]: the main job, the stages above in one resumable run folder
//!   ([`CompressOptions`] -> [`CompressReport`])

pub mod bench;
pub mod compress;
pub mod convert;
pub mod eval;
pub mod export;
pub mod speed;
pub mod train;

pub use bench::{bench, BenchOptions};
pub use compress::{compress, CompressOptions, CompressReport, FactorInit};
pub use convert::{convert, ConvertOptions, ConvertReport};
pub use eval::{eval, EvalOptions, EvalReport};
pub use export::{export, ExportOptions, ExportSummary};
pub use speed::{speed, SpeedOptions, SpeedReport};
pub use train::{train, Optim, TrainInit, TrainOptions, TrainReport};

/// The image shape `[C, H, W]` a compiled model takes and the normalisation its inputs get
/// (the flag, else the file's record, else the data's default; [`NormSpec::for_model`]), with
/// the choice's note printed unless `quiet`. Train and eval decide it the same way.
fn model_input_and_normalization(
    model: &crate::engine::model::Model,
    flag: Option<&crate::data::NormSpec>,
    file: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<([usize; 3], crate::data::NormSpec)> {
    let s = &model.input_shape;
    let chw = [s[1], s[2], s[3]];
    let (normalize, note) =
        crate::data::NormSpec::for_model(flag, file, &model.graph.meta.metadata_props, chw[0])?;
    if let Some(n) = note.filter(|_| !quiet) {
        eprintln!("{n}");
    }
    Ok((chw, normalize))
}
