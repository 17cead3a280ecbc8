//! MNIST-style IDX files (`*-idx3-ubyte` images, `*-idx1-ubyte` labels), gzipped or raw.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::{
    digit_names, missing, Dataset, DatasetName, ImageSet, ImageShape, Pixels, FASHION_MNIST_CLASSES,
};
use crate::{Error, Result};

/// IDX magic of an unsigned-byte, 3-dimensional array (images).
const IMAGES_MAGIC: u32 = 0x0000_0803; // 2051
/// IDX magic of an unsigned-byte, 1-dimensional array (labels).
const LABELS_MAGIC: u32 = 0x0000_0801; // 2049
/// MNIST and Fashion-MNIST images are 28x28.
const SIDE: usize = 28;

const FILES_NEEDED: &str = "the IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, \
     t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each optionally gzipped, .gz) in this folder";

/// One opened IDX file: its path and a reader that yields the decompressed bytes.
struct Source {
    path: PathBuf,
    gz: bool,
    reader: Box<dyn Read + Send>,
}

impl Source {
    /// Opens `folder/stem.gz` if it exists, else `folder/stem`.
    fn open(folder: &Path, stem: &str, name: DatasetName) -> Result<Source> {
        let gz_path = folder.join(format!("{stem}.gz"));
        let raw_path = folder.join(stem);
        let (path, gz) = if gz_path.is_file() {
            (gz_path, true)
        } else if raw_path.is_file() {
            (raw_path, false)
        } else {
            return Err(missing(
                &raw_path,
                name,
                &format!("this file (gzipped as {stem}.gz, or raw)"),
            ));
        };
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let buf = BufReader::with_capacity(1 << 16, file);
        let reader: Box<dyn Read + Send> =
            if gz { Box::new(flate2::read::MultiGzDecoder::new(buf)) } else { Box::new(buf) };
        Ok(Source { path, gz, reader })
    }

    /// Turns a read error into a crate error naming the file.
    fn read_error(&self, e: std::io::Error, what: &str) -> Error {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::bad_file(&self.path, format!("truncated IDX file: it ends inside the {what}"))
        } else if self.gz {
            Error::bad_file(
                &self.path,
                format!("cannot decompress ({e}); the gzip file is truncated or corrupt"),
            )
        } else {
            Error::io(&self.path, e)
        }
    }

    /// Reads the big-endian magic and `dims` dimensions; checks the magic.
    fn header(&mut self, magic: u32, dims: usize) -> Result<Vec<usize>> {
        let mut buf = [0u8; 16];
        let buf = &mut buf[..4 * (dims + 1)];
        self.reader.read_exact(buf).map_err(|e| self.read_error(e, "header"))?;
        let words: Vec<u32> =
            buf.chunks_exact(4).map(|w| u32::from_be_bytes([w[0], w[1], w[2], w[3]])).collect();
        if words[0] != magic {
            let kind = if magic == IMAGES_MAGIC { "image" } else { "label" };
            let hint = if buf[0] == 0x1f && buf[1] == 0x8b && !self.gz {
                " (the file looks gzip-compressed: give it a .gz name)"
            } else {
                ""
            };
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "not an IDX {kind} file: magic number {}, expected {magic}{hint}",
                    words[0]
                ),
            ));
        }
        Ok(words[1..].iter().map(|&w| w as usize).collect())
    }

    /// Reads the payload, which must be exactly `expected` bytes; `describe` says what the header
    /// promised (for the error message).
    fn payload(&mut self, expected: usize, describe: &str, unit: &str) -> Result<Vec<u8>> {
        let mut data = Vec::with_capacity(expected.min(1 << 28) + 1);
        (&mut self.reader)
            .take(expected as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| self.read_error(e, unit))?;
        if data.len() < expected {
            return Err(Error::bad_file(
                &self.path,
                format!(
                    "truncated IDX file: header says {describe}, found {} bytes of {unit}",
                    data.len()
                ),
            ));
        }
        if data.len() > expected {
            return Err(Error::bad_file(
                &self.path,
                format!("IDX file is longer than its header says ({describe}, {expected} bytes of {unit})"),
            ));
        }
        Ok(data)
    }
}

/// Reads an IDX image file: returns (path, count, bytes).
fn read_images(folder: &Path, stem: &str, name: DatasetName) -> Result<(PathBuf, usize, Vec<u8>)> {
    let mut src = Source::open(folder, stem, name)?;
    let dims = src.header(IMAGES_MAGIC, 3)?;
    let (n, h, w) = (dims[0], dims[1], dims[2]);
    if (h, w) != (SIDE, SIDE) {
        return Err(Error::bad_file(
            &src.path,
            format!("images are {h}x{w}, expected {SIDE}x{SIDE} for {name}"),
        ));
    }
    let data = src.payload(n * h * w, &format!("{n} images of {h}x{w}"), "pixels")?;
    Ok((src.path, n, data))
}

/// Reads an IDX label file: returns (path, labels), each checked to be below 10.
fn read_labels(folder: &Path, stem: &str, name: DatasetName) -> Result<(PathBuf, Vec<u8>)> {
    let mut src = Source::open(folder, stem, name)?;
    let n = src.header(LABELS_MAGIC, 1)?[0];
    let labels = src.payload(n, &format!("{n} labels"), "labels")?;
    if let Some(i) = labels.iter().position(|&l| l >= 10) {
        return Err(Error::bad_file(
            &src.path,
            format!("label {} at index {i} is not below 10", labels[i]),
        ));
    }
    Ok((src.path, labels))
}

/// One split: `prefix` is `train` or `t10k`.
fn read_split(folder: &Path, prefix: &str, name: DatasetName) -> Result<ImageSet> {
    let (images, labels) = rayon::join(
        || read_images(folder, &format!("{prefix}-images-idx3-ubyte"), name),
        || read_labels(folder, &format!("{prefix}-labels-idx1-ubyte"), name),
    );
    let (_, n, data) = images?;
    let (label_path, labels) = labels?;
    if labels.len() != n {
        return Err(Error::bad_file(
            label_path,
            format!("holds {} labels but the {prefix} images file holds {n} images", labels.len()),
        ));
    }
    Ok(ImageSet {
        shape: ImageShape { channels: 1, height: SIDE, width: SIDE },
        pixels: Pixels::U8 { data, scale: 1.0 / 255.0 },
        labels,
    })
}

/// Loads MNIST or Fashion-MNIST from `folder`, which holds the four IDX files
/// (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
/// `t10k-labels-idx1-ubyte`), each gzipped (`.gz`, tried first) or raw.
pub fn load_idx(name: DatasetName, folder: &Path) -> Result<Dataset> {
    let class_names = match name {
        DatasetName::Mnist => digit_names(),
        DatasetName::FashionMnist => FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
        _ => return Err(Error::setting(format!("dataset '{name}' is not stored as IDX files"))),
    };
    if !folder.is_dir() {
        return Err(missing(folder, name, FILES_NEEDED));
    }
    let (train, test) =
        rayon::join(|| read_split(folder, "train", name), || read_split(folder, "t10k", name));
    Ok(Dataset {
        name: name.as_str().to_string(),
        train: train?,
        test: test?,
        classes: 10,
        class_names,
        norm: name.normalization(),
        augment_default: false,
    })
}
