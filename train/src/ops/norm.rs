//! Instance normalisation with a per-channel affine transform (PyTorch's
//! `GroupNorm(C, C, affine=True)`).

use dfdx::prelude::*;
use rayon::prelude::*;

use super::{combine16, read, ELEM_CHUNK, T1, T4};

/// Sum over `a` of `a_i * b_i` in f64, 16 interleaved partial sums combined in a fixed order.
#[inline(always)]
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0.0f64; 16];
    let (mut ia, mut ib) = (a.chunks_exact(16), b.chunks_exact(16));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for j in 0..16 {
            acc[j] += ca[j] as f64 * cb[j] as f64;
        }
    }
    for (j, (x, y)) in ia.remainder().iter().zip(ib.remainder()).enumerate() {
        acc[j] += *x as f64 * *y as f64;
    }
    combine16(acc)
}

/// Sum over `a` of `(a_i - m)^2` in f64 (fixed order).
#[inline(always)]
fn sq_dev_f64(a: &[f32], m: f64) -> f64 {
    let mut acc = [0.0f64; 16];
    let mut it = a.chunks_exact(16);
    for c in &mut it {
        for j in 0..16 {
            let d = c[j] as f64 - m;
            acc[j] += d * d;
        }
    }
    for (j, x) in it.remainder().iter().enumerate() {
        let d = *x as f64 - m;
        acc[j] += d * d;
    }
    combine16(acc)
}

/// Normalises one plane in place, `xhat = (x - mean) / sqrt(var + eps)`, with two-pass f64
/// statistics and the biased variance; returns `rstd = 1 / sqrt(var + eps)`.
#[inline(always)]
pub(crate) fn normalize_plane(xp: &mut [f32], eps: f32) -> f32 {
    let m = xp.len() as f64;
    let mean = super::sum_f64(xp) / m;
    let var = sq_dev_f64(xp, mean) / m;
    let r = 1.0 / (var + eps as f64).sqrt();
    let (mean32, r32) = (mean as f32, r as f32);
    for v in xp.iter_mut() {
        *v = (*v - mean32) * r32;
    }
    r as f32
}

/// Backward of one plane, given `dy` at the norm's output: `dx += rstd * (gamma*dy -
/// gamma*b/M - xhat * gamma*a/M)`; returns `(a, b) = (sum dy * xhat, sum dy)`.
#[inline(always)]
pub(crate) fn plane_backward(
    dy: &[f32],
    xh: &[f32],
    gamma: f32,
    rstd: f32,
    dx: &mut [f32],
) -> (f64, f64) {
    let a = dot_f64(dy, xh);
    let b = super::sum_f64(dy);
    let (ga, r, inv_m) = (gamma as f64, rstd as f64, 1.0 / xh.len() as f64);
    let gr = (ga * r) as f32;
    let c0 = (ga * b * inv_m * r) as f32;
    let c1 = (ga * a * inv_m * r) as f32;
    for ((d, g), xv) in dx.iter_mut().zip(dy).zip(xh) {
        *d += gr * g - c0 - c1 * xv;
    }
    (a, b)
}

/// Per-channel totals of per-plane values (`planes[pi]` belongs to channel `pi % c`), summed in
/// plane order in f64, added into `dst` (c long).
pub(crate) fn add_channel_totals(dst: &mut [f32], planes: impl Iterator<Item = f64>) {
    let c = dst.len();
    let mut tot = vec![0.0f64; c];
    for (pi, v) in planes.enumerate() {
        tot[pi % c] += v;
    }
    for (d, v) in dst.iter_mut().zip(&tot) {
        *d += *v as f32;
    }
}

/// Instance normalisation of `x` (N, C, H, W): each (n, c) plane is normalised over its H*W
/// values with the biased variance, `xhat = (x - mean) / sqrt(var + eps)`, then
/// `y = gamma[c] * xhat + beta[c]`. Exactly PyTorch's `GroupNorm(C, C, eps, affine=True)`
/// (`eps` is 1e-5 there). Statistics are computed in f64 with two passes.
///
/// Backward (per plane, with `g = dy * gamma[c]` and M = H*W):
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dgamma[c] = sum dy * xhat`,
/// `dbeta[c] = sum dy`; the per-plane sums are reduced over the batch in order, so results do not
/// depend on the thread count.
pub fn instance_norm<Tp: Tape<f32, Cpu>>(x: T4<Tp>, gamma: &T1, beta: &T1, eps: f32) -> T4<Tp> {
    let x = x.contiguous();
    let (n, c, h, w) = *x.shape();
    assert_eq!(
        gamma.shape().0,
        c,
        "instance_norm: gamma has {} elements, expected {c}",
        gamma.shape().0
    );
    assert_eq!(
        beta.shape().0,
        c,
        "instance_norm: beta has {} elements, expected {c}",
        beta.shape().0
    );
    let m = h * w;
    assert!(m > 0, "instance_norm: empty planes {:?}", x.shape());
    let (x, mut tape) = x.split_tape();
    let gv = read(gamma);
    let bv = read(beta);
    // `xh` starts as a copy of x and is normalised in place: it is what backward needs.
    let mut xh = read(&x);
    let mut y = vec![0.0f32; n * c * m];
    let mut rstd = vec![0.0f32; n * c];
    let min_planes = (ELEM_CHUNK / m).max(1);
    xh.par_chunks_mut(m)
        .zip(y.par_chunks_mut(m))
        .zip(rstd.par_iter_mut())
        .enumerate()
        .with_min_len(min_planes)
        .for_each(|(pi, ((xp, yp), rs))| {
            *rs = normalize_plane(xp, eps);
            let (ga, be) = (gv[pi % c], bv[pi % c]);
            for (xv, yv) in xp.iter().zip(yp.iter_mut()) {
                *yv = ga * xv + be;
            }
        });
    let out = x.device().tensor_from_vec(y, (n, c, h, w));

    if Tp::OWNS_TAPE {
        let (x_g, g_g, b_g, out_g) = (x.ghost(), gamma.ghost(), beta.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            // Per plane: (sum dy * xhat, sum dy).
            let mut sums = vec![(0.0f64, 0.0f64); n * c];
            {
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                dx.par_chunks_mut(m)
                    .zip(dy.par_chunks(m))
                    .zip(xh.par_chunks(m))
                    .zip(sums.par_iter_mut())
                    .enumerate()
                    .with_min_len(min_planes)
                    .for_each(|(pi, (((dxp, dyp), xp), s))| {
                        *s = plane_backward(dyp, xp, gv[pi % c], rstd[pi], dxp);
                    });
            }
            drop(dy);
            add_channel_totals(grads.get_or_alloc_mut(&g_g)?, sums.iter().map(|s| s.0));
            add_channel_totals(grads.get_or_alloc_mut(&b_g)?, sums.iter().map(|s| s.1));
            Ok(())
        });
    }
    out.put_tape(tape)
}
