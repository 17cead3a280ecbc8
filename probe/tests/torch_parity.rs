//! ResNets against PyTorch: fixtures written by the twin `benches/torch/resnet_twin.py fixture`
//! (PyTorch 2.15, one thread) hold a state dict with random batch-norm state, 16 real digits
//! images, PyTorch's logits in training and evaluation mode, and every parameter and running
//! statistic after one SGD step. lmc imports the state dict by PyTorch's own names and must
//! reproduce all of it.

use std::path::{Path, PathBuf};

use dfdx::prelude::*;
use lmc_probe::interop;
use lmc_train::data::ImageShape;
use lmc_train::fit::{self, GradBuffers};
use lmc_train::model::{Model, Norms};
use lmc_train::optim::Sgd;
use lmc_train::params::{Mask, ParamKind};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/fixtures").join(name)
}

/// max |a - b| / max |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |s, v| s.max(v.abs() as f64)).max(1e-30);
    a.iter().zip(b).fold(0f64, |s, (x, y)| s.max((x - y).abs() as f64)) / scale
}

fn check(file: &str, spec: &str) {
    let path = fixture(file);
    let loaded = interop::load(&path).unwrap();
    let model =
        Model::new(&spec.parse().unwrap(), ImageShape { channels: 1, height: 8, width: 8 }, 10)
            .unwrap();
    // The state dict's names are exactly the layout's: nothing missing, nothing extra.
    let mut names: Vec<&String> = loaded
        .tensors
        .keys()
        .filter(|k| !k.starts_with("after.") && !k.starts_with("fixture."))
        .collect();
    names.sort();
    let mut ours: Vec<&String> = model.layout.entries.iter().map(|e| &e.name).collect();
    ours.sort();
    assert_eq!(names, ours, "{spec}: state-dict names");
    let (params, _) = interop::Loaded {
        tensors: loaded
            .tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("after.") && !k.starts_with("fixture."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..loaded.clone()
    }
    .to_params(&path, &model.layout, false)
    .unwrap();
    let get = |k: &str| &loaded.tensors[k].1;
    let x = get("fixture.x").clone();
    let labels: Vec<u8> = get("fixture.y").iter().map(|&v| v as u8).collect();
    let n = labels.len();

    let dev = Cpu::default();
    let t = model.tensors(&dev, &params);
    let input = || dev.tensor_from_vec(x.clone(), (n, 1, 8, 8));
    let eval = model.forward(&t, input(), false, Norms::Running).as_vec();
    let train = model.forward(&t, input(), false, Norms::Batch).as_vec();
    let (e_eval, e_train) =
        (rel_err(&eval, get("fixture.logits_eval")), rel_err(&train, get("fixture.logits_train")));
    eprintln!("{spec}: logits relative error {e_eval:.2e} (eval), {e_train:.2e} (train)");
    assert!(e_eval <= 1e-4, "{spec}: evaluation-mode logits off by {e_eval:.2e}");
    assert!(e_train <= 1e-4, "{spec}: training-mode logits off by {e_train:.2e}");

    // One step: gradient in training mode, PyTorch's SGD on the trained parameters, the running
    // statistics from the batch's.
    let mut bufs = GradBuffers::new(&model);
    let mut p = params.clone();
    fit::loss_and_grad(&model, &p, &x, &labels, &mut bufs);
    let trained = model.layout.trainable_total();
    let mut momentum = vec![0.0; trained];
    let sgd = Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    let mask = Mask::dense(&model.layout);
    sgd.step(&mut p.data[..trained], &mut bufs.grad[..trained], &mut momentum, true, 0.1, &mask);
    model.update_running(&mut p.data, &bufs.batch_stats).unwrap();
    let mut worst = 0f64;
    for e in &model.layout.entries {
        let (got, want) = (&p.data[e.range()], get(&format!("after.{}", e.name)));
        if e.kind != ParamKind::BatchesTracked {
            worst = worst.max(rel_err(got, want));
        }
        match e.kind {
            ParamKind::BatchesTracked => assert_eq!(got, &want[..], "{spec}: {}", e.name),
            _ => {
                // Parameters move by lr * (gradient + weight decay) ~ 1e-2; 2e-5 of the tensor's
                // scale is well below that and above f32 summation-order noise.
                let err = rel_err(got, want);
                assert!(err <= 2e-5, "{spec}: {} after one step off by {err:.2e}", e.name);
            }
        }
        if e.kind != ParamKind::BatchesTracked && e.trainable() {
            // The step really moved it (so the comparison tests the update).
            assert!(
                rel_err(&params.data[e.range()], want) > 1e-4,
                "{spec}: {} did not move",
                e.name
            );
        }
    }
    eprintln!("{spec}: after one step, worst tensor relative error {worst:.2e}");
}

#[test]
fn resnet8_matches_pytorch_in_both_modes_and_after_one_step() {
    check("torch-resnet8-w4-digits.safetensors", "resnet:depth=8,width=4");
}

#[test]
fn resnet10_matches_pytorch_in_both_modes_and_after_one_step() {
    // Four stages: strided 1x1 shortcuts down to a 1x1 plane.
    check("torch-resnet10-w2-digits.safetensors", "resnet10:width=2");
}

#[test]
fn export_writes_pytorch_names_and_dtypes() {
    // What `lmc export --no-mask` writes must be the state dict PyTorch wrote: same names,
    // shapes and dtypes (int64 batch counts), so load_state_dict(strict=True) takes it.
    let path = fixture("torch-resnet8-w4-digits.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let loaded = interop::load(&path).unwrap();
    let model = Model::new(
        &"resnet:depth=8,width=4".parse().unwrap(),
        ImageShape { channels: 1, height: 8, width: 8 },
        10,
    )
    .unwrap();
    let strip = interop::Loaded {
        tensors: loaded
            .tensors
            .iter()
            .filter(|(k, _)| !k.starts_with("after.") && !k.starts_with("fixture."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        ..loaded.clone()
    };
    let (params, mask) = strip.to_params(&path, &model.layout, false).unwrap();
    let run = common_run(model, params, mask);
    let ours =
        interop::export_bytes(&run, lmc_train::artifact::Provenance::of("t", &0, &[]), false)
            .unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let mut n = 0;
    for (name, view) in ours.tensors() {
        let t = theirs.tensor(&name).unwrap();
        assert_eq!((view.dtype(), view.shape()), (t.dtype(), t.shape()), "{name}");
        assert_eq!(view.data(), t.data(), "{name}: values do not round-trip bit for bit");
        n += 1;
    }
    assert_eq!(n, run.model.layout.entries.len());
}

fn common_run(
    model: Model,
    params: lmc_train::params::ParamVec,
    mask: Mask,
) -> lmc_train::fit::Run {
    lmc_train::fit::Run {
        dataset: "digits".into(),
        dataset_provenance: lmc_train::artifact::Provenance::of("digits", &0, &[]),
        start: fit::Start::Seed(0),
        data_seed: 0,
        replicate: 0,
        config: Default::default(),
        mask,
        params,
        curve: vec![],
        images_seen: 0,
        seconds: 0.0,
        model,
    }
}
