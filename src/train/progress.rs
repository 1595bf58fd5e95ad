//! What a training run shows while it runs: a progress bar on a terminal, plain lines when
//! stderr is not one (a log file, CI), and a whole-run ETA for both.
//!
//! The ETA counts the optimiser steps still to run in the whole run (`epochs x steps per epoch`,
//! or fewer under `--max-steps`) at the measured time per step, plus the evaluations still to
//! come (one at each epoch end, and one where `--max-steps` stops the run mid-epoch) at the
//! measured time of an epoch end (evaluation, metrics, curve, checkpoint) once one has been
//! timed. It is pure arithmetic ([`run_steps`], [`evals_from`], [`eta_secs`]) over what
//! [`Progress`] measures.
//!
//! On a terminal the bar shows `epoch k/N`, the step within the epoch, the loss, accuracy and
//! throughput so far in the epoch, and the run's steps and ETA. Otherwise a plain line with the
//! same fields goes to stderr every [`PLAIN_PERIOD_SECS`] seconds (`ELRT_PROGRESS_SECS`
//! overrides it), so that a long epoch never leaves a log silent; the per-epoch line follows
//! each epoch as before.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between two plain progress lines when stderr is not a terminal.
pub const PLAIN_PERIOD_SECS: f64 = 30.0;

/// Environment variable overriding [`PLAIN_PERIOD_SECS`] (seconds, may be fractional; 0 prints a
/// line after every step).
pub const PERIOD_ENV: &str = "ELRT_PROGRESS_SECS";

/// The period of plain lines: [`PERIOD_ENV`] when it holds a non-negative number, else
/// [`PLAIN_PERIOD_SECS`].
pub fn plain_period() -> f64 {
    parse_period(std::env::var(PERIOD_ENV).ok().as_deref())
}

fn parse_period(v: Option<&str>) -> f64 {
    v.and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(PLAIN_PERIOD_SECS)
}

/// The optimiser steps of the whole run: `epochs x per_epoch`, or `max_steps` when fewer.
pub fn run_steps(epochs: u64, per_epoch: u64, max_steps: Option<u64>) -> u64 {
    let all = epochs.saturating_mul(per_epoch);
    max_steps.map_or(all, |m| m.min(all))
}

/// How many evaluations the run still makes once `step` steps are done and the evaluation at
/// `step` (if one falls there) has not run yet: one at the end of every epoch up to
/// `run_end` steps, and one at `run_end` itself when `--max-steps` stops the run mid-epoch.
pub fn evals_from(step: u64, per_epoch: u64, run_end: u64) -> u64 {
    if per_epoch == 0 || step > run_end {
        return 0;
    }
    let full = run_end / per_epoch;
    let first = step.div_ceil(per_epoch).max(1);
    let at_epoch_ends = (full + 1).saturating_sub(first);
    at_epoch_ends + u64::from(!run_end.is_multiple_of(per_epoch))
}

/// Seconds left in the run: `steps_total - steps_done` steps at `secs_per_step`, plus
/// `evals_left` epoch ends at `secs_per_eval` when that has been measured (`None`: not yet, and
/// counted as 0). Never negative.
pub fn eta_secs(
    steps_done: u64,
    steps_total: u64,
    secs_per_step: f64,
    evals_left: u64,
    secs_per_eval: Option<f64>,
) -> f64 {
    let steps = steps_total.saturating_sub(steps_done) as f64 * secs_per_step.max(0.0);
    let evals = evals_left as f64 * secs_per_eval.unwrap_or(0.0).max(0.0);
    let eta = steps + evals;
    if eta.is_finite() {
        eta
    } else {
        0.0
    }
}

/// A duration for people: `42s`, `3m05s`, `2h07m`, `3d04h`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_string();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// The running figures of the current epoch, as the loop accumulates them.
#[derive(Clone, Copy, Debug)]
pub struct EpochStats {
    /// Images and their summed loss and correct top-1 since the epoch began (a resumed epoch
    /// includes what the interrupted run had seen).
    pub seen: usize,
    pub loss_sum: f64,
    pub correct: usize,
    /// Images per second in this process's part of the epoch.
    pub img_per_s: f64,
}

enum Show {
    /// `--quiet`.
    Nothing,
    /// stderr is a terminal.
    Bar(ProgressBar),
    /// stderr is a file or pipe: a line every `period` seconds.
    Plain { period: f64, last: Instant },
}

/// Progress of one training run: times the steps and epoch ends, and shows the bar or the plain
/// lines.
pub struct Progress {
    epochs: u64,
    per_epoch: u64,
    run_end: u64,
    show: Show,
    /// Training seconds (steps and data waits, not epoch ends) of finished epochs in this
    /// process, and their steps.
    train_secs: f64,
    train_steps: u64,
    /// The current epoch: when it began in this process and its steps here so far.
    epoch_t0: Instant,
    epoch_steps: u64,
    /// The last measured epoch end (evaluation, metrics, curve, checkpoint).
    eval_secs: Option<f64>,
}

impl Progress {
    /// `show`: false for `--quiet`. The bar goes to a terminal, plain lines elsewhere.
    pub fn new(show: bool, epochs: u64, per_epoch: u64, max_steps: Option<u64>) -> Progress {
        let show = if !show {
            Show::Nothing
        } else if std::io::stderr().is_terminal() {
            Show::Bar(ProgressBar::hidden())
        } else {
            Show::Plain {
                period: plain_period(),
                last: Instant::now(),
            }
        };
        Progress {
            epochs,
            per_epoch,
            run_end: run_steps(epochs, per_epoch, max_steps),
            show,
            train_secs: 0.0,
            train_steps: 0,
            epoch_t0: Instant::now(),
            epoch_steps: 0,
            eval_secs: None,
        }
    }

    /// Whether anything but errors and warnings is printed.
    pub fn shows(&self) -> bool {
        !matches!(self.show, Show::Nothing)
    }

    /// The optimiser steps of the whole run.
    pub fn run_end(&self) -> u64 {
        self.run_end
    }

    /// A new epoch (0-based `epoch`) starts at `batch` within it, after `step` steps of the run.
    pub fn begin_epoch(&mut self, epoch: u64, batch: u64, step: u64) {
        self.epoch_t0 = Instant::now();
        self.epoch_steps = 0;
        if let Show::Bar(bar) = &mut self.show {
            // The steps this epoch will run: the rest of it, or fewer under --max-steps.
            let len = self
                .per_epoch
                .min(batch + self.run_end.saturating_sub(step))
                .max(batch);
            let b = ProgressBar::new(len);
            b.set_style(
                ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len}  {msg}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b.set_prefix(format!("{}/{}", epoch + 1, self.epochs));
            b.set_position(batch);
            *bar = b;
        }
    }

    /// Seconds per step measured in this process so far (None before the first step).
    fn secs_per_step(&self) -> Option<f64> {
        let steps = self.train_steps + self.epoch_steps;
        (steps > 0)
            .then(|| (self.train_secs + self.epoch_t0.elapsed().as_secs_f64()) / steps as f64)
    }

    /// The ETA of the run after `step` steps, with the evaluation at `step` still to come when
    /// `eval_pending`.
    pub fn eta(&self, step: u64, eval_pending: bool) -> Option<f64> {
        let sps = self.secs_per_step()?;
        let from = if eval_pending { step } else { step + 1 };
        let evals = evals_from(from, self.per_epoch, self.run_end);
        Some(eta_secs(step, self.run_end, sps, evals, self.eval_secs))
    }

    /// One optimiser step is done: `step` steps of the run, `batch` of the current epoch
    /// (0-based `epoch`).
    pub fn step(&mut self, epoch: u64, batch: u64, step: u64, stats: &EpochStats) {
        self.epoch_steps += 1;
        if matches!(self.show, Show::Nothing) {
            return;
        }
        let due = match &self.show {
            Show::Plain { period, last } => last.elapsed().as_secs_f64() >= *period,
            _ => true,
        };
        if !due {
            return;
        }
        let eta = self.eta(step, true).map_or("?".into(), format_duration);
        let seen = stats.seen.max(1) as f64;
        let figures = format!(
            "loss {:.4}  acc {:.1}%  {:.0} img/s  run {step}/{} steps, eta {eta}",
            stats.loss_sum / seen,
            100.0 * stats.correct as f64 / seen,
            stats.img_per_s,
            self.run_end,
        );
        match &mut self.show {
            Show::Bar(bar) => {
                bar.set_position(batch);
                bar.set_message(figures);
            }
            Show::Plain { last, .. } => {
                eprintln!(
                    "epoch {}/{} step {batch}/{}  {figures}",
                    epoch + 1,
                    self.epochs,
                    self.per_epoch
                );
                *last = Instant::now();
            }
            Show::Nothing => {}
        }
    }

    /// The epoch's steps are over (the evaluation comes next): clears the bar.
    pub fn end_steps(&mut self) {
        self.train_secs += self.epoch_t0.elapsed().as_secs_f64();
        self.train_steps += self.epoch_steps;
        self.epoch_steps = 0;
        self.epoch_t0 = Instant::now();
        if let Show::Bar(bar) = &self.show {
            bar.finish_and_clear();
        }
    }

    /// The epoch end (evaluation, metrics, curve, checkpoint) took `secs`.
    pub fn epoch_end_took(&mut self, secs: f64) {
        self.eval_secs = Some(secs);
    }

    /// The evaluation alone took `secs`: it stands for the whole epoch end until one has been
    /// timed.
    pub fn eval_took(&mut self, secs: f64) {
        self.eval_secs.get_or_insert(secs);
    }

    /// A line printed outside the bar's refresh (the per-epoch line) counts as progress: the
    /// next plain line is due a period later.
    pub fn printed(&mut self) {
        if let Show::Plain { last, .. } = &mut self.show {
            *last = Instant::now();
        }
    }

    /// The run stops here (error or Ctrl-C): leaves the bar on the screen, with `msg` in place
    /// of its figures when given.
    pub fn abandon(&self, msg: Option<&'static str>) {
        if let Show::Bar(bar) = &self.show {
            match msg {
                Some(m) => bar.abandon_with_message(m),
                None => bar.abandon(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_steps_follow_epochs_and_max_steps() {
        assert_eq!(run_steps(30, 390, None), 11_700);
        assert_eq!(run_steps(30, 390, Some(200)), 200);
        assert_eq!(run_steps(2, 10, Some(500)), 20);
        assert_eq!(run_steps(0, 10, None), 0);
    }

    #[test]
    fn evaluations_left() {
        // 3 epochs of 10 steps: evaluations after steps 10, 20, 30.
        assert_eq!(evals_from(0, 10, 30), 3);
        assert_eq!(evals_from(1, 10, 30), 3);
        assert_eq!(
            evals_from(10, 10, 30),
            3,
            "the evaluation at step 10 is still to come"
        );
        assert_eq!(evals_from(11, 10, 30), 2);
        assert_eq!(evals_from(30, 10, 30), 1);
        assert_eq!(evals_from(31, 10, 30), 0);
        // --max-steps 25: after steps 10 and 20, and where the run stops.
        assert_eq!(evals_from(1, 10, 25), 3);
        assert_eq!(evals_from(21, 10, 25), 1);
        assert_eq!(evals_from(25, 10, 25), 1);
        // --max-steps inside the first epoch: one evaluation, where it stops.
        assert_eq!(evals_from(1, 390, 30), 1);
        assert_eq!(evals_from(1, 0, 30), 0);
    }

    #[test]
    fn eta_counts_the_whole_run_and_its_evaluations() {
        // 30 epochs of 390 steps, 120 done, 0.25 s a step, evaluations not yet timed.
        let total = run_steps(30, 390, None);
        let eta = eta_secs(120, total, 0.25, evals_from(120, 390, total), None);
        assert_eq!(eta, (11_700.0 - 120.0) * 0.25);
        // Once an epoch end took 4 s: 30 evaluations still to come from step 120.
        let eta = eta_secs(120, total, 0.25, evals_from(120, 390, total), Some(4.0));
        assert_eq!(eta, (11_700.0 - 120.0) * 0.25 + 30.0 * 4.0);
        // --max-steps 200: 80 steps and the one evaluation at the stop.
        let total = run_steps(30, 390, Some(200));
        let eta = eta_secs(120, total, 0.25, evals_from(120, 390, total), Some(4.0));
        assert_eq!(eta, 80.0 * 0.25 + 4.0);
        // Past the end (a resume with a smaller --max-steps): nothing left, never negative.
        assert_eq!(eta_secs(300, 200, 0.25, 0, Some(4.0)), 0.0);
        assert_eq!(eta_secs(0, 10, f64::NAN, 0, None), 0.0);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(0.4), "0s");
        assert_eq!(format_duration(42.0), "42s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(7_620.0), "2h07m");
        assert_eq!(format_duration(3.0 * 86_400.0 + 4.0 * 3600.0), "3d04h");
        assert_eq!(format_duration(f64::NAN), "?");
    }

    #[test]
    fn period_from_the_environment() {
        assert_eq!(parse_period(None), PLAIN_PERIOD_SECS);
        assert_eq!(parse_period(Some("0.5")), 0.5);
        assert_eq!(parse_period(Some("0")), 0.0);
        assert_eq!(parse_period(Some("-1")), PLAIN_PERIOD_SECS);
        assert_eq!(parse_period(Some("soon")), PLAIN_PERIOD_SECS);
    }
}
