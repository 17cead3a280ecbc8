//! Criterion benches of the hot ops (forward and forward+backward) and of a full training step,
//! at ConvNet-3 / LeNet shapes, so that a regression shows up. `cargo bench -p lmc-benches`.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use dfdx::prelude::*;
use lmc_train::bench::{workloads, Prepared};
use lmc_train::ops::{self, Conv2dCfg, T1, T4};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn param(dev: &Cpu, n: usize, scale: f32) -> T1 {
    dev.tensor_from_vec(
        (0..n).map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * scale).collect(),
        (n,),
    )
}

fn input(dev: &Cpu, n: usize, c: usize, h: usize) -> T4<NoneTape> {
    let len = n * c * h * h;
    dev.tensor_from_vec(
        (0..len).map(|i| ((i * 104729 % 2001) as f32 / 1000.0) - 1.0).collect(),
        (n, c, h, h),
    )
}

fn sum_backward<S: Shape>(y: Tensor<S, f32, Cpu, OwnedTape<f32, Cpu>>) {
    let g = y.sum().backward();
    std::hint::black_box(g);
}

fn conv(c: &mut Criterion) {
    let dev = Cpu::default();
    let mut g = c.benchmark_group("conv2d");
    // (batch, cin, hw): ConvNet-3 layer 1 and layer 2 on CIFAR at batch 128.
    for (n, cin, hw) in [(128usize, 3usize, 32usize), (128, 128, 16)] {
        let x = input(&dev, n, cin, hw);
        let w = param(&dev, 128 * cin * 9, 0.1);
        let b = param(&dev, 128, 0.1);
        let cfg = Conv2dCfg { out_channels: 128, kernel: 3, padding: 1, stride: 1 };
        g.throughput(Throughput::Elements(n as u64));
        let id = format!("{cin}x{hw}x{hw}");
        g.bench_with_input(BenchmarkId::new("forward", &id), &(), |bch, _| {
            bch.iter(|| std::hint::black_box(ops::conv2d(x.clone(), &w, Some(&b), cfg, false)))
        });
        g.bench_with_input(BenchmarkId::new("forward_backward", &id), &(), |bch, _| {
            bch.iter(|| {
                sum_backward(ops::conv2d(x.clone().leaky_traced(), &w, Some(&b), cfg, cin != 3))
            })
        });
    }
    g.finish();
}

fn memory_bound(c: &mut Criterion) {
    let dev = Cpu::default();
    let x = input(&dev, 128, 128, 32);
    let gamma = param(&dev, 128, 1.0);
    let beta = param(&dev, 128, 1.0);
    let mut g = c.benchmark_group("memory_bound_128x128x32x32");
    g.throughput(Throughput::Elements(128));
    g.bench_function("instance_norm_fwd_bwd", |b| {
        b.iter(|| sum_backward(ops::instance_norm(x.clone().leaky_traced(), &gamma, &beta, 1e-5)))
    });
    g.bench_function("relu_fwd_bwd", |b| {
        b.iter(|| sum_backward(ops::relu(x.clone().leaky_traced())))
    });
    g.bench_function("avg_pool_fwd_bwd", |b| {
        b.iter(|| sum_backward(ops::avg_pool2d(x.clone().leaky_traced(), 2)))
    });
    // The fused block tail the models use, against the three ops above composed.
    g.bench_function("norm_relu_pool_fused_fwd_bwd", |b| {
        b.iter(|| {
            sum_backward(ops::norm_relu_pool(
                x.clone().leaky_traced(),
                Some((&gamma, &beta)),
                1e-5,
                2,
            ))
        })
    });
    g.bench_function("norm_relu_pool_composed_fwd_bwd", |b| {
        b.iter(|| {
            sum_backward(ops::avg_pool2d(
                ops::relu(ops::instance_norm(x.clone().leaky_traced(), &gamma, &beta, 1e-5)),
                2,
            ))
        })
    });
    g.finish();
}

fn linear(c: &mut Criterion) {
    let dev = Cpu::default();
    let x: Tensor<(usize, usize), f32, Cpu> =
        dev.tensor_from_vec((0..128 * 784).map(|i| (i % 13) as f32 * 0.1).collect(), (128, 784));
    let w = param(&dev, 300 * 784, 0.05);
    let b = param(&dev, 300, 0.05);
    let mut g = c.benchmark_group("linear_128x784x300");
    g.bench_function("forward_backward_no_input_grad", |bch| {
        bch.iter(|| sum_backward(ops::linear(x.clone().leaky_traced(), &w, &b, 300, false)))
    });
    g.throughput(Throughput::Elements(128));
    g.bench_function("forward_backward", |bch| {
        bch.iter(|| sum_backward(ops::linear(x.clone().leaky_traced(), &w, &b, 300, true)))
    });
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    for w in workloads() {
        let mut p = Prepared::new(&w);
        g.throughput(Throughput::Elements(w.batch as u64));
        g.bench_function(w.name, |b| b.iter(|| std::hint::black_box(p.step())));
    }
    g.finish();
}

/// LeNet-300-100's gradient at batch 128 on real MNIST images (the 64 committed fixture images,
/// each twice): the graph-free MLP step as training runs it (`Auto`: the first layer from the
/// non-background inputs), the same step with a dense first layer, and the same computation on
/// dfdx's tape (the reference both are tested against).
fn mlp_gradient(c: &mut Criterion) {
    use lmc_train::data::{self, DatasetName};
    use lmc_train::fit::{loss_and_grad, loss_and_grad_on_tape, FirstLayer, GradBuffers};
    use lmc_train::model::{Model, ModelSpec};
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/fixtures");
    let ds = data::load(DatasetName::Mnist, Some(&fixtures)).expect("the MNIST fixture");
    let model = Model::new(&ModelSpec::Lenet300100, ds.train.shape, ds.classes).unwrap();
    let params = model.init(0);
    let idx: Vec<u32> = (0..128).map(|i| i % ds.train.len() as u32).collect();
    let mut batch = data::Batch::default();
    data::fill_batch(&ds.train, &ds.norm, &idx, None, &mut batch);
    let (x, labels) = (&batch.x, &batch.labels);
    let mut bufs = GradBuffers::new(&model);
    let mut g = c.benchmark_group("lenet_gradient_b128");
    g.throughput(Throughput::Elements(128));
    g.bench_function("mlp_step", |b| {
        b.iter(|| loss_and_grad(&model, &params, x, labels, &mut bufs))
    });
    bufs.first_layer = FirstLayer::Dense;
    g.bench_function("mlp_step_dense_first_layer", |b| {
        b.iter(|| loss_and_grad(&model, &params, x, labels, &mut bufs))
    });
    g.bench_function("tape", |b| {
        b.iter(|| loss_and_grad_on_tape(&model, &params, x, labels, &mut bufs))
    });
    g.finish();
    // Where the sparse first layer stops paying (fit::SPARSE_INPUT_MAX_DENSITY): Fashion-MNIST's
    // images are ~50% background, so `Auto` takes the dense path there; both, forced.
    let ds =
        data::load(DatasetName::FashionMnist, Some(&fixtures)).expect("the Fashion-MNIST fixture");
    data::fill_batch(&ds.train, &ds.norm, &idx, None, &mut batch);
    let (x, labels) = (&batch.x, &batch.labels);
    let mut g = c.benchmark_group("lenet_gradient_b128_fashion");
    g.throughput(Throughput::Elements(128));
    for first in [FirstLayer::Sparse, FirstLayer::Dense] {
        bufs.first_layer = first;
        g.bench_function(format!("{first:?}").to_lowercase(), |b| {
            b.iter(|| loss_and_grad(&model, &params, x, labels, &mut bufs))
        });
    }
    g.finish();
}

criterion_group!(benches, conv, memory_bound, linear, mlp_gradient, train_step);
/// `criterion_main!` with the allocator set up as the `lmc` binary sets it.
fn main() {
    lmc_train::cpu::keep_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
