//! The fused multiply-add peak of one core: 24 independent chains of vector FMAs (AVX-512 where
//! the CPU has it, else AVX2 + FMA), the ceiling against which the README's "% of peak" figures
//! for the direct convolution kernels are taken.
//!
//! ```sh
//! cargo run --release -p lmc-benches --example fma_peak
//! ```

use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chains_avx512(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999));
    let mut acc = [_mm512_setzero_ps(); 24];
    for _ in 0..iters {
        // An index loop: written with `iter_mut` the accumulators went through memory (half
        // the rate, measured).
        #[allow(clippy::needless_range_loop)]
        for k in 0..24 {
            acc[k] = _mm512_fmadd_ps(a, acc[k], b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for v in acc {
        s = _mm512_add_ps(s, v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chains_avx2(iters: usize) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999));
    let mut acc = [_mm256_setzero_ps(); 12];
    for _ in 0..iters {
        #[allow(clippy::needless_range_loop)]
        for k in 0..12 {
            acc[k] = _mm256_fmadd_ps(a, acc[k], b);
        }
    }
    let mut out = [0.0f32; 8];
    acc.iter()
        .map(|v| {
            _mm256_storeu_ps(out.as_mut_ptr(), *v);
            out.iter().sum::<f32>()
        })
        .sum()
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let iters = 20_000_000;
        // (name, floats per chain step, chains)
        let (name, flops): (&str, f64) = if has!("avx512f") {
            ("AVX-512", (iters * 24 * 16 * 2) as f64)
        } else if has!("avx2") && has!("fma") {
            ("AVX2 + FMA", (iters * 12 * 8 * 2) as f64)
        } else {
            println!("no FMA on this CPU");
            return;
        };
        for _ in 0..3 {
            let t = Instant::now();
            // SAFETY: the CPU has the instructions each function is compiled for (checked above).
            let r = unsafe {
                if has!("avx512f") {
                    chains_avx512(iters)
                } else {
                    chains_avx2(iters)
                }
            };
            let dt = t.elapsed().as_secs_f64();
            println!("{name}: {:.1} GFLOP/s one core ({r:.3e})", flops / dt / 1e9);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("x86-64 only");
}
