//! Every flag of every command says what it does (issue 18 item 6): `elrt CMD --help` lists no
//! argument whose description is empty or only its default.

mod common;

const COMMANDS: &[&str] = &[
    "inspect", "train", "eval", "convert", "compress", "export", "bench", "speed",
];

/// (argument, description) pairs of a `--help` text, whether clap printed each description on
/// the argument's line or on the lines below it.
fn arguments(help: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = help.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        let t = l.trim_start();
        let indent = l.len() - t.len();
        let is_arg = (2..=6).contains(&indent) && (t.starts_with('-') || t.starts_with('<'));
        if !is_arg {
            i += 1;
            continue;
        }
        // "--flag <V>  description" on one line, or the description on the lines below.
        let (name, mut desc) = match t.find("  ") {
            Some(k) => (t[..k].to_string(), t[k..].trim().to_string()),
            None => (t.to_string(), String::new()),
        };
        let mut j = i + 1;
        while j < lines.len() {
            let n = lines[j];
            let nt = n.trim_start();
            if nt.is_empty() || n.len() - nt.len() <= 6 {
                break;
            }
            desc.push(' ');
            desc.push_str(nt);
            j += 1;
        }
        out.push((name, desc.trim().to_string()));
        i = j;
    }
    out
}

#[test]
fn every_flag_has_help_text() {
    let mut missing = Vec::new();
    let mut seen = 0;
    for cmd in COMMANDS {
        let out = common::succeeds([cmd, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        for (arg, desc) in arguments(&help) {
            seen += 1;
            let only_default = desc.is_empty() || desc.starts_with("[default");
            if only_default {
                missing.push(format!("elrt {cmd} {arg}"));
            }
        }
    }
    assert!(
        seen > 100,
        "parsed only {seen} arguments: the help format changed"
    );
    assert!(missing.is_empty(), "no help text: {missing:#?}");
}
