//! Data-parallel training, independent of how processes talk: N processes ("ranks") train one
//! model, each on its shard of every global batch, and sum what must be global through a
//! [`Collective`] (MPI in `crate::dist`).
//!
//! What keeps N ranks equal to one process at the global batch:
//! - the loader is keyed ([`crate::data::loader`]): batch `b` of epoch `e` is the same on every
//!   rank, and rank `r` of `N` takes its rows `[r*B/N, (r+1)*B/N)`;
//! - [`AllReduceGrads`], the step's [`GradHook`], sums `grad * local_rows / global_rows` over the
//!   ranks in a few large calls: each rank's loss is the mean over its own rows, so this is the
//!   mean over the global batch, exactly as one process computes it (up to rounding);
//! - DSO is added after the hook from the (identical) weights, and weight decay is part of the
//!   optimiser's update, so both act as in one process;
//! - BN running statistics travel in the same call, from rank 0 (the others add zeros), so
//!   every rank holds rank 0's, as PyTorch's DDP broadcasts its buffers; with `--sync-bn` the
//!   engine's [`StatSync`] makes BN normalise with the global batch's statistics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Result};
use serde::Serialize;

use super::step::GradHook;
use crate::engine::backend::CpuBackend;
use crate::engine::program::Program;
use crate::engine::stat_sync::StatSync;

/// The collective operations data-parallel training uses. Every rank calls each one in the same
/// order with buffers of the same length.
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Replaces each entry by its sum over the ranks.
    fn sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Replaces each entry by its sum over the ranks.
    fn sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// An error every rank meets at the same point (a bad set-up found by a collective check, or
/// a flag that does not fit the rank count): rank 0 prints it, the others end quietly, and no
/// rank needs to abort the others.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OnEveryRank(pub String);

/// How a [`super::run::Trainer`] runs data-parallel.
#[derive(Clone)]
pub struct DataParallel {
    pub comm: Arc<dyn Collective>,
    /// BN with the global batch's statistics (`--sync-bn`); otherwise each rank's own, as
    /// PyTorch's DDP without `SyncBatchNorm`.
    pub sync_bn: bool,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DataParallel {{ rank: {}, size: {}, sync_bn: {} }}",
            self.comm.rank(),
            self.comm.size(),
            self.sync_bn
        )
    }
}

impl DataParallel {
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// The one process that writes files and prints progress.
    pub fn is_writer(&self) -> bool {
        self.rank() == 0
    }

    /// A global batch of `batch` images splits evenly over the ranks.
    pub fn check_batch(&self, batch: usize) -> Result<()> {
        let n = self.size();
        if !batch.is_multiple_of(n) {
            bail!(OnEveryRank(format!(
                "--batch {batch} (the global batch) does not divide over the {n} MPI ranks: \
                 use a multiple of {n}"
            )));
        }
        Ok(())
    }

    /// Fails on every rank, naming the ranks, unless every rank passes the same fingerprint
    /// (of the model's weights, the recipe and the data sizes, taken before the first step).
    pub fn check_same_start(&self, fingerprint: u64) -> Result<()> {
        let all = self.comm.all_gather_u64(fingerprint)?;
        let differ: Vec<String> = (all.iter().enumerate())
            .filter(|(_, &f)| f != all[0])
            .map(|(r, _)| r.to_string())
            .collect();
        if !differ.is_empty() {
            bail!(OnEveryRank(format!(
                "MPI rank(s) {} started from a different model, recipe or data than rank 0 \
                 (fingerprints {}): start every rank with the same command and files",
                differ.join(", "),
                all.iter()
                    .map(|f| format!("{f:016x}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )));
        }
        Ok(())
    }

    /// After training: every rank holds the same weights and BN statistics (`fingerprint` of
    /// them on each rank agrees), or an error on every rank naming those that differ.
    pub fn check_same_weights(&self, fingerprint: u64) -> Result<bool> {
        let all = self.comm.all_gather_u64(fingerprint)?;
        if let Some(r) = all.iter().position(|&f| f != all[0]) {
            bail!(OnEveryRank(format!(
                "after training, MPI rank {r} holds other weights than rank 0 \
                 ({:016x} against {:016x}): the all-reduce did not keep the ranks equal",
                all[r], all[0]
            )));
        }
        Ok(true)
    }

    /// The engine's hook for `--sync-bn`.
    pub fn stat_sync(&self) -> Arc<dyn StatSync> {
        Arc::new(SumStats(self.comm.clone()))
    }
}

/// [`StatSync`] through a [`Collective`].
struct SumStats(Arc<dyn Collective>);

impl StatSync for SumStats {
    fn sum(&self, values: &mut [f64]) -> std::result::Result<(), String> {
        self.0.sum_f64(values).map_err(|e| format!("{e:#}"))
    }
}

impl DataParallel {
    /// Hands every rank rank 0's BN running statistics (the others add zeros), alone, as each
    /// step's [`AllReduceGrads`] does in its last call: after a per-rank recalibration
    /// ([`super::precise_bn`]) the ranks hold one model again.
    pub fn share_rank0_state(&self, program: &mut Program) -> Result<()> {
        let mut buf = Vec::new();
        push_rank0_state(&mut buf, program, self.rank() == 0);
        self.comm.sum_f32(&mut buf)?;
        take_state(&buf, program);
        Ok(())
    }
}

/// Appends `program`'s BN running statistics to `buf` on rank 0, as many zeros elsewhere: a sum
/// over the ranks then gives every rank rank 0's.
fn push_rank0_state(buf: &mut Vec<f32>, program: &Program, rank0: bool) {
    for (_, s) in &program.state {
        if rank0 {
            buf.extend(s.iter().copied());
        } else {
            buf.extend(std::iter::repeat_n(0.0, s.len()));
        }
    }
}

/// Sets `program`'s BN running statistics from the start of `buf` (as [`push_rank0_state`]
/// laid them out); returns the number of values read.
fn take_state(buf: &[f32], program: &mut Program) -> usize {
    let mut at = 0;
    for (_, s) in &mut program.state {
        let k = s.len();
        for (v, &t) in s.iter_mut().zip(&buf[at..at + k]) {
            *v = t;
        }
        at += k;
    }
    at
}

/// FNV-1a over bytes: the start fingerprint ranks compare.
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The bits of every parameter and BN running statistic of `program`, in order.
pub fn weight_bytes(program: &Program) -> Vec<u8> {
    let mut out = Vec::new();
    let arrays =
        (program.params.iter().map(|p| &p.value)).chain(program.state.iter().map(|s| &s.1));
    for a in arrays {
        for v in a.iter() {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    out
}

/// Communication measured over a run, per step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CommStats {
    pub ranks: usize,
    pub steps: u64,
    /// Bytes each rank hands to the gradient all-reduce per step (gradients, BN statistics,
    /// the stop flag).
    pub bytes_per_step: u64,
    /// All-reduce calls per step.
    pub calls_per_step: u64,
    /// Seconds spent in the all-reduce calls, over all steps, after a barrier: the transfer
    /// and the sums.
    pub seconds: f64,
    /// Seconds spent in that barrier, over all steps: waiting for the slowest rank to finish
    /// its backward (uneven load, a busy machine), not communication.
    pub wait_seconds: f64,
    /// The fingerprints of every rank's weights and BN statistics agreed after training.
    pub same_weights_on_every_rank: bool,
    /// That fingerprint (FNV-1a of the bits).
    pub weights_fingerprint: String,
}

/// What the trainer and the hook share: the rows of the coming step and the stop decision.
#[derive(Debug, Default)]
pub struct StepShare {
    /// This rank's rows and the global batch's rows in the coming step.
    pub local_rows: usize,
    pub global_rows: usize,
    pub stats: CommStats,
}

/// Most f32 values per all-reduce call (16 MiB): ResNet-20 (0.27 M parameters) and even
/// ResNet-50 take one or two calls per step, and no single call needs a huge buffer.
const BUCKET: usize = 4 << 20;

/// The [`GradHook`] of data-parallel training: averages the gradients over the ranks (weighted
/// by rows), hands every rank rank 0's BN running statistics, and agrees on stopping (Ctrl-C on
/// any rank stops every rank after the same step).
pub struct AllReduceGrads {
    comm: Arc<dyn Collective>,
    share: Arc<Mutex<StepShare>>,
    /// Ctrl-C on this rank.
    stop_asked: Arc<AtomicBool>,
    /// Some rank asked to stop in this step's call: every rank sees the same value.
    stop_agreed: Arc<AtomicBool>,
    buf: Vec<f32>,
}

impl AllReduceGrads {
    pub fn new(
        comm: Arc<dyn Collective>,
        share: Arc<Mutex<StepShare>>,
        stop_asked: Arc<AtomicBool>,
        stop_agreed: Arc<AtomicBool>,
    ) -> AllReduceGrads {
        AllReduceGrads {
            comm,
            share,
            stop_asked,
            stop_agreed,
            buf: Vec::new(),
        }
    }

    fn sum(&mut self, stats: &mut CommStats) -> Result<()> {
        let t0 = Instant::now();
        self.comm.sum_f32(&mut self.buf)?;
        stats.seconds += t0.elapsed().as_secs_f64();
        stats.bytes_per_step += 4 * self.buf.len() as u64;
        stats.calls_per_step += 1;
        Ok(())
    }
}

impl GradHook for AllReduceGrads {
    fn gradients_ready(&mut self, _: &CpuBackend, program: &mut Program) -> Result<()> {
        let (local, global) = {
            let share = self.share.lock().expect("step share");
            (share.local_rows, share.global_rows)
        };
        if global == 0 {
            bail!("data-parallel step without its row counts");
        }
        let w = local as f32 / global as f32;
        let rank0 = self.comm.rank() == 0;
        let mut stats = CommStats {
            ranks: self.comm.size(),
            ..CommStats::default()
        };
        // A barrier first, so that the time of the all-reduce is its own and not the wait for
        // a slower rank (which the barrier measures); it costs microseconds.
        let t0 = Instant::now();
        self.comm.barrier()?;
        stats.wait_seconds = t0.elapsed().as_secs_f64();
        // Buckets of whole parameters, at most BUCKET values unless one parameter is larger;
        // the last one also carries the BN statistics (rank 0's; the others add zeros) and the
        // stop flag.
        let n = program.params.len();
        let mut first = 0;
        loop {
            let mut end = first;
            let mut len = 0;
            while end < n && (end == first || len + program.params[end].grad.len() <= BUCKET) {
                len += program.params[end].grad.len();
                end += 1;
            }
            self.buf.clear();
            for p in &program.params[first..end] {
                self.buf.extend(p.grad.iter().map(|g| g * w));
            }
            let last = end == n;
            if last {
                push_rank0_state(&mut self.buf, program, rank0);
                let ask = self.stop_asked.load(Ordering::SeqCst);
                self.buf.push(if ask { 1.0 } else { 0.0 });
            }
            self.sum(&mut stats)?;
            let mut at = 0;
            for p in &mut program.params[first..end] {
                let k = p.grad.len();
                for (g, &s) in p.grad.iter_mut().zip(&self.buf[at..at + k]) {
                    *g = s;
                }
                at += k;
            }
            if last {
                at += take_state(&self.buf[at..], program);
                self.stop_agreed.store(self.buf[at] > 0.0, Ordering::SeqCst);
                break;
            }
            first = end;
        }
        let mut share = self.share.lock().expect("step share");
        let total = &mut share.stats;
        total.ranks = stats.ranks;
        total.steps += 1;
        total.bytes_per_step = stats.bytes_per_step;
        total.calls_per_step = stats.calls_per_step;
        total.seconds += stats.seconds;
        total.wait_seconds += stats.wait_seconds;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_separates_parts() {
        assert_ne!(fingerprint(&[b"ab", b"c"]), fingerprint(&[b"a", b"bc"]));
        assert_eq!(fingerprint(&[b"ab"]), fingerprint(&[b"ab"]));
    }
}
