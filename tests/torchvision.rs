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

/// Weights the exporter merged (equal values, untied layers) and reaches through Identity nodes
/// are counted as the parameters they are: `inspect` gives PyTorch's count, which is more than
/// the file's stored tensors hold (so the Identity copies were counted, not skipped).
#[test]
fn identity_weights_are_counted() {
    let Some(d) = dir() else { return };
    let file = "identity_weights.onnx";
    let path = d.join(file);
    let raw = elrt::onnx::read_file(&path).unwrap();
    let identity_on_weight = raw
        .nodes
        .iter()
        .filter(|n| {
            n.op.onnx_type() == "Identity"
                && n.inputs.iter().any(|i| raw.initializers.contains_key(i))
        })
        .count();
    assert!(identity_on_weight >= 1, "no Identity node reads a weight");
    let e = manifest(&d)
        .into_iter()
        .find(|e| e.file == file)
        .expect("identity_weights.onnx in the manifest");
    let r = elrt::inspect::inspect(&path, std::slice::from_ref(&e.input_shape)).unwrap();
    // DedupNet (scripts/export_torchvision.py): conv0 448 + conv1 2320 + conv2 2320 + fc1 272 +
    // fc2 272 + fc_out 170.
    assert_eq!(e.params, 5802, "the manifest's PyTorch count");
    assert_eq!(r.totals.params, e.params);
    let stored: usize = raw.initializers.values().map(|t| t.len()).sum();
    assert!(
        (stored as u64) < e.params,
        "the stored tensors ({stored}) already hold every parameter: nothing was merged"
    );
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
