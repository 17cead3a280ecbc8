//! Shared fixtures: small runs trained on the built-in digits.
#![allow(dead_code)]

pub mod eigen;
pub mod reference;

use lmc_train::artifact::Provenance;
use lmc_train::data::{self, Dataset};
use lmc_train::fit::{self, Run, Start, TrainConfig};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::params::Mask;

pub fn digits() -> Dataset {
    data::load(data::DatasetName::Digits, None).unwrap()
}

/// Trains `spec` on digits from init seed 0 with data seed `data_seed` for `epochs`.
pub fn train(ds: &Dataset, spec: &str, mask: Option<Mask>, data_seed: u64, epochs: usize) -> Run {
    let spec: ModelSpec = spec.parse().unwrap();
    let model = Model::new(&spec, ds.train.shape, ds.classes).unwrap();
    let mask = mask.unwrap_or_else(|| Mask::dense(&model.layout));
    let cfg = TrainConfig { epochs, lr: 0.05, batch_size: 64, ..Default::default() };
    let data = fit::TrainData::of(ds, &cfg);
    let state = fit::fit(
        &model,
        &mask,
        &data,
        &cfg,
        data_seed,
        fit::TrainState::start(model.init(0)),
        &mut fit::Silent,
    )
    .unwrap();
    Run {
        model,
        dataset: ds.name.clone(),
        dataset_provenance: Provenance::of("dataset", &"digits", &[]),
        start: Start::Seed(0),
        data_seed,
        replicate: data_seed as usize,
        config: cfg,
        mask,
        params: state.params,
        curve: state.curve,
        images_seen: state.images_seen,
        seconds: 0.0,
    }
}
