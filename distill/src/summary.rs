//! [`DistillSummary`]: what `lmc distill --json` prints, as a type, so the pipeline and any other
//! reader deserialize it (a renamed or missing field is an error there, not a silent gap).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::DistillConfig;

/// One distillation, as `lmc distill --json` reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistillSummary {
    /// Always `distill`.
    pub command: String,
    /// The source dataset's name.
    pub dataset: String,
    /// Its base (built-in or file) dataset.
    pub base: String,
    /// The distillation network.
    pub model: String,
    /// `dm` or `gm`.
    pub method: String,
    /// Images per class stored.
    pub ipc: usize,
    /// IDC multi-formation factor (1 = none).
    pub factor: usize,
    /// The DSA augmentation string used.
    pub dsa: String,
    /// Outer iterations run.
    pub iterations: u64,
    /// Outer iterations asked for.
    pub iterations_requested: u64,
    /// Wall-clock seconds (summed over resumed runs).
    pub seconds: f64,
    /// Images passed through a network.
    pub images_processed: u64,
    /// Matching loss of the last iteration (null before the first).
    pub final_loss: Option<f64>,
    /// Every setting.
    pub config: DistillConfig,
    /// The Dataset artifact written.
    pub path: PathBuf,
    /// The PNG grid written next to it.
    pub png: PathBuf,
    /// True when an up-to-date output was found and not recomputed.
    pub cached: bool,
    /// Iteration the run resumed from (0 = a fresh start).
    pub resumed_from: u64,
    /// Provenance of the output (hex).
    pub provenance: String,
    /// Fresh networks trained on the set (`--eval-models` > 0).
    #[serde(flatten)]
    pub evaluation: Option<Evaluation>,
}

/// Test accuracy of fresh networks trained on a distilled set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Architecture evaluated.
    pub eval_model: String,
    /// Networks trained.
    pub eval_models: usize,
    /// Epochs each.
    pub eval_epochs: usize,
    /// Mean test accuracy in [0, 1].
    pub test_accuracy_mean: f64,
    /// Population standard deviation.
    pub test_accuracy_std: f64,
    /// Each network's test accuracy.
    pub test_accuracies: Vec<f64>,
    /// Wall-clock seconds of the evaluation.
    pub eval_seconds: f64,
    /// The same evaluation of the starting images (`--eval-baseline`).
    #[serde(flatten)]
    pub baseline: Option<Baseline>,
}

/// The evaluation of the set's starting images.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Mean test accuracy.
    pub baseline_test_accuracy_mean: f64,
    /// Population standard deviation.
    pub baseline_test_accuracy_std: f64,
    /// Each network's.
    pub baseline_test_accuracies: Vec<f64>,
}
