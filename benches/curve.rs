//! What drawing the training curve costs, the figure the training loop re-draws after every
//! epoch (`src/report/curve`): the render into pixels, the render with PNG encoding, and the
//! whole write (with the atomic rename and fsync), for a 30- and a 200-epoch history.
//!
//!     cargo bench --bench curve [-- FILTER]
//!
//! The module header compares the result with an epoch of the smallest real run (it decides
//! whether the curve may be drawn every epoch).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use elrt::report::curve::{render, render_png, write_png, CurvePoint};

/// A typical run: losses falling, accuracies rising, two warm-up epochs then a cosine rate.
fn typical(n: usize) -> Vec<CurvePoint> {
    (1..=n)
        .map(|e| {
            let t = e as f64 / n as f64;
            CurvePoint {
                epoch: e as f64,
                train_loss: 2.3 * (-3.0 * t).exp() + 0.05,
                test_loss: Some(2.3 * (-2.5 * t).exp() + 0.3),
                train_acc: 1.0 - 0.9 * (-4.0 * t).exp(),
                test_acc: Some(0.88 - 0.78 * (-3.5 * t).exp()),
                lr: if e <= 2 {
                    0.05 * e as f64
                } else {
                    0.05 * (1.0 + (std::f64::consts::PI * t).cos())
                },
            }
        })
        .collect()
}

fn curve(c: &mut Criterion) {
    let title = "resnet20.onnx: tucker2, ranks params=0.4 (from resnet20.onnx)\n\
                 30 epochs, batch 128 | SGD Nesterov lr 0.1 cosine, wd 0.0005 | DSO rho 0.01";
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("trained.curve.png");
    let mut g = c.benchmark_group("curve");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    for epochs in [30, 200] {
        let pts = typical(epochs);
        g.bench_function(format!("render_{epochs}_epochs"), |b| {
            b.iter(|| black_box(render(title, &pts)))
        });
        g.bench_function(format!("render_png_{epochs}_epochs"), |b| {
            b.iter(|| black_box(render_png(title, &pts).expect("encode")))
        });
        g.bench_function(format!("write_png_{epochs}_epochs"), |b| {
            b.iter(|| write_png(&path, title, &pts).expect("write"))
        });
    }
    g.finish();
}

criterion_group!(benches, curve);
criterion_main!(benches);
