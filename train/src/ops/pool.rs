//! Average pooling with kernel = stride = k (PyTorch's `AvgPool2d(k)`, floor mode), and global
//! average pooling (a ResNet's last spatial op).

use dfdx::prelude::*;
use rayon::prelude::*;

use super::{read, sum_f32, ELEM_CHUNK, T2, T4};

/// Average pooling of `x` (N, C, H, W) over non-overlapping k x k windows: output
/// (N, C, H / k, W / k), rounding down like PyTorch's `AvgPool2d(k)` (a 7x7 input gives 3x3;
/// the last row and column are ignored). Panics if `k == 0` or the input is smaller than `k`.
pub fn avg_pool2d<Tp: Tape<f32, Cpu>>(x: T4<Tp>, k: usize) -> T4<Tp> {
    let x = x.contiguous();
    let (n, c, h, w) = *x.shape();
    assert!(k > 0 && h >= k && w >= k, "avg_pool2d: kernel {k} does not fit input {h}x{w}");
    let (ho, wo) = (h / k, w / k);
    let (ps, qs) = (h * w, ho * wo); // input and output plane sizes
    let planes = n * c;
    let inv = (k * k) as f32;
    let (x, mut tape) = x.split_tape();
    let xv = read(&x);
    let mut y = vec![0.0f32; planes * qs];
    let min_planes = (ELEM_CHUNK / ps).max(1);
    y.par_chunks_mut(qs).zip(xv.par_chunks(ps)).with_min_len(min_planes).for_each(|(yp, xp)| {
        for oy in 0..ho {
            let yr = &mut yp[oy * wo..(oy + 1) * wo];
            if k == 2 {
                // The common case, written so that it vectorises.
                let r0 = &xp[2 * oy * w..2 * oy * w + 2 * wo];
                let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * wo];
                for ((yv, a), b) in yr.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                    *yv = ((a[0] + a[1]) + (b[0] + b[1])) * 0.25;
                }
                continue;
            }
            for ky in 0..k {
                let xr = &xp[(oy * k + ky) * w..(oy * k + ky) * w + wo * k];
                for (yv, win) in yr.iter_mut().zip(xr.chunks_exact(k)) {
                    let mut s = 0.0f32;
                    for v in win {
                        s += v;
                    }
                    *yv += s;
                }
            }
            for yv in yr.iter_mut() {
                *yv /= inv;
            }
        }
    });
    drop(xv);
    let out = x.device().tensor_from_vec(y, (n, c, ho, wo));

    if Tp::OWNS_TAPE {
        let (x_g, out_g) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
            dx.par_chunks_mut(ps).zip(dy.par_chunks(qs)).with_min_len(min_planes).for_each(
                |(dxp, dyp)| {
                    for oy in 0..ho {
                        let dyr = &dyp[oy * wo..(oy + 1) * wo];
                        if k == 2 {
                            let (r0, r1) = dxp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
                            for ((a, b), g) in
                                r0.chunks_exact_mut(2).zip(r1.chunks_exact_mut(2)).zip(dyr)
                            {
                                let g = g * 0.25;
                                a[0] += g;
                                a[1] += g;
                                b[0] += g;
                                b[1] += g;
                            }
                            continue;
                        }
                        for ky in 0..k {
                            let dxr = &mut dxp[(oy * k + ky) * w..(oy * k + ky) * w + wo * k];
                            for (win, g) in dxr.chunks_exact_mut(k).zip(dyr) {
                                let g = g / inv;
                                for d in win {
                                    *d += g;
                                }
                            }
                        }
                    }
                },
            );
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// Global average pooling: `x` (N, C, H, W) to (N, C), each plane's mean (PyTorch's
/// `AdaptiveAvgPool2d(1)` followed by a flatten, as a ResNet ends). Each plane is summed in a
/// fixed order (`sum_f32`) and divided by H * W, so the result does not depend on threads;
/// backward spreads each output's gradient / (H * W) over its plane.
pub fn global_avg_pool<Tp: Tape<f32, Cpu>>(x: T4<Tp>) -> T2<Tp> {
    let x = x.contiguous();
    let (n, c, h, w) = *x.shape();
    assert!(h > 0 && w > 0, "global_avg_pool: empty planes {h}x{w}");
    let ps = h * w;
    let area = ps as f32;
    let (x, mut tape) = x.split_tape();
    let xv = read(&x);
    let mut y = vec![0.0f32; n * c];
    let min_planes = (ELEM_CHUNK / ps).max(1);
    y.par_iter_mut()
        .zip(xv.par_chunks(ps))
        .with_min_len(min_planes)
        .for_each(|(yv, xp)| *yv = sum_f32(xp) / area);
    drop(xv);
    let out = x.device().tensor_from_vec(y, (n, c));

    if Tp::OWNS_TAPE {
        let (x_g, out_g) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
            dx.par_chunks_mut(ps).zip(dy.par_iter()).with_min_len(min_planes).for_each(
                |(dxp, g)| {
                    let g = g / area;
                    for d in dxp {
                        *d += g;
                    }
                },
            );
            Ok(())
        });
    }
    out.put_tape(tape)
}
