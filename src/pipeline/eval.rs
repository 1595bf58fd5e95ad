//! The eval stage: top-1 / top-5 accuracy and loss of a model on a data set's test split.

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::data::{DataSpec, NormSpec};
use crate::engine::model::Model;
use crate::train::run::{evaluate, EvalResult};

/// What [`eval`] scores; the defaults are `elrt eval`'s.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// The ONNX model (its batch size is free whatever the file declares).
    pub model: PathBuf,
    /// The data whose test split is scored.
    pub data: DataSpec,
    /// Input normalisation (`None`: what the model file records, else the default for its
    /// channels).
    pub normalize: Option<NormSpec>,
    /// Images per forward pass.
    pub batch: usize,
    /// Compute threads (`None`: all cores).
    pub threads: Option<usize>,
    /// Budget for decoded images, MiB: a folder whose test split is larger at the input size
    /// streams ([`crate::data::source`]).
    pub cache_mb: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            model: PathBuf::new(),
            data: DataSpec::default(),
            normalize: None,
            batch: 256,
            threads: None,
            cache_mb: crate::data::DEFAULT_CACHE_MB,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub normalize: NormSpec,
    #[serde(flatten)]
    pub result: EvalResult,
}

impl EvalReport {
    pub fn to_text(&self) -> String {
        format!(
            "{}: {} test images, top-1 {:.2}%, top-5 {:.2}%, loss {:.4} (normalisation {})\n",
            self.model,
            self.result.images,
            100.0 * self.result.top1,
            100.0 * self.result.top5,
            self.result.loss,
            self.normalize
        )
    }
}

/// Scores the model as `elrt eval` does, on a pool of `threads` compute threads.
pub fn eval(a: &EvalOptions) -> Result<EvalReport> {
    let threads = crate::engine::thread_count(a.threads)?;
    crate::engine::with_threads(threads, || eval_on_pool(a))?
}

fn eval_on_pool(a: &EvalOptions) -> Result<EvalReport> {
    let mut model = Model::load(&a.model, a.batch)?;
    let ([c, h, w], normalize) =
        super::model_input_and_normalization(&model, a.normalize.as_ref(), &a.model, false)?;
    let norm = normalize.resolve(c)?;
    // Prepared as the model was trained: a model trained on a streamed folder records its
    // centre-crop rule, and its test images are cropped the same way.
    let prep = crate::data::source::prep_of_model(&model.graph.meta.metadata_props);
    let opts = crate::data::DataOptions {
        cache_mb: a.cache_mb,
    };
    let mut test = a.data.open_test([c, h, w], &opts, prep)?;
    // A model that records its class names is scored by name: a folder with some of the
    // classes, or with them in another order, still lands on the right outputs.
    let recorded = model
        .graph
        .meta
        .metadata_props
        .iter()
        .find(|(k, _)| k == crate::data::CLASSES_KEY)
        .and_then(|(_, v)| serde_json::from_str::<Vec<String>>(v).ok());
    if let Some(names) = recorded {
        test = test.relabelled(&names)?;
    }
    let workers = 2;
    let result =
        crate::engine::on_pool(|| evaluate(&mut model, test, a.batch, workers, Some(norm)))?;
    Ok(EvalReport {
        model: a.model.display().to_string(),
        data: a.data.to_string(),
        normalize,
        result,
    })
}
