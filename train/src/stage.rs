//! The one resumable-stage mechanism every stage (training, IMP rounds, distillation, the
//! probes) runs through: "is there an up-to-date output?", "resume from a checkpoint of the same
//! provenance, else start", atomic checkpoint writes (throttled where a stage writes often), and
//! writing the output then removing the checkpoint.
//!
//! A stage's identity is its provenance ([`provenance`]: stage name, the stage's algorithm
//! version from [`STAGE_VERSIONS`], its full configuration and its inputs' provenances). Outputs
//! and checkpoints carry it in their header; anything with another provenance is ignored, and a
//! damaged file is treated as absent (the stage recomputes it).
//!
//! ```no_run
//! use lmc_train::artifact::{Artifact, Kind, Provenance};
//! use lmc_train::stage::{self, Stage};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Out { rows: Vec<f64> }
//! # impl Artifact for Out { const KIND: Kind = Kind::Probe; }
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Ckpt { rows: Vec<f64> }
//! # impl Artifact for Ckpt { const KIND: Kind = Kind::LandscapeCheckpoint; }
//! # fn main() -> lmc_train::Result<()> {
//! let prov = stage::provenance("probe-landscape", stage::LANDSCAPE_VERSION, &("cfg", 3), &[]);
//! let mut st = Stage::new(Some(std::path::Path::new("out.lmc")), prov, false);
//! if st.cached::<Out>().is_some() {
//!     return Ok(()); // up to date: nothing to do
//! }
//! let mut rows = st.resume::<Ckpt>().map_or_else(Vec::new, |c| c.rows);
//! while rows.len() < 10 {
//!     rows.push(rows.len() as f64);
//!     st.save_checkpoint(&Ckpt { rows: rows.clone() })?;
//! }
//! st.finish(&Out { rows })?; // writes out.lmc, removes out.lmc.ckpt
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::artifact::{self, Artifact, Header, Provenance};
use crate::Result;

/// Algorithm / payload version of the training stage (`lmc train`, IMP's rounds' inner training).
///
/// The rule for every `*_VERSION` here: bump it when a change alters the stage's results (any
/// bit of any number it produces) or its artifact's payload; a change that keeps results
/// bit-identical and the payload decodable (a speed-up, a refactor) does not bump. Bumping makes
/// every cached output and checkpoint of that stage, and of every stage downstream of it, stale.
/// 2: 3x3 convolutions with 64+ channels on 16x16+ planes (or 256+ channels on any) run as
/// Winograd F(2x2, 3x3) (ConvNet-3 on CIFAR, ResNet-18), which rounds differently; every stage
/// below bumped with it for the same reason. 3: those on 8x8+ planes run as F(4x4, 3x3)
/// instead (and the F(2x2, 3x3) sums are ordered differently); every stage below bumped again.
/// 4: products of at most 256 elements with both operands along the inner dimension (small
/// convs' weight gradients, e.g. the digits presets' first conv) are summed in chains rather
/// than `gemm`'s lane reductions, so they no longer depend on AVX2 against AVX-512
/// (`ops::gemm::reduces_horizontally`); every stage below bumped with it.
/// 5: Winograd convolutions on smaller planes from 64 channels (`ops::winograd::applies`:
/// ResNet-20's third stage, ConvNet-3's 8x8 CIFAR and 14x14 / 7x7 MNIST layers), which round
/// differently from im2col + gemm; every stage below bumped with it.
/// 6: Winograd from 32 channels (ResNet-20's second stage, 32-63-channel layers elsewhere), which
/// rounds differently from the direct kernels and im2col + gemm; every stage below bumped with it.
pub const TRAIN_VERSION: u32 = 6;
/// Version of the pruning stage (IMP tickets and random baselines); see [`TRAIN_VERSION`].
/// 2: the Ticket payload keeps its IMP-only fields in its IMP origin. 3: Winograd convolutions
/// (see [`TRAIN_VERSION`] 2). 4: F(4x4, 3x3) (see [`TRAIN_VERSION`] 3). 5: small products in
/// chains (see [`TRAIN_VERSION`] 4). 6: Winograd on smaller planes (see [`TRAIN_VERSION`] 5).
/// 7: Winograd from 32 channels (see [`TRAIN_VERSION`] 6).
pub const PRUNE_VERSION: u32 = 7;
/// Version of the distillation stage; see [`TRAIN_VERSION`]. 2: gradient matching takes its
/// mixed derivative exactly where the model allows (`--mixed auto`), and the configuration
/// records how. 3: Winograd convolutions (see [`TRAIN_VERSION`] 2). 4: F(4x4, 3x3) (see
/// [`TRAIN_VERSION`] 3). 5: small products in chains (see [`TRAIN_VERSION`] 4). 6: Winograd on
/// smaller planes (see [`TRAIN_VERSION`] 5). 7: Winograd from 32 channels (see
/// [`TRAIN_VERSION`] 6).
pub const DISTILL_VERSION: u32 = 7;
/// Version of `probe interpolate`; see [`TRAIN_VERSION`]. 2: batch-norm running statistics
/// (`bn_reset`, `reset_curves`, `reset_summary`). 3: a test-split subsample (`test_samples`).
/// 4: Winograd convolutions (see [`TRAIN_VERSION`] 2). 5: F(4x4, 3x3) (see [`TRAIN_VERSION`] 3).
/// 6: small products in chains (see [`TRAIN_VERSION`] 4). 7: Winograd on smaller planes (see
/// [`TRAIN_VERSION`] 5). 8: Winograd from 32 channels (see [`TRAIN_VERSION`] 6).
pub const INTERPOLATE_VERSION: u32 = 8;
/// Version of `probe landscape`; see [`TRAIN_VERSION`]. 2: Winograd convolutions (see
/// [`TRAIN_VERSION`] 2). 3: F(4x4, 3x3) (see [`TRAIN_VERSION`] 3). 4: small products in chains
/// (see [`TRAIN_VERSION`] 4). 5: Winograd on smaller planes (see [`TRAIN_VERSION`] 5).
/// 6: Winograd from 32 channels (see [`TRAIN_VERSION`] 6).
pub const LANDSCAPE_VERSION: u32 = 6;
/// Version of `probe hessian`; see [`TRAIN_VERSION`].
/// 2: exact Hessian-vector products by default (`--hvp exact|fd` in the config), the report's
/// finite-difference step is optional, and batch-norm models choose the norm mode (`bn_mode`).
/// 3: ResNets get exact products by default too (batch norm in either mode). 4: Winograd
/// convolutions (see [`TRAIN_VERSION`] 2). 5: F(4x4, 3x3) (see [`TRAIN_VERSION`] 3). 6: small
/// products in chains (see [`TRAIN_VERSION`] 4). 7: Winograd on smaller planes (see
/// [`TRAIN_VERSION`] 5). 8: Winograd from 32 channels (see [`TRAIN_VERSION`] 6).
pub const HESSIAN_VERSION: u32 = 8;

/// Every stage's provenance name and version, for tools that list or compare them (the CLI,
/// xtask's stage keys). Names are the ones hashed into provenance.
pub const STAGE_VERSIONS: &[(&str, u32)] = &[
    ("train", TRAIN_VERSION),
    ("prune", PRUNE_VERSION),
    ("distill", DISTILL_VERSION),
    ("probe-interpolate", INTERPOLATE_VERSION),
    ("probe-landscape", LANDSCAPE_VERSION),
    ("probe-hessian", HESSIAN_VERSION),
];

/// The version of stage `name` in [`STAGE_VERSIONS`].
pub fn version(name: &str) -> Option<u32> {
    STAGE_VERSIONS.iter().find(|(n, _)| *n == name).map(|&(_, v)| v)
}

/// Provenance of an output of stage `stage` at algorithm version `version`, with configuration
/// `config` (hashed as JSON) and input provenances `inputs` (in order).
pub fn provenance(
    stage: &str,
    version: u32,
    config: &impl Serialize,
    inputs: &[Provenance],
) -> Provenance {
    Provenance::of(&format!("{stage}/v{version}"), config, inputs)
}

/// Path of the checkpoint kept next to `out` while it is being produced (`out` + `.ckpt`).
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".ckpt");
    PathBuf::from(s)
}

/// Checkpoints written through [`Stage::save_checkpoint_throttled`] are at most this often:
/// resuming from an earlier state gives the same result, only a little later, and a checkpoint
/// per short epoch would cost more than the epoch.
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// One run of a stage: where its output and checkpoint live, its provenance, and whether to
/// ignore what is on disk. Without an output path every method is a no-op (nothing is read,
/// nothing written), so library callers can run a stage in memory through the same code.
#[derive(Debug)]
pub struct Stage {
    out: Option<PathBuf>,
    checkpoint: Option<PathBuf>,
    provenance: Provenance,
    fresh: bool,
    last_checkpoint: Instant,
    /// Held from [`Stage::prepare`] until the stage is dropped: the whole run, not only the
    /// final write, since a second writer's result would replace this one's either way.
    lock: Option<artifact::OutputLock>,
}

impl Stage {
    /// A stage writing `out` (checkpoint at [`checkpoint_path`]`(out)`) with `provenance`;
    /// `fresh` ignores an existing output and checkpoint.
    pub fn new(out: Option<&Path>, provenance: Provenance, fresh: bool) -> Stage {
        Stage {
            out: out.map(Path::to_path_buf),
            checkpoint: out.map(checkpoint_path),
            provenance,
            fresh,
            last_checkpoint: Instant::now(),
            lock: None,
        }
    }

    /// The same stage with its checkpoint at `path` instead (IMP keeps `round-RR.ckpt`). Ignored
    /// without an output path.
    pub fn with_checkpoint_path(mut self, path: PathBuf) -> Stage {
        if self.out.is_some() {
            self.checkpoint = Some(path);
        }
        self
    }

    /// Checks, before any work, that the output and checkpoint paths are absent or regular
    /// files (a FIFO, a directory or a device there is refused, never read or replaced), takes
    /// the output's lock ([`artifact::OutputLock`]: another process writing it is an
    /// [`crate::Error::Locked`]) for as long as this stage lives, and removes temporary files
    /// that killed writes of the output and checkpoint left. No-op without an output path.
    pub fn prepare(&mut self) -> Result<()> {
        for p in [&self.out, &self.checkpoint].into_iter().flatten() {
            artifact::check_regular(p)?;
        }
        if let (Some(out), None) = (&self.out, &self.lock) {
            self.lock = Some(artifact::OutputLock::acquire(out)?);
        }
        for p in [&self.out, &self.checkpoint].into_iter().flatten() {
            artifact::remove_stale_temporaries(p);
        }
        Ok(())
    }

    /// The provenance outputs and checkpoints of this stage carry.
    pub fn provenance(&self) -> Provenance {
        self.provenance
    }

    /// The output path, if any.
    pub fn out(&self) -> Option<&Path> {
        self.out.as_deref()
    }

    /// The checkpoint path, if any (the file may not exist).
    pub fn checkpoint_path(&self) -> Option<&Path> {
        self.checkpoint.as_deref()
    }

    /// Whether existing files are ignored.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// The existing output when it has this stage's provenance (never with `fresh`).
    pub fn cached<A: Artifact>(&self) -> Option<A> {
        self.cached_if::<A>(|h, _| h.provenance == self.provenance).map(|(_, a)| a)
    }

    /// The existing output, decoded, when `accept` takes it (never with `fresh`; a missing or
    /// damaged file, or one of another kind, is `None`). For stages whose up-to-date test is not
    /// plain provenance equality (distillation cut short by a time budget).
    pub fn cached_if<A: Artifact>(
        &self,
        accept: impl FnOnce(&Header, &A) -> bool,
    ) -> Option<(Header, A)> {
        let out = self.out.as_deref().filter(|_| !self.fresh)?;
        if !out.exists() {
            return None;
        }
        let (h, a) = artifact::read::<A>(out).ok()?;
        accept(&h, &a).then_some((h, a))
    }

    /// The checkpoint's state when it has this stage's provenance (never with `fresh`; a
    /// missing, damaged, stale or other-kind checkpoint is `None`, and the stage starts over).
    pub fn resume<C: Artifact>(&self) -> Option<C> {
        self.resume_if(|_: &C| true)
    }

    /// [`Stage::resume`], also requiring `accept` of the decoded state (e.g. a size check).
    pub fn resume_if<C: Artifact>(&self, accept: impl FnOnce(&C) -> bool) -> Option<C> {
        let ck = self.checkpoint.as_deref().filter(|_| !self.fresh)?;
        if !ck.exists() {
            return None;
        }
        match artifact::read::<C>(ck) {
            Ok((h, c)) if h.provenance == self.provenance && accept(&c) => Some(c),
            _ => None,
        }
    }

    /// Writes `state` as the checkpoint (atomically, with this stage's provenance). No-op without
    /// an output path.
    pub fn save_checkpoint<C: Artifact>(&mut self, state: &C) -> Result<()> {
        if let Some(ck) = &self.checkpoint {
            artifact::write(ck, state, self.provenance)?;
            self.last_checkpoint = Instant::now();
        }
        Ok(())
    }

    /// Writes the checkpoint made by `state` when `force` or when [`MIN_CHECKPOINT_INTERVAL`]
    /// has passed since the last write (or since this stage started); returns whether it wrote.
    /// `state` is only called when writing.
    pub fn save_checkpoint_throttled<C: Artifact>(
        &mut self,
        force: bool,
        state: impl FnOnce() -> C,
    ) -> Result<bool> {
        if self.checkpoint.is_none()
            || !(force || self.last_checkpoint.elapsed() >= MIN_CHECKPOINT_INTERVAL)
        {
            return Ok(false);
        }
        self.save_checkpoint(&state())?;
        Ok(true)
    }

    /// The checkpoint path when the file exists (what an error such as divergence names as the
    /// last good state).
    pub fn kept_checkpoint(&self) -> Option<PathBuf> {
        self.checkpoint.clone().filter(|c| c.exists())
    }

    /// Writes the output (atomically, with this stage's provenance) and removes the checkpoint.
    /// No-op without an output path.
    pub fn finish<A: Artifact>(&self, output: &A) -> Result<()> {
        self.finish_as(output, self.provenance)
    }

    /// [`Stage::finish`] with another provenance (a distillation cut short by its time budget
    /// is stored as the run that asked for the iterations it did).
    pub fn finish_as<A: Artifact>(&self, output: &A, provenance: Provenance) -> Result<()> {
        if let Some(out) = &self.out {
            artifact::write(out, output, provenance)?;
            self.remove_checkpoint();
        }
        Ok(())
    }

    /// Removes the checkpoint, if any (a failure to remove only leaves a stale file that the
    /// next run ignores or overwrites).
    pub fn remove_checkpoint(&self) {
        if let Some(ck) = &self.checkpoint {
            let _ = std::fs::remove_file(ck);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::Kind;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Out(Vec<u32>);
    impl Artifact for Out {
        const KIND: Kind = Kind::Probe;
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Ck(Vec<u32>);
    impl Artifact for Ck {
        const KIND: Kind = Kind::LandscapeCheckpoint;
    }

    #[test]
    fn cache_resume_finish_and_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.lmc");
        let prov = provenance("probe-landscape", LANDSCAPE_VERSION, &1, &[]);
        let other = provenance("probe-landscape", LANDSCAPE_VERSION, &2, &[]);
        let mut st = Stage::new(Some(&out), prov, false);
        assert_eq!(st.checkpoint_path(), Some(checkpoint_path(&out).as_path()));
        assert!(st.cached::<Out>().is_none() && st.resume::<Ck>().is_none());
        st.save_checkpoint(&Ck(vec![1])).unwrap();
        assert_eq!(st.resume::<Ck>(), Some(Ck(vec![1])));
        assert_eq!(st.resume_if(|c: &Ck| c.0.len() == 2), None);
        assert_eq!(st.kept_checkpoint(), Some(checkpoint_path(&out)));
        // Another provenance, another kind, or `fresh` ignore the checkpoint.
        assert!(Stage::new(Some(&out), other, false).resume::<Ck>().is_none());
        assert!(Stage::new(Some(&out), prov, false).resume::<Out>().is_none());
        assert!(Stage::new(Some(&out), prov, true).resume::<Ck>().is_none());
        // Throttled writes: forced always, otherwise not within the interval.
        assert!(st.save_checkpoint_throttled(true, || Ck(vec![2])).unwrap());
        assert!(!st.save_checkpoint_throttled(false, || Ck(vec![3])).unwrap());
        assert_eq!(st.resume::<Ck>(), Some(Ck(vec![2])));
        st.finish(&Out(vec![4])).unwrap();
        assert!(!checkpoint_path(&out).exists());
        assert_eq!(st.cached::<Out>(), Some(Out(vec![4])));
        assert!(Stage::new(Some(&out), other, false).cached::<Out>().is_none());
        assert!(Stage::new(Some(&out), prov, true).cached::<Out>().is_none());
        // A damaged output is treated as absent.
        std::fs::write(&out, b"garbage").unwrap();
        assert!(st.cached::<Out>().is_none());
    }

    #[test]
    fn without_an_output_nothing_touches_the_disk() {
        let mut st = Stage::new(None, Provenance::default(), false);
        assert!(st.checkpoint_path().is_none());
        assert!(!st.save_checkpoint_throttled(true, || Ck(vec![1])).unwrap());
        st.save_checkpoint(&Ck(vec![1])).unwrap();
        assert!(st.resume::<Ck>().is_none() && st.cached::<Out>().is_none());
        st.finish(&Out(vec![])).unwrap();
        let st = st.with_checkpoint_path(PathBuf::from("x.ckpt"));
        assert!(st.checkpoint_path().is_none());
    }

    #[test]
    fn a_stage_version_is_part_of_provenance() {
        let a = provenance("train", 1, &("cfg", 3), &[]);
        assert_ne!(a, provenance("train", 2, &("cfg", 3), &[]));
        assert_ne!(a, provenance("prune", 1, &("cfg", 3), &[]));
        assert_eq!(a, provenance("train", 1, &("cfg", 3), &[]));
        // Unversioned provenance (before stage versions existed) differs too: old outputs are
        // recomputed once after the upgrade.
        assert_ne!(a, Provenance::of("train", &("cfg", 3), &[]));
    }

    #[test]
    fn every_stage_has_one_version() {
        for name in
            ["train", "prune", "distill", "probe-interpolate", "probe-landscape", "probe-hessian"]
        {
            assert_eq!(STAGE_VERSIONS.iter().filter(|(n, _)| *n == name).count(), 1, "{name}");
            assert!(version(name).is_some_and(|v| v >= 1));
        }
        assert_eq!(STAGE_VERSIONS.len(), 6);
        assert_eq!(version("nope"), None);
    }
}
