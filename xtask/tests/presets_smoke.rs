//! The ResNet presets end to end at smoke scale: each shipped preset's structure (its seeds,
//! conditions, IMP with rewinding, instability sweep, probes and report) run on a subset of the
//! built-in digits with a narrow network and a few steps, so that a preset that needs hours on
//! CIFAR-10 is known to complete before anyone spends them. A second run is all cached.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `presets/NAME.toml` shrunk: digits (200 training images), `model`, 8 SGD steps per training
/// (milestones at steps 4 and 6 as in the preset's fractions), spawn steps 1 and 2, IMP
/// rewinding to step 1, 2 seeds where the preset sweeps seeds, tiny distillation and probes
/// (running statistics re-estimated from the one batch of 128 that 200 images make).
fn smoke(name: &str, model: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(here().join(format!("presets/{name}.toml"))).unwrap();
    let mut t: toml::Table = toml::from_str(&text).unwrap();
    t.insert("dataset".into(), "digits:train=200".into());
    t.insert("model".into(), model.into());
    if t.contains_key("seeds") {
        t.insert("seeds".into(), toml::Value::Array(vec![0.into(), 1.into()]));
    }
    if t.contains_key("imp_rewind_step") {
        t.insert("imp_rewind_step".into(), 1.into());
    }
    if let Some(ins) = t.get_mut("instability").and_then(|v| v.as_table_mut()) {
        ins.insert("steps".into(), toml::Value::Array(vec![1.into(), 2.into()]));
    }
    let args = |t: &mut toml::Table, stage: &str| -> toml::Table {
        t.get(stage).and_then(|v| v.get("args")).and_then(|v| v.as_table()).cloned().unwrap()
    };
    let mut set = |stage: &str, kv: &[(&str, toml::Value)]| {
        let mut a = args(&mut t, stage);
        for (k, v) in kv {
            a.insert(k.to_string(), v.clone());
        }
        let mut outer = toml::Table::new();
        outer.insert("args".into(), toml::Value::Table(a));
        t.insert(stage.into(), toml::Value::Table(outer));
    };
    set("distill", &[("iterations", 2.into()), ("eval-epochs", 2.into())]);
    set("prune", &[("iterations", 8.into())]);
    set("train", &[("iterations", 8.into())]);
    set("prune_distilled", &[("epochs", 2.into())]);
    set("hessian", &[("samples", 32.into()), ("max-samples", 2.into())]);
    // 200 training images are one batch of 128 for re-estimating running statistics.
    set("interpolate", &[("bn-reset", 1.into())]);
    let path = dir.join(format!("{name}-smoke.toml"));
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    path
}

fn pipeline(preset: &Path, out: &Path) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(here())
        .args(["pipeline", "--preset", preset.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

fn summary(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("report/summary.json")).unwrap()).unwrap()
}

#[test]
fn the_resnet20_study_runs_end_to_end_at_smoke_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let preset = smoke("cifar10-resnet20", "resnet:depth=20,width=2", tmp.path());
    let out = tmp.path().join("out");
    pipeline(&preset, &out);
    let s = summary(&out);
    let conds: Vec<&str> = s["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["condition"].as_str().unwrap())
        .collect();
    for want in ["dense-r0-s1", "imp-rewind-r9-s0", "random-r4-s1", "dense-r0-k2-s0"] {
        assert!(conds.contains(&want), "{want} in {conds:?}");
    }
    // 2 seeds: every condition across seeds, the comparisons (distilled against imp, random,
    // imp-rewind at both sparsities; dense at k = 0 against each k), with Welch's p-values.
    let sweep = s["sweep"].as_array().unwrap();
    assert!(sweep.iter().all(|c| c["seeds"].as_array().unwrap().len() == 2));
    assert_eq!(s["comparisons"].as_array().unwrap().len(), 2 * 3 + 2);
    let report = std::fs::read_to_string(out.join("report/index.md")).unwrap();
    for section in ["## Instability", "## Differences against the seeds' spread", "## Across seeds"]
    {
        assert!(report.contains(section), "{section}");
    }
    assert!(out.join("report/barrier_vs_step.svg").is_file());
    assert!(report.contains("on the random real images they started from"), "{report}");
    assert!(report.contains("Ticket searches: real-data IMP processed"), "{report}");
    // A second run finds every stage done.
    let again = pipeline(&preset, &out);
    assert!(again.contains("(0 run, "), "{again}");
}

#[test]
fn the_resnet18_study_runs_end_to_end_at_smoke_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let preset = smoke("cifar10-resnet18", "resnet18:width=2", tmp.path());
    let out = tmp.path().join("out");
    pipeline(&preset, &out);
    let s = summary(&out);
    let conds = s["conditions"].as_array().unwrap();
    assert_eq!(conds.len(), 7, "dense + 3 methods x 2 sparsities");
    assert!(conds.iter().all(|c| c["norm_statistics"] == "both"), "with and without --bn-reset");
    let sparsity = |name: &str| {
        conds.iter().find(|c| c["condition"] == name).unwrap()["sparsity"].as_f64().unwrap()
    };
    assert!((sparsity("imp-r9") - 0.866).abs() < 0.01, "{}", sparsity("imp-r9"));
}
