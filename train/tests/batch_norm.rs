//! Checks of batch normalisation (`lmc_train::ops::batch_norm_train` / `batch_norm_eval`):
//! forward values and batch statistics against an independent f64 implementation, gradients
//! against central finite differences in both modes, evaluation mode against training mode, the
//! running-statistics update against a hand calculation, errors instead of panics, and
//! bit-identical results for rayon pools of 1, 2 and 3 threads.
//!
//! Finite differences as in `tests/ops.rs` (the shared helpers are in `tests/common/`): the scalar is
//! `L = sum(out * r)` with a fixed random `r`; along a random direction `v` we compare
//! `L(x + eps v) - L(x - eps v)` with `<grad, (x + eps v) - (x - eps v)>`, both in f64.

use dfdx::prelude::*;
use lmc_train::ops::{
    batch_norm_eval, batch_norm_relu_eval, batch_norm_relu_train, batch_norm_train,
    check_batch_norm_train, conv2d, relu, BatchStats, Conv2dCfg, RunningStats, BN_EPS, BN_MOMENTUM,
    T1, T4,
};

mod common;
use common::{bits, dev, dot_loss, fd_err, numel, rv, t1, vec_of, S4};

/// Batch norm as a test subject: training mode, or evaluation mode with the given statistics;
/// `ps` = [gamma, beta]. With `sandwich`, `conv -> batch norm -> conv` (3x3, padding 1, C to C
/// channels, no bias, weights `ps[2]` and `ps[3]`): batch norm's input then comes from another
/// op on the tape and its input gradient flows on into one.
///
/// With a `tail`, `relu(norm(x) + residual)`: the fused op (`batch_norm_relu_*`), or with
/// `separate` the norm, dfdx's `+` and `relu` one after another.
#[derive(Clone)]
struct Bn {
    x: S4,
    running: Option<RunningStats>,
    sandwich: bool,
    tail: Tail,
    separate: bool,
}

/// What follows the norm (not with `sandwich`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tail {
    /// Nothing: the plain norm.
    Plain,
    /// A ReLU.
    Relu,
    /// `+ x` (the tape-free input, as a ResNet's identity shortcut) and a ReLU.
    Identity,
    /// `+ conv1x1(x)` (weights `ps[2]`, a branch with its own tape, as a ResNet's shortcut
    /// conv) and a ReLU.
    Branch,
}

impl Bn {
    fn train(x: S4) -> Self {
        Bn { x, running: None, sandwich: false, tail: Tail::Plain, separate: false }
    }
    fn eval(x: S4, rs: RunningStats) -> Self {
        Bn { x, running: Some(rs), sandwich: false, tail: Tail::Plain, separate: false }
    }
    fn norm<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        match &self.running {
            None => batch_norm_train(x, &ps[0], &ps[1], BN_EPS).unwrap().0,
            Some(rs) => batch_norm_eval(x, &ps[0], &ps[1], rs, BN_EPS).unwrap(),
        }
    }
    fn fused<Tp, R>(&self, x: T4<Tp>, ps: &[T1], res: Option<T4<R>>) -> T4<Tp>
    where
        Tp: Tape<f32, Cpu> + Merge<R>,
        R: Tape<f32, Cpu>,
    {
        if self.separate {
            let y = self.norm(x, ps);
            return match res {
                Some(r) => relu(y + r),
                None => relu(y),
            };
        }
        match &self.running {
            None => batch_norm_relu_train(x, &ps[0], &ps[1], BN_EPS, res).unwrap().0,
            Some(rs) => batch_norm_relu_eval(x, &ps[0], &ps[1], rs, BN_EPS, res).unwrap(),
        }
    }
    fn run<Tp: Tape<f32, Cpu>>(&self, x: T4<Tp>, ps: &[T1]) -> T4<Tp> {
        let c = self.x.1;
        match self.tail {
            Tail::Plain => {}
            Tail::Relu => return self.fused(x, ps, None::<T4<NoneTape>>),
            Tail::Identity => {
                let (x, tape) = x.split_tape();
                return self.fused(x.clone().put_tape(tape), ps, Some(x));
            }
            Tail::Branch => {
                let (x, tape) = x.split_tape();
                let cfg = Conv2dCfg { out_channels: c, kernel: 1, padding: 0, stride: 1 };
                let r = conv2d(x.retaped::<Tp>(), &ps[2], None, cfg, true);
                return self.fused(x.put_tape(tape), ps, Some(r));
            }
        }
        let cfg = Conv2dCfg { out_channels: c, kernel: 3, padding: 1, stride: 1 };
        let x = if self.sandwich { conv2d(x, &ps[2], None, cfg, true) } else { x };
        let y = self.norm(x, ps);
        if self.sandwich {
            conv2d(y, &ps[3], None, cfg, true)
        } else {
            y
        }
    }
    fn forward(&self, x: &[f32], ps: &[Vec<f32>]) -> Vec<f32> {
        let xt = dev().tensor_from_vec(x.to_vec(), self.x);
        let pts: Vec<T1> = ps.iter().map(|p| t1(p)).collect();
        vec_of(&self.run(xt, &pts))
    }
    fn loss(&self, x: &[f32], ps: &[Vec<f32>], r: &[f32]) -> f64 {
        self.forward(x, ps).iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
    }
    /// Output (traced run), input gradient and parameter gradients of `sum(out * r)`.
    fn grads(&self, x: &[f32], ps: &[Vec<f32>], r: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        let xt = dev().tensor_from_vec(x.to_vec(), self.x);
        let pts: Vec<T1> = ps.iter().map(|p| t1(p)).collect();
        let y = self.run(xt.leaky_trace(), &pts);
        let yv = vec_of(&y);
        let gr = dot_loss(y, r).backward();
        (yv, vec_of(&gr.get(&xt)), pts.iter().map(|p| vec_of(&gr.get(p))).collect())
    }
}

/// Checks the gradients w.r.t. x, gamma and beta by finite differences (step `eps`, relative
/// tolerance `tol`), and that the traced forward equals the untraced one bit for bit.
fn grad_check(name: &str, op: &Bn, x: &[f32], ps: &[Vec<f32>], eps: f32, tol: f64) {
    let y0 = op.forward(x, ps);
    let r = rv(y0.len(), 1234);
    let (yt, gx, gps) = op.grads(x, ps, &r);
    assert_eq!(bits(&y0), bits(&yt), "{name}: traced and untraced forward differ");
    assert_eq!(gx.len(), x.len(), "{name}: input gradient size");
    for seed in [11, 12] {
        let e = fd_err(|xx| op.loss(xx, ps, &r), x, &gx, eps, seed);
        assert!(e < tol, "{name}: input gradient rel. error {e:.3e} >= {tol:.0e}");
    }
    for (i, (p, gp)) in ps.iter().zip(&gps).enumerate() {
        assert_eq!(gp.len(), p.len(), "{name}: param {i} gradient size");
        let l = |pp: &[f32]| {
            let mut ps2 = ps.to_vec();
            ps2[i] = pp.to_vec();
            op.loss(x, &ps2, &r)
        };
        let e = fd_err(l, p, gp, eps, 100 + i as u64);
        assert!(e < tol, "{name}: param {i} gradient rel. error {e:.3e} >= {tol:.0e}");
    }
}

fn assert_close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{name}: element {i}: got {g}, want {w}");
    }
}

/// Independent f64 reference: per channel (mean, biased variance) over (N, H, W), by the
/// textbook two-pass formula over the channel's values gathered by index.
fn naive_stats(x: &[f32], (n, c, h, w): S4) -> Vec<(f64, f64)> {
    let p = h * w;
    (0..c)
        .map(|ch| {
            let vals: Vec<f64> = (0..n)
                .flat_map(|ni| (0..p).map(move |i| (ni, i)))
                .map(|(ni, i)| x[(ni * c + ch) * p + i] as f64)
                .collect();
            let m = vals.len() as f64;
            let mean = vals.iter().sum::<f64>() / m;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / m;
            (mean, var)
        })
        .collect()
}

/// Independent f64 reference of `gamma * (x - mean) / sqrt(var + eps) + beta` per channel.
fn naive_bn(x: &[f32], s: S4, g: &[f32], b: &[f32], stats: &[(f64, f64)], eps: f64) -> Vec<f32> {
    let (c, p) = (s.1, s.2 * s.3);
    x.iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = (i / p) % c;
            let (mean, var) = stats[ch];
            ((*v as f64 - mean) / (var + eps).sqrt() * g[ch] as f64 + b[ch] as f64) as f32
        })
        .collect()
}

/// Parameters (gamma around 1, beta around 0) and an input with an offset and a scale per
/// channel, so statistics must be accurate (as the instance-norm tests do).
fn case(s: S4, seed: u64) -> (Vec<f32>, Vec<Vec<f32>>) {
    let c = s.1;
    let ps = vec![rv(c, seed).iter().map(|v| v + 1.5).collect(), rv(c, seed + 1)];
    let p = s.2 * s.3;
    let x = rv(numel(s), seed + 2)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let ch = ((i / p) % c) as f32;
            (1.0 + ch) * v + 10.0 - 3.0 * ch
        })
        .collect();
    (x, ps)
}

const SHAPES: [S4; 4] = [(3, 5, 3, 3), (2, 2, 1, 7), (4, 3, 8, 8), (1, 2, 2, 3)];

#[test]
fn train_forward_and_batch_stats_match_f64_reference() {
    // Includes M = 2 (N = 2, 1x1 planes): the smallest batch training mode accepts.
    for (k, s) in SHAPES.iter().copied().chain([(2, 3, 1, 1)]).enumerate() {
        let (x, ps) = case(s, 10 * k as u64);
        let xt = dev().tensor_from_vec(x.clone(), s);
        let (y, st) = batch_norm_train(xt, &t1(&ps[0]), &t1(&ps[1]), BN_EPS).unwrap();
        let refs = naive_stats(&x, s);
        let name = format!("train {s:?}");
        assert_close(&name, &vec_of(&y), &naive_bn(&x, s, &ps[0], &ps[1], &refs, 1e-5), 2e-5);
        let m = s.0 * s.2 * s.3;
        assert_eq!(st.count, m, "{name}: count");
        let want_mean: Vec<f32> = refs.iter().map(|r| r.0 as f32).collect();
        let want_var: Vec<f32> =
            refs.iter().map(|r| (r.1 * m as f64 / (m as f64 - 1.0)) as f32).collect();
        assert_close(&format!("{name} mean"), &st.mean, &want_mean, 1e-6);
        assert_close(&format!("{name} unbiased var"), &st.var_unbiased, &want_var, 1e-6);
    }
}

#[test]
fn train_gradients_match_finite_differences() {
    // Nonlinear op: central differences have O(eps^2) truncation error, so eps = 1e-3 with a 2e-2
    // tolerance, as for instance norm (f32 rounding of L(x +- eps v) is ~1e-4 of the derivative).
    for (k, s) in SHAPES.iter().copied().enumerate() {
        let (x, ps) = case(s, 100 + 10 * k as u64);
        grad_check(&format!("train {s:?}"), &Bn::train(s), &x, &ps, 1e-3, 2e-2);
    }
}

#[test]
fn gradients_through_a_conv_sandwich() {
    // conv -> batch norm -> conv in both modes: batch norm reads a traced intermediate and hands
    // its input gradient on. Training mode is smooth: the instance-norm step and tolerance. In
    // evaluation mode the loss is at most quadratic along each direction (products of weights),
    // where central differences are exact whatever the step; the beta gradient is small next to
    // the loss (a sum over hundreds of f32 terms), whose rounding gave 5e-3 relative errors at a
    // step of 1e-2: a step of 5e-2 keeps it well under the 1e-2 tolerance.
    for s in [(3, 4, 5, 5), (2, 3, 1, 6)] {
        let c = s.1;
        let (x, mut ps) = case(s, 600);
        ps.push(rv(c * c * 9, 601));
        ps.push(rv(c * c * 9, 602));
        let train = Bn { sandwich: true, ..Bn::train(s) };
        grad_check(&format!("conv-bn-conv train {s:?}"), &train, &x, &ps, 1e-3, 2e-2);
        let eval = Bn { sandwich: true, ..Bn::eval(s, running_of(s, 603)) };
        grad_check(&format!("conv-bn-conv eval {s:?}"), &eval, &x, &ps, 5e-2, 1e-2);
    }
}

#[test]
fn train_input_gradient_is_orthogonal_to_constants_and_xhat() {
    // The batch statistics are differentiated through: per channel, sum dx = 0 and
    // sum dx * xhat = 0 (a shift or scale of a channel's input does not change the output).
    let s = (3, 5, 3, 3);
    let (x, ps) = case(s, 7);
    let r = rv(numel(s), 8);
    let (_, gx, _) = Bn::train(s).grads(&x, &ps, &r);
    let refs = naive_stats(&x, s);
    let (c, p) = (s.1, s.2 * s.3);
    let mut sums = vec![(0.0f64, 0.0f64, 0.0f64); c];
    for (i, (g, v)) in gx.iter().zip(&x).enumerate() {
        let ch = (i / p) % c;
        let xh = (*v as f64 - refs[ch].0) / (refs[ch].1 + 1e-5).sqrt();
        sums[ch].0 += *g as f64;
        sums[ch].1 += *g as f64 * xh;
        sums[ch].2 += (*g as f64).abs();
    }
    for (ch, (a, b, mag)) in sums.iter().enumerate() {
        assert!(a.abs() < 1e-5 * mag && b.abs() < 1e-5 * mag, "channel {ch}: {a:e}, {b:e}");
    }
}

fn running_of(s: S4, seed: u64) -> RunningStats {
    let c = s.1;
    RunningStats {
        mean: rv(c, seed).iter().map(|v| 5.0 * v + 5.0).collect(),
        var: rv(c, seed + 1).iter().map(|v| 4.0 * v + 4.5).collect(),
        num_batches_tracked: 3,
    }
}

#[test]
fn eval_forward_and_gradients() {
    // M = 1 is fine in evaluation mode. The op is affine in x, gamma and beta, so central
    // differences are exact but for f32 rounding (~1e-4 of the derivative at eps = 1e-2): a 1e-3
    // tolerance.
    for (k, s) in SHAPES.iter().copied().chain([(1, 3, 1, 1)]).enumerate() {
        let (x, ps) = case(s, 200 + 10 * k as u64);
        let rs = running_of(s, 300 + k as u64);
        let stats: Vec<(f64, f64)> =
            rs.mean.iter().zip(&rs.var).map(|(m, v)| (*m as f64, *v as f64)).collect();
        let op = Bn::eval(s, rs);
        let name = format!("eval {s:?}");
        let want = naive_bn(&x, s, &ps[0], &ps[1], &stats, 1e-5);
        assert_close(&name, &op.forward(&x, &ps), &want, 2e-5);
        grad_check(&name, &op, &x, &ps, 1e-2, 1e-3);
    }
}

#[test]
fn eval_equals_train_when_running_stats_are_the_batchs() {
    // Evaluation mode normalises with `running.var`, training mode with the batch's *biased*
    // variance; so for this equality the running variance is set to the biased batch variance
    // (var_unbiased * (M - 1) / M), not to the unbiased one RunningStats::update blends in.
    // Equal up to the f32 rounding of the stored statistics: the mean (about 10 here, with a
    // standard deviation near 0.6) is stored to ~6e-8 relative, which moves `x - mean` by ~6e-7,
    // i.e. the output by ~2.5e-6 after gamma * rstd; hence a 1e-5 tolerance.
    for (k, s) in SHAPES.iter().copied().enumerate() {
        let (x, ps) = case(s, 400 + 10 * k as u64);
        let r = rv(numel(s), 401);
        let (g, b) = (t1(&ps[0]), t1(&ps[1]));
        let xt = dev().tensor_from_vec(x.clone(), s);
        let (yt, st) = batch_norm_train(xt, &g, &b, BN_EPS).unwrap();
        let m = st.count as f64;
        let rs = RunningStats {
            mean: st.mean.clone(),
            var: st.var_unbiased.iter().map(|v| (*v as f64 * (m - 1.0) / m) as f32).collect(),
            num_batches_tracked: 0,
        };
        let ye = batch_norm_eval(dev().tensor_from_vec(x.clone(), s), &g, &b, &rs, BN_EPS).unwrap();
        let name = format!("eval = train {s:?}");
        assert_close(&name, &vec_of(&ye), &vec_of(&yt), 1e-5);
        // The parameter gradients do not involve the statistics' derivatives, so they agree too
        // (dbeta = sum dy is computed identically, bit for bit).
        let (_, _, gt) = Bn::train(s).grads(&x, &ps, &r);
        let (_, _, ge) = Bn::eval(s, rs).grads(&x, &ps, &r);
        assert_close(&format!("{name} dgamma"), &ge[0], &gt[0], 1e-5);
        assert_eq!(bits(&ge[1]), bits(&gt[1]), "{name}: dbeta");
    }
}

#[test]
fn running_stats_update_by_hand() {
    // x of shape (N=2, C=2, H=1, W=2): planes n0c0 = [1, 2], n0c1 = [0, 0], n1c0 = [3, 6],
    // n1c1 = [0, 4]. M = 4 values per channel.
    // Channel 0: {1, 2, 3, 6}: mean 3, squared deviations 4 + 1 + 0 + 9 = 14, biased var 3.5,
    //   unbiased var 14/3.
    // Channel 1: {0, 0, 0, 4}: mean 1, squared deviations 1 + 1 + 1 + 9 = 12, biased var 3,
    //   unbiased var 4.
    // From RunningStats::new (mean 0, var 1) with momentum 0.1:
    //   update 1: mean0 = 0.9*0 + 0.1*3 = 0.3, var0 = 0.9*1 + 0.1*14/3 = 1.366667;
    //             mean1 = 0.1, var1 = 0.9 + 0.4 = 1.3; num_batches_tracked = 1.
    //   update 2 (same batch): mean0 = 0.9*0.3 + 0.3 = 0.57, var0 = 0.9*1.366667 + 0.466667 =
    //             1.696667; mean1 = 0.19, var1 = 0.9*1.3 + 0.4 = 1.57; num_batches_tracked = 2.
    let s = (2, 2, 1, 2);
    let x = vec![1.0, 2.0, 0.0, 0.0, 3.0, 6.0, 0.0, 4.0];
    let (g, b) = (t1(&[1.0, 2.0]), t1(&[0.0, -1.0]));
    let (y, st) = batch_norm_train(dev().tensor_from_vec(x, s), &g, &b, BN_EPS).unwrap();
    assert_eq!(st.count, 4);
    assert_close("hand mean", &st.mean, &[3.0, 1.0], 1e-7);
    assert_close("hand var", &st.var_unbiased, &[14.0 / 3.0, 4.0], 1e-7);
    // Output normalised with the biased variances 3.5 and 3 (channel 1: gamma 2, beta -1).
    let (s0, s1) = ((3.5f64 + 1e-5).sqrt(), (3.0f64 + 1e-5).sqrt());
    let want: Vec<f32> = [
        -2.0 / s0,
        -1.0 / s0,
        -2.0 / s1 - 1.0,
        -2.0 / s1 - 1.0,
        0.0,
        3.0 / s0,
        -2.0 / s1 - 1.0,
        2.0 * 3.0 / s1 - 1.0,
    ]
    .iter()
    .map(|v| *v as f32)
    .collect();
    assert_close("hand output", &vec_of(&y), &want, 1e-6);

    let mut rs = RunningStats::new(2);
    assert_eq!(
        (rs.mean.clone(), rs.var.clone(), rs.num_batches_tracked),
        (vec![0.0; 2], vec![1.0; 2], 0)
    );
    assert_eq!(BN_MOMENTUM, 0.1);
    rs.update(&st, BN_MOMENTUM).unwrap();
    assert_close("update 1 mean", &rs.mean, &[0.3, 0.1], 1e-6);
    assert_close("update 1 var", &rs.var, &[1.366_666_7, 1.3], 1e-6);
    assert_eq!(rs.num_batches_tracked, 1);
    rs.update(&st, BN_MOMENTUM).unwrap();
    assert_close("update 2 mean", &rs.mean, &[0.57, 0.19], 1e-6);
    assert_close("update 2 var", &rs.var, &[1.696_666_7, 1.57], 1e-6);
    assert_eq!(rs.num_batches_tracked, 2);
}

#[test]
fn cumulative_update_averages_batches() {
    // momentum=None in PyTorch: from a fresh state the first batch is taken as it is, then each
    // batch weighs 1/k. Batches with means 3 and 5 (unbiased variances 1 and 3) average to 4
    // and 2 after two batches.
    let b1 = BatchStats { mean: vec![3.0], var_unbiased: vec![1.0], count: 4 };
    let b2 = BatchStats { mean: vec![5.0], var_unbiased: vec![3.0], count: 4 };
    let mut rs = RunningStats::new(1);
    rs.update_cumulative(&b1).unwrap();
    assert_eq!((rs.mean[0], rs.var[0], rs.num_batches_tracked), (3.0, 1.0, 1));
    rs.update_cumulative(&b2).unwrap();
    assert_eq!((rs.mean[0], rs.var[0], rs.num_batches_tracked), (4.0, 2.0, 2));
    // A third batch of mean 10 weighs 1/3: (3 + 5 + 10) / 3 = 6.
    rs.update_cumulative(&BatchStats { mean: vec![10.0], var_unbiased: vec![2.0], count: 4 })
        .unwrap();
    assert_close("cumulative mean", &rs.mean, &[6.0], 1e-6);
    assert_close("cumulative var", &rs.var, &[2.0], 1e-6);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let (g, b) = (t1(&[1.0, 1.0]), t1(&[0.0, 0.0]));
    // M = N * H * W = 1: PyTorch's "Expected more than 1 value per channel when training".
    let x1 = dev().tensor_from_vec(vec![1.0, 2.0], (1, 2, 1, 1));
    let e = batch_norm_train(x1.leaky_trace(), &g, &b, BN_EPS).unwrap_err().to_string();
    assert!(e.contains("more than 1 value per channel"), "{e}");
    assert!(check_batch_norm_train((1, 2, 1, 1)).is_err());
    assert!(check_batch_norm_train((2, 2, 1, 1)).is_ok());
    assert!(check_batch_norm_train((1, 2, 1, 2)).is_ok());
    // Evaluation mode accepts M = 1.
    assert!(batch_norm_eval(x1.clone(), &g, &b, &RunningStats::new(2), BN_EPS).is_ok());
    // Wrong parameter or statistics sizes, bad eps, a negative running variance.
    let x = dev().tensor_from_vec(vec![0.5; 8], (2, 2, 1, 2));
    assert!(batch_norm_train(x.clone(), &t1(&[1.0]), &b, BN_EPS).is_err());
    assert!(batch_norm_train(x.clone(), &g, &t1(&[0.0; 3]), BN_EPS).is_err());
    assert!(batch_norm_train(x.clone(), &g, &b, -1.0).is_err());
    assert!(batch_norm_train(x.clone(), &g, &b, f32::NAN).is_err());
    assert!(batch_norm_eval(x.clone(), &g, &b, &RunningStats::new(3), BN_EPS).is_err());
    let mut neg = RunningStats::new(2);
    neg.var[1] = -1.0;
    let e = batch_norm_eval(x.clone(), &g, &b, &neg, BN_EPS).unwrap_err().to_string();
    assert!(e.contains("channel 1"), "{e}");
    // Empty planes in evaluation mode: an empty output, zero gradients.
    let e0 = dev().tensor_from_vec(Vec::<f32>::new(), (2, 2, 0, 3));
    let y0 = batch_norm_eval(e0.leaky_trace(), &g, &b, &RunningStats::new(2), BN_EPS).unwrap();
    assert_eq!(vec_of(&y0).len(), 0);
    let gr = dot_loss(y0, &[]).backward();
    assert_eq!(vec_of(&gr.get(&g)), vec![0.0; 2]);
    assert!(batch_norm_train(e0, &g, &b, BN_EPS).is_err());
    // Updating running statistics of another width.
    let (_, st) = batch_norm_train(x, &g, &b, BN_EPS).unwrap();
    let mut rs3 = RunningStats::new(3);
    assert!(rs3.update(&st, BN_MOMENTUM).is_err());
    assert_eq!(rs3, RunningStats::new(3), "a failed update changes nothing");
    let mut rs2 = RunningStats::new(2);
    for m in [-0.1, 1.5, f32::NAN] {
        assert!(rs2.update(&st, m).is_err(), "momentum {m}");
    }
    assert_eq!(rs2, RunningStats::new(2), "a failed update changes nothing");
    let _: &BatchStats = &st;
}

/// Runs `f` in a rayon pool of `n` threads.
fn in_pool<R: Send>(n: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap().install(f)
}

#[test]
fn bit_identical_across_thread_counts() {
    // (10, 16, 32, 32): 160 planes of 1024 values, split over several parallel tasks; the small
    // shapes run as one task. Outputs, all gradients and the batch statistics must agree bit for
    // bit with 1, 2 and 3 threads, in both modes.
    for s in [(10, 16, 32, 32), (3, 5, 3, 3), (64, 4, 4, 4)] {
        let (x, ps) = case(s, 500);
        let r = rv(numel(s), 501);
        for op in [Bn::train(s), Bn::eval(s, running_of(s, 502))] {
            let run = |n| {
                in_pool(n, || {
                    let (y, gx, gps) = op.grads(&x, &ps, &r);
                    let xt = dev().tensor_from_vec(x.clone(), s);
                    let (_, st) = batch_norm_train(xt, &t1(&ps[0]), &t1(&ps[1]), BN_EPS).unwrap();
                    (y, gx, gps, st)
                })
            };
            let base = run(1);
            let name = format!("{s:?} eval {}", op.running.is_some());
            for n in [2, 3] {
                let o = run(n);
                assert_eq!(bits(&base.0), bits(&o.0), "{name}: output, {n} threads");
                assert_eq!(bits(&base.1), bits(&o.1), "{name}: dx, {n} threads");
                assert_eq!(bits(&base.2[0]), bits(&o.2[0]), "{name}: dgamma, {n} threads");
                assert_eq!(bits(&base.2[1]), bits(&o.2[1]), "{name}: dbeta, {n} threads");
                assert_eq!(bits(&base.3.mean), bits(&o.3.mean), "{name}: mean, {n} threads");
                assert_eq!(
                    bits(&base.3.var_unbiased),
                    bits(&o.3.var_unbiased),
                    "{name}: var, {n} threads"
                );
            }
        }
    }
}

/// The fused ops' cases: every tail in both modes, with the 1x1 weight the branch needs.
fn fused_cases(s: S4, seed: u64) -> Vec<(Bn, Vec<Vec<f32>>)> {
    let (_, ps) = case(s, seed);
    let mut out = Vec::new();
    for tail in [Tail::Relu, Tail::Identity, Tail::Branch] {
        let mut ps = ps.clone();
        if tail == Tail::Branch {
            ps.push(rv(s.1 * s.1, seed + 1));
        }
        // Running statistics near the inputs' own, so that the ReLU keeps some values and
        // zeroes others in evaluation mode too.
        let running = RunningStats {
            mean: rv(s.1, seed + 2).iter().map(|v| 0.3 * v).collect(),
            var: rv(s.1, seed + 3).iter().map(|v| 0.5 + v.abs()).collect(),
            num_batches_tracked: 3,
        };
        for op in [Bn::train(s), Bn::eval(s, running)] {
            out.push((Bn { tail, ..op }, ps.clone()));
        }
    }
    out
}

#[test]
fn fused_relu_and_residual_equal_the_separate_ops_bit_for_bit() {
    // The output and every gradient (input, gamma, beta, the branch's weight), in both modes,
    // without a residual, with the tape-free input as the residual (its gradient then adds to
    // the traced input's by id) and with a traced branch; one shape runs as one task, one as
    // several.
    for s in [(3, 5, 3, 3), (8, 16, 16, 16)] {
        let x = rv(numel(s), 700);
        let r = rv(numel(s), 701);
        for (op, ps) in fused_cases(s, 702) {
            let name = format!("{s:?} {:?} eval {}", op.tail, op.running.is_some());
            let sep = Bn { separate: true, ..op.clone() };
            let (y, gx, gps) = op.grads(&x, &ps, &r);
            let (ys, gxs, gpss) = sep.grads(&x, &ps, &r);
            assert!(y.contains(&0.0) && y.iter().any(|v| *v > 0.0), "{name}");
            assert_eq!(bits(&y), bits(&ys), "{name}: output");
            assert_eq!(bits(&op.forward(&x, &ps)), bits(&ys), "{name}: untraced output");
            assert_eq!(bits(&gx), bits(&gxs), "{name}: dx");
            for (i, (a, b)) in gps.iter().zip(&gpss).enumerate() {
                assert_eq!(bits(a), bits(b), "{name}: param {i} gradient");
            }
        }
    }
}

#[test]
fn fused_gradients_match_finite_differences() {
    // The ReLU's kink is met with probability ~ eps per value; at these sizes and eps none of the
    // values sits that close to it (the check would fail loudly otherwise). Tolerances and steps
    // as for the plain op in each mode.
    for (k, s) in [(4, 3, 3, 3), (2, 3, 1, 6)].into_iter().enumerate() {
        let x = rv(numel(s), 710 + k as u64);
        for (op, ps) in fused_cases(s, 720 + 10 * k as u64) {
            let name = format!("fused {s:?} {:?} eval {}", op.tail, op.running.is_some());
            let (eps, tol) = if op.running.is_some() { (1e-3, 1e-2) } else { (1e-3, 2e-2) };
            grad_check(&name, &op, &x, &ps, eps, tol);
        }
    }
}

#[test]
fn fused_bit_identical_across_thread_counts() {
    let s = (10, 16, 32, 32);
    let x = rv(numel(s), 730);
    let r = rv(numel(s), 731);
    for (op, ps) in fused_cases(s, 732) {
        let name = format!("{:?} eval {}", op.tail, op.running.is_some());
        let base = in_pool(1, || op.grads(&x, &ps, &r));
        for n in [2, 3] {
            let o = in_pool(n, || op.grads(&x, &ps, &r));
            assert_eq!(bits(&base.0), bits(&o.0), "{name}: output, {n} threads");
            assert_eq!(bits(&base.1), bits(&o.1), "{name}: dx, {n} threads");
            for (i, (a, b)) in base.2.iter().zip(&o.2).enumerate() {
                assert_eq!(bits(a), bits(b), "{name}: param {i} gradient, {n} threads");
            }
        }
    }
}

#[test]
fn fused_residual_of_another_shape_is_an_error() {
    let s = (2, 3, 4, 4);
    let (x, ps) = case(s, 740);
    let xt = dev().tensor_from_vec(x, s);
    let r = dev().tensor_from_vec(vec![0.0; 2 * 3 * 4 * 5], (2, 3, 4, 5));
    let (g, b) = (t1(&ps[0]), t1(&ps[1]));
    let e = batch_norm_relu_train(xt.clone(), &g, &b, BN_EPS, Some(r.clone())).unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
    let rs = running_of(s, 741);
    let e = batch_norm_relu_eval(xt, &g, &b, &rs, BN_EPS, Some(r)).unwrap_err();
    assert!(e.to_string().contains("residual"), "{e}");
}
