//! Synthetic training sets from and to other tools: a Dataset artifact ([`SyntheticSet`]) as
//! safetensors, and a safetensors or NumPy `.npz` file of images and labels as a Dataset artifact.
//!
//! The file holds two tensors: images, N x C x H x W floats, and labels, N integers. They are
//! read under the names given, by default `images` (else `x`) and `labels` (else `y`); other
//! tensors are ignored. The images are either already normalised with the base dataset's
//! statistics ([`PixelSpace::Normalized`], what `lmc distill` stores and what IDC and DC/DM
//! optimise) or pixel values in [0, 1] ([`PixelSpace::Unit`]), which the import normalises
//! exactly as a real batch is: `(v - mean[c]) / std[c]` in f32.
//!
//! An export writes the stored values as f32 `images`, the labels as int64 `labels` (PyTorch's
//! label dtype), and the set's other fields as JSON metadata (`lmc.set`, `lmc.pixel_space`), so
//! that importing the file again gives the same set bit for bit.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use lmc_train::artifact::{Artifact, Provenance};
use lmc_train::data::{DatasetName, ImageSet, Pixels, SyntheticSet, MAX_DECODED};
use lmc_train::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::interop::{check_header, f16_to_f32};

/// Names tried for the images when none is given.
pub const IMAGE_NAMES: [&str; 2] = ["images", "x"];
/// Names tried for the labels when none is given.
pub const LABEL_NAMES: [&str; 2] = ["labels", "y"];
/// Metadata key holding the set's JSON without its images and labels.
pub const SET_KEY: &str = "lmc.set";
/// Metadata key saying how the images are scaled.
pub const SPACE_KEY: &str = "lmc.pixel_space";

/// How imported image values are scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelSpace {
    /// Already normalised with the base dataset's per-channel mean and standard deviation.
    Normalized,
    /// Pixel values in [0, 1]; the import normalises them.
    Unit,
}

impl std::fmt::Display for PixelSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PixelSpace::Normalized => "normalized",
            PixelSpace::Unit => "unit",
        })
    }
}

impl std::str::FromStr for PixelSpace {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "normalized" | "normalised" => Ok(PixelSpace::Normalized),
            "unit" | "pixels" | "01" => Ok(PixelSpace::Unit),
            _ => Err(Error::setting(format!(
                "--pixel-space '{s}': expected 'normalized' (already normalised with the base \
                 dataset's statistics) or 'unit' (pixel values in [0, 1])"
            ))),
        }
    }
}

/// The safetensors bytes of `set` (artifact provenance `provenance`): images under
/// `images_name` (f32, N x C x H x W, as stored: normalised), labels under `labels_name` (i64).
pub fn export_dataset_bytes(
    set: &SyntheticSet,
    provenance: Provenance,
    images_name: &str,
    labels_name: &str,
) -> Result<Vec<u8>> {
    set.validate_payload().map_err(|m| Error::incompatible(format!("export: {m}")))?;
    if images_name == labels_name {
        return Err(Error::setting(format!(
            "--images and --labels are both '{images_name}'; a file holds one tensor per name"
        )));
    }
    let Pixels::F32(px) = &set.images.pixels else {
        return Err(Error::incompatible("export: the set stores raw bytes, expected floats"));
    };
    let s = set.images.shape;
    let n = set.images.len();
    let image_bytes: Vec<u8> = px.iter().flat_map(|v| v.to_le_bytes()).collect();
    let label_bytes: Vec<u8> =
        set.images.labels.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect();
    let views = [
        (images_name, Dtype::F32, vec![n, s.channels, s.height, s.width], &image_bytes),
        (labels_name, Dtype::I64, vec![n], &label_bytes),
    ]
    .into_iter()
    .map(|(name, t, shape, b)| TensorView::new(t, shape, b).map(|v| (name.to_string(), v)))
    .collect::<std::result::Result<Vec<_>, _>>()
    .map_err(|e| Error::data(format!("safetensors: {e:?}")))?;
    let shell = SyntheticSet {
        images: ImageSet { shape: s, pixels: Pixels::F32(vec![]), labels: vec![] },
        ..set.clone()
    };
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(SPACE_KEY.to_string(), PixelSpace::Normalized.to_string());
    meta.insert("lmc.provenance".to_string(), provenance.hex());
    meta.insert(
        SET_KEY.to_string(),
        serde_json::to_string(&shell)
            .map_err(|e| Error::data(format!("cannot encode the set's metadata: {e}")))?,
    );
    crate::interop::serialize_in_order(views, meta)
}

/// What an import is told; every `None` is taken from the file's lmc metadata when it has some.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportOptions {
    /// The real dataset the images stand for (shape, classes, statistics, test split).
    pub base: Option<DatasetName>,
    /// How the image values are scaled.
    pub space: Option<PixelSpace>,
    /// Name of the images tensor (default: `images`, else `x`).
    pub images: Option<String>,
    /// Name of the labels tensor (default: `labels`, else `y`).
    pub labels: Option<String>,
    /// The set's name (default: the file's stem).
    pub name: Option<String>,
    /// IDC multi-formation factor of the stored images (default 1).
    pub factor: Option<usize>,
}

/// An imported set and how it was read.
#[derive(Clone, Debug)]
pub struct Imported {
    /// The set, images normalised.
    pub set: SyntheticSet,
    /// Names the file's content and the options that read it.
    pub provenance: Provenance,
    /// `safetensors` or `npz`.
    pub format: &'static str,
    /// The tensors read.
    pub images_tensor: String,
    /// The labels tensor read.
    pub labels_tensor: String,
    /// How the values were scaled in the file.
    pub space: PixelSpace,
    /// Smallest and largest value in the file (before normalisation).
    pub range: (f32, f32),
}

/// One tensor of the file.
enum Values {
    Float(Vec<f32>),
    Int(Vec<i64>),
    /// A dtype this import does not read, as the file names it.
    Other(String),
}

/// The tensors and metadata of a file.
struct TensorFile {
    format: &'static str,
    metadata: HashMap<String, String>,
    tensors: BTreeMap<String, (Vec<usize>, Values)>,
}

fn read_safetensors(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
    let bad = |m: String| Error::bad_file(path, m);
    check_header(bytes).map_err(bad)?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e:?}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("not a valid safetensors file: {e:?}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let le2 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
        let values = match view.dtype() {
            Dtype::F32 => Values::Float(
                d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            Dtype::F64 => Values::Float(
                d.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
            ),
            Dtype::F16 => Values::Float(d.chunks_exact(2).map(|c| f16_to_f32(le2(c))).collect()),
            Dtype::BF16 => Values::Float(
                d.chunks_exact(2).map(|c| f32::from_bits((le2(c) as u32) << 16)).collect(),
            ),
            Dtype::U8 => Values::Int(d.iter().map(|&b| b as i64).collect()),
            Dtype::I8 => Values::Int(d.iter().map(|&b| b as i8 as i64).collect()),
            Dtype::I16 => Values::Int(
                d.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            ),
            Dtype::U16 => Values::Int(d.chunks_exact(2).map(|c| le2(c) as i64).collect()),
            Dtype::I32 => Values::Int(
                d.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            Dtype::U32 => Values::Int(
                d.chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as i64)
                    .collect(),
            ),
            Dtype::I64 => Values::Int(
                d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            ),
            // Beyond i64 only as -1: an out-of-range label either way.
            Dtype::U64 => Values::Int(
                d.chunks_exact(8)
                    .map(|c| i64::try_from(u64::from_le_bytes(c.try_into().unwrap())).unwrap_or(-1))
                    .collect(),
            ),
            other => Values::Other(format!("{other:?}")),
        };
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    Ok(TensorFile { format: "safetensors", metadata, tensors })
}

/// The most bytes one `.npz` member may decompress to: the largest set a Dataset artifact holds
/// (in f64) plus room for the header. Bounds what a small, highly compressed file can allocate.
const MAX_MEMBER: u64 = (MAX_DECODED as u64) * 8 + (1 << 16);

fn read_npz(path: &Path, bytes: &[u8]) -> Result<TensorFile> {
    let bad = |m: String| Error::bad_file(path, m);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| bad(format!("not a valid .npz (zip) file: {e}")))?;
    let mut tensors = BTreeMap::new();
    for i in 0..zip.len() {
        let mut member =
            zip.by_index(i).map_err(|e| bad(format!("not a valid .npz (zip) file: {e}")))?;
        let Some(name) = member.name().strip_suffix(".npy").map(String::from) else {
            continue;
        };
        let mut raw = Vec::new();
        (&mut member).take(MAX_MEMBER).read_to_end(&mut raw).map_err(|e| {
            bad(format!(
                "member {name}.npy: cannot be read ({e}); the file is truncated or corrupt"
            ))
        })?;
        let member_err = |m: String| bad(format!("member {name}.npy: {m}"));
        if !shape_fits(&raw) {
            return Err(member_err(
                "its header's shape has more elements than memory could hold".into(),
            ));
        }
        let mut cursor = std::io::Cursor::new(&raw[..]);
        let header = npyz::NpyHeader::from_reader(&mut cursor)
            .map_err(|e| member_err(format!("not a valid .npy array ({e})")))?;
        let data = &raw[cursor.position() as usize..];
        let npy = npyz::NpyFile::with_header(header, data);
        let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
        if npy.order() == npyz::Order::Fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
            return Err(member_err(
                "stored in Fortran order; save it with np.ascontiguousarray".into(),
            ));
        }
        let (dtype, item) = match npy.dtype() {
            npyz::DType::Plain(t) => (t.to_string(), t.num_bytes().unwrap_or(0)),
            other => (format!("{other:?}"), 0),
        };
        // Values the header promises must be in the member before anything is allocated for them.
        let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if count.and_then(|c| c.checked_mul(item)).is_none_or(|b| b > data.len()) {
            return Err(member_err(format!(
                "shape {shape:?} of {dtype} needs more bytes than the member's {}; it is truncated",
                data.len()
            )));
        }
        let read_err = |e: std::io::Error| member_err(format!("cannot read its values ({e})"));
        let values = match npy.try_data::<f32>() {
            Ok(r) => Values::Float(r.collect::<std::io::Result<_>>().map_err(read_err)?),
            Err(npy) => match npy.try_data::<f64>() {
                Ok(r) => Values::Float(
                    r.map(|v| v.map(|v| v as f32))
                        .collect::<std::io::Result<_>>()
                        .map_err(read_err)?,
                ),
                Err(npy) => match int_values(npy) {
                    Ok(v) => Values::Int(v.map_err(read_err)?),
                    Err(_) => Values::Other(dtype),
                },
            },
        };
        tensors.insert(name, (shape, values));
    }
    Ok(TensorFile { format: "npz", metadata: HashMap::new(), tensors })
}

/// Whether the element count of a `.npy` header's shape fits a `usize`, checked before `npyz`
/// parses it: `npyz` multiplies the dimensions unchecked (a panic where overflow checks are on).
/// A header that does not parse here is left to `npyz` to reject.
fn shape_fits(raw: &[u8]) -> bool {
    // Magic (6 bytes), version (2), header length (2 bytes in version 1, else 4), header text.
    let text_at = if raw.get(6) == Some(&1) { 10 } else { 12 };
    let text =
        String::from_utf8_lossy(&raw[text_at.min(raw.len())..raw.len().min(text_at + 65_536)]);
    let Some(dims) = text.split("'shape'").nth(1).and_then(|t| t.split(['(', ')']).nth(1)) else {
        return true;
    };
    dims.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .try_fold(1usize, |a, d| {
            // A dimension that is not a number is npyz's to reject; one too large does not fit.
            match d.trim_end_matches('L').parse::<u64>() {
                Ok(v) => usize::try_from(v).ok().and_then(|v| a.checked_mul(v)),
                Err(_) => Some(a),
            }
        })
        .is_some()
}

/// The values of an integer `.npy` array as i64, or the file back when it holds no integers.
#[allow(clippy::type_complexity)]
fn int_values<R: Read>(
    npy: npyz::NpyFile<R>,
) -> std::result::Result<std::io::Result<Vec<i64>>, npyz::NpyFile<R>> {
    fn all<T: Into<i128> + npyz::Deserialize, R: Read>(
        r: npyz::NpyReader<T, R>,
    ) -> std::io::Result<Vec<i64>> {
        r.map(|v| v.map(|v| i64::try_from(v.into()).unwrap_or(-1))).collect()
    }
    let npy = match npy.try_data::<i64>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    let npy = match npy.try_data::<i32>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    let npy = match npy.try_data::<i16>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    let npy = match npy.try_data::<i8>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    let npy = match npy.try_data::<u64>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    let npy = match npy.try_data::<u32>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    let npy = match npy.try_data::<u16>() {
        Ok(r) => return Ok(all(r)),
        Err(n) => n,
    };
    match npy.try_data::<u8>() {
        Ok(r) => Ok(all(r)),
        Err(n) => Err(n),
    }
}

/// Picks the tensor `given`, else the first of `defaults` the file has.
fn pick<'a>(
    path: &Path,
    file: &'a TensorFile,
    given: Option<&str>,
    defaults: &[&str],
    what: &str,
    flag: &str,
) -> Result<(String, &'a (Vec<usize>, Values))> {
    let found = match given {
        Some(n) => file.tensors.get_key_value(n),
        None => defaults.iter().find_map(|n| file.tensors.get_key_value(*n)),
    };
    found.map(|(k, v)| (k.clone(), v)).ok_or_else(|| {
        let wanted = match given {
            Some(n) => format!("'{n}'"),
            None => defaults.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(" or "),
        };
        let mut have: Vec<&str> = file.tensors.keys().map(|s| s.as_str()).take(12).collect();
        if file.tensors.len() > have.len() {
            have.push("...");
        }
        Error::bad_file(
            path,
            format!(
                "no {what} tensor {wanted} (the file has: {}); name it with {flag}",
                if have.is_empty() { "no tensors".into() } else { have.join(", ") }
            ),
        )
    })
}

/// Reads a safetensors or `.npz` file of synthetic images and labels into a [`SyntheticSet`].
pub fn import_dataset(path: &Path, opts: &ImportOptions) -> Result<Imported> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::bad_file(path, m);
    // A zip archive (what np.savez writes) starts with a local file header.
    let file = if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        read_npz(path, &bytes)?
    } else {
        read_safetensors(path, &bytes)?
    };
    let stored: Option<SyntheticSet> = match file.metadata.get(SET_KEY) {
        None => None,
        Some(s) => Some(
            serde_json::from_str(s)
                .map_err(|e| bad(format!("metadata '{SET_KEY}' does not decode ({e})")))?,
        ),
    };
    let base = match (opts.base, &stored) {
        (Some(b), Some(s)) if b != s.base => {
            return Err(bad(format!(
                "--base {b}, but the file's metadata says its base dataset is {}",
                s.base
            )))
        }
        (Some(b), _) => b,
        (None, Some(s)) => s.base,
        (None, None) => {
            return Err(bad(
                "no lmc metadata says which dataset the images stand for; pass --base NAME".into(),
            ))
        }
    };
    let space = match (opts.space, file.metadata.get(SPACE_KEY)) {
        (Some(s), _) => s,
        (None, Some(s)) => {
            s.parse().map_err(|_| bad(format!("metadata '{SPACE_KEY}' is '{s}'")))?
        }
        (None, None) => {
            return Err(bad(
                "say how its images are scaled: --pixel-space normalized (already normalised \
                 with the base dataset's statistics) or --pixel-space unit (values in [0, 1])"
                    .into(),
            ))
        }
    };
    let (images_tensor, (ishape, ivalues)) =
        pick(path, &file, opts.images.as_deref(), &IMAGE_NAMES, "images", "--images")?;
    let (labels_tensor, (lshape, lvalues)) =
        pick(path, &file, opts.labels.as_deref(), &LABEL_NAMES, "labels", "--labels")?;
    if images_tensor == labels_tensor {
        return Err(bad(format!("images and labels are both read from tensor '{images_tensor}'")));
    }
    let want = base.image_shape();
    let dims = [want.channels, want.height, want.width];
    let n = match ishape.as_slice() {
        [n, c, h, w] if [*c, *h, *w] == dims => *n,
        [_, h, w, c] if [*c, *h, *w] == dims && want.channels > 1 => {
            return Err(bad(format!(
                "tensor '{images_tensor}' has shape {ishape:?}, which looks like N x H x W x C; \
                 {base} needs N x C x H x W (N x {} x {} x {}): transpose it",
                dims[0], dims[1], dims[2]
            )))
        }
        _ => {
            return Err(bad(format!(
                "tensor '{images_tensor}' has shape {ishape:?}; {base} needs N x C x H x W = \
                 N x {} x {} x {}",
                dims[0], dims[1], dims[2]
            )))
        }
    };
    if n == 0 {
        return Err(bad(format!("tensor '{images_tensor}' holds no images")));
    }
    if lshape.as_slice() != [n] {
        return Err(bad(format!(
            "tensor '{labels_tensor}' has shape {lshape:?}; {n} images need {n} labels (shape [{n}])"
        )));
    }
    let mut px = match ivalues {
        Values::Float(v) => v.clone(),
        Values::Int(_) => {
            return Err(bad(format!(
                "tensor '{images_tensor}' holds integers; images must be floats (f32)"
            )))
        }
        Values::Other(t) => {
            return Err(bad(format!(
                "tensor '{images_tensor}' has dtype {t}; images must be floats (f32)"
            )))
        }
    };
    if let Some(i) = px.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "tensor '{images_tensor}' holds {} at index {i} (image {})",
            px[i],
            i / want.len()
        )));
    }
    let classes = base.classes();
    let labels: Vec<u8> = match lvalues {
        Values::Int(v) => {
            if let Some(i) = v.iter().position(|&l| l < 0 || l as usize >= classes) {
                return Err(bad(format!(
                    "tensor '{labels_tensor}' holds label {} at index {i}; {base} has classes 0..{}",
                    v[i],
                    classes - 1
                )));
            }
            v.iter().map(|&l| l as u8).collect()
        }
        Values::Float(_) => {
            return Err(bad(format!(
                "tensor '{labels_tensor}' holds floats; labels must be integers (class indices)"
            )))
        }
        Values::Other(t) => {
            return Err(bad(format!(
                "tensor '{labels_tensor}' has dtype {t}; labels must be integers (class indices)"
            )))
        }
    };
    let range =
        px.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    // The statistics the set is stored under: the file's own (an export's), else the base's.
    let norm = stored.as_ref().map_or_else(|| base.normalization(), |s| s.norm.clone());
    if norm.mean.len() != want.channels || norm.std.len() != want.channels {
        return Err(bad(format!(
            "metadata '{SET_KEY}' has {} means and {} standard deviations for {} channels",
            norm.mean.len(),
            norm.std.len(),
            want.channels
        )));
    }
    if space == PixelSpace::Unit {
        // The formula of a real batch (`fill_batch`): (v - mean[c]) / std[c], in f32.
        let plane = want.height * want.width;
        for img in px.chunks_exact_mut(want.len()) {
            for (c, p) in img.chunks_exact_mut(plane).enumerate() {
                let (m, s) = (norm.mean[c], norm.std[c]);
                p.iter_mut().for_each(|v| *v = (*v - m) / s);
            }
        }
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let images = ImageSet { shape: want, pixels: Pixels::F32(px), labels };
    let set = match stored {
        Some(s) => SyntheticSet {
            name: opts.name.clone().unwrap_or(s.name),
            factor: opts.factor.unwrap_or(s.factor),
            images,
            ..s
        },
        None => SyntheticSet {
            name: opts.name.clone().unwrap_or(stem),
            base,
            images,
            factor: opts.factor.unwrap_or(1),
            norm,
            class_names: base.class_names(),
            recipe: serde_json::json!({
                "method": "imported",
                "file": path.file_name().map(|f| f.to_string_lossy().into_owned()),
                "format": file.format,
                "images": images_tensor,
                "labels": labels_tensor,
                "pixel_space": space,
            })
            .to_string(),
        },
    };
    if set.class_names.len() != classes {
        return Err(bad(format!(
            "metadata '{SET_KEY}' names {} classes, {base} has {classes}",
            set.class_names.len()
        )));
    }
    set.validate_payload().map_err(bad)?;
    let hex: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    let provenance = Provenance::of("import-dataset", &(hex, opts), &[]);
    Ok(Imported {
        set,
        provenance,
        format: file.format,
        images_tensor,
        labels_tensor,
        space,
        range,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A `.npy` member: version 1 header `dict` padded to 64 bytes, then `data`.
    fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut h = dict.as_bytes().to_vec();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h);
        out.extend(data);
        out
    }

    fn npz(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in members {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap().into_inner()
    }

    fn import_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostile.npz");
        std::fs::write(&path, bytes).unwrap();
        let opts = ImportOptions {
            base: Some(DatasetName::Digits),
            space: Some(PixelSpace::Unit),
            ..Default::default()
        };
        import_dataset(&path, &opts).unwrap_err().to_string()
    }

    #[test]
    fn hostile_npy_headers_are_refused_before_anything_is_allocated() {
        let labels = npy("{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }", &[0; 16]);
        let with = |images: Vec<u8>| npz(&[("images.npy", images), ("labels.npy", labels.clone())]);
        let huge = "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4611686018427387904, 8, 8), }";
        let err = import_err(&with(npy(huge, &[])));
        assert!(err.contains("hostile.npz") && err.contains("more elements than memory"), "{err}");
        let big = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000, 1, 8, 8), }";
        let err = import_err(&with(npy(big, &[0; 64])));
        assert!(err.contains("member images.npy") && err.contains("truncated"), "{err}");
        let fortran = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 1, 8, 8), }";
        let err = import_err(&with(npy(fortran, &[0; 512])));
        assert!(err.contains("Fortran order"), "{err}");
        let ints = "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 1, 8, 8), }";
        let err = import_err(&with(npy(ints, &[0; 512])));
        assert!(err.contains("images must be floats"), "{err}");
        let garbage = npz(&[("images.npy", b"not an npy".to_vec())]);
        assert!(import_err(&garbage).contains("not a valid .npy array"));
    }
}
