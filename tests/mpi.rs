//! Data-parallel training under `mpirun -np 2` on this machine (ranks oversubscribed on the
//! cores, as root allowed through Open MPI's environment variables).
//!
//! Needs a build with `--features mpi` (scripts/test.sh builds it when mpicc exists, which
//! scripts/setup.sh installs) and `mpirun` on the PATH; otherwise each test skips with a
//! message, unless ELRT_REQUIRE_MPI=1 (set by CI), where that is a failure.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One test at a time: each runs several mpirun jobs of two ranks, and this machine has
/// 2 cores. Also keeps the killed-rank test from seeing another test's ranks.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether this build and machine can run the tests (printing why not when they cannot), and
/// the lock that runs them one at a time.
fn mpi_ready() -> Option<std::sync::MutexGuard<'static, ()>> {
    let has_mpirun = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = match (cfg!(feature = "mpi"), has_mpirun) {
        (true, true) => return Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner())),
        (false, _) => "elrt was built without `--features mpi`",
        (true, false) => "mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)",
    };
    if std::env::var("ELRT_REQUIRE_MPI").as_deref() == Ok("1") {
        panic!("MPI tests are required (ELRT_REQUIRE_MPI=1) but {why}");
    }
    eprintln!("skipping: {why} (scripts/test.sh builds and runs these)");
    None
}

/// `mpirun` for `np` ranks of one program, or of several (`-np 1 A : -np 1 B`, MPMD).
fn mpirun(apps: &[(usize, Vec<String>)]) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // Containers often forbid the cross-memory-attach single copy: shared memory without it.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .args(["--oversubscribe", "--bind-to", "none"]);
    for (i, (np, args)) in apps.iter().enumerate() {
        if i > 0 {
            c.arg(":");
        }
        c.args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_elrt")]);
        c.args(args);
    }
    c
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn run_ok(c: &mut Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}\n{}",
        c,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Every float initializer of an ONNX file (weights and BN running statistics).
fn weights(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let g = elrt::onnx::read_file(path).unwrap();
    g.initializers
        .iter()
        .filter(|(_, t)| t.as_f32().is_some())
        .map(|(k, t)| (k.clone(), t.to_f32s()))
        .collect()
}

/// `||a - b|| / ||a||` over every weight and BN statistic of two files together (L2, in f64).
///
/// Not per tensor: BN biases start at zero and after a few steps hold values near 1e-7 (their
/// gradient, a sum of `dy` over the batch, nearly cancels), so rounding alone (the all-reduce
/// sums in another order than one process) moves them by 1e-3 of their own size. The worst
/// tensor is printed alongside.
fn rel_diff(a: &Path, b: &Path) -> f64 {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    assert!(wa.len() > 10);
    let (mut num, mut den) = (0f64, 0f64);
    let mut worst = (0f64, String::new());
    for (k, x) in &wa {
        let (mut n, mut d) = (0f64, 0f64);
        for (p, q) in x.iter().zip(&wb[k]) {
            n += (f64::from(*p) - f64::from(*q)).powi(2);
            d += f64::from(*p).powi(2);
        }
        let r = (n / d.max(1e-300)).sqrt();
        if r > worst.0 {
            worst = (r, k.clone());
        }
        (num, den) = (num + n, den + d);
    }
    eprintln!("  worst tensor: {} at {:e}", worst.1, worst.0);
    (num / den).sqrt()
}

/// `elrt train` arguments for a short run: 4 steps of global batch 32 on 128 synthetic images.
fn train_args(model: &str, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = strings(&[
        "train",
        model,
        "--data",
        "synthetic:128,64",
        "--epochs",
        "1",
        "--batch",
        "32",
        "--lr",
        "0.05",
        "--threads",
        "1",
        "--workers",
        "1",
        "--quiet",
        "-o",
    ]);
    a.push(out.display().to_string());
    a.extend(strings(extra));
    a
}

fn one_process(args: &[String]) -> Output {
    run_ok(common::elrt().args(args))
}

fn model(name: &str) -> String {
    common::repo()
        .join("models")
        .join(name)
        .display()
        .to_string()
}

/// The `mpi` object of `elrt train --json` under mpirun.
fn mpi_summary(out: &Output) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    v["mpi"].clone()
}

/// Two ranks at batch 16 each reach the weights of one process at batch 32 after 4 steps
/// (ResNet-20 with its BN folded into the convs: no BN), within 1e-4 relative; every rank
/// ends with the same weights (their fingerprints agree), and the gradients travel in one
/// all-reduce call per step.
#[test]
fn two_ranks_equal_one_process_without_bn() {
    let Some(_serial) = mpi_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model("resnet20_eval.onnx");
    let (one, two) = (tmp.path().join("one.onnx"), tmp.path().join("two.onnx"));
    // The file's weights and a lower rate: from a fresh Kaiming init, or at 0.05, 20 layers
    // without BN blow up (a later flag overrides an earlier one).
    let no_bn = ["--bn", "keep", "--init", "file", "--lr", "0.01"];
    one_process(&train_args(&m, &one, &no_bn));
    let mut args = train_args(&m, &two, &no_bn);
    args.push("--json".into());
    let out = run_ok(&mut mpirun(&[(2, args)]));
    let d = rel_diff(&one, &two);
    eprintln!("no BN: max relative weight difference, 2 ranks vs 1 process: {d:e}");
    assert!(d <= 1e-4, "{d}");
    let s = mpi_summary(&out);
    assert_eq!(s["ranks"], 2);
    assert_eq!(s["steps"], 4);
    assert_eq!(s["calls_per_step"], 1);
    assert_eq!(s["same_weights_on_every_rank"], true, "{s}");
    // ResNet-20 without BN: 0.27 M parameters, 4 bytes each, plus the stop flag.
    let bytes = s["bytes_per_step"].as_u64().unwrap();
    assert!((1_000_000..1_200_000).contains(&bytes), "{bytes}");
}

/// With --sync-bn, two ranks at batch 16 reach one process's weights and BN running statistics
/// at batch 32 (ResNet-20 with BN) within 5e-5 relative after one step (1.8e-6 measured with
/// its stride-2 layers on im2col and small-plane, 2.1e-5 on the channels-last column blocks of
/// `conv/cols_cl.rs`, whose forward and input gradient of a rank's images are the same bits as
/// in one process and whose weight gradients over two halves sum to the whole batch's closer
/// than those paths': test `cols_cl_results_do_not_depend_on_the_images_around_one`; the
/// other bits change where BN's division by a small batch deviation amplifies the ranks'
/// reduction order). With
/// each rank's own BN statistics (the default, as PyTorch's DDP) they do not: each rank
/// normalises with 16 images, which is another model (docs/mpi.md gives the size of the
/// difference; 5e-3 here); the test shows that --sync-bn is what closes it. One step: the
/// rounding of sums taken in another order (BN statistics over two ranks, conv blocks of 8 or
/// 16 images) grows step by step through BN's division by the batch deviation, to 2e-5..7e-4
/// after 4 steps and 1e-5..1.3e-4 after 2 depending on the seed and the kernels' summation
/// orders (the 32-lane BN sums moved 2 steps from under 1e-4 to 1.25e-4), so more steps tested
/// luck rather than --sync-bn.
#[test]
fn sync_bn_two_ranks_equal_one_process_and_local_bn_does_not() {
    let Some(_serial) = mpi_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model("resnet20.onnx");
    let p = |n: &str| tmp.path().join(n);
    // The running statistics as training leaves them: recalibrated ones (below) come from the
    // weights, and carry their difference whole.
    let steps = ["--max-steps", "1", "--bn-recalibrate", "0"];
    one_process(&train_args(&m, &p("one.onnx"), &steps));
    run_ok(&mut mpirun(&[(
        2,
        train_args(
            &m,
            &p("sync.onnx"),
            &["--max-steps", "1", "--bn-recalibrate", "0", "--sync-bn"],
        ),
    )]));
    run_ok(&mut mpirun(&[(
        2,
        train_args(&m, &p("local.onnx"), &steps),
    )]));
    let sync = rel_diff(&p("one.onnx"), &p("sync.onnx"));
    let local = rel_diff(&p("one.onnx"), &p("local.onnx"));
    eprintln!(
        "BN: max relative difference to 1 process at batch 32: --sync-bn {sync:e}, local BN {local:e}"
    );
    assert!(sync <= 5e-5, "{sync}");
    assert!(local > 100.0 * sync.max(1e-7), "{local} vs {sync}");
    // Recalibrated before the evaluation (the default): under --sync-bn the statistics are the
    // whole batches' on both sides, so the files differ by what the weights do, whose 1e-4 of
    // their largest value in the first conv after this step (rounding, above) moves the
    // statistics by up to 2e-3 of theirs: 2.8e-4 over every tensor measured.
    let recal = ["--max-steps", "1"];
    one_process(&train_args(&m, &p("one_r.onnx"), &recal));
    run_ok(&mut mpirun(&[(
        2,
        train_args(&m, &p("sync_r.onnx"), &["--max-steps", "1", "--sync-bn"]),
    )]));
    let sync_r = rel_diff(&p("one_r.onnx"), &p("sync_r.onnx"));
    eprintln!("recalibrated BN: --sync-bn against 1 process {sync_r:e}");
    assert!(sync_r <= 1e-3, "{sync_r}");
    assert!(local > 10.0 * sync_r, "{local} vs {sync_r}");
}

/// `--resume` under mpirun: two ranks stopped after the first of two epochs and resumed end
/// with exactly the weights of two ranks that ran both epochs at once; rank 0 alone wrote the
/// checkpoint, metrics and curve.
#[test]
fn resume_under_mpirun_ends_with_the_uninterrupted_weights() {
    let Some(_serial) = mpi_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model("resnet20.onnx");
    let p = |n: &str| tmp.path().join(n);
    let args = |out: &Path, extra: &[&str]| {
        let mut a = train_args(&m, out, &["--epochs", "2"]);
        // --epochs is given twice: clap takes the last.
        a.extend(strings(extra));
        a
    };
    run_ok(&mut mpirun(&[(2, args(&p("whole.onnx"), &[]))]));
    run_ok(&mut mpirun(&[(
        2,
        args(&p("split.onnx"), &["--max-steps", "4"]),
    )]));
    assert!(p("split.ckpt").exists() && p("split.metrics.jsonl").exists());
    assert!(p("split.curve.png").exists());
    run_ok(&mut mpirun(&[(
        2,
        args(&p("split.onnx"), &["--resume", "--allow-recipe-change"]),
    )]));
    assert_eq!(weights(&p("whole.onnx")), weights(&p("split.onnx")));
    let metrics = std::fs::read_to_string(p("split.metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 2, "{metrics}");
}

/// The last stderr line that starts with `error:`, and how many there are.
fn errors(out: &Output) -> (usize, String) {
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(!err.contains("panicked"), "{err}");
    (
        lines.len(),
        lines.last().map_or(String::new(), |l| l.to_string()),
    )
}

/// A global batch that does not divide over the ranks, and ranks started with different
/// recipes or model files: one error line, from rank 0, and a failed job.
#[test]
fn bad_setups_give_one_error_line() {
    let Some(_serial) = mpi_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model("resnet20.onnx");
    let out = tmp.path().join("x.onnx");

    let o = mpirun(&[(2, train_args(&m, &out, &["--batch", "33"]))])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let (n, line) = errors(&o);
    assert_eq!(n, 1, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        line.contains("--batch 33") && line.contains("2 MPI ranks"),
        "{line}"
    );

    let o = mpirun(&[
        (1, train_args(&m, &out, &[])),
        (1, train_args(&m, &out, &["--lr", "0.2"])),
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    let (n, line) = errors(&o);
    assert_eq!(n, 1, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        line.contains("rank(s) 1 started from a different model, recipe or data"),
        "{line}"
    );

    let o = mpirun(&[
        (1, train_args(&m, &out, &[])),
        (1, train_args(&model("resnet56.onnx"), &out, &[])),
    ])
    .output()
    .unwrap();
    assert!(!o.status.success());
    let (n, line) = errors(&o);
    assert_eq!(n, 1, "{}", String::from_utf8_lossy(&o.stderr));
    assert!(line.contains("different model"), "{line}");
    assert!(!out.exists(), "a failed start wrote {}", out.display());
}

/// The processes whose parent chain reaches `root`, with their `OMPI_COMM_WORLD_RANK`.
fn ranks_under(root: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let mut p = pid;
        let mut under = false;
        for _ in 0..8 {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                break;
            };
            let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
            let ppid: u32 = after
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if ppid == root {
                under = true;
                break;
            }
            if ppid <= 1 {
                break;
            }
            p = ppid;
        }
        if !under {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for kv in env.split(|&b| b == 0) {
            if let Some(r) = kv.strip_prefix(b"OMPI_COMM_WORLD_RANK=") {
                found.push((pid, String::from_utf8_lossy(r).into_owned()));
            }
        }
    }
    found
}

/// A rank killed in the middle of training: the job ends within a minute instead of hanging,
/// failed, and the message names the rank that died.
#[test]
fn a_killed_rank_ends_the_job_naming_it() {
    let Some(_serial) = mpi_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let mut args = train_args(
        &model("resnet20.onnx"),
        &tmp.path().join("k.onnx"),
        &["--epochs", "50"],
    );
    args.retain(|a| a != "--quiet");
    let mut child = mpirun(&[(2, args)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until both ranks run, then a little into training.
    let t0 = Instant::now();
    let victim = loop {
        let ranks = ranks_under(child.id());
        if ranks.len() == 2 {
            break ranks.into_iter().find(|(_, r)| r == "1").unwrap().0;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "ranks did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_secs(3));
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t1.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            panic!("the job still runs a minute after rank 1 died");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("rank 1") && err.contains("signal 9"),
        "no line names rank 1:\n{err}"
    );
    eprintln!(
        "rank 1 killed: the job ended {:.1} s later",
        t1.elapsed().as_secs_f64()
    );
}

/// `elrt compress` under mpirun trains with both ranks and rank 0 alone writes the run folder:
/// the same report files as one process, and the trained weights of one process at the same
/// global batch within 1e-4 (ResNet-20 Tucker-2 from random factors with DSO, --sync-bn).
/// Two steps: at compress's learning rate of 0.1 from random factors, rounding differences grow
/// about 100-fold per step in the first steps (2 ranks against 4 differ as much as 2 ranks
/// against one process; docs/mpi.md), and the train tests above cover four.
#[test]
fn compress_under_mpirun_matches_one_process() {
    let Some(_serial) = mpi_ready() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let m = model("resnet20.onnx");
    let args = |out: &PathBuf, extra: &[&str]| {
        let mut a = strings(&[
            "compress",
            &m,
            "--data",
            "synthetic:128,64",
            "--epochs",
            "1",
            "--batch",
            "32",
            "--threads",
            "1",
            "--max-steps",
            "2",
            // Training's statistics: the test is about the weights (recalibrated statistics
            // carry the weights' difference whole, see the sync-bn test).
            "--bn-recalibrate",
            "0",
            "--quiet",
            "--out",
        ]);
        a.push(out.display().to_string());
        a.extend(strings(extra));
        a
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    run_ok(common::elrt().args(args(&one, &[])));
    run_ok(&mut mpirun(&[(2, args(&two, &["--sync-bn"]))]));
    for f in ["report.md", "report.json", "compact.onnx", "trained.onnx"] {
        assert!(two.join(f).exists(), "{f}");
    }
    let d = rel_diff(&one.join("trained.onnx"), &two.join("trained.onnx"));
    eprintln!("compress: trained weights, 2 ranks --sync-bn vs 1 process: {d:e}");
    assert!(d <= 1e-4, "{d}");
}
