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
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dl.cs as isize,
            dl.rs as isize,
            accumulate,
            lhs.as_ptr(),
            ll.cs as isize,
            ll.rs as isize,
            rhs.as_ptr(),
            rl.cs as isize,
            rl.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par.to_gemm(),
        )
    }
}
