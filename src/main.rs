//! The `elrt` command line: clap's definitions in src/cli/ turn each subcommand's flags into a
//! stage of the library's pipeline (`elrt::pipeline`) and print its report.

mod cli;

use std::process::ExitCode;

/// mimalloc in place of glibc's malloc: the engine allocates activation-sized buffers (from
/// kilobytes to tens of megabytes) in every op, and small scratch inside parallel tasks. With
/// glibc, a 576-channel 2x2 batch norm's per-task moments (18 KB of scratch each) took as long
/// in total on two threads as on one (each task twice as slow); training steps (`elrt speed`,
/// alternating runs, Intel Xeon AVX-512 host, 1 / 2 threads, img/s): ResNet-20 batch 128
/// 615-628 -> 691-695 / 1165-1186 -> 1355-1364, resnet18@64 234 -> 250 / 442 -> 481,
/// mobilenet_v2 309 -> 333 / 595 -> 628, efficientnet_b0 232 -> 242 / 411 -> 440,
/// mobilenet_v3_small 1440 -> 1458-1522 / 2382-2392 -> 2567-2594. Peak RSS grows (ResNet-20
/// 250 -> 322-351 MiB, efficientnet_b0 437 -> 603), still under half of PyTorch's for the
/// same step. glibc's tunables did not get there: a high trim and mmap threshold made ResNet-20
/// 6-8% slower (the large buffers then came zeroed by memset).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Output piped into `head` and the like: end quietly on a closed pipe, as Unix tools do,
    // instead of panicking on the next print.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A cap on the instruction set that does not parse is refused before anything runs.
    if let Err(e) = elrt::engine::isa::check_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
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
