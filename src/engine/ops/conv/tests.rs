//! Conv kernels against the seven-loop reference and f64 finite differences.

use super::*;
use crate::engine::ops::testutil::*;
use crate::engine::EngineError;
use ndarray::{Array1, Array2, Array4, Axis};

fn conv(group: usize, strides: [usize; 2], pads: [usize; 4], dilations: [usize; 2]) -> Conv2d {
    Conv2d {
        group,
        strides,
        pads,
        dilations,
    }
}

/// Fast forward against the reference, then every gradient against f64 finite differences of
/// `sum(reference(x, w, b) * r)`.
fn check(c: &Conv2d, xs: [usize; 4], ws: [usize; 4], bias: bool, expect: Path, seed: u64) {
    let g = c.geom(&xs, &ws).unwrap();
    assert_eq!(g.path, expect, "path chosen for {c:?}");
    check_against_reference(c, xs, ws, bias, seed, assert_grad);
}

type GradCheck = fn(&str, &ndarray::ArrayView4<f32>, &ndarray::ArrayView4<f64>);

/// Forward against the reference, every gradient against finite differences; `grad_check` is
/// [`assert_grad`], or [`assert_grad_or_zero`] for random geometries that may ignore the input.
fn check_against_reference(
    c: &Conv2d,
    xs: [usize; 4],
    ws: [usize; 4],
    bias: bool,
    seed: u64,
    grad_check: GradCheck,
) {
    let mut rng = Rng::new(seed);
    let x = rand_array(&mut rng, xs, -1.0, 1.0);
    let w = rand_array(&mut rng, ws, -1.0, 1.0);
    let b = bias.then(|| rand_array(&mut rng, ws[0], -1.0, 1.0));
    let y = c
        .forward(x.view(), w.view(), b.as_ref().map(|b| b.view()))
        .unwrap();
    let yr = c
        .reference(x.view(), w.view(), b.as_ref().map(|b| b.view()))
        .unwrap();
    assert_eq!(y.shape(), c.output_shape(&xs, &ws).unwrap());
    assert_close("forward", &y.view(), &yr.view(), 1e-5);

    let r = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
    let grads = c.backward(x.view(), w.view(), r.view(), true).unwrap();
    let (x64, w64, r64) = (to_f64(&x.view()), to_f64(&w.view()), to_f64(&r.view()));
    let b64 = b.as_ref().map(|b| to_f64(&b.view()));
    let loss = |x: &Array4<f64>, w: &Array4<f64>, b: Option<&Array1<f64>>| {
        dot_loss(
            &c.reference(x.view(), w.view(), b.map(|b| b.view()))
                .unwrap(),
            &r64,
        )
    };
    let fdx = fd_grad(&x64, |x| loss(x, &w64, b64.as_ref()));
    grad_check("dx", &grads.dx.as_ref().unwrap().view(), &fdx.view());
    let fdw = fd_grad(&w64, |w| loss(&x64, w, b64.as_ref()));
    grad_check("dw", &grads.dw.view(), &fdw.view());
    if let Some(b64) = &b64 {
        let fdb = fd_grad(b64, |b| loss(&x64, &w64, Some(b)));
        assert_grad("db", &grads.db.view(), &fdb.view());
    }
    // Without dx the weight gradient is unchanged.
    let no_dx = c.backward(x.view(), w.view(), r.view(), false).unwrap();
    assert!(no_dx.dx.is_none());
    assert_eq!(no_dx.dw, grads.dw);
}

#[test]
fn k3_pad1_group1_with_bias() {
    check(
        &conv(1, [1, 1], [1, 1, 1, 1], [1, 1]),
        [3, 5, 7, 6],
        [4, 5, 3, 3],
        true,
        Path::Im2col,
        1,
    );
}

#[test]
fn k3_no_pad_no_bias() {
    check(
        &conv(1, [1, 1], [0; 4], [1, 1]),
        [3, 3, 6, 7],
        [5, 3, 3, 3],
        false,
        Path::Im2col,
        2,
    );
}

#[test]
fn stride2_asymmetric_pads() {
    check(
        &conv(1, [2, 2], [1, 0, 2, 1], [1, 1]),
        [3, 4, 7, 9],
        [6, 4, 3, 3],
        true,
        Path::Im2col,
        3,
    );
}

#[test]
fn dilation2() {
    check(
        &conv(1, [1, 1], [2, 2, 2, 2], [2, 2]),
        [3, 3, 7, 6],
        [4, 3, 3, 3],
        true,
        Path::Im2col,
        4,
    );
}

#[test]
fn rectangular_kernel_mixed_strides_and_dilations() {
    check(
        &conv(1, [2, 1], [0, 1, 1, 0], [1, 2]),
        [3, 3, 8, 7],
        [4, 3, 3, 2],
        true,
        Path::Im2col,
        5,
    );
}

#[test]
fn pointwise_plain_gemm() {
    check(
        &conv(1, [1, 1], [0; 4], [1, 1]),
        [3, 6, 5, 7],
        [9, 6, 1, 1],
        true,
        Path::Pointwise,
        6,
    );
}

#[test]
fn pointwise_grouped() {
    check(
        &conv(2, [1, 1], [0; 4], [1, 1]),
        [3, 6, 5, 3],
        [4, 3, 1, 1],
        true,
        Path::Pointwise,
        7,
    );
}

#[test]
fn pointwise_stride2_goes_through_im2col() {
    check(
        &conv(1, [2, 2], [0; 4], [1, 1]),
        [3, 5, 7, 6],
        [8, 5, 1, 1],
        false,
        Path::Im2col,
        8,
    );
}

#[test]
fn grouped2_k3_stride2() {
    check(
        &conv(2, [2, 2], [1, 1, 1, 1], [1, 1]),
        [3, 4, 7, 5],
        [6, 2, 3, 3],
        true,
        Path::Im2col,
        9,
    );
}

#[test]
fn grouped4_dilated() {
    check(
        &conv(4, [1, 1], [2, 1, 0, 2], [2, 2]),
        [3, 8, 6, 5],
        [8, 2, 3, 3],
        false,
        Path::Im2col,
        10,
    );
}

#[test]
fn depthwise_k3_pad1() {
    check(
        &conv(5, [1, 1], [1, 1, 1, 1], [1, 1]),
        [3, 5, 7, 6],
        [5, 1, 3, 3],
        true,
        Path::Depthwise,
        11,
    );
}

#[test]
fn depthwise_stride2_asymmetric_pads() {
    check(
        &conv(4, [2, 2], [0, 1, 1, 2], [1, 1]),
        [3, 4, 9, 7],
        [4, 1, 3, 3],
        true,
        Path::Depthwise,
        12,
    );
}

#[test]
fn depthwise_dilation2_no_bias() {
    check(
        &conv(3, [1, 1], [2, 2, 2, 2], [2, 2]),
        [3, 3, 7, 8],
        [3, 1, 3, 3],
        false,
        Path::Depthwise,
        13,
    );
}

#[test]
fn depthwise_channel_multiplier2() {
    check(
        &conv(3, [1, 2], [1, 1, 1, 1], [1, 1]),
        [3, 3, 6, 7],
        [6, 1, 3, 3],
        true,
        Path::Depthwise,
        14,
    );
}

#[test]
fn depthwise_multiplier3_stride1_asymmetric_dilated() {
    check(
        &conv(2, [1, 1], [2, 0, 1, 3], [2, 1]),
        [3, 2, 7, 6],
        [6, 1, 3, 2],
        true,
        Path::Depthwise,
        22,
    );
}

/// Vertical stride only: the row loops with contiguous rows (the flat path needs stride 1).
#[test]
fn depthwise_vertical_stride2() {
    check(
        &conv(3, [2, 1], [1, 2, 0, 1], [1, 1]),
        [3, 3, 8, 6],
        [3, 1, 3, 3],
        true,
        Path::Depthwise,
        23,
    );
}

#[test]
fn depthwise_k5_stride2() {
    check(
        &conv(4, [2, 2], [2, 2, 2, 2], [1, 1]),
        [3, 4, 9, 8],
        [4, 1, 5, 5],
        true,
        Path::Depthwise,
        15,
    );
}

#[test]
fn single_input_channel_is_plain_conv() {
    check(
        &conv(1, [1, 1], [1, 1, 1, 1], [1, 1]),
        [3, 1, 6, 5],
        [4, 1, 3, 3],
        true,
        Path::Im2col,
        16,
    );
}

/// ResNet-20's first layer and a wider layer, forward only (FD would be slow): exercises long
/// rows and the BLAS path with many parts of the batch.
#[test]
fn resnet_sized_forward_matches_reference() {
    let mut rng = Rng::new(17);
    for (c, xs, ws) in [
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [17, 3, 32, 32],
            [16, 3, 3, 3],
        ),
        (
            conv(1, [2, 2], [1; 4], [1, 1]),
            [5, 16, 16, 16],
            [32, 16, 3, 3],
        ),
        (
            conv(1, [1, 1], [0; 4], [1, 1]),
            [5, 32, 8, 8],
            [64, 32, 1, 1],
        ),
        (
            conv(32, [1, 1], [1; 4], [1, 1]),
            [5, 32, 8, 8],
            [32, 1, 3, 3],
        ),
    ] {
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let b = rand_array(&mut rng, ws[0], -1.0, 1.0);
        let y = c.forward(x.view(), w.view(), Some(b.view())).unwrap();
        let yr = c.reference(x.view(), w.view(), Some(b.view())).unwrap();
        assert_close("forward", &y.view(), &yr.view(), 1e-5);
    }
}

#[test]
fn non_standard_layout_inputs_are_accepted() {
    let mut rng = Rng::new(18);
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let x = rand_array(&mut rng, [4, 3, 5, 6], -1.0, 1.0);
    let w = rand_array(&mut rng, [4, 3, 3, 3], -1.0, 1.0);
    // Same logical tensor stored NHWC-style: permuted view of a permuted copy.
    let x_nhwc = x
        .view()
        .permuted_axes([0, 2, 3, 1])
        .as_standard_layout()
        .into_owned();
    let x_view = x_nhwc.view().permuted_axes([0, 3, 1, 2]);
    assert!(!x_view.is_standard_layout());
    let y = c.forward(x_view, w.view(), None).unwrap();
    let yr = c.forward(x.view(), w.view(), None).unwrap();
    assert_eq!(y, yr);
}

/// Weight gradients are summed over a fixed partition of the batch, so they must not depend
/// on how many threads ran or how work was stolen.
#[test]
fn backward_is_bitwise_reproducible_across_thread_counts() {
    let mut rng = Rng::new(19);
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let x = rand_array(&mut rng, [37, 8, 8, 8], -1.0, 1.0);
    let w = rand_array(&mut rng, [16, 8, 3, 3], -1.0, 1.0);
    let dy = rand_array(&mut rng, [37, 16, 8, 8], -1.0, 1.0);
    let run = |threads: usize| {
        on_threads(threads, || {
            c.backward(x.view(), w.view(), dy.view(), true).unwrap()
        })
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.dw, b.dw);
    assert_eq!(a.db, b.db);
    assert_eq!(a.dx, b.dx);
}

/// The FD tests use batch 3, one image per part; this covers parts of several images (scratch
/// buffers reused across images, weight gradients accumulated): the batch's gradients must
/// equal the per-image ones, summed for the weights.
#[test]
fn batched_backward_equals_per_image_backward() {
    let mut rng = Rng::new(21);
    for (c, xs, ws) in [
        (conv(1, [1, 1], [1; 4], [1, 1]), [37, 4, 6, 5], [6, 4, 3, 3]),
        (
            conv(2, [2, 1], [0, 1, 1, 0], [1, 2]),
            [37, 4, 7, 6],
            [6, 2, 3, 2],
        ),
        (conv(1, [1, 1], [0; 4], [1, 1]), [37, 8, 3, 5], [9, 8, 1, 1]),
        (conv(4, [1, 2], [1; 4], [1, 1]), [37, 4, 6, 7], [8, 1, 3, 3]),
        (conv(4, [1, 1], [1; 4], [1, 1]), [37, 4, 6, 7], [8, 1, 3, 3]),
    ] {
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, c.output_shape(&xs, &ws).unwrap(), -1.0, 1.0);
        let all = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
        let mut dw = Array4::<f32>::zeros(w.raw_dim());
        let mut db = Array1::<f32>::zeros(ws[0]);
        for i in 0..xs[0] {
            let one = |a: &Array4<f32>| a.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
            let g = c
                .backward(one(&x).view(), w.view(), one(&dy).view(), true)
                .unwrap();
            let dxi = one(all.dx.as_ref().unwrap());
            assert_close("dx", &dxi.view(), &g.dx.unwrap().view(), 1e-6);
            dw += &g.dw;
            db += &g.db;
        }
        assert_close("dw", &all.dw.view(), &dw.view(), 1e-5);
        assert_close("db", &all.db.view(), &db.view(), 1e-5);
    }
}

/// Small output planes run several images per GEMM (`block.rs`): those geometries, with
/// blocks of several images and a last, shorter block, match the reference forward and f64
/// finite differences of every gradient, and the batch's forward equals the per-image one.
#[test]
fn blocked_convs_match_reference_and_finite_differences() {
    for (c, xs, ws, bias) in [
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [11, 3, 4, 4],
            [5, 3, 3, 3],
            true,
        ),
        (
            conv(1, [2, 2], [1, 0, 0, 1], [1, 1]),
            [10, 2, 5, 4],
            [4, 2, 3, 3],
            false,
        ),
        (
            conv(1, [1, 1], [0; 4], [1, 1]),
            [10, 6, 2, 3],
            [4, 6, 1, 1],
            true,
        ),
    ] {
        let g = c.geom(&xs, &ws).unwrap();
        let blk = g.block_images();
        assert!(blk > 1 && xs[0] % blk != 0, "{c:?}: block of {blk} images");
        check_against_reference(&c, xs, ws, bias, 31, assert_grad);
        let mut rng = Rng::new(5);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let y = c.forward(x.view(), w.view(), None).unwrap();
        for i in 0..xs[0] {
            let xi = x.slice(ndarray::s![i..i + 1, .., .., ..]);
            let yi = c.forward(xi, w.view(), None).unwrap();
            let row = y.slice(ndarray::s![i..i + 1, .., .., ..]);
            assert_close("forward", &row, &yi.view(), 1e-6);
        }
    }
}

#[test]
fn empty_batch_gives_empty_output() {
    let c = Conv2d::default();
    let x = Array4::<f32>::zeros((0, 3, 4, 4));
    let w = Array4::<f32>::zeros((2, 3, 1, 1));
    assert_eq!(
        c.forward(x.view(), w.view(), None).unwrap().shape(),
        &[0, 2, 4, 4]
    );
    let dy = Array4::<f32>::zeros((0, 2, 4, 4));
    let g = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
    assert_eq!(g.dw, Array4::<f32>::zeros((2, 3, 1, 1)));
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let c = Conv2d::default();
    let shape = |r: Result<[usize; 4]>| matches!(r, Err(EngineError::Shape { .. }));
    let attr = |r: Result<[usize; 4]>| matches!(r, Err(EngineError::Attribute { .. }));
    assert!(shape(c.output_shape(&[1, 3, 8, 8], &[4, 2, 3, 3])));
    assert!(shape(c.output_shape(&[1, 3, 8], &[4, 3, 3, 3])));
    assert!(shape(c.output_shape(&[1, 3, 2, 8], &[4, 3, 3, 3])));
    assert!(shape(c.output_shape(&[1, 0, 8, 8], &[4, 0, 3, 3])));
    assert!(shape(
        conv(2, [1, 1], [0; 4], [1, 1]).output_shape(&[1, 4, 8, 8], &[3, 2, 3, 3])
    ));
    assert!(attr(
        conv(0, [1, 1], [0; 4], [1, 1]).output_shape(&[1, 4, 8, 8], &[4, 4, 3, 3])
    ));
    assert!(attr(
        conv(1, [0, 1], [0; 4], [1, 1]).output_shape(&[1, 4, 8, 8], &[4, 4, 3, 3])
    ));
    assert!(attr(
        conv(1, [1, 1], [0; 4], [1, 0]).output_shape(&[1, 4, 8, 8], &[4, 4, 3, 3])
    ));
    let x = Array4::<f32>::zeros((1, 3, 8, 8));
    let w = Array4::<f32>::zeros((4, 3, 3, 3));
    let b = Array1::<f32>::zeros(5);
    assert!(c.forward(x.view(), w.view(), Some(b.view())).is_err());
    let dy = Array4::<f32>::zeros((1, 4, 8, 8));
    assert!(c.backward(x.view(), w.view(), dy.view(), true).is_err());
}

/// The bias gradient is the sum of `dy` over everything but channels.
#[test]
fn bias_gradient_is_channel_sum() {
    let mut rng = Rng::new(20);
    let c = Conv2d::default();
    let x = rand_array(&mut rng, [3, 2, 4, 4], -1.0, 1.0);
    let w = rand_array(&mut rng, [5, 2, 1, 1], -1.0, 1.0);
    let dy = rand_array(&mut rng, [3, 5, 4, 4], -1.0, 1.0);
    let g = c.backward(x.view(), w.view(), dy.view(), false).unwrap();
    let want = dy.sum_axis(Axis(0)).sum_axis(Axis(1)).sum_axis(Axis(1));
    assert_close("db", &g.db.view(), &want.view(), 1e-6);
}

/// The fused 3- and 9-tap depthwise forward gives bitwise the generic per-tap result.
#[test]
fn fused_depthwise_rows_equal_generic_passes_bitwise() {
    let mut rng = Rng::new(21);
    for (ws, pads, dil) in [
        ([6, 1, 3, 1], [1, 0, 1, 0], 1),
        ([6, 1, 1, 3], [0, 1, 0, 1], 1),
        ([6, 1, 3, 3], [1, 1, 1, 1], 1),
        ([6, 1, 3, 3], [2, 2, 2, 2], 2),
        ([12, 1, 3, 3], [0, 1, 2, 1], 1),
    ] {
        let c = conv(6, [1, 1], pads, [dil, dil]);
        let xs = [1, 6, 7, 9];
        let g = c.geom(&xs, &ws).unwrap();
        assert_eq!(g.path, Path::Depthwise);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let bias = rand_array(&mut rng, g.y_len(), -1.0, 1.0).to_vec();
        let (mut fused, mut generic) = (bias.clone(), bias);
        let (xv, wv) = (x.as_slice().unwrap(), w.as_slice().unwrap());
        g.depthwise_forward_flat_with(xv, wv, &mut fused, true);
        g.depthwise_forward_flat_with(xv, wv, &mut generic, false);
        let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&fused), bits(&generic), "{ws:?} {pads:?} dil {dil}");
    }
}

/// EfficientNet-B0's depthwise geometries in miniature (3x3 and 5x5, stride 1 and 2, planes
/// down to 2x2, a channel count that leaves a partial tile) against the reference and finite
/// differences, whichever depthwise path runs them.
#[test]
fn depthwise_efficientnet_geometries() {
    for (i, (ch, k, s, px)) in [
        (11, 3, 2, 8),
        (9, 3, 1, 4),
        (10, 5, 1, 4),
        (10, 5, 2, 4),
        (17, 5, 1, 2),
        (9, 3, 1, 2),
        (3, 5, 1, 8),
        (5, 5, 2, 9),
    ]
    .into_iter()
    .enumerate()
    {
        let c = conv(ch, [s, s], [k / 2; 4], [1, 1]);
        let (xs, ws) = ([2, ch, px, px], [ch, 1, k, k]);
        check(&c, xs, ws, i % 2 == 0, Path::Depthwise, 40 + i as u64);
    }
}

/// The channel-tile kernels against the per-channel ones on every kind of geometry they take
/// (strides, dilations, asymmetric pads, channel multipliers, partial tiles, 1-pixel planes):
/// forward bitwise at stride 1 (same summation order) and within rounding otherwise; backward
/// within rounding (the weight gradient sums each plane in row order, not by eight-way dot).
/// Depthwise geometries of every kind the tiled and channels-last kernels take: `(groups,
/// channel multiplier, input (h, w), kernel, strides, pads, dilations)`.
#[allow(clippy::type_complexity)]
const DW_GEOMETRIES: [(
    usize,
    usize,
    (usize, usize),
    (usize, usize),
    [usize; 2],
    [usize; 4],
    [usize; 2],
); 10] = [
    (16, 1, (4, 4), (5, 5), [1, 1], [2, 2, 2, 2], [1, 1]),
    (13, 1, (2, 2), (3, 3), [1, 1], [1, 1, 1, 1], [1, 1]),
    (9, 1, (7, 5), (3, 3), [1, 1], [0, 1, 2, 1], [2, 1]),
    (8, 1, (9, 9), (3, 3), [2, 2], [1, 1, 1, 1], [1, 1]),
    (7, 1, (9, 8), (5, 5), [2, 2], [2, 2, 2, 2], [1, 1]),
    (5, 1, (8, 6), (3, 1), [2, 1], [1, 0, 0, 0], [1, 1]),
    (5, 2, (6, 7), (3, 3), [1, 2], [1, 1, 1, 1], [1, 1]),
    (3, 3, (7, 6), (3, 2), [1, 1], [2, 0, 1, 3], [2, 1]),
    (6, 1, (1, 1), (3, 3), [1, 1], [1, 1, 1, 1], [1, 1]),
    (4, 1, (5, 3), (1, 3), [3, 2], [0, 2, 0, 2], [1, 2]),
];

#[test]
fn tiled_depthwise_matches_per_channel_kernels() {
    let mut rng = Rng::new(23);
    for (group, cog, (h, w), (kh, kw), strides, pads, dil) in DW_GEOMETRIES {
        let c = conv(group, strides, pads, dil);
        let (xs, ws) = ([1, group, h, w], [group * cog, 1, kh, kw]);
        let g = c.geom(&xs, &ws).unwrap();
        let what = format!("{xs:?} {ws:?} {strides:?} {pads:?} {dil:?}");
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let wt = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, g.y_len(), -1.0, 1.0).to_vec();
        let bias = rand_array(&mut rng, g.y_len(), -1.0, 1.0).to_vec();
        let (xv, wv) = (x.as_slice().unwrap(), wt.as_slice().unwrap());
        let (mut tiled, mut per_channel) = (bias.clone(), bias);
        g.depthwise_forward_tiled(xv, wv, &mut tiled);
        g.depthwise_forward_per_channel(xv, wv, &mut per_channel);
        if strides == [1, 1] {
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&tiled), bits(&per_channel), "forward {what}");
        }
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                    "{what} [{i}]: {p} vs {q}"
                );
            }
        };
        close(&tiled, &per_channel, &format!("forward {what}"));
        // Gradients added onto non-zero accumulators, as the batch loop does.
        let dw0 = rand_array(&mut rng, wt.len(), -1.0, 1.0).to_vec();
        let (mut dx_t, mut dx_p) = (vec![0.0; g.x_len()], vec![0.0; g.x_len()]);
        let (mut dw_t, mut dw_p) = (dw0.clone(), dw0);
        g.depthwise_backward_tiled(xv, wv, &dy, Some(&mut dx_t), &mut dw_t);
        g.depthwise_backward_per_channel(xv, wv, &dy, Some(&mut dx_p), &mut dw_p);
        close(&dx_t, &dx_p, &format!("dx {what}"));
        close(&dw_t, &dw_p, &format!("dw {what}"));
        let mut dw_only = dw_t.clone();
        dw_only.iter_mut().for_each(|v| *v = 0.0);
        g.depthwise_backward_tiled(xv, wv, &dy, None, &mut dw_only);
        let mut dw_ref = vec![0.0; wt.len()];
        g.depthwise_backward_tiled(xv, wv, &dy, Some(&mut vec![0.0; g.x_len()]), &mut dw_ref);
        assert_eq!(dw_only, dw_ref, "dw without dx {what}");
    }
}

/// The flat stride-1 depthwise kernels as dispatched (AVX2 where the CPU has it) give the
/// baseline build's results bit for bit, forward and backward.
#[test]
fn dispatched_flat_depthwise_equals_the_baseline_build_bitwise() {
    let mut rng = Rng::new(31);
    let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    for (ch, k, px) in [(12, 3, 16), (9, 5, 11), (16, 3, 32)] {
        let c = conv(ch, [1, 1], [k / 2; 4], [1, 1]);
        let (xs, ws) = ([1, ch, px, px], [ch, 1, k, k]);
        let g = c.geom(&xs, &ws).unwrap();
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let (xv, wv) = (x.as_slice().unwrap(), w.as_slice().unwrap());
        let dy = rand_array(&mut rng, g.y_len(), -1.0, 1.0).to_vec();
        let (mut y1, mut y2) = (vec![0.5; g.y_len()], vec![0.5; g.y_len()]);
        g.depthwise_forward_flat(xv, wv, &mut y1);
        g.depthwise_forward_flat_with(xv, wv, &mut y2, true);
        assert_eq!(bits(&y1), bits(&y2), "forward {ch} {k} {px}");
        let (mut dx1, mut dx2) = (vec![0.0; g.x_len()], vec![0.0; g.x_len()]);
        let (mut dw1, mut dw2) = (vec![0.25; w.len()], vec![0.25; w.len()]);
        g.depthwise_backward_flat(xv, wv, &dy, Some(&mut dx1), &mut dw1);
        g.backward_flat_body(xv, wv, &dy, Some(&mut dx2), &mut dw2);
        assert_eq!(bits(&dx1), bits(&dx2), "dx {ch} {k} {px}");
        assert_eq!(bits(&dw1), bits(&dw2), "dw {ch} {k} {px}");
    }
}

/// The channels-last kernels against the tiled ones, image by image over a batch of three, on
/// every kind of geometry: forward and input gradient bitwise (same summation order; skipped
/// padded taps add exact zeros there), weight gradient within rounding (summed over the batch
/// before it is added, the tiled path per image), with and without the input gradient.
#[test]
fn channels_last_depthwise_matches_the_tiled_path() {
    let mut rng = Rng::new(29);
    let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    for (group, cog, (h, w), (kh, kw), strides, pads, dil) in DW_GEOMETRIES {
        let c = conv(group, strides, pads, dil);
        let (xs, ws) = ([3, group, h, w], [group * cog, 1, kh, kw]);
        let g = c.geom(&xs, &ws).unwrap();
        let what = format!("{xs:?} {ws:?} {strides:?} {pads:?} {dil:?}");
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let wt = rand_array(&mut rng, ws, -1.0, 1.0);
        let (xv, wv) = (x.as_slice().unwrap(), wt.as_slice().unwrap());
        let (xl, yl) = (g.x_len(), g.y_len());
        let dy = rand_array(&mut rng, 3 * yl, -1.0, 1.0).to_vec();
        let bias = rand_array(&mut rng, g.co, -1.0, 1.0).to_vec();
        let ohw = g.oh * g.ow;
        let mut tiled: Vec<f32> = (0..3 * yl).map(|i| bias[(i % yl) / ohw]).collect();
        for (yi, xi) in tiled.chunks_mut(yl).zip(xv.chunks(xl)) {
            g.depthwise_forward_tiled(xi, wv, yi);
        }
        let mut cl = vec![f32::NAN; 3 * yl];
        g.depthwise_forward_cl(xv, wv, Some(&bias), &mut cl);
        assert_eq!(bits(&cl), bits(&tiled), "forward {what}");

        let dw0 = rand_array(&mut rng, wt.len(), -1.0, 1.0).to_vec();
        let (mut dx_t, mut dx_c) = (vec![0.0; 3 * xl], vec![0.0; 3 * xl]);
        let (mut dw_t, mut dw_c) = (dw0.clone(), dw0.clone());
        for ((dxi, xi), dyi) in dx_t.chunks_mut(xl).zip(xv.chunks(xl)).zip(dy.chunks(yl)) {
            g.depthwise_backward_tiled(xi, wv, dyi, Some(dxi), &mut dw_t);
        }
        g.depthwise_backward_cl(xv, wv, &dy, Some(&mut dx_c), &mut dw_c);
        assert_eq!(bits(&dx_c), bits(&dx_t), "dx {what}");
        for (i, (p, q)) in dw_c.iter().zip(&dw_t).enumerate() {
            assert!(
                (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
                "dw {what} [{i}]: {p} vs {q}"
            );
        }
        let mut dw_only = dw0;
        g.depthwise_backward_cl(xv, wv, &dy, None, &mut dw_only);
        assert_eq!(bits(&dw_only), bits(&dw_c), "dw without dx {what}");
    }
}

/// A dilated kernel wider than a tiny input: some taps miss it entirely (this panicked in the
/// row-by-row im2col before it skipped such taps).
#[test]
fn kernel_labels_name_the_path_that_runs() {
    let x = [2, 8, 6, 6];
    let label = |c: Conv2d, w: [usize; 4]| c.kernel_label(&x, &w).unwrap();
    assert_eq!(
        label(conv(1, [1, 1], [0; 4], [1, 1]), [4, 8, 1, 1]),
        "Conv 1x1"
    );
    // A strided or padded 1x1 gathers its pixels through im2col.
    assert_eq!(
        label(conv(1, [2, 2], [0; 4], [1, 1]), [4, 8, 1, 1]),
        "Conv im2col"
    );
    assert_eq!(
        label(conv(1, [1, 1], [1; 4], [1, 1]), [4, 8, 3, 3]),
        "Conv im2col"
    );
    assert_eq!(
        label(conv(8, [1, 1], [1; 4], [1, 1]), [8, 1, 3, 3]),
        "Conv depthwise"
    );
    assert_eq!(
        label(conv(2, [1, 1], [1; 4], [1, 1]), [4, 4, 3, 3]),
        "Conv im2col"
    );
    assert!(conv(3, [1, 1], [0; 4], [1, 1])
        .kernel_label(&x, &[4, 8, 1, 1])
        .is_err());
    // Sixteen images of 6x6 outputs: ungrouped convs put several images in one GEMM.
    let x16 = [16, 8, 6, 6];
    let label16 = |c: Conv2d, w: [usize; 4]| c.kernel_label(&x16, &w).unwrap();
    assert_eq!(
        label16(conv(1, [1, 1], [0; 4], [1, 1]), [4, 8, 1, 1]),
        "Conv 1x1 blocked"
    );
    assert_eq!(
        label16(conv(1, [1, 1], [1; 4], [1, 1]), [4, 8, 3, 3]),
        "Conv im2col blocked"
    );
    assert_eq!(
        label16(conv(2, [1, 1], [1; 4], [1, 1]), [4, 4, 3, 3]),
        "Conv im2col"
    );
}

/// Found by the geometry property: a strided depthwise conv whose dilated side taps miss a
/// 1-pixel-wide input in every output column indexed before the row and panicked.
#[test]
fn depthwise_tap_missing_a_narrow_input() {
    check(
        &conv(2, [2, 1], [0, 2, 0, 2], [1, 2]),
        [1, 2, 2, 1],
        [2, 1, 1, 3],
        false,
        Path::Depthwise,
        31,
    );
}

#[test]
fn taps_that_miss_the_input() {
    for (stride, seed) in [(1, 5), (2, 6)] {
        let c = conv(1, [stride, stride], [2; 4], [2, 2]);
        check(&c, [2, 2, 5, 1], [3, 2, 3, 3], true, Path::Im2col, seed);
        check(
            &c,
            [1, 2, 1, 5],
            [2, 2, 3, 3],
            false,
            Path::Im2col,
            seed + 10,
        );
    }
}

/// The flat-tap im2col/col2im equal the row-by-row ones wherever they apply, including
/// asymmetric pads, dilation, kernels as large as the input and taps that miss it entirely.
#[test]
fn flat_taps_equal_row_by_row_im2col_and_col2im() {
    let mut rng = Rng::new(11);
    let mut flat_cases = 0;
    for (h, w) in [(1, 1), (2, 3), (5, 4), (7, 7), (6, 9)] {
        for (kh, kw) in [(1, 1), (3, 3), (1, 3), (3, 1), (5, 5), (3, 5)] {
            for dil in [1, 2] {
                for pads in [
                    [0, 0, 0, 0],
                    [1, 1, 1, 1],
                    [2, 0, 0, 2],
                    [0, 1, 2, 3],
                    [4, 4, 4, 4],
                ] {
                    let c = conv(1, [1, 1], pads, [dil, dil]);
                    let (xs, ws) = ([1, 2, h, w], [3, 2, kh, kw]);
                    let Ok(g) = c.geom(&xs, &ws) else { continue };
                    if g.path != Path::Im2col || !g.flat_taps() {
                        continue;
                    }
                    flat_cases += 1;
                    let x = rand_array(&mut rng, xs, -1.0, 1.0);
                    let xv = x.as_slice().unwrap();
                    let mut a = vec![f32::NAN; g.col_len()];
                    let mut b = vec![f32::NAN; g.col_len()];
                    g.im2col(xv, &mut a);
                    g.im2col_rows(xv, &mut b);
                    assert_eq!(a, b, "im2col {xs:?} {ws:?} {pads:?} dil {dil}");
                    let col = rand_array(&mut rng, g.col_len(), -1.0, 1.0).to_vec();
                    let (mut da, mut db) = (vec![0.0; g.x_len()], vec![0.0; g.x_len()]);
                    g.col2im(&mut col.clone(), &mut da);
                    g.col2im_rows(&col, &mut db);
                    for (i, (p, q)) in da.iter().zip(&db).enumerate() {
                        assert!((p - q).abs() <= 1e-6, "col2im {xs:?} {ws:?} {pads:?} [{i}]");
                    }
                }
            }
        }
    }
    assert!(flat_cases > 40, "only {flat_cases} flat geometries tried");
}

/// A stride far wider than the plane (a hostile file's) needs no stride-sized buffer: the
/// column phases past the width are not stored. Values and gradients match the reference.
#[test]
fn stride_far_beyond_the_plane_matches_the_reference() {
    let c = conv(1, [1 << 40, 1 << 40], [1, 1, 1, 1], [1, 1]);
    check(&c, [2, 3, 4, 5], [4, 3, 3, 3], true, Path::Im2col, 31);
}

/// Strided im2col (through column phases) equals its definition entry by entry, and col2im is
/// its adjoint: `<col, im2col(x)> = <col2im(col), x>`, over strides 2-3, odd and even widths,
/// pads and dilations, including taps whose offset is negative.
#[test]
fn strided_im2col_matches_its_definition_and_col2im_is_its_adjoint() {
    let mut rng = Rng::new(12);
    let mut cases = 0;
    for (h, w) in [(1, 1), (3, 4), (5, 7), (8, 9), (11, 6)] {
        for (kh, kw) in [(1, 1), (3, 3), (7, 7), (1, 3), (2, 5)] {
            for strides in [[2, 2], [1, 3], [3, 2]] {
                for (dil, pads) in [(1, [0; 4]), (1, [3, 3, 3, 3]), (2, [1, 0, 2, 3])] {
                    let c = conv(1, strides, pads, [dil, dil]);
                    let (xs, ws) = ([1, 2, h, w], [3, 2, kh, kw]);
                    let Ok(g) = c.geom(&xs, &ws) else { continue };
                    if g.path != Path::Im2col || g.flat_taps() {
                        continue;
                    }
                    cases += 1;
                    let x = rand_array(&mut rng, xs, -1.0, 1.0);
                    let xv = x.as_slice().unwrap();
                    let mut col = vec![f32::NAN; g.col_len()];
                    g.im2col_rows(xv, &mut col);
                    let ohw = g.oh * g.ow;
                    for (r, row) in col.chunks(ohw).enumerate() {
                        let (ci, ki, kj) = (r / (kh * kw), r / kw % kh, r % kw);
                        for (o, &v) in row.iter().enumerate() {
                            let iy = (o / g.ow * g.sh + ki * g.dh) as isize - g.pt as isize;
                            let ix = (o % g.ow * g.sw + kj * g.dw) as isize - g.pl as isize;
                            let inside =
                                (0..h as isize).contains(&iy) && (0..w as isize).contains(&ix);
                            let want = if inside {
                                x[[0, ci, iy as usize, ix as usize]]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                v, want,
                                "{xs:?} {ws:?} {strides:?} {pads:?} dil {dil} [{r}, {o}]"
                            );
                        }
                    }
                    let dcol = rand_array(&mut rng, g.col_len(), -1.0, 1.0).to_vec();
                    let mut dx = vec![0.0f32; g.x_len()];
                    g.col2im_rows(&dcol, &mut dx);
                    let lhs: f64 = dcol.iter().zip(&col).map(|(a, b)| (a * b) as f64).sum();
                    let rhs: f64 = dx.iter().zip(xv).map(|(a, b)| (a * b) as f64).sum();
                    assert!(
                        (lhs - rhs).abs() <= 1e-4 * (1.0 + lhs.abs()),
                        "{xs:?} {ws:?} {strides:?}: {lhs} vs {rhs}"
                    );
                }
            }
        }
    }
    assert!(cases > 60, "only {cases} strided geometries tried");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// A conv geometry drawn at random, valid or not: small enough for finite differences.
    #[derive(Clone, Debug)]
    struct Case {
        conv: Conv2d,
        xs: [usize; 4],
        ws: [usize; 4],
        bias: bool,
        seed: u64,
    }

    fn case() -> impl Strategy<Value = Case> {
        (
            (
                1..3usize,
                1..4usize,
                1..3usize,
                1..4usize,
                1..9usize,
                1..9usize,
            ),
            (
                1..4usize,
                1..4usize,
                [1..3usize, 1..3usize],
                [1..3usize, 1..3usize],
            ),
            (
                [0..3usize, 0..3usize, 0..3usize, 0..3usize],
                any::<bool>(),
                any::<u64>(),
            ),
            prop_oneof![Just(false), Just(true)],
        )
            .prop_map(
                |(
                    (n, group, cig, cog, h, w),
                    (kh, kw, strides, dilations),
                    (pads, bias, seed),
                    dw,
                )| {
                    // Half the cases with one input channel per group: the depthwise path.
                    let cig = if dw { 1 } else { cig };
                    Case {
                        conv: conv(group, strides, pads, dilations),
                        xs: [n, group * cig, h, w],
                        ws: [group * cog, cig, kh, kw],
                        bias,
                        seed,
                    }
                },
            )
    }

    /// Any geometry the op accepts: the fast path equals the seven-loop reference and every
    /// gradient matches finite differences, whichever path (pointwise, depthwise, im2col with
    /// flat or row-by-row taps) runs it. Any geometry it refuses: an error, not a panic, from
    /// shape inference, forward and backward alike.
    #[test]
    fn any_geometry_matches_the_reference_or_is_refused() {
        // ELRT_PROPTEST_CASES=N for a longer (still deterministic) hunt.
        let (mut runner, cases) = prop_runner(256);
        let accepted = std::cell::Cell::new(0);
        runner
            .run(&case(), |t| {
                match t.conv.output_shape(&t.xs, &t.ws) {
                    Ok(_) => {
                        accepted.set(accepted.get() + 1);
                        check_against_reference(
                            &t.conv,
                            t.xs,
                            t.ws,
                            t.bias,
                            t.seed,
                            assert_grad_or_zero,
                        )
                    }
                    Err(_) => {
                        let x = Array4::<f32>::zeros(t.xs);
                        let w = Array4::<f32>::zeros(t.ws);
                        prop_assert!(t.conv.forward(x.view(), w.view(), None).is_err());
                        let dy = Array4::<f32>::zeros([1, 1, 1, 1]);
                        prop_assert!(t
                            .conv
                            .backward(x.view(), w.view(), dy.view(), true)
                            .is_err());
                    }
                }
                Ok(())
            })
            .unwrap();
        // Enough of the draws are valid convolutions for the property to mean something.
        assert!(
            accepted.get() * 3 >= cases,
            "only {} of {cases} geometries accepted",
            accepted.get()
        );
    }
}

/// Forward and backward of `g` give the same bits on a pool of 1 thread and of 3.
fn assert_same_on_1_and_3_threads(g: &Geom, x: &Array4<f32>, w: &Array4<f32>, dy: &Array4<f32>) {
    let run = |threads: usize| {
        on_threads(threads, || {
            (
                Conv2d::forward_geom(g, x.view(), w.view(), None),
                Conv2d::backward_geom(g, x.view(), w.view(), dy.view(), true),
            )
        })
    };
    let ((ya, ga), (yb, gb)) = (run(1), run(3));
    assert_eq!(ya, yb);
    assert_eq!(ga.dx, gb.dx);
    assert_eq!(ga.dw, gb.dw);
}

/// The geometry of `c` with Winograd forced on with output tiles of side `tile` (2 or 4),
/// whatever the speed thresholds say, and its input gradient Winograd's too (not the
/// small-plane path's).
fn winograd_forced(c: &Conv2d, xs: [usize; 4], ws: [usize; 4], tile: usize) -> Geom {
    let mut g = c.geom(&xs, &ws).unwrap();
    assert!(g.winograd_eligible(), "{c:?} {xs:?} {ws:?}");
    g.winograd = true;
    g.wino_tile = tile;
    (g.small_plane, g.direct_fwd, g.wino_dw, g.wino_cl) = (false, false, false, false);
    g.wino_fused = false;
    g
}

/// The error bound of F(tile x tile, 3x3).
fn wino_tol(tile: usize) -> f64 {
    if tile == 4 {
        winograd::WINO4_REL_TOL
    } else {
        winograd::WINO_REL_TOL
    }
}

/// The input gradient of the convolution in `T`, straight from its definition (scatter of
/// `dy * w` over every tap): an oracle independent of Winograd's flipped-kernel relation.
fn dx_reference<T: NdFloat>(g: &Geom, dy: &Array4<T>, w: &Array4<T>) -> Array4<T> {
    let mut dx = Array4::<T>::zeros((g.n, g.ci, g.h, g.w));
    for n in 0..g.n {
        for o in 0..g.co {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let d = dy[[n, o, oy, ox]];
                    for c in 0..g.ci {
                        for ki in 0..g.kh {
                            let iy = (oy + ki) as isize - g.pt as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            for kj in 0..g.kw {
                                let ix = (ox + kj) as isize - g.pl as isize;
                                if ix < 0 || ix >= g.w as isize {
                                    continue;
                                }
                                dx[[n, c, iy as usize, ix as usize]] += d * w[[o, c, ki, kj]];
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// Largest `|fast - exact| / scale` over all entries (`scale`: the sum of absolute products).
fn scaled_error(fast: &Array4<f32>, exact: &Array4<f64>, scale: &Array4<f64>) -> f64 {
    fast.iter()
        .zip(exact)
        .zip(scale)
        .map(|((&f, &e), &s)| (f64::from(f) - e).abs() / s.max(1e-30))
        .fold(0.0, f64::max)
}

/// Random inputs of a forced geometry `g` (of `c` on `xs`, `ws`; a bias when `bias`), their f64
/// copies, the f64 reference forward and its scale `sum |w| |x| + |b|`: the set-up the
/// error tests share (drawn in one order, so each seed gives the same case).
struct ErrorCase {
    x: Array4<f32>,
    w: Array4<f32>,
    b: Option<Array1<f32>>,
    dy: Array4<f32>,
    x64: Array4<f64>,
    w64: Array4<f64>,
    dy64: Array4<f64>,
    b64abs: Option<Array1<f64>>,
    y64: Array4<f64>,
    yscale: Array4<f64>,
}

impl ErrorCase {
    fn draw(c: &Conv2d, g: &Geom, xs: [usize; 4], ws: [usize; 4], bias: bool, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let b = bias.then(|| rand_array(&mut rng, ws[0], -1.0, 1.0));
        let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
        let (x64, w64, dy64) = (to_f64(&x.view()), to_f64(&w.view()), to_f64(&dy.view()));
        let b64 = b.as_ref().map(|b| to_f64(&b.view()));
        let y64 = c
            .reference(x64.view(), w64.view(), b64.as_ref().map(|b| b.view()))
            .unwrap();
        let b64abs = b64.as_ref().map(|b| b.mapv(f64::abs));
        let yscale = c
            .reference(
                x64.mapv(f64::abs).view(),
                w64.mapv(f64::abs).view(),
                b64abs.as_ref().map(|b| b.view()),
            )
            .unwrap();
        ErrorCase {
            x,
            w,
            b,
            dy,
            x64,
            w64,
            dy64,
            b64abs,
            y64,
            yscale,
        }
    }

    /// `g`'s forward on the case.
    fn forward(&self, g: &Geom) -> Array4<f32> {
        Conv2d::forward_geom(
            g,
            self.x.view(),
            self.w.view(),
            self.b.as_ref().map(|b| b.view()),
        )
    }

    /// `g`'s backward on the case (with the input gradient when `need_dx`).
    fn backward(&self, g: &Geom, need_dx: bool) -> Conv2dGrads {
        Conv2d::backward_geom(g, self.x.view(), self.w.view(), self.dy.view(), need_dx)
    }
}

/// Forward and input-gradient errors of forced Winograd against f64, each scaled per output by
/// `sum |w| |x| + |b|` (forward) or `sum |w| |dy|` (input gradient).
fn winograd_errors(
    c: &Conv2d,
    xs: [usize; 4],
    ws: [usize; 4],
    bias: bool,
    seed: u64,
    tile: usize,
) -> (f64, f64) {
    let g = winograd_forced(c, xs, ws, tile);
    let d = ErrorCase::draw(c, &g, xs, ws, bias, seed);
    let abs = |a: &Array4<f64>| a.mapv(f64::abs);
    let fwd = scaled_error(&d.forward(&g), &d.y64, &d.yscale);
    let grads = d.backward(&g, true);
    let dx64 = dx_reference(&g, &d.dy64, &d.w64);
    let dxscale = dx_reference(&g, &abs(&d.dy64), &abs(&d.w64));
    let bwd = scaled_error(grads.dx.as_ref().unwrap(), &dx64, &dxscale);
    // The weight and bias gradients stay on im2col: the same as without Winograd.
    let plain_g = Geom {
        winograd: false,
        ..g
    };
    let plain = d.backward(&plain_g, true);
    assert_close("dw", &grads.dw.view(), &plain.dw.view(), 1e-5);
    assert_eq!(grads.db, plain.db);
    // im2col's own errors, for scale (printed by the random-geometry test).
    let fwd_plain = scaled_error(&d.forward(&plain_g), &d.y64, &d.yscale);
    let bwd_plain = scaled_error(plain.dx.as_ref().unwrap(), &dx64, &dxscale);
    IM2COL_WORST.with(|c| {
        let (f, b) = c.get();
        c.set((f.max(fwd_plain), b.max(bwd_plain)));
    });
    (fwd, bwd)
}

thread_local! {
    /// Worst scaled errors of im2col on the geometries `winograd_errors` saw on this thread.
    static IM2COL_WORST: std::cell::Cell<(f64, f64)> = const { std::cell::Cell::new((0.0, 0.0)) };
}

/// A random stride-1 3x3 geometry for the Winograd tests: pads 0-2 on each side (asymmetric),
/// planes of 1 to 13 pixels, batches of 1, 2, 5 or 9, 1 to 70 channels in and out; `None` when
/// the padded plane is narrower than the kernel (the caller draws again).
struct RandomWino {
    pads: [usize; 4],
    xs: [usize; 4],
    ws: [usize; 4],
}

impl RandomWino {
    fn draw(rng: &mut Rng) -> Option<Self> {
        let pads = [rng.below(3), rng.below(3), rng.below(3), rng.below(3)];
        let (h, w) = (1 + rng.below(13), 1 + rng.below(13));
        if h + pads[0] + pads[2] < 3 || w + pads[1] + pads[3] < 3 {
            return None;
        }
        let n = [1, 2, 5, 9][rng.below(4)];
        let (ci, co) = (1 + rng.below(70), 1 + rng.below(70));
        Some(RandomWino {
            pads,
            xs: [n, ci, h, w],
            ws: [co, ci, 3, 3],
        })
    }
}

/// Winograd F(2x2, 3x3) and F(4x4, 3x3) against f64 over random geometries: pads 0..2 on each
/// side (asymmetric), odd and even planes down to 1 pixel, batch 1 and several (blocks of
/// several images with a shorter last one), 1 to 70 channels. Error per output within
/// `WINO_REL_TOL` (F(2x2)) or `WINO4_REL_TOL` (F(4x4)) times the sum of absolute products,
/// forward and input gradient.
#[test]
fn winograd_matches_f64_within_bound_over_random_geometries() {
    for tile in [2, 4] {
        let mut rng = Rng::new(41);
        let (mut worst_f, mut worst_b) = (0.0f64, 0.0f64);
        let mut cases = 0;
        while cases < 60 {
            let Some(RandomWino { pads, xs, ws }) = RandomWino::draw(&mut rng) else {
                continue;
            };
            let ([n, ci, h, w], co) = (xs, ws[0]);
            let c = conv(1, [1, 1], pads, [1, 1]);
            let bias = rng.below(2) == 0;
            let (f, b) = winograd_errors(&c, xs, ws, bias, cases, tile);
            assert!(
                f <= wino_tol(tile) && b <= wino_tol(tile),
                "F({tile}) {pads:?} x [{n}, {ci}, {h}, {w}] co {co}: forward {f:e}, dx {b:e}"
            );
            (worst_f, worst_b) = (worst_f.max(f), worst_b.max(b));
            cases += 1;
        }
        let (pf, pb) = IM2COL_WORST.with(|c| c.get());
        eprintln!(
            "worst scaled error: winograd F({tile}) forward {worst_f:e}, dx {worst_b:e}; \
             im2col forward {pf:e}, dx {pb:e}"
        );
    }
}

/// Planes wide enough that the transforms' 8-lane steps and their scalar tails both run (the
/// random geometries stop at 13 pixels, 4 F(4x4) tiles): odd sizes, asymmetric pads.
#[test]
fn winograd_wide_odd_planes_within_bound() {
    for tile in [2, 4] {
        for (i, (pads, h, w)) in [([1, 2, 0, 1], 37, 45), ([0, 1, 2, 0], 61, 35)]
            .into_iter()
            .enumerate()
        {
            let c = conv(1, [1, 1], pads, [1, 1]);
            let (f, b) = winograd_errors(&c, [3, 5, h, w], [6, 5, 3, 3], true, 90 + i as u64, tile);
            assert!(
                f <= wino_tol(tile) && b <= wino_tol(tile),
                "F({tile}) {pads:?} {h}x{w}: forward {f:e}, dx {b:e}"
            );
        }
    }
}

/// ResNet-sized Winograd layers (the shapes the thresholds pick) within the same bounds.
#[test]
fn winograd_resnet_shapes_within_bound() {
    for tile in [2, 4] {
        for (n, ch, px) in [(3, 16, 32), (5, 64, 16), (9, 128, 8), (17, 256, 4)] {
            let c = conv(1, [1, 1], [1; 4], [1, 1]);
            let (f, b) =
                winograd_errors(&c, [n, ch, px, px], [ch, ch, 3, 3], true, ch as u64, tile);
            eprintln!("F({tile}) {ch}ch {px}px: winograd forward {f:e}, dx {b:e}");
            assert!(
                f <= wino_tol(tile) && b <= wino_tol(tile),
                "F({tile}) {ch}ch {px}px: forward {f:e}, dx {b:e}"
            );
        }
    }
}

/// The whole forced-Winograd chain against f64 finite differences of the reference loss (the
/// oracle of every other path), on a small odd geometry with asymmetric pads.
#[test]
fn winograd_gradients_match_finite_differences() {
    for tile in [2, 4] {
        winograd_gradients_match_finite_differences_at(tile, false);
    }
}

/// `cl`: the channels-last path (`winograd_cl.rs`) instead of the plane-wise one.
fn winograd_gradients_match_finite_differences_at(tile: usize, cl: bool) {
    let c = conv(1, [1, 1], [2, 0, 1, 2], [1, 1]);
    let (xs, ws) = ([3, 4, 5, 4], [3, 4, 3, 3]);
    let g = if cl {
        winograd_cl_forced(&c, xs, ws, tile)
    } else {
        winograd_forced(&c, xs, ws, tile)
    };
    let mut rng = Rng::new(43);
    let x = rand_array(&mut rng, xs, -1.0, 1.0);
    let w = rand_array(&mut rng, ws, -1.0, 1.0);
    let b = rand_array(&mut rng, ws[0], -1.0, 1.0);
    let y = Conv2d::forward_geom(&g, x.view(), w.view(), Some(b.view()));
    let yr = c.reference(x.view(), w.view(), Some(b.view())).unwrap();
    assert_close("forward", &y.view(), &yr.view(), 1e-5);
    let r = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
    let grads = Conv2d::backward_geom(&g, x.view(), w.view(), r.view(), true);
    let (x64, w64, r64) = (to_f64(&x.view()), to_f64(&w.view()), to_f64(&r.view()));
    let fdx = fd_grad(&x64, |x| {
        dot_loss(&c.reference(x.view(), w64.view(), None).unwrap(), &r64)
    });
    assert_grad("dx", &grads.dx.as_ref().unwrap().view(), &fdx.view());
    let fdw = fd_grad(&w64, |w| {
        dot_loss(&c.reference(x64.view(), w.view(), None).unwrap(), &r64)
    });
    assert_grad("dw", &grads.dw.view(), &fdw.view());
}

/// Winograd layers chosen by the thresholds: labelled as such, and bitwise independent of the
/// thread count, forward and backward.
#[test]
fn winograd_is_chosen_labelled_and_reproducible_across_thread_counts() {
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let (xs, ws) = ([37, 68, 8, 8], [68, 68, 3, 3]);
    let g = c.geom(&xs, &ws).unwrap();
    // 68 channels: past the fused path's 64 on 8x8 planes (`winograd_fused.rs`, on AVX-512).
    assert!(g.winograd || g.wino_cl || !winograd::auto_mode());
    if winograd::auto_mode() && small_plane::auto_mode() {
        // 8x8 planes block images: Winograd forward, the small-plane path backward (under 72
        // channels; from 72 the channels-last Winograd of `winograd_cl.rs`).
        assert_eq!(
            c.kernel_label(&xs, &ws).unwrap(),
            "Conv winograd+small-plane"
        );
        // 32x32 and 16x16 planes of 64 channels: F(4x4); 16x16 ones of 32 channels: F(2x2);
        // ResNet-20's 16 channels on 32x32: the direct kernel (`direct.rs`). Where the CPU has
        // AVX2 + FMA or AVX-512, all of them the fused path (up to 64 or 128 channels from
        // 16x16, `fused_widest`).
        let fused = winograd_fused::Build::best() != winograd_fused::Build::Portable;
        let or_fused = |label| if fused { "Conv winograd4-fused" } else { label };
        let w64 = [64, 64, 3, 3];
        assert_eq!(
            c.kernel_label(&[37, 64, 32, 32], &w64).unwrap(),
            or_fused("Conv winograd4")
        );
        assert_eq!(
            c.kernel_label(&[37, 64, 16, 16], &w64).unwrap(),
            or_fused("Conv winograd4")
        );
        let mid32 = ([37, 32, 16, 16], [32, 32, 3, 3]);
        assert_eq!(
            c.kernel_label(&mid32.0, &mid32.1).unwrap(),
            or_fused("Conv winograd")
        );
        // The weight gradient: F(4x4) from 64 channels on 32x32, from 128 on 17x17 to 31x31;
        // F(2x2) on 16x16. Where the fused path takes the layer, its own.
        let dw_tile = |xs: [usize; 4]| {
            let g = c.geom(&xs, &[xs[1], xs[1], 3, 3]).unwrap();
            if fused && xs[1] <= fused_widest() {
                assert!(g.wino_fused_dw_pays() && !g.wino_dw, "{xs:?}");
                return 0;
            }
            assert!(g.wino_dw, "{xs:?}");
            g.wino_dw_tile
        };
        let or_none = |tile| if fused { 0 } else { tile };
        let or_none_wide = |tile| if fused_widest() >= 128 { 0 } else { tile };
        assert_eq!(dw_tile([37, 64, 32, 32]), or_none(4));
        assert_eq!(dw_tile([37, 64, 16, 16]), or_none(2));
        assert_eq!(dw_tile([37, 128, 28, 28]), or_none_wide(4));
        assert_eq!(dw_tile([37, 136, 28, 28]), 4);
        assert_eq!(dw_tile([37, 64, 28, 28]), or_none(2));
        let r20 = ([37, 16, 32, 32], [16, 16, 3, 3]);
        assert_eq!(c.kernel_label(&r20.0, &r20.1).unwrap(), few_channel_label());
    }
    for tile in [2, 4] {
        let g = winograd_forced(&c, xs, ws, tile);
        let mut rng = Rng::new(47);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [37, 68, 8, 8], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
}

/// An image's Winograd result does not depend on the batch size around it (blocks of a fixed
/// number of images): bitwise, forward and input gradient, for batches of whole blocks. Two MPI
/// ranks at half the batch rely on it to match one process (tests/mpi.rs).
#[test]
fn winograd_results_do_not_depend_on_the_batch_size() {
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    for (ch, px, tile) in [
        (16, 32, 2),
        (32, 16, 2),
        (64, 8, 2),
        (16, 9, 2),
        (16, 32, 4),
        (32, 16, 4),
        (16, 9, 4),
    ] {
        let ws = [ch, ch, 3, 3];
        let mut rng = Rng::new(3);
        let x = rand_array(&mut rng, [32, ch, px, px], -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [32, ch, px, px], -1.0, 1.0);
        let geom = |n: usize| winograd_forced(&c, [n, ch, px, px], ws, tile);
        assert_first_images_match_alone(geom, &x, &w, &dy, 16, &format!("F({tile}) {ch}ch {px}px"));
    }
}

/// The forward and input gradient through `geom(n)` of the first `small` images of `x` and
/// `dy` give, bit for bit, the first `small` images' results of the whole batch's.
fn assert_first_images_match_alone(
    geom: impl Fn(usize) -> Geom,
    x: &Array4<f32>,
    w: &Array4<f32>,
    dy: &Array4<f32>,
    small: usize,
    what: &str,
) {
    let run = |n: usize| {
        let g = geom(n);
        let xn = x.slice(ndarray::s![0..n, .., .., ..]);
        let dyn_ = dy.slice(ndarray::s![0..n, .., .., ..]);
        let y = Conv2d::forward_geom(&g, xn, w.view(), None);
        let dx = Conv2d::backward_geom(&g, xn, w.view(), dyn_, true)
            .dx
            .unwrap();
        (y, dx)
    };
    let (y_all, dx_all) = run(x.shape()[0]);
    let (y, dx) = run(small);
    let first = |a: &Array4<f32>| a.slice(ndarray::s![0..small, .., .., ..]).to_owned();
    assert_eq!(first(&y_all), y, "{what} forward");
    assert_eq!(first(&dx_all), dx, "{what} dx");
}

/// The fused path's weight transform and weight-gradient untransform, whose tap rows and
/// output channels run in parallel, give the same bits on 1, 2 and 3 threads.
#[test]
fn fused_weight_transforms_do_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(12);
    for (cout, cin) in [(16, 16), (40, 7), (64, 33), (128, 128)] {
        let w = rand_array(&mut rng, [cout, cin, 3, 3], -1.0, 1.0);
        let du_len = 36 * cin.div_ceil(16) * 16 * cout.div_ceil(16) * 16;
        let du: Vec<f32> = (0..du_len).map(|_| rng.range(-1.0, 1.0)).collect();
        let run = |threads: usize| {
            on_threads(threads, || {
                let u = winograd_fused::fused_weights(cout, cin, w.as_slice().unwrap());
                let mut dw = vec![f32::NAN; cout * cin * 9];
                winograd_fused::fused_untransform(cout, cin, &du, &mut dw);
                (u, dw)
            })
        };
        let (u1, dw1) = run(1);
        assert!(dw1.iter().all(|v| v.is_finite()), "every entry written");
        for threads in [2, 3] {
            let (u, dw) = run(threads);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&u), bits(&u1), "{cout}x{cin} U at {threads} threads");
            assert_eq!(
                bits(&dw),
                bits(&dw1),
                "{cout}x{cin} dw at {threads} threads"
            );
        }
    }
}

/// The fused path's transformed weights, made plane by plane, equal the per-kernel transform
/// of `winograd4.rs` (the same f64 sums in the same order) at every tap, and are zero in the
/// lanes past the channels.
#[test]
fn fused_weights_equal_the_per_kernel_transform() {
    let mut rng = Rng::new(9);
    for (cout, cin) in [(16, 16), (7, 40), (64, 33)] {
        let w = rand_array(&mut rng, [cout, cin, 3, 3], -1.0, 1.0);
        let u = winograd_fused::fused_weights(cout, cin, w.as_slice().unwrap());
        let (ci, co) = (cin.div_ceil(16) * 16, cout.div_ceil(16) * 16);
        assert_eq!(u.len(), 36 * ci * co);
        for k in 0..36 {
            for c in 0..ci {
                for o in 0..co {
                    let want = if c < cin && o < cout {
                        let g: [f32; 9] = std::array::from_fn(|t| w[[o, c, t / 3, t % 3]]);
                        winograd4::transform_kernel4(&g)[k]
                    } else {
                        0.0
                    };
                    assert_eq!(
                        u[(k * ci + c) * co + o],
                        want,
                        "{cout}x{cin} tap {k} c {c} o {o}"
                    );
                }
            }
        }
    }
}

/// The fused Winograd path's forward and input gradient give an image the same bits whatever
/// images share its blocks of tiles (8x8 planes: two per block; 12x12: eight; 5x5 inputs
/// with pads of 2, 7x7 outputs: two) and whatever the batch: each image of a batch of 7 (odd:
/// a part ends in a group short of images) against the first 3 alone.
#[test]
fn winograd_fused_results_do_not_depend_on_the_images_around_one() {
    for (ch, px, pad) in [(16, 8, 1), (40, 12, 1), (24, 5, 2)] {
        let c = conv(1, [1, 1], [pad; 4], [1, 1]);
        let ws = [ch, ch, 3, 3];
        let mut rng = Rng::new(4);
        let x = rand_array(&mut rng, [7, ch, px, px], -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let side = px + 2 * pad - 2;
        let dy = rand_array(&mut rng, [7, ch, side, side], -1.0, 1.0);
        let geom = |n: usize| {
            let mut g = c.geom(&[n, ch, px, px], &ws).unwrap();
            (
                g.direct_fwd,
                g.winograd,
                g.small_plane,
                g.wino_cl,
                g.wino_dw,
            ) = (true, false, false, false, false);
            g.wino_fused = true;
            g
        };
        assert_first_images_match_alone(geom, &x, &w, &dy, 3, &format!("{ch}ch {px}px"));
    }
}

/// The weight gradient in `T` straight from its definition: `dw[o][c][a][b] = sum over images
/// and outputs of dy * x at tap (a, b)`. An oracle independent of im2col and of the padded-run
/// layout of `weight_grad.rs`.
fn dw_reference<T: NdFloat>(g: &Geom, x: &Array4<T>, dy: &Array4<T>) -> Array4<T> {
    let mut dw = Array4::<T>::zeros((g.co, g.cig, g.kh, g.kw));
    for n in 0..g.n {
        for o in 0..g.co {
            let grp = o / g.cog;
            for c in 0..g.cig {
                for a in 0..g.kh {
                    for b in 0..g.kw {
                        let mut acc = T::zero();
                        for oy in 0..g.oh {
                            let iy = (oy * g.sh + a * g.dh) as isize - g.pt as isize;
                            if iy < 0 || iy >= g.h as isize {
                                continue;
                            }
                            for ox in 0..g.ow {
                                let ix = (ox * g.sw + b * g.dw) as isize - g.pl as isize;
                                if ix < 0 || ix >= g.w as isize {
                                    continue;
                                }
                                acc += dy[[n, o, oy, ox]]
                                    * x[[n, grp * g.cig + c, iy as usize, ix as usize]];
                            }
                        }
                        dw[[o, c, a, b]] += acc;
                    }
                }
            }
        }
    }
    dw
}

/// Each `[co, ci]` kernel window of a weight-gradient scale filled with its largest entry:
/// Winograd's weight gradient mixes the window's taps.
fn window_max(mut scale: Array4<f64>) -> Array4<f64> {
    for mut oc in scale.outer_iter_mut() {
        for mut window in oc.outer_iter_mut() {
            let top = window.fold(0.0f64, |a, &b| a.max(b));
            window.fill(top);
        }
    }
    scale
}

/// Weight-gradient error of `g`'s backward against f64, scaled per entry by `sum |dy| |x|`
/// (with `g.wino_dw`: by its largest value over the entry's kernel window, since Winograd mixes
/// the window's taps, so a tap that only ever reads padding, exactly 0, gets its neighbours'
/// rounding).
fn dw_error(g: &Geom, seed: u64, need_dx: bool) -> f64 {
    let mut rng = Rng::new(seed);
    let x = rand_array(&mut rng, [g.n, g.ci, g.h, g.w], -1.0, 1.0);
    let w = rand_array(&mut rng, [g.co, g.cig, g.kh, g.kw], -1.0, 1.0);
    let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
    let grads = Conv2d::backward_geom(g, x.view(), w.view(), dy.view(), need_dx);
    let (x64, dy64) = (to_f64(&x.view()), to_f64(&dy.view()));
    let exact = dw_reference(g, &x64, &dy64);
    let mut scale = dw_reference(g, &x64.mapv(f64::abs), &dy64.mapv(f64::abs));
    if g.wino_dw {
        scale = window_max(scale);
    }
    if need_dx {
        // The input gradient is the other path's (up to summation order: a forced direct
        // weight gradient on a small-plane layer takes it per image instead of blocked).
        let plain = Conv2d::backward_geom(
            &Geom {
                direct_dw: false,
                wino_dw: false,
                ..*g
            },
            x.view(),
            w.view(),
            dy.view(),
            true,
        );
        let (dx, dxp) = (grads.dx.as_ref().unwrap(), plain.dx.as_ref().unwrap());
        assert_close("dx", &dx.view(), &dxp.view(), 1e-5);
        assert_eq!(grads.db, plain.db);
    }
    scaled_error(&grads.dw, &exact, &scale)
}

/// The Winograd weight gradient (`winograd_dw.rs`, forced on) against f64, F(2x2) and F(4x4):
/// random geometries as for the forward (pads 0-2 on each side, planes of 1 to 13 pixels, odd
/// and even, 1 to 70 channels, batches of 1 to 9), with and without the input gradient, then
/// ResNet-sized layers, one of them over several chunks with a shorter last one (40 images of
/// 16x16). Error per entry within `WINO_REL_TOL` (F(2x2)) or `WINO4_DW_REL_TOL` (F(4x4)) times
/// the largest `sum |dy| |x|` over the entry's kernel window, im2col's on the same geometries
/// for scale.
#[test]
fn winograd_weight_grad_matches_f64_within_bound() {
    for (tile, tol) in [
        (2, winograd::WINO_REL_TOL),
        (4, winograd_dw::WINO4_DW_REL_TOL),
    ] {
        let mut rng = Rng::new(53);
        let (mut worst, mut worst_im2col) = (0.0f64, 0.0f64);
        let mut cases = 0;
        while cases < 60 {
            let Some(RandomWino { pads, xs, ws }) = RandomWino::draw(&mut rng) else {
                continue;
            };
            let ([n, ci, h, w], co) = (xs, ws[0]);
            let c = conv(1, [1, 1], pads, [1, 1]);
            let g = Geom {
                wino_dw: true,
                wino_dw_tile: tile,
                direct_dw: false,
                ..winograd_forced(&c, xs, ws, 2)
            };
            let e = dw_error(&g, 500 + cases, rng.below(2) == 0);
            assert!(
                e <= tol,
                "F({tile}x{tile}) {pads:?} x [{n}, {ci}, {h}, {w}] co {co}: scaled dw error {e:e}"
            );
            worst = worst.max(e);
            let plain = Geom {
                winograd: false,
                wino_dw: false,
                direct_dw: false,
                ..g
            };
            worst_im2col = worst_im2col.max(dw_error(&plain, 500 + cases, false));
            cases += 1;
        }
        eprintln!(
            "worst scaled dw error: winograd F({tile}x{tile}) {worst:e}, im2col {worst_im2col:e}"
        );
        let c = conv(1, [1, 1], [1; 4], [1, 1]);
        for (n, ch, px) in [
            (3, 16, 32),
            (40, 32, 16),
            (5, 64, 16),
            (9, 128, 8),
            (70, 64, 16),
        ] {
            let g = Geom {
                wino_dw: true,
                wino_dw_tile: tile,
                direct_dw: false,
                ..winograd_forced(&c, [n, ch, px, px], [ch, ch, 3, 3], 2)
            };
            let e = dw_error(&g, ch as u64, true);
            eprintln!("F({tile}x{tile}) {ch}ch {px}px batch {n}: winograd dw {e:e}");
            assert!(e <= tol, "F({tile}x{tile}) {ch}ch {px}px: {e:e}");
        }
    }
}

/// The Winograd weight gradient, F(2x2) and F(4x4), against f64 finite differences of the
/// reference loss, on a small odd geometry with asymmetric pads, and bitwise the same on 1 and
/// 3 threads over several chunks.
#[test]
fn winograd_weight_grad_matches_finite_differences_and_thread_counts() {
    for tile in [2, 4] {
        let c = conv(1, [1, 1], [2, 0, 1, 2], [1, 1]);
        let (xs, ws) = ([3, 4, 5, 4], [3, 4, 3, 3]);
        let g = Geom {
            wino_dw: true,
            wino_dw_tile: tile,
            direct_dw: false,
            ..winograd_forced(&c, xs, ws, 2)
        };
        let mut rng = Rng::new(59);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let r = rand_array(&mut rng, [3, 3, g.oh, g.ow], -1.0, 1.0);
        let grads = Conv2d::backward_geom(&g, x.view(), w.view(), r.view(), false);
        let (x64, r64) = (to_f64(&x.view()), to_f64(&r.view()));
        let w64 = to_f64(&w.view());
        let fdw = fd_grad(&w64, |w| {
            dot_loss(&c.reference(x64.view(), w.view(), None).unwrap(), &r64)
        });
        assert_grad("dw", &grads.dw.view(), &fdw.view());
        let c = conv(1, [1, 1], [1; 4], [1, 1]);
        // F(4x4): 16 tiles an image, so 64 images a chunk; 150 make three, the last shorter.
        let n = if tile == 4 { 150 } else { 37 };
        let (xs, ws) = ([n, 32, 16, 16], [32, 32, 3, 3]);
        let g = Geom {
            wino_dw: true,
            wino_dw_tile: tile,
            direct_dw: false,
            ..winograd_forced(&c, xs, ws, 2)
        };
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [n, 32, 16, 16], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
}

/// A random window geometry for the direct kernels' f64 tests: kernels 1x1 to 7x7, dilations
/// 1-2, asymmetric pads 0-3, planes 1-19, batches of 1 to 40, strides 1-3 per axis.
struct RandomWindow {
    kh: usize,
    kw: usize,
    h: usize,
    w: usize,
    n: usize,
    conv: Conv2d,
}

impl RandomWindow {
    fn draw(rng: &mut Rng, group: usize) -> Self {
        let (kh, kw) = (1 + rng.below(7), 1 + rng.below(7));
        let dil = [1 + rng.below(2), 1 + rng.below(2)];
        let pads = [rng.below(4), rng.below(4), rng.below(4), rng.below(4)];
        let (h, w) = (1 + rng.below(19), 1 + rng.below(19));
        let n = [1, 2, 7, 40][rng.below(4)];
        let strides = [1 + rng.below(3), 1 + rng.below(3)];
        RandomWindow {
            kh,
            kw,
            h,
            w,
            n,
            conv: conv(group, strides, pads, dil),
        }
    }
}

/// Bound on the direct weight gradient's error per entry relative to `sum |dy| |x|` (sums of up
/// to a few thousand products per image in f32). Measured worst over the random geometries
/// below (strides 1-3): 1.3e-7, against im2col's 1.7e-7 on the same ones.
const DW_REL_TOL: f64 = 1e-6;

/// The direct weight gradient (`weight_grad.rs`, forced on) against f64 over random
/// geometries: strides 1-3 per axis (the phase planes), kernels 1x1 to 7x7, dilations 1-2,
/// asymmetric pads 0-3, groups 1-3, planes down to 1 pixel, batches of 1 to 40 (several images
/// per pass, a short last pass), with and without the input gradient; im2col's error on the
/// same geometries for scale.
#[test]
fn direct_weight_grad_matches_f64_over_random_geometries() {
    let mut rng = Rng::new(77);
    let (mut worst, mut worst_im2col) = (0.0f64, 0.0f64);
    let (mut cases, mut strided) = (0, 0);
    while cases < 160 {
        let group = 1 + rng.below(3);
        let (cig, cog) = (1 + rng.below(9), 1 + rng.below(9));
        let RandomWindow {
            kh,
            kw,
            h,
            w,
            n,
            conv: c,
        } = RandomWindow::draw(&mut rng, group);
        let Ok(g) = c.geom(&[n, group * cig, h, w], &[group * cog, cig, kh, kw]) else {
            continue;
        };
        if !g.direct_dw_eligible() {
            continue;
        }
        let forced = Geom {
            direct_dw: true,
            subsample: false,
            ..g
        };
        let e = dw_error(&forced, cases, rng.below(2) == 0);
        assert!(
            e <= DW_REL_TOL,
            "{c:?} {:?}: scaled dw error {e:e}",
            [n, h, w]
        );
        let plain = Geom {
            direct_dw: false,
            ..g
        };
        worst_im2col = worst_im2col.max(dw_error(&plain, cases, false));
        worst = worst.max(e);
        cases += 1;
        strided += usize::from(c.strides != [1, 1]);
    }
    assert!(strided >= 80, "only {strided} strided geometries");
    eprintln!("worst scaled dw error: direct {worst:e}, im2col {worst_im2col:e}");
}

/// The layers the speed rule hands to the direct weight gradient (the stride-1 3x3 convs that
/// the direct forward runs: ResNet-20's 16 channels on 32x32, 8x8 ones below 32 channels,
/// rank-8 cores; and ResNet-18's 7x7 stride-2 stem) are handed to it, but for those the fused
/// path takes on AVX-512 (12 to 64 channels), and the direct one stays within the bound on
/// them; the Winograd layers of 32 to 128 channels on 16x16 and 32x32, and of 128+ on 8x8, go
/// to Winograd's weight gradient instead (the fused one on AVX-512 up to 64 channels).
#[test]
fn direct_weight_grad_is_chosen_for_resnet_layers_and_within_bound() {
    // Without a hardware FMA those layers take neither direct path (`direct::auto_mode`).
    if !weight_grad::auto_mode() || !direct::auto_mode() {
        return;
    }
    let simd = winograd_fused::Build::best() != winograd_fused::Build::Portable;
    for (ch, px) in [(16, 32), (16, 8), (8, 32)] {
        let c = conv(1, [1, 1], [1; 4], [1, 1]);
        let g = c.geom(&[33, ch, px, px], &[ch, ch, 3, 3]).unwrap();
        let fused = g.wino_fused_dw_pays();
        if winograd::auto_mode() && direct::auto_mode() {
            assert_eq!(fused, simd && ch >= 12, "{ch}ch {px}px");
        }
        assert!(g.direct_dw != fused, "{ch}ch {px}px");
        let direct = Geom {
            wino_fused: false,
            direct_dw: true,
            ..g
        };
        let e = dw_error(&direct, ch as u64, true);
        assert!(e <= DW_REL_TOL, "{ch}ch {px}px: {e:e}");
    }
    // Winograd layers take Winograd's weight gradient instead (with Winograd's input gradient:
    // no small-plane backward left); those of 128+ channels on 8x8 and 16x16 planes the
    // channels-last path's (`winograd_cl.rs`); where the CPU has AVX2 + FMA or AVX-512 those
    // of up to 64 or 128 channels (`fused_widest`) the fused path's.
    for (ch, px) in [(32, 16), (64, 16), (64, 32), (128, 16), (128, 8), (256, 8)] {
        let c = conv(1, [1, 1], [1; 4], [1, 1]);
        let g = c.geom(&[33, ch, px, px], &[ch, ch, 3, 3]).unwrap();
        if winograd::auto_mode() && small_plane::auto_mode() && winograd_cl::auto_mode() {
            let label = c.kernel_label(&[33, ch, px, px], &[ch, ch, 3, 3]).unwrap();
            assert!(label.starts_with("Conv winograd") && !label.ends_with("small-plane"));
            assert!(!g.direct_dw, "{ch}ch {px}px");
            if ch > 128 || (ch == 128 && (px < 16 || fused_widest_where_cl_takes() < 128)) {
                assert!(g.wino_cl, "{ch}ch {px}px");
            } else if simd {
                assert!(g.wino_fused_dw_pays() && !g.wino_dw, "{ch}ch {px}px");
            } else {
                assert!(g.wino_dw && !g.small_plane, "{ch}ch {px}px");
            }
        }
    }
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let g = c.geom(&[33, 64, 8, 8], &[64, 64, 3, 3]).unwrap();
    if winograd::auto_mode() && small_plane::auto_mode() {
        assert!(
            (g.small_plane || (simd && g.wino_fused_dw_pays())) && !g.wino_dw,
            "64ch 8px keeps the small-plane backward (the fused path with AVX2 or AVX-512)"
        );
    }
    // ResNet-18's 7x7 stride-2 stem too (no input gradient: its input is the data).
    let stem = conv(1, [2, 2], [3; 4], [1, 1]);
    let g = stem.geom(&[9, 3, 64, 64], &[64, 3, 7, 7]).unwrap();
    assert!(g.direct_dw, "7x7 stem");
    let e = dw_error(&g, 7, false);
    assert!(e <= DW_REL_TOL, "7x7 stem: {e:e}");
    // Not 3x3 stride-2 stems, nor stride-2 layers of many channels, nor 4x4 planes (which keep
    // the batch-wide GEMM).
    let c = conv(1, [2, 2], [1; 4], [1, 1]);
    assert!(!c.geom(&[9, 3, 64, 64], &[32, 3, 3, 3]).unwrap().direct_dw);
    assert!(
        !c.geom(&[9, 64, 32, 32], &[128, 64, 3, 3])
            .unwrap()
            .direct_dw
    );
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    assert!(
        !c.geom(&[33, 256, 4, 4], &[256, 256, 3, 3])
            .unwrap()
            .direct_dw
    );
    let c = conv(1, [2, 2], [1; 4], [1, 1]);
    assert!(
        !c.geom(&[33, 64, 16, 16], &[64, 64, 3, 3])
            .unwrap()
            .direct_dw
    );
}

/// The vector kernels of the direct weight gradient against its portable loop, on runs with
/// remainder tiles (rows and taps not multiples of the tile) over several images, with output
/// rows packed and spaced.
#[test]
fn direct_weight_grad_kernels_match_portable_loop() {
    let mut rng = Rng::new(5);
    for (rows, k, run, images) in [
        (7, 11, 48, 3),
        (4, 4, 16, 1),
        (1, 1, 32, 2),
        (13, 27, 80, 5),
        // Every last-tile height of the 3-row (AVX2) and 4-row (AVX-512) tiles.
        (2, 8, 16, 2),
        (5, 9, 32, 1),
        (6, 12, 16, 2),
        (16, 144, 32, 2),
    ] {
        let xstride = 64 + run;
        let offs: Vec<usize> = (0..k).map(|_| rng.below(64)).collect();
        let x: Vec<f32> = (0..images * xstride)
            .map(|_| rng.range(-1.0, 1.0))
            .collect();
        // Rows of `dy` apart by more than a run on odd row counts (the Winograd weight
        // gradient's layout), packed on even ones.
        let dyrow = if rows % 2 == 1 { run + 16 } else { run };
        let dy: Vec<f32> = (0..images * rows * dyrow)
            .map(|_| rng.range(-1.0, 1.0))
            .collect();
        let runs = weight_grad::Runs {
            x: &x,
            dy: &dy,
            offs: &offs,
            run,
            dyrow,
            rows,
            images,
            xstride,
            dystride: rows * dyrow,
        };
        let mut want = vec![0.5f32; rows * k];
        weight_grad::dot_tiles_for_test(&runs, &mut want, weight_grad::Kernel::Portable);
        for kernel in weight_grad::Kernel::available() {
            let mut got = vec![0.5f32; rows * k];
            weight_grad::dot_tiles_for_test(&runs, &mut got, kernel);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-4, "{kernel:?} {rows}x{k}: {a} vs {b}");
            }
        }
    }
}

/// The input gradient in `T` from its definition for any stride and dilation (ungrouped):
/// every output gradient times every weight it met, scattered onto its input pixel.
fn dx_reference_strided<T: NdFloat>(g: &Geom, dy: &Array4<T>, w: &Array4<T>) -> Array4<T> {
    let mut dx = Array4::<T>::zeros((g.n, g.ci, g.h, g.w));
    for n in 0..g.n {
        for o in 0..g.co {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let d = dy[[n, o, oy, ox]];
                    for a in 0..g.kh {
                        let iy = (oy * g.sh + a * g.dh) as isize - g.pt as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        for b in 0..g.kw {
                            let ix = (ox * g.sw + b * g.dw) as isize - g.pl as isize;
                            if ix < 0 || ix >= g.w as isize {
                                continue;
                            }
                            for c in 0..g.ci {
                                dx[[n, c, iy as usize, ix as usize]] += d * w[[o, c, a, b]];
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// Scaled errors of the small-plane path (forced on) against f64 ([`forced_path_errors`]).
fn small_plane_errors(
    c: &Conv2d,
    xs: [usize; 4],
    ws: [usize; 4],
    bias: bool,
    seed: u64,
) -> [f64; 3] {
    let mut g = c.geom(&xs, &ws).unwrap();
    assert!(g.small_plane_eligible(), "{c:?} {xs:?} {ws:?}");
    (g.small_plane, g.winograd, g.direct_dw, g.subsample) = (true, false, false, false);
    g.wino_cl = false;
    let plain = Geom {
        small_plane: false,
        ..g
    };
    forced_path_errors(c, &g, &plain, xs, ws, bias, seed)
}

/// Scaled errors of `g` (a path the caller forced on) against f64: forward, input and weight
/// gradients, each per entry relative to its sum of absolute products; the bias gradient equal
/// to `plain`'s (the geometry without that path), the weight gradient the same bits without
/// the input gradient.
fn forced_path_errors(
    c: &Conv2d,
    g: &Geom,
    plain: &Geom,
    xs: [usize; 4],
    ws: [usize; 4],
    bias: bool,
    seed: u64,
) -> [f64; 3] {
    let d = ErrorCase::draw(c, g, xs, ws, bias, seed);
    let abs = |a: &Array4<f64>| a.mapv(f64::abs);
    let y = d.forward(g);
    let grads = d.backward(g, true);
    let dx64 = dx_reference_strided(g, &d.dy64, &d.w64);
    let dxscale = dx_reference_strided(g, &abs(&d.dy64), &abs(&d.w64));
    let dw64 = dw_reference(g, &d.x64, &d.dy64);
    let dwscale = dw_reference(g, &abs(&d.x64), &abs(&d.dy64));
    assert_eq!(grads.db, d.backward(plain, false).db);
    assert_eq!(d.backward(g, false).dw, grads.dw);
    [
        scaled_error(&y, &d.y64, &d.yscale),
        scaled_error(grads.dx.as_ref().unwrap(), &dx64, &dxscale),
        scaled_error(&grads.dw, &dw64, &dwscale),
    ]
}

/// The error bound's random geometries: `want` convolutions (kernels 1x1 to 4x4, strides 1 to
/// `max_stride`, dilations 1-2, asymmetric pads 0-2, sides 1 to `max_side`, a batch of
/// `batches`, channels from `channels(rng, case)`) that `keep` accepts, each through
/// `errors`, within `SMALL_PLANE_REL_TOL`; returns the worst errors.
fn random_geometry_errors(
    seed: u64,
    want: u64,
    (max_stride, max_side, batches): (usize, usize, &[usize]),
    channels: impl Fn(&mut Rng, u64) -> (usize, usize),
    keep: impl Fn(&Geom) -> bool,
    errors: impl Fn(&Conv2d, [usize; 4], [usize; 4], bool, u64) -> [f64; 3],
) -> [f64; 3] {
    let mut rng = Rng::new(seed);
    let mut worst = [0.0f64; 3];
    let mut cases = 0;
    while cases < want {
        let (kh, kw) = (1 + rng.below(4), 1 + rng.below(4));
        let strides = [1 + rng.below(max_stride), 1 + rng.below(max_stride)];
        let dil = [1 + rng.below(2), 1 + rng.below(2)];
        let pads = [rng.below(3), rng.below(3), rng.below(3), rng.below(3)];
        let (h, w) = (1 + rng.below(max_side), 1 + rng.below(max_side));
        let n = batches[rng.below(batches.len())];
        let (ci, co) = channels(&mut rng, cases);
        let c = conv(1, strides, pads, dil);
        let Ok(g) = c.geom(&[n, ci, h, w], &[co, ci, kh, kw]) else {
            continue;
        };
        if !keep(&g) {
            continue;
        }
        let (xs, ws) = ([n, ci, h, w], [co, ci, kh, kw]);
        let e = errors(&c, xs, ws, rng.below(2) == 0, cases);
        assert!(
            e.iter().all(|&e| e <= SMALL_PLANE_REL_TOL),
            "{c:?} {xs:?} -> {co} k{kh}x{kw}: forward, dx, dw errors {e:?}"
        );
        for (w, e) in worst.iter_mut().zip(e) {
            *w = w.max(e);
        }
        cases += 1;
    }
    worst
}

/// Bound on the small-plane path's errors per entry, relative to the sum of absolute products:
/// plain f32 GEMM sums. Measured worst over the random geometries below: 1.9e-7 forward,
/// 1.7e-7 for either gradient (on an Intel AVX-512 host: 1.7e-7, 1.7e-7, 2.3e-7).
const SMALL_PLANE_REL_TOL: f64 = 1e-6;

/// The small-plane path (`small_plane.rs`, forced on) against f64 over random small-plane geometries:
/// kernels 1x1 to 4x4, strides and dilations 1-2, asymmetric pads 0-2, planes 1x1 to 7x7,
/// 1 to 40 channels, batches 2 to 40 (the output-channel and input-channel tasks split at
/// 128, so 130-channel cases below cover a short last task).
#[test]
fn small_plane_path_matches_f64_over_random_geometries() {
    let worst = random_geometry_errors(
        91,
        60,
        (2, 7, &[2, 5, 40]),
        |rng, case| {
            if case % 10 == 0 {
                (130, 3 + rng.below(5))
            } else {
                (1 + rng.below(40), 1 + rng.below(40))
            }
        },
        Geom::small_plane_eligible,
        small_plane_errors,
    );
    eprintln!("worst scaled small-plane errors: forward, dx, dw {worst:?}");
}

/// The late stages of ResNet-18 at 64x64 take the small-plane path (4x4 and 2x2 planes, 256 and 512
/// channels, stride 1 and 2), within the bound, and give the same bits on 1 and 3 threads.
#[test]
fn small_plane_path_is_chosen_for_resnet18_late_stages_and_reproducible_across_thread_counts() {
    if !small_plane::auto_mode() {
        return;
    }
    let cases = [
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [9, 256, 4, 4],
            [256, 256, 3, 3],
        ),
        (
            conv(1, [2, 2], [1; 4], [1, 1]),
            [9, 256, 4, 4],
            [512, 256, 3, 3],
        ),
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [9, 160, 2, 2],
            [136, 160, 3, 3],
        ),
    ];
    for (i, (c, xs, ws)) in cases.into_iter().enumerate() {
        // The stride-1 4x4 layer runs its forward and input gradient through `winograd_cl.rs`
        // (tested below), its weight gradient here.
        let want = if i == 0 {
            "Conv winograd4-cl"
        } else {
            "Conv small-plane"
        };
        assert_eq!(c.kernel_label(&xs, &ws).unwrap(), want, "{c:?} {xs:?}");
        let e = small_plane_errors(&c, xs, ws, true, 3);
        assert!(e.iter().all(|&e| e <= SMALL_PLANE_REL_TOL), "{xs:?}: {e:?}");
        let g = c.geom(&xs, &ws).unwrap();
        let mut rng = Rng::new(8);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
    // 16 channels stay on their previous paths.
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    assert!(!c.geom(&[9, 16, 4, 4], &[16, 16, 3, 3]).unwrap().small_plane);
}

/// Without the bias gradient, `backward_with` returns the same `dx` and `dw` bit for bit and a
/// zero `db`, on each backward path (per image, blocked, depthwise, small-plane).
#[test]
fn skipping_the_bias_gradient_changes_nothing_else() {
    let mut rng = Rng::new(41);
    for (c, xs, ws) in [
        (conv(1, [1, 1], [1; 4], [1, 1]), [2, 3, 9, 9], [4, 3, 3, 3]),
        (conv(1, [1, 1], [0; 4], [1, 1]), [8, 6, 2, 2], [5, 6, 1, 1]),
        (conv(4, [2, 2], [1; 4], [1, 1]), [3, 4, 8, 8], [4, 1, 3, 3]),
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [4, 32, 2, 2],
            [32, 32, 3, 3],
        ),
    ] {
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let y = c.forward(x.view(), w.view(), None).unwrap();
        let dy = rand_array(&mut rng, y.raw_dim(), -1.0, 1.0);
        let full = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
        let lean = c
            .backward_with(x.view(), w.view(), dy.view(), true, false)
            .unwrap();
        assert_eq!(lean.dx, full.dx, "{xs:?}");
        assert_eq!(lean.dw, full.dw, "{xs:?}");
        assert!(lean.db.iter().all(|&v| v == 0.0), "{xs:?}");
        assert!(full.db.iter().any(|&v| v != 0.0), "{xs:?}");
    }
}

/// The direct forward's error (forced on, `direct.rs`) against f64 for `c` on these shapes,
/// per entry relative to `sum |w| |x| + |b|`.
fn direct_forward_error(c: &Conv2d, xs: [usize; 4], ws: [usize; 4], seed: u64) -> f64 {
    let mut g = c.geom(&xs, &ws).unwrap();
    assert!(g.direct_fwd_eligible(), "{c:?} {xs:?} {ws:?}");
    (g.direct_fwd, g.wino_fused) = (true, false);
    forward_error(c, &g, xs, ws, seed)
}

/// The forward's error on geometry `g` of `c` (with bias) against f64, per entry relative to
/// `sum |w| |x| + |b|`.
fn forward_error(c: &Conv2d, g: &Geom, xs: [usize; 4], ws: [usize; 4], seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let x = rand_array(&mut rng, xs, -1.0, 1.0);
    let w = rand_array(&mut rng, ws, -1.0, 1.0);
    let b = rand_array(&mut rng, ws[0], -1.0, 1.0);
    let y = Conv2d::forward_geom(g, x.view(), w.view(), Some(b.view()));
    let (x64, w64, b64) = (to_f64(&x.view()), to_f64(&w.view()), to_f64(&b.view()));
    let exact = c
        .reference(x64.view(), w64.view(), Some(b64.view()))
        .unwrap();
    let scale = c
        .reference(
            x64.mapv(f64::abs).view(),
            w64.mapv(f64::abs).view(),
            Some(b64.mapv(f64::abs).view()),
        )
        .unwrap();
    scaled_error(&y, &exact, &scale)
}

/// Bound on the direct forward's error per entry relative to `sum |w| |x| + |b|`: one f32
/// dot product of `ci * kh * kw` fused multiply-adds. Measured worst over the random geometries
/// below: 2.5e-7.
const DIRECT_FWD_REL_TOL: f64 = 1e-6;

/// The direct forward against f64 over random ungrouped geometries: strides 1-3 per axis,
/// kernels 1x1 to 7x7, dilations 1-2, asymmetric pads 0-3, planes down to 1 pixel, batches of 1
/// to 40 (several images per scratch pass and a short last one), channel counts that leave
/// remainder tiles of output rows.
#[test]
fn direct_forward_matches_f64_over_random_geometries() {
    let mut rng = Rng::new(91);
    let (mut worst, mut cases) = (0.0f64, 0);
    while cases < 120 {
        let (ci, co) = (1 + rng.below(9), 1 + rng.below(19));
        let RandomWindow {
            kh,
            kw,
            h,
            w,
            n,
            conv: c,
        } = RandomWindow::draw(&mut rng, 1);
        let (xs, ws) = ([n, ci, h, w], [co, ci, kh, kw]);
        let Ok(g) = c.geom(&xs, &ws) else {
            continue;
        };
        if !g.direct_fwd_eligible() {
            continue;
        }
        let e = direct_forward_error(&c, xs, ws, cases);
        assert!(e <= DIRECT_FWD_REL_TOL, "{c:?} {xs:?} {ws:?}: {e:e}");
        worst = worst.max(e);
        cases += 1;
    }
    eprintln!("worst scaled direct forward error {worst:e}");
}

/// ResNet-18's 7x7 stride-2 stem takes the direct forward (and the direct weight gradient):
/// labelled so, within the bound, and the same bits whatever the batch and thread count
/// (each output is one dot product, never a sum across images).
#[test]
fn direct_forward_is_chosen_for_the_7x7_stem_and_reproducible() {
    if !direct::auto_mode() || !weight_grad::auto_mode() {
        return;
    }
    let c = conv(1, [2, 2], [3; 4], [1, 1]);
    let (xs, ws) = ([5, 3, 40, 40], [64, 3, 7, 7]);
    let g = c.geom(&xs, &ws).unwrap();
    assert!(g.direct_fwd && g.direct_dw);
    assert_eq!(c.kernel_label(&xs, &ws).unwrap(), "Conv direct");
    let e = direct_forward_error(&c, xs, ws, 3);
    assert!(e <= DIRECT_FWD_REL_TOL, "{e:e}");
    // MobileNet's 3x3 stride-2 stem keeps im2col.
    let g3 = c.geom(&[5, 3, 40, 40], &[32, 3, 3, 3]).unwrap();
    assert!(!g3.direct_fwd);
    let mut rng = Rng::new(4);
    let x = rand_array(&mut rng, xs, -1.0, 1.0);
    let w = rand_array(&mut rng, ws, -1.0, 1.0);
    let whole = c.forward(x.view(), w.view(), None).unwrap();
    let bits = |a: &Array4<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for i in 0..xs[0] {
        let one = c
            .forward(x.slice(ndarray::s![i..i + 1, .., .., ..]), w.view(), None)
            .unwrap();
        let part = whole.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
        assert_eq!(bits(&one), bits(&part), "image {i}");
    }
    let three =
        crate::engine::with_threads(3, || c.forward(x.view(), w.view(), None).unwrap()).unwrap();
    assert_eq!(bits(&three), bits(&whole));
}

/// The vector kernels of the direct forward give the portable loop's bits (the same fused
/// multiply-adds in the same order), on tiles with remainder rows and position vectors.
#[test]
fn direct_forward_kernels_match_portable_loop_bitwise() {
    let mut rng = Rng::new(8);
    for (rows, k, run) in [
        (9, 11, 64),
        (8, 27, 48),
        (1, 1, 16),
        (17, 147, 112),
        (6, 5, 32),
        // Every last-tile height of the 6-row (AVX2) and 8-row (AVX-512) tiles.
        (4, 9, 16),
        (12, 18, 32),
        (15, 9, 48),
        (16, 144, 32),
    ] {
        let offs: Vec<usize> = (0..k).map(|_| rng.below(64)).collect();
        let x: Vec<f32> = (0..64 + run).map(|_| rng.range(-1.0, 1.0)).collect();
        let w: Vec<f32> = (0..rows * k).map(|_| rng.range(-1.0, 1.0)).collect();
        let t = direct::Taps {
            x: &x,
            offs: &offs,
            w: &w,
            run,
        };
        let mut want = vec![0.0f32; rows * run];
        direct::dot_rows_for_test(&t, &mut want, weight_grad::Kernel::Portable);
        for kernel in weight_grad::Kernel::available() {
            let mut got = vec![7.0f32; rows * run];
            direct::dot_rows_for_test(&t, &mut got, kernel);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{kernel:?} {rows}x{k}x{run}");
        }
    }
}

/// Scaled errors of a direct layer's input and weight gradients against f64.
fn direct_backward_errors(g: &Geom, seed: u64) -> [f64; 2] {
    let mut rng = Rng::new(seed);
    let x = rand_array(&mut rng, [g.n, g.ci, g.h, g.w], -1.0, 1.0);
    let w = rand_array(&mut rng, [g.co, g.cig, g.kh, g.kw], -1.0, 1.0);
    let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
    let grads = Conv2d::backward_geom(g, x.view(), w.view(), dy.view(), true);
    let (x64, w64, dy64) = (to_f64(&x.view()), to_f64(&w.view()), to_f64(&dy.view()));
    let abs = |a: &Array4<f64>| a.mapv(f64::abs);
    let dx64 = dx_reference_strided(g, &dy64, &w64);
    let dxscale = dx_reference_strided(g, &abs(&dy64), &abs(&w64));
    let dw64 = dw_reference(g, &x64, &dy64);
    let dwscale = dw_reference(g, &abs(&x64), &abs(&dy64));
    [
        scaled_error(grads.dx.as_ref().unwrap(), &dx64, &dxscale),
        scaled_error(&grads.dw, &dw64, &dwscale),
    ]
}

/// The input gradient of direct layers (the transposed conv as a direct forward,
/// `Geom::direct_dx_geom`, from 8 input channels) against f64 over random stride-1
/// geometries: kernels 1x1 to 5x5,
/// dilations 1-2, asymmetric pads up to the kernel's extent, planes down to 1 pixel, batches of
/// 1 to 40; and their weight gradients, whichever kernel computes them.
#[test]
fn direct_input_gradient_matches_f64_over_random_geometries() {
    let mut rng = Rng::new(93);
    let (mut worst, mut cases) = ([0.0f64; 2], 0);
    while cases < 100 {
        let (ci, co) = (1 + rng.below(19), 1 + rng.below(19));
        let (kh, kw) = (1 + rng.below(5), 1 + rng.below(5));
        let dil = [1 + rng.below(2), 1 + rng.below(2)];
        let (eh, ew) = (dil[0] * (kh - 1), dil[1] * (kw - 1));
        let pads = [
            rng.below(eh + 1),
            rng.below(ew + 1),
            rng.below(eh + 1),
            rng.below(ew + 1),
        ];
        let (h, w) = (1 + rng.below(19), 1 + rng.below(19));
        let n = [1, 2, 7, 40][rng.below(4)];
        let c = conv(1, [1, 1], pads, dil);
        let Ok(mut g) = c.geom(&[n, ci, h, w], &[co, ci, kh, kw]) else {
            continue;
        };
        (g.direct_fwd, g.winograd, g.small_plane, g.wino_fused) = (true, false, false, false);
        // Below 8 input channels the input gradient stays on im2col.
        assert_eq!(
            g.direct_dx_geom().is_some(),
            ci >= 8,
            "{c:?} {:?}",
            [n, ci, h, w]
        );
        let e = direct_backward_errors(&g, cases);
        for (i, (e, tol)) in e.iter().zip([DIRECT_FWD_REL_TOL, DW_REL_TOL]).enumerate() {
            assert!(
                *e <= tol,
                "{c:?} {:?} {:?}: error {i} {e:e}",
                [n, ci, h, w],
                [co, kh, kw]
            );
            worst[i] = worst[i].max(*e);
        }
        cases += 1;
    }
    eprintln!(
        "worst scaled direct errors: dx {:e}, dw {:e}",
        worst[0], worst[1]
    );
}

/// ResNet-20's 16-channel layers and a Tucker-2 core of 8 channels take the direct kernels
/// (forward, input and weight gradients; on 16x16 planes and up with 12+ channels the fused
/// Winograd path where the CPU has AVX-512) and the direct kernels, forced, stay within the
/// bounds, the same bits on 1 and 3 threads;
/// 32-channel 32x32 layers keep Winograd (the fused one where the CPU has AVX-512).
#[test]
fn direct_kernels_are_chosen_for_few_channel_3x3_layers() {
    if !direct::auto_mode() || !weight_grad::auto_mode() || !winograd::auto_mode() {
        return;
    }
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    for (xs, ws) in [
        ([9, 16, 32, 32], [16, 16, 3, 3]),
        ([9, 8, 16, 16], [12, 8, 3, 3]),
        ([9, 16, 8, 8], [16, 16, 3, 3]),
    ] {
        let mut g = c.geom(&xs, &ws).unwrap();
        // The direct forward, and the direct weight gradient unless the fused path takes it.
        let fused_dw = g.wino_fused_dw_pays();
        assert!(
            g.direct_fwd && g.direct_dw != fused_dw && !g.winograd,
            "{xs:?} {ws:?}"
        );
        let label = if xs[2] >= 8 && xs[1].min(ws[0]) >= 12 {
            few_channel_label()
        } else {
            "Conv direct"
        };
        assert_eq!(c.kernel_label(&xs, &ws).unwrap(), label, "{xs:?} {ws:?}");
        g.wino_fused = false;
        let e = direct_forward_error(&c, xs, ws, 5);
        assert!(e <= DIRECT_FWD_REL_TOL, "{xs:?}: forward {e:e}");
        let [edx, edw] = direct_backward_errors(&g, 6);
        assert!(
            edx <= DIRECT_FWD_REL_TOL && edw <= DW_REL_TOL,
            "{xs:?}: {edx:e} {edw:e}"
        );
        let mut rng = Rng::new(7);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [xs[0], ws[0], g.oh, g.ow], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
    let g32 = c.geom(&[9, 32, 32, 32], &[32, 32, 3, 3]).unwrap();
    assert!(g32.winograd || g32.wino_fused);
}

/// Few-channel pointwise layers (the 1x1 factors of low-rank convs) take the direct path
/// (`pointwise.rs`): forward, input and weight gradients within the direct kernels' bounds
/// against f64, the same bits on 1 and 3 threads, on planes of 16x16 and more and on the 8x8
/// planes (up to 256 channels) that would otherwise be blocked; wide, odd-plane, tiny-plane or
/// large (2^19+ multiply-adds per image on a 16x16+ plane) ones keep their GEMMs.
#[test]
fn pointwise_direct_path_matches_f64_and_is_thread_independent() {
    let c = conv(1, [1, 1], [0; 4], [1, 1]);
    for (xs, ws) in [
        ([9, 16, 32, 32], [8, 16, 1, 1]),
        ([5, 8, 16, 16], [16, 8, 1, 1]),
        ([40, 64, 8, 8], [32, 64, 1, 1]),
        ([3, 13, 12, 12], [7, 13, 1, 1]),
        ([6, 192, 8, 8], [32, 192, 1, 1]),
        ([5, 72, 8, 8], [128, 72, 1, 1]),
        ([3, 256, 8, 8], [128, 256, 1, 1]),
    ] {
        let g = c.geom(&xs, &ws).unwrap();
        assert!(g.pointwise_direct(), "{xs:?} {ws:?}");
        assert_eq!(c.kernel_label(&xs, &ws).unwrap(), "Conv 1x1 direct");
        let e = forward_error(&c, &g, xs, ws, 11);
        assert!(e <= DIRECT_FWD_REL_TOL, "{xs:?}: forward {e:e}");
        let mut rng = Rng::new(13);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let [edx, edw] = direct_backward_errors(&g, 12);
        assert!(
            edx <= DIRECT_FWD_REL_TOL && edw <= DW_REL_TOL,
            "{xs:?}: {edx:e} {edw:e}"
        );
        let dy = rand_array(&mut rng, [xs[0], ws[0], g.oh, g.ow], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
    for (xs, ws) in [
        ([4, 128, 16, 16], [64, 128, 1, 1]),
        ([4, 24, 16, 16], [144, 24, 1, 1]),
        ([4, 96, 16, 16], [24, 96, 1, 1]),
        ([4, 16, 7, 7], [8, 16, 1, 1]),
        ([4, 64, 16, 16], [40, 64, 1, 1]),
        ([4, 40, 32, 32], [64, 40, 1, 1]),
        ([4, 32, 32, 32], [16, 32, 1, 1]),
        ([4, 320, 8, 8], [64, 320, 1, 1]),
        ([4, 64, 4, 4], [32, 64, 1, 1]),
    ] {
        assert!(
            !c.geom(&xs, &ws).unwrap().pointwise_direct(),
            "{xs:?} {ws:?}"
        );
    }
}

/// Strided 1x1 convs on the subsample path (`subsample.rs`): forward against the reference,
/// gradients against finite differences, over strides 2x2, 3x3, 2x1 and 1x2, even and odd
/// planes, with and without bias; ResNet-18's shortcut shapes are labelled as such and give the
/// same bits on 1 and 3 threads; padded or grouped 1x1 convs stay off it.
#[test]
fn strided_pointwise_convs_run_as_subsample_and_match_reference() {
    if !subsample::auto_mode() {
        return;
    }
    // (strides, input, weight): blocked inner planes (2x2 to 4x4 outputs, batch 8) and the
    // direct inner path (8 -> 16 channels on an 8x8 output plane).
    let cases = [
        ([2, 2], [8, 6, 8, 8], [10, 6, 1, 1]),
        ([2, 2], [8, 5, 7, 5], [4, 5, 1, 1]),
        ([3, 3], [8, 4, 7, 9], [6, 4, 1, 1]),
        ([2, 1], [8, 3, 6, 3], [5, 3, 1, 1]),
        ([1, 2], [8, 3, 3, 6], [5, 3, 1, 1]),
        ([2, 2], [4, 8, 16, 16], [16, 8, 1, 1]),
    ];
    for (i, (strides, xs, ws)) in cases.into_iter().enumerate() {
        let c = conv(1, strides, [0; 4], [1, 1]);
        let g = c.geom(&xs, &ws).unwrap();
        assert!(g.subsample, "{strides:?} {xs:?} {ws:?}");
        assert_eq!(c.kernel_label(&xs, &ws).unwrap(), "Conv 1x1 strided");
        check_against_reference(&c, xs, ws, i % 2 == 0, 40 + i as u64, assert_grad);
    }
    // ResNet-18's shortcuts at 64x64 input, 9 images.
    let c = conv(1, [2, 2], [0; 4], [1, 1]);
    for (xs, ws) in [
        ([9, 64, 16, 16], [128, 64, 1, 1]),
        ([9, 256, 4, 4], [512, 256, 1, 1]),
    ] {
        let g = c.geom(&xs, &ws).unwrap();
        assert_eq!(c.kernel_label(&xs, &ws).unwrap(), "Conv 1x1 strided");
        let mut rng = Rng::new(5);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
        let y = Conv2d::forward_geom(&g, x.view(), w.view(), None);
        let yr = c.reference(x.view(), w.view(), None).unwrap();
        assert_close("shortcut forward", &y.view(), &yr.view(), 1e-5);
    }
    // Padding reads zeros outside the input and groups split the channels: not this path.
    let padded = conv(1, [2, 2], [1; 4], [1, 1]);
    assert!(
        !padded
            .geom(&[8, 6, 8, 8], &[10, 6, 1, 1])
            .unwrap()
            .subsample
    );
    let grouped = conv(2, [2, 2], [0; 4], [1, 1]);
    assert!(
        !grouped
            .geom(&[8, 6, 8, 8], &[10, 3, 1, 1])
            .unwrap()
            .subsample
    );
    // A 16x16 subsampled plane with a GEMM per image stays on im2col (see `subsample_pays`).
    assert!(
        !c.geom(&[8, 64, 32, 32], &[128, 64, 1, 1])
            .unwrap()
            .subsample
    );
}

/// The geometry of `c` on the channels-last Winograd path (`winograd_cl.rs`) with output tiles
/// of side `tile`, whatever the speed rule says; its weight gradient is the small-plane path's.
fn winograd_cl_forced(c: &Conv2d, xs: [usize; 4], ws: [usize; 4], tile: usize) -> Geom {
    let mut g = c.geom(&xs, &ws).unwrap();
    assert!(g.winograd_eligible(), "{c:?} {xs:?} {ws:?}");
    (g.wino_cl, g.small_plane, g.wino_tile) = (true, true, tile);
    (g.winograd, g.wino_dw, g.direct_fwd, g.direct_dw) = (false, false, false, false);
    g.wino_fused = false;
    g
}

/// Winograd's rounding scale per output: `sum_c max |x_c| over the output's input tile *
/// sum |w[o][c]|` (+ `|b|`), over the `t x t` input tile (`t = m + 2`, inside the plane) of
/// the output tile the output belongs to. Winograd forms every output of a tile from the whole
/// transformed tile, so its rounding follows the tile's magnitudes, not only the output's own
/// products: an output at a padded corner, one product of 5e-4 with a single input channel,
/// came out 8e-8 off (1.5e-4 of its own `sum |w| |x|`; the plane-wise path gives the same
/// bits). `x`: `[n, cin, h, w]`, `wsum`: `[cout, cin]` sums of `|w|` over the 3x3 taps.
fn tile_scale(
    x: &Array4<f64>,
    wsum: &Array2<f64>,
    p: &winograd::Plane,
    b: Option<&Array1<f64>>,
) -> Array4<f64> {
    let (n, cin) = (x.shape()[0], x.shape()[1]);
    let t = p.m + 2;
    let mut out = Array4::<f64>::zeros((n, p.cout, p.oh, p.ow));
    for i in 0..n {
        for ty in 0..p.th() {
            for tx in 0..p.tw() {
                let rows = (ty * p.m) as isize - p.pt as isize;
                let cols = (tx * p.m) as isize - p.pl as isize;
                let cmax: Vec<f64> = (0..cin)
                    .map(|c| {
                        let mut m = 0.0f64;
                        for a in 0..t as isize {
                            for b in 0..t as isize {
                                let (iy, ix) = (rows + a, cols + b);
                                if iy >= 0 && ix >= 0 && (iy as usize) < p.h && (ix as usize) < p.w
                                {
                                    m = m.max(x[[i, c, iy as usize, ix as usize]]);
                                }
                            }
                        }
                        m
                    })
                    .collect();
                for o in 0..p.cout {
                    let s: f64 = (0..cin).map(|c| cmax[c] * wsum[[o, c]]).sum::<f64>()
                        + b.map_or(0.0, |b| b[o]);
                    for oy in ty * p.m..(ty * p.m + p.m).min(p.oh) {
                        for ox in tx * p.m..(tx * p.m + p.m).min(p.ow) {
                            out[[i, o, oy, ox]] = s;
                        }
                    }
                }
            }
        }
    }
    out
}

/// Bound on the channels-last weight gradient's error per entry (F(4x4) tiles), relative to
/// the largest `sum |dy| |x|` over the entry's kernel window. Measured worst over the random
/// geometries below: 1.6e-6 (2.3e-7 with F(2x2) tiles).
const CL_DW_TOL: f64 = 1e-5;

/// Forward and input-gradient errors of the forced channels-last Winograd path against f64,
/// each scaled per output by its tile's scale ([`tile_scale`]) plus its own `sum |w| |x| +
/// |b|`, and of its weight gradient (scaled as `winograd_dw.rs`'s); the bias gradient is the
/// small-plane path's, bit for bit.
fn winograd_cl_errors(
    c: &Conv2d,
    xs: [usize; 4],
    ws: [usize; 4],
    bias: bool,
    seed: u64,
    tile: usize,
) -> (f64, f64, f64) {
    let g = winograd_cl_forced(c, xs, ws, tile);
    let d = ErrorCase::draw(c, &g, xs, ws, bias, seed);
    let abs = |a: &Array4<f64>| a.mapv(f64::abs);
    let y = d.forward(&g);
    let grads = d.backward(&g, true);
    let dx64 = dx_reference(&g, &d.dy64, &d.w64);
    // Per-output scales of the tile each output comes from (see `tile_scale`).
    let wsum = abs(&d.w64).sum_axis(Axis(3)).sum_axis(Axis(2));
    let yscale = tile_scale(
        &abs(&d.x64),
        &wsum,
        &g.wino_forward_plane(),
        d.b64abs.as_ref(),
    ) + &d.yscale;
    let dxscale = tile_scale(
        &abs(&d.dy64),
        &wsum.t().to_owned(),
        &g.wino_backward_plane(),
        None,
    );
    // The weight gradient, Winograd's too: scaled by the largest `sum |dy| |x|` over each
    // entry's kernel window, as for `winograd_dw.rs` (Winograd mixes the window's taps).
    let dw64 = dw_reference(&g, &d.x64, &d.dy64);
    let dwscale = window_max(dw_reference(&g, &abs(&d.x64), &abs(&d.dy64)));
    let small = d.backward(
        &Geom {
            wino_cl: false,
            ..g
        },
        false,
    );
    assert_eq!(grads.db, small.db);
    (
        scaled_error(&y, &d.y64, &yscale),
        scaled_error(grads.dx.as_ref().unwrap(), &dx64, &dxscale),
        scaled_error(&grads.dw, &dw64, &dwscale),
    )
}

/// The channels-last Winograd path against f64 over the Winograd tests' random geometries
/// (pads 0-2 on each side, planes 1 to 13 pixels, 1 to 70 channels, batches 1 to 9), both tile
/// sizes: within `WINO_REL_TOL` (F(2x2)) or `WINO4_REL_TOL` (F(4x4)) of each output's tile
/// scale, forward and input gradient; the weight gradient within `CL_DW_TOL`.
#[test]
fn winograd_cl_matches_f64_within_bound_over_random_geometries() {
    for tile in [2, 4] {
        let mut rng = Rng::new(53);
        let (mut worst_f, mut worst_b, mut worst_d) = (0.0f64, 0.0f64, 0.0f64);
        let mut cases = 0;
        while cases < 60 {
            let Some(RandomWino { pads, xs, ws }) = RandomWino::draw(&mut rng) else {
                continue;
            };
            let c = conv(1, [1, 1], pads, [1, 1]);
            let bias = rng.below(2) == 0;
            let (f, b, d) = winograd_cl_errors(&c, xs, ws, bias, cases, tile);
            assert!(
                f <= wino_tol(tile) && b <= wino_tol(tile) && d <= CL_DW_TOL,
                "F({tile}) {pads:?} x {xs:?} co {}: forward {f:e}, dx {b:e}, dw {d:e}",
                ws[0]
            );
            (worst_f, worst_b, worst_d) = (worst_f.max(f), worst_b.max(b), worst_d.max(d));
            cases += 1;
        }
        eprintln!(
            "worst scaled error: channels-last F({tile}) forward {worst_f:e}, dx {worst_b:e}, \
             dw {worst_d:e}"
        );
    }
}

/// The layers the speed rule sends there (ResNet-18's 4x4 stages, its Tucker-2 cores, ResNet-20's
/// 8x8 stage) and odd sizes (channels that are no multiple of the vector width, a 5x7 plane)
/// within the same bounds.
#[test]
fn winograd_cl_resnet_shapes_within_bound() {
    for tile in [2, 4] {
        for (xs, co) in [
            ([9, 256, 4, 4], 256),
            ([5, 152, 4, 4], 152),
            ([3, 64, 8, 8], 64),
            ([4, 70, 5, 7], 67),
        ] {
            let c = conv(1, [1, 1], [1; 4], [1, 1]);
            let ws = [co, xs[1], 3, 3];
            let (f, b, d) = winograd_cl_errors(&c, xs, ws, true, co as u64, tile);
            eprintln!("channels-last F({tile}) {xs:?} -> {co}: forward {f:e}, dx {b:e}, dw {d:e}");
            assert!(
                f <= wino_tol(tile) && b <= wino_tol(tile) && d <= CL_DW_TOL,
                "F({tile}) {xs:?} -> {co}: forward {f:e}, dx {b:e}, dw {d:e}"
            );
        }
    }
}

/// The channels-last path's forward, input and weight gradients against f64 finite differences
/// of the reference loss, both tile sizes (the weight gradient's own tile is fixed).
#[test]
fn winograd_cl_gradients_match_finite_differences() {
    for tile in [2, 4] {
        winograd_gradients_match_finite_differences_at(tile, true);
    }
}

/// The speed rule sends stride-1 3x3 layers here (labelled so): from 64 channels on 4x4 to 7x7
/// planes, from 72 on 8x8 to 15x15 ones, from 128 on 16x16 (where Winograd's plane-wise path
/// runs otherwise); not 32-channel ones, 2x2 or 32x32 planes, or strided layers. And the path
/// gives the same bits on 1 and 3 threads.
#[test]
fn winograd_cl_is_chosen_for_small_planes_and_reproducible_across_thread_counts() {
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let label = |xs: [usize; 4], co: usize| c.kernel_label(&xs, &[co, xs[1], 3, 3]).unwrap();
    if winograd_cl::auto_mode() && winograd::auto_mode() && small_plane::auto_mode() {
        assert_eq!(label([9, 256, 4, 4], 256), "Conv winograd4-cl");
        assert_eq!(label([9, 152, 4, 4], 152), "Conv winograd4-cl");
        assert_eq!(label([9, 64, 4, 4], 64), "Conv winograd4-cl");
        // Where the CPU has AVX2 + FMA or AVX-512 the fused path (`winograd_fused.rs`): up to
        // 64 channels on 8x8 planes and up, with AVX-512 up to 128 from 16x16.
        let fused = winograd_fused::Build::best() != winograd_fused::Build::Portable;
        let or_fused = |label| if fused { "Conv winograd4-fused" } else { label };
        let wide = fused_widest() >= 128;
        let or_wide_fused = |label| if wide { "Conv winograd4-fused" } else { label };
        assert_eq!(label([9, 72, 8, 8], 72), "Conv winograd4-cl");
        assert_eq!(
            label([9, 64, 8, 8], 64),
            or_fused("Conv winograd+small-plane")
        );
        assert_eq!(label([9, 68, 8, 8], 68), "Conv winograd+small-plane");
        assert_eq!(label([9, 32, 4, 4], 32), "Conv small-plane");
        assert_eq!(label([9, 512, 2, 2], 512), "Conv small-plane");
        // Winograd layers on 8x8 to 16x16 planes: from 128 channels on 16x16, and not on
        // 32x32 planes.
        assert_eq!(label([9, 128, 8, 8], 128), "Conv winograd4-cl");
        // (On Intel the channels-last path keeps it.)
        let wide_over_cl = fused_widest_where_cl_takes() >= 128;
        assert_eq!(
            label([9, 128, 16, 16], 128),
            if wide_over_cl {
                "Conv winograd4-fused"
            } else {
                "Conv winograd4-cl"
            }
        );
        assert_eq!(label([9, 256, 16, 16], 256), "Conv winograd4-cl");
        assert_eq!(label([9, 72, 16, 16], 72), or_wide_fused("Conv winograd4"));
        assert_eq!(
            label([9, 128, 32, 32], 128),
            or_wide_fused("Conv winograd4")
        );
        assert_eq!(label([9, 136, 32, 32], 136), "Conv winograd4");
        let s2 = conv(1, [2, 2], [1; 4], [1, 1]);
        let g = s2.geom(&[9, 256, 8, 8], &[512, 256, 3, 3]).unwrap();
        assert!(!g.wino_cl);
    }
    for tile in [2, 4] {
        let (xs, ws) = ([9, 72, 8, 8], [80, 72, 3, 3]);
        let g = winograd_cl_forced(&c, xs, ws, tile);
        let mut rng = Rng::new(59);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [9, 80, 8, 8], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
}

/// The widest layer the fused path's speed rule takes on this CPU's build (0 without one).
fn fused_widest() -> usize {
    winograd_fused::Build::best()
        .rule_channels()
        .map_or(0, |(_, most)| most)
}

/// [`fused_widest`] among the layers the channels-last Winograd takes (128+ channels on 16x16
/// planes): on Intel CPUs those above `WIDEST_ON_INTEL` stay there.
fn fused_widest_where_cl_takes() -> usize {
    if winograd_fused::intel_cpu() {
        fused_widest().min(winograd_fused::WIDEST_ON_INTEL)
    } else {
        fused_widest()
    }
}

/// The label ResNet-20's 16-channel 32x32 layers get: the fused Winograd path where the CPU
/// has AVX2 + FMA or AVX-512 (its speed rule), else the direct kernel.
fn few_channel_label() -> &'static str {
    if winograd_fused::Build::best() != winograd_fused::Build::Portable {
        "Conv winograd4-fused"
    } else if crate::engine::isa::fast_fma() {
        "Conv direct"
    } else {
        "Conv winograd"
    }
}

/// Errors of the fused path's forward `y`, input gradient `dx` and weight gradient `dw` on case
/// `d` of geometry `g` against f64: each output scaled by its F(4x4) tile's scale plus its own
/// `sum |w| |x| + |b|`, each weight-gradient entry by the largest `sum |dy| |x|` over its
/// kernel window, as the other Winograd paths' errors.
fn fused_scaled_errors(
    g: &Geom,
    d: &ErrorCase,
    y: &Array4<f32>,
    dx: &Array4<f32>,
    dw: &Array4<f32>,
) -> (f64, f64, f64) {
    let abs = |a: &Array4<f64>| a.mapv(f64::abs);
    let wsum = abs(&d.w64).sum_axis(Axis(3)).sum_axis(Axis(2));
    let bp = winograd::Plane {
        m: 4,
        ..g.wino_backward_plane()
    };
    let yscale = tile_scale(&abs(&d.x64), &wsum, &g.fused_plane(), d.b64abs.as_ref()) + &d.yscale;
    let dxscale = tile_scale(&abs(&d.dy64), &wsum.t().to_owned(), &bp, None);
    let dx64 = dx_reference(g, &d.dy64, &d.w64);
    let dw64 = dw_reference(g, &d.x64, &d.dy64);
    let dwscale = window_max(dw_reference(g, &abs(&d.x64), &abs(&d.dy64)));
    (
        scaled_error(y, &d.y64, &yscale),
        scaled_error(dx, &dx64, &dxscale),
        scaled_error(dw, &dw64, &dwscale),
    )
}

/// Forward, input-gradient and weight-gradient errors of the fused Winograd kernels (build
/// `build`; the forward called image by image on the forward's plane and on the input
/// gradient's with the flipped weights, the weight gradient over the batch on the forward's
/// scratch, which the forward left dirty) against f64: each output scaled by its tile's scale
/// plus its own `sum |w| |x| + |b|`, each weight-gradient entry by the largest `sum |dy| |x|`
/// over its kernel window, as the other Winograd paths' errors.
fn winograd_fused_errors(
    c: &Conv2d,
    xs: [usize; 4],
    ws: [usize; 4],
    bias: bool,
    seed: u64,
    build: winograd_fused::Build,
) -> (f64, f64, f64) {
    let g = c.geom(&xs, &ws).unwrap();
    let d = ErrorCase::draw(c, &g, xs, ws, bias, seed);
    let fp = g.fused_plane();
    let bp = winograd::Plane {
        m: 4,
        ..g.wino_backward_plane()
    };
    let w = d.w.as_slice().unwrap();
    let u = winograd_fused::fused_weights(g.co, g.ci, w);
    let ut = winograd_fused::fused_weights(g.ci, g.co, &g.flipped_transposed(w));
    let (xlen, ylen) = (g.x_len(), g.y_len());
    let (mut y, mut dx) = (vec![f32::NAN; g.n * ylen], vec![f32::NAN; g.n * xlen]);
    let (mut sf, mut sb) = (fp.fused_scratch(), bp.fused_scratch());
    let b = d.b.as_ref().map(|b| b.as_slice().unwrap());
    let (gf, gb) = (sf.images(), sb.images());
    for (yi, xi) in y
        .chunks_mut(gf * ylen)
        .zip(d.x.as_slice().unwrap().chunks(gf * xlen))
    {
        fp.fused_run_with(build, xi, &u, b, yi, &mut sf, false);
    }
    for (dxi, dyi) in dx
        .chunks_mut(gb * xlen)
        .zip(d.dy.as_slice().unwrap().chunks(gb * ylen))
    {
        bp.fused_run_with(build, dyi, &ut, None, dxi, &mut sb, false);
    }
    assert!(
        y.iter().chain(&dx).all(|v| v.is_finite()),
        "every entry written"
    );
    let y = Array4::from_shape_vec((g.n, g.co, g.oh, g.ow), y).unwrap();
    let dx = Array4::from_shape_vec((g.n, g.ci, g.h, g.w), dx).unwrap();
    let mut dw = vec![f32::NAN; d.w.len()];
    fp.fused_weight_grad_with(
        build,
        d.x.as_slice().unwrap(),
        d.dy.as_slice().unwrap(),
        &mut dw,
        &mut sf,
    );
    assert!(dw.iter().all(|v| v.is_finite()), "every entry written");
    let dw = Array4::from_shape_vec(d.w.raw_dim(), dw).unwrap();
    fused_scaled_errors(&g, &d, &y, &dx, &dw)
}

/// The fused Winograd kernel, every build this CPU runs, against f64 over random geometries:
/// 1 to 16 channels in and out (lanes past them zero), planes of 1 to 21 pixels a side (part
/// tiles, blocks of fewer than 8 tiles, rows no multiple of 16), pads 0-2 on each side
/// (asymmetric), batches of 1-3 (the scratch reused across images): forward and input gradient
/// within `WINO4_REL_TOL` of each output's tile scale, the weight gradient within `CL_DW_TOL`.
#[test]
fn winograd_fused_matches_f64_within_bound_over_random_geometries() {
    for build in winograd_fused::Build::available() {
        let mut rng = Rng::new(61);
        let (mut worst_f, mut worst_b, mut worst_d, mut cases) = (0.0f64, 0.0f64, 0.0f64, 0);
        while cases < 50 {
            let pads = [rng.below(3), rng.below(3), rng.below(3), rng.below(3)];
            let (h, w) = (1 + rng.below(21), 1 + rng.below(21));
            if h + pads[0] + pads[2] < 3 || w + pads[1] + pads[3] < 3 {
                continue;
            }
            let (n, ci, co) = (1 + rng.below(3), 1 + rng.below(40), 1 + rng.below(40));
            let c = conv(1, [1, 1], pads, [1, 1]);
            let bias = rng.below(2) == 0;
            let (xs, ws) = ([n, ci, h, w], [co, ci, 3, 3]);
            let (f, b, d) = winograd_fused_errors(&c, xs, ws, bias, cases, build);
            assert!(
                f <= winograd::WINO4_REL_TOL && b <= winograd::WINO4_REL_TOL && d <= CL_DW_TOL,
                "{build:?} {pads:?} x {xs:?} co {co}: forward {f:e}, dx {b:e}, dw {d:e}"
            );
            (worst_f, worst_b, worst_d) = (worst_f.max(f), worst_b.max(b), worst_d.max(d));
            cases += 1;
        }
        eprintln!(
            "worst scaled error: fused F(4x4) {build:?} forward {worst_f:e}, dx {worst_b:e}, \
             dw {worst_d:e}"
        );
    }
}

/// Through the conv's forward and backward with the fused path forced on (ResNet-20's layer,
/// a rank-12 Tucker-2 core on an odd plane, asymmetric pads, ResNet-18's 128-channel width):
/// forward and input gradient
/// within `WINO4_REL_TOL` of the tile scale, the weight gradient within `CL_DW_TOL`, the bias
/// gradient bit for bit the direct path's, the same bits on 1 and 3 threads.
#[test]
fn winograd_fused_layers_match_f64_and_are_thread_independent() {
    for (xs, co, pads) in [
        ([3, 16, 32, 32], 16, [1; 4]),
        ([2, 12, 17, 19], 14, [1; 4]),
        ([2, 16, 20, 18], 9, [0, 2, 1, 0]),
        ([2, 32, 16, 16], 32, [1; 4]),
        ([2, 40, 13, 18], 64, [2, 1, 0, 1]),
        // Wider than four vectors (the rule takes up to eight), and a batch whose weight
        // gradient runs in two parts (16 images of 4 tiles each, `Geom::fused_dw_part`).
        ([2, 72, 9, 7], 80, [1; 4]),
        ([20, 128, 8, 8], 120, [1; 4]),
    ] {
        let c = conv(1, [1, 1], pads, [1, 1]);
        let ws = [co, xs[1], 3, 3];
        let mut g = c.geom(&xs, &ws).unwrap();
        (
            g.direct_fwd,
            g.winograd,
            g.small_plane,
            g.wino_cl,
            g.wino_dw,
        ) = (true, false, false, false, false);
        assert!(g.wino_fused_eligible(), "{xs:?} {ws:?}");
        g.wino_fused = true;
        assert!(g.direct_dx_geom().is_some_and(|gt| gt.wino_fused));
        let d = ErrorCase::draw(&c, &g, xs, ws, true, co as u64);
        let y = d.forward(&g);
        let grads = d.backward(&g, true);
        let (f, b, e) = fused_scaled_errors(&g, &d, &y, grads.dx.as_ref().unwrap(), &grads.dw);
        assert!(y.iter().all(|v| v.is_finite()));
        eprintln!("fused F(4x4) {xs:?} -> {co}: forward {f:e}, dx {b:e}");
        assert!(
            f <= winograd::WINO4_REL_TOL && b <= winograd::WINO4_REL_TOL,
            "{xs:?} -> {co}: forward {f:e}, dx {b:e}"
        );
        eprintln!("fused F(4x4) {xs:?} -> {co}: dw {e:e}");
        assert!(e <= CL_DW_TOL, "{xs:?} -> {co}: dw {e:e}");
        let direct = d.backward(
            &Geom {
                wino_fused: false,
                ..g
            },
            true,
        );
        assert_eq!(grads.db, direct.db);
        assert_same_on_1_and_3_threads(&g, &d.x, &d.w, &d.dy);
    }
}

/// The speed rule: the fused path for stride-1 3x3 layers of 12 to 128 channels on 16x16
/// planes and up where the CPU has AVX-512 (ResNet-20's first two stages, ResNet-18's 64ch
/// and 128ch layers), of 16 to 64 where it has AVX2 + FMA, and 8x8 ones (their last stage),
/// not for 8-channel layers, 4x4 planes, 129+ channels, strided layers or the 3-channel stem;
/// its weight gradient on every layer it takes; and on such a layer the conv's own forward and gradients against the reference and
/// f64 finite differences, on 16x16 and on 8x8 (whose tiles two images share per block).
#[test]
fn winograd_fused_is_chosen_by_the_rule_and_matches_finite_differences() {
    if !direct::auto_mode() || !winograd::auto_mode() {
        return;
    }
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let fused = |xs: [usize; 4], co: usize| c.geom(&xs, &[co, xs[1], 3, 3]).unwrap().wino_fused;
    let simd = winograd_fused::Build::best() != winograd_fused::Build::Portable;
    let (fewest, widest) = winograd_fused::Build::best()
        .rule_channels()
        .unwrap_or((usize::MAX, 0));
    let wide = widest >= 128;
    assert_eq!(fused([4, 16, 32, 32], 16), simd);
    assert_eq!(fused([4, 12, 16, 16], 14), fewest <= 12);
    assert_eq!(fused([4, 32, 16, 16], 32), simd);
    assert_eq!(fused([4, 64, 16, 16], 64), simd);
    assert_eq!(fused([4, 24, 32, 32], 40), simd);
    assert!(!fused([4, 8, 32, 32], 8));
    assert_eq!(fused([4, 16, 8, 8], 16), simd);
    assert_eq!(fused([4, 64, 8, 8], 64), simd);
    assert!(!fused([4, 64, 4, 4], 64));
    assert_eq!(fused([4, 72, 16, 16], 72), wide);
    assert!(!fused([4, 128, 8, 8], 128));
    assert!(!fused([4, 72, 15, 15], 72));
    assert_eq!(
        fused([4, 128, 16, 16], 128),
        fused_widest_where_cl_takes() >= 128
    );
    assert!(!fused([4, 128, 4, 4], 128));
    assert!(!fused([4, 256, 8, 8], 256));
    assert!(!fused([4, 3, 32, 32], 16));
    // The fused weight gradient on every layer the path takes.
    for (ch, px) in [(16, 32), (32, 16), (64, 8), (128, 16)] {
        let g = c.geom(&[4, ch, px, px], &[ch, ch, 3, 3]).unwrap();
        let widest = if ch >= 128 && px == 16 {
            fused_widest_where_cl_takes()
        } else {
            fused_widest()
        };
        let taken = simd && ch <= widest;
        assert_eq!(g.wino_fused_dw_pays(), taken, "{ch}ch {px}px");
        assert!(!g.wino_dw || !taken);
    }
    let strided = conv(1, [2, 2], [1; 4], [1, 1]);
    assert!(
        !strided
            .geom(&[4, 16, 32, 32], &[16, 16, 3, 3])
            .unwrap()
            .wino_fused
    );
    check_against_reference(&c, [1, 12, 16, 16], [12, 12, 3, 3], true, 67, assert_grad);
    check_against_reference(&c, [3, 12, 8, 8], [14, 12, 3, 3], true, 68, assert_grad);
}

/// Pointwise convs on 1x1 planes (squeeze-excitation's, after the global pool) run as one
/// Gemm over the batch (`pointwise.rs`, labelled "Conv 1x1 gemm"), with and without bias,
/// against the reference and f64 finite differences, the same bits on 1 and 3 threads, and
/// the values of the blocked GEMMs they replace within 1e-5.
#[test]
fn one_pixel_pointwise_convs_run_as_a_gemm_and_match_the_reference() {
    let c = conv(1, [1, 1], [0; 4], [1, 1]);
    assert_eq!(
        c.kernel_label(&[64, 576, 1, 1], &[144, 576, 1, 1]).unwrap(),
        "Conv 1x1 gemm"
    );
    assert_ne!(
        c.kernel_label(&[64, 576, 2, 2], &[144, 576, 1, 1]).unwrap(),
        "Conv 1x1 gemm"
    );
    check_against_reference(&c, [5, 24, 1, 1], [16, 24, 1, 1], true, 71, assert_grad);
    check_against_reference(&c, [3, 7, 1, 1], [9, 7, 1, 1], false, 72, assert_grad);
    // Wide enough that the Gemm splits its products across threads.
    let (xs, ws) = ([200, 576, 1, 1], [144, 576, 1, 1]);
    let g = c.geom(&xs, &ws).unwrap();
    assert!(g.pointwise_one_pixel());
    let mut rng = Rng::new(73);
    let x = rand_array(&mut rng, xs, -1.0, 1.0);
    let w = rand_array(&mut rng, ws, -1.0, 1.0);
    let dy = rand_array(&mut rng, [200, 144, 1, 1], -1.0, 1.0);
    assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    let gemm = c.forward(x.view(), w.view(), None).unwrap();
    let grads = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
    set_pointwise_one_pixel(Some(false));
    let blocked = c.forward(x.view(), w.view(), None).unwrap();
    let bgrads = c.backward(x.view(), w.view(), dy.view(), true).unwrap();
    set_pointwise_one_pixel(None);
    assert_close("forward", &gemm.view(), &blocked.view(), 1e-5);
    assert_close(
        "dx",
        &grads.dx.unwrap().view(),
        &bgrads.dx.unwrap().view(),
        1e-5,
    );
    assert_close("dw", &grads.dw.view(), &bgrads.dw.view(), 1e-5);
}

/// Scaled errors of the channels-last column path (`cols_cl.rs`, forced on) against f64
/// ([`forced_path_errors`], the bias gradient against the per-image path's).
fn cols_cl_errors(c: &Conv2d, xs: [usize; 4], ws: [usize; 4], bias: bool, seed: u64) -> [f64; 3] {
    let mut g = c.geom(&xs, &ws).unwrap();
    assert!(g.cols_cl_eligible(), "{c:?} {xs:?} {ws:?}");
    g.cols_cl = true;
    (g.small_plane, g.winograd, g.direct_dw, g.direct_fwd) = (false, false, false, false);
    (g.wino_cl, g.wino_dw, g.wino_fused, g.subsample) = (false, false, false, false);
    let plain = Geom {
        cols_cl: false,
        ..g
    };
    forced_path_errors(c, &g, &plain, xs, ws, bias, seed)
}

/// The channels-last column path (forced on) against f64 over random geometries: kernels 1x1
/// to 4x4, strides 1-3, dilations 1-2, asymmetric pads 0-2, planes 1x1 to 12x12, 1 to 40
/// channels, batches 1 to 20 (blocks of several images, a short last block and part).
/// Measured worst: 1.95e-7 forward, 1.87e-7 input gradient, 2.06e-7 weight gradient.
#[test]
fn cols_cl_path_matches_f64_over_random_geometries() {
    let worst = random_geometry_errors(
        93,
        60,
        (3, 12, &[1, 3, 20]),
        |rng, _| (1 + rng.below(40), 1 + rng.below(40)),
        |_| true,
        cols_cl_errors,
    );
    eprintln!("worst scaled channels-last column errors: forward, dx, dw {worst:?}");
}

/// Strided 3x3 layers within the rule's weight bounds take the channels-last column path
/// (ResNet-20's 16 -> 32 and 32 -> 64, ResNet-18's 128 -> 256 from 16x16, a Tucker-2 core's 72
/// -> 152 onto a 4x4 plane), within the bound, with the same bits on 1 and 3 threads; wider
/// ones, small planes above the smaller bound, strided 1x1 and few-channel layers do not.
#[test]
fn cols_cl_path_is_chosen_for_strided_layers_and_reproducible_across_thread_counts() {
    if !cols_cl::auto_mode() {
        return;
    }
    let s2 = conv(1, [2, 2], [1; 4], [1, 1]);
    for (xs, ws) in [
        ([3, 16, 32, 32], [32, 16, 3, 3]),
        ([9, 32, 16, 16], [64, 32, 3, 3]),
        ([2, 128, 16, 16], [256, 128, 3, 3]),
        ([5, 72, 8, 8], [152, 72, 3, 3]),
    ] {
        assert_eq!(
            s2.kernel_label(&xs, &ws).unwrap(),
            "Conv im2col-cl",
            "{xs:?} {ws:?}"
        );
        let e = cols_cl_errors(&s2, xs, ws, false, 5);
        assert!(e.iter().all(|&e| e <= SMALL_PLANE_REL_TOL), "{xs:?}: {e:?}");
        let g = s2.geom(&xs, &ws).unwrap();
        let mut rng = Rng::new(9);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
        assert_same_on_1_and_3_threads(&g, &x, &w, &dy);
    }
    for (c, xs, ws) in [
        // 256 -> 512: more weights than the rule takes.
        (s2.clone(), [2, 256, 8, 8], [512, 256, 3, 3]),
        // 128 -> 256 onto a 4x4 plane: above the small planes' bound.
        (s2.clone(), [2, 128, 8, 8], [256, 128, 3, 3]),
        // A strided 1x1 (subsample or im2col) and a few-channel stem.
        (
            conv(1, [2, 2], [0; 4], [1, 1]),
            [2, 64, 32, 32],
            [128, 64, 1, 1],
        ),
        (s2.clone(), [2, 3, 32, 32], [32, 3, 3, 3]),
    ] {
        assert!(!c.geom(&xs, &ws).unwrap().cols_cl, "{c:?} {xs:?} {ws:?}");
    }
}

/// The channels-last column path's forward and input gradient of a range of images do not
/// depend on the images around them (ranks of a data-parallel run hold other ranges than one
/// process), and its weight gradients of two halves of a batch sum to the whole batch's within
/// 2e-7 relative (f32 sums in another grouping). Measured 9.1e-8 and 6.9e-8; the paths it
/// replaced on these layers (im2col, small-plane) 1.2e-7 and 2.3e-7.
#[test]
fn cols_cl_results_do_not_depend_on_the_images_around_one() {
    let s2 = conv(1, [2, 2], [1; 4], [1, 1]);
    for (xs, ws) in [
        ([32, 16, 32, 32], [32, 16, 3, 3]),
        ([32, 32, 16, 16], [64, 32, 3, 3]),
    ] {
        let mut rng = Rng::new(9);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let mut g = s2.geom(&xs, &ws).unwrap();
        let mut half = s2.geom(&[16, xs[1], xs[2], xs[3]], &ws).unwrap();
        (g.cols_cl, half.cols_cl) = (true, true);
        (g.small_plane, half.small_plane) = (false, false);
        let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
        let whole = Conv2d::backward_geom(&g, x.view(), w.view(), dy.view(), true);
        let y = Conv2d::forward_geom(&g, x.view(), w.view(), None);
        let mut dw_sum = Array4::<f32>::zeros(w.raw_dim());
        for r in [0..16, 16..32] {
            let (xr, dyr) = (
                x.slice(ndarray::s![r.clone(), .., .., ..]),
                dy.slice(ndarray::s![r.clone(), .., .., ..]),
            );
            let part = Conv2d::backward_geom(&half, xr, w.view(), dyr, true);
            let yr = Conv2d::forward_geom(&half, xr, w.view(), None);
            assert_eq!(
                yr,
                y.slice(ndarray::s![r.clone(), .., .., ..]),
                "{xs:?} forward"
            );
            let dx = whole.dx.as_ref().unwrap();
            assert_eq!(
                part.dx.unwrap(),
                dx.slice(ndarray::s![r, .., .., ..]),
                "{xs:?} dx"
            );
            dw_sum += &part.dw;
        }
        let rel = |a: &Array4<f32>| {
            let n: f64 = (a - &whole.dw).iter().map(|v| f64::from(*v).powi(2)).sum();
            let d: f64 = whole.dw.iter().map(|v| f64::from(*v).powi(2)).sum();
            (n / d).sqrt()
        };
        let e = rel(&dw_sum);
        assert!(e <= 2e-7, "{xs:?}: weight gradient of the halves {e:e}");
    }
}

/// cols_cl's parts are the batch's fixed parts wherever a part holds its fewest rows, with
/// blocks splitting them evenly (ResNet-20's strided layers at batch 128: 16 parts, not 10),
/// and parts rounded up to whole blocks of 512+ rows elsewhere (4x4 planes at batch 64).
#[test]
fn cols_cl_parts_follow_the_batch_parts_where_they_hold_enough_rows() {
    let s2 = conv(1, [2, 2], [1; 4], [1, 1]);
    for (xs, ws, want) in [
        // 256 output pixels: parts of 8 images, blocks of 4 (7 fit in 1 MB of columns).
        ([128, 16, 32, 32], [32, 16, 3, 3], (8, 4)),
        // 64 output pixels: a part of 8 images is 512 rows, one block.
        ([128, 32, 16, 16], [64, 32, 3, 3], (8, 8)),
        // 16 output pixels (parts of 4 images, 64 rows): blocks of 32 images, one part each.
        ([64, 72, 8, 8], [152, 72, 3, 3], (32, 32)),
        // 64 output pixels at batch 64 (parts of 4): blocks of 8.
        ([64, 128, 16, 16], [256, 128, 3, 3], (8, 8)),
        // A batch smaller than a block: one part and block of it all.
        ([3, 16, 32, 32], [32, 16, 3, 3], (3, 3)),
    ] {
        let g = s2.geom(&xs, &ws).unwrap();
        assert_eq!(g.cl_part_and_block(), want, "{xs:?} {ws:?}");
    }
}

/// The bits of `a + b`, entry by entry (the engine's gradient accumulation).
fn sum_bits(a: &[f32], b: &[f32]) -> Vec<u32> {
    a.iter().zip(b).map(|(a, b)| (a + b).to_bits()).collect()
}

/// The fused Winograd pass with `add` gives, on every build this CPU runs, bitwise what it
/// holds plus the pass's own result (its copy-out adds in place of writing), on planes whose
/// rows are whole vectors and not (8x8, 12x12, 10x10 with 24 channels: masked tails).
#[test]
fn fused_run_adding_gives_the_held_values_plus_the_result_bitwise() {
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    for (xs, co, seed) in [
        ([3, 16, 8, 8], 16, 41),
        ([2, 24, 12, 12], 40, 42),
        ([2, 16, 10, 10], 24, 43),
    ] {
        let g = c.geom(&xs, &[co, xs[1], 3, 3]).unwrap();
        let mut rng = Rng::new(seed);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, [co, xs[1], 3, 3], -1.0, 1.0);
        let held = rand_array(&mut rng, [xs[0], co, g.oh, g.ow], -1.0, 1.0);
        let u = winograd_fused::fused_weights(co, xs[1], w.as_slice().unwrap());
        let p = g.fused_plane();
        let (xlen, ylen) = (g.x_len(), g.y_len());
        for build in winograd_fused::Build::available() {
            let mut s = p.fused_scratch();
            let b = s.images();
            let mut own = vec![f32::NAN; held.len()];
            let mut added = held.as_slice().unwrap().to_vec();
            let xv = x.as_slice().unwrap();
            for (yb, xb) in own.chunks_mut(b * ylen).zip(xv.chunks(b * xlen)) {
                p.fused_run_with(build, xb, &u, None, yb, &mut s, false);
            }
            for (yb, xb) in added.chunks_mut(b * ylen).zip(xv.chunks(b * xlen)) {
                p.fused_run_with(build, xb, &u, None, yb, &mut s, true);
            }
            let added: Vec<u32> = added.iter().map(|v| v.to_bits()).collect();
            assert_eq!(
                added,
                sum_bits(held.as_slice().unwrap(), &own),
                "{build:?} {xs:?}"
            );
        }
    }
}

/// `Conv2d::backward_adding` gives the input gradient of `backward_with` added to the one it
/// is handed, bitwise, and the same weight and bias gradients: on a layer the fused Winograd
/// path takes on this CPU (16 channels on 8x8, 32 on 16x16; where the path is off they take
/// others) and on layers it does not (stride 2, 1x1); a gradient of another shape is refused.
#[test]
fn backward_adding_gives_the_held_gradient_plus_the_input_gradient_bitwise() {
    let cases = [
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [4, 16, 8, 8],
            [16, 16, 3, 3],
        ),
        (
            conv(1, [1, 1], [1; 4], [1, 1]),
            [2, 32, 16, 16],
            [32, 32, 3, 3],
        ),
        (
            conv(1, [2, 2], [1; 4], [1, 1]),
            [4, 16, 8, 8],
            [32, 16, 3, 3],
        ),
        (
            conv(1, [1, 1], [0; 4], [1, 1]),
            [4, 16, 8, 8],
            [24, 16, 1, 1],
        ),
    ];
    for (i, (c, xs, ws)) in cases.into_iter().enumerate() {
        let g = c.geom(&xs, &ws).unwrap();
        let mut rng = Rng::new(50 + i as u64);
        let x = rand_array(&mut rng, xs, -1.0, 1.0);
        let w = rand_array(&mut rng, ws, -1.0, 1.0);
        let dy = rand_array(&mut rng, [g.n, g.co, g.oh, g.ow], -1.0, 1.0);
        let held = rand_array(&mut rng, xs, -1.0, 1.0);
        let own = c
            .backward_with(x.view(), w.view(), dy.view(), true, true)
            .unwrap();
        let sum = c
            .backward_adding(x.view(), w.view(), dy.view(), held.clone(), true)
            .unwrap();
        let dx = sum.dx.unwrap();
        let bits: Vec<u32> = dx.iter().map(|v| v.to_bits()).collect();
        let own_dx = own.dx.unwrap();
        assert_eq!(
            bits,
            sum_bits(held.as_slice().unwrap(), own_dx.as_slice().unwrap()),
            "{xs:?} {ws:?} (fused: {})",
            g.wino_fused
        );
        assert_eq!(sum.dw, own.dw);
        assert_eq!(sum.db, own.db);
    }
    let c = conv(1, [1, 1], [1; 4], [1, 1]);
    let x = Array4::<f32>::zeros((2, 16, 8, 8));
    let w = Array4::<f32>::zeros((16, 16, 3, 3));
    let wrong = Array4::<f32>::zeros((2, 16, 8, 4));
    let err = c
        .backward_adding(x.view(), w.view(), x.view(), wrong, true)
        .unwrap_err();
    assert!(err.to_string().contains("to add to"), "{err}");
}
