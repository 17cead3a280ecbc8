//! CIFAR-10, binary version: `cifar-10-batches-bin/` or streamed out of `cifar-10-binary.tar.gz`.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::{missing, Dataset, DatasetName, ImageSet, ImageShape, Pixels};
use crate::{Error, Result};

/// The standard CIFAR-10 class names, in label order (used when `batches.meta.txt` is absent or odd).
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// The folder inside the data folder (and inside the archive).
const FOLDER: &str = "cifar-10-batches-bin";
/// The archive inside the data folder.
const ARCHIVE: &str = "cifar-10-binary.tar.gz";
/// The batch files: five training batches, then the test batch.
const BATCHES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];
const META: &str = "batches.meta.txt";
/// Bytes of one image (3 planes of 32x32).
const IMAGE: usize = 3 * 32 * 32;
/// Bytes of one record: the label byte, then the image.
const RECORD: usize = 1 + IMAGE;

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

/// Checks one batch file's bytes; returns its record count.
fn check_batch(origin: &Origin, raw: &[u8]) -> Result<usize> {
    let records = raw.len() / RECORD;
    if records == 0 || records * RECORD != raw.len() {
        return Err(origin.error(format!(
            "size {} bytes is not a positive multiple of the {RECORD}-byte CIFAR-10 record \
             (1 label byte + {IMAGE} pixel bytes); the file is truncated or not a CIFAR-10 binary batch",
            raw.len()
        )));
    }
    if let Some(i) = raw.chunks_exact(RECORD).position(|r| r[0] >= 10) {
        return Err(origin
            .error(format!("record {i} has label {}, which is not below 10", raw[i * RECORD])));
    }
    Ok(records)
}

/// Concatenates checked batch files into one split. Each record's image is already CHW (R, G, B planes).
fn assemble(batches: Vec<Vec<u8>>) -> ImageSet {
    let n: usize = batches.iter().map(|b| b.len() / RECORD).sum();
    let mut labels = Vec::with_capacity(n);
    let mut data = vec![0u8; n * IMAGE];
    let mut offset = 0;
    for raw in batches {
        let count = raw.len() / RECORD;
        labels.extend(raw.chunks_exact(RECORD).map(|r| r[0]));
        data[offset * IMAGE..(offset + count) * IMAGE]
            .par_chunks_mut(IMAGE)
            .zip(raw.par_chunks_exact(RECORD))
            .with_min_len(256)
            .for_each(|(dst, rec)| dst.copy_from_slice(&rec[1..]));
        offset += count;
    }
    ImageSet {
        shape: ImageShape { channels: 3, height: 32, width: 32 },
        pixels: Pixels::U8 { data, scale: 1.0 / 255.0 },
        labels,
    }
}

/// Class names from `batches.meta.txt` (one per line), or the standard list if it does not hold 10 names.
fn class_names(meta: Option<&str>) -> Vec<String> {
    let from_meta: Vec<String> = meta
        .map(|t| t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        .unwrap_or_default();
    if from_meta.len() == 10 {
        from_meta
    } else {
        CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
    }
}

/// Builds the dataset from the six batch files' bytes (train 1..5, test), already checked.
fn dataset(mut raws: Vec<Vec<u8>>, meta: Option<&str>) -> Dataset {
    let test = raws.pop().expect("six batches");
    let (train, test) = rayon::join(|| assemble(raws), || assemble(vec![test]));
    Dataset {
        name: DatasetName::Cifar10.as_str().to_string(),
        train,
        test,
        classes: 10,
        class_names: class_names(meta),
        norm: DatasetName::Cifar10.normalization(),
        augment_default: true,
    }
}

/// Loads CIFAR-10 from the data folder: `DIR/cifar-10-batches-bin/` if that folder exists, else
/// straight out of `DIR/cifar-10-binary.tar.gz` (streamed, nothing is extracted to disk).
pub fn load_cifar10(data_dir: &Path) -> Result<Dataset> {
    let folder = data_dir.join(FOLDER);
    if folder.is_dir() {
        return load_cifar10_folder(&folder);
    }
    let archive = data_dir.join(ARCHIVE);
    if archive.is_file() {
        return load_cifar10_tar(&archive);
    }
    Err(missing(
        data_dir,
        DatasetName::Cifar10,
        &format!("the folder {FOLDER}/ (data_batch_1..5.bin, test_batch.bin) or the archive {ARCHIVE} in this folder"),
    ))
}

/// Loads CIFAR-10 from a `cifar-10-batches-bin` folder holding `data_batch_1..5.bin`,
/// `test_batch.bin` and optionally `batches.meta.txt`.
pub fn load_cifar10_folder(folder: &Path) -> Result<Dataset> {
    if !folder.is_dir() {
        return Err(missing(
            folder,
            DatasetName::Cifar10,
            "this folder with data_batch_1..5.bin and test_batch.bin",
        ));
    }
    let raws = BATCHES
        .par_iter()
        .map(|name| {
            let path = folder.join(name);
            if !path.is_file() {
                return Err(missing(&path, DatasetName::Cifar10, "this batch file"));
            }
            let raw = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            check_batch(&Origin { path, member: None }, &raw)?;
            Ok(raw)
        })
        .collect::<Result<Vec<_>>>()?;
    let meta_path = folder.join(META);
    let meta = if meta_path.is_file() {
        Some(std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?)
    } else {
        None
    };
    Ok(dataset(raws, meta.as_deref()))
}

/// Loads CIFAR-10 straight out of `cifar-10-binary.tar.gz` (members are matched by file name, so
/// the folder inside the archive may be named anything).
pub fn load_cifar10_tar(archive: &Path) -> Result<Dataset> {
    if !archive.is_file() {
        return Err(missing(archive, DatasetName::Cifar10, "this archive"));
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
    let mut raws: Vec<Option<Vec<u8>>> = vec![None; BATCHES.len()];
    let mut meta: Option<String> = None;
    for entry in tar.entries().map_err(corrupt)? {
        let mut entry = entry.map_err(corrupt)?;
        let member = entry.path().map_err(corrupt)?.into_owned();
        let Some(file_name) = member.file_name().and_then(|f| f.to_str()) else {
            continue;
        };
        let slot = BATCHES.iter().position(|b| *b == file_name);
        if slot.is_none() && file_name != META {
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
                check_batch(&origin, &raw)?;
                raws[i] = Some(raw);
            }
            None => meta = Some(String::from_utf8_lossy(&raw).into_owned()),
        }
    }
    // Read the stream to its end so that gzip's length and CRC-32 trailer is checked.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink()).map_err(corrupt)?;
    let raws = raws
        .into_iter()
        .zip(BATCHES)
        .map(|(r, name)| {
            r.ok_or_else(|| {
                Error::bad_file(archive, format!("the archive has no member {FOLDER}/{name}"))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(dataset(raws, meta.as_deref()))
}
