//! `lmc probe interpolate | landscape | hessian`: measurements on trained runs. The flags become
//! an `lmc_probe::request` (which writes the Probe artifact and its CSVs, reuses an up-to-date
//! output unless --fresh, and resumes a landscape); this prints a table or, with --json, one JSON
//! object.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmc_probe::density::DensityConfig;
use lmc_probe::hessian::{self, HessianConfig, HutchinsonConfig, HvpMode};
use lmc_probe::interpolate::{self, InterpConfig, Split};
use lmc_probe::landscape::{Axis, LandscapeConfig, Method};
use lmc_probe::request::{
    self, HessianRequest, InterpolateRequest, LandscapeRequest, MaskFrom, Observer, Outcome,
    ProbeInputs,
};
use lmc_probe::ProbeResult;
use lmc_train::artifact::Provenance;
use lmc_train::data::Dataset;
use lmc_train::fit::NormMode;
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
    /// Data to evaluate on: digits, mnist, fashion-mnist, cifar10, cifar100, or a Dataset artifact
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
    /// Evaluate the test split on a fixed random subsample of N images [default: all]; the
    /// endpoints' barrier reference is then their error on those images.
    #[arg(long, value_name = "N")]
    test_samples: Option<usize>,
    /// Seed of those subsamples (and of the order of the --bn-reset batches).
    #[arg(long, default_value_t = 0)]
    sample_seed: u64,
    /// Batch-norm models: also evaluate every point with its running statistics re-estimated
    /// from N training batches (the runs' batch size, no augmentation), and report both barriers
    /// [default: the statistics are interpolated with the weights only].
    #[arg(long, value_name = "N")]
    bn_reset: Option<usize>,
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

/// How `probe hessian` computes Hessian-vector products.
#[derive(Clone, Copy, ValueEnum)]
enum HvpArg {
    /// `exact` where the architecture has exact products (all of ours), else `fd`.
    Auto,
    /// Forward-over-reverse through the model's ops: exact, also on ReLU networks.
    Exact,
    /// Central differences of gradients (step from --eps-rel).
    Fd,
}

impl HvpArg {
    /// The mode for `model` with its batch norms in `bn` (`auto` resolved, so the probe's
    /// identity names what ran).
    fn mode(self, model: &lmc_train::model::Model, bn: NormMode) -> HvpMode {
        match self {
            HvpArg::Auto if lmc_train::hvp::supported_in(model, bn) => HvpMode::Exact,
            HvpArg::Auto | HvpArg::Fd => HvpMode::Fd,
            HvpArg::Exact => HvpMode::Exact,
        }
    }
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
    /// Hessian-vector products: `exact` (forward-over-reverse, ReLU's second derivative 0), `fd`
    /// (central differences of gradients, which cross ReLU kinks on ReLU networks), or `auto`:
    /// exact where the architecture has exact products (MLPs, ConvNets, ResNets in either
    /// --bn-mode), fd otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    hvp: HvpArg,
    /// Finite-difference step (`--hvp fd` only): the perturbation eps*v has length EPS_REL * ||theta||. `auto`
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
    /// Spectral density by stochastic Lanczos quadrature with N Lanczos steps per run (PyHessian:
    /// 100), written as `.density.csv` next to the output; 0 = none.
    #[arg(long, default_value_t = 0, value_name = "N")]
    density: usize,
    /// Independent runs (starting vectors) the density averages.
    #[arg(long, default_value_t = 1, value_name = "R")]
    density_runs: usize,
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
    /// Batch-norm models: the loss in evaluation mode (running statistics) or training mode
    /// (each --chunk of images normalised by its own statistics).
    #[arg(long, value_enum, default_value = "running")]
    bn_mode: BnModeArg,
    #[command(flatten)]
    common: Common,
}

#[derive(Clone, Copy, ValueEnum)]
enum BnModeArg {
    Running,
    Batch,
}

pub fn run(a: ProbeArgs) -> Result<()> {
    match a.command {
        ProbeCommand::Interpolate(a) => run_interpolate(a),
        ProbeCommand::Landscape(a) => run_landscape(a),
        ProbeCommand::Hessian(a) => run_hessian(a),
    }
}

/// The runs and the data set to evaluate on (`--dataset`, else the first run's).
fn read_inputs(paths: &[PathBuf], c: &Common) -> Result<(ProbeInputs, Dataset, Provenance)> {
    let inputs = ProbeInputs::read(paths)?;
    let (ds, prov) = request::load_data(&inputs, c.dataset.as_deref(), c.data_dir.as_deref())?;
    Ok((inputs, ds, prov))
}

/// Progress bars fed by a probe's observer, drawn from the first report on (so a cached probe
/// shows none).
struct Bars {
    prefix: &'static str,
    bar: Option<ProgressBar>,
    json: bool,
}

impl Bars {
    fn new(prefix: &'static str, json: bool) -> Bars {
        Bars { prefix, bar: None, json }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Observer for Bars {
    fn progress(&mut self, what: &str, done: usize, total: usize) {
        let b = self.bar.get_or_insert_with(|| bar(total as u64, self.prefix));
        b.set_length(total as u64);
        b.set_position(done as u64);
        b.set_message(what.to_string());
    }
    fn resumed(&mut self, checkpoint: &Path, rows_done: usize, rows_total: usize) {
        if !self.json {
            eprintln!(
                "resuming from {} ({rows_done} of {rows_total} rows done)",
                checkpoint.display()
            );
        }
    }
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

/// Prints the outcome: one JSON object with --json, else `human()` and a line saying where the
/// files are.
fn emit(json: bool, o: &Outcome, human: impl FnOnce()) {
    let probe = &o.probe;
    if json {
        let v = json!({
            "command": format!("probe {}", probe.result.name()),
            "out": o.out,
            "csv": o.csv,
            "provenance": o.provenance.hex(),
            "cached": o.cached,
            "seconds": probe.seconds,
            "summary": probe.summary(),
        });
        println!("{v}");
    } else {
        human();
        println!(
            "{} -> {} and {}",
            if o.cached {
                format!("up to date (computed in {:.1} s), not recomputed", probe.seconds)
            } else {
                format!("{:.1} s", probe.seconds)
            },
            o.out.display(),
            o.csv.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
}

fn run_interpolate(a: InterpolateArgs) -> Result<()> {
    let alphas = interpolate::alpha_grid(a.alphas)?;
    for (flag, n) in [("--train-samples", a.train_samples), ("--test-samples", a.test_samples)] {
        if n == Some(0) {
            bail!("{flag} 0: the subsample would be empty; give at least 1 image (or leave it out for all)");
        }
    }
    let (inputs, ds, ds_prov) = read_inputs(&a.runs, &a.common)?;
    let splits = match a.split {
        SplitArg::Test => vec![Split::Test],
        SplitArg::Train => vec![Split::Train],
        SplitArg::Both => vec![Split::Test, Split::Train],
    };
    let req = InterpolateRequest {
        inputs: &inputs,
        dataset: &ds,
        dataset_provenance: ds_prov,
        splits,
        config: InterpConfig {
            alphas,
            train_samples: a.train_samples,
            test_samples: a.test_samples,
            sample_seed: a.sample_seed,
            bn_reset: a.bn_reset,
        },
    };
    let mut bars = Bars::new("interpolate", a.common.json);
    let done = req.run(a.common.out.as_deref(), a.common.fresh, &mut bars)?;
    bars.finish();
    let probe = &done.probe;
    let ProbeResult::Interpolation(r) = &probe.result else {
        bail!("{}: not an interpolation probe", done.out.display())
    };
    emit(a.common.json, &done, || {
        for p in &r.pairs {
            println!(
                "{} <-> {}: L2 distance {:.4}",
                inputs.paths()[p.a].display(),
                inputs.paths()[p.b].display(),
                p.l2_distance
            );
            let reset = p.reset_curves.iter().map(|c| (c, "bn reset "));
            for (c, how) in p.curves.iter().map(|c| (c, "")).chain(reset) {
                let (e0, e1) = (c.points[0].error, c.points[c.points.len() - 1].error);
                println!(
                    "  {how}{:5} ({} images): error barrier {:.2} points (peak at alpha {:.3}), loss barrier {:.4} (alpha {:.3}); endpoint errors {:.2}% / {:.2}%",
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
            let reset = r.reset_summary.iter().map(|s| (s, "bn reset "));
            for (s, how) in r.summary.iter().map(|s| (s, "")).chain(reset) {
                println!(
                    "over {} pairs, {how}{}: error barrier {:.2} +- {:.2} points, loss barrier {:.4} +- {:.4} (mean +- sample std)",
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
    let two_d = a.dims == 2;
    // The request checks that the number of runs fits the method.
    let method = match a.method {
        Some(MethodArg::Plane) => Method::Plane,
        Some(MethodArg::Random) => Method::Random,
        None if a.runs.len() == 1 => Method::Random,
        None => Method::Plane,
    };
    let default = if method == Method::Plane { (-2.0, 2.0) } else { (-1.0, 1.0) };
    let (x0, x1) = parse_range(a.x_range.as_deref(), default, "--x-range")?;
    let (y0, y1) =
        parse_range(a.y_range.as_deref().or(a.x_range.as_deref()), default, "--y-range")?;
    if a.y_range.is_some() && !two_d {
        bail!("--y-range needs --dims 2");
    }
    let cfg = LandscapeConfig {
        method,
        x: Axis { min: x0, max: x1, points: a.resolution },
        y: two_d.then_some(Axis { min: y0, max: y1, points: a.resolution }),
        split: a.split.into(),
        samples: a.samples,
        sample_seed: a.sample_seed,
        direction_seed: a.direction_seed,
    };
    let (inputs, ds, ds_prov) = read_inputs(&a.runs, &a.common)?;
    let req = LandscapeRequest {
        inputs: &inputs,
        dataset: &ds,
        dataset_provenance: ds_prov,
        config: cfg,
    };
    let mut bars = Bars::new("landscape", a.common.json);
    let done = req.run(a.common.out.as_deref(), a.common.fresh, &mut bars)?;
    bars.finish();
    let probe = &done.probe;
    let ProbeResult::Landscape(l) = &probe.result else {
        bail!("{}: not a landscape probe", done.out.display())
    };
    emit(a.common.json, &done, || {
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

fn run_hessian(a: HessianArgs) -> Result<()> {
    let inputs = ProbeInputs::read(std::slice::from_ref(&a.run))?;
    let hutch = a.trace || (a.top_k == 0 && !a.exact_diag && a.density == 0);
    let bn_mode = match a.bn_mode {
        BnModeArg::Running => NormMode::Running,
        BnModeArg::Batch => NormMode::Batch,
    };
    let cfg = HessianConfig {
        split: a.split.into(),
        samples: a.samples,
        sample_seed: a.sample_seed,
        chunk: HessianRequest::chunk_or_default(&inputs, a.chunk),
        hvp: a.hvp.mode(&inputs.runs()[0].model, bn_mode),
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
        density: (a.density > 0)
            .then_some(DensityConfig { steps: a.density, runs: a.density_runs }),
        seed: a.seed,
        bn_mode,
    };
    cfg.validate()?;
    let mask_from = match &a.mask_from {
        Some(p) => Some(MaskFrom::read(p, inputs.model(), &a.run)?),
        None => None,
    };
    let (ds, ds_prov) =
        request::load_data(&inputs, a.common.dataset.as_deref(), a.common.data_dir.as_deref())?;
    let req = HessianRequest {
        inputs: &inputs,
        dataset: &ds,
        dataset_provenance: ds_prov,
        mask_from,
        config: cfg,
    };
    let mut bars = Bars::new("hessian", a.common.json);
    let done = req.run(a.common.out.as_deref(), a.common.fresh, &mut bars)?;
    bars.finish();
    let probe = &done.probe;
    let ProbeResult::Hessian(r) = &probe.result else {
        bail!("{}: not a Hessian probe", done.out.display())
    };
    emit(a.common.json, &done, || print_hessian(r));
    Ok(())
}

fn print_hessian(r: &hessian::HessianReport) {
    println!(
        "loss {:.5} on {} {} images; {} parameters ({} probed); gradient norm {:.4e}",
        r.loss, r.samples, r.config.split, r.parameters, r.space, r.gradient_norm
    );
    match &r.eps {
        None => println!("Hessian-vector products: exact (forward-over-reverse)"),
        Some(eps) => println!(
            "Hessian-vector products: finite differences, step eps_rel {:.2e}{}",
            eps.eps_rel,
            match (eps.auto, eps.agreed) {
                (false, _) => " (given)".to_string(),
                (true, true) => format!(
                    " (automatic: v.Hv agreed within 1% between neighbouring steps after {} rungs)",
                    eps.ladder.len()
                ),
                (true, false) => {
                    " (automatic: no two steps agreed within 1%; the closest pair was used)"
                        .to_string()
                }
            }
        ),
    }
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
    if !r.density.is_empty() {
        let nodes = r.density.iter().flat_map(|q| q.nodes.iter().copied());
        let (lo, hi) =
            nodes.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(x), h.max(x)));
        println!(
            "spectral density: {} run(s) of {} Lanczos nodes, from {lo:.4e} to {hi:.4e} ({:.2} s)",
            r.density.len(),
            r.density[0].nodes.len(),
            r.timing.density_seconds
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
