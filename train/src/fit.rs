//! The one training loop and the one evaluation function every stage calls, plus the `Run`
//! artifact and resumable replicate training.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dfdx::prelude::*;
use serde::{Deserialize, Serialize};

use crate::artifact::{Artifact, Kind, Provenance};
use crate::data::{self, Batch, Dataset, ImageSet, Normalization};
pub use crate::mlp::{FirstLayer, SPARSE_INPUT_MAX_DENSITY};
use crate::model::{Model, Norms};
use crate::ops::{self, BatchStats};
use crate::optim::{Schedule, Sgd};
use crate::params::{Mask, ParamVec};
use crate::seed::{self, Stream};
use crate::stage::{self, Stage};
use crate::{Error, Result};

/// Batch size used for evaluation (does not change results, only speed and memory).
pub const EVAL_BATCH: usize = 1000;

/// A mean training loss over an epoch above this is divergence, though finite: about the
/// square root of `f32::MAX`, so logits whose gaps are that large overflow as soon as anything
/// squares them (cross-entropy is ln(classes) at initialisation). Such a run (digits, mlp:32,
/// `--lr 100`) otherwise ends with finite but meaningless weights and a train loss of 1e36.
pub const DIVERGED_LOSS: f32 = 1.8e19;

/// Everything that decides how a network is trained. Part of a run's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the training set (ignored when `iterations` is set).
    pub epochs: usize,
    /// Train for exactly this many SGD steps instead of whole epochs.
    pub iterations: Option<u64>,
    /// Examples per SGD step (the last batch of an epoch may be smaller).
    pub batch_size: usize,
    /// Base learning rate.
    pub lr: f64,
    /// Optimiser settings.
    pub sgd: Sgd,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Random crop + flip; `None` = the dataset's default (on for CIFAR-10 only).
    pub augment: Option<bool>,
    /// Evaluate on the test split every this many epochs (and always after the last); 0 = only at the end.
    pub eval_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            iterations: None,
            batch_size: 128,
            lr: 0.01,
            sgd: Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false },
            schedule: Schedule::Constant,
            augment: None,
            eval_every: 1,
        }
    }
}

impl TrainConfig {
    /// Checks the settings, naming the flag at fault.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::setting("--batch-size must be at least 1"));
        }
        if self.iterations.is_none() && self.epochs == 0 {
            return Err(Error::setting("--epochs must be at least 1 (or give --iterations)"));
        }
        if self.iterations == Some(0) {
            return Err(Error::setting("--iterations must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::setting(format!("--lr {}: must be a positive number", self.lr)));
        }
        if !(0.0..1.0).contains(&self.sgd.momentum) {
            return Err(Error::setting(format!(
                "--momentum {}: must lie in [0, 1)",
                self.sgd.momentum
            )));
        }
        if !(self.sgd.weight_decay >= 0.0 && self.sgd.weight_decay.is_finite()) {
            return Err(Error::setting(format!(
                "--weight-decay {}: must be >= 0",
                self.sgd.weight_decay
            )));
        }
        if self.sgd.nesterov && self.sgd.momentum == 0.0 {
            return Err(Error::setting("--nesterov needs a non-zero --momentum"));
        }
        Ok(())
    }

    /// The configuration of the first `k` steps of this one on `n` examples as a run of its
    /// own: `k` iterations at the base rate, no test evaluation. Its end state equals this
    /// run's state after step `k` bit for bit (same data order and augmentation, every step at
    /// the base rate), which is what IMP's rewind point (`--rewind-step`) and a spawned child's
    /// parent (`--spawn-step`) are. Errors, naming `flag`, unless `0 < k` is shorter than the
    /// training and comes before the first learning-rate milestone.
    pub fn prefix(&self, n: usize, k: u64, flag: &str) -> Result<TrainConfig> {
        let (per_epoch, epochs, total) = self.plan(n);
        if k == 0 {
            return Err(Error::setting(format!("{flag} 0: a prefix needs at least one step")));
        }
        if k >= total {
            return Err(Error::setting(format!(
                "{flag} {k}: the training has only {total} steps; choose an earlier step"
            )));
        }
        let lr_at = |step: u64| match self.iterations {
            Some(_) => self.schedule.lr(self.lr, step, total),
            None => self.schedule.lr(self.lr, step / per_epoch, epochs as u64),
        };
        // Epoch-based schedules change the rate only at epoch starts: checking each epoch's
        // first step and step k-1 covers every step before k.
        let stride = if self.iterations.is_some() { 1 } else { per_epoch.max(1) as usize };
        if (0..k).step_by(stride).any(|s| lr_at(s) != self.lr) || lr_at(k - 1) != self.lr {
            return Err(Error::setting(format!(
                "{flag} {k}: must come before the first learning-rate milestone"
            )));
        }
        Ok(TrainConfig {
            iterations: Some(k),
            schedule: Schedule::Constant,
            eval_every: 0,
            ..self.clone()
        })
    }

    /// (steps per epoch, epochs to run, total steps) for a training set of `n` examples.
    pub fn plan(&self, n: usize) -> (u64, usize, u64) {
        let per_epoch = n.div_ceil(self.batch_size) as u64;
        match self.iterations {
            Some(it) => (per_epoch, it.div_ceil(per_epoch) as usize, it),
            None => (per_epoch, self.epochs, per_epoch * self.epochs as u64),
        }
    }
}

/// Loss and accuracy of a network on a set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eval {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly, in [0, 1].
    pub accuracy: f64,
    /// Number of examples evaluated.
    pub count: usize,
}

/// One row of the training curve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1.
    pub epoch: usize,
    /// SGD steps done so far.
    pub steps: u64,
    /// Training images processed so far.
    pub images_seen: u64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// Training accuracy over the epoch (on the augmented batches, as seen).
    pub train_accuracy: f64,
    /// Test evaluation, when one was due.
    pub test: Option<Eval>,
}

/// Resumable state of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Current parameters.
    pub params: ParamVec,
    /// Momentum buffer.
    pub momentum: Vec<f32>,
    /// Epochs completed.
    pub epochs_done: usize,
    /// SGD steps completed.
    pub steps_done: u64,
    /// Training images processed.
    pub images_seen: u64,
    /// Curve so far.
    pub curve: Vec<EpochRecord>,
}

impl TrainState {
    /// The state before the first step.
    pub fn start(params: ParamVec) -> TrainState {
        let momentum = vec![0.0; params.len()];
        TrainState {
            params,
            momentum,
            epochs_done: 0,
            steps_done: 0,
            images_seen: 0,
            curve: vec![],
        }
    }
}

/// Callbacks from the training loop (progress bars, checkpoints). All methods default to no-ops.
pub trait Observer {
    /// After each SGD step.
    fn on_step(&mut self, _epoch: usize, _step_in_epoch: u64, _steps_per_epoch: u64, _loss: f32) {}
    /// After a batch is assembled and before its SGD step (`step_in_epoch` counts from 0): may
    /// change the batch in place, e.g. distillation's differentiable siamese augmentation (DSA)
    /// when a synthetic set is evaluated. Must be deterministic in its arguments for resuming to
    /// stay exact.
    fn on_batch(&mut self, _epoch: usize, _step_in_epoch: u64, _batch: &mut Batch) {}
    /// After each completed epoch; an error aborts training.
    fn on_epoch(&mut self, _state: &TrainState) -> Result<()> {
        Ok(())
    }
}

/// An observer that does nothing.
pub struct Silent;
impl Observer for Silent {}

/// Reusable buffers for gradient computation on one model.
pub struct GradBuffers {
    dev: Cpu,
    /// Gradient of the last call, flat like the parameters.
    pub grad: Vec<f32>,
    /// Activations of the graph-free MLP step, kept between steps.
    mlp: crate::mlp::MlpBuffers,
    /// How an MLP's first layer is computed (default: sparse on mostly-background inputs).
    pub first_layer: FirstLayer,
    /// Whether batch norms use the batch's statistics (training, the default) or the running
    /// ones (a probe of the evaluation-mode loss).
    pub norm_mode: NormMode,
    /// The batch statistics of the last training-mode call, one per batch-norm layer in forward
    /// order (for [`Model::update_running`]).
    pub batch_stats: Vec<BatchStats>,
}

/// Which statistics batch norms use in [`loss_and_grad`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormMode {
    /// Training mode: the batch's statistics (collected in [`GradBuffers::batch_stats`]).
    #[default]
    Batch,
    /// Evaluation mode: the running statistics in the parameter vector.
    Running,
}

impl GradBuffers {
    /// Buffers for `model`.
    pub fn new(model: &Model) -> GradBuffers {
        GradBuffers {
            dev: Cpu::default(),
            grad: vec![0.0; model.layout.total()],
            mlp: Default::default(),
            first_layer: FirstLayer::Auto,
            norm_mode: NormMode::Batch,
            batch_stats: Vec::new(),
        }
    }
}

/// Samples per task in the MLP step: the forward and the backward through the activations run
/// per group of this many samples, groups in parallel (see `mlp.rs`).
pub const MLP_GROUP: usize = 64;

/// Mean cross-entropy of `model` at `params` on the `n` images `x` (normalised NCHW) with
/// `labels`, and its gradient w.r.t. the parameters, written to `bufs.grad`. Returns (loss,
/// number correct).
///
/// An MLP takes a graph-free path (`mlp.rs`: no copies or allocations per step, parallel over
/// fixed groups of [`MLP_GROUP`] samples), tested against the tape path
/// ([`loss_and_grad_on_tape`]) and finite differences; other models run on dfdx's tape. Either
/// way results are bit-identical for any thread count.
pub fn loss_and_grad(
    model: &Model,
    params: &ParamVec,
    x: &[f32],
    labels: &[u8],
    bufs: &mut GradBuffers,
) -> (f32, usize) {
    // The other workers poll for the step's parallel loops instead of sleeping between them.
    crate::cpu::with_workers_awake(|| loss_and_grad_body(model, params, x, labels, bufs))
}

/// [`loss_and_grad`]'s work, which it runs inside [`crate::cpu::with_workers_awake`].
fn loss_and_grad_body(
    model: &Model,
    params: &ParamVec,
    x: &[f32],
    labels: &[u8],
    bufs: &mut GradBuffers,
) -> (f32, usize) {
    if let Some(layers) = model.mlp_layers() {
        return crate::mlp::loss_and_grad(
            &layers,
            &params.data,
            x,
            labels,
            &mut bufs.mlp,
            &mut bufs.grad,
            bufs.first_layer,
        );
    }
    loss_and_grad_on_tape(model, params, x, labels, bufs)
}

/// [`loss_and_grad`] through dfdx's tape for any model, in one graph (the reference the MLP
/// path is tested against).
pub fn loss_and_grad_on_tape(
    model: &Model,
    params: &ParamVec,
    x: &[f32],
    labels: &[u8],
    bufs: &mut GradBuffers,
) -> (f32, usize) {
    let tensors = model.tensors(&bufs.dev, params);
    bufs.batch_stats.clear();
    let norms = match bufs.norm_mode {
        NormMode::Batch => Norms::Collect(&mut bufs.batch_stats),
        NormMode::Running => Norms::Running,
    };
    let (loss, correct, mut grads) =
        graph_loss_and_grad(model, &tensors, x, labels, &bufs.dev, norms);
    for (e, t) in model.layout.entries.iter().zip(&tensors) {
        bufs.grad[e.range()].copy_from_slice(grads.get_or_alloc_mut(t).expect("cpu allocation"));
    }
    (loss, correct)
}

/// Mean cross-entropy of one graph over `x`, the number correct, and the gradients.
fn graph_loss_and_grad(
    model: &Model,
    tensors: &[ops::T1],
    x: &[f32],
    labels: &[u8],
    dev: &Cpu,
    norms: Norms,
) -> (f32, usize, Gradients<f32, Cpu>) {
    let s = model.input;
    let n = labels.len();
    let input = dev.tensor_from_vec(x.to_vec(), (n, s.channels, s.height, s.width));
    let logits = model.forward(tensors, input.traced(Gradients::leaky()), false, norms);
    let mut host = vec![0.0f32; n * model.classes];
    logits.copy_into(&mut host);
    let (correct, _) = ops::accuracy_counts(&host, model.classes, labels);
    let loss = ops::cross_entropy(logits, labels);
    let loss_value = loss.array();
    (loss_value, correct, loss.backward())
}

/// Logits of `model` at `params` for `n` normalised images (no tape), in evaluation mode
/// (batch norms use their running statistics).
pub fn logits(model: &Model, dev: &Cpu, tensors: &[ops::T1], x: Vec<f32>, n: usize) -> Vec<f32> {
    let s = model.input;
    let input = dev.tensor_from_vec(x, (n, s.channels, s.height, s.width));
    let out = model.forward(tensors, input, false, Norms::Running);
    let mut host = vec![0.0f32; n * model.classes];
    out.copy_into(&mut host);
    host
}

/// Loss and accuracy on a whole set (no augmentation), in batches of [`EVAL_BATCH`].
pub fn evaluate(model: &Model, params: &ParamVec, set: &ImageSet, norm: &Normalization) -> Eval {
    let dev = Cpu::default();
    let tensors = model.tensors(&dev, params);
    let mut batch = Batch::default();
    let (mut correct, mut loss_sum) = (0usize, 0f64);
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    for chunk in idx.chunks(EVAL_BATCH) {
        data::fill_batch(set, norm, chunk, None, &mut batch);
        let out = logits(model, &dev, &tensors, std::mem::take(&mut batch.x), chunk.len());
        let (c, l) = ops::accuracy_counts(&out, model.classes, &batch.labels);
        correct += c;
        loss_sum += l;
    }
    let count = set.len().max(1);
    Eval {
        loss: loss_sum / count as f64,
        accuracy: correct as f64 / count as f64,
        count: set.len(),
    }
}

/// What to train on.
pub struct TrainData<'a> {
    /// Training images.
    pub train: &'a ImageSet,
    /// Test images, evaluated per `eval_every`.
    pub test: Option<&'a ImageSet>,
    /// Normalisation for U8 pixels.
    pub norm: &'a Normalization,
    /// Whether to apply random crop + flip.
    pub augment: bool,
}

impl<'a> TrainData<'a> {
    /// Train/test splits of `ds`, with augmentation as `cfg` says (or the dataset's default).
    pub fn of(ds: &'a Dataset, cfg: &TrainConfig) -> TrainData<'a> {
        TrainData {
            train: &ds.train,
            test: Some(&ds.test),
            norm: &ds.norm,
            augment: cfg.augment.unwrap_or(ds.augment_default),
        }
    }
}

/// Trains from `state` to the end of `cfg`, with data order and augmentation drawn from
/// `data_seed`. Pruned weights (`mask`) are zero after every step. Deterministic: the same inputs
/// give bit-identical results for any thread count, and resuming from any `on_epoch` state gives
/// the same end state as an uninterrupted run.
pub fn fit(
    model: &Model,
    mask: &Mask,
    data: &TrainData,
    cfg: &TrainConfig,
    data_seed: u64,
    mut state: TrainState,
    observer: &mut dyn Observer,
) -> Result<TrainState> {
    cfg.validate()?;
    mask.validate(&model.layout)?;
    let n = data.train.len();
    if n == 0 {
        return Err(Error::data("the training set is empty"));
    }
    let (per_epoch, epochs, total_steps) = cfg.plan(n);
    model.check_train_batch(cfg.batch_size.min(n), &format!("--batch-size {}", cfg.batch_size))?;
    if !n.is_multiple_of(cfg.batch_size) {
        let last = n % cfg.batch_size;
        model.check_train_batch(
            last,
            &format!("--batch-size {} on {n} images (the last batch has {last})", cfg.batch_size),
        )?;
    }
    let trained = model.layout.trainable_total();
    let mut bufs = GradBuffers::new(model);
    let mut batch = Batch::default();
    mask.apply(&mut state.params.data);
    while state.epochs_done < epochs {
        let epoch = state.epochs_done;
        let order = data::epoch_order(n, data_seed, epoch as u64);
        let mut aug = data.augment.then(|| seed::rng(data_seed, Stream::Augment, epoch as u64));
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = cfg.lr;
        // (steps of this epoch so far, the last step's loss), for a divergence found at its end.
        let mut last = (0usize, 0f32);
        // A state spawned inside an epoch (`spawn.rs`) has done this epoch's first steps:
        // their batches are skipped, their augmentation drawn and dropped so that the later
        // batches are augmented as in an uninterrupted run. At an epoch start this is 0.
        let done_here = state.steps_done.saturating_sub(epoch as u64 * per_epoch) as usize;
        for (i, idx) in order.chunks(cfg.batch_size).enumerate() {
            if state.steps_done >= total_steps {
                break;
            }
            if i < done_here {
                if let Some(r) = aug.as_mut() {
                    data::skip_augment(r, idx.len());
                }
                continue;
            }
            data::fill_batch(data.train, data.norm, idx, aug.as_mut(), &mut batch);
            observer.on_batch(epoch, i as u64, &mut batch);
            let (loss, c) = loss_and_grad(model, &state.params, &batch.x, &batch.labels, &mut bufs);
            if !loss.is_finite() {
                return Err(Error::Diverged {
                    epoch: epoch + 1,
                    step: i + 1,
                    loss,
                    checkpoint: None,
                });
            }
            lr = match cfg.iterations {
                Some(_) => cfg.schedule.lr(cfg.lr, state.steps_done, total_steps),
                None => cfg.schedule.lr(cfg.lr, epoch as u64, epochs as u64),
            };
            let first = state.steps_done == 0;
            // SGD and weight decay see the trained parameters only; the running statistics
            // after them move by the batch's statistics, as PyTorch's forward does.
            cfg.sgd.step(
                &mut state.params.data[..trained],
                &mut bufs.grad[..trained],
                &mut state.momentum[..trained],
                first,
                lr,
                mask,
            );
            model.update_running(&mut state.params.data, &bufs.batch_stats)?;
            last = (i + 1, loss);
            state.steps_done += 1;
            state.images_seen += idx.len() as u64;
            loss_sum += loss as f64 * idx.len() as f64;
            correct += c;
            seen += idx.len();
            observer.on_step(epoch, i as u64 + 1, per_epoch, loss);
        }
        // A finite loss can still come with an update that overflows the weights (a huge learning
        // rate). Within an epoch the next step's loss usually catches that (non-finite weights
        // usually make the logits non-finite, though a ReLU can hide a NaN); the weights are
        // checked here, at the epoch's end, before any checkpoint, Run or Ticket can hold them
        // (once an epoch: a pass over the weights every step is a visible share of a small MLP's
        // step).
        if !state.params.all_finite() {
            let (step, loss) = last;
            return Err(Error::Diverged { epoch: epoch + 1, step, loss, checkpoint: None });
        }
        // Checked on the epoch's mean, not per step, so that a run that blows up within an
        // epoch still reports its first non-finite loss or weights above.
        let train_loss = loss_sum / seen.max(1) as f64;
        if train_loss > DIVERGED_LOSS as f64 {
            let step = seen.div_ceil(cfg.batch_size).max(1);
            return Err(Error::Diverged {
                epoch: epoch + 1,
                step,
                loss: train_loss as f32,
                checkpoint: None,
            });
        }
        let last = state.epochs_done + 1 == epochs;
        let due = last || (cfg.eval_every > 0 && (epoch + 1).is_multiple_of(cfg.eval_every));
        let test = match data.test {
            Some(t) if due => Some(evaluate(model, &state.params, t, data.norm)),
            _ => None,
        };
        state.curve.push(EpochRecord {
            epoch: epoch + 1,
            steps: state.steps_done,
            images_seen: state.images_seen,
            lr,
            train_loss,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            test,
        });
        state.epochs_done += 1;
        observer.on_epoch(&state)?;
    }
    Ok(state)
}

/// How a run's parameters start: from a seed (PyTorch default init) or from given parameters and
/// mask (a ticket).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Start {
    /// Fresh initialisation from this seed, dense mask.
    Seed(u64),
    /// Given starting parameters and mask, identified by the provenance of where they came from.
    Given {
        /// Where they came from (e.g. a ticket's provenance).
        source: Provenance,
        /// Seed the source was initialised with, for the record.
        init_seed: u64,
    },
    /// A child spawned at step `step` of a parent run (`lmc train --spawn-step`, Frankle et al.
    /// 2020's instability analysis): it starts from the parent's parameters and running
    /// statistics after `step` steps, with a fresh momentum buffer, and trains the remaining
    /// steps of the schedule. Appended last, so the artifacts' earlier variants decode as before.
    Spawned {
        /// How the parent started.
        parent: Box<Start>,
        /// Provenance of the parent's run of its first `step` steps (`spawn::parent_request`).
        parent_run: Provenance,
        /// The step the child starts at.
        step: u64,
        /// The parent's data-order seed.
        parent_data_seed: u64,
        /// Training images the parent processed in those steps (included in the child's
        /// `images_seen`, which counts its whole trajectory).
        parent_images: u64,
    },
}

impl Start {
    /// The step training starts at (non-zero for a spawned child).
    pub fn step(&self) -> u64 {
        match self {
            Start::Spawned { step, .. } => *step,
            _ => 0,
        }
    }

    /// Images processed before this run's own first step (by a spawned child's parent).
    pub fn images_before(&self) -> u64 {
        match self {
            Start::Spawned { parent_images, .. } => *parent_images,
            _ => 0,
        }
    }
}

/// A trained network: the `Run` artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Architecture bound to its input.
    pub model: Model,
    /// Dataset name it was trained on.
    pub dataset: String,
    /// Provenance of that dataset (hash of its name for built-in data, the artifact's otherwise).
    pub dataset_provenance: Provenance,
    /// How parameters started.
    pub start: Start,
    /// Data-order / augmentation seed.
    pub data_seed: u64,
    /// Replicate index within its group.
    pub replicate: usize,
    /// Training settings.
    pub config: TrainConfig,
    /// Mask (dense unless trained from a ticket).
    pub mask: Mask,
    /// Final parameters.
    pub params: ParamVec,
    /// Per-epoch curve.
    pub curve: Vec<EpochRecord>,
    /// Training images processed.
    pub images_seen: u64,
    /// Wall-clock seconds of training (the one field that differs between identical runs).
    pub seconds: f64,
}

impl Artifact for Run {
    const KIND: Kind = Kind::Run;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        self.model.check()?;
        let layout = &self.model.layout;
        self.params.check_same_layout(layout, "parameters").map_err(|e| e.to_string())?;
        self.mask.validate(layout).map_err(|e| e.to_string())?;
        if !self.params.all_finite() {
            return Err("some parameters are not finite".into());
        }
        self.model.check_state(&self.params.data)?;
        Ok(())
    }
}

impl Run {
    /// Test accuracy after the last epoch (NaN when no test split was evaluated).
    pub fn final_test_accuracy(&self) -> f64 {
        self.curve.last().and_then(|r| r.test).map_or(f64::NAN, |e| e.accuracy)
    }
    /// Training loss of the last epoch.
    pub fn final_train_loss(&self) -> f64 {
        self.curve.last().map_or(f64::NAN, |r| r.train_loss)
    }
}

/// Training state saved next to an unfinished output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Provenance of the run this state belongs to; a checkpoint of other settings is ignored.
    pub run: Provenance,
    /// The state after the last completed epoch.
    pub state: TrainState,
}

impl Artifact for Checkpoint {
    const KIND: Kind = Kind::Checkpoint;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        self.state.check()
    }
}

impl TrainState {
    /// Errors unless the state holds together on its own: parameters as long as their layout,
    /// all finite, momentum as long as the parameters, one curve row per epoch done, counters
    /// that grow. What it must also match (the model, the planned total) is checked by
    /// [`TrainState::check_for`] where the plan is known.
    pub fn check(&self) -> std::result::Result<(), String> {
        self.params.check()?;
        if self.momentum.len() != self.params.len() {
            return Err(format!(
                "momentum has {} values for {} parameters",
                self.momentum.len(),
                self.params.len()
            ));
        }
        if !self.params.all_finite() || !self.momentum.iter().all(|m| m.is_finite()) {
            return Err("parameters or momentum are not finite".into());
        }
        if self.curve.len() != self.epochs_done {
            return Err(format!(
                "{} curve rows for {} epochs done",
                self.curve.len(),
                self.epochs_done
            ));
        }
        if self.images_seen < self.steps_done {
            return Err(format!("{} images seen in {} steps", self.images_seen, self.steps_done));
        }
        Ok(())
    }

    /// [`TrainState::check`], and that the state belongs to training `model` with `cfg` on `n`
    /// examples: the model's layout, at most the planned epochs and steps, and steps consistent
    /// with the epochs done.
    pub fn check_for(
        &self,
        model: &Model,
        cfg: &TrainConfig,
        n: usize,
    ) -> std::result::Result<(), String> {
        self.check()?;
        if self.params.layout != model.layout {
            return Err(format!("parameters are not those of model {}", model.spec));
        }
        model.check_state(&self.params.data)?;
        let (per_epoch, epochs, total) = cfg.plan(n);
        let most = (self.epochs_done as u64).saturating_mul(per_epoch).min(total);
        if self.epochs_done > epochs || self.steps_done != most {
            return Err(format!(
                "{} steps after {} epochs, but the plan is {per_epoch} steps per epoch, {total} in all over {epochs} epochs",
                self.steps_done, self.epochs_done
            ));
        }
        Ok(())
    }
}

/// Algorithm / payload version of training, hashed into every Run's provenance: bump it (in
/// [`stage::TRAIN_VERSION`], where every stage's version lives) when a change alters training's
/// results or the Run / Checkpoint payload; a change that keeps results bit-identical does not.
pub const VERSION: u32 = stage::TRAIN_VERSION;

/// Everything that identifies one replicate run.
pub struct RunRequest<'a> {
    /// Architecture.
    pub model: &'a Model,
    /// Data.
    pub dataset: &'a Dataset,
    /// Provenance of the dataset.
    pub dataset_provenance: Provenance,
    /// Starting parameters (already initialised or from a ticket).
    pub init: ParamVec,
    /// How they were obtained.
    pub start: Start,
    /// Mask.
    pub mask: Mask,
    /// Settings.
    pub config: TrainConfig,
    /// Data-order seed.
    pub data_seed: u64,
    /// Replicate index.
    pub replicate: usize,
    /// The training state to start from instead of `init` before the first step: a spawned
    /// child's (`spawn.rs`), whose `start` is [`Start::Spawned`] and so names where it came from.
    pub state: Option<TrainState>,
}

#[derive(Serialize)]
struct RunIdentity<'a> {
    model: &'a Model,
    start: &'a Start,
    config: &'a TrainConfig,
    data_seed: u64,
    augment: bool,
}

impl RunRequest<'_> {
    /// The provenance of the run this request produces.
    pub fn provenance(&self) -> Provenance {
        let augment = self.config.augment.unwrap_or(self.dataset.augment_default);
        let id = RunIdentity {
            model: self.model,
            start: &self.start,
            config: &self.config,
            data_seed: self.data_seed,
            augment,
        };
        let mask_hash = Provenance::of("mask", &self.mask.keep, &[]);
        stage::provenance("train", VERSION, &id, &[self.dataset_provenance, mask_hash])
    }
}

/// Path of the checkpoint kept next to `out` while it is being produced.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    crate::stage::checkpoint_path(out)
}

/// Writes the training checkpoint after each epoch (the first always, later ones at most once
/// a second) and forwards every callback to the caller's observer.
struct Checkpointer<'a> {
    stage: &'a mut Stage,
    inner: &'a mut dyn Observer,
}

impl Observer for Checkpointer<'_> {
    fn on_step(&mut self, e: usize, s: u64, n: u64, l: f32) {
        self.inner.on_step(e, s, n, l)
    }
    fn on_batch(&mut self, e: usize, s: u64, b: &mut Batch) {
        self.inner.on_batch(e, s, b)
    }
    fn on_epoch(&mut self, state: &TrainState) -> Result<()> {
        let run = self.stage.provenance();
        self.stage.save_checkpoint_throttled(state.epochs_done == 1, || Checkpoint {
            run,
            state: state.clone(),
        })?;
        self.inner.on_epoch(state)
    }
}

/// [`fit`] as a resumable stage: starts from the stage's checkpoint when it has the stage's
/// provenance (else from `init`, usually [`TrainState::start`]), keeps the checkpoint up to date while training, and on
/// divergence names the checkpoint left as the last good state. The caller writes the output
/// with [`Stage::finish`]. `lmc train` (through [`train_run`]) and every IMP round train here.
#[allow(clippy::too_many_arguments)]
pub fn fit_stage(
    stage: &mut Stage,
    model: &Model,
    mask: &Mask,
    data: &TrainData,
    cfg: &TrainConfig,
    data_seed: u64,
    init: TrainState,
    observer: &mut dyn Observer,
) -> Result<TrainState> {
    // A checkpoint that does not fit this run's model and plan is never trusted: training
    // starts over (the stage's provenance matching is not enough, the file may be re-sealed).
    let n = data.train.len();
    let state = match stage.resume_if::<Checkpoint>(|c| {
        c.run == stage.provenance() && c.state.check_for(model, cfg, n).is_ok()
    }) {
        Some(c) => c.state,
        None => init,
    };
    let mut cp = Checkpointer { stage: &mut *stage, inner: observer };
    match fit(model, mask, data, cfg, data_seed, state, &mut cp) {
        Err(Error::Diverged { epoch, step, loss, .. }) => {
            Err(Error::Diverged { epoch, step, loss, checkpoint: stage.kept_checkpoint() })
        }
        r => r,
    }
}

/// Trains one replicate, writing `out` atomically when done. With `out` given, a checkpoint
/// `out.ckpt` is kept while training, a killed run resumes from it, and an existing `out` with the
/// same provenance is returned as is (unless `fresh`).
pub fn train_run(
    req: &RunRequest,
    out: Option<&Path>,
    fresh: bool,
    observer: &mut dyn Observer,
) -> Result<(Run, Provenance, bool)> {
    let prov = req.provenance();
    let mut stage = Stage::new(out, prov, fresh);
    stage.prepare()?;
    if let Some(run) = stage.cached::<Run>() {
        return Ok((run, prov, true));
    }
    let started = Instant::now();
    let data = TrainData::of(req.dataset, &req.config);
    let state = fit_stage(
        &mut stage,
        req.model,
        &req.mask,
        &data,
        &req.config,
        req.data_seed,
        req.state.clone().unwrap_or_else(|| TrainState::start(req.init.clone())),
        observer,
    )?;
    let run = Run {
        model: req.model.clone(),
        dataset: req.dataset.name.clone(),
        dataset_provenance: req.dataset_provenance,
        start: req.start.clone(),
        data_seed: req.data_seed,
        replicate: req.replicate,
        config: req.config.clone(),
        mask: req.mask.clone(),
        params: state.params,
        curve: state.curve,
        images_seen: state.images_seen,
        seconds: started.elapsed().as_secs_f64(),
    };
    stage.finish(&run)?;
    Ok((run, prov, false))
}
