//! Exact Hessian-vector products of the mean cross-entropy, by forward-over-reverse
//! (Pearlmutter 1994, "Fast exact multiplication by the Hessian", the R-operator
//! `R{f} = d/dr f(theta + r v)` at r = 0).
//!
//! One pass computes `H v` exactly: the forward pass carries each activation `a` and its
//! tangent `R{a}`, the backward pass each gradient `g` and its tangent `R{g}`, and the
//! parameters' `R{dL/dtheta}` is `H v`. Every op has a tangent rule for its forward and for its
//! backward (`layers.rs`); conv and linear are bilinear, so their rules are the same products as
//! the gradient's with one factor swapped for its tangent (`R{W a} = W R{a} + V_W a`). ReLU's
//! second derivative is zero (almost everywhere, as PyTorch's double backward defines it): its
//! pattern is taken from the primal input and applied to the tangents, so no finite step ever
//! crosses a kink. This is what finite differences of gradients cannot give on piecewise-linear
//! networks, whatever the step.
//!
//! The network comes from the model ([`Model::hvp_net`](crate::model::Model)): each
//! architecture describes itself as a list of `Layer`s over flat per-sample buffers (the
//! fused norm -> ReLU -> pool block of the ConvNet is its three ops, which it equals; a ResNet's
//! residual join is a layer holding its two branches). Every op but batch norm in training mode
//! works per sample (batch norm in evaluation mode uses the running statistics), so samples run
//! in fixed groups as parallel tasks (a network with training-mode batch norm, whose statistics
//! couple the samples, runs the whole batch as one group); each group's contribution is an f32 vector summed into an f64 total in group
//! order, so results are bit-identical for any thread count.

use std::ops::Range;

use rayon::prelude::*;

use crate::fit::NormMode;
use crate::mlp::SPARSE_INPUT_MAX_DENSITY;
use crate::model::{Model, Norm};
use crate::ops::{Conv2dCfg, ConvGeom, BN_EPS};
use crate::params::ParamKind;
use crate::sparse_input::SparseInput;
use crate::{Error, Result};

mod bn_train;
mod layers;

use layers::First;

/// Samples per task for networks of linear layers only (their products want many rows).
const DENSE_GROUP: usize = 64;
/// Samples per task for networks with convolutions (activations are large per sample).
const CONV_GROUP: usize = 8;
/// Groups run side by side before their contributions are summed (bounds memory: one
/// parameter-sized f32 vector per group in flight). Does not change results.
const WINDOW: usize = 16;

/// One op of a network as the second-order pass runs it, on flat per-sample buffers
/// (a sample's (C, H, W) activations in row-major order; flattening is free).
#[derive(Clone, Debug)]
pub(crate) enum Layer {
    /// `y = W a + b`, W (outputs x inputs) row-major.
    Linear { inputs: usize, outputs: usize, weight: Range<usize>, bias: Range<usize> },
    /// Convolution of a (cin, h, w) sample to (cout, ho, wo), weight (cout, cin, k, k), any
    /// stride and padding (`geom`); `bias` is `None` for the ResNets' bias-free convs.
    Conv {
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        geom: ConvGeom,
        weight: Range<usize>,
        bias: Option<Range<usize>>,
    },
    /// Instance norm with affine scale and shift over `channels` planes of `plane` values.
    InstanceNorm {
        channels: usize,
        plane: usize,
        eps: f32,
        gamma: Range<usize>,
        beta: Range<usize>,
    },
    /// Batch norm in evaluation mode: per channel `gamma (x - mean) / sqrt(var + eps) + beta`
    /// with the running statistics `mean` and `var`, which are state entries of the vector (read
    /// from the parameters; not parameters, so their tangent is zero and their rows of `H v`
    /// stay zero). Per sample, so it fits the groups.
    BatchNorm {
        channels: usize,
        plane: usize,
        eps: f32,
        gamma: Range<usize>,
        beta: Range<usize>,
        mean: Range<usize>,
        var: Range<usize>,
    },
    /// Batch norm in training mode: as `BatchNorm`, but normalised by the statistics of the
    /// batch (per channel over every sample's plane, biased variance, as PyTorch's training
    /// mode), so it couples the samples: a network with it runs the whole batch as one group.
    BatchNormTrain {
        channels: usize,
        plane: usize,
        eps: f32,
        gamma: Range<usize>,
        beta: Range<usize>,
    },
    /// `max(a, 0)` over `len` values.
    Relu { len: usize },
    /// Average pooling with kernel = stride = k over (channels, h, w), floor mode.
    AvgPool { channels: usize, h: usize, w: usize, k: usize },
    /// Mean of each of `channels` planes of `plane` values (the ResNets' final pool).
    GlobalAvgPool { channels: usize, plane: usize },
    /// `main(a) + shortcut(a)`: the residual join of a basic block (an empty `shortcut` is the
    /// identity). Its backward sends the gradient and its tangent into both branches and adds
    /// what comes out at their common input.
    Residual { main: Vec<Layer>, shortcut: Vec<Layer> },
}

impl Layer {
    fn in_len(&self) -> usize {
        match self {
            Layer::Linear { inputs, .. } => *inputs,
            Layer::Conv { cin, h, w, .. } => cin * h * w,
            Layer::InstanceNorm { channels, plane, .. }
            | Layer::BatchNorm { channels, plane, .. }
            | Layer::BatchNormTrain { channels, plane, .. }
            | Layer::GlobalAvgPool { channels, plane } => channels * plane,
            Layer::Relu { len } => *len,
            Layer::AvgPool { channels, h, w, .. } => channels * h * w,
            Layer::Residual { main, .. } => main[0].in_len(),
        }
    }
    fn out_len(&self) -> usize {
        match self {
            Layer::Linear { outputs, .. } => *outputs,
            Layer::Conv { cout, geom, .. } => cout * geom.pd(),
            Layer::InstanceNorm { channels, plane, .. }
            | Layer::BatchNorm { channels, plane, .. }
            | Layer::BatchNormTrain { channels, plane, .. } => channels * plane,
            Layer::Relu { len } => *len,
            Layer::AvgPool { channels, h, w, k } => channels * (h / k) * (w / k),
            Layer::GlobalAvgPool { channels, .. } => *channels,
            Layer::Residual { main, .. } => main[main.len() - 1].out_len(),
        }
    }
    /// This layer with its batch norms in training mode.
    fn in_training_mode(self) -> Layer {
        match self {
            Layer::BatchNorm { channels, plane, eps, gamma, beta, .. } => {
                Layer::BatchNormTrain { channels, plane, eps, gamma, beta }
            }
            Layer::Residual { main, shortcut } => Layer::Residual {
                main: main.into_iter().map(Layer::in_training_mode).collect(),
                shortcut: shortcut.into_iter().map(Layer::in_training_mode).collect(),
            },
            other => other,
        }
    }
    /// Whether `f` holds for this layer or one inside it.
    fn any(&self, f: &impl Fn(&Layer) -> bool) -> bool {
        f(self)
            || matches!(self, Layer::Residual { main, shortcut }
                if main.iter().chain(shortcut).any(|l| l.any(f)))
    }
}

/// Checks that each layer of `layers` feeds the next.
fn check_chain(layers: &[Layer]) {
    for w in layers.windows(2) {
        assert_eq!(w[0].out_len(), w[1].in_len(), "hvp: {:?} does not feed {:?}", w[0], w[1]);
    }
    for l in layers {
        if let Layer::Residual { main, shortcut } = l {
            assert!(!main.is_empty(), "hvp: empty residual branch");
            check_chain(main);
            check_chain(shortcut);
            if let (Some(f), Some(b)) = (shortcut.first(), shortcut.last()) {
                assert_eq!((f.in_len(), b.out_len()), (l.in_len(), l.out_len()), "hvp: shortcut");
            } else {
                assert_eq!(l.in_len(), l.out_len(), "hvp: identity shortcut changes the shape");
            }
        }
    }
}

/// A network as the second-order pass runs it: its ops in order, the last a linear layer whose
/// outputs are the logits of the mean cross-entropy.
#[derive(Clone, Debug)]
pub struct Net {
    layers: Vec<Layer>,
    params: usize,
    group: usize,
    /// Batch norms in training mode: the whole batch is one group.
    whole_batch: bool,
}

impl Net {
    fn new(layers: Vec<Layer>, params: usize) -> Net {
        let conv = layers.iter().any(|l| l.any(&|l| matches!(l, Layer::Conv { .. })));
        check_chain(&layers);
        assert!(matches!(layers.last(), Some(Layer::Linear { .. })), "hvp: no classifier");
        Net {
            layers,
            params,
            group: if conv { CONV_GROUP } else { DENSE_GROUP },
            whole_batch: false,
        }
    }
    /// The network with its batch norms in `mode` (as built: evaluation mode).
    fn in_mode(self, mode: NormMode) -> Net {
        if mode == NormMode::Running || !self.batch_norm() {
            return self;
        }
        let layers = self.layers.into_iter().map(Layer::in_training_mode).collect();
        Net { layers, whole_batch: true, ..self }
    }
    /// Samples per group for a batch of `n`.
    fn group_of(&self, n: usize) -> usize {
        if self.whole_batch {
            n.max(1)
        } else {
            self.group
        }
    }
    fn input_len(&self) -> usize {
        self.layers[0].in_len()
    }
    fn classes(&self) -> usize {
        self.layers[self.layers.len() - 1].out_len()
    }
    /// Whether some layer is a batch norm (whose training mode couples the samples).
    fn batch_norm(&self) -> bool {
        self.layers.iter().any(|l| l.any(&|l| matches!(l, Layer::BatchNorm { .. })))
    }
}

/// The network of an MLP (`mlp:...`, LeNet-300-100): linear -> ReLU per hidden layer, then
/// the classifier.
pub(crate) fn mlp(model: &Model) -> Option<Net> {
    let dense = model.mlp_layers()?;
    let last = dense.len() - 1;
    let mut layers = Vec::new();
    for (l, d) in dense.into_iter().enumerate() {
        let outputs = d.outputs;
        layers.push(Layer::Linear { inputs: d.inputs, outputs, weight: d.weight, bias: d.bias });
        if l < last {
            layers.push(Layer::Relu { len: outputs });
        }
    }
    Some(Net::new(layers, model.layout.total()))
}

/// The network of the DC/DM ConvNet: per block conv3x3 (padding 1) -> instance norm (when
/// `norm`) -> ReLU -> avg-pool 2x2, then the classifier; parameters in layout order.
pub(crate) fn convnet(model: &Model, depth: usize, width: usize, norm: bool) -> Option<Net> {
    let e = &model.layout.entries;
    let (mut c, mut h, mut w) = (model.input.channels, model.input.height, model.input.width);
    let mut layers = Vec::new();
    let mut k = 0;
    for _ in 0..depth {
        let cfg = Conv2dCfg::new(width, 3, 1);
        let geom = ConvGeom::new(c, h, w, cfg)?;
        if e[k].kind != ParamKind::Weight || e[k + 1].kind != ParamKind::Bias {
            return None;
        }
        layers.push(Layer::Conv {
            cin: c,
            h,
            w,
            cout: width,
            geom,
            weight: e[k].range(),
            bias: Some(e[k + 1].range()),
        });
        k += 2;
        let plane = geom.pd();
        if norm {
            layers.push(Layer::InstanceNorm {
                channels: width,
                plane,
                eps: 1e-5,
                gamma: e[k].range(),
                beta: e[k + 1].range(),
            });
            k += 2;
        }
        layers.push(Layer::Relu { len: width * plane });
        layers.push(Layer::AvgPool { channels: width, h, w, k: 2 });
        (c, h, w) = (width, h / 2, w / 2);
    }
    layers.push(Layer::Linear {
        inputs: c * h * w,
        outputs: model.classes,
        weight: e[k].range(),
        bias: e[k + 1].range(),
    });
    Some(Net::new(layers, model.layout.total()))
}

/// The network of a ResNet (`model/resnet.rs`): conv3x3 stem -> norm -> ReLU, then per basic
/// block (`blocks`: input channels, output channels, stride) `relu(main(x) + shortcut(x))` with
/// main = conv3x3 (stride) -> norm -> ReLU -> conv3x3 -> norm and shortcut = identity, or a
/// 1x1 conv (stride) -> norm where the block changes width or stride; then the global average
/// pool and the classifier. Convs have no bias; `norm` is batch norm in evaluation mode
/// (running statistics), instance norm or none. Parameters are found by their layout names.
pub(crate) fn resnet(
    model: &Model,
    stem: usize,
    blocks: &[(usize, usize, usize)],
    norm: Norm,
) -> Option<Net> {
    let e = &model.layout.entries;
    let find = |name: String| e.iter().find(|x| x.name == name).map(|x| x.range());
    let (c0, mut h, mut w) = (model.input.channels, model.input.height, model.input.width);
    // conv `name` (no bias) from `cin` channels at (h, w): the layer and its output size.
    let conv = |name: &str, cin: usize, h: usize, w: usize, cfg: Conv2dCfg| {
        let geom = ConvGeom::new(cin, h, w, cfg)?;
        let (ho, wo) = (cfg.out_size(h)?, cfg.out_size(w)?);
        let weight = find(format!("{name}.weight"))?;
        let cout = cfg.out_channels;
        if weight.len() != cout * geom.kd() {
            return None;
        }
        Some((Layer::Conv { cin, h, w, cout, geom, weight, bias: None }, ho, wo))
    };
    let norm_layer = |name: &str, channels: usize, plane: usize| -> Option<Option<Layer>> {
        let (gamma, beta) = match norm {
            Norm::None => return Some(None),
            _ => (find(format!("{name}.weight"))?, find(format!("{name}.bias"))?),
        };
        Some(Some(match norm {
            Norm::Instance => Layer::InstanceNorm { channels, plane, eps: 1e-5, gamma, beta },
            _ => Layer::BatchNorm {
                channels,
                plane,
                eps: BN_EPS,
                gamma,
                beta,
                mean: find(format!("{name}.running_mean"))?,
                var: find(format!("{name}.running_var"))?,
            },
        }))
    };
    let mut layers = Vec::new();
    let (l, ho, wo) = conv("conv", c0, h, w, Conv2dCfg::new(stem, 3, 1))?;
    layers.push(l);
    (h, w) = (ho, wo);
    layers.extend(norm_layer("bn", stem, h * w)?);
    layers.push(Layer::Relu { len: stem * h * w });
    let mut c = stem;
    for (i, &(cin, cout, stride)) in blocks.iter().enumerate() {
        if cin != c {
            return None;
        }
        let name = |m: &str| format!("blocks.{i}.{m}");
        let cfg = Conv2dCfg::new(cout, 3, 1).with_stride(stride);
        let (l, ho, wo) = conv(&name("conv1"), cin, h, w, cfg)?;
        let mut main = vec![l];
        main.extend(norm_layer(&name("bn1"), cout, ho * wo)?);
        main.push(Layer::Relu { len: cout * ho * wo });
        let (l, _, _) = conv(&name("conv2"), cout, ho, wo, Conv2dCfg::new(cout, 3, 1))?;
        main.push(l);
        main.extend(norm_layer(&name("bn2"), cout, ho * wo)?);
        let mut shortcut = Vec::new();
        if stride != 1 || cin != cout {
            let cfg = Conv2dCfg::new(cout, 1, 0).with_stride(stride);
            let (l, _, _) = conv(&name("shortcut.0"), cin, h, w, cfg)?;
            shortcut.push(l);
            shortcut.extend(norm_layer(&name("shortcut.1"), cout, ho * wo)?);
        }
        layers.push(Layer::Residual { main, shortcut });
        layers.push(Layer::Relu { len: cout * ho * wo });
        (c, h, w) = (cout, ho, wo);
    }
    layers.push(Layer::GlobalAvgPool { channels: c, plane: h * w });
    layers.push(Layer::Linear {
        inputs: c,
        outputs: model.classes,
        weight: find("fc.weight".into())?,
        bias: find("fc.bias".into())?,
    });
    Some(Net::new(layers, model.layout.total()))
}

/// Splits the batch into background and sparse part (`sparse_input.rs`) and sets the first
/// linear layer's weight and its tangent stacked, `[W; V_W]`, in `cache`, when the network starts with a linear
/// layer and the batch is mostly background (MNIST): the rule of the gradient's
/// `FirstLayer::Auto`. The first layer's three products (`X W^T`, `X V_W^T`, `R{g}^T X`) are
/// most of an MLP's work.
fn sparse_first_layer(
    net: &Net,
    params: &[f32],
    v: &[f32],
    x: &[f32],
    n: usize,
    cache: &mut Cache,
) -> bool {
    let Layer::Linear { inputs, outputs, weight, .. } = &net.layers[0] else {
        return false;
    };
    let density = cache.split.density(x, n, *inputs);
    if n == 0 || !(density.is_finite() && density <= SPARSE_INPUT_MAX_DENSITY) {
        return false;
    }
    cache.split.split(x, n);
    cache.stacked.clear();
    cache.stacked.extend_from_slice(&params[weight.clone()]);
    cache.stacked.extend_from_slice(&v[weight.clone()]);
    cache.split.set_weight(&cache.stacked, 2 * outputs);
    true
}

/// Whether `model`'s architecture has an exact Hessian-vector product ([`loss_and_hvp`]: batch
/// norms in evaluation mode).
pub fn supported(model: &Model) -> bool {
    model.hvp_net().is_some()
}

/// Whether `model` has an exact Hessian-vector product of the loss with its batch norms in
/// `mode`: every supported architecture, in either mode (training mode runs the whole batch as
/// one group).
pub fn supported_in(model: &Model, _mode: NormMode) -> bool {
    supported(model)
}

/// Mean cross-entropy of `model` at `params` over the `n` images `x` (normalised NCHW) with
/// `labels`, and the exact Hessian-vector product `H v` of that mean (no weight decay: the loss
/// of [`fit::loss_and_grad`](crate::fit::loss_and_grad); batch norms in evaluation mode, with
/// the running statistics of `params`, as `NormMode::Running`). `v` and the result are flat like
/// the whole vector: the state's entries of `v` are ignored (running statistics are not
/// parameters: their tangent is zero) and its rows of `H v` are zero, as the gradient's are.
/// Errors when the architecture has no second-order pass.
pub fn loss_and_hvp(
    model: &Model,
    params: &[f32],
    x: &[f32],
    labels: &[u8],
    v: &[f32],
) -> Result<(f64, Vec<f64>)> {
    loss_and_hvp_in(model, NormMode::Running, params, x, labels, v)
}

/// [`loss_and_hvp`] with batch norms in `mode`: in training mode (`NormMode::Batch`) the loss
/// of `fit::loss_and_grad` with batch statistics over these `n` images (the running
/// statistics are not read; the product's work then runs as one task).
pub fn loss_and_hvp_in(
    model: &Model,
    mode: NormMode,
    params: &[f32],
    x: &[f32],
    labels: &[u8],
    v: &[f32],
) -> Result<(f64, Vec<f64>)> {
    let net = model.hvp_net().ok_or_else(|| {
        Error::incompatible(format!(
            "model {}: no exact Hessian-vector product for this architecture (use --hvp fd)",
            model.spec
        ))
    })?;
    Ok(net_loss_and_hvp(&net.in_mode(mode), params, x, labels, v))
}

/// Mean cross-entropy of `model` at `params` over the `n` images `x` with `labels`, and the
/// mixed second derivative `d/dx (u . dL/dtheta)` (n x input values, like `x`): the parameter
/// tangent `u` pushed through the backward and read at the images (what gradient matching
/// needs; ReLU patterns from the primal, as double backward). Batch norms in training mode, as
/// gradient matching runs them: statistics over these `n` images. Errors when the architecture
/// has no second-order pass.
pub fn loss_and_input_tangent(
    model: &Model,
    params: &[f32],
    x: &[f32],
    labels: &[u8],
    u: &[f32],
) -> Result<(f64, Vec<f32>)> {
    let net = model.hvp_net().ok_or_else(|| {
        Error::incompatible(format!(
            "model {}: no exact mixed derivative for this architecture",
            model.spec
        ))
    })?;
    let net = net.in_mode(NormMode::Batch);
    let n = labels.len();
    let d = net.input_len();
    assert_eq!(x.len(), n * d, "hvp: {} input values for {n} samples of {d}", x.len());
    assert_eq!(u.len(), net.params, "hvp: vector of {} for {} parameters", u.len(), net.params);
    let g = net.group_of(n);
    let parts: Vec<(f64, Vec<f32>)> = (0..n.div_ceil(g))
        .into_par_iter()
        .map(|gi| {
            let (r0, r1) = (gi * g, ((gi + 1) * g).min(n));
            let mut acc = layers::Acc { data: vec![0f32; net.params], lo: 0 };
            let xs = (&x[r0 * d..r1 * d], r0..r1);
            let (l, rx) =
                layers::group(&net, params, u, xs, &labels[r0..r1], &mut acc, First::Input);
            (l, rx.unwrap_or_default())
        })
        .collect();
    let inv = 1.0 / n.max(1) as f64;
    let mut out = Vec::with_capacity(n * d);
    let mut loss = 0f64;
    for (l, rx) in parts {
        loss += l;
        out.extend(rx.iter().map(|&v| (v as f64 * inv) as f32));
    }
    Ok((loss * inv, out))
}

/// [`loss_and_hvp`] on a described network.
pub(crate) fn net_loss_and_hvp(
    net: &Net,
    params: &[f32],
    x: &[f32],
    labels: &[u8],
    v: &[f32],
) -> (f64, Vec<f64>) {
    let n = labels.len();
    let d = net.input_len();
    assert_eq!(x.len(), n * d, "hvp: {} input values for {n} samples of {d}", x.len());
    assert_eq!(
        params.len(),
        net.params,
        "hvp: {} parameters, expected {}",
        params.len(),
        net.params
    );
    assert_eq!(v.len(), net.params, "hvp: vector of {} for {} parameters", v.len(), net.params);
    let classes = net.classes();
    assert!(labels.iter().all(|&l| (l as usize) < classes), "hvp: label out of range");
    let (loss, mut hv) = with_cache(|cache| sum_groups(net, params, x, labels, v, cache));
    let inv = 1.0 / n.max(1) as f64;
    hv.iter_mut().for_each(|h| *h *= inv);
    (loss * inv, hv)
}

/// Buffers a call keeps for the next one on the same thread: the batch's split and the stacked
/// first-layer weight (MNIST at the probe's chunk of 2048: ~13 MB), whose fresh allocation and
/// page faults were a fifth of a LeNet-300-100 product.
#[derive(Default)]
struct Cache {
    split: SparseInput,
    stacked: Vec<f32>,
}

thread_local! {
    static CACHE: std::cell::RefCell<Cache> = std::cell::RefCell::new(Cache::default());
}

/// Runs `f` with this thread's [`Cache`]; a nested call on the same thread (a rayon worker that
/// steals another product while it waits) gets fresh buffers instead.
fn with_cache<R>(f: impl FnOnce(&mut Cache) -> R) -> R {
    CACHE.with(|c| match c.try_borrow_mut() {
        Ok(mut c) => f(&mut c),
        Err(_) => f(&mut Cache::default()),
    })
}

/// The groups of [`net_loss_and_hvp`], summed.
fn sum_groups(
    net: &Net,
    params: &[f32],
    x: &[f32],
    labels: &[u8],
    v: &[f32],
    cache: &mut Cache,
) -> (f64, Vec<f64>) {
    let n = labels.len();
    let d = net.input_len();
    let taken = sparse_first_layer(net, params, v, x, n, cache);
    let split = &mut cache.split;
    let g = net.group_of(n);
    let groups = n.div_ceil(g);
    let mut hv = vec![0f64; net.params];
    let mut loss = 0f64;
    // Groups leave the sparse first layer's weight to the batch-wide product below (most of an
    // MLP's parameters: 88% of LeNet-300-100's); their vectors start after it.
    let lo = match (taken, &net.layers[0]) {
        (true, Layer::Linear { weight, .. }) => weight.end,
        _ => 0,
    };
    // With the sparse first layer: R{g} at its output, for its weight product over the batch.
    let mut rg0 = vec![0f32; if taken { n * net.layers[0].out_len() } else { 0 }];
    let first = if taken { First::Sparse(&*split) } else { First::Params };
    let mut w0 = 0;
    while w0 < groups {
        let w1 = (w0 + WINDOW).min(groups);
        let parts: Vec<(f64, Vec<f32>, Option<Vec<f32>>)> = (w0..w1)
            .into_par_iter()
            .map(|gi| {
                let (r0, r1) = (gi * g, ((gi + 1) * g).min(n));
                let mut acc = layers::Acc { data: vec![0f32; net.params - lo], lo };
                let xs = (&x[r0 * d..r1 * d], r0..r1);
                let (l, rg) = layers::group(net, params, v, xs, &labels[r0..r1], &mut acc, first);
                (l, acc.data, rg)
            })
            .collect();
        for (gi, (l, acc, rg)) in (w0..w1).zip(parts) {
            loss += l;
            for (h, a) in hv[lo..].iter_mut().zip(&acc) {
                *h += *a as f64;
            }
            if let Some(rg) = rg {
                let o = net.layers[0].out_len();
                rg0[gi * g * o..gi * g * o + rg.len()].copy_from_slice(&rg);
            }
        }
        w0 = w1;
    }
    if let (true, Layer::Linear { inputs, outputs, weight, bias }) = (taken, &net.layers[0]) {
        // R{dW} = R{g}^T X (R{X} = 0) over the whole batch, R{db} = column sums of R{g}.
        let mut db = vec![0f32; *outputs];
        for row in rg0.chunks_exact(*outputs) {
            for (d, r) in db.iter_mut().zip(row) {
                *d += r;
            }
        }
        let mut dw = vec![0f32; outputs * inputs];
        split.weight_grad(&rg0, &db, *outputs, &mut dw);
        for (h, a) in hv[weight.clone()].iter_mut().zip(&dw) {
            *h += *a as f64;
        }
        for (h, a) in hv[bias.clone()].iter_mut().zip(&db) {
            *h += *a as f64;
        }
    }
    (loss, hv)
}
