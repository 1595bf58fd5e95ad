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
    // Before anything else: this may replace the process with one that runs OpenBLAS's kernels
    // for this CPU instead of its generic ones.
    elrt::engine::blas_kernels::reexec_if_generic();
    elrt::engine::tune_allocator();
    let cli = match cli::try_parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // Under mpirun: join MPI's world (rank 0 prints and writes, every rank trains).
    let mpi = match elrt::dist::init() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = cli::run(cli);
    let Some(mpi) = mpi else {
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    };
    match result {
        Ok(()) => {
            mpi.finish();
            ExitCode::SUCCESS
        }
        // Met by every rank at the same point: said once, and every rank ends by itself.
        Err(e) if e.chain().any(|c| c.is::<elrt::dist::OnEveryRank>()) => {
            if mpi.rank() == 0 {
                eprintln!("error: {e:#}");
            }
            mpi.finish();
            ExitCode::FAILURE
        }
        // This rank alone: the others may be waiting for it in a collective, so end them all.
        Err(e) => {
            eprintln!("error: MPI rank {} of {}: {e:#}", mpi.rank(), mpi.size());
            mpi.abort(1)
        }
    }
}
