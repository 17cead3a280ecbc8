//! Datasets: loading, normalisation, shuffling, batching, augmentation.
//!
//! INTERFACE CONTRACT (other modules rely on these names and semantics):
//! - Images are NCHW, row-major. Real data keeps raw bytes ([`Pixels::U8`]); a batch is normalised
//!   on the fly: `x = (byte * scale - mean[c]) / std[c]`. Synthetic (distilled) data is stored
//!   already normalised ([`Pixels::F32`]) and copied as is.
//! - Shuffling and augmentation use `crate::seed::rng(seed, Stream::Order | Stream::Augment, epoch)`
//!   so that a given (seed, epoch) always yields the same batches.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Result;

/// The datasets `lmc` knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DatasetName {
    /// UCI / scikit-learn 8x8 digits, compiled into the binary (1437 train, 360 test).
    Digits,
    /// MNIST, 28x28 grey, IDX files in `DATA_DIR/mnist/`.
    Mnist,
    /// Fashion-MNIST, 28x28 grey, IDX files in `DATA_DIR/fashion-mnist/`.
    FashionMnist,
    /// CIFAR-10, 32x32 RGB, `DATA_DIR/cifar-10-batches-bin/` or `DATA_DIR/cifar-10-binary.tar.gz`.
    Cifar10,
    /// CIFAR-100 with its 100 fine labels, 32x32 RGB, `DATA_DIR/cifar-100-binary/` or
    /// `DATA_DIR/cifar-100-binary.tar.gz`.
    Cifar100,
}

/// Shape of one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    /// Channels (1 or 3).
    pub channels: usize,
    /// Height in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
}

/// Pixel storage of an [`ImageSet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Pixels {
    /// Raw bytes; the real value is `byte * scale` (1/255, or 1/16 for digits), then normalised.
    U8 {
        /// N*C*H*W bytes.
        data: Vec<u8>,
        /// Multiplier to bring a byte to [0, 1].
        scale: f32,
    },
    /// Already normalised values (synthetic data), N*C*H*W.
    F32(Vec<f32>),
}

/// Per-channel normalisation constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Per-channel mean of the [0,1]-scaled training pixels.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation.
    pub std: Vec<f32>,
}

/// One split: images and labels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageSet {
    /// Image shape.
    pub shape: ImageShape,
    /// Pixels, N*C*H*W.
    pub pixels: Pixels,
    /// Labels, N, each < classes.
    pub labels: Vec<u8>,
}

/// A dataset: train and test splits plus everything needed to feed a network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    /// Short name (`digits`, `mnist`, `fashion-mnist`, `cifar10`, `cifar100`, or a synthetic set's name).
    pub name: String,
    /// Training split.
    pub train: ImageSet,
    /// Test split.
    pub test: ImageSet,
    /// Number of classes.
    pub classes: usize,
    /// Class names, `classes` long.
    pub class_names: Vec<String>,
    /// Normalisation applied to U8 pixels.
    pub norm: Normalization,
    /// Whether training batches get random crop (padding 4) + horizontal flip by default.
    pub augment_default: bool,
}

mod batch;
mod cifar;
mod digits;
mod idx;
mod stats;
mod synthetic;

pub use batch::{batches, crop_flip, epoch_order, fill_batch, skip_augment, Batch, CROP_PADDING};
pub use cifar::{
    load_cifar10, load_cifar100, load_cifar100_folder, load_cifar100_tar, load_cifar10_folder,
    load_cifar10_tar, CIFAR100_CLASSES, CIFAR10_CLASSES,
};
pub use digits::load_digits;
pub use idx::load_idx;
pub use stats::{split_stats, SplitStats};
pub use synthetic::{parse_real, resolve_dataset, upsample_bilinear, SyntheticSet, MAX_DECODED};

use crate::Error;

/// The environment variable that chooses the data folder when `--data-dir` is not given.
pub const DATA_DIR_ENV: &str = "LMC_DATA_DIR";

/// Fashion-MNIST class names, in label order (from the Fashion-MNIST README).
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

impl DatasetName {
    /// Every named dataset, in the order `lmc` lists them.
    pub const ALL: [DatasetName; 5] = [
        DatasetName::Digits,
        DatasetName::Mnist,
        DatasetName::FashionMnist,
        DatasetName::Cifar10,
        DatasetName::Cifar100,
    ];

    /// The canonical name: `digits`, `mnist`, `fashion-mnist`, `cifar10` or `cifar100`.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Digits => "digits",
            DatasetName::Mnist => "mnist",
            DatasetName::FashionMnist => "fashion-mnist",
            DatasetName::Cifar10 => "cifar10",
            DatasetName::Cifar100 => "cifar100",
        }
    }

    /// Number of classes (CIFAR-100: its fine labels).
    pub fn classes(self) -> usize {
        match self {
            DatasetName::Cifar100 => 100,
            _ => 10,
        }
    }

    /// The shape of one image, as the loader makes it.
    pub fn image_shape(self) -> ImageShape {
        let (channels, side) = match self {
            DatasetName::Digits => (1, 8),
            DatasetName::Mnist | DatasetName::FashionMnist => (1, 28),
            DatasetName::Cifar10 | DatasetName::Cifar100 => (3, 32),
        };
        ImageShape { channels, height: side, width: side }
    }

    /// The standard class names, in label order (what the loaders fall back to).
    pub fn class_names(self) -> Vec<String> {
        match self {
            DatasetName::Digits | DatasetName::Mnist => digit_names(),
            DatasetName::FashionMnist => {
                FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
            }
            DatasetName::Cifar10 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
            DatasetName::Cifar100 => CIFAR100_CLASSES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// The fixed normalisation of this dataset's real images. For digits it is computed from the
    /// built-in training split (which never changes); the others are the well-known constants.
    pub fn normalization(self) -> Normalization {
        match self {
            DatasetName::Digits => digits::normalization(),
            // The constants of PyTorch's MNIST example (`examples/mnist/main.py`): the mean and
            // standard deviation of all 60,000 training images' pixels scaled to [0, 1].
            DatasetName::Mnist => Normalization { mean: vec![0.1307], std: vec![0.3081] },
            // The same statistics over Fashion-MNIST's 60,000 training images (0.28604, 0.35302).
            DatasetName::FashionMnist => Normalization { mean: vec![0.2860], std: vec![0.3530] },
            // Per-channel (R, G, B) mean and population standard deviation over all pixels of the
            // 50,000 CIFAR-10 training images (also stated in the data folder's README). Not the
            // often-copied (0.2023, 0.1994, 0.2010), which are std of per-image means.
            DatasetName::Cifar10 => Normalization {
                mean: vec![0.4914, 0.4822, 0.4465],
                std: vec![0.2470, 0.2435, 0.2616],
            },
            // The same definition (per-channel mean and population standard deviation over all
            // pixels of the 50,000 training images, scaled to [0, 1]) for CIFAR-100: the widely
            // published (0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762), e.g. numpy's
            // `mean`/`std` over the stacked training pixels. Not recomputed here: the data folder
            // has no CIFAR-100. Over 51.2 million values the population and sample standard
            // deviations agree to far below these four decimals.
            DatasetName::Cifar100 => Normalization {
                mean: vec![0.5071, 0.4865, 0.4409],
                std: vec![0.2673, 0.2564, 0.2762],
            },
        }
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DatasetName {
    type Err = Error;

    /// Parses a dataset name (case-insensitive); `fmnist`, `cifar-10` and `cifar-100` are accepted
    /// as aliases.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "digits" => Ok(DatasetName::Digits),
            "mnist" => Ok(DatasetName::Mnist),
            "fashion-mnist" | "fmnist" | "fashion_mnist" | "fashionmnist" => Ok(DatasetName::FashionMnist),
            "cifar10" | "cifar-10" | "cifar_10" => Ok(DatasetName::Cifar10),
            "cifar100" | "cifar-100" | "cifar_100" => Ok(DatasetName::Cifar100),
            _ => Err(Error::setting(format!(
                "unknown dataset '{s}' (expected digits, mnist, fashion-mnist, cifar10, cifar100, or a path to a Dataset artifact)"
            ))),
        }
    }
}

impl ImageShape {
    /// Values in one image: `channels * height * width`.
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Whether an image of this shape holds no values (some dimension is zero).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Pixels {
    /// Number of stored values (N*C*H*W).
    pub fn len(&self) -> usize {
        match self {
            Pixels::U8 { data, .. } => data.len(),
            Pixels::F32(v) => v.len(),
        }
    }

    /// Whether no values are stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split holds no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// A new split holding the images at `idx`, in that order (indices may repeat).
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn subset(&self, idx: &[usize]) -> ImageSet {
        let len = self.shape.len();
        let n = self.len();
        for &i in idx {
            assert!(i < n, "ImageSet::subset: index {i} out of range for a split of {n} images");
        }
        let labels = idx.iter().map(|&i| self.labels[i]).collect();
        let pixels = match &self.pixels {
            Pixels::U8 { data, scale } => {
                let mut out = Vec::with_capacity(idx.len() * len);
                for &i in idx {
                    out.extend_from_slice(&data[i * len..(i + 1) * len]);
                }
                Pixels::U8 { data: out, scale: *scale }
            }
            Pixels::F32(data) => {
                let mut out = Vec::with_capacity(idx.len() * len);
                for &i in idx {
                    out.extend_from_slice(&data[i * len..(i + 1) * len]);
                }
                Pixels::F32(out)
            }
        };
        ImageSet { shape: self.shape, pixels, labels }
    }
}

/// The data folder: `flag` if given, else `$LMC_DATA_DIR` if set and non-empty, else `./data`.
pub fn resolve_data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(DATA_DIR_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("data"),
    }
}

/// Loads a named dataset. `data_dir` is the data folder (see [`resolve_data_dir`]; `None` means
/// `$LMC_DATA_DIR` or `./data`): MNIST is read from `DIR/mnist/`, Fashion-MNIST from
/// `DIR/fashion-mnist/`, CIFAR-10 from `DIR/cifar-10-batches-bin/` or else
/// `DIR/cifar-10-binary.tar.gz`, CIFAR-100 from `DIR/cifar-100-binary/` or else
/// `DIR/cifar-100-binary.tar.gz`. Digits is built in and ignores `data_dir`.
pub fn load(name: DatasetName, data_dir: Option<&Path>) -> Result<Dataset> {
    match name {
        DatasetName::Digits => load_digits(),
        DatasetName::Mnist | DatasetName::FashionMnist => {
            let dir = resolve_data_dir(data_dir);
            let sub = if name == DatasetName::Mnist { "mnist" } else { "fashion-mnist" };
            load_idx(name, &dir.join(sub))
        }
        DatasetName::Cifar10 => load_cifar10(&resolve_data_dir(data_dir)),
        DatasetName::Cifar100 => load_cifar100(&resolve_data_dir(data_dir)),
    }
}

/// The error for a data file or folder that is not there.
pub(crate) fn missing(path: &Path, name: DatasetName, what: &str) -> Error {
    Error::io(
        path,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "not found; dataset '{name}' needs {what}. Choose the data folder with --data-dir or ${DATA_DIR_ENV}"
            ),
        ),
    )
}

/// The class names "0".."9".
pub(crate) fn digit_names() -> Vec<String> {
    (0..10).map(|d| d.to_string()).collect()
}
