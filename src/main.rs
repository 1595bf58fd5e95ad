//! The `elrt` command line: each subcommand is a thin call into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "elrt",
    args_override_self = true,
    version,
    about = "Compact CNNs by low-rank training (ELRT): ONNX in, compact ONNX out"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    Train(elrt::cli_train::TrainArgs),
    /// Top-1 / top-5 accuracy of a model on a data set's test split.
    Eval(elrt::cli_train::EvalArgs),
    /// Rewrite every eligible conv into Tucker-2 or CP form with fresh or decomposed factors.
    Convert(elrt::cli_convert::ConvertArgs),
    /// The main job: convert -> train from random factors -> export -> validate -> bench ->
    /// report, in one run folder (resumable).
    Compress(elrt::cli_compress::CompressArgs),
    /// Write a deployment ONNX file (BN folded, fastest forms, fixed shapes) checked in tract.
    Export(elrt::cli_export::ExportArgs),
    /// Latency of ONNX files in tract, interleaved: p50/p90/p99, throughput, params, MACs.
    Bench(elrt::cli_export::BenchArgs),
    /// Training-step throughput (img/s) and peak memory on random data, optionally per op.
    Speed(elrt::cli_train::SpeedArgs),
}

fn run(cli: Cli) -> Result<()> {
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
        }
        Cmd::Train(a) => elrt::cli_train::train(a)?,
        Cmd::Eval(a) => elrt::cli_train::eval(a)?,
        Cmd::Speed(a) => elrt::cli_train::speed(a)?,
        Cmd::Compress(a) => elrt::cli_compress::compress(a)?,
        Cmd::Export(a) => elrt::cli_export::export_cmd(a)?,
        Cmd::Bench(a) => elrt::cli_export::bench_cmd(a)?,
        Cmd::Convert(a) => {
            let json = a.json;
            let r = elrt::cli_convert::run(a)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", r.to_text());
            }
        }
    }
    Ok(())
}

/// The CLI, with every flag that takes a value accepting one that starts with '-': `--lr -0.1`
/// then reaches the flag's own check ("--lr must be a positive number, got -0.1") instead of
/// clap's "unexpected argument '-0' found".
fn command() -> clap::Command {
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

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly on a closed pipe, as Unix tools do,
    // instead of panicking on the next print.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    elrt::engine::tune_allocator();
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
