//! The finite-difference scan behind gradient matching's `--fd-eps` default: for one class, the
//! mixed derivative dD/dS (ReLU patterns frozen) at several step lengths, its relative distance
//! to the 1e-3 result, and a nested finite difference of D itself at the 6 largest pixels.
//!
//! `cargo run --release -p lmc-distill --example fd_scan -- SPEC FACTOR [DATASET [mse|cos]]`,
//! e.g. `-- convnet 1 mnist` (reads `../shared/data`, or `$LMC_DATA_DIR`).
use lmc_distill::config::{Distance, DistillConfig, Method};
use lmc_distill::dsa::{AugParams, Augmentation};
use lmc_distill::problem::Problem;
use lmc_distill::{gm, run};
use lmc_train::data::{self, Batch, DatasetName};
use lmc_train::fit::{self, GradBuffers};
use lmc_train::model::{Model, Patterns, Relus};
use lmc_train::seed::{self, Stream};
use std::sync::Arc;
fn main() {
    let spec = std::env::args().nth(1).unwrap_or("convnet:depth=2,width=6".into());
    let factor: usize = std::env::args().nth(2).map_or(2, |f| f.parse().unwrap());
    let dsn: DatasetName = std::env::args().nth(3).unwrap_or("digits".into()).parse().unwrap();
    let d: Distance = std::env::args().nth(4).unwrap_or("mse".into()).parse().unwrap();
    let dir = data::resolve_data_dir(None);
    let dir = if dir.exists() { dir } else { std::path::PathBuf::from("../shared/data") };
    let ds = data::load(dsn, Some(&dir)).unwrap();
    let m = Model::new(&spec.parse().unwrap(), ds.train.shape, ds.classes).unwrap();
    let cfg =
        DistillConfig { ipc: 2, factor, batch_real: 16, ..DistillConfig::defaults(Method::Gm, d) };
    let p = Problem::new(&m, &ds.train, &ds.norm, dsn, &cfg);
    let params = m.init(3);
    let c = 4usize;
    let img = ds.train.shape.len();
    let mut rng = seed::rng(1, Stream::Other, 0);
    let mut batch = Batch::default();
    p.real_batch(c, &mut rng, &mut batch);
    let mut bufs = GradBuffers::new(&m);
    fit::loss_and_grad(&m, &params, &batch.x, &batch.labels, &mut bufs);
    let g_real = bufs.grad.clone();
    let stored = run::initial_images(&p, &cfg)[c * 2 * img..(c + 1) * 2 * img].to_vec();
    let aug = Arc::new(Augmentation::new(
        ds.train.shape,
        &[AugParams::Rotate { theta: 0.2 }],
        vec![0; 2 * factor * factor],
    ));
    let mut pat = Patterns::default();
    let (_, g_syn, _) =
        gm::syn_pass(&p, &params, &stored, &aug, c as u8, &mut Relus::Record(&mut pat));
    let (dv, u) = gm::distance(&m.layout, d, &g_real, &g_syn);
    println!("D = {dv}");
    let dist = |s: &[f32]| {
        let (_, g, _) = gm::syn_pass(&p, &params, s, &aug, c as u8, &mut Relus::Replay(&pat));
        gm::distance(&m.layout, d, &g_real, &g).0
    };
    let m0 = gm::mixed_derivative(&p, &params, &stored, &aug, c as u8, &u, 1e-3, &pat);
    let mut top: Vec<usize> = (0..m0.len()).collect();
    top.sort_by(|&a, &b| m0[b].abs().total_cmp(&m0[a].abs()));
    top.truncate(6);
    let n0: f64 = m0.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
    for eps in [1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4, 1e-5] {
        let mx = gm::mixed_derivative(&p, &params, &stored, &aug, c as u8, &u, eps, &pat);
        let diff: f64 =
            mx.iter().zip(&m0).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        print!("eps {eps:e}: rel diff to 1e-3: {:.2e} | ", diff / n0);
        for &j in &top {
            print!("{:.5} ", mx[j]);
        }
        println!();
    }
    for h in [1e-2f32, 1e-3, 1e-4] {
        print!("nested frozen h {h}: ");
        for &j in &top {
            let (mut a, mut b) = (stored.clone(), stored.clone());
            a[j] += h;
            b[j] -= h;
            print!("{:.5} ", (dist(&a) - dist(&b)) / ((a[j] - b[j]) as f64));
        }
        println!();
    }
}
