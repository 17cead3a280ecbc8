//! A safe, bounds-checked wrapper around `gemm::gemm` (f32, AVX-512 with the `x86-v4` feature).
//!
//! `gemm` parallelises only over output tiles, never over the inner dimension, and its blocking
//! does not depend on the thread count, so a product is bit-identical whichever [`Par`] is used.

/// Where a matrix lives in a slice: element (r, c) is at `r * rs + c * cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl Layout {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(cols: usize) -> Self {
        Layout { rs: cols, cs: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns: a column-major view whose
    /// column stride is `cols`.
    pub fn transposed(cols: usize) -> Self {
        Layout { rs: 1, cs: cols }
    }
    /// Checks that an `rows x cols` matrix with this layout fits in `len` elements.
    fn check(&self, rows: usize, cols: usize, len: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < len,
            "gemm: {what} ({rows}x{cols}, {self:?}) does not fit in {len} elements"
        );
    }
}

/// How `gemm` may use threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Par {
    /// One thread: the call is already inside a rayon task.
    Seq,
    /// Split output tiles over the current rayon pool.
    Pool,
}

impl Par {
    fn to_gemm(self) -> gemm::Parallelism {
        match self {
            Par::Seq => gemm::Parallelism::None,
            Par::Pool => {
                let n = rayon::current_num_threads();
                if n > 1 {
                    gemm::Parallelism::Rayon(n)
                } else {
                    gemm::Parallelism::None
                }
            }
        }
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`; `accumulate` adds to `dst` instead of
/// overwriting it. Panics if a matrix does not fit its slice or `dst` overlaps an input (the
/// borrow checker already rules that out).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dl: Layout,
    accumulate: bool,
    lhs: &[f32],
    ll: Layout,
    rhs: &[f32],
    rl: Layout,
    par: Par,
) {
    if m == 0 || n == 0 {
        return;
    }
    dl.check(m, n, dst.len(), "dst");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for c in 0..n {
                    dst[r * dl.rs + c * dl.cs] = 0.0;
                }
            }
        }
        return;
    }
    ll.check(m, k, lhs.len(), "lhs");
    rl.check(k, n, rhs.len(), "rhs");
    // SAFETY: every element gemm touches lies inside its slice (checked above); `dst` is a
    // unique borrow, so it cannot alias `lhs` or `rhs`; strides are non-negative and fit isize
    // because the slices exist.
    unsafe {
        raw(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dl,
            accumulate,
            lhs.as_ptr(),
            ll,
            rhs.as_ptr(),
            rl,
            par.to_gemm(),
        )
    }
}

/// `gemm::gemm` (alpha = beta = 1, no conjugation) on raw pointers with our layouts.
///
/// # Safety
/// Every element of the three matrices must lie inside its allocation, and `dst` must not
/// overlap `lhs` or `rhs` nor be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn raw(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dl: Layout,
    accumulate: bool,
    lhs: *const f32,
    ll: Layout,
    rhs: *const f32,
    rl: Layout,
    par: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dl.cs as isize,
        dl.rs as isize,
        accumulate,
        lhs,
        ll.cs as isize,
        ll.rs as isize,
        rhs,
        rl.cs as isize,
        rl.rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        par,
    )
}

/// Multiply-accumulates per task in [`sgemm_split`] (at most; the task count is the smallest
/// power of two that gets there, capped at 64).
const TASK_MACS: usize = 16 << 20;

/// A raw output pointer that rayon tasks may share: each task writes a disjoint block.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used by `sgemm_split`, whose tasks write disjoint row or column blocks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method, so closures capture the whole (Send) wrapper rather than the raw
    /// field, as edition-2021 closures would.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// [`sgemm`] for a dense row-major `dst` (`m x n`), split into blocks of rows (when `m >= n`)
/// or columns that run as rayon tasks, each a single-threaded `gemm` call. The split follows
/// the larger output dimension so the operand every task re-packs is the smaller one.
///
/// Why not `gemm`'s own threading: for the small products of an MLP (LeNet-300-100 at batch
/// 128: M = 128, N <= 784, K <= 784) its per-call thread hand-off costs more than it saves; a
/// whole LeNet step on one thread with sequential gemm calls was faster (47k images/s) than on
/// two with `gemm`'s threading (41k). The blocks depend only on the shape, so results are
/// bit-identical for any thread count.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm_split(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    ll: Layout,
    rhs: &[f32],
    rl: Layout,
) {
    use rayon::prelude::*;
    let dl = Layout::row_major(n);
    let macs = m * n * k;
    let mut tasks = 1usize;
    while macs / tasks > TASK_MACS && tasks < 64 {
        tasks *= 2;
    }
    let rows = m >= n;
    let len = if rows { m } else { n };
    let block = len.div_ceil(tasks).max(1);
    let tasks = len.div_ceil(block);
    if tasks <= 1 || k == 0 {
        return sgemm(m, n, k, dst, dl, accumulate, lhs, ll, rhs, rl, Par::Seq);
    }
    dl.check(m, n, dst.len(), "dst");
    ll.check(m, k, lhs.len(), "lhs");
    rl.check(k, n, rhs.len(), "rhs");
    let out = SendPtr(dst.as_mut_ptr());
    (0..tasks).into_par_iter().for_each(|t| {
        let s0 = t * block;
        let s1 = (s0 + block).min(len);
        let (bm, bn, d_off, l_off, r_off) = if rows {
            (s1 - s0, n, s0 * n, s0 * ll.rs, 0)
        } else {
            (m, s1 - s0, s0, 0, s0 * rl.cs)
        };
        // SAFETY: the block lies inside `dst`, `lhs` and `rhs` (their full extents were checked
        // above); blocks of different tasks are disjoint rows or columns of `dst`, so no two
        // tasks write the same element, and `dst` is exclusively borrowed for the whole call.
        unsafe {
            let (d, l, r) =
                (out.get().add(d_off), lhs.as_ptr().add(l_off), rhs.as_ptr().add(r_off));
            raw(bm, bn, k, d, dl, accumulate, l, ll, r, rl, gemm::Parallelism::None)
        }
    });
}
