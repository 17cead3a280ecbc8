//! The reference throughput workloads, defined exactly as `shared/bench/torch_reference.py`
//! defines them, so `lmc bench` and the PyTorch script can be compared in one run.

use std::time::Instant;

use rand::Rng;
use serde::Serialize;

use crate::data::ImageShape;
use crate::fit::{loss_and_grad, GradBuffers};
use crate::model::{Model, ModelSpec};
use crate::optim::Sgd;
use crate::params::Mask;
use crate::seed::{self, Stream};

/// One benchmark workload.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Name shared with the PyTorch script.
    pub name: &'static str,
    /// Architecture.
    pub spec: ModelSpec,
    /// Input shape.
    pub input: ImageShape,
    /// Batch size.
    pub batch: usize,
    /// Forward only (evaluation) rather than a training step.
    pub eval: bool,
    /// Steps per timed repeat with the script's defaults (20 steps, x50 for LeNet, /5 for eval).
    pub steps: usize,
}

fn shape(c: usize, hw: usize) -> ImageShape {
    ImageShape { channels: c, height: hw, width: hw }
}

/// The reference workloads.
pub fn workloads() -> Vec<Workload> {
    let cn3 = ModelSpec::ConvNet { depth: 3, width: 128, norm: crate::model::Norm::Instance };
    let resnet20 = ModelSpec::ResNet { depth: 20, width: 16, norm: crate::model::Norm::Batch };
    let resnet18 = ModelSpec::ResNetDc { depth: 18, width: 64, norm: crate::model::Norm::Batch };
    vec![
        Workload {
            name: "lenet_mnist_b128",
            spec: ModelSpec::Lenet300100,
            input: shape(1, 28),
            batch: 128,
            eval: false,
            steps: 1000,
        },
        Workload {
            name: "convnet3_cifar_b128",
            spec: cn3.clone(),
            input: shape(3, 32),
            batch: 128,
            eval: false,
            steps: 20,
        },
        Workload {
            name: "convnet3_mnist_b128",
            spec: cn3.clone(),
            input: shape(1, 28),
            batch: 128,
            eval: false,
            steps: 20,
        },
        Workload {
            name: "convnet3_cifar_eval_b1000",
            spec: cn3,
            input: shape(3, 32),
            batch: 1000,
            eval: true,
            steps: 4,
        },
        Workload {
            name: "resnet20_cifar_b128",
            spec: resnet20.clone(),
            input: shape(3, 32),
            batch: 128,
            eval: false,
            steps: 20,
        },
        Workload {
            name: "resnet18_cifar_b128",
            spec: resnet18,
            input: shape(3, 32),
            batch: 128,
            eval: false,
            steps: 5,
        },
        Workload {
            name: "resnet20_cifar_eval_b1000",
            spec: resnet20,
            input: shape(3, 32),
            batch: 1000,
            eval: true,
            steps: 4,
        },
    ]
}

/// A prepared workload: model, parameters, a fixed random batch, buffers.
pub struct Prepared {
    /// The workload.
    pub workload: Workload,
    model: Model,
    params: crate::params::ParamVec,
    mask: Mask,
    momentum: Vec<f32>,
    x: Vec<f32>,
    labels: Vec<u8>,
    bufs: GradBuffers,
    steps_done: u64,
}

impl Prepared {
    /// Builds the model (seed 0) and a random batch (standard normal pixels, uniform labels).
    pub fn new(w: &Workload) -> Prepared {
        let model = Model::new(&w.spec, w.input, 10).expect("reference workloads are valid");
        let params = model.init(0);
        let mut rng = seed::rng(0, Stream::Other, 0);
        let x = (0..w.batch * w.input.len())
            .map(|_| {
                // Box-Muller: standard normal pixels like torch.randn.
                let (u1, u2): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.gen());
                (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        let labels = (0..w.batch).map(|_| rng.gen_range(0..10u8)).collect();
        let mask = Mask::dense(&model.layout);
        let momentum = vec![0.0; params.len()];
        let bufs = GradBuffers::new(&model);
        Prepared {
            workload: w.clone(),
            model,
            params,
            mask,
            momentum,
            x,
            labels,
            bufs,
            steps_done: 0,
        }
    }

    /// One step: forward + cross-entropy + backward + SGD (lr 0.01, momentum 0.9, wd 5e-4) and
    /// the running-statistics update, or a forward pass (evaluation mode) for evaluation
    /// workloads. Returns the loss (or a checksum of the logits).
    pub fn step(&mut self) -> f32 {
        if self.workload.eval {
            let dev = dfdx::prelude::Cpu::default();
            let t = self.model.tensors(&dev, &self.params);
            let out =
                crate::fit::logits(&self.model, &dev, &t, self.x.clone(), self.workload.batch);
            return out.iter().sum();
        }
        let (loss, _) =
            loss_and_grad(&self.model, &self.params, &self.x, &self.labels, &mut self.bufs);
        let sgd = Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
        let t = self.model.layout.trainable_total();
        sgd.step(
            &mut self.params.data[..t],
            &mut self.bufs.grad[..t],
            &mut self.momentum[..t],
            self.steps_done == 0,
            0.01,
            &self.mask,
        );
        self.model
            .update_running(&mut self.params.data, &self.bufs.batch_stats)
            .expect("one set of batch statistics per batch norm");
        self.steps_done += 1;
        loss
    }

    /// Floating-point operations of one step (2 per multiply-accumulate; a training step counts
    /// forward + two backward products, i.e. 3x the forward).
    pub fn flops_per_step(&self) -> f64 {
        let fwd = 2.0 * self.model.forward_macs() as f64 * self.workload.batch as f64;
        if self.workload.eval {
            fwd
        } else {
            3.0 * fwd
        }
    }
}

/// Result of one workload.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    /// Workload name.
    pub name: &'static str,
    /// Median images per second over the repeats.
    pub images_per_s: f64,
    /// Achieved GFLOP/s at that rate.
    pub gflops: f64,
    /// Every repeat's rate.
    pub repeats: Vec<f64>,
}

/// Runs 3 warm-up steps, then `repeats` timed repeats of `steps` steps; reports the median.
pub fn measure(w: &Workload, steps: usize, repeats: usize) -> Measurement {
    let mut p = Prepared::new(w);
    for _ in 0..3 {
        std::hint::black_box(p.step());
    }
    let mut rates: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..steps {
                std::hint::black_box(p.step());
            }
            (w.batch * steps) as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    let repeats_raw = rates.clone();
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let gflops = median / w.batch as f64 * p.flops_per_step() / 1e9;
    Measurement { name: w.name, images_per_s: median, gflops, repeats: repeats_raw }
}
