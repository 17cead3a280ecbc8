//! Shuffling, batching, normalisation and augmentation (random crop with padding + horizontal flip).

use std::cell::RefCell;
use std::ops::Range;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{ImageSet, ImageShape, Normalization, Pixels};
use crate::seed::{rng, Stream};

/// Padding of the random crop, in pixels on each side: offsets are drawn from `0..=2 * CROP_PADDING`.
pub const CROP_PADDING: usize = 4;

/// The example order of one epoch: a Fisher–Yates shuffle of `0..n` driven by
/// `rng(seed, Stream::Order, epoch)`. The same `(n, seed, epoch)` always gives the same order.
///
/// # Panics
/// If `n` does not fit in a `u32`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    assert!(n <= u32::MAX as usize, "epoch_order: {n} examples do not fit in u32 indices");
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut r = rng(seed, Stream::Order, epoch);
    for i in (1..n).rev() {
        let j = r.gen_range(0..=i as u32) as usize;
        order.swap(i, j);
    }
    order
}

/// The ranges of consecutive batches over `n` examples: `batch_size` each, the last one shorter
/// unless `drop_last` (then a short tail, possibly every example when `n < batch_size`, is skipped).
///
/// # Panics
/// If `batch_size` is zero.
pub fn batches(
    n: usize,
    batch_size: usize,
    drop_last: bool,
) -> impl ExactSizeIterator<Item = Range<usize>> + Clone {
    assert!(batch_size > 0, "batches: batch size must be positive");
    let count = if drop_last { n / batch_size } else { n.div_ceil(batch_size) };
    (0..count).map(move |b| b * batch_size..((b + 1) * batch_size).min(n))
}

/// A batch ready for a network: normalised images (NCHW) and their labels. Reused across calls to
/// [`fill_batch`], so that once its buffers have grown no further allocation happens.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// `n * C * H * W` normalised values.
    pub x: Vec<f32>,
    /// `n` labels.
    pub labels: Vec<u8>,
    /// Number of images in the batch.
    pub n: usize,
}

impl Batch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Per-thread scratch of [`fill_batch`] (taken out while in use, so re-entrant calls are safe).
#[derive(Default)]
struct Scratch {
    /// Per channel, the normalised value of each byte.
    lut: Vec<f32>,
    /// Per image, the crop offsets and flip bit.
    draws: Vec<(u8, u8, bool)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// One image's augmentation: crop offsets (dy, dx) in 0..=2*padding and a horizontal flip.
fn augment_draw(r: &mut ChaCha8Rng) -> (u8, u8, bool) {
    let max = 2 * CROP_PADDING as u32;
    let dy = r.gen_range(0..=max) as u8;
    let dx = r.gen_range(0..=max) as u8;
    let flip = r.gen_bool(0.5);
    (dy, dx, flip)
}

/// Advances `r` past the augmentation draws of `n` images, as [`fill_batch`] would, without
/// assembling them: a run that starts inside an epoch skips that epoch's earlier batches and
/// still augments the later ones as an uninterrupted run does.
pub fn skip_augment(r: &mut ChaCha8Rng, n: usize) {
    for _ in 0..n {
        augment_draw(r);
    }
}

/// Fills `out` with the images `idx` of `set` (in that order), normalised: for [`Pixels::U8`],
/// `x = (byte * scale - mean[c]) / std[c]`; [`Pixels::F32`] values are copied as they are.
///
/// With `augment`, every image gets a random crop with [`CROP_PADDING`] pixels of padding and a
/// random horizontal flip (torchvision's `RandomCrop(size, padding=4)` then
/// `RandomHorizontalFlip()`): for each image, in `idx` order, the generator first yields the
/// vertical offset `dy`, then `dx` (each uniform in `0..=8`), then the flip bit (p = 0.5); all draws
/// are made before the images are filled (in parallel), so the result does not depend on the
/// thread count. Padding is the raw value 0, which normalises to `-mean[c] / std[c]`; for F32
/// images (already normalised) it is 0.0. See [`crop_flip`].
///
/// # Panics
/// If an index is out of range, or (U8 pixels) `norm` does not have one mean and std per channel.
pub fn fill_batch(
    set: &ImageSet,
    norm: &Normalization,
    idx: &[u32],
    augment: Option<&mut ChaCha8Rng>,
    out: &mut Batch,
) {
    let shape = set.shape;
    let len = shape.len();
    let total = set.len();
    if let Some(&bad) = idx.iter().find(|&&i| i as usize >= total) {
        panic!("fill_batch: index {bad} out of range for a split of {total} images");
    }
    let n = idx.len();
    out.n = n;
    out.labels.clear();
    out.labels.extend(idx.iter().map(|&i| set.labels[i as usize]));
    out.x.resize(n * len, 0.0);
    if n == 0 || len == 0 {
        return;
    }

    let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    scratch.draws.clear();
    if let Some(r) = augment {
        scratch.draws.extend((0..n).map(|_| augment_draw(r)));
    }
    let draws = &scratch.draws[..];
    // Images per parallel task: about 16k values each, so small batches stay on one thread.
    let min_len = (16_384 / len).max(1);
    let plane = shape.height * shape.width;

    match &set.pixels {
        Pixels::U8 { data, scale } => {
            let c = shape.channels;
            assert!(
                norm.mean.len() == c && norm.std.len() == c,
                "fill_batch: normalisation has {} means and {} stds for {c}-channel images",
                norm.mean.len(),
                norm.std.len()
            );
            scratch.lut.clear();
            for ch in 0..c {
                let (m, s) = (norm.mean[ch], norm.std[ch]);
                scratch.lut.extend((0..256).map(|b| (b as f32 * scale - m) / s));
            }
            let lut = &scratch.lut[..];
            out.x.par_chunks_mut(len).with_min_len(min_len).enumerate().for_each(|(k, dst)| {
                let i = idx[k] as usize;
                let src = &data[i * len..(i + 1) * len];
                match draws.get(k) {
                    Some(&(dy, dx, flip)) => crop_flip_with(
                        src,
                        shape,
                        dy as usize,
                        dx as usize,
                        flip,
                        |ch| lut[ch * 256],
                        |ch, b| lut[ch * 256 + b as usize],
                        dst,
                    ),
                    None => {
                        for (ch, (d, s)) in
                            dst.chunks_exact_mut(plane).zip(src.chunks_exact(plane)).enumerate()
                        {
                            let table = &lut[ch * 256..(ch + 1) * 256];
                            for (d, &b) in d.iter_mut().zip(s) {
                                *d = table[b as usize];
                            }
                        }
                    }
                }
            });
        }
        Pixels::F32(data) => {
            out.x.par_chunks_mut(len).with_min_len(min_len).enumerate().for_each(|(k, dst)| {
                let i = idx[k] as usize;
                let src = &data[i * len..(i + 1) * len];
                match draws.get(k) {
                    Some(&(dy, dx, flip)) => {
                        crop_flip(src, shape, dy as usize, dx as usize, flip, dst)
                    }
                    None => dst.copy_from_slice(src),
                }
            });
        }
    }
    SCRATCH.with(|s| *s.borrow_mut() = scratch);
}

/// Random-crop-and-flip of one image, given the draws: `src` padded by [`CROP_PADDING`] pixels of
/// `T::default()` on every side, the `H x W` window at row `dy`, column `dx` of the padded image
/// taken, then mirrored left-right if `flip`. `dy = dx = CROP_PADDING` without flip is the identity.
///
/// # Panics
/// If `src` or `out` is not `shape.len()` long, or an offset exceeds `2 * CROP_PADDING`.
pub fn crop_flip<T: Copy + Default + Send + Sync>(
    src: &[T],
    shape: ImageShape,
    dy: usize,
    dx: usize,
    flip: bool,
    out: &mut [T],
) {
    crop_flip_with(src, shape, dy, dx, flip, |_| T::default(), |_, v| v, out)
}

/// [`crop_flip`] that also maps every value (`map(channel, value)`) and pads with `pad(channel)`.
#[allow(clippy::too_many_arguments)]
#[inline]
fn crop_flip_with<T: Copy, U: Copy>(
    src: &[T],
    shape: ImageShape,
    dy: usize,
    dx: usize,
    flip: bool,
    pad: impl Fn(usize) -> U,
    map: impl Fn(usize, T) -> U,
    out: &mut [U],
) {
    let (h, w) = (shape.height, shape.width);
    let plane = h * w;
    assert_eq!(src.len(), shape.len(), "crop_flip: source is not one image");
    assert_eq!(out.len(), shape.len(), "crop_flip: output is not one image");
    assert!(
        dy <= 2 * CROP_PADDING && dx <= 2 * CROP_PADDING,
        "crop_flip: offset ({dy}, {dx}) beyond the padding"
    );
    if plane == 0 {
        return;
    }
    for (ch, (o, s)) in out.chunks_exact_mut(plane).zip(src.chunks_exact(plane)).enumerate() {
        let p = pad(ch);
        for (y, orow) in o.chunks_exact_mut(w).enumerate() {
            // Row y of the window is row y + dy of the padded image, row y + dy - P of the source.
            let sy = y + dy;
            if sy < CROP_PADDING || sy >= h + CROP_PADDING {
                orow.fill(p);
                continue;
            }
            let srow = &s[(sy - CROP_PADDING) * w..(sy - CROP_PADDING + 1) * w];
            for (x, v) in orow.iter_mut().enumerate() {
                let cx = if flip { w - 1 - x } else { x };
                let sx = cx + dx;
                *v = if sx < CROP_PADDING || sx >= w + CROP_PADDING {
                    p
                } else {
                    map(ch, srow[sx - CROP_PADDING])
                };
            }
        }
    }
}
