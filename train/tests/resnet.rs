//! ResNets with batch norm as whole models: gradients against central differences, evaluation
//! mode against training mode, PyTorch's running-statistics update through the training loop,
//! OpenLTH's initialisation, and determinism (threads, resume) with state in the vector.

mod common;

use common::fd_err;
use dfdx::prelude::*;
use lmc_train::data::{self, Batch, DatasetName};
use lmc_train::fit::{self, GradBuffers, NormMode, Observer, TrainConfig, TrainData, TrainState};
use lmc_train::model::{Model, ModelSpec, Norms, Patterns, Relus};
use lmc_train::ops::BatchStats;
use lmc_train::params::{Mask, ParamKind, ParamVec};
use lmc_train::Error;

fn digits() -> data::Dataset {
    data::load(DatasetName::Digits, None).unwrap()
}

fn model(spec: &str, ds: &data::Dataset) -> Model {
    Model::new(&spec.parse::<ModelSpec>().unwrap(), ds.train.shape, ds.classes).unwrap()
}

fn batch(ds: &data::Dataset, n: usize) -> Batch {
    let idx: Vec<u32> = (0..n as u32).map(|i| i * 7).collect();
    let mut b = Batch::default();
    data::fill_batch(&ds.train, &ds.norm, &idx, None, &mut b);
    b
}

/// Trained values moved off their initialisation (so biases, shifts and running statistics are
/// not at special values), deterministic.
fn perturbed(m: &Model, seed: u64) -> ParamVec {
    let mut p = m.init(seed);
    let noise = common::rv(p.len(), seed + 100);
    for (e, _) in m.layout.entries.iter().zip(0..) {
        for i in e.range() {
            p.data[i] = match e.kind {
                ParamKind::RunningVar => 0.5 + noise[i].abs(),
                ParamKind::BatchesTracked => 3.0,
                _ => p.data[i] + 0.1 * noise[i],
            };
        }
    }
    p
}

fn loss(m: &Model, p: &ParamVec, b: &Batch, mode: NormMode) -> (f32, Vec<f32>) {
    let mut bufs = GradBuffers::new(m);
    bufs.norm_mode = mode;
    let (l, _) = fit::loss_and_grad(m, p, &b.x, &b.labels, &mut bufs);
    (l, bufs.grad)
}

fn norms(mode: NormMode) -> Norms<'static> {
    match mode {
        NormMode::Batch => Norms::Batch,
        NormMode::Running => Norms::Running,
    }
}

/// The mean cross-entropy (f64, from f32 logits) with every ReLU replaying `patterns`: smooth in
/// the parameters, and equal to the network's loss (with the same gradient) where the patterns
/// were recorded.
fn replayed_loss(m: &Model, p: &ParamVec, b: &Batch, mode: NormMode, patterns: &Patterns) -> f64 {
    let dev = Cpu::default();
    let n = b.labels.len();
    let s = m.input;
    let x = dev.tensor_from_vec(b.x.clone(), (n, s.channels, s.height, s.width));
    let logits =
        m.forward_with(&m.tensors(&dev, p), x, false, &mut Relus::Replay(patterns), norms(mode));
    let total: f64 = logits
        .as_vec()
        .chunks_exact(m.classes)
        .zip(&b.labels)
        .map(|(row, &y)| {
            let mx = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            lse - row[y as usize] as f64
        })
        .sum();
    total / n as f64
}

#[test]
fn whole_resnet_gradients_match_central_differences() {
    // The training gradient (`loss_and_grad`, on the tape) against central differences of the
    // same loss with the ReLU patterns of the centre replayed (what double backward assumes:
    // without it, steps that flip a ReLU make the differences meaningless). Every variant goes
    // through strided 3x3 convs, 1x1 shortcuts and identity shortcuts; batch norm in both modes.
    // A step of 3e-4 keeps the truncation error of norms over 2x2 and 1x1 planes near 1e-3 and
    // f32 rounding of the logits below that (measured: at most 8e-4 over these cases).
    let ds = digits();
    let b = batch(&ds, 12);
    for (spec, mode) in [
        ("resnet:depth=8,width=4", NormMode::Batch),
        ("resnet:depth=8,width=4", NormMode::Running),
        ("resnet:depth=8,width=4,norm=instance", NormMode::Batch),
        ("resnet:depth=8,width=4,norm=none", NormMode::Batch),
        ("resnet10:width=2", NormMode::Batch),
    ] {
        let m = model(spec, &ds);
        let p = perturbed(&m, 3);
        let (l0, g) = loss(&m, &p, &b, mode);
        let t = m.layout.trainable_total();
        assert!(g[t..].iter().all(|&v| v == 0.0), "{spec}: state has a gradient");
        assert!(g[..t].iter().any(|&v| v != 0.0), "{spec}: no gradient");
        let dev = Cpu::default();
        let mut patterns = Patterns::default();
        let x = dev.tensor_from_vec(b.x.clone(), (12, 1, 8, 8));
        let _ = m.forward_with(
            &m.tensors(&dev, &p),
            x,
            false,
            &mut Relus::Record(&mut patterns),
            norms(mode),
        );
        let at = replayed_loss(&m, &p, &b, mode, &patterns);
        assert!((at - l0 as f64).abs() < 1e-5 * at, "{spec}: replayed loss {at} vs {l0}");
        let l = |x: &[f32]| {
            let mut q = p.clone();
            q.data[..t].copy_from_slice(x);
            replayed_loss(&m, &q, &b, mode, &patterns)
        };
        for seed in [1, 2] {
            let e = fd_err(l, &p.data[..t], &g[..t], 3e-4, seed);
            assert!(e < 3e-3, "{spec} {mode:?}: relative error {e}");
        }
    }
}

#[test]
fn evaluation_mode_equals_training_mode_when_the_running_statistics_are_the_batch_s() {
    let ds = digits();
    let b = batch(&ds, 16);
    for spec in ["resnet:depth=8,width=4", "resnet18:width=2"] {
        let m = model(spec, &ds);
        let mut p = perturbed(&m, 5);
        let dev = Cpu::default();
        let x = || dev.tensor_from_vec(b.x.clone(), (16, 1, 8, 8));
        let mut stats: Vec<BatchStats> = Vec::new();
        let train = m.forward(&m.tensors(&dev, &p), x(), false, Norms::Collect(&mut stats));
        assert_eq!(stats.len(), m.running_statistics());
        // Evaluation normalises by the running variance as given: the batch's biased one.
        let mut k = 0;
        for e in m.layout.entries.clone() {
            let s = &stats[k.min(stats.len() - 1)];
            match e.kind {
                ParamKind::RunningMean => p.data[e.range()].copy_from_slice(&s.mean),
                ParamKind::RunningVar => {
                    let m1 = (s.count - 1) as f32 / s.count as f32;
                    for (d, v) in p.data[e.range()].iter_mut().zip(&s.var_unbiased) {
                        *d = v * m1;
                    }
                    k += 1;
                }
                _ => {}
            }
        }
        let eval = m.forward(&m.tensors(&dev, &p), x(), false, Norms::Running);
        let (a, e) = (train.as_vec(), eval.as_vec());
        let scale = a.iter().fold(0f32, |s, v| s.max(v.abs()));
        let diff = a.iter().zip(&e).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
        assert!(diff <= 1e-4 * scale, "{spec}: max |train - eval| {diff} (scale {scale})");
        // And with other running statistics they differ.
        let other = m.forward(&m.tensors(&dev, &perturbed(&m, 5)), x(), false, Norms::Running);
        assert!(other.as_vec().iter().zip(&a).any(|(x, y)| (x - y).abs() > 1e-2 * scale));
    }
}

/// The models the plain-buffer paths are checked on, with an input shape and batch size:
/// ResNet-20 on a CIFAR-shaped batch (direct-kernel 3x3 convs on 32x32 and 16x16 planes,
/// Winograd ones on 8x8 with their transformed inputs kept for the backward pass, strided 1x1
/// shortcuts with their norms) and the small ResNets on digits (planes
/// of 1x1 to 8x8).
fn plain_path_cases() -> Vec<(&'static str, data::ImageShape, usize, Model)> {
    let cifar = data::ImageShape { channels: 3, height: 32, width: 32 };
    let digits = digits().train.shape;
    [
        ("resnet20", cifar, 3),
        ("resnet:depth=8,width=4", digits, 16),
        ("resnet18:width=2", digits, 16),
    ]
    .into_iter()
    .map(|(spec, shape, n)| {
        (spec, shape, n, Model::new(&spec.parse::<ModelSpec>().unwrap(), shape, 10).unwrap())
    })
    .collect()
}

#[test]
fn the_evaluation_path_in_plain_buffers_equals_the_tensor_ops_bit_for_bit() {
    // Without a tape, evaluation mode runs its own path (`ResNet::embed_eval`); with one it runs
    // the differentiable ops. The two must agree to the bit (`plain_path_cases`).
    for (spec, shape, n, m) in plain_path_cases() {
        let p = perturbed(&m, 9);
        let dev = Cpu::default();
        let t = m.tensors(&dev, &p);
        let len = n * shape.channels * shape.height * shape.width;
        let x = || {
            dev.tensor_from_vec(common::rv(len, 4), (n, shape.channels, shape.height, shape.width))
        };
        let plain = m.forward(&t, x(), false, Norms::Running).as_vec();
        let taped = m.forward(&t, x().leaky_traced(), false, Norms::Running).as_vec();
        assert_eq!(plain.len(), n * 10);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&plain), bits(&taped), "{spec}");
        assert!(plain.iter().all(|v| v.is_finite()) && plain.iter().any(|v| *v != 0.0), "{spec}");
    }
}

#[test]
fn the_training_path_in_plain_buffers_equals_the_tensor_ops_bit_for_bit() {
    // With plain ReLUs and batch statistics a ResNet runs as one op on the tape
    // (`ResNet::embed_train`); with recorded ReLU patterns it runs the separate ops (norm, `+`,
    // ReLU; `fused_norm_relu_and_residual_equal_the_separate_ops_in_a_whole_resnet` ties those to
    // the per-op fused ones). Logits, the input's and every parameter's gradient and the collected
    // batch statistics agree to the bit (`plain_path_cases`), with and without the input's
    // gradient, and without a tape (statistics only).
    for (spec, shape, n, m) in plain_path_cases() {
        let p = perturbed(&m, 11);
        let t = m.layout.trainable_total();
        let trained = m.layout.entries.iter().filter(|e| e.range().end <= t).count();
        let len = n * shape.channels * shape.height * shape.width;
        let x0 = common::rv(len, 6);
        for input_grad in [true, false] {
            let run = |record: bool| {
                let dev = Cpu::default();
                let tensors = m.tensors(&dev, &p);
                let x =
                    dev.tensor_from_vec(x0.clone(), (n, shape.channels, shape.height, shape.width));
                let mut stats: Vec<BatchStats> = Vec::new();
                let mut patterns = Patterns::default();
                let mut relus = if record { Relus::Record(&mut patterns) } else { Relus::Plain };
                let logits = m.forward_with(
                    &tensors,
                    x.leaky_trace(),
                    input_grad,
                    &mut relus,
                    Norms::Collect(&mut stats),
                );
                let lv = logits.as_vec();
                let g = logits.square().sum().backward();
                let mut out = vec![lv, g.get(&x).as_vec()];
                out.extend(tensors[..trained].iter().map(|t| g.get(t).as_vec()));
                for st in &stats {
                    out.push(st.mean.clone());
                    out.push(st.var_unbiased.clone());
                }
                // Without a tape: the same statistics.
                let mut untaped: Vec<BatchStats> = Vec::new();
                let x =
                    dev.tensor_from_vec(x0.clone(), (n, shape.channels, shape.height, shape.width));
                let mut relus = Relus::Plain;
                m.forward_with(&tensors, x, false, &mut relus, Norms::Collect(&mut untaped));
                assert_eq!(stats, untaped, "{spec}");
                out
            };
            let (plain, separate) = (run(false), run(true));
            assert_eq!(plain.len(), separate.len(), "{spec}");
            for (i, (a, b)) in plain.iter().zip(&separate).enumerate() {
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert!(bits(a) == bits(b), "{spec} input_grad {input_grad}: output {i} differs");
                assert!(a.iter().all(|v| v.is_finite()), "{spec}: output {i}");
            }
            // The input's gradient is zero exactly when it is not asked for.
            assert_eq!(plain[1].iter().any(|v| *v != 0.0), input_grad, "{spec}");
        }
    }
}

#[test]
fn a_training_step_updates_running_statistics_as_pytorch_and_sgd_leaves_them_alone() {
    // One step on one batch (the whole 64-image subset): PyTorch's update from its initial state
    // (mean 0, var 1) is mean = 0.1 * batch mean, var = 0.9 + 0.1 * unbiased batch var,
    // num_batches_tracked = 1, whatever the learning rate and weight decay do to the weights.
    let ds = digits();
    let mut small = ds.clone();
    small.train = small.train.subset(&(0..64).collect::<Vec<usize>>());
    let m = model("resnet:depth=8,width=4", &small);
    let c = TrainConfig {
        iterations: Some(1),
        batch_size: 64,
        lr: 0.1,
        eval_every: 0,
        augment: Some(false),
        ..Default::default()
    };
    let p0 = m.init(2);
    let data = TrainData::of(&small, &c);
    let s = fit::fit(
        &m,
        &Mask::dense(&m.layout),
        &data,
        &c,
        0,
        TrainState::start(p0.clone()),
        &mut fit::Silent,
    )
    .unwrap();
    let order = data::epoch_order(64, 0, 0);
    let mut b = Batch::default();
    data::fill_batch(&small.train, &small.norm, &order, None, &mut b);
    let dev = Cpu::default();
    let x = dev.tensor_from_vec(b.x.clone(), (64, 1, 8, 8));
    let mut stats = Vec::new();
    let _ = m.forward(&m.tensors(&dev, &p0), x, false, Norms::Collect(&mut stats));
    let mut k = 0;
    for e in &m.layout.entries {
        let got = &s.params.data[e.range()];
        match e.kind {
            ParamKind::RunningMean => {
                for (g, b) in got.iter().zip(&stats[k].mean) {
                    assert!(
                        (g - 0.1 * b).abs() <= 1e-6 * (1.0 + b.abs()),
                        "{}: {g} vs {b}",
                        e.name
                    );
                }
            }
            ParamKind::RunningVar => {
                for (g, b) in got.iter().zip(&stats[k].var_unbiased) {
                    let want = 0.9 + 0.1 * b;
                    assert!((g - want).abs() <= 1e-6 * want, "{}: {g} vs {want}", e.name);
                }
            }
            ParamKind::BatchesTracked => {
                assert_eq!(got, [1.0], "{}", e.name);
                k += 1;
            }
            _ => {}
        }
    }
    assert_eq!(k, m.running_statistics());
    let t = m.layout.trainable_total();
    assert!(s.momentum[t..].iter().all(|&v| v == 0.0), "momentum on state");
    assert_ne!(s.params.data[..t], p0.data[..t], "the weights did not move");
}

#[test]
fn openlth_initialisation() {
    // kaiming_normal_ weights: std sqrt(2 / fan_in); uniform batch-norm scales in [0, 1).
    let ds = data::load(DatasetName::Digits, None).unwrap();
    let m = model("resnet:depth=20,width=16", &ds);
    let p = m.init(0);
    let w = p.get("blocks.8.conv2.weight").unwrap();
    let sd = (w.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
    let want = (2.0f64 / (64.0 * 9.0)).sqrt();
    // 36,864 draws: the sample standard deviation is within 2% of the true one.
    assert!((sd / want - 1.0).abs() < 0.02, "{sd} vs {want}");
    let g = p.get("blocks.8.bn2.weight").unwrap();
    assert!(g.iter().all(|v| (0.0..1.0).contains(v)) && g.iter().any(|v| *v < 0.5));
    assert!(p.get("blocks.8.bn2.bias").unwrap().iter().all(|v| *v == 0.0));
    assert!(p.get("blocks.8.bn2.running_var").unwrap().iter().all(|v| *v == 1.0));
    assert!(p.get("blocks.8.bn2.running_mean").unwrap().iter().all(|v| *v == 0.0));
    assert_eq!(p.get("blocks.8.bn2.num_batches_tracked").unwrap(), [0.0]);
    // The linear bias keeps PyTorch's default, U(-1/8, 1/8) for 64 features.
    assert!(p.get("fc.bias").unwrap().iter().all(|v| v.abs() <= 0.125));
    // DC/IDC's ResNet-18 keeps PyTorch's defaults: scales 1.
    let r18 = model("resnet18:width=2", &ds);
    assert!(r18.init(0).get("bn.weight").unwrap().iter().all(|v| *v == 1.0));
}

#[test]
fn resnet_training_is_thread_independent_and_resumes_exactly() {
    let ds = digits();
    let mut small = ds.clone();
    small.train = small.train.subset(&(0..300).collect::<Vec<usize>>());
    let m = model("resnet:depth=8,width=4", &small);
    let c = TrainConfig {
        epochs: 3,
        batch_size: 64,
        lr: 0.05,
        eval_every: 0,
        augment: Some(true),
        ..Default::default()
    };
    let data = TrainData::of(&small, &c);
    let mask = Mask::dense(&m.layout);
    let run = |threads: usize, start: TrainState, obs: &mut (dyn Observer + Send)| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| fit::fit(&m, &mask, &data, &c, 4, start, obs))
    };
    let one = run(1, TrainState::start(m.init(1)), &mut fit::Silent).unwrap();
    let two = run(2, TrainState::start(m.init(1)), &mut fit::Silent).unwrap();
    assert_eq!(common::bits(&one.params.data), common::bits(&two.params.data));
    assert_eq!(one, two);
    struct StopAfter(Option<TrainState>);
    impl Observer for StopAfter {
        fn on_epoch(&mut self, s: &TrainState) -> lmc_train::Result<()> {
            if s.epochs_done == 1 {
                self.0 = Some(s.clone());
                return Err(Error::interrupted("killed"));
            }
            Ok(())
        }
    }
    let mut stop = StopAfter(None);
    assert!(run(2, TrainState::start(m.init(1)), &mut stop).is_err());
    let resumed = run(2, stop.0.unwrap(), &mut fit::Silent).unwrap();
    assert_eq!(resumed, one);
    // Running statistics moved: 3 epochs of 5 batches.
    let bn = m.layout.get("bn.num_batches_tracked").unwrap();
    assert_eq!(one.params.data[bn.range()], [15.0]);
}

#[test]
fn a_batch_of_one_on_1x1_planes_is_refused_not_a_panic() {
    let ds = digits();
    let m = model("resnet18:width=2", &ds);
    assert_eq!(m.min_train_batch(), 2);
    let c = TrainConfig { epochs: 1, batch_size: 1, eval_every: 0, ..Default::default() };
    let e = fit::fit(
        &m,
        &Mask::dense(&m.layout),
        &TrainData::of(&ds, &c),
        &c,
        0,
        TrainState::start(m.init(0)),
        &mut fit::Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--batch-size 1") && e.contains("at least 2"), "{e}");
    assert_eq!(model("resnet20", &ds).min_train_batch(), 1);
}

#[test]
fn fused_norm_relu_and_residual_equal_the_separate_ops_in_a_whole_resnet() {
    // Plain ReLUs take the fused `batch_norm_relu_*` ops, recorded patterns the separate norm,
    // `+` and ReLU: logits, every gradient and the collected batch statistics agree bit for bit
    // (identity and 1x1-conv shortcuts, strided blocks, both modes). The separate ReLU of a
    // recording differs from the plain one only on an input of exactly -0.0, which these
    // values do not produce.
    let ds = digits();
    let b = batch(&ds, 12);
    for spec in ["resnet:depth=8,width=4", "resnet10:width=2"] {
        let m = model(spec, &ds);
        let p = perturbed(&m, 5);
        let t = m.layout.trainable_total();
        for mode in [NormMode::Batch, NormMode::Running] {
            let run = |record: bool| {
                let dev = Cpu::default();
                let tensors = m.tensors(&dev, &p);
                let x = dev.tensor_from_vec(b.x.clone(), (12, 1, 8, 8));
                let mut stats: Vec<BatchStats> = Vec::new();
                let norms = match mode {
                    NormMode::Batch => Norms::Collect(&mut stats),
                    NormMode::Running => Norms::Running,
                };
                let mut patterns = Patterns::default();
                let mut relus = if record { Relus::Record(&mut patterns) } else { Relus::Plain };
                let logits = m.forward_with(&tensors, x.leaky_trace(), true, &mut relus, norms);
                let lv = logits.as_vec();
                let g = logits.sum().backward();
                let mut out = vec![lv, g.get(&x).as_vec()];
                // Trained tensors only: running statistics get no gradient.
                let trained = m.layout.entries.iter().filter(|e| e.range().end <= t).count();
                out.extend(tensors[..trained].iter().map(|t| g.get(t).as_vec()));
                for st in &stats {
                    out.push(st.mean.clone());
                    out.push(st.var_unbiased.clone());
                }
                out
            };
            let (fused, separate) = (run(false), run(true));
            assert_eq!(fused.len(), separate.len(), "{spec} {mode:?}");
            for (i, (a, b)) in fused.iter().zip(&separate).enumerate() {
                let (a, b): (Vec<u32>, Vec<u32>) = (
                    a.iter().map(|v| v.to_bits()).collect(),
                    b.iter().map(|v| v.to_bits()).collect(),
                );
                assert!(a == b, "{spec} {mode:?}: output {i} differs");
            }
        }
    }
}
