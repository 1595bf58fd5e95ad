//! Batch-norm statistics of the weights being evaluated ("precise BN", Wu & Johnson,
//! "Rethinking 'Batch' in BatchNorm", 2021), before every evaluation of a run.
//!
//! A BN's running statistics are an exponential average over the training steps, so they carry
//! the statistics of earlier weights. From random initialisation the first steps' activations
//! can be orders of magnitude wider than the last ones', and with PyTorch's momentum 0.1 a run of
//! a few dozen steps still remembers them: torchvision efficientnet_v2_s (dynamo export, 64x64,
//! a 3-class folder of 360 images, batch 32, 4 epochs = 44 steps) trained to 66-77% on its
//! training batches but tested at chance (33.33%, loss ln 3, near-constant logits) in every
//! epoch, in elrt and in PyTorch alike with elrt's weights; the running variances of its last
//! stages were 3 to 37 times (median per layer) those of its final weights' activations. With
//! statistics recomputed from the final weights PyTorch tested it at 68%.
//!
//! So before each evaluation the running statistics are recomputed from the current weights:
//! forward passes in training mode (no backward) over training batches, augmented as training
//! augments them (the distribution the running averages describe), in a shuffled order of their
//! own, every BN's momentum set so that its running mean and variance
//! become the plain average over those batches of the batch means and (unbiased) variances, as
//! PyTorch's `momentum=None` does. Training never reads running statistics, so the weights and
//! the training trajectory are untouched: only what evaluation, checkpoints and the exported file
//! hold changes, and a resumed run recomputes the same values. Augmented or not: the main job
//! (ResNet-20 Tucker-2 on the synthetic set, 4 epochs) tested 68.00% with the running averages,
//! 67.80% recalibrated on augmented batches and 66.30% on plain images; efficientnet_v2_s above
//! 71.11% both ways (test loss 0.531 augmented, 0.556 plain).

use anyhow::Result;

use super::parallel::DataParallel;
use crate::data::Loader;
use crate::engine::exec::Mode;
use crate::engine::model::Model;
use crate::engine::program::Kernel;

/// The images `--bn-recalibrate` takes by default: a few batches at the usual sizes, a small
/// share of an epoch on CIFAR-10 (8 forward passes at batch 128 against 390 training steps).
pub const DEFAULT_IMAGES: usize = 1024;

/// Epoch index of the recalibration's own shuffled order and augmentation (never a training
/// epoch's; not `u64::MAX`, which the loader's messages count past).
const ORDER_EPOCH: u64 = 1 << 40;

/// Recomputes every BatchNormalization's running statistics from `model`'s current weights over
/// up to `images` images of the training loader `train` (whole batches, at least one: the
/// training's batches, augmentation and shard included, in the order of an epoch of their own),
/// as the module doc says. Returns the number of images used (0 when the model has no BN or
/// `images` is 0). Under data parallelism each rank takes its rows of every batch (with
/// `--sync-bn` the statistics are then those of the whole batches, as in training), and every
/// rank then holds rank 0's statistics, as after each step.
pub fn recalibrate(
    model: &mut Model,
    train: &Loader,
    images: usize,
    parallel: Option<&DataParallel>,
) -> Result<usize> {
    let saved = momenta(model);
    if images == 0 || saved.is_empty() {
        return Ok(0);
    }
    let batches = images.div_ceil(train.config().batch).max(1);
    let mut epoch = train.epoch(ORDER_EPOCH);
    let mut run = || -> Result<usize> {
        let (mut done, mut used) = (0usize, 0usize);
        while done < batches {
            let Some(b) = epoch.next_batch()? else {
                break;
            };
            // Batch k (from 0) weighs 1/(k+1) against the average of those before it.
            let old_weight = done as f32 / (done + 1) as f32;
            set_momenta(model, |_| old_weight);
            used += b.labels.len();
            model.forward(b.images.into_dyn(), Mode::Train)?;
            done += 1;
        }
        Ok(used)
    };
    let result = run();
    let mut it = saved.into_iter();
    set_momenta(model, |_| it.next().expect("one momentum per batch norm"));
    let used = result?;
    match parallel {
        Some(p) => {
            p.share_rank0_state(&mut model.session.program)?;
            Ok(used * p.size())
        }
        None => Ok(used),
    }
}

/// Every batch norm's momentum, in program order.
fn momenta(model: &Model) -> Vec<f32> {
    let mut v = Vec::new();
    for s in &model.session.program.steps {
        if let Kernel::BatchNorm { op, .. } | Kernel::BatchNormAdd { op, .. } = &s.kernel {
            v.push(op.momentum);
        }
    }
    v
}

/// Sets every batch norm's momentum (ONNX's convention: the old value's weight) to `f(old)`,
/// in program order.
fn set_momenta(model: &mut Model, mut f: impl FnMut(f32) -> f32) {
    for s in &mut model.session.program.steps {
        if let Kernel::BatchNorm { op, .. } | Kernel::BatchNormAdd { op, .. } = &mut s.kernel {
            op.momentum = f(op.momentum);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Dataset, Source};
    use ndarray::Axis;

    fn resnet20(batch: usize) -> Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/resnet20.onnx");
        Model::load(&path, batch).unwrap()
    }

    /// `n` random 3x32x32 images in 10 classes.
    fn data(n: usize) -> Source {
        let mut rng = crate::rng::Rng::new(5);
        let pixels = (0..n * 3 * 32 * 32)
            .map(|_| (rng.uniform() * 255.0) as u8)
            .collect();
        let labels = (0..n).map(|i| i % 10).collect();
        let names = (0..10).map(|i| format!("c{i}")).collect();
        Dataset::new("random", [3, 32, 32], pixels, labels, names)
            .unwrap()
            .into()
    }

    /// A training loader over `n` random images, batches of `batch` (augmented, no workers).
    fn loader(n: usize, batch: usize, seed: u64) -> Loader {
        let mut cfg = crate::data::LoaderConfig::train(batch, seed);
        cfg.workers = 0;
        cfg.drop_last = true;
        Loader::new(data(n), cfg).unwrap()
    }

    /// The running statistics (mean, var) of the first batch norm.
    fn first_bn_stats(m: &Model) -> (Vec<f32>, Vec<f32>) {
        let p = &m.session.program;
        let s =
            p.steps
                .iter()
                .find_map(|s| match &s.kernel {
                    Kernel::BatchNorm { mean, var, .. }
                    | Kernel::BatchNormAdd { mean, var, .. } => Some((*mean, *var)),
                    _ => None,
                })
                .unwrap();
        (
            p.state[s.0].1.iter().copied().collect(),
            p.state[s.1].1.iter().copied().collect(),
        )
    }

    /// Over two batches, the first BN's running mean and variance are the averages of its
    /// input's per-batch means and unbiased variances (the first conv's output, computed
    /// separately here in f64), whatever the running statistics were before, and the momenta
    /// are restored.
    #[test]
    fn running_statistics_become_the_average_of_the_batches_statistics() {
        let batch = 8;
        let mut m = resnet20(batch);
        let before = momenta(&m);
        // Running statistics far from the data's, as after the first steps of a run.
        for (_, t) in m.session.program.state.iter_mut() {
            t.fill(1e4);
        }
        let train = loader(24, batch, 3);
        let used = recalibrate(&mut m, &train, 16, None).unwrap();
        assert_eq!(used, 16);
        assert_eq!(momenta(&m), before);
        let (rm, rv) = first_bn_stats(&m);
        // The same two batches, in the recalibration's order, through the first conv.
        let mut epoch = train.epoch(ORDER_EPOCH);
        let c = rm.len();
        let (mut mean, mut var) = (vec![0f64; c], vec![0f64; c]);
        for _ in 0..2 {
            let b = epoch.next_batch().unwrap().unwrap();
            let trace = m.session.forward_trace(b.images.into_dyn()).unwrap();
            let y = &trace[0].1;
            assert_eq!(y.shape()[1], c, "{}", trace[0].0);
            for (ch, plane) in y.axis_iter(Axis(1)).enumerate() {
                let v: Vec<f64> = plane.iter().map(|&x| x as f64).collect();
                let mu = v.iter().sum::<f64>() / v.len() as f64;
                let s2 = v.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
                mean[ch] += mu / 2.0;
                var[ch] += s2 / 2.0;
            }
        }
        for ch in 0..c {
            assert!(
                (rm[ch] as f64 - mean[ch]).abs() <= 1e-4 * (1.0 + mean[ch].abs()),
                "{ch}"
            );
            assert!((rv[ch] as f64 - var[ch]).abs() <= 1e-4 * var[ch], "{ch}");
        }
    }

    /// The result depends on the weights and the data only: from any running statistics the
    /// same bits; no images, or a model without batch norms, leave them as they were.
    #[test]
    fn recalibration_forgets_the_running_statistics_it_started_from() {
        let batch = 8;
        let train = loader(16, batch, 1);
        let mut a = resnet20(batch);
        let mut b = resnet20(batch);
        for (_, t) in b.session.program.state.iter_mut() {
            t.fill(-3.0);
        }
        let untouched = first_bn_stats(&b);
        assert_eq!(recalibrate(&mut b, &train, 0, None).unwrap(), 0);
        assert_eq!(first_bn_stats(&b), untouched);
        recalibrate(&mut a, &train, 16, None).unwrap();
        recalibrate(&mut b, &train, 16, None).unwrap();
        for ((_, x), (_, y)) in a.session.program.state.iter().zip(&b.session.program.state) {
            assert_eq!(x, y);
        }
    }
}
