//! Children spawned at step k (`spawn.rs`): the parent is the prefix of the run, a child whose
//! data order is the parent's and whose optimiser has no momentum continues the uninterrupted
//! run bit for bit (also from inside an epoch, with augmentation), and a child's momentum
//! starts fresh.

use lmc_train::artifact::Provenance;
use lmc_train::data::{self, DatasetName};
use lmc_train::fit::{self, Run, RunRequest, Start, TrainConfig};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::optim::Sgd;
use lmc_train::params::Mask;
use lmc_train::spawn;

fn request<'a>(
    model: &'a Model,
    ds: &'a data::Dataset,
    config: TrainConfig,
    data_seed: u64,
) -> RunRequest<'a> {
    RunRequest {
        model,
        dataset: ds,
        dataset_provenance: Provenance::default(),
        init: model.init(4),
        start: Start::Seed(4),
        mask: Mask::dense(&model.layout),
        config,
        data_seed,
        replicate: 0,
        state: None,
    }
}

fn train(req: &RunRequest) -> Run {
    fit::train_run(req, None, false, &mut fit::Silent).unwrap().0
}

/// Trains the parent to step `k` and then the child with data seed `child_seed`.
fn spawned(base: &RunRequest, k: u64, parent_seed: u64, child_seed: u64) -> (Run, Run) {
    let preq = spawn::parent_request(base, k, parent_seed).unwrap();
    let parent = train(&preq);
    let creq = RunRequest {
        data_seed: child_seed,
        ..request(base.model, base.dataset, base.config.clone(), 0)
    };
    let child = train(&spawn::child_request(&creq, &parent, preq.provenance()));
    (parent, child)
}

fn setup(spec: &str) -> (data::Dataset, Model) {
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let model =
        Model::new(&spec.parse::<ModelSpec>().unwrap(), ds.train.shape, ds.classes).unwrap();
    (ds, model)
}

fn config(momentum: f64) -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 64,
        lr: 0.05,
        sgd: Sgd { momentum, weight_decay: 5e-4, nesterov: false },
        // Crop + flip on, so that skipping a partial epoch's batches must also skip their
        // augmentation draws.
        augment: Some(true),
        eval_every: 1,
        ..Default::default()
    }
}

#[test]
fn a_child_on_the_parents_data_order_without_momentum_is_the_uninterrupted_run() {
    // A batch-norm ResNet: the running statistics come with the parent's state too.
    let (ds, model) = setup("resnet:depth=8,width=4");
    let cfg = config(0.0);
    let full = train(&request(&model, &ds, cfg.clone(), 7));
    let (per_epoch, _, total) = cfg.plan(ds.train.len());
    assert_eq!(per_epoch, 23, "1,437 digits in batches of 64");
    // Inside epoch 2, and at the end of epoch 1.
    for k in [30, per_epoch] {
        let base = request(&model, &ds, cfg.clone(), 7);
        let (parent, child) = spawned(&base, k, 7, 7);
        assert_eq!(parent.curve.last().unwrap().steps, k);
        assert_eq!(child.params, full.params, "k = {k}: the child continues the run exactly");
        assert_eq!(child.images_seen, full.images_seen);
        assert_eq!(child.curve.last().unwrap().steps, total);
        // Epochs after the spawn step's epoch are the full run's rows.
        assert_eq!(child.curve[2..], full.curve[2..], "k = {k}");
        assert!(matches!(child.start, Start::Spawned { step, .. } if step == k));
        assert_eq!(child.start.images_before(), parent.images_seen);
    }
}

#[test]
fn a_childs_momentum_starts_fresh_and_children_differ_by_data_order() {
    let (ds, model) = setup("mlp:16");
    let cfg = config(0.9);
    let full = train(&request(&model, &ds, cfg.clone(), 7));
    let base = request(&model, &ds, cfg.clone(), 7);
    let (_, same_order) = spawned(&base, 30, 7, 7);
    // Same data order, but the momentum buffer is reset at step 30 (OpenLTH keeps only the
    // model's state at the rewind step): a different end.
    assert_ne!(same_order.params, full.params);
    let (_, other) = spawned(&base, 30, 7, 8);
    assert_ne!(other.params, same_order.params);
    // Without momentum, the reset is the only difference and there is none.
    let cfg0 = config(0.0);
    let (_, c0) = spawned(&request(&model, &ds, cfg0.clone(), 7), 30, 7, 7);
    assert_eq!(c0.params, train(&request(&model, &ds, cfg0, 7)).params);
}

#[test]
fn spawn_steps_past_the_end_or_a_milestone_are_refused_naming_the_flag() {
    let (ds, model) = setup("mlp:16");
    let cfg = config(0.9);
    let base = request(&model, &ds, cfg.clone(), 7);
    let err = spawn::parent_request(&base, 69, 7).err().unwrap().to_string();
    assert!(err.contains("--spawn-step 69") && err.contains("only 69 steps"), "{err}");
    let ms = TrainConfig {
        epochs: 4,
        schedule: lmc_train::optim::Schedule::parse("multistep:0.25", 0.1).unwrap(),
        ..cfg
    };
    // The rate drops at epoch 1 of 4 (23 steps in): step 23 is the first at the lower rate,
    // so the parent may train steps 0..23 and no more.
    let base = request(&model, &ds, ms, 7);
    assert!(spawn::parent_request(&base, 23, 7).is_ok());
    let err = spawn::parent_request(&base, 24, 7).err().unwrap().to_string();
    assert!(err.contains("milestone"), "{err}");
}
