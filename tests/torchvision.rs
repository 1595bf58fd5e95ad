//! Files elrt did not make: torchvision exports at opsets 13 and 18, an opset-9 export with
//! the dynamic flatten pattern, and weights reached through Identity nodes. They are generated
//! by scripts/export_torchvision.py (scripts/test.sh does it when PyTorch is installed) into
//! target/torchvision-onnx, or $ELRT_TV_DIR.

mod common;

use std::path::PathBuf;

use common::*;

fn dir() -> Option<PathBuf> {
    let d = std::env::var("ELRT_TV_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/torchvision-onnx"));
    if d.join("manifest.json").exists() {
        return Some(d);
    }
    if std::env::var("ELRT_REQUIRE_TORCH").as_deref() == Ok("1") {
        panic!(
            "{} has no manifest.json (ELRT_REQUIRE_TORCH=1)",
            d.display()
        );
    }
    eprintln!(
        "skipping: no torchvision exports in {} (python3 scripts/export_torchvision.py {})",
        d.display(),
        d.display()
    );
    None
}

#[test]
fn counts_match_pytorch() {
    let Some(d) = dir() else { return };
    let entries = manifest(&d);
    assert!(
        entries.len() >= 16,
        "expected 7 models x 2 opsets + 2 special files"
    );
    for e in entries {
        let r = elrt::inspect::inspect(&d.join(&e.file), std::slice::from_ref(&e.input_shape))
            .unwrap_or_else(|err| panic!("{}: {err:#}", e.file));
        assert_eq!(r.totals.params, e.params, "{}: params", e.file);
        assert_eq!(r.totals.macs, e.macs, "{}: MACs", e.file);
    }
}

#[test]
fn dynamic_flatten_is_folded() {
    let Some(d) = dir() else { return };
    let path = d.join("dynflatten_op9.onnx");
    let raw = elrt::onnx::read_file(&path).unwrap();
    let ops = |g: &elrt::ir::Graph| -> Vec<&'static str> {
        g.nodes.iter().map(|n| n.op.onnx_type()).collect()
    };
    assert!(ops(&raw).contains(&"Shape") && ops(&raw).contains(&"Gather"));
    let mut g = raw.clone();
    let opts = elrt::ir::fold::FoldOptions {
        remove_dropout: true,
    };
    elrt::ir::fold::simplify(&mut g, &[vec![4, 3, 32, 32]], opts).unwrap();
    for op in ["Shape", "Gather", "Unsqueeze", "Concat"] {
        assert!(
            !ops(&g).contains(&op),
            "{op} left after folding: {:?}",
            ops(&g)
        );
    }
    assert!(ops(&g).contains(&"Reshape"));
}

#[test]
fn identity_weights_are_counted() {
    let Some(d) = dir() else { return };
    let raw = elrt::onnx::read_file(&d.join("identity_weights.onnx")).unwrap();
    assert!(raw.nodes.iter().any(|n| n.op.onnx_type() == "Identity"));
}

#[test]
fn roundtrip_is_identity() {
    let Some(d) = dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let python = require_python(&["onnx", "onnxruntime", "numpy"]);
    for e in manifest(&d) {
        let path = d.join(&e.file);
        assert_roundtrip(&path, tmp.path(), python);
    }
}
