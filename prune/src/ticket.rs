//! The `Ticket` artifact: a sparse subnetwork (mask + the parameters its training starts from),
//! with how it was found.

use std::path::Path;

use lmc_train::artifact::{self, Artifact, Header, Kind, Provenance};
use lmc_train::data::ImageShape;
use lmc_train::fit::{EpochRecord, TrainConfig};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::params::{LayerSparsity, Mask, ParamVec};
use lmc_train::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::imp::ImpConfig;

/// The data a search trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataRecord {
    /// Dataset name (`mnist`, or a distilled set's name such as `mnist-dm-ipc10`).
    pub name: String,
    /// Its provenance (hash of the name for built-in data, the artifact's for a Dataset file).
    pub provenance: Provenance,
    /// Training images per epoch (decoded images for a distilled set).
    pub train_images: usize,
}

/// The ticket an IMP run started from (`--from-ticket`): "distilled then IMP".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    /// The parent ticket's provenance.
    pub provenance: Provenance,
    /// The data that found the parent.
    pub found_with: DataRecord,
    /// The parent's sparsity.
    pub sparsity: f64,
    /// Images the parent's search had processed.
    pub images_processed: u64,
}

/// How a ticket's mask (and its starting parameters) came about.
// One per ticket file: the size of the Imp variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Origin {
    /// Round `round` of iterative magnitude pruning (round 0 = before any pruning), with the
    /// network that round trained (only IMP trains while finding a ticket).
    Imp {
        /// Round number.
        round: usize,
        /// The run's settings (the round's training settings and data-order seed among them).
        config: ImpConfig,
        /// The ticket IMP started from, if any.
        parent: Option<Parent>,
        /// The network trained in this round from `rewind` under `mask`; its magnitudes choose
        /// the next round's mask.
        trained: ParamVec,
        /// Test accuracy (real test split) of `trained`, in [0, 1] (`None` when the data had no
        /// test split to evaluate).
        test_accuracy: Option<f64>,
        /// The round's training curve.
        curve: Vec<EpochRecord>,
    },
    /// A uniformly random mask with the sparsity of ticket `like`, same starting parameters.
    RandomMask {
        /// Provenance of the ticket whose sparsity is copied.
        like: Provenance,
        /// Per-layer kept counts copied (true) or only the total over the pruned layers (false).
        layerwise: bool,
        /// Seed of the random mask.
        seed: u64,
    },
    /// Ticket `like`'s mask with freshly initialised parameters.
    Reinit {
        /// Provenance of the ticket whose mask is kept.
        like: Provenance,
        /// Initialisation seed of the new parameters.
        seed: u64,
    },
}

/// A sparse subnetwork: the `Ticket` artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    /// Architecture bound to its input.
    pub model: Model,
    /// Seed the parameters were first initialised with (theta0).
    pub init_seed: u64,
    /// The parameters training of this subnetwork starts from, *unmasked*: pruned weights keep
    /// their rewind values so that a random mask can start from the same point; training applies
    /// the mask. For IMP round r >= 1 this is the rewind point (theta0, or theta_k) for the
    /// weights and, with weights-only rewinding, the previous round's trained biases and norm
    /// parameters.
    pub rewind: ParamVec,
    /// SGD step the weights were rewound to (0 = initialisation).
    pub rewind_step: u64,
    /// Which scalars are kept.
    pub mask: Mask,
    /// Fraction of prunable weights removed.
    pub sparsity: f64,
    /// Kept / total per prunable tensor.
    pub layers: Vec<LayerSparsity>,
    /// How it was found.
    pub origin: Origin,
    /// The data whose training found the mask (copied from `like` for the baselines).
    pub found_with: DataRecord,
    /// Training images processed by the search up to and including this round (and the parent
    /// search's, for `--from-ticket`). Copied from `like` for the baselines.
    pub images_processed: u64,
    /// Wall-clock seconds spent on this round (the one field that differs between identical runs).
    pub seconds: f64,
}

impl Artifact for Ticket {
    const KIND: Kind = Kind::Ticket;
    // Format 2 moved the IMP-only fields into `Origin::Imp`.
    const MIN_FORMAT: u32 = 2;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        self.check()
    }
}

impl Ticket {
    /// Fraction of prunable weights kept.
    pub fn remaining(&self) -> f64 {
        1.0 - self.sparsity
    }

    /// Checks that every stored vector fits the stored model (what reading a ticket already
    /// checks; kept for callers holding a ticket from elsewhere), naming `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.check().map_err(|msg| Error::bad_file(path, msg))
    }

    /// The model is what its spec makes; mask and parameter vectors fit its layout; parameters
    /// are finite.
    fn check(&self) -> std::result::Result<(), String> {
        self.model.check()?;
        let layout = &self.model.layout;
        self.mask
            .validate(layout)
            .map_err(|e| format!("ticket mask does not fit its model: {e}"))?;
        self.rewind
            .check_same_layout(layout, "ticket rewind parameters")
            .map_err(|e| e.to_string())?;
        if !self.rewind.all_finite() {
            return Err("some rewind parameters are not finite".into());
        }
        self.model.check_state(&self.rewind.data)?;
        if let Some(t) = self.trained() {
            t.check_same_layout(layout, "ticket trained parameters").map_err(|e| e.to_string())?;
            if !t.all_finite() {
                return Err("some trained parameters are not finite".into());
            }
            self.model.check_state(&t.data)?;
        }
        Ok(())
    }

    /// Errors unless this ticket is for `spec` (when given) on `input` images with `classes`
    /// classes, naming the ticket file.
    pub fn check_model(
        &self,
        path: &Path,
        spec: Option<&ModelSpec>,
        input: ImageShape,
        classes: usize,
        data: &str,
    ) -> Result<()> {
        let m = &self.model;
        if let Some(spec) = spec {
            if *spec != m.spec {
                return Err(Error::bad_file(
                    path,
                    format!("this ticket is for model {}, not --model {spec}", m.spec),
                ));
            }
        }
        if m.input != input || m.classes != classes {
            return Err(Error::bad_file(
                path,
                format!(
                    "this ticket is for {} on {}x{}x{} images with {} classes, but {data} has {}x{}x{} images with {classes} classes",
                    m.spec, m.input.channels, m.input.height, m.input.width, m.classes, input.channels, input.height, input.width
                ),
            ));
        }
        Ok(())
    }

    /// The IMP round, if the ticket came from IMP.
    pub fn round(&self) -> Option<usize> {
        match &self.origin {
            Origin::Imp { round, .. } => Some(*round),
            _ => None,
        }
    }

    /// The network IMP trained in this ticket's round (`None` for the baselines).
    pub fn trained(&self) -> Option<&ParamVec> {
        match &self.origin {
            Origin::Imp { trained, .. } => Some(trained),
            _ => None,
        }
    }

    /// Test accuracy of [`Ticket::trained`] (`None` for the baselines).
    pub fn test_accuracy(&self) -> Option<f64> {
        match &self.origin {
            Origin::Imp { test_accuracy, .. } => *test_accuracy,
            _ => None,
        }
    }

    /// Training curve of the IMP round (empty for the baselines).
    pub fn curve(&self) -> &[EpochRecord] {
        match &self.origin {
            Origin::Imp { curve, .. } => curve,
            _ => &[],
        }
    }

    /// Training settings of the IMP round (`None` for the baselines).
    pub fn train_config(&self) -> Option<&TrainConfig> {
        match &self.origin {
            Origin::Imp { config, .. } => Some(&config.train),
            _ => None,
        }
    }

    /// Data-order seed of the IMP round's training (`None` for the baselines).
    pub fn data_seed(&self) -> Option<u64> {
        match &self.origin {
            Origin::Imp { config, .. } => Some(config.data_seed),
            _ => None,
        }
    }

    /// JSON summary (what `lmc inspect` prints).
    pub fn summary(&self) -> serde_json::Value {
        let layers: Vec<_> = self
            .layers
            .iter()
            .map(|l| json!({"name": l.name, "kept": l.kept, "total": l.total, "remaining": l.kept as f64 / l.total.max(1) as f64}))
            .collect();
        let origin = match &self.origin {
            Origin::Imp { round, config, parent, .. } => json!({
                "method": "imp", "round": round, "rule": config.rule, "rewind": config.rewind,
                "rewind_step": config.rewind_step, "seed": config.seed,
                "parent": parent.as_ref().map(|p| json!({"provenance": p.provenance.hex(), "found_with": p.found_with.name, "sparsity": p.sparsity})),
            }),
            Origin::RandomMask { like, layerwise, seed } => {
                json!({"method": "random-mask", "like": like.hex(), "layerwise": layerwise, "seed": seed})
            }
            Origin::Reinit { like, seed } => {
                json!({"method": "reinit", "like": like.hex(), "seed": seed})
            }
        };
        json!({
            "model": self.model.spec.to_string(),
            "input": self.model.input,
            "classes": self.model.classes,
            "parameters": self.model.layout.total(),
            "prunable": self.model.layout.prunable_total(),
            "origin": origin,
            "init_seed": self.init_seed,
            "rewind_step": self.rewind_step,
            "sparsity": self.sparsity,
            "remaining": self.remaining(),
            "layers": layers,
            "found_with": {"name": self.found_with.name, "provenance": self.found_with.provenance.hex(), "train_images": self.found_with.train_images},
            "images_processed": self.images_processed,
            "test_accuracy": self.test_accuracy(),
            "train_config": self.train_config(),
            "data_seed": self.data_seed(),
            "seconds": self.seconds,
            "curve": self.curve(),
        })
    }
}

/// Reads a Ticket artifact and checks that its vectors fit its model.
pub fn read_ticket(path: &Path) -> Result<(Header, Ticket)> {
    let (h, t) = artifact::read::<Ticket>(path)?;
    t.validate(path)?;
    Ok((h, t))
}

/// The per-layer and overall sparsity of `mask` on `model`.
pub fn sparsity_of(model: &Model, mask: &Mask) -> (f64, Vec<LayerSparsity>) {
    (mask.sparsity(&model.layout), mask.per_layer(&model.layout))
}
