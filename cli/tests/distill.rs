//! End-to-end tests of `lmc distill` on the built-in digits: the artifact, its PNG and JSON
//! summary, using it as `--dataset`, evaluation, resuming a killed run, and every bad input the
//! issue lists (one clear line, no panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use lmc_train::artifact;
use lmc_train::data::SyntheticSet;

mod common;
use common::{lmc, run_err, run_ok};

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A small, fast distillation of digits.
fn distill(out: &Path) -> Command {
    let mut c = lmc();
    c.args([
        "distill",
        "--dataset",
        "digits",
        "--model",
        "convnet:depth=1,width=4",
        "--ipc",
        "2",
        "--batch-real",
        "8",
        "--seed",
        "1",
        "--out",
    ])
    .arg(out);
    c
}

#[test]
fn distill_writes_a_dataset_png_and_json_that_train_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("syn.lmc");
    let o = run_ok(distill(&out).args(["--iterations", "20", "--factor", "2", "--json"]));
    let v = json(&o);
    assert_eq!(v["method"], "dm");
    assert_eq!(v["ipc"], 2);
    assert_eq!(v["iterations"], 20);
    assert_eq!(v["dsa"], "color_crop_cutout_scale_rotate"); // no flip on digits
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    // Per iteration: 10 classes x 8 real + 10 x 2 stored x 4 decoded synthetic.
    assert_eq!(v["images_processed"], 20 * (80 + 80));
    assert!(v.get("test_accuracy_mean").is_none());
    let png = dir.path().join("syn.png");
    assert_eq!(PathBuf::from(v["png"].as_str().unwrap()), png);
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    let (_, set) = artifact::read::<SyntheticSet>(&out).unwrap();
    assert_eq!((set.images.len(), set.factor, set.decoded_len()), (20, 2, 80));

    // Inspect summarises it; train takes it as --dataset (80 decoded images per epoch).
    let v = json(&run_ok(lmc().arg("inspect").arg(&out).arg("--json")));
    assert_eq!(v["kind"], "Dataset");
    assert_eq!(v["summary"]["training_images"], 80);
    assert_eq!(v["summary"]["method"], "dm");
    let run = dir.path().join("run.lmc");
    let o = run_ok(
        lmc()
            .args(["train", "--model", "mlp:16", "--epochs", "2", "--json", "--dataset"])
            .arg(&out)
            .arg("--out")
            .arg(&run),
    );
    assert_eq!(json(&o)["replicates"][0]["images_seen"], 2 * 80);

    // Same arguments again: up to date, not redone.
    let v = json(&run_ok(distill(&out).args(["--iterations", "20", "--factor", "2", "--json"])));
    assert_eq!(v["cached"], true);
}

#[test]
fn evaluation_reports_mean_and_std() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("syn.lmc");
    let o = run_ok(distill(&out).args([
        "--iterations",
        "5",
        "--eval-models",
        "2",
        "--eval-epochs",
        "3",
        "--eval-model",
        "mlp:16",
        "--eval-baseline",
        "--json",
    ]));
    let v = json(&o);
    for k in ["test_accuracy_mean", "test_accuracy_std", "baseline_test_accuracy_mean"] {
        let x = v[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {v}"));
        assert!((0.0..=1.0).contains(&x), "{k} = {x}");
    }
    assert_eq!(v["test_accuracies"].as_array().unwrap().len(), 2);
    assert_eq!(v["eval_epochs"], 3);
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_result() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--iterations", "1500", "--checkpoint-every", "1", "--json"];
    let whole = dir.path().join("whole.lmc");
    run_ok(distill(&whole).args(args));

    let cut = dir.path().join("cut.lmc");
    let ckpt = dir.path().join("cut.lmc.ckpt");
    let mut child =
        distill(&cut).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !ckpt.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ckpt.exists() && !cut.exists(), "the run finished before it could be killed");
    let v = json(&run_ok(distill(&cut).args(args)));
    assert!(v["resumed_from"].as_u64().unwrap() > 0, "{v}");
    let a = artifact::read::<SyntheticSet>(&whole).unwrap();
    let b = artifact::read::<SyntheticSet>(&cut).unwrap();
    assert_eq!(a.0.provenance, b.0.provenance);
    assert_eq!(a.1.images, b.1.images);
    assert!(!ckpt.exists());
}

#[test]
fn bad_inputs_give_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("syn.lmc");
    // The smallest digits class has 140 training images.
    let e =
        run_err(lmc().args(["distill", "--dataset", "digits", "--ipc", "500", "--out"]).arg(&out));
    assert!(e.contains("--ipc 500") && e.contains("has only"), "{e}");
    let e = run_err(distill(&out).args(["--factor", "3"]));
    assert!(e.contains("--factor 3 does not divide the 8x8"), "{e}");
    let e = run_err(distill(&out).args(["--dsa", "color_crop_blur"]));
    assert!(e.contains("unknown augmentation 'blur'"), "{e}");
    let e = run_err(distill(&out).args(["--method", "mtt"]));
    assert!(e.contains("--method 'mtt'"), "{e}");
    assert!(!out.exists());

    // A Run artifact is not a dataset, for distill and for train.
    let run = dir.path().join("run.lmc");
    run_ok(
        lmc()
            .args(["train", "--dataset", "digits", "--model", "mlp:8", "--epochs", "1", "--out"])
            .arg(&run),
    );
    for cmd in
        [vec!["distill", "--out", "x.lmc"], vec!["train", "--model", "mlp:8", "--out", "y.lmc"]]
    {
        let e = run_err(lmc().current_dir(dir.path()).args(&cmd).arg("--dataset").arg(&run));
        assert!(
            e.contains("run.lmc") && e.contains("is a Run artifact, expected a Dataset"),
            "{e}"
        );
    }
}

/// Gradient matching's mixed derivative: `auto` is exact on a ConvNet (the same set as
/// `--mixed exact`, another than finite differences, with one network pass fewer per class),
/// and finite differences on a ResNet with batch norm, where `--mixed exact` is the exact pass
/// in training mode.
#[test]
fn gm_takes_its_mixed_derivative_exactly_where_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let gm = |out: &str, model: &str, mixed: &str| {
        let mut c = lmc();
        c.args(["distill", "--dataset", "digits", "--model", model, "--method", "gm"])
            .args(["--ipc", "1", "--batch-real", "8", "--iterations", "1", "--inner-loop", "2"])
            .args(["--net-steps", "1", "--net-batch", "16", "--mixed", mixed, "--json", "--out"])
            .arg(dir.path().join(out));
        c
    };
    let set = |out: &str| artifact::read::<SyntheticSet>(&dir.path().join(out)).unwrap().1;
    let auto = json(&run_ok(&mut gm("auto.lmc", "convnet:depth=1,width=4", "auto")));
    let exact = json(&run_ok(&mut gm("exact.lmc", "convnet:depth=1,width=4", "exact")));
    let fd = json(&run_ok(&mut gm("fd.lmc", "convnet:depth=1,width=4", "fd")));
    assert_eq!(set("auto.lmc").images, set("exact.lmc").images);
    assert_ne!(set("exact.lmc").images, set("fd.lmc").images);
    assert_eq!(auto["config"]["mixed"], "auto");
    // Per matching step and class: the real batch, then 1 + 1 synthetic passes exact, 1 + 2
    // by finite differences (1 image per class here).
    let matching = |v: &serde_json::Value| v["images_processed"].as_u64().unwrap();
    assert_eq!(matching(&fd) - matching(&exact), 2 * 10);
    run_ok(&mut gm("resnet.lmc", "resnet:depth=8,width=2", "auto"));
    run_ok(&mut gm("resnet-fd.lmc", "resnet:depth=8,width=2", "fd"));
    run_ok(&mut gm("resnet-exact.lmc", "resnet:depth=8,width=2", "exact"));
    assert_eq!(set("resnet.lmc").images, set("resnet-fd.lmc").images);
    assert_ne!(set("resnet.lmc").images, set("resnet-exact.lmc").images);
    let e = run_err(&mut gm("bad.lmc", "convnet:depth=1,width=4", "double"));
    assert!(e.contains("--mixed 'double'"), "{e}");
}
