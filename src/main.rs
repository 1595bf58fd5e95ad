//! The `elrt` command line: each subcommand is a thin call into the library.

use std::process::ExitCode;

use anyhow::Result;
use elrt::cli_args::{Cli, Cmd};

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

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly on a closed pipe, as Unix tools do,
    // instead of panicking on the next print.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    elrt::engine::tune_allocator();
    let cli = match elrt::cli_args::try_parse_from(std::env::args_os()) {
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
