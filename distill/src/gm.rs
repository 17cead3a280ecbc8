//! Gradient matching (DC: Zhao, Mopuri & Bilen 2021, Eq. 9-10; IDC: Kim et al. 2022): for each
//! class, the distance between the parameter gradient of the loss on a real class batch and on
//! the (decoded, augmented) synthetic images of that class,
//!
//! `D(S) = sum over matched layers of dist(grad_theta L(real_c), grad_theta L(S_c))`.
//!
//! Its gradient w.r.t. the synthetic pixels is a mixed second derivative. dfdx has no double
//! backward, so with `u = dD/dg_syn` (a vector in parameter space) it is computed by a central
//! finite difference of input gradients (the construction DARTS uses, Liu et al. 2019):
//!
//! `dD/dS = [grad_S L(S; theta + eps u) - grad_S L(S; theta - eps u)] / (2 eps)`, exact up to
//! O(eps^2), with `eps = fd_eps / ||u||` (the scaling DARTS uses for the same construction), and
//! the ReLU patterns of the unshifted pass frozen in both shifted passes through the model's ReLU
//! hook ([`Model::forward_with`] with [`Relus::Record`] / [`Relus::Replay`]).
//!
//! Why freeze: the parameter gradient of a ReLU network jumps wherever a unit's pre-activation
//! crosses zero. ConvNet-3 has ~130,000 ReLU units per MNIST image, and after instance norm their
//! pre-activations sit around zero, so moving the parameters by as little as 1e-5 (in norm) flips
//! about one of them in a batch of ten and the central difference picks up that jump divided by
//! `2 eps` (measured on MNIST: noise 30x the signal at every eps f32 can resolve). Double backward
//! (what DC/IDC use in PyTorch) differentiates inside the current linear region (ReLU'' = 0), and
//! so do the replayed passes: conv, instance norm, pooling, linear and cross-entropy are smooth.

use std::sync::Arc;

use dfdx::prelude::*;
use lmc_train::data::Batch;
use lmc_train::fit::{self, GradBuffers, NormMode};
use lmc_train::model::{Model, Norms, Patterns, Relus};
use lmc_train::ops;
use lmc_train::params::{Layout, ParamInfo, ParamVec};
use rand_chacha::ChaCha8Rng;

use crate::config::{Distance, Mixed};
use crate::dsa::Augmentation;
use crate::problem::Problem;

/// The parameter tensors a distance compares (see [`Distance`]).
pub fn matched(layout: &Layout, d: Distance) -> Vec<&ParamInfo> {
    let weights: Vec<&ParamInfo> = layout.entries.iter().filter(|e| e.prunable()).collect();
    match d {
        Distance::Cos => weights,
        Distance::Mse => {
            // IDC matches conv weights only (its `--fc` is off by default).
            let convs: Vec<&ParamInfo> =
                weights.iter().copied().filter(|e| e.shape.len() == 4).collect();
            if convs.is_empty() {
                weights
            } else {
                convs
            }
        }
    }
}

/// The distance between real and synthetic gradients (flat, like the parameters) and its
/// gradient `u = dD/dg_syn` (zero outside the matched tensors).
pub fn distance(layout: &Layout, d: Distance, g_real: &[f32], g_syn: &[f32]) -> (f64, Vec<f32>) {
    let mut u = vec![0.0f32; g_syn.len()];
    let mut total = 0.0f64;
    for e in matched(layout, d) {
        let r = e.range();
        let (a, b, ue) = (&g_real[r.clone()], &g_syn[r.clone()], &mut u[r]);
        match d {
            Distance::Mse => {
                for ((x, y), g) in a.iter().zip(b).zip(ue.iter_mut()) {
                    let diff = *y as f64 - *x as f64;
                    total += diff * diff;
                    *g = (2.0 * diff) as f32;
                }
            }
            Distance::Cos => {
                // DC's distance_wb: each output unit's incoming gradient as one vector,
                // 1 - a.b / (|a| |b| + 1e-6) summed over units.
                let row = e.len() / e.shape[0];
                for ((ar, br), gr) in a.chunks(row).zip(b.chunks(row)).zip(ue.chunks_mut(row)) {
                    let dot: f64 = ar.iter().zip(br).map(|(x, y)| *x as f64 * *y as f64).sum();
                    let na = ar.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let nb = br.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let n = na * nb + 1e-6;
                    total += 1.0 - dot / n;
                    // d/db (1 - dot / n) = -a / n + dot * |a| * b / (|b| n^2).
                    let cb = if nb > 0.0 { dot * na / (nb * n * n) } else { 0.0 };
                    for ((x, y), g) in ar.iter().zip(br).zip(gr.iter_mut()) {
                        *g = (-(*x as f64) / n + cb * *y as f64) as f32;
                    }
                }
            }
        }
    }
    (total, u)
}

/// The synthetic side at `params`: mean cross-entropy of the decoded, augmented `stored` images
/// (all of class `label`), its parameter gradient (flat) and its gradient w.r.t. `stored`. The
/// ReLUs record or replay their patterns as `relus` says (see the module doc).
pub fn syn_pass(
    p: &Problem,
    params: &ParamVec,
    stored: &[f32],
    aug: &Arc<Augmentation>,
    label: u8,
    relus: &mut Relus,
) -> (f32, Vec<f32>, Vec<f32>) {
    let model = p.model;
    let n = stored.len() / p.shape().len();
    let tensors = model.tensors(&p.dev, params);
    let x = p.images(stored.to_vec(), n);
    let input = p.synthetic_input(x.leaky_trace(), aug);
    let logits = model.forward_with(&tensors, input, true, relus, Norms::Batch);
    let labels = vec![label; n * p.per_stored()];
    let loss = ops::cross_entropy(logits, &labels);
    let value = loss.array();
    let mut grads = loss.backward();
    let mut g_param = vec![0.0f32; model.layout.total()];
    for (e, t) in model.layout.entries.iter().zip(&tensors) {
        g_param[e.range()].copy_from_slice(grads.get_or_alloc_mut(t).expect("cpu allocation"));
    }
    let g_input = grads.get_or_alloc_mut(&x).expect("cpu allocation").to_vec();
    (value, g_param, g_input)
}

/// `params + s * u`.
fn shifted(params: &ParamVec, u: &[f32], s: f64) -> ParamVec {
    let mut q = params.clone();
    for (v, d) in q.data.iter_mut().zip(u) {
        *v = (*v as f64 + s * *d as f64) as f32;
    }
    q
}

/// `dD/dS` for one class by the central finite difference of input gradients along `u`, with the
/// ReLU `patterns` of the unshifted pass frozen in both shifted passes.
#[allow(clippy::too_many_arguments)]
pub fn mixed_derivative(
    p: &Problem,
    params: &ParamVec,
    stored: &[f32],
    aug: &Arc<Augmentation>,
    label: u8,
    u: &[f32],
    fd_eps: f64,
    patterns: &Patterns,
) -> Vec<f32> {
    let norm = u.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return vec![0.0; stored.len()];
    }
    let eps = fd_eps / norm;
    let (_, _, plus) =
        syn_pass(p, &shifted(params, u, eps), stored, aug, label, &mut Relus::Replay(patterns));
    let (_, _, minus) =
        syn_pass(p, &shifted(params, u, -eps), stored, aug, label, &mut Relus::Replay(patterns));
    plus.iter().zip(&minus).map(|(a, b)| ((*a as f64 - *b as f64) / (2.0 * eps)) as f32).collect()
}

/// `dD/dS` for one class exactly, by forward-over-reverse (`lmc_train::hvp`): the parameter
/// tangent `u` pushed through the network's backward gives `d/dX (u . dL/dtheta)` at the
/// decoded, augmented images X (ReLU patterns of the unshifted pass, as double backward), which
/// the decoding and augmentation's backward then carries to the stored pixels. One pass of
/// the second-order engine instead of the two shifted passes of [`mixed_derivative`], and no
/// step: tested against it in `tests/matching.rs`. Errors when the architecture has no
/// second-order pass.
pub fn mixed_derivative_exact(
    p: &Problem,
    params: &ParamVec,
    stored: &[f32],
    aug: &Arc<Augmentation>,
    label: u8,
    u: &[f32],
) -> lmc_train::Result<Vec<f32>> {
    let n = stored.len() / p.shape().len();
    let x = p.images(stored.to_vec(), n);
    let xa = p.synthetic_input(x.leaky_trace(), aug);
    let mut host = vec![0.0f32; xa.shape().num_elements()];
    xa.copy_into(&mut host);
    let labels = vec![label; n * p.per_stored()];
    let (_, r) = lmc_train::hvp::loss_and_input_tangent(p.model, &params.data, &host, &labels, u)?;
    // The augmentation's backward with R{dL/dX} as the output gradient: the gradient of
    // sum(X * R) w.r.t. the stored pixels.
    let r = p.dev.tensor_from_vec(r, *xa.shape());
    let mut grads = (xa * r).sum::<(), _>().backward();
    Ok(grads.get_or_alloc_mut(&x).expect("cpu allocation").to_vec())
}

/// How [`gm_step`] takes the mixed derivative, resolved from [`Mixed`] for a model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MixedDerivative {
    /// [`mixed_derivative_exact`].
    Exact,
    /// [`mixed_derivative`] with this `fd_eps`.
    Fd(f64),
}

impl MixedDerivative {
    /// `mixed` for `model`: `auto` is exact where the model has a second-order pass and no
    /// batch norm, else finite differences. With batch norm the exact pass runs the whole batch
    /// as one group (training-mode statistics couple the samples), which costs more than the
    /// two finite-difference passes, so `auto` keeps those there; `exact` asks for it anyway,
    /// and is an error naming the flag on a model without a second-order pass.
    pub fn resolve(mixed: Mixed, model: &Model, fd_eps: f64) -> lmc_train::Result<Self> {
        let exact = lmc_train::hvp::supported_in(model, NormMode::Batch);
        match mixed {
            Mixed::Exact if !exact => Err(lmc_train::Error::setting(format!(
                "--mixed exact: model {} has no exact second-order pass (use --mixed fd or auto)",
                model.spec
            ))),
            Mixed::Exact => Ok(MixedDerivative::Exact),
            Mixed::Auto if exact && model.running_statistics() == 0 => Ok(MixedDerivative::Exact),
            Mixed::Auto | Mixed::Fd => Ok(MixedDerivative::Fd(fd_eps)),
        }
    }
}

/// Scratch memory reused across steps.
pub struct GmScratch {
    bufs: GradBuffers,
    batch: Batch,
}

impl GmScratch {
    /// Buffers for `p`'s model.
    pub fn new(p: &Problem) -> GmScratch {
        GmScratch { bufs: GradBuffers::new(p.model), batch: Batch::default() }
    }
}

/// One gradient-matching step on all classes at `params`: the summed distance and its gradient
/// w.r.t. the stored pixels (class-major), written to `grad`. Draws real batches and the siamese
/// augmentation from `rng`. Returns (distance, images passed through the network): the real
/// batch, the synthetic pass, and the mixed derivative's passes (one exact, two by finite
/// differences).
#[allow(clippy::too_many_arguments)]
pub fn gm_step(
    p: &Problem,
    d: Distance,
    mixed: MixedDerivative,
    params: &ParamVec,
    rng: &mut ChaCha8Rng,
    pixels: &[f32],
    grad: &mut [f32],
    scratch: &mut GmScratch,
) -> lmc_train::Result<(f64, u64)> {
    let per_class = p.ipc * p.shape().len();
    let decoded = p.ipc * p.per_stored();
    let mut total = 0.0f64;
    let mut images = 0u64;
    for c in 0..p.classes() {
        let aug = p.strategy.sample_shared(rng, p.shape());
        p.real_batch(c, rng, &mut scratch.batch);
        let n_real = scratch.batch.labels.len();
        let x_real = if p.strategy.is_none() {
            scratch.batch.x.clone()
        } else {
            p.class_augmentation(&[aug], &[n_real]).apply_host(&scratch.batch.x)
        };
        fit::loss_and_grad(p.model, params, &x_real, &scratch.batch.labels, &mut scratch.bufs);
        let syn_aug = p.class_augmentation(&[aug], &[decoded]);
        let stored = &pixels[c * per_class..(c + 1) * per_class];
        let mut patterns = Patterns::default();
        let (_, g_syn, _) =
            syn_pass(p, params, stored, &syn_aug, c as u8, &mut Relus::Record(&mut patterns));
        let (dist, u) = distance(&p.model.layout, d, &scratch.bufs.grad, &g_syn);
        total += dist;
        let (g, passes) = match mixed {
            MixedDerivative::Exact => {
                (mixed_derivative_exact(p, params, stored, &syn_aug, c as u8, &u)?, 2)
            }
            MixedDerivative::Fd(fd_eps) => {
                (mixed_derivative(p, params, stored, &syn_aug, c as u8, &u, fd_eps, &patterns), 3)
            }
        };
        grad[c * per_class..(c + 1) * per_class].copy_from_slice(&g);
        images += (n_real + passes * decoded) as u64;
    }
    Ok((total, images))
}
