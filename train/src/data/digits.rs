//! The built-in UCI / scikit-learn 8x8 digits set.

use std::io::Read;
use std::sync::OnceLock;

use super::{digit_names, Dataset, DatasetName, ImageSet, ImageShape, Normalization, Pixels};
use crate::{Error, Result};

/// The CSV as shipped by scikit-learn, gzipped: 1797 rows of 64 pixel values (0..16), then the label.
static DIGITS_CSV_GZ: &[u8] = include_bytes!("digits.csv.gz");

/// Rows used for training (the first ones); the remaining rows are the test split.
const TRAIN_ROWS: usize = 1437;
const TOTAL_ROWS: usize = 1797;
const PIXELS: usize = 64;

struct Parsed {
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

fn source() -> &'static str {
    "<built-in digits.csv.gz>"
}

fn parse() -> Result<Parsed> {
    let mut text = String::with_capacity(300_000);
    flate2::read::GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::bad_file(source(), format!("cannot decompress: {e}")))?;
    let mut pixels = Vec::with_capacity(TOTAL_ROWS * PIXELS);
    let mut labels = Vec::with_capacity(TOTAL_ROWS);
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |msg: String| Error::bad_file(source(), format!("line {}: {msg}", line_no + 1));
        let mut fields = 0;
        for field in line.split(',') {
            let v: u8 =
                field.trim().parse().map_err(|_| bad(format!("'{field}' is not a number")))?;
            if fields < PIXELS {
                if v > 16 {
                    return Err(bad(format!("pixel value {v} is above 16")));
                }
                pixels.push(v);
            } else if fields == PIXELS {
                if v > 9 {
                    return Err(bad(format!("label {v} is above 9")));
                }
                labels.push(v);
            }
            fields += 1;
        }
        if fields != PIXELS + 1 {
            return Err(bad(format!("{fields} fields, expected {}", PIXELS + 1)));
        }
    }
    if labels.len() != TOTAL_ROWS {
        return Err(Error::bad_file(
            source(),
            format!("{} rows, expected {TOTAL_ROWS}", labels.len()),
        ));
    }
    Ok(Parsed { pixels, labels })
}

fn parsed() -> Result<&'static Parsed> {
    static PARSED: OnceLock<std::result::Result<Parsed, String>> = OnceLock::new();
    PARSED
        .get_or_init(|| parse().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::data(e.clone()))
}

/// Mean and population standard deviation of the [0, 1]-scaled pixels of the built-in training
/// split (1437 images); computed once.
pub(super) fn normalization() -> Normalization {
    static NORM: OnceLock<Normalization> = OnceLock::new();
    NORM.get_or_init(|| {
        let p = parsed().expect("the built-in digits data parses");
        let train = &p.pixels[..TRAIN_ROWS * PIXELS];
        let (mut s, mut ss) = (0f64, 0f64);
        for &b in train {
            let v = b as f64 / 16.0;
            s += v;
            ss += v * v;
        }
        let n = train.len() as f64;
        let mean = s / n;
        let var = (ss / n - mean * mean).max(0.0);
        Normalization { mean: vec![mean as f32], std: vec![var.sqrt() as f32] }
    })
    .clone()
}

/// The built-in digits dataset: 1437 train and 360 test images, 1x8x8, pixel values 0..16
/// (scale 1/16), normalised with the training split's own mean and standard deviation.
pub fn load_digits() -> Result<Dataset> {
    let p = parsed()?;
    let shape = ImageShape { channels: 1, height: 8, width: 8 };
    let split = |rows: std::ops::Range<usize>| ImageSet {
        shape,
        pixels: Pixels::U8 {
            data: p.pixels[rows.start * PIXELS..rows.end * PIXELS].to_vec(),
            scale: 1.0 / 16.0,
        },
        labels: p.labels[rows].to_vec(),
    };
    Ok(Dataset {
        name: DatasetName::Digits.as_str().to_string(),
        train: split(0..TRAIN_ROWS),
        test: split(TRAIN_ROWS..TOTAL_ROWS),
        classes: 10,
        class_names: digit_names(),
        norm: normalization(),
        augment_default: false,
    })
}
