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
//! architecture describes itself as a list of [`Layer`]s over flat per-sample buffers (the
//! fused norm -> ReLU -> pool block of the ConvNet is its three ops, which it equals). Every op
//! of our models works per sample (no batch statistics), so samples run in fixed groups as
//! parallel tasks; each group's contribution is an f32 vector summed into an f64 total in group
//! order, so results are bit-identical for any thread count.

use std::ops::Range;

use rayon::prelude::*;

use crate::model::Model;
use crate::ops::{Conv2dCfg, ConvGeom};
use crate::params::ParamKind;
use crate::{Error, Result};

mod layers;

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
    /// Convolution of a (cin, h, w) sample to (cout, ho, wo), weight (cout, cin, k, k).
    Conv {
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        geom: ConvGeom,
        weight: Range<usize>,
        bias: Range<usize>,
    },
    /// Instance norm with affine scale and shift over `channels` planes of `plane` values.
    InstanceNorm {
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
}

impl Layer {
    fn in_len(&self) -> usize {
        match *self {
            Layer::Linear { inputs, .. } => inputs,
            Layer::Conv { cin, h, w, .. } => cin * h * w,
            Layer::InstanceNorm { channels, plane, .. } => channels * plane,
            Layer::Relu { len } => len,
            Layer::AvgPool { channels, h, w, .. } => channels * h * w,
        }
    }
    fn out_len(&self) -> usize {
        match *self {
            Layer::Linear { outputs, .. } => outputs,
            Layer::Conv { cout, geom, .. } => cout * geom.pd(),
            Layer::InstanceNorm { channels, plane, .. } => channels * plane,
            Layer::Relu { len } => len,
            Layer::AvgPool { channels, h, w, k } => channels * (h / k) * (w / k),
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
}

impl Net {
    fn new(layers: Vec<Layer>, params: usize) -> Net {
        let conv = layers.iter().any(|l| matches!(l, Layer::Conv { .. }));
        for w in layers.windows(2) {
            assert_eq!(w[0].out_len(), w[1].in_len(), "hvp: {:?} does not feed {:?}", w[0], w[1]);
        }
        assert!(matches!(layers.last(), Some(Layer::Linear { .. })), "hvp: no classifier");
        Net { layers, params, group: if conv { CONV_GROUP } else { DENSE_GROUP } }
    }
    fn input_len(&self) -> usize {
        self.layers[0].in_len()
    }
    fn classes(&self) -> usize {
        self.layers[self.layers.len() - 1].out_len()
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
            bias: e[k + 1].range(),
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

/// Whether `model`'s architecture has an exact Hessian-vector product.
pub fn supported(model: &Model) -> bool {
    model.hvp_net().is_some()
}

/// Mean cross-entropy of `model` at `params` over the `n` images `x` (normalised NCHW) with
/// `labels`, and the exact Hessian-vector product `H v` of that mean (no weight decay: the loss
/// of [`fit::loss_and_grad`](crate::fit::loss_and_grad)). `v` and the result are flat like the
/// parameters. Errors when the architecture has no second-order pass.
pub fn loss_and_hvp(
    model: &Model,
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
    Ok(net_loss_and_hvp(&net, params, x, labels, v))
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
    let g = net.group;
    let groups = n.div_ceil(g);
    let mut hv = vec![0f64; net.params];
    let mut loss = 0f64;
    let mut w0 = 0;
    while w0 < groups {
        let w1 = (w0 + WINDOW).min(groups);
        let parts: Vec<(f64, Vec<f32>)> = (w0..w1)
            .into_par_iter()
            .map(|gi| {
                let (r0, r1) = (gi * g, ((gi + 1) * g).min(n));
                let mut acc = vec![0f32; net.params];
                let l =
                    layers::group(net, params, v, &x[r0 * d..r1 * d], &labels[r0..r1], &mut acc);
                (l, acc)
            })
            .collect();
        for (l, acc) in parts {
            loss += l;
            for (h, a) in hv.iter_mut().zip(&acc) {
                *h += *a as f64;
            }
        }
        w0 = w1;
    }
    let inv = 1.0 / n.max(1) as f64;
    hv.iter_mut().for_each(|h| *h *= inv);
    (loss * inv, hv)
}
