//! The module graph flows one way: every top-level module of the library sits in one layer of
//! the order below and may use only the modules before it. The test reads every `src/**/*.rs`,
//! collects the `crate::<module>` paths in code (`use` statements, grouped ones included, and
//! paths in expressions; comments and string literals are skipped) and the `super::` paths that
//! climb to the crate root, and names each file, line and path that reaches a module after its
//! own. The same order is in docs/design.md; a new top-level module has to be
//! placed here (the test fails until it is). No exceptions are allowed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first. `main.rs` (the binary, which sees the library as `elrt::`) is above them all.
const LAYERS: &[&str] = &[
    "util",     // files, formatting
    "rng",      // SplitMix64, seeds
    "ir",       // graph, ops, shapes, cost
    "onnx",     // read/write ONNX <-> ir
    "lowrank",  // the rewrite, rank policies, decompositions, DSO math, factor names
    "engine",   // program, autodiff, kernels
    "data",     // sources, loader, augmentation
    "report",   // the training curve (PNG)
    "train",    // the loop, optimisers, checkpoints, DSO on the program, data-parallel logic
    "dist",     // MPI: joins mpirun's world, the Collective over it (feature `mpi`)
    "runtime",  // tract: load, run, time (the leaf export and bench share)
    "export",   // BN folding, forms, validation in tract
    "inspect",  // per-layer costs of a file
    "tune",     // rank policies resolved by measurement (--ranks latency=F)
    "bench",    // elrt bench
    "pipeline", // one entry function per stage, typed options (the binary calls it)
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source with comments and the contents of string and char literals blanked (newlines
/// kept, so line numbers hold).
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
        if at(0) == '/' && at(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if at(0) == '/' && at(1) == '*' {
            let mut depth = 0;
            loop {
                let at = |k: usize| c.get(i + k).copied().unwrap_or('\0');
                if i >= c.len() {
                    break;
                }
                if at(0) == '/' && at(1) == '*' {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if at(0) == '*' && at(1) == '/' {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if at(0) == 'r'
            && (at(1) == '"' || at(1) == '#')
            && !c[..i]
                .last()
                .is_some_and(|p| p.is_alphanumeric() || *p == '_')
        {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let rest: String = c[j + 1..].iter().collect();
            let len = rest
                .find(&close)
                .map_or(rest.chars().count(), |b| rest[..b].chars().count());
            let end = (j + 1 + len + close.chars().count()).min(c.len());
            out.extend(c[i..end].iter().map(|&ch| blank(ch)));
            i = end;
        } else if at(0) == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < c.len() {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if at(0) == '\'' {
            // A char literal ('x', '\n', '\u{..}'), or a lifetime ('a), left as it is.
            if at(1) == '\\' {
                // Past the escaped character, which may be a quote itself ('\'').
                let mut j = i + 3;
                while j < c.len() && c[j] != '\'' {
                    j += 1;
                }
                out.extend(c[i..=j.min(c.len() - 1)].iter().map(|_| ' '));
                i = j + 1;
            } else if at(2) == '\'' {
                out.push_str("   ");
                i += 3;
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

fn ident_at(s: &str) -> &str {
    let end = s.find(|ch: char| !is_ident(ch)).unwrap_or(s.len());
    &s[..end]
}

/// The first segment of each item of a `{...}` group starting at `s[0] == '{'`.
fn group_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (k, ch) in s.char_indices() {
        match ch {
            '{' => {
                depth += 1;
                if depth == 1 {
                    item_start = true;
                }
                continue;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                item_start = true;
                continue;
            }
            _ => {}
        }
        if depth == 1 && item_start && !ch.is_whitespace() {
            item_start = false;
            let id = ident_at(&s[k..]);
            if !id.is_empty() && id != "self" {
                heads.push(id.to_string());
            }
        }
    }
    heads
}

/// A reference from code to a top-level module: (line, the module, the path as written).
type Reference = (usize, String, String);

/// The top-level modules that `code` (of a file whose module path is `module`) refers to
/// through `crate::` or through `super::` paths that climb to the crate root.
fn references(code: &str, module: &[String]) -> Vec<Reference> {
    let line_of = |pos: usize| code[..pos].matches('\n').count() + 1;
    let shown = |pos: usize| {
        let end = code[pos..]
            .find([';', '\n', '('])
            .map_or(code.len(), |e| pos + e);
        code[pos..end].trim().to_string()
    };
    // Inline modules (`mod tests { .. }`): (name, brace depth at which it opened).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let mut refs = Vec::new();
    let bytes = code.as_bytes();
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let boundary = i == 0 || !is_ident(code[..i].chars().next_back().unwrap_or(' '));
        let prev_dollar = i > 0 && bytes[i - 1] == b'$';
        if rest.starts_with('{') {
            depth += 1;
        } else if rest.starts_with('}') {
            depth = depth.saturating_sub(1);
            if inline.last().is_some_and(|(_, d)| *d == depth) {
                inline.pop();
            }
        } else if boundary && rest.starts_with("mod ") {
            let after = rest[4..].trim_start();
            let name = ident_at(after);
            let brace = after[name.len()..].trim_start();
            if !name.is_empty() && brace.starts_with('{') {
                inline.push((name.to_string(), depth));
            }
        } else if boundary && !prev_dollar && rest.starts_with("crate::") {
            let after = &rest["crate::".len()..];
            let heads = if after.starts_with('{') {
                group_heads(after)
            } else {
                vec![ident_at(after).to_string()]
            };
            for h in heads.into_iter().filter(|h| !h.is_empty()) {
                refs.push((line_of(i), h, shown(i)));
            }
            i += "crate::".len();
            continue;
        } else if boundary && rest.starts_with("super::") {
            let mut k = 0;
            let mut tail = rest;
            while let Some(t) = tail.strip_prefix("super::") {
                k += 1;
                tail = t;
            }
            let here = module.len() + inline.len();
            if k >= here {
                let heads = if tail.starts_with('{') {
                    group_heads(tail)
                } else {
                    vec![ident_at(tail).to_string()]
                };
                for h in heads.into_iter().filter(|h| !h.is_empty()) {
                    refs.push((line_of(i), h, shown(i)));
                }
            }
            i += rest.len() - tail.len();
            continue;
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    refs
}

/// `src/a/b/c.rs` -> [a, b, c]; `src/a/mod.rs` -> [a]; `src/a.rs` -> [a].
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut v: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if v.last().is_some_and(|l| l == "mod") {
        v.pop();
    }
    v
}

fn layer(name: &str) -> Option<usize> {
    LAYERS.iter().position(|&l| l == name)
}

#[test]
fn no_module_imports_one_above_it() {
    let src = src_dir();
    // Every top-level module the library declares has its place in the order.
    let lib = code_only(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            l.strip_prefix("mod ")?
                .strip_suffix(';')
                .map(str::to_string)
        })
        .collect();
    let listed: BTreeSet<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        declared, listed,
        "src/lib.rs declares these top-level modules, LAYERS in tests/module_layers.rs (and \
         docs/design.md) lists those: place each new module in the order"
    );
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &files {
        let module = module_path(&src, f);
        let own = &module[0];
        // main.rs and src/cli/ are the binary crate, on top of the whole library.
        if own == "lib" || own == "main" || own == "cli" {
            continue;
        }
        let own_layer = layer(own)
            .unwrap_or_else(|| panic!("{}: module '{own}' is not in LAYERS", f.display()));
        let code = code_only(&std::fs::read_to_string(f).unwrap());
        for (line, target, path) in references(&code, &module) {
            checked += 1;
            if target == *own {
                continue;
            }
            match layer(&target) {
                Some(t) if t < own_layer => {}
                Some(_) => violations.push(format!(
                    "{}:{line}: {own} imports {target} (`{path}`), a module above it",
                    f.strip_prefix(src.parent().unwrap()).unwrap().display()
                )),
                // `crate::SomeItem` of lib.rs, or a macro: not a module.
                None => {}
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} crate paths found: the scan is broken"
    );
    assert!(
        violations.is_empty(),
        "{} import(s) against the layer order {LAYERS:?}:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn the_scan_sees_grouped_nested_and_climbing_paths_and_skips_comments_and_strings() {
    let src = r##"
//! Uses [`crate::bench`] in a doc comment only.
use crate::ir::Graph;
use crate::{
    engine::program::Program,
    onnx::{self, read},
};
pub(crate) fn f<'a>(x: &'a str) -> char {
    let _ = "crate::tune in a string";
    let _ = r#"crate::tune in a raw "string""#;
    /* crate::tune /* nested */ crate::tune */
    let q = '"';
    let _ = ['\'', '{', '\\'];
    let _ = crate::export::export(x);
    macro_rules! m { () => { $crate::bench::x } }
    q
}
mod tests {
    use super::super::data::X;
    use super::super::super::train::Y;
}
"##;
    let code = code_only(src);
    let module = vec!["lowrank".to_string(), "orth".to_string()];
    let found: Vec<(usize, String)> = references(&code, &module)
        .into_iter()
        .map(|(l, m, _)| (l, m))
        .collect();
    let want: Vec<(usize, String)> = [
        (3, "ir"),
        (4, "engine"),
        (4, "onnx"),
        (14, "export"),
        (20, "train"),
    ]
    .iter()
    .map(|&(l, m)| (l, m.to_string()))
    .collect();
    assert_eq!(found, want);
    // A file in a folder module: `super::super::x` from src/a/b.rs reaches the crate root.
    let refs = references(
        "use super::super::export::X;",
        &["lowrank".to_string(), "rank".to_string()],
    );
    assert_eq!(refs[0].1, "export");
}
