//! CIFAR-10 and CIFAR-100, binary versions: `cifar-10-batches-bin/` or `cifar-100-binary/`, or
//! streamed out of `cifar-10-binary.tar.gz` / `cifar-100-binary.tar.gz`.
//!
//! Both are files of fixed-size records: label byte(s), then the 3,072 bytes of one 32x32 image
//! as R, G, B planes. A CIFAR-10 record has one label; a CIFAR-100 record has the coarse label
//! (20 superclasses) then the fine label (100 classes), and `lmc` trains on the fine one.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{missing, Dataset, DatasetName, ImageSet, ImageShape, Pixels};
use crate::{Error, Result};

/// The standard CIFAR-10 class names, in label order (used when `batches.meta.txt` is absent or odd).
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The standard CIFAR-100 fine class names, in label order (as in the archive's
/// `fine_label_names.txt`; used when that file is absent or odd).
pub const CIFAR100_CLASSES: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// Bytes of one image (3 planes of 32x32).
const IMAGE: usize = 3 * 32 * 32;

/// How one of the two binary versions is laid out.
struct Format {
    name: DatasetName,
    /// How error messages name it.
    title: &'static str,
    /// The folder inside the data folder (and inside the archive).
    folder: &'static str,
    /// The archive inside the data folder.
    archive: &'static str,
    /// The data files: training files, then the test file last.
    files: &'static [&'static str],
    /// The files, as a missing-data message lists them.
    files_text: &'static str,
    /// The optional class-name file (one name per line).
    meta: &'static str,
    /// The label bytes before each image (name, exclusive bound); the last one is the label
    /// trained on.
    labels: &'static [(&'static str, u8)],
    /// Class names when `meta` is absent or does not hold one per class.
    default_names: &'static [&'static str],
}

impl Format {
    /// Bytes of one record: the label bytes, then the image.
    fn record(&self) -> usize {
        self.labels.len() + IMAGE
    }

    fn classes(&self) -> usize {
        self.default_names.len()
    }
}

const CIFAR10: Format = Format {
    name: DatasetName::Cifar10,
    title: "CIFAR-10",
    folder: "cifar-10-batches-bin",
    archive: "cifar-10-binary.tar.gz",
    files: &[
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ],
    files_text: "data_batch_1..5.bin, test_batch.bin",
    meta: "batches.meta.txt",
    labels: &[("label", 10)],
    default_names: &CIFAR10_CLASSES,
};

const CIFAR100: Format = Format {
    name: DatasetName::Cifar100,
    title: "CIFAR-100",
    folder: "cifar-100-binary",
    archive: "cifar-100-binary.tar.gz",
    files: &["train.bin", "test.bin"],
    files_text: "train.bin, test.bin",
    meta: "fine_label_names.txt",
    labels: &[("coarse label", 20), ("fine label", 100)],
    default_names: &CIFAR100_CLASSES,
};

/// Where some bytes came from, for error messages.
struct Origin {
    path: PathBuf,
    member: Option<String>,
}

impl Origin {
    fn error(&self, msg: impl std::fmt::Display) -> Error {
        match &self.member {
            Some(m) => Error::bad_file(&self.path, format!("member {m}: {msg}")),
            None => Error::bad_file(&self.path, msg.to_string()),
        }
    }
}

/// Checks one data file's bytes; returns its record count.
fn check_batch(f: &Format, origin: &Origin, raw: &[u8]) -> Result<usize> {
    let record = f.record();
    let records = raw.len() / record;
    if records == 0 || records * record != raw.len() {
        let labels: String = f.labels.iter().map(|(n, _)| format!("1 {n} byte + ")).collect();
        return Err(origin.error(format!(
            "size {} bytes is not a positive multiple of the {record}-byte {} record \
             ({labels}{IMAGE} pixel bytes); the file is truncated or not a {} binary batch",
            raw.len(),
            f.title,
            f.title,
        )));
    }
    for (k, &(what, bound)) in f.labels.iter().enumerate() {
        if let Some(i) = raw.chunks_exact(record).position(|r| r[k] >= bound) {
            return Err(origin.error(format!(
                "record {i} has {what} {}, which is not below {bound}",
                raw[i * record + k]
            )));
        }
    }
    Ok(records)
}

/// Concatenates checked data files into one split. Each record's image is already CHW (R, G, B
/// planes); its label is the last label byte.
fn assemble(f: &Format, batches: Vec<Vec<u8>>) -> ImageSet {
    let record = f.record();
    let skip = f.labels.len();
    let n: usize = batches.iter().map(|b| b.len() / record).sum();
    let mut labels = Vec::with_capacity(n);
    let mut data = vec![0u8; n * IMAGE];
    let mut offset = 0;
    for raw in batches {
        let count = raw.len() / record;
        labels.extend(raw.chunks_exact(record).map(|r| r[skip - 1]));
        data[offset * IMAGE..(offset + count) * IMAGE]
            .par_chunks_mut(IMAGE)
            .zip(raw.par_chunks_exact(record))
            .with_min_len(256)
            .for_each(|(dst, rec)| dst.copy_from_slice(&rec[skip..]));
        offset += count;
    }
    ImageSet {
        shape: ImageShape { channels: 3, height: 32, width: 32 },
        pixels: Pixels::U8 { data, scale: 1.0 / 255.0 },
        labels,
    }
}

/// Class names from the meta file (one per line), or the standard list if it does not hold one
/// name per class.
fn class_names(f: &Format, meta: Option<&str>) -> Vec<String> {
    let from_meta: Vec<String> = meta
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    if from_meta.len() == f.classes() {
        from_meta
    } else {
        f.default_names.iter().map(|s| s.to_string()).collect()
    }
}

/// Builds the dataset from the data files' bytes (training files, then test), already checked.
fn dataset(f: &Format, mut raws: Vec<Vec<u8>>, meta: Option<&str>) -> Dataset {
    let test = raws.pop().expect("a test file");
    let (train, test) = rayon::join(|| assemble(f, raws), || assemble(f, vec![test]));
    Dataset {
        name: f.name.as_str().to_string(),
        train,
        test,
        classes: f.classes(),
        class_names: class_names(f, meta),
        norm: f.name.normalization(),
        augment_default: true,
    }
}

/// Loads CIFAR-10 from the data folder: `DIR/cifar-10-batches-bin/` if that folder exists, else
/// straight out of `DIR/cifar-10-binary.tar.gz` (streamed, nothing is extracted to disk).
pub fn load_cifar10(data_dir: &Path) -> Result<Dataset> {
    load_from_dir(&CIFAR10, data_dir)
}

/// Loads CIFAR-10 from a `cifar-10-batches-bin` folder holding `data_batch_1..5.bin`,
/// `test_batch.bin` and optionally `batches.meta.txt`.
pub fn load_cifar10_folder(folder: &Path) -> Result<Dataset> {
    load_folder(&CIFAR10, folder)
}

/// Loads CIFAR-10 straight out of `cifar-10-binary.tar.gz` (members are matched by file name, so
/// the folder inside the archive may be named anything).
pub fn load_cifar10_tar(archive: &Path) -> Result<Dataset> {
    load_tar(&CIFAR10, archive)
}

/// Loads CIFAR-100 (fine labels) from the data folder: `DIR/cifar-100-binary/` if that folder
/// exists, else straight out of `DIR/cifar-100-binary.tar.gz`.
pub fn load_cifar100(data_dir: &Path) -> Result<Dataset> {
    load_from_dir(&CIFAR100, data_dir)
}

/// Loads CIFAR-100 from a `cifar-100-binary` folder holding `train.bin`, `test.bin` and
/// optionally `fine_label_names.txt`.
pub fn load_cifar100_folder(folder: &Path) -> Result<Dataset> {
    load_folder(&CIFAR100, folder)
}

/// Loads CIFAR-100 straight out of `cifar-100-binary.tar.gz` (members matched by file name).
pub fn load_cifar100_tar(archive: &Path) -> Result<Dataset> {
    load_tar(&CIFAR100, archive)
}

fn load_from_dir(f: &Format, data_dir: &Path) -> Result<Dataset> {
    let folder = data_dir.join(f.folder);
    if folder.is_dir() {
        return load_folder(f, &folder);
    }
    let archive = data_dir.join(f.archive);
    if archive.is_file() {
        return load_tar(f, &archive);
    }
    Err(missing(
        data_dir,
        f.name,
        &format!(
            "the folder {}/ ({}) or the archive {} in this folder",
            f.folder, f.files_text, f.archive
        ),
    ))
}

fn load_folder(f: &Format, folder: &Path) -> Result<Dataset> {
    if !folder.is_dir() {
        return Err(missing(
            folder,
            f.name,
            &format!("this folder with {}", f.files_text.replace(", ", " and ")),
        ));
    }
    let raws = f
        .files
        .par_iter()
        .map(|name| {
            let path = folder.join(name);
            if !path.is_file() {
                return Err(missing(&path, f.name, "this batch file"));
            }
            let raw = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            check_batch(f, &Origin { path, member: None }, &raw)?;
            Ok(raw)
        })
        .collect::<Result<Vec<_>>>()?;
    let meta_path = folder.join(f.meta);
    let meta = if meta_path.is_file() {
        Some(std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?)
    } else {
        None
    };
    Ok(dataset(f, raws, meta.as_deref()))
}

fn load_tar(f: &Format, archive: &Path) -> Result<Dataset> {
    if !archive.is_file() {
        return Err(missing(archive, f.name, "this archive"));
    }
    let file = File::open(archive).map_err(|e| Error::io(archive, e))?;
    let corrupt = |e: std::io::Error| {
        Error::bad_file(
            archive,
            format!("cannot read the archive ({e}); it is truncated or corrupt"),
        )
    };
    let gz = flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 20, file));
    let mut tar = tar::Archive::new(gz);
    let mut raws: Vec<Option<Vec<u8>>> = vec![None; f.files.len()];
    let mut meta: Option<String> = None;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let member = entry.path().map_err(corrupt)?.into_owned();
        let Some(file_name) = member.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let slot = f.files.iter().position(|b| *b == file_name);
        if slot.is_none() && file_name != f.meta {
            continue;
        }
        let size = entry.header().size().map_err(corrupt)?;
        let mut raw = Vec::with_capacity((size as usize).min(1 << 28));
        entry.read_to_end(&mut raw).map_err(corrupt)?;
        let origin =
            Origin { path: archive.to_path_buf(), member: Some(member.display().to_string()) };
        if raw.len() as u64 != size {
            return Err(origin.error(format!(
                "the archive is truncated: the member should hold {size} bytes, found {}",
                raw.len()
            )));
        }
        match slot {
            Some(i) => {
                check_batch(f, &origin, &raw)?;
                raws[i] = Some(raw);
            }
            None => meta = Some(String::from_utf8_lossy(&raw).into_owned()),
        }
    }
    // Read the stream to its end so that gzip's length and CRC-32 trailer is checked.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
    let raws = raws
        .into_iter()
        .zip(f.files)
        .map(|(r, name)| {
            r.ok_or_else(|| {
                Error::bad_file(archive, format!("the archive has no member {}/{name}", f.folder))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(dataset(f, raws, meta.as_deref()))
}
