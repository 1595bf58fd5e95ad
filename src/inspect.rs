//! `elrt inspect`: per-layer output shape, params and MACs of a model, with totals.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::ir::cost::{cost, LayerCost, Totals};
use crate::ir::fold::{simplify, FoldOptions};
use crate::ir::shape::{default_input_shapes, Facts};
use crate::ir::Graph;
use crate::lowrank::naming::FactorName;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub file: String,
    pub opset: i64,
    pub input_shapes: Vec<Vec<usize>>,
    pub totals: Totals,
    pub layers: Vec<LayerCost>,
}

/// Parses `1,3,32,32` (also `1x3x32x32`).
pub fn parse_shape(s: &str) -> Result<Vec<usize>> {
    // Commas, or `x` when there are none ("1,3,x,32" is a bad dimension 'x', not two empty ones).
    let sep = if s.contains(',') { ',' } else { 'x' };
    let dims: Vec<usize> = s
        .split(sep)
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("--input-shape '{s}': '{p}' is not a dimension"))
        })
        .collect::<Result<_>>()?;
    if dims.is_empty() || dims.contains(&0) {
        bail!("--input-shape '{s}': dimensions must be positive");
    }
    Ok(dims)
}

/// Reads a model and simplifies it for `input_shapes` (the file's own, batch 1, when empty).
/// Returns the graph, the shapes used and the facts of the simplified graph.
pub fn load_simplified(
    path: &Path,
    input_shapes: &[Vec<usize>],
    remove_dropout: bool,
) -> Result<(Graph, Vec<Vec<usize>>, Facts)> {
    let mut g = crate::onnx::read_file(path)?;
    let shapes = if input_shapes.is_empty() {
        default_input_shapes(&g).with_context(|| path.display().to_string())?
    } else {
        input_shapes.to_vec()
    };
    let facts = simplify(&mut g, &shapes, FoldOptions { remove_dropout })
        .with_context(|| path.display().to_string())?;
    Ok((g, shapes, facts))
}

pub fn inspect(path: &Path, input_shapes: &[Vec<usize>]) -> Result<Report> {
    let (g, shapes, facts) = load_simplified(path, input_shapes, true)?;
    let c = cost(&g, &facts);
    Ok(Report {
        file: path.display().to_string(),
        opset: g.opset,
        input_shapes: shapes,
        totals: c.totals,
        layers: c.layers,
    })
}

/// Thousands separators, for tables people read.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn fmt_shape(s: &[usize]) -> String {
    let parts: Vec<String> = s.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(", "))
}

impl Report {
    pub fn to_text(&self) -> String {
        let shapes: Vec<String> = self.input_shapes.iter().map(|s| fmt_shape(s)).collect();
        let mut rows: Vec<[String; 5]> = vec![[
            "name".into(),
            "op".into(),
            "output shape".into(),
            "params".into(),
            "MACs".into(),
        ]];
        for l in &self.layers {
            rows.push([
                l.name.clone(),
                l.op.clone(),
                fmt_shape(&l.output_shape),
                group_digits(l.params),
                group_digits(l.macs),
            ]);
        }
        rows.push([
            "total".into(),
            String::new(),
            String::new(),
            group_digits(self.totals.params),
            group_digits(self.totals.macs),
        ]);
        let mut w = [0usize; 5];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut out = format!(
            "{} (opset {}, input {})\n",
            self.file,
            self.opset,
            shapes.join(", ")
        );
        let last = rows.len() - 1;
        for (k, r) in rows.iter().enumerate() {
            if k == last {
                out.push_str(&"-".repeat(w.iter().sum::<usize>() + 8));
                out.push('\n');
            }
            out.push_str(&format!(
                "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}\n",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4]
            ));
        }
        out
    }
}

/// One source layer of two models side by side (`inspect A --compare B`).
#[derive(Clone, Debug, Serialize)]
pub struct LayerPair {
    pub layer: String,
    pub params_a: u64,
    pub params_b: u64,
    pub macs_a: u64,
    pub macs_b: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub layers: Vec<LayerPair>,
    pub totals_a: Totals,
    pub totals_b: Totals,
}

/// The source layer a node's parameters belong to: its first parameter's name with the
/// low-rank suffix (`/tucker2/...`, `/cp/...`, `/svd/...`) and `.weight`/`.bias` removed, so
/// the factors of a converted layer group under the layer they replace.
fn source_layer(graph: &crate::ir::Graph, node: &crate::ir::Node) -> Option<String> {
    let name = graph
        .param_slots(node)
        .into_iter()
        .filter_map(|i| node.input(i))
        .find(|n| graph.initializers.contains_key(*n))?;
    Some(source_layer_of_param(name).to_string())
}

/// A parameter's source layer: a factor's layer ([`FactorName::source_layer`]), else the name
/// without `.weight`/`.bias`.
fn source_layer_of_param(name: &str) -> &str {
    match FactorName::parse(name) {
        Some(f) => f.source_layer(),
        None => name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name),
    }
}

/// (source layer, params, MACs) in graph order.
type LayerCosts = Vec<(String, u64, u64)>;

fn grouped(path: &Path, shapes: &[Vec<usize>]) -> Result<(LayerCosts, Totals)> {
    let (g, _, facts) = load_simplified(path, shapes, true)?;
    let c = cost(&g, &facts);
    let mut out: LayerCosts = Vec::new();
    for (n, l) in g.nodes.iter().zip(&c.layers) {
        if l.params == 0 && l.macs == 0 {
            continue;
        }
        let key = source_layer(&g, n).unwrap_or_else(|| n.name.clone());
        match out.iter_mut().find(|(k, _, _)| *k == key) {
            Some(e) => {
                e.1 += l.params;
                e.2 += l.macs;
            }
            None => out.push((key, l.params, l.macs)),
        }
    }
    Ok((out, c.totals))
}

/// Per source layer and in total, the params and MACs of `a` (e.g. the original) and `b`
/// (e.g. its factorized conversion).
pub fn compare(a: &Path, b: &Path, shapes: &[Vec<usize>]) -> Result<Comparison> {
    let (la, ta) = grouped(a, shapes)?;
    let (lb, tb) = grouped(b, shapes)?;
    let mut layers: Vec<LayerPair> = la
        .iter()
        .map(|(k, p, m)| {
            let other = lb.iter().find(|(kb, _, _)| kb == k);
            LayerPair {
                layer: k.clone(),
                params_a: *p,
                macs_a: *m,
                params_b: other.map_or(0, |o| o.1),
                macs_b: other.map_or(0, |o| o.2),
            }
        })
        .collect();
    for (k, p, m) in &lb {
        if !la.iter().any(|(ka, _, _)| ka == k) {
            layers.push(LayerPair {
                layer: k.clone(),
                params_a: 0,
                macs_a: 0,
                params_b: *p,
                macs_b: *m,
            });
        }
    }
    Ok(Comparison {
        a: a.display().to_string(),
        b: b.display().to_string(),
        layers,
        totals_a: ta,
        totals_b: tb,
    })
}

impl Comparison {
    pub fn to_text(&self) -> String {
        let ratio = |x: u64, y: u64| {
            if y == 0 {
                "-".to_string()
            } else {
                format!("{:.2}x", x as f64 / y as f64)
            }
        };
        let mut rows = vec![[
            "layer".to_string(),
            "params A".into(),
            "params B".into(),
            "A/B".into(),
            "MACs A".into(),
            "MACs B".into(),
            "A/B".into(),
        ]];
        let mut push = |name: String, pa: u64, pb: u64, ma: u64, mb: u64| {
            rows.push([
                name,
                group_digits(pa),
                group_digits(pb),
                ratio(pa, pb),
                group_digits(ma),
                group_digits(mb),
                ratio(ma, mb),
            ])
        };
        for l in &self.layers {
            push(l.layer.clone(), l.params_a, l.params_b, l.macs_a, l.macs_b);
        }
        push(
            "total".into(),
            self.totals_a.params,
            self.totals_b.params,
            self.totals_a.macs,
            self.totals_b.macs,
        );
        let mut w = [0usize; 7];
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.len());
            }
        }
        let mut out = format!("A = {}\nB = {}\n", self.a, self.b);
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i == 0 {
                        format!("{c:<width$}", width = w[i])
                    } else {
                        format!("{c:>width$}", width = w[i])
                    }
                })
                .collect();
            out.push_str(&cells.join("  "));
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::source_layer_of_param;

    #[test]
    fn factors_group_under_the_layer_they_replace() {
        for (param, layer) in [
            ("layer1.0.conv1.weight", "layer1.0.conv1"),
            ("fc.bias", "fc"),
            ("layer1.0.conv1/tucker2/core.weight", "layer1.0.conv1"),
            ("layer1.0.conv1/tucker2/u1_core.bias", "layer1.0.conv1"),
            ("layer2.0.conv2/cp/vertical.weight", "layer2.0.conv2"),
            ("fc/svd/u1.weight", "fc"),
            ("features.1.conv.0/svd/u2.weight", "features.1.conv.0"),
            ("onnx::Conv_212", "onnx::Conv_212"),
        ] {
            assert_eq!(source_layer_of_param(param), layer, "{param}");
        }
    }
}
