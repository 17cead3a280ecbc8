//! Architectures: [`ModelSpec`] (what the user writes on the command line) and [`Model`] (a spec
//! bound to an input shape and class count, with its parameter [`Layout`] and forward pass).
//!
//! Each architecture lives in its own file (`mlp.rs`, `convnet.rs`) as an implementation of the
//! private `Architecture` trait: its layout and names, its embedding (the forward pass up to the
//! classifier, with every ReLU behind a [`Relus`] hook and every batch norm behind a [`Norms`]
//! mode), its cost and its policies (probe chunk, evaluation parallelism, initialisation, MLP
//! fast-path eligibility). This file holds what they share: the spec's syntax (parsing and
//! `Display`), the classifier, initialisation, batch-norm state, and `with_arch!`, the one match
//! from a spec to its implementation. Other crates ask [`Model`] and never match on
//! [`ModelSpec`].
//!
//! Batch-norm running statistics are state entries of the layout ([`ParamKind::is_state`]), all
//! after the trained parameters, so every vector of a model is `[trained | state]`: SGD, weight
//! decay, gradients and probes work on `data[..layout.trainable_total()]`, while Runs, Tickets,
//! checkpoints, interpolation and export carry the state with the weights.

use std::fmt;
use std::str::FromStr;

use dfdx::prelude::*;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::ImageShape;
use crate::ops::{self, BatchStats, RunningStats, BN_MOMENTUM, T1, T2, T4};
use crate::params::{Layout, ParamInfo, ParamKind, ParamVec, MAX_PARAMETERS};
use crate::seed::{self, Stream};
use crate::{Error, Result};

mod convnet;
mod mlp;
mod relu;
mod resnet;

use relu::Relu;
pub use relu::{Patterns, Relus};

/// Normalisation layer after each conv.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Norm {
    /// Instance norm with affine scale/shift: PyTorch `GroupNorm(C, C, affine=True)`, as in the
    /// DC/DM/IDC ConvNet.
    Instance,
    /// No normalisation.
    None,
    /// Batch norm with affine scale/shift and running statistics: PyTorch `BatchNorm2d(C)`
    /// (ResNets only).
    Batch,
}

impl Norm {
    fn name(self) -> &'static str {
        match self {
            Norm::Instance => "instance",
            Norm::None => "none",
            Norm::Batch => "batch",
        }
    }
}

/// How batch-norm layers normalise in one forward pass (architectures without batch norm ignore
/// it). Every consumer says which it wants: training steps and distillation use the batch's
/// statistics, test evaluation the running ones.
pub enum Norms<'a> {
    /// Training mode: each layer normalises by its batch's statistics (biased variance).
    Batch,
    /// Training mode, and each layer's [`BatchStats`] is appended here in forward order (the
    /// order of the layout's running statistics), for [`Model::update_running`].
    Collect(&'a mut Vec<BatchStats>),
    /// Evaluation mode: the running statistics held in the parameter vector's state.
    Running,
}

/// An architecture, as written on the command line.
///
/// - `mlp:H1,H2,...` — fully connected ReLU network (`mlp:` with no sizes is softmax regression);
/// - `lenet-300-100` — Frankle & Carbin's LeNet (784-300-100-10 on MNIST);
/// - `convnet[:depth=D,width=W,norm=instance|none]` — D blocks of conv3x3(W) -> norm -> ReLU ->
///   avg-pool 2x2, then a linear classifier (defaults 3, 128, instance: the paper's ConvNet-3);
/// - `resnet[:depth=D,width=W,norm=batch|instance|none]` — OpenLTH's `cifar_resnet_D_W` (D = 6n+2;
///   defaults 20, 16, batch: ResNet-20); `resnet20` is its short name;
/// - `resnet18` / `resnet10` `[:width=W,norm=...]` — the CIFAR ResNet-18/10 of DC/IDC (stages of
///   2,2,2,2 / 1,1,1,1 basic blocks of widths W, 2W, 4W, 8W; default W = 64, batch norm).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ModelSpec {
    /// Multi-layer perceptron with the given hidden widths.
    Mlp {
        /// Hidden layer widths, input side first.
        hidden: Vec<usize>,
    },
    /// LeNet-300-100 (an MLP with hidden widths 300 and 100).
    Lenet300100,
    /// The DC/DM ConvNet.
    ConvNet {
        /// Number of conv blocks.
        depth: usize,
        /// Channels of every conv.
        width: usize,
        /// Normalisation after each conv.
        norm: Norm,
    },
    /// OpenLTH's CIFAR ResNet (`cifar_resnet_D_W`).
    ResNet {
        /// Layers: 6n + 2 for n blocks per stage.
        depth: usize,
        /// Channels of the stem and the first stage (the others have 2W and 4W).
        width: usize,
        /// Normalisation after each conv.
        norm: Norm,
    },
    /// The CIFAR ResNet-18 / ResNet-10 of DC/IDC (and the paper's authors).
    ResNetDc {
        /// 18 (two blocks per stage) or 10 (one).
        depth: usize,
        /// Channels of the stem and the first stage (the others have 2W, 4W, 8W).
        width: usize,
        /// Normalisation after each conv.
        norm: Norm,
    },
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSpec::Mlp { hidden } => {
                let h: Vec<String> = hidden.iter().map(|h| h.to_string()).collect();
                write!(f, "mlp:{}", h.join(","))
            }
            ModelSpec::Lenet300100 => write!(f, "lenet-300-100"),
            ModelSpec::ConvNet { depth, width, norm } => {
                write!(f, "convnet:depth={depth},width={width},norm={}", norm.name())
            }
            ModelSpec::ResNet { depth, width, norm } => {
                write!(f, "resnet:depth={depth},width={width},norm={}", norm.name())
            }
            ModelSpec::ResNetDc { depth, width, norm } => {
                write!(f, "resnet{depth}:width={width},norm={}", norm.name())
            }
        }
    }
}

/// The widest layer a spec may ask for (an MLP's hidden width, a ConvNet's channels).
pub const MAX_WIDTH: usize = 65_536;
/// The most layers a spec may ask for (MLP hidden layers, ConvNet blocks).
pub const MAX_DEPTH: usize = 64;
/// The largest image dimension (channels, height or width) a model may be bound to.
pub const MAX_IMAGE_SIDE: usize = 4096;
/// The most classes a model may have: labels are stored as bytes.
pub const MAX_CLASSES: usize = 256;

impl ModelSpec {
    /// Errors unless every width is at most [`MAX_WIDTH`] and the depth at most [`MAX_DEPTH`].
    pub fn check_limits(&self) -> Result<()> {
        let (widths, depth): (&[usize], usize) = match self {
            ModelSpec::Mlp { hidden } => (hidden, hidden.len()),
            ModelSpec::Lenet300100 => (&[], 2),
            ModelSpec::ConvNet { depth, width, .. } => (std::slice::from_ref(width), *depth),
            // Blocks per stage count as the depth: ResNet-110 (18 per stage) stays in range.
            ModelSpec::ResNet { depth, width, .. } => {
                (std::slice::from_ref(width), depth.saturating_sub(2) / 6)
            }
            ModelSpec::ResNetDc { width, .. } => (std::slice::from_ref(width), 2),
        };
        if let Some(w) = widths.iter().find(|&&w| w == 0 || w > MAX_WIDTH) {
            return Err(Error::setting(format!(
                "model spec '{self}': width {w} is outside 1..={MAX_WIDTH}, the limit (a wider layer would not fit in memory)"
            )));
        }
        if depth > MAX_DEPTH {
            return Err(Error::setting(format!(
                "model spec '{self}': {depth} layers, more than the limit of {MAX_DEPTH}"
            )));
        }
        Ok(())
    }
}

const SPEC_HELP: &str = "expected mlp:H1,H2,..., lenet-300-100, convnet[:depth=D,width=W,norm=instance|none], resnet[:depth=6n+2,width=W,norm=batch|instance|none], resnet20, resnet18[:width=W] or resnet10[:width=W]";

impl FromStr for ModelSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            |why: String| Error::setting(format!("invalid model spec '{s}': {why} ({SPEC_HELP})"));
        let (head, args) = match s.split_once(':') {
            Some((h, a)) => (h.trim(), Some(a.trim())),
            None => (s.trim(), None),
        };
        let positive = |v: &str, what: &str| -> Result<usize> {
            match v.trim().parse::<usize>() {
                Ok(n) if n > MAX_WIDTH => {
                    Err(bad(format!("{what} {n} is above the limit of {MAX_WIDTH}")))
                }
                Ok(n) if n > 0 => Ok(n),
                _ => Err(bad(format!("{what} must be a positive integer, got '{v}'"))),
            }
        };
        // `depth=`, `width=` and `norm=` arguments over `defaults`; `depth` only if `with_depth`.
        let keys = |args: Option<&str>,
                    defaults: (usize, usize, Norm),
                    with_depth: bool|
         -> Result<(usize, usize, Norm)> {
            let (mut depth, mut width, mut norm) = defaults;
            for kv in args.unwrap_or("").split(',').filter(|kv| !kv.trim().is_empty()) {
                let (k, v) =
                    kv.split_once('=').ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
                match k.trim() {
                    "depth" if with_depth => depth = positive(v, "depth")?,
                    "width" => width = positive(v, "width")?,
                    "norm" => {
                        norm = match v.trim() {
                            "instance" | "instancenorm" => Norm::Instance,
                            "none" => Norm::None,
                            "batch" | "batchnorm" => Norm::Batch,
                            other => return Err(bad(format!("unknown norm '{other}'"))),
                        }
                    }
                    other => return Err(bad(format!("unknown key '{other}'"))),
                }
            }
            Ok((depth, width, norm))
        };
        match head.to_ascii_lowercase().as_str() {
            "mlp" => {
                let hidden = match args {
                    None | Some("") => vec![],
                    Some(a) => {
                        a.split(',').map(|h| positive(h, "hidden width")).collect::<Result<_>>()?
                    }
                };
                Ok(ModelSpec::Mlp { hidden })
            }
            "lenet-300-100" | "lenet300100" | "lenet" if args.is_none() => {
                Ok(ModelSpec::Lenet300100)
            }
            "convnet" => {
                let (depth, width, norm) = keys(args, (3, 128, Norm::Instance), true)?;
                if norm == Norm::Batch {
                    return Err(
                        bad("norm=batch is for resnets (convnet: instance or none)".into()),
                    );
                }
                Ok(ModelSpec::ConvNet { depth, width, norm })
            }
            "resnet" | "resnet20" => {
                let fixed = head.eq_ignore_ascii_case("resnet20");
                let (depth, width, norm) = keys(args, (20, 16, Norm::Batch), !fixed)?;
                if depth < 8 || (depth - 2) % 6 != 0 {
                    return Err(bad(format!(
                        "depth {depth} is not 6n+2 for n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"
                    )));
                }
                Ok(ModelSpec::ResNet { depth, width, norm })
            }
            "resnet18" | "resnet10" => {
                let (_, width, norm) = keys(args, (0, 64, Norm::Batch), false)?;
                let depth = if head.ends_with("18") { 18 } else { 10 };
                Ok(ModelSpec::ResNetDc { depth, width, norm })
            }
            other => Err(bad(format!("unknown architecture '{other}'"))),
        }
    }
}

/// A spec bound to an input shape and class count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Model {
    /// The architecture.
    pub spec: ModelSpec,
    /// Input image shape.
    pub input: ImageShape,
    /// Number of classes (output width).
    pub classes: usize,
    /// Parameter layout, in forward order.
    pub layout: Layout,
}

/// One layout entry as an architecture declares it: name, shape, kind.
type Item = (String, Vec<usize>, ParamKind);

/// How an architecture initialises its parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    /// PyTorch's defaults: conv/linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    /// (kaiming_uniform with a = sqrt(5)), norm scale 1, shift 0.
    PyTorch,
    /// OpenLTH's `kaiming_normal` model init with its `uniform` batch-norm init (the defaults of
    /// its `cifar_resnet` hyperparameters): conv/linear weights N(0, 2 / fan_in), norm scale
    /// U(0, 1), shift 0; biases keep PyTorch's default.
    OpenLth,
}

/// What one architecture provides; each is implemented in its own file, and [`with_arch!`] is
/// the one place that maps a [`ModelSpec`] variant to its implementation.
///
/// Shared by every architecture (and so not here): the classifier is a linear layer on the
/// embedding and owns the last two trained entries (weight, then bias), state (running
/// statistics) goes after it, initialisation follows the layout's kinds, and prunability is the
/// layout's (`ParamInfo::prunable`: conv and linear weights).
trait Architecture {
    /// The layout's entries before the classifier, in forward order, with PyTorch's names
    /// (state entries among them, right after their layer's parameters; [`Model::new`] moves
    /// them after the classifier), and the embedding's width (the classifier's fan-in). `spec`
    /// is for error messages.
    fn features(&self, spec: &ModelSpec, input: ImageShape) -> Result<(Vec<Item>, usize)>;
    /// PyTorch's names of the classifier's weight and bias.
    fn classifier_names(&self) -> (&'static str, &'static str);
    /// The embedding: `p` holds one tensor per layout entry (the classifier's two are ignored;
    /// the state's follow them); `input_grad` asks the first layer to propagate gradients to the
    /// images; every ReLU goes through `relu`, every batch norm follows `norms`.
    fn embed<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        relu: &mut Relu,
        norms: &mut Norms,
    ) -> T2<Tp>;
    /// How the parameters are initialised.
    fn init(&self) -> Init {
        Init::PyTorch
    }
    /// The smallest batch a training-mode pass accepts: 2 when some batch norm sees a 1x1 plane
    /// (one value per channel per image), else 1.
    fn min_batch(&self, _input: ImageShape) -> usize {
        1
    }
    /// Multiply-accumulates of the embedding for one image.
    fn embed_macs(&self, input: ImageShape) -> u64;
    /// Images per chunk when a probe evaluates a set (bounds activation memory).
    fn probe_chunk(&self) -> usize;
    /// Whether evaluating several parameter vectors should run them side by side (rayon over
    /// points) rather than one at a time with parallel ops inside.
    fn parallel_points(&self) -> bool;
    /// Hidden widths when the network is a stack of linear layers with ReLUs, which can train
    /// through the graph-free step (`mlp.rs`).
    fn mlp_hidden(&self) -> Option<&[usize]>;
    /// The network as the exact Hessian-vector product runs it (`hvp`); `None`: not supported.
    fn hvp_net(&self, _model: &Model) -> Option<crate::hvp::Net> {
        None
    }
}

/// Binds `$a` to the [`Architecture`] implementing `$spec` and evaluates `$body`: the one match
/// from spec to implementation.
macro_rules! with_arch {
    ($spec:expr, $a:ident => $body:expr) => {
        match $spec {
            ModelSpec::Mlp { hidden } => {
                let $a = mlp::Mlp { hidden };
                $body
            }
            ModelSpec::Lenet300100 => {
                let $a = mlp::Mlp { hidden: &mlp::LENET_300_100 };
                $body
            }
            ModelSpec::ConvNet { depth, width, norm } => {
                let $a = convnet::ConvNet { depth: *depth, width: *width, norm: *norm };
                $body
            }
            ModelSpec::ResNet { depth, width, norm } => {
                let $a = resnet::ResNet::cifar(*depth, *width, *norm);
                $body
            }
            ModelSpec::ResNetDc { depth, width, norm } => {
                let $a = resnet::ResNet::dc(*depth, *width, *norm);
                $body
            }
        }
    };
}

/// One dense layer of an MLP: its widths and where its weight (out x in) and bias sit in the
/// flat parameter vector, read from the layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DenseLayer {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: std::ops::Range<usize>,
    pub bias: std::ops::Range<usize>,
}

impl Model {
    /// Binds `spec` to an input shape; fails when the input is too small for the architecture.
    /// Every size is bounded first ([`MAX_WIDTH`], [`MAX_DEPTH`], [`MAX_IMAGE_SIDE`],
    /// [`MAX_CLASSES`], [`MAX_PARAMETERS`]), so no spec, typed or read from a file, can overflow
    /// a shape or ask for more memory than a model of that limit.
    pub fn new(spec: &ModelSpec, input: ImageShape, classes: usize) -> Result<Model> {
        if classes < 2 {
            return Err(Error::data(format!(
                "a classifier needs at least 2 classes, got {classes}"
            )));
        }
        if classes > MAX_CLASSES {
            return Err(Error::data(format!(
                "{classes} classes: at most {MAX_CLASSES} (labels are stored as bytes)"
            )));
        }
        let sides = [input.channels, input.height, input.width];
        if sides.iter().any(|&d| d == 0 || d > MAX_IMAGE_SIDE) {
            return Err(Error::data(format!(
                "input images of {}x{}x{}: every dimension must lie in 1..={MAX_IMAGE_SIDE}",
                input.channels, input.height, input.width
            )));
        }
        spec.check_limits()?;
        let (features_items, features) = with_arch!(spec, a => a.features(spec, input))?;
        let (state, mut items): (Vec<Item>, Vec<Item>) =
            features_items.into_iter().partition(|(_, _, kind)| kind.is_state());
        let (weight, bias) = with_arch!(spec, a => a.classifier_names());
        items.push((weight.into(), vec![classes, features], ParamKind::Weight));
        items.push((bias.into(), vec![classes], ParamKind::Bias));
        items.extend(state);
        // Checked before `Layout::new` computes offsets, which would overflow on huge shapes.
        let mut total = 0usize;
        for (_, shape, _) in &items {
            let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            total = match n.and_then(|n| total.checked_add(n)) {
                Some(t) if t <= MAX_PARAMETERS => t,
                _ => {
                    return Err(Error::setting(format!(
                        "model {spec} on {}x{}x{} images has more than {MAX_PARAMETERS} parameters, the limit (each parameter vector takes 4 bytes per parameter, and training keeps several)",
                        input.channels, input.height, input.width
                    )))
                }
            };
        }
        Ok(Model { spec: spec.clone(), input, classes, layout: Layout::new(items) })
    }

    /// Errors unless this model is exactly what [`Model::new`] makes of its spec, input and
    /// classes (layout included): what a model read from a file must satisfy before its layout
    /// drives any computation.
    pub fn check(&self) -> std::result::Result<(), String> {
        let want = Model::new(&self.spec, self.input, self.classes).map_err(|e| e.to_string())?;
        if want.layout != self.layout {
            return Err(format!(
                "the layout stored for model {} ({} tensors, {} parameters) is not that model's ({} tensors, {} parameters)",
                self.spec,
                self.layout.entries.len(),
                self.layout.check().map(|_| self.layout.total()).unwrap_or(usize::MAX),
                want.layout.entries.len(),
                want.layout.total()
            ));
        }
        Ok(())
    }

    /// For an MLP, its layer widths: input features, each hidden width, classes.
    pub fn mlp_widths(&self) -> Option<Vec<usize>> {
        let hidden = with_arch!(&self.spec, a => a.mlp_hidden().map(<[usize]>::to_vec))?;
        Some(std::iter::once(self.input.len()).chain(hidden).chain([self.classes]).collect())
    }

    /// For an MLP, its layers as the layout places them (weight, then bias, per layer).
    pub(crate) fn mlp_layers(&self) -> Option<Vec<DenseLayer>> {
        self.mlp_widths()?;
        let layers = self
            .layout
            .entries
            .chunks_exact(2)
            .map(|wb| {
                let (w, b) = (&wb[0], &wb[1]);
                assert!(
                    w.kind == ParamKind::Weight && b.kind == ParamKind::Bias && w.shape.len() == 2,
                    "mlp layout: '{}' and '{}' are not a linear layer",
                    w.name,
                    b.name
                );
                DenseLayer {
                    inputs: w.shape[1],
                    outputs: w.shape[0],
                    weight: w.range(),
                    bias: b.range(),
                }
            })
            .collect();
        Some(layers)
    }

    /// The prunable tensors (conv and linear weights), in layout order.
    pub fn prunable(&self) -> impl Iterator<Item = &ParamInfo> {
        self.layout.entries.iter().filter(|e| e.prunable())
    }

    /// Images per chunk when a probe evaluates a set: large for MLPs (their activations are
    /// small), smaller for convolutional networks (bounds activation memory).
    pub fn probe_chunk(&self) -> usize {
        with_arch!(&self.spec, a => a.probe_chunk())
    }

    /// Whether evaluating several parameter vectors should run them side by side (rayon over
    /// points; MLPs) rather than one at a time with the ops parallel inside (ConvNets).
    pub fn parallel_points(&self) -> bool {
        with_arch!(&self.spec, a => a.parallel_points())
    }

    /// Number of batch-norm layers, i.e. of running-statistics triples (mean, variance,
    /// batches tracked) in the layout's state. None for MLPs and the ConvNet (instance norm
    /// normalises each image by its own statistics).
    pub fn running_statistics(&self) -> usize {
        self.layout.entries.iter().filter(|e| e.kind == ParamKind::RunningMean).count()
    }

    /// The smallest batch a training-mode pass accepts (2 when a batch norm sees 1x1 planes).
    pub fn min_train_batch(&self) -> usize {
        with_arch!(&self.spec, a => a.min_batch(self.input))
    }

    /// Errors unless a training-mode pass over `n` images is possible (`what` names the setting,
    /// e.g. "--batch-size 1").
    pub fn check_train_batch(&self, n: usize, what: &str) -> Result<()> {
        let min = self.min_train_batch();
        if n < min {
            return Err(Error::setting(format!(
                "{what}: model {} on {}x{} images normalises 1x1 planes with batch norm, which needs at least {min} images per batch in training mode (PyTorch: \"Expected more than 1 value per channel when training\")",
                self.spec, self.input.height, self.input.width
            )));
        }
        Ok(())
    }

    /// The architecture's initialisation drawn from `seed` (see [`Init`]): PyTorch's defaults
    /// (conv/linear weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. kaiming_uniform
    /// with a = sqrt(5); norm scale 1, shift 0) or OpenLTH's for its ResNets (weights
    /// N(0, 2/fan_in), norm scale U(0, 1)). Running statistics start as PyTorch's: mean 0,
    /// variance 1, no batches tracked.
    pub fn init(&self, seed: u64) -> ParamVec {
        let init = with_arch!(&self.spec, a => a.init());
        let mut rng = seed::rng(seed, Stream::Init, 0);
        let mut p = ParamVec::zeros(self.layout.clone());
        let mut fan_in = 1usize;
        for e in &self.layout.entries {
            let r = e.range();
            match (e.kind, init) {
                (ParamKind::Weight, Init::PyTorch) => {
                    fan_in = e.shape[1..].iter().product();
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    p.data[r].iter_mut().for_each(|v| *v = rng.gen_range(-bound..bound));
                }
                (ParamKind::Weight, Init::OpenLth) => {
                    fan_in = e.shape[1..].iter().product();
                    // kaiming_normal_ (mode fan_in, gain sqrt(2) for ReLU).
                    let std = (2.0 / fan_in as f32).sqrt();
                    let normal = rand_distr::Normal::new(0.0, std).expect("finite positive std");
                    p.data[r].iter_mut().for_each(|v| *v = rng.sample(normal));
                }
                (ParamKind::Bias, _) => {
                    // The bias follows its weight, so fan_in is that weight's.
                    let bound = 1.0 / (fan_in as f32).sqrt();
                    p.data[r].iter_mut().for_each(|v| *v = rng.gen_range(-bound..bound));
                }
                (ParamKind::NormScale, Init::PyTorch) => {
                    p.data[r].iter_mut().for_each(|v| *v = 1.0)
                }
                (ParamKind::NormScale, Init::OpenLth) => {
                    p.data[r].iter_mut().for_each(|v| *v = rng.gen_range(0.0..1.0))
                }
                (ParamKind::RunningVar, _) => p.data[r].iter_mut().for_each(|v| *v = 1.0),
                (ParamKind::NormShift | ParamKind::RunningMean | ParamKind::BatchesTracked, _) => {}
            }
        }
        p
    }

    /// The running statistics of each batch-norm layer, in forward order: the ranges of its
    /// mean, variance and batch count in a parameter vector.
    fn running_ranges(&self) -> Vec<[std::ops::Range<usize>; 3]> {
        let e = &self.layout.entries;
        e.iter()
            .enumerate()
            .filter(|(_, m)| m.kind == ParamKind::RunningMean)
            .map(|(i, m)| [m.range(), e[i + 1].range(), e[i + 2].range()])
            .collect()
    }

    /// The running statistics of batch-norm layer `l` as held in `data`.
    fn running_of(data: &[f32], r: &[std::ops::Range<usize>; 3]) -> RunningStats {
        RunningStats {
            mean: data[r[0].clone()].to_vec(),
            var: data[r[1].clone()].to_vec(),
            num_batches_tracked: data[r[2].start] as u64,
        }
    }

    fn store_running(data: &mut [f32], r: &[std::ops::Range<usize>; 3], s: &RunningStats) {
        data[r[0].clone()].copy_from_slice(&s.mean);
        data[r[1].clone()].copy_from_slice(&s.var);
        data[r[2].start] = s.num_batches_tracked as f32;
    }

    /// PyTorch's training-mode update of every batch-norm layer's running statistics in `data`
    /// (momentum 0.1, unbiased variance) from one batch's statistics, as collected by a forward
    /// pass with [`Norms::Collect`]. A no-op for models without batch norm.
    pub fn update_running(&self, data: &mut [f32], batch: &[BatchStats]) -> Result<()> {
        let ranges = self.running_ranges();
        if ranges.len() != batch.len() {
            return Err(Error::incompatible(format!(
                "model {} has {} batch-norm layers, the pass collected {} statistics",
                self.spec,
                ranges.len(),
                batch.len()
            )));
        }
        for (r, b) in ranges.iter().zip(batch) {
            let mut s = Self::running_of(data, r);
            s.update(b, BN_MOMENTUM)?;
            Self::store_running(data, r, &s);
        }
        Ok(())
    }

    /// Re-estimates every batch-norm layer's running statistics from scratch, as PyTorch's
    /// `torch.optim.swa_utils.update_bn` does: statistics reset, then each of `batches`
    /// (normalised images, `n` per batch as `sizes` says) passes in training mode and its
    /// statistics enter an equal-weight average ([`RunningStats::update_cumulative`]). The
    /// trained parameters are unchanged; `num_batches_tracked` ends as the number of batches.
    pub fn reestimate_running(
        &self,
        params: &mut ParamVec,
        batches: &[(&[f32], usize)],
    ) -> Result<()> {
        let ranges = self.running_ranges();
        if ranges.is_empty() {
            return Ok(());
        }
        let dev = Cpu::default();
        let tensors = self.tensors(&dev, params);
        let mut running: Vec<RunningStats> =
            ranges.iter().map(|r| RunningStats::new(r[0].len())).collect();
        let s = self.input;
        for &(x, n) in batches {
            self.check_train_batch(n, "--bn-reset")?;
            let input = dev.tensor_from_vec(x.to_vec(), (n, s.channels, s.height, s.width));
            let mut stats = Vec::with_capacity(ranges.len());
            let _ = self.forward(&tensors, input, false, Norms::Collect(&mut stats));
            for (r, b) in running.iter_mut().zip(&stats) {
                r.update_cumulative(b)?;
            }
        }
        for (r, s) in ranges.iter().zip(&running) {
            Self::store_running(&mut params.data, r, s);
        }
        Ok(())
    }

    /// Errors unless every batch-norm running variance in `data` is finite and non-negative and
    /// every batch count a whole number (what a vector read from a file must hold before an
    /// evaluation-mode pass divides by `sqrt(var + eps)`).
    pub fn check_state(&self, data: &[f32]) -> std::result::Result<(), String> {
        for r in self.running_ranges() {
            let s = Self::running_of(data, &r);
            if let Some(v) = s.var.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(format!("a running variance is {v} (must be finite and >= 0)"));
            }
            let count = data[r[2].start];
            if !(count >= 0.0 && count.fract() == 0.0) {
                return Err(format!("num_batches_tracked is {count}, not a count"));
            }
        }
        Ok(())
    }

    /// One tape-free tensor per layout entry, copied from `params`.
    pub fn tensors(&self, dev: &Cpu, params: &ParamVec) -> Vec<T1> {
        self.layout
            .entries
            .iter()
            .map(|e| dev.tensor_from_vec(params.data[e.range()].to_vec(), (e.len(),)))
            .collect()
    }

    /// Forward pass: images (N, C, H, W) to logits (N, classes). `input_grad` asks the first layer
    /// to propagate gradients to the images (distillation needs it; training does not); `norms`
    /// says how batch norms normalise (ignored by models without).
    pub fn forward<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        norms: Norms,
    ) -> T2<Tp> {
        self.forward_with(p, x, input_grad, &mut Relus::Plain, norms)
    }

    /// [`Model::forward`] with its ReLUs controlled by `relus` (record or replay their
    /// patterns); with [`Relus::Plain`] it is `forward`.
    pub fn forward_with<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        relus: &mut Relus,
        norms: Norms,
    ) -> T2<Tp> {
        let k = self.classifier_index();
        // The classifier is the first layer when the embedding has no parameters (`mlp:`).
        let classifier_first = k == 0;
        ops::linear(
            self.embed_with(p, x, input_grad, relus, norms),
            &p[k],
            &p[k + 1],
            self.classes,
            input_grad || !classifier_first,
        )
    }

    /// Features before the classifier (N, F): what distribution matching embeds. Takes the full
    /// parameter list and ignores the classifier's two tensors.
    pub fn embed<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        norms: Norms,
    ) -> T2<Tp> {
        self.embed_with(p, x, input_grad, &mut Relus::Plain, norms)
    }

    /// [`Model::embed`] with its ReLUs controlled by `relus`.
    pub fn embed_with<Tp: Tape<f32, Cpu>>(
        &self,
        p: &[T1],
        x: T4<Tp>,
        input_grad: bool,
        relus: &mut Relus,
        mut norms: Norms,
    ) -> T2<Tp> {
        let mut relu = Relu::new(relus);
        with_arch!(&self.spec, a => a.embed(p, x, input_grad, &mut relu, &mut norms))
    }

    /// Index of the classifier's weight in the layout (its bias follows; the state, if any,
    /// comes after both).
    fn classifier_index(&self) -> usize {
        self.layout.entries.iter().filter(|e| e.trainable()).count() - 2
    }

    /// The network as the exact Hessian-vector product runs it ([`crate::hvp`]), if the
    /// architecture has one.
    pub(crate) fn hvp_net(&self) -> Option<crate::hvp::Net> {
        with_arch!(&self.spec, a => a.hvp_net(self))
    }

    /// Multiply-accumulates of one forward pass for one image (for GFLOP/s reporting).
    pub fn forward_macs(&self) -> u64 {
        let classifier = self.layout.entries[self.classifier_index()].len() as u64;
        with_arch!(&self.spec, a => a.embed_macs(self.input)) + classifier
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(c: usize, h: usize) -> ImageShape {
        ImageShape { channels: c, height: h, width: h }
    }

    #[test]
    fn specs_parse_and_round_trip() {
        for s in [
            "mlp:32,16",
            "mlp:",
            "lenet-300-100",
            "convnet:depth=3,width=128,norm=instance",
            "convnet:depth=2,width=8,norm=none",
            "resnet:depth=20,width=16,norm=batch",
            "resnet:depth=8,width=4,norm=instance",
            "resnet18:width=64,norm=batch",
            "resnet10:width=8,norm=none",
        ] {
            let spec: ModelSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
        }
        let d: ModelSpec = "convnet".parse().unwrap();
        assert_eq!(d, ModelSpec::ConvNet { depth: 3, width: 128, norm: Norm::Instance });
        for (short, long) in [
            ("resnet", "resnet:depth=20,width=16,norm=batch"),
            ("resnet20", "resnet:depth=20,width=16,norm=batch"),
            ("resnet:depth=56", "resnet:depth=56,width=16,norm=batch"),
            ("resnet18", "resnet18:width=64,norm=batch"),
            ("resnet10:width=16", "resnet10:width=16,norm=batch"),
        ] {
            assert_eq!(short.parse::<ModelSpec>().unwrap().to_string(), long);
        }
        for bad in [
            "resnet:depth=21",
            "resnet:depth=2",
            "resnet:width=0",
            "resnet20:depth=32",
            "resnet18:depth=10",
            "resnet34",
            "convnet:norm=batch",
            "mlp:0",
            "mlp:a",
            "convnet:depth=0",
            "convnet:norm=batchy",
            "convnet:foo=1",
            "lenet-300-100:3",
        ] {
            let e = bad.parse::<ModelSpec>().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn lenet_has_266k_parameters() {
        // 784*300+300 + 300*100+100 + 100*10+10 = 266,610 (Frankle & Carbin's count).
        let m = Model::new(&ModelSpec::Lenet300100, shape(1, 28), 10).unwrap();
        assert_eq!(m.layout.total(), 266_610);
        assert_eq!(m.layout.prunable_total(), 266_200);
    }

    #[test]
    fn convnet3_cifar_parameter_count_matches_pytorch() {
        // conv1 128*3*9+128, conv2/3 128*128*9+128 each, 3 norms 2*128 each, linear 2048*10+10
        // = 3584 + 2*147584 + 768 + 20490 = 320,010.
        let m = Model::new(&"convnet".parse().unwrap(), shape(3, 32), 10).unwrap();
        assert_eq!(m.layout.total(), 320_010);
        assert_eq!(m.layout.entries.last().unwrap().name, "classifier.bias");
        assert_eq!(m.layout.get("classifier.weight").unwrap().shape, vec![10, 2048]);
        // MNIST: 28 -> 14 -> 7 -> 3, so the classifier sees 128*3*3 = 1152 features.
        let m = Model::new(&"convnet".parse().unwrap(), shape(1, 28), 10).unwrap();
        assert_eq!(m.layout.get("classifier.weight").unwrap().shape, vec![10, 1152]);
        assert!(Model::new(&"convnet:depth=4".parse().unwrap(), shape(1, 8), 10).is_err());
    }

    #[test]
    fn resnet_parameter_counts_match_pytorch() {
        // ResNet-20 (OpenLTH cifar_resnet_20), trained parameters: stem 432 + 32; stage 1:
        // 3 x (2 x 2304 + 64) = 14,016; stage 2: (4608 + 9216 + 128 + 512 + 64) + 2 x (2 x 9216
        // + 128) = 51,648; stage 3: (18,432 + 36,864 + 256 + 2048 + 128) + 2 x (2 x 36,864 + 256)
        // = 205,696; fc 650. Total 272,474 (PyTorch's sum of `parameters()`).
        let cifar = shape(3, 32);
        let m = Model::new(&"resnet20".parse().unwrap(), cifar, 10).unwrap();
        assert_eq!(m.layout.trainable_total(), 272_474);
        // 21 batch norms (stem, 2 per block, 2 shortcuts) keep 2 x C + 1 values each:
        // 2 x (16 x 7 + 32 x 7 + 64 x 7) + 21 = 1,589.
        assert_eq!(m.running_statistics(), 21);
        assert_eq!(m.layout.state_total(), 1_589);
        m.layout.check().unwrap();
        assert_eq!(m.layout.get("blocks.3.shortcut.0.weight").unwrap().shape, vec![32, 16, 1, 1]);
        assert!(m.layout.get("blocks.3.shortcut.1.num_batches_tracked").unwrap().shape.is_empty());
        assert!(m.layout.get("blocks.4.shortcut.0.weight").is_none());
        let e = &m.layout.entries;
        let fc = e.iter().position(|x| x.name == "fc.bias").unwrap();
        assert!(
            e[..fc].iter().all(|x| x.trainable()) && e[fc + 1..].iter().all(|x| !x.trainable())
        );
        assert_eq!(m.prunable().count(), 19 + 2 + 1);
        // conv 3x3 MACs per image (Ho * Wo * Cout * Cin * 9, shortcuts Cin): 442,368 (stem) +
        // 6 x 2,359,296 (stage 1) + 1,179,648 + 5 x 2,359,296 + 131,072 (stage 2) + 1,179,648
        // + 5 x 2,359,296 + 131,072 (stage 3) + 640 (fc) = 40,813,184.
        assert_eq!(m.forward_macs(), 40_813_184);
        // ResNet-18 (DC/IDC, kuangliu's CIFAR variant): 11,173,962 parameters on CIFAR-10.
        let r18 = Model::new(&"resnet18".parse().unwrap(), cifar, 10).unwrap();
        assert_eq!(r18.layout.trainable_total(), 11_173_962);
        assert_eq!(r18.running_statistics(), 1 + 8 * 2 + 3);
        // ResNet-10: one block per stage, 4,903,242 parameters.
        let r10 = Model::new(&"resnet10".parse().unwrap(), cifar, 10).unwrap();
        assert_eq!(r10.layout.trainable_total(), 4_903_242);
        // Every input size works: MNIST and digits end at 7x7 / 2x2 for ResNet-20.
        for input in [shape(1, 28), shape(1, 8), shape(3, 1)] {
            Model::new(&"resnet20".parse().unwrap(), input, 10).unwrap();
            Model::new(&"resnet18:width=2".parse().unwrap(), input, 10).unwrap();
        }
    }

    #[test]
    fn init_follows_pytorch_bounds_and_is_seeded() {
        let m = Model::new(&"mlp:20".parse().unwrap(), shape(1, 8), 10).unwrap();
        let a = m.init(7);
        assert_eq!(a, m.init(7));
        assert_ne!(a.data, m.init(8).data);
        let w = a.get("fc_layers.0.weight").unwrap();
        let bound = 1.0 / 64f32.sqrt();
        assert!(w.iter().all(|v| v.abs() <= bound));
        // Uniform on [-b, b] has standard deviation b/sqrt(3); 1280 draws land within 10%.
        let sd = (w.iter().map(|v| (v * v) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!((sd / (bound as f64 / 3f64.sqrt()) - 1.0).abs() < 0.1, "{sd}");
        let b2 = a.get("fc.bias").unwrap();
        assert!(b2.iter().all(|v| v.abs() <= 1.0 / 20f32.sqrt()));
    }

    #[test]
    fn policies_and_costs_come_from_the_architecture() {
        let lenet = Model::new(&ModelSpec::Lenet300100, shape(1, 28), 10).unwrap();
        assert_eq!(lenet.mlp_widths(), Some(vec![784, 300, 100, 10]));
        assert_eq!(lenet.forward_macs(), 266_200);
        assert_eq!((lenet.probe_chunk(), lenet.parallel_points()), (2048, true));
        let layers = lenet.mlp_layers().unwrap();
        let e = &lenet.layout.entries;
        for (l, layer) in layers.iter().enumerate() {
            assert_eq!(
                (layer.weight.clone(), layer.bias.clone()),
                (e[2 * l].range(), e[2 * l + 1].range())
            );
        }
        assert_eq!(lenet.prunable().count(), 3);
        let cn = Model::new(&"convnet".parse().unwrap(), shape(3, 32), 10).unwrap();
        assert_eq!(cn.mlp_widths(), None);
        assert!(cn.mlp_layers().is_none());
        // 32*32*128*3*9 + 16*16*128*128*9 + 8*8*128*128*9 + 2048*10.
        assert_eq!(cn.forward_macs(), 3_538_944 + 37_748_736 + 9_437_184 + 20_480);
        assert_eq!((cn.probe_chunk(), cn.parallel_points()), (128, false));
        assert_eq!(cn.running_statistics(), 0);
        assert_eq!(cn.layout.trainable_total(), cn.layout.total());
        assert_eq!(
            cn.prunable().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["features.0.weight", "features.4.weight", "features.8.weight", "classifier.weight"]
        );
    }
}
