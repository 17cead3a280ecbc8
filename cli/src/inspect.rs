//! `lmc inspect`: header and summary of any artifact.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lmc_train::artifact::{self, Kind};
use lmc_train::fit::{Checkpoint, Run};
use serde_json::{json, Value};

#[derive(Args)]
pub struct InspectArgs {
    /// The .lmc file.
    file: PathBuf,
    /// Print one JSON object (with the full training curve for runs).
    #[arg(long)]
    json: bool,
}

fn run_summary(r: &Run) -> Value {
    json!({
        "model": r.model.spec.to_string(),
        "input": r.model.input,
        "classes": r.model.classes,
        "parameters": r.model.layout.trainable_total(),
        "running_statistics": r.model.layout.state_total(),
        "sparsity": r.mask.sparsity(&r.model.layout),
        "dataset": r.dataset,
        "start": r.start,
        "data_seed": r.data_seed,
        "replicate": r.replicate,
        "config": r.config,
        "epochs": r.curve.len(),
        "images_seen": r.images_seen,
        "seconds": r.seconds,
        "test_accuracy": r.final_test_accuracy(),
        "train_loss": r.final_train_loss(),
        "curve": r.curve,
    })
}

pub fn run(a: InspectArgs) -> Result<()> {
    let (header, payload) = artifact::read_raw(&a.file)?;
    let summary = match header.kind {
        Kind::Run => run_summary(&artifact::decode::<Run>(&a.file, &header, &payload)?),
        Kind::Checkpoint => {
            let c: Checkpoint = artifact::decode(&a.file, &header, &payload)?;
            json!({"for_run": c.run.hex(), "epochs_done": c.state.epochs_done, "steps_done": c.state.steps_done, "images_seen": c.state.images_seen})
        }
        Kind::Ticket => lmc_prune::inspect_summary(&a.file, &header, &payload)?,
        Kind::Probe => lmc_probe::inspect_summary(&a.file, &header, &payload)?,
        Kind::Dataset => lmc_distill::inspect_summary(&a.file, &header, &payload)?,
        // Resumable state of a stage in progress: the header (provenance, size) is what a user
        // needs to know which output it belongs to.
        Kind::DistillCheckpoint => {
            lmc_distill::inspect_checkpoint_summary(&a.file, &header, &payload)?
        }
        Kind::LandscapeCheckpoint => {
            lmc_probe::inspect_checkpoint_summary(&a.file, &header, &payload)?
        }
    };
    let out = json!({
        "file": a.file,
        "kind": header.kind,
        "format_version": header.version,
        "provenance": header.provenance.hex(),
        "payload_bytes": header.payload_len,
        "summary": summary,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "{}: {} artifact, format version {}, {} payload bytes",
        a.file.display(),
        header.kind,
        header.version,
        header.payload_len
    );
    println!("provenance {}", header.provenance.hex());
    if let Value::Object(m) = &out["summary"] {
        for (k, v) in m {
            if k == "curve" {
                if let Value::Array(rows) = v {
                    println!("{k}: {} epochs (use --json for all)", rows.len());
                }
                continue;
            }
            println!("{k}: {v}");
        }
    }
    Ok(())
}
