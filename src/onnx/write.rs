//! [`Graph`] -> ONNX ModelProto, in the forms the graph's opset wants.
//!
//! Operands held as attributes in the IR are written as constant initializers named
//! `<node>/<operand>` where the opset takes them as inputs, so that reading the written file
//! gives back the same graph.

use std::path::Path;

use anyhow::{bail, Context, Result};
use onnx_protobuf::{
    tensor_shape_proto::{dimension, Dimension},
    type_proto, Message, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use super::attrs::make;
use super::tensor;
use crate::ir::ops::*;
use crate::ir::{Dim, Graph, Node, Tensor, ValueInfo};

/// The lowest ONNX IR version that a given opset needs (onnx/helper.py's table).
fn min_ir_version(opset: i64) -> i64 {
    match opset {
        ..=8 => 3,
        9 => 4,
        10 => 5,
        11 => 6,
        12..=14 => 7,
        15..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

/// Writes atomically: a temporary file beside the target, then a rename, so a failure never
/// leaves a half-written model.
pub fn write_file(graph: &Graph, path: &Path) -> Result<()> {
    let bytes = write_bytes(graph)?;
    crate::util::write_atomic(path, &bytes)
}

pub fn write_bytes(graph: &Graph) -> Result<Vec<u8>> {
    let model = to_model(graph)?;
    model
        .write_to_bytes()
        .context("cannot encode the model as protobuf")
}

pub fn to_model(graph: &Graph) -> Result<ModelProto> {
    let mut m = ModelProto::new();
    m.ir_version = graph.meta.ir_version.max(min_ir_version(graph.opset));
    m.producer_name = if graph.meta.producer_name.is_empty() {
        "elrt".into()
    } else {
        graph.meta.producer_name.clone()
    };
    m.producer_version = graph.meta.producer_version.clone();
    m.domain = graph.meta.domain.clone();
    m.model_version = graph.meta.model_version;
    m.doc_string = graph.meta.doc_string.clone();
    m.metadata_props = graph
        .meta
        .metadata_props
        .iter()
        .map(|(k, v)| {
            let mut e = StringStringEntryProto::new();
            e.key = k.clone();
            e.value = v.clone();
            e
        })
        .collect();
    let mut os = OperatorSetIdProto::new();
    os.domain = String::new();
    os.version = graph.opset;
    m.opset_import = vec![os];

    let g = m.graph.mut_or_insert_default();
    g.name = graph.name.clone();
    g.input = graph.inputs.iter().map(value_info).collect();
    g.output = graph.outputs.iter().map(value_info).collect();
    let mut extra: Vec<(String, Tensor)> = Vec::new();
    for n in &graph.nodes {
        check_opset(n, graph.opset)
            .with_context(|| format!("node '{}' ({})", n.name, n.op.onnx_type()))?;
        g.node.push(node_proto(n, graph.opset, &mut extra));
    }
    for (k, t) in graph.initializers.iter() {
        g.initializer.push(tensor::to_proto(k, t));
    }
    for (k, t) in &extra {
        g.initializer.push(tensor::to_proto(k, t));
    }
    // Before IR version 4 (opsets 7 and 8) every initializer is also a graph input.
    if m.ir_version < 4 {
        let declared: Vec<ValueInfoProto> = g
            .initializer
            .iter()
            .map(|t| {
                value_info(&ValueInfo {
                    name: t.name.clone(),
                    elem: crate::ir::ElemType::from_onnx(t.data_type).expect("written type"),
                    shape: Some(t.dims.iter().map(|&d| Dim::Fixed(d as usize)).collect()),
                })
            })
            .collect();
        g.input.extend(declared);
    }
    Ok(m)
}

/// Refuses what the target opset cannot express, rather than writing a file that checkers
/// reject or that runtimes read differently.
fn check_opset(n: &Node, opset: i64) -> Result<()> {
    let need = |min: i64, what: &str| -> Result<()> {
        if opset < min {
            bail!("{what} needs opset {min} or later, but the graph is written at opset {opset}");
        }
        Ok(())
    };
    match &n.op {
        Op::HardSwish => need(14, "HardSwish")?,
        Op::Gelu { .. } => need(20, "Gelu")?,
        Op::LayerNorm(_) => need(17, "LayerNormalization")?,
        Op::GroupNorm { .. } => need(21, "GroupNormalization with a scale per channel")?,
        Op::Erf => need(9, "Erf")?,
        Op::PRelu => need(7, "PRelu with a broadcast slope")?,
        Op::Pool(p) => {
            if p.ceil_mode {
                need(10, "ceil_mode")?;
            }
            if p.dilations.iter().any(|&d| d != 1) {
                need(
                    if p.kind == PoolKind::Max { 10 } else { 19 },
                    "pool dilations",
                )?;
            }
        }
        Op::Slice(s) if s.steps.as_ref().is_some_and(|v| v.iter().any(|&x| x != 1)) => {
            need(10, "Slice steps")?
        }
        Op::Pad(p) if p.axes.is_some() => need(18, "Pad axes")?,
        Op::Shape(s) if s.start.is_some() || s.end.is_some() => need(15, "Shape start/end")?,
        Op::Reshape { allowzero: true } => need(14, "Reshape allowzero")?,
        Op::DynSlice => need(10, "Slice with computed starts/ends")?,
        Op::ConstantOfShape { .. } | Op::Where => need(9, n.op.onnx_type())?,
        Op::Expand => need(8, "Expand")?,
        Op::Range | Op::GatherNd => need(11, n.op.onnx_type())?,
        // Before opset 13 Softmax normalised over the input flattened to 2-D from `axis` on;
        // the two forms agree only where shape inference marked them so (`Either`).
        Op::Softmax { axes, .. } | Op::LogSoftmax { axes, .. } => match axes {
            SoftmaxAxes::Flattened if opset >= 13 => bail!(
                "this Softmax has opset-12 semantics (the input flattened to 2-D) and cannot be written at opset {opset}"
            ),
            SoftmaxAxes::One => need(13, "Softmax along one axis")?,
            _ => {}
        },
        _ => {}
    }
    Ok(())
}

fn value_info(v: &ValueInfo) -> ValueInfoProto {
    let mut p = ValueInfoProto::new();
    p.name = v.name.clone();
    let mut tt = type_proto::Tensor::new();
    tt.elem_type = v.elem.onnx_code();
    if let Some(shape) = &v.shape {
        let mut s = TensorShapeProto::new();
        s.dim = shape
            .iter()
            .map(|d| {
                let mut x = Dimension::new();
                x.value = match d {
                    Dim::Fixed(n) => Some(dimension::Value::DimValue(*n as i64)),
                    Dim::Sym(p) => Some(dimension::Value::DimParam(p.clone())),
                    Dim::Unknown => None,
                };
                x
            })
            .collect();
        tt.shape = Some(s).into();
    }
    let mut t = TypeProto::new();
    t.value = Some(type_proto::Value::TensorType(tt));
    p.type_ = Some(t).into();
    p
}

/// Collects a node's inputs, adding constant operands as new initializers.
struct InputList<'a> {
    node: &'a Node,
    list: Vec<String>,
    extra: &'a mut Vec<(String, Tensor)>,
}

impl InputList<'_> {
    fn konst(&mut self, what: &str, t: Tensor) {
        let name = format!("{}/{}", self.node.name, what);
        self.extra.push((name.clone(), t));
        self.list.push(name);
    }

    fn absent(&mut self) {
        self.list.push(String::new());
    }

    /// Trailing empty inputs are dropped, as ONNX allows.
    fn finish(mut self) -> Vec<String> {
        while self.list.last().is_some_and(|s| s.is_empty()) {
            self.list.pop();
        }
        self.list
    }
}

fn spatial_attrs(
    a: &mut Vec<onnx_protobuf::AttributeProto>,
    strides: &[usize],
    pads: &[usize],
    dilations: &[usize],
    auto_pad: AutoPad,
) {
    if !strides.is_empty() {
        a.push(make::usizes("strides", strides));
    }
    if !pads.is_empty() {
        a.push(make::usizes("pads", pads));
    }
    if !dilations.is_empty() {
        a.push(make::usizes("dilations", dilations));
    }
    if auto_pad != AutoPad::NotSet {
        a.push(make::string("auto_pad", auto_pad.onnx_name()));
    }
}

fn node_proto(n: &Node, opset: i64, extra: &mut Vec<(String, Tensor)>) -> NodeProto {
    let mut p = NodeProto::new();
    p.name = n.name.clone();
    p.op_type = n.op.onnx_type().to_string();
    p.output = n.outputs.clone();
    let mut ins = InputList {
        node: n,
        list: n.inputs.clone(),
        extra,
    };
    let a = &mut p.attribute;
    match &n.op {
        Op::Conv(c) => {
            if let Some(k) = &c.kernel_shape {
                a.push(make::usizes("kernel_shape", k));
            }
            spatial_attrs(a, &c.strides, &c.pads, &c.dilations, c.auto_pad);
            a.push(make::int("group", c.group as i64));
        }
        Op::BatchNorm(b) => {
            a.push(make::float("epsilon", b.epsilon));
            a.push(make::float("momentum", b.momentum));
            if opset >= 14 && b.training_mode {
                a.push(make::int("training_mode", 1));
            }
        }
        Op::Clip(c) => {
            if opset < 11 {
                if let Some(v) = c.min {
                    a.push(make::float("min", v));
                }
                if let Some(v) = c.max {
                    a.push(make::float("max", v));
                }
            } else {
                for v in [c.min, c.max] {
                    match v {
                        Some(v) => {
                            let what = if ins.list.len() == 1 { "min" } else { "max" };
                            ins.konst(what, Tensor::f32(&[], vec![v]).expect("scalar"));
                        }
                        None => ins.absent(),
                    }
                }
            }
        }
        Op::LeakyRelu { alpha } | Op::Elu { alpha } => a.push(make::float("alpha", *alpha)),
        Op::Gelu { tanh } => {
            if *tanh {
                a.push(make::string("approximate", "tanh"));
            }
        }
        Op::Pow { exponent } => {
            ins.konst(
                "exponent",
                Tensor::f32(&[], vec![*exponent]).expect("scalar"),
            );
        }
        Op::InstanceNorm { epsilon } => a.push(make::float("epsilon", *epsilon)),
        Op::GroupNorm { epsilon, groups } => {
            a.push(make::float("epsilon", *epsilon));
            a.push(make::int("num_groups", *groups as i64));
        }
        Op::LayerNorm(l) => {
            a.push(make::int("axis", l.axis));
            a.push(make::float("epsilon", l.epsilon));
        }
        Op::HardSigmoid { alpha, beta } => {
            a.push(make::float("alpha", *alpha));
            a.push(make::float("beta", *beta));
        }
        Op::Concat { axis } => a.push(make::int("axis", *axis)),
        Op::Split(s) => {
            a.push(make::int("axis", s.axis));
            match &s.split {
                Some(sizes) if opset < 13 => a.push(make::usizes("split", sizes)),
                Some(sizes) => {
                    let v: Vec<i64> = sizes.iter().map(|&x| x as i64).collect();
                    ins.konst("split", Tensor::i64_vec(&v));
                }
                None if opset >= 18 => a.push(make::int("num_outputs", n.outputs.len() as i64)),
                None => {}
            }
        }
        Op::Pool(pl) => {
            a.push(make::usizes("kernel_shape", &pl.kernel_shape));
            spatial_attrs(a, &pl.strides, &pl.pads, &pl.dilations, pl.auto_pad);
            if pl.ceil_mode {
                a.push(make::int("ceil_mode", 1));
            }
            match pl.kind {
                PoolKind::Average if pl.count_include_pad => {
                    a.push(make::int("count_include_pad", 1))
                }
                PoolKind::Max if pl.storage_order != 0 => {
                    a.push(make::int("storage_order", pl.storage_order))
                }
                _ => {}
            }
        }
        Op::ReduceMean(r) => {
            a.push(make::int("keepdims", r.keepdims as i64));
            if r.noop_with_empty_axes {
                a.push(make::int("noop_with_empty_axes", 1));
            }
            if let Some(axes) = &r.axes {
                if opset < 18 {
                    a.push(make::ints("axes", axes));
                } else {
                    ins.konst("axes", Tensor::i64_vec(axes));
                }
            }
        }
        Op::Flatten { axis } => a.push(make::int("axis", *axis)),
        Op::Gemm(gm) => {
            a.push(make::float("alpha", gm.alpha));
            a.push(make::float("beta", gm.beta));
            a.push(make::int("transA", gm.trans_a as i64));
            a.push(make::int("transB", gm.trans_b as i64));
        }
        Op::Reshape { allowzero } => {
            if *allowzero && opset >= 14 {
                a.push(make::int("allowzero", 1));
            }
        }
        Op::Transpose { perm } => {
            if let Some(p) = perm {
                a.push(make::usizes("perm", p));
            }
        }
        Op::Slice(s) => {
            if opset < 10 {
                a.push(make::ints("starts", &s.starts));
                a.push(make::ints("ends", &s.ends));
                if let Some(x) = &s.axes {
                    a.push(make::ints("axes", x));
                }
            } else {
                ins.konst("starts", Tensor::i64_vec(&s.starts));
                ins.konst("ends", Tensor::i64_vec(&s.ends));
                match &s.axes {
                    Some(x) => ins.konst("axes", Tensor::i64_vec(x)),
                    None => ins.absent(),
                }
                if let Some(x) = &s.steps {
                    ins.konst("steps", Tensor::i64_vec(x));
                }
            }
        }
        Op::Pad(pd) => {
            a.push(make::string("mode", pd.mode.onnx_name()));
            if opset < 11 {
                a.push(make::ints("pads", &pd.pads));
                a.push(make::float("value", pd.value));
            } else {
                ins.konst("pads", Tensor::i64_vec(&pd.pads));
                ins.konst(
                    "constant_value",
                    Tensor::f32(&[], vec![pd.value]).expect("scalar"),
                );
                if let Some(x) = &pd.axes {
                    ins.konst("axes", Tensor::i64_vec(x));
                }
            }
        }
        Op::Squeeze { axes } => {
            if let Some(x) = axes {
                if opset < 13 {
                    a.push(make::ints("axes", x));
                } else {
                    ins.konst("axes", Tensor::i64_vec(x));
                }
            }
        }
        Op::Unsqueeze { axes } => {
            if opset < 13 {
                a.push(make::ints("axes", axes));
            } else {
                ins.konst("axes", Tensor::i64_vec(axes));
            }
        }
        Op::Dropout { ratio } => {
            if opset < 12 {
                a.push(make::float("ratio", *ratio));
            } else {
                ins.konst("ratio", Tensor::f32(&[], vec![*ratio]).expect("scalar"));
            }
        }
        Op::Shape(s) => {
            if let Some(v) = s.start {
                a.push(make::int("start", v));
            }
            if let Some(v) = s.end {
                a.push(make::int("end", v));
            }
        }
        Op::Gather { axis } => a.push(make::int("axis", *axis)),
        Op::Cast { to } => a.push(make::int("to", to.onnx_code() as i64)),
        Op::ConstantOfShape { value } => a.push(make::tensor("value", value)),
        Op::Softmax { axis, .. } | Op::LogSoftmax { axis, .. } => a.push(make::int("axis", *axis)),
        Op::Relu
        | Op::PRelu
        | Op::Sigmoid
        | Op::HardSwish
        | Op::Erf
        | Op::Sqrt
        | Op::Exp
        | Op::Add
        | Op::Sub
        | Op::Mul
        | Op::Div
        | Op::GlobalAveragePool
        | Op::MatMul
        | Op::DynSlice
        | Op::Range
        | Op::Expand
        | Op::Where
        | Op::Equal
        | Op::Sum
        | Op::GatherNd
        | Op::Identity => {}
    }
    p.input = ins.finish();
    p
}
