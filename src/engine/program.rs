//! Compiles a simplified IR graph (shapes concrete, constants folded) into a list of steps over
//! numbered value slots, with the trainable parameters and BN running statistics pulled out.
//! The executor ([`super::exec`]) runs it forward and backward.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::ArrayD;

use super::ops::{
    Activation, AveragePool2d, BatchNorm2d, BnAct, Conv2d, Gemm, GroupNorm, LayerNorm, MaxPool2d,
};
use super::tensor_ops::BinOp;
use crate::ir::ops::{AutoPad, PoolKind, Slice};
use crate::ir::shape::{norm_axis, reduce_axes, resolve_pads, split_sizes, Facts};
use crate::ir::{Graph, Op, Tensor};

/// Where a step reads an input from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    Slot(usize),
    Param(usize),
    Const(usize),
}

#[derive(Clone, Debug)]
pub enum Kernel {
    Conv(Conv2d),
    /// Indices into [`Program::state`] of the running mean and variance.
    BatchNorm {
        op: BatchNorm2d,
        mean: usize,
        var: usize,
    },
    Act(Activation),
    /// Over the axes from `axis` on; inputs x, scale, bias (a zero constant when the file has
    /// none).
    LayerNorm(LayerNorm),
    /// Each (image, group of channels) normalised, then scaled and shifted per channel:
    /// GroupNormalization, and InstanceNormalization as a group per channel; inputs x, scale,
    /// bias (`[C]`).
    GroupNorm(GroupNorm),
    Binary(BinOp),
    /// An Add and the Relu that is the only reader of its sum (a residual join), fused by
    /// the program's Relu fusion pass: `max(0, a + b)`, with backward masking by the output.
    AddRelu,
    /// A batch norm whose output only an Add (or Add + Relu) reads, joined to it by
    /// [`fuse_residual`]: `bn(x) + r`, through a ReLU where `relu`. Inputs x, scale, bias, r;
    /// `mean` and `var` as in [`Kernel::BatchNorm`].
    BatchNormAdd {
        op: BatchNorm2d,
        mean: usize,
        var: usize,
        relu: bool,
    },
    Concat {
        axis: usize,
    },
    Split {
        axis: usize,
        sizes: Vec<usize>,
    },
    MaxPool(MaxPool2d),
    AvgPool(AveragePool2d),
    GlobalAvgPool,
    ReduceMean {
        axes: Vec<usize>,
        /// Output shape without the batch axis (the batch follows the input's).
        out_tail: Vec<usize>,
    },
    /// Flatten, Reshape, Squeeze, Unsqueeze: a new shape for the same data. The first axis is
    /// the batch when the compiled shapes say so, so a smaller last batch still works.
    Reshape {
        tail: Vec<usize>,
        batch_major: bool,
        fixed: Vec<usize>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    Slice(Slice),
    /// Gather of an activation along a non-batch axis with constant indices (`list`, the
    /// index tensor flattened); the output is reshaped to `out_tail` behind the batch.
    Gather {
        axis: usize,
        list: Vec<usize>,
        out_tail: Vec<usize>,
    },
    Pad {
        pads: Vec<(i64, i64)>,
        value: f32,
    },
    Gemm(Gemm),
    Dropout {
        ratio: f32,
    },
}

#[derive(Clone, Debug)]
pub struct Step {
    /// The IR node's name, for errors and profiles.
    pub name: String,
    pub op_type: &'static str,
    /// What `--profile` files the step's time under: the op type, or for a conv the kernel
    /// that runs it ([`Conv2d::kernel_label`]).
    pub profile_key: &'static str,
    /// The node a fusion pass folded into this step (a Relu after a BatchNormalization): the
    /// step's output is that node's output.
    pub absorbed: Option<String>,
    pub kernel: Kernel,
    pub inputs: Vec<Src>,
    pub outputs: Vec<usize>,
}

/// A trainable tensor, its gradient and whether it decays. `T` is where it lives: host arrays
/// when compiled, a backend's tensors inside a session ([`Program::map_tensors`]).
#[derive(Clone, Debug)]
pub struct Param<T = ArrayD<f32>> {
    pub name: String,
    pub value: T,
    pub grad: T,
    /// Weight decay applies (conv and linear weights) or not (biases, BN scale and shift).
    pub decay: bool,
}

/// What the file's output applies to the logits: a classifier exported with its final Softmax
/// (or LogSoftmax). The engine trains on the logits before it (cross-entropy wants them) and
/// applies the head only where the file's own output is compared ([`Program::file_output`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    Softmax,
    LogSoftmax,
}

/// The compiled network. Backend-free: `T` is the tensor type of its parameters, statistics
/// and constants, host `ArrayD<f32>` as compiled and a backend's tensor once a session has
/// uploaded it ([`Program::map_tensors`]; [`Program::store_with`] brings them back).
#[derive(Clone, Debug)]
pub struct Program<T = ArrayD<f32>> {
    pub steps: Vec<Step>,
    pub n_slots: usize,
    pub input_slot: usize,
    pub output_slot: usize,
    pub params: Vec<Param<T>>,
    /// BN running statistics: (initializer name, value).
    pub state: Vec<(String, T)>,
    pub consts: Vec<T>,
    /// The batch size the shapes were compiled for.
    pub batch: usize,
    /// A final Softmax / LogSoftmax over the classes, left out of the steps.
    pub head: Option<Head>,
    /// The file's output shape without the batch: `[K]`, or `[K, 1, 1]` where the logits come
    /// out of a pool.
    pub file_output_tail: Vec<usize>,
}

impl<T> Program<T> {
    /// The same program with every tensor passed through `f` (by value: a move where `f` is
    /// one, as for the CPU backend).
    pub fn map_tensors<U>(self, mut f: impl FnMut(T) -> U) -> Program<U> {
        Program {
            steps: self.steps,
            n_slots: self.n_slots,
            input_slot: self.input_slot,
            output_slot: self.output_slot,
            params: self
                .params
                .into_iter()
                .map(|p| Param {
                    name: p.name,
                    value: f(p.value),
                    grad: f(p.grad),
                    decay: p.decay,
                })
                .collect(),
            state: self.state.into_iter().map(|(n, v)| (n, f(v))).collect(),
            consts: self.consts.into_iter().map(&mut f).collect(),
            batch: self.batch,
            head: self.head,
            file_output_tail: self.file_output_tail,
        }
    }

    /// Writes the parameters and statistics, brought to the host by `download`, into the
    /// graph's initializers.
    pub fn store_with(&self, graph: &mut Graph, mut download: impl FnMut(&T) -> ArrayD<f32>) {
        for p in &self.params {
            graph
                .initializers
                .insert(p.name.clone(), Tensor::F32(download(&p.value)));
        }
        for (name, v) in &self.state {
            graph
                .initializers
                .insert(name.clone(), Tensor::F32(download(v)));
        }
    }

    /// The file's output from the `[N, K]` logits: the head applied row by row (max-shifted,
    /// as onnxruntime computes it), in the file's output shape.
    pub fn file_output(&self, logits: ArrayD<f32>) -> ArrayD<f32> {
        let mut y = logits;
        if let Some(head) = self.head {
            for mut row in y.rows_mut() {
                let m = row.fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let sum: f32 = row.iter().map(|&v| (v - m).exp()).sum();
                match head {
                    Head::Softmax => row.mapv_inplace(|v| (v - m).exp() / sum),
                    Head::LogSoftmax => row.mapv_inplace(|v| v - m - sum.ln()),
                }
            }
        }
        let mut shape = vec![y.shape()[0]];
        shape.extend(&self.file_output_tail);
        y.into_shape_with_order(shape)
            .expect("the logits hold the file's output")
    }
}

/// `[N, K]`, or `[N, K, 1, ...]`: class scores per image.
fn is_logits_shape(s: &[usize]) -> bool {
    s.len() >= 2 && s[2..].iter().all(|&d| d == 1)
}

/// The output head of a graph: a Softmax or LogSoftmax over axis 1 of the `[batch, classes]`
/// logits that produces the graph's output. Returns the head and the logits' name.
fn output_head<'g>(graph: &'g Graph, facts: &Facts, out_name: &str) -> Option<(Head, &'g str)> {
    let n = graph
        .nodes
        .iter()
        .find(|n| n.outputs.first().map(String::as_str) == Some(out_name))?;
    let (head, axis) = match n.op {
        Op::Softmax { axis, .. } => (Head::Softmax, axis),
        Op::LogSoftmax { axis, .. } => (Head::LogSoftmax, axis),
        _ => return None,
    };
    let x = &facts.get(&n.inputs[0])?.shape;
    (is_logits_shape(x) && norm_axis(axis, x.len()).ok() == Some(1))
        .then_some((head, n.inputs[0].as_str()))
}

fn f32_of(t: &Tensor, name: &str) -> Result<ArrayD<f32>> {
    t.as_f32()
        .cloned()
        .ok_or_else(|| anyhow!("'{name}' is an integer tensor where a float one is needed"))
}

impl Program {
    /// `graph` must be simplified for `facts` (see [`crate::ir::fold::simplify`]).
    pub fn compile(graph: &Graph, facts: &Facts) -> Result<Program> {
        if graph.inputs.len() != 1 {
            bail!(
                "the model has {} inputs; elrt trains image classifiers with one input",
                graph.inputs.len()
            );
        }
        let mut out_name = graph
            .outputs
            .first()
            .ok_or_else(|| anyhow!("the model has no output"))?
            .name
            .as_str();
        let head = output_head(graph, facts, out_name);
        if let Some((_, logits)) = head {
            out_name = logits;
        }
        let mut slots: HashMap<String, usize> = HashMap::new();
        let input_slot = 0;
        slots.insert(graph.inputs[0].name.clone(), input_slot);
        let batch = facts
            .get(&graph.inputs[0].name)
            .map(|f| f.shape[0])
            .ok_or_else(|| anyhow!("no shape for the input"))?;

        let mut params: Vec<Param> = Vec::new();
        let mut param_ids: HashMap<String, usize> = HashMap::new();
        let mut state: Vec<(String, ArrayD<f32>)> = Vec::new();
        let mut state_ids: HashMap<String, usize> = HashMap::new();
        let mut consts: Vec<ArrayD<f32>> = Vec::new();
        let mut const_ids: HashMap<String, usize> = HashMap::new();
        let mut steps = Vec::with_capacity(graph.nodes.len() + 1);

        for node in &graph.nodes {
            if head.is_some()
                && node.outputs.first().map(String::as_str) == Some(&graph.outputs[0].name)
            {
                continue; // the head, applied outside the steps
            }
            let what = || format!("node '{}' ({})", node.name, node.op.onnx_type());
            let shape_of = |v: &str| -> Result<&Vec<usize>> {
                facts
                    .get(v)
                    .map(|f| &f.shape)
                    .ok_or_else(|| anyhow!("no shape for '{v}'"))
            };
            let x_shape = shape_of(&node.inputs[0]).with_context(what)?.clone();
            let out_shape = shape_of(&node.outputs[0]).with_context(what)?.clone();
            let param_inputs = graph.param_slots(node);
            // Inputs: trainable parameters, BN statistics (state), constants or slots.
            let mut inputs = Vec::new();
            // BN's statistics are state (below); a Reshape's target shape is compile-time
            // information (the kernel takes the output shape from the facts), often an integer
            // initializer that is no tensor the engine computes with.
            let data_arity = match node.op {
                Op::BatchNorm(_) => 3,
                Op::Reshape { .. } | Op::Gather { .. } => 1,
                _ => node.inputs.len(),
            };
            for (i, name) in node.inputs.iter().enumerate().take(data_arity) {
                if name.is_empty() {
                    continue;
                }
                if let Some(t) = graph.initializers.get(name) {
                    if param_inputs.contains(&i) {
                        let id = match param_ids.get(name) {
                            Some(&id) => id,
                            None => {
                                let value = f32_of(t, name).with_context(what)?;
                                let decay =
                                    matches!(node.op, Op::Conv(_) | Op::Gemm(_) | Op::MatMul)
                                        && value.ndim() >= 2;
                                params.push(Param {
                                    name: name.clone(),
                                    grad: ArrayD::zeros(value.raw_dim()),
                                    value,
                                    decay,
                                });
                                param_ids.insert(name.clone(), params.len() - 1);
                                params.len() - 1
                            }
                        };
                        inputs.push(Src::Param(id));
                    } else {
                        let id = match const_ids.get(name) {
                            Some(&id) => id,
                            None => {
                                consts.push(f32_of(t, name).with_context(what)?);
                                const_ids.insert(name.clone(), consts.len() - 1);
                                consts.len() - 1
                            }
                        };
                        inputs.push(Src::Const(id));
                    }
                } else {
                    let s = *slots
                        .get(name)
                        .ok_or_else(|| anyhow!("{}: input '{name}' is not computed", what()))?;
                    inputs.push(Src::Slot(s));
                }
            }
            let kernel = kernel_for(node, &x_shape, &out_shape, batch, facts).with_context(what)?;
            let kernel = match kernel {
                Kernel::BatchNorm { op, .. } => {
                    let mut ids = [0usize; 2];
                    for (k, i) in [3usize, 4].iter().enumerate() {
                        let name = &node.inputs[*i];
                        let t = graph.initializers.get(name).ok_or_else(|| {
                            anyhow!(
                                "{}: running statistic '{name}' must be an initializer",
                                what()
                            )
                        })?;
                        ids[k] = match state_ids.get(name) {
                            Some(&id) => id,
                            None => {
                                state.push((name.clone(), f32_of(t, name)?));
                                state_ids.insert(name.clone(), state.len() - 1);
                                state.len() - 1
                            }
                        };
                    }
                    Kernel::BatchNorm {
                        op,
                        mean: ids[0],
                        var: ids[1],
                    }
                }
                Kernel::LayerNorm(op) => {
                    // Scale and bias, flat (they span the normalized axes); a missing bias is
                    // a zero constant.
                    let n: usize = x_shape[op.axis..].iter().product();
                    if node.input(2).is_none() {
                        inputs.truncate(2);
                        consts.push(ArrayD::zeros(vec![n]));
                        inputs.push(Src::Const(consts.len() - 1));
                    }
                    Kernel::LayerNorm(op)
                }
                k => k,
            };
            let mut outputs = Vec::new();
            let used_outputs = match kernel {
                // BN's optional statistics outputs and Dropout's mask are not computed.
                Kernel::BatchNorm { .. } | Kernel::Dropout { .. } | Kernel::MaxPool(_) => 1,
                _ => node.outputs.len(),
            };
            for o in node.outputs.iter().take(used_outputs) {
                let id = slots.len();
                slots.insert(o.clone(), id);
                outputs.push(id);
            }
            let profile_key = match &kernel {
                Kernel::Conv(c) => c
                    .kernel_label(&x_shape, &facts[&node.inputs[1]].shape)
                    .with_context(what)?,
                _ => node.op.onnx_type(),
            };
            steps.push(Step {
                name: node.name.clone(),
                op_type: node.op.onnx_type(),
                profile_key,
                absorbed: None,
                kernel,
                inputs,
                outputs,
            });
        }
        let mut output_slot = *slots
            .get(out_name)
            .ok_or_else(|| anyhow!("the output '{out_name}' is not computed by any node"))?;
        let out_shape = facts[out_name].shape.clone();
        if !is_logits_shape(&out_shape) {
            bail!(
                "the output '{out_name}' has shape {out_shape:?}; a classifier's logits are [batch, classes]"
            );
        }
        if out_shape.len() > 2 {
            // [N, K, 1, 1] logits (Caffe2-era models end in a pool): trained as [N, K].
            let id = slots.len();
            slots.insert(format!("{out_name}/as_2d"), id);
            steps.push(Step {
                name: format!("{out_name}/as_2d"),
                op_type: "Reshape",
                profile_key: "Reshape",
                absorbed: None,
                kernel: Kernel::Reshape {
                    tail: vec![out_shape[1]],
                    batch_major: true,
                    fixed: out_shape[..2].to_vec(),
                },
                inputs: vec![Src::Slot(output_slot)],
                outputs: vec![id],
            });
            output_slot = id;
        }
        let file_output_tail = facts[&graph.outputs[0].name].shape[1..].to_vec();
        let steps = fuse_residual(
            fuse_act(fuse_gates(steps, output_slot), output_slot),
            output_slot,
        );
        Ok(Program {
            steps,
            n_slots: slots.len(),
            input_slot,
            output_slot,
            params,
            state,
            consts,
            batch,
            head: head.map(|(h, _)| h),
            file_output_tail,
        })
    }

    /// Number of classes of the logits.
    pub fn classes(&self, facts: &Facts, graph: &Graph) -> usize {
        facts[&graph.outputs[0].name].shape[1]
    }

    /// Writes trained parameters and statistics back into the graph's initializers.
    pub fn store(&self, graph: &mut Graph) {
        self.store_with(graph, |a| a.clone())
    }
}

/// Folds each Relu that is the only reader of a BatchNormalization's or an Add's output into that
/// step ([`BatchNorm2d::act`], [`Kernel::AddRelu`]), and each such Clip into a
/// BatchNormalization: one pass over the activation instead of two, no stored pre-activation
/// (the tensor the activation's backward used to read), and a backward that masks `dy` inside
/// the step's own pass. Results are bitwise those of the separate steps (the batchnorm and
/// tensor_ops tests check it). Conv-BN-ReLU is the first half of every ResNet block and the
/// stem; Add-ReLU ends every block; Conv-BN-ReLU6 (Clip 0..6) is every MobileNet-V2 layer.
/// The smooth gates [`fuse_gates`] made (SiLU, HardSwish as HardSigmoid times x) and ONNX
/// HardSwish fold into a BatchNormalization too (EfficientNet's and MobileNet-V3's Conv-BN-gate
/// layers): the gate's input is not written or kept, and backward scales `dy` in one pass over
/// `x` and `dy` before the batch norm's own passes.
fn fuse_act(steps: Vec<Step>, output_slot: usize) -> Vec<Step> {
    let readers = readers_of(&steps);
    // Per step: the activation it absorbs (its outputs, name and kind); and the steps absorbed.
    let mut plan: Vec<Option<(Vec<usize>, String, BnAct)>> = vec![None; steps.len()];
    let mut absorbed = vec![false; steps.len()];
    for (i, s) in steps.iter().enumerate() {
        if !matches!(
            s.kernel,
            Kernel::BatchNorm { .. } | Kernel::Binary(BinOp::Add)
        ) {
            continue;
        }
        let y = s.outputs[0];
        if y == output_slot {
            continue;
        }
        if let Some(&[j]) = readers.get(&y).map(Vec::as_slice) {
            let bn = matches!(s.kernel, Kernel::BatchNorm { .. });
            let act = match steps[j].kernel {
                Kernel::Act(Activation::Relu) => BnAct::Relu,
                Kernel::Act(Activation::Clip { min, max }) if bn => BnAct::Clip { min, max },
                Kernel::Act(Activation::Silu) if bn => BnAct::Silu,
                Kernel::Act(Activation::HardSigmoidMul { alpha, beta }) if bn => {
                    BnAct::HardSigmoidMul { alpha, beta }
                }
                Kernel::Act(Activation::HardSwish) if bn => BnAct::HardSwish,
                _ => continue,
            };
            absorbed[j] = true;
            plan[i] = Some((steps[j].outputs.clone(), steps[j].name.clone(), act));
        }
    }
    steps
        .into_iter()
        .zip(plan)
        .zip(absorbed)
        .filter(|(_, gone)| !gone)
        .map(|((mut s, act), _)| {
            let Some((outputs, name, act)) = act else {
                return s;
            };
            match &mut s.kernel {
                Kernel::BatchNorm { op, .. } => {
                    op.act = act;
                    s.profile_key = match act {
                        BnAct::Clip { .. } => "BatchNormalization+Clip",
                        BnAct::Silu => "BatchNormalization+SiLU",
                        BnAct::HardSigmoidMul { .. } | BnAct::HardSwish => {
                            "BatchNormalization+HardSwish"
                        }
                        _ => "BatchNormalization+Relu",
                    };
                }
                k => {
                    *k = Kernel::AddRelu;
                    s.profile_key = "Add+Relu";
                }
            }
            s.outputs = outputs;
            s.absorbed = Some(name);
            s
        })
        .collect()
}

/// Joins each batch norm (without an activation of its own) whose output has one reader, an
/// Add or Add + Relu (after [`fuse_act`]), to that join: one [`Kernel::BatchNormAdd`] step where
/// the Add was, reading the batch norm's inputs and the Add's other operand. The batch norm's
/// output was written, read back by the Add and kept until backward: every ResNet block ends in
/// BN, Add, ReLU, and every MobileNet-V2 and EfficientNet residual block in BN, Add. The Add's
/// place is after both operands exist, and nothing else read the batch norm's output, so
/// moving the batch norm there changes no other step's inputs. Outputs and gradients are
/// bitwise the separate steps' (the program tests compare them).
fn fuse_residual(steps: Vec<Step>, output_slot: usize) -> Vec<Step> {
    let readers = readers_of(&steps);
    // Per Add step: the batch norm step it absorbs and which of its operands that is.
    let mut join: Vec<Option<(usize, usize)>> = vec![None; steps.len()];
    let mut gone = vec![false; steps.len()];
    for (i, s) in steps.iter().enumerate() {
        let Kernel::BatchNorm { op, .. } = &s.kernel else {
            continue;
        };
        if op.act != BnAct::None || s.outputs.len() != 1 {
            continue;
        }
        let y = s.outputs[0];
        let Some(&[j]) = readers.get(&y).map(Vec::as_slice) else {
            continue;
        };
        let a = &steps[j];
        if y == output_slot {
            continue;
        }
        if !matches!(a.kernel, Kernel::AddRelu | Kernel::Binary(BinOp::Add)) || a.inputs.len() != 2
        {
            continue;
        }
        let side = usize::from(a.inputs[1] == Src::Slot(y));
        if a.inputs[1 - side] == Src::Slot(y) || join[j].is_some() {
            continue;
        }
        join[j] = Some((i, side));
        gone[i] = true;
    }
    let mut bns: HashMap<usize, Step> = HashMap::new();
    let mut out = Vec::with_capacity(steps.len());
    for (i, s) in steps.into_iter().enumerate() {
        if gone[i] {
            bns.insert(i, s);
            continue;
        }
        let Some((b, side)) = join[i] else {
            out.push(s);
            continue;
        };
        let bn = bns
            .remove(&b)
            .expect("a batch norm runs before the Add that reads it");
        let Kernel::BatchNorm { op, mean, var } = bn.kernel else {
            unreachable!("only batch norms are joined");
        };
        let relu = matches!(s.kernel, Kernel::AddRelu);
        let mut inputs = bn.inputs;
        inputs.truncate(3);
        inputs.push(s.inputs[1 - side]);
        out.push(Step {
            name: bn.name,
            op_type: bn.op_type,
            profile_key: if relu {
                "BatchNormalization+Add+Relu"
            } else {
                "BatchNormalization+Add"
            },
            absorbed: Some(s.absorbed.unwrap_or(s.name)),
            kernel: Kernel::BatchNormAdd {
                op,
                mean,
                var,
                relu,
            },
            inputs,
            outputs: s.outputs,
        });
    }
    out
}

/// Slot readers: for each slot, the steps reading it, once per input that names it.
fn readers_of(steps: &[Step]) -> HashMap<usize, Vec<usize>> {
    let mut readers: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, s) in steps.iter().enumerate() {
        for src in &s.inputs {
            if let Src::Slot(k) = src {
                readers.entry(*k).or_default().push(i);
            }
        }
    }
    readers
}

/// Folds `Mul(x, Sigmoid(x))` (either operand order), SiLU as every exporter spells it, into one
/// [`Activation::Silu`] step where the Sigmoid was, reading `x` and writing the Mul's output; and
/// `Mul(x, HardSigmoid(x))`, HardSwish as exporters that decompose it spell it (MobileNet-V3),
/// into one [`Activation::HardSigmoidMul`] with the HardSigmoid's alpha and beta.
/// Only where the Mul is the gate's sole reader and the gate's output is not the program's: a
/// gate read elsewhere (a squeeze-excitation gate, which multiplies a different tensor) must
/// still be computed. EfficientNet-B0 has 49 SiLU pairs, MobileNet-V3-Small 19 HardSwish pairs;
/// fused, each is one pass over the activation forward and one backward instead of two and
/// three, and the gate tensor is no longer kept for backward. Forward is bitwise the pair's;
/// backward is too for HardSwish, and differs by rounding for SiLU (one expression instead of
/// the executor's sum of the two paths into `x`).
fn fuse_gates(steps: Vec<Step>, output_slot: usize) -> Vec<Step> {
    let readers = readers_of(&steps);
    // Per gate step: the fused activation, its profile label, and the Mul it absorbs (outputs
    // and name); and the Muls absorbed.
    type Plan = (Activation, &'static str, Vec<usize>, String);
    let mut plan: Vec<Option<Plan>> = vec![None; steps.len()];
    let mut absorbed = vec![false; steps.len()];
    for (i, s) in steps.iter().enumerate() {
        let (fused, label) = match s.kernel {
            Kernel::Act(Activation::Sigmoid) => (Activation::Silu, "Sigmoid+Mul"),
            Kernel::Act(Activation::HardSigmoid { alpha, beta }) => (
                Activation::HardSigmoidMul { alpha, beta },
                "HardSigmoid+Mul",
            ),
            _ => continue,
        };
        let [Src::Slot(x)] = s.inputs.as_slice() else {
            continue;
        };
        let y = s.outputs[0];
        if y == output_slot {
            continue;
        }
        let Some(&[j]) = readers.get(&y).map(Vec::as_slice) else {
            continue;
        };
        let m = &steps[j];
        let pair = [Src::Slot(*x), Src::Slot(y)];
        let reversed = [Src::Slot(y), Src::Slot(*x)];
        if matches!(m.kernel, Kernel::Binary(BinOp::Mul))
            && (m.inputs == pair || m.inputs == reversed)
        {
            absorbed[j] = true;
            plan[i] = Some((fused, label, m.outputs.clone(), m.name.clone()));
        }
    }
    steps
        .into_iter()
        .zip(plan)
        .zip(absorbed)
        .filter(|(_, gone)| !gone)
        .map(|((mut s, mul), _)| {
            if let Some((fused, label, outputs, name)) = mul {
                s.kernel = Kernel::Act(fused);
                s.profile_key = label;
                s.outputs = outputs;
                s.absorbed = Some(name);
            }
            s
        })
        .collect()
}

fn two<T: Copy>(v: &[T], default: T, what: &str) -> Result<[T; 2]> {
    match v.len() {
        0 => Ok([default, default]),
        2 => Ok([v[0], v[1]]),
        n => bail!("{what} has {n} entries; the engine trains 2-D convolutions and pools only"),
    }
}

fn pads4(pads: &[(usize, usize)]) -> Result<[usize; 4]> {
    match pads {
        [(t, b), (l, r)] => Ok([*t, *l, *b, *r]),
        _ => bail!("the engine trains 2-D convolutions and pools only"),
    }
}

fn kernel_for(
    node: &crate::ir::Node,
    x: &[usize],
    out: &[usize],
    batch: usize,
    facts: &Facts,
) -> Result<Kernel> {
    let rank4 = |what: &str| -> Result<()> {
        if x.len() != 4 {
            bail!(
                "{what} on a rank-{} input; the engine trains NCHW images only",
                x.len()
            );
        }
        Ok(())
    };
    Ok(match &node.op {
        Op::Conv(c) => {
            rank4("Conv")?;
            let w = &facts[&node.inputs[1]].shape;
            let pads = resolve_pads(
                &x[2..],
                &w[2..],
                &c.strides,
                &c.dilations,
                &c.pads,
                c.auto_pad,
            )?;
            Kernel::Conv(Conv2d {
                group: c.group,
                strides: two(&c.strides, 1, "strides")?,
                pads: pads4(&pads)?,
                dilations: two(&c.dilations, 1, "dilations")?,
            })
        }
        Op::BatchNorm(b) => {
            rank4("BatchNormalization")?;
            Kernel::BatchNorm {
                op: BatchNorm2d {
                    epsilon: b.epsilon,
                    momentum: b.momentum,
                    act: BnAct::None,
                },
                mean: 0,
                var: 0,
            }
        }
        Op::Relu => Kernel::Act(Activation::Relu),
        Op::Clip(c) => Kernel::Act(Activation::Clip {
            min: c.min.unwrap_or(f32::NEG_INFINITY),
            max: c.max.unwrap_or(f32::INFINITY),
        }),
        Op::LeakyRelu { alpha } => Kernel::Act(Activation::LeakyRelu { alpha: *alpha }),
        Op::Elu { alpha } => Kernel::Act(Activation::Elu { alpha: *alpha }),
        Op::Sigmoid => Kernel::Act(Activation::Sigmoid),
        Op::HardSigmoid { alpha, beta } => Kernel::Act(Activation::HardSigmoid {
            alpha: *alpha,
            beta: *beta,
        }),
        Op::HardSwish => Kernel::Act(Activation::HardSwish),
        Op::Gelu { tanh } => Kernel::Act(Activation::Gelu { tanh: *tanh }),
        Op::Erf => Kernel::Act(Activation::Erf),
        Op::Pow { exponent } => Kernel::Act(Activation::Pow {
            exponent: *exponent,
        }),
        Op::Sqrt => Kernel::Act(Activation::Sqrt),
        Op::Exp => Kernel::Act(Activation::Exp),
        Op::LayerNorm(l) => {
            let axis = norm_axis(l.axis, x.len())?;
            if axis == 0 {
                bail!("LayerNormalization over the batch axis cannot be trained");
            }
            Kernel::LayerNorm(LayerNorm {
                epsilon: l.epsilon,
                axis,
            })
        }
        Op::InstanceNorm { epsilon } => Kernel::GroupNorm(GroupNorm {
            epsilon: *epsilon,
            groups: None,
        }),
        Op::GroupNorm { epsilon, groups } => Kernel::GroupNorm(GroupNorm {
            epsilon: *epsilon,
            groups: Some(*groups),
        }),
        Op::Add => Kernel::Binary(BinOp::Add),
        Op::Sub => Kernel::Binary(BinOp::Sub),
        Op::Mul => Kernel::Binary(BinOp::Mul),
        Op::PRelu => Kernel::Binary(BinOp::PRelu),
        Op::Div => Kernel::Binary(BinOp::Div),
        Op::Concat { axis } => Kernel::Concat {
            axis: norm_axis(*axis, x.len())?,
        },
        Op::Split(s) => {
            let axis = norm_axis(s.axis, x.len())?;
            Kernel::Split {
                axis,
                sizes: split_sizes(x[axis], s.split.as_deref(), node.outputs.len())?,
            }
        }
        Op::Pool(p) => {
            rank4(node.op.onnx_type())?;
            let dil = if p.dilations.is_empty() {
                vec![1, 1]
            } else {
                p.dilations.clone()
            };
            let pads = resolve_pads(
                &x[2..],
                &p.kernel_shape,
                &p.strides,
                &dil,
                &p.pads,
                p.auto_pad,
            )?;
            if p.auto_pad != AutoPad::NotSet && p.ceil_mode {
                bail!("auto_pad with ceil_mode is not supported");
            }
            let kernel = two(&p.kernel_shape, 1, "kernel_shape")?;
            let strides = two(&p.strides, 1, "strides")?;
            match p.kind {
                PoolKind::Max => Kernel::MaxPool(MaxPool2d {
                    kernel,
                    strides,
                    pads: pads4(&pads)?,
                    dilations: two(&dil, 1, "dilations")?,
                    ceil_mode: p.ceil_mode,
                }),
                PoolKind::Average => {
                    if dil.iter().any(|&d| d != 1) {
                        bail!("AveragePool with dilations is not supported");
                    }
                    Kernel::AvgPool(AveragePool2d {
                        kernel,
                        strides,
                        pads: pads4(&pads)?,
                        ceil_mode: p.ceil_mode,
                        count_include_pad: p.count_include_pad,
                    })
                }
            }
        }
        Op::GlobalAveragePool => {
            rank4("GlobalAveragePool")?;
            Kernel::GlobalAvgPool
        }
        Op::ReduceMean(r) => {
            let axes = reduce_axes(r, x.len())?;
            if axes.contains(&0) {
                bail!("ReduceMean over the batch axis cannot be trained");
            }
            Kernel::ReduceMean {
                axes,
                out_tail: out[1..].to_vec(),
            }
        }
        Op::Flatten { .. } | Op::Reshape { .. } | Op::Squeeze { .. } | Op::Unsqueeze { .. } => {
            let batch_major = !x.is_empty() && !out.is_empty() && x[0] == batch && out[0] == batch;
            Kernel::Reshape {
                tail: out.get(1..).unwrap_or_default().to_vec(),
                batch_major,
                fixed: out.to_vec(),
            }
        }
        Op::Transpose { perm } => {
            let perm = perm.clone().unwrap_or_else(|| (0..x.len()).rev().collect());
            if perm.first() != Some(&0) {
                bail!("Transpose that moves the batch axis cannot be trained");
            }
            Kernel::Transpose { perm }
        }
        Op::Slice(s) => {
            let axes: Vec<usize> = match &s.axes {
                Some(a) => a
                    .iter()
                    .map(|&v| norm_axis(v, x.len()))
                    .collect::<Result<_>>()?,
                None => (0..s.starts.len()).collect(),
            };
            if axes.contains(&0) {
                bail!("Slice along the batch axis cannot be trained");
            }
            Kernel::Slice(s.clone())
        }
        Op::Pad(p) => {
            if p.mode != crate::ir::ops::PadMode::Constant {
                bail!(
                    "Pad mode '{}' cannot be trained (constant only)",
                    p.mode.onnx_name()
                );
            }
            let rank = x.len();
            let axes: Vec<usize> = match &p.axes {
                Some(a) => a
                    .iter()
                    .map(|&v| norm_axis(v, rank))
                    .collect::<Result<_>>()?,
                None => (0..rank).collect(),
            };
            let mut pads = vec![(0i64, 0i64); rank];
            for (j, &ax) in axes.iter().enumerate() {
                pads[ax] = (p.pads[j], p.pads[j + axes.len()]);
            }
            if pads[0] != (0, 0) {
                bail!("Pad along the batch axis cannot be trained");
            }
            Kernel::Pad {
                pads,
                value: p.value,
            }
        }
        Op::Gemm(g) => Kernel::Gemm(Gemm {
            alpha: g.alpha,
            beta: g.beta,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
        }),
        Op::MatMul => {
            let b = &facts[&node.inputs[1]].shape;
            // A rank > 2 activation times a matrix: a Linear on channels-last pixels, run as
            // one GEMM over the rows (the executor flattens the leading axes).
            if x.len() < 2 || b.len() != 2 {
                bail!(
                    "MatMul of ranks {} and {} cannot be trained (an activation times a matrix only)",
                    x.len(),
                    b.len()
                );
            }
            Kernel::Gemm(Gemm {
                alpha: 1.0,
                beta: 0.0,
                trans_a: false,
                trans_b: false,
            })
        }
        Op::Dropout { ratio } => Kernel::Dropout { ratio: *ratio },
        Op::Identity => Kernel::Reshape {
            tail: out.get(1..).unwrap_or_default().to_vec(),
            batch_major: true,
            fixed: out.to_vec(),
        },
        Op::Sum => match node.inputs.len() {
            1 => Kernel::Reshape {
                tail: out.get(1..).unwrap_or_default().to_vec(),
                batch_major: true,
                fixed: out.to_vec(),
            },
            2 => Kernel::Binary(BinOp::Add),
            k => bail!("Sum of {k} inputs cannot be trained (two at most)"),
        },
        Op::Softmax { .. } | Op::LogSoftmax { .. } => bail!(
            "{} inside the network cannot be trained (only as the classifier's last op)",
            node.op.onnx_type()
        ),
        Op::Gather { axis } => {
            let ax = norm_axis(*axis, x.len())?;
            if ax == 0 {
                bail!("Gather along the batch axis cannot be trained");
            }
            let idx = node
                .input(1)
                .and_then(|i| facts.get(i))
                .and_then(|f| f.value.as_ref())
                .ok_or_else(|| {
                    anyhow!("Gather with indices computed at run time cannot be trained")
                })?;
            Kernel::Gather {
                axis: ax,
                list: crate::ir::shape::gather_index_list(idx, x[ax])?,
                out_tail: out[1..].to_vec(),
            }
        }
        Op::GatherNd => bail!(
            "GatherND cannot be trained (elrt rewrites only the adaptive-pool form of the \
             dynamo exporter: a transpose of the image's plane to the front, constant indices)"
        ),
        Op::DynSlice
        | Op::Shape(_)
        | Op::Cast { .. }
        | Op::ConstantOfShape { .. }
        | Op::Range
        | Op::Expand
        | Op::Where
        | Op::Equal => bail!(
            "op '{}' computes on run-time values the engine cannot train through",
            node.op.onnx_type()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, kernel: Kernel, inputs: &[usize], output: usize) -> Step {
        Step {
            name: name.into(),
            op_type: "test",
            profile_key: "test",
            absorbed: None,
            kernel,
            inputs: inputs.iter().map(|&k| Src::Slot(k)).collect(),
            outputs: vec![output],
        }
    }

    fn bn() -> Kernel {
        Kernel::BatchNorm {
            op: BatchNorm2d::default(),
            mean: 0,
            var: 0,
        }
    }

    /// A batch norm joins the Add (or Add + Relu) that alone reads its output, taking the Add's
    /// place, outputs and other operand (either side); not one with an activation, one read
    /// elsewhere too, one whose output is the program's, or an Add of one value with itself.
    #[test]
    fn batch_norms_join_only_the_add_that_alone_reads_them() {
        let relu = || Kernel::Act(Activation::Relu);
        let add = || Kernel::Binary(BinOp::Add);
        let steps = vec![
            step("conv", relu(), &[0], 1),
            step("bn1", bn(), &[1], 2),
            // bn1's Add is second in the list, its other operand first.
            step("other", relu(), &[0], 3),
            step("add1", add(), &[3, 2], 4),
            step("relu1", relu(), &[4], 5),
            // bn2's output is read twice: not joined.
            step("bn2", bn(), &[5], 6),
            step("use2", relu(), &[6], 7),
            step("add2", add(), &[6, 5], 8),
            // bn3 joins a plain Add (no ReLU after it), as the left operand.
            step("bn3", bn(), &[8], 9),
            step("add3", add(), &[9, 8], 10),
            // bn4 carries a ReLU of its own (after fuse_act): not joined.
            step("bn4", bn(), &[10], 11),
            step("relu4", relu(), &[11], 12),
            step("add4", add(), &[12, 10], 13),
            // bn5 added to itself: not joined.
            step("bn5", bn(), &[13], 14),
            step("add5", add(), &[14, 14], 15),
            // The program's output is never joined away.
            step("bn6", bn(), &[15], 16),
            step("add6", add(), &[16, 15], 17),
        ];
        let fused = fuse_residual(fuse_act(steps, 16), 16);
        let names: Vec<&str> = fused.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "conv", "other", "bn1", "bn2", "use2", "add2", "bn3", "bn4", "add4", "bn5", "add5",
                "bn6", "add6"
            ]
        );
        let join = |i: usize| match &fused[i].kernel {
            Kernel::BatchNormAdd { relu, .. } => *relu,
            k => panic!("{} is {k:?}", fused[i].name),
        };
        assert!(join(2));
        assert_eq!(
            (
                fused[2].inputs.as_slice(),
                fused[2].outputs.as_slice(),
                fused[2].absorbed.as_deref(),
                fused[2].profile_key
            ),
            (
                &[Src::Slot(1), Src::Slot(3)][..],
                &[5][..],
                Some("relu1"),
                "BatchNormalization+Add+Relu"
            )
        );
        assert!(!join(6));
        assert_eq!(fused[6].inputs, [Src::Slot(8), Src::Slot(8)]);
        assert_eq!(fused[6].outputs, [10]);
        assert_eq!(fused[6].absorbed.as_deref(), Some("add3"));
        for i in [3, 7, 9, 11] {
            assert!(
                matches!(fused[i].kernel, Kernel::BatchNorm { .. }),
                "{}",
                fused[i].name
            );
        }
    }

    /// A Relu is folded only into the step whose output it alone reads, and never away from the
    /// program's output.
    #[test]
    fn relu_and_clip_fuse_only_into_their_sole_producer() {
        let relu = || Kernel::Act(Activation::Relu);
        let clip = || Kernel::Act(Activation::Clip { min: 0.0, max: 6.0 });
        let steps = vec![
            step("bn1", bn(), &[0], 1),
            step("relu1", relu(), &[1], 2),
            // bn2's output is read twice (relu2 and the Add): not fused.
            step("bn2", bn(), &[2], 3),
            step("relu2", relu(), &[3], 4),
            step("add", Kernel::Binary(BinOp::Add), &[3, 4], 5),
            step("relu3", relu(), &[5], 6),
            // A Mul before a Relu stays as it is.
            step("mul", Kernel::Binary(BinOp::Mul), &[6, 6], 7),
            step("relu4", relu(), &[7], 8),
            // The program's output is never fused away.
            step("bn3", bn(), &[8], 9),
            // A Clip (ReLU6) folds into a BatchNormalization, not into an Add.
            step("bn4", bn(), &[9], 10),
            step("clip1", clip(), &[10], 11),
            step("add2", Kernel::Binary(BinOp::Add), &[11, 11], 12),
            step("clip2", clip(), &[12], 13),
        ];
        let fused = fuse_act(steps.clone(), 13);
        let names: Vec<&str> = fused.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["bn1", "bn2", "relu2", "add", "mul", "relu4", "bn3", "bn4", "add2", "clip2"]
        );
        let Kernel::BatchNorm { op, .. } = &fused[0].kernel else {
            panic!()
        };
        assert_eq!(op.act, BnAct::Relu);
        assert_eq!(
            (fused[0].outputs.as_slice(), fused[0].absorbed.as_deref()),
            (&[2][..], Some("relu1"))
        );
        let Kernel::BatchNorm { op, .. } = &fused[1].kernel else {
            panic!()
        };
        assert_eq!(op.act, BnAct::None);
        assert!(matches!(fused[3].kernel, Kernel::AddRelu));
        assert_eq!(fused[3].outputs, [6]);
        assert!(matches!(fused[4].kernel, Kernel::Binary(BinOp::Mul)));
        let Kernel::BatchNorm { op, .. } = &fused[6].kernel else {
            panic!()
        };
        assert_eq!(op.act, BnAct::None);
        let Kernel::BatchNorm { op, .. } = &fused[7].kernel else {
            panic!()
        };
        assert_eq!(op.act, BnAct::Clip { min: 0.0, max: 6.0 });
        assert_eq!(
            (fused[7].outputs.as_slice(), fused[7].absorbed.as_deref()),
            (&[11][..], Some("clip1"))
        );
        assert_eq!(fused[7].profile_key, "BatchNormalization+Clip");
        // With a Relu producing the output, the Relu stays.
        let tail = vec![step("bn", bn(), &[0], 1), step("relu", relu(), &[1], 2)];
        assert_eq!(fuse_act(tail.clone(), 1).len(), 2);
        assert_eq!(fuse_act(tail, 2).len(), 1);
    }

    /// SiLU and HardSwish (the gate fusion's or ONNX's own) fold into a BatchNormalization that
    /// only they read, and not into an Add; a gate after a BN read twice stays.
    #[test]
    fn smooth_gates_fuse_into_their_sole_batch_norm() {
        let hsm = Activation::HardSigmoidMul {
            alpha: 1.0 / 6.0,
            beta: 0.5,
        };
        let steps = vec![
            step("bn1", bn(), &[0], 1),
            step("silu", Kernel::Act(Activation::Silu), &[1], 2),
            step("bn2", bn(), &[2], 3),
            step("hsm", Kernel::Act(hsm), &[3], 4),
            step("bn3", bn(), &[4], 5),
            step("hswish", Kernel::Act(Activation::HardSwish), &[5], 6),
            // An Add before a gate keeps it; so does a BN whose output is also read elsewhere.
            step("add", Kernel::Binary(BinOp::Add), &[6, 6], 7),
            step("silu2", Kernel::Act(Activation::Silu), &[7], 8),
            step("bn4", bn(), &[8], 9),
            step("silu3", Kernel::Act(Activation::Silu), &[9], 10),
            step("mul", Kernel::Binary(BinOp::Mul), &[9, 10], 11),
        ];
        let fused = fuse_act(steps, 11);
        let names: Vec<&str> = fused.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["bn1", "bn2", "bn3", "add", "silu2", "bn4", "silu3", "mul"]
        );
        let acts: Vec<(BnAct, &str)> = fused[..3]
            .iter()
            .map(|s| match &s.kernel {
                Kernel::BatchNorm { op, .. } => (op.act, s.profile_key),
                _ => panic!("{} is not a batch norm", s.name),
            })
            .collect();
        assert_eq!(
            acts,
            [
                (BnAct::Silu, "BatchNormalization+SiLU"),
                (
                    BnAct::HardSigmoidMul {
                        alpha: 1.0 / 6.0,
                        beta: 0.5
                    },
                    "BatchNormalization+HardSwish"
                ),
                (BnAct::HardSwish, "BatchNormalization+HardSwish"),
            ]
        );
        assert_eq!(fused[0].outputs, [2]);
        assert_eq!(fused[2].absorbed.as_deref(), Some("hswish"));
    }

    /// `Mul(x, Sigmoid(x))` becomes one SiLU step in either operand order, but not when the
    /// sigmoid is read elsewhere, multiplies another tensor, is squared, or is the output.
    #[test]
    fn silu_fuses_only_sigmoid_times_its_own_input() {
        let sig = || Kernel::Act(Activation::Sigmoid);
        let mul = || Kernel::Binary(BinOp::Mul);
        let steps = vec![
            step("s1", sig(), &[0], 1),
            step("m1", mul(), &[0, 1], 2),
            step("s2", sig(), &[2], 3),
            step("m2", mul(), &[3, 2], 4),
            // s3 is also read by the Add: it must stay.
            step("s3", sig(), &[4], 5),
            step("m3", mul(), &[4, 5], 6),
            step("a3", Kernel::Binary(BinOp::Add), &[5, 6], 7),
            // A gate: the sigmoid multiplies another tensor (squeeze-excitation).
            step("s4", sig(), &[7], 8),
            step("m4", mul(), &[6, 8], 9),
            // sigmoid squared.
            step("s5", sig(), &[9], 10),
            step("m5", mul(), &[10, 10], 11),
            // The program's output is a Sigmoid: never fused away.
            step("s6", sig(), &[11], 12),
        ];
        let fused = fuse_gates(steps.clone(), 12);
        let names: Vec<&str> = fused.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["s1", "s2", "s3", "m3", "a3", "s4", "m4", "s5", "m5", "s6"]
        );
        for (k, (out, mul)) in [(2, "m1"), (4, "m2")].into_iter().enumerate() {
            assert!(matches!(fused[k].kernel, Kernel::Act(Activation::Silu)));
            assert_eq!(fused[k].inputs, [Src::Slot(2 * k)]);
            assert_eq!(
                (fused[k].outputs.as_slice(), fused[k].absorbed.as_deref()),
                (&[out][..], Some(mul))
            );
        }
        for s in &fused[2..] {
            assert!(
                !matches!(s.kernel, Kernel::Act(Activation::Silu)),
                "{}",
                s.name
            );
        }
        let tail = vec![step("s", sig(), &[0], 1), step("m", mul(), &[0, 1], 2)];
        assert_eq!(fuse_gates(tail.clone(), 1).len(), 2);
        assert_eq!(fuse_gates(tail, 2).len(), 1);
    }

    /// `Mul(x, HardSigmoid(x))` becomes one step keeping the HardSigmoid's alpha and beta, in
    /// either operand order; a HardSigmoid gating another tensor (squeeze-excitation) stays.
    #[test]
    fn hard_sigmoid_times_its_own_input_fuses_with_its_constants() {
        let hs = |alpha, beta| Kernel::Act(Activation::HardSigmoid { alpha, beta });
        let mul = || Kernel::Binary(BinOp::Mul);
        let steps = vec![
            step("h1", hs(1.0 / 6.0, 0.5), &[0], 1),
            step("m1", mul(), &[1, 0], 2),
            step("h2", hs(0.2, 0.5), &[2], 3),
            step("m2", mul(), &[2, 3], 4),
            // A gate on another tensor.
            step("h3", hs(1.0 / 6.0, 0.5), &[4], 5),
            step("m3", mul(), &[2, 5], 6),
        ];
        let fused = fuse_gates(steps, 6);
        let names: Vec<&str> = fused.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["h1", "h2", "h3", "m3"]);
        for (k, (alpha, out, mul)) in [(1.0 / 6.0, 2, "m1"), (0.2, 4, "m2")]
            .into_iter()
            .enumerate()
        {
            let Kernel::Act(act) = &fused[k].kernel else {
                panic!("{} is not an activation", fused[k].name)
            };
            assert_eq!(*act, Activation::HardSigmoidMul { alpha, beta: 0.5 });
            assert_eq!(fused[k].profile_key, "HardSigmoid+Mul");
            assert_eq!(
                (fused[k].outputs.as_slice(), fused[k].absorbed.as_deref()),
                (&[out][..], Some(mul))
            );
        }
        assert!(matches!(
            fused[2].kernel,
            Kernel::Act(Activation::HardSigmoid { .. })
        ));
    }
}
