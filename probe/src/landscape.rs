//! Loss-landscape grids: points `centre + x * d1 (+ y * d2)` evaluated with the one evaluation
//! function, row by row (a row is one y value), so a killed run resumes at the next row.
//!
//! Two ways to choose the frame:
//! - the authors' plane through trained copies (McDermott & Cummings 2023): centre
//!   M = (m0 + m1) / 2, d1 = V0 = (m0 - m1) / 2, d2 = V1 = (m3 - m2) / 2 with four runs, or
//!   V1 = m2 - M with three (our choice: then m0, m1, m2 sit at (1, 0), (-1, 0), (0, 1));
//! - Li et al. 2018 ("Visualizing the Loss Landscape of Neural Nets", section 4): Gaussian random
//!   directions around one run, filter-normalised (each filter, i.e. each output row of a conv or
//!   linear weight, rescaled to the norm of the same filter of the weights), bias and norm entries
//!   zeroed. Pruned entries are zeroed too, so every point stays inside the subnetwork.

use lmc_train::artifact::{Artifact, Kind};
use lmc_train::data::{ImageSet, Normalization};
use lmc_train::model::Model;
use lmc_train::params::{Layout, Mask, ParamVec};
use lmc_train::seed::{self, Stream};
use lmc_train::{Error, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::interpolate::Split;
use crate::stats::cell;
use crate::{check_data, evaluate_points, DIRECTION_STREAM};

/// How the directions are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The authors' plane through 3 or 4 trained copies.
    Plane,
    /// Li et al. filter-normalised Gaussian directions around one run.
    Random,
}

/// One axis of the grid: `points` evenly spaced values from `min` to `max` inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Axis {
    /// First value.
    pub min: f64,
    /// Last value.
    pub max: f64,
    /// Number of values (at least 2).
    pub points: usize,
}

/// The most points one grid axis may have (Li et al. use 51): a 2-D grid at this limit is a
/// million evaluations, and the grid is allocated before it runs.
pub const MAX_AXIS_POINTS: usize = 1001;

impl Axis {
    /// Errors unless `min < max` (both finite) and `points >= 2`; `flag` names the option.
    pub fn validate(&self, flag: &str) -> Result<()> {
        if !(self.min.is_finite() && self.max.is_finite() && self.min < self.max) {
            return Err(Error::setting(format!(
                "{flag} {}:{}: needs finite MIN < MAX",
                self.min, self.max
            )));
        }
        if self.points < 2 {
            return Err(Error::setting(format!(
                "--resolution {}: a grid axis needs at least 2 points",
                self.points
            )));
        }
        if self.points > MAX_AXIS_POINTS {
            return Err(Error::setting(format!(
                "--resolution {}: at most {MAX_AXIS_POINTS} points per axis (each point is a full evaluation of the set; a 2-D grid squares the count)",
                self.points
            )));
        }
        Ok(())
    }
    /// The values, with the ends exact.
    pub fn values(&self) -> Vec<f64> {
        let n = self.points;
        (0..n)
            .map(|i| {
                if i + 1 == n {
                    self.max
                } else {
                    self.min + (self.max - self.min) * i as f64 / (n - 1) as f64
                }
            })
            .collect()
    }
}

/// Settings of a landscape probe. Part of its identity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LandscapeConfig {
    /// Plane through runs, or random directions.
    pub method: Method,
    /// The x axis (along d1).
    pub x: Axis,
    /// The y axis (along d2); `None` for a 1-D line.
    pub y: Option<Axis>,
    /// Which split is evaluated.
    pub split: Split,
    /// Images evaluated per point (a fixed subsample; `None` = the whole split).
    pub samples: Option<usize>,
    /// Seed of that subsample.
    pub sample_seed: u64,
    /// Seed of the random directions (unused for the plane).
    pub direction_seed: u64,
}

/// The centre and directions of a grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    /// The point at (0, 0).
    pub centre: ParamVec,
    /// Direction of x.
    pub d1: ParamVec,
    /// Direction of y (absent for 1-D grids).
    pub d2: Option<ParamVec>,
}

fn combine(terms: &[(f64, &ParamVec)]) -> ParamVec {
    let layout = terms[0].1.layout.clone();
    let mut data = vec![0.0f64; layout.total()];
    for (c, v) in terms {
        for (d, x) in data.iter_mut().zip(&v.data) {
            *d += c * *x as f64;
        }
    }
    ParamVec { layout, data: data.into_iter().map(|v| v as f32).collect() }
}

/// The authors' plane through `runs` (3 or 4 parameter vectors of one layout), computed in f64:
/// M = (m0 + m1)/2, V0 = (m0 - m1)/2, V1 = (m3 - m2)/2 (4 runs) or m2 - M (3 runs). With `two_d`
/// false only V0 is kept (the line through m0 and m1); then 2 runs suffice.
pub fn plane_frame(runs: &[&ParamVec], two_d: bool) -> Result<Frame> {
    let need = if two_d { "3 or 4" } else { "2, 3 or 4" };
    if runs.len() > 4 || runs.len() < if two_d { 3 } else { 2 } {
        return Err(Error::setting(format!(
            "the plane through trained copies needs {need} runs, got {}",
            runs.len()
        )));
    }
    for (i, r) in runs.iter().enumerate().skip(1) {
        r.check_same_layout(&runs[0].layout, &format!("plane: run {}", i + 1))?;
    }
    let (m0, m1) = (runs[0], runs[1]);
    let centre = combine(&[(0.5, m0), (0.5, m1)]);
    let d1 = combine(&[(0.5, m0), (-0.5, m1)]);
    let d2 = match (two_d, runs.len()) {
        (false, _) => None,
        (true, 3) => Some(combine(&[(1.0, runs[2]), (-0.5, m0), (-0.5, m1)])),
        (true, _) => Some(combine(&[(0.5, runs[3]), (-0.5, runs[2])])),
    };
    for (name, d) in [("V0 = (m0 - m1)/2", Some(&d1)), ("V1", d2.as_ref())] {
        if let Some(d) = d {
            if d.data.iter().all(|&v| v == 0.0) {
                return Err(Error::incompatible(format!(
                    "plane direction {name} is zero: the runs coincide, so they span no plane"
                )));
            }
        }
    }
    Ok(Frame { centre, d1, d2 })
}

/// A standard normal draw (Box-Muller; one of the pair is used, which keeps the stream simple).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A Gaussian direction over `layout` with Li et al.'s filter normalisation against `params`:
/// weight entries N(0, 1), then each filter (each index of a weight's first dimension: a conv
/// output channel or a linear output unit) scaled to the norm of the same filter of `params`;
/// biases and norm parameters zero; pruned entries (`mask`) zero before normalising.
pub fn filter_normalized_direction(
    params: &ParamVec,
    mask: &Mask,
    rng: &mut ChaCha8Rng,
) -> ParamVec {
    let mut d = ParamVec::zeros(params.layout.clone());
    for e in &params.layout.entries {
        if !e.prunable() {
            continue; // Li et al.'s ignore='biasbn': bias and norm entries stay zero.
        }
        for i in e.range() {
            d.data[i] = if mask.keep[i] { normal(rng) as f32 } else { 0.0 };
        }
    }
    filter_normalize(&mut d, params);
    d
}

/// Rescales each filter of `dir` to the norm of the same filter of `params` (Li et al. 2018,
/// eq. in section 4: d_ij <- d_ij / ||d_ij|| * ||theta_ij||) and zeroes bias and norm entries.
pub fn filter_normalize(dir: &mut ParamVec, params: &ParamVec) {
    let layout: &Layout = &params.layout;
    for e in &layout.entries {
        let r = e.range();
        if !e.prunable() {
            dir.data[r].iter_mut().for_each(|v| *v = 0.0);
            continue;
        }
        let filters = e.shape[0].max(1);
        let per = e.len() / filters;
        for f in 0..filters {
            let s = r.start + f * per..r.start + (f + 1) * per;
            let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let (dn, wn) = (norm(&dir.data[s.clone()]), norm(&params.data[s.clone()]));
            // Li et al.'s code divides by ||d|| + 1e-10, so an all-zero filter stays zero.
            let scale = wn / (dn + 1e-10);
            dir.data[s].iter_mut().for_each(|v| *v = (*v as f64 * scale) as f32);
        }
    }
}

/// Li et al.'s frame around `params`: one (1-D) or two (2-D) independent filter-normalised
/// Gaussian directions drawn from `seed`.
pub fn random_frame(params: &ParamVec, mask: &Mask, two_d: bool, seed: u64) -> Frame {
    let mut r1 = seed::rng(seed, Stream::Other, DIRECTION_STREAM + 1);
    let d1 = filter_normalized_direction(params, mask, &mut r1);
    let d2 = two_d.then(|| {
        let mut r2 = seed::rng(seed, Stream::Other, DIRECTION_STREAM + 2);
        filter_normalized_direction(params, mask, &mut r2)
    });
    Frame { centre: params.clone(), d1, d2 }
}

/// Where an input run lies in the grid's coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Anchor {
    /// Index of the run among the probe's inputs.
    pub run: usize,
    /// Least-squares x coordinate.
    pub x: f64,
    /// Least-squares y coordinate (0 for 1-D grids).
    pub y: f64,
    /// Distance from the run to its projection on the plane (or line).
    pub off_plane: f64,
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The coordinates of each of `runs` in `frame` (least squares, in f64).
pub fn anchors(frame: &Frame, runs: &[&ParamVec]) -> Vec<Anchor> {
    let c = &frame.centre.data;
    let d1 = &frame.d1.data;
    runs.iter()
        .enumerate()
        .map(|(run, m)| {
            let r: Vec<f32> = m.data.iter().zip(c).map(|(a, b)| a - b).collect();
            let (a11, b1) = (dot(d1, d1), dot(d1, &r));
            let (x, y) = match &frame.d2 {
                None => (b1 / a11, 0.0),
                Some(d2) => {
                    let d2 = &d2.data;
                    let (a12, a22, b2) = (dot(d1, d2), dot(d2, d2), dot(d2, &r));
                    let det = a11 * a22 - a12 * a12;
                    ((b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det)
                }
            };
            let mut off = 0.0f64;
            for i in 0..r.len() {
                let mut v = r[i] as f64 - x * d1[i] as f64;
                if let Some(d2) = &frame.d2 {
                    v -= y * d2.data[i] as f64;
                }
                off += v * v;
            }
            Anchor { run, x, y, off_plane: off.sqrt() }
        })
        .collect()
}

/// One evaluated grid point.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    /// Column index (x).
    pub ix: usize,
    /// Row index (y; 0 for 1-D).
    pub iy: usize,
    /// x coordinate.
    pub x: f64,
    /// y coordinate (0 for 1-D).
    pub y: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Accuracy in [0, 1].
    pub accuracy: f64,
}

/// A (possibly unfinished) landscape: the checkpoint and the result share this type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Landscape {
    /// The settings.
    pub config: LandscapeConfig,
    /// Images evaluated per point.
    pub count: usize,
    /// Rows in the grid (1 for a 1-D line).
    pub rows_total: usize,
    /// Rows evaluated so far.
    pub rows_done: usize,
    /// Points of the finished rows, row-major.
    pub points: Vec<GridPoint>,
    /// Where the input runs lie in grid coordinates.
    pub anchors: Vec<Anchor>,
    /// Euclidean norms of d1 and d2 (the length of one grid unit).
    pub direction_norms: Vec<f64>,
    /// Norm of the centre.
    pub centre_norm: f64,
}

impl Landscape {
    /// An empty landscape for `cfg` over `frame` (no rows done yet).
    pub fn start(
        cfg: &LandscapeConfig,
        frame: &Frame,
        runs: &[&ParamVec],
        count: usize,
    ) -> Landscape {
        let norm = |p: &ParamVec| dot(&p.data, &p.data).sqrt();
        let mut direction_norms = vec![norm(&frame.d1)];
        if let Some(d2) = &frame.d2 {
            direction_norms.push(norm(d2));
        }
        Landscape {
            config: cfg.clone(),
            count,
            rows_total: cfg.y.map_or(1, |y| y.points),
            rows_done: 0,
            points: Vec::new(),
            anchors: anchors(frame, runs),
            direction_norms,
            centre_norm: norm(&frame.centre),
        }
    }
    /// Errors unless the counters and points agree with the settings: as many rows as the
    /// y axis has points, at most that many done, and `x points` points per row done.
    pub fn check(&self) -> std::result::Result<(), String> {
        let rows = self.config.y.map_or(1, |y| y.points);
        let per_row = self.config.x.points;
        if rows > MAX_AXIS_POINTS || per_row > MAX_AXIS_POINTS {
            return Err(format!(
                "a grid of {per_row} x {rows} points: at most {MAX_AXIS_POINTS} per axis"
            ));
        }
        if self.rows_total != rows || self.rows_done > rows {
            return Err(format!(
                "{} of {} rows done, but the grid has {rows} rows",
                self.rows_done, self.rows_total
            ));
        }
        if self.rows_done.checked_mul(per_row) != Some(self.points.len()) {
            return Err(format!(
                "{} points for {} rows of {per_row}",
                self.points.len(),
                self.rows_done
            ));
        }
        Ok(())
    }
    /// True when every row is done.
    pub fn is_complete(&self) -> bool {
        self.rows_done == self.rows_total
    }
    /// The point with the lowest loss.
    pub fn min_loss(&self) -> Option<GridPoint> {
        self.points.iter().copied().min_by(|a, b| a.loss.total_cmp(&b.loss))
    }
}

/// The state of an unfinished landscape, kept next to its output while the grid runs (its own
/// artifact kind, so it can never be mistaken for a finished Probe).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LandscapeCheckpoint {
    /// The rows done so far.
    pub landscape: Landscape,
    /// Seconds spent on them, over every run that contributed.
    pub seconds: f64,
}

impl Artifact for LandscapeCheckpoint {
    const KIND: Kind = Kind::LandscapeCheckpoint;
    fn validate_payload(&self) -> std::result::Result<(), String> {
        self.landscape.check()
    }
}

/// Evaluates the rows of `state` not done yet on `set` (already subsampled), calling `on_row`
/// after each finished row (to checkpoint; an error there stops the run). Points of a row are
/// evaluated in parallel; results do not depend on the thread count or on where it resumed.
pub fn run_grid(
    model: &Model,
    mask: &Mask,
    frame: &Frame,
    set: &ImageSet,
    norm: &Normalization,
    mut state: Landscape,
    on_row: &mut dyn FnMut(&Landscape) -> Result<()>,
) -> Result<Landscape> {
    let cfg = state.config.clone();
    cfg.x.validate("--x-range")?;
    if let Some(y) = cfg.y {
        y.validate("--y-range")?;
    }
    if cfg.y.is_some() != frame.d2.is_some() {
        return Err(Error::setting("a 2-D grid needs two directions and a 1-D grid one"));
    }
    check_data(model, set, &format!("the {} split", cfg.split))?;
    frame.centre.check_same_layout(&model.layout, "landscape centre")?;
    let xs = cfg.x.values();
    let ys = cfg.y.map_or(vec![0.0], |y| y.values());
    if state.points.len() != state.rows_done * xs.len() || state.rows_total != ys.len() {
        return Err(Error::incompatible("landscape checkpoint does not match its grid"));
    }
    while state.rows_done < state.rows_total {
        let iy = state.rows_done;
        let y = ys[iy];
        let make = |ix: usize| -> Result<ParamVec> {
            let (x, yf) = (xs[ix] as f32, y as f32);
            let c = &frame.centre.data;
            let d1 = &frame.d1.data;
            let mut data: Vec<f32> = match &frame.d2 {
                Some(d2) => {
                    c.iter().zip(d1).zip(&d2.data).map(|((c, a), b)| c + x * a + yf * b).collect()
                }
                None => c.iter().zip(d1).map(|(c, a)| c + x * a).collect(),
            };
            mask.apply(&mut data);
            Ok(ParamVec { layout: frame.centre.layout.clone(), data })
        };
        let evals = evaluate_points(model, xs.len(), make, set, norm)?;
        for (ix, e) in evals.iter().enumerate() {
            state.points.push(GridPoint {
                ix,
                iy,
                x: xs[ix],
                y,
                loss: e.loss,
                accuracy: e.accuracy,
            });
        }
        state.rows_done += 1;
        on_row(&state)?;
    }
    Ok(state)
}

/// CSV of the grid: `ix,iy,x,y,loss,accuracy,error` (row-major: y outer, x inner).
pub fn csv(l: &Landscape) -> String {
    let mut s = String::from("ix,iy,x,y,loss,accuracy,error\n");
    for p in &l.points {
        s.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            p.ix,
            p.iy,
            p.x,
            p.y,
            cell(p.loss),
            cell(p.accuracy),
            cell(1.0 - p.accuracy)
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmc_train::params::ParamKind;

    fn layout() -> Layout {
        Layout::new([
            ("w".to_string(), vec![2, 3], ParamKind::Weight),
            ("b".to_string(), vec![2], ParamKind::Bias),
        ])
    }

    #[test]
    fn filter_normalisation_matches_weight_filter_norms() {
        let l = layout();
        // Filters of w: rows [3, 4, 0] (norm 5) and [1, 0, 0] (norm 1).
        let params =
            ParamVec { layout: l.clone(), data: vec![3.0, 4.0, 0.0, 1.0, 0.0, 0.0, 7.0, 8.0] };
        let mask = Mask::dense(&l);
        let mut rng = seed::rng(1, Stream::Other, 0);
        let d = filter_normalized_direction(&params, &mask, &mut rng);
        let n = |s: &[f32]| s.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        assert!((n(&d.data[0..3]) - 5.0).abs() < 1e-5);
        assert!((n(&d.data[3..6]) - 1.0).abs() < 1e-5);
        assert_eq!(&d.data[6..], &[0.0, 0.0]); // bias zeroed
                                               // A pruned entry stays zero; the rest of its filter still has the weights' filter norm.
        let mut m = Mask::dense(&l);
        m.keep[1] = false;
        let d = filter_normalized_direction(&params, &m, &mut seed::rng(1, Stream::Other, 0));
        assert_eq!(d.data[1], 0.0);
        assert!((n(&d.data[0..3]) - 5.0).abs() < 1e-5);
    }

    #[test]
    fn plane_puts_runs_at_their_corners() {
        let l = layout();
        let v = |s: f32| ParamVec {
            layout: l.clone(),
            data: (0..8)
                .map(|i| s * (i as f32 + 1.0) + (i * i) as f32 * 0.1 * s.signum())
                .collect(),
        };
        let (m0, m1, m2) = (v(1.0), v(-2.0), v(0.5));
        let mut m2b = m2.clone();
        m2b.data[3] += 1.0; // break collinearity
        let f = plane_frame(&[&m0, &m1, &m2b], true).unwrap();
        let a = anchors(&f, &[&m0, &m1, &m2b]);
        for (got, want) in a.iter().zip([(1.0, 0.0), (-1.0, 0.0), (0.0, 1.0)]) {
            assert!((got.x - want.0).abs() < 1e-5 && (got.y - want.1).abs() < 1e-5, "{got:?}");
            assert!(got.off_plane < 1e-4);
        }
        // Four runs: V1 = (m3 - m2)/2.
        let m3 = v(3.0);
        let f4 = plane_frame(&[&m0, &m1, &m2, &m3], true).unwrap();
        let want: Vec<f32> = m3.data.iter().zip(&m2.data).map(|(a, b)| 0.5 * (a - b)).collect();
        assert_eq!(f4.d2.unwrap().data, want);
        assert!(plane_frame(&[&m0, &m1], true).is_err());
        assert!(plane_frame(&[&m0, &m0, &m2], true).unwrap_err().to_string().contains("zero"));
    }

    #[test]
    fn axis_values_include_both_ends() {
        let a = Axis { min: -1.0, max: 1.0, points: 21 };
        let v = a.values();
        assert_eq!((v[0], v[10], v[20]), (-1.0, 0.0, 1.0));
        assert!(Axis { min: 1.0, max: -1.0, points: 5 }.validate("--x-range").is_err());
        assert!(Axis { min: -1.0, max: 1.0, points: 1 }.validate("--x-range").is_err());
    }
}
