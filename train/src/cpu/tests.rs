//! Every dispatched kernel run in both builds on awkward sizes (edges of every block, tile and
//! sample group), compared bit for bit. On a CPU without AVX2 only the baseline runs, and the
//! tests say that they compared nothing.

use std::mem::MaybeUninit;

use dfdx::prelude::*;

use super::Build;
use crate::ops::batch_norm::{
    batch_norm_eval_with, batch_norm_relu_eval_with, batch_norm_relu_train_with,
    batch_norm_train_with,
};
use crate::ops::{self, conv2d_with, norm_relu_pool_with, Conv2dCfg, RunningStats, T1};
use crate::optim::Sgd;
use crate::params::Mask;
use crate::sparse_input::SparseInput;

/// Values in [-1, 1) from a fixed seed (a small LCG: the test needs variety, not quality).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Runs `kernel` in the baseline build, checks it produced something, and, where the CPU has
/// AVX2, in the AVX2 build too, comparing the bits. Returns whether it compared.
fn both_ways(what: &str, kernel: impl Fn(Build) -> Vec<Vec<f32>>) -> bool {
    let base = kernel(Build::Baseline);
    assert!(
        !base.is_empty() && base.iter().all(|v| !v.is_empty() && v.iter().any(|x| *x != 0.0)),
        "{what}: the baseline build produced no values"
    );
    if !Build::Avx2.available() {
        eprintln!(
            "{what}: this CPU has no AVX2, so only the baseline build ran (compared nothing)"
        );
        return false;
    }
    let fast = kernel(Build::Avx2);
    assert_eq!(base.len(), fast.len(), "{what}");
    for (i, (b, f)) in base.iter().zip(&fast).enumerate() {
        assert!(bits(b) == bits(f), "{what}: output {i} differs between the builds");
    }
    true
}

#[test]
fn the_switch_forces_the_baseline() {
    assert_eq!(Build::choose(Some("1"), true), Build::Baseline);
    assert_eq!(Build::choose(Some("0"), true), Build::Avx2);
    assert_eq!(Build::choose(None, true), Build::Avx2);
    assert_eq!(Build::choose(None, false), Build::Baseline);
    assert!(Build::Baseline.available());
    assert!(Build::selected().available());
}

fn t1(dev: &Cpu, v: &[f32]) -> T1 {
    dev.tensor_from_vec(v.to_vec(), (v.len(),))
}

/// conv2d's forward (bias fill, im2col) and backward (im2col, col2im, bias and weight sums) with
/// the input gradient, for kernels with padding, without, larger than the padding, and 1x1; at
/// stride 1 and at stride 2 (a ResNet's stage entry 3x3 and its 1x1 shortcut, whose strided
/// gather and scatter are separate loops), on sizes the stride does and does not divide.
#[test]
fn conv2d_builds_agree() {
    let dev = Cpu::default();
    // 11 samples: one whole group of 8 and a partial one; odd, non-square images.
    let (n, cin, cout) = (11, 3, 5);
    // (h, w, kernel, padding, stride)
    for (h, w, k, p, s) in [
        (7, 9, 3, 1, 1),
        (7, 9, 2, 0, 1),
        (7, 9, 5, 1, 1),
        (7, 9, 1, 0, 1),
        (7, 9, 3, 1, 2),
        (8, 10, 3, 1, 2),
        (7, 9, 1, 0, 2),
        (8, 10, 1, 0, 2),
        (7, 9, 5, 2, 3),
    ] {
        let cfg = Conv2dCfg { out_channels: cout, kernel: k, padding: p, stride: s };
        let x = values(n * cin * h * w, 1);
        let wv = values(cout * cin * k * k, 2);
        let bv = values(cout, 3);
        let (ho, wo) = (cfg.out_size(h).unwrap(), cfg.out_size(w).unwrap());
        let target = values(n * cout * ho * wo, 4);
        both_ways(&format!("conv2d {h}x{w} k={k} p={p} s={s}"), |build| {
            let xt = dev.tensor_from_vec(x.clone(), (n, cin, h, w));
            let (wt, bt) = (t1(&dev, &wv), t1(&dev, &bv));
            let y = conv2d_with(build, xt.leaky_trace(), &wt, Some(&bt), cfg, true);
            let mut yv = vec![0.0; n * cout * ho * wo];
            y.copy_into(&mut yv);
            let g = ops::mse_loss(ops::flatten(y), &target).backward();
            vec![yv, g.get(&xt).as_vec(), g.get(&wt).as_vec(), g.get(&bt).as_vec()]
        });
    }
}

/// The fused norm/ReLU/pool planes, forward and backward, with and without the norm, for the
/// 2x2 pool's own loop and the general one, on planes the pool does not tile.
#[test]
fn norm_relu_pool_builds_agree() {
    let dev = Cpu::default();
    let (n, c, h, w) = (3, 5, 9, 11);
    for (affine, k) in [(true, 2), (false, 2), (true, 3), (false, 3)] {
        let x = values(n * c * h * w, 5);
        let (gv, bv) = (values(c, 6), values(c, 7));
        let (ho, wo) = (h / k, w / k);
        let target = values(n * c * ho * wo, 8);
        both_ways(&format!("norm_relu_pool norm={affine} k={k}"), |build| {
            let xt = dev.tensor_from_vec(x.clone(), (n, c, h, w));
            let (gt, bt) = (t1(&dev, &gv), t1(&dev, &bv));
            let norm = affine.then_some((&gt, &bt));
            let y = norm_relu_pool_with(build, xt.leaky_trace(), norm, 1e-5, k);
            let mut yv = vec![0.0; n * c * ho * wo];
            y.copy_into(&mut yv);
            let g = ops::mse_loss(ops::flatten(y), &target).backward();
            let mut out = vec![yv, g.get(&xt).as_vec()];
            if affine {
                out.extend([g.get(&gt).as_vec(), g.get(&bt).as_vec()]);
            }
            out
        });
    }
}

/// Batch norm in both modes: statistics, the affine output and the backward planes.
#[test]
fn batch_norm_builds_agree() {
    let dev = Cpu::default();
    let (n, c, h, w) = (3, 5, 7, 9);
    let x = values(n * c * h * w, 11);
    let (gv, bv) = (values(c, 12), values(c, 13));
    let target = values(n * c * h * w, 14);
    let running = RunningStats {
        mean: values(c, 15),
        var: values(c, 16).iter().map(|v| 1.0 + v.abs()).collect(),
        num_batches_tracked: 3,
    };
    for train in [true, false] {
        both_ways(&format!("batch_norm train={train}"), |build| {
            let xt = dev.tensor_from_vec(x.clone(), (n, c, h, w));
            let (gt, bt) = (t1(&dev, &gv), t1(&dev, &bv));
            let (y, stats) = if train {
                let (y, s) =
                    batch_norm_train_with(build, xt.leaky_trace(), &gt, &bt, 1e-5).unwrap();
                (y, vec![s.mean, s.var_unbiased])
            } else {
                let y = batch_norm_eval_with(build, xt.leaky_trace(), &gt, &bt, &running, 1e-5);
                (y.unwrap(), vec![])
            };
            let mut yv = vec![0.0; n * c * h * w];
            y.copy_into(&mut yv);
            let g = ops::mse_loss(ops::flatten(y), &target).backward();
            let mut out = vec![yv, g.get(&xt).as_vec(), g.get(&gt).as_vec(), g.get(&bt).as_vec()];
            out.extend(stats);
            out
        });
    }
}

/// The fused batch norm + residual + ReLU in both modes: the output pass with its mask, and the
/// masked gradient added into the residual's.
#[test]
fn batch_norm_relu_builds_agree() {
    let dev = Cpu::default();
    let (n, c, h, w) = (3, 5, 7, 9);
    let x = values(n * c * h * w, 21);
    let r = values(n * c * h * w, 22);
    let (gv, bv) = (values(c, 23), values(c, 24));
    let target = values(n * c * h * w, 25);
    let running = RunningStats {
        mean: values(c, 26),
        var: values(c, 27).iter().map(|v| 1.0 + v.abs()).collect(),
        num_batches_tracked: 3,
    };
    for train in [true, false] {
        both_ways(&format!("batch_norm_relu train={train}"), |build| {
            let xt = dev.tensor_from_vec(x.clone(), (n, c, h, w));
            let rt = dev.tensor_from_vec(r.clone(), (n, c, h, w));
            let (gt, bt) = (t1(&dev, &gv), t1(&dev, &bv));
            let res = Some(rt.leaky_trace());
            let (y, stats) = if train {
                let (y, s) =
                    batch_norm_relu_train_with(build, xt.leaky_trace(), &gt, &bt, 1e-5, res)
                        .unwrap();
                (y, vec![s.mean, s.var_unbiased])
            } else {
                let y = batch_norm_relu_eval_with(
                    build,
                    xt.leaky_trace(),
                    &gt,
                    &bt,
                    &running,
                    1e-5,
                    res,
                );
                (y.unwrap(), vec![])
            };
            let mut yv = vec![0.0; n * c * h * w];
            y.copy_into(&mut yv);
            // Without a tape and a residual, evaluation mode works in place.
            let untraced = if train {
                Vec::new()
            } else {
                let xt = dev.tensor_from_vec(x.clone(), (n, c, h, w));
                let none: Option<ops::T4<NoneTape>> = None;
                let y = batch_norm_relu_eval_with(build, xt, &gt, &bt, &running, 1e-5, none);
                y.unwrap().as_vec()
            };
            let g = ops::mse_loss(ops::flatten(y), &target).backward();
            let mut out = vec![
                yv,
                g.get(&xt).as_vec(),
                g.get(&rt).as_vec(),
                g.get(&gt).as_vec(),
                g.get(&bt).as_vec(),
            ];
            out.extend(stats);
            if !train {
                out.push(untraced);
            }
            out
        });
    }
}

/// The sparse first layer's kernels: the background scan and count, the weight's block
/// transposes, the forward rows and the weight-gradient blocks (with their tiled transposes),
/// for widths that leave partial blocks and tiles everywhere.
#[test]
fn sparse_input_builds_agree() {
    let (n, inf, outf) = (37, 70, 75);
    // Mostly background: each column's minimum, with ~20% of entries above it.
    let z = values(inf, 9);
    let noise = values(n * inf, 10);
    let x: Vec<f32> = (0..n * inf)
        .map(|i| if noise[i] > 0.6 { z[i % inf] + noise[i] } else { z[i % inf] })
        .collect();
    let w = values(outf * inf, 11);
    let dz = values(n * outf, 12);
    let db: Vec<f32> = (0..outf).map(|j| (0..n).map(|i| dz[i * outf + j]).sum()).collect();
    both_ways("sparse_input", |build| {
        let mut s = SparseInput::default();
        s.build = build;
        let density = s.density(&x, n, inf);
        assert!(density > 0.0 && density < 0.5, "{density}");
        s.split(&x, n);
        s.set_weight(&w, outf);
        let mut out = vec![0.0; n * outf];
        // Two row ranges, the second not starting at 0.
        s.forward(0..20, outf, &mut out[..20 * outf]);
        s.forward(20..n, outf, &mut out[20 * outf..]);
        let mut dw = vec![0.0; outf * inf];
        s.weight_grad(&dz, &db, outf, &mut dw);
        vec![vec![density], out, dw]
    });
}

/// Each of the SGD update's branches (plain; momentum first step and later; Nesterov first
/// step and later), over a length that is not a multiple of any vector width.
#[test]
fn sgd_builds_agree() {
    let n = 1003;
    let keep: Vec<bool> = (0..n).map(|i| i % 5 != 0).collect();
    let mask = Mask { keep };
    for (momentum, first, nesterov) in [
        (0.0, false, false),
        (0.9, true, false),
        (0.9, false, false),
        (0.9, true, true),
        (0.9, false, true),
    ] {
        let sgd = Sgd { momentum, weight_decay: 5e-4, nesterov };
        both_ways(&format!("sgd momentum={momentum} first={first} nesterov={nesterov}"), |build| {
            let (mut p, mut g, mut b) = (values(n, 13), values(n, 14), values(n, 15));
            sgd.step_with(build, &mut p, &mut g, &mut b, first, 0.1, &mask);
            let mut out = vec![p];
            if momentum != 0.0 {
                out.push(b);
            }
            out
        });
    }
}

/// The direct 3x3 kernel (`ops::direct`) gives im2col + gemm's bits on the shapes it takes, in
/// every instruction set this CPU has, and `conv2d` dispatches to it where Winograd does not take
/// the shape (32 channels on 16x16 since it runs from 32 channels): with and without a bias,
/// output channels not a multiple of 4 and more than one group of the AVX-512 forward's blocks
/// (42), 16- and 32-wide planes of 1 to 32 rows, 1 to 32 input channels (scratch and output
/// full of NaN beforehand, so a value not written would show).
#[test]
fn direct_conv_equals_im2col_gemm() {
    use crate::ops::gemm::{Gemm, Layout, Operand, Par};
    use crate::ops::{direct, im2col, winograd, ConvGeom};
    let dev = Cpu::default();
    let shapes = [
        (2, 3, 16, 32, 32, true),
        (3, 16, 16, 32, 32, false),
        (2, 32, 32, 16, 16, false),
        (2, 16, 6, 16, 16, true),
        (1, 1, 5, 7, 32, false),
        (2, 32, 3, 32, 32, true),
        (1, 4, 8, 1, 16, false),
        (2, 3, 42, 4, 32, true),
    ];
    for (n, cin, cout, h, w, bias) in shapes {
        let cfg = Conv2dCfg::new(cout, 3, 1);
        let g = ConvGeom::new(cin, h, w, cfg).unwrap();
        assert!(direct::applies(&g), "{cin} {h}x{w}");
        let (x, wv, bv) =
            (values(n * cin * h * w, 61), values(cout * cin * 9, 62), values(cout, 63));
        let (wt, bt) = (t1(&dev, &wv), t1(&dev, &bv));
        let run = |build: Build| {
            let xt = dev.tensor_from_vec(x.clone(), (n, cin, h, w));
            let y = conv2d_with(build, xt, &wt, bias.then_some(&bt), cfg, false);
            let mut v = vec![0.0; n * cout * h * w];
            y.copy_into(&mut v);
            v
        };
        // im2col + gemm, per sample: the bias, then the product added to it.
        let mut want = vec![0.0f32; n * cout * h * w];
        let mut col = vec![0.0f32; g.kd() * h * w];
        for (s, ys) in want.chunks_exact_mut(cout * h * w).enumerate() {
            im2col(&g, &x[s * cin * h * w..(s + 1) * cin * h * w], &mut col);
            for (row, b) in ys.chunks_exact_mut(h * w).zip(&bv) {
                row.fill(if bias { *b } else { 0.0 });
            }
            Gemm {
                m: cout,
                n: h * w,
                k: g.kd(),
                lhs: Operand::row_major(&wv, g.kd()),
                rhs: Operand::row_major(&col, h * w),
                accumulate: true,
            }
            .run(ys, Layout::row_major(h * w), Par::Seq);
        }
        if !winograd::applies(&g, cout) {
            // The baseline build takes im2col + gemm where Winograd does not apply.
            assert!(bits(&run(Build::Baseline)) == bits(&want), "{n}x{cin}x{h}x{w} -> {cout}");
        }
        let wp = direct::pack_weights(&wv, cout, cin);
        let (xs, ys) = (cin * h * w, cout * h * w);
        for isa in direct::Isa::all() {
            let mut got = vec![f32::NAN; n * ys];
            let mut xp = vec![f32::NAN; direct::scratch_len(&g)];
            for s in 0..n {
                let b = bias.then_some(&bv[..]);
                let (xn, yn) = (&x[s * xs..(s + 1) * xs], &mut got[s * ys..(s + 1) * ys]);
                // SAFETY: f32 and MaybeUninit<f32> have the same layout; the kernel only writes
                // initialised floats through it.
                let yn = unsafe {
                    std::slice::from_raw_parts_mut(
                        yn.as_mut_ptr().cast::<MaybeUninit<f32>>(),
                        yn.len(),
                    )
                };
                direct::forward(isa, &g, xn, None, &wp, b, cout, &mut xp, yn);
            }
            assert!(bits(&got) == bits(&want), "{isa:?} {n}x{cin}x{h}x{w} -> {cout}");
        }
        if direct::Isa::detected().is_some()
            && Build::Avx2.available()
            && !winograd::applies(&g, cout)
        {
            assert!(bits(&run(Build::Avx2)) == bits(&want), "conv2d {n}x{cin}x{h}x{w} -> {cout}");
        }
    }
    if direct::Isa::all().is_empty() {
        eprintln!("this CPU has no FMA: the direct kernel was not compared");
    }
}

/// A direct convolution handed its input as a norm and ReLU (`direct::AffineRelu`) gives the
/// bits of the same kernel on the mapped input written out, forward and weight gradient: per
/// input channel a scale and shift of either sign (so some channels are mostly cut by the ReLU,
/// some mostly kept), a NaN and a -0.0 among the stored values, 16- and 32-wide planes
/// (scratch full of NaN beforehand, so a border the map touched would show).
#[test]
fn direct_conv_of_a_mapped_input_equals_the_mapped_tensor() {
    use crate::ops::gemm::k_piece;
    use crate::ops::{batch_norm::affine_relu, direct, ConvGeom};
    for (n, cin, cout, h, w) in [(2, 16, 16, 32, 32), (2, 32, 32, 16, 16), (3, 5, 29, 7, 16)] {
        let g = ConvGeom::new(cin, h, w, Conv2dCfg::new(cout, 3, 1)).unwrap();
        let (pd, kd) = (h * w, cin * 9);
        let mut x = values(n * cin * pd, 81);
        (x[3], x[pd + 5]) = (f32::NAN, -0.0);
        let (wv, dy) = (values(cout * kd, 82), values(n * cout * pd, 83));
        let scale: Vec<f32> = values(cin, 84).iter().map(|v| 2.0 * v).collect();
        let shift = values(cin, 85);
        let mapped: Vec<f32> = (x.iter().enumerate())
            .map(|(i, v)| affine_relu(*v, scale[i / pd % cin], shift[i / pd % cin]))
            .collect();
        let map = direct::AffineRelu { scale: &scale, shift: &shift };
        let wp = direct::pack_weights(&wv, cout, cin);
        let (xs, ys) = (cin * pd, cout * pd);
        for isa in direct::Isa::all() {
            let fwd = |input: &[f32], m: Option<direct::AffineRelu<'_>>| {
                let mut y = vec![MaybeUninit::<f32>::uninit(); n * ys];
                let mut xp = vec![f32::NAN; direct::scratch_len(&g)];
                for s in 0..n {
                    let (xn, yn) = (&input[s * xs..(s + 1) * xs], &mut y[s * ys..(s + 1) * ys]);
                    direct::forward(isa, &g, xn, m, &wp, None, cout, &mut xp, yn);
                }
                // SAFETY: the kernel wrote every output.
                y.iter().map(|v| unsafe { v.assume_init() }).collect::<Vec<f32>>()
            };
            let (got, want) = (fwd(&x, Some(map)), fwd(&mapped, None));
            assert!(bits(&got) == bits(&want), "{isa:?} {n}x{cin}x{h}x{w} -> {cout}");
        }
        if direct::grad_available() && direct::grad_applies(&g, cout) {
            let kc = k_piece(kd, cout, pd);
            let grad = |input: &[f32], m: Option<direct::AffineRelu<'_>>| {
                let mut dw = vec![f32::NAN; kd * cout];
                let mut scratch = vec![f32::NAN; direct::grad_scratch_len(&g, cout)];
                for s in 0..n {
                    let (xn, ds) = (&input[s * xs..(s + 1) * xs], &dy[s * ys..(s + 1) * ys]);
                    direct::weight_grad(&g, xn, m, ds, cout, kc, &mut scratch, &mut dw, s > 0);
                }
                dw
            };
            let (got, want) = (grad(&x, Some(map)), grad(&mapped, None));
            assert!(bits(&got) == bits(&want), "weight gradient {n}x{cin}x{h}x{w} -> {cout}");
        }
    }
}

/// The direct weight-gradient kernel (`direct::weight_grad`, AVX-512) gives im2col + gemm's bits,
/// summed over several samples, and conv2d's backward dispatches to it: pixel counts of one `gemm` k-piece (256, 512) and of two (1,024 and 528 in the small
/// branch, 640 outside it, cut mid-row), output channels that fill no whole register block (5,
/// 29, 20 with 8 input channels), 1 to 32
/// input channels (scratch and destination full of NaN beforehand, so a value not written would
/// show).
#[test]
fn direct_weight_grad_equals_im2col_gemm() {
    use crate::ops::gemm::{k_piece, Gemm, Layout, Operand, Par};
    use crate::ops::{direct, im2col, ConvGeom};
    let dev = Cpu::default();
    let shapes = [
        (3, 16, 16, 32, 32),
        (2, 32, 32, 16, 16),
        (2, 3, 29, 32, 32),
        (3, 16, 5, 16, 16),
        (2, 1, 32, 33, 16),
        (2, 8, 20, 20, 32),
        (2, 32, 16, 16, 32),
    ];
    for (n, cin, cout, h, w) in shapes {
        let cfg = Conv2dCfg::new(cout, 3, 1);
        let g = ConvGeom::new(cin, h, w, cfg).unwrap();
        assert!(direct::grad_applies(&g, cout), "{cin} {h}x{w} -> {cout}");
        let (pd, kd) = (h * w, cin * 9);
        let (x, wv, dy) =
            (values(n * cin * pd, 71), values(cout * kd, 72), values(n * cout * pd, 73));
        // What backward_slices computed before the kernel: per sample, dW^T += col dy^T.
        let mut want = vec![0.0f32; kd * cout];
        let mut col = vec![0.0f32; kd * pd];
        for s in 0..n {
            im2col(&g, &x[s * cin * pd..(s + 1) * cin * pd], &mut col);
            Gemm {
                m: kd,
                n: cout,
                k: pd,
                lhs: Operand::row_major(&col, pd),
                rhs: Operand::transposed(&dy[s * cout * pd..(s + 1) * cout * pd], pd),
                accumulate: s > 0,
            }
            .run(&mut want, Layout::row_major(cout), Par::Seq);
        }
        let kc = k_piece(kd, cout, pd);
        assert!(kc == pd || pd > 512, "{pd} pixels cut at {kc}");
        if direct::grad_available() {
            let mut got = vec![f32::NAN; kd * cout];
            let mut scratch = vec![f32::NAN; direct::grad_scratch_len(&g, cout)];
            for s in 0..n {
                let (xs, ds) =
                    (&x[s * cin * pd..(s + 1) * cin * pd], &dy[s * cout * pd..(s + 1) * cout * pd]);
                direct::weight_grad(&g, xs, None, ds, cout, kc, &mut scratch, &mut got, s > 0);
            }
            assert!(bits(&got) == bits(&want), "{n}x{cin}x{h}x{w} -> {cout}");
        }
        // conv2d's backward in both builds (the AVX2 build takes the kernel).
        let target = values(n * cout * pd, 74);
        both_ways(&format!("conv2d weight gradient {cin}x{h}x{w} -> {cout}"), |build| {
            let xt = dev.tensor_from_vec(x.clone(), (n, cin, h, w));
            let wt = t1(&dev, &wv);
            let y = conv2d_with(build, xt.leaky_trace(), &wt, None, cfg, true);
            let g = ops::mse_loss(ops::flatten(y), &target).backward();
            vec![g.get(&xt).as_vec(), g.get(&wt).as_vec()]
        });
    }
    if !direct::grad_available() {
        eprintln!("this CPU has no AVX-512: the direct weight-gradient kernel was not compared");
    }
}

/// The direct input-gradient kernel (`direct::input_grad`, AVX-512) gives `W^T dy` (gemm) plus
/// col2im's bits, added into a gradient already holding values (some -0.0, which the padding taps
/// must leave as col2im does), or written into a buffer of NaNs as if added into zeros, on the
/// shapes `direct::weight_grad` takes: 16- and 32-wide planes,
/// odd and even row counts (a lone last 16-wide row), 1 to 32 input channels in every tile size.
#[test]
fn direct_input_grad_equals_gemm_col2im() {
    use crate::ops::gemm::{Gemm, Layout, Operand, Par};
    use crate::ops::{col2im_add, direct, ConvDx as Dx, ConvGeom};
    let shapes = [
        (16, 16, 32, 32),
        (32, 32, 16, 16),
        (15, 16, 16, 16),
        (7, 29, 7, 32),
        (3, 20, 5, 16),
        (1, 32, 1, 16),
        (8, 8, 20, 32),
    ];
    for (cin, cout, h, w) in shapes {
        let g = ConvGeom::new(cin, h, w, Conv2dCfg::new(cout, 3, 1)).unwrap();
        assert!(direct::grad_applies(&g, cout), "{cin} {h}x{w} -> {cout}");
        let (pd, kd) = (h * w, cin * 9);
        let (wv, dy) = (values(cout * kd, 81), values(cout * pd, 82));
        // A gradient already there, every fifth value -0.0 and some +0.0.
        let init: Vec<f32> = values(cin * pd, 83)
            .iter()
            .enumerate()
            .map(|(i, v)| match i % 5 {
                0 => -0.0,
                1 => 0.0,
                _ => *v,
            })
            .collect();
        // W^T dy (gemm) added into `into` by col2im.
        let col2im_of_product = |into: &mut [f32]| {
            let mut dcol = vec![0.0f32; kd * pd];
            Gemm {
                m: kd,
                n: pd,
                k: cout,
                lhs: Operand::transposed(&wv, kd),
                rhs: Operand::row_major(&dy, pd),
                accumulate: false,
            }
            .run(&mut dcol, Layout::row_major(pd), Par::Seq);
            col2im_add(&g, &mut dcol, into);
        };
        let mut want = init.clone();
        col2im_of_product(&mut want);
        if direct::grad_available() {
            let mut got = init.clone();
            let mut scratch = vec![f32::NAN; direct::input_grad_scratch_len(&g, cout)];
            direct::input_grad(&g, &dy, &wv, cout, &mut scratch, Dx::Add(&mut got));
            assert!(bits(&got) == bits(&want), "{cin}x{h}x{w} -> {cout}");
            // Written into a buffer of NaNs (`Dx::Write`): the bits of adding into zeros.
            let mut zeros = vec![0.0f32; cin * pd];
            col2im_of_product(&mut zeros);
            let mut written = vec![MaybeUninit::new(f32::NAN); cin * pd];
            direct::input_grad(&g, &dy, &wv, cout, &mut scratch, Dx::Write(&mut written));
            // SAFETY: MaybeUninit<f32> has f32's layout; every element holds a value (NaN or
            // what the kernel wrote).
            let written: Vec<f32> = written.iter().map(|e| unsafe { e.assume_init() }).collect();
            assert!(bits(&written) == bits(&zeros), "{cin}x{h}x{w} -> {cout}: written");
        }
    }
    if !direct::grad_available() {
        eprintln!("this CPU has no AVX-512: the direct input-gradient kernel was not compared");
    }
}
