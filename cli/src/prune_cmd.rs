//! `lmc prune` (being written).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `lmc prune`.
#[derive(Args)]
pub struct PruneArgs {}

pub fn run(_a: PruneArgs) -> Result<()> {
    bail!("lmc prune is not implemented yet")
}
