//! Hessian probes against the closed-form Hessian of softmax regression (`mlp:` with no hidden
//! layer). With logits z = W x + b, p = softmax(z) and the mean cross-entropy over N images,
//!
//!   H = (1/N) sum_n (diag(p_n) - p_n p_n^T) (x) x~_n x~_n^T,   x~ = [x; 1],
//!
//! in our layout: W (classes x inputs) row-major, so W[k][d] is entry k*D + d, then b[k] at
//! K*D + k (the bias is the weight of the constant input 1). Eigenvalues of that matrix come from
//! independent eigen-solvers written here (Householder + QL, checked against cyclic Jacobi).

mod common;

use common::eigen::{jacobi_eigenvalues, ql_eigenvalues};

use lmc_probe::hessian::{
    self, HessianConfig, HessianProblem, HutchinsonConfig, HvpMode, EXACT_DIAG_MAX_PARAMS,
};
use lmc_probe::interpolate::Split;
use lmc_probe::subsample;
use lmc_train::data::{self, Batch, ImageSet};
use lmc_train::fit::Run;
use lmc_train::params::Mask;

struct Exact {
    /// Parameters.
    p: usize,
    /// Dense H, row-major p x p.
    h: Vec<f64>,
}

impl Exact {
    fn mul(&self, v: &[f64]) -> Vec<f64> {
        (0..self.p).map(|i| (0..self.p).map(|j| self.h[i * self.p + j] * v[j]).sum()).collect()
    }
    fn diag(&self) -> Vec<f64> {
        (0..self.p).map(|i| self.h[i * self.p + i]).collect()
    }
}

/// The closed-form Hessian of softmax regression `run` on `set`, in f64.
fn closed_form(run: &Run, set: &ImageSet, ds: &lmc_train::data::Dataset) -> Exact {
    let k = run.model.classes;
    let d = run.model.input.len();
    let p = k * (d + 1);
    assert_eq!(run.params.len(), p, "softmax regression layout");
    let w = run.params.get("fc.weight").unwrap();
    let b = run.params.get("fc.bias").unwrap();
    let mut batch = Batch::default();
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    data::fill_batch(set, &ds.norm, &idx, None, &mut batch);
    let n = set.len();
    let mut h = vec![0f64; p * p];
    let index = |c: usize, i: usize| if i == d { k * d + c } else { c * d + i };
    for s in 0..n {
        let x = &batch.x[s * d..(s + 1) * d];
        let mut xt: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        xt.push(1.0);
        let z: Vec<f64> = (0..k)
            .map(|c| (0..d).map(|i| w[c * d + i] as f64 * xt[i]).sum::<f64>() + b[c] as f64)
            .collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        let pr: Vec<f64> = e.iter().map(|v| v / sum).collect();
        for c1 in 0..k {
            for c2 in 0..k {
                let a = if c1 == c2 { pr[c1] } else { 0.0 } - pr[c1] * pr[c2];
                if a == 0.0 {
                    continue;
                }
                for i in 0..=d {
                    let ai = a * xt[i] / n as f64;
                    let row = index(c1, i) * p;
                    for j in 0..=d {
                        h[row + index(c2, j)] += ai * xt[j];
                    }
                }
            }
        }
    }
    Exact { p, h }
}

fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den
}

struct Setup {
    ds: lmc_train::data::Dataset,
    run: Run,
    set: ImageSet,
}

fn setup() -> Setup {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:", None, 0, 3);
    let set = subsample(&ds.train, Some(300), 7);
    Setup { ds, run, set }
}

#[test]
fn eigen_solvers_agree_on_known_and_random_matrices() {
    // [[2, 1], [1, 2]] has eigenvalues 3 and 1; diag(5, -1, 2) its diagonal.
    for solve in [jacobi_eigenvalues, ql_eigenvalues] {
        let e = solve(vec![2.0, 1.0, 1.0, 2.0], 2);
        assert!((e[0] - 3.0).abs() < 1e-12 && (e[1] - 1.0).abs() < 1e-12, "{e:?}");
        let e = solve(vec![5.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0], 3);
        assert!(e.iter().zip([5.0, 2.0, -1.0]).all(|(a, b)| (a - b).abs() < 1e-12), "{e:?}");
    }
    // The two independent solvers agree on a random symmetric 40 x 40 matrix, and the sum of the
    // eigenvalues is the trace.
    let n = 40;
    let mut a = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let v = ((i * 31 + j * 17) as f64 * 0.618).sin();
            a[i * n + j] = v;
            a[j * n + i] = v;
        }
    }
    let (x, y) = (jacobi_eigenvalues(a.clone(), n), ql_eigenvalues(a.clone(), n));
    assert!(x.iter().zip(&y).all(|(p, q)| (p - q).abs() < 1e-9), "{x:?} {y:?}");
    let tr: f64 = (0..n).map(|i| a[i * n + i]).sum();
    assert!((y.iter().sum::<f64>() - tr).abs() < 1e-9);
}

#[test]
fn softmax_regression_hessian_matches_closed_form() {
    let s = setup();
    let exact = closed_form(&s.run, &s.set, &s.ds);
    let mut prob =
        HessianProblem::new(&s.run.model, &s.run.params, &s.set, &s.ds.norm, 128, 1.0, None)
            .unwrap()
            .with_hvp(HvpMode::Fd)
            .unwrap();
    assert_eq!(prob.dim(), 650);
    // The automatic step: softmax regression is smooth, so the ladder agrees at its top.
    let choice = prob.choose_eps(0, 2);
    println!("automatic eps_rel {:.1e} after {} rungs", choice.eps_rel, choice.ladder.len());
    assert!(choice.agreed && choice.auto);
    assert_eq!(prob.eps_rel(), choice.eps_rel);
    assert!(choice.eps_rel >= 1e-3, "{choice:?}");
    let prob = prob;

    // Hessian-vector products: Rademacher, Gaussian-like and a basis vector.
    let mut worst = 0f64;
    for k in 0..3 {
        let v = hessian::rademacher(prob.dim(), 11, k);
        let e = rel_err(&prob.hvp(&v), &exact.mul(&v));
        worst = worst.max(e);
    }
    let smooth: Vec<f64> = (0..prob.dim()).map(|i| ((i as f64) * 0.37).sin()).collect();
    worst = worst.max(rel_err(&prob.hvp(&smooth), &exact.mul(&smooth)));
    let mut e5 = vec![0.0; prob.dim()];
    e5[5 * 64 + 20] = 1.0;
    worst = worst.max(rel_err(&prob.hvp(&e5), &exact.mul(&e5)));
    println!("HVP worst relative error {worst:.2e}");
    assert!(worst <= 1e-3, "HVP relative error {worst}");

    // Exact diagonal by finite differences vs the closed form.
    let diag = hessian::exact_diagonal(&prob).unwrap();
    let de = rel_err(&diag, &exact.diag());
    println!("exact diagonal relative error {de:.2e}");
    assert!(de <= 1e-3, "{de}");

    // Hutchinson: 200 samples, the trace within 3 standard errors of the exact trace.
    let trace: f64 = exact.diag().iter().sum();
    let cfg = HutchinsonConfig { max_samples: 200, min_samples: 10, tol: 0.0 };
    let h = hessian::hutchinson(&prob, &cfg, 5, &mut |_, _| {});
    println!(
        "trace exact {trace:.5}, Hutchinson {:.5} +- {:.5} ({} samples)",
        h.trace, h.trace_se, h.samples
    );
    assert_eq!(h.samples, 200);
    assert!(
        (h.trace - trace).abs() <= 3.0 * h.trace_se,
        "{} vs {trace} (se {})",
        h.trace,
        h.trace_se
    );
    assert!(h.trace_se > 0.0 && h.trace_se < 0.2 * trace);
    // The diagonal estimate is unbiased: its sum is the trace estimate.
    assert!((h.diagonal.iter().sum::<f64>() - h.trace).abs() < 1e-9 * trace.abs().max(1.0));

    // A relative tolerance stops early and says so.
    let loose = HutchinsonConfig { max_samples: 500, min_samples: 10, tol: 0.05 };
    let h2 = hessian::hutchinson(&prob, &loose, 5, &mut |_, _| {});
    assert!(
        h2.converged && h2.samples < 500 && h2.trace_se < 0.05 * h2.trace.abs(),
        "{} samples",
        h2.samples
    );

    // Power iteration vs Jacobi eigenvalues of the closed form.
    let ev = ql_eigenvalues(exact.h.clone(), exact.p);
    let (top, vecs) = hessian::top_eigenvalues(&prob, 2, 300, 1e-7, 3);
    println!(
        "eigenvalues exact {:.6} {:.6} {:.6}; power iteration {:.6} ({} it) {:.6} ({} it)",
        ev[0], ev[1], ev[2], top[0].value, top[0].iterations, top[1].value, top[1].iterations
    );
    assert!((top[0].value - ev[0]).abs() <= 0.01 * ev[0], "{} vs {}", top[0].value, ev[0]);
    assert!((top[1].value - ev[1]).abs() <= 0.02 * ev[1], "{} vs {}", top[1].value, ev[1]);
    // Deflation keeps the eigenvectors orthonormal.
    let d: f64 = vecs[0].iter().zip(&vecs[1]).map(|(a, b)| a * b).sum();
    assert!(d.abs() < 1e-6, "{d}");
    // Softmax regression's Hessian is positive semi-definite: the exact spectrum says so too.
    assert!(*ev.last().unwrap() > -1e-9);
}

#[test]
fn subnetwork_restriction_and_per_layer_report() {
    let s = setup();
    let mut mask = Mask::dense(&s.run.model.layout);
    for i in (0..640).step_by(3) {
        mask.keep[i] = false; // a third of the weights
    }
    let mut run = s.run.clone();
    mask.apply(&mut run.params.data);
    let exact = closed_form(&run, &s.set, &s.ds);
    let cfg = HessianConfig {
        split: Split::Train,
        samples: 300,
        sample_seed: 0,
        chunk: 100,
        hvp: HvpMode::Fd,
        eps_rel: None,
        subnetwork: false,
        hutchinson: None,
        top_k: 0,
        power_iters: 100,
        power_tol: 1e-4,
        exact_diag: true,
        density: None,
        seed: 0,
        bn_mode: lmc_train::fit::NormMode::Running,
    };
    let r = hessian::probe(
        &run.model,
        &run.params,
        &mask,
        (&mask, "run"),
        &s.set,
        &s.ds.norm,
        &cfg,
        &mut |_, _, _| {},
    )
    .unwrap();
    let want = exact.diag();
    let wmass: f64 = (0..640).map(|i| want[i].abs()).sum();
    let wmasked: f64 = (0..640).filter(|i| i % 3 == 0).map(|i| want[i].abs()).sum();
    let weights = r.layers.iter().find(|l| l.name == "fc.weight").unwrap();
    assert_eq!((weights.size, weights.kept), (640, 640 - 214));
    assert!(
        (weights.masked_mass_fraction - wmasked / wmass).abs() < 1e-3,
        "{} vs {}",
        weights.masked_mass_fraction,
        wmasked / wmass
    );
    assert!(
        (r.exact_trace.unwrap() - want.iter().sum::<f64>()).abs() < 1e-3 * want.iter().sum::<f64>()
    );
    assert_eq!(r.diagonal_source, "exact");
    assert!(r.timing.hvp_in_gradients > 0.0);

    // Restricted to the subnetwork: masked coordinates get exactly zero.
    let sub = HessianConfig { subnetwork: true, ..cfg.clone() };
    let r2 = hessian::probe(
        &run.model,
        &run.params,
        &mask,
        (&mask, "run"),
        &s.set,
        &s.ds.norm,
        &sub,
        &mut |_, _, _| {},
    )
    .unwrap();
    let d2 = r2.diagonal.unwrap();
    assert!((0..640).filter(|i| i % 3 == 0).all(|i| d2[i] == 0.0));
    assert_eq!(r2.space, 650 - 214);
    let kept_trace: f64 = (0..650).filter(|&i| mask.keep[i]).map(|i| want[i]).sum();
    assert!((r2.exact_trace.unwrap() - kept_trace).abs() < 1e-3 * kept_trace);
}

#[test]
fn exact_diagonal_refuses_large_models_before_working() {
    let ds = common::digits();
    // mlp:256 on 8x8 digits: 64*256 + 256 + 256*10 + 10 = 19,210 parameters.
    let run = common::train(&ds, "mlp:256", None, 0, 1);
    assert!(run.params.len() > EXACT_DIAG_MAX_PARAMS);
    let set = subsample(&ds.train, Some(64), 0);
    let cfg = HessianConfig {
        split: Split::Train,
        samples: 64,
        sample_seed: 0,
        chunk: 64,
        hvp: HvpMode::Fd,
        eps_rel: Some(1e-3),
        subnetwork: false,
        hutchinson: None,
        top_k: 0,
        power_iters: 10,
        power_tol: 1e-4,
        exact_diag: true,
        density: None,
        seed: 0,
        bn_mode: lmc_train::fit::NormMode::Running,
    };
    let t = std::time::Instant::now();
    let e = hessian::probe(
        &run.model,
        &run.params,
        &run.mask,
        (&run.mask, "run"),
        &set,
        &ds.norm,
        &cfg,
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("19210") && e.contains("10000") && e.contains("--trace"), "{e}");
    assert!(t.elapsed().as_secs_f64() < 1.0);
    let none = HessianConfig { exact_diag: false, ..cfg };
    assert!(none.validate().unwrap_err().to_string().contains("nothing to compute"));
}
