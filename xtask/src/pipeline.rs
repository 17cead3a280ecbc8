//! `cargo xtask pipeline`: distill -> prune (distilled, real, random) -> train replicates ->
//! probe -> report. `plan` expands a preset into a [`Graph`] of `lmc` invocations before anything
//! runs; an executor (`exec.rs`) runs the stages not yet done; `gather` reads the report's
//! numbers from their artifacts.
//!
//! Caching ("configuration is identity"): every stage runs in `OUT/stages/<stage>-<hash>/`, where
//! the hash covers the stage's full command line (with its inputs' hashes in place of their
//! paths). A stage whose folder holds `result.json` is done and is skipped; change one setting and
//! only the stages whose command lines change (and those downstream) run again. A killed stage is
//! re-run in the same folder, where `lmc`'s own checkpoints let it resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// A preset: one TOML file (see `presets/`). Unknown keys are errors, so a typo does not
/// silently run the defaults.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
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
    /// A seed sweep: when given, the whole study runs once per seed (instead of `seed`), its
    /// stages named `...-sSEED`, and the report adds mean +- std across seeds per condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// Replicates per condition.
    pub replicates: usize,
    /// IMP rounds retrained and probed (0 = dense).
    pub rounds: Vec<usize>,
    /// Rounds that get a landscape plane (dense and distilled tickets).
    pub landscape_rounds: Vec<usize>,
    /// Instability analysis (Frankle et al. 2020): replicates spawned at later steps k from
    /// some conditions' starting points; the report plots the error barrier against k.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instability: Option<Instability>,
    /// Also real-data IMP that rewinds to this step instead of the initialisation (Frankle et
    /// al.'s "rewinding"; conditions `imp-rewind-rR`), with the `[prune.args]` flags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imp_rewind_step: Option<u64>,
    /// One distillation, with this seed, shared by every seed of a sweep (the paper's authors
    /// ran IMP from several initialisations on one published distilled set). Without it each
    /// seed distils its own set with its own seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill_seed: Option<u64>,
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
    /// `[resources.KIND]`: cpus / mem_mb / time_min per stage kind (see `STAGE_KINDS`), for
    /// the Slurm executor's requests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, Resources>,
    /// `[slurm]`: where the Slurm executor submits.
    #[serde(default, skip_serializing_if = "SlurmOptions::is_empty")]
    pub slurm: SlurmOptions,
}

/// `[instability]` in a preset: which conditions are spawned at which steps.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Instability {
    /// Spawn steps k > 0 (`lmc train --spawn-step`); k = 0 is the condition itself.
    pub steps: Vec<u64>,
    /// Conditions swept, as `METHOD-rROUND` (`dense-r0`, `imp-r4`, ...) [default: dense-r0].
    #[serde(default = "dense_only")]
    pub conditions: Vec<String>,
}

fn dense_only() -> Vec<String> {
    vec!["dense-r0".into()]
}

/// `[slurm]` in a preset (each can also be given on the command line, which wins).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmOptions {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// Extra `sbatch` arguments, e.g. `["--qos=short"]`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

impl SlurmOptions {
    fn is_empty(&self) -> bool {
        self.partition.is_none() && self.account.is_none() && self.sbatch_args.is_empty()
    }
}

/// `[stage.args]`: extra `--key value` flags.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
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
    for kind in preset.resources.keys() {
        if !STAGE_KINDS.iter().any(|k| k.0 == kind) {
            let kinds: Vec<&str> = STAGE_KINDS.iter().map(|k| k.0).collect();
            bail!(
                "{}: [resources.{kind}]: no such stage kind (one of {})",
                path.display(),
                kinds.join(", ")
            );
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(s) = preset.seeds.iter().find(|s| !seen.insert(**s)) {
        bail!("{}: seed {s} is listed twice in seeds", path.display());
    }
    if preset.replicates < 2 {
        bail!("{}: replicates must be at least 2 (interpolation needs a pair)", path.display());
    }
    if let Some(ins) = &preset.instability {
        let mut seen = std::collections::HashSet::new();
        if let Some(k) = ins.steps.iter().find(|k| **k == 0 || !seen.insert(**k)) {
            bail!(
                "{}: [instability] steps: {k} is 0 or listed twice (k = 0 is the condition itself)",
                path.display()
            );
        }
        let known = condition_labels(&preset);
        if let Some(c) = ins.conditions.iter().find(|c| !known.contains(c)) {
            bail!(
                "{}: [instability] conditions: no condition {c} (the preset has {})",
                path.display(),
                known.join(", ")
            );
        }
    }
    if preset.imp_rewind_step == Some(0) {
        bail!("{}: imp_rewind_step must be a step after 0 (round 0 is imp)", path.display());
    }
    Ok((preset, path))
}

/// The labels of a preset's conditions (`METHOD-rROUND`), in plan order.
fn condition_labels(preset: &Preset) -> Vec<String> {
    let mut out = vec!["dense-r0".to_string()];
    for &r in preset.rounds.iter().filter(|&&r| r > 0) {
        out.extend(["distilled", "imp", "random"].map(|m| format!("{m}-r{r}")));
        if preset.imp_rewind_step.is_some() {
            out.push(format!("imp-rewind-r{r}"));
        }
    }
    out
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
}

/// An argument of a stage's command line while the graph is built.
pub enum Arg {
    /// A literal argument.
    Lit(String),
    /// A file inside an input stage's folder (the node's index in the graph): hashed as that
    /// stage's key plus the relative path, so moving OUT does not invalidate the cache.
    In(usize, String),
    /// A file inside this stage's own folder (one of its outputs).
    Own(String),
}

/// What a stage asks of the machine that runs it (Slurm's `--cpus-per-task`, `--mem`, `--time`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Cores (also the stage's RAYON_NUM_THREADS under Slurm).
    pub cpus: Option<usize>,
    /// Memory in MiB.
    pub mem_mb: Option<u64>,
    /// Wall-time limit in minutes.
    pub time_min: Option<u64>,
}

/// Stage kinds, with the resources each asks for unless the preset's `[resources.KIND]` says
/// otherwise: sized for the shipped presets (a dataset in memory, a few models), generous in time
/// because a scheduler kills a job that overruns.
pub const STAGE_KINDS: [(&str, usize, u64, u64); 8] = [
    ("distill", 2, 4096, 240),
    ("prune", 2, 4096, 480),
    ("prune-distilled", 2, 4096, 480),
    ("random", 1, 1024, 10),
    ("train", 2, 4096, 480),
    ("interpolate", 2, 4096, 120),
    ("landscape", 2, 4096, 120),
    ("hessian", 2, 4096, 120),
];

/// Resources with every field set.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct NodeResources {
    /// Cores.
    pub cpus: usize,
    /// Memory in MiB.
    pub mem_mb: u64,
    /// Wall-time limit in minutes.
    pub time_min: u64,
}

/// One stage of the graph: everything needed to run it anywhere that sees OUT.
#[derive(Clone, Debug, Serialize)]
pub struct Node {
    /// Stage label (unique in the graph).
    pub name: String,
    /// Its kind (a key of `STAGE_KINDS`).
    pub kind: String,
    /// Content hash of its command line, its inputs' keys and its lmc stage version.
    pub key: String,
    /// Its folder, relative to OUT.
    pub dir: String,
    /// The `lmc` arguments; the ones listed in `path_args` are relative to OUT.
    pub argv: Vec<String>,
    /// Indices into `argv` of the paths (inputs and outputs).
    pub path_args: Vec<usize>,
    /// The stages whose outputs it reads (indices of `Graph::nodes`).
    pub inputs: Vec<usize>,
    /// The files it writes, relative to its folder.
    pub outputs: Vec<String>,
    /// What it asks of the machine.
    pub resources: NodeResources,
}

impl Node {
    /// Its folder under `out`.
    pub fn dir_in(&self, out: &Path) -> PathBuf {
        out.join(&self.dir)
    }

    /// The `lmc` arguments with paths under `out`.
    pub fn argv_in(&self, out: &Path) -> Vec<String> {
        self.argv
            .iter()
            .enumerate()
            .map(|(i, a)| {
                if self.path_args.contains(&i) {
                    out.join(a).display().to_string()
                } else {
                    a.clone()
                }
            })
            .collect()
    }
}

/// The study as a DAG, expanded from a preset before anything runs. Nodes are in a topological
/// order (every input comes before its consumers), the order a single worker runs them in.
#[derive(Clone, Debug, Serialize)]
pub struct Graph {
    /// The stages.
    pub nodes: Vec<Node>,
    /// One study per seed (one, unless the preset sweeps `seeds`).
    pub seeds: Vec<SeedPlan>,
    /// Whether the preset sweeps seeds (stage and condition names then end in `-sSEED`).
    pub sweep: bool,
}

/// The stages of one seed's study.
#[derive(Clone, Debug, Serialize)]
pub struct SeedPlan {
    /// The seed.
    pub seed: u64,
    /// The distillation stage.
    pub distill: usize,
    /// IMP on the distilled set.
    pub prune_distilled: usize,
    /// IMP on real data.
    pub prune_real: usize,
    /// IMP on real data rewinding to `imp_rewind_step`, if the preset asks for it.
    pub prune_rewind: Option<usize>,
    /// The conditions whose replicates are trained and probed.
    pub conditions: Vec<Condition>,
}

impl Graph {
    /// `(input, consumer)` pairs.
    pub fn edges(&self) -> Vec<(usize, usize)> {
        let mut e = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            e.extend(n.inputs.iter().map(|&p| (p, i)));
        }
        e
    }

    /// Nodes that (transitively) read `i`'s outputs.
    pub fn dependants(&self, i: usize) -> Vec<usize> {
        let mut hit = vec![false; self.nodes.len()];
        hit[i] = true;
        let mut out = Vec::new();
        for (j, n) in self.nodes.iter().enumerate().skip(i + 1) {
            if n.inputs.iter().any(|&p| hit[p]) {
                hit[j] = true;
                out.push(j);
            }
        }
        out
    }

    /// Checks what a hand-built graph could get wrong: an input that is not an earlier node (a
    /// cycle or a missing stage), two stages in one folder.
    pub fn validate(&self) -> Result<()> {
        let mut dirs = std::collections::HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for &p in &n.inputs {
                if p >= i {
                    bail!("stage {}: input #{p} does not come before it (a cycle?)", n.name);
                }
            }
            if !dirs.insert(&n.dir) {
                bail!("two stages share the folder {}", n.dir);
            }
        }
        Ok(())
    }

    /// A human-readable listing: each stage, its folder, resources, command and inputs.
    pub fn plan_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} stages, {} edges (paths relative to the output folder)",
            self.nodes.len(),
            self.edges().len()
        );
        for n in &self.nodes {
            let r = &n.resources;
            let _ = writeln!(
                s,
                "{}  [{}]  cpus {} mem {} MiB time {} min",
                n.name, n.dir, r.cpus, r.mem_mb, r.time_min
            );
            let _ = writeln!(s, "    lmc {}", n.argv.join(" "));
            if !n.inputs.is_empty() {
                let ins: Vec<&str> =
                    n.inputs.iter().map(|&p| self.nodes[p].name.as_str()).collect();
                let _ = writeln!(s, "    <- {}", ins.join(", "));
            }
        }
        s
    }

    /// The plan as JSON: stages (inputs by name) and edges.
    pub fn plan_json(&self) -> Value {
        let stages: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "name": n.name, "kind": n.kind, "key": n.key, "dir": n.dir,
                    "argv": n.argv, "path_args": n.path_args,
                    "inputs": n.inputs.iter().map(|&p| &self.nodes[p].name).collect::<Vec<_>>(),
                    "outputs": n.outputs, "resources": n.resources,
                })
            })
            .collect();
        let edges: Vec<Value> = self
            .edges()
            .into_iter()
            .map(|(a, b)| serde_json::json!([self.nodes[a].name, self.nodes[b].name]))
            .collect();
        serde_json::json!({"stages": stages, "edges": edges})
    }
}

/// Builds nodes; keys are hashed exactly as the sequential pipeline hashed them, so caches carry
/// over.
struct Builder<'a> {
    nodes: Vec<Node>,
    data_dir: Option<&'a Path>,
    resources: &'a BTreeMap<String, Resources>,
}

impl Builder<'_> {
    fn add(&mut self, name: &str, kind: &str, args: Vec<Arg>) -> Result<usize> {
        let mut h = Sha256::new();
        h.update(name.as_bytes());
        // The lmc stage's algorithm version: after an upgrade that changes a stage's results, its
        // pipeline folders (and everything downstream, through their keys) are recomputed.
        let version = lmc_stage_version(&args)?;
        h.update(format!("V{version}\0"));
        for a in &args {
            match a {
                Arg::Lit(s) => h.update(format!("L{s}\0")),
                Arg::In(i, rel) => h.update(format!("I{}/{rel}\0", self.nodes[*i].key)),
                Arg::Own(rel) => h.update(format!("O{rel}\0")),
            }
        }
        if let Some(d) = self.data_dir {
            h.update(format!("D{}\0", d.display()));
        }
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        let dir = format!("stages/{name}-{}", &key[..12]);
        let (mut argv, mut path_args, mut inputs, mut outputs) = (vec![], vec![], vec![], vec![]);
        for a in args {
            match a {
                Arg::Lit(s) => argv.push(s),
                Arg::In(i, rel) => {
                    path_args.push(argv.len());
                    argv.push(format!("{}/{rel}", self.nodes[i].dir));
                    if !inputs.contains(&i) {
                        inputs.push(i);
                    }
                }
                Arg::Own(rel) => {
                    path_args.push(argv.len());
                    argv.push(format!("{dir}/{rel}"));
                    outputs.push(rel);
                }
            }
        }
        let (_, cpus, mem_mb, time_min) = *STAGE_KINDS
            .iter()
            .find(|k| k.0 == kind)
            .with_context(|| format!("unknown stage kind {kind}"))?;
        let o = self.resources.get(kind).cloned().unwrap_or_default();
        let resources = NodeResources {
            cpus: o.cpus.unwrap_or(cpus).max(1),
            mem_mb: o.mem_mb.unwrap_or(mem_mb),
            time_min: o.time_min.unwrap_or(time_min),
        };
        self.nodes.push(Node {
            name: name.into(),
            kind: kind.into(),
            key,
            dir,
            argv,
            path_args,
            inputs,
            outputs,
            resources,
        });
        Ok(self.nodes.len() - 1)
    }
}

/// Reads a stage's `result.json`, if it is there and readable.
pub fn load_record(dir: &Path) -> Option<StageRecord> {
    let text = std::fs::read_to_string(dir.join("result.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// One (method, round) whose replicates are trained and probed.
#[derive(Clone, Debug, Serialize)]
pub struct Condition {
    /// `dense`, `distilled`, `imp` or `random`.
    pub method: String,
    /// IMP round (0 = dense).
    pub round: usize,
    /// The IMP stage whose output reports this condition's sparsity (none for the dense net):
    /// known only once that stage ran, so it is read when the report is gathered.
    pub sparsity_from: Option<usize>,
    /// The step its replicates were spawned at (0: trained from the start; `[instability]`).
    pub spawn_step: u64,
    /// Replicate training.
    pub train: usize,
    /// Interpolation probe.
    pub interpolate: usize,
    /// Hessian probe (not for the spawned conditions of an instability sweep).
    pub hessian: Option<usize>,
    /// Landscape probe, if the preset asks for one.
    pub landscape: Option<usize>,
}

/// Whether an `lmc` command line reads a dataset (and so takes `--data-dir`): every command that
/// names `--dataset`, and the probes, which default to the data their runs were trained on.
pub fn reads_data(argv: &[String]) -> bool {
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
    /// The step the replicates were spawned at (0: from the start).
    pub spawn_step: u64,
    /// The seed, in a seed sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
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
    /// What the interpolation did with batch-norm running statistics: `none` (the model has no
    /// batch norm), `interpolated` (with the weights, the barriers above), or `both` (also
    /// re-estimated at every point with `--bn-reset`: the `_reset` barriers).
    pub norm_statistics: String,
    /// With `--bn-reset`: mean error barrier with re-estimated running statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_barrier_reset_mean: Option<f64>,
    /// With `--bn-reset`: mean loss barrier with re-estimated running statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_barrier_reset_mean: Option<f64>,
    /// The first pair's first curve (test error and loss along alpha).
    pub interpolation: Vec<CurvePoint>,
    /// Hutchinson trace of replicate 0 (when the preset asks for one).
    pub hessian_trace: Option<f64>,
    /// Its standard error.
    pub hessian_trace_se: Option<f64>,
    /// The Hessian's spectral density of replicate 0 (stochastic Lanczos quadrature, when the
    /// preset asks for `density`): (eigenvalue, density) points.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hessian_density: Vec<(f64, f64)>,
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
    /// In a seed sweep: each condition across seeds.
    pub sweep: Vec<SweepSummary>,
    /// In a seed sweep: conditions compared against the seeds' spread.
    pub comparisons: Vec<Comparison>,
}

/// Mean and sample standard deviation.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct MeanStd {
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1; 0 for one value).
    pub std: f64,
}

impl MeanStd {
    pub(crate) fn of(v: &[f64]) -> Self {
        let n = v.len().max(1) as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = if v.len() > 1 {
            v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        MeanStd { mean, std: var.sqrt() }
    }
}

/// One condition across the seeds of a sweep: each seed's replicate mean, then mean +- std.
#[derive(Clone, Debug, Serialize)]
pub struct SweepSummary {
    /// `METHOD-rROUND`.
    pub condition: String,
    /// Method.
    pub method: String,
    /// IMP round.
    pub round: usize,
    /// The step its replicates were spawned at (0: from the start).
    pub spawn_step: u64,
    /// The seeds.
    pub seeds: Vec<u64>,
    /// Each seed's mean error barrier, in the order of `seeds`.
    pub error_barriers: Vec<f64>,
    /// Sparsity.
    pub sparsity: MeanStd,
    /// Mean test accuracy of the replicates.
    pub test_accuracy: MeanStd,
    /// Mean error barrier.
    pub error_barrier: MeanStd,
    /// Mean loss barrier.
    pub loss_barrier: MeanStd,
}

/// Groups per-seed conditions by (method, round, spawn step), in first-seen order.
fn across_seeds(conds: &[ConditionSummary]) -> Vec<SweepSummary> {
    let mut keys: Vec<(String, usize, u64)> = Vec::new();
    for c in conds {
        if !keys.iter().any(|k| k.0 == c.method && k.1 == c.round && k.2 == c.spawn_step) {
            keys.push((c.method.clone(), c.round, c.spawn_step));
        }
    }
    keys.into_iter()
        .map(|(method, round, spawn_step)| {
            let g: Vec<&ConditionSummary> = conds
                .iter()
                .filter(|c| c.method == method && c.round == round && c.spawn_step == spawn_step)
                .collect();
            let f = |v: fn(&ConditionSummary) -> f64| {
                MeanStd::of(&g.iter().map(|c| v(c)).collect::<Vec<_>>())
            };
            let ks = if spawn_step > 0 { format!("-k{spawn_step}") } else { String::new() };
            SweepSummary {
                condition: format!("{method}-r{round}{ks}"),
                spawn_step,
                seeds: g.iter().filter_map(|c| c.seed).collect(),
                error_barriers: g.iter().map(|c| c.error_barrier_mean).collect(),
                sparsity: f(|c| c.sparsity),
                test_accuracy: f(|c| c.test_accuracy_mean),
                error_barrier: f(|c| c.error_barrier_mean),
                loss_barrier: f(|c| c.loss_barrier_mean),
                method,
                round,
            }
        })
        .collect()
}

/// Two conditions of a seed sweep compared on their error barrier: does the difference exceed
/// the seed-to-seed spread? Welch's two-sided t-test on the per-seed mean barriers (unequal
/// variances; n = seeds per condition), at the 5% level.
#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    /// First condition.
    pub a: String,
    /// Second condition.
    pub b: String,
    /// Mean error barrier of `a` minus that of `b` (a fraction, like the barriers).
    pub difference: f64,
    /// Welch's t statistic (none when neither condition varies across seeds, or with one seed).
    pub t: Option<f64>,
    /// Its Welch-Satterthwaite degrees of freedom.
    pub df: Option<f64>,
    /// Two-sided p-value.
    pub p_value: Option<f64>,
    /// p < 0.05: the difference exceeds what the seeds' spread explains.
    pub exceeds_spread: bool,
}

/// Welch's t-test of two samples: (t, degrees of freedom, two-sided p); none when either has
/// fewer than two values or both have no spread.
pub fn welch(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    use statrs::distribution::{ContinuousCDF, StudentsT};
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (ma, mb) = (MeanStd::of(a), MeanStd::of(b));
    let (va, vb) = (ma.std * ma.std / a.len() as f64, mb.std * mb.std / b.len() as f64);
    let se2 = va + vb;
    if se2.is_nan() || se2 <= 0.0 {
        return None;
    }
    let t = (ma.mean - mb.mean) / se2.sqrt();
    let df = se2 * se2 / (va * va / (a.len() - 1) as f64 + vb * vb / (b.len() - 1) as f64);
    let dist = StudentsT::new(0.0, 1.0, df).ok()?;
    Some((t, df, 2.0 * (1.0 - dist.cdf(t.abs()))))
}

/// The comparisons the report makes in a seed sweep: at each sparsity, distilled-data tickets
/// against real-data IMP, random pruning and (if run) IMP with rewinding; and each swept
/// condition at every spawn step k against itself at k = 0.
pub(crate) fn compare(sweep: &[SweepSummary]) -> Vec<Comparison> {
    let find = |m: &str, r: usize, k: u64| {
        sweep.iter().find(|s| s.method == m && s.round == r && s.spawn_step == k)
    };
    let mut pairs = Vec::new();
    for s in sweep.iter().filter(|s| s.method == "distilled" && s.spawn_step == 0) {
        for other in ["imp", "random", "imp-rewind"] {
            if let Some(o) = find(other, s.round, 0) {
                pairs.push((s, o));
            }
        }
    }
    for s in sweep.iter().filter(|s| s.spawn_step > 0) {
        if let Some(o) = find(&s.method, s.round, 0) {
            pairs.push((o, s));
        }
    }
    pairs
        .into_iter()
        .map(|(a, b)| {
            let w = welch(&a.error_barriers, &b.error_barriers);
            Comparison {
                a: a.condition.clone(),
                b: b.condition.clone(),
                difference: a.error_barrier.mean - b.error_barrier.mean,
                t: w.map(|w| w.0),
                df: w.map(|w| w.1),
                p_value: w.map(|w| w.2),
                exceeds_spread: w.is_some_and(|w| w.2 < 0.05),
            }
        })
        .collect()
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

/// Expands `preset` into its stage graph; nothing runs. `data_dir` is part of every key (as it
/// always was), so a study on another copy of the data is another study.
pub fn plan(preset: &Preset, data_dir: Option<&Path>) -> Result<Graph> {
    let mut b = Builder { nodes: vec![], data_dir, resources: &preset.resources };
    let sweep = !preset.seeds.is_empty();
    let seeds = if sweep { preset.seeds.clone() } else { vec![preset.seed] };
    // Without a sweep the names (and so the keys and folders) are what they always were.
    let sfx = |seed: u64| if sweep { format!("-s{seed}") } else { String::new() };
    let shared = match preset.distill_seed {
        Some(d) => Some(plan_distill(&mut b, preset, d, &sfx(d))?),
        None => None,
    };
    let mut plans = Vec::new();
    for seed in seeds {
        let distill = match shared {
            Some(node) => node,
            None => plan_distill(&mut b, preset, seed, &sfx(seed))?,
        };
        plans.push(plan_seed(&mut b, preset, seed, &sfx(seed), distill)?);
    }
    let g = Graph { nodes: b.nodes, seeds: plans, sweep };
    g.validate()?;
    Ok(g)
}

/// The distillation stage with seed `seed`, named `distill{sfx}`.
fn plan_distill(b: &mut Builder, preset: &Preset, seed: u64, sfx: &str) -> Result<usize> {
    let seed = seed.to_string();
    let mut a =
        lit(&["distill", "--dataset", &preset.dataset, "--model", &preset.model, "--seed", &seed]);
    a.extend(lits(preset.distill.to_args()?));
    a.extend([Arg::Lit("--out".into()), Arg::Own("distilled.lmc".into())]);
    b.add(&format!("distill{sfx}"), "distill", a)
}

/// The stages of one seed's study on the distilled set of stage `distill`; `sfx` ends every
/// stage name.
fn plan_seed(
    b: &mut Builder,
    preset: &Preset,
    seed_n: u64,
    sfx: &str,
    distill: usize,
) -> Result<SeedPlan> {
    let ds = preset.dataset.clone();
    let seed = seed_n.to_string();
    let max_round = *preset.rounds.iter().max().unwrap_or(&0);
    let rounds_arg = max_round.max(1).to_string();
    // 1. IMP on distilled data, on real data.
    let prune_head = || {
        lit(&[
            "prune",
            "--dataset",
            &ds,
            "--model",
            &preset.model,
            "--seed",
            &seed,
            "--rounds",
            &rounds_arg,
        ])
    };
    let mut a = prune_head();
    a.extend([Arg::Lit("--train-set".into()), Arg::In(distill, "distilled.lmc".into())]);
    a.extend(lits(preset.prune_distilled.to_args()?));
    a.extend([Arg::Lit("--out-dir".into()), Arg::Own("tickets".into())]);
    let prune_distilled = b.add(&format!("prune-distilled{sfx}"), "prune-distilled", a)?;
    let mut a = prune_head();
    a.extend(lits(preset.prune.to_args()?));
    a.extend([Arg::Lit("--out-dir".into()), Arg::Own("tickets".into())]);
    let prune_real = b.add(&format!("prune-real{sfx}"), "prune", a)?;
    let prune_rewind = match preset.imp_rewind_step {
        Some(k) => {
            let mut a = prune_head();
            a.extend(lits(preset.prune.to_args()?));
            a.extend(lit(&["--rewind-step", &k.to_string()]));
            a.extend([Arg::Lit("--out-dir".into()), Arg::Own("tickets".into())]);
            Some(b.add(&format!("prune-real-rewind{sfx}"), "prune", a)?)
        }
        None => None,
    };
    let ticket = |r: usize| format!("tickets/round-{r:02}.lmc");
    // 2. Conditions: dense, then per round distilled / imp / random (ticket node, file).
    // (method, round, IMP stage that reports its sparsity, (ticket stage, ticket file)).
    // The fifth field, the spawn step, is added below.
    type Planned<'a> = (&'a str, usize, Option<usize>, (usize, String), u64);
    type Base<'a> = (&'a str, usize, Option<usize>, (usize, String));
    let mut conds: Vec<Base> = vec![("dense", 0, None, (prune_real, ticket(0)))];
    for &r in preset.rounds.iter().filter(|&&r| r > 0) {
        conds.push(("distilled", r, Some(prune_distilled), (prune_distilled, ticket(r))));
        conds.push(("imp", r, Some(prune_real), (prune_real, ticket(r))));
        let mut a = lit(&["prune", "random", "--seed", &seed]);
        a.extend([Arg::Lit("--like".into()), Arg::In(prune_real, ticket(r))]);
        a.extend([Arg::Lit("--out".into()), Arg::Own("random.lmc".into())]);
        let rs = b.add(&format!("random-r{r}{sfx}"), "random", a)?;
        conds.push(("random", r, Some(prune_real), (rs, "random.lmc".into())));
        if let Some(pr) = prune_rewind {
            conds.push(("imp-rewind", r, Some(pr), (pr, ticket(r))));
        }
    }
    // Spawned copies of the swept conditions (`[instability]`), after the conditions.
    let swept: Vec<Planned> = match &preset.instability {
        Some(ins) => ins
            .steps
            .iter()
            .flat_map(|&k| {
                conds
                    .iter()
                    .filter(|c| ins.conditions.contains(&format!("{}-r{}", c.0, c.1)))
                    .map(move |c| (c.0, c.1, c.2, (c.3 .0, c.3 .1.clone()), k))
            })
            .collect(),
        None => vec![],
    };
    let conds: Vec<Planned> =
        conds.into_iter().map(|(m, r, s, t)| (m, r, s, t, 0)).chain(swept).collect();
    // 3. Replicates and probes per condition.
    let reps = preset.replicates.to_string();
    let mut conditions = Vec::new();
    for (method, round, sparsity_from, (tnode, tfile), spawn) in conds {
        let ks = if spawn > 0 { format!("-k{spawn}") } else { String::new() };
        let label = format!("{method}-r{round}{ks}{sfx}");
        let mut a = lit(&["train", "--dataset", &ds, "--replicates", &reps, "--seed", &seed]);
        a.extend([Arg::Lit("--ticket".into()), Arg::In(tnode, tfile)]);
        a.extend(lits(preset.train.to_args()?));
        if spawn > 0 {
            a.extend(lit(&["--spawn-step", &spawn.to_string()]));
        }
        a.extend([Arg::Lit("--out".into()), Arg::Own("runs".into())]);
        let train = b.add(&format!("train-{label}"), "train", a)?;
        let rep = |i: usize| Arg::In(train, format!("runs/replicate-{i}.lmc"));
        let mut a = lit(&["probe", "interpolate"]);
        a.extend((0..preset.replicates).map(rep));
        a.extend(lits(preset.interpolate.to_args()?));
        a.extend([Arg::Lit("--out".into()), Arg::Own("interpolate.lmc".into())]);
        let interpolate = b.add(&format!("interpolate-{label}"), "interpolate", a)?;
        let mut a = lit(&["probe", "hessian"]);
        a.push(rep(0));
        a.extend(lits(preset.hessian.to_args()?));
        a.extend([Arg::Lit("--out".into()), Arg::Own("hessian.lmc".into())]);
        let hessian =
            if spawn == 0 { Some(b.add(&format!("hessian-{label}"), "hessian", a)?) } else { None };
        let landscape = if (method == "dense" || method == "distilled")
            && spawn == 0
            && preset.landscape_rounds.contains(&round)
        {
            let mut a = lit(&["probe", "landscape"]);
            a.push(rep(0));
            a.extend(lits(preset.landscape.to_args()?));
            a.extend([Arg::Lit("--out".into()), Arg::Own("landscape.lmc".into())]);
            Some(b.add(&format!("landscape-{label}"), "landscape", a)?)
        } else {
            None
        };
        conditions.push(Condition {
            method: method.into(),
            round,
            sparsity_from,
            spawn_step: spawn,
            train,
            interpolate,
            hessian,
            landscape,
        });
    }
    Ok(SeedPlan { seed: seed_n, distill, prune_distilled, prune_real, prune_rewind, conditions })
}

/// Gathers the report's numbers from the finished stages of `g` under `out`. `ran[i]` says
/// whether node `i` ran in this invocation (the rest were found done).
pub fn gather(
    g: &Graph,
    preset: &Preset,
    out: &Path,
    ran: &[bool],
) -> Result<(Results, Diagonals)> {
    let stages: Vec<StageOut> = g
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let dir = n.dir_in(out);
            let record = load_record(&dir).with_context(|| {
                format!(
                    "stage {} is not done: no readable {}",
                    n.name,
                    dir.join("result.json").display()
                )
            })?;
            Ok(StageOut { name: n.name.clone(), dir, key: n.key.clone(), record, cached: !ran[i] })
        })
        .collect::<Result<_>>()?;
    let imp_round = |record: &RoundRecord| ImpRound {
        remaining: 1.0 - record.sparsity,
        record: record.clone(),
    };
    let mut results = Results { preset: Some(preset.clone()), ..Default::default() };
    let mut diagonals = Vec::new();
    // Images each stage processed: the distillation's, an IMP search's last round (its running
    // total), a replicate group's sum; probes and random masks train nothing.
    let mut images_seen = std::collections::HashMap::new();
    for sp in &g.seeds {
        let sfx = if g.sweep { format!("-s{}", sp.seed) } else { String::new() };
        let rounds_distilled = stages[sp.prune_distilled].output::<PruneOutput>()?.rounds;
        let rounds_real = stages[sp.prune_real].output::<PruneOutput>()?.rounds;
        let distill = stages[sp.distill].output::<DistillSummary>()?;
        let last_round = |r: &[RoundRecord]| r.last().map(|x| x.images_processed);
        images_seen.insert(sp.distill, Some(distill.images_processed));
        images_seen.insert(sp.prune_distilled, last_round(&rounds_distilled));
        images_seen.insert(sp.prune_real, last_round(&rounds_real));
        let rounds_rewind = match sp.prune_rewind {
            Some(i) => stages[i].output::<PruneOutput>()?.rounds,
            None => vec![],
        };
        if let Some(i) = sp.prune_rewind {
            images_seen.insert(i, last_round(&rounds_rewind));
        }
        let sparsity_of = |node: Option<usize>, r: usize| -> Result<f64> {
            let Some(node) = node else { return Ok(0.0) };
            let rounds = match node {
                n if n == sp.prune_distilled => &rounds_distilled,
                n if Some(n) == sp.prune_rewind => &rounds_rewind,
                _ => &rounds_real,
            };
            rounds
                .iter()
                .find(|x| x.round == r)
                .map(|x| x.sparsity)
                .with_context(|| format!("IMP reported no round {r}"))
        };
        // The distillation and IMP plots show the first seed's searches.
        if results.distill.is_none() {
            results.imp_rounds = ImpRounds {
                distilled: rounds_distilled.iter().map(imp_round).collect(),
                imp: rounds_real.iter().map(imp_round).collect(),
            };
            results.distill = Some(distill);
        }
        for c in &sp.conditions {
            let ks = if c.spawn_step > 0 { format!("-k{}", c.spawn_step) } else { String::new() };
            let label = format!("{}-r{}{ks}{sfx}", c.method, c.round);
            let tr = &stages[c.train];
            let mut accs = Vec::new();
            let mut images = 0;
            for i in 0..preset.replicates {
                let path = tr.dir.join(format!("runs/replicate-{i}.lmc"));
                let (_, run) = artifact::read::<Run>(&path)
                    .with_context(|| format!("stage {}: reading {}", tr.name, path.display()))?;
                accs.push(run.final_test_accuracy());
                // A spawned replicate counts its parent's images, which were processed once
                // for all of them.
                images += run.images_seen - if i > 0 { run.start.images_before() } else { 0 };
            }
            images_seen.insert(c.train, Some(images));
            let ip = &stages[c.interpolate];
            let ProbeResult::Interpolation(interp) = ip.probe("interpolate.lmc")? else {
                bail!("stage {}: interpolate.lmc holds another probe", ip.name);
            };
            let hessian = match c.hessian {
                Some(h) => {
                    let hs = &stages[h];
                    let ProbeResult::Hessian(hessian) = hs.probe("hessian.lmc")? else {
                        bail!("stage {}: hessian.lmc holds another probe", hs.name);
                    };
                    if let Some(d) = &hessian.diagonal {
                        diagonals.push((label.clone(), d.iter().map(|&x| x as f64).collect()));
                    }
                    Some(hessian)
                }
                None => None,
            };
            let trace = hessian.as_ref().and_then(|h| h.trace.as_ref());
            if let Some(l) = c.landscape {
                let ls = &stages[l];
                let ProbeResult::Landscape(result) = ls.probe("landscape.lmc")? else {
                    bail!("stage {}: landscape.lmc holds another probe", ls.name);
                };
                results.landscapes.push(LandscapeSummary { condition: label.clone(), result });
            }
            let barriers = interp.summary.first().with_context(|| {
                format!("stage {}: the interpolation has no barrier summary", ip.name)
            })?;
            let reset = interp.reset_summary.first();
            let norm_statistics = match (interp.norm_statistics.as_str(), reset) {
                (s, _) if s.starts_with("none") => "none",
                (_, Some(_)) => "both",
                _ => "interpolated",
            };
            let curve =
                interp.pairs.first().and_then(|p| p.curves.first()).with_context(|| {
                    format!("stage {}: the interpolation has no curve", ip.name)
                })?;
            results.conditions.push(ConditionSummary {
                condition: label,
                method: c.method.clone(),
                round: c.round,
                spawn_step: c.spawn_step,
                seed: g.sweep.then_some(sp.seed),
                sparsity: sparsity_of(c.sparsity_from, c.round)?,
                test_accuracy_mean: accs.iter().sum::<f64>() / accs.len().max(1) as f64,
                test_accuracy: accs,
                error_barrier_mean: barriers.error_barrier.mean,
                loss_barrier_mean: barriers.loss_barrier.mean,
                l2_distance_mean: interp.l2_distance.mean,
                norm_statistics: norm_statistics.into(),
                error_barrier_reset_mean: reset.map(|r| r.error_barrier.mean),
                loss_barrier_reset_mean: reset.map(|r| r.loss_barrier.mean),
                interpolation: curve.points.clone(),
                hessian_trace: trace.map(|t| t.trace),
                hessian_trace_se: trace.map(|t| t.trace_se),
                hessian_density: hessian
                    .as_ref()
                    .map_or(vec![], |h| lmc_probe::density::curve(&h.density)),
            });
        }
    }
    results.compute = stages
        .iter()
        .enumerate()
        .map(|(i, s)| StageCompute {
            stage: s.name.clone(),
            seconds: s.record.seconds,
            images_processed: images_seen.get(&i).copied().flatten(),
            cached: s.cached,
        })
        .collect();
    if g.sweep {
        results.sweep = across_seeds(&results.conditions);
        results.comparisons = compare(&results.sweep);
    }
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
    fn the_digits_graph_lists_every_stage_and_edge_before_anything_runs() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let (preset, _) = load_preset("digits", root).unwrap();
        let g = plan(&preset, None).unwrap();
        // distill, 2 IMP searches, 2 random masks; 7 conditions x (train, interpolate, hessian);
        // 2 landscapes.
        assert_eq!(g.nodes.len(), 5 + 7 * 3 + 2);
        assert_eq!(g.edges().len(), 1 + 2 + 7 * 3 + 2);
        assert_eq!(g.seeds.len(), 1);
        assert_eq!(g.seeds[0].conditions.len(), 7);
        // Inputs come first, and every input path names a file in a parent's folder.
        for (i, n) in g.nodes.iter().enumerate() {
            assert!(n.inputs.iter().all(|&p| p < i));
            for &a in &n.path_args {
                let arg = &n.argv[a];
                assert!(
                    arg.starts_with(&n.dir)
                        || n.inputs.iter().any(|&p| arg.starts_with(&g.nodes[p].dir)),
                    "{}: {arg}",
                    n.name
                );
            }
        }
        // The sweep is a DAG: everything downstream of the distilled IMP search.
        let down: Vec<&str> = g
            .dependants(g.seeds[0].prune_distilled)
            .iter()
            .map(|&i| g.nodes[i].name.as_str())
            .collect();
        assert!(down.contains(&"train-distilled-r4") && down.contains(&"landscape-distilled-r4"));
        assert!(!down.iter().any(|n| n.contains("imp") || n.contains("random")));
        // Resources: per-kind defaults, overridable from the preset.
        let mut p2 = preset.clone();
        p2.resources.insert("train".into(), Resources { cpus: Some(8), ..Default::default() });
        let g2 = plan(&p2, None).unwrap();
        let t = g2.nodes.iter().find(|n| n.name == "train-dense-r0").unwrap();
        assert_eq!(t.resources.cpus, 8);
        assert_eq!(t.key, g.nodes.iter().find(|n| n.name == "train-dense-r0").unwrap().key);
        // A hand-broken graph is refused.
        let mut bad = g.clone();
        bad.nodes[0].inputs.push(3);
        assert!(bad.validate().unwrap_err().to_string().contains("distill"));
    }

    #[test]
    fn a_preset_on_cifar100_passes_the_name_to_every_stage_that_reads_real_data() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let (mut preset, _) = load_preset("digits", root).unwrap();
        preset.dataset = "cifar100".into();
        let g = plan(&preset, None).unwrap();
        let named: Vec<&str> = g
            .nodes
            .iter()
            .filter(|n| n.argv.windows(2).any(|w| w == ["--dataset", "cifar100"]))
            .map(|n| n.name.as_str())
            .collect();
        assert!(named.contains(&"distill") && named.contains(&"train-dense-r0"), "{named:?}");
        assert!(!g.nodes.iter().any(|n| n.argv.iter().any(|a| a == "digits")));
    }

    #[test]
    fn a_seed_sweep_expands_into_one_study_per_seed() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let (mut preset, _) = load_preset("digits", root).unwrap();
        let single = plan(&preset, None).unwrap();
        preset.seeds = vec![0, 1, 2];
        let g = plan(&preset, None).unwrap();
        assert!(g.sweep);
        assert_eq!(g.nodes.len(), 3 * single.nodes.len());
        assert_eq!(g.edges().len(), 3 * single.edges().len());
        assert!(g.nodes.iter().any(|n| n.name == "train-imp-r4-s2"));
        assert!(g.nodes.iter().any(|n| n.argv.windows(2).any(|w| w == ["--seed", "1"])));
        // Seed 0's study is another study than the single-seed one only by its names.
        assert_ne!(g.nodes[0].key, single.nodes[0].key);
        let m = MeanStd::of(&[1.0, 2.0, 3.0]);
        assert_eq!((m.mean, m.std), (2.0, 1.0));
        assert_eq!(MeanStd::of(&[0.5]).std, 0.0);
        // `distill_seed`: one distillation for the whole sweep, the very stage seed 0 ran.
        preset.distill_seed = Some(0);
        let shared = plan(&preset, None).unwrap();
        assert_eq!(shared.nodes.len(), g.nodes.len() - 2);
        let distills: Vec<_> =
            shared.nodes.iter().filter(|n| n.name.starts_with("distill")).collect();
        assert_eq!(distills.len(), 1);
        assert_eq!(distills[0].key, g.nodes[g.seeds[0].distill].key);
        assert!(shared.seeds.iter().all(|s| s.distill == shared.seeds[0].distill));
        // Everything of seed 1 that does not read the distilled set keeps its key.
        let key =
            |g: &Graph, name: &str| g.nodes.iter().find(|n| n.name == name).unwrap().key.clone();
        assert_eq!(key(&shared, "train-imp-r4-s1"), key(&g, "train-imp-r4-s1"));
        assert_ne!(key(&shared, "prune-distilled-s1"), key(&g, "prune-distilled-s1"));
        let p1 = shared.nodes.iter().find(|n| n.name == "prune-distilled-s1").unwrap();
        assert!(p1.argv.iter().any(|a| a.contains("distill-s0-")), "{:?}", p1.argv);
        assert!(p1.argv.windows(2).any(|w| w == ["--seed", "1"]));
    }

    #[test]
    fn an_instability_sweep_spawns_copies_of_the_named_conditions() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let (mut preset, _) = load_preset("digits", root).unwrap();
        let single = plan(&preset, None).unwrap();
        preset.instability = Some(Instability {
            steps: vec![10, 100],
            conditions: vec!["dense-r0".into(), "imp-r4".into()],
        });
        preset.imp_rewind_step = Some(50);
        let g = plan(&preset, None).unwrap();
        // + 2 steps x 2 conditions x (train, interpolate), no Hessians for spawned copies;
        // + IMP with rewinding, and its tickets at rounds 4 and 9 x (train, interpolate, hessian).
        assert_eq!(g.nodes.len(), single.nodes.len() + 8 + 1 + 6);
        let node = |name: &str| g.nodes.iter().find(|n| n.name == name).unwrap();
        let spawned = node("train-dense-r0-k10");
        assert!(spawned.argv.windows(2).any(|w| w == ["--spawn-step", "10"]));
        // The spawned copies start from the condition's own starting point.
        assert_eq!(spawned.inputs, node("train-dense-r0").inputs);
        assert_eq!(node("train-imp-r4-k100").inputs, node("train-imp-r4").inputs);
        assert!(!g.nodes.iter().any(|n| n.name.starts_with("hessian-dense-r0-k")));
        assert!(node("prune-real-rewind").argv.windows(2).any(|w| w == ["--rewind-step", "50"]));
        let c = &g.seeds[0].conditions;
        assert_eq!(c.iter().filter(|c| c.spawn_step > 0).count(), 4);
        assert!(c.iter().any(|c| c.method == "imp-rewind" && c.round == 9));
        // The unswept stages are the same stages (same keys, so their caches carry over).
        assert_eq!(
            node("train-dense-r0").key,
            single.nodes[single.seeds[0].conditions[0].train].key
        );
    }

    #[test]
    fn bad_instability_settings_name_the_preset_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let text = std::fs::read_to_string(root.join("presets/digits.toml")).unwrap();
        let p = dir.path().join("bad.toml");
        for (extra, want) in [
            ("[instability]\nsteps = [0, 10]\n", "steps: 0"),
            ("[instability]\nsteps = [10, 10]\n", "steps: 10"),
            ("[instability]\nsteps = [10]\nconditions = [\"imp-r5\"]\n", "no condition imp-r5"),
            ("[instability]\nsteps = [10]\nconditions = [\"imp-rewind-r4\"]\n", "imp-rewind-r4"),
        ] {
            std::fs::write(&p, format!("{text}\n{extra}")).unwrap();
            let e = format!("{:#}", load_preset(p.to_str().unwrap(), root).unwrap_err());
            assert!(e.contains("bad.toml") && e.contains(want), "{e}");
        }
        std::fs::write(&p, text.replace("seed = 0\n", "seed = 0\nimp_rewind_step = 0\n")).unwrap();
        let e = format!("{:#}", load_preset(p.to_str().unwrap(), root).unwrap_err());
        assert!(e.contains("imp_rewind_step"), "{e}");
    }

    #[test]
    fn welchs_test_matches_the_closed_form_for_four_degrees_of_freedom() {
        // [1, 2, 3] vs [4, 5, 6]: means 2 and 5, variances 1, so se^2 = 2/3, t = -3/sqrt(2/3)
        // = -3.6742 and the Welch-Satterthwaite df = (2/3)^2 / (2 (1/3)^2 / 2) = 4. Student's
        // t CDF for 4 degrees of freedom has the closed form
        // F(t) = 1/2 + 3/8 x (1 - t^2 / (12 (1 + t^2/4))), x = t / sqrt(1 + t^2/4),
        // which gives a two-sided p = 0.0213116.
        let (t, df, p) = welch(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert!((t + 3.674_234_614).abs() < 1e-8, "{t}");
        assert!((df - 4.0).abs() < 1e-12, "{df}");
        assert!((p - 0.021_311_641).abs() < 1e-7, "{p}");
        assert!(welch(&[1.0], &[2.0, 3.0]).is_none(), "one seed has no spread");
        assert!(welch(&[1.0, 1.0], &[2.0, 2.0]).is_none(), "no spread at all");
        let s = |m: &str, k: u64, b: &[f64]| SweepSummary {
            condition: format!("{m}-r4-k{k}"),
            method: m.into(),
            round: if m == "dense" { 0 } else { 4 },
            spawn_step: k,
            seeds: vec![0, 1, 2],
            error_barriers: b.to_vec(),
            sparsity: MeanStd::of(&[0.0]),
            test_accuracy: MeanStd::of(&[0.9]),
            error_barrier: MeanStd::of(b),
            loss_barrier: MeanStd::of(&[0.0]),
        };
        let sweep = [
            s("dense", 0, &[0.3, 0.35, 0.32]),
            s("dense", 100, &[0.01, 0.02, 0.015]),
            s("distilled", 0, &[0.05, 0.06, 0.055]),
            s("imp", 0, &[0.06, 0.05, 0.057]),
            s("random", 0, &[0.30, 0.31, 0.33]),
        ];
        let c = compare(&sweep);
        let pair = |a: &str, b: &str| c.iter().find(|x| x.a.starts_with(a) && x.b.starts_with(b));
        assert!(pair("distilled", "random").unwrap().exceeds_spread);
        assert!(!pair("distilled", "imp").unwrap().exceeds_spread);
        assert!(pair("dense-r4-k0", "dense-r4-k100").unwrap().exceeds_spread);
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn an_unknown_preset_key_is_an_error() {
        let dir = std::env::temp_dir().join(format!("lmc-preset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let text = std::fs::read_to_string(root.join("presets/digits.toml")).unwrap();
        let p = dir.join("typo.toml");
        std::fs::write(&p, text.replace("replicates = 2", "replicate = 2")).unwrap();
        let e = format!("{:#}", load_preset(p.to_str().unwrap(), root).unwrap_err());
        assert!(e.contains("replicate"), "{e}");
        std::fs::write(&p, format!("{text}\n[resources.trian]\ncpus = 1\n")).unwrap();
        let e = format!("{:#}", load_preset(p.to_str().unwrap(), root).unwrap_err());
        assert!(e.contains("trian"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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
