//! The one hook data-parallel training needs inside the engine: BatchNormalization with global
//! batch statistics (`--sync-bn`).
//!
//! In training mode each BN reduces its input to a few per-channel sums (forward: the sum of
//! `x`, then of the squared deviations from the mean; backward: the sums of `dy` and
//! `dy * x_hat`). With a [`StatSync`] on the [`super::exec::Session`], BN hands those vectors
//! (the value count appended) to it before using them, and an implementation that sums them
//! over processes makes every process normalise with the statistics of the whole global batch,
//! as PyTorch's `SyncBatchNorm` does. Without one (the default) nothing changes, bit for bit.
//! The engine knows nothing of how the sums travel (MPI lives in `crate::dist`).

/// Sums per-channel statistics over the processes that share a global batch.
pub trait StatSync: Send + Sync {
    /// Replaces every entry of `values` by its sum over all processes (each process calls it
    /// with vectors of the same length, in the same order). An error stops the step.
    fn sum(&self, values: &mut [f64]) -> Result<(), String>;
}
