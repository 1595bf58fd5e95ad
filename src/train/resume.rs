//! What `--resume` may and may not change.
//!
//! A checkpoint carries the recipe it was trained with ([`TrainConfig`]). Resuming it under
//! another recipe (batch size, learning rate, seed, normalisation...) would silently train a
//! different run from the same weights, so every difference is listed and refused, except the
//! length of the run (`epochs`, `max_steps`), which a user may extend on purpose with
//! `--allow-recipe-change`. Data loader threads do not change results and are not compared.

use anyhow::{bail, Result};

use super::run::TrainConfig;
use crate::data::NormSpec;

/// Fields that `--allow-recipe-change` lets a resumed run change.
pub const CHANGEABLE: &[&str] = &["epochs", "max_steps"];

/// Fields that do not change what is computed.
const IGNORED: &[&str] = &["workers", "bn_recalibrate"];

/// Refuses to resume a run trained with `was` (a checkpoint's config, as JSON) under `now`,
/// listing the differences. `channels` fills in the normalisation of checkpoints written
/// before it was recorded.
pub fn check(
    was: &serde_json::Value,
    now: &TrainConfig,
    channels: usize,
    allow_recipe_change: bool,
    checkpoint: &std::path::Path,
) -> Result<()> {
    let mut now = serde_json::to_value(now)?;
    let mut was = was.clone();
    let default = serde_json::to_value(NormSpec::default_for(channels))?;
    for v in [&mut was, &mut now] {
        if let Some(o) = v.as_object_mut() {
            let n = o.entry("normalize").or_insert(serde_json::Value::Null);
            if n.is_null() {
                *n = default.clone();
            }
            // Written only when true (in-memory runs' checkpoints read as before).
            o.entry("data_streamed")
                .or_insert(serde_json::Value::Bool(false));
        }
    }
    let (Some(a), Some(b)) = (was.as_object(), now.as_object()) else {
        return Ok(()); // a checkpoint without a recipe (none written so far) has nothing to compare
    };
    let mut refused = Vec::new();
    for (k, v) in b {
        if IGNORED.contains(&k.as_str()) {
            continue;
        }
        let old = a.get(k).cloned().unwrap_or(serde_json::Value::Null);
        if &old != v && !(allow_recipe_change && CHANGEABLE.contains(&k.as_str())) {
            refused.push(format!("{k}: {old} -> {v}"));
        }
    }
    if !refused.is_empty() {
        let only_length = refused
            .iter()
            .all(|d| CHANGEABLE.iter().any(|c| d.starts_with(&format!("{c}:"))));
        bail!(
            "--resume: {} was trained with another recipe ({}){}",
            checkpoint.display(),
            refused.join(", "),
            if only_length {
                "; pass --allow-recipe-change to continue with the new value"
            } else {
                "; resume with the original flags"
            }
        );
    }
    Ok(())
}
