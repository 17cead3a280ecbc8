//! A fully connected layer on `gemm`.

use dfdx::prelude::*;

use super::gemm::{Gemm, Operand};
use super::{read, T1, T2};

/// `y = x W^T + b` for `x` (N, in), `w` (out, in) row-major like PyTorch's `nn.Linear`, `b` (out).
///
/// Gradients: `dx += dy W`, `dW += dy^T x`, `db += sum_n dy`. With `input_grad == false` the
/// backward pass skips `dx` (still allocated, as zeros): the first layer of a network trained on
/// fixed images never needs it, and for LeNet-300-100 that product is 29% of a step's FLOPs.
/// Panics if the sizes disagree.
pub fn linear<Tp: Tape<f32, Cpu>>(
    x: T2<Tp>,
    w: &T1,
    b: &T1,
    out_features: usize,
    input_grad: bool,
) -> T2<Tp> {
    let x = x.contiguous();
    let (n, inf) = *x.shape();
    let outf = out_features;
    assert_eq!(
        w.shape().0,
        outf * inf,
        "linear: weight has {} elements, expected {outf}x{inf}",
        w.shape().0
    );
    assert_eq!(b.shape().0, outf, "linear: bias has {} elements, expected {outf}", b.shape().0);
    let (x, mut tape) = x.split_tape();
    let xv = read(&x);
    let wv = read(w);
    let bv = read(b);

    let mut y = vec![0.0f32; n * outf];
    for row in y.chunks_exact_mut(outf.max(1)) {
        row.copy_from_slice(&bv);
    }
    // y (n x out) += x (n x in) * W^T (in x out)
    Gemm {
        m: n,
        n: outf,
        k: inf,
        lhs: Operand::row_major(&xv, inf),
        rhs: Operand::transposed(&wv, inf),
        accumulate: true,
    }
    .run_split(&mut y);
    let out = x.device().tensor_from_vec(y, (n, outf));

    if Tp::OWNS_TAPE {
        let (x_g, w_g, b_g, out_g) = (x.ghost(), w.ghost(), b.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            // The two products are independent: they run side by side (each moved out of
            // `grads` for the duration, since it cannot lend two gradients at once).
            let mut dx = std::mem::take(&mut **grads.get_or_alloc_mut(&x_g)?);
            let mut dw = std::mem::take(&mut **grads.get_or_alloc_mut(&w_g)?);
            rayon::join(
                || {
                    if input_grad {
                        // dx (n x in) += dy (n x out) * W (out x in)
                        Gemm {
                            m: n,
                            n: inf,
                            k: outf,
                            lhs: Operand::row_major(&dy, outf),
                            rhs: Operand::row_major(&wv, inf),
                            accumulate: true,
                        }
                        .run_split(&mut dx);
                    }
                },
                || {
                    // dW (out x in) += dy^T (out x n) * x (n x in)
                    Gemm {
                        m: outf,
                        n: inf,
                        k: n,
                        lhs: Operand::transposed(&dy, outf),
                        rhs: Operand::row_major(&xv, inf),
                        accumulate: true,
                    }
                    .run_split(&mut dw);
                },
            );
            **grads.get_or_alloc_mut(&x_g)? = dx;
            **grads.get_or_alloc_mut(&w_g)? = dw;
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
