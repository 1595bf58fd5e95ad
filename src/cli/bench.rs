//! `elrt bench`: flags -> [`elrt::pipeline::BenchOptions`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use elrt::pipeline::BenchOptions;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// ONNX files to compare; the first is the baseline for speedup and MAC ratio.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Batch sizes (comma-separated).
    #[arg(long, default_value = "1", value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// Threads tract uses (a private pool of exactly this size; 1 = single-threaded).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Untimed runs of each file first.
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
    /// Timed runs of each file (at least).
    #[arg(long, default_value_t = 200)]
    pub runs: usize,
    /// Keep timing until each file has at least this many seconds measured.
    #[arg(long, default_value_t = 1.0)]
    pub min_seconds: f64,
    /// Also print tract's time per node (optimised model, first batch size), per file.
    #[arg(long)]
    pub profile: bool,
    /// Print the rows as JSON (with --profile: {"rows", "profile"}).
    #[arg(long)]
    pub json: bool,
}

impl BenchArgs {
    pub fn to_options(&self) -> Result<BenchOptions> {
        Ok(BenchOptions {
            files: self.files.clone(),
            batch: self.batch.clone(),
            threads: self.threads,
            warmup: self.warmup,
            runs: self.runs,
            min_seconds: self.min_seconds,
            quiet: self.json,
        })
    }

    pub fn run(self) -> Result<()> {
        let o = self.to_options()?;
        let r = elrt::pipeline::bench(&o)?;
        if !self.json {
            print!("{}", r.to_text());
        }
        if self.profile {
            let p = elrt::pipeline::bench::profile(&o)?;
            if self.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"rows": r.rows, "profile": p})
                    )?
                );
                return Ok(());
            }
            for f in &p {
                print!("{}", f.to_text());
            }
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r.rows)?);
        }
        Ok(())
    }
}
