//! Helpers shared by the op tests (`ops.rs`, `batch_norm.rs`): devices, seeded values, tensor
//! reads, and the finite-difference harness's scalar `sum(out * r)`.
// Each test file uses only some of these.
#![allow(dead_code)]

use dfdx::prelude::*;
use lmc_train::ops::T1;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub type S4 = (usize, usize, usize, usize);

pub fn dev() -> Cpu {
    Cpu::default()
}

/// Uniform(-1, 1) values from a fixed seed.
pub fn rv(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

pub fn t1(v: &[f32]) -> T1 {
    dev().tensor_from_vec(v.to_vec(), (v.len(),))
}

pub fn vec_of<S: Shape, T>(t: &Tensor<S, f32, Cpu, T>) -> Vec<f32> {
    let mut v = vec![0.0; t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `sum(y * r)` as a tape op (test-side, so the harness works for any output shape).
pub fn dot_loss<S: Shape, Tp: Tape<f32, Cpu>>(
    y: Tensor<S, f32, Cpu, Tp>,
    r: &[f32],
) -> Tensor<(), f32, Cpu, Tp> {
    let (y, mut tape) = y.split_tape();
    let yv = vec_of(&y);
    assert_eq!(yv.len(), r.len());
    let l: f64 = yv.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum();
    let out = dev().tensor_from_vec(vec![l as f32], ());
    let (y_g, out_g) = (y.ghost(), out.ghost());
    let r = r.to_vec();
    tape.add_backward_op(move |grads| {
        let dl = grads.get_or_alloc_mut(&out_g)?[0];
        let dy = grads.get_or_alloc_mut(&y_g)?;
        for (d, ri) in dy.iter_mut().zip(&r) {
            *d += ri * dl;
        }
        Ok(())
    });
    out.put_tape(tape)
}

pub fn numel((n, c, h, w): S4) -> usize {
    n * c * h * w
}

/// Relative error of a finite-difference directional derivative along a random direction.
pub fn fd_err(l: impl Fn(&[f32]) -> f64, x0: &[f32], g: &[f32], eps: f32, seed: u64) -> f64 {
    let v = rv(x0.len(), seed);
    let xp: Vec<f32> = x0.iter().zip(&v).map(|(a, b)| a + eps * b).collect();
    let xm: Vec<f32> = x0.iter().zip(&v).map(|(a, b)| a - eps * b).collect();
    let an: f64 = g
        .iter()
        .zip(xp.iter().zip(&xm))
        .map(|(g, (p, m))| *g as f64 * (*p as f64 - *m as f64))
        .sum();
    let fd = l(&xp) - l(&xm);
    let gn = g.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    let dn = xp.iter().zip(&xm).map(|(p, m)| (*p as f64 - *m as f64).powi(2)).sum::<f64>().sqrt();
    let scale = an.abs().max(fd.abs()).max(1e-3 * gn * dn).max(1e-30);
    (fd - an).abs() / scale
}
