//! The `elrt` command line: clap's definitions, one file per subcommand, each turning its flags
//! into the options of a [`elrt::pipeline`] stage and printing the stage's report. Part of the
//! binary (src/main.rs declares it), not of the library; tests/fuzzing/mod.rs and the fuzz
//! targets include this file by path, so that they parse argument vectors exactly as the
//! binary does.

mod bench;
mod compress;
mod convert;
mod eval;
mod export;
mod speed;
mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub use bench::BenchArgs;
pub use compress::CompressArgs;
pub use convert::ConvertArgs;
pub use eval::EvalArgs;
pub use export::ExportArgs;
pub use speed::SpeedArgs;
pub use train::TrainArgs;

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
    Train(TrainArgs),
    /// Top-1 / top-5 accuracy of a model on a data set's test split.
    Eval(EvalArgs),
    /// Rewrite every eligible conv into Tucker-2 or CP form with fresh or decomposed factors.
    Convert(ConvertArgs),
    /// The main job: convert -> train from random factors -> export -> validate -> bench ->
    /// report, in one run folder (resumable).
    Compress(CompressArgs),
    /// Write a deployment ONNX file (BN folded, fastest forms, fixed shapes) checked in tract.
    Export(ExportArgs),
    /// Latency of ONNX files in tract, interleaved: p50/p90/p99, throughput, params, MACs.
    Bench(BenchArgs),
    /// Training-step throughput (img/s) and peak memory on random data, optionally per op.
    Speed(SpeedArgs),
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

/// Runs a parsed command line: each subcommand's flags become a pipeline stage's options, and
/// the stage's report is printed (text, or JSON with `--json`).
pub fn run(cli: Cli) -> Result<()> {
    // Under mpirun only training is shared out; any other command would run N times over.
    if elrt::dist::world().is_some_and(|w| w.size() > 1)
        && !matches!(cli.cmd, Cmd::Train(_) | Cmd::Compress(_))
    {
        anyhow::bail!(elrt::dist::OnEveryRank(
            "under mpirun only `elrt train` and `elrt compress` run (data-parallel); run this \
             command without mpirun"
                .into()
        ));
    }
    match cli.cmd {
        Cmd::Inspect {
            file,
            input_shape,
            json,
            compare,
        } => {
            let shapes = input_shape
                .iter()
                .map(|s| elrt::inspect::parse_shape(s))
                .collect::<Result<Vec<_>>>()?;
            if let Some(other) = compare {
                let c = elrt::inspect::compare(&file, &other, &shapes)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&c)?);
                } else {
                    print!("{}", c.to_text());
                }
                return Ok(());
            }
            let report = elrt::inspect::inspect(&file, &shapes)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Cmd::Train(a) => a.run(),
        Cmd::Eval(a) => a.run(),
        Cmd::Speed(a) => a.run(),
        Cmd::Compress(a) => a.run(),
        Cmd::Export(a) => a.run(),
        Cmd::Bench(a) => a.run(),
        Cmd::Convert(a) => a.run(),
    }
}
