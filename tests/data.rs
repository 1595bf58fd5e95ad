//! Data sets and the batch loader: readers on small files written here, the real data under
//! `../shared/data` (or `$ELRT_SHARED_DATA`) when present (skipped with a message otherwise, a
//! failure under ELRT_REQUIRE_SHARED_DATA=1, as in CI), the synthetic set's
//! determinism and learnability, and the loader's determinism, resume and modes.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::shared_data;

use elrt::data::{
    folder, synthetic, DataSpec, Dataset, Loader, LoaderConfig, Normalize, SyntheticConfig,
};
use ndarray::{Array1, Array2, Axis};

// ---------------------------------------------------------------------------------------------
// Helpers

fn fake_px(r: usize, c: usize, y: usize, x: usize) -> u8 {
    ((r * 7 + c * 50 + y * 3 + x) % 256) as u8
}

/// One fake CIFAR record: label byte(s), then the R, G, B planes, row-major.
fn fake_record(r: usize, labels: &[u8]) -> Vec<u8> {
    let mut rec = labels.to_vec();
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                rec.push(fake_px(r, c, y, x));
            }
        }
    }
    rec
}

/// Writes a fake CIFAR-10 folder: batch sizes 3..7 and 5 test records; returns the record
/// counts. Record `r` (counted over all training files) has label `r % 10`.
fn write_cifar10(dir: &Path, names: bool) {
    let mut r = 0;
    for (i, n) in (3..8).enumerate() {
        let mut bytes = Vec::new();
        for _ in 0..n {
            bytes.extend(fake_record(r, &[(r % 10) as u8]));
            r += 1;
        }
        std::fs::write(dir.join(format!("data_batch_{}.bin", i + 1)), bytes).unwrap();
    }
    let mut bytes = Vec::new();
    for t in 0..5 {
        bytes.extend(fake_record(1000 + t, &[(9 - t) as u8]));
    }
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    if names {
        let text = (0..10).map(|k| format!("name{k}\n")).collect::<String>();
        std::fs::write(dir.join("batches.meta.txt"), text + "\n").unwrap();
    }
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

// ---------------------------------------------------------------------------------------------
// CIFAR

#[test]
fn cifar10_fake_files_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), true);
    let s = DataSpec::parse(&format!("cifar10:{}", tmp.path().display()))
        .unwrap()
        .load([3, 32, 32])
        .unwrap();
    assert_eq!(s.train.len(), 3 + 4 + 5 + 6 + 7);
    assert_eq!(s.test.len(), 5);
    assert_eq!(s.train.shape(), [3, 32, 32]);
    assert_eq!(s.train.classes(), 10);
    assert_eq!(s.train.class_names()[3], "name3");
    for r in 0..s.train.len() {
        assert_eq!(s.train.label(r), r % 10);
        let img = s.train.image(r);
        // CHW with R first: the file's planes map to channels 0, 1, 2 unchanged.
        for (c, y, x) in [(0, 0, 0), (0, 5, 31), (1, 17, 2), (2, 31, 31)] {
            assert_eq!(
                img[c * 1024 + y * 32 + x],
                fake_px(r, c, y, x),
                "r{r} c{c} y{y} x{x}"
            );
        }
    }
    let want: Vec<usize> = (0..5).map(|t| 9 - t).collect();
    assert_eq!(s.test.labels(), &want[..]);
    assert_eq!(s.test.image(2)[2048 + 64 + 1], fake_px(1002, 2, 2, 1));

    // Without batches.meta.txt the standard names are used; a parent folder with the archive's
    // folder inside also works.
    let tmp2 = tempfile::tempdir().unwrap();
    let nested = tmp2.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&nested).unwrap();
    write_cifar10(&nested, false);
    let s2 = DataSpec::Cifar10(tmp2.path().into())
        .load([3, 32, 32])
        .unwrap();
    assert_eq!(s2.train.class_names()[0], "airplane");
    assert_eq!(s2.train.pixels(), s.train.pixels());
}

#[test]
fn cifar_resized_and_gray() {
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), true);
    let spec = DataSpec::Cifar10(tmp.path().into());
    let s = spec.load([3, 48, 40]).unwrap();
    assert_eq!(s.train.shape(), [3, 48, 40]);
    assert_eq!(s.train.len(), 25);
    assert_eq!(
        s.train.labels(),
        spec.load([3, 32, 32]).unwrap().train.labels()
    );
    let g = spec.load([1, 16, 16]).unwrap();
    assert_eq!(g.test.shape(), [1, 16, 16]);
    let e = err_of(spec.load([4, 32, 32]));
    assert!(e.contains("4-channel"), "{e}");
}

#[test]
fn cifar100_uses_fine_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let mut train = Vec::new();
    for r in 0..12 {
        // coarse label r % 20, fine label 99 - r * 8
        train.extend(fake_record(r, &[(r % 20) as u8, (99 - r * 8) as u8]));
    }
    std::fs::write(tmp.path().join("train.bin"), train).unwrap();
    std::fs::write(tmp.path().join("test.bin"), fake_record(0, &[3, 42])).unwrap();
    let s = DataSpec::parse(&format!("cifar100:{}", tmp.path().display()))
        .unwrap()
        .load([3, 32, 32])
        .unwrap();
    assert_eq!(s.train.classes(), 100);
    assert_eq!(s.train.class_names()[99], "worm");
    let want: Vec<usize> = (0..12).map(|r| 99 - r * 8).collect();
    assert_eq!(s.train.labels(), &want[..]);
    assert_eq!(s.test.labels(), &[42]);
    assert_eq!(s.train.image(5)[1024 + 32 + 7], fake_px(5, 1, 1, 7));
}

#[test]
fn cifar_errors_name_the_file() {
    // Missing files: every missing one is named, with what the folder must hold.
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), false);
    std::fs::remove_file(tmp.path().join("data_batch_3.bin")).unwrap();
    std::fs::remove_file(tmp.path().join("test_batch.bin")).unwrap();
    let e = err_of(DataSpec::Cifar10(tmp.path().into()).load([3, 32, 32]));
    assert!(
        e.contains("missing data_batch_3.bin, test_batch.bin") && e.contains("data_batch_1.bin"),
        "{e}"
    );
    assert!(!e.contains('\n'), "one line: {e}");

    let e = err_of(DataSpec::Cifar10("/no/such/dir".into()).load([3, 32, 32]));
    assert!(e.contains("/no/such/dir: no such folder"), "{e}");

    // Wrong record size: the record size and the remainder are named.
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), false);
    let bad = tmp.path().join("data_batch_2.bin");
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes.extend([1, 2, 3]);
    std::fs::write(&bad, bytes).unwrap();
    let e = err_of(DataSpec::Cifar10(tmp.path().into()).load([3, 32, 32]));
    assert!(
        e.contains("data_batch_2.bin")
            && e.contains("3073-byte")
            && e.contains("3 bytes left over"),
        "{e}"
    );

    // CIFAR-100 files read as CIFAR-10 fail the same way (3074-byte records).
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), false);
    let e = err_of(DataSpec::Cifar100(tmp.path().into()).load([3, 32, 32]));
    assert!(e.contains("missing train.bin, test.bin"), "{e}");

    // Label out of range: file and record index.
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), false);
    let bad = tmp.path().join("test_batch.bin");
    let mut bytes = std::fs::read(&bad).unwrap();
    bytes[3 * 3073] = 10;
    std::fs::write(&bad, bytes).unwrap();
    let e = err_of(DataSpec::Cifar10(tmp.path().into()).load([3, 32, 32]));
    assert!(
        e.contains("test_batch.bin") && e.contains("record 3 has label 10"),
        "{e}"
    );

    // Empty file.
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), false);
    std::fs::write(tmp.path().join("data_batch_5.bin"), b"").unwrap();
    let e = err_of(DataSpec::Cifar10(tmp.path().into()).load([3, 32, 32]));
    assert!(e.contains("data_batch_5.bin: empty file"), "{e}");

    // A names file with the wrong number of lines.
    let tmp = tempfile::tempdir().unwrap();
    write_cifar10(tmp.path(), false);
    std::fs::write(tmp.path().join("batches.meta.txt"), "a\nb\n").unwrap();
    let e = err_of(DataSpec::Cifar10(tmp.path().into()).load([3, 32, 32]));
    assert!(e.contains("batches.meta.txt: lists 2 class names"), "{e}");
}

#[test]
fn cifar10_real_data() {
    let Some(dir) = shared_data("cifar-10-batches-bin") else {
        return;
    };
    let t = std::time::Instant::now();
    let s = DataSpec::Cifar10(dir).load([3, 32, 32]).unwrap();
    eprintln!("measured: CIFAR-10 read in {:.2?}", t.elapsed());
    assert_eq!(s.train.len(), 50_000);
    assert_eq!(s.test.len(), 10_000);
    assert_eq!(s.train.classes(), 10);
    assert_eq!(s.train.class_names()[0], "airplane");
    assert_eq!(s.train.class_names()[9], "truck");
    assert_eq!(s.train.class_counts(), vec![5000; 10]);
    assert_eq!(s.test.class_counts(), vec![1000; 10]);
    let m = s.train.channel_means();
    eprintln!("CIFAR-10 train channel means {m:.4?}");
    for (got, want) in m.iter().zip([0.491, 0.482, 0.447]) {
        assert!((got - want).abs() < 0.01, "{m:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Image folders

/// A PNG of size `w x h` whose pixel (x, y) is (r, g, b) + (x, y, x + y).
fn write_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            rgb[0].wrapping_add(x as u8),
            rgb[1].wrapping_add(y as u8),
            rgb[2].wrapping_add((x + y) as u8),
        ])
    });
    img.save(path).unwrap();
}

fn write_jpeg(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb(rgb));
    img.save(path).unwrap();
}

#[test]
fn folder_train_test_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // Classes deliberately created out of order; labels follow sorted names.
    for (split, n) in [("train", 3), ("test", 2)] {
        for (class, rgb) in [("zebra", [200, 10, 30]), ("ant", [20, 100, 250])] {
            let d = root.join(split).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..n {
                write_png(&d.join(format!("{i}.png")), 8, 8, rgb);
            }
            write_jpeg(&d.join("x.JPG"), 12, 10, rgb);
            std::fs::write(d.join("notes.txt"), "ignored").unwrap();
        }
    }
    let s = DataSpec::parse(&format!("folder:{}", root.display()))
        .unwrap()
        .load([3, 8, 8])
        .unwrap();
    assert_eq!(
        s.train.class_names(),
        &["ant".to_string(), "zebra".to_string()]
    );
    assert_eq!(s.train.len(), 8);
    assert_eq!(s.test.len(), 6);
    assert_eq!(s.train.labels(), &[0, 0, 0, 0, 1, 1, 1, 1]);
    // PNGs at the model's size round-trip exactly, R, G, B in channel order.
    let img = s.train.image(4);
    for (y, x) in [(0, 0), (3, 5), (7, 7)] {
        assert_eq!(img[y * 8 + x], 200 + x as u8);
        assert_eq!(img[64 + y * 8 + x], 10 + y as u8);
        assert_eq!(img[128 + y * 8 + x], 30 + (x + y) as u8);
    }
    // The JPEG (resized 12x10 -> 8x8) keeps its flat colour within JPEG error.
    let jpg = s.train.image(3); // ant: 0.png 1.png 2.png x.JPG
    for (c, want) in [20i32, 100, 250].into_iter().enumerate() {
        let mean = jpg[c * 64..(c + 1) * 64]
            .iter()
            .map(|&v| v as i32)
            .sum::<i32>()
            / 64;
        assert!((mean - want).abs() <= 4, "channel {c}: {mean} vs {want}");
    }
    // Resized and gray versions.
    let g = DataSpec::Folder(root.into()).load([1, 16, 12]).unwrap();
    assert_eq!(g.test.shape(), [1, 16, 12]);
    assert_eq!(g.test.len(), 6);
}

#[test]
fn folder_single_pool_split() {
    let tmp = tempfile::tempdir().unwrap();
    let mut want_test = 0;
    for class in ["a", "b", "c"] {
        let d = tmp.path().join(class);
        std::fs::create_dir(&d).unwrap();
        for i in 0..20 {
            let name = format!("{i:03}.png");
            write_png(&d.join(&name), 5, 4, [i as u8, 0, 0]);
            want_test += folder::is_test_file(class, &name) as usize;
        }
    }
    let s = DataSpec::Folder(tmp.path().into()).load([3, 4, 5]).unwrap();
    assert_eq!(s.train.classes(), 3);
    assert_eq!(s.test.len(), want_test);
    assert_eq!(s.train.len() + s.test.len(), 60);
    assert!(want_test > 0 && want_test < 30, "{want_test}");
}

#[test]
fn folder_errors() {
    // Corrupt image: named.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("cls");
    std::fs::create_dir(&d).unwrap();
    write_png(&d.join("good.png"), 4, 4, [1, 2, 3]);
    std::fs::write(d.join("bad.jpg"), b"\xff\xd8\xff\xe0 this is not a jpeg").unwrap();
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("bad.jpg") && e.contains("corrupt"), "{e}");
    assert!(!e.contains('\n'), "one line: {e:?}");
    // A truncated PNG too.
    let bytes = std::fs::read(d.join("good.png")).unwrap();
    std::fs::write(d.join("bad.jpg"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("bad.jpg") && !e.contains('\n'), "{e:?}");

    // Empty class folder.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("empty")).unwrap();
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("empty") && e.contains("no .jpg"), "{e}");

    // No class sub-folders (an empty folder, or loose files).
    let tmp = tempfile::tempdir().unwrap();
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("no class sub-folders"), "{e}");
    write_png(&tmp.path().join("loose.png"), 4, 4, [0, 0, 0]);
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("no class sub-folders"), "{e}");

    // train/ without test/.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("train/cls");
    std::fs::create_dir_all(&d).unwrap();
    write_png(&d.join("a.png"), 4, 4, [0, 0, 0]);
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("has train/ but no test/"), "{e}");

    // A test class that train lacks.
    let d = tmp.path().join("test/other");
    std::fs::create_dir_all(&d).unwrap();
    write_png(&d.join("a.png"), 4, 4, [0, 0, 0]);
    let e = err_of(DataSpec::Folder(tmp.path().into()).load([3, 4, 4]));
    assert!(e.contains("'other' has no counterpart"), "{e}");

    let e = err_of(DataSpec::Folder("/no/such/dir".into()).load([3, 4, 4]));
    assert!(e.contains("no such folder"), "{e}");
}

#[test]
fn folder_real_jpegs_match_cifar_binary() {
    let Some(dir) = shared_data("cifar10-jpeg/test") else {
        return;
    };
    let t = std::time::Instant::now();
    let s = DataSpec::Folder(dir).load([3, 32, 32]).unwrap();
    let n = s.train.len() + s.test.len();
    eprintln!(
        "measured: decoded {n} JPEGs in {:.2?} ({} train / {} test by the hash split)",
        t.elapsed(),
        s.train.len(),
        s.test.len()
    );
    assert_eq!(n, 10_000);
    assert_eq!(s.train.classes(), 10);
    assert_eq!(s.train.class_names()[1], "automobile");
    let m = s.train.channel_means();
    for (got, want) in m.iter().zip([0.491, 0.482, 0.447]) {
        assert!((got - want).abs() < 0.03, "{m:?}");
    }
    // The binary test batch was made from these JPEGs (record i = class i / 1000, file
    // i % 1000): decoding must agree up to decoder rounding, which also pins the channel order.
    let Some(bin) = shared_data("cifar-10-batches-bin") else {
        return;
    };
    let cif = DataSpec::Cifar10(bin).load([3, 32, 32]).unwrap().test;
    let pool = s.train.len() + s.test.len();
    assert_eq!(pool, cif.len());
    let mut checked = 0;
    for (set, split_is_test) in [(&s.train, false), (&s.test, true)] {
        // Walk the split in file order to recover each image's file index.
        let mut pos = 0;
        for class in 0..10 {
            let name = &s.train.class_names()[class];
            for f in 0..1000 {
                let file = format!("{f:04}.jpg");
                if folder::is_test_file(name, &file) != split_is_test {
                    continue;
                }
                if f % 97 == 0 {
                    let a = set.image(pos);
                    let b = cif.image(class * 1000 + f);
                    let diff: f64 = a
                        .iter()
                        .zip(b)
                        .map(|(&x, &y)| (x as f64 - y as f64).abs())
                        .sum::<f64>()
                        / a.len() as f64;
                    assert!(diff < 2.0, "{name}/{file}: mean abs diff {diff}");
                    assert_eq!(set.label(pos), class);
                    checked += 1;
                }
                pos += 1;
            }
        }
        assert_eq!(pos, set.len());
    }
    assert!(checked > 50, "{checked}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic

#[test]
fn synthetic_deterministic_and_balanced() {
    let t = std::time::Instant::now();
    let a = DataSpec::parse("synthetic")
        .unwrap()
        .load([3, 32, 32])
        .unwrap();
    eprintln!(
        "measured: synthetic 5,000 + 1,000 images of 3x32x32 in {:.2?}",
        t.elapsed()
    );
    let b = DataSpec::parse("synthetic")
        .unwrap()
        .load([3, 32, 32])
        .unwrap();
    assert_eq!(a.train, b.train);
    assert_eq!(a.test, b.test);
    assert_eq!(a.train.len(), 5000);
    assert_eq!(a.test.len(), 1000);
    assert_eq!(a.train.class_counts(), vec![500; 10]);
    assert_eq!(a.test.class_counts(), vec![100; 10]);
    assert_ne!(a.train.image(0), a.test.image(0));
    let other = synthetic::generate(
        &SyntheticConfig {
            seed: 1,
            ..SyntheticConfig::default()
        },
        [3, 32, 32],
    )
    .unwrap();
    assert_ne!(other.train.image(0), a.train.image(0));
    // Pixels use the whole range, centred roughly like photos.
    let m = a.train.channel_means();
    assert!(m.iter().all(|v| (0.4..0.6).contains(v)), "{m:?}");
    let small = DataSpec::parse("synthetic:30,20")
        .unwrap()
        .load([1, 20, 24])
        .unwrap();
    assert_eq!((small.train.len(), small.test.len()), (30, 20));
    assert_eq!(small.train.shape(), [1, 20, 24]);
}

/// Raw pixels as standardised features (train statistics).
fn raw_features(train: &Dataset, test: &Dataset) -> (Array2<f32>, Array2<f32>) {
    let f = |d: &Dataset| {
        Array2::from_shape_vec(
            (d.len(), d.image_size()),
            d.pixels().iter().map(|&v| v as f32 / 255.0).collect(),
        )
        .unwrap()
    };
    let (mut a, mut b) = (f(train), f(test));
    let mean = a.mean_axis(Axis(0)).unwrap();
    let std = a.std_axis(Axis(0), 0.0).mapv(|s| s.max(1e-3));
    for x in [&mut a, &mut b] {
        *x -= &mean;
        *x /= &std;
    }
    (a, b)
}

/// A global histogram of gradient orientations (12 bins over 180 degrees, magnitude-weighted,
/// normalised): translation-invariant, nonlinear, no learning.
fn orientation_features(d: &Dataset) -> Array2<f32> {
    let [c, h, w] = d.shape();
    let bins = 12;
    let mut out = Array2::<f32>::zeros((d.len(), bins));
    for i in 0..d.len() {
        let img = d.image(i);
        let g = |y: usize, x: usize| -> f32 {
            (0..c)
                .map(|ch| img[ch * h * w + y * w + x] as f32)
                .sum::<f32>()
                / c as f32
        };
        let mut row = out.row_mut(i);
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                let gx = g(y, x + 1) - g(y, x - 1);
                let gy = g(y + 1, x) - g(y - 1, x);
                let mag = (gx * gx + gy * gy).sqrt();
                let ang = gy.atan2(gx).rem_euclid(std::f32::consts::PI);
                let b = ((ang / std::f32::consts::PI * bins as f32) as usize).min(bins - 1);
                row[b] += mag;
            }
        }
        let s = row.sum().max(1e-6);
        row /= s;
    }
    out
}

fn nearest_class_mean(xtr: &Array2<f32>, ytr: &[usize], xte: &Array2<f32>, yte: &[usize]) -> f64 {
    let k = ytr.iter().max().unwrap() + 1;
    let mut means = Array2::<f32>::zeros((k, xtr.ncols()));
    let mut counts = vec![0f32; k];
    for (row, &y) in xtr.rows().into_iter().zip(ytr) {
        let mut m = means.row_mut(y);
        m += &row;
        counts[y] += 1.0;
    }
    for (mut m, n) in means.rows_mut().into_iter().zip(&counts) {
        m /= *n;
    }
    let hits = xte
        .rows()
        .into_iter()
        .zip(yte)
        .filter(|(x, &y)| {
            let d: Vec<f32> = means
                .rows()
                .into_iter()
                .map(|m| (&m - x).mapv(|v| v * v).sum())
                .collect();
            let best = (0..k).min_by(|&a, &b| d[a].total_cmp(&d[b])).unwrap();
            best == y
        })
        .count();
    hits as f64 / yte.len() as f64
}

/// Multinomial logistic regression by minibatch SGD; returns (train, test) accuracy.
fn logistic(
    xtr: &Array2<f32>,
    ytr: &[usize],
    xte: &Array2<f32>,
    yte: &[usize],
    epochs: usize,
) -> (f64, f64) {
    let k = 10;
    let d = xtr.ncols();
    let mut w = Array2::<f32>::zeros((d, k));
    let mut b = Array1::<f32>::zeros(k);
    let lr = 0.01;
    let batch = 100;
    let mut rng = elrt::rng::Rng::new(0);
    let mut order: Vec<usize> = (0..xtr.nrows()).collect();
    for _ in 0..epochs {
        rng.shuffle(&mut order);
        for chunk in order.chunks(batch) {
            let x = xtr.select(Axis(0), chunk);
            let mut p = x.dot(&w) + &b;
            for (mut row, &i) in p.rows_mut().into_iter().zip(chunk) {
                let m = row.fold(f32::MIN, |a, &v| a.max(v));
                row.mapv_inplace(|v| (v - m).exp());
                let s = row.sum();
                row /= s;
                row[ytr[i]] -= 1.0;
            }
            p /= chunk.len() as f32;
            w = w * (1.0 - lr * 1e-3) - x.t().dot(&p) * lr;
            b = b - p.sum_axis(Axis(0)) * lr;
        }
    }
    let acc = |x: &Array2<f32>, y: &[usize]| {
        let s = x.dot(&w) + &b;
        s.rows()
            .into_iter()
            .zip(y)
            .filter(|(r, &l)| (0..k).max_by(|&a, &c| r[a].total_cmp(&r[c])).unwrap() == l)
            .count() as f64
            / y.len() as f64
    };
    (acc(xtr, ytr), acc(xte, yte))
}

/// The synthetic set must defeat linear models on raw pixels (class-mean images are almost
/// flat because position, colour and phase are random) while carrying signal that
/// translation-invariant nonlinear features pick up. A small CNN's accuracy is measured
/// outside the tests (see the data module's report); here only the cheap baselines run.
#[test]
fn synthetic_linear_baselines_stay_low() {
    let s = DataSpec::parse("synthetic")
        .unwrap()
        .load([3, 32, 32])
        .unwrap();
    let (xtr, xte) = raw_features(&s.train, &s.test);
    let (ytr, yte) = (s.train.labels(), s.test.labels());
    let ncm = nearest_class_mean(&xtr, ytr, &xte, yte);
    let (lr_train, lr_test) = logistic(&xtr, ytr, &xte, yte, 10);
    let (otr, ote) = (
        orientation_features(&s.train),
        orientation_features(&s.test),
    );
    let ori = nearest_class_mean(&otr, ytr, &ote, yte);
    eprintln!(
        "synthetic baselines (test accuracy, chance 0.10): raw-pixel nearest class mean {ncm:.3}, \
         raw-pixel logistic regression {lr_test:.3} (train {lr_train:.3}), \
         gradient-orientation histogram nearest class mean {ori:.3}"
    );
    assert!(
        ncm < 0.25,
        "nearest class mean on raw pixels too good: {ncm}"
    );
    assert!(
        lr_test < 0.3,
        "logistic regression on raw pixels too good: {lr_test}"
    );
    assert!(ori > 0.25, "no invariant signal: {ori}");
}

// ---------------------------------------------------------------------------------------------
// Loader

fn synthetic_set(n: usize) -> Arc<Dataset> {
    Arc::new(synthetic::generate_split(3, 0, n, [3, 12, 12]))
}

fn train_cfg(workers: usize) -> LoaderConfig {
    let mut cfg = LoaderConfig::train(16, 42);
    cfg.workers = workers;
    cfg
}

#[test]
fn loader_same_batches_for_any_worker_count() {
    let d = synthetic_set(150);
    let runs: Vec<Vec<elrt::data::Batch>> = [0, 1, 2, 5]
        .into_iter()
        .map(|w| {
            let l = Loader::new(d.clone(), train_cfg(w)).unwrap();
            (0..2).flat_map(|e| l.epoch(e)).collect()
        })
        .collect();
    assert_eq!(runs[0].len(), 2 * 10);
    for r in &runs[1..] {
        assert_eq!(r, &runs[0]);
    }
    // Each epoch visits every image once, in a different order per epoch, labels attached.
    let l = Loader::new(d.clone(), train_cfg(2)).unwrap();
    let mut seen: Vec<usize> = l.epoch(0).flat_map(|b| b.indices).collect();
    let order0 = seen.clone();
    seen.sort();
    assert_eq!(seen, (0..150).collect::<Vec<_>>());
    assert_ne!(order0, l.order(1));
    assert_eq!(order0, l.order(0));
    for b in l.epoch(1) {
        let want: Vec<usize> = b.indices.iter().map(|&i| d.label(i)).collect();
        assert_eq!(b.labels, want);
    }
    // Another seed, another order.
    let mut cfg = train_cfg(2);
    cfg.seed = 43;
    assert_ne!(Loader::new(d, cfg).unwrap().order(0), order0);
}

/// Data-parallel shards: rank r of N gets rows [r*B/N, (r+1)*B/N) of every whole batch, with
/// the same pixels (augmentation included) and labels, and the N shards together are the batch.
#[test]
fn loader_shards_are_the_rows_of_the_whole_batch() {
    let d = synthetic_set(150);
    let whole: Vec<_> = Loader::new(d.clone(), train_cfg(2))
        .unwrap()
        .epoch(3)
        .collect();
    for ranks in [2usize, 3, 4] {
        let shards: Vec<Vec<elrt::data::Batch>> = (0..ranks)
            .map(|r| {
                let mut cfg = train_cfg(1);
                cfg.shard = Some((r, ranks));
                Loader::new(d.clone(), cfg).unwrap().epoch(3).collect()
            })
            .collect();
        for (i, w) in whole.iter().enumerate() {
            let mut rows = 0;
            for (r, s) in shards.iter().enumerate() {
                let b = &s[i];
                let k = b.labels.len();
                let want = r * w.labels.len() / ranks;
                assert_eq!(want, rows, "rank {r} of {ranks}, batch {i}");
                assert_eq!(b.indices[..], w.indices[rows..rows + k]);
                assert_eq!(b.labels[..], w.labels[rows..rows + k]);
                assert_eq!(
                    b.images,
                    w.images.slice(ndarray::s![rows..rows + k, .., .., ..])
                );
                rows += k;
            }
            assert_eq!(rows, w.labels.len());
        }
    }
    let mut cfg = train_cfg(0);
    cfg.shard = Some((2, 2));
    assert!(Loader::new(d, cfg).is_err());
}

#[test]
fn loader_resume_mid_epoch_gives_the_same_batches() {
    let d = synthetic_set(100);
    let l = Loader::new(d.clone(), train_cfg(3)).unwrap();
    let full: Vec<_> = l.epoch(4).collect();
    for start in [0, 1, 3, 6, 7] {
        let resumed = Loader::new(d.clone(), train_cfg(2)).unwrap();
        let tail: Vec<_> = resumed.epoch_from(4, start).collect();
        assert_eq!(&tail[..], &full[start.min(full.len())..], "start {start}");
        if start < full.len() {
            assert_eq!(resumed.batch(4, start), full[start]);
        }
    }
    // Interrupted after a few batches (dropped mid-epoch), then resumed.
    let mut it = l.epoch(4);
    let head: Vec<_> = it.by_ref().take(2).collect();
    assert_eq!(it.position(), 2);
    drop(it);
    let rest: Vec<_> = l.epoch_from(4, 2).collect();
    let joined: Vec<_> = head.into_iter().chain(rest).collect();
    assert_eq!(joined, full);
}

#[test]
fn loader_augmentation_shapes_and_values() {
    let d = synthetic_set(40);
    let l = Loader::new(d.clone(), train_cfg(2)).unwrap();
    let batches: Vec<_> = l.epoch(0).collect();
    let sizes: Vec<usize> = batches.iter().map(|b| b.images.shape()[0]).collect();
    assert_eq!(sizes, vec![16, 16, 8]);
    for b in &batches {
        assert_eq!(&b.images.shape()[1..], &[3, 12, 12]);
        assert_eq!(b.labels.len(), b.images.shape()[0]);
        assert!(b.images.iter().all(|v| v.is_finite()));
    }
    // Augmented images differ from the plain ones for most examples (crop and flip), yet
    // every value is a normalised pixel or the normalised black padding.
    let plain = Loader::new(d.clone(), LoaderConfig::eval(40))
        .unwrap()
        .batch(0, 0);
    let mut changed = 0;
    for b in &batches {
        for (j, &i) in b.indices.iter().enumerate() {
            if b.images.index_axis(Axis(0), j) != plain.images.index_axis(Axis(0), i) {
                changed += 1;
            }
        }
    }
    assert!(changed > 30, "{changed} of 40 changed");
    let mut cfg = train_cfg(1);
    cfg.drop_last = true;
    let l = Loader::new(d, cfg).unwrap();
    assert_eq!(l.batches_per_epoch(), 2);
    assert!(l.epoch(0).all(|b| b.labels.len() == 16));
}

#[test]
fn loader_eval_mode_is_fixed_order_without_augmentation() {
    let d = synthetic_set(37);
    let l = Loader::new(d.clone(), LoaderConfig::eval(10)).unwrap();
    let a: Vec<_> = l.epoch(0).collect();
    let b: Vec<_> = l.epoch(7).collect();
    assert_eq!(a.len(), 4);
    let idx: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, (0..37).collect::<Vec<_>>());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.images, y.images);
        assert_eq!(x.labels, y.labels);
    }
    // Values are exactly the normalised pixels.
    let norm = Normalize::cifar();
    let img = d.image(13);
    let got = a[1].images.index_axis(Axis(0), 3);
    for (k, (&v, &raw)) in got.iter().zip(img).enumerate() {
        let c = k / 144;
        let want = (raw as f32 / 255.0 - norm.mean()[c]) / norm.std()[c];
        assert!((v - want).abs() < 1e-6);
    }
    assert_eq!(a[3].labels.len(), 7);
}

/// One training epoch of the loader over real CIFAR-10 gives every image exactly once, with its
/// label, 5,000 of each class, in full batches but the last (the time is printed, not checked).
#[test]
fn loader_epoch_on_real_cifar_covers_every_image() {
    let Some(dir) = shared_data("cifar-10-batches-bin") else {
        return;
    };
    let s = DataSpec::Cifar10(dir).load([3, 32, 32]).unwrap();
    let train = Arc::new(s.train);
    let mut cfg = LoaderConfig::train(128, 1);
    cfg.workers = 2;
    let l = Loader::new(train.clone(), cfg).unwrap();
    let t = std::time::Instant::now();
    let (mut n, mut per_class, mut short, mut seen) = (0, [0usize; 10], 0, Vec::new());
    for b in l.epoch(0) {
        assert_eq!(b.images.shape()[1..], [3, 32, 32]);
        assert_eq!(b.images.shape()[0], b.labels.len());
        short += usize::from(b.labels.len() != 128);
        for (&y, &i) in b.labels.iter().zip(&b.indices) {
            assert_eq!(y, train.label(i), "image {i}");
            per_class[y] += 1;
        }
        seen.extend_from_slice(&b.indices);
        n += b.labels.len();
    }
    let dt = t.elapsed();
    eprintln!(
        "measured: loader (2 workers, augment + normalise, batch 128) {n} images in {dt:.2?}, {:.0} img/s",
        n as f64 / dt.as_secs_f64()
    );
    assert_eq!(n, 50_000);
    seen.sort_unstable();
    assert!(
        seen.iter().copied().eq(0..50_000),
        "an image missing or repeated"
    );
    assert_eq!(per_class, [5000; 10]);
    assert!(short <= 1, "{short} short batches");
}

/// A data set relabelled by a model's class names: labels follow the names, a class the model
/// lacks is an error naming it.
#[test]
fn relabelled_by_the_models_class_names() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let d = elrt::data::Dataset::new(
        "folder test",
        [1, 1, 1],
        vec![0, 1, 2],
        vec![0, 1, 1],
        names(&["bird", "truck"]),
    )
    .unwrap();
    let r = d
        .clone()
        .relabelled(&names(&["bird", "red fox", "truck"]))
        .unwrap();
    assert_eq!(r.labels(), &[0, 2, 2]);
    assert_eq!(
        r.class_names(),
        names(&["bird", "red fox", "truck"]).as_slice()
    );
    let err = format!("{:#}", d.relabelled(&names(&["bird", "cat"])).unwrap_err());
    assert!(err.contains("'truck'"), "{err}");
}
