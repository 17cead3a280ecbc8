//! Landscape grids on tiny digits runs: the centre point is the run's own evaluation, a killed
//! grid resumes to the same result, the plane puts its runs where the formulas say.

mod common;

use lmc_probe::interpolate::Split;
use lmc_probe::landscape::{self, Axis, Landscape, LandscapeConfig, Method};
use lmc_probe::{evaluate_points_with, subsample, Parallelism};
use lmc_train::fit;
use lmc_train::params::ParamVec;
use lmc_train::Error;

fn cfg(method: Method, two_d: bool) -> LandscapeConfig {
    LandscapeConfig {
        method,
        x: Axis { min: -1.0, max: 1.0, points: 3 },
        y: two_d.then_some(Axis { min: -1.0, max: 1.0, points: 3 }),
        split: Split::Train,
        samples: Some(200),
        sample_seed: 0,
        direction_seed: 4,
    }
}

#[test]
fn random_directions_grid_resumes_exactly() {
    let ds = common::digits();
    let run = common::train(&ds, "mlp:16", None, 0, 2);
    let set = subsample(&ds.train, Some(200), 0);
    let c = cfg(Method::Random, true);
    let frame = landscape::random_frame(&run.params, &run.mask, true, c.direction_seed);
    let start = Landscape::start(&c, &frame, &[&run.params], set.len());
    let full = landscape::run_grid(
        &run.model,
        &run.mask,
        &frame,
        &set,
        &ds.norm,
        start.clone(),
        &mut |_| Ok(()),
    )
    .unwrap();
    assert!(full.is_complete());
    assert_eq!(full.points.len(), 9);
    // The centre is the run itself.
    let centre = full.points.iter().find(|p| p.ix == 1 && p.iy == 1).unwrap();
    let own = fit::evaluate(&run.model, &run.params, &set, &ds.norm);
    assert_eq!((centre.loss, centre.accuracy), (own.loss, own.accuracy));
    assert_eq!(full.anchors[0].x, 0.0);
    // Moving away from a trained minimum along filter-normalised directions raises the loss.
    assert!(full.points.iter().all(|p| p.loss >= centre.loss));

    // Kill after the first row; resume from the saved state.
    let mut saved = None;
    let err = landscape::run_grid(&run.model, &run.mask, &frame, &set, &ds.norm, start, &mut |s| {
        saved = Some(s.clone());
        Err(Error::interrupted("killed"))
    })
    .unwrap_err();
    assert!(matches!(&err, Error::Interrupted(m) if m == "killed"), "{err}");
    let partial = saved.unwrap();
    assert_eq!(partial.rows_done, 1);
    let resumed = landscape::run_grid(
        &run.model,
        &run.mask,
        &frame,
        &set,
        &ds.norm,
        partial,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(resumed, full);

    // Points in parallel or one at a time: identical numbers.
    let make = |k: usize| -> lmc_train::Result<ParamVec> {
        let mut p = run.params.clone();
        p.data.iter_mut().zip(&frame.d1.data).for_each(|(v, d)| *v += 0.1 * k as f32 * d);
        Ok(p)
    };
    let a = evaluate_points_with(Parallelism::Points, &run.model, 4, make, &set, &ds.norm).unwrap();
    let b = evaluate_points_with(Parallelism::Ops, &run.model, 4, make, &set, &ds.norm).unwrap();
    assert_eq!(a, b);

    let csv = landscape::csv(&full);
    assert_eq!(csv.lines().count(), 10);
    assert!(csv.starts_with("ix,iy,x,y,loss,accuracy,error\n0,0,-1,-1,"));
}

#[test]
fn plane_through_three_runs() {
    let ds = common::digits();
    let runs: Vec<_> = (0..3).map(|s| common::train(&ds, "mlp:8", None, s, 1)).collect();
    let params: Vec<&ParamVec> = runs.iter().map(|r| &r.params).collect();
    let set = subsample(&ds.train, Some(100), 0);
    let mut c = cfg(Method::Plane, true);
    c.x = Axis { min: -1.0, max: 1.0, points: 3 };
    let frame = landscape::plane_frame(&params, true).unwrap();
    let start = Landscape::start(&c, &frame, &params, set.len());
    let l = landscape::run_grid(
        &runs[0].model,
        &runs[0].mask,
        &frame,
        &set,
        &ds.norm,
        start,
        &mut |_| Ok(()),
    )
    .unwrap();
    for (a, want) in l.anchors.iter().zip([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0)]) {
        assert!((a.x - want.0).abs() < 1e-4 && (a.y - want.1).abs() < 1e-4, "{a:?}");
    }
    // (x, y) = (1, 0) is m0 up to f32 rounding of M + V0: its loss matches m0's closely.
    let p = l.points.iter().find(|p| p.ix == 2 && p.iy == 1).unwrap();
    let own = fit::evaluate(&runs[0].model, &runs[0].params, &set, &ds.norm);
    assert!((p.loss - own.loss).abs() < 1e-4, "{} vs {}", p.loss, own.loss);

    // 1-D along V0 with only two runs.
    let c1 = cfg(Method::Plane, false);
    let f1 = landscape::plane_frame(&params[..2], false).unwrap();
    let l1 = landscape::run_grid(
        &runs[0].model,
        &runs[0].mask,
        &f1,
        &set,
        &ds.norm,
        Landscape::start(&c1, &f1, &params[..2], set.len()),
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!((l1.rows_total, l1.points.len()), (1, 3));
    // A 2-D config with a 1-D frame is refused.
    assert!(landscape::run_grid(
        &runs[0].model,
        &runs[0].mask,
        &f1,
        &set,
        &ds.norm,
        Landscape::start(&c, &f1, &params[..2], set.len()),
        &mut |_| Ok(())
    )
    .is_err());
}
