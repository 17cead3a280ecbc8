//! 3x3 "same" convolutions (stride 1, padding 1) with many channels as Winograd's minimal
//! filtering F(MxM, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2016): each MxM block of outputs ("tile") is `A^T [(G g G^T) . (B^T d B)] A` for the
//! (M + 2)x(M + 2) input patch `d` under it. F(4x4, 3x3) costs 36 multiplies per channel pair for
//! 16 outputs, F(2x2, 3x3) 16 for 4, a direct sum 144 for 16. Summed over input channels, the
//! (M + 2)^2 element-wise products become as many matrix products (one per position of the
//! transformed tile), which run on `gemm`. F(4x4, 3x3) runs on planes of at least four 4x4
//! tiles, F(2x2, 3x3) on smaller ones (see [`which`]).
//!
//! The backward pass is the exact adjoint of that forward (the gradient of the function it
//! computes): the output gradient goes through `A . A^T`, the input gradient is
//! `B (U^T dM) B^T` added over the overlapping patches, and the weight gradient is
//! `G^T (dM V^T) G`. Every transform is a fixed sequence of IEEE operations written out by hand
//! (no multiply-adds to contract: the same bits in every build). The results round differently
//! from a direct sum over the 9 taps, F(4x4, 3x3) more than F(2x2, 3x3) (coefficients up to 8
//! and sixths; tests: against f64 direct sums within float tolerance, and against central
//! differences through the tape op in `tests/ops.rs`).
//!
//! Layouts (per group of samples, `t` = the group's tiles, sample-major, then tile rows, with
//! `a = M + 2`): weights `U[a * a][cout][cin]`, transformed input `V[a * a][cin][t]`, products
//! `M[a * a][cout][t]`. Samples go in fixed groups (a number that depends on the plane size
//! alone); the weight and bias gradients are summed over fixed blocks of samples (8, or one
//! group of more), group after group, and the blocks added in order, so results are
//! bit-identical for any thread count, as everywhere in `ops`.

use std::mem::MaybeUninit;
use std::ops::{Add, Mul, Neg, Sub};

use rayon::prelude::*;

use super::batch_norm::affine_relu;
use super::conv::{Dx, Epilogue, Geom};
use super::direct::AffineRelu;
use super::gemm::{Gemm, Layout, Operand, Panel, Par};
use super::{sum_f32, with_scratch, BATCH_CHUNK};
use crate::cpu::{transpose, Build};

#[cfg(target_arch = "x86_64")]
mod samples;

/// Channels (in and out) from which a 3x3 "same" convolution runs here on planes its tiles
/// cover at least half of (see [`covered`]), and from which it does on any plane. Measured one
/// layer at a time (forward + backward, batch 128, one thread; 2026-12-06, Intel Xeon with
/// AVX-512, 2 cores), F(2x2, 3x3) against im2col + `gemm` first: 64 channels 32x32 even (270 vs
/// 274 ms), 128 16x16 faster (199 vs 233), 128 8x8 even (58 vs 59), 64 8x8 slower (22 vs 19),
/// 256 8x8 and 512 4x4 much faster (197 vs 281, 226 vs 413); below these the products per group
/// are too thin for `gemm`. Then im2col / F(2x2, 3x3) / F(4x4, 3x3), best of 3 in one run: 64
/// channels 32x32 308 / 274 / 214 ms, 128 16x16 245 / 191 / 131, 256 8x8 258 / 170 / 123, 512
/// 4x4 396 / 187 / 252 (one tile per sample: the 36 weight matrices outweigh the saved
/// multiplies).
///
/// Small planes from 64 channels (2026-12-07, Intel Xeon with AVX-512, 2 cores, one thread,
/// batch 128, forward + backward, best of 7, im2col against the rule [`which`] picks): 64
/// channels 2x2 5.0 / 2.4 ms (F(2x2)), 3x3 6.1 / 5.3 (F(2x2)), 4x4 8.6 / 6.0 (F(2x2)), 5x5 10.2 /
/// 13.2 (F(4x4) on 4 tiles, 25 of their 64 outputs real), 6x6 16.5 / 13.8, 7x7 19.6 / 13.4, 8x8
/// 22.4 / 14.0, 12x12 41.9 / 30.5; 128 channels 4x4 28.2 / 16.3, 5x5 33.7 / 33.8, 6x6 57.8 / 37.9,
/// 7x7 69.3 / 35.9, 8x8 70.7 / 39.5, 12x12 154.9 / 96.2. Hence the coverage rule in place of the
/// 256 pixels this used to ask for (F(4x4) had not been measured there): a ResNet-20's third
/// stage (64 channels on 8x8), a ConvNet-3's 8x8 layer on CIFAR and its 14x14 and 7x7 layers on
/// MNIST now run here. With 32 and 48 channels Winograd lost to the direct kernels on 16x16 (19.6
/// against 16.3 ms at 32 channels) and won only narrowly elsewhere (32 channels 8x8 5.9 against
/// 6.4), so they stay out. With the transforms of [`samples`] (2026-12-07, same host, forward +
/// backward, batch 128, one thread, best of 5): 32 channels 16x16 direct 13.6 ms against F(4x4)
/// 14.2 (still out); 32 channels 8x8 im2col 5.8 against F(4x4) 3.2, a gain the portable
/// transforms that AVX2-only CPUs run do not share (the 5.9 against 6.4 above), and taking it in
/// would change those layers' bits (a stage-version bump), so it is left for later.
///
/// From 32 channels since (2026-12-07 ~20:15 UTC, Intel Xeon with AVX-512, 2 cores, one thread,
/// batch 128, forward + backward through `ops::conv2d`, `benches/examples/conv_layers` with
/// these geometries, two alternating runs of best of 7): the rule before / Winograd, 32 channels
/// 32x32 57.5 / 58.6 and 63.7 / 60.6 ms (direct kernels against F(4x4, 3x3): even), 16x16 13.4 /
/// 11.2 and 14.3 / 12.0 (direct), 14x14 15.5 / 10.4 and 17.4 / 10.9, 8x8 5.4 / 2.9 and 6.1 / 2.9,
/// 4x4 2.2 / 0.9 and 2.3 / 0.9 (im2col); 48 channels 16x16 33.5 / 20.2 and 38.2 / 22.2, 8x8
/// 10.0 / 5.2 and 10.6 / 5.5 (im2col); 16 channels 32x32 17.4 / 33.1 (direct: 16 stays out).
/// What tipped 32 channels on 16x16 was the batch norm passes the ResNets' training path
/// folds into a conv, which Winograd now takes too (the statistics of each sample's output in
/// the forward's epilogue, the first norm and ReLU formed while gathering the input tiles:
/// `conv::runs_epilogue`, `conv::takes_mapped_input`): without them ResNet-20's second stage as
/// Winograd only matched the direct kernels over a whole step (`perf`: its convs 5% cheaper, its
/// norms' passes as much dearer). On CPUs without AVX-512 these layers take the portable
/// transforms (the bits do not depend on it): with AVX-512 hidden from our own kernels on the
/// same host (a temporary switch; `gemm` still used it), 32 channels on 16x16 took 19.7-20.0
/// ms by the rule before (AVX2 + FMA direct forward, im2col + `gemm` gradients) and 14.7-15.0
/// as Winograd.
const MIN_CHANNELS: usize = 32;
/// See [`MIN_CHANNELS`].
const ANY_PLANE_CHANNELS: usize = 256;

/// Tiles per group, the inner dimension of the weight gradient's products and the width of the
/// forward's: enough samples of a small plane go together to reach it, up to [`MAX_GROUP`].
const GROUP_TILES: usize = 256;
/// Samples per group at most.
const MAX_GROUP: usize = 64;

/// Whether the convolution `g` with `cout` output channels runs as Winograd minimal filtering.
pub(crate) fn applies(g: &Geom, cout: usize) -> bool {
    let ch = g.cin.min(cout);
    let big = ch >= ANY_PLANE_CHANNELS || (ch >= MIN_CHANNELS && 2 * g.h * g.w >= covered(g));
    g.k == 3 && g.p == 1 && g.same() && big
}

/// Outputs the tiles of [`which`]'s rule compute on `g`'s plane: the plane rounded up to whole
/// tiles (the outputs past its edge are computed and dropped).
fn covered(g: &Geom) -> usize {
    let m = match which(g) {
        Which::F2 => 2,
        Which::F4 => 4,
    };
    Tiles::new(g, m).per_sample() * m * m
}

/// Which rule a convolution [`applies`] holds for runs with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Which {
    /// F(2x2, 3x3).
    F2,
    /// F(4x4, 3x3).
    F4,
}

/// F(4x4, 3x3) where a plane holds at least 4 of its tiles (square planes from 5x5), F(2x2,
/// 3x3) on smaller ones: see [`MIN_CHANNELS`] for what was measured. Like [`applies`], a function of the
/// geometry alone (the bits may not depend on anything else).
fn which(g: &Geom) -> Which {
    if g.h.div_ceil(4) * g.w.div_ceil(4) >= 4 {
        Which::F4
    } else {
        Which::F2
    }
}

/// What a transform map computes on: one float, or one float of each of 16 samples
/// (`samples::V16`). The maps below are written once over it, so a vector of samples gets each
/// lane's operations in the same order as one float does (the same bits).
trait Lane:
    Copy + Add<Output = Self> + Sub<Output = Self> + Neg<Output = Self> + Mul<f32, Output = Self>
{
}

impl Lane for f32 {}

/// A Winograd rule F(MxM, 3x3) along one axis: a tile's `A` = M + 2 inputs give M outputs as
/// `A^T [(G g) . (B^T d)]`. Each map is written out by hand with its adjoint (the transposed
/// matrix), in a fixed order of operations: Rust does not contract multiply-adds, so every
/// build rounds them alike.
trait Rule<const M: usize, const A: usize> {
    /// `B^T d`.
    fn bt<T: Lane>(d: [T; A]) -> [T; A];
    /// `B y`, the adjoint of [`Rule::bt`].
    fn bt_adj<T: Lane>(y: [T; A]) -> [T; A];
    /// `A^T m`.
    fn at<T: Lane>(m: [T; A]) -> [T; M];
    /// `A y`, the adjoint of [`Rule::at`].
    fn at_adj<T: Lane>(y: [T; M]) -> [T; A];
    /// `G g` of the 3 taps.
    fn g(w: [f32; 3]) -> [f32; A];
    /// `G^T u`, the adjoint of [`Rule::g`].
    fn g_adj(u: [f32; A]) -> [f32; 3];
}

/// F(2x2, 3x3) at the points 0, 1, -1 (Lavin & Gray): B^T = [[1, 0, -1, 0], [0, 1, 1, 0],
/// [0, -1, 1, 0], [0, 1, 0, -1]], G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
/// A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: only additions and halvings.
struct F2;

impl Rule<2, 4> for F2 {
    #[inline(always)]
    fn bt<T: Lane>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
    #[inline(always)]
    fn bt_adj<T: Lane>([y0, y1, y2, y3]: [T; 4]) -> [T; 4] {
        [y0, y1 - y2 + y3, y1 + y2 - y0, -y3]
    }
    #[inline(always)]
    fn at<T: Lane>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
    #[inline(always)]
    fn at_adj<T: Lane>([y0, y1]: [T; 2]) -> [T; 4] {
        [y0, y0 + y1, y0 - y1, -y1]
    }
    #[inline(always)]
    fn g([a, b, c]: [f32; 3]) -> [f32; 4] {
        [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
    }
    #[inline(always)]
    fn g_adj([u0, u1, u2, u3]: [f32; 4]) -> [f32; 3] {
        [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3]
    }
}

/// F(4x4, 3x3) at the points 0, 1, -1, 2, -2 (Lavin & Gray): B^T = [[4, 0, -5, 0, 1, 0],
/// [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0],
/// [0, 4, 0, -5, 0, 1]], G = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6],
/// [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]], A^T = [[1, 1, 1, 1, 1, 0],
/// [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]. A tile costs 36 multiplies
/// per channel pair for 16 outputs (F(2x2, 3x3): 16 for 4), at the price of coefficients up to 8
/// and thirds (more rounding: the tests bound it).
struct F4;

impl Rule<4, 6> for F4 {
    #[inline(always)]
    fn bt<T: Lane>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
        let (s, t) = (d4 - d2, d3 - d1);
        [
            d0 * 4.0 - d2 * 5.0 + d4,
            (d3 + d4) - (d1 + d2) * 4.0,
            (d4 - d3) + (d1 - d2) * 4.0,
            s + t * 2.0,
            s - t * 2.0,
            d1 * 4.0 - d3 * 5.0 + d5,
        ]
    }
    #[inline(always)]
    fn bt_adj<T: Lane>([y0, y1, y2, y3, y4, y5]: [T; 6]) -> [T; 6] {
        [
            y0 * 4.0,
            (y2 - y1 + y5) * 4.0 + (y4 - y3) * 2.0,
            y0 * -5.0 - (y1 + y2) * 4.0 - (y3 + y4),
            (y1 - y2) + (y3 - y4) * 2.0 - y5 * 5.0,
            y0 + y1 + y2 + y3 + y4,
            y5,
        ]
    }
    #[inline(always)]
    fn at<T: Lane>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [m0 + s12 + s34, d12 + d34 * 2.0, s12 + s34 * 4.0, d12 + d34 * 8.0 + m5]
    }
    #[inline(always)]
    fn at_adj<T: Lane>([y0, y1, y2, y3]: [T; 4]) -> [T; 6] {
        let (e, o) = (y0 + y2, y1 + y3);
        let (e2, o2) = (y0 + y2 * 4.0, y1 * 2.0 + y3 * 8.0);
        [y0, e + o, e - o, e2 + o2, e2 - o2, y3]
    }
    #[inline(always)]
    fn g([a, b, c]: [f32; 3]) -> [f32; 6] {
        [
            a / 4.0,
            -(a + b + c) / 6.0,
            -(a - b + c) / 6.0,
            (a + 2.0 * b + 4.0 * c) / 24.0,
            (a - 2.0 * b + 4.0 * c) / 24.0,
            c,
        ]
    }
    #[inline(always)]
    fn g_adj([u0, u1, u2, u3, u4, u5]: [f32; 6]) -> [f32; 3] {
        let (s12, d12, s34, d34) = (u1 + u2, u2 - u1, u3 + u4, u3 - u4);
        [u0 / 4.0 - s12 / 6.0 + s34 / 24.0, d12 / 6.0 + d34 / 12.0, (s34 - s12) / 6.0 + u5]
    }
}

/// The tile grid of one plane and the samples per group.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    h: usize,
    w: usize,
    /// Outputs per tile side (the rule's M).
    m: usize,
    /// Tile rows and columns: ceil(h / m), ceil(w / m).
    th: usize,
    tw: usize,
    /// Samples per group.
    spg: usize,
    /// Whether the transforms run 16 samples to a vector ([`samples`]; see [`Tiles::lanes`]).
    lanes: bool,
}

impl Tiles {
    fn new(g: &Geom, m: usize) -> Tiles {
        let (th, tw) = (g.h.div_ceil(m), g.w.div_ceil(m));
        let spg = (GROUP_TILES / (th * tw)).clamp(1, MAX_GROUP);
        Tiles { h: g.h, w: g.w, m, th, tw, spg, lanes: false }
    }
    /// These tiles with their transforms run 16 samples to a vector where `build` and the CPU
    /// allow it ([`samples::usable`]): the same bits either way.
    fn lanes(mut self, build: Build) -> Tiles {
        #[cfg(target_arch = "x86_64")]
        {
            self.lanes = samples::usable(build, &self);
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = build;
        self
    }
    /// Tiles per sample.
    fn per_sample(&self) -> usize {
        self.th * self.tw
    }
    /// Rows of the zero-padded plane the tiles read: m th + 2.
    fn padded_rows(&self) -> usize {
        self.m * self.th + 2
    }
    /// Floats of the transforms' work buffer for `tt` tiles: A x A pieces over the tiles, as
    /// many over [`PASS`] of them (the passes' intermediate), and a padded row (m tw + 2 floats,
    /// at least the input gradient's two phases).
    fn buf_len(&self, tt: usize) -> usize {
        let a = self.m + 2;
        let portable = a * a * (tt + PASS.min(tt)) + self.m * self.tw + 2;
        #[cfg(target_arch = "x86_64")]
        if self.lanes {
            return portable.max(samples::buf_len(self));
        }
        portable
    }
}

/// Floats between consecutive tile positions' matrices in the transformed input and products
/// (`rows` x `tt` each): one cache line more than the matrix, so the rows a transform reads or
/// writes at once do not all fall in one L1 set (a 64x256 matrix is 64 KiB, a multiple of the
/// 4 KiB that maps to one set).
fn stride(rows: usize, tt: usize) -> usize {
    rows * tt + 16
}

/// Pairs of channels transformed at a time by [`transform_weights`] and [`weight_grad_from`].
const BLOCK: usize = 64;

/// `U = G g G^T` for every (output, input) channel pair, laid out `[A * A][cout][cin]`: a
/// block of pairs at a time, each pass over all of the block's pairs at once (its taps
/// transposed first), the same operations in the same order for each pair.
#[inline(always)]
fn transform_weights<const M: usize, const A: usize, R: Rule<M, A>>(
    wv: &[f32],
    cout: usize,
    cin: usize,
) -> Vec<f32> {
    let plane = cout * cin;
    let mut u = vec![0.0f32; A * A * plane];
    let mut taps = vec![0.0f32; 9 * BLOCK];
    let mut rows = vec![0.0f32; 3 * A * BLOCK];
    for (bi, gs) in wv.chunks(9 * BLOCK).enumerate() {
        let n = gs.len() / 9;
        for (p, g) in gs.chunks_exact(9).enumerate() {
            for (k, &v) in g.iter().enumerate() {
                taps[k * BLOCK + p] = v;
            }
        }
        // Along each row of taps (rows[ky][b]), then down each column b of the results.
        for ky in 0..3 {
            let src = pieces::<3>(&taps, BLOCK, 3 * ky * BLOCK, n);
            fan(n, src, pieces_mut(&mut rows, BLOCK, ky * A * BLOCK, n), R::g);
        }
        for b in 0..A {
            let src = pieces::<3>(&rows, A * BLOCK, b * BLOCK, n);
            fan(n, src, pieces_mut(&mut u, A * plane, b * plane + bi * BLOCK, n), R::g);
        }
    }
    u
}

/// The adjoint of [`transform_weights`] on a gradient `du` (`[A * A][cout][cin]`): `G^T dU G`,
/// written transposed (9 cin x cout, as `conv::backward_slices` returns weight gradients).
#[inline(always)]
fn weight_grad_from<const M: usize, const A: usize, R: Rule<M, A>>(
    du: &[f32],
    cout: usize,
    cin: usize,
) -> Vec<f32> {
    let plane = cout * cin;
    let mut dwt = vec![0.0f32; 9 * plane];
    let mut blk = vec![0.0f32; A * A * BLOCK];
    for b0 in (0..plane).step_by(BLOCK) {
        let n = BLOCK.min(plane - b0);
        for (xi, dst) in blk.chunks_exact_mut(BLOCK).enumerate() {
            dst[..n].copy_from_slice(&du[xi * plane + b0..][..n]);
        }
        for p in 0..n {
            let (co, ci) = ((b0 + p) / cin, (b0 + p) % cin);
            // Along each row a (over b, to kx), then down the columns (over a, to ky).
            let mut rows = [[0.0f32; 3]; A];
            for (a, r) in rows.iter_mut().enumerate() {
                let mut u = [0.0f32; A];
                for (b, v) in u.iter_mut().enumerate() {
                    *v = blk[(a * A + b) * BLOCK + p];
                }
                *r = R::g_adj(u);
            }
            for kx in 0..3 {
                let mut u = [0.0f32; A];
                for (a, v) in u.iter_mut().enumerate() {
                    *v = rows[a][kx];
                }
                for (ky, v) in R::g_adj(u).into_iter().enumerate() {
                    dwt[(ci * 9 + ky * 3 + kx) * cout + co] = v;
                }
            }
        }
    }
    dwt
}

/// `N` slices of `n` floats of `v`, at `off`, `off + step`, ... (filled by loops: built with
/// `std::array::from_fn` they were left out of line: ~3% of a one-thread ResNet-18 step by
/// `perf`, 2026-12-06, Intel Xeon with AVX-512, 2 cores).
#[inline(always)]
fn pieces_mut<const N: usize>(v: &mut [f32], step: usize, off: usize, n: usize) -> [&mut [f32]; N] {
    let mut out: [&mut [f32]; N] = [(); N].map(|_| <&mut [f32]>::default());
    let mut rest = &mut v[off..];
    for (i, o) in out.iter_mut().enumerate() {
        let (piece, tail) =
            std::mem::take(&mut rest).split_at_mut(if i + 1 < N { step } else { n });
        *o = &mut piece[..n];
        rest = tail;
    }
    out
}

/// [`pieces_mut`], read only.
#[inline(always)]
fn pieces<const N: usize>(v: &[f32], step: usize, off: usize, n: usize) -> [&[f32]; N] {
    let mut out: [&[f32]; N] = [&[]; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = &v[off + i * step..][..n];
    }
    out
}

/// `pieces[q][j] = row[M j + q]` for every j below the pieces' (equal) length, zeros past the
/// row's end; with `P` > `M` pieces, consecutive j overlap (a tile's patch columns).
#[inline(always)]
fn gather<const M: usize, const P: usize>(row: &[f32], pieces: [&mut [f32]; P]) {
    let n = pieces[0].len();
    // Positions whose P values all lie in the row.
    let full = if row.len() >= P { ((row.len() - P) / M + 1).min(n) } else { 0 };
    let mut pieces = pieces;
    // LANES positions at a time through local arrays (constant indices: no bounds checks).
    let mut j = 0;
    while j + LANES <= full {
        let mut x = [[0.0f32; P]; LANES];
        for (l, xl) in x.iter_mut().enumerate() {
            xl.copy_from_slice(&row[M * (j + l)..][..P]);
        }
        for (q, piece) in pieces.iter_mut().enumerate() {
            let mut y = [0.0f32; LANES];
            for l in 0..LANES {
                y[l] = x[l][q];
            }
            piece[j..j + LANES].copy_from_slice(&y);
        }
        j += LANES;
    }
    for jj in j..full {
        let c: &[f32; P] = row[M * jj..][..P].try_into().expect("P values");
        for q in 0..P {
            pieces[q][jj] = c[q];
        }
    }
    for (q, piece) in pieces.iter_mut().enumerate() {
        for (jj, e) in piece.iter_mut().enumerate().skip(full) {
            *e = row.get(M * jj + q).copied().unwrap_or(0.0);
        }
    }
}

/// `f(&mut row[M j + q], pieces[q][j])` for every element of `row` (the pieces at least
/// ceil(len / M) long).
#[inline(always)]
fn interleave<const M: usize, T>(row: &mut [T], pieces: [&[f32]; M], f: impl Fn(&mut T, f32)) {
    let full = row.len() / M;
    let mut j = 0;
    // LANES positions at a time, as in `deinterleave`.
    while j + LANES <= full {
        let mut x = [[0.0f32; LANES]; M];
        for (q, xq) in x.iter_mut().enumerate() {
            xq.copy_from_slice(&pieces[q][j..j + LANES]);
        }
        for (l, c) in row[M * j..M * (j + LANES)].chunks_exact_mut(M).enumerate() {
            for q in 0..M {
                f(&mut c[q], x[q][l]);
            }
        }
        j += LANES;
    }
    let (body, tail) = row.split_at_mut(full * M);
    for (jj, c) in body.chunks_exact_mut(M).enumerate().skip(j) {
        for q in 0..M {
            f(&mut c[q], pieces[q][jj]);
        }
    }
    for (q, e) in tail.iter_mut().enumerate() {
        f(e, pieces[q][full]);
    }
}

/// Tiles per step of a transform's two passes (along the rows, down the columns), so that what
/// the first writes for the second (A x A pieces, 9 KiB for F(4x4, 3x3)) stays in L1.
const PASS: usize = 64;

/// Positions per step of [`fan`]: one AVX2 vector.
const LANES: usize = 8;

/// For each of `n` positions j: `dst[k][j] = f(src[..][j])[k]`, [`LANES`] positions at a time
/// through local arrays (which the compiler turns into vector operations: through the slices
/// themselves it could not rule out that they overlap, and stayed scalar).
#[inline(always)]
fn fan<const I: usize, const O: usize>(
    n: usize,
    src: [&[f32]; I],
    dst: [&mut [f32]; O],
    f: impl Fn([f32; I]) -> [f32; O],
) {
    let src: [&[f32]; I] = std::array::from_fn(|k| &src[k][..n]);
    let dst = dst.map(|d| &mut d[..n]);
    let mut j = 0;
    while j + LANES <= n {
        let mut x = [[0.0f32; LANES]; I];
        for k in 0..I {
            x[k].copy_from_slice(&src[k][j..j + LANES]);
        }
        let mut y = [[0.0f32; LANES]; O];
        for l in 0..LANES {
            let mut a = [0.0f32; I];
            for k in 0..I {
                a[k] = x[k][l];
            }
            let v = f(a);
            for k in 0..O {
                y[k][l] = v[k];
            }
        }
        for k in 0..O {
            dst[k][j..j + LANES].copy_from_slice(&y[k]);
        }
        j += LANES;
    }
    for j in j..n {
        let mut a = [0.0f32; I];
        for k in 0..I {
            a[k] = src[k][j];
        }
        let v = f(a);
        for k in 0..O {
            dst[k][j] = v[k];
        }
    }
}

/// `V = B^T d B` for every tile of a group (`x`, (gs, cin, h, w)): `v` is `[A * A][cin][tt]`
/// (matrices [`stride`] apart), the group's tile `s * tiles + i * tw + j` at that column.
/// Channel by channel: first every tile's A x A patch of the zero-padded plane is gathered as
/// `[k][a]` pieces over all the group's tiles (`patch`), then one pass per patch row along its
/// columns (to `[k][b]` pieces) and one per component down the rows, each over [`PASS`] tiles
/// at a time (a pass per padded row, over one row of tiles, was mostly loop overhead on small
/// planes).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn input_transform<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    x: &[f32],
    map: Option<AffineRelu<'_>>,
    cin: usize,
    v: &mut [f32],
    tt: usize,
    buf: &mut [f32],
) {
    if let Some(m) = map {
        assert!(m.scale.len() == cin && m.shift.len() == cin, "winograd: a map of {cin} channels");
    }
    #[cfg(target_arch = "x86_64")]
    if t.lanes {
        // SAFETY: `lanes` is set only where `samples::usable` holds, and `buf` has
        // `Tiles::buf_len` floats, at least `samples::buf_len`.
        return unsafe { samples::input_transform::<M, A, R>(t, x, map, cin, v, tt, buf) };
    }
    let (h, w, th, tw) = (t.h, t.w, t.th, t.tw);
    let (tps, st, plane) = (t.per_sample(), stride(cin, tt), h * w);
    let pw = PASS.min(tt);
    let (g, rest) = buf.split_at_mut(A * A * pw);
    let (patch, rest) = rest.split_at_mut(A * A * tt);
    // One padded row: padded column c is input column c - 1.
    let prow = &mut rest[..M * tw + 2];
    prow.fill(0.0);
    for c in 0..cin {
        for s in 0..tt / tps {
            let xc = &x[(s * cin + c) * plane..(s * cin + c + 1) * plane];
            for r in 0..t.padded_rows() {
                if r == 0 || r > h {
                    prow[1..=w].fill(0.0);
                } else {
                    let src = &xc[(r - 1) * w..r * w];
                    match map {
                        // The norm's output as batch norm forms it (the same bits).
                        Some(m) => {
                            let (sc, sh) = (m.scale[c], m.shift[c]);
                            for (d, x) in prow[1..=w].iter_mut().zip(src) {
                                *d = affine_relu(*x, sc, sh);
                            }
                        }
                        None => prow[1..=w].copy_from_slice(src),
                    }
                }
                // Padded row r is row k = r % M of tile row r / M and, when r % M < 2, row
                // k + M of tile row r / M - 1.
                for (i, k) in [(r / M, r % M), ((r / M).wrapping_sub(1), r % M + M)] {
                    if i < th && k < A {
                        // Patch column a of tile j is padded column M j + a.
                        let at = k * A * tt + s * tps + i * tw;
                        gather::<M, A>(prow, pieces_mut(patch, tt, at, tw));
                    }
                }
            }
        }
        for t0 in (0..tt).step_by(pw) {
            let n = pw.min(tt - t0);
            for k in 0..A {
                let src = pieces::<A>(patch, tt, k * A * tt + t0, n);
                fan(n, src, pieces_mut(g, pw, k * A * pw, n), R::bt);
            }
            for b in 0..A {
                let src = pieces::<A>(g, A * pw, b * pw, n);
                fan(n, src, pieces_mut(v, A * st, b * st + c * tt + t0, n), R::bt);
            }
        }
    }
}

/// `A^T M A` for every tile of a group: `m` is `[A * A][cout][tt]`; writes every element of
/// `y` ((gs, cout, h, w)), plus the bias. Channel by channel: one pass per component and one
/// per output row of a tile into its `[p][q]` pieces, [`PASS`] tiles at a time, then those
/// interleaved into the planes.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_transform<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    m: &[f32],
    tt: usize,
    cout: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    buf: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if t.lanes {
        // SAFETY: `lanes` is set only where `samples::usable` holds, and `buf` has
        // `Tiles::buf_len` floats, at least `samples::buf_len`.
        return unsafe { samples::output_transform::<M, A, R>(t, m, tt, cout, bias, y, buf) };
    }
    let (h, w, tw, tps) = (t.h, t.w, t.tw, t.per_sample());
    let (st, plane, pw) = (stride(cout, tt), h * w, PASS.min(tt));
    let (half, rest) = buf.split_at_mut(M * A * pw);
    let out = &mut rest[..M * M * tt];
    for co in 0..cout {
        let bv = bias.map_or(0.0, |b| b[co]);
        let has_bias = bias.is_some();
        // half[p][b] = sum_a A^T[p][a] m[a][b].
        for t0 in (0..tt).step_by(pw) {
            let n = pw.min(tt - t0);
            for b in 0..A {
                let src = pieces::<A>(m, A * st, b * st + co * tt + t0, n);
                fan(n, src, pieces_mut(half, A * pw, b * pw, n), R::at);
            }
            for p in 0..M {
                let src = pieces::<A>(half, pw, p * A * pw, n);
                fan(n, src, pieces_mut(out, tt, p * M * tt + t0, n), |x| {
                    let mut v = R::at(x);
                    if has_bias {
                        for e in v.iter_mut() {
                            *e += bv;
                        }
                    }
                    v
                });
            }
        }
        for s in 0..tt / tps {
            let yc = &mut y[(s * cout + co) * plane..(s * cout + co + 1) * plane];
            for oy in 0..h {
                let (i, p) = (oy / M, oy % M);
                let at = s * tps + i * tw;
                let row = &mut yc[oy * w..(oy + 1) * w];
                interleave::<M, _>(row, pieces(out, tt, p * M * tt + at, tw), |e, v| {
                    e.write(v);
                });
            }
        }
    }
}

/// The adjoint of [`output_transform`] (without the bias): `dM = A dY A^T` for every tile of a
/// group's output gradient `dy` ((gs, cout, h, w)), written to `dm` (`[A * A][cout][tt]`).
#[inline(always)]
fn output_adjoint<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    dy: &[f32],
    cout: usize,
    dm: &mut [f32],
    tt: usize,
    buf: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if t.lanes {
        // SAFETY: `lanes` is set only where `samples::usable` holds, and `buf` has
        // `Tiles::buf_len` floats, at least `samples::buf_len`.
        return unsafe { samples::output_adjoint::<M, A, R>(t, dy, cout, dm, tt, buf) };
    }
    let (h, w, th, tw, tps) = (t.h, t.w, t.th, t.tw, t.per_sample());
    let (st, plane, pw) = (stride(cout, tt), h * w, PASS.min(tt));
    let (pc, rest) = buf.split_at_mut(M * M * tt);
    let half = &mut rest[..A * M * pw];
    for co in 0..cout {
        // Each tile's outputs as [p][q] pieces (zeros outside the plane).
        for s in 0..tt / tps {
            let dyc = &dy[(s * cout + co) * plane..(s * cout + co + 1) * plane];
            for oy in 0..M * th {
                let (i, p) = (oy / M, oy % M);
                let at = s * tps + i * tw;
                let row = if oy < h { &dyc[oy * w..(oy + 1) * w] } else { &[][..] };
                gather::<M, M>(row, pieces_mut(pc, tt, p * M * tt + at, tw));
            }
        }
        // half[a][q] = sum_p A^T[p][a] dy[p][q], then dM[a][b] = sum_q A^T[q][b] half[a][q].
        for t0 in (0..tt).step_by(pw) {
            let n = pw.min(tt - t0);
            for q in 0..M {
                let src = pieces::<M>(pc, M * tt, q * tt + t0, n);
                fan(n, src, pieces_mut(half, M * pw, q * pw, n), R::at_adj);
            }
            for a in 0..A {
                let src = pieces::<M>(half, pw, a * M * pw, n);
                fan(n, src, pieces_mut(dm, st, a * A * st + co * tt + t0, n), R::at_adj);
            }
        }
    }
}

/// The adjoint of [`input_transform`]: adds `B dV B^T` of every tile, over the overlapping
/// patches, into a group's input gradient `dx` ((gs, cin, h, w)); `dv` is `[A * A][cin][tt]`.
#[inline(always)]
fn input_adjoint<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    dv: &[f32],
    cin: usize,
    tt: usize,
    dx: &mut [f32],
    buf: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if t.lanes {
        // SAFETY: `lanes` is set only where `samples::usable` holds, and `buf` has
        // `Tiles::buf_len` floats, at least `samples::buf_len`.
        return unsafe { samples::input_adjoint::<M, A, R>(t, dv, cin, tt, dx, buf) };
    }
    let (h, w, th, tw, tps) = (t.h, t.w, t.th, t.tw, t.per_sample());
    let (st, plane, pw) = (stride(cin, tt), h * w, PASS.min(tt));
    let (half, rest) = buf.split_at_mut(A * A * pw);
    let (dd, rest) = rest.split_at_mut(A * A * tt);
    let ph = &mut rest[..2 * tw];
    for c in 0..cin {
        // half[k][b] = sum_a B^T[a][k] dV[a][b], then dd[k][l] = sum_b B^T[b][l] half[k][b].
        for t0 in (0..tt).step_by(pw) {
            let n = pw.min(tt - t0);
            for b in 0..A {
                let src = pieces::<A>(dv, A * st, b * st + c * tt + t0, n);
                fan(n, src, pieces_mut(half, A * pw, b * pw, n), R::bt_adj);
            }
            for k in 0..A {
                let src = pieces::<A>(half, pw, k * A * pw, n);
                fan(n, src, pieces_mut(dd, tt, k * A * tt + t0, n), R::bt_adj);
            }
        }
        for s in 0..tt / tps {
            let dxc = &mut dx[(s * cin + c) * plane..(s * cin + c + 1) * plane];
            for i in 0..th {
                for k in 0..A {
                    // Padded row M i + k is input row M i + k - 1; padding rows are dropped.
                    let r = M * i + k;
                    if r == 0 || r > h {
                        continue;
                    }
                    let at = k * A * tt + s * tps + i * tw;
                    // Padded column M j + l is input column M j + l - 1: input column M j + q
                    // takes patch column q + 1 of tile j, and for q = 0 column M + 1 of tile
                    // j - 1, for q = M - 1 column 0 of tile j + 1 (tile 0's is padding).
                    // Those two phases are summed here (`first`, `last`), then all M are added
                    // into the row.
                    let (first, last) = ph.split_at_mut(tw);
                    let (d0, d1) = (&dd[at..][..tw], &dd[at + tt..][..tw]);
                    let (dm, dm1) = (&dd[at + M * tt..][..tw], &dd[at + (M + 1) * tt..][..tw]);
                    first[0] = d1[0];
                    for ((e, &a), &b) in first[1..].iter_mut().zip(&d1[1..]).zip(dm1) {
                        *e = a + b;
                    }
                    let last = &mut last[..tw];
                    for ((e, &a), &b) in last.iter_mut().zip(dm).zip(&d0[1..]) {
                        *e = a + b;
                    }
                    last[tw - 1] = dm[tw - 1];
                    let mut phases = pieces::<M>(dd, tt, at + tt, tw);
                    (phases[0], phases[M - 1]) = (first, last);
                    let row = &mut dxc[(r - 1) * w..r * w];
                    interleave::<M, _>(row, phases, |e, v| *e += v);
                }
            }
        }
    }
}

/// A forward pass as [`forward_with`] and `conv::forward_slices` take it.
type ForwardFn = fn(
    Build,
    &Geom,
    usize,
    usize,
    &[f32],
    Option<AffineRelu<'_>>,
    &[f32],
    Option<&[f32]>,
    bool,
    Option<Epilogue<'_>>,
) -> (Vec<f32>, Option<Saved>);

/// A backward pass as [`backward_with`] and `conv::backward_slices` take it.
type BackwardFn = fn(
    Build,
    &Geom,
    usize,
    usize,
    &[f32],
    Option<AffineRelu<'_>>,
    &[f32],
    bool,
    &[f32],
    Option<Dx<'_>>,
    Option<&Saved>,
) -> (Vec<f32>, Vec<f32>);

/// The transformed input `V` of every group of a forward pass, kept for its backward pass, which
/// would otherwise compute it again from the same input (the same operations: the same bits).
/// On a ResNet-20's third stage the input transform was ~2.2% of a one-thread training step
/// each time (`perf`, 2026-12-07, Intel Xeon with AVX-512, 2 cores). Groups are [`Saved::len`]
/// floats apart, each laid out as the forward wrote it.
pub(crate) struct Saved {
    v: Vec<f32>,
    len: usize,
}

/// The most bytes a forward pass keeps as [`Saved`]: `V` is 2.25 (F(4x4, 3x3)) or 4 (F(2x2,
/// 3x3)) times the input, so large inputs recompute it instead (ResNet-18's first two stages at
/// full width would keep ~400 MB a step). A ResNet-20's third stage keeps 4.7 MB per conv at
/// batch 128.
const MAX_SAVED_BYTES: usize = 32 << 20;

/// The forward and backward passes of `rule`.
fn passes(rule: Which) -> (ForwardFn, BackwardFn) {
    match rule {
        Which::F2 => (forward_with::<2, 4, F2>, backward_with::<2, 4, F2>),
        Which::F4 => (forward_with::<4, 6, F4>, backward_with::<4, 6, F4>),
    }
}

/// The forward pass of a convolution `g` that [`applies`] holds for, with the rule [`which`]
/// picks.
pub(crate) fn forward(g: &Geom) -> ForwardFn {
    passes(which(g)).0
}

/// The backward pass matching [`forward`].
pub(crate) fn backward(g: &Geom) -> BackwardFn {
    passes(which(g)).1
}

/// The forward pass of a convolution [`applies`] holds for, with the rule `R`: `n` samples `xv`
/// ((n, cin, h, w)), weights `wv` ((cout, cin, 3, 3)), bias `bv`; returns the (n, cout, h, w)
/// output and, when `save` is asked for and the transformed input is small enough
/// ([`MAX_SAVED_BYTES`]), that input for the backward pass. `epilogue` is called on each
/// sample's output (`conv::Epilogue`) as its group's output transform finishes, while the group
/// is in cache.
#[allow(clippy::too_many_arguments)]
fn forward_with<const M: usize, const A: usize, R: Rule<M, A>>(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    map: Option<AffineRelu<'_>>,
    wv: &[f32],
    bv: Option<&[f32]>,
    save: bool,
    epilogue: Option<Epilogue<'_>>,
) -> (Vec<f32>, Option<Saved>) {
    let (t, cin) = (Tiles::new(g, M).lanes(build), g.cin);
    let (xs, ys, tps) = (cin * g.h * g.w, cout * g.h * g.w, t.per_sample());
    assert_eq!(xv.len(), n * xs, "conv2d: input of {} values, expected {n} x {xs}", xv.len());
    let u = build.run(
        #[inline(always)]
        || transform_weights::<M, A, R>(wv, cout, cin),
    );
    let tmax = t.spg * tps;
    let (vl, ml) = (A * A * stride(cin, tmax), A * A * stride(cout, tmax));
    let groups = n.div_ceil(t.spg);
    let save = save && groups * vl * std::mem::size_of::<f32>() <= MAX_SAVED_BYTES;
    // Group `c`: its input transformed into `v`, the products into scratch, the output into `yc`.
    let group =
        |c: usize, yc: &mut [MaybeUninit<f32>], v: &mut [f32], scratch: &mut [f32], par: Par| {
            build.run(
                #[inline(always)]
                || {
                    let (gs, s0) = (yc.len() / ys, c * t.spg);
                    let tt = gs * tps;
                    let (m, buf) = scratch.split_at_mut(ml);
                    let (v, m) =
                        (&mut v[..A * A * stride(cin, tt)], &mut m[..A * A * stride(cout, tt)]);
                    let x = &xv[s0 * xs..(s0 + gs) * xs];
                    input_transform::<M, A, R>(&t, x, map, cin, v, tt, buf);
                    // M = U V per tile position: a `Panel` where it applies (`gemm`'s bits without
                    // packing V again for each product), else `gemm`.
                    let panel = Panel::applies(build, cout, tt) && par.single();
                    for xi in 0..A * A {
                        let (ux, vx) =
                            (&u[xi * cout * cin..][..cout * cin], &v[xi * stride(cin, tt)..]);
                        let mx = &mut m[xi * stride(cout, tt)..][..cout * tt];
                        if panel {
                            let (n, k) = (tt, cin);
                            Panel { m: cout, n, k, lhs: ux, lrs: cin, rhs: vx, accumulate: false }
                                .run(mx);
                            continue;
                        }
                        Gemm {
                            m: cout,
                            n: tt,
                            k: cin,
                            lhs: Operand::row_major(ux, cin),
                            rhs: Operand::row_major(&vx[..cin * tt], tt),
                            accumulate: false,
                        }
                        .run(mx, Layout::row_major(tt), par);
                    }
                    output_transform::<M, A, R>(&t, m, tt, cout, bv, yc, buf);
                    if let Some(e) = epilogue {
                        // SAFETY: `output_transform` wrote every element of `yc`, and f32 has the
                        // layout of MaybeUninit<f32>.
                        let yc: &[f32] =
                            unsafe { std::slice::from_raw_parts(yc.as_ptr().cast(), yc.len()) };
                        for (l, yn) in yc.chunks_exact(ys).enumerate() {
                            e(s0 + l, yn);
                        }
                    }
                },
            )
        };
    let scratch = ml + t.buf_len(tmax);
    let mut y: Vec<f32> = Vec::with_capacity(n * ys);
    let spare = &mut y.spare_capacity_mut()[..n * ys];
    let saved = if save {
        // Each group's `V` in its own piece of the kept buffer, zeroed by the group's own task
        // (the gaps between its matrices are never written): zeroing the whole buffer up front
        // was a serial pass over up to 4.7 MB per conv (ResNet-20's third stage), ~0.7% of a
        // one-thread training step in `memset` (`perf`, 2026-12-07, Intel Xeon with AVX-512, 2
        // cores) and more with two threads, which waited for it.
        let mut sv: Vec<f32> = Vec::with_capacity(groups * vl);
        let run = |c: usize, yc: &mut [MaybeUninit<f32>], vc: &mut [MaybeUninit<f32>], par| {
            for e in vc.iter_mut() {
                e.write(0.0);
            }
            // SAFETY: every element was initialised just above, and f32 has the layout of
            // MaybeUninit<f32>.
            let vc = unsafe { std::slice::from_raw_parts_mut(vc.as_mut_ptr().cast(), vc.len()) };
            with_scratch(scratch, |s| group(c, yc, vc, s, par))
        };
        let pieces =
            spare.chunks_mut(t.spg * ys).zip(sv.spare_capacity_mut()[..groups * vl].chunks_mut(vl));
        if super::tasks_in_parallel(groups) {
            let pieces: Vec<_> = pieces.collect();
            pieces.into_par_iter().enumerate().for_each(|(c, (yc, vc))| run(c, yc, vc, Par::Seq));
        } else {
            pieces.enumerate().for_each(|(c, (yc, vc))| run(c, yc, vc, Par::Pool));
        }
        // SAFETY: the tasks above initialised every piece of the `groups * vl` elements.
        unsafe { sv.set_len(groups * vl) };
        Some(Saved { v: sv, len: vl })
    } else {
        let run = |c: usize, yc: &mut [MaybeUninit<f32>], s: &mut [f32], par: Par| {
            let (v, s) = s.split_at_mut(vl);
            group(c, yc, v, s, par)
        };
        super::conv::write_chunks(spare, t.spg * ys, vl + scratch, run);
        None
    };
    // SAFETY: `output_transform` wrote every element of every chunk of `spare`.
    unsafe { y.set_len(n * ys) };
    (y, saved)
}

/// The backward pass of [`forward_with`], as `conv::backward_slices` returns it: adds the input
/// gradient into `dx` when given, and returns the weight gradient transposed (9 cin x cout) and
/// the bias gradient (empty without a bias), each summed per group and the groups in order.
/// `saved`, what the forward pass kept, replaces transforming `xv` again.
#[allow(clippy::too_many_arguments)]
fn backward_with<const M: usize, const A: usize, R: Rule<M, A>>(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    map: Option<AffineRelu<'_>>,
    wv: &[f32],
    has_bias: bool,
    dy: &[f32],
    dx: Option<Dx<'_>>,
    saved: Option<&Saved>,
) -> (Vec<f32>, Vec<f32>) {
    let (t, cin) = (Tiles::new(g, M).lanes(build), g.cin);
    let (xs, ys, tps) = (cin * g.h * g.w, cout * g.h * g.w, t.per_sample());
    let u = build.run(
        #[inline(always)]
        || transform_weights::<M, A, R>(wv, cout, cin),
    );
    // U^T per tile position (cin x cout), the input gradient's `Panel` factor: small.
    let ut = (dx.is_some() && Panel::applies(build, cin, 16)).then(|| {
        let mut ut = vec![0.0f32; u.len()];
        for (src, dst) in u.chunks_exact(cout * cin).zip(ut.chunks_exact_mut(cout * cin)) {
            transpose(build, src, cin, dst, cout, cout, cin);
        }
        ut
    });
    let panel = Panel::applies(build, cout, cin);
    let tmax = t.spg * tps;
    let (aa, vl, ml) = (A * A, A * A * stride(cin, tmax), A * A * stride(cout, tmax));
    // A task sums the weight and bias gradients of a fixed block of samples (at least
    // BATCH_CHUNK, a whole number of transform groups), one group after another into the same
    // partial sums: one partial per group on 32x32 planes (a group is one sample) made 128
    // partials to allocate and add per step.
    let block = t.spg * BATCH_CHUNK.div_ceil(t.spg);
    let group = |c: usize, dx: Option<Dx<'_>>, scratch: &mut [f32], par: Par| {
        build.run(
            #[inline(always)]
            || {
                let b0 = c * block;
                let b1 = (b0 + block).min(n);
                let (v, rest) = scratch.split_at_mut(vl);
                let (dm, rest) = rest.split_at_mut(ml);
                let (buf, tbuf) = rest.split_at_mut(t.buf_len(tmax));
                let mut du: Vec<f32> = Vec::with_capacity(aa * cout * cin);
                let mut db = vec![0.0f32; if has_bias { cout } else { 0 }];
                let mut dx = dx.map(Dx::into_add);
                for s0 in (b0..b1).step_by(t.spg) {
                    let gs = t.spg.min(b1 - s0);
                    let tt = gs * tps;
                    let (v, dm) =
                        (&mut v[..aa * stride(cin, tt)], &mut dm[..aa * stride(cout, tt)]);
                    let dyg = &dy[s0 * ys..(s0 + gs) * ys];
                    // The group's V: kept by the forward pass, or transformed again here.
                    let vg: &[f32] = match saved {
                        Some(sv) => &sv.v[s0 / t.spg * sv.len..][..aa * stride(cin, tt)],
                        None => {
                            let x = &xv[s0 * xs..(s0 + gs) * xs];
                            input_transform::<M, A, R>(&t, x, map, cin, v, tt, buf);
                            &*v
                        }
                    };
                    output_adjoint::<M, A, R>(&t, dyg, cout, dm, tt, buf);
                    // dU (+)= dM V^T, one product per tile position, with V turned tile-major
                    // first: as they lie, both factors run along the inner dimension (the
                    // tiles), which `gemm` packs one value at a time (`pack_generic_inner_loop`
                    // was a third of these products' time in a one-thread ResNet-20 step,
                    // `perf`, 2026-12-07, Intel Xeon with AVX-512, 2 cores). On AVX-512 the
                    // product is a `Panel`, which broadcasts dM's elements as they lie; elsewhere
                    // (or when `gemm` would thread it) dM is turned around too and `gemm` runs.
                    // Values are only moved, and both sum each element in `gemm`'s chains: the
                    // same bits.
                    for xi in 0..aa {
                        let (dmt, vt) = tbuf.split_at_mut(cout * tt);
                        let vt = &mut vt[..cin * tt];
                        let dmx = &dm[xi * stride(cout, tt)..][..cout * tt];
                        transpose(
                            build,
                            &vg[xi * stride(cin, tt)..][..cin * tt],
                            tt,
                            vt,
                            cin,
                            cin,
                            tt,
                        );
                        let range = xi * cout * cin..(xi + 1) * cout * cin;
                        if panel && par.single() {
                            // dM as it lies (rows of tiles) against V^T: `gemm`'s bits.
                            let product = Panel {
                                m: cout,
                                n: cin,
                                k: tt,
                                lhs: dmx,
                                lrs: tt,
                                rhs: vt,
                                accumulate: s0 > b0,
                            };
                            if s0 > b0 {
                                product.run(&mut du[range]);
                            } else {
                                product.run_uninit(&mut du.spare_capacity_mut()[range]);
                            }
                            continue;
                        }
                        transpose(build, dmx, tt, dmt, cout, cout, tt);
                        let product = Gemm {
                            m: cout,
                            n: cin,
                            k: tt,
                            lhs: Operand { data: dmt, layout: Layout { rs: 1, cs: cout } },
                            rhs: Operand::row_major(vt, cin),
                            accumulate: s0 > b0,
                        };
                        if s0 > b0 {
                            product.run(&mut du[range], Layout::row_major(cin), par);
                        } else {
                            let spare = &mut du.spare_capacity_mut()[range];
                            product.run_uninit(spare, Layout::row_major(cin), par);
                        }
                    }
                    if s0 == b0 {
                        // SAFETY: the products just above wrote all A * A * cout * cin elements.
                        unsafe { du.set_len(aa * cout * cin) };
                    }
                    if has_bias {
                        for dys in dyg.chunks_exact(ys) {
                            for (d, row) in db.iter_mut().zip(dys.chunks_exact(ys / cout)) {
                                *d += sum_f32(row);
                            }
                        }
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        // dV = U^T dM (into V's memory, no longer needed), then its patches;
                        // a `Panel` of U^T's rows where it applies, as in the forward.
                        let ut = ut
                            .as_deref()
                            .filter(|_| Panel::applies(build, cin, tt) && par.single());
                        for xi in 0..aa {
                            if let Some(ut) = ut {
                                Panel {
                                    m: cin,
                                    n: tt,
                                    k: cout,
                                    lhs: &ut[xi * cout * cin..][..cout * cin],
                                    lrs: cout,
                                    rhs: &dm[xi * stride(cout, tt)..][..cout * tt],
                                    accumulate: false,
                                }
                                .run(&mut v[xi * stride(cin, tt)..][..cin * tt]);
                                continue;
                            }
                            Gemm {
                                m: cin,
                                n: tt,
                                k: cout,
                                lhs: Operand::transposed(&u[xi * cout * cin..][..cout * cin], cin),
                                rhs: Operand::row_major(
                                    &dm[xi * stride(cout, tt)..][..cout * tt],
                                    tt,
                                ),
                                accumulate: false,
                            }
                            .run(
                                &mut v[xi * stride(cin, tt)..][..cin * tt],
                                Layout::row_major(tt),
                                par,
                            );
                        }
                        let dxg = &mut dx[(s0 - b0) * xs..(s0 - b0 + gs) * xs];
                        input_adjoint::<M, A, R>(&t, v, cin, tt, dxg, buf);
                    }
                }
                (du, db)
            },
        )
    };
    // V, dM, the transforms' buffer, and dM and V transposed for dU.
    let scratch = vl + ml + t.buf_len(tmax) + (cout + cin) * tmax;
    let run =
        |c: usize, dx: Option<Dx<'_>>, par: Par| with_scratch(scratch, |s| group(c, dx, s, par));
    let groups = n.div_ceil(block);
    let gx = block * xs;
    let partials = super::conv::map_groups(groups, dx, gx, run);
    let (du, db) = super::conv::reduce_in_order(partials).unwrap_or_else(|| {
        (vec![0.0; aa * cout * cin], vec![0.0; if has_bias { cout } else { 0 }])
    });
    let dwt = build.run(
        #[inline(always)]
        || weight_grad_from::<M, A, R>(&du, cout, cin),
    );
    (dwt, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::Conv2dCfg;
    use crate::ops::direct;

    /// (n, cin, cout, h, w): odd and even planes, 1x1 and 2x2 planes, groups of one sample
    /// (32x32) and of many with a partial last group (2x2: 32 samples a group).
    const GEOMS: [(usize, usize, usize, usize, usize); 6] = [
        (3, 2, 3, 5, 7),
        (2, 3, 2, 1, 1),
        (5, 4, 3, 4, 4),
        (2, 2, 5, 8, 6),
        (40, 1, 2, 2, 3),
        (2, 3, 4, 32, 32),
    ];

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        g: Geom,
        n: usize,
        cout: usize,
        x: Vec<f32>,
        w: Vec<f32>,
        b: Vec<f32>,
        dy: Vec<f32>,
    }

    fn case((n, cin, cout, h, w): (usize, usize, usize, usize, usize)) -> Case {
        let g = Geom::new(cin, h, w, Conv2dCfg::new(cout, 3, 1)).unwrap();
        Case {
            g,
            n,
            cout,
            x: values(n * cin * h * w, 1),
            w: values(cout * cin * 9, 2),
            b: values(cout, 3),
            dy: values(n * cout * h * w, 4),
        }
    }

    /// The input pixel under output (oy, ox) at tap (ky, kx), if inside the image.
    fn tap(c: &Case, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<usize> {
        let (iy, ix) = ((oy + ky).checked_sub(1)?, (ox + kx).checked_sub(1)?);
        (iy < c.g.h && ix < c.g.w).then_some(iy * c.g.w + ix)
    }

    /// The convolution, its input and weight gradients summed directly in f64 (an independent
    /// reference), and for each output the sum of its products' magnitudes (the rounding scale).
    #[allow(clippy::type_complexity)]
    fn reference(c: &Case) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let Geom { cin, h, w, .. } = c.g;
        let (pd, cout) = (h * w, c.cout);
        let mut y = vec![0.0f64; c.n * cout * pd];
        let mut ys = vec![0.0f64; y.len()];
        let mut dx = vec![0.0f64; c.x.len()];
        let mut dxs = vec![0.0f64; c.x.len()];
        let mut dw = vec![0.0f64; c.w.len()];
        let mut dws = vec![0.0f64; c.w.len()];
        for s in 0..c.n {
            for co in 0..cout {
                for p in 0..pd {
                    let (oy, ox) = (p / w, p % w);
                    let yi = (s * cout + co) * pd + p;
                    y[yi] = c.b[co] as f64;
                    ys[yi] = (c.b[co] as f64).abs();
                    for ci in 0..cin {
                        for k in 0..9 {
                            let Some(q) = tap(c, oy, ox, k / 3, k % 3) else { continue };
                            let xi = (s * cin + ci) * pd + q;
                            let wi = (co * cin + ci) * 9 + k;
                            let (xv, wv, d) = (c.x[xi] as f64, c.w[wi] as f64, c.dy[yi] as f64);
                            y[yi] += wv * xv;
                            ys[yi] += (wv * xv).abs();
                            dx[xi] += wv * d;
                            dxs[xi] += (wv * d).abs();
                            dw[wi] += xv * d;
                            dws[wi] += (xv * d).abs();
                        }
                    }
                }
            }
        }
        (y, ys, dx, dxs, dw, dws)
    }

    /// Rounding allowed for `rule`, per unit of an output's sum of product magnitudes.
    fn tolerance(rule: Which) -> f64 {
        match rule {
            // f32 rounding of a sum of a few dozen products, through transforms of norm <= 4.
            Which::F2 => 1e-5,
            // Through transforms with coefficients up to 8 (worst seen on these cases: 2.3e-6).
            Which::F4 => 2e-5,
        }
    }

    fn close(what: &str, got: &[f32], want: &[f64], scale: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
            let err = (*g as f64 - w).abs() / (s + 1e-3);
            assert!(err <= tol, "{what}[{i}]: {g} vs {w} (scale {s})");
        }
    }

    fn fwd(rule: Which, build: Build, c: &Case) -> Vec<f32> {
        passes(rule).0(build, &c.g, c.n, c.cout, &c.x, None, &c.w, Some(&c.b), false, None).0
    }

    fn bwd(rule: Which, build: Build, c: &Case, dx: &mut [f32]) -> (Vec<f32>, Vec<f32>) {
        let (g, n, co, dx) = (&c.g, c.n, c.cout, Some(dx));
        passes(rule).1(build, g, n, co, &c.x, None, &c.w, true, &c.dy, dx.map(Dx::Add), None)
    }

    #[test]
    fn forward_and_gradients_equal_the_direct_sums() {
        for (geom, rule) in GEOMS.into_iter().flat_map(|g| [(g, Which::F2), (g, Which::F4)]) {
            let c = case(geom);
            let (y, ys, dx, dxs, dw, dws) = reference(&c);
            let (build, tol) = (Build::selected(), tolerance(rule));
            let got = fwd(rule, build, &c);
            close(&format!("y {geom:?} {rule:?}"), &got, &y, &ys, tol);
            // dx starts non-zero: the gradient is added to it.
            let mut gdx = vec![0.5f32; c.x.len()];
            let (dwt, db) = bwd(rule, build, &c, &mut gdx);
            let gdx: Vec<f32> = gdx.iter().map(|v| v - 0.5).collect();
            close(&format!("dx {geom:?} {rule:?}"), &gdx, &dx, &dxs, tol);
            let kd = c.g.kd();
            let gdw: Vec<f32> = (0..c.w.len()).map(|i| dwt[(i % kd) * c.cout + i / kd]).collect();
            close(&format!("dw {geom:?} {rule:?}"), &gdw, &dw, &dws, tol);
            let pd = c.g.h * c.g.w;
            for (co, d) in db.iter().enumerate() {
                let want: f64 = (0..c.n)
                    .flat_map(|s| &c.dy[(s * c.cout + co) * pd..(s * c.cout + co + 1) * pd])
                    .map(|v| *v as f64)
                    .sum();
                assert!((*d as f64 - want).abs() < 1e-4, "db {geom:?}[{co}]: {d} vs {want}");
            }
        }
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Forward, input and weight gradients of `c` with `build` on a pool of `threads`.
    /// Forward, input and weight gradients of `c` with `rule` and `build` on a pool of `threads`.
    fn run(c: &Case, rule: Which, build: Build, threads: usize) -> [Vec<u32>; 4] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let y = fwd(rule, build, c);
            let mut dx = vec![0.0f32; c.x.len()];
            let (dw, db) = bwd(rule, build, c, &mut dx);
            [bits(&y), bits(&dx), bits(&dw), bits(&db)]
        })
    }

    #[test]
    fn bits_do_not_depend_on_threads_or_build() {
        // 9 groups of one sample (32x32), and 3 blocks of 8 samples with 2 threads; planes of 4
        // and 16 tiles (the transforms of `samples` where the CPU has AVX-512), in blocks of 16
        // samples and partial ones, tiles past the plane's edge (7x7) included.
        let geoms = [(20, 3, 2, 32, 32), (40, 2, 3, 2, 3), (9, 4, 3, 16, 16)];
        let lanes = [(37, 3, 4, 8, 8), (20, 2, 3, 16, 16), (21, 3, 2, 4, 4), (18, 3, 2, 7, 7)];
        for geom in geoms.into_iter().chain(lanes) {
            let c = case(geom);
            for rule in [Which::F2, Which::F4] {
                let one = run(&c, rule, Build::Baseline, 1);
                assert_eq!(one, run(&c, rule, Build::Baseline, 2), "threads {geom:?} {rule:?}");
                if Build::Avx2.available() {
                    assert_eq!(one, run(&c, rule, Build::Avx2, 2), "build {geom:?} {rule:?}");
                }
            }
        }
    }

    #[test]
    fn planes_of_4_and_16_tiles_run_16_samples_a_vector_on_avx512() {
        let avx512 = direct::Isa::detected() == Some(direct::Isa::Avx512);
        for (hw, m, tiles) in [(8, 4, 4), (16, 4, 16), (4, 2, 4), (7, 4, 4), (8, 2, 16)] {
            let g = Geom::new(64, hw, hw, Conv2dCfg::new(64, 3, 1)).unwrap();
            let t = Tiles::new(&g, m);
            assert_eq!(t.per_sample(), tiles);
            assert_eq!(t.lanes(Build::Avx2).lanes, avx512, "{hw}x{hw} F({m}x{m})");
            assert!(!t.lanes(Build::Baseline).lanes);
        }
        // 64 tiles a sample (32x32) keep the portable transforms.
        let g = Geom::new(64, 32, 32, Conv2dCfg::new(64, 3, 1)).unwrap();
        assert!(!Tiles::new(&g, 4).lanes(Build::Avx2).lanes);
    }

    /// Forward and backward of `c` with the forward's `V` kept (`save`) and handed to the
    /// backward, against recomputing it: the same bits; and whether anything was kept.
    fn kept(c: &Case, rule: Which, build: Build, threads: usize) -> ([Vec<u32>; 4], bool) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (g, n, co, b) = (&c.g, c.n, c.cout, Some(&c.b[..]));
            let mut dx = vec![0.0f32; c.x.len()];
            let (forward, backward) = passes(rule);
            let (y, s) = forward(build, g, n, co, &c.x, None, &c.w, b, true, None);
            let dxs = Some(Dx::Add(&mut dx[..]));
            let (dw, db) =
                backward(build, g, n, co, &c.x, None, &c.w, true, &c.dy, dxs, s.as_ref());
            let was_kept = s.is_some();
            ([bits(&y), bits(&dx), bits(&dw), bits(&db)], was_kept)
        })
    }

    #[test]
    fn the_kept_transformed_input_gives_the_same_bits() {
        // One group, several with a partial last one (2x2: 32 samples a group; 8x8: 16), and
        // blocks of 8 one-sample groups (32x32) on 2 threads.
        for geom in [(3, 2, 3, 5, 7), (40, 2, 3, 2, 3), (37, 3, 4, 8, 8), (20, 3, 2, 32, 32)] {
            let c = case(geom);
            for rule in [Which::F2, Which::F4] {
                for (build, threads) in [(Build::Baseline, 1), (Build::selected(), 2)] {
                    let (got, was_kept) = kept(&c, rule, build, threads);
                    assert!(was_kept, "{geom:?} {rule:?}: nothing kept");
                    assert_eq!(got, run(&c, rule, build, threads), "{geom:?} {rule:?} {build:?}");
                }
            }
        }
        // Past MAX_SAVED_BYTES nothing is kept (and the results are the same).
        // Four one-sample groups of 36 x 64 x 1024 floats: 37.7 MB.
        let big = case((4, 64, 1, 128, 128));
        let (got, was_kept) = kept(&big, Which::F4, Build::selected(), 2);
        assert!(!was_kept, "a 37.7 MB V was kept");
        assert_eq!(got, run(&big, Which::F4, Build::selected(), 2));
    }

    /// A Winograd conv handed its input as a norm and ReLU (`direct::AffineRelu`) gives the bits
    /// of the same conv on the mapped input written out: forward, input and weight gradients,
    /// with the transformed input kept and recomputed, in both builds (the 16-samples-a-vector
    /// transforms on planes of 4 and 16 tiles where the CPU has AVX-512, the portable ones on 3x3
    /// tiles of a 12x12 plane and on 7x7's tiles past the edge), sample blocks whole and partial;
    /// per channel a scale and shift of either sign, a NaN and a -0.0 among the stored values.
    /// And the forward's epilogue sees each sample's output exactly once, as it is in the result.
    #[test]
    fn a_mapped_input_and_the_epilogue_give_the_bits_of_the_mapped_tensor() {
        use crate::ops::batch_norm::affine_relu;
        use std::sync::Mutex;
        for geom in [(20, 3, 2, 16, 16), (37, 3, 4, 8, 8), (5, 2, 3, 12, 12), (18, 3, 2, 7, 7)] {
            let mut c = case(geom);
            let (cin, pd) = (c.g.cin, c.g.h * c.g.w);
            (c.x[3], c.x[pd + 5]) = (f32::NAN, -0.0);
            let scale: Vec<f32> = values(cin, 7).iter().map(|v| 2.0 * v).collect();
            let shift = values(cin, 8);
            let mapped = Case {
                x: (c.x.iter().enumerate())
                    .map(|(i, v)| affine_relu(*v, scale[i / pd % cin], shift[i / pd % cin]))
                    .collect(),
                ..case(geom)
            };
            let map = AffineRelu { scale: &scale, shift: &shift };
            for rule in [Which::F2, Which::F4] {
                for build in [Build::Baseline, Build::selected()] {
                    let (forward, backward) = passes(rule);
                    let (g, n, co, b) = (&c.g, c.n, c.cout, Some(&c.b[..]));
                    let ys = co * pd;
                    let seen = Mutex::new(vec![None; n]);
                    let e = |s: usize, yn: &[f32]| {
                        let mut seen = seen.lock().unwrap();
                        assert!(seen[s].is_none(), "sample {s} seen twice");
                        seen[s] = Some(bits(yn));
                    };
                    for save in [true, false] {
                        let (y, sv) =
                            forward(build, g, n, co, &c.x, Some(map), &c.w, b, save, Some(&e));
                        let mut dx = vec![0.0f32; c.x.len()];
                        let dxs = Some(Dx::Add(&mut dx[..]));
                        let (dw, db) = backward(
                            build,
                            g,
                            n,
                            co,
                            &c.x,
                            Some(map),
                            &c.w,
                            true,
                            &c.dy,
                            dxs,
                            sv.as_ref(),
                        );
                        let got = [bits(&y), bits(&dx), bits(&dw), bits(&db)];
                        assert_eq!(
                            got,
                            run(&mapped, rule, build, 1),
                            "{geom:?} {rule:?} {build:?}"
                        );
                        let seen = std::mem::replace(&mut *seen.lock().unwrap(), vec![None; n]);
                        for (s, yn) in seen.into_iter().enumerate() {
                            assert_eq!(yn, Some(bits(&y[s * ys..(s + 1) * ys])), "epilogue {s}");
                        }
                    }
                }
            }
        }
    }

    /// `cpu::transpose` as the weight gradient calls it, against a plain loop, and the weight
    /// gradient's product `dU = dM V^T` from the transposed factors against the
    /// same product on the factors as they lie: the same bits (`gemm` sums each element in one
    /// chain whatever the layout), on `gemm`'s small-size branch and outside it.
    #[test]
    fn the_transposed_factors_give_the_same_product() {
        for (cout, cin, tt) in [(32, 32, 256), (64, 64, 256), (128, 128, 64), (20, 37, 100)] {
            let (dm, v) = (values(cout * tt, 11), values(cin * tt, 12));
            let (mut dmt, mut vt) = (vec![f32::NAN; cout * tt], vec![f32::NAN; cin * tt]);
            transpose(Build::selected(), &dm, tt, &mut dmt, cout, cout, tt);
            transpose(Build::selected(), &v, tt, &mut vt, cin, cin, tt);
            for (c, row) in dmt.chunks_exact(cout).enumerate() {
                for (r, x) in row.iter().enumerate() {
                    assert_eq!(x.to_bits(), dm[r * tt + c].to_bits(), "{cout} x {tt} at {r}, {c}");
                }
            }
            let product = |lhs, rhs| {
                let mut du = vec![0.25f32; cout * cin];
                let g = Gemm { m: cout, n: cin, k: tt, lhs, rhs, accumulate: true };
                g.run(&mut du, Layout::row_major(cin), Par::Seq);
                bits(&du)
            };
            let as_they_lie = product(Operand::row_major(&dm, tt), Operand::transposed(&v, tt));
            let transposed = product(
                Operand { data: &dmt, layout: Layout { rs: 1, cs: cout } },
                Operand::row_major(&vt, cin),
            );
            assert_eq!(as_they_lie, transposed, "{cout} x {cin} x {tt}");
        }
    }

    #[test]
    fn applies_where_it_was_measured_faster() {
        let geom = |c: usize, hw: usize| Geom::new(c, hw, hw, Conv2dCfg::new(c, 3, 1)).unwrap();
        // ResNet-18's 3x3 stride-1 convs, ConvNet-3's 16x16 and 8x8 ones and MNIST's 14x14 and
        // 7x7, ResNet-20's second and third stages (32 channels on 16x16, 64 on 8x8), and the
        // planes measured faster from 32 channels (see MIN_CHANNELS).
        for (c, hw) in [(64, 32), (128, 16), (256, 8), (512, 4), (128, 8), (128, 14), (128, 7)]
            .into_iter()
            .chain([(64, 8), (64, 6), (64, 4), (64, 3), (64, 2), (128, 12), (256, 1)])
            .chain([(32, 16), (32, 8), (32, 4), (32, 14), (48, 16), (48, 8), (32, 32)])
        {
            assert!(applies(&geom(c, hw), c), "{c} channels {hw}x{hw}");
        }
        // ResNet-20's first stage and stem (the direct kernels), fewer than 32 channels on any
        // plane, and planes the tiles cover less than half of: 5x5 (F(4x4, 3x3)'s 8x8) and
        // 1x1 (F(2x2, 3x3)'s 2x2) below 256 channels.
        for (c, hw) in [(16, 32), (16, 16), (24, 16), (32, 5), (64, 5), (128, 5), (128, 1)] {
            assert!(!applies(&geom(c, hw), c), "{c} channels {hw}x{hw}");
        }
        // The smaller of the two channel counts decides.
        let wide_out = Geom::new(16, 8, 8, Conv2dCfg::new(256, 3, 1)).unwrap();
        assert!(!applies(&wide_out, 256));
        // Only 3x3 "same" convolutions at stride 1.
        let strided = Geom::new(128, 32, 32, Conv2dCfg::new(256, 3, 1).with_stride(2)).unwrap();
        assert!(!applies(&strided, 256));
        assert!(!applies(&Geom::new(128, 16, 16, Conv2dCfg::new(128, 1, 0)).unwrap(), 128));
        assert!(!applies(&Geom::new(128, 16, 16, Conv2dCfg::new(128, 3, 0)).unwrap(), 128));
        // F(4x4, 3x3) down to 8x8 (and MNIST's 7x7: 2x2 tiles), F(2x2, 3x3) on 4x4 and below.
        for hw in [32, 16, 8, 7, 5] {
            assert_eq!(which(&geom(256, hw)), Which::F4, "{hw}x{hw}");
        }
        for hw in [4, 3, 1] {
            assert_eq!(which(&geom(512, hw)), Which::F2, "{hw}x{hw}");
        }
    }
}
