//! A ResNet with batch norm through every stage from the command line (a small width on the
//! digits): IMP, replicates of its ticket, interpolation with and without re-estimated running
//! statistics, a landscape and a Hessian trace (exact products in both batch-norm modes); and
//! the bad inputs that must end in one-line
//! errors.

use std::path::Path;

use serde_json::Value;

mod common;
use common::{lmc, run_err, run_ok};

const SPEC: &str = "resnet:depth=8,width=4";

fn json(cmd: &mut std::process::Command) -> Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn train_args(dir: &Path, model: &str, out: &str) -> Vec<String> {
    let o = dir.join(out).to_string_lossy().to_string();
    ["train", "--dataset", "digits", "--model", model, "--epochs", "2", "--lr", "0.05", "--out", &o]
        .map(String::from)
        .to_vec()
}

#[test]
fn a_resnet_goes_through_prune_train_and_every_probe() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    run_ok(
        lmc()
            .args(["prune", "--dataset", "digits", "--model", SPEC, "--rounds", "2"])
            .args(["--rate", "0.5", "--epochs", "2", "--lr", "0.05", "--out-dir"])
            .arg(d("imp")),
    );
    let ticket = d("imp/round-02.lmc");
    let t = json(lmc().arg("inspect").arg(&ticket));
    let text = t.to_string();
    assert!(text.contains("resnet:depth=8,width=4,norm=batch"), "{text}");
    run_ok(
        lmc()
            .args(["train", "--dataset", "digits", "--ticket"])
            .arg(&ticket)
            .args(["--replicates", "2", "--epochs", "2", "--lr", "0.05", "--out"])
            .arg(d("rep")),
    );
    let (r0, r1) = (d("rep/replicate-0.lmc"), d("rep/replicate-1.lmc"));
    // Both runs keep the ticket's 25% of weights and moved their running statistics.
    let plain =
        json(lmc().args(["probe", "interpolate"]).arg(&r0).arg(&r1).args(["--alphas", "3"]));
    let reset = json(lmc().args(["probe", "interpolate"]).arg(&r0).arg(&r1).args([
        "--alphas",
        "3",
        "--bn-reset",
        "2",
    ]));
    let result = |v: &Value| v["summary"]["result"].clone();
    let (p, r) = (result(&plain), result(&reset));
    assert!(p["norm_statistics"].as_str().unwrap().starts_with("interpolated"), "{p}");
    assert!(r["norm_statistics"].as_str().unwrap().starts_with("both"), "{r}");
    assert_eq!(p["reset_summary"].as_array().unwrap().len(), 0);
    assert_eq!(r["reset_summary"].as_array().unwrap().len(), 1);
    // The interpolated-statistics curve is the same whether or not the reset is also asked for.
    assert_eq!(p["summary"], r["summary"]);
    // Re-estimated statistics change the endpoints' evaluation (other statistics than the
    // running averages training left).
    let end = |v: &Value, k: &str| v["pairs"][0][k][0]["points"][0]["loss"].as_f64().unwrap();
    assert_ne!(end(&r, "curves"), end(&r, "reset_curves"));
    run_ok(lmc().args(["probe", "landscape"]).arg(&r0).args(["--resolution", "3"]));
    let h = json(lmc().args(["probe", "hessian"]).arg(&r0).args(["--trace", "--samples", "64"]));
    let text = h.to_string();
    assert!(!text.contains("running_mean"), "state appears in the Hessian summary");
    // Evaluation mode (the default): exact products by default, no finite-difference step.
    let hr = &h["summary"]["result"];
    assert_eq!(hr["config"]["hvp"], "Exact", "{hr}");
    assert!(hr["eps"].is_null(), "{hr}");
    let b = json(lmc().args(["probe", "hessian"]).arg(&r0).args([
        "--trace",
        "--samples",
        "64",
        "--bn-mode",
        "batch",
        "--max-samples",
        "4",
    ]));
    // Training mode (each chunk normalised by its own statistics): exact products too.
    assert_eq!(b["summary"]["result"]["config"]["hvp"], "Exact");
    // PyTorch's names and an int64 num_batches_tracked in the export; back in, same run.
    let st = d("r0.safetensors");
    run_ok(lmc().arg("export").arg(&r0).arg("--to").arg(&st).arg("--no-mask"));
    let bytes = std::fs::read(&st).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let nbt = file.tensor("blocks.2.shortcut.1.num_batches_tracked").unwrap();
    assert_eq!((nbt.dtype(), nbt.shape()), (safetensors::Dtype::I64, &[][..]));
    assert_eq!(file.tensor("bn.running_var").unwrap().shape(), [4]);
}

/// A new shape for a tensor of the given name and shape, or `None` to leave it out.
type Edit<'a> = &'a dyn Fn(&str, Vec<usize>) -> Option<Vec<usize>>;

#[test]
fn bad_resnet_input_ends_in_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    for (model, want) in
        [("resnet:depth=21", "6n+2"), ("resnet:width=0", "positive"), ("resnet34", "unknown")]
    {
        let e = run_err(lmc().args(train_args(dir.path(), model, "x.lmc")));
        assert!(e.contains(model) && e.contains(want), "{e}");
    }
    let e = run_err(
        lmc().args(train_args(dir.path(), "resnet18:width=2", "x.lmc")).args(["--batch-size", "1"]),
    );
    assert!(e.contains("--batch-size 1") && e.contains("at least 2"), "{e}");
    // A ConvNet run interpolated with a ResNet run.
    run_ok(lmc().args(train_args(dir.path(), SPEC, "a.lmc")));
    run_ok(lmc().args(train_args(dir.path(), "convnet:depth=1,width=4", "b.lmc")));
    let e = run_err(lmc().args(["probe", "interpolate"]).arg(d("a.lmc")).arg(d("b.lmc")));
    assert!(e.contains("b.lmc") || e.contains("run 2"), "{e}");
    // --bn-reset on a model without batch norm.
    run_ok(lmc().args(train_args(dir.path(), "convnet:depth=1,width=4", "c.lmc")).args([
        "--seed",
        "0",
        "--data-seed",
        "1",
    ]));
    let e = run_err(
        lmc()
            .args(["probe", "interpolate"])
            .arg(d("b.lmc"))
            .arg(d("c.lmc"))
            .args(["--bn-reset", "2"]),
    );
    assert!(e.contains("--bn-reset") && e.contains("no batch norm"), "{e}");
    // Safetensors missing running statistics, or with a wrong shape.
    let st = d("a.safetensors");
    run_ok(lmc().arg("export").arg(d("a.lmc")).arg("--to").arg(&st).arg("--no-mask"));
    let bytes = std::fs::read(&st).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rewrite = |path: &Path, edit: Edit| {
        let mut kept = Vec::new();
        for (name, v) in file.tensors() {
            if let Some(shape) = edit(&name, v.shape().to_vec()) {
                let n: usize = shape.iter().product::<usize>().max(1);
                let width = v.dtype().size();
                let mut data = v.data().to_vec();
                data.resize(n * width, 0);
                kept.push((name.clone(), v.dtype(), shape, data));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = kept
            .iter()
            .map(|(n, t, s, b)| {
                (n.clone(), safetensors::tensor::TensorView::new(*t, s.clone(), b).unwrap())
            })
            .collect();
        std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
    };
    let missing = d("missing.safetensors");
    rewrite(&missing, &|n, s| (!n.ends_with("bn1.running_var")).then_some(s));
    let import = |f: &Path| {
        let mut c = lmc();
        c.arg("import")
            .arg(f)
            .args(["--model", SPEC, "--dataset", "digits", "--out"])
            .arg(d("i.lmc"));
        c
    };
    let e = run_err(&mut import(&missing));
    assert!(e.contains("missing") && e.contains("blocks.0.bn1.running_var"), "{e}");
    let wrong = d("wrong.safetensors");
    rewrite(&wrong, &|n, s| Some(if n == "bn.running_mean" { vec![5] } else { s }));
    let e = run_err(&mut import(&wrong));
    assert!(e.contains("bn.running_mean") && e.contains("shape"), "{e}");
    assert!(!d("i.lmc").exists());
}
