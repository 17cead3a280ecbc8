//! `cargo xtask pipeline`: distill -> prune (distilled, real, random) -> train replicates ->
//! probe -> report, driving the `lmc` binary stage by stage.
//!
//! Caching ("configuration is identity"): every stage runs in `OUT/stages/<stage>-<hash>/`, where
//! the hash covers the stage's full command line (with its inputs' hashes in place of their
//! paths). A stage whose folder holds `result.json` is done and is skipped; change one setting and
//! only the stages whose command lines change (and those downstream) run again. A killed stage is
//! re-run in the same folder, where `lmc`'s own checkpoints let it resume.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lmc_distill::summary::DistillSummary;
use lmc_probe::interpolate::CurvePoint;
use lmc_probe::landscape::Landscape;
use lmc_probe::{Probe, ProbeResult};
use lmc_prune::imp::RoundRecord;
use lmc_train::artifact;
use lmc_train::fit::Run;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A preset: one TOML file (see `presets/`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Preset {
    /// Short name.
    pub name: String,
    /// One sentence on what it reproduces.
    pub description: String,
    /// `lmc` dataset name.
    pub dataset: String,
    /// Architecture spec.
    pub model: String,
    /// Initialisation seed (every method's tickets share it).
    pub seed: u64,
    /// Replicates per condition.
    pub replicates: usize,
    /// IMP rounds retrained and probed (0 = dense).
    pub rounds: Vec<usize>,
    /// Rounds that get a landscape plane (dense and distilled tickets).
    pub landscape_rounds: Vec<usize>,
    /// Flags per stage.
    #[serde(default)]
    pub distill: Flags,
    #[serde(default)]
    /// Flags of real-data IMP.
    pub prune: Flags,
    #[serde(default)]
    /// Flags of IMP on the distilled set.
    pub prune_distilled: Flags,
    #[serde(default)]
    /// Flags of replicate training.
    pub train: Flags,
    #[serde(default)]
    /// Flags of `lmc probe interpolate`.
    pub interpolate: Flags,
    #[serde(default)]
    /// Flags of `lmc probe landscape`.
    pub landscape: Flags,
    #[serde(default)]
    /// Flags of `lmc probe hessian`.
    pub hessian: Flags,
}

/// `[stage.args]`: extra `--key value` flags.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct Flags {
    /// Flag name (without dashes) -> value; `true` is a bare flag, `false` omits it.
    #[serde(default)]
    pub args: toml::Table,
}

impl Flags {
    fn to_args(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for (k, v) in &self.args {
            match v {
                toml::Value::Boolean(true) => out.push(format!("--{k}")),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => out.extend([format!("--{k}"), s.clone()]),
                toml::Value::Integer(i) => out.extend([format!("--{k}"), i.to_string()]),
                toml::Value::Float(f) => out.extend([format!("--{k}"), f.to_string()]),
                other => {
                    bail!("flag '{k}': unsupported value {other} (use a string, number or boolean)")
                }
            }
        }
        Ok(out)
    }
}

/// Loads a preset by name (`presets/NAME.toml`) or path.
pub fn load_preset(name_or_path: &str, root: &Path) -> Result<(Preset, PathBuf)> {
    let p = Path::new(name_or_path);
    let path = if p.extension().is_some_and(|e| e == "toml") || p.is_file() {
        p.to_path_buf()
    } else {
        root.join("presets").join(format!("{name_or_path}.toml"))
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("--preset {name_or_path}: cannot read {}", path.display()))?;
    let preset: Preset =
        toml::from_str(&text).with_context(|| format!("{}: not a valid preset", path.display()))?;
    if preset.replicates < 2 {
        bail!("{}: replicates must be at least 2 (interpolation needs a pair)", path.display());
    }
    Ok((preset, path))
}

/// `result.json`: a stage's command line, its wall time and the `--json` object `lmc` printed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRecord {
    /// Stage label.
    pub stage: String,
    /// The `lmc` arguments it ran with (paths resolved).
    pub argv: Vec<String>,
    /// Wall seconds of the run.
    pub seconds: f64,
    /// The `--json` object `lmc` printed.
    pub output: Value,
}

/// A finished stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageOut {
    /// Stage label.
    pub name: String,
    /// Its folder.
    pub dir: PathBuf,
    /// Content hash.
    pub key: String,
    /// What `result.json` holds.
    pub record: StageRecord,
    /// Whether it was found done.
    pub cached: bool,
    /// Wall seconds this time (0 when cached).
    pub seconds: f64,
}

/// Runs `lmc` stages with caching.
pub struct Runner {
    /// The `lmc` binary.
    pub lmc: PathBuf,
    /// Pipeline output folder.
    pub out: PathBuf,
    /// `--data-dir` for every stage, if any.
    pub data_dir: Option<PathBuf>,
    /// Every stage run so far, in order.
    pub log: Vec<StageOut>,
}

/// Marks a path argument that points into an input stage's folder: hashed as the stage key plus
/// the relative path, so moving OUT does not invalidate the cache.
pub enum Arg {
    /// A literal argument.
    Lit(String),
    /// A file inside a previous stage's folder.
    In(String, String),
    /// A file inside this stage's own folder.
    Own(String),
}

impl Runner {
    fn stage_dir(&self, name: &str, key: &str) -> PathBuf {
        self.out.join("stages").join(format!("{name}-{}", &key[..12]))
    }

    /// Runs `lmc ARGS --json` in a cached stage folder and returns its JSON.
    pub fn stage(&mut self, name: &str, args: Vec<Arg>) -> Result<StageOut> {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        // The lmc stage's algorithm version: after an upgrade that changes a stage's results, its
        // pipeline folders (and everything downstream, through their keys) are recomputed.
        let version = lmc_stage_version(&args)?;
        h.update(format!("V{version}\0"));
        for a in &args {
            match a {
                Arg::Lit(s) => h.update(format!("L{s}\0")),
                Arg::In(k, rel) => h.update(format!("I{k}/{rel}\0")),
                Arg::Own(rel) => h.update(format!("O{rel}\0")),
            }
        }
        if let Some(d) = &self.data_dir {
            h.update(format!("D{}\0", d.display()));
        }
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let dir = self.stage_dir(name, &key);
        let done = dir.join("result.json");
        if let Ok(text) = std::fs::read_to_string(&done) {
            match serde_json::from_str::<StageRecord>(&text) {
                Ok(record) => {
                    eprintln!("[pipeline] {name}: up to date ({})", dir.display());
                    let s = StageOut {
                        name: name.into(),
                        dir,
                        key,
                        record,
                        cached: true,
                        seconds: 0.0,
                    };
                    self.log.push(s.clone());
                    return Ok(s);
                }
                Err(e) => eprintln!(
                    "[pipeline] {name}: {} is unreadable ({e}); running again",
                    done.display()
                ),
            }
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let argv: Vec<String> = args
            .iter()
            .map(|a| match a {
                Arg::Lit(s) => s.clone(),
                Arg::In(k, rel) => self.find_dir(k).join(rel).display().to_string(),
                Arg::Own(rel) => dir.join(rel).display().to_string(),
            })
            .collect();
        let mut cmd = Command::new(&self.lmc);
        cmd.args(&argv).arg("--json");
        if let Some(d) = &self.data_dir {
            if reads_data(&argv) {
                cmd.arg("--data-dir").arg(d);
            }
        }
        eprintln!("[pipeline] {name}: lmc {}", argv.join(" "));
        let t = Instant::now();
        let output = cmd.output().map_err(|e| {
            anyhow::anyhow!("stage {name}: cannot start the lmc binary {}: {e}", self.lmc.display())
        })?;
        let seconds = t.elapsed().as_secs_f64();
        if !output.status.success() {
            bail!(
                "stage {name} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let output: Value = serde_json::from_slice(&output.stdout)
            .with_context(|| format!("stage {name}: lmc printed no JSON"))?;
        let record = StageRecord { stage: name.into(), argv, seconds, output };
        let tmp = dir.join(".result.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
        std::fs::rename(&tmp, &done)?;
        eprintln!("[pipeline] {name}: done in {seconds:.1} s");
        let s = StageOut { name: name.into(), dir, key, record, cached: false, seconds };
        self.log.push(s.clone());
        Ok(s)
    }

    fn find_dir(&self, key: &str) -> PathBuf {
        self.log
            .iter()
            .find(|s| s.key == key)
            .map(|s| s.dir.clone())
            .expect("inputs run before their consumers")
    }
}

/// One (method, round) whose replicates are trained and probed.
#[derive(Clone, Debug, Serialize)]
pub struct Condition {
    /// `dense`, `distilled`, `imp` or `random`.
    pub method: String,
    /// IMP round (0 = dense).
    pub round: usize,
    /// Fraction of prunable weights removed.
    pub sparsity: f64,
    /// Ticket stage key and file.
    #[serde(skip)]
    pub ticket: (String, String),
}

/// Whether an `lmc` command line reads a dataset (and so takes `--data-dir`): every command that
/// names `--dataset`, and the probes, which default to the data their runs were trained on.
fn reads_data(argv: &[String]) -> bool {
    argv.first().is_some_and(|c| c == "probe") || argv.iter().any(|a| a == "--dataset")
}

/// The version (`lmc_train::stage::STAGE_VERSIONS`) of the `lmc` command a stage runs: `distill`,
/// `prune` (and `prune random`), `train`, `probe interpolate|landscape|hessian`.
fn lmc_stage_version(args: &[Arg]) -> Result<u32> {
    let word = |i: usize| match args.get(i) {
        Some(Arg::Lit(s)) => s.as_str(),
        _ => "",
    };
    let stage = match word(0) {
        "probe" => format!("probe-{}", word(1)),
        w => w.to_string(),
    };
    lmc_train::stage::version(&stage)
        .with_context(|| format!("no stage version for `lmc {stage}` (add it to STAGE_VERSIONS)"))
}

fn lit(v: &[&str]) -> Vec<Arg> {
    v.iter().map(|s| Arg::Lit(s.to_string())).collect()
}

fn lits(v: Vec<String>) -> Vec<Arg> {
    v.into_iter().map(Arg::Lit).collect()
}

/// One condition's numbers, read from its stages' artifacts (the libraries' own types, so a
/// renamed or missing field is a compile error or a read error, never a silent "-").
#[derive(Clone, Debug, Serialize)]
pub struct ConditionSummary {
    /// `METHOD-rROUND`.
    pub condition: String,
    /// `dense`, `distilled`, `imp` or `random`.
    pub method: String,
    /// IMP round (0 = dense).
    pub round: usize,
    /// Fraction of prunable weights removed.
    pub sparsity: f64,
    /// Final test accuracy of each replicate.
    pub test_accuracy: Vec<f64>,
    /// Their mean.
    pub test_accuracy_mean: f64,
    /// Mean test-error barrier over the replicate pairs (first split of the probe).
    pub error_barrier_mean: f64,
    /// Mean loss barrier over the pairs.
    pub loss_barrier_mean: f64,
    /// Mean L2 distance between the replicates.
    pub l2_distance_mean: f64,
    /// The first pair's first curve (test error and loss along alpha).
    pub interpolation: Vec<CurvePoint>,
    /// Hutchinson trace of replicate 0 (when the preset asks for one).
    pub hessian_trace: Option<f64>,
    /// Its standard error.
    pub hessian_trace_se: Option<f64>,
}

/// One IMP round as `lmc prune --json` reports it, plus the fraction remaining.
#[derive(Clone, Debug, Serialize)]
pub struct ImpRound {
    /// The library's record of the round.
    #[serde(flatten)]
    pub record: RoundRecord,
    /// 1 - sparsity.
    pub remaining: f64,
}

/// The IMP searches' rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImpRounds {
    /// IMP whose inner loop trained on the distilled set.
    pub distilled: Vec<ImpRound>,
    /// IMP on the real training set.
    pub imp: Vec<ImpRound>,
}

/// A landscape grid of one condition.
#[derive(Clone, Debug, Serialize)]
pub struct LandscapeSummary {
    /// `METHOD-rROUND`.
    pub condition: String,
    /// The probe's result.
    pub result: Landscape,
}

/// Compute spent by one stage.
#[derive(Clone, Debug, Serialize)]
pub struct StageCompute {
    /// Stage label.
    pub stage: String,
    /// Wall seconds when it ran (as recorded in its `result.json`).
    pub seconds: f64,
    /// Training images the stage processed (none for probes and random masks).
    pub images_processed: Option<u64>,
    /// Whether it was found done.
    pub cached: bool,
}

/// Everything the report needs, gathered from the stages.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// The preset used.
    pub preset: Option<Preset>,
    /// Per condition: replicate accuracies, barrier, interpolation curve, Hessian trace.
    pub conditions: Vec<ConditionSummary>,
    /// IMP rounds per method.
    pub imp_rounds: ImpRounds,
    /// The distillation stage's output.
    pub distill: Option<DistillSummary>,
    /// Landscape grids per condition.
    pub landscapes: Vec<LandscapeSummary>,
    /// Stage compute.
    pub compute: Vec<StageCompute>,
}

/// The part of `lmc prune --json` the pipeline reads.
#[derive(Deserialize)]
struct PruneOutput {
    rounds: Vec<RoundRecord>,
}

impl StageOut {
    /// The `--json` object `lmc` printed, as `T`; a missing or mistyped field is an error that
    /// names the stage and its folder.
    fn output<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.record.output.clone()).with_context(|| {
            format!(
                "stage {}: its output ({}) is not what this xtask expects (rerun with --fresh after an upgrade)",
                self.name,
                self.dir.join("result.json").display()
            )
        })
    }

    /// A Probe artifact in this stage's folder.
    fn probe(&self, file: &str) -> Result<ProbeResult> {
        let path = self.dir.join(file);
        let (_, p) = artifact::read::<Probe>(&path)
            .with_context(|| format!("stage {}: reading {}", self.name, path.display()))?;
        Ok(p.result)
    }
}

/// Hessian-diagonal estimates per condition label.
pub type Diagonals = Vec<(String, Vec<f64>)>;

/// Runs every stage of `preset`.
pub fn run(runner: &mut Runner, preset: &Preset) -> Result<(Results, Diagonals)> {
    let ds = preset.dataset.clone();
    let seed = preset.seed.to_string();
    let max_round = *preset.rounds.iter().max().unwrap_or(&0);
    let rounds_arg = max_round.max(1).to_string();
    // 1. Distill.
    let mut a = lit(&["distill", "--dataset", &ds, "--model", &preset.model, "--seed", &seed]);
    a.extend(lits(preset.distill.to_args()?));
    a.extend([Arg::Lit("--out".into()), Arg::Own("distilled.lmc".into())]);
    let distill = runner.stage("distill", a)?;
    // 2. IMP on distilled data, on real data.
    let mut a = lit(&[
        "prune",
        "--dataset",
        &ds,
        "--model",
        &preset.model,
        "--seed",
        &seed,
        "--rounds",
        &rounds_arg,
    ]);
    a.extend([
        Arg::Lit("--train-set".into()),
        Arg::In(distill.key.clone(), "distilled.lmc".into()),
    ]);
    a.extend(lits(preset.prune_distilled.to_args()?));
    a.extend([Arg::Lit("--out-dir".into()), Arg::Own("tickets".into())]);
    let imp_distilled = runner.stage("prune-distilled", a)?;
    let mut a = lit(&[
        "prune",
        "--dataset",
        &ds,
        "--model",
        &preset.model,
        "--seed",
        &seed,
        "--rounds",
        &rounds_arg,
    ]);
    a.extend(lits(preset.prune.to_args()?));
    a.extend([Arg::Lit("--out-dir".into()), Arg::Own("tickets".into())]);
    let imp_real = runner.stage("prune-real", a)?;
    let ticket = |r: usize| format!("tickets/round-{r:02}.lmc");
    let rounds_distilled = imp_distilled.output::<PruneOutput>()?.rounds;
    let rounds_real = imp_real.output::<PruneOutput>()?.rounds;
    let sparsity_of = |rounds: &[RoundRecord], r: usize| -> Result<f64> {
        rounds
            .iter()
            .find(|x| x.round == r)
            .map(|x| x.sparsity)
            .with_context(|| format!("IMP reported no round {r}"))
    };
    // 3. Conditions: dense, then per round distilled / imp / random.
    let mut conds = vec![Condition {
        method: "dense".into(),
        round: 0,
        sparsity: 0.0,
        ticket: (imp_real.key.clone(), ticket(0)),
    }];
    for &r in preset.rounds.iter().filter(|&&r| r > 0) {
        conds.push(Condition {
            method: "distilled".into(),
            round: r,
            sparsity: sparsity_of(&rounds_distilled, r)?,
            ticket: (imp_distilled.key.clone(), ticket(r)),
        });
        conds.push(Condition {
            method: "imp".into(),
            round: r,
            sparsity: sparsity_of(&rounds_real, r)?,
            ticket: (imp_real.key.clone(), ticket(r)),
        });
        let mut a = lit(&["prune", "random", "--seed", &seed]);
        a.extend([Arg::Lit("--like".into()), Arg::In(imp_real.key.clone(), ticket(r))]);
        a.extend([Arg::Lit("--out".into()), Arg::Own("random.lmc".into())]);
        let rs = runner.stage(&format!("random-r{r}"), a)?;
        conds.push(Condition {
            method: "random".into(),
            round: r,
            sparsity: sparsity_of(&rounds_real, r)?,
            ticket: (rs.key.clone(), "random.lmc".into()),
        });
    }
    // 4. Replicates and probes per condition.
    let imp_round = |record: &RoundRecord| ImpRound {
        remaining: 1.0 - record.sparsity,
        record: record.clone(),
    };
    let mut results = Results {
        preset: Some(preset.clone()),
        distill: Some(distill.output::<DistillSummary>()?),
        imp_rounds: ImpRounds {
            distilled: rounds_distilled.iter().map(imp_round).collect(),
            imp: rounds_real.iter().map(imp_round).collect(),
        },
        ..Default::default()
    };
    let mut diagonals = Vec::new();
    let mut images_seen = std::collections::HashMap::new();
    let reps = preset.replicates.to_string();
    for c in &conds {
        let label = format!("{}-r{}", c.method, c.round);
        let mut a = lit(&["train", "--dataset", &ds, "--replicates", &reps, "--seed", &seed]);
        a.extend([Arg::Lit("--ticket".into()), Arg::In(c.ticket.0.clone(), c.ticket.1.clone())]);
        a.extend(lits(preset.train.to_args()?));
        a.extend([Arg::Lit("--out".into()), Arg::Own("runs".into())]);
        let tr = runner.stage(&format!("train-{label}"), a)?;
        let replicate = |i: usize| format!("runs/replicate-{i}.lmc");
        let mut accs = Vec::new();
        let mut images = 0;
        for i in 0..preset.replicates {
            let path = tr.dir.join(replicate(i));
            let (_, run) = artifact::read::<Run>(&path)
                .with_context(|| format!("stage {}: reading {}", tr.name, path.display()))?;
            accs.push(run.final_test_accuracy());
            images += run.images_seen;
        }
        images_seen.insert(tr.name.clone(), images);
        let rep = |i: usize| Arg::In(tr.key.clone(), replicate(i));
        let mut a = lit(&["probe", "interpolate"]);
        a.extend((0..preset.replicates).map(rep));
        a.extend(lits(preset.interpolate.to_args()?));
        a.extend([Arg::Lit("--out".into()), Arg::Own("interpolate.lmc".into())]);
        let ip = runner.stage(&format!("interpolate-{label}"), a)?;
        let ProbeResult::Interpolation(interp) = ip.probe("interpolate.lmc")? else {
            bail!("stage {}: interpolate.lmc holds another probe", ip.name);
        };
        let mut a = lit(&["probe", "hessian"]);
        a.push(rep(0));
        a.extend(lits(preset.hessian.to_args()?));
        a.extend([Arg::Lit("--out".into()), Arg::Own("hessian.lmc".into())]);
        let hs = runner.stage(&format!("hessian-{label}"), a)?;
        let ProbeResult::Hessian(hessian) = hs.probe("hessian.lmc")? else {
            bail!("stage {}: hessian.lmc holds another probe", hs.name);
        };
        if let Some(d) = &hessian.diagonal {
            diagonals.push((label.clone(), d.iter().map(|&x| x as f64).collect()));
        }
        let landscape = (c.method == "dense" || c.method == "distilled")
            && preset.landscape_rounds.contains(&c.round);
        if landscape {
            let mut a = lit(&["probe", "landscape"]);
            a.push(rep(0));
            a.extend(lits(preset.landscape.to_args()?));
            a.extend([Arg::Lit("--out".into()), Arg::Own("landscape.lmc".into())]);
            let ls = runner.stage(&format!("landscape-{label}"), a)?;
            let ProbeResult::Landscape(result) = ls.probe("landscape.lmc")? else {
                bail!("stage {}: landscape.lmc holds another probe", ls.name);
            };
            results.landscapes.push(LandscapeSummary { condition: label.clone(), result });
        }
        let barriers = interp.summary.first().with_context(|| {
            format!("stage {}: the interpolation has no barrier summary", ip.name)
        })?;
        let curve = interp
            .pairs
            .first()
            .and_then(|p| p.curves.first())
            .with_context(|| format!("stage {}: the interpolation has no curve", ip.name))?;
        results.conditions.push(ConditionSummary {
            condition: label,
            method: c.method.clone(),
            round: c.round,
            sparsity: c.sparsity,
            test_accuracy_mean: accs.iter().sum::<f64>() / accs.len().max(1) as f64,
            test_accuracy: accs,
            error_barrier_mean: barriers.error_barrier.mean,
            loss_barrier_mean: barriers.loss_barrier.mean,
            l2_distance_mean: interp.l2_distance.mean,
            interpolation: curve.points.clone(),
            hessian_trace: hessian.trace.as_ref().map(|t| t.trace),
            hessian_trace_se: hessian.trace.as_ref().map(|t| t.trace_se),
        });
    }
    // Images each stage processed: the distillation's, an IMP search's last round (its running
    // total), a replicate group's sum; probes and random masks train nothing.
    let distill_images = results.distill.as_ref().map(|d| d.images_processed);
    let last_round = |r: &[RoundRecord]| r.last().map(|x| x.images_processed);
    results.compute = runner
        .log
        .iter()
        .map(|s| StageCompute {
            stage: s.name.clone(),
            seconds: s.record.seconds,
            images_processed: match s.name.as_str() {
                "distill" => distill_images,
                "prune-distilled" => last_round(&rounds_distilled),
                "prune-real" => last_round(&rounds_real),
                n => images_seen.get(n).copied(),
            },
            cached: s.cached,
        })
        .collect();
    Ok((results, diagonals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_preset_parses_and_names_its_file() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut n = 0;
        for e in std::fs::read_dir(root.join("presets")).unwrap() {
            let p = e.unwrap().path();
            let (preset, _) = load_preset(p.to_str().unwrap(), root).unwrap();
            assert_eq!(p.file_stem().unwrap().to_str().unwrap(), preset.name);
            assert!(
                preset.rounds.contains(&0),
                "{}: the dense network is always a condition",
                preset.name
            );
            n += 1;
        }
        assert!(n >= 4);
        assert!(load_preset("no-such-preset", root)
            .unwrap_err()
            .to_string()
            .contains("no-such-preset"));
    }

    #[test]
    fn every_stage_the_pipeline_runs_has_a_version() {
        for cmd in [
            "distill",
            "prune",
            "prune random",
            "train",
            "probe interpolate",
            "probe landscape",
            "probe hessian",
        ] {
            let args: Vec<Arg> = cmd.split(' ').map(|s| Arg::Lit(s.into())).collect();
            assert!(lmc_stage_version(&args).is_ok(), "{cmd}");
        }
        assert!(lmc_stage_version(&[Arg::Lit("probe".into()), Arg::Lit("nothing".into())]).is_err());
    }

    #[test]
    fn data_dir_goes_to_every_stage_that_reads_data() {
        let v = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert!(reads_data(&v("train --dataset mnist --epochs 1")));
        assert!(reads_data(&v("probe interpolate a.lmc b.lmc")));
        assert!(reads_data(&v("probe hessian a.lmc --samples 512")));
        assert!(!reads_data(&v("prune random --seed 0 --like t.lmc")));
    }

    #[test]
    fn flags_become_command_line_options() {
        let f: Flags = toml::from_str(
            "[args]\nepochs = 3\nlr = 0.5\ntrace = true\nfresh = false\nschedule = \"constant\"\n",
        )
        .unwrap();
        let a = f.to_args().unwrap();
        assert_eq!(a, vec!["--epochs", "3", "--lr", "0.5", "--schedule", "constant", "--trace"]);
    }
}
