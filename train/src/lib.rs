//! `lmc-train`: the foundation every `lmc` stage stands on.
//!
//! - [`data`]: the built-in digits set, MNIST / Fashion-MNIST (IDX) and CIFAR-10 (binary), with
//!   per-dataset normalisation, seeded shuffling, batching and CIFAR augmentation.
//! - [`ops`]: the differentiable ops dfdx 0.13 lacks on stable Rust (conv2d, average pooling,
//!   instance norm) plus a GEMM-backed linear layer, all recorded on dfdx's tape.
//! - [`params`]: [`params::ParamVec`], the named flat parameter vector every later stage thinks in,
//!   and [`params::Mask`] over its prunable entries.
//! - [`model`]: [`model::ModelSpec`] (MLP, LeNet-300-100, ConvNet-D) and its forward pass.
//! - [`optim`] and [`fit`]: SGD with momentum / weight decay / Nesterov, schedules, the one training
//!   loop and the one evaluation function.
//! - [`hvp`]: exact Hessian-vector products (forward-over-reverse) for the probes.
//! - [`artifact`]: the versioned, checksummed envelope every artifact is written in.
//! - [`stage`]: the one resumable-stage mechanism (cache, checkpoint, resume) and the stage versions.
//!
//! ```no_run
//! use lmc_train::{data, fit, model::{Model, ModelSpec}, params::Mask};
//! let ds = data::load(data::DatasetName::Digits, None).unwrap();
//! let spec: ModelSpec = "mlp:64".parse().unwrap();
//! let model = Model::new(&spec, ds.train.shape, ds.classes).unwrap();
//! let cfg = fit::TrainConfig { epochs: 5, lr: 0.05, ..Default::default() };
//! let data = fit::TrainData::of(&ds, &cfg);
//! let state = fit::fit(&model, &Mask::dense(&model.layout), &data, &cfg, 0,
//!                      fit::TrainState::start(model.init(0)), &mut fit::Silent).unwrap();
//! println!("test accuracy {:?}", state.curve.last().unwrap().test);
//! ```
#![deny(missing_docs)]

pub mod artifact;
pub mod bench;
pub mod cpu;
pub mod data;
pub mod error;
pub mod fit;
pub mod hvp;
mod mlp;
pub mod model;
pub mod ops;
pub mod optim;
pub mod params;
pub mod seed;
mod sparse_input;
pub mod spawn;
pub mod stage;

pub use error::{Error, Result};
