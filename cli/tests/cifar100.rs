//! CIFAR-100 (100 fine classes) through the stages from the command line, on a tiny file in its
//! binary layout that the test writes (the real data set is not in the shared data folder):
//! `data info`, a ResNet trained one step, IMP, distillation with one image per class, training
//! on the distilled set, and an interpolation probe.

use std::path::Path;

use lmc_train::artifact;
use lmc_train::data::{DatasetName, SyntheticSet};
use lmc_train::fit::Run;
use serde_json::Value;

mod common;
use common::{lmc, run_err, run_ok};

/// Writes `DIR/cifar-100-binary/` with `per_class` training images per fine class and one test
/// image per class: records of coarse label (fine / 5), fine label, 3,072 pixel bytes.
fn write_cifar100(dir: &Path, per_class: usize) {
    let records = |n: usize, salt: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(n * 3074);
        for i in 0..n {
            let fine = (i % 100) as u8;
            out.extend([fine / 5, fine]);
            out.extend((0..3072).map(|j| ((i * 31 + j * (fine as usize + 1) + salt) % 256) as u8));
        }
        out
    };
    let folder = dir.join("cifar-100-binary");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("train.bin"), records(100 * per_class, 0)).unwrap();
    std::fs::write(folder.join("test.bin"), records(100, 7)).unwrap();
}

fn json(cmd: &mut std::process::Command) -> Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn cifar100_trains_prunes_distills_and_probes() {
    let dir = tempfile::tempdir().unwrap();
    write_cifar100(dir.path(), 2);
    let d = |p: &str| dir.path().join(p);
    let data = ["--dataset", "cifar100", "--data-dir", dir.path().to_str().unwrap()];

    let info = json(lmc().args(["data", "info"]).args(data));
    assert_eq!(info["classes"].as_array().unwrap().len(), 100, "{info}");
    assert_eq!(info["train"]["per_class"], serde_json::json!(vec![2; 100]));

    // A ResNet with a 100-way classifier: one SGD step of 16 images, two replicates.
    let v = json(
        lmc()
            .arg("train")
            .args(data)
            .args(["--model", "resnet:depth=8,width=4", "--iterations", "1", "--batch-size", "16"])
            .args(["--replicates", "2", "--out"])
            .arg(d("rep")),
    );
    assert_eq!(v["replicates"][0]["images_seen"], 16, "{v}");
    let (_, run) = artifact::read::<Run>(&d("rep/replicate-0.lmc")).unwrap();
    assert_eq!((run.model.classes, run.dataset.as_str()), (100, "cifar100"));
    assert_eq!(run.model.layout.entries.iter().find(|e| e.name == "fc.bias").unwrap().shape, [100]);
    let p = json(
        lmc()
            .args(["probe", "interpolate"])
            .arg(d("rep/replicate-0.lmc"))
            .arg(d("rep/replicate-1.lmc"))
            .args(["--alphas", "3", "--data-dir"])
            .arg(dir.path()),
    );
    assert!(p.to_string().contains("barrier"), "{p}");

    // IMP on the real data: one round.
    run_ok(
        lmc()
            .args(["prune"])
            .args(data)
            .args(["--model", "convnet:depth=1,width=4", "--rounds", "1", "--rate", "0.5"])
            .args(["--epochs", "1", "--batch-size", "50", "--out-dir"])
            .arg(d("imp")),
    );
    assert!(d("imp/round-01.lmc").is_file());

    // Distillation with one image per class: 100 stored images, labels 0..99.
    let v = json(
        lmc()
            .arg("distill")
            .args(data)
            .args(["--model", "convnet:depth=1,width=4", "--ipc", "1", "--iterations", "2"])
            .args(["--batch-real", "2", "--seed", "1", "--out"])
            .arg(d("syn.lmc")),
    );
    assert_eq!(v["ipc"], 1);
    assert_eq!(v["dsa"], "color_crop_cutout_flip_scale_rotate"); // flip kept, as on CIFAR-10
    let (_, set) = artifact::read::<SyntheticSet>(&d("syn.lmc")).unwrap();
    assert_eq!(set.base, DatasetName::Cifar100);
    assert_eq!(set.images.labels, (0..100).collect::<Vec<u8>>());
    assert_eq!(set.class_names.len(), 100);
    let v = json(
        lmc()
            .args(["train", "--dataset"])
            .arg(d("syn.lmc"))
            .args(["--data-dir", dir.path().to_str().unwrap()])
            .args(["--model", "mlp:8", "--epochs", "1", "--batch-size", "50", "--out"])
            .arg(d("syn-run.lmc")),
    );
    assert_eq!(v["replicates"][0]["images_seen"], 100, "{v}");

    // A CIFAR-100 file cut inside a record: one line naming it.
    let train = d("cifar-100-binary/train.bin");
    let bytes = std::fs::read(&train).unwrap();
    std::fs::write(&train, &bytes[..bytes.len() - 5]).unwrap();
    let err = run_err(lmc().args(["data", "info"]).args(data));
    assert!(err.contains(&train.display().to_string()) && err.contains("3074"), "{err}");
}
