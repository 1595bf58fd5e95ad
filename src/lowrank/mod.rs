//! Low-rank conversion (ELRT): every eligible convolution becomes a Tucker-2 or CP chain of
//! smaller convolutions, with rank policies, from-scratch or decomposed initialisation, and the
//! double soft orthogonality (DSO) regulariser used while training.

pub mod decompose;
pub mod naming;
pub mod orth;
pub mod rank;
pub mod rewrite;

pub use rewrite::{
    convert, eligible_layers, ConvertOptions, Eligible, Format, InitMode, LayerReport,
};
