//! The one CPU-feature dispatch for our own hot loops (im2col/col2im and the per-sample conv
//! work, the fused norm/ReLU/pool planes, the sparse first layer's kernels and its transposes,
//! the SGD update). `gemm` dispatches its own kernels.
//!
//! Why: the crate builds for baseline x86-64, so these loops vectorise 4 floats wide (SSE). A
//! kernel run through [`Build::run`] (or [`run_kernel!`]) is compiled a second time with AVX2
//! enabled, 8 wide, and the build is picked at run time. Both builds do the same IEEE operations
//! in the same order (Rust never fuses a multiply and an add, nor reorders a float sum, on its
//! own), so results are identical bit for bit; the tests in `cpu/tests.rs` run every dispatched
//! kernel both ways and compare the bits.
//!
//! The choice is made once per process ([`Build::selected`]): AVX2 where the CPU has it, unless
//! the environment variable `LMC_BASELINE_KERNELS=1` forces the baseline build (read once, at the
//! first dispatched call; useful to rule the AVX2 build out when chasing a difference, or to
//! time the baseline). Every dispatched kernel can also be called with an explicit [`Build`].

use std::sync::OnceLock;

mod awake;
mod transpose;
pub use awake::with_workers_awake;
pub(crate) use transpose::transpose;

/// Which compilation of a dispatched kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Build {
    /// As the crate is built (baseline x86-64: SSE2).
    Baseline,
    /// Compiled with AVX2 enabled (x86-64 CPUs that have it).
    Avx2,
}

/// The process's build ([`Build::selected`]), so buffers that carry a build start with it.
impl Default for Build {
    fn default() -> Self {
        Build::selected()
    }
}

/// The environment variable that forces [`Build::Baseline`] when set to `1`.
pub const BASELINE_ENV: &str = "LMC_BASELINE_KERNELS";

impl Build {
    /// The build this process runs, decided at the first call: [`Build::Avx2`] where the CPU has
    /// AVX2, unless `LMC_BASELINE_KERNELS=1`.
    pub fn selected() -> Build {
        static SELECTED: OnceLock<Build> = OnceLock::new();
        *SELECTED.get_or_init(|| {
            Build::choose(std::env::var(BASELINE_ENV).ok().as_deref(), Build::Avx2.available())
        })
    }

    /// The choice for an environment value of [`BASELINE_ENV`] and whether the CPU has AVX2.
    pub fn choose(env: Option<&str>, has_avx2: bool) -> Build {
        if env.map(str::trim) == Some("1") || !has_avx2 {
            Build::Baseline
        } else {
            Build::Avx2
        }
    }

    /// Whether this CPU can run the build.
    pub fn available(self) -> bool {
        match self {
            Build::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            Build::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            Build::Avx2 => false,
        }
    }

    /// Runs `f` compiled for this build: `f` is inlined into the AVX2 function, so its loops (and
    /// the `#[inline(always)]` functions it calls) are compiled 8 wide. Mark a large closure
    /// `#[inline(always)]` (`build.run(#[inline(always)] || ...)`): LLVM otherwise declines to
    /// inline it, and its baseline compilation then runs in both builds (same bits, 4 wide;
    /// disassembly showed that for conv2d's per-sample work and norm_relu_pool's planes).
    /// Panics for a build the CPU cannot run.
    #[inline(always)]
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        match self {
            Build::Baseline => f(),
            Build::Avx2 => {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx2")]
                    unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
                        f()
                    }
                    assert!(self.available(), "the AVX2 build was asked for on a CPU without AVX2");
                    // SAFETY: the CPU supports AVX2 (asserted just above).
                    unsafe { avx2(f) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                panic!("the AVX2 build was asked for on a CPU without AVX2")
            }
        }
    }
}

/// `run_kernel!(build, kernel(arg: Type, ...))` calls the `#[inline(always)]` function `kernel`
/// compiled for `build` (a [`Build`]): like [`Build::run`], but the kernel is inlined into a
/// function defined here rather than through a closure, which LLVM may decline to inline when
/// the kernel is large. Panics for a build the CPU cannot run.
macro_rules! run_kernel {
    ($build:expr, $kernel:ident($($arg:ident: $ty:ty),* $(,)?)) => {{
        match $build {
            $crate::cpu::Build::Baseline => $kernel($($arg),*),
            $crate::cpu::Build::Avx2 => {
                #[cfg(target_arch = "x86_64")]
                {
                    // As many arguments as the kernel has.
                    #[allow(clippy::too_many_arguments)]
                    #[target_feature(enable = "avx2")]
                    unsafe fn avx2($($arg: $ty),*) {
                        $kernel($($arg),*)
                    }
                    assert!(
                        $crate::cpu::Build::Avx2.available(),
                        "the AVX2 build was asked for on a CPU without AVX2"
                    );
                    // SAFETY: the CPU supports AVX2 (asserted just above).
                    unsafe { avx2($($arg),*) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                panic!("the AVX2 build was asked for on a CPU without AVX2")
            }
        }
    }};
}
pub(crate) use run_kernel;

/// Keeps freed memory mapped. mimalloc returns freed pages to the OS after 10 ms by default, and
/// every training step then page-faults its activation buffers back in (the kernel zeroing them
/// was 15% of a ConvNet-3 step; 37,000 faults vs 400 over a benchmark run).
pub fn keep_freed_memory() {
    // mi_option_purge_delay is 15 in mimalloc v2's `mi_option_t` (libmimalloc-sys exports no
    // constant for it); -1 disables purging.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a plain integer option; meant for start-up, before any threads exist (the CLI's `main`,
    // a benchmark's set-up), and harmless where mimalloc is not the global allocator.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests;
