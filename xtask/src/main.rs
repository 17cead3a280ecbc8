//! `cargo xtask`: project automation in Rust (the rust-analyzer pattern), so it runs wherever
//! cargo does.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Pipeline => bail!("`cargo xtask pipeline` is not implemented yet; run the stages by hand (see README.md)"),
    }
}
