//! A fully connected layer on `gemm`.

use dfdx::prelude::*;

use super::gemm::{sgemm, Layout, Par};
use super::{read, T1, T2};

/// `y = x W^T + b` for `x` (N, in), `w` (out, in) row-major like PyTorch's `nn.Linear`, `b` (out).
///
/// Gradients: `dx += dy W`, `dW += dy^T x`, `db += sum_n dy`. Panics if the sizes disagree.
pub fn linear<Tp: Tape<f32, Cpu>>(x: T2<Tp>, w: &T1, b: &T1, out_features: usize) -> T2<Tp> {
    let x = x.contiguous();
    let (n, inf) = *x.shape();
    let outf = out_features;
    assert_eq!(
        w.shape().0,
        outf * inf,
        "linear: weight has {} elements, expected {outf}x{inf}",
        w.shape().0
    );
    assert_eq!(
        b.shape().0,
        outf,
        "linear: bias has {} elements, expected {outf}",
        b.shape().0
    );
    let (x, mut tape) = x.split_tape();
    let xv = read(&x);
    let wv = read(w);
    let bv = read(b);

    let mut y = vec![0.0f32; n * outf];
    for row in y.chunks_exact_mut(outf.max(1)) {
        row.copy_from_slice(&bv);
    }
    // y (n x out) += x (n x in) * W^T (in x out)
    sgemm(
        n,
        outf,
        inf,
        &mut y,
        Layout::row_major(outf),
        true,
        &xv,
        Layout::row_major(inf),
        &wv,
        Layout::transposed(inf),
        Par::Pool,
    );
    let out = x.device().tensor_from_vec(y, (n, outf));

    if Tp::OWNS_TAPE {
        let (x_g, w_g, b_g, out_g) = (x.ghost(), w.ghost(), b.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            {
                // dx (n x in) += dy (n x out) * W (out x in)
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                sgemm(
                    n,
                    inf,
                    outf,
                    dx,
                    Layout::row_major(inf),
                    true,
                    &dy,
                    Layout::row_major(outf),
                    &wv,
                    Layout::row_major(inf),
                    Par::Pool,
                );
            }
            {
                // dW (out x in) += dy^T (out x n) * x (n x in)
                let dw: &mut Vec<f32> = grads.get_or_alloc_mut(&w_g)?;
                sgemm(
                    outf,
                    inf,
                    n,
                    dw,
                    Layout::row_major(inf),
                    true,
                    &dy,
                    Layout::transposed(outf),
                    &xv,
                    Layout::row_major(inf),
                    Par::Pool,
                );
            }
            let db: &mut Vec<f32> = grads.get_or_alloc_mut(&b_g)?;
            for row in dy.chunks_exact(outf.max(1)) {
                for (d, g) in db.iter_mut().zip(row) {
                    *d += g;
                }
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}
