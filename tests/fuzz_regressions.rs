//! The fuzz campaign's findings (issue 19), each replayed through the path of the target that
//! found it (tests/fuzzing/mod.rs), and the seeds the targets start from.

mod common;
mod fuzzing;

use std::path::PathBuf;

fn seeds() -> Vec<PathBuf> {
    let dir = common::repo().join("fuzz/seeds/onnx_read");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Every seed reads, simplifies, compiles and runs: a seed the reader refused would start the
/// fuzzer from the error path only. The external-data seed reads its weights from ext.bin.
#[test]
fn the_fuzz_seeds_read_and_run() {
    let dir = common::repo().join("fuzz");
    let seeds = seeds();
    assert!(seeds.len() >= 6, "{seeds:?}");
    for p in seeds {
        let bytes = std::fs::read(&p).unwrap();
        let r = fuzzing::onnx_pipeline(&bytes, Some(&dir));
        assert!(r.is_ok(), "{}: {:#}", p.display(), r.unwrap_err());
    }
}
