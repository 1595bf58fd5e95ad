//! A byte-budgeted cache of decoded images, shared by the loader's workers.
//!
//! A streamed folder ([`super::stream`]) decodes its files on the fly; decoding is most of the
//! cost, so what fits under the budget (`--cache-mb`) is kept decoded. The policy is "keep what
//! fits": an image is admitted when the cache's accounted bytes plus its own stay within the
//! budget, and nothing is ever evicted. Training visits the images in a fresh random order
//! every epoch, so any policy holding `K` of `N` images hits `K / N` of the time; this one does
//! so without eviction churn or lock traffic beyond one short critical section per image, and
//! its memory is bounded by construction. What the cache holds changes only speed: a cached
//! image is the same bytes a fresh decode gives, so the batches stay a pure function of
//! `(seed, epoch, batch)`.
//!
//! Accounting counts pixel bytes (the `Vec<u8>` payload, which is all but a few dozen bytes of
//! an entry) and keeps a high-water mark, reported by `elrt train --json` and asserted by
//! `tests/stream.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One decoded image: `pixels` holds `h * w * c` bytes in the layout its producer chose (the
/// stream keeps sources as HWC RGB and finished images as CHW).
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    pub h: usize,
    pub w: usize,
    pub pixels: Vec<u8>,
}

impl Decoded {
    /// Bytes this image is accounted for.
    pub fn bytes(&self) -> usize {
        self.pixels.len()
    }
}

/// What a cache did so far (for reports and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// The budget, bytes.
    pub budget_bytes: usize,
    /// Bytes held now.
    pub bytes: usize,
    /// Most bytes ever held.
    pub peak_bytes: usize,
    /// Images held now.
    pub images: usize,
    /// Look-ups answered from the cache.
    pub hits: u64,
    /// Look-ups that had to decode.
    pub misses: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<u64, Arc<Decoded>>,
    bytes: usize,
    peak: usize,
}

/// Decoded images keyed by a `u64` the caller chooses, within a byte budget.
pub struct Cache {
    budget: usize,
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Cache {
    /// An empty cache that will hold at most `budget` accounted bytes (0: holds nothing).
    pub fn new(budget: usize) -> Cache {
        Cache {
            budget,
            inner: Mutex::new(Inner::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn budget(&self) -> usize {
        self.budget
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A worker that panicked while holding the lock leaves consistent data (every update is
        // one insert plus counters), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The image under `key`, from the cache or else from `make` (whose result is kept when it
    /// fits). `make` runs outside the lock, so workers decode in parallel; when two decode the
    /// same key at once, the first to finish is kept and both return equal images.
    pub fn get_or_insert_with<E>(
        &self,
        key: u64,
        make: impl FnOnce() -> Result<Decoded, E>,
    ) -> Result<Arc<Decoded>, E> {
        if let Some(d) = self.lock().map.get(&key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(d.clone());
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let d = Arc::new(make()?);
        let size = d.bytes();
        if size <= self.budget {
            let mut inner = self.lock();
            if !inner.map.contains_key(&key) && inner.bytes + size <= self.budget {
                inner.bytes += size;
                inner.peak = inner.peak.max(inner.bytes);
                inner.map.insert(key, d.clone());
            }
        }
        Ok(d)
    }

    pub fn stats(&self) -> CacheStats {
        let inner = self.lock();
        CacheStats {
            budget_bytes: self.budget,
            bytes: inner.bytes,
            peak_bytes: inner.peak,
            images: inner.map.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(n: usize, v: u8) -> Result<Decoded, ()> {
        Ok(Decoded {
            h: 1,
            w: n,
            pixels: vec![v; n],
        })
    }

    #[test]
    fn keeps_what_fits_and_never_exceeds_the_budget() {
        let c = Cache::new(250);
        for k in 0..10u64 {
            let d = c.get_or_insert_with(k, || img(100, k as u8)).unwrap();
            assert_eq!(d.pixels[0], k as u8);
        }
        let s = c.stats();
        assert_eq!((s.images, s.bytes, s.peak_bytes), (2, 200, 200));
        assert_eq!((s.hits, s.misses), (0, 10));
        // Kept images come back without calling `make`; others are made again.
        let d = c
            .get_or_insert_with(1, || -> Result<Decoded, ()> { panic!("must be cached") })
            .unwrap();
        assert_eq!(d.pixels[0], 1);
        let mut made = false;
        c.get_or_insert_with(7, || {
            made = true;
            img(100, 7)
        })
        .unwrap();
        assert!(made);
        // An image larger than the whole budget is returned, not kept.
        let big = c.get_or_insert_with(99, || img(1000, 9)).unwrap();
        assert_eq!(big.bytes(), 1000);
        assert!(c.stats().peak_bytes <= 250);
        // A zero budget keeps nothing.
        let z = Cache::new(0);
        z.get_or_insert_with(0, || img(1, 0)).unwrap();
        assert_eq!(z.stats().images, 0);
    }

    #[test]
    fn errors_pass_through_and_are_not_cached() {
        let c = Cache::new(1000);
        let e = c.get_or_insert_with(3, || Err::<Decoded, _>("bad file"));
        assert_eq!(e.unwrap_err(), "bad file");
        assert_eq!(c.stats().images, 0);
    }
}
