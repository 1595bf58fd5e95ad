//! Softmax cross-entropy with label smoothing, and top-k accuracy.
//!
//! Softmax and the loss are fused: the gradient of the fused pair is `p - target` (divided by the
//! batch), which is exact and cheap, while a separate softmax backward would cancel badly for
//! confident predictions.

use super::contiguous;
use crate::engine::{attr_err, shape_err, EngineError, Result};
use ndarray::{Array2, ArrayView2, NdFloat};
use rayon::prelude::*;

const OP: &str = "SoftmaxCrossEntropy";

/// Mean over the batch of `(1 - eps) * nll + eps * mean_k(-log p_k)` (PyTorch's
/// `cross_entropy(label_smoothing=eps)`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SoftmaxCrossEntropy {
    pub label_smoothing: f32,
}

fn check(logits: &[usize], labels: &[usize]) -> Result<(usize, usize)> {
    let &[n, k] = logits else {
        return Err(shape_err(
            OP,
            format!("logits {logits:?} must be [N, classes]"),
        ));
    };
    if k == 0 {
        return Err(shape_err(OP, "logits have no classes"));
    }
    if labels.len() != n {
        return Err(shape_err(
            OP,
            format!("{} labels for a batch of {n}", labels.len()),
        ));
    }
    if let Some((sample, &label)) = labels.iter().enumerate().find(|(_, &l)| l >= k) {
        return Err(EngineError::Label {
            sample,
            label,
            classes: k,
        });
    }
    Ok((n, k))
}

impl SoftmaxCrossEntropy {
    fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return Err(attr_err(
                OP,
                format!(
                    "label smoothing {} must lie in [0, 1]",
                    self.label_smoothing
                ),
            ));
        }
        Ok(())
    }

    /// Per-row loss (f64) and, when `grad` is given, `softmax - target` written into it.
    fn row(&self, z: &[f32], label: usize, grad: Option<&mut [f32]>) -> f64 {
        let k = z.len();
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum_exp: f64 = z.iter().map(|&v| f64::from(v - max).exp()).sum();
        let lse = f64::from(max) + sum_exp.ln();
        let eps = f64::from(self.label_smoothing);
        let nll = lse - f64::from(z[label]);
        let mean_z = z.iter().map(|&v| f64::from(v)).sum::<f64>() / k as f64;
        let smooth = lse - mean_z;
        if let Some(g) = grad {
            let off = eps / k as f64;
            for (j, (gj, &v)) in g.iter_mut().zip(z).enumerate() {
                let p = (f64::from(v - max).exp()) / sum_exp;
                let target = if j == label { 1.0 - eps + off } else { off };
                *gj = (p - target) as f32;
            }
        }
        (1.0 - eps) * nll + eps * smooth
    }

    /// Mean loss over the batch, without a gradient (evaluation).
    pub fn loss(&self, logits: ArrayView2<f32>, labels: &[usize]) -> Result<f32> {
        self.validate()?;
        let (n, k) = check(logits.shape(), labels)?;
        if n == 0 {
            return Ok(0.0);
        }
        let zs = contiguous(&logits);
        let total: f64 = zs
            .par_chunks(k)
            .zip(labels.par_iter())
            .map(|(z, &l)| self.row(z, l, None))
            .collect::<Vec<_>>()
            .iter()
            .sum();
        Ok((total / n as f64) as f32)
    }

    /// Mean loss and `dL/dlogits` for that mean. Labels out of range are an error, not a panic:
    /// they come from datasets.
    pub fn loss_and_grad(
        &self,
        logits: ArrayView2<f32>,
        labels: &[usize],
    ) -> Result<(f32, Array2<f32>)> {
        self.validate()?;
        let (n, k) = check(logits.shape(), labels)?;
        let mut grad = vec![0.0f32; n * k];
        if n == 0 {
            return Ok((0.0, Array2::zeros((0, k))));
        }
        let zs = contiguous(&logits);
        // Collected then summed in order, so the loss does not depend on thread scheduling.
        let losses: Vec<f64> = grad
            .par_chunks_mut(k)
            .zip(zs.par_chunks(k).zip(labels.par_iter()))
            .map(|(g, (z, &l))| self.row(z, l, Some(g)))
            .collect();
        let inv_n = 1.0 / n as f32;
        grad.iter_mut().for_each(|g| *g *= inv_n);
        let loss = losses.iter().sum::<f64>() / n as f64;
        Ok((
            loss as f32,
            Array2::from_shape_vec((n, k), grad).expect("one gradient per logit"),
        ))
    }

    /// From the definition: log-softmax, then the smoothed negative log-likelihood. Test oracle.
    pub fn reference<T: NdFloat>(&self, logits: ArrayView2<T>, labels: &[usize]) -> Result<T> {
        self.validate()?;
        let (n, k) = check(logits.shape(), labels)?;
        let eps = T::from(self.label_smoothing).expect("f32 fits");
        let kf = T::from(k).expect("count fits");
        let mut total = T::zero();
        for (row, &l) in logits.rows().into_iter().zip(labels) {
            let lse = row.mapv(|v| v.exp()).sum().ln();
            let logp = row.mapv(|v| v - lse);
            let uniform = -logp.sum() / kf;
            total += (T::one() - eps) * -logp[l] + eps * uniform;
        }
        Ok(total / T::from(n.max(1)).expect("count fits"))
    }
}

/// Samples whose label is among the `k` largest logits. Ties rank by index (the earlier class
/// first), so constant logits score like an argmax that always says class 0, not as all-correct.
/// A row with a NaN logit is never correct: NaN compares false with everything, so nothing would
/// rank ahead of the label and a diverged model would score 100%.
pub fn topk_correct(logits: ArrayView2<f32>, labels: &[usize], k: usize) -> Result<usize> {
    let (_, classes) = check(logits.shape(), labels)?;
    if k == 0 {
        return Err(attr_err("TopK accuracy", "k must be at least 1"));
    }
    let k = k.min(classes);
    Ok(logits
        .rows()
        .into_iter()
        .zip(labels)
        .filter(|(row, &l)| {
            if row.iter().any(|v| v.is_nan()) {
                return false;
            }
            let t = row[l];
            let ahead = row
                .iter()
                .enumerate()
                .filter(|&(j, &v)| v > t || (v == t && j < l))
                .count();
            ahead < k
        })
        .count())
}

/// Samples whose argmax (first on ties) equals the label.
pub fn top1_correct(logits: ArrayView2<f32>, labels: &[usize]) -> Result<usize> {
    topk_correct(logits, labels, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ops::testutil::*;

    /// NaN logits (a diverged model) count as wrong at every k, whichever logit is NaN.
    #[test]
    fn nan_logits_are_never_correct() {
        let nan = f32::NAN;
        let z = ndarray::arr2(&[[nan, nan, nan], [0.5, nan, 0.1], [1.0, 2.0, 3.0]]);
        let labels = [0, 0, 2];
        for k in 1..=3 {
            assert_eq!(topk_correct(z.view(), &labels, k).unwrap(), 1, "k {k}");
        }
    }

    fn check_grad(eps: f32, n: usize, k: usize, seed: u64) {
        let ce = SoftmaxCrossEntropy {
            label_smoothing: eps,
        };
        let mut rng = Rng::new(seed);
        let z = rand_array(&mut rng, (n, k), -4.0, 4.0);
        let labels: Vec<usize> = (0..n).map(|_| rng.below(k)).collect();
        let (loss, g) = ce.loss_and_grad(z.view(), &labels).unwrap();
        let lr = ce.reference(to_f64(&z.view()).view(), &labels).unwrap();
        assert!(
            (f64::from(loss) - lr).abs() <= 1e-6 * lr.abs().max(1.0),
            "{loss} vs {lr}"
        );
        assert_eq!(ce.loss(z.view(), &labels).unwrap(), loss);
        let fd = fd_grad(&to_f64(&z.view()), |z| {
            ce.reference(z.view(), &labels).unwrap()
        });
        assert_grad("dlogits", &g.view(), &fd.view());
    }

    #[test]
    fn plain_cross_entropy() {
        check_grad(0.0, 7, 10, 1);
    }

    #[test]
    fn label_smoothing() {
        check_grad(0.1, 7, 10, 2);
        check_grad(1.0, 3, 4, 3);
    }

    #[test]
    fn single_class_and_single_sample() {
        check_grad(0.2, 1, 5, 4);
        let ce = SoftmaxCrossEntropy::default();
        let z = Array2::from_elem((2, 1), 3.0f32);
        assert_eq!(ce.loss(z.view(), &[0, 0]).unwrap(), 0.0);
    }

    /// PyTorch: F.cross_entropy(tensor([[1., 2., 3.]]), tensor([0]), label_smoothing=0.1)
    /// = 0.9 * 2.4076059 + 0.1 * (lse - mean) = 0.9 * 2.4076059 + 0.1 * 1.4076059 = 2.3076059.
    #[test]
    fn known_value() {
        let ce = SoftmaxCrossEntropy {
            label_smoothing: 0.1,
        };
        let z = Array2::from_shape_vec((1, 3), vec![1.0f32, 2.0, 3.0]).unwrap();
        let loss = ce.loss(z.view(), &[0]).unwrap();
        assert!((loss - 2.307_606).abs() < 1e-5, "{loss}");
    }

    #[test]
    fn huge_logits_stay_finite() {
        let ce = SoftmaxCrossEntropy {
            label_smoothing: 0.1,
        };
        let z = Array2::from_shape_vec((2, 3), vec![1e4f32, -1e4, 0.0, 0.0, 0.0, 8e3]).unwrap();
        let (loss, g) = ce.loss_and_grad(z.view(), &[0, 0]).unwrap();
        assert!(loss.is_finite());
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bad_labels_and_shapes_are_errors() {
        let ce = SoftmaxCrossEntropy::default();
        let z = Array2::<f32>::zeros((2, 3));
        assert_eq!(
            ce.loss(z.view(), &[0, 3]),
            Err(EngineError::Label {
                sample: 1,
                label: 3,
                classes: 3
            })
        );
        assert!(ce.loss(z.view(), &[0]).is_err());
        assert!(SoftmaxCrossEntropy {
            label_smoothing: 1.5
        }
        .loss(z.view(), &[0, 1])
        .is_err());
        assert!(topk_correct(z.view(), &[0, 1], 0).is_err());
    }

    #[test]
    fn accuracy_counts() {
        let z = Array2::from_shape_vec(
            (3, 4),
            vec![
                0.1f32, 0.5, 0.2, 0.9, // ranks: 3, 1, 2, 0
                1.0, 1.0, 1.0, 1.0, // all tied: index order
                0.0, 0.0, 5.0, -1.0,
            ],
        )
        .unwrap();
        assert_eq!(top1_correct(z.view(), &[3, 0, 2]).unwrap(), 3);
        assert_eq!(top1_correct(z.view(), &[1, 1, 0]).unwrap(), 0);
        assert_eq!(topk_correct(z.view(), &[1, 1, 0], 2).unwrap(), 3);
        assert_eq!(topk_correct(z.view(), &[0, 3, 3], 3).unwrap(), 0);
        assert_eq!(topk_correct(z.view(), &[0, 3, 3], 4).unwrap(), 3);
        assert_eq!(topk_correct(z.view(), &[0, 3, 3], 10).unwrap(), 3);
    }
}
