//! Batch norm in training mode for the exact product: per channel, instance norm's tangent
//! rules over that channel's values of every sample, computed in place in the (samples,
//! channels, plane) layout and in parallel.
//!
//! It was instance norm applied to the batch regrouped per channel (two block transposes of
//! input, tangent, output and output tangent each way, ~10% of a training-mode product on
//! ResNet-20, on one thread). Every reduction here walks a channel's values in the order the
//! regrouped plane held them, in the same eight f64 lanes ([`Lanes`]), so the results are those
//! bits; a test holds the two to bit equality.

use rayon::prelude::*;

/// What the forward keeps for the backward: the normalised input and its tangent in the
/// batch's layout, and per channel `rstd = 1/sqrt(var + eps)` and `t = rstd mean(xhat R{x})`.
pub(super) struct Saved {
    pub(super) xh: Vec<f32>,
    pub(super) rxh: Vec<f32>,
    rstd: Vec<f32>,
    t: Vec<f32>,
}

/// Eight f64 partial sums over a stream of slices: element i of the stream goes to lane i mod 8,
/// so the total is bit-identical to `sum64` / `dot64` of the concatenated stream (their lanes).
#[derive(Clone, Copy, Default)]
struct Lanes {
    acc: [f64; 8],
    pos: usize,
}

impl Lanes {
    /// Adds `f(a_i, b_i)` for the next `a.len()` elements of the stream.
    #[inline(always)]
    fn add(&mut self, a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) {
        let n = a.len();
        let b = &b[..n];
        let mut i = 0;
        while i < n && !self.pos.is_multiple_of(8) {
            self.acc[self.pos % 8] += f(a[i], b[i]);
            (i, self.pos) = (i + 1, self.pos + 1);
        }
        let body = (n - i) / 8 * 8;
        for (ca, cb) in a[i..i + body].chunks_exact(8).zip(b[i..i + body].chunks_exact(8)) {
            for j in 0..8 {
                self.acc[j] += f(ca[j], cb[j]);
            }
        }
        (i, self.pos) = (i + body, self.pos + body);
        while i < n {
            self.acc[self.pos % 8] += f(a[i], b[i]);
            (i, self.pos) = (i + 1, self.pos + 1);
        }
    }
    fn total(&self) -> f64 {
        self.acc.iter().sum()
    }
}

/// Channel `ch`'s plane of `q` values in each of the `m` samples of `x` (m, c, q).
fn planes(x: &[f32], c: usize, q: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    x.chunks_exact(c * q).map(move |s| &s[ch * q..(ch + 1) * q])
}

/// Forward of `m` samples of `c` channels of `q` values: `(y, R{y}, saved)` with the batch's
/// statistics, `gamma`/`beta` and their tangents `vg`/`vb` per channel; `ra` is the input's
/// tangent (zero if `None`).
pub(super) fn forward(
    (m, c, q): (usize, usize, usize),
    eps: f32,
    (ga, be): (&[f32], &[f32]),
    (vg, vb): (&[f32], &[f32]),
    a: &[f32],
    ra: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Saved) {
    let n = (m * q) as f64;
    // Per channel: mean, rstd, and with a tangent mean(R{x}) and mean(xhat R{x}).
    let stats: Vec<(f32, f64, f32, f32, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut s = Lanes::default();
            planes(a, c, q, ch).for_each(|p| s.add(p, p, |x, _| x as f64));
            let mean = s.total() / n;
            let mut v = Lanes::default();
            planes(a, c, q, ch).for_each(|p| {
                v.add(p, p, |x, _| {
                    let d = x as f64 - mean;
                    d * d
                })
            });
            let r = 1.0 / (v.total() / n + eps as f64).sqrt();
            let (mean32, r32) = (mean as f32, r as f32);
            let (mut mrx, mut d) = (0.0, 0.0);
            if let Some(ra) = ra {
                let (mut sr, mut dr) = (Lanes::default(), Lanes::default());
                for (p, rp) in planes(a, c, q, ch).zip(planes(ra, c, q, ch)) {
                    sr.add(rp, rp, |x, _| x as f64);
                    dr.add(p, rp, |x, rx| ((x - mean32) * r32) as f64 * rx as f64);
                }
                (mrx, d) = (sr.total() / n, dr.total() / n);
            }
            (mean32, r, r32, mrx as f32, d)
        })
        .collect();
    let len = m * c * q;
    let (mut y, mut ry, mut xh, mut rxh) =
        (vec![0f32; len], vec![0f32; len], vec![0f32; len], vec![0f32; len]);
    let sample = c * q;
    y.par_chunks_mut(sample)
        .zip(ry.par_chunks_mut(sample))
        .zip(xh.par_chunks_mut(sample).zip(rxh.par_chunks_mut(sample)))
        .enumerate()
        .for_each(|(s, ((y, ry), (xh, rxh)))| {
            let x = &a[s * sample..(s + 1) * sample];
            let rx = ra.map(|r| &r[s * sample..(s + 1) * sample]);
            for (ch, &(mean32, _, r32, mrx32, d)) in stats.iter().enumerate() {
                let d32 = d as f32;
                let span = ch * q..(ch + 1) * q;
                let (gc, bc, vgc, vbc) = (ga[ch], be[ch], vg[ch], vb[ch]);
                for j in span.clone() {
                    xh[j] = (x[j] - mean32) * r32;
                }
                if let Some(rx) = rx {
                    for j in span.clone() {
                        rxh[j] = r32 * (rx[j] - mrx32 - xh[j] * d32);
                    }
                }
                for j in span {
                    y[j] = gc * xh[j] + bc;
                    ry[j] = gc * rxh[j] + vgc * xh[j] + vbc;
                }
            }
        });
    let rstd = stats.iter().map(|s| s.2).collect();
    let t = stats.iter().map(|s| (s.1 * s.4) as f32).collect();
    (y, ry, Saved { xh, rxh, rstd, t })
}

/// Backward of [`forward`]: adds `R{dgamma}`, `R{dbeta}` per channel to `dgamma`/`dbeta` and,
/// with `need_input`, returns the input's gradient and its tangent (else two empty vectors).
pub(super) fn backward(
    (m, c, q): (usize, usize, usize),
    (ga, vg): (&[f32], &[f32]),
    saved: &Saved,
    g: &[f32],
    rg: &[f32],
    (dgamma, dbeta): (&mut [f32], &mut [f32]),
    need_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    let Saved { xh, rxh, rstd, t } = saved;
    let qf = (m * q) as f64;
    // Per channel: sum g, sum g xhat, sum R{g}, sum R{g} xhat, sum g R{xhat}.
    let sums: Vec<[f64; 5]> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut l = [Lanes::default(); 5];
            let it = planes(g, c, q, ch).zip(planes(rg, c, q, ch));
            for ((gp, rgp), (xp, rxp)) in it.zip(planes(xh, c, q, ch).zip(planes(rxh, c, q, ch))) {
                l[0].add(gp, gp, |g, _| g as f64);
                l[1].add(gp, xp, |g, x| g as f64 * x as f64);
                l[2].add(rgp, rgp, |r, _| r as f64);
                l[3].add(rgp, xp, |r, x| r as f64 * x as f64);
                l[4].add(gp, rxp, |g, rx| g as f64 * rx as f64);
            }
            l.map(|l| l.total())
        })
        .collect();
    for (ch, [_, _, srg, srgx, sgrx]) in sums.iter().enumerate() {
        dgamma[ch] += (srgx + sgrx) as f32;
        dbeta[ch] += *srg as f32;
    }
    if !need_input {
        return (Vec::new(), Vec::new());
    }
    // With gx = gamma g: dx = r (gx - mean(gx) - xhat mean(gx xhat)); its tangent
    // R{dx} = -t dx + r (R{gx} - mean(R{gx}) - R{xhat} A - xhat B), where
    // R{gx} = V_gamma g + gamma R{g}, A = mean(gx xhat), B = mean(R{gx} xhat + gx R{xhat}).
    let coef: Vec<[f32; 8]> = sums
        .iter()
        .enumerate()
        .map(|(ch, &[sg, sgx, srg, srgx, sgrx])| {
            let (gam, vgam) = (ga[ch] as f64, vg[ch] as f64);
            let mgx = gam * sg / qf;
            let am = gam * sgx / qf;
            let mrgx = (vgam * sg + gam * srg) / qf;
            let bm = (vgam * sgx + gam * srgx + gam * sgrx) / qf;
            let f = |x: f64| x as f32;
            [f(gam), f(vgam), rstd[ch], t[ch], f(mgx), f(am), f(mrgx), f(bm)]
        })
        .collect();
    let len = m * c * q;
    let (mut gi, mut rgi) = (vec![0f32; len], vec![0f32; len]);
    let sample = c * q;
    gi.par_chunks_mut(sample).zip(rgi.par_chunks_mut(sample)).enumerate().for_each(
        |(s, (gin, rgin))| {
            let o = s * sample;
            for (ch, &[gam, vgam, r, t, mgx, am, mrgx, bm]) in coef.iter().enumerate() {
                for j in ch * q..(ch + 1) * q {
                    let (gj, rgj, xj, rxj) = (g[o + j], rg[o + j], xh[o + j], rxh[o + j]);
                    let dx = r * (gam * gj - mgx - xj * am);
                    let rgx = vgam * gj + gam * rgj;
                    gin[j] = dx;
                    rgin[j] = -t * dx + r * (rgx - mrgx - rxj * am - xj * bm);
                }
            }
        },
    );
    (gi, rgi)
}
