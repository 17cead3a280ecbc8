//! A direct forward kernel for 3x3 "same" convolutions (stride 1, padding 1) on 16- and 32-wide
//! planes with at most 32 input channels: a ResNet-20's first two stages and stem, a ConvNet's
//! first layer.
//!
//! Why: a 16-channel layer's im2col writes each input nine times and its 144-long products are
//! short for `gemm`'s packing. Here each output row of four output channels is summed in
//! registers straight from a zero-padded copy of the input. On a ResNet-20 training step
//! (`perf`, 2026-12-05, Intel Xeon with AVX-512, 2 cores) the forward convs of those stages went
//! from ~15% of the time (gemm, im2col and its copies) to ~12% (this kernel); in evaluation the
//! kernel is ~30% of the time. `lmc bench` against the previous build, four alternating pairs on
//! a VM drifting by +-10%: ResNet-20 evaluation 1,026/1,165/1,152/964 -> 1,065/1,168/1,199/1,173
//! images/s, training 448/452/482/429 -> 422/428/481/479 (no change beyond the noise), ConvNet-3
//! unchanged. A prototype on 64 channels at 8x8 (batch 128, same host and day) ran at about half
//! `gemm`'s rate (~90 against ~160 GFLOP/s), so the kernel is not used there.
//!
//! The backward pass keeps im2col + `gemm` + col2im. A direct kernel for the input gradient
//! (rows of four input channels summed in registers from a zero-padded dy, one FMA chain per
//! tap over the output channels, the taps added in col2im's order: the same bits in a test
//! written for it; not kept) ran at ~40 GFLOP/s on one thread against ~39-52 for dcol = W^T dy
//! plus col2im (16 channels 32x32, 32 channels 16x16; batch 64), and a ResNet-20 training step
//! got no faster (paired `lmc bench` runs, wall ratio 1.06, 0.999-1.11; 2026-12-06, Intel Xeon
//! with AVX-512, 2 cores): that product's inner dimension is the output channels, so it has no
//! im2col to save.
//!
//! The two target-feature builds share `planes`'s parameter list through a macro: passing the
//! arguments as one struct instead made the kernel ~3x slower (measured, same host and day).
//!
//! Same bits as im2col + `gemm`: each output is `bias + sum` with the sum one chain of fused
//! multiply-adds over (input channel, kernel row, kernel column) in that order, starting from
//! +0.0, with the padding read as +0.0: what `gemm` computes when the inner dimension (9 x input
//! channels, at most 288 here) fits one of its k-blocks, as it does for every size allowed here.
//! The tests compare the two bit for bit on every shape the kernel takes, in every instruction
//! set this CPU has. The kernel needs FMA (it runs compiled for AVX2 + FMA, or for AVX-512);
//! without it, or under `LMC_BASELINE_KERNELS=1`, the convolution keeps im2col + gemm.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use super::conv::Geom;

/// Which compilation of the kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX2 and FMA: 8 floats a vector.
    Fma,
    /// AVX-512F (with AVX2 and FMA): 16 floats a vector.
    Avx512,
}

impl Isa {
    /// The best this CPU has, if any (decided once).
    pub(crate) fn detected() -> Option<Isa> {
        static ISA: OnceLock<Option<Isa>> = OnceLock::new();
        *ISA.get_or_init(|| Isa::all().into_iter().last())
    }

    /// Every kernel build this CPU can run, slowest first (for the tests).
    pub(crate) fn all() -> Vec<Isa> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let mut v = Vec::new();
            if has!("avx2") && has!("fma") {
                v.push(Isa::Fma);
                if has!("avx512f") {
                    v.push(Isa::Avx512);
                }
            }
            v
        }
        #[cfg(not(target_arch = "x86_64"))]
        Vec::new()
    }
}

/// The most input channels the kernel takes: 9 x 32 = 288 terms a sum, within one `gemm`
/// k-block (see the module comment).
const MAX_CIN: usize = 32;

/// Whether the kernel computes this convolution.
pub(crate) fn applies(g: &Geom) -> bool {
    g.same() && g.k == 3 && g.p == 1 && (g.w == 16 || g.w == 32) && g.cin <= MAX_CIN
}

/// Scratch floats [`forward`] needs for one sample (the zero-padded input).
pub(crate) fn scratch_len(g: &Geom) -> usize {
    g.cin * (g.h + 2) * (g.w + 2)
}

/// The weights (cout, cin, 3, 3) regrouped for the kernel: for each block of 4 output channels
/// (the last one padded with zero weights), [cin][tap][4].
pub(crate) fn pack_weights(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let blocks = cout.div_ceil(4);
    let mut p = vec![0.0f32; blocks * cin * 36];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..9 {
                p[((co / 4 * cin + ci) * 9 + t) * 4 + co % 4] = w[(co * cin + ci) * 9 + t];
            }
        }
    }
    p
}

/// One sample: `y` (cout, h, w) = [bias +] conv(x), x (cin, h, w), every element of `y` written
/// (it may start uninitialised); `xp` is scratch of [`scratch_len`] floats (any contents); `wp`
/// from [`pack_weights`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    isa: Isa,
    g: &Geom,
    x: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
    xp: &mut [f32],
    y: &mut [MaybeUninit<f32>],
) {
    let (cin, h, w) = (g.cin, g.h, g.w);
    assert!(applies(g) && x.len() == cin * h * w && y.len() == cout * h * w);
    assert!(xp.len() == scratch_len(g) && wp.len() == cout.div_ceil(4) * cin * 36);
    pad(x, cin, h, w, xp);
    // SAFETY: `Isa` values exist only for instruction sets the CPU has (`Isa::all`).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, w) {
            (Isa::Avx512, 32) => planes_avx512::<32>(xp, wp, bias, y, cin, cout, h),
            (Isa::Avx512, _) => planes_avx512::<16>(xp, wp, bias, y, cin, cout, h),
            (Isa::Fma, 32) => planes_fma::<32>(xp, wp, bias, y, cin, cout, h),
            (Isa::Fma, _) => planes_fma::<16>(xp, wp, bias, y, cin, cout, h),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no Isa exists off x86-64 ({isa:?})")
}

/// Copies each (h, w) plane into the middle of an (h + 2, w + 2) plane of `xp` with a zero
/// border.
fn pad(x: &[f32], cin: usize, h: usize, w: usize, xp: &mut [f32]) {
    let wp = w + 2;
    for (xc, pc) in x.chunks_exact(h * w).zip(xp.chunks_exact_mut((h + 2) * wp)).take(cin) {
        pc[..wp].fill(0.0);
        pc[(h + 1) * wp..].fill(0.0);
        for (row, src) in pc[wp..(h + 1) * wp].chunks_exact_mut(wp).zip(xc.chunks_exact(w)) {
            row[0] = 0.0;
            row[1..=w].copy_from_slice(src);
            row[w + 1] = 0.0;
        }
    }
}

/// [`planes`] compiled with the named target features (the two builds of the kernel).
macro_rules! planes_with {
    ($name:ident, $features:literal) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name<const N: usize>(
            xp: &[f32],
            wp: &[f32],
            bias: Option<&[f32]>,
            y: &mut [MaybeUninit<f32>],
            cin: usize,
            cout: usize,
            h: usize,
        ) {
            planes::<N>(xp, wp, bias, y, cin, cout, h)
        }
    };
}
planes_with!(planes_fma, "avx2,fma");
planes_with!(planes_avx512, "avx512f,avx2,fma");

/// Every output row of every block of 4 output channels.
#[inline(always)]
fn planes<const N: usize>(
    xp: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    cin: usize,
    cout: usize,
    h: usize,
) {
    let row_len = N + 2;
    let plane = (h + 2) * row_len;
    for blk in 0..cout.div_ceil(4) {
        let wb = &wp[blk * cin * 36..(blk + 1) * cin * 36];
        for oy in 0..h {
            // acc[j][ox]: output channel 4 blk + j, row oy. Four rows of N floats stay in
            // registers (8 AVX-512 or 16 AVX2 registers for N = 32).
            let mut acc = [[0.0f32; N]; 4];
            for ci in 0..cin {
                let xc = &xp[ci * plane..(ci + 1) * plane];
                let wc = &wb[ci * 36..(ci + 1) * 36];
                for ky in 0..3 {
                    let row = &xc[(oy + ky) * row_len..(oy + ky + 1) * row_len];
                    for kx in 0..3 {
                        let xs: &[f32; N] = row[kx..kx + N].try_into().expect("N floats");
                        let t = (ky * 3 + kx) * 4;
                        for (j, a) in acc.iter_mut().enumerate() {
                            let wv = wc[t + j];
                            for (a, x) in a.iter_mut().zip(xs) {
                                *a = x.mul_add(wv, *a);
                            }
                        }
                    }
                }
            }
            for (j, a) in acc.iter().enumerate() {
                let co = blk * 4 + j;
                if co >= cout {
                    break;
                }
                let out = &mut y[(co * h + oy) * N..(co * h + oy + 1) * N];
                match bias {
                    Some(b) => {
                        for (o, v) in out.iter_mut().zip(a) {
                            o.write(v + b[co]);
                        }
                    }
                    None => {
                        for (o, v) in out.iter_mut().zip(a) {
                            o.write(*v);
                        }
                    }
                }
            }
        }
    }
}
