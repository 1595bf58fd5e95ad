//! `elrt train`: flags -> [`elrt::pipeline::TrainOptions`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use elrt::data::{DataSpec, NormSpec};
use elrt::pipeline::TrainOptions;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// The ONNX architecture to train.
    pub model: PathBuf,
    /// The data: synthetic (the built-in procedural set, 5,000 train / 1,000 test images; compress's
    /// embedded default uses 4,000 / 1,000 to stay short) | synthetic:TRAIN,TEST (image counts) |
    /// cifar10:PATH | cifar100:PATH (the binary versions) | folder:PATH (one sub-folder of
    /// JPEG/PNG images per class, or train/<class>/ and test/<class>/).
    #[arg(long, default_value = "synthetic")]
    pub data: String,
    /// Passes over the training split (the learning-rate schedule spans them all).
    #[arg(long, default_value_t = 30)]
    pub epochs: u64,
    /// Images per optimiser step (the training split must hold at least one batch).
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Base learning rate (default: 0.1 for SGD at batch 128 and above, scaled down in
    /// proportion for a smaller --batch, e.g. 0.025 at 32; 1e-3 for AdamW).
    #[arg(long)]
    pub lr: Option<f32>,
    /// sgd | adamw
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    /// SGD momentum (Nesterov's unless --no-nesterov).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    /// Plain momentum instead of Nesterov's.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Weight decay on conv and linear weights (default 5e-4 for SGD, 0.05 for AdamW).
    #[arg(long)]
    pub wd: Option<f32>,
    /// constant | step | cosine | onecycle
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Linear warm-up, in epochs.
    #[arg(long, default_value_t = 0.0)]
    pub warmup: f32,
    /// Label smoothing of the cross-entropy loss (0: none), as torch.nn.CrossEntropyLoss.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Data loader threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Budget for decoded images, MB. An image folder whose images take more than this at the
    /// model's input size (images x C x H x W bytes, both splits) is streamed: decoded on the
    /// fly by the --workers threads, a cache of this size keeping what fits, with ImageNet-style
    /// augmentation (random resized crop and flip; centre crop for testing) for images larger
    /// than the input. A folder that fits is decoded into memory and resized to the input, as
    /// CIFAR and synthetic data always are. 0 streams every folder. The run says which it took.
    #[arg(long, default_value_t = elrt::data::DEFAULT_CACHE_MB, value_name = "MB")]
    pub cache_mb: usize,
    /// Seed of the initialisation, the data order, the augmentation and the dropout masks (a
    /// run is reproducible from it, bit for bit, whatever the thread count).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after N optimiser steps (smoke runs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// scratch: Kaiming init of every weight (low-rank factors too, each as its own conv);
    /// factors: the same, but low-rank factors keep the file's values (the init `elrt convert`
    /// wrote: composed-Kaiming or orthogonal); file: keep all the file's weights.
    #[arg(long, default_value = "scratch")]
    pub init: String,
    /// auto: put back the BatchNormalizations an eval-mode export folded into its convs (where
    /// PyTorch's dynamo exporter recorded them, exactly those), and in a model with no
    /// normalization at all (folded without a record, or built without: SqueezeNet) one after
    /// every conv layer; insert: after every conv layer lacking one; keep: the model as built.
    /// Never between the factors of a low-rank layer; export folds them into the convs.
    #[arg(long, default_value = "auto")]
    pub bn: String,
    /// Momentum of every BatchNormalization's running statistics while training, PyTorch's
    /// convention (the new batch's weight; 0.1 is PyTorch's default): by default each keeps the
    /// model's own. A model exported with its BNs may carry a long-run value (MobileNet-V3's
    /// 0.01 averages over about 100 steps) whose statistics lag a short run's weights; the log
    /// says so when that is the case.
    #[arg(long, value_name = "M")]
    pub bn_momentum: Option<f32>,
    /// Before every evaluation (each epoch's test line, the checkpoint, the output file), the
    /// BatchNormalizations' running statistics are recomputed from the current weights over
    /// this many training images (augmented as in training): running averages over a short run still
    /// carry its first steps' activations, which can sit orders of magnitude off. 0 keeps the
    /// running averages as training left them.
    #[arg(long, value_name = "N", default_value_t = elrt::train::precise_bn::DEFAULT_IMAGES)]
    pub bn_recalibrate: usize,
    /// No random crop and flip.
    #[arg(long)]
    pub no_augment: bool,
    /// Input normalisation, recorded in the output file: cifar10 | imagenet | none |
    /// M1,M2,M3/S1,S2,S3 (mean/std of 0..1 pixels, one per input channel). Default: what the
    /// model file records, else cifar10 (3 channels).
    #[arg(long, value_name = "SPEC")]
    pub normalize: Option<NormSpec>,
    /// Double soft orthogonality strength rho on the Tucker-2/CP factor matrices (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub orth: f32,
    /// No weight decay on the factor matrices under DSO (U1, U2 of Tucker-2, the 1x1 factors of
    /// CP); the core and every other weight keep it.
    #[arg(long)]
    pub orth_no_decay: bool,
    /// Keep the model's classifier as it is. Without it, a model whose output width differs
    /// from the data's class count gets its last Gemm / MatMul / conv re-sized to the data
    /// (freshly initialised; said in one line); with it, that is an error.
    #[arg(long)]
    pub keep_head: bool,
    /// Continue from the checkpoint beside the output. The recipe must be the one it was
    /// trained with (the differences are listed otherwise).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: accept a changed --epochs or --max-steps (to train further on purpose);
    /// every other change is still refused.
    #[arg(long, requires = "resume")]
    pub allow_recipe_change: bool,
    /// Output ONNX file (default: the model file's stem + ".trained.onnx", in the current folder).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Print the final summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No progress, data, resume or per-epoch lines: stderr keeps errors and warnings only,
    /// stdout the final line.
    #[arg(long)]
    pub quiet: bool,
    /// Under `mpirun -np N`: BatchNormalization normalises with the statistics of the whole
    /// global batch (summed over the ranks, as PyTorch's SyncBatchNorm) instead of each rank's
    /// share (as PyTorch's DDP by default). No effect in one process.
    #[arg(long)]
    pub sync_bn: bool,
}

impl TrainArgs {
    /// The pipeline's options; the values clap leaves as text are parsed here, so that a bad
    /// one fails before any work.
    pub fn to_options(&self) -> Result<TrainOptions> {
        Ok(TrainOptions {
            model: self.model.clone(),
            data: DataSpec::parse(&self.data)?,
            epochs: self.epochs,
            batch: self.batch,
            lr: self.lr,
            optimizer: self.optimizer.parse()?,
            momentum: self.momentum,
            nesterov: !self.no_nesterov,
            wd: self.wd,
            schedule: self.schedule.parse()?,
            warmup: self.warmup,
            label_smoothing: self.label_smoothing,
            threads: self.threads,
            workers: self.workers,
            cache_mb: self.cache_mb,
            seed: self.seed,
            max_steps: self.max_steps,
            init: self.init.parse()?,
            bn: self.bn.parse()?,
            bn_momentum: self
                .bn_momentum
                .map(elrt::ir::bn_insert::check_momentum)
                .transpose()?,
            bn_recalibrate: self.bn_recalibrate,
            augment: !self.no_augment,
            normalize: self.normalize.clone(),
            orth: self.orth,
            orth_no_decay: self.orth_no_decay,
            keep_head: self.keep_head,
            resume: self.resume,
            allow_recipe_change: self.allow_recipe_change,
            output: self.output.clone(),
            quiet: self.quiet,
            sync_bn: self.sync_bn,
        })
    }

    pub fn run(self) -> Result<()> {
        let r = elrt::pipeline::train(&self.to_options()?)?;
        if elrt::dist::rank() != 0 {
            return Ok(()); // under mpirun, rank 0 prints
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r.summary())?);
        } else {
            print!("{}", r.to_text());
        }
        Ok(())
    }
}
