//! The tangent rules, op by op, for one group of samples: forward (`a`, `R{a}`), the loss, and
//! backward (`g`, `R{g}`), accumulating the parameters' `R{dL/dtheta}` (the summed, unscaled
//! loss's `H v`). `R{a}` of the images is zero, so the first layer skips its terms.

use super::{Layer, Net};
use crate::ops::gemm::{Gemm, Layout, Operand, Par};
use crate::ops::{col2im_add, im2col, ConvGeom};
use crate::sparse_input::SparseInput;

/// What a layer keeps from its forward pass for its backward pass (beyond its input).
enum Saved {
    None,
    /// Instance norm, per plane: normalised input, its tangent, `1/sqrt(var + eps)` and
    /// `t = rstd * mean(xhat * R{x})` (so that `R{rstd} = -t rstd`).
    Norm {
        xh: Vec<f32>,
        rxh: Vec<f32>,
        rstd: Vec<f32>,
        t: Vec<f32>,
    },
    /// Batch norm in evaluation mode: the normalised input `(x - mean) rstd` and, per channel,
    /// `rstd = 1/sqrt(var + eps)`.
    Affine {
        xh: Vec<f32>,
        rstd: Vec<f32>,
    },
    /// Batch norm in training mode.
    BatchTrain(super::bn_train::Saved),
    /// A residual join: each branch's trace (none for an identity shortcut).
    Residual {
        main: Trace,
        shortcut: Option<Trace>,
    },
}

/// What a list of layers kept from its forward pass: each layer's input (but the first's, which
/// the caller holds), its tangent and what the layer saved.
struct Trace {
    a: Vec<Vec<f32>>,
    ra: Vec<Option<Vec<f32>>>,
    saved: Vec<Saved>,
}

/// `layers` (at least one) forward on `m` samples from `x` (tangent `rx`): the trace, the
/// output and its tangent.
fn seq_forward(
    layers: &[Layer],
    p: &[f32],
    v: &[f32],
    m: usize,
    x: &[f32],
    rx: Option<&[f32]>,
) -> (Trace, Vec<f32>, Option<Vec<f32>>) {
    let mut t = Trace {
        a: Vec::with_capacity(layers.len()),
        ra: Vec::with_capacity(layers.len()),
        saved: Vec::with_capacity(layers.len()),
    };
    let (mut h, mut rh, s) = forward(&layers[0], p, v, m, x, rx);
    t.a.push(Vec::new());
    t.ra.push(None);
    t.saved.push(s);
    for layer in &layers[1..] {
        let (o, ro, s) = forward(layer, p, v, m, &h, rh.as_deref());
        t.a.push(std::mem::replace(&mut h, o));
        t.ra.push(std::mem::replace(&mut rh, ro));
        t.saved.push(s);
    }
    (t, h, rh)
}

/// `layers` backward on `m` samples from the gradient `g` at their output and its tangent `rg`,
/// given their input `x` and its tangent `rx` (as [`seq_forward`] had them): adds their
/// parameters' part into `acc`, returns the gradient at their input and its tangent.
#[allow(clippy::too_many_arguments)]
fn seq_backward(
    layers: &[Layer],
    p: &[f32],
    v: &[f32],
    m: usize,
    (x, rx): (&[f32], Option<&[f32]>),
    t: &Trace,
    (g, rg): (&[f32], &[f32]),
    acc: &mut Acc,
) -> (Vec<f32>, Vec<f32>) {
    let (mut g, mut rg) = (g.to_vec(), rg.to_vec());
    for (l, layer) in layers.iter().enumerate().rev() {
        let (a, ra) = if l == 0 { (x, rx) } else { (&t.a[l][..], t.ra[l].as_deref()) };
        (g, rg) = backward(layer, p, v, m, a, ra, &t.saved[l], &g, &rg, acc, true);
    }
    (g, rg)
}

/// A group's `H v` over the parameters from `lo` on (those before it are summed elsewhere).
pub(super) struct Acc {
    pub data: Vec<f32>,
    pub lo: usize,
}

impl Acc {
    fn at(&mut self, r: &std::ops::Range<usize>) -> &mut [f32] {
        &mut self.data[r.start - self.lo..r.end - self.lo]
    }
}

/// `sum a_i b_i` in f64, in 8 interleaved partial sums (so it vectorises; fixed order).
fn dot64(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let (mut ia, mut ib) = (a.chunks_exact(8), b.chunks_exact(8));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for j in 0..8 {
            acc[j] += ca[j] as f64 * cb[j] as f64;
        }
    }
    for (j, (x, y)) in ia.remainder().iter().zip(ib.remainder()).enumerate() {
        acc[j] += *x as f64 * *y as f64;
    }
    acc.iter().sum()
}

/// `sum a_i` in f64 (as [`dot64`]).
fn sum64(a: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = a.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] += c[j] as f64;
        }
    }
    for (j, x) in it.remainder().iter().enumerate() {
        acc[j] += *x as f64;
    }
    acc.iter().sum()
}

/// `sum (a_i - m)^2` in f64 (as [`dot64`]).
fn sq_dev64(a: &[f32], m: f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = a.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            let d = c[j] as f64 - m;
            acc[j] += d * d;
        }
    }
    for (j, x) in it.remainder().iter().enumerate() {
        let d = *x as f64 - m;
        acc[j] += d * d;
    }
    acc.iter().sum()
}

/// `dst (rows x n) [+]= lhs * rhs`, single-threaded (the group is already a task).
#[allow(clippy::too_many_arguments)]
fn mm(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: Operand, rhs: Operand, acc: bool) {
    Gemm { m, n, k, lhs, rhs, accumulate: acc }.run(dst, Layout::row_major(n), Par::Seq);
}

/// What a group does at the first layer.
#[derive(Clone, Copy)]
pub(super) enum First<'a> {
    /// Its parameters' part like every other layer's.
    Params,
    /// Its forward products from the batch's split (with the stacked weight `[W; V_W]` of the
    /// first linear layer); its parameters' part is left to the caller, who gets `R{g}` at its
    /// output (m x outputs).
    Sparse(&'a SparseInput),
    /// Its parameters' part, and `R{g}` at the images (m x input values) returned: the tangent
    /// pushed through the backward and read at the pixels.
    Input,
}

/// The summed (not averaged) cross-entropy of the group's samples `x` (rows `rows` of the
/// batch) with `labels`; adds the group's unscaled `H v` into `acc`; the second value is what
/// `first` says.
pub(super) fn group(
    net: &Net,
    p: &[f32],
    v: &[f32],
    (x, rows): (&[f32], std::ops::Range<usize>),
    labels: &[u8],
    acc: &mut Acc,
    first: First,
) -> (f64, Option<Vec<f32>>) {
    let m = labels.len();
    if m == 0 {
        return (0.0, None);
    }
    let nl = net.layers.len();
    // a[l], ra[l]: the input of layer l (a[nl]: the logits); ra[0] is zero (None).
    let mut a: Vec<Vec<f32>> = Vec::with_capacity(nl + 1);
    let mut ra: Vec<Option<Vec<f32>>> = Vec::with_capacity(nl + 1);
    let mut saved = Vec::with_capacity(nl);
    a.push(x.to_vec());
    ra.push(None);
    for (l, layer) in net.layers.iter().enumerate() {
        let (o, ro, s) = match (l, layer, first) {
            (0, Layer::Linear { outputs, bias, .. }, First::Sparse(split)) => {
                // [X W^T | X V_W^T] (m x 2 outputs) from the split, then the biases.
                let o = *outputs;
                let mut both = vec![0f32; m * 2 * o];
                split.forward(rows.clone(), 2 * o, &mut both);
                let (b, vb) = (&p[bias.clone()], &v[bias.clone()]);
                let mut y = vec![0f32; m * o];
                let mut ry = vec![0f32; m * o];
                for ((yr, ryr), br) in
                    y.chunks_exact_mut(o).zip(ry.chunks_exact_mut(o)).zip(both.chunks_exact(2 * o))
                {
                    for j in 0..o {
                        yr[j] = br[j] + b[j];
                        ryr[j] = br[o + j] + vb[j];
                    }
                }
                (y, Some(ry), Saved::None)
            }
            _ => forward(layer, p, v, m, &a[l], ra[l].as_deref()),
        };
        a.push(o);
        ra.push(ro);
        saved.push(s);
    }
    let (mut g, mut rg, loss) = cross_entropy(&a[nl], ra[nl].as_deref(), labels, net.classes());
    for l in (0..nl).rev() {
        if l == 0 && matches!(first, First::Sparse(_)) {
            return (loss, Some(rg));
        }
        let need_input = l > 0 || matches!(first, First::Input);
        let (gi, rgi) = backward(
            &net.layers[l],
            p,
            v,
            m,
            &a[l],
            ra[l].as_deref(),
            &saved[l],
            &g,
            &rg,
            acc,
            need_input,
        );
        if l == 0 {
            return (loss, matches!(first, First::Input).then_some(rgi));
        }
        (g, rg) = (gi, rgi);
    }
    (loss, None)
}

/// Loss sum, and per row `g = softmax(z) - onehot` and `R{g} = p * R{z} - p (p . R{z})`
/// (the softmax Jacobian applied to the logits' tangent).
fn cross_entropy(
    z: &[f32],
    rz: Option<&[f32]>,
    labels: &[u8],
    k: usize,
) -> (Vec<f32>, Vec<f32>, f64) {
    let mut g = vec![0f32; z.len()];
    let mut rg = vec![0f32; z.len()];
    let mut loss = 0f64;
    let mut pr = vec![0f64; k];
    for (r, &y) in labels.iter().enumerate() {
        let zr = &z[r * k..(r + 1) * k];
        let mx = zr.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let s: f64 = zr.iter().map(|&t| (t as f64 - mx).exp()).sum();
        loss += mx + s.ln() - zr[y as usize] as f64;
        for (q, &t) in pr.iter_mut().zip(zr) {
            *q = (t as f64 - mx).exp() / s;
        }
        let mut pdot = 0f64;
        if let Some(rz) = rz {
            pdot = dot_pr(&pr, &rz[r * k..(r + 1) * k]);
        }
        for j in 0..k {
            let onehot = if j == y as usize { 1.0 } else { 0.0 };
            g[r * k + j] = (pr[j] - onehot) as f32;
            if let Some(rz) = rz {
                rg[r * k + j] = (pr[j] * (rz[r * k + j] as f64 - pdot)) as f32;
            }
        }
    }
    (g, rg, loss)
}

fn dot_pr(p: &[f64], r: &[f32]) -> f64 {
    p.iter().zip(r).map(|(a, b)| a * *b as f64).sum()
}

/// One layer forward on `m` samples: output, its tangent (None when zero), saved state.
fn forward(
    layer: &Layer,
    p: &[f32],
    v: &[f32],
    m: usize,
    a: &[f32],
    ra: Option<&[f32]>,
) -> (Vec<f32>, Option<Vec<f32>>, Saved) {
    if matches!(layer, Layer::Conv { .. }) && m > SPLIT {
        return split_conv_forward(layer, p, v, m, a, ra);
    }
    let ol = layer.out_len();
    match layer {
        Layer::Linear { inputs: i, outputs: o, weight, bias } => {
            let (i, o) = (*i, *o);
            let (w, b) = (&p[weight.clone()], &p[bias.clone()]);
            let (vw, vb) = (&v[weight.clone()], &v[bias.clone()]);
            let mut y = vec![0f32; m * o];
            // y (m x o) = a (m x i) W^T + b
            mm(&mut y, m, o, i, Operand::row_major(a, i), Operand::transposed(w, i), false);
            // R{y} = a V_W^T + R{a} W^T + V_b
            let mut ry = vec![0f32; m * o];
            mm(&mut ry, m, o, i, Operand::row_major(a, i), Operand::transposed(vw, i), false);
            if let Some(ra) = ra {
                mm(&mut ry, m, o, i, Operand::row_major(ra, i), Operand::transposed(w, i), true);
            }
            for (yr, ryr) in y.chunks_exact_mut(o).zip(ry.chunks_exact_mut(o)) {
                for j in 0..o {
                    yr[j] += b[j];
                    ryr[j] += vb[j];
                }
            }
            (y, Some(ry), Saved::None)
        }
        Layer::Conv { .. } => {
            let (mut y, mut ry) = (vec![0f32; m * ol], vec![0f32; m * ol]);
            conv_forward(layer, p, v, m, (a, ra), (&mut y, &mut ry));
            (y, Some(ry), Saved::None)
        }
        Layer::InstanceNorm { channels, plane, eps, gamma, beta } => {
            let (c, q) = (*channels, *plane);
            let (ga, be) = (&p[gamma.clone()], &p[beta.clone()]);
            let (vg, vbe) = (&v[gamma.clone()], &v[beta.clone()]);
            let planes = m * c;
            let mut xh = a.to_vec();
            let mut rxh = vec![0f32; m * ol];
            let mut rstd = vec![0f32; planes];
            let mut t = vec![0f32; planes];
            let mut y = vec![0f32; m * ol];
            let mut ry = vec![0f32; m * ol];
            for pi in 0..planes {
                let ch = pi % c;
                let span = pi * q..(pi + 1) * q;
                let xp = &mut xh[span.clone()];
                let mean = sum64(xp) / q as f64;
                let var = sq_dev64(xp, mean) / q as f64;
                let r = 1.0 / (var + *eps as f64).sqrt();
                let (mean32, r32) = (mean as f32, r as f32);
                xp.iter_mut().for_each(|x| *x = (*x - mean32) * r32);
                rstd[pi] = r32;
                // R{xhat} = rstd (R{x} - mean(R{x}) - xhat mean(xhat R{x}))
                if let Some(ra) = ra {
                    let rx = &ra[span.clone()];
                    let mrx = sum64(rx) / q as f64;
                    let d = dot64(xp, rx) / q as f64;
                    t[pi] = (r * d) as f32;
                    let (mrx32, d32) = (mrx as f32, d as f32);
                    for ((o, &rxv), &xv) in rxh[span.clone()].iter_mut().zip(rx).zip(xp.iter()) {
                        *o = r32 * (rxv - mrx32 - xv * d32);
                    }
                }
                let (yp, ryp) = (&mut y[span.clone()], &mut ry[span.clone()]);
                for j in 0..q {
                    let (xv, rv) = (xp[j], rxh[pi * q + j]);
                    yp[j] = ga[ch] * xv + be[ch];
                    ryp[j] = ga[ch] * rv + vg[ch] * xv + vbe[ch];
                }
            }
            (y, Some(ry), Saved::Norm { xh, rxh, rstd, t })
        }
        Layer::BatchNorm { channels, plane, eps, gamma, beta, mean, var } => {
            // y = gamma xhat + beta, xhat = (x - mean) rstd with the running statistics (no
            // tangent): R{y} = gamma rstd R{x} + V_gamma xhat + V_beta.
            let (c, q) = (*channels, *plane);
            let (ga, be) = (&p[gamma.clone()], &p[beta.clone()]);
            let (vg, vbe) = (&v[gamma.clone()], &v[beta.clone()]);
            let (mu, var) = (&p[mean.clone()], &p[var.clone()]);
            let rstd: Vec<f32> =
                var.iter().map(|&s| (1.0 / (s as f64 + *eps as f64).sqrt()) as f32).collect();
            let mut xh = vec![0f32; m * ol];
            let mut y = vec![0f32; m * ol];
            let mut ry = vec![0f32; m * ol];
            for pi in 0..m * c {
                let ch = pi % c;
                let span = pi * q..(pi + 1) * q;
                let (r, mc, gc, bc, vgc, vbc) = (rstd[ch], mu[ch], ga[ch], be[ch], vg[ch], vbe[ch]);
                let gr = gc * r;
                for (xv, o) in a[span.clone()].iter().zip(&mut xh[span.clone()]) {
                    *o = (xv - mc) * r;
                }
                for (o, &xv) in y[span.clone()].iter_mut().zip(&xh[span.clone()]) {
                    *o = gc * xv + bc;
                }
                let ryp = &mut ry[span.clone()];
                match ra {
                    Some(ra) => {
                        for ((o, &xv), &rv) in ryp.iter_mut().zip(&xh[span.clone()]).zip(&ra[span])
                        {
                            *o = gr * rv + vgc * xv + vbc;
                        }
                    }
                    None => {
                        for (o, &xv) in ryp.iter_mut().zip(&xh[span]) {
                            *o = vgc * xv + vbc;
                        }
                    }
                }
            }
            (y, Some(ry), Saved::Affine { xh, rstd })
        }
        Layer::BatchNormTrain { channels, plane, eps, gamma, beta } => {
            // Per channel over the batch: instance norm's rule on each channel's values of all
            // samples, as one plane.
            let (y, ry, s) = super::bn_train::forward(
                (m, *channels, *plane),
                *eps,
                (&p[gamma.clone()], &p[beta.clone()]),
                (&v[gamma.clone()], &v[beta.clone()]),
                a,
                ra,
            );
            (y, Some(ry), Saved::BatchTrain(s))
        }
        Layer::GlobalAvgPool { plane, .. } => {
            let q = *plane;
            let mean = |x: &[f32]| -> Vec<f32> {
                x.chunks_exact(q).map(|c| (sum64(c) / q as f64) as f32).collect()
            };
            (mean(a), ra.map(mean), Saved::None)
        }
        Layer::Residual { main, shortcut } => {
            let (tm, mut y, ry) = seq_forward(main, p, v, m, a, ra);
            // An identity shortcut adds the input itself.
            let (ts, s, rs) = if shortcut.is_empty() {
                (None, None, None)
            } else {
                let (t, s, rs) = seq_forward(shortcut, p, v, m, a, ra);
                (Some(t), Some(s), rs)
            };
            y.iter_mut().zip(s.as_deref().unwrap_or(a)).for_each(|(o, x)| *o += x);
            let rs = if shortcut.is_empty() { ra } else { rs.as_deref() };
            let ry = match (ry, rs) {
                (Some(mut ry), Some(rs)) => {
                    ry.iter_mut().zip(rs).for_each(|(o, x)| *o += x);
                    Some(ry)
                }
                (ry, rs) => ry.or_else(|| rs.map(<[f32]>::to_vec)),
            };
            (y, ry, Saved::Residual { main: tm, shortcut: ts })
        }
        Layer::Relu { .. } => {
            // PyTorch's ReLU (NaN stays NaN); the tangent passes where the input is > 0.
            let y = a.iter().map(|&z| if z < 0.0 { 0.0 } else { z }).collect();
            let ry = ra
                .map(|ra| a.iter().zip(ra).map(|(&z, &r)| if z > 0.0 { r } else { 0.0 }).collect());
            (y, ry, Saved::None)
        }
        Layer::AvgPool { channels, h, w, k } => {
            let y = pool(a, m * channels, *h, *w, *k);
            let ry = ra.map(|ra| pool(ra, m * channels, *h, *w, *k));
            (y, ry, Saved::None)
        }
    }
}

/// A convolution's forward on `m` samples into `y` and `ry` (zeros, m x out_len each).
fn conv_forward(
    layer: &Layer,
    p: &[f32],
    v: &[f32],
    m: usize,
    (a, ra): (&[f32], Option<&[f32]>),
    (y, ry): (&mut [f32], &mut [f32]),
) {
    let Layer::Conv { cin, h, w: wd, cout, geom, weight, bias } = layer else {
        unreachable!("a convolution")
    };
    let ol = layer.out_len();
    let (il, cout) = (cin * h * wd, *cout);
    let (kd, pd) = (geom.kd(), geom.pd());
    let (w, vw) = (&p[weight.clone()], &v[weight.clone()]);
    let (b, vb) = match bias {
        Some(bias) => (&p[bias.clone()], &v[bias.clone()]),
        None => (&[][..], &[][..]),
    };
    let mut col = vec![0f32; if geom.direct() { 0 } else { kd * pd }];
    for s in 0..m {
        let (yn, ryn) = (&mut y[s * ol..(s + 1) * ol], &mut ry[s * ol..(s + 1) * ol]);
        // Without a bias the outputs start at zero.
        for (co, (&bc, &vbc)) in b.iter().zip(vb).enumerate() {
            yn[co * pd..(co + 1) * pd].fill(bc);
            ryn[co * pd..(co + 1) * pd].fill(vbc);
        }
        let cm = cols(geom, &a[s * il..(s + 1) * il], &mut col);
        // y_n (cout x pd) = b + W col_n; R{y_n} = V_b + V_W col_n + W R{col_n}
        mm(yn, cout, pd, kd, Operand::row_major(w, kd), Operand::row_major(cm, pd), true);
        mm(ryn, cout, pd, kd, Operand::row_major(vw, kd), Operand::row_major(cm, pd), true);
        if let Some(ra) = ra {
            let rcm = cols(geom, &ra[s * il..(s + 1) * il], &mut col);
            mm(ryn, cout, pd, kd, Operand::row_major(w, kd), Operand::row_major(rcm, pd), true);
        }
    }
}

/// A convolution's backward on `m` samples: adds its parameters' part into `acc` and, when `gi`
/// and `rgi` are not empty (zeros, m x in_len each), the input's gradient and tangent into them.
#[allow(clippy::too_many_arguments)]
fn conv_backward(
    layer: &Layer,
    p: &[f32],
    v: &[f32],
    m: usize,
    (a, ra): (&[f32], Option<&[f32]>),
    (g, rg): (&[f32], &[f32]),
    acc: &mut Acc,
    (gi, rgi): (&mut [f32], &mut [f32]),
) {
    let Layer::Conv { cout, geom, weight, bias, .. } = layer else { unreachable!("a convolution") };
    let il = layer.in_len();
    let need_input = !gi.is_empty();
    let (cout, ol) = (*cout, layer.out_len());
    let (kd, pd) = (geom.kd(), geom.pd());
    let (w, vw) = (&p[weight.clone()], &v[weight.clone()]);
    let direct = geom.direct();
    let mut col = vec![0f32; if direct { 0 } else { kd * pd }];
    let mut rcol = col.clone();
    let mut dcol = vec![0f32; if need_input { kd * pd } else { 0 }];
    for s in 0..m {
        let (gn, rgn) = (&g[s * ol..(s + 1) * ol], &rg[s * ol..(s + 1) * ol]);
        let cm = cols(geom, &a[s * il..(s + 1) * il], &mut col);
        // R{dW} (cout x kd) += R{g_n} col_n^T + g_n R{col_n}^T
        let aw = acc.at(weight);
        mm(aw, cout, kd, pd, Operand::row_major(rgn, pd), Operand::transposed(cm, pd), true);
        if let Some(ra) = ra {
            let rcm = cols(geom, &ra[s * il..(s + 1) * il], &mut rcol);
            mm(aw, cout, kd, pd, Operand::row_major(gn, pd), Operand::transposed(rcm, pd), true);
        }
        if let Some(bias) = bias {
            let ab = acc.at(bias);
            for (d, row) in ab.iter_mut().zip(rgn.chunks_exact(pd)) {
                *d += sum64(row) as f32;
            }
        }
        if need_input {
            // dcol = W^T g_n, dx_n = col2im(dcol); R{dcol} = W^T R{g_n} + V_W^T g_n. A 1x1
            // stride-1 conv's column matrix is its input, so its dcol is dx_n itself.
            let (gin, rgin) = (&mut gi[s * il..(s + 1) * il], &mut rgi[s * il..(s + 1) * il]);
            // dst (kd x pd) [+]= M^T (kd x cout) * d (cout x pd)
            let wt = |dst: &mut [f32], mw: &[f32], d: &[f32], acc: bool| {
                let (lhs, rhs) = (Operand::transposed(mw, kd), Operand::row_major(d, pd));
                mm(dst, kd, pd, cout, lhs, rhs, acc);
            };
            if direct {
                wt(gin, w, gn, false);
                wt(rgin, w, rgn, false);
                wt(rgin, vw, gn, true);
            } else {
                wt(&mut dcol, w, gn, false);
                col2im_add(geom, &mut dcol, gin);
                wt(&mut dcol, w, rgn, false);
                wt(&mut dcol, vw, gn, true);
                col2im_add(geom, &mut dcol, rgin);
            }
        }
    }
}

/// Samples per task of a convolution in a group larger than this (only a whole batch with
/// training-mode batch norm is: other groups hold at most `CONV_GROUP` = 8 samples).
const SPLIT: usize = 8;

/// Samples `s0..s1` of a batch of `len`-value samples.
fn rows(x: &[f32], len: usize, s0: usize, s1: usize) -> &[f32] {
    &x[s0 * len..s1 * len]
}

/// A convolution's forward on `m` > [`SPLIT`] samples in fixed chunks of `SPLIT`, in parallel,
/// each writing its samples' outputs in place (each sample's output is its own, so the result
/// is the sequential one).
fn split_conv_forward(
    layer: &Layer,
    p: &[f32],
    v: &[f32],
    m: usize,
    a: &[f32],
    ra: Option<&[f32]>,
) -> (Vec<f32>, Option<Vec<f32>>, Saved) {
    use rayon::prelude::*;
    let (il, ol) = (layer.in_len(), layer.out_len());
    let (mut y, mut ry) = (vec![0f32; m * ol], vec![0f32; m * ol]);
    y.par_chunks_mut(SPLIT * ol).zip(ry.par_chunks_mut(SPLIT * ol)).enumerate().for_each(
        |(c, (y, ry))| {
            let (s0, s1) = (c * SPLIT, ((c + 1) * SPLIT).min(m));
            let ra = ra.map(|r| rows(r, il, s0, s1));
            conv_forward(layer, p, v, s1 - s0, (rows(a, il, s0, s1), ra), (y, ry));
        },
    );
    (y, Some(ry), Saved::None)
}

/// `x` in `n` slices of `len` (the last shorter; empty slices where `x` runs out).
fn chunked(x: &mut [f32], len: usize, n: usize) -> Vec<&mut [f32]> {
    let mut parts: Vec<&mut [f32]> = x.chunks_mut(len).collect();
    parts.resize_with(n, Default::default);
    parts
}

/// A convolution's backward on `m` > [`SPLIT`] samples in fixed chunks of `SPLIT`, in
/// parallel, each writing its samples' input gradients in place and summing its parameters'
/// part into its own vector, added in chunk order (fixed by `m` alone, so the result does not
/// depend on the thread count).
#[allow(clippy::too_many_arguments)]
fn split_conv_backward(
    layer: &Layer,
    p: &[f32],
    v: &[f32],
    m: usize,
    (a, ra): (&[f32], Option<&[f32]>),
    (g, rg): (&[f32], &[f32]),
    acc: &mut Acc,
    need_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let Layer::Conv { weight, bias, .. } = layer else { unreachable!("a convolution") };
    let (il, ol) = (layer.in_len(), layer.out_len());
    let lo = weight.start.min(bias.as_ref().map_or(usize::MAX, |b| b.start));
    let hi = weight.end.max(bias.as_ref().map_or(0, |b| b.end));
    let chunks = m.div_ceil(SPLIT);
    let len = if need_input { m * il } else { 0 };
    let (mut gi, mut rgi) = (vec![0f32; len], vec![0f32; len]);
    let parts: Vec<Vec<f32>> = chunked(&mut gi, SPLIT * il, chunks)
        .into_par_iter()
        .zip(chunked(&mut rgi, SPLIT * il, chunks))
        .enumerate()
        .map(|(c, (gc, rgc))| {
            let (s0, s1) = (c * SPLIT, ((c + 1) * SPLIT).min(m));
            let mut sub = Acc { data: vec![0f32; hi - lo], lo };
            let ra = ra.map(|r| rows(r, il, s0, s1));
            let (g, rg) = (rows(g, ol, s0, s1), rows(rg, ol, s0, s1));
            conv_backward(
                layer,
                p,
                v,
                s1 - s0,
                (rows(a, il, s0, s1), ra),
                (g, rg),
                &mut sub,
                (gc, rgc),
            );
            sub.data
        })
        .collect();
    for part in parts {
        acc.data[lo - acc.lo..hi - acc.lo].iter_mut().zip(&part).for_each(|(d, x)| *d += x);
    }
    (gi, rgi)
}

/// Average pooling of `planes` (h x w) planes over k x k windows (floor mode).
fn pool(x: &[f32], planes: usize, h: usize, w: usize, k: usize) -> Vec<f32> {
    let (ho, wo) = (h / k, w / k);
    let inv = 1.0 / (k * k) as f32;
    let mut y = vec![0f32; planes * ho * wo];
    for (xp, yp) in x.chunks_exact(h * w).zip(y.chunks_exact_mut(ho * wo)) {
        if k == 2 {
            for (oy, yr) in yp.chunks_exact_mut(wo).enumerate() {
                let r0 = &xp[2 * oy * w..2 * oy * w + 2 * wo];
                let r1 = &xp[(2 * oy + 1) * w..(2 * oy + 1) * w + 2 * wo];
                for ((yv, a), b) in yr.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                    *yv = ((a[0] + a[1]) + (b[0] + b[1])) * 0.25;
                }
            }
            continue;
        }
        for oy in 0..ho {
            for ox in 0..wo {
                let mut s = 0f32;
                for ky in 0..k {
                    for kx in 0..k {
                        s += xp[(oy * k + ky) * w + ox * k + kx];
                    }
                }
                yp[oy * wo + ox] = s * inv;
            }
        }
    }
    y
}

/// The adjoint of [`pool`]: each window gets its output's gradient / k^2 (uncovered rows and
/// columns get 0).
fn unpool(g: &[f32], planes: usize, h: usize, w: usize, k: usize) -> Vec<f32> {
    let (ho, wo) = (h / k, w / k);
    let inv = 1.0 / (k * k) as f32;
    let mut x = vec![0f32; planes * h * w];
    for (xp, gp) in x.chunks_exact_mut(h * w).zip(g.chunks_exact(ho * wo)) {
        if k == 2 {
            for (oy, gr) in gp.chunks_exact(wo).enumerate() {
                let (top, bottom) = xp[2 * oy * w..(2 * oy + 2) * w].split_at_mut(w);
                for ((t, b), gv) in top.chunks_exact_mut(2).zip(bottom.chunks_exact_mut(2)).zip(gr)
                {
                    let v = gv * 0.25;
                    t.fill(v);
                    b.fill(v);
                }
            }
            continue;
        }
        for oy in 0..ho {
            for ox in 0..wo {
                let gv = gp[oy * wo + ox] * inv;
                for ky in 0..k {
                    for kx in 0..k {
                        xp[(oy * k + ky) * w + ox * k + kx] = gv;
                    }
                }
            }
        }
    }
    x
}

/// One sample's im2col matrix (kd x pd), or the sample itself for a direct 1x1 convolution.
fn cols<'a>(geom: &ConvGeom, xn: &'a [f32], col: &'a mut [f32]) -> &'a [f32] {
    if geom.direct() {
        xn
    } else {
        im2col(geom, xn, col);
        col
    }
}

/// One layer backward on `m` samples, given the gradient `g` at its output and its tangent
/// `rg`: adds its parameters' `R{dL/dtheta}` into `acc`, and returns the gradient at its input
/// and its tangent when `need_input` (else two empty vectors).
#[allow(clippy::too_many_arguments)]
fn backward(
    layer: &Layer,
    p: &[f32],
    v: &[f32],
    m: usize,
    a: &[f32],
    ra: Option<&[f32]>,
    saved: &Saved,
    g: &[f32],
    rg: &[f32],
    acc: &mut Acc,
    need_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    if matches!(layer, Layer::Conv { .. }) && m > SPLIT {
        return split_conv_backward(layer, p, v, m, (a, ra), (g, rg), acc, need_input);
    }
    let il = layer.in_len();
    let mut gi = Vec::new();
    let mut rgi = Vec::new();
    match layer {
        Layer::Linear { inputs: i, outputs: o, weight, bias } => {
            let (i, o) = (*i, *o);
            let (w, vw) = (&p[weight.clone()], &v[weight.clone()]);
            // R{dW} (o x i) = R{g}^T a + g^T R{a};  R{db} = column sums of R{g}
            let aw = acc.at(weight);
            mm(aw, o, i, m, Operand::transposed(rg, o), Operand::row_major(a, i), true);
            if let Some(ra) = ra {
                mm(aw, o, i, m, Operand::transposed(g, o), Operand::row_major(ra, i), true);
            }
            let ab = acc.at(bias);
            for row in rg.chunks_exact(o) {
                for (d, x) in ab.iter_mut().zip(row) {
                    *d += x;
                }
            }
            if need_input {
                // dA (m x i) = g W;  R{dA} = R{g} W + g V_W
                gi = vec![0f32; m * i];
                mm(&mut gi, m, i, o, Operand::row_major(g, o), Operand::row_major(w, i), false);
                rgi = vec![0f32; m * i];
                mm(&mut rgi, m, i, o, Operand::row_major(rg, o), Operand::row_major(w, i), false);
                mm(&mut rgi, m, i, o, Operand::row_major(g, o), Operand::row_major(vw, i), true);
            }
        }
        Layer::Conv { .. } => {
            if need_input {
                (gi, rgi) = (vec![0f32; m * il], vec![0f32; m * il]);
            }
            conv_backward(layer, p, v, m, (a, ra), (g, rg), acc, (&mut gi, &mut rgi));
        }
        Layer::InstanceNorm { channels, plane, gamma, beta, .. } => {
            let Saved::Norm { xh, rxh, rstd, t } = saved else {
                unreachable!("instance norm saves its statistics")
            };
            let (c, q) = (*channels, *plane);
            let (ga, vg) = (&p[gamma.clone()], &v[gamma.clone()]);

            if need_input {
                gi = vec![0f32; m * il];
                rgi = vec![0f32; m * il];
            }
            let qf = q as f64;
            for pi in 0..m * c {
                let ch = pi % c;
                let span = pi * q..(pi + 1) * q;
                let (gp, rgp, xp, rxp) =
                    (&g[span.clone()], &rg[span.clone()], &xh[span.clone()], &rxh[span.clone()]);
                let (sg, sgx, srg, srgx, sgrx) =
                    (sum64(gp), dot64(gp, xp), sum64(rgp), dot64(rgp, xp), dot64(gp, rxp));
                // R{dgamma} = sum R{g} xhat + g R{xhat};  R{dbeta} = sum R{g}
                acc.at(gamma)[ch] += (srgx + sgrx) as f32;
                acc.at(beta)[ch] += srg as f32;
                if !need_input {
                    continue;
                }
                // With gx = gamma g: dx = r (gx - mean(gx) - xhat mean(gx xhat)); its tangent
                // R{dx} = -t dx + r (R{gx} - mean(R{gx}) - R{xhat} A - xhat B), where
                // R{gx} = V_gamma g + gamma R{g}, A = mean(gx xhat), B = mean(R{gx} xhat + gx R{xhat}).
                let (gam, vgam, r) = (ga[ch] as f64, vg[ch] as f64, rstd[pi] as f64);
                let mgx = gam * sg / qf;
                let am = gam * sgx / qf;
                let mrgx = (vgam * sg + gam * srg) / qf;
                let bm = (vgam * sgx + gam * srgx + gam * sgrx) / qf;
                let (gin, rgin) = (&mut gi[span.clone()], &mut rgi[span.clone()]);
                let (gam32, vgam32, r32, t32) = (gam as f32, vgam as f32, r as f32, t[pi]);
                let (mgx32, am32, mrgx32, bm32) = (mgx as f32, am as f32, mrgx as f32, bm as f32);
                for j in 0..q {
                    let dx = r32 * (gam32 * gp[j] - mgx32 - xp[j] * am32);
                    let rgx = vgam32 * gp[j] + gam32 * rgp[j];
                    gin[j] = dx;
                    rgin[j] = -t32 * dx + r32 * (rgx - mrgx32 - rxp[j] * am32 - xp[j] * bm32);
                }
            }
        }
        Layer::BatchNorm { channels, plane, gamma, beta, .. } => {
            let Saved::Affine { xh, rstd } = saved else {
                unreachable!("batch norm saves its normalised input")
            };
            let (c, q) = (*channels, *plane);
            let (ga, vg) = (&p[gamma.clone()], &v[gamma.clone()]);
            if need_input {
                gi = vec![0f32; m * il];
                rgi = vec![0f32; m * il];
            }
            for pi in 0..m * c {
                let ch = pi % c;
                let span = pi * q..(pi + 1) * q;
                let (gp, rgp, xp) = (&g[span.clone()], &rg[span.clone()], &xh[span.clone()]);
                // dgamma = sum g xhat, dbeta = sum g; R{xhat} = rstd R{x}, so
                // R{dgamma} = sum R{g} xhat + rstd sum g R{x}, R{dbeta} = sum R{g}.
                let mut rdg = dot64(rgp, xp);
                if let Some(ra) = ra {
                    rdg += rstd[ch] as f64 * dot64(gp, &ra[span.clone()]);
                }
                acc.at(gamma)[ch] += rdg as f32;
                acc.at(beta)[ch] += sum64(rgp) as f32;
                if need_input {
                    // dx = gamma rstd g; R{dx} = gamma rstd R{g} + V_gamma rstd g.
                    let (s, vs) = (ga[ch] * rstd[ch], vg[ch] * rstd[ch]);
                    for j in span {
                        gi[j] = s * g[j];
                        rgi[j] = s * rg[j] + vs * g[j];
                    }
                }
            }
        }
        Layer::BatchNormTrain { channels, plane, gamma, beta, .. } => {
            let Saved::BatchTrain(s) = saved else {
                unreachable!("a training-mode batch norm saves its statistics")
            };
            let (mut dg, mut db) = (acc.at(gamma).to_vec(), acc.at(beta).to_vec());
            (gi, rgi) = super::bn_train::backward(
                (m, *channels, *plane),
                (&p[gamma.clone()], &v[gamma.clone()]),
                s,
                g,
                rg,
                (&mut dg, &mut db),
                need_input,
            );
            acc.at(gamma).copy_from_slice(&dg);
            acc.at(beta).copy_from_slice(&db);
        }
        Layer::GlobalAvgPool { plane, .. } => {
            if need_input {
                let q = *plane;
                let spread = |x: &[f32]| -> Vec<f32> {
                    x.iter().flat_map(|&d| std::iter::repeat_n(d / q as f32, q)).collect()
                };
                gi = spread(g);
                rgi = spread(rg);
            }
        }
        Layer::Residual { main, shortcut } => {
            let Saved::Residual { main: tm, shortcut: ts } = saved else {
                unreachable!("a residual join saves its branches")
            };
            // The gradient and its tangent flow into both branches; their input gradients add
            // (an identity shortcut passes them unchanged).
            let (mut gm, mut rgm) = seq_backward(main, p, v, m, (a, ra), tm, (g, rg), acc);
            let branch;
            let (gs, rgs) = match ts {
                Some(ts) => {
                    branch = seq_backward(shortcut, p, v, m, (a, ra), ts, (g, rg), acc);
                    (&branch.0[..], &branch.1[..])
                }
                None => (g, rg),
            };
            gm.iter_mut().zip(gs).for_each(|(o, x)| *o += x);
            rgm.iter_mut().zip(rgs).for_each(|(o, x)| *o += x);
            (gi, rgi) = (gm, rgm);
        }
        Layer::Relu { .. } => {
            if need_input {
                let mask = |x: &[f32]| -> Vec<f32> {
                    a.iter().zip(x).map(|(&z, &d)| if z > 0.0 { d } else { 0.0 }).collect()
                };
                gi = mask(g);
                rgi = mask(rg);
            }
        }
        Layer::AvgPool { channels, h, w, k } => {
            if need_input {
                gi = unpool(g, m * channels, *h, *w, *k);
                rgi = unpool(rg, m * channels, *h, *w, *k);
            }
        }
    }
    (gi, rgi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The instance norm over `c` planes of `m * q` values that a training-mode batch norm of `m`
    /// samples is, on their values gathered by [`to_channels`].
    fn batch_plane_norm(
        c: usize,
        q: usize,
        m: usize,
        eps: f32,
        gamma: &std::ops::Range<usize>,
        beta: &std::ops::Range<usize>,
    ) -> Layer {
        Layer::InstanceNorm {
            channels: c,
            plane: m * q,
            eps,
            gamma: gamma.clone(),
            beta: beta.clone(),
        }
    }

    /// `m` samples of `c` planes of `q` values (m, c, q) regrouped per channel (c, m, q).
    fn to_channels(x: &[f32], m: usize, c: usize, q: usize) -> Vec<f32> {
        transpose_blocks(x, m, c, q)
    }

    /// The inverse of [`to_channels`].
    fn from_channels(x: &[f32], m: usize, c: usize, q: usize) -> Vec<f32> {
        transpose_blocks(x, c, m, q)
    }

    /// A `rows` x `cols` grid of blocks of `q` values, row-major, transposed to `cols` x `rows`.
    fn transpose_blocks(x: &[f32], rows: usize, cols: usize, q: usize) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                let src = &x[(r * cols + c) * q..(r * cols + c + 1) * q];
                out[(c * rows + r) * q..(c * rows + r + 1) * q].copy_from_slice(src);
            }
        }
        out
    }

    /// The training-mode batch norm computed in place equals, bit for bit, what it replaced:
    /// instance norm on the batch regrouped per channel (planes of m * q values), forward and
    /// backward, with and without an input tangent, for planes that are and are not multiples
    /// of the eight summation lanes.
    #[test]
    fn batch_norm_in_place_is_instance_norm_on_the_regrouped_batch_bit_for_bit() {
        // Deterministic, irregular values.
        let mut k = 0u32;
        let mut next = move || {
            k += 1;
            (k as f32 * 0.618_034).sin() * 1.7 + (k as f32 * 0.071).cos() * 0.4
        };
        for (m, c, q) in [(3, 5, 4), (2, 3, 64), (5, 2, 7), (1, 4, 9), (8, 16, 16)] {
            let (gamma, beta) = (0..c, c..2 * c);
            let p: Vec<f32> = (0..2 * c).map(|_| next() + 1.0).collect();
            let v: Vec<f32> = (0..2 * c).map(|_| next()).collect();
            let len = m * c * q;
            let mut vec = || (0..len).map(|_| next() * 2.0 + 0.3).collect::<Vec<_>>();
            let (a, ra, g, rg) = (vec(), vec(), vec(), vec());
            let layer = Layer::BatchNormTrain {
                channels: c,
                plane: q,
                eps: 1e-5,
                gamma: gamma.clone(),
                beta: beta.clone(),
            };
            let norm = batch_plane_norm(c, q, m, 1e-5, &gamma, &beta);
            for tangent in [true, false] {
                let ra = tangent.then_some(&ra[..]);
                let (y, ry, saved) = forward(&layer, &p, &v, m, &a, ra);
                let rat = ra.map(|r| to_channels(r, m, c, q));
                let (yo, ryo, so) =
                    forward(&norm, &p, &v, 1, &to_channels(&a, m, c, q), rat.as_deref());
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&from_channels(&yo, m, c, q)), "{m} {c} {q}");
                assert_eq!(
                    bits(ry.as_deref().unwrap()),
                    bits(&from_channels(&ryo.unwrap(), m, c, q))
                );
                for need_input in [true, false] {
                    let mut acc = Acc { data: vec![0.5; 2 * c], lo: 0 };
                    let (gi, rgi) =
                        backward(&layer, &p, &v, m, &a, ra, &saved, &g, &rg, &mut acc, need_input);
                    let mut acc_o = Acc { data: vec![0.5; 2 * c], lo: 0 };
                    let (gt, rgt) = (to_channels(&g, m, c, q), to_channels(&rg, m, c, q));
                    let (gio, rgio) = backward(
                        &norm,
                        &p,
                        &v,
                        1,
                        &[],
                        None,
                        &so,
                        &gt,
                        &rgt,
                        &mut acc_o,
                        need_input,
                    );
                    assert_eq!(bits(&acc.data), bits(&acc_o.data), "{m} {c} {q}");
                    if need_input {
                        assert_eq!(bits(&gi), bits(&from_channels(&gio, m, c, q)));
                        assert_eq!(bits(&rgi), bits(&from_channels(&rgio, m, c, q)));
                    } else {
                        assert!(gi.is_empty() && rgi.is_empty());
                    }
                }
            }
        }
    }
}
