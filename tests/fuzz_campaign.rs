//! The CLI fuzz campaign (issue 19). The coverage-guided targets are in fuzz/ (cargo-fuzz);
//! these are their proptest and end-to-end sides:
//!
//! - `cli_args_parse_or_refuse` (runs in CI): random argument vectors from the CLI's grammar
//!   through clap and the value parsers, in process, as fuzz/fuzz_targets/cli_args.rs does.
//!   `ELRT_FUZZ_CASES=N` runs more.
//! - `cli_binary_campaign` (`--ignored`, outside CI): random argument vectors through the real
//!   binary, each in a fresh folder holding a tiny model, with a time limit. Every run must
//!   exit 0, 1 or 2, never panic, end a failure with exactly one `error:` line (clap's usage
//!   lines may follow its own), and leave no file behind when it fails (but the checkpoint a
//!   failed training run says it kept for --resume). `ELRT_FUZZ_BIN_CASES=N` (default 200),
//!   `ELRT_FUZZ_SEED=S` for another sequence.

mod common;
mod fuzzing;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn cli_args_parse_or_refuse() {
    use proptest::prelude::*;
    let cases = env_count("ELRT_FUZZ_CASES", 2000) as u32;
    let config = proptest::test_runner::Config {
        cases,
        failure_persistence: None,
        ..Default::default()
    };
    let rng = proptest::test_runner::TestRng::deterministic_rng(config.rng_algorithm);
    let mut runner = proptest::test_runner::TestRunner::new_with_rng(config, rng);
    let (subs, flags) = fuzzing::grammar();
    let refused = std::cell::Cell::new(0usize);
    let t0 = Instant::now();
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..48), |data| {
            let argv = fuzzing::argv_from_bytes(&data, &subs, &flags);
            if let Some(e) = fuzzing::cli_pipeline(&argv) {
                fuzzing::assert_one_line(&argv, &e);
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "{cases} argument vectors in {:.1}s, {} refused by a value parser",
        t0.elapsed().as_secs_f64(),
        refused.get()
    );
}

/// Flags that keep each command small, put before the random ones (which override them, as
/// the CLI lets a later flag override an earlier one): a run that the random flags leave alone
/// finishes in seconds.
fn small_defaults(sub: &str) -> &'static [&'static str] {
    match sub {
        "train" => &[
            "--data",
            "synthetic:32,16",
            "--batch",
            "8",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--threads",
            "1",
            "--workers",
            "1",
            "--quiet",
            "-o",
            "out.onnx",
        ],
        "eval" => &["--data", "synthetic:8,16", "--threads", "1"],
        "convert" => &["-o", "out.onnx", "--rank-multiple", "1"],
        "compress" => &[
            "--out",
            "run",
            "--data",
            "synthetic:32,16",
            "--epochs",
            "1",
            "--max-steps",
            "2",
            "--batch",
            "8",
            "--threads",
            "1",
            "--forms",
            "factorized",
            "--quiet",
        ],
        "export" => &[
            "-o",
            "out.onnx",
            "--forms",
            "factorized",
            "--check-batches",
            "1",
            "--quiet",
        ],
        "bench" => &["--runs", "1", "--warmup", "0", "--min-seconds", "0"],
        "speed" => &["--batch", "2", "--steps", "1", "--threads", "1"],
        _ => &[],
    }
}

struct Run {
    argv: Vec<String>,
    code: Option<i32>,
    timed_out: bool,
    stderr: String,
    left: Vec<String>,
}

fn run_one(bin: &Path, dir: &Path, argv: &[String], limit: Duration) -> Run {
    let mut child = Command::new(bin)
        .args(argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RAYON_NUM_THREADS", "1")
        .env("OPENBLAS_NUM_THREADS", "1")
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = std::io::BufReader::new(stderr).read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let (code, timed_out) = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break (st.code(), false);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stderr = reader.join().unwrap();
    let mut left: Vec<String> = walk(dir)
        .into_iter()
        .filter(|p| p != "model.onnx")
        .collect();
    left.sort();
    Run {
        argv: argv.to_vec(),
        code,
        timed_out,
        stderr,
        left,
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let rel = p.strip_prefix(dir).unwrap().display().to_string();
        if p.is_dir() {
            out.push(format!("{rel}/"));
            for s in walk(&p) {
                out.push(format!("{rel}/{s}"));
            }
        } else {
            out.push(rel);
        }
    }
    out
}

/// What is wrong with a finished run, if anything.
fn check(r: &Run) -> Option<String> {
    if r.timed_out {
        return None; // counted and listed apart: a long run that random flags asked for
    }
    let err = &r.stderr;
    if err.contains("panicked") {
        return Some("panicked".into());
    }
    match r.code {
        Some(0) => None,
        Some(1) => {
            let errors = err.lines().filter(|l| l.starts_with("error:")).count();
            let last = err.trim_end().lines().last().unwrap_or_default();
            // A value holding a newline, quoted back in the message, spans lines (as in
            // fuzzing::assert_one_line).
            if errors == 1 && r.argv.iter().any(|a| a.contains('\n')) && r.left.is_empty() {
                return None;
            }
            if errors != 1 || !last.starts_with("error: ") {
                return Some(format!("{errors} error lines, last line {last:?}"));
            }
            // A training run that failed after its first checkpoint keeps the run so far for
            // --resume, and says so; any other failure leaves nothing.
            if !r.left.is_empty() && !last.contains("kept") {
                return Some(format!("failed but left {:?}", r.left));
            }
            None
        }
        Some(2) => {
            // No subcommand: clap prints the top-level help (as `git` alone does), no error line.
            if err.contains("Usage: elrt <COMMAND>") && err.contains("Commands:") {
                return None;
            }
            let errors = err.lines().filter(|l| l.starts_with("error:")).count();
            let first = err.lines().next().unwrap_or_default();
            if errors != 1 || !first.starts_with("error:") {
                return Some(format!("clap exit with {errors} error lines: {first:?}"));
            }
            if !r.left.is_empty() {
                return Some(format!("usage error but left {:?}", r.left));
            }
            None
        }
        other => Some(format!("exit status {other:?}")),
    }
}

/// An argument vector for the binary: a subcommand (rarely none or two), the tiny model
/// (usually), the small defaults, then up to six random flags with values from the grammar.
fn binary_argv(rng: &mut elrt::rng::Rng, subs: &[String], flags: &[Vec<String>]) -> Vec<String> {
    let vals = fuzzing::VALUES;
    let k = rng.below(subs.len() + 1);
    let mut argv = Vec::new();
    if k == subs.len() {
        // No subcommand: a flag or value alone.
        argv.push(vals[rng.below(vals.len())].to_string());
        return argv;
    }
    let sub = &subs[k];
    argv.push(sub.clone());
    if rng.below(10) < 9 {
        argv.push("model.onnx".into());
        if sub == "bench" && rng.below(2) == 0 {
            argv.push("model.onnx".into());
        }
    }
    if rng.below(10) < 8 {
        argv.extend(small_defaults(sub).iter().map(|s| s.to_string()));
    }
    let own = &flags[k];
    for _ in 0..rng.below(7) {
        let flag = if rng.below(10) == 0 {
            let all: Vec<&String> = flags.iter().flatten().collect();
            all[rng.below(all.len())].clone()
        } else {
            own[rng.below(own.len())].clone()
        };
        let value = vals[rng.below(vals.len())].to_string();
        match rng.below(6) {
            0 => argv.push(format!("{flag}={value}")),
            1 => argv.push(flag),
            2 => argv.push(value),
            _ => {
                argv.push(flag);
                argv.push(value);
            }
        }
    }
    argv
}

#[test]
#[ignore = "long: the CLI campaign through the real binary (docs/tests.md, Fuzzing)"]
fn cli_binary_campaign() {
    let cases = env_count("ELRT_FUZZ_BIN_CASES", 200);
    let seed = env_count("ELRT_FUZZ_SEED", 19);
    let limit = Duration::from_secs(env_count("ELRT_FUZZ_TIMEOUT_S", 30));
    let bin = Path::new(env!("CARGO_BIN_EXE_elrt"));
    let model =
        std::fs::read(common::repo().join("fuzz/seeds/onnx_read/tiny_resnet.onnx")).unwrap();
    let (subs, flags) = fuzzing::grammar();
    let mut rng = elrt::rng::Rng::new(seed);
    let (mut ok, mut refused, mut usage, mut slow) = (0, 0, 0, Vec::new());
    let mut findings = Vec::new();
    let t0 = Instant::now();
    for i in 0..cases {
        let argv = binary_argv(&mut rng, &subs, &flags);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("model.onnx"), &model).unwrap();
        let r = run_one(bin, tmp.path(), &argv, limit);
        match (r.timed_out, r.code) {
            (true, _) => slow.push(r.argv.clone()),
            (_, Some(0)) => ok += 1,
            (_, Some(2)) => usage += 1,
            _ => refused += 1,
        }
        if let Some(what) = check(&r) {
            eprintln!(
                "FINDING {i}: {what}\n  argv: {:?}\n  stderr: {}",
                r.argv, r.stderr
            );
            findings.push((r.argv, what));
        }
    }
    eprintln!(
        "{cases} runs in {:.0}s: {ok} succeeded, {refused} refused (exit 1), {usage} usage errors \
         (exit 2), {} stopped at {}s, {} findings",
        t0.elapsed().as_secs_f64(),
        slow.len(),
        limit.as_secs(),
        findings.len()
    );
    for a in &slow {
        eprintln!("slow: {a:?}");
    }
    assert!(findings.is_empty(), "{findings:#?}");
}
