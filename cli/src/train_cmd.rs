//! `lmc train`: replicate training on real data.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{self, Dataset};
use lmc_train::fit::{self, RunRequest, Start, TrainConfig};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::optim::{Schedule, Sgd};
use lmc_train::params::Mask;
use lmc_train::spawn;
use serde_json::json;

use crate::progress::TrainProgress;

/// Options shared by every command that reads a dataset.
#[derive(Args, Clone)]
pub struct DataArgs {
    /// Dataset: digits (built in), mnist, fashion-mnist, cifar10, cifar100, or a Dataset artifact (.lmc)
    /// written by `lmc distill` (trains on its images, tests on its base dataset's test split).
    #[arg(long, value_name = "NAME|FILE")]
    pub dataset: String,
    /// Folder laid out like shared/data: mnist/, fashion-mnist/, cifar-10-batches-bin/ or
    /// cifar-10-binary.tar.gz, cifar-100-binary/ or cifar-100-binary.tar.gz
    /// [default: $LMC_DATA_DIR, then ./data]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DataArgs {
    /// Loads the dataset and its provenance.
    pub fn load(&self) -> Result<(Dataset, Provenance)> {
        let dir = data::resolve_data_dir(self.data_dir.as_deref());
        data::resolve_dataset(&self.dataset, Some(&dir)).context("--dataset")
    }
}

/// Options that decide how a network is trained.
#[derive(Args, Clone)]
pub struct TrainOpts {
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Train for exactly this many SGD steps instead of --epochs.
    #[arg(long, value_name = "N")]
    pub iterations: Option<u64>,
    /// Examples per SGD step.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.01)]
    pub lr: f64,
    /// SGD momentum (0 = plain SGD).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// L2 weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Nesterov momentum.
    #[arg(long)]
    pub nesterov: bool,
    /// Learning-rate schedule: constant, or multistep:F1,F2,... (fractions of training).
    #[arg(long, default_value = "constant")]
    pub schedule: String,
    /// Decay factor at each multistep milestone.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Random crop (padding 4) + horizontal flip [default: on for cifar10 and cifar100 only].
    #[arg(long, overrides_with = "no_augment")]
    pub augment: bool,
    /// Turn augmentation off.
    #[arg(long)]
    pub no_augment: bool,
    /// Evaluate on the test split every N epochs (0 = only at the end).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub eval_every: usize,
}

impl TrainOpts {
    /// The training configuration these flags describe.
    pub fn config(&self) -> Result<TrainConfig> {
        let cfg = TrainConfig {
            epochs: self.epochs,
            iterations: self.iterations,
            batch_size: self.batch_size,
            lr: self.lr,
            sgd: Sgd {
                momentum: self.momentum,
                weight_decay: self.weight_decay,
                nesterov: self.nesterov,
            },
            schedule: Schedule::parse(&self.schedule, self.gamma)?,
            augment: if self.augment {
                Some(true)
            } else if self.no_augment {
                Some(false)
            } else {
                None
            },
            eval_every: self.eval_every,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `lmc train`.
#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Architecture: mlp:H1,H2,..., lenet-300-100, convnet[:depth=D,width=W,norm=instance|none],
    /// resnet[:depth=6n+2,width=W,norm=batch|instance|none] (resnet20), resnet18[:width=W] or
    /// resnet10[:width=W].
    #[arg(long, value_name = "SPEC", required_unless_present = "ticket")]
    model: Option<String>,
    /// Train replicates of this ticket (its starting parameters and mask; `lmc prune`) instead
    /// of a fresh --seed initialisation; --model, if given, must match it.
    #[arg(long, value_name = "TICKET")]
    ticket: Option<PathBuf>,
    #[command(flatten)]
    opts: TrainOpts,
    /// Initialisation seed (shared by all replicates).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-order / augmentation seed of replicate 0; replicate r uses this + r [default: --seed].
    #[arg(long)]
    data_seed: Option<u64>,
    /// Copies trained from the same initialisation with different data order (SGD noise).
    #[arg(long, default_value_t = 1)]
    replicates: usize,
    /// Spawn the replicates at step K (instability analysis): a parent trains the first K
    /// steps once (saved as parent-step-K.lmc beside the replicates), then each replicate
    /// trains the remaining steps from its state with its own data order. K must come before
    /// the first learning-rate milestone; 0 = no parent (plain replicates).
    #[arg(long, value_name = "K", default_value_t = 0)]
    spawn_step: u64,
    /// Data-order seed of the --spawn-step parent [default: --seed, as `lmc prune`'s, so the
    /// parent's state at step K is IMP's --rewind-step K point].
    #[arg(long, value_name = "SEED")]
    parent_data_seed: Option<u64>,
    /// Output: a .lmc file, or with --replicates > 1 a folder of replicate-R.lmc files.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Retrain even when an up-to-date output or a checkpoint exists.
    #[arg(long)]
    fresh: bool,
    /// Print one JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where the parent of replicates spawned at step `k` goes: beside them in the folder of
/// several, or beside the one output file.
pub fn parent_path(out: &Path, n: usize, k: u64) -> PathBuf {
    let name = format!("parent-step-{k}.lmc");
    if n == 1 {
        let stem = out.file_stem().map_or("run".into(), |s| s.to_string_lossy().into_owned());
        out.with_file_name(format!("{stem}.{name}"))
    } else {
        out.join(name)
    }
}

/// Where replicate `r` of `n` goes.
pub fn replicate_path(out: &Path, r: usize, n: usize) -> PathBuf {
    if n == 1 {
        out.to_path_buf()
    } else {
        out.join(format!("replicate-{r}.lmc"))
    }
}

pub fn run(a: TrainArgs) -> Result<()> {
    let spec: Option<ModelSpec> =
        a.model.as_deref().map(str::parse).transpose().context("--model")?;
    if a.replicates == 0 {
        bail!("--replicates must be at least 1");
    }
    let cfg = a.opts.config()?;
    if a.replicates > 1 && a.out.is_file() {
        bail!(
            "--out {}: with --replicates {} the output must be a folder, and this is a file",
            a.out.display(),
            a.replicates
        );
    }
    // Each replicate's stage locks its own file; the folder of several is locked as a whole
    // too, so a second `train` into it stops at once rather than after the shared replicates.
    let _lock = (a.replicates > 1).then(|| artifact::OutputLock::acquire(&a.out)).transpose()?;
    let (ds, ds_prov) = a.data.load()?;
    let (model, init, mask, start) = match (&a.ticket, &spec) {
        (Some(t), _) => crate::prune_cmd::ticket_start(t, spec.as_ref(), &ds)?,
        (None, Some(spec)) => {
            let model = Model::new(spec, ds.train.shape, ds.classes)?;
            let init = model.init(a.seed);
            let mask = Mask::dense(&model.layout);
            (model, init, mask, Start::Seed(a.seed))
        }
        (None, None) => bail!("--model is required (or --ticket)"),
    };
    if a.parent_data_seed.is_some() && a.spawn_step == 0 {
        bail!("--parent-data-seed needs --spawn-step K (K > 0)");
    }
    let base_seed = a.data_seed.unwrap_or(a.seed);
    let (_, _, total) = cfg.plan(ds.train.len());
    let request = |r: usize| RunRequest {
        model: &model,
        dataset: &ds,
        dataset_provenance: ds_prov,
        init: init.clone(),
        start: start.clone(),
        mask: mask.clone(),
        config: cfg.clone(),
        data_seed: base_seed + r as u64,
        replicate: r,
        state: None,
    };
    // The parent of spawned replicates: trained once (cached by its provenance), before any
    // replicate, so a bad --spawn-step fails before work.
    let parent = if a.spawn_step > 0 {
        let k = a.spawn_step;
        let preq = spawn::parent_request(&request(0), k, a.parent_data_seed.unwrap_or(a.seed))?;
        let path = parent_path(&a.out, a.replicates, k);
        let mut bar = TrainProgress::new(format!("parent to step {k}"), k);
        let (run, prov, cached) = fit::train_run(&preq, Some(&path), a.fresh, &mut bar)?;
        bar.finish();
        if !a.json {
            println!(
                "parent: {} steps, {} images, {:.1} s{} -> {}",
                k,
                run.images_seen,
                run.seconds,
                if cached { " (up to date, not retrained)" } else { "" },
                path.display()
            );
        }
        Some((run, prov, path, cached))
    } else {
        None
    };
    let mut rows = Vec::new();
    for r in 0..a.replicates {
        let path = replicate_path(&a.out, r, a.replicates);
        let req = match &parent {
            Some((run, prov, ..)) => spawn::child_request(&request(r), run, *prov),
            None => request(r),
        };
        let label = format!("replicate {}/{}", r + 1, a.replicates);
        let mut bar = TrainProgress::new(label, total).starting_at(req.start.step());
        let (run, prov, cached) = fit::train_run(&req, Some(&path), a.fresh, &mut bar)?;
        bar.finish();
        rows.push(json!({
            "replicate": r,
            "data_seed": run.data_seed,
            "path": path,
            "test_accuracy": run.final_test_accuracy(),
            "train_loss": run.final_train_loss(),
            "epochs": run.curve.len(),
            "images_seen": run.images_seen,
            "seconds": run.seconds,
            "cached": cached,
            "provenance": prov.hex(),
        }));
        if !a.json {
            println!(
                "replicate {r}: test accuracy {:.4}, train loss {:.4}, {} epochs, {} images, {:.1} s{} -> {}",
                run.final_test_accuracy(),
                run.final_train_loss(),
                run.curve.len(),
                run.images_seen,
                run.seconds,
                if cached { " (up to date, not retrained)" } else { "" },
                path.display()
            );
        }
    }
    if a.json {
        let out = json!({
            "command": "train",
            "dataset": ds.name,
            "model": model.spec.to_string(),
            "ticket": a.ticket,
            "sparsity": mask.sparsity(&model.layout),
            "parameters": model.layout.total(),
            "seed": a.seed,
            "spawn_step": a.spawn_step,
            "parent": parent.as_ref().map(|(run, prov, path, cached)| json!({
                "path": path, "data_seed": run.data_seed, "images_seen": run.images_seen,
                "provenance": prov.hex(), "cached": cached,
            })),
            "config": cfg,
            "replicates": rows,
        });
        println!("{out}");
    }
    Ok(())
}
