//! End-to-end tests of `lmc prune`, `lmc prune random|reinit` and `lmc train --ticket` on the
//! built-in digits with a tiny MLP (mlp:7,3: 448 + 21 + 30 = 499 prunable weights), and of every
//! bad input the pruning issue lists (one-line error, non-zero exit that is not a panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lmc_prune::{read_ticket, Ticket};
use lmc_train::artifact;
use lmc_train::data::{self, DatasetName};
use lmc_train::fit::{Run, Start};
use serde_json::Value;

mod common;
use common::{digits_subset_set, lmc, run_err};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/fixtures")
}

fn run_json(cmd: &mut Command) -> Value {
    let out: Output = cmd.output().unwrap();
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

const IMP: [&str; 10] = [
    "prune",
    "--dataset",
    "digits",
    "--model",
    "mlp:7,3",
    "--lr",
    "0.05",
    "--batch-size",
    "64",
    "--json",
];

fn imp(dir: &Path, rounds: usize, extra: &[&str]) -> Value {
    run_json(
        lmc()
            .args(IMP)
            .args(["--epochs", "1", "--rounds", &rounds.to_string()])
            .args(extra)
            .arg("--out-dir")
            .arg(dir),
    )
}

fn ticket(p: &Path) -> Ticket {
    read_ticket(p).unwrap().1
}

#[test]
fn prune_writes_a_ticket_per_round_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let v = imp(dir.path(), 3, &["--layer-rate", "fc.weight=0.1"]);
    let rounds = v["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 4);
    // Hidden layers pooled at 20%: 469 -> 375 -> 300 -> 240; output at 10%: 30 -> 27 -> 24 -> 21.
    let kept = [469 + 30, 375 + 27, 300 + 24, 240 + 21];
    for (r, row) in rounds.iter().enumerate() {
        assert_eq!(row["round"], r);
        assert_eq!(row["kept"], kept[r]);
        let sparsity = row["sparsity"].as_f64().unwrap();
        assert!((sparsity - (1.0 - kept[r] as f64 / 499.0)).abs() < 1e-12);
        assert_eq!(row["images_processed"], (r as u64 + 1) * 1437);
        let acc = row["test_accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        assert!(row["seconds"].as_f64().unwrap() >= 0.0);
        assert_eq!(row["cached"], false);
        let p = PathBuf::from(row["path"].as_str().unwrap());
        let t = ticket(&p);
        assert_eq!(t.test_accuracy(), Some(acc));
        assert_eq!(t.round(), Some(r));
    }
    // inspect reads tickets.
    let v = run_json(lmc().arg("inspect").arg(dir.path().join("round-03.lmc")).arg("--json"));
    assert_eq!(v["kind"], "Ticket");
    assert_eq!(v["summary"]["layers"][2]["kept"], 21);
    assert_eq!(v["summary"]["found_with"]["name"], "digits");
    // Same command again: every round is up to date; one more round computes only that one.
    let v = imp(dir.path(), 4, &["--layer-rate", "fc.weight=0.1"]);
    let cached: Vec<bool> =
        v["rounds"].as_array().unwrap().iter().map(|r| r["cached"].as_bool().unwrap()).collect();
    assert_eq!(cached, [true, true, true, true, false]);
    assert_eq!(v["rounds"][4]["kept"], 192 + 18);
}

#[test]
fn train_ticket_trains_replicates_and_baselines_work() {
    let dir = tempfile::tempdir().unwrap();
    imp(dir.path(), 2, &["--keep-unpruned", "fc.weight"]);
    let tpath = dir.path().join("round-02.lmc");
    let t = ticket(&tpath);
    // 469 -> 375 -> 300 pooled, output dense.
    assert_eq!(t.layers.iter().map(|l| l.kept).sum::<usize>(), 300 + 30);

    // Two replicates of the ticket: same start and mask, different data order; pruned weights 0.
    let reps = dir.path().join("reps");
    let v = run_json(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--lr",
                "0.05",
                "--replicates",
                "2",
                "--json",
                "--ticket",
            ])
            .arg(&tpath)
            .arg("--out")
            .arg(&reps),
    );
    assert!((v["sparsity"].as_f64().unwrap() - t.sparsity).abs() < 1e-12);
    let runs: Vec<Run> = (0..2)
        .map(|r| artifact::read::<Run>(&reps.join(format!("replicate-{r}.lmc"))).unwrap().1)
        .collect();
    for run in &runs {
        assert_eq!(run.mask, t.mask);
        assert!(matches!(run.start, Start::Given { init_seed: 0, .. }));
        assert!(run.params.data.iter().zip(&t.mask.keep).all(|(p, k)| *k || *p == 0.0));
    }
    assert_ne!(runs[0].data_seed, runs[1].data_seed);
    assert_ne!(runs[0].params.data, runs[1].params.data);

    // Random mask, per layer and global.
    let rl = dir.path().join("random-layerwise.lmc");
    let v = run_json(
        lmc()
            .args(["prune", "random", "--layerwise", "--json", "--like"])
            .arg(&tpath)
            .arg("--out")
            .arg(&rl),
    );
    assert_eq!(v["layers"][0]["kept"], t.layers[0].kept);
    assert_eq!(v["layers"][1]["kept"], t.layers[1].kept);
    let r = ticket(&rl);
    assert_eq!(r.layers, t.layers);
    assert_ne!(r.mask, t.mask);
    let rg = dir.path().join("random-global.lmc");
    run_json(
        lmc()
            .args(["prune", "random", "--seed", "3", "--json", "--like"])
            .arg(&tpath)
            .arg("--out")
            .arg(&rg),
    );
    let g = ticket(&rg);
    assert!((g.sparsity - t.sparsity).abs() < 1e-12);
    assert_eq!(g.layers[2].kept, 30);
    // Re-initialisation: same mask, init seed + 1 by default.
    let re = dir.path().join("reinit.lmc");
    run_json(lmc().args(["prune", "reinit", "--json", "--like"]).arg(&tpath).arg("--out").arg(&re));
    let re = ticket(&re);
    assert_eq!(re.mask, t.mask);
    assert_eq!(re.init_seed, 1);
    assert_ne!(re.rewind, t.rewind);
    // Baselines train like any ticket.
    let v = run_json(
        lmc()
            .args(["train", "--dataset", "digits", "--epochs", "1", "--json", "--ticket"])
            .arg(&rl)
            .arg("--out")
            .arg(dir.path().join("rl-run.lmc")),
    );
    assert!(v["replicates"][0]["test_accuracy"].as_f64().unwrap() > 0.0);
}

/// 10 real digits per class, stored normalised as a Dataset artifact (what `lmc distill` writes).
fn tiny_train_set(path: &Path) {
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let mut idx = Vec::new();
    for c in 0..10u8 {
        idx.extend(
            ds.train.labels.iter().enumerate().filter(|(_, &l)| l == c).take(10).map(|(i, _)| i),
        );
    }
    digits_subset_set(path, "digits-real-ipc10", &idx);
}

#[test]
fn train_set_and_from_ticket() {
    let dir = tempfile::tempdir().unwrap();
    let syn = dir.path().join("syn.lmc");
    tiny_train_set(&syn);
    let d = dir.path().join("distilled");
    let v = run_json(
        lmc()
            .args(IMP)
            .args(["--rounds", "2", "--epochs", "5", "--train-set"])
            .arg(&syn)
            .arg("--out-dir")
            .arg(&d),
    );
    // 100 images x 5 epochs per round.
    let imgs: Vec<u64> = v["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["images_processed"].as_u64().unwrap())
        .collect();
    assert_eq!(imgs, [500, 1000, 1500]);
    let t = ticket(&d.join("round-02.lmc"));
    assert_eq!(t.found_with.name, "digits-real-ipc10");
    assert_eq!(t.found_with.train_images, 100);
    // Tested on the real test split (360 images): accuracy is a multiple of 1/360.
    let acc = t.test_accuracy().unwrap() * 360.0;
    assert!((acc - acc.round()).abs() < 1e-6);

    // Distilled then IMP: continue on real data from the round-2 ticket.
    let r = dir.path().join("real");
    let v = run_json(
        lmc()
            .args([
                "prune",
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--lr",
                "0.05",
                "--rounds",
                "1",
                "--json",
                "--from-ticket",
            ])
            .arg(d.join("round-02.lmc"))
            .arg("--out-dir")
            .arg(&r),
    );
    let rows = v["rounds"].as_array().unwrap();
    // Round 0 keeps the parent's mask (global over all three layers: 499 -> 399 -> 319), round 1
    // prunes ceil(319 / 5) = 64 more.
    assert_eq!(rows[0]["kept"], 319);
    assert_eq!(rows[1]["kept"], 255);
    assert_eq!(rows[0]["images_processed"], 1500 + 1437);
    assert_eq!(rows[1]["images_processed"], 1500 + 2 * 1437);
    let child = ticket(&r.join("round-00.lmc"));
    assert_eq!(child.mask, t.mask);
    assert_eq!(child.rewind, t.rewind);
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let bad = |extra: &[&str]| {
        run_err(lmc().args(IMP).args(["--rounds", "1"]).args(extra).arg("--out-dir").arg(&out))
    };
    assert!(bad(&["--rate", "1.5"]).contains("--rate 1.5"));
    assert!(bad(&["--rate", "0"]).contains("--rate 0"));
    assert!(bad(&["--rate=-0.2"]).contains("--rate -0.2"));
    let e = bad(&["--layer-rate", "fc.wieght=0.1"]);
    assert!(
        e.contains("unknown layer") && e.contains("fc.wieght") && e.contains("fc.weight"),
        "{e}"
    );
    assert!(bad(&["--layer-rate", "fc.weight"]).contains("NAME=RATE"));
    assert!(bad(&["--layer-rate", "fc.weight=2"]).contains("fc.weight"));
    let e = bad(&["--keep-unpruned", "fc.bias"]);
    assert!(e.contains("fc.bias") && e.contains("not a prunable"), "{e}");
    assert!(bad(&["--keep-unpruned", "conv9.weight"]).contains("unknown layer"));
    assert!(!out.exists(), "nothing is written for bad input");

    // A ticket for another model.
    imp(dir.path(), 0, &[]);
    let t = dir.path().join("round-00.lmc");
    let e = run_err(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp:8",
                "--out",
                "/tmp/never.lmc",
                "--ticket",
            ])
            .arg(&t),
    );
    assert!(e.contains("round-00.lmc") && e.contains("mlp:7,3") && e.contains("mlp:8"), "{e}");
    let e = run_err(
        lmc()
            .args(["train", "--dataset", "mnist", "--out", "/tmp/never.lmc", "--data-dir"])
            .arg(fixtures())
            .arg("--ticket")
            .arg(&t),
    );
    assert!(e.contains("1x8x8") && e.contains("1x28x28"), "{e}");
    let e = run_err(
        lmc()
            .args(["prune", "--dataset", "mnist", "--rounds", "1", "--data-dir"])
            .arg(fixtures())
            .arg("--from-ticket")
            .arg(&t)
            .arg("--out-dir")
            .arg(&out),
    );
    assert!(e.contains("round-00.lmc") && e.contains("28x28"), "{e}");
    let e = run_err(
        lmc()
            .args([
                "prune",
                "--dataset",
                "digits",
                "--rounds",
                "1",
                "--model",
                "mlp:9",
                "--from-ticket",
            ])
            .arg(&t)
            .arg("--out-dir")
            .arg(&out),
    );
    assert!(e.contains("mlp:9"), "{e}");
    // Not a ticket.
    let run = dir.path().join("run.lmc");
    run_json(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp:4",
                "--epochs",
                "1",
                "--json",
                "--out",
            ])
            .arg(&run),
    );
    let e = run_err(
        lmc()
            .args(["prune", "random", "--like"])
            .arg(&run)
            .arg("--out")
            .arg(dir.path().join("r.lmc")),
    );
    assert!(e.contains("is a Run artifact, expected a Ticket"), "{e}");
    let e = run_err(lmc().args([
        "prune",
        "reinit",
        "--like",
        "/nonexistent/t.lmc",
        "--out",
        "/tmp/never.lmc",
    ]));
    assert!(e.contains("/nonexistent/t.lmc"), "{e}");
    // A distilled set of another dataset.
    let syn = dir.path().join("syn.lmc");
    tiny_train_set(&syn);
    let e = run_err(
        lmc()
            .args([
                "prune",
                "--dataset",
                "mnist",
                "--model",
                "mlp:4",
                "--rounds",
                "1",
                "--train-set",
            ])
            .arg(&syn)
            .arg("--data-dir")
            .arg(fixtures())
            .arg("--out-dir")
            .arg(&out),
    );
    assert!(e.contains("syn.lmc") && e.contains("digits"), "{e}");
    // Missing required flags are clap's usage errors (exit 2), not panics.
    let o = lmc()
        .args(["prune", "--dataset", "digits", "--model", "mlp:4", "--out-dir"])
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--rounds"));
}
