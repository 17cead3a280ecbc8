//! Probe requests run and cache a probe without the `lmc` binary: the second identical request
//! returns the stored output, `fresh` recomputes it, a changed setting gives a new identity, the
//! default output lands next to the first run, and a landscape resumes from its checkpoint.

mod common;

use std::path::{Path, PathBuf};

use lmc_probe::hessian::{HessianConfig, HutchinsonConfig, HvpMode};
use lmc_probe::interpolate::{self, InterpConfig, Split};
use lmc_probe::landscape::{Axis, LandscapeCheckpoint, LandscapeConfig, Method};
use lmc_probe::request::{
    self, HessianRequest, InterpolateRequest, LandscapeRequest, Observer, ProbeInputs, Silent,
};
use lmc_probe::{Probe, ProbeResult};
use lmc_train::artifact::{self, Provenance};

/// Trains `n` replicates of a small MLP and writes them as Run artifacts into `dir`.
fn write_runs(dir: &Path, n: usize) -> Vec<PathBuf> {
    let ds = common::digits();
    (0..n)
        .map(|r| {
            let run = common::train(&ds, "mlp:16", None, r as u64, 1);
            let p = dir.join(format!("replicate-{r}.lmc"));
            artifact::write(&p, &run, Provenance::of("test-run", &r, &[])).unwrap();
            p
        })
        .collect()
}

/// Remembers what a probe reported.
#[derive(Default)]
struct Heard {
    resumed: Option<(PathBuf, usize, usize)>,
    last: Option<(usize, usize)>,
}

impl Observer for Heard {
    fn progress(&mut self, _what: &str, done: usize, total: usize) {
        self.last = Some((done, total));
    }
    fn resumed(&mut self, checkpoint: &Path, rows_done: usize, rows_total: usize) {
        self.resumed = Some((checkpoint.to_path_buf(), rows_done, rows_total));
    }
}

/// Equal field by field, NaN included (the std of a single pair's barrier is NaN): `Debug` prints
/// every f64 exactly.
fn assert_same(a: &Probe, b: &Probe) {
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

#[test]
fn interpolate_request_is_cached_the_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_runs(dir.path(), 2);
    let inputs = ProbeInputs::read(&paths).unwrap();
    let (ds, ds_prov) = request::load_data(&inputs, None, None).unwrap();
    let req = InterpolateRequest {
        inputs: &inputs,
        dataset: &ds,
        dataset_provenance: ds_prov,
        splits: vec![Split::Test],
        config: InterpConfig { alphas: interpolate::alpha_grid(3).unwrap(), ..Default::default() },
    };
    let first = req.run(None, false, &mut Silent).unwrap();
    assert!(!first.cached);
    assert_eq!(first.out.parent(), paths[0].parent(), "the default output sits next to the runs");
    assert_eq!(first.out, req.out_path(None));
    assert_eq!(first.provenance, req.provenance());
    assert_eq!(first.csv, vec![first.out.with_extension("csv")]);
    assert!(first.csv[0].exists());
    let (h, stored) = artifact::read::<Probe>(&first.out).unwrap();
    assert_eq!(h.provenance, first.provenance);
    assert_same(&stored, &first.probe);

    let second = req.run(None, false, &mut Silent).unwrap();
    assert!(second.cached);
    assert_eq!(second.out, first.out);
    assert_same(&second.probe, &first.probe);

    // `fresh` recomputes the same numbers (only the seconds differ).
    let mut again = req.run(None, true, &mut Silent).unwrap();
    assert!(!again.cached);
    again.probe.seconds = first.probe.seconds;
    assert_same(&again.probe, &first.probe);

    // The training subsample does not matter without a training split; it does with one.
    let ignored = InterpolateRequest {
        config: InterpConfig { train_samples: Some(100), ..req.config.clone() },
        splits: vec![Split::Test],
        ..req
    };
    assert_eq!(ignored.provenance(), first.provenance);
    let used = InterpolateRequest { splits: vec![Split::Test, Split::Train], ..ignored };
    assert_ne!(used.provenance(), first.provenance);

    // Likewise the test subsample without a test split; with one it is a new identity, and the
    // curve is measured on exactly those images: 100 of the fixture's 360, the endpoint equal to
    // a fresh evaluation of the run on the same subsample.
    let train_only = InterpolateRequest {
        config: InterpConfig { test_samples: Some(100), ..req.config.clone() },
        splits: vec![Split::Train],
        ..req
    };
    let train_only_full = InterpolateRequest { splits: vec![Split::Train], ..req };
    assert_eq!(train_only.provenance(), train_only_full.provenance());
    let sub = InterpolateRequest { splits: vec![Split::Test], ..train_only };
    assert_ne!(sub.provenance(), first.provenance);
    let out = dir.path().join("sub.lmc");
    let done = sub.run(Some(&out), false, &mut Silent).unwrap();
    let ProbeResult::Interpolation(r) = &done.probe.result else { panic!("not an interpolation") };
    let curve = &r.pairs[0].curves[0];
    assert_eq!((ds.test.len(), curve.count), (360, 100));
    let set = lmc_probe::subsample(&ds.test, Some(100), 0);
    let run = &inputs.runs()[1];
    let fresh = lmc_train::fit::evaluate(&run.model, &run.params, &set, &ds.norm);
    let end = curve.points.last().unwrap();
    assert_eq!((end.loss, end.accuracy), (fresh.loss, fresh.accuracy));
    assert_ne!(curve.points, first_curve(&first.probe).points, "a subsample differs from all 360");
}

fn first_curve(p: &Probe) -> &interpolate::SplitCurve {
    let ProbeResult::Interpolation(r) = &p.result else { panic!("not an interpolation") };
    &r.pairs[0].curves[0]
}

#[test]
fn landscape_and_hessian_requests_are_cached_too() {
    let dir = tempfile::tempdir().unwrap();
    let paths = write_runs(dir.path(), 1);
    let inputs = ProbeInputs::read(&paths).unwrap();
    let (ds, ds_prov) = request::load_data(&inputs, None, None).unwrap();
    let axis = Axis { min: -1.0, max: 1.0, points: 3 };
    let land = LandscapeRequest {
        inputs: &inputs,
        dataset: &ds,
        dataset_provenance: ds_prov,
        config: LandscapeConfig {
            method: Method::Random,
            x: axis,
            y: Some(axis),
            split: Split::Train,
            samples: Some(100),
            sample_seed: 0,
            direction_seed: 0,
        },
    };
    let out = dir.path().join("land.lmc");
    let first = land.run(Some(&out), false, &mut Silent).unwrap();
    assert!(!first.cached && out.exists());
    let ProbeResult::Landscape(l) = &first.probe.result else { panic!("not a landscape") };
    assert_eq!(l.points.len(), 9);
    assert!(!lmc_train::fit::checkpoint_path(&out).exists());
    assert!(land.run(Some(&out), false, &mut Silent).unwrap().cached);

    // A checkpoint holding the first row (of its own kind, with the request's provenance) is
    // resumed, the observer hears of it, and the grid comes out as the uninterrupted one.
    let mut part = l.clone();
    part.rows_done = 1;
    part.points.truncate(3);
    let resumed = dir.path().join("resumed.lmc");
    let ckpt = lmc_train::stage::checkpoint_path(&resumed);
    let state = LandscapeCheckpoint { landscape: part, seconds: 0.0 };
    artifact::write(&ckpt, &state, land.provenance()).unwrap();
    let mut heard = Heard::default();
    let back = land.run(Some(&resumed), false, &mut heard).unwrap();
    assert_eq!(heard.resumed, Some((ckpt.clone(), 1, 3)));
    assert_eq!(heard.last, Some((9, 9)));
    let ProbeResult::Landscape(lb) = &back.probe.result else { panic!("not a landscape") };
    assert_eq!(lb.points, l.points);
    assert!(!ckpt.exists());
    // The plane needs more runs than one.
    let plane = LandscapeRequest {
        config: LandscapeConfig { method: Method::Plane, ..land.config.clone() },
        ..land
    };
    let e = plane.run(None, false, &mut Silent).unwrap_err().to_string();
    assert!(e.contains("3 or 4 runs"), "{e}");

    let hess = HessianRequest {
        inputs: &inputs,
        dataset: &ds,
        dataset_provenance: ds_prov,
        mask_from: None,
        config: HessianConfig {
            split: Split::Train,
            samples: 100,
            sample_seed: 0,
            chunk: HessianRequest::chunk_or_default(&inputs, None),
            hvp: HvpMode::Fd,
            eps_rel: Some(1e-3),
            subnetwork: false,
            hutchinson: Some(HutchinsonConfig { max_samples: 4, min_samples: 4, tol: 0.0 }),
            top_k: 0,
            power_iters: 10,
            power_tol: 1e-4,
            exact_diag: false,
            density: None,
            seed: 0,
            bn_mode: lmc_train::fit::NormMode::Running,
        },
    };
    assert_eq!(hess.config.chunk, inputs.model().probe_chunk());
    let first = hess.run(None, false, &mut Silent).unwrap();
    assert!(!first.cached);
    assert_eq!(first.csv.len(), 2);
    assert!(first.csv.iter().all(|p| p.exists()));
    assert!(hess.run(None, false, &mut Silent).unwrap().cached);
}
