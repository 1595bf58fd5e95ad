//! Links OpenBLAS into the examples. Inside this package ndarray's `blas` feature is on (elrt's
//! engine uses it), so tract's matrix code refers to `cblas_sgemm`; elrt's library and binary
//! link OpenBLAS through `blas-src`, but an example that does not use elrt (so that it can be
//! copied into another project, where ndarray has no `blas` feature and needs no BLAS) would
//! otherwise fail to link.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-link-arg-examples=-lopenblas");
}
