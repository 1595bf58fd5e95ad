//! Issue 16 item 1: image folders larger than memory stream, decoded on the fly.
//!
//! Folders of generated JPEGs (larger than the model input, so the ImageNet-style path is
//! taken) train a tiny conv net written here (Conv 3x3 stride 4 -> ReLU -> global average pool
//! -> Gemm, input 3x96x96): the loader's batches stay a pure function of (seed, epoch, batch)
//! whatever the workers or the cache, `--resume` is exact, a folder of small images streams to
//! the very batches of the in-memory path, the crops follow torchvision's rules, a bad file
//! found mid-training is one error naming it, and the process's peak memory stays bounded on a
//! folder whose decoded size is many times the cache.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{fails_cleanly, succeeds};
use elrt::data::{DataOptions, DataSpec, Loader, LoaderConfig, Normalize, Prep, Source, StreamSet};
use elrt::ir::ops::*;
use elrt::ir::{Dim, ElemType, Graph, ModelMeta, Node, Op, Tensor, ValueInfo};
use elrt::rng::Rng;

const INPUT: usize = 96;

/// A photo-like `w x h` image of class `label`: a class-coloured gradient, a few shapes and
/// noise, so that JPEG sizes and decode times are those of real images rather than flat ones.
fn photo(label: usize, index: usize, w: u32, h: u32) -> image::RgbImage {
    let mut rng = Rng::derive(label as u64, &[index as u64]);
    let cx = rng.range(0.2, 0.8) * w as f32;
    let cy = rng.range(0.2, 0.8) * h as f32;
    let r = rng.range(0.1, 0.3) * h as f32;
    let base: [f32; 3] = if label == 0 {
        [200.0, 80.0, 40.0]
    } else {
        [40.0, 90.0, 210.0]
    };
    image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let inside = (fx - cx).powi(2) + (fy - cy).powi(2) < r * r;
        let shade = 0.5 + 0.5 * (fx / w as f32);
        let noise = ((x.wrapping_mul(7919) ^ y.wrapping_mul(104729) ^ index as u32) % 23) as f32;
        image::Rgb(std::array::from_fn(|c| {
            let v = if inside {
                255.0 - base[c]
            } else {
                base[c] * shade
            };
            (v + noise).clamp(0.0, 255.0) as u8
        }))
    })
}

fn write_jpeg(path: &Path, img: &image::RgbImage) {
    let f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    image::codecs::jpeg::JpegEncoder::new_with_quality(f, 85)
        .encode_image(img)
        .unwrap();
}

/// `dir/train/<class>/NNN.jpg` and `dir/test/<class>/NNN.jpg`, two classes, `w x h` images.
fn make_folder(dir: &Path, train: usize, test: usize, w: u32, h: u32) {
    for (label, class) in ["circle_red", "circle_blue"].iter().enumerate() {
        for (split, n, offset) in [("train", train, 0), ("test", test, 10_000)] {
            let d = dir.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                write_jpeg(
                    &d.join(format!("{i:03}.jpg")),
                    &photo(label, offset + i, w, h),
                );
            }
        }
    }
}

fn node(name: &str, op: Op, inputs: &[&str], outputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
    }
}

fn random(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let n = shape.iter().product();
    Tensor::f32(shape, (0..n).map(|_| 0.3 * r.normal()).collect()).unwrap()
}

/// Conv 3->8 (3x3, stride 4) -> ReLU -> GlobalAveragePool -> Flatten -> Gemm 8->2, input
/// `[N, 3, 96, 96]`: cheap enough that the loader, not the step, is what a run exercises.
fn tiny_model(path: &Path) {
    let mut init = BTreeMap::new();
    init.insert("w".to_string(), random(&[8, 3, 3, 3], 1));
    init.insert("fc_w".to_string(), random(&[2, 8], 2));
    init.insert("fc_b".to_string(), random(&[2], 3));
    let io = |name: &str, dims: Vec<Dim>| ValueInfo {
        name: name.into(),
        elem: ElemType::F32,
        shape: Some(dims),
    };
    let n = || Dim::Sym("N".into());
    let g = Graph {
        name: "tiny".into(),
        opset: 13,
        inputs: vec![io(
            "input",
            vec![n(), Dim::Fixed(3), Dim::Fixed(INPUT), Dim::Fixed(INPUT)],
        )],
        outputs: vec![io("logits", vec![n(), Dim::Fixed(2)])],
        nodes: vec![
            node(
                "conv",
                Op::Conv(Conv {
                    kernel_shape: None,
                    strides: vec![4, 4],
                    pads: vec![1; 4],
                    dilations: vec![],
                    group: 1,
                    auto_pad: AutoPad::NotSet,
                }),
                &["input", "w"],
                &["c"],
            ),
            node("relu", Op::Relu, &["c"], &["r"]),
            node("gap", Op::GlobalAveragePool, &["r"], &["p"]),
            node("flat", Op::Flatten { axis: 1 }, &["p"], &["f"]),
            node(
                "fc",
                Op::Gemm(Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                }),
                &["f", "fc_w", "fc_b"],
                &["logits"],
            ),
        ],
        initializers: init,
        meta: ModelMeta::default(),
    };
    elrt::onnx::write_file(&g, path).unwrap();
}

/// A folder of 320x240 JPEGs (40 train + 10 test per class) and the tiny model, made once.
struct Fixture {
    _dir: tempfile::TempDir,
    data: PathBuf,
    model: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("photos");
        make_folder(&data, 40, 10, 320, 240);
        let model = dir.path().join("tiny.onnx");
        tiny_model(&model);
        Fixture {
            _dir: dir,
            data,
            model,
        }
    })
}

fn streamed(data: &Path) -> (Source, Source) {
    let s = DataSpec::Folder(data.into())
        .open([3, INPUT, INPUT], &DataOptions { cache_mb: 0 })
        .unwrap();
    assert!(s.streamed());
    (s.train, s.test)
}

fn stream_set(s: &Source) -> &StreamSet {
    match s {
        Source::Stream(s) => s,
        Source::Memory(_) => panic!("expected a streamed set"),
    }
}

fn batches(loader: &Loader, epoch: u64, start: usize) -> Vec<elrt::data::Batch> {
    let mut e = loader.epoch_from(epoch, start);
    let mut out = Vec::new();
    while let Some(b) = e.next_batch().unwrap() {
        out.push(b);
    }
    out
}

fn train_cfg(workers: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::train(8, 42);
    cfg.workers = workers;
    cfg.drop_last = true;
    cfg
}

#[test]
fn streamed_batches_depend_only_on_seed_epoch_and_batch() {
    let f = fixture();
    let (train, _) = streamed(&f.data);
    assert_eq!(train.len(), 80);
    // The same files again, with a cache that holds them all.
    let s = stream_set(&train);
    let files = (0..s.len()).map(|i| s.file(i).to_path_buf()).collect();
    let cached: Source = StreamSet::new(
        "cached",
        [3, INPUT, INPUT],
        Prep::Crop,
        files,
        s.labels().to_vec(),
        s.class_names().to_vec(),
        1 << 30,
    )
    .unwrap()
    .into();
    let one = Loader::new(train.clone(), train_cfg(0)).unwrap();
    let want = batches(&one, 1, 0);
    assert_eq!(want.len(), 10);
    for workers in [1, 3] {
        let l = Loader::new(train.clone(), train_cfg(workers)).unwrap();
        assert_eq!(batches(&l, 1, 0), want, "{workers} workers");
        // Resuming at batch 4 yields the uninterrupted run's batches from there.
        assert_eq!(batches(&l, 1, 4), want[4..].to_vec());
    }
    let lc = Loader::new(cached.clone(), train_cfg(2)).unwrap();
    assert_eq!(batches(&lc, 1, 0), want, "first pass, filling the cache");
    assert_eq!(batches(&lc, 1, 0), want, "second pass, from the cache");
    let stats = cached.cache_stats().unwrap();
    assert_eq!((stats.images, stats.hits, stats.misses), (80, 80, 80));
    // Another epoch draws other crops; the augmentation changes the images, not the labels.
    let other = batches(&one, 2, 0);
    assert_ne!(other[0].images, want[0].images);
    // Every image is in [-3, 3] after CIFAR normalisation and the batch is full.
    assert!(want[0].images.iter().all(|v| v.abs() < 3.0));
    assert_eq!(want[0].images.shape(), &[8, 3, INPUT, INPUT]);
}

#[test]
fn small_images_stream_to_the_in_memory_batches() {
    // Images that fit in the 32x32 input (32x32, 20x24, 32x16): the streamed path resizes them
    // and augments them as the in-memory path does, so the batches are identical.
    let tmp = tempfile::tempdir().unwrap();
    for (label, class) in ["a", "b"].iter().enumerate() {
        let d = tmp.path().join(class);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..12 {
            let (w, h) = [(32, 32), (20, 24), (32, 16)][i % 3];
            let img = photo(label, i, w, h);
            if i % 2 == 0 {
                img.save(d.join(format!("{i:02}.png"))).unwrap();
            } else {
                write_jpeg(&d.join(format!("{i:02}.jpg")), &img);
            }
        }
    }
    let spec = DataSpec::Folder(tmp.path().into());
    let memory = spec.load([3, 32, 32]).unwrap();
    let stream = spec
        .open([3, 32, 32], &DataOptions { cache_mb: 0 })
        .unwrap();
    assert!(stream.streamed());
    for (mem, st) in [
        (memory.train.clone(), stream.train.clone()),
        (memory.test.clone(), stream.test.clone()),
    ] {
        assert_eq!(mem.labels(), st.labels());
        for cfg in [train_cfg(2), LoaderConfig::eval(5)] {
            let a = Loader::new(mem.clone(), cfg.clone()).unwrap();
            let b = Loader::new(st.clone(), cfg).unwrap();
            for e in 0..2 {
                assert_eq!(batches(&a, e, 0), batches(&b, e, 0), "epoch {e}");
            }
        }
    }
}

/// A 400x300 image whose red channel is the column (0..=255 across) and green the row.
fn ramp_image(dir: &Path) -> PathBuf {
    let img = image::RgbImage::from_fn(400, 300, |x, y| {
        image::Rgb([(x * 255 / 399) as u8, (y * 255 / 299) as u8, 128])
    });
    let p = dir.join("ramp.png");
    img.save(&p).unwrap();
    p
}

fn ramp_set(dir: &Path) -> Source {
    let p = ramp_image(dir);
    StreamSet::new(
        "ramp",
        [3, 32, 32],
        Prep::Crop,
        vec![p],
        vec![0],
        vec!["x".into()],
        0,
    )
    .unwrap()
    .into()
}

/// Raw pixels (0..=255) of one image of a batch normalised with mean 0, std 1.
fn raw(b: &elrt::data::Batch, c: usize) -> Vec<f32> {
    b.images
        .slice(ndarray::s![0, c, .., ..])
        .iter()
        .map(|v| v * 255.0)
        .collect()
}

#[test]
fn eval_crops_as_resize_then_centre_crop() {
    let tmp = tempfile::tempdir().unwrap();
    let set = ramp_set(tmp.path());
    let mut cfg = LoaderConfig::eval(1);
    cfg.normalize = Some(Normalize::identity(3));
    let b = Loader::new(set, cfg).unwrap().batch(0, 0);
    // torchvision: Resize(37) (the shorter side 300 -> 37, so 400 -> 49), CenterCrop(32),
    // computed here with the image crate on the whole image.
    let img = image::open(tmp.path().join("ramp.png")).unwrap().to_rgb8();
    let small = image::imageops::resize(&img, 49, 37, image::imageops::FilterType::Triangle);
    let crop = image::imageops::crop_imm(&small, (49 - 32) / 2, (37 - 32) / 2, 32, 32).to_image();
    for c in 0..2 {
        let got = raw(&b, c);
        let want: Vec<f32> = crop.pixels().map(|p| p[c] as f32).collect();
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Cutting the window first, then resizing, differs only by where the filter meets the
        // window's edge and by rounding: a few levels on this ramp.
        assert!(worst <= 6.0, "channel {c}: max difference {worst}");
    }
}

#[test]
fn training_crops_are_random_resized_and_flipped() {
    let tmp = tempfile::tempdir().unwrap();
    let set = ramp_set(tmp.path());
    let mut cfg = LoaderConfig::train(1, 7);
    cfg.normalize = Some(Normalize::identity(3));
    cfg.workers = 0;
    let l = Loader::new(set, cfg).unwrap();
    let (mut flips, mut spans) = (0, Vec::new());
    for e in 0..200 {
        let b = l.batch(e, 0);
        let red = raw(&b, 0);
        let row: Vec<f32> = red[16 * 32..17 * 32].to_vec();
        // The red ramp runs left to right unless flipped.
        if row[31] < row[0] {
            flips += 1;
        }
        // The crop's width in source columns: red spans (w_crop / 400) of 255.
        spans.push((row[31] - row[0]).abs() / 255.0);
        // The crop shows a window of the image, resized: never the padding black.
        assert!(raw(&b, 2).iter().all(|&v| (v - 128.0).abs() < 1.5));
    }
    assert!((70..130).contains(&flips), "{flips} flips of 200");
    // Width fractions: area 8%..100% and ratio 3/4..4/3 give widths from about
    // sqrt(0.08 * 0.75) * 300/400 * ... up to the whole image.
    let min = spans.iter().cloned().fold(1.0, f32::min);
    let max = spans.iter().cloned().fold(0.0, f32::max);
    assert!(min < 0.3 && max > 0.8, "crop widths {min}..{max}");
}

#[test]
fn a_file_that_fails_mid_epoch_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    make_folder(tmp.path(), 6, 2, 120, 100);
    let (train, _) = streamed(tmp.path());
    let s = stream_set(&train);
    let gone = s.file(3).to_path_buf();
    let bad = s.file(9).to_path_buf();
    std::fs::remove_file(&gone).unwrap();
    std::fs::write(&bad, b"this is not a JPEG").unwrap();
    for workers in [0, 2] {
        let l = Loader::new(train.clone(), train_cfg(workers)).unwrap();
        let mut e = l.epoch(0);
        let err = loop {
            match e.next_batch() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the epoch ended without an error"),
                Err(err) => break format!("{err:#}"),
            }
        };
        assert!(
            err.contains(&gone.display().to_string()) || err.contains(&bad.display().to_string()),
            "{err}"
        );
        assert!(
            err.contains("cannot read") || err.contains("corrupt or unsupported image"),
            "{err}"
        );
        assert!(e.next_batch().unwrap().is_none(), "nothing after an error");
    }
}

#[test]
fn a_corrupt_file_found_while_training_stops_the_run_with_one_error() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d");
    make_folder(&data, 20, 4, 160, 120);
    let bad = data.join("train/circle_blue/007.jpg");
    std::fs::write(&bad, b"\xff\xd8\xff garbage that no decoder accepts").unwrap();
    let out = tmp.path().join("out.onnx");
    let last = fails_cleanly(&[
        "train".to_string(),
        f.model.display().to_string(),
        format!("--data=folder:{}", data.display()),
        "--cache-mb=0".into(),
        "--epochs=2".into(),
        "--batch=8".into(),
        "-o".into(),
        out.display().to_string(),
    ]);
    assert!(last.contains(&bad.display().to_string()), "{last}");
    assert!(last.contains("corrupt or unsupported image"), "{last}");
    assert!(!out.exists(), "no output after a failed run");
}

fn train_json(model: &Path, data: &str, out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = vec![
        "train".into(),
        model.display().to_string(),
        format!("--data={data}"),
        "--epochs=2".into(),
        "--batch=16".into(),
        "--threads=1".into(),
        "--quiet".into(),
        "--json".into(),
        "-o".into(),
        out.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let o = succeeds(&args);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn weights(p: &Path) -> Vec<(String, Vec<u8>)> {
    let g = elrt::onnx::read_file(p).unwrap();
    g.initializers
        .iter()
        .map(|(k, t)| (k.clone(), format!("{t:?}").into_bytes()))
        .collect()
}

#[test]
fn streamed_training_resumes_exactly_and_eval_sees_its_crops() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = format!("folder:{}", f.data.display());
    let full = tmp.path().join("full.onnx");
    let v = train_json(&f.model, &data, &full, &["--cache-mb=1"]);
    assert_eq!(v["data_loading"]["streamed"], true, "{v}");
    // 100 images of 3x96x96 take 2.6 MiB: more than --cache-mb 1, which the caches share.
    let peak = v["data_loading"]["train_cache"]["peak_bytes"]
        .as_u64()
        .unwrap()
        + v["data_loading"]["test_cache"]["peak_bytes"]
            .as_u64()
            .unwrap();
    assert!(peak > 0 && peak <= 1 << 20, "{v}");
    // Stopped after 7 steps (mid second epoch: 5 per epoch), then resumed to the end.
    let part = tmp.path().join("part.onnx");
    train_json(&f.model, &data, &part, &["--cache-mb=1", "--max-steps=7"]);
    train_json(
        &f.model,
        &data,
        &part,
        &["--cache-mb=1", "--resume", "--allow-recipe-change"],
    );
    assert_eq!(weights(&full), weights(&part), "resumed weights differ");
    // Resuming the streamed run in memory would change its augmentation: refused.
    let e = fails_cleanly(&[
        "train",
        &f.model.display().to_string(),
        &format!("--data={data}"),
        "--epochs=2",
        "--batch=16",
        "--resume",
        "-o",
        &part.display().to_string(),
    ]);
    assert!(e.contains("data_streamed"), "{e}");
    // `elrt eval` prepares the test split as training did (the recorded centre-crop rule), so
    // it reproduces the last epoch's test loss; the in-memory resize would not.
    let last = &v["last"];
    let o = succeeds([
        "eval",
        &full.display().to_string(),
        &format!("--data={data}"),
        "--json",
    ]);
    let ev: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (a, b) = (
        ev["loss"].as_f64().unwrap(),
        last["test_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() < 1e-5 * b.abs().max(1.0),
        "eval {a} vs train {b}: {ev}"
    );
}

/// Peak resident memory of `elrt train` on a folder whose decoded images take about 150 MB,
/// with a 4 MB cache, against the same run on the synthetic set (same model, image count and
/// batch, all in memory): streaming may add the cache, the batches in flight and the decode
/// buffers of two workers (which the binary's allocator, mimalloc, keeps for reuse a while
/// after they are freed: 48-56 MiB added in all, under 40 with glibc's malloc), not the folder.
/// A cache that ignored its budget, or a loader that kept decoded images, would add up to the
/// folder's 150 MB: the bound is half of that.
#[test]
fn streamed_folder_peak_memory_stays_bounded() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("big");
    // 2 x (72 + 8) images of 640x480: 921,600 bytes each decoded, 147 MB in all.
    make_folder(&data, 72, 8, 640, 480);
    let decoded_mb = 160.0 * 640.0 * 480.0 * 3.0 / (1u64 << 20) as f64;
    let cache_mb = 4.0;
    assert!(decoded_mb > 30.0 * cache_mb);
    let s = train_json(
        &f.model,
        &format!("folder:{}", data.display()),
        &tmp.path().join("s.onnx"),
        &["--cache-mb=4"],
    );
    let loading = &s["data_loading"];
    assert_eq!(loading["streamed"], true, "{s}");
    let m = train_json(
        &f.model,
        "synthetic:144,16",
        &tmp.path().join("m.onnx"),
        &[],
    );
    let (streamed, memory) = (
        loading["peak_rss_mib"].as_f64().unwrap(),
        m["data_loading"]["peak_rss_mib"].as_f64().unwrap(),
    );
    eprintln!(
        "peak RSS: streamed {streamed:.1} MiB (folder {decoded_mb:.0} MiB decoded, cache {cache_mb} MiB), synthetic in memory {memory:.1} MiB"
    );
    assert!(
        streamed - memory < decoded_mb / 2.0,
        "streaming added {:.1} MiB to the peak (the folder decodes to {decoded_mb:.0} MiB)",
        streamed - memory
    );
    // The cache's own accounting stays within its budget (shared by the two splits).
    let cache_peak = loading["train_cache"]["peak_bytes"].as_u64().unwrap()
        + loading["test_cache"]["peak_bytes"].as_u64().unwrap();
    assert!(cache_peak > 0 && cache_peak <= 4 << 20, "{s}");
}
