//! A picture of a synthetic set: a PNG grid with one row per class and one column per stored
//! image (multi-formation images are shown as stored, cells and all).

use std::io::BufWriter;
use std::path::Path;

use lmc_train::data::{Pixels, SyntheticSet};
use lmc_train::{Error, Result};

/// Gap between cells, in pixels (white).
const GAP: usize = 2;
/// Cells are enlarged (nearest neighbour) to at least this many pixels high.
const MIN_CELL: usize = 32;

/// Renders `set` as an RGB image: (width, height, row-major RGB bytes). Pixels are
/// de-normalised (`v * std + mean`) and clamped to [0, 1].
pub fn render(set: &SyntheticSet) -> Result<(usize, usize, Vec<u8>)> {
    let Pixels::F32(px) = &set.images.pixels else {
        return Err(Error::data(format!(
            "synthetic set '{}' stores raw bytes, expected normalised floats",
            set.name
        )));
    };
    let s = set.images.shape;
    let classes = set.images.labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in set.images.labels.iter().enumerate() {
        rows[l as usize].push(i);
    }
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
    let zoom = MIN_CELL.div_ceil(s.height).max(1);
    let (ch, cw) = (s.height * zoom, s.width * zoom);
    let (w, h) = (cols * (cw + GAP) + GAP, classes.max(1) * (ch + GAP) + GAP);
    let mut rgb = vec![255u8; w * h * 3];
    let plane = s.height * s.width;
    for (r, row) in rows.iter().enumerate() {
        for (k, &i) in row.iter().enumerate() {
            let img = &px[i * s.len()..(i + 1) * s.len()];
            let (x0, y0) = (GAP + k * (cw + GAP), GAP + r * (ch + GAP));
            for y in 0..ch {
                for x in 0..cw {
                    let p = (y / zoom) * s.width + x / zoom;
                    let o = ((y0 + y) * w + x0 + x) * 3;
                    for c in 0..3 {
                        let sc = if s.channels == 3 { c } else { 0 };
                        let (m, sd) = (
                            set.norm.mean.get(sc).copied().unwrap_or(0.0),
                            set.norm.std.get(sc).copied().unwrap_or(1.0),
                        );
                        let v = (img[sc * plane + p] * sd + m).clamp(0.0, 1.0);
                        rgb[o + c] = (v * 255.0).round() as u8;
                    }
                }
            }
        }
    }
    Ok((w, h, rgb))
}

/// Writes [`render`]'s picture of `set` to `path` (through a temporary file and a rename).
pub fn write_png(set: &SyntheticSet, path: &Path) -> Result<()> {
    let (w, h, rgb) = render(set)?;
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(BufWriter::new(&mut bytes), w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| Error::bad_file(path, format!("cannot encode PNG: {e}")))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| Error::bad_file(path, format!("cannot encode PNG: {e}")))?;
    }
    lmc_train::artifact::write_atomic(path, &bytes)
}
