//! Parameters and multiply-accumulates per node, counted the way papers' tables count them.
//!
//! Params are the elements of trainable initializers: conv and Gemm/MatMul weights and biases,
//! BN scale and shift (not BN running statistics, which are state). MACs are those of
//! convolutions and matrix products only: a conv costs
//! N * C_out * H_out * W_out * (C_in / group) * kh * kw.

use std::collections::HashSet;

use serde::Serialize;

use super::shape::Facts;
use super::{Graph, Op};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerCost {
    pub name: String,
    pub op: String,
    pub output_shape: Vec<usize>,
    pub params: u64,
    pub macs: u64,
}

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Totals {
    pub params: u64,
    pub macs: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Cost {
    pub totals: Totals,
    pub layers: Vec<LayerCost>,
}

pub fn cost(graph: &Graph, facts: &Facts) -> Cost {
    let shape = |v: &str| facts.get(v).map(|f| f.shape.clone()).unwrap_or_default();
    let mut counted: HashSet<&str> = HashSet::new();
    let mut layers = Vec::with_capacity(graph.nodes.len());
    for n in &graph.nodes {
        let mut params = 0u64;
        for i in graph.param_slots(n) {
            if let Some(name) = n.input(i) {
                if let Some(t) = graph.initializers.get(name) {
                    if t.elem_type().is_float() && counted.insert(name) {
                        params += t.len() as u64;
                    }
                }
            }
        }
        let out = n.outputs.first().map(|o| shape(o)).unwrap_or_default();
        // Shape inference caps every tensor at this machine's memory, so these products stay
        // far below u64's range; saturating keeps an absurd graph from wrapping silently.
        let prod = |v: &[usize]| v.iter().fold(1u64, |a, &d| a.saturating_mul(d as u64));
        let out_elems = prod(&out);
        let macs = match &n.op {
            Op::Conv(_) => {
                let w = shape(&n.inputs[1]);
                out_elems.saturating_mul(prod(&w[1..]))
            }
            Op::Gemm(g) => {
                let a = shape(&n.inputs[0]);
                let k = if g.trans_a { a[0] } else { a[1] };
                out_elems.saturating_mul(k as u64)
            }
            Op::MatMul => {
                let a = shape(&n.inputs[0]);
                out_elems.saturating_mul(*a.last().unwrap_or(&1) as u64)
            }
            _ => 0,
        };
        layers.push(LayerCost {
            name: n.name.clone(),
            op: n.op.onnx_type().to_string(),
            output_shape: out,
            params,
            macs,
        });
    }
    let totals = Totals {
        params: layers.iter().fold(0u64, |a, l| a.saturating_add(l.params)),
        macs: layers.iter().fold(0u64, |a, l| a.saturating_add(l.macs)),
    };
    Cost { totals, layers }
}
