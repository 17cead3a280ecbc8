//! The four tile transforms with 16 samples to a vector (AVX-512), for groups whose samples have
//! 4 or 16 tiles each (a ResNet-20's third stage: 64 channels on 8x8, 4 tiles of F(4x4, 3x3);
//! ResNet-18's 16x16 and 8x8 stages).
//!
//! Why: on such small planes a tile row holds one to four tiles, so the portable transforms,
//! which run along the group's tiles 8 at a time, first gather every tile's patch element by
//! element into `[k][a]` pieces (and scatter the results back the same way); those gathers and
//! scatters, not the maps, were their cost: per group of 64 samples at 64 channels on 8x8, one
//! thread, input transform 0.64 ms, output transform 0.30, output adjoint 0.39, input adjoint
//! 0.73, against 0.52 ms for the group's 36 `gemm` products (2026-12-07, Intel Xeon with
//! AVX-512, 2 cores). Here a channel's planes of 16 samples are transposed (16 x 16 blocks, in
//! registers) into one vector per pixel, every tile's patch is then a set of whole vectors, each
//! map runs on 16 samples at once, and the results are transposed back into the group's
//! sample-major tile order (`[a * a][c][t]`, `t = s * tiles + tile`) with a few shuffles.
//!
//! Same bits as the portable transforms: every tile goes through the same maps (written once,
//! over [`Lane`], for a float and for a [`V16`]) in the same order, the overlapping patches of
//! the input gradient are summed and added in the same order, and the transposes only move
//! values (`bits_do_not_depend_on_threads_or_build` compares the two on planes of 4 and 16
//! tiles with partial blocks of samples).

use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::{Add, Mul, Neg, Sub};

use super::{stride, Lane, Rule, Tiles};
use crate::cpu::Build;
use crate::ops::direct::{AffineRelu, Isa};

/// Samples a vector.
const S: usize = 16;

/// One float of each of 16 samples. Made only by this module's functions, which run only where
/// the CPU has AVX-512 ([`usable`]); that is what makes its operators' intrinsics sound.
#[derive(Clone, Copy)]
pub(super) struct V16(__m512);

impl Add for V16 {
    type Output = V16;
    #[inline(always)]
    fn add(self, o: V16) -> V16 {
        // SAFETY: a V16 exists only on a CPU with AVX-512 (see the type).
        V16(unsafe { _mm512_add_ps(self.0, o.0) })
    }
}

impl Sub for V16 {
    type Output = V16;
    #[inline(always)]
    fn sub(self, o: V16) -> V16 {
        // SAFETY: as in `add`.
        V16(unsafe { _mm512_sub_ps(self.0, o.0) })
    }
}

impl Mul<f32> for V16 {
    type Output = V16;
    #[inline(always)]
    fn mul(self, k: f32) -> V16 {
        // SAFETY: as in `add`.
        V16(unsafe { _mm512_mul_ps(self.0, _mm512_set1_ps(k)) })
    }
}

impl Neg for V16 {
    type Output = V16;
    /// The sign bit flipped, as f32 negation does (`0.0 - x` would turn -0.0 into +0.0).
    #[inline(always)]
    fn neg(self) -> V16 {
        // SAFETY: as in `add`.
        V16(unsafe {
            let sign = _mm512_set1_epi32(i32::MIN);
            _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(self.0), sign))
        })
    }
}

impl Lane for V16 {}

/// Whether a group laid out as `t` runs here: the AVX2 build (not the portable baseline) on a
/// CPU with AVX-512, and 4 or 16 tiles a sample.
pub(super) fn usable(build: Build, t: &Tiles) -> bool {
    build == Build::Avx2 && Isa::detected() == Some(Isa::Avx512) && matches!(t.per_sample(), 4 | 16)
}

/// Scratch floats the transforms here need for `t`: a (padded) plane of vectors, every tile's
/// A x A vectors, and a tile row's A x A vectors.
pub(super) fn buf_len(t: &Tiles) -> usize {
    let a = t.m + 2;
    ((t.m * t.th + 2) * (t.m * t.tw + 2) + a * a * (t.per_sample() + t.tw)) * S
}

/// The mask of a vector's first `n` lanes.
#[inline(always)]
fn low(n: usize) -> __mmask16 {
    ((1u32 << n.min(16)) - 1) as u16
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn zero() -> V16 {
    V16(_mm512_setzero_ps())
}

/// The vector at vector index `i` of `buf`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn get(buf: &[f32], i: usize) -> V16 {
    debug_assert!((i + 1) * S <= buf.len());
    V16(_mm512_loadu_ps(buf.as_ptr().add(i * S)))
}

/// Stores `v` at vector index `i` of `buf`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn put(buf: &mut [f32], i: usize, v: V16) {
    debug_assert!((i + 1) * S <= buf.len());
    _mm512_storeu_ps(buf.as_mut_ptr().add(i * S), v.0)
}

/// The first `N` vectors of `buf`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn vectors<const N: usize>(buf: &[f32]) -> [__m512; N] {
    let mut v = [_mm512_setzero_ps(); N];
    for (i, e) in v.iter_mut().enumerate() {
        *e = get(buf, i).0;
    }
    v
}

/// `N` vectors of `buf` from vector index `at`, `step` apart.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn run<const N: usize>(buf: &[f32], at: usize, step: usize) -> [V16; N] {
    let mut v = [zero(); N];
    for (i, e) in v.iter_mut().enumerate() {
        *e = get(buf, at + i * step);
    }
    v
}

/// Column `b` of `m`.
#[inline(always)]
fn column<const R: usize, const C: usize>(m: &[[V16; C]; R], b: usize) -> [V16; R] {
    // A loop, not `map`: array closures were left out of line (see `transpose16`).
    let mut v = [m[0][b]; R];
    for (e, row) in v.iter_mut().zip(m) {
        *e = row[b];
    }
    v
}

/// Sets column `b` of `m` to `v`.
#[inline(always)]
fn set_column<const R: usize, const C: usize>(m: &mut [[V16; C]; R], b: usize, v: [V16; R]) {
    for (row, e) in m.iter_mut().zip(v) {
        row[b] = e;
    }
}

/// The 16 x 16 transpose: `out[j]` lane i is `r[i]` lane j. Its own inverse.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Pairs of rows interleaved, then pairs of pairs: `u[4 i + e]`'s 128-bit lane k holds rows
    // 4i .. 4i + 3 of column 4k + e.
    // (Loops, not `std::array::from_fn`: its closures were left out of line, without AVX-512.)
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        for h in 0..2 {
            let a = _mm512_castps_pd(t[4 * i + h]);
            let b = _mm512_castps_pd(t[4 * i + 2 + h]);
            u[4 * i + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
            u[4 * i + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        }
    }
    // Column 4k + e is lane k of u[e], u[4 + e], u[8 + e], u[12 + e].
    let mut out = [_mm512_setzero_ps(); 16];
    for e in 0..4 {
        let lo01 = _mm512_shuffle_f32x4::<0x44>(u[e], u[4 + e]);
        let lo23 = _mm512_shuffle_f32x4::<0x44>(u[8 + e], u[12 + e]);
        let hi01 = _mm512_shuffle_f32x4::<0xEE>(u[e], u[4 + e]);
        let hi23 = _mm512_shuffle_f32x4::<0xEE>(u[8 + e], u[12 + e]);
        out[e] = _mm512_shuffle_f32x4::<0x88>(lo01, lo23);
        out[4 + e] = _mm512_shuffle_f32x4::<0xDD>(lo01, lo23);
        out[8 + e] = _mm512_shuffle_f32x4::<0x88>(hi01, hi23);
        out[12 + e] = _mm512_shuffle_f32x4::<0xDD>(hi01, hi23);
    }
    out
}

/// Within each 128-bit lane, the 4 x 4 transpose of four vectors. Its own inverse.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn inlane4(r: [__m512; 4]) -> [__m512; 4] {
    let (a, b) = (_mm512_unpacklo_ps(r[0], r[1]), _mm512_unpackhi_ps(r[0], r[1]));
    let (c, d) = (_mm512_unpacklo_ps(r[2], r[3]), _mm512_unpackhi_ps(r[2], r[3]));
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    [
        ps(_mm512_unpacklo_pd(pd(a), pd(c))),
        ps(_mm512_unpackhi_pd(pd(a), pd(c))),
        ps(_mm512_unpacklo_pd(pd(b), pd(d))),
        ps(_mm512_unpackhi_pd(pd(b), pd(d))),
    ]
}

/// The 4 x 4 transpose of four vectors' 128-bit lanes. Its own inverse.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn lanes4(r: [__m512; 4]) -> [__m512; 4] {
    let lo01 = _mm512_shuffle_f32x4::<0x44>(r[0], r[1]);
    let lo23 = _mm512_shuffle_f32x4::<0x44>(r[2], r[3]);
    let hi01 = _mm512_shuffle_f32x4::<0xEE>(r[0], r[1]);
    let hi23 = _mm512_shuffle_f32x4::<0xEE>(r[2], r[3]);
    [
        _mm512_shuffle_f32x4::<0x88>(lo01, lo23),
        _mm512_shuffle_f32x4::<0xDD>(lo01, lo23),
        _mm512_shuffle_f32x4::<0x88>(hi01, hi23),
        _mm512_shuffle_f32x4::<0xDD>(hi01, hi23),
    ]
}

/// Writes the group's sample-major tile run `dst[l * tps + tile] = tiles[tile]` lane l for the
/// first `live` samples l (`tiles`: `tps` vectors, one per tile of the sample block).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn to_v(tiles: &[f32], tps: usize, dst: *mut f32, live: usize) {
    if tps == 4 {
        // Lane 4m + t of out[q] is sample 4q + m's tile t.
        let out = lanes4(inlane4(vectors::<4>(tiles)));
        for (q, o) in out.iter().enumerate() {
            let m = live.saturating_sub(4 * q).min(4);
            if m > 0 {
                _mm512_mask_storeu_ps(dst.add(S * q), low(4 * m), *o);
            }
        }
    } else {
        let out = transpose16(vectors::<16>(tiles));
        for (l, o) in out.iter().enumerate().take(live) {
            _mm512_storeu_ps(dst.add(S * l), *o);
        }
    }
}

/// The inverse of [`to_v`]: `tiles[tile]` lane l = `src[l * tps + tile]` for l below `live`
/// (zero in the other lanes).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn from_v(src: *const f32, tps: usize, live: usize, tiles: &mut [f32]) {
    if tps == 4 {
        let mut x = [_mm512_setzero_ps(); 4];
        for (q, xq) in x.iter_mut().enumerate() {
            let m = live.saturating_sub(4 * q).min(4);
            *xq = _mm512_maskz_loadu_ps(low(4 * m), src.add(S * q));
        }
        for (t, v) in inlane4(lanes4(x)).into_iter().enumerate() {
            put(tiles, t, V16(v));
        }
    } else {
        let mut x = [_mm512_setzero_ps(); 16];
        for (l, xl) in x.iter_mut().enumerate().take(live) {
            *xl = _mm512_loadu_ps(src.add(S * l));
        }
        for (t, v) in transpose16(x).into_iter().enumerate() {
            put(tiles, t, V16(v));
        }
    }
}

/// A plane of `h x w` values of each of `live` samples (sample l's at `src + l * step`) into
/// one vector per pixel: pixel (r, c) at vector index `(r + off) * pc + c + off` of `grid`.
/// With `map` = (scale, shift), each value becomes `relu(x * scale + shift)` as it is loaded:
/// batch norm's `affine_relu`, a product, then a sum, then 0 where the sum is below 0 (a NaN or
/// a -0.0 kept), so the same bits.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn planes_in(
    src: *const f32,
    step: usize,
    live: usize,
    map: Option<(f32, f32)>,
    (h, w): (usize, usize),
    grid: &mut [f32],
    pc: usize,
    off: usize,
) {
    let plane = h * w;
    for p0 in (0..plane).step_by(S) {
        let n = (plane - p0).min(S);
        let mut rows = [_mm512_setzero_ps(); 16];
        for (l, row) in rows.iter_mut().enumerate().take(live) {
            *row = _mm512_maskz_loadu_ps(low(n), src.add(l * step + p0));
            if let Some((sc, sh)) = map {
                let z = _mm512_add_ps(_mm512_mul_ps(*row, _mm512_set1_ps(sc)), _mm512_set1_ps(sh));
                let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, _mm512_setzero_ps());
                // Lanes past the plane stay +0.0 (the padding): only the n loaded are mapped.
                *row = _mm512_maskz_mov_ps(low(n) & !below, z);
            }
        }
        // Pixel p0 + e at row r, column c, stepped along (no division a pixel).
        let (mut r, mut c) = (p0 / w, p0 % w);
        for v in transpose16(rows).into_iter().take(n) {
            put(grid, (r + off) * pc + c + off, V16(v));
            c += 1;
            if c == w {
                (r, c) = (r + 1, 0);
            }
        }
    }
}

/// The inverse of [`planes_in`] with `off` 0 and `pc` = w: each of the `live` samples' plane
/// written from the grid's vectors.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn planes_out(
    grid: &[f32],
    (h, w): (usize, usize),
    dst: *mut f32,
    step: usize,
    live: usize,
) {
    let plane = h * w;
    for p0 in (0..plane).step_by(S) {
        let n = (plane - p0).min(S);
        let mut px = [_mm512_setzero_ps(); 16];
        for (e, v) in px.iter_mut().enumerate().take(n) {
            *v = get(grid, p0 + e).0;
        }
        for (l, v) in transpose16(px).into_iter().enumerate().take(live) {
            _mm512_mask_storeu_ps(dst.add(l * step + p0), low(n), v);
        }
    }
}

/// The blocks of at most 16 samples of a group of `gs`: (first sample, samples).
fn blocks(gs: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..gs).step_by(S).map(move |sb| (sb, (gs - sb).min(S)))
}

/// `super::input_transform` with 16 samples to a vector; the same arguments and bits.
///
/// # Safety
/// [`usable`] must hold for `t`; `buf` holds [`buf_len`] floats.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn input_transform<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    x: &[f32],
    map: Option<AffineRelu<'_>>,
    cin: usize,
    v: &mut [f32],
    tt: usize,
    buf: &mut [f32],
) {
    let (th, tw, tps) = (t.th, t.tw, t.per_sample());
    let (st, plane, gs) = (stride(cin, tt), t.h * t.w, tt / tps);
    assert!(x.len() >= gs * cin * plane && v.len() >= (A * A - 1) * st + cin * tt);
    let pc = M * tw + 2;
    let (grid, tiles) = buf.split_at_mut((M * th + 2) * pc * S);
    // The padding (and what the tiles read past the plane) stays zero; the plane is rewritten
    // for every block.
    grid.fill(0.0);
    for c in 0..cin {
        for (sb, live) in blocks(gs) {
            let src = x.as_ptr().add((sb * cin + c) * plane);
            let mc = map.map(|m| (m.scale[c], m.shift[c]));
            planes_in(src, cin * plane, live, mc, (t.h, t.w), grid, pc, 1);
            for i in 0..th {
                for j in 0..tw {
                    // Along each patch row k, then down each column b (as the portable passes).
                    let mut g = [[zero(); A]; A];
                    for (k, gk) in g.iter_mut().enumerate() {
                        *gk = R::bt(run::<A>(grid, (M * i + k) * pc + M * j, 1));
                    }
                    for b in 0..A {
                        for (a, e) in R::bt(column(&g, b)).into_iter().enumerate() {
                            put(tiles, (a * A + b) * tps + i * tw + j, e);
                        }
                    }
                }
            }
            for pos in 0..A * A {
                let dst = v.as_mut_ptr().add(pos * st + c * tt + sb * tps);
                to_v(&tiles[pos * tps * S..], tps, dst, live);
            }
        }
    }
}

/// `super::output_transform` with 16 samples to a vector; the same arguments and bits.
///
/// # Safety
/// As [`input_transform`].
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn output_transform<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    m: &[f32],
    tt: usize,
    cout: usize,
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    buf: &mut [f32],
) {
    let (h, w, th, tw, tps) = (t.h, t.w, t.th, t.tw, t.per_sample());
    let (st, plane, gs) = (stride(cout, tt), h * w, tt / tps);
    assert!(y.len() >= gs * cout * plane && m.len() >= (A * A - 1) * st + cout * tt);
    let (grid, tiles) = buf.split_at_mut((M * th + 2) * (M * tw + 2) * S);
    for co in 0..cout {
        let bv = bias.map(|b| b[co]);
        for (sb, live) in blocks(gs) {
            for pos in 0..A * A {
                from_v(
                    m.as_ptr().add(pos * st + co * tt + sb * tps),
                    tps,
                    live,
                    &mut tiles[pos * tps * S..],
                );
            }
            for i in 0..th {
                for j in 0..tw {
                    let tile = i * tw + j;
                    // half[p][b] = (A^T m[.][b])[p], then each output row p along b.
                    let mut half = [[zero(); A]; M];
                    for b in 0..A {
                        set_column(&mut half, b, R::at(run::<A>(tiles, b * tps + tile, A * tps)));
                    }
                    for (p, hp) in half.iter().enumerate() {
                        let oy = M * i + p;
                        let mut row = R::at(*hp);
                        if let Some(bv) = bv {
                            for e in row.iter_mut() {
                                *e = *e + V16(_mm512_set1_ps(bv));
                            }
                        }
                        for (q, e) in row.into_iter().enumerate() {
                            let ox = M * j + q;
                            if oy < h && ox < w {
                                put(grid, oy * w + ox, e);
                            }
                        }
                    }
                }
            }
            let dst = y.as_mut_ptr().add((sb * cout + co) * plane).cast::<f32>();
            planes_out(grid, (h, w), dst, cout * plane, live);
        }
    }
}

/// `super::output_adjoint` with 16 samples to a vector; the same arguments and bits.
///
/// # Safety
/// As [`input_transform`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn output_adjoint<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    dy: &[f32],
    cout: usize,
    dm: &mut [f32],
    tt: usize,
    buf: &mut [f32],
) {
    let (th, tw, tps) = (t.th, t.tw, t.per_sample());
    let (st, plane, gs) = (stride(cout, tt), t.h * t.w, tt / tps);
    assert!(dy.len() >= gs * cout * plane && dm.len() >= (A * A - 1) * st + cout * tt);
    let pc = M * tw;
    let (grid, tiles) = buf.split_at_mut((M * th + 2) * (M * tw + 2) * S);
    // Outputs past the plane (the tiles' overhang) stay zero.
    grid.fill(0.0);
    for co in 0..cout {
        for (sb, live) in blocks(gs) {
            let src = dy.as_ptr().add((sb * cout + co) * plane);
            planes_in(src, cout * plane, live, None, (t.h, t.w), grid, pc, 0);
            for i in 0..th {
                for j in 0..tw {
                    // half[a][q] = (A dy[.][q])[a] down each column q, then along each row a.
                    let mut half = [[zero(); M]; A];
                    for q in 0..M {
                        set_column(
                            &mut half,
                            q,
                            R::at_adj(run::<M>(grid, M * i * pc + M * j + q, pc)),
                        );
                    }
                    for (a, ha) in half.iter().enumerate() {
                        for (b, e) in R::at_adj(*ha).into_iter().enumerate() {
                            put(tiles, (a * A + b) * tps + i * tw + j, e);
                        }
                    }
                }
            }
            for pos in 0..A * A {
                let dst = dm.as_mut_ptr().add(pos * st + co * tt + sb * tps);
                to_v(&tiles[pos * tps * S..], tps, dst, live);
            }
        }
    }
}

/// `super::input_adjoint` with 16 samples to a vector; the same arguments and bits.
///
/// # Safety
/// As [`input_transform`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn input_adjoint<const M: usize, const A: usize, R: Rule<M, A>>(
    t: &Tiles,
    dv: &[f32],
    cin: usize,
    tt: usize,
    dx: &mut [f32],
    buf: &mut [f32],
) {
    let (h, w, th, tw, tps) = (t.h, t.w, t.th, t.tw, t.per_sample());
    let (st, plane, gs) = (stride(cin, tt), h * w, tt / tps);
    assert!(dx.len() >= gs * cin * plane && dv.len() >= (A * A - 1) * st + cin * tt);
    let (grid, rest) = buf.split_at_mut((M * th + 2) * (M * tw + 2) * S);
    let (tiles, dd) = rest.split_at_mut(A * A * tps * S);
    for c in 0..cin {
        for (sb, live) in blocks(gs) {
            for pos in 0..A * A {
                from_v(
                    dv.as_ptr().add(pos * st + c * tt + sb * tps),
                    tps,
                    live,
                    &mut tiles[pos * tps * S..],
                );
            }
            let at = dx.as_mut_ptr().add((sb * cin + c) * plane);
            planes_in(at.cast_const(), cin * plane, live, None, (h, w), grid, w, 0);
            for i in 0..th {
                // The tile row's `dd[j][k][l]`: half[k][b] = (B dV[.][b])[k], then along k.
                for j in 0..tw {
                    let tile = i * tw + j;
                    let mut half = [[zero(); A]; A];
                    for b in 0..A {
                        set_column(
                            &mut half,
                            b,
                            R::bt_adj(run::<A>(tiles, b * tps + tile, A * tps)),
                        );
                    }
                    for (k, hk) in half.iter().enumerate() {
                        for (l, e) in R::bt_adj(*hk).into_iter().enumerate() {
                            put(dd, (j * A + k) * A + l, e);
                        }
                    }
                }
                let d = |j: usize, k: usize, l: usize| get(dd, (j * A + k) * A + l);
                for k in 0..A {
                    // Padded row M i + k is input row M i + k - 1; padding rows are dropped.
                    let r = M * i + k;
                    if r == 0 || r > h {
                        continue;
                    }
                    for j in 0..tw {
                        for q in 0..M {
                            let ox = M * j + q;
                            if ox >= w {
                                break;
                            }
                            // Input column M j + q is patch column q + 1 of tile j, and for
                            // q = 0 also column M + 1 of tile j - 1, for q = M - 1 column 0 of
                            // tile j + 1: those two summed first, as the portable pass does.
                            let e = if q == 0 {
                                if j == 0 {
                                    d(0, k, 1)
                                } else {
                                    d(j, k, 1) + d(j - 1, k, M + 1)
                                }
                            } else if q == M - 1 {
                                if j + 1 == tw {
                                    d(j, k, M)
                                } else {
                                    d(j, k, M) + d(j + 1, k, 0)
                                }
                            } else {
                                d(j, k, q + 1)
                            };
                            let gi = (r - 1) * w + ox;
                            put(grid, gi, get(grid, gi) + e);
                        }
                    }
                }
            }
            planes_out(grid, (h, w), at, cin * plane, live);
        }
    }
}
