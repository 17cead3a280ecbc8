//! The pipeline report: `OUT/report/index.md`, the same as `index.html`, SVG plots and
//! `summary.json` with every number the plots show.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::pipeline::{ConditionSummary, Results, SweepSummary};
use crate::plot::{self, Series};

const METHODS: [&str; 4] = ["dense", "distilled", "imp", "random"];

/// A fraction as a percentage with 2 decimals; "-" for a value that is not a number (an empty
/// split, a loss that diverged).
fn pct(v: f64) -> String {
    fixed(100.0 * v, 2)
}

/// `v` with `decimals` decimals, "-" when it is not finite.
fn fixed(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// Writes the report folder.
pub fn write(
    dir: &Path,
    res: &Results,
    diagonals: &[(String, Vec<f64>)],
    distill_png: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let conds = &res.conditions;
    // Every method's line starts at the dense network (sparsity 0).
    fn by_method<'a>(
        conds: &'a [ConditionSummary],
        m: &'a str,
    ) -> impl Iterator<Item = &'a ConditionSummary> + 'a {
        conds.iter().filter(move |c| c.method == m || c.method == "dense")
    }
    // Accuracy vs sparsity (replicates retrained on real data), and barrier vs sparsity.
    let mut acc = Vec::new();
    let mut bar = Vec::new();
    for m in METHODS.iter().skip(1) {
        if !res.sweep.is_empty() {
            // A seed sweep plots each condition's mean over the seeds (one point per sparsity).
            let sw = res.sweep.iter().filter(|s| s.method == *m || s.method == "dense");
            let pts = |value: fn(&SweepSummary) -> f64| -> Vec<(f64, f64)> {
                sw.clone().map(|s| (100.0 * s.sparsity.mean, 100.0 * value(s))).collect()
            };
            acc.push(Series { name: m.to_string(), points: pts(|s| s.test_accuracy.mean) });
            bar.push(Series { name: m.to_string(), points: pts(|s| s.error_barrier.mean) });
            continue;
        }
        let pts = |value: fn(&ConditionSummary) -> f64| -> Vec<(f64, f64)> {
            by_method(conds, m).map(|c| (100.0 * c.sparsity, 100.0 * value(c))).collect()
        };
        acc.push(Series { name: m.to_string(), points: pts(|c| c.test_accuracy_mean) });
        bar.push(Series { name: m.to_string(), points: pts(|c| c.error_barrier_mean) });
    }
    plot::lines(
        &dir.join("accuracy_vs_sparsity.svg"),
        "Test accuracy of replicates trained on real data",
        "sparsity (% of weights removed)",
        "test accuracy (%)",
        &acc,
    )?;
    plot::lines(
        &dir.join("barrier_vs_sparsity.svg"),
        "Error barrier between replicates (linear interpolation)",
        "sparsity (% of weights removed)",
        "test error barrier (percentage points)",
        &bar,
    )?;
    // Error along each interpolation path.
    let paths: Vec<Series> = conds
        .iter()
        .map(|c| Series {
            name: c.condition.clone(),
            points: c.interpolation.iter().map(|p| (p.alpha, 100.0 * p.error)).collect(),
        })
        .collect();
    plot::lines(
        &dir.join("interpolation.svg"),
        "Test error along the path between replicates",
        "interpolation coefficient alpha (0 = replicate 0, 1 = replicate 1)",
        "test error (%)",
        &paths,
    )?;
    // IMP rounds as the search saw them.
    let mut rounds = Vec::new();
    for (m, label) in
        [("distilled", "distilled IMP (trained on distilled data)"), ("imp", "real-data IMP")]
    {
        let rounds_of = if m == "imp" { &res.imp_rounds.imp } else { &res.imp_rounds.distilled };
        let pts = rounds_of
            .iter()
            .map(|x| (100.0 * x.record.sparsity, 100.0 * x.record.test_accuracy))
            .collect();
        rounds.push(Series { name: label.into(), points: pts });
    }
    plot::lines(
        &dir.join("imp_rounds.svg"),
        "Test accuracy of each IMP round's network",
        "sparsity (% of weights removed)",
        "test accuracy (%)",
        &rounds,
    )?;
    // Landscapes.
    let mut landscape_files = Vec::new();
    for l in &res.landscapes {
        let name = &l.condition;
        let pts = &l.result.points;
        let mut xs: Vec<f64> = pts.iter().map(|p| p.x).collect();
        let mut ys: Vec<f64> = pts.iter().map(|p| p.y).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        ys.sort_by(f64::total_cmp);
        ys.dedup();
        let mut z = vec![vec![f64::NAN; xs.len()]; ys.len()];
        for p in pts {
            if let Some(cell) = z.get_mut(p.iy).and_then(|row| row.get_mut(p.ix)) {
                *cell = p.loss;
            }
        }
        let file = format!("landscape_{name}.svg");
        plot::heatmap(
            &dir.join(&file),
            &format!("Train loss around {name}"),
            [
                "direction 1 (filter-normalised units)",
                "direction 2 (filter-normalised units)",
                "train loss",
            ],
            &plot::Grid { xs, ys, z },
        )?;
        landscape_files.push(file);
    }
    // Hessian diagonals (log10 of |H_ii|, zeros dropped).
    let logs: Vec<(String, Vec<f64>)> = diagonals
        .iter()
        .map(|(n, d)| {
            (n.clone(), d.iter().filter(|v| **v != 0.0).map(|v| v.abs().log10()).collect())
        })
        .collect();
    if !logs.is_empty() {
        plot::histogram(
            &dir.join("hessian_diagonal.svg"),
            "Hessian diagonal estimates (Hutchinson)",
            "log10 |H_ii|",
            &logs,
            40,
        )?;
    }
    if let Some(png) = distill_png {
        std::fs::copy(png, dir.join("distilled.png"))?;
    }
    let mut summary = serde_json::json!({
        "preset": res.preset, "conditions": res.conditions, "imp_rounds": res.imp_rounds, "distill": res.distill, "compute": res.compute,
        "hessian_diagonal_histograms": logs.iter().map(|(n, v)| serde_json::json!({"condition": n, "entries": v.len()})).collect::<Vec<_>>(),
    });
    if !res.sweep.is_empty() {
        summary["sweep"] = serde_json::to_value(&res.sweep)?;
    }
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;
    // Markdown.
    let preset = res.preset.as_ref();
    let mut md = String::new();
    writeln!(md, "# lmc report: {}\n", preset.map_or("", |p| p.name.as_str()))?;
    writeln!(md, "{}\n", preset.map_or("", |p| p.description.as_str()))?;
    writeln!(md, "## Conditions\n\nEach condition's subnetwork was trained {} times on real data from the same initialisation with different data orders. Barrier = max error along the linear path minus the mean of the endpoints (Frankle et al. 2020); under 2 points counts as linearly connected.\n", preset.map_or(0, |p| p.replicates))?;
    writeln!(md, "| condition | sparsity (%) | test accuracy (%) | error barrier (points) | loss barrier | L2 distance | Hessian trace (± s.e.) |\n|---|---|---|---|---|---|---|")?;
    for c in conds {
        writeln!(
            md,
            "| {} | {:.1} | {} | {} | {} | {} | {} |",
            c.condition,
            100.0 * c.sparsity,
            pct(c.test_accuracy_mean),
            pct(c.error_barrier_mean),
            fixed(c.loss_barrier_mean, 4),
            fixed(c.l2_distance_mean, 2),
            match (c.hessian_trace, c.hessian_trace_se) {
                (Some(t), Some(se)) => format!("{t:.3} ± {se:.3}"),
                _ => "-".into(),
            }
        )?;
    }
    // Which running statistics the barriers above used (batch-norm models only).
    let bn: Vec<&ConditionSummary> = conds.iter().filter(|c| c.norm_statistics != "none").collect();
    if !bn.is_empty() {
        writeln!(md, "\nBatch-norm running statistics along the path are interpolated with the weights in the table above (what the paper's authors did).")?;
    }
    if bn.iter().any(|c| c.error_barrier_reset_mean.is_some()) {
        writeln!(md, "With `--bn-reset` they were also re-estimated at every point from training batches:\n\n| condition | error barrier, interpolated statistics | error barrier, re-estimated | loss barrier, interpolated | loss barrier, re-estimated |\n|---|---|---|---|---|")?;
        for c in &bn {
            let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
            writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                c.condition,
                pct(c.error_barrier_mean),
                opt(c.error_barrier_reset_mean, &pct),
                fixed(c.loss_barrier_mean, 4),
                opt(c.loss_barrier_reset_mean, &|v| fixed(v, 4)),
            )?;
        }
    }
    if !res.sweep.is_empty() {
        writeln!(md, "\n## Across seeds\n\nEach seed's replicate mean, then mean ± sample standard deviation over the seeds.\n")?;
        writeln!(md, "| condition | seeds | sparsity (%) | test accuracy (%) | error barrier (points) | loss barrier |\n|---|---|---|---|---|---|")?;
        for s in &res.sweep {
            writeln!(
                md,
                "| {} | {} | {:.1} | {} ± {} | {} ± {} | {} ± {} |",
                s.condition,
                s.seeds.len(),
                100.0 * s.sparsity.mean,
                pct(s.test_accuracy.mean),
                pct(s.test_accuracy.std),
                pct(s.error_barrier.mean),
                pct(s.error_barrier.std),
                fixed(s.loss_barrier.mean, 4),
                fixed(s.loss_barrier.std, 4)
            )?;
        }
    }
    let img = |md: &mut String, file: &str, alt: &str| writeln!(md, "\n![{alt}]({file})\n");
    writeln!(md, "\n## Plots")?;
    img(&mut md, "accuracy_vs_sparsity.svg", "test accuracy vs sparsity per method")?;
    img(&mut md, "barrier_vs_sparsity.svg", "error barrier vs sparsity per method")?;
    img(&mut md, "interpolation.svg", "test error along each interpolation path")?;
    img(&mut md, "imp_rounds.svg", "test accuracy of each IMP round")?;
    for f in &landscape_files {
        img(&mut md, f, "loss landscape")?;
    }
    if !logs.is_empty() {
        img(&mut md, "hessian_diagonal.svg", "Hessian diagonal histograms")?;
    }
    if distill_png.is_some() {
        writeln!(md, "\n## Distilled images\n\nOne row per class. Test accuracy of networks trained on them: {}\n", res.distill.as_ref().and_then(|d| d.evaluation.as_ref()).map_or("not evaluated".into(), |e| format!("{}%", pct(e.test_accuracy_mean))))?;
        img(&mut md, "distilled.png", "distilled images, one row per class")?;
    }
    writeln!(md, "\n## Compute per stage\n\n| stage | images processed | seconds | cached |\n|---|---|---|---|")?;
    for s in &res.compute {
        writeln!(
            md,
            "| {} | {} | {:.1} | {} |",
            s.stage,
            s.images_processed.map_or("-".into(), |v| v.to_string()),
            s.seconds,
            s.cached
        )?;
    }
    writeln!(md, "\nEvery number above is in `summary.json`.")?;
    std::fs::write(dir.join("index.md"), &md)?;
    std::fs::write(dir.join("index.html"), markdown_to_html(&md))?;
    Ok(())
}

/// A tiny converter for the subset of Markdown the report uses (headings, paragraphs, tables,
/// images, inline code). Hand-written because the report needs nothing more, and a Markdown
/// crate would be the pipeline's largest dependency.
fn markdown_to_html(md: &str) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let inline = |s: &str| {
        let e = esc(s);
        let mut out = String::new();
        for (i, part) in e.split('`').enumerate() {
            if i % 2 == 1 {
                write!(out, "<code>{part}</code>").unwrap();
            } else {
                out.push_str(part);
            }
        }
        out
    };
    let mut html = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lmc report</title><style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}img{max-width:100%}</style></head><body>\n");
    let mut in_table = false;
    for line in md.lines() {
        let t = line.trim();
        if t.starts_with('|') {
            let cells: Vec<&str> = t.trim_matches('|').split('|').map(str::trim).collect();
            if cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
                continue;
            }
            if !in_table {
                html.push_str("<table>\n<tr>");
                for c in &cells {
                    write!(html, "<th>{}</th>", inline(c)).unwrap();
                }
                html.push_str("</tr>\n");
                in_table = true;
                continue;
            }
            html.push_str("<tr>");
            for c in &cells {
                write!(html, "<td>{}</td>", inline(c)).unwrap();
            }
            html.push_str("</tr>\n");
            continue;
        }
        if in_table {
            html.push_str("</table>\n");
            in_table = false;
        }
        if let Some(h) = t.strip_prefix("## ") {
            writeln!(html, "<h2>{}</h2>", inline(h)).unwrap();
        } else if let Some(h) = t.strip_prefix("# ") {
            writeln!(html, "<h1>{}</h1>", inline(h)).unwrap();
        } else if let Some(rest) = t.strip_prefix("![") {
            if let Some((alt, src)) = rest.split_once("](") {
                writeln!(
                    html,
                    "<p><img src=\"{}\" alt=\"{}\"></p>",
                    esc(src.trim_end_matches(')')),
                    esc(alt)
                )
                .unwrap();
            }
        } else if !t.is_empty() {
            writeln!(html, "<p>{}</p>", inline(t)).unwrap();
        }
    }
    if in_table {
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    #[test]
    fn markdown_tables_images_and_code_become_html() {
        let html = super::markdown_to_html(
            "# T\n\n| a | b |\n|---|---|\n| 1 | `x<y` |\n\n![alt](p.svg)\n",
        );
        assert!(html.contains("<h1>T</h1>"));
        assert!(html.contains("<tr><th>a</th><th>b</th></tr>"));
        assert!(html.contains("<td><code>x&lt;y</code></td>"));
        assert!(html.contains("<img src=\"p.svg\" alt=\"alt\">"));
        assert_eq!(html.matches("<table>").count(), html.matches("</table>").count());
    }
}
