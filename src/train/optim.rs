//! Optimisers, with PyTorch's exact update rules so that one step matches `torch.optim`.
//!
//! Weight decay is per parameter: by default it applies to conv and linear weights only, not to
//! BN scales and shifts nor to biases (decaying those hurts accuracy and is not what the ResNet
//! recipes do). The caller says which parameters decay.

use anyhow::Result;
use ndarray::ArrayD;
use serde::{Deserialize, Serialize};

use crate::engine::backend::{Backend, CpuBackend, Update};
use crate::engine::program::Program;

/// One trainable tensor and its gradient, on a backend whose tensors are `T`.
pub struct ParamRef<'a, T = ArrayD<f32>> {
    pub value: &'a mut T,
    pub grad: &'a T,
    pub decay: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum OptimKind {
    Sgd { momentum: f32, nesterov: bool },
    AdamW { beta1: f32, beta2: f32, eps: f32 },
}

/// The optimiser: its rule and hyper-parameters (serialised into checkpoints' headers) and its
/// moment buffers, which live where the parameters do (`T`, a backend's tensor type; checkpoints
/// write them as raw data after the header).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Optimizer<T = ArrayD<f32>> {
    pub kind: OptimKind,
    pub weight_decay: f32,
    /// Steps taken, for Adam's bias correction and for resuming.
    pub steps: u64,
    /// Momentum buffer (SGD) or first moment (AdamW), per parameter.
    #[serde(skip)]
    m: Vec<T>,
    /// Second moment (AdamW).
    #[serde(skip)]
    v: Vec<T>,
}

impl<T> Optimizer<T> {
    pub fn new(kind: OptimKind, weight_decay: f32) -> Optimizer<T> {
        Optimizer {
            kind,
            weight_decay,
            steps: 0,
            m: Vec::new(),
            v: Vec::new(),
        }
    }

    /// The optimiser's state tensors, for checkpoints.
    pub fn state(&self) -> (&[T], &[T]) {
        (&self.m, &self.v)
    }

    pub fn set_state(&mut self, steps: u64, m: Vec<T>, v: Vec<T>) {
        self.steps = steps;
        self.m = m;
        self.v = v;
    }

    /// One update of every parameter of a program on `backend` from its gradients.
    pub fn step_program_on<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        lr: f32,
        program: &mut Program<T>,
    ) -> Result<()> {
        let mut refs: Vec<ParamRef<T>> = program
            .params
            .iter_mut()
            .map(|p| ParamRef {
                value: &mut p.value,
                grad: &p.grad,
                decay: p.decay,
            })
            .collect();
        self.step_on(backend, lr, &mut refs)
    }

    /// One update with learning rate `lr` over `params` (always given in the same order): the
    /// per-step scalars here, the elementwise rule on the backend ([`Backend::update`]).
    pub fn step_on<B: Backend<Tensor = T>>(
        &mut self,
        backend: &B,
        lr: f32,
        params: &mut [ParamRef<T>],
    ) -> Result<()> {
        if self.m.len() != params.len() {
            let zeros = |p: &ParamRef<T>| backend.zeros(backend.dims(p.value));
            self.m = params.iter().map(zeros).collect();
            self.v = match self.kind {
                OptimKind::AdamW { .. } => params.iter().map(zeros).collect(),
                OptimKind::Sgd { .. } => Vec::new(),
            };
        }
        self.steps += 1;
        let first = self.steps == 1;
        let wd = self.weight_decay;
        for (i, p) in params.iter_mut().enumerate() {
            let decay = if p.decay { wd } else { 0.0 };
            let rule = match self.kind {
                // torch.optim.SGD: g += wd*w; buf = g on the first step, else
                // buf = momentum*buf + g; step along g + momentum*buf (Nesterov) or buf.
                OptimKind::Sgd { momentum, nesterov } => Update::Sgd {
                    lr,
                    decay,
                    momentum,
                    nesterov,
                    first,
                },
                // torch.optim.AdamW: decoupled decay w *= 1 - lr*wd, then Adam with bias
                // correction.
                OptimKind::AdamW { beta1, beta2, eps } => {
                    let t = self.steps as i32;
                    let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
                    Update::AdamW {
                        lr,
                        decay,
                        beta1,
                        beta2,
                        eps,
                        step: lr / bc1,
                        bc2_sqrt: bc2.sqrt(),
                    }
                }
            };
            backend.update(&rule, p.value, p.grad, &mut self.m[i], self.v.get_mut(i))?;
        }
        Ok(())
    }
}

impl Optimizer {
    /// [`Self::step_program_on`] on the CPU.
    pub fn step_program(&mut self, lr: f32, program: &mut Program) -> Result<()> {
        self.step_program_on(&CpuBackend, lr, program)
    }

    /// [`Self::step_on`] on the CPU.
    pub fn step(&mut self, lr: f32, params: &mut [ParamRef]) -> Result<()> {
        self.step_on(&CpuBackend, lr, params)
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
            )
            .unwrap();
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
