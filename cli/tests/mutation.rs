//! The seeded mutation suite: thousands of hostile variants of every input lmc reads (each
//! artifact kind, re-sealed with a valid checksum so the payload itself is what is tested, with
//! hostile length prefixes, truncations, splices and swapped kinds; safetensors files; IDX and
//! CIFAR-10 data), each fed through the library entry points the commands use: decode, validate,
//! then use what was accepted (summaries, evaluation, export, resume checks). Every case must end
//! in `Ok` or an `Err`, never a panic, and the process's peak memory stays bounded.
//!
//! Library calls instead of a process per case keep 10,000+ cases within seconds; the cases are
//! a pure function of [`SEED`], so a failure names a case that reproduces.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use lmc_distill::run::DistillCheckpoint;
use lmc_probe::interpolate::{InterpConfig, Split};
use lmc_probe::landscape::{self, LandscapeCheckpoint};
use lmc_probe::{hessian, interop, interpolate, Probe, ProbeResult};
use lmc_prune::random::{random_ticket, reinit_ticket};
use lmc_prune::Ticket;
use lmc_train::artifact::{self, Artifact, Kind, HEADER_LEN};
use lmc_train::data::{self, Batch, Dataset, DatasetName, ImageSet};
use lmc_train::fit::{self, Checkpoint, Run, Silent, TrainConfig, TrainData, TrainState};
use lmc_train::model::Model;
use lmc_train::params::{Layout, Mask, ParamKind, ParamVec};
use lmc_train::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;
use common::{lmc, run_ok};

/// Every case derives from this seed (and its class's index).
const SEED: u64 = 16;

/// Mutations of each of the nine seed artifacts.
const CASES_PER_KIND: usize = 3000;

/// Peak resident memory this suite may reach (the inputs are all under a megabyte; a decode
/// that sized a buffer by a hostile prefix would pass it, or abort).
const MAX_PEAK_BYTES: u64 = 1 << 30;

thread_local! {
    /// Whether this thread runs a case (its panics are kept for the report, not printed).
    static IN_CASE: Cell<bool> = const { Cell::new(false) };
    /// The last panic's message and place in a case on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs the case `f` and returns `Err(message)` when it panicked.
fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_CASE.get() {
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(info.to_string()));
            } else {
                default(info);
            }
        }))
    });
    IN_CASE.set(true);
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_CASE.set(false);
    r.map_err(|_| LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_default())
}

/// Outcomes of one input class.
struct Tally {
    /// Cases per class label: (accepted and used, refused with an error, panicked).
    cases: BTreeMap<String, (usize, usize, usize)>,
    /// Panics: class, case, message.
    panics: Vec<String>,
    started: Instant,
}

impl Tally {
    fn new() -> Tally {
        Tally { cases: BTreeMap::new(), panics: Vec::new(), started: Instant::now() }
    }
    fn record(&mut self, class: &str, case: usize, r: std::result::Result<Result<()>, String>) {
        let e = self.cases.entry(class.to_string()).or_default();
        match r {
            Ok(Ok(())) => e.0 += 1,
            Ok(Err(err)) => {
                e.1 += 1;
                let msg = err.to_string();
                assert!(!msg.contains('\n'), "{class} case {case}: a multi-line error: {msg}");
            }
            Err(p) => {
                e.2 += 1;
                self.panics.push(format!("{class} case {case}: {p}"));
            }
        }
    }
    fn total(&self) -> usize {
        self.cases.values().map(|(a, r, p)| a + r + p).sum()
    }
    /// Prints the counts and fails on any panic.
    fn finish(self, what: &str) -> usize {
        for (class, (ok, err, p)) in &self.cases {
            eprintln!(
                "[mutation] {what} {class}: {} cases ({ok} accepted, {err} refused, {p} panics)",
                ok + err + p
            );
        }
        let peak = peak_memory();
        eprintln!(
            "[mutation] {what}: {} cases in {:.1} s, {} panics, peak resident memory so far {} MiB",
            self.total(),
            self.started.elapsed().as_secs_f64(),
            self.panics.len(),
            peak >> 20
        );
        assert!(
            self.panics.is_empty(),
            "{} panics:\n{}",
            self.panics.len(),
            self.panics.join("\n")
        );
        assert!(peak < MAX_PEAK_BYTES, "peak memory {peak} bytes");
        self.total()
    }
}

/// This process's peak resident set (VmHWM), in bytes; 0 where /proc is absent.
fn peak_memory() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// What the use step needs besides the file: a genuine run (its model and settings), a little
/// of the data it was trained on, and the landscape settings of the genuine checkpoint.
struct Ctx {
    run: Run,
    digits: Dataset,
    /// 16 test images: what evaluations run on.
    small: ImageSet,
    /// Digits cut to 64 training and 16 test images: what training runs on.
    small_ds: Dataset,
    landscape: landscape::LandscapeConfig,
}

impl Ctx {
    /// One epoch of training from `state` (what `train`, `train --ticket` and a resumed stage
    /// do with what they read), on `ds`.
    fn train(&self, model: &Model, mask: &Mask, ds: &Dataset, state: TrainState) -> Result<()> {
        lmc_probe::check_data(model, &ds.train, "train")?;
        let cfg = TrainConfig { epochs: 1, ..self.run.config.clone() };
        fit::fit(model, mask, &TrainData::of(ds, &cfg), &cfg, 0, state, &mut Silent).map(drop)
    }
}

/// The valid artifacts the mutations start from, made by the `lmc` binary (as users make them)
/// or, for checkpoints that only exist while a stage runs, from its outputs.
fn seeds(dir: &Path) -> (Vec<(String, Vec<u8>)>, Ctx) {
    let p = |n: &str| dir.join(n);
    let tiny = ["--dataset", "digits", "--model", "mlp:7", "--epochs", "1"];
    run_ok(lmc().arg("train").args(tiny).arg("--out").arg(p("a.lmc")));
    run_ok(lmc().arg("train").args(tiny).args(["--data-seed", "1", "--out"]).arg(p("b.lmc")));
    run_ok(lmc().arg("prune").args(tiny).args(["--rounds", "1", "--out-dir"]).arg(p("imp")));
    // A batch-norm ResNet: its running statistics are state a mutation can make negative or NaN.
    let resnet = ["--dataset", "digits", "--model", "resnet:depth=8,width=2", "--epochs", "1"];
    run_ok(lmc().arg("train").args(resnet).arg("--out").arg(p("r.lmc")));
    run_ok(
        lmc()
            .args(["distill", "--dataset", "digits", "--ipc", "1", "--iterations", "2", "--out"])
            .arg(p("d.lmc")),
    );
    run_ok(
        lmc()
            .args(["probe", "interpolate", "--alphas", "3"])
            .args([p("a.lmc"), p("b.lmc")])
            .arg("--out")
            .arg(p("i.lmc")),
    );
    run_ok(
        lmc()
            .args(["probe", "landscape", "--resolution", "3", "--samples", "16"])
            .arg(p("a.lmc"))
            .arg("--out")
            .arg(p("l.lmc")),
    );
    run_ok(
        lmc()
            .args(["probe", "hessian", "--samples", "20", "--max-samples", "2", "--min-samples"])
            .args(["2", "--top-k", "1", "--power-iters", "3"])
            .arg(p("a.lmc"))
            .arg("--out")
            .arg(p("h.lmc")),
    );
    let (ha, run) = artifact::read::<Run>(&p("a.lmc")).unwrap();
    // A training checkpoint one epoch in, as `fit_stage` keeps it.
    let mut state = TrainState::start(run.params.clone());
    state.momentum.iter_mut().enumerate().for_each(|(i, m)| *m = (i % 7) as f32 * 1e-3);
    artifact::write(&p("c.ckpt"), &Checkpoint { run: ha.provenance, state }, ha.provenance)
        .unwrap();
    // A distillation checkpoint: the distilled pixels as `run::distill` stores them.
    let (hd, set) = artifact::read::<lmc_train::data::SyntheticSet>(&p("d.lmc")).unwrap();
    let data::Pixels::F32(px) = &set.images.pixels else { panic!("distilled sets are floats") };
    let s = set.images.shape;
    let layout = Layout::new([(
        "images".to_string(),
        vec![set.images.labels.len(), s.channels, s.height, s.width],
        ParamKind::Weight,
    )]);
    let mut st = TrainState::start(ParamVec { layout, data: px.clone() });
    (st.epochs_done, st.steps_done) = (2, 2);
    let dc = DistillCheckpoint {
        run: hd.provenance,
        state: st,
        updates: 2,
        seconds: 0.5,
        loss_curve: vec![0.5, 0.25],
    };
    artifact::write(&p("d.ckpt"), &dc, hd.provenance).unwrap();
    // A landscape checkpoint with one of its three rows done.
    let (hl, probe) = artifact::read::<Probe>(&p("l.lmc")).unwrap();
    let ProbeResult::Landscape(mut l) = probe.result else { panic!("a landscape") };
    let config = l.config.clone();
    l.rows_done = 1;
    l.points.truncate(l.config.x.points);
    artifact::write(
        &p("l.ckpt"),
        &LandscapeCheckpoint { landscape: l, seconds: 0.1 },
        hl.provenance,
    )
    .unwrap();

    let files = [
        ("Run", "a.lmc"),
        ("Run/resnet", "r.lmc"),
        ("Checkpoint", "c.ckpt"),
        ("Ticket", "imp/round-01.lmc"),
        ("Dataset", "d.lmc"),
        ("DistillCheckpoint", "d.ckpt"),
        ("Probe/interpolate", "i.lmc"),
        ("Probe/landscape", "l.lmc"),
        ("Probe/hessian", "h.lmc"),
        ("LandscapeCheckpoint", "l.ckpt"),
    ];
    let seeds = files.iter().map(|(k, f)| (k.to_string(), std::fs::read(p(f)).unwrap())).collect();
    let digits = data::load(DatasetName::Digits, None).unwrap();
    let small = digits.test.subset(&(0..16).collect::<Vec<_>>());
    let small_ds = Dataset {
        train: digits.train.subset(&(0..64).collect::<Vec<_>>()),
        test: small.clone(),
        ..digits.clone()
    };
    (seeds, Ctx { run, digits, small, small_ds, landscape: config })
}

/// Sets the header's payload length to what follows it and recomputes the checksum: what a
/// buggy or hostile tool writes, so only validation stands between the payload and its use.
fn reseal(b: &mut [u8]) {
    let len = (b.len() - HEADER_LEN) as u64;
    b[48..56].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&b[..56]);
    crc.update(&b[HEADER_LEN..]);
    let c = crc.finalize().to_le_bytes();
    b[56..60].copy_from_slice(&c);
}

/// Values a length prefix, count or index can be turned into.
fn hostile_u64(rng: &mut ChaCha8Rng, near: u64) -> u64 {
    const V: [u64; 12] =
        [0, 1, 2, 255, 1 << 16, (1 << 31) - 1, 1 << 32, 1 << 40, 1 << 62, u64::MAX, 7, 10];
    match rng.gen_range(0..4) {
        0 => near.wrapping_add(rng.gen_range(0..3)).wrapping_sub(1),
        1 => rng.gen(),
        _ => V[rng.gen_range(0..V.len())],
    }
}

/// One mutation of the valid artifact `good` (`others`: the other seeds, for splices and
/// swapped payloads); returns its strategy's name and the bytes.
fn mutate_artifact(rng: &mut ChaCha8Rng, good: &[u8], others: &[&[u8]]) -> (&'static str, Vec<u8>) {
    let mut b = good.to_vec();
    let n = b.len() - HEADER_LEN;
    let at = |rng: &mut ChaCha8Rng, w: usize| HEADER_LEN + rng.gen_range(0..=n.saturating_sub(w));
    let name = match rng.gen_range(0..12) {
        0 | 1 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = at(rng, 1);
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            "bit flips"
        }
        2 | 3 => {
            let i = at(rng, 8);
            let old = u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
            let v = hostile_u64(rng, old);
            b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            "hostile u64 (length prefix)"
        }
        4 => {
            let i = at(rng, 4);
            let old = u32::from_le_bytes(b[i..i + 4].try_into().unwrap()) as u64;
            let v = hostile_u64(rng, old) as u32;
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            "hostile u32 (tag)"
        }
        5 => {
            let specials = [f32::NAN, f32::INFINITY, -f32::INFINITY, -0.0, 3.4e38, 1e-45];
            let i = at(rng, 4);
            let v = specials[rng.gen_range(0..specials.len())];
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            "special float"
        }
        6 => {
            b.truncate(HEADER_LEN + rng.gen_range(0..n.max(1)));
            "truncated payload"
        }
        7 => {
            let i = at(rng, 0);
            let extra: Vec<u8> = (0..rng.gen_range(1..=16)).map(|_| rng.gen()).collect();
            b.splice(i..i, extra);
            "inserted bytes"
        }
        8 => {
            let i = at(rng, 0);
            let j = (i + rng.gen_range(1..=64)).min(b.len());
            b.drain(i..j);
            "deleted bytes"
        }
        9 => {
            let i = at(rng, 0);
            let j = (i + rng.gen_range(1..=256)).min(b.len());
            let copy = b[i..j].to_vec();
            let k = at(rng, 0);
            b.splice(k..k, copy);
            "duplicated range"
        }
        10 => {
            // Another kind's payload under this header, or this payload under another kind.
            if rng.gen_bool(0.5) {
                let o = others[rng.gen_range(0..others.len())];
                b.truncate(HEADER_LEN);
                b.extend_from_slice(&o[HEADER_LEN..]);
                "another kind's payload"
            } else {
                b[12..16].copy_from_slice(&rng.gen_range(0u32..9).to_le_bytes());
                b[8..12].copy_from_slice(&rng.gen_range(0u32..4).to_le_bytes());
                "another kind or version"
            }
        }
        _ => {
            // Not re-sealed: the checksum must catch it.
            let i = rng.gen_range(0..b.len());
            b[i] ^= 1 << rng.gen_range(0..8);
            return ("unsealed flip", b);
        }
    };
    reseal(&mut b);
    (name, b)
}

/// What `lmc inspect` and the stages do with an artifact of any kind: check the envelope,
/// decode and validate, then use it. `bytes` are the file's; `path` is where they are written
/// when a use reads the file itself (a Dataset resolved by path), and names them in errors.
fn use_artifact(path: &Path, bytes: &[u8], ctx: &Ctx) -> Result<()> {
    // In memory: writing each case to disk would cost more than everything else together.
    let (h, payload) = artifact::parse_raw(path, bytes.to_vec())?;
    match h.kind {
        Kind::Run => use_run(&artifact::decode::<Run>(path, &h, &payload)?, ctx),
        Kind::Checkpoint => {
            let c: Checkpoint = artifact::decode(path, &h, &payload)?;
            // What `fit_stage` asks before adopting it.
            let n = ctx.digits.train.len();
            c.state.check_for(&ctx.run.model, &ctx.run.config, n).map_err(Error::data)?;
            let r = &ctx.run;
            let cfg = &r.config;
            fit::fit(
                &r.model,
                &r.mask,
                &TrainData::of(&ctx.digits, cfg),
                cfg,
                0,
                c.state,
                &mut Silent,
            )
            .map(drop)
        }
        Kind::Ticket => {
            lmc_prune::inspect_summary(path, &h, &payload)?;
            let t: Ticket = artifact::decode(path, &h, &payload)?;
            random_ticket(&t, h.provenance, true, 1)?;
            random_ticket(&t, h.provenance, false, 2)?;
            reinit_ticket(&t, h.provenance, 3);
            let start = t.trained().unwrap_or(&t.rewind);
            lmc_probe::check_data(&t.model, &ctx.small, "test")?;
            fit::evaluate(&t.model, start, &ctx.small, &ctx.digits.norm);
            ctx.train(&t.model, &t.mask, &ctx.small_ds, TrainState::start(t.rewind.clone()))
        }
        Kind::Dataset => {
            lmc_distill::inspect_summary(path, &h, &payload)?;
            std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
            let (ds, _) = data::resolve_dataset(&path.display().to_string(), None)?;
            data::split_stats(&ds.train, ds.classes);
            let idx: Vec<u32> = (0..ds.train.len().min(8) as u32).collect();
            let mut batch = Batch::default();
            data::fill_batch(&ds.train, &ds.norm, &idx, None, &mut batch);
            lmc_probe::check_data(&ctx.run.model, &ds.train, "train")?;
            fit::evaluate(&ctx.run.model, &ctx.run.params, &ds.train, &ds.norm);
            let r = &ctx.run;
            ctx.train(&r.model, &r.mask, &ds, TrainState::start(r.params.clone()))
        }
        Kind::Probe => {
            lmc_probe::inspect_summary(path, &h, &payload)?;
            let p: Probe = artifact::decode(path, &h, &payload)?;
            use_probe(&p);
            Ok(())
        }
        Kind::DistillCheckpoint => {
            lmc_distill::inspect_checkpoint_summary(path, &h, &payload).map(drop)
        }
        Kind::LandscapeCheckpoint => {
            lmc_probe::inspect_checkpoint_summary(path, &h, &payload)?;
            let c: LandscapeCheckpoint = artifact::decode(path, &h, &payload)?;
            landscape::csv(&c.landscape);
            // The request's adoption test, then the grid resumed from it.
            let want = &ctx.landscape;
            let rows = want.y.map_or(1, |y| y.points);
            if c.landscape.config == *want
                && c.landscape.count == ctx.small.len()
                && c.landscape.rows_total == rows
            {
                let run = &ctx.run;
                let frame = landscape::random_frame(&run.params, &run.mask, true, 0);
                landscape::run_grid(
                    &run.model,
                    &run.mask,
                    &frame,
                    &ctx.small,
                    &ctx.digits.norm,
                    c.landscape,
                    &mut |_| Ok(()),
                )?;
            }
            Ok(())
        }
    }
}

/// What the probes, `inspect` and `export` do with a Run.
fn use_run(r: &Run, ctx: &Ctx) -> Result<()> {
    r.mask.sparsity(&r.model.layout);
    r.final_test_accuracy();
    r.final_train_loss();
    lmc_probe::check_compatible(&[r, &ctx.run], &["a".into(), "b".into()]).ok();
    let bytes = interop::export_bytes(r, Default::default(), true)?;
    let back = interop::load_bytes(Path::new("x.safetensors"), &bytes)?;
    back.to_params(Path::new("x.safetensors"), &r.model.layout, false)?;
    lmc_probe::check_data(&r.model, &ctx.small, "test")?;
    fit::evaluate(&r.model, &r.params, &ctx.small, &ctx.digits.norm);
    let cfg = InterpConfig {
        alphas: vec![0.0, 0.5, 1.0],
        train_samples: None,
        test_samples: None,
        sample_seed: 0,
        bn_reset: None,
    };
    let sets = [(Split::Test, &ctx.small)];
    // With the seed MLP run where the architectures agree, else with itself.
    let other = if r.model == ctx.run.model { &ctx.run } else { r };
    interpolate::interpolate(&[r, other], &sets, &ctx.digits.norm, &cfg, &ctx.small)?;
    // Training on from its parameters.
    ctx.train(&r.model, &r.mask, &ctx.small_ds, TrainState::start(r.params.clone()))
}

/// What printing a probe does (as `lmc probe` prints a cached one): the CSV, and the indexing
/// of its inputs and curves.
fn use_probe(p: &Probe) {
    p.summary();
    match &p.result {
        ProbeResult::Interpolation(r) => {
            interpolate::csv(r);
            for pair in &r.pairs {
                let _ = (&p.inputs[pair.a], &p.inputs[pair.b]);
                for c in &pair.curves {
                    let _ = (c.points[0].error, c.points[c.points.len() - 1].error);
                }
            }
        }
        ProbeResult::Landscape(l) => {
            landscape::csv(l);
            l.min_loss();
            for a in &l.anchors {
                let _ = &p.inputs[a.run];
            }
        }
        ProbeResult::Hessian(h) => {
            hessian::csv(h);
            h.without_diagonal();
        }
    }
}

#[test]
fn mutated_artifacts_of_every_kind_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let (seeds, ctx) = seeds(dir.path());
    eprintln!("[mutation] seed artifacts made in {:.1} s", t.elapsed().as_secs_f64());
    // Every seed is valid and usable as it is: the suite starts from what lmc accepts.
    for (kind, bytes) in &seeds {
        let p = dir.path().join("seed.lmc");
        use_artifact(&p, bytes, &ctx).unwrap_or_else(|e| panic!("seed {kind}: {e}"));
    }
    let mut tally = Tally::new();
    let case_path = dir.path().join("case.lmc");
    for (k, (kind, good)) in seeds.iter().enumerate() {
        let others: Vec<&[u8]> =
            seeds.iter().filter(|(o, _)| o != kind).map(|(_, b)| b.as_slice()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ (k as u64) << 32);
        let t = Instant::now();
        for case in 0..CASES_PER_KIND {
            let (strategy, bytes) = mutate_artifact(&mut rng, good, &others);
            let r = guarded(|| use_artifact(&case_path, &bytes, &ctx));
            tally.record(&format!("{kind} ({strategy})"), case, r);
        }
        eprintln!(
            "[mutation] {kind}: {CASES_PER_KIND} cases in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    // Per kind, all strategies together.
    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (class, (a, r, p)) in &tally.cases {
        *per_kind.entry(class.split(" (").next().unwrap()).or_default() += a + r + p;
    }
    eprintln!("[mutation] artifacts per kind: {per_kind:?}");
    assert!(tally.finish("artifact") >= 10 * CASES_PER_KIND);
}

/// Mutations of a safetensors file, at the level of its JSON header (shapes, offsets, dtypes,
/// duplicate names, the lmc metadata) and of its bytes.
fn mutate_safetensors(rng: &mut ChaCha8Rng, good: &[u8]) -> (&'static str, Vec<u8>) {
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&good[8..8 + n]).unwrap();
    let data = &good[8 + n..];
    let mut h = header.as_object().unwrap().clone();
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let pick = names[rng.gen_range(0..names.len())].clone();
    let mut text_edit: Option<String> = None;
    let name = match rng.gen_range(0..9) {
        0 => {
            let shapes = [
                serde_json::json!([1u64 << 40]),
                serde_json::json!([1u64 << 32, 1u64 << 32, 4]),
                serde_json::json!([]),
                serde_json::json!([0]),
                serde_json::json!([u64::MAX]),
                serde_json::json!([10, 64, 1]),
            ];
            h[&pick]["shape"] = shapes[rng.gen_range(0..shapes.len())].clone();
            "hostile shape"
        }
        1 => {
            let (a, b) = (hostile_u64(rng, 0), hostile_u64(rng, data.len() as u64));
            h[&pick]["data_offsets"] = serde_json::json!([a, b]);
            "hostile offsets"
        }
        2 => {
            let dtypes = ["F16", "BF16", "F64", "I64", "BOOL", "U8", "F8_E4M3", "X"];
            h[&pick]["dtype"] = serde_json::json!(dtypes[rng.gen_range(0..dtypes.len())]);
            "other dtype"
        }
        3 => {
            // The same name twice (a JSON map cannot hold it: written as text).
            let entry = serde_json::to_string(&h[&pick]).unwrap();
            text_edit = Some(format!(",{}:{entry}", serde_json::to_string(&pick).unwrap()));
            "duplicate name"
        }
        4 => {
            let v = h.remove(&pick).unwrap();
            let to =
                if rng.gen_bool(0.5) { format!("{pick}_orig") } else { format!("{pick}_mask") };
            h.insert(to, v);
            "renamed tensor"
        }
        5 => {
            // The lmc metadata: a number in the Run's JSON turned hostile, or the JSON cut.
            let meta = h.get_mut("__metadata__").and_then(|m| m.as_object_mut()).unwrap();
            let run = meta[interop::RUN_KEY].as_str().unwrap().to_string();
            let edited = if rng.gen_bool(0.7) {
                let digits: Vec<usize> = run
                    .char_indices()
                    .filter(|(i, c)| {
                        c.is_ascii_digit() && !run[..*i].ends_with(|p: char| p.is_ascii_digit())
                    })
                    .map(|(i, _)| i)
                    .collect();
                let i = digits[rng.gen_range(0..digits.len())];
                let end = run[i..].find(|c: char| !c.is_ascii_digit()).map_or(run.len(), |e| i + e);
                format!("{}{}{}", &run[..i], hostile_u64(rng, 10), &run[end..])
            } else {
                run[..rng.gen_range(0..run.len())].to_string()
            };
            meta.insert(interop::RUN_KEY.into(), serde_json::json!(edited));
            "hostile metadata"
        }
        6 => {
            let mut b = good.to_vec();
            for _ in 0..rng.gen_range(1..=8) {
                let i = rng.gen_range(0..b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            return ("bit flips", b);
        }
        7 => {
            let mut b = good.to_vec();
            b[..8].copy_from_slice(&hostile_u64(rng, n as u64).to_le_bytes());
            return ("hostile header length", b);
        }
        _ => {
            let mut b = good.to_vec();
            b.truncate(rng.gen_range(0..b.len()));
            return ("truncated", b);
        }
    };
    let mut text = serde_json::to_string(&serde_json::Value::Object(h)).unwrap();
    if let Some(extra) = text_edit {
        text.insert_str(text.len() - 1, &extra);
    }
    let mut b = (text.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    b.extend_from_slice(data);
    (name, b)
}

/// What `lmc import` does with a file: load it, take the model its metadata describes (else the
/// given one), read parameters and mask for that layout, and validate the Run it would write.
fn use_safetensors(bytes: &[u8], allow_extra: bool, ctx: &Ctx) -> Result<()> {
    let path = Path::new("case.safetensors");
    let loaded = interop::load_bytes(path, bytes)?;
    let template = loaded.run_metadata(path)?.unwrap_or_else(|| ctx.run.clone());
    let (params, mask) = loaded.to_params(path, &template.model.layout, allow_extra)?;
    let run = Run { params, mask, ..template };
    run.validate_payload().map_err(Error::data)?;
    use_run(&run, ctx)
}

#[test]
fn mutated_safetensors_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ctx) = seeds(dir.path());
    let good = interop::export_bytes(&ctx.run, Default::default(), true).unwrap();
    use_safetensors(&good, false, &ctx).unwrap();
    let mut tally = Tally::new();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x5afe);
    for case in 0..5000 {
        let (strategy, bytes) = mutate_safetensors(&mut rng, &good);
        let extra = rng.gen_bool(0.5);
        let r = guarded(|| use_safetensors(&bytes, extra, &ctx));
        tally.record(strategy, case, r);
    }
    assert!(tally.finish("safetensors") >= 5000);
}

/// Byte-level mutations of a data file: flips, hostile big-endian header words, truncation,
/// appended bytes.
fn mutate_data(rng: &mut ChaCha8Rng, good: &[u8], header_words: usize) -> (&'static str, Vec<u8>) {
    let mut b = good.to_vec();
    let name = match rng.gen_range(0..5) {
        0 => {
            for _ in 0..rng.gen_range(1..=8) {
                let i = rng.gen_range(0..b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            "bit flips"
        }
        1 if header_words > 0 => {
            let w = rng.gen_range(0..header_words) * 4;
            let old = u32::from_be_bytes(b[w..w + 4].try_into().unwrap()) as u64;
            b[w..w + 4].copy_from_slice(&(hostile_u64(rng, old) as u32).to_be_bytes());
            "hostile header word"
        }
        1 | 2 => {
            b.truncate(rng.gen_range(0..b.len()));
            "truncated"
        }
        3 => {
            b.extend((0..rng.gen_range(1..4000)).map(|_| rng.gen::<u8>()));
            "appended bytes"
        }
        _ => {
            // A byte every record (a CIFAR label) or anywhere (IDX pixels) set high.
            let step = if header_words == 0 && b.len() >= 3073 { 3073 } else { 1 };
            let i = rng.gen_range(0..b.len() / step) * step;
            b[i] = rng.gen_range(10..=255);
            "out-of-range byte"
        }
    };
    (name, b)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../train/fixtures")
}

/// What training does with a loaded dataset: statistics, a batch of each split.
fn use_dataset(ds: &Dataset) {
    data::split_stats(&ds.train, ds.classes);
    let mut batch = Batch::default();
    for set in [&ds.train, &ds.test] {
        let idx: Vec<u32> = (0..set.len().min(8) as u32).collect();
        data::fill_batch(set, &ds.norm, &idx, None, &mut batch);
    }
}

#[test]
fn mutated_idx_and_cifar_files_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let mut tally = Tally::new();
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ 0x1d8);
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    // IDX, raw (Fashion-MNIST fixture) and gzipped (MNIST fixture: its bytes, and its content
    // mutated then recompressed).
    for (name, sub, gz) in
        [(DatasetName::FashionMnist, "fashion-mnist", false), (DatasetName::Mnist, "mnist", true)]
    {
        let folder = dir.path().join(sub);
        copy(&fixtures().join(sub), &folder);
        let files: Vec<PathBuf> =
            std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
        for case in 0..800 {
            let f = &files[rng.gen_range(0..files.len())];
            let good = std::fs::read(f).unwrap();
            let words = if f.to_string_lossy().contains("idx3") { 4 } else { 2 };
            let (strategy, bytes) = if gz && rng.gen_bool(0.6) {
                let (s, raw) = mutate_data(&mut rng, &gunzip(&good), words);
                (s, gzip(&raw))
            } else {
                mutate_data(&mut rng, &good, if gz { 0 } else { words })
            };
            std::fs::write(f, &bytes).unwrap();
            let r = guarded(|| data::load_idx(name, &folder).map(|ds| use_dataset(&ds)));
            tally.record(&format!("IDX {sub} ({strategy})"), case, r);
            std::fs::write(f, &good).unwrap();
        }
    }
    // CIFAR-10: the batch folder (batches and class names) and the .tar.gz archive.
    let folder = dir.path().join("cifar-10-batches-bin");
    copy(&fixtures().join("cifar-10-batches-bin"), &folder);
    let files: Vec<PathBuf> =
        std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().path()).collect();
    for case in 0..800 {
        let f = &files[rng.gen_range(0..files.len())];
        let good = std::fs::read(f).unwrap();
        let (strategy, bytes) = mutate_data(&mut rng, &good, 0);
        std::fs::write(f, &bytes).unwrap();
        let r = guarded(|| data::load_cifar10_folder(&folder).map(|ds| use_dataset(&ds)));
        tally.record(&format!("CIFAR folder ({strategy})"), case, r);
        std::fs::write(f, &good).unwrap();
    }
    let tar = fixtures().join("cifar-tar/cifar-10-binary.tar.gz");
    let good = std::fs::read(&tar).unwrap();
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    for case in 0..400 {
        let (strategy, bytes) = if rng.gen_bool(0.5) {
            let (s, raw) = mutate_data(&mut rng, &gunzip(&good), 0);
            (s, gzip(&raw))
        } else {
            mutate_data(&mut rng, &good, 0)
        };
        std::fs::write(&archive, &bytes).unwrap();
        let r = guarded(|| data::load_cifar10_tar(&archive).map(|ds| use_dataset(&ds)));
        tally.record(&format!("CIFAR tar.gz ({strategy})"), case, r);
    }
    assert!(tally.finish("data") >= 2800);
}
