//! Equivalent forms of a factorized layer, and the pass that rewrites a layer into one.
//!
//! A Tucker-2 layer is three linear convs in a row: `u1` (1x1, C_in -> r_in), `core` (kxk,
//! r_in -> r_out, the layer's stride, pads and dilation) and `u2` (1x1, r_out -> C_out, bias).
//! Because nothing non-linear sits between them, neighbours can be multiplied together:
//!
//! | form          | convs                                 | MACs per output pixel              |
//! |---------------|---------------------------------------|------------------------------------|
//! | `factorized`  | u1, core, u2                          | C_in r_in + r_in r_out k² + r_out C_out |
//! | `merge-first` | (core·u1) kxk C_in->r_out, u2         | C_in r_out k² + r_out C_out        |
//! | `merge-last`  | u1, (u2·core) kxk r_in->C_out         | C_in r_in + r_in C_out k²          |
//! | `dense`       | (u2·core·u1) kxk C_in->C_out          | C_in C_out k²                      |
//!
//! (`u1` runs at the input resolution, so with stride 2 its cost is 4x larger per output pixel
//! than the table's first term; the pass does not need the numbers, the chooser measures.)
//! Fewer MACs do not always mean less time: a runtime may run one big conv faster than three
//! thin ones, which is why the export measures (see `choose.rs`).
//!
//! A CP layer (`u1` 1x1, `vertical` kx1 depthwise, `horizontal` 1xk depthwise, `u2` 1x1) has
//! two forms here: `factorized` and `dense` (the rebuilt kernel).
//!
//! Merging across a padded conv is exact only when what enters the padding is zero, so `u1`
//! must have no bias (or a zero one) for `merge-first` and `dense`; a bias of the core moves
//! into `u2`'s bias (`b2 + U2 b_core`) exactly, since u2 is pointwise.

use anyhow::{anyhow, bail, Result};
use ndarray::{Array2, ArrayD, Ix2, IxDyn};

use crate::ir::ops::{AutoPad, Conv};
use crate::ir::{Graph, Node, Op, Tensor};
use crate::lowrank::naming::{FactorKind, FactorName, FactorRole, OUT};

use super::fold_bn::fresh;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    Factorized,
    MergeFirst,
    MergeLast,
    Dense,
}

impl Form {
    pub fn name(self) -> &'static str {
        match self {
            Form::Factorized => "factorized",
            Form::MergeFirst => "merge-first",
            Form::MergeLast => "merge-last",
            Form::Dense => "dense",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChainKind {
    Tucker2,
    Cp,
    /// Two 1x1 convs in a row (a 1x1 conv's SVD, or a linear bottleneck after BN folding).
    Svd,
}

impl ChainKind {
    /// The kind of factor names a chain of this kind carries.
    pub fn factor_kind(self) -> FactorKind {
        match self {
            ChainKind::Tucker2 => FactorKind::Tucker2,
            ChainKind::Cp => FactorKind::Cp,
            ChainKind::Svd => FactorKind::Svd,
        }
    }
}

/// A factorized layer found in a graph: the indices of its convs, first to last.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    pub kind: ChainKind,
    /// Source layer name (the first node's name with its `/tucker2/...`, `/cp/...` or `/svd/...`
    /// part removed, [`FactorName`]), or the first node's name when it says nothing.
    pub layer: String,
    pub nodes: Vec<String>,
}

impl Chain {
    pub fn forms(&self, g: &Graph) -> Vec<Form> {
        let u1_bias_free = self
            .conv_nodes(g)
            .ok()
            .map(|n| bias_is_zero(g, n[0]))
            .unwrap_or(false);
        let mut v = vec![Form::Factorized];
        match self.kind {
            ChainKind::Tucker2 => {
                if u1_bias_free {
                    v.push(Form::MergeFirst);
                }
                v.push(Form::MergeLast);
                if u1_bias_free {
                    v.push(Form::Dense);
                }
            }
            ChainKind::Svd => v.push(Form::Dense),
            ChainKind::Cp => {
                if self
                    .conv_nodes(g)
                    .map(|n| n[..3].iter().all(|x| bias_is_zero(g, x)))
                    .unwrap_or(false)
                {
                    v.push(Form::Dense);
                }
            }
        }
        v
    }

    fn conv_nodes<'a>(&self, g: &'a Graph) -> Result<Vec<&'a Node>> {
        self.nodes
            .iter()
            .map(|n| {
                g.node(n)
                    .ok_or_else(|| anyhow!("node '{n}' of layer '{}' is gone", self.layer))
            })
            .collect()
    }
}

fn conv(n: &Node) -> Option<&Conv> {
    match &n.op {
        Op::Conv(c) => Some(c),
        _ => None,
    }
}

fn all_one(v: &[usize]) -> bool {
    v.iter().all(|&x| x == 1)
}

fn all_zero(v: &[usize]) -> bool {
    v.iter().all(|&x| x == 0)
}

fn weight<'a>(g: &'a Graph, n: &Node) -> Option<&'a ArrayD<f32>> {
    g.initializers.get(n.inputs.get(1)?)?.as_f32()
}

/// A plain pointwise conv: 1x1 kernel, stride 1, no padding, group 1, weight an initializer.
fn is_pointwise(g: &Graph, n: &Node) -> bool {
    let Some(c) = conv(n) else { return false };
    let Some(w) = weight(g, n) else { return false };
    w.ndim() == 4
        && w.shape()[2..] == [1, 1]
        && c.group == 1
        && all_one(&c.strides)
        && all_zero(&c.pads)
        && c.auto_pad == AutoPad::NotSet
}

fn bias_is_zero(g: &Graph, n: &Node) -> bool {
    match n.input(2) {
        None => true,
        Some(b) => g
            .initializers
            .get(b)
            .and_then(Tensor::as_f32)
            .is_some_and(|t| t.iter().all(|&v| v == 0.0)),
    }
}

fn bias_of(g: &Graph, n: &Node, len: usize) -> Result<Vec<f32>> {
    match n.input(2) {
        None => Ok(vec![0.0; len]),
        Some(b) => g
            .initializers
            .get(b)
            .and_then(Tensor::as_f32)
            .map(|t| t.iter().copied().collect())
            .ok_or_else(|| anyhow!("node '{}': bias '{b}' is not an initializer", n.name)),
    }
}

/// The source layer of a chain whose first node is `names[0]`, when that node is named as a
/// factor of `kind` ([`FactorName`]), else the node's own name.
fn layer_of(names: &[&str], kind: FactorKind) -> String {
    FactorName::parse(names[0])
        .filter(|f| f.kind == kind)
        .map_or(names[0], |f| f.layer)
        .to_string()
}

/// Finds every Tucker-2 and CP chain: consecutive convs linked by values used once, with the
/// shapes described in the module doc.
pub fn find_chains(g: &Graph) -> Vec<Chain> {
    let producers = g.producers();
    let uses = g.use_counts();
    // The producer of a conv's input, when that value feeds nothing else.
    let prev = |n: &Node| -> Option<usize> {
        let v = n.inputs[0].as_str();
        let p = *producers.get(v)?;
        (uses.get(v) == Some(&1) && !g.outputs.iter().any(|o| o.name == v)).then_some(p)
    };
    let mut chains = Vec::new();
    for last in &g.nodes {
        if !is_pointwise(g, last) {
            continue;
        }
        let Some(m) = prev(last) else { continue };
        let mid = &g.nodes[m];
        let Some(mc) = conv(mid) else { continue };
        let Some(mw) = weight(g, mid) else { continue };
        if mw.ndim() != 4 {
            continue;
        }
        // SVD pair: a 1x1 group-1 conv (any stride) -> pointwise. Its bias is exact to merge
        // even with padding: a padded position of the first conv holds its bias alone.
        if mc.group == 1 && mw.shape()[2] * mw.shape()[3] == 1 && mc.auto_pad == AutoPad::NotSet {
            let names = [mid.name.as_str(), &last.name];
            chains.push(Chain {
                kind: ChainKind::Svd,
                layer: layer_of(&names, FactorKind::Svd),
                nodes: names.iter().map(|s| s.to_string()).collect(),
            });
            continue;
        }
        // Tucker-2: pointwise -> kxk group 1 -> pointwise.
        if mc.group == 1 && mw.shape()[2] * mw.shape()[3] > 1 {
            if let Some(f) = prev(mid) {
                if is_pointwise(g, &g.nodes[f]) {
                    let names = [g.nodes[f].name.as_str(), &mid.name, &last.name];
                    chains.push(Chain {
                        kind: ChainKind::Tucker2,
                        layer: layer_of(&names, FactorKind::Tucker2),
                        nodes: names.iter().map(|s| s.to_string()).collect(),
                    });
                }
            }
            continue;
        }
        // CP: pointwise -> kx1 depthwise -> 1xk depthwise -> pointwise.
        let (r, kh, kw) = (mw.shape()[0], mw.shape()[2], mw.shape()[3]);
        if mc.group == r && mw.shape()[1] == 1 && kh == 1 && kw > 1 {
            let Some(v) = prev(mid) else { continue };
            let vn = &g.nodes[v];
            let (Some(vc), Some(vw)) = (conv(vn), weight(g, vn)) else {
                continue;
            };
            if vc.group == r && vw.shape() == [r, 1, vw.shape()[2], 1] && vw.shape()[2] > 1 {
                if let Some(f) = prev(vn) {
                    if is_pointwise(g, &g.nodes[f]) {
                        let names = [g.nodes[f].name.as_str(), &vn.name, &mid.name, &last.name];
                        chains.push(Chain {
                            kind: ChainKind::Cp,
                            layer: layer_of(&names, FactorKind::Cp),
                            nodes: names.iter().map(|s| s.to_string()).collect(),
                        });
                    }
                }
            }
        }
    }
    // A pointwise conv may end one chain and start another (u2 -> next u1 with nothing
    // between): the Tucker-2 and CP chains win, SVD pairs that overlap them or an earlier
    // pair are dropped.
    let mut used: std::collections::HashSet<String> = chains
        .iter()
        .filter(|c| c.kind != ChainKind::Svd)
        .flat_map(|c| c.nodes.iter().cloned())
        .collect();
    chains.retain(|c| {
        if c.kind != ChainKind::Svd {
            return true;
        }
        if c.nodes.iter().any(|n| used.contains(n)) {
            return false;
        }
        used.extend(c.nodes.iter().cloned());
        true
    });
    chains
}

fn mat(a: &ArrayD<f32>, rows: usize, cols: usize) -> Result<Array2<f32>> {
    Ok(a.as_standard_layout()
        .into_owned()
        .into_shape_with_order((rows, cols))?
        .into_dimensionality::<Ix2>()?)
}

/// `K[o, ci, kh, kw] = sum_a G[o, a, kh, kw] W1[a, ci]`.
fn merge_first_kernel(gk: &ArrayD<f32>, w1: &Array2<f32>) -> Result<ArrayD<f32>> {
    let (o, a, kh, kw) = (gk.shape()[0], gk.shape()[1], gk.shape()[2], gk.shape()[3]);
    let ci = w1.shape()[1];
    // [o, a, kh, kw] -> [o, kh, kw, a] -> [o kh kw, a] @ [a, ci] -> [o, kh, kw, ci] -> [o, ci, kh, kw]
    let g2 = gk.view().permuted_axes(IxDyn(&[0, 2, 3, 1]));
    let g2 = mat(&g2.to_owned(), o * kh * kw, a)?;
    let k = g2.dot(w1);
    let k = k.into_shape_with_order(IxDyn(&[o, kh, kw, ci]))?;
    Ok(k.permuted_axes(IxDyn(&[0, 3, 1, 2]))
        .as_standard_layout()
        .into_owned())
}

/// `K[co, a, kh, kw] = sum_b W2[co, b] G[b, a, kh, kw]`.
fn merge_last_kernel(w2: &Array2<f32>, gk: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    let s = gk.shape().to_vec();
    let g2 = mat(gk, s[0], s[1] * s[2] * s[3])?;
    let k = w2.dot(&g2);
    Ok(k.into_shape_with_order(IxDyn(&[w2.shape()[0], s[1], s[2], s[3]]))?)
}

fn add_conv(
    g: &mut Graph,
    name: &str,
    op: Conv,
    input: &str,
    w: ArrayD<f32>,
    bias: Option<Vec<f32>>,
    output: &str,
) -> Result<Node> {
    let wname = fresh(g, &format!("{name}.weight"));
    g.initializers.insert(wname.clone(), Tensor::F32(w));
    let mut inputs = vec![input.to_string(), wname];
    if let Some(b) = bias {
        let bname = fresh(g, &format!("{name}.bias"));
        let n = b.len();
        g.initializers.insert(
            bname.clone(),
            Tensor::F32(ArrayD::from_shape_vec(IxDyn(&[n]), b)?),
        );
        inputs.push(bname);
    }
    Ok(Node {
        name: name.to_string(),
        op: Op::Conv(op),
        inputs,
        outputs: vec![output.to_string()],
    })
}

fn pad4(v: &[usize]) -> Vec<usize> {
    if v.is_empty() {
        vec![0; 4]
    } else {
        v.to_vec()
    }
}

fn one2(v: &[usize]) -> Vec<usize> {
    if v.is_empty() {
        vec![1, 1]
    } else {
        v.to_vec()
    }
}

/// Rewrites `chain` in `g` into `form`. The chain's convs are replaced in place (the new nodes
/// take the position of the first one), so the graph stays topologically ordered.
pub fn apply(g: &mut Graph, chain: &Chain, form: Form) -> Result<()> {
    if form == Form::Factorized {
        return Ok(());
    }
    if !chain.forms(g).contains(&form) {
        bail!(
            "layer '{}': form {} is not exact here (a bias before a padded conv)",
            chain.layer,
            form.name()
        );
    }
    let nodes: Vec<Node> = chain.conv_nodes(g)?.into_iter().cloned().collect();
    let first = &nodes[0];
    let last = &nodes[nodes.len() - 1];
    let w = |n: &Node| -> Result<ArrayD<f32>> {
        weight(g, n)
            .cloned()
            .ok_or_else(|| anyhow!("node '{}': weight is not an initializer", n.name))
    };
    let w1 = w(first)?;
    let w1 = mat(&w1, w1.shape()[0], w1.shape()[1])?;
    let w2 = w(last)?;
    let w2 = mat(&w2, w2.shape()[0], w2.shape()[1])?;
    let b2 = bias_of(g, last, w2.shape()[0])?;
    let merged = |role| FactorName::node(&chain.layer, chain.kind.factor_kind(), role);
    let new_nodes: Vec<Node> = match chain.kind {
        ChainKind::Svd => {
            // W = W2 W1 with u1's stride and pads; bias b2 + W2 b1.
            let c = conv(first).expect("chain of convs").clone();
            let b1 = bias_of(g, first, w1.shape()[0])?;
            let extra = w2.dot(&ndarray::Array1::from(b1));
            let bias: Vec<f32> = b2.iter().zip(extra.iter()).map(|(a, b)| a + b).collect();
            let k = w2.dot(&w1);
            let (co, ci) = (k.shape()[0], k.shape()[1]);
            let k = k.into_shape_with_order(IxDyn(&[co, ci, 1, 1]))?;
            vec![add_conv(
                g,
                &format!("{}/dense", chain.layer),
                c,
                &first.inputs[0],
                k,
                Some(bias),
                &last.outputs[0],
            )?]
        }
        ChainKind::Tucker2 => {
            let core = &nodes[1];
            let c = conv(core).expect("chain of convs").clone();
            let gk = w(core)?;
            let bc = bias_of(g, core, gk.shape()[0])?;
            // u2 (b2 + W2 bc) absorbs the core's bias when the core merges into it.
            let b_last: Vec<f32> = {
                let extra = w2.dot(&ndarray::Array1::from(bc.clone()));
                b2.iter().zip(extra.iter()).map(|(a, b)| a + b).collect()
            };
            let core_bias = core.input(2).map(|_| bc.clone());
            match form {
                Form::MergeFirst => {
                    let k = merge_first_kernel(&gk, &w1)?;
                    let mut c1 = c.clone();
                    c1.kernel_shape = None;
                    let mid = merged(FactorRole::U1Core).with(OUT).to_string();
                    let n1 = add_conv(
                        g,
                        &merged(FactorRole::U1Core).to_string(),
                        c1,
                        &first.inputs[0],
                        k,
                        core_bias,
                        &mid,
                    )?;
                    let mut n2 = last.clone();
                    n2.inputs[0] = mid;
                    vec![n1, n2]
                }
                Form::MergeLast => {
                    let k = merge_last_kernel(&w2, &gk)?;
                    let n2 = add_conv(
                        g,
                        &merged(FactorRole::CoreU2).to_string(),
                        c.clone(),
                        &core.inputs[0],
                        k,
                        Some(b_last),
                        &last.outputs[0],
                    )?;
                    vec![first.clone(), n2]
                }
                Form::Dense => {
                    let k = merge_last_kernel(&w2, &gk)?;
                    let k = merge_first_kernel(&k, &w1)?;
                    vec![add_conv(
                        g,
                        &format!("{}/dense", chain.layer),
                        c.clone(),
                        &first.inputs[0],
                        k,
                        Some(b_last),
                        &last.outputs[0],
                    )?]
                }
                Form::Factorized => unreachable!(),
            }
        }
        ChainKind::Cp => {
            let (vn, hn) = (&nodes[1], &nodes[2]);
            let (vc, hc) = (conv(vn).expect("conv"), conv(hn).expect("conv"));
            let (vs, hs) = (one2(&vc.strides), one2(&hc.strides));
            let (vp, hp) = (pad4(&vc.pads), pad4(&hc.pads));
            let (vd, hd) = (one2(&vc.dilations), one2(&hc.dilations));
            if vs[1] != 1 || hs[0] != 1 || vp[1] != 0 || vp[3] != 0 || hp[0] != 0 || hp[2] != 0 {
                bail!(
                    "layer '{}': the depthwise pair strides or pads across both axes",
                    chain.layer
                );
            }
            if vc.auto_pad != AutoPad::NotSet || hc.auto_pad != AutoPad::NotSet {
                bail!("layer '{}': auto_pad on a CP factor", chain.layer);
            }
            let v = w(vn)?;
            let h = w(hn)?;
            let (r, kh, kw) = (v.shape()[0], v.shape()[2], h.shape()[3]);
            let (co, ci) = (w2.shape()[0], w1.shape()[1]);
            // Core as a Tucker-2 core with r_in = r_out = r: G[b, a] = delta(a, b) V[a] H[a].
            let mut gk = ArrayD::<f32>::zeros(IxDyn(&[r, r, kh, kw]));
            for a in 0..r {
                for y in 0..kh {
                    for x in 0..kw {
                        gk[[a, a, y, x]] = v[[a, 0, y, 0]] * h[[a, 0, 0, x]];
                    }
                }
            }
            let k = merge_last_kernel(&w2, &gk)?;
            let k = merge_first_kernel(&k, &w1)?;
            debug_assert_eq!(k.shape(), [co, ci, kh, kw]);
            let op = Conv {
                kernel_shape: None,
                strides: vec![vs[0], hs[1]],
                pads: vec![vp[0], hp[1], vp[2], hp[3]],
                dilations: vec![vd[0], hd[1]],
                group: 1,
                auto_pad: AutoPad::NotSet,
            };
            let bias = last.input(2).map(|_| b2.clone());
            vec![add_conv(
                g,
                &format!("{}/dense", chain.layer),
                op,
                &first.inputs[0],
                k,
                bias,
                &last.outputs[0],
            )?]
        }
    };
    let pos = g
        .nodes
        .iter()
        .position(|n| n.name == first.name)
        .expect("chain node present");
    g.nodes.retain(|n| !chain.nodes.contains(&n.name));
    for (k, n) in new_nodes.into_iter().enumerate() {
        g.nodes.insert(pos + k, n);
    }
    g.prune();
    Ok(())
}
