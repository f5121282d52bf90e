//! The benchmark suite (issue 5): `cargo bench --bench suite` runs `blockflash bench --mask all`
//! (every mask family, masked against dense, verified on sampled rows) and prints its table.
//!
//! It runs the built `blockflash` binary, so the table, the progress on stderr and the defaults
//! that suit the adapter are the CLI's own. Arguments after `--` go to `blockflash bench`, e.g.
//! `cargo bench --bench suite -- --seq 16384 --json suite.jsonl`. Without `--bench` (as
//! `cargo test --all-targets` runs it) it does a small smoke run at N = 256.

use std::process::{exit, Command};

fn main() {
    let mut bench = false;
    let mut args: Vec<String> = Vec::new();
    for a in std::env::args().skip(1) {
        if a == "--bench" {
            bench = true;
        } else {
            args.push(a);
        }
    }
    let mut command = Command::new(env!("CARGO_BIN_EXE_blockflash"));
    command.args(["bench", "--mask", "all"]);
    if !bench {
        command.args([
            "--seq", "256", "--batch", "1", "--heads", "1", "--repeat", "1",
        ]);
    }
    command.args(&args);
    let status = command
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", env!("CARGO_BIN_EXE_blockflash")));
    exit(status.code().unwrap_or(1));
}
