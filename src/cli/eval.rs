//! `elrt eval`: flags -> [`elrt::pipeline::EvalOptions`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use elrt::data::{DataSpec, NormSpec};
use elrt::pipeline::EvalOptions;

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// The ONNX model to evaluate (any file elrt wrote, or a trained model of your own); its
    /// batch size is free whatever the file declares.
    pub model: PathBuf,
    /// The data whose test split is scored: synthetic | synthetic:TRAIN,TEST | cifar10:PATH |
    /// cifar100:PATH | folder:PATH (see `elrt train --help`).
    #[arg(long)]
    pub data: String,
    /// Budget for decoded images, MB: a folder whose test images take more than this at the
    /// model's input size is decoded on the fly instead of into memory. A model trained on a
    /// streamed folder (its elrt.input.resize says centre crop) is always tested on the same
    /// centre crops.
    #[arg(long, default_value_t = elrt::data::DEFAULT_CACHE_MB, value_name = "MB")]
    pub cache_mb: usize,
    /// Input normalisation: cifar10 | imagenet | none | M1,M2,M3/S1,S2,S3 (mean/std of 0..1
    /// pixels). Default: what the model file records (`elrt train` writes it), else cifar10.
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// Images per forward pass (any value; the model's declared batch does not limit it).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

impl EvalArgs {
    pub fn to_options(&self) -> Result<EvalOptions> {
        Ok(EvalOptions {
            cache_mb: self.cache_mb,
            model: self.model.clone(),
            data: DataSpec::parse(&self.data)?,
            normalize: self.normalize.clone(),
            batch: self.batch,
            threads: self.threads,
        })
    }

    pub fn run(self) -> Result<()> {
        let r = elrt::pipeline::eval(&self.to_options()?)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", r.to_text());
        }
        Ok(())
    }
}
