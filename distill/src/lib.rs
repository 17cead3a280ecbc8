//! `lmc-distill`: dataset distillation into a few learned synthetic images per class, written as a
//! `Dataset` artifact ([`lmc_train::data::SyntheticSet`]) that every `lmc` command accepting
//! `--dataset` takes in place of a real dataset.
//!
//! - [`dm`]: distribution matching (the default): mean embeddings of freshly initialised networks.
//! - [`gm`]: gradient matching (DC cosine or IDC MSE per-layer distance), its mixed second
//!   derivative by central finite differences of input gradients.
//! - [`formation`]: IDC multi-formation (`factor x factor` cells per stored image, each upsampled
//!   bilinearly) as a differentiable op.
//! - [`dsa`]: differentiable siamese augmentation (colour, crop, cutout, flip, scale, rotate) as
//!   differentiable ops, one draw shared by the real and the synthetic images of a class.
//! - [`run`]: the loop, checkpoints and resume, the artifact; [`eval`]: training fresh networks on
//!   a synthetic set with DSA and testing them on real data; [`grid`]: the PNG picture.
//!
//! ```no_run
//! use lmc_distill::{config::{DistillConfig, Distance, Method}, run};
//! use lmc_train::{artifact::Provenance, data, model::Model};
//! let ds = data::load(data::DatasetName::Digits, None).unwrap();
//! let model = Model::new(&"convnet:depth=2,width=32".parse().unwrap(), ds.train.shape, ds.classes).unwrap();
//! let config = DistillConfig { ipc: 5, iterations: 200, ..DistillConfig::defaults(Method::Dm, Distance::Mse) };
//! let req = run::DistillRequest {
//!     model: &model, dataset: &ds, base: data::DatasetName::Digits,
//!     dataset_provenance: Provenance::of("dataset", &"digits", &[]), config,
//! };
//! let out = run::distill(&req, None, &run::RunOptions::default(), &mut |_| std::ops::ControlFlow::Continue(())).unwrap();
//! println!("{} images, {} images processed", out.set.images.len(), out.recipe.images_processed);
//! ```
#![deny(missing_docs)]

use std::path::Path;

use lmc_train::artifact::{self, Header};
use lmc_train::data::SyntheticSet;

pub mod config;
pub mod dm;
pub mod dsa;
pub mod eval;
pub mod formation;
pub mod gm;
pub mod grid;
mod linop;
pub mod problem;
pub mod run;
pub mod summary;

pub use config::{Distance, DistillConfig, Init, Method};
pub use run::{distill, DistillRequest, Outcome, Recipe, RunOptions, Step};

/// JSON summary of a distillation checkpoint ([`run::DistillCheckpoint`]), for `lmc inspect`.
pub fn inspect_checkpoint_summary(
    path: &Path,
    header: &Header,
    payload: &[u8],
) -> lmc_train::Result<serde_json::Value> {
    let c: run::DistillCheckpoint = artifact::decode(path, header, payload)?;
    Ok(serde_json::json!({
        "for_output": c.run.hex(),
        "iterations_done": c.state.steps_done,
        "pixel_updates": c.updates,
        "images_processed": c.state.images_seen,
        "seconds": c.seconds,
    }))
}

/// JSON summary of a `Dataset` artifact, for `lmc inspect`.
pub fn inspect_summary(
    path: &Path,
    header: &Header,
    payload: &[u8],
) -> lmc_train::Result<serde_json::Value> {
    let set: SyntheticSet = artifact::decode(path, header, payload)?;
    let mut per_class = vec![0usize; set.class_names.len().max(1)];
    for &l in &set.images.labels {
        if let Some(c) = per_class.get_mut(l as usize) {
            *c += 1;
        }
    }
    let mut v = serde_json::json!({
        "name": set.name,
        "base": set.base.to_string(),
        "stored_images": set.images.len(),
        "images_per_class": per_class,
        "shape": set.images.shape,
        "factor": set.factor,
        "training_images": set.decoded_len(),
        "class_names": set.class_names,
    });
    match serde_json::from_str::<run::Recipe>(&set.recipe) {
        Ok(r) => {
            v["method"] = r.method.clone().into();
            v["model"] = r.model.clone().into();
            v["iterations"] = r.iterations.into();
            v["seconds"] = r.seconds.into();
            v["images_processed"] = r.images_processed.into();
            v["loss_first"] = r.loss_curve.first().map(|&l| l as f64).into();
            v["loss_last"] = r.loss_curve.last().map(|&l| l as f64).into();
            v["config"] = serde_json::to_value(&r.config).unwrap_or_default();
        }
        Err(_) => v["recipe"] = set.recipe.clone().into(),
    }
    Ok(v)
}
