//! Low-rank conversion (ELRT): every eligible convolution becomes a Tucker-2 or CP chain of
//! smaller convolutions, with rank policies, from-scratch or decomposed initialisation, and the
//! double soft orthogonality (DSO) regulariser used while training.

pub mod decompose;
pub mod orth;
pub mod rank;
pub mod rewrite;

pub use rewrite::{
    convert, eligible_layers, ConvertOptions, Eligible, Format, InitMode, LayerReport,
};

/// Whether an initializer is a low-rank factor weight written by the converter:
/// `<layer>/tucker2/{u1,core,u2}.weight`, `<layer>/cp/{u1,vertical,horizontal,u2}.weight`, or the
/// SVD factors `<layer>/svd/{u1,u2}.weight` of a 1x1 conv or a Gemm.
pub fn is_factor_weight(name: &str) -> bool {
    name.ends_with(".weight")
        && ["/tucker2/", "/cp/", "/svd/"]
            .iter()
            .any(|t| name.contains(t))
}
