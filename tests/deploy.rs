//! Issue 18: the deployed file says how to feed it, and the README's two programs run it.
//!
//! A tiny 3-class PNG folder made here (images already at ResNet-20's 32x32, so nothing is
//! resized; one class name with a space) trains ResNet-20 in Tucker-2 form for 21 steps with
//! ImageNet normalisation (the classifier becomes 3 outputs; enough that the test images get
//! their own classes with probabilities well below 1, about 2 s), and `elrt export --forms
//! factorized` writes compact.onnx. Then the compiled example (examples/deploy_tract.rs, tract)
//! and scripts/deploy_onnxruntime.py (onnxruntime) classify each test image, taking everything
//! they need from the file's metadata. The outside judge is elrt's engine on the trained model,
//! fed by elrt's own folder reader and normaliser: both programs must print its top-1 class and
//! its probabilities (softmax of the logits) within 1e-4.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use common::{repo, succeeds};
use elrt::data::{DataSpec, Loader, LoaderConfig, NormSpec};
use elrt::engine::exec::Mode;
use elrt::engine::model::Model;

/// Class folders in sorted (label) order; "red fox" checks that names with spaces survive.
const CLASSES: [&str; 3] = ["bird", "red fox", "truck"];
const TRAIN_PER_CLASS: usize = 40;
const TEST_PER_CLASS: usize = 3;
const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

struct Fixture {
    data: PathBuf,
    trained: PathBuf,
    /// Exported with the defaults: ResNet-20's file has a symbolic batch, so
    /// `elrt.export.input_shape` is N,3,32,32.
    compact: PathBuf,
    /// Exported with `--batch 1` (1,3,32,32).
    compact_b1: PathBuf,
    /// The test images, in the folder reader's order (label, then file name), with labels.
    test_images: Vec<(PathBuf, usize)>,
}

/// A 32x32 RGB image of class `label`: a class-specific pattern (colour gradient, stripes or
/// checks) plus per-image noise, so that the classes are learnable and every image differs.
fn image_of(label: usize, index: usize) -> image::RgbImage {
    let mut state = (label as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ (index as u64 + 1).wrapping_mul(0xbf58_476d);
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 64) as i32 - 32
    };
    image::RgbImage::from_fn(32, 32, |x, y| {
        let (x, y) = (x as i32, y as i32);
        let base = match label {
            0 => [200 - 4 * x, 60 + 3 * y, 40],
            1 => [60, if (x / 4) % 2 == 0 { 210 } else { 50 }, 90],
            _ => [
                40,
                70,
                if ((x / 8) + (y / 8)) % 2 == 0 {
                    230
                } else {
                    60
                },
            ],
        };
        image::Rgb(base.map(|v| (v + noise()).clamp(0, 255) as u8))
    })
}

/// `DIR/train/<class>/NN.png` and `DIR/test/<class>/NN.png`; returns the test images.
fn make_folder(dir: &Path) -> Vec<(PathBuf, usize)> {
    let mut test = Vec::new();
    for (label, class) in CLASSES.iter().enumerate() {
        for (split, n) in [("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)] {
            let cdir = dir.join(split).join(class);
            std::fs::create_dir_all(&cdir).unwrap();
            for i in 0..n {
                let path = cdir.join(format!("{i:02}.png"));
                let index = if split == "test" { 1000 + i } else { i };
                image_of(label, index).save(&path).unwrap();
                if split == "test" {
                    test.push((path, label));
                }
            }
        }
    }
    test
}

/// Converts, trains and exports once for all tests of this file (under cargo's per-test-target
/// temporary folder, remade on every run).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let data = dir.join("images");
        let test_images = make_folder(&data);
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let factorized = dir.join("factorized.onnx");
        let trained = dir.join("trained.onnx");
        let compact = dir.join("compact.onnx");
        let compact_b1 = dir.join("compact_b1.onnx");
        succeeds([
            "convert",
            &s(&repo().join("models/resnet20.onnx")),
            "--format",
            "tucker2",
            "--ranks",
            "params=0.5",
            "-o",
            &s(&factorized),
        ]);
        succeeds([
            "train",
            &s(&factorized),
            "--data",
            &format!("folder:{}", s(&data)),
            "--epochs",
            "3",
            "--batch",
            "16",
            "--lr",
            "0.005",
            "--normalize",
            "imagenet",
            "--quiet",
            "-o",
            &s(&trained),
        ]);
        for (out, extra) in [(&compact, &[][..]), (&compact_b1, &["--batch", "1"][..])] {
            let mut args = vec![
                "export".to_string(),
                s(&trained),
                "-o".into(),
                s(out),
                "--forms".into(),
                "factorized".into(),
                "--quiet".into(),
            ];
            args.extend(extra.iter().map(|a| a.to_string()));
            succeeds(args);
        }
        Fixture {
            data,
            trained,
            compact,
            compact_b1,
            test_images,
        }
    })
}

fn meta(file: &Path) -> std::collections::HashMap<String, String> {
    elrt::onnx::read_file(file)
        .unwrap()
        .meta
        .metadata_props
        .into_iter()
        .collect()
}

fn floats(s: &str) -> Vec<f32> {
    s.split(',').map(|v| v.trim().parse().unwrap()).collect()
}

#[test]
fn compact_file_states_how_to_feed_it() {
    let f = fixture();
    let graph = elrt::onnx::read_file(&f.compact).unwrap();
    let input = graph.inputs[0].name.clone();
    for (file, shape) in [(&f.compact, "N,3,32,32"), (&f.compact_b1, "1,3,32,32")] {
        let m = meta(file);
        let get = |k: &str| {
            m.get(k)
                .unwrap_or_else(|| panic!("{}: no metadata {k}: {m:?}", file.display()))
                .as_str()
        };
        let classes: Vec<String> = serde_json::from_str(get("elrt.classes")).unwrap();
        assert_eq!(classes, CLASSES);
        assert_eq!(
            get("elrt.input.resize"),
            "decode as RGB, bilinear resize to 32x32 (height x width; aspect ratio not kept)"
        );
        assert_eq!(get("elrt.input.layout"), "NCHW");
        assert_eq!(get("elrt.input.name"), input);
        assert_eq!(get("elrt.output"), "logits");
        assert_eq!(get("elrt.export.input_shape"), shape);
        assert_eq!(get("elrt.normalize"), "imagenet");
        assert_eq!(floats(get("elrt.normalize.mean")), IMAGENET_MEAN);
        assert_eq!(floats(get("elrt.normalize.std")), IMAGENET_STD);
    }
}

/// The top-k lines `PROBABILITY  NAME` both programs print.
fn parse_top(out: &std::process::Output, what: &str) -> Vec<(String, f64)> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            let (p, name) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("{what}: bad line '{l}'"));
            (name.to_string(), p.trim().parse().unwrap())
        })
        .collect()
}

/// The engine's class probabilities for every test image of the folder `data`, in the folder
/// reader's order: the trained model run by elrt's engine on images decoded, resized and
/// normalised by elrt's data pipeline. `labels` are the test images' classes, in that order.
fn engine_probabilities(f: &Fixture, data: &Path, labels: &[usize]) -> Vec<Vec<f64>> {
    let splits = DataSpec::Folder(data.to_path_buf())
        .load([3, 32, 32])
        .unwrap();
    assert_eq!(splits.test.labels(), labels);
    let n = labels.len();
    let mut cfg = LoaderConfig::eval(n);
    cfg.normalize = Some(NormSpec::Imagenet.resolve(3).unwrap());
    let loader = Loader::new(Arc::new(splits.test), cfg).unwrap();
    let batch = loader.epoch(0).next().unwrap();
    assert_eq!(batch.indices, (0..n).collect::<Vec<_>>());
    let mut engine = Model::load(&f.trained, n).unwrap();
    let logits = engine.forward(batch.images.into_dyn(), Mode::Eval).unwrap();
    logits
        .outer_iter()
        .map(|row| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.iter().map(|v| v / sum).collect()
        })
        .collect()
}

/// `got` (one program's lines) against the engine's probabilities: every class once, in
/// decreasing probability, each within 1e-4 of the engine's, the first the engine's top-1.
fn assert_matches_engine(got: &[(String, f64)], engine: &[f64], what: &str) {
    assert_eq!(got.len(), CLASSES.len(), "{what}: {got:?}");
    let top1 = (0..engine.len())
        .max_by(|&a, &b| engine[a].total_cmp(&engine[b]))
        .unwrap();
    assert_eq!(got[0].0, CLASSES[top1], "{what}: top-1, engine {engine:?}");
    for w in got.windows(2) {
        assert!(w[0].1 >= w[1].1, "{what}: not in decreasing order: {got:?}");
    }
    for (name, p) in got {
        let k = CLASSES
            .iter()
            .position(|c| c == name)
            .unwrap_or_else(|| panic!("{what}: unknown class '{name}'"));
        assert!(
            (p - engine[k]).abs() <= 1e-4,
            "{what}: P({name}) = {p}, engine {} ({got:?})",
            engine[k]
        );
    }
}

#[test]
fn tract_example_and_python_script_print_the_engines_classes() {
    let f = fixture();
    let labels: Vec<usize> = f.test_images.iter().map(|(_, l)| *l).collect();
    let engine = engine_probabilities(f, &f.data, &labels);
    let example = common::example_binary("deploy_tract");
    let python = common::require_python(&["onnxruntime", "numpy", "PIL"]);
    let script = repo().join("scripts/deploy_onnxruntime.py");
    let mut top1_classes = std::collections::BTreeSet::new();
    for (k, (image, _)) in f.test_images.iter().enumerate() {
        let what = |who: &str, model: &Path| {
            format!(
                "{who} {} {}",
                model.file_name().unwrap().to_string_lossy(),
                image.display()
            )
        };
        // Every image through the default file (symbolic batch); the first of each class also
        // through the batch-1 one.
        let mut models = vec![&f.compact];
        if k % TEST_PER_CLASS == 0 {
            models.push(&f.compact_b1);
        }
        for model in models {
            let out = Command::new(&example)
                .arg(model)
                .arg(image)
                .output()
                .unwrap();
            let rust = parse_top(&out, &what("deploy_tract", model));
            assert_matches_engine(&rust, &engine[k], &what("deploy_tract", model));
            top1_classes.insert(rust[0].0.clone());
            if python {
                let out = Command::new("python3")
                    .arg(&script)
                    .arg(model)
                    .arg(image)
                    .output()
                    .unwrap();
                let py = parse_top(&out, &what("deploy_onnxruntime.py", model));
                assert_matches_engine(&py, &engine[k], &what("deploy_onnxruntime.py", model));
                assert_eq!(py[0].0, rust[0].0, "{}", what("both", model));
            }
        }
    }
    eprintln!("top-1 classes printed: {top1_classes:?}");
}

/// An image of another size goes through the example's bilinear resize, which must be elrt's
/// (the `image` crate's Triangle filter), so the example prints the engine's probabilities for
/// it too; PIL's bilinear filter rounds differently, so the Python script is held to the same
/// top-1 and probabilities within 1e-2.
#[test]
fn an_image_of_another_size_is_resized_as_training_did() {
    let f = fixture();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-resize");
    let _ = std::fs::remove_dir_all(&dir);
    // 70 wide, 45 tall: shrunk in both directions by non-integer factors, aspect ratio changed.
    let small = image_of(1, 2000);
    let big = image::imageops::resize(&small, 70, 45, image::imageops::FilterType::Nearest);
    let mut paths = Vec::new();
    for split in ["train", "test"] {
        let cdir = dir.join(split).join(CLASSES[1]);
        std::fs::create_dir_all(&cdir).unwrap();
        paths.push(cdir.join("big.png"));
        big.save(paths.last().unwrap()).unwrap();
    }
    // Label 0: the folder's only class (labels play no part in the probabilities).
    let engine = engine_probabilities(f, &dir, &[0]);
    let out = Command::new(common::example_binary("deploy_tract"))
        .arg(&f.compact)
        .arg(&paths[1])
        .output()
        .unwrap();
    let rust = parse_top(&out, "deploy_tract, 70x45 image");
    assert_matches_engine(&rust, &engine[0], "deploy_tract, 70x45 image");
    if common::require_python(&["onnxruntime", "numpy", "PIL"]) {
        let out = Command::new("python3")
            .arg(repo().join("scripts/deploy_onnxruntime.py"))
            .arg(&f.compact)
            .arg(&paths[1])
            .output()
            .unwrap();
        let py = parse_top(&out, "deploy_onnxruntime.py, 70x45 image");
        assert_eq!(py[0].0, rust[0].0);
        for (name, p) in &py {
            let r = rust.iter().find(|(n, _)| n == name).unwrap().1;
            eprintln!("70x45 image: P({name}) tract {r}, onnxruntime with PIL's resize {p}");
            assert!((p - r).abs() <= 1e-2, "P({name}): {p} against {r}");
        }
    }
}

/// A model that ends in a Softmax over the classes keeps it in the exported file, which then
/// says `elrt.output` = `probabilities`; both programs print those probabilities (not a softmax
/// of them): the engine's, as for the file without the Softmax.
#[test]
fn a_file_that_outputs_probabilities_says_so() {
    use elrt::ir::ops::SoftmaxAxes;
    use elrt::ir::{Node, Op};
    let f = fixture();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-softmax");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = elrt::onnx::read_file(&f.trained).unwrap();
    let logits = g.outputs[0].name.clone();
    g.nodes.push(Node {
        name: "head/softmax".into(),
        op: Op::Softmax {
            axis: 1,
            axes: SoftmaxAxes::One,
        },
        inputs: vec![logits],
        outputs: vec!["probabilities".into()],
    });
    g.outputs[0].name = "probabilities".into();
    let (with_softmax, compact) = (dir.join("softmax.onnx"), dir.join("compact.onnx"));
    elrt::onnx::write_file(&g, &with_softmax).unwrap();
    succeeds([
        "export",
        with_softmax.to_str().unwrap(),
        "-o",
        compact.to_str().unwrap(),
        "--forms",
        "factorized",
        "--quiet",
    ]);
    assert_eq!(meta(&compact)["elrt.output"], "probabilities");
    let labels: Vec<usize> = f.test_images.iter().map(|(_, l)| *l).collect();
    let engine = engine_probabilities(f, &f.data, &labels);
    let python = common::require_python(&["onnxruntime", "numpy", "PIL"]);
    // The first test image of each class.
    for k in (0..labels.len()).step_by(TEST_PER_CLASS) {
        let image = &f.test_images[k].0;
        let out = Command::new(common::example_binary("deploy_tract"))
            .arg(&compact)
            .arg(image)
            .output()
            .unwrap();
        let what = format!("deploy_tract, Softmax head, {}", image.display());
        assert_matches_engine(&parse_top(&out, &what), &engine[k], &what);
        if python {
            let out = Command::new("python3")
                .arg(repo().join("scripts/deploy_onnxruntime.py"))
                .arg(&compact)
                .arg(image)
                .output()
                .unwrap();
            let what = format!("deploy_onnxruntime.py, Softmax head, {}", image.display());
            assert_matches_engine(&parse_top(&out, &what), &engine[k], &what);
        }
    }
}
