//! `elrt convert`: flags -> [`elrt::pipeline::ConvertOptions`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use elrt::pipeline::ConvertOptions;

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The ONNX model (an architecture, or a trained model with --init decompose).
    pub model: PathBuf,
    /// tucker2 | cp
    #[arg(long, default_value = "tucker2")]
    pub format: String,
    /// ratio=F (each layer keeps F of its ranks) | params=F | macs=F (a whole-model budget) |
    /// energy=F | latency=F (measured in tract) | a JSON file of per-layer ranks. The default
    /// is a per-layer rule; `elrt compress` defaults to params=0.4, a whole-model budget.
    #[arg(long, default_value = "ratio=0.5")]
    pub ranks: String,
    /// Round ranks to a multiple of this.
    #[arg(long, default_value_t = 8)]
    pub rank_multiple: usize,
    /// Factorize the first conv (the one reading the image) too.
    #[arg(long)]
    pub include_first: bool,
    /// Factorize 1x1 convs too, by SVD (1x1 C_in -> r, 1x1 r -> C_out): for networks whose
    /// weight sits in pointwise convs, such as MobileNetV2; likewise Linear layers applied to
    /// every pixel (ConvNeXt's MatMuls: two MatMuls through rank r).
    #[arg(long = "include-1x1")]
    pub include_pointwise: bool,
    /// Factorize Gemm (fully connected) layers too, by SVD (two Gemms through rank r).
    #[arg(long)]
    pub include_gemm: bool,
    /// scratch | orthogonal | decompose (factors of the file's trained kernels)
    #[arg(long, default_value = "scratch")]
    pub init: String,
    /// Seed of the fresh factors (scratch and orthogonal init) and of CP-ALS's start.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// HOOI sweeps after HOSVD (--init decompose, Tucker-2).
    #[arg(long, default_value_t = 10)]
    pub hooi_iters: usize,
    /// ALS sweeps (--init decompose, CP).
    #[arg(long, default_value_t = 50)]
    pub cp_iters: usize,
    /// Threads tract times with for --ranks latency=F (the deployment's thread count).
    #[arg(long, default_value_t = 1)]
    pub latency_threads: usize,
    /// Image shape C,H,W for a model whose file leaves input dimensions unknown (or to convert
    /// it for another input size).
    #[arg(long, value_name = "C,H,W")]
    pub input_shape: Option<String>,
    /// Output ONNX file.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the per-layer report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl ConvertArgs {
    pub fn to_options(&self) -> Result<ConvertOptions> {
        Ok(ConvertOptions {
            model: self.model.clone(),
            output: self.output.clone(),
            format: self.format.parse()?,
            ranks: self.ranks.parse()?,
            rank_multiple: self.rank_multiple,
            include_first: self.include_first,
            include_pointwise: self.include_pointwise,
            include_gemm: self.include_gemm,
            init: self.init.parse()?,
            seed: self.seed,
            hooi_iters: self.hooi_iters,
            cp_iters: self.cp_iters,
            latency_threads: self.latency_threads,
            input_shape: self
                .input_shape
                .as_deref()
                .map(elrt::inspect::parse_shape)
                .transpose()?,
            quiet: self.json,
        })
    }

    pub fn run(self) -> Result<()> {
        let r = elrt::pipeline::convert(&self.to_options()?)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", r.to_text());
        }
        Ok(())
    }
}
