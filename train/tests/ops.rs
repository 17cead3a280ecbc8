//! Checks of the differentiable ops in `lmc_train::ops`: gradients against central finite
//! differences, forward values against naive direct implementations and hand-computed cases,
//! and bit-identical results for rayon pools of 1 and 2 threads.
//!
//! Finite differences in f32: the scalar is `L = sum(out * r)` with a fixed random `r`; along a
//! random direction `v` we compare `L(x + eps v) - L(x - eps v)` with `<grad, (x + eps v) - (x - eps v)>`
//! (the perturbation actually applied after f32 rounding), both accumulated in f64.

use dfdx::prelude::*;
// Explicit names: `relu` and `mse_loss` also exist in dfdx's prelude, and an explicit import wins.
use lmc_train::ops::{
    accuracy_counts, avg_pool2d, conv2d, cross_entropy, flatten, global_avg_pool, instance_norm,
    linear, mse_loss, norm_relu_pool, relu, relu2, Conv2dCfg, T1, T2, T4,
};

mod common;
use common::{bits, dev, dot_loss, fd_err, rv, t1, vec_of, S4};

/// An op under test: input of shape `X`, parameters given as flat tensors.
trait Op {
    type X: Shape;
    type Y: Shape;
    fn x_shape(&self) -> Self::X;
    fn run<Tp: Tape<f32, Cpu>>(
        &self,
        x: Tensor<Self::X, f32, Cpu, Tp>,
        ps: &[T1],
    ) -> Tensor<Self::Y, f32, Cpu, Tp>;
}

fn params(ps: &[Vec<f32>]) -> Vec<T1> {
    ps.iter().map(|p| t1(p)).collect()
}

/// Forward without a tape.
fn forward<O: Op>(op: &O, x: &[f32], ps: &[Vec<f32>]) -> Vec<f32> {
    let xt = dev().tensor_from_vec(x.to_vec(), op.x_shape());
    vec_of(&op.run(xt, &params(ps)))
}

/// `sum(out * r)` in f64, without a tape.
fn loss<O: Op>(op: &O, x: &[f32], ps: &[Vec<f32>], r: &[f32]) -> f64 {
    forward(op, x, ps).iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// Output (traced run), input gradient and parameter gradients of `sum(out * r)`.
fn grads<O: Op>(
    op: &O,
    x: &[f32],
    ps: &[Vec<f32>],
    r: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let xt = dev().tensor_from_vec(x.to_vec(), op.x_shape());
    let pts = params(ps);
    let y = op.run(xt.leaky_trace(), &pts);
    let yv = vec_of(&y);
    let g = dot_loss(y, r).backward();
    let gx = vec_of(&g.get(&xt));
    let gps = pts.iter().map(|p| vec_of(&g.get(p))).collect();
    (yv, gx, gps)
}

/// Checks the gradients w.r.t. the input (if `check_x`) and every parameter by finite differences
/// with step `eps` and relative tolerance `tol`; also checks the traced forward equals the untraced
/// one bit for bit. Returns the gradients for further checks.
fn grad_check<O: Op>(
    name: &str,
    op: &O,
    x: &[f32],
    ps: &[Vec<f32>],
    eps: f32,
    tol: f64,
    check_x: bool,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let y0 = forward(op, x, ps);
    let r = rv(y0.len(), 1234);
    let (yt, gx, gps) = grads(op, x, ps, &r);
    assert_eq!(bits(&y0), bits(&yt), "{name}: traced and untraced forward differ");
    assert_eq!(gx.len(), x.len(), "{name}: input gradient size");
    if check_x {
        for seed in [11, 12] {
            let e = fd_err(|xx| loss(op, xx, ps, &r), x, &gx, eps, seed);
            assert!(e < tol, "{name}: input gradient rel. error {e:.3e} >= {tol:.0e}");
        }
    }
    for (i, (p, gp)) in ps.iter().zip(&gps).enumerate() {
        assert_eq!(gp.len(), p.len(), "{name}: param {i} gradient size");
        let e = fd_err(
            |pp| {
                let mut ps2 = ps.to_vec();
                ps2[i] = pp.to_vec();
                loss(op, x, &ps2, &r)
            },
            p,
            gp,
            eps,
            100 + i as u64,
        );
        assert!(e < tol, "{name}: param {i} gradient rel. error {e:.3e} >= {tol:.0e}");
    }
    (gx, gps)
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{name}: element {i}: got {g}, want {w}");
    }
}

// ---------------------------------------------------------------------------------------------
// The ops as test subjects.

struct ConvOp {
    x: S4,
    cfg: Conv2dCfg,
    bias: bool,
    input_grad: bool,
}
impl Op for ConvOp {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.x
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        conv2d(x, &ps[0], if self.bias { Some(&ps[1]) } else { None }, self.cfg, self.input_grad)
    }
}
impl ConvOp {
    fn params(&self, seed: u64) -> Vec<Vec<f32>> {
        let (_, cin, _, _) = self.x;
        let k = self.cfg.kernel;
        let mut ps = vec![rv(self.cfg.out_channels * cin * k * k, seed)];
        if self.bias {
            ps.push(rv(self.cfg.out_channels, seed + 1));
        }
        ps
    }
}

struct PoolOp(S4, usize);
impl Op for PoolOp {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.0
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, _: &[T1]) -> T4<Tp> {
        avg_pool2d(x, self.1)
    }
}

struct GapOp(S4);
impl Op for GapOp {
    type X = S4;
    type Y = (usize, usize);
    fn x_shape(&self) -> S4 {
        self.0
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, _: &[T1]) -> T2<Tp> {
        global_avg_pool(x)
    }
}

/// A residual block's shortcut.
#[derive(Clone, Copy, Debug)]
enum Shortcut {
    /// The input itself (same channels, stride 1).
    Identity,
    /// A 1x1 convolution at the block's stride (no bias), as a ResNet's stage entry.
    Conv1x1,
}

/// A residual block without norms: conv3x3 (stride `stride`) -> ReLU -> conv3x3, plus the
/// shortcut, added with dfdx's `+`. Both branches start from the same traced input: the main
/// branch carries the input's tape, the shortcut starts from an empty tape of the same kind
/// (`retaped`), and `+` merges the two tapes, so the input's gradient is the sum of both paths.
struct ResBlockOp {
    x: S4,
    cout: usize,
    stride: usize,
    shortcut: Shortcut,
}
impl Op for ResBlockOp {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.x
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        let (x, tape) = x.split_tape();
        let c1 = Conv2dCfg::new(self.cout, 3, 1).with_stride(self.stride);
        let h = conv2d(x.clone().put_tape(tape), &ps[0], None, c1, true);
        let h = conv2d(relu(h), &ps[1], None, Conv2dCfg::new(self.cout, 3, 1), true);
        match self.shortcut {
            // `x` has no tape: the add's backward still writes into x's gradient (same id).
            Shortcut::Identity => h + x,
            Shortcut::Conv1x1 => {
                let c = Conv2dCfg::new(self.cout, 1, 0).with_stride(self.stride);
                h + conv2d(x.retaped::<Tp>(), &ps[2], None, c, true)
            }
        }
    }
}
impl ResBlockOp {
    fn params(&self, seed: u64) -> Vec<Vec<f32>> {
        let (cin, cout) = (self.x.1, self.cout);
        let mut ps = vec![rv(cout * cin * 9, seed), rv(cout * cout * 9, seed + 1)];
        if let Shortcut::Conv1x1 = self.shortcut {
            ps.push(rv(cout * cin, seed + 2));
        }
        ps
    }
}

struct NormOp(S4);
impl Op for NormOp {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.0
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        instance_norm(x, &ps[0], &ps[1], 1e-5)
    }
}

/// The fused block tail (`norm` = with instance norm, `k` = pool size), or (`fused` false) the
/// same three ops applied one after another.
struct BlockOp {
    x: S4,
    norm: bool,
    k: usize,
    fused: bool,
}
impl Op for BlockOp {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.x
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        let norm = self.norm.then(|| (&ps[0], &ps[1]));
        if self.fused {
            return norm_relu_pool(x, norm, 1e-5, self.k);
        }
        let h = match norm {
            Some((g, b)) => instance_norm(x, g, b, 1e-5),
            None => x,
        };
        avg_pool2d(relu(h), self.k)
    }
}

/// (batch, in, out, input_grad)
struct LinearOp(usize, usize, usize, bool);
impl Op for LinearOp {
    type X = (usize, usize);
    type Y = (usize, usize);
    fn x_shape(&self) -> (usize, usize) {
        (self.0, self.1)
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T2<Tp>, ps: &[T1]) -> T2<Tp> {
        linear(x, &ps[0], &ps[1], self.2, self.3)
    }
}

struct ReluOp(S4);
impl Op for ReluOp {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.0
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, _: &[T1]) -> T4<Tp> {
        relu(x)
    }
}

struct Relu2Op(usize, usize);
impl Op for Relu2Op {
    type X = (usize, usize);
    type Y = (usize, usize);
    fn x_shape(&self) -> (usize, usize) {
        (self.0, self.1)
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T2<Tp>, _: &[T1]) -> T2<Tp> {
        relu2(x)
    }
}

/// flatten followed by linear (flatten alone is the identity on the buffer).
struct FlattenLinearOp(S4, usize);
impl Op for FlattenLinearOp {
    type X = S4;
    type Y = (usize, usize);
    fn x_shape(&self) -> S4 {
        self.0
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T2<Tp> {
        linear(flatten(x), &ps[0], &ps[1], self.1, true)
    }
}

struct CeOp(usize, usize, Vec<u8>);
impl Op for CeOp {
    type X = (usize, usize);
    type Y = ();
    fn x_shape(&self) -> (usize, usize) {
        (self.0, self.1)
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T2<Tp>, _: &[T1]) -> Tensor<(), f32, Cpu, Tp> {
        cross_entropy(x, &self.2)
    }
}

struct MseOp(usize, usize, Vec<f32>);
impl Op for MseOp {
    type X = (usize, usize);
    type Y = ();
    fn x_shape(&self) -> (usize, usize) {
        (self.0, self.1)
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T2<Tp>, _: &[T1]) -> Tensor<(), f32, Cpu, Tp> {
        mse_loss(x, &self.2)
    }
}

/// A small ConvNet: conv (no input grad) -> norm -> relu -> pool -> conv (same weight twice, so
/// parameter gradients must accumulate) -> flatten -> linear -> cross-entropy. The first conv has
/// no bias: instance norm removes any per-channel constant, so that gradient is exactly zero and
/// a relative finite-difference check of it would only compare rounding noise.
struct NetOp;
impl Op for NetOp {
    type X = S4;
    type Y = ();
    fn x_shape(&self) -> S4 {
        (3, 2, 6, 6)
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> Tensor<(), f32, Cpu, Tp> {
        let c1 = Conv2dCfg { out_channels: 4, kernel: 3, padding: 1, stride: 1 };
        let c2 = Conv2dCfg { out_channels: 4, kernel: 3, padding: 1, stride: 1 };
        let h = conv2d(x, &ps[0], None, c1, false);
        let h = instance_norm(h, &ps[1], &ps[2], 1e-5);
        let h = relu(h);
        let h = avg_pool2d(h, 2);
        let h = conv2d(h, &ps[3], None, c2, true);
        let h = conv2d(h, &ps[3], None, c2, true);
        let h = linear(flatten(h), &ps[4], &ps[5], 3, true);
        cross_entropy(h, &[0, 2, 1])
    }
}

// ---------------------------------------------------------------------------------------------
// Naive references.

#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    (n, cin, h, w): S4,
    wt: &[f32],
    b: Option<&[f32]>,
    cout: usize,
    k: usize,
    p: usize,
    stride: usize,
) -> Vec<f32> {
    let (ho, wo) = ((h + 2 * p - k) / stride + 1, (w + 2 * p - k) / stride + 1);
    let mut y = vec![0.0f32; n * cout * ho * wo];
    for ni in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = b.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (oy * stride + ky, ox * stride + kx);
                                if iy < p || ix < p || iy - p >= h || ix - p >= w {
                                    continue;
                                }
                                let xv = x[((ni * cin + ci) * h + iy - p) * w + ix - p];
                                s += xv as f64 * wt[((co * cin + ci) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    y[((ni * cout + co) * ho + oy) * wo + ox] = s as f32;
                }
            }
        }
    }
    y
}

fn naive_pool(x: &[f32], (n, c, h, w): S4, k: usize) -> Vec<f32> {
    let (ho, wo) = (h / k, w / k);
    let mut y = vec![];
    for pl in 0..n * c {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut s = 0.0f64;
                for ky in 0..k {
                    for kx in 0..k {
                        s += x[pl * h * w + (oy * k + ky) * w + ox * k + kx] as f64;
                    }
                }
                y.push((s / (k * k) as f64) as f32);
            }
        }
    }
    y
}

fn naive_norm(x: &[f32], (n, c, h, w): S4, g: &[f32], b: &[f32], eps: f64) -> Vec<f32> {
    let m = h * w;
    let mut y = vec![];
    for pl in 0..n * c {
        let xs = &x[pl * m..(pl + 1) * m];
        let mean = xs.iter().map(|v| *v as f64).sum::<f64>() / m as f64;
        let var = xs.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / m as f64;
        for v in xs {
            y.push(
                ((*v as f64 - mean) / (var + eps).sqrt() * g[pl % c] as f64 + b[pl % c] as f64)
                    as f32,
            );
        }
    }
    y
}

fn naive_linear(x: &[f32], n: usize, inf: usize, w: &[f32], b: &[f32], outf: usize) -> Vec<f32> {
    let mut y = vec![];
    for ni in 0..n {
        for o in 0..outf {
            let s: f64 = (0..inf).map(|i| x[ni * inf + i] as f64 * w[o * inf + i] as f64).sum();
            y.push((s + b[o] as f64) as f32);
        }
    }
    y
}

// ---------------------------------------------------------------------------------------------
// conv2d

#[test]
fn conv2d_hand_computed() {
    // x = [[1,2,3],[4,5,6],[7,8,9]] (1x1x3x3).
    let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
    let op = |w: &[f32], b: Option<f32>, k: usize, p: usize| {
        let xt = dev().tensor_from_vec(x.clone(), (1, 1, 3, 3));
        let bt = b.map(|b| t1(&[b]));
        vec_of(&conv2d(
            xt,
            &t1(w),
            bt.as_ref(),
            Conv2dCfg { out_channels: 1, kernel: k, padding: p, stride: 1 },
            true,
        ))
    };
    // All-ones 3x3 kernel, padding 1, bias 0.5: each output is the sum of the in-image 3x3
    // neighbourhood, e.g. corner 1+2+4+5 = 12, centre 1+...+9 = 45.
    let y = op(&[1.0; 9], Some(0.5), 3, 1);
    let want = [12.0, 21.0, 16.0, 27.0, 45.0, 33.0, 24.0, 39.0, 28.0].map(|v: f32| v + 0.5);
    assert_eq!(y, want);
    // Only the top-left tap set, padding 1: cross-correlation (not a flipped convolution) reads
    // x[oy - 1][ox - 1], so the output is x shifted down-right: [[0,0,0],[0,1,2],[0,4,5]].
    let mut w = [0.0; 9];
    w[0] = 1.0;
    assert_eq!(op(&w, None, 3, 1), [0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 4.0, 5.0]);
    // 2x2 kernel [[1,2],[3,4]], no padding -> 2x2 output:
    // (0,0) = 1*1 + 2*2 + 3*4 + 4*5 = 37, (0,1) = 1*2 + 2*3 + 3*5 + 4*6 = 47,
    // (1,0) = 1*4 + 2*5 + 3*7 + 4*8 = 67, (1,1) = 1*5 + 2*6 + 3*8 + 4*9 = 77.
    assert_eq!(op(&[1.0, 2.0, 3.0, 4.0], None, 2, 0), [37.0, 47.0, 67.0, 77.0]);
}

#[test]
fn conv2d_matches_naive() {
    for (x, cout, k, p, bias) in [
        ((2, 3, 5, 7), 4, 3, 1, true),
        ((3, 2, 6, 6), 5, 3, 0, false),
        ((2, 4, 4, 5), 3, 1, 0, true), // 1x1: no im2col
        ((1, 2, 3, 3), 2, 5, 2, true), // kernel larger than the image, covered by padding
        ((2, 3, 4, 4), 2, 2, 1, false),
        ((10, 3, 5, 5), 4, 3, 1, true), // more than one sample group
    ] {
        let op = ConvOp {
            x,
            cfg: Conv2dCfg { out_channels: cout, kernel: k, padding: p, stride: 1 },
            bias,
            input_grad: true,
        };
        let ps = op.params(7);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 3);
        let y = forward(&op, &xv, &ps);
        let want = naive_conv(&xv, x, &ps[0], ps.get(1).map(|v| v.as_slice()), cout, k, p, 1);
        assert_close(&format!("conv {x:?} k{k} p{p}"), &y, &want, 1e-5);
    }
}

#[test]
fn conv2d_gradients() {
    // conv2d is linear in x and in (w, b): central differences are exact up to f32 rounding of
    // the forward pass (~1e-6 relative), so eps = 1e-2 and a 1e-2 tolerance leave a wide margin.
    for (x, cout, k, p, bias) in [
        ((2, 3, 5, 7), 4, 3, 1, true),
        ((3, 2, 6, 6), 5, 3, 0, false),
        ((2, 4, 4, 5), 3, 1, 0, true),
        ((1, 2, 3, 3), 2, 5, 2, true),
        ((2, 3, 4, 4), 2, 2, 1, false),
        ((10, 3, 5, 5), 4, 3, 1, true),
        // 64 channels on 16x16 and 256 on 3x3: the Winograd paths (`ops::winograd`, F(4x4, 3x3)
        // and F(2x2, 3x3)), through the tape op.
        ((2, 64, 16, 16), 64, 3, 1, true),
        ((2, 256, 3, 3), 256, 3, 1, false),
    ] {
        let op = ConvOp {
            x,
            cfg: Conv2dCfg { out_channels: cout, kernel: k, padding: p, stride: 1 },
            bias,
            input_grad: true,
        };
        let ps = op.params(5);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 9);
        grad_check(&format!("conv {x:?} k{k} p{p}"), &op, &xv, &ps, 1e-2, 1e-2, true);
    }
}

#[test]
fn conv2d_without_input_grad() {
    let x = (3, 2, 5, 5);
    let cfg = Conv2dCfg { out_channels: 3, kernel: 3, padding: 1, stride: 1 };
    let with = ConvOp { x, cfg, bias: true, input_grad: true };
    let without = ConvOp { x, cfg, bias: true, input_grad: false };
    let ps = with.params(1);
    let xv = rv(150, 2);
    // Parameter gradients are still checked; the input gradient is allocated but zero.
    let (gx, gps) = grad_check("conv no dx", &without, &xv, &ps, 1e-2, 1e-2, false);
    assert!(gx.iter().all(|v| *v == 0.0));
    let r = rv(3 * 3 * 25, 1234);
    let (_, gx_full, gps_full) = grads(&with, &xv, &ps, &r);
    assert!(gx_full.iter().any(|v| *v != 0.0));
    assert_eq!(bits(&gps[0]), bits(&gps_full[0]));
    assert_eq!(bits(&gps[1]), bits(&gps_full[1]));
}

// ---------------------------------------------------------------------------------------------
// strided conv2d (a ResNet's stage entry: 3x3 stride 2 padding 1, and its 1x1 stride 2 shortcut)

/// (input, out channels, kernel, padding, stride, bias): odd and even sizes (an odd size leaves
/// the last row and column unread by the 1x1 stride-2 kernel), non-square images, a stride of 3,
/// and a batch of more than one sample group.
const STRIDED: [(S4, usize, usize, usize, usize, bool); 9] = [
    ((2, 3, 7, 7), 4, 3, 1, 2, true),
    ((2, 3, 8, 8), 4, 3, 1, 2, false),
    ((2, 3, 7, 6), 4, 3, 1, 2, false),
    ((2, 4, 7, 7), 3, 1, 0, 2, true),
    ((2, 4, 8, 6), 3, 1, 0, 2, false),
    ((2, 4, 5, 5), 3, 1, 0, 1, false),
    ((1, 2, 5, 6), 2, 5, 2, 3, true),
    ((10, 3, 9, 9), 4, 3, 1, 2, true),
    ((2, 2, 1, 1), 3, 3, 1, 2, true), // a 1x1 image: a ResNet's last stage on 8x8 digits
];

#[test]
fn conv2d_output_size_is_pytorchs() {
    // floor((n + 2p - k) / s) + 1
    let c3 = Conv2dCfg::new(16, 3, 1).with_stride(2);
    let c1 = Conv2dCfg::new(16, 1, 0).with_stride(2);
    for (n, want) in [(32, 16), (16, 8), (8, 4), (7, 4), (2, 1), (1, 1)] {
        assert_eq!(c3.out_size(n), Some(want), "3x3 s2 p1 on {n}");
        assert_eq!(c1.out_size(n), Some(want), "1x1 s2 p0 on {n}");
    }
    assert_eq!(Conv2dCfg::new(4, 3, 1).out_size(9), Some(9));
    assert_eq!(Conv2dCfg::new(4, 5, 0).out_size(4), None);
    assert_eq!(Conv2dCfg::new(4, 1, 0).with_stride(0).out_size(4), None);
    assert_eq!(
        Conv2dCfg::new(4, 3, 1),
        Conv2dCfg { out_channels: 4, kernel: 3, padding: 1, stride: 1 }
    );
}

#[test]
fn conv2d_strided_matches_naive() {
    for (x, cout, k, p, s, bias) in STRIDED {
        let cfg = Conv2dCfg::new(cout, k, p).with_stride(s);
        let op = ConvOp { x, cfg, bias, input_grad: true };
        let ps = op.params(17);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 13);
        let y = forward(&op, &xv, &ps);
        let want = naive_conv(&xv, x, &ps[0], ps.get(1).map(|v| v.as_slice()), cout, k, p, s);
        assert_close(&format!("conv {x:?} k{k} p{p} s{s}"), &y, &want, 1e-5);
    }
}

#[test]
fn conv2d_strided_gradients() {
    // Linear in x and in (w, b), as in `conv2d_gradients`.
    for (x, cout, k, p, s, bias) in STRIDED {
        let cfg = Conv2dCfg::new(cout, k, p).with_stride(s);
        let op = ConvOp { x, cfg, bias, input_grad: true };
        let ps = op.params(15);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 19);
        grad_check(&format!("conv {x:?} k{k} p{p} s{s}"), &op, &xv, &ps, 1e-2, 1e-2, true);
    }
}

#[test]
fn conv2d_strided_1x1_reads_every_other_pixel() {
    // A 1x1 stride-2 kernel reads the even rows and columns only: the others get exactly zero
    // gradient, and the output is the subsampled input times the weight.
    let x = (2, 3, 7, 6);
    let op =
        ConvOp { x, cfg: Conv2dCfg::new(2, 1, 0).with_stride(2), bias: false, input_grad: true };
    let ps = op.params(3);
    let xv = rv(2 * 3 * 42, 4);
    let r = rv(2 * 2 * 4 * 3, 5);
    let (_, gx, _) = grads(&op, &xv, &ps, &r);
    for (i, g) in gx.iter().enumerate() {
        let (iy, ix) = ((i / 6) % 7, i % 6);
        assert_eq!(*g == 0.0, iy % 2 == 1 || ix % 2 == 1, "input gradient {i} ({iy}, {ix}): {g}");
    }
}

// ---------------------------------------------------------------------------------------------
// global_avg_pool

#[test]
fn global_avg_pool_values_and_gradients() {
    let y = vec_of(&global_avg_pool(
        dev().tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0, -1.0, 0.0, 0.5, 0.5], (1, 2, 2, 2)),
    ));
    assert_eq!(y, [2.5, 0.0]);
    for x in [(2, 3, 5, 7), (3, 2, 1, 1), (2, 4, 8, 8), (17, 3, 4, 4)] {
        let op = GapOp(x);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 21);
        let plane = x.2 * x.3;
        let want: Vec<f32> = xv
            .chunks(plane)
            .map(|p| (p.iter().map(|v| *v as f64).sum::<f64>() / plane as f64) as f32)
            .collect();
        assert_close(&format!("gap {x:?}"), &forward(&op, &xv, &[]), &want, 1e-6);
        // Linear: exact up to rounding. The gradient is dy / (H W) everywhere in the plane.
        let (gx, _) = grad_check(&format!("gap {x:?}"), &op, &xv, &[], 1e-2, 1e-3, true);
        let r = rv(x.0 * x.1, 1234);
        for (i, g) in gx.iter().enumerate() {
            assert_eq!(*g, r[i / plane] / plane as f32, "gap {x:?} gradient {i}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// residual block: dfdx's `+` joins two branches of one input

#[test]
fn residual_block_gradients() {
    // Piecewise linear (one ReLU): central differences are exact unless a step crosses a kink,
    // so a small step keeps crossings rare and a 1e-2 tolerance leaves margin for rounding.
    for (x, cout, stride, shortcut) in [
        ((2, 3, 7, 7), 4, 2, Shortcut::Conv1x1),
        ((2, 3, 8, 8), 4, 2, Shortcut::Conv1x1),
        ((2, 3, 6, 6), 4, 1, Shortcut::Conv1x1),
        ((2, 4, 5, 5), 4, 1, Shortcut::Identity),
    ] {
        let op = ResBlockOp { x, cout, stride, shortcut };
        let ps = op.params(31);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 33);
        let name = format!("block {x:?} s{stride} {shortcut:?}");
        let (gx, _) = grad_check(&name, &op, &xv, &ps, 1e-3, 1e-2, true);
        // Both paths reach the input: without the shortcut's share the gradient differs.
        let r = rv(forward(&op, &xv, &ps).len(), 1234);
        let (_, gx_main, _) = grads(&MainBranch(&op), &xv, &ps[..2], &r);
        assert!(gx.iter().zip(&gx_main).any(|(a, b)| a != b), "{name}: shortcut adds nothing");
    }
}

/// A residual block's main branch alone (no shortcut, no add).
struct MainBranch<'a>(&'a ResBlockOp);
impl Op for MainBranch<'_> {
    type X = S4;
    type Y = S4;
    fn x_shape(&self) -> S4 {
        self.0.x
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        let c1 = Conv2dCfg::new(self.0.cout, 3, 1).with_stride(self.0.stride);
        let h = conv2d(x, &ps[0], None, c1, true);
        conv2d(relu(h), &ps[1], None, Conv2dCfg::new(self.0.cout, 3, 1), true)
    }
}

#[test]
fn residual_block_output_is_the_sum_of_its_branches() {
    let op = ResBlockOp { x: (2, 3, 7, 7), cout: 4, stride: 2, shortcut: Shortcut::Conv1x1 };
    let ps = op.params(41);
    let xv = rv(2 * 3 * 49, 43);
    let main = forward(&MainBranch(&op), &xv, &ps);
    let sc_op = ConvOp {
        x: op.x,
        cfg: Conv2dCfg::new(4, 1, 0).with_stride(2),
        bias: false,
        input_grad: true,
    };
    let sc = forward(&sc_op, &xv, &ps[2..]);
    let want: Vec<f32> = main.iter().zip(&sc).map(|(a, b)| a + b).collect();
    assert_eq!(bits(&forward(&op, &xv, &ps)), bits(&want));
}

// ---------------------------------------------------------------------------------------------
// avg_pool2d

#[test]
fn avg_pool2d_values_and_gradients() {
    for (x, k) in [((2, 3, 4, 4), 2), ((1, 2, 7, 7), 2), ((2, 1, 7, 5), 3), ((1, 1, 3, 3), 1)] {
        let op = PoolOp(x, k);
        let xv = rv(x.0 * x.1 * x.2 * x.3, 4);
        let y = forward(&op, &xv, &[]);
        assert_eq!(y.len(), x.0 * x.1 * (x.2 / k) * (x.3 / k));
        assert_close(&format!("pool {x:?}/{k}"), &y, &naive_pool(&xv, x, k), 1e-6);
        // Linear op: exact central differences (see conv2d_gradients).
        let (gx, _) = grad_check(&format!("pool {x:?}/{k}"), &op, &xv, &[], 1e-2, 1e-2, true);
        if x.2 == 7 && k == 2 {
            // floor mode: the last row and column get no gradient.
            assert!((0..x.0 * x.1).all(|pl| (0..7)
                .all(|i| gx[pl * 49 + 6 * 7 + i] == 0.0 && gx[pl * 49 + i * 7 + 6] == 0.0)));
        }
    }
    // Hand case: 1x1x2x2 -> mean.
    let t = dev().tensor_from_vec(vec![1.0, 2.0, 3.0, 6.0], (1, 1, 2, 2));
    assert_eq!(vec_of(&avg_pool2d(t, 2)), [3.0]);
    // 7x7 -> 3x3 like PyTorch AvgPool2d(2).
    let t = dev().tensor_from_vec(vec![0.0; 49], (1, 1, 7, 7));
    assert_eq!(*avg_pool2d(t, 2).shape(), (1, 1, 3, 3));
}

// ---------------------------------------------------------------------------------------------
// instance_norm

#[test]
fn instance_norm_hand_computed() {
    // One plane [1, 2, 3, 4]: mean 2.5, biased variance 1.25, so with gamma 2, beta 1 the output
    // is 2 * (x - 2.5) / sqrt(1.25 + 1e-5) + 1 = [-1.68328, 0.105573, 1.894427, 3.68328].
    let t = dev().tensor_from_vec(vec![1.0, 2.0, 3.0, 4.0], (1, 1, 2, 2));
    let y = vec_of(&instance_norm(t, &t1(&[2.0]), &t1(&[1.0]), 1e-5));
    let s = (1.25f64 + 1e-5).sqrt();
    let want: Vec<f32> =
        [-1.5, -0.5, 0.5, 1.5].iter().map(|v: &f64| (2.0 * v / s + 1.0) as f32).collect();
    assert_close("norm hand", &y, &want, 1e-6);
    assert_close("norm hand literal", &y, &[-1.683_28, 0.105_573, 1.894_427, 3.683_28], 1e-5);
}

#[test]
fn fused_block_tail_equals_the_separate_ops_bit_for_bit() {
    // Even and odd planes (7x5 with k = 2 drops the last row and column), k = 2 and 3.
    for (x, k) in [((3, 4, 6, 6), 2), ((2, 3, 7, 5), 2), ((2, 2, 6, 9), 3)] {
        for norm in [true, false] {
            let c = x.1;
            let ps = if norm {
                vec![rv(c, 51).iter().map(|v| v + 1.2).collect(), rv(c, 52)]
            } else {
                vec![]
            };
            let xv: Vec<f32> = rv(x.0 * c * x.2 * x.3, 53).iter().map(|v| 2.0 * v + 0.3).collect();
            let r = rv(x.0 * c * (x.2 / k) * (x.3 / k), 54);
            let fused = BlockOp { x, norm, k, fused: true };
            let (y, gx, gps) = grads(&fused, &xv, &ps, &r);
            let (y0, gx0, gps0) = grads(&BlockOp { fused: false, ..fused }, &xv, &ps, &r);
            let name = format!("block {x:?} k{k} norm {norm}");
            assert_eq!(bits(&y), bits(&y0), "{name}: output");
            assert_eq!(bits(&gx), bits(&gx0), "{name}: input gradient");
            for (i, (a, b)) in gps.iter().zip(&gps0).enumerate() {
                assert_eq!(bits(a), bits(b), "{name}: param {i} gradient");
            }
            // And against finite differences directly (nonlinear: see instance_norm's tolerance).
            grad_check(&name, &fused, &xv, &ps, 1e-3, 2e-2, true);
        }
    }
}

#[test]
fn instance_norm_values_and_gradients() {
    // Nonlinear op: central differences have O(eps^2) truncation error, so eps = 1e-3 with a 2e-2
    // tolerance (f32 rounding in L(x +- eps v) is ~1e-7 relative / 1e-3 step ~ 1e-4 of the
    // derivative, the curvature term ~1e-6: 2e-2 leaves a wide margin yet catches wrong formulas).
    for x in [(2, 3, 4, 4), (3, 2, 5, 3), (1, 4, 1, 7)] {
        let op = NormOp(x);
        let c = x.1;
        let ps = vec![rv(c, 21).iter().map(|v| v + 1.5).collect::<Vec<_>>(), rv(c, 22)];
        // Input with a large offset and scale: statistics must still be accurate.
        let xv: Vec<f32> = rv(x.0 * c * x.2 * x.3, 23).iter().map(|v| 3.0 * v + 10.0).collect();
        let y = forward(&op, &xv, &ps);
        assert_close(&format!("norm {x:?}"), &y, &naive_norm(&xv, x, &ps[0], &ps[1], 1e-5), 2e-5);
        grad_check(&format!("norm {x:?}"), &op, &xv, &ps, 1e-3, 2e-2, true);
    }
}

// ---------------------------------------------------------------------------------------------
// linear, relu, flatten

#[test]
fn linear_without_input_grad() {
    let (n, inf, outf) = (5, 9, 4);
    let ps = vec![rv(outf * inf, 41), rv(outf, 42)];
    let xv = rv(n * inf, 43);
    // Parameter gradients are still right (finite differences); the input gradient is zero.
    let (gx, gps) =
        grad_check("linear no dx", &LinearOp(n, inf, outf, false), &xv, &ps, 1e-2, 1e-2, false);
    assert!(gx.iter().all(|v| *v == 0.0));
    let r = rv(n * outf, 1234);
    let (_, gx_full, gps_full) = grads(&LinearOp(n, inf, outf, true), &xv, &ps, &r);
    assert!(gx_full.iter().any(|v| *v != 0.0));
    assert_eq!(bits(&gps[0]), bits(&gps_full[0]));
    assert_eq!(bits(&gps[1]), bits(&gps_full[1]));
}

#[test]
fn linear_values_and_gradients() {
    for (n, inf, outf) in [(4, 6, 3), (1, 5, 7), (17, 33, 10), (130, 784, 300), (700, 300, 300)] {
        let op = LinearOp(n, inf, outf, true);
        let ps = vec![rv(outf * inf, 31), rv(outf, 32)];
        let xv = rv(n * inf, 33);
        let y = forward(&op, &xv, &ps);
        assert_close("linear", &y, &naive_linear(&xv, n, inf, &ps[0], &ps[1], outf), 1e-5);
        // Linear in x and in (W, b): exact central differences (see conv2d_gradients).
        grad_check(&format!("linear {n}x{inf}->{outf}"), &op, &xv, &ps, 1e-2, 1e-2, true);
    }
    // Hand case: x = [1, 2], W = [[1, 0], [2, -1]] (out 2, in 2), b = [0.5, 0]: y = [1.5, 0].
    let x = dev().tensor_from_vec(vec![1.0, 2.0], (1, 2));
    assert_eq!(
        vec_of(&linear(x, &t1(&[1.0, 0.0, 2.0, -1.0]), &t1(&[0.5, 0.0]), 2, true)),
        [1.5, 0.0]
    );
}

#[test]
fn relu_values_and_gradients() {
    // Values kept at least 0.05 away from the kink, so eps = 1e-3 never crosses it and central
    // differences are exact (relu is piecewise linear).
    let away = |v: Vec<f32>| -> Vec<f32> {
        v.iter().map(|x| if *x >= 0.0 { x + 0.05 } else { x - 0.05 }).collect()
    };
    let x = (2, 3, 4, 5);
    let xv = away(rv(120, 41));
    let y = forward(&ReluOp(x), &xv, &[]);
    let want: Vec<f32> = xv.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(y, want);
    grad_check("relu4", &ReluOp(x), &xv, &[], 1e-3, 1e-2, true);
    let xv2 = away(rv(3 * 70_000, 42)); // spans several parallel chunks
    let y2 = forward(&Relu2Op(3, 70_000), &xv2, &[]);
    assert_eq!(y2, xv2.iter().map(|v| v.max(0.0)).collect::<Vec<_>>());
    grad_check("relu2", &Relu2Op(3, 70_000), &xv2, &[], 1e-3, 1e-2, true);
    // Gradient at exactly 0 is 0, like PyTorch.
    let (_, gx, _) = grads(&Relu2Op(1, 3), &[-1.0, 0.0, 2.0], &[], &[1.0, 1.0, 1.0]);
    assert_eq!(gx, [0.0, 0.0, 1.0]);
}

#[test]
fn flatten_passes_gradients_through() {
    let x = (3, 2, 3, 4);
    let t = dev().tensor_from_vec(rv(72, 50), x);
    let f = flatten(t.clone());
    assert_eq!(*f.shape(), (3, 24));
    assert_eq!(vec_of(&f), vec_of(&t));
    let op = FlattenLinearOp(x, 5);
    let ps = vec![rv(5 * 24, 51), rv(5, 52)];
    grad_check("flatten+linear", &op, &rv(72, 53), &ps, 1e-2, 1e-2, true);
}

// ---------------------------------------------------------------------------------------------
// losses and evaluation

#[test]
fn cross_entropy_pytorch_semantics() {
    // 2 classes, logits [0, ln 3], label 1: softmax = [1/4, 3/4], loss = -ln(3/4) = 0.2876821;
    // the gradient is softmax - onehot = [0.25, -0.25] (batch of 1).
    let x = dev().tensor_from_vec(vec![0.0, 3.0f32.ln()], (1, 2));
    let l = cross_entropy(x.leaky_trace(), &[1]);
    assert!((vec_of(&l)[0] - 0.287_682_1).abs() < 1e-6);
    let g = l.backward();
    assert_close("ce grad", &vec_of(&g.get(&x)), &[0.25, -0.25], 1e-6);
    // Mean over the batch: a second row [0, 0] label 0 has loss ln 2.
    let x = dev().tensor_from_vec(vec![0.0, 3.0f32.ln(), 0.0, 0.0], (2, 2));
    let l = vec_of(&cross_entropy(x, &[1, 0]))[0];
    assert!((l as f64 - (-(0.75f64).ln() + 2f64.ln()) / 2.0).abs() < 1e-6);
    // Huge logits stay finite (log-sum-exp).
    let x = dev().tensor_from_vec(vec![1000.0, 0.0, -1000.0], (1, 3));
    assert_eq!(vec_of(&cross_entropy(x, &[0]))[0], 0.0);
    let x = dev().tensor_from_vec(vec![1000.0, 0.0, -1000.0], (1, 3));
    assert!((vec_of(&cross_entropy(x, &[1]))[0] - 1000.0).abs() < 1e-3);
}

#[test]
fn cross_entropy_and_mse_gradients() {
    // Smooth nonlinear ops: eps = 1e-3, tolerance 1e-2 (truncation error O(eps^2)).
    let labels = vec![3, 0, 9, 9, 1, 4];
    let xv: Vec<f32> = rv(60, 61).iter().map(|v| 4.0 * v).collect();
    grad_check("ce", &CeOp(6, 10, labels.clone()), &xv, &[], 1e-3, 1e-2, true);
    // The loss value against a direct formula.
    let want: f64 = (0..6)
        .map(|i| {
            let row = &xv[i * 10..i * 10 + 10];
            let lse = row.iter().map(|v| (*v as f64).exp()).sum::<f64>().ln();
            lse - row[labels[i] as usize] as f64
        })
        .sum::<f64>()
        / 6.0;
    assert!((forward(&CeOp(6, 10, labels), &xv, &[])[0] as f64 - want).abs() < 1e-5);
    // mse is quadratic: central differences are exact up to rounding.
    let t = rv(12, 62);
    let op = MseOp(3, 4, t.clone());
    let av = rv(12, 63);
    grad_check("mse", &op, &av, &[], 1e-2, 1e-2, true);
    let want = av.iter().zip(&t).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / 12.0;
    assert!((forward(&op, &av, &[])[0] as f64 - want).abs() < 1e-6);
    // Hand case: a = [1, 2], target [0, 0]: mean((1, 4)) = 2.5.
    let a = dev().tensor_from_vec(vec![1.0, 2.0], (1, 2));
    assert_eq!(vec_of(&mse_loss(a, &[0.0, 0.0])), [2.5]);
}

#[test]
fn accuracy_counts_matches_cross_entropy() {
    let xv: Vec<f32> = rv(50, 71).iter().map(|v| 3.0 * v).collect();
    let labels = vec![0u8, 1, 2, 3, 4, 4, 3, 2, 1, 0];
    let (correct, sum) = accuracy_counts(&xv, 5, &labels);
    let want_correct = (0..10)
        .filter(|&i| {
            let row = &xv[i * 5..i * 5 + 5];
            let best = (0..5).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            best == labels[i] as usize
        })
        .count();
    assert_eq!(correct, want_correct);
    let ce = forward(&CeOp(10, 5, labels.clone()), &xv, &[])[0] as f64;
    assert!((sum / 10.0 - ce).abs() < 1e-6);
    // Hand case: rows [0, ln 3] label 1 (right, loss -ln 3/4) and [2, 1] label 1 (wrong).
    let (c, s) = accuracy_counts(&[0.0, 3.0f32.ln(), 2.0, 1.0], 2, &[1, 1]);
    assert_eq!(c, 1);
    let want = -(0.75f64).ln() + ((2f64).exp() + 1f64.exp()).ln() - 1.0;
    assert!((s - want).abs() < 1e-6);
}

// ---------------------------------------------------------------------------------------------
// composition and determinism

#[test]
fn small_network_gradients() {
    // Composition of every op, with a weight used twice (gradients must accumulate) and the
    // first conv without an input gradient. Step and tolerance are looser than for single ops:
    // a step must be small (3e-4) so that few ReLU inputs cross the kink (the norm amplifies
    // weight perturbations), which makes the f32 rounding of the loss (~1e-7 of a loss ~1, over a
    // change ~3e-4) a visible ~1e-3 relative error, plus kink crossings; measured errors are
    // <= 2e-2, so 5e-2 passes reliably while a missing accumulation (an error ~0.5) or a wrong
    // formula still fails.
    let op = NetOp;
    let ps = vec![
        rv(4 * 2 * 9, 81),
        rv(4, 83).iter().map(|v| v + 1.5).collect(),
        rv(4, 84),
        rv(4 * 4 * 9, 85),
        rv(3 * 36, 86),
        rv(3, 87),
    ];
    let xv = rv(3 * 2 * 36, 88);
    let (gx, _) = grad_check("net", &op, &xv, &ps, 3e-4, 5e-2, false);
    assert!(gx.iter().all(|v| *v == 0.0));
}

/// Runs `f` in a rayon pool of `n` threads.
fn in_pool<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

fn assert_same_bits<O: Op + Sync>(name: &str, op: &O, x: &[f32], ps: &[Vec<f32>]) {
    let r = rv(forward(op, x, ps).len(), 99);
    let runs: Vec<_> = [1, 2, 3].iter().map(|&n| in_pool(n, || grads(op, x, ps, &r))).collect();
    for (n, run) in [2, 3].iter().zip(&runs[1..]) {
        assert_eq!(bits(&runs[0].0), bits(&run.0), "{name}: output differs with {n} threads");
        assert_eq!(
            bits(&runs[0].1),
            bits(&run.1),
            "{name}: input gradient differs with {n} threads"
        );
        for (i, (a, b)) in runs[0].2.iter().zip(&run.2).enumerate() {
            assert_eq!(bits(a), bits(b), "{name}: param {i} gradient differs with {n} threads");
        }
    }
}

#[test]
fn bit_identical_across_thread_counts() {
    // Batch 10: two sample groups of unequal size (8 + 2). Sizes big enough that gemm itself
    // would split work over threads when allowed.
    let x = (10, 16, 12, 12);
    let xv = rv(10 * 16 * 144, 91);
    let conv = ConvOp {
        x,
        cfg: Conv2dCfg { out_channels: 32, kernel: 3, padding: 1, stride: 1 },
        bias: true,
        input_grad: true,
    };
    assert_same_bits("conv b10", &conv, &xv, &conv.params(92));
    let conv_nodx = ConvOp { input_grad: false, ..conv };
    assert_same_bits("conv b10 no dx", &conv_nodx, &xv, &conv_nodx.params(92));
    // Batch 1: one group; with 2 threads the samples run sequentially and gemm uses the pool.
    let x1 = (1, 32, 16, 16);
    let conv1 = ConvOp {
        x: x1,
        cfg: Conv2dCfg { out_channels: 32, kernel: 3, padding: 1, stride: 1 },
        bias: true,
        input_grad: true,
    };
    assert_same_bits("conv b1", &conv1, &rv(32 * 256, 93), &conv1.params(94));
    let norm = NormOp(x);
    assert_same_bits("norm b10", &norm, &xv, &[rv(16, 95), rv(16, 96)]);
    let lin = LinearOp(130, 300, 100, true);
    assert_same_bits("linear", &lin, &rv(130 * 300, 97), &[rv(30_000, 98), rv(100, 99)]);
    // Large enough (31M multiply-accumulates) that each product is split into parallel blocks:
    // columns for the forward and dW, rows for dx (batch 700 > 300 features).
    let lin = LinearOp(130, 784, 300, true);
    assert_same_bits("linear split", &lin, &rv(130 * 784, 90), &[rv(235_200, 91), rv(300, 92)]);
    let lin = LinearOp(700, 300, 300, true);
    assert_same_bits("linear split rows", &lin, &rv(700 * 300, 88), &[rv(90_000, 89), rv(300, 87)]);
    assert_same_bits("pool", &PoolOp(x, 2), &xv, &[]);
    let block = BlockOp { x, norm: true, k: 2, fused: true };
    assert_same_bits("block", &block, &xv, &[rv(16, 95), rv(16, 96)]);
    assert_same_bits("relu", &ReluOp(x), &xv, &[]);
}

#[test]
fn strided_ops_bit_identical_across_thread_counts() {
    // ResNet shapes, shrunk: a stage entry (3x3 stride 2) and its shortcut (1x1 stride 2) on a
    // batch of two unequal sample groups, and one sample (gemm then uses the pool).
    let x = (10, 16, 12, 12);
    let xv = rv(10 * 16 * 144, 51);
    for (k, p) in [(3, 1), (1, 0)] {
        let cfg = Conv2dCfg::new(32, k, p).with_stride(2);
        let conv = ConvOp { x, cfg, bias: true, input_grad: true };
        assert_same_bits(&format!("conv {k}x{k} s2 b10"), &conv, &xv, &conv.params(52));
        let conv1 = ConvOp { x: (1, 16, 12, 12), ..conv };
        assert_same_bits(
            &format!("conv {k}x{k} s2 b1"),
            &conv1,
            &xv[..16 * 144],
            &conv1.params(53),
        );
    }
    assert_same_bits("global_avg_pool", &GapOp(x), &xv, &[]);
    let block = ResBlockOp { x, cout: 32, stride: 2, shortcut: Shortcut::Conv1x1 };
    assert_same_bits("residual block", &block, &xv, &block.params(54));
}
