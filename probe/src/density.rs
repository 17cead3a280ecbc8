//! The Hessian's spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao
//! 2019; PyHessian's `density`, Yao et al. 2020): per run, `steps` Lanczos iterations from a
//! normalised Rademacher vector give a tridiagonal T whose eigenvalues (Ritz values) are
//! quadrature nodes and whose eigenvectors' squared first components are their weights; the
//! density is the weights' Gaussian mixture at the nodes, averaged over runs.

use serde::{Deserialize, Serialize};

use crate::hessian::{rademacher, HessianProblem};

/// Settings of the density estimate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DensityConfig {
    /// Lanczos iterations per run (quadrature nodes per run; PyHessian: 100).
    pub steps: usize,
    /// Independent runs (starting vectors) averaged.
    pub runs: usize,
}

/// One run's quadrature: Ritz values and their weights (summing to 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Quadrature {
    /// Ritz values, ascending.
    pub nodes: Vec<f64>,
    /// Their weights.
    pub weights: Vec<f64>,
}

/// Points of the density curve written to the CSV.
pub const GRID: usize = 1000;

/// Gaussian width of the curve, relative to the nodes' range (PyHessian uses 1e-5 of it as
/// variance; a width this size makes a readable curve from ~100 nodes).
pub const SIGMA_REL: f64 = 0.01;

/// Stochastic Lanczos quadrature of `p`'s Hessian: `cfg.runs` runs of `cfg.steps` products
/// (fewer when the Krylov space is exhausted), starting vectors drawn from `seed`. Lanczos with
/// full reorthogonalisation (the vectors are kept; `steps` is small).
pub fn lanczos_quadrature(
    p: &HessianProblem,
    cfg: &DensityConfig,
    seed: u64,
    on_step: &mut dyn FnMut(usize),
) -> Vec<Quadrature> {
    let dim = p.dim();
    let steps = cfg.steps.min(p.space_dim());
    let mut out = Vec::with_capacity(cfg.runs);
    let mut done = 0;
    for run in 0..cfg.runs {
        let mut v = rademacher(dim, seed ^ 0x0073_6c71, run as u64);
        p.project(&mut v);
        let n = dot(&v, &v).sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        let mut basis: Vec<Vec<f64>> = vec![v];
        let (mut alpha, mut beta) = (Vec::new(), Vec::new());
        for j in 0..steps {
            let mut w = p.hvp(&basis[j]);
            done += 1;
            on_step(done);
            let a = dot(&w, &basis[j]);
            alpha.push(a);
            // Full reorthogonalisation (twice is enough, Parlett's rule).
            for _ in 0..2 {
                for u in &basis {
                    let c = dot(&w, u);
                    w.iter_mut().zip(u).for_each(|(x, y)| *x -= c * y);
                }
            }
            let b = dot(&w, &w).sqrt();
            if j + 1 == steps || b <= 1e-10 * a.abs().max(1e-300) {
                break;
            }
            beta.push(b);
            w.iter_mut().for_each(|x| *x /= b);
            basis.push(w);
        }
        out.push(tridiagonal_quadrature(&alpha, &beta));
    }
    out
}

/// Eigenvalues of the symmetric tridiagonal matrix (diagonal `alpha`, off-diagonal `beta`) and
/// the squared first components of its unit eigenvectors, by cyclic Jacobi rotations on the
/// dense matrix (at most a few hundred rows).
pub fn tridiagonal_quadrature(alpha: &[f64], beta: &[f64]) -> Quadrature {
    let m = alpha.len();
    let mut a = vec![0f64; m * m];
    for i in 0..m {
        a[i * m + i] = alpha[i];
        if i + 1 < m {
            a[i * m + i + 1] = beta[i];
            a[(i + 1) * m + i] = beta[i];
        }
    }
    // Rows of `u` (u[k * m + i]) accumulate the rotations: row 0 of the eigenvector matrix is
    // all the weights need, but the full matrix keeps the code plain.
    let mut u = vec![0f64; m * m];
    for i in 0..m {
        u[i * m + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..m)
            .flat_map(|i| (0..m).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * m + j].powi(2))
            .sum();
        let total: f64 = a.iter().map(|v| v * v).sum();
        if off <= 1e-28 * total {
            break;
        }
        for p in 0..m {
            for q in p + 1..m {
                let apq = a[p * m + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * m + q] - a[p * m + p]) / (2.0 * apq);
                let t = if theta == 0.0 {
                    1.0
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..m {
                    let (akp, akq) = (a[k * m + p], a[k * m + q]);
                    a[k * m + p] = c * akp - s * akq;
                    a[k * m + q] = s * akp + c * akq;
                }
                for k in 0..m {
                    let (apk, aqk) = (a[p * m + k], a[q * m + k]);
                    a[p * m + k] = c * apk - s * aqk;
                    a[q * m + k] = s * apk + c * aqk;
                }
                for k in 0..m {
                    let (ukp, ukq) = (u[k * m + p], u[k * m + q]);
                    u[k * m + p] = c * ukp - s * ukq;
                    u[k * m + q] = s * ukp + c * ukq;
                }
            }
        }
    }
    let mut pairs: Vec<(f64, f64)> = (0..m).map(|k| (a[k * m + k], u[k].powi(2))).collect();
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0));
    Quadrature {
        nodes: pairs.iter().map(|p| p.0).collect(),
        weights: pairs.iter().map(|p| p.1).collect(),
    }
}

/// The density on [`GRID`] points spanning the nodes (padded by 5 widths each side): the
/// runs' Gaussian mixtures (width [`SIGMA_REL`] of the nodes' range), averaged.
pub fn curve(runs: &[Quadrature]) -> Vec<(f64, f64)> {
    let all = runs.iter().flat_map(|q| q.nodes.iter().copied());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| (l.min(x), h.max(x)));
    if !lo.is_finite() {
        return Vec::new();
    }
    let sigma = (SIGMA_REL * (hi - lo)).max(1e-12 * hi.abs().max(1.0));
    let (a, b) = (lo - 5.0 * sigma, hi + 5.0 * sigma);
    let norm = 1.0 / (runs.len() as f64 * sigma * (std::f64::consts::TAU).sqrt());
    (0..GRID)
        .map(|i| {
            let t = a + (b - a) * i as f64 / (GRID - 1) as f64;
            let d: f64 = runs
                .iter()
                .flat_map(|q| q.nodes.iter().zip(&q.weights))
                .map(|(x, w)| w * (-0.5 * ((t - x) / sigma).powi(2)).exp())
                .sum();
            (t, d * norm)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tridiagonal_quadrature_of_known_matrices() {
        // [[2, 1], [1, 2]]: eigenvalues 1 and 3, eigenvectors (1, -1)/sqrt2 and (1, 1)/sqrt2, so
        // both weights are 1/2.
        let q = tridiagonal_quadrature(&[2.0, 2.0], &[1.0]);
        assert!((q.nodes[0] - 1.0).abs() < 1e-12 && (q.nodes[1] - 3.0).abs() < 1e-12);
        assert!(q.weights.iter().all(|w| (w - 0.5).abs() < 1e-12), "{q:?}");
        // Weights sum to 1 and the first moment is alpha_0 (e1^T T e1).
        let q = tridiagonal_quadrature(&[1.0, -2.0, 0.5, 3.0], &[0.7, 1.1, -0.4]);
        assert!((q.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let m1: f64 = q.nodes.iter().zip(&q.weights).map(|(x, w)| x * w).sum();
        assert!((m1 - 1.0).abs() < 1e-12, "{m1}");
        // The second moment is e1^T T^2 e1 = alpha_0^2 + beta_0^2.
        let m2: f64 = q.nodes.iter().zip(&q.weights).map(|(x, w)| x * x * w).sum();
        assert!((m2 - (1.0 + 0.49)).abs() < 1e-12, "{m2}");
    }

    #[test]
    fn curve_integrates_to_one() {
        let q = Quadrature { nodes: vec![-1.0, 0.5, 4.0], weights: vec![0.2, 0.5, 0.3] };
        let c = curve(&[q.clone(), q]);
        let dx = c[1].0 - c[0].0;
        let area: f64 = c.iter().map(|p| p.1).sum::<f64>() * dx;
        assert!((area - 1.0).abs() < 1e-3, "{area}");
    }
}
