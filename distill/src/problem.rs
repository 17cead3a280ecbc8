//! What a matching step needs to know: the network architecture, the real training split grouped
//! by class, the DSA strategy, and how stored synthetic images are laid out (class-major: the
//! images of class c are `c * ipc .. (c + 1) * ipc`).

use std::sync::Arc;

use dfdx::prelude::*;
use lmc_train::data::{self, Batch, DatasetName, ImageSet, ImageShape, Normalization};
use lmc_train::model::Model;
use lmc_train::ops::T4;
use rand::Rng;

use crate::config::DistillConfig;
use crate::dsa::{AugParams, Augmentation, Strategy};
use crate::formation;

/// A distillation problem: model, real data and the synthetic layout.
pub struct Problem<'a> {
    /// The network every matching step samples or trains.
    pub model: &'a Model,
    /// Real training images.
    pub train: &'a ImageSet,
    /// Their normalisation.
    pub norm: &'a Normalization,
    /// Indices of the real training images of each class.
    pub by_class: Vec<Vec<u32>>,
    /// DSA strategy as used on this dataset (flip dropped for digits).
    pub strategy: Strategy,
    /// Stored images per class.
    pub ipc: usize,
    /// Multi-formation factor.
    pub factor: usize,
    /// Real images per class per matching step.
    pub batch_real: usize,
    /// CPU device.
    pub dev: Cpu,
}

impl<'a> Problem<'a> {
    /// Groups `train` by class; the DSA strategy of `cfg` is filtered for `base`.
    pub fn new(
        model: &'a Model,
        train: &'a ImageSet,
        norm: &'a Normalization,
        base: DatasetName,
        cfg: &DistillConfig,
    ) -> Problem<'a> {
        let mut by_class = vec![Vec::new(); model.classes];
        for (i, &l) in train.labels.iter().enumerate() {
            by_class[l as usize].push(i as u32);
        }
        Problem {
            model,
            train,
            norm,
            by_class,
            strategy: cfg.dsa.for_dataset(base),
            ipc: cfg.ipc,
            factor: cfg.factor,
            batch_real: cfg.batch_real,
            dev: Cpu::default(),
        }
    }

    /// Image shape.
    pub fn shape(&self) -> ImageShape {
        self.train.shape
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.model.classes
    }

    /// Decoded training images per stored image.
    pub fn per_stored(&self) -> usize {
        self.factor * self.factor
    }

    /// `min(batch_real, class size)` random distinct real images of class `c`, normalised into
    /// `batch` (reference DM: a random permutation of the class, first n).
    pub fn real_batch(&self, c: usize, rng: &mut impl Rng, batch: &mut Batch) {
        let idx = sample_distinct(&self.by_class[c], self.batch_real, rng);
        data::fill_batch(self.train, self.norm, &idx, None, batch);
    }

    /// Every class's real batch, concatenated class by class; returns the per-class counts.
    pub fn real_batches(&self, rng: &mut impl Rng, batch: &mut Batch) -> Vec<usize> {
        let mut idx = Vec::new();
        let mut counts = Vec::with_capacity(self.classes());
        for c in 0..self.classes() {
            let s = sample_distinct(&self.by_class[c], self.batch_real, rng);
            counts.push(s.len());
            idx.extend(s);
        }
        data::fill_batch(self.train, self.norm, &idx, None, batch);
        counts
    }

    /// One siamese DSA draw per class (identity without a strategy).
    pub fn draw_class_augs(&self, rng: &mut impl Rng) -> Vec<AugParams> {
        (0..self.classes()).map(|_| self.strategy.sample_shared(rng, self.shape())).collect()
    }

    /// Augmentation for a batch whose images belong to classes in blocks of `counts`.
    pub fn class_augmentation(&self, params: &[AugParams], counts: &[usize]) -> Arc<Augmentation> {
        let which =
            counts.iter().enumerate().flat_map(|(c, &n)| std::iter::repeat_n(c, n)).collect();
        Arc::new(Augmentation::new(self.shape(), params, which))
    }

    /// The synthetic side of a matching step: `stored` images (n, C, H, W) on a tape, decoded
    /// (multi-formation) then augmented by `aug` (for the decoded images).
    pub fn synthetic_input<Tp: Tape<f32, Cpu>>(
        &self,
        stored: T4<Tp>,
        aug: &Arc<Augmentation>,
    ) -> T4<Tp> {
        let decoded = formation::decode(stored, self.factor);
        if self.strategy.is_none() {
            return decoded;
        }
        crate::dsa::augment(decoded, aug)
    }

    /// A tape-free tensor of `n` images from host values.
    pub fn images(&self, x: Vec<f32>, n: usize) -> T4<NoneTape> {
        let s = self.shape();
        self.dev.tensor_from_vec(x, (n, s.channels, s.height, s.width))
    }
}

/// `k` distinct entries of `pool` (all of them, shuffled, when `k >= pool.len()`): a partial
/// Fisher-Yates shuffle.
pub fn sample_distinct(pool: &[u32], k: usize, rng: &mut impl Rng) -> Vec<u32> {
    let mut v = pool.to_vec();
    let k = k.min(v.len());
    for i in 0..k {
        let j = rng.gen_range(i..v.len());
        v.swap(i, j);
    }
    v.truncate(k);
    v
}
