//! `lmc export` / `lmc import` (being written).

use anyhow::{bail, Result};
use clap::Args;

/// Arguments of `lmc export`.
#[derive(Args)]
pub struct ExportArgs {}
/// Arguments of `lmc import`.
#[derive(Args)]
pub struct ImportArgs {}

pub fn export(_a: ExportArgs) -> Result<()> {
    bail!("lmc export is not implemented yet")
}
pub fn import(_a: ImportArgs) -> Result<()> {
    bail!("lmc import is not implemented yet")
}
