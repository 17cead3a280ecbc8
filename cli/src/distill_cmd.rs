//! `lmc distill` (being written).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `lmc distill`.
#[derive(Args)]
pub struct DistillArgs {}

pub fn run(_a: DistillArgs) -> Result<()> {
    bail!("lmc distill is not implemented yet")
}
