//! An independent float64 reference of our models' loss and gradient, written with plain loops
//! from the layout's names and shapes (no code shared with the library's ops): the mean
//! cross-entropy of an MLP (`fc_layers.i`, `fc`), a DC/DM ConvNet (`features.i` conv3x3 with
//! padding 1 -> optional instance norm -> ReLU -> avg-pool 2x2, then `classifier`) or a ResNet
//! (`conv`, `bn`, `blocks.i.conv1/bn1/conv2/bn2/shortcut.0/shortcut.1`, `fc`: basic blocks
//! `relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`, global average pool; batch norm in
//! evaluation mode from the running statistics, instance norm, or none). It also returns every
//! ReLU input, so a finite-difference step can be checked not to cross a kink. From it,
//! [`cd_hessian`] assembles the Hessian by central differences of gradients, [`cd_columns`]
//! some of its columns.

use lmc_train::model::Model;
use lmc_train::params::ParamKind;
use rayon::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Linear {
        i: usize,
        o: usize,
        w: usize,
        b: usize,
    },
    /// k x k kernel at stride `s` with zero padding `pad`; `b`: the bias's offset, if any.
    Conv {
        cin: usize,
        h: usize,
        wd: usize,
        cout: usize,
        k: usize,
        s: usize,
        pad: usize,
        w: usize,
        b: Option<usize>,
    },
    Norm {
        c: usize,
        q: usize,
        g: usize,
        b: usize,
    },
    /// Batch norm in training mode: statistics per channel over the whole batch (biased
    /// variance), so the batch runs op by op ([`Reference::loss_grad`]).
    BnTrain {
        c: usize,
        q: usize,
        g: usize,
        b: usize,
    },
    /// Batch norm in evaluation mode: running mean and variance at `mean`, `var`.
    Bn {
        c: usize,
        q: usize,
        g: usize,
        b: usize,
        mean: usize,
        var: usize,
    },
    Relu,
    Pool {
        c: usize,
        h: usize,
        wd: usize,
    },
    /// Mean over each of `c` planes of `q` values.
    Gap {
        c: usize,
        q: usize,
    },
    /// `main(x) + short(x)` (an empty `short` is the identity).
    Res {
        main: Vec<Op>,
        short: Vec<Op>,
    },
}

/// What an op's backward needs from its forward: its input, the instance norm's normalised
/// input and 1/std per channel, a residual join's branches.
struct Rec {
    input: Vec<f64>,
    norm: Option<(Vec<f64>, Vec<f64>)>,
    branches: Option<(Vec<Rec>, Vec<Rec>)>,
}

/// What a batch's backward needs from an op's forward: each sample's [`Rec`], or a
/// training-mode batch norm's normalised inputs (per sample) and 1/std per channel, or a
/// residual join's branches.
enum BRec {
    PerSample(Vec<Rec>),
    BnTrain(Vec<Vec<f64>>, Vec<f64>),
    Res(Vec<BRec>, Vec<BRec>),
}

/// A model as the reference runs it.
pub struct Reference {
    ops: Vec<Op>,
    /// Input values per sample.
    pub input: usize,
    /// Classes.
    pub classes: usize,
    /// Parameters.
    pub params: usize,
}

/// The output side of a k x k convolution at stride `s` with padding `pad`.
fn out_side(n: usize, k: usize, s: usize, pad: usize) -> usize {
    (n + 2 * pad - k) / s + 1
}

impl Reference {
    /// The reference of `model` with its batch norms in training mode.
    pub fn in_training_mode(model: &Model) -> Reference {
        fn train(ops: Vec<Op>) -> Vec<Op> {
            ops.into_iter()
                .map(|op| match op {
                    Op::Bn { c, q, g, b, .. } => Op::BnTrain { c, q, g, b },
                    Op::Res { main, short } => Op::Res { main: train(main), short: train(short) },
                    other => other,
                })
                .collect()
        }
        let r = Self::of(model);
        Reference { ops: train(r.ops), ..r }
    }

    /// Whether some op couples the samples.
    fn batched(ops: &[Op]) -> bool {
        ops.iter().any(|op| match op {
            Op::BnTrain { .. } => true,
            Op::Res { main, short } => Self::batched(main) || Self::batched(short),
            _ => false,
        })
    }

    /// `ops` forward on every sample of a batch `xs` (op by op): what the backward needs, and
    /// the outputs. Pushes ReLU inputs onto `pre`.
    fn forward_batch(
        &self,
        ops: &[Op],
        t: &[f64],
        xs: Vec<Vec<f64>>,
        pre: &mut Vec<f64>,
    ) -> (Vec<BRec>, Vec<Vec<f64>>) {
        let mut recs = Vec::new();
        let mut a = xs;
        for op in ops {
            let (rec, out) = match *op {
                Op::BnTrain { c, q, g, b } => {
                    let n = a.len();
                    let m = (n * q) as f64;
                    let mut xh = vec![vec![0f64; c * q]; n];
                    let mut rs = vec![0f64; c];
                    let mut out = vec![vec![0f64; c * q]; n];
                    for ch in 0..c {
                        let vals = || a.iter().flat_map(|x| x[ch * q..(ch + 1) * q].iter());
                        let mean = vals().sum::<f64>() / m;
                        let var = vals().map(|v| (v - mean).powi(2)).sum::<f64>() / m;
                        rs[ch] = 1.0 / (var + 1e-5).sqrt();
                        for s in 0..n {
                            for j in ch * q..(ch + 1) * q {
                                xh[s][j] = (a[s][j] - mean) * rs[ch];
                                out[s][j] = t[g + ch] * xh[s][j] + t[b + ch];
                            }
                        }
                    }
                    (BRec::BnTrain(xh, rs), out)
                }
                Op::Res { ref main, ref short } => {
                    let (rm, mut out) = self.forward_batch(main, t, a.clone(), pre);
                    let (rs, so) = self.forward_batch(short, t, a.clone(), pre);
                    for (o, s) in out.iter_mut().zip(&so) {
                        o.iter_mut().zip(s).for_each(|(o, v)| *o += v);
                    }
                    (BRec::Res(rm, rs), out)
                }
                _ => {
                    let (recs, out): (Vec<Rec>, Vec<Vec<f64>>) = a
                        .iter()
                        .map(|x| {
                            let (mut r, o) =
                                self.forward(std::slice::from_ref(op), t, x.clone(), pre);
                            (r.pop().unwrap(), o)
                        })
                        .unzip();
                    (BRec::PerSample(recs), out)
                }
            };
            a = out;
            recs.push(rec);
        }
        (recs, a)
    }

    /// `ops` backward on a batch from the gradients `gs` at their outputs: adds the parameters'
    /// gradient into `grad`, returns the gradients at their inputs.
    fn backward_batch(
        &self,
        ops: &[Op],
        t: &[f64],
        recs: &[BRec],
        mut gs: Vec<Vec<f64>>,
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        for (op, rec) in ops.iter().zip(recs).rev() {
            gs = match (op, rec) {
                (&Op::BnTrain { c, q, g: gam, b }, BRec::BnTrain(xh, rs)) => {
                    let n = gs.len();
                    let m = (n * q) as f64;
                    let mut gi = vec![vec![0f64; c * q]; n];
                    for ch in 0..c {
                        let span = ch * q..(ch + 1) * q;
                        let (mut sg, mut sgx) = (0f64, 0f64);
                        for (gp, xp) in gs.iter().zip(xh) {
                            for j in span.clone() {
                                sg += gp[j];
                                sgx += gp[j] * xp[j];
                            }
                        }
                        grad[gam + ch] += sgx;
                        grad[b + ch] += sg;
                        let ga = t[gam + ch];
                        for ((gp, xp), gip) in gs.iter().zip(xh).zip(gi.iter_mut()) {
                            for j in span.clone() {
                                gip[j] = rs[ch] * (ga * gp[j] - ga * sg / m - xp[j] * ga * sgx / m);
                            }
                        }
                    }
                    gi
                }
                (Op::Res { main, short }, BRec::Res(rm, rs)) => {
                    let mut gi = self.backward_batch(main, t, rm, gs.clone(), grad);
                    let gsh = self.backward_batch(short, t, rs, gs, grad);
                    for (o, s) in gi.iter_mut().zip(&gsh) {
                        o.iter_mut().zip(s).for_each(|(o, v)| *o += v);
                    }
                    gi
                }
                (op, BRec::PerSample(r)) => gs
                    .into_iter()
                    .zip(r)
                    .map(|(g, rec)| {
                        self.backward(
                            std::slice::from_ref(op),
                            t,
                            std::slice::from_ref(rec),
                            g,
                            grad,
                        )
                    })
                    .collect(),
                _ => unreachable!("records follow the ops"),
            };
        }
        gs
    }

    /// [`Reference::loss_grad`] of a batch whose ops couple the samples: op by op over all of
    /// them.
    fn loss_grad_batch(&self, t: &[f64], x: &[f64], y: &[u8]) -> (f64, Vec<f64>, Vec<f64>) {
        let n = y.len();
        let xs: Vec<Vec<f64>> = x.chunks_exact(self.input).map(<[f64]>::to_vec).collect();
        let mut pre = Vec::new();
        let (recs, zs) = self.forward_batch(&self.ops, t, xs, &mut pre);
        let mut loss = 0f64;
        let gs: Vec<Vec<f64>> = zs
            .iter()
            .zip(y)
            .map(|(z, &label)| {
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
                loss += m + s.ln() - z[label as usize];
                let mut g: Vec<f64> = z.iter().map(|v| (v - m).exp() / s).collect();
                g[label as usize] -= 1.0;
                g
            })
            .collect();
        let mut grad = vec![0f64; self.params];
        self.backward_batch(&self.ops, t, &recs, gs, &mut grad);
        let inv = 1.0 / n as f64;
        grad.iter_mut().for_each(|v| *v *= inv);
        (loss * inv, grad, pre)
    }

    /// The reference of `model` (an MLP, a ConvNet or a ResNet).
    pub fn of(model: &Model) -> Reference {
        let e = &model.layout.entries;
        if e.iter().any(|x| x.name == "fc.weight") && e.iter().any(|x| x.name == "conv.weight") {
            return Self::resnet(model);
        }
        let mut ops = Vec::new();
        let (mut c, mut h, mut wd) = (model.input.channels, model.input.height, model.input.width);
        let mut k = 0;
        while k < e.len() {
            let (w, b) = (&e[k], &e[k + 1]);
            assert_eq!((w.kind, b.kind), (ParamKind::Weight, ParamKind::Bias));
            let last = k + 2 == e.len();
            if w.shape.len() == 4 {
                let cout = w.shape[0];
                assert_eq!((w.shape[1], w.shape[2]), (c, 3));
                ops.push(Op::Conv {
                    cin: c,
                    h,
                    wd,
                    cout,
                    k: 3,
                    s: 1,
                    pad: 1,
                    w: w.offset,
                    b: Some(b.offset),
                });
                k += 2;
                if k < e.len() && e[k].kind == ParamKind::NormScale {
                    ops.push(Op::Norm { c: cout, q: h * wd, g: e[k].offset, b: e[k + 1].offset });
                    k += 2;
                }
                ops.push(Op::Relu);
                ops.push(Op::Pool { c: cout, h, wd });
                (c, h, wd) = (cout, h / 2, wd / 2);
            } else {
                let (o, i) = (w.shape[0], w.shape[1]);
                assert_eq!(i, c * h * wd);
                ops.push(Op::Linear { i, o, w: w.offset, b: b.offset });
                if !last {
                    ops.push(Op::Relu);
                }
                (c, h, wd) = (o, 1, 1);
                k += 2;
            }
        }
        Reference {
            ops,
            input: model.input.len(),
            classes: model.classes,
            params: model.layout.total(),
        }
    }

    /// A ResNet from its layout's names. The stride of a block is not in the layout: both
    /// families stride 2 exactly where a stage doubles the width (the first stage keeps the
    /// stem's width at stride 1).
    fn resnet(model: &Model) -> Reference {
        let e = &model.layout.entries;
        let find = |n: &str| e.iter().find(|x| x.name == n);
        let off = |n: &str| find(n).unwrap_or_else(|| panic!("no {n}")).offset;
        let norm = |name: &str, c: usize, q: usize, out: &mut Vec<Op>| {
            if find(&format!("{name}.weight")).is_none() {
                return;
            }
            let (g, b) = (off(&format!("{name}.weight")), off(&format!("{name}.bias")));
            out.push(match find(&format!("{name}.running_mean")) {
                Some(m) => {
                    Op::Bn { c, q, g, b, mean: m.offset, var: off(&format!("{name}.running_var")) }
                }
                None => Op::Norm { c, q, g, b },
            });
        };
        let (c0, mut h, mut wd) = (model.input.channels, model.input.height, model.input.width);
        let stem = find("conv.weight").unwrap();
        let mut c = stem.shape[0];
        let mut ops =
            vec![Op::Conv { cin: c0, h, wd, cout: c, k: 3, s: 1, pad: 1, w: stem.offset, b: None }];
        norm("bn", c, h * wd, &mut ops);
        ops.push(Op::Relu);
        let mut i = 0;
        while let Some(w1) = find(&format!("blocks.{i}.conv1.weight")) {
            let cout = w1.shape[0];
            assert_eq!(w1.shape[1], c);
            let s = if cout != c { 2 } else { 1 };
            let (ho, wo) = (out_side(h, 3, s, 1), out_side(wd, 3, s, 1));
            let mut main =
                vec![Op::Conv { cin: c, h, wd, cout, k: 3, s, pad: 1, w: w1.offset, b: None }];
            norm(&format!("blocks.{i}.bn1"), cout, ho * wo, &mut main);
            main.push(Op::Relu);
            let w2 = off(&format!("blocks.{i}.conv2.weight"));
            main.push(Op::Conv {
                cin: cout,
                h: ho,
                wd: wo,
                cout,
                k: 3,
                s: 1,
                pad: 1,
                w: w2,
                b: None,
            });
            norm(&format!("blocks.{i}.bn2"), cout, ho * wo, &mut main);
            let mut short = Vec::new();
            if let Some(ws) = find(&format!("blocks.{i}.shortcut.0.weight")) {
                short.push(Op::Conv {
                    cin: c,
                    h,
                    wd,
                    cout,
                    k: 1,
                    s,
                    pad: 0,
                    w: ws.offset,
                    b: None,
                });
                norm(&format!("blocks.{i}.shortcut.1"), cout, ho * wo, &mut short);
            }
            ops.push(Op::Res { main, short });
            ops.push(Op::Relu);
            (c, h, wd) = (cout, ho, wo);
            i += 1;
        }
        ops.push(Op::Gap { c, q: h * wd });
        ops.push(Op::Linear { i: c, o: model.classes, w: off("fc.weight"), b: off("fc.bias") });
        Reference {
            ops,
            input: model.input.len(),
            classes: model.classes,
            params: model.layout.total(),
        }
    }

    /// `ops` forward from `x`: what their backward needs, and the output. Pushes ReLU inputs
    /// onto `pre`.
    fn forward(
        &self,
        ops: &[Op],
        t: &[f64],
        x: Vec<f64>,
        pre: &mut Vec<f64>,
    ) -> (Vec<Rec>, Vec<f64>) {
        let mut recs = Vec::new();
        let mut a = x;
        for op in ops {
            let mut rec = Rec { input: Vec::new(), norm: None, branches: None };
            let out = match *op {
                Op::Linear { i, o, w, b } => (0..o)
                    .map(|r| t[b + r] + (0..i).map(|j| t[w + r * i + j] * a[j]).sum::<f64>())
                    .collect(),
                Op::Conv { cin, h, wd, cout, k, s, pad, w, b } => {
                    let (ho, wo) = (out_side(h, k, s, pad), out_side(wd, k, s, pad));
                    let mut out = vec![0f64; cout * ho * wo];
                    for co in 0..cout {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let mut acc = b.map_or(0.0, |b| t[b + co]);
                                for ci in 0..cin {
                                    for ky in 0..k {
                                        for kx in 0..k {
                                            let (iy, ix) = (oy * s + ky, ox * s + kx);
                                            if iy < pad
                                                || ix < pad
                                                || iy >= h + pad
                                                || ix >= wd + pad
                                            {
                                                continue;
                                            }
                                            acc += t[w + ((co * cin + ci) * k + ky) * k + kx]
                                                * a[(ci * h + iy - pad) * wd + ix - pad];
                                        }
                                    }
                                }
                                out[(co * ho + oy) * wo + ox] = acc;
                            }
                        }
                    }
                    out
                }
                Op::Norm { c, q, g, b } => {
                    let mut out = vec![0f64; c * q];
                    let mut xh = vec![0f64; c * q];
                    let mut rs = vec![0f64; c];
                    for ch in 0..c {
                        let p = &a[ch * q..(ch + 1) * q];
                        let mean = p.iter().sum::<f64>() / q as f64;
                        let var = p.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / q as f64;
                        rs[ch] = 1.0 / (var + 1e-5).sqrt();
                        for j in 0..q {
                            xh[ch * q + j] = (p[j] - mean) * rs[ch];
                            out[ch * q + j] = t[g + ch] * xh[ch * q + j] + t[b + ch];
                        }
                    }
                    rec.norm = Some((xh, rs));
                    out
                }
                Op::Bn { c, q, g, b, mean, var } => {
                    let mut out = vec![0f64; c * q];
                    for ch in 0..c {
                        let rs = 1.0 / (t[var + ch] + 1e-5).sqrt();
                        for j in 0..q {
                            out[ch * q + j] =
                                t[g + ch] * (a[ch * q + j] - t[mean + ch]) * rs + t[b + ch];
                        }
                    }
                    out
                }
                Op::Relu => {
                    pre.extend_from_slice(&a);
                    a.iter().map(|&v| v.max(0.0)).collect()
                }
                Op::Pool { c, h, wd } => {
                    let (ho, wo) = (h / 2, wd / 2);
                    let mut out = vec![0f64; c * ho * wo];
                    for ch in 0..c {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let at = |dy: usize, dx: usize| {
                                    a[(ch * h + 2 * oy + dy) * wd + 2 * ox + dx]
                                };
                                out[(ch * ho + oy) * wo + ox] =
                                    (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 4.0;
                            }
                        }
                    }
                    out
                }
                Op::Gap { c, q } => (0..c)
                    .map(|ch| a[ch * q..(ch + 1) * q].iter().sum::<f64>() / q as f64)
                    .collect(),
                Op::BnTrain { .. } => unreachable!("training-mode batch norm runs on the batch"),
                Op::Res { ref main, ref short } => {
                    let (rm, mut out) = self.forward(main, t, a.clone(), pre);
                    let (rs, so) = self.forward(short, t, a.clone(), pre);
                    out.iter_mut().zip(&so).for_each(|(o, v)| *o += v);
                    rec.branches = Some((rm, rs));
                    out
                }
            };
            rec.input = std::mem::replace(&mut a, out);
            recs.push(rec);
        }
        (recs, a)
    }

    /// `ops` backward from the gradient `g` at their output: adds the parameters' gradient into
    /// `grad`, returns the gradient at their input.
    fn backward(
        &self,
        ops: &[Op],
        t: &[f64],
        recs: &[Rec],
        mut g: Vec<f64>,
        grad: &mut [f64],
    ) -> Vec<f64> {
        for (op, rec) in ops.iter().zip(recs).rev() {
            let a = &rec.input;
            g = match *op {
                Op::Linear { i, o, w, b } => {
                    let mut gi = vec![0f64; i];
                    for r in 0..o {
                        grad[b + r] += g[r];
                        for j in 0..i {
                            grad[w + r * i + j] += g[r] * a[j];
                            gi[j] += g[r] * t[w + r * i + j];
                        }
                    }
                    gi
                }
                Op::Conv { cin, h, wd, cout, k, s, pad, w, b } => {
                    let (ho, wo) = (out_side(h, k, s, pad), out_side(wd, k, s, pad));
                    let mut gi = vec![0f64; cin * h * wd];
                    for co in 0..cout {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let go = g[(co * ho + oy) * wo + ox];
                                if let Some(b) = b {
                                    grad[b + co] += go;
                                }
                                for ci in 0..cin {
                                    for ky in 0..k {
                                        for kx in 0..k {
                                            let (iy, ix) = (oy * s + ky, ox * s + kx);
                                            if iy < pad
                                                || ix < pad
                                                || iy >= h + pad
                                                || ix >= wd + pad
                                            {
                                                continue;
                                            }
                                            let wi = w + ((co * cin + ci) * k + ky) * k + kx;
                                            let xi = (ci * h + iy - pad) * wd + ix - pad;
                                            grad[wi] += go * a[xi];
                                            gi[xi] += go * t[wi];
                                        }
                                    }
                                }
                            }
                        }
                    }
                    gi
                }
                Op::Norm { c, q, g: gam, b } => {
                    let (xh, rs) = rec.norm.as_ref().unwrap();
                    let mut gi = vec![0f64; c * q];
                    for ch in 0..c {
                        let gp = &g[ch * q..(ch + 1) * q];
                        let xp = &xh[ch * q..(ch + 1) * q];
                        let sg: f64 = gp.iter().sum();
                        let sgx: f64 = gp.iter().zip(xp).map(|(u, v)| u * v).sum();
                        grad[gam + ch] += sgx;
                        grad[b + ch] += sg;
                        let ga = t[gam + ch];
                        for j in 0..q {
                            gi[ch * q + j] = rs[ch]
                                * (ga * gp[j] - ga * sg / q as f64 - xp[j] * ga * sgx / q as f64);
                        }
                    }
                    gi
                }
                Op::Bn { c, q, g: gam, b, mean, var } => {
                    let mut gi = vec![0f64; c * q];
                    for ch in 0..c {
                        let rs = 1.0 / (t[var + ch] + 1e-5).sqrt();
                        for j in 0..q {
                            let u = g[ch * q + j];
                            grad[gam + ch] += u * (a[ch * q + j] - t[mean + ch]) * rs;
                            grad[b + ch] += u;
                            gi[ch * q + j] = u * t[gam + ch] * rs;
                        }
                    }
                    gi
                }
                Op::Relu => {
                    a.iter().zip(&g).map(|(&v, &u)| if v > 0.0 { u } else { 0.0 }).collect()
                }
                Op::Pool { c, h, wd } => {
                    let (ho, wo) = (h / 2, wd / 2);
                    let mut gi = vec![0f64; c * h * wd];
                    for ch in 0..c {
                        for oy in 0..ho {
                            for ox in 0..wo {
                                let go = g[(ch * ho + oy) * wo + ox] / 4.0;
                                for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                                    gi[(ch * h + 2 * oy + dy) * wd + 2 * ox + dx] = go;
                                }
                            }
                        }
                    }
                    gi
                }
                Op::Gap { c, q } => (0..c * q).map(|j| g[j / q] / q as f64).collect(),
                Op::BnTrain { .. } => unreachable!("training-mode batch norm runs on the batch"),
                Op::Res { ref main, ref short } => {
                    let (rm, rs) = rec.branches.as_ref().unwrap();
                    let mut gi = self.backward(main, t, rm, g.clone(), grad);
                    let gs = self.backward(short, t, rs, g, grad);
                    gi.iter_mut().zip(&gs).for_each(|(o, v)| *o += v);
                    gi
                }
            };
        }
        g
    }

    /// One sample: adds its loss's gradient into `grad`, pushes its ReLU inputs onto `pre`,
    /// returns its loss.
    fn sample(&self, t: &[f64], x: &[f64], y: usize, grad: &mut [f64], pre: &mut Vec<f64>) -> f64 {
        let (recs, z) = self.forward(&self.ops, t, x.to_vec(), pre);
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let loss = m + s.ln() - z[y];
        let mut g: Vec<f64> = z.iter().map(|v| (v - m).exp() / s).collect();
        g[y] -= 1.0;
        self.backward(&self.ops, t, &recs, g, grad);
        loss
    }

    /// Mean loss, its gradient and every ReLU input over the samples `x` (rows) with `y`.
    pub fn loss_grad(&self, t: &[f64], x: &[f64], y: &[u8]) -> (f64, Vec<f64>, Vec<f64>) {
        if Self::batched(&self.ops) {
            return self.loss_grad_batch(t, x, y);
        }
        let n = y.len();
        let parts: Vec<(f64, Vec<f64>, Vec<f64>)> = (0..n)
            .into_par_iter()
            .chunks(16)
            .map(|idx| {
                let mut g = vec![0f64; self.params];
                let mut pre = Vec::new();
                let mut l = 0f64;
                for s in idx {
                    let xs = &x[s * self.input..(s + 1) * self.input];
                    l += self.sample(t, xs, y[s] as usize, &mut g, &mut pre);
                }
                (l, g, pre)
            })
            .collect();
        let mut g = vec![0f64; self.params];
        let (mut loss, mut pre) = (0f64, Vec::new());
        for (l, gp, p) in parts {
            loss += l;
            g.iter_mut().zip(&gp).for_each(|(a, b)| *a += b);
            pre.extend(p);
        }
        let inv = 1.0 / n as f64;
        g.iter_mut().for_each(|v| *v *= inv);
        (loss * inv, g, pre)
    }
}

/// Central differences of the gradient along each of `dirs` (the columns H d), with the
/// smallest step used: as [`cd_hessian`], each starts at 1e-5 (relative to |d|) and shrinks
/// tenfold until no ReLU input changes sign at either end.
pub fn cd_columns(
    r: &Reference,
    t: &[f64],
    x: &[f64],
    y: &[u8],
    dirs: &[Vec<f64>],
) -> (Vec<Vec<f64>>, f64) {
    let (_, _, pre0) = r.loss_grad(t, x, y);
    let sign = |v: &[f64]| -> Vec<bool> { v.iter().map(|&z| z > 0.0).collect() };
    let s0 = sign(&pre0);
    let mut hmin = f64::INFINITY;
    let cols = dirs
        .iter()
        .map(|d| {
            let n = d.iter().map(|v| v * v).sum::<f64>().sqrt();
            let mut h = 1e-5 / n;
            loop {
                let tp: Vec<f64> = t.iter().zip(d).map(|(a, b)| a + h * b).collect();
                let tm: Vec<f64> = t.iter().zip(d).map(|(a, b)| a - h * b).collect();
                let (_, gp, pp) = r.loss_grad(&tp, x, y);
                let (_, gm, pm) = r.loss_grad(&tm, x, y);
                if sign(&pp) == s0 && sign(&pm) == s0 {
                    hmin = hmin.min(h * n);
                    return gp.iter().zip(&gm).map(|(a, b)| (a - b) / (2.0 * h)).collect();
                }
                h /= 10.0;
                assert!(h * n >= 1e-10, "every step flips a ReLU");
            }
        })
        .collect();
    (cols, hmin)
}

/// The Hessian (row-major P x P, column i from the central difference along e_i) of the mean
/// loss at `t`, and the smallest step used: each coordinate starts at a step of 1e-5 and shrinks
/// tenfold until no ReLU input changes sign at either end (panics below 1e-10), so every
/// difference is taken where the loss is smooth.
pub fn cd_hessian(r: &Reference, t: &[f64], x: &[f64], y: &[u8]) -> (Vec<f64>, f64) {
    let p = r.params;
    let (_, _, pre0) = r.loss_grad(t, x, y);
    let sign = |v: &[f64]| -> Vec<bool> { v.iter().map(|&z| z > 0.0).collect() };
    let s0 = sign(&pre0);
    let cols: Vec<(Vec<f64>, f64)> = (0..p)
        .map(|i| {
            let mut h = 1e-5;
            loop {
                let mut tp = t.to_vec();
                let mut tm = t.to_vec();
                tp[i] += h;
                tm[i] -= h;
                let (_, gp, pp) = r.loss_grad(&tp, x, y);
                let (_, gm, pm) = r.loss_grad(&tm, x, y);
                if sign(&pp) == s0 && sign(&pm) == s0 {
                    let col = gp.iter().zip(&gm).map(|(a, b)| (a - b) / (2.0 * h)).collect();
                    return (col, h);
                }
                h /= 10.0;
                assert!(h >= 1e-10, "coordinate {i}: every step flips a ReLU");
            }
        })
        .collect();
    let mut hm = vec![0f64; p * p];
    let mut hmin = f64::INFINITY;
    for (i, (c, h)) in cols.into_iter().enumerate() {
        hmin = hmin.min(h);
        for j in 0..p {
            hm[j * p + i] = c[j];
        }
    }
    (hm, hmin)
}
