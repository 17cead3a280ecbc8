//! `lmc export` / `lmc import`: a run's parameters and mask as safetensors with PyTorch
//! state-dict names (`fc_layers.0.weight`, `features.0.bias`, ... and `NAME_mask` for masks).
//! `lmc export` of a Dataset artifact and `lmc import-dataset`: synthetic images and labels as
//! safetensors (or, on import, NumPy `.npz`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use lmc_probe::dataset_interop::{self, ImportOptions, PixelSpace};
use lmc_probe::interop;
use lmc_train::artifact::{self, Kind, Provenance};
use lmc_train::data::{self, DatasetName, SyntheticSet};
use lmc_train::fit::{Run, Start, TrainConfig};
use lmc_train::model::{Model, ModelSpec};
use serde_json::json;

/// Arguments of `lmc export`.
#[derive(Args)]
pub struct ExportArgs {
    /// The Run artifact, or a Dataset artifact (`lmc distill`, `lmc import-dataset`).
    #[arg(value_name = "RUN|DATASET")]
    run: PathBuf,
    /// Output .safetensors file.
    #[arg(long, value_name = "FILE")]
    to: PathBuf,
    /// Leave the masks out (a plain state dict that `load_state_dict` takes as is).
    #[arg(long)]
    no_mask: bool,
    /// Dataset artifacts: the name of the images tensor (f32, N x C x H x W, normalised)
    /// [default: images]
    #[arg(long, value_name = "NAME")]
    images: Option<String>,
    /// Dataset artifacts: the name of the labels tensor (int64, N) [default: labels]
    #[arg(long, value_name = "NAME")]
    labels: Option<String>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of `lmc import`.
#[derive(Args)]
pub struct ImportArgs {
    /// The .safetensors file: from `lmc export`, or a PyTorch state dict with the same names
    /// (pruned weights as NAME_orig + NAME_mask are accepted).
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Output Run artifact.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Take the architecture and dataset from this Run artifact.
    #[arg(long, value_name = "RUN", conflicts_with = "model")]
    like: Option<PathBuf>,
    /// Architecture, for files that do not carry lmc metadata (needs --dataset).
    #[arg(long, value_name = "SPEC", requires = "dataset")]
    model: Option<String>,
    /// Dataset the parameters belong to (fixes input shape and classes), with --model.
    #[arg(long, value_name = "NAME|FILE")]
    dataset: Option<String>,
    /// Folder laid out like shared/data [default: $LMC_DATA_DIR, then ./data]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Ignore tensors the model does not have (e.g. BatchNorm's num_batches_tracked).
    #[arg(long)]
    allow_extra: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Arguments of `lmc import-dataset`.
#[derive(Args)]
pub struct ImportDatasetArgs {
    /// A .safetensors or .npz file of synthetic images (N x C x H x W floats) and labels (N
    /// integers), e.g. a published distilled set, or a file `lmc export` wrote.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// The real dataset the images stand for: digits, mnist, fashion-mnist, cifar10, cifar100.
    /// Fixes the image shape, the classes, the statistics and the test split
    /// [default: from the file's lmc metadata]
    #[arg(long, value_name = "NAME")]
    base: Option<String>,
    /// How the image values are scaled: `normalized` (already normalised with the base
    /// dataset's mean and std, as lmc stores them) or `unit` (pixel values in [0, 1]; lmc
    /// normalises them) [default: from the file's lmc metadata]
    #[arg(long, value_name = "SPACE")]
    pixel_space: Option<String>,
    /// Name of the images tensor [default: images, else x]
    #[arg(long, value_name = "NAME")]
    images: Option<String>,
    /// Name of the labels tensor [default: labels, else y]
    #[arg(long, value_name = "NAME")]
    labels: Option<String>,
    /// The set's name [default: the file's metadata, else its stem]
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// IDC multi-formation factor: each stored image holds factor x factor cells, each decoded
    /// to a full-size training image [default: the file's metadata, else 1]
    #[arg(long, value_name = "F")]
    factor: Option<usize>,
    /// Output Dataset artifact (.lmc); `--dataset OUT.lmc` then trains on it.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn import_dataset(a: ImportDatasetArgs) -> Result<()> {
    let _lock = artifact::OutputLock::acquire(&a.out)?;
    let opts = ImportOptions {
        base: a.base.as_deref().map(str::parse::<DatasetName>).transpose().context("--base")?,
        space: a.pixel_space.as_deref().map(str::parse::<PixelSpace>).transpose()?,
        images: a.images.clone(),
        labels: a.labels.clone(),
        name: a.name.clone(),
        factor: a.factor,
    };
    let imp = dataset_interop::import_dataset(&a.file, &opts)?;
    artifact::write(&a.out, &imp.set, imp.provenance)?;
    let set = &imp.set;
    if a.json {
        println!(
            "{}",
            json!({"command": "import-dataset", "file": a.file, "out": a.out, "format": imp.format,
                "name": set.name, "base": set.base, "images": set.images.len(), "factor": set.factor,
                "training_images": set.decoded_len(), "images_tensor": imp.images_tensor,
                "labels_tensor": imp.labels_tensor, "pixel_space": imp.space,
                "min": imp.range.0, "max": imp.range.1, "provenance": imp.provenance.hex()})
        );
    } else {
        println!(
            "{} ({} '{}' + '{}', {} pixel space, values {}..{}): {} images of {} -> {}",
            a.file.display(),
            imp.format,
            imp.images_tensor,
            imp.labels_tensor,
            imp.space,
            imp.range.0,
            imp.range.1,
            set.images.len(),
            set.base,
            a.out.display()
        );
    }
    Ok(())
}

/// `lmc export` of a Dataset artifact.
fn export_dataset(a: &ExportArgs, provenance: Provenance, set: &SyntheticSet) -> Result<()> {
    if a.no_mask {
        bail!("--no-mask is for Run artifacts; {} is a Dataset artifact", a.run.display());
    }
    let images = a.images.as_deref().unwrap_or(dataset_interop::IMAGE_NAMES[0]);
    let labels = a.labels.as_deref().unwrap_or(dataset_interop::LABEL_NAMES[0]);
    let bytes = dataset_interop::export_dataset_bytes(set, provenance, images, labels)
        .with_context(|| format!("exporting {}", a.run.display()))?;
    artifact::write_atomic(&a.to, &bytes)?;
    if a.json {
        println!(
            "{}",
            json!({"command": "export", "dataset": a.run, "to": a.to, "images": set.images.len(), "images_tensor": images, "labels_tensor": labels, "bytes": bytes.len()})
        );
    } else {
        println!(
            "{} images ({}x{}x{}, normalised) as '{images}' + '{labels}' -> {}",
            set.images.len(),
            set.images.shape.channels,
            set.images.shape.height,
            set.images.shape.width,
            a.to.display()
        );
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    // Held until the file is written: a second writer of it stops at once.
    let _lock = artifact::OutputLock::acquire(&a.to)?;
    let (h, payload) = artifact::read_raw(&a.run)?;
    if h.kind == Kind::Dataset {
        let set: SyntheticSet = artifact::decode(&a.run, &h, &payload)?;
        return export_dataset(&a, h.provenance, &set);
    }
    if a.images.is_some() || a.labels.is_some() {
        bail!(
            "--images and --labels are for Dataset artifacts; {} is a {} artifact",
            a.run.display(),
            h.kind
        );
    }
    let run: Run = artifact::decode(&a.run, &h, &payload)?;
    let bytes = interop::export_bytes(&run, h.provenance, !a.no_mask)
        .with_context(|| format!("exporting {}", a.run.display()))?;
    artifact::write_atomic(&a.to, &bytes)?;
    let tensors = run.model.layout.entries.len()
        + if a.no_mask {
            0
        } else {
            run.model.layout.entries.iter().filter(|e| e.prunable()).count()
        };
    if a.json {
        println!(
            "{}",
            json!({"command": "export", "run": a.run, "to": a.to, "tensors": tensors, "parameters": run.model.layout.trainable_total(), "running_statistics": run.model.layout.state_total(), "masks": !a.no_mask, "bytes": bytes.len()})
        );
    } else {
        println!(
            "{} tensors ({} parameters{}{}) -> {}",
            tensors,
            run.model.layout.trainable_total(),
            match run.model.layout.state_total() {
                0 => String::new(),
                s => format!(" + {s} running statistics"),
            },
            if a.no_mask { "" } else { ", with masks" },
            a.to.display()
        );
    }
    Ok(())
}

pub fn import(a: ImportArgs) -> Result<()> {
    let _lock = artifact::OutputLock::acquire(&a.out)?;
    let loaded = interop::load(&a.file)?;
    // The template: --like, else --model/--dataset, else the file's own lmc metadata.
    let template: Run = if let Some(like) = &a.like {
        let (_, r) = artifact::read::<Run>(like)?;
        blank(r.model, r.dataset, r.dataset_provenance)
    } else if let Some(spec) = &a.model {
        let spec: ModelSpec = spec.parse().context("--model")?;
        let name = a.dataset.as_deref().expect("clap requires --dataset with --model");
        let dir = data::resolve_data_dir(a.data_dir.as_deref());
        let (ds, prov) = data::resolve_dataset(name, Some(&dir)).context("--dataset")?;
        blank(Model::new(&spec, ds.train.shape, ds.classes)?, ds.name, prov)
    } else {
        match loaded.run_metadata(&a.file)? {
            Some(r) => r,
            None => bail!("{}: no lmc metadata; say what it holds with --like RUN, or --model SPEC --dataset NAME", a.file.display()),
        }
    };
    let (params, mask) = loaded.to_params(&a.file, &template.model.layout, a.allow_extra)?;
    let prov = loaded.provenance(&(&template.model, &template.dataset));
    let from_metadata = a.like.is_none() && a.model.is_none();
    let start = if from_metadata {
        template.start.clone()
    } else {
        Start::Given { source: prov, init_seed: 0 }
    };
    let run = Run { params, mask, start, ..template };
    artifact::write(&a.out, &run, prov)?;
    let sparsity = run.mask.sparsity(&run.model.layout);
    if a.json {
        println!(
            "{}",
            json!({"command": "import", "file": a.file, "out": a.out, "model": run.model.spec.to_string(), "dataset": run.dataset, "parameters": run.model.layout.trainable_total(), "running_statistics": run.model.layout.state_total(), "sparsity": sparsity, "provenance": prov.hex(), "metadata": from_metadata})
        );
    } else {
        println!(
            "{} ({}, {} parameters, sparsity {:.2}%) -> {}",
            a.file.display(),
            run.model.spec,
            run.model.layout.trainable_total(),
            100.0 * sparsity,
            a.out.display()
        );
    }
    Ok(())
}

/// A Run shell for parameters from elsewhere: architecture and data known, training unknown
/// (default settings, empty curve).
fn blank(model: Model, dataset: String, dataset_provenance: Provenance) -> Run {
    let layout = model.layout.clone();
    Run {
        params: lmc_train::params::ParamVec::zeros(layout.clone()),
        mask: lmc_train::params::Mask::dense(&layout),
        model,
        dataset,
        dataset_provenance,
        start: Start::Seed(0),
        data_seed: 0,
        replicate: 0,
        config: TrainConfig::default(),
        curve: vec![],
        images_seen: 0,
        seconds: 0.0,
    }
}
