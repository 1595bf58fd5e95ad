//! The one training step: forward in training mode, softmax cross-entropy, backward, the
//! gradient hooks, double soft orthogonality (DSO), then the optimiser.
//!
//! `elrt train` and `compress` (through [`super::run`]), `elrt speed`, the train-step
//! benchmark and the PyTorch parity test all run this code, so that what is timed and what is
//! checked against PyTorch is what trains. Data-parallel training (an all-reduce of the
//! gradients) and other backends hook in at one place: [`GradHook::gradients_ready`], called
//! once per step when every parameter's gradient is complete and before DSO and the update.
//! DSO's gradient depends only on the (replicated) weights, so it is added after the hooks:
//! an averaging all-reduce then leaves it as it is.

use anyhow::Result;
use ndarray::{ArrayD, Ix2};

use super::dso;
use super::optim::Optimizer;
use crate::engine::backend::{Backend, CpuBackend};
use crate::engine::exec::Mode;
use crate::engine::model::Model;
use crate::engine::ops::{top1_correct, SoftmaxCrossEntropy};
use crate::engine::program::Program;
use crate::lowrank::orth::OrthTerm;

/// Called by [`TrainStep`] once per step when every parameter's gradient is complete. `B` is
/// the backend the gradients live on (the CPU unless said otherwise).
pub trait GradHook<B: Backend = CpuBackend>: Send {
    /// May change the gradients (e.g. average them over processes); an error stops the step
    /// before the update.
    fn gradients_ready(&mut self, backend: &B, program: &mut Program<B::Tensor>) -> Result<()>;
}

/// What one step measured.
#[derive(Debug)]
pub struct StepStats {
    /// Mean cross-entropy of the batch (label smoothing included).
    pub loss: f32,
    /// Images whose top-1 prediction was their label.
    pub correct: usize,
    /// Images in the batch.
    pub images: usize,
    /// The DSO penalty added to the loss (0 when rho is 0).
    pub orth: f64,
    /// The model's logits for the batch, as the loss saw them.
    pub logits: ArrayD<f32>,
}

/// The loss was not finite: the step stopped before backward, and the weights are those
/// before it. Callers downcast to it to say where training diverged.
#[derive(Debug, thiserror::Error)]
#[error("the loss became {loss}")]
pub struct Diverged {
    pub loss: f32,
}

/// The loss, its regularisers and the hooks of a training run on backend `B`.
pub struct TrainStep<B: Backend = CpuBackend> {
    ce: SoftmaxCrossEntropy,
    orth_terms: Vec<OrthTerm>,
    rho: f32,
    hooks: Vec<Box<dyn GradHook<B>>>,
}

impl TrainStep<CpuBackend> {
    /// The step for `program`'s parameters: DSO of strength `rho` (0: off) on its factor
    /// matrices ([`dso::terms`]).
    pub fn new(program: &Program, label_smoothing: f32, rho: f32) -> TrainStep {
        TrainStep::on(&CpuBackend, program, label_smoothing, rho)
    }
}

impl<B: Backend> TrainStep<B> {
    /// [`TrainStep::new`] for a program whose tensors live on `backend`.
    pub fn on(
        backend: &B,
        program: &Program<B::Tensor>,
        label_smoothing: f32,
        rho: f32,
    ) -> TrainStep<B> {
        TrainStep {
            ce: SoftmaxCrossEntropy { label_smoothing },
            orth_terms: dso::terms_on(backend, program),
            rho,
            hooks: Vec::new(),
        }
    }

    /// The factor matrices under DSO.
    pub fn orth_terms(&self) -> &[OrthTerm] {
        &self.orth_terms
    }

    pub fn add_hook(&mut self, hook: Box<dyn GradHook<B>>) {
        self.hooks.push(hook);
    }

    /// Forward, loss, backward, the hooks and DSO: the parameters' gradients are then those
    /// the optimiser applies. Fails with [`Diverged`] (before backward) on a non-finite loss.
    pub fn gradients(
        &mut self,
        model: &mut Model<B>,
        images: ArrayD<f32>,
        labels: &[usize],
    ) -> Result<StepStats> {
        crate::engine::awake::keep_awake(|| self.gradients_awake(model, images, labels))
    }

    fn gradients_awake(
        &mut self,
        model: &mut Model<B>,
        images: ArrayD<f32>,
        labels: &[usize],
    ) -> Result<StepStats> {
        // The loss runs on the host: the logits and their gradient are N x K.
        let logits = model.forward(images, Mode::Train)?;
        let l2 = logits.view().into_dimensionality::<Ix2>()?;
        let (loss, dlogits) = self.ce.loss_and_grad(l2, labels)?;
        if !loss.is_finite() {
            return Err(Diverged { loss }.into());
        }
        let correct = top1_correct(l2, labels)?;
        model.session.backward(dlogits.into_dyn())?;
        let session = &mut model.session;
        for h in &mut self.hooks {
            h.gradients_ready(&session.backend, &mut session.program)?;
        }
        let orth = dso::apply(
            &session.backend,
            &mut session.program,
            &self.orth_terms,
            self.rho,
        );
        Ok(StepStats {
            loss,
            correct,
            images: labels.len(),
            orth,
            logits,
        })
    }

    /// [`Self::gradients`], then the optimiser's update at learning rate `lr`.
    pub fn run(
        &mut self,
        model: &mut Model<B>,
        images: ArrayD<f32>,
        labels: &[usize],
        opt: &mut Optimizer<B::Tensor>,
        lr: f32,
    ) -> Result<StepStats> {
        crate::engine::awake::keep_awake(|| {
            let stats = self.gradients(model, images, labels)?;
            let session = &mut model.session;
            opt.step_program_on(&session.backend, lr, &mut session.program)?;
            Ok(stats)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its calls and scales every gradient, to show where in the step it runs.
    struct Scale {
        factor: f32,
        calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl GradHook for Scale {
        fn gradients_ready(&mut self, _: &CpuBackend, program: &mut Program) -> Result<()> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            for p in &mut program.params {
                p.grad *= self.factor;
            }
            Ok(())
        }
    }

    fn model() -> Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/resnet20.onnx");
        Model::load(&path, 4).unwrap()
    }

    fn batch(m: &Model) -> (ArrayD<f32>, Vec<usize>) {
        let mut r = crate::rng::Rng::new(3);
        let x = ArrayD::from_shape_fn(ndarray::IxDyn(&m.input_shape), |_| r.normal());
        (x, vec![0, 1, 2, 3])
    }

    /// A hook sees the gradients of backward (before DSO and the update): doubling them in the
    /// hook gives twice the gradients of a step without it, and it runs once per step.
    #[test]
    fn a_hook_runs_once_per_step_on_the_complete_gradients() {
        let (mut a, mut b) = (model(), model());
        let (x, labels) = batch(&a);
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut plain = TrainStep::new(&a.session.program, 0.0, 0.0);
        let mut hooked = TrainStep::new(&b.session.program, 0.0, 0.0);
        hooked.add_hook(Box::new(Scale {
            factor: 2.0,
            calls: calls.clone(),
        }));
        let sa = plain.gradients(&mut a, x.clone(), &labels).unwrap();
        let sb = hooked.gradients(&mut b, x, &labels).unwrap();
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(sa.loss, sb.loss);
        assert_eq!(sa.images, 4);
        let mut checked = 0;
        for (pa, pb) in a
            .session
            .program
            .params
            .iter()
            .zip(&b.session.program.params)
        {
            for (ga, gb) in pa.grad.iter().zip(pb.grad.iter()) {
                assert!(
                    (2.0 * ga - gb).abs() <= 1e-6 * ga.abs().max(1.0),
                    "{}",
                    pa.name
                );
            }
            checked += 1;
        }
        assert!(checked > 10);
    }

    /// A non-finite loss stops the step before backward and the update.
    #[test]
    fn a_non_finite_loss_is_diverged_and_leaves_the_weights() {
        let mut m = model();
        let (mut x, labels) = batch(&m);
        x[[0, 0, 0, 0]] = f32::NAN;
        let before: Vec<ArrayD<f32>> = m
            .session
            .program
            .params
            .iter()
            .map(|p| p.value.clone())
            .collect();
        let mut step = TrainStep::new(&m.session.program, 0.0, 0.0);
        let mut opt = Optimizer::new(
            super::super::optim::OptimKind::Sgd {
                momentum: 0.9,
                nesterov: false,
            },
            0.0,
        );
        let e = step.run(&mut m, x, &labels, &mut opt, 0.1).unwrap_err();
        assert!(e.downcast_ref::<Diverged>().is_some(), "{e:#}");
        for (p, b) in m.session.program.params.iter().zip(&before) {
            assert_eq!(&p.value, b, "{}", p.name);
        }
    }
}
