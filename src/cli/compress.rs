//! `elrt compress`: flags -> [`elrt::pipeline::CompressOptions`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use elrt::data::{DataSpec, NormSpec};
use elrt::pipeline::CompressOptions;

#[derive(Args, Debug, Clone)]
pub struct CompressArgs {
    /// The ONNX architecture (weights are not needed: training starts from random factors).
    pub model: PathBuf,
    /// synthetic | synthetic:TRAIN,TEST | cifar10:PATH | cifar100:PATH | folder:PATH. Without
    /// it: the built-in synthetic set and a short schedule (the embedded default).
    #[arg(long)]
    pub data: Option<String>,
    /// Budget for decoded images, MB. An image folder whose images take more than this at the
    /// model's input size (images x C x H x W bytes, both splits) is streamed: decoded on the
    /// fly by 2 loader threads, a cache of this size keeping what fits, with ImageNet-style
    /// augmentation (random resized crop and flip; centre crop for testing) for images larger
    /// than the input. A folder that fits is decoded into memory and resized to the input, as
    /// CIFAR and synthetic data always are. 0 streams every folder. The run says which it took.
    #[arg(long, default_value_t = elrt::data::DEFAULT_CACHE_MB, value_name = "MB")]
    pub cache_mb: usize,
    /// Input normalisation for training, evaluation and the tract accuracy check, recorded in
    /// run.json, the report and the compact file: cifar10 | imagenet | none | M1,M2,M3/S1,S2,S3
    /// (mean/std of 0..1 pixels). Default: what the model file records, else cifar10.
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// tucker2 | cp
    #[arg(long, default_value = "tucker2")]
    pub format: String,
    /// ratio=F | params=F | macs=F | latency=F (measured in tract) | a JSON file of per-layer
    /// ranks. Default: params=0.4 (`elrt convert` defaults to ratio=0.5, a per-layer rule; a
    /// whole-model budget suits the main job), widened to the 1x1 convs and then the Gemm
    /// layers, said in one line, on models whose convs alone cannot reach it.
    #[arg(long)]
    pub ranks: Option<String>,
    /// Factorize 1x1 convs too, by SVD (for MobileNet-like networks, whose weight sits in
    /// pointwise convs), and Linear layers applied to every pixel (ConvNeXt's MatMuls).
    #[arg(long = "include-1x1")]
    pub include_pointwise: bool,
    /// Factorize Gemm (fully connected) layers too, by SVD.
    #[arg(long)]
    pub include_gemm: bool,
    /// Factorize the first conv (the one reading the image) too.
    #[arg(long)]
    pub include_first: bool,
    /// Image shape C,H,W, for a model whose file leaves input dimensions unknown (or to train
    /// it at another input size).
    #[arg(long, value_name = "C,H,W")]
    pub input_shape: Option<String>,
    /// Run even when the rank policy factorizes no layer (the compact file is then the dense
    /// model, retrained); without it such a run stops with an error that says why.
    #[arg(long)]
    pub allow_dense: bool,
    /// Epochs (default: 30 on real data, 4 on the synthetic set).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Batch size (default: 128 on real data, 64 on the synthetic set).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Base learning rate, SGD with Nesterov momentum 0.9 (default: 0.1 on real data at batch
    /// 128, 0.05 on the synthetic set at batch 64, whose small training split wants smaller
    /// steps; a smaller --batch scales it down in proportion, e.g. 0.025 at batch 32 on real data)
    #[arg(long)]
    pub lr: Option<f32>,
    /// Double soft orthogonality strength rho (0: off).
    #[arg(long, default_value_t = elrt::pipeline::compress::DEFAULT_ORTH)]
    pub orth: f32,
    /// How the random factors start: per-conv (Kaiming fan-out on each factor conv, as for any
    /// conv), composed (the converter's init: the composed kernel has Kaiming's variance and U1,
    /// U2 start near orthonormal), orthogonal (U1, U2 orthonormal, core scaled to match).
    #[arg(long, default_value = "per-conv")]
    pub factor_init: String,
    /// No weight decay on the factor matrices under DSO (see `elrt train --orth-no-decay`).
    #[arg(long)]
    pub orth_no_decay: bool,
    /// Where training puts BatchNormalizations (see `elrt train --bn`): auto (back where an
    /// eval-mode export folded them; in a model with no normalization, after every conv
    /// layer), insert (after every conv layer lacking one), keep (the model as built). The
    /// compact file has them folded into the convs.
    #[arg(long, default_value = "auto")]
    pub bn: String,
    /// Momentum of every BatchNormalization's running statistics while training, PyTorch's
    /// convention (see `elrt train --bn-momentum`): by default each keeps the model's own.
    #[arg(long, value_name = "M")]
    pub bn_momentum: Option<f32>,
    /// Training images over which every evaluation first recomputes the BatchNormalizations'
    /// running statistics from the current weights (see `elrt train --bn-recalibrate`; 0: off).
    #[arg(long, value_name = "N", default_value_t = elrt::train::precise_bn::DEFAULT_IMAGES)]
    pub bn_recalibrate: usize,
    /// Weight decay on conv and linear weights (SGD, decoupled from the learning rate as
    /// torch.optim.SGD applies it).
    #[arg(long, default_value_t = 5e-4)]
    pub wd: f32,
    /// Learning-rate schedule over the epochs: constant | step | cosine | onecycle
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Training threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Threads for the deployment latency (tract).
    #[arg(long, default_value_t = 1)]
    pub bench_threads: usize,
    /// fastest | factorized | dense (how the compact file writes each factorized layer).
    #[arg(long, default_value = "fastest")]
    pub forms: String,
    /// Seed of the random factors, the data order and the augmentation (runs are
    /// reproducible from it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop training after N steps (smoke runs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Also train the full-rank model with the same recipe, for the accuracy comparison.
    #[arg(long)]
    pub baseline: bool,
    /// Keep the model's classifier as it is (an error when its output width differs from the
    /// data's class count); without it, the classifier is re-sized to the data.
    #[arg(long)]
    pub keep_head: bool,
    /// The run folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue a stopped run in --out from its last finished stage. The recipe must be the
    /// one the run was started with (the differences are listed otherwise).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: accept a changed --epochs or --max-steps (to train a finished run
    /// further, on purpose); every other change is still refused.
    #[arg(long, requires = "resume")]
    pub allow_recipe_change: bool,
    /// Print the report as JSON (stage messages are silenced).
    #[arg(long)]
    pub json: bool,
    /// No stage messages or progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Under `mpirun -np N`: BatchNormalization normalises with the statistics of the whole
    /// global batch (summed over the ranks, as PyTorch's SyncBatchNorm) instead of each rank's
    /// share (as PyTorch's DDP by default). No effect in one process.
    #[arg(long)]
    pub sync_bn: bool,
}

impl CompressArgs {
    pub fn to_options(&self) -> Result<CompressOptions> {
        Ok(CompressOptions {
            cache_mb: self.cache_mb,
            model: self.model.clone(),
            data: self.data.as_deref().map(DataSpec::parse).transpose()?,
            normalize: self.normalize.clone(),
            format: self.format.parse()?,
            ranks: self.ranks.as_deref().map(str::parse).transpose()?,
            include_pointwise: self.include_pointwise,
            include_gemm: self.include_gemm,
            include_first: self.include_first,
            input_shape: self
                .input_shape
                .as_deref()
                .map(elrt::inspect::parse_shape)
                .transpose()?,
            allow_dense: self.allow_dense,
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            orth: self.orth,
            factor_init: self.factor_init.parse()?,
            orth_no_decay: self.orth_no_decay,
            bn: self.bn.parse()?,
            bn_momentum: self
                .bn_momentum
                .map(elrt::ir::bn_insert::check_momentum)
                .transpose()?,
            bn_recalibrate: self.bn_recalibrate,
            wd: self.wd,
            schedule: self.schedule.parse()?,
            threads: self.threads,
            bench_threads: self.bench_threads,
            forms: self.forms.parse()?,
            seed: self.seed,
            max_steps: self.max_steps,
            baseline: self.baseline,
            keep_head: self.keep_head,
            out: self.out.clone(),
            resume: self.resume,
            allow_recipe_change: self.allow_recipe_change,
            quiet: self.quiet || self.json,
            sync_bn: self.sync_bn,
            command: None,
        })
    }

    pub fn run(self) -> Result<()> {
        let Some(report) = elrt::pipeline::compress(&self.to_options()?)? else {
            return Ok(()); // under mpirun, rank 0 prints
        };
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", elrt::pipeline::compress::report_table(&report));
            println!("run folder: {}", self.out.display());
        }
        Ok(())
    }
}
