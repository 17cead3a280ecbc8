//! `cargo xtask`: project automation in Rust (the rust-analyzer pattern), so it runs wherever
//! cargo does.
//!
//! - `cargo xtask pipeline [--preset NAME|FILE] [--data-dir DIR] [--out DIR] [--fresh]`: the whole
//!   study as a stage graph (see `pipeline.rs`; `--plan [--json]` prints it, `--status` shows
//!   each stage's state), run by an executor (see `exec.rs`: `--jobs N` locally, or
//!   `--executor slurm [--partition P] [--account A] [--sbatch-arg X]... [--wait SECONDS]`), then
//!   the report (see `report.rs`).
//! - `cargo xtask same-summary A B`: whether two summary.json files hold the same numbers.
//! - `cargo xtask bench`: every criterion bench, then `lmc bench`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod exec;
mod findings;
mod pipeline;
mod plot;
mod report;

#[derive(Parser)]
#[command(name = "xtask", about = "Project automation for lmc")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Executor {
    Local,
    Slurm,
}

#[derive(Subcommand)]
enum Cmd {
    /// Distill -> prune (distilled, real, random) -> train replicates -> probe -> report.
    Pipeline {
        /// A preset name (presets/NAME.toml: digits, digits-resnet, digits-seeds, mnist-lenet,
        /// fmnist-convnet, cifar10-convnet, cifar10-resnet20, cifar10-resnet18)
        /// or the path of a preset file.
        #[arg(long, default_value = "digits")]
        preset: String,
        /// Data folder for file-based datasets [default: $LMC_DATA_DIR, then ./data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Output folder [default: runs/pipeline-PRESET].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Forget every cached stage and run everything again.
        #[arg(long)]
        fresh: bool,
        /// Print the stage graph (stages, commands, inputs, resources) and run nothing.
        #[arg(long)]
        plan: bool,
        /// With --plan: print it as JSON.
        #[arg(long, requires = "plan")]
        json: bool,
        /// Print each stage's state (done / queued / running / failed with its log / not run).
        #[arg(long, conflicts_with = "plan")]
        status: bool,
        /// Where stages run: `local` (this machine) or `slurm` (one sbatch job per stage).
        #[arg(long, value_enum, default_value = "local")]
        executor: Executor,
        /// Local executor: stages run at once (each gets cores/N threads).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Slurm: `--partition` for every job [default: the preset's [slurm] partition].
        #[arg(long)]
        partition: Option<String>,
        /// Slurm: `--account` for every job [default: the preset's [slurm] account].
        #[arg(long)]
        account: Option<String>,
        /// Slurm: an extra sbatch argument (repeatable), after the preset's `sbatch_args`.
        #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
        sbatch_args: Vec<String>,
        /// Slurm: after submitting, wait up to this many seconds for every stage, then write the
        /// report (without it, run the command again once the jobs are done).
        #[arg(long)]
        wait: Option<u64>,
    },
    /// Run one stage from its `stage.json` (what a Slurm job executes).
    #[command(hide = true)]
    RunStage {
        /// The stage's `stage.json`.
        spec: PathBuf,
    },
    /// Compare two summary.json files, ignoring timings and cache flags (exit 1 if they differ).
    SameSummary {
        /// First summary.json.
        a: PathBuf,
        /// Second summary.json.
        b: PathBuf,
    },
    /// Run the criterion benches of every stage, then `lmc bench`.
    Bench,
    /// Open a report in headless Chromium and check that it loads with every plot present.
    CheckReport {
        /// The report folder [default: runs/pipeline-digits/report].
        dir: Option<PathBuf>,
    },
}

/// The checkout this run works in, found at run time: the workspace of the package cargo ran
/// (`CARGO_MANIFEST_DIR` in the environment `cargo run`, hence `cargo xtask`, gives the process),
/// else the nearest folder above the current one that is an lmc checkout. Never the path baked
/// in at compile time: with a target folder shared between checkouts, a binary built in one
/// would otherwise run that checkout's presets and `lmc` from any other.
fn root() -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current folder")?;
    find_root(std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).as_deref(), &cwd)
        .with_context(|| {
            format!(
                "{} is not inside an lmc checkout (a folder with Cargo.toml and xtask/): run `cargo xtask` from the checkout",
                cwd.display()
            )
        })
}

/// [`root`] from the environment's package folder `manifest_dir` (xtask/ of a checkout) and the
/// current folder `cwd`.
fn find_root(manifest_dir: Option<&Path>, cwd: &Path) -> Option<PathBuf> {
    let is_checkout =
        |d: &Path| d.join("Cargo.toml").is_file() && d.join("xtask/Cargo.toml").is_file();
    manifest_dir
        .and_then(Path::parent)
        .filter(|d| is_checkout(d))
        .or_else(|| cwd.ancestors().find(|d| is_checkout(d)))
        .map(Path::to_path_buf)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Builds the `lmc` binary and returns its path as cargo reports it (the `executable` of the
/// compiler-artifact message), so `CARGO_TARGET_DIR`, `--target-dir` in a config file or a
/// custom profile location all work: the path is never guessed from the workspace root.
fn build_lmc(root: &Path) -> Result<PathBuf> {
    let out = cargo()
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "lmc-cli",
            "--bin",
            "lmc",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("starting cargo to build lmc")?;
    if !out.status.success() {
        bail!("building lmc failed ({})", out.status);
    }
    let lmc = lmc_executable(&String::from_utf8_lossy(&out.stdout)).context(
        "cargo built lmc-cli but reported no `lmc` executable (is the `lmc` [[bin]] still there?)",
    )?;
    if !lmc.is_file() {
        bail!("cargo reported the lmc binary at {}, but no file is there", lmc.display());
    }
    Ok(lmc)
}

/// The `lmc` executable named in cargo's `--message-format=json` output, if any.
fn lmc_executable(messages: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "lmc")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Pipeline {
            preset,
            data_dir,
            out,
            fresh,
            plan,
            json,
            status,
            executor,
            jobs,
            partition,
            account,
            sbatch_args,
            wait,
        } => {
            let root = root()?;
            let (preset, path) = pipeline::load_preset(&preset, &root)?;
            let out =
                out.unwrap_or_else(|| root.join("runs").join(format!("pipeline-{}", preset.name)));
            // Absolute, so a job that starts in another folder (or on another node) finds it.
            let out = std::path::absolute(&out)?;
            let data_dir = data_dir.or_else(|| std::env::var_os("LMC_DATA_DIR").map(PathBuf::from));
            let graph = pipeline::plan(&preset, data_dir.as_deref())?;
            if plan {
                if json {
                    println!("{}", serde_json::to_string_pretty(&graph.plan_json())?);
                } else {
                    print!("{}", graph.plan_text());
                }
                return Ok(());
            }
            if status {
                exec::print_status(&graph, &out);
                return Ok(());
            }
            if executor == Executor::Slurm && !exec::on_path("sbatch") {
                bail!("--executor slurm: no `sbatch` on PATH (install slurm-client, or run on a login node); nothing was submitted");
            }
            // One pipeline per output folder: a second one would redo (and race on) every
            // stage the first is running.
            let _lock = lmc_train::artifact::OutputLock::acquire(&out).map_err(|e| {
                anyhow::anyhow!("{e} (another `cargo xtask pipeline` on this --out)")
            })?;
            if fresh {
                let _ = std::fs::remove_dir_all(out.join("stages"));
            }
            let lmc = build_lmc(&root)?;
            eprintln!(
                "[pipeline] preset {} ({}) -> {}: {} stages",
                preset.name,
                path.display(),
                out.display(),
                graph.nodes.len()
            );
            let t = Instant::now();
            let data_dir = data_dir.map(|d| std::path::absolute(&d)).transpose()?;
            let env = exec::Env { lmc, out: out.clone(), data_dir };
            let ran = match executor {
                Executor::Local => exec::run_local(&graph, &env, jobs.into())?,
                Executor::Slurm => {
                    let mut opts = preset.slurm.clone();
                    opts.partition = partition.or(opts.partition);
                    opts.account = account.or(opts.account);
                    opts.sbatch_args.extend(sbatch_args);
                    let before = exec::done(&graph, &out);
                    let xtask = std::env::current_exe().context("locating the xtask binary")?;
                    let n = exec::submit(&graph, &env, &opts, &xtask)?;
                    eprintln!("[pipeline] submitted {n} jobs");
                    match wait {
                        Some(s) => exec::wait(&graph, &out, Duration::from_secs(s))?,
                        None => {
                            if !exec::done(&graph, &out).iter().all(|d| *d) {
                                eprintln!("[pipeline] not waiting (--wait SECONDS); see --status, and run the same command again once every stage is done to write the report");
                                return Ok(());
                            }
                        }
                    }
                    before.iter().map(|d| !d).collect()
                }
            };
            let (results, diagonals) = pipeline::gather(&graph, &preset, &out, &ran)?;
            let png = graph.nodes[graph.seeds[0].distill].dir_in(&out).join("distilled.png");
            let png = Some(png).filter(|p| p.exists());
            report::write(&out.join("report"), &results, &diagonals, png.as_deref())
                .context("writing the report")?;
            let n_ran = ran.iter().filter(|r| **r).count();
            eprintln!(
                "[pipeline] {} stages ({n_ran} run, {} cached) in {:.1} s; report: {}",
                ran.len(),
                ran.len() - n_ran,
                t.elapsed().as_secs_f64(),
                out.join("report/index.html").display()
            );
            Ok(())
        }
        Cmd::RunStage { spec } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("reading {}", spec.display()))?;
            let spec: exec::StageSpec = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a stage spec", spec.display()))?;
            // Under Slurm the stage gets the cores it asked for.
            let threads = std::env::var("SLURM_CPUS_PER_TASK").ok().and_then(|v| v.parse().ok());
            exec::run_stage(&spec, threads)?;
            Ok(())
        }
        Cmd::SameSummary { a, b } => {
            let read = |p: &Path| -> Result<serde_json::Value> {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading {}", p.display()))?;
                Ok(serde_json::from_str(&text)?)
            };
            // summary.json lies in OUT/report/; artifact paths in it start with OUT.
            let root = |p: &Path| -> Result<String> {
                let abs = std::path::absolute(p)?;
                Ok(abs
                    .parent()
                    .and_then(Path::parent)
                    .map_or(String::new(), |r| r.display().to_string()))
            };
            let d = exec::summary_diffs(&read(&a)?, &read(&b)?, [&root(&a)?, &root(&b)?]);
            if d.is_empty() {
                println!("same numbers (timings and cache flags aside)");
                Ok(())
            } else {
                for x in d.iter().take(40) {
                    println!("  {x}");
                }
                bail!("{} differences", d.len())
            }
        }
        Cmd::CheckReport { dir } => {
            let dir = match dir {
                Some(d) => d,
                None => root()?.join("runs/pipeline-digits/report"),
            };
            check_report(&dir)
        }
        Cmd::Bench => {
            let root = root()?;
            let st = cargo().current_dir(&root).args(["bench", "--workspace"]).status()?;
            if !st.success() {
                bail!("cargo bench failed");
            }
            let lmc = build_lmc(&root)?;
            let st = Command::new(lmc).args(["bench", "--threads", "2"]).status()?;
            if !st.success() {
                bail!("lmc bench failed");
            }
            Ok(())
        }
    }
}

/// Loads `dir/index.html` in headless Chromium (Debian's `chromium`), dumps the DOM it built, and
/// checks that the page rendered its tables and that every image it references exists and is a
/// well-formed SVG/PNG file.
/// `dir` may be the report folder or the pipeline's output folder that holds `report/`.
fn check_report(dir: &Path) -> Result<()> {
    let nested = dir.join("report");
    let dir = if !dir.join("index.html").exists() && nested.join("index.html").exists() {
        nested.as_path()
    } else {
        dir
    };
    let index = dir.join("index.html").canonicalize().with_context(|| {
        format!(
            "{}: no index.html (give the report folder, or the pipeline's --out folder)",
            dir.display()
        )
    })?;
    let profile = std::env::temp_dir().join(format!("lmc-chromium-{}", std::process::id()));
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("file://{}", index.display()))
        .output()
        .context("running chromium (apt-get install chromium)")?;
    let _ = std::fs::remove_dir_all(&profile);
    if !out.status.success() {
        bail!("chromium failed on {}: {}", index.display(), String::from_utf8_lossy(&out.stderr));
    }
    let dom = String::from_utf8_lossy(&out.stdout);
    if !dom.contains("<table>") || !dom.contains("<h1>") {
        bail!("{}: the rendered page has no heading or table", index.display());
    }
    let mut images = 0;
    for part in dom.split("<img src=\"").skip(1) {
        let src = part.split('"').next().unwrap_or("");
        let bytes = std::fs::read(dir.join(src))
            .with_context(|| format!("image {src} referenced by the report is missing"))?;
        let ok = if src.ends_with(".svg") {
            String::from_utf8_lossy(&bytes).contains("</svg>")
        } else {
            bytes.starts_with(b"\x89PNG")
        };
        if !ok {
            bail!("image {src} is not a complete SVG/PNG file");
        }
        images += 1;
    }
    eprintln!(
        "[check-report] {}: rendered by chromium, {images} images present and well-formed",
        index.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preset_help_names_every_shipped_preset() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let help = cmd
            .find_subcommand_mut("pipeline")
            .expect("the pipeline subcommand")
            .render_long_help()
            .to_string();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        for e in std::fs::read_dir(root.join("presets")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_stem().unwrap().to_str().unwrap().to_string();
            let listed =
                help.split(|c: char| !(c.is_alphanumeric() || c == '-')).any(|w| w == name);
            assert!(listed, "`xtask pipeline --help` does not name the preset {name}");
        }
    }

    #[test]
    fn the_checkout_is_found_at_run_time() {
        let tmp = tempfile::tempdir().unwrap();
        let checkout = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(d.join("xtask")).unwrap();
            std::fs::create_dir_all(d.join("presets/sub")).unwrap();
            std::fs::write(d.join("Cargo.toml"), "[workspace]\n").unwrap();
            std::fs::write(d.join("xtask/Cargo.toml"), "[package]\n").unwrap();
            d
        };
        let (a, b) = (checkout("a"), checkout("b"));
        // cargo's environment names the package it ran: its checkout wins over the folder.
        assert_eq!(find_root(Some(&b.join("xtask")), &a.join("presets/sub")), Some(b.clone()));
        // Without it (the binary run directly), the checkout around the current folder.
        assert_eq!(find_root(None, &a.join("presets/sub")), Some(a.clone()));
        // A package folder that is no checkout is not trusted.
        assert_eq!(find_root(Some(&tmp.path().join("x/xtask")), &b), Some(b.clone()));
        assert_eq!(find_root(None, tmp.path()), None);
    }

    #[test]
    fn the_lmc_path_is_read_from_cargos_messages() {
        // Shape of `cargo build --message-format=json` lines (cargo's documented output).
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"lmc_train","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"lmc","kind":["bin"]},"executable":"/some/where/release/lmc"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(lmc_executable(msgs), Some(PathBuf::from("/some/where/release/lmc")));
        assert_eq!(lmc_executable(r#"{"reason":"build-finished","success":true}"#), None);
    }
}
