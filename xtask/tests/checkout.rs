//! The xtask binary as a user runs it: which checkout it works in, and one pipeline per output
//! folder.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The real checkout (this test's), for its presets.
fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A bare checkout in `dir`: what `root` looks for, and a `digits` preset that differs from the
/// real one in its model.
fn fake_checkout(dir: &Path) {
    std::fs::create_dir_all(dir.join("xtask")).unwrap();
    std::fs::create_dir_all(dir.join("presets")).unwrap();
    std::fs::write(dir.join("Cargo.toml"), "[workspace]\nmembers = [\"xtask\"]\n").unwrap();
    std::fs::write(dir.join("xtask/Cargo.toml"), "[package]\nname = \"xtask\"\n").unwrap();
    let real = std::fs::read_to_string(here().join("presets/digits.toml")).unwrap();
    let model = real.lines().find(|l| l.starts_with("model = ")).unwrap();
    let other = real.replace(model, "model = \"mlp:13\"");
    std::fs::write(dir.join("presets/digits.toml"), other).unwrap();
}

/// The xtask binary with `args`, run in `cwd` with `CARGO_MANIFEST_DIR` set to `manifest_dir`
/// or unset (as when the binary is run by hand).
fn xtask(cwd: &Path, manifest_dir: Option<&Path>, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_xtask"));
    c.current_dir(cwd).args(args).env_remove("CARGO_MANIFEST_DIR");
    if let Some(m) = manifest_dir {
        c.env("CARGO_MANIFEST_DIR", m);
    }
    c.output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn presets_come_from_the_checkout_it_runs_in_not_the_one_it_was_built_in() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other");
    fake_checkout(&other);
    let plan = ["pipeline", "--plan"];
    // The binary run by hand inside another checkout (a stale binary of a shared target
    // folder): that checkout's preset, not the one of the checkout that built it.
    let there = stdout(&xtask(&other.join("presets"), None, &plan));
    assert!(there.contains("mlp:13"), "{there}");
    // Run by cargo (which names the package it ran), from anywhere.
    let by_cargo = stdout(&xtask(tmp.path(), Some(&other.join("xtask")), &plan));
    assert_eq!(by_cargo, there);
    // This checkout's own preset from here.
    let mine = stdout(&xtask(&here(), None, &plan));
    assert!(!mine.contains("mlp:13"), "{mine}");
    // Outside any checkout: a one-line error, not a guess.
    let o = xtask(tmp.path(), None, &plan);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not inside an lmc checkout"), "{e}");
}

#[test]
fn a_second_pipeline_on_the_same_folder_stops_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // The first pipeline's lock (flock: held by this process as another pipeline would hold it).
    let held = lmc_train::artifact::OutputLock::acquire(&out).unwrap();
    let o = xtask(&here(), None, &["pipeline", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    let want = format!("out is being written by process {}", std::process::id());
    assert!(e.contains(&want) && e.contains("another `cargo xtask pipeline`"), "{e}");
    assert!(!out.join("stages").exists(), "nothing was started");
    drop(held);
}
