//! `lmc probe interpolate | landscape | hessian`: measurements on trained runs. Each writes a
//! Probe artifact and a CSV, reuses an up-to-date output (same provenance) unless --fresh, and
//! prints a table or, with --json, one JSON object.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmc_probe::hessian::{self, HessianConfig, HutchinsonConfig};
use lmc_probe::interpolate::{self, InterpConfig, Split};
use lmc_probe::landscape::{self, Axis, Landscape, LandscapeConfig, Method};
use lmc_probe::{Probe, ProbeResult, RunRef};
use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{self, Dataset};
use lmc_train::fit::{checkpoint_path, Run};
use lmc_train::model::Model;
use serde_json::json;

use crate::progress::interactive;

/// Arguments of `lmc probe`.
#[derive(Args)]
pub struct ProbeArgs {
    #[command(subcommand)]
    command: ProbeCommand,
}

#[derive(Subcommand)]
enum ProbeCommand {
    /// Linear interpolation between runs: loss and error along the path, error and loss barriers
    /// (max along the path minus the mean of the endpoints), L2 distance; every pair of 3+ runs.
    Interpolate(InterpolateArgs),
    /// Loss landscape on a 1-D or 2-D grid: the plane through 3-4 trained copies, or Li et al.'s
    /// filter-normalised random directions around one run. Resumable by row.
    Landscape(LandscapeArgs),
    /// Hessian of the training loss: Hutchinson trace and diagonal, top eigenvalues, exact
    /// diagonal (small models), per-layer summaries.
    Hessian(HessianArgs),
}

/// Options every probe shares.
#[derive(Args)]
struct Common {
    /// Data to evaluate on: digits, mnist, fashion-mnist, cifar10, or a Dataset artifact
    /// [default: the dataset the first run was trained on]
    #[arg(long, value_name = "NAME|FILE")]
    dataset: Option<String>,
    /// Folder laid out like shared/data [default: $LMC_DATA_DIR, then ./data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Output Probe artifact; the CSV goes next to it with extension .csv
    /// [default: <first run's folder>/<probe>-<provenance>.lmc]
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Recompute even when an up-to-date output exists (and ignore a landscape checkpoint).
    #[arg(long)]
    fresh: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    Test,
    Train,
    Both,
}

#[derive(Args)]
struct InterpolateArgs {
    /// Run artifacts (two or more) of one architecture and mask.
    #[arg(required = true, num_args = 2.., value_name = "RUN")]
    runs: Vec<PathBuf>,
    /// Points on the path, evenly spaced from alpha 0 to 1 inclusive (authors 11, Frankle 30).
    #[arg(long, default_value_t = 11, value_name = "N")]
    alphas: usize,
    /// Split(s) evaluated at each alpha.
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    /// Evaluate the train split on a fixed random subsample of N images [default: all].
    #[arg(long, value_name = "N")]
    train_samples: Option<usize>,
    /// Seed of that subsample.
    #[arg(long, default_value_t = 0)]
    sample_seed: u64,
    /// Re-estimate running normalisation statistics on training data after interpolating.
    /// No current architecture keeps any (instance norm uses per-image statistics), so this
    /// changes nothing today and says so.
    #[arg(long)]
    reestimate_norm: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// The plane through 3-4 trained runs (2 for a 1-D line).
    Plane,
    /// Li et al. filter-normalised random directions around one run.
    Random,
}

#[derive(Clone, Copy, ValueEnum)]
enum EvalSplit {
    Train,
    Test,
}

impl From<EvalSplit> for Split {
    fn from(s: EvalSplit) -> Split {
        match s {
            EvalSplit::Train => Split::Train,
            EvalSplit::Test => Split::Test,
        }
    }
}

#[derive(Args)]
struct LandscapeArgs {
    /// Run artifacts: one (random directions) or 3-4 (the plane; 2 suffice for --dims 1).
    #[arg(required = true, num_args = 1..=4, value_name = "RUN")]
    runs: Vec<PathBuf>,
    /// Directions [default: random for one run, plane for several].
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// 1 (a line along the first direction) or 2 (a plane).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=2))]
    dims: u8,
    /// Range of x as MIN:MAX [default: -2:2 for the plane, -1:1 for random directions].
    #[arg(long, value_name = "MIN:MAX", allow_hyphen_values = true)]
    x_range: Option<String>,
    /// Range of y as MIN:MAX [default: as x].
    #[arg(long, value_name = "MIN:MAX", allow_hyphen_values = true)]
    y_range: Option<String>,
    /// Points per axis (Li et al. use 51).
    #[arg(long, default_value_t = 21, value_name = "N")]
    resolution: usize,
    /// Split evaluated at each point.
    #[arg(long, value_enum, default_value = "train")]
    split: EvalSplit,
    /// Evaluate each point on a fixed random subsample of N images [default: the whole split].
    #[arg(long, value_name = "N")]
    samples: Option<usize>,
    /// Seed of that subsample.
    #[arg(long, default_value_t = 0)]
    sample_seed: u64,
    /// Seed of the random directions.
    #[arg(long, default_value_t = 0)]
    direction_seed: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct HessianArgs {
    /// The Run artifact.
    #[arg(value_name = "RUN")]
    run: PathBuf,
    /// Images in the loss: a fixed random subsample of the split (PyHessian advises ~4096; the
    /// authors' exact diagonal used one batch of 64).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    samples: usize,
    /// Seed of that subsample.
    #[arg(long, default_value_t = 0)]
    sample_seed: u64,
    /// Split the loss is taken on.
    #[arg(long, value_enum, default_value = "train")]
    split: EvalSplit,
    /// Images per gradient call (memory only) [default: 2048 for MLPs, 128 for ConvNets].
    #[arg(long, value_name = "N")]
    chunk: Option<usize>,
    /// Finite-difference step: the perturbation eps*v has length EPS_REL * ||theta||. `auto`
    /// walks down 1e-2, 3.2e-3, 1e-3, ... and takes the first step where v.Hv stops changing
    /// (smooth models stop near 3e-3, trained ReLU networks near 1e-5).
    #[arg(long, default_value = "auto", value_name = "EPS_REL|auto")]
    eps_rel: String,
    /// Hutchinson estimates of the trace and diagonal (the default when nothing else is asked).
    #[arg(long)]
    trace: bool,
    /// Hutchinson sample cap.
    #[arg(long, default_value_t = 100, value_name = "N")]
    max_samples: usize,
    /// Hutchinson: never stop before this many samples.
    #[arg(long, default_value_t = 10, value_name = "N")]
    min_samples: usize,
    /// Hutchinson: stop when standard error / |trace| < TOL (0 = always draw --max-samples).
    #[arg(long, default_value_t = 1e-2)]
    tol: f64,
    /// Top eigenvalues by power iteration with deflation.
    #[arg(long, default_value_t = 0, value_name = "K")]
    top_k: usize,
    /// Power-iteration cap per eigenvalue.
    #[arg(long, default_value_t = 100, value_name = "N")]
    power_iters: usize,
    /// Power iteration stops when the eigenvalue changes by less than this, relatively.
    #[arg(long, default_value_t = 1e-4)]
    power_tol: f64,
    /// Exact diagonal, one Hessian-vector product per parameter (refused above 10,000 parameters).
    #[arg(long)]
    exact_diag: bool,
    /// Probe only the subnetwork: vectors restricted to the weights the run's mask keeps.
    #[arg(long)]
    subnetwork: bool,
    /// Split the per-layer diagonal mass by this run's mask instead of the probed run's (e.g. a
    /// dense run's Hessian against a ticket's mask).
    #[arg(long, value_name = "RUN")]
    mask_from: Option<PathBuf>,
    /// Seed of the Rademacher and power-iteration vectors.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    match a.command {
        ProbeCommand::Interpolate(a) => run_interpolate(a),
        ProbeCommand::Landscape(a) => run_landscape(a),
        ProbeCommand::Hessian(a) => run_hessian(a),
    }
}

/// Runs read from disk with their headers.
struct Inputs {
    paths: Vec<PathBuf>,
    runs: Vec<Run>,
    refs: Vec<RunRef>,
}

impl Inputs {
    fn read(paths: &[PathBuf]) -> Result<Inputs> {
        let mut runs = Vec::new();
        let mut refs = Vec::new();
        for p in paths {
            let (h, r) = artifact::read::<Run>(p)?;
            refs.push(RunRef::of(p, &h, &r));
            runs.push(r);
        }
        let inputs = Inputs { paths: paths.to_vec(), runs, refs };
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        lmc_probe::check_compatible(&inputs.all(), &names)?;
        Ok(inputs)
    }
    fn all(&self) -> Vec<&Run> {
        self.runs.iter().collect()
    }
    fn provenances(&self) -> Vec<Provenance> {
        self.refs.iter().map(|r| r.provenance).collect()
    }
    fn model(&self) -> String {
        self.runs[0].model.spec.to_string()
    }
}

/// The data set to evaluate on: `--dataset`, else the first run's.
fn load_data(c: &Common, inputs: &Inputs) -> Result<(Dataset, Provenance)> {
    let dir = data::resolve_data_dir(c.data_dir.as_deref());
    let (name, flag) = match &c.dataset {
        Some(d) => (d.clone(), true),
        None => (inputs.runs[0].dataset.clone(), false),
    };
    let loaded = data::resolve_dataset(&name, Some(&dir));
    let (ds, prov) = if flag {
        loaded.context("--dataset")?
    } else {
        loaded.with_context(|| {
            format!(
                "{} was trained on '{name}'; choose the data to probe on with --dataset",
                inputs.paths[0].display()
            )
        })?
    };
    let m = &inputs.runs[0].model;
    if ds.train.shape != m.input || ds.classes != m.classes {
        bail!(
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
        );
    }
    Ok((ds, prov))
}

/// The output path: `--out`, else `<first run's folder>/<probe>-<short provenance>.lmc`.
fn out_path(c: &Common, first: &Path, probe: &str, prov: Provenance) -> PathBuf {
    c.out.clone().unwrap_or_else(|| {
        let dir = first.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dir.join(format!("{probe}-{}.lmc", prov.short()))
    })
}

fn csv_path(out: &Path, suffix: &str) -> PathBuf {
    out.with_extension(suffix)
}

/// An existing output with the same provenance, unless --fresh.
fn cached(c: &Common, out: &Path, prov: Provenance) -> Option<Probe> {
    if c.fresh || !out.exists() {
        return None;
    }
    match artifact::read::<Probe>(out) {
        Ok((h, p)) if h.provenance == prov => Some(p),
        _ => None,
    }
}

/// Writes the artifact and its CSV files.
fn save(out: &Path, probe: &Probe, prov: Provenance, csvs: &[(PathBuf, String)]) -> Result<()> {
    for (p, text) in csvs {
        artifact::write_atomic(p, text.as_bytes())?;
    }
    artifact::write(out, probe, prov)?;
    Ok(())
}

fn bar(len: u64, what: &str) -> ProgressBar {
    if !interactive() {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    b.set_prefix(what.to_string());
    b
}

fn emit(
    json: bool,
    out: &Path,
    csvs: &[PathBuf],
    prov: Provenance,
    cached: bool,
    probe: &Probe,
    human: impl FnOnce(),
) {
    if json {
        let v = json!({
            "command": format!("probe {}", probe.result.name()),
            "out": out,
            "csv": csvs,
            "provenance": prov.hex(),
            "cached": cached,
            "seconds": probe.seconds,
            "summary": probe.summary(),
        });
        println!("{v}");
    } else {
        human();
        println!(
            "{} -> {} and {}",
            if cached {
                format!("up to date (computed in {:.1} s), not recomputed", probe.seconds)
            } else {
                format!("{:.1} s", probe.seconds)
            },
            out.display(),
            csvs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
}

fn run_interpolate(a: InterpolateArgs) -> Result<()> {
    let alphas = interpolate::alpha_grid(a.alphas)?;
    let inputs = Inputs::read(&a.runs)?;
    let (ds, ds_prov) = load_data(&a.common, &inputs)?;
    let splits: Vec<Split> = match a.split {
        SplitArg::Test => vec![Split::Test],
        SplitArg::Train => vec![Split::Train],
        SplitArg::Both => vec![Split::Test, Split::Train],
    };
    let has_train = splits.contains(&Split::Train);
    let cfg = InterpConfig {
        alphas,
        train_samples: if has_train { a.train_samples } else { None },
        sample_seed: a.sample_seed,
        reestimate_norm: a.reestimate_norm,
    };
    let mut ids = inputs.provenances();
    ids.push(ds_prov);
    let prov = Provenance::of("probe-interpolate", &(&cfg, &splits), &ids);
    let out = out_path(&a.common, &inputs.paths[0], "interpolate", prov);
    let csv = csv_path(&out, "csv");
    let (probe, was_cached) = match cached(&a.common, &out, prov) {
        Some(p) => (p, true),
        None => {
            if a.reestimate_norm && lmc_probe::running_statistics(&inputs.runs[0].model) == 0 {
                eprintln!("note: {} keeps no running normalisation statistics; --reestimate-norm has nothing to re-estimate", inputs.model());
            }
            let t = Instant::now();
            let train = lmc_probe::subsample(&ds.train, cfg.train_samples, cfg.sample_seed);
            let sets: Vec<(Split, &data::ImageSet)> = splits
                .iter()
                .map(|s| match s {
                    Split::Test => (*s, &ds.test),
                    Split::Train => (*s, &train),
                })
                .collect();
            let r = interpolate::interpolate(&inputs.all(), &sets, &ds.norm, &cfg)?;
            let probe = Probe {
                model: inputs.model(),
                dataset: ds.name.clone(),
                inputs: inputs.refs.clone(),
                result: ProbeResult::Interpolation(r),
                seconds: t.elapsed().as_secs_f64(),
            };
            let ProbeResult::Interpolation(r) = &probe.result else { unreachable!() };
            save(&out, &probe, prov, &[(csv.clone(), interpolate::csv(r))])?;
            (probe, false)
        }
    };
    let ProbeResult::Interpolation(r) = &probe.result else {
        bail!("{}: not an interpolation probe", out.display())
    };
    emit(a.common.json, &out, std::slice::from_ref(&csv), prov, was_cached, &probe, || {
        for p in &r.pairs {
            println!(
                "{} <-> {}: L2 distance {:.4}",
                inputs.paths[p.a].display(),
                inputs.paths[p.b].display(),
                p.l2_distance
            );
            for c in &p.curves {
                let (e0, e1) = (c.points[0].error, c.points[c.points.len() - 1].error);
                println!(
                    "  {:5} ({} images): error barrier {:.2} points (peak at alpha {:.3}), loss barrier {:.4} (alpha {:.3}); endpoint errors {:.2}% / {:.2}%",
                    c.split.to_string(),
                    c.count,
                    100.0 * c.error_barrier,
                    c.error_barrier_alpha,
                    c.loss_barrier,
                    c.loss_barrier_alpha,
                    100.0 * e0,
                    100.0 * e1
                );
            }
        }
        if r.pairs.len() > 1 {
            for s in &r.summary {
                println!(
                    "over {} pairs, {}: error barrier {:.2} +- {:.2} points, loss barrier {:.4} +- {:.4} (mean +- sample std)",
                    s.error_barrier.n,
                    s.split,
                    100.0 * s.error_barrier.mean,
                    100.0 * s.error_barrier.std,
                    s.loss_barrier.mean,
                    s.loss_barrier.std
                );
            }
        }
    });
    Ok(())
}

fn parse_range(s: Option<&str>, default: (f64, f64), flag: &str) -> Result<(f64, f64)> {
    let Some(s) = s else { return Ok(default) };
    let parsed = s
        .split_once(':')
        .and_then(|(a, b)| Some((a.trim().parse::<f64>().ok()?, b.trim().parse::<f64>().ok()?)));
    match parsed {
        Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo < hi => Ok((lo, hi)),
        _ => bail!("{flag} {s}: expected MIN:MAX with MIN < MAX, e.g. -1:1"),
    }
}

fn run_landscape(a: LandscapeArgs) -> Result<()> {
    let n = a.runs.len();
    let two_d = a.dims == 2;
    let method = match (a.method, n) {
        (Some(MethodArg::Plane), _) => Method::Plane,
        (Some(MethodArg::Random), 1) => Method::Random,
        (Some(MethodArg::Random), _) => {
            bail!("--method random explores around one run; {n} were given")
        }
        (None, 1) => Method::Random,
        (None, _) => Method::Plane,
    };
    if method == Method::Plane && !(if two_d { (3..=4).contains(&n) } else { (2..=4).contains(&n) })
    {
        bail!(
            "the plane through trained copies needs {} runs, got {n}",
            if two_d { "3 or 4" } else { "2, 3 or 4 (--dims 1)" }
        );
    }
    let default = if method == Method::Plane { (-2.0, 2.0) } else { (-1.0, 1.0) };
    let (x0, x1) = parse_range(a.x_range.as_deref(), default, "--x-range")?;
    let (y0, y1) =
        parse_range(a.y_range.as_deref().or(a.x_range.as_deref()), default, "--y-range")?;
    if a.y_range.is_some() && !two_d {
        bail!("--y-range needs --dims 2");
    }
    let x = Axis { min: x0, max: x1, points: a.resolution };
    x.validate("--x-range")?;
    let cfg = LandscapeConfig {
        method,
        x,
        y: two_d.then_some(Axis { min: y0, max: y1, points: a.resolution }),
        split: a.split.into(),
        samples: a.samples,
        sample_seed: a.sample_seed,
        direction_seed: a.direction_seed,
    };
    if a.samples == Some(0) {
        bail!("--samples must be at least 1");
    }
    let inputs = Inputs::read(&a.runs)?;
    let (ds, ds_prov) = load_data(&a.common, &inputs)?;
    let mut ids = inputs.provenances();
    ids.push(ds_prov);
    let prov = Provenance::of("probe-landscape", &cfg, &ids);
    let out = out_path(&a.common, &inputs.paths[0], "landscape", prov);
    let csv = csv_path(&out, "csv");
    let (probe, was_cached) = match cached(&a.common, &out, prov) {
        Some(p) => (p, true),
        None => {
            let t = Instant::now();
            let run0 = &inputs.runs[0];
            let params: Vec<_> = inputs.runs.iter().map(|r| &r.params).collect();
            let frame = match method {
                Method::Plane => landscape::plane_frame(&params, two_d)?,
                Method::Random => {
                    landscape::random_frame(&run0.params, &run0.mask, two_d, cfg.direction_seed)
                }
            };
            let split = match cfg.split {
                Split::Train => &ds.train,
                Split::Test => &ds.test,
            };
            let set = lmc_probe::subsample(split, cfg.samples, cfg.sample_seed);
            let ckpt = checkpoint_path(&out);
            let mut state = Landscape::start(&cfg, &frame, &params, set.len());
            let mut seconds_before = 0.0;
            if !a.common.fresh && ckpt.exists() {
                if let Ok((h, p)) = artifact::read::<Probe>(&ckpt) {
                    if let (true, ProbeResult::Landscape(l)) = (h.provenance == prov, p.result) {
                        if !a.common.json {
                            eprintln!(
                                "resuming from {} ({} of {} rows done)",
                                ckpt.display(),
                                l.rows_done,
                                l.rows_total
                            );
                        }
                        seconds_before = p.seconds;
                        state = l;
                    }
                }
            }
            let pb = bar((state.rows_total * cfg.x.points) as u64, "landscape");
            pb.set_position((state.rows_done * cfg.x.points) as u64);
            let meta = |l: Landscape, secs: f64| Probe {
                model: inputs.model(),
                dataset: ds.name.clone(),
                inputs: inputs.refs.clone(),
                result: ProbeResult::Landscape(l),
                seconds: secs,
            };
            let mut on_row = |l: &Landscape| -> lmc_train::Result<()> {
                pb.set_position((l.rows_done * cfg.x.points) as u64);
                if !l.is_complete() {
                    artifact::write(
                        &ckpt,
                        &meta(l.clone(), seconds_before + t.elapsed().as_secs_f64()),
                        prov,
                    )?;
                }
                Ok(())
            };
            let l = landscape::run_grid(
                &run0.model,
                &run0.mask,
                &frame,
                &set,
                &ds.norm,
                state,
                &mut on_row,
            )?;
            pb.finish_and_clear();
            let probe = meta(l, seconds_before + t.elapsed().as_secs_f64());
            let ProbeResult::Landscape(l) = &probe.result else { unreachable!() };
            save(&out, &probe, prov, &[(csv.clone(), landscape::csv(l))])?;
            let _ = std::fs::remove_file(&ckpt);
            (probe, false)
        }
    };
    let ProbeResult::Landscape(l) = &probe.result else {
        bail!("{}: not a landscape probe", out.display())
    };
    emit(a.common.json, &out, std::slice::from_ref(&csv), prov, was_cached, &probe, || {
        let kind = match l.config.method {
            Method::Plane => "plane through the runs",
            Method::Random => "filter-normalised random directions",
        };
        let ny = l.config.y.map_or(1, |y| y.points);
        println!(
            "{kind}: {} x {} points, {} {} images per point",
            l.config.x.points, ny, l.count, l.config.split
        );
        if let Some(m) = l.min_loss() {
            println!(
                "lowest loss {:.4} (accuracy {:.2}%) at x = {:.3}, y = {:.3}",
                m.loss,
                100.0 * m.accuracy,
                m.x,
                m.y
            );
        }
        let max = l.points.iter().map(|p| p.loss).fold(f64::MIN, f64::max);
        println!(
            "highest loss {max:.4}; direction norms {:?}; centre norm {:.4}",
            l.direction_norms, l.centre_norm
        );
        for an in &l.anchors {
            println!(
                "  run {} at x = {:.3}, y = {:.3} (off the plane by {:.4})",
                an.run + 1,
                an.x,
                an.y,
                an.off_plane
            );
        }
    });
    Ok(())
}

fn default_chunk(model: &Model) -> usize {
    model.probe_chunk()
}

fn run_hessian(a: HessianArgs) -> Result<()> {
    let inputs = Inputs::read(std::slice::from_ref(&a.run))?;
    let run = &inputs.runs[0];
    let hutch = a.trace || (a.top_k == 0 && !a.exact_diag);
    let cfg = HessianConfig {
        split: a.split.into(),
        samples: a.samples,
        sample_seed: a.sample_seed,
        chunk: a.chunk.unwrap_or_else(|| default_chunk(&run.model)),
        eps_rel: match a.eps_rel.trim() {
            "auto" => None,
            e => {
                Some(e.parse::<f64>().ok().filter(|v| v.is_finite() && *v > 0.0).with_context(
                    || format!("--eps-rel {e}: expected a positive number or auto"),
                )?)
            }
        },
        subnetwork: a.subnetwork,
        hutchinson: hutch.then_some(HutchinsonConfig {
            max_samples: a.max_samples,
            min_samples: a.min_samples,
            tol: a.tol,
        }),
        top_k: a.top_k,
        power_iters: a.power_iters,
        power_tol: a.power_tol,
        exact_diag: a.exact_diag,
        seed: a.seed,
    };
    cfg.validate()?;
    let (mask, mask_source, mask_prov) = match &a.mask_from {
        Some(p) => {
            let (h, other) = artifact::read::<Run>(p)?;
            if other.model.layout != run.model.layout {
                bail!(
                    "--mask-from {}: its architecture ({}) differs from {} ({})",
                    p.display(),
                    other.model.spec,
                    a.run.display(),
                    run.model.spec
                );
            }
            (other.mask, p.display().to_string(), Some(h.provenance))
        }
        None => (run.mask.clone(), "run".to_string(), None),
    };
    let (ds, ds_prov) = load_data(&a.common, &inputs)?;
    let mut ids = inputs.provenances();
    ids.push(ds_prov);
    ids.extend(mask_prov);
    let prov = Provenance::of("probe-hessian", &cfg, &ids);
    let out = out_path(&a.common, &a.run, "hessian", prov);
    let csvs = vec![csv_path(&out, "csv"), csv_path(&out, "samples.csv")];
    let (probe, was_cached) = match cached(&a.common, &out, prov) {
        Some(p) => (p, true),
        None => {
            let t = Instant::now();
            let split = match cfg.split {
                Split::Train => &ds.train,
                Split::Test => &ds.test,
            };
            let set = lmc_probe::subsample(split, Some(cfg.samples), cfg.sample_seed);
            let pb = bar(a.max_samples as u64, "hessian");
            let mut progress = |what: &str, done: usize, total: usize| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
                pb.set_message(what.to_string());
            };
            let r = hessian::probe(
                &run.model,
                &run.params,
                &run.mask,
                (&mask, &mask_source),
                &set,
                &ds.norm,
                &cfg,
                &mut progress,
            )?;
            pb.finish_and_clear();
            let probe = Probe {
                model: inputs.model(),
                dataset: ds.name.clone(),
                inputs: inputs.refs.clone(),
                result: ProbeResult::Hessian(r),
                seconds: t.elapsed().as_secs_f64(),
            };
            let ProbeResult::Hessian(r) = &probe.result else { unreachable!() };
            save(
                &out,
                &probe,
                prov,
                &[(csvs[0].clone(), hessian::csv(r)), (csvs[1].clone(), hessian::samples_csv(r))],
            )?;
            (probe, false)
        }
    };
    let ProbeResult::Hessian(r) = &probe.result else {
        bail!("{}: not a Hessian probe", out.display())
    };
    emit(a.common.json, &out, &csvs, prov, was_cached, &probe, || print_hessian(r));
    Ok(())
}

fn print_hessian(r: &hessian::HessianReport) {
    println!(
        "loss {:.5} on {} {} images; {} parameters ({} probed); gradient norm {:.4e}",
        r.loss, r.samples, r.config.split, r.parameters, r.space, r.gradient_norm
    );
    println!(
        "finite-difference step eps_rel {:.2e}{}",
        r.eps.eps_rel,
        match (r.eps.auto, r.eps.agreed) {
            (false, _) => " (given)".to_string(),
            (true, true) => format!(
                " (automatic: v.Hv agreed within 1% between neighbouring steps after {} rungs)",
                r.eps.ladder.len()
            ),
            (true, false) =>
                " (automatic: no two steps agreed within 1%; the closest pair was used)".to_string(),
        }
    );
    println!(
        "one gradient {:.3} s; one Hessian-vector product {:.3} s = {:.2} gradients",
        r.timing.gradient_seconds, r.timing.hvp_seconds, r.timing.hvp_in_gradients
    );
    if let Some(t) = &r.trace {
        println!(
            "Hutchinson trace {:.5e} +- {:.2e} (standard error, {} samples{}); median sample {:.5e}",
            t.trace,
            t.trace_se,
            t.samples,
            if t.converged { ", tolerance met" } else { ", sample cap" },
            t.median
        );
    }
    if let Some(t) = r.exact_trace {
        println!("exact trace {t:.5e}");
    }
    for (k, e) in r.eigenvalues.iter().enumerate() {
        println!(
            "eigenvalue {}: {:.5e} ({} products{})",
            k + 1,
            e.value,
            e.iterations,
            if e.converged { "" } else { ", not converged" }
        );
    }
    if !r.layers.is_empty() {
        println!(
            "per tensor ({} diagonal; mass split by {} mask):",
            r.diagonal_source, r.mask_source
        );
        println!(
            "  {:24} {:>9} {:>9} {:>12} {:>10} {:>12} {:>8}",
            "tensor", "size", "kept", "trace", "+-", "mean diag", "masked"
        );
        for l in &r.layers {
            println!(
                "  {:24} {:>9} {:>9} {:>12.4e} {:>10.2e} {:>12.4e} {:>7.2}%",
                l.name,
                l.size,
                l.kept,
                l.trace,
                l.trace_se,
                l.mean_diag,
                100.0 * l.masked_mass_fraction
            );
        }
    }
}
