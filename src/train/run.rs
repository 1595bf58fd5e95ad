//! The training loop: data -> forward -> loss -> backward -> optimiser step, with per-epoch
//! evaluation, JSON-lines metrics, a checkpoint after every epoch (and on Ctrl-C), and resume.
//!
//! Reproducibility: the data order and augmentation come from `(seed, epoch)`, dropout masks
//! from `(seed, step)`, and the kernels reduce in a fixed order, so a run resumed from a
//! checkpoint ends with exactly the weights of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::Ix2;
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, Position};
use super::optim::{OptimKind, Optimizer};
use super::parallel::{
    fingerprint, weight_bytes, AllReduceGrads, CommStats, DataParallel, StepShare,
};
use super::progress::{format_duration, EpochStats, Progress};
use super::schedule::{lr_at, Schedule};
use super::step::{Diverged, TrainStep};
use crate::data::{Loader, LoaderConfig, NormSpec, Normalize, Source};
use crate::engine::exec::Mode;
use crate::engine::model::Model;
use crate::engine::ops::{top1_correct, topk_correct, SoftmaxCrossEntropy};
use crate::report::curve::CurvePoint;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: u64,
    pub batch: usize,
    pub lr: f32,
    pub optimizer: OptimKind,
    pub weight_decay: f32,
    pub schedule: Schedule,
    /// Linear warm-up length in epochs (may be fractional).
    pub warmup_epochs: f32,
    pub label_smoothing: f32,
    pub seed: u64,
    /// Stop after this many optimiser steps (smoke runs).
    pub max_steps: Option<u64>,
    /// Data loader worker threads.
    pub workers: usize,
    pub augment: bool,
    /// DSO strength rho on the low-rank factor matrices (0: off).
    #[serde(default)]
    pub orth: f32,
    /// No weight decay on the matrices under DSO (U1, U2): DSO already holds their scale, and
    /// weight decay pulls their singular values below the 1 that DSO aims at.
    #[serde(default)]
    pub orth_no_decay: bool,
    /// Input normalisation (`--normalize`); `None` is the data's default
    /// ([`Normalize::for_channels`]). Checkpoints written before the option have none.
    #[serde(default)]
    pub normalize: Option<NormSpec>,
    /// The image folder streams with ImageNet-style crops (the `--cache-mb` rule,
    /// [`crate::data::source`]): part of the recipe, as it changes the augmentation. Not
    /// written when false, so in-memory runs' checkpoints read as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub data_streamed: bool,
    /// `--bn-recalibrate`: before every evaluation, the batch norms' running statistics are
    /// recomputed from the current weights over this many training images
    /// ([`super::precise_bn`]); 0 keeps the training's running averages. Not part of what the
    /// weights learn, so a resume may change it ([`super::resume`]).
    #[serde(default)]
    pub bn_recalibrate: usize,
    /// `--allow-recipe-change`: a resume may change `epochs` and `max_steps`
    /// ([`super::resume`]). Not part of the recipe, so not saved.
    #[serde(skip)]
    pub allow_recipe_change: bool,
}

/// Files a run writes next to its output.
#[derive(Clone, Debug)]
pub struct RunFiles {
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    pub curve: PathBuf,
}

impl RunFiles {
    /// `trained.onnx` -> `trained.ckpt`, `trained.metrics.jsonl`, `trained.curve.png`.
    pub fn beside(output: &Path) -> RunFiles {
        let with = |ext: &str| output.with_extension(ext);
        RunFiles {
            checkpoint: with("ckpt"),
            metrics: with("metrics.jsonl"),
            curve: with("curve.png"),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochMetrics {
    pub epoch: u64,
    pub step: u64,
    pub lr: f32,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub test_top5: f64,
    pub img_per_s: f64,
    pub epoch_s: f64,
    pub wall_s: f64,
    /// Mean DSO penalty over the epoch's steps (0 when off).
    #[serde(default)]
    pub orth: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    pub images: usize,
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
}

/// What an epoch interrupted by Ctrl-C had accumulated, kept in the checkpoint so that the
/// resumed epoch reports the whole epoch's train loss, accuracy, DSO value, time and wall clock
/// (the weights resume exactly either way).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct EpochSoFar {
    seen: usize,
    loss_sum: f64,
    correct: usize,
    orth_sum: f64,
    steps_done: usize,
    epoch_s: f64,
    wall_s: f64,
}

#[derive(Debug)]
pub enum Outcome {
    Finished,
    /// Stopped by --max-steps.
    StepLimit,
    /// Ctrl-C: a checkpoint was saved where the run stopped.
    Interrupted,
}

pub struct Trainer<'a> {
    pub model: &'a mut Model,
    pub cfg: TrainConfig,
    pub files: RunFiles,
    /// Set by the Ctrl-C handler.
    pub stop: Arc<AtomicBool>,
    /// Progress (a bar on a terminal, plain lines elsewhere), the resume line and the per-epoch
    /// lines; false for `--quiet`, which leaves only errors and warnings on stderr.
    pub progress: bool,
    /// The model file being trained, for the curve's title.
    pub model_name: String,
    /// Called once per epoch with the metrics (for curves and reports).
    pub history: Vec<EpochMetrics>,
    /// Data-parallel training over several processes (`mpirun -np N`); `None`: this process
    /// alone, as before.
    pub parallel: Option<DataParallel>,
    /// With `parallel`: the communication the run measured.
    pub comm: Option<CommStats>,
}

/// Top-1/top-5 accuracy and mean loss on a data set, in eval mode, with the inputs normalised
/// by `normalize` (`None`: the data's default, [`Normalize::for_channels`]).
pub fn evaluate(
    model: &mut Model,
    data: impl Into<Source>,
    batch: usize,
    workers: usize,
    normalize: Option<Normalize>,
) -> Result<EvalResult> {
    evaluate_on(model, data, batch, workers, normalize, None)
}

/// [`evaluate`], with each rank of `parallel` taking its rows of every batch and the totals
/// summed over the ranks (every rank returns the whole set's result).
pub fn evaluate_on(
    model: &mut Model,
    data: impl Into<Source>,
    batch: usize,
    workers: usize,
    normalize: Option<Normalize>,
    parallel: Option<&DataParallel>,
) -> Result<EvalResult> {
    let mut cfg = LoaderConfig::eval(batch);
    cfg.workers = workers;
    cfg.normalize = normalize;
    cfg.shard = parallel.map(|p| (p.rank(), p.size()));
    let loader = Loader::new(data, cfg)?;
    let ce = SoftmaxCrossEntropy {
        label_smoothing: 0.0,
    };
    let (mut n, mut loss, mut c1, mut c5) = (0usize, 0f64, 0usize, 0usize);
    let mut epoch = loader.epoch(0);
    while let Some(b) = epoch.next_batch()? {
        if b.labels.is_empty() {
            continue; // a last batch smaller than the rank count
        }
        let logits = model.forward(b.images.into_dyn(), Mode::Eval)?;
        let l2 = logits.view().into_dimensionality::<Ix2>()?;
        check_labels(&b.labels, model.classes)?;
        loss += ce.loss(l2, &b.labels)? as f64 * b.labels.len() as f64;
        c1 += top1_correct(l2, &b.labels)?;
        c5 += topk_correct(l2, &b.labels, 5.min(model.classes))?;
        n += b.labels.len();
    }
    if let Some(p) = parallel {
        let mut t = [n as f64, loss, c1 as f64, c5 as f64];
        p.comm.sum_f64(&mut t)?;
        (n, loss, c1, c5) = (t[0] as usize, t[1], t[2] as usize, t[3] as usize);
    }
    if n == 0 {
        bail!("the evaluation set is empty");
    }
    Ok(EvalResult {
        images: n,
        loss: loss / n as f64,
        top1: c1 as f64 / n as f64,
        top5: c5 as f64 / n as f64,
    })
}

fn check_labels(labels: &[usize], classes: usize) -> Result<()> {
    if let Some(&l) = labels.iter().find(|&&l| l >= classes) {
        bail!("label {l} is out of range for a model with {classes} outputs");
    }
    Ok(())
}

impl Trainer<'_> {
    fn optimizer(&self) -> Optimizer {
        Optimizer::new(self.cfg.optimizer, self.cfg.weight_decay)
    }

    /// Runs (or resumes) the training. Returns how it ended.
    pub fn run(&mut self, train: Source, test: Source, resume: bool) -> Result<Outcome> {
        if train.classes() > self.model.classes {
            bail!(
                "the data has {} classes but the model has {} outputs",
                train.classes(),
                self.model.classes
            );
        }
        let channels = train.shape()[0];
        let normalize = match &self.cfg.normalize {
            Some(n) => Some(n.resolve(channels).context("--normalize")?),
            None => None,
        };
        let mut lcfg = LoaderConfig::train(self.cfg.batch, self.cfg.seed);
        lcfg.workers = self.cfg.workers;
        lcfg.normalize = normalize.clone();
        lcfg.drop_last = train.len() >= self.cfg.batch;
        if !self.cfg.augment {
            lcfg.augment = None;
        }
        let par = self.parallel.clone();
        if let Some(p) = &par {
            p.check_batch(self.cfg.batch)?;
            lcfg.shard = Some((p.rank(), p.size()));
        }
        let writer = par.as_ref().is_none_or(|p| p.is_writer());
        // Data-parallel: what the ranks compare of the data before the first step (its sizes,
        // every label, the first and last image of each split).
        let data_sample = par.as_ref().map(|_| {
            let mut s = format!("{} {} {}", train.len(), test.len(), train.classes());
            for d in [&train, &test] {
                s += &format!(" {:?}", d.labels());
                for i in [0, d.len().saturating_sub(1)] {
                    if i < d.len() {
                        s += &format!(" {:x}", fingerprint(&[&d.identity(i)]));
                    }
                }
            }
            s
        });
        let loader = Loader::new(train, lcfg)?;
        let per_epoch = loader.batches_per_epoch() as u64;
        if per_epoch == 0 {
            bail!("the training set is empty");
        }
        let total = self.cfg.epochs * per_epoch;
        let mut progress = Progress::new(
            self.progress,
            self.cfg.epochs,
            per_epoch,
            self.cfg.max_steps,
        );
        let warmup = (self.cfg.warmup_epochs * per_epoch as f32).round() as u64;
        let mut opt = self.optimizer();
        let mut pos = Position {
            epoch: 0,
            batch: 0,
            step: 0,
        };
        let mut carried: Option<EpochSoFar> = None;
        if resume {
            let ck = checkpoint::load(&self.files.checkpoint, &mut self.model.session.program)?;
            // The recipe (normalisation included: it is part of what the weights learnt) must
            // be the one the checkpoint was trained with.
            super::resume::check(
                &ck.extra["config"],
                &self.cfg,
                channels,
                self.cfg.allow_recipe_change,
                &self.files.checkpoint,
            )?;
            pos = ck.position;
            opt = ck.optimizer;
            self.history = serde_json::from_value(ck.extra["history"].clone()).unwrap_or_default();
            if writer {
                self.write_metrics()?;
            }
            if pos.batch > 0 {
                carried = serde_json::from_value(ck.extra["epoch_so_far"].clone()).ok();
            }
            if progress.shows() {
                eprintln!(
                    "resuming from {} at epoch {}, batch {} (step {})",
                    self.files.checkpoint.display(),
                    pos.epoch + 1,
                    pos.batch,
                    pos.step
                );
            }
        } else if writer && self.files.metrics.exists() {
            std::fs::remove_file(&self.files.metrics).ok();
        }
        self.model.session.dropout_seed = self.cfg.seed;
        let mut train_step = TrainStep::new(
            &self.model.session.program,
            self.cfg.label_smoothing,
            self.cfg.orth,
        );
        // Data-parallel: every rank must start from the same weights, recipe, data and
        // position; then the gradient all-reduce, rank-independent dropout masks, and (with
        // --sync-bn) BN's global statistics.
        let share = Arc::new(std::sync::Mutex::new(StepShare::default()));
        let stop_agreed = Arc::new(AtomicBool::new(false));
        if let Some(p) = &par {
            let recipe = serde_json::to_vec(&self.cfg)?;
            let sizes = format!("{} {pos:?}", data_sample.unwrap_or_default());
            let weights = weight_bytes(&self.model.session.program);
            p.check_same_start(fingerprint(&[&weights, &recipe, sizes.as_bytes()]))?;
            if p.rank() > 0 {
                self.model.session.dropout_seed =
                    crate::rng::Rng::derive(self.cfg.seed, &[p.rank() as u64]).next_u64();
            }
            if p.sync_bn {
                self.model.session.stat_sync = Some(p.stat_sync());
            }
            train_step.add_hook(Box::new(AllReduceGrads::new(
                p.comm.clone(),
                share.clone(),
                self.stop.clone(),
                stop_agreed.clone(),
            )));
        }
        let plan = LoopPlan {
            loader: &loader,
            test: &test,
            normalize,
            total,
            warmup,
            per_epoch,
            share: &share,
            stop_agreed: &stop_agreed,
        };
        let result = self.train_loop(
            &plan,
            &mut train_step,
            &mut opt,
            &mut pos,
            carried,
            &mut progress,
        );
        self.model.session.stat_sync = None;
        if let (Some(p), Ok(_)) = (&par, &result) {
            let mut stats = share.lock().expect("step share").stats.clone();
            let f = fingerprint(&[&weight_bytes(&self.model.session.program)]);
            stats.same_weights_on_every_rank = p.check_same_weights(f)?;
            stats.weights_fingerprint = format!("{f:016x}");
            self.comm = Some(stats);
        }
        result
    }

    /// The epochs of [`Self::run`], from `pos`.
    fn train_loop(
        &mut self,
        plan: &LoopPlan,
        train_step: &mut TrainStep,
        opt: &mut Optimizer,
        pos: &mut Position,
        mut carried: Option<EpochSoFar>,
        progress: &mut Progress,
    ) -> Result<Outcome> {
        let LoopPlan {
            loader,
            test,
            normalize,
            total,
            warmup,
            per_epoch,
            share,
            stop_agreed,
        } = plan;
        let (total, warmup, per_epoch) = (*total, *warmup, *per_epoch);
        let par = self.parallel.clone();
        if self.cfg.orth > 0.0 && train_step.orth_terms().is_empty() && self.progress {
            eprintln!("note: --orth is set but the model has no Tucker-2/CP factor matrices");
        }
        if self.cfg.orth_no_decay {
            super::dso::exempt_from_decay(&mut self.model.session.program, train_step.orth_terms());
        }
        let n_train = loader.source().len();
        let start = Instant::now();
        let wall0 = match carried {
            Some(c) => c.wall_s,
            None => self.history.last().map_or(0.0, |m| m.wall_s),
        };
        while pos.epoch < self.cfg.epochs {
            progress.begin_epoch(pos.epoch, pos.batch as u64, pos.step);
            let t0 = Instant::now();
            let before = carried.take().unwrap_or_default();
            let (mut seen, mut loss_sum, mut correct) =
                (before.seen, before.loss_sum, before.correct);
            let (mut orth_sum, mut steps_done) = (before.orth_sum, before.steps_done);
            let mut lr = self.cfg.lr;
            let mut batches = loader.epoch_from(pos.epoch, pos.batch);
            while let Some(b) = batches.next_batch()? {
                lr = lr_at(self.cfg.lr, &self.cfg.schedule, pos.step, total, warmup);
                check_labels(&b.labels, self.model.classes)?;
                self.model.session.dropout_step = pos.step;
                if par.is_some() {
                    let mut sh = share.lock().expect("step share");
                    sh.local_rows = b.labels.len();
                    sh.global_rows = self.cfg.batch.min(n_train - b.index * self.cfg.batch);
                }
                let stats = match train_step.run(
                    self.model,
                    b.images.into_dyn(),
                    &b.labels,
                    opt,
                    lr,
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        let Some(Diverged { loss }) = e.downcast_ref::<Diverged>() else {
                            return Err(e);
                        };
                        progress.abandon(None);
                        let ck = &self.files.checkpoint;
                        bail!(
                            "the loss became {loss} at epoch {}, step {}: training diverged (try a lower --lr){}",
                            pos.epoch + 1,
                            pos.step,
                            if ck.exists() {
                                format!("; the last good checkpoint is {}", ck.display())
                            } else {
                                "; no checkpoint had been written yet".to_string()
                            }
                        );
                    }
                };
                correct += stats.correct;
                seen += stats.images;
                loss_sum += stats.loss as f64 * stats.images as f64;
                orth_sum += stats.orth;
                steps_done += 1;
                pos.step += 1;
                pos.batch += 1;
                let secs = t0.elapsed().as_secs_f64().max(1e-9);
                let stats = EpochStats {
                    seen,
                    loss_sum,
                    correct,
                    img_per_s: (seen - before.seen) as f64 / secs,
                };
                progress.step(pos.epoch, pos.batch as u64, pos.step, &stats);
                // Data-parallel: the decision every rank took together in the step's all-reduce.
                let stop = match par {
                    Some(_) => stop_agreed.load(Ordering::SeqCst),
                    None => self.stop.load(Ordering::SeqCst),
                };
                if stop {
                    progress.abandon(Some("interrupted"));
                    let (seen, loss_sum, correct) =
                        sum_epoch(par.as_ref(), &before, seen, loss_sum, correct)?;
                    let so_far = EpochSoFar {
                        seen,
                        loss_sum,
                        correct,
                        orth_sum,
                        steps_done,
                        epoch_s: before.epoch_s + t0.elapsed().as_secs_f64(),
                        wall_s: wall0 + start.elapsed().as_secs_f64(),
                    };
                    if par.as_ref().is_none_or(|p| p.is_writer()) {
                        self.save(opt, pos, Some(&so_far))?;
                        eprintln!(
                            "interrupted: checkpoint saved to {} (continue with --resume)",
                            self.files.checkpoint.display()
                        );
                    }
                    return Ok(Outcome::Interrupted);
                }
                if self.cfg.max_steps.is_some_and(|m| pos.step >= m) {
                    break;
                }
            }
            // The epoch's workers end here (a --max-steps stop leaves them blocked on full queues).
            drop(batches);
            progress.end_steps();
            let (seen, loss_sum, correct) =
                sum_epoch(par.as_ref(), &before, seen, loss_sum, correct)?;
            let epoch_s = before.epoch_s + t0.elapsed().as_secs_f64();
            let end_t0 = Instant::now();
            super::precise_bn::recalibrate(
                self.model,
                loader,
                self.cfg.bn_recalibrate,
                par.as_ref(),
            )
            .context("recomputing the batch norms' statistics (--bn-recalibrate)")?;
            let eval = evaluate_on(
                self.model,
                (*test).clone(),
                self.cfg.batch,
                self.cfg.workers,
                normalize.clone(),
                par.as_ref(),
            )?;
            let m = EpochMetrics {
                epoch: pos.epoch + 1,
                step: pos.step,
                lr,
                train_loss: if seen > 0 {
                    loss_sum / seen as f64
                } else {
                    f64::NAN
                },
                train_acc: if seen > 0 {
                    correct as f64 / seen as f64
                } else {
                    f64::NAN
                },
                test_loss: eval.loss,
                test_acc: eval.top1,
                test_top5: eval.top5,
                img_per_s: seen as f64 / epoch_s.max(1e-9),
                epoch_s,
                wall_s: wall0 + start.elapsed().as_secs_f64(),
                orth: orth_sum / steps_done.max(1) as f64,
            };
            progress.eval_took(end_t0.elapsed().as_secs_f64());
            let eta = (pos.step < progress.run_end())
                .then(|| progress.eta(pos.step, false))
                .flatten();
            self.log(&m, eta)?;
            progress.printed();
            let limit = self.cfg.max_steps.is_some_and(|mx| pos.step >= mx);
            if !limit || pos.batch as u64 >= per_epoch {
                pos.epoch += 1;
                pos.batch = 0;
            }
            if par.as_ref().is_none_or(|p| p.is_writer()) {
                self.save(opt, pos, None)?;
            }
            progress.epoch_end_took(end_t0.elapsed().as_secs_f64());
            if limit {
                return Ok(Outcome::StepLimit);
            }
        }
        Ok(Outcome::Finished)
    }

    fn save(&self, opt: &Optimizer, pos: &Position, so_far: Option<&EpochSoFar>) -> Result<()> {
        let extra = serde_json::json!({
            "config": self.cfg,
            "history": self.history,
            "epoch_so_far": so_far,
        });
        checkpoint::save(
            &self.files.checkpoint,
            &self.model.session.program,
            opt,
            pos,
            extra,
        )
    }

    /// Writes the metrics file from the history, whole and atomically: it then always lists
    /// each epoch once, as the checkpoint knows them (appending, a resume after a failed
    /// checkpoint write listed an epoch twice).
    fn write_metrics(&self) -> Result<()> {
        let mut text = String::new();
        for h in &self.history {
            text += &serde_json::to_string(h)?;
            text.push('\n');
        }
        crate::util::write_atomic(&self.files.metrics, text.as_bytes())
            .with_context(|| format!("{}: cannot write metrics", self.files.metrics.display()))
    }

    /// The per-epoch line (with the run's ETA while it continues), the metrics line and the curve.
    fn log(&mut self, m: &EpochMetrics, eta: Option<f64>) -> Result<()> {
        let orth = if self.cfg.orth > 0.0 {
            format!("  dso {:.4}", m.orth)
        } else {
            String::new()
        };
        let eta = eta.map_or(String::new(), |e| format!("  eta {}", format_duration(e)));
        if self.progress {
            eprintln!(
                "epoch {:>3}/{}  lr {:.4}  train loss {:.4} acc {:.2}%  test loss {:.4} acc \
                 {:.2}% top-5 {:.2}%{orth}  {:.0} img/s  {:.0}s{eta}",
                m.epoch,
                self.cfg.epochs,
                m.lr,
                m.train_loss,
                100.0 * m.train_acc,
                m.test_loss,
                100.0 * m.test_acc,
                100.0 * m.test_top5,
                m.img_per_s,
                m.epoch_s
            );
        }
        self.history.push(m.clone());
        if self.parallel.as_ref().is_some_and(|p| !p.is_writer()) {
            return Ok(()); // rank 0 alone writes the metrics and the curve
        }
        self.write_metrics()?;
        let points: Vec<CurvePoint> = self
            .history
            .iter()
            .map(|h| CurvePoint {
                epoch: h.epoch as f64,
                train_loss: h.train_loss,
                test_loss: Some(h.test_loss),
                train_acc: h.train_acc,
                test_acc: Some(h.test_acc),
                lr: h.lr as f64,
            })
            .collect();
        // Re-drawn after every epoch, so that a running (or killed) run has its curve up to
        // date: 13 to 20 ms with the fsync (`cargo bench --bench curve`), under 0.4% of an
        // epoch of the smallest real run (src/report/curve's header has the measurement).
        let title = curve_title(
            &self.model_name,
            &self.model.graph.meta.metadata_props,
            &self.cfg,
        );
        crate::report::curve::write_png(&self.files.curve, &title, &points).with_context(|| {
            format!(
                "{}: cannot write the training curve",
                self.files.curve.display()
            )
        })?;
        Ok(())
    }
}

/// The training curve's title: the model file, with its low-rank format and ranks when its
/// metadata records them (`elrt.format`, `elrt.ranks`, and the file it was converted from,
/// `elrt.source`), and on a second line the recipe.
pub fn curve_title(model_name: &str, meta: &[(String, String)], cfg: &TrainConfig) -> String {
    let get = |k: &str| {
        meta.iter()
            .find(|(kk, v)| kk == k && !v.is_empty())
            .map(|(_, v)| v.as_str())
    };
    let mut head = model_name.to_string();
    if let Some(format) = get("elrt.format") {
        head.push_str(&format!(": {format}"));
        if let Some(ranks) = get("elrt.ranks") {
            head.push_str(&format!(", ranks {ranks}"));
        }
    }
    if let Some(source) = get("elrt.source") {
        let name = Path::new(source)
            .file_name()
            .map_or(source.into(), |n| n.to_string_lossy());
        head.push_str(&format!(" (from {name})"));
    }
    let epochs = if cfg.epochs == 1 { "epoch" } else { "epochs" };
    let mut recipe = format!("{} {epochs}", cfg.epochs);
    if let Some(m) = cfg.max_steps {
        recipe.push_str(&format!(" (at most {m} steps)"));
    }
    let optimizer = match cfg.optimizer {
        OptimKind::Sgd { nesterov: true, .. } => "SGD Nesterov",
        OptimKind::Sgd { .. } => "SGD",
        OptimKind::AdamW { .. } => "AdamW",
    };
    let schedule = match cfg.schedule {
        super::schedule::Schedule::Constant => "constant",
        super::schedule::Schedule::Step { .. } => "step",
        super::schedule::Schedule::Cosine { .. } => "cosine",
        super::schedule::Schedule::OneCycle { .. } => "onecycle",
    };
    recipe.push_str(&format!(
        ", batch {} | {optimizer} lr {} {schedule}, wd {}",
        cfg.batch, cfg.lr, cfg.weight_decay
    ));
    if cfg.warmup_epochs > 0.0 {
        recipe.push_str(&format!(", warm-up {} epochs", cfg.warmup_epochs));
    }
    if cfg.orth > 0.0 {
        recipe.push_str(&format!(" | DSO rho {}", cfg.orth));
    } else {
        recipe.push_str(" | no DSO");
    }
    format!("{head}\n{recipe}")
}

/// What [`Trainer::train_loop`] runs with, set up by [`Trainer::run`].
struct LoopPlan<'a> {
    loader: &'a Loader,
    test: &'a Source,
    normalize: Option<Normalize>,
    /// Steps of the whole run, of the warm-up, of one epoch.
    total: u64,
    warmup: u64,
    per_epoch: u64,
    /// Data-parallel: the rows of each step, and the stop decision of every rank.
    share: &'a Arc<std::sync::Mutex<StepShare>>,
    stop_agreed: &'a Arc<AtomicBool>,
}

/// The epoch's train totals over every rank: what this rank added since `before` (what a
/// resumed epoch carried, already global), summed over the ranks, plus `before`.
fn sum_epoch(
    par: Option<&DataParallel>,
    before: &EpochSoFar,
    seen: usize,
    loss_sum: f64,
    correct: usize,
) -> Result<(usize, f64, usize)> {
    let Some(p) = par else {
        return Ok((seen, loss_sum, correct));
    };
    let mut t = [
        (seen - before.seen) as f64,
        loss_sum - before.loss_sum,
        (correct - before.correct) as f64,
    ];
    p.comm.sum_f64(&mut t)?;
    Ok((
        before.seen + t[0] as usize,
        before.loss_sum + t[1],
        before.correct + t[2] as usize,
    ))
}

/// A Ctrl-C flag: the first Ctrl-C asks the trainer to checkpoint and stop.
pub fn ctrlc_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    ctrlc::set_handler(move || f.store(true, Ordering::SeqCst))
        .map_err(|e| anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        TrainConfig {
            epochs: 30,
            batch: 128,
            lr: 0.1,
            optimizer: OptimKind::Sgd {
                momentum: 0.9,
                nesterov: true,
            },
            weight_decay: 5e-4,
            schedule: super::super::schedule::Schedule::parse("cosine").unwrap(),
            warmup_epochs: 0.0,
            label_smoothing: 0.0,
            seed: 0,
            max_steps: None,
            workers: 2,
            augment: true,
            orth: 0.01,
            orth_no_decay: false,
            normalize: None,
            data_streamed: false,
            bn_recalibrate: 0,
            allow_recipe_change: false,
        }
    }

    #[test]
    fn curve_title_names_the_model_and_the_recipe() {
        let meta: Vec<(String, String)> = [
            ("elrt.source", "models/resnet20.onnx"),
            ("elrt.format", "tucker2"),
            ("elrt.ranks", "params=0.4"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(
            curve_title("factorized.onnx", &meta, &cfg()),
            "factorized.onnx: tucker2, ranks params=0.4 (from resnet20.onnx)\n\
             30 epochs, batch 128 | SGD Nesterov lr 0.1 cosine, wd 0.0005 | DSO rho 0.01"
        );
        // A plain model, one epoch, a step limit, no DSO.
        let mut c = cfg();
        (c.epochs, c.max_steps, c.orth) = (1, Some(30), 0.0);
        c.optimizer = OptimKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        c.warmup_epochs = 0.5;
        assert_eq!(
            curve_title("resnet20.onnx", &[], &c),
            "resnet20.onnx\n1 epoch (at most 30 steps), batch 128 | AdamW lr 0.1 cosine, wd 0.0005, \
             warm-up 0.5 epochs | no DSO"
        );
    }

    /// A recipe written to a checkpoint's JSON and read back is the same recipe: every f32 rate
    /// survives the text round trip (serde_json's default float parser can land one unit off in
    /// the last place: lr 0.0125, the default rate at batch 16, was refused as
    /// `0.012500000186264517 -> 0.012500000186264515`).
    #[test]
    fn a_recipe_read_back_from_its_json_resumes() {
        for lr in [0.1f32, 0.0125, 0.1 * 16.0 / 128.0, 0.0033, 0.07, 1e-3 / 3.0] {
            let mut c = cfg();
            (c.lr, c.weight_decay, c.orth) = (lr, lr / 7.0, lr * 0.3);
            // As `save` writes it: the config inside a JSON value, then text.
            let text = serde_json::json!({ "config": c }).to_string();
            let read: serde_json::Value = serde_json::from_str(&text).unwrap();
            super::super::resume::check(&read["config"], &c, 3, false, Path::new("x.ckpt"))
                .unwrap_or_else(|e| panic!("lr {lr}: {e}"));
        }
    }
}
