//! The IMP loop: initialise -> train -> per round: prune, rewind, retrain. One Ticket artifact per
//! round in an output folder (`round-00.lmc` = dense), resumable by round (and by epoch inside a
//! round) after being killed.
//!
//! Round r (0..=rounds):
//! - mask: round 0 keeps everything (or the parent ticket's mask); round r >= 1 prunes the
//!   network trained in round r-1 with the [`PruneRule`];
//! - start: round 0 starts from theta0 (the seed's initialisation, or the parent ticket's
//!   parameters); round r >= 1 starts from the rewind point R (theta0, or theta_k = the round-0
//!   parameters after k SGD steps) for the weights and, unless everything is rewound, from the
//!   round r-1 trained values for biases and norm parameters (the authors' behaviour);
//! - the ticket of round r holds that start (R for round 0), the mask, and the trained network.
//!
//! Each round is two named steps, OpenLTH-style: "prune level r" (the mask and start above) and
//! "train level r" (training through [`fit::fit_stage`], the same resumable training as
//! `lmc train`, then the ticket). The ticket holds both steps' outputs, so an up-to-date ticket
//! skips both.

use std::path::{Path, PathBuf};
use std::time::Instant;

use lmc_train::artifact::Provenance;
use lmc_train::data::Dataset;
use lmc_train::fit::{self, Observer, TrainConfig, TrainData, TrainState};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::params::{Mask, ParamVec};
use lmc_train::stage::{self, Stage};
use lmc_train::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::rule::PruneRule;
use crate::ticket::{sparsity_of, DataRecord, Origin, Parent, Ticket};

/// What a rewind resets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Rewind {
    /// Conv and linear weights only; biases and norm parameters carry over from the last trained
    /// round (the authors' code).
    Weights,
    /// Every parameter.
    All,
}

/// Algorithm / payload version of pruning (IMP tickets and random baselines), hashed into every
/// ticket's provenance: bump it (in [`stage::PRUNE_VERSION`], where every stage's version lives)
/// when a change alters the tickets found or the Ticket payload; a change that keeps results
/// bit-identical does not.
pub const VERSION: u32 = stage::PRUNE_VERSION;

/// Everything that decides an IMP run, apart from the number of rounds (so that a longer run
/// reuses a shorter one's rounds). Part of each ticket's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImpConfig {
    /// Architecture.
    pub model: ModelSpec,
    /// Initialisation seed (also chooses the tie-breaking keys).
    pub seed: u64,
    /// Data-order / augmentation seed of every round's training.
    pub data_seed: u64,
    /// Inner training settings.
    pub train: TrainConfig,
    /// Which weights a round removes.
    pub rule: PruneRule,
    /// Rewind to the parameters after this many SGD steps of round 0 (0 = initialisation).
    pub rewind_step: u64,
    /// What a rewind resets.
    pub rewind: Rewind,
}

/// The previous ticket an IMP run continues from (`--from-ticket`).
pub struct FromTicket<'a> {
    /// The ticket.
    pub ticket: &'a Ticket,
    /// Its provenance.
    pub provenance: Provenance,
}

/// One IMP run: settings, inputs and where the tickets go.
pub struct Imp<'a> {
    /// Settings.
    pub config: ImpConfig,
    /// The architecture bound to the data's input shape.
    pub model: &'a Model,
    /// Training split = the data the search trains on (real or distilled); test split = the real
    /// test set every round is evaluated on.
    pub data: &'a Dataset,
    /// Provenance of `data`.
    pub data_provenance: Provenance,
    /// Start from this ticket's mask and parameters instead of a fresh dense network.
    pub from: Option<FromTicket<'a>>,
    /// Output folder.
    pub out_dir: &'a Path,
    /// Ignore existing tickets and checkpoints.
    pub fresh: bool,
}

/// What one round produced (the `--json` row).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number (0 = before pruning).
    pub round: usize,
    /// Fraction of prunable weights removed.
    pub sparsity: f64,
    /// Prunable weights kept.
    pub kept: usize,
    /// Test accuracy of the round's trained network.
    pub test_accuracy: f64,
    /// Training images processed by the search so far.
    pub images_processed: u64,
    /// Seconds this round took (when it was computed).
    pub seconds: f64,
    /// The ticket file.
    pub path: PathBuf,
    /// True when an up-to-date ticket was found and not recomputed.
    pub cached: bool,
}

/// Progress callbacks of an IMP run; the training-loop callbacks come through [`Observer`].
pub trait ImpObserver: Observer {
    /// Before a round's training (`total_steps` SGD steps).
    fn round_started(&mut self, _round: usize, _rounds: usize, _sparsity: f64, _total_steps: u64) {}
    /// After a round's ticket is written (or found up to date).
    fn round_finished(&mut self, _record: &RoundRecord) {}
}

/// An [`ImpObserver`] that does nothing.
pub struct SilentImp;
impl Observer for SilentImp {}
impl ImpObserver for SilentImp {}

/// The ticket file of round `r`.
pub fn round_path(out_dir: &Path, r: usize) -> PathBuf {
    out_dir.join(format!("round-{r:02}.lmc"))
}

/// The checkpoint kept while round `r` trains.
pub fn round_checkpoint_path(out_dir: &Path, r: usize) -> PathBuf {
    out_dir.join(format!("round-{r:02}.ckpt"))
}

/// Parameters a round starts from: the rewind point's weights (all of it with [`Rewind::All`]),
/// and otherwise `trained`'s other parameters.
pub fn rewind(point: &ParamVec, trained: &ParamVec, mode: Rewind) -> Result<ParamVec> {
    point.check_same_layout(&trained.layout, "rewind")?;
    Ok(match mode {
        Rewind::All => point.clone(),
        Rewind::Weights => {
            let mut p = trained.clone();
            for e in point.layout.entries.iter().filter(|e| e.prunable()) {
                p.data[e.range()].copy_from_slice(&point.data[e.range()]);
            }
            p
        }
    })
}

/// The parameters after the first `k` SGD steps of training `start` under `mask` with `cfg`
/// (bit-identical to the full run's, as the rate is constant before step k).
pub fn params_at_step(
    model: &Model,
    mask: &Mask,
    data: &Dataset,
    cfg: &TrainConfig,
    data_seed: u64,
    start: ParamVec,
    k: u64,
) -> Result<ParamVec> {
    if k == 0 {
        return Ok(start);
    }
    let prefix = cfg.prefix(data.train.len(), k, "--rewind-step")?;
    let td = TrainData { test: None, ..TrainData::of(data, cfg) };
    let state =
        fit::fit(model, mask, &td, &prefix, data_seed, TrainState::start(start), &mut fit::Silent)?;
    Ok(state.params)
}

#[derive(Serialize)]
struct RoundIdentity<'a> {
    config: &'a ImpConfig,
    round: usize,
    model: &'a Model,
}

/// What "prune level r" hands to "train level r".
struct Level {
    round: usize,
    /// The level's mask.
    mask: Mask,
    /// The parameters its training starts from.
    start: ParamVec,
}

/// The training-loop half of an [`ImpObserver`], every callback forwarded (`on_batch`
/// included, so an observer sees IMP's batches as it sees `lmc train`'s).
struct Training<'a>(&'a mut dyn ImpObserver);

impl Observer for Training<'_> {
    fn on_step(&mut self, e: usize, s: u64, n: u64, l: f32) {
        self.0.on_step(e, s, n, l)
    }
    fn on_batch(&mut self, e: usize, s: u64, b: &mut lmc_train::data::Batch) {
        self.0.on_batch(e, s, b)
    }
    fn on_epoch(&mut self, state: &TrainState) -> Result<()> {
        self.0.on_epoch(state)
    }
}

/// What every ticket of one IMP run records about where the search came from.
struct Lineage {
    init_seed: u64,
    found_with: DataRecord,
    parent: Option<Parent>,
    /// Images the parent search processed (0 without `--from-ticket`).
    images_before: u64,
}

impl Imp<'_> {
    /// Checks settings and inputs before any work.
    pub fn validate(&self) -> Result<()> {
        self.config.train.validate()?;
        self.config.rule.groups(&self.model.layout)?;
        if self.model.spec != self.config.model {
            return Err(Error::incompatible("IMP config and model disagree on the architecture"));
        }
        if self.model.input != self.data.train.shape || self.model.classes != self.data.classes {
            return Err(Error::incompatible(format!(
                "model {} does not fit the images of {}",
                self.model.spec, self.data.name
            )));
        }
        if let Some(f) = &self.from {
            if f.ticket.model != *self.model {
                return Err(Error::incompatible(format!(
                    "--from-ticket is for {} on {:?}, this run is {} on {:?}",
                    f.ticket.model.spec, f.ticket.model.input, self.model.spec, self.model.input
                )));
            }
        }
        if self.config.rewind_step > 0 {
            let (cfg, n) = (&self.config.train, self.data.train.len());
            cfg.prefix(n, self.config.rewind_step, "--rewind-step")?;
        }
        Ok(())
    }

    /// Provenance of the ticket of round `r`.
    pub fn round_provenance(&self, r: usize) -> Provenance {
        let id = RoundIdentity { config: &self.config, round: r, model: self.model };
        let mut inputs = vec![self.data_provenance];
        if let Some(f) = &self.from {
            inputs.push(f.provenance);
        }
        stage::provenance("prune", VERSION, &id, &inputs)
    }

    /// The stage that writes round `r`'s ticket (its checkpoint is `round-RR.ckpt`).
    fn level_stage(&self, r: usize) -> Stage {
        Stage::new(Some(&round_path(self.out_dir, r)), self.round_provenance(r), self.fresh)
            .with_checkpoint_path(round_checkpoint_path(self.out_dir, r))
    }

    /// Round `r`'s ticket when it is up to date (the step pair "prune level r", "train level r"
    /// is then skipped: both outputs, the mask and the trained network, are in it).
    fn cached_level(&self, stage: &Stage) -> Option<Ticket> {
        let path = stage.out()?;
        stage
            .cached_if::<Ticket>(|h, t| {
                h.provenance == stage.provenance()
                    && t.trained().is_some()
                    && t.validate(path).is_ok()
            })
            .map(|(_, t)| t)
    }

    /// Step "prune level r": the mask and starting parameters of round `r`. Level 0 keeps
    /// everything (or the parent ticket's mask) and starts from theta0; level r >= 1 prunes the
    /// network trained at level r-1 and rewinds to `point`.
    fn prune_level(
        &self,
        r: usize,
        prev: Option<&Ticket>,
        point: Option<&ParamVec>,
        theta0: &ParamVec,
        mask0: &Mask,
    ) -> Result<Level> {
        let cfg = &self.config;
        let (mask, start) = match (prev, point) {
            (Some(p), Some(point)) => {
                let trained = p.trained().expect("IMP tickets hold their trained network");
                (
                    cfg.rule.prune(trained, &p.mask, cfg.seed, r as u64)?,
                    rewind(point, trained, cfg.rewind)?,
                )
            }
            _ => (mask0.clone(), theta0.clone()),
        };
        Ok(Level { round: r, mask, start })
    }

    /// Step "train level r": trains the level through the one resumable training
    /// ([`fit::fit_stage`]: resumes from `round-RR.ckpt`, checkpoints every epoch at most once a
    /// second, forwards every training callback to `obs`) and writes its ticket. Level 0 also
    /// records the rewind point theta_k (the parameters after `rewind_step` steps of this
    /// training).
    fn train_level(
        &self,
        level: Level,
        stage: &mut Stage,
        prev: Option<&Ticket>,
        lineage: &Lineage,
        rounds: usize,
        obs: &mut dyn ImpObserver,
    ) -> Result<Ticket> {
        let cfg = &self.config;
        let started = Instant::now();
        let Level { round: r, mask, start } = level;
        let (sparsity, layers) = sparsity_of(self.model, &mask);
        let (_, _, total_steps) = cfg.train.plan(self.data.train.len());
        obs.round_started(r, rounds, sparsity, total_steps);
        let ticket_params = if r == 0 {
            params_at_step(
                self.model,
                &mask,
                self.data,
                &cfg.train,
                cfg.data_seed,
                start.clone(),
                cfg.rewind_step,
            )?
        } else {
            start.clone()
        };
        std::fs::create_dir_all(self.out_dir).map_err(|e| Error::io(self.out_dir, e))?;
        let data = TrainData::of(self.data, &cfg.train);
        let state = fit::fit_stage(
            stage,
            self.model,
            &mask,
            &data,
            &cfg.train,
            cfg.data_seed,
            TrainState::start(start),
            &mut Training(obs),
        )?;
        let images_processed =
            prev.map_or(lineage.images_before, |p| p.images_processed) + state.images_seen;
        let test_accuracy = state.curve.last().and_then(|c| c.test).map(|e| e.accuracy);
        let ticket = Ticket {
            model: self.model.clone(),
            init_seed: lineage.init_seed,
            rewind: ticket_params,
            rewind_step: cfg.rewind_step,
            mask,
            sparsity,
            layers,
            origin: Origin::Imp {
                round: r,
                config: cfg.clone(),
                parent: lineage.parent.clone(),
                trained: state.params,
                test_accuracy,
                curve: state.curve,
            },
            found_with: lineage.found_with.clone(),
            images_processed,
            seconds: started.elapsed().as_secs_f64(),
        };
        stage.finish(&ticket)?;
        Ok(ticket)
    }

    /// Runs (or resumes) rounds 0..=`rounds`, writing `round-RR.lmc` for each: per level, "prune
    /// level r" then "train level r", both skipped when the level's ticket is up to date.
    pub fn run(&self, rounds: usize, obs: &mut dyn ImpObserver) -> Result<Vec<RoundRecord>> {
        self.validate()?;
        let cfg = &self.config;
        let lineage = Lineage {
            init_seed: self.from.as_ref().map_or(cfg.seed, |f| f.ticket.init_seed),
            found_with: DataRecord {
                name: self.data.name.clone(),
                provenance: self.data_provenance,
                train_images: self.data.train.len(),
            },
            parent: self.from.as_ref().map(|f| Parent {
                provenance: f.provenance,
                found_with: f.ticket.found_with.clone(),
                sparsity: f.ticket.sparsity,
                images_processed: f.ticket.images_processed,
            }),
            images_before: self.from.as_ref().map_or(0, |f| f.ticket.images_processed),
        };
        let (theta0, mask0) = match &self.from {
            Some(f) => (f.ticket.rewind.clone(), f.ticket.mask.clone()),
            None => (self.model.init(cfg.seed), Mask::dense(&self.model.layout)),
        };
        let mut records = Vec::new();
        // The previous round's ticket and the rewind point R (round 0's ticket parameters).
        let mut prev: Option<Ticket> = None;
        let mut point: Option<ParamVec> = None;
        // The folder is locked for the whole run, so a second `prune` on it stops at once
        // instead of redoing (or interleaving) rounds. Every round's stage is prepared before
        // any work: its paths checked (a FIFO or a directory at a later round's path must not
        // cost the earlier rounds' training) and its output locked.
        let _lock = lmc_train::artifact::OutputLock::acquire(self.out_dir)?;
        let mut stages = (0..=rounds)
            .map(|r| {
                let mut st = self.level_stage(r);
                st.prepare()?;
                Ok(st)
            })
            .collect::<Result<Vec<Stage>>>()?;
        for (r, stage) in stages.iter_mut().enumerate() {
            let (ticket, cached) = match self.cached_level(stage) {
                Some(t) => (t, true),
                None => {
                    let level =
                        self.prune_level(r, prev.as_ref(), point.as_ref(), &theta0, &mask0)?;
                    let t = self.train_level(level, stage, prev.as_ref(), &lineage, rounds, obs)?;
                    (t, false)
                }
            };
            let rec = record(&ticket, stage.out().expect("IMP stages write tickets"), cached);
            obs.round_finished(&rec);
            records.push(rec);
            if r == 0 {
                point = Some(ticket.rewind.clone());
            }
            prev = Some(ticket);
        }
        Ok(records)
    }
}

fn record(t: &Ticket, path: &Path, cached: bool) -> RoundRecord {
    RoundRecord {
        round: t.round().unwrap_or(0),
        sparsity: t.sparsity,
        kept: t.layers.iter().map(|l| l.kept).sum(),
        test_accuracy: t.test_accuracy().unwrap_or(f64::NAN),
        images_processed: t.images_processed,
        seconds: t.seconds,
        path: path.to_path_buf(),
        cached,
    }
}
