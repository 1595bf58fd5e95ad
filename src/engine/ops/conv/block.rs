//! Several images per GEMM, for convolutions whose output plane is small.
//!
//! Per image, a conv's GEMM has `oh*ow` columns: 4 to 16 in the last stages of ResNet-18 at
//! 64x64 (2x2 and 4x4 planes, 256 to 512 channels), where OpenBLAS spends its time packing
//! operands rather than multiplying. Laying the column matrices of `B` images side by side,
//! `col[k, B*oh*ow]`, makes one GEMM with `B` times the columns: `Y[co, B*ohw] = W . col` forward,
//! `dW += dY . col^T` and `dcol = W^T . dY` backward, with a copy in and out of the NCHW
//! tensors (cheap next to the GEMM, and planes are small by definition here).
//!
//! Which layers: ungrouped im2col and pointwise convs whose plane has fewer than
//! [`BLOCK_COLS`] outputs; depthwise and grouped convs keep their per-image paths. The blocks
//! sit inside the fixed parts of the batch ([`super::super::part_len`], widened to hold one
//! block and capped so there are at least [`MIN_PARTS`] parts), so the summation order depends
//! on the batch and the geometry only, never on the thread count: results stay reproducible.
//! Measured in `benches/conv_kernels.rs` and on torchvision ResNet-18 (see the README's speed
//! section).

use super::{mat, mat_mut, Geom, Path};
use ndarray::linalg::general_mat_mul;

/// Planes with fewer outputs than this are batched until a block has about this many columns.
pub(super) const BLOCK_COLS: usize = 256;
/// Blocks never merge the batch into fewer parts than this (parallelism over 2-4 cores).
pub(super) const MIN_PARTS: usize = 4;

/// Scratch of one rayon task for blocked convs.
pub(super) struct BlockScratch {
    /// One image's im2col columns `[k, ohw]`.
    col: Vec<f32>,
    /// The block's columns `[k, B*ohw]` (forward, weight gradient), then its column gradient.
    wide: Vec<f32>,
    /// The block's output or output gradient `[co, B*ohw]`.
    out: Vec<f32>,
}

impl Geom {
    /// Images per GEMM: 1 for the per-image path.
    pub(super) fn block_images(&self) -> usize {
        let ohw = self.oh * self.ow;
        let eligible = self.group == 1 && self.path != Path::Depthwise && ohw > 0;
        if !eligible || ohw >= BLOCK_COLS || self.n < 2 {
            return 1;
        }
        BLOCK_COLS
            .div_ceil(ohw)
            .min(self.n.div_ceil(MIN_PARTS))
            .max(1)
    }

    /// Images per rayon part: the fixed partition, widened to a whole number of blocks.
    pub(super) fn part_images(&self) -> usize {
        let part = super::part_len(self.n);
        let b = self.block_images().max(self.wino_block_images());
        if b <= 1 {
            part
        } else {
            part.div_ceil(b) * b
        }
    }

    pub(super) fn block_scratch(&self) -> BlockScratch {
        let cols = self.block_images() * self.oh * self.ow;
        let k = self.k_rows();
        BlockScratch {
            col: vec![0.0; self.col_len()],
            wide: vec![0.0; k * cols],
            out: vec![0.0; self.co * cols],
        }
    }

    /// Lays the column matrices of the images in `x` side by side in `s.wide`.
    fn gather_columns(&self, x: &[f32], s: &mut BlockScratch) -> usize {
        let (ohw, k, xlen) = (self.oh * self.ow, self.k_rows(), self.x_len());
        let nb = x.len() / xlen;
        let cols = nb * ohw;
        for (j, xb) in x.chunks(xlen).enumerate() {
            let src: &[f32] = match self.path {
                Path::Im2col => {
                    self.im2col(xb, &mut s.col);
                    &s.col
                }
                _ => xb,
            };
            for r in 0..k {
                s.wide[r * cols + j * ohw..][..ohw].copy_from_slice(&src[r * ohw..][..ohw]);
            }
        }
        cols
    }

    /// The images in `x` (`[B, ci, h, w]`, B at most [`Self::block_images`]) into `y`.
    pub(super) fn forward_block(
        &self,
        x: &[f32],
        w: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        s: &mut BlockScratch,
    ) {
        let (ohw, k, ylen) = (self.oh * self.ow, self.k_rows(), self.y_len());
        let cols = self.gather_columns(x, s);
        let out = &mut s.out[..self.co * cols];
        if let Some(b) = bias {
            for (row, &bv) in out.chunks_mut(cols).zip(b) {
                row.fill(bv);
            }
        }
        let beta = if bias.is_some() { 1.0 } else { 0.0 };
        general_mat_mul(
            1.0,
            &mat(w, self.co, k),
            &mat(&s.wide, k, cols),
            beta,
            &mut mat_mut(out, self.co, cols),
        );
        for (j, yb) in y.chunks_mut(ylen).enumerate() {
            for (c, row) in yb.chunks_mut(ohw).enumerate() {
                row.copy_from_slice(&out[c * cols + j * ohw..][..ohw]);
            }
        }
    }

    /// The block's contribution: adds to `dw`, writes `dx` (zeroed) when given.
    pub(super) fn backward_block(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        s: &mut BlockScratch,
    ) {
        let (ohw, k, xlen, ylen) = (self.oh * self.ow, self.k_rows(), self.x_len(), self.y_len());
        let cols = self.gather_columns(x, s);
        let dyw = &mut s.out[..self.co * cols];
        for (j, dyb) in dy.chunks(ylen).enumerate() {
            for (c, row) in dyb.chunks(ohw).enumerate() {
                dyw[c * cols + j * ohw..][..ohw].copy_from_slice(row);
            }
        }
        general_mat_mul(
            1.0,
            &mat(dyw, self.co, cols),
            &mat(&s.wide, k, cols).t(),
            1.0,
            &mut mat_mut(dw, self.co, k),
        );
        let Some(dx) = dx else { return };
        general_mat_mul(
            1.0,
            &mat(w, self.co, k).t(),
            &mat(dyw, self.co, cols),
            0.0,
            &mut mat_mut(&mut s.wide, k, cols),
        );
        let via_col = self.path == Path::Im2col;
        for (j, dxb) in dx.chunks_mut(xlen).enumerate() {
            // Image j's column gradient: through its im2col matrix, or straight into dx for a
            // pointwise conv (its column matrix is the image).
            let dst: &mut [f32] = if via_col { &mut s.col } else { dxb };
            for r in 0..k {
                dst[r * ohw..][..ohw].copy_from_slice(&s.wide[r * cols + j * ohw..][..ohw]);
            }
            if via_col {
                self.col2im(&mut s.col, dxb);
            }
        }
    }
}
