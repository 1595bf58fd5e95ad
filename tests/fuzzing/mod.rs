//! What the fuzz targets (fuzz/fuzz_targets/) do with one input, shared with the regression
//! tests (tests/fuzz_regressions.rs) so that a minimized finding replays exactly the path that
//! found it. Every input must give Ok or Err: a panic, an abort, a hang or a huge allocation
//! is a finding.
#![allow(dead_code)]

use std::path::Path;

use anyhow::Result;
use elrt::engine::exec::Mode;
use elrt::engine::model::Model;
use elrt::ir::fold::{simplify, FoldOptions};
use elrt::ir::shape::default_input_shapes;

/// The binary's command line (src/cli/), compiled into this crate so that argument vectors
/// parse exactly as `elrt` parses them.
#[path = "../../src/cli/mod.rs"]
pub mod cli;
use cli::{Cli, Cmd};

/// The ONNX reader target: read (external data resolved in `dir`), then the `elrt inspect`
/// path (the file's default input shapes, simplified for inference, costed, reported), a
/// write and re-read of the graph, and the engine program at batch 2 with one forward pass
/// when every value is small.
pub fn onnx_pipeline(bytes: &[u8], dir: Option<&Path>) -> Result<()> {
    let g = elrt::onnx::read_bytes_in(bytes, dir)?;
    // Whatever reads must write; what it writes must read.
    let written = elrt::onnx::write_bytes(&g);
    if let Ok(b) = &written {
        let _ = elrt::onnx::read_bytes(b);
    }

    let mut gi = g.clone();
    let shapes = default_input_shapes(&gi)?;
    let facts = simplify(
        &mut gi,
        &shapes,
        FoldOptions {
            remove_dropout: true,
        },
    )?;
    let c = elrt::ir::cost::cost(&gi, &facts);
    let _ = serde_json::to_string(&c.totals);

    // Values at batch 1, summed: the forward pass at batch 2 is quick when this is small.
    let elements = facts.values().fold(0u128, |acc, f| {
        acc.saturating_add(
            f.shape
                .iter()
                .fold(1u128, |p, &d| p.saturating_mul(d as u128)),
        )
    });
    let mut model = Model::from_graph(g, 2)?;
    if elements <= 1 << 18 {
        let x = ndarray::ArrayD::zeros(model.input_shape.clone());
        model.forward(x, Mode::Eval)?;
    }
    Ok(())
}

/// Values the CLI grammar draws from: numbers at and past every limit, odd text, paths that do
/// not exist, and the forms each parser accepts (so that the checks after clap are reached).
pub const VALUES: &[&str] = &[
    "0",
    "1",
    "2",
    "7",
    "-1",
    "-0",
    "-0.1",
    "0.5",
    "1e-3",
    "1e30",
    "1e309",
    "-1e309",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "+1",
    "0x10",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "99999999999999999999999",
    "",
    " ",
    "-",
    "--",
    "=",
    ",",
    "é",
    "\u{202e}x",
    "🦀",
    "a\nb",
    "sgd",
    "adamw",
    "Adam",
    "constant",
    "step",
    "cosine",
    "onecycle",
    "one-cycle",
    "tucker2",
    "tucker",
    "cp",
    "scratch",
    "factors",
    "file",
    "orthogonal",
    "decompose",
    "composed",
    "per-conv",
    "auto",
    "keep",
    "insert",
    "fastest",
    "factorized",
    "dense",
    "ratio=0.5",
    "ratio=0",
    "ratio=1.5",
    "ratio=nan",
    "ratio=",
    "params=0.4",
    "macs=1",
    "energy=0.9",
    "latency=0.5",
    "latency=-1",
    "file=",
    "ranks.json",
    "/nonexistent/ranks.json",
    "synthetic",
    "synthetic:",
    "synthetic:16,8",
    "synthetic:0,0",
    "synthetic:-1,5",
    "synthetic:16",
    "synthetic:99999999999,1",
    "synthetic:16,8,4",
    "cifar10",
    "cifar10:",
    "cifar10:/nonexistent",
    "cifar100:/nonexistent",
    "folder:",
    "folder:/nonexistent",
    "imagenet",
    "none",
    "NONE",
    "0.5,0.5,0.5/0.2,0.2,0.2",
    "0.5/0",
    "0.5/-1",
    "nan/1",
    "1,2/3",
    "/",
    "1,3,8,8",
    "1x3x8x8",
    "3,8,8",
    "0,3,8,8",
    "1,3,x,8",
    "1,,3",
    ",,,",
    "x",
    "1,3,99999999999,99999999999",
    "k=v",
    "=v",
    "k=",
    "out.onnx",
    "out.txt",
    "out",
    "run",
    "sub/out.onnx",
    "/nonexistent/out.onnx",
    "model.onnx",
    "/nonexistent/model.onnx",
    ".",
];

/// Every long and short flag name of `sub` (`--name`, `-c`), read from the clap definition so
/// that the grammar follows the CLI as it changes.
pub fn flags_of(sub: &clap::Command) -> Vec<String> {
    let mut v = Vec::new();
    for a in sub.get_arguments() {
        if let Some(l) = a.get_long() {
            v.push(format!("--{l}"));
        }
        if let Some(s) = a.get_short() {
            v.push(format!("-{s}"));
        }
    }
    v
}

/// The subcommand names, then the flags of each (the same order).
pub fn grammar() -> (Vec<String>, Vec<Vec<String>>) {
    let cmd = cli::command();
    let subs: Vec<&clap::Command> = cmd.get_subcommands().collect();
    (
        subs.iter().map(|s| s.get_name().to_string()).collect(),
        subs.iter().map(|s| flags_of(s)).collect(),
    )
}

/// The CLI target: clap's parse of `argv` (program name first), then the cheap checks each
/// command makes of its values before any work (its flags turned into the pipeline's options,
/// as the binary does). Returns the
/// first error as one line; clap's own errors, help and version text come back as `Ok(None)`
/// after they were rendered, as the binary would print them.
pub fn cli_pipeline(argv: &[String]) -> Option<anyhow::Error> {
    let cli = match cli::try_parse_from(argv) {
        Ok(c) => c,
        Err(e) => {
            let text = e.render().to_string();
            // clap's error, or help / version text: never empty.
            assert!(!text.trim().is_empty(), "{argv:?}: empty clap message");
            return None;
        }
    };
    check_values(&cli).err()
}

fn shape(s: &str) -> Result<()> {
    elrt::inspect::parse_shape(s).map(|_| ())
}

/// The checks each command makes of its values before it reads a model or data: the
/// conversion of its flags into the pipeline's options.
fn check_values(cli: &Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Inspect { input_shape, .. } => {
            for s in input_shape {
                shape(s)?;
            }
        }
        Cmd::Train(a) => {
            a.to_options()?;
        }
        Cmd::Eval(a) => {
            a.to_options()?;
        }
        Cmd::Convert(a) => {
            a.to_options()?;
        }
        Cmd::Compress(a) => {
            a.to_options()?;
        }
        Cmd::Export(a) => {
            a.to_options()?;
        }
        Cmd::Bench(a) => {
            a.to_options()?;
        }
        Cmd::Speed(a) => {
            a.to_options()?;
        }
    }
    Ok(())
}

/// An argument vector from fuzz bytes: each byte pair picks a token (a subcommand, a flag of
/// the chosen subcommand or of another, a value, or a short string of the input's own bytes).
pub fn argv_from_bytes(data: &[u8], subs: &[String], flags: &[Vec<String>]) -> Vec<String> {
    let mut argv = vec!["elrt".to_string()];
    let mut it = data.iter().copied();
    let Some(first) = it.next() else {
        return argv;
    };
    let sub = first as usize % (subs.len() + 1);
    if sub < subs.len() {
        argv.push(subs[sub].clone());
    }
    let own = flags.get(sub).cloned().unwrap_or_default();
    let all: Vec<&String> = flags.iter().flatten().collect();
    while let (Some(kind), Some(pick)) = (it.next(), it.next()) {
        let pick = pick as usize;
        let tok = match kind % 8 {
            0..=2 if !own.is_empty() => own[pick % own.len()].clone(),
            3 | 4 => VALUES[pick % VALUES.len()].to_string(),
            5 if !own.is_empty() => format!(
                "{}={}",
                own[pick % own.len()],
                VALUES[(pick / 7) % VALUES.len()]
            ),
            6 => {
                // Raw bytes of the input as one argument, up to `pick % 16` of them.
                let take: Vec<u8> = it.by_ref().take(pick % 16).collect();
                String::from_utf8_lossy(&take).into_owned()
            }
            _ => all
                .get(pick % all.len().max(1))
                .map_or(String::new(), |s| (*s).clone()),
        };
        argv.push(tok);
    }
    argv
}

/// The first error line of each parser is one line: a message that spans lines would break
/// the binary's `error: ...` contract.
pub fn assert_one_line(argv: &[String], e: &anyhow::Error) {
    let text = format!("{e:#}");
    // A value that itself holds a newline may be quoted back; anything else is one line.
    if argv.iter().any(|a| a.contains('\n')) {
        return;
    }
    assert!(!text.contains('\n'), "{argv:?}: multi-line error: {text}");
    assert!(!text.trim().is_empty(), "{argv:?}: empty error");
}
