//! One exact Hessian-vector product (`hvp::loss_and_hvp`, forward-over-reverse) against one
//! gradient (`fit::loss_and_grad`, what a finite-difference product needs two of) on the same
//! images: LeNet-300-100 on 128 MNIST images and ConvNet-3 (width 32, instance norm) on 64
//! CIFAR-10 images, both from the committed fixtures. The budget is 2.5 gradients per product.
//! `cargo bench -p lmc-benches --bench hvp`.
//!
//! Measured 2026-12-05 on a 2-core AMD EPYC VM (AVX2 without AVX-512) under a load average of
//! ~5 from other work, so criterion's means were noisy (LeNet 4.8 ms / 1.63 ms, ConvNet
//! 149 ms / 58.6 ms); the fastest of 200 (LeNet) and 20 (ConvNet) alternating runs: LeNet
//! 1.97 ms / 0.99 ms = 2.0 gradients (the first layer, 88% of the work, from the sparse input
//! split as the gradient does), ConvNet 91.5 ms / 39.0 ms = 2.35 (a hidden conv layer costs 8
//! products against the gradient's 3; the first costs 3 against 2).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use lmc_train::data::{self, DatasetName};
use lmc_train::fit::{loss_and_grad, GradBuffers};
use lmc_train::hvp::loss_and_hvp;
use lmc_train::model::{Model, ModelSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(c: &mut Criterion, name: &str, dataset: DatasetName, spec: &str, images: u32) {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/fixtures");
    let ds = data::load(dataset, Some(&fixtures)).expect("the fixture");
    let spec: ModelSpec = spec.parse().expect("spec parses");
    let model = Model::new(&spec, ds.train.shape, ds.classes).expect("valid model");
    let params = model.init(0);
    let idx: Vec<u32> = (0..images).map(|i| i % ds.train.len() as u32).collect();
    let mut batch = data::Batch::default();
    data::fill_batch(&ds.train, &ds.norm, &idx, None, &mut batch);
    let (x, labels) = (&batch.x, &batch.labels);
    // A fixed dense direction.
    let v: Vec<f32> = (0..params.len()).map(|i| ((i as f32) * 0.37).sin()).collect();
    let mut bufs = GradBuffers::new(&model);
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements(images as u64));
    g.bench_function("gradient", |b| {
        b.iter(|| loss_and_grad(&model, &params, x, labels, &mut bufs))
    });
    g.bench_function("hvp_exact", |b| {
        b.iter(|| loss_and_hvp(&model, &params.data, x, labels, &v).expect("exact product"))
    });
    g.finish();
}

fn hvp(c: &mut Criterion) {
    bench(c, "hvp_lenet300100_b128", DatasetName::Mnist, "lenet-300-100", 128);
    bench(
        c,
        "hvp_convnet3w32_cifar_b64",
        DatasetName::Cifar10,
        "convnet:depth=3,width=32,norm=instance",
        64,
    );
}

criterion_group!(benches, hvp);
criterion_main!(benches);
