//! SGD with momentum, weight decay and Nesterov, with PyTorch's exact update rule, and learning
//! rate schedules.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::cpu::Build;
use crate::params::Mask;
use crate::{Error, Result};

/// SGD hyperparameters (PyTorch `torch.optim.SGD` semantics, dampening 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sgd {
    /// Momentum coefficient (0 = plain SGD).
    pub momentum: f64,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

/// Elements per parallel chunk of the update (the update is element-wise, so chunking never
/// changes results).
const CHUNK: usize = 1 << 14;

impl Sgd {
    /// One step: `grad` is consumed (overwritten), `buf` is the momentum buffer (`first` = it is
    /// uninitialised, as PyTorch's `None`). Pruned entries of `mask` get zero gradient and stay 0.
    ///
    /// PyTorch: d = g + wd*p; buf = first ? d : mu*buf + d; d = nesterov ? d + mu*buf : buf;
    /// p -= lr*d.
    pub fn step(
        &self,
        params: &mut [f32],
        grad: &mut [f32],
        buf: &mut [f32],
        first: bool,
        lr: f64,
        mask: &Mask,
    ) {
        self.step_with(Build::selected(), params, grad, buf, first, lr, mask)
    }

    /// [`Sgd::step`] with the update compiled for `build` (tests compare the builds).
    #[allow(clippy::too_many_arguments)]
    pub fn step_with(
        &self,
        build: Build,
        params: &mut [f32],
        grad: &mut [f32],
        buf: &mut [f32],
        first: bool,
        lr: f64,
        mask: &Mask,
    ) {
        let (mu, wd, lr) = (self.momentum as f32, self.weight_decay as f32, lr as f32);
        // Branch-free inner loops (the variant is a compile-time constant of `update`), so they
        // vectorise.
        let f: UpdateFn = match (mu != 0.0, first, self.nesterov) {
            (false, _, _) => chunk::<false, false, false>,
            (true, true, false) => chunk::<true, true, false>,
            (true, false, false) => chunk::<true, false, false>,
            (true, true, true) => chunk::<true, true, true>,
            (true, false, true) => chunk::<true, false, true>,
        };
        params
            .par_chunks_mut(CHUNK)
            .zip(grad.par_chunks_mut(CHUNK))
            .zip(buf.par_chunks_mut(CHUNK))
            .zip(mask.keep.par_chunks(CHUNK))
            .for_each(|(((p, g), b), keep)| f(build, p, g, b, keep, mu, wd, lr));
    }
}

/// The signature of one chunk's update.
type UpdateFn = fn(Build, &mut [f32], &[f32], &mut [f32], &[bool], f32, f32, f32);

/// [`update`] compiled for `build` (8-wide instead of the baseline's 4-wide SSE for AVX2).
#[allow(clippy::too_many_arguments)]
fn chunk<const MOM: bool, const FIRST: bool, const NEST: bool>(
    build: Build,
    p: &mut [f32],
    g: &[f32],
    b: &mut [f32],
    keep: &[bool],
    mu: f32,
    wd: f32,
    lr: f32,
) {
    build.run(
        #[inline(always)]
        || update::<MOM, FIRST, NEST>(p, g, b, keep, mu, wd, lr),
    )
}

/// The update of one chunk; `MOM`, `FIRST`, `NEST` select PyTorch's branches.
#[inline(always)]
fn update<const MOM: bool, const FIRST: bool, const NEST: bool>(
    p: &mut [f32],
    g: &[f32],
    b: &mut [f32],
    keep: &[bool],
    mu: f32,
    wd: f32,
    lr: f32,
) {
    let n = p.len();
    let (g, b, keep) = (&g[..n], &mut b[..n], &keep[..n]);
    // A pruned entry is zeroed with an AND on its bits (all ones if kept, zero if pruned): exact
    // +0 whatever the gradient holds, and, unlike a select on the bool, LLVM vectorises it.
    let kept = |k: bool, v: f32| f32::from_bits(v.to_bits() & (k as u32).wrapping_neg());
    for i in 0..n {
        let mut d = g[i] + wd * p[i];
        if MOM {
            let nb = if FIRST { d } else { mu * b[i] + d };
            b[i] = kept(keep[i], nb);
            d = if NEST { d + mu * nb } else { nb };
        }
        p[i] = kept(keep[i], p[i] - lr * d);
    }
}

/// Learning-rate schedule over the course of training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` at each milestone, given as a fraction of training (e.g. 2/3 and 5/6).
    MultiStep {
        /// Fractions of training in (0, 1), ascending.
        milestones: Vec<f64>,
        /// Factor applied at each milestone.
        gamma: f64,
    },
}

impl Schedule {
    /// Parses `constant` or `multistep:F1,F2,...` with the given gamma.
    pub fn parse(s: &str, gamma: f64) -> Result<Schedule> {
        let bad = |why: &str| {
            Error::setting(format!("--schedule '{s}': {why} (expected constant or multistep:F1,F2,... with fractions of training in (0,1))"))
        };
        match s.split_once(':') {
            None if s == "constant" => Ok(Schedule::Constant),
            Some(("multistep", list)) => {
                let milestones: Vec<f64> = list
                    .split(',')
                    .map(|m| m.trim().parse::<f64>().map_err(|_| bad("milestone is not a number")))
                    .collect::<Result<_>>()?;
                if milestones.iter().any(|&m| !(m > 0.0 && m < 1.0)) {
                    return Err(bad("milestones must lie in (0, 1)"));
                }
                if milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(bad("milestones must be ascending"));
                }
                if !(gamma > 0.0 && gamma.is_finite()) {
                    return Err(Error::setting(format!("--gamma {gamma}: must be positive")));
                }
                Ok(Schedule::MultiStep { milestones, gamma })
            }
            _ => Err(bad("unknown schedule")),
        }
    }

    /// The rate at `progress` units of `total` (epochs when training by epochs, steps otherwise).
    /// A milestone m takes effect from unit round(m * total) on, like PyTorch's MultiStepLR.
    pub fn lr(&self, base: f64, progress: u64, total: u64) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::MultiStep { milestones, gamma } => {
                let passed = milestones
                    .iter()
                    .filter(|&&m| progress >= (m * total as f64).round() as u64)
                    .count();
                base * gamma.powi(passed as i32)
            }
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Constant => write!(f, "constant"),
            Schedule::MultiStep { milestones, gamma } => {
                let m: Vec<String> = milestones.iter().map(|m| m.to_string()).collect();
                write!(f, "multistep:{} (gamma {gamma})", m.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_matches_pytorch_by_hand() {
        // p=1, g=0.5, wd=0.1, mu=0.9, lr=0.1.
        // step 1: d = 0.5 + 0.1*1 = 0.6; buf = 0.6; p = 1 - 0.06 = 0.94
        // step 2 (g=0.5): d = 0.5 + 0.094 = 0.594; buf = 0.9*0.6 + 0.594 = 1.134; p = 0.94 - 0.1134 = 0.8266
        let sgd = Sgd { momentum: 0.9, weight_decay: 0.1, nesterov: false };
        let mask = Mask { keep: vec![true, false] };
        let (mut p, mut b) = (vec![1.0f32, 3.0], vec![0.0f32; 2]);
        sgd.step(&mut p, &mut [0.5, 0.5], &mut b, true, 0.1, &mask);
        assert!((p[0] - 0.94).abs() < 1e-6);
        sgd.step(&mut p, &mut [0.5, 0.5], &mut b, false, 0.1, &mask);
        assert!((p[0] - 0.8266).abs() < 1e-6, "{}", p[0]);
        assert_eq!(p[1], 0.0);
        assert_eq!(b[1], 0.0);
        // Nesterov, step 1: d = 0.6, buf = 0.6, d = 0.6 + 0.9*0.6 = 1.14, p = 1 - 0.114 = 0.886
        let nag = Sgd { nesterov: true, ..sgd };
        let mut p = vec![1.0f32];
        nag.step(&mut p, &mut [0.5], &mut [0.0], true, 0.1, &Mask { keep: vec![true] });
        assert!((p[0] - 0.886).abs() < 1e-6);
    }

    #[test]
    fn multistep_decays_at_fractions() {
        let s = Schedule::parse("multistep:0.5,0.75", 0.1).unwrap();
        assert_eq!(s.lr(1.0, 0, 100), 1.0);
        assert_eq!(s.lr(1.0, 49, 100), 1.0);
        assert!((s.lr(1.0, 50, 100) - 0.1).abs() < 1e-7);
        assert!((s.lr(1.0, 99, 100) - 0.01).abs() < 1e-7);
        assert!(Schedule::parse("multistep:0.8,0.5", 0.1).is_err());
        assert!(Schedule::parse("multistep:1.5", 0.1).is_err());
        assert!(Schedule::parse("cosine", 0.1).is_err());
    }
}
