//! Exact Hessian-vector products (`lmc_train::hvp`, forward-over-reverse) against independent
//! references:
//! - hand-derived Hessians: softmax regression (`(diag p - p p^T) (x) x~ x~^T`) and a network
//!   with one hidden ReLU unit (Gauss-Newton term plus the residual's cross terms);
//! - the full Hessian of tiny ReLU MLPs and ConvNets assembled from H e_i, checked symmetric and
//!   against float64 central differences of an independent float64 gradient
//!   (`common/reference.rs`) at steps verified not to flip any ReLU input's sign;
//! - ResNets (batch norm in evaluation and in training mode, instance norm, none; identity and
//!   strided 1x1-conv shortcuts; ResNet-10 down to 1x1 planes): the trained block of the
//!   Hessian, or random columns of it, and dense directions against the same central
//!   differences, symmetry, zero state rows; a ResNet trained on digits; the pixel tangent;
//! - the finite-difference product on the smooth model, and thread-count independence.
//!
//! The `#[ignore]`d tests print the acceptance numbers on digits (run them with
//! `cargo test --release -p lmc-probe --test hvp -- --ignored --nocapture`).

mod common;

use common::eigen::ql_eigenvalues;
use common::reference::{cd_hessian, Reference};
use lmc_probe::density::{self, DensityConfig};
use lmc_probe::hessian::{self, HessianProblem, HvpMode};
use lmc_probe::subsample;
use lmc_train::data::{self, Batch, ImageSet, ImageShape};
use lmc_train::fit::NormMode;
use lmc_train::fit::Run;
use lmc_train::hvp::{loss_and_hvp, loss_and_hvp_in};
use lmc_train::model::{Model, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A model on random inputs with random labels, its parameters nudged off PyTorch's init so
/// biases are not symmetric.
struct Tiny {
    model: Model,
    params: Vec<f32>,
    x: Vec<f32>,
    y: Vec<u8>,
}

fn tiny(spec: &str, shape: (usize, usize, usize), classes: usize, n: usize, seed: u64) -> Tiny {
    let spec: ModelSpec = spec.parse().unwrap();
    let input = ImageShape { channels: shape.0, height: shape.1, width: shape.2 };
    let model = Model::new(&spec, input, classes).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut params = model.init(seed).data;
    for p in params.iter_mut() {
        *p += rng.gen_range(-0.3f32..0.3);
    }
    let x = (0..n * input.len()).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
    let y = (0..n).map(|_| rng.gen_range(0..classes as u8)).collect();
    Tiny { model, params, x, y }
}

/// H (row-major) assembled from H e_i by the exact product.
fn assembled(model: &Model, params: &[f32], x: &[f32], y: &[u8]) -> Vec<f64> {
    let p = params.len();
    let mut h = vec![0f64; p * p];
    for i in 0..p {
        let mut e = vec![0f32; p];
        e[i] = 1.0;
        let (_, col) = loss_and_hvp(model, params, x, y, &e).unwrap();
        for j in 0..p {
            h[j * p + i] = col[j];
        }
    }
    h
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0f64, |a, b| a.max(b.abs()))
}

/// Largest |a - b| over the largest |b|, and largest asymmetry of `a` over its largest entry.
fn compare(a: &[f64], b: &[f64], p: usize) -> (f64, f64) {
    let scale = max_abs(b);
    let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
    let mut asym = 0f64;
    for i in 0..p {
        for j in 0..i {
            asym = asym.max((a[i * p + j] - a[j * p + i]).abs());
        }
    }
    (err, asym / max_abs(a))
}

fn check_against_central_differences(t: &Tiny, what: &str) {
    let p = t.params.len();
    let exact = assembled(&t.model, &t.params, &t.x, &t.y);
    let r = Reference::of(&t.model);
    let (cd, step) = cd_hessian(&r, &f64s(&t.params), &f64s(&t.x), &t.y);
    let (err, asym) = compare(&exact, &cd, p);
    let (_, cd_asym) = compare(&cd, &exact, p);
    println!(
        "{what}: {p} parameters, |H| max {:.3e}; exact vs central differences {err:.2e}, asymmetry {asym:.2e} (differences {cd_asym:.2e}, smallest step {step:.0e})",
        max_abs(&cd)
    );
    assert!(err < 1e-5, "{what}: exact vs central differences {err:.3e}");
    assert!(asym < 1e-5, "{what}: exact H not symmetric, {asym:.3e}");
    assert!(cd_asym < 1e-6, "{what}: the reference is not symmetric, {cd_asym:.3e}");
    // The loss of the reference and of the product agree too (same model, same data).
    let (l_ref, _, _) = r.loss_grad(&f64s(&t.params), &f64s(&t.x), &t.y);
    let (l, _) = loss_and_hvp(&t.model, &t.params, &t.x, &t.y, &vec![0.0; p]).unwrap();
    assert!((l - l_ref).abs() < 1e-5 * l_ref, "{l} vs {l_ref}");
}

#[test]
fn softmax_regression_matches_the_closed_form() {
    // H = (1/N) sum_n (diag p - p p^T) (x) x~ x~^T, x~ = [x; 1]; W is row-major (K x D), then b.
    let t = tiny("mlp:", (1, 2, 3), 4, 10, 1);
    let (k, d, n) = (4, 6, 10);
    let p = k * (d + 1);
    let mut want = vec![0f64; p * p];
    let index = |c: usize, i: usize| if i == d { k * d + c } else { c * d + i };
    for s in 0..n {
        let mut xt = f64s(&t.x[s * d..(s + 1) * d]);
        xt.push(1.0);
        let z: Vec<f64> =
            (0..k).map(|c| (0..=d).map(|i| t.params[index(c, i)] as f64 * xt[i]).sum()).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let pr: Vec<f64> = e.iter().map(|v| v / e.iter().sum::<f64>()).collect();
        for c1 in 0..k {
            for c2 in 0..k {
                let a = if c1 == c2 { pr[c1] } else { 0.0 } - pr[c1] * pr[c2];
                for i in 0..=d {
                    for j in 0..=d {
                        want[index(c1, i) * p + index(c2, j)] += a * xt[i] * xt[j] / n as f64;
                    }
                }
            }
        }
    }
    let got = assembled(&t.model, &t.params, &t.x, &t.y);
    let (err, asym) = compare(&got, &want, p);
    println!("softmax regression: closed form vs exact {err:.2e}, asymmetry {asym:.2e}");
    assert!(err < 1e-6 && asym < 1e-6, "{err} {asym}");
}

#[test]
fn one_hidden_unit_matches_the_hand_derived_hessian() {
    // x (1 input) -> z = w1 x + b1 -> h = relu(z) -> u = w2 h + b2 (2 classes), mean CE.
    // theta = (w1, b1, w2_0, w2_1, b2_0, b2_1). With J = du/dtheta, P = diag p - p p^T and
    // e = p - onehot: H = J^T P J + sum_k e_k d2u_k, where (active unit) d2u_k/dw1 dw2_k = x and
    // d2u_k/db1 dw2_k = 1; an inactive unit leaves only the b2 block.
    let mut t = tiny("mlp:1", (1, 1, 1), 2, 6, 3);
    t.params = vec![0.8, -0.1, 1.3, -0.7, 0.2, -0.4];
    t.x = vec![1.0, -0.5, 0.3, 2.0, -1.2, 0.05];
    t.y = vec![0, 1, 1, 0, 1, 0];
    let th: Vec<f64> = f64s(&t.params);
    let (w1, b1, w2) = (th[0], th[1], [th[2], th[3]]);
    let mut want = [[0f64; 6]; 6];
    for (s, &xs) in t.x.iter().enumerate() {
        let x = xs as f64;
        let z = w1 * x + b1;
        let on = z > 0.0;
        let h = z.max(0.0);
        let u = [w2[0] * h + th[4], w2[1] * h + th[5]];
        let m = u[0].max(u[1]);
        let ex = [(u[0] - m).exp(), (u[1] - m).exp()];
        let pr = [ex[0] / (ex[0] + ex[1]), ex[1] / (ex[0] + ex[1])];
        let y = t.y[s] as usize;
        let e = [pr[0] - (y == 0) as u8 as f64, pr[1] - (y == 1) as u8 as f64];
        // J: rows k = 0, 1 (logits), columns theta.
        let a = if on { 1.0 } else { 0.0 };
        let j = [
            [a * w2[0] * x, a * w2[0], h, 0.0, 1.0, 0.0],
            [a * w2[1] * x, a * w2[1], 0.0, h, 0.0, 1.0],
        ];
        let pm = [[pr[0] - pr[0] * pr[0], -pr[0] * pr[1]], [-pr[1] * pr[0], pr[1] - pr[1] * pr[1]]];
        for (p, row) in want.iter_mut().enumerate() {
            for (q, v) in row.iter_mut().enumerate() {
                for k in 0..2 {
                    for l in 0..2 {
                        *v += j[k][p] * pm[k][l] * j[l][q] / 6.0;
                    }
                }
            }
        }
        if on {
            for (k, ek) in e.iter().enumerate() {
                for (p, q, val) in [(0, 2 + k, x), (1, 2 + k, 1.0)] {
                    want[p][q] += ek * val / 6.0;
                    want[q][p] += ek * val / 6.0;
                }
            }
        }
    }
    let want: Vec<f64> = want.iter().flatten().copied().collect();
    let got = assembled(&t.model, &t.params, &t.x, &t.y);
    let (err, _) = compare(&got, &want, 6);
    println!("one hidden unit: hand-derived vs exact {err:.2e}");
    assert!(err < 1e-6, "{err}: {got:?} vs {want:?}");
}

#[test]
fn relu_mlp_hessian_matches_central_differences() {
    check_against_central_differences(&tiny("mlp:7,5", (1, 3, 3), 3, 40, 5), "mlp:7,5");
}

#[test]
fn mostly_background_inputs_take_the_sparse_first_layer_and_match_too() {
    // 85% of the inputs at their column's background (0), like MNIST: the first layer's
    // products come from the split (`sparse_input.rs`), as in the gradient.
    let mut t = tiny("mlp:6,4", (1, 4, 5), 3, 70, 6);
    let mut rng = ChaCha8Rng::seed_from_u64(60);
    for v in t.x.iter_mut() {
        *v = if rng.gen_range(0.0..1.0) < 0.85 { 0.0 } else { v.abs() + 0.1 };
    }
    check_against_central_differences(&t, "mlp:6,4 on sparse inputs");
}

#[test]
fn convnet_hessian_matches_central_differences() {
    for (spec, shape, seed) in [
        ("convnet:depth=2,width=2,norm=instance", (1, 4, 4), 7),
        ("convnet:depth=1,width=3,norm=none", (2, 5, 4), 8),
        ("convnet:depth=1,width=2,norm=instance", (2, 6, 6), 9),
    ] {
        check_against_central_differences(&tiny(spec, shape, 3, 24, seed), spec);
    }
}

#[test]
fn products_do_not_depend_on_the_thread_count() {
    for (spec, background) in
        [("mlp:9,6", false), ("mlp:9,6", true), ("convnet:depth=2,width=3,norm=instance", false)]
    {
        // More samples than one group, so groups run side by side and are summed.
        let mut t = tiny(spec, (1, 8, 8), 10, 150, 11);
        if background {
            // Mostly zeros: the sparse first layer.
            t.x.iter_mut().enumerate().filter(|(i, _)| i % 7 != 0).for_each(|(_, v)| *v = 0.0);
        }
        let v: Vec<f32> = (0..t.params.len()).map(|i| ((i as f32) * 0.37).sin()).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| loss_and_hvp(&t.model, &t.params, &t.x, &t.y, &v).unwrap())
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.0.to_bits(), b.0.to_bits(), "{spec}");
        assert!(a.1.iter().zip(&b.1).all(|(x, y)| x.to_bits() == y.to_bits()), "{spec}");
    }
}

#[test]
fn exact_and_finite_difference_products_agree_on_softmax_regression() {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:", None, 0, 3);
    let set = subsample(&ds.train, Some(300), 7);
    let prob = |mode| {
        HessianProblem::new(&run.model, &run.params, &set, &ds.norm, 128, 3e-3, None)
            .unwrap()
            .with_hvp(mode)
            .unwrap()
    };
    let (exact, fd) = (prob(HvpMode::Exact), prob(HvpMode::Fd));
    let mut worst = 0f64;
    for k in 0..3 {
        let v = hessian::rademacher(exact.dim(), 13, k);
        let (a, b) = (exact.hvp(&v), fd.hvp(&v));
        let num = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(num / b.iter().map(|y| y * y).sum::<f64>().sqrt());
    }
    println!("softmax regression: exact vs finite differences {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
}

/// The acceptance numbers of one model: the exact diagonal, trace and top-3 eigenvalues of the
/// probe (exact products) against the Hessian assembled by central differences of the float64
/// reference; and the same for finite-difference products, for comparison.
/// The run is `$LMC_HVP_RUN` (a Run artifact of `spec`, e.g. from `lmc train`) when set, else
/// trained here for `epochs`.
fn acceptance(spec: &str, samples: Option<usize>, epochs: usize) {
    let ds = common::digits();
    let run = match std::env::var_os("LMC_HVP_RUN") {
        Some(p) => {
            let run: Run = lmc_train::artifact::read(std::path::Path::new(&p)).unwrap().1;
            assert_eq!(run.model.spec.to_string(), spec.parse::<ModelSpec>().unwrap().to_string());
            run
        }
        None => common::train(&ds, spec, None, 0, epochs),
    };
    let set: ImageSet = subsample(&ds.train, samples, 0);
    let mut batch = Batch::default();
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    data::fill_batch(&set, &ds.norm, &idx, None, &mut batch);
    let p = run.params.len();
    let t0 = std::time::Instant::now();
    let r = Reference::of(&run.model);
    let (mut cd, step) = cd_hessian(&r, &f64s(&run.params.data), &f64s(&batch.x), &batch.labels);
    let (_, asym) = compare(&cd, &cd.clone(), p);
    println!(
        "{spec} on {} images, {p} parameters: reference Hessian in {:.1} s (smallest step {step:.0e})",
        set.len(),
        t0.elapsed().as_secs_f64()
    );
    // Symmetrise the reference (its asymmetry is reported) for the eigen-solver.
    for i in 0..p {
        for j in 0..i {
            let m = 0.5 * (cd[i * p + j] + cd[j * p + i]);
            cd[i * p + j] = m;
            cd[j * p + i] = m;
        }
    }
    let want_diag: Vec<f64> = (0..p).map(|i| cd[i * p + i]).collect();
    let trace: f64 = want_diag.iter().sum();
    let ev = ql_eigenvalues(cd.clone(), p);
    let mut top: Vec<f64> = ev.clone();
    top.sort_by(|a, b| b.abs().total_cmp(&a.abs()));
    println!(
        "  reference: asymmetry {asym:.1e}, trace {trace:.5}, top eigenvalues {:.5} {:.5} {:.5}",
        top[0], top[1], top[2]
    );
    let big = max_abs(&want_diag);
    for mode in [HvpMode::Exact, HvpMode::Fd] {
        let mut prob =
            HessianProblem::new(&run.model, &run.params, &set, &ds.norm, 2048, 3e-3, None)
                .unwrap()
                .with_hvp(mode)
                .unwrap();
        if mode == HvpMode::Fd {
            prob.choose_eps(0, 2);
        }
        let t1 = std::time::Instant::now();
        let diag = hessian::exact_diagonal(&prob).unwrap();
        let secs = t1.elapsed().as_secs_f64();
        let (mut worst, mut bad) = (0f64, 0);
        let mut significant = 0;
        for (g, w) in diag.iter().zip(&want_diag) {
            if w.abs() > 1e-3 * big {
                significant += 1;
                let e = (g - w).abs() / w.abs();
                worst = worst.max(e);
                bad += (e > 1e-3) as usize;
            }
        }
        let sum: f64 = diag.iter().sum();
        let (eig, _) = hessian::top_eigenvalues(&prob, 3, 500, 1e-9, 0);
        let rel: Vec<f64> = eig.iter().zip(&top).map(|(a, b)| (a.value - b) / b).collect();
        println!(
            "  {mode}: diagonal max relative error {worst:.2e} over {significant} significant entries ({bad} above 1e-3), {secs:.1} s; sum {sum:.5} vs trace {trace:.5} ({:+.3e}); top-3 {:.5} {:.5} {:.5} (relative {:+.1e} {:+.1e} {:+.1e}, {} {} {} products)",
            (sum - trace) / trace,
            eig[0].value,
            eig[1].value,
            eig[2].value,
            rel[0],
            rel[1],
            rel[2],
            eig[0].iterations,
            eig[1].iterations,
            eig[2].iterations
        );
        if mode == HvpMode::Exact {
            assert!(worst <= 1e-3, "{worst}");
            assert!(((sum - trace) / trace).abs() <= 1e-3);
            assert!(rel.iter().all(|e| e.abs() <= 5e-3), "{rel:?}");
        }
    }
}

#[test]
#[ignore = "acceptance numbers: a few minutes"]
fn acceptance_relu_mlp_on_digits() {
    acceptance("mlp:16", None, 10);
}

#[test]
#[ignore = "acceptance numbers: a few minutes"]
fn acceptance_convnet_on_digits() {
    acceptance("convnet:depth=1,width=4", Some(300), 10);
}

#[test]
fn lanczos_quadrature_recovers_the_spectrum() {
    // mlp:4 on 60 digits (310 parameters): the Hessian assembled from exact products, its
    // eigenvalues by Householder + QL; Lanczos with as many steps as parameters spans the whole
    // space, so its nodes are those eigenvalues; 30 steps already find the extremes.
    let ds = common::digits();
    let run = common::train(&ds, "mlp:4", None, 0, 3);
    let set = subsample(&ds.train, Some(60), 1);
    let prob =
        HessianProblem::new(&run.model, &run.params, &set, &ds.norm, 64, 3e-3, None).unwrap();
    let p = prob.dim();
    let mut h = vec![0f64; p * p];
    for i in 0..p {
        let mut e = vec![0f64; p];
        e[i] = 1.0;
        for (j, v) in prob.hvp(&e).into_iter().enumerate() {
            h[j * p + i] = v;
        }
    }
    for i in 0..p {
        for j in 0..i {
            let m = 0.5 * (h[i * p + j] + h[j * p + i]);
            (h[i * p + j], h[j * p + i]) = (m, m);
        }
    }
    let ev = ql_eigenvalues(h.clone(), p);
    let (top, bottom) = (ev[0], ev[p - 1]);
    let full =
        density::lanczos_quadrature(&prob, &DensityConfig { steps: p, runs: 1 }, 0, &mut |_| {});
    let q = &full[0];
    assert!((q.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    // Every node is an eigenvalue (the weights of the others may be tiny, so not conversely).
    let scale = top.abs().max(bottom.abs());
    for x in &q.nodes {
        let nearest = ev.iter().map(|e| (e - x).abs()).fold(f64::INFINITY, f64::min);
        assert!(nearest <= 1e-6 * scale, "node {x} is {nearest} from the spectrum");
    }
    let short =
        density::lanczos_quadrature(&prob, &DensityConfig { steps: 30, runs: 2 }, 0, &mut |_| {});
    for q in &short {
        let (lo, hi) = (q.nodes[0], q.nodes[q.nodes.len() - 1]);
        println!("30 Lanczos steps: nodes {lo:.6} .. {hi:.6}; spectrum {bottom:.6} .. {top:.6}");
        assert!((hi - top).abs() <= 1e-6 * scale, "{hi} vs {top}");
        // The first moment is the starting vector's Rayleigh quotient, within the spectrum.
        let m1: f64 = q.nodes.iter().zip(&q.weights).map(|(x, w)| x * w).sum();
        assert!(m1 > bottom && m1 < top);
    }
}

/// The trained prefix's length and a copy of `t`'s parameters whose running variances are
/// spread over [0.5, 2] and running means over [-0.5, 0.5] (the nudge of [`tiny`] leaves them
/// near PyTorch's 1 and 0), so batch norm's evaluation-mode statistics matter.
fn spread_running_stats(t: &mut Tiny, seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for e in &t.model.layout.entries {
        let r = e.range();
        match e.kind {
            lmc_train::params::ParamKind::RunningMean => {
                t.params[r].iter_mut().for_each(|v| *v = rng.gen_range(-0.5..0.5))
            }
            lmc_train::params::ParamKind::RunningVar => {
                t.params[r].iter_mut().for_each(|v| *v = rng.gen_range(0.5..2.0))
            }
            _ => {}
        }
    }
    t.model.layout.trainable_total()
}

/// Exact `H d` against float64 central differences of the reference gradient
/// (`common/reference.rs`: the ResNet written with plain loops) along basis vectors of the
/// trained parameters (all of them, or `columns` drawn at random) and along three dense random
/// directions, at steps verified not to flip any ReLU input's sign, with batch norms in `mode`
/// (training mode: statistics over the whole batch, the reference runs it op by op). Also: the
/// state's rows of `H d` are zero and its entries of `d` are ignored, and `u.Hv == v.Hu`.
fn check_resnet(t: &mut Tiny, what: &str, columns: Option<usize>, mode: NormMode) {
    let trained = spread_running_stats(t, 99);
    let p = t.params.len();
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let basis: Vec<usize> = match columns {
        None => (0..trained).collect(),
        Some(k) => (0..k).map(|_| rng.gen_range(0..trained)).collect(),
    };
    let dense: Vec<Vec<f64>> = (0..3)
        .map(|_| (0..p).map(|i| if i < trained { rng.gen_range(-1.0..1.0) } else { 0.0 }).collect())
        .collect();
    let mut dirs: Vec<Vec<f64>> = basis
        .iter()
        .map(|&i| {
            let mut e = vec![0f64; p];
            e[i] = 1.0;
            e
        })
        .collect();
    dirs.extend(dense.iter().cloned());
    let exact: Vec<Vec<f64>> = dirs
        .iter()
        .map(|d| {
            let d32: Vec<f32> = d.iter().map(|&v| v as f32).collect();
            loss_and_hvp_in(&t.model, mode, &t.params, &t.x, &t.y, &d32).unwrap().1
        })
        .collect();
    let r = match mode {
        NormMode::Running => Reference::of(&t.model),
        NormMode::Batch => Reference::in_training_mode(&t.model),
    };
    let (cd, step) = common::reference::cd_columns(&r, &f64s(&t.params), &f64s(&t.x), &t.y, &dirs);
    // Basis columns: the largest error over the largest entry of the block (as the full
    // Hessians above); dense directions: each over its own largest entry.
    let nb = basis.len();
    let block =
        |v: &[Vec<f64>]| -> Vec<f64> { v.iter().flat_map(|c| c[..trained].to_vec()).collect() };
    let (eb, cb) = (block(&exact[..nb]), block(&cd[..nb]));
    let mut err = eb.iter().zip(&cb).fold(0f64, |m, (a, b)| m.max((a - b).abs())) / max_abs(&cb);
    for (a, b) in exact[nb..].iter().zip(&cd[nb..]) {
        let scale = max_abs(&b[..trained]);
        err = err
            .max(a[..trained].iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale);
    }
    // Symmetry: within the basis block when it is the whole trained Hessian, else u.Hv vs v.Hu.
    let mut asym = 0f64;
    if columns.is_none() {
        for (i, col) in exact[..trained].iter().enumerate() {
            for (j, other) in exact[..i].iter().enumerate() {
                asym = asym.max((col[j] - other[i]).abs());
            }
        }
        asym /= max_abs(&eb);
    }
    for a in 0..3 {
        for b in 0..a {
            let (u, v) = (&dense[a], &dense[b]);
            let (uhv, vhu) = (
                u.iter().zip(&exact[nb + b]).map(|(x, y)| x * y).sum::<f64>(),
                v.iter().zip(&exact[nb + a]).map(|(x, y)| x * y).sum::<f64>(),
            );
            // Over |u| |H v|, the size the f32 rounding of the products scales with (u.Hv
            // itself may nearly cancel).
            let norm = |x: &[f64]| x.iter().map(|y| y * y).sum::<f64>().sqrt();
            asym = asym.max((uhv - vhu).abs() / (norm(u) * norm(&exact[nb + b])));
        }
    }
    println!(
        "{what} ({mode:?}): {trained} trained parameters ({} state), {} columns and 3 directions, |H| max {:.3e}; exact vs central differences {err:.2e}, asymmetry {asym:.2e} (smallest step {step:.0e})",
        p - trained,
        nb,
        max_abs(&cb)
    );
    assert!(err < 1e-5, "{what}: exact vs central differences {err:.3e}");
    assert!(asym < 1e-5, "{what}: exact H not symmetric, {asym:.3e}");
    for h in &exact {
        assert!(h[trained..].iter().all(|&v| v == 0.0), "{what}: state rows of H v");
    }
    // Running statistics are not parameters: a tangent on them changes nothing.
    if p > trained {
        let mut d: Vec<f32> = dense[0].iter().map(|&v| v as f32).collect();
        d[trained..].iter_mut().for_each(|v| *v = 1.0);
        let h = loss_and_hvp_in(&t.model, mode, &t.params, &t.x, &t.y, &d).unwrap().1;
        assert!(h.iter().zip(&exact[nb]).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}");
    }
    let (l_ref, _, _) = r.loss_grad(&f64s(&t.params), &f64s(&t.x), &t.y);
    let (l, _) = loss_and_hvp_in(&t.model, mode, &t.params, &t.x, &t.y, &vec![0.0; p]).unwrap();
    assert!((l - l_ref).abs() < 1e-5 * l_ref, "{what}: loss {l} vs {l_ref}");
}

#[test]
fn resnet_hessian_matches_central_differences() {
    // depth 8: one block per stage, identity shortcut in stage 1, strided 1x1-conv shortcuts
    // into stages 2 and 3 (6x6 -> 3x3 -> 2x2); each norm variant.
    for (spec, seed) in [
        ("resnet:depth=8,width=2,norm=batch", 21),
        ("resnet:depth=8,width=2,norm=instance", 22),
        ("resnet:depth=8,width=2,norm=none", 23),
    ] {
        check_resnet(&mut tiny(spec, (1, 6, 6), 3, 12, seed), spec, None, NormMode::Running);
    }
}

#[test]
fn resnet_hessian_with_training_mode_batch_norm_matches_central_differences() {
    // Batch statistics couple the 12 images: the product runs them as one group, the
    // reference op by op over the batch.
    let spec = "resnet:depth=8,width=2,norm=batch";
    check_resnet(&mut tiny(spec, (1, 6, 6), 3, 12, 21), spec, None, NormMode::Batch);
}

#[test]
fn resnet10_products_match_central_differences() {
    // DC/IDC's ResNet-10: stage 1 at stride 1 (identity shortcut), three strided stages down to
    // 1x1 planes (8x8 -> 4x4 -> 2x2 -> 1x1); 60 random columns of its 5,000-parameter Hessian.
    let spec = "resnet10:width=2";
    check_resnet(&mut tiny(spec, (1, 8, 8), 4, 10, 24), spec, Some(60), NormMode::Running);
    // Training mode, where every batch norm but the last stage's sees 10 images' planes and the
    // 1x1 planes of the last stage 10 values.
    check_resnet(&mut tiny(spec, (1, 8, 8), 4, 10, 24), spec, Some(60), NormMode::Batch);
}

#[test]
fn resnet_products_do_not_depend_on_the_thread_count() {
    let mut t = tiny("resnet:depth=8,width=3", (1, 8, 8), 10, 150, 25);
    spread_running_stats(&mut t, 26);
    let v: Vec<f32> = (0..t.params.len()).map(|i| ((i as f32) * 0.37).sin()).collect();
    for mode in [NormMode::Running, NormMode::Batch] {
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| loss_and_hvp_in(&t.model, mode, &t.params, &t.x, &t.y, &v).unwrap())
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.0.to_bits(), b.0.to_bits(), "{mode:?}");
        assert!(a.1.iter().zip(&b.1).all(|(x, y)| x.to_bits() == y.to_bits()), "{mode:?}");
    }
}

#[test]
fn resnet_probes_default_to_exact_products_in_both_batch_norm_modes() {
    // A ResNet with batch norm trained on digits, the loss in evaluation mode (the probe's
    // default) on 256 images: the products are exact by default and match float64 central
    // differences of the reference gradient along dense directions (steps verified not to flip
    // any of the 256 images' ReLU inputs). The finite-difference products of the probe
    // (`--hvp fd`) swing with the step (every rung of the ladder crosses other kinks: measured
    // 2026-12-05, relative errors from 5e-2 to 5e1); the best rung agrees loosely. Training-mode
    // batch norm gets exact products too.
    let ds = common::digits();
    let run = common::train(&ds, "resnet:depth=8,width=4", None, 0, 2);
    let set = subsample(&ds.train, Some(256), 7);
    let base =
        || HessianProblem::new(&run.model, &run.params, &set, &ds.norm, 128, 3e-3, None).unwrap();
    let exact = base();
    assert_eq!(exact.hvp_mode(), HvpMode::Exact);
    let trained = run.model.layout.trainable_total();
    let rel = |a: &[f64], b: &[f64]| {
        let num = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
        num / b.iter().map(|y| y * y).sum::<f64>().sqrt()
    };
    let dirs: Vec<Vec<f64>> = (0..2)
        .map(|k| {
            let mut v = hessian::rademacher(exact.dim(), 13, k);
            exact.project(&mut v);
            v
        })
        .collect();
    let products: Vec<Vec<f64>> = dirs.iter().map(|v| exact.hvp(v)).collect();
    let mut batch_x = Batch::default();
    let idx: Vec<u32> = (0..set.len() as u32).collect();
    data::fill_batch(&set, &ds.norm, &idx, None, &mut batch_x);
    let r = Reference::of(&run.model);
    let (cd, step) = common::reference::cd_columns(
        &r,
        &f64s(&run.params.data),
        &f64s(&batch_x.x),
        &batch_x.labels,
        &dirs,
    );
    let worst = products.iter().zip(&cd).map(|(a, b)| rel(a, &b[..])).fold(0f64, f64::max);
    println!("resnet:depth=8,width=4 on 256 digits: exact vs central differences {worst:.2e} (step {step:.0e})");
    assert!(worst < 1e-4, "{worst}");
    for a in &products {
        assert!(a[trained..].iter().all(|&x| x == 0.0));
    }
    let mut best = f64::INFINITY;
    for e in hessian::eps_ladder() {
        let mut fd = base().with_hvp(HvpMode::Fd).unwrap();
        fd.set_eps_rel(e);
        let b = fd.hvp(&dirs[0]);
        assert!(b[trained..].iter().all(|&x| x == 0.0));
        best = best.min(rel(&products[0], &b));
    }
    println!("  finite differences, best rung of the ladder: {best:.2e}");
    assert!(best <= 0.1, "{best}");
    // Training mode (each chunk normalised by its own statistics; one chunk of 256 here): exact
    // by default too, against the reference run op by op over the batch.
    let batch = HessianProblem::new(&run.model, &run.params, &set, &ds.norm, 256, 3e-3, None)
        .unwrap()
        .with_norm_mode(NormMode::Batch)
        .unwrap();
    assert_eq!(batch.hvp_mode(), HvpMode::Exact);
    let a = batch.hvp(&dirs[0]);
    let rt = Reference::in_training_mode(&run.model);
    let (cd, step) = common::reference::cd_columns(
        &rt,
        &f64s(&run.params.data),
        &f64s(&batch_x.x),
        &batch_x.labels,
        &dirs[..1],
    );
    let err = rel(&a, &cd[0]);
    println!(
        "  training-mode batch norm: exact vs central differences {err:.2e} (step {step:.0e})"
    );
    assert!(err < 1e-4, "{err}");
    assert!(a[trained..].iter().all(|&x| x == 0.0));
}

#[test]
fn resnet_input_tangent_matches_central_differences() {
    // Gradient matching's mixed derivative d/dx (u . dL/dtheta), from the same layers, on the
    // ResNets (batch norm in training mode, as gradient matching runs it: statistics over the
    // call's images): against float64 central differences in the pixels of the reference's
    // u . gradient (steps verified not to flip any ReLU input's sign).
    use lmc_train::hvp::loss_and_input_tangent;
    for (spec, seed) in [
        ("resnet:depth=8,width=2,norm=none", 31),
        ("resnet:depth=8,width=2,norm=instance", 32),
        ("resnet:depth=8,width=2,norm=batch", 33),
    ] {
        let t = tiny(spec, (1, 6, 6), 3, 6, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let u: Vec<f32> = (0..t.params.len()).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let (_, rx) = loss_and_input_tangent(&t.model, &t.params, &t.x, &t.y, &u).unwrap();
        let r = Reference::in_training_mode(&t.model);
        let (th, x) = (f64s(&t.params), f64s(&t.x));
        let (_, _, pre0) = r.loss_grad(&th, &x, &t.y);
        let sign = |v: &[f64]| -> Vec<bool> { v.iter().map(|&z| z > 0.0).collect() };
        let ug = |x: &[f64]| {
            let (_, g, pre) = r.loss_grad(&th, x, &t.y);
            (g.iter().zip(&u).map(|(a, b)| a * *b as f64).sum::<f64>(), sign(&pre))
        };
        let (mut worst, mut scale) = (0f64, 0f64);
        for _ in 0..24 {
            let j = rng.gen_range(0..x.len());
            let mut h = 1e-5;
            let cd = loop {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[j] += h;
                xm[j] -= h;
                let ((a, sa), (b, sb)) = (ug(&xp), ug(&xm));
                if sa == sign(&pre0) && sb == sign(&pre0) {
                    break (a - b) / (2.0 * h);
                }
                h /= 10.0;
                assert!(h >= 1e-10, "pixel {j}: every step flips a ReLU");
            };
            worst = worst.max((rx[j] as f64 - cd).abs());
            scale = scale.max(cd.abs());
        }
        println!("{spec}: input tangent vs central differences {:.2e}", worst / scale);
        assert!(worst < 1e-5 * scale, "{spec}: {worst} over {scale}");
    }
}
