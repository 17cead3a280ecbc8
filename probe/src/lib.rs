//! `lmc-probe`: what the paper measures on trained networks.
//!
//! - [`interpolate`]: linear interpolation between runs, error and loss barriers (Frankle et al.
//!   2020), L2 distances, every pair of more than two runs with mean/std of the barriers.
//! - [`landscape`]: loss-landscape grids, in the authors' plane through 3-4 trained copies or along
//!   Li et al. (2018) filter-normalised random directions, 1-D or 2-D, resumable by row.
//! - [`hessian`]: Hessian-vector products by central differences of gradients, Hutchinson
//!   estimates of the trace and diagonal, top eigenvalues by power iteration with deflation, the
//!   exact diagonal of small models, and per-layer summaries.
//! - [`interop`]: safetensors export/import with PyTorch state-dict names.
//! - [`request`]: one request type per probe (its provenance, output paths, caching, the
//!   landscape's resume), which `lmc probe` fills from its flags.
//!
//! Every probe is plain vector arithmetic on [`ParamVec`]s plus the one evaluation function
//! ([`lmc_train::fit::evaluate`]) and the one gradient function ([`lmc_train::fit::loss_and_grad`]);
//! results are stored as a [`Probe`] artifact with CSV files next to it (see [`request`]).
//!
//! ```no_run
//! use lmc_probe::interpolate::{self, InterpConfig, Split};
//! use lmc_train::{artifact, data, fit::Run};
//! let a: Run = artifact::read(std::path::Path::new("runs/replicate-0.lmc")).unwrap().1;
//! let b: Run = artifact::read(std::path::Path::new("runs/replicate-1.lmc")).unwrap().1;
//! let ds = data::load(data::DatasetName::Digits, None).unwrap();
//! let cfg = InterpConfig { alphas: interpolate::alpha_grid(11).unwrap(), ..Default::default() };
//! let sets = [(Split::Test, &ds.test)];
//! let res = interpolate::interpolate(&[&a, &b], &sets, &ds.norm, &cfg, &ds.train).unwrap();
//! println!("error barrier {:.2} points", 100.0 * res.pairs[0].curves[0].error_barrier);
//! ```
#![deny(missing_docs)]

use std::path::Path;

use lmc_train::artifact::{self, Artifact, Header, Kind, Provenance};
use lmc_train::data::{ImageSet, ImageShape, Normalization};
use lmc_train::fit::{self, Eval, Run};
use lmc_train::model::Model;
use lmc_train::params::{Mask, ParamVec};
use lmc_train::seed::{self, Stream};
use lmc_train::{Error, Result};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub mod dataset_interop;
pub mod density;
pub mod hessian;
pub mod interop;
pub mod interpolate;
pub mod landscape;
pub mod request;
pub mod stats;

/// One input run of a probe, as recorded in the artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRef {
    /// Path it was read from (as given).
    pub path: String,
    /// Its artifact provenance.
    pub provenance: Provenance,
    /// Replicate index and data seed, for labelling.
    pub replicate: usize,
    /// Data-order seed.
    pub data_seed: u64,
    /// Sparsity of its mask (fraction of prunable weights removed).
    pub sparsity: f64,
}

impl RunRef {
    /// The record of `run`, read from `path` with header `header`.
    pub fn of(path: &Path, header: &Header, run: &Run) -> RunRef {
        RunRef {
            path: path.display().to_string(),
            provenance: header.provenance,
            replicate: run.replicate,
            data_seed: run.data_seed,
            sparsity: run.mask.sparsity(&run.model.layout),
        }
    }
}

/// The `Probe` artifact: what was probed, on which data, and the result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Architecture of the probed runs.
    pub model: String,
    /// Name of the data set evaluated on.
    pub dataset: String,
    /// The runs probed, in the order given.
    pub inputs: Vec<RunRef>,
    /// The measurement.
    pub result: ProbeResult,
    /// Wall-clock seconds the probe took (the one field that differs between identical probes).
    pub seconds: f64,
}

/// The three kinds of probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)] // one per artifact; boxing would only add indirection
pub enum ProbeResult {
    /// Linear interpolation and barriers.
    Interpolation(interpolate::Interpolation),
    /// A loss-landscape grid (possibly unfinished, in a checkpoint).
    Landscape(landscape::Landscape),
    /// Hessian estimates.
    Hessian(hessian::HessianReport),
}

impl ProbeResult {
    /// `interpolate`, `landscape` or `hessian`.
    pub fn name(&self) -> &'static str {
        match self {
            ProbeResult::Interpolation(_) => "interpolate",
            ProbeResult::Landscape(_) => "landscape",
            ProbeResult::Hessian(_) => "hessian",
        }
    }
}

impl Artifact for Probe {
    const KIND: Kind = Kind::Probe;
    /// Format 3 added `test_samples` to the interpolation settings.
    const MIN_FORMAT: u32 = 3;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        match &self.result {
            ProbeResult::Landscape(l) => {
                l.check()?;
                let n = self.inputs.len();
                if let Some(a) = l.anchors.iter().find(|a| a.run >= n) {
                    return Err(format!("an anchor of run {} of {n} runs", a.run));
                }
                Ok(())
            }
            // What printing a cached interpolation indexes: pairs of the probe's inputs, and
            // one point per alpha on every curve.
            ProbeResult::Interpolation(r) => {
                interpolate::check_alphas(&r.config.alphas).map_err(|e| e.to_string())?;
                let n = self.inputs.len();
                for p in &r.pairs {
                    if p.a >= p.b || p.b >= n {
                        return Err(format!("pair ({}, {}) of {n} runs", p.a, p.b));
                    }
                    if let Some(c) =
                        p.curves.iter().find(|c| c.points.len() != r.config.alphas.len())
                    {
                        return Err(format!(
                            "a curve of {} points for {} alphas",
                            c.points.len(),
                            r.config.alphas.len()
                        ));
                    }
                }
                Ok(())
            }
            ProbeResult::Hessian(h) => h.check(),
        }
    }
}

impl Probe {
    /// A JSON summary: the small, plottable parts (no per-parameter vectors).
    pub fn summary(&self) -> serde_json::Value {
        let result = match &self.result {
            ProbeResult::Interpolation(r) => serde_json::to_value(r),
            ProbeResult::Landscape(r) => serde_json::to_value(r),
            ProbeResult::Hessian(r) => serde_json::to_value(r.without_diagonal()),
        }
        .unwrap_or(serde_json::Value::Null);
        serde_json::json!({
            "probe": self.result.name(),
            "model": self.model,
            "dataset": self.dataset,
            "inputs": self.inputs,
            "seconds": self.seconds,
            "result": result,
        })
    }
}

/// JSON summary of an artifact of this crate's kind, for `lmc inspect`.
pub fn inspect_summary(
    path: &Path,
    header: &Header,
    payload: &[u8],
) -> lmc_train::Result<serde_json::Value> {
    let probe: Probe = artifact::decode(path, header, payload)?;
    Ok(probe.summary())
}

/// JSON summary of a landscape checkpoint, for `lmc inspect`: how far the grid got.
pub fn inspect_checkpoint_summary(
    path: &Path,
    header: &Header,
    payload: &[u8],
) -> lmc_train::Result<serde_json::Value> {
    let c: landscape::LandscapeCheckpoint = artifact::decode(path, header, payload)?;
    Ok(serde_json::json!({
        "rows_done": c.landscape.rows_done,
        "rows_total": c.landscape.rows_total,
        "seconds": c.seconds,
    }))
}

/// Checks that all runs share one architecture (spec, input shape, classes, layout) and one mask;
/// `names` label them in the error.
pub fn check_compatible(runs: &[&Run], names: &[String]) -> Result<()> {
    let Some(first) = runs.first() else {
        return Err(Error::setting("no runs given"));
    };
    for (r, name) in runs.iter().zip(names).skip(1) {
        if r.model != first.model {
            return Err(Error::incompatible(format!(
                "{name} is a {} on {}x{}x{} inputs with {} classes ({} parameters), but {} is a {} on {}x{}x{} inputs with {} classes ({} parameters): probes need runs of one architecture",
                r.model.spec,
                r.model.input.channels,
                r.model.input.height,
                r.model.input.width,
                r.model.classes,
                r.model.layout.total(),
                names[0],
                first.model.spec,
                first.model.input.channels,
                first.model.input.height,
                first.model.input.width,
                first.model.classes,
                first.model.layout.total()
            )));
        }
        if r.mask != first.mask {
            let differ = r.mask.keep.iter().zip(&first.mask.keep).filter(|(a, b)| a != b).count();
            return Err(Error::incompatible(format!(
                "{name} and {} have different masks ({differ} of {} entries differ; sparsity {:.2}% vs {:.2}%): probes need copies of one subnetwork",
                names[0],
                r.mask.keep.len(),
                100.0 * r.mask.sparsity(&r.model.layout),
                100.0 * first.mask.sparsity(&first.model.layout)
            )));
        }
    }
    for (r, name) in runs.iter().zip(names) {
        r.mask
            .validate(&r.model.layout)
            .map_err(|e| Error::incompatible(format!("{name}: {e}")))?;
        r.params.check_same_layout(&r.model.layout, name)?;
        if !r.params.all_finite() {
            return Err(Error::data(format!("{name}: parameters contain NaN or infinity")));
        }
    }
    Ok(())
}

/// Errors unless images of `set` fit `model` (shape) and its labels are below `model.classes`.
pub fn check_data(model: &Model, set: &ImageSet, what: &str) -> Result<()> {
    let ImageShape { channels, height, width } = set.shape;
    if set.shape != model.input {
        return Err(Error::incompatible(format!(
            "{what} has {channels}x{height}x{width} images but the model takes {}x{}x{}: pass the data set the runs were trained on (--dataset)",
            model.input.channels, model.input.height, model.input.width
        )));
    }
    if let Some(&l) = set.labels.iter().find(|&&l| l as usize >= model.classes) {
        return Err(Error::incompatible(format!(
            "{what} has label {l} but the model has {} classes",
            model.classes
        )));
    }
    if set.is_empty() {
        return Err(Error::data(format!("{what} is empty")));
    }
    Ok(())
}

/// Number of batch-norm layers whose running statistics the model keeps
/// ([`Model::running_statistics`]; none for MLPs and the ConvNet).
pub fn running_statistics(model: &Model) -> usize {
    model.running_statistics()
}

/// A fixed subsample of `n` images of `set`, drawn without replacement by `seed` (all of it when
/// `n` is `None` or at least the set's size). Indices are kept in increasing order.
pub fn subsample(set: &ImageSet, n: Option<usize>, seed: u64) -> ImageSet {
    let total = set.len();
    match n {
        Some(n) if n < total => {
            // Partial Fisher-Yates: the first n entries are a uniform sample without replacement.
            let mut rng = seed::rng(seed, Stream::Other, SUBSAMPLE_STREAM);
            let mut idx: Vec<usize> = (0..total).collect();
            for i in 0..n {
                let j = rng.gen_range(i..total);
                idx.swap(i, j);
            }
            idx.truncate(n);
            idx.sort_unstable();
            set.subset(&idx)
        }
        _ => set.clone(),
    }
}

/// Sub-stream index of [`seed::Stream::Other`] for data subsamples.
pub const SUBSAMPLE_STREAM: u64 = 0x5052_4f42_0001;
/// Sub-stream index base of [`seed::Stream::Other`] for random directions and probe vectors.
pub const DIRECTION_STREAM: u64 = 0x5052_4f42_1000;

/// `(1 - alpha) * a + alpha * b` element-wise, exact where `a` and `b` agree (so interpolating a
/// run with itself, or two zeros of a mask, gives the endpoint bit for bit) and at alpha 0 and 1;
/// the mask is applied afterwards so pruned weights are exactly zero.
pub fn lerp_masked(a: &ParamVec, b: &ParamVec, alpha: f64, mask: &Mask) -> Result<ParamVec> {
    a.check_same_layout(&b.layout, "interpolation")?;
    let t = alpha as f32;
    let data = a
        .data
        .iter()
        .zip(&b.data)
        .zip(&mask.keep)
        .map(|((&x, &y), &k)| {
            if !k {
                0.0
            } else if x == y {
                x
            } else {
                (1.0 - t) * x + t * y
            }
        })
        .collect();
    Ok(ParamVec { layout: a.layout.clone(), data })
}

/// How [`evaluate_points`] spreads work over threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Parallelism {
    /// Several points at once (rayon over points); each evaluation's ops still use the pool.
    Points,
    /// One point at a time; only the ops inside an evaluation are parallel.
    Ops,
}

impl Parallelism {
    /// The choice for `model`, which knows its own ([`Model::parallel_points`]): MLPs evaluate
    /// points side by side, ConvNets one point at a time with parallel ops.
    pub fn auto(model: &Model) -> Parallelism {
        if model.parallel_points() {
            Parallelism::Points
        } else {
            Parallelism::Ops
        }
    }
}

/// Evaluates `n` parameter vectors (`make(k)` builds the k-th) on `set` with the one evaluation
/// function, [`fit::evaluate`], in parallel as [`Parallelism::auto`] says. Results are in order
/// and do not depend on the thread count.
pub fn evaluate_points<F>(
    model: &Model,
    n: usize,
    make: F,
    set: &ImageSet,
    norm: &Normalization,
) -> Result<Vec<Eval>>
where
    F: Fn(usize) -> Result<ParamVec> + Sync,
{
    evaluate_points_with(Parallelism::auto(model), model, n, make, set, norm)
}

/// [`evaluate_points`] with a chosen [`Parallelism`].
pub fn evaluate_points_with<F>(
    par: Parallelism,
    model: &Model,
    n: usize,
    make: F,
    set: &ImageSet,
    norm: &Normalization,
) -> Result<Vec<Eval>>
where
    F: Fn(usize) -> Result<ParamVec> + Sync,
{
    let one = |k: usize| make(k).map(|p| fit::evaluate(model, &p, set, norm));
    match par {
        Parallelism::Points => (0..n).into_par_iter().map(one).collect(),
        Parallelism::Ops => (0..n).map(one).collect(),
    }
}
