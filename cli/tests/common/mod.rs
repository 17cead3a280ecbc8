//! Helpers shared by the CLI integration tests: run the `lmc` binary and check how it ends.
#![allow(dead_code)] // each test file uses its own subset

use std::process::{Command, Output};

/// The `lmc` binary under test.
pub fn lmc() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lmc"))
}

/// Runs a command that must succeed; returns its output.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs a command that must fail cleanly: non-zero exit that is not a panic's 101, no panic
/// message, and exactly one line on stderr, which it returns.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let code = out.status.code().unwrap();
    assert!(code != 0 && code != 101, "exit code {code}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected a one-line error, got: {err}");
    lines[0].to_string()
}
