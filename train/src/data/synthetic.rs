//! Stored (distilled) training sets: the `Dataset` artifact, and how any command turns a
//! `--dataset` argument (a name or an artifact path) into a [`Dataset`].

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{load, Dataset, DatasetName, ImageSet, Normalization, Pixels};
use crate::artifact::{self, Artifact, Kind, Provenance};
use crate::{Error, Result};

/// A synthetic training set: what `lmc distill` writes. The test split is the real one of `base`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSet {
    /// Human-readable name, e.g. `mnist-dm-ipc10`.
    pub name: String,
    /// The real dataset it summarises (its test split is used for evaluation).
    pub base: DatasetName,
    /// Stored images, already normalised ([`Pixels::F32`]), at the real image size.
    pub images: ImageSet,
    /// IDC multi-formation factor: each stored image holds factor x factor cells, each decoded
    /// (bilinear upsampling) into one full-size training image. 1 = plain images.
    pub factor: usize,
    /// Normalisation of the base dataset (the stored values are in normalised space).
    pub norm: Normalization,
    /// Class names of the base dataset.
    pub class_names: Vec<String>,
    /// How it was made (method, ipc, iterations...), as a JSON string for the record.
    pub recipe: String,
}

impl Artifact for SyntheticSet {
    const KIND: Kind = Kind::Dataset;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        let s = self.images.shape;
        let sides = [s.channels, s.height, s.width];
        if sides.iter().any(|&d| d == 0 || d > crate::model::MAX_IMAGE_SIDE) {
            return Err(format!(
                "images of {}x{}x{}: every dimension must lie in 1..={}",
                s.channels,
                s.height,
                s.width,
                crate::model::MAX_IMAGE_SIDE
            ));
        }
        let Pixels::F32(px) = &self.images.pixels else {
            return Err("pixels are stored as raw bytes, expected normalised floats".into());
        };
        let n = self.images.labels.len();
        if n.checked_mul(s.len()) != Some(px.len()) {
            return Err(format!(
                "{} pixel values for {n} images of {}x{}x{}",
                px.len(),
                s.channels,
                s.height,
                s.width
            ));
        }
        if !px.iter().all(|v| v.is_finite()) {
            return Err("some pixel values are not finite".into());
        }
        // The class names, when stored, say how many classes; else the base dataset does.
        let classes =
            if self.class_names.is_empty() { self.base.classes() } else { self.class_names.len() };
        if let Some(l) = self.images.labels.iter().find(|&&l| l as usize >= classes) {
            return Err(format!("label {l} is not below the {classes} classes"));
        }
        let norm = &self.norm;
        if norm.mean.len() != s.channels || norm.std.len() != s.channels {
            return Err(format!(
                "normalisation has {} means and {} standard deviations for {} channels",
                norm.mean.len(),
                norm.std.len(),
                s.channels
            ));
        }
        if !norm.mean.iter().all(|m| m.is_finite())
            || !norm.std.iter().all(|d| d.is_finite() && *d > 0.0)
        {
            return Err(format!(
                "normalisation {:?} / {:?}: means must be finite and standard deviations finite and positive",
                norm.mean, norm.std
            ));
        }
        let f = self.factor;
        if f == 0 || !s.height.is_multiple_of(f) || !s.width.is_multiple_of(f) {
            return Err(format!(
                "multi-formation factor {f} does not divide the {}x{} image size",
                s.height, s.width
            ));
        }
        if n.checked_mul(f * f).and_then(|d| d.checked_mul(s.len())).is_none_or(|v| v > MAX_DECODED)
        {
            return Err(format!(
                "{n} images x factor {f}^2 decode to more than {MAX_DECODED} values, the limit"
            ));
        }
        Ok(())
    }
}

/// The most values (images x pixels) a Dataset artifact may decode to: 4 GB of f32, more than
/// any distilled set and a bound on what a file can make this build allocate.
pub const MAX_DECODED: usize = 1 << 30;

/// Bilinear resize of one (C, H, W) image to (C, OH, OW), with PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False)` semantics: source coordinate
/// `(o + 0.5) * in / out - 0.5`, clamped at 0.
pub fn upsample_bilinear(
    src: &[f32],
    shape: (usize, usize, usize),
    out_hw: (usize, usize),
    out: &mut [f32],
) {
    let (c, h, w) = shape;
    let (oh, ow) = out_hw;
    assert_eq!(src.len(), c * h * w);
    assert_eq!(out.len(), c * oh * ow);
    let coord = |o: usize, inn: usize, outn: usize| -> (usize, usize, f32) {
        let s = ((o as f32 + 0.5) * inn as f32 / outn as f32 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(inn - 1);
        let i1 = (i0 + 1).min(inn - 1);
        (i0, i1, s - i0 as f32)
    };
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for y in 0..oh {
            let (y0, y1, fy) = coord(y, h, oh);
            for x in 0..ow {
                let (x0, x1, fx) = coord(x, w, ow);
                let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
                let bot = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
                out[ch * oh * ow + y * ow + x] = top * (1.0 - fy) + bot * fy;
            }
        }
    }
}

impl SyntheticSet {
    /// Number of training images after decoding: stored images x factor^2.
    pub fn decoded_len(&self) -> usize {
        self.images.len() * self.factor * self.factor
    }

    /// The training images a network sees: with factor f, each stored image's f x f cells
    /// (row-major) each upsampled to the full size, in stored order.
    pub fn decode(&self) -> Result<ImageSet> {
        let Pixels::F32(data) = &self.images.pixels else {
            return Err(Error::data(format!(
                "synthetic set '{}' stores raw bytes, expected normalised floats",
                self.name
            )));
        };
        let f = self.factor;
        if f <= 1 {
            return Ok(self.images.clone());
        }
        let s = self.images.shape;
        if !s.height.is_multiple_of(f) || !s.width.is_multiple_of(f) {
            return Err(Error::setting(format!(
                "factor {f} does not divide the {}x{} image size",
                s.height, s.width
            )));
        }
        let (ch, cw) = (s.height / f, s.width / f);
        let img = s.len();
        let mut out = vec![0.0f32; self.decoded_len() * img];
        let mut labels = Vec::with_capacity(self.decoded_len());
        let mut cell = vec![0.0f32; s.channels * ch * cw];
        for (i, &label) in self.images.labels.iter().enumerate() {
            let src = &data[i * img..(i + 1) * img];
            for gy in 0..f {
                for gx in 0..f {
                    for c in 0..s.channels {
                        for y in 0..ch {
                            let row = c * s.height * s.width + (gy * ch + y) * s.width + gx * cw;
                            cell[(c * ch + y) * cw..(c * ch + y + 1) * cw]
                                .copy_from_slice(&src[row..row + cw]);
                        }
                    }
                    let k = labels.len();
                    upsample_bilinear(
                        &cell,
                        (s.channels, ch, cw),
                        (s.height, s.width),
                        &mut out[k * img..(k + 1) * img],
                    );
                    labels.push(label);
                }
            }
        }
        Ok(ImageSet { shape: s, pixels: Pixels::F32(out), labels })
    }

    /// A [`Dataset`] that trains on the decoded synthetic images and tests on `base`'s real test split.
    pub fn to_dataset(&self, real: &Dataset) -> Result<Dataset> {
        if real.train.shape != self.images.shape {
            return Err(Error::incompatible(format!(
                "synthetic set '{}' has {:?} images but {} has {:?}",
                self.name, self.images.shape, real.name, real.train.shape
            )));
        }
        if let Some(l) = self.images.labels.iter().find(|&&l| l as usize >= real.classes) {
            return Err(Error::incompatible(format!(
                "synthetic set '{}' has label {l}, but {} has {} classes",
                self.name, real.name, real.classes
            )));
        }
        Ok(Dataset {
            name: self.name.clone(),
            train: self.decode()?,
            test: real.test.clone(),
            classes: real.classes,
            class_names: self.class_names.clone(),
            norm: self.norm.clone(),
            augment_default: false,
        })
    }
}

/// Turns a `--dataset` value into a dataset and its provenance: a known name (`digits`, `mnist`,
/// ...) loads the real data; a path to a `Dataset` artifact (`syn.lmc`) loads the synthetic
/// training set, with the real test split of its base dataset from `data_dir`.
pub fn resolve_dataset(arg: &str, data_dir: Option<&Path>) -> Result<(Dataset, Provenance)> {
    let path = Path::new(arg);
    let looks_like_file = arg.ends_with(".lmc") || path.is_file();
    if !looks_like_file {
        let (name, train) = parse_real(arg)?;
        let mut ds = load(name, data_dir)?;
        if let Some(n) = train {
            ds.train = balanced_prefix(&ds.train, ds.classes, n)
                .map_err(|e| Error::setting(format!("dataset {arg}: {e}")))?;
            ds.name = format!("{name}:train={n}");
        }
        // The name (with its subset) identifies built-in data, as it always has.
        let id = ds.name.clone();
        return Ok((ds, Provenance::of("dataset", &id, &[])));
    }
    let (header, syn) = artifact::read::<SyntheticSet>(path)?;
    let real = load(syn.base, data_dir)?;
    let ds = syn.to_dataset(&real).map_err(|e| Error::bad_file(path, e.to_string()))?;
    Ok((ds, header.provenance))
}

/// A real dataset's name, `NAME[:train=N]`: the dataset, and the size of the class-balanced
/// training subset to use (a CPU-sized study; the test split is always whole).
pub fn parse_real(arg: &str) -> Result<(DatasetName, Option<usize>)> {
    let Some((name, opt)) = arg.split_once(':') else {
        return Ok((arg.parse()?, None));
    };
    let name: DatasetName = name.parse()?;
    let n = opt
        .strip_prefix("train=")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            Error::setting(format!(
                "dataset {arg}: expected NAME or NAME:train=N with N a positive number of training images"
            ))
        })?;
    Ok((name, Some(n)))
}

/// The first `n` training images of `set` taken class by class in file order: `n / classes`
/// of every class, one more of the first `n % classes` classes; the subset keeps the file's
/// order. Deterministic, and balanced like the published splits.
fn balanced_prefix(
    set: &ImageSet,
    classes: usize,
    n: usize,
) -> std::result::Result<ImageSet, String> {
    if n > set.len() {
        return Err(format!("{n} training images asked for, the split has {}", set.len()));
    }
    let classes = classes.max(1);
    let want = |c: usize| n / classes + usize::from(c < n % classes);
    let mut taken = vec![0usize; classes];
    let mut idx = Vec::with_capacity(n);
    for (i, &l) in set.labels.iter().enumerate() {
        let c = l as usize;
        if c < classes && taken[c] < want(c) {
            taken[c] += 1;
            idx.push(i);
        }
    }
    if let Some(c) = (0..classes).find(|&c| taken[c] < want(c)) {
        return Err(format!("class {c} has only {} training images, {} needed", taken[c], want(c)));
    }
    Ok(set.subset(&idx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ImageShape;

    #[test]
    fn a_training_subset_is_balanced_and_named() {
        let (ds, prov) = resolve_dataset("digits:train=25", None).unwrap();
        assert_eq!(ds.name, "digits:train=25");
        assert_eq!(ds.train.len(), 25);
        // 25 over 10 classes: 3 of classes 0-4, 2 of classes 5-9.
        for c in 0..10u8 {
            let k = ds.train.labels.iter().filter(|&&l| l == c).count();
            assert_eq!(k, if c < 5 { 3 } else { 2 }, "class {c}");
        }
        let (full, full_prov) = resolve_dataset("digits", None).unwrap();
        assert_eq!(ds.test.labels, full.test.labels, "the test split is whole");
        assert_ne!(prov, full_prov);
        // The subset keeps the file's order: it starts with the file's first image.
        assert_eq!(ds.train.subset(&[0]).pixels, full.train.subset(&[0]).pixels);
        assert_eq!(ds.train.labels[0], full.train.labels[0]);
        for bad in ["digits:train=0", "digits:train=x", "digits:test=5", "digits:train=99999"] {
            let e = resolve_dataset(bad, None).unwrap_err().to_string();
            assert!(e.contains(bad.split(':').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn bilinear_matches_pytorch_by_hand() {
        // F.interpolate([[1, 2], [3, 4]], size=(4, 4), mode="bilinear", align_corners=False):
        // first row = [1, 1.25, 1.75, 2] (source x = -0.25->0, 0.25, 0.75, 1.25->clamped 1),
        // second row (source y = 0.25) = 1.5, 1.75, 2.25, 2.5.
        let mut out = vec![0.0; 16];
        upsample_bilinear(&[1.0, 2.0, 3.0, 4.0], (1, 2, 2), (4, 4), &mut out);
        assert_eq!(&out[..4], &[1.0, 1.25, 1.75, 2.0]);
        assert_eq!(&out[4..8], &[1.5, 1.75, 2.25, 2.5]);
        assert_eq!(&out[12..], &[3.0, 3.25, 3.75, 4.0]);
    }

    #[test]
    fn multi_formation_decodes_factor_squared_images() {
        // One 1x4x4 image whose four 2x2 cells are constant 1, 2, 3, 4: factor 2 decodes it into
        // four constant 4x4 images in row-major cell order.
        let mut px = vec![0.0f32; 16];
        for y in 0..4 {
            for x in 0..4 {
                px[y * 4 + x] = (1 + (y / 2) * 2 + x / 2) as f32;
            }
        }
        let set = SyntheticSet {
            name: "toy".into(),
            base: DatasetName::Digits,
            images: ImageSet {
                shape: ImageShape { channels: 1, height: 4, width: 4 },
                pixels: Pixels::F32(px),
                labels: vec![7],
            },
            factor: 2,
            norm: Normalization { mean: vec![0.0], std: vec![1.0] },
            class_names: vec![],
            recipe: String::new(),
        };
        let d = set.decode().unwrap();
        assert_eq!(d.labels, vec![7; 4]);
        let Pixels::F32(v) = d.pixels else { panic!() };
        for k in 0..4 {
            assert!(v[k * 16..(k + 1) * 16].iter().all(|&p| p == (k + 1) as f32));
        }
        let bad = SyntheticSet { factor: 3, ..set };
        assert!(bad.decode().unwrap_err().to_string().contains("factor 3"));
    }
}
