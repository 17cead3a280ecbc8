//! Executors of the stage graph: `local` (a pool of `--jobs` workers on this machine) and `slurm`
//! (one `sbatch` job per stage, chained with `--dependency=afterok`). Both run a stage the same
//! way, through [`run_stage`], so a stage's folder, log and `result.json` do not depend on where
//! it ran, and the cache keys agree.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::pipeline::{load_record, reads_data, Graph, SlurmOptions, StageRecord};

/// Everything a stage needs to run, written to `stage.json` in its folder for a Slurm job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageSpec {
    /// Stage label.
    pub name: String,
    /// Its folder (absolute).
    pub dir: PathBuf,
    /// The `lmc` arguments, paths absolute.
    pub argv: Vec<String>,
    /// The `lmc` binary.
    pub lmc: PathBuf,
    /// `--data-dir` for stages that read data.
    pub data_dir: Option<PathBuf>,
}

/// Where the stages run: the binary, the output folder, the data.
pub struct Env {
    /// The `lmc` binary.
    pub lmc: PathBuf,
    /// The pipeline's output folder (absolute, so jobs started elsewhere find it).
    pub out: PathBuf,
    /// `--data-dir` for every stage that reads data.
    pub data_dir: Option<PathBuf>,
}

impl Env {
    /// The spec of node `i`.
    pub fn spec(&self, g: &Graph, i: usize) -> StageSpec {
        let n = &g.nodes[i];
        StageSpec {
            name: n.name.clone(),
            dir: n.dir_in(&self.out),
            argv: n.argv_in(&self.out),
            lmc: self.lmc.clone(),
            data_dir: self.data_dir.clone(),
        }
    }
}

/// Runs one stage: `lmc ARGV --json` in its folder with stdout and stderr in `log.txt`, then
/// `result.json` (written last, atomically: its presence means done). `threads` sets the stage's
/// RAYON_NUM_THREADS (lmc's results do not depend on it).
pub fn run_stage(spec: &StageSpec, threads: Option<usize>) -> Result<StageRecord> {
    let name = &spec.name;
    std::fs::create_dir_all(&spec.dir)
        .with_context(|| format!("creating {}", spec.dir.display()))?;
    let log_path = spec.dir.join("log.txt");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(&spec.lmc);
    cmd.args(&spec.argv).arg("--json");
    let mut shown = format!("lmc {} --json", spec.argv.join(" "));
    if let Some(d) = &spec.data_dir {
        if reads_data(&spec.argv) {
            cmd.arg("--data-dir").arg(d);
            shown += &format!(" --data-dir {}", d.display());
        }
    }
    if let Some(t) = threads {
        cmd.env("RAYON_NUM_THREADS", t.to_string());
        shown = format!("RAYON_NUM_THREADS={t} {shown}");
    }
    writeln!(log, "{shown}")?;
    eprintln!("[pipeline] {name}: {shown}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log.try_clone()?);
    let t = Instant::now();
    let output = cmd.output().map_err(|e| {
        anyhow::anyhow!("stage {name}: cannot start the lmc binary {}: {e}", spec.lmc.display())
    })?;
    let seconds = t.elapsed().as_secs_f64();
    writeln!(log, "--- stdout ---")?;
    log.write_all(&output.stdout)?;
    drop(log);
    if !output.status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        // The end of lmc's stderr (what it said before failing), without the stdout marker.
        let stderr = text.split("\n--- stdout ---").next().unwrap_or("");
        let tail: Vec<&str> =
            stderr.lines().filter(|l| !l.trim().is_empty()).rev().take(4).collect();
        bail!(
            "stage {name} failed ({}); its log: {}\n{}",
            output.status,
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let output: Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!("stage {name}: lmc printed no JSON (its log: {})", log_path.display())
    })?;
    let record = StageRecord { stage: name.clone(), argv: spec.argv.clone(), seconds, output };
    let tmp = spec.dir.join(".result.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&record)?)?;
    std::fs::rename(&tmp, spec.dir.join("result.json"))?;
    eprintln!("[pipeline] {name}: done in {seconds:.1} s");
    Ok(record)
}

/// Which nodes are done (their `result.json` is readable).
pub fn done(g: &Graph, out: &Path) -> Vec<bool> {
    g.nodes.iter().map(|n| load_record(&n.dir_in(out)).is_some()).collect()
}

/// Runs every stage not yet done, up to `jobs` at a time, each with `cores / jobs` threads. A
/// stage starts when its inputs are done; a failed stage's dependants never start, the others
/// go on, and the error lists each failure with its log. Returns which nodes ran.
pub fn run_local(g: &Graph, env: &Env, jobs: usize) -> Result<Vec<bool>> {
    let jobs = jobs.max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / jobs).max(1);
    let mut is_done = done(g, &env.out);
    for (n, d) in g.nodes.iter().zip(&is_done) {
        if *d {
            eprintln!("[pipeline] {}: up to date ({})", n.name, n.dir_in(&env.out).display());
        }
    }
    let mut ran = vec![false; g.nodes.len()];
    let mut started = is_done.clone();
    let mut failures: Vec<(usize, anyhow::Error)> = Vec::new();
    let (tx, rx) = mpsc::channel::<(usize, Result<StageRecord>)>();
    std::thread::scope(|scope| {
        let mut running = 0;
        loop {
            // Start ready stages in graph order (a single worker runs them as the sequential
            // pipeline did).
            for (i, node) in g.nodes.iter().enumerate() {
                if running >= jobs {
                    break;
                }
                if started[i] || !node.inputs.iter().all(|&p| is_done[p]) {
                    continue;
                }
                started[i] = true;
                running += 1;
                let spec = env.spec(g, i);
                let tx = tx.clone();
                let t = if jobs == 1 { None } else { Some(threads) };
                scope.spawn(move || {
                    let _ = tx.send((i, run_stage(&spec, t)));
                });
            }
            if running == 0 {
                break;
            }
            let (i, r) = rx.recv().expect("a worker always reports");
            running -= 1;
            match r {
                Ok(_) => {
                    is_done[i] = true;
                    ran[i] = true;
                }
                Err(e) => {
                    eprintln!("[pipeline] {e:#}");
                    failures.push((i, e));
                }
            }
        }
    });
    if !failures.is_empty() {
        let mut msg = String::new();
        for (i, e) in &failures {
            let skipped = g.dependants(*i).len();
            msg += &format!("{e:#}\n  ({skipped} stages that depend on it were not run)\n");
        }
        bail!("{} stage(s) failed:\n{msg}", failures.len());
    }
    Ok(ran)
}

/// Whether `prog` is an executable file on PATH.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
}

/// A stage's state as Slurm and its folder say.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// `result.json` is there.
    Done,
    /// Its job waits in the queue.
    Queued(String),
    /// Its job runs.
    Running(String),
    /// Its job left the queue without writing `result.json`.
    Failed(String),
    /// Never submitted (or never run).
    Missing,
}

/// The job id recorded in a stage folder by the last submission.
fn job_file(dir: &Path) -> PathBuf {
    dir.join("slurm-job")
}

/// `squeue` states of this user's jobs, by id. Empty when squeue is not installed or fails (then
/// no job counts as live, and a rerun would resubmit: better than never finishing).
fn queue() -> HashMap<String, String> {
    let Ok(out) = Command::new("squeue").args(["-h", "--me", "-o", "%i %T"]).output() else {
        return HashMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.to_string(), b.trim().to_string())))
        .collect()
}

/// The state of every node.
pub fn states(g: &Graph, out: &Path) -> Vec<State> {
    let q = queue();
    g.nodes
        .iter()
        .map(|n| {
            let dir = n.dir_in(out);
            if load_record(&dir).is_some() {
                return State::Done;
            }
            let Ok(id) = std::fs::read_to_string(job_file(&dir)) else {
                return State::Missing;
            };
            let id = id.trim().to_string();
            match q.get(&id).map(String::as_str) {
                Some("PENDING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED" | "SUSPENDED") => {
                    State::Queued(id)
                }
                Some("RUNNING" | "CONFIGURING" | "COMPLETING" | "RESIZING" | "SIGNALING") => {
                    State::Running(id)
                }
                _ => State::Failed(id),
            }
        })
        .collect()
}

/// Prints each stage's state (done / queued / running / failed with its log / not run).
pub fn print_status(g: &Graph, out: &Path) -> Vec<State> {
    let st = states(g, out);
    for (n, s) in g.nodes.iter().zip(&st) {
        let dir = n.dir_in(out);
        let what = match s {
            State::Done => "done".to_string(),
            State::Queued(id) => format!("queued (job {id})"),
            State::Running(id) => format!("running (job {id})"),
            State::Failed(id) => {
                format!("failed (job {id}); log: {}", dir.join("log.txt").display())
            }
            State::Missing => "not run".to_string(),
        };
        println!("{:<28} {what}", n.name);
    }
    let count = |f: fn(&State) -> bool| st.iter().filter(|s| f(s)).count();
    println!(
        "{} stages: {} done, {} queued, {} running, {} failed, {} not run",
        st.len(),
        count(|s| *s == State::Done),
        count(|s| matches!(s, State::Queued(_))),
        count(|s| matches!(s, State::Running(_))),
        count(|s| matches!(s, State::Failed(_))),
        count(|s| *s == State::Missing)
    );
    st
}

/// Submits every stage that is neither done nor queued/running, each depending (`afterok`) on
/// its inputs' jobs. Returns how many were submitted.
pub fn submit(g: &Graph, env: &Env, opts: &SlurmOptions, xtask: &Path) -> Result<usize> {
    let st = states(g, &env.out);
    let mut job: Vec<Option<String>> = st
        .iter()
        .map(|s| match s {
            State::Queued(id) | State::Running(id) => Some(id.clone()),
            _ => None,
        })
        .collect();
    let mut submitted = 0;
    for (i, n) in g.nodes.iter().enumerate() {
        if matches!(st[i], State::Done | State::Queued(_) | State::Running(_)) {
            continue;
        }
        let spec = env.spec(g, i);
        std::fs::create_dir_all(&spec.dir)?;
        std::fs::write(spec.dir.join("stage.json"), serde_json::to_vec_pretty(&spec)?)?;
        // The job runs the same code as the local executor, in the xtask binary that submitted
        // it (so the cluster needs this binary, lmc and OUT on a shared filesystem).
        let script = spec.dir.join("job.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec {} run-stage {}\n",
                sh_quote(&xtask.display().to_string()),
                sh_quote(&spec.dir.join("stage.json").display().to_string())
            ),
        )?;
        let r = &n.resources;
        let mut cmd = Command::new("sbatch");
        cmd.args(["--parsable", "--job-name", &format!("lmc-{}", n.name)])
            .arg(format!("--chdir={}", spec.dir.display()))
            .arg(format!("--output={}", spec.dir.join("slurm-%j.out").display()))
            .arg(format!("--cpus-per-task={}", r.cpus))
            .arg(format!("--mem={}M", r.mem_mb))
            .arg(format!("--time={}", r.time_min));
        if let Some(p) = &opts.partition {
            cmd.arg(format!("--partition={p}"));
        }
        if let Some(a) = &opts.account {
            cmd.arg(format!("--account={a}"));
        }
        cmd.args(&opts.sbatch_args);
        let deps: Vec<&str> = n.inputs.iter().filter_map(|&p| job[p].as_deref()).collect();
        if !deps.is_empty() {
            // A dependency that can never be met (a parent failed) cancels the job instead of
            // leaving it pending forever.
            cmd.arg(format!("--dependency=afterok:{}", deps.join(":")));
            cmd.arg("--kill-on-invalid-dep=yes");
        }
        cmd.arg(&script);
        let out = cmd.output().context("running sbatch")?;
        if !out.status.success() {
            bail!(
                "sbatch refused stage {} ({}): {}",
                n.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            bail!("sbatch printed no job id for stage {}: {text:?}", n.name);
        }
        std::fs::write(job_file(&spec.dir), &id)?;
        eprintln!("[pipeline] {}: submitted as job {id}", n.name);
        job[i] = Some(id);
        submitted += 1;
    }
    Ok(submitted)
}

/// Polls until every stage is done (Ok), or nothing is queued or running while some stage is
/// not done (an error naming each failed stage and its log), or `timeout` passes.
pub fn wait(g: &Graph, out: &Path, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let st = states(g, out);
        if st.iter().all(|s| *s == State::Done) {
            return Ok(());
        }
        let live = st.iter().any(|s| matches!(s, State::Queued(_) | State::Running(_)));
        if !live {
            // The queue may lag a finishing job by a moment: look once more before failing.
            std::thread::sleep(Duration::from_secs(2));
            let st = states(g, out);
            if st.iter().all(|s| *s == State::Done) {
                return Ok(());
            }
            if !st.iter().any(|s| matches!(s, State::Queued(_) | State::Running(_))) {
                let mut msg = String::new();
                for (n, s) in g.nodes.iter().zip(&st) {
                    if let State::Failed(id) = s {
                        let dir = n.dir_in(out);
                        let log = if dir.join("log.txt").exists() {
                            dir.join("log.txt")
                        } else {
                            dir.join(format!("slurm-{id}.out"))
                        };
                        msg +=
                            &format!("  stage {} (job {id}); its log: {}\n", n.name, log.display());
                    }
                }
                bail!("stages failed or were cancelled (run again to resubmit them):\n{msg}");
            }
        }
        if t.elapsed() > timeout {
            bail!(
                "the graph is not done after {:.0} s; jobs are still queued or running (see --status, run again to build the report)",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Differences between two `summary.json` values, ignoring wall times and cache flags; strings
/// are compared with each run's output folder (`roots`) replaced, since artifact paths name it.
pub fn summary_diffs(a: &Value, b: &Value, roots: [&str; 2]) -> Vec<String> {
    fn walk(a: &Value, b: &Value, path: &str, roots: [&str; 2], out: &mut Vec<String>) {
        const IGNORE: [&str; 3] = ["seconds", "eval_seconds", "cached"];
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys.into_iter().filter(|k| !IGNORE.contains(&k.as_str())) {
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => walk(u, v, &format!("{path}.{k}"), roots, out),
                        _ => out.push(format!("{path}.{k}: only in one")),
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) => {
                if x.len() != y.len() {
                    out.push(format!("{path}: length {} vs {}", x.len(), y.len()));
                }
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(u, v, &format!("{path}[{i}]"), roots, out);
                }
            }
            (Value::String(x), Value::String(y))
                if !roots[0].is_empty()
                    && x.replace(roots[0], "OUT") == y.replace(roots[1], "OUT") => {}
            _ if a == b => {}
            _ => out.push(format!("{path}: {a} vs {b}")),
        }
    }
    let mut out = Vec::new();
    walk(a, b, "", roots, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_differ_only_in_numbers_not_in_timings() {
        let a: Value = serde_json::from_str(
            r#"{"x": [1.5, {"seconds": 3.0, "cached": true, "y": 2}], "z": "s"}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"x": [1.5, {"seconds": 9.0, "cached": false, "y": 2}], "z": "s"}"#,
        )
        .unwrap();
        assert!(summary_diffs(&a, &b, ["", ""]).is_empty());
        let c: Value = serde_json::from_str(r#"{"x": [1.5000001, {"y": 2}], "z": "s"}"#).unwrap();
        let d = summary_diffs(&a, &c, ["", ""]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with(".x[0]"));
        let p = |s: &str| serde_json::json!({ "path": s });
        assert!(summary_diffs(&p("/a/stages/x"), &p("/b/c/stages/x"), ["/a", "/b/c"]).is_empty());
        assert_eq!(summary_diffs(&p("/a/stages/x"), &p("/b/stages/y"), ["/a", "/b"]).len(), 1);
    }

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(sh_quote("a'b"), "'a'\\''b'");
    }
}
