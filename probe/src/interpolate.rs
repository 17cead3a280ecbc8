//! Linear interpolation between trained runs and the barriers along the path.
//!
//! theta(alpha) = (1 - alpha) theta_a + alpha theta_b on a grid of alphas from 0 to 1; error
//! barrier (Frankle et al. 2020, "instability") = max_alpha Err(theta(alpha)) - mean(Err(theta_a),
//! Err(theta_b)); the loss barrier is the same for the loss. A network is called stable when the
//! error barrier is under 2 percentage points.
//!
//! Batch-norm running statistics are state in the parameter vector, so they are interpolated
//! with the weights (what the paper's authors did). With `bn_reset = Some(N)` every point is
//! also evaluated with its statistics re-estimated from N training batches (PyTorch's
//! `update_bn`: reset, then an equal-weight average of the batches' statistics in training
//! mode, no augmentation), the usual repair after averaging weights, and both sets of barriers
//! are reported.

use std::fmt;

use lmc_train::data::{self, Batch, ImageSet, Normalization};
use lmc_train::fit::{Eval, Run};
use lmc_train::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::stats::MeanStd;
use crate::{check_compatible, check_data, evaluate_points, lerp_masked, running_statistics};

/// Which split a curve was evaluated on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training split (or a fixed subsample of it).
    Train,
    /// The test split.
    Test,
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

/// Settings of an interpolation probe. Part of its identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InterpConfig {
    /// The alpha grid: increasing, from exactly 0 to exactly 1.
    pub alphas: Vec<f64>,
    /// Training images evaluated (a fixed subsample; `None` = all).
    pub train_samples: Option<usize>,
    /// Test images evaluated (a fixed subsample; `None` = all). The barrier is a paired difference
    /// on the same images, so its sampling error scales with how often the networks along the path
    /// disagree, not with the error rate: a few thousand images resolve the barriers that matter.
    #[serde(default)]
    pub test_samples: Option<usize>,
    /// Seed of that subsample (and of the order of the batches `bn_reset` draws).
    pub sample_seed: u64,
    /// Also evaluate every point with its batch-norm running statistics re-estimated from this
    /// many training batches (of the runs' batch size); `None`: interpolated statistics only.
    #[serde(default)]
    pub bn_reset: Option<usize>,
}

impl Default for InterpConfig {
    fn default() -> Self {
        InterpConfig {
            alphas: alpha_grid(11).expect("11 > 1"),
            train_samples: None,
            test_samples: None,
            sample_seed: 0,
            bn_reset: None,
        }
    }
}

/// The most alphas a path may have: each is a full evaluation of the set per pair of runs, and
/// 10,001 already resolves the path to 1e-4.
pub const MAX_ALPHAS: usize = 10_001;

/// `n` evenly spaced alphas from 0 to 1 inclusive (the authors use 11, Frankle 30).
pub fn alpha_grid(n: usize) -> Result<Vec<f64>> {
    match n {
        n if n > MAX_ALPHAS => Err(Error::setting(format!(
            "--alphas {n}: at most {MAX_ALPHAS} (each alpha is a full evaluation per pair of runs)"
        ))),
        0 => Err(Error::setting("--alphas 0: the alpha grid is empty; give at least 2 points (0 and 1 are always included)")),
        1 => Err(Error::setting("--alphas 1: a barrier needs both endpoints, so the grid needs at least 2 points")),
        _ => Ok((0..n).map(|i| if i + 1 == n { 1.0 } else { i as f64 / (n - 1) as f64 }).collect()),
    }
}

/// Errors unless `alphas` is an increasing grid from exactly 0 to exactly 1.
pub fn check_alphas(alphas: &[f64]) -> Result<()> {
    if alphas.len() > MAX_ALPHAS {
        return Err(Error::setting(format!(
            "{} alphas: at most {MAX_ALPHAS} (each alpha is a full evaluation per pair of runs)",
            alphas.len()
        )));
    }
    if alphas.is_empty() {
        return Err(Error::setting("the alpha grid is empty"));
    }
    if alphas.len() < 2 || alphas[0] != 0.0 || *alphas.last().unwrap() != 1.0 {
        return Err(Error::setting(format!(
            "the alpha grid must start at 0 and end at 1 (got {alphas:?})"
        )));
    }
    if alphas.iter().any(|a| !a.is_finite()) || alphas.windows(2).any(|w| w[1] <= w[0]) {
        return Err(Error::setting(format!(
            "the alpha grid must be strictly increasing (got {alphas:?})"
        )));
    }
    Ok(())
}

/// `(max_i values[i] - (values[0] + values[last]) / 2, argmax)`: the barrier of a curve whose first
/// and last values are the endpoints. The maximum includes the endpoints, so a barrier is never
/// negative. Errors on fewer than two values or a NaN.
pub fn barrier(values: &[f64]) -> Result<(f64, usize)> {
    if values.len() < 2 {
        return Err(Error::data(format!(
            "a barrier needs at least the two endpoints, got {} values",
            values.len()
        )));
    }
    if values.iter().any(|v| v.is_nan()) {
        return Err(Error::data("a curve value is NaN"));
    }
    let mut arg = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[arg] {
            arg = i;
        }
    }
    let ends = 0.5 * (values[0] + values[values.len() - 1]);
    Ok((values[arg] - ends, arg))
}

/// One evaluated point of a path.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Position on the path (0 = first run, 1 = second).
    pub alpha: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
    /// 1 - accuracy.
    pub error: f64,
}

/// A path evaluated on one split, with its barriers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitCurve {
    /// The split.
    pub split: Split,
    /// Images evaluated per point.
    pub count: usize,
    /// One point per alpha.
    pub points: Vec<CurvePoint>,
    /// Error barrier as a fraction (0.02 = 2 percentage points).
    pub error_barrier: f64,
    /// Alpha where the error peaks.
    pub error_barrier_alpha: f64,
    /// Loss barrier (nats).
    pub loss_barrier: f64,
    /// Alpha where the loss peaks.
    pub loss_barrier_alpha: f64,
}

impl SplitCurve {
    /// Builds the curve and its barriers from evaluations at `alphas`.
    pub fn new(split: Split, alphas: &[f64], evals: &[Eval]) -> Result<SplitCurve> {
        let points: Vec<CurvePoint> = alphas
            .iter()
            .zip(evals)
            .map(|(&alpha, e)| CurvePoint {
                alpha,
                loss: e.loss,
                accuracy: e.accuracy,
                error: 1.0 - e.accuracy,
            })
            .collect();
        let errors: Vec<f64> = points.iter().map(|p| p.error).collect();
        let losses: Vec<f64> = points.iter().map(|p| p.loss).collect();
        let (error_barrier, ea) = barrier(&errors)?;
        let (loss_barrier, la) = barrier(&losses)?;
        Ok(SplitCurve {
            split,
            count: evals.first().map_or(0, |e| e.count),
            error_barrier,
            error_barrier_alpha: alphas[ea],
            loss_barrier,
            loss_barrier_alpha: alphas[la],
            points,
        })
    }
}

/// The path between runs `a` and `b` (indices into the probe's inputs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairResult {
    /// First run (alpha = 0).
    pub a: usize,
    /// Second run (alpha = 1).
    pub b: usize,
    /// Euclidean distance between their parameter vectors.
    pub l2_distance: f64,
    /// One curve per split (running statistics interpolated with the weights).
    pub curves: Vec<SplitCurve>,
    /// With `bn_reset`: one curve per split with re-estimated running statistics (else empty).
    #[serde(default)]
    pub reset_curves: Vec<SplitCurve>,
}

/// Mean and standard deviation of the barriers over all pairs, per split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BarrierSummary {
    /// The split.
    pub split: Split,
    /// Error barriers (fractions).
    pub error_barrier: MeanStd,
    /// Loss barriers.
    pub loss_barrier: MeanStd,
}

/// Result of an interpolation probe.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interpolation {
    /// The settings.
    pub config: InterpConfig,
    /// Every pair (i < j) of the input runs.
    pub pairs: Vec<PairResult>,
    /// Barrier statistics over the pairs, per split (running statistics interpolated).
    pub summary: Vec<BarrierSummary>,
    /// With `bn_reset`: the same with re-estimated running statistics (else empty).
    #[serde(default)]
    pub reset_summary: Vec<BarrierSummary>,
    /// L2 distance statistics over the pairs.
    pub l2_distance: MeanStd,
    /// What happened to running normalisation statistics.
    pub norm_statistics: String,
}

/// What [`interpolate`] says about running normalisation statistics of `runs`' architecture.
pub const NO_RUNNING_STATS: &str =
    "none: this architecture keeps no running normalisation statistics (instance norm or no norm), so there is nothing to interpolate or re-estimate";

/// Interpolates every pair of `runs` (same architecture and mask) on `sets`, at `cfg.alphas`.
/// `sets` are evaluated as given (subsample the training split before calling); `train` is the
/// whole training split, which `cfg.bn_reset` draws its batches from.
pub fn interpolate(
    runs: &[&Run],
    sets: &[(Split, &ImageSet)],
    norm: &Normalization,
    cfg: &InterpConfig,
    train: &ImageSet,
) -> Result<Interpolation> {
    if runs.len() < 2 {
        return Err(Error::setting(format!(
            "interpolation needs at least two runs, got {}",
            runs.len()
        )));
    }
    let names: Vec<String> = (0..runs.len()).map(|i| format!("run {}", i + 1)).collect();
    check_compatible(runs, &names)?;
    check_alphas(&cfg.alphas)?;
    if sets.is_empty() {
        return Err(Error::setting("no split to evaluate on"));
    }
    let model = &runs[0].model;
    for (split, set) in sets {
        check_data(model, set, &format!("the {split} split"))?;
    }
    let batch = runs[0].config.batch_size;
    let (norm_statistics, reset) = match (running_statistics(model), cfg.bn_reset) {
        (0, None) => (NO_RUNNING_STATS.to_string(), None),
        (0, Some(_)) => {
            return Err(Error::setting(format!(
                "--bn-reset: model {} has no batch norm, so there are no running statistics to re-estimate",
                model.spec
            )))
        }
        (n, None) => (format!("interpolated: the running statistics of {n} batch-norm layers are interpolated with the weights (--bn-reset N re-estimates them)"), None),
        (n, Some(k)) => {
            let batches = reset_batches(train, norm, batch, k, cfg.sample_seed)?;
            let what = format!("both: the running statistics of {n} batch-norm layers interpolated with the weights (summary, curves) and re-estimated at every point from {k} training batches of {batch} images without augmentation (reset_summary, reset_curves)");
            (what, Some(batches))
        }
    };
    let mask = &runs[0].mask;
    let mut pairs = Vec::new();
    for i in 0..runs.len() {
        for j in i + 1..runs.len() {
            let (a, b) = (&runs[i].params, &runs[j].params);
            let l2_distance = a.l2_distance(b)?;
            let mut curves = Vec::new();
            for (split, set) in sets {
                let evals = evaluate_points(
                    model,
                    cfg.alphas.len(),
                    |k| lerp_masked(a, b, cfg.alphas[k], mask),
                    set,
                    norm,
                )?;
                curves.push(SplitCurve::new(*split, &cfg.alphas, &evals)?);
            }
            let mut reset_curves = Vec::new();
            if let Some(batches) = &reset {
                let views: Vec<(&[f32], usize)> =
                    batches.iter().map(|b| (b.x.as_slice(), b.labels.len())).collect();
                for (split, set) in sets {
                    let evals = evaluate_points(
                        model,
                        cfg.alphas.len(),
                        |k| {
                            let mut p = lerp_masked(a, b, cfg.alphas[k], mask)?;
                            model.reestimate_running(&mut p, &views)?;
                            Ok(p)
                        },
                        set,
                        norm,
                    )?;
                    reset_curves.push(SplitCurve::new(*split, &cfg.alphas, &evals)?);
                }
            }
            pairs.push(PairResult { a: i, b: j, l2_distance, curves, reset_curves });
        }
    }
    let summarise = |curves: fn(&PairResult) -> &[SplitCurve]| -> Vec<BarrierSummary> {
        if pairs.iter().any(|p| curves(p).is_empty()) {
            return Vec::new();
        }
        sets.iter()
            .enumerate()
            .map(|(s, (split, _))| BarrierSummary {
                split: *split,
                error_barrier: MeanStd::of(
                    &pairs.iter().map(|p| curves(p)[s].error_barrier).collect::<Vec<_>>(),
                ),
                loss_barrier: MeanStd::of(
                    &pairs.iter().map(|p| curves(p)[s].loss_barrier).collect::<Vec<_>>(),
                ),
            })
            .collect()
    };
    let summary = summarise(|p| &p.curves);
    let reset_summary = summarise(|p| &p.reset_curves);
    let l2_distance = MeanStd::of(&pairs.iter().map(|p| p.l2_distance).collect::<Vec<_>>());
    Ok(Interpolation {
        config: cfg.clone(),
        pairs,
        summary,
        reset_summary,
        l2_distance,
        norm_statistics,
    })
}

/// The first `k` batches of `batch` training images in the order `seed` draws, without
/// augmentation: what `bn_reset` re-estimates running statistics from.
fn reset_batches(
    train: &ImageSet,
    norm: &Normalization,
    batch: usize,
    k: usize,
    seed: u64,
) -> Result<Vec<Batch>> {
    let n = train.len();
    if k == 0 || k.saturating_mul(batch) > n {
        return Err(Error::setting(format!(
            "--bn-reset {k}: needs between 1 and {} batches of {batch} images (the training split has {n})",
            n / batch.max(1)
        )));
    }
    let order = data::epoch_order(n, seed, 0);
    Ok(order
        .chunks_exact(batch)
        .take(k)
        .map(|idx| {
            let mut b = Batch::default();
            data::fill_batch(train, norm, idx, None, &mut b);
            b
        })
        .collect())
}

/// CSV of every curve: `pair,a,b,split,alpha,loss,accuracy,error`.
pub fn csv(r: &Interpolation) -> String {
    let mut s = String::from("pair,a,b,split,alpha,loss,accuracy,error\n");
    for (k, p) in r.pairs.iter().enumerate() {
        for c in &p.curves {
            for pt in &c.points {
                s.push_str(&format!(
                    "{k},{},{},{},{},{},{},{}\n",
                    p.a, p.b, c.split, pt.alpha, pt.loss, pt.accuracy, pt.error
                ));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barriers_of_hand_made_curves() {
        // Flat: no barrier.
        assert_eq!(barrier(&[0.1, 0.1, 0.1]).unwrap(), (0.0, 0));
        // A bump of 0.3 above endpoints 0.1 and 0.2: max 0.45 - mean 0.15 = 0.3 at index 2.
        let (b, i) = barrier(&[0.1, 0.2, 0.45, 0.3, 0.2]).unwrap();
        assert!((b - 0.3).abs() < 1e-15 && i == 2, "{b} {i}");
        // Monotone from 0.1 to 0.5: the maximum is an endpoint, barrier = 0.5 - 0.3 = 0.2.
        let (b, i) = barrier(&[0.1, 0.2, 0.3, 0.4, 0.5]).unwrap();
        assert!((b - 0.2).abs() < 1e-15 && i == 4);
        // A dip below both endpoints (convex-like): the barrier is half the endpoint gap.
        let (b, _) = barrier(&[1.0, 0.2, 0.6]).unwrap();
        assert!((b - 0.2).abs() < 1e-15);
        // Two points: the barrier is |e1 - e0| / 2.
        assert_eq!(barrier(&[0.0, 0.5]).unwrap().0, 0.25);
        assert!(barrier(&[0.3]).is_err());
        assert!(barrier(&[]).is_err());
        assert!(barrier(&[0.1, f64::NAN, 0.2]).is_err());
    }

    #[test]
    fn alpha_grids() {
        assert_eq!(alpha_grid(2).unwrap(), vec![0.0, 1.0]);
        assert_eq!(alpha_grid(5).unwrap(), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        let g = alpha_grid(30).unwrap();
        assert_eq!((g[0], g[29]), (0.0, 1.0));
        check_alphas(&g).unwrap();
        assert!(alpha_grid(0).unwrap_err().to_string().contains("empty"));
        assert!(alpha_grid(1).is_err());
        assert!(check_alphas(&[]).is_err());
        assert!(check_alphas(&[0.0, 0.6, 0.5, 1.0]).is_err());
        assert!(check_alphas(&[0.1, 1.0]).is_err());
    }

    #[test]
    fn split_curve_uses_error_not_accuracy() {
        let e = |loss, accuracy| Eval { loss, accuracy, count: 100 };
        // Errors 0.10, 0.40, 0.20: barrier 0.40 - 0.15 = 0.25 at alpha 0.5; losses 0.3, 0.9, 0.5:
        // barrier 0.9 - 0.4 = 0.5.
        let c = SplitCurve::new(
            Split::Test,
            &[0.0, 0.5, 1.0],
            &[e(0.3, 0.9), e(0.9, 0.6), e(0.5, 0.8)],
        )
        .unwrap();
        assert!((c.error_barrier - 0.25).abs() < 1e-12);
        assert_eq!(c.error_barrier_alpha, 0.5);
        assert!((c.loss_barrier - 0.5).abs() < 1e-12);
        assert_eq!(c.count, 100);
    }
}
