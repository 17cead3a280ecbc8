//! Second-order probes of the training loss L(theta) = mean cross-entropy over a fixed set of
//! training images (weight decay not included):
//!
//! - Hessian-vector products, exact by default ([`HvpMode::Exact`]: forward-over-reverse through
//!   the model's ops, `lmc_train::hvp`, Pearlmutter 1994 section 3), or by a central difference
//!   of gradients ([`HvpMode::Fd`], Pearlmutter 1994 section 2):
//!   Hv = [g(theta + eps v) - g(theta - eps v)] / (2 eps), with eps relative to the parameter scale
//!   (see [`HessianProblem::eps_for`]) and the difference accumulated in f64. The difference is
//!   only right where the loss is smooth along the step: on ReLU networks a basis vector or a
//!   power-iteration vector moves few coordinates far and crosses kinks, whatever the step;
//! - Hutchinson's estimators with Rademacher v (Hutchinson 1990; Bekas et al. 2007 for the
//!   diagonal; PyHessian, Yao et al. 2020): tr H = E[v.Hv], diag H = E[v * Hv], stopped when the
//!   standard error of the trace falls below a relative tolerance or at a sample cap;
//! - the top-k eigenvalues by power iteration with deflation (PyHessian's `eigenvalues`);
//! - the exact diagonal H_ii = (H e_i)_i for small models (one product per parameter);
//! - the spectral density by stochastic Lanczos quadrature (`density.rs`);
//! - per-layer summaries of the diagonal: trace, mean, and the share of |diagonal| mass that sits
//!   on masked vs kept weights (the paper's "distilled masks discard sharp parameters" evidence).

use std::time::Instant;

use lmc_train::data::{self, Batch, ImageSet, Normalization};
use lmc_train::fit::{self, GradBuffers, NormMode};
use lmc_train::hvp;
use lmc_train::model::Model;
use lmc_train::params::{Mask, ParamKind, ParamVec};
use lmc_train::seed::{self, Stream};
use lmc_train::{Error, Result};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::density::{self, DensityConfig, Quadrature};
use crate::interpolate::Split;
use crate::stats::{cell, MeanStd, Running};
use crate::{check_data, DIRECTION_STREAM};

/// Largest number of parameters (of the probed space) for which [`exact_diagonal`] runs: it costs
/// one Hessian-vector product (a few full gradients over the samples) per parameter.
pub const EXACT_DIAG_MAX_PARAMS: usize = 10_000;

/// Problems below this many forward multiply-accumulates compute a product's two gradients side
/// by side (LeNet-300-100 on 4096 images is 1.1e9).
const JOIN_BELOW_MACS: u64 = 200_000_000;

/// Gradients and products timed for [`Timing`].
const TIMING_REPEATS: usize = 3;

/// A fixed relative finite-difference step that suits smooth models (softmax regression: HVP
/// relative error ~1e-4 against the closed form); ReLU networks want smaller steps, which
/// [`HessianProblem::choose_eps`] finds.
pub const DEFAULT_EPS_REL: f64 = 3e-3;

/// The ladder [`HessianProblem::choose_eps`] walks down: 1e-2 * 10^(-k/2), k = 0..=10.
pub fn eps_ladder() -> Vec<f64> {
    (0..=10).map(|k| 1e-2 * 10f64.powf(-(k as f64) / 2.0)).collect()
}

/// Relative agreement of v.Hv between neighbouring steps that ends [`HessianProblem::choose_eps`].
pub const EPS_AGREEMENT: f64 = 1e-2;

/// How Hessian-vector products are computed. Part of a probe's identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HvpMode {
    /// Forward-over-reverse through the model's ops (`lmc_train::hvp`): exact, with ReLU's
    /// second derivative 0, as PyTorch's double backward defines it.
    #[default]
    Exact,
    /// Central differences of gradients with the relative step `eps_rel`.
    Fd,
}

impl std::fmt::Display for HvpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HvpMode::Exact => "exact",
            HvpMode::Fd => "fd",
        })
    }
}

/// How the finite-difference step was chosen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpsChoice {
    /// The relative step used.
    pub eps_rel: f64,
    /// True when chosen by the ladder, false when given.
    pub auto: bool,
    /// The ladder walked: (eps_rel, v.Hv for each probe vector).
    pub ladder: Vec<(f64, Vec<f64>)>,
    /// True when two neighbouring steps agreed (always true for a given step).
    pub agreed: bool,
}

/// Settings of Hutchinson's estimator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HutchinsonConfig {
    /// Sample cap.
    pub max_samples: usize,
    /// Never stop before this many samples.
    pub min_samples: usize,
    /// Stop when standard error / |trace| falls below this (0 = always run to the cap).
    pub tol: f64,
}

/// Settings of a Hessian probe. Part of its identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HessianConfig {
    /// Split the loss is taken on (the paper: training data).
    pub split: Split,
    /// Images in the loss (a fixed subsample; more than the split has means all of it).
    pub samples: usize,
    /// Seed of the subsample.
    pub sample_seed: u64,
    /// Images per gradient call (memory only: the gradient is the weighted mean over chunks).
    pub chunk: usize,
    /// How Hessian-vector products are computed.
    pub hvp: HvpMode,
    /// Relative finite-difference step ([`HvpMode::Fd`] only); `None` = chosen per problem by
    /// [`HessianProblem::choose_eps`].
    pub eps_rel: Option<f64>,
    /// Probe only the subnetwork: vectors and products are restricted to the kept entries of the
    /// run's mask (the Hessian of the loss as a function of the surviving weights).
    pub subnetwork: bool,
    /// Hutchinson trace and diagonal, when asked for.
    pub hutchinson: Option<HutchinsonConfig>,
    /// Number of top eigenvalues (0 = none).
    pub top_k: usize,
    /// Power-iteration cap per eigenvalue.
    pub power_iters: usize,
    /// Power iteration stops when the eigenvalue changes by less than this, relatively.
    pub power_tol: f64,
    /// Exact diagonal (small models only).
    pub exact_diag: bool,
    /// Spectral density by stochastic Lanczos quadrature, when asked for.
    pub density: Option<DensityConfig>,
    /// Seed of the random probe vectors.
    pub seed: u64,
    /// Batch-norm models: the loss in evaluation mode (running statistics, the default) or in
    /// training mode (each chunk normalised by its own statistics).
    #[serde(default = "running")]
    pub bn_mode: NormMode,
}

fn running() -> NormMode {
    NormMode::Running
}

impl HessianConfig {
    /// Checks the settings, naming the flag at fault.
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(Error::setting("--samples must be at least 1"));
        }
        if self.chunk == 0 {
            return Err(Error::setting("--chunk must be at least 1"));
        }
        if let Some(e) = self.eps_rel {
            if self.hvp != HvpMode::Fd {
                return Err(Error::setting(format!(
                    "--eps-rel {e}: the finite-difference step applies only to --hvp fd"
                )));
            }
            if !(e.is_finite() && e > 0.0) {
                return Err(Error::setting(format!(
                    "--eps-rel {e}: must be a positive number (or auto)"
                )));
            }
        }
        if let Some(h) = &self.hutchinson {
            if h.max_samples == 0 {
                return Err(Error::setting("--max-samples must be at least 1"));
            }
            if !(h.tol >= 0.0 && h.tol.is_finite()) {
                return Err(Error::setting(format!("--tol {}: must be >= 0", h.tol)));
            }
        }
        if self.top_k > 0 && self.power_iters == 0 {
            return Err(Error::setting("--power-iters must be at least 1"));
        }
        if let Some(d) = &self.density {
            if d.steps == 0 || d.runs == 0 {
                return Err(Error::setting(
                    "--density and --density-runs must be at least 1 (0: no density)",
                ));
            }
        }
        if self.hutchinson.is_none()
            && self.top_k == 0
            && !self.exact_diag
            && self.density.is_none()
        {
            return Err(Error::setting("nothing to compute: ask for --trace (Hutchinson trace and diagonal), --top-k K, --exact-diag or --density N"));
        }
        Ok(())
    }
}

/// The loss on a fixed set of images at fixed parameters, with gradients and Hessian-vector
/// products.
pub struct HessianProblem<'a> {
    model: &'a Model,
    params: &'a ParamVec,
    /// Normalised images, one chunk per entry.
    chunks: Vec<Batch>,
    n: usize,
    restrict: Option<Mask>,
    scale: f64,
    norm: f64,
    eps_rel: f64,
    norm_mode: NormMode,
    mode: HvpMode,
}

impl<'a> HessianProblem<'a> {
    /// The loss of `model` at `params` on all of `set` (no augmentation), in chunks of `chunk`
    /// images. With `restrict`, vectors live on the kept entries of that mask only. Products are
    /// exact ([`HvpMode::Exact`]) when the architecture has them, else by finite differences,
    /// unless [`HessianProblem::with_hvp`] says otherwise; `eps_rel` is the finite-difference
    /// step for [`HvpMode::Fd`].
    pub fn new(
        model: &'a Model,
        params: &'a ParamVec,
        set: &ImageSet,
        norm: &Normalization,
        chunk: usize,
        eps_rel: f64,
        restrict: Option<Mask>,
    ) -> Result<HessianProblem<'a>> {
        check_data(model, set, "the Hessian's samples")?;
        params.check_same_layout(&model.layout, "Hessian")?;
        if chunk == 0 {
            return Err(Error::setting("--chunk must be at least 1"));
        }
        if let Some(m) = &restrict {
            m.validate(&model.layout)?;
        }
        // Batch-norm running statistics are state, not parameters: never probed.
        let restrict = match restrict {
            Some(m) if model.layout.state_total() > 0 => Some(m),
            None if model.layout.state_total() > 0 => Some(Mask::dense(&model.layout)),
            other => other,
        }
        .map(|mut m| {
            for e in model.layout.entries.iter().filter(|e| !e.trainable()) {
                m.keep[e.range()].fill(false);
            }
            m
        });
        let idx: Vec<u32> = (0..set.len() as u32).collect();
        let chunks = idx
            .chunks(chunk)
            .map(|c| {
                let mut b = Batch::default();
                data::fill_batch(set, norm, c, None, &mut b);
                b
            })
            .collect();
        // The parameter scale: root mean square of the entries in the probed space.
        let (mut s, mut k) = (0f64, 0usize);
        for (i, &p) in params.data.iter().enumerate() {
            if restrict.as_ref().is_none_or(|m| m.keep[i]) {
                s += (p as f64).powi(2);
                k += 1;
            }
        }
        // All-zero parameters (never trained) fall back to unit scale.
        let (scale, norm) = if k > 0 && s > 0.0 {
            ((s / k as f64).sqrt(), s.sqrt())
        } else {
            (1.0, (k.max(1) as f64).sqrt())
        };
        let mode = if hvp::supported(model) { HvpMode::Exact } else { HvpMode::Fd };
        Ok(HessianProblem {
            model,
            params,
            chunks,
            n: set.len(),
            restrict,
            scale,
            norm,
            eps_rel,
            norm_mode: NormMode::Running,
            mode,
        })
    }

    /// The loss with batch norms in `mode` (default: evaluation mode, running statistics; in
    /// training mode each chunk is normalised by its own statistics, for the gradient and the
    /// exact product alike). Errors if training mode cannot normalise a chunk (a batch of one on
    /// 1x1 planes).
    pub fn with_norm_mode(mut self, mode: NormMode) -> Result<Self> {
        if mode == NormMode::Batch {
            for b in &self.chunks {
                self.model.check_train_batch(b.labels.len(), "--bn-mode batch with --chunk")?;
            }
        }
        self.norm_mode = mode;
        Ok(self)
    }

    /// The same problem with its products computed as `mode` says. Errors when the model has no
    /// exact product.
    pub fn with_hvp(mut self, mode: HvpMode) -> Result<Self> {
        if mode == HvpMode::Exact && !hvp::supported_in(self.model, self.norm_mode) {
            return Err(Error::incompatible(format!(
                "--hvp exact: model {} has no exact Hessian-vector product; use --hvp fd",
                self.model.spec
            )));
        }
        self.mode = mode;
        Ok(self)
    }

    /// How products are computed.
    pub fn hvp_mode(&self) -> HvpMode {
        self.mode
    }

    /// Number of parameters (the dimension of H).
    pub fn dim(&self) -> usize {
        self.params.len()
    }
    /// Number of images in the loss.
    pub fn samples(&self) -> usize {
        self.n
    }
    /// The mask vectors are restricted to, if any.
    pub fn restriction(&self) -> Option<&Mask> {
        self.restrict.as_ref()
    }
    /// Number of coordinates in the probed space.
    pub fn space_dim(&self) -> usize {
        self.restrict.as_ref().map_or(self.dim(), |m| m.keep.iter().filter(|&&k| k).count())
    }
    /// Root mean square of the parameters in the probed space.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// Euclidean norm of the parameters in the probed space (the step's reference length).
    pub fn norm(&self) -> f64 {
        self.norm
    }

    /// Mean loss and gradient (f64) at `theta`, summed over chunks weighted by their size.
    pub fn loss_and_gradient(&self, theta: &[f32]) -> (f64, Vec<f64>) {
        let p = ParamVec { layout: self.params.layout.clone(), data: theta.to_vec() };
        let mut bufs = GradBuffers::new(self.model);
        bufs.norm_mode = self.norm_mode;
        let mut g = vec![0f64; theta.len()];
        let mut loss = 0f64;
        for b in &self.chunks {
            let w = b.labels.len() as f64 / self.n as f64;
            let (l, _) = fit::loss_and_grad(self.model, &p, &b.x, &b.labels, &mut bufs);
            loss += w * l as f64;
            for (gi, &bi) in g.iter_mut().zip(&bufs.grad) {
                *gi += w * bi as f64;
            }
        }
        (loss, g)
    }

    /// Mean loss and gradient at the problem's parameters.
    pub fn gradient(&self) -> (f64, Vec<f64>) {
        self.loss_and_gradient(&self.params.data)
    }

    /// The step for direction `v`: eps = eps_rel * ||theta|| / ||v|| (norms over the probed space),
    /// so the perturbation eps * v always has length eps_rel * ||theta||: relative to the
    /// parameter scale (a fixed absolute step would be too small for large weights and too large
    /// for small ones). For a Rademacher vector each coordinate then moves by
    /// eps_rel times the parameters' RMS value; a basis vector e_i gets the same total step, which
    /// keeps the f32 gradients' rounding error small against the change it measures.
    pub fn eps_for(&self, v: &[f64]) -> f64 {
        let n = dot(v, v).sqrt();
        if n == 0.0 {
            0.0
        } else {
            self.eps_rel * self.norm / n
        }
    }

    /// Multiply-accumulates of one forward pass over all samples.
    pub fn macs(&self) -> u64 {
        self.model.forward_macs() * self.n as u64
    }

    /// Sets the relative step.
    pub fn set_eps_rel(&mut self, eps_rel: f64) {
        self.eps_rel = eps_rel;
    }

    /// The relative step in use.
    pub fn eps_rel(&self) -> f64 {
        self.eps_rel
    }

    /// Chooses the relative step and sets it. The central difference has two error sources
    /// pulling opposite ways: f32 rounding of the gradients (grows like 1/eps) and the change of
    /// curvature within +-eps v, which in ReLU networks includes gradient jumps where a unit
    /// switches on or off (grows with eps). Walking down [`eps_ladder`], the step is the smaller
    /// of the first neighbouring pair whose v.Hv agree within [`EPS_AGREEMENT`] for `vectors`
    /// Rademacher vectors: agreement means the truncation error has become small (it shrinks
    /// tenfold per rung) while rounding, which averages out in v.Hv, does not yet dominate. On
    /// softmax regression this stops at the top of the ladder (~3e-3); on a trained
    /// LeNet-300-100 on 1024 images near 1e-5. ReLU networks on many images may never agree (each
    /// rung crosses different kinks); then the larger step of the pair that came closest is used,
    /// which keeps a margin from the rounding floor.
    pub fn choose_eps(&mut self, seed: u64, vectors: usize) -> EpsChoice {
        let vs: Vec<Vec<f64>> = (0..vectors.max(1))
            .map(|k| {
                let mut v = rademacher(self.dim(), seed ^ 0x6570_735f, k as u64);
                self.project(&mut v);
                v
            })
            .collect();
        let mut ladder: Vec<(f64, Vec<f64>)> = Vec::new();
        // (disagreement, larger step of the pair)
        let mut best = (f64::INFINITY, DEFAULT_EPS_REL);
        for e in eps_ladder() {
            self.eps_rel = e;
            let s: Vec<f64> = vs.iter().map(|v| dot(v, &self.hvp(v))).collect();
            if let Some((_, prev)) = ladder.last() {
                let worst = s
                    .iter()
                    .zip(prev)
                    .map(|(a, b)| {
                        let scale = a.abs().max(b.abs());
                        if scale == 0.0 {
                            0.0
                        } else {
                            (a - b).abs() / scale
                        }
                    })
                    .fold(0f64, f64::max);
                if worst < best.0 {
                    best = (worst, ladder.last().map_or(e, |l| l.0));
                }
                if worst <= EPS_AGREEMENT {
                    ladder.push((e, s));
                    return EpsChoice { eps_rel: e, auto: true, ladder, agreed: true };
                }
            }
            ladder.push((e, s));
        }
        self.eps_rel = best.1;
        EpsChoice { eps_rel: best.1, auto: true, ladder, agreed: false }
    }

    /// H v, in f64, exact or by finite differences as the problem's [`HvpMode`] says.
    /// Restricted problems take and return vectors that are zero off the mask.
    pub fn hvp(&self, v: &[f64]) -> Vec<f64> {
        assert_eq!(v.len(), self.dim(), "hvp: vector of {} for {} parameters", v.len(), self.dim());
        let mut hv = match self.mode {
            HvpMode::Exact => self.hvp_exact(v),
            HvpMode::Fd => self.hvp_fd(v),
        };
        if let Some(m) = &self.restrict {
            for (h, &k) in hv.iter_mut().zip(&m.keep) {
                if !k {
                    *h = 0.0;
                }
            }
        }
        hv
    }

    /// H v by forward-over-reverse, chunk by chunk, weighted by chunk size, batch norms in the
    /// problem's mode (as the gradient).
    fn hvp_exact(&self, v: &[f64]) -> Vec<f64> {
        let v32: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        let mut hv = vec![0f64; v.len()];
        for b in &self.chunks {
            let w = b.labels.len() as f64 / self.n as f64;
            let (_, h) = hvp::loss_and_hvp_in(
                self.model,
                self.norm_mode,
                &self.params.data,
                &b.x,
                &b.labels,
                &v32,
            )
            .expect("with_hvp checked that the model has an exact product");
            for (a, x) in hv.iter_mut().zip(&h) {
                *a += w * x;
            }
        }
        hv
    }

    /// H v by a central difference of gradients, in f64.
    fn hvp_fd(&self, v: &[f64]) -> Vec<f64> {
        let eps = self.eps_for(v);
        if eps == 0.0 {
            return vec![0.0; v.len()];
        }
        let shifted = |sign: f64| -> Vec<f32> {
            self.params
                .data
                .iter()
                .zip(v)
                .map(|(&p, &d)| (p as f64 + sign * eps * d) as f32)
                .collect()
        };
        let (tp, tm) = (shifted(1.0), shifted(-1.0));
        // The two gradients are independent. Small problems run them side by side (their GEMMs are
        // too small to keep both cores busy); large ones one after the other, each using all
        // cores inside its ops. Either way each gradient is deterministic.
        let ((_, gp), (_, gm)) = if self.macs() < JOIN_BELOW_MACS {
            rayon::join(|| self.loss_and_gradient(&tp), || self.loss_and_gradient(&tm))
        } else {
            (self.loss_and_gradient(&tp), self.loss_and_gradient(&tm))
        };
        gp.iter().zip(&gm).map(|(a, b)| (a - b) / (2.0 * eps)).collect()
    }

    /// Zeroes the entries of `v` outside the probed space.
    pub fn project(&self, v: &mut [f64]) {
        if let Some(m) = &self.restrict {
            for (x, &k) in v.iter_mut().zip(&m.keep) {
                if !k {
                    *x = 0.0;
                }
            }
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A Rademacher vector (entries +-1 with probability 1/2), zero off the probed space.
pub fn rademacher(dim: usize, seed: u64, index: u64) -> Vec<f64> {
    let mut rng = seed::rng(seed, Stream::Other, DIRECTION_STREAM + (1 << 32) + index);
    let mut v = Vec::with_capacity(dim);
    while v.len() < dim {
        let bits: u64 = rng.gen();
        for b in 0..64.min(dim - v.len()) {
            v.push(if bits >> b & 1 == 1 { 1.0 } else { -1.0 });
        }
    }
    v
}

/// Result of Hutchinson's estimator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hutchinson {
    /// Samples drawn.
    pub samples: usize,
    /// Estimated trace (mean of v.Hv).
    pub trace: f64,
    /// Its standard error.
    pub trace_se: f64,
    /// True when the relative tolerance was met before the cap.
    pub converged: bool,
    /// v.Hv of each sample, in order (for convergence plots).
    pub per_sample: Vec<f64>,
    /// Per tensor of the layout, sum over its entries of v_i (Hv)_i of each sample: `[sample][tensor]`.
    pub per_layer_samples: Vec<Vec<f64>>,
    /// Estimated diagonal (mean of v * Hv).
    pub diagonal: Vec<f64>,
}

/// Hutchinson's trace and diagonal estimates with Rademacher vectors drawn from `seed`: stop when
/// standard error / |trace| < `cfg.tol` (after `cfg.min_samples`), or at `cfg.max_samples`.
/// `on_sample(k, running)` is called after each sample.
pub fn hutchinson(
    p: &HessianProblem,
    cfg: &HutchinsonConfig,
    seed: u64,
    on_sample: &mut dyn FnMut(usize, &Running),
) -> Hutchinson {
    let dim = p.dim();
    let layout = &p.params.layout;
    let mut diag = vec![0f64; dim];
    let mut running = Running::default();
    let (mut per_sample, mut per_layer_samples) = (Vec::new(), Vec::new());
    let mut converged = false;
    for s in 0..cfg.max_samples {
        let mut v = rademacher(dim, seed, s as u64);
        p.project(&mut v);
        let hv = p.hvp(&v);
        let mut t = 0f64;
        let mut layers = Vec::with_capacity(layout.entries.len());
        for e in &layout.entries {
            let mut lt = 0f64;
            for i in e.range() {
                let d = v[i] * hv[i];
                diag[i] += d;
                lt += d;
            }
            t += lt;
            layers.push(lt);
        }
        running.push(t);
        per_sample.push(t);
        per_layer_samples.push(layers);
        on_sample(s + 1, &running);
        let se = running.standard_error();
        if cfg.tol > 0.0 && s + 1 >= cfg.min_samples.max(2) && se < cfg.tol * running.mean().abs() {
            converged = true;
            break;
        }
    }
    let n = per_sample.len().max(1) as f64;
    diag.iter_mut().for_each(|d| *d /= n);
    Hutchinson {
        samples: per_sample.len(),
        trace: running.mean(),
        trace_se: running.standard_error(),
        converged,
        per_sample,
        per_layer_samples,
        diagonal: diag,
    }
}

/// One eigenvalue found by power iteration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Eigen {
    /// The eigenvalue (Rayleigh quotient v.Hv of the final unit vector).
    pub value: f64,
    /// Hessian-vector products used.
    pub iterations: usize,
    /// True when the relative change fell below the tolerance.
    pub converged: bool,
}

/// The `k` eigenvalues of largest magnitude, by power iteration with deflation: each new vector is
/// kept orthogonal to the eigenvectors already found (PyHessian's scheme); returned largest
/// magnitude first. Starting vectors are
/// Gaussian, drawn from `seed`. Returns the values and the unit eigenvectors.
pub fn top_eigenvalues(
    p: &HessianProblem,
    k: usize,
    iters: usize,
    tol: f64,
    seed: u64,
) -> (Vec<Eigen>, Vec<Vec<f64>>) {
    let dim = p.dim();
    let mut vecs: Vec<Vec<f64>> = Vec::new();
    let mut out = Vec::new();
    let orthonormalise = |v: &mut Vec<f64>, vecs: &[Vec<f64>]| -> f64 {
        for u in vecs {
            let c = dot(v, u);
            v.iter_mut().zip(u).for_each(|(x, y)| *x -= c * y);
        }
        let n = dot(v, v).sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
        n
    };
    for j in 0..k.min(p.space_dim()) {
        let mut rng = seed::rng(seed, Stream::Other, DIRECTION_STREAM + (2 << 32) + j as u64);
        let mut v: Vec<f64> = (0..dim)
            .map(|_| {
                let (u1, u2): (f64, f64) = (1.0 - rng.gen::<f64>(), rng.gen());
                (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
            })
            .collect();
        p.project(&mut v);
        orthonormalise(&mut v, &vecs);
        let (mut value, mut prev, mut converged, mut used) = (0.0, f64::NAN, false, 0);
        for _ in 0..iters {
            let mut hv = p.hvp(&v);
            used += 1;
            value = dot(&v, &hv);
            let n = orthonormalise(&mut hv, &vecs);
            if n == 0.0 {
                converged = true;
                break;
            }
            v = hv;
            if (value - prev).abs() <= tol * value.abs() {
                converged = true;
                break;
            }
            prev = value;
        }
        out.push(Eigen { value, iterations: used, converged });
        vecs.push(v);
    }
    // The relative-change test can stop a vector whose start had little of the top
    // eigenvector at the next one down (its Rayleigh quotient then changes slowly); deflation
    // then finds the top one later. Sorted, the found set is reported largest magnitude first.
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&a, &b| out[b].value.abs().total_cmp(&out[a].value.abs()));
    let sorted = order.iter().map(|&i| out[i].clone()).collect();
    let svecs = order.iter().map(|&i| vecs[i].clone()).collect();
    (sorted, svecs)
}

/// The exact diagonal, H_ii = (H e_i)_i, one product per coordinate of the probed space (entries
/// outside it are 0). Refuses spaces above [`EXACT_DIAG_MAX_PARAMS`].
pub fn exact_diagonal(p: &HessianProblem) -> Result<Vec<f64>> {
    let d = p.space_dim();
    if d > EXACT_DIAG_MAX_PARAMS {
        return Err(Error::setting(format!(
            "--exact-diag: the model has {d} parameters in the probed space, above the limit of {EXACT_DIAG_MAX_PARAMS} (the exact diagonal costs one Hessian-vector product per parameter); use the Hutchinson estimate (--trace) instead"
        )));
    }
    let dim = p.dim();
    let coords: Vec<usize> =
        (0..dim).filter(|&i| p.restriction().is_none_or(|m| m.keep[i])).collect();
    let vals: Vec<(usize, f64)> = coords
        .par_iter()
        .map(|&i| {
            let mut e = vec![0f64; dim];
            e[i] = 1.0;
            (i, p.hvp(&e)[i])
        })
        .collect();
    let mut diag = vec![0f64; dim];
    for (i, v) in vals {
        diag[i] = v;
    }
    Ok(diag)
}

/// Summary of the Hessian diagonal over one tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSummary {
    /// Tensor name (`all weights` / `all` for the totals).
    pub name: String,
    /// Weight, Bias, NormScale, NormShift (or `-` for totals).
    pub kind: String,
    /// Entries.
    pub size: usize,
    /// Entries the mask keeps.
    pub kept: usize,
    /// Sum of the diagonal (this tensor's block trace).
    pub trace: f64,
    /// Standard error of that trace (Hutchinson; 0 for the exact diagonal).
    pub trace_se: f64,
    /// trace / size.
    pub mean_diag: f64,
    /// Mean diagonal over kept entries (NaN when none).
    pub mean_diag_kept: f64,
    /// Mean diagonal over masked entries (NaN when none).
    pub mean_diag_masked: f64,
    /// Sum of |diagonal|.
    pub abs_mass: f64,
    /// Share of that mass on kept entries, in [0, 1].
    pub kept_mass_fraction: f64,
    /// Share of that mass on masked entries, in [0, 1] (0 for a dense mask).
    pub masked_mass_fraction: f64,
}

fn summarise(
    name: String,
    kind: String,
    idx: &mut dyn Iterator<Item = usize>,
    diag: &[f64],
    mask: &Mask,
    se: f64,
) -> LayerSummary {
    let (mut size, mut kept, mut trace, mut tk, mut tm, mut mk, mut mm) =
        (0, 0, 0f64, 0f64, 0f64, 0f64, 0f64);
    for i in idx {
        let d = diag[i];
        size += 1;
        trace += d;
        if mask.keep[i] {
            kept += 1;
            tk += d;
            mk += d.abs();
        } else {
            tm += d;
            mm += d.abs();
        }
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let mass = mk + mm;
    LayerSummary {
        name,
        kind,
        size,
        kept,
        trace,
        trace_se: se,
        mean_diag: ratio(trace, size as f64),
        mean_diag_kept: ratio(tk, kept as f64),
        mean_diag_masked: ratio(tm, (size - kept) as f64),
        abs_mass: mass,
        kept_mass_fraction: ratio(mk, mass),
        masked_mass_fraction: ratio(mm, mass),
    }
}

/// Per-tensor summaries of `diag` against `mask`, then one row over all weights and one over
/// every trained parameter (batch-norm state is not probed and has no rows). `per_layer_samples` (Hutchinson's `[sample][tensor]` sums) give the standard
/// errors; without them they are 0 (exact diagonal).
pub fn layer_summaries(
    params: &ParamVec,
    diag: &[f64],
    mask: &Mask,
    per_layer_samples: Option<&[Vec<f64>]>,
) -> Vec<LayerSummary> {
    let layout = &params.layout;
    let se_of = |f: &dyn Fn(&[f64]) -> f64| -> f64 {
        match per_layer_samples {
            Some(s) if s.len() > 1 => {
                MeanStd::of(&s.iter().map(|row| f(row)).collect::<Vec<_>>()).standard_error()
            }
            Some(_) => f64::NAN,
            None => 0.0,
        }
    };
    let mut rows: Vec<LayerSummary> = layout
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.trainable())
        .map(|(t, e)| {
            summarise(
                e.name.clone(),
                format!("{:?}", e.kind),
                &mut e.range(),
                diag,
                mask,
                se_of(&|row| row[t]),
            )
        })
        .collect();
    let weights: Vec<usize> = (0..layout.entries.len())
        .filter(|&t| layout.entries[t].kind == ParamKind::Weight)
        .collect();
    let mut widx = weights.iter().flat_map(|&t| layout.entries[t].range());
    let wse = se_of(&|row| weights.iter().map(|&t| row[t]).sum());
    rows.push(summarise("all weights".into(), "-".into(), &mut widx, diag, mask, wse));
    let ase = se_of(&|row| row.iter().sum());
    let trained = layout.trainable_total();
    rows.push(summarise("all".into(), "-".into(), &mut (0..trained), diag, mask, ase));
    rows
}

/// Wall-clock costs measured while probing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    /// One full gradient over the samples (seconds, mean of 3 after a warm-up).
    pub gradient_seconds: f64,
    /// One Hessian-vector product (seconds, mean of 3 timed alone; by finite differences its two
    /// gradients run side by side).
    pub hvp_seconds: f64,
    /// `hvp_seconds / gradient_seconds`.
    pub hvp_in_gradients: f64,
    /// Hutchinson estimation (seconds).
    pub hutchinson_seconds: f64,
    /// Power iteration (seconds).
    pub eigen_seconds: f64,
    /// Exact diagonal (seconds).
    pub exact_diag_seconds: f64,
    /// Spectral density (seconds).
    pub density_seconds: f64,
}

/// Result of a Hessian probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HessianReport {
    /// The settings.
    pub config: HessianConfig,
    /// Images in the loss.
    pub samples: usize,
    /// Parameters of the model.
    pub parameters: usize,
    /// Coordinates probed (the kept entries with `subnetwork`).
    pub space: usize,
    /// RMS of the probed parameters.
    pub parameter_rms: f64,
    /// Norm of the probed parameters (the perturbation has length eps_rel times this).
    pub parameter_norm: f64,
    /// The finite-difference step and how it was chosen (`--hvp fd` only).
    pub eps: Option<EpsChoice>,
    /// Loss at the parameters, on the samples.
    pub loss: f64,
    /// Norm of the gradient there.
    pub gradient_norm: f64,
    /// Hutchinson trace (and, inside, the diagonal estimate's per-sample data).
    pub trace: Option<TraceEstimate>,
    /// Top eigenvalues, largest magnitude first.
    pub eigenvalues: Vec<Eigen>,
    /// Stochastic Lanczos quadrature, one per run (empty unless asked for).
    pub density: Vec<Quadrature>,
    /// Trace of the exact diagonal, when computed.
    pub exact_trace: Option<f64>,
    /// Where `diagonal` came from: `exact`, `hutchinson` or `none`.
    pub diagonal_source: String,
    /// The diagonal (exact when computed, else Hutchinson's); omitted from JSON summaries.
    pub diagonal: Option<Vec<f32>>,
    /// Which mask the per-layer masked/kept split uses.
    pub mask_source: String,
    /// Per-tensor summaries of the diagonal.
    pub layers: Vec<LayerSummary>,
    /// Costs.
    pub timing: Timing,
}

/// The scalar parts of a Hutchinson run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceEstimate {
    /// Samples drawn.
    pub samples: usize,
    /// Estimated trace.
    pub trace: f64,
    /// Its standard error.
    pub trace_se: f64,
    /// True when the tolerance was met before the cap.
    pub converged: bool,
    /// Median of the per-sample v.Hv: a robust companion to the mean, since in ReLU networks a
    /// product that crosses a kink is an outlier.
    pub median: f64,
    /// v.Hv of each sample.
    pub per_sample: Vec<f64>,
}

impl HessianReport {
    /// Errors unless the sizes a reader relies on agree: the probed space within the
    /// parameters, a diagonal of one value per parameter, one Hutchinson sample per sample
    /// counted, at most `top_k` eigenvalues.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.space > self.parameters {
            return Err(format!("{} parameters probed of {}", self.space, self.parameters));
        }
        if let Some(d) = self.diagonal.as_ref().filter(|d| d.len() != self.parameters) {
            return Err(format!(
                "a diagonal of {} values for {} parameters",
                d.len(),
                self.parameters
            ));
        }
        if let Some(t) = self.trace.as_ref().filter(|t| t.per_sample.len() != t.samples) {
            return Err(format!("{} trace samples listed of {}", t.per_sample.len(), t.samples));
        }
        if self.eigenvalues.len() > self.config.top_k {
            return Err(format!(
                "{} eigenvalues for top-k {}",
                self.eigenvalues.len(),
                self.config.top_k
            ));
        }
        Ok(())
    }
    /// The report without the per-parameter diagonal (for JSON and `lmc inspect`).
    pub fn without_diagonal(&self) -> HessianReport {
        HessianReport { diagonal: None, ..self.clone() }
    }
}

/// Runs the probes `cfg` asks for on `params` over `set` (already subsampled). `mask` is the run's
/// mask (used by `subnetwork`); `summary_mask` splits the per-layer mass into kept/masked
/// (usually the same mask). `progress(what, done, total)` reports progress.
#[allow(clippy::too_many_arguments)]
pub fn probe(
    model: &Model,
    params: &ParamVec,
    mask: &Mask,
    summary_mask: (&Mask, &str),
    set: &ImageSet,
    norm: &Normalization,
    cfg: &HessianConfig,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<HessianReport> {
    cfg.validate()?;
    summary_mask.0.validate(&model.layout)?;
    let restrict = cfg.subnetwork.then(|| mask.clone());
    let mut p = HessianProblem::new(
        model,
        params,
        set,
        norm,
        cfg.chunk,
        cfg.eps_rel.unwrap_or(DEFAULT_EPS_REL),
        restrict,
    )?
    .with_norm_mode(cfg.bn_mode)?
    .with_hvp(cfg.hvp)?;
    // A Hessian on d parameters has d eigenvalues; power iteration keeps one vector per
    // eigenvalue asked for, so more than d would also run on and on.
    if cfg.top_k > p.space_dim() {
        return Err(Error::setting(format!(
            "--top-k {}: at most the {} parameters probed (a Hessian has as many eigenvalues as parameters)",
            cfg.top_k,
            p.space_dim()
        )));
    }
    if cfg.exact_diag && p.space_dim() > EXACT_DIAG_MAX_PARAMS {
        // Refuse before spending time on anything else.
        exact_diagonal(&p)?;
    }
    let eps = match (cfg.hvp, cfg.eps_rel) {
        (HvpMode::Exact, _) => None,
        (HvpMode::Fd, Some(e)) => {
            Some(EpsChoice { eps_rel: e, auto: false, ladder: vec![], agreed: true })
        }
        (HvpMode::Fd, None) => {
            progress("choosing the step", 0, 1);
            Some(p.choose_eps(cfg.seed, 2))
        }
    };
    let p = p;
    // The loss and gradient at theta (also a warm-up), then the costs: the mean of a few
    // gradients and of a few products, measured alone so that parallel work elsewhere (the exact
    // diagonal) does not blur them.
    let (loss, g) = p.gradient();
    let t = Instant::now();
    for _ in 0..TIMING_REPEATS {
        std::hint::black_box(p.gradient());
    }
    let gradient_seconds = t.elapsed().as_secs_f64() / TIMING_REPEATS as f64;
    let t = Instant::now();
    for k in 0..TIMING_REPEATS {
        let mut v = rademacher(p.dim(), cfg.seed ^ 0x7469_6d65, k as u64);
        p.project(&mut v);
        std::hint::black_box(p.hvp(&v));
    }
    let hvp_seconds = t.elapsed().as_secs_f64() / TIMING_REPEATS as f64;

    let mut trace = None;
    let mut hutch_diag = None;
    let mut per_layer = None;
    let mut hutchinson_seconds = 0.0;
    if let Some(h) = &cfg.hutchinson {
        let t = Instant::now();
        let r = hutchinson(&p, h, cfg.seed, &mut |k, _| progress("Hutchinson", k, h.max_samples));
        hutchinson_seconds = t.elapsed().as_secs_f64();
        let mut sorted = r.per_sample.clone();
        sorted.sort_by(f64::total_cmp);
        let k = sorted.len();
        let median = if k == 0 {
            f64::NAN
        } else if k % 2 == 1 {
            sorted[k / 2]
        } else {
            0.5 * (sorted[k / 2 - 1] + sorted[k / 2])
        };
        trace = Some(TraceEstimate {
            samples: r.samples,
            trace: r.trace,
            trace_se: r.trace_se,
            converged: r.converged,
            median,
            per_sample: r.per_sample.clone(),
        });
        hutch_diag = Some(r.diagonal);
        per_layer = Some(r.per_layer_samples);
    }
    let mut eigenvalues = Vec::new();
    let mut eigen_seconds = 0.0;
    if cfg.top_k > 0 {
        let t = Instant::now();
        progress("power iteration", 0, cfg.top_k);
        let (e, _) = top_eigenvalues(&p, cfg.top_k, cfg.power_iters, cfg.power_tol, cfg.seed);
        eigen_seconds = t.elapsed().as_secs_f64();
        eigenvalues = e;
    }
    let (mut quadrature, mut density_seconds) = (Vec::new(), 0.0);
    if let Some(dc) = &cfg.density {
        let t = Instant::now();
        let total = dc.steps.min(p.space_dim()) * dc.runs;
        progress("spectral density", 0, total);
        quadrature = density::lanczos_quadrature(&p, dc, cfg.seed, &mut |k| {
            progress("spectral density", k, total)
        });
        density_seconds = t.elapsed().as_secs_f64();
    }
    let (mut exact_trace, mut exact, mut exact_diag_seconds) = (None, None, 0.0);
    if cfg.exact_diag {
        let t = Instant::now();
        progress("exact diagonal", 0, p.space_dim());
        let d = exact_diagonal(&p)?;
        exact_diag_seconds = t.elapsed().as_secs_f64();
        exact_trace = Some(d.iter().sum());
        exact = Some(d);
    }
    let (diagonal_source, diag, samples_for_se) = match (exact, hutch_diag) {
        (Some(d), _) => ("exact", Some(d), None),
        (None, Some(d)) => ("hutchinson", Some(d), per_layer),
        (None, None) => ("none", None, None),
    };
    let layers = match &diag {
        Some(d) => layer_summaries(params, d, summary_mask.0, samples_for_se.as_deref()),
        None => Vec::new(),
    };
    Ok(HessianReport {
        config: cfg.clone(),
        samples: p.samples(),
        parameters: p.dim(),
        space: p.space_dim(),
        parameter_rms: p.scale(),
        parameter_norm: p.norm(),
        eps,
        loss,
        gradient_norm: dot(&g, &g).sqrt(),
        trace,
        eigenvalues,
        density: quadrature,
        exact_trace,
        diagonal_source: diagonal_source.into(),
        diagonal: diag.map(|d| d.into_iter().map(|x| x as f32).collect()),
        mask_source: summary_mask.1.to_string(),
        layers,
        timing: Timing {
            gradient_seconds,
            hvp_seconds,
            hvp_in_gradients: hvp_seconds / gradient_seconds,
            hutchinson_seconds,
            eigen_seconds,
            exact_diag_seconds,
            density_seconds,
        },
    })
}

/// CSV of the per-layer summaries.
pub fn csv(r: &HessianReport) -> String {
    let mut s = String::from(
        "tensor,kind,size,kept,trace,trace_se,mean_diag,mean_diag_kept,mean_diag_masked,abs_mass,kept_mass_fraction,masked_mass_fraction\n",
    );
    for l in &r.layers {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{}\n",
            l.name,
            l.kind,
            l.size,
            l.kept,
            cell(l.trace),
            cell(l.trace_se),
            cell(l.mean_diag),
            cell(l.mean_diag_kept),
            cell(l.mean_diag_masked),
            cell(l.abs_mass),
            cell(l.kept_mass_fraction),
            cell(l.masked_mass_fraction)
        ));
    }
    s
}

/// CSV of the spectral density curve (`eigenvalue,density`), when one was asked for.
pub fn density_csv(r: &HessianReport) -> Option<String> {
    if r.density.is_empty() {
        return None;
    }
    let mut s = String::from("eigenvalue,density\n");
    for (x, d) in density::curve(&r.density) {
        s.push_str(&format!("{x},{d}\n"));
    }
    Some(s)
}

/// CSV of Hutchinson's samples and eigenvalues: `what,index,value,running_mean,running_se`.
pub fn samples_csv(r: &HessianReport) -> String {
    let mut s = String::from("what,index,value,running_mean,running_se\n");
    if let Some(t) = &r.trace {
        let mut run = Running::default();
        for (k, &v) in t.per_sample.iter().enumerate() {
            run.push(v);
            s.push_str(&format!(
                "trace_sample,{},{},{},{}\n",
                k + 1,
                v,
                run.mean(),
                cell(run.standard_error())
            ));
        }
    }
    for (k, e) in r.eigenvalues.iter().enumerate() {
        s.push_str(&format!("eigenvalue,{},{},,\n", k + 1, e.value));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmc_train::params::Layout;

    #[test]
    fn rademacher_is_balanced_and_seeded() {
        let v = rademacher(10_000, 3, 0);
        assert!(v.iter().all(|&x| x == 1.0 || x == -1.0));
        let s: f64 = v.iter().sum();
        // Sum of 10,000 signs: standard deviation 100; 5 sigma bound.
        assert!(s.abs() < 500.0, "{s}");
        assert_eq!(v, rademacher(10_000, 3, 0));
        assert_ne!(v, rademacher(10_000, 3, 1));
    }

    #[test]
    fn layer_summaries_split_mass_by_mask() {
        let l = Layout::new([
            ("w".to_string(), vec![2, 2], ParamKind::Weight),
            ("b".to_string(), vec![2], ParamKind::Bias),
        ]);
        let p = ParamVec::zeros(l.clone());
        let diag = [1.0, -2.0, 3.0, 4.0, 0.5, 0.5];
        let mut m = Mask::dense(&l);
        m.keep[2] = false; // masks the 3.0
        let rows = layer_summaries(&p, &diag, &m, None);
        let w = &rows[0];
        assert_eq!((w.size, w.kept), (4, 3));
        assert_eq!(w.trace, 6.0);
        assert_eq!(w.mean_diag, 1.5);
        assert_eq!(w.mean_diag_kept, 1.0);
        assert_eq!(w.mean_diag_masked, 3.0);
        // |mass| = 1 + 2 + 3 + 4 = 10, 3 of it masked.
        assert_eq!(w.abs_mass, 10.0);
        assert!((w.masked_mass_fraction - 0.3).abs() < 1e-15);
        assert!((w.kept_mass_fraction - 0.7).abs() < 1e-15);
        assert_eq!(rows[1].masked_mass_fraction, 0.0);
        assert_eq!(rows[2].name, "all weights");
        assert_eq!(rows[3].trace, 7.0);
        assert_eq!(rows[3].trace_se, 0.0);
    }
}
