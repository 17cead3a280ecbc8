//! Losses (cross-entropy, mean squared error) and the no-tape evaluation helper.

use dfdx::prelude::*;

use super::{read, T2};

/// Log-sum-exp of one row, stable (max subtracted), in f64.
fn logsumexp(row: &[f32]) -> f64 {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    if !mx.is_finite() {
        return mx; // all -inf (or +inf): the loss is inf/NaN anyway
    }
    let s: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
    mx + s.ln()
}

/// Mean over the batch of `-log softmax(logits_n)[labels_n]` (PyTorch's `cross_entropy` with
/// mean reduction), computed with log-sum-exp in f64. `logits` is (N, classes); panics if
/// `labels.len() != N` or a label is out of range.
///
/// Backward: `dlogits += (softmax - onehot) / N * dloss`.
pub fn cross_entropy<Tp: Tape<f32, Cpu>>(
    logits: T2<Tp>,
    labels: &[u8],
) -> Tensor<(), f32, Cpu, Tp> {
    let logits = logits.contiguous();
    let (n, classes) = *logits.shape();
    assert_eq!(labels.len(), n, "cross_entropy: {} labels for a batch of {n}", labels.len());
    assert!(classes > 0, "cross_entropy: no classes");
    let (z, mut tape) = logits.split_tape();
    let mut p = read(&z);
    // Each row becomes softmax - onehot, what backward needs (scaled there by dloss / N).
    let (total, _) = softmax_xent_rows(&mut p, classes, labels, 1.0);
    let loss = if n == 0 { f32::NAN } else { (total / n as f64) as f32 };
    let out = z.device().tensor_from_vec(vec![loss], ());
    if Tp::OWNS_TAPE {
        let (z_g, out_g) = (z.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dl = take_grad!(grads, out_g)[0];
            let scale = dl / n as f32;
            let dz: &mut Vec<f32> = grads.get_or_alloc_mut(&z_g)?;
            for (d, v) in dz.iter_mut().zip(&p) {
                *d += v * scale;
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// For each row of `z` (row-major, `classes` per row) with its label: adds `-log softmax[label]`
/// to the returned loss sum (f64, log-sum-exp with the maximum subtracted), counts the row as
/// correct when its arg-max (the first maximum, as [`accuracy_counts`]) is the label, and
/// replaces the row by `(softmax - onehot) * scale`: the gradient of `scale` x the summed loss.
/// Returns (loss sum, number correct). Panics if a label is out of range.
pub(crate) fn softmax_xent_rows(
    z: &mut [f32],
    classes: usize,
    labels: &[u8],
    scale: f32,
) -> (f64, usize) {
    let mut total = 0.0f64;
    let mut correct = 0usize;
    for (row, &l) in z.chunks_exact_mut(classes).zip(labels) {
        let l = l as usize;
        assert!(l < classes, "cross_entropy: label {l} out of range for {classes} classes");
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        correct += (best == l) as usize;
        let lse = logsumexp(row);
        total += lse - row[l] as f64;
        for v in row.iter_mut() {
            *v = (*v as f64 - lse).exp() as f32;
        }
        row[l] -= 1.0;
        if scale != 1.0 {
            for v in row.iter_mut() {
                *v *= scale;
            }
        }
    }
    (total, correct)
}

/// Mean over all elements of `(a - target)^2` (PyTorch's `mse_loss`, mean reduction); `target`
/// is row-major with `a`'s shape. Backward: `da += 2 (a - target) / numel * dloss`.
pub fn mse_loss<Tp: Tape<f32, Cpu>>(a: T2<Tp>, target: &[f32]) -> Tensor<(), f32, Cpu, Tp> {
    let a = a.contiguous();
    let (n, f) = *a.shape();
    assert_eq!(
        target.len(),
        n * f,
        "mse_loss: target has {} elements, expected {n}x{f}",
        target.len()
    );
    let (a, mut tape) = a.split_tape();
    let mut d = read(&a);
    let mut total = 0.0f64;
    for (v, t) in d.iter_mut().zip(target) {
        *v -= t;
        total += (*v as f64) * (*v as f64);
    }
    let numel = d.len();
    let loss = if numel == 0 { f32::NAN } else { (total / numel as f64) as f32 };
    let out = a.device().tensor_from_vec(vec![loss], ());
    if Tp::OWNS_TAPE {
        let (a_g, out_g) = (a.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dl = take_grad!(grads, out_g)[0];
            let scale = 2.0 * dl / numel as f32;
            let da: &mut Vec<f32> = grads.get_or_alloc_mut(&a_g)?;
            for (g, v) in da.iter_mut().zip(&d) {
                *g += v * scale;
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// For evaluation (no tape): the number of rows of `logits` (row-major, `classes` per row) whose
/// arg-max (the first maximum) equals the label, and the *sum* over rows of the cross-entropy
/// loss `-log softmax[label]` (f64). Panics if the sizes disagree or a label is out of range.
pub fn accuracy_counts(logits: &[f32], classes: usize, labels: &[u8]) -> (usize, f64) {
    assert!(classes > 0, "accuracy_counts: no classes");
    assert_eq!(
        logits.len(),
        labels.len() * classes,
        "accuracy_counts: {} logits for {} labels x {classes} classes",
        logits.len(),
        labels.len()
    );
    let mut correct = 0usize;
    let mut loss = 0.0f64;
    for (row, &l) in logits.chunks_exact(classes).zip(labels) {
        let l = l as usize;
        assert!(l < classes, "accuracy_counts: label {l} out of range for {classes} classes");
        let mut best = 0;
        for (j, &v) in row.iter().enumerate() {
            if v > row[best] {
                best = j;
            }
        }
        correct += (best == l) as usize;
        loss += logsumexp(row) - row[l] as f64;
    }
    (correct, loss)
}
