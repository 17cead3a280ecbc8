//! `lmc bench`: images per second on the reference workloads of
//! `shared/bench/torch_reference.py`, printed like that script so the two compare in one run.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use lmc_train::bench;
use serde_json::json;

use crate::bench_vs;

/// Arguments of `lmc bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Worker threads (rayon pool size) [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Timed repeats per workload (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Scale the script's step counts (20 steps, x50 for LeNet, /4 for ResNet-18, /5 for
    /// evaluation) by this factor.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Only these workloads (lenet_mnist_b128, convnet3_cifar_b128, convnet3_mnist_b128,
    /// convnet3_cifar_eval_b1000, resnet20_cifar_b128, resnet18_cifar_b128,
    /// resnet20_cifar_eval_b1000).
    #[arg(long, num_args = 1..)]
    only: Vec<String>,
    /// Print one JSON object like the PyTorch reference script.
    #[arg(long)]
    json: bool,
    /// Side by side with PyTorch's reference script (e.g. ../shared/bench/torch_reference.py):
    /// lmc and the script alternate, each run its own process, lmc first and last; prints each
    /// workload's runs, the ratios of adjacent runs and their median, each process's peak
    /// resident memory, and when and on what CPU it ran.
    #[arg(long, value_name = "SCRIPT")]
    vs_torch: Option<PathBuf>,
    /// With --vs-torch: PyTorch runs (lmc runs one more).
    #[arg(long, default_value_t = 3, requires = "vs_torch")]
    rounds: usize,
    /// With --vs-torch: the Python interpreter that runs the script (with torch installed).
    #[arg(long, default_value = "python3", requires = "vs_torch")]
    python: String,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let all = bench::workloads();
    for o in &a.only {
        if !all.iter().any(|w| w.name == o) {
            let names: Vec<&str> = all.iter().map(|w| w.name).collect();
            bail!("--only {o}: unknown workload (expected one of {})", names.join(", "));
        }
    }
    // Written so that NaN is rejected too.
    if a.scale.is_nan() || a.scale <= 0.0 {
        bail!("--scale {}: must be positive", a.scale);
    }
    let selected =
        || all.iter().filter(|w| a.only.is_empty() || a.only.iter().any(|o| o == w.name));
    if let Some(script) = &a.vs_torch {
        // Both sides get the same explicit count (0, like no --threads, means all cores).
        let threads = a.threads.filter(|&t| t > 0).unwrap_or_else(rayon::current_num_threads);
        return bench_vs::run(&bench_vs::Plan {
            script,
            python: &a.python,
            rounds: a.rounds,
            threads,
            // `lmc bench` counts 0 repeats as 1; the script would fail on none.
            repeats: a.repeats.max(1),
            scale: a.scale,
            workloads: selected().map(|w| w.name).collect(),
            json: a.json,
        });
    }
    let pool = rayon::ThreadPoolBuilder::new().num_threads(a.threads.unwrap_or(0)).build()?;
    let threads = pool.current_num_threads();
    let mut rates = serde_json::Map::new();
    let mut gflops = serde_json::Map::new();
    for w in selected() {
        let steps = ((w.steps as f64 * a.scale).round() as usize).max(1);
        let m = pool.install(|| bench::measure(w, steps, a.repeats));
        if !a.json {
            println!("{:<28} {:>12.1} images/s {:>8.1} GFLOP/s", m.name, m.images_per_s, m.gflops);
        }
        rates.insert(m.name.into(), json!((m.images_per_s * 10.0).round() / 10.0));
        gflops.insert(m.name.into(), json!((m.gflops * 10.0).round() / 10.0));
    }
    if a.json {
        println!(
            "{}",
            json!({"engine": format!("lmc {}", env!("CARGO_PKG_VERSION")), "threads": threads, "images_per_s": rates, "gflops": gflops})
        );
    }
    Ok(())
}
