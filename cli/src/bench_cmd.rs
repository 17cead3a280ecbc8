//! `lmc bench` (being written).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `lmc bench`.
#[derive(Args)]
pub struct BenchArgs {}

pub fn run(_a: BenchArgs) -> Result<()> {
    bail!("lmc bench is not implemented yet")
}
