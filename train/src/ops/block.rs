//! The tail of a ConvNet block as one op: instance norm (optional) -> ReLU -> average pooling.
//!
//! Composed from the separate ops, this tail makes five full-size passes over the conv output
//! forward and six backward (copies, a ReLU mask, zero-filled gradient buffers), which is most of
//! the non-GEMM time of a ConvNet-3 step. Fused, each (n, c) plane (a few KiB, in L1) is read
//! once forward and once backward, and only the normalised input is kept for backward.
//!
//! The arithmetic is the composition's, step by step in the same order, so the result is
//! bit-identical to `avg_pool2d(relu(instance_norm(x, gamma, beta, eps)), k)` (a test checks it).

use dfdx::prelude::*;
use rayon::prelude::*;

use super::norm::{add_channel_totals, normalize_plane, plane_backward};
use super::{read, ELEM_CHUNK, T1, T4};
use crate::cpu::Build;

/// `max(z, 0)` with PyTorch's NaN behaviour, exactly as [`super::relu`] computes it.
#[inline(always)]
fn relu1(z: f32) -> f32 {
    if z < 0.0 {
        0.0
    } else {
        z
    }
}

/// `avg_pool2d(relu(instance_norm(x, gamma, beta, eps)), k)` for `norm = Some((gamma, beta))`,
/// `avg_pool2d(relu(x), k)` for `None`, as one op (see the module docs). Same shapes, rounding
/// and panics as the separate ops; results are bit-identical to them and to any thread count.
pub fn norm_relu_pool<Tp: Tape<f32, Cpu>>(
    x: T4<Tp>,
    norm: Option<(&T1, &T1)>,
    eps: f32,
    k: usize,
) -> T4<Tp> {
    norm_relu_pool_with(Build::selected(), x, norm, eps, k)
}

/// [`norm_relu_pool`] with its plane loops (forward and backward) compiled for `build`, so tests
/// can compare the builds.
pub(crate) fn norm_relu_pool_with<Tp: Tape<f32, Cpu>>(
    build: Build,
    x: T4<Tp>,
    norm: Option<(&T1, &T1)>,
    eps: f32,
    k: usize,
) -> T4<Tp> {
    let x = x.contiguous();
    let (n, c, h, w) = *x.shape();
    assert!(k > 0 && h >= k && w >= k, "norm_relu_pool: kernel {k} does not fit input {h}x{w}");
    if let Some((g, b)) = norm {
        assert_eq!(
            g.shape().0,
            c,
            "norm_relu_pool: gamma has {} elements, expected {c}",
            g.shape().0
        );
        assert_eq!(
            b.shape().0,
            c,
            "norm_relu_pool: beta has {} elements, expected {c}",
            b.shape().0
        );
    }
    let (ho, wo) = (h / k, w / k);
    let (m, qs) = (h * w, ho * wo);
    let inv = (k * k) as f32;
    let (gv, bv) = match norm {
        Some((g, b)) => (read(g), read(b)),
        None => (Vec::new(), Vec::new()),
    };
    let has_norm = norm.is_some();
    let (x, mut tape) = x.split_tape();
    // `xh` starts as a copy of x; with the norm it is normalised in place. It is all backward
    // needs: the ReLU's input is recomputed from it.
    let mut xh = read(&x);
    let mut y = vec![0.0f32; n * c * qs];
    let mut rstd = vec![0.0f32; n * c];
    let min_planes = (ELEM_CHUNK / m).max(1);
    // The ReLU input of element i of a plane of channel ch (the norm's output, or x itself).
    let pre = move |gv: &[f32], bv: &[f32], ch: usize| {
        let (ga, be) = if has_norm { (gv[ch], bv[ch]) } else { (1.0, 0.0) };
        move |v: f32| if has_norm { ga * v + be } else { v }
    };
    xh.par_chunks_mut(m)
        .zip(y.par_chunks_mut(qs))
        .zip(rstd.par_iter_mut())
        .enumerate()
        .with_min_len(min_planes)
        .for_each(|(pi, ((xp, yp), rs))| {
            build.run(
                #[inline(always)]
                || {
                    if has_norm {
                        *rs = normalize_plane(xp, eps);
                    }
                    let z = pre(&gv, &bv, pi % c);
                    for oy in 0..ho {
                        let yr = &mut yp[oy * wo..(oy + 1) * wo];
                        if k == 2 {
                            // As `avg_pool2d`'s vectorised case.
                            let r0 = &xp[2 * oy * w..2 * oy * w + 2 * wo];
                            let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * wo];
                            for ((yv, a), b) in
                                yr.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2))
                            {
                                *yv = ((relu1(z(a[0])) + relu1(z(a[1])))
                                    + (relu1(z(b[0])) + relu1(z(b[1]))))
                                    * 0.25;
                            }
                            continue;
                        }
                        for ky in 0..k {
                            let xr = &xp[(oy * k + ky) * w..(oy * k + ky) * w + wo * k];
                            for (yv, win) in yr.iter_mut().zip(xr.chunks_exact(k)) {
                                let mut s = 0.0f32;
                                for v in win {
                                    s += relu1(z(*v));
                                }
                                *yv += s;
                            }
                        }
                        for yv in yr.iter_mut() {
                            *yv /= inv;
                        }
                    }
                },
            )
        });
    let out = x.device().tensor_from_vec(y, (n, c, ho, wo));

    if Tp::OWNS_TAPE {
        let (x_g, out_g) = (x.ghost(), out.ghost());
        let ghosts = norm.map(|(g, b)| (g.ghost(), b.ghost()));
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            // Per plane: (sum g * xhat, sum g) with g the gradient at the norm's output.
            let mut sums = vec![(0.0f64, 0.0f64); n * c];
            {
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                dx.par_chunks_mut(m)
                    .zip(dy.par_chunks(qs))
                    .zip(xh.par_chunks(m))
                    .zip(sums.par_iter_mut())
                    .enumerate()
                    .with_min_len(min_planes)
                    .for_each_init(
                        || vec![0.0f32; m],
                        |gz, (pi, (((dxp, dyp), xp), s))| {
                            build.run(
                                #[inline(always)]
                                || {
                                    let ch = pi % c;
                                    let z = pre(&gv, &bv, ch);
                                    // Pool backward into a zeroed plane (uncovered rows/columns stay 0),
                                    // then the ReLU mask: as the separate ops accumulate them.
                                    gz.fill(0.0);
                                    for oy in 0..ho {
                                        let dyr = &dyp[oy * wo..(oy + 1) * wo];
                                        for ky in 0..k {
                                            let row = (oy * k + ky) * w;
                                            let (gr, xr) = (
                                                &mut gz[row..row + wo * k],
                                                &xp[row..row + wo * k],
                                            );
                                            for ((win, xw), g) in gr
                                                .chunks_exact_mut(k)
                                                .zip(xr.chunks_exact(k))
                                                .zip(dyr)
                                            {
                                                let g = if k == 2 { g * 0.25 } else { g / inv };
                                                for (d, v) in win.iter_mut().zip(xw) {
                                                    *d += if z(*v) > 0.0 { 0.0 + g } else { 0.0 };
                                                }
                                            }
                                        }
                                    }
                                    if !has_norm {
                                        for (d, g) in dxp.iter_mut().zip(gz.iter()) {
                                            *d += g;
                                        }
                                        return;
                                    }
                                    *s = plane_backward(gz, xp, gv[ch], rstd[pi], dxp);
                                },
                            )
                        },
                    );
            }
            drop(dy);
            if let Some((g_g, b_g)) = &ghosts {
                add_channel_totals(grads.get_or_alloc_mut(g_g)?, sums.iter().map(|s| s.0));
                add_channel_totals(grads.get_or_alloc_mut(b_g)?, sums.iter().map(|s| s.1));
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}
