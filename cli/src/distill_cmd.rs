//! `lmc distill`: distil a dataset into a few synthetic images per class (a Dataset artifact and
//! a PNG grid next to it), optionally evaluated by training fresh networks on it.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lmc_distill::config::{Distance, DistillConfig, Init, Method};
use lmc_distill::dsa::Strategy;
use lmc_distill::eval::{self, EvalConfig, EvalSummary};
use lmc_distill::grid;
use lmc_distill::run::{self, DistillRequest, RunOptions};
use lmc_distill::summary::{Baseline, DistillSummary, Evaluation};
use lmc_train::artifact;
use lmc_train::data::{self, Dataset, DatasetName, SyntheticSet};
use lmc_train::model::{Model, ModelSpec};

use crate::progress::interactive;
use crate::train_cmd::DataArgs;

/// Arguments of `lmc distill`.
#[derive(Args)]
pub struct DistillArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Distillation network: mlp:H1,H2,..., lenet-300-100, convnet[:depth=D,width=W,norm=instance|none],
    /// resnet[:depth=6n+2,width=W,norm=batch|instance|none] (resnet20), resnet18[:width=W] or
    /// resnet10[:width=W].
    #[arg(long, value_name = "SPEC", default_value = "convnet")]
    model: String,
    /// dm (distribution matching) or gm (gradient matching, DC/IDC).
    #[arg(long, default_value = "dm")]
    method: String,
    /// Stored synthetic images per class.
    #[arg(long, default_value_t = 10)]
    ipc: usize,
    /// Outer iterations (DM: one image update each; GM: one fresh network and --inner-loop updates).
    #[arg(long, default_value_t = 1000)]
    iterations: u64,
    /// IDC multi-formation: each stored image holds F x F cells, each upsampled into a training image.
    #[arg(long, default_value_t = 1, value_name = "F")]
    factor: usize,
    /// DSA strategy: '_'-separated color, crop, cutout, flip, scale, rotate (flip is skipped for
    /// mnist and digits), or none.
    #[arg(long, default_value = lmc_distill::dsa::DEFAULT_STRATEGY, value_name = "STRATEGY")]
    dsa: String,
    /// Initialisation: real (random real images of each class) or noise.
    #[arg(long, default_value = "real")]
    init: String,
    /// Learning rate of the synthetic pixels [default: dm 1, gm with mse 0.005, gm with cos 0.1].
    #[arg(long)]
    lr_img: Option<f64>,
    /// Momentum of the synthetic pixels' SGD.
    #[arg(long, default_value_t = 0.5)]
    momentum_img: f64,
    /// Real images per class per matching step [default: dm 32, gm 64; the references use 256].
    #[arg(long)]
    batch_real: Option<usize>,
    /// GM: per-layer gradient distance, mse (IDC) or cos (DC).
    #[arg(long, default_value = "mse")]
    distance: String,
    /// GM: synthetic-image updates per freshly initialised network.
    #[arg(long, default_value_t = 10)]
    inner_loop: usize,
    /// GM: SGD steps of the network on real data between updates.
    #[arg(long, default_value_t = 5)]
    net_steps: usize,
    /// GM: batch size of those steps.
    #[arg(long, default_value_t = 100)]
    net_batch: usize,
    /// GM: learning rate of those steps.
    #[arg(long, default_value_t = 0.01)]
    net_lr: f64,
    /// GM: how the mixed derivative (the matching distance's gradient w.r.t. the pixels) is
    /// taken: `exact` (forward-over-reverse), `fd` (central difference of input gradients, step
    /// --fd-eps), or `auto`: exact for MLPs and ConvNets, fd for models with batch norm.
    #[arg(long, default_value = "auto", value_name = "auto|exact|fd")]
    mixed: String,
    /// GM with `--mixed fd`: finite-difference step of the mixed derivative (its length in
    /// parameter space).
    #[arg(long, default_value_t = 1e-3)]
    fd_eps: f64,
    /// Seed of everything random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output Dataset artifact (.lmc); the PNG grid goes next to it (.png).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Write the checkpoint (OUT.ckpt) every N iterations (and at least once a minute).
    #[arg(long, default_value_t = 10, value_name = "N")]
    checkpoint_every: u64,
    /// Time budget: stop after the iteration that ends past M minutes of distillation (the output
    /// then equals a run with --iterations set to the iterations done, and records that).
    #[arg(long, value_name = "M")]
    max_minutes: Option<f64>,
    /// Redo the work even when an up-to-date output or a checkpoint exists.
    #[arg(long)]
    fresh: bool,
    /// Evaluate: train M fresh networks on the synthetic set (with DSA) and test them on real data.
    #[arg(long, default_value_t = 0, value_name = "M")]
    eval_models: usize,
    /// Epochs of each evaluation network (DC/DM use 1000; lr x0.1 at half).
    #[arg(long, default_value_t = 300, value_name = "E")]
    eval_epochs: usize,
    /// Architecture of the evaluation networks [default: --model].
    #[arg(long, value_name = "SPEC")]
    eval_model: Option<String>,
    /// Also evaluate the starting images (random real images: the baseline) the same way.
    #[arg(long)]
    eval_baseline: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

fn bar(total: u64, prefix: &str) -> ProgressBar {
    let b = if interactive() {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    b.set_prefix(prefix.to_string());
    b
}

/// The real dataset a `--dataset` value stands for (its own name, or a synthetic set's base).
fn base_of(arg: &str, ds: &Dataset) -> Result<DatasetName> {
    if let Ok((name, _)) = data::parse_real(&ds.name) {
        return Ok(name);
    }
    let (_, set) = artifact::read::<SyntheticSet>(Path::new(arg)).context("--dataset")?;
    Ok(set.base)
}

fn evaluate(
    label: &str,
    set: &SyntheticSet,
    real: &Dataset,
    spec: &ModelSpec,
    cfg: &EvalConfig,
) -> Result<EvalSummary> {
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut progress = |m: usize, done: u64, total: u64, loss: f32| {
        while bars.len() <= m {
            if let Some(b) = bars.last() {
                b.finish_and_clear();
            }
            bars.push(bar(total, &format!("{label} model {}/{}", bars.len() + 1, cfg.models)));
        }
        let b = &bars[m];
        b.set_position(done);
        if done.is_multiple_of(10) || done == total {
            b.set_message(format!("loss {loss:.4}"));
        }
    };
    let s = eval::evaluate(set, real, spec, cfg, &mut progress)?;
    for b in &bars {
        b.finish_and_clear();
    }
    Ok(s)
}

pub fn run(a: DistillArgs) -> Result<()> {
    let spec: ModelSpec = a.model.parse().context("--model")?;
    let eval_spec: ModelSpec = match &a.eval_model {
        Some(s) => s.parse().context("--eval-model")?,
        None => spec.clone(),
    };
    let method: Method = a.method.parse()?;
    let distance: Distance = a.distance.parse()?;
    let dsa: Strategy = a.dsa.parse()?;
    let init: Init = a.init.parse()?;
    let defaults = DistillConfig::defaults(method, distance);
    let config = DistillConfig {
        method,
        ipc: a.ipc,
        iterations: a.iterations,
        factor: a.factor,
        dsa: dsa.clone(),
        init,
        lr_img: a.lr_img.unwrap_or(defaults.lr_img),
        momentum_img: a.momentum_img,
        batch_real: a.batch_real.unwrap_or(defaults.batch_real),
        seed: a.seed,
        distance,
        inner_loop: a.inner_loop,
        net_steps: a.net_steps,
        net_batch: a.net_batch,
        net_lr: a.net_lr,
        mixed: a.mixed.parse()?,
        fd_eps: a.fd_eps,
    };
    let (ds, ds_prov) = a.data.load()?;
    let base = base_of(&a.data.dataset, &ds)?;
    let model = Model::new(&spec, ds.train.shape, ds.classes)?;
    let req =
        DistillRequest { model: &model, dataset: &ds, base, dataset_provenance: ds_prov, config };
    req.validate()?;

    let pb = bar(req.config.total_steps(), "distill");
    let mut progress = |s: run::Step| {
        pb.set_position(s.done);
        pb.set_message(format!("iteration {} loss {:.4}", s.iteration + 1, s.loss));
        ControlFlow::Continue(())
    };
    let opts = RunOptions {
        fresh: a.fresh,
        checkpoint_every: a.checkpoint_every,
        max_seconds: a.max_minutes.map(|m| m * 60.0),
    };
    let outcome = run::distill(&req, Some(&a.out), &opts, &mut progress)?;
    pb.finish_and_clear();
    let png = run::png_path(&a.out);
    grid::write_png(&outcome.set, &png)?;
    let r = &outcome.recipe;
    let final_loss = r.loss_curve.last().map_or(f64::NAN, |&l| l as f64);
    if !a.json {
        println!(
            "{}: {} x {} images (factor {}), {} {} iterations, {:.1} s, {} images processed, final loss {:.4}{}{} -> {} (+ {})",
            outcome.set.name,
            ds.classes,
            req.config.ipc,
            req.config.factor,
            r.method,
            r.iterations,
            r.seconds,
            r.images_processed,
            final_loss,
            if outcome.cached { " (up to date, not redone)" } else { "" },
            if outcome.resumed_from > 0 { format!(" (resumed at iteration {})", outcome.resumed_from) } else { String::new() },
            a.out.display(),
            png.display()
        );
    }
    let mut out = DistillSummary {
        command: "distill".into(),
        dataset: ds.name.clone(),
        base: base.to_string(),
        model: spec.to_string(),
        method: r.method.clone(),
        ipc: req.config.ipc,
        factor: req.config.factor,
        dsa: req.config.dsa.for_dataset(base).to_string(),
        iterations: r.iterations,
        iterations_requested: a.iterations,
        seconds: r.seconds,
        images_processed: r.images_processed,
        final_loss: r.loss_curve.last().map(|&l| l as f64),
        config: r.config.clone(),
        path: a.out.clone(),
        png: png.clone(),
        cached: outcome.cached,
        resumed_from: outcome.resumed_from,
        provenance: outcome.provenance.hex(),
        evaluation: None,
    };

    if a.eval_models > 0 {
        // The real test split: the source itself, or a synthetic source's base dataset.
        let loaded;
        let real: &Dataset = if data::parse_real(&ds.name).is_ok() {
            &ds
        } else {
            loaded = data::load(base, Some(&data::resolve_data_dir(a.data.data_dir.as_deref())))?;
            &loaded
        };
        let ecfg = EvalConfig { dsa, ..EvalConfig::paper(a.eval_models, a.eval_epochs, a.seed) };
        let s = evaluate("eval", &outcome.set, real, &eval_spec, &ecfg)?;
        if !a.json {
            println!(
                "evaluation: {} x {} trained {} epochs with DSA: test accuracy {:.4} +- {:.4} ({:?}), {:.1} s",
                ecfg.models, eval_spec, ecfg.epochs, s.mean, s.std, s.accuracies, s.seconds
            );
        }
        let mut evaluation = Evaluation {
            eval_model: eval_spec.to_string(),
            eval_models: ecfg.models,
            eval_epochs: ecfg.epochs,
            test_accuracy_mean: s.mean,
            test_accuracy_std: s.std,
            test_accuracies: s.accuracies.clone(),
            eval_seconds: s.seconds,
            baseline: None,
        };
        if a.eval_baseline {
            let p =
                lmc_distill::problem::Problem::new(&model, &ds.train, &ds.norm, base, &req.config);
            let start = run::synthetic_set(&req, run::initial_images(&p, &req.config), r);
            let b = evaluate("baseline", &start, real, &eval_spec, &ecfg)?;
            if !a.json {
                println!(
                    "baseline (the starting images, same evaluation): test accuracy {:.4} +- {:.4} ({:?})",
                    b.mean, b.std, b.accuracies
                );
            }
            evaluation.baseline = Some(Baseline {
                baseline_test_accuracy_mean: b.mean,
                baseline_test_accuracy_std: b.std,
                baseline_test_accuracies: b.accuracies,
            });
        }
        out.evaluation = Some(evaluation);
    }
    if a.json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}
