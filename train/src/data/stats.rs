//! Per-split statistics (what `lmc data info` prints).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ImageSet, Pixels};

/// Counts and pixel statistics of one split.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitStats {
    /// Number of images.
    pub count: usize,
    /// Images per class (at least `classes` long; longer if a label is out of range).
    pub per_class: Vec<usize>,
    /// Per-channel mean of the pixel values (U8 pixels scaled to [0, 1]; F32 values as stored).
    pub mean: Vec<f64>,
    /// Per-channel population standard deviation of the same values.
    pub std: Vec<f64>,
}

/// Computes [`SplitStats`] in f64 (exactly, via per-channel byte histograms, for U8 pixels).
/// An empty split has zero means and stds.
pub fn split_stats(set: &ImageSet, classes: usize) -> SplitStats {
    let count = set.len();
    let top = set.labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut per_class = vec![0usize; classes.max(top)];
    for &l in &set.labels {
        per_class[l as usize] += 1;
    }
    let c = set.shape.channels;
    let plane = set.shape.height * set.shape.width;
    let len = set.shape.len();
    if count == 0 || len == 0 {
        return SplitStats { count, per_class, mean: vec![0.0; c], std: vec![0.0; c] };
    }
    let values = (count * plane) as f64;
    let (mean, std) = match &set.pixels {
        Pixels::U8 { data, scale } => {
            let hist = data
                .par_chunks(len)
                .with_min_len(64)
                .fold(
                    || vec![0u64; c * 256],
                    |mut h, img| {
                        for (ch, p) in img.chunks_exact(plane).enumerate() {
                            let h = &mut h[ch * 256..(ch + 1) * 256];
                            for &b in p {
                                h[b as usize] += 1;
                            }
                        }
                        h
                    },
                )
                .reduce(
                    || vec![0u64; c * 256],
                    |mut a, b| {
                        a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                        a
                    },
                );
            // The f32 scale is 1/255 or 1/16 rounded; use the exact reciprocal when it is one.
            let k = (1.0 / *scale as f64).round();
            let scale = if k > 0.0 && (1.0 / k) as f32 == *scale { 1.0 / k } else { *scale as f64 };
            let mut mean = vec![0.0; c];
            let mut std = vec![0.0; c];
            for ch in 0..c {
                let h = &hist[ch * 256..(ch + 1) * 256];
                let m =
                    h.iter().enumerate().map(|(b, &k)| k as f64 * b as f64 * scale).sum::<f64>()
                        / values;
                let v = h
                    .iter()
                    .enumerate()
                    .map(|(b, &k)| {
                        let d = b as f64 * scale - m;
                        k as f64 * d * d
                    })
                    .sum::<f64>()
                    / values;
                mean[ch] = m;
                std[ch] = v.sqrt();
            }
            (mean, std)
        }
        Pixels::F32(data) => {
            let mut sum = vec![0.0f64; c];
            for img in data.chunks_exact(len) {
                for (ch, p) in img.chunks_exact(plane).enumerate() {
                    sum[ch] += p.iter().map(|&v| v as f64).sum::<f64>();
                }
            }
            let mean: Vec<f64> = sum.iter().map(|s| s / values).collect();
            let mut sq = vec![0.0f64; c];
            for img in data.chunks_exact(len) {
                for (ch, p) in img.chunks_exact(plane).enumerate() {
                    sq[ch] += p.iter().map(|&v| (v as f64 - mean[ch]).powi(2)).sum::<f64>();
                }
            }
            (mean, sq.iter().map(|s| (s / values).sqrt()).collect())
        }
    };
    SplitStats { count, per_class, mean, std }
}
