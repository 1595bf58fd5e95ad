//! Several images per GEMM, for convolutions whose output plane is small.
//!
//! Per image, a conv's GEMM has `oh*ow` columns: 4 to 16 in the last stages of ResNet-18 at
//! 64x64 (2x2 and 4x4 planes, 256 to 512 channels), where OpenBLAS spends its time packing
//! operands rather than multiplying. Laying the column matrices of `B` images side by side,
//! `col[k, B*oh*ow]`, makes one GEMM with `B` times the columns: `Y[co, B*ohw] = W . col` forward,
//! `dcol = W^T . dY` backward, with a copy in and out of the NCHW tensors (cheap next to the
//! GEMM, and planes are small by definition here). The weight gradient goes further: every
//! image's columns and output gradient sit side by side in two batch-wide matrices, and
//! `dW = dY . col^T` is one GEMM over the whole batch (criterion `conv_blocks`, batch 32,
//! forward + backward, 2026-12-02: 256 channels on 4x4 24.1-25.6 -> 17.3-22.4 ms, 512 on 2x2
//! 35.7-40.3 -> 26.2-30.1 ms against a GEMM per block into per-part copies summed afterwards).
//!
//! Which layers: ungrouped im2col and pointwise convs whose plane has fewer than
//! [`BLOCK_COLS`] outputs; depthwise and grouped convs keep their per-image paths. Im2col layers
//! with 32 channels or more in and out leave this path for `small_plane.rs` (Winograd ones
//! for their backward only), and pointwise layers on planes of 64+ outputs (8x8) with at most
//! 256 channels leave it for `pointwise.rs`'s direct kernels, so what stays here is pointwise
//! layers on 4x4 and 2x2 planes or wider than 256 channels, and narrow im2col ones. The blocks
//! sit inside the fixed parts of the batch ([`super::super::part_len`], widened to hold one
//! block and capped so there are at least [`MIN_PARTS`] parts), so the summation order depends
//! on the batch and the geometry only, never on the thread count: results stay reproducible.
//! Measured in `benches/conv_kernels.rs` and on torchvision ResNet-18 (see the README's speed
//! section).

use super::{copy_run, mat, mat_mut, Geom, Path};
use crate::engine::ops::unzeroed;
use ndarray::linalg::general_mat_mul;
use ndarray::{s, ArrayView2, ArrayViewMut2, Axis};
use rayon::prelude::*;

/// Planes with fewer outputs than this are batched until a block has about this many columns.
pub(super) const BLOCK_COLS: usize = 256;
/// Blocks never merge the batch into fewer parts than this (parallelism over 2-4 cores).
pub(super) const MIN_PARTS: usize = 4;
/// Column ranges of a blocked weight gradient, one GEMM each (parallelism over 2-4 cores).
const DW_SPLIT: usize = 4;
/// Fewest columns per range of that split: below it (a weight gradient of fewer than
/// `DW_SPLIT * MIN_SPLIT_COLS` columns) the batch is split instead
/// ([`Geom::weight_grad_blocked_by_batch`]).
const MIN_SPLIT_COLS: usize = 64;

/// Scratch of one rayon task for blocked convs.
pub(super) struct BlockScratch {
    /// One image's im2col columns `[k, ohw]`.
    col: Vec<f32>,
    /// The block's columns `[k, B*ohw]` (forward), or its column gradient (backward).
    wide: Vec<f32>,
    /// The block's output `[co, B*ohw]` (forward only).
    out: Vec<f32>,
}

impl Geom {
    /// [`Self::weight_grad_blocked`] for narrow weights: `DW_SPLIT` fixed ranges of the batch's
    /// columns, one whole `dW` per range, summed in range order (the same sums whatever the
    /// thread count). Split over `k`, a 24-column weight gradient ran as four GEMMs of 6
    /// columns that each repacked all of `dY` (MobileNet-V3's 24 -> 88 pointwise layer on 8x8,
    /// batch 64: its weight gradient 0.83 ms at 1 thread).
    fn weight_grad_blocked_by_batch(
        &self,
        cols: ArrayView2<f32>,
        dys: ArrayView2<f32>,
        dw: &mut [f32],
    ) {
        let (k, len) = (self.k_rows(), cols.ncols());
        let chunk = len.div_ceil(DW_SPLIT).max(1);
        let partials: Vec<Vec<f32>> = (0..len.div_ceil(chunk))
            .into_par_iter()
            .with_max_len(1)
            .map(|i| {
                let r = i * chunk..((i + 1) * chunk).min(len);
                let mut part = vec![0.0f32; self.co * k];
                general_mat_mul(
                    1.0,
                    &dys.slice(s![.., r.clone()]),
                    &cols.slice(s![.., r]).t(),
                    0.0,
                    &mut mat_mut(&mut part, self.co, k),
                );
                part
            })
            .collect();
        // Summed in range order, so the sums do not depend on the thread count.
        let parts: Vec<&[f32]> = partials.iter().map(Vec::as_slice).collect();
        super::sum_parts_in_order(&parts, dw);
    }

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

    /// Scratch for [`Self::forward_block`] (`forward`) or [`Self::backward_part_blocked`],
    /// which has no use for `out`: its output gradients go to the batch-wide matrix.
    pub(super) fn block_scratch(&self, forward: bool) -> BlockScratch {
        let cols = self.block_images() * self.oh * self.ow;
        let k = self.k_rows();
        // Every entry is written before it is read: `col` by im2col, `wide` by the copies or
        // the input-gradient GEMM (beta 0), `out` by the bias fill or the GEMM (beta 0).
        BlockScratch {
            col: unzeroed(self.col_len()),
            wide: unzeroed(k * cols),
            out: unzeroed(if forward { self.co * cols } else { 0 }),
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
                copy_run(
                    &mut s.wide[r * cols + j * ohw..][..ohw],
                    &src[r * ohw..][..ohw],
                );
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
                copy_run(row, &out[c * cols + j * ohw..][..ohw]);
            }
        }
    }

    /// One batch part's share of a blocked backward: lays the part's column matrices and output
    /// gradients into its column range of the batch-wide `cols` (`[k, N*ohw]`) and `dys`
    /// (`[co, N*ohw]`), from which [`Self::weight_grad_blocked`] makes the weight gradient in
    /// one GEMM; writes `dx` (zeroed on entry) when given, a block of images per GEMM.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_part_blocked(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        mut dx: Option<&mut [f32]>,
        mut cols: ArrayViewMut2<f32>,
        mut dys: ArrayViewMut2<f32>,
        s: &mut BlockScratch,
    ) {
        let (ohw, k, xlen, ylen) = (self.oh * self.ow, self.k_rows(), self.x_len(), self.y_len());
        let blk = self.block_images();
        let via_col = self.path == Path::Im2col;
        for (i, (xb, dyb)) in x.chunks(blk * xlen).zip(dy.chunks(blk * ylen)).enumerate() {
            let nb = xb.len() / xlen;
            let (c0, width) = (i * blk * ohw, nb * ohw);
            for (j, (xi, dyi)) in xb.chunks(xlen).zip(dyb.chunks(ylen)).enumerate() {
                let src: &[f32] = if via_col {
                    self.im2col(xi, &mut s.col);
                    &s.col
                } else {
                    xi
                };
                let at = c0 + j * ohw;
                for (r, mut row) in cols.rows_mut().into_iter().enumerate() {
                    let row = row
                        .as_slice_mut()
                        .expect("rows of a column range are contiguous");
                    copy_run(&mut row[at..][..ohw], &src[r * ohw..][..ohw]);
                }
                for (c, mut row) in dys.rows_mut().into_iter().enumerate() {
                    let row = row
                        .as_slice_mut()
                        .expect("rows of a column range are contiguous");
                    copy_run(&mut row[at..][..ohw], &dyi[c * ohw..][..ohw]);
                }
            }
            let Some(dx) = dx.as_deref_mut() else {
                continue;
            };
            let dcol = &mut s.wide[..k * width];
            general_mat_mul(
                1.0,
                &mat(w, self.co, k).t(),
                &dys.slice(s![.., c0..c0 + width]),
                0.0,
                &mut mat_mut(dcol, k, width),
            );
            let dxb = &mut dx[i * blk * xlen..][..nb * xlen];
            for (j, dxi) in dxb.chunks_mut(xlen).enumerate() {
                // Image j's column gradient: through its im2col matrix, or straight into dx for
                // a pointwise conv (its column matrix is the image).
                let dst: &mut [f32] = if via_col { &mut s.col } else { dxi };
                for r in 0..k {
                    copy_run(
                        &mut dst[r * ohw..][..ohw],
                        &dcol[r * width + j * ohw..][..ohw],
                    );
                }
                if via_col {
                    self.col2im(&mut s.col, dxi);
                }
            }
        }
    }

    /// `dW = dY . col^T` over the whole batch in one GEMM (inner dimension `N*ohw`), its columns
    /// split in [`DW_SPLIT`] fixed ranges across threads. Per part, the weight gradient of a
    /// small-plane conv was a GEMM with an inner dimension of one block (64 columns for
    /// ResNet-18's 2x2 stage) that streamed the whole `[co, k]` output through memory per part,
    /// then a sum over the parts' copies; here each output is written once, and the split over
    /// `k` (not `co`) repacks only `dY`, the smaller operand. The sum runs over the batch in one
    /// order whatever the thread count.
    pub(super) fn weight_grad_blocked(
        &self,
        cols: ArrayView2<f32>,
        dys: ArrayView2<f32>,
        dw: &mut [f32],
    ) {
        let k = self.k_rows();
        if k < DW_SPLIT * MIN_SPLIT_COLS {
            return self.weight_grad_blocked_by_batch(cols, dys, dw);
        }
        let chunk = k.div_ceil(DW_SPLIT);
        let mut rest = mat_mut(dw, self.co, k);
        let mut views = Vec::with_capacity(DW_SPLIT);
        let mut c0 = 0;
        while c0 < k {
            let width = chunk.min(k - c0);
            let (head, tail) = rest.split_at(Axis(1), width);
            views.push((c0, head));
            rest = tail;
            c0 += width;
        }
        views.into_par_iter().for_each(|(c0, mut out)| {
            let width = out.ncols();
            general_mat_mul(
                1.0,
                &dys,
                &cols.slice(s![c0..c0 + width, ..]).t(),
                0.0,
                &mut out,
            );
        });
    }
}
