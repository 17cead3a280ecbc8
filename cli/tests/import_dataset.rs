//! `lmc export` of a Dataset artifact and `lmc import-dataset`: the round trip is bit for bit;
//! `.npz` files written by numpy (committed fixtures, so no python is needed) and safetensors
//! written here are read in both pixel spaces; every bad input ends in one line naming the file.

use std::path::{Path, PathBuf};

use lmc_train::artifact;
use lmc_train::data::{self, DatasetName, Pixels, SyntheticSet};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

mod common;
use common::{digits_subset_set, lmc, run_err, run_ok};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../probe/fixtures")
}

fn json(cmd: &mut std::process::Command) -> Value {
    let out = run_ok(cmd.arg("--json"));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn pixels(set: &SyntheticSet) -> Vec<u32> {
    let Pixels::F32(v) = &set.images.pixels else { panic!("stored as bytes") };
    v.iter().map(|x| x.to_bits()).collect()
}

/// Writes a safetensors file of `images` (f32, `shape`) and labels (`dtype`, little-endian
/// `label_bytes`, shape `[n]`) under the given names.
fn write_st(
    path: &Path,
    names: (&str, &str),
    images: &[f32],
    shape: &[usize],
    labels: (Dtype, Vec<u8>, usize),
) {
    let ib: Vec<u8> = images.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = vec![
        (names.0.to_string(), TensorView::new(Dtype::F32, shape.to_vec(), &ib).unwrap()),
        (names.1.to_string(), TensorView::new(labels.0, vec![labels.2], &labels.1).unwrap()),
    ];
    std::fs::write(path, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn export_then_import_dataset_round_trips_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p);
    // A distilled set with a multi-formation factor, so every field is exercised.
    run_ok(
        lmc()
            .args(["distill", "--dataset", "digits", "--model", "convnet:depth=1,width=4"])
            .args(["--ipc", "2", "--iterations", "3", "--factor", "2", "--batch-real", "8"])
            .arg("--out")
            .arg(d("syn.lmc")),
    );
    let v = json(lmc().arg("export").arg(d("syn.lmc")).arg("--to").arg(d("syn.safetensors")));
    assert_eq!(v["images"], 20);
    let bytes = std::fs::read(d("syn.safetensors")).unwrap();
    // Each export is its own process (std's hashers seeded afresh): the same bytes every time.
    for again in ["again-1.safetensors", "again-2.safetensors"] {
        run_ok(lmc().arg("export").arg(d("syn.lmc")).arg("--to").arg(d(again)));
        assert!(std::fs::read(d(again)).unwrap() == bytes, "{again} differs");
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (im, lb) = (st.tensor("images").unwrap(), st.tensor("labels").unwrap());
    assert_eq!((im.dtype(), im.shape()), (Dtype::F32, &[20, 1, 8, 8][..]));
    assert_eq!((lb.dtype(), lb.shape()), (Dtype::I64, &[20][..]));

    let v =
        json(lmc().arg("import-dataset").arg(d("syn.safetensors")).arg("--out").arg(d("back.lmc")));
    assert_eq!(
        (v["format"].as_str(), v["pixel_space"].as_str()),
        (Some("safetensors"), Some("normalized"))
    );
    let (_, orig) = artifact::read::<SyntheticSet>(&d("syn.lmc")).unwrap();
    let (_, back) = artifact::read::<SyntheticSet>(&d("back.lmc")).unwrap();
    assert_eq!(pixels(&back), pixels(&orig));
    assert_eq!(back, orig);
    let payload = |p: &str| artifact::read_raw(&d(p)).unwrap().1;
    assert_eq!(payload("back.lmc"), payload("syn.lmc"));

    // Other tensor names, both ways; and exporting the import gives the same file.
    run_ok(
        lmc()
            .arg("export")
            .arg(d("syn.lmc"))
            .args(["--images", "x", "--labels", "y", "--to"])
            .arg(d("xy.safetensors")),
    );
    run_ok(lmc().arg("import-dataset").arg(d("xy.safetensors")).arg("--out").arg(d("xy.lmc")));
    assert_eq!(payload("xy.lmc"), payload("syn.lmc"));
    let err = run_err(
        lmc()
            .arg("import-dataset")
            .arg(d("xy.safetensors"))
            .args(["--images", "pics", "--out"])
            .arg(d("bad.lmc")),
    );
    assert!(
        err.contains("xy.safetensors") && err.contains("'pics'") && err.contains("x, y"),
        "{err}"
    );
    // A Run takes no --images; a Dataset no --no-mask.
    let err =
        run_err(lmc().arg("export").arg(d("syn.lmc")).arg("--no-mask").arg("--to").arg(d("z")));
    assert!(err.contains("--no-mask") && err.contains("Dataset"), "{err}");

    // The imported set trains like the distilled one.
    let v = json(
        lmc()
            .args(["train", "--model", "mlp:8", "--epochs", "1", "--dataset"])
            .arg(d("back.lmc"))
            .arg("--out")
            .arg(d("run.lmc")),
    );
    assert_eq!(v["replicates"][0]["images_seen"], 80);
}

#[test]
fn npz_written_by_numpy_is_read_stored_or_deflated() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("set.lmc");
    let norm = DatasetName::Digits.normalization();
    let (m, s) = (norm.mean[0], norm.std[0]);
    // Pixel j of image i is ((64 i + j) % 17) / 16 (make_npz.py), normalised like a real batch.
    let want: Vec<u32> = (0..640).map(|k| (((k % 17) as f32 / 16.0 - m) / s).to_bits()).collect();
    for (file, tensors) in
        [("digits-xy.npz", ("x", "y")), ("digits-compressed.npz", ("images", "labels"))]
    {
        let v = json(
            lmc()
                .arg("import-dataset")
                .arg(fixtures().join(file))
                .args(["--base", "digits", "--pixel-space", "unit", "--out"])
                .arg(&out),
        );
        assert_eq!((v["format"].as_str(), v["images"].as_u64()), (Some("npz"), Some(10)), "{v}");
        assert_eq!(
            (v["images_tensor"].as_str(), v["labels_tensor"].as_str()),
            (Some(tensors.0), Some(tensors.1))
        );
        assert_eq!((v["min"].as_f64(), v["max"].as_f64()), (Some(0.0), Some(1.0)));
        let (_, set) = artifact::read::<SyntheticSet>(&out).unwrap();
        assert_eq!(set.base, DatasetName::Digits);
        assert_eq!(set.images.labels, (0..10).collect::<Vec<u8>>());
        assert_eq!(pixels(&set), want, "{file}");
        assert_eq!(set.class_names, DatasetName::Digits.class_names());
        assert_eq!(set.name, file.trim_end_matches(".npz"));
    }
    // Already normalised: stored as read.
    run_ok(
        lmc()
            .arg("import-dataset")
            .arg(fixtures().join("digits-xy.npz"))
            .args(["--base", "digits", "--pixel-space", "normalized", "--name", "raw", "--out"])
            .arg(&out),
    );
    let (_, set) = artifact::read::<SyntheticSet>(&out).unwrap();
    let raw: Vec<u32> = (0..640).map(|k| ((k % 17) as f32 / 16.0).to_bits()).collect();
    assert_eq!((pixels(&set), set.name.as_str()), (raw, "raw"));
}

#[test]
fn unit_space_import_matches_the_real_batch_normalisation() {
    // Real digits images as [0, 1] values: the import must give what a training batch of the
    // real images holds (digits_subset_set normalises as fill_batch does).
    let dir = tempfile::tempdir().unwrap();
    let idx: Vec<usize> = (0..30).collect();
    let want = digits_subset_set(&dir.path().join("ref.lmc"), "ref", &idx);
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let sub = ds.train.subset(&idx);
    let Pixels::U8 { data, scale } = &sub.pixels else { panic!() };
    let unit: Vec<f32> = data.iter().map(|&b| b as f32 * scale).collect();
    let labels: Vec<i64> = sub.labels.iter().map(|&l| l as i64).collect();
    let file = dir.path().join("unit.safetensors");
    write_st(
        &file,
        ("images", "labels"),
        &unit,
        &[30, 1, 8, 8],
        (Dtype::I64, i64_bytes(&labels), 30),
    );
    let out = dir.path().join("u.lmc");
    run_ok(
        lmc()
            .arg("import-dataset")
            .arg(&file)
            .args(["--base", "digits", "--pixel-space", "unit", "--out"])
            .arg(&out),
    );
    let (_, got) = artifact::read::<SyntheticSet>(&out).unwrap();
    assert_eq!(pixels(&got), pixels(&want));
    assert_eq!(got.images.labels, want.images.labels);
}

/// A bad input: what it is, how to write it, the flags, and what the error must say.
type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, Vec<&'a str>, &'a str);

#[test]
fn bad_dataset_files_end_in_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.safetensors");
    let out = dir.path().join("out.lmc");
    let fname = file.display().to_string();
    let import = |extra: &[&str]| {
        let mut c = lmc();
        c.arg("import-dataset").arg(&file).args(extra).arg("--out").arg(&out);
        c
    };
    let ok_labels = (Dtype::I64, i64_bytes(&[0, 1, 2, 3]), 4);
    let good = vec![0.5f32; 4 * 64];
    let flags = ["--base", "digits", "--pixel-space", "unit"];
    let cases: Vec<Case> = vec![
        (
            "wrong image size",
            Box::new(|| write_st(&file, ("images", "labels"), &vec![0.5; 4 * 56], &[4, 1, 8, 7], ok_labels.clone())),
            flags.to_vec(),
            "shape [4, 1, 8, 7]; digits needs N x C x H x W = N x 1 x 8 x 8",
        ),
        (
            "channels last",
            Box::new(|| write_st(&file, ("images", "labels"), &vec![0.5; 4 * 3072], &[4, 32, 32, 3], ok_labels.clone())),
            vec!["--base", "cifar10", "--pixel-space", "unit"],
            "looks like N x H x W x C",
        ),
        (
            "label past the classes",
            Box::new(|| write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], (Dtype::I64, i64_bytes(&[0, 1, 10, 3]), 4))),
            flags.to_vec(),
            "label 10 at index 2; digits has classes 0..9",
        ),
        (
            "negative label",
            Box::new(|| write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], (Dtype::I64, i64_bytes(&[0, -1, 2, 3]), 4))),
            flags.to_vec(),
            "label -1 at index 1",
        ),
        (
            "NaN",
            Box::new(|| {
                let mut v = good.clone();
                v[130] = f32::NAN;
                write_st(&file, ("images", "labels"), &v, &[4, 1, 8, 8], ok_labels.clone())
            }),
            flags.to_vec(),
            "holds NaN at index 130 (image 2)",
        ),
        (
            "missing labels",
            Box::new(|| write_st(&file, ("images", "targets"), &good, &[4, 1, 8, 8], ok_labels.clone())),
            flags.to_vec(),
            "no labels tensor 'labels' or 'y' (the file has: images, targets); name it with --labels",
        ),
        (
            "label count",
            Box::new(|| write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], (Dtype::I64, i64_bytes(&[0, 1, 2]), 3))),
            flags.to_vec(),
            "4 images need 4 labels",
        ),
        (
            "float labels",
            Box::new(|| {
                let b: Vec<u8> = [0f32, 1.0, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
                write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], (Dtype::F32, b, 4))
            }),
            flags.to_vec(),
            "labels must be integers",
        ),
        (
            "no base",
            Box::new(|| write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], ok_labels.clone())),
            vec!["--pixel-space", "unit"],
            "pass --base NAME",
        ),
        (
            "no pixel space",
            Box::new(|| write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], ok_labels.clone())),
            vec!["--base", "digits"],
            "--pixel-space normalized",
        ),
        (
            "not a tensor file",
            Box::new(|| std::fs::write(&file, b"hello, this is not safetensors").unwrap()),
            flags.to_vec(),
            "not a valid safetensors file",
        ),
        (
            "truncated npz",
            Box::new(|| {
                let b = std::fs::read(fixtures().join("digits-xy.npz")).unwrap();
                std::fs::write(&file, &b[..b.len() / 2]).unwrap()
            }),
            flags.to_vec(),
            "npz",
        ),
    ];
    for (what, make, args, want) in cases {
        make();
        let err = run_err(&mut import(&args));
        assert!(err.contains(&fname) && err.contains(want), "{what}: {err}");
        assert!(!out.exists(), "{what}: wrote an output");
    }
    // An unknown base or pixel space is a flag error.
    write_st(&file, ("images", "labels"), &good, &[4, 1, 8, 8], ok_labels.clone());
    let err = run_err(&mut import(&["--base", "svhn", "--pixel-space", "unit"]));
    assert!(err.contains("--base") && err.contains("'svhn'"), "{err}");
    let err = run_err(&mut import(&["--base", "digits", "--pixel-space", "0-255"]));
    assert!(err.contains("--pixel-space '0-255'"), "{err}");
    // Metadata naming another base than --base.
    let syn = dir.path().join("syn.lmc");
    digits_subset_set(&syn, "s", &[0, 1, 2]);
    let st = dir.path().join("syn.safetensors");
    run_ok(lmc().arg("export").arg(&syn).arg("--to").arg(&st));
    let err =
        run_err(lmc().arg("import-dataset").arg(&st).args(["--base", "mnist", "--out"]).arg(&out));
    assert!(
        err.contains("syn.safetensors") && err.contains("--base mnist") && err.contains("digits"),
        "{err}"
    );
    // Metadata whose statistics do not fit the images (a hand-edited or hostile file).
    let bytes = std::fs::read(&st).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut set: Value = serde_json::from_str(&meta["lmc.set"]).unwrap();
    set["norm"]["mean"] = serde_json::json!([]);
    meta.insert("lmc.set".into(), set.to_string());
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    std::fs::write(&st, safetensors::serialize(parsed.tensors(), &Some(meta)).unwrap()).unwrap();
    let err = run_err(
        lmc().arg("import-dataset").arg(&st).args(["--pixel-space", "unit", "--out"]).arg(&out),
    );
    assert!(err.contains("syn.safetensors") && err.contains("0 means"), "{err}");
}
