//! Tests of `lmc-prune` on the built-in digits with tiny models of odd sizes. Expected counts are
//! computed here in integer arithmetic (ceil(n/5) = (n + 4) / 5), independently of the crate's
//! floating-point rule.

use std::collections::BTreeMap;
use std::path::Path;

use lmc_prune::imp::{
    round_checkpoint_path, round_path, Imp, ImpConfig, ImpObserver, Rewind, SilentImp,
};
use lmc_prune::random::{random_mask, random_ticket, reinit_ticket};
use lmc_prune::rule::{PruneRule, Scope};
use lmc_prune::{read_ticket, Ticket};
use lmc_train::artifact::Provenance;
use lmc_train::data::{self, Dataset};
use lmc_train::fit::{self, Observer, TrainConfig, TrainData, TrainState};
use lmc_train::model::{Model, ModelSpec};
use lmc_train::optim::Sgd;
use lmc_train::params::{Mask, ParamVec};

fn digits() -> (Dataset, Provenance) {
    data::resolve_dataset("digits", None).unwrap()
}

fn model(spec: &str, ds: &Dataset) -> Model {
    let spec: ModelSpec = spec.parse().unwrap();
    Model::new(&spec, ds.train.shape, ds.classes).unwrap()
}

fn kept_in(mask: &Mask, m: &Model, name: &str) -> usize {
    mask.keep[m.layout.get(name).unwrap().range()].iter().filter(|&&k| k).count()
}

fn ceil_div(n: usize, p: usize, q: usize) -> usize {
    (p * n).div_ceil(q)
}

/// A stand-in for a trained network: fresh random values every round.
fn fake_trained(m: &Model, round: u64) -> ParamVec {
    m.init(1000 + round)
}

#[test]
fn global_rule_removes_ceil_of_a_fifth_every_round() {
    let (ds, _) = digits();
    // mlp:7,3 on 8x8 digits: 7*64 + 3*7 + 10*3 = 448 + 21 + 30 = 499 prunable weights.
    // convnet depth 1 width 3: 3*1*3*3 + 10*(3*4*4) = 27 + 480 = 507.
    for (spec, total) in [("mlp:7,3", 499usize), ("convnet:depth=1,width=3", 507)] {
        let m = model(spec, &ds);
        assert_eq!(m.layout.prunable_total(), total);
        let rule = PruneRule::global(0.2);
        let mut mask = Mask::dense(&m.layout);
        let mut expected = total;
        for r in 1..=20u64 {
            let trained = fake_trained(&m, r);
            let next = rule.prune(&trained, &mask, 0, r).unwrap();
            expected -= ceil_div(expected, 1, 5);
            assert_eq!(next.kept_prunable(&m.layout), expected, "{spec} round {r}");
            // Only weights kept before can go, and only weights.
            assert!(next.keep.iter().zip(&mask.keep).all(|(n, o)| !n || *o));
            next.validate(&m.layout).unwrap();
            // The removed weights are the smallest of the remaining ones.
            let removed: Vec<f32> = (0..mask.keep.len())
                .filter(|&i| mask.keep[i] && !next.keep[i])
                .map(|i| trained.data[i].abs())
                .collect();
            let kept: Vec<f32> = m
                .layout
                .entries
                .iter()
                .filter(|e| e.prunable())
                .flat_map(|e| e.range())
                .filter(|&i| next.keep[i])
                .map(|i| trained.data[i].abs())
                .collect();
            let max_removed = removed.iter().cloned().fold(0.0f32, f32::max);
            let min_kept = kept.iter().cloned().fold(f32::INFINITY, f32::min);
            assert!(
                max_removed <= min_kept,
                "{spec} round {r}: removed {max_removed} > kept {min_kept}"
            );
            mask = next;
        }
        // 0.8^k in count: after 10 rounds of 499 the count is within rounding of 499 * 0.107.
        assert!(expected < total);
    }
}

#[test]
fn layer_rates_and_unpruned_layers_are_pruned_on_their_own() {
    let (ds, _) = digits();
    let m = model("mlp:7,3", &ds);
    // Hidden layers pooled at 0.2, the output layer on its own at 0.1.
    let rule = PruneRule {
        layer_rates: BTreeMap::from([("fc.weight".to_string(), 0.1)]),
        ..PruneRule::global(0.2)
    };
    let mut mask = Mask::dense(&m.layout);
    let (mut pooled, mut out) = (448 + 21, 30usize);
    for r in 1..=12u64 {
        mask = rule.prune(&fake_trained(&m, r), &mask, 3, r).unwrap();
        pooled -= ceil_div(pooled, 1, 5);
        out -= ceil_div(out, 1, 10);
        assert_eq!(
            kept_in(&mask, &m, "fc_layers.0.weight") + kept_in(&mask, &m, "fc_layers.1.weight"),
            pooled,
            "round {r}"
        );
        assert_eq!(kept_in(&mask, &m, "fc.weight"), out, "round {r}");
    }
    // Layer-wise at 0.2 with the output layer unpruned: each hidden layer on its own.
    let rule = PruneRule {
        scope: Scope::Layerwise,
        keep_unpruned: ["fc.weight".to_string()].into(),
        ..PruneRule::global(0.2)
    };
    let mut mask = Mask::dense(&m.layout);
    let (mut a, mut b) = (448usize, 21usize);
    for r in 1..=12u64 {
        mask = rule.prune(&fake_trained(&m, r), &mask, 3, r).unwrap();
        a -= ceil_div(a, 1, 5);
        b -= ceil_div(b, 1, 5);
        assert_eq!(kept_in(&mask, &m, "fc_layers.0.weight"), a, "round {r}");
        assert_eq!(kept_in(&mask, &m, "fc_layers.1.weight"), b, "round {r}");
        assert_eq!(kept_in(&mask, &m, "fc.weight"), 30);
    }
}

#[test]
fn bad_rules_are_refused_by_name() {
    let (ds, _) = digits();
    let m = model("mlp:7,3", &ds);
    let err = |rule: PruneRule| rule.groups(&m.layout).unwrap_err().to_string();
    assert!(err(PruneRule::global(1.0)).contains("--rate 1"));
    assert!(err(PruneRule::global(0.0)).contains("--rate 0"));
    assert!(err(PruneRule::global(f64::NAN)).contains("--rate"));
    let e = err(PruneRule {
        layer_rates: BTreeMap::from([("fc.wieght".to_string(), 0.1)]),
        ..PruneRule::global(0.2)
    });
    assert!(
        e.contains("fc.wieght") && e.contains("unknown layer") && e.contains("fc.weight"),
        "{e}"
    );
    let e =
        err(PruneRule { keep_unpruned: ["fc.bias".to_string()].into(), ..PruneRule::global(0.2) });
    assert!(e.contains("fc.bias") && e.contains("not a prunable"), "{e}");
    let e = err(PruneRule {
        layer_rates: BTreeMap::from([("fc.weight".to_string(), 1.5)]),
        ..PruneRule::global(0.2)
    });
    assert!(e.contains("fc.weight") && e.contains("1.5"), "{e}");
    let all: std::collections::BTreeSet<String> =
        ["fc_layers.0.weight", "fc_layers.1.weight", "fc.weight"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    assert!(err(PruneRule { keep_unpruned: all, ..PruneRule::global(0.2) })
        .contains("no prunable tensor"));
}

#[test]
fn ties_are_broken_by_seed_deterministically() {
    let (ds, _) = digits();
    let m = model("mlp:7,3", &ds);
    // Every weight has magnitude 0.5 except the first 50 of fc_layers.0, at 0.25.
    let mut p = m.init(0);
    for (i, v) in p.data.iter_mut().enumerate() {
        *v = if i % 2 == 0 { 0.5 } else { -0.5 };
    }
    for v in &mut p.data[..50] {
        *v = 0.25;
    }
    let rule = PruneRule::global(0.2);
    let dense = Mask::dense(&m.layout);
    let a = rule.prune(&p, &dense, 7, 1).unwrap();
    let b = rule.prune(&p, &dense, 7, 1).unwrap();
    let c = rule.prune(&p, &dense, 8, 1).unwrap();
    let d = rule.prune(&p, &dense, 7, 2).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
    for mask in [&a, &c, &d] {
        // ceil(499 / 5) = 100 removed: the 50 smaller ones, then 50 of the ties.
        assert_eq!(mask.kept_prunable(&m.layout), 399);
        assert!(mask.keep[..50].iter().all(|k| !k));
    }
    // Ties are spread over the layers, not taken from the first one: with 449 tied weights and
    // 50 to choose, the last two layers (51 weights) keep all theirs with probability ~0.002.
    let late = m.layout.get("fc_layers.1.weight").unwrap().offset
        ..m.layout.get("fc.weight").unwrap().range().end;
    let pruned_late = late
        .filter(|&i| {
            m.layout.entries.iter().any(|e| e.prunable() && e.range().contains(&i)) && !a.keep[i]
        })
        .count();
    assert!(pruned_late > 0);
}

fn imp_config(spec: &str, rewind: Rewind, rewind_step: u64, epochs: usize) -> ImpConfig {
    ImpConfig {
        model: spec.parse().unwrap(),
        seed: 5,
        data_seed: 9,
        train: TrainConfig {
            epochs,
            lr: 0.05,
            batch_size: 64,
            sgd: Sgd { momentum: 0.9, weight_decay: 5e-4, nesterov: false },
            eval_every: 0,
            ..Default::default()
        },
        rule: PruneRule {
            layer_rates: BTreeMap::from([("fc.weight".to_string(), 0.1)]),
            ..PruneRule::global(0.2)
        },
        rewind_step,
        rewind,
    }
}

fn run_imp(
    cfg: &ImpConfig,
    ds: &Dataset,
    prov: Provenance,
    dir: &Path,
    rounds: usize,
    obs: &mut dyn ImpObserver,
) -> lmc_train::Result<Vec<lmc_prune::imp::RoundRecord>> {
    let m = Model::new(&cfg.model, ds.train.shape, ds.classes).unwrap();
    let imp = Imp {
        config: cfg.clone(),
        model: &m,
        data: ds,
        data_provenance: prov,
        from: None,
        out_dir: dir,
        fresh: false,
    };
    imp.run(rounds, obs)
}

fn tickets(dir: &Path, rounds: usize) -> Vec<Ticket> {
    (0..=rounds).map(|r| read_ticket(&round_path(dir, r)).unwrap().1).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn imp_counts_masks_rewinds_and_images() {
    let (ds, prov) = digits();
    let dir = tempfile::tempdir().unwrap();
    let cfg = imp_config("mlp:7,3", Rewind::Weights, 0, 2);
    let recs = run_imp(&cfg, &ds, prov, dir.path(), 3, &mut SilentImp).unwrap();
    assert_eq!(recs.len(), 4);
    let ts = tickets(dir.path(), 3);
    let m = model("mlp:7,3", &ds);
    let theta0 = m.init(5);
    let (mut pooled, mut out) = (469usize, 30usize);
    for (r, t) in ts.iter().enumerate() {
        if r > 0 {
            pooled -= ceil_div(pooled, 1, 5);
            out -= ceil_div(out, 1, 10);
        }
        assert_eq!(
            kept_in(&t.mask, &m, "fc_layers.0.weight") + kept_in(&t.mask, &m, "fc_layers.1.weight"),
            pooled
        );
        assert_eq!(kept_in(&t.mask, &m, "fc.weight"), out);
        assert_eq!(recs[r].kept, pooled + out);
        let trained = t.trained.as_ref().unwrap();
        // Masked weights are exactly zero after training; kept ones moved.
        for i in 0..trained.len() {
            if !t.mask.keep[i] {
                assert_eq!(trained.data[i].to_bits(), 0, "round {r} index {i}");
            }
        }
        assert_ne!(trained.data, t.rewind.data);
        // Images: 1437 per epoch, 2 epochs per round.
        assert_eq!(t.images_processed, (r as u64 + 1) * 2 * 1437);
        // The recorded accuracy is the trained network's on the real test split.
        let e = fit::evaluate(&m, trained, &ds.test, &ds.norm);
        assert_eq!(t.test_accuracy, Some(e.accuracy));
        assert_eq!(recs[r].test_accuracy, e.accuracy);
        // Rewinding: every weight is theta0 bit for bit; biases carry over from round r-1.
        for e in &m.layout.entries {
            let got = bits(&t.rewind.data[e.range()]);
            if e.prunable() || r == 0 {
                assert_eq!(got, bits(&theta0.data[e.range()]), "round {r} {}", e.name);
            } else {
                assert_eq!(
                    got,
                    bits(&ts[r - 1].trained.as_ref().unwrap().data[e.range()]),
                    "round {r} {}",
                    e.name
                );
            }
        }
    }
    // Retraining the ticket as `lmc train --ticket` does reproduces the round's network.
    let t = &ts[2];
    let state = fit::fit(
        &m,
        &t.mask,
        &TrainData::of(&ds, &cfg.train),
        &cfg.train,
        9,
        TrainState::start(t.rewind.clone()),
        &mut fit::Silent,
    )
    .unwrap();
    assert_eq!(bits(&state.params.data), bits(&t.trained.as_ref().unwrap().data));

    // Rewind all: the whole vector is theta0.
    let dir = tempfile::tempdir().unwrap();
    let cfg = imp_config("mlp:7,3", Rewind::All, 0, 1);
    run_imp(&cfg, &ds, prov, dir.path(), 2, &mut SilentImp).unwrap();
    for t in tickets(dir.path(), 2) {
        assert_eq!(bits(&t.rewind.data), bits(&theta0.data));
    }
}

struct Capture {
    at_epoch: usize,
    params: Option<ParamVec>,
}
impl Observer for Capture {
    fn on_epoch(&mut self, s: &TrainState) -> lmc_train::Result<()> {
        if s.epochs_done == self.at_epoch {
            self.params = Some(s.params.clone());
        }
        Ok(())
    }
}

#[test]
fn rewinding_to_step_k_restores_theta_k_bit_for_bit() {
    let (ds, prov) = digits();
    let dir = tempfile::tempdir().unwrap();
    // 1437 images / batch 64 = 23 steps per epoch: k = 23 is the end of epoch 1.
    let cfg = imp_config("mlp:7,3", Rewind::All, 23, 3);
    run_imp(&cfg, &ds, prov, dir.path(), 1, &mut SilentImp).unwrap();
    let m = model("mlp:7,3", &ds);
    // Independently: the dense run's parameters after its first epoch.
    let mut cap = Capture { at_epoch: 1, params: None };
    let full = fit::fit(
        &m,
        &Mask::dense(&m.layout),
        &TrainData::of(&ds, &cfg.train),
        &cfg.train,
        9,
        TrainState::start(m.init(5)),
        &mut cap,
    )
    .unwrap();
    let theta_k = cap.params.unwrap();
    let ts = tickets(dir.path(), 1);
    assert_eq!(bits(&ts[0].rewind.data), bits(&theta_k.data));
    assert_eq!(bits(&ts[1].rewind.data), bits(&theta_k.data));
    assert_eq!(ts[0].rewind_step, 23);
    // Round 0 itself trained from theta0: its network is the full dense run.
    assert_eq!(bits(&ts[0].trained.as_ref().unwrap().data), bits(&full.params.data));
    // A milestone before step k is refused.
    let mut bad = imp_config("mlp:7,3", Rewind::All, 50, 3);
    bad.train.schedule = lmc_train::optim::Schedule::parse("multistep:0.3", 0.1).unwrap();
    let e = run_imp(&bad, &ds, prov, tempfile::tempdir().unwrap().path(), 1, &mut SilentImp)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--rewind-step 50"), "{e}");
}

/// Fails ("is killed") at the given (round-start count, epoch).
struct Killer {
    rounds_started: usize,
    kill_round: usize,
    kill_epoch: usize,
}
impl Observer for Killer {
    fn on_epoch(&mut self, s: &TrainState) -> lmc_train::Result<()> {
        if self.rounds_started == self.kill_round + 1 && s.epochs_done == self.kill_epoch {
            return Err(lmc_train::Error::invalid("killed"));
        }
        Ok(())
    }
}
impl ImpObserver for Killer {
    fn round_started(&mut self, _r: usize, _n: usize, _s: f64, _t: u64) {
        self.rounds_started += 1;
    }
}

struct EpochCount(usize);
impl Observer for EpochCount {
    fn on_epoch(&mut self, _s: &TrainState) -> lmc_train::Result<()> {
        self.0 += 1;
        Ok(())
    }
}
impl ImpObserver for EpochCount {}

fn same_tickets(a: &[Ticket], b: &[Ticket]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let strip = |t: &Ticket| Ticket { seconds: 0.0, ..t.clone() };
        assert_eq!(strip(x), strip(y));
    }
}

#[test]
fn resuming_by_round_or_epoch_equals_an_uninterrupted_run() {
    let (ds, prov) = digits();
    let cfg = imp_config("mlp:7,3", Rewind::Weights, 0, 3);
    let whole = tempfile::tempdir().unwrap();
    run_imp(&cfg, &ds, prov, whole.path(), 3, &mut SilentImp).unwrap();
    let reference = tickets(whole.path(), 3);

    // One round, then three: rounds 0 and 1 are reused.
    let dir = tempfile::tempdir().unwrap();
    run_imp(&cfg, &ds, prov, dir.path(), 1, &mut SilentImp).unwrap();
    let recs = run_imp(&cfg, &ds, prov, dir.path(), 3, &mut SilentImp).unwrap();
    assert_eq!(recs.iter().map(|r| r.cached).collect::<Vec<_>>(), [true, true, false, false]);
    same_tickets(&tickets(dir.path(), 3), &reference);

    // Killed in round 2 after its first epoch (always checkpointed; later epochs at most once a
    // second): round 2 resumes from its checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let mut k = Killer { rounds_started: 0, kill_round: 2, kill_epoch: 1 };
    let e = run_imp(&cfg, &ds, prov, dir.path(), 3, &mut k).unwrap_err();
    assert!(e.to_string().contains("killed"));
    assert!(round_path(dir.path(), 1).exists() && !round_path(dir.path(), 2).exists());
    assert!(round_checkpoint_path(dir.path(), 2).exists());
    let mut count = EpochCount(0);
    let recs = run_imp(&cfg, &ds, prov, dir.path(), 3, &mut count).unwrap();
    assert_eq!(recs.iter().map(|r| r.cached).collect::<Vec<_>>(), [true, true, false, false]);
    // Round 2 trained only its last two epochs, round 3 all three.
    assert_eq!(count.0, 2 + 3);
    assert!(!round_checkpoint_path(dir.path(), 2).exists());
    same_tickets(&tickets(dir.path(), 3), &reference);

    // Other settings do not reuse these tickets.
    let other = ImpConfig { seed: 6, ..cfg.clone() };
    let recs = run_imp(&other, &ds, prov, dir.path(), 1, &mut SilentImp).unwrap();
    assert!(recs.iter().all(|r| !r.cached));
}

#[test]
fn random_masks_copy_sparsity_and_reinit_copies_the_mask() {
    let (ds, prov) = digits();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = imp_config("mlp:7,3", Rewind::Weights, 0, 1);
    cfg.rule =
        PruneRule { keep_unpruned: ["fc.weight".to_string()].into(), ..PruneRule::global(0.2) };
    run_imp(&cfg, &ds, prov, dir.path(), 4, &mut SilentImp).unwrap();
    let like = read_ticket(&round_path(dir.path(), 4)).unwrap().1;
    let m = &like.model;
    let lp = Provenance::of("x", &1, &[]);
    // Layer-wise: exactly the ticket's count in every tensor.
    let r = random_ticket(&like, lp, true, 0).unwrap();
    assert_eq!(r.layers, like.layers);
    assert_ne!(r.mask, like.mask);
    assert_eq!(r.rewind, like.rewind);
    assert!(r.trained.is_none() && r.test_accuracy.is_none());
    assert_eq!(random_mask(&m.layout, &like.mask, true, 0).unwrap(), r.mask);
    assert_ne!(random_mask(&m.layout, &like.mask, true, 1).unwrap(), r.mask);
    // Global: same total; the unpruned output layer stays dense.
    let g = random_mask(&m.layout, &like.mask, false, 0).unwrap();
    assert_eq!(g.kept_prunable(&m.layout), like.mask.kept_prunable(&m.layout));
    assert_eq!(kept_in(&g, m, "fc.weight"), 30);
    // Counts over 469 pooled weights after 4 rounds of 20%: 469 -> 375 -> 300 -> 240 -> 192.
    assert_eq!(kept_in(&g, m, "fc_layers.0.weight") + kept_in(&g, m, "fc_layers.1.weight"), 192);
    // Global random spreads the kept weights by chance, so the per-layer split differs from IMP's
    // (holds for this seed; a tie here would be a 1-in-tens coincidence).
    assert_ne!(kept_in(&g, m, "fc_layers.1.weight"), kept_in(&like.mask, m, "fc_layers.1.weight"));
    // Re-initialisation: same mask, fresh parameters.
    let re = reinit_ticket(&like, lp, 77);
    assert_eq!(re.mask, like.mask);
    assert_eq!(re.rewind, m.init(77));
    assert_eq!(re.init_seed, 77);
}

/// Counts the batches and steps the training loop reports.
#[derive(Default)]
struct BatchCount {
    batches: u64,
    steps: u64,
}
impl Observer for BatchCount {
    fn on_batch(&mut self, _e: usize, _s: u64, _b: &mut lmc_train::data::Batch) {
        self.batches += 1;
    }
    fn on_step(&mut self, _e: usize, _s: u64, _n: u64, _l: f32) {
        self.steps += 1;
    }
}
impl ImpObserver for BatchCount {}

#[test]
fn imp_rounds_forward_every_batch_to_the_observer() {
    let (ds, prov) = digits();
    let dir = tempfile::tempdir().unwrap();
    let cfg = imp_config("mlp:7,3", Rewind::Weights, 0, 2);
    let mut count = BatchCount::default();
    run_imp(&cfg, &ds, prov, dir.path(), 1, &mut count).unwrap();
    // Two rounds of two epochs of 23 batches each, every one seen before its step.
    assert_eq!((count.batches, count.steps), (2 * 2 * 23, 2 * 2 * 23));
}
