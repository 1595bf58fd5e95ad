//! `elrt train` end to end through the binary: it learns on synthetic data, writes every
//! output, resumes after kill -9 to exactly the weights of an uninterrupted run, and rejects
//! bad input cleanly.

mod common;

use common::{elrt, fails_cleanly, succeeds};

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let model = common::repo().join("models/resnet20.onnx");
    let mut v: Vec<String> = [
        "train",
        model.to_str().unwrap(),
        "--data",
        "synthetic:1024,256",
        "--epochs",
        "3",
        "--batch",
        "64",
        "--lr",
        "0.05",
        "--seed",
        "7",
        "--threads",
        "2",
        "--quiet",
        "-o",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// The same arguments without `--quiet`.
fn loud(args: Vec<String>) -> Vec<String> {
    args.into_iter().filter(|a| a != "--quiet").collect()
}

fn weights(path: &Path) -> std::collections::BTreeMap<String, elrt::ir::Tensor> {
    elrt::onnx::read_file(path).unwrap().initializers
}

/// Starts a training run into `out` and returns once it is 300 ms into its second epoch (the
/// first epoch's checkpoint exists), still running.
fn spawn_into_second_epoch(out: &Path, stderr: Stdio) -> std::process::Child {
    let ckpt = out.with_extension("ckpt");
    let mut child = elrt()
        .args(train_args(out, &[]))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint after 300 s"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the first checkpoint was seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    child
}

#[test]
fn resume_after_kill_gives_the_uninterrupted_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full.onnx");
    succeeds(train_args(&full, &[]));
    for ext in ["ckpt", "metrics.jsonl", "curve.png"] {
        assert!(full.with_extension(ext).exists(), "{ext} missing");
    }
    let metrics = std::fs::read_to_string(full.with_extension("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);

    // Kill -9 during the second epoch: after the first epoch's checkpoint appears.
    let part = tmp.path().join("part.onnx");
    let mut child = spawn_into_second_epoch(&part, Stdio::null());
    assert!(
        child.try_wait().unwrap().is_none(),
        "finished before it could be killed"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!part.exists(), "a killed run must not leave an output");

    // Not --quiet: the resume line is progress output, which --quiet silences.
    let out = succeeds(loud(train_args(&part, &["--resume"])));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming"));
    assert_eq!(
        weights(&full),
        weights(&part),
        "resumed weights differ from the uninterrupted run"
    );

    // Ctrl-C (SIGINT) during the second epoch: a checkpoint where it stopped, then --resume ends
    // with the same weights and the same per-epoch train metrics as the uninterrupted run (the
    // interrupted epoch's loss and accuracy are carried in the checkpoint, not restarted).
    let int = tmp.path().join("int.onnx");
    let child = spawn_into_second_epoch(&int, Stdio::piped());
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interrupted"), "{err}");
    let out = succeeds(loud(train_args(&int, &["--resume"])));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(", batch 0 ("),
        "expected a mid-epoch resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        weights(&full),
        weights(&int),
        "weights differ after Ctrl-C and --resume"
    );
    let train_metrics = |p: &Path| -> Vec<(u64, String, String)> {
        std::fs::read_to_string(p.with_extension("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["epoch"].as_u64().unwrap(),
                    v["train_loss"].to_string(),
                    v["train_acc"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(train_metrics(&full), train_metrics(&int));
}

#[test]
fn learns_on_synthetic_data_and_eval_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("r20.onnx");
    // Long enough to learn: 2,000 images, batch 32, 3 epochs (~190 steps); later flags win.
    // Without warm-up the first epoch sits on a plateau whose exit depends on rounding, so a
    // change of summation order (OpenBLAS's kernel set, the engine's conv blocks) moved the end
    // accuracy anywhere from 14% to 50% (lr 0.02 and 0.05, AdamW 0.001-0.002). With one epoch
    // of warm-up at lr 0.05, seeds 1, 2 and 7 reach 33-48% with both the Haswell and the
    // Cooperlake kernels (2026-12-02).
    let args = train_args(
        &out_path,
        &[
            "--json",
            "--data",
            "synthetic:2000,500",
            "--batch",
            "32",
            "--lr",
            "0.05",
            "--warmup",
            "1",
        ],
    );
    let out = succeeds(&args);
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let acc = summary["last"]["test_acc"].as_f64().unwrap();
    assert!(
        acc > 0.25,
        "test accuracy {acc} after 3 short epochs (chance is 0.1)"
    );
    let ev = succeeds([
        "eval",
        out_path.to_str().unwrap(),
        "--data",
        "synthetic:2000,500",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&ev.stdout).unwrap();
    let top1 = r["top1"].as_f64().unwrap();
    assert!(
        (top1 - acc).abs() < 1e-6,
        "eval {top1} vs training's last test accuracy {acc}"
    );
}

/// Runs `elrt ARGS` with `ELRT_PROGRESS_SECS=secs` and stderr piped (not a terminal); returns
/// stdout and stderr.
fn run_with_period(args: &[String], secs: &str) -> (String, String) {
    let o = elrt()
        .args(args)
        .env("ELRT_PROGRESS_SECS", secs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    (String::from_utf8_lossy(&o.stdout).into_owned(), err)
}

/// With stderr not a terminal (a pipe here, a log file or CI in real use), progress comes as
/// plain lines every ELRT_PROGRESS_SECS seconds (30 by default), beside the per-epoch lines:
/// the epoch, the step within it, the loss, and the run's steps and ETA, which know the epochs
/// still to run and --max-steps.
#[test]
fn plain_progress_lines_when_stderr_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("p.onnx");
    // 256 images at batch 64: 4 steps an epoch; 3 epochs asked, --max-steps stops at step 6.
    let args = loud(train_args(
        &out,
        &["--data", "synthetic:256,64", "--max-steps", "6"],
    ));
    // Period 0: a line after every step.
    let (_, err) = run_with_period(&args, "0");
    let steps: Vec<&str> = err.lines().filter(|l| l.contains(" step ")).collect();
    let want = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)];
    assert_eq!(steps.len(), want.len(), "{err}");
    for (k, (line, (epoch, batch))) in steps.iter().zip(want).enumerate() {
        assert!(
            line.starts_with(&format!("epoch {epoch}/3 step {batch}/4  loss "))
                && line.contains(&format!("  run {}/6 steps, eta ", k + 1))
                && line.contains(" img/s "),
            "{line}"
        );
    }
    // The per-epoch lines: the first gives the run's ETA, the last (where --max-steps stops the
    // run) has none.
    let epochs: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("epoch ") && l.contains("  lr "))
        .collect();
    assert_eq!(epochs.len(), 2, "{err}");
    assert!(epochs[0].contains("  eta "), "{}", epochs[0]);
    assert!(!epochs[1].contains("eta"), "{}", epochs[1]);
    // A period longer than the run: the per-epoch lines only.
    let (_, err) = run_with_period(&args, "3600");
    assert_eq!(
        err.lines().filter(|l| l.contains(" step ")).count(),
        0,
        "{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("epoch ")).count(),
        2,
        "{err}"
    );
}

/// `--quiet` leaves stderr empty on a successful run (no data line, no progress even when plain
/// lines are due after every step, no per-epoch lines, no resume line); stdout keeps the one
/// final line, the output file and its test accuracy. Only errors, `warning:`/`note:` lines,
/// a classifier re-sized to the data and a Ctrl-C's checkpoint line would show.
#[test]
fn quiet_prints_only_the_final_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("q.onnx");
    let final_line = |stdout: &str| {
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        assert!(
            lines[0].starts_with(&format!("{}: test top-1 ", out.display())),
            "{stdout}"
        );
    };
    let args = train_args(&out, &["--data", "synthetic:256,64", "--epochs", "2"]);
    let (stdout, err) = run_with_period(&args, "0");
    assert_eq!(err, "", "--quiet printed on stderr");
    final_line(&stdout);
    // --resume of the finished run: still nothing but the final line.
    let mut resume = args.clone();
    resume.push("--resume".into());
    let (stdout, err) = run_with_period(&resume, "0");
    assert_eq!(err, "", "--quiet --resume printed on stderr");
    final_line(&stdout);
}

/// The six CIFAR-10 batch files, each holding `bytes`.
fn write_cifar_files(dir: &Path, bytes: &[u8]) {
    for i in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{i}.bin")), bytes).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
}

#[test]
fn bad_input_fails_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::repo().join("models/resnet20.onnx");
    let m = model.to_str().unwrap();
    let o = tmp.path().join("o.onnx");
    let o = o.to_str().unwrap();
    let e = fails_cleanly(&["train", m, "--data", "cifar10:/nonexistent", "-o", o]);
    assert!(e.contains("/nonexistent"), "{e}");
    let e = fails_cleanly(&["train", m, "--data", "imagenet", "-o", o]);
    assert!(e.contains("imagenet"), "{e}");
    // A CIFAR batch file of the wrong size.
    let dir = tmp.path().join("cifar");
    std::fs::create_dir_all(&dir).unwrap();
    write_cifar_files(&dir, &[0u8; 3073 * 2 + 5]);
    let spec = format!("cifar10:{}", dir.display());
    let e = fails_cleanly(&["train", m, "--data", &spec, "-o", o]);
    assert!(e.contains("data_batch_1.bin") && e.contains("3073"), "{e}");
    // Labels out of range for the model: CIFAR-100-like labels on a 10-class model.
    let mut rec = vec![0u8; 3073 * 4];
    rec[0] = 42;
    write_cifar_files(&dir, &rec);
    let e = fails_cleanly(&["train", m, "--data", &spec, "-o", o]);
    assert!(e.contains("42"), "{e}");
    let e = fails_cleanly(&["train", m, "--resume", "-o", o]);
    assert!(e.contains("no checkpoint"), "{e}");
}

/// `elrt speed --json --profile`: the figures the benchmark script reads, the per-op profile,
/// and the OpenBLAS kernel set with whether the environment pinned it.
#[test]
fn speed_reports_throughput_profile_and_blas_core() {
    let model = common::repo().join("models/resnet20.onnx");
    let model = model.to_str().unwrap();
    let args = [
        "speed",
        model,
        "--batch",
        "4",
        "--steps",
        "1",
        "--threads",
        "1",
        "--json",
        "--profile",
    ];
    for pinned in [false, true] {
        let mut cmd = elrt();
        cmd.args(args);
        if pinned {
            cmd.env("OPENBLAS_CORETYPE", "Haswell");
        } else {
            cmd.env_remove("OPENBLAS_CORETYPE");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["batch"], 4);
        assert_eq!(v["threads"], 1);
        assert!(
            v.get("worker_idle_pct").is_none(),
            "one thread has no other: {v}"
        );
        assert!(v["img_per_s"].as_f64().unwrap() > 0.0, "{v}");
        assert!(v["peak_rss_mib"].as_f64().unwrap() > 1.0, "{v}");
        assert!(!v["blas_core"].as_str().unwrap().is_empty(), "{v}");
        assert_eq!(v["blas_core_pinned"], pinned, "{v}");
        let core = v["blas_core"].as_str().unwrap();
        if pinned {
            // The user's choice wins over elrt's restart (a name of x86's kernel sets).
            if cfg!(target_arch = "x86_64") {
                assert_eq!(core, "Haswell", "{v}");
            }
            assert!(v.get("blas_core_replaced").is_none(), "{v}");
        } else {
            // Never OpenBLAS's generic kernels on a CPU that runs wider ones (a CPU newer than
            // the OpenBLAS build gets them by itself: elrt restarts with OPENBLAS_CORETYPE).
            use elrt::engine::blas_kernels::{kernel_width, CpuFeatures, Width};
            if CpuFeatures::detect().avx2_fma {
                let w = kernel_width(core);
                assert!(w.is_none() || w >= Some(Width::Avx2), "{v}");
            }
        }
        let ops: Vec<String> = v["profile"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| format!("{} {}", e[0].as_str().unwrap(), e[1].as_str().unwrap()))
            .collect();
        // Convs are filed by the kernel that runs them (the stride-2 3x3 layers on the
        // channels-last column blocks); the stem's BN + ReLU runs fused, and every residual
        // Add + ReLU joined to the batch norm before it (src/engine/program.rs, fuse_act and
        // fuse_residual).
        for want in [
            "Conv im2col-cl forward",
            "Conv im2col-cl backward",
            "BatchNormalization+Relu backward",
            "BatchNormalization+Add+Relu forward",
        ] {
            assert!(ops.iter().any(|o| o == want), "{want} missing from {ops:?}");
        }
        assert!(
            !ops.iter()
                .any(|o| o.starts_with("Relu ") || o.starts_with("Add+Relu ")),
            "unfused ReLU or Add in {ops:?}"
        );
    }
}

/// `elrt speed --json --profile` at 2 threads: the other thread's idle share of the timed
/// steps (a percentage), and per op its idle ms, each no more than the op's own time.
#[test]
fn speed_at_two_threads_reports_the_other_threads_idle_time() {
    let model = common::repo().join("models/resnet20.onnx");
    let out = succeeds([
        "speed",
        model.to_str().unwrap(),
        "--batch",
        "8",
        "--steps",
        "2",
        "--threads",
        "2",
        "--json",
        "--profile",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["threads"], 2);
    let pct = v["worker_idle_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&pct), "{v}");
    let idle = v["profile_idle"].as_array().unwrap();
    assert!(!idle.is_empty(), "{v}");
    for row in idle {
        let (op, dir, ms) = (&row[0], &row[1], row[2].as_f64().unwrap());
        let own = v["profile"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| &r[0] == op && &r[1] == dir)
            .unwrap_or_else(|| panic!("{op} {dir} has an idle row but no profile row"));
        assert!(
            ms >= 0.0 && ms <= own[2].as_f64().unwrap() * 1.01 + 0.01,
            "{row:?} {own:?}"
        );
    }
}

/// `elrt speed --json --profile-nodes`: one row per node and direction (ResNet-20's 21 convs
/// each have a forward row), and the per-op rows are the sums of the per-node ones.
#[test]
fn speed_profile_nodes_rows_cover_every_conv_and_sum_to_the_op_rows() {
    let model = common::repo().join("models/resnet20.onnx");
    let out = elrt()
        .args([
            "speed",
            model.to_str().unwrap(),
            "--batch",
            "2",
            "--steps",
            "1",
            "--threads",
            "1",
            "--json",
            "--profile-nodes",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    let conv_fwd = nodes
        .iter()
        .filter(|n| n[1].as_str().unwrap().starts_with("Conv") && n[2] == "forward")
        .count();
    assert_eq!(conv_fwd, 21, "{nodes:?}");
    let names: std::collections::HashSet<&str> =
        nodes.iter().map(|n| n[0].as_str().unwrap()).collect();
    assert!(names.len() > 21, "{names:?}");
    for row in v["profile"].as_array().unwrap() {
        let (op, dir, ms) = (&row[0], &row[1], row[2].as_f64().unwrap());
        let sum: f64 = nodes
            .iter()
            .filter(|n| &n[1] == op && &n[2] == dir)
            .map(|n| n[3].as_f64().unwrap())
            .sum();
        assert!(
            (sum - ms).abs() <= 1e-9 * ms.max(1.0),
            "{op} {dir}: {sum} vs {ms}"
        );
    }
}

/// The metrics file lists each epoch once, as the checkpoint knows them: a line whose
/// checkpoint was never written (a full disk) is not listed twice after --resume (issue 19).
#[test]
fn a_resumed_run_lists_each_epoch_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r20.onnx");
    // One epoch of 8 steps (256 images, batch 32), stopped by --max-steps with a checkpoint.
    let base = [
        "--data",
        "synthetic:256,64",
        "--batch",
        "32",
        "--epochs",
        "2",
        "--threads",
        "2",
    ];
    let mut first = train_args(&out, &base);
    first.extend(["--max-steps".to_string(), "8".to_string()]);
    succeeds(&first);
    let metrics = out.with_extension("metrics.jsonl");
    let epochs = |p: &Path| -> Vec<u64> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(epochs(&metrics), [1]);
    // As if epoch 2's metrics line had been written and its checkpoint write had then failed.
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text += &text.clone().replace("\"epoch\":1", "\"epoch\":2");
    std::fs::write(&metrics, text).unwrap();
    // Resuming without the step limit changes the recipe: refused unless asked for.
    let mut again = train_args(&out, &base);
    again.push("--resume".into());
    let e = fails_cleanly(&again);
    assert!(
        e.contains("max_steps: 8 -> null") && e.contains("--allow-recipe-change"),
        "{e}"
    );
    again.push("--allow-recipe-change".into());
    succeeds(&again);
    assert_eq!(epochs(&metrics), [1, 2]);
}

/// Every BatchNormalization's momentum in `path` (ONNX's convention, the old value's weight).
fn bn_momenta(path: &Path) -> Vec<f32> {
    elrt::onnx::read_file(path)
        .unwrap()
        .nodes
        .iter()
        .filter_map(|n| match &n.op {
            elrt::ir::Op::BatchNorm(b) => Some(b.momentum),
            _ => None,
        })
        .collect()
}

/// A model whose BatchNormalizations keep PyTorch momentum 0.01 gets a `note:` naming
/// `--bn-momentum` in a short run without recalibration (`--bn-recalibrate 0`: its running
/// statistics would lag the weights), under `--quiet` too, and none with it (the default);
/// `--bn-momentum 0.1` trains every BN with 0.1 (ONNX 0.9 in the written file) and no note.
#[test]
fn slow_batch_norm_momentum_is_noted_and_set_by_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = elrt::onnx::read_file(&common::repo().join("models/resnet20.onnx")).unwrap();
    for n in &mut g.nodes {
        if let elrt::ir::Op::BatchNorm(b) = &mut n.op {
            b.momentum = 0.99;
        }
    }
    let slow = tmp.path().join("slow_bn.onnx");
    elrt::onnx::write_file(&g, &slow).unwrap();
    let out = tmp.path().join("t.onnx");
    let run = |extra: &[&str]| {
        let mut args = train_args(&out, &["--data", "synthetic:256,64", "--epochs", "1"]);
        args[1] = slow.to_str().unwrap().to_string();
        args.extend(extra.iter().map(|s| s.to_string()));
        String::from_utf8_lossy(&succeeds(&args).stderr).into_owned()
    };
    let err = run(&["--bn-recalibrate", "0"]);
    assert!(
        err.contains("note: ") && err.contains("--bn-momentum 0.1") && err.contains("0.99"),
        "{err}"
    );
    // Recalibrated before each evaluation (the default), the momentum no longer matters there.
    let err = run(&[]);
    assert!(!err.contains("--bn-momentum"), "{err}");
    assert!(bn_momenta(&out).iter().all(|&m| (m - 0.99).abs() < 1e-6));
    let err = run(&["--bn-momentum", "0.1"]);
    assert!(!err.contains("--bn-momentum"), "{err}");
    let m = bn_momenta(&out);
    assert!(
        !m.is_empty() && m.iter().all(|&m| (m - 0.9).abs() < 1e-6),
        "{m:?}"
    );
}
