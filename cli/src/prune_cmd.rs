//! `lmc prune`: iterative magnitude pruning (Ticket artifacts per round), and the random
//! baselines `lmc prune random` and `lmc prune reinit`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use lmc_prune::imp::{FromTicket, Imp, ImpConfig, ImpObserver, Rewind, RoundRecord};
use lmc_prune::random::{baseline_provenance, random_ticket, reinit_ticket};
use lmc_prune::rule::{PruneRule, Scope};
use lmc_prune::{read_ticket, Ticket};
use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{Dataset, SyntheticSet};
use lmc_train::fit::{Observer, Start, TrainState};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::params::{Mask, ParamVec};
use serde_json::json;

use crate::progress::TrainProgress;
use crate::train_cmd::{DataArgs, TrainOpts};

/// Arguments of `lmc prune`: an IMP run, or a baseline subcommand.
///
/// IMP: initialise (--seed) -> train -> per round: prune ceil(rate x remaining) of the remaining
/// weights by magnitude, rewind, retrain. Writes OUT_DIR/round-RR.lmc for rounds 0 (dense) to
/// --rounds; a killed run started again with the same arguments resumes at the round (and epoch)
/// it reached, and a run with more --rounds reuses the rounds already done.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true, after_help = EXAMPLES)]
pub struct PruneArgs {
    #[command(subcommand)]
    command: Option<PruneCommand>,
    #[command(flatten)]
    imp: ImpArgs,
}

const EXAMPLES: &str = "\
IMP: round 0 trains the dense network; round r prunes ceil(rate x remaining) of the remaining
weights by magnitude, rewinds, retrains. Writes OUT_DIR/round-RR.lmc (Ticket) per round; started
again with the same arguments it resumes where it stopped (by round, and by epoch inside a round).

Examples:
  # OpenLTH's LeNet protocol: 20% global, output layer unpruned, rewind everything to init
  lmc prune --dataset mnist --model lenet-300-100 --rounds 10 --keep-unpruned fc.weight \\
      --rewind all --epochs 40 --lr 0.1 --momentum 0 --weight-decay 0 --out-dir runs/lenet-imp
  # Frankle & Carbin: layer-wise 20%, output layer at 10%
  lmc prune ... --layerwise --layer-rate fc.weight=0.1
  # IMP on a distilled set, then continue on real data from its round-4 ticket
  lmc prune --dataset mnist --train-set syn.lmc --model lenet-300-100 --rounds 4 ... --out-dir runs/d
  lmc prune --dataset mnist --from-ticket runs/d/round-04.lmc --rounds 5 ... --out-dir runs/d-real
  # Baselines, then replicates of any ticket on real data
  lmc prune random --like runs/lenet-imp/round-05.lmc --layerwise --out runs/random-05.lmc
  lmc prune reinit --like runs/lenet-imp/round-05.lmc --out runs/reinit-05.lmc
  lmc train --ticket runs/random-05.lmc --dataset mnist --replicates 2 ... --out runs/random-05";

#[derive(Subcommand)]
enum PruneCommand {
    /// A random mask at a ticket's sparsity, same starting parameters (random-pruning baseline).
    Random(RandomArgs),
    /// A ticket's mask with freshly initialised parameters (random re-initialisation baseline).
    Reinit(ReinitArgs),
}

/// What a rewind resets.
#[derive(Clone, Copy, ValueEnum)]
enum RewindArg {
    /// Conv/linear weights only; biases and norm parameters carry over (the authors' code).
    Weights,
    /// Every parameter.
    All,
}

#[derive(Args)]
struct ImpArgs {
    /// Real dataset: digits (built in), mnist, fashion-mnist, cifar10, cifar100. Each round's trained network
    /// is tested on its test split; it is also the training data unless --train-set is given.
    #[arg(long, value_name = "NAME", required = true)]
    dataset: Option<String>,
    /// Folder laid out like shared/data [default: $LMC_DATA_DIR, then ./data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Train every round on this Dataset artifact (a distilled set of --dataset) instead of the
    /// real training split.
    #[arg(long, value_name = "FILE")]
    train_set: Option<PathBuf>,
    /// Architecture (mlp:H1,..., lenet-300-100, convnet[:...], resnet[:...], resnet20, resnet18,
    /// resnet10; see `lmc train --help`); taken from --from-ticket if omitted.
    #[arg(long, value_name = "SPEC")]
    model: Option<String>,
    /// Pruning rounds after the dense round 0 (K tickets at 1 - (1 - rate)^k remaining, plus round 0).
    #[arg(long, value_name = "K", required = true)]
    rounds: Option<usize>,
    /// Fraction of the remaining weights removed per round, in (0, 1).
    #[arg(long, default_value_t = 0.2)]
    rate: f64,
    /// Prune each tensor at the rate on its own instead of one global threshold.
    #[arg(long)]
    layerwise: bool,
    /// A tensor pruned on its own at its own rate, e.g. fc.weight=0.1 (repeatable).
    #[arg(long, value_name = "NAME=RATE")]
    layer_rate: Vec<String>,
    /// A prunable tensor left dense, e.g. fc.weight (repeatable).
    #[arg(long, value_name = "NAME")]
    keep_unpruned: Vec<String>,
    /// Rewind to the parameters after this many SGD steps of round 0 (0 = initialisation).
    #[arg(long, default_value_t = 0, value_name = "K")]
    rewind_step: u64,
    /// What a rewind resets.
    #[arg(long, value_enum, default_value = "weights")]
    rewind: RewindArg,
    /// Continue IMP from this ticket's mask and parameters (e.g. a ticket found on distilled
    /// data), training on --dataset's real training split.
    #[arg(long, value_name = "TICKET")]
    from_ticket: Option<PathBuf>,
    #[command(flatten)]
    opts: TrainOpts,
    /// Initialisation seed (also chooses tie-breaking among equal magnitudes).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Data-order / augmentation seed of every round's training [default: --seed].
    #[arg(long)]
    data_seed: Option<u64>,
    /// Output folder for round-RR.lmc tickets.
    #[arg(long, value_name = "DIR", required = true)]
    out_dir: Option<PathBuf>,
    /// Recompute every round even when up-to-date tickets or checkpoints exist.
    #[arg(long)]
    fresh: bool,
    /// Print one JSON object on stdout (a `rounds` list) instead of a line per round.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct RandomArgs {
    /// The ticket whose sparsity (and starting parameters) to copy.
    #[arg(long, value_name = "TICKET")]
    like: PathBuf,
    /// Keep the ticket's number of weights in every tensor; default: only the total over the
    /// tensors the ticket pruned (tensors it left dense stay dense).
    #[arg(long)]
    layerwise: bool,
    /// Seed of the random mask.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output ticket file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReinitArgs {
    /// The ticket whose mask to keep.
    #[arg(long, value_name = "TICKET")]
    like: PathBuf,
    /// Initialisation seed of the new parameters [default: the ticket's init seed + 1].
    #[arg(long)]
    seed: Option<u64>,
    /// Output ticket file.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: PruneArgs) -> Result<()> {
    match a.command {
        Some(PruneCommand::Random(r)) => random(r),
        Some(PruneCommand::Reinit(r)) => reinit(r),
        None => imp(a.imp),
    }
}

/// Parses `NAME=RATE` pairs.
fn layer_rates(items: &[String]) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for item in items {
        let Some((name, rate)) = item.split_once('=') else {
            bail!("--layer-rate {item}: expected NAME=RATE, e.g. fc.weight=0.1");
        };
        let rate: f64 = rate
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--layer-rate {item}: '{rate}' is not a number"))?;
        if out.insert(name.trim().to_string(), rate).is_some() {
            bail!("--layer-rate {name}: given twice");
        }
    }
    Ok(out)
}

/// The training data (real, or a distilled set of it) and the real test split, with provenance.
fn load_data(a: &ImpArgs) -> Result<(Dataset, Provenance)> {
    let name = a.dataset.clone().context("--dataset is required")?;
    let data = DataArgs { dataset: name.clone(), data_dir: a.data_dir.clone() };
    let Some(set) = &a.train_set else {
        return data.load();
    };
    if name.ends_with(".lmc") || Path::new(&name).is_file() {
        bail!("--dataset {name}: with --train-set, --dataset names the real dataset (e.g. mnist)");
    }
    let (h, syn) = artifact::read::<SyntheticSet>(set)?;
    if syn.base.as_str() != lmc_train::data::parse_real(&name)?.0.as_str() {
        bail!(
            "--train-set {}: a distilled set of {}, not of --dataset {name}",
            set.display(),
            syn.base
        );
    }
    let (real, _) = data.load()?;
    let ds =
        syn.to_dataset(&real).map_err(|e| anyhow::anyhow!("--train-set {}: {e}", set.display()))?;
    Ok((ds, h.provenance))
}

fn imp(a: ImpArgs) -> Result<()> {
    let rounds = a.rounds.context("--rounds is required")?;
    let out_dir = a.out_dir.clone().context("--out-dir is required")?;
    let spec: Option<ModelSpec> =
        a.model.as_deref().map(str::parse).transpose().context("--model")?;
    let train = a.opts.config()?;
    let rule = PruneRule {
        rate: a.rate,
        scope: if a.layerwise { Scope::Layerwise } else { Scope::Global },
        layer_rates: layer_rates(&a.layer_rate)?,
        keep_unpruned: a.keep_unpruned.iter().cloned().collect::<BTreeSet<_>>(),
    };
    rule.check_rates()?;
    if a.from_ticket.is_some() && a.train_set.is_some() {
        bail!("--from-ticket continues IMP on real data; drop --train-set");
    }
    let from = match &a.from_ticket {
        Some(p) => Some((p.clone(), read_ticket(p)?)),
        None => None,
    };
    let spec = match (&spec, &from) {
        (Some(s), _) => s.clone(),
        (None, Some((_, (_, t)))) => t.model.spec.clone(),
        (None, None) => bail!("--model is required (or --from-ticket)"),
    };
    let (ds, ds_prov) = load_data(&a)?;
    if let Some((p, (_, t))) = &from {
        t.check_model(p, Some(&spec), ds.train.shape, ds.classes, &ds.name)?;
    }
    let model = Model::new(&spec, ds.train.shape, ds.classes)?;
    rule.groups(&model.layout)?;
    let config = ImpConfig {
        model: spec.clone(),
        seed: a.seed,
        data_seed: a.data_seed.unwrap_or(a.seed),
        train,
        rule,
        rewind_step: a.rewind_step,
        rewind: match a.rewind {
            RewindArg::Weights => Rewind::Weights,
            RewindArg::All => Rewind::All,
        },
    };
    let imp = Imp {
        config,
        model: &model,
        data: &ds,
        data_provenance: ds_prov,
        from: from.as_ref().map(|(_, (h, t))| FromTicket { ticket: t, provenance: h.provenance }),
        out_dir: &out_dir,
        fresh: a.fresh,
    };
    let mut progress = ImpProgress { bar: None, json: a.json };
    let started = std::time::Instant::now();
    let records = imp.run(rounds, &mut progress)?;
    let total_seconds = started.elapsed().as_secs_f64();
    if a.json {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                json!({
                    "round": r.round, "sparsity": r.sparsity, "remaining": 1.0 - r.sparsity, "kept": r.kept,
                    "test_accuracy": r.test_accuracy, "images_processed": r.images_processed,
                    "seconds": r.seconds, "path": r.path, "cached": r.cached,
                })
            })
            .collect();
        let out = json!({
            "command": "prune",
            "model": spec.to_string(),
            "dataset": a.dataset,
            "train_set": ds.name,
            "from_ticket": a.from_ticket,
            "out_dir": out_dir,
            "config": imp.config,
            "seconds": total_seconds,
            "rounds": rows,
        });
        println!("{out}");
    } else {
        println!("{} rounds in {:.1} s -> {}", records.len(), total_seconds, out_dir.display());
    }
    Ok(())
}

/// Progress: a bar per round on a terminal; a line per round on stdout unless --json.
struct ImpProgress {
    bar: Option<TrainProgress>,
    json: bool,
}

impl Observer for ImpProgress {
    fn on_step(&mut self, e: usize, s: u64, n: u64, l: f32) {
        if let Some(b) = &mut self.bar {
            b.on_step(e, s, n, l);
        }
    }
    fn on_epoch(&mut self, state: &TrainState) -> lmc_train::Result<()> {
        match &mut self.bar {
            Some(b) => b.on_epoch(state),
            None => Ok(()),
        }
    }
}

impl ImpObserver for ImpProgress {
    fn round_started(&mut self, round: usize, rounds: usize, sparsity: f64, total_steps: u64) {
        let label = format!("round {round}/{rounds} ({:.1}% remaining)", 100.0 * (1.0 - sparsity));
        self.bar = Some(TrainProgress::new(label, total_steps));
    }
    fn round_finished(&mut self, r: &RoundRecord) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
        if !self.json {
            println!(
                "round {}: {:.2}% of weights remaining ({} kept), test accuracy {:.4}, {} images processed, {:.1} s{} -> {}",
                r.round,
                100.0 * (1.0 - r.sparsity),
                r.kept,
                r.test_accuracy,
                r.images_processed,
                r.seconds,
                if r.cached { " (up to date, not recomputed)" } else { "" },
                r.path.display()
            );
            let _ = std::io::stdout().flush();
        }
    }
}

fn write_baseline(
    t: &Ticket,
    like: Provenance,
    out: &Path,
    json_out: bool,
    command: &str,
) -> Result<()> {
    let prov = baseline_provenance(&t.origin, like);
    artifact::write(out, t, prov)?;
    if json_out {
        let layers: Vec<_> = t
            .layers
            .iter()
            .map(|l| json!({"name": l.name, "kept": l.kept, "total": l.total}))
            .collect();
        println!(
            "{}",
            json!({"command": command, "path": out, "sparsity": t.sparsity, "remaining": t.remaining(), "layers": layers, "provenance": prov.hex()})
        );
    } else {
        println!(
            "{command}: {:.2}% of weights remaining -> {}",
            100.0 * t.remaining(),
            out.display()
        );
    }
    Ok(())
}

fn random(a: RandomArgs) -> Result<()> {
    let _lock = artifact::OutputLock::acquire(&a.out)?;
    let (h, like) = read_ticket(&a.like)?;
    let t = random_ticket(&like, h.provenance, a.layerwise, a.seed)?;
    write_baseline(&t, h.provenance, &a.out, a.json, "prune random")
}

fn reinit(a: ReinitArgs) -> Result<()> {
    let _lock = artifact::OutputLock::acquire(&a.out)?;
    let (h, like) = read_ticket(&a.like)?;
    let seed = a.seed.unwrap_or(like.init_seed.wrapping_add(1));
    let t = reinit_ticket(&like, h.provenance, seed);
    write_baseline(&t, h.provenance, &a.out, a.json, "prune reinit")
}

/// For `lmc train --ticket`: the ticket's model, starting parameters, mask and run start, after
/// checking it fits `--model` (when given) and the dataset.
pub fn ticket_start(
    path: &Path,
    spec: Option<&ModelSpec>,
    ds: &Dataset,
) -> Result<(Model, ParamVec, Mask, Start)> {
    let (h, t) = read_ticket(path)?;
    t.check_model(path, spec, ds.train.shape, ds.classes, &ds.name)?;
    let start = Start::Given { source: h.provenance, init_seed: t.init_seed };
    Ok((t.model, t.rewind, t.mask, start))
}
