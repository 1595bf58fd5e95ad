//! The engine's backend boundary holds: a second backend with its own tensor type trains the
//! same model as the CPU backend, through the same executor, training step and optimiser, with
//! no other code changed, and only the batch, the logits and DSO's small matrices cross the
//! host boundary per step.
//!
//! `Counted` wraps every tensor in a type of its own (`Dev`), so any code path that reached
//! past the trait into host arrays would not compile against it, and counts the transfers. Its
//! kernels delegate to `CpuBackend`, so results must be bit-identical to a CPU session.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;
use elrt::engine::backend::{Backend, BnGrads, ConvGrads, CpuBackend, GemmGrads, LnGrads, Update};
use elrt::engine::model::Model;
use elrt::engine::ops::{
    Activation, AveragePool2d, BatchNorm2d, BatchNormSaved, Conv2d, Gemm, GroupNorm, LayerNorm,
    LayerNormSaved, MaxPool2d, MaxPoolSaved,
};
use elrt::engine::stat_sync::StatSync;
use elrt::engine::tensor_ops::BinOp;
use elrt::lowrank::rank::RankPolicy;
use elrt::lowrank::{convert, ConvertOptions, Format, InitMode};
use elrt::train::optim::{OptimKind, Optimizer};
use elrt::train::step::TrainStep;
use ndarray::ArrayD;

/// A tensor "on the device": not an `ArrayD`, so host code cannot touch it.
#[derive(Clone, Debug)]
struct Dev(ArrayD<f32>);

#[derive(Default)]
struct Counted {
    uploads: AtomicUsize,
    downloads: AtomicUsize,
    kernels: AtomicUsize,
}

const C: CpuBackend = CpuBackend;

impl Counted {
    fn k(&self) {
        self.kernels.fetch_add(1, Ordering::Relaxed);
    }
}

fn d(r: Result<ArrayD<f32>>) -> Result<Dev> {
    r.map(Dev)
}

impl Backend for Counted {
    type Tensor = Dev;
    type BnSaved = BatchNormSaved;
    type PoolSaved = MaxPoolSaved;
    type LnSaved = LayerNormSaved;

    fn name(&self) -> &'static str {
        "counted"
    }
    fn upload(&self, a: ArrayD<f32>) -> Dev {
        self.uploads.fetch_add(1, Ordering::Relaxed);
        Dev(a)
    }
    fn download(&self, t: &Dev) -> ArrayD<f32> {
        self.downloads.fetch_add(1, Ordering::Relaxed);
        t.0.clone()
    }
    fn dims<'a>(&self, t: &'a Dev) -> &'a [usize] {
        t.0.shape()
    }
    fn zeros(&self, shape: &[usize]) -> Dev {
        Dev(C.zeros(shape))
    }
    fn fill(&self, t: &mut Dev, value: f32) {
        C.fill(&mut t.0, value)
    }
    fn add_assign(&self, acc: &mut Dev, g: &Dev) -> Result<()> {
        C.add_assign(&mut acc.0, &g.0)
    }
    fn mul(&self, a: &Dev, b: &Dev) -> Result<Dev> {
        self.k();
        d(C.mul(&a.0, &b.0))
    }
    fn conv_forward(&self, op: &Conv2d, x: &Dev, w: &Dev, b: Option<&Dev>) -> Result<Dev> {
        self.k();
        d(C.conv_forward(op, &x.0, &w.0, b.map(|b| &b.0)))
    }
    fn conv_backward(
        &self,
        op: &Conv2d,
        x: &Dev,
        w: &Dev,
        dy: Dev,
        needs_dx: bool,
        needs_db: bool,
    ) -> Result<ConvGrads<Dev>> {
        self.k();
        let g = C.conv_backward(op, &x.0, &w.0, dy.0, needs_dx, needs_db)?;
        Ok(ConvGrads {
            dx: g.dx.map(Dev),
            dw: Dev(g.dw),
            db: Dev(g.db),
        })
    }
    fn gemm_forward(&self, op: &Gemm, a: &Dev, b: &Dev, c: Option<&Dev>) -> Result<Dev> {
        self.k();
        d(C.gemm_forward(op, &a.0, &b.0, c.map(|c| &c.0)))
    }
    fn gemm_backward(
        &self,
        op: &Gemm,
        a: &Dev,
        b: &Dev,
        c_shape: Option<&[usize]>,
        dy: Dev,
    ) -> Result<GemmGrads<Dev>> {
        self.k();
        let g = C.gemm_backward(op, &a.0, &b.0, c_shape, dy.0)?;
        Ok(GemmGrads {
            da: Dev(g.da),
            db: Dev(g.db),
            dc: g.dc.map(Dev),
        })
    }
    fn bn_forward_train(
        &self,
        op: &BatchNorm2d,
        x: &Dev,
        scale: &Dev,
        bias: &Dev,
        rm: &mut Dev,
        rv: &mut Dev,
        sync: Option<&dyn StatSync>,
    ) -> Result<(Dev, BatchNormSaved)> {
        self.k();
        let (y, s) = C.bn_forward_train(op, &x.0, &scale.0, &bias.0, &mut rm.0, &mut rv.0, sync)?;
        Ok((Dev(y), s))
    }
    fn bn_forward_eval(
        &self,
        op: &BatchNorm2d,
        x: &Dev,
        scale: &Dev,
        bias: &Dev,
        mean: &Dev,
        var: &Dev,
    ) -> Result<Dev> {
        self.k();
        d(C.bn_forward_eval(op, &x.0, &scale.0, &bias.0, &mean.0, &var.0))
    }
    fn bn_backward_train(
        &self,
        op: &BatchNorm2d,
        x: &Dev,
        scale: &Dev,
        saved: &BatchNormSaved,
        dy: Dev,
        sync: Option<&dyn StatSync>,
    ) -> Result<BnGrads<Dev>> {
        self.k();
        let g = C.bn_backward_train(op, &x.0, &scale.0, saved, dy.0, sync)?;
        Ok(BnGrads {
            dx: Dev(g.dx),
            dscale: Dev(g.dscale),
            dbias: Dev(g.dbias),
        })
    }
    fn layer_norm_forward(
        &self,
        op: &LayerNorm,
        x: &Dev,
        scale: &Dev,
        bias: &Dev,
    ) -> Result<(Dev, LayerNormSaved)> {
        self.k();
        let (y, s) = C.layer_norm_forward(op, &x.0, &scale.0, &bias.0)?;
        Ok((Dev(y), s))
    }
    fn layer_norm_backward(
        &self,
        op: &LayerNorm,
        x: &Dev,
        scale: &Dev,
        saved: &LayerNormSaved,
        dy: Dev,
    ) -> Result<LnGrads<Dev>> {
        self.k();
        let g = C.layer_norm_backward(op, &x.0, &scale.0, saved, dy.0)?;
        Ok(LnGrads {
            dx: Dev(g.dx),
            dscale: Dev(g.dscale),
            dbias: Dev(g.dbias),
        })
    }
    fn group_norm_forward(
        &self,
        op: &GroupNorm,
        x: &Dev,
        scale: &Dev,
        bias: &Dev,
    ) -> Result<(Dev, LayerNormSaved)> {
        self.k();
        let (y, s) = C.group_norm_forward(op, &x.0, &scale.0, &bias.0)?;
        Ok((Dev(y), s))
    }
    fn group_norm_backward(
        &self,
        op: &GroupNorm,
        x: &Dev,
        scale: &Dev,
        saved: &LayerNormSaved,
        dy: Dev,
    ) -> Result<LnGrads<Dev>> {
        self.k();
        let g = C.group_norm_backward(op, &x.0, &scale.0, saved, dy.0)?;
        Ok(LnGrads {
            dx: Dev(g.dx),
            dscale: Dev(g.dscale),
            dbias: Dev(g.dbias),
        })
    }
    fn act_forward(&self, op: &Activation, x: &Dev) -> Result<Dev> {
        self.k();
        d(C.act_forward(op, &x.0))
    }
    fn act_backward(&self, op: &Activation, x: &Dev, dy: Dev) -> Result<Dev> {
        self.k();
        d(C.act_backward(op, &x.0, dy.0))
    }
    fn binary_forward(&self, op: BinOp, a: &Dev, b: &Dev) -> Result<Dev> {
        self.k();
        d(C.binary_forward(op, &a.0, &b.0))
    }
    fn binary_backward(&self, op: BinOp, a: &Dev, b: &Dev, dy: Dev) -> Result<(Dev, Dev)> {
        self.k();
        let (x, y) = C.binary_backward(op, &a.0, &b.0, dy.0)?;
        Ok((Dev(x), Dev(y)))
    }
    fn add_relu_forward(&self, a: &Dev, b: &Dev) -> Result<Dev> {
        self.k();
        d(C.add_relu_forward(&a.0, &b.0))
    }
    fn add_relu_backward(&self, a: &Dev, b: &Dev, z: &Dev, dz: Dev) -> Result<(Dev, Dev)> {
        self.k();
        let (x, y) = C.add_relu_backward(&a.0, &b.0, &z.0, dz.0)?;
        Ok((Dev(x), Dev(y)))
    }
    fn max_pool_forward(&self, op: &MaxPool2d, x: &Dev) -> Result<(Dev, MaxPoolSaved)> {
        self.k();
        let (y, s) = C.max_pool_forward(op, &x.0)?;
        Ok((Dev(y), s))
    }
    fn max_pool_backward(&self, op: &MaxPool2d, saved: &MaxPoolSaved, dy: Dev) -> Result<Dev> {
        self.k();
        d(C.max_pool_backward(op, saved, dy.0))
    }
    fn avg_pool_forward(&self, op: &AveragePool2d, x: &Dev) -> Result<Dev> {
        self.k();
        d(C.avg_pool_forward(op, &x.0))
    }
    fn avg_pool_backward(&self, op: &AveragePool2d, x_shape: &[usize], dy: Dev) -> Result<Dev> {
        self.k();
        d(C.avg_pool_backward(op, x_shape, dy.0))
    }
    fn global_avg_pool_forward(&self, x: &Dev) -> Result<Dev> {
        self.k();
        d(C.global_avg_pool_forward(&x.0))
    }
    fn global_avg_pool_backward(&self, x_shape: &[usize], dy: Dev) -> Result<Dev> {
        self.k();
        d(C.global_avg_pool_backward(x_shape, dy.0))
    }
    fn reduce_mean(&self, x: &Dev, axes: &[usize]) -> Result<Dev> {
        self.k();
        d(C.reduce_mean(&x.0, axes))
    }
    fn reduce_mean_backward(&self, x_shape: &[usize], axes: &[usize], dy: Dev) -> Result<Dev> {
        self.k();
        d(C.reduce_mean_backward(x_shape, axes, dy.0))
    }
    fn reshape(&self, x: &Dev, shape: &[usize]) -> Result<Dev> {
        d(C.reshape(&x.0, shape))
    }
    fn transpose(&self, x: &Dev, perm: &[usize]) -> Result<Dev> {
        d(C.transpose(&x.0, perm))
    }
    fn concat(&self, axis: usize, xs: &[&Dev]) -> Result<Dev> {
        let xs: Vec<&ArrayD<f32>> = xs.iter().map(|x| &x.0).collect();
        d(C.concat(axis, &xs))
    }
    fn split(&self, axis: usize, sizes: &[usize], x: &Dev) -> Result<Vec<Dev>> {
        Ok(C.split(axis, sizes, &x.0)?.into_iter().map(Dev).collect())
    }
    fn take(&self, x: &Dev, idx: &[Vec<usize>]) -> Result<Dev> {
        d(C.take(&x.0, idx))
    }
    fn take_backward(&self, x_shape: &[usize], idx: &[Vec<usize>], dy: Dev) -> Result<Dev> {
        d(C.take_backward(x_shape, idx, dy.0))
    }
    fn pad(&self, x: &Dev, pads: &[(i64, i64)], value: f32) -> Result<Dev> {
        d(C.pad(&x.0, pads, value))
    }
    fn pad_backward(&self, x_shape: &[usize], pads: &[(i64, i64)], dy: Dev) -> Result<Dev> {
        d(C.pad_backward(x_shape, pads, dy.0))
    }
    fn update(
        &self,
        rule: &Update,
        w: &mut Dev,
        g: &Dev,
        m: &mut Dev,
        v: Option<&mut Dev>,
    ) -> Result<()> {
        self.k();
        C.update(rule, &mut w.0, &g.0, &mut m.0, v.map(|v| &mut v.0))
    }
}

fn batch(input: &[usize], seed: u64) -> (ArrayD<f32>, Vec<usize>) {
    let mut r = elrt::rng::Rng::new(seed);
    let x = ArrayD::from_shape_fn(ndarray::IxDyn(input), |_| r.normal());
    let labels = (0..input[0])
        .map(|i| (i * 7 + seed as usize) % 10)
        .collect();
    (x, labels)
}

fn graph(file: &str, tucker: bool) -> elrt::ir::Graph {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    let mut g = elrt::onnx::read_file(&path).unwrap();
    if tucker {
        let facts = elrt::ir::fold::simplify(
            &mut g,
            &[vec![1, 3, 32, 32]],
            elrt::ir::fold::FoldOptions {
                remove_dropout: false,
            },
        )
        .unwrap();
        let opts = ConvertOptions {
            format: Format::Tucker2,
            ranks: RankPolicy::Ratio(0.5),
            rank_multiple: 1,
            include_first: false,
            include_pointwise: false,
            include_gemm: false,
            init: InitMode::Scratch,
            seed: 3,
            hooi_iters: 5,
            cp_iters: 10,
        };
        convert(&mut g, &facts, &opts).unwrap();
    }
    g
}

/// Trains `steps` steps on both backends from the same graph and returns how many DSO terms
/// the step had; asserts bit-identical losses, weights, BN statistics and eval logits.
fn train_both(g: elrt::ir::Graph, kind: OptimKind, rho: f32, steps: usize) -> (usize, Counted) {
    let batch_size = 4;
    let mut cpu = Model::from_graph(g.clone(), batch_size).unwrap();
    let mut dev = Model::from_graph_on(Counted::default(), g, batch_size).unwrap();
    let mut step_cpu = TrainStep::new(&cpu.session.program, 0.1, rho);
    let mut step_dev = TrainStep::on(&dev.session.backend, &dev.session.program, 0.1, rho);
    let terms = step_dev.orth_terms().len();
    assert_eq!(terms, step_cpu.orth_terms().len());
    let mut opt_cpu: Optimizer = Optimizer::new(kind, 5e-4);
    let mut opt_dev: Optimizer<Dev> = Optimizer::new(kind, 5e-4);
    let input = cpu.input_shape.clone();
    let (up0, down0) = (
        dev.session.backend.uploads.load(Ordering::Relaxed),
        dev.session.backend.downloads.load(Ordering::Relaxed),
    );
    for s in 0..steps {
        let (x, labels) = batch(&input, s as u64);
        let a = step_cpu
            .run(&mut cpu, x.clone(), &labels, &mut opt_cpu, 0.05)
            .unwrap();
        let b = step_dev
            .run(&mut dev, x, &labels, &mut opt_dev, 0.05)
            .unwrap();
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "loss at step {s}");
        assert_eq!(a.orth.to_bits(), b.orth.to_bits(), "DSO at step {s}");
    }
    let (ups, downs) = (
        dev.session.backend.uploads.load(Ordering::Relaxed) - up0,
        dev.session.backend.downloads.load(Ordering::Relaxed) - down0,
    );
    // Per step: the batch and the logits' gradient go up, the logits come down, and DSO
    // copies each factor matrix (down: value and gradient; up: the gradient).
    assert_eq!(ups, steps * (2 + terms), "uploads");
    assert_eq!(downs, steps * (1 + 2 * terms), "downloads");
    let trained = dev.trained_graph();
    let reference = cpu.trained_graph();
    let mut compared = 0;
    for (name, t) in &reference.initializers {
        assert_eq!(&trained.initializers[name], t, "{name}");
        compared += 1;
    }
    assert!(compared > 20, "{compared} initializers");
    let (x, _) = batch(&input, 99);
    let ya = cpu
        .forward(x.clone(), elrt::engine::exec::Mode::Eval)
        .unwrap();
    let yb = dev.forward(x, elrt::engine::exec::Mode::Eval).unwrap();
    assert_eq!(ya, yb, "eval logits");
    let backend = std::mem::take(&mut dev.session.backend);
    (terms, backend)
}

/// ResNet-20 in Tucker-2 form with DSO (so DSO's host path runs) and SGD with Nesterov
/// momentum: three steps on the counted backend equal the CPU's bit for bit.
#[test]
fn a_second_backend_trains_tucker2_resnet20_with_dso_bit_identically_to_the_cpu() {
    let kind = OptimKind::Sgd {
        momentum: 0.9,
        nesterov: true,
    };
    let (terms, backend) = train_both(graph("resnet20.onnx", true), kind, 0.1, 3);
    assert!(terms >= 2 * 17, "{terms} DSO terms");
    assert!(backend.kernels.load(Ordering::Relaxed) > 3 * 100);
}

/// MobileNetV2 (depthwise convs, Clip, residual Adds without ReLU) with AdamW.
#[test]
fn a_second_backend_trains_mobilenetv2_with_adamw_bit_identically_to_the_cpu() {
    let kind = OptimKind::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let (terms, _) = train_both(graph("mobilenetv2.onnx", false), kind, 0.0, 2);
    assert_eq!(terms, 0);
}
