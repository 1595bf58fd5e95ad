//! Training checkpoints: one file holding the parameters, BN statistics, optimiser state and
//! the position in the run, written atomically so a crash never leaves a torn checkpoint.
//!
//! Layout: `ELRTCKPT1\n`, a little-endian u64 header length, a JSON header, then the tensors
//! as raw little-endian f32 in header order.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ndarray::{ArrayD, IxDyn};
use serde::{Deserialize, Serialize};

use super::optim::Optimizer;
use crate::engine::program::Program;

const MAGIC: &[u8] = b"ELRTCKPT1\n";

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    shape: Vec<usize>,
}

/// Where a run stands, with anything the caller wants to keep (config, metrics).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Position {
    /// Epochs completed.
    pub epoch: u64,
    /// Batches of the current epoch already trained (0 at an epoch boundary).
    pub batch: usize,
    /// Optimiser steps taken in total.
    pub step: u64,
}

#[derive(Serialize, Deserialize)]
struct Header {
    position: Position,
    optimizer: Optimizer,
    params: Vec<Entry>,
    state: Vec<Entry>,
    /// Optimiser moment buffers, one per parameter (empty when not yet allocated).
    moments: Vec<usize>,
    extra: serde_json::Value,
}

pub struct Checkpoint {
    pub position: Position,
    pub optimizer: Optimizer,
    pub extra: serde_json::Value,
}

/// Saves the program's tensors and the optimiser with the run position.
pub fn save(
    path: &Path,
    program: &Program,
    optimizer: &Optimizer,
    position: &Position,
    extra: serde_json::Value,
) -> Result<()> {
    let (m, v) = optimizer.state();
    let mut opt = optimizer.clone();
    opt.set_state(optimizer.steps, Vec::new(), Vec::new());
    let header = Header {
        position: position.clone(),
        optimizer: opt,
        params: program
            .params
            .iter()
            .map(|p| Entry {
                name: p.name.clone(),
                shape: p.value.shape().to_vec(),
            })
            .collect(),
        state: program
            .state
            .iter()
            .map(|(n, a)| Entry {
                name: n.clone(),
                shape: a.shape().to_vec(),
            })
            .collect(),
        moments: vec![m.len(), v.len()],
        extra,
    };
    let json = serde_json::to_vec(&header)?;
    let mut out = Vec::with_capacity(json.len() + 64);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    let mut push = |data: &mut dyn Iterator<Item = f32>| {
        for x in data {
            out.extend_from_slice(&x.to_le_bytes());
        }
    };
    for p in &program.params {
        push(&mut p.value.iter().copied());
    }
    for (_, a) in &program.state {
        push(&mut a.iter().copied());
    }
    for buf in m.iter().chain(v.iter()) {
        push(&mut buf.iter().copied());
    }
    crate::util::write_atomic(path, &out)
}

/// Loads a checkpoint into `program` (whose parameters must have the same names and shapes).
pub fn load(path: &Path, program: &mut Program) -> Result<Checkpoint> {
    let what = || path.display().to_string();
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", what()))?;
    if !bytes.starts_with(MAGIC) || bytes.len() < MAGIC.len() + 8 {
        bail!("{}: not an elrt checkpoint", what());
    }
    let hlen = u64::from_le_bytes(
        bytes[MAGIC.len()..MAGIC.len() + 8]
            .try_into()
            .expect("8 bytes"),
    ) as usize;
    let start = MAGIC.len() + 8;
    if bytes.len() < start + hlen {
        bail!("{}: truncated checkpoint", what());
    }
    let header: Header = serde_json::from_slice(&bytes[start..start + hlen])
        .with_context(|| format!("{}: corrupt checkpoint header", what()))?;
    let same = header.params.len() == program.params.len()
        && header
            .params
            .iter()
            .zip(&program.params)
            .all(|(e, p)| e.name == p.name && e.shape == p.value.shape())
        && header.state.len() == program.state.len();
    if !same {
        bail!(
            "{}: the checkpoint belongs to a different model (its parameters differ from this model's)",
            what()
        );
    }
    let mut data = bytes[start + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")));
    let mut take = |shape: &[usize]| -> Result<ArrayD<f32>> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = data.by_ref().take(n).collect();
        if v.len() != n {
            bail!("{}: truncated checkpoint data", what());
        }
        Ok(ArrayD::from_shape_vec(IxDyn(shape), v).expect("length checked"))
    };
    for (e, p) in header.params.iter().zip(program.params.iter_mut()) {
        p.value = take(&e.shape)?;
    }
    for (e, s) in header.state.iter().zip(program.state.iter_mut()) {
        s.1 = take(&e.shape)?;
    }
    let shapes: Vec<Vec<usize>> = program
        .params
        .iter()
        .map(|p| p.value.shape().to_vec())
        .collect();
    let mut m = Vec::new();
    let mut v = Vec::new();
    if header.moments.first().copied().unwrap_or(0) > 0 {
        for s in &shapes {
            m.push(take(s)?);
        }
    }
    if header.moments.get(1).copied().unwrap_or(0) > 0 {
        for s in &shapes {
            v.push(take(s)?);
        }
    }
    let mut optimizer = header.optimizer;
    let steps = optimizer.steps;
    optimizer.set_state(steps, m, v);
    Ok(Checkpoint {
        position: header.position,
        optimizer,
        extra: header.extra,
    })
}
