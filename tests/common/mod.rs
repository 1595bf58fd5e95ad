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
