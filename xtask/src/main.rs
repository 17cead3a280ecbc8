//! `cargo xtask`: project automation in Rust (the rust-analyzer pattern), so it runs wherever
//! cargo does.
//!
//! - `cargo xtask pipeline [--preset NAME|FILE] [--data-dir DIR] [--out DIR] [--fresh]`: the whole
//!   study (see `pipeline.rs`), then the report (see `report.rs`).
//! - `cargo xtask bench`: every criterion bench, then `lmc bench`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod pipeline;
mod plot;
mod report;

#[derive(Parser)]
#[command(name = "xtask", about = "Project automation for lmc")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Distill -> prune (distilled, real, random) -> train replicates -> probe -> report.
    Pipeline {
        /// A preset name (presets/NAME.toml: digits, mnist-lenet, fmnist-convnet, cifar10-convnet)
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
    },
    /// Run the criterion benches of every stage, then `lmc bench`.
    Bench,
    /// Open a report in headless Chromium and check that it loads with every plot present.
    CheckReport {
        /// The report folder [default: runs/pipeline-digits/report].
        dir: Option<PathBuf>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
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
    let root = root();
    match Cli::parse().command {
        Cmd::Pipeline { preset, data_dir, out, fresh } => {
            let (preset, path) = pipeline::load_preset(&preset, &root)?;
            let out =
                out.unwrap_or_else(|| root.join("runs").join(format!("pipeline-{}", preset.name)));
            if fresh {
                let _ = std::fs::remove_dir_all(out.join("stages"));
            }
            let lmc = build_lmc(&root)?;
            eprintln!(
                "[pipeline] preset {} ({}) -> {}",
                preset.name,
                path.display(),
                out.display()
            );
            let t = Instant::now();
            let data_dir = data_dir.or_else(|| std::env::var_os("LMC_DATA_DIR").map(PathBuf::from));
            let mut runner = pipeline::Runner { lmc, out: out.clone(), data_dir, log: vec![] };
            let (results, diagonals) = pipeline::run(&mut runner, &preset)?;
            let png = runner
                .log
                .iter()
                .find(|s| s.name == "distill")
                .map(|s| s.dir.join("distilled.png"))
                .filter(|p| p.exists());
            report::write(&out.join("report"), &results, &diagonals, png.as_deref())
                .context("writing the report")?;
            let ran = runner.log.iter().filter(|s| !s.cached).count();
            eprintln!(
                "[pipeline] {} stages ({ran} run, {} cached) in {:.1} s; report: {}",
                runner.log.len(),
                runner.log.len() - ran,
                t.elapsed().as_secs_f64(),
                out.join("report/index.html").display()
            );
            Ok(())
        }
        Cmd::CheckReport { dir } => {
            check_report(&dir.unwrap_or_else(|| root.join("runs/pipeline-digits/report")))
        }
        Cmd::Bench => {
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
    fn the_lmc_path_is_read_from_cargos_messages() {
        // Shape of `cargo build --message-format=json` lines (cargo's documented output).
        let msgs = r#"{"reason":"compiler-artifact","target":{"name":"lmc_train","kind":["lib"]},"executable":null}
{"reason":"compiler-artifact","target":{"name":"lmc","kind":["bin"]},"executable":"/some/where/release/lmc"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(lmc_executable(msgs), Some(PathBuf::from("/some/where/release/lmc")));
        assert_eq!(lmc_executable(r#"{"reason":"build-finished","success":true}"#), None);
    }
}
