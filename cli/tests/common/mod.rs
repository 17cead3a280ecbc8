//! Helpers shared by the CLI integration tests: run the `lmc` binary and check how it ends.
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{self, DatasetName, Pixels, SyntheticSet};

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

/// The built-in digits' training images at `idx`, stored normalised as a Dataset artifact named
/// `name` at `path` (the form `lmc distill` writes); returns the set.
pub fn digits_subset_set(path: &Path, name: &str, idx: &[usize]) -> SyntheticSet {
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let sub = ds.train.subset(idx);
    let Pixels::U8 { data, scale } = &sub.pixels else { panic!("digits are stored as bytes") };
    let (m, s) = (ds.norm.mean[0], ds.norm.std[0]);
    let px = data.iter().map(|&b| (b as f32 * scale - m) / s).collect();
    let set = SyntheticSet {
        name: name.into(),
        base: DatasetName::Digits,
        images: data::ImageSet { shape: sub.shape, pixels: Pixels::F32(px), labels: sub.labels },
        factor: 1,
        norm: ds.norm.clone(),
        class_names: ds.class_names.clone(),
        recipe: "{}".into(),
    };
    artifact::write(path, &set, Provenance::of("test-set", &1, &[])).unwrap();
    set
}
