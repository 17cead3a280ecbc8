//! `lmc-prune`: sparse subnetworks by iterative magnitude pruning (IMP), on real or distilled data,
//! and their random baselines, written as `Ticket` artifacts.
//!
//! - [`rule`]: global / layer-wise magnitude pruning, `ceil(rate x remaining)` per round
//!   (OpenLTH's rule), per-layer rates, unpruned layers, deterministic tie-breaking.
//! - [`imp`]: the IMP loop (train, prune, rewind to theta0 or theta_k, retrain), one ticket per
//!   round, resumable by round and epoch.
//! - [`random`]: random masks at a ticket's sparsity (global or per layer) and random
//!   re-initialisation of a ticket's mask.
//! - [`ticket`]: the [`Ticket`] artifact.
//!
//! ```no_run
//! use lmc_prune::imp::{Imp, ImpConfig, Rewind, SilentImp};
//! use lmc_prune::rule::PruneRule;
//! use lmc_train::{data, fit::TrainConfig, model::{Model, ModelSpec}};
//! let (ds, prov) = data::resolve_dataset("digits", None).unwrap();
//! let spec: ModelSpec = "mlp:32".parse().unwrap();
//! let model = Model::new(&spec, ds.train.shape, ds.classes).unwrap();
//! let config = ImpConfig {
//!     model: spec, seed: 0, data_seed: 0,
//!     train: TrainConfig { epochs: 5, lr: 0.05, ..Default::default() },
//!     rule: PruneRule::global(0.2), rewind_step: 0, rewind: Rewind::Weights,
//! };
//! let imp = Imp { config, model: &model, data: &ds, data_provenance: prov, from: None,
//!                 out_dir: std::path::Path::new("runs/imp"), fresh: false };
//! for r in imp.run(5, &mut SilentImp).unwrap() {
//!     println!("round {}: sparsity {:.3}, test accuracy {:.4}", r.round, r.sparsity, r.test_accuracy);
//! }
//! ```
#![deny(missing_docs)]

use std::path::Path;

use lmc_train::artifact::{self, Header};

pub mod imp;
pub mod random;
pub mod rule;
pub mod ticket;

pub use ticket::{read_ticket, Ticket};

/// JSON summary of a Ticket artifact, for `lmc inspect`.
pub fn inspect_summary(
    path: &Path,
    header: &Header,
    payload: &[u8],
) -> lmc_train::Result<serde_json::Value> {
    let t: Ticket = artifact::decode(path, header, payload)?;
    t.validate(path)?;
    Ok(t.summary())
}
