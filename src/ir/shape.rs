//! Shape inference from concrete input shapes, with constant propagation.
//!
//! Every value gets a [`Fact`]: its concrete shape, element type and, where it can be computed
//! without the input data, its value. Values are computed for initializers, for `Shape` of any
//! tensor (its shape is known), and for the shape-arithmetic ops whose inputs are all known.
//! That is what resolves the `Shape -> Gather -> Unsqueeze -> Concat -> Reshape` flatten of
//! older PyTorch exports, so [`super::fold`] can replace it with a constant.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{ArrayD, Axis, IxDyn};

use super::ops::*;
use super::{Dim, ElemType, Graph, Node, Tensor};

/// What is known of one value.
#[derive(Clone, Debug, PartialEq)]
pub struct Fact {
    pub shape: Vec<usize>,
    pub elem: ElemType,
    pub value: Option<Tensor>,
}

impl Fact {
    fn of(shape: Vec<usize>, elem: ElemType) -> Fact {
        Fact {
            shape,
            elem,
            value: None,
        }
    }

    fn known(t: Tensor, elem: ElemType) -> Fact {
        Fact {
            shape: t.shape().to_vec(),
            elem,
            value: Some(t),
        }
    }
}

pub type Facts = HashMap<String, Fact>;

/// The input shapes to use when the user gives none: the file's own, with a symbolic first
/// (batch) dimension set to 1. Any other unknown dimension needs an explicit shape.
pub fn default_input_shapes(graph: &Graph) -> Result<Vec<Vec<usize>>> {
    graph
        .inputs
        .iter()
        .map(|i| {
            let dims = i.shape.as_ref().ok_or_else(|| {
                anyhow!("graph input '{}' declares no shape; pass --input-shape", i.name)
            })?;
            dims.iter()
                .enumerate()
                .map(|(ax, d)| match d {
                    Dim::Fixed(n) => Ok(*n),
                    _ if ax == 0 => Ok(1),
                    Dim::Sym(s) => bail!(
                        "graph input '{}' has symbolic dimension '{}' at axis {}; pass --input-shape",
                        i.name,
                        s,
                        ax
                    ),
                    Dim::Unknown => bail!(
                        "graph input '{}' has an unknown dimension at axis {}; pass --input-shape",
                        i.name,
                        ax
                    ),
                })
                .collect()
        })
        .collect()
}

/// Declares the first input's image shape: `C,H,W` (the batch dimension left as the file has
/// it) or `N,C,H,W`. For files that leave dimensions unknown, or to run a model at another
/// input size.
pub fn set_image_shape(graph: &mut Graph, shape: &[usize]) -> Result<()> {
    let input = graph
        .inputs
        .first_mut()
        .ok_or_else(|| anyhow!("the model has no input"))?;
    let mut dims = input.shape.clone().unwrap_or_else(|| vec![Dim::Unknown; 4]);
    if dims.len() != 4 || !(shape.len() == 3 || shape.len() == 4) {
        bail!(
            "--input-shape {shape:?} does not fit graph input '{}', declared as {}",
            input.name,
            fmt_dims(&dims)
        );
    }
    let skip = 4 - shape.len();
    for (d, &v) in dims.iter_mut().skip(skip).zip(shape) {
        *d = Dim::Fixed(v);
    }
    input.shape = Some(dims);
    Ok(())
}

/// Infers every value's fact. `input_shapes` gives one concrete shape per graph input, in
/// order; each must agree with the file's fixed dimensions.
pub fn infer(graph: &Graph, input_shapes: &[Vec<usize>]) -> Result<Facts> {
    let mut facts = HashMap::new();
    infer_into(graph, input_shapes, &mut facts)?;
    Ok(facts)
}

/// As [`infer`], into `facts`, which holds what was inferred up to a failure.
pub fn infer_into(graph: &Graph, input_shapes: &[Vec<usize>], facts: &mut Facts) -> Result<()> {
    if input_shapes.len() != graph.inputs.len() {
        bail!(
            "the model has {} inputs but {} input shapes were given",
            graph.inputs.len(),
            input_shapes.len()
        );
    }
    for (inp, shape) in graph.inputs.iter().zip(input_shapes) {
        if let Some(dims) = &inp.shape {
            let agrees = dims.len() == shape.len()
                && dims
                    .iter()
                    .zip(shape)
                    .all(|(d, &s)| !matches!(d, Dim::Fixed(n) if *n != s));
            if !agrees {
                bail!(
                    "input shape {:?} does not fit graph input '{}', declared as {}",
                    shape,
                    inp.name,
                    fmt_dims(dims)
                );
            }
        }
        if shape.contains(&0) {
            bail!("input shape {shape:?} has a zero dimension");
        }
        check_size(shape).with_context(|| format!("graph input '{}'", inp.name))?;
        facts.insert(inp.name.clone(), Fact::of(shape.clone(), inp.elem));
    }
    for (k, t) in &graph.initializers {
        facts.insert(k.clone(), Fact::known(t.clone(), t.elem_type()));
    }
    for node in &graph.nodes {
        let ins: Vec<Option<&Fact>> = node
            .inputs
            .iter()
            .map(|i| if i.is_empty() { None } else { facts.get(i) })
            .collect();
        for (i, f) in node.inputs.iter().zip(&ins) {
            if !i.is_empty() && f.is_none() {
                bail!(
                    "node '{}' ({}): input '{}' is not defined",
                    node.name,
                    node.op.onnx_type(),
                    i
                );
            }
        }
        let what = || format!("node '{}' ({})", node.name, node.op.onnx_type());
        let outs = infer_node(node, &ins).with_context(what)?;
        for f in &outs {
            check_size(&f.shape).with_context(what)?;
        }
        for (name, f) in node.outputs.iter().zip(outs) {
            if !name.is_empty() {
                facts.insert(name.clone(), f);
            }
        }
    }
    Ok(())
}

pub fn fmt_dims(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Sym(s) => s.clone(),
            Dim::Unknown => "?".into(),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

/// Normalises a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// The axes a ReduceMean reduces over for an input of `rank`, normalised and sorted.
pub fn reduce_axes(r: &ReduceMean, rank: usize) -> Result<Vec<usize>> {
    let mut axes: Vec<usize> = match &r.axes {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|&v| norm_axis(v, rank))
            .collect::<Result<_>>()?,
        _ if r.noop_with_empty_axes => vec![],
        _ => (0..rank).collect(),
    };
    axes.sort_unstable();
    Ok(axes)
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let r = a.len().max(b.len());
    let mut out = vec![0; r];
    for i in 0..r {
        let x = if i + a.len() >= r {
            a[i + a.len() - r]
        } else {
            1
        };
        let y = if i + b.len() >= r {
            b[i + b.len() - r]
        } else {
            1
        };
        out[i] = match (x, y) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => bail!("shapes {a:?} and {b:?} do not broadcast"),
        };
    }
    Ok(out)
}

/// Explicit (begin, end) pads per spatial axis, resolving auto_pad.
#[allow(clippy::too_many_arguments)]
pub fn resolve_pads(
    input: &[usize],
    kernel: &[usize],
    strides: &[usize],
    dilations: &[usize],
    pads: &[usize],
    auto_pad: AutoPad,
) -> Result<Vec<(usize, usize)>> {
    let n = input.len();
    if !pads.is_empty() && pads.len() != 2 * n {
        bail!("pads has {} entries for {} spatial axes", pads.len(), n);
    }
    (0..n)
        .map(|i| {
            let s = strides.get(i).copied().unwrap_or(1);
            let d = dilations.get(i).copied().unwrap_or(1);
            Ok(match auto_pad {
                AutoPad::NotSet => {
                    if pads.is_empty() {
                        (0, 0)
                    } else {
                        (pads[i], pads[i + n])
                    }
                }
                AutoPad::Valid => (0, 0),
                AutoPad::SameUpper | AutoPad::SameLower => {
                    let out = input[i].div_ceil(s);
                    let need = ((out - 1) * s + d * (kernel[i] - 1) + 1).saturating_sub(input[i]);
                    let small = need / 2;
                    if auto_pad == AutoPad::SameUpper {
                        (small, need - small)
                    } else {
                        (need - small, small)
                    }
                }
            })
        })
        .collect()
}

/// Output spatial size of a sliding window, ONNX's rule (ceil_mode drops a last window that
/// would start inside the end padding).
pub fn window_out(
    input: usize,
    k: usize,
    s: usize,
    d: usize,
    (pb, pe): (usize, usize),
    ceil: bool,
) -> Result<usize> {
    let span = d * (k - 1) + 1;
    let padded = input + pb + pe;
    if padded < span {
        bail!(
            "window of {span} (kernel {k}, dilation {d}) is larger than the padded input {padded}"
        );
    }
    let mut out = if ceil {
        (padded - span).div_ceil(s) + 1
    } else {
        (padded - span) / s + 1
    };
    if ceil && (out - 1) * s >= input + pb {
        out -= 1;
    }
    Ok(out)
}

fn need<'a>(ins: &[Option<&'a Fact>], i: usize) -> Result<&'a Fact> {
    ins.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| anyhow!("input {i} is missing"))
}

fn check_len(name: &str, v: &[usize], n: usize) -> Result<()> {
    if !v.is_empty() && v.len() != n {
        bail!("{name} has {} entries for {} spatial axes", v.len(), n);
    }
    Ok(())
}

fn infer_node(node: &Node, ins: &[Option<&Fact>]) -> Result<Vec<Fact>> {
    let x = need(ins, 0)?;
    let same = || vec![Fact::of(x.shape.clone(), x.elem)];
    let all_known = ins.iter().all(|f| f.is_none_or(|f| f.value.is_some()));
    let out = match &node.op {
        Op::Conv(c) => {
            let w = need(ins, 1)?;
            if x.shape.len() < 3 || w.shape.len() != x.shape.len() {
                bail!(
                    "input shape {:?} and weight shape {:?} do not make a convolution",
                    x.shape,
                    w.shape
                );
            }
            let n_sp = x.shape.len() - 2;
            let (cin, cout) = (x.shape[1], w.shape[0]);
            if w.shape[1] * c.group != cin {
                bail!(
                    "inconsistent shapes: the input has {} channels but the weight {:?} with group {} expects {}",
                    cin,
                    w.shape,
                    c.group,
                    w.shape[1] * c.group
                );
            }
            if cout % c.group != 0 {
                bail!(
                    "{cout} output channels do not divide into {} groups",
                    c.group
                );
            }
            let kernel = &w.shape[2..];
            if let Some(k) = &c.kernel_shape {
                if k.as_slice() != kernel {
                    bail!(
                        "kernel_shape {k:?} disagrees with the weight's shape {:?}",
                        w.shape
                    );
                }
            }
            if let Some(b) = ins.get(2).copied().flatten() {
                if b.shape != [cout] {
                    bail!("bias shape {:?} should be [{cout}]", b.shape);
                }
            }
            check_len("strides", &c.strides, n_sp)?;
            check_len("dilations", &c.dilations, n_sp)?;
            let pads = resolve_pads(
                &x.shape[2..],
                kernel,
                &c.strides,
                &c.dilations,
                &c.pads,
                c.auto_pad,
            )?;
            let mut shape = vec![x.shape[0], cout];
            for i in 0..n_sp {
                let s = c.strides.get(i).copied().unwrap_or(1);
                let d = c.dilations.get(i).copied().unwrap_or(1);
                shape.push(window_out(x.shape[2 + i], kernel[i], s, d, pads[i], false)?);
            }
            vec![Fact::of(shape, x.elem)]
        }
        Op::Pool(p) => {
            if x.shape.len() < 3 || p.kernel_shape.len() != x.shape.len() - 2 {
                bail!(
                    "kernel_shape {:?} does not fit input shape {:?}",
                    p.kernel_shape,
                    x.shape
                );
            }
            let n_sp = x.shape.len() - 2;
            check_len("strides", &p.strides, n_sp)?;
            check_len("dilations", &p.dilations, n_sp)?;
            let pads = resolve_pads(
                &x.shape[2..],
                &p.kernel_shape,
                &p.strides,
                &p.dilations,
                &p.pads,
                p.auto_pad,
            )?;
            let mut shape = x.shape[..2].to_vec();
            for (i, &pad) in pads.iter().enumerate() {
                let s = p.strides.get(i).copied().unwrap_or(1);
                let d = p.dilations.get(i).copied().unwrap_or(1);
                shape.push(window_out(
                    x.shape[2 + i],
                    p.kernel_shape[i],
                    s,
                    d,
                    pad,
                    p.ceil_mode,
                )?);
            }
            let mut outs = vec![Fact::of(shape.clone(), x.elem)];
            if node.outputs.len() > 1 {
                outs.push(Fact::of(shape, ElemType::I64));
            }
            outs
        }
        Op::BatchNorm(_) => {
            if x.shape.len() < 2 {
                bail!("input shape {:?} has no channel axis", x.shape);
            }
            let c = x.shape[1];
            for (i, what) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "var")] {
                let f = need(ins, i)?;
                if f.shape != [c] {
                    bail!(
                        "{what} shape {:?} should be [{c}] for input shape {:?}",
                        f.shape,
                        x.shape
                    );
                }
            }
            let mut outs = same();
            for _ in 1..node.outputs.len() {
                outs.push(Fact::of(vec![c], x.elem));
            }
            outs
        }
        Op::Relu
        | Op::Clip(_)
        | Op::LeakyRelu { .. }
        | Op::Elu { .. }
        | Op::Sigmoid
        | Op::HardSigmoid { .. }
        | Op::HardSwish
        | Op::Gelu { .. }
        | Op::Erf => same(),
        Op::Pow { exponent } => match &x.value {
            Some(t) => {
                let v: Vec<f32> = t.to_f32s().iter().map(|v| v.powf(*exponent)).collect();
                vec![Fact::known(Tensor::f32(&x.shape, v)?, x.elem)]
            }
            None => same(),
        },
        Op::Sqrt => match &x.value {
            Some(t) => {
                let v: Vec<f32> = t.to_f32s().iter().map(|v| v.sqrt()).collect();
                vec![Fact::known(Tensor::f32(&x.shape, v)?, x.elem)]
            }
            None => same(),
        },
        Op::Exp => match &x.value {
            Some(t) => {
                let v: Vec<f32> = t.to_f32s().iter().map(|v| v.exp()).collect();
                vec![Fact::known(Tensor::f32(&x.shape, v)?, x.elem)]
            }
            None => same(),
        },
        Op::LayerNorm(l) => {
            let axis = norm_axis(l.axis, x.shape.len())?;
            let normalized = &x.shape[axis..];
            for (i, what) in [(1, "scale"), (2, "bias")] {
                if node.input(i).is_none() {
                    continue;
                }
                let f = need(ins, i)?;
                let n: usize = f.shape.iter().product();
                if n != normalized.iter().product::<usize>()
                    || broadcast(normalized, &f.shape)? != normalized
                {
                    bail!(
                        "{what} shape {:?} does not fit the normalized axes {normalized:?} of \
                         input shape {:?}",
                        f.shape,
                        x.shape
                    );
                }
            }
            same()
        }
        Op::InstanceNorm { .. } | Op::GroupNorm { .. } => {
            if x.shape.len() < 3 {
                bail!(
                    "input shape {:?} needs rank 3 or more ([N, C, D1, ..])",
                    x.shape
                );
            }
            if let Op::GroupNorm { groups, .. } = node.op {
                if groups == 0 || !x.shape[1].is_multiple_of(groups) {
                    bail!(
                        "num_groups {groups} does not divide the {} channels of input shape {:?}",
                        x.shape[1],
                        x.shape
                    );
                }
            }
            for (i, what) in [(1, "scale"), (2, "bias")] {
                let f = need(ins, i)?;
                let n: usize = f.shape.iter().product();
                if f.shape.len() != 1 || n != x.shape[1] {
                    bail!(
                        "{what} shape {:?} is not [C] for the {} channels of input shape {:?}",
                        f.shape,
                        x.shape[1],
                        x.shape
                    );
                }
            }
            same()
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div => {
            let y = need(ins, 1)?;
            let shape = broadcast(&x.shape, &y.shape)?;
            match (&x.value, &y.value) {
                (Some(a), Some(b)) => vec![Fact::known(binary(&node.op, a, b)?, x.elem)],
                _ => vec![Fact::of(shape, x.elem)],
            }
        }
        Op::PRelu => {
            // Unidirectional: the slope broadcasts to `x`, the output is `x`'s shape.
            let slope = need(ins, 1)?;
            if broadcast(&x.shape, &slope.shape)? != x.shape {
                bail!(
                    "slope of shape {:?} does not broadcast to the input's {:?}",
                    slope.shape,
                    x.shape
                );
            }
            same()
        }
        Op::Concat { axis } => {
            let facts: Vec<&Fact> = ins.iter().flatten().copied().collect();
            let first = facts.first().ok_or_else(|| anyhow!("has no inputs"))?;
            let ax = norm_axis(*axis, first.shape.len())?;
            let mut shape = first.shape.clone();
            shape[ax] = 0;
            for f in &facts {
                let ok = f.shape.len() == shape.len()
                    && f.shape
                        .iter()
                        .enumerate()
                        .all(|(i, &d)| i == ax || d == shape[i]);
                if !ok {
                    bail!(
                        "inputs of shapes {:?} and {:?} cannot be concatenated on axis {axis}",
                        first.shape,
                        f.shape
                    );
                }
                shape[ax] += f.shape[ax];
            }
            if all_known {
                vec![Fact::known(concat(&facts, ax)?, first.elem)]
            } else {
                vec![Fact::of(shape, first.elem)]
            }
        }
        Op::Split(s) => {
            let ax = norm_axis(s.axis, x.shape.len())?;
            let sizes = split_sizes(x.shape[ax], s.split.as_deref(), node.outputs.len())?;
            sizes
                .iter()
                .map(|&k| {
                    let mut sh = x.shape.clone();
                    sh[ax] = k;
                    Fact::of(sh, x.elem)
                })
                .collect()
        }
        Op::GlobalAveragePool => {
            if x.shape.len() < 3 {
                bail!("input shape {:?} has no spatial axes", x.shape);
            }
            let mut shape = x.shape[..2].to_vec();
            shape.extend(std::iter::repeat_n(1, x.shape.len() - 2));
            vec![Fact::of(shape, x.elem)]
        }
        Op::ReduceMean(r) => {
            let axes = reduce_axes(r, x.shape.len())?;
            let shape = x
                .shape
                .iter()
                .enumerate()
                .filter_map(|(i, &d)| match (axes.contains(&i), r.keepdims) {
                    (true, true) => Some(1),
                    (true, false) => None,
                    _ => Some(d),
                })
                .collect();
            vec![Fact::of(shape, x.elem)]
        }
        Op::Flatten { axis } => {
            let rank = x.shape.len() as i64;
            let a = if *axis < 0 { axis + rank } else { *axis };
            if a < 0 || a > rank {
                bail!("axis {axis} is out of range for rank {rank}");
            }
            let a = a as usize;
            let shape = vec![x.shape[..a].iter().product(), x.shape[a..].iter().product()];
            reshaped_fact(x, shape)?
        }
        Op::Gemm(g) => {
            let b = need(ins, 1)?;
            if x.shape.len() != 2 || b.shape.len() != 2 {
                bail!(
                    "Gemm needs 2-D operands, got {:?} and {:?}",
                    x.shape,
                    b.shape
                );
            }
            let (m, k) = if g.trans_a {
                (x.shape[1], x.shape[0])
            } else {
                (x.shape[0], x.shape[1])
            };
            let (k2, n) = if g.trans_b {
                (b.shape[1], b.shape[0])
            } else {
                (b.shape[0], b.shape[1])
            };
            if k != k2 {
                bail!(
                    "inconsistent shapes: A {:?} (transA={}) and B {:?} (transB={}) do not multiply",
                    x.shape,
                    g.trans_a as u8,
                    b.shape,
                    g.trans_b as u8
                );
            }
            if let Some(c) = ins.get(2).copied().flatten() {
                let bc = broadcast(&c.shape, &[m, n])?;
                if bc != [m, n] {
                    bail!("C of shape {:?} does not broadcast to [{m}, {n}]", c.shape);
                }
            }
            vec![Fact::of(vec![m, n], x.elem)]
        }
        Op::MatMul => {
            let b = need(ins, 1)?;
            vec![Fact::of(matmul_shape(&x.shape, &b.shape)?, x.elem)]
        }
        Op::Reshape { allowzero } => {
            let s = need(ins, 1)?;
            let target = s
                .value
                .as_ref()
                .ok_or_else(|| anyhow!("the target shape is not known before run time"))?
                .to_i64s();
            let shape = reshape_target(&x.shape, &target, *allowzero)?;
            reshaped_fact(x, shape)?
        }
        Op::Transpose { perm } => {
            let rank = x.shape.len();
            let perm: Vec<usize> = perm.clone().unwrap_or_else(|| (0..rank).rev().collect());
            let mut seen = vec![false; rank];
            if perm.len() != rank
                || perm
                    .iter()
                    .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
            {
                bail!("perm {perm:?} is not a permutation of {rank} axes");
            }
            match &x.value {
                Some(t) => vec![Fact::known(transpose(t, &perm), x.elem)],
                None => vec![Fact::of(perm.iter().map(|&p| x.shape[p]).collect(), x.elem)],
            }
        }
        Op::DynSlice => {
            let s = dyn_slice_params(ins)?;
            let idx = slice_indices(&x.shape, &s)?;
            match &x.value {
                Some(t) => vec![Fact::known(take(t, &idx), x.elem)],
                None => vec![Fact::of(idx.iter().map(Vec::len).collect(), x.elem)],
            }
        }
        Op::Slice(s) => {
            let idx = slice_indices(&x.shape, s)?;
            match &x.value {
                Some(t) => vec![Fact::known(take(t, &idx), x.elem)],
                None => vec![Fact::of(idx.iter().map(Vec::len).collect(), x.elem)],
            }
        }
        Op::Pad(p) => {
            let rank = x.shape.len();
            let axes: Vec<usize> = match &p.axes {
                Some(a) => a
                    .iter()
                    .map(|&v| norm_axis(v, rank))
                    .collect::<Result<_>>()?,
                None => (0..rank).collect(),
            };
            if p.pads.len() != 2 * axes.len() {
                bail!("pads has {} entries for {} axes", p.pads.len(), axes.len());
            }
            let mut shape = x.shape.clone();
            for (j, &ax) in axes.iter().enumerate() {
                let d = shape[ax] as i64 + p.pads[j] + p.pads[j + axes.len()];
                if d < 0 {
                    bail!("pads {:?} crop axis {ax} below zero", p.pads);
                }
                shape[ax] = d as usize;
            }
            vec![Fact::of(shape, x.elem)]
        }
        Op::Squeeze { axes } => {
            let rank = x.shape.len();
            let drop: Vec<usize> = match axes {
                Some(a) => {
                    let v: Vec<usize> = a
                        .iter()
                        .map(|&v| norm_axis(v, rank))
                        .collect::<Result<_>>()?;
                    if let Some(&bad) = v.iter().find(|&&i| x.shape[i] != 1) {
                        bail!(
                            "cannot squeeze axis {bad} of size {} (shape {:?})",
                            x.shape[bad],
                            x.shape
                        );
                    }
                    v
                }
                None => (0..rank).filter(|&i| x.shape[i] == 1).collect(),
            };
            let shape = (0..rank)
                .filter(|i| !drop.contains(i))
                .map(|i| x.shape[i])
                .collect();
            reshaped_fact(x, shape)?
        }
        Op::Unsqueeze { axes } => {
            let rank = x.shape.len() + axes.len();
            let mut at: Vec<usize> = axes
                .iter()
                .map(|&v| norm_axis(v, rank))
                .collect::<Result<_>>()?;
            at.sort_unstable();
            if at.windows(2).any(|w| w[0] == w[1]) {
                bail!("axes {axes:?} repeat an axis");
            }
            let mut src = x.shape.iter();
            let shape = (0..rank)
                .map(|i| {
                    if at.contains(&i) {
                        1
                    } else {
                        *src.next().expect("rank")
                    }
                })
                .collect();
            reshaped_fact(x, shape)?
        }
        Op::Identity => vec![x.clone()],
        Op::Dropout { .. } => {
            let mut outs = vec![x.clone()];
            if node.outputs.len() > 1 {
                outs.push(Fact::of(x.shape.clone(), ElemType::Bool));
            }
            outs
        }
        Op::Shape(s) => {
            let r = x.shape.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let start = clamp(s.start.unwrap_or(0));
            let end = clamp(s.end.unwrap_or(r));
            let dims: Vec<i64> = x.shape[start..end.max(start)]
                .iter()
                .map(|&d| d as i64)
                .collect();
            vec![Fact::known(Tensor::i64_vec(&dims), ElemType::I64)]
        }
        Op::Gather { axis } => {
            let idx = need(ins, 1)?;
            let ax = norm_axis(*axis, x.shape.len())?;
            let mut shape = x.shape[..ax].to_vec();
            shape.extend(&idx.shape);
            shape.extend(&x.shape[ax + 1..]);
            match (&x.value, &idx.value) {
                (Some(d), Some(i)) => vec![Fact::known(gather(d, i, ax, &shape)?, x.elem)],
                _ => vec![Fact::of(shape, x.elem)],
            }
        }
        Op::GatherNd => {
            let idx = need(ins, 1)?;
            let depth = match idx.shape.last() {
                Some(&k) if k >= 1 && k <= x.shape.len() => k,
                _ => bail!(
                    "indices {:?} must end in a tuple length from 1 to the data's rank {}",
                    idx.shape,
                    x.shape.len()
                ),
            };
            let mut shape = idx.shape[..idx.shape.len() - 1].to_vec();
            shape.extend(&x.shape[depth..]);
            vec![Fact::of(shape, x.elem)]
        }
        Op::Cast { to } => match &x.value {
            Some(t) => vec![Fact::known(t.cast(*to), *to)],
            None => vec![Fact::of(x.shape.clone(), *to)],
        },
        Op::ConstantOfShape { value } => {
            let dims = x
                .value
                .as_ref()
                .ok_or_else(|| anyhow!("the shape is not known before run time"))?
                .to_i64s();
            let shape = dims_to_shape(&dims)?;
            let n = checked_len(&shape)?;
            let t = match value {
                Tensor::F32(v) => {
                    Tensor::f32(&shape, vec![v.iter().next().copied().unwrap_or(0.0); n])?
                }
                Tensor::I64(v) => {
                    Tensor::i64(&shape, vec![v.iter().next().copied().unwrap_or(0); n])?
                }
            };
            let elem = value.elem_type();
            vec![Fact::known(t, elem)]
        }
        Op::Range => {
            let scalar = |i: usize, what: &str| -> Result<Tensor> {
                let f = need(ins, i)?;
                match &f.value {
                    Some(t) if t.len() == 1 => Ok(t.clone()),
                    Some(t) => bail!("{what} must be a scalar, has shape {:?}", t.shape()),
                    None => bail!("{what} is not known before run time"),
                }
            };
            let (start, limit, delta) = (
                scalar(0, "start")?,
                scalar(1, "limit")?,
                scalar(2, "delta")?,
            );
            let t = match start {
                Tensor::I64(_) => {
                    let (s, l, d) = (start.to_i64s()[0], limit.to_i64s()[0], delta.to_i64s()[0]);
                    if d == 0 {
                        bail!("delta is 0");
                    }
                    let n = ((l - s) as f64 / d as f64).ceil().max(0.0) as usize;
                    checked_len(&[n])?;
                    Tensor::i64_vec(&(0..n as i64).map(|k| s + k * d).collect::<Vec<_>>())
                }
                Tensor::F32(_) => {
                    let (s, l, d) = (start.to_f32s()[0], limit.to_f32s()[0], delta.to_f32s()[0]);
                    if d == 0.0 || !(s.is_finite() && l.is_finite() && d.is_finite()) {
                        bail!("start {s}, limit {l} and delta {d} do not make a range");
                    }
                    let n = ((l - s) / d).ceil().max(0.0) as usize;
                    checked_len(&[n])?;
                    Tensor::f32(&[n], (0..n).map(|k| s + k as f32 * d).collect())?
                }
            };
            vec![Fact::known(t, x.elem)]
        }
        Op::Expand => {
            let target = need(ins, 1)?
                .value
                .as_ref()
                .ok_or_else(|| anyhow!("the target shape is not known before run time"))?
                .to_i64s();
            let shape = broadcast(&x.shape, &dims_to_shape(&target)?)?;
            checked_len(&shape)?;
            match &x.value {
                Some(t) => vec![Fact::known(broadcast_to(t, &shape)?, x.elem)],
                None => vec![Fact::of(shape, x.elem)],
            }
        }
        Op::Where => {
            let (a, b) = (need(ins, 1)?, need(ins, 2)?);
            let shape = broadcast(&broadcast(&x.shape, &a.shape)?, &b.shape)?;
            match (&x.value, &a.value, &b.value) {
                (Some(c), Some(va), Some(vb)) => {
                    let c = broadcast_to(c, &shape)?.to_i64s();
                    let t = match (broadcast_to(va, &shape)?, broadcast_to(vb, &shape)?) {
                        (Tensor::I64(p), Tensor::I64(q)) => Tensor::i64(
                            &shape,
                            c.iter()
                                .zip(p.iter().zip(q.iter()))
                                .map(|(&c, (&p, &q))| if c != 0 { p } else { q })
                                .collect(),
                        )?,
                        (p, q) => {
                            let (p, q) = (p.to_f32s(), q.to_f32s());
                            Tensor::f32(
                                &shape,
                                c.iter()
                                    .zip(p.iter().zip(q.iter()))
                                    .map(|(&c, (&p, &q))| if c != 0 { p } else { q })
                                    .collect(),
                            )?
                        }
                    };
                    vec![Fact::known(t, a.elem)]
                }
                _ => vec![Fact::of(shape, a.elem)],
            }
        }
        Op::Equal => {
            let y = need(ins, 1)?;
            let shape = broadcast(&x.shape, &y.shape)?;
            match (&x.value, &y.value) {
                (Some(p), Some(q)) => {
                    let eq: Vec<i64> = match (broadcast_to(p, &shape)?, broadcast_to(q, &shape)?) {
                        (Tensor::I64(p), Tensor::I64(q)) => p
                            .iter()
                            .zip(q.iter())
                            .map(|(a, b)| (a == b) as i64)
                            .collect(),
                        (p, q) => p
                            .to_f32s()
                            .iter()
                            .zip(q.to_f32s())
                            .map(|(&a, b)| (a == b) as i64)
                            .collect(),
                    };
                    vec![Fact::known(Tensor::i64(&shape, eq)?, ElemType::Bool)]
                }
                _ => vec![Fact::of(shape, ElemType::Bool)],
            }
        }
        Op::Softmax { axis, .. } | Op::LogSoftmax { axis, .. } => {
            norm_axis(*axis, x.shape.len())?;
            same()
        }
        Op::Sum => {
            let facts: Vec<&Fact> = ins.iter().flatten().copied().collect();
            let mut shape = x.shape.clone();
            for f in &facts[1..] {
                shape = broadcast(&shape, &f.shape)?;
            }
            if all_known {
                let mut acc = x.value.clone().expect("known");
                for f in &facts[1..] {
                    acc = binary(&Op::Add, &acc, f.value.as_ref().expect("known"))?;
                }
                vec![Fact::known(acc, x.elem)]
            } else {
                vec![Fact::of(shape, x.elem)]
            }
        }
    };
    Ok(out)
}

/// A value of `shape` must fit in memory (as f32), so that every later stage can allocate it
/// without aborting; the element count must not overflow either.
fn check_size(shape: &[usize]) -> Result<()> {
    let n = shape
        .iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))
        .unwrap_or(u128::MAX);
    crate::util::check_alloc(&format!("a tensor of shape {shape:?}"), n, 4)
}

/// Constants elrt builds itself (ConstantOfShape, Expand, Range) are capped, so that a file
/// asking for an absurd size gets an error instead of an allocation failure.
pub const MAX_CONSTANT_ELEMENTS: usize = 1 << 28;

fn checked_len(shape: &[usize]) -> Result<usize> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_CONSTANT_ELEMENTS);
    n.ok_or_else(|| {
        anyhow!(
            "a constant of shape {shape:?} would hold more than {MAX_CONSTANT_ELEMENTS} elements"
        )
    })
}

fn dims_to_shape(dims: &[i64]) -> Result<Vec<usize>> {
    dims.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| anyhow!("shape {dims:?} has a negative dimension"))
        })
        .collect()
}

/// A known value broadcast to `shape` (numpy rules), as an owned tensor.
fn broadcast_to(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    let err = || {
        anyhow!(
            "a value of shape {:?} does not broadcast to {shape:?}",
            t.shape()
        )
    };
    Ok(match t {
        Tensor::F32(a) => Tensor::F32(a.broadcast(IxDyn(shape)).ok_or_else(err)?.to_owned()),
        Tensor::I64(a) => Tensor::I64(a.broadcast(IxDyn(shape)).ok_or_else(err)?.to_owned()),
    })
}

/// A shape-only change keeps a known value, reshaped.
fn reshaped_fact(x: &Fact, shape: Vec<usize>) -> Result<Vec<Fact>> {
    Ok(vec![match &x.value {
        Some(t) => Fact::known(t.reshaped(&shape)?, x.elem),
        None => Fact::of(shape, x.elem),
    }])
}

/// Part sizes of a Split: explicit, or equal parts (the last smaller when they do not divide,
/// as opset 18 defines).
pub fn split_sizes(dim: usize, split: Option<&[usize]>, parts: usize) -> Result<Vec<usize>> {
    match split {
        Some(s) => {
            if s.iter().sum::<usize>() != dim {
                bail!("split sizes {s:?} do not add up to the axis length {dim}");
            }
            Ok(s.to_vec())
        }
        None => {
            if parts == 0 {
                bail!("has no outputs");
            }
            let chunk = dim.div_ceil(parts);
            let sizes: Vec<usize> = (0..parts)
                .map(|i| chunk.min(dim.saturating_sub(i * chunk)))
                .collect();
            if sizes.contains(&0) {
                bail!("cannot split an axis of {dim} into {parts} parts");
            }
            Ok(sizes)
        }
    }
}

pub fn matmul_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    if a.is_empty() || b.is_empty() {
        bail!("MatMul operands must have rank 1 or more");
    }
    let a2 = if a.len() == 1 {
        vec![1, a[0]]
    } else {
        a.to_vec()
    };
    let b2 = if b.len() == 1 {
        vec![b[0], 1]
    } else {
        b.to_vec()
    };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        bail!("inconsistent shapes: {a:?} and {b:?} do not multiply");
    }
    let mut shape = broadcast(&a2[..a2.len() - 2], &b2[..b2.len() - 2])?;
    if a.len() > 1 {
        shape.push(m);
    }
    if b.len() > 1 {
        shape.push(n);
    }
    Ok(shape)
}

pub fn reshape_target(input: &[usize], target: &[i64], allowzero: bool) -> Result<Vec<usize>> {
    let total: usize = input.iter().product();
    let mut out = Vec::with_capacity(target.len());
    let mut infer_at = None;
    for (i, &t) in target.iter().enumerate() {
        match t {
            -1 => {
                if infer_at.replace(i).is_some() {
                    bail!("target shape {target:?} has more than one -1");
                }
                out.push(1);
            }
            0 if !allowzero => out.push(*input.get(i).ok_or_else(|| {
                anyhow!("target shape {target:?} copies axis {i}, which the input {input:?} lacks")
            })?),
            t if t < 0 => bail!("target shape {target:?} has a negative dimension"),
            t => out.push(t as usize),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer_at {
        if known == 0 || !total.is_multiple_of(known) {
            bail!("cannot reshape {input:?} to {target:?}");
        }
        out[i] = total / known;
    } else if known != total {
        bail!("cannot reshape {input:?} ({total} elements) to {target:?}");
    }
    Ok(out)
}

/// The parameters of a [`Op::DynSlice`] from its operand inputs' known values.
pub fn dyn_slice_params(ins: &[Option<&Fact>]) -> Result<Slice> {
    let val = |i: usize, what: &str| -> Result<Option<Vec<i64>>> {
        match ins.get(i).copied().flatten() {
            None => Ok(None),
            Some(f) => f
                .value
                .as_ref()
                .map(|t| Some(t.to_i64s()))
                .ok_or_else(|| anyhow!("the slice {what} are not known before run time")),
        }
    };
    let s = Slice {
        starts: val(1, "starts")?.unwrap_or_default(),
        ends: val(2, "ends")?.unwrap_or_default(),
        axes: val(3, "axes")?,
        steps: val(4, "steps")?,
    };
    if s.starts.len() != s.ends.len() {
        bail!("slice starts and ends differ in length");
    }
    Ok(s)
}

/// Per-axis index lists selected by a Slice, with ONNX's clamping rules.
pub fn slice_indices(shape: &[usize], s: &Slice) -> Result<Vec<Vec<usize>>> {
    let rank = shape.len();
    let mut idx: Vec<Vec<usize>> = shape.iter().map(|&d| (0..d).collect()).collect();
    let axes: Vec<usize> = match &s.axes {
        Some(a) => a
            .iter()
            .map(|&v| norm_axis(v, rank))
            .collect::<Result<_>>()?,
        None => (0..s.starts.len()).collect(),
    };
    if axes.iter().any(|&a| a >= rank) {
        bail!("slice axes {axes:?} exceed rank {rank}");
    }
    for (j, &ax) in axes.iter().enumerate() {
        let d = shape[ax] as i64;
        let step = s.steps.as_ref().map_or(1, |v| v[j]);
        let fix = |v: i64| if v < 0 { v + d } else { v };
        let (start, end) = (fix(s.starts[j]), fix(s.ends[j]));
        let list: Vec<usize> = if step > 0 {
            let (b, e) = (start.clamp(0, d), end.clamp(0, d));
            (b..e).step_by(step as usize).map(|v| v as usize).collect()
        } else {
            let (b, e) = (start.clamp(-1, d - 1), end.clamp(-1, d - 1));
            let mut v = Vec::new();
            let mut i = b;
            while i > e {
                v.push(i as usize);
                i += step;
            }
            v
        };
        idx[ax] = list;
    }
    Ok(idx)
}

fn take(t: &Tensor, idx: &[Vec<usize>]) -> Tensor {
    fn go<T: Clone>(a: &ArrayD<T>, idx: &[Vec<usize>]) -> ArrayD<T> {
        let mut out = a.clone();
        for (ax, list) in idx.iter().enumerate() {
            out = out.select(Axis(ax), list);
        }
        out
    }
    match t {
        Tensor::F32(a) => Tensor::F32(go(a, idx)),
        Tensor::I64(a) => Tensor::I64(go(a, idx)),
    }
}

fn transpose(t: &Tensor, perm: &[usize]) -> Tensor {
    match t {
        Tensor::F32(a) => Tensor::F32(
            a.clone()
                .permuted_axes(IxDyn(perm))
                .as_standard_layout()
                .into_owned(),
        ),
        Tensor::I64(a) => Tensor::I64(
            a.clone()
                .permuted_axes(IxDyn(perm))
                .as_standard_layout()
                .into_owned(),
        ),
    }
}

/// Gather's indices into an axis of `len`, flattened, negative ones counted from the end.
pub fn gather_index_list(indices: &Tensor, len: usize) -> Result<Vec<usize>> {
    let d = len as i64;
    indices
        .to_i64s()
        .iter()
        .map(|&i| {
            let j = if i < 0 { i + d } else { i };
            if j < 0 || j >= d {
                bail!("index {i} is out of range for an axis of {d}");
            }
            Ok(j as usize)
        })
        .collect()
}

fn gather(data: &Tensor, indices: &Tensor, axis: usize, out_shape: &[usize]) -> Result<Tensor> {
    let list = gather_index_list(indices, data.shape()[axis])?;
    let picked = match data {
        Tensor::F32(a) => Tensor::F32(a.select(Axis(axis), &list)),
        Tensor::I64(a) => Tensor::I64(a.select(Axis(axis), &list)),
    };
    picked.reshaped(out_shape)
}

fn concat(facts: &[&Fact], axis: usize) -> Result<Tensor> {
    let vals: Vec<&Tensor> = facts
        .iter()
        .map(|f| f.value.as_ref().expect("known"))
        .collect();
    let err = |e| anyhow!("cannot concatenate: {e}");
    match vals[0] {
        Tensor::F32(_) => {
            let v: Vec<_> = vals.iter().map(|t| t.cast(ElemType::F32)).collect();
            let views: Vec<_> = v.iter().map(|t| t.as_f32().expect("f32").view()).collect();
            Ok(Tensor::F32(
                ndarray::concatenate(Axis(axis), &views).map_err(err)?,
            ))
        }
        Tensor::I64(_) => {
            let v: Vec<ArrayD<i64>> = vals
                .iter()
                .map(|t| match t.cast(ElemType::I64) {
                    Tensor::I64(a) => a,
                    Tensor::F32(_) => unreachable!("cast to i64"),
                })
                .collect();
            let views: Vec<_> = v.iter().map(|a| a.view()).collect();
            Ok(Tensor::I64(
                ndarray::concatenate(Axis(axis), &views).map_err(err)?,
            ))
        }
    }
}

/// Elementwise arithmetic on constants, with broadcasting.
fn binary(op: &Op, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let shape = broadcast(a.shape(), b.shape())?;
    Ok(match (a, b) {
        (Tensor::I64(x), Tensor::I64(y)) => {
            let x = x.broadcast(IxDyn(&shape)).expect("broadcast");
            let y = y.broadcast(IxDyn(&shape)).expect("broadcast");
            let mut out = x.to_owned();
            for (o, &v) in out.iter_mut().zip(y.iter()) {
                *o = match op {
                    Op::Add => *o + v,
                    Op::Sub => *o - v,
                    Op::Mul => *o * v,
                    _ => {
                        if v == 0 {
                            bail!("integer division by zero");
                        }
                        *o / v
                    }
                };
            }
            Tensor::I64(out)
        }
        _ => {
            let (xa, ya) = (a.cast(ElemType::F32), b.cast(ElemType::F32));
            let x = xa
                .as_f32()
                .expect("f32")
                .broadcast(IxDyn(&shape))
                .expect("broadcast");
            let y = ya
                .as_f32()
                .expect("f32")
                .broadcast(IxDyn(&shape))
                .expect("broadcast");
            let mut out = x.to_owned();
            for (o, &v) in out.iter_mut().zip(y.iter()) {
                *o = match op {
                    Op::Add => *o + v,
                    Op::Sub => *o - v,
                    Op::Mul => *o * v,
                    _ => *o / v,
                };
            }
            Tensor::F32(out)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dim, ModelMeta, ValueInfo};
    use std::collections::BTreeMap;

    fn node(op: Op, inputs: &[&str], out: &str) -> Node {
        Node {
            name: out.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
        }
    }

    /// The shape-computing ops of exported graphs (ConstantOfShape, Range, Expand, Equal,
    /// Where, Sum) fold to the values numpy gives, from the input's shape.
    #[test]
    fn shape_subgraph_ops_fold_to_numpy_values() {
        let mut init = BTreeMap::new();
        init.insert("zero".into(), Tensor::i64_vec(&[0]));
        init.insert("one".into(), Tensor::i64(&[], vec![1]).unwrap());
        init.insert("two".into(), Tensor::i64(&[], vec![2]).unwrap());
        init.insert("seven".into(), Tensor::i64(&[], vec![7]).unwrap());
        init.insert(
            "row".into(),
            Tensor::f32(&[1, 3], vec![1., 2., 3.]).unwrap(),
        );
        init.insert("expand_to".into(), Tensor::i64_vec(&[2, 1]));
        let g = Graph {
            name: "g".into(),
            opset: 13,
            inputs: vec![ValueInfo {
                name: "x".into(),
                elem: ElemType::F32,
                shape: Some(vec![Dim::Sym("N".into()), Dim::Fixed(3)]),
            }],
            outputs: vec![],
            nodes: vec![
                node(
                    Op::Shape(Shape {
                        start: None,
                        end: None,
                    }),
                    &["x"],
                    "s",
                ),
                node(
                    Op::ConstantOfShape {
                        value: Tensor::f32(&[1], vec![0.5]).unwrap(),
                    },
                    &["s"],
                    "c",
                ),
                node(Op::Range, &["one", "seven", "two"], "r"),
                node(Op::Expand, &["row", "expand_to"], "e"),
                node(Op::Equal, &["r", "seven"], "eq_none"),
                node(Op::Equal, &["s", "zero"], "eq"),
                node(Op::Where, &["eq", "zero", "s"], "w"),
                node(Op::Sum, &["e", "row", "row"], "sum"),
            ],
            initializers: init,
            meta: ModelMeta::default(),
        };
        let f = infer(&g, &[vec![4, 3]]).unwrap();
        let v = |k: &str| f[k].value.clone().unwrap();
        assert_eq!(v("c"), Tensor::f32(&[4, 3], vec![0.5; 12]).unwrap());
        assert_eq!(v("r"), Tensor::i64_vec(&[1, 3, 5]));
        assert_eq!(
            v("e"),
            Tensor::f32(&[2, 3], vec![1., 2., 3., 1., 2., 3.]).unwrap()
        );
        assert_eq!(v("eq_none"), Tensor::i64_vec(&[0, 0, 0]));
        assert_eq!(
            (v("eq"), f["eq"].elem),
            (Tensor::i64_vec(&[0, 0]), ElemType::Bool)
        );
        assert_eq!(v("w"), Tensor::i64_vec(&[4, 3]));
        assert_eq!(
            v("sum"),
            Tensor::f32(&[2, 3], vec![3., 6., 9., 3., 6., 9.]).unwrap()
        );
    }

    /// A constant a file asks elrt to build is capped: an error that states the size, not an
    /// allocation failure.
    #[test]
    fn huge_constants_are_refused() {
        let mut init = BTreeMap::new();
        init.insert("shape".into(), Tensor::i64_vec(&[1 << 20, 1 << 20]));
        let g = Graph {
            name: "g".into(),
            opset: 13,
            inputs: vec![],
            outputs: vec![],
            nodes: vec![node(
                Op::ConstantOfShape {
                    value: Tensor::f32(&[1], vec![0.0]).unwrap(),
                },
                &["shape"],
                "c",
            )],
            initializers: init,
            meta: ModelMeta::default(),
        };
        let err = format!("{:#}", infer(&g, &[]).unwrap_err());
        assert!(err.contains("[1048576, 1048576]"), "{err}");
    }
}
