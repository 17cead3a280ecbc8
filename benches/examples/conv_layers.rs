//! Times each convolution geometry of CIFAR ResNet-20 on its own at batch 128, through the same
//! `ops::conv2d` the tape records (so with whichever algorithm the geometry takes: direct kernels,
//! Winograd, or im2col + `gemm`): the forward alone, and forward + backward with the input
//! gradient, best of N runs. Run with `RAYON_NUM_THREADS=1` for one-thread figures:
//!
//! ```sh
//! RAYON_NUM_THREADS=1 cargo run --release -p lmc-benches --example conv_layers [-- ROW [RUNS]]
//! ```
//!
//! `ROW` (0-6) runs one geometry alone (for `perf record`); `RUNS` defaults to 7. Each time
//! includes the op's own overheads (the input's copy onto the tape, the output's allocation, the
//! sum whose gradient seeds the backward pass), as a training step pays some of them too.

use dfdx::prelude::*;
use lmc_train::ops::{self, Conv2dCfg, T1, T4};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// (input channels, output channels, input side, kernel, stride, convs of it in one step).
const RESNET20: [(usize, usize, usize, usize, usize, usize); 7] = [
    (16, 16, 32, 3, 1, 6),
    (16, 32, 32, 3, 2, 1),
    (16, 32, 32, 1, 2, 1),
    (32, 32, 16, 3, 1, 5),
    (32, 64, 16, 3, 2, 1),
    (32, 64, 16, 1, 2, 1),
    (64, 64, 8, 3, 1, 5),
];

fn values(len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|i| ((i * 104729 % 2001) as f32 / 1000.0 - 1.0) * scale).collect()
}

fn main() {
    lmc_train::cpu::keep_freed_memory();
    let mut args = std::env::args().skip(1);
    let bad = |what: &str, a: &str| -> ! {
        eprintln!("error: {what}, got {a:?} (usage: conv_layers [ROW [RUNS]])");
        std::process::exit(2)
    };
    let only = args.next().map(|a| match a.parse::<usize>() {
        Ok(r) if r < RESNET20.len() => r,
        _ => bad("ROW must be a geometry's row, 0 to 6", &a),
    });
    let runs = args.next().map_or(7, |a| match a.parse::<usize>() {
        Ok(r) if r > 0 => r,
        _ => bad("RUNS must be a positive whole number", &a),
    });
    let dev = Cpu::default();
    let n = 128;
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all cores".into());
    println!("batch {n}, {threads} threads, best of {runs}");
    let mut total = 0.0;
    for (row, (cin, cout, side, k, s, count)) in RESNET20.into_iter().enumerate() {
        if only.is_some_and(|o| o != row) {
            continue;
        }
        let x: T4<NoneTape> =
            dev.tensor_from_vec(values(n * cin * side * side, 1.0), (n, cin, side, side));
        let w: T1 = dev.tensor_from_vec(values(cout * cin * k * k, 0.1), (cout * cin * k * k,));
        let cfg = Conv2dCfg { out_channels: cout, kernel: k, padding: k / 2, stride: s };
        let (mut fwd, mut both) = (f64::MAX, f64::MAX);
        for _ in 0..runs {
            let t = Instant::now();
            std::hint::black_box(ops::conv2d(x.clone(), &w, None, cfg, false));
            fwd = fwd.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let y = ops::conv2d(x.clone().leaky_traced(), &w, None, cfg, true);
            std::hint::black_box(y.sum().backward());
            both = both.min(t.elapsed().as_secs_f64());
        }
        total += both * count as f64;
        println!(
            "{row}: {cin:>2} -> {cout:<2} {side}x{side} {k}x{k} stride {s}: forward {:6.2} ms, \
             forward + backward {:6.2} ms (x{count} in a step)",
            fwd * 1e3,
            both * 1e3
        );
    }
    if only.is_none() {
        println!("a step's convolutions (the stem left out): {:.1} ms", total * 1e3);
    }
}
