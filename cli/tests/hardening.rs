//! Hostile artifacts and settings: files whose envelope and checksum are valid but whose payload
//! does not hold together (as a buggy or newer tool, or an edit re-sealed, would leave them),
//! diverging training, output paths that are not regular files, and sizes beyond the limits.
//! Each must end in a one-line error naming what is wrong, exit 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use lmc_prune::Ticket;
use lmc_train::artifact::{self, Artifact, Provenance};
use lmc_train::data::{Pixels, SyntheticSet};
use lmc_train::fit::Run;

mod common;
use common::{digits_subset_set, lmc, run_err, run_ok};

/// Trains a tiny digits run at `out`.
fn train(out: &Path) {
    run_ok(
        lmc()
            .args(["train", "--dataset", "digits", "--model", "mlp:7", "--epochs", "1", "--out"])
            .arg(out),
    );
}

/// `value` written over `path` with a valid envelope and checksum but no validation: the
/// re-sealed edit the readers must catch.
fn reseal<A: Artifact>(path: &Path, value: &A) {
    let (h, _) = artifact::read_raw(path).unwrap();
    artifact::write_unchecked(path, value, h.provenance).unwrap();
}

fn run_of(p: &Path) -> Run {
    artifact::read::<Run>(p).unwrap().1
}

fn expect(cmd: &mut Command, file: &Path, want: &str) {
    let e = run_err(cmd);
    let name = file.file_name().unwrap().to_string_lossy().to_string();
    assert!(e.contains(&name) && e.contains(want), "expected '{name}' and '{want}' in: {e}");
}

#[test]
fn runs_with_vectors_or_a_model_that_do_not_fit_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.lmc");
    train(&good);
    let run = run_of(&good);
    let case = |name: &str, edit: &dyn Fn(&mut Run)| -> PathBuf {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        let mut r = run.clone();
        edit(&mut r);
        reseal(&p, &r);
        p
    };
    // Class 1: a short mask, a short parameter vector.
    let p = case("short-mask.lmc", &|r| {
        r.mask.keep.pop();
    });
    expect(lmc().arg("inspect").arg(&p), &p, "mask has");
    let p2 = case("short-params.lmc", &|r| {
        r.params.data.truncate(10);
    });
    expect(lmc().arg("inspect").arg(&p2), &p2, "parameter layouts differ");
    expect(lmc().args(["probe", "interpolate"]).arg(&good).arg(&p2), &p2, "layouts differ");
    // Class 2: a model whose stored layout is not its spec's (a wider hidden layer claimed by
    // the spec, the old layout kept), and one whose layout has been shifted.
    let p = case("spec.lmc", &|r| {
        r.model.spec = "mlp:9".parse().unwrap();
    });
    expect(lmc().arg("inspect").arg(&p), &p, "is not that model's");
    let p = case("classes.lmc", &|r| r.model.classes = 3);
    expect(lmc().args(["probe", "interpolate"]).arg(&p).arg(&p), &p, "not that model's");
    // Non-finite weights are never read as a trained network.
    let p = case("inf.lmc", &|r| r.params.data[3] = f32::INFINITY);
    expect(lmc().arg("inspect").arg(&p), &p, "not finite");
}

#[test]
fn tickets_with_short_vectors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imp");
    run_ok(
        lmc()
            .args(["prune", "--dataset", "digits", "--model", "mlp:7", "--epochs", "1"])
            .args(["--rounds", "1", "--out-dir"])
            .arg(&out),
    );
    let t0 = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "lmc"))
        .unwrap();
    let (_, t) = artifact::read::<Ticket>(&t0).unwrap();
    let p = dir.path().join("short-rewind.lmc");
    std::fs::copy(&t0, &p).unwrap();
    let mut bad = t.clone();
    bad.rewind.data.pop();
    reseal(&p, &bad);
    expect(lmc().arg("inspect").arg(&p), &p, "rewind");
    let o = dir.path().join("o.lmc");
    expect(
        lmc()
            .args(["train", "--dataset", "digits", "--epochs", "1", "--ticket"])
            .arg(&p)
            .arg("--out")
            .arg(&o),
        &p,
        "rewind",
    );
    let mut bad = t;
    bad.mask.keep.truncate(5);
    reseal(&p, &bad);
    expect(
        lmc()
            .args(["prune", "--dataset", "digits", "--model", "mlp:7", "--rounds", "1"])
            .arg("--from-ticket")
            .arg(&p)
            .arg("--out-dir")
            .arg(dir.path().join("imp2")),
        &p,
        "mask",
    );
}

fn synthetic(path: &Path) -> SyntheticSet {
    digits_subset_set(path, "digits-real", &(0..20).collect::<Vec<_>>())
}

#[test]
fn dataset_artifacts_are_validated_before_use() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("syn.lmc");
    let set = synthetic(&good);
    let train = |p: &Path| {
        let mut c = lmc();
        c.args(["train", "--model", "mlp:7", "--epochs", "1", "--dataset"]).arg(p);
        c.arg("--out").arg(p.with_extension("run.lmc"));
        c
    };
    run_ok(&mut train(&good));
    type Edit = Box<dyn Fn(&mut SyntheticSet)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        ("label.lmc", Box::new(|s| s.images.labels[3] = 200), "label 200"),
        ("norm-short.lmc", Box::new(|s| s.norm.std.clear()), "normalisation has"),
        ("std-zero.lmc", Box::new(|s| s.norm.std[0] = 0.0), "standard deviations"),
        ("std-nan.lmc", Box::new(|s| s.norm.std[0] = f32::NAN), "standard deviations"),
        (
            "pixels-short.lmc",
            Box::new(|s| {
                if let Pixels::F32(v) = &mut s.images.pixels {
                    v.truncate(100);
                }
            }),
            "pixel values for 20 images",
        ),
        ("factor.lmc", Box::new(|s| s.factor = 0), "factor 0"),
    ];
    for (name, edit, want) in cases {
        let p = dir.path().join(name);
        std::fs::copy(&good, &p).unwrap();
        let mut s = set.clone();
        edit(&mut s);
        reseal(&p, &s);
        expect(&mut train(&p), &p, want);
        expect(lmc().arg("inspect").arg(&p), &p, want);
    }
}

#[test]
fn diverging_training_exits_1_naming_epoch_and_step() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.lmc");
    for args in [["--iterations", "1", "--lr", "1e300"], ["--epochs", "8", "--lr", "100"]] {
        let e = run_err(
            lmc()
                .args(["train", "--dataset", "digits", "--model", "mlp:32"])
                .args(args)
                .arg("--out")
                .arg(&out),
        );
        assert!(e.contains("diverged at epoch") && e.contains("step"), "{e}");
        assert!(!e.contains("epoch 0"), "{e}");
        assert!(!out.exists(), "no Run is written for a diverged run");
    }
}

#[test]
fn outputs_that_are_not_regular_files_are_refused_before_work() {
    let dir = tempfile::tempdir().unwrap();
    // A FIFO (made in the temporary folder, never a real device node): reading it would block,
    // and the atomic write's rename would replace it.
    let fifo = dir.path().join("fifo.lmc");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let train = |out: &Path| {
        let mut c = lmc();
        c.args(["train", "--dataset", "digits", "--model", "mlp:7", "--epochs", "1", "--out"]);
        c.arg(out);
        c
    };
    expect(&mut train(&fifo), &fifo, "is a FIFO, not a regular file");
    expect(lmc().arg("inspect").arg(&fifo), &fifo, "FIFO");
    {
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "left alone");
    }
    let sub = dir.path().join("sub.lmc");
    std::fs::create_dir(&sub).unwrap();
    expect(&mut train(&sub), &sub, "is a directory");
    // A checkpoint path that is a directory is refused too, before training.
    let out = dir.path().join("r.lmc");
    std::fs::create_dir(dir.path().join("r.lmc.ckpt")).unwrap();
    expect(&mut train(&out), &dir.path().join("r.lmc.ckpt"), "is a directory");
    std::fs::remove_dir(dir.path().join("r.lmc.ckpt")).unwrap();
    // Temporary files of killed writes of this output go; a live process's stays (pid 1 runs;
    // 999999999 is above any pid_max), and so do other outputs'.
    let stale = dir.path().join(".r.lmc.999999999.tmp");
    let live = dir.path().join(".r.lmc.1.tmp");
    let other = dir.path().join(".q.lmc.999999999.tmp");
    for p in [&stale, &live, &other] {
        std::fs::write(p, b"half").unwrap();
    }
    run_ok(&mut train(&out));
    assert!(!stale.exists() && live.exists() && other.exists());
    assert!(artifact::read::<Run>(&out).is_ok());
}

#[test]
fn sizes_beyond_the_limits_are_refused_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("big.lmc");
    for (model, want) in [
        ("mlp:100000000", "limit of 65536"),
        ("convnet:width=1000000", "limit of 65536"),
        ("mlp:18446744073709551615", "limit of 65536"),
        ("mlp:65536,65536", "more than 100000000 parameters"),
    ] {
        let e = run_err(
            lmc()
                .args(["train", "--dataset", "digits", "--epochs", "1", "--model", model])
                .arg("--out")
                .arg(&out),
        );
        assert!(e.contains(want), "{model}: {e}");
    }
    let run = dir.path().join("r.lmc");
    train(&run);
    let e = run_err(
        lmc().args(["probe", "interpolate", "--alphas", "1000000000000"]).arg(&run).arg(&run),
    );
    assert!(e.contains("--alphas") && e.contains("at most 10001"), "{e}");
    let e = run_err(
        lmc().args(["probe", "landscape", "--dims", "1", "--resolution", "4294967296"]).arg(&run),
    );
    assert!(e.contains("--resolution") && e.contains("at most 1001"), "{e}");
    // mlp:7 on 8x8 digits: 64*7 + 7 + 7*10 + 10 = 535 parameters.
    let e =
        run_err(lmc().args(["probe", "hessian", "--samples", "50", "--top-k", "100000"]).arg(&run));
    assert!(e.contains("--top-k 100000") && e.contains("535 parameters"), "{e}");
}

#[test]
fn a_cached_probe_that_does_not_hold_together_is_recomputed() {
    use lmc_probe::{Probe, ProbeResult};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.lmc"), dir.path().join("b.lmc"));
    train(&a);
    run_ok(
        lmc()
            .args(["train", "--dataset", "digits", "--model", "mlp:7", "--epochs", "1"])
            .args(["--data-seed", "1", "--out"])
            .arg(&b),
    );
    let out = dir.path().join("p.lmc");
    let interp = || {
        let mut c = lmc();
        c.args(["probe", "interpolate", "--alphas", "3"]).arg(&a).arg(&b).arg("--out").arg(&out);
        c
    };
    run_ok(&mut interp());
    let (_, probe) = artifact::read::<Probe>(&out).unwrap();
    let mut bad = probe.clone();
    let ProbeResult::Interpolation(r) = &mut bad.result else { panic!() };
    r.pairs[0].b = 5;
    reseal(&out, &bad);
    expect(lmc().arg("inspect").arg(&out), &out, "pair (0, 5) of 2 runs");
    // The same command recomputes instead of printing (and indexing) the bad file.
    run_ok(&mut interp());
    // (Compared by pairs: a one-pair summary's std is NaN, which equals nothing.)
    let pairs = |p: &Probe| match &p.result {
        ProbeResult::Interpolation(r) => r.pairs.clone(),
        _ => panic!(),
    };
    assert_eq!(pairs(&artifact::read::<Probe>(&out).unwrap().1), pairs(&probe));
}

#[test]
fn import_checks_the_model_its_file_describes() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("r.lmc");
    train(&good);
    let run = run_of(&good);
    // The file says 3 classes while its tensors (and layout) have 10: before, this was written
    // out as a Run with exit 0. (Export refuses such a Run, so its metadata is edited after.)
    let bytes = lmc_probe::interop::export_bytes(&run, Provenance::default(), true).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let key = lmc_probe::interop::RUN_KEY;
    let mut meta: serde_json::Value =
        serde_json::from_str(header["__metadata__"][key].as_str().unwrap()).unwrap();
    meta["model"]["classes"] = 3.into();
    header["__metadata__"][key] = meta.to_string().into();
    let text = header.to_string();
    let bytes = [&(text.len() as u64).to_le_bytes()[..], text.as_bytes(), &bytes[8 + n..]].concat();
    let st = dir.path().join("r.safetensors");
    std::fs::write(&st, bytes).unwrap();
    let out = dir.path().join("back.lmc");
    expect(lmc().arg("import").arg(&st).arg("--out").arg(&out), &st, "not that model's");
    assert!(!out.exists());
}

#[test]
fn a_second_writer_of_an_output_stops_at_once_naming_the_first() {
    use lmc_train::artifact::OutputLock;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r.lmc");
    train(&run);
    let st = dir.path().join("r.safetensors");
    run_ok(lmc().arg("export").arg(&run).arg("--to").arg(&st));
    let ticket_dir = dir.path().join("imp");
    run_ok(
        lmc()
            .args(["prune", "--dataset", "digits", "--model", "mlp:7", "--epochs", "1"])
            .args(["--rounds", "0", "--out-dir"])
            .arg(&ticket_dir),
    );
    let ticket = ticket_dir.join("round-00.lmc");
    assert!(ticket.is_file());
    let tiny = ["--dataset", "digits", "--model", "mlp:7", "--epochs", "1"];
    let cases: Vec<(PathBuf, Command)> = vec![
        {
            let o = dir.path().join("t.lmc");
            let mut c = lmc();
            c.arg("train").args(tiny).arg("--out").arg(&o);
            (o, c)
        },
        {
            // Replicates into a folder: the folder is locked as a whole.
            let o = dir.path().join("reps");
            let mut c = lmc();
            c.arg("train").args(tiny).args(["--replicates", "2", "--out"]).arg(&o);
            (o, c)
        },
        {
            let o = dir.path().join("imp2");
            let mut c = lmc();
            c.arg("prune").args(tiny).args(["--rounds", "1", "--out-dir"]).arg(&o);
            (o, c)
        },
        {
            let o = dir.path().join("random.lmc");
            let mut c = lmc();
            c.args(["prune", "random", "--like"]).arg(&ticket).arg("--out").arg(&o);
            (o, c)
        },
        {
            let o = dir.path().join("d.lmc");
            let mut c = lmc();
            c.args(["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "1"]);
            c.arg("--out").arg(&o);
            (o, c)
        },
        {
            let o = dir.path().join("p.lmc");
            let mut c = lmc();
            c.args(["probe", "interpolate", "--alphas", "3"]).arg(&run).arg(&run);
            c.arg("--out").arg(&o);
            (o, c)
        },
        {
            let o = dir.path().join("e.safetensors");
            let mut c = lmc();
            c.arg("export").arg(&run).arg("--to").arg(&o);
            (o, c)
        },
        {
            let o = dir.path().join("i.lmc");
            let mut c = lmc();
            c.arg("import").arg(&st).arg("--out").arg(&o);
            (o, c)
        },
    ];
    // The lock a first writer holds (flock belongs to the open file, so this process holding
    // it is what another `lmc` holding it is to the one under test).
    let me = std::process::id();
    for (out, mut cmd) in cases {
        let held = OutputLock::acquire(&out).unwrap();
        let e = run_err(&mut cmd);
        let name = out.file_name().unwrap().to_string_lossy().to_string();
        let want = format!("{name} is being written by process {me}");
        assert!(e.contains(&want), "expected '{want}' in: {e}");
        assert!(!out.exists(), "{name}: the second writer wrote nothing");
        drop(held);
        // Once the first writer is done, the same command runs.
        run_ok(&mut cmd);
        assert!(out.exists(), "{name}");
    }
}

#[test]
fn cached_probes_must_fit_the_command_that_prints_them() {
    use lmc_probe::{Probe, ProbeResult};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.lmc"), dir.path().join("b.lmc"));
    train(&a);
    run_ok(
        lmc()
            .args(["train", "--dataset", "digits", "--model", "mlp:7", "--epochs", "1"])
            .args(["--data-seed", "1", "--out"])
            .arg(&b),
    );
    // An interpolation listing three inputs, its pair (1, 2) valid for the file: printing it
    // for the command's two runs indexed the third (a panic before).
    let out = dir.path().join("i.lmc");
    let interp = || {
        let mut c = lmc();
        c.args(["probe", "interpolate", "--alphas", "3"]).arg(&a).arg(&b).arg("--out").arg(&out);
        c
    };
    run_ok(&mut interp());
    let (_, good) = artifact::read::<Probe>(&out).unwrap();
    let mut bad = good.clone();
    bad.inputs.push(bad.inputs[0].clone());
    let ProbeResult::Interpolation(r) = &mut bad.result else { panic!() };
    (r.pairs[0].a, r.pairs[0].b) = (1, 2);
    reseal(&out, &bad);
    let printed = String::from_utf8(run_ok(&mut interp()).stdout).unwrap();
    assert!(!printed.contains("up to date"), "recomputed, not printed: {printed}");
    assert_eq!(artifact::read::<Probe>(&out).unwrap().1.inputs.len(), 2);

    // A landscape anchored at a run it does not have, a Hessian whose diagonal is short.
    let land = dir.path().join("l.lmc");
    let landscape = || {
        let mut c = lmc();
        c.args(["probe", "landscape", "--dims", "1", "--resolution", "3"]).arg(&a);
        c.arg("--out").arg(&land);
        c
    };
    run_ok(&mut landscape());
    let (_, mut p) = artifact::read::<Probe>(&land).unwrap();
    let ProbeResult::Landscape(l) = &mut p.result else { panic!() };
    l.anchors[0].run = 7;
    reseal(&land, &p);
    expect(lmc().arg("inspect").arg(&land), &land, "anchor of run 7 of 1 runs");
    let printed = String::from_utf8(run_ok(&mut landscape()).stdout).unwrap();
    assert!(printed.contains("run 1 at") && !printed.contains("run 8"), "{printed}");

    let hess = dir.path().join("h.lmc");
    let hessian = || {
        let mut c = lmc();
        c.args(["probe", "hessian", "--samples", "20", "--max-samples", "2", "--min-samples", "2"]);
        c.arg(&a).arg("--out").arg(&hess);
        c
    };
    run_ok(&mut hessian());
    let (_, mut p) = artifact::read::<Probe>(&hess).unwrap();
    let ProbeResult::Hessian(h) = &mut p.result else { panic!() };
    h.diagonal.as_mut().unwrap().truncate(3);
    reseal(&hess, &p);
    expect(lmc().arg("inspect").arg(&hess), &hess, "a diagonal of 3 values for 535 parameters");
    run_ok(&mut hessian());
    assert!(artifact::read::<Probe>(&hess).is_ok());
}

#[test]
fn a_landscape_checkpoint_never_overrides_the_commands_grid() {
    use lmc_probe::landscape::LandscapeCheckpoint;
    use lmc_probe::{Probe, ProbeResult};
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("r.lmc");
    train(&run);
    let out = dir.path().join("l.lmc");
    let landscape = || {
        let mut c = lmc();
        c.args(["probe", "landscape", "--dims", "1", "--resolution", "3"]).arg(&run);
        c.arg("--out").arg(&out);
        c
    };
    run_ok(&mut landscape());
    let (h, p) = artifact::read::<Probe>(&out).unwrap();
    let ProbeResult::Landscape(want) = p.result else { panic!() };
    // A finished checkpoint of a 5-point line, stored with this command's provenance: adopting
    // it would print (and store) its grid as the command's.
    let mut other = want.clone();
    other.config.x.points = 5;
    other.points = [want.points.clone(), want.points[..2].to_vec()].concat();
    let ckpt = lmc_train::stage::checkpoint_path(&out);
    let resume = |c: &LandscapeCheckpoint| {
        std::fs::remove_file(&out).unwrap();
        artifact::write_unchecked(&ckpt, c, h.provenance).unwrap();
        let printed = String::from_utf8(run_ok(&mut landscape()).stdout).unwrap();
        assert!(printed.contains("3 x 1 points"), "{printed}");
        let (_, p) = artifact::read::<Probe>(&out).unwrap();
        let ProbeResult::Landscape(got) = p.result else { panic!() };
        assert_eq!(got.points, want.points);
        assert!(!ckpt.exists());
    };
    resume(&LandscapeCheckpoint { landscape: other.clone(), seconds: 0.0 });
    // A grid of 2^40 points in a checkpoint is refused when it is decoded (its size is
    // checked against the per-axis limit before anything is allocated for it).
    other.config.x.points = 1 << 40;
    other.points.clear();
    other.rows_done = 0;
    resume(&LandscapeCheckpoint { landscape: other, seconds: 0.0 });
}
