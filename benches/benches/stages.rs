//! Criterion benches of the pipeline stages other than training (which `train.rs` covers), one
//! unit of each stage's inner loop, so that `cargo xtask bench` shows a regression in any stage:
//!
//! - distill: one distribution-matching step (`dm::dm_step`: fresh ConvNet-2/16, real batches of
//!   every class, DSA, backward to the pixels) on the built-in digits at ipc 10;
//! - prune: one IMP round's mask (global magnitude pruning at 20%, ties broken by random keys) and
//!   a random mask at that sparsity, on LeNet-300-100's 266k parameters;
//! - probe: one Hessian-vector product (exact, and by a central difference of two full gradients) and one
//!   interpolation point (midpoint of two parameter vectors, evaluated), on LeNet-300-100 with a
//!   fixed batch of 256 synthetic 28x28 images.
//!
//! All inputs are deterministic. `cargo bench -p lmc-benches --bench stages`.

use criterion::{criterion_group, Criterion, Throughput};
use lmc_distill::config::{Distance, DistillConfig, Method};
use lmc_distill::dm;
use lmc_distill::problem::Problem;
use lmc_distill::run::initial_images;
use lmc_probe::hessian::{HessianProblem, HvpMode, DEFAULT_EPS_REL};
use lmc_probe::{evaluate_points, lerp_masked};
use lmc_prune::random::random_mask;
use lmc_prune::rule::PruneRule;
use lmc_train::data::{self, DatasetName, ImageSet, ImageShape, Normalization, Pixels};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::params::Mask;
use lmc_train::seed::{self, Stream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Images in the probe benches' fixed batch.
const PROBE_IMAGES: usize = 256;

fn lenet() -> Model {
    let shape = ImageShape { channels: 1, height: 28, width: 28 };
    Model::new(&"lenet-300-100".parse::<ModelSpec>().expect("spec parses"), shape, 10)
        .expect("LeNet on 1x28x28 is valid")
}

/// A fixed 1x28x28 image set: bytes and labels from integer hashes (no RNG), with MNIST's
/// normalisation constants.
fn synthetic_mnist(n: usize) -> (ImageSet, Normalization) {
    let shape = ImageShape { channels: 1, height: 28, width: 28 };
    let data = (0..n * shape.len()).map(|i| (i.wrapping_mul(104_729) % 256) as u8).collect();
    let labels = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    let set = ImageSet { shape, pixels: Pixels::U8 { data, scale: 1.0 / 255.0 }, labels };
    (set, Normalization { mean: vec![0.1307], std: vec![0.3081] })
}

fn distill(c: &mut Criterion) {
    let ds = data::load(DatasetName::Digits, None).expect("built-in digits load");
    let spec: ModelSpec = "convnet:depth=2,width=16".parse().expect("spec parses");
    let model =
        Model::new(&spec, ds.train.shape, ds.classes).expect("ConvNet-2 on digits is valid");
    let cfg = DistillConfig { ipc: 10, ..DistillConfig::defaults(Method::Dm, Distance::Mse) };
    let p = Problem::new(&model, &ds.train, &ds.norm, DatasetName::Digits, &cfg);
    let pixels = initial_images(&p, &cfg);
    let mut grad = vec![0.0f32; pixels.len()];
    let mut g = c.benchmark_group("distill");
    g.sample_size(10);
    // Images through the network per step: every class's real batch plus the synthetic images.
    let (_, images) = dm::dm_step(&p, &mut seed::rng(0, Stream::Other, 0), &pixels, &mut grad);
    g.throughput(Throughput::Elements(images));
    g.bench_function("dm_step_digits_convnet2w16_ipc10", |b| {
        b.iter(|| {
            std::hint::black_box(dm::dm_step(
                &p,
                &mut seed::rng(0, Stream::Other, 0),
                &pixels,
                &mut grad,
            ))
        })
    });
    g.finish();
}

fn prune(c: &mut Criterion) {
    let model = lenet();
    let params = model.init(0);
    let dense = Mask::dense(&model.layout);
    let rule = PruneRule::global(0.2);
    let pruned = rule.prune(&params, &dense, 0, 0).expect("global 20% prunes LeNet");
    let mut g = c.benchmark_group("prune_lenet300100");
    g.throughput(Throughput::Elements(params.len() as u64));
    g.bench_function("imp_round_mask_global_20pct", |b| {
        b.iter(|| std::hint::black_box(rule.prune(&params, &dense, 0, 0).expect("prunes")))
    });
    g.bench_function("random_mask_global_20pct", |b| {
        b.iter(|| {
            std::hint::black_box(
                random_mask(&model.layout, &pruned, false, 0).expect("random mask"),
            )
        })
    });
    g.finish();
}

fn probe(c: &mut Criterion) {
    let model = lenet();
    let params = model.init(0);
    let other = model.init(1);
    let mask = Mask::dense(&model.layout);
    let (set, norm) = synthetic_mnist(PROBE_IMAGES);
    let hp = HessianProblem::new(&model, &params, &set, &norm, PROBE_IMAGES, DEFAULT_EPS_REL, None)
        .expect("Hessian problem");
    let exact = hp.with_hvp(HvpMode::Exact).expect("LeNet has an exact product");
    let hp = HessianProblem::new(&model, &params, &set, &norm, PROBE_IMAGES, DEFAULT_EPS_REL, None)
        .and_then(|p| p.with_hvp(HvpMode::Fd))
        .expect("Hessian problem");
    // A fixed +-1 direction.
    let v: Vec<f64> = (0..hp.dim())
        .map(|i| if (i.wrapping_mul(2_654_435_761) >> 16) & 1 == 0 { 1.0 } else { -1.0 })
        .collect();
    let mut g = c.benchmark_group("probe_lenet300100_256img");
    g.throughput(Throughput::Elements(PROBE_IMAGES as u64));
    // One point of `lmc probe interpolate`'s curve: lerp then `fit::evaluate`, through the same
    // public entry points `interpolate::interpolate` uses (which itself wants `Run` artifacts).
    let midpoint = |_: usize| lerp_masked(&params, &other, 0.5, &mask);
    g.bench_function("interpolation_midpoint_eval", |b| {
        b.iter(|| {
            std::hint::black_box(
                evaluate_points(&model, 1, midpoint, &set, &norm).expect("evaluates"),
            )
        })
    });
    // Settings apply to the benches defined after them: two full gradients take tens of ms.
    g.sample_size(10);
    g.bench_function("hvp_central_difference", |b| b.iter(|| std::hint::black_box(hp.hvp(&v))));
    g.bench_function("hvp_exact", |b| b.iter(|| std::hint::black_box(exact.hvp(&v))));
    g.finish();
}

criterion_group!(benches, distill, prune, probe);
/// `criterion_main!` with the allocator set up as the `lmc` binary sets it.
fn main() {
    lmc_train::cpu::keep_freed_memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
