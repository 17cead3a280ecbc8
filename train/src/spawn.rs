//! Children spawned at step k: Frankle et al. (2020), "Linear mode connectivity and the lottery
//! ticket hypothesis", section 3, "instability analysis". A parent trains from the starting
//! parameters for `k` steps with its own data order; each child starts from the parent's state
//! at step `k` and trains the rest of the schedule (steps `k..T`, the learning rate at each
//! global step as in the parent's schedule) with its own data order. Interpolating two children
//! measures whether SGD noise after step `k` still sends copies to different basins.
//!
//! What "the state at step k" is, is shared with IMP's rewinding (`lmc prune --rewind-step`):
//! both run [`TrainConfig::prefix`] from the same start with the same data seed, so the parent's
//! parameters equal IMP's rewind point bit for bit (a test checks it). As in OpenLTH, which
//! saves only the model's state at the rewind step, a child gets the parameters and batch-norm
//! running statistics but a fresh momentum buffer.
//!
//! The parent is an ordinary [`Run`] of the prefix configuration, written next to the children
//! and cached by its provenance: it is trained once, and every child, every rerun and every
//! other replicate count reuse it. A child's provenance names the parent's
//! ([`Start::Spawned`]), so a changed parent retrains the children.
//!
//! A child that starts inside an epoch skips that epoch's first `k mod steps-per-epoch` batches
//! of its own order (see `fit`); its `images_seen` and curve include the parent's, so a child
//! whose data seed is the parent's and whose momentum is 0 is the uninterrupted run, bit for bit.

use crate::artifact::Provenance;
use crate::fit::{Run, RunRequest, Start, TrainState};
use crate::Result;

/// The request for the parent of children spawned at step `k` of `req`'s training: the same
/// start, mask and model, [`TrainConfig::prefix`](crate::fit::TrainConfig::prefix) of its
/// configuration, data seed `parent_data_seed`. Errors (naming `--spawn-step`) unless `k` is
/// shorter than the training and comes before the first learning-rate milestone.
pub fn parent_request<'a>(
    req: &RunRequest<'a>,
    k: u64,
    parent_data_seed: u64,
) -> Result<RunRequest<'a>> {
    let config = req.config.prefix(req.dataset.train.len(), k, "--spawn-step")?;
    Ok(RunRequest {
        model: req.model,
        dataset: req.dataset,
        dataset_provenance: req.dataset_provenance,
        init: req.init.clone(),
        start: req.start.clone(),
        mask: req.mask.clone(),
        config,
        data_seed: parent_data_seed,
        replicate: 0,
        state: None,
    })
}

/// `req` (a replicate's request: its configuration, data seed and replicate index) turned into
/// a child of `parent` (the finished run of [`parent_request`], with provenance `parent_run`):
/// it starts from the parent's end state with a fresh momentum buffer, at the parent's step
/// count, with the parent's complete epochs in its curve.
pub fn child_request<'a>(
    req: &RunRequest<'a>,
    parent: &Run,
    parent_run: Provenance,
) -> RunRequest<'a> {
    let n = req.dataset.train.len();
    let (per_epoch, _, _) = req.config.plan(n);
    let step = parent.curve.last().map_or(0, |r| r.steps);
    let epochs_done = (step / per_epoch.max(1)) as usize;
    let mut state = TrainState::start(parent.params.clone());
    state.steps_done = step;
    state.epochs_done = epochs_done;
    state.images_seen = parent.images_seen;
    state.curve = parent.curve.iter().take(epochs_done).cloned().collect();
    RunRequest {
        model: req.model,
        dataset: req.dataset,
        dataset_provenance: req.dataset_provenance,
        init: parent.params.clone(),
        start: Start::Spawned {
            parent: Box::new(req.start.clone()),
            parent_run,
            step,
            parent_data_seed: parent.data_seed,
            parent_images: parent.images_seen,
        },
        mask: req.mask.clone(),
        config: req.config.clone(),
        data_seed: req.data_seed,
        replicate: req.replicate,
        state: Some(state),
    }
}
