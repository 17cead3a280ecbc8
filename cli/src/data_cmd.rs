//! `lmc data info`.

use anyhow::Result;
use clap::{Args, Subcommand};
use lmc_train::data;
use serde_json::json;

use crate::train_cmd::DataArgs;

#[derive(Subcommand)]
pub enum DataCommand {
    /// Counts per split and class, and pixel mean/std per channel.
    Info(InfoArgs),
}

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(c: DataCommand) -> Result<()> {
    let DataCommand::Info(a) = c;
    let (ds, prov) = a.data.load()?;
    let train = data::split_stats(&ds.train, ds.classes);
    let test = data::split_stats(&ds.test, ds.classes);
    if a.json {
        let out = json!({
            "dataset": ds.name,
            "shape": ds.train.shape,
            "classes": ds.class_names,
            "normalization": ds.norm,
            "train": train,
            "test": test,
            "provenance": prov.hex(),
        });
        println!("{out}");
        return Ok(());
    }
    let s = ds.train.shape;
    println!("{}: {} classes, images {}x{}x{}", ds.name, ds.classes, s.channels, s.height, s.width);
    for (name, st) in [("train", &train), ("test", &test)] {
        println!("{name}: {} images", st.count);
        let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.4}")).collect::<Vec<_>>().join(", ");
        println!("  pixel mean ({}), std ({})", fmt(&st.mean), fmt(&st.std));
        for (c, n) in st.per_class.iter().enumerate() {
            println!("  {:>2} {:<12} {n}", c, ds.class_names.get(c).map_or("", |s| s.as_str()));
        }
    }
    Ok(())
}
