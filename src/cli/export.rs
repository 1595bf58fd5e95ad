//! `elrt export`: flags -> [`elrt::pipeline::ExportOptions`].

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use elrt::data::{DataSpec, NormSpec};
use elrt::pipeline::ExportOptions;

#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The trained ONNX model (from `elrt train`).
    pub model: PathBuf,
    /// The deployment ONNX file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Batch size fixed in the file. Default: the source model's convention, i.e. the batch
    /// its file fixes (PyTorch's exporters fix 1 unless given dynamic axes), or a symbolic batch
    /// when its file has one.
    #[arg(long)]
    pub batch: Option<usize>,
    /// Declare the batch dimension symbolic (N) whatever the source did; the other dimensions
    /// stay fixed.
    #[arg(long)]
    pub dynamic_batch: bool,
    /// Image shape when the file's own input shape leaves dimensions unknown.
    #[arg(long, value_name = "C,H,W")]
    pub input_shape: Option<String>,
    /// ONNX opset to write (default 13, or the lowest above it the model's ops need).
    #[arg(long)]
    pub opset: Option<i64>,
    /// fastest (timed in tract on this machine) | factorized | dense
    #[arg(long, default_value = "fastest")]
    pub forms: String,
    /// Threads the deployment runs with (tract times the forms with this many).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Also check on real test images and record the measured top-1 accuracy in the file:
    /// synthetic | cifar10:PATH | cifar100:PATH | folder:PATH.
    #[arg(long)]
    pub data: Option<String>,
    /// Budget for decoded images, MB: a folder whose test images take more than this at the
    /// model's input size is decoded on the fly instead of into memory. A model trained on a
    /// streamed folder (its elrt.input.resize says centre crop) is always tested on the same
    /// centre crops.
    #[arg(long, default_value_t = elrt::data::DEFAULT_CACHE_MB, value_name = "MB")]
    pub cache_mb: usize,
    /// Input normalisation, recorded in the file and used for the --data accuracy: cifar10 |
    /// imagenet | none | M1,M2,M3/S1,S2,S3 (mean/std of 0..1 pixels). Default: what the model
    /// file records (`elrt train` writes it), else cifar10.
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// Test images used for the accuracy (0 = the whole test split).
    #[arg(long, default_value_t = 0)]
    pub data_images: usize,
    /// Random batches compared between the engine and tract.
    #[arg(long, default_value_t = 4)]
    pub check_batches: usize,
    /// Largest relative difference allowed between tract's and the engine's outputs.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Extra metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Print the export and validation report as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress messages.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_meta(v: &[String]) -> Result<Vec<(String, String)>> {
    v.iter()
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| anyhow::anyhow!("--meta '{kv}': expected KEY=VALUE"))
        })
        .collect()
}

impl ExportArgs {
    pub fn to_options(&self) -> Result<ExportOptions> {
        let input_shape = match &self.input_shape {
            Some(s) => {
                let v = elrt::inspect::parse_shape(s)?;
                if v.len() != 3 {
                    bail!("--input-shape '{s}': expected C,H,W");
                }
                Some(v)
            }
            None => None,
        };
        Ok(ExportOptions {
            cache_mb: self.cache_mb,
            model: self.model.clone(),
            output: self.output.clone(),
            batch: self.batch,
            dynamic_batch: self.dynamic_batch,
            input_shape,
            opset: self.opset,
            forms: self.forms.parse()?,
            threads: self.threads,
            data: self.data.as_deref().map(DataSpec::parse).transpose()?,
            normalize: self.normalize.clone(),
            data_images: self.data_images,
            check_batches: self.check_batches,
            tolerance: self.tolerance,
            meta: parse_meta(&self.meta)?,
            quiet: self.quiet || self.json,
        })
    }

    pub fn run(self) -> Result<()> {
        let s = elrt::pipeline::export(&self.to_options()?)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&s)?);
        } else {
            print!("{}", s.to_text(self.threads));
        }
        Ok(())
    }
}
