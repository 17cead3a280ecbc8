//! Interpolation on real (tiny) runs: endpoints reproduce each run's own evaluation exactly, a run
//! with itself has zero barrier, masks stay exact, mismatches are refused, pairs are complete.

mod common;

use lmc_probe::interpolate::{self, InterpConfig, Split};
use lmc_probe::{lerp_masked, subsample};
use lmc_train::fit;
use lmc_train::params::Mask;

#[test]
fn endpoints_are_exact_and_self_interpolation_is_flat() {
    let ds = common::digits();
    let a = common::train(&ds, "mlp:16", None, 0, 2);
    let b = common::train(&ds, "mlp:16", None, 1, 2);
    let train = subsample(&ds.train, Some(500), 3);
    let cfg = InterpConfig {
        alphas: interpolate::alpha_grid(5).unwrap(),
        train_samples: Some(500),
        ..Default::default()
    };
    let r = interpolate::interpolate(
        &[&a, &b],
        &[(Split::Test, &ds.test), (Split::Train, &train)],
        &ds.norm,
        &cfg,
        &ds.train,
    )
    .unwrap();
    assert_eq!(r.pairs.len(), 1);
    let test = &r.pairs[0].curves[0];
    assert_eq!(test.count, 360);
    // alpha = 0 and 1 reproduce the endpoints' own test error, bit for bit: both the evaluation
    // recorded at the end of training and a fresh one.
    assert_eq!(test.points[0].accuracy, a.final_test_accuracy());
    assert_eq!(test.points[4].accuracy, b.final_test_accuracy());
    let fresh = fit::evaluate(&b.model, &b.params, &ds.test, &ds.norm);
    assert_eq!((test.points[4].loss, test.points[4].accuracy), (fresh.loss, fresh.accuracy));
    assert_eq!(r.pairs[0].curves[1].count, 500);
    // Barrier arithmetic against the curve itself.
    let errs: Vec<f64> = test.points.iter().map(|p| p.error).collect();
    let max = errs.iter().cloned().fold(f64::MIN, f64::max);
    assert_eq!(test.error_barrier, max - (errs[0] + errs[4]) / 2.0);
    assert!(test.error_barrier >= 0.0);
    let want = a.params.l2_distance(&b.params).unwrap();
    assert_eq!(r.pairs[0].l2_distance, want);
    assert!(r.norm_statistics.starts_with("none"));

    // A run with itself: every point is the run, barrier exactly 0, distance 0.
    let s =
        interpolate::interpolate(&[&a, &a], &[(Split::Test, &ds.test)], &ds.norm, &cfg, &ds.train)
            .unwrap();
    let c = &s.pairs[0].curves[0];
    assert_eq!((c.error_barrier, c.loss_barrier, s.pairs[0].l2_distance), (0.0, 0.0, 0.0));
    assert!(c.points.iter().all(|p| p.accuracy == a.final_test_accuracy()));

    // CSV: header + one row per alpha per split.
    let csv = interpolate::csv(&r);
    assert_eq!(csv.lines().count(), 1 + 2 * 5);
    assert!(csv.starts_with("pair,a,b,split,alpha,loss,accuracy,error\n0,0,1,test,0,"));
}

#[test]
fn masked_weights_stay_zero_and_mismatches_are_refused() {
    let ds = common::digits();
    let dense = common::train(&ds, "mlp:16", None, 0, 1);
    let mut mask = Mask::dense(&dense.model.layout);
    for i in (0..64 * 16).step_by(2) {
        mask.keep[i] = false;
    }
    let a = common::train(&ds, "mlp:16", Some(mask.clone()), 0, 1);
    let b = common::train(&ds, "mlp:16", Some(mask.clone()), 1, 1);
    for alpha in [0.0, 0.3, 0.5, 1.0] {
        let p = lerp_masked(&a.params, &b.params, alpha, &mask).unwrap();
        assert!(p.data.iter().zip(&mask.keep).all(|(v, k)| *k || v.to_bits() == 0));
    }
    let cfg = InterpConfig { alphas: interpolate::alpha_grid(3).unwrap(), ..Default::default() };
    let sets = [(Split::Test, &ds.test)];
    interpolate::interpolate(&[&a, &b], &sets, &ds.norm, &cfg, &ds.train).unwrap();

    let e = interpolate::interpolate(&[&a, &dense], &sets, &ds.norm, &cfg, &ds.train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different masks") && e.contains("512 of 1210"), "{e}");
    let other = common::train(&ds, "mlp:8", None, 0, 1);
    let e = interpolate::interpolate(&[&dense, &other], &sets, &ds.norm, &cfg, &ds.train)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mlp:8") && e.contains("mlp:16") && e.contains("one architecture"), "{e}");
    let empty = InterpConfig { alphas: vec![], ..Default::default() };
    assert!(interpolate::interpolate(&[&a, &b], &sets, &ds.norm, &empty, &ds.train)
        .unwrap_err()
        .to_string()
        .contains("empty"));
    assert!(interpolate::interpolate(&[&a], &sets, &ds.norm, &cfg, &ds.train).is_err());
}

#[test]
fn three_runs_give_every_pair_and_barrier_statistics() {
    let ds = common::digits();
    let runs: Vec<_> = (0..3).map(|s| common::train(&ds, "mlp:8", None, s, 1)).collect();
    let refs: Vec<_> = runs.iter().collect();
    let cfg = InterpConfig { alphas: interpolate::alpha_grid(4).unwrap(), ..Default::default() };
    let r = interpolate::interpolate(&refs, &[(Split::Test, &ds.test)], &ds.norm, &cfg, &ds.train)
        .unwrap();
    let pairs: Vec<(usize, usize)> = r.pairs.iter().map(|p| (p.a, p.b)).collect();
    assert_eq!(pairs, vec![(0, 1), (0, 2), (1, 2)]);
    let bs: Vec<f64> = r.pairs.iter().map(|p| p.curves[0].error_barrier).collect();
    let mean = bs.iter().sum::<f64>() / 3.0;
    let sd = (bs.iter().map(|b| (b - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    assert!((r.summary[0].error_barrier.mean - mean).abs() < 1e-15);
    assert!((r.summary[0].error_barrier.std - sd).abs() < 1e-15);
    assert_eq!(r.summary[0].error_barrier.n, 3);
}
