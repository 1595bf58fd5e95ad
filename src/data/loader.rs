//! Batches for training and evaluation, prepared ahead on worker threads.
//!
//! Determinism: everything random is keyed, never drawn from a shared generator. The order of
//! the examples in epoch `e` is a shuffle by `Rng::derive(seed, &[e, ORDER])`, and the
//! augmentation of dataset image `i` in epoch `e` draws from `Rng::derive(seed, &[e, AUGMENT,
//! i])`. So batch `b` of epoch `e` is a pure function of `(seed, e, b)`: the worker count,
//! thread timing and where a run started do not change it. That is what makes `--resume`
//! exact: [`Loader::epoch_from`] starts at batch `b` and yields the very batches an
//! uninterrupted run would have seen from there.
//!
//! Pipelining: with `workers = N > 0`, worker `k` builds batches `start + k`, `start + k + N`,
//! ... and sends them, in order, into its own bounded channel; the consumer takes batch `b`
//! from channel `(b - start) mod N`. Batches thus arrive in order without a reordering buffer,
//! and at most `N * ceil(prefetch / N)` finished batches wait in memory. Building a batch
//! (copy, crop, flip, normalise through a lookup table) costs far less than a training step,
//! so the step does not wait once the queues have filled. Workers are plain threads, not
//! rayon tasks: rayon's pool belongs to the engine's kernels, and a loader blocked on a full
//! queue must not hold one of its threads. With `workers = 0` batches are built on the
//! calling thread when asked for (no threads, same batches).
//!
//! Streamed folders ([`super::StreamSet`]) are decoded by the same workers as batches are built,
//! so `workers` is also the decoding pool, and the queues hold at most `prefetch` finished
//! batches: memory stays the cache budget plus those batches. A file that fails to decode ends
//! the epoch with an error naming it ([`Epoch::next_batch`]); the in-memory path cannot fail.
//!
//! Dropping an [`Epoch`] early (Ctrl-C, `--max-steps`) sets a stop flag and closes the
//! channels, so a worker blocked on a full queue wakes up with an error and exits; the drop
//! then joins every worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Result};
use crossbeam_channel::{bounded, Receiver};
use ndarray::Array4;

use super::augment::{self, Augment, Normalize};
use super::source::Source;
use crate::rng::Rng;

/// Key that separates the epoch-order stream from the augmentation streams.
const ORDER: u64 = 0x6461_7461_6f72_6472; // "dataordr"
/// Key of the per-image augmentation streams.
const AUGMENT: u64 = 0x6461_7461_6175_676d; // "dataaugm"

/// How batches are formed.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch: usize,
    /// Shuffle the order each epoch (training); `false` keeps dataset order (evaluation).
    pub shuffle: bool,
    /// Random crop and flip; `None` for evaluation.
    pub augment: Option<Augment>,
    /// Per-channel normalisation; `None` takes [`Normalize::for_channels`] of the data set.
    pub normalize: Option<Normalize>,
    /// Leave out the last, smaller batch of an epoch.
    pub drop_last: bool,
    /// Worker threads building batches ahead; 0 builds them on the caller's thread.
    pub workers: usize,
    /// Finished batches that may wait in the queues (rounded up to a multiple of `workers`).
    pub prefetch: usize,
    /// Seed of the order and augmentation streams (the run's `--seed`).
    pub seed: u64,
    /// Data-parallel training: `(rank, ranks)` takes rows `[rank*B/ranks, (rank+1)*B/ranks)`
    /// of every batch (`B` its length), the same images with the same augmentation as those
    /// rows of the whole batch; `None` takes whole batches.
    pub shard: Option<(usize, usize)>,
}

impl LoaderConfig {
    /// Training: shuffled, augmented (pad 4, flip), CIFAR normalisation, last batch kept,
    /// 2 workers, 4 batches ahead.
    pub fn train(batch: usize, seed: u64) -> LoaderConfig {
        LoaderConfig {
            batch,
            shuffle: true,
            augment: Some(Augment::default()),
            normalize: None,
            drop_last: false,
            workers: 2,
            prefetch: 4,
            seed,
            shard: None,
        }
    }

    /// Evaluation: dataset order, no augmentation, every image once.
    pub fn eval(batch: usize) -> LoaderConfig {
        LoaderConfig {
            batch,
            shuffle: false,
            augment: None,
            normalize: None,
            drop_last: false,
            workers: 2,
            prefetch: 4,
            seed: 0,
            shard: None,
        }
    }
}

/// One batch: normalised images and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `[B, C, H, W]`, normalised.
    pub images: Array4<f32>,
    /// Class of each image.
    pub labels: Vec<usize>,
    /// Position of each image in the data set.
    pub indices: Vec<usize>,
    pub epoch: u64,
    /// Index of this batch within its epoch.
    pub index: usize,
}

/// What a batch builder needs; shared by the workers of an epoch.
struct Shared {
    data: Source,
    cfg: LoaderConfig,
    table: Vec<[f32; 256]>,
}

impl Shared {
    fn build(&self, epoch: u64, order: &[usize], index: usize) -> Result<Batch> {
        let b = self.cfg.batch;
        let mut idx = &order[index * b..((index + 1) * b).min(order.len())];
        if let Some((rank, ranks)) = self.cfg.shard {
            let len = idx.len();
            idx = &idx[rank * len / ranks..(rank + 1) * len / ranks];
        }
        let shape = self.data.shape();
        let [c, h, w] = shape;
        let size = c * h * w;
        let mut images = Array4::<f32>::zeros((idx.len(), c, h, w));
        let out = images.as_slice_mut().expect("fresh array is contiguous");
        for (o, &i) in out.chunks_exact_mut(size).zip(idx) {
            let mut rng = Rng::derive(self.cfg.seed, &[epoch, AUGMENT, i as u64]);
            match &self.data {
                Source::Memory(data) => {
                    let (pad, choice) = match &self.cfg.augment {
                        Some(a) => (a.pad, Some(a.draw(&mut rng))),
                        None => (0, None),
                    };
                    augment::apply(data.image(i), shape, pad, choice, &self.table, o);
                }
                Source::Stream(s) => {
                    let aug = self.cfg.augment.as_ref().map(|a| (a, &mut rng));
                    s.write(i, aug, &self.table, o)?;
                }
            }
        }
        let labels = self.data.labels();
        Ok(Batch {
            images,
            labels: idx.iter().map(|&i| labels[i]).collect(),
            indices: idx.to_vec(),
            epoch,
            index,
        })
    }
}

/// Makes the batches of a data set, epoch by epoch.
pub struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    /// Checks the configuration against the data set (batch size, normalisation channels).
    /// `data` is a [`super::Dataset`] (in an `Arc` or not) or any [`Source`].
    pub fn new(data: impl Into<Source>, mut cfg: LoaderConfig) -> Result<Loader> {
        let data = data.into();
        if cfg.batch == 0 {
            bail!("batch size must be at least 1");
        }
        if let Some((rank, ranks)) = cfg.shard {
            if rank >= ranks {
                bail!("shard {rank} of {ranks} does not exist");
            }
        }
        let c = data.shape()[0];
        let norm = cfg
            .normalize
            .get_or_insert_with(|| Normalize::for_channels(c));
        if norm.channels() != c {
            bail!(
                "{}: normalisation has {} channels, the images {c}",
                data.name(),
                norm.channels()
            );
        }
        let table = norm.table();
        Ok(Loader {
            shared: Arc::new(Shared { data, cfg, table }),
        })
    }

    /// The images this loader batches.
    pub fn source(&self) -> &Source {
        &self.shared.data
    }

    /// The configuration, with `normalize` filled in.
    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// Batches per epoch, counting a smaller last batch unless `drop_last`.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.shared.data.len(), self.shared.cfg.batch);
        if self.shared.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Dataset indices in the order epoch `epoch` visits them.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.shared.data.len()).collect();
        if self.shared.cfg.shuffle {
            Rng::derive(self.shared.cfg.seed, &[epoch, ORDER]).shuffle(&mut order);
        }
        order
    }

    /// Batch `index` of `epoch`, built on this thread (the same batch the epoch yields).
    /// Panics on a streamed file that fails to decode; [`Loader::try_batch`] returns the error.
    pub fn batch(&self, epoch: u64, index: usize) -> Batch {
        self.try_batch(epoch, index)
            .unwrap_or_else(|e| panic!("batch {index} of epoch {epoch}: {e:#}"))
    }

    /// Batch `index` of `epoch`, built on this thread; a streamed file that fails to decode is
    /// an error naming it.
    pub fn try_batch(&self, epoch: u64, index: usize) -> Result<Batch> {
        assert!(
            index < self.batches_per_epoch(),
            "batch {index} out of range"
        );
        self.shared.build(epoch, &self.order(epoch), index)
    }

    /// All batches of `epoch`, in order.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `start` on: what an uninterrupted run sees after
    /// `start` steps of this epoch. A `start` past the end gives an empty epoch.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> Epoch {
        let end = self.batches_per_epoch();
        let start = start.min(end);
        let order = Arc::new(self.order(epoch));
        let workers = self.shared.cfg.workers.min(end - start);
        let mut e = Epoch {
            shared: self.shared.clone(),
            epoch,
            order: order.clone(),
            next: start,
            start,
            end,
            rxs: Vec::new(),
            handles: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            failed: None,
        };
        if workers == 0 {
            return e;
        }
        let cap = self.shared.cfg.prefetch.div_ceil(workers).max(1);
        for k in 0..workers {
            let (tx, rx) = bounded::<Result<Batch>>(cap);
            let shared = self.shared.clone();
            let order = order.clone();
            let stop = e.stop.clone();
            let handle = std::thread::Builder::new()
                .name(format!("elrt-data-{k}"))
                .spawn(move || {
                    let mut b = start + k;
                    while b < end && !stop.load(Ordering::Relaxed) {
                        let batch = shared.build(epoch, &order, b);
                        let failed = batch.is_err();
                        if tx.send(batch).is_err() || failed {
                            break;
                        }
                        b += workers;
                    }
                })
                .expect("cannot start a data loader thread");
            e.rxs.push(rx);
            e.handles.push(handle);
        }
        e
    }
}

/// The batches of one epoch, in order. Dropping it stops and joins its workers.
pub struct Epoch {
    shared: Arc<Shared>,
    epoch: u64,
    order: Arc<Vec<usize>>,
    next: usize,
    start: usize,
    end: usize,
    rxs: Vec<Receiver<Result<Batch>>>,
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    /// The error that ended the epoch early, kept for [`Epoch::finish`] when iterated.
    failed: Option<anyhow::Error>,
}

impl Epoch {
    /// Index of the batch the next call to `next` returns.
    pub fn position(&self) -> usize {
        self.next
    }

    /// The next batch, `None` at the end of the epoch, or the error of a file that failed to
    /// decode (streamed folders); after an error the epoch yields nothing more.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        if self.next >= self.end {
            return Ok(None);
        }
        let b = self.next;
        self.next += 1;
        let built = if self.rxs.is_empty() {
            self.shared.build(self.epoch, &self.order, b)
        } else {
            let rx = &self.rxs[(b - self.start) % self.rxs.len()];
            // A closed channel means the worker is gone before sending: it panicked.
            rx.recv().map_err(|_| {
                anyhow!(
                    "data loader worker for batch {b} of epoch {} died",
                    self.epoch + 1
                )
            })?
        };
        match built {
            Ok(batch) => {
                debug_assert_eq!(batch.index, b);
                Ok(Some(batch))
            }
            Err(e) => {
                self.next = self.end;
                Err(e)
            }
        }
    }

    /// Ok when the epoch was iterated to its end, or the error that stopped it early (the
    /// [`Iterator`] form ends quietly on an error; callers that stream check here).
    pub fn finish(mut self) -> Result<()> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Iterator for Epoch {
    type Item = Batch;

    /// The next batch; a decoding error ends the epoch and is kept for [`Epoch::finish`].
    fn next(&mut self) -> Option<Batch> {
        match self.next_batch() {
            Ok(b) => b,
            Err(e) => {
                self.failed = Some(e);
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

impl ExactSizeIterator for Epoch {}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the receivers wakes workers blocked on a full queue; then they can be joined.
        self.rxs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::data::Dataset;

    fn tiny(n: usize) -> Arc<Dataset> {
        let shape = [2, 3, 3];
        let pixels = (0..n * 18).map(|i| (i * 7 % 256) as u8).collect();
        let labels = (0..n).map(|i| i % 3).collect();
        let names = vec!["a".into(), "b".into(), "c".into()];
        Arc::new(Dataset::new("tiny", shape, pixels, labels, names).unwrap())
    }

    #[test]
    fn counts_and_drop_last() {
        let d = tiny(10);
        let mut cfg = LoaderConfig::eval(4);
        let l = Loader::new(d.clone(), cfg.clone()).unwrap();
        assert_eq!(l.batches_per_epoch(), 3);
        let sizes: Vec<usize> = l.epoch(0).map(|b| b.labels.len()).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        cfg.drop_last = true;
        let l = Loader::new(d, cfg).unwrap();
        assert_eq!(l.batches_per_epoch(), 2);
        assert_eq!(l.epoch(0).count(), 2);
        assert_eq!(l.epoch_from(0, 5).count(), 0);
    }

    #[test]
    fn rejects_bad_config() {
        let d = tiny(4);
        assert!(Loader::new(d.clone(), LoaderConfig::eval(0)).is_err());
        let mut cfg = LoaderConfig::eval(2);
        cfg.normalize = Some(Normalize::cifar());
        let e = Loader::new(d, cfg).err().unwrap().to_string();
        assert!(e.contains("normalisation has 3 channels"), "{e}");
    }

    #[test]
    fn early_drop_joins_blocked_workers() {
        let d = tiny(100);
        let mut cfg = LoaderConfig::train(1, 5);
        cfg.workers = 3;
        cfg.prefetch = 1;
        let l = Loader::new(d, cfg).unwrap();
        let mut e = l.epoch(0);
        let first = e.next().unwrap();
        assert_eq!(first.index, 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(e); // must return: workers are blocked on full queues
    }
}
