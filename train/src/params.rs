//! The common currency of every stage: a named, flat parameter vector ([`ParamVec`]) with a fixed
//! [`Layout`], and a [`Mask`] over its prunable entries (conv and linear weights).
//!
//! Pruning, rewinding, interpolation, landscape planes and Hessian-vector products are all plain
//! vector arithmetic on these, so later stages never need to know a model's layer types.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a parameter tensor is; decides whether it can be pruned and how it is initialised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ParamKind {
    /// A conv or linear weight: prunable.
    Weight,
    /// A conv or linear bias.
    Bias,
    /// A normalisation scale (gamma).
    NormScale,
    /// A normalisation shift (beta).
    NormShift,
    /// A batch-norm layer's running mean (state, like the two below: carried with the
    /// parameters, interpolated with them and saved in every artifact, but never trained,
    /// decayed, pruned or probed).
    RunningMean,
    /// A batch-norm layer's running (unbiased) variance.
    RunningVar,
    /// A batch-norm layer's count of training batches (PyTorch's int64 `num_batches_tracked`,
    /// held as an f32, exact up to 2^24 batches).
    BatchesTracked,
}

impl ParamKind {
    /// Whether this is state (batch-norm running statistics) rather than a trained parameter.
    pub fn is_state(self) -> bool {
        matches!(self, ParamKind::RunningMean | ParamKind::RunningVar | ParamKind::BatchesTracked)
    }
}

/// One named tensor inside a [`ParamVec`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamInfo {
    /// PyTorch-style state-dict name, e.g. `features.0.weight` or `fc_layers.1.bias`.
    pub name: String,
    /// Shape as PyTorch would report it, e.g. `[128, 3, 3, 3]`.
    pub shape: Vec<usize>,
    /// Offset of the first element in the flat vector.
    pub offset: usize,
    /// What kind of parameter this is.
    pub kind: ParamKind,
}

impl ParamInfo {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// True for a zero-element tensor (never produced by our models).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The index range in the flat vector.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
    /// Conv and linear weights are prunable; biases, norm parameters and state never are.
    pub fn prunable(&self) -> bool {
        self.kind == ParamKind::Weight
    }
    /// Whether SGD trains this tensor (everything but state).
    pub fn trainable(&self) -> bool {
        !self.kind.is_state()
    }
}

/// The ordered list of named tensors a model has.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// Tensors in forward order.
    pub entries: Vec<ParamInfo>,
}

impl Layout {
    /// Builds a layout from `(name, shape, kind)` triples, assigning offsets in order.
    pub fn new(items: impl IntoIterator<Item = (String, Vec<usize>, ParamKind)>) -> Self {
        let mut offset = 0;
        let entries = items
            .into_iter()
            .map(|(name, shape, kind)| {
                let info = ParamInfo { name, shape, offset, kind };
                offset += info.len();
                info
            })
            .collect();
        Layout { entries }
    }
    /// Total number of scalars.
    pub fn total(&self) -> usize {
        self.entries.last().map_or(0, |e| e.offset + e.len())
    }
    /// Number of trained scalars: the state (running statistics) follows them, so the trained
    /// parameters are `data[..trainable_total()]` of every vector of this layout (see
    /// [`Layout::check`]).
    pub fn trainable_total(&self) -> usize {
        self.entries.iter().filter(|e| e.trainable()).map(ParamInfo::len).sum()
    }
    /// Number of scalars of state (running statistics) after the trained ones.
    pub fn state_total(&self) -> usize {
        self.total() - self.trainable_total()
    }
    /// Number of prunable scalars.
    pub fn prunable_total(&self) -> usize {
        self.entries.iter().filter(|e| e.prunable()).map(ParamInfo::len).sum()
    }
    /// Errors unless the offsets are those [`Layout::new`] assigns (each tensor right after the
    /// previous one, from 0), state entries come after every trained one, and the total is at
    /// most [`MAX_PARAMETERS`]: what a layout read from a file must satisfy before any range of
    /// it indexes a vector.
    pub fn check(&self) -> std::result::Result<(), String> {
        let mut offset = 0usize;
        let mut state = None;
        for e in &self.entries {
            match (state, e.kind.is_state()) {
                (None, true) => state = Some(&e.name),
                (Some(s), false) => {
                    return Err(format!(
                        "parameter '{}' comes after the state entry '{s}' (state must follow every parameter)",
                        e.name
                    ))
                }
                _ => {}
            }
            if e.offset != offset {
                return Err(format!(
                    "tensor '{}' starts at offset {} instead of {offset}",
                    e.name, e.offset
                ));
            }
            let len = e.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            offset = match len.and_then(|l| offset.checked_add(l)) {
                Some(o) if o <= MAX_PARAMETERS => o,
                _ => {
                    return Err(format!(
                        "more than {MAX_PARAMETERS} parameters (at tensor '{}' of shape {:?})",
                        e.name, e.shape
                    ))
                }
            };
        }
        Ok(())
    }
    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&ParamInfo> {
        self.entries.iter().find(|e| e.name == name)
    }
    /// Same as [`Layout::get`] but an error naming the known tensors when absent.
    pub fn require(&self, name: &str) -> Result<&ParamInfo> {
        self.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
            Error::setting(format!(
                "unknown parameter '{name}' (this model has: {})",
                known.join(", ")
            ))
        })
    }
}

/// The most parameters a model may have: 100 million f32 are 400 MB per vector, and training
/// keeps several (parameters, gradient, momentum), probes more. It bounds every allocation a
/// model spec or a file's layout can ask for.
pub const MAX_PARAMETERS: usize = 100_000_000;

/// A flat f32 parameter vector with its layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamVec {
    /// Names, shapes and offsets.
    pub layout: Layout,
    /// All scalars, `layout.total()` long.
    pub data: Vec<f32>,
}

impl ParamVec {
    /// All zeros.
    pub fn zeros(layout: Layout) -> Self {
        let data = vec![0.0; layout.total()];
        ParamVec { layout, data }
    }
    /// Number of scalars.
    pub fn len(&self) -> usize {
        self.data.len()
    }
    /// True when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// The slice of the tensor at `index` in the layout.
    pub fn tensor(&self, index: usize) -> &[f32] {
        &self.data[self.layout.entries[index].range()]
    }
    /// The slice of the named tensor.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.layout.get(name).map(|e| &self.data[e.range()])
    }
    /// Errors unless the layout is well formed and `data` is as long as it says.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.layout.check()?;
        if self.data.len() != self.layout.total() {
            return Err(format!(
                "{} values for a layout of {} parameters",
                self.data.len(),
                self.layout.total()
            ));
        }
        Ok(())
    }
    /// Errors unless `other` has the same layout (names, shapes, order) and the data is as long
    /// as that layout says.
    pub fn check_same_layout(&self, other: &Layout, what: &str) -> Result<()> {
        if self.layout == *other && self.data.len() == other.total() {
            Ok(())
        } else {
            Err(Error::incompatible(format!(
                "{what}: parameter layouts differ ({} tensors / {} scalars vs {} tensors / {} scalars)",
                self.layout.entries.len(),
                self.data.len(),
                other.entries.len(),
                other.total()
            )))
        }
    }
    /// Euclidean distance to `other` over the trained parameters (state excluded), accumulated
    /// in f64.
    pub fn l2_distance(&self, other: &ParamVec) -> Result<f64> {
        self.check_same_layout(&other.layout, "distance")?;
        let t = self.layout.trainable_total();
        let s: f64 = self.data[..t]
            .iter()
            .zip(&other.data[..t])
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        Ok(s.sqrt())
    }
    /// True when every value is finite.
    pub fn all_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }
}

/// A 0/1 mask over a layout: `keep[i]` is false for pruned scalars. Non-prunable entries are
/// always kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    /// One flag per scalar of the layout.
    pub keep: Vec<bool>,
}

/// Sparsity of one prunable tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSparsity {
    /// Tensor name.
    pub name: String,
    /// Number of scalars.
    pub total: usize,
    /// Number kept.
    pub kept: usize,
}

impl Mask {
    /// Keeps everything.
    pub fn dense(layout: &Layout) -> Self {
        Mask { keep: vec![true; layout.total()] }
    }
    /// Errors unless the mask fits the layout and keeps every non-prunable scalar.
    pub fn validate(&self, layout: &Layout) -> Result<()> {
        if self.keep.len() != layout.total() {
            return Err(Error::incompatible(format!(
                "mask has {} entries but the model has {} parameters",
                self.keep.len(),
                layout.total()
            )));
        }
        for e in layout.entries.iter().filter(|e| !e.prunable()) {
            if self.keep[e.range()].iter().any(|k| !k) {
                return Err(Error::incompatible(format!(
                    "mask prunes '{}', which is not prunable",
                    e.name
                )));
            }
        }
        Ok(())
    }
    /// Zeroes the pruned entries of `values` (parameters, gradients, momentum...).
    pub fn apply(&self, values: &mut [f32]) {
        for (v, &k) in values.iter_mut().zip(&self.keep) {
            if !k {
                *v = 0.0;
            }
        }
    }
    /// Number of kept prunable scalars.
    pub fn kept_prunable(&self, layout: &Layout) -> usize {
        self.per_layer(layout).iter().map(|l| l.kept).sum()
    }
    /// Fraction of prunable scalars removed, in [0, 1].
    pub fn sparsity(&self, layout: &Layout) -> f64 {
        let total = layout.prunable_total();
        if total == 0 {
            return 0.0;
        }
        1.0 - self.kept_prunable(layout) as f64 / total as f64
    }
    /// Kept / total per prunable tensor.
    pub fn per_layer(&self, layout: &Layout) -> Vec<LayerSparsity> {
        layout
            .entries
            .iter()
            .filter(|e| e.prunable())
            .map(|e| LayerSparsity {
                name: e.name.clone(),
                total: e.len(),
                // A mask shorter than its layout (never after `validate`) counts as pruned
                // rather than panicking.
                kept: self.keep.get(e.range()).map_or(0, |k| k.iter().filter(|&&k| k).count()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::new([
            ("a.weight".to_string(), vec![2, 3], ParamKind::Weight),
            ("a.bias".to_string(), vec![2], ParamKind::Bias),
            ("b.weight".to_string(), vec![1, 2], ParamKind::Weight),
        ])
    }

    #[test]
    fn offsets_and_totals_follow_shapes() {
        let l = layout();
        assert_eq!(l.total(), 6 + 2 + 2);
        assert_eq!(l.prunable_total(), 8);
        assert_eq!(l.entries[1].range(), 6..8);
        assert_eq!(l.entries[2].range(), 8..10);
        assert!(l.require("zzz").unwrap_err().to_string().contains("a.weight"));
    }

    #[test]
    fn mask_sparsity_counts_only_prunable() {
        let l = layout();
        let mut m = Mask::dense(&l);
        m.keep[0] = false;
        m.keep[9] = false;
        // 2 of 8 prunable scalars removed.
        assert!((m.sparsity(&l) - 0.25).abs() < 1e-12);
        assert_eq!(m.per_layer(&l)[1].kept, 1);
        m.validate(&l).unwrap();
        m.keep[7] = false; // a bias
        assert!(m.validate(&l).is_err());
    }

    #[test]
    fn l2_distance_by_hand() {
        let l = layout();
        let a = ParamVec { layout: l.clone(), data: (0..10).map(|i| i as f32 * 0.37).collect() };
        let b = ParamVec { layout: l, data: (0..10).map(|i| -(i as f32) * 1.3).collect() };
        // distance by hand: sum_i (1.67 i)^2 = 1.67^2 * 285
        let d = a.l2_distance(&b).unwrap();
        assert!((d - (1.67f64.powi(2) * 285.0).sqrt()).abs() < 1e-4);
    }
}
