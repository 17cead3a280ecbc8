//! One exact Hessian-vector product (`hvp::loss_and_hvp`, forward-over-reverse) against one
//! gradient (`fit::loss_and_grad`, what a finite-difference product needs two of) on the same
//! images: LeNet-300-100 on 128 MNIST images, ConvNet-3 (width 32, instance norm) and ResNet-20
//! (batch norm in evaluation mode, the Hessian's default loss, and in training mode) on 64
//! CIFAR-10 images, all from the committed fixtures. The budget is 2.5 gradients per product.
//! `cargo bench -p lmc-benches --bench hvp`.
//!
//! Measured 2026-12-05 on a 2-core AMD EPYC VM (AVX2 without AVX-512) under a load average of
//! ~5 from other work, so criterion's means were noisy (LeNet 4.8 ms / 1.63 ms, ConvNet
//! 149 ms / 58.6 ms); the fastest of 200 (LeNet) and 20 (ConvNet) alternating runs: LeNet
//! 1.97 ms / 0.99 ms = 2.0 gradients (the first layer, 88% of the work, from the sparse input
//! split as the gradient does), ConvNet 91.5 ms / 39.0 ms = 2.35 (a hidden conv layer costs 8
//! products against the gradient's 3; the first costs 3 against 2).
//!
//! ResNet-20, measured 2026-12-05 on the same VM under a load average of 2.3-3.8 (the two cores
//! saturated by other work): criterion's means 400 ms (gradient) / 1.153 s (product), noisy
//! (intervals 327-485 ms and 1.06-1.26 s); the fastest of 8 alternating runs 422 ms / 956 ms =
//! 2.27 gradients, and with one thread 408 ms / 964 ms = 2.36 (every conv is hidden, so the
//! products' multiply-adds are 8/3 of the gradient's; the per-sample GEMMs and the im2col
//! recomputed in the backward are what is left). Batch norm in training mode (the whole batch
//! is one group, only its convs run in parallel chunks) was 3.3 gradients by the same count
//! under a load of 5.5: 1.28 s against the training-mode gradient's 388 ms.
//!
//! ResNet-20 again on 2026-12-05 with nothing else running (load average ~2, the bench itself;
//! same VM): criterion's means 229 ms (gradient) / 502 ms (product) = 2.19 gradients in
//! evaluation mode, and `hvp_resnet20_train_mode_cifar_b64` 256 ms / 740 ms = 2.89 gradients
//! in training mode (`--bn-mode batch`), over the 2.5 budget.
//!
//! All four on 2026-12-05 after the training-mode batch norm went in place and parallel, with
//! this file's `main` now setting the allocator as `lmc` does (freed memory kept mapped: the
//! gradient lost its page faults, ~10%), nothing else running (same VM, load ~2.7 before):
//! criterion's means LeNet 1.734 ms / 0.715 ms = 2.43, ConvNet 45.8 ms / 21.2 ms = 2.16, ResNet-20 in
//! evaluation mode 475.9 ms / 208.8 ms = 2.28, in training mode 583.4 ms / 215.0 ms = 2.71
//! (by multiply-adds 8/3 = 2.67 is the floor when every conv is hidden).

use criterion::{criterion_group, Criterion, Throughput};
use lmc_train::data::{self, DatasetName};
use lmc_train::fit::{loss_and_grad, GradBuffers, NormMode};
use lmc_train::hvp::loss_and_hvp_in;
use lmc_train::model::{Model, ModelSpec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bench(
    c: &mut Criterion,
    name: &str,
    dataset: DatasetName,
    spec: &str,
    images: u32,
    mode: NormMode,
) {
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
    // The Hessian's loss: batch norms in evaluation mode by default, training mode with
    // `--bn-mode batch` (no effect on models without them); the gradient in the same mode.
    bufs.norm_mode = mode;
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements(images as u64));
    g.bench_function("gradient", |b| {
        b.iter(|| loss_and_grad(&model, &params, x, labels, &mut bufs))
    });
    g.bench_function("hvp_exact", |b| {
        b.iter(|| {
            loss_and_hvp_in(&model, mode, &params.data, x, labels, &v).expect("exact product")
        })
    });
    g.finish();
}

fn hvp(c: &mut Criterion) {
    let run = NormMode::Running;
    bench(c, "hvp_lenet300100_b128", DatasetName::Mnist, "lenet-300-100", 128, run);
    let convnet = "convnet:depth=3,width=32,norm=instance";
    bench(c, "hvp_convnet3w32_cifar_b64", DatasetName::Cifar10, convnet, 64, run);
    bench(c, "hvp_resnet20_cifar_b64", DatasetName::Cifar10, "resnet20", 64, run);
    let batch = NormMode::Batch;
    bench(c, "hvp_resnet20_train_mode_cifar_b64", DatasetName::Cifar10, "resnet20", 64, batch);
}

criterion_group!(benches, hvp);
/// `criterion_main!` with the allocator set up as the `lmc` binary sets it.
fn main() {
    lmc_train::cpu::keep_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
