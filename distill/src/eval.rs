//! Evaluation of a synthetic set as the DC/DSA/DM papers do it: train M freshly initialised
//! networks on the (decoded) synthetic images with DSA (independent draws per image, one
//! operation per batch), SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, learning rate
//! x0.1 at half of training, then report the real test accuracy's mean and standard deviation.
//! Training is [`lmc_train::fit::fit`]; DSA enters through its `on_batch` hook.

use std::sync::Arc;

use lmc_train::data::{Batch, Dataset, ImageShape, SyntheticSet};
use lmc_train::fit::{self, Observer, TrainConfig, TrainData, TrainState};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::optim::{Schedule, Sgd};
use lmc_train::params::Mask;
use lmc_train::seed::{self, Stream};
use lmc_train::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::dsa::{Augmentation, Strategy};

/// Evaluation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// Networks trained.
    pub models: usize,
    /// Epochs over the synthetic set per network.
    pub epochs: usize,
    /// Batch size (DC/DM: 256).
    pub batch_size: usize,
    /// Learning rate (DC/DM: 0.01; x0.1 at half of training).
    pub lr: f64,
    /// DSA strategy during training (flip dropped for digit datasets); `none` for plain training.
    pub dsa: Strategy,
    /// Seed: network m is initialised from `mix(seed) + m`, its data order and DSA likewise.
    pub seed: u64,
}

impl EvalConfig {
    /// The papers' protocol with `models` networks and `epochs` epochs.
    pub fn paper(models: usize, epochs: usize, seed: u64) -> EvalConfig {
        EvalConfig {
            models,
            epochs,
            batch_size: 256,
            lr: 0.01,
            dsa: crate::dsa::DEFAULT_STRATEGY.parse().expect("the default strategy parses"),
            seed,
        }
    }

    /// The training configuration of each network.
    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            iterations: None,
            batch_size: self.batch_size,
            lr: self.lr,
            sgd: Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false },
            schedule: Schedule::MultiStep { milestones: vec![0.5], gamma: 0.1 },
            augment: Some(false),
            eval_every: 0,
        }
    }
}

/// What an evaluation found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// Real test accuracy of each network, in [0, 1].
    pub accuracies: Vec<f64>,
    /// Their mean.
    pub mean: f64,
    /// Their population standard deviation (numpy's default, as the papers report).
    pub std: f64,
    /// Training images processed, all networks together.
    pub images_seen: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Progress of an evaluation: (network index, step in its training, total steps, loss).
pub type EvalProgress<'a> = &'a mut dyn FnMut(usize, u64, u64, f32);

/// DSA on each training batch, drawn from (seed, epoch, step) so training stays deterministic.
struct DsaObserver<'a> {
    strategy: Strategy,
    shape: ImageShape,
    seed: u64,
    model: usize,
    total: u64,
    done: u64,
    progress: EvalProgress<'a>,
}

impl Observer for DsaObserver<'_> {
    fn on_batch(&mut self, epoch: usize, step: u64, batch: &mut Batch) {
        if self.strategy.is_none() || batch.n == 0 {
            return;
        }
        let mut rng = seed::rng(self.seed, Stream::Augment, ((epoch as u64) << 32) | step);
        let params = self.strategy.sample_per_image(&mut rng, self.shape, batch.n);
        batch.x = Arc::new(Augmentation::per_image(self.shape, &params)).apply_host(&batch.x);
    }
    fn on_step(&mut self, _e: usize, _s: u64, _n: u64, loss: f32) {
        self.done += 1;
        (self.progress)(self.model, self.done, self.total, loss);
    }
}

/// Trains `cfg.models` fresh `spec` networks on `set` (decoded) and tests them on `real`'s test split.
pub fn evaluate(
    set: &SyntheticSet,
    real: &Dataset,
    spec: &ModelSpec,
    cfg: &EvalConfig,
    progress: EvalProgress,
) -> Result<EvalSummary> {
    if cfg.models == 0 {
        return Err(Error::setting("--eval-models must be at least 1 to evaluate"));
    }
    if cfg.epochs == 0 {
        return Err(Error::setting("--eval-epochs must be at least 1"));
    }
    let started = std::time::Instant::now();
    let ds = set.to_dataset(real)?;
    let model = Model::new(spec, ds.train.shape, ds.classes)?;
    let tc = cfg.train_config();
    let (_, _, total) = tc.plan(ds.train.len());
    let data = TrainData { train: &ds.train, test: Some(&ds.test), norm: &ds.norm, augment: false };
    let mask = Mask::dense(&model.layout);
    let strategy = cfg.dsa.for_dataset(set.base);
    let mut accuracies = Vec::with_capacity(cfg.models);
    let mut images_seen = 0;
    for m in 0..cfg.models {
        let s = seed::mix(cfg.seed).wrapping_add(m as u64);
        let mut obs = DsaObserver {
            strategy: strategy.clone(),
            shape: ds.train.shape,
            seed: s,
            model: m,
            total,
            done: 0,
            progress: &mut *progress,
        };
        let state =
            fit::fit(&model, &mask, &data, &tc, s, TrainState::start(model.init(s)), &mut obs)?;
        let acc = state.curve.last().and_then(|r| r.test).map_or(f64::NAN, |e| e.accuracy);
        accuracies.push(acc);
        images_seen += state.images_seen;
    }
    let n = accuracies.len() as f64;
    let mean = accuracies.iter().sum::<f64>() / n;
    let std = (accuracies.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / n).sqrt();
    Ok(EvalSummary { accuracies, mean, std, images_seen, seconds: started.elapsed().as_secs_f64() })
}
