//! Learning-rate schedules over optimiser steps, with an optional linear warm-up.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// Constant learning rate.
    Constant,
    /// Multiply by `gamma` at each listed fraction of the run (e.g. 0.5, 0.75).
    Step { milestones: Vec<f32>, gamma: f32 },
    /// Cosine decay from the base rate to `min_ratio` times it.
    Cosine { min_ratio: f32 },
    /// One-cycle (Smith 2018): linear from base/div up to base over `pct` of the run, then
    /// cosine down to base/final_div.
    OneCycle { pct: f32, div: f32, final_div: f32 },
}

impl Schedule {
    /// Parses `constant`, `step` (halvings at 50% and 75%: gamma 0.1), `cosine`, `onecycle`.
    pub fn parse(s: &str) -> Result<Schedule> {
        Ok(match s {
            "constant" => Schedule::Constant,
            "step" => Schedule::Step {
                milestones: vec![0.5, 0.75],
                gamma: 0.1,
            },
            "cosine" => Schedule::Cosine { min_ratio: 0.0 },
            "onecycle" | "one-cycle" => Schedule::OneCycle {
                pct: 0.3,
                div: 25.0,
                final_div: 1e4,
            },
            other => bail!("unknown schedule '{other}' (constant, step, cosine, onecycle)"),
        })
    }
}

impl std::str::FromStr for Schedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Schedule> {
        Schedule::parse(s)
    }
}

impl std::fmt::Display for Schedule {
    /// The `--schedule` name of the schedule's family (`constant`, `step`, `cosine`,
    /// `onecycle`): the presets [`Schedule::parse`] gives parse back to themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Constant => "constant",
            Schedule::Step { .. } => "step",
            Schedule::Cosine { .. } => "cosine",
            Schedule::OneCycle { .. } => "onecycle",
        })
    }
}

/// The default SGD learning rate for `batch` images per step: `base`, the rate the recipe was
/// tuned with at `reference` images, scaled down linearly for smaller batches (the linear
/// scaling rule of Goyal et al. 2017: a step of half the images gets half the rate) and left at
/// `base` for larger ones (scaling up needs a warm-up the default recipe does not have). A user's
/// own small `--batch` at the full rate blew up: torchvision regnet_x_400mf, batch 32, lr 0.1
/// reached a train loss of 17.8 in its first epoch and NaN in its fourth; at 0.025, 2.9 and no
/// divergence.
pub fn default_sgd_lr(base: f32, reference: usize, batch: usize) -> f32 {
    base * batch.min(reference) as f32 / reference as f32
}

/// The learning rate at optimiser step `step` (0-based) of `total`, with `warmup` steps of
/// linear warm-up from 0 (the schedule itself runs over the remaining steps).
pub fn lr_at(base: f32, schedule: &Schedule, step: u64, total: u64, warmup: u64) -> f32 {
    if step < warmup {
        return base * (step + 1) as f32 / warmup as f32;
    }
    let span = total.saturating_sub(warmup).max(1);
    let t = ((step - warmup) as f32 / span as f32).clamp(0.0, 1.0);
    let cos = |a: f32, b: f32, u: f32| b + (a - b) * 0.5 * (1.0 + (std::f32::consts::PI * u).cos());
    match schedule {
        Schedule::Constant => base,
        Schedule::Step { milestones, gamma } => {
            base * gamma.powi(milestones.iter().filter(|&&m| t >= m).count() as i32)
        }
        Schedule::Cosine { min_ratio } => cos(base, base * min_ratio, t),
        Schedule::OneCycle {
            pct,
            div,
            final_div,
        } => {
            if t < *pct {
                let lo = base / div;
                lo + (base - lo) * t / pct
            } else {
                cos(base, base / final_div, (t - pct) / (1.0 - pct))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_of_the_schedules() {
        let c = Schedule::parse("cosine").unwrap();
        assert!((lr_at(0.1, &c, 0, 100, 0) - 0.1).abs() < 1e-6);
        assert!((lr_at(0.1, &c, 50, 100, 0) - 0.05).abs() < 1e-6);
        assert!(lr_at(0.1, &c, 100, 100, 0).abs() < 1e-6);
        let s = Schedule::parse("step").unwrap();
        assert!((lr_at(0.1, &s, 49, 100, 0) - 0.1).abs() < 1e-6);
        assert!((lr_at(0.1, &s, 50, 100, 0) - 0.01).abs() < 1e-6);
        assert!((lr_at(0.1, &s, 80, 100, 0) - 0.001).abs() < 1e-6);
        // Warm-up: linear to the base over 10 steps, then the schedule over the other 90.
        assert!((lr_at(0.1, &c, 0, 100, 10) - 0.01).abs() < 1e-6);
        assert!((lr_at(0.1, &c, 9, 100, 10) - 0.1).abs() < 1e-6);
        assert!((lr_at(0.1, &c, 10, 100, 10) - 0.1).abs() < 1e-6);
        let o = Schedule::parse("onecycle").unwrap();
        assert!((lr_at(0.1, &o, 0, 100, 0) - 0.004).abs() < 1e-6);
        assert!((lr_at(0.1, &o, 30, 100, 0) - 0.1).abs() < 1e-6);
        assert!(lr_at(0.1, &o, 100, 100, 0) < 1e-4);
        assert!(Schedule::parse("linear").is_err());
    }

    /// The recipe's rate at its own batch and above, linearly less below it.
    #[test]
    fn default_rate_scales_down_with_the_batch_only() {
        assert_eq!(default_sgd_lr(0.1, 128, 128), 0.1);
        assert_eq!(default_sgd_lr(0.1, 128, 512), 0.1);
        assert!((default_sgd_lr(0.1, 128, 32) - 0.025).abs() < 1e-9);
        assert!((default_sgd_lr(0.05, 64, 16) - 0.0125).abs() < 1e-9);
        assert!((default_sgd_lr(0.1, 128, 1) - 0.1 / 128.0).abs() < 1e-9);
    }
}
