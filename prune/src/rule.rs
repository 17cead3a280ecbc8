//! Magnitude pruning: which of the remaining weights one round removes.
//!
//! OpenLTH's rule (`pruning/sparse_global.py`): a round removes `ceil(rate x remaining)` of the
//! remaining prunable weights, those of smallest magnitude in the trained network. Here a rule
//! splits the prunable tensors into *groups*, each pruned by that rule on its own:
//!
//! - every tensor with a per-layer rate (`--layer-rate fc.weight=0.1`) is its own group at that rate;
//! - tensors listed as unpruned (`--keep-unpruned fc.weight`) are in no group;
//! - the other tensors form one pooled group at the base rate (global pruning), or one group each
//!   (layer-wise pruning).
//!
//! Ties in magnitude are broken by a random key per scalar drawn from
//! `seed::rng(seed, Stream::Other, TIES + round)`, then by position, so the result is a pure
//! function of (trained weights, mask, seed, round) and ties do not favour the first layers.

use std::collections::{BTreeMap, BTreeSet};

use lmc_train::params::{Layout, Mask, ParamVec};
use lmc_train::seed::{self, Stream};
use lmc_train::{Error, Result};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Sub-stream index base of the tie-breaking keys (`Stream::Other`); round `r` uses `TIES + r`.
pub const TIES: u64 = 1 << 40;

/// Whether the base rate applies to all pooled tensors at once or to each tensor on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Scope {
    /// One threshold over all tensors that have no rate of their own (OpenLTH's `sparse_global`).
    Global,
    /// Each tensor loses `ceil(rate x its remaining)` (Frankle & Carbin's LeNet runs).
    Layerwise,
}

/// How one IMP round chooses the weights to remove. Part of an IMP run's identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneRule {
    /// Fraction of the remaining weights removed per round, in (0, 1).
    pub rate: f64,
    /// Global or layer-wise.
    pub scope: Scope,
    /// Tensors pruned at their own rate, each on its own (e.g. `fc.weight` at half the rate).
    pub layer_rates: BTreeMap<String, f64>,
    /// Prunable tensors left dense.
    pub keep_unpruned: BTreeSet<String>,
}

/// A set of tensors pruned together at one rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// Indices into the layout's entries.
    pub tensors: Vec<usize>,
    /// Fraction of the group's remaining weights removed per round.
    pub rate: f64,
}

/// `ceil(rate x remaining)`, the number of weights a round removes from a group.
///
/// The product is computed in f64; when it lies within 1e-9 (relative) of an integer it is taken
/// to be that integer, so that a decimal rate means what it says: `0.2 x 35` is 7 (the plain f64
/// product is 7.000000000000001, whose ceiling would be 8).
pub fn prune_count(rate: f64, remaining: usize) -> usize {
    let x = rate * remaining as f64;
    let nearest = x.round();
    let k = if (x - nearest).abs() <= 1e-9 * nearest.max(1.0) { nearest } else { x.ceil() };
    (k.max(0.0) as usize).min(remaining)
}

/// `label` names the flag and its value, e.g. `--rate 1.5`.
fn check_rate(rate: f64, label: &str) -> Result<()> {
    if rate > 0.0 && rate < 1.0 {
        Ok(())
    } else {
        Err(Error::setting(format!("{label}: a pruning rate must lie strictly between 0 and 1")))
    }
}

/// The prunable tensor called `name`, or an error listing the prunable tensors.
fn prunable_index(layout: &Layout, name: &str, flag: &str) -> Result<usize> {
    let prunable: Vec<&str> =
        layout.entries.iter().filter(|e| e.prunable()).map(|e| e.name.as_str()).collect();
    match layout.entries.iter().position(|e| e.name == name) {
        Some(i) if layout.entries[i].prunable() => Ok(i),
        Some(_) => Err(Error::setting(format!(
            "{flag} {name}: not a prunable tensor (only conv and linear weights are pruned; prunable: {})",
            prunable.join(", ")
        ))),
        None => Err(Error::setting(format!("{flag} {name}: unknown layer (prunable tensors of this model: {})", prunable.join(", ")))),
    }
}

impl PruneRule {
    /// Global pruning at `rate` with no per-layer settings.
    pub fn global(rate: f64) -> PruneRule {
        PruneRule {
            rate,
            scope: Scope::Global,
            layer_rates: BTreeMap::new(),
            keep_unpruned: BTreeSet::new(),
        }
    }

    /// Checks the rates alone (no model needed), naming the flag at fault.
    pub fn check_rates(&self) -> Result<()> {
        check_rate(self.rate, &format!("--rate {}", self.rate))?;
        for (name, &r) in &self.layer_rates {
            check_rate(r, &format!("--layer-rate {name}={r}"))?;
        }
        Ok(())
    }

    /// The groups this rule prunes on `layout`; errors on unknown or non-prunable names, a tensor
    /// given both a rate and `--keep-unpruned`, or nothing left to prune.
    pub fn groups(&self, layout: &Layout) -> Result<Vec<Group>> {
        self.check_rates()?;
        let mut own: BTreeMap<usize, f64> = BTreeMap::new();
        for (name, &r) in &self.layer_rates {
            own.insert(prunable_index(layout, name, "--layer-rate")?, r);
        }
        let mut skip = BTreeSet::new();
        for name in &self.keep_unpruned {
            let i = prunable_index(layout, name, "--keep-unpruned")?;
            if own.contains_key(&i) {
                return Err(Error::setting(format!(
                    "{name} is given both --layer-rate and --keep-unpruned"
                )));
            }
            skip.insert(i);
        }
        let pooled: Vec<usize> = (0..layout.entries.len())
            .filter(|i| layout.entries[*i].prunable() && !own.contains_key(i) && !skip.contains(i))
            .collect();
        let mut groups: Vec<Group> = match self.scope {
            Scope::Global if !pooled.is_empty() => vec![Group { tensors: pooled, rate: self.rate }],
            Scope::Global => vec![],
            Scope::Layerwise => {
                pooled.into_iter().map(|i| Group { tensors: vec![i], rate: self.rate }).collect()
            }
        };
        groups.extend(own.into_iter().map(|(i, rate)| Group { tensors: vec![i], rate }));
        if groups.is_empty() {
            return Err(Error::setting("--keep-unpruned leaves no prunable tensor to prune"));
        }
        Ok(groups)
    }

    /// One pruning round: the mask after removing, from each group, the `ceil(rate x remaining)`
    /// remaining weights of smallest magnitude in `trained`. `seed` and `round` choose the
    /// tie-breaking keys.
    pub fn prune(&self, trained: &ParamVec, mask: &Mask, seed: u64, round: u64) -> Result<Mask> {
        let layout = &trained.layout;
        mask.validate(layout)?;
        let groups = self.groups(layout)?;
        let mut rng = seed::rng(seed, Stream::Other, TIES + round);
        let keys: Vec<u64> = (0..layout.total()).map(|_| rng.next_u64()).collect();
        let mut out = mask.clone();
        for g in &groups {
            // (magnitude, tie key, position) of every remaining weight of the group.
            let mut remaining: Vec<(f32, u64, usize)> = g
                .tensors
                .iter()
                .flat_map(|&t| layout.entries[t].range())
                .filter(|&i| mask.keep[i])
                .map(|i| (trained.data[i].abs(), keys[i], i))
                .collect();
            let k = prune_count(g.rate, remaining.len());
            if k == 0 {
                continue;
            }
            if k < remaining.len() {
                remaining.select_nth_unstable_by(k - 1, |a, b| {
                    a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2))
                });
            }
            for &(_, _, i) in &remaining[..k] {
                out.keep[i] = false;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_count_is_the_exact_ceiling() {
        // ceil(p/q * n) = ceil(p*n / q) in integers.
        for n in 0..2000usize {
            assert_eq!(prune_count(0.2, n), n.div_ceil(5), "n = {n}");
            assert_eq!(prune_count(0.1, n), n.div_ceil(10), "n = {n}");
            assert_eq!(prune_count(0.25, n), n.div_ceil(4), "n = {n}");
            assert_eq!(prune_count(0.3, n), (3 * n).div_ceil(10), "n = {n}");
        }
        assert_eq!(prune_count(0.2, 35), 7);
        assert_eq!(prune_count(0.999, 1), 1);
    }
}
