//! The low-rank rewrite pass: each eligible Conv becomes a Tucker-2 or CP chain.
//!
//! Tucker-2: Conv1x1 (C_in -> r_in) -> Conv kxk (r_in -> r_out, the original strides, pads and
//! dilations) -> Conv1x1 (r_out -> C_out, the original bias). CP: Conv1x1 (C_in -> r) -> kx1
//! depthwise -> 1xk depthwise -> Conv1x1 (r -> C_out). The last factor writes the original
//! output value, so a BatchNormalization after the conv stays after the chain. Names come from
//! the source layer: `<layer>/tucker2/u1`, `/core`, `/u2` (nodes), with `.weight` initializers
//! ([`super::naming`]).
//!
//! From-scratch initialisation keeps the composed kernel at Kaiming's variance (fan_out, ReLU
//! gain), 2 / (C_out k^2), and each factor at unit gain: with independent zero-mean factors,
//! Var(W) = r_in r_out Var(U1) Var(G) Var(U2). Choosing Var(U1) = 1/C_in and
//! Var(G) = 1/(r_in k^2) preserves the signal through the first two convs, and
//! Var(U2) = 2 C_in / (C_out r_out) then gives Var(W) = 2 / (C_out k^2) exactly, so the chain
//! starts like the dense layer it replaces. CP likewise: Var(U1) = 1/C_in, Var(V) = 1/kh,
//! Var(H) = 1/kw, Var(U2) = 2 C_in / (C_out r).

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::{Array2, Array4, ArrayD, IxDyn};
use serde::Serialize;

use super::decompose;
use super::naming::{FactorKind, FactorName, FactorRole, OUT, WEIGHT};
use super::rank::{read_rank_file, round_rank, RankPolicy};
use crate::ir::ops::{AutoPad, Conv};
use crate::ir::shape::Facts;
use crate::ir::{Graph, Node, Op, Tensor};
use crate::rng::Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Format {
    Tucker2,
    Cp,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Format> {
        Ok(match s {
            "tucker2" | "tucker" => Format::Tucker2,
            "cp" => Format::Cp,
            o => bail!("--format '{o}': expected tucker2 or cp"),
        })
    }
}

impl std::fmt::Display for Format {
    /// The `--format` form (`tucker2`, `cp`): parses back to the same value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Tucker2 => "tucker2",
            Format::Cp => "cp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum InitMode {
    /// Gaussian factors at the variances derived in the module docs.
    Scratch,
    /// Orthogonal U1, U2 (QR of a Gaussian), Gaussian core at the matching variance.
    Orthogonal,
    /// Factors of the file's trained kernel: HOSVD refined by HOOI (Tucker-2), ALS (CP).
    Decompose,
}

impl std::str::FromStr for InitMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<InitMode> {
        Ok(match s {
            "scratch" => InitMode::Scratch,
            "orthogonal" => InitMode::Orthogonal,
            "decompose" => InitMode::Decompose,
            o => bail!("--init '{o}': expected scratch, orthogonal or decompose"),
        })
    }
}

impl std::fmt::Display for InitMode {
    /// The `--init` form: parses back to the same value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InitMode::Scratch => "scratch",
            InitMode::Orthogonal => "orthogonal",
            InitMode::Decompose => "decompose",
        })
    }
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub format: Format,
    pub ranks: RankPolicy,
    pub rank_multiple: usize,
    /// Factorize the first conv (the one reading the image) too.
    pub include_first: bool,
    /// Factorize 1x1 convs too, by SVD: `1x1 (C_in -> r)` -> `1x1 (r -> C_out)`.
    pub include_pointwise: bool,
    /// Factorize Gemm (fully connected) layers too, by SVD: `in -> r` -> `r -> out`.
    pub include_gemm: bool,
    pub init: InitMode,
    pub seed: u64,
    pub hooi_iters: usize,
    pub cp_iters: usize,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerReport {
    pub layer: String,
    pub node: String,
    pub weight_shape: Vec<usize>,
    /// `[r_in, r_out]` (Tucker-2) or `[r]` (CP); empty when skipped.
    pub ranks: Vec<usize>,
    pub params_before: u64,
    pub params_after: u64,
    pub macs_before: u64,
    pub macs_after: u64,
    /// "factorized", or why the layer was left as it is.
    pub status: String,
    /// ||W - W~|| / ||W|| of the decomposition (decompose init only).
    pub rel_error: Option<f64>,
}

/// One conv's replacement: its node index, the factor nodes and their initializers.
type Rewrite = (usize, Vec<Node>, Vec<(String, Tensor)>);

/// The factor nodes, their initializers, and the decomposition's relative error if any.
type Factorized = (Vec<Node>, Vec<(String, Tensor)>, Option<f64>);

/// A conv the pass may factorize, with what the cost model needs.
struct Candidate {
    node: usize,
    layer: String,
    w: [usize; 4],
    in_hw: [usize; 2],
    out_hw: [usize; 2],
    has_bias: bool,
    /// A Gemm (weight seen as `[out, in, 1, 1]`, factorized by SVD into two Gemms).
    gemm: bool,
    /// A MatMul by a weight `[in, out]` (with `gemm`: factorized by SVD into two MatMuls).
    matmul: bool,
    /// Why it is not eligible, if so.
    skip: Option<String>,
}

/// The layer's name: its weight initializer without a trailing `.weight` (PyTorch's module
/// path), or, where the exporter generated the weight's name (`onnx::Conv_212`), the module
/// path recovered from the node name ([`module_path`]). Names are made unique afterwards
/// ([`make_unique`]).
fn layer_name(graph: &Graph, n: &Node) -> String {
    let w = &n.inputs[1];
    if graph.initializers.contains_key(w) && !w.starts_with("onnx::") {
        return w.strip_suffix(".weight").unwrap_or(w).to_string();
    }
    module_path(&n.name)
}

/// PyTorch's module path from a TorchScript export's node name: the scope segments without the
/// op, each segment that extends the one before it (`block` -> `block.0`) replacing it, so
/// `/features/features.1/block/block.0/block.0.0/Conv` -> `features.1.block.0.0` and
/// `/layer1/layer1.1/conv1/Conv` -> `layer1.1.conv1`. A name without scopes is kept.
pub fn module_path(node_name: &str) -> String {
    let segs: Vec<&str> = node_name.split('/').filter(|s| !s.is_empty()).collect();
    if segs.len() < 2 {
        return node_name.to_string();
    }
    let mut out: Vec<&str> = Vec::new();
    for s in &segs[..segs.len() - 1] {
        if out
            .last()
            .is_some_and(|last| s.strip_prefix(last).is_some_and(|r| r.starts_with('.')))
        {
            out.pop();
        }
        out.push(s);
    }
    out.join(".")
}

/// What the layer selection leaves out, by the flag that would take it in, with its share of
/// the model's params: the way to reach a budget the eligible layers cannot.
fn left_out(cands: &[Candidate], total_params: u64) -> String {
    let mut groups: Vec<(&str, usize, u64)> = Vec::new();
    for c in cands {
        let Some(why) = &c.skip else { continue };
        let flag = ["--include-1x1", "--include-gemm", "--include-first"]
            .into_iter()
            .find(|f| why.contains(f))
            .unwrap_or("no flag (left as they are)");
        let params =
            c.w.iter().map(|&d| d as u64).product::<u64>() + c.has_bias as u64 * c.w[0] as u64;
        match groups.iter_mut().find(|g| g.0 == flag) {
            Some(g) => {
                g.1 += 1;
                g.2 += params;
            }
            None => groups.push((flag, 1, params)),
        }
    }
    if groups.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(flag, n, p)| {
            format!(
                "{n} layer(s) with {:.0}% of the params: {flag}",
                100.0 * *p as f64 / total_params.max(1) as f64
            )
        })
        .collect();
    format!("; layers not factorized: {}", parts.join("; "))
}

/// Gives every repeated layer name a suffix (`_2`, `_3`, ... in graph order), so factor node
/// names and ranks-file keys address one layer each.
fn make_unique(cands: &mut [Candidate]) {
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    for c in cands.iter_mut() {
        if !seen.insert(c.layer.clone()) {
            let mut k = 2;
            while seen.contains(&format!("{}_{k}", c.layer)) {
                k += 1;
            }
            c.layer = format!("{}_{k}", c.layer);
            seen.insert(c.layer.clone());
        }
    }
}

fn candidates(graph: &Graph, facts: &Facts, opts: &ConvertOptions) -> Result<Vec<Candidate>> {
    let input = graph
        .inputs
        .first()
        .map(|i| i.name.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (i, n) in graph.nodes.iter().enumerate() {
        if let Op::Gemm(gm) = &n.op {
            if let Some(c) = gemm_candidate(graph, facts, opts, i, n, gm)? {
                out.push(c);
            }
            continue;
        }
        if matches!(n.op, Op::MatMul) {
            out.extend(matmul_candidate(graph, facts, opts, i, n));
            continue;
        }
        let Op::Conv(c) = &n.op else { continue };
        let shape = |v: &str| {
            facts
                .get(v)
                .map(|f| f.shape.clone())
                .ok_or_else(|| anyhow!("no shape for '{v}'"))
        };
        let w = shape(&n.inputs[1])?;
        if w.len() != 4 {
            continue;
        }
        let x = shape(&n.inputs[0])?;
        let y = shape(&n.outputs[0])?;
        let wa = [w[0], w[1], w[2], w[3]];
        let skip = if !graph.initializers.contains_key(&n.inputs[1]) {
            Some("weight is computed, not an initializer".to_string())
        } else if c.group > 1 && w[1] == 1 {
            Some("depthwise conv left as it is".to_string())
        } else if c.group > 1 {
            Some(format!("grouped conv (group {}) left as it is", c.group))
        } else if w[2] * w[3] == 1 && !opts.include_pointwise {
            Some("1x1 conv left as it is (--include-1x1 to factorize it by SVD)".to_string())
        } else if n.inputs[0] == input && !opts.include_first {
            Some("first conv left full rank (--include-first to factorize it)".to_string())
        } else {
            None
        };
        out.push(Candidate {
            node: i,
            layer: layer_name(graph, n),
            w: wa,
            in_hw: [x[2], x[3]],
            out_hw: [y[2], y[3]],
            has_bias: n.input(2).is_some(),
            gemm: false,
            matmul: false,
            skip,
        });
    }
    make_unique(&mut out);
    Ok(out)
}

/// A Gemm `y = alpha x W' + beta b` (W' = W or W^T) as a candidate with `w = [out, in, 1, 1]`.
fn gemm_candidate(
    graph: &Graph,
    facts: &Facts,
    opts: &ConvertOptions,
    i: usize,
    n: &Node,
    gm: &crate::ir::ops::Gemm,
) -> Result<Option<Candidate>> {
    let Some(w) = facts.get(&n.inputs[1]).map(|f| f.shape.clone()) else {
        return Ok(None);
    };
    if w.len() != 2 {
        return Ok(None);
    }
    let (out_f, in_f) = if gm.trans_b {
        (w[0], w[1])
    } else {
        (w[1], w[0])
    };
    let skip = if !opts.include_gemm {
        Some("Gemm left as it is (--include-gemm to factorize it by SVD)".to_string())
    } else if !graph.initializers.contains_key(&n.inputs[1]) {
        Some("weight is computed, not an initializer".to_string())
    } else if gm.trans_a {
        Some("Gemm with transA left as it is".to_string())
    } else if n.input(2).is_some_and(|b| {
        facts
            .get(b)
            .is_none_or(|f| f.shape.iter().product::<usize>() != out_f)
    }) {
        Some("Gemm bias is not one value per output".to_string())
    } else {
        None
    };
    Ok(Some(Candidate {
        node: i,
        layer: layer_name(graph, n),
        w: [out_f, in_f, 1, 1],
        in_hw: [1, 1],
        out_hw: [1, 1],
        has_bias: n.input(2).is_some(),
        gemm: true,
        matmul: false,
        skip,
    }))
}

/// A MatMul of an activation by a weight initializer `[in, out]`, as a candidate with
/// `w = [out, in, 1, 1]`. On a rank > 2 activation it is a Linear applied to every pixel of a
/// channels-last image (ConvNeXt's pointwise layers): a 1x1 conv, factorized with
/// `--include-1x1`; on a 2-D one it is a fully connected layer, factorized with
/// `--include-gemm`. A MatMul of two activations is no layer and is not listed.
fn matmul_candidate(
    graph: &Graph,
    facts: &Facts,
    opts: &ConvertOptions,
    i: usize,
    n: &Node,
) -> Option<Candidate> {
    if !graph.initializers.contains_key(n.input(1)?) {
        return None;
    }
    let w = &facts.get(&n.inputs[1])?.shape;
    let x = &facts.get(&n.inputs[0])?.shape;
    if w.len() != 2 || x.len() < 2 {
        return None;
    }
    let rows = &x[1..x.len() - 1];
    let hw = match rows {
        [] => [1, 1],
        [h, w] => [*h, *w],
        more => [more.iter().product(), 1],
    };
    let skip = if x.len() > 2 && !opts.include_pointwise {
        Some(
            "channels-last Linear (MatMul) left as it is (--include-1x1 to factorize it by SVD)"
                .to_string(),
        )
    } else if x.len() == 2 && !opts.include_gemm {
        Some("MatMul left as it is (--include-gemm to factorize it by SVD)".to_string())
    } else {
        None
    };
    Some(Candidate {
        node: i,
        layer: layer_name(graph, n),
        w: [w[1], w[0], 1, 1],
        in_hw: hw,
        out_hw: hw,
        has_bias: false,
        gemm: true,
        matmul: true,
        skip,
    })
}

/// SVD factors of a matrix-shaped layer `W[co, ci]` (a 1x1 conv or a Gemm): `U1 [r, ci]`,
/// `U2 [co, r]`, and the decomposition's relative error. Scratch: var(U1) = 1/ci and U2 drawn
/// with `u2_std`; orthogonal: U1 with orthonormal rows; decompose: Tucker-2 of the 1x1 kernel
/// with r_in = r_out = r (the truncated SVD), its r x r core folded into U2 so that U1 keeps
/// orthonormal rows.
fn svd_factors(
    opts: &ConvertOptions,
    kernel: impl FnOnce() -> Result<Array4<f32>>,
    [co, ci, r]: [usize; 3],
    u2_std: f32,
    rng: &mut Rng,
) -> Result<(Array2<f32>, Array2<f32>, Option<f64>)> {
    let as2 = |a: ArrayD<f32>, rows: usize, cols: usize| -> Result<Array2<f32>> {
        Ok(a.into_shape_with_order((rows, cols))?)
    };
    Ok(match opts.init {
        InitMode::Scratch | InitMode::Orthogonal => {
            let u1 = if opts.init == InitMode::Orthogonal {
                decompose::orthogonal(ci, r, rng)
                    .t()
                    .as_standard_layout()
                    .into_owned()
            } else {
                as2(gauss(&[r, ci], (1.0 / ci as f32).sqrt(), rng), r, ci)?
            };
            (u1, as2(gauss(&[co, r], u2_std, rng), co, r)?, None)
        }
        InitMode::Decompose => {
            let w = kernel()?;
            let t = decompose::hooi(w.view(), r, r, opts.hooi_iters, 1e-6)?;
            let err = decompose::rel_error(w.view(), decompose::tucker2_compose(&t).view());
            let g = t
                .core
                .index_axis(ndarray::Axis(3), 0)
                .index_axis(ndarray::Axis(2), 0)
                .to_owned();
            (
                t.u1.t().as_standard_layout().into_owned(),
                t.u2.dot(&g),
                Some(err),
            )
        }
    })
}

/// Two Gemms for one: `x -> alpha x U1^T` (in -> r) -> `h U2^T + beta b` (r -> out), or for a
/// MatMul two MatMuls by `U1^T` (`[in, r]`) and `U2^T` (`[r, out]`). Scratch init follows
/// PyTorch's Linear variance for the product (uniform +-1/sqrt(in) has variance 1/(3 in)):
/// var(U1) = 1/in, var(U2) = 1/(3 r); decompose takes the truncated SVD.
fn factorize_gemm(
    graph: &Graph,
    c: &Candidate,
    r: usize,
    opts: &ConvertOptions,
    key: u64,
) -> Result<Factorized> {
    let n = &graph.nodes[c.node];
    // (alpha, beta, whether the weight is stored [out, in])
    let (alpha, beta, out_major) = match &n.op {
        Op::Gemm(gm) => (gm.alpha, gm.beta, gm.trans_b),
        Op::MatMul => (1.0, 0.0, false),
        _ => unreachable!("gemm or matmul candidate"),
    };
    let [out_f, in_f, _, _] = c.w;
    let name = |role| FactorName::node(&c.layer, FactorKind::Svd, role);
    let mut rng = Rng::derive(opts.seed, &[0x006c_6f77_7261_6e6b, key]);
    let kernel = || -> Result<Array4<f32>> {
        let w = graph.initializers[&n.inputs[1]]
            .as_f32()
            .ok_or_else(|| anyhow!("the weight is not float"))?
            .clone()
            .into_dimensionality::<ndarray::Ix2>()?;
        let w = if out_major { w } else { w.t().to_owned() };
        Ok(w.as_standard_layout()
            .into_owned()
            .into_shape_with_order((out_f, in_f, 1, 1))?)
    };
    let u2_std = (1.0 / (3.0 * r as f32)).sqrt();
    let (u1, u2, err) = svd_factors(opts, kernel, [out_f, in_f, r], u2_std, &mut rng)?;
    let (f1, f2) = (name(FactorRole::U1), name(FactorRole::U2));
    let (n1, n2) = (f1.to_string(), f2.to_string());
    let (w1, w2) = (f1.with(WEIGHT).to_string(), f2.with(WEIGHT).to_string());
    let mid = f1.with(OUT).to_string();
    if c.matmul {
        // The weights as MatMul reads them: [in, r] and [r, out].
        let t = |a: Array2<f32>| a.t().as_standard_layout().into_owned().into_dyn();
        let nodes = vec![
            Node {
                name: n1,
                op: Op::MatMul,
                inputs: vec![n.inputs[0].clone(), w1.clone()],
                outputs: vec![mid.clone()],
            },
            Node {
                name: n2,
                op: Op::MatMul,
                inputs: vec![mid, w2.clone()],
                outputs: vec![n.outputs[0].clone()],
            },
        ];
        let inits = vec![(w1, Tensor::F32(t(u1))), (w2, Tensor::F32(t(u2)))];
        return Ok((nodes, inits, err));
    }
    let (u1, u2) = (u1.into_dyn(), u2.into_dyn());
    let mut second_inputs = vec![mid.clone(), w2.clone()];
    if let Some(b) = n.input(2) {
        second_inputs.push(b.to_string());
    }
    let nodes = vec![
        Node {
            name: n1,
            op: Op::Gemm(crate::ir::ops::Gemm {
                alpha,
                beta: 1.0,
                trans_a: false,
                trans_b: true,
            }),
            inputs: vec![n.inputs[0].clone(), w1.clone()],
            outputs: vec![mid],
        },
        Node {
            name: n2,
            op: Op::Gemm(crate::ir::ops::Gemm {
                alpha: 1.0,
                beta,
                trans_a: false,
                trans_b: true,
            }),
            inputs: second_inputs,
            outputs: vec![n.outputs[0].clone()],
        },
    ];
    let inits = vec![(w1, Tensor::F32(u1)), (w2, Tensor::F32(u2))];
    Ok((nodes, inits, err))
}

/// Params and MACs of the dense layer and of its factorization at `ranks`.
fn costs(c: &Candidate, format: Format, ranks: &[usize]) -> (u64, u64, u64, u64) {
    let [co, ci, kh, kw] = c.w.map(|v| v as u64);
    let (hin, win) = (c.in_hw[0] as u64, c.in_hw[1] as u64);
    let (ho, wo) = (c.out_hw[0] as u64, c.out_hw[1] as u64);
    let bias = if c.has_bias { co } else { 0 };
    let p0 = co * ci * kh * kw + bias;
    let m0 = ho * wo * co * ci * kh * kw;
    let (p1, m1) = match format {
        // A 1x1 conv factorizes by SVD in either format: u1 (C_in -> r, the conv's stride),
        // u2 (r -> C_out).
        _ if kh * kw == 1 => {
            let r = ranks[0] as u64;
            (ci * r + r * co + bias, ho * wo * (ci * r + r * co))
        }
        Format::Tucker2 => {
            let (ri, ro) = (ranks[0] as u64, ranks[1] as u64);
            (
                ci * ri + ro * ri * kh * kw + co * ro + bias,
                hin * win * ci * ri + ho * wo * ro * ri * kh * kw + ho * wo * co * ro,
            )
        }
        Format::Cp => {
            let r = ranks[0] as u64;
            (
                ci * r + r * kh + r * kw + co * r + bias,
                hin * win * ci * r + ho * win * r * kh + ho * wo * r * kw + ho * wo * co * r,
            )
        }
    };
    (p0, p1, m0, m1)
}

/// Ranks for a layer at a uniform channel ratio `t`.
fn ratio_ranks(c: &Candidate, format: Format, t: f64, multiple: usize) -> Vec<usize> {
    let [co, ci, kh, kw] = c.w;
    match format {
        _ if kh * kw == 1 => vec![round_rank(t * co.min(ci) as f64, multiple, co.min(ci))],
        Format::Tucker2 => vec![
            round_rank(t * ci as f64, multiple, ci),
            round_rank(t * co as f64, multiple, co),
        ],
        Format::Cp => vec![round_rank(t * co.max(ci) as f64, multiple, usize::MAX)],
    }
}

/// Total (params, MACs) of the whole model if every eligible layer took `ranks[i]` (skipping
/// factorizations that would not save).
fn model_totals(
    base: (u64, u64),
    cands: &[Candidate],
    format: Format,
    ranks: &[Option<Vec<usize>>],
) -> (u64, u64) {
    let (mut p, mut m) = base;
    for (c, r) in cands.iter().zip(ranks) {
        if let Some(r) = r {
            let (p0, p1, m0, m1) = costs(c, format, r);
            if p1 < p0 || m1 < m0 {
                p = p - p0 + p1;
                m = m - m0 + m1;
            }
        }
    }
    (p, m)
}

/// Rewrites `graph` (simplified for `facts`) in place; returns one report per conv.
pub fn convert(
    graph: &mut Graph,
    facts: &Facts,
    opts: &ConvertOptions,
) -> Result<Vec<LayerReport>> {
    if opts.rank_multiple == 0 {
        bail!("--rank-multiple must be at least 1");
    }
    let cands = candidates(graph, facts, opts)?;
    let eligible: Vec<bool> = cands.iter().map(|c| c.skip.is_none()).collect();
    let base = {
        let cost = crate::ir::cost::cost(graph, facts);
        (cost.totals.params, cost.totals.macs)
    };
    // Ranks per candidate.
    let mut ranks: Vec<Option<Vec<usize>>> = vec![None; cands.len()];
    let mut errors: BTreeMap<String, f64> = BTreeMap::new();
    match &opts.ranks {
        RankPolicy::Ratio(t) => {
            for (i, c) in cands.iter().enumerate() {
                if eligible[i] {
                    ranks[i] = Some(ratio_ranks(c, opts.format, *t as f64, opts.rank_multiple));
                }
            }
        }
        RankPolicy::Params(target) | RankPolicy::Macs(target) => {
            let by_params = matches!(opts.ranks, RankPolicy::Params(_));
            let at = |t: f64| -> (Vec<Option<Vec<usize>>>, f64) {
                let r: Vec<Option<Vec<usize>>> = cands
                    .iter()
                    .zip(&eligible)
                    .map(|(c, &e)| e.then(|| ratio_ranks(c, opts.format, t, opts.rank_multiple)))
                    .collect();
                let (p, m) = model_totals(base, &cands, opts.format, &r);
                let frac = if by_params {
                    p as f64 / base.0 as f64
                } else {
                    m as f64 / base.1 as f64
                };
                (r, frac)
            };
            // The largest uniform ratio that meets the target (the fraction grows with t).
            // Tucker-2 ranks stop at the channel counts; a CP rank may exceed them.
            let top = if opts.format == Format::Cp { 16.0 } else { 1.0 };
            let (mut lo, mut hi) = (1e-4f64, top);
            if at(lo).1 > *target as f64 {
                let floor = at(lo).1;
                bail!(
                    "--ranks {}={target}: unreachable, factorizing every eligible layer at the smallest ranks keeps {:.3} of the model's {}{}",
                    if by_params { "params" } else { "macs" },
                    floor,
                    if by_params { "params" } else { "MACs" },
                    left_out(&cands, base.0)
                );
            }
            for _ in 0..50 {
                let mid = 0.5 * (lo + hi);
                if at(mid).1 <= *target as f64 {
                    lo = mid;
                } else {
                    hi = mid;
                }
            }
            ranks = at(lo).0;
        }
        RankPolicy::Energy(e) => {
            if opts.init != InitMode::Decompose {
                bail!("--ranks energy=F needs --init decompose (it reads the trained kernels)");
            }
            for (i, c) in cands.iter().enumerate() {
                if !eligible[i] {
                    continue;
                }
                let w = weight4(graph, &graph.nodes[c.node])?;
                let (ri, ro) = decompose::energy_ranks(w.view(), *e as f64);
                ranks[i] = Some(match opts.format {
                    Format::Tucker2 => vec![
                        round_rank(ri as f64, opts.rank_multiple, c.w[1]).max(ri.min(c.w[1])),
                        round_rank(ro as f64, opts.rank_multiple, c.w[0]).max(ro.min(c.w[0])),
                    ],
                    Format::Cp => vec![round_rank(
                        ri.max(ro) as f64,
                        opts.rank_multiple,
                        usize::MAX,
                    )],
                });
            }
        }
        RankPolicy::Latency(_) => {
            bail!("--ranks latency=F is measured in tract by the caller (elrt convert) and passed as explicit ranks")
        }
        RankPolicy::File(_) | RankPolicy::Explicit(_) => {
            let (file, label) = match &opts.ranks {
                RankPolicy::File(path) => (read_rank_file(path)?, path.display().to_string()),
                RankPolicy::Explicit(m) => (m.clone(), "--ranks latency".to_string()),
                _ => unreachable!("matched above"),
            };
            for name in file.keys() {
                let Some(i) = cands.iter().position(|c| &c.layer == name) else {
                    let known: Vec<&str> = cands
                        .iter()
                        .filter(|c| c.skip.is_none())
                        .map(|c| c.layer.as_str())
                        .collect();
                    bail!(
                        "{}: unknown layer '{name}' (factorizable layers: {})",
                        label,
                        known.join(", ")
                    );
                };
                let c = &cands[i];
                let r = &file[name];
                if let Some(why) = &c.skip {
                    let grouped = !c.gemm && conv_of(&graph.nodes[c.node]).group > 1;
                    if grouped && opts.format == Format::Cp {
                        bail!(
                            "{}: layer '{name}': CP asked of a grouped conv ({why})",
                            label
                        );
                    }
                    if why.starts_with("first conv") {
                        // Naming the first conv in a ranks file is asking for it.
                    } else {
                        bail!("{}: layer '{name}' cannot be factorized: {why}", label);
                    }
                }
                let pointwise = c.w[2] * c.w[3] == 1;
                let want = if opts.format == Format::Tucker2 && !pointwise {
                    2
                } else {
                    1
                };
                if r.len() != want {
                    bail!(
                        "{}: layer '{name}': {} ranks given, {} expects {want}",
                        label,
                        r.len(),
                        if want == 2 {
                            "tucker2 ([r_in, r_out])"
                        } else if pointwise {
                            "a 1x1 conv's SVD (r)"
                        } else {
                            "cp (r)"
                        }
                    );
                }
                if pointwise && r[0] > c.w[0].min(c.w[1]) {
                    bail!(
                        "{}: layer '{name}': rank {} exceeds the 1x1 conv's channels ({} in, {} out)",
                        label,
                        r[0],
                        c.w[1],
                        c.w[0]
                    );
                }
                if !pointwise && opts.format == Format::Tucker2 && (r[0] > c.w[1] || r[1] > c.w[0])
                {
                    bail!(
                        "{}: layer '{name}': ranks {:?} exceed its channels ({} in, {} out)",
                        label,
                        r,
                        c.w[1],
                        c.w[0]
                    );
                }
                ranks[i] = Some(r.clone());
            }
        }
    }

    // Rewrite, last node first so indices stay valid.
    let mut reports: Vec<LayerReport> = Vec::with_capacity(cands.len());
    let mut rewrites: Vec<Rewrite> = Vec::new();
    for (i, c) in cands.iter().enumerate() {
        let node = &graph.nodes[c.node];
        let dense = costs(c, opts.format, &[1, 1]);
        let mut rep = LayerReport {
            layer: c.layer.clone(),
            node: node.name.clone(),
            weight_shape: c.w.to_vec(),
            ranks: vec![],
            params_before: dense.0,
            params_after: dense.0,
            macs_before: dense.2,
            macs_after: dense.2,
            status: c.skip.clone().unwrap_or_default(),
            rel_error: None,
        };
        if ranks[i].is_none() && rep.status.is_empty() {
            rep.status = match &opts.ranks {
                RankPolicy::File(_) => "not in the ranks file: left as it is".into(),
                RankPolicy::Explicit(_) => "left dense by the latency search".into(),
                _ => String::new(),
            };
        }
        if let Some(r) = &ranks[i] {
            let (p0, p1, m0, m1) = costs(c, opts.format, r);
            if p1 >= p0 && m1 >= m0 {
                rep.status =
                    format!("skipped: ranks {r:?} save neither params ({p1} >= {p0}) nor MACs");
            } else {
                let key = i as u64;
                let made = if c.gemm {
                    factorize_gemm(graph, c, r[0], opts, key)
                } else {
                    factorize(graph, c, r, opts, key)
                };
                let (nodes, inits, err) =
                    made.with_context(|| format!("layer '{}' (node '{}')", c.layer, node.name))?;
                if let Some(e) = err {
                    errors.insert(c.layer.clone(), e);
                }
                rep.ranks = r.clone();
                rep.params_after = p1;
                rep.macs_after = m1;
                rep.status = "factorized".into();
                rep.rel_error = err;
                rewrites.push((c.node, nodes, inits));
            }
        }
        reports.push(rep);
    }
    for (idx, nodes, inits) in rewrites.into_iter().rev() {
        graph.nodes.remove(idx);
        for (k, t) in inits {
            graph.initializers.insert(k, t);
        }
        for (j, n) in nodes.into_iter().enumerate() {
            graph.nodes.insert(idx + j, n);
        }
    }
    graph.prune();
    graph.check()?;
    Ok(reports)
}

fn conv_of(n: &Node) -> Conv {
    match &n.op {
        Op::Conv(c) => c.clone(),
        _ => unreachable!("candidates are convs"),
    }
}

fn weight4(graph: &Graph, n: &Node) -> Result<Array4<f32>> {
    let t = graph.initializers[&n.inputs[1]]
        .as_f32()
        .ok_or_else(|| anyhow!("the weight is not float"))?;
    t.clone()
        .into_dimensionality::<ndarray::Ix4>()
        .map_err(|_| anyhow!("the weight is not 4-D"))
}

fn gauss(shape: &[usize], std: f32, rng: &mut Rng) -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(shape), |_| std * rng.normal())
}

/// Builds the factor nodes and their initializers for one conv.
fn factorize(
    graph: &Graph,
    c: &Candidate,
    r: &[usize],
    opts: &ConvertOptions,
    key: u64,
) -> Result<Factorized> {
    let n = &graph.nodes[c.node];
    let conv = conv_of(n);
    let [co, ci, kh, kw] = c.w;
    let mut rng = Rng::derive(opts.seed, &[0x006c_6f77_7261_6e6b, key]);
    let pointwise_layer = kh * kw == 1;
    let kind = match opts.format {
        _ if pointwise_layer => FactorKind::Svd,
        Format::Tucker2 => FactorKind::Tucker2,
        Format::Cp => FactorKind::Cp,
    };
    let pointwise = || Conv {
        kernel_shape: Some(vec![1, 1]),
        strides: vec![1, 1],
        pads: vec![0, 0, 0, 0],
        dilations: vec![1, 1],
        group: 1,
        auto_pad: AutoPad::NotSet,
    };
    let strides = if conv.strides.is_empty() {
        vec![1, 1]
    } else {
        conv.strides.clone()
    };
    let dil = if conv.dilations.is_empty() {
        vec![1, 1]
    } else {
        conv.dilations.clone()
    };
    let pads = if conv.auto_pad == AutoPad::NotSet {
        if conv.pads.is_empty() {
            vec![0; 4]
        } else {
            conv.pads.clone()
        }
    } else {
        let p = crate::ir::shape::resolve_pads(
            &c.in_hw,
            &[kh, kw],
            &strides,
            &dil,
            &conv.pads,
            conv.auto_pad,
        )?;
        vec![p[0].0, p[1].0, p[0].1, p[1].1]
    };
    let out_name = n.outputs[0].clone();
    let bias = n.input(2).map(str::to_string);
    let mut inits: Vec<(String, Tensor)> = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut add = |role: FactorRole,
                   op: Conv,
                   input: String,
                   weight: ArrayD<f32>,
                   bias: Option<String>,
                   last: bool| {
        let f = FactorName::node(&c.layer, kind, role);
        let wname = f.with(WEIGHT).to_string();
        let out = if last {
            out_name.clone()
        } else {
            f.with(OUT).to_string()
        };
        inits.push((wname.clone(), Tensor::F32(weight)));
        let mut inputs = vec![input, wname];
        if let Some(b) = bias {
            inputs.push(b);
        }
        nodes.push(Node {
            name: f.to_string(),
            op: Op::Conv(op),
            inputs,
            outputs: vec![out.clone()],
        });
        out
    };
    let mut err = None;
    if pointwise_layer {
        // SVD of a 1x1 conv: W[co, ci] ~= U2[co, r] U1[r, ci]. Scratch init gives the product
        // Kaiming's fan-out variance 2 / C_out: var(U1) = 1 / C_in, var(U2) = 2 C_in / (C_out r),
        // so var(W) = r var(U2) var(U1) = 2 / C_out (the Tucker-2 derivation with a 1x1 core).
        let rr = r[0];
        let u2_std = (2.0 * ci as f32 / (co * rr) as f32).sqrt();
        let (u1, u2, e) = svd_factors(opts, || weight4(graph, n), [co, ci, rr], u2_std, &mut rng)?;
        err = e;
        let u1 = u1.into_shape_with_order((rr, ci, 1, 1))?.into_dyn();
        let u2 = u2.into_shape_with_order((co, rr, 1, 1))?.into_dyn();
        let first = Conv {
            kernel_shape: Some(vec![1, 1]),
            strides: strides.clone(),
            pads: pads.clone(),
            dilations: dil.clone(),
            group: 1,
            auto_pad: AutoPad::NotSet,
        };
        let x1 = add(FactorRole::U1, first, n.inputs[0].clone(), u1, None, false);
        add(FactorRole::U2, pointwise(), x1, u2, bias, true);
        return Ok((nodes, inits, err));
    }
    match opts.format {
        Format::Tucker2 => {
            let (ri, ro) = (r[0], r[1]);
            let (u1, g, u2): (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) = match opts.init {
                InitMode::Scratch => (
                    gauss(&[ri, ci, 1, 1], (1.0 / ci as f32).sqrt(), &mut rng),
                    gauss(
                        &[ro, ri, kh, kw],
                        (1.0 / (ri * kh * kw) as f32).sqrt(),
                        &mut rng,
                    ),
                    gauss(
                        &[co, ro, 1, 1],
                        (2.0 * ci as f32 / (co * ro) as f32).sqrt(),
                        &mut rng,
                    ),
                ),
                InitMode::Orthogonal => {
                    let u1 = decompose::orthogonal(ci, ri, &mut rng);
                    let u2 = decompose::orthogonal(co, ro, &mut rng);
                    let std = (2.0 * ci as f32 / (ri * ro * kh * kw) as f32).sqrt();
                    (
                        u1.t()
                            .as_standard_layout()
                            .into_owned()
                            .into_shape_with_order((ri, ci, 1, 1))?
                            .into_dyn(),
                        gauss(&[ro, ri, kh, kw], std, &mut rng),
                        u2.into_shape_with_order((co, ro, 1, 1))?.into_dyn(),
                    )
                }
                InitMode::Decompose => {
                    let w = weight4(graph, n)?;
                    let t = decompose::hooi(w.view(), ri, ro, opts.hooi_iters, 1e-6)?;
                    err = Some(decompose::rel_error(
                        w.view(),
                        decompose::tucker2_compose(&t).view(),
                    ));
                    (
                        t.u1.t()
                            .as_standard_layout()
                            .into_owned()
                            .into_shape_with_order((ri, ci, 1, 1))?
                            .into_dyn(),
                        t.core.into_dyn(),
                        t.u2.into_shape_with_order((co, ro, 1, 1))?.into_dyn(),
                    )
                }
            };
            let x1 = add(
                FactorRole::U1,
                pointwise(),
                n.inputs[0].clone(),
                u1,
                None,
                false,
            );
            let core = Conv {
                kernel_shape: Some(vec![kh, kw]),
                strides: strides.clone(),
                pads: pads.clone(),
                dilations: dil.clone(),
                group: 1,
                auto_pad: AutoPad::NotSet,
            };
            let x2 = add(FactorRole::Core, core, x1, g, None, false);
            add(FactorRole::U2, pointwise(), x2, u2, bias, true);
        }
        Format::Cp => {
            let rr = r[0];
            let (u1, v, h, u2): (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) = match opts
                .init
            {
                InitMode::Scratch | InitMode::Orthogonal => {
                    let u1 = if opts.init == InitMode::Orthogonal && rr <= ci.max(rr) {
                        decompose::orthogonal(ci, rr, &mut rng)
                            .t()
                            .to_owned()
                            .into_shape_with_order((rr, ci, 1, 1))?
                            .into_dyn()
                    } else {
                        gauss(&[rr, ci, 1, 1], (1.0 / ci as f32).sqrt(), &mut rng)
                    };
                    (
                        u1,
                        gauss(&[rr, 1, kh, 1], (1.0 / kh as f32).sqrt(), &mut rng),
                        gauss(&[rr, 1, 1, kw], (1.0 / kw as f32).sqrt(), &mut rng),
                        gauss(
                            &[co, rr, 1, 1],
                            (2.0 * ci as f32 / (co * rr) as f32).sqrt(),
                            &mut rng,
                        ),
                    )
                }
                InitMode::Decompose => {
                    let w = weight4(graph, n)?;
                    let d = decompose::cp_als(w.view(), rr, opts.cp_iters, 1e-7, opts.seed ^ key)?;
                    err = Some(decompose::rel_error(
                        w.view(),
                        decompose::cp_compose(&d).view(),
                    ));
                    (
                        d.u1.t()
                            .as_standard_layout()
                            .into_owned()
                            .into_shape_with_order((rr, ci, 1, 1))?
                            .into_dyn(),
                        d.vert
                            .t()
                            .as_standard_layout()
                            .into_owned()
                            .into_shape_with_order((rr, 1, kh, 1))?
                            .into_dyn(),
                        d.horiz
                            .t()
                            .as_standard_layout()
                            .into_owned()
                            .into_shape_with_order((rr, 1, 1, kw))?
                            .into_dyn(),
                        d.u2.into_shape_with_order((co, rr, 1, 1))?.into_dyn(),
                    )
                }
            };
            let x1 = add(
                FactorRole::U1,
                pointwise(),
                n.inputs[0].clone(),
                u1,
                None,
                false,
            );
            let vert = Conv {
                kernel_shape: Some(vec![kh, 1]),
                strides: vec![strides[0], 1],
                pads: vec![pads[0], 0, pads[2], 0],
                dilations: vec![dil[0], 1],
                group: rr,
                auto_pad: AutoPad::NotSet,
            };
            let x2 = add(FactorRole::Vertical, vert, x1, v, None, false);
            let horiz = Conv {
                kernel_shape: Some(vec![1, kw]),
                strides: vec![1, strides[1]],
                pads: vec![0, pads[1], 0, pads[3]],
                dilations: vec![1, dil[1]],
                group: rr,
                auto_pad: AutoPad::NotSet,
            };
            let x3 = add(FactorRole::Horizontal, horiz, x2, h, None, false);
            add(FactorRole::U2, pointwise(), x3, u2, bias, true);
        }
    }
    Ok((nodes, inits, err))
}

/// A layer the rewrite may factorize, with the rank options a search can pick from.
#[derive(Clone, Debug)]
pub struct Eligible {
    pub layer: String,
    /// Index of the conv node in the graph it was found in.
    pub node: usize,
    pub weight: [usize; 4],
    pub params_dense: u64,
    /// Rank lists at uniform channel ratios 1/16 .. 15/16 (deduplicated, largest first), each
    /// with its (params, MACs); only those that save params or MACs.
    pub options: Vec<(Vec<usize>, u64, u64)>,
}

/// The layers `convert` would factorize under `opts` (its policy aside), for searches that
/// choose ranks by something the rewrite cannot compute itself, such as measured latency.
pub fn eligible_layers(
    graph: &Graph,
    facts: &Facts,
    opts: &ConvertOptions,
) -> Result<Vec<Eligible>> {
    let cands = candidates(graph, facts, opts)?;
    let mut out = Vec::new();
    for c in cands.iter().filter(|c| c.skip.is_none()) {
        let mut options: Vec<(Vec<usize>, u64, u64)> = Vec::new();
        for k in (1..16).rev() {
            let r = ratio_ranks(c, opts.format, k as f64 / 16.0, opts.rank_multiple);
            if options.iter().any(|o| o.0 == r) {
                continue;
            }
            let (p0, p1, m0, m1) = costs(c, opts.format, &r);
            if p1 < p0 || m1 < m0 {
                options.push((r, p1, m1));
            }
        }
        let (p0, _, _, _) = costs(c, opts.format, &[1, 1]);
        out.push(Eligible {
            layer: c.layer.clone(),
            node: c.node,
            weight: c.w,
            params_dense: p0,
            options,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod naming_tests {
    use super::module_path;

    /// TorchScript node names give PyTorch's module paths, whole: MobileNetV3's
    /// `block.0.0` convs of different blocks no longer share a name.
    #[test]
    fn module_paths_from_torchscript_node_names() {
        for (node, path) in [
            (
                "/features/features.1/block/block.0/block.0.0/Conv",
                "features.1.block.0.0",
            ),
            (
                "/features/features.2/block/block.0/block.0.0/Conv",
                "features.2.block.0.0",
            ),
            ("/layer1/layer1.1/conv1/Conv", "layer1.1.conv1"),
            ("/conv1/Conv", "conv1"),
            ("Conv_12", "Conv_12"),
        ] {
            assert_eq!(module_path(node), path);
        }
    }
}
