//! `lmc bench --vs-torch`: the side-by-side run against PyTorch's reference script. Its bad
//! inputs always; the whole alternation against the real script where `../shared/bench` and
//! PyTorch are there (the suite passes without them: see `side_by_side_with_the_real_script`).

use std::path::PathBuf;
use std::process::Command;

mod common;
use common::{lmc, run_err, run_ok};

/// The quickest workload, one repeat of a few steps: what these tests time is beside the point.
const QUICK: [&str; 7] =
    ["--only", "lenet_mnist_b128", "--scale", "0.02", "--repeats", "1", "--threads"];

#[test]
fn a_missing_script_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("torch_reference.py");
    let e = run_err(lmc().args(["bench", "--vs-torch"]).arg(&script).args(QUICK).arg("1"));
    assert!(
        e.contains("--vs-torch") && e.contains("torch_reference.py") && e.contains("no such file"),
        "{e}"
    );
}

#[test]
fn a_failing_interpreter_is_reported_in_one_line() {
    // `false` stands where Python would: a real process that exits 1 without output, as a
    // Python without torch does (after its traceback).
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("torch_reference.py");
    std::fs::write(&script, "print('never run')\n").unwrap();
    let e = run_err(
        lmc().args(["bench", "--python", "false", "--vs-torch"]).arg(&script).args(QUICK).arg("1"),
    );
    assert!(e.contains("`false ") && e.contains("torch_reference.py` failed"), "{e}");
}

#[test]
fn rounds_need_a_script_and_at_least_one() {
    let out = lmc().args(["bench", "--rounds", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vs-torch"));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("torch_reference.py");
    std::fs::write(&script, "").unwrap();
    let e = run_err(
        lmc().args(["bench", "--rounds", "0", "--vs-torch"]).arg(&script).args(QUICK).arg("1"),
    );
    assert!(e.contains("--rounds 0"), "{e}");
}

/// The reference script beside this repository (`../shared/bench/torch_reference.py`), if it
/// and a Python with torch are there.
fn reference_script() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/torch_reference.py");
    let torch = Command::new("python3").args(["-c", "import torch"]).output();
    (p.is_file() && torch.is_ok_and(|o| o.status.success())).then_some(p)
}

#[test]
fn side_by_side_with_the_real_script() {
    let Some(script) = reference_script() else {
        eprintln!(
            "skipped: no ../shared/bench/torch_reference.py or no PyTorch beside this checkout"
        );
        return;
    };
    let out = run_ok(
        lmc()
            .args(["bench", "--json", "--rounds", "2", "--vs-torch"])
            .arg(&script)
            .args(QUICK)
            .arg("1"),
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let w = &v["workloads"]["lenet_mnist_b128"];
    let f = |k: &str| -> Vec<f64> {
        w[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    };
    let (l, t, r) = (f("lmc"), f("torch"), f("adjacent_ratios"));
    assert_eq!((l.len(), t.len()), (3, 2), "lmc first and last around 2 PyTorch runs");
    assert!(l.iter().chain(&t).all(|x| x.is_finite() && *x > 0.0));
    // Within 1e-12: serde_json's default parser may read a printed float back one ulp off.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    let want = [l[0] / t[0], l[1] / t[0], l[1] / t[1], l[2] / t[1]];
    assert!(r.iter().zip(&want).all(|(a, b)| close(*a, *b)), "{r:?} against {want:?}");
    let mut s = want.to_vec();
    s.sort_by(f64::total_cmp);
    assert!(close(w["median_ratio"].as_f64().unwrap(), (s[1] + s[2]) / 2.0), "{v}");
    assert!(v["torch_engine"].as_str().unwrap().starts_with("torch "), "{v}");
    assert!(v["host"].as_str().unwrap().contains(" UTC, "), "{v}");
    // Peak memory from the kernel for each process: a Python that has imported torch holds
    // well over 100 MB (1.1-1.2 GB measured); lmc after LeNet between 1 MB and 2 GB.
    let rss = |k: &str| -> Vec<u64> {
        v["peak_rss_bytes"][k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
    };
    assert!(rss("torch").iter().all(|&b| b > 100_000_000), "{v}");
    assert!(rss("lmc").iter().all(|&b| b > 1_000_000 && b < 2_000_000_000), "{v}");
}
