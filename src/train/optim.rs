//! Optimisers, with PyTorch's exact update rules so that one step matches `torch.optim`.
//!
//! Weight decay is per parameter: by default it applies to conv and linear weights only, not to
//! BN scales and shifts nor to biases (decaying those hurts accuracy and is not what the ResNet
//! recipes do). The caller says which parameters decay.

use ndarray::{ArrayD, Zip};
use serde::{Deserialize, Serialize};

/// One trainable tensor and its gradient.
pub struct ParamRef<'a> {
    pub value: &'a mut ArrayD<f32>,
    pub grad: &'a ArrayD<f32>,
    pub decay: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum OptimKind {
    Sgd { momentum: f32, nesterov: bool },
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Optimizer {
    pub kind: OptimKind,
    pub weight_decay: f32,
    /// Steps taken, for Adam's bias correction and for resuming.
    pub steps: u64,
    /// Momentum buffer (SGD) or first moment (AdamW), per parameter.
    m: Vec<Vec<f32>>,
    /// Second moment (AdamW).
    v: Vec<Vec<f32>>,
}

impl Optimizer {
    pub fn new(kind: OptimKind, weight_decay: f32) -> Optimizer {
        Optimizer {
            kind,
            weight_decay,
            steps: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// The optimiser's state tensors, for checkpoints.
    pub fn state(&self) -> (&[Vec<f32>], &[Vec<f32>]) {
        (&self.m, &self.v)
    }

    pub fn set_state(&mut self, steps: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) {
        self.steps = steps;
        self.m = m;
        self.v = v;
    }

    /// One update of every parameter of a compiled program from its gradients.
    pub fn step_program(&mut self, lr: f32, program: &mut crate::engine::program::Program) {
        let mut refs: Vec<ParamRef> = program
            .params
            .iter_mut()
            .map(|p| ParamRef {
                value: &mut p.value,
                grad: &p.grad,
                decay: p.decay,
            })
            .collect();
        self.step(lr, &mut refs);
    }

    /// One update with learning rate `lr` over `params` (always given in the same order).
    pub fn step(&mut self, lr: f32, params: &mut [ParamRef]) {
        if self.m.len() != params.len() {
            self.m = params.iter().map(|p| vec![0.0; p.value.len()]).collect();
            self.v = match self.kind {
                OptimKind::AdamW { .. } => {
                    params.iter().map(|p| vec![0.0; p.value.len()]).collect()
                }
                OptimKind::Sgd { .. } => Vec::new(),
            };
        }
        self.steps += 1;
        let first = self.steps == 1;
        let wd = self.weight_decay;
        for (i, p) in params.iter_mut().enumerate() {
            let decay = if p.decay { wd } else { 0.0 };
            let value = p.value.as_slice_mut().expect("parameters are contiguous");
            let grad = p.grad.as_slice().expect("gradients are contiguous");
            match self.kind {
                OptimKind::Sgd { momentum, nesterov } => {
                    // torch.optim.SGD: g += wd*w; buf = g on the first step, else
                    // buf = momentum*buf + g; step along g + momentum*buf (Nesterov) or buf.
                    let buf = &mut self.m[i];
                    Zip::from(value)
                        .and(grad)
                        .and(buf.as_mut_slice())
                        .for_each(|w, &g, b| {
                            let g = g + decay * *w;
                            *b = if first || momentum == 0.0 {
                                g
                            } else {
                                momentum * *b + g
                            };
                            let d = if nesterov { g + momentum * *b } else { *b };
                            *w -= lr * d;
                        });
                }
                OptimKind::AdamW { beta1, beta2, eps } => {
                    // torch.optim.AdamW: decoupled decay w *= 1 - lr*wd, then Adam with bias
                    // correction.
                    let t = self.steps as i32;
                    let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                    let step = lr / bc1;
                    let bc2_sqrt = bc2.sqrt();
                    Zip::from(value)
                        .and(grad)
                        .and(self.m[i].as_mut_slice())
                        .and(self.v[i].as_mut_slice())
                        .for_each(|w, &g, m, v| {
                            *w *= 1.0 - lr * decay;
                            *m = beta1 * *m + (1.0 - beta1) * g;
                            *v = beta2 * *v + (1.0 - beta2) * g * g;
                            *w -= step * *m / ((*v).sqrt() / bc2_sqrt + eps);
                        });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::arr1;

    fn run(kind: OptimKind, wd: f32, decay: bool, grads: &[f32]) -> f32 {
        let mut w = arr1(&[1.0f32]).into_dyn();
        let mut opt = Optimizer::new(kind, wd);
        for &g in grads {
            let g = arr1(&[g]).into_dyn();
            opt.step(
                0.1,
                &mut [ParamRef {
                    value: &mut w,
                    grad: &g,
                    decay,
                }],
            );
        }
        w[0]
    }

    #[test]
    fn sgd_matches_hand_computation() {
        let sgd = OptimKind::Sgd {
            momentum: 0.9,
            nesterov: false,
        };
        // w=1, g=0.5, wd=0.1: g'=0.6, buf=0.6, w=1-0.06=0.94; then g'=0.5+0.094=0.594,
        // buf=0.9*0.6+0.594=1.134, w=0.94-0.1134=0.8266.
        assert!((run(sgd, 0.1, true, &[0.5, 0.5]) - 0.8266).abs() < 1e-6);
        // No decay on this parameter: g=0.5, buf=0.5, w=0.95; buf=0.95, w=0.855.
        assert!((run(sgd, 0.1, false, &[0.5, 0.5]) - 0.855).abs() < 1e-6);
        let nag = OptimKind::Sgd {
            momentum: 0.9,
            nesterov: true,
        };
        // g=0.5: buf=0.5, d=0.5+0.45=0.95, w=0.905.
        assert!((run(nag, 0.0, false, &[0.5]) - 0.905).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_is_lr_sized() {
        let adam = OptimKind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        // First Adam step moves by lr * sign(g) (bias-corrected m/sqrt(v) = 1), after the
        // decoupled decay 1 - lr*wd.
        let w = run(adam, 0.01, true, &[3.0]);
        assert!((w - (1.0 * (1.0 - 0.001) - 0.1)).abs() < 1e-5, "{w}");
    }
}
