//! 2-D convolution (zero padding, any stride) as im2col + `gemm`, one sample at a time.

use std::mem::MaybeUninit;

use dfdx::prelude::*;
use rayon::prelude::*;

use super::gemm::{k_piece, small_branch, Gemm, Layout, Operand, Par, SMALL_KC};
use super::{direct, winograd};
use super::{read, sum_f32, tasks_in_parallel, with_scratch, BATCH_CHUNK, ELEM_CHUNK, T1, T4};
use crate::cpu::Build;

/// The hyper-parameters of [`conv2d`] (padding is zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dCfg {
    /// Output channels (the weight is (out_channels, in_channels, kernel, kernel)).
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Step between output pixels, in both directions (1: every position; a ResNet stage entry
    /// and its 1x1 shortcut use 2).
    pub stride: usize,
}

impl Conv2dCfg {
    /// A stride-1 convolution (the ConvNet's and most of a ResNet's).
    pub fn new(out_channels: usize, kernel: usize, padding: usize) -> Self {
        Conv2dCfg { out_channels, kernel, padding, stride: 1 }
    }

    /// The same convolution with stride `stride`.
    pub fn with_stride(self, stride: usize) -> Self {
        Conv2dCfg { stride, ..self }
    }

    /// The output size along a dimension of input size `n`: floor((n + 2p - k) / s) + 1, like
    /// PyTorch; `None` if the kernel does not fit the padded input or the stride is 0.
    pub fn out_size(&self, n: usize) -> Option<usize> {
        let span = (n + 2 * self.padding).checked_sub(self.kernel)?;
        (self.stride > 0).then(|| span / self.stride + 1)
    }
}

/// The sizes of one convolution (also used by the second-order engine, `hvp`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geom {
    pub(crate) cin: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) k: usize,
    pub(crate) p: usize,
    pub(crate) s: usize,
    pub(crate) ho: usize,
    pub(crate) wo: usize,
}

impl Geom {
    /// The geometry of `cfg` on a (cin, h, w) input; `None` if the kernel does not fit.
    pub(crate) fn new(cin: usize, h: usize, w: usize, cfg: Conv2dCfg) -> Option<Geom> {
        let (ho, wo) = (cfg.out_size(h)?, cfg.out_size(w)?);
        Some(Geom { cin, h, w, k: cfg.kernel, p: cfg.padding, s: cfg.stride, ho, wo })
    }
    /// Rows of the im2col matrix: cin * k * k.
    pub(crate) fn kd(&self) -> usize {
        self.cin * self.k * self.k
    }
    /// Output pixels per channel: ho * wo.
    pub(crate) fn pd(&self) -> usize {
        self.ho * self.wo
    }
    /// A 1x1 kernel without padding at stride 1 needs no im2col: the input is the column
    /// matrix. (At stride 2 the 1x1 shortcut still goes through im2col, which subsamples.)
    pub(crate) fn direct(&self) -> bool {
        self.k == 1 && self.p == 0 && self.s == 1
    }
    /// For column `kx` of the kernel: the output columns `ox0..ox1` that read inside the image
    /// (the others read padding), and `ix0`, the input column read at `ox0`; output column `ox`
    /// reads input column `ox * s + kx - p`.
    fn cols(&self, kx: usize) -> (usize, usize, usize) {
        let s = self.s;
        let ox0 = self.p.saturating_sub(kx).div_ceil(s).min(self.wo);
        let ox1 = (self.w + self.p).saturating_sub(kx).div_ceil(s).min(self.wo).max(ox0);
        // ox0 * s + kx >= p whenever the range is non-empty; saturate for the empty case.
        (ox0, ox1, (ox0 * s + kx).saturating_sub(self.p))
    }
    /// The input row read by output row `oy` at kernel row `ky`, if inside the image.
    fn row(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.s + ky).checked_sub(self.p)?;
        (iy < self.h).then_some(iy)
    }
}

/// Fills `col` (kd x pd, row-major) from one sample `x` (cin x h x w).
#[inline(always)]
pub(crate) fn im2col(g: &Geom, x: &[f32], col: &mut [f32]) {
    im2col_rs(g, x, col, g.pd())
}

/// [`im2col`] into a matrix whose rows are `rs` floats apart (`rs >= pd`): row r is written to
/// `col[r * rs..r * rs + pd]`, the rest left alone (a group of samples side by side).
#[inline(always)]
fn im2col_rs(g: &Geom, x: &[f32], col: &mut [f32], rs: usize) {
    if g.same() {
        im2col_same(g, x, col, rs)
    } else if g.polyphase() {
        im2col_poly(g, x, col, rs)
    } else {
        im2col_segments(g, x, col, rs)
    }
}

/// [`im2col`] for any geometry: each row of `col` as ho segments of wo floats.
#[inline(always)]
fn im2col_segments(g: &Geom, x: &[f32], col: &mut [f32], rs: usize) {
    let (pd, wo, k) = (g.pd(), g.wo, g.k);
    for ci in 0..g.cin {
        let xc = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let r = (ci * k + ky) * k + kx;
                let row = &mut col[r * rs..r * rs + pd];
                let (ox0, ox1, ix0) = g.cols(kx);
                for oy in 0..g.ho {
                    let seg = &mut row[oy * wo..(oy + 1) * wo];
                    match g.row(oy, ky) {
                        None => seg.fill(0.0),
                        Some(iy) => {
                            seg[..ox0].fill(0.0);
                            seg[ox1..].fill(0.0);
                            let src = iy * g.w + ix0;
                            let len = ox1 - ox0;
                            if g.s == 1 {
                                seg[ox0..ox1].copy_from_slice(&xc[src..src + len]);
                            } else if len > 0 {
                                let xs = xc[src..src + (len - 1) * g.s + 1].iter().step_by(g.s);
                                for (d, v) in seg[ox0..ox1].iter_mut().zip(xs) {
                                    *d = *v;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Where kernel position (ky, kx) of a stride-1 convolution whose output has the input's size
/// (a 3x3 kernel with padding 1: every conv of a ResNet stage after its entry) reads: row
/// (ci, ky, kx) of the im2col matrix is channel ci's plane shifted by dy = ky - p rows and
/// dx = kx - p columns, zero where the window leaves the image. In the flat pixel index that is
/// the plane at offset `shift` = dy * w + dx over the output rows `r0..r1` whose input row is
/// inside, except the `n` columns from `c0` of each such row, which wrapped around from the
/// neighbouring row (|dx| of them). `a..b` is the flat range of those rows, clipped so the source
/// stays inside the plane (only wrapped columns fall outside). A stride-2 convolution reads
/// each of its input's polyphase planes shifted the same way ([`Geom::poly_shifts`]).
#[derive(Clone, Copy)]
struct Shift {
    r0: usize,
    r1: usize,
    a: usize,
    b: usize,
    shift: isize,
    c0: usize,
    n: usize,
}

impl Geom {
    /// The geometry [`Shift`] describes: stride 1 and an output the size of the input.
    pub(crate) fn same(&self) -> bool {
        self.s == 1 && self.ho == self.h && self.wo == self.w
    }

    /// Every kernel position (ky, kx) as a [`Shift`], in row-major order (only for
    /// [`Geom::same`]).
    fn shifts(&self) -> Vec<Shift> {
        let p = self.p as isize;
        let taps = (0..self.k).flat_map(|ky| (0..self.k).map(move |kx| (ky, kx)));
        taps.map(|(ky, kx)| Shift::new(self.h, self.w, ky as isize - p, kx as isize - p)).collect()
    }

    /// Whether a stride-2 convolution reads its input as four polyphase planes (see
    /// [`im2col_poly`]): an even-sized input whose output is half its size (3x3 with padding
    /// 1 and 1x1 without, a ResNet's stage entry and shortcut, on 32x32, 16x16 or 8x8 planes;
    /// not on 7x7 or 14x14 when the halving does not divide).
    pub(crate) fn polyphase(&self) -> bool {
        // Twice the output size is the input size only for even inputs.
        self.s == 2 && 2 * self.ho == self.h && 2 * self.wo == self.w
    }

    /// For a [`Geom::polyphase`] convolution, every kernel position (ky, kx) in row-major order
    /// as (plane, [`Shift`]): output pixel (oy, ox) reads input (2 oy + ty, 2 ox + tx) with
    /// ty = ky - p, tx = kx - p, which is pixel (oy + floor(ty / 2), ox + floor(tx / 2)) of
    /// polyphase plane (ty mod 2, tx mod 2), numbered 2 (ty mod 2) + (tx mod 2).
    fn poly_shifts(&self) -> Vec<(usize, Shift)> {
        let p = self.p as isize;
        let taps = (0..self.k).flat_map(|ky| (0..self.k).map(move |kx| (ky, kx)));
        taps.map(|(ky, kx)| {
            let (ty, tx) = (ky as isize - p, kx as isize - p);
            let plane = (2 * ty.rem_euclid(2) + tx.rem_euclid(2)) as usize;
            (plane, Shift::new(self.ho, self.wo, ty.div_euclid(2), tx.div_euclid(2)))
        })
        .collect()
    }
}

impl Shift {
    /// An h x w plane shifted by dy rows and dx columns (output pixel (y, x) reads input pixel
    /// (y + dy, x + dx), zero outside).
    fn new(h: usize, w: usize, dy: isize, dx: isize) -> Shift {
        let (hi, wi) = (h as isize, w as isize);
        let r0 = (-dy).clamp(0, hi);
        let r1 = (hi - dy).clamp(r0, hi);
        let shift = dy * wi + dx;
        let a = (-shift).clamp(r0 * wi, r1 * wi);
        let b = (hi * wi - shift).clamp(a, r1 * wi);
        let n = dx.unsigned_abs().min(w);
        let c0 = if dx > 0 { w - n } else { 0 };
        Shift { r0: r0 as usize, r1: r1 as usize, a: a as usize, b: b as usize, shift, c0, n }
    }

    /// Row `row` (h x w values) of the im2col matrix from the plane `xc` this shift reads:
    /// one contiguous copy, then zeros above or below the image and in the wrapped columns.
    #[inline(always)]
    fn copy_row(&self, w: usize, xc: &[f32], row: &mut [f32]) {
        let Shift { r0, r1, a, b, shift, c0, n } = *self;
        row[..a].fill(0.0);
        row[b..].fill(0.0);
        if b > a {
            let src = (a as isize + shift) as usize;
            row[a..b].copy_from_slice(&xc[src..src + (b - a)]);
        }
        for oy in r0..r1 {
            row[oy * w + c0..oy * w + c0 + n].fill(0.0);
        }
    }

    /// Adds row `row` of the column-matrix gradient into the plane `dxc` this shift reads, in
    /// one contiguous loop. The wrapped entries are first set to -0.0, which leaves any sum
    /// unchanged bit for bit (x + -0.0 = x for every x, signed zeros and NaN included).
    #[inline(always)]
    fn add_row(&self, w: usize, row: &mut [f32], dxc: &mut [f32]) {
        let Shift { r0, r1, a, b, shift, c0, n } = *self;
        for oy in r0..r1 {
            row[oy * w + c0..oy * w + c0 + n].fill(-0.0);
        }
        if b > a {
            let dst = (a as isize + shift) as usize;
            for (d, v) in dxc[dst..dst + (b - a)].iter_mut().zip(&row[a..b]) {
                *d += v;
            }
        }
    }
}

/// [`im2col`] for [`Geom::same`]: each row of `col` is one contiguous copy of the shifted plane,
/// then zeros above or below the image and in the wrapped columns. The segment loop copies ho
/// pieces of wo floats per row instead (8 floats on a ResNet-20's last stage), and on a ResNet-20
/// step im2col was then ~26% of the time (`perf`, 2026-12-05, Intel Xeon with AVX-512, 2 cores).
/// Writes exactly the values of the segment loop (tested).
#[inline(always)]
fn im2col_same(g: &Geom, x: &[f32], col: &mut [f32], rs: usize) {
    let (hw, taps) = (g.h * g.w, g.k * g.k);
    let shifts = g.shifts();
    for ci in 0..g.cin {
        let xc = &x[ci * hw..(ci + 1) * hw];
        for (t, sh) in shifts.iter().enumerate() {
            let r = ci * taps + t;
            sh.copy_row(g.w, xc, &mut col[r * rs..r * rs + hw]);
        }
    }
}

/// Splits one channel's plane `xc` (h x w, both even) into its four polyphase planes `q`
/// (each h/2 x w/2): plane 2a + b holds the pixels (2i + a, 2j + b).
#[inline(always)]
fn deinterleave(g: &Geom, xc: &[f32], q: &mut [f32]) {
    let (wo, po) = (g.wo, g.pd());
    assert!(xc.len() == 4 * po && q.len() == 4 * po && g.w == 2 * wo);
    let wide = poly_avx512();
    for i in 0..g.ho {
        for a in 0..2 {
            let row = &xc[(2 * i + a) * g.w..(2 * i + a + 1) * g.w];
            let (even, odd) = q[2 * a * po..(2 * a + 2) * po].split_at_mut(po);
            let (even, odd) = (&mut even[i * wo..(i + 1) * wo], &mut odd[i * wo..(i + 1) * wo]);
            split_row(wide, row, even, odd);
        }
    }
}

/// `even[j] = row[2 j]`, `odd[j] = row[2 j + 1]`: one row of [`deinterleave`], with its AVX-512
/// code where `wide` ([`poly_avx512`]).
#[inline(always)]
fn split_row(wide: bool, row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    assert!(row.len() == 2 * even.len() && odd.len() == even.len());
    if wide {
        // SAFETY: the CPU has AVX-512 (`poly_avx512`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            split_avx512(row, even, odd)
        };
        return;
    }
    for (j, (e, o)) in even.iter_mut().zip(odd.iter_mut()).enumerate() {
        *e = row[2 * j];
        *o = row[2 * j + 1];
    }
}

/// The inverse of [`split_row`]: one row of [`interleave`].
#[inline(always)]
fn merge_row(wide: bool, even: &[f32], odd: &[f32], row: &mut [f32]) {
    assert!(row.len() == 2 * even.len() && odd.len() == even.len());
    if wide {
        // SAFETY: the CPU has AVX-512 (`poly_avx512`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            merge_avx512(even, odd, row)
        };
        return;
    }
    for (j, (e, o)) in even.iter().zip(odd).enumerate() {
        row[2 * j] = *e;
        row[2 * j + 1] = *o;
    }
}

/// The inverse of [`deinterleave`]: writes the four polyphase planes `q` back into `xc`.
#[inline(always)]
fn interleave(g: &Geom, q: &[f32], xc: &mut [f32]) {
    let (wo, po) = (g.wo, g.pd());
    assert!(xc.len() == 4 * po && q.len() == 4 * po && g.w == 2 * wo);
    let wide = poly_avx512();
    for i in 0..g.ho {
        for a in 0..2 {
            let row = &mut xc[(2 * i + a) * g.w..(2 * i + a + 1) * g.w];
            let (even, odd) = q[2 * a * po..(2 * a + 2) * po].split_at(po);
            let (even, odd) = (&even[i * wo..(i + 1) * wo], &odd[i * wo..(i + 1) * wo]);
            merge_row(wide, even, odd, row);
        }
    }
}

/// Whether [`deinterleave`] and [`interleave`] run their AVX-512 rows ([`split_avx512`],
/// [`merge_avx512`]): where the CPU has AVX-512 and the baseline kernels are not forced. The
/// element loops compiled to one scalar move per float, and the two took ~3.6% of a one-thread
/// ResNet-20 training step (its stage entries and shortcuts; `perf`, 2026-12-06, Intel Xeon with
/// AVX-512, 2 cores). Both move the same values, so the results do not depend on it.
fn poly_avx512() -> bool {
    Build::selected() == Build::Avx2 && direct::Isa::detected() == Some(direct::Isa::Avx512)
}

/// The mask of a vector's first `n` lanes (all 16 for `n >= 16`).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn low_lanes(n: usize) -> u16 {
    ((1u32 << n.min(16)) - 1) as u16
}

/// `even[j] = row[2 j]`, `odd[j] = row[2 j + 1]` (`row` twice as long as `even` and `odd`): two
/// permutes per 32 floats, the last piece with masked loads and stores.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn split_avx512(row: &[f32], even: &mut [f32], odd: &mut [f32]) {
    use std::arch::x86_64::*;
    let wo = even.len();
    assert!(odd.len() == wo && row.len() == 2 * wo);
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mut j = 0;
    while j < wo {
        let r = (wo - j).min(16);
        // The valid lanes: 2r floats of the row in two vectors, r outputs.
        let (m0, m1, mo) = (low_lanes(2 * r), low_lanes((2 * r).saturating_sub(16)), low_lanes(r));
        // SAFETY: the masked lanes stay within row[2 j .. 2 j + 2 r] and even / odd [j .. j + r]
        // (masked-off lanes are not accessed, so the second vector's address may lie past the
        // row when 2 r <= 16).
        let a = _mm512_maskz_loadu_ps(m0, row.as_ptr().add(2 * j));
        let b = _mm512_maskz_loadu_ps(m1, row.as_ptr().wrapping_add(2 * j + 16));
        _mm512_mask_storeu_ps(even.as_mut_ptr().add(j), mo, _mm512_permutex2var_ps(a, ie, b));
        _mm512_mask_storeu_ps(odd.as_mut_ptr().add(j), mo, _mm512_permutex2var_ps(a, io, b));
        j += r;
    }
}

/// The inverse of [`split_avx512`]: `row[2 j] = even[j]`, `row[2 j + 1] = odd[j]`.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn merge_avx512(even: &[f32], odd: &[f32], row: &mut [f32]) {
    use std::arch::x86_64::*;
    let wo = even.len();
    assert!(odd.len() == wo && row.len() == 2 * wo);
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let mut j = 0;
    while j < wo {
        let r = (wo - j).min(16);
        let (mi, m0, m1) = (low_lanes(r), low_lanes(2 * r), low_lanes((2 * r).saturating_sub(16)));
        // SAFETY: the masked lanes stay within even / odd [j .. j + r] and row[2 j .. 2 j + 2 r]
        // (masked-off lanes are not accessed).
        let e = _mm512_maskz_loadu_ps(mi, even.as_ptr().add(j));
        let o = _mm512_maskz_loadu_ps(mi, odd.as_ptr().add(j));
        _mm512_mask_storeu_ps(row.as_mut_ptr().add(2 * j), m0, _mm512_permutex2var_ps(e, lo, o));
        let at = row.as_mut_ptr().wrapping_add(2 * j + 16);
        _mm512_mask_storeu_ps(at, m1, _mm512_permutex2var_ps(e, hi, o));
        j += r;
    }
}

/// [`im2col`] for [`Geom::polyphase`] (stride 2): each channel is split into its four
/// polyphase planes once, and each row of `col` is then one contiguous copy of a shifted
/// polyphase plane, as in [`im2col_same`]. The segment loop gathers every other pixel in
/// pieces of wo floats instead, and the strided convs and shortcuts of a ResNet-20 step then
/// took ~6% of it, more than its 8x8 stage's im2col and col2im (`perf`, 2026-12-06, Intel Xeon
/// with AVX-512, 2 cores). Writes exactly the values of the segment loop (tested).
#[inline(always)]
fn im2col_poly(g: &Geom, x: &[f32], col: &mut [f32], rs: usize) {
    let (hw, po, taps) = (g.h * g.w, g.pd(), g.k * g.k);
    if taps == 1 {
        // A 1x1 conv (a shortcut) reads polyphase plane 0 alone, unshifted: only the even
        // rows are split, each straight into its place in `col`.
        let (mut odd, wide) = (vec![0.0f32; g.wo], poly_avx512());
        for ci in 0..g.cin {
            let xc = &x[ci * hw..(ci + 1) * hw];
            for i in 0..g.ho {
                let row = &xc[2 * i * g.w..(2 * i + 1) * g.w];
                split_row(wide, row, &mut col[ci * rs + i * g.wo..][..g.wo], &mut odd);
            }
        }
        return;
    }
    let shifts = g.poly_shifts();
    let mut q = vec![0.0f32; hw];
    for ci in 0..g.cin {
        deinterleave(g, &x[ci * hw..(ci + 1) * hw], &mut q);
        for (t, (plane, sh)) in shifts.iter().enumerate() {
            let r = ci * taps + t;
            sh.copy_row(g.wo, &q[plane * po..(plane + 1) * po], &mut col[r * rs..r * rs + po]);
        }
    }
}

/// [`col2im_add`] for [`Geom::same`]: each row of `col` is added into the shifted plane in one
/// contiguous loop. Its wrapped entries are first set to -0.0, which leaves any sum unchanged bit
/// for bit (x + -0.0 = x for every x, signed zeros and NaN included), so every element of `dx`
/// receives the same additions in the same order as in the segment loop (tested).
#[inline(always)]
fn col2im_same(g: &Geom, col: &mut [f32], dx: &mut [f32], rs: usize) {
    let (hw, taps) = (g.h * g.w, g.k * g.k);
    let shifts = g.shifts();
    for ci in 0..g.cin {
        let dxc = &mut dx[ci * hw..(ci + 1) * hw];
        for (t, sh) in shifts.iter().enumerate() {
            let r = ci * taps + t;
            sh.add_row(g.w, &mut col[r * rs..r * rs + hw], dxc);
        }
    }
}

/// [`col2im_add`] for [`Geom::polyphase`] (stride 2): each channel's input gradient is split
/// into its polyphase planes, each row of `col` added into its shifted plane in one contiguous
/// loop (as [`col2im_same`]), and the planes written back. Every element of `dx` receives the
/// same additions in the same order as in the segment loop: the kernel positions are visited in
/// the same order, and each adds into the elements of one plane only (tested).
#[inline(always)]
fn col2im_poly(g: &Geom, col: &mut [f32], dx: &mut [f32], rs: usize) {
    let (hw, po, taps) = (g.h * g.w, g.pd(), g.k * g.k);
    if taps == 1 {
        // A 1x1 conv adds into polyphase plane 0 alone, unshifted: only the even rows are
        // split, added to and merged back (the same additions; the odd rows are untouched).
        let (mut even, mut odd) = (vec![0.0f32; g.wo], vec![0.0f32; g.wo]);
        let wide = poly_avx512();
        for ci in 0..g.cin {
            let dxc = &mut dx[ci * hw..(ci + 1) * hw];
            for i in 0..g.ho {
                let row = &mut dxc[2 * i * g.w..(2 * i + 1) * g.w];
                split_row(wide, row, &mut even, &mut odd);
                for (e, c) in even.iter_mut().zip(&col[ci * rs + i * g.wo..][..g.wo]) {
                    *e += c;
                }
                merge_row(wide, &even, &odd, row);
            }
        }
        return;
    }
    let shifts = g.poly_shifts();
    let mut q = vec![0.0f32; hw];
    for ci in 0..g.cin {
        let dxc = &mut dx[ci * hw..(ci + 1) * hw];
        deinterleave(g, dxc, &mut q);
        for (t, (plane, sh)) in shifts.iter().enumerate() {
            let r = ci * taps + t;
            let qp = &mut q[plane * po..(plane + 1) * po];
            sh.add_row(g.wo, &mut col[r * rs..r * rs + po], qp);
        }
        interleave(g, &q, dxc);
    }
}

/// Adds the column-matrix gradient `col` (kd x pd) into one sample's input gradient `dx`.
/// Entries of `col` that no input pixel receives (the padding's) may be overwritten.
#[inline(always)]
pub(crate) fn col2im_add(g: &Geom, col: &mut [f32], dx: &mut [f32]) {
    col2im_add_rs(g, col, dx, g.pd())
}

/// [`col2im_add`] from a matrix whose rows are `rs` floats apart (see [`im2col_rs`]).
#[inline(always)]
fn col2im_add_rs(g: &Geom, col: &mut [f32], dx: &mut [f32], rs: usize) {
    if g.same() {
        col2im_same(g, col, dx, rs)
    } else if g.polyphase() {
        col2im_poly(g, col, dx, rs)
    } else {
        col2im_segments(g, col, dx, rs)
    }
}

/// [`col2im_add`] for any geometry: each row of `col` as ho segments of wo floats.
#[inline(always)]
fn col2im_segments(g: &Geom, col: &[f32], dx: &mut [f32], rs: usize) {
    let (pd, wo, k) = (g.pd(), g.wo, g.k);
    for ci in 0..g.cin {
        let dxc = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let r = (ci * k + ky) * k + kx;
                let row = &col[r * rs..r * rs + pd];
                let (ox0, ox1, ix0) = g.cols(kx);
                for oy in 0..g.ho {
                    if let Some(iy) = g.row(oy, ky) {
                        let seg = &row[oy * wo + ox0..oy * wo + ox1];
                        let (dst0, len) = (iy * g.w + ix0, ox1 - ox0);
                        if g.s == 1 {
                            let dst = &mut dxc[dst0..dst0 + len];
                            for (d, s) in dst.iter_mut().zip(seg) {
                                *d += s;
                            }
                        } else if len > 0 {
                            let dst = dxc[dst0..dst0 + (len - 1) * g.s + 1].iter_mut().step_by(g.s);
                            for (d, s) in dst.zip(seg) {
                                *d += s;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// 2-D convolution of `x` (N, Cin, H, W) with `w` (Cout, Cin, k, k) and optional bias `b`
/// (Cout), zero padding p = `cfg.padding`, stride s = `cfg.stride`: output (N, Cout, Ho, Wo) with
/// Ho = floor((H + 2p - k) / s) + 1 (likewise Wo), like PyTorch's `Conv2d`; input pixels that
/// no window reads (every other row and column for a 1x1 kernel at stride 2, the last ones when
/// the stride does not divide) get zero gradient.
///
/// With `input_grad == false` the backward pass skips the input gradient (x's gradient is still
/// allocated, as zeros): the first layer of a network never needs it.
///
/// Samples run in parallel; the weight and bias gradients are summed per fixed group of samples
/// and the groups reduced in order, so results are bit-identical for any thread count.
pub fn conv2d<Tp: Tape<f32, Cpu>>(
    x: T4<Tp>,
    w: &T1,
    b: Option<&T1>,
    cfg: Conv2dCfg,
    input_grad: bool,
) -> T4<Tp> {
    conv2d_with(Build::selected(), x, w, b, cfg, input_grad)
}

/// The shape checks of [`conv2d`] (panics as it documents) and the geometry they give.
pub(crate) fn geometry(
    shape: (usize, usize, usize, usize),
    w: &T1,
    b: Option<&T1>,
    cfg: Conv2dCfg,
) -> Geom {
    let (_, cin, h, wd) = shape;
    let Conv2dCfg { out_channels: cout, kernel: k, padding: p, stride: s } = cfg;
    assert!(cin > 0 && h > 0 && wd > 0, "conv2d: empty input {shape:?}");
    assert!(cout > 0 && k > 0 && s > 0, "conv2d: bad config {cfg:?}");
    let Some(g) = Geom::new(cin, h, wd, cfg) else {
        panic!("conv2d: kernel {k} larger than padded input {h}x{wd} (padding {p})")
    };
    assert_eq!(
        w.shape().0,
        cout * g.kd(),
        "conv2d: weight has {} elements, expected {cout}x{cin}x{k}x{k}",
        w.shape().0
    );
    if let Some(b) = b {
        assert_eq!(b.shape().0, cout, "conv2d: bias has {} elements, expected {cout}", b.shape().0);
    }
    g
}

/// The forward pass of [`conv2d_with`] on plain slices: `n` samples `xv` laid out (n, cin, h, w)
/// as `g` says, weights `wv` (cout x cin*k*k), bias `bv`; returns the (n, cout, ho, wo) output.
/// The evaluation path of the ResNets (`model::resnet`) calls it directly on its own buffers.
pub(crate) fn forward_slices(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    wv: &[f32],
    bv: Option<&[f32]>,
) -> Vec<f32> {
    forward_slices_saving(build, g, n, cout, xv, wv, bv, false, None, None).0
}

/// A function a convolution's forward pass calls on each sample's output right after writing it
/// (`(sample, its cout planes)`), while it is in cache; only where [`runs_epilogue`].
pub(crate) type Epilogue<'a> = &'a (dyn Fn(usize, &[f32]) + Sync);

/// Whether [`forward_slices_saving`] calls an [`Epilogue`]: where the forward runs the direct
/// kernel (3x3 "same" convs on 16- and 32-wide planes, on CPUs with FMA), sample by sample, or
/// as Winograd, a group of samples at a time.
pub(crate) fn runs_epilogue(build: Build, g: &Geom, cout: usize) -> bool {
    winograd::applies(g, cout)
        || (build == Build::Avx2 && direct::Isa::detected().is_some() && direct::applies(g))
}

/// Whether [`forward_slices_saving`] and [`backward_slices`] take this convolution's input as a
/// [`direct::AffineRelu`] of a stored tensor rather than the input itself: where both passes run
/// the direct kernels (the AVX-512 build on 16- and 32-wide planes with at most 32 channels),
/// which pad their input anyway and map it while they do, or run as Winograd, whose input
/// transform gathers (and maps) its input the same way.
pub(crate) fn takes_mapped_input(build: Build, g: &Geom, cout: usize) -> bool {
    winograd::applies(g, cout)
        || (build == Build::Avx2
            && direct::Isa::detected() == Some(direct::Isa::Avx512)
            && !groups_samples(g)
            && direct::applies(g)
            && direct::grad_applies(g, cout))
}

/// [`forward_slices`] for a pass with a backward to come: with `save`, also what the backward
/// pass can reuse rather than compute again ([`Saved`]; only the Winograd convolutions keep
/// anything), to be handed to [`backward_slices`]. With `map` (only where
/// [`takes_mapped_input`]), the input is `xv` mapped by it; `epilogue` (only where
/// [`runs_epilogue`]) is called on each sample's output.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_slices_saving(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    wv: &[f32],
    bv: Option<&[f32]>,
    save: bool,
    map: Option<direct::AffineRelu<'_>>,
    epilogue: Option<Epilogue<'_>>,
) -> (Vec<f32>, Option<Saved>) {
    assert!(map.is_none() || takes_mapped_input(build, g, cout), "conv2d: a mapped input on {g:?}");
    assert!(epilogue.is_none() || runs_epilogue(build, g, cout), "conv2d: an epilogue on {g:?}");
    if winograd::applies(g, cout) {
        let forward = winograd::forward(g);
        let (y, saved) = forward(build, g, n, cout, xv, map, wv, bv, save, epilogue);
        return (y, saved.map(Saved));
    }
    let grouped = groups_samples(g);
    (forward_slices_with(build, g, n, cout, xv, map, wv, bv, grouped, epilogue), None)
}

/// What a convolution's forward pass keeps for its backward pass ([`forward_slices_saving`]).
pub(crate) struct Saved(winograd::Saved);

/// Where a backward pass puts its input gradient.
pub(crate) enum Dx<'a> {
    /// Added into what is there.
    Add(&'a mut [f32]),
    /// Written into memory that holds nothing yet, every element of it: the bits of adding the
    /// gradient into zeros. The direct input-gradient kernel writes its first tap's sums (as
    /// `0.0 + s`) where it would load and add; the other paths zero their piece in the task that
    /// fills it (in cache) and add. Spares the caller a zeroing pass over the whole buffer (the
    /// ResNets' training path: ~1.5% of a one-thread ResNet-20 step in `memset` by `perf`,
    /// 2026-12-07, Intel Xeon with AVX-512, 2 cores).
    Write(&'a mut [MaybeUninit<f32>]),
}

impl<'a> Dx<'a> {
    /// Consecutive pieces of `len` floats (the last may be shorter), of the same kind.
    fn chunks(self, len: usize) -> Vec<Dx<'a>> {
        match self {
            Dx::Add(d) => d.chunks_mut(len).map(Dx::Add).collect(),
            Dx::Write(d) => d.chunks_mut(len).map(Dx::Write).collect(),
        }
    }

    /// As a buffer to add into: a `Write` one zeroed first.
    pub(crate) fn into_add(self) -> &'a mut [f32] {
        match self {
            Dx::Add(d) => d,
            Dx::Write(d) => {
                for e in d.iter_mut() {
                    e.write(0.0);
                }
                // SAFETY: every element was initialised just above, and f32 has the layout of
                // MaybeUninit<f32>.
                unsafe { std::slice::from_raw_parts_mut(d.as_mut_ptr().cast::<f32>(), d.len()) }
            }
        }
    }
}

/// Output planes of at most this many pixels take [`BATCH_CHUNK`] samples per product: where one
/// sample's product is thinner than `gemm`'s widest kernel (64 rows with AVX-512). At 64 pixels
/// ConvNet-3's 8x8 CIFAR layer was grouped and its training ~8% slower (its 2.4 MB group im2col
/// leaves L2); up to 255 gave ResNet-18 nothing more than 64 (2026-12-06, Intel Xeon with
/// AVX-512, 2 cores, paired runs).
const GROUP_MAX_PD: usize = 32;

/// Whether a convolution's products take a group of samples side by side rather than one: for
/// small output planes (ResNet-18's 4x4 stage and the strided convs into it), where a product
/// per sample is a thin matrix (16 columns for 4x4: `gemm` then runs its narrowest kernel, at a
/// fraction of its rate) that streams the whole weight matrix (9.4 MB for ResNet-18's last
/// stage) once per sample. The input-gradient product and the forward's keep each element's
/// chains over the inner dimension, which is all the bits depend on: `gemm` cuts the inner
/// dimension by its length alone, except in its small-size branch, which a group reproduces by
/// running the same pieces ([`Gemm::run_k_pieces`], see [`small_branch`]). So the results are
/// those of one sample at a time (tested). The weight gradient is still summed sample by sample
/// (one product over the group would change its bits), but a block of its rows at a time, so
/// the block stays in cache over the group instead of the whole gradient streaming per sample.
fn groups_samples(g: &Geom) -> bool {
    !g.direct() && g.pd() <= GROUP_MAX_PD
}

/// [`forward_slices`], one sample per product or (`grouped`) [`BATCH_CHUNK`] side by side.
#[allow(clippy::too_many_arguments)]
fn forward_slices_with(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    map: Option<direct::AffineRelu<'_>>,
    wv: &[f32],
    bv: Option<&[f32]>,
    grouped: bool,
    epilogue: Option<Epilogue<'_>>,
) -> Vec<f32> {
    let g = *g;
    let (kd, pd) = (g.kd(), g.pd());
    let (xs, ys) = (g.cin * g.h * g.w, cout * pd);
    assert_eq!(xv.len(), n * xs, "conv2d: input of {} values, expected {n} x {xs}", xv.len());
    let col_len = if g.direct() { 0 } else { kd * pd };

    // 3x3 "same" convs on narrow planes with few channels run the direct kernel (`direct`, the
    // same bits) where the CPU has FMA, unless the baseline build is forced.
    let direct_w = match (build, direct::Isa::detected()) {
        (Build::Avx2, Some(isa)) if direct::applies(&g) => {
            Some((isa, direct::pack_weights(wv, cout, g.cin)))
        }
        _ => None,
    };
    assert!(map.is_none() || direct_w.is_some(), "conv2d: a mapped input on {g:?}");
    assert!(epilogue.is_none() || direct_w.is_some(), "conv2d: an epilogue on {g:?}");
    let fwd_scratch = if direct_w.is_some() { direct::scratch_len(&g) } else { col_len };
    // Forward: y_n (cout x pd) = b + W (cout x kd) * col_n (kd x pd). Each task first writes its
    // sample's bias into uninitialised memory, then the product adds to it: one write pass over
    // the output instead of a zeroing pass plus a bias pass (the first layer's output is 51 MB
    // for ConvNet-3 at batch 128 on MNIST). Without a bias (a ResNet's convs) the product
    // writes the output itself.
    let mut y: Vec<f32> = Vec::with_capacity(n * ys);
    let forward = |ni: usize, yn: &mut [MaybeUninit<f32>], col: &mut [f32], par: Par| {
        build.run(
            #[inline(always)]
            || {
                let xn = &xv[ni * xs..(ni + 1) * xs];
                if let Some((isa, wp)) = &direct_w {
                    // Writes every output, adding the bias itself.
                    direct::forward(*isa, &g, xn, map, wp, bv, cout, col, yn);
                    if let Some(e) = epilogue {
                        // SAFETY: every element of `yn` was written just above, and f32 has
                        // the layout of MaybeUninit<f32>.
                        e(ni, unsafe { std::slice::from_raw_parts(yn.as_ptr().cast(), yn.len()) });
                    }
                    return;
                }
                let cm: &[f32] = if g.direct() {
                    xn
                } else {
                    im2col(&g, xn, col);
                    col
                };
                let product = Gemm {
                    m: cout,
                    n: pd,
                    k: kd,
                    lhs: Operand::row_major(wv, kd),
                    rhs: Operand::row_major(cm, pd),
                    accumulate: bv.is_some(),
                };
                let Some(bv) = bv else {
                    // Written straight into the output: the bits of adding to zeros
                    // (`Gemm::run_uninit`), without a zeroing pass over it first.
                    return product.run_uninit(yn, Layout::row_major(pd), par);
                };
                for (row, b) in yn.chunks_exact_mut(pd).zip(bv) {
                    for e in row {
                        e.write(*b);
                    }
                }
                // SAFETY: every element of `yn` was initialised just above, and f32 has the layout
                // of MaybeUninit<f32>.
                let yn: &mut [f32] = unsafe {
                    std::slice::from_raw_parts_mut(yn.as_mut_ptr().cast::<f32>(), yn.len())
                };
                product.run(yn, Layout::row_major(pd), par);
            },
        )
    };
    let spare = &mut y.spare_capacity_mut()[..n * ys];
    if grouped && direct_w.is_none() {
        // A group's im2col side by side (kd x gs*pd), then its product (cout x gs*pd), then
        // each sample's rows copied out.
        let gp = BATCH_CHUNK * pd;
        let group = |c: usize, yc: &mut [MaybeUninit<f32>], buf: &mut [f32], par: Par| {
            build.run(
                #[inline(always)]
                || {
                    let (s0, gs) = (c * BATCH_CHUNK, yc.len() / ys);
                    let cols = gs * pd;
                    let (colg, yg) = buf.split_at_mut(kd * gp);
                    let (colg, yg) = (&mut colg[..kd * cols], &mut yg[..cout * cols]);
                    for s in 0..gs {
                        let xn = &xv[(s0 + s) * xs..(s0 + s + 1) * xs];
                        im2col_rs(&g, xn, &mut colg[s * pd..], cols);
                    }
                    // With a bias, the product adds to it; without, it overwrites (the bits of
                    // adding to zeros, see `Gemm::run_uninit`).
                    if let Some(bv) = bv {
                        for (row, b) in yg.chunks_exact_mut(cols).zip(bv) {
                            row.fill(*b);
                        }
                    }
                    // Cut the inner dimension where one sample's product would (`small_branch`).
                    let kc = if small_branch(cout, pd) { SMALL_KC } else { kd };
                    Gemm {
                        m: cout,
                        n: cols,
                        k: kd,
                        lhs: Operand::row_major(wv, kd),
                        rhs: Operand::row_major(colg, cols),
                        accumulate: bv.is_some(),
                    }
                    .run_k_pieces(yg, Layout::row_major(cols), par, kc);
                    for (s, yn) in yc.chunks_exact_mut(ys).enumerate() {
                        for (co, row) in yn.chunks_exact_mut(pd).enumerate() {
                            let src = &yg[co * cols + s * pd..co * cols + (s + 1) * pd];
                            for (d, v) in row.iter_mut().zip(src) {
                                d.write(*v);
                            }
                        }
                    }
                },
            )
        };
        write_chunks(spare, BATCH_CHUNK * ys, (kd + cout) * gp, group);
    } else {
        write_chunks(spare, ys, fwd_scratch, forward);
    }
    // SAFETY: the loops above initialised all n * ys elements (every chunk of `spare`, by the
    // bias fill or by `direct::forward`, which writes every output).
    unsafe { y.set_len(n * ys) };
    y
}

/// The backward pass of [`conv2d_with`] on plain slices: `dy` is the gradient of the (n, cout, ho,
/// wo) output, `xv` and `wv` the forward's input and weights. Adds the input gradient into `dx`
/// when given (col2im adds into what is there), and returns the weight gradient transposed (kd x
/// cout, see [`add_weight_grad`]) and the bias gradient (empty without a bias), each summed over
/// fixed groups of [`BATCH_CHUNK`] samples reduced in order, so the bits never depend on the
/// thread count. The ResNets' training path (`model::resnet`) calls it on its own buffers.
///
/// `saved`, what the forward pass kept ([`forward_slices_saving`]) if anything, gives the same
/// results (the same bits) with less work. With `map` (only where [`takes_mapped_input`]), the
/// forward's input was `xv` mapped by it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_slices(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    map: Option<direct::AffineRelu<'_>>,
    wv: &[f32],
    has_bias: bool,
    dy: &[f32],
    dx: Option<Dx<'_>>,
    saved: Option<&Saved>,
) -> (Vec<f32>, Vec<f32>) {
    assert!(map.is_none() || takes_mapped_input(build, g, cout), "conv2d: a mapped input on {g:?}");
    if winograd::applies(g, cout) {
        let (saved, backward) = (saved.map(|s| &s.0), winograd::backward(g));
        return backward(build, g, n, cout, xv, map, wv, has_bias, dy, dx, saved);
    }
    backward_slices_with(build, g, n, cout, xv, map, wv, has_bias, dy, dx, groups_samples(g))
}

/// [`backward_slices`], one sample per input-gradient product or (`grouped`) [`BATCH_CHUNK`].
#[allow(clippy::too_many_arguments)]
fn backward_slices_with(
    build: Build,
    g: &Geom,
    n: usize,
    cout: usize,
    xv: &[f32],
    map: Option<direct::AffineRelu<'_>>,
    wv: &[f32],
    has_bias: bool,
    dy: &[f32],
    dx: Option<Dx<'_>>,
    grouped: bool,
) -> (Vec<f32>, Vec<f32>) {
    let g = *g;
    let (kd, pd) = (g.kd(), g.pd());
    let (xs, ys) = (g.cin * g.h * g.w, cout * pd);
    // Grouped (see `groups_samples`): the group's im2col side by side, each sample's weight
    // gradient product reading its columns, and one input-gradient product for the group.
    let grouped = grouped && !g.direct();
    let gp = if grouped { BATCH_CHUNK * pd } else { pd };
    let col_len = if g.direct() { 0 } else { kd * gp };
    // 3x3 "same" convs on narrow planes with few output channels sum their weight and input
    // gradients straight from the padded input and dy (`direct::weight_grad`, `input_grad`: the
    // same bits) where the CPU has AVX-512.
    let direct_grads = build == Build::Avx2
        && direct::grad_available()
        && direct::grad_applies(&g, cout)
        && !grouped;
    assert!(map.is_none() || direct_grads, "conv2d: a mapped input on {g:?}");
    let kc = k_piece(kd, cout, pd);
    // The scratch's first part: im2col for the weight gradient, or the direct kernel's.
    let wg_len = if direct_grads { direct::grad_scratch_len(&g, cout) } else { col_len };
    let input_grad = dx.is_some();
    // One group of up to BATCH_CHUNK samples: returns its (dW, db) partial sums and,
    // when `dx` is given, adds the input gradient of its samples into it. Grouped, the
    // scratch also holds the group's dy side by side (cout x gs*pd).
    let dcol_len = match (input_grad, grouped) {
        (false, _) => 0,
        (true, false) if direct_grads => direct::input_grad_scratch_len(&g, cout),
        (true, false) => col_len,
        (true, true) => col_len + cout * gp,
    };
    let group_in = |c: usize, dx: Option<Dx<'_>>, buf: &mut [f32], par: Par| {
        build.run(
            #[inline(always)]
            || {
                let (col, dcol) = buf.split_at_mut(wg_len);
                let s0 = c * BATCH_CHUNK;
                let s1 = (s0 + BATCH_CHUNK).min(n);
                // dW transposed (kd x cout): see the product below.
                let mut dw = vec![0.0f32; kd * cout];
                let mut db = vec![0.0f32; if has_bias { cout } else { 0 }];
                // The direct kernel writes a `Write` piece itself; other paths add into it zeroed.
                let (mut dx, mut dx_write) = match dx {
                    Some(Dx::Write(d)) if direct_grads => (None, Some(d)),
                    d => (d.map(Dx::into_add), None),
                };
                let cols = (s1 - s0) * pd;
                if grouped {
                    for ni in s0..s1 {
                        let xn = &xv[ni * xs..(ni + 1) * xs];
                        im2col_rs(&g, xn, &mut col[(ni - s0) * pd..], cols);
                    }
                    // dW^T in blocks of rows, each summed over the group's samples while it is
                    // in cache (ResNet-18's last stage has a 9.4 MB weight gradient and only 16
                    // pixels a sample). The inner dimension is one piece of pd <= 64 whatever
                    // the block (see `small_branch`), so the bits are the per-sample product's.
                    let rows = ((1 << 16) / cout).max(64) / 16 * 16;
                    for r0 in (0..kd).step_by(rows) {
                        let rm = rows.min(kd - r0);
                        for ni in s0..s1 {
                            let layout = Layout { rs: cols, cs: 1 };
                            let at = r0 * cols + (ni - s0) * pd;
                            Gemm {
                                m: rm,
                                n: cout,
                                k: pd,
                                lhs: Operand { data: &col[at..kd * cols], layout },
                                rhs: Operand::transposed(&dy[ni * ys..(ni + 1) * ys], pd),
                                accumulate: ni > s0,
                            }
                            .run(
                                &mut dw[r0 * cout..(r0 + rm) * cout],
                                Layout::row_major(cout),
                                par,
                            );
                        }
                    }
                }
                for ni in s0..s1 {
                    let dyn_ = &dy[ni * ys..(ni + 1) * ys];
                    let xn = &xv[ni * xs..(ni + 1) * xs];
                    if has_bias {
                        for (d, row) in db.iter_mut().zip(dyn_.chunks_exact(pd)) {
                            *d += sum_f32(row);
                        }
                    }
                    if grouped {
                        continue;
                    }
                    if direct_grads {
                        direct::weight_grad(&g, xn, map, dyn_, cout, kc, col, &mut dw, ni > s0);
                    } else {
                        let cm = if g.direct() {
                            Operand::row_major(xn, pd)
                        } else {
                            im2col(&g, xn, col);
                            Operand::row_major(col, pd)
                        };
                        // dW^T (kd x cout) += col_n (kd x pd) * dy_n^T (pd x cout). `gemm`
                        // computes a row-major destination as its transpose, so this is
                        // dW = dy_n * col_n^T with the tiles along cout: it then packs dy_n
                        // (cout x pd) rather than the kernel-size-squared times larger
                        // col_n, which for a ResNet's 16-channel layers was 10% of a step.
                        // Each element is the same chain of multiply-adds over pd in the
                        // same blocks either way (the blocking depends on pd only), so the
                        // bits are those of dy_n * col_n^T.
                        Gemm {
                            m: kd,
                            n: cout,
                            k: pd,
                            lhs: cm,
                            rhs: Operand::transposed(dyn_, pd),
                            accumulate: ni > s0,
                        }
                        .run(&mut dw, Layout::row_major(cout), par);
                    }
                    if let Some(dx) = dx_write.as_deref_mut() {
                        let dxn = Dx::Write(&mut dx[(ni - s0) * xs..(ni - s0 + 1) * xs]);
                        direct::input_grad(&g, dyn_, wv, cout, dcol, dxn);
                    }
                    if let Some(dx) = dx.as_deref_mut() {
                        let dxn = &mut dx[(ni - s0) * xs..(ni - s0 + 1) * xs];
                        if direct_grads {
                            direct::input_grad(&g, dyn_, wv, cout, dcol, Dx::Add(dxn));
                        } else {
                            // dcol (kd x pd) = W^T (kd x cout) * dy_n (cout x pd)
                            let (dst, acc): (&mut [f32], bool) =
                                if g.direct() { (dxn, true) } else { (dcol, false) };
                            Gemm {
                                m: kd,
                                n: pd,
                                k: cout,
                                lhs: Operand::transposed(wv, kd),
                                rhs: Operand::row_major(dyn_, pd),
                                accumulate: acc,
                            }
                            .run(dst, Layout::row_major(pd), par);
                            if !g.direct() {
                                col2im_add(&g, dcol, dxn);
                            }
                        }
                    }
                }
                if let Some(dx) = dx.filter(|_| grouped) {
                    // dcol (kd x gs*pd) = W^T (kd x cout) * dy_group (cout x gs*pd)
                    let (dcol, dyg) = dcol.split_at_mut(kd * gp);
                    let (dcol, dyg) = (&mut dcol[..kd * cols], &mut dyg[..cout * cols]);
                    for ni in s0..s1 {
                        let dyn_ = &dy[ni * ys..(ni + 1) * ys];
                        for (co, src) in dyn_.chunks_exact(pd).enumerate() {
                            let at = co * cols + (ni - s0) * pd;
                            dyg[at..at + pd].copy_from_slice(src);
                        }
                    }
                    let kc = if small_branch(kd, pd) { SMALL_KC } else { cout };
                    Gemm {
                        m: kd,
                        n: cols,
                        k: cout,
                        lhs: Operand::transposed(wv, kd),
                        rhs: Operand::row_major(dyg, cols),
                        accumulate: false,
                    }
                    .run_k_pieces(dcol, Layout::row_major(cols), par, kc);
                    for (s, dxn) in dx.chunks_exact_mut(xs).enumerate() {
                        col2im_add_rs(&g, &mut dcol[s * pd..], dxn, cols);
                    }
                }
                (dw, db)
            },
        )
    };
    let group = |c: usize, dx: Option<Dx<'_>>, par: Par| {
        with_scratch(wg_len + dcol_len, |buf| group_in(c, dx, buf, par))
    };
    let groups = n.div_ceil(BATCH_CHUNK);
    let partials = map_groups(groups, dx, BATCH_CHUNK * xs, group);
    reduce_in_order(partials)
        .unwrap_or_else(|| (vec![0.0; kd * cout], vec![0.0; if has_bias { cout } else { 0 }]))
}

/// `write(c, out_c, scratch, par)` for each consecutive piece `out_c` of `chunk` floats of `out`
/// (the last may be shorter), as rayon tasks (each with its thread's `scratch` floats, told to
/// stay on its thread) or one after another (sharing one scratch, told to use the pool), as
/// [`tasks_in_parallel`] says: the forward passes' per-sample or per-group loop.
pub(super) fn write_chunks(
    out: &mut [MaybeUninit<f32>],
    chunk: usize,
    scratch: usize,
    write: impl Fn(usize, &mut [MaybeUninit<f32>], &mut [f32], Par) + Sync,
) {
    if tasks_in_parallel(out.len().div_ceil(chunk)) {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, oc)| with_scratch(scratch, |s| write(c, oc, s, Par::Seq)));
    } else {
        with_scratch(scratch, |s| {
            for (c, oc) in out.chunks_mut(chunk).enumerate() {
                write(c, oc, s, Par::Pool);
            }
        });
    }
}

/// `group(c, dx_c, par)` for each of `groups` groups of samples, in parallel as rayon tasks
/// (each told to stay on its thread) or one after another (each told to use the pool), as
/// [`tasks_in_parallel`] says; `dx` (the input gradient, when given) is cut into the groups'
/// chunks of `gx` floats. Returns the results in group order.
pub(super) fn map_groups<R: Send>(
    groups: usize,
    dx: Option<Dx<'_>>,
    gx: usize,
    group: impl Fn(usize, Option<Dx<'_>>, Par) -> R + Sync,
) -> Vec<R> {
    let pieces: Vec<Option<Dx<'_>>> = match dx {
        Some(dx) => dx.chunks(gx).into_iter().map(Some).collect(),
        None => (0..groups).map(|_| None).collect(),
    };
    if tasks_in_parallel(groups) {
        pieces.into_par_iter().enumerate().map(|(c, d)| group(c, d, Par::Seq)).collect()
    } else {
        pieces.into_iter().enumerate().map(|(c, d)| group(c, d, Par::Pool)).collect()
    }
}

/// Per-group partial sums (weight gradient, bias gradient) added in group order: each element
/// adds the groups' values one after another, in chunks of elements spread over the pool
/// (ResNet-18's weight gradients are 16 partial sums of up to 9.4 MB each; one thread adding
/// them was ~2% of its one-thread step, `perf`, 2026-12-06, Intel Xeon with AVX-512, 2 cores).
/// `None` for no groups.
pub(super) fn reduce_in_order(partials: Vec<(Vec<f32>, Vec<f32>)>) -> Option<(Vec<f32>, Vec<f32>)> {
    let mut it = partials.into_iter();
    let (mut dw_tot, mut db_tot) = it.next()?;
    let rest: Vec<(Vec<f32>, Vec<f32>)> = it.collect();
    dw_tot.par_chunks_mut(ELEM_CHUNK).enumerate().for_each(|(ci, chunk)| {
        let at = ci * ELEM_CHUNK;
        for (dw, _) in &rest {
            for (t, v) in chunk.iter_mut().zip(&dw[at..]) {
                *t += v;
            }
        }
    });
    for (_, db) in &rest {
        for (t, v) in db_tot.iter_mut().zip(db) {
            *t += v;
        }
    }
    Some((dw_tot, db_tot))
}

/// Adds a weight gradient computed transposed (`dw_t`, kd x cout, from [`backward_slices`]) into
/// the (cout x kd) gradient `dw`.
pub(crate) fn add_weight_grad(dw: &mut [f32], dw_t: &[f32], kd: usize, cout: usize) {
    // One add per element, so the rows may run in parallel.
    let min_rows = (ELEM_CHUNK / kd.max(1)).max(1);
    dw.par_chunks_exact_mut(kd).enumerate().with_min_len(min_rows).for_each(|(co, row)| {
        for (r, d) in row.iter_mut().enumerate() {
            *d += dw_t[r * cout + co];
        }
    });
}

/// [`conv2d`] with its per-sample loops (im2col, col2im, bias and gradient sums) compiled for
/// `build` in forward and backward, so tests can compare the builds.
pub(crate) fn conv2d_with<Tp: Tape<f32, Cpu>>(
    build: Build,
    x: T4<Tp>,
    w: &T1,
    b: Option<&T1>,
    cfg: Conv2dCfg,
    input_grad: bool,
) -> T4<Tp> {
    let x = x.contiguous();
    let n = x.shape().0;
    let g = geometry(*x.shape(), w, b, cfg);
    let (cout, kd) = (cfg.out_channels, g.kd());
    let (x, mut tape) = x.split_tape();
    let xv = read(&x);
    let wv = read(w);
    let bv = b.map(read);
    let (y, saved) = forward_slices_saving(
        build,
        &g,
        n,
        cout,
        &xv,
        &wv,
        bv.as_deref(),
        Tp::OWNS_TAPE,
        None,
        None,
    );
    let out = x.device().tensor_from_vec(y, (n, cout, g.ho, g.wo));

    if Tp::OWNS_TAPE {
        let (x_g, w_g, out_g) = (x.ghost(), w.ghost(), out.ghost());
        let b_g = b.map(|b| b.ghost());
        tape.add_backward_op(move |grads| {
            let dy = take_grad!(grads, out_g);
            let (dw_tot, db_tot) = {
                let dx: &mut Vec<f32> = grads.get_or_alloc_mut(&x_g)?;
                let dx = input_grad.then_some(Dx::Add(dx.as_mut_slice()));
                let s = saved.as_ref();
                backward_slices(build, &g, n, cout, &xv, None, &wv, b_g.is_some(), &dy, dx, s)
            };
            drop(dy);
            add_weight_grad(grads.get_or_alloc_mut(&w_g)?, &dw_tot, kd, cout);
            if let Some(b_g) = &b_g {
                let db: &mut Vec<f32> = grads.get_or_alloc_mut(b_g)?;
                for (d, v) in db.iter_mut().zip(&db_tot) {
                    *d += v;
                }
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every "same" geometry a network or an edge case can give: 3x3 and 5x5 kernels, planes from
    /// 1x1 up, non-square planes, and a 1x1 kernel; (cin, h, w, k) with padding (k - 1) / 2.
    const SAME: [(usize, usize, usize, usize); 10] = [
        (1, 1, 1, 3),
        (2, 1, 4, 3),
        (1, 3, 1, 3),
        (2, 2, 2, 3),
        (3, 8, 8, 3),
        (2, 5, 7, 3),
        (1, 32, 32, 3),
        (2, 4, 6, 5),
        (1, 2, 3, 5),
        (2, 3, 3, 1),
    ];

    fn same_geom((cin, h, w, k): (usize, usize, usize, usize)) -> Geom {
        let g = Geom::new(cin, h, w, Conv2dCfg::new(4, k, (k - 1) / 2)).unwrap();
        assert!(g.same(), "{cin} {h}x{w} k {k}");
        g
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|f| f.to_bits()).collect()
    }

    /// Products over a group of samples side by side give each sample's output, input gradient
    /// and weight and bias gradients bit for bit as one sample at a time: ResNet-18's last stage
    /// (inner dimension 4,608, several of `gemm`'s k-blocks), ResNet-20's 8x8 stage (one
    /// sample's forward takes `gemm`'s small-size branch with an inner dimension of 576), strided
    /// 3x3 and 1x1 convs, a 5x5 kernel with a bias on a 3x3 plane, 600 output channels (the input
    /// gradient's product in the small-size branch); batches that leave a short group.
    #[test]
    fn grouped_products_equal_one_sample_at_a_time_bit_for_bit() {
        let build = Build::selected();
        // (n, cin, h, cout, kernel, padding, stride, bias)
        let cases = [
            (10, 512, 4, 512, 3, 1, 1, false),
            (9, 64, 8, 64, 3, 1, 1, false),
            (9, 16, 16, 32, 3, 1, 2, false),
            (9, 32, 16, 64, 1, 0, 2, false),
            (3, 4, 3, 6, 5, 2, 1, true),
            (5, 4, 4, 600, 3, 1, 1, false),
        ];
        for (n, cin, h, cout, k, p, s, bias) in cases {
            let cfg = Conv2dCfg::new(cout, k, p).with_stride(s);
            let g = Geom::new(cin, h, h, cfg).unwrap();
            // Grouping is forced here; the rule takes it for planes of at most 32 pixels.
            assert_eq!(groups_samples(&g), g.pd() <= 32, "{g:?}");
            let val = |len: usize, seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 - 1001.0) / 997.0)
                    .collect()
            };
            let xv = val(n * cin * h * h, 1);
            let wv = val(cout * g.kd(), 2);
            let bv = bias.then(|| val(cout, 3));
            let dy = val(n * cout * g.pd(), 4);
            let run = |grouped: bool| {
                let bv = bv.as_deref();
                let y = forward_slices_with(build, &g, n, cout, &xv, None, &wv, bv, grouped, None);
                let mut dx = val(xv.len(), 5);
                let (dw, db) = backward_slices_with(
                    build,
                    &g,
                    n,
                    cout,
                    &xv,
                    None,
                    &wv,
                    bias,
                    &dy,
                    Some(Dx::Add(&mut dx)),
                    grouped,
                );
                [y, dx, dw, db].map(|v| bits(&v))
            };
            let (a, b) = (run(true), run(false));
            for (i, name) in ["y", "dx", "dw", "db"].iter().enumerate() {
                assert!(a[i] == b[i], "{g:?} n {n}: {name} differs");
            }
        }
    }

    /// Every stride-2 geometry [`Geom::polyphase`] takes: 3x3 with padding 1 and 1x1 without
    /// (a ResNet's stage entries and shortcuts), a 5x5 kernel with padding 2, planes from 2x2 up,
    /// non-square planes, rows of more than 16 polyphase pixels (one vector of [`split_avx512`]
    /// and a piece); (cin, h, w, k, p).
    const POLY: [(usize, usize, usize, usize, usize); 10] = [
        (1, 2, 2, 3, 1),
        (2, 4, 4, 3, 1),
        (3, 8, 6, 3, 1),
        (2, 32, 32, 3, 1),
        (4, 16, 16, 1, 0),
        (2, 8, 2, 1, 0),
        (1, 6, 10, 5, 2),
        (2, 4, 4, 5, 2),
        (1, 4, 40, 3, 1),
        (2, 2, 64, 1, 0),
    ];

    /// The AVX-512 rows of [`deinterleave`] and [`interleave`] move what the element loops move,
    /// for every row length from 1 to 40 polyphase pixels (whole vectors, pieces, both), and
    /// write nothing past the row (the buffers are longer and checked).
    #[test]
    fn polyphase_rows_avx512_equal_the_element_loops() {
        if direct::Isa::detected() != Some(direct::Isa::Avx512) {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for wo in 1..=40 {
            let row: Vec<f32> = (0..2 * wo + 5).map(|i| i as f32 - 0.5).collect();
            let (mut even, mut odd) = (vec![f32::NAN; wo + 3], vec![f32::NAN; wo + 3]);
            // SAFETY: the CPU has AVX-512 (checked above).
            unsafe { split_avx512(&row[..2 * wo], &mut even[..wo], &mut odd[..wo]) };
            for j in 0..wo {
                assert_eq!((even[j], odd[j]), (row[2 * j], row[2 * j + 1]), "wo {wo} j {j}");
            }
            assert!(even[wo..].iter().chain(&odd[wo..]).all(|v| v.is_nan()), "wo {wo}");
            let mut back = vec![f32::NAN; 2 * wo + 5];
            // SAFETY: as above.
            unsafe { merge_avx512(&even[..wo], &odd[..wo], &mut back[..2 * wo]) };
            assert_eq!(bits(&back[..2 * wo]), bits(&row[..2 * wo]), "wo {wo}");
            assert!(back[2 * wo..].iter().all(|v| v.is_nan()), "wo {wo}");
        }
    }

    fn poly_geom((cin, h, w, k, p): (usize, usize, usize, usize, usize)) -> Geom {
        let g = Geom::new(cin, h, w, Conv2dCfg::new(4, k, p).with_stride(2)).unwrap();
        assert!(g.polyphase() && !g.same(), "{cin} {h}x{w} k {k} p {p}");
        g
    }

    /// Which stride-2 convs the polyphase path takes: not odd planes (a 28x28 input's 7x7
    /// stage), nor a 3x3 kernel without padding (its output is not half the input).
    #[test]
    fn polyphase_takes_even_planes_halved() {
        let geom = |h: usize, k: usize, p: usize, s: usize| {
            Geom::new(8, h, h, Conv2dCfg::new(4, k, p).with_stride(s)).unwrap()
        };
        assert!(geom(32, 3, 1, 2).polyphase() && geom(8, 1, 0, 2).polyphase());
        assert!(!geom(7, 3, 1, 2).polyphase() && !geom(14, 3, 0, 2).polyphase());
        assert!(!geom(16, 3, 1, 1).polyphase() && !geom(15, 1, 0, 2).polyphase());
    }

    /// The polyphase im2col writes what the segment loop writes, element for element, into
    /// column buffers full of garbage beforehand, also with rows further apart than a sample.
    #[test]
    fn polyphase_im2col_equals_the_segment_loop() {
        for shape in POLY {
            let g = poly_geom(shape);
            let x: Vec<f32> = (0..g.cin * g.h * g.w).map(|i| 1.0 + i as f32).collect();
            for rs in [g.pd(), g.pd() + 3] {
                let (mut a, mut b) = (vec![f32::NAN; g.kd() * rs], vec![-7.0; g.kd() * rs]);
                im2col_poly(&g, &x, &mut a, rs);
                im2col_segments(&g, &x, &mut b, rs);
                for r in 0..g.kd() {
                    let row = r * rs..r * rs + g.pd();
                    assert_eq!(bits(&a[row.clone()]), bits(&b[row]), "{shape:?} rs {rs}");
                }
            }
        }
    }

    /// A column-matrix gradient whose padding entries are NaN (so adding one anywhere would
    /// show) and an input gradient holding +0.0, -0.0 and other values (so a stray +0.0 added to
    /// a -0.0 would show), for the col2im tests.
    fn col2im_inputs(g: &Geom) -> (Vec<f32>, Vec<f32>) {
        let size = g.cin * g.h * g.w;
        // The im2col of a plane of ones marks which entries read the image (1) or padding (0).
        let mut reads = vec![0.0; g.kd() * g.pd()];
        im2col_segments(g, &vec![1.0; size], &mut reads, g.pd());
        let col = reads
            .iter()
            .enumerate()
            .map(|(i, &m)| if m == 1.0 { 0.25 * (i % 13) as f32 - 1.5 } else { f32::NAN })
            .collect();
        (col, (0..size).map(|i| [0.0, -0.0, 3.0, -0.0, -2.5][i % 5]).collect())
    }

    /// The polyphase col2im adds what the segment loop adds, bit for bit, on the inputs of
    /// [`same_conv_col2im_equals_the_segment_loop`]; input pixels no window reads (three of
    /// every four for a 1x1 kernel) keep their values.
    #[test]
    fn polyphase_col2im_equals_the_segment_loop() {
        for shape in POLY {
            let g = poly_geom(shape);
            let (col, dx0) = col2im_inputs(&g);
            let (mut a, mut b) = (dx0.clone(), dx0.clone());
            col2im_poly(&g, &mut col.clone(), &mut a, g.pd());
            col2im_segments(&g, &col, &mut b, g.pd());
            assert_eq!(bits(&a), bits(&b), "{shape:?}");
            assert!(a.iter().all(|v| v.is_finite()));
            assert!(bits(&a) != bits(&dx0), "{shape:?}: nothing was added");
        }
    }

    /// The shifted-plane im2col writes what the segment loop writes, element for element, into
    /// column buffers full of garbage beforehand.
    #[test]
    fn same_conv_im2col_equals_the_segment_loop() {
        for shape in SAME {
            let g = same_geom(shape);
            let x: Vec<f32> = (0..g.cin * g.h * g.w).map(|i| 1.0 + i as f32).collect();
            let (mut a, mut b) = (vec![f32::NAN; g.kd() * g.pd()], vec![-7.0; g.kd() * g.pd()]);
            im2col_same(&g, &x, &mut a, g.pd());
            im2col_segments(&g, &x, &mut b, g.pd());
            assert_eq!(bits(&a), bits(&b), "{shape:?}");
        }
    }

    /// The shifted-plane col2im adds what the segment loop adds, bit for bit: on gradients whose
    /// padding entries are NaN (so adding one anywhere would show) and input gradients that hold
    /// +0.0, -0.0 and other values (so a stray +0.0 added to a -0.0 would show).
    #[test]
    fn same_conv_col2im_equals_the_segment_loop() {
        for shape in SAME {
            let g = same_geom(shape);
            let (col, dx0) = col2im_inputs(&g);
            let (mut a, mut b) = (dx0.clone(), dx0);
            col2im_same(&g, &mut col.clone(), &mut a, g.pd());
            col2im_segments(&g, &col, &mut b, g.pd());
            assert_eq!(bits(&a), bits(&b), "{shape:?}");
            assert!(a.iter().all(|v| v.is_finite()));
        }
    }
}
