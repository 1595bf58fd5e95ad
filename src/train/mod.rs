//! Training: optimisers, learning-rate schedules, the training loop and its checkpoints.

pub mod optim;
pub mod schedule;
