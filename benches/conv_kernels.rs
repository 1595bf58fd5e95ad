//! The convolution kernels alone, forward and backward (input and weight gradients), at batch 32
//! on one thread: the shapes that dominate ResNet-20 and its Tucker-2 and CP forms.
//!
//!     cargo bench --bench conv_kernels [-- FILTER]
//!     ELRT_BENCH_THREADS=2 cargo bench --bench conv_kernels [-- FILTER]
//!
//! Every group runs on one global pool of 1 thread unless `ELRT_BENCH_THREADS` says otherwise
//! (`RAYON_NUM_THREADS` does not apply: the pool is built here).
//!
//! - `3x3_16ch_32px`: the first stage of ResNet-20 (im2col + sgemm, flat taps);
//! - `3x3_core8_32px`: a Tucker-2 core at rank 8 in that stage;
//! - `dw3x1_48ch_16px`, `dw1x3_48ch_16px`: CP's depthwise factors at rank 48 in the second stage;
//! - `dw3x3_64ch_8px`: a 3x3 depthwise conv (MobileNet-style);
//! - `7x7s2_stem_3ch_128px`: ResNet-18's stem at 128x128 input (7x7, stride 2, 3 -> 64
//!   channels; strided im2col through column phases, `conv/im2col.rs`). 2026-12-02, session 5:
//!   batch 32, 1 thread: forward 28.6 -> 23.8 ms, backward (input and weight gradients) 59.9 -> 51.6 ms
//!   against the per-element gather it replaced;
//! - group `conv_blocks`: ResNet-18's last two stages at 64x64 input (3x3, 256 channels on 4x4,
//!   512 on 2x2), the whole batch at once on the small-plane path (channels-last GEMMs over
//!   the batch, `conv/small_plane.rs`) and on blocked im2col (several images per GEMM,
//!   `conv/block.rs`), against the same images one call each (the per-image path, one GEMM
//!   of 16 or 4 columns each); and ResNet-18's 1x1 stride-2 shortcuts (64 -> 128 from 16x16,
//!   256 -> 512 from 4x4) as a subsample and a pointwise conv (`conv/subsample.rs`) against
//!   im2col;
//! - group `winograd_cl`: stride-1 3x3 layers on small planes (ResNet-18's 256 and 512
//!   channels on 4x4 at 64x64 and 128x128 input, its Tucker-2 cores of 152 channels on 4x4 and
//!   72 on 8x8, ResNet-20's 64 channels on 8x8, ResNet-18's 128 channels on 8x8 and 16x16),
//!   the rule without channels-last Winograd (small-plane or Winograd's plane-wise path)
//!   against channels-last Winograd F(4x4, 3x3) over the batch (`conv/winograd_cl.rs`, with
//!   the small-plane weight gradient and with its own), forward and backward apart;
//! - group `strided`: stride-2 3x3 layers (ResNet-20's, ResNet-18's 64 -> 128 and 128 -> 256,
//!   a Tucker-2 core's 72 -> 152), the channels-last column blocks (`conv/cols_cl.rs`) against
//!   the path the speed rule took before them (im2col or small-plane), forward and backward;
//! - group `winograd`: the 3x3 layers of ResNet-18 at 64x64 and ResNet-20 at batch 64, im2col
//!   against Winograd F(2x2, 3x3) (`conv/winograd.rs`), forward and backward;
//! - group `depthwise`: EfficientNet-B0's depthwise convs at 64x64 input (3x3 and 5x5, stride
//!   1 and 2, planes from 32x32 down to 2x2, 96 to 672 channels), forward then backward (input
//!   and weight gradients) per call, as a training step runs them.
//! - group `weight_grad`: the weight gradient alone (backward without the input gradient) of
//!   the stride-1 3x3 layers of ResNet-20 and ResNet-18 and ResNet-18's 7x7 stride-2 stem at
//!   batch 64 (and ResNet-18's 128-channel 28x28 stage at 224x224), im2col + GEMM against the
//!   direct kernel on the padded input (`conv/weight_grad.rs`; the stem through its stride
//!   phases) and, on the 3x3 layers, Winograd's F(2x2) and F(4x4) weight gradients
//!   (`conv/winograd_dw.rs`, `winograd` and `winograd4`), on ResNet-20's 16-channel layer
//!   also the fused path's (`conv/winograd_fused.rs`, `winograd4-fused`).
//! - group `direct_forward`: the forward alone of ResNet-18's 7x7 stride-2 stem at 64x64 and
//!   128x128, batch 64, im2col + GEMM against the direct kernel (`conv/direct.rs`); and of
//!   few-channel 3x3 layers (16 channels on 32x32 and 16x16, Tucker-2 cores of rank 8 and 12
//!   on 32x32, batch 64), Winograd F(2x2) against the direct kernel and the fused F(4x4) path
//!   (`conv/winograd_fused.rs`); and pointwise layers the direct path takes (Tucker-2
//!   factors 16 -> 8 and 8 -> 16 on 32x32, 64 -> 32 and 32 -> 64 on 8x8), forward then
//!   backward, GEMM against the direct path (`conv/pointwise.rs`).
//! - group `silu`: SiLU forward then backward on an EfficientNet-B0 expanded activation (32 x 144
//!   x 16 x 16), fused (`Activation::Silu`) against the Sigmoid then Mul that exports spell it
//!   as (with the executor's sum of the two gradient paths into `x`).
//!   In the same group, HardSwish as opset-13 exports spell it: `Activation::HardSigmoidMul`
//!   against HardSigmoid then Mul (MobileNet-V3).
//!
//! - group `backward_adding`: the backward of a residual block's first conv (ResNet-20's
//!   16 channels on 32x32 at batch 128, its 64 channels on 8x8, resnet18's 64 on 16x16 at batch
//!   64) whose input already holds the join's gradient: `Conv2d::backward_adding` (the fused
//!   Winograd path adds as it copies out) against `backward` and then the separate `acc +=
//!   dx` pass the executor ran before (the same bits, tested in
//!   `backward_adding_gives_the_held_gradient_plus_the_input_gradient_bitwise`).
//!
//! Criterion reports time per call and images per second. Compare kernels before and after a
//! change with `--save-baseline` / `--baseline`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use elrt::engine::ops::conv::{
    set_cols_channels_last, set_depthwise_channels_last, set_direct_forward, set_direct_pointwise,
    set_direct_weight_grad, set_small_plane, set_subsample_pointwise, set_winograd,
    set_winograd_cl, set_winograd_cl_weight_grad, set_winograd_fused,
    set_winograd_fused_weight_grad, set_winograd_weight_grad, set_winograd_weight_grad_f4,
    set_winograd_weight_grad_small_planes, Conv2d, WinogradMode,
};
use elrt::engine::ops::Activation;
use elrt::engine::tensor_ops::{binary_backward, binary_forward, BinOp};
use ndarray::Array4;

const BATCH: usize = 32;

/// The one global pool every group here runs on: 1 thread, or `ELRT_BENCH_THREADS` (as
/// `benches/train_step.rs`). `conv_kernels` builds it, and criterion calls that group first
/// even when a filter selects another, so `RAYON_NUM_THREADS` has no effect here.
fn bench_pool() {
    let threads = std::env::var("ELRT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    // Already built when a later group calls this: that pool is the one asked for.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build_global();
}

fn conv_kernels(c: &mut Criterion) {
    elrt::engine::tune_allocator();
    bench_pool();
    elrt::engine::init();
    let cases: [(&str, Conv2d, [usize; 4], [usize; 4]); 6] = [
        (
            "3x3_16ch_32px",
            conv(1, [1; 4]),
            [BATCH, 16, 32, 32],
            [16, 16, 3, 3],
        ),
        (
            "3x3_core8_32px",
            conv(1, [1; 4]),
            [BATCH, 8, 32, 32],
            [8, 8, 3, 3],
        ),
        (
            "dw3x1_48ch_16px",
            conv(48, [1, 0, 1, 0]),
            [BATCH, 48, 16, 16],
            [48, 1, 3, 1],
        ),
        (
            "dw1x3_48ch_16px",
            conv(48, [0, 1, 0, 1]),
            [BATCH, 48, 16, 16],
            [48, 1, 1, 3],
        ),
        (
            "dw3x3_64ch_8px",
            conv(64, [1; 4]),
            [BATCH, 64, 8, 8],
            [64, 1, 3, 3],
        ),
        (
            "7x7s2_stem_3ch_128px",
            Conv2d {
                strides: [2, 2],
                ..conv(1, [3; 4])
            },
            [BATCH, 3, 128, 128],
            [64, 3, 7, 7],
        ),
    ];
    let mut g = c.benchmark_group("conv");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    for (name, op, xs, ws) in cases {
        let mut next = sawtooth();
        let x = Array4::from_shape_fn(xs, |_| next());
        let w = Array4::from_shape_fn(ws, |_| next());
        let y = op.forward(x.view(), w.view(), None).expect("forward");
        let dy = y.mapv(|a| a * 0.5);
        g.bench_function(format!("{name}/forward"), |b| {
            b.iter(|| {
                elrt::engine::on_pool(|| black_box(op.forward(x.view(), w.view(), None).unwrap()))
            })
        });
        g.bench_function(format!("{name}/backward"), |b| {
            b.iter(|| {
                elrt::engine::on_pool(|| {
                    black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("conv_blocks");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(BATCH as u64));
    for (name, ch, px) in [("3x3_256ch_4px", 256, 4), ("3x3_512ch_2px", 512, 2)] {
        let op = conv(1, [1; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([BATCH, ch, px, px], |_| next());
        let w = Array4::from_shape_fn([ch, ch, 3, 3], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        let one = |a: &Array4<f32>, i: usize| a.slice(ndarray::s![i..i + 1, .., .., ..]).to_owned();
        let xs: Vec<_> = (0..BATCH).map(|i| one(&x, i)).collect();
        let dys: Vec<_> = (0..BATCH).map(|i| one(&dy, i)).collect();
        g.bench_function(format!("{name}/small_plane_forward_backward"), |b| {
            set_small_plane(true);
            set_winograd_cl(Some(false));
            b.iter(|| {
                elrt::engine::on_pool(|| {
                    black_box(op.forward(x.view(), w.view(), None).unwrap());
                    black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                })
            })
        });
        g.bench_function(format!("{name}/blocked_forward_backward"), |b| {
            set_small_plane(false);
            b.iter(|| {
                elrt::engine::on_pool(|| {
                    black_box(op.forward(x.view(), w.view(), None).unwrap());
                    black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                })
            })
        });
        set_small_plane(true);
        g.bench_function(format!("{name}/per_image_forward_backward"), |b| {
            b.iter(|| {
                elrt::engine::on_pool(|| {
                    for (xi, dyi) in xs.iter().zip(&dys) {
                        black_box(op.forward(xi.view(), w.view(), None).unwrap());
                        black_box(op.backward(xi.view(), w.view(), dyi.view(), true).unwrap());
                    }
                })
            })
        });
    }
    // ResNet-18's 1x1 stride-2 shortcuts at 64x64 input: subsample + pointwise against
    // im2col (its small-plane and blocked variants, as the speed rule chose before).
    for (name, ci, px) in [
        ("1x1s2_64to128_16px", 64, 16),
        ("1x1s2_256to512_4px", 256, 4),
    ] {
        let op = Conv2d {
            strides: [2, 2],
            ..conv(1, [0; 4])
        };
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([BATCH, ci, px, px], |_| next());
        let w = Array4::from_shape_fn([2 * ci, ci, 1, 1], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        for (path, on) in [("subsample", true), ("im2col", false)] {
            g.bench_function(format!("{name}/{path}_forward_backward"), |b| {
                set_subsample_pointwise(on);
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.forward(x.view(), w.view(), None).unwrap());
                        black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                    })
                })
            });
        }
        set_subsample_pointwise(true);
    }
    set_winograd_cl(None);
    g.finish();

    // Small-plane layers the channels-last Winograd path takes (`conv/winograd_cl.rs`): the
    // small-plane path's forward and backward against that path's (whose weight gradient is
    // the small-plane path's). (name, batch, channels in, out, side).
    let mut g = c.benchmark_group("winograd_cl");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, n, ci, co, px) in [
        ("3x3_256ch_4px_b64", 64, 256, 256, 4),
        ("3x3_512ch_4px_b64", 64, 512, 512, 4),
        ("3x3_152ch_4px_b64", 64, 152, 152, 4),
        ("3x3_72ch_8px_b64", 64, 72, 72, 8),
        ("3x3_64ch_8px_b128", 128, 64, 64, 8),
        ("3x3_128ch_8px_b64", 64, 128, 128, 8),
        ("3x3_128ch_16px_b64", 64, 128, 128, 16),
    ] {
        let op = conv(1, [1; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([n, ci, px, px], |_| next());
        let w = Array4::from_shape_fn([co, ci, 3, 3], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        g.throughput(Throughput::Elements(n as u64));
        // (path, channels-last Winograd, its weight gradient too)
        for (path, on, dw) in [
            ("without_cl", false, false),
            ("winograd_cl_small_plane_dw", true, false),
            ("winograd_cl", true, true),
        ] {
            // The forward does not depend on where the weight gradient runs.
            if on == dw {
                g.bench_function(format!("{name}/{path}_forward"), |b| {
                    set_winograd_cl(Some(on));
                    b.iter(|| {
                        elrt::engine::on_pool(|| {
                            black_box(op.forward(x.view(), w.view(), None).unwrap())
                        })
                    })
                });
            }
            g.bench_function(format!("{name}/{path}_backward"), |b| {
                set_winograd_cl(Some(on));
                set_winograd_cl_weight_grad(Some(dw));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        elrt::engine::awake::keep_awake(|| {
                            black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                        })
                    })
                })
            });
        }
    }
    set_winograd_cl(None);
    set_winograd_cl_weight_grad(None);
    g.finish();

    // Stride-2 3x3 layers (ResNet-20's at batch 128, ResNet-18's and a Tucker-2 core's at
    // batch 64): the channels-last column blocks (`conv/cols_cl.rs`) against the path the
    // rule took before (im2col, or small-plane on planes under 16x16), forward and backward
    // (with the input gradient) apart. (name, batch, channels in, out, input side).
    let mut g = c.benchmark_group("strided");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for (name, n, ci, co, px) in [
        ("3x3s2_16to32_32px_b128", 128, 16, 32, 32),
        ("3x3s2_32to64_16px_b128", 128, 32, 64, 16),
        ("3x3s2_64to128_32px_b64", 64, 64, 128, 32),
        ("3x3s2_128to256_16px_b64", 64, 128, 256, 16),
        ("3x3s2_72to152_8px_b64", 64, 72, 152, 8),
    ] {
        let op = Conv2d {
            strides: [2, 2],
            ..conv(1, [1; 4])
        };
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([n, ci, px, px], |_| next());
        let w = Array4::from_shape_fn([co, ci, 3, 3], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        g.throughput(Throughput::Elements(n as u64));
        for (path, on) in [("previous", false), ("cols_cl", true)] {
            g.bench_function(format!("{name}/{path}_forward"), |b| {
                set_cols_channels_last(Some(on));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.forward(x.view(), w.view(), None).unwrap())
                    })
                })
            });
            g.bench_function(format!("{name}/{path}_backward"), |b| {
                set_cols_channels_last(Some(on));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        elrt::engine::awake::keep_awake(|| {
                            black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                        })
                    })
                })
            });
        }
    }
    set_cols_channels_last(None);
    g.finish();

    // (name, channels, kernel, stride, input side): pads k/2 on every side, as torchvision's.
    let dw_cases = [
        ("3x3_s2_96ch_32px", 96, 3, 2, 32),
        ("3x3_s1_144ch_16px", 144, 3, 1, 16),
        ("5x5_s2_144ch_16px", 144, 5, 2, 16),
        ("5x5_s1_240ch_8px", 240, 5, 1, 8),
        ("3x3_s1_192ch_8px", 192, 3, 1, 8),
        ("3x3_s1_480ch_4px", 480, 3, 1, 4),
        ("5x5_s1_672ch_4px", 672, 5, 1, 4),
        ("5x5_s2_672ch_4px", 672, 5, 2, 4),
        ("5x5_s1_1152ch_2px", 1152, 5, 1, 2),
    ];
    let mut g = c.benchmark_group("depthwise");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(BATCH as u64));
    for (name, ch, k, s, px) in dw_cases {
        let op = Conv2d {
            group: ch,
            strides: [s, s],
            pads: [k / 2; 4],
            dilations: [1, 1],
        };
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([BATCH, ch, px, px], |_| next());
        let w = Array4::from_shape_fn([ch, 1, k, k], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        // As the engine runs it, then with the channels-last kernels off (the tiled or
        // per-channel kernels the layer had before them).
        for (kernel, cl) in [("auto", true), ("no_channels_last", false)] {
            set_depthwise_channels_last(cl);
            g.bench_function(format!("{name}/{kernel}/forward_backward"), |b| {
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.forward(x.view(), w.view(), None).unwrap());
                        black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                    })
                })
            });
        }
        set_depthwise_channels_last(true);
    }
    g.finish();

    // The self-gated activations (SiLU, HardSwish) fused against their exported pairs.
    let mut g = c.benchmark_group("silu");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(BATCH as u64));
    let mut v = 0.0f32;
    let mut next = move || {
        v = (v + 0.37) % 1.0;
        8.0 * v - 4.0
    };
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[BATCH, 144, 16, 16]), |_| next());
    let dy = x.mapv(|a| a * 0.25);
    g.bench_function("fused_forward_backward", |b| {
        b.iter(|| {
            elrt::engine::on_pool(|| {
                black_box(Activation::Silu.forward(x.view()).unwrap());
                black_box(Activation::Silu.backward(x.view(), dy.view()).unwrap())
            })
        })
    });
    g.bench_function("sigmoid_mul_forward_backward", |b| {
        b.iter(|| {
            elrt::engine::on_pool(|| {
                let s = Activation::Sigmoid.forward(x.view()).unwrap();
                black_box(binary_forward(BinOp::Mul, x.view(), s.view()).unwrap());
                let (mut dx, ds) = binary_backward(BinOp::Mul, x.view(), s.view(), dy.clone());
                dx += &Activation::Sigmoid.backward(x.view(), ds.view()).unwrap();
                black_box(dx)
            })
        })
    });
    // HardSwish as opset-13 exports spell it (MobileNet-V3): the fused step against the pair.
    let hs = Activation::HardSigmoid {
        alpha: 1.0 / 6.0,
        beta: 0.5,
    };
    let hswish = Activation::HardSigmoidMul {
        alpha: 1.0 / 6.0,
        beta: 0.5,
    };
    g.bench_function("hardswish_fused_forward_backward", |b| {
        b.iter(|| {
            elrt::engine::on_pool(|| {
                black_box(hswish.forward(x.view()).unwrap());
                black_box(hswish.backward(x.view(), dy.view()).unwrap())
            })
        })
    });
    g.bench_function("hardsigmoid_mul_forward_backward", |b| {
        b.iter(|| {
            elrt::engine::on_pool(|| {
                let h = hs.forward(x.view()).unwrap();
                black_box(binary_forward(BinOp::Mul, x.view(), h.view()).unwrap());
                let (mut dx, dh) = binary_backward(BinOp::Mul, x.view(), h.view(), dy.clone());
                dx += &hs.backward(x.view(), dh.view()).unwrap();
                black_box(dx)
            })
        })
    });
    g.finish();

    // Winograd F(2x2, 3x3) and F(4x4, 3x3) against im2col (their naive reference is
    // `Conv2d::reference`, checked in the unit tests) on the 3x3 layers of ResNet-18 at 64x64
    // and 128x128 and of ResNet-20, batch 64 as in `elrt speed`: forward, and backward with the
    // input gradient (the weight gradient is the same direct kernel in all, Winograd's own turned
    // off here, so the difference is the input gradient; `weight_grad` below compares those).
    let mut g = c.benchmark_group("winograd");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(WINO_BATCH as u64));
    for (name, ch, px) in [
        ("r18_64ch_16px", 64, 16),
        ("r18_128ch_8px", 128, 8),
        ("r18_256ch_4px", 256, 4),
        ("r20_16ch_32px", 16, 32),
        ("r20_32ch_16px", 32, 16),
        ("r20_64ch_8px", 64, 8),
        ("r18_128_64ch_32px", 64, 32),
    ] {
        let op = conv(1, [1; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([WINO_BATCH, ch, px, px], |_| next());
        let w = Array4::from_shape_fn([ch, ch, 3, 3], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        set_winograd_weight_grad(false);
        for (kernel, mode) in [
            ("im2col", WinogradMode::Never),
            ("winograd", WinogradMode::Always),
            ("winograd4", WinogradMode::Always4),
        ] {
            g.bench_function(format!("{name}/{kernel}/forward"), |b| {
                set_winograd(mode);
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.forward(x.view(), w.view(), None).unwrap())
                    })
                })
            });
            g.bench_function(format!("{name}/{kernel}/backward"), |b| {
                set_winograd(mode);
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                    })
                })
            });
        }
        set_winograd(WinogradMode::Auto);
        set_winograd_weight_grad(true);
    }
    g.finish();

    // Winograd layers on 8x8 planes: their backward (input and weight gradients) on the
    // small-plane path's batch-wide GEMMs against Winograd's input gradient and weight gradient.
    let mut g = c.benchmark_group("winograd_small_plane_backward");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(WINO_BATCH as u64));
    for (name, ch, px, batch) in [
        ("r18_128ch_8px", 128, 8, 64),
        // ResNet-18 at 128x128: its third stage.
        ("r18_256ch_8px", 256, 8, 64),
        ("r20_64ch_8px", 64, 8, 128),
        ("r18_64ch_8px", 64, 8, 64),
        ("r20_32ch_8px", 32, 8, 128),
    ] {
        let op = conv(1, [1; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([batch, ch, px, px], |_| next());
        let w = Array4::from_shape_fn([ch, ch, 3, 3], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        for (kernel, wino) in [("small-plane", false), ("winograd", true)] {
            g.bench_function(format!("{name}/{kernel}"), |b| {
                set_winograd_weight_grad_small_planes(Some(wino));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.backward(x.view(), w.view(), dy.view(), true).unwrap())
                    })
                })
            });
        }
        set_winograd_weight_grad_small_planes(None);
    }
    g.finish();
}

const WINO_BATCH: usize = 64;

/// The weight gradient alone, im2col + GEMM against the direct kernel (`conv/weight_grad.rs`)
/// and, on stride-1 3x3 layers, Winograd's (`conv/winograd_dw.rs`).
fn weight_grad(c: &mut Criterion) {
    elrt::engine::tune_allocator();
    bench_pool();
    elrt::engine::init();
    let mut g = c.benchmark_group("weight_grad");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(WINO_BATCH as u64));
    // name, input channels, output channels, kernel, stride, input side
    for (name, ci, co, k, s, px) in [
        ("r20_16ch_32px", 16, 16, 3, 1, 32),
        ("r20_32ch_16px", 32, 32, 3, 1, 16),
        ("r20_64ch_8px", 64, 64, 3, 1, 8),
        ("r18_64ch_16px", 64, 64, 3, 1, 16),
        ("r18_128ch_8px", 128, 128, 3, 1, 8),
        // ResNet-18 at 128x128: its first two stages.
        ("r18_64ch_32px", 64, 64, 3, 1, 32),
        ("r18_128ch_16px", 128, 128, 3, 1, 16),
        // ResNet-18 at 224x224: its second stage.
        ("r18_128ch_28px", 128, 128, 3, 1, 28),
        // ResNet-18's 7x7 stride-2 stem at 64x64 (the stride-phase layout).
        ("r18_stem_64px", 3, 64, 7, 2, 64),
    ] {
        let mut op = conv(1, [k / 2; 4]);
        op.strides = [s, s];
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([WINO_BATCH, ci, px, px], |_| next());
        let w = Array4::from_shape_fn([co, ci, k, k], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        // Winograd's weight gradient only where the layer is a Winograd one (stride-1 3x3).
        // Winograd's F(2x2) and F(4x4) (`winograd` and `winograd4`) forced, whatever the rule.
        // Layers of at most 128 channels: also the fused path's weight gradient
        // (`conv/winograd_fused.rs`), forced on, and the rule's choice without it (the
        // channels-last Winograd's on 128 channels); the other entries have it off.
        let kernels: &[(&str, bool, bool, Option<bool>)] = if k == 3 && s == 1 && ci.max(co) <= 128
        {
            &[
                ("im2col", false, false, None),
                ("direct", true, false, None),
                ("winograd", true, true, Some(false)),
                ("winograd4", true, true, Some(true)),
                ("rule", true, true, None),
                ("winograd4-fused", true, false, None),
            ]
        } else if k == 3 && s == 1 {
            &[
                ("im2col", false, false, None),
                ("direct", true, false, None),
                ("winograd", true, true, Some(false)),
                ("winograd4", true, true, Some(true)),
            ]
        } else {
            &[
                ("im2col", false, false, None),
                ("direct", true, false, None),
            ]
        };
        for &(kernel, direct, wino, f4) in kernels {
            g.bench_function(format!("{name}/{kernel}"), |b| {
                set_direct_weight_grad(direct);
                set_winograd_weight_grad(wino);
                set_winograd_weight_grad_f4(f4);
                let fused = kernel == "winograd4-fused";
                set_winograd_fused(Some(fused));
                set_winograd_fused_weight_grad(Some(fused));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.backward(x.view(), w.view(), dy.view(), false).unwrap())
                    })
                })
            });
        }
        set_direct_weight_grad(true);
        set_winograd_weight_grad(true);
        set_winograd_weight_grad_f4(None);
        set_winograd_fused(None);
        set_winograd_fused_weight_grad(None);
    }
    g.finish();
}

/// The benches' inputs: a deterministic sawtooth in [-0.5, 0.5), one value per call.
fn sawtooth() -> impl FnMut() -> f32 {
    let mut v = 0.0f32;
    move || {
        v = (v + 0.37) % 1.0;
        v - 0.5
    }
}

fn conv(group: usize, pads: [usize; 4]) -> Conv2d {
    Conv2d {
        group,
        strides: [1, 1],
        pads,
        dilations: [1, 1],
    }
}

/// The forward alone of ResNet-18's 7x7 stride-2 stem, im2col + GEMM against the direct kernel
/// on the stride-phase planes (`conv/direct.rs`).
fn direct_forward(c: &mut Criterion) {
    elrt::engine::tune_allocator();
    bench_pool();
    elrt::engine::init();
    let mut g = c.benchmark_group("direct_forward");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(WINO_BATCH as u64));
    for (name, px) in [("r18_stem_64px", 64), ("r18_stem_128px", 128)] {
        let mut op = conv(1, [3; 4]);
        op.strides = [2, 2];
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([WINO_BATCH, 3, px, px], |_| next());
        let w = Array4::from_shape_fn([64, 3, 7, 7], |_| next());
        for (kernel, direct) in [("im2col", false), ("direct", true)] {
            g.bench_function(format!("{name}/{kernel}"), |b| {
                set_direct_forward(direct);
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.forward(x.view(), w.view(), None).unwrap())
                    })
                })
            });
        }
        set_direct_forward(true);
    }
    // Few-channel stride-1 3x3 layers (`Geom::few_channel_3x3`): ResNet-20's first stage and
    // Tucker-2 cores of rank 8 and 12 there, direct against Winograd F(2x2) (what they ran on
    // before the direct kernel) and against the fused F(4x4) path (`conv/winograd_fused.rs`,
    // forced on whatever its rule says; its products' tile is AVX-512's or, on AVX2 CPUs,
    // AVX2's). Ranks that are not a
    // multiple of the register tile's rows (6 on AVX2, 8 on AVX-512) exercise its remainder
    // tiles. Then wider layers the fused path can take (up to 64 channels): the rule's path
    // (Winograd F(2x2) / F(4x4) plane-wise, the fused path off) against the fused path.
    // Kernels: (label, direct forward allowed, fused path forced on).
    let few: &[(&str, bool, bool)] = &[
        ("winograd", false, false),
        ("direct", true, false),
        ("winograd4-fused", true, true),
    ];
    let wider: &[(&str, bool, bool)] = &[("rule", true, false), ("winograd4-fused", true, true)];
    for (name, ch, px, kernels) in [
        ("3x3_16ch_32px", 16, 32, few),
        ("3x3_16ch_16px", 16, 16, few),
        ("3x3_core8_32px", 8, 32, few),
        ("3x3_core12_32px", 12, 32, few),
        ("3x3_24ch_32px", 24, 32, wider),
        ("3x3_32ch_16px", 32, 16, wider),
        ("3x3_32ch_32px", 32, 32, wider),
        ("3x3_64ch_16px", 64, 16, wider),
        ("3x3_64ch_32px", 64, 32, wider),
        ("3x3_64ch_8px", 64, 8, wider),
        ("3x3_16ch_8px", 16, 8, few),
        ("3x3_32ch_8px", 32, 8, wider),
        ("3x3_32ch_4px", 32, 4, wider),
        ("3x3_64ch_4px", 64, 4, wider),
        // ResNet-18's 128-channel stage at 64x64 and 128x128 inputs, its 256-channel one at
        // 128x128 (past the rule's widest: the fused path forced).
        ("3x3_128ch_8px", 128, 8, wider),
        ("3x3_128ch_16px", 128, 16, wider),
        ("3x3_256ch_8px", 256, 8, wider),
    ] {
        let op = conv(1, [1; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([WINO_BATCH, ch, px, px], |_| next());
        let w = Array4::from_shape_fn([ch, ch, 3, 3], |_| next());
        for &(kernel, direct, fused) in kernels {
            g.bench_function(format!("{name}/{kernel}"), |b| {
                set_direct_forward(direct);
                set_winograd_fused(Some(fused));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        black_box(op.forward(x.view(), w.view(), None).unwrap())
                    })
                })
            });
        }
        set_direct_forward(true);
        set_winograd_fused(None);
    }
    // Pointwise layers the direct path takes (`conv/pointwise.rs`), forward then backward per
    // call: a GEMM per image (or blocked) against the direct path.
    for (name, ci, co, px) in [
        ("1x1_16to8_32px", 16, 8, 32),
        ("1x1_8to16_32px", 8, 16, 32),
        ("1x1_64to32_8px", 64, 32, 8),
        ("1x1_32to64_8px", 32, 64, 8),
        ("1x1_64to40_32px", 64, 40, 32),
        ("1x1_40to64_32px", 40, 64, 32),
        ("1x1_64to40_16px", 64, 40, 16),
        ("1x1_40to64_16px", 40, 64, 16),
        ("1x1_32to16_32px", 32, 16, 32),
        ("1x1_24to32_32px", 24, 32, 32),
        ("1x1_48to24_16px", 48, 24, 16),
        ("1x1_32to64_16px", 32, 64, 16),
        ("1x1_16to96_32px", 16, 96, 32),
        ("1x1_96to24_16px", 96, 24, 16),
        ("1x1_144to24_16px", 144, 24, 16),
        ("1x1_24to144_16px", 24, 144, 16),
        ("1x1_192to32_8px", 192, 32, 8),
        ("1x1_32to192_8px", 32, 192, 8),
        ("1x1_128to72_8px", 128, 72, 8),
        ("1x1_72to128_8px", 72, 128, 8),
        ("1x1_256to128_8px", 256, 128, 8),
        ("1x1_128to256_8px", 128, 256, 8),
    ] {
        let op = conv(1, [0; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([WINO_BATCH, ci, px, px], |_| next());
        let w = Array4::from_shape_fn([co, ci, 1, 1], |_| next());
        let dy = Array4::from_shape_fn([WINO_BATCH, co, px, px], |_| next());
        for (kernel, direct) in [("gemm", false), ("direct", true)] {
            g.bench_function(format!("{name}/{kernel}"), |b| {
                set_direct_pointwise(Some(direct));
                b.iter(|| {
                    elrt::engine::on_pool(|| {
                        let y = op.forward(x.view(), w.view(), None).unwrap();
                        let gr = op.backward(x.view(), w.view(), dy.view(), true).unwrap();
                        black_box((y, gr))
                    })
                })
            });
        }
        set_direct_pointwise(None);
    }
    g.finish();
}

/// A residual block's first conv: its input gradient added inside the conv against a separate
/// accumulation pass after it.
fn backward_adding(c: &mut Criterion) {
    let mut g = c.benchmark_group("backward_adding");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for (name, ch, px, batch) in [
        ("r20_16ch_32px", 16, 32, 128),
        ("r20_64ch_8px", 64, 8, 128),
        ("r18_64ch_16px", 64, 16, 64),
    ] {
        let op = conv(1, [1; 4]);
        let mut next = sawtooth();
        let x = Array4::from_shape_fn([batch, ch, px, px], |_| next());
        let w = Array4::from_shape_fn([ch, ch, 3, 3], |_| next());
        let dy = op.forward(x.view(), w.view(), None).expect("forward");
        let held = Array4::from_shape_fn([batch, ch, px, px], |_| next());
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(format!("{name}/adding"), |b| {
            b.iter_batched(
                || held.clone(),
                |acc| {
                    elrt::engine::on_pool(|| {
                        black_box(
                            op.backward_adding(x.view(), w.view(), dy.view(), acc, false)
                                .unwrap(),
                        )
                    })
                },
                criterion::BatchSize::LargeInput,
            )
        });
        g.bench_function(format!("{name}/then_add"), |b| {
            b.iter_batched(
                || held.clone(),
                |mut acc| {
                    elrt::engine::on_pool(|| {
                        let grads = op
                            .backward_with(x.view(), w.view(), dy.view(), true, false)
                            .unwrap();
                        let dx = grads.dx.expect("input gradient");
                        ndarray::Zip::from(&mut acc)
                            .and(&dx)
                            .par_for_each(|a, &d| *a += d);
                        black_box((acc, grads.dw))
                    })
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    conv_kernels,
    weight_grad,
    direct_forward,
    backward_adding
);
// criterion_main!, with the binary's OpenBLAS kernel check first: on a CPU newer than the
// OpenBLAS build the sgemm-backed kernels would otherwise be timed on its generic SSE3 kernels
// (src/engine/blas_kernels.rs).
fn main() {
    elrt::engine::blas_kernels::reexec_if_generic();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
