//! An independent float64 reference of our models' loss and gradient, written with plain loops
//! from the layout's names and shapes (no code shared with the library's ops): the mean
//! cross-entropy of an MLP (`fc_layers.i`, `fc`) or a DC/DM ConvNet (`features.i` conv3x3 with
//! padding 1 -> optional instance norm -> ReLU -> avg-pool 2x2, then `classifier`). It also
//! returns every ReLU input, so a finite-difference step can be checked not to cross a kink.
//! From it, [`cd_hessian`] assembles the Hessian by central differences of gradients.

use lmc_train::model::Model;
use lmc_train::params::ParamKind;
use rayon::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Linear { i: usize, o: usize, w: usize, b: usize },
    Conv { cin: usize, h: usize, wd: usize, cout: usize, w: usize, b: usize },
    Norm { c: usize, q: usize, g: usize, b: usize },
    Relu,
    Pool { c: usize, h: usize, wd: usize },
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

impl Reference {
    /// The reference of `model` (an MLP or a ConvNet).
    pub fn of(model: &Model) -> Reference {
        let e = &model.layout.entries;
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
                ops.push(Op::Conv { cin: c, h, wd, cout, w: w.offset, b: b.offset });
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

    /// One sample: adds its loss's gradient into `grad`, pushes its ReLU inputs onto `pre`,
    /// returns its loss.
    fn sample(&self, t: &[f64], x: &[f64], y: usize, grad: &mut [f64], pre: &mut Vec<f64>) -> f64 {
        let mut acts = vec![x.to_vec()];
        let mut xhats: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
        for op in &self.ops {
            let a = acts.last().unwrap();
            let out = match *op {
                Op::Linear { i, o, w, b } => (0..o)
                    .map(|r| t[b + r] + (0..i).map(|j| t[w + r * i + j] * a[j]).sum::<f64>())
                    .collect(),
                Op::Conv { cin, h, wd, cout, w, b } => {
                    let mut out = vec![0f64; cout * h * wd];
                    for co in 0..cout {
                        for oy in 0..h {
                            for ox in 0..wd {
                                let mut s = t[b + co];
                                for ci in 0..cin {
                                    for ky in 0..3 {
                                        for kx in 0..3 {
                                            let (iy, ix) = (oy + ky, ox + kx);
                                            if iy < 1 || ix < 1 || iy > h || ix > wd {
                                                continue;
                                            }
                                            s += t[w + ((co * cin + ci) * 3 + ky) * 3 + kx]
                                                * a[(ci * h + iy - 1) * wd + ix - 1];
                                        }
                                    }
                                }
                                out[(co * h + oy) * wd + ox] = s;
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
                    xhats.push((xh, rs));
                    out
                }
                Op::Relu => {
                    pre.extend_from_slice(a);
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
            };
            acts.push(out);
        }
        let z = acts.last().unwrap();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        let loss = m + s.ln() - z[y];
        let mut g: Vec<f64> = z.iter().map(|v| (v - m).exp() / s).collect();
        g[y] -= 1.0;
        for (l, op) in self.ops.iter().enumerate().rev() {
            let a = &acts[l];
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
                Op::Conv { cin, h, wd, cout, w, b } => {
                    let mut gi = vec![0f64; cin * h * wd];
                    for co in 0..cout {
                        for oy in 0..h {
                            for ox in 0..wd {
                                let go = g[(co * h + oy) * wd + ox];
                                grad[b + co] += go;
                                for ci in 0..cin {
                                    for ky in 0..3 {
                                        for kx in 0..3 {
                                            let (iy, ix) = (oy + ky, ox + kx);
                                            if iy < 1 || ix < 1 || iy > h || ix > wd {
                                                continue;
                                            }
                                            let wi = w + ((co * cin + ci) * 3 + ky) * 3 + kx;
                                            let xi = (ci * h + iy - 1) * wd + ix - 1;
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
                    let (xh, rs) = xhats.pop().unwrap();
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
            };
        }
        loss
    }

    /// Mean loss, its gradient and every ReLU input over the samples `x` (rows) with `y`.
    pub fn loss_grad(&self, t: &[f64], x: &[f64], y: &[u8]) -> (f64, Vec<f64>, Vec<f64>) {
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
