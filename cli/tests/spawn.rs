//! `lmc train --spawn-step K`: the parent is trained once and reused, its state at step K is
//! IMP's `--rewind-step K` point for the same seed, the children are spawned from it, and bad
//! spawn settings are one-line errors.

use std::path::Path;

use lmc_prune::ticket::Ticket;
use lmc_train::artifact;
use lmc_train::fit::{Run, Start};
use serde_json::Value;

mod common;
use common::{lmc, run_err, run_ok};

const SPEC: &str = "resnet:depth=8,width=4";
const RECIPE: [&str; 8] = ["--epochs", "2", "--batch-size", "64", "--lr", "0.05", "--seed", "3"];

fn train(out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = lmc();
    c.args(["train", "--dataset", "digits", "--model", SPEC]).args(RECIPE).args(extra);
    c.arg("--out").arg(out);
    c
}

fn json(cmd: &mut std::process::Command) -> Value {
    serde_json::from_slice(&run_ok(cmd.arg("--json")).stdout).unwrap()
}

#[test]
fn spawned_replicates_share_a_parent_that_is_imps_rewind_point() {
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let spawn = ["--replicates", "2", "--spawn-step", "30"];
    let first = json(&mut train(&runs, &spawn));
    assert_eq!(first["spawn_step"], 30);
    assert_eq!(first["parent"]["cached"], false);
    let parent_path = runs.join("parent-step-30.lmc");
    let (_, parent) = artifact::read::<Run>(&parent_path).unwrap();
    assert_eq!(parent.curve.last().unwrap().steps, 30);
    let child =
        |r: usize| artifact::read::<Run>(&runs.join(format!("replicate-{r}.lmc"))).unwrap().1;
    let (c0, c1) = (child(0), child(1));
    for c in [&c0, &c1] {
        let Start::Spawned { step, parent_data_seed, .. } = c.start else {
            panic!("a spawned child records its parent: {:?}", c.start)
        };
        assert_eq!((step, parent_data_seed), (30, 3));
        // 2 epochs of 23 steps: the child trained steps 30..46 after the parent's 30.
        assert_eq!(c.curve.last().unwrap().steps, 46);
    }
    assert_eq!((c0.data_seed, c1.data_seed), (3, 4));
    assert!(c0.params != c1.params, "different data orders after step 30");
    // IMP with --rewind-step 30 and the same seed and recipe rewinds to the parent's state,
    // running statistics included.
    let imp = dir.path().join("imp");
    run_ok(
        lmc()
            .args(["prune", "--dataset", "digits", "--model", SPEC])
            .args(RECIPE)
            .args(["--rounds", "1", "--rewind-step", "30", "--out-dir"])
            .arg(&imp),
    );
    // Round 0's ticket holds the rewind point itself (later rounds keep the trained network's
    // values where --rewind weights does not rewind).
    let (_, ticket) = artifact::read::<Ticket>(&imp.join("round-00.lmc")).unwrap();
    assert_eq!(ticket.rewind_step, 30);
    let state = ticket.rewind.layout.trainable_total();
    assert!(state < ticket.rewind.data.len(), "the ResNet has running statistics");
    assert!(ticket.rewind.data == parent.params.data, "the parent is IMP's rewind point");
    // A rerun is cached, parent and children; more replicates reuse the parent.
    let again = json(&mut train(&runs, &spawn));
    assert_eq!(again["parent"]["cached"], true);
    assert!(again["replicates"].as_array().unwrap().iter().all(|r| r["cached"] == true));
    let more = json(&mut train(&runs, &["--replicates", "3", "--spawn-step", "30"]));
    assert_eq!(more["parent"]["cached"], true);
    assert_eq!(more["replicates"][2]["cached"], false);
}

#[test]
fn bad_spawn_settings_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.lmc");
    let err = run_err(&mut train(&out, &["--spawn-step", "46"]));
    assert!(err.contains("--spawn-step 46") && err.contains("only 46 steps"), "{err}");
    let err = run_err(&mut train(&out, &["--spawn-step", "40", "--schedule", "multistep:0.5"]));
    assert!(err.contains("--spawn-step 40") && err.contains("milestone"), "{err}");
    let err = run_err(&mut train(&out, &["--parent-data-seed", "2"]));
    assert!(err.contains("--parent-data-seed") && err.contains("--spawn-step"), "{err}");
    assert!(!out.exists());
    // One output file: the parent sits beside it.
    run_ok(&mut train(&out, &["--spawn-step", "5"]));
    assert!(dir.path().join("x.parent-step-5.lmc").is_file() && out.is_file());
}
