//! `elrt speed`: flags -> [`elrt::pipeline::SpeedOptions`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use elrt::pipeline::SpeedOptions;

#[derive(Args, Debug, Clone)]
pub struct SpeedArgs {
    /// The ONNX model to time.
    pub model: PathBuf,
    /// Images per training step.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Compute threads (default: all cores); the report gives the count that ran.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed training steps (after one warm-up step).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Print per-op forward/backward times (a conv's op is the kernel that runs it).
    #[arg(long)]
    pub profile: bool,
    /// Print per-op times and then every node's, slowest first (which layer is slow).
    #[arg(long)]
    pub profile_nodes: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

impl SpeedArgs {
    pub fn to_options(&self) -> Result<SpeedOptions> {
        Ok(SpeedOptions {
            model: self.model.clone(),
            batch: self.batch,
            threads: self.threads,
            steps: self.steps,
            profile: self.profile,
            profile_nodes: self.profile_nodes,
        })
    }

    pub fn run(self) -> Result<()> {
        let r = elrt::pipeline::speed(&self.to_options()?)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
        } else {
            print!("{}", r.to_text());
        }
        Ok(())
    }
}
