//! CPU training engine.
//!
//! [`ops`] holds the numeric core: one kernel family per file, each over `f32` ndarray tensors in
//! NCHW layout, independent of the IR. [`backend`] is the boundary the executor, the optimiser
//! and DSO call through; [`backend::CpuBackend`] runs these kernels, and a later backend (CUDA)
//! implements the same trait without touching graph, autodiff or training code.
//!
//! Threading model: rayon splits work across the batch (or across channels / planes), and every
//! BLAS call runs single-threaded inside a rayon worker. OpenBLAS would otherwise start its own
//! pthreads for each sgemm and oversubscribe the cores rayon already uses; [`init`] switches it to
//! one thread. The kernels call [`init`] themselves, so forgetting it costs speed, never
//! correctness.
//! During a forward or backward pass (and a whole training step) the workers that have no work
//! spin instead of sleeping ([`awake`]), so that a step's hundreds of parallel loops do not each
//! wait for a sleeping worker to wake (2-9% of the 2-thread speed of the nets with many small
//! ops).

pub mod awake;
pub mod backend;
pub mod blas_kernels;
pub mod exec;
pub mod isa;
pub mod model;
pub mod ops;
pub mod program;
pub mod stat_sync;
pub mod tensor_ops;

use std::sync::Once;

/// Why an engine kernel refused its inputs. Every shape or attribute a user's model can get wrong
/// comes back as one of these instead of a panic, so the CLI can name the op and exit cleanly.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    /// Input shapes that the op cannot combine (rank, channel counts, window larger than input).
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    /// An attribute outside the op's domain (zero stride, group not dividing channels, ...).
    #[error("{op}: invalid attribute: {msg}")]
    Attribute { op: &'static str, msg: String },
    /// A class label outside `0..classes`.
    #[error("label {label} of sample {sample} is out of range for {classes} classes")]
    Label {
        sample: usize,
        label: usize,
        classes: usize,
    },
    /// A [`stat_sync::StatSync`] failed to sum batch statistics across processes.
    #[error("{op}: summing batch statistics across processes: {msg}")]
    Sync { op: &'static str, msg: String },
}

/// Result of an engine kernel.
pub type Result<T> = std::result::Result<T, EngineError>;

pub(crate) fn shape_err(op: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::Shape {
        op,
        msg: msg.into(),
    }
}

pub(crate) fn attr_err(op: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::Attribute {
        op,
        msg: msg.into(),
    }
}

extern "C" {
    // Both exist in every OpenBLAS build (pthread and OpenMP variants); libopenblas is linked
    // through `blas_src` in lib.rs.
    fn openblas_set_num_threads(num_threads: std::os::raw::c_int);
    fn openblas_get_num_threads() -> std::os::raw::c_int;
    fn openblas_get_corename() -> *const std::os::raw::c_char;
}

/// The kernel set OpenBLAS chose for this CPU (e.g. "Cooperlake", "Haswell"), and whether the
/// user's environment pinned it with `OPENBLAS_CORETYPE`.
///
/// Reported by `elrt speed` because it moves training speed more than most code changes: on the
/// AVX-512 machine of the README, single-thread sgemm runs at about 240 GFLOP/s with the
/// Cooperlake kernels OpenBLAS picks by itself and 130 with the Haswell (AVX2) ones that an
/// environment variable can force.
pub fn blas_core() -> (String, bool) {
    // SAFETY: returns a pointer to a static NUL-terminated string (or null in odd builds).
    let name = unsafe {
        let p = openblas_get_corename();
        if p.is_null() {
            "unknown".to_string()
        } else {
            std::ffi::CStr::from_ptr(p)
                .to_string_lossy()
                .trim()
                .to_string()
        }
    };
    // Set by elrt's own restart (blas_kernels) is not a user's pin.
    let pinned =
        std::env::var_os("OPENBLAS_CORETYPE").is_some() && blas_kernels::replaced_pick().is_none();
    (name, pinned)
}

/// How the kernel set in use came to be, for the reports' OpenBLAS line: "" (OpenBLAS's own
/// pick), " (set by OPENBLAS_CORETYPE)", or the set elrt replaced (`replaced`, from
/// [`blas_kernels::replaced_pick`]).
pub fn blas_core_origin(pinned: bool, replaced: Option<&str>) -> String {
    match replaced {
        Some(own) => match isa::cap() {
            Some(cap) => format!(
                " (chosen by elrt within {}={}: OpenBLAS picked {own})",
                isa::VAR,
                cap.name()
            ),
            None => format!(" (chosen by elrt: OpenBLAS took this CPU for {own})"),
        },
        None if pinned => " (set by OPENBLAS_CORETYPE)".to_string(),
        None => String::new(),
    }
}

/// The engine's vector width for the reports' lines: "vectors avx512", with
/// " (ELRT_MAX_ISA=avx2)" when a cap is set ([`isa`]); `speed` passes its report's fields.
pub fn vectors_line(used: &str, cap: Option<&str>) -> String {
    match cap {
        Some(cap) => format!("vectors {used} ({}={cap})", isa::VAR),
        None => format!("vectors {used}"),
    }
}

static INIT: Once = Once::new();

/// Makes OpenBLAS single-threaded, once per process.
///
/// The engine parallelises with rayon at a coarser grain (images of a batch), where the work per
/// task is large and the split is deterministic; a multi-threaded sgemm inside each rayon task
/// would start `cores` more threads per task and slow everything down. Cheap after the first call
/// (one atomic load), which is why every BLAS-using kernel calls it.
pub fn init() {
    INIT.call_once(|| {
        // SAFETY: plain C call with a positive thread count; OpenBLAS documents it as callable at
        // any time from any thread.
        unsafe { openblas_set_num_threads(1) }
    });
}

/// Keeps freed activation buffers in the process instead of handing them back to the kernel.
///
/// A training step allocates and frees every activation and gradient (megabytes each at batch
/// 128). glibc serves such blocks with `mmap` and returns them with `munmap`, or trims the heap
/// after each free, so every step page-faults its whole working set in again: perf showed ~10%
/// of a ResNet-20 step in the kernel's page-fault and unmap paths, plus the zeroing of fresh
/// pages. With blocks up to 32 MiB served from the heap and the heap trimmed only above 1 GiB
/// free, a ResNet-20 step at batch 128 on one thread went from 212-217 to 234-244 img/s (+12%,
/// measured interleaved beside two training runs). Setting `M_MMAP_THRESHOLD` also switches off
/// glibc's own adaptive threshold, which is why the trim threshold alone made it worse (147).
/// One arena for all threads: the steps run on rayon's worker threads ([`on_pool`]), and a
/// worker's own arena gave back its freed activations again and again (4-5x the minor page
/// faults of the main thread's arena, +0.5 s of system time per 16 steps of Tucker-2 ResNet-20).
/// The kernels allocate a few buffers per call, so sharing one arena's lock costs nothing
/// measurable. Blocks over 32 MiB (glibc's ceiling for the mmap threshold) are kept off mmap
/// too (`M_MMAP_MAX` 0): resnet18 at 128x128 and batch 64 has 67 MB activations, which were
/// mapped and page-faulted afresh every step (~100K faults a step, and at two threads the
/// faults contend): 3 interleaved rounds, 1 thread 1751-1933 -> 1651-1758 ms/step, 2 threads
/// 1206-1290 -> 979-1070, peak RSS 853 -> 831 MiB. The binary calls this first thing; a user's `GLIBC_TUNABLES` with malloc settings wins.
/// Does nothing off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("malloc"));
        if !user_set {
            // SAFETY: mallopt only changes allocator parameters; both values are in range
            // (32 MiB is glibc's largest mmap threshold on 64-bit).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_ARENA_MAX, 1);
                libc::mallopt(libc::M_MMAP_MAX, 0);
            }
        }
    }
}

/// Runs `f` on a thread of rayon's pool and returns its result.
///
/// Every kernel splits its work with rayon. Called from a thread outside the pool (the main
/// thread), each parallel loop is handed to the pool while the caller parks on a latch: a wake-up
/// and a context switch per kernel call, a few thousand per training step. perf on a 1-thread
/// Tucker-2 training run showed ~2% of the time in the scheduler's task switch and rayon's
/// latches. Called from inside the pool, the loops start on the calling worker directly. The
/// training loop, `elrt speed` and evaluation run their steps through this.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Name prefix of the compute threads [`with_threads`] starts, so that they can be counted
/// from outside the pool ([`compute_threads_alive`]).
pub const COMPUTE_THREAD_PREFIX: &str = "elrt-compute-";

/// The thread count a `--threads` flag asks for: the number given (at least 1), or all cores.
pub fn thread_count(threads: Option<usize>) -> anyhow::Result<usize> {
    match threads {
        Some(0) => anyhow::bail!("--threads must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// Runs `f` on a private rayon pool of exactly `threads` workers, so that every parallel loop
/// inside (the engine's kernels, data decoding) uses that many threads and no more.
///
/// A process-wide pool is built once and keeps its size: `elrt compress --threads 1` trained on
/// all cores because an earlier stage had built the global pool first. A pool per command (or
/// stage) honours each request. The workers are named [`COMPUTE_THREAD_PREFIX`]`<i>`.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
    init();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("{COMPUTE_THREAD_PREFIX}{i}"))
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start {threads} compute threads: {e}"))?;
    Ok(pool.install(f))
}

/// Compute threads ([`with_threads`]) alive in this process, counted from the operating
/// system's list of its threads (Linux; 0 elsewhere). Reports use it to show the count used,
/// not the count asked for.
pub fn compute_threads_alive() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .is_ok_and(|c| c.starts_with(COMPUTE_THREAD_PREFIX))
        })
        .count()
}

/// OpenBLAS's current thread count, for diagnostics and the test that [`init`] took effect.
pub fn blas_threads() -> usize {
    // SAFETY: a getter with no arguments.
    unsafe { openblas_get_num_threads() as usize }
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_makes_openblas_single_threaded() {
        super::init();
        assert_eq!(super::blas_threads(), 1);
    }

    #[test]
    fn errors_name_the_op() {
        let e = super::shape_err("Conv", "bad");
        assert_eq!(e.to_string(), "Conv: bad");
    }
}
