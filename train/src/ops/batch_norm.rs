//! Batch normalisation with a per-channel affine transform, exactly PyTorch's `BatchNorm2d`
//! (`affine=True`, `track_running_stats=True`, a fixed `momentum`), in both modes:
//!
//! - [`batch_norm_train`]: each channel is normalised over (N, H, W) with the batch mean and the
//!   *biased* batch variance; the batch's mean and *unbiased* variance are returned as
//!   [`BatchStats`] so the caller updates its [`RunningStats`] (PyTorch does that inside the
//!   forward; here it is explicit, so a forward pass never mutates model state behind the
//!   caller's back, e.g. during a Hessian or a finite-difference probe).
//! - [`batch_norm_eval`]: the same affine map with the running statistics (a constant per-channel
//!   scale and shift of `x`).
//!
//! Both forwards compute `y = x * scale[c] + shift[c]` with `scale = gamma / sqrt(var + eps)` and
//! `shift = beta - mean * scale` formed in f64 and rounded once (PyTorch's CPU kernel uses the same
//! form), so evaluation mode reproduces training mode up to the f32 rounding of the stored
//! statistics when the running statistics equal the batch's.
//!
//! Work is split over the N*C planes of H*W values (more tasks than channels, and each task owns
//! a contiguous slice, so no aliasing tricks are needed); every per-channel reduction is a
//! per-plane f64 value (16 interleaved partial sums combined in a fixed order) summed over n in
//! order 0..N. Nothing depends on the rayon thread count, so results are bit-identical for any.
//!
//! Memory: forward reads x into one buffer (the only way to read a dfdx tensor) and writes the
//! output; backward keeps that copy of x (not xhat) and recomputes `xhat = (x - mean) * rstd` on
//! the fly. Keeping x costs the same memory as keeping xhat but saves forward a full-size write
//! pass (normalising in place), and the recomputation is two flops per element inside loops
//! that are bound by memory traffic. Besides that, only per-plane and per-channel scalars are
//! allocated.

use std::mem::MaybeUninit;

use dfdx::prelude::*;
use rayon::prelude::*;

use super::norm::add_channel_totals;
use super::{combine16, read, ELEM_CHUNK, T1, T4};
use crate::cpu::Build;
use crate::{Error, Result};

/// PyTorch's default `BatchNorm2d` momentum for the running statistics.
pub const BN_MOMENTUM: f32 = 0.1;
/// PyTorch's default `BatchNorm2d` epsilon.
pub const BN_EPS: f32 = 1e-5;

/// The statistics of one training batch, per channel, for [`RunningStats::update`].
#[derive(Debug, Clone, PartialEq)]
pub struct BatchStats {
    /// Mean over (N, H, W).
    pub mean: Vec<f32>,
    /// Unbiased variance over (N, H, W): the biased one (used to normalise) times M / (M - 1).
    pub var_unbiased: Vec<f32>,
    /// Values per channel, M = N * H * W (always >= 2).
    pub count: usize,
}

/// Running statistics of a batch-norm layer: state, not parameters (never trained or pruned).
/// Named like PyTorch's buffers `running_mean`, `running_var`, `num_batches_tracked`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunningStats {
    /// Running mean per channel.
    pub mean: Vec<f32>,
    /// Running (unbiased) variance per channel.
    pub var: Vec<f32>,
    /// Training batches seen (PyTorch stores it as an int64 scalar).
    pub num_batches_tracked: u64,
}

impl RunningStats {
    /// PyTorch's initial state for `c` channels: mean 0, variance 1, no batches tracked.
    pub fn new(c: usize) -> Self {
        RunningStats { mean: vec![0.0; c], var: vec![1.0; c], num_batches_tracked: 0 }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// PyTorch's update with a fixed momentum: `running = (1 - momentum) * running + momentum *
    /// batch` for the mean and for the *unbiased* variance, and `num_batches_tracked += 1`.
    ///
    /// As in PyTorch's CPU kernel, `momentum` and `1 - momentum` are f32 values; PyTorch blends
    /// the mean in f32 and the variance partly in f64, we blend both in f64 and round once, which
    /// agrees to within an f32 ulp. For `momentum=None` see [`RunningStats::update_cumulative`].
    /// Errors (changing nothing) if `batch` has a different number of channels or `momentum` is
    /// not in [0, 1].
    pub fn update(&mut self, batch: &BatchStats, momentum: f32) -> Result<()> {
        if !(0.0..=1.0).contains(&momentum) {
            return Err(Error::setting(format!(
                "batch norm: momentum must be in [0, 1], got {momentum}"
            )));
        }
        let c = self.channels();
        if batch.mean.len() != c || batch.var_unbiased.len() != c || self.var.len() != c {
            return Err(Error::incompatible(format!(
                "batch norm: running statistics have {} means and {} variances, the batch {} and \
                 {}",
                c,
                self.var.len(),
                batch.mean.len(),
                batch.var_unbiased.len()
            )));
        }
        let (m, keep) = (momentum as f64, (1.0f32 - momentum) as f64);
        for (r, b) in self.mean.iter_mut().zip(&batch.mean) {
            *r = (keep * *r as f64 + m * *b as f64) as f32;
        }
        for (r, b) in self.var.iter_mut().zip(&batch.var_unbiased) {
            *r = (keep * *r as f64 + m * *b as f64) as f32;
        }
        self.num_batches_tracked += 1;
        Ok(())
    }

    /// PyTorch's update with `momentum=None`: a cumulative (equal-weight) average over the batches
    /// tracked, the factor being `1 / (num_batches_tracked + 1)`, rounded to f32 as PyTorch's
    /// kernel does. From [`RunningStats::new`] the first batch's statistics are taken as they are.
    /// This is how `torch.optim.swa_utils.update_bn` re-estimates statistics after weights were
    /// averaged or interpolated: reset with `new`, then call this once per batch.
    pub fn update_cumulative(&mut self, batch: &BatchStats) -> Result<()> {
        let factor = 1.0 / (self.num_batches_tracked as f64 + 1.0);
        self.update(batch, factor as f32)
    }
}

/// Checks the shapes batch norm needs: `gamma` and `beta` of C elements, and (`train`) more than
/// one value per channel, M = N * H * W > 1. With M = 1 the biased variance is 0 and the output
/// is just `beta` (the unbiased variance is 0/0): PyTorch raises "Expected more than 1 value per
/// channel when training"; we return the same kind of error.
fn check(
    op: &str,
    (n, c, h, w): (usize, usize, usize, usize),
    gamma: &T1,
    beta: &T1,
    eps: f32,
    train: bool,
) -> Result<()> {
    for (name, p) in [("gamma", gamma), ("beta", beta)] {
        if p.shape().0 != c {
            return Err(Error::incompatible(format!(
                "{op}: {name} has {} elements, the input {c} channels",
                p.shape().0
            )));
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::setting(format!("{op}: eps must be finite and >= 0, got {eps}")));
    }
    if train {
        check_batch_norm_train((n, c, h, w))?;
    }
    Ok(())
}

/// Whether [`batch_norm_train`] accepts an input of `shape` (N, C, H, W): M = N * H * W > 1.
/// For callers that want to reject a batch before tracing anything.
pub fn check_batch_norm_train(shape: (usize, usize, usize, usize)) -> Result<()> {
    let (n, c, h, w) = shape;
    if n * h * w <= 1 {
        return Err(Error::data(format!(
            "batch norm: expected more than 1 value per channel when training, got input size \
             [{n}, {c}, {h}, {w}] (it needs a batch of at least 2, or planes larger than 1x1)"
        )));
    }
    Ok(())
}

/// `(sum x, sum (x - mean_p)^2)` of one plane in f64, `mean_p` its own mean: the plane (a few KiB)
/// is read twice while it is in L1, so this is one pass over memory yet as accurate as a
/// two-pass variance. Sums in 16 lanes (lane j takes the elements j, j + 16, ...), combined
/// pairwise; `build` picks the AVX2 lanes ([`lanes_avx2`]) or the portable ones, the same
/// operations in the same order.
#[inline(always)]
fn plane_stats(build: Build, xp: &[f32]) -> (f64, f64) {
    plane_stats_in(Vector::of(build), xp)
}

/// [`plane_stats`] of each of the planes of `p` values in `x` (whole planes), into `out`: what
/// [`train_stats`] computes of its input, for a caller that has the planes in cache.
#[inline(always)]
pub(crate) fn plane_stats_of(build: Build, x: &[f32], p: usize, out: &mut [(f64, f64)]) {
    assert_eq!(x.len(), out.len() * p, "plane_stats_of: {} values in planes of {p}", x.len());
    for (o, xp) in out.iter_mut().zip(x.chunks_exact(p)) {
        *o = plane_stats(build, xp);
    }
}

/// [`plane_stats`] in the lanes of `v`.
#[inline(always)]
fn plane_stats_in(v: Vector, xp: &[f32]) -> (f64, f64) {
    let s = if v == Vector::Avx512 {
        let from = xp.len() / 16 * 16;
        // SAFETY: `Vector::Avx512` only where the CPU has AVX-512F (`Vector::of`).
        let mut acc = unsafe { lanes_avx512(Lanes::Sum { x: &xp[..from] }).0 };
        for (j, v) in xp[from..].iter().enumerate() {
            acc[j] += *v as f64;
        }
        combine16(acc)
    } else {
        super::sum_f64(xp)
    };
    let (acc, _) = lanes(v, Lanes::SquaredDeviation { x: xp, mean: s / xp.len() as f64 });
    (s, combine16(acc))
}

/// Which hand-written lanes [`lanes`] and [`plane_stats`] run: none (everything in the baseline
/// build), AVX2's, or, in the AVX2 build on a CPU with AVX-512F, AVX-512's. The same lanes in
/// the same order, so the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vector {
    None,
    Avx2,
    Avx512,
}

impl Vector {
    #[inline(always)]
    fn of(build: Build) -> Vector {
        match build {
            Build::Baseline => Vector::None,
            _ if super::direct::Isa::detected() == Some(super::direct::Isa::Avx512) => {
                Vector::Avx512
            }
            _ => Vector::Avx2,
        }
    }
}

/// `(sum dy * xhat, sum dy)` of one plane in f64, with `xhat = (x - mean) * rstd` recomputed in
/// f32; in lanes as [`plane_stats`].
#[inline(always)]
fn plane_grad_sums(build: Build, dy: &[f32], xp: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
    plane_grad_sums_in(Vector::of(build), dy, xp, mean, rstd)
}

/// [`plane_grad_sums`] in the lanes of `v`.
#[inline(always)]
fn plane_grad_sums_in(v: Vector, dy: &[f32], xp: &[f32], mean: f32, rstd: f32) -> (f64, f64) {
    let (a, b) = lanes(v, Lanes::GradDot { dy, x: xp, mean, rstd });
    (combine16(a), combine16(b))
}

/// A per-plane sum in 16 f64 lanes (lane j takes the elements j, j + 16, ...).
#[derive(Clone, Copy)]
enum Lanes<'a> {
    /// `x` widened to f64 (the lanes of [`super::sum_f64`]; only [`lanes_avx512`] takes it).
    Sum { x: &'a [f32] },
    /// `(x - mean)^2`, x widened to f64 first.
    SquaredDeviation { x: &'a [f32], mean: f64 },
    /// `dy * xhat` with `xhat = (x - mean) * rstd` in f32, both widened to f64, and beside it
    /// `dy` (the lanes of [`super::sum_f64`]).
    GradDot { dy: &'a [f32], x: &'a [f32], mean: f32, rstd: f32 },
}

impl<'a> Lanes<'a> {
    /// Elements summed.
    fn len(&self) -> usize {
        match self {
            Lanes::Sum { x } => x.len(),
            Lanes::SquaredDeviation { x, .. } => x.len(),
            Lanes::GradDot { dy, .. } => dy.len(),
        }
    }

    /// The same sum over the first `n` elements.
    fn head(self, n: usize) -> Lanes<'a> {
        match self {
            Lanes::Sum { x } => Lanes::Sum { x: &x[..n] },
            Lanes::SquaredDeviation { x, mean } => Lanes::SquaredDeviation { x: &x[..n], mean },
            Lanes::GradDot { dy, x, mean, rstd } => {
                Lanes::GradDot { dy: &dy[..n], x: &x[..n], mean, rstd }
            }
        }
    }
}

/// [`Lanes`] summed (the second array only for `GradDot`): the whole chunks of 16 with AVX2
/// intrinsics in [`Build::Avx2`], the rest (everything in the baseline build) one element at a
/// time. Written out by hand because LLVM vectorised the portable loops badly: `GradDot` not at
/// all beside `sum dy` (it paired each lane's two sums into one vector), two lanes wide on its
/// own, and `SquaredDeviation` two wide (disassembly; `plane_grad_sums` was ~8% of a ResNet-20
/// training step, `perf`, 2026-12-06, Intel Xeon with AVX-512, 2 cores). Each lane's operations
/// and their order are the same either way (no fused multiply-add: a product, then a sum), so
/// the bits are too (tested).
#[inline(always)]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
fn lanes(v: Vector, what: Lanes<'_>) -> ([f64; 16], [f64; 16]) {
    let (mut acc, mut acc2, mut from) = ([0.0f64; 16], [0.0f64; 16], 0);
    #[cfg(target_arch = "x86_64")]
    if v == Vector::Avx512 {
        from = what.len() / 16 * 16;
        // SAFETY: `Vector::Avx512` only where the CPU has AVX-512F (`Vector::of`).
        (acc, acc2) = unsafe { lanes_avx512(what.head(from)) };
    } else if v == Vector::Avx2 {
        from = what.len() / 16 * 16;
        // SAFETY: `Build::Avx2` runs only where the CPU has AVX2 (`Build::run` asserts it).
        (acc, acc2) = unsafe { lanes_avx2(what.head(from)) };
    }
    let _ = v;
    for i in from..what.len() {
        let j = i % 16;
        match what {
            Lanes::Sum { x } => acc[j] += x[i] as f64,
            Lanes::SquaredDeviation { x, mean } => {
                let d = x[i] as f64 - mean;
                acc[j] += d * d;
            }
            Lanes::GradDot { dy, x, mean, rstd } => {
                let xh = (x[i] - mean) * rstd;
                acc[j] += dy[i] as f64 * xh as f64;
                acc2[j] += dy[i] as f64;
            }
        }
    }
    (acc, acc2)
}

/// [`lanes`] over whole chunks of 16 in AVX2: lanes 4k .. 4k + 3 in vector k.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_avx2(what: Lanes<'_>) -> ([f64; 16], [f64; 16]) {
    use std::arch::x86_64::*;
    // The eight f32 at `v` widened: (elements 0..4, elements 4..8).
    #[inline(always)]
    unsafe fn widen(v: __m256) -> (__m256d, __m256d) {
        (_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)))
    }
    let (mut acc, mut acc2) = ([_mm256_setzero_pd(); 4], [_mm256_setzero_pd(); 4]);
    match what {
        Lanes::Sum { .. } => unreachable!("lanes_avx2: the plain sum is `sum_f64`'s"),
        Lanes::SquaredDeviation { x, mean } => {
            let m = _mm256_set1_pd(mean);
            for ch in x.chunks_exact(16) {
                for half in 0..2 {
                    let (lo, hi) = widen(_mm256_loadu_ps(ch[8 * half..].as_ptr()));
                    for (k, v) in [(2 * half, lo), (2 * half + 1, hi)] {
                        let d = _mm256_sub_pd(v, m);
                        acc[k] = _mm256_add_pd(acc[k], _mm256_mul_pd(d, d));
                    }
                }
            }
        }
        Lanes::GradDot { dy, x, mean, rstd } => {
            let (m, r) = (_mm256_set1_ps(mean), _mm256_set1_ps(rstd));
            for (cd, cx) in dy.chunks_exact(16).zip(x.chunks_exact(16)) {
                for half in 0..2 {
                    let xv = _mm256_loadu_ps(cx[8 * half..].as_ptr());
                    let (hl, hh) = widen(_mm256_mul_ps(_mm256_sub_ps(xv, m), r));
                    let (dl, dh) = widen(_mm256_loadu_ps(cd[8 * half..].as_ptr()));
                    for (k, d, h) in [(2 * half, dl, hl), (2 * half + 1, dh, hh)] {
                        acc[k] = _mm256_add_pd(acc[k], _mm256_mul_pd(d, h));
                        acc2[k] = _mm256_add_pd(acc2[k], d);
                    }
                }
            }
        }
    }
    let (mut out, mut out2) = ([0.0f64; 16], [0.0f64; 16]);
    for k in 0..4 {
        _mm256_storeu_pd(out[4 * k..].as_mut_ptr(), acc[k]);
        _mm256_storeu_pd(out2[4 * k..].as_mut_ptr(), acc2[k]);
    }
    (out, out2)
}

/// [`lanes`] over whole chunks of 16 in AVX-512: lanes 0..8 in one register, 8..16 in the
/// other, so half the instructions of [`lanes_avx2`] (which was ~4.4% of a one-thread ResNet-20
/// training step, and the plain sums beside it ~2.5%: `perf`, 2026-12-07, Intel Xeon with
/// AVX-512, 2 cores). On its own it did not move ResNet-20's wall time (paired ratio 1.000, 6
/// pairs, same host and day: passes over whole tensors are bound by reading them); it serves
/// the sums a conv takes of planes it has just written (`train_stats`'s `planes`), which are in
/// cache, and ResNet-18 ran 0.973 (3 pairs) with it and the direct convs' changes, which do not
/// apply there.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn lanes_avx512(what: Lanes<'_>) -> ([f64; 16], [f64; 16]) {
    use std::arch::x86_64::*;
    // The sixteen f32 at `v` widened: (elements 0..8, elements 8..16).
    #[inline(always)]
    unsafe fn widen(v: __m512) -> (__m512d, __m512d) {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        (_mm512_cvtps_pd(_mm512_castps512_ps256(v)), _mm512_cvtps_pd(hi))
    }
    let (mut acc, mut acc2) = ([_mm512_setzero_pd(); 2], [_mm512_setzero_pd(); 2]);
    match what {
        Lanes::Sum { x } => {
            for ch in x.chunks_exact(16) {
                let (lo, hi) = widen(_mm512_loadu_ps(ch.as_ptr()));
                acc[0] = _mm512_add_pd(acc[0], lo);
                acc[1] = _mm512_add_pd(acc[1], hi);
            }
        }
        Lanes::SquaredDeviation { x, mean } => {
            let m = _mm512_set1_pd(mean);
            for ch in x.chunks_exact(16) {
                let (lo, hi) = widen(_mm512_loadu_ps(ch.as_ptr()));
                for (k, v) in [(0, lo), (1, hi)] {
                    let d = _mm512_sub_pd(v, m);
                    acc[k] = _mm512_add_pd(acc[k], _mm512_mul_pd(d, d));
                }
            }
        }
        Lanes::GradDot { dy, x, mean, rstd } => {
            let (m, r) = (_mm512_set1_ps(mean), _mm512_set1_ps(rstd));
            for (cd, cx) in dy.chunks_exact(16).zip(x.chunks_exact(16)) {
                let xv = _mm512_loadu_ps(cx.as_ptr());
                let (hl, hh) = widen(_mm512_mul_ps(_mm512_sub_ps(xv, m), r));
                let (dl, dh) = widen(_mm512_loadu_ps(cd.as_ptr()));
                for (k, d, h) in [(0, dl, hl), (1, dh, hh)] {
                    acc[k] = _mm512_add_pd(acc[k], _mm512_mul_pd(d, h));
                    acc2[k] = _mm512_add_pd(acc2[k], d);
                }
            }
        }
    }
    let (mut out, mut out2) = ([0.0f64; 16], [0.0f64; 16]);
    for k in 0..2 {
        _mm512_storeu_pd(out[8 * k..].as_mut_ptr(), acc[k]);
        _mm512_storeu_pd(out2[8 * k..].as_mut_ptr(), acc2[k]);
    }
    (out, out2)
}

/// Per-channel sums of per-plane pairs (`planes[pi]` belongs to channel `pi % c`), added over n
/// in order 0..N in f64.
fn channel_sums(planes: &[(f64, f64)], c: usize) -> Vec<(f64, f64)> {
    let mut tot = vec![(0.0f64, 0.0f64); c];
    for (pi, (a, b)) in planes.iter().enumerate() {
        tot[pi % c].0 += a;
        tot[pi % c].1 += b;
    }
    tot
}

/// `max(z, 0)` with PyTorch's NaN behaviour, exactly as [`super::relu`] computes it.
#[inline(always)]
fn relu1(z: f32) -> f32 {
    if z < 0.0 {
        0.0
    } else {
        z
    }
}

/// `relu(x * scale + shift)`: the output of a norm and ReLU without a residual, as
/// [`affine_tail`] forms it (a product, then a sum, then [`relu1`]). The direct convolutions
/// form their input with it when handed the norm rather than its output
/// (`direct::AffineRelu`), so the bits are the same.
#[inline(always)]
pub(crate) fn affine_relu(x: f32, scale: f32, shift: f32) -> f32 {
    relu1(x * scale + shift)
}

/// Errors if a fused op's residual is not shaped like its input.
fn check_residual<R: Tape<f32, Cpu>>(
    op: &str,
    shape: (usize, usize, usize, usize),
    tail: &Option<Option<T4<R>>>,
) -> Result<()> {
    if let Some(Some(r)) = tail {
        if *r.shape() != shape {
            return Err(Error::incompatible(format!(
                "{op}: the residual has shape {:?}, the input {shape:?}",
                r.shape()
            )));
        }
    }
    Ok(())
}

/// What a fused op keeps of its tail: the ReLU, and the residual's values with its tape-free
/// tensor (whose ghost, taken by the caller, names its gradient; the tensor itself is dropped).
struct SplitTail {
    relu: bool,
    res: Option<(Vec<f32>, T4<NoneTape>)>,
}

/// Splits a tail off, merging the residual's tape into `tape`.
fn split_tail<Tp, R>(tail: Option<Option<T4<R>>>, tape: Tp) -> (SplitTail, Tp)
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    match tail {
        None => (SplitTail { relu: false, res: None }, tape),
        Some(None) => (SplitTail { relu: true, res: None }, tape),
        Some(Some(r)) => {
            let (r, rt) = r.contiguous().split_tape();
            (SplitTail { relu: true, res: Some((read(&r), r)) }, tape.merge(rt))
        }
    }
}

/// The forward's output pass: `y = x * scale[c] + shift[c]`, with `relu` then `res + y` (the
/// residual `res`, read from its own slice) and the ReLU, as dfdx's `+` and [`super::relu`]
/// compute them. Returns the output and, when `relu && keep_mask`, the ReLU's 0/1 mask (empty
/// otherwise; the output's positive entries are the same mask, see [`Mask::Positive`]).
#[allow(clippy::too_many_arguments)]
fn affine_tail(
    build: Build,
    xv: &[f32],
    scale: &[f32],
    shift: &[f32],
    p: usize,
    relu: bool,
    res: Option<&[f32]>,
    keep_mask: bool,
) -> (Vec<f32>, Vec<u8>) {
    let len = xv.len();
    let (c, min) = (scale.len(), (ELEM_CHUNK / p).max(1));
    // The output is written once, into uninitialised memory (no zeroing pass first).
    let mut y: Vec<f32> = Vec::with_capacity(len);
    // One plane: its index, output, input and (when kept) mask.
    let plane = |pi: usize, yp: &mut [MaybeUninit<f32>], xp: &[f32], mk: Option<&mut [u8]>| {
        let (s, t) = (scale[pi % c], shift[pi % c]);
        let rp = res.filter(|_| relu).map(|r| &r[pi * p..(pi + 1) * p]);
        build.run(
            #[inline(always)]
            || {
                if let Some(rp) = rp {
                    for ((yv, xv), r) in yp.iter_mut().zip(xp).zip(rp) {
                        yv.write(*r + (xv * s + t));
                    }
                } else {
                    for (yv, xv) in yp.iter_mut().zip(xp) {
                        yv.write(xv * s + t);
                    }
                }
                // SAFETY: every element of the plane was written just above (`yp` and `xp`
                // have the same length), and f32 has the layout of MaybeUninit<f32>.
                let yp: &mut [f32] =
                    unsafe { std::slice::from_raw_parts_mut(yp.as_mut_ptr().cast(), yp.len()) };
                if !relu {
                    return;
                }
                if let Some(mk) = mk {
                    for (m, v) in mk.iter_mut().zip(yp.iter()) {
                        *m = (*v > 0.0) as u8;
                    }
                }
                for v in yp.iter_mut() {
                    *v = relu1(*v);
                }
            },
        )
    };
    let spare = &mut y.spare_capacity_mut()[..len];
    let planes = spare.par_chunks_mut(p).zip(xv.par_chunks(p)).enumerate().with_min_len(min);
    let mask = if relu && keep_mask {
        let mut mask = vec![0u8; len];
        planes
            .zip(mask.par_chunks_mut(p))
            .for_each(|((pi, (yp, xp)), mk)| plane(pi, yp, xp, Some(mk)));
        mask
    } else {
        planes.for_each(|(pi, (yp, xp))| plane(pi, yp, xp, None));
        Vec::new()
    };
    // SAFETY: the planes above wrote all `len` elements (`xv` has `len` values in planes of `p`).
    unsafe { y.set_len(len) };
    (y, mask)
}

/// `y = x * scale[c] + shift[c]`, then `+ res` (when given) and the ReLU (if `relu`), in place
/// over planes of `p` values: the same operations as [`affine_tail`] (`res + z` there, `z + res`
/// here: IEEE addition commutes bit for bit).
fn inplace_planes(
    build: Build,
    y: &mut [f32],
    scale: &[f32],
    shift: &[f32],
    p: usize,
    relu: bool,
    res: Option<&[f32]>,
) {
    let c = scale.len();
    let min = (ELEM_CHUNK / p).max(1);
    let plane = |pi: usize, yp: &mut [f32], rp: Option<&[f32]>| {
        let (s, t) = (scale[pi % c], shift[pi % c]);
        build.run(
            #[inline(always)]
            || match (rp, relu) {
                (Some(rp), true) => {
                    for (v, r) in yp.iter_mut().zip(rp) {
                        *v = relu1((*v * s + t) + r);
                    }
                }
                (Some(rp), false) => {
                    for (v, r) in yp.iter_mut().zip(rp) {
                        *v = (*v * s + t) + r;
                    }
                }
                (None, true) => {
                    for v in yp.iter_mut() {
                        *v = relu1(*v * s + t);
                    }
                }
                (None, false) => {
                    for v in yp.iter_mut() {
                        *v = *v * s + t;
                    }
                }
            },
        )
    };
    let planes = y.par_chunks_mut(p).enumerate().with_min_len(min);
    match res {
        Some(r) => planes.zip(r.par_chunks(p)).for_each(|((pi, yp), rp)| plane(pi, yp, Some(rp))),
        None => planes.for_each(|(pi, yp)| plane(pi, yp, None)),
    }
}

/// Where the ReLU of a fused tail was active: nowhere to apply (a plain norm), a 0/1 byte per
/// value ([`affine_tail`]'s mask), or the entries of the tail's output that are > 0. The two
/// agree: the output is `relu1(v)`, which is > 0 exactly where `v > 0` (NaN and -0.0 included:
/// `relu1` returns them and neither is > 0).
#[derive(Clone, Copy)]
pub(crate) enum Mask<'a> {
    /// No ReLU.
    None,
    /// One byte per value, 1 where the ReLU's input was > 0.
    Bytes(&'a [u8]),
    /// The ReLU's output.
    Positive(&'a [f32]),
    /// Where [`affine_relu`] of `x` with its channel's scale and shift is > 0: the norm's input
    /// and its scale and shift, for a norm whose output was never written out (see
    /// `direct::AffineRelu`); the same mask as `Positive` of that output. `p` values a plane,
    /// `scale.len()` channels. Only for passes that go plane by plane.
    Affine { x: &'a [f32], scale: &'a [f32], shift: &'a [f32], p: usize },
}

/// Where a fused tail's backward puts the residual's gradient `g`.
pub(crate) enum ResGrad<'a> {
    /// Added into what is there.
    Add(&'a mut [f32]),
    /// Written into memory not yet initialised, as `0.0 + g`: the bits of adding it into a
    /// zeroed buffer, without the zeroing pass (or its read back) over a full-size buffer.
    Write(&'a mut [MaybeUninit<f32>]),
}

impl<'a> ResGrad<'a> {
    /// Its pieces of `p` values, each the same kind of destination, in parallel.
    fn par_chunks(self, p: usize) -> impl IndexedParallelIterator<Item = ResGrad<'a>> {
        match self {
            ResGrad::Add(d) => rayon::iter::Either::Left(d.par_chunks_mut(p).map(ResGrad::Add)),
            ResGrad::Write(d) => {
                rayon::iter::Either::Right(d.par_chunks_mut(p).map(ResGrad::Write))
            }
        }
    }
}

/// Backward through a fused tail, before the norm's own backward: `dy` becomes the gradient at
/// the norm's output, `0 + (mask ? dy : 0)` (as the ReLU's backward writes it into a zeroed
/// buffer and `+` passes it on), which is also added into the residual's gradient `dr`. Nothing
/// for a plain norm ([`Mask::None`]).
fn tail_backward(build: Build, dy: &mut [f32], mask: Mask<'_>, dr: Option<&mut [f32]>) {
    // One chunk of ELEM_CHUNK values starting at `at`.
    let chunk = |at: usize, dc: &mut [f32], rc: Option<ResGrad<'_>>| {
        build.run(
            #[inline(always)]
            || tail_slice(mask, at, dc, rc),
        )
    };
    if matches!(mask, Mask::None) {
        return;
    }
    assert!(!matches!(mask, Mask::Affine { .. }), "tail_backward: chunks are not planes");
    let chunks = dy.par_chunks_mut(ELEM_CHUNK).enumerate();
    match dr {
        None => chunks.for_each(|(ci, dc)| chunk(ci * ELEM_CHUNK, dc, None)),
        Some(dr) => chunks
            .zip(dr.par_chunks_mut(ELEM_CHUNK))
            .for_each(|((ci, dc), rc)| chunk(ci * ELEM_CHUNK, dc, Some(ResGrad::Add(rc)))),
    }
}

/// [`tail_backward`] on the values `at .. at + dc.len()`: `dc` those of dy, `rc` (when given)
/// those of the residual's gradient.
#[inline(always)]
fn tail_slice(mask: Mask<'_>, at: usize, dc: &mut [f32], rc: Option<ResGrad<'_>>) {
    let len = dc.len();
    match mask {
        Mask::None => return,
        Mask::Bytes(m) => {
            for (d, m) in dc.iter_mut().zip(&m[at..at + len]) {
                *d = 0.0 + if *m != 0 { *d } else { 0.0 };
            }
        }
        Mask::Positive(y) => {
            for (d, y) in dc.iter_mut().zip(&y[at..at + len]) {
                *d = 0.0 + if *y > 0.0 { *d } else { 0.0 };
            }
        }
        Mask::Affine { x, scale, shift, p } => {
            assert!(
                at.is_multiple_of(p) && len == p,
                "Mask::Affine: values {at}.. are not one plane"
            );
            let ch = at / p % scale.len();
            let (s, t) = (scale[ch], shift[ch]);
            for (d, x) in dc.iter_mut().zip(&x[at..at + len]) {
                *d = 0.0 + if affine_relu(*x, s, t) > 0.0 { *d } else { 0.0 };
            }
        }
    }
    match rc {
        None => {}
        Some(ResGrad::Add(rc)) => {
            for (r, d) in rc.iter_mut().zip(dc.iter()) {
                *r += *d;
            }
        }
        Some(ResGrad::Write(rc)) => {
            assert_eq!(rc.len(), len, "the residual's gradient has another length than dy");
            for (r, d) in rc.iter_mut().zip(dc.iter()) {
                r.write(0.0 + *d);
            }
        }
    }
}

/// Per-channel `(scale, shift) = (gamma * rstd, beta - mean * gamma * rstd)`, formed in f64.
fn scale_shift(gv: &[f32], bv: &[f32], mean: &[f64], rstd: &[f64]) -> (Vec<f32>, Vec<f32>) {
    let mut scale = Vec::with_capacity(gv.len());
    let mut shift = Vec::with_capacity(gv.len());
    for (((g, b), m), r) in gv.iter().zip(bv).zip(mean).zip(rstd) {
        let s = *g as f64 * r;
        scale.push(s as f32);
        shift.push((*b as f64 - m * s) as f32);
    }
    (scale, shift)
}

/// Batch normalisation in training mode, PyTorch's `BatchNorm2d.train()` forward: channel c of
/// `x` (N, C, H, W) is normalised over its M = N*H*W values with the batch mean and the biased
/// variance (two-pass accurate, in f64), `y = gamma[c] * (x - mean) / sqrt(var + eps) +
/// beta[c]`. Returns the output and the batch's [`BatchStats`] (mean, unbiased variance) for
/// [`RunningStats::update`]; the running statistics play no part in the output.
///
/// Backward, per channel with `xhat = (x - mean) * rstd`:
/// `dx = gamma * rstd / M * (M * dy - sum dy - xhat * sum(dy * xhat))`,
/// `dgamma += sum(dy * xhat)`, `dbeta += sum dy` (the batch statistics are differentiated
/// through, as PyTorch does in training mode).
///
/// Errors (nothing is traced then): `gamma`/`beta` not of C elements, `eps` negative or not
/// finite, or M <= 1 (PyTorch: "Expected more than 1 value per channel when training").
pub fn batch_norm_train<Tp: Tape<f32, Cpu>>(
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    eps: f32,
) -> Result<(T4<Tp>, BatchStats)> {
    batch_norm_train_with(Build::selected(), x, gamma, beta, eps)
}

/// [`batch_norm_train`] compiled for `build` (the dispatch tests run both builds).
pub(crate) fn batch_norm_train_with<Tp: Tape<f32, Cpu>>(
    build: Build,
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    eps: f32,
) -> Result<(T4<Tp>, BatchStats)> {
    train_tail::<Tp, NoneTape>(build, x, gamma, beta, eps, None)
}

/// `relu(batch_norm_train(x) + residual)` (`residual` optional) as one op, bit-identical to
/// [`batch_norm_train`] followed by dfdx's `+` and [`super::relu`]: the same IEEE operations
/// on every value, and backward adds into each gradient buffer in the order the separate ops'
/// backward passes do (the residual's gradient first, then the norm's). A ResNet runs every
/// norm that a ReLU follows through it: the separate ReLU and `+` cost three full-size passes
/// forward and four backward, plus their buffers.
///
/// Errors as [`batch_norm_train`], and when `residual` is not shaped like `x`.
pub fn batch_norm_relu_train<Tp, R>(
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    eps: f32,
    residual: Option<T4<R>>,
) -> Result<(T4<Tp>, BatchStats)>
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    batch_norm_relu_train_with(Build::selected(), x, gamma, beta, eps, residual)
}

/// [`batch_norm_relu_train`] compiled for `build` (the dispatch tests run both builds).
pub(crate) fn batch_norm_relu_train_with<Tp, R>(
    build: Build,
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    eps: f32,
    residual: Option<T4<R>>,
) -> Result<(T4<Tp>, BatchStats)>
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    train_tail(build, x, gamma, beta, eps, Some(residual))
}

/// What the backward pass of training-mode batch norm keeps besides its input: the input's
/// shape, gamma, and each channel's batch mean and `1 / sqrt(var + eps)` (in f64 and rounded).
pub(crate) struct TrainSaved {
    pub(crate) shape: (usize, usize, usize, usize),
    gv: Vec<f32>,
    mean32: Vec<f32>,
    rstd: Vec<f64>,
    rstd32: Vec<f32>,
    /// The forward's per-channel scale and shift (`y = x * scale + shift`, see [`scale_shift`]).
    pub(crate) scale: Vec<f32>,
    pub(crate) shift: Vec<f32>,
}

/// The forward pass of training-mode batch norm with its tail on plain slices: `xv` laid out as
/// `shape`; `relu` adds the ReLU, `res` (with `relu`) the residual before it. Returns the output,
/// the ReLU's byte mask when `keep_mask` (see [`Mask`]), the batch statistics and what
/// [`train_backward`] needs; `planes`, when given, are the input's per-plane statistics (see
/// [`train_stats`]). [`batch_norm_relu_train`] and the ResNets' training path
/// (`model::resnet`) both run it; the errors are [`batch_norm_train`]'s.
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_forward(
    build: Build,
    xv: &[f32],
    shape: (usize, usize, usize, usize),
    gamma: &T1,
    beta: &T1,
    eps: f32,
    relu: bool,
    res: Option<&[f32]>,
    keep_mask: bool,
    planes: Option<Vec<(f64, f64)>>,
) -> Result<(Vec<f32>, Vec<u8>, BatchStats, TrainSaved)> {
    if let Some(r) = res {
        if r.len() != xv.len() {
            return Err(Error::incompatible(format!(
                "batch_norm_relu_train: the residual has {} values, the input {shape:?}",
                r.len()
            )));
        }
    }
    let (stats, saved) = train_stats(build, xv, shape, gamma, beta, eps, planes)?;
    let p = shape.2 * shape.3;
    let (y, mask) = affine_tail(build, xv, &saved.scale, &saved.shift, p, relu, res, keep_mask);
    Ok((y, mask, stats, saved))
}

/// [`train_forward`] without its output pass: the batch statistics and what [`train_backward`]
/// needs, with the scale and shift of the output `x * scale + shift` (for a consumer that forms
/// the output itself, `direct::AffineRelu`). `planes`, when given, are the input's per-plane
/// statistics ([`plane_stats_of`]) computed beforehand, e.g. by the conv that wrote the planes
/// while they were in cache; otherwise they are computed here.
pub(crate) fn train_stats(
    build: Build,
    xv: &[f32],
    shape: (usize, usize, usize, usize),
    gamma: &T1,
    beta: &T1,
    eps: f32,
    planes: Option<Vec<(f64, f64)>>,
) -> Result<(BatchStats, TrainSaved)> {
    check("batch_norm_train", shape, gamma, beta, eps, true)?;
    let (n, c, h, w) = shape;
    let (p, mc) = (h * w, n * h * w);
    assert_eq!(xv.len(), n * c * p, "batch_norm_train: {} values for shape {shape:?}", xv.len());
    let (gv, bv) = (read(gamma), read(beta));
    let min_planes = (ELEM_CHUNK / p).max(1);

    // Per plane (sum, sum of squared deviations from the plane's mean); per channel, the total
    // sum of squares about the channel mean is the within-plane part plus the between-plane part
    // `P * (mean_p - mean)^2` (exact algebra, no cancellation).
    let ps = match planes {
        Some(ps) => {
            assert_eq!(ps.len(), n * c, "batch_norm_train: {} plane statistics", ps.len());
            ps
        }
        None => {
            let mut ps = vec![(0.0f64, 0.0f64); n * c];
            let planes = ps.par_iter_mut().zip(xv.par_chunks(p)).with_min_len(min_planes);
            planes.for_each(|(s, xp)| {
                *s = build.run(
                    #[inline(always)]
                    || plane_stats(build, xp),
                )
            });
            ps
        }
    };
    let mf = mc as f64;
    let mean: Vec<f64> = channel_sums(&ps, c).iter().map(|(s, _)| s / mf).collect();
    let mut ss = vec![0.0f64; c];
    for (pi, (s, m2)) in ps.iter().enumerate() {
        let d = s / p as f64 - mean[pi % c];
        ss[pi % c] += m2 + p as f64 * d * d;
    }
    let var: Vec<f64> = ss.iter().map(|s| s / mf).collect();
    let rstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps as f64).sqrt()).collect();
    let (scale, shift) = scale_shift(&gv, &bv, &mean, &rstd);
    let stats = BatchStats {
        mean: mean.iter().map(|m| *m as f32).collect(),
        var_unbiased: var.iter().map(|v| (v * mf / (mf - 1.0)) as f32).collect(),
        count: mc,
    };
    let saved = TrainSaved {
        shape,
        gv,
        mean32: stats.mean.clone(),
        rstd32: rstd.iter().map(|r| *r as f32).collect(),
        rstd,
        scale,
        shift,
    };
    Ok((stats, saved))
}

/// The backward pass of [`train_forward`]: `dy` (the output's gradient, overwritten) goes back
/// through the tail (`mask`; its residual part goes into `dr`, see [`ResGrad`]: with
/// `ResGrad::Write` every element is written), then the norm, whose input
/// gradient is added into `dx`, or with `dx = None` written over `dy` (the values adding it into
/// a zeroed buffer gives). Returns per channel (sum dy * xhat, sum dy): gamma's and beta's
/// gradients, in f64.
pub(crate) fn train_backward(
    build: Build,
    st: &TrainSaved,
    xv: &[f32],
    dy: &mut [f32],
    mask: Mask<'_>,
    dr: Option<ResGrad<'_>>,
    dx: Option<&mut [f32]>,
) -> Vec<(f64, f64)> {
    let (n, c, h, w) = st.shape;
    let (p, mf) = (h * w, (n * h * w) as f64);
    let min_planes = (ELEM_CHUNK / p).max(1);
    let (mean32, rstd32) = (&st.mean32, &st.rstd32);
    // Pass 1, per plane while it is in L1: the tail's backward (`tail_backward`'s elementwise
    // operations, so the same bits), then (sum dy * xhat, sum dy); then per channel in n order.
    let mut sums = vec![(0.0f64, 0.0f64); n * c];
    let pass1 = |pi: usize, s: &mut (f64, f64), dyp: &mut [f32], xp: &[f32], rp| {
        let ch = pi % c;
        *s = build.run(
            #[inline(always)]
            || {
                tail_slice(mask, pi * p, dyp, rp);
                plane_grad_sums(build, dyp, xp, mean32[ch], rstd32[ch])
            },
        );
    };
    if let Some(ResGrad::Write(dr)) = &dr {
        assert_eq!(dr.len(), dy.len(), "the residual's gradient has another length than dy");
    }
    let planes = sums.par_iter_mut().zip(dy.par_chunks_mut(p)).zip(xv.par_chunks(p));
    match dr {
        None => planes
            .enumerate()
            .with_min_len(min_planes)
            .for_each(|(pi, ((s, dyp), xp))| pass1(pi, s, dyp, xp, None)),
        Some(dr) => planes
            .zip(dr.par_chunks(p))
            .enumerate()
            .with_min_len(min_planes)
            .for_each(|(pi, (((s, dyp), xp), rp))| pass1(pi, s, dyp, xp, Some(rp))),
    }
    let tot = channel_sums(&sums, c);
    // dx = gr * dy - c0 - c1 * xhat with gr = gamma * rstd, c0 = gr * sum(dy) / M,
    // c1 = gr * sum(dy * xhat) / M.
    let coef: Vec<(f32, f32, f32)> = (tot.iter().zip(&st.gv).zip(&st.rstd))
        .map(|(((a, b), g), r)| {
            let gr = *g as f64 * r;
            (gr as f32, (gr * b / mf) as f32, (gr * a / mf) as f32)
        })
        .collect();
    // Pass 2.
    let pass2 = |pi: usize, dxp: &mut [f32], dyp: Option<&[f32]>, xp: &[f32]| {
        let ch = pi % c;
        let (gr, c0, c1) = coef[ch];
        let (m, r) = (mean32[ch], rstd32[ch]);
        build.run(
            #[inline(always)]
            || match dyp {
                Some(dyp) => {
                    for ((d, g), xv) in dxp.iter_mut().zip(dyp).zip(xp) {
                        *d += gr * g - c0 - c1 * ((xv - m) * r);
                    }
                }
                // `0 + v` is what `+=` leaves in a zeroed buffer, bit for bit.
                None => {
                    for (g, xv) in dxp.iter_mut().zip(xp) {
                        *g = 0.0 + (gr * *g - c0 - c1 * ((xv - m) * r));
                    }
                }
            },
        )
    };
    match dx {
        Some(dx) => dx
            .par_chunks_mut(p)
            .zip(dy.par_chunks(p))
            .zip(xv.par_chunks(p))
            .enumerate()
            .with_min_len(min_planes)
            .for_each(|(pi, ((dxp, dyp), xp))| pass2(pi, dxp, Some(dyp), xp)),
        None => dy
            .par_chunks_mut(p)
            .zip(xv.par_chunks(p))
            .enumerate()
            .with_min_len(min_planes)
            .for_each(|(pi, (dyp, xp))| pass2(pi, dyp, None, xp)),
    }
    tot
}

/// Training-mode batch norm, with `tail = Some(residual)` followed by the residual add and a
/// ReLU: [`train_forward`] and [`train_backward`] on the tape.
fn train_tail<Tp, R>(
    build: Build,
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    eps: f32,
    tail: Option<Option<T4<R>>>,
) -> Result<(T4<Tp>, BatchStats)>
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    let shape = *x.shape();
    check("batch_norm_train", shape, gamma, beta, eps, true)?;
    check_residual("batch_norm_relu_train", shape, &tail)?;
    let x = x.contiguous();
    let (x, tape) = x.split_tape();
    let (tail, mut tape) = split_tail(tail, tape);
    let res_g = tail.res.as_ref().map(|(_, r)| r.ghost());
    let xv = read(&x);
    let res = tail.res.as_ref().map(|(v, _)| v.as_slice());
    let (y, mask, stats, saved) =
        train_forward(build, &xv, shape, gamma, beta, eps, tail.relu, res, Tp::OWNS_TAPE, None)?;
    drop(tail);
    let out = x.device().tensor_from_vec(y, shape);

    if Tp::OWNS_TAPE {
        let (x_g, g_g, b_g, out_g) = (x.ghost(), gamma.ghost(), beta.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            let mut dy = take_grad!(grads, out_g);
            let mask = if mask.is_empty() { Mask::None } else { Mask::Bytes(&mask) };
            // The tail first, on its own: the residual may be the norm's input itself.
            match &res_g {
                Some(g) => tail_backward(build, &mut dy, mask, Some(grads.get_or_alloc_mut(g)?)),
                None => tail_backward(build, &mut dy, mask, None),
            }
            let tot = {
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                train_backward(build, &saved, &xv, &mut dy, Mask::None, None, Some(dx))
            };
            drop(dy);
            add_channel_totals(grads.get_or_alloc_mut(&g_g)?, tot.iter().map(|t| t.0));
            add_channel_totals(grads.get_or_alloc_mut(&b_g)?, tot.iter().map(|t| t.1));
            Ok(())
        });
    }
    Ok((out.put_tape(tape), stats))
}

/// Batch normalisation in evaluation mode, PyTorch's `BatchNorm2d.eval()` forward, per channel
/// `y = gamma * (x - running.mean) / sqrt(running.var + eps) + beta`: an affine map of `x` (any
/// batch size, M = 1 included). The running statistics are constants here.
///
/// Backward: `dx = dy * gamma * rstd`, `dgamma += sum(dy * xhat)`, `dbeta += sum dy` with
/// `xhat = (x - running.mean) * rstd` (so losses in evaluation mode, e.g. for Hessians, can be
/// differentiated).
///
/// Errors: `gamma`, `beta` or the running statistics not of C elements, `eps` negative or not
/// finite, or a channel whose `running.var + eps` is not positive and finite (the output would
/// be infinite or NaN; PyTorch would silently return that).
pub fn batch_norm_eval<Tp: Tape<f32, Cpu>>(
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
) -> Result<T4<Tp>> {
    batch_norm_eval_with(Build::selected(), x, gamma, beta, running, eps)
}

/// [`batch_norm_eval`] compiled for `build` (the dispatch tests run both builds).
pub(crate) fn batch_norm_eval_with<Tp: Tape<f32, Cpu>>(
    build: Build,
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
) -> Result<T4<Tp>> {
    eval_tail::<Tp, NoneTape>(build, x, gamma, beta, running, eps, None)
}

/// `relu(batch_norm_eval(x) + residual)` (`residual` optional) as one op, bit-identical to the
/// separate ops as [`batch_norm_relu_train`] is.
///
/// Errors as [`batch_norm_eval`], and when `residual` is not shaped like `x`.
pub fn batch_norm_relu_eval<Tp, R>(
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
    residual: Option<T4<R>>,
) -> Result<T4<Tp>>
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    batch_norm_relu_eval_with(Build::selected(), x, gamma, beta, running, eps, residual)
}

/// [`batch_norm_relu_eval`] compiled for `build` (the dispatch tests run both builds).
pub(crate) fn batch_norm_relu_eval_with<Tp, R>(
    build: Build,
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
    residual: Option<T4<R>>,
) -> Result<T4<Tp>>
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    eval_tail(build, x, gamma, beta, running, eps, Some(residual))
}

/// The checks of [`batch_norm_eval`] (its errors) and each channel's `1 / sqrt(var + eps)`.
fn eval_rstd(
    shape: (usize, usize, usize, usize),
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
) -> Result<Vec<f64>> {
    check("batch_norm_eval", shape, gamma, beta, eps, false)?;
    let c = shape.1;
    if running.mean.len() != c || running.var.len() != c {
        return Err(Error::incompatible(format!(
            "batch_norm_eval: running statistics have {} means and {} variances, the input {c} \
             channels",
            running.mean.len(),
            running.var.len()
        )));
    }
    let mut rstd = Vec::with_capacity(c);
    for (ch, v) in running.var.iter().enumerate() {
        let d = *v as f64 + eps as f64;
        if !(d > 0.0 && d.is_finite()) {
            return Err(Error::data(format!(
                "batch_norm_eval: channel {ch}: running variance {v} + eps {eps} is not positive \
                 and finite"
            )));
        }
        rstd.push(1.0 / d.sqrt());
    }
    Ok(rstd)
}

/// `relu(batch_norm_eval(y) + residual)` in place on plain buffers (`y` laid out as `shape`;
/// without `relu` no ReLU, without `residual` no add): the evaluation path of the ResNets
/// (`model::resnet`), which keeps its activations out of dfdx tensors. The same arithmetic as
/// [`batch_norm_relu_eval`], so the same bits; the same errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn eval_inplace(
    build: Build,
    y: &mut [f32],
    shape: (usize, usize, usize, usize),
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
    relu: bool,
    residual: Option<&[f32]>,
) -> Result<()> {
    let (n, c, h, w) = shape;
    assert_eq!(y.len(), n * c * h * w, "batch_norm_eval: {} values for shape {shape:?}", y.len());
    if let Some(r) = residual {
        if r.len() != y.len() {
            return Err(Error::incompatible(format!(
                "batch_norm_relu_eval: the residual has {} values, the input {shape:?}",
                r.len()
            )));
        }
    }
    let rstd = eval_rstd(shape, gamma, beta, running, eps)?;
    let mean: Vec<f64> = running.mean.iter().map(|m| *m as f64).collect();
    let (scale, shift) = scale_shift(&read(gamma), &read(beta), &mean, &rstd);
    inplace_planes(build, y, &scale, &shift, (h * w).max(1), relu, residual);
    Ok(())
}

/// Evaluation-mode batch norm, with `tail = Some(residual)` followed by the residual add and a
/// ReLU.
fn eval_tail<Tp, R>(
    build: Build,
    x: T4<Tp>,
    gamma: &T1,
    beta: &T1,
    running: &RunningStats,
    eps: f32,
    tail: Option<Option<T4<R>>>,
) -> Result<T4<Tp>>
where
    Tp: Tape<f32, Cpu> + Merge<R>,
    R: Tape<f32, Cpu>,
{
    let shape = *x.shape();
    check_residual("batch_norm_relu_eval", shape, &tail)?;
    let (n, c, h, w) = shape;
    let rstd = eval_rstd(shape, gamma, beta, running, eps)?;
    let mean: Vec<f64> = running.mean.iter().map(|m| *m as f64).collect();
    // Empty planes (H or W = 0) have no values: a plane length of 1 makes every loop below run
    // over nothing instead of dividing by zero.
    let p = (h * w).max(1);
    let x = x.contiguous();
    let (x, tape) = x.split_tape();
    let (tail, mut tape) = split_tail(tail, tape);
    let res_g = tail.res.as_ref().map(|(_, r)| r.ghost());
    let mut xv = read(&x);
    let (gv, bv) = (read(gamma), read(beta));
    let (scale, shift) = scale_shift(&gv, &bv, &mean, &rstd);
    if !Tp::OWNS_TAPE && tail.res.is_none() {
        // Nothing is kept for a backward pass: the input's copy becomes the output (evaluation
        // batches are large: a ResNet-20 activation at batch 1000 is 65 MB).
        inplace_planes(build, &mut xv, &scale, &shift, p, tail.relu, None);
        return Ok(x.device().tensor_from_vec(xv, (n, c, h, w)).put_tape(tape));
    }
    let res = tail.res.as_ref().map(|(v, _)| v.as_slice());
    let (y, mask) = affine_tail(build, &xv, &scale, &shift, p, tail.relu, res, Tp::OWNS_TAPE);
    drop(tail);
    let out = x.device().tensor_from_vec(y, (n, c, h, w));

    if Tp::OWNS_TAPE {
        let (x_g, g_g, b_g, out_g) = (x.ghost(), gamma.ghost(), beta.ghost(), out.ghost());
        let mean32 = running.mean.clone();
        let rstd32: Vec<f32> = rstd.iter().map(|r| *r as f32).collect();
        let min_planes = (ELEM_CHUNK / p).max(1);
        tape.add_backward_op(move |grads| {
            let mut dy = take_grad!(grads, out_g);
            let mask = if mask.is_empty() { Mask::None } else { Mask::Bytes(&mask) };
            match &res_g {
                Some(g) => tail_backward(build, &mut dy, mask, Some(grads.get_or_alloc_mut(g)?)),
                None => tail_backward(build, &mut dy, mask, None),
            }
            // One pass: dx, and per plane (sum dy * xhat, sum dy).
            let mut sums = vec![(0.0f64, 0.0f64); n * c];
            {
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                dx.par_chunks_mut(p)
                    .zip(dy.par_chunks(p))
                    .zip(xv.par_chunks(p))
                    .zip(sums.par_iter_mut())
                    .enumerate()
                    .with_min_len(min_planes)
                    .for_each(|(pi, (((dxp, dyp), xp), s))| {
                        let ch = pi % c;
                        let sc = scale[ch];
                        build.run(
                            #[inline(always)]
                            || {
                                for (d, g) in dxp.iter_mut().zip(dyp) {
                                    *d += g * sc;
                                }
                                *s = plane_grad_sums(build, dyp, xp, mean32[ch], rstd32[ch]);
                            },
                        )
                    });
            }
            drop(dy);
            let tot = channel_sums(&sums, c);
            for (d, t) in grads.get_or_alloc_mut(&g_g)?.iter_mut().zip(&tot) {
                *d += t.0 as f32;
            }
            for (d, t) in grads.get_or_alloc_mut(&b_g)?.iter_mut().zip(&tot) {
                *d += t.1 as f32;
            }
            Ok(())
        });
    }
    Ok(out.put_tape(tape))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 and AVX-512 lanes give the portable lanes' f64 bits for the per-plane sums (and
    /// the plain sums `sum_f64`'s), on every length
    /// from 0 to 70 (whole chunks and remainders) and a 32x32 plane, with values whose
    /// magnitudes differ by up to 2^40 (so any change in the order of a lane's sum shows).
    #[test]
    fn plane_sums_agree_across_builds() {
        if !Build::Avx2.available() {
            eprintln!("this CPU has no AVX2: the AVX2 lanes were not compared");
            return;
        }
        let val = |i: usize, seed: usize| {
            let u = ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0;
            u * [1.0, 3.0e-6, 7.0e5, 0.25][(i / 3 + seed) % 4]
        };
        let mut vectors = vec![Vector::Avx2];
        if Vector::of(Build::Avx2) == Vector::Avx512 {
            vectors.push(Vector::Avx512);
        } else {
            eprintln!("this CPU has no AVX-512: the AVX-512 lanes were not compared");
        }
        for len in (0..=70).chain([1024]) {
            let x: Vec<f32> = (0..len).map(|i| val(i, 1)).collect();
            let dy: Vec<f32> = (0..len).map(|i| val(i, 2)).collect();
            let bits = |(a, b): (f64, f64)| (a.to_bits(), b.to_bits());
            let stats = |v| bits(plane_stats_in(v, &x));
            let grads = |v| bits(plane_grad_sums_in(v, &dy, &x, 0.125, 1.75));
            for &v in &vectors {
                assert_eq!(stats(Vector::None), stats(v), "plane_stats, {v:?}, {len} values");
                assert_eq!(grads(Vector::None), grads(v), "plane_grad_sums, {v:?}, {len}");
                // Its `sum dy` lanes are those of `sum_f64`.
                let sum_dy = super::super::sum_f64(&dy).to_bits();
                assert_eq!(grads(v).1, sum_dy, "sum dy, {v:?}, {len} values");
                // And the plane's plain sum is `sum_f64`'s.
                let sum = super::super::sum_f64(&x).to_bits();
                assert_eq!(stats(v).0, sum, "sum, {v:?}, {len} values");
            }
        }
    }
}
