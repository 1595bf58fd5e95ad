//! ONNX external data: tensors whose bytes live in a side file next to the model.
//!
//! PyTorch's default (dynamo) exporter writes every weight to `model.onnx.data` and leaves in
//! the model only `external_data` entries: `location` (a path relative to the model's folder),
//! `offset` and `length` in bytes (both optional: the whole file from 0). The spec:
//! <https://onnx.ai/onnx/repo-docs/ExternalData.html>. Reading them here, before the graph is
//! decoded, gives every later stage ordinary `raw_data` tensors; elrt writes its own files with
//! the weights inline (compact models are small, far below protobuf's 2 GB limit).
//!
//! A location must stay inside the model's folder (no absolute path, no `..`), as onnx's
//! checker requires, so a crafted model cannot make elrt read an arbitrary file.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use onnx_protobuf::{tensor_proto::DataLocation, ModelProto, TensorProto};

/// Whether a tensor's data is stored outside the model.
pub fn is_external(t: &TensorProto) -> bool {
    t.data_location.enum_value() == Ok(DataLocation::EXTERNAL) || !t.external_data.is_empty()
}

/// The side files read so far, each once, by location.
struct Files<'a> {
    dir: &'a Path,
    cache: HashMap<String, Vec<u8>>,
}

impl Files<'_> {
    fn bytes(&mut self, location: &str) -> Result<&[u8]> {
        if !self.cache.contains_key(location) {
            let path = self.resolve(location)?;
            let data = std::fs::read(&path).with_context(|| {
                format!(
                    "cannot read its external data file {} (it must sit beside the model, as the exporter wrote it)",
                    path.display()
                )
            })?;
            self.cache.insert(location.to_string(), data);
        }
        Ok(&self.cache[location])
    }

    fn resolve(&self, location: &str) -> Result<PathBuf> {
        let rel = Path::new(location);
        let inside = !location.is_empty()
            && rel
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !inside {
            bail!("external data location '{location}' must be a relative path inside the model's folder");
        }
        Ok(self.dir.join(rel))
    }
}

/// Moves the bytes of every external tensor (initializers and Constant node values) into its
/// `raw_data`, reading locations relative to `dir`. Errors name the tensor.
pub fn load(model: &mut ModelProto, dir: &Path) -> Result<()> {
    let Some(g) = model.graph.as_mut() else {
        return Ok(());
    };
    let mut files = Files {
        dir,
        cache: HashMap::new(),
    };
    for t in g.initializer.iter_mut() {
        if is_external(t) {
            let name = t.name.clone();
            inline(t, &mut files).with_context(|| format!("initializer '{name}'"))?;
        }
    }
    for n in g.node.iter_mut() {
        for a in n.attribute.iter_mut() {
            if let Some(t) = a.t.as_mut() {
                if is_external(t) {
                    let what = format!("node '{}' attribute '{}'", n.name, a.name);
                    inline(t, &mut files).with_context(|| what)?;
                }
            }
        }
    }
    Ok(())
}

fn inline(t: &mut TensorProto, files: &mut Files) -> Result<()> {
    let mut location = None;
    let mut offset = 0usize;
    let mut length = None;
    for e in &t.external_data {
        let num = |v: &str| -> Result<usize> {
            v.trim()
                .parse::<usize>()
                .map_err(|_| anyhow!("external data {} '{v}' is not a byte count", e.key))
        };
        match e.key.as_str() {
            "location" => location = Some(e.value.clone()),
            "offset" => offset = num(&e.value)?,
            "length" => length = Some(num(&e.value)?),
            _ => {} // "checksum" and future keys do not change where the bytes are
        }
    }
    let location =
        location.ok_or_else(|| anyhow!("its data is external but has no 'location' entry"))?;
    let data = files.bytes(&location)?;
    let end = match length {
        Some(len) => offset.checked_add(len),
        None => Some(data.len()),
    };
    let range = match end {
        Some(end) if offset <= end && end <= data.len() => offset..end,
        _ => bail!(
            "external data at offset {offset}{} lies beyond the end of '{location}' ({} bytes)",
            length.map(|l| format!(", length {l}")).unwrap_or_default(),
            data.len()
        ),
    };
    t.raw_data = data[range].to_vec();
    t.external_data.clear();
    t.data_location = DataLocation::DEFAULT.into();
    Ok(())
}
