//! Files and settings a hostile user could feed training: checkpoints whose envelope is valid
//! but whose state does not fit the run are never adopted (training starts over and ends where
//! an uninterrupted run does), and a diverging run stops with `Error::Diverged` before anything
//! non-finite is written.

use lmc_train::artifact::{self, Provenance};
use lmc_train::data::{self, DatasetName};
use lmc_train::fit::TrainState;
use lmc_train::fit::{self, Checkpoint, Observer, Run, RunRequest, Start, TrainConfig, TrainData};
use lmc_train::model::Model;
use lmc_train::params::Mask;
use lmc_train::Error;

fn cfg(epochs: usize) -> TrainConfig {
    TrainConfig { epochs, batch_size: 64, lr: 0.05, eval_every: 0, ..Default::default() }
}

#[test]
fn a_checkpoint_that_does_not_fit_the_run_is_never_adopted() {
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let model = Model::new(&"mlp:7".parse().unwrap(), ds.train.shape, ds.classes).unwrap();
    let c = cfg(3);
    let req = RunRequest {
        model: &model,
        dataset: &ds,
        dataset_provenance: Provenance::default(),
        init: model.init(0),
        start: Start::Seed(0),
        mask: Mask::dense(&model.layout),
        config: c.clone(),
        data_seed: 0,
        replicate: 0,
        state: None,
    };
    let (reference, prov, _) = fit::train_run(&req, None, false, &mut fit::Silent).unwrap();
    // A genuine state after the first epoch, to edit.
    struct Grab(Option<TrainState>);
    impl Observer for Grab {
        fn on_epoch(&mut self, s: &TrainState) -> lmc_train::Result<()> {
            self.0.get_or_insert_with(|| s.clone());
            Ok(())
        }
    }
    let mut grab = Grab(None);
    let data = TrainData::of(&ds, &c);
    let start = TrainState::start(model.init(0));
    fit::fit(&model, &req.mask, &data, &c, 0, start, &mut grab).unwrap();
    let state = grab.0.unwrap();
    type Edit = Box<dyn Fn(&mut TrainState)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("short momentum", Box::new(|s| s.momentum.truncate(5))),
        ("short parameters", Box::new(|s| s.params.data.truncate(5))),
        ("steps_done 2^64-1", Box::new(|s| s.steps_done = u64::MAX)),
        (
            "epochs beyond the plan",
            Box::new(|s| {
                while s.curve.len() < 7 {
                    s.curve.push(s.curve[0].clone());
                }
                s.epochs_done = 7;
                s.steps_done = 7 * 23;
                s.images_seen = 7 * 1437;
            }),
        ),
        ("non-finite momentum", Box::new(|s| s.momentum[0] = f32::NAN)),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (what, edit) in edits {
        let out = dir.path().join("run.lmc");
        let mut s = state.clone();
        edit(&mut s);
        let ck = Checkpoint { run: prov, state: s };
        artifact::write_unchecked(&fit::checkpoint_path(&out), &ck, prov).unwrap();
        let (run, _, cached) = fit::train_run(&req, Some(&out), false, &mut fit::Silent)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(!cached);
        assert_eq!(run.params, reference.params, "{what}: not the uninterrupted result");
        assert_eq!(run.curve, reference.curve, "{what}");
        assert_eq!(run.images_seen, 3 * 1437, "{what}");
        std::fs::remove_file(&out).unwrap();
    }
    // The genuine state is adopted and ends at the same place.
    let out = dir.path().join("run.lmc");
    let ck = Checkpoint { run: prov, state };
    artifact::write(&fit::checkpoint_path(&out), &ck, prov).unwrap();
    struct Count(usize);
    impl Observer for Count {
        fn on_epoch(&mut self, _: &TrainState) -> lmc_train::Result<()> {
            self.0 += 1;
            Ok(())
        }
    }
    let mut count = Count(0);
    let (run, _, _) = fit::train_run(&req, Some(&out), false, &mut count).unwrap();
    assert_eq!(run.params, reference.params);
    assert_eq!(count.0, 2, "the genuine checkpoint was adopted: two epochs left");
    assert!(artifact::read::<Run>(&out).is_ok());
}

fn diverge(c: TrainConfig) -> (Error, std::path::PathBuf, tempfile::TempDir) {
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let model = Model::new(&"mlp:32".parse().unwrap(), ds.train.shape, ds.classes).unwrap();
    let req = RunRequest {
        model: &model,
        dataset: &ds,
        dataset_provenance: Provenance::default(),
        init: model.init(0),
        start: Start::Seed(0),
        mask: Mask::dense(&model.layout),
        config: c,
        data_seed: 0,
        replicate: 0,
        state: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run.lmc");
    let e = fit::train_run(&req, Some(&out), false, &mut fit::Silent).unwrap_err();
    (e, out, dir)
}

#[test]
fn non_finite_weights_stop_training_with_the_epoch_from_one() {
    // One step at lr 1e300 has a finite loss but leaves infinite weights.
    let (e, out, _dir) = diverge(TrainConfig { iterations: Some(1), lr: 1e300, ..cfg(1) });
    let msg = e.to_string();
    assert!(matches!(e, Error::Diverged { epoch: 1, step: 1, .. }), "{msg}");
    assert!(msg.contains("epoch 1, step 1") && msg.contains("non-finite"), "{msg}");
    assert!(!out.exists());
    // lr 100 for 8 epochs: stops at some step instead of writing a loss of 1e36.
    // (mlp:32's weights stay finite: its loss passes the divergence limit instead.)
    let (e, out, _dir) = diverge(TrainConfig { lr: 100.0, ..cfg(8) });
    assert!(e.to_string().contains("divergence limit"), "{e}");
    let Error::Diverged { epoch, step, .. } = e else { panic!("expected divergence, got {e}") };
    assert!((1..=8).contains(&epoch) && step >= 1, "{epoch} {step}");
    assert!(!out.exists());
}
