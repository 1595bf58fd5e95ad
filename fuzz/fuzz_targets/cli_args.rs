//! libFuzzer target: argument vectors from the CLI's grammar (its real subcommands and flags,
//! values past every limit, the input's own bytes) through clap and the value parsers. See
//! tests/fuzzing/mod.rs (`cli_pipeline`).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/fuzzing/mod.rs"]
mod fuzzing;

type Grammar = (Vec<String>, Vec<Vec<String>>);

fn grammar() -> &'static Grammar {
    static G: OnceLock<Grammar> = OnceLock::new();
    G.get_or_init(fuzzing::grammar)
}

fuzz_target!(|data: &[u8]| {
    let (subs, flags) = grammar();
    let argv = fuzzing::argv_from_bytes(data, subs, flags);
    if let Some(e) = fuzzing::cli_pipeline(&argv) {
        fuzzing::assert_one_line(&argv, &e);
    }
});
