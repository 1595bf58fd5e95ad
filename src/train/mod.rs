//! Training: optimisers, learning-rate schedules, the training loop and its checkpoints.

pub mod checkpoint;
pub mod dso;
pub mod init;
pub mod optim;
pub mod parallel;
pub mod precise_bn;
pub mod progress;
pub mod resume;
pub mod run;
pub mod schedule;
pub mod step;
