//! Direct kernels for 3x3 "same" convolutions (stride 1, padding 1) on 16- and 32-wide planes
//! with at most 32 input channels: the forward (a ResNet-20's first stage and stem, a ConvNet's
//! first layer; 32-channel layers whose planes Winograd's tiles cover run as Winograd) and, with
//! at most 32 output channels, the weight and input gradients.
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
//! `gemm`'s rate (~90 against ~160 GFLOP/s), so the kernel is not used there. On AVX-512 the
//! forward now runs [`fwd_avx512`] (intrinsics, 4 output channels x 96 pixels a block, each
//! weight broadcast for 6 registers): ~12% of a one-thread ResNet-20 step against ~17.6% for
//! the autovectorised rows (`perf`, 2026-12-06, Intel Xeon with AVX-512, 2 cores), which the
//! AVX2 + FMA build keeps.
//!
//! The weight gradient of the same layers (at most 32 output channels) has a direct kernel too,
//! on AVX-512 only ([`weight_grad`]): 9 taps x 16 or 32 output channels of accumulators, each
//! pixel's dy row loaded once and each input value broadcast once for the three taps that read
//! it; dy is transposed to pixel-major first, one 16-channel gather a pixel. One thread, batch
//! 64 (2026-12-06, Intel Xeon with AVX-512, 2 cores; with a scalar transpose): 16 channels at
//! 32x32 51-83 GFLOP/s against im2col + `gemm`'s 38-41, 32 channels at 16x16 72-110 against
//! 58-87 (the VM's speed moved between runs; each pair was timed back to back).
//!
//! Their input gradient has one as well, AVX-512 only too ([`input_grad`]): for 64 pixels (4
//! registers) x 6 input channels x one tap at a time, 24 chains over the output channels in
//! registers, each shifted dy vector loaded once for the 6 channels and each weight broadcast
//! once for the 4 vectors, then added into dx in col2im's tap order. An earlier version with
//! rows of four input channels x one register (and one with 2 x 8) was no faster than `W^T dy`
//! (`gemm`) + col2im; at 4 x 6 its share of a one-thread ResNet-20 step (`perf`, 2026-12-06,
//! Intel Xeon with AVX-512, 2 cores) is ~8.5% where `gemm`'s product and col2im took ~13%.
//!
//! `planes` takes its parameters one by one: passing them as one struct made that
//! autovectorised kernel ~3x slower (measured, same host and day). The intrinsics kernels take
//! structs without harm.
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

use super::batch_norm::affine_relu;
use super::conv::{Dx, Geom};

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

/// A convolution's input given as the batch norm and ReLU that make it: channel c of the input
/// is `relu(x * scale[c] + shift[c])` of the stored `x`, formed while padding (see [`pad`]) with
/// batch norm's own elementwise function ([`affine_relu`]), so the same bits as the norm's
/// output. The ResNets' training path (`model::resnet`) hands its first norm of each block to
/// the second conv this way: the norm's output is then never written out (nor kept for the
/// backward pass, which recomputes it while padding again).
#[derive(Clone, Copy)]
pub(crate) struct AffineRelu<'a> {
    pub(crate) scale: &'a [f32],
    pub(crate) shift: &'a [f32],
}

/// One sample: `y` (cout, h, w) = [bias +] conv(x), x (cin, h, w) (or mapped by `map`), every
/// element of `y` written (it may start uninitialised); `xp` is scratch of [`scratch_len`]
/// floats (any contents); `wp` from [`pack_weights`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    isa: Isa,
    g: &Geom,
    x: &[f32],
    map: Option<AffineRelu<'_>>,
    wp: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
    xp: &mut [f32],
    y: &mut [MaybeUninit<f32>],
) {
    let (cin, h, w) = (g.cin, g.h, g.w);
    assert!(applies(g) && x.len() == cin * h * w && y.len() == cout * h * w);
    assert!(xp.len() == scratch_len(g) && wp.len() == cout.div_ceil(4) * cin * 36);
    pad(x, map, cin, h, w, xp);
    // SAFETY: `Isa` values exist only for instruction sets the CPU has (`Isa::all`).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (isa, w) {
            (Isa::Avx512, _) => fwd_avx512(xp, wp, bias, y, cin, cout, h, w),
            (Isa::Fma, 32) => planes_fma::<32>(xp, wp, bias, y, cin, cout, h),
            (Isa::Fma, _) => planes_fma::<16>(xp, wp, bias, y, cin, cout, h),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("no Isa exists off x86-64 ({isa:?})")
}

/// Copies each (h, w) plane into the middle of an (h + 2, w + 2) plane of `xp` with a zero
/// border. The kernels' widths, 16 and 32, are compiled for their own width, so each row is a
/// few vector moves: with the width a variable every row cost a `memmove` call, and padding x
/// (forward and weight gradient) and dy (input gradient) took ~4.9% of a one-thread ResNet-20
/// step (`perf`, 2026-12-06, Intel Xeon with AVX-512, 2 cores).
///
/// Not padding at all was tried for the AVX-512 forward (2026-12-07, same kind of host): the
/// kernel read `x` itself, a column outside the plane being a masked-off lane of the load and a
/// row outside it a zero vector (the same +0.0 products, so the same bits; the tests passed).
/// The padding of its input was ~1.5% of a one-thread ResNet-20 step, but with runs of 6
/// vectors the compiler spilled registers around the masked loads and ResNet-20 evaluation
/// (one thread, `lmc bench`, three alternating runs) fell from 1,458-1,516 to 1,325-1,390
/// images/s; with runs of 4 vectors it ran at 1,497-1,511, no better than padding. Not kept.
///
/// With `map`, each value is mapped as it is copied (the border stays +0.0, the padding of the
/// mapped input).
fn pad(x: &[f32], map: Option<AffineRelu<'_>>, cin: usize, h: usize, w: usize, xp: &mut [f32]) {
    match (w, map) {
        (32, None) => pad_rows::<32>(x, cin, h, xp),
        (16, None) => pad_rows::<16>(x, cin, h, xp),
        (32, Some(m)) => pad_mapped::<32>(x, m, cin, h, xp),
        (16, Some(m)) => pad_mapped::<16>(x, m, cin, h, xp),
        // Every caller takes only what `applies` takes: 16- and 32-wide planes.
        _ => unreachable!("direct::pad on a {w}-wide plane"),
    }
}

/// [`pad`] for planes `W` wide.
#[inline(always)]
fn pad_rows<const W: usize>(x: &[f32], cin: usize, h: usize, xp: &mut [f32]) {
    let wp = W + 2;
    for (xc, pc) in x.chunks_exact(h * W).zip(xp.chunks_exact_mut((h + 2) * wp)).take(cin) {
        let (top, rest) = pc.split_at_mut(wp);
        top.fill(0.0);
        let (mid, bottom) = rest.split_at_mut(h * wp);
        bottom.fill(0.0);
        for (row, src) in mid.chunks_exact_mut(wp).zip(xc.chunks_exact(W)) {
            let row: &mut [f32] = row;
            row[0] = 0.0;
            let dst: &mut [f32; W] = (&mut row[1..=W]).try_into().expect("W floats");
            *dst = src.try_into().expect("W floats");
            row[W + 1] = 0.0;
        }
    }
}

/// [`pad_rows`] with each value mapped by `map` (its channel's scale and shift).
#[inline(always)]
fn pad_mapped<const W: usize>(
    x: &[f32],
    map: AffineRelu<'_>,
    cin: usize,
    h: usize,
    xp: &mut [f32],
) {
    let wp = W + 2;
    assert!(map.scale.len() == cin && map.shift.len() == cin, "direct::pad: {cin} channels");
    let planes = x.chunks_exact(h * W).zip(xp.chunks_exact_mut((h + 2) * wp));
    for ((xc, pc), (s, t)) in planes.zip(map.scale.iter().zip(map.shift)) {
        let (top, rest) = pc.split_at_mut(wp);
        top.fill(0.0);
        let (mid, bottom) = rest.split_at_mut(h * wp);
        bottom.fill(0.0);
        for (row, src) in mid.chunks_exact_mut(wp).zip(xc.chunks_exact(W)) {
            let row: &mut [f32] = row;
            row[0] = 0.0;
            let dst: &mut [f32; W] = (&mut row[1..=W]).try_into().expect("W floats");
            let src: &[f32; W] = src.try_into().expect("W floats");
            for (d, v) in dst.iter_mut().zip(src) {
                *d = affine_relu(*v, *s, *t);
            }
            row[W + 1] = 0.0;
        }
    }
}

/// [`planes`] compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn planes_fma<const N: usize>(
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

/// The AVX-512 forward: for each group of 4 blocks of 4 output channels ([`FWD_GROUP`]), each
/// run of 96 pixels (6 registers: three 32-wide rows or six 16-wide rows; the last run as many
/// registers as are left) and each block of the group ([`fwd_run`]), 4 x 6 chains over
/// (ci, ky, kx) in registers, each shifted input vector loaded once for the 4 channels and each
/// weight broadcast once for the 6 vectors. The autovectorised [`planes`] keeps 4 channels x one
/// row (one or two registers) and so broadcasts each weight for one or two multiply-adds; it
/// was ~17.6% of a one-thread ResNet-20 step against ~13% for the weight gradient's kernel with
/// the same work (`perf`, 2026-12-06, Intel Xeon with AVX-512, 2 cores). With the blocks
/// outermost, a loop over the taps and the last run padded to 6 registers it ran one layer
/// (batch 128, one thread, pad included, least of 8 alternating runs, 2026-12-06, same host) in
/// 4.48 ms at 16 channels 32x32 and 4.49 ms at 32 channels 16x16; with the runs outside the
/// blocks and the taps written out (and [`pad_rows`]), 3.88 and 3.61 ms.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn fwd_avx512(
    xp: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    y: &mut [MaybeUninit<f32>],
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
) {
    let pd = h * w;
    assert!(w.is_multiple_of(16) && xp.len() == cin * (h + 2) * (w + 2) && y.len() == cout * pd);
    assert!(wp.len() == cout.div_ceil(4) * cin * 36 && bias.is_none_or(|b| b.len() == cout));
    let a = FwdArgs { xp, wp, bias, cin, cout, h, w };
    let blocks = cout.div_ceil(4);
    for b0 in (0..blocks).step_by(FWD_GROUP) {
        let bs = b0..(b0 + FWD_GROUP).min(blocks);
        let mut q0 = 0;
        while q0 < pd {
            // Runs of 6 vectors, the last one of what is left (16 pixels a vector; pd is a
            // multiple of 16).
            q0 += match (pd - q0) / 16 {
                6.. => fwd_run::<6>(&a, bs.clone(), q0, y),
                5 => fwd_run::<5>(&a, bs.clone(), q0, y),
                4 => fwd_run::<4>(&a, bs.clone(), q0, y),
                3 => fwd_run::<3>(&a, bs.clone(), q0, y),
                2 => fwd_run::<2>(&a, bs.clone(), q0, y),
                _ => fwd_run::<1>(&a, bs.clone(), q0, y),
            };
        }
    }
}

/// Blocks of 4 output channels [`fwd_avx512`] runs on a run of pixels one after another (16
/// output channels): a run's input rows are read from L1 for all of them. With every block on
/// every run, ConvNet-3's first layer (3 -> 128 channels, 32x32) ran 2x slower than with the
/// blocks outermost (18.2 against 8.8 ms a batch of 128, one thread): each run then stored into
/// 128 output planes 4 KiB apart. In groups of 2, 4 or 8 blocks it ran at 7.5-11 ms on that VM,
/// and ResNet-20's 16- and 32-channel layers within its noise (2026-12-06, Intel Xeon with
/// AVX-512, 2 cores).
const FWD_GROUP: usize = 4;

/// What [`fwd_avx512`]'s runs read.
#[cfg(target_arch = "x86_64")]
struct FwdArgs<'a> {
    xp: &'a [f32],
    wp: &'a [f32],
    bias: Option<&'a [f32]>,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
}

/// The output pixels `q0 .. q0 + 16 V` of the given blocks of 4 output channels (they run on
/// these pixels one after another while their input rows are in L1): 4 x V chains over (ci, ky, kx)
/// in registers, the 9 taps written out so each load's address is a base register plus a
/// constant (the version before, with a loop over the taps that kept their offsets on the
/// stack, ran at ~75% of this rate when the two were alternated in one process; 2026-12-06,
/// Intel Xeon with AVX-512, 2 cores).
/// Returns the pixels done, 16 V.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn fwd_run<const V: usize>(
    a: &FwdArgs,
    blocks: std::ops::Range<usize>,
    q0: usize,
    y: &mut [MaybeUninit<f32>],
) -> usize {
    use std::arch::x86_64::*;
    // One tap: the V shifted input vectors at `off` from each of `px`, each weight of `wt`
    // broadcast for the V.
    #[inline(always)]
    unsafe fn tap<const V: usize>(
        acc: &mut [[__m512; V]; 4],
        px: &[*const f32; V],
        off: usize,
        wt: *const f32,
    ) {
        let xv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(px[v].add(off)));
        for (j, aj) in acc.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*wt.add(j));
            for v in 0..V {
                aj[v] = _mm512_fmadd_ps(b, xv[v], aj[v]);
            }
        }
    }
    let &FwdArgs { xp, wp, bias, cin, cout, h, w } = a;
    let (pd, row_len) = (h * w, w + 2);
    let plane = (h + 2) * row_len;
    assert!(q0 + 16 * V <= pd);
    let (r1, r2) = (row_len, 2 * row_len);
    // Vector v: output pixels q0 + 16 v .. + 16 of row y_v from column x_v; tap (ky, kx) reads
    // the padded input from (y_v + ky) row_len + x_v + kx.
    let base: [usize; V] = std::array::from_fn(|v| {
        let q = q0 + 16 * v;
        q / w * row_len + q % w
    });
    for blk in blocks {
        let mut wt = wp.as_ptr().add(blk * cin * 36);
        let mut px: [*const f32; V] = std::array::from_fn(|v| xp.as_ptr().add(base[v]));
        let mut acc = [[_mm512_setzero_ps(); V]; 4];
        for _ in 0..cin {
            // SAFETY: base + 2 row_len + 2 + 16 <= (h - 1) row_len + w - 16 + 2 row_len + 18 =
            // plane, within the current input plane (one of cin); the 36 weights of this
            // (block, ci) end within wp (its length asserted by the caller).
            tap(&mut acc, &px, 0, wt);
            tap(&mut acc, &px, 1, wt.add(4));
            tap(&mut acc, &px, 2, wt.add(8));
            tap(&mut acc, &px, r1, wt.add(12));
            tap(&mut acc, &px, r1 + 1, wt.add(16));
            tap(&mut acc, &px, r1 + 2, wt.add(20));
            tap(&mut acc, &px, r2, wt.add(24));
            tap(&mut acc, &px, r2 + 1, wt.add(28));
            tap(&mut acc, &px, r2 + 2, wt.add(32));
            px = px.map(|p| p.wrapping_add(plane));
            wt = wt.add(36);
        }
        let live = (cout - blk * 4).min(4);
        for (j, aj) in acc.iter().enumerate().take(live) {
            let co = blk * 4 + j;
            for (v, av) in aj.iter().enumerate() {
                let out = match bias {
                    Some(b) => _mm512_add_ps(*av, _mm512_set1_ps(b[co])),
                    None => *av,
                };
                // SAFETY: co pd + q0 + 16 v + 16 <= cout pd (asserted above); f32 and
                // MaybeUninit<f32> have the same layout.
                _mm512_storeu_ps(y.as_mut_ptr().add(co * pd + q0 + 16 * v).cast(), out);
            }
        }
    }
    16 * V
}

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
            // registers (16 AVX2 registers for N = 32; AVX-512 runs `fwd_avx512`).
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

/// Whether [`weight_grad`] and [`input_grad`] compute this convolution's gradients: where the
/// forward kernel applies with at most 32 output channels (a ResNet-20's stem and first two
/// stages), except where the weight gradient is a product of at most 16 x 16 outputs (9 input
/// channels x `cout` <= 256), which `ops::gemm` sums itself (`gemm::reduces_horizontally`;
/// left there, as before that existed). More output channels are left to `gemm`: the transposed
/// dy then outgrows L1, and with ConvNet-3's 3 -> 128 channel CIFAR layer through the kernel its
/// training looked ~5% slower (`lmc bench`, 2 threads, three alternating runs, 348-365 against
/// 381-410 images/s; 2026-12-06, Intel Xeon with AVX-512, 2 cores; within this VM's noise, so
/// not a firm figure either way).
pub(crate) fn grad_applies(g: &Geom, cout: usize) -> bool {
    applies(g) && cout <= 32 && g.kd() * cout > 16 * 16
}

/// Whether this CPU runs [`weight_grad`] and [`input_grad`]: they need AVX-512 (decided once).
/// An AVX2 + FMA build of the weight gradient's (8 floats a register, and 16 registers: the
/// broadcast inputs no longer fit beside the accumulators) ran at ~24 GFLOP/s where im2col + `gemm` ran at 38-60 (one thread, batch 64,
/// 16 channels 32x32 and 32 channels 16x16; 2026-12-06, Intel Xeon with AVX-512, 2 cores), so
/// without AVX-512 the gradients stay im2col + `gemm` (+ col2im).
pub(crate) fn grad_available() -> bool {
    Isa::detected() == Some(Isa::Avx512)
}

/// Registers of output channels one pass of [`weight_grad`]'s kernel sums side by side per
/// kernel tap: two where there are 32 or more output channels (18 accumulators of the 32
/// registers; each broadcast input then feeds two multiply-adds), else one.
fn grad_regs(cout: usize) -> usize {
    if cout >= 32 {
        2
    } else {
        1
    }
}

/// Scratch floats [`weight_grad`] needs for one sample: the zero-padded input, then dy transposed
/// (pixel-major, output channels padded to a whole pass).
pub(crate) fn grad_scratch_len(g: &Geom, cout: usize) -> usize {
    scratch_len(g) + g.h * g.w * cout.next_multiple_of(16 * grad_regs(cout))
}

/// One sample's weight gradient, transposed as `conv::backward_slices` keeps it: `dwt` (9 cin x
/// cout, row (ci, ky, kx)) gets `x_col dy^T`, added to what is there when `accumulate`, where
/// `x_col` is the sample's im2col (9 cin x h w), without building it; with `map`, the im2col of
/// the mapped input (see [`AffineRelu`]).
///
/// Same bits as the `gemm` product it replaces: each element is summed over the pixels in
/// pieces of `kc` ([`super::gemm::k_piece`]), each piece one chain of fused multiply-adds in
/// pixel order from +0.0, and the pieces added to the destination in order (the first one
/// written when not `accumulate`). Each pass keeps 9 taps x one block of output channels in
/// registers and reads the pixels once: a 3x3 tap is a shifted read of the padded plane, so
/// the nine-times-larger im2col matrix is neither written nor packed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad(
    g: &Geom,
    x: &[f32],
    map: Option<AffineRelu<'_>>,
    dy: &[f32],
    cout: usize,
    kc: usize,
    scratch: &mut [f32],
    dwt: &mut [f32],
    accumulate: bool,
) {
    let (cin, h, w) = (g.cin, g.h, g.w);
    let (pd, v) = (h * w, grad_regs(cout));
    let cb = 16 * v;
    let cpad = cout.next_multiple_of(cb);
    assert!(grad_applies(g, cout) && x.len() == cin * pd && dy.len() == cout * pd && kc > 0);
    assert!(dwt.len() == cin * 9 * cout && scratch.len() == grad_scratch_len(g, cout));
    assert!(grad_available(), "direct::weight_grad needs AVX-512");
    let (xp, dyt) = scratch.split_at_mut(scratch_len(g));
    pad(x, map, cin, h, w, xp);
    // SAFETY: the CPU has AVX-512 (asserted above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        transpose_avx512(dy, cout, pd, cpad, dyt)
    };
    let a = GradArgs { xp, dyt, cin, cout, cpad, h, kc, accumulate };
    // SAFETY: the CPU has AVX-512 (`grad_available`, asserted above).
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match (w, v) {
            (32, 2) => grad_avx512::<32, 2>(&a, dwt),
            (_, 2) => grad_avx512::<16, 2>(&a, dwt),
            (32, _) => grad_avx512::<32, 1>(&a, dwt),
            _ => grad_avx512::<16, 1>(&a, dwt),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("grad_available is false off x86-64 ({v})")
}

/// `dyt` (pd x cpad, pixel-major) = dy (cout x pd) transposed, the channels from `cout` to `cpad`
/// zero: [`crate::cpu::transpose`]'s 8 x 8 register tiles. (A scalar loop of 64 pixels at a time
/// spent ~4.5% of a ResNet-20 step, 2026-12-06, Intel Xeon with AVX-512; one 16-channel gather a
/// pixel after it still ~3.7% of a one-thread step, `perf`, 2026-12-08, AMD EPYC (Zen 4) with
/// AVX-512, 2 cores: gathers are slow on both vendors' cores.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_avx512(dy: &[f32], cout: usize, pd: usize, cpad: usize, dyt: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(dy.len() == cout * pd && dyt.len() == pd * cpad && cpad.is_multiple_of(16));
    crate::cpu::transpose(crate::cpu::Build::Avx2, dy, pd, dyt, cpad, cout, pd);
    if cpad > cout {
        let live = (cout % 16) as u32;
        // Lanes from `live` on in the last partial group of 16, and any whole groups after it.
        let (c0, mask) = (cout - cout % 16, !((1u32 << live) - 1) as u16);
        for p in 0..pd {
            let row = dyt.as_mut_ptr().add(p * cpad);
            // SAFETY: every store ends at p cpad + cpad <= pd cpad.
            _mm512_mask_storeu_ps(row.add(c0), mask, _mm512_setzero_ps());
            for c in (c0 + 16..cpad).step_by(16) {
                _mm512_storeu_ps(row.add(c), _mm512_setzero_ps());
            }
        }
    }
}

/// What [`weight_grad`]'s kernel reads.
struct GradArgs<'a> {
    xp: &'a [f32],
    dyt: &'a [f32],
    cin: usize,
    cout: usize,
    cpad: usize,
    h: usize,
    kc: usize,
    accumulate: bool,
}

/// The kernel of [`weight_grad`], written with AVX-512 intrinsics (the same loop in plain Rust
/// was not kept in registers: ~3x slower than `gemm`, measured).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn grad_avx512<const N: usize, const V: usize>(a: &GradArgs, dwt: &mut [f32]) {
    use std::arch::x86_64::*;
    const L: usize = 16;
    let c = V * L;
    let &GradArgs { xp, dyt, cin, cout, cpad, h, kc, accumulate } = a;
    let row_len = N + 2;
    let plane = (h + 2) * row_len;
    let pd = h * N;
    assert!(xp.len() >= cin * plane && dyt.len() >= pd * cpad && cpad.is_multiple_of(c));
    assert!(dwt.len() == cin * 9 * cout);
    for ci in 0..cin {
        let xc = xp[ci * plane..].as_ptr();
        for c0 in (0..cout).step_by(c) {
            let mut p0 = 0;
            while p0 < pd {
                let p1 = (p0 + kc).min(pd);
                // acc[t][i]: tap t = 3 ky + kx, output channels c0 + L i.. c0 + L (i + 1).
                let mut acc: [[__m512; V]; 9] = [[_mm512_setzero_ps(); V]; 9];
                let mut p = p0;
                while p < p1 {
                    let (y, x0) = (p / N, p % N);
                    let x1 = N.min(x0 + (p1 - p));
                    // SAFETY (every read below): y < h and x < N, so the taps' reads
                    // end at (y + 2) (N + 2) + x + 2 < (h + 2) (N + 2), within the
                    // plane; and (y N + x) cpad + c0 + V L <= pd cpad (c0 + V L <=
                    // cpad): both within the lengths asserted above.
                    let xr = xc.add(y * row_len);
                    // b[ky][kx]: the input under tap (ky, kx) of pixel x, broadcast. A
                    // value serves three pixels (kx = 2, 1, 0), so each pixel loads
                    // one new column of three instead of nine values.
                    let mut b: [[__m512; 3]; 3] = std::array::from_fn(|ky| {
                        std::array::from_fn(|kx| _mm512_set1_ps(*xr.add(ky * row_len + x0 + kx)))
                    });
                    for x in x0..x1 {
                        let dp = dyt.as_ptr().add((y * N + x) * cpad + c0);
                        let d: [__m512; V] =
                            std::array::from_fn(|i| _mm512_loadu_ps(dp.add(i * L)));
                        for t in 0..9 {
                            for i in 0..V {
                                acc[t][i] = _mm512_fmadd_ps(b[t / 3][t % 3], d[i], acc[t][i]);
                            }
                        }
                        if x + 1 < x1 {
                            for (ky, bk) in b.iter_mut().enumerate() {
                                *bk = [bk[1], bk[2], _mm512_set1_ps(*xr.add(ky * row_len + x + 3))];
                            }
                        }
                    }
                    p += x1 - x0;
                }
                let first = p0 == 0 && !accumulate;
                let mut lanes = [[0.0f32; L]; V];
                for (t, at) in acc.iter().enumerate() {
                    for (l, v) in lanes.iter_mut().zip(at) {
                        _mm512_storeu_ps(l.as_mut_ptr(), *v);
                    }
                    let lanes = lanes.as_flattened();
                    let row = (ci * 9 + t) * cout;
                    let out = &mut dwt[row + c0..row + cout];
                    for (o, l) in out.iter_mut().zip(lanes) {
                        *o = if first { *l } else { *o + *l };
                    }
                }
                p0 = p1;
            }
        }
    }
}

/// Scratch floats [`input_grad`] needs for one sample: dy zero-padded.
pub(crate) fn input_grad_scratch_len(g: &Geom, cout: usize) -> usize {
    cout * (g.h + 2) * (g.w + 2)
}

/// One sample's input gradient added into `dx` (cin, h, w), for the convolutions
/// [`grad_applies`] takes (AVX-512 only, [`grad_available`]): what `W^T dy` (`gemm`) then col2im
/// add, with the same bits, without the nine-times-larger column matrix.
///
/// Same bits: each column entry is one chain of fused multiply-adds over the output channels in
/// order from +0.0 (`gemm`'s, the inner dimension being at most 32), and each input pixel adds
/// its taps' entries in col2im's order (ky, kx). A tap that falls on the padding adds +0.0 here
/// where col2im adds -0.0 or nothing: that changes no value, except that -0.0 + +0.0 is +0.0;
/// but the centre tap is never padding and its entry is never -0.0 (a chain from +0.0), so from
/// it on both sums are equal, and no later sum can be -0.0 again.
pub(crate) fn input_grad(
    g: &Geom,
    dy: &[f32],
    wv: &[f32],
    cout: usize,
    scratch: &mut [f32],
    dx: Dx<'_>,
) {
    let (cin, h, w) = (g.cin, g.h, g.w);
    // `Write`: the first tap (t = 0) of each input channel's block stores `0.0 + s` where it
    // would add `s` into +0.0; every element is stored there, before any later tap reads it.
    let (dx, len, write) = match dx {
        Dx::Add(d) => (d.as_mut_ptr(), d.len(), false),
        Dx::Write(d) => (d.as_mut_ptr().cast::<f32>(), d.len(), true),
    };
    assert!(grad_applies(g, cout) && grad_available(), "direct::input_grad on {g:?}");
    assert!(dy.len() == cout * h * w && wv.len() == cout * cin * 9 && len == cin * h * w);
    assert!(scratch.len() == input_grad_scratch_len(g, cout));
    pad(dy, None, cout, h, w, scratch);
    let a = DxArgs { dyp: scratch, wv, cin, cout, h, w, write };
    let mut ci0 = 0;
    while ci0 < cin {
        let t = match cin - ci0 {
            6.. => 6,
            4..=5 => 4,
            2..=3 => 2,
            _ => 1,
        };
        // SAFETY: the CPU has AVX-512 (asserted above).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match t {
                6 => dx_avx512::<6>(&a, ci0, dx),
                4 => dx_avx512::<4>(&a, ci0, dx),
                2 => dx_avx512::<2>(&a, ci0, dx),
                _ => dx_avx512::<1>(&a, ci0, dx),
            }
        }
        ci0 += t;
    }
}

/// What [`input_grad`]'s kernel reads: dy padded (cout, h + 2, w + 2) and the weights
/// (cout, cin, 3, 3).
struct DxArgs<'a> {
    dyp: &'a [f32],
    wv: &'a [f32],
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    /// Whether the first tap writes rather than adds (`Dx::Write`).
    write: bool,
}

/// Input channels `ci0 .. ci0 + T` of [`input_grad`]: for each run of 64 pixels (two 32-wide
/// rows or four 16-wide rows; the last run may be shorter) and each tap, T x 4 chains over the
/// output channels in registers (each dy vector loaded once for the T channels, each weight
/// broadcast once for the 4 vectors), then added into dx.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dx_avx512<const T: usize>(a: &DxArgs, ci0: usize, dx: *mut f32) {
    use std::arch::x86_64::*;
    const V: usize = 4;
    let &DxArgs { dyp, wv, cin, cout, h, w, write } = a;
    let (pd, row_len) = (h * w, w + 2);
    let plane = (h + 2) * row_len;
    assert!(w.is_multiple_of(16) && ci0 + T <= cin);
    assert!(dyp.len() == cout * plane && wv.len() == cout * cin * 9);
    // Padded offset of tap (ky, kx)'s source for pixel (y, x), relative to (y + 2, x + 2).
    let toff: [usize; 9] = std::array::from_fn(|t| t / 3 * row_len + t % 3);
    let mut q0 = 0;
    while q0 < pd {
        let nv = ((pd - q0) / 16).min(V);
        // Vector v: pixels q0 + 16 v .. + 16, in row y_v from column x_v; its source for tap t
        // starts at (y_v + 2) row_len + x_v + 2 - toff[t] >= 0 in each padded plane. Vectors
        // past the end repeat the last one (computed, not stored).
        let base: [usize; V] = std::array::from_fn(|v| {
            let q = (q0 + 16 * v).min(pd - 16);
            (q / w + 2) * row_len + q % w + 2
        });
        for (t, off) in toff.iter().enumerate() {
            let mut s = [[_mm512_setzero_ps(); V]; T];
            for co in 0..cout {
                // SAFETY: base - off + 16 <= (h + 1) row_len + w + 2 <= plane, within dy's
                // padded plane co < cout.
                let dp = dyp.as_ptr().add(co * plane);
                let d: [__m512; V] =
                    std::array::from_fn(|v| _mm512_loadu_ps(dp.add(base[v] - off)));
                let wr = wv.as_ptr().add((co * cin + ci0) * 9 + t);
                for (i, si) in s.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*wr.add(i * 9));
                    for v in 0..V {
                        si[v] = _mm512_fmadd_ps(b, d[v], si[v]);
                    }
                }
            }
            for (i, si) in s.iter().enumerate() {
                for (v, sv) in si.iter().enumerate().take(nv) {
                    // SAFETY: (ci0 + i) pd + q0 + 16 v + 16 <= cin pd (q0 + 16 nv <= pd), within
                    // dx (`input_grad` checked its length); written at t = 0 before it is read.
                    let at = dx.add((ci0 + i) * pd + q0 + 16 * v);
                    let old =
                        if write && t == 0 { _mm512_setzero_ps() } else { _mm512_loadu_ps(at) };
                    _mm512_storeu_ps(at, _mm512_add_ps(old, *sv));
                }
            }
        }
        q0 += 16 * nv;
    }
}
