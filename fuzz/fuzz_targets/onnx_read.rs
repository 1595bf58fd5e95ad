//! libFuzzer target: ONNX bytes -> read (external data beside it) -> inspect path -> engine
//! program and a forward pass. See tests/fuzzing/mod.rs (`onnx_pipeline`).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

/// A folder holding ext.bin (the external data of the seed tiny_resnet_external.onnx), made
/// once per process, so that a mutated location, offset or length reads a real file.
fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap().keep();
        std::fs::write(d.join("ext.bin"), include_bytes!("../ext.bin")).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the path: most inputs read from memory (read_bytes), one in four
    // with external data resolved in the folder (read_bytes_in, as read_file does).
    let Some((&how, bytes)) = data.split_first() else {
        return;
    };
    let d = (how % 4 == 0).then(|| dir().as_path());
    let _ = fuzzing::onnx_pipeline(bytes, d);
});
