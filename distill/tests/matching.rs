//! Distillation end to end on the built-in digits with tiny networks: the gradient-matching mixed
//! derivative against a nested finite difference, DM's gradient against finite differences, DM
//! lowering its loss, exact resume, caching, validation errors and evaluation.

use std::ops::ControlFlow;
use std::sync::Arc;

use lmc_distill::config::{Distance, DistillConfig, Method};
use lmc_distill::dsa::{AugParams, Augmentation};
use lmc_distill::eval::{self, EvalConfig};
use lmc_distill::problem::Problem;
use lmc_distill::run::{self, DistillCheckpoint, DistillRequest, RunOptions};
use lmc_distill::{dm, gm};
use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{self, Batch, Dataset, DatasetName, SyntheticSet};
use lmc_train::fit::{self, GradBuffers};
use lmc_train::model::{Model, Norms, Patterns, Relus};
use lmc_train::params::ParamVec;
use lmc_train::seed::{self, Stream};

fn digits() -> Dataset {
    data::load(DatasetName::Digits, None).unwrap()
}

fn model(ds: &Dataset, spec: &str) -> Model {
    Model::new(&spec.parse().unwrap(), ds.train.shape, ds.classes).unwrap()
}

fn request<'a>(m: &'a Model, ds: &'a Dataset, config: DistillConfig) -> DistillRequest<'a> {
    DistillRequest {
        model: m,
        dataset: ds,
        base: DatasetName::Digits,
        dataset_provenance: Provenance::of("dataset", &"digits", &[]),
        config,
    }
}

fn go(_: run::Step) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Indices of the `k` largest |g|.
fn top(g: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..g.len()).collect();
    idx.sort_by(|&a, &b| g[b].abs().total_cmp(&g[a].abs()));
    idx.truncate(k);
    idx
}

/// The matching problem of one GM test: the class-4 fixture of [`gm_fixture`] on `m` with
/// distance `d`, and the ReLU patterns of its unshifted synthetic pass.
struct Matching<'a> {
    p: Problem<'a>,
    params: ParamVec,
    stored: Vec<f32>,
    aug: Arc<Augmentation>,
    g_real: Vec<f32>,
    d: Distance,
    patterns: Patterns,
}

impl<'a> Matching<'a> {
    /// The fixture on `m` with distance `d`, and `u` = dD/dg_syn at it.
    fn new(ds: &'a Dataset, m: &'a Model, d: Distance) -> (Matching<'a>, Vec<f32>) {
        let (p_cfg, params, stored, aug, g_real) = gm_fixture(ds, m, d);
        let p = Problem::new(m, &ds.train, &ds.norm, DatasetName::Digits, &p_cfg);
        let mut patterns = Patterns::default();
        let (_, g_syn, _) =
            gm::syn_pass(&p, &params, &stored, &aug, 4, &mut Relus::Record(&mut patterns));
        let (_, u) = gm::distance(&m.layout, d, &g_real, &g_syn);
        (Matching { p, params, stored, aug, g_real, d, patterns }, u)
    }

    /// The finite-difference (step 1e-3) and the exact mixed derivative along `u`, and their
    /// relative L2 difference.
    fn fd_and_exact(&self, u: &[f32]) -> (Vec<f32>, Vec<f32>, f64) {
        let (p, params, stored, aug) = (&self.p, &self.params, &self.stored, &self.aug);
        let fd = gm::mixed_derivative(p, params, stored, aug, 4, u, 1e-3, &self.patterns);
        let exact = gm::mixed_derivative_exact(p, params, stored, aug, 4, u).unwrap();
        let num: f64 = exact.iter().zip(&fd).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
        let den: f64 = exact.iter().map(|b| (*b as f64).powi(2)).sum();
        (fd, exact, (num / den).sqrt())
    }

    /// `deriv` (dD/dS) at its 6 largest pixels against the nested central difference of the
    /// matching distance itself (pixel step 1e-2, the same patterns replayed), to 0.5%.
    fn assert_nested(&self, deriv: &[f32], what: &str) {
        let dist = |s: &[f32]| {
            let relus = &mut Relus::Replay(&self.patterns);
            let (_, g, _) = gm::syn_pass(&self.p, &self.params, s, &self.aug, 4, relus);
            gm::distance(&self.p.model.layout, self.d, &self.g_real, &g).0
        };
        let h = 1e-2f32;
        for j in top(deriv, 6) {
            let (mut a, mut b) = (self.stored.clone(), self.stored.clone());
            a[j] += h;
            b[j] -= h;
            let nested = (dist(&a) - dist(&b)) / ((a[j] - b[j]) as f64);
            let e = deriv[j] as f64;
            assert!(
                (nested - e).abs() <= 0.005 * nested.abs().max(e.abs()),
                "{what} pixel {j}: nested FD {nested} vs {e}"
            );
        }
    }
}

/// The GM mixed derivative (central difference of input gradients along u, ReLU patterns frozen)
/// against a direct nested finite difference of the matching loss D(S) = dist(g_real, g_syn(S))
/// w.r.t. single pixels, each D a full backward pass with the same frozen patterns. Small ConvNet
/// with instance norm, factor 2 and a rotation in the pipeline; both distances; the 6 pixels
/// with the largest derivative.
///
/// Tolerance 0.5%: the mixed difference (parameters moved by 1e-3 in norm) and the nested one
/// (pixel step 1e-2) are both O(eps^2) accurate; measured agreement is ~1e-4 relative, and an
/// eps scan gives a plateau from 3e-3 to 1e-4 (README, "Gradient matching").
#[test]
fn gm_mixed_derivative_matches_nested_finite_differences() {
    let ds = digits();
    let m = model(&ds, "convnet:depth=2,width=6");
    for d in [Distance::Mse, Distance::Cos] {
        let (mx, u) = Matching::new(&ds, &m, d);
        let (p, patterns) = (&mx.p, &mx.patterns);
        let mixed = gm::mixed_derivative(p, &mx.params, &mx.stored, &mx.aug, 4, &u, 1e-3, patterns);
        mx.assert_nested(&mixed, &format!("{d:?} mixed-derivative FD"));
    }
}

/// The exact mixed derivative (forward-over-reverse through the network, then the augmentation's
/// backward) against the nested finite difference of the matching loss at single pixels (as
/// above, 0.5%) and against the finite-difference mixed derivative: both distances, a ConvNet
/// with instance norm and an MLP, factor 2 and a rotation. On the MLP with the cosine distance
/// the synthetic gradient is tiny, so u = dD/dg_syn is large (|u| ~7e5) and the difference's
/// parameter step fd_eps / |u| ~1e-9 falls below f32's resolution of the weights: the
/// finite-difference derivative is off by ~100% there, the exact one matches the nested
/// difference to ~1e-5. Then the cost of each on the pipeline's digits model at 10 images per
/// class (printed: the fastest of 5).
#[test]
fn gm_exact_mixed_derivative_matches_the_finite_differences() {
    let ds = digits();
    for spec in ["convnet:depth=2,width=6", "mlp:16"] {
        let m = model(&ds, spec);
        for d in [Distance::Mse, Distance::Cos] {
            let (mx, u) = Matching::new(&ds, &m, d);
            let (_, exact, rel) = mx.fd_and_exact(&u);
            println!("{spec} {d:?}: finite-difference vs exact mixed derivative {rel:.2e}");
            if spec.starts_with("convnet") || d == Distance::Mse {
                assert!(rel < 2e-3, "{spec} {d:?}: {rel}");
            }
            mx.assert_nested(&exact, &format!("{spec} {d:?} exact"));
        }
    }
    let m = model(&ds, "convnet:depth=2,width=16");
    let cfg =
        DistillConfig { ipc: 10, factor: 2, ..DistillConfig::defaults(Method::Gm, Distance::Mse) };
    let p = Problem::new(&m, &ds.train, &ds.norm, DatasetName::Digits, &cfg);
    let params = m.init(3);
    let stored = run::initial_images(&p, &cfg)[4 * 10 * 64..5 * 10 * 64].to_vec();
    let aug = Arc::new(Augmentation::new(
        ds.train.shape,
        &[AugParams::Rotate { theta: 0.2 }],
        vec![0; 40],
    ));
    let u: Vec<f32> = (0..params.len()).map(|i| ((i as f32) * 0.37).sin() * 1e-2).collect();
    let mut patterns = Patterns::default();
    gm::syn_pass(&p, &params, &stored, &aug, 4, &mut Relus::Record(&mut patterns));
    let time = |f: &mut dyn FnMut()| {
        (0..5)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let t_fd = time(&mut || {
        gm::mixed_derivative(&p, &params, &stored, &aug, 4, &u, 1e-3, &patterns);
    });
    let t_exact = time(&mut || {
        gm::mixed_derivative_exact(&p, &params, &stored, &aug, 4, &u).unwrap();
    });
    println!(
        "convnet:depth=2,width=16, 40 decoded images: finite difference {:.2} ms, exact {:.2} ms",
        t_fd * 1e3,
        t_exact * 1e3
    );
}

/// Where no ReLU flips (an MLP on digits at these steps), freezing changes nothing: the mixed
/// derivative also matches the plain nested difference of the true matching loss.
#[test]
fn frozen_patterns_agree_with_the_plain_derivative_away_from_kinks() {
    let ds = digits();
    let m = model(&ds, "mlp:16");
    let (p_cfg, params, stored, aug, g_real) = gm_fixture(&ds, &m, Distance::Mse);
    let p = Problem::new(&m, &ds.train, &ds.norm, DatasetName::Digits, &p_cfg);
    let mut patterns = Patterns::default();
    let (_, g_syn, _) =
        gm::syn_pass(&p, &params, &stored, &aug, 4, &mut Relus::Record(&mut patterns));
    let (_, u) = gm::distance(&m.layout, Distance::Mse, &g_real, &g_syn);
    let mixed = gm::mixed_derivative(&p, &params, &stored, &aug, 4, &u, 1e-3, &patterns);
    let mut fresh = Patterns::default();
    let mut dist = |s: &[f32]| {
        let (_, g, _) = gm::syn_pass(&p, &params, s, &aug, 4, &mut Relus::Record(&mut fresh));
        gm::distance(&m.layout, Distance::Mse, &g_real, &g).0
    };
    let h = 1e-3f32;
    for j in top(&mixed, 6) {
        let (mut a, mut b) = (stored.clone(), stored.clone());
        a[j] += h;
        b[j] -= h;
        let nested = (dist(&a) - dist(&b)) / ((a[j] - b[j]) as f64);
        let fd = mixed[j] as f64;
        assert!(
            (nested - fd).abs() <= 0.01 * nested.abs().max(fd.abs()),
            "pixel {j}: plain nested FD {nested} vs {fd}"
        );
    }
}

/// The frozen-pattern forward pass is `Model::forward` op for op.
#[test]
fn frozen_forward_equals_model_forward() {
    use dfdx::prelude::*;
    let ds = digits();
    for spec in ["convnet:depth=2,width=6", "convnet:depth=1,width=4,norm=none", "mlp:16,8"] {
        let m = model(&ds, spec);
        let dev = Cpu::default();
        let t = m.tensors(&dev, &m.init(1));
        let mut batch = Batch::default();
        data::fill_batch(&ds.train, &ds.norm, &[0, 5, 9], None, &mut batch);
        let x = || dev.tensor_from_vec(batch.x.clone(), (3, 1, 8, 8));
        let mut want = vec![0.0f32; 30];
        m.forward(&t, x(), true, Norms::Batch).copy_into(&mut want);
        let mut p = Patterns::default();
        let mut got = vec![0.0f32; 30];
        m.forward_with(&t, x(), true, &mut Relus::Record(&mut p), Norms::Batch).copy_into(&mut got);
        assert_eq!(got, want, "{spec}");
        let mut again = vec![0.0f32; 30];
        m.forward_with(&t, x(), true, &mut Relus::Replay(&p), Norms::Batch).copy_into(&mut again);
        assert_eq!(again, want, "{spec}");
    }
}

type GmFixture = (DistillConfig, ParamVec, Vec<f32>, Arc<Augmentation>, Vec<f32>);

/// Class 4 of digits: 2 stored real images (factor 2), a rotation, a real batch's gradient.
fn gm_fixture(ds: &Dataset, m: &Model, d: Distance) -> GmFixture {
    let cfg = DistillConfig {
        ipc: 2,
        factor: 2,
        batch_real: 16,
        ..DistillConfig::defaults(Method::Gm, d)
    };
    let p = Problem::new(m, &ds.train, &ds.norm, DatasetName::Digits, &cfg);
    let params = m.init(3);
    let c = 4usize;
    let mut rng = seed::rng(1, Stream::Other, 0);
    let mut batch = Batch::default();
    p.real_batch(c, &mut rng, &mut batch);
    let mut bufs = GradBuffers::new(m);
    fit::loss_and_grad(m, &params, &batch.x, &batch.labels, &mut bufs);
    let stored = run::initial_images(&p, &cfg)[c * 2 * 64..(c + 1) * 2 * 64].to_vec();
    let aug = Arc::new(Augmentation::new(
        ds.train.shape,
        &[AugParams::Rotate { theta: 0.2 }],
        vec![0; 8],
    ));
    (cfg, params, stored, aug, bufs.grad)
}

/// DM's gradient (backward through decode, DSA and the network) against central differences of
/// the DM loss itself, with the same network, real batches and augmentation draws.
#[test]
fn dm_gradient_matches_finite_differences() {
    let ds = digits();
    let m = model(&ds, "convnet:depth=2,width=8");
    let cfg = DistillConfig {
        ipc: 2,
        factor: 2,
        batch_real: 8,
        ..DistillConfig::defaults(Method::Dm, Distance::Mse)
    };
    let p = Problem::new(&m, &ds.train, &ds.norm, DatasetName::Digits, &cfg);
    let pixels = run::initial_images(&p, &cfg);
    let rng = seed::rng(2, Stream::Other, 7);
    let mut grad = vec![0.0f32; pixels.len()];
    dm::dm_step(&p, &mut rng.clone(), &pixels, &mut grad);
    let mut scratch = vec![0.0f32; pixels.len()];
    let mut loss = |x: &[f32]| dm::dm_step(&p, &mut rng.clone(), x, &mut scratch).0;
    let h = 1e-2f32;
    for j in top(&grad, 6) {
        let (mut a, mut b) = (pixels.clone(), pixels.clone());
        a[j] += h;
        b[j] -= h;
        let fd = (loss(&a) - loss(&b)) / ((a[j] - b[j]) as f64);
        let g = grad[j] as f64;
        assert!(
            (fd - g).abs() <= 0.02 * fd.abs().max(g.abs()),
            "pixel {j}: fd {fd} vs backward {g}"
        );
    }
}

/// DM lowers the matching loss on networks it never saw: the loss at 8 held-out iteration seeds
/// (fixed networks, real batches and augmentation) before and after 60 iterations.
#[test]
fn dm_lowers_the_loss_on_digits() {
    let ds = digits();
    let m = model(&ds, "convnet:depth=2,width=16");
    let cfg = DistillConfig {
        ipc: 3,
        iterations: 60,
        batch_real: 32,
        ..DistillConfig::defaults(Method::Dm, Distance::Mse)
    };
    let req = request(&m, &ds, cfg.clone());
    let p = Problem::new(&m, &ds.train, &ds.norm, DatasetName::Digits, &cfg);
    let held_out = |x: &[f32]| -> f64 {
        let mut g = vec![0.0f32; x.len()];
        (0..8)
            .map(|k| dm::dm_step(&p, &mut seed::rng(99, Stream::Other, k), x, &mut g).0)
            .sum::<f64>()
            / 8.0
    };
    let before = held_out(&run::initial_images(&p, &cfg));
    let out = run::distill(&req, None, &RunOptions::default(), &mut go).unwrap();
    let data::Pixels::F32(after_px) = &out.set.images.pixels else { panic!() };
    let after = held_out(after_px);
    assert!(after < 0.6 * before, "held-out DM loss {before} -> {after}");
    assert_eq!(out.recipe.loss_curve.len(), 60);
    // 10 classes x 32 real + 30 synthetic per iteration.
    assert_eq!(out.recipe.images_processed, 60 * (320 + 30));
}

/// A run interrupted after iteration 3 (checkpoint written) and started again ends bit for bit
/// where an uninterrupted run ends, for DM and for GM (whose network updates go through fit).
#[test]
fn resume_equals_uninterrupted() {
    let ds = digits();
    let m = model(&ds, "convnet:depth=1,width=4");
    let dir = tempfile::tempdir().unwrap();
    for method in [Method::Dm, Method::Gm] {
        let cfg = DistillConfig {
            ipc: 2,
            iterations: 6,
            factor: 2,
            batch_real: 8,
            inner_loop: 2,
            net_steps: 2,
            net_batch: 16,
            ..DistillConfig::defaults(method, Distance::Mse)
        };
        let req = request(&m, &ds, cfg);
        let opts = RunOptions { checkpoint_every: 2, ..RunOptions::default() };
        let whole = run::distill(
            &req,
            Some(&dir.path().join(format!("{method}-whole.lmc"))),
            &opts,
            &mut go,
        )
        .unwrap();

        let out = dir.path().join(format!("{method}-cut.lmc"));
        let mut stop_at_3 = |s: run::Step| {
            if s.iteration == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let e = run::distill(&req, Some(&out), &opts, &mut stop_at_3).err().unwrap();
        assert!(matches!(e, lmc_train::Error::Interrupted(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("interrupted after iteration 3"), "{e}");
        let ck_path = run::checkpoint_path(&out);
        let (_, ck) = artifact::read::<DistillCheckpoint>(&ck_path).unwrap();
        assert_eq!(ck.state.steps_done, 3);
        // Its own kind: never mistaken for a training checkpoint, and `lmc inspect` reads it.
        let e = artifact::read::<fit::Checkpoint>(&ck_path).unwrap_err().to_string();
        assert!(e.contains("is a DistillCheckpoint artifact, expected a Checkpoint"), "{e}");
        let (h, payload) = artifact::read_raw(&ck_path).unwrap();
        let v = lmc_distill::inspect_checkpoint_summary(&ck_path, &h, &payload).unwrap();
        assert_eq!(v["iterations_done"], 3);
        let resumed = run::distill(&req, Some(&out), &opts, &mut go).unwrap();
        assert_eq!(resumed.resumed_from, 3);
        assert!(!ck_path.exists());
        assert_eq!(resumed.set.images, whole.set.images, "{method}");
        assert_eq!(resumed.recipe.loss_curve, whole.recipe.loss_curve);
        assert_eq!(resumed.recipe.images_processed, whole.recipe.images_processed);
        // The written artifact is what `--dataset` reads; a second call is a cache hit.
        let (h, back) = artifact::read::<SyntheticSet>(&out).unwrap();
        assert_eq!(h.provenance, req.provenance());
        assert_eq!(back.images, whole.set.images);
        assert!(run::distill(&req, Some(&out), &opts, &mut go).unwrap().cached);
        let (train_on, _) = data::resolve_dataset(out.to_str().unwrap(), None).unwrap();
        assert_eq!(train_on.train.len(), 10 * 2 * 4);
    }
}

/// A time budget stops at an iteration boundary; the output is the run that asked for that many
/// iterations (same pixels, same provenance), and asking again is a cache hit.
#[test]
fn time_budget_output_equals_the_shorter_run() {
    let ds = digits();
    let m = model(&ds, "convnet:depth=1,width=4");
    let dir = tempfile::tempdir().unwrap();
    let cfg = DistillConfig {
        ipc: 2,
        iterations: 1000,
        batch_real: 8,
        ..DistillConfig::defaults(Method::Dm, Distance::Mse)
    };
    let budget = RunOptions { max_seconds: Some(0.0), ..RunOptions::default() };
    let cut_path = dir.path().join("cut.lmc");
    let cut =
        run::distill(&request(&m, &ds, cfg.clone()), Some(&cut_path), &budget, &mut go).unwrap();
    assert_eq!(cut.recipe.iterations, 1);
    let one = request(&m, &ds, DistillConfig { iterations: 1, ..cfg.clone() });
    let short = run::distill(&one, None, &RunOptions::default(), &mut go).unwrap();
    assert_eq!(cut.set.images, short.set.images);
    assert_eq!(cut.provenance, one.provenance());
    assert_eq!(artifact::read::<SyntheticSet>(&cut_path).unwrap().0.provenance, one.provenance());
    assert!(
        run::distill(&request(&m, &ds, cfg), Some(&cut_path), &budget, &mut go).unwrap().cached
    );
}

#[test]
fn bad_settings_are_named() {
    let ds = digits();
    let m = model(&ds, "mlp:8");
    let err = |cfg: DistillConfig| request(&m, &ds, cfg).validate().unwrap_err().to_string();
    let base = DistillConfig::defaults(Method::Dm, Distance::Mse);
    // The smallest digits class has 140 training images.
    let e = err(DistillConfig { ipc: 1000, ..base.clone() });
    assert!(e.contains("--ipc 1000") && e.contains("has only"), "{e}");
    let e = err(DistillConfig { factor: 3, ..base.clone() });
    assert!(e.contains("--factor 3 does not divide the 8x8"), "{e}");
    let e = err(DistillConfig { factor: 2, ipc: 50, ..base.clone() });
    assert!(e.contains("real images per class"), "{e}");
    let e = err(DistillConfig { iterations: 0, ..base });
    assert!(e.contains("--iterations"), "{e}");
}

/// Evaluation trains real networks: a few epochs on a random-real digits set beat chance by far,
/// and the same seed gives the same accuracies.
#[test]
fn evaluation_trains_fresh_networks_with_dsa() {
    let ds = digits();
    let m = model(&ds, "mlp:32");
    let cfg = DistillConfig { ipc: 10, ..DistillConfig::defaults(Method::Dm, Distance::Mse) };
    let req = request(&m, &ds, cfg.clone());
    let p = Problem::new(&m, &ds.train, &ds.norm, DatasetName::Digits, &cfg);
    let recipe = run::Recipe {
        method: "dm".into(),
        model: "mlp:32".into(),
        source: "digits".into(),
        source_provenance: String::new(),
        config: cfg.clone(),
        iterations: 0,
        seconds: 0.0,
        images_processed: 0,
        loss_curve: vec![],
    };
    let set = run::synthetic_set(&req, run::initial_images(&p, &cfg), &recipe);
    let ecfg = EvalConfig { lr: 0.05, ..EvalConfig::paper(2, 40, 0) };
    let mut steps = 0u64;
    let a =
        eval::evaluate(&set, &ds, &"mlp:32".parse().unwrap(), &ecfg, &mut |_, _, _, _| steps += 1)
            .unwrap();
    assert_eq!(steps, 2 * 40); // 100 images, batch 256: one step per epoch
    assert_eq!(a.accuracies.len(), 2);
    assert!(a.mean > 0.6, "{a:?}");
    let b =
        eval::evaluate(&set, &ds, &"mlp:32".parse().unwrap(), &ecfg, &mut |_, _, _, _| {}).unwrap();
    assert_eq!(a.accuracies, b.accuracies);
}

/// The exact mixed derivative on a ResNet with batch norm, which gradient matching runs in
/// training mode (statistics over the class's decoded images, one group in the second-order
/// pass): against the finite-difference mixed derivative and the nested finite difference of
/// the matching loss at single pixels, as above.
#[test]
fn gm_exact_mixed_derivative_matches_on_a_batch_norm_resnet() {
    let ds = digits();
    let spec = "resnet:depth=8,width=4";
    let m = model(&ds, spec);
    let d = Distance::Mse;
    let (mx, u) = Matching::new(&ds, &m, d);
    let (_, exact, rel) = mx.fd_and_exact(&u);
    println!("{spec} {d:?}: finite-difference vs exact mixed derivative {rel:.2e}");
    assert!(rel < 2e-3, "{spec}: {rel}");
    mx.assert_nested(&exact, &format!("{spec} exact"));
}
