//! SVG plots for the report (plotters' SVG backend: text stays text, no font files needed).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

/// One named line.
pub struct Series {
    /// Legend label.
    pub name: String,
    /// (x, y) points in drawing order.
    pub points: Vec<(f64, f64)>,
    /// Error bar half-lengths, one per point (e.g. a standard deviation across seeds), or
    /// empty for none.
    pub err: Vec<f64>,
}

impl Series {
    /// A line without error bars.
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points, err: vec![] }
    }
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// A line chart with markers, axis labels (with units) and a legend.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let (x0, x1) = range(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)));
    // The y range covers the error bars.
    let ends = |s: &Series| -> Vec<f64> {
        let e = |i: usize| s.err.get(i).copied().unwrap_or(0.0);
        s.points.iter().enumerate().flat_map(|(i, p)| [p.1 - e(i), p.1 + e(i)]).collect()
    };
    let (y0, y1) = range(series.iter().flat_map(ends));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| anyhow!("{e:?}"))?;
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e:?}"))?
            .label(s.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        // Markers on measured points; a sampled curve (a density) is drawn as a line only.
        let markers = if s.points.len() <= 60 { s.points.as_slice() } else { &[] };
        chart
            .draw_series(markers.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| anyhow!("{e:?}"))?;
        chart
            .draw_series(s.points.iter().zip(&s.err).filter(|(_, e)| **e > 0.0).map(|(p, e)| {
                PathElement::new(vec![(p.0, p.1 - e), (p.0, p.1 + e)], c.stroke_width(1))
            }))
            .map_err(|e| anyhow!("{e:?}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Values `z[row][col]` on a grid with column coordinates `xs` and row coordinates `ys`.
pub struct Grid {
    /// Column (x) coordinates.
    pub xs: Vec<f64>,
    /// Row (y) coordinates.
    pub ys: Vec<f64>,
    /// One row of values per y.
    pub z: Vec<Vec<f64>>,
}

/// A filled heat map of `z[row][col]` over x (columns) and y (rows), with a colour bar legend
/// giving the value range.
pub fn heatmap(path: &Path, title: &str, axes: [&str; 3], grid: &Grid) -> Result<()> {
    let [x_label, y_label, z_label] = axes;
    let Grid { xs, ys, z } = grid;
    let root = SVGBackend::new(path, (640, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e:?}"))?;
    let finite = || z.iter().flatten().copied().filter(|v| v.is_finite());
    let (zmin, zmax) =
        (finite().fold(f64::INFINITY, f64::min), finite().fold(f64::NEG_INFINITY, f64::max));
    let step = |v: &[f64]| if v.len() > 1 { (v[1] - v[0]).abs() } else { 1.0 };
    let (dx, dy) = (step(xs) / 2.0, step(ys) / 2.0);
    let (xa, xb) =
        (xs.first().copied().unwrap_or(0.0) - dx, xs.last().copied().unwrap_or(1.0) + dx);
    let (ya, yb) =
        (ys.first().copied().unwrap_or(0.0) - dy, ys.last().copied().unwrap_or(1.0) + dy);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{title} ({z_label}: {zmin:.3} dark .. {zmax:.3} light)"),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d(xa..xb, ya..yb)
        .map_err(|e| anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .disable_mesh()
        .draw()
        .map_err(|e| anyhow!("{e:?}"))?;
    let span = (zmax - zmin).max(1e-12);
    let cells = ys.iter().enumerate().flat_map(|(r, &y)| {
        xs.iter().enumerate().map(move |(c, &x)| {
            let v = z[r][c];
            // log-ish scale helps landscapes, whose low basin would otherwise be one colour.
            let t = (((v - zmin) / span).clamp(0.0, 1.0)).sqrt();
            let col = ViridisRGB::get_color(t);
            Rectangle::new([(x - dx, y - dy), (x + dx, y + dy)], col.filled())
        })
    });
    chart.draw_series(cells).map_err(|e| anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow!("{e:?}"))?;
    Ok(())
}

/// Overlaid histograms (as step lines of bin counts) of several samples, with a log10 x axis
/// option for positive, heavy-tailed values such as Hessian diagonals.
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    samples: &[(String, Vec<f64>)],
    bins: usize,
) -> Result<()> {
    let all: Vec<f64> =
        samples.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite()).collect();
    let (lo, hi) = range(all.iter().copied());
    let width = (hi - lo) / bins as f64;
    let series: Vec<Series> = samples
        .iter()
        .map(|(name, v)| {
            let mut counts = vec![0usize; bins];
            for &x in v.iter().filter(|x| x.is_finite()) {
                let b = (((x - lo) / width) as usize).min(bins - 1);
                counts[b] += 1;
            }
            let n = v.len().max(1) as f64;
            let points = counts
                .iter()
                .enumerate()
                .map(|(i, &c)| (lo + (i as f64 + 0.5) * width, c as f64 / n))
                .collect();
            Series::new(name.clone(), points)
        })
        .collect();
    lines(path, title, x_label, "fraction of entries", &series)
}
