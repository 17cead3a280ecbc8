//! The baselines: a random mask at a ticket's sparsity (same starting parameters), and a ticket's
//! mask with freshly initialised parameters.

use lmc_train::artifact::Provenance;
use lmc_train::params::{Layout, Mask};
use lmc_train::seed::{self, Stream};
use lmc_train::Result;
use rand::Rng;

use crate::ticket::{sparsity_of, Origin, Ticket};

/// Sub-stream index of random masks (`Stream::Other`).
pub const RANDOM_MASK: u64 = 1 << 41;

/// A uniformly random mask with the sparsity of `like`.
///
/// - `layerwise`: every prunable tensor keeps exactly as many weights as in `like`, chosen
///   uniformly within the tensor (OpenLTH's `randomly_prune` with `layerwise`).
/// - global: the tensors `like` left dense stay dense (e.g. an output layer kept unpruned); the
///   others are pooled and keep, all together, as many weights as they do in `like`, chosen
///   uniformly over the pool.
pub fn random_mask(layout: &Layout, like: &Mask, layerwise: bool, seed: u64) -> Result<Mask> {
    like.validate(layout)?;
    let mut rng = seed::rng(seed, Stream::Other, RANDOM_MASK);
    let mut out = Mask::dense(layout);
    let pruned: Vec<_> = layout
        .entries
        .iter()
        .filter(|e| e.prunable() && like.keep[e.range()].iter().any(|k| !k))
        .collect();
    let pools: Vec<Vec<usize>> = if layerwise {
        pruned.iter().map(|e| e.range().collect()).collect()
    } else {
        vec![pruned.iter().flat_map(|e| e.range()).collect()]
    };
    for mut pool in pools {
        let kept = pool.iter().filter(|&&i| like.keep[i]).count();
        // Partial Fisher–Yates: the first `kept` positions of a uniform shuffle are kept.
        for i in 0..kept {
            let j = rng.gen_range(i..pool.len());
            pool.swap(i, j);
        }
        for &i in &pool[kept..] {
            out.keep[i] = false;
        }
    }
    Ok(out)
}

/// Ticket `like` with a random mask of its sparsity (see [`random_mask`]); starting parameters,
/// data record and images processed are `like`'s. Untrained: no test accuracy.
pub fn random_ticket(
    like: &Ticket,
    like_provenance: Provenance,
    layerwise: bool,
    seed: u64,
) -> Result<Ticket> {
    let mask = random_mask(&like.model.layout, &like.mask, layerwise, seed)?;
    let (sparsity, layers) = sparsity_of(&like.model, &mask);
    Ok(Ticket {
        mask,
        sparsity,
        layers,
        origin: Origin::RandomMask { like: like_provenance, layerwise, seed },
        ..untrained(like)
    })
}

/// Ticket `like`'s mask with parameters freshly initialised from `seed` (random re-initialisation).
pub fn reinit_ticket(like: &Ticket, like_provenance: Provenance, seed: u64) -> Ticket {
    Ticket {
        rewind: like.model.init(seed),
        init_seed: seed,
        rewind_step: 0,
        origin: Origin::Reinit { like: like_provenance, seed },
        ..untrained(like)
    }
}

fn untrained(like: &Ticket) -> Ticket {
    Ticket {
        train_config: None,
        data_seed: None,
        trained: None,
        test_accuracy: None,
        curve: vec![],
        seconds: 0.0,
        ..like.clone()
    }
}

/// Provenance of a baseline ticket derived from `like`.
pub fn baseline_provenance(origin: &Origin, like: Provenance) -> Provenance {
    lmc_train::stage::provenance("prune-baseline", crate::imp::VERSION, origin, &[like])
}
