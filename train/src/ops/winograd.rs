//! 3x3 "same" convolutions (stride 1, padding 1) with many channels as Winograd's minimal
//! filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
//! 2016): each 2x2 block of outputs ("tile") is `A^T [(G g G^T) . (B^T d B)] A` for the 4x4 input
//! patch `d` under it, so a tile costs 16 multiplies per channel pair instead of 36. Summed over
//! input channels, the 16 element-wise products become 16 matrix products (one per position of
//! the 4x4 transformed tile), which run on `gemm`.
//!
//! The backward pass is the exact adjoint of that forward (the gradient of the function it
//! computes): the output gradient goes through `A . A^T`, the input gradient is
//! `B (U^T dM) B^T` scattered onto the overlapping patches, and the weight gradient is
//! `G^T (dM V^T) G`. The transforms' coefficients are 0, +-1 and 1/2, so they only add, subtract
//! and halve (no multiply-adds to contract: the same bits in every build). The results round
//! differently from a direct sum over the 9 taps (tests: against f64 direct sums within float
//! tolerance, and against central differences through the tape op in `tests/ops.rs`).
//!
//! Layouts (per group of samples, `t` = the group's tiles, sample-major, then tile rows):
//! weights `U[16][cout][cin]`, transformed input `V[16][cin][t]`, products `M[16][cout][t]`.
//! Samples go in fixed groups (a number that depends on the plane size alone); the weight and
//! bias gradients are summed over fixed blocks of samples (8, or one group of more), group after
//! group, and the blocks added in order, so results are bit-identical for any thread count, as
//! everywhere in `ops`.

use std::mem::MaybeUninit;

use super::conv::Geom;
use super::gemm::{Gemm, Layout, Operand, Par};
use super::{sum_f32, with_scratch, BATCH_CHUNK};
use crate::cpu::Build;

/// Channels (in and out) from which a 3x3 "same" convolution on a plane of at least
/// [`MIN_PIXELS`] runs here, and from which it does on any plane. Measured one layer at a time
/// (forward + backward, batch 128, one thread, against im2col + `gemm`; 2026-12-06, Intel Xeon
/// with AVX-512, 2 cores): 64 channels 32x32 even (270 vs 274 ms), 128 16x16 faster (199 vs 233),
/// 128 8x8 even (58 vs 59), 64 8x8 slower (22 vs 19), 256 8x8 and 512 4x4 much faster (197 vs
/// 281, 226 vs 413). Below these the 16 products per group are too thin for `gemm`.
const MIN_CHANNELS: usize = 64;
/// See [`MIN_CHANNELS`].
const MIN_PIXELS: usize = 256;
/// See [`MIN_CHANNELS`].
const ANY_PLANE_CHANNELS: usize = 256;

/// Tiles per group, the inner dimension of the weight gradient's products and the width of the
/// forward's: enough samples of a small plane go together to reach it, up to [`MAX_GROUP`].
const GROUP_TILES: usize = 256;
/// Samples per group at most.
const MAX_GROUP: usize = 32;

/// Whether the convolution `g` with `cout` output channels runs as Winograd F(2x2, 3x3).
pub(crate) fn applies(g: &Geom, cout: usize) -> bool {
    let ch = g.cin.min(cout);
    let big = ch >= ANY_PLANE_CHANNELS || (ch >= MIN_CHANNELS && g.h * g.w >= MIN_PIXELS);
    g.k == 3 && g.p == 1 && g.same() && big
}

/// The tile grid of one plane and the samples per group.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    h: usize,
    w: usize,
    /// Tile rows and columns: ceil(h / 2), ceil(w / 2).
    th: usize,
    tw: usize,
    /// Samples per group.
    spg: usize,
}

impl Tiles {
    fn new(g: &Geom) -> Tiles {
        let (th, tw) = (g.h.div_ceil(2), g.w.div_ceil(2));
        let spg = (GROUP_TILES / (th * tw)).clamp(1, MAX_GROUP);
        Tiles { h: g.h, w: g.w, th, tw, spg }
    }
    /// Tiles per sample.
    fn per_sample(&self) -> usize {
        self.th * self.tw
    }
    /// Rows of the zero-padded plane the tiles read: 2 th + 2.
    fn padded_rows(&self) -> usize {
        2 * self.th + 2
    }
    /// Floats of the transforms' work buffer: 16 pieces over a group's tiles, 4 more, and a few
    /// rows.
    fn buf_len(&self) -> usize {
        20 * self.spg * self.per_sample() + 8 * (self.tw + 1)
    }
}

/// Floats between consecutive tile positions' matrices in the transformed input and products
/// (`rows` x `tt` each): one cache line more than the matrix, so the 16 rows a transform reads or
/// writes at once do not all fall in one L1 set (a 64x256 matrix is 64 KiB, a multiple of the
/// 4 KiB that maps to one set).
fn stride(rows: usize, tt: usize) -> usize {
    rows * tt + 16
}

/// `U = G g G^T` for every (output, input) channel pair, laid out `[16][cout][cin]`.
/// G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
fn transform_weights(wv: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let plane = cout * cin;
    let mut u = vec![0.0f32; 16 * plane];
    // A block of pairs at a time into `blk` ([16][BLOCK]), then 16 row copies: writing each
    // pair's 16 values straight to planes 4 KiB-multiples apart thrashes one L1 set.
    const BLOCK: usize = 64;
    let mut blk = [[0.0f32; BLOCK]; 16];
    for (bi, gs) in wv.chunks(9 * BLOCK).enumerate() {
        for (p, g) in gs.chunks_exact(9).enumerate() {
            let mut gg = [[0.0f32; 3]; 4];
            for x in 0..3 {
                let (a, b, c) = (g[x], g[3 + x], g[6 + x]);
                gg[0][x] = a;
                gg[1][x] = 0.5 * (a + b + c);
                gg[2][x] = 0.5 * (a - b + c);
                gg[3][x] = c;
            }
            for (r, &[a, b, c]) in gg.iter().enumerate() {
                let row = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                for (q, v) in row.into_iter().enumerate() {
                    blk[r * 4 + q][p] = v;
                }
            }
        }
        let n = gs.len() / 9;
        for (xi, src) in blk.iter().enumerate() {
            u[xi * plane + bi * BLOCK..][..n].copy_from_slice(&src[..n]);
        }
    }
    u
}

/// The adjoint of [`transform_weights`] on a gradient `du` (`[16][cout][cin]`): `G^T dU G`,
/// written transposed (9 cin x cout, as `conv::backward_slices` returns weight gradients).
// The loops' indices address several arrays at once (a pair's 16 values, its 3x4 half-way sums).
#[allow(clippy::needless_range_loop)]
fn weight_grad_from(du: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let plane = cout * cin;
    let mut dwt = vec![0.0f32; 9 * plane];
    const BLOCK: usize = 64;
    let mut blk = [[0.0f32; BLOCK]; 16];
    for b0 in (0..plane).step_by(BLOCK) {
        let n = BLOCK.min(plane - b0);
        for (xi, dst) in blk.iter_mut().enumerate() {
            dst[..n].copy_from_slice(&du[xi * plane + b0..][..n]);
        }
        for p in 0..n {
            let (co, ci) = ((b0 + p) / cin, (b0 + p) % cin);
            let d = |a: usize, q: usize| blk[a * 4 + q][p];
            // Rows: P[ky][q] = sum_a G[a][ky] dU[a][q].
            let mut pm = [[0.0f32; 4]; 3];
            for q in 0..4 {
                let (u0, u1, u2, u3) = (d(0, q), d(1, q), d(2, q), d(3, q));
                pm[0][q] = u0 + 0.5 * (u1 + u2);
                pm[1][q] = 0.5 * (u1 - u2);
                pm[2][q] = 0.5 * (u1 + u2) + u3;
            }
            for (ky, [u0, u1, u2, u3]) in pm.into_iter().enumerate() {
                let row = [u0 + 0.5 * (u1 + u2), 0.5 * (u1 - u2), 0.5 * (u1 + u2) + u3];
                for (kx, v) in row.into_iter().enumerate() {
                    dwt[(ci * 9 + ky * 3 + kx) * cout + co] = v;
                }
            }
        }
    }
    dwt
}

/// `B^T d` along a padded row, for every tile column at once: `e` and `o` are the row's even and
/// odd padded columns (tw + 1 each; padded column c is input column c - 1); writes the four
/// components (`out`, 4 x tw). B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
#[inline(always)]
fn columns(e: &[f32], o: &[f32], tw: usize, dst: [&mut [f32]; 4]) {
    let (e0, e1, o0, o1) = (&e[..tw], &e[1..tw + 1], &o[..tw], &o[1..tw + 1]);
    fan(tw, [e0, e1, o0, o1], dst, |[e0, e1, o0, o1]| [e0 - e1, o0 + e1, e1 - o0, o0 - o1]);
}

/// Splits an input row (`row`, w long) into its padded plane's even and odd columns (tw + 1
/// each, zeros outside the row).
#[inline(always)]
fn split_row(row: &[f32], e: &mut [f32], o: &mut [f32]) {
    // Input column 2q is padded column 2q + 1 (odd: o[q]); input column 2q + 1 is e[q + 1].
    e[0] = 0.0;
    let pairs = row.chunks_exact(2);
    let last = pairs.remainder().first().copied();
    let n = row.len() / 2;
    for (q, p) in pairs.enumerate() {
        o[q] = p[0];
        e[q + 1] = p[1];
    }
    o[n..].fill(0.0);
    e[n + 1..].fill(0.0);
    if let Some(v) = last {
        o[n] = v;
    }
}

/// The first `N` consecutive pieces of `n` floats of `v`.
#[inline(always)]
fn split<const N: usize>(v: &mut [f32], n: usize) -> [&mut [f32]; N] {
    let mut it = v.chunks_exact_mut(n);
    std::array::from_fn(|_| it.next().expect("winograd: buffer too short"))
}

/// The `n` floats at `off` of each of the 16 matrices (`stride` apart) of a transformed buffer.
#[inline(always)]
fn planes_mut(v: &mut [f32], stride: usize, off: usize, n: usize) -> [&mut [f32]; 16] {
    let mut it = v.chunks_mut(stride);
    std::array::from_fn(|_| &mut it.next().expect("winograd: buffer too short")[off..off + n])
}

/// [`planes_mut`], read only.
#[inline(always)]
fn planes(v: &[f32], stride: usize, off: usize, n: usize) -> [&[f32]; 16] {
    std::array::from_fn(|xi| &v[xi * stride + off..][..n])
}

/// Four groups of four, one after another.
#[inline(always)]
fn concat4(p: [[f32; 4]; 4]) -> [f32; 16] {
    let [a, b, c, d] = p;
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

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

/// `V = B^T d B` for every tile of `gs` samples (`x`, (gs, cin, h, w)): `v` is `[16][cin][tt]`
/// (matrices [`stride`] apart), the group's tile `s * tiles + i * tw + j` at that column.
/// Channel by channel: first each padded row's column transform (`columns`) goes to the two
/// tile rows that read it, as `[k][b]` pieces over all the group's tiles (`g`, 16 x tt), then
/// one pass along the rows over all tt tiles at once.
#[inline(always)]
fn input_transform(t: &Tiles, x: &[f32], cin: usize, v: &mut [f32], tt: usize, buf: &mut [f32]) {
    let (h, w, th, tw) = (t.h, t.w, t.th, t.tw);
    let (tps, st, plane) = (t.per_sample(), stride(cin, tt), h * w);
    let (g, rest) = buf.split_at_mut(16 * tt);
    let (e, rest) = rest.split_at_mut(tw + 1);
    let o = &mut rest[..tw + 1];
    for c in 0..cin {
        for s in 0..tt / tps {
            let xc = &x[(s * cin + c) * plane..(s * cin + c + 1) * plane];
            for r in 0..t.padded_rows() {
                if r == 0 || r > h {
                    e.fill(0.0);
                    o.fill(0.0);
                } else {
                    split_row(&xc[(r - 1) * w..r * w], e, o);
                }
                // Padded row r is row k = r % 2 of tile row r / 2 and k + 2 of tile row r / 2 - 1
                // (its column transform is computed for each: cheaper than copying it).
                for (i, k) in [(r / 2, r % 2), ((r / 2).wrapping_sub(1), r % 2 + 2)] {
                    if i < th {
                        let at = s * tps + i * tw;
                        let (d0, rest) = g[k * 4 * tt + at..].split_at_mut(tt);
                        let (d1, rest) = rest.split_at_mut(tt);
                        let (d2, d3) = rest.split_at_mut(tt);
                        columns(e, o, tw, [d0, d1, d2, d3]);
                    }
                }
            }
        }
        let mut it = g.chunks_exact(tt);
        let src: [&[f32]; 16] = std::array::from_fn(|_| it.next().expect("pieces"));
        fan(tt, src, planes_mut(v, st, c * tt, tt), |r| {
            // Along the rows: R0 - R2, R1 + R2, R2 - R1, R1 - R3 for each component b.
            // Component b of each: r[b], r[4 + b], r[8 + b], r[12 + b] are rows 0..3.
            let t = |a: usize| -> [f32; 4] {
                let row = |k: usize| [r[4 * k], r[4 * k + 1], r[4 * k + 2], r[4 * k + 3]];
                let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                match a {
                    0 => [r0[0] - r2[0], r0[1] - r2[1], r0[2] - r2[2], r0[3] - r2[3]],
                    1 => [r1[0] + r2[0], r1[1] + r2[1], r1[2] + r2[2], r1[3] + r2[3]],
                    2 => [r2[0] - r1[0], r2[1] - r1[1], r2[2] - r1[2], r2[3] - r1[3]],
                    _ => [r1[0] - r3[0], r1[1] - r3[1], r1[2] - r3[2], r1[3] - r3[3]],
                }
            };
            concat4([t(0), t(1), t(2), t(3)])
        });
    }
}

/// `A^T M A` for every tile of `gs` samples: `m` is `[16][cout][tt]`; writes every element of
/// `y` ((gs, cout, h, w)), plus the bias. A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]. Channel by
/// channel: one pass over all tt tiles into each tile's two rows' even and odd outputs, then
/// those interleaved into the planes.
#[inline(always)]
fn output_transform(
    t: &Tiles,
    m: &[f32],
    tt: usize,
    cout: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    buf: &mut [f32],
) {
    let (h, w, tw, tps) = (t.h, t.w, t.tw, t.per_sample());
    let (st, plane) = (stride(cout, tt), h * w);
    let rows = &mut buf[..4 * tt];
    for co in 0..cout {
        let b = bias.map_or(0.0, |b| b[co]);
        let has_bias = bias.is_some();
        fan(tt, planes(m, st, co * tt, tt), split::<4>(rows, tt), |mm| {
            let s0 = |q: usize| mm[q] + mm[4 + q] + mm[8 + q];
            let s1 = |q: usize| mm[4 + q] - mm[8 + q] - mm[12 + q];
            let (a0, a1, a2, a3) = (s0(0), s0(1), s0(2), s0(3));
            let (b0, b1, b2, b3) = (s1(0), s1(1), s1(2), s1(3));
            let out = [a0 + a1 + a2, a1 - a2 - a3, b0 + b1 + b2, b1 - b2 - b3];
            if has_bias {
                [out[0] + b, out[1] + b, out[2] + b, out[3] + b]
            } else {
                out
            }
        });
        for s in 0..tt / tps {
            let yc = &mut y[(s * cout + co) * plane..(s * cout + co + 1) * plane];
            for oy in 0..h {
                let (i, r) = (oy / 2, oy % 2);
                let at = s * tps + i * tw;
                let e = &rows[2 * r * tt + at..][..tw];
                let o = &rows[(2 * r + 1) * tt + at..][..tw];
                let row = &mut yc[oy * w..(oy + 1) * w];
                let mut pairs = row.chunks_exact_mut(2);
                for ((pair, &ev), &ov) in (&mut pairs).zip(e).zip(o) {
                    pair[0].write(ev);
                    pair[1].write(ov);
                }
                if let Some(last) = pairs.into_remainder().first_mut() {
                    last.write(e[w / 2]);
                }
            }
        }
    }
}

/// The adjoint of [`output_transform`] (without the bias): `dM = A dY A^T` for every tile of
/// `gs` samples' output gradient `dy` ((gs, cout, h, w)), written to `dm` (`[16][cout][tt]`).
#[inline(always)]
fn output_adjoint(t: &Tiles, dy: &[f32], cout: usize, dm: &mut [f32], tt: usize, buf: &mut [f32]) {
    let (h, w, th, tw, tps) = (t.h, t.w, t.th, t.tw, t.per_sample());
    let (st, plane) = (stride(cout, tt), h * w);
    let rows = &mut buf[..4 * tt];
    for co in 0..cout {
        // Each tile's two output rows' even and odd columns (zeros outside the plane).
        for s in 0..tt / tps {
            let dyc = &dy[(s * cout + co) * plane..(s * cout + co + 1) * plane];
            for oy in 0..2 * th {
                let (i, r) = (oy / 2, oy % 2);
                let at = s * tps + i * tw;
                let (e, rest) = rows[2 * r * tt + at..].split_at_mut(tt);
                let (e, o) = (&mut e[..tw], &mut rest[..tw]);
                if oy >= h {
                    e.fill(0.0);
                    o.fill(0.0);
                    continue;
                }
                let pairs = dyc[oy * w..(oy + 1) * w].chunks_exact(2);
                let last = pairs.remainder().first().copied();
                for ((p, ev), ov) in pairs.zip(e.iter_mut()).zip(o.iter_mut()) {
                    *ev = p[0];
                    *ov = p[1];
                }
                if let Some(v) = last {
                    e[w / 2] = v;
                    o[w / 2] = 0.0;
                }
            }
        }
        let mut it = rows.chunks_exact(tt);
        let src: [&[f32]; 4] = std::array::from_fn(|_| it.next().expect("rows"));
        fan(tt, src, planes_mut(dm, st, co * tt, tt), |[a, b, c, d]| {
            let s0 = [a, a + b, a - b, -b];
            let s1 = [c, c + d, c - d, -d];
            concat4([
                s0,
                [s0[0] + s1[0], s0[1] + s1[1], s0[2] + s1[2], s0[3] + s1[3]],
                [s0[0] - s1[0], s0[1] - s1[1], s0[2] - s1[2], s0[3] - s1[3]],
                [-s1[0], -s1[1], -s1[2], -s1[3]],
            ])
        });
    }
}

/// The adjoint of [`input_transform`]: adds `B dV B^T` of every tile, over the overlapping 4x4
/// patches, into `gs` samples' input gradient `dx` ((gs, cin, h, w)); `dv` is `[16][cin][tt]`.
#[inline(always)]
fn input_adjoint(t: &Tiles, dv: &[f32], cin: usize, tt: usize, dx: &mut [f32], buf: &mut [f32]) {
    let (h, w, th, tw, tps) = (t.h, t.w, t.th, t.tw, t.per_sample());
    let (st, plane) = (stride(cin, tt), h * w);
    let g = &mut buf[..16 * tt];
    for c in 0..cin {
        // For every tile, on each of its four padded rows k: the gradient of that row's even
        // and odd padded columns under the tile's left half (columns 2j, 2j + 1) and right half
        // (2j + 2, 2j + 3), [k][eL, oL, eR, oR] over the group's tiles, in one pass.
        fan(tt, planes(dv, st, c * tt, tt), split::<16>(g, tt), |v| {
            // The adjoint of the rows' transform: row k's column components b = 0..3.
            let comp = |b: usize| {
                let (v0, v1, v2, v3) = (v[b], v[4 + b], v[8 + b], v[12 + b]);
                [v0, v1 - v2 + v3, v1 + v2 - v0, -v3]
            };
            let (c0, c1, c2, c3) = (comp(0), comp(1), comp(2), comp(3));
            // The adjoint of `columns` on each row.
            let row = |k: usize| [c0[k], c1[k] - c2[k] + c3[k], c1[k] + c2[k] - c0[k], -c3[k]];
            concat4([row(0), row(1), row(2), row(3)])
        });
        for s in 0..tt / tps {
            let dxc = &mut dx[(s * cin + c) * plane..(s * cin + c + 1) * plane];
            for i in 0..th {
                for k in 0..4 {
                    // Padded row 2i + k is input row 2i + k - 1; padding rows are dropped.
                    let r = 2 * i + k;
                    if r == 0 || r > h {
                        continue;
                    }
                    let at = s * tps + i * tw;
                    let piece = |m: usize| &g[(k * 4 + m) * tt + at..][..tw];
                    let (el, ol, er, or) = (piece(0), piece(1), piece(2), piece(3));
                    let row = &mut dxc[(r - 1) * w..r * w];
                    // Padded column 2j is input column 2j - 1: the left half's odd column and the
                    // right half's even one land on input columns 2j, 2j + 1 ...
                    let mut pairs = row.chunks_exact_mut(2);
                    for ((p, o), e) in (&mut pairs).zip(ol).zip(er) {
                        p[0] += o;
                        p[1] += e;
                    }
                    if let Some(last) = pairs.into_remainder().first_mut() {
                        *last += ol[w / 2];
                    }
                    // ... and the next tile's left even column and this one's right odd column
                    // on 2j + 1, 2j + 2 (tile 0's left even column is padding).
                    for ((p, e), o) in row[1..].chunks_exact_mut(2).zip(&el[1..]).zip(or) {
                        p[0] += e;
                        p[1] += o;
                    }
                }
            }
        }
    }
}

/// The forward pass of a convolution [`applies`] holds for: `n` samples `xv` ((n, cin, h, w)),
/// weights `wv` ((cout, cin, 3, 3)), bias `bv`; returns the (n, cout, h, w) output.
pub(crate) fn forward(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    wv: &[f32],
    bv: Option<&[f32]>,
) -> Vec<f32> {
    let (t, cin) = (Tiles::new(g), g.cin);
    let (xs, ys, tps) = (cin * g.h * g.w, cout * g.h * g.w, t.per_sample());
    assert_eq!(xv.len(), n * xs, "conv2d: input of {} values, expected {n} x {xs}", xv.len());
    let u = transform_weights(wv, cout, cin);
    let tmax = t.spg * tps;
    let (vl, ml) = (16 * stride(cin, tmax), 16 * stride(cout, tmax));
    let group = |c: usize, yc: &mut [MaybeUninit<f32>], scratch: &mut [f32], par: Par| {
        build.run(
            #[inline(always)]
            || {
                let (gs, s0) = (yc.len() / ys, c * t.spg);
                let tt = gs * tps;
                let (v, rest) = scratch.split_at_mut(vl);
                let (m, buf) = rest.split_at_mut(ml);
                let (v, m) = (&mut v[..16 * stride(cin, tt)], &mut m[..16 * stride(cout, tt)]);
                input_transform(&t, &xv[s0 * xs..(s0 + gs) * xs], cin, v, tt, buf);
                for xi in 0..16 {
                    Gemm {
                        m: cout,
                        n: tt,
                        k: cin,
                        lhs: Operand::row_major(&u[xi * cout * cin..(xi + 1) * cout * cin], cin),
                        rhs: Operand::row_major(&v[xi * stride(cin, tt)..][..cin * tt], tt),
                        accumulate: false,
                    }
                    .run(
                        &mut m[xi * stride(cout, tt)..][..cout * tt],
                        Layout::row_major(tt),
                        par,
                    );
                }
                output_transform(&t, m, tt, cout, bv, yc, buf);
            },
        )
    };
    let scratch = vl + ml + t.buf_len();
    let mut y: Vec<f32> = Vec::with_capacity(n * ys);
    let spare = &mut y.spare_capacity_mut()[..n * ys];
    super::conv::write_chunks(spare, t.spg * ys, scratch, group);
    // SAFETY: `output_transform` wrote every element of every chunk of `spare`.
    unsafe { y.set_len(n * ys) };
    y
}

/// The backward pass of [`forward`], as `conv::backward_slices` returns it: adds the input
/// gradient into `dx` when given, and returns the weight gradient transposed (9 cin x cout) and
/// the bias gradient (empty without a bias), each summed per group and the groups in order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    wv: &[f32],
    has_bias: bool,
    dy: &[f32],
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let (t, cin) = (Tiles::new(g), g.cin);
    let (xs, ys, tps) = (cin * g.h * g.w, cout * g.h * g.w, t.per_sample());
    let u = transform_weights(wv, cout, cin);
    let tmax = t.spg * tps;
    let (vl, ml) = (16 * stride(cin, tmax), 16 * stride(cout, tmax));
    // A task sums the weight and bias gradients of a fixed block of samples (at least
    // BATCH_CHUNK, a whole number of transform groups), one group after another into the same
    // partial sums: one partial per group on 32x32 planes (a group is one sample) made 128
    // partials to allocate and add per step.
    let block = t.spg * BATCH_CHUNK.div_ceil(t.spg);
    let group = |c: usize, dx: Option<&mut [f32]>, scratch: &mut [f32], par: Par| {
        build.run(
            #[inline(always)]
            || {
                let b0 = c * block;
                let b1 = (b0 + block).min(n);
                let (v, rest) = scratch.split_at_mut(vl);
                let (dm, buf) = rest.split_at_mut(ml);
                let mut du: Vec<f32> = Vec::with_capacity(16 * cout * cin);
                let mut db = vec![0.0f32; if has_bias { cout } else { 0 }];
                let mut dx = dx;
                for s0 in (b0..b1).step_by(t.spg) {
                    let gs = t.spg.min(b1 - s0);
                    let tt = gs * tps;
                    let (v, dm) =
                        (&mut v[..16 * stride(cin, tt)], &mut dm[..16 * stride(cout, tt)]);
                    let dyg = &dy[s0 * ys..(s0 + gs) * ys];
                    input_transform(&t, &xv[s0 * xs..(s0 + gs) * xs], cin, v, tt, buf);
                    output_adjoint(&t, dyg, cout, dm, tt, buf);
                    // dU (+)= dM V^T, one product per tile position.
                    for xi in 0..16 {
                        let product = Gemm {
                            m: cout,
                            n: cin,
                            k: tt,
                            lhs: Operand::row_major(&dm[xi * stride(cout, tt)..][..cout * tt], tt),
                            rhs: Operand::transposed(&v[xi * stride(cin, tt)..][..cin * tt], tt),
                            accumulate: s0 > b0,
                        };
                        let range = xi * cout * cin..(xi + 1) * cout * cin;
                        if s0 > b0 {
                            product.run(&mut du[range], Layout::row_major(cin), par);
                        } else {
                            let spare = &mut du.spare_capacity_mut()[range];
                            product.run_uninit(spare, Layout::row_major(cin), par);
                        }
                    }
                    if s0 == b0 {
                        // SAFETY: the 16 products just above wrote all 16 cout x cin elements.
                        unsafe { du.set_len(16 * cout * cin) };
                    }
                    if has_bias {
                        for dys in dyg.chunks_exact(ys) {
                            for (d, row) in db.iter_mut().zip(dys.chunks_exact(ys / cout)) {
                                *d += sum_f32(row);
                            }
                        }
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        // dV = U^T dM (into V's memory, no longer needed), then its patches.
                        for xi in 0..16 {
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
                        input_adjoint(&t, v, cin, tt, dxg, buf);
                    }
                }
                (du, db)
            },
        )
    };
    let scratch = vl + ml + t.buf_len();
    let run = |c: usize, dx: Option<&mut [f32]>, par: Par| {
        with_scratch(scratch, |s| group(c, dx, s, par))
    };
    let groups = n.div_ceil(block);
    let gx = block * xs;
    let partials = super::conv::map_groups(groups, dx, gx, run);
    let (du, db) = super::conv::reduce_in_order(partials).unwrap_or_else(|| {
        (vec![0.0; 16 * cout * cin], vec![0.0; if has_bias { cout } else { 0 }])
    });
    (weight_grad_from(&du, cout, cin), db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv::Conv2dCfg;

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

    fn close(what: &str, got: &[f32], want: &[f64], scale: &[f64]) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
            // f32 rounding of a sum of a few dozen products, through transforms of norm <= 4.
            let tol = 1e-5 * (s + 1e-3);
            assert!((*g as f64 - w).abs() <= tol, "{what}[{i}]: {g} vs {w} (scale {s})");
        }
    }

    #[test]
    fn forward_and_gradients_equal_the_direct_sums() {
        for geom in GEOMS {
            let c = case(geom);
            let (y, ys, dx, dxs, dw, dws) = reference(&c);
            let build = Build::selected();
            let got = forward(build, &c.g, c.n, c.cout, &c.x, &c.w, Some(&c.b));
            close(&format!("y {geom:?}"), &got, &y, &ys);
            // dx starts non-zero: the gradient is added to it.
            let mut gdx = vec![0.5f32; c.x.len()];
            let (dwt, db) =
                backward(build, &c.g, c.n, c.cout, &c.x, &c.w, true, &c.dy, Some(&mut gdx));
            let gdx: Vec<f32> = gdx.iter().map(|v| v - 0.5).collect();
            close(&format!("dx {geom:?}"), &gdx, &dx, &dxs);
            let kd = c.g.kd();
            let gdw: Vec<f32> = (0..c.w.len()).map(|i| dwt[(i % kd) * c.cout + i / kd]).collect();
            close(&format!("dw {geom:?}"), &gdw, &dw, &dws);
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
    fn run(c: &Case, build: Build, threads: usize) -> [Vec<u32>; 4] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let y = forward(build, &c.g, c.n, c.cout, &c.x, &c.w, Some(&c.b));
            let mut dx = vec![0.0f32; c.x.len()];
            let (dw, db) =
                backward(build, &c.g, c.n, c.cout, &c.x, &c.w, true, &c.dy, Some(&mut dx));
            [bits(&y), bits(&dx), bits(&dw), bits(&db)]
        })
    }

    #[test]
    fn bits_do_not_depend_on_threads_or_build() {
        // 9 groups of one sample (32x32), and 3 blocks of 8 samples with 2 threads.
        for geom in [(20, 3, 2, 32, 32), (40, 2, 3, 2, 3), (9, 4, 3, 16, 16)] {
            let c = case(geom);
            let one = run(&c, Build::Baseline, 1);
            assert_eq!(one, run(&c, Build::Baseline, 2), "threads {geom:?}");
            if Build::Avx2.available() {
                assert_eq!(one, run(&c, Build::Avx2, 2), "build {geom:?}");
            }
        }
    }

    #[test]
    fn applies_where_it_was_measured_faster() {
        let geom = |c: usize, hw: usize| Geom::new(c, hw, hw, Conv2dCfg::new(c, 3, 1)).unwrap();
        // ResNet-18's 3x3 stride-1 convs and ConvNet-3's 16x16 one.
        for (c, hw) in [(64, 32), (128, 16), (256, 8), (512, 4)] {
            assert!(applies(&geom(c, hw), c), "{c} channels {hw}x{hw}");
        }
        // ResNet-20's (at most 64 channels on 8x8), ConvNet-3's 8x8 and MNIST's 14x14 and 7x7.
        for (c, hw) in [(16, 32), (32, 16), (64, 8), (128, 8), (128, 14), (128, 7)] {
            assert!(!applies(&geom(c, hw), c), "{c} channels {hw}x{hw}");
        }
        // Only 3x3 "same" convolutions at stride 1.
        let strided = Geom::new(128, 32, 32, Conv2dCfg::new(256, 3, 1).with_stride(2)).unwrap();
        assert!(!applies(&strided, 256));
        assert!(!applies(&Geom::new(128, 16, 16, Conv2dCfg::new(128, 1, 0)).unwrap(), 128));
        assert!(!applies(&Geom::new(128, 16, 16, Conv2dCfg::new(128, 3, 0)).unwrap(), 128));
    }
}
