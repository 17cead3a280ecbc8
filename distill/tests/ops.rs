//! Gradient checks of the distillation ops against central finite differences, and the decode op
//! against `SyntheticSet::decode`.
//!
//! Every op is affine in the pixels once its random parameters are drawn, so the central
//! difference of `L = sum(out * r)` along a random direction `v` equals `<grad, v>` up to f32
//! rounding: the tolerance is a relative 1e-3 (rounding of sums of ~1000 terms of size ~1 at
//! eps = 1e-2), and single coordinates are checked the same way.

use std::sync::Arc;

use dfdx::prelude::*;
use lmc_distill::dsa::{augment, AugParams, Augmentation, DsaOp, Strategy};
use lmc_distill::formation::{decode, encode_cells};
use lmc_train::data::{DatasetName, ImageSet, ImageShape, Normalization, Pixels, SyntheticSet};
use lmc_train::ops::T4;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type S4 = (usize, usize, usize, usize);
/// An op under test, on a traced 4-D tensor.
type Op<'a> = dyn Fn(T4<OwnedTape<f32, Cpu>>) -> T4<OwnedTape<f32, Cpu>> + 'a;

fn rv(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn host<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>) -> Vec<f32> {
    let mut v = vec![0.0; t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// `L(x) = sum(f(x) * r)` and its gradient by backward.
fn loss_and_grad(f: &Op<'_>, x: &[f32], shape: S4, r: &[f32]) -> (f64, Vec<f32>) {
    let dev = Cpu::default();
    let xt: T4<NoneTape> = dev.tensor_from_vec(x.to_vec(), shape);
    let y = f(xt.leaky_trace());
    let yv = host(&y);
    assert_eq!(yv.len(), r.len());
    let l: f64 = yv.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum();
    let rt = dev.tensor_from_vec(r.to_vec(), *y.shape());
    let loss = (y * rt).sum();
    let g = loss.backward();
    (l, g.get(&xt).as_vec())
}

fn value(f: &Op<'_>, x: &[f32], shape: S4, r: &[f32]) -> f64 {
    loss_and_grad(f, x, shape, r).0
}

/// Checks the gradient of `f` at a random point along a random direction and at 5 coordinates.
fn grad_check(name: &str, f: &Op<'_>, shape: S4, out_len: usize, seed: u64) {
    let n = shape.num_elements();
    let x = rv(n, seed);
    let r = rv(out_len, seed + 1);
    let (_, g) = loss_and_grad(f, &x, shape, &r);
    let eps = 1e-2f32;
    let v = rv(n, seed + 2);
    let plus: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a + eps * b).collect();
    let minus: Vec<f32> = x.iter().zip(&v).map(|(a, b)| a - eps * b).collect();
    let fd = (value(f, &plus, shape, &r) - value(f, &minus, shape, &r)) / (2.0 * eps as f64);
    let an: f64 = g
        .iter()
        .zip(plus.iter().zip(&minus))
        .map(|(g, (p, m))| *g as f64 * (*p as f64 - *m as f64) / (2.0 * eps as f64))
        .sum();
    let scale = an.abs().max(fd.abs()).max(1.0);
    assert!(
        (fd - an).abs() <= 1e-3 * scale,
        "{name}: directional derivative fd {fd} vs backward {an}"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 3);
    for _ in 0..5 {
        let i = rng.gen_range(0..n);
        let (mut p, mut m) = (x.clone(), x.clone());
        p[i] += eps;
        m[i] -= eps;
        let fd = (value(f, &p, shape, &r) - value(f, &m, shape, &r)) / ((p[i] - m[i]) as f64);
        assert!(
            (fd - g[i] as f64).abs() <= 1e-3 * fd.abs().max(1.0),
            "{name}: d/dx[{i}] fd {fd} vs backward {}",
            g[i]
        );
    }
}

#[test]
fn every_dsa_op_matches_finite_differences() {
    // Non-square, 3 channels, two images with different draws: catches row/column mix-ups.
    let shape = ImageShape { channels: 3, height: 6, width: 7 };
    let s4 = (2, 3, 6, 7);
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut cases: Vec<(String, Vec<AugParams>)> = DsaOp::ALL
        .iter()
        .map(|op| {
            (op.as_str().to_string(), vec![op.sample(&mut rng, shape), op.sample(&mut rng, shape)])
        })
        .collect();
    // Fixed draws that surely move pixels (a random flip may not flip).
    cases.push(("flip (on)".into(), vec![AugParams::Flip(true), AugParams::Flip(false)]));
    cases.push((
        "crop (fixed)".into(),
        vec![AugParams::Crop { dy: 1, dx: -2 }, AugParams::Crop { dy: -3, dx: 0 }],
    ));
    cases.push((
        "scale (fixed)".into(),
        vec![AugParams::Scale { sx: 1.13, sy: 0.87 }, AugParams::Scale { sx: 0.9, sy: 1.1 }],
    ));
    cases.push((
        "rotate (fixed)".into(),
        vec![AugParams::Rotate { theta: 0.2 }, AugParams::Rotate { theta: -0.25 }],
    ));
    for (k, (name, params)) in cases.into_iter().enumerate() {
        let aug = Arc::new(Augmentation::per_image(shape, &params));
        grad_check(&name, &|x| augment(x, &aug), s4, 2 * shape.len(), 100 + k as u64);
    }
}

#[test]
fn siamese_groups_share_one_draw() {
    // Images 0 and 2 share draw 0, image 1 gets draw 1: equal inputs give equal outputs.
    let shape = ImageShape { channels: 1, height: 5, width: 5 };
    let p = [AugParams::Rotate { theta: 0.3 }, AugParams::Crop { dy: 2, dx: 1 }];
    let aug = Augmentation::new(shape, &p, vec![0, 1, 0]);
    let img = rv(25, 9);
    let x: Vec<f32> = img.iter().chain(&img).chain(&img).copied().collect();
    let y = aug.apply_host(&x);
    assert_eq!(y[..25], y[50..]);
    assert_ne!(y[..25], y[25..50]);
    let aug = Arc::new(aug);
    grad_check("siamese", &|x| augment(x, &aug), (3, 1, 5, 5), 75, 11);
}

#[test]
fn decode_matches_finite_differences() {
    for (factor, s4) in [(2, (2, 2, 4, 6)), (3, (1, 1, 6, 9)), (4, (1, 3, 8, 8))] {
        let out = s4.0 * factor * factor * s4.1 * s4.2 * s4.3;
        grad_check(
            &format!("decode factor {factor}"),
            &|x| decode(x, factor),
            s4,
            out,
            40 + factor as u64,
        );
    }
}

#[test]
fn decode_op_equals_the_artifact_decoder() {
    // The op must feed distillation exactly what `lmc train --dataset syn.lmc` trains on.
    let shape = ImageShape { channels: 3, height: 8, width: 8 };
    let px = rv(3 * shape.len(), 3);
    let set = SyntheticSet {
        name: "t".into(),
        base: DatasetName::Cifar10,
        images: ImageSet { shape, pixels: Pixels::F32(px.clone()), labels: vec![0, 1, 2] },
        factor: 2,
        norm: Normalization { mean: vec![0.0; 3], std: vec![1.0; 3] },
        class_names: vec![],
        recipe: String::new(),
    };
    let Pixels::F32(want) = set.decode().unwrap().pixels else { panic!() };
    let x: T4<NoneTape> = Cpu::default().tensor_from_vec(px, (3, 3, 8, 8));
    let got = host(&decode(x, 2));
    assert_eq!(got, want);
}

#[test]
fn encode_then_decode_reproduces_blocky_images() {
    // An image made of constant 2x2 blocks survives shrinking into a cell; decoding that cell
    // gives back a smooth version whose block centres keep their values' average.
    let shape = ImageShape { channels: 1, height: 4, width: 4 };
    let reals: Vec<f32> = (0..4).flat_map(|k| vec![k as f32; 16]).collect();
    let stored = encode_cells(&reals, shape, 2);
    // Cell k is constant k.
    assert_eq!(stored, vec![0., 0., 1., 1., 0., 0., 1., 1., 2., 2., 3., 3., 2., 2., 3., 3.]);
    let x: T4<NoneTape> = Cpu::default().tensor_from_vec(stored, (1, 1, 4, 4));
    let d = host(&decode(x, 2));
    for k in 0..4 {
        assert!(d[k * 16..(k + 1) * 16].iter().all(|&v| v == k as f32));
    }
}

#[test]
fn strategy_errors_name_the_op() {
    let e = "color_crop_wobble".parse::<Strategy>().unwrap_err().to_string();
    assert!(e.contains("wobble") && e.contains("--dsa"), "{e}");
}
