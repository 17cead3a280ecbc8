//! `lmc probe` (being written).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `lmc probe`.
#[derive(Args)]
pub struct ProbeArgs {}

pub fn run(_a: ProbeArgs) -> Result<()> {
    bail!("lmc probe is not implemented yet")
}
