//! A safe, bounds-checked wrapper around `gemm::gemm` (f32, AVX-512 with the `x86-v4` feature).
//!
//! `gemm` parallelises only over output tiles, never over the inner dimension, and its blocking
//! does not depend on the thread count, so a product is bit-identical whichever [`Par`] is used.

use std::mem::MaybeUninit;

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
    /// Whether a product runs on one thread anyway: `Seq`, or `Pool` with a one-thread pool.
    pub(crate) fn single(self) -> bool {
        self == Par::Seq || rayon::current_num_threads() == 1
    }

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

/// A matrix operand of a product: its elements and where each sits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand<'a> {
    /// The slice the matrix lives in.
    pub data: &'a [f32],
    /// Where element (r, c) is.
    pub layout: Layout,
}

impl<'a> Operand<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Operand { data, layout: Layout::row_major(cols) }
    }
    /// The transpose of the row-major matrix with `cols` columns in `data`.
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        Operand { data, layout: Layout::transposed(cols) }
    }
}

/// The product `lhs (m x k) * rhs (k x n)`, written into an `m x n` destination by
/// [`Gemm::run`] or [`Gemm::run_split`]: added to it when `accumulate`, else overwriting it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm<'a> {
    /// Rows of the result and of `lhs`.
    pub m: usize,
    /// Columns of the result and of `rhs`.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// The left factor (m x k).
    pub lhs: Operand<'a>,
    /// The right factor (k x n).
    pub rhs: Operand<'a>,
    /// Add to the destination instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm<'_> {
    /// `dst (m x n, laid out as dl) = [dst +] lhs * rhs`, threaded as `par` says. Panics if a
    /// matrix does not fit its slice (`dst` cannot overlap an input: the borrow checker rules
    /// that out).
    pub fn run(&self, dst: &mut [f32], dl: Layout, par: Par) {
        // SAFETY: `dst` is a unique borrow of `dst.len()` initialised floats.
        unsafe { self.run_ptr(dst.as_mut_ptr(), dst.len(), dl, par) }
    }

    /// [`Gemm::run`] without `accumulate` into memory not yet initialised: every element of the
    /// m x n destination is written, none read (`gemm` reads its destination only when told to
    /// accumulate). The product's bits are those of accumulating into zeros: `gemm` starts each
    /// sum at +0.0 and adds the products with fused multiply-adds, so a sum is never -0.0, and
    /// 0 + s = s (tested). Panics if `accumulate` is set or a matrix does not fit its slice.
    pub fn run_uninit(&self, dst: &mut [MaybeUninit<f32>], dl: Layout, par: Par) {
        assert!(!self.accumulate, "gemm: cannot accumulate into uninitialised memory");
        // SAFETY: `dst` is a unique borrow of `dst.len()` floats, and without `accumulate`
        // nothing reads them before writing.
        unsafe { self.run_ptr(dst.as_mut_ptr().cast(), dst.len(), dl, par) }
    }

    /// [`Gemm::run`] into the `len` floats at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` floats (and for reads when `accumulate`), and no
    /// one else may touch them during the call.
    unsafe fn run_ptr(&self, dst: *mut f32, len: usize, dl: Layout, par: Par) {
        let Gemm { m, n, k, lhs, rhs, accumulate } = *self;
        if m == 0 || n == 0 {
            return;
        }
        dl.check(m, n, len, "dst");
        if k == 0 {
            if !accumulate {
                for r in 0..m {
                    for c in 0..n {
                        // SAFETY: inside the destination (checked above).
                        unsafe { dst.add(r * dl.rs + c * dl.cs).write(0.0) };
                    }
                }
            }
            return;
        }
        lhs.layout.check(m, k, lhs.data.len(), "lhs");
        rhs.layout.check(k, n, rhs.data.len(), "rhs");
        // SAFETY: every element gemm touches lies inside its slice or the destination (checked
        // above); the caller guarantees the destination is ours alone, so it cannot alias `lhs`
        // or `rhs`; strides are non-negative and fit isize because the slices exist.
        unsafe {
            raw(
                m,
                n,
                k,
                dst,
                dl,
                accumulate,
                lhs.data.as_ptr(),
                lhs.layout,
                rhs.data.as_ptr(),
                rhs.layout,
                par.to_gemm(),
            )
        }
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
    if reduces_horizontally(m, n, ll, rl) {
        let (lhs_rs, rhs_cs) = (ll.rs, rl.cs);
        let c = Chains { m, n, k, dst, dl, accumulate, lhs, lhs_rs, rhs, rhs_cs };
        // SAFETY: the caller's guarantees, which `Chains::run` needs too.
        return unsafe { c.run() };
    }
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

/// Whether `gemm` 0.19 would sum this product as dot products, each reduced across its vector
/// lanes at the end: where both operands run along the inner dimension (lhs column stride 1, rhs
/// row stride 1, as in a conv's weight gradient, dy times the transposed im2col matrix) and the
/// result has at most 256 elements (`gemm_common::gemm`'s `horizontal_dispatcher`, tried first
/// for any inner dimension) or is one row or column (its `mixed_gemv_rowmajor`). That order
/// follows the vector width (8 lanes with AVX2, 16 with AVX-512), so a run on an AVX2-only host
/// would differ in its bits from one on an AVX-512 host; [`Chains`] sums these products instead.
/// (`gemm` transposes a product whose destination is column-major first; the test is symmetric
/// in the two operands, so it holds either way.)
fn reduces_horizontally(m: usize, n: usize, ll: Layout, rl: Layout) -> bool {
    ll.cs == 1 && rl.rs == 1 && (m * n <= 256 || m <= 1 || n <= 1)
}

/// `dst = [dst +] lhs * rhs` for the products [`reduces_horizontally`] picks, summed as `gemm`'s
/// packed path sums every other product: each element one chain of fused multiply-adds from
/// +0.0 over each piece of the inner dimension ([`k_piece`]), the pieces added to the
/// destination in order (the first overwrites it unless `accumulate`). A fused multiply-add
/// rounds once on every CPU, so these bits do not depend on the instruction set (tested against
/// an independent loop and against `gemm`'s packed path on copied operands). Written here
/// because `gemm` has no switch for its horizontal path; the products are small (at most 256
/// elements, or one row or column), and 8 independent chains run side by side, so consecutive
/// multiply-adds do not wait for each other's results.
#[derive(Clone, Copy)]
struct Chains {
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dl: Layout,
    accumulate: bool,
    /// Column stride 1, row stride `lhs_rs`.
    lhs: *const f32,
    lhs_rs: usize,
    /// Row stride 1, column stride `rhs_cs`.
    rhs: *const f32,
    rhs_cs: usize,
}

impl Chains {
    /// Runs the product, compiled with FMA where the CPU has it (`mul_add` is then one
    /// instruction instead of a call to libm's `fmaf`; the same value either way).
    ///
    /// # Safety
    /// As [`raw`]: every element of the three matrices lies inside its allocation and `dst` is
    /// ours alone; `k >= 1`.
    unsafe fn run(self) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            #[target_feature(enable = "fma")]
            unsafe fn with_fma(c: Chains) {
                // SAFETY: passed on from `run`.
                unsafe { c.body() }
            }
            // SAFETY: the CPU has FMA (checked just above); the rest is the caller's guarantee.
            return unsafe { with_fma(self) };
        }
        // SAFETY: the caller's guarantee.
        unsafe { self.body() }
    }

    /// # Safety
    /// As [`Chains::run`].
    #[inline(always)]
    unsafe fn body(self) {
        const SIDE: usize = 8;
        let Chains { m, n, k, dst, dl, accumulate, lhs, lhs_rs, rhs, rhs_cs } = self;
        let kc = k_piece(m, n, k);
        let mut k0 = 0;
        while k0 < k {
            let kp = kc.min(k - k0);
            let add = accumulate || k0 > 0;
            for i in 0..m {
                // SAFETY (every access below): row i of lhs and columns j of rhs over
                // k0..k0 + kp, and element (i, j) of dst, lie inside their matrices (the
                // caller's guarantee).
                let a = unsafe { std::slice::from_raw_parts(lhs.add(i * lhs_rs + k0), kp) };
                let mut j0 = 0;
                while j0 < n {
                    let side = SIDE.min(n - j0);
                    // Columns past the last read `a` again (any kp floats do): all SIDE chains
                    // always run, a fixed count the compiler keeps in registers, and only the
                    // first `side` are stored.
                    let mut b = [a; SIDE];
                    for (s, col) in b.iter_mut().enumerate().take(side) {
                        *col = unsafe {
                            std::slice::from_raw_parts(rhs.add((j0 + s) * rhs_cs + k0), kp)
                        };
                    }
                    let mut acc = [0.0f32; SIDE];
                    for t in 0..kp {
                        for s in 0..SIDE {
                            acc[s] = a[t].mul_add(b[s][t], acc[s]);
                        }
                    }
                    for (s, v) in acc.iter().enumerate().take(side) {
                        let d = unsafe { dst.add(i * dl.rs + (j0 + s) * dl.cs) };
                        unsafe { *d = if add { *d + v } else { *v } };
                    }
                    j0 += side;
                }
            }
            k0 += kp;
        }
    }
}

/// Whether `gemm` 0.19 takes its small-size branch for an `m x n` destination: both sides at most
/// 64. That branch blocks the inner dimension into pieces of 512 and a remainder; otherwise the
/// pieces are balanced (`gemm_common::cache::kernel_params`: 576 is 288 + 288 here). Within a
/// piece each element is one chain of multiply-adds, and the pieces are added in order, so a
/// product's bits depend on its inner dimension and on this branch alone (one exception: a
/// product of at most 256 outputs whose operands are both contiguous along the inner dimension
/// would be summed as dot products with a horizontal reduction; [`Chains`] sums those here, in
/// these pieces). The `gemm` version is pinned by Cargo.lock; `conv`'s grouped-products test and the
/// direct kernels' tests would see a change.
pub(crate) fn small_branch(m: usize, n: usize) -> bool {
    m <= 64 && n <= 64
}

/// The inner-dimension piece [`small_branch`] uses.
pub(crate) const SMALL_KC: usize = 512;

/// The inner-dimension pieces' length for an `m x n` product of inner dimension `k` (the last
/// piece may be shorter): [`SMALL_KC`] in the small-size branch, otherwise `k` cut into
/// `ceil(k / 512)` pieces of equal length rounded up: `kernel_params`' k-block is 512 on the L1
/// caches of current x86-64 CPUs (48 KiB 12-way, 32 KiB 8-way; it is at least 512, and only an
/// L1 of 16 or more ways would raise it). The kernels that rely on this are compared with `gemm`
/// bit for bit by the tests, so a host where it differs would show there.
pub(crate) fn k_piece(m: usize, n: usize, k: usize) -> usize {
    if small_branch(m, n) {
        SMALL_KC
    } else {
        k.div_ceil(k.div_ceil(512).max(1)).max(1)
    }
}

impl Gemm<'_> {
    /// [`Gemm::run`] as consecutive products over pieces of `kc` of the inner dimension (the
    /// first adds to `dst` when `accumulate`, the others always): the bits of a product whose own
    /// blocking cuts the inner dimension at the same places. With `kc >= k`, [`Gemm::run`].
    pub fn run_k_pieces(&self, dst: &mut [f32], dl: Layout, par: Par, kc: usize) {
        let Gemm { k, lhs, rhs, accumulate, .. } = *self;
        if kc == 0 || kc >= k {
            return self.run(dst, dl, par);
        }
        let mut k0 = 0;
        while k0 < k {
            let kp = kc.min(k - k0);
            let piece = Gemm {
                k: kp,
                lhs: Operand { data: &lhs.data[k0 * lhs.layout.cs..], layout: lhs.layout },
                rhs: Operand { data: &rhs.data[k0 * rhs.layout.rs..], layout: rhs.layout },
                accumulate: accumulate || k0 > 0,
                ..*self
            };
            piece.run(dst, dl, par);
            k0 += kp;
        }
    }
}

/// Multiply-accumulates per task in [`Gemm::run_split`] (at most; the task count is the smallest
/// power of two that gets there, capped at 64).
const TASK_MACS: usize = 16 << 20;

/// A raw output pointer that rayon tasks may share: each task writes a disjoint block.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used by `Gemm::run_split`, whose tasks write disjoint row or column blocks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method, so closures capture the whole (Send) wrapper rather than the raw
    /// field, as edition-2021 closures would.
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Gemm<'_> {
    /// [`Gemm::run`] for a dense row-major `dst` (`m x n`), split into blocks of rows (when
    /// `m >= n`) or columns that run as rayon tasks, each a single-threaded `gemm` call. The
    /// split follows the larger output dimension so the operand every task re-packs is the
    /// smaller one.
    ///
    /// Why not `gemm`'s own threading: for the small products of an MLP (LeNet-300-100 at batch
    /// 128: M = 128, N <= 784, K <= 784) its per-call thread hand-off costs more than it saves; a
    /// whole LeNet step on one thread with sequential gemm calls was faster (47k images/s) than
    /// on two with `gemm`'s threading (41k). The blocks depend only on the shape, so results are
    /// bit-identical for any thread count.
    pub fn run_split(&self, dst: &mut [f32]) {
        use rayon::prelude::*;
        let Gemm { m, n, k, lhs, rhs, accumulate } = *self;
        let (ll, rl) = (lhs.layout, rhs.layout);
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
            return self.run(dst, dl, Par::Seq);
        }
        dl.check(m, n, dst.len(), "dst");
        ll.check(m, k, lhs.data.len(), "lhs");
        rl.check(k, n, rhs.data.len(), "rhs");
        let out = SendPtr(dst.as_mut_ptr());
        (0..tasks).into_par_iter().for_each(|t| {
            let s0 = t * block;
            let s1 = (s0 + block).min(len);
            let (bm, bn, d_off, l_off, r_off) = if rows {
                (s1 - s0, n, s0 * n, s0 * ll.rs, 0)
            } else {
                (m, s1 - s0, s0, 0, s0 * rl.cs)
            };
            // SAFETY: the block lies inside `dst`, `lhs` and `rhs` (their full extents were
            // checked above); blocks of different tasks are disjoint rows or columns of `dst`, so
            // no two tasks write the same element, and `dst` is exclusively borrowed for the
            // whole call.
            unsafe {
                let (d, l, r) = (
                    out.get().add(d_off),
                    lhs.data.as_ptr().add(l_off),
                    rhs.data.as_ptr().add(r_off),
                );
                raw(bm, bn, k, d, dl, accumulate, l, ll, r, rl, gemm::Parallelism::None)
            }
        });
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)`, all three row-major (`lhs` with row
/// stride `lrs`, `rhs` and `dst` dense), with `gemm`'s bits but without its packing, where
/// [`Panel::applies`]: each pass keeps R rows x 16 NV columns of the result in AVX-512 registers,
/// loads NV vectors of an `rhs` row and broadcasts R elements of an `lhs` column per step of the
/// inner dimension. Each element is one chain of fused multiply-adds from +0.0 over each piece
/// of [`k_piece`] in order, the pieces added to the destination in order (the first overwrites
/// it unless `accumulate`): what `gemm`'s packed path computes (compared bit for bit by the
/// tests). Written for the Winograd weight gradient's products (`dM V^T` per tile position,
/// inner dimension the tiles), where `gemm` needed both factors turned tile-major first and then
/// packed them again: with `dM` as it lies here only `V` is turned around. (Its transposes were
/// ~4.4% of a one-thread ResNet-20 training step, `perf`, 2026-12-08, AMD EPYC (Zen 4) with
/// AVX-512, 2 cores.) The Winograd forward's `U V` and input gradient's `U^T dM` run on it too,
/// where `gemm` would otherwise pack the wide `V` or `dM` once per product.
#[derive(Clone, Copy)]
pub(crate) struct Panel<'a> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// m x k, element (i, t) at `i * lrs + t`.
    pub lhs: &'a [f32],
    pub lrs: usize,
    /// k x n, element (t, j) at `t * n + j`.
    pub rhs: &'a [f32],
    pub accumulate: bool,
}

impl Panel<'_> {
    /// Whether the kernel takes an `m x n` result: AVX-512 in our AVX2 build (`build`), `n` a
    /// multiple of 16 and `m` of the rows a pass keeps.
    pub(crate) fn applies(build: crate::cpu::Build, m: usize, n: usize) -> bool {
        build != crate::cpu::Build::Baseline
            && super::direct::Isa::detected() == Some(super::direct::Isa::Avx512)
            && n > 0
            && n.is_multiple_of(16)
            && m > 0
            && m.is_multiple_of(Self::rows(n))
    }

    /// Vectors of a pass's result row, and its rows: 16 accumulators either way.
    fn vectors(n: usize) -> usize {
        if n.is_multiple_of(64) {
            4
        } else if n.is_multiple_of(32) {
            2
        } else {
            1
        }
    }
    fn rows(n: usize) -> usize {
        16 / Self::vectors(n)
    }

    /// Runs the product into `dst` (`m * n` floats; read only when `accumulate`). Panics where
    /// [`Panel::applies`] does not hold or an operand is too short.
    pub(crate) fn run_uninit(&self, dst: &mut [MaybeUninit<f32>]) {
        assert!(!self.accumulate, "Panel: cannot accumulate into uninitialised memory");
        self.check(dst.len());
        // SAFETY: the CPU has AVX-512 (`applies`); the operands' extents were checked above, and
        // without `accumulate` the kernel writes `dst` without reading it.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            self.dispatch(dst.as_mut_ptr().cast())
        }
    }

    /// [`Panel::run_uninit`] into initialised memory, where `accumulate` may be set.
    pub(crate) fn run(&self, dst: &mut [f32]) {
        self.check(dst.len());
        // SAFETY: as in `run_uninit`; `dst` is initialised, so it may be read.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            self.dispatch(dst.as_mut_ptr())
        }
    }

    /// Panics unless the kernel applies here and the operands and a destination of `len` floats
    /// hold the product's extents.
    fn check(&self, len: usize) {
        let Panel { m, n, k, lhs, lrs, rhs, .. } = *self;
        assert!(Self::applies(crate::cpu::Build::Avx2, m, n), "Panel: {m} x {n} does not apply");
        let lhs_fits = k == 0 || lhs.len() >= (m - 1) * lrs + k;
        assert!(len >= m * n && rhs.len() >= k * n && lhs_fits, "Panel: an operand is too short");
    }

    /// # Safety
    /// The CPU has AVX-512F; `dst` holds `m * n` floats (initialised where `accumulate`), the
    /// operands their extents.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dispatch(&self, dst: *mut f32) {
        // SAFETY: passed on.
        unsafe {
            match Self::vectors(self.n) {
                4 => panel_avx512::<4, 4>(self, dst),
                2 => panel_avx512::<2, 8>(self, dst),
                _ => panel_avx512::<1, 16>(self, dst),
            }
        }
    }
}

/// The kernel of [`Panel`]: NV vectors x R rows a pass.
///
/// # Safety
/// As [`Panel::dispatch`]; `n` a multiple of 16 NV and `m` of R.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn panel_avx512<const NV: usize, const R: usize>(p: &Panel<'_>, dst: *mut f32) {
    use std::arch::x86_64::*;
    let Panel { m, n, k, lhs, lrs, rhs, accumulate } = *p;
    let (lhs, rhs) = (lhs.as_ptr(), rhs.as_ptr());
    if k == 0 {
        if !accumulate {
            for i in 0..m * n {
                dst.add(i).write(0.0);
            }
        }
        return;
    }
    let kc = k_piece(m, n, k);
    let mut k0 = 0;
    while k0 < k {
        let kp = kc.min(k - k0);
        let add = accumulate || k0 > 0;
        for j0 in (0..n).step_by(16 * NV) {
            for i0 in (0..m).step_by(R) {
                let mut acc = [[_mm512_setzero_ps(); NV]; R];
                let a0 = lhs.add(i0 * lrs);
                for t in k0..k0 + kp {
                    let b: [__m512; NV] =
                        std::array::from_fn(|v| _mm512_loadu_ps(rhs.add(t * n + j0 + 16 * v)));
                    for (r, row) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_ps(*a0.add(r * lrs + t));
                        for (c, bv) in row.iter_mut().zip(b) {
                            *c = _mm512_fmadd_ps(a, bv, *c);
                        }
                    }
                }
                for (r, row) in acc.iter().enumerate() {
                    for (v, c) in row.iter().enumerate() {
                        let d = dst.add((i0 + r) * n + j0 + 16 * v);
                        let out = if add { _mm512_add_ps(_mm512_loadu_ps(d), *c) } else { *c };
                        _mm512_storeu_ps(d, out);
                    }
                }
            }
        }
        k0 += kp;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writing a product into uninitialised memory gives the bits of adding it to zeros, also
    /// where every product is -0.0 (0 times a negative weight: a sum that started from the first
    /// product instead of +0.0 would be -0.0 there, and +0.0 after adding to a zero), in
    /// `gemm`'s small-size branch and outside it, with its inner dimension in one block and in
    /// several.
    #[test]
    fn writing_uninitialised_equals_adding_to_zeros() {
        for (m, n, k) in [(16, 64, 9), (64, 64, 576), (64, 1024, 576), (5, 300, 1200), (1, 1, 0)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| -0.5 - ((i * 37) % 101) as f32 / 50.0).collect();
            // The first columns read zeros only: their sums are of -0.0 products.
            let rhs: Vec<f32> = (0..k * n)
                .map(|i| if i % n < 3 { 0.0 } else { ((i * 53) % 97) as f32 / 40.0 - 1.2 })
                .collect();
            let g = |accumulate| Gemm {
                m,
                n,
                k,
                lhs: Operand::row_major(&lhs, k),
                rhs: Operand::row_major(&rhs, n),
                accumulate,
            };
            let mut added = vec![0.0f32; m * n];
            g(true).run(&mut added, Layout::row_major(n), Par::Seq);
            let mut written = vec![MaybeUninit::<f32>::uninit(); m * n];
            g(false).run_uninit(&mut written, Layout::row_major(n), Par::Seq);
            // SAFETY: `run_uninit` wrote every element.
            let written: Vec<f32> = written.iter().map(|v| unsafe { v.assume_init() }).collect();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&written), bits(&added), "{m}x{n}x{k}");
            if k > 0 {
                assert!(added.iter().all(|v| v.is_finite()) && added[0].to_bits() == 0);
            }
        }
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;

    /// Each element of `lhs * rhs` summed the way `gemm`'s packed path sums it, computed
    /// independently here: one chain of fused multiply-adds from +0.0 over each piece of
    /// [`k_piece`] of the inner dimension, the pieces added to the destination in order. The
    /// fused multiply-add is IEEE's (one rounding), so this does not depend on the CPU.
    fn chain_reference(
        (m, n, k): (usize, usize, usize),
        lhs: &[f32],
        rhs_t: &[f32],
        dst: &mut [f32],
        accumulate: bool,
    ) {
        let kc = k_piece(m, n, k);
        for i in 0..m {
            for j in 0..n {
                let mut out = dst[i * n + j];
                for (p, k0) in (0..k).step_by(kc).enumerate() {
                    let mut acc = 0.0f32;
                    for t in k0..(k0 + kc).min(k) {
                        acc = lhs[i * k + t].mul_add(rhs_t[j * k + t], acc);
                    }
                    out = if accumulate || p > 0 { out + acc } else { acc };
                }
                dst[i * n + j] = out;
            }
        }
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        // Magnitudes spread over 2^-8..2^8 so that the order of the additions shows in the bits.
        (0..len)
            .map(|i| {
                let h = (i * 2654435761 + seed * 40503) % 1000003;
                let sign = if h.is_multiple_of(3) { -1.0 } else { 1.0 };
                sign * (1.0 + (h % 1009) as f32 / 1009.0) * 2f32.powi((h % 17) as i32 - 8)
            })
            .collect()
    }

    /// Products whose operands both run along the inner dimension (the layout of a conv's weight
    /// gradient, dy times the transposed im2col matrix) and whose result has at most 256
    /// elements or is one row or column: `gemm` 0.19 would sum them as dot products reduced
    /// across 8 or 16 lanes, depending on the CPU. They must give the bits of the in-order
    /// chains, and of `gemm`'s packed path on the same product with copied operands.
    #[test]
    fn products_along_the_inner_dimension_sum_in_chains() {
        let shapes = [
            (16, 9, 64), // digits' first conv, weight gradient of one sample (1 -> 16 channels)
            (8, 9, 512), // a stem of 8 channels on 8x8 planes, a group of 8 samples
            (16, 8, 16), // a 1x1 shortcut 8 -> 16 channels on 4x4 planes
            (16, 16, 600),
            (3, 5, 1100), // three pieces of the inner dimension
            (1, 300, 50),
            (300, 1, 50),
            (1, 1, 7),
            (7, 3, 2),
            (4, 4, 1),
        ];
        for (m, n, k) in shapes {
            let (lhs, rhs_t, start) = (values(m * k, 1), values(n * k, 2), values(m * n, 3));
            for accumulate in [false, true] {
                let mut want = start.clone();
                chain_reference((m, n, k), &lhs, &rhs_t, &mut want, accumulate);
                let product = |lhs: Operand, rhs: Operand| {
                    let mut dst = start.clone();
                    Gemm { m, n, k, lhs, rhs, accumulate }.run(
                        &mut dst,
                        Layout::row_major(n),
                        Par::Seq,
                    );
                    dst.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                };
                let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                let got = product(Operand::row_major(&lhs, k), Operand::transposed(&rhs_t, k));
                assert_eq!(got, want, "{m}x{n}x{k}, accumulate {accumulate}");
                // The same product with lhs copied column-major and rhs row-major takes gemm's
                // packed path (not for one row or column, or an inner dimension of 1 or 2,
                // which gemm hands to its vector-matrix loops).
                if m > 1 && n > 1 && k > 2 {
                    let lhs_cm: Vec<f32> = (0..m * k).map(|e| lhs[(e % m) * k + e / m]).collect();
                    let rhs_rm: Vec<f32> = (0..k * n).map(|e| rhs_t[(e % n) * k + e / n]).collect();
                    let packed =
                        product(Operand::transposed(&lhs_cm, m), Operand::row_major(&rhs_rm, n));
                    assert_eq!(packed, want, "packed {m}x{n}x{k}, {accumulate}");
                }
            }
        }
    }

    /// [`Panel`] (row-major operands, no packing) gives the in-order chains' bits and `gemm`'s
    /// packed path's, on the Winograd weight gradient's shapes (32 and 64 channels, 256 tiles a
    /// group, a shorter last group), shapes with 1 and 4 vectors a row, an inner dimension in two
    /// pieces of the small-size branch and one outside it, with and without `accumulate`,
    /// written into uninitialised memory and into a row stride wider than the inner dimension;
    /// where AVX-512 is missing there is nothing to compare.
    #[test]
    fn panels_sum_as_gemm_does() {
        use crate::cpu::Build;
        if !Panel::applies(Build::Avx2, 16, 16) {
            eprintln!("no AVX-512: Panel never runs here");
            return;
        }
        // (m, n, k, lhs row stride)
        let shapes = [
            (32, 32, 256, 256),
            (64, 64, 256, 256),
            (32, 32, 80, 96),
            (64, 32, 256, 256),
            (16, 16, 1, 1),
            (16, 48, 1100, 1100),
            (96, 128, 700, 700),
            (4, 64, 5, 9),
        ];
        for (m, n, k, lrs) in shapes {
            assert!(Panel::applies(Build::Avx2, m, n), "{m} x {n}");
            let (lhs, rhs, start) = (values(m * lrs, 4), values(k * n, 5), values(m * n, 6));
            let lhs_dense: Vec<f32> = (0..m * k).map(|e| lhs[e / k * lrs + e % k]).collect();
            let rhs_t: Vec<f32> = (0..n * k).map(|e| rhs[(e % k) * n + e / k]).collect();
            for accumulate in [false, true] {
                let mut want = start.clone();
                chain_reference((m, n, k), &lhs_dense, &rhs_t, &mut want, accumulate);
                let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
                let bits = |d: &[f32]| d.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let panel = Panel { m, n, k, lhs: &lhs, lrs, rhs: &rhs, accumulate };
                let mut got = start.clone();
                panel.run(&mut got);
                assert_eq!(bits(&got), want, "{m}x{n}x{k}, accumulate {accumulate}");
                if !accumulate {
                    let mut spare = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
                    panel.run_uninit(&mut spare);
                    // SAFETY: `run_uninit` wrote every element (and they started initialised).
                    let got: Vec<f32> = spare.iter().map(|x| unsafe { x.assume_init() }).collect();
                    assert_eq!(bits(&got), want, "uninit {m}x{n}x{k}");
                }
                let mut packed = start.clone();
                let lhs_cm: Vec<f32> = (0..m * k).map(|e| lhs_dense[(e % m) * k + e / m]).collect();
                Gemm {
                    m,
                    n,
                    k,
                    lhs: Operand::transposed(&lhs_cm, m),
                    rhs: Operand::row_major(&rhs, n),
                    accumulate,
                }
                .run(&mut packed, Layout::row_major(n), Par::Seq);
                assert_eq!(bits(&packed), want, "gemm {m}x{n}x{k}, accumulate {accumulate}");
            }
        }
        // Where it does not apply.
        assert!(!Panel::applies(Build::Avx2, 32, 24) && !Panel::applies(Build::Avx2, 10, 64));
        assert!(!Panel::applies(Build::Baseline, 32, 32));
    }
}
