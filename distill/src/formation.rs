//! IDC multi-formation as a differentiable op: each stored image holds `factor x factor` cells,
//! and each cell is upsampled (bilinear, PyTorch `align_corners=False`) into one full-size
//! training image (Kim et al. 2022, "Dataset Condensation via Efficient Synthetic-Data
//! Parameterization", Sec. 3.2).
//!
//! The forward pass calls [`lmc_train::data::upsample_bilinear`], the function
//! [`SyntheticSet::decode`](lmc_train::data::SyntheticSet::decode) uses, so a network trained by
//! `lmc train --dataset syn.lmc` sees bit for bit the images distillation optimised.

use std::sync::Arc;

use dfdx::prelude::*;
use lmc_train::data::{upsample_bilinear, ImageShape};
use lmc_train::ops::T4;
use rayon::prelude::*;

use crate::linop::{self, BatchMap, Taps};

/// `(i0, i1, frac)` of PyTorch's bilinear source coordinate for output `o` (`align_corners=False`):
/// `s = max((o + 0.5) * inn / outn - 0.5, 0)`, the same formula as `upsample_bilinear`.
fn coord(o: usize, inn: usize, outn: usize) -> (usize, usize, f32) {
    let s = ((o as f32 + 0.5) * inn as f32 / outn as f32 - 0.5).max(0.0);
    let i0 = (s.floor() as usize).min(inn - 1);
    let i1 = (i0 + 1).min(inn - 1);
    (i0, i1, s - i0 as f32)
}

/// The decode map for one image shape and factor.
struct Decode {
    shape: ImageShape,
    factor: usize,
    /// Per cell (row-major), per output pixel: taps into the stored image's plane.
    cells: Vec<Vec<Taps>>,
}

impl Decode {
    fn new(shape: ImageShape, factor: usize) -> Decode {
        let (h, w) = (shape.height, shape.width);
        let (ch, cw) = (h / factor, w / factor);
        let mut cells = Vec::with_capacity(factor * factor);
        for gy in 0..factor {
            for gx in 0..factor {
                let mut taps = Vec::with_capacity(h * w);
                for y in 0..h {
                    let (y0, y1, fy) = coord(y, ch, h);
                    for x in 0..w {
                        let (x0, x1, fx) = coord(x, cw, w);
                        let at = |yy: usize, xx: usize| ((gy * ch + yy) * w + gx * cw + xx) as u32;
                        taps.push(Taps {
                            idx: [at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1)],
                            w: [(1.0 - fy) * (1.0 - fx), (1.0 - fy) * fx, fy * (1.0 - fx), fy * fx],
                        });
                    }
                }
                cells.push(taps);
            }
        }
        Decode { shape, factor, cells }
    }
}

impl BatchMap for Decode {
    fn out_shape(&self, s: (usize, usize, usize, usize)) -> (usize, usize, usize, usize) {
        (s.0 * self.factor * self.factor, s.1, s.2, s.3)
    }

    fn forward(&self, x: &[f32], y: &mut [f32]) {
        let s = self.shape;
        let (f, img) = (self.factor, s.len());
        let (ch, cw) = (s.height / f, s.width / f);
        y.par_chunks_mut(img).enumerate().for_each_init(
            || vec![0.0f32; s.channels * ch * cw],
            |cell, (o, out)| {
                let (i, k) = (o / (f * f), o % (f * f));
                let (gy, gx) = (k / f, k % f);
                let src = &x[i * img..(i + 1) * img];
                for c in 0..s.channels {
                    for yy in 0..ch {
                        let row = c * s.height * s.width + (gy * ch + yy) * s.width + gx * cw;
                        cell[(c * ch + yy) * cw..(c * ch + yy + 1) * cw]
                            .copy_from_slice(&src[row..row + cw]);
                    }
                }
                upsample_bilinear(cell, (s.channels, ch, cw), (s.height, s.width), out);
            },
        );
    }

    fn backward(&self, gy: &[f32], gx: &mut [f32]) {
        let img = self.shape.len();
        let plane = self.shape.height * self.shape.width;
        let per = self.factor * self.factor;
        // Each stored image collects the gradients of its own cells: no two tasks write one image.
        gx.par_chunks_mut(img).enumerate().for_each(|(i, gxi)| {
            for (k, taps) in self.cells.iter().enumerate() {
                let o = i * per + k;
                linop::scatter_image(taps, &gy[o * img..(o + 1) * img], plane, gxi);
            }
        });
    }
}

/// Decodes stored images (N, C, H, W) into (N * factor^2, C, H, W) training images, cells in
/// row-major order per stored image, differentiably. `factor` 1 is the identity (the tensor is
/// returned as is). Panics if `factor` does not divide H and W (callers validate it first).
pub fn decode<Tp: Tape<f32, Cpu>>(x: T4<Tp>, factor: usize) -> T4<Tp> {
    if factor <= 1 {
        return x;
    }
    let (_, c, h, w) = *x.shape();
    assert!(h % factor == 0 && w % factor == 0, "decode: factor {factor} does not divide {h}x{w}");
    let shape = ImageShape { channels: c, height: h, width: w };
    linop::apply(x, Arc::new(Decode::new(shape, factor)))
}

/// IDC's initialisation of one stored image from `factor^2` real images: each real image is
/// shrunk by box averaging over `factor x factor` blocks into one cell (row-major). `reals` holds
/// `factor^2` images of `shape`, back to back; the result is one image of `shape`.
pub fn encode_cells(reals: &[f32], shape: ImageShape, factor: usize) -> Vec<f32> {
    let (h, w) = (shape.height, shape.width);
    let img = shape.len();
    if factor <= 1 {
        return reals[..img].to_vec();
    }
    let (ch, cw) = (h / factor, w / factor);
    let inv = 1.0 / (factor * factor) as f32;
    let mut out = vec![0.0f32; img];
    for k in 0..factor * factor {
        let (gy, gx) = (k / factor, k % factor);
        let src = &reals[k * img..(k + 1) * img];
        for c in 0..shape.channels {
            for yy in 0..ch {
                for xx in 0..cw {
                    let mut s = 0.0f32;
                    for dy in 0..factor {
                        for dx in 0..factor {
                            s += src[c * h * w + (yy * factor + dy) * w + xx * factor + dx];
                        }
                    }
                    out[c * h * w + (gy * ch + yy) * w + gx * cw + xx] = s * inv;
                }
            }
        }
    }
    out
}
