//! End-to-end tests of the `lmc` binary: happy paths on the built-in digits, and every kind of
//! bad input the foundation issue lists (each must give a one-line error naming the file or flag,
//! a non-zero exit that is not a panic's 101).

use std::path::{Path, PathBuf};
use std::process::Command;

use lmc_train::artifact;
use lmc_train::fit::Run;

mod common;
use common::{lmc, run_err, run_ok};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/fixtures")
}

fn read_run(p: &Path) -> Run {
    artifact::read::<Run>(p).unwrap().1
}

#[test]
fn train_digits_writes_a_run_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.lmc");
    let o = run_ok(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp:32",
                "--epochs",
                "3",
                "--lr",
                "0.05",
                "--json",
                "--out",
            ])
            .arg(&out),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["replicates"][0];
    let acc = r["test_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));
    // 1437 training images per epoch, 3 epochs.
    assert_eq!(r["images_seen"].as_u64().unwrap(), 3 * 1437);
    assert_eq!(r["epochs"].as_u64().unwrap(), 3);
    let run = read_run(&out);
    assert_eq!(run.final_test_accuracy(), acc);
    // Inspect prints it back.
    let o = run_ok(lmc().arg("inspect").arg(&out).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["kind"], "Run");
    assert_eq!(v["summary"]["images_seen"].as_u64().unwrap(), 3 * 1437);
    // A second identical call is a cache hit; --fresh retrains.
    let o = run_ok(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp:32",
                "--epochs",
                "3",
                "--lr",
                "0.05",
                "--json",
                "--out",
            ])
            .arg(&out),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["replicates"][0]["cached"], true);
}

#[test]
fn replicates_share_init_and_differ_in_data_order() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("reps");
    run_ok(
        lmc()
            .args([
                "train",
                "--dataset",
                "digits",
                "--model",
                "mlp:16",
                "--epochs",
                "1",
                "--replicates",
                "2",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&out),
    );
    let a = read_run(&out.join("replicate-0.lmc"));
    let b = read_run(&out.join("replicate-1.lmc"));
    assert_eq!(a.start, b.start);
    assert_eq!((a.data_seed, b.data_seed), (3, 4));
    assert_ne!(a.params.data, b.params.data);
}

fn train_args(threads: &str, out: &Path) -> Command {
    let mut c = lmc();
    c.env("RAYON_NUM_THREADS", threads)
        .args([
            "train",
            "--dataset",
            "digits",
            "--model",
            "convnet:depth=2,width=8",
            "--epochs",
            "2",
            "--batch-size",
            "50",
            "--lr",
            "0.05",
            "--out",
        ])
        .arg(out);
    c
}

#[test]
fn same_seed_is_bit_identical_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (dir.path().join("t1.lmc"), dir.path().join("t2.lmc"));
    run_ok(&mut train_args("1", &p1));
    run_ok(&mut train_args("2", &p2));
    let (mut a, mut b) = (read_run(&p1), read_run(&p2));
    // Wall-clock time is the one field that cannot repeat; everything else must, bit for bit.
    a.seconds = 0.0;
    b.seconds = 0.0;
    assert_eq!(bincode::serialize(&a).unwrap(), bincode::serialize(&b).unwrap());
}

#[test]
fn a_killed_training_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.lmc");
    let killed = dir.path().join("killed.lmc");
    let args = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "convnet:depth=2,width=16",
        "--epochs",
        "12",
        "--batch-size",
        "32",
        "--lr",
        "0.02",
    ];
    run_ok(lmc().args(args).arg("--out").arg(&full));
    // Start the same run, kill it once its first checkpoint is on disk, start it again.
    let ckpt = lmc_train::fit::checkpoint_path(&killed);
    let mut child = lmc().args(args).arg("--out").arg(&killed).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !ckpt.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    if killed.exists() {
        // The machine was fast enough to finish before the kill landed; nothing to resume.
        eprintln!("run finished before it could be killed; resume not exercised");
    } else {
        let (_, ck) = artifact::read::<lmc_train::fit::Checkpoint>(&ckpt).unwrap();
        assert!(ck.state.epochs_done >= 1 && ck.state.epochs_done < 12);
    }
    run_ok(lmc().args(args).arg("--out").arg(&killed));
    assert!(!ckpt.exists(), "checkpoint removed once the run is complete");
    let (a, b) = (read_run(&full), read_run(&killed));
    assert_eq!(a.params.data, b.params.data);
    assert_eq!(a.curve, b.curve);
}

#[test]
fn missing_data_dir_names_the_path() {
    let err = run_err(lmc().args([
        "train",
        "--dataset",
        "mnist",
        "--model",
        "lenet-300-100",
        "--data-dir",
        "/nonexistent/lmc-data",
        "--out",
        "/tmp/x.lmc",
    ]));
    assert!(err.as_str().contains("/nonexistent/lmc-data"), "{err}");
}

#[test]
fn unknown_model_spec_names_the_flag() {
    let err = run_err(lmc().args([
        "train",
        "--dataset",
        "digits",
        "--model",
        "resnet-1000",
        "--out",
        "/tmp/x.lmc",
    ]));
    let line = err.as_str();
    assert!(line.contains("--model") && line.contains("resnet-1000"), "{line}");
}

#[test]
fn unknown_dataset_and_bad_numbers_name_the_flag() {
    let err = run_err(lmc().args([
        "train",
        "--dataset",
        "imagenet",
        "--model",
        "mlp:8",
        "--out",
        "/tmp/x.lmc",
    ]));
    assert!(err.as_str().contains("--dataset"), "{err}");
    let err = run_err(lmc().args([
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp:8",
        "--lr=-1",
        "--out",
        "/tmp/x.lmc",
    ]));
    assert!(err.as_str().contains("--lr"), "{err}");
    let err = run_err(lmc().args([
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp:8",
        "--schedule",
        "multistep:0.9,0.5",
        "--out",
        "/tmp/x.lmc",
    ]));
    assert!(err.as_str().contains("--schedule"), "{err}");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn truncated_idx_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("mnist"), &dir.path().join("mnist"));
    // Replace the gzipped test images by a raw file cut short.
    let gz = dir.path().join("mnist/t10k-images-idx3-ubyte.gz");
    let raw = {
        use std::io::Read;
        let mut d = flate2::read::GzDecoder::new(std::fs::File::open(&gz).unwrap());
        let mut v = Vec::new();
        d.read_to_end(&mut v).unwrap();
        v
    };
    std::fs::remove_file(&gz).unwrap();
    std::fs::write(dir.path().join("mnist/t10k-images-idx3-ubyte"), &raw[..raw.len() - 100])
        .unwrap();
    let err =
        run_err(lmc().args(["data", "info", "--dataset", "mnist", "--data-dir"]).arg(dir.path()));
    let line = err.as_str();
    assert!(line.contains("t10k-images-idx3-ubyte") && line.contains("truncated"), "{line}");
}

#[test]
fn truncated_cifar_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("cifar-10-batches-bin");
    copy_dir(&fixtures().join("cifar-10-batches-bin"), &d);
    let f = d.join("data_batch_3.bin");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 7]).unwrap();
    let err =
        run_err(lmc().args(["data", "info", "--dataset", "cifar10", "--data-dir"]).arg(dir.path()));
    assert!(err.as_str().contains("data_batch_3.bin"), "{err}");
}

#[test]
fn damaged_artifacts_are_named_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.lmc");
    run_ok(
        lmc()
            .args(["train", "--dataset", "digits", "--model", "mlp:8", "--epochs", "1", "--out"])
            .arg(&good),
    );
    let bytes = std::fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.lmc", bytes[..bytes.len() / 2].to_vec(), "truncated"),
        (
            "flipped.lmc",
            {
                let mut b = bytes.clone();
                let i = b.len() - 10;
                b[i] ^= 0x01;
                b
            },
            "checksum",
        ),
        (
            "newer.lmc",
            {
                let mut b = bytes.clone();
                b[8..12].copy_from_slice(&(artifact::FORMAT_VERSION + 1).to_le_bytes());
                b
            },
            "newer",
        ),
        ("text.lmc", b"just some text that is not an artifact".to_vec(), "not an lmc artifact"),
    ];
    for (name, content, want) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        let err = run_err(lmc().arg("inspect").arg(&p));
        let line = err.as_str();
        assert!(line.contains(name) && line.contains(want), "{line}");
    }
    let err = run_err(lmc().arg("inspect").arg(dir.path().join("absent.lmc")));
    assert!(err.as_str().contains("absent.lmc"));
}

#[test]
fn data_info_reports_fixture_counts() {
    let o = run_ok(lmc().args(["data", "info", "--dataset", "digits", "--json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["train"]["count"], 1437);
    assert_eq!(v["test"]["count"], 360);
    let sum: u64 =
        v["train"]["per_class"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum();
    assert_eq!(sum, 1437);
}
