//! The training step of an MLP (`mlp:...`, LeNet-300-100) without a graph: forward, mean
//! cross-entropy and backward straight on the flat parameters, into reused buffers.
//!
//! Why by hand, next to the dfdx tape that every other model uses: a LeNet-300-100 step is a
//! handful of small products (~0.15 GFLOP at batch 128), and on the tape ~45% of its time went
//! to work around them (measured with `perf` on 2026-11-28, 2-core AMD EPYC VM, AVX2 without
//! AVX-512): copying the parameters into tensors and each weight again inside its op, allocating
//! and zeroing every gradient and activation per step, the input gradient of the first layer,
//! and summing per-group gradients. Here no batch-sized buffer is copied or allocated after the
//! first step (only a few per-layer lists of offsets and views): products read the parameters in
//! place and write their results with overwrite (no zeroing), and activations live in buffers
//! kept between steps. The tape version remains the reference it is tested against
//! (`tests/fit.rs`).
//!
//! Parallelism, all fixed by the batch size alone (so results are bit-identical for any thread
//! count): the forward and the backward through the activations run per group of
//! [`MLP_GROUP`](crate::fit::MLP_GROUP) samples as parallel tasks, each one single-threaded
//! product after another; then each layer's weight gradient `dW = dZ^T A` is one product over
//! the whole batch, split into fixed output blocks ([`Gemm::run_split`](crate::ops::gemm::Gemm::run_split)), with the layers' products
//! running side by side.
//!
//! On mostly-background inputs (MNIST) the first layer's two products, ~85% of the step's
//! multiply-adds, run from the non-background inputs only ([`FirstLayer`], `sparse_input.rs`).

use rayon::prelude::*;

use crate::fit::MLP_GROUP;
use crate::model::DenseLayer;
use crate::ops::gemm::{Gemm, Layout, Operand, Par};
use crate::ops::softmax_xent_rows;
use crate::sparse_input::SparseInput;

/// How the MLP step computes its first layer's products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FirstLayer {
    /// From the inputs that differ from the background (`sparse_input.rs`) when at most
    /// [`SPARSE_INPUT_MAX_DENSITY`] of them do (MNIST: 19%), else dense.
    #[default]
    Auto,
    /// Always dense (`gemm`).
    Dense,
    /// Always from the background split (`sparse_input.rs`), however dense the input.
    Sparse,
}

/// The largest fraction of non-background inputs at which [`FirstLayer::Auto`] takes the sparse
/// path. The sparse path's products scale with that fraction, its transpositions and split do
/// not. Measured with criterion on LeNet-300-100 at batch 128 (`benches/train.rs`, 2026-11-28,
/// 2-core AMD EPYC VM, AVX2 without AVX-512, nothing else running): at MNIST's 0.19 the step
/// takes 1.11 ms against 1.60 ms dense; at Fashion-MNIST's 0.49, 2.02 ms against 1.83 ms. The line through those crosses over at ~0.42; this keeps a
/// margin below it.
pub const SPARSE_INPUT_MAX_DENSITY: f32 = 0.35;

/// Activations and their gradients, per layer, for the largest batch seen so far.
#[derive(Default)]
pub(crate) struct MlpBuffers {
    /// Post-ReLU activations of each hidden layer (n x width), then the logits (n x classes),
    /// which the loss turns into their gradient in place.
    act: Vec<Vec<f32>>,
    /// Gradient w.r.t. each hidden layer's pre-activation (n x width).
    dz: Vec<Vec<f32>>,
    /// The first layer's input split into background and sparse part.
    sparse: SparseInput,
}

/// Loss (mean cross-entropy) and number correct of an MLP with `layers` (as the model's layout
/// places each weight (out x in) and bias in `params`) on the `n` rows of `x`; writes the gradient
/// to `grad` (same layout as `params`, every element overwritten).
pub(crate) fn loss_and_grad(
    layers_at: &[DenseLayer],
    params: &[f32],
    x: &[f32],
    labels: &[u8],
    bufs: &mut MlpBuffers,
    grad: &mut [f32],
    first: FirstLayer,
) -> (f32, usize) {
    let n = labels.len();
    let widths: Vec<usize> =
        layers_at.iter().map(|l| l.inputs).chain(layers_at.last().map(|l| l.outputs)).collect();
    let layers_n = layers_at.len();
    assert_eq!(
        x.len(),
        n * widths[0],
        "mlp: input has {} values for {n} rows of {}",
        x.len(),
        widths[0]
    );
    // Phase 2 hands each layer its gradient as one slice (weight, then bias), so the layers must
    // tile the vector in order; the MLP layout does.
    let mut at = 0;
    for (l, layer) in layers_at.iter().enumerate() {
        assert!(
            layer.weight.start == at
                && layer.weight.len() == layer.inputs * layer.outputs
                && layer.bias.start == layer.weight.end
                && layer.bias.len() == layer.outputs
                && (l == 0 || layer.inputs == layers_at[l - 1].outputs),
            "mlp: layer {l} does not follow the layout order"
        );
        at = layer.bias.end;
    }
    assert_eq!(at, params.len(), "mlp: {} parameters for widths {widths:?}", params.len());
    assert_eq!(grad.len(), params.len(), "mlp: gradient buffer of the wrong size");
    let layers = layers_n;
    let weight = |l: usize| &params[layers_at[l].weight.clone()];
    let bias = |l: usize| &params[layers_at[l].bias.clone()];

    let sparse = first != FirstLayer::Dense && n > 0 && {
        let density = bufs.sparse.density(x, n, widths[0]);
        density.is_finite() && (first == FirstLayer::Sparse || density <= SPARSE_INPUT_MAX_DENSITY)
    };
    if sparse {
        bufs.sparse.split(x, n);
        bufs.sparse.set_weight(weight(0), widths[1]);
    }

    bufs.act.resize_with(layers, Vec::new);
    bufs.dz.resize_with(layers - 1, Vec::new);
    for l in 0..layers {
        bufs.act[l].resize(n * widths[l + 1], 0.0);
    }
    for l in 0..layers - 1 {
        bufs.dz[l].resize(n * widths[l + 1], 0.0);
    }

    // Phase 1, per group of rows: forward, loss, and backward through the activations.
    let groups = n.div_ceil(MLP_GROUP).max(1);
    let rows = |g: usize| (g * MLP_GROUP, ((g + 1) * MLP_GROUP).min(n));
    // Per group: its rows of every layer's activations and of every hidden gradient.
    type Rows<'a> = Vec<&'a mut [f32]>;
    let mut views: Vec<(Rows, Rows)> = (0..groups).map(|_| (vec![], vec![])).collect();
    for (l, a) in bufs.act.iter_mut().enumerate() {
        for (g, c) in a.chunks_mut(MLP_GROUP * widths[l + 1]).enumerate() {
            views[g].0.push(c);
        }
    }
    for (l, d) in bufs.dz.iter_mut().enumerate() {
        for (g, c) in d.chunks_mut(MLP_GROUP * widths[l + 1]).enumerate() {
            views[g].1.push(c);
        }
    }
    let scale = 1.0 / n as f32;
    let split = &bufs.sparse;
    let parts: Vec<(f64, usize)> = views
        .into_par_iter()
        .enumerate()
        .map(|(g, (mut act, mut dz))| {
            let (r0, r1) = rows(g);
            let m = r1 - r0;
            if m == 0 {
                return (0.0, 0);
            }
            for l in 0..layers {
                let (inf, outf) = (widths[l], widths[l + 1]);
                let (done, rest) = act.split_at_mut(l);
                let input: &[f32] = if l == 0 { &x[r0 * inf..r1 * inf] } else { &done[l - 1][..] };
                let out = &mut rest[0][..];
                if l == 0 && sparse {
                    split.forward(r0..r1, outf, out);
                } else {
                    // z (m x out) = a (m x in) W^T (in x out)
                    Gemm {
                        m,
                        n: outf,
                        k: inf,
                        lhs: Operand::row_major(input, inf),
                        rhs: Operand::transposed(weight(l), inf),
                        accumulate: false,
                    }
                    .run(out, Layout::row_major(outf), Par::Seq);
                }
                let b = bias(l);
                let hidden = l + 1 < layers;
                for row in out.chunks_exact_mut(outf) {
                    for (v, bj) in row.iter_mut().zip(b) {
                        let z = *v + bj;
                        // ReLU (NaN stays NaN, like PyTorch).
                        *v = if hidden && z < 0.0 { 0.0 } else { z };
                    }
                }
            }
            // The logits become (softmax - onehot) / n: the gradient of the mean loss.
            let (loss_sum, correct) =
                softmax_xent_rows(act[layers - 1], widths[layers], &labels[r0..r1], scale);
            for l in (1..layers).rev() {
                let (inf, outf) = (widths[l], widths[l + 1]);
                let (lower, upper) = dz.split_at_mut(l);
                let upstream: &[f32] = if l == layers - 1 { &act[l][..] } else { &upper[0][..] };
                let below = &mut lower[l - 1][..];
                // dA (m x in) = dZ (m x out) W (out x in), then through the ReLU.
                Gemm {
                    m,
                    n: inf,
                    k: outf,
                    lhs: Operand::row_major(upstream, outf),
                    rhs: Operand::row_major(weight(l), inf),
                    accumulate: false,
                }
                .run(below, Layout::row_major(inf), Par::Seq);
                for (d, a) in below.iter_mut().zip(act[l - 1].iter()) {
                    // Gradient 0 where the ReLU output is 0 (PyTorch: 0 at 0); AND on the bits
                    // so it vectorises.
                    *d = f32::from_bits(d.to_bits() & ((*a > 0.0) as u32).wrapping_neg());
                }
            }
            (loss_sum, correct)
        })
        .collect();

    // Phase 2: dW = dZ^T A and db = column sums of dZ over the whole batch, layers side by side.
    let act = &bufs.act;
    let dz = &bufs.dz;
    let upstream = |l: usize| -> &[f32] {
        if l == layers - 1 {
            &act[l]
        } else {
            &dz[l]
        }
    };
    // The first layer's slot carries the sparse split when it is used.
    let mut split = sparse.then_some(&mut bufs.sparse);
    let mut slots: Vec<(usize, &mut [f32], Option<&mut SparseInput>)> = Vec::with_capacity(layers);
    let mut rest = grad;
    for l in 0..layers {
        let (inf, outf) = (widths[l], widths[l + 1]);
        let (this, tail) = rest.split_at_mut(outf * inf + outf);
        slots.push((l, this, if l == 0 { split.take() } else { None }));
        rest = tail;
    }
    slots.into_par_iter().for_each(|(l, g, split)| {
        let (inf, outf) = (widths[l], widths[l + 1]);
        let input: &[f32] = if l == 0 { x } else { &act[l - 1] };
        let (dw, db) = g.split_at_mut(outf * inf);
        db.fill(0.0);
        for row in upstream(l).chunks_exact(outf) {
            for (d, v) in db.iter_mut().zip(row) {
                *d += v;
            }
        }
        match split {
            Some(s) => s.weight_grad(upstream(l), db, outf, dw),
            // dW (out x in) = dZ^T (out x n) A (n x in)
            None => Gemm {
                m: outf,
                n: inf,
                k: n,
                lhs: Operand::transposed(upstream(l), outf),
                rhs: Operand::row_major(input, inf),
                accumulate: false,
            }
            .run_split(dw),
        }
    });

    let loss: f64 = parts.iter().map(|p| p.0).sum();
    ((loss / n.max(1) as f64) as f32, parts.iter().map(|p| p.1).sum())
}
