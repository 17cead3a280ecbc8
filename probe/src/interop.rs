//! safetensors export and import with PyTorch state-dict names.
//!
//! A run is written as one f32 tensor per layout entry under its state-dict name
//! (`fc_layers.0.weight`, `features.0.bias`, ...), pruned entries already zero, plus, for every
//! prunable weight, a 0/1 f32 tensor `NAME_mask` (the name `torch.nn.utils.prune` gives its
//! buffer). Batch-norm running statistics are written as PyTorch keeps its buffers:
//! `NAME.running_mean` and `NAME.running_var` in f32, `NAME.num_batches_tracked` as an int64
//! scalar, so `load_state_dict(strict=True)` of the same architecture takes the file. Metadata:
//! `format = pt` (what PyTorch writers put there), and `lmc.run` (the Run's
//! JSON without its parameters and mask, so an import restores it), `lmc.model`, `lmc.dataset`,
//! `lmc.provenance`.
//!
//! Import reads the same layout, and also PyTorch-pruned state dicts (`NAME_orig` with
//! `NAME_mask`: the weight is `orig * mask`), in f32, f64, f16 or bf16 (masks also bool/u8,
//! batch counts i64).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use lmc_train::artifact::Provenance;
use lmc_train::fit::Run;
use lmc_train::params::{Layout, Mask, ParamKind, ParamVec};
use lmc_train::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

/// Suffix of a mask tensor (PyTorch's pruning buffer name).
pub const MASK_SUFFIX: &str = "_mask";
/// Suffix of an unmasked weight in a PyTorch-pruned state dict.
pub const ORIG_SUFFIX: &str = "_orig";
/// Metadata key holding the Run's JSON (without parameters and mask).
pub const RUN_KEY: &str = "lmc.run";

/// The safetensors bytes of `run` (artifact provenance `provenance`); masks are included unless
/// `with_mask` is false (then the file is a plain state dict).
pub fn export_bytes(run: &Run, provenance: Provenance, with_mask: bool) -> Result<Vec<u8>> {
    // What names and shapes the tensors is the model's layout: it must be what the spec
    // makes (a Run built in memory is not validated the way a read one is).
    run.model.check().map_err(|msg| Error::incompatible(format!("export: {msg}")))?;
    let layout = &run.model.layout;
    run.params.check_same_layout(layout, "export")?;
    run.mask.validate(layout)?;
    let mut params = run.params.data.clone();
    run.mask.apply(&mut params);
    let mut blobs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for e in &layout.entries {
        let values = &params[e.range()];
        if e.kind == ParamKind::BatchesTracked {
            // PyTorch's `num_batches_tracked` is an int64 scalar (a whole number in our f32).
            let bytes = values.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect();
            blobs.push((e.name.clone(), Dtype::I64, e.shape.clone(), bytes));
            continue;
        }
        blobs.push((e.name.clone(), Dtype::F32, e.shape.clone(), f32_bytes(values)));
        if with_mask && e.prunable() {
            let m: Vec<f32> =
                run.mask.keep[e.range()].iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let name = format!("{}{MASK_SUFFIX}", e.name);
            blobs.push((name, Dtype::F32, e.shape.clone(), f32_bytes(&m)));
        }
    }
    // safetensors indexes its header by name and panics on a name given twice.
    let mut names = std::collections::BTreeSet::new();
    if let Some((n, _, _, _)) = blobs.iter().find(|(n, _, _, _)| !names.insert(n.as_str())) {
        return Err(Error::incompatible(format!(
            "export: tensor name '{n}' would be written twice"
        )));
    }
    let views = blobs
        .iter()
        .map(|(n, t, s, b)| TensorView::new(*t, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::data(format!("safetensors: {e:?}")))?;
    let shell = Run {
        params: ParamVec { layout: run.params.layout.clone(), data: vec![] },
        mask: Mask { keep: vec![] },
        ..run.clone()
    };
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("lmc.model".to_string(), run.model.spec.to_string());
    meta.insert("lmc.dataset".to_string(), run.dataset.clone());
    meta.insert("lmc.provenance".to_string(), provenance.hex());
    meta.insert(
        RUN_KEY.to_string(),
        serde_json::to_string(&shell)
            .map_err(|e| Error::data(format!("cannot encode run metadata: {e}")))?,
    );
    serialize_in_order(views, meta)
}

/// `safetensors::serialize`, with the header's `__metadata__` entries in key order. safetensors
/// takes them as a `HashMap` and writes them in its iteration order, which changes from one map
/// to the next (std's hasher is seeded at random), so exporting the same artifact twice gave
/// different bytes. The header is parsed back and written again with the entries sorted (the
/// tensors' entries and offsets unchanged: offsets count from the end of the header), padded
/// with spaces to a multiple of 8 bytes as safetensors pads it.
pub(crate) fn serialize_in_order(
    views: Vec<(String, TensorView<'_>)>,
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let broken = |what: &str| Error::data(format!("safetensors: {what} in the header it wrote"));
    let bytes = safetensors::serialize(views, &Some(meta))
        .map_err(|e| Error::data(format!("safetensors: {e:?}")))?;
    let len = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| broken("no length"))?;
    let n = u64::from_le_bytes(len) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(|| broken("a length past the end"))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|_| broken("no JSON object"))?;
    // Rebuilt entry by entry so the order is ours whether or not serde_json keeps insertion
    // order (its `preserve_order` feature): the metadata first, its keys sorted.
    let mut ordered = serde_json::Map::new();
    if let Some(serde_json::Value::Object(m)) = header.get("__metadata__") {
        let sorted: BTreeMap<&String, &serde_json::Value> = m.iter().collect();
        let m: serde_json::Map<String, serde_json::Value> =
            sorted.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        ordered.insert("__metadata__".to_string(), serde_json::Value::Object(m));
    }
    for (k, v) in header.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        ordered.insert(k.clone(), v.clone());
    }
    let mut out = serde_json::to_vec(&ordered).map_err(|_| broken("an unprintable value"))?;
    out.resize(out.len().div_ceil(8) * 8, b' ');
    let mut file = Vec::with_capacity(8 + out.len() + bytes.len() - 8 - n);
    file.extend_from_slice(&(out.len() as u64).to_le_bytes());
    file.extend_from_slice(&out);
    file.extend_from_slice(&bytes[8 + n..]);
    Ok(file)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// IEEE half to f32 (exact).
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: value = f * 2^-24.
            let v = f as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 112) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

/// A safetensors file decoded to f32 tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    /// The header's `__metadata__` (empty when absent).
    pub metadata: HashMap<String, String>,
    /// Tensors by name: shape and values.
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// SHA-256 of the file's bytes.
    pub sha256: [u8; 32],
}

/// The tensor names of a safetensors header, in file order, duplicates kept (the `safetensors`
/// crate reads the header into a map, where a second tensor of one name silently replaces the
/// first).
struct HeaderNames(Vec<String>);

impl<'de> serde::Deserialize<'de> for HeaderNames {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = HeaderNames;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<HeaderNames, A::Error> {
                let mut names = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    names.push(k);
                }
                Ok(HeaderNames(names))
            }
        }
        d.deserialize_map(V)
    }
}

/// Errors on what the `safetensors` crate accepts but an import must not: a tensor name given
/// twice. Everything else about the header (its length, offsets, shapes, dtypes) the crate
/// checks itself without panicking; this runs first and only reads the header if its length
/// fits the file.
pub(crate) fn check_header(bytes: &[u8]) -> std::result::Result<(), String> {
    let Some(len) = bytes.get(..8) else {
        return Err(format!(
            "not a valid safetensors file: {} bytes, shorter than the 8-byte header length",
            bytes.len()
        ));
    };
    let n = u64::from_le_bytes(len.try_into().expect("8 bytes"));
    let Some(header) = usize::try_from(n).ok().and_then(|n| bytes.get(8..8usize.checked_add(n)?))
    else {
        return Err(format!(
            "not a valid safetensors file: header length {n} is past the end of the file ({} bytes)",
            bytes.len()
        ));
    };
    let HeaderNames(names) = serde_json::from_slice(header)
        .map_err(|e| format!("not a valid safetensors file: header is not a JSON object ({e})"))?;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(format!(
            "not a valid safetensors file: tensor '{dup}' appears twice in the header"
        ));
    }
    Ok(())
}

/// Reads and decodes `bytes` (from `path`, for messages).
pub fn load_bytes(path: &Path, bytes: &[u8]) -> Result<Loaded> {
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
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F64 => d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect(),
            Dtype::BOOL | Dtype::U8 => d.iter().map(|&b| b as f32).collect(),
            // Batch counts; exact in f32 up to 2^24.
            Dtype::I64 => d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            other => return Err(bad(format!("tensor '{name}' has dtype {other:?}; lmc reads f32, f64, f16, bf16 (and bool/u8 masks, i64 batch counts)"))),
        };
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    Ok(Loaded { metadata, tensors, sha256: Sha256::digest(bytes).into() })
}

/// Reads `path`.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    load_bytes(path, &bytes)
}

impl Loaded {
    /// The Run stored in the metadata by [`export_bytes`] (parameters and mask empty), if any.
    pub fn run_metadata(&self, path: &Path) -> Result<Option<Run>> {
        match self.metadata.get(RUN_KEY) {
            None => Ok(None),
            Some(s) => {
                let run: Run = serde_json::from_str(s)
                    .map_err(|e| Error::bad_file(path, format!("metadata '{RUN_KEY}' does not decode ({e}); pass --like RUN or --model/--dataset")))?;
                // The file's own description of its model drives every allocation and offset
                // of the import: it must be exactly what its spec makes.
                run.model.check().map_err(|msg| {
                    Error::bad_file(
                        path,
                        format!(
                            "metadata '{RUN_KEY}': {msg}; pass --like RUN or --model/--dataset"
                        ),
                    )
                })?;
                Ok(Some(run))
            }
        }
    }

    /// Parameters and mask for `layout`: each entry from its name (or `NAME_orig`), its mask from
    /// `NAME_mask` when present (dense otherwise). Shapes must match; leftover tensors are an
    /// error unless `allow_extra`.
    pub fn to_params(
        &self,
        path: &Path,
        layout: &Layout,
        allow_extra: bool,
    ) -> Result<(ParamVec, Mask)> {
        let bad = |m: String| Error::bad_file(path, m);
        let mut used = std::collections::BTreeSet::new();
        let mut params = ParamVec::zeros(layout.clone());
        let mut mask = Mask::dense(layout);
        let mut missing = Vec::new();
        for e in &layout.entries {
            let orig = format!("{}{ORIG_SUFFIX}", e.name);
            let key = if self.tensors.contains_key(&e.name) {
                e.name.clone()
            } else if self.tensors.contains_key(&orig) {
                orig
            } else {
                missing.push(e.name.clone());
                continue;
            };
            let (shape, values) = &self.tensors[&key];
            if *shape != e.shape {
                return Err(bad(format!(
                    "tensor '{key}' has shape {shape:?}, the model expects {:?}",
                    e.shape
                )));
            }
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!("tensor '{key}' holds a non-finite value at index {i}")));
            }
            let bad_state = match e.kind {
                ParamKind::RunningVar => values.iter().position(|v| *v < 0.0),
                ParamKind::BatchesTracked => {
                    values.iter().position(|v| *v < 0.0 || v.fract() != 0.0 || *v > 16_777_216.0)
                }
                _ => None,
            };
            if let Some(i) = bad_state {
                return Err(bad(format!(
                    "tensor '{key}' holds {} at index {i}: a running variance must be >= 0, a batch count a whole number up to 2^24",
                    values[i]
                )));
            }
            params.data[e.range()].copy_from_slice(values);
            used.insert(key);
            let mkey = format!("{}{MASK_SUFFIX}", e.name);
            if let Some((mshape, mvals)) = self.tensors.get(&mkey) {
                if *mshape != e.shape {
                    return Err(bad(format!(
                        "mask '{mkey}' has shape {mshape:?}, the model expects {:?}",
                        e.shape
                    )));
                }
                if !e.prunable() {
                    return Err(bad(format!("mask '{mkey}' prunes '{}', which is not prunable (biases and norm parameters never are)", e.name)));
                }
                for (i, &m) in mvals.iter().enumerate() {
                    mask.keep[e.offset + i] = match m {
                        1.0 => true,
                        0.0 => false,
                        other => {
                            return Err(bad(format!(
                                "mask '{mkey}' holds {other} at index {i}; masks are 0/1"
                            )))
                        }
                    };
                }
                used.insert(mkey);
            }
        }
        if !missing.is_empty() {
            let have: Vec<&String> = self.tensors.keys().collect();
            return Err(bad(format!(
                "missing tensors for this model: {} (the file has: {})",
                missing.join(", "),
                have.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        let extra: Vec<&String> = self.tensors.keys().filter(|k| !used.contains(*k)).collect();
        if !extra.is_empty() && !allow_extra {
            return Err(bad(format!(
                "tensors this model does not have: {} (a different architecture? --allow-extra ignores them)",
                extra.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
        mask.validate(layout).map_err(|e| bad(e.to_string()))?;
        mask.apply(&mut params.data);
        Ok((params, mask))
    }

    /// A provenance naming this file's content and how it is read.
    pub fn provenance(&self, model: &impl serde::Serialize) -> Provenance {
        let hex: String = self.sha256.iter().map(|b| format!("{b:02x}")).collect();
        Provenance::of("import", &(hex, model), &[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_by_hand() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95); // nearest half to 1/3
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert!(f16_to_f32(0x7c00).is_infinite());
        assert_eq!(f16_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
    }
}
