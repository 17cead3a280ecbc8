//! Differentiable Siamese Augmentation (DSA; Zhao & Bilen 2021, "Dataset Condensation with
//! Differentiable Siamese Augmentation"), as differentiable ops on dfdx's tape.
//!
//! Operations and their parameters are those of the reference `ParamDiffAug`: colour (brightness
//! +-0.5, saturation x[0, 2], contrast x[0.5, 1.5]), crop (translation by up to 1/8 of the size,
//! zero fill), cutout (a square of half the size set to zero), flip (horizontal, p = 0.5), scale
//! (x and y each in [1/1.2, 1.2]) and rotate (+-15 degrees), the last two by bilinear
//! `grid_sample` with zero padding and `align_corners=True`. As in the reference's default mode
//! ('S'), each call applies *one* operation drawn uniformly from the strategy (colour counts as
//! one: its three jitters in sequence). "Siamese" means the real and the synthetic images of a
//! class get the same drawn parameters; for evaluation every image gets its own.
//!
//! Given its parameters every operation is affine in the pixels (brightness adds a constant,
//! the rest are linear), so each is a [`BatchMap`] and its gradient is the adjoint.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use dfdx::prelude::*;
use lmc_train::data::{DatasetName, ImageShape};
use lmc_train::ops::T4;
use lmc_train::{Error, Result};
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::linop::{self, BatchMap, Taps};

/// One DSA operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DsaOp {
    /// Brightness, saturation and contrast jitter, in sequence.
    Color,
    /// Random translation with zero fill ("crop" with padding in the reference).
    Crop,
    /// A square of half the image size set to zero.
    Cutout,
    /// Horizontal flip with probability 0.5.
    Flip,
    /// Independent x and y scaling in [1/1.2, 1.2].
    Scale,
    /// Rotation by up to 15 degrees either way.
    Rotate,
}

impl DsaOp {
    /// Every operation, in the order of the reference strategy string.
    pub const ALL: [DsaOp; 6] =
        [DsaOp::Color, DsaOp::Crop, DsaOp::Cutout, DsaOp::Flip, DsaOp::Scale, DsaOp::Rotate];

    /// Its name in a strategy string.
    pub fn as_str(self) -> &'static str {
        match self {
            DsaOp::Color => "color",
            DsaOp::Crop => "crop",
            DsaOp::Cutout => "cutout",
            DsaOp::Flip => "flip",
            DsaOp::Scale => "scale",
            DsaOp::Rotate => "rotate",
        }
    }

    /// Draws this operation's parameters for images of `shape` (the reference's `ParamDiffAug`).
    pub fn sample(self, rng: &mut impl Rng, shape: ImageShape) -> AugParams {
        let (h, w) = (shape.height as i32, shape.width as i32);
        match self {
            DsaOp::Color => AugParams::Color {
                brightness: (rng.gen::<f32>() - 0.5) * BRIGHTNESS,
                saturation: rng.gen::<f32>() * SATURATION,
                contrast: rng.gen::<f32>() + CONTRAST,
            },
            DsaOp::Crop => {
                // int(size * 0.125 + 0.5) pixels each way.
                let (sy, sx) =
                    ((h as f32 * CROP_PAD + 0.5) as i32, (w as f32 * CROP_PAD + 0.5) as i32);
                AugParams::Crop { dy: rng.gen_range(-sy..=sy), dx: rng.gen_range(-sx..=sx) }
            }
            DsaOp::Cutout => {
                let (ch, cw) = cutout_size(shape);
                // Centres in [0, size + (1 - cut % 2)), as the reference draws them.
                let cy = rng.gen_range(0..h + (1 - ch % 2));
                let cx = rng.gen_range(0..w + (1 - cw % 2));
                AugParams::Cutout { cy, cx }
            }
            DsaOp::Flip => AugParams::Flip(rng.gen::<f32>() < FLIP_PROB),
            DsaOp::Scale => {
                let lo = 1.0 / SCALE;
                let sx = rng.gen::<f32>() * (SCALE - lo) + lo;
                let sy = rng.gen::<f32>() * (SCALE - lo) + lo;
                AugParams::Scale { sx, sy }
            }
            DsaOp::Rotate => AugParams::Rotate {
                theta: (rng.gen::<f32>() - 0.5) * 2.0 * ROTATE_DEG / 180.0 * std::f32::consts::PI,
            },
        }
    }
}

/// Reference `ParamDiffAug` constants.
const BRIGHTNESS: f32 = 1.0;
const SATURATION: f32 = 2.0;
const CONTRAST: f32 = 0.5;
const CROP_PAD: f32 = 0.125;
const CUTOUT: f32 = 0.5;
const FLIP_PROB: f32 = 0.5;
const SCALE: f32 = 1.2;
const ROTATE_DEG: f32 = 15.0;

fn cutout_size(shape: ImageShape) -> (i32, i32) {
    ((shape.height as f32 * CUTOUT + 0.5) as i32, (shape.width as f32 * CUTOUT + 0.5) as i32)
}

/// A DSA strategy: the operations one of which is drawn per call, written like the reference's
/// `color_crop_cutout_flip_scale_rotate`; `none` (or an empty string) turns augmentation off.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Strategy {
    /// The operations, in the order written.
    pub ops: Vec<DsaOp>,
}

/// The reference DSA strategy string.
pub const DEFAULT_STRATEGY: &str = "color_crop_cutout_flip_scale_rotate";

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Strategy> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("none") {
            return Ok(Strategy { ops: vec![] });
        }
        let mut ops = Vec::new();
        for name in s.split(['_', ',']) {
            let op = DsaOp::ALL.into_iter().find(|o| o.as_str() == name.trim().to_ascii_lowercase()).ok_or_else(|| {
                Error::setting(format!(
                    "--dsa '{s}': unknown augmentation '{name}' (expected '_'-separated color, crop, cutout, flip, scale, rotate, or none)"
                ))
            })?;
            if !ops.contains(&op) {
                ops.push(op);
            }
        }
        Ok(Strategy { ops })
    }
}

impl TryFrom<String> for Strategy {
    type Error = Error;
    fn try_from(s: String) -> Result<Strategy> {
        s.parse()
    }
}

impl From<Strategy> for String {
    fn from(s: Strategy) -> String {
        s.to_string()
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ops.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.ops.iter().map(|o| o.as_str()).collect();
        f.write_str(&names.join("_"))
    }
}

impl Strategy {
    /// No augmentation.
    pub fn none() -> Strategy {
        Strategy { ops: vec![] }
    }

    /// Whether the strategy does nothing.
    pub fn is_none(&self) -> bool {
        self.ops.is_empty()
    }

    /// The strategy as used on `base`: without flip on digit datasets (MNIST, digits), where a
    /// mirrored digit is another symbol (the DSA authors drop it there too).
    pub fn for_dataset(&self, base: DatasetName) -> Strategy {
        let digits = matches!(base, DatasetName::Mnist | DatasetName::Digits);
        Strategy {
            ops: self.ops.iter().copied().filter(|&o| !(digits && o == DsaOp::Flip)).collect(),
        }
    }

    /// Draws the operation of one call (mode 'S' of the reference), or `None` when empty.
    pub fn draw_op(&self, rng: &mut impl Rng) -> Option<DsaOp> {
        (!self.ops.is_empty()).then(|| self.ops[rng.gen_range(0..self.ops.len())])
    }

    /// Draws one operation and one parameter set (siamese: to be shared by a group of images).
    pub fn sample_shared(&self, rng: &mut impl Rng, shape: ImageShape) -> AugParams {
        match self.draw_op(rng) {
            Some(op) => op.sample(rng, shape),
            None => AugParams::Identity,
        }
    }

    /// Draws one operation for the batch and independent parameters for each of its `n` images
    /// (how DSA augments during evaluation).
    pub fn sample_per_image(
        &self,
        rng: &mut impl Rng,
        shape: ImageShape,
        n: usize,
    ) -> Vec<AugParams> {
        match self.draw_op(rng) {
            Some(op) => (0..n).map(|_| op.sample(rng, shape)).collect(),
            None => vec![AugParams::Identity; n],
        }
    }
}

/// The drawn parameters of one augmentation of one image.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum AugParams {
    /// Leave the image as it is.
    Identity,
    /// `x + brightness`, then `(x - mean_channels) * saturation + mean_channels` (per pixel),
    /// then `(x - mean_image) * contrast + mean_image`.
    Color {
        /// Added to every pixel.
        brightness: f32,
        /// Factor on the deviation from the per-pixel channel mean.
        saturation: f32,
        /// Factor on the deviation from the image mean.
        contrast: f32,
    },
    /// `out[y][x] = in[y + dy][x + dx]`, zero outside.
    Crop {
        /// Row shift.
        dy: i32,
        /// Column shift.
        dx: i32,
    },
    /// Zero a square centred (by the reference's rounding) at (`cy`, `cx`).
    Cutout {
        /// Centre row.
        cy: i32,
        /// Centre column.
        cx: i32,
    },
    /// Mirror left-right when true.
    Flip(bool),
    /// Sample the input at (sx * u, sy * v) in normalised coordinates.
    Scale {
        /// Horizontal factor.
        sx: f32,
        /// Vertical factor.
        sy: f32,
    },
    /// Sample the input at the output position rotated by `theta` radians.
    Rotate {
        /// Angle.
        theta: f32,
    },
}

/// One image's augmentation, ready to run.
enum Prepared {
    Identity,
    Color { brightness: f32, saturation: f32, contrast: f32 },
    Gather(Vec<Taps>),
}

impl Prepared {
    fn new(p: &AugParams, shape: ImageShape) -> Prepared {
        let (h, w) = (shape.height, shape.width);
        let gather = |f: &dyn Fn(usize, usize) -> Taps| {
            let mut t = Vec::with_capacity(h * w);
            for y in 0..h {
                for x in 0..w {
                    t.push(f(y, x));
                }
            }
            Prepared::Gather(t)
        };
        // Normalised <-> pixel coordinates of affine_grid/grid_sample with align_corners=True.
        let norm =
            |i: usize, n: usize| if n > 1 { -1.0 + 2.0 * i as f32 / (n - 1) as f32 } else { 0.0 };
        let pix = |v: f32, n: usize| (v + 1.0) * 0.5 * (n.max(2) - 1) as f32;
        match *p {
            AugParams::Identity | AugParams::Flip(false) => Prepared::Identity,
            AugParams::Color { brightness, saturation, contrast } => {
                Prepared::Color { brightness, saturation, contrast }
            }
            AugParams::Crop { dy, dx } => gather(&|y, x| {
                let (sy, sx) = (y as i64 + dy as i64, x as i64 + dx as i64);
                if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                    Taps::one(sy as usize * w + sx as usize, 1.0)
                } else {
                    Taps::one(0, 0.0)
                }
            }),
            AugParams::Cutout { cy, cx } => {
                let (ch, cw) = cutout_size(shape);
                // Rows clamp(cy + i - ch / 2, 0, h - 1) for i < ch: a clipped interval.
                let y0 = (cy - ch / 2).clamp(0, h as i32 - 1);
                let y1 = (cy - ch / 2 + ch - 1).clamp(0, h as i32 - 1);
                let x0 = (cx - cw / 2).clamp(0, w as i32 - 1);
                let x1 = (cx - cw / 2 + cw - 1).clamp(0, w as i32 - 1);
                gather(&|y, x| {
                    let inside = (y0..=y1).contains(&(y as i32)) && (x0..=x1).contains(&(x as i32));
                    Taps::one(y * w + x, if inside { 0.0 } else { 1.0 })
                })
            }
            AugParams::Flip(true) => gather(&|y, x| Taps::one(y * w + (w - 1 - x), 1.0)),
            AugParams::Scale { sx, sy } => gather(&|y, x| {
                let (u, v) = (norm(x, w) * sx, norm(y, h) * sy);
                Taps::bilinear_zeros(pix(v, h), pix(u, w), h, w)
            }),
            AugParams::Rotate { theta } => {
                let (c, s) = (theta.cos(), theta.sin());
                gather(&|y, x| {
                    let (xn, yn) = (norm(x, w), norm(y, h));
                    // affine_grid with [[cos, -sin, 0], [sin, cos, 0]].
                    let (u, v) = (c * xn - s * yn, s * xn + c * yn);
                    Taps::bilinear_zeros(pix(v, h), pix(u, w), h, w)
                })
            }
        }
    }

    fn forward(&self, shape: ImageShape, x: &[f32], y: &mut [f32]) {
        let plane = shape.height * shape.width;
        match self {
            Prepared::Identity => y.copy_from_slice(x),
            Prepared::Gather(t) => linop::gather_image(t, x, plane, y),
            Prepared::Color { brightness, saturation, contrast } => {
                for (o, i) in y.iter_mut().zip(x) {
                    *o = i + brightness;
                }
                channel_mix(y, shape.channels, plane, *saturation);
                image_mix(y, *contrast);
            }
        }
    }

    fn backward(&self, shape: ImageShape, gy: &[f32], gx: &mut [f32]) {
        let plane = shape.height * shape.width;
        match self {
            Prepared::Identity => gx.iter_mut().zip(gy).for_each(|(a, b)| *a += b),
            Prepared::Gather(t) => linop::scatter_image(t, gy, plane, gx),
            Prepared::Color { saturation, contrast, .. } => {
                // Both mixes are symmetric (a x + (1 - a) P x with P an averaging projector), so
                // each is its own adjoint; apply them in reverse order.
                let mut g = gy.to_vec();
                image_mix(&mut g, *contrast);
                channel_mix(&mut g, shape.channels, plane, *saturation);
                gx.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            }
        }
    }
}

/// `x <- (x - mean over channels) * a + mean over channels`, per pixel.
fn channel_mix(x: &mut [f32], channels: usize, plane: usize, a: f32) {
    if channels < 2 {
        return; // x - mean = 0: a single channel is left as it is
    }
    for p in 0..plane {
        let m = (0..channels).map(|c| x[c * plane + p]).sum::<f32>() / channels as f32;
        for c in 0..channels {
            let v = &mut x[c * plane + p];
            *v = (*v - m) * a + m;
        }
    }
}

/// `x <- (x - mean(x)) * a + mean(x)` over one whole image.
fn image_mix(x: &mut [f32], a: f32) {
    let m = (x.iter().map(|&v| v as f64).sum::<f64>() / x.len().max(1) as f64) as f32;
    for v in x.iter_mut() {
        *v = (*v - m) * a + m;
    }
}

/// Augmentations of a batch of images of one shape: image `i` gets `params[which[i]]`.
pub struct Augmentation {
    shape: ImageShape,
    prepared: Vec<Prepared>,
    which: Vec<usize>,
}

impl Augmentation {
    /// Image `i` of a batch gets `params[which[i]]` (so a group of images can share one draw).
    pub fn new(shape: ImageShape, params: &[AugParams], which: Vec<usize>) -> Augmentation {
        assert!(
            which.iter().all(|&k| k < params.len()),
            "Augmentation: parameter index out of range"
        );
        let prepared = params.iter().map(|p| Prepared::new(p, shape)).collect();
        Augmentation { shape, prepared, which }
    }

    /// Every image gets its own parameters.
    pub fn per_image(shape: ImageShape, params: &[AugParams]) -> Augmentation {
        Augmentation::new(shape, params, (0..params.len()).collect())
    }

    /// Number of images this augmentation is for.
    pub fn len(&self) -> usize {
        self.which.len()
    }

    /// Whether it is for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.which.is_empty()
    }

    /// Augments a host batch (no tape), e.g. real images whose gradient is not needed.
    pub fn apply_host(&self, x: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        self.forward(x, &mut y);
        y
    }
}

impl BatchMap for Augmentation {
    fn out_shape(&self, s: (usize, usize, usize, usize)) -> (usize, usize, usize, usize) {
        s
    }

    fn forward(&self, x: &[f32], y: &mut [f32]) {
        let img = self.shape.len();
        assert_eq!(
            x.len(),
            self.which.len() * img,
            "augment: batch of {} values, expected {} images",
            x.len(),
            self.which.len()
        );
        y.par_chunks_mut(img)
            .zip(x.par_chunks(img))
            .zip(self.which.par_iter())
            .for_each(|((yi, xi), &k)| self.prepared[k].forward(self.shape, xi, yi));
    }

    fn backward(&self, gy: &[f32], gx: &mut [f32]) {
        let img = self.shape.len();
        gx.par_chunks_mut(img)
            .zip(gy.par_chunks(img))
            .zip(self.which.par_iter())
            .for_each(|((gxi, gyi), &k)| self.prepared[k].backward(self.shape, gyi, gxi));
    }
}

/// Applies `aug` to `x` (N, C, H, W) as a differentiable op; `aug` must be for N images of this shape.
pub fn augment<Tp: Tape<f32, Cpu>>(x: T4<Tp>, aug: &Arc<Augmentation>) -> T4<Tp> {
    let (n, c, h, w) = *x.shape();
    assert_eq!(
        (n, c, h, w),
        (aug.len(), aug.shape.channels, aug.shape.height, aug.shape.width),
        "augment: shape mismatch"
    );
    linop::apply(x, aug.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    const S: ImageShape = ImageShape { channels: 1, height: 4, width: 4 };

    fn run(p: AugParams, x: &[f32]) -> Vec<f32> {
        Augmentation::per_image(S, &[p]).apply_host(x)
    }

    #[test]
    fn strategies_parse_and_name_bad_ops() {
        let s: Strategy = DEFAULT_STRATEGY.parse().unwrap();
        assert_eq!(s.ops, DsaOp::ALL.to_vec());
        assert_eq!(s.to_string(), DEFAULT_STRATEGY);
        assert_eq!(s.for_dataset(DatasetName::Mnist).to_string(), "color_crop_cutout_scale_rotate");
        assert_eq!(s.for_dataset(DatasetName::Cifar10), s);
        assert!("none".parse::<Strategy>().unwrap().is_none());
        let e = "color_blur".parse::<Strategy>().unwrap_err().to_string();
        assert!(e.contains("'blur'") && e.contains("--dsa"), "{e}");
    }

    #[test]
    fn spatial_ops_by_hand() {
        let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
        // Shift down-right by one: out[y][x] = in[y-1][x-1], zero in the first row and column.
        let y = run(AugParams::Crop { dy: -1, dx: -1 }, &x);
        assert_eq!(&y[..4], &[0.0; 4]);
        assert_eq!(&y[4..8], &[0.0, 0.0, 1.0, 2.0]);
        assert_eq!(run(AugParams::Flip(true), &x)[..4], [3.0, 2.0, 1.0, 0.0]);
        // Cutout size 2 centred at (1, 1): rows and columns 0..=1 zeroed.
        let y = run(AugParams::Cutout { cy: 1, cx: 1 }, &x);
        assert_eq!(&y[..4], &[0.0, 0.0, 2.0, 3.0]);
        assert_eq!(&y[4..8], &[0.0, 0.0, 6.0, 7.0]);
        // Scale 1 and rotation 0 are the identity (align_corners=True maps pixels onto pixels).
        assert_eq!(run(AugParams::Scale { sx: 1.0, sy: 1.0 }, &x), x);
        assert_eq!(run(AugParams::Rotate { theta: 0.0 }, &x), x);
        // A quarter turn: with u' = -v, v' = u the output row 0 reads the input's last column
        // bottom-up... i.e. out[y][x] = in[x][3 - y] (grid_sample convention).
        let y = run(AugParams::Rotate { theta: std::f32::consts::FRAC_PI_2 }, &x);
        for yy in 0..4 {
            for xx in 0..4 {
                assert!((y[yy * 4 + xx] - x[xx * 4 + (3 - yy)]).abs() < 1e-4, "{y:?}");
            }
        }
    }

    #[test]
    fn colour_matches_formula() {
        let shape = ImageShape { channels: 3, height: 1, width: 2 };
        let x = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let p = AugParams::Color { brightness: 0.5, saturation: 0.0, contrast: 1.0 };
        let y = Augmentation::per_image(shape, &[p]).apply_host(&x);
        // Saturation 0 replaces each pixel by its channel mean: (0+2+4)/3 + 0.5 = 2.5, (1+3+5)/3 + 0.5 = 3.5.
        assert_eq!(y, vec![2.5, 3.5, 2.5, 3.5, 2.5, 3.5]);
        let p = AugParams::Color { brightness: 0.0, saturation: 1.0, contrast: 0.5 };
        let y = Augmentation::per_image(shape, &[p]).apply_host(&x);
        // Mean 2.5; deviations halved.
        assert_eq!(y, vec![1.25, 1.75, 2.25, 2.75, 3.25, 3.75]);
    }

    #[test]
    fn draws_stay_in_the_reference_ranges() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let shape = ImageShape { channels: 1, height: 28, width: 28 };
        for _ in 0..500 {
            match DsaOp::ALL[rng.gen_range(0..6)].sample(&mut rng, shape) {
                AugParams::Crop { dy, dx } => assert!(dy.abs() <= 4 && dx.abs() <= 4),
                AugParams::Cutout { cy, cx } => {
                    assert!((0..=28).contains(&cy) && (0..=28).contains(&cx))
                }
                AugParams::Scale { sx, sy } => {
                    assert!((1.0 / 1.2..=1.2).contains(&sx) && (1.0 / 1.2..=1.2).contains(&sy))
                }
                AugParams::Rotate { theta } => assert!(theta.abs() <= 15f32.to_radians() + 1e-6),
                AugParams::Color { brightness, saturation, contrast } => {
                    assert!(
                        brightness.abs() <= 0.5
                            && (0.0..=2.0).contains(&saturation)
                            && (0.5..=1.5).contains(&contrast)
                    )
                }
                AugParams::Flip(_) | AugParams::Identity => {}
            }
        }
    }
}
