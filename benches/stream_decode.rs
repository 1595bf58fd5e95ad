//! What a streamed image folder costs per image on one core (`src/data/stream.rs`): JPEG decode
//! plus the training path (random resized crop, resize, flip, normalise) or the evaluation path
//! (centre crop, resize, normalise), to 64, 128 and 224 px, with no cache (every image decoded).
//!
//!     cargo bench --bench stream_decode [-- FILTER]
//!
//! The source images are ImageNet-sized: 500x375 JPEGs (quality 90, the `image` crate's
//! encoder), made by upscaling CIFAR-10 test images from `../shared/data/cifar10-jpeg` (or
//! `$ELRT_SHARED_DATA/cifar10-jpeg`; generated gradients when absent). Criterion reports
//! elements/s: images per second on the one bench thread, i.e. per loader worker. The results,
//! with the CPU, are in docs/streaming.md.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use elrt::data::{Augment, Normalize, Prep, StreamSet};
use elrt::rng::Rng;

const SOURCES: usize = 48;

fn cifar_jpegs() -> Vec<PathBuf> {
    let root = std::env::var("ELRT_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data"));
    let dir = root.join("cifar10-jpeg/test");
    let mut out = Vec::new();
    for class in ["airplane", "cat", "ship", "truck"] {
        for i in 0..SOURCES / 4 {
            let p = dir.join(class).join(format!("{i:04}.jpg"));
            if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

/// `SOURCES` 500x375 JPEGs in `dir`.
fn make_sources(dir: &Path) -> Vec<PathBuf> {
    let cifar = cifar_jpegs();
    (0..SOURCES)
        .map(|i| {
            let img = match cifar.get(i) {
                Some(p) => {
                    let small = image::open(p).expect("cifar jpeg").to_rgb8();
                    image::imageops::resize(
                        &small,
                        500,
                        375,
                        image::imageops::FilterType::CatmullRom,
                    )
                }
                None => image::RgbImage::from_fn(500, 375, |x, y| {
                    image::Rgb([
                        (x / 2) as u8,
                        (y / 2) as u8,
                        ((x + y + i as u32) % 256) as u8,
                    ])
                }),
            };
            let path = dir.join(format!("{i:03}.jpg"));
            let f = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
            image::codecs::jpeg::JpegEncoder::new_with_quality(f, 90)
                .encode_image(&img)
                .expect("encode");
            path
        })
        .collect()
}

fn stream_decode(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let files = make_sources(dir.path());
    let table = Normalize::cifar().table();
    let aug = Augment::default();
    let mut g = c.benchmark_group("stream_decode");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Elements(1));
    for px in [64usize, 128, 224] {
        let set = StreamSet::new(
            "bench",
            [3, px, px],
            Prep::Crop,
            files.clone(),
            vec![0; files.len()],
            vec!["x".into()],
            0,
        )
        .expect("set");
        let mut out = vec![0f32; 3 * px * px];
        let mut i = 0usize;
        g.bench_function(format!("train_jpeg500x375_to_{px}"), |b| {
            b.iter(|| {
                let mut rng = Rng::derive(0, &[i as u64]);
                set.write(i % SOURCES, Some((&aug, &mut rng)), &table, &mut out)
                    .expect("decode");
                i += 1;
                black_box(&out);
            })
        });
        g.bench_function(format!("eval_jpeg500x375_to_{px}"), |b| {
            b.iter(|| {
                // eval_image caches nothing here (budget 0): every call decodes.
                set.write(i % SOURCES, None, &table, &mut out)
                    .expect("decode");
                i += 1;
                black_box(&out);
            })
        });
    }
    // The decode alone, for scale: the share of the work that is the JPEG decoder.
    let mut i = 0usize;
    g.bench_function("decode_only_jpeg500x375", |b| {
        b.iter(|| {
            let img = image::open(&files[i % SOURCES]).expect("decode").to_rgb8();
            i += 1;
            black_box(img);
        })
    });
    g.finish();
}

criterion_group!(benches, stream_decode);
criterion_main!(benches);
