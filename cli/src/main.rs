//! `lmc`: find sparse subnetworks with distilled data and measure their linear mode connectivity.
//!
//! Each subcommand is one pipeline stage (or a helper around artifacts); stages talk only through
//! `.lmc` artifacts on disk. Errors print as one line on stderr and exit with status 1 (2 for a
//! command line clap rejects); nothing a user types or feeds in ends in a panic.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench_cmd;
mod bench_vs;
mod data_cmd;
mod distill_cmd;
mod inspect;
mod interop_cmd;
mod probe_cmd;
mod progress;
mod prune_cmd;
mod train_cmd;

// A reusing allocator: glibc maps and unmaps the large activation buffers on every step, and each
// fresh 64 MiB buffer costs ~23 ms of page faults (measured 2026-11-27 with `perf stat` on a
// 2-core AMD EPYC VM, AVX2 without AVX-512).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Lottery tickets from distilled data, and their linear mode connectivity.
///
/// Stages, each writing versioned .lmc artifacts the next one reads: `lmc distill` (a few
/// synthetic images per class), `lmc prune` (iterative magnitude pruning on distilled or real
/// data, random baselines), `lmc train` (replicates of a network or ticket on real data),
/// `lmc probe` (interpolation barriers, landscapes, Hessians). `lmc data info` describes a
/// dataset, `lmc inspect` prints any artifact, `lmc export`/`import`/`import-dataset` speak safetensors, and
/// `lmc bench` measures throughput.
/// Data sets are read from --data-dir (default $LMC_DATA_DIR, then ./data); the 8x8 digits set is
/// built in.
#[derive(Parser)]
#[command(name = "lmc", version, about, long_about, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Distill a dataset into a few synthetic images per class (a Dataset artifact).
    Distill(distill_cmd::DistillArgs),
    /// Find sparse subnetworks by iterative magnitude pruning (Ticket artifacts), or random baselines.
    Prune(prune_cmd::PruneArgs),
    /// Train a network (R replicates from one initialisation) and write Run artifacts.
    Train(train_cmd::TrainArgs),
    /// Probe trained runs: interpolation barriers, loss landscapes, Hessian estimates.
    Probe(probe_cmd::ProbeArgs),
    /// Export a run's parameters and mask to safetensors (PyTorch state-dict names).
    Export(interop_cmd::ExportArgs),
    /// Import parameters from safetensors into a Run artifact.
    Import(interop_cmd::ImportArgs),
    /// Import synthetic images and labels (safetensors or .npz) into a Dataset artifact.
    ImportDataset(interop_cmd::ImportDatasetArgs),
    /// Describe datasets.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Measure training/evaluation throughput on the reference workloads (images per second).
    Bench(bench_cmd::BenchArgs),
    /// Print an artifact's header and summary.
    Inspect(inspect::InspectArgs),
}

fn main() -> ExitCode {
    lmc_train::cpu::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Distill(a) => distill_cmd::run(a),
        Command::Prune(a) => prune_cmd::run(a),
        Command::Train(a) => train_cmd::run(a),
        Command::Probe(a) => probe_cmd::run(a),
        Command::Export(a) => interop_cmd::export(a),
        Command::Import(a) => interop_cmd::import(a),
        Command::ImportDataset(a) => interop_cmd::import_dataset(a),
        Command::Data(c) => data_cmd::run(c),
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench_cmd::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes joined.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                // Library errors already print their source; don't repeat it.
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {}", msg.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
