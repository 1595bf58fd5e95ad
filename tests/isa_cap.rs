//! `ELRT_MAX_ISA`: the cap on the engine's vector instructions and on the OpenBLAS kernel set
//! elrt asks for (src/engine/isa.rs).

mod common;

use common::elrt;
use elrt::engine::blas_kernels::{kernel_width, Width};

/// `elrt speed --json --profile` on ResNet-20 (batch 4, 1 step, 1 thread) with the cap set.
fn speed_capped(cap: &str) -> serde_json::Value {
    let model = common::repo().join("models/resnet20.onnx");
    let out = elrt()
        .env("ELRT_MAX_ISA", cap)
        .args([
            "speed",
            model.to_str().unwrap(),
            "--batch",
            "4",
            "--steps",
            "1",
            "--threads",
            "1",
            "--json",
            "--profile",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Under `avx2` and `sse2` the report names the cap, the engine's width is within it, and so
/// is OpenBLAS's kernel set (unless the test's own environment pins one).
#[test]
fn speed_under_a_cap_reports_it_and_runs_openblas_within_it() {
    for (cap, width) in [("avx2", Width::Avx2), ("sse2", Width::Sse)] {
        let v = speed_capped(cap);
        assert_eq!(v["isa_cap"], cap, "{v}");
        let isa = v["isa"].as_str().unwrap();
        match cap {
            "avx2" => assert!(isa == "avx2" || isa == "sse2", "{v}"),
            _ => assert_eq!(isa, "sse2", "{v}"),
        }
        let core = v["blas_core"].as_str().unwrap();
        if std::env::var_os("OPENBLAS_CORETYPE").is_none() {
            if let Some(w) = kernel_width(core) {
                assert!(w <= width, "OpenBLAS {core} under ELRT_MAX_ISA={cap}: {v}");
            }
        }
    }
}

/// Without a hardware FMA (here: under `sse2`) no layer runs on the direct conv, whose
/// portable build's FMAs are library calls; uncapped, on a CPU with FMA, ResNet-20's
/// 16-channel layers do.
#[test]
fn without_fma_no_layer_runs_the_direct_conv() {
    let ops = |v: &serde_json::Value| -> Vec<String> {
        v["profile"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[0].as_str().unwrap().to_string())
            .collect()
    };
    let capped = ops(&speed_capped("sse2"));
    assert!(!capped.iter().any(|o| o == "Conv direct"), "{capped:?}");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        let free = ops(&speed_capped(""));
        assert!(free.iter().any(|o| o == "Conv direct"), "{free:?}");
    }
}

/// A value elrt does not know: one error line naming the variable and the value, and a failing
/// exit, before any work.
#[test]
fn an_unknown_cap_is_refused_in_one_line() {
    let out = elrt()
        .env("ELRT_MAX_ISA", "avx3")
        .args(["inspect", "models/resnet20.onnx"])
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("ELRT_MAX_ISA") && err.contains("avx3"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
