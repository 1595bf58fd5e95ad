//! The engine's backend boundary: every numeric kernel the executor, the loss and the optimiser
//! run goes through [`Backend`], so that a second implementation (CUDA) can sit beside
//! [`CpuBackend`] without touching the graph ([`super::program`]), the autodiff walk
//! ([`super::exec`]) or the training step (`train::step`).
//!
//! The shape follows candle's `BackendStorage` and burn's `Backend`: an associated tensor type
//! that lives where the backend computes (host memory for the CPU, device memory for a GPU),
//! explicit [`Backend::upload`] / [`Backend::download`] at the edges, and one method per kernel
//! family, forward and backward, taking the op struct from [`super::ops`]. The op structs keep
//! their attributes and shape rules and stay backend-free; only the arithmetic moves behind the
//! trait.
//!
//! What crosses the boundary per training step: the input batch (upload), the logits and their
//! gradient (`N x K`, download and upload; the loss runs on the host), and DSO's factor
//! matrices through [`Backend::with_host`] / [`Backend::with_host_mut`] (no copy on the CPU; a
//! device backend copies them, or overrides DSO later if that is measured to matter). The
//! parameters, activations, gradients and optimiser moments stay on the backend.
//!
//! For [`CpuBackend`] the tensor type is `ArrayD<f32>` itself, so upload and download of an
//! owned array are moves and `Session<CpuBackend>` runs exactly the kernels it ran before the
//! boundary existed (same code, same summation order: bit-identical training, measured equal
//! speed; see `benches/train_step.rs`).

pub mod cpu;

use anyhow::Result;
use ndarray::ArrayD;

use super::ops::{
    Activation, AveragePool2d, BatchNorm2d, Conv2d, Gemm, GroupNorm, LayerNorm, MaxPool2d,
};
use super::stat_sync::StatSync;
use crate::engine::tensor_ops::BinOp;

pub use cpu::CpuBackend;

/// Gradients of a convolution: `dx` only when asked for (not for the network's input).
pub struct ConvGrads<T> {
    pub dx: Option<T>,
    pub dw: T,
    pub db: T,
}

/// Gradients of a training-mode batch normalisation.
pub struct BnGrads<T> {
    pub dx: T,
    pub dscale: T,
    pub dbias: T,
}

/// Gradients of a layer normalisation; `dscale` and `dbias` have the scale's shape.
pub struct LnGrads<T> {
    pub dx: T,
    pub dscale: T,
    pub dbias: T,
}

/// Gradients of a Gemm: `dc` when the op has a bias operand.
pub struct GemmGrads<T> {
    pub da: T,
    pub db: T,
    pub dc: Option<T>,
}

/// One optimiser update of one parameter, with PyTorch's rules (`torch.optim.SGD`,
/// `torch.optim.AdamW`). The scalars are worked out once per step by `train::optim`; the
/// backend runs the elementwise part where the tensors live.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Update {
    /// `g += decay*w; buf = g` on the first step (or without momentum), else
    /// `buf = momentum*buf + g`; `w -= lr * (g + momentum*buf)` (Nesterov) or `lr * buf`.
    Sgd {
        lr: f32,
        decay: f32,
        momentum: f32,
        nesterov: bool,
        first: bool,
    },
    /// `w *= 1 - lr*decay; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    /// w -= step * m / (sqrt(v)/bc2_sqrt + eps)`, `step = lr / (1 - b1^t)`.
    AdamW {
        lr: f32,
        decay: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        step: f32,
        bc2_sqrt: f32,
    },
}

/// The kernels of the engine over one tensor type. Methods take the op struct (attributes,
/// shape rules) and tensors of this backend; errors name what was wrong, the executor adds the
/// node. Backward methods take the upstream gradient by value so a backend can reuse its
/// buffer (an Add's gradient *is* its upstream gradient).
pub trait Backend: Send + Sync {
    /// An `f32` tensor in this backend's memory, NCHW at every op boundary.
    type Tensor: Clone + Send + Sync + std::fmt::Debug;
    /// What a training-mode BN forward keeps for its backward (batch mean, inverse std).
    type BnSaved: Send + Sync;
    /// What a max pool forward keeps for its backward (the argmax of each window).
    type PoolSaved: Send + Sync;
    /// What a layer norm forward keeps for its backward (each row's mean and inverse std).
    type LnSaved: Send + Sync;

    /// Short name for reports ("cpu").
    fn name(&self) -> &'static str;

    // --- memory -------------------------------------------------------------------------

    /// Moves a host array into this backend (a move on the CPU).
    fn upload(&self, a: ArrayD<f32>) -> Self::Tensor;
    /// A host copy of a tensor.
    fn download(&self, t: &Self::Tensor) -> ArrayD<f32>;
    /// Runs `f` on a host view of `t`: no copy on the CPU, a download elsewhere. For the small
    /// host-side computations of a step (DSO's factor matrices).
    fn with_host<R>(&self, t: &Self::Tensor, f: impl FnOnce(&ArrayD<f32>) -> R) -> R {
        f(&self.download(t))
    }
    /// Runs `f` on a mutable host copy of `t` and writes it back (in place on the CPU).
    fn with_host_mut<R>(&self, t: &mut Self::Tensor, f: impl FnOnce(&mut ArrayD<f32>) -> R) -> R {
        let mut a = self.download(t);
        let r = f(&mut a);
        *t = self.upload(a);
        r
    }
    /// The tensor's shape.
    fn dims<'a>(&self, t: &'a Self::Tensor) -> &'a [usize];
    fn zeros(&self, shape: &[usize]) -> Self::Tensor;
    /// Sets every element to `value`.
    fn fill(&self, t: &mut Self::Tensor, value: f32);
    /// `acc += g` (same shapes): gradient accumulation where a value is read twice.
    fn add_assign(&self, acc: &mut Self::Tensor, g: &Self::Tensor) -> Result<()>;
    /// Elementwise product of same-shaped tensors (dropout masks).
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    // --- convolution, linear ------------------------------------------------------------

    fn conv_forward(
        &self,
        op: &Conv2d,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn conv_backward(
        &self,
        op: &Conv2d,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: Self::Tensor,
        needs_dx: bool,
        needs_db: bool,
    ) -> Result<ConvGrads<Self::Tensor>>;
    /// [`Self::conv_backward`] whose input gradient is added to `acc`, the gradient the
    /// input's other readers already gave it (`dx = acc + the conv's own`, as
    /// [`Self::add_assign`] would make it). This default runs the two; the CPU adds inside
    /// the kernels that can (a residual block's first conv: no separate pass over both).
    fn conv_backward_adding(
        &self,
        op: &Conv2d,
        x: &Self::Tensor,
        w: &Self::Tensor,
        dy: Self::Tensor,
        acc: Self::Tensor,
        needs_db: bool,
    ) -> Result<ConvGrads<Self::Tensor>> {
        let mut g = self.conv_backward(op, x, w, dy, true, needs_db)?;
        let dx =
            g.dx.take()
                .ok_or_else(|| anyhow::anyhow!("conv backward gave no input gradient"))?;
        let mut acc = acc;
        self.add_assign(&mut acc, &dx)?;
        g.dx = Some(acc);
        Ok(g)
    }
    fn gemm_forward(
        &self,
        op: &Gemm,
        a: &Self::Tensor,
        b: &Self::Tensor,
        c: Option<&Self::Tensor>,
    ) -> Result<Self::Tensor>;
    fn gemm_backward(
        &self,
        op: &Gemm,
        a: &Self::Tensor,
        b: &Self::Tensor,
        c_shape: Option<&[usize]>,
        dy: Self::Tensor,
    ) -> Result<GemmGrads<Self::Tensor>>;

    // --- normalisation ------------------------------------------------------------------

    /// Batch statistics; updates the running mean and variance in place. With `sync`
    /// (`--sync-bn` over MPI) the per-channel sums are summed over the processes through it, on
    /// the host (a device backend copies those few numbers per channel).
    #[allow(clippy::too_many_arguments)]
    fn bn_forward_train(
        &self,
        op: &BatchNorm2d,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        bias: &Self::Tensor,
        running_mean: &mut Self::Tensor,
        running_var: &mut Self::Tensor,
        sync: Option<&dyn StatSync>,
    ) -> Result<(Self::Tensor, Self::BnSaved)>;
    /// [`Self::bn_forward_train`] joined to a residual: `bn(x) + r`, through a ReLU where
    /// `relu` (a block's end). This default runs the two ops; a backend may fuse them (the
    /// CPU does, in one pass) but must give the same values. Backward is the Add's (or Add +
    /// Relu's) and then [`Self::bn_backward_train`].
    #[allow(clippy::too_many_arguments)]
    fn bn_add_forward_train(
        &self,
        op: &BatchNorm2d,
        x: &Self::Tensor,
        r: &Self::Tensor,
        relu: bool,
        scale: &Self::Tensor,
        bias: &Self::Tensor,
        running_mean: &mut Self::Tensor,
        running_var: &mut Self::Tensor,
        sync: Option<&dyn StatSync>,
    ) -> Result<(Self::Tensor, Self::BnSaved)> {
        let (y, saved) =
            self.bn_forward_train(op, x, scale, bias, running_mean, running_var, sync)?;
        Ok((self.residual_join(&y, r, relu)?, saved))
    }
    /// `y + r`, through a ReLU where `relu`: the join [`Self::bn_add_forward_train`] runs
    /// after a separate batch norm (and eval mode always).
    fn residual_join(
        &self,
        y: &Self::Tensor,
        r: &Self::Tensor,
        relu: bool,
    ) -> Result<Self::Tensor> {
        if relu {
            self.add_relu_forward(y, r)
        } else {
            self.binary_forward(BinOp::Add, y, r)
        }
    }
    fn bn_forward_eval(
        &self,
        op: &BatchNorm2d,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        bias: &Self::Tensor,
        mean: &Self::Tensor,
        var: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// `sync` as in [`Self::bn_forward_train`]: `dx` from the summed statistics.
    fn bn_backward_train(
        &self,
        op: &BatchNorm2d,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        saved: &Self::BnSaved,
        dy: Self::Tensor,
        sync: Option<&dyn StatSync>,
    ) -> Result<BnGrads<Self::Tensor>>;

    /// Layer normalisation over the trailing axes `op.axis..` (ONNX `LayerNormalization`;
    /// training and inference alike). `scale` and `bias` hold one value per row position, in
    /// any shape of that size (the program supplies zeros where a file has no bias).
    fn layer_norm_forward(
        &self,
        op: &LayerNorm,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        bias: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::LnSaved)>;
    /// Gradients of [`Self::layer_norm_forward`] from its input and saved statistics;
    /// `dscale` and `dbias` both come in the scale's shape.
    fn layer_norm_backward(
        &self,
        op: &LayerNorm,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        saved: &Self::LnSaved,
        dy: Self::Tensor,
    ) -> Result<LnGrads<Self::Tensor>>;

    /// Group normalisation of `[N, C, ..]`: each `(n, group)` normalised, then scaled and
    /// shifted per channel by `scale` and `bias` (`[C]`); ONNX `GroupNormalization` (opset 21)
    /// and `InstanceNormalization` (a group per channel; GroupNorm's older exports run it on
    /// `[N, G, ..]`). Keeps each group's statistics as layer norm keeps its rows'.
    fn group_norm_forward(
        &self,
        op: &GroupNorm,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        bias: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::LnSaved)>;
    /// Gradients of [`Self::group_norm_forward`]; `dscale` and `dbias` in the scale's shape.
    fn group_norm_backward(
        &self,
        op: &GroupNorm,
        x: &Self::Tensor,
        scale: &Self::Tensor,
        saved: &Self::LnSaved,
        dy: Self::Tensor,
    ) -> Result<LnGrads<Self::Tensor>>;

    // --- elementwise --------------------------------------------------------------------

    fn act_forward(&self, op: &Activation, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn act_backward(
        &self,
        op: &Activation,
        x: &Self::Tensor,
        dy: Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Broadcasting Add, Sub, Mul, Div.
    fn binary_forward(&self, op: BinOp, a: &Self::Tensor, b: &Self::Tensor)
        -> Result<Self::Tensor>;
    /// Gradients of both operands, each summed to its own shape.
    fn binary_backward(
        &self,
        op: BinOp,
        a: &Self::Tensor,
        b: &Self::Tensor,
        dy: Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;
    /// `max(0, a + b)`: a residual join fused with its ReLU.
    fn add_relu_forward(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Gradients of [`Self::add_relu_forward`] from its output `z`.
    fn add_relu_backward(
        &self,
        a: &Self::Tensor,
        b: &Self::Tensor,
        z: &Self::Tensor,
        dz: Self::Tensor,
    ) -> Result<(Self::Tensor, Self::Tensor)>;

    // --- pooling, reductions ------------------------------------------------------------

    fn max_pool_forward(
        &self,
        op: &MaxPool2d,
        x: &Self::Tensor,
    ) -> Result<(Self::Tensor, Self::PoolSaved)>;
    fn max_pool_backward(
        &self,
        op: &MaxPool2d,
        saved: &Self::PoolSaved,
        dy: Self::Tensor,
    ) -> Result<Self::Tensor>;
    fn avg_pool_forward(&self, op: &AveragePool2d, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn avg_pool_backward(
        &self,
        op: &AveragePool2d,
        x_shape: &[usize],
        dy: Self::Tensor,
    ) -> Result<Self::Tensor>;
    fn global_avg_pool_forward(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    fn global_avg_pool_backward(&self, x_shape: &[usize], dy: Self::Tensor)
        -> Result<Self::Tensor>;
    /// Mean over `axes`, keeping them as size-1 axes.
    fn reduce_mean(&self, x: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;
    fn reduce_mean_backward(
        &self,
        x_shape: &[usize],
        axes: &[usize],
        dy: Self::Tensor,
    ) -> Result<Self::Tensor>;

    // --- data movement ------------------------------------------------------------------

    /// The same elements in row-major order under a new shape of the same size.
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// [`Self::reshape`] of a tensor the caller gives up (a Reshape's backward), so that a
    /// backend can keep the storage instead of copying it.
    fn reshape_owned(&self, x: Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        self.reshape(&x, shape)
    }
    fn transpose(&self, x: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;
    fn concat(&self, axis: usize, xs: &[&Self::Tensor]) -> Result<Self::Tensor>;
    fn split(&self, axis: usize, sizes: &[usize], x: &Self::Tensor) -> Result<Vec<Self::Tensor>>;
    /// The sub-tensor at `idx[axis]` (a list of indices per axis): Slice, Gather-like reads.
    fn take(&self, x: &Self::Tensor, idx: &[Vec<usize>]) -> Result<Self::Tensor>;
    fn take_backward(
        &self,
        x_shape: &[usize],
        idx: &[Vec<usize>],
        dy: Self::Tensor,
    ) -> Result<Self::Tensor>;
    /// Constant padding; negative pads crop.
    fn pad(&self, x: &Self::Tensor, pads: &[(i64, i64)], value: f32) -> Result<Self::Tensor>;
    fn pad_backward(
        &self,
        x_shape: &[usize],
        pads: &[(i64, i64)],
        dy: Self::Tensor,
    ) -> Result<Self::Tensor>;

    // --- optimiser ----------------------------------------------------------------------

    /// One update of `w` from its gradient `g` and its moment buffers (`v` for AdamW only).
    fn update(
        &self,
        rule: &Update,
        w: &mut Self::Tensor,
        g: &Self::Tensor,
        m: &mut Self::Tensor,
        v: Option<&mut Self::Tensor>,
    ) -> Result<()>;
}
