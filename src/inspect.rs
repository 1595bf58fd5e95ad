//! `elrt inspect`: per-layer output shape, params and MACs of a model, with totals.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::ir::cost::{cost, LayerCost, Totals};
use crate::ir::fold::{simplify, FoldOptions};
use crate::ir::shape::default_input_shapes;

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
    let dims: Vec<usize> = s
        .split([',', 'x'])
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

pub fn inspect(path: &Path, input_shapes: &[Vec<usize>]) -> Result<Report> {
    let mut g = crate::onnx::read_file(path)?;
    let shapes = if input_shapes.is_empty() {
        default_input_shapes(&g).with_context(|| path.display().to_string())?
    } else {
        input_shapes.to_vec()
    };
    let facts = simplify(
        &mut g,
        &shapes,
        FoldOptions {
            remove_dropout: true,
        },
    )
    .with_context(|| path.display().to_string())?;
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
