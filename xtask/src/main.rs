//! `cargo xtask`: project automation in Rust (the rust-analyzer pattern), so it runs wherever
//! cargo does.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

mod plot;

#[derive(Parser)]
#[command(name = "xtask", about = "Project automation for lmc")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole study end to end (not built yet: see the pipeline issue).
    Pipeline,
    /// Smoke-render the plot kinds into a folder (development aid).
    PlotDemo {
        /// Output folder.
        out: std::path::PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Pipeline => bail!("`cargo xtask pipeline` is not implemented yet; run the stages by hand (see README.md)"),
        Cmd::PlotDemo { out } => {
            std::fs::create_dir_all(&out)?;
            let s = vec![plot::Series { name: "dense".into(), points: vec![(0.0, 0.9), (0.5, 0.95), (1.0, 0.97)] }];
            plot::lines(&out.join("lines.svg"), "demo", "x (units)", "y (units)", &s)?;
            let xs: Vec<f64> = (0..5).map(|i| i as f64).collect();
            let z: Vec<Vec<f64>> = (0..5).map(|r| (0..5).map(|c| (r * c) as f64).collect()).collect();
            plot::heatmap(&out.join("heat.svg"), "demo", "x", "y", &xs, &xs, &z, "loss")?;
            plot::histogram(&out.join("hist.svg"), "demo", "value", &[("a".into(), vec![1.0, 2.0, 2.5, 3.0])], 10)?;
            Ok(())
        }
    }
}
