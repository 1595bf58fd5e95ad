//! ONNX ModelProto -> [`Graph`].
//!
//! Every node becomes a typed [`Op`] with validated attributes. Constant nodes become
//! initializers, and operands that later opsets moved from attributes to inputs are read from
//! constants into the op, so the IR has one form whatever the file's opset (see `ir::ops`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::{type_proto, Message, ModelProto, NodeProto, ValueInfoProto};

use super::attrs::Attrs;
use super::dynamo_restore::Origin;
use super::tensor;
use crate::ir::bn_insert::BN_FOLDED_KEY;
use crate::ir::ops::*;
use crate::ir::{Dim, ElemType, Graph, ModelMeta, Node, Tensor, ValueInfo};

/// Oldest and newest default-domain opsets read.
/// Opsets 7 and 8 differ from 9 only in ops elrt reads the same way (BatchNormalization's
/// `spatial`, MaxPool's optional indices) or does not read at all (Upsample); before 7, binary
/// ops broadcast by attribute, which elrt does not implement.
pub const MIN_OPSET: i64 = 7;
pub const MAX_OPSET: i64 = 21;

/// Ops of quantized models, named so that the error can say what the model is.
const QUANTIZED_OPS: &[&str] = &[
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "ConvInteger",
    "MatMulInteger",
    "QGemm",
];

/// Reads an ONNX file; errors name the file and then the node or field at fault.
/// Weights stored in external data files (PyTorch's default exporter writes `model.onnx.data`)
/// are read from beside the model.
pub fn read_file(path: &Path) -> Result<Graph> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    read_bytes_in(&bytes, Some(dir)).with_context(|| path.display().to_string())
}

/// The file's model as one self-contained protobuf for a runtime that gets bytes (tract):
/// external data inlined, and the intermediate `value_info` shape annotations dropped, since an
/// annotation that names the export's batch symbol (PyTorch's dynamo exporter writes one per
/// value) pins that symbol when the runtime is given a concrete input shape. The graph itself is
/// untouched.
pub fn self_contained_bytes(path: &Path) -> Result<Vec<u8>> {
    let what = || path.display().to_string();
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut model = ModelProto::parse_from_bytes(&bytes)
        .map_err(|e| anyhow!("not an ONNX model, or a truncated one (protobuf: {e})"))
        .with_context(what)?;
    super::external::load(&mut model, path.parent().unwrap_or(Path::new(".")))
        .with_context(what)?;
    if let Some(g) = model.graph.as_mut() {
        g.value_info.clear();
    }
    model
        .write_to_bytes()
        .map_err(|e| anyhow!("cannot encode the model: {e}"))
        .with_context(what)
}

/// Reads a model from memory; a model with external data needs [`read_file`] (or
/// [`read_bytes_in`]), which knows the folder the data files are in.
pub fn read_bytes(bytes: &[u8]) -> Result<Graph> {
    read_bytes_in(bytes, None)
}

/// Reads a model from memory, with external data files resolved in `dir`.
pub fn read_bytes_in(bytes: &[u8], dir: Option<&Path>) -> Result<Graph> {
    let mut model = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| anyhow!("not an ONNX model, or a truncated one (protobuf: {e})"))?;
    if let Some(dir) = dir {
        super::external::load(&mut model, dir)?;
    }
    read_model(&model)
}

fn default_opset(model: &ModelProto) -> Result<i64> {
    let v = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version);
    match v {
        None if model.graph.is_none() || model.opset_import.is_empty() => {
            bail!("not an ONNX model, or a truncated one (no graph or opset_import)")
        }
        None => bail!("the model imports no default ONNX opset"),
        Some(v) if !(MIN_OPSET..=MAX_OPSET).contains(&v) => {
            bail!("opset {v} is not supported (elrt reads opsets {MIN_OPSET} to {MAX_OPSET}; re-export with one of those)")
        }
        Some(v) => Ok(v),
    }
}

pub fn read_model(model: &ModelProto) -> Result<Graph> {
    let opset = default_opset(model)?;
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| anyhow!("not an ONNX model, or a truncated one (no graph)"))?;
    if g.node.is_empty() {
        bail!("the graph has no nodes");
    }

    let mut consts: BTreeMap<String, Tensor> = BTreeMap::new();
    // Values of Constant nodes (TorchScript's way to write an op's fixed operand).
    let mut constant_nodes: HashSet<String> = HashSet::new();
    for t in &g.initializer {
        let v = tensor::from_proto(t).with_context(|| format!("initializer '{}'", t.name))?;
        consts.insert(t.name.clone(), v);
    }
    if !g.sparse_initializer.is_empty() {
        bail!("sparse initializers are not supported");
    }

    let inputs = g
        .input
        .iter()
        .filter(|i| !consts.contains_key(&i.name))
        .map(|i| value_info(i).with_context(|| format!("graph input '{}'", i.name)))
        .collect::<Result<Vec<_>>>()?;
    let outputs = g
        .output
        .iter()
        .map(|o| value_info(o).with_context(|| format!("graph output '{}'", o.name)))
        .collect::<Result<Vec<_>>>()?;

    // Constant nodes become initializers; Identity of a constant is an alias that op parsing
    // may look through (a constant operand reached through Identity is still constant).
    let mut aliases: HashMap<String, String> = HashMap::new();
    let mut used_names: HashSet<String> = HashSet::new();
    let (proto_nodes, stochastic_depth) = super::stochastic_depth::strip(&g.node);
    // Once per process: a command reads its model more than once.
    static NOTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if stochastic_depth > 0 && !NOTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "note: {stochastic_depth} stochastic-depth blocks of a training-mode export read as \
             identities (their eval-mode function): elrt trains without random ops"
        );
    }
    let mut nodes = Vec::with_capacity(proto_nodes.len());
    // Where the exporter says each node came from (for `untie` and `dynamo_restore`).
    let mut origins = Vec::with_capacity(proto_nodes.len());
    for (idx, n) in proto_nodes.iter().enumerate() {
        let name = unique_name(n, idx, &mut used_names);
        let what = || format!("node '{}' ({})", name, n.op_type);
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            bail!(
                "{}: op '{}' of domain '{}' is not supported (only standard ONNX ops are)",
                what(),
                n.op_type,
                n.domain
            );
        }
        if n.op_type == "Constant" {
            let v = constant_value(n).with_context(what)?;
            let out = n
                .output
                .first()
                .ok_or_else(|| anyhow!("{}: has no output", what()))?;
            consts.insert(out.clone(), v);
            constant_nodes.insert(out.clone());
            continue;
        }
        if n.op_type == "Identity" {
            if let Some(src) = n.input.first() {
                let root = aliases.get(src).cloned().unwrap_or_else(|| src.clone());
                if consts.contains_key(&root) {
                    if let Some(o) = n.output.first() {
                        aliases.insert(o.clone(), root);
                    }
                }
            }
        }
        let lookup = ConstLookup {
            consts: &consts,
            aliases: &aliases,
        };
        let (op, inputs) = parse_node(n, opset, &lookup).with_context(what)?;
        nodes.push(Node {
            name,
            op,
            inputs,
            outputs: n.output.clone(),
        });
        let meta = |key: &str| {
            n.metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.as_str())
        };
        origins.push(Origin {
            module: meta("pkg.torch.onnx.name_scopes").and_then(super::untie::module_path),
            class: meta("pkg.torch.onnx.class_hierarchy")
                .and_then(super::dynamo_restore::class_and_op),
        });
    }
    let mut taken: HashSet<String> = consts
        .keys()
        .cloned()
        .chain(inputs.iter().map(|i| i.name.clone()))
        .chain(nodes.iter().flat_map(|n| n.outputs.iter().cloned()))
        .collect();
    let input_names: HashSet<String> = inputs.iter().map(|i| i.name.clone()).collect();
    let modules: Vec<Option<String>> = origins.iter().map(|o| o.module.clone()).collect();
    super::group_norm::freeze_constant_affine(
        &mut nodes,
        &mut consts,
        &constant_nodes,
        &input_names,
        &mut taken,
    );
    super::untie::untie(&mut nodes, &mut consts, &modules, &input_names, &mut taken);
    super::untie::name_generated_params(
        &mut nodes,
        &mut consts,
        &modules,
        &input_names,
        &mut taken,
    );

    let output_names: HashSet<String> = outputs.iter().map(|o| o.name.clone()).collect();
    let restored = super::dynamo_restore::restore(
        &mut nodes,
        &mut consts,
        &origins,
        &output_names,
        &mut taken,
    );

    // Once per process, as above: the count a user sees is PyTorch's, not the file's.
    static NOTED_BIASES: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if restored.biases > 0 && !NOTED_BIASES.swap(true, std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "note: {} all-zero conv/linear biases that the dynamo exporter dropped are restored \
             (those layers train with their bias, as in PyTorch)",
            restored.biases
        );
    }
    let recorded = restored.bn_folded.is_some();
    let meta = ModelMeta {
        ir_version: model.ir_version,
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: model.doc_string.clone(),
        metadata_props: model
            .metadata_props
            .iter()
            // A record made now replaces one the file carries (a file elrt wrote keeps its own).
            .filter(|p| !recorded || p.key != BN_FOLDED_KEY)
            .map(|p| (p.key.clone(), p.value.clone()))
            .chain(restored.bn_folded)
            .collect(),
    };
    let mut graph = Graph {
        name: g.name.clone(),
        opset,
        inputs,
        outputs,
        nodes,
        initializers: consts,
        meta,
    };
    super::act_fuse::fuse_split_activations(&mut graph);
    // Constants absorbed into ops (and unused ones) are dropped; check() then catches
    // references to values that nothing defines, such as a missing initializer.
    graph.prune();
    graph.check()?;
    Ok(graph)
}

fn unique_name(n: &NodeProto, idx: usize, used: &mut HashSet<String>) -> String {
    let mut name = if n.name.is_empty() {
        format!("{}_{}", n.op_type, idx)
    } else {
        n.name.clone()
    };
    while used.contains(&name) {
        name = format!("{name}_{idx}");
    }
    used.insert(name.clone());
    name
}

fn value_info(v: &ValueInfoProto) -> Result<ValueInfo> {
    let tt = match v.type_.as_ref().and_then(|t| t.value.as_ref()) {
        Some(type_proto::Value::TensorType(tt)) => tt,
        Some(_) => bail!("only tensor values are supported"),
        None => {
            return Ok(ValueInfo {
                name: v.name.clone(),
                elem: ElemType::F32,
                shape: None,
            })
        }
    };
    let elem = ElemType::from_onnx(tt.elem_type)
        .ok_or_else(|| anyhow!("unknown element type code {}", tt.elem_type))?;
    let shape = tt.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| {
                use onnx_protobuf::tensor_shape_proto::dimension::Value;
                match &d.value {
                    Some(Value::DimValue(x)) if *x >= 0 => Dim::Fixed(*x as usize),
                    Some(Value::DimParam(p)) if !p.is_empty() => Dim::Sym(p.clone()),
                    _ => Dim::Unknown,
                }
            })
            .collect()
    });
    Ok(ValueInfo {
        name: v.name.clone(),
        elem,
        shape,
    })
}

fn constant_value(n: &NodeProto) -> Result<Tensor> {
    let a = Attrs::new(n);
    if let Some(t) = a.tensor("value")? {
        return Ok(t);
    }
    if let Some(f) = a.float("value_float")? {
        return Tensor::f32(&[], vec![f]);
    }
    if let Some(i) = a.int("value_int")? {
        return Tensor::i64(&[], vec![i]);
    }
    if let Some(v) = n.attribute.iter().find(|x| x.name == "value_floats") {
        return Tensor::f32(&[v.floats.len()], v.floats.clone());
    }
    if let Some(v) = a.ints("value_ints")? {
        return Ok(Tensor::i64_vec(&v));
    }
    bail!(
        "unsupported Constant form (attributes: {})",
        a.names().collect::<Vec<_>>().join(", ")
    )
}

struct ConstLookup<'a> {
    consts: &'a BTreeMap<String, Tensor>,
    aliases: &'a HashMap<String, String>,
}

impl ConstLookup<'_> {
    fn get(&self, name: &str) -> Option<&Tensor> {
        let root = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        self.consts.get(root)
    }
}

/// The node's inputs with optional operands reduced to what the IR keeps.
struct Inputs<'a> {
    node: &'a NodeProto,
    lookup: &'a ConstLookup<'a>,
}

impl Inputs<'_> {
    fn present(&self, i: usize) -> Option<&str> {
        self.node
            .input
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn need(&self, count: usize) -> Result<()> {
        let have = self.node.input.iter().take_while(|s| !s.is_empty()).count();
        if have < count {
            bail!("expects at least {count} inputs, has {have}");
        }
        Ok(())
    }

    /// The constant value of operand `i` (named `what` in errors), if the operand is present.
    fn constant(&self, i: usize, what: &str) -> Result<Option<&Tensor>> {
        match self.present(i) {
            None => Ok(None),
            Some(name) => match self.lookup.get(name) {
                Some(t) => Ok(Some(t)),
                None => bail!(
                    "input '{what}' ('{name}') is computed at run time; elrt needs it to be a constant"
                ),
            },
        }
    }

    fn first(&self, n: usize) -> Vec<String> {
        self.node.input.iter().take(n).cloned().collect()
    }
}

fn auto_pad(a: &Attrs) -> Result<AutoPad> {
    Ok(match a.string("auto_pad")?.as_deref() {
        None | Some("NOTSET") | Some("") => AutoPad::NotSet,
        Some("SAME_UPPER") => AutoPad::SameUpper,
        Some("SAME_LOWER") => AutoPad::SameLower,
        Some("VALID") => AutoPad::Valid,
        Some(o) => bail!("attribute 'auto_pad' has unknown value '{o}'"),
    })
}

fn positive(name: &str, v: &[usize]) -> Result<()> {
    if v.contains(&0) {
        bail!("attribute '{name}' has a zero entry ({v:?})");
    }
    Ok(())
}

fn parse_node(n: &NodeProto, opset: i64, lookup: &ConstLookup) -> Result<(Op, Vec<String>)> {
    let a = Attrs::new(n);
    let ins = Inputs { node: n, lookup };
    let all = n.input.clone();
    let op_type = n.op_type.as_str();
    let (op, inputs) = match op_type {
        "Conv" => {
            ins.need(2)?;
            let strides = a.usizes("strides")?.unwrap_or_default();
            let dilations = a.usizes("dilations")?.unwrap_or_default();
            positive("strides", &strides)?;
            positive("dilations", &dilations)?;
            let group = a.int_or("group", 1)?;
            if group < 1 {
                bail!("attribute 'group' must be at least 1, got {group}");
            }
            let kernel_shape = a.usizes("kernel_shape")?;
            if let Some(k) = &kernel_shape {
                positive("kernel_shape", k)?;
            }
            let op = Op::Conv(Conv {
                kernel_shape,
                strides,
                pads: a.usizes("pads")?.unwrap_or_default(),
                dilations,
                group: group as usize,
                auto_pad: auto_pad(&a)?,
            });
            (op, ins.first(3))
        }
        "BatchNormalization" => {
            ins.need(5)?;
            if opset < 9 && a.int_or("spatial", 1)? != 1 {
                bail!("non-spatial BatchNormalization is not supported");
            }
            let op = Op::BatchNorm(BatchNorm {
                epsilon: a.float_or("epsilon", 1e-5)?,
                momentum: a.float_or("momentum", 0.9)?,
                // Before opset 14, a BN node with its optional statistics outputs is the
                // training form (batch statistics); from 14 an attribute says so.
                training_mode: a.int_or("training_mode", 0)? != 0
                    || (opset < 14 && n.output.iter().skip(1).any(|o| !o.is_empty())),
            });
            (op, ins.first(5))
        }
        "Relu" => (Op::Relu, ins.first(1)),
        "Sigmoid" => (Op::Sigmoid, ins.first(1)),
        "HardSwish" => (Op::HardSwish, ins.first(1)),
        "Erf" => (Op::Erf, ins.first(1)),
        "Sqrt" => (Op::Sqrt, ins.first(1)),
        "Exp" => (Op::Exp, ins.first(1)),
        "Pow" => {
            ins.need(2)?;
            let exponent = match ins.constant(1, "Y")? {
                Some(t) if t.len() == 1 && t.elem_type().is_float() => t.to_f32s()[0],
                Some(t) if t.len() == 1 => t.to_i64s()[0] as f32,
                Some(t) => bail!(
                    "input 'Y' must be a scalar exponent, has shape {:?}",
                    t.shape()
                ),
                None => unreachable!("need(2) checked it is present"),
            };
            (Op::Pow { exponent }, ins.first(1))
        }
        "Gelu" => {
            let tanh = match a.string("approximate")?.as_deref() {
                None | Some("none") => false,
                Some("tanh") => true,
                Some(o) => bail!("attribute 'approximate' has unknown value '{o}'"),
            };
            (Op::Gelu { tanh }, ins.first(1))
        }
        "LayerNormalization" => {
            ins.need(2)?;
            if a.int_or("stash_type", 1)? != 1 {
                bail!("LayerNormalization with stash_type other than 1 (float32) is not supported");
            }
            if n.output.iter().skip(1).any(|o| !o.is_empty()) {
                bail!("LayerNormalization's Mean and InvStdDev outputs are not supported");
            }
            let op = Op::LayerNorm(LayerNorm {
                axis: a.int_or("axis", -1)?,
                epsilon: a.float_or("epsilon", 1e-5)?,
            });
            (op, ins.first(3))
        }
        "InstanceNormalization" => {
            ins.need(3)?;
            let op = Op::InstanceNorm {
                epsilon: a.float_or("epsilon", 1e-5)?,
            };
            (op, ins.first(3))
        }
        "GroupNormalization" => {
            ins.need(3)?;
            if opset < 21 {
                bail!(
                    "GroupNormalization before opset 21 (one scale and bias per group, a form \
                     ONNX deprecated and PyTorch does not write) is not supported; export at \
                     opset 21 or later, or at 20 or earlier (InstanceNormalization)"
                );
            }
            if a.int_or("stash_type", 1)? != 1 {
                bail!("GroupNormalization with stash_type other than 1 (float32) is not supported");
            }
            let groups = a.int_or("num_groups", 0)?;
            if groups < 1 {
                bail!("GroupNormalization needs attribute num_groups >= 1, has {groups}");
            }
            let op = Op::GroupNorm {
                epsilon: a.float_or("epsilon", 1e-5)?,
                groups: groups as usize,
            };
            (op, ins.first(3))
        }
        "LeakyRelu" => (
            Op::LeakyRelu {
                alpha: a.float_or("alpha", 0.01)?,
            },
            ins.first(1),
        ),
        "Elu" => (
            Op::Elu {
                alpha: a.float_or("alpha", 1.0)?,
            },
            ins.first(1),
        ),
        "PRelu" => {
            ins.need(2)?;
            (Op::PRelu, ins.first(2))
        }
        "HardSigmoid" => (
            Op::HardSigmoid {
                alpha: a.float_or("alpha", 0.2)?,
                beta: a.float_or("beta", 0.5)?,
            },
            ins.first(1),
        ),
        "Clip" => {
            let (min, max) = if opset < 11 {
                (a.float("min")?, a.float("max")?)
            } else {
                let scalar = |i, what| -> Result<Option<f32>> {
                    Ok(match ins.constant(i, what)? {
                        Some(t) if t.len() == 1 => Some(t.to_f32s()[0]),
                        Some(t) => {
                            bail!("input '{what}' must be a scalar, has shape {:?}", t.shape())
                        }
                        None => None,
                    })
                };
                (scalar(1, "min")?, scalar(2, "max")?)
            };
            (Op::Clip(Clip { min, max }), ins.first(1))
        }
        "Add" | "Sub" | "Mul" | "Div" => {
            ins.need(2)?;
            let op = match op_type {
                "Add" => Op::Add,
                "Sub" => Op::Sub,
                "Mul" => Op::Mul,
                _ => Op::Div,
            };
            (op, ins.first(2))
        }
        "Concat" => {
            let axis = a
                .int("axis")?
                .ok_or_else(|| anyhow!("attribute 'axis' is required"))?;
            (Op::Concat { axis }, all)
        }
        "Split" => {
            let axis = a.int_or("axis", 0)?;
            let split = if opset < 13 {
                a.usizes("split")?
            } else {
                match ins.constant(1, "split")? {
                    Some(t) => Some(
                        t.to_i64s()
                            .iter()
                            .map(|&v| {
                                usize::try_from(v).map_err(|_| anyhow!("negative split size {v}"))
                            })
                            .collect::<Result<Vec<_>>>()?,
                    ),
                    None => None,
                }
            };
            if let Some(s) = &split {
                if s.len() != n.output.len() {
                    bail!("{} split sizes for {} outputs", s.len(), n.output.len());
                }
            }
            if let Some(k) = a.int("num_outputs")? {
                if k as usize != n.output.len() {
                    bail!(
                        "attribute 'num_outputs' is {k} but the node has {} outputs",
                        n.output.len()
                    );
                }
            }
            (Op::Split(Split { axis, split }), ins.first(1))
        }
        "MaxPool" | "AveragePool" => {
            let kind = if op_type == "MaxPool" {
                PoolKind::Max
            } else {
                PoolKind::Average
            };
            let kernel_shape = a
                .usizes("kernel_shape")?
                .ok_or_else(|| anyhow!("attribute 'kernel_shape' is required"))?;
            positive("kernel_shape", &kernel_shape)?;
            let strides = a.usizes("strides")?.unwrap_or_default();
            let dilations = a.usizes("dilations")?.unwrap_or_default();
            positive("strides", &strides)?;
            positive("dilations", &dilations)?;
            let op = Op::Pool(Pool {
                kind,
                kernel_shape,
                strides,
                pads: a.usizes("pads")?.unwrap_or_default(),
                dilations,
                ceil_mode: a.int_or("ceil_mode", 0)? != 0,
                auto_pad: auto_pad(&a)?,
                count_include_pad: a.int_or("count_include_pad", 0)? != 0,
                storage_order: a.int_or("storage_order", 0)?,
            });
            // MaxPool's optional second output (indices) is kept so outputs stay aligned.
            (op, ins.first(1))
        }
        "GlobalAveragePool" => (Op::GlobalAveragePool, ins.first(1)),
        "ReduceMean" => {
            let axes = if opset < 18 {
                a.ints("axes")?
            } else {
                ins.constant(1, "axes")?.map(Tensor::to_i64s)
            };
            let op = Op::ReduceMean(ReduceMean {
                axes,
                keepdims: a.int_or("keepdims", 1)? != 0,
                noop_with_empty_axes: a.int_or("noop_with_empty_axes", 0)? != 0,
            });
            (op, ins.first(1))
        }
        "Flatten" => (
            Op::Flatten {
                axis: a.int_or("axis", 1)?,
            },
            ins.first(1),
        ),
        "Gemm" => {
            ins.need(2)?;
            let op = Op::Gemm(Gemm {
                alpha: a.float_or("alpha", 1.0)?,
                beta: a.float_or("beta", 1.0)?,
                trans_a: a.int_or("transA", 0)? != 0,
                trans_b: a.int_or("transB", 0)? != 0,
            });
            (op, ins.first(3))
        }
        "MatMul" => {
            ins.need(2)?;
            (Op::MatMul, ins.first(2))
        }
        "Reshape" => {
            ins.need(2)?;
            let op = Op::Reshape {
                allowzero: a.int_or("allowzero", 0)? != 0,
            };
            (op, ins.first(2))
        }
        "Transpose" => (
            Op::Transpose {
                perm: a.usizes("perm")?,
            },
            ins.first(1),
        ),
        "Slice" => {
            let op = if opset < 10 {
                Slice {
                    starts: a
                        .ints("starts")?
                        .ok_or_else(|| anyhow!("attribute 'starts' is required"))?,
                    ends: a
                        .ints("ends")?
                        .ok_or_else(|| anyhow!("attribute 'ends' is required"))?,
                    axes: a.ints("axes")?,
                    steps: None,
                }
            } else {
                ins.need(3)?;
                let computed =
                    (1..=4).any(|i| ins.present(i).is_some_and(|v| lookup.get(v).is_none()));
                if computed {
                    return Ok((Op::DynSlice, ins.first(5)));
                }
                Slice {
                    starts: ins
                        .constant(1, "starts")?
                        .map(Tensor::to_i64s)
                        .unwrap_or_default(),
                    ends: ins
                        .constant(2, "ends")?
                        .map(Tensor::to_i64s)
                        .unwrap_or_default(),
                    axes: ins.constant(3, "axes")?.map(Tensor::to_i64s),
                    steps: ins.constant(4, "steps")?.map(Tensor::to_i64s),
                }
            };
            if op.starts.len() != op.ends.len()
                || op.axes.as_ref().is_some_and(|x| x.len() != op.starts.len())
                || op
                    .steps
                    .as_ref()
                    .is_some_and(|x| x.len() != op.starts.len())
            {
                bail!("starts, ends, axes and steps must have the same length");
            }
            if op.steps.as_ref().is_some_and(|s| s.contains(&0)) {
                bail!("a slice step is 0");
            }
            (Op::Slice(op), ins.first(1))
        }
        "Pad" => {
            let mode = match a.string("mode")?.as_deref() {
                None | Some("constant") => PadMode::Constant,
                Some("reflect") => PadMode::Reflect,
                Some("edge") => PadMode::Edge,
                Some(o) => bail!("attribute 'mode' '{o}' is not supported"),
            };
            let op = if opset < 11 {
                Pad {
                    pads: a
                        .ints("pads")?
                        .ok_or_else(|| anyhow!("attribute 'pads' is required"))?,
                    axes: None,
                    mode,
                    value: a.float_or("value", 0.0)?,
                }
            } else {
                ins.need(2)?;
                Pad {
                    pads: ins
                        .constant(1, "pads")?
                        .map(Tensor::to_i64s)
                        .unwrap_or_default(),
                    value: match ins.constant(2, "constant_value")? {
                        Some(t) if t.len() == 1 => t.to_f32s()[0],
                        Some(_) => bail!("input 'constant_value' must be a scalar"),
                        None => 0.0,
                    },
                    axes: ins.constant(3, "axes")?.map(Tensor::to_i64s),
                    mode,
                }
            };
            let axes_len = op.axes.as_ref().map(Vec::len);
            if op.pads.len() % 2 != 0 || axes_len.is_some_and(|k| 2 * k != op.pads.len()) {
                bail!(
                    "pads has {} entries, which does not match the axes",
                    op.pads.len()
                );
            }
            (Op::Pad(op), ins.first(1))
        }
        "Squeeze" => {
            let axes = if opset < 13 {
                a.ints("axes")?
            } else {
                ins.constant(1, "axes")?.map(Tensor::to_i64s)
            };
            (Op::Squeeze { axes }, ins.first(1))
        }
        "Unsqueeze" => {
            let axes = if opset < 13 {
                a.ints("axes")?
            } else {
                ins.constant(1, "axes")?.map(Tensor::to_i64s)
            }
            .ok_or_else(|| anyhow!("axes are required"))?;
            (Op::Unsqueeze { axes }, ins.first(1))
        }
        "Identity" => (Op::Identity, ins.first(1)),
        "Dropout" => {
            let ratio = if opset < 12 {
                a.float_or("ratio", 0.5)?
            } else {
                match ins.constant(1, "ratio")? {
                    Some(t) if t.len() == 1 => t.to_f32s()[0],
                    Some(_) => bail!("input 'ratio' must be a scalar"),
                    None => 0.5,
                }
            };
            (Op::Dropout { ratio }, ins.first(1))
        }
        "Shape" => (
            Op::Shape(Shape {
                start: a.int("start")?,
                end: a.int("end")?,
            }),
            ins.first(1),
        ),
        "Gather" => {
            ins.need(2)?;
            (
                Op::Gather {
                    axis: a.int_or("axis", 0)?,
                },
                ins.first(2),
            )
        }
        "GatherND" => {
            ins.need(2)?;
            if a.int_or("batch_dims", 0)? != 0 {
                bail!("GatherND with batch_dims other than 0 is not supported");
            }
            (Op::GatherNd, ins.first(2))
        }
        "Cast" => {
            let code = a
                .int("to")?
                .ok_or_else(|| anyhow!("attribute 'to' is required"))?;
            let to = ElemType::from_onnx(code as i32)
                .ok_or_else(|| anyhow!("attribute 'to' names unknown type code {code}"))?;
            (Op::Cast { to }, ins.first(1))
        }
        "ConstantOfShape" => {
            let value = match a.tensor("value")? {
                Some(t) if t.len() == 1 => t.reshaped(&[1])?,
                Some(t) => bail!(
                    "attribute 'value' must hold one element, has shape {:?}",
                    t.shape()
                ),
                None => Tensor::f32(&[1], vec![0.0])?,
            };
            (Op::ConstantOfShape { value }, ins.first(1))
        }
        "Range" => {
            ins.need(3)?;
            (Op::Range, ins.first(3))
        }
        "Expand" => {
            ins.need(2)?;
            (Op::Expand, ins.first(2))
        }
        "Where" => {
            ins.need(3)?;
            (Op::Where, ins.first(3))
        }
        "Equal" => {
            ins.need(2)?;
            (Op::Equal, ins.first(2))
        }
        "Softmax" | "LogSoftmax" => {
            let (axes, default) = if opset < 13 {
                (SoftmaxAxes::Flattened, 1)
            } else {
                (SoftmaxAxes::One, -1)
            };
            let axis = a.int_or("axis", default)?;
            let op = if op_type == "Softmax" {
                Op::Softmax { axis, axes }
            } else {
                Op::LogSoftmax { axis, axes }
            };
            (op, ins.first(1))
        }
        "Sum" => {
            ins.need(1)?;
            (Op::Sum, all)
        }
        "RandomUniform" | "RandomUniformLike" | "RandomNormal" | "RandomNormalLike"
        | "Bernoulli" | "Multinomial" => bail!(
            "op '{op_type}' (opset {opset}) draws random numbers at run time, which elrt does not \
             support: a training-mode export writes stochastic depth or dropout that way; export \
             the model in eval mode (model.eval(); elrt puts BatchNormalization back and trains it)"
        ),
        q if QUANTIZED_OPS.contains(&q) => {
            bail!("op '{q}' belongs to quantized models, which elrt does not support (give it the float32 model)")
        }
        other => bail!("op '{other}' (opset {opset}) is not supported by elrt"),
    };
    if inputs.first().is_none_or(|s| s.is_empty()) && !matches!(op, Op::Concat { .. } | Op::Sum) {
        bail!("has no data input");
    }
    Ok((op, inputs))
}
