//! Tests of `lmc_train::data`: loading (built-in digits, IDX, CIFAR-10 folder and tar.gz), error
//! reporting on broken files, shuffling, batching, normalisation and augmentation.
//!
//! The fixtures under `train/fixtures/` are cut from the real data by the ignored test
//! `make_fixtures` (see `train/fixtures/README.md`). Tests on the full data sets run only where the
//! shared data folder is present (`$LMC_SHARED_DATA`, else `<workspace>/../shared/data`).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use lmc_train::data::*;
use lmc_train::seed::{rng, Stream};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The shared data folder, if present.
fn shared_data() -> Option<PathBuf> {
    let dir = match std::env::var_os("LMC_SHARED_DATA") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    };
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: shared data folder {} is absent (set LMC_SHARED_DATA)", dir.display());
        None
    }
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn u8_pixels(set: &ImageSet) -> (&[u8], f32) {
    match &set.pixels {
        Pixels::U8 { data, scale } => (data, *scale),
        Pixels::F32(_) => panic!("expected U8 pixels"),
    }
}

/// Copies every file of `src` (flat) into `dst`.
fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// The error message of a load that must fail (without printing a whole dataset if it does not).
fn load_err(name: DatasetName, dir: &Path) -> String {
    match load(name, Some(dir)) {
        Ok(ds) => panic!(
            "loading {name} from {} succeeded ({} train images)",
            dir.display(),
            ds.train.len()
        ),
        Err(e) => e.to_string(),
    }
}

fn cut(path: &Path, keep: usize) {
    let bytes = fs::read(path).unwrap();
    fs::write(path, &bytes[..keep]).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Fixture generator.

const MNIST_TRAIN: usize = 64;
const MNIST_TEST: usize = 32;
const CIFAR_PER_TRAIN_BATCH: usize = 5;
const CIFAR_TEST: usize = 10;
const CIFAR_RECORD: usize = 3073;
const CIFAR_BATCHES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];
/// The real archive's member timestamp (2009-01-01 00:00 UTC).
const CIFAR_MTIME: u64 = 1_230_768_000;

/// The first `keep` items of an IDX file (`header` bytes of header whose second word is the count).
fn cut_idx(full: &[u8], header: usize, item: usize, keep: usize) -> Vec<u8> {
    let mut out = full[..header + keep * item].to_vec();
    out[4..8].copy_from_slice(&(keep as u32).to_be_bytes());
    out
}

fn make_idx_fixture(src: &Path, dst: &Path, gz: bool) {
    fs::create_dir_all(dst).unwrap();
    for (prefix, keep) in [("train", MNIST_TRAIN), ("t10k", MNIST_TEST)] {
        for (kind, header, item) in
            [("images-idx3-ubyte", 16, 28 * 28), ("labels-idx1-ubyte", 8, 1)]
        {
            let name = format!("{prefix}-{kind}");
            let full = gunzip(&fs::read(src.join(format!("{name}.gz"))).unwrap());
            let small = cut_idx(&full, header, item, keep);
            if gz {
                fs::write(dst.join(format!("{name}.gz")), gzip(&small)).unwrap();
            } else {
                fs::write(dst.join(name), small).unwrap();
            }
        }
    }
}

/// Regenerates `train/fixtures/` from the shared data folder. Run with
/// `cargo test --release -p lmc-train --test data -- --ignored make_fixtures`.
#[test]
#[ignore]
fn make_fixtures() {
    let shared = shared_data().expect("make_fixtures needs the shared data folder");
    let fx = fixtures();
    make_idx_fixture(&shared.join("mnist"), &fx.join("mnist"), true);
    make_idx_fixture(&shared.join("fashion-mnist"), &fx.join("fashion-mnist"), false);

    // CIFAR-10: the first records of each batch file, streamed out of the real archive.
    let file = fs::File::open(shared.join("cifar-10-binary.tar.gz")).unwrap();
    let mut archive =
        tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
    let mut small: Vec<(String, Vec<u8>)> = Vec::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().file_name().unwrap().to_str().unwrap().to_string();
        let keep = match name.as_str() {
            "test_batch.bin" => CIFAR_TEST * CIFAR_RECORD,
            "batches.meta.txt" => usize::MAX,
            n if n.starts_with("data_batch_") => CIFAR_PER_TRAIN_BATCH * CIFAR_RECORD,
            _ => continue,
        };
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        bytes.truncate(keep);
        small.push((name, bytes));
    }
    assert_eq!(small.len(), 7, "expected 6 batch files and batches.meta.txt in the archive");
    for name in CIFAR_BATCHES {
        assert!(small.iter().any(|(n, _)| n == name), "the archive has no {name}");
    }
    let folder = fx.join("cifar-10-batches-bin");
    fs::create_dir_all(&folder).unwrap();
    for (name, bytes) in &small {
        fs::write(folder.join(name), bytes).unwrap();
    }
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_path("cifar-10-batches-bin/").unwrap();
    dir.set_size(0);
    dir.set_mode(0o755);
    dir.set_mtime(CIFAR_MTIME);
    dir.set_uid(0);
    dir.set_gid(0);
    dir.set_username("root").unwrap();
    dir.set_groupname("root").unwrap();
    dir.set_cksum();
    builder.append(&dir, std::io::empty()).unwrap();
    for (name, bytes) in &small {
        let mut h = tar::Header::new_gnu();
        h.set_path(format!("cifar-10-batches-bin/{name}")).unwrap();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(CIFAR_MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_username("root").unwrap();
        h.set_groupname("root").unwrap();
        h.set_cksum();
        builder.append(&h, bytes.as_slice()).unwrap();
    }
    let tar_bytes = builder.into_inner().unwrap();
    fs::create_dir_all(fx.join("cifar-tar")).unwrap();
    fs::write(fx.join("cifar-tar/cifar-10-binary.tar.gz"), gzip(&tar_bytes)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Names and paths.

#[test]
fn dataset_names_parse_and_display() {
    for (s, want) in [
        ("digits", DatasetName::Digits),
        ("mnist", DatasetName::Mnist),
        ("fashion-mnist", DatasetName::FashionMnist),
        ("fmnist", DatasetName::FashionMnist),
        ("cifar10", DatasetName::Cifar10),
        ("cifar-10", DatasetName::Cifar10),
        ("cifar100", DatasetName::Cifar100),
        ("CIFAR-100", DatasetName::Cifar100),
        ("MNIST", DatasetName::Mnist),
    ] {
        assert_eq!(s.parse::<DatasetName>().unwrap(), want, "{s}");
    }
    for name in DatasetName::ALL {
        assert_eq!(name.to_string(), name.as_str());
        assert_eq!(name.as_str().parse::<DatasetName>().unwrap(), name);
    }
    assert_eq!(DatasetName::FashionMnist.to_string(), "fashion-mnist");
    let err = "svhn".parse::<DatasetName>().unwrap_err().to_string();
    assert!(
        err.contains("'svhn'") && err.contains("digits, mnist, fashion-mnist, cifar10, cifar100"),
        "{err}"
    );
}

#[test]
fn resolve_data_dir_prefers_flag_then_env_then_default() {
    assert_eq!(resolve_data_dir(Some(Path::new("/x/y"))), PathBuf::from("/x/y"));
    // The only test touching the variable.
    std::env::set_var(DATA_DIR_ENV, "/from/env");
    assert_eq!(resolve_data_dir(None), PathBuf::from("/from/env"));
    assert_eq!(resolve_data_dir(Some(Path::new("flag"))), PathBuf::from("flag"));
    std::env::remove_var(DATA_DIR_ENV);
    assert_eq!(resolve_data_dir(None), PathBuf::from("data"));
}

// ---------------------------------------------------------------------------------------------
// Digits.

#[test]
fn digits_loads_and_matches_the_csv() {
    let ds = load(DatasetName::Digits, Some(Path::new("/nonexistent"))).unwrap();
    assert_eq!(ds.name, "digits");
    assert_eq!((ds.train.len(), ds.test.len()), (1437, 360));
    assert_eq!(ds.train.shape, ImageShape { channels: 1, height: 8, width: 8 });
    assert_eq!(ds.classes, 10);
    assert_eq!(ds.class_names[3], "3");
    assert!(!ds.augment_default);
    assert!(ds.train.labels.iter().chain(&ds.test.labels).all(|&l| l < 10));

    // Checked by hand on the CSV (zcat | awk): row 1 is a 0 whose 64 pixels sum to 294; row 1438
    // (the first test row) is a 2 summing to 347; the last row is an 8.
    let (tr, scale) = u8_pixels(&ds.train);
    let (te, _) = u8_pixels(&ds.test);
    assert_eq!(scale, 1.0 / 16.0);
    assert_eq!(ds.train.labels[0], 0);
    assert_eq!(tr[..64].iter().map(|&b| b as u32).sum::<u32>(), 294);
    assert_eq!(ds.test.labels[0], 2);
    assert_eq!(te[..64].iter().map(|&b| b as u32).sum::<u32>(), 347);
    assert_eq!(*ds.test.labels.last().unwrap(), 8);

    // Independent parse of the same file.
    let csv = gunzip(
        &fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/data/digits.csv.gz")).unwrap(),
    );
    let rows: Vec<Vec<u8>> = String::from_utf8(csv)
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 1797);
    for (i, row) in rows.iter().enumerate() {
        let (set, j) =
            if i < 1437 { ((tr, &ds.train.labels), i) } else { ((te, &ds.test.labels), i - 1437) };
        assert_eq!(&set.0[j * 64..(j + 1) * 64], &row[..64], "row {i}");
        assert_eq!(set.1[j], row[64], "row {i}");
    }

    // Normalisation = the train split's own statistics.
    let vals: Vec<f64> = tr.iter().map(|&b| b as f64 / 16.0).collect();
    let mean = vals.iter().sum::<f64>() / vals.len() as f64;
    let std = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
    assert!((ds.norm.mean[0] as f64 - mean).abs() < 1e-6, "{:?} vs {mean}", ds.norm);
    assert!((ds.norm.std[0] as f64 - std).abs() < 1e-6, "{:?} vs {std}", ds.norm);
    let stats = split_stats(&ds.train, 10);
    assert!((stats.mean[0] - mean).abs() < 1e-12 && (stats.std[0] - std).abs() < 1e-12);
    assert_eq!(stats.per_class.iter().sum::<usize>(), 1437);
}

// ---------------------------------------------------------------------------------------------
// IDX.

/// The first labels of the official MNIST / Fashion-MNIST files (well known).
const MNIST_TRAIN_FIRST: [u8; 10] = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4];
const MNIST_TEST_FIRST: [u8; 10] = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9];
const FMNIST_TRAIN_FIRST: [u8; 10] = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5];
const FMNIST_TEST_FIRST: [u8; 10] = [9, 2, 1, 1, 6, 1, 4, 6, 5, 7];

#[test]
fn mnist_fixture_loads_from_gz() {
    assert!(fixtures().join("mnist/train-images-idx3-ubyte.gz").is_file());
    assert!(!fixtures().join("mnist/train-images-idx3-ubyte").exists());
    let ds = load(DatasetName::Mnist, Some(&fixtures())).unwrap();
    assert_eq!(ds.name, "mnist");
    assert_eq!((ds.train.len(), ds.test.len()), (64, 32));
    assert_eq!(ds.train.shape, ImageShape { channels: 1, height: 28, width: 28 });
    assert_eq!(ds.train.shape.len(), 784);
    assert_eq!(&ds.train.labels[..10], &MNIST_TRAIN_FIRST);
    assert_eq!(&ds.test.labels[..10], &MNIST_TEST_FIRST);
    assert_eq!(ds.class_names, (0..10).map(|d| d.to_string()).collect::<Vec<_>>());
    assert_eq!(ds.norm, Normalization { mean: vec![0.1307], std: vec![0.3081] });
    assert!(!ds.augment_default);
    let (px, scale) = u8_pixels(&ds.train);
    assert_eq!(px.len(), 64 * 784);
    assert_eq!(scale, 1.0 / 255.0);
    // The pixel bytes are the file's bytes after its 16-byte header.
    let raw = gunzip(&fs::read(fixtures().join("mnist/train-images-idx3-ubyte.gz")).unwrap());
    assert_eq!(px, &raw[16..]);
}

#[test]
fn fashion_mnist_fixture_loads_raw() {
    assert!(fixtures().join("fashion-mnist/train-images-idx3-ubyte").is_file());
    assert!(!fixtures().join("fashion-mnist/train-images-idx3-ubyte.gz").exists());
    let ds = load(DatasetName::FashionMnist, Some(&fixtures())).unwrap();
    assert_eq!(ds.name, "fashion-mnist");
    assert_eq!((ds.train.len(), ds.test.len()), (64, 32));
    assert_eq!(&ds.train.labels[..10], &FMNIST_TRAIN_FIRST);
    assert_eq!(&ds.test.labels[..10], &FMNIST_TEST_FIRST);
    assert_eq!(ds.class_names[0], "T-shirt/top");
    assert_eq!(ds.class_names[9], "Ankle boot");
    assert_eq!(ds.norm, Normalization { mean: vec![0.2860], std: vec![0.3530] });
    let raw = fs::read(fixtures().join("fashion-mnist/t10k-images-idx3-ubyte")).unwrap();
    assert_eq!(u8_pixels(&ds.test).0, &raw[16..]);
}

#[test]
fn idx_gz_is_tried_before_raw() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnist");
    copy_dir(&fixtures().join("mnist"), &dir);
    // A broken raw file next to the good .gz one is never looked at.
    fs::write(dir.join("train-images-idx3-ubyte"), b"garbage").unwrap();
    let ds = load(DatasetName::Mnist, Some(tmp.path())).unwrap();
    assert_eq!(ds.train.len(), 64);
    // A mix of gz and raw files works too.
    fs::remove_file(dir.join("train-images-idx3-ubyte")).unwrap();
    let labels = gunzip(&fs::read(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap());
    fs::remove_file(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    fs::write(dir.join("t10k-labels-idx1-ubyte"), labels).unwrap();
    assert_eq!(load(DatasetName::Mnist, Some(tmp.path())).unwrap(), ds);
}

fn fmnist_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fashion-mnist");
    copy_dir(&fixtures().join("fashion-mnist"), &dir);
    (tmp, dir)
}

#[test]
fn truncated_raw_idx_is_an_error_naming_the_file() {
    let (tmp, dir) = fmnist_copy();
    let file = dir.join("train-images-idx3-ubyte");
    cut(&file, 16 + 1234);
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(
        err.contains(
            "truncated IDX file: header says 64 images of 28x28, found 1234 bytes of pixels"
        ),
        "{err}"
    );
    // Cut inside the header.
    cut(&file, 10);
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(err.contains("train-images-idx3-ubyte") && err.contains("truncated"), "{err}");
}

#[test]
fn truncated_gz_idx_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnist");
    copy_dir(&fixtures().join("mnist"), &dir);
    let file = dir.join("t10k-images-idx3-ubyte.gz");
    let len = fs::metadata(&file).unwrap().len() as usize;
    for keep in [len / 2, len - 4, 12] {
        fs::copy(fixtures().join("mnist/t10k-images-idx3-ubyte.gz"), &file).unwrap();
        cut(&file, keep);
        let err = load_err(DatasetName::Mnist, tmp.path());
        assert!(err.contains(&file.display().to_string()), "keep {keep}: {err}");
    }
}

#[test]
fn idx_with_extra_bytes_is_an_error() {
    let (tmp, dir) = fmnist_copy();
    let file = dir.join("t10k-labels-idx1-ubyte");
    let mut bytes = fs::read(&file).unwrap();
    bytes.push(3);
    fs::write(&file, bytes).unwrap();
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(
        err.contains("t10k-labels-idx1-ubyte") && err.contains("longer than its header"),
        "{err}"
    );
}

#[test]
fn idx_bad_magic_is_an_error() {
    let (tmp, dir) = fmnist_copy();
    let file = dir.join("train-labels-idx1-ubyte");
    let mut bytes = fs::read(&file).unwrap();
    bytes[3] = 3; // 2051: an image file's magic where labels are expected
    fs::write(&file, bytes).unwrap();
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(
        err.contains("train-labels-idx1-ubyte") && err.contains("magic number 2051, expected 2049"),
        "{err}"
    );

    // A gzip file under a raw name gets a hint.
    let (tmp, dir) = fmnist_copy();
    let file = dir.join("t10k-images-idx3-ubyte");
    fs::write(&file, gzip(&fs::read(&file).unwrap())).unwrap();
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(err.contains("t10k-images-idx3-ubyte") && err.contains("gzip"), "{err}");
}

#[test]
fn idx_wrong_dims_labels_and_counts_are_errors() {
    let (tmp, dir) = fmnist_copy();
    let file = dir.join("train-images-idx3-ubyte");
    let orig = fs::read(&file).unwrap();
    let mut bytes = orig.clone();
    bytes[11] = 27; // rows
    fs::write(&file, &bytes).unwrap();
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(err.contains("27x28") && err.contains("train-images-idx3-ubyte"), "{err}");
    fs::write(&file, &orig).unwrap();

    let lfile = dir.join("train-labels-idx1-ubyte");
    let lorig = fs::read(&lfile).unwrap();
    let mut bytes = lorig.clone();
    bytes[8 + 5] = 10;
    fs::write(&lfile, &bytes).unwrap();
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(
        err.contains("label 10 at index 5") && err.contains("train-labels-idx1-ubyte"),
        "{err}"
    );

    // 63 labels (header and payload agree) for 64 images.
    let mut bytes = lorig[..lorig.len() - 1].to_vec();
    bytes[4..8].copy_from_slice(&63u32.to_be_bytes());
    fs::write(&lfile, &bytes).unwrap();
    let err = load_err(DatasetName::FashionMnist, tmp.path());
    assert!(
        err.contains("63 labels")
            && err.contains("64 images")
            && err.contains("train-labels-idx1-ubyte"),
        "{err}"
    );
}

#[test]
fn missing_data_is_an_error_naming_the_path_and_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let nowhere = tmp.path().join("nowhere");
    for (name, sub) in [(DatasetName::Mnist, "mnist"), (DatasetName::FashionMnist, "fashion-mnist")]
    {
        let err = load_err(name, &nowhere);
        assert!(err.contains(&nowhere.join(sub).display().to_string()), "{err}");
        assert!(
            err.contains(&format!("'{name}'"))
                && err.contains("--data-dir")
                && err.contains("$LMC_DATA_DIR"),
            "{err}"
        );
    }
    let err = load_err(DatasetName::Cifar10, &nowhere);
    assert!(
        err.contains(&nowhere.display().to_string()) && err.contains("cifar-10-binary.tar.gz"),
        "{err}"
    );
    assert!(err.contains("'cifar10'") && err.contains("--data-dir"), "{err}");

    // One file missing.
    let dir = tmp.path().join("mnist");
    copy_dir(&fixtures().join("mnist"), &dir);
    fs::remove_file(dir.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let err = load_err(DatasetName::Mnist, tmp.path());
    assert!(err.contains("t10k-labels-idx1-ubyte") && err.contains("--data-dir"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// CIFAR-10.

#[test]
fn cifar_folder_and_tar_give_the_same_dataset() {
    let fx = fixtures();
    let from_folder = load(DatasetName::Cifar10, Some(&fx)).unwrap();
    let from_tar = load(DatasetName::Cifar10, Some(&fx.join("cifar-tar"))).unwrap();
    assert_eq!(from_folder, from_tar);
    assert_eq!(
        load_cifar10_tar(&fx.join("cifar-tar/cifar-10-binary.tar.gz")).unwrap(),
        from_folder
    );
    assert_eq!(load_cifar10_folder(&fx.join("cifar-10-batches-bin")).unwrap(), from_folder);

    let ds = from_folder;
    assert_eq!(ds.name, "cifar10");
    assert_eq!((ds.train.len(), ds.test.len()), (25, 10));
    assert_eq!(ds.train.shape, ImageShape { channels: 3, height: 32, width: 32 });
    assert_eq!(ds.class_names, CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(ds.augment_default);
    assert_eq!(ds.norm.mean, vec![0.4914, 0.4822, 0.4465]);
    assert_eq!(ds.norm.std, vec![0.2470, 0.2435, 0.2616]);
    // Records are label byte + CHW pixels; train batches are concatenated 1..5.
    let (px, scale) = u8_pixels(&ds.train);
    assert_eq!(scale, 1.0 / 255.0);
    for (b, name) in ["data_batch_1.bin", "data_batch_2.bin", "data_batch_5.bin"].iter().enumerate()
    {
        let raw = fs::read(fx.join("cifar-10-batches-bin").join(name)).unwrap();
        let first = [0, 5, 20][b];
        assert_eq!(ds.train.labels[first], raw[0]);
        assert_eq!(&px[first * 3072..(first + 1) * 3072], &raw[1..3073]);
        assert_eq!(ds.train.labels[first + 1], raw[3073]);
    }
    let raw = fs::read(fx.join("cifar-10-batches-bin/test_batch.bin")).unwrap();
    assert_eq!(u8_pixels(&ds.test).0[9 * 3072..], raw[9 * 3073 + 1..]);
}

#[test]
fn cifar_meta_gives_class_names_else_the_standard_list() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    copy_dir(&fixtures().join("cifar-10-batches-bin"), &dir);
    let names = "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n\n";
    fs::write(dir.join("batches.meta.txt"), names).unwrap();
    let ds = load(DatasetName::Cifar10, Some(tmp.path())).unwrap();
    assert_eq!(ds.class_names[9], "j");
    fs::remove_file(dir.join("batches.meta.txt")).unwrap();
    let ds = load(DatasetName::Cifar10, Some(tmp.path())).unwrap();
    assert_eq!(ds.class_names[0], "airplane");
}

#[test]
fn cifar_truncated_or_missing_batch_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar-10-batches-bin");
    copy_dir(&fixtures().join("cifar-10-batches-bin"), &dir);
    let file = dir.join("data_batch_3.bin");
    let len = fs::metadata(&file).unwrap().len() as usize;
    cut(&file, len - 7);
    let err = load_err(DatasetName::Cifar10, tmp.path());
    assert!(err.contains(&file.display().to_string()) && err.contains("3073"), "{err}");

    fs::remove_file(&file).unwrap();
    let err = load_err(DatasetName::Cifar10, tmp.path());
    assert!(err.contains(&file.display().to_string()) && err.contains("--data-dir"), "{err}");

    fs::copy(fixtures().join("cifar-10-batches-bin/data_batch_3.bin"), &file).unwrap();
    let mut bytes = fs::read(dir.join("test_batch.bin")).unwrap();
    bytes[3073] = 11;
    fs::write(dir.join("test_batch.bin"), bytes).unwrap();
    let err = load_err(DatasetName::Cifar10, tmp.path());
    assert!(err.contains("test_batch.bin") && err.contains("record 1 has label 11"), "{err}");
}

#[test]
fn cifar_truncated_or_incomplete_archive_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let archive = tmp.path().join("cifar-10-binary.tar.gz");
    let good = fs::read(fixtures().join("cifar-tar/cifar-10-binary.tar.gz")).unwrap();
    for keep in [good.len() / 3, good.len() - 8, 5] {
        fs::write(&archive, &good[..keep]).unwrap();
        let err = load_err(DatasetName::Cifar10, tmp.path());
        assert!(err.contains(&archive.display().to_string()), "keep {keep}: {err}");
    }
    // An uncompressed tar cut inside a member, then re-gzipped (a valid gzip stream).
    let tar_bytes = gunzip(&good);
    fs::write(&archive, gzip(&tar_bytes[..tar_bytes.len() / 2])).unwrap();
    let err = load_err(DatasetName::Cifar10, tmp.path());
    assert!(err.contains("cifar-10-binary.tar.gz"), "{err}");
    // An archive without data_batch_4.bin.
    let mut builder = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(tar_bytes.as_slice());
    for entry in ar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().into_owned();
        if path.ends_with("data_batch_4.bin") {
            continue;
        }
        let mut header = entry.header().clone();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        builder.append_data(&mut header, path, data.as_slice()).unwrap();
    }
    fs::write(&archive, gzip(&builder.into_inner().unwrap())).unwrap();
    let err = load_err(DatasetName::Cifar10, tmp.path());
    assert!(err.contains("cifar-10-binary.tar.gz") && err.contains("data_batch_4.bin"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// CIFAR-100 (binary version). The real data is not in the shared folder: the tests write small
// files in its layout (records of coarse label, fine label, 3,072 pixel bytes).

/// `n` CIFAR-100 records: image `i` has fine label `(first + i) % 100`, coarse label fine / 5,
/// and pixel `j` = `(first + i) * 7 + j` mod 256.
fn cifar100_records(first: usize, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 3074);
    for i in first..first + n {
        let fine = (i % 100) as u8;
        out.push(fine / 5);
        out.push(fine);
        out.extend((0..3072).map(|j| ((i * 7 + j) % 256) as u8));
    }
    out
}

/// Writes `DIR/cifar-100-binary/` with 120 training and 30 test records; returns the folder.
fn write_cifar100(dir: &Path) -> PathBuf {
    let folder = dir.join("cifar-100-binary");
    fs::create_dir_all(&folder).unwrap();
    fs::write(folder.join("train.bin"), cifar100_records(0, 120)).unwrap();
    fs::write(folder.join("test.bin"), cifar100_records(1000, 30)).unwrap();
    folder
}

/// The gzipped tar of a folder's files, under `cifar-100-binary/` (as the published archive).
fn tar_gz_of(folder: &Path, skip: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut names: Vec<_> = fs::read_dir(folder).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    for path in names {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name == skip {
            continue;
        }
        builder.append_path_with_name(&path, format!("cifar-100-binary/{name}")).unwrap();
    }
    gzip(&builder.into_inner().unwrap())
}

#[test]
fn cifar100_folder_and_tar_give_fine_labels_and_pixels() {
    let tmp = tempfile::tempdir().unwrap();
    let folder = write_cifar100(tmp.path());
    let ds = load(DatasetName::Cifar100, Some(tmp.path())).unwrap();
    assert_eq!(ds.name, "cifar100");
    assert_eq!((ds.train.len(), ds.test.len(), ds.classes), (120, 30, 100));
    assert_eq!(ds.train.shape, ImageShape { channels: 3, height: 32, width: 32 });
    assert!(ds.augment_default);
    assert_eq!(ds.norm, DatasetName::Cifar100.normalization());
    assert_eq!(ds.norm.mean, vec![0.5071, 0.4865, 0.4409]);
    assert_eq!(ds.norm.std, vec![0.2673, 0.2564, 0.2762]);
    assert_eq!(DatasetName::Cifar100.classes(), 100);
    // Fine labels, not coarse ones: record 57 is fine 57 (coarse 11); test record 3 is 1003 % 100.
    assert_eq!(ds.train.labels[57], 57);
    assert_eq!(ds.train.labels[107], 7);
    assert_eq!(ds.test.labels[3], 3);
    let raw = fs::read(folder.join("train.bin")).unwrap();
    let (px, scale) = u8_pixels(&ds.train);
    assert_eq!(scale, 1.0 / 255.0);
    assert_eq!(&px[57 * 3072..58 * 3072], &raw[57 * 3074 + 2..58 * 3074]);
    assert_eq!(px[3072], 7); // image 1, pixel 0: 1 * 7
    assert_eq!(ds.class_names.len(), 100);
    assert_eq!((ds.class_names[0].as_str(), ds.class_names[99].as_str()), ("apple", "worm"));

    // The names file, when it holds 100 names, gives the class names.
    let names: String = (0..100).map(|i| format!("class{i}\n")).collect();
    fs::write(folder.join("fine_label_names.txt"), &names).unwrap();
    fs::write(folder.join("coarse_label_names.txt"), "a\nb\n").unwrap();
    let ds = load_cifar100_folder(&folder).unwrap();
    assert_eq!(ds.class_names[42], "class42");

    // The same from the archive (the folder is gone, so the data folder falls back to it).
    let archive = tmp.path().join("cifar-100-binary.tar.gz");
    fs::write(&archive, tar_gz_of(&folder, "")).unwrap();
    fs::remove_dir_all(&folder).unwrap();
    assert_eq!(load(DatasetName::Cifar100, Some(tmp.path())).unwrap(), ds);
    assert_eq!(load_cifar100_tar(&archive).unwrap(), ds);
}

#[test]
fn cifar100_bad_records_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(
        err.contains("cifar-100-binary.tar.gz")
            && err.contains("'cifar100'")
            && err.contains("--data-dir"),
        "{err}"
    );
    let folder = write_cifar100(tmp.path());
    let train = folder.join("train.bin");
    // A record cut short (and a CIFAR-10 batch, whose 3,073-byte records do not divide).
    cut(&train, 3 * 3074 + 100);
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(
        err.contains(&train.display().to_string())
            && err.contains("3074-byte CIFAR-100 record")
            && err.contains("1 coarse label byte + 1 fine label byte + 3072 pixel bytes"),
        "{err}"
    );
    assert!(!err.contains('\n'), "{err}");
    fs::write(&train, vec![0u8; 3073 * 2]).unwrap();
    assert!(load_err(DatasetName::Cifar100, tmp.path()).contains("3074-byte"));
    // A fine label of 100, a coarse label of 20.
    let mut bytes = cifar100_records(0, 10);
    bytes[4 * 3074 + 1] = 100;
    fs::write(&train, &bytes).unwrap();
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(err.contains("train.bin") && err.contains("record 4 has fine label 100"), "{err}");
    let mut bytes = cifar100_records(0, 10);
    bytes[2 * 3074] = 20;
    fs::write(&train, &bytes).unwrap();
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(err.contains("record 2 has coarse label 20, which is not below 20"), "{err}");
    // A missing test file.
    fs::write(&train, cifar100_records(0, 10)).unwrap();
    fs::remove_file(folder.join("test.bin")).unwrap();
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(err.contains(&folder.join("test.bin").display().to_string()), "{err}");

    // Archives: without test.bin, truncated, and with a bad record inside.
    fs::write(folder.join("test.bin"), cifar100_records(0, 5)).unwrap();
    let archive = tmp.path().join("cifar-100-binary.tar.gz");
    let good = tar_gz_of(&folder, "");
    let no_test = tar_gz_of(&folder, "test.bin");
    fs::remove_dir_all(&folder).unwrap();
    fs::write(&archive, &no_test).unwrap();
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(
        err.contains("cifar-100-binary.tar.gz") && err.contains("cifar-100-binary/test.bin"),
        "{err}"
    );
    for keep in [good.len() / 2, good.len() - 8, 5] {
        fs::write(&archive, &good[..keep]).unwrap();
        let err = load_err(DatasetName::Cifar100, tmp.path());
        assert!(err.contains(&archive.display().to_string()), "keep {keep}: {err}");
    }
    let odd = tmp.path().join("odd");
    fs::create_dir_all(&odd).unwrap();
    fs::write(odd.join("train.bin"), cifar100_records(0, 4)).unwrap();
    fs::write(odd.join("test.bin"), &cifar100_records(0, 4)[..3074 * 3 + 1]).unwrap();
    fs::write(&archive, tar_gz_of(&odd, "")).unwrap();
    let err = load_err(DatasetName::Cifar100, tmp.path());
    assert!(
        err.contains("cifar-100-binary.tar.gz")
            && err.contains("member cifar-100-binary/test.bin")
            && err.contains("3074"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// Shuffling and batching.

#[test]
fn epoch_order_is_a_deterministic_permutation() {
    for n in [0usize, 1, 2, 7, 1000] {
        let a = epoch_order(n, 42, 3);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(n, 42, 3));
    }
    let a = epoch_order(1000, 42, 0);
    assert_ne!(a, epoch_order(1000, 42, 1));
    assert_ne!(a, epoch_order(1000, 43, 0));
    assert_ne!(a, (0..1000).collect::<Vec<u32>>());
}

#[test]
fn batches_cover_the_range() {
    let b: Vec<_> = batches(10, 4, false).collect();
    assert_eq!(b, vec![0..4, 4..8, 8..10]);
    assert_eq!(batches(10, 4, true).collect::<Vec<_>>(), vec![0..4, 4..8]);
    assert_eq!(batches(8, 4, false).len(), 2);
    assert_eq!(batches(3, 4, true).len(), 0);
    assert_eq!(batches(0, 4, false).len(), 0);
}

#[test]
fn subset_picks_images_in_order() {
    let ds = load_digits().unwrap();
    let sub = ds.train.subset(&[5, 0, 5]);
    assert_eq!(sub.len(), 3);
    assert_eq!(sub.labels, vec![ds.train.labels[5], ds.train.labels[0], ds.train.labels[5]]);
    let (px, _) = u8_pixels(&ds.train);
    assert_eq!(&u8_pixels(&sub).0[64..128], &px[..64]);
    assert!(ds.train.subset(&[]).is_empty());
}

/// A 3-channel 2x2 toy set with known bytes.
fn toy() -> (ImageSet, Normalization) {
    let data: Vec<u8> = (0..24).map(|i| (i * 10) as u8).collect();
    let set = ImageSet {
        shape: ImageShape { channels: 3, height: 2, width: 2 },
        pixels: Pixels::U8 { data, scale: 1.0 / 255.0 },
        labels: vec![1, 2],
    };
    (set, Normalization { mean: vec![0.5, 0.25, 0.0], std: vec![0.5, 0.25, 2.0] })
}

#[test]
fn fill_batch_normalises_by_hand() {
    let (set, norm) = toy();
    let mut b = Batch::new();
    fill_batch(&set, &norm, &[1, 0], None, &mut b);
    assert_eq!(b.n, 2);
    assert_eq!(b.labels, vec![2, 1]);
    assert_eq!(b.x.len(), 24);
    // Image 1, channel 1, pixel 2 is byte (12 + 4 + 2) * 10 = 180: (180/255 - 0.25) / 0.25.
    let want = (180.0 / 255.0 - 0.25) / 0.25;
    assert!((b.x[4 + 2] - want).abs() < 1e-6, "{} vs {want}", b.x[6]);
    // Image 0, channel 2, pixel 3 is byte 110: (110/255 - 0) / 2.
    assert!((b.x[12 + 8 + 3] - 110.0 / 255.0 / 2.0).abs() < 1e-6);
    // Image 0, channel 0, pixel 0 is byte 0: -mean/std = -1.
    assert_eq!(b.x[12], -1.0);

    // F32 pixels are copied as is.
    let f =
        ImageSet { pixels: Pixels::F32((0..24).map(|i| i as f32 * 0.5).collect()), ..set.clone() };
    fill_batch(&f, &norm, &[1], None, &mut b);
    assert_eq!(b.n, 1);
    assert_eq!(b.x, (12..24).map(|i| i as f32 * 0.5).collect::<Vec<_>>());
}

#[test]
fn fill_batch_reuses_its_buffers() {
    let ds = load(DatasetName::Cifar10, Some(&fixtures())).unwrap();
    let mut b = Batch::new();
    let mut r = rng(1, Stream::Augment, 0);
    fill_batch(&ds.train, &ds.norm, &[0, 1, 2, 3], Some(&mut r), &mut b);
    let (px, lb) = (b.x.as_ptr(), b.labels.as_ptr());
    fill_batch(&ds.train, &ds.norm, &[4, 5, 6, 7], Some(&mut r), &mut b);
    fill_batch(&ds.train, &ds.norm, &[8, 9], None, &mut b);
    assert_eq!((b.x.as_ptr(), b.labels.as_ptr()), (px, lb));
    assert_eq!(b.x.len(), 2 * 3072);
}

#[test]
fn crop_flip_semantics() {
    let shape = ImageShape { channels: 2, height: 5, width: 6 };
    let src: Vec<u8> = (1..=60).collect();
    let mut out = vec![0u8; 60];
    // Offset (4, 4) is the unpadded window: identity.
    crop_flip(&src, shape, 4, 4, false, &mut out);
    assert_eq!(out, src);
    // Flip reverses every row.
    crop_flip(&src, shape, 4, 4, true, &mut out);
    for row in 0..10 {
        let mut r = src[row * 6..(row + 1) * 6].to_vec();
        r.reverse();
        assert_eq!(&out[row * 6..(row + 1) * 6], &r[..]);
    }
    // Offsets shift the window over the zero-padded image.
    for (dy, dx) in [(0, 0), (8, 8), (3, 6), (5, 1)] {
        for flip in [false, true] {
            crop_flip(&src, shape, dy, dx, flip, &mut out);
            for c in 0..2 {
                for y in 0..5 {
                    for x in 0..6 {
                        let cx = if flip { 5 - x } else { x };
                        let (sy, sx) =
                            (y as isize + dy as isize - 4, cx as isize + dx as isize - 4);
                        let want = if (0..5).contains(&sy) && (0..6).contains(&sx) {
                            src[c * 30 + sy as usize * 6 + sx as usize]
                        } else {
                            0
                        };
                        assert_eq!(
                            out[c * 30 + y * 6 + x],
                            want,
                            "dy {dy} dx {dx} flip {flip} ({c},{y},{x})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn fill_batch_augment_draws_dy_dx_flip_per_image_in_order() {
    use rand::Rng;
    let ds = load(DatasetName::Cifar10, Some(&fixtures())).unwrap();
    let idx: Vec<u32> = vec![3, 17, 0, 24, 9];
    let mut r = rng(7, Stream::Augment, 2);
    let mut b = Batch::new();
    fill_batch(&ds.train, &ds.norm, &idx, Some(&mut r), &mut b);

    let mut r2 = rng(7, Stream::Augment, 2);
    let (px, scale) = u8_pixels(&ds.train);
    let shape = ds.train.shape;
    let mut cropped = vec![0u8; 3072];
    let mut flips = 0;
    for (k, &i) in idx.iter().enumerate() {
        let dy = r2.gen_range(0..=8u32) as usize;
        let dx = r2.gen_range(0..=8u32) as usize;
        let flip = r2.gen_bool(0.5);
        flips += flip as usize;
        crop_flip(
            &px[i as usize * 3072..(i as usize + 1) * 3072],
            shape,
            dy,
            dx,
            flip,
            &mut cropped,
        );
        for (j, &byte) in cropped.iter().enumerate() {
            let c = j / 1024;
            let want = (byte as f32 * scale - ds.norm.mean[c]) / ds.norm.std[c];
            assert!((b.x[k * 3072 + j] - want).abs() < 1e-6, "image {k} value {j}");
        }
    }
    assert!(flips < idx.len()); // not a degenerate draw sequence
                                // The generator has advanced by exactly the draws above.
    assert_eq!(r.gen::<u64>(), r2.gen::<u64>());
}

#[test]
fn fill_batch_augment_ignores_the_thread_count() {
    let ds = load(DatasetName::Cifar10, Some(&fixtures())).unwrap();
    let idx = epoch_order(ds.train.len(), 5, 0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut r = rng(5, Stream::Augment, 0);
            let mut b = Batch::new();
            fill_batch(&ds.train, &ds.norm, &idx, Some(&mut r), &mut b);
            b
        })
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(4));
    // And augmentation really changed something.
    let mut plain = Batch::new();
    fill_batch(&ds.train, &ds.norm, &idx, None, &mut plain);
    assert_ne!(one.x, plain.x);
    assert_eq!(one.labels, plain.labels);
}

#[test]
fn split_stats_by_hand() {
    let (set, _) = toy();
    let s = split_stats(&set, 4);
    assert_eq!(s.count, 2);
    assert_eq!(s.per_class, vec![0, 1, 1, 0]);
    // Channel 0 holds bytes 0,10,20,30 (image 0) and 120,130,140,150 (image 1).
    let vals = [0.0, 10.0, 20.0, 30.0, 120.0, 130.0, 140.0, 150.0].map(|v: f64| v / 255.0);
    let m = vals.iter().sum::<f64>() / 8.0;
    let sd = (vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 8.0).sqrt();
    assert!((s.mean[0] - m).abs() < 1e-12 && (s.std[0] - sd).abs() < 1e-12, "{s:?}");
    let f = ImageSet {
        pixels: Pixels::F32(u8_pixels(&set).0.iter().map(|&b| b as f32 / 255.0).collect()),
        ..set.clone()
    };
    let fs_ = split_stats(&f, 3);
    assert!((fs_.mean[0] - m).abs() < 1e-6 && (fs_.std[0] - sd).abs() < 1e-6, "{fs_:?}");
    let json = serde_json::to_string(&s).unwrap();
    assert!(json.contains("\"per_class\":[0,1,1,0]"), "{json}");
}

// ---------------------------------------------------------------------------------------------
// The full data sets (only where the shared data folder is present).

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < tol, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn real_mnist() {
    let Some(dir) = shared_data() else { return };
    let t = std::time::Instant::now();
    let ds = load(DatasetName::Mnist, Some(&dir)).unwrap();
    eprintln!("full MNIST loaded in {:?}", t.elapsed());
    assert_eq!((ds.train.len(), ds.test.len()), (60000, 10000));
    assert_eq!(&ds.train.labels[..10], &MNIST_TRAIN_FIRST);
    assert_eq!(&ds.test.labels[..10], &MNIST_TEST_FIRST);
    let s = split_stats(&ds.train, 10);
    assert_eq!(s.per_class[5], 5421); // the well-known MNIST train count of fives
    assert_close("MNIST mean/std", &[s.mean[0], s.std[0]], &[0.1307, 0.3081], 5e-4);
}

#[test]
fn real_fashion_mnist() {
    let Some(dir) = shared_data() else { return };
    let ds = load(DatasetName::FashionMnist, Some(&dir)).unwrap();
    assert_eq!((ds.train.len(), ds.test.len()), (60000, 10000));
    let s = split_stats(&ds.train, 10);
    assert_eq!(s.per_class, vec![6000; 10]);
    assert_eq!(split_stats(&ds.test, 10).per_class, vec![1000; 10]);
    assert_close("Fashion-MNIST mean/std", &[s.mean[0], s.std[0]], &[0.2860, 0.3530], 5e-4);
}

#[test]
fn real_cifar10_from_tar() {
    let Some(dir) = shared_data() else { return };
    let t = std::time::Instant::now();
    let ds = load_cifar10_tar(&dir.join("cifar-10-binary.tar.gz")).unwrap();
    eprintln!("full CIFAR-10 loaded from tar.gz in {:?}", t.elapsed());
    assert_eq!((ds.train.len(), ds.test.len()), (50000, 10000));
    assert_eq!(ds.class_names, CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let s = split_stats(&ds.train, 10);
    assert_eq!(s.per_class, vec![5000; 10]);
    assert_eq!(split_stats(&ds.test, 10).per_class, vec![1000; 10]);
    assert_close("CIFAR-10 mean", &s.mean, &[0.4914, 0.4822, 0.4465], 5e-4);
    assert_close("CIFAR-10 std", &s.std, &[0.2470, 0.2435, 0.2616], 5e-4);
    // The normalisation constants are these statistics.
    let norm: Vec<f64> = ds.norm.mean.iter().chain(&ds.norm.std).map(|&v| v as f64).collect();
    assert_close("CIFAR-10 norm", &norm, &[s.mean.clone(), s.std.clone()].concat(), 5e-4);
}
