//! End-to-end tests of `lmc probe`, `lmc export` and `lmc import` on the built-in digits: JSON,
//! CSV and Probe artifacts, caching and resuming, and the bad inputs the probe issue lists (each a
//! one-line error, a non-zero exit that is not a panic's 101).

use std::path::{Path, PathBuf};
use std::process::Command;

use lmc_probe::landscape::LandscapeCheckpoint;
use lmc_probe::{Probe, ProbeResult};
use lmc_train::artifact;
use lmc_train::fit::Run;
use serde_json::Value;

mod common;
use common::{lmc, run_err, run_ok};

fn json_of(cmd: &mut Command) -> Value {
    let o = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// Trains `n` replicates of `model` on digits into `dir/name/replicate-R.lmc`.
fn replicates(dir: &Path, name: &str, model: &str, n: usize) -> Vec<PathBuf> {
    let out = dir.join(name);
    run_ok(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                model,
                "--epochs",
                "2",
                "--lr",
                "0.05",
                "--batch-size",
                "64",
            ])
            .args(["--replicates", &n.to_string(), "--out"])
            .arg(&out),
    );
    (0..n)
        .map(|r| if n == 1 { out.clone() } else { out.join(format!("replicate-{r}.lmc")) })
        .collect()
}

fn read_run(p: &Path) -> Run {
    artifact::read::<Run>(p).unwrap().1
}

#[test]
fn interpolate_writes_json_csv_and_a_probe_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let runs = replicates(dir.path(), "reps", "mlp:16", 2);
    let out = dir.path().join("interp.lmc");
    let args = |c: &mut Command| {
        c.args(["probe", "interpolate"])
            .args(&runs)
            .args(["--alphas", "5", "--split", "both", "--train-samples", "300", "--out"])
            .arg(&out);
    };
    let mut c = lmc();
    args(&mut c);
    let v = json_of(&mut c);
    assert_eq!(v["command"], "probe interpolate");
    assert_eq!(v["cached"], false);
    let pair = &v["summary"]["result"]["pairs"][0];
    let test = &pair["curves"][0];
    assert_eq!(test["split"], "test");
    assert_eq!(pair["curves"][1]["count"], 300);
    // alpha = 0 and 1 reproduce each run's own test accuracy exactly.
    let (a, b) = (read_run(&runs[0]), read_run(&runs[1]));
    assert_eq!(test["points"][0]["accuracy"].as_f64().unwrap(), a.final_test_accuracy());
    assert_eq!(test["points"][4]["accuracy"].as_f64().unwrap(), b.final_test_accuracy());
    assert!(test["error_barrier"].as_f64().unwrap() >= 0.0);
    assert_eq!(pair["l2_distance"].as_f64().unwrap(), a.params.l2_distance(&b.params).unwrap());
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 5);
    // The artifact holds the same result and inspect prints it.
    let (_, probe) = artifact::read::<Probe>(&out).unwrap();
    assert!(matches!(probe.result, ProbeResult::Interpolation(_)));
    let o = run_ok(lmc().arg("inspect").arg(&out).arg("--json"));
    let iv: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(iv["kind"], "Probe");
    assert_eq!(iv["summary"]["probe"], "interpolate");
    // Same arguments again: reused, not recomputed.
    let mut c = lmc();
    args(&mut c);
    assert_eq!(json_of(&mut c)["cached"], true);

    // A run with itself: barrier 0, distance 0; the default output lands next to the run.
    let v = json_of(lmc().args(["probe", "interpolate"]).arg(&runs[0]).arg(&runs[0]));
    let c = &v["summary"]["result"]["pairs"][0]["curves"][0];
    assert_eq!((c["error_barrier"].as_f64(), c["loss_barrier"].as_f64()), (Some(0.0), Some(0.0)));
    let default_out = PathBuf::from(v["out"].as_str().unwrap());
    assert_eq!(default_out.parent().unwrap(), runs[0].parent().unwrap());
    assert!(default_out.exists() && default_out.with_extension("csv").exists());
}

#[test]
fn landscapes_plane_random_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let runs = replicates(dir.path(), "reps", "mlp:16", 3);
    let out = dir.path().join("plane.lmc");
    let plane_args = |c: &mut Command, out: &Path| {
        c.args(["probe", "landscape"])
            .args(&runs)
            .args(["--resolution", "5", "--samples", "200", "--out"])
            .arg(out);
    };
    let mut c = lmc();
    plane_args(&mut c, &out);
    let v = json_of(&mut c);
    let r = &v["summary"]["result"];
    assert_eq!(r["config"]["method"], "plane");
    assert_eq!(r["points"].as_array().unwrap().len(), 25);
    assert_eq!(r["config"]["x"]["min"].as_f64(), Some(-2.0));
    let anchors = r["anchors"].as_array().unwrap();
    assert!((anchors[0]["x"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert!((anchors[2]["y"].as_f64().unwrap() - 1.0).abs() < 1e-4);
    assert_eq!(std::fs::read_to_string(out.with_extension("csv")).unwrap().lines().count(), 26);

    // Resume: a checkpoint holding the first two rows of the same grid is picked up, and the
    // result is the uninterrupted one.
    let (h, mut full) = artifact::read::<Probe>(&out).unwrap();
    let ProbeResult::Landscape(l) = &mut full.result else { panic!("not a landscape") };
    let want = l.points.clone();
    l.rows_done = 2;
    l.points.truncate(10);
    let resumed = dir.path().join("resumed.lmc");
    let ckpt = LandscapeCheckpoint { landscape: l.clone(), seconds: full.seconds };
    artifact::write(&lmc_train::fit::checkpoint_path(&resumed), &ckpt, h.provenance).unwrap();
    let mut c = lmc();
    plane_args(&mut c, &resumed);
    let o = run_ok(&mut c);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resuming"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (_, back) = artifact::read::<Probe>(&resumed).unwrap();
    let ProbeResult::Landscape(lb) = back.result else { panic!("not a landscape") };
    assert_eq!(lb.points, want);
    assert!(!lmc_train::fit::checkpoint_path(&resumed).exists());

    // Random directions around one run, 1-D, custom range.
    let v = json_of(lmc().args(["probe", "landscape"]).arg(&runs[0]).args([
        "--dims",
        "1",
        "--resolution",
        "7",
        "--x-range",
        "-0.5:0.5",
        "--samples",
        "100",
    ]));
    let r = &v["summary"]["result"];
    assert_eq!(r["config"]["method"], "random");
    assert_eq!(r["points"].as_array().unwrap().len(), 7);
    assert_eq!(r["points"][3]["x"].as_f64(), Some(0.0));

    // Bad grids.
    let e = run_err(lmc().args(["probe", "landscape"]).args(&runs[..2]));
    assert!(e.contains("3 or 4 runs"), "{e}");
    let e = run_err(lmc().args(["probe", "landscape"]).arg(&runs[0]).args(["--x-range", "1:-1"]));
    assert!(e.contains("--x-range"), "{e}");
    let e = run_err(lmc().args(["probe", "landscape"]).arg(&runs[0]).args(["--resolution", "1"]));
    assert!(e.contains("--resolution"), "{e}");
}

#[test]
fn hessian_products_are_exact_by_default_and_fd_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let run = replicates(dir.path(), "relu.lmc", "mlp:8", 1);
    let probe = |extra: &[&str]| {
        let v = json_of(
            lmc()
                .args(["probe", "hessian"])
                .arg(&run[0])
                .args(["--samples", "100", "--top-k", "1", "--power-iters", "20"])
                .args(extra),
        );
        v["summary"]["result"].clone()
    };
    let exact = probe(&[]);
    assert_eq!(exact["config"]["hvp"], "Exact");
    assert!(exact["eps"].is_null(), "no finite-difference step for exact products");
    // The spectral density writes its curve next to the artifact.
    let out = dir.path().join("density.lmc");
    let d = probe(&["--density", "12", "--density-runs", "2", "--out", out.to_str().unwrap()]);
    assert_eq!(d["density"].as_array().unwrap().len(), 2);
    let curve = std::fs::read_to_string(out.with_extension("density.csv")).unwrap();
    assert!(curve.starts_with("eigenvalue,density\n"));
    assert_eq!(curve.lines().count(), 1 + 1000);
    let fd = probe(&["--hvp", "fd", "--eps-rel", "1e-3"]);
    assert_eq!(fd["config"]["hvp"], "Fd");
    assert_eq!(fd["eps"]["eps_rel"], 1e-3);
    // The step is a finite-difference setting: refused with exact products.
    let e = run_err(lmc().args(["probe", "hessian"]).arg(&run[0]).args(["--eps-rel", "1e-3"]));
    assert!(e.contains("--eps-rel") && e.contains("--hvp fd"), "{e}");
}

#[test]
fn hessian_reports_and_refuses_exact_diagonal_of_large_models() {
    let dir = tempfile::tempdir().unwrap();
    let small = replicates(dir.path(), "softmax.lmc", "mlp:", 1);
    let out = dir.path().join("h.lmc");
    let v = json_of(
        lmc()
            .args(["probe", "hessian"])
            .arg(&small[0])
            .args([
                "--samples",
                "300",
                "--trace",
                "--max-samples",
                "60",
                "--tol",
                "0",
                "--top-k",
                "2",
                "--exact-diag",
                "--out",
            ])
            .arg(&out),
    );
    let r = &v["summary"]["result"];
    assert_eq!(r["samples"], 300);
    assert_eq!(r["parameters"], 650);
    assert_eq!(r["trace"]["samples"], 60);
    assert_eq!(r["diagonal_source"], "exact");
    assert!(r["diagonal"].is_null(), "the per-parameter diagonal stays out of the JSON");
    let (exact, est, se) = (
        r["exact_trace"].as_f64().unwrap(),
        r["trace"]["trace"].as_f64().unwrap(),
        r["trace"]["trace_se"].as_f64().unwrap(),
    );
    assert!((exact - est).abs() <= 3.0 * se, "{exact} vs {est} +- {se}");
    let ev = r["eigenvalues"].as_array().unwrap();
    assert!(ev[0]["value"].as_f64().unwrap() >= ev[1]["value"].as_f64().unwrap());
    assert!(r["timing"]["hvp_in_gradients"].as_f64().unwrap() > 0.0);
    let layers = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    assert!(layers.starts_with("tensor,kind,size,kept,trace,"));
    assert_eq!(layers.lines().count(), 1 + 2 + 2);
    let samples = std::fs::read_to_string(out.with_extension("samples.csv")).unwrap();
    assert_eq!(samples.lines().count(), 1 + 60 + 2);
    // The artifact keeps the diagonal.
    let (_, p) = artifact::read::<Probe>(&out).unwrap();
    let ProbeResult::Hessian(h) = p.result else { panic!("not a Hessian probe") };
    assert_eq!(h.diagonal.unwrap().len(), 650);

    let big = replicates(dir.path(), "big.lmc", "mlp:256", 1);
    let e = run_err(lmc().args(["probe", "hessian"]).arg(&big[0]).args([
        "--exact-diag",
        "--samples",
        "64",
    ]));
    assert!(e.contains("19210 parameters") && e.contains("limit of 10000"), "{e}");
}

#[test]
fn export_import_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let runs = replicates(dir.path(), "r.lmc", "mlp:16", 1);
    let st = dir.path().join("r.safetensors");
    let v = json_of(lmc().arg("export").arg(&runs[0]).arg("--to").arg(&st));
    assert_eq!(v["tensors"], 6);
    let back = dir.path().join("back.lmc");
    run_ok(lmc().arg("import").arg(&st).arg("--out").arg(&back));
    let (a, b) = (read_run(&runs[0]), read_run(&back));
    assert_eq!(a.params, b.params);
    assert_eq!(a.mask, b.mask);
    assert_eq!(
        (a.model, a.dataset, a.start, a.data_seed),
        (b.model.clone(), b.dataset.clone(), b.start, b.data_seed)
    );
    // The imported run probes like the original: interpolating the two gives barrier 0.
    let v = json_of(
        lmc().args(["probe", "interpolate"]).arg(&runs[0]).arg(&back).args(["--alphas", "3"]),
    );
    assert_eq!(
        v["summary"]["result"]["pairs"][0]["curves"][0]["error_barrier"].as_f64(),
        Some(0.0)
    );

    // A plain state dict (no masks, no lmc metadata needed) with --like or --model/--dataset.
    let plain = dir.path().join("plain.safetensors");
    run_ok(lmc().arg("export").arg(&runs[0]).arg("--to").arg(&plain).arg("--no-mask"));
    let like = dir.path().join("like.lmc");
    run_ok(lmc().arg("import").arg(&plain).arg("--out").arg(&like).arg("--like").arg(&runs[0]));
    assert_eq!(read_run(&like).params, b.params);
    let named = dir.path().join("named.lmc");
    run_ok(lmc().arg("import").arg(&plain).arg("--out").arg(&named).args([
        "--model",
        "mlp:16",
        "--dataset",
        "digits",
    ]));
    assert_eq!(read_run(&named).params, b.params);
    // The wrong architecture names the tensor and both shapes.
    let e =
        run_err(lmc().arg("import").arg(&plain).arg("--out").arg(dir.path().join("x.lmc")).args([
            "--model",
            "mlp:8",
            "--dataset",
            "digits",
        ]));
    assert!(
        e.contains("plain.safetensors")
            && e.contains("fc_layers.0.weight")
            && e.contains("[16, 64]")
            && e.contains("[8, 64]"),
        "{e}"
    );
    let e = run_err(lmc().arg("import").arg(&runs[0]).arg("--out").arg(dir.path().join("y.lmc")));
    assert!(e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn mismatched_runs_and_empty_grids_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = replicates(dir.path(), "a.lmc", "mlp:16", 1);
    let b = replicates(dir.path(), "b.lmc", "mlp:8", 1);
    let e = run_err(lmc().args(["probe", "interpolate"]).arg(&a[0]).arg(&b[0]));
    assert!(e.contains("one architecture") && e.contains("mlp:8") && e.contains("mlp:16"), "{e}");
    // Same architecture, another mask.
    let (h, mut run) = artifact::read::<Run>(&a[0]).unwrap();
    run.mask.keep[5] = false;
    run.params.data[5] = 0.0;
    let masked = dir.path().join("masked.lmc");
    artifact::write(&masked, &run, h.provenance).unwrap();
    let e = run_err(lmc().args(["probe", "interpolate"]).arg(&a[0]).arg(&masked));
    assert!(e.contains("different masks") && e.contains("1 of 1210"), "{e}");
    let e = run_err(
        lmc().args(["probe", "landscape", "--method", "plane"]).arg(&a[0]).arg(&a[0]).arg(&b[0]),
    );
    assert!(e.contains("one architecture"), "{e}");
    let e =
        run_err(lmc().args(["probe", "interpolate"]).arg(&a[0]).arg(&a[0]).args(["--alphas", "0"]));
    assert!(e.contains("--alphas") && e.contains("empty"), "{e}");
    for flag in ["--test-samples", "--train-samples"] {
        let e =
            run_err(lmc().args(["probe", "interpolate"]).arg(&a[0]).arg(&a[0]).args([flag, "0"]));
        assert!(e.contains(flag) && e.contains("empty"), "{e}");
    }
    let e = run_err(lmc().args(["probe", "interpolate"]).arg(&a[0]).arg(&a[0]).args([
        "--dataset",
        "mnist",
        "--data-dir",
        "/nonexistent/lmc-data",
    ]));
    assert!(e.contains("/nonexistent/lmc-data"), "{e}");
    let e = run_err(lmc().args(["probe", "hessian"]).arg(&a[0]).args(["--mask-from"]).arg(&b[0]));
    assert!(e.contains("--mask-from"), "{e}");
    let e = run_err(lmc().args(["probe", "hessian"]).arg(dir.path().join("missing.lmc")));
    assert!(e.contains("missing.lmc"), "{e}");
}
