//! The distillation loop: initialisation, matching steps, the synthetic pixels' SGD, checkpoints
//! and resume, and the `Dataset` artifact it ends with.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lmc_train::artifact::{Artifact, Header, Kind, Provenance};
use lmc_train::data::{self, Batch, Dataset, DatasetName, ImageSet, Pixels, SyntheticSet};
use lmc_train::fit::{self, TrainConfig, TrainData, TrainState};
use lmc_train::model::Model;
use lmc_train::optim::{Schedule, Sgd};
use lmc_train::params::{Layout, Mask, ParamKind, ParamVec};
use lmc_train::seed::{self, Stream};
use lmc_train::stage::{self, Stage};
use lmc_train::{Error, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{DistillConfig, Init, Method};
use crate::dm;
use crate::formation;
use crate::gm::{self, GmScratch};
use crate::problem::{sample_distinct, Problem};

/// Algorithm / payload version of distillation, hashed into every distilled set's provenance:
/// bump it (in [`stage::DISTILL_VERSION`], where every stage's version lives) when a change
/// alters the distilled pixels or the Dataset / DistillCheckpoint payload; a change that keeps
/// results bit-identical does not.
pub const VERSION: u32 = stage::DISTILL_VERSION;

/// Everything that identifies one distillation.
pub struct DistillRequest<'a> {
    /// The network architecture, bound to the data's image shape and classes.
    pub model: &'a Model,
    /// The data distilled (its training split; the test split is only used by evaluation).
    pub dataset: &'a Dataset,
    /// The real dataset it is (or summarises): decides DSA's flip and the output's test split.
    pub base: DatasetName,
    /// Provenance of `dataset`.
    pub dataset_provenance: Provenance,
    /// Settings.
    pub config: DistillConfig,
}

/// How a run is carried out (not part of its identity).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Ignore an up-to-date output and any checkpoint.
    pub fresh: bool,
    /// Write the checkpoint every this many iterations, at least once a minute, and when
    /// interrupted.
    pub checkpoint_every: u64,
    /// Time budget in seconds (resumed sessions count together): when an iteration ends past it,
    /// distillation stops there and the output is exactly what `iterations` = the iterations
    /// done would give (it is stored with that configuration and provenance).
    pub max_seconds: Option<f64>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions { fresh: false, checkpoint_every: 10, max_seconds: None }
    }
}

/// Progress reported to the caller's callback after every matching step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    /// Outer iteration (0-based) the step belongs to.
    pub iteration: u64,
    /// Matching steps completed in the whole run (DM: = iterations completed).
    pub done: u64,
    /// Matching steps of the whole run.
    pub total: u64,
    /// The matching loss of this step (DM: squared distance of mean embeddings; GM: summed
    /// gradient distance), before the update.
    pub loss: f64,
}

/// How the output was made, stored as JSON in [`SyntheticSet::recipe`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// `dm` or `gm`.
    pub method: String,
    /// The distillation network.
    pub model: String,
    /// The distilled dataset's name.
    pub source: String,
    /// Its provenance (hex).
    pub source_provenance: String,
    /// Every setting.
    pub config: DistillConfig,
    /// Outer iterations run.
    pub iterations: u64,
    /// Wall-clock seconds spent (summed over resumed sessions).
    pub seconds: f64,
    /// Images (real and decoded synthetic) passed through a network, net updates included.
    pub images_processed: u64,
    /// Mean matching loss of each outer iteration.
    pub loss_curve: Vec<f32>,
}

/// Result of [`distill`].
pub struct Outcome {
    /// The synthetic set (also written to `out`, when given).
    pub set: SyntheticSet,
    /// Its provenance.
    pub provenance: Provenance,
    /// How it was made.
    pub recipe: Recipe,
    /// True when an up-to-date output was found and returned without work.
    pub cached: bool,
    /// The iteration a checkpoint let this run start from (0 for a fresh start).
    pub resumed_from: u64,
}

/// Resumable state of a distillation, written next to the output as `OUT.ckpt` (its own artifact
/// kind, [`Kind::DistillCheckpoint`]): `state.params` holds the stored pixels (one entry
/// `images`), `state.momentum` their SGD momentum, `epochs_done` = `steps_done` the iterations
/// done, `images_seen` the images processed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillCheckpoint {
    /// Provenance of the output this state belongs to.
    pub run: Provenance,
    /// Pixels, momentum and counters (see above).
    pub state: TrainState,
    /// Pixel updates done (GM does several per iteration).
    pub updates: u64,
    /// Seconds spent so far.
    pub seconds: f64,
    /// Mean loss of each completed iteration.
    pub loss_curve: Vec<f32>,
}

impl Artifact for DistillCheckpoint {
    const KIND: Kind = Kind::DistillCheckpoint;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        let st = &self.state;
        st.params.check()?;
        if st.momentum.len() != st.params.len() {
            return Err(format!(
                "momentum has {} values for {} pixels",
                st.momentum.len(),
                st.params.len()
            ));
        }
        if !st.params.all_finite() || !st.momentum.iter().all(|m| m.is_finite()) {
            return Err("pixels or momentum are not finite".into());
        }
        if st.epochs_done as u64 != st.steps_done || self.loss_curve.len() as u64 != st.steps_done {
            return Err(format!(
                "{} iterations done but {} epochs and {} loss values recorded",
                st.steps_done,
                st.epochs_done,
                self.loss_curve.len()
            ));
        }
        if self.updates < st.steps_done {
            return Err(format!("{} pixel updates in {} iterations", self.updates, st.steps_done));
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct Identity<'a> {
    model: &'a lmc_train::model::ModelSpec,
    input: lmc_train::data::ImageShape,
    config: &'a DistillConfig,
}

impl DistillRequest<'_> {
    /// The output's provenance: stage, model, settings and the source data's provenance.
    pub fn provenance(&self) -> Provenance {
        let id =
            Identity { model: &self.model.spec, input: self.model.input, config: &self.config };
        stage::provenance("distill", VERSION, &id, &[self.dataset_provenance])
    }

    /// Checks the settings against the data (ipc vs class sizes, factor vs image size, ...).
    pub fn validate(&self) -> Result<()> {
        let train = &self.dataset.train;
        if self.model.input != train.shape || self.model.classes != self.dataset.classes {
            return Err(Error::incompatible(
                "distill: the model is bound to another input shape or class count than the data",
            ));
        }
        let mut counts = vec![0usize; self.dataset.classes];
        for &l in &train.labels {
            counts[l as usize] += 1;
        }
        let (c, &n) = counts
            .iter()
            .enumerate()
            .min_by_key(|(_, &n)| n)
            .ok_or_else(|| Error::data("the dataset has no classes"))?;
        let name = self.dataset.class_names.get(c).cloned().unwrap_or_else(|| c.to_string());
        self.config.validate(train.shape, (n, &name))?;
        // Matching runs the network in training mode on one class's images at a time: a batch
        // norm over 1x1 planes needs two of them, synthetic and real.
        let cfg = &self.config;
        let synthetic = cfg.ipc * cfg.factor * cfg.factor;
        self.model.check_train_batch(synthetic, &format!("--ipc {}", cfg.ipc))?;
        self.model
            .check_train_batch(cfg.batch_real.min(n), &format!("--batch-real {}", cfg.batch_real))
    }
}

/// Path of the checkpoint kept next to `out` while it is being produced.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    stage::checkpoint_path(out)
}

/// Path of the PNG grid written next to `out` (`syn.lmc` -> `syn.png`).
pub fn png_path(out: &Path) -> PathBuf {
    out.with_extension("png")
}

/// The stored images distillation starts from (class-major, normalised): `ipc` random real
/// images per class (with factor f, each stored image's f x f cells are f^2 real images shrunk by
/// box averaging), or N(0, 1) noise. Deterministic in the seed.
pub fn initial_images(p: &Problem, cfg: &DistillConfig) -> Vec<f32> {
    let shape = p.shape();
    let img = shape.len();
    let mut rng = seed::rng(cfg.seed, Stream::Init, 0);
    let n = p.classes() * cfg.ipc;
    match cfg.init {
        Init::Noise => {
            // Box-Muller, two normals per pair of uniforms.
            let mut v = Vec::with_capacity(n * img + 1);
            while v.len() < n * img {
                let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
                let r = (-2.0 * u1.ln()).sqrt();
                let t = 2.0 * std::f64::consts::PI * u2;
                v.push((r * t.cos()) as f32);
                v.push((r * t.sin()) as f32);
            }
            v.truncate(n * img);
            v
        }
        Init::Real => {
            let per = cfg.factor * cfg.factor;
            let mut out = Vec::with_capacity(n * img);
            let mut batch = Batch::default();
            for c in 0..p.classes() {
                let idx = sample_distinct(&p.by_class[c], cfg.ipc * per, &mut rng);
                data::fill_batch(p.train, p.norm, &idx, None, &mut batch);
                for k in 0..cfg.ipc {
                    out.extend(formation::encode_cells(
                        &batch.x[k * per * img..(k + 1) * per * img],
                        shape,
                        cfg.factor,
                    ));
                }
            }
            out
        }
    }
}

/// The synthetic set holding `pixels` (class-major) for `req`.
pub fn synthetic_set(req: &DistillRequest, pixels: Vec<f32>, recipe: &Recipe) -> SyntheticSet {
    let cfg = &req.config;
    let labels =
        (0..req.dataset.classes).flat_map(|c| std::iter::repeat_n(c as u8, cfg.ipc)).collect();
    let suffix = if cfg.factor > 1 { format!("-f{}", cfg.factor) } else { String::new() };
    SyntheticSet {
        name: format!("{}-{}-ipc{}{suffix}", req.base, cfg.method, cfg.ipc),
        base: req.base,
        images: ImageSet { shape: req.dataset.train.shape, pixels: Pixels::F32(pixels), labels },
        factor: cfg.factor,
        norm: req.dataset.norm.clone(),
        class_names: req.dataset.class_names.clone(),
        recipe: serde_json::to_string(recipe).expect("recipes serialise"),
    }
}

/// The recipe of `req` with the given counters.
fn recipe(
    req: &DistillRequest,
    iterations: u64,
    seconds: f64,
    images_processed: u64,
    loss_curve: Vec<f32>,
) -> Recipe {
    Recipe {
        method: req.config.method.to_string(),
        model: req.model.spec.to_string(),
        source: req.dataset.name.clone(),
        source_provenance: req.dataset_provenance.hex(),
        config: req.config.clone(),
        iterations,
        seconds,
        images_processed,
        loss_curve,
    }
}

/// Distils `req.dataset` into a synthetic set. With `out`, an existing output of the same
/// provenance is returned as is (unless `opts.fresh`), a checkpoint `out.ckpt` is written every
/// `opts.checkpoint_every` iterations and a killed run resumes from it, ending bit for bit where
/// an uninterrupted run ends; the artifact is written atomically at the end.
///
/// `progress` is called after every matching step; returning `ControlFlow::Break` stops the run
/// after writing a checkpoint (an error saying so is returned).
pub fn distill(
    req: &DistillRequest,
    out: Option<&Path>,
    opts: &RunOptions,
    progress: &mut dyn FnMut(Step) -> ControlFlow<()>,
) -> Result<Outcome> {
    req.validate()?;
    let cfg = &req.config;
    let prov = req.provenance();
    let mut stage = Stage::new(out, prov, opts.fresh);
    stage.prepare()?;
    // Up to date: the same request, or (with a time budget) the same request cut short at the
    // iterations its recipe records.
    let up_to_date = |h: &Header, set: &SyntheticSet| {
        let Ok(recipe) = serde_json::from_str::<Recipe>(&set.recipe) else { return false };
        let done = recipe.iterations;
        let as_done =
            DistillRequest { config: DistillConfig { iterations: done, ..cfg.clone() }, ..*req };
        let fits = done == cfg.iterations || (opts.max_seconds.is_some() && done < cfg.iterations);
        fits && h.provenance == as_done.provenance()
    };
    if let Some((h, set)) = stage.cached_if::<SyntheticSet>(up_to_date) {
        let recipe = serde_json::from_str::<Recipe>(&set.recipe).expect("checked by up_to_date");
        return Ok(Outcome {
            set,
            provenance: h.provenance,
            recipe,
            cached: true,
            resumed_from: 0,
        });
    }
    let p = Problem::new(req.model, &req.dataset.train, &req.dataset.norm, req.base, cfg);
    let shape = p.shape();
    let n_stored = p.classes() * cfg.ipc;

    let mut ck = DistillCheckpoint {
        run: prov,
        state: TrainState::start(pixel_vec(initial_images(&p, cfg), n_stored, shape)),
        updates: 0,
        seconds: 0.0,
        loss_curve: Vec::new(),
    };
    // A checkpoint of other settings, a damaged one, or one that does not fit this run (pixel
    // layout, iterations beyond the planned ones) is ignored: the run starts over.
    if let Some(c) = stage.resume_if(|c: &DistillCheckpoint| {
        c.run == prov
            && c.state.params.layout == ck.state.params.layout
            && c.state.steps_done <= cfg.iterations
    }) {
        ck = c;
    }
    let resumed_from = ck.state.steps_done;
    let ckpt_path = stage.checkpoint_path().map(Path::to_path_buf);
    let started = Instant::now();
    let seconds_before = ck.seconds;
    let mut save = |ck: &mut DistillCheckpoint| -> Result<()> {
        ck.seconds = seconds_before + started.elapsed().as_secs_f64();
        stage.save_checkpoint(ck)
    };

    let sgd = Sgd { momentum: cfg.momentum_img, weight_decay: 0.0, nesterov: false };
    let dense = Mask { keep: vec![true; ck.state.params.len()] };
    let mut grad = vec![0.0f32; ck.state.params.len()];
    let mut scratch = (cfg.method == Method::Gm).then(|| GmScratch::new(&p));
    let mixed = gm::MixedDerivative::resolve(cfg.mixed, req.model, cfg.fd_eps)?;
    let total = cfg.total_steps();
    let mut last_save = Instant::now();
    while ck.state.steps_done < cfg.iterations {
        let it = ck.state.steps_done;
        let mut rng = seed::rng(cfg.seed, Stream::Other, it);
        let mut losses = Vec::new();
        let mut stop = false;
        match cfg.method {
            Method::Dm => {
                let (loss, imgs) = dm::dm_step(&p, &mut rng, &ck.state.params.data, &mut grad);
                check_finite(loss, it, 0, &ckpt_path)?;
                update(&sgd, &mut ck, &mut grad, cfg.lr_img, &dense);
                ck.state.images_seen += imgs;
                losses.push(loss);
                stop |= progress(Step { iteration: it, done: it + 1, total, loss }).is_break();
            }
            Method::Gm => {
                let scratch = scratch.as_mut().expect("GM scratch");
                let mut net = TrainState::start(req.model.init(rng.gen()));
                for t in 0..cfg.inner_loop {
                    let (loss, imgs) = gm::gm_step(
                        &p,
                        cfg.distance,
                        mixed,
                        &net.params,
                        &mut rng,
                        &ck.state.params.data,
                        &mut grad,
                        scratch,
                    )?;
                    check_finite(loss, it, t, &ckpt_path)?;
                    update(&sgd, &mut ck, &mut grad, cfg.lr_img, &dense);
                    ck.state.images_seen += imgs;
                    losses.push(loss);
                    let done = it * cfg.inner_loop as u64 + t as u64 + 1;
                    stop |= progress(Step { iteration: it, done, total, loss }).is_break();
                    if t + 1 < cfg.inner_loop && cfg.net_steps > 0 {
                        let before = net.images_seen;
                        net = train_net(req, cfg, net, rng.gen())?;
                        ck.state.images_seen += net.images_seen - before;
                    }
                }
            }
        }
        ck.loss_curve.push((losses.iter().sum::<f64>() / losses.len() as f64) as f32);
        ck.state.steps_done += 1;
        ck.state.epochs_done += 1;
        let last = ck.state.steps_done == cfg.iterations;
        // Every `checkpoint_every` iterations, and at least once a minute (GM iterations are long).
        let due = ck.state.steps_done.is_multiple_of(opts.checkpoint_every.max(1))
            || last_save.elapsed().as_secs() >= 60;
        if stop || (!last && due) {
            save(&mut ck)?;
            last_save = Instant::now();
        }
        if stop && !last {
            let at = ckpt_path
                .as_ref()
                .map(|c| format!("; checkpoint at {}", c.display()))
                .unwrap_or_default();
            return Err(Error::interrupted(format!(
                "distillation interrupted after iteration {}{at}",
                ck.state.steps_done
            )));
        }
        if opts.max_seconds.is_some_and(|m| seconds_before + started.elapsed().as_secs_f64() >= m) {
            break;
        }
    }

    let seconds = seconds_before + started.elapsed().as_secs_f64();
    // Every iteration draws its randomness from (seed, iteration) alone, so a run cut short by the
    // time budget is the run that asked for the iterations it did: record it as that.
    let done_req = DistillRequest {
        config: DistillConfig { iterations: ck.state.steps_done, ..cfg.clone() },
        ..*req
    };
    let prov = done_req.provenance();
    let recipe =
        recipe(&done_req, ck.state.steps_done, seconds, ck.state.images_seen, ck.loss_curve);
    let set = synthetic_set(&done_req, ck.state.params.data, &recipe);
    stage.finish_as(&set, prov)?;
    Ok(Outcome { set, provenance: prov, recipe, cached: false, resumed_from })
}

/// The stored pixels as a one-entry parameter vector (so the checkpoint reads like a training one).
fn pixel_vec(pixels: Vec<f32>, n: usize, s: lmc_train::data::ImageShape) -> ParamVec {
    let layout = Layout::new([(
        "images".to_string(),
        vec![n, s.channels, s.height, s.width],
        ParamKind::Weight,
    )]);
    ParamVec { layout, data: pixels }
}

/// One SGD step on the pixels (PyTorch's rule, as the reference's `optimizer_img`).
fn update(sgd: &Sgd, ck: &mut DistillCheckpoint, grad: &mut [f32], lr: f64, dense: &Mask) {
    let first = ck.updates == 0;
    sgd.step(&mut ck.state.params.data, grad, &mut ck.state.momentum, first, lr, dense);
    ck.updates += 1;
}

fn check_finite(loss: f64, it: u64, step: usize, ckpt: &Option<PathBuf>) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    // Counted from 1, as the loss curve and training's epochs are.
    Err(Error::Diverged {
        epoch: it as usize + 1,
        step: step + 1,
        loss: loss as f32,
        checkpoint: ckpt.clone().filter(|c| c.exists()),
    })
}

/// GM's network update between inner steps: `net_steps` SGD steps on real data through the one
/// training loop (momentum 0.9 and weight decay 5e-4 as IDC; momentum carries over).
fn train_net(
    req: &DistillRequest,
    cfg: &DistillConfig,
    net: TrainState,
    data_seed: u64,
) -> Result<TrainState> {
    let tc = TrainConfig {
        epochs: 1,
        iterations: Some(net.steps_done + cfg.net_steps as u64),
        batch_size: cfg.net_batch,
        lr: cfg.net_lr,
        sgd: Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false },
        schedule: Schedule::Constant,
        augment: None,
        eval_every: 0,
    };
    let data = TrainData {
        train: &req.dataset.train,
        test: None,
        norm: &req.dataset.norm,
        augment: req.dataset.augment_default,
    };
    // Each call is a fresh "epoch 0" with its own data seed; steps_done keeps momentum going.
    let state = TrainState { epochs_done: 0, curve: Vec::new(), ..net };
    fit::fit(
        req.model,
        &Mask::dense(&req.model.layout),
        &data,
        &tc,
        data_seed,
        state,
        &mut fit::Silent,
    )
}
