//! The one tape op behind every image transform of this crate: a batch map `y = A x + c` whose
//! gradient is `dx += A^T dy`. DSA's augmentations and IDC's multi-formation decode are all of
//! that form once their random parameters are drawn (bilinear resampling, translation, cutout,
//! flips and the colour jitters are linear in the pixels; brightness adds a constant), so each
//! only implements [`BatchMap`] and is differentiable w.r.t. the synthetic pixels for free.

use std::sync::Arc;

use dfdx::prelude::*;
use lmc_train::ops::T4;

/// An affine map between batches of images, with the adjoint of its linear part.
pub(crate) trait BatchMap: Send + Sync + 'static {
    /// Output shape (N, C, H, W) for input shape `input`.
    fn out_shape(&self, input: (usize, usize, usize, usize)) -> (usize, usize, usize, usize);
    /// `y = A x + c` (overwrites `y`).
    fn forward(&self, x: &[f32], y: &mut [f32]);
    /// `gx += A^T gy`.
    fn backward(&self, gy: &[f32], gx: &mut [f32]);
}

/// Applies `map` to `x` as an op on dfdx's tape (no tape: just the forward).
pub(crate) fn apply<Tp: Tape<f32, Cpu>, M: BatchMap>(x: T4<Tp>, map: Arc<M>) -> T4<Tp> {
    let x = x.contiguous();
    let in_shape = *x.shape();
    let out_shape = map.out_shape(in_shape);
    let (x, mut tape) = x.split_tape();
    let mut xv = vec![0.0f32; x.shape().num_elements()];
    x.copy_into(&mut xv);
    let mut y = vec![0.0f32; out_shape.num_elements()];
    map.forward(&xv, &mut y);
    drop(xv);
    let out = x.device().tensor_from_vec(y, out_shape);
    if Tp::OWNS_TAPE {
        let (x_g, out_g) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            // Take the output gradient out (it is not needed afterwards), then add into the input's.
            let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out_g)?);
            let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
            map.backward(&dy, dx);
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// One output pixel as a weighted sum of up to four pixels of one input plane (indices into the
/// plane; unused taps have weight 0).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Taps {
    /// Source pixel index within the plane (row-major).
    pub idx: [u32; 4],
    /// Weights.
    pub w: [f32; 4],
}

impl Taps {
    /// A single tap of weight `w` (0 gives an output of zero).
    pub fn one(idx: usize, w: f32) -> Taps {
        Taps { idx: [idx as u32, 0, 0, 0], w: [w, 0.0, 0.0, 0.0] }
    }

    /// Bilinear taps at fractional source position (`sy`, `sx`) of an `h` x `w` plane; corners
    /// outside the plane contribute zero (PyTorch `grid_sample` with `padding_mode="zeros"`).
    pub fn bilinear_zeros(sy: f32, sx: f32, h: usize, w: usize) -> Taps {
        let (y0, x0) = (sy.floor(), sx.floor());
        let (fy, fx) = (sy - y0, sx - x0);
        let mut t = Taps::default();
        let corners = [
            (0, 0, (1.0 - fy) * (1.0 - fx)),
            (0, 1, (1.0 - fy) * fx),
            (1, 0, fy * (1.0 - fx)),
            (1, 1, fy * fx),
        ];
        for (k, (dy, dx, wt)) in corners.into_iter().enumerate() {
            let (yy, xx) = (y0 as i64 + dy, x0 as i64 + dx);
            if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w {
                t.idx[k] = (yy as usize * w + xx as usize) as u32;
                t.w[k] = wt;
            }
        }
        t
    }

    /// The value at this output pixel, read from `plane`.
    #[inline]
    pub fn read(&self, plane: &[f32]) -> f32 {
        self.w[0] * plane[self.idx[0] as usize]
            + self.w[1] * plane[self.idx[1] as usize]
            + self.w[2] * plane[self.idx[2] as usize]
            + self.w[3] * plane[self.idx[3] as usize]
    }

    /// Adds `g` times the taps into `plane` (the adjoint of [`Taps::read`]).
    #[inline]
    pub fn scatter(&self, g: f32, plane: &mut [f32]) {
        for k in 0..4 {
            plane[self.idx[k] as usize] += self.w[k] * g;
        }
    }
}

/// Resamples every channel plane of one image with `taps` (one entry per output pixel).
pub(crate) fn gather_image(taps: &[Taps], x: &[f32], plane_in: usize, y: &mut [f32]) {
    let plane_out = taps.len();
    for (xp, yp) in x.chunks_exact(plane_in).zip(y.chunks_exact_mut(plane_out)) {
        for (v, t) in yp.iter_mut().zip(taps) {
            *v = t.read(xp);
        }
    }
}

/// Adjoint of [`gather_image`]: adds into `gx`.
pub(crate) fn scatter_image(taps: &[Taps], gy: &[f32], plane_in: usize, gx: &mut [f32]) {
    let plane_out = taps.len();
    for (gxp, gyp) in gx.chunks_exact_mut(plane_in).zip(gy.chunks_exact(plane_out)) {
        for (g, t) in gyp.iter().zip(taps) {
            t.scatter(*g, gxp);
        }
    }
}
