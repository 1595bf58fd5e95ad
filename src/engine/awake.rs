//! Keeps the compute threads awake for the length of a training step.
//!
//! A step is a few hundred parallel loops (one or more per op, forward and backward) separated by
//! short serial stretches on the calling thread: output allocation, per-channel coefficients,
//! partial-sum merges. A rayon worker that finds no work spins for a few dozen `sched_yield`
//! rounds (some tens of microseconds) and then sleeps on a futex; the next parallel loop must
//! wake it. In the microVMs this project runs on, a sleeping vCPU's wake-up costs tens of
//! microseconds more (a rayon microbenchmark: a 130 us two-way loop after a 200 us serial stretch
//! took 120 us at two threads, no faster than one). OpenMP runtimes (PyTorch's) spin far longer
//! before sleeping for the same reason. In whole training steps the gain is smaller, since most
//! serial stretches are shorter than rayon's own spinning: alternating steps in one process
//! (2 threads, AVX2 EPYC), MobileNet-V3-Small 2-3% faster, EfficientNet-B0 2-9%, ResNet-20 and
//! ResNet-18 Tucker-2 within the +-4% noise.
//!
//! [`keep_awake`] runs a closure while every other worker of the current pool runs a spinner: a
//! job that keeps taking rayon work ([`rayon::yield_now`] steals from the other workers' queues)
//! until the closure returns. The work done and its order are rayon's as before; only the idle
//! workers' waiting changes, so results are the same bits (the kernels' sums are fixed by
//! [`super::ops::part_len`], not by which thread runs a part).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

thread_local! {
    /// This thread is running a spinner, or the closure of [`keep_awake`] (whose thread must
    /// never run a spinner: it would spin inside the closure's own stack until the closure,
    /// which is suspended under it, returned).
    static OCCUPIED: Cell<bool> = const { Cell::new(false) };
}

/// `spin_loop` hints (x86 PAUSE, 10-140 cycles by CPU) between a spinner's looks for work: a
/// look reads the other workers' queues, whose cache lines the thread pushing jobs writes, so
/// looking without pause would slow that thread down.
const PAUSES_PER_LOOK: u32 = 16;

/// Looks for work between OS yields in a spinner (some tens of microseconds), so that a
/// data-loading thread sharing the core still gets scheduled.
const LOOKS_PER_YIELD: u32 = 64;

/// Runs `f` with the current rayon pool's other workers spinning instead of sleeping until it
/// returns (see the module doc). Nested calls, and calls outside a pool of two or more threads,
/// just run `f`.
pub fn keep_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if !enabled() {
        return f();
    }
    keep_awake_counted(|_| f())
}

/// [`keep_awake`], the closure given the count of spinners running (for the tests).
fn keep_awake_counted<R: Send>(f: impl FnOnce(&AtomicUsize) -> R + Send) -> R {
    let spinning = AtomicUsize::new(0);
    if rayon::current_num_threads() < 2
        || OCCUPIED.with(Cell::get)
        || rayon::current_thread_index().is_none()
    {
        return f(&spinning);
    }
    let stop = AtomicBool::new(false);
    let mut out = None;
    rayon::scope(|s| {
        // One job per worker, each in that worker's own queue (a spawned job could be taken by
        // another spinner, which would then run it as a no-op and leave a worker sleeping); the
        // closure's own thread finds it set occupied and returns at once.
        let (stop, spinning) = (&stop, &spinning);
        s.spawn_broadcast(move |_, _| spin(stop, spinning));
        OCCUPIED.with(|o| o.set(true));
        // Stops the spinners and frees the thread on unwind too: a panic inside `f` must not
        // leave the scope waiting for spinners that never stop.
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                OCCUPIED.with(|o| o.set(false));
                self.0.store(true, Ordering::Release);
            }
        }
        let _done = Done(stop);
        out = Some(f(spinning));
    });
    out.expect("the scope ran the closure")
}

/// `ELRT_KEEP_AWAKE=0` turns [`keep_awake`] off: the workers then sleep between parallel loops
/// as rayon has them do, for hosts whose cores are shared with other busy processes (several MPI
/// ranks per node with threads each), where a spinner takes time from them.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    match FORCE.load(Ordering::Relaxed) {
        1 => false,
        2 => true,
        _ => *ON.get_or_init(|| std::env::var("ELRT_KEEP_AWAKE").map_or(true, |v| v != "0")),
    }
}

/// [`set_keep_awake`]'s setting: 0 none, 1 off, 2 on.
static FORCE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Turns [`keep_awake`] off (`Some(false)`) or on (`Some(true)`) whatever `ELRT_KEEP_AWAKE`
/// says, or back to it (`None`); for benchmarks that compare the two in one process.
pub fn set_keep_awake(mode: Option<bool>) {
    FORCE.store(
        match mode {
            None => 0,
            Some(false) => 1,
            Some(true) => 2,
        },
        Ordering::Relaxed,
    );
}

/// A spinner: takes rayon jobs until `stop`. Returns at once on a thread already occupied (the
/// closure's own, or one whose spinner picked up this one while taking jobs). The stretches in
/// which it finds no work are counted ([`idle_time`]).
fn spin(stop: &AtomicBool, spinning: &AtomicUsize) {
    if OCCUPIED.with(|o| o.replace(true)) {
        return;
    }
    spinning.fetch_add(1, Ordering::SeqCst);
    let counter = rayon::current_thread_index()
        .and_then(|i| IDLE_NS.get(i))
        .unwrap_or(&IDLE_NS[IDLE_NS.len() - 1]);
    let mut idle = 0u32;
    // The time up to which this stretch without work is counted (ns on [`clock_ns`]), 0 while
    // working.
    let mut counted = 0u64;
    while !stop.load(Ordering::Acquire) {
        // Each look first counts the time since the last one, if that last one found nothing:
        // the look that then executes a job has counted up to its own start, and the job's
        // time is never counted, however long it runs.
        let now = clock_ns();
        if counted != 0 {
            counter.fetch_add(now - counted, Ordering::Relaxed);
        }
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {
                idle = 0;
                counted = 0;
            }
            _ => {
                counted = now;
                idle += 1;
                if idle.is_multiple_of(LOOKS_PER_YIELD) {
                    std::thread::yield_now();
                } else {
                    (0..PAUSES_PER_LOOK).for_each(|_| std::hint::spin_loop());
                }
            }
        }
    }
    if counted != 0 {
        counter.fetch_add(clock_ns() - counted, Ordering::Relaxed);
    }
    spinning.fetch_sub(1, Ordering::SeqCst);
    OCCUPIED.with(|o| o.set(false));
}

/// Idle time, ns, per worker by rayon index (the last one shared by the workers past it),
/// added to look by look: one counter per worker keeps the additions off each other's cache
/// lines, and counters that only grow make readings that never decrease.
static IDLE_NS: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];

/// Nanoseconds since the first call (at least 1, so that 0 can mean "not idle").
fn clock_ns() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
        + 1
}

/// The time the spinners have spent finding no work since the process started, summed over
/// the workers, up to each one's latest look (a few microseconds at most behind): the compute
/// threads' idle time inside training steps, less the calling thread's own waits. Readings
/// never decrease. The difference of two readings, over the wall time between them times the
/// other workers' count, is the share of their time that a stretch of the step left them idle
/// (`elrt speed --profile` reports it per op).
pub fn idle_time() -> std::time::Duration {
    std::time::Duration::from_nanos(IDLE_NS.iter().map(|c| c.load(Ordering::Relaxed)).sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    /// While the closure runs, each other worker of a 3-thread pool runs a spinner (that they
    /// stop when it returns is `returns_with_every_spinner_stopped`).
    #[test]
    fn the_other_workers_spin_while_the_closure_runs() {
        let p = pool(3);
        let seen = p.install(|| {
            keep_awake_counted(|spinning| {
                let t = std::time::Instant::now();
                while spinning.load(Ordering::SeqCst) < 2 && t.elapsed().as_secs() < 10 {
                    std::thread::yield_now();
                }
                spinning.load(Ordering::SeqCst)
            })
        });
        assert_eq!(seen, 2);
    }

    /// The closure's parallel loops run and give what they give without it, nested calls
    /// included, at one to four threads.
    #[test]
    fn parallel_work_inside_gives_the_same_result() {
        let want: Vec<u64> = (0..10_000u64).map(|i| i * i % 7919).collect();
        for threads in 1..=4 {
            let got = pool(threads).install(|| {
                keep_awake(|| {
                    let mut v = vec![0u64; 10_000];
                    for _ in 0..50 {
                        v.par_iter_mut()
                            .enumerate()
                            .for_each(|(i, x)| *x = (i as u64) * (i as u64) % 7919);
                        v = keep_awake(|| v.clone());
                    }
                    v
                })
            });
            assert_eq!(got, want, "{threads} threads");
        }
    }

    /// Every spinner has stopped when it returns: the pool's workers take new work at once
    /// (a second call, a plain parallel loop) instead of spinning forever.
    #[test]
    fn returns_with_every_spinner_stopped() {
        let p = pool(3);
        for _ in 0..20 {
            let s: u64 = p.install(|| keep_awake(|| (0..1000u64).into_par_iter().sum()));
            assert_eq!(s, 499_500);
        }
        let s: u64 = p.install(|| (0..1000u64).into_par_iter().sum());
        assert_eq!(s, 499_500);
    }

    /// A serial stretch inside the closure counts as the other worker's idle time, about its
    /// length (never more than the wall time it spans), and readings never go down. The
    /// counter is process-wide, so other tests' spinners may add to it: only bounds that hold
    /// whatever they add are checked from below, and the upper bound uses this test's own
    /// 2-thread pool plus the slack of every other test's pool (at most 4 threads).
    #[test]
    fn a_serial_stretch_counts_as_the_other_workers_idle_time() {
        let p = pool(2);
        let (idle, wall) = p.install(|| {
            let (t0, i0) = (std::time::Instant::now(), idle_time());
            keep_awake(|| std::thread::sleep(std::time::Duration::from_millis(200)));
            (idle_time().saturating_sub(i0), t0.elapsed())
        });
        assert!(idle >= std::time::Duration::from_millis(150), "{idle:?}");
        assert!(idle <= wall * 8, "{idle:?} over {wall:?}");
        let mut last = idle_time();
        for _ in 0..1000 {
            let now = idle_time();
            assert!(now >= last, "{now:?} < {last:?}");
            last = now;
        }
    }

    /// Readings taken while a spinner runs jobs never decrease: a job's time is not counted
    /// as idle while it runs and then taken back. Serial stretches (the spinner idle) alternate
    /// with two-way joins whose second half the spinner runs for 10 ms, while a thread outside
    /// the pool reads the counter continuously.
    #[test]
    fn readings_taken_while_a_spinner_runs_a_job_never_decrease() {
        let stop = AtomicBool::new(false);
        let drops = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                let (mut last, mut drops) = (idle_time(), 0);
                while !stop.load(Ordering::Acquire) {
                    let now = idle_time();
                    drops += usize::from(now < last);
                    last = now;
                }
                drops
            });
            let nap = |ms| std::thread::sleep(std::time::Duration::from_millis(ms));
            pool(2).install(|| {
                keep_awake(|| {
                    for _ in 0..10 {
                        nap(5);
                        rayon::join(|| nap(10), || nap(10));
                    }
                })
            });
            stop.store(true, Ordering::Release);
            sampler.join().unwrap()
        });
        assert_eq!(drops, 0);
    }

    /// A panic inside the closure reaches the caller and leaves the thread usable.
    #[test]
    fn a_panic_inside_propagates() {
        let p = pool(2);
        let r = p.install(|| std::panic::catch_unwind(|| keep_awake(|| panic!("inside"))));
        assert!(r.is_err());
        let s: u64 = p.install(|| keep_awake(|| (0..10u64).into_par_iter().sum()));
        assert_eq!(s, 45);
    }
}
