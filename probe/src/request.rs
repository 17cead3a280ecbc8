//! Probe requests: what to measure on which runs and data, the identity of the result
//! (provenance), where it is written (the Probe artifact and its CSV files next to it), and running
//! it with caching, as `lmc_train::fit::RunRequest` and `train_run` do for training. The `lmc`
//! binary only turns flags into a request and prints the outcome; a library user runs and caches a
//! probe the same way:
//!
//! ```no_run
//! use lmc_probe::interpolate::{InterpConfig, Split};
//! use lmc_probe::request::{self, InterpolateRequest, ProbeInputs};
//! let inputs = ProbeInputs::read(&["a.lmc".into(), "b.lmc".into()]).unwrap();
//! let (ds, ds_prov) = request::load_data(&inputs, None, None).unwrap();
//! let req = InterpolateRequest {
//!     inputs: &inputs,
//!     dataset: &ds,
//!     dataset_provenance: ds_prov,
//!     splits: vec![Split::Test],
//!     config: InterpConfig::default(),
//! };
//! let done = req.run(None, false, &mut request::Silent).unwrap();
//! println!("{} (cached: {})", done.out.display(), done.cached);
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{self, Dataset, ImageSet};
use lmc_train::fit::Run;
use lmc_train::model::Model;
use lmc_train::params::Mask;
use lmc_train::stage::{self, Stage};
use lmc_train::{Error, Result};

use crate::hessian::{self, HessianConfig};
use crate::interpolate::{self, InterpConfig, Split};
use crate::landscape::{self, Landscape, LandscapeCheckpoint, LandscapeConfig, Method};
use crate::{check_compatible, subsample, Probe, ProbeResult, RunRef};

/// Progress of a running probe, for a progress bar; every method defaults to doing nothing.
pub trait Observer {
    /// `done` of `total` units of the current phase `what` are finished (units differ by probe:
    /// grid points, Hutchinson samples, Hessian-vector products).
    fn progress(&mut self, _what: &str, _done: usize, _total: usize) {}
    /// A landscape picked up `rows_done` of `rows_total` rows from the checkpoint `checkpoint`.
    fn resumed(&mut self, _checkpoint: &Path, _rows_done: usize, _rows_total: usize) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Runs read from disk, with what a Probe artifact records of each. Only [`ProbeInputs::read`]
/// makes one, so there is always at least one run and all share an architecture and a mask.
pub struct ProbeInputs {
    paths: Vec<PathBuf>,
    runs: Vec<Run>,
    refs: Vec<RunRef>,
}

impl ProbeInputs {
    /// Reads `paths` and checks that they are copies of one architecture and mask.
    pub fn read(paths: &[PathBuf]) -> Result<ProbeInputs> {
        let mut runs = Vec::new();
        let mut refs = Vec::new();
        for p in paths {
            let (h, r) = artifact::read::<Run>(p)?;
            refs.push(RunRef::of(p, &h, &r));
            runs.push(r);
        }
        let inputs = ProbeInputs { paths: paths.to_vec(), runs, refs };
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        check_compatible(&inputs.all(), &names)?;
        Ok(inputs)
    }
    /// The paths, as given.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }
    /// The runs, in the same order.
    pub fn runs(&self) -> &[Run] {
        &self.runs
    }
    /// Their records (path, provenance, replicate, sparsity).
    pub fn refs(&self) -> &[RunRef] {
        &self.refs
    }
    /// The runs by reference.
    pub fn all(&self) -> Vec<&Run> {
        self.runs.iter().collect()
    }
    /// The runs' artifact provenances, in order.
    pub fn provenances(&self) -> Vec<Provenance> {
        self.refs.iter().map(|r| r.provenance).collect()
    }
    /// The shared architecture.
    pub fn model(&self) -> &Model {
        &self.runs[0].model
    }
    /// The architecture as written on the command line, as the Probe artifact records it.
    fn model_name(&self) -> String {
        self.model().spec.to_string()
    }
    /// The first run's path (default outputs go next to it).
    fn first(&self) -> &Path {
        &self.paths[0]
    }
}

/// The data set to probe on: `dataset` (a name or a Dataset artifact, as `--dataset` takes), else
/// the one the first run was trained on, read from `data_dir` (see [`data::resolve_data_dir`]).
/// Errors name `--dataset` and say when the images do not fit the runs.
pub fn load_data(
    inputs: &ProbeInputs,
    dataset: Option<&str>,
    data_dir: Option<&Path>,
) -> Result<(Dataset, Provenance)> {
    let dir = data::resolve_data_dir(data_dir);
    let first = inputs.first();
    let m = inputs.model();
    let (ds, prov) = match dataset {
        Some(d) => data::resolve_dataset(d, Some(&dir))
            .map_err(|e| Error::setting(format!("--dataset: {e}")))?,
        None => {
            let name = &inputs.runs[0].dataset;
            data::resolve_dataset(name, Some(&dir)).map_err(|e| {
                Error::setting(format!(
                    "{} was trained on '{name}'; choose the data to probe on with --dataset: {e}",
                    first.display()
                ))
            })?
        }
    };
    if ds.train.shape != m.input || ds.classes != m.classes {
        return Err(Error::incompatible(format!(
            "--dataset {}: {}x{}x{} images in {} classes, but the runs take {}x{}x{} images in {} classes",
            ds.name,
            ds.train.shape.channels,
            ds.train.shape.height,
            ds.train.shape.width,
            ds.classes,
            m.input.channels,
            m.input.height,
            m.input.width,
            m.classes
        )));
    }
    Ok((ds, prov))
}

/// A finished (or reused) probe and where it lies.
#[derive(Debug)]
pub struct Outcome {
    /// The artifact's content.
    pub probe: Probe,
    /// Its provenance.
    pub provenance: Provenance,
    /// The Probe artifact.
    pub out: PathBuf,
    /// The CSV files written next to it.
    pub csv: Vec<PathBuf>,
    /// True when an up-to-date output was found and returned without recomputing.
    pub cached: bool,
}

/// The default output: `<folder of first>/<probe>-<short provenance>.lmc`.
fn default_out(first: &Path, probe: &str, prov: Provenance) -> PathBuf {
    let dir = first.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    dir.join(format!("{probe}-{}.lmc", prov.short()))
}

/// The split `split` of `ds`.
fn split_of(ds: &Dataset, split: Split) -> &ImageSet {
    match split {
        Split::Train => &ds.train,
        Split::Test => &ds.test,
    }
}

/// Runs `compute` unless `out` is up to date (same provenance, not `fresh`), then writes the CSV
/// files and, last, the artifact, so an output that exists has its CSVs. `compute` gets the stage
/// (for checkpoints) and returns the probe and the text of each path of `csv` in order.
/// A cached output must also be a `kind` probe of `runs` inputs, what the caller indexes it by:
/// its provenance says so for a file this build wrote, but a re-sealed one is recomputed.
#[allow(clippy::too_many_arguments)] // one stage's whole description, used in three places
fn run_stage(
    out: PathBuf,
    csv: Vec<PathBuf>,
    fresh: bool,
    prov: Provenance,
    kind: &str,
    runs: usize,
    compute: impl FnOnce(&mut Stage) -> Result<(Probe, Vec<String>)>,
) -> Result<Outcome> {
    let mut st = Stage::new(Some(&out), prov, fresh);
    st.prepare()?;
    for p in &csv {
        artifact::check_regular(p)?;
    }
    if let Some((_, probe)) = st.cached_if::<Probe>(|h, p| {
        h.provenance == prov && p.result.name() == kind && p.inputs.len() == runs
    }) {
        return Ok(Outcome { probe, provenance: prov, out, csv, cached: true });
    }
    let (probe, texts) = compute(&mut st)?;
    for (p, text) in csv.iter().zip(texts) {
        artifact::write_atomic(p, text.as_bytes())?;
    }
    st.finish(&probe)?;
    Ok(Outcome { probe, provenance: prov, out, csv, cached: false })
}

/// Linear interpolation between every pair of two or more runs (`lmc probe interpolate`).
pub struct InterpolateRequest<'a> {
    /// The runs (one architecture and mask).
    pub inputs: &'a ProbeInputs,
    /// Data evaluated on.
    pub dataset: &'a Dataset,
    /// Its provenance.
    pub dataset_provenance: Provenance,
    /// Splits evaluated at each alpha, in this order.
    pub splits: Vec<Split>,
    /// Settings; `train_samples` (`test_samples`) is ignored (taken as `None`) when no split is the
    /// training (test) one.
    pub config: InterpConfig,
}

impl InterpolateRequest<'_> {
    /// The settings as run: without a training (test) split, the training (test) subsample means
    /// nothing, so it does not enter the identity either.
    fn effective_config(&self) -> InterpConfig {
        let mut cfg = self.config.clone();
        if !self.splits.contains(&Split::Train) {
            cfg.train_samples = None;
        }
        if !self.splits.contains(&Split::Test) {
            cfg.test_samples = None;
        }
        cfg
    }
    /// The provenance of the result.
    pub fn provenance(&self) -> Provenance {
        let mut ids = self.inputs.provenances();
        ids.push(self.dataset_provenance);
        let cfg = (&self.effective_config(), &self.splits);
        stage::provenance("probe-interpolate", stage::INTERPOLATE_VERSION, &cfg, &ids)
    }
    /// `out`, else `<first run's folder>/interpolate-<short provenance>.lmc`.
    pub fn out_path(&self, out: Option<&Path>) -> PathBuf {
        match out {
            Some(o) => o.to_path_buf(),
            None => default_out(self.inputs.first(), "interpolate", self.provenance()),
        }
    }
    /// The CSV written next to `out`: one row per pair, split and alpha.
    pub fn csv_paths(out: &Path) -> Vec<PathBuf> {
        vec![out.with_extension("csv")]
    }
    /// Interpolates and writes `out` (default [`Self::out_path`]) and its CSV, or returns an
    /// up-to-date `out` as it is unless `fresh`.
    pub fn run(
        &self,
        out: Option<&Path>,
        fresh: bool,
        _observer: &mut dyn Observer,
    ) -> Result<Outcome> {
        let prov = self.provenance();
        let out = self.out_path(out);
        let csv = Self::csv_paths(&out);
        run_stage(out, csv, fresh, prov, "interpolate", self.inputs.runs.len(), |_| {
            let t = Instant::now();
            let cfg = self.effective_config();
            let ds = self.dataset;
            let train = subsample(&ds.train, cfg.train_samples, cfg.sample_seed);
            let test = subsample(&ds.test, cfg.test_samples, cfg.sample_seed);
            let sets: Vec<(Split, &ImageSet)> = self
                .splits
                .iter()
                .map(|&s| match s {
                    Split::Test => (s, &test),
                    Split::Train => (s, &train),
                })
                .collect();
            let r = interpolate::interpolate(&self.inputs.all(), &sets, &ds.norm, &cfg, &ds.train)?;
            let text = interpolate::csv(&r);
            let probe = Probe {
                model: self.inputs.model_name(),
                dataset: ds.name.clone(),
                inputs: self.inputs.refs.clone(),
                result: ProbeResult::Interpolation(r),
                seconds: t.elapsed().as_secs_f64(),
            };
            Ok((probe, vec![text]))
        })
    }
}

/// A loss-landscape grid (`lmc probe landscape`), resumable row by row.
pub struct LandscapeRequest<'a> {
    /// One run (random directions) or 2-4 (the plane).
    pub inputs: &'a ProbeInputs,
    /// Data evaluated on.
    pub dataset: &'a Dataset,
    /// Its provenance.
    pub dataset_provenance: Provenance,
    /// Settings.
    pub config: LandscapeConfig,
}

impl LandscapeRequest<'_> {
    /// Errors unless the number of runs fits the method and the grid is well formed.
    pub fn validate(&self) -> Result<()> {
        let n = self.inputs.runs.len();
        let two_d = self.config.y.is_some();
        match self.config.method {
            Method::Random if n != 1 => {
                return Err(Error::setting(format!(
                    "--method random explores around one run; {n} were given"
                )))
            }
            Method::Plane if !(if two_d { 3..=4 } else { 2..=4 }).contains(&n) => {
                return Err(Error::setting(format!(
                    "the plane through trained copies needs {} runs, got {n}",
                    if two_d { "3 or 4" } else { "2, 3 or 4 (--dims 1)" }
                )))
            }
            _ => {}
        }
        self.config.x.validate("--x-range")?;
        if let Some(y) = &self.config.y {
            y.validate("--y-range")?;
        }
        if self.config.samples == Some(0) {
            return Err(Error::setting("--samples must be at least 1"));
        }
        Ok(())
    }
    /// The provenance of the result (and of its checkpoint).
    pub fn provenance(&self) -> Provenance {
        let mut ids = self.inputs.provenances();
        ids.push(self.dataset_provenance);
        stage::provenance("probe-landscape", stage::LANDSCAPE_VERSION, &self.config, &ids)
    }
    /// `out`, else `<first run's folder>/landscape-<short provenance>.lmc`.
    pub fn out_path(&self, out: Option<&Path>) -> PathBuf {
        match out {
            Some(o) => o.to_path_buf(),
            None => default_out(self.inputs.first(), "landscape", self.provenance()),
        }
    }
    /// The CSV written next to `out`: one row per grid point.
    pub fn csv_paths(out: &Path) -> Vec<PathBuf> {
        vec![out.with_extension("csv")]
    }
    /// Evaluates the grid and writes `out` (default [`Self::out_path`]) and its CSV, or returns an
    /// up-to-date `out` as it is unless `fresh`. A [`LandscapeCheckpoint`] next to `out`
    /// ([`stage::checkpoint_path`]) holds the finished rows while it runs; a killed run with the
    /// same provenance resumes from it (unless `fresh`), and it is removed when the grid is done.
    pub fn run(
        &self,
        out: Option<&Path>,
        fresh: bool,
        observer: &mut dyn Observer,
    ) -> Result<Outcome> {
        self.validate()?;
        let prov = self.provenance();
        let out = self.out_path(out);
        let csv = Self::csv_paths(&out);
        let cfg = &self.config;
        run_stage(out, csv, fresh, prov, "landscape", self.inputs.runs.len(), |st| {
            let t = Instant::now();
            let inputs = self.inputs;
            let run0 = &inputs.runs[0];
            let params: Vec<_> = inputs.runs.iter().map(|r| &r.params).collect();
            let two_d = cfg.y.is_some();
            let frame = match cfg.method {
                Method::Plane => landscape::plane_frame(&params, two_d)?,
                Method::Random => {
                    landscape::random_frame(&run0.params, &run0.mask, two_d, cfg.direction_seed)
                }
            };
            let set = subsample(split_of(self.dataset, cfg.split), cfg.samples, cfg.sample_seed);
            let mut state = Landscape::start(cfg, &frame, &params, set.len());
            let mut seconds_before = 0.0;
            // Only a checkpoint of this very grid is adopted: its settings and point count
            // must be the command's (a file's grid never overrides the command's).
            if let Some(ck) = st.resume_if(|c: &LandscapeCheckpoint| {
                c.landscape.config == *cfg
                    && c.landscape.count == state.count
                    && c.landscape.rows_total == state.rows_total
            }) {
                if let Some(path) = st.checkpoint_path() {
                    observer.resumed(path, ck.landscape.rows_done, ck.landscape.rows_total);
                }
                seconds_before = ck.seconds;
                state = ck.landscape;
            }
            let points = |l: &Landscape| l.rows_done * cfg.x.points;
            let total = state.rows_total * cfg.x.points;
            observer.progress("", points(&state), total);
            let mut on_row = |l: &Landscape| -> Result<()> {
                observer.progress("", points(l), total);
                // Rows can take milliseconds: checkpoint at most once a second. Resuming from an
                // earlier row gives the same grid, only later.
                if !l.is_complete() {
                    st.save_checkpoint_throttled(false, || LandscapeCheckpoint {
                        landscape: l.clone(),
                        seconds: seconds_before + t.elapsed().as_secs_f64(),
                    })?;
                }
                Ok(())
            };
            let l = landscape::run_grid(
                &run0.model,
                &run0.mask,
                &frame,
                &set,
                &self.dataset.norm,
                state,
                &mut on_row,
            )?;
            let text = landscape::csv(&l);
            let probe = Probe {
                model: inputs.model_name(),
                dataset: self.dataset.name.clone(),
                inputs: inputs.refs.clone(),
                result: ProbeResult::Landscape(l),
                seconds: seconds_before + t.elapsed().as_secs_f64(),
            };
            Ok((probe, vec![text]))
        })
    }
}

/// Another run's mask to split the per-layer Hessian mass by (`--mask-from`).
pub struct MaskFrom {
    /// Where it was read.
    pub path: PathBuf,
    /// The mask.
    pub mask: Mask,
    /// That run's provenance (part of the probe's identity).
    pub provenance: Provenance,
}

impl MaskFrom {
    /// Reads the mask of the run at `path`, which must have the layout of `model`.
    pub fn read(path: &Path, model: &Model, probed: &Path) -> Result<MaskFrom> {
        let (h, other) = artifact::read::<Run>(path)?;
        if other.model.layout != model.layout {
            return Err(Error::incompatible(format!(
                "--mask-from {}: its architecture ({}) differs from {} ({})",
                path.display(),
                other.model.spec,
                probed.display(),
                model.spec
            )));
        }
        Ok(MaskFrom { path: path.to_path_buf(), mask: other.mask, provenance: h.provenance })
    }
}

/// Hessian estimates of one run's training loss (`lmc probe hessian`).
pub struct HessianRequest<'a> {
    /// The run (exactly one).
    pub inputs: &'a ProbeInputs,
    /// Data the loss is taken on.
    pub dataset: &'a Dataset,
    /// Its provenance.
    pub dataset_provenance: Provenance,
    /// The mask that splits the per-layer mass, when not the run's own.
    pub mask_from: Option<MaskFrom>,
    /// Settings (`chunk` as resolved by [`HessianRequest::chunk_or_default`]).
    pub config: HessianConfig,
}

impl HessianRequest<'_> {
    /// `chunk` if given, else the run's architecture's own choice ([`Model::probe_chunk`]).
    pub fn chunk_or_default(inputs: &ProbeInputs, chunk: Option<usize>) -> usize {
        chunk.unwrap_or_else(|| inputs.model().probe_chunk())
    }
    /// The provenance of the result.
    pub fn provenance(&self) -> Provenance {
        let mut ids = self.inputs.provenances();
        ids.push(self.dataset_provenance);
        ids.extend(self.mask_from.as_ref().map(|m| m.provenance));
        stage::provenance("probe-hessian", stage::HESSIAN_VERSION, &self.config, &ids)
    }
    /// `out`, else `<the run's folder>/hessian-<short provenance>.lmc`.
    pub fn out_path(&self, out: Option<&Path>) -> PathBuf {
        match out {
            Some(o) => o.to_path_buf(),
            None => default_out(self.inputs.first(), "hessian", self.provenance()),
        }
    }
    /// The CSVs written next to `out`: per-tensor summaries (`.csv`), the Hutchinson samples
    /// (`.samples.csv`) and, when asked for, the spectral density (`.density.csv`).
    pub fn csv_paths(&self, out: &Path) -> Vec<PathBuf> {
        let mut v = vec![out.with_extension("csv"), out.with_extension("samples.csv")];
        if self.config.density.is_some() {
            v.push(out.with_extension("density.csv"));
        }
        v
    }
    /// Probes and writes `out` (default [`Self::out_path`]) and its CSVs, or returns an up-to-date
    /// `out` as it is unless `fresh`.
    pub fn run(
        &self,
        out: Option<&Path>,
        fresh: bool,
        observer: &mut dyn Observer,
    ) -> Result<Outcome> {
        if self.inputs.runs.len() != 1 {
            return Err(Error::setting(format!(
                "a Hessian probe takes one run, got {}",
                self.inputs.runs.len()
            )));
        }
        self.config.validate()?;
        let prov = self.provenance();
        let out = self.out_path(out);
        let csv = self.csv_paths(&out);
        run_stage(out, csv, fresh, prov, "hessian", self.inputs.runs.len(), |_| {
            let t = Instant::now();
            let cfg = &self.config;
            let run = &self.inputs.runs[0];
            let (mask, mask_source) = match &self.mask_from {
                Some(m) => (&m.mask, m.path.display().to_string()),
                None => (&run.mask, "run".to_string()),
            };
            let set =
                subsample(split_of(self.dataset, cfg.split), Some(cfg.samples), cfg.sample_seed);
            let r = hessian::probe(
                &run.model,
                &run.params,
                &run.mask,
                (mask, &mask_source),
                &set,
                &self.dataset.norm,
                cfg,
                &mut |what, done, total| observer.progress(what, done, total),
            )?;
            let mut texts = vec![hessian::csv(&r), hessian::samples_csv(&r)];
            texts.extend(hessian::density_csv(&r));
            let probe = Probe {
                model: self.inputs.model_name(),
                dataset: self.dataset.name.clone(),
                inputs: self.inputs.refs.clone(),
                result: ProbeResult::Hessian(r),
                seconds: t.elapsed().as_secs_f64(),
            };
            Ok((probe, texts))
        })
    }
}
