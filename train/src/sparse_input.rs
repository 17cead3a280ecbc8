//! The first layer of an MLP on mostly-background inputs (MNIST: ~81% of pixels are 0 before
//! normalisation), computed from the inputs that differ from the background only.
//!
//! Each input column `p` gets a background value `z_p` (its minimum over the batch: on MNIST the
//! normalised 0), and the batch is split exactly as `X = 1 z^T + S` with `S` sparse. Then
//!
//! * forward: `X W^T = 1 (W z)^T + S W^T`, the second term summing ~150 rows of `W^T` per sample
//!   instead of a 784-long dot product per output;
//! * weight gradient: `dW^T = X^T dZ = z db^T + S^T dZ` with `db` the column sums of `dZ` (the
//!   bias gradient): per input column, the rows of `dZ` of the samples where it is not
//!   background, weighted by their values.
//!
//! The identity is exact in real arithmetic; in f32 only the rounding of `x - z` and the order of
//! the sums differ from the dense product (the tests compare both against the tape). Outputs are
//! processed in column blocks held in registers ([`FWD_BLOCK`], [`GRAD_BLOCK`] wide), with `W^T`
//! and `dW^T` stored block-major so that every block is contiguous; the blocks are the parallel
//! tasks of the transpositions and of the weight gradient. Why by hand: products of a sparse
//! matrix with a dense one into a transposed output are not what `gemm` offers, and the sparse
//! crates' kernels (CSR times dense) neither fuse the background term nor vectorise over a
//! register block.
//!
//! Every sum runs in a fixed order (forward: a row's entries by column; weight gradient: a
//! column's entries by row, after the background term) that depends on the batch alone, so results are bit-identical for any thread count.

use rayon::prelude::*;

use crate::cpu::{run_kernel, transpose, Build};

/// Outputs per register block of the forward product: 8 AVX vectors.
const FWD_BLOCK: usize = 64;

/// Outputs per register block (and per parallel task) of the weight gradient: 4 AVX vectors.
const GRAD_BLOCK: usize = 32;

/// A batch split into background and sparse part, and the block-major `W^T` it multiplies.
/// Buffers are kept between steps.
#[derive(Default)]
pub(crate) struct SparseInput {
    /// The build its kernels run (the process's unless a test picks one).
    pub(crate) build: Build,
    /// Input width.
    inf: usize,
    /// Background value of each input column.
    z: Vec<f32>,
    /// Row `i`'s entries (column, value `x - z`), columns ascending, are the first `len[i]` of
    /// `entries[i * inf..(i + 1) * inf]`.
    len: Vec<u32>,
    entries: Vec<(u32, f32)>,
    /// The same entries by column (row, value), rows ascending: column `p`'s are
    /// `by_col[col_start[p]..col_start[p + 1]]`.
    col_start: Vec<u32>,
    by_col: Vec<(u32, f32)>,
    /// `W^T` in blocks of [`FWD_BLOCK`] outputs: block `b` is `inf x FWD_BLOCK`, zero-padded.
    wt: Vec<f32>,
    /// `W z`, zero-padded to whole blocks.
    wz: Vec<f32>,
    /// `dW^T` per [`GRAD_BLOCK`] (`inf x GRAD_BLOCK` each), before it is written as `dW`.
    gt: Vec<f32>,
    /// `dZ` per [`GRAD_BLOCK`] (`n x GRAD_BLOCK` each, zero-padded): small enough for L1.
    dzb: Vec<f32>,
    /// Scratch of the counting sort.
    sort_next: Vec<u32>,
}

impl SparseInput {
    /// Finds each column's background in the `n x inf` batch `x`; returns the fraction of
    /// entries that differ from it (the sparse part's density), or infinity when a background is
    /// not finite (then only the dense product gives the dense product's infinities and NaNs).
    /// Cheap (two vectorised passes): call [`SparseInput::split`] only if the sparse path is taken.
    pub(crate) fn density(&mut self, x: &[f32], n: usize, inf: usize) -> f32 {
        self.inf = inf;
        self.z.clear();
        self.z.extend_from_slice(&x[..inf]);
        let build = self.build;
        let z = &mut self.z;
        build.run(
            #[inline(always)]
            || {
                for r in x.chunks_exact(inf).skip(1) {
                    for (z, v) in z.iter_mut().zip(r) {
                        // `min` ignores NaN (unless the whole column is NaN).
                        *z = z.min(*v);
                    }
                }
            },
        );
        if !self.z.iter().all(|z| z.is_finite()) {
            return f32::INFINITY;
        }
        let z = &self.z;
        let nnz: usize = build.run(
            #[inline(always)]
            || {
                x.chunks_exact(inf)
                    .map(|r| r.iter().zip(z).filter(|(v, zp)| *v - *zp != 0.0).count())
                    .sum()
            },
        );
        nnz as f32 / (n * inf).max(1) as f32
    }

    /// Splits the batch `x` into the backgrounds found by the last [`SparseInput::density`] and
    /// the entries that differ from them (`x - z`; NaN != 0, so a NaN input stays an entry).
    pub(crate) fn split(&mut self, x: &[f32], n: usize) {
        let inf = self.inf;
        self.len.resize(n, 0);
        self.entries.resize(n * inf, (0, 0.0));
        let z = &self.z;
        self.entries
            .par_chunks_mut(16 * inf)
            .zip(self.len.par_chunks_mut(16))
            .zip(x.par_chunks(16 * inf))
            .for_each(|((entries, len), x)| {
                for ((e, l), r) in entries.chunks_exact_mut(inf).zip(len).zip(x.chunks_exact(inf)) {
                    // Branch-free compaction: always write, advance past entries only.
                    let mut k = 0;
                    for (p, (v, zp)) in r.iter().zip(z).enumerate() {
                        let d = v - zp;
                        e[k] = (p as u32, d);
                        k += (d != 0.0) as usize;
                    }
                    *l = k as u32;
                }
            });
    }

    /// Builds the column order of the entries (for the weight gradient): a counting sort.
    fn sort_by_column(&mut self) {
        let inf = self.inf;
        self.col_start.clear();
        self.col_start.resize(inf + 1, 0);
        for (i, len) in self.len.iter().enumerate() {
            for &(p, _) in &self.entries[i * inf..][..*len as usize] {
                self.col_start[p as usize + 1] += 1;
            }
        }
        for p in 0..inf {
            self.col_start[p + 1] += self.col_start[p];
        }
        let nnz = self.col_start[inf] as usize;
        self.by_col.resize(nnz, (0, 0.0));
        let mut next = std::mem::take(&mut self.sort_next);
        next.clear();
        next.extend_from_slice(&self.col_start[..inf]);
        for i in 0..self.len.len() {
            for &(p, v) in &self.entries[i * inf..][..self.len[i] as usize] {
                let at = &mut next[p as usize];
                self.by_col[*at as usize] = (i as u32, v);
                *at += 1;
            }
        }
        self.sort_next = next;
    }

    /// Row `i`'s entries.
    fn row(&self, i: usize) -> &[(u32, f32)] {
        &self.entries[i * self.inf..][..self.len[i] as usize]
    }

    /// Prepares the forward product for the weight `w` (out x in, row-major): block-major
    /// `W^T`, and `W z`.
    pub(crate) fn set_weight(&mut self, w: &[f32], outf: usize) {
        let inf = self.inf;
        let blocks = outf.div_ceil(FWD_BLOCK);
        self.wt.resize(blocks * inf * FWD_BLOCK, 0.0);
        self.wz.resize(blocks * FWD_BLOCK, 0.0);
        let (z, build) = (&self.z, self.build);
        self.wt.par_chunks_mut(inf * FWD_BLOCK).zip(self.wz.par_chunks_mut(FWD_BLOCK)).enumerate().for_each(|(b, (wt, wz))| {
            let rows = &w[b * FWD_BLOCK * inf..((b + 1) * FWD_BLOCK).min(outf) * inf];
            run_kernel!(build, transpose_block(build: Build, rows: &[f32], inf: usize, wt: &mut [f32], z: &[f32], wz: &mut [f32]));
        });
    }

    /// Rows `rows` of `X W^T` (without bias) into `out` (rows.len() x outf).
    pub(crate) fn forward(&self, rows: std::ops::Range<usize>, outf: usize, out: &mut [f32]) {
        let this = self;
        run_kernel!(self.build, forward_rows(this: &SparseInput, rows: std::ops::Range<usize>, outf: usize, out: &mut [f32]));
    }

    /// The weight gradient `dW = dZ^T X` (out x in, row-major) into `dw`, given `dz` (n x outf)
    /// and its column sums `db`. Uses the split of the last [`SparseInput::split`].
    pub(crate) fn weight_grad(&mut self, dz: &[f32], db: &[f32], outf: usize, dw: &mut [f32]) {
        self.sort_by_column();
        let inf = self.inf;
        let n = self.len.len();
        let blocks = outf.div_ceil(GRAD_BLOCK);
        let mut gt = std::mem::take(&mut self.gt);
        let mut dzb = std::mem::take(&mut self.dzb);
        gt.resize(blocks * inf * GRAD_BLOCK, 0.0);
        dzb.resize(blocks * n * GRAD_BLOCK, 0.0);
        let this = &*self;
        gt.par_chunks_mut(inf * GRAD_BLOCK)
            .zip(dzb.par_chunks_mut(n * GRAD_BLOCK))
            .zip(dw.par_chunks_mut(GRAD_BLOCK * inf))
            .enumerate()
            .for_each(|(b, ((gt, dzb), dw))| {
                let c0 = b * GRAD_BLOCK;
                let out = BlockOut { gt, dzb, dw };
                run_kernel!(this.build, grad_block(this: &SparseInput, dz: &[f32], db: &[f32], outf: usize, c0: usize, out: BlockOut<'_>));
            });
        self.gt = gt;
        self.dzb = dzb;
    }
}

/// Block `wt` (`inf x FWD_BLOCK`) of `W^T` from the weight rows `rows` (at most `FWD_BLOCK` of
/// them, `inf` wide; missing ones are zeros), and that block of `W z`.
#[inline(always)]
fn transpose_block(
    build: Build,
    rows: &[f32],
    inf: usize,
    wt: &mut [f32],
    z: &[f32],
    wz: &mut [f32],
) {
    let w = rows.len() / inf;
    transpose(build, rows, inf, wt, FWD_BLOCK, w, inf);
    for r in wt.chunks_exact_mut(FWD_BLOCK) {
        r[w..].fill(0.0);
    }
    wz.fill(0.0);
    for (r, zp) in wt.chunks_exact(FWD_BLOCK).zip(z) {
        for (a, v) in wz.iter_mut().zip(r) {
            *a += zp * v;
        }
    }
}

/// See [`SparseInput::forward`]: per output block, per row, `W z` plus the row's entries times
/// the rows of `W^T`, accumulated in registers.
#[inline(always)]
fn forward_rows(s: &SparseInput, rows: std::ops::Range<usize>, outf: usize, out: &mut [f32]) {
    let inf = s.inf;
    for (b, wt) in s.wt.chunks_exact(inf * FWD_BLOCK).enumerate() {
        let c0 = b * FWD_BLOCK;
        let w = FWD_BLOCK.min(outf - c0);
        for i in rows.clone() {
            let mut acc: [f32; FWD_BLOCK] = s.wz[c0..c0 + FWD_BLOCK].try_into().expect("block");
            for &(p, v) in s.row(i) {
                let src: &[f32; FWD_BLOCK] =
                    wt[p as usize * FWD_BLOCK..][..FWD_BLOCK].try_into().expect("block");
                for j in 0..FWD_BLOCK {
                    acc[j] += v * src[j];
                }
            }
            out[(i - rows.start) * outf + c0..][..w].copy_from_slice(&acc[..w]);
        }
    }
}

/// One output block's buffers for [`grad_block`]: its register-block accumulator, its copy of
/// `dZ`'s columns, and its rows of `dW`.
struct BlockOut<'a> {
    gt: &'a mut [f32],
    dzb: &'a mut [f32],
    dw: &'a mut [f32],
}

/// Output block `c0..c0 + GRAD_BLOCK` of the weight gradient: per input column `p`, `z_p db`
/// plus its entries' values times their rows of `dZ` (copied to the L1-sized `dzb` first),
/// accumulated in registers into `gt` (`inf x GRAD_BLOCK`); then written transposed into `dw`
/// (this block's rows of `dW`).
#[inline(always)]
fn grad_block(s: &SparseInput, dz: &[f32], db: &[f32], outf: usize, c0: usize, out: BlockOut<'_>) {
    let BlockOut { gt, dzb, dw } = out;
    let inf = s.inf;
    let w = GRAD_BLOCK.min(outf - c0);
    for (dst, row) in dzb.chunks_exact_mut(GRAD_BLOCK).zip(dz.chunks_exact(outf)) {
        dst[..w].copy_from_slice(&row[c0..c0 + w]);
        dst[w..].fill(0.0);
    }
    let dbb: [f32; GRAD_BLOCK] = std::array::from_fn(|j| if j < w { db[c0 + j] } else { 0.0 });
    for (p, out) in gt.chunks_exact_mut(GRAD_BLOCK).enumerate() {
        let zp = s.z[p];
        let mut acc: [f32; GRAD_BLOCK] = std::array::from_fn(|j| zp * dbb[j]);
        for &(i, v) in &s.by_col[s.col_start[p] as usize..s.col_start[p + 1] as usize] {
            let src: &[f32; GRAD_BLOCK] =
                dzb[i as usize * GRAD_BLOCK..][..GRAD_BLOCK].try_into().expect("block");
            for j in 0..GRAD_BLOCK {
                acc[j] += v * src[j];
            }
        }
        out.copy_from_slice(&acc);
    }
    transpose(s.build, gt, GRAD_BLOCK, dw, inf, inf, w);
}
