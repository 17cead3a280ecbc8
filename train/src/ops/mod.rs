//! Differentiable ops recorded on dfdx's tape (dfdx 0.13 gates conv/pool behind `nightly`, which no
//! longer compiles, and has no instance norm; its public tape API lets us add them).
//!
//! INTERFACE CONTRACT (the model and later stages rely on it):
//! - Activations are contiguous row-major dfdx tensors with dynamic shapes: [`T4`] = (N, C, H, W),
//!   [`T2`] = (N, F). Parameters are flat 1-D tensors ([`T1`], no tape) laid out like PyTorch's:
//!   linear weight (out, in), conv weight (cout, cin, k, k).
//! - The traced activation comes first; parameter gradients are *added* into
//!   `grads.get_or_alloc_mut(&param)`, so a caller reads them after `backward()`.
//! - Results are bit-identical for any rayon thread count (batch reductions use fixed groups).
//! - Every op reads its input with one `memcpy` (`Tensor::copy_into`: dfdx 0.13 keeps its
//!   buffer-access trait crate-private) after `contiguous()` (free for a contiguous tensor, a
//!   strided copy otherwise), and builds its output with `tensor_from_vec` (no copy). conv2d and
//!   batch norm also expose their forward and backward on plain slices, for paths that keep
//!   activations out of tensors (the ResNets' `embed_eval` / `embed_train`).
//! - Backward consumes the gradient of each op's *output* (it is moved out and freed early, left
//!   empty in `Gradients`): read gradients of parameters and inputs, not of intermediate outputs.
//! - `relu` and `mse_loss` share their names with dfdx's prelude: import them by name
//!   (`use lmc_train::ops::{relu, ...}`; an explicit import wins over `use dfdx::prelude::*`).
//! - conv2d keeps per-thread im2col scratch memory (the largest size seen) between calls.
//! - Two branches of one input (a residual block) join with dfdx's `+`, or inside
//!   `batch_norm_relu_train` / `_eval` (`relu(norm(x) + residual)`, bit-identical to the
//!   separate ops): one branch runs on the input with its tape, the other from
//!   `x.retaped::<Tp>()` (an empty tape of the same kind) or is the tape-free input itself
//!   (identity shortcut); the join merges the tapes and its backward adds into the input's
//!   gradient by id (`residual_block_gradients` in `tests/ops.rs` checks it against central
//!   differences).

use dfdx::prelude::{Cpu, Tensor};

/// A parameter: a flat 1-D tensor without a tape.
pub type T1 = Tensor<(usize,), f32, Cpu>;
/// A 2-D activation (N, F) on tape `Tp`.
pub type T2<Tp> = Tensor<(usize, usize), f32, Cpu, Tp>;
/// A 4-D activation (N, C, H, W) on tape `Tp`.
pub type T4<Tp> = Tensor<(usize, usize, usize, usize), f32, Cpu, Tp>;

/// `std::mem::take`s the gradient of `$ghost` out of `$grads` (allocating zeros if absent), as a
/// plain `Vec<f32>`; leaves an empty vector behind, so the memory is freed early.
macro_rules! take_grad {
    ($grads:expr, $ghost:expr) => {
        std::mem::take(&mut **$grads.get_or_alloc_mut(&$ghost)?)
    };
}

mod act;
pub(crate) mod batch_norm;
mod block;
mod conv;
pub(crate) mod direct;
pub(crate) mod gemm;
mod linear;
mod loss;
mod norm;
mod pool;
pub(crate) mod winograd;

pub use act::{flatten, relu, relu2};
pub use batch_norm::{
    batch_norm_eval, batch_norm_relu_eval, batch_norm_relu_train, batch_norm_train,
    check_batch_norm_train, BatchStats, RunningStats, BN_EPS, BN_MOMENTUM,
};
pub use block::norm_relu_pool;
#[cfg(test)]
pub(crate) use block::norm_relu_pool_with;
#[cfg(test)]
pub(crate) use conv::conv2d_with;
pub(crate) use conv::{
    add_weight_grad as conv2d_add_weight_grad, backward_slices as conv2d_backward_slices,
    col2im_add, forward_slices as conv2d_slices, forward_slices_saving as conv2d_slices_saving,
    geometry as conv2d_geometry, im2col, runs_epilogue as conv2d_runs_epilogue,
    takes_mapped_input as conv2d_takes_mapped_input, Dx as ConvDx, Epilogue as ConvEpilogue,
    Geom as ConvGeom, Saved as ConvSaved,
};
pub use conv::{conv2d, Conv2dCfg};
pub use linear::linear;
pub(crate) use loss::softmax_xent_rows;
pub use loss::{accuracy_counts, cross_entropy, mse_loss};
pub(crate) use norm::add_channel_totals;
pub use norm::instance_norm;
pub use pool::{avg_pool2d, global_avg_pool};

use dfdx::prelude::{HasShape, Shape};

/// Samples per task in batch-parallel loops whose results are reduced over the batch (conv
/// weight gradients): a constant, so the reduction order never depends on the thread count.
pub(crate) const BATCH_CHUNK: usize = 8;

/// The tensor's elements in row-major order (one `memcpy`; the tensor must be contiguous).
pub(crate) fn read<S: Shape, Tp>(t: &Tensor<S, f32, Cpu, Tp>) -> Vec<f32> {
    let mut v = vec![0.0f32; t.shape().num_elements()];
    t.copy_into(&mut v);
    v
}

/// Elements per parallel task in elementwise loops.
pub(crate) const ELEM_CHUNK: usize = 1 << 15;

/// Sum of `v` in a fixed order (16 interleaved f32 partial sums, then combined pairwise), so
/// the compiler can vectorise it and the result never depends on threads.
#[inline(always)]
pub(crate) fn sum_f32(v: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for j in 0..16 {
            acc[j] += c[j];
        }
    }
    for (j, x) in it.remainder().iter().enumerate() {
        acc[j] += x;
    }
    combine16(acc)
}

/// Combines 16 partial sums pairwise in a fixed order.
#[inline(always)]
pub(crate) fn combine16<T: Copy + std::ops::Add<Output = T>>(mut a: [T; 16]) -> T {
    let mut w = 8;
    while w > 0 {
        for j in 0..w {
            a[j] = a[j] + a[j + w];
        }
        w /= 2;
    }
    a[0]
}

/// Sum of `v` in f64, in a fixed order (see [`sum_f32`]).
#[inline(always)]
pub(crate) fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0.0f64; 16];
    let mut it = v.chunks_exact(16);
    for c in &mut it {
        for j in 0..16 {
            acc[j] += c[j] as f64;
        }
    }
    for (j, x) in it.remainder().iter().enumerate() {
        acc[j] += *x as f64;
    }
    combine16(acc)
}

/// Whether batch-parallel loops over `tasks` tasks should run as rayon tasks (each calling
/// `gemm` single-threaded) rather than one after another (each `gemm` using the whole pool).
/// Either way the arithmetic is the same, so results do not depend on the choice.
pub(crate) fn tasks_in_parallel(tasks: usize) -> bool {
    let t = rayon::current_num_threads();
    t > 1 && tasks >= t
}

thread_local! {
    /// Per-thread scratch memory for im2col buffers, reused across calls (so rayon workers do
    /// not allocate and page-fault megabytes per task). Holds the largest size asked for.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with `len` floats of this thread's scratch memory (arbitrary contents: `f` must
/// overwrite what it reads). A nested call on the same thread (possible when a rayon worker
/// steals a job while waiting) gets a fresh allocation instead.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < len {
                v.resize(len, 0.0);
            }
            f(&mut v[..len])
        }
        Err(_) => f(&mut vec![0.0f32; len]),
    })
}
