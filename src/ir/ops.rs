//! Typed operators of the IR, one struct per op family holding its parsed, validated
//! attributes.
//!
//! Operands that ONNX moved from attributes to inputs over the opsets (Clip's bounds, Slice's
//! starts/ends, Pad's pads, Squeeze/Unsqueeze/ReduceMean's axes, Split's sizes, Dropout's ratio)
//! are held here as attributes whatever the file's opset: the reader resolves them from
//! constants, and the writer emits the form the target opset wants. Every later stage therefore
//! sees one form. Reshape's target shape stays an input, because old exports compute it from
//! the activation's shape at run time (the Shape -> Gather -> Concat flatten).

/// How a convolution or pool pads when `auto_pad` is set instead of explicit pads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoPad {
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

impl AutoPad {
    pub fn onnx_name(self) -> &'static str {
        match self {
            AutoPad::NotSet => "NOTSET",
            AutoPad::SameUpper => "SAME_UPPER",
            AutoPad::SameLower => "SAME_LOWER",
            AutoPad::Valid => "VALID",
        }
    }
}

/// Conv: weight input `[C_out, C_in / group, k...]`, optional bias `[C_out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv {
    /// As written in the file; the weight's shape is authoritative when absent.
    pub kernel_shape: Option<Vec<usize>>,
    /// Per spatial axis; empty means 1 everywhere.
    pub strides: Vec<usize>,
    /// ONNX order: all begins, then all ends. Empty means 0 everywhere.
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
    pub group: usize,
    pub auto_pad: AutoPad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    Average,
}

/// MaxPool and AveragePool.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub kind: PoolKind,
    pub kernel_shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
    pub ceil_mode: bool,
    pub auto_pad: AutoPad,
    /// AveragePool only.
    pub count_include_pad: bool,
    /// MaxPool only; kept so the file round-trips.
    pub storage_order: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    pub epsilon: f32,
    pub momentum: f32,
    /// Normalise with batch statistics (training form). Opset 14+ says so with an attribute;
    /// earlier opsets by giving the node its optional statistics outputs.
    pub training_mode: bool,
}

/// LayerNormalization (opset 17): normalizes over the axes from `axis` to the last, then
/// scales and shifts by inputs 1 and 2 (trainable, shaped as those axes). ConvNeXt's every block
/// normalizes its NHWC activation over the channels this way.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm {
    pub axis: i64,
    pub epsilon: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    pub min: Option<f32>,
    pub max: Option<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    pub axis: i64,
    /// Sizes of the parts; None splits equally into as many parts as the node has outputs.
    pub split: Option<Vec<usize>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ReduceMean {
    /// None reduces over all axes (unless `noop_with_empty_axes`).
    pub axes: Option<Vec<i64>>,
    pub keepdims: bool,
    pub noop_with_empty_axes: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub starts: Vec<i64>,
    pub ends: Vec<i64>,
    pub axes: Option<Vec<i64>>,
    pub steps: Option<Vec<i64>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
}

impl PadMode {
    pub fn onnx_name(self) -> &'static str {
        match self {
            PadMode::Constant => "constant",
            PadMode::Reflect => "reflect",
            PadMode::Edge => "edge",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pad {
    /// Begins then ends, per listed axis (all axes when `axes` is None). Negative crops.
    pub pads: Vec<i64>,
    pub axes: Option<Vec<i64>>,
    pub mode: PadMode,
    pub value: f32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub start: Option<i64>,
    pub end: Option<i64>,
}

/// Which axes a Softmax normalises over; ONNX changed the meaning at opset 13.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxAxes {
    /// Before opset 13: the input seen as 2-D, the axes from `axis` on flattened into one.
    Flattened,
    /// From opset 13: `axis` alone.
    One,
    /// Both mean the same for this graph's shapes (the axes after `axis` all have size 1), so
    /// it can be written at any opset.
    Either,
}

/// A node's operator.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Conv(Conv),
    BatchNorm(BatchNorm),
    Relu,
    Clip(Clip),
    LeakyRelu {
        alpha: f32,
    },
    /// `x` where positive, else `slope * x`; the slope (input 1, broadcast to `x`: one value
    /// or one per channel, `[C, 1, 1]`) is a trained parameter, PyTorch's `nn.PReLU`.
    PRelu,
    /// `x` for `x > 0`, else `alpha * (exp(x) - 1)` (ONNX default alpha 1, PyTorch's `nn.ELU`).
    Elu {
        alpha: f32,
    },
    Sigmoid,
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    /// GELU (opset 20): exact (`approximate = "none"`) or its tanh approximation.
    Gelu {
        tanh: bool,
    },
    /// The error function; TorchScript exports spell GELU as `x * 0.5 * (1 + Erf(x / sqrt 2))`.
    Erf,
    LayerNorm(LayerNorm),
    /// InstanceNormalization (opset 6): each `(n, c)` plane of `[N, C, D1, ..]` normalized by
    /// its own statistics, then scaled and shifted per channel by inputs 1 and 2 (`[C]`,
    /// trainable unless frozen: GroupNorm's exports give it constant ones and zeros).
    InstanceNorm {
        epsilon: f32,
    },
    /// GroupNormalization (opset 21; PyTorch's `nn.GroupNorm` from opset 21 on): the channels
    /// of `[N, C, D1, ..]` in `groups` groups, each `(n, group)` normalized by its own
    /// statistics, then scaled and shifted per channel by inputs 1 and 2 (`[C]`, trainable).
    GroupNorm {
        epsilon: f32,
        groups: usize,
    },
    /// `x ^ exponent`, the exponent a constant scalar (input 1 in the file): exporters below
    /// opset 17 spell LayerNormalization's variance with `Pow(x - mean, 2)`.
    Pow {
        exponent: f32,
    },
    /// Elementwise square root (the same decomposition's standard deviation).
    Sqrt,
    /// Elementwise `e^x` (an ELU written out as `Relu(x) + (alpha Exp(x - Relu(x)) - alpha)`, as
    /// elrt's export writes it: `export::act_split`).
    Exp,
    Add,
    Sub,
    Mul,
    Div,
    Concat {
        axis: i64,
    },
    Split(Split),
    Pool(Pool),
    GlobalAveragePool,
    ReduceMean(ReduceMean),
    Flatten {
        axis: i64,
    },
    Gemm(Gemm),
    MatMul,
    Reshape {
        allowzero: bool,
    },
    Transpose {
        perm: Option<Vec<usize>>,
    },
    Slice(Slice),
    /// A Slice whose starts/ends/axes/steps are inputs 1..=4 computed at run time (from the
    /// activation's shape, as torchvision's shufflenet chunk exports); shape inference reads
    /// them from constant propagation and [`super::fold`] turns the node into a plain Slice.
    DynSlice,
    Pad(Pad),
    Squeeze {
        axes: Option<Vec<i64>>,
    },
    Unsqueeze {
        axes: Vec<i64>,
    },
    Identity,
    Dropout {
        ratio: f32,
    },
    Shape(Shape),
    Gather {
        axis: i64,
    },
    /// Indexing by tuples of leading indices (`batch_dims` 0 only). The dynamo exporter writes
    /// an adaptive average pool whose output does not divide its input (VGG's 7x7 pool on a
    /// small input) as a transpose, a GatherND with constant indices and a mean; `ir::fold`
    /// rewrites that into a Gather the engine trains.
    GatherNd,
    Cast {
        to: super::ElemType,
    },
    /// A tensor of the shape given by input 0 (a 1-D i64 constant once folded), filled with
    /// `value` (a one-element tensor: f32 0 when the attribute is absent).
    ConstantOfShape {
        value: super::Tensor,
    },
    /// `start, limit, delta` scalars -> the 1-D sequence, as numpy's `arange`.
    Range,
    /// Broadcasts input 0 to the shape in input 1 (numpy rules, in both directions).
    Expand,
    /// Elementwise `cond ? x : y`, with broadcasting.
    Where,
    /// Elementwise equality (a boolean tensor, held as 0/1 i64).
    Equal,
    /// Softmax at `axis`, over the axes its [`SoftmaxAxes`] says.
    Softmax {
        axis: i64,
        axes: SoftmaxAxes,
    },
    /// As Softmax, in log space.
    LogSoftmax {
        axis: i64,
        axes: SoftmaxAxes,
    },
    /// Elementwise sum of any number of inputs, with broadcasting.
    Sum,
}

impl Op {
    /// The ONNX op_type this op is written as.
    pub fn onnx_type(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::BatchNorm(_) => "BatchNormalization",
            Op::Relu => "Relu",
            Op::Clip(_) => "Clip",
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::PRelu => "PRelu",
            Op::Elu { .. } => "Elu",
            Op::Sigmoid => "Sigmoid",
            Op::HardSigmoid { .. } => "HardSigmoid",
            Op::HardSwish => "HardSwish",
            Op::Gelu { .. } => "Gelu",
            Op::Erf => "Erf",
            Op::LayerNorm(_) => "LayerNormalization",
            Op::InstanceNorm { .. } => "InstanceNormalization",
            Op::GroupNorm { .. } => "GroupNormalization",
            Op::Pow { .. } => "Pow",
            Op::Sqrt => "Sqrt",
            Op::Exp => "Exp",
            Op::Add => "Add",
            Op::Sub => "Sub",
            Op::Mul => "Mul",
            Op::Div => "Div",
            Op::Concat { .. } => "Concat",
            Op::Split(_) => "Split",
            Op::Pool(p) => match p.kind {
                PoolKind::Max => "MaxPool",
                PoolKind::Average => "AveragePool",
            },
            Op::GlobalAveragePool => "GlobalAveragePool",
            Op::ReduceMean(_) => "ReduceMean",
            Op::Flatten { .. } => "Flatten",
            Op::Gemm(_) => "Gemm",
            Op::MatMul => "MatMul",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Slice(_) | Op::DynSlice => "Slice",
            Op::Pad(_) => "Pad",
            Op::Squeeze { .. } => "Squeeze",
            Op::Unsqueeze { .. } => "Unsqueeze",
            Op::Identity => "Identity",
            Op::Dropout { .. } => "Dropout",
            Op::Shape(_) => "Shape",
            Op::Gather { .. } => "Gather",
            Op::GatherNd => "GatherND",
            Op::Cast { .. } => "Cast",
            Op::ConstantOfShape { .. } => "ConstantOfShape",
            Op::Range => "Range",
            Op::Expand => "Expand",
            Op::Where => "Where",
            Op::Equal => "Equal",
            Op::Softmax { .. } => "Softmax",
            Op::LogSoftmax { .. } => "LogSoftmax",
            Op::Sum => "Sum",
        }
    }

    /// Indices of inputs that hold trainable parameters (weights, biases, BN scale and shift).
    /// BN running statistics are state, not parameters.
    pub fn param_inputs(&self) -> &'static [usize] {
        match self {
            Op::Conv(_) => &[1, 2],
            Op::BatchNorm(_) | Op::LayerNorm(_) => &[1, 2],
            Op::InstanceNorm { .. } | Op::GroupNorm { .. } => &[1, 2],
            Op::Gemm(_) => &[1, 2],
            Op::MatMul => &[0, 1],
            Op::PRelu => &[1],
            _ => &[],
        }
    }
}
