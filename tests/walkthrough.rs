//! The README's "Bring your own model" walkthrough, run as written: the shell block between
//! `<!-- walkthrough:begin -->` and `<!-- walkthrough:end -->` is taken from README.md and run
//! with bash in a temporary folder holding a generated `images/` folder (3 classes of PNG
//! images of mixed sizes). Three things are substituted, nothing else: `target/release/elrt`
//! and `cargo run --release --example deploy_tract --` become this build's binaries,
//! `scripts/deploy_onnxruntime.py` its path in the repository, and the compress line gets
//! `--epochs 2` so that CI stays short.
//!
//! It needs PyTorch, torchvision and onnxscript (the export step) and onnxruntime and Pillow (the
//! Python deployment); without them it skips with a message, unless ELRT_REQUIRE_TORCH=1 (CI).

mod common;

use std::path::Path;
use std::process::Command;

fn walkthrough_block() -> String {
    let readme = std::fs::read_to_string(common::repo().join("README.md")).unwrap();
    let begin = readme
        .find("<!-- walkthrough:begin -->")
        .expect("README.md has the walkthrough markers");
    let end = readme.find("<!-- walkthrough:end -->").unwrap();
    let block = &readme[begin..end];
    let code_start = block.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let code_end = block[code_start..].find("```").unwrap() + code_start;
    block[code_start..code_end].to_string()
}

fn make_images(dir: &Path) {
    for (c, name) in ["cat", "dog", "fox"].iter().enumerate() {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 1..=48u32 {
            // Mixed sizes, so that the resize rule is exercised; one colour theme per class.
            let (w, h) = if i % 2 == 0 { (80, 64) } else { (64, 72) };
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                let stripe = ((x / (4 + c as u32)) + (y / 6) + i) % 2;
                let base = [40 + 80 * c as u8, 200 - 70 * c as u8, 90 + 40 * c as u8];
                let v = |b: u8| if stripe == 0 { b } else { b / 3 };
                image::Rgb([v(base[0]), v(base[1]), v(base[2])])
            });
            img.save(d.join(format!("{i:04}.png"))).unwrap();
        }
    }
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let needed = ["torch", "torchvision", "onnxscript", "onnxruntime", "PIL"];
    if !common::python_has(&needed) {
        if std::env::var("ELRT_REQUIRE_TORCH").as_deref() == Ok("1") {
            panic!("python modules {needed:?} are required (ELRT_REQUIRE_TORCH=1) but missing");
        }
        eprintln!("skipping: python3 with {needed:?} is not installed");
        return;
    }
    let block = walkthrough_block();
    let compress_lines = block
        .lines()
        .filter(|l| l.starts_with("target/release/elrt compress"))
        .count();
    assert_eq!(compress_lines, 1, "the walkthrough runs compress once");
    let example = common::example_binary("deploy_tract");
    let script = block
        .replace(
            "cargo run --release --example deploy_tract --",
            &example.display().to_string(),
        )
        .replace("target/release/elrt", env!("CARGO_BIN_EXE_elrt"))
        .replace(
            "scripts/deploy_onnxruntime.py",
            &common::repo()
                .join("scripts/deploy_onnxruntime.py")
                .display()
                .to_string(),
        )
        .lines()
        .map(|l| {
            if l.contains(" compress ") {
                format!("{l} --epochs 2")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let tmp = tempfile::tempdir().unwrap();
    make_images(&tmp.path().join("images"));
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the walkthrough failed:\n{stdout}\n{stderr}"
    );
    // The default export wrote its weights beside the model, and compress read them.
    assert!(tmp.path().join("my_model.onnx.data").exists());
    let run = tmp.path().join("runs/mine");
    for f in ["compact.onnx", "report.md", "model.onnx"] {
        assert!(run.join(f).exists(), "{f} missing in the run folder");
    }
    // The report says how to feed the file, with the folder's classes.
    let report = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(report.contains("cat, dog, fox"), "{report}");
    assert!(stdout.contains(&report[..report.find('\n').unwrap()]));
    // Both deployments print the top classes, the same first.
    let tops: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            let mut parts = l.split_whitespace();
            parts.next().and_then(|p| p.parse::<f64>().ok()).is_some()
                && parts
                    .next()
                    .is_some_and(|n| ["cat", "dog", "fox"].contains(&n))
        })
        .collect();
    assert_eq!(tops.len(), 6, "two programs x three classes:\n{stdout}");
    let name = |l: &str| l.split_whitespace().nth(1).unwrap().to_string();
    assert_eq!(name(tops[0]), name(tops[3]), "{stdout}");
}
