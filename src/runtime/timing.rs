//! Latency measurement in tract: warm-up, many timed runs, files interleaved.
//!
//! Runs of several models are interleaved in short rounds (a few runs of each file in turn),
//! so that a drift in the machine's state (frequency, another process) lands on every file
//! alike instead of on whichever ran last. Each run is timed on its own; percentiles come from
//! the per-run times.

use std::time::{Duration, Instant};

use anyhow::Result;
use ndarray::ArrayD;

use super::TractModel;
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct TimingOptions {
    /// Untimed runs of each model before timing.
    pub warmup: usize,
    /// Timed runs per model (at least).
    pub runs: usize,
    /// Runs of one model before moving to the next.
    pub chunk: usize,
    /// Keep timing until each model has this much measured time (whichever ends later).
    pub min_time: Duration,
}

impl Default for TimingOptions {
    fn default() -> Self {
        TimingOptions {
            warmup: 10,
            runs: 100,
            chunk: 5,
            min_time: Duration::from_millis(500),
        }
    }
}

/// Per-run times of one model, in milliseconds, sorted.
#[derive(Clone, Debug, Default)]
pub struct Timings(pub Vec<f64>);

impl Timings {
    pub fn percentile(&self, p: f64) -> f64 {
        let v = &self.0;
        if v.is_empty() {
            return f64::NAN;
        }
        // Nearest rank.
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    pub fn p50(&self) -> f64 {
        self.percentile(50.0)
    }

    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len().max(1) as f64
    }
}

/// A standard-normal input of the model's shape, fixed by `seed`.
pub fn random_input(shape: &[usize], seed: u64) -> ArrayD<f32> {
    let mut rng = Rng::new(seed);
    ArrayD::from_shape_fn(ndarray::IxDyn(shape), |_| rng.normal())
}

/// Times every model, interleaved. Returns one sorted [`Timings`] per model.
pub fn time_interleaved(models: &mut [TractModel], opts: &TimingOptions) -> Result<Vec<Timings>> {
    let inputs = models
        .iter()
        .map(|m| m.prepare(&random_input(&m.input_shape, 0x6265_6e63)))
        .collect::<Result<Vec<_>>>()?;
    for (m, x) in models.iter_mut().zip(&inputs) {
        for _ in 0..opts.warmup {
            m.run_prepared(x)?;
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(opts.runs); models.len()];
    let mut spent = vec![Duration::ZERO; models.len()];
    loop {
        let done =
            times.iter().all(|t| t.len() >= opts.runs) && spent.iter().all(|&s| s >= opts.min_time);
        if done {
            break;
        }
        for (k, (m, x)) in models.iter_mut().zip(&inputs).enumerate() {
            for _ in 0..opts.chunk.max(1) {
                let t0 = Instant::now();
                m.run_prepared(x)?;
                let dt = t0.elapsed();
                spent[k] += dt;
                times[k].push(dt.as_secs_f64() * 1e3);
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            Timings(t)
        })
        .collect())
}
