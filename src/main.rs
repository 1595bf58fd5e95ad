//! The `elrt` command line: clap's definitions in src/cli/ turn each subcommand's flags into a
//! stage of the library's pipeline (`elrt::pipeline`) and print its report.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly on a closed pipe, as Unix tools do,
    // instead of panicking on the next print.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    elrt::engine::tune_allocator();
    let cli = match cli::try_parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
