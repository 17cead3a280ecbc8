//! Same bits on a CPU without AVX-512: a training run on this host and the same run under
//! qemu's user-mode emulation of an AVX2 CPU (`qemu-x86_64 -cpu Haswell-v4`: AVX2 and FMA, no
//! AVX-512), which makes `gemm` and our own kernels take their AVX2 paths, must give the same
//! parameters, running statistics and curve bit for bit.
//!
//! The run is a batch-norm ResNet on the built-in digits whose stem (1 -> 8 channels) and first
//! 1x1 shortcut (8 -> 16) have weight gradients of at most 256 elements, the products `gemm` 0.19
//! sums with a reduction across its vector lanes (8 with AVX2, 16 with AVX-512): before
//! `ops::gemm` summed those itself, 3,594 bytes of this run's parameters differed between the two
//! (2026-12-07, Intel Xeon with AVX-512, 2 cores). A distribution-matching distillation with the
//! same network (DSA augmentation, batch-norm embeddings) must give the same images too. Skips,
//! saying why, where the host has no AVX-512 (the emulated CPU would then not differ from it) or
//! `qemu-x86_64` is not installed (`.ci/run` installs Debian's `qemu-user`). About 22 s under
//! emulation (CI, 2026-12-07, Intel Xeon with AVX-512, 2 cores).

use std::path::Path;
use std::process::Command;

use lmc_train::artifact;
use lmc_train::data::{Pixels, SyntheticSet};
use lmc_train::fit::Run;

mod common;
use common::{lmc, run_ok};

/// The emulated CPU: Haswell with its later microcode fixes (AVX2, FMA, no AVX-512).
const CPU: &str = "Haswell-v4";

fn distill(cmd: &mut Command, out: &Path) -> (Vec<u32>, Vec<u8>) {
    run_ok(
        cmd.args(["distill", "--dataset", "digits", "--model", "resnet:depth=8,width=8"])
            .args(["--method", "dm", "--ipc", "2", "--iterations", "3", "--batch-real", "16"])
            .args(["--seed", "0", "--out"])
            .arg(out),
    );
    let set = artifact::read::<SyntheticSet>(out).unwrap().1;
    let Pixels::F32(px) = &set.images.pixels else { panic!("a distilled set stores f32 pixels") };
    (px.iter().map(|v| v.to_bits()).collect(), set.images.labels.clone())
}

fn train(cmd: &mut Command, out: &Path) -> Run {
    run_ok(
        cmd.args([
            "train",
            "--dataset",
            "digits:train=256",
            "--model",
            "resnet:depth=8,width=8",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--seed",
            "0",
            "--eval-every",
            "0",
            "--out",
        ])
        .arg(out),
    );
    artifact::read::<Run>(out).unwrap().1
}

#[test]
fn runs_without_avx512_have_the_same_bits() {
    #[cfg(target_arch = "x86_64")]
    let has_avx512 = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let has_avx512 = false;
    if !has_avx512 {
        eprintln!("skipped: this CPU has no AVX-512, so an emulated AVX2 CPU would not differ");
        return;
    }
    let qemu = Command::new("qemu-x86_64").arg("--version").output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: qemu-x86_64 (Debian's qemu-user) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let qemu = || {
        let mut cmd = Command::new("qemu-x86_64");
        cmd.args(["-cpu", CPU, env!("CARGO_BIN_EXE_lmc")]);
        cmd
    };
    let native_set = distill(&mut lmc(), &dir.path().join("native-syn.lmc"));
    let emulated_set = distill(&mut qemu(), &dir.path().join("emulated-syn.lmc"));
    assert!(native_set == emulated_set, "the distilled images differ");

    let native = train(&mut lmc(), &dir.path().join("native.lmc"));
    let emulated = train(&mut qemu(), &dir.path().join("emulated.lmc"));

    let bits = |r: &Run| r.params.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let differ = bits(&native).iter().zip(bits(&emulated)).filter(|(a, b)| **a != *b).count();
    assert_eq!(differ, 0, "{differ} of {} scalars differ", native.params.data.len());
    // Everything else but the wall-clock time, the curve included.
    assert_eq!(Run { seconds: 0.0, ..native }, Run { seconds: 0.0, ..emulated });
}
