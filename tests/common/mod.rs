//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `python3` can import the given modules.
pub fn python_has(modules: &[&str]) -> bool {
    let code = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    Command::new("python3")
        .args(["-c", &code])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Interop checks need onnx and onnxruntime from pip. They skip with a message when those are
/// missing, unless ELRT_REQUIRE_PYTHON=1 (set by CI), where a missing module is a failure.
pub fn require_python(modules: &[&str]) -> bool {
    if python_has(modules) {
        return true;
    }
    if std::env::var("ELRT_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("python modules {modules:?} are required (ELRT_REQUIRE_PYTHON=1) but missing");
    }
    eprintln!("skipping: python3 with {modules:?} is not installed (pip install -r scripts/requirements-ci.txt)");
    false
}

/// A folder of the shared data (CIFAR-10 and its JPEG copy): `$ELRT_SHARED_DATA/sub`, else
/// `<repo>/../shared/data/sub`. Missing, it skips with a message, unless
/// ELRT_REQUIRE_SHARED_DATA=1 (set by CI), where it is a failure.
pub fn shared_data(sub: &str) -> Option<PathBuf> {
    let root = std::env::var("ELRT_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("../shared/data"));
    let p = root.join(sub);
    if p.is_dir() {
        return Some(p);
    }
    if std::env::var("ELRT_REQUIRE_SHARED_DATA").as_deref() == Ok("1") {
        panic!(
            "{} is required (ELRT_REQUIRE_SHARED_DATA=1) but missing",
            p.display()
        );
    }
    eprintln!(
        "skipping: {} not present (ELRT_SHARED_DATA=DIR names another data folder)",
        p.display()
    );
    None
}

/// Runs scripts/roundtrip_check.py on an original and a written model.
pub fn roundtrip_check(original: &Path, written: &Path) {
    let out = Command::new("python3")
        .arg(repo().join("scripts/roundtrip_check.py"))
        .arg(original)
        .arg(written)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "roundtrip_check failed for {}:\n{}{}",
        original.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(serde::Deserialize)]
pub struct ManifestEntry {
    pub file: String,
    pub params: u64,
    pub macs: u64,
    pub input_shape: Vec<usize>,
}

/// How many models of `models/manifest.json` a test over the zoo must have checked: the four
/// committed ones (resnet20, resnet56, mobilenetv2, resnet20_eval), or all `listed` when the
/// generated ones (vgg16_bn) are required (ELRT_REQUIRE_TORCH=1, as in CI).
pub fn zoo_minimum(listed: usize) -> usize {
    if std::env::var("ELRT_REQUIRE_TORCH").as_deref() == Ok("1") {
        listed
    } else {
        4
    }
}

pub fn manifest(dir: &Path) -> Vec<ManifestEntry> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest.json parses")
}

/// read -> write -> read must give the same graph; the written file must pass onnx.checker and
/// give the original's outputs in onnxruntime (when Python has them).
pub fn assert_roundtrip(path: &Path, tmp: &Path, python: bool) {
    let g1 = elrt::onnx::read_file(path).unwrap();
    let out = tmp.join(path.file_name().unwrap());
    elrt::onnx::write_file(&g1, &out).unwrap();
    let g2 = elrt::onnx::read_file(&out).unwrap();
    assert_eq!(
        g1,
        g2,
        "{}: read -> write -> read changed the graph",
        path.display()
    );
    if python {
        roundtrip_check(path, &out);
    }
}

/// Runs `model` in onnxruntime (scripts/ort_forward.py, graph optimisations off) on `x`.
/// With `check`, onnx.checker (full check) runs on the file first.
pub fn ort_forward_checked(
    model: &Path,
    x: &ndarray::ArrayD<f32>,
    check: bool,
) -> ndarray::ArrayD<f32> {
    let tmp = tempfile::tempdir().unwrap();
    let (inp, out) = (tmp.path().join("x.bin"), tmp.path().join("y.bin"));
    let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&inp, bytes).unwrap();
    let shape: Vec<String> = x.shape().iter().map(|d| d.to_string()).collect();
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("scripts/ort_forward.py"));
    if check {
        cmd.arg("--check");
    }
    let o = cmd
        .arg(model)
        .arg(&inp)
        .arg(shape.join(","))
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}: {}",
        model.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    let dims: Vec<usize> = String::from_utf8_lossy(&o.stdout)
        .trim()
        .split(',')
        .map(|d| d.parse().unwrap())
        .collect();
    let raw = std::fs::read(&out).unwrap();
    let v: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&dims), v).unwrap()
}

pub fn ort_forward(model: &Path, x: &ndarray::ArrayD<f32>) -> ndarray::ArrayD<f32> {
    ort_forward_checked(model, x, false)
}

/// `max |a - b| / max |b|`; NaN when either side holds a value that is not finite (`f32::max`
/// drops a NaN, and two outputs full of NaN would compare equal).
pub fn rel_diff(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    if a.iter().chain(b.iter()).any(|v| !v.is_finite()) {
        return f64::NAN;
    }
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6) as f64;
    let d = a
        .iter()
        .zip(b.iter())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs())) as f64;
    d / scale
}

/// The `elrt` binary of this build.
pub fn elrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_elrt"))
}

/// Runs `elrt ARGS`, asserts it succeeded (showing its stderr otherwise) and returns its output.
pub fn succeeds<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = elrt().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `elrt ARGS` and checks the failure is clean: non-zero exit, no panic, and an `error:`
/// line last. Returns that line.
pub fn fails_cleanly<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = elrt().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    assert!(!out.status.success(), "{shown:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    let last = err
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(last.starts_with("error: "), "{err}");
    last
}

/// A proptest runner with a fixed seed, so that CI sees the same cases on every run (a failure
/// is reproducible, never flaky), and `default_cases` cases unless `ELRT_PROPTEST_CASES` asks
/// for more (a longer hunt, still deterministic). Returns the runner and its case count.
pub fn prop_runner(default_cases: u32) -> (proptest::test_runner::TestRunner, u32) {
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let cases = std::env::var("ELRT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(config.rng_algorithm);
    (TestRunner::new_with_rng(config, rng), cases)
}

/// The path of a compiled example: `cargo test` builds the examples beside the test binaries'
/// `deps/` folder (a run limited with `--test` does not, hence the message).
pub fn example_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source = repo().join(format!("examples/{name}.rs"));
    assert!(
        bin.is_file() && modified(&bin) >= modified(&source),
        "{} is missing or older than its source: plain `cargo test --release` builds the examples, \
         a run limited with --test does not (then: cargo build --release --example {name})",
        bin.display()
    );
    bin
}

/// Tensor `key` of a fixture written by the parity scripts (scripts/make_parity_fixtures.py,
/// scripts/make_convnext_fixture.py): `index` is its `index.json`, `blob` its `tensors.bin`
/// (little-endian f32, C order, at the index's byte offset). None when the index lacks it.
pub fn fixture_tensor(
    index: &serde_json::Value,
    blob: &[u8],
    key: &str,
) -> Option<ndarray::ArrayD<f32>> {
    let e = &index["tensors"][key];
    if e.is_null() {
        return None;
    }
    let shape: Vec<usize> = e["shape"]
        .as_array()?
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let off = e["offset"].as_u64()? as usize;
    let n: usize = shape.iter().product();
    let v: Vec<f32> = blob[off..off + 4 * n]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Some(ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), v).unwrap())
}

/// Tensor-wise relative error max|a - b| / max|b| (elementwise is meaningless for entries at
/// float32 noise level). NaN when either side holds a value that is not finite, as [`rel_diff`].
pub fn rel_err(a: &ndarray::ArrayD<f32>, b: &ndarray::ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    if a.iter().chain(b.iter()).any(|v| !v.is_finite()) {
        return f32::NAN;
    }
    let scale = b.iter().fold(0f32, |m, &v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b.iter())
        .fold(0f32, |m, (&x, &y)| m.max((x - y).abs()))
        / scale
}
