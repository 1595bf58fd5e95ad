//! The `elrt` command line's clap definitions, in the library so that tests and the fuzz
//! targets (fuzz/) parse argument vectors exactly as the binary does; src/main.rs runs them.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "elrt",
    args_override_self = true,
    version,
    about = "Compact CNNs by low-rank training (ELRT): ONNX in, compact ONNX out"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Per-layer output shapes, parameters and MACs of an ONNX model, with totals.
    Inspect {
        /// The ONNX file.
        file: PathBuf,
        /// Concrete input shape, e.g. 1,3,32,32 (repeat for several inputs). Default: the
        /// file's shape with a symbolic batch set to 1.
        #[arg(long = "input-shape", value_name = "N,C,H,W")]
        input_shape: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// A second model (e.g. the factorized conversion) to show side by side, per source
        /// layer and in total.
        #[arg(long, value_name = "FILE")]
        compare: Option<PathBuf>,
    },
    /// Train a model (any supported architecture) on CIFAR, an image folder or synthetic data.
    Train(crate::cli_train::TrainArgs),
    /// Top-1 / top-5 accuracy of a model on a data set's test split.
    Eval(crate::cli_train::EvalArgs),
    /// Rewrite every eligible conv into Tucker-2 or CP form with fresh or decomposed factors.
    Convert(crate::cli_convert::ConvertArgs),
    /// The main job: convert -> train from random factors -> export -> validate -> bench ->
    /// report, in one run folder (resumable).
    Compress(crate::cli_compress::CompressArgs),
    /// Write a deployment ONNX file (BN folded, fastest forms, fixed shapes) checked in tract.
    Export(crate::cli_export::ExportArgs),
    /// Latency of ONNX files in tract, interleaved: p50/p90/p99, throughput, params, MACs.
    Bench(crate::cli_export::BenchArgs),
    /// Training-step throughput (img/s) and peak memory on random data, optionally per op.
    Speed(crate::cli_train::SpeedArgs),
}

/// The CLI, with every flag that takes a value accepting one that starts with '-': `--lr -0.1`
/// then reaches the flag's own check ("--lr must be a positive number, got -0.1") instead of
/// clap's "unexpected argument '-0' found".
pub fn command() -> clap::Command {
    Cli::command().mut_subcommands(|sub| {
        sub.mut_args(|a| {
            if a.get_action().takes_values() && !a.is_positional() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
    })
}

/// Parses an argument vector (program name first) as the binary does; clap's error, on a bad
/// one, prints as clap's usage error (`e.exit()`).
pub fn try_parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::from_arg_matches(&command().try_get_matches_from(args)?)
}
