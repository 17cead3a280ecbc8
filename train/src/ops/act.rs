//! ReLU and flatten.

use dfdx::prelude::*;
use rayon::prelude::*;

use super::{read, ELEM_CHUNK, T2, T4};

/// `max(x, 0)` elementwise, for a tensor of any shape (NaN stays NaN; gradient 0 at 0, like
/// PyTorch). Runs in parallel chunks; keeps a one-byte mask per element for backward.
pub fn relu<S: Shape, Tp: Tape<f32, Cpu>>(x: Tensor<S, f32, Cpu, Tp>) -> Tensor<S, f32, Cpu, Tp> {
    let x = x.contiguous();
    let shape = *x.shape();
    let (x, mut tape) = x.split_tape();
    let mut y = read(&x);
    let mut mask = vec![0u8; if Tp::OWNS_TAPE { y.len() } else { 0 }];
    if Tp::OWNS_TAPE {
        y.par_chunks_mut(ELEM_CHUNK).zip(mask.par_chunks_mut(ELEM_CHUNK)).for_each(|(yc, mc)| {
            for (v, m) in yc.iter_mut().zip(mc.iter_mut()) {
                *m = (*v > 0.0) as u8;
                *v = if *v < 0.0 { 0.0 } else { *v };
            }
        });
    } else {
        y.par_chunks_mut(ELEM_CHUNK).for_each(|yc| {
            for v in yc.iter_mut() {
                *v = if *v < 0.0 { 0.0 } else { *v };
            }
        });
    }
    let out = x.device().tensor_from_vec(y, shape);
    if Tp::OWNS_TAPE {
        let (x_g, out_g) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
            dx.par_chunks_mut(ELEM_CHUNK)
                .zip(dy.par_chunks(ELEM_CHUNK))
                .zip(mask.par_chunks(ELEM_CHUNK))
                .for_each(|((dc, gc), mc)| {
                    for ((d, g), m) in dc.iter_mut().zip(gc).zip(mc) {
                        *d += if *m != 0 { *g } else { 0.0 };
                    }
                });
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// [`relu`] for a 2-D activation (N, F) (the same function, named for call sites that want the
/// shape spelled out).
pub fn relu2<Tp: Tape<f32, Cpu>>(x: T2<Tp>) -> T2<Tp> {
    relu(x)
}

/// Flattens (N, C, H, W) to (N, C*H*W) in row-major order. Zero-copy for a contiguous tensor
/// (dfdx's reshape keeps the buffer and the tensor id, so the gradient passes straight through);
/// a non-contiguous tensor is copied.
pub fn flatten<Tp: Tape<f32, Cpu>>(x: T4<Tp>) -> T2<Tp> {
    let (n, c, h, w) = *x.shape();
    x.reshape_like(&(n, c * h * w))
}
