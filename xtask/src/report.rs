//! The pipeline report: `OUT/report/index.md`, the same as `index.html`, SVG plots and
//! `summary.json` with every number the plots show.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::pipeline::{ConditionSummary, MeanStd, Results, SweepSummary};
use crate::plot::{self, Series};

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
    // Every method's line starts at the dense network (sparsity 0); the spawned copies of an
    // instability sweep have their own plot.
    let unspawned: Vec<ConditionSummary> =
        conds.iter().filter(|c| c.spawn_step == 0).cloned().collect();
    let sweep: Vec<&SweepSummary> = res.sweep.iter().filter(|s| s.spawn_step == 0).collect();
    let mut methods: Vec<&str> = Vec::new();
    for c in unspawned.iter().filter(|c| c.method != "dense") {
        if !methods.contains(&c.method.as_str()) {
            methods.push(&c.method);
        }
    }
    // Accuracy vs sparsity (replicates retrained on real data), and barrier vs sparsity.
    let mut acc = Vec::new();
    let mut bar = Vec::new();
    for m in methods {
        if !sweep.is_empty() {
            // A seed sweep plots each condition's mean over the seeds, with +- one standard
            // deviation as error bars.
            let sw: Vec<&&SweepSummary> =
                sweep.iter().filter(|s| s.method == m || s.method == "dense").collect();
            let series = |value: fn(&SweepSummary) -> MeanStd| Series {
                name: m.to_string(),
                points: sw
                    .iter()
                    .map(|s| (100.0 * s.sparsity.mean, 100.0 * value(s).mean))
                    .collect(),
                err: sw.iter().map(|s| 100.0 * value(s).std).collect(),
            };
            acc.push(series(|s| s.test_accuracy));
            bar.push(series(|s| s.error_barrier));
            continue;
        }
        let pts = |value: fn(&ConditionSummary) -> f64| -> Vec<(f64, f64)> {
            unspawned
                .iter()
                .filter(|c| c.method == m || c.method == "dense")
                .map(|c| (100.0 * c.sparsity, 100.0 * value(c)))
                .collect()
        };
        acc.push(Series::new(m, pts(|c| c.test_accuracy_mean)));
        bar.push(Series::new(m, pts(|c| c.error_barrier_mean)));
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
    // Error along each interpolation path: the conditions trained from their start, of the
    // first seed in a sweep (every path is in `summary.json`; dozens of lines would hide them).
    let first_seed = conds.first().and_then(|c| c.seed);
    let paths: Vec<Series> = conds
        .iter()
        .filter(|c| c.spawn_step == 0 && c.seed == first_seed)
        .map(|c| {
            let points = c.interpolation.iter().map(|p| (p.alpha, 100.0 * p.error)).collect();
            Series::new(c.condition.clone(), points)
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
        rounds.push(Series::new(label, pts));
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
    // Hessian spectral densities (PyHessian's plot: log density against eigenvalue).
    let densities: Vec<Series> = conds
        .iter()
        .filter(|c| !c.hessian_density.is_empty())
        .map(|c| {
            let pts = c.hessian_density.iter().map(|&(x, d)| (x, d.max(1e-12).log10())).collect();
            Series::new(c.condition.clone(), pts)
        })
        .collect();
    if !densities.is_empty() {
        plot::lines(
            &dir.join("hessian_density.svg"),
            "Hessian spectral density (stochastic Lanczos quadrature)",
            "eigenvalue",
            "log10 density",
            &densities,
        )?;
    }
    // Instability: each swept condition's error barrier against its spawn step k (k = 0 is
    // the condition itself), the mean over seeds with +- one standard deviation in a sweep.
    let instability = instability_rows(res);
    if !instability.is_empty() {
        let mut lines: Vec<Series> = Vec::new();
        for (base, k, b) in instability.iter().filter(|r| r.1 > 0) {
            let i = match lines.iter().position(|l| &l.name == base) {
                Some(i) => i,
                None => {
                    lines.push(Series::new(base.clone(), vec![]));
                    lines.len() - 1
                }
            };
            lines[i].points.push(((*k as f64).log10(), 100.0 * b.mean));
            lines[i].err.push(100.0 * b.std);
        }
        plot::lines(
            &dir.join("barrier_vs_step.svg"),
            "Instability: error barrier between copies spawned at step k",
            "spawn step k (log10 scale: 2 = 100 steps, 3 = 1000)",
            "test error barrier (percentage points)",
            &lines,
        )?;
    }
    let mut summary = serde_json::json!({
        "preset": res.preset, "conditions": res.conditions, "imp_rounds": res.imp_rounds, "distill": res.distill, "compute": res.compute,
        "hessian_diagonal_histograms": logs.iter().map(|(n, v)| serde_json::json!({"condition": n, "entries": v.len()})).collect::<Vec<_>>(),
    });
    if !res.sweep.is_empty() {
        summary["sweep"] = serde_json::to_value(&res.sweep)?;
        summary["comparisons"] = serde_json::to_value(&res.comparisons)?;
    }
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(&summary)?)?;
    // Markdown.
    let preset = res.preset.as_ref();
    let mut md = String::new();
    writeln!(md, "# lmc report: {}\n", preset.map_or("", |p| p.name.as_str()))?;
    writeln!(md, "{}\n", preset.map_or("", |p| p.description.as_str()))?;
    let answers = crate::findings::findings(res);
    if !answers.is_empty() {
        let stats = if res.conditions.iter().any(|c| c.norm_statistics != "none") {
            ", with the running statistics interpolated along the path (what the paper's authors did)"
        } else {
            ""
        };
        writeln!(md, "## Findings\n\nWorked out from the tables below. Stable: an error barrier under 2 points (Frankle et al. 2020){stats}; beyond noise: Welch's test on the seeds, p < 0.05.\n")?;
        for a in &answers {
            writeln!(md, "- {a}")?;
        }
        writeln!(md)?;
    }
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
    if !res.comparisons.is_empty() {
        writeln!(md, "\n## Differences against the seeds' spread\n\nWelch's two-sided t-test on the per-seed mean error barriers of two conditions (unequal variances, n = seeds per condition); a difference \"exceeds the spread\" when p < 0.05. With few seeds only large, consistent differences pass.\n")?;
        writeln!(md, "| a | b | barrier a - b (points) | t | df | p | exceeds the spread |\n|---|---|---|---|---|---|---|")?;
        for c in &res.comparisons {
            let opt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| fixed(v, d));
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} |",
                c.a,
                c.b,
                pct(c.difference),
                opt(c.t, 2),
                opt(c.df, 1),
                opt(c.p_value, 3),
                if c.p_value.is_none() {
                    "no spread to test"
                } else if c.exceeds_spread {
                    "yes"
                } else {
                    "no"
                }
            )?;
        }
    }
    if !instability.is_empty() {
        writeln!(md, "\n## Instability (Frankle et al. 2020)\n\nCopies spawned at step k from one parent trained from the condition's start (`lmc train --spawn-step k`); k = 0 is the condition itself. A network is stable at k when the barrier is near 0.\n")?;
        writeln!(md, "| condition | spawn step k | error barrier (points) |\n|---|---|---|")?;
        for (base, k, b) in &instability {
            let spread =
                if res.sweep.is_empty() { String::new() } else { format!(" ± {}", pct(b.std)) };
            writeln!(md, "| {base} | {k} | {}{spread} |", pct(b.mean))?;
        }
    }
    let img = |md: &mut String, file: &str, alt: &str| writeln!(md, "\n![{alt}]({file})\n");
    writeln!(md, "\n## Plots")?;
    img(&mut md, "accuracy_vs_sparsity.svg", "test accuracy vs sparsity per method")?;
    img(&mut md, "barrier_vs_sparsity.svg", "error barrier vs sparsity per method")?;
    img(&mut md, "interpolation.svg", "test error along each interpolation path")?;
    img(&mut md, "imp_rounds.svg", "test accuracy of each IMP round")?;
    if !instability.is_empty() {
        img(&mut md, "barrier_vs_step.svg", "error barrier vs spawn step k")?;
    }
    for f in &landscape_files {
        img(&mut md, f, "loss landscape")?;
    }
    if !logs.is_empty() {
        img(&mut md, "hessian_diagonal.svg", "Hessian diagonal histograms")?;
    }
    if !densities.is_empty() {
        img(&mut md, "hessian_density.svg", "Hessian spectral density per condition")?;
    }
    if distill_png.is_some() {
        let quality = res.distill.as_ref().and_then(|d| d.evaluation.as_ref()).map_or(
            "not evaluated (add `eval-models` to `[distill.args]`)".into(),
            |e| {
                let mut q = format!(
                    "{}% ± {} ({} fresh {} networks, {} epochs each)",
                    pct(e.test_accuracy_mean),
                    pct(e.test_accuracy_std),
                    e.eval_models,
                    e.eval_model,
                    e.eval_epochs
                );
                if let Some(b) = &e.baseline {
                    q += &format!(
                        "; the same training on the random real images they started from: {}% ± {}",
                        pct(b.baseline_test_accuracy_mean),
                        pct(b.baseline_test_accuracy_std)
                    );
                }
                q
            },
        );
        let shared = match res.preset.as_ref().and_then(|p| p.distill_seed) {
            Some(d) if !res.sweep.is_empty() => {
                format!(" One distillation (seed {d}) serves every initialisation seed.")
            }
            _ => String::new(),
        };
        writeln!(md, "\n## Distilled images\n\nOne row per class. Test accuracy of networks trained on them: {quality}.{shared}\n")?;
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
    // The paper's "fewer points" claim: images each ticket search processed, summed over seeds.
    let images = |prefix: &str| -> u64 {
        let kind = |name: &str| name.split("-s").next() == Some(prefix) || name == prefix;
        res.compute.iter().filter(|s| kind(&s.stage)).filter_map(|s| s.images_processed).sum()
    };
    let (real, search, distill) =
        (images("prune-real"), images("prune-distilled"), images("distill"));
    if real > 0 && search > 0 {
        // "3.1x fewer", or "1.7x more" when the distilled path processed more.
        let ratio = |ours: u64| {
            let r = real as f64 / ours as f64;
            if r >= 1.0 {
                format!("{r:.1}x fewer")
            } else {
                format!("{:.1}x more", 1.0 / r)
            }
        };
        writeln!(
            md,
            "\nTicket searches: real-data IMP processed {real} training images; IMP on the distilled set {search} ({}), {} with its distillation ({}).",
            ratio(search),
            search + distill,
            ratio(search + distill)
        )?;
    }
    writeln!(md, "\nEvery number above is in `summary.json`.")?;
    std::fs::write(dir.join("index.md"), &md)?;
    std::fs::write(dir.join("index.html"), markdown_to_html(&md))?;
    Ok(())
}

/// The instability sweep's rows: (swept condition, spawn step k, error barrier), k = 0 first
/// for each condition; across seeds in a seed sweep (mean and standard deviation), else the
/// one seed's value with no spread.
fn instability_rows(res: &Results) -> Vec<(String, u64, MeanStd)> {
    // (method, round, spawn step, barrier) of every condition, across seeds in a sweep.
    let all: Vec<(&str, usize, u64, MeanStd)> = if res.sweep.is_empty() {
        let one = |v| MeanStd { mean: v, std: 0.0 };
        res.conditions
            .iter()
            .map(|c| (c.method.as_str(), c.round, c.spawn_step, one(c.error_barrier_mean)))
            .collect()
    } else {
        res.sweep
            .iter()
            .map(|s| (s.method.as_str(), s.round, s.spawn_step, s.error_barrier))
            .collect()
    };
    let mut bases: Vec<(&str, usize)> = Vec::new();
    for &(m, r, k, _) in &all {
        if k > 0 && !bases.contains(&(m, r)) {
            bases.push((m, r));
        }
    }
    let mut rows = Vec::new();
    for (m, r) in bases {
        let mut g: Vec<_> = all.iter().filter(|x| x.0 == m && x.1 == r).collect();
        g.sort_by_key(|x| x.2);
        rows.extend(g.iter().map(|x| (format!("{m}-r{r}"), x.2, x.3)));
    }
    rows
}

/// A tiny converter for the subset of Markdown the report uses (headings, paragraphs, tables,
/// images, bullet lists, inline code and bold). Hand-written because the report needs nothing
/// more, and a Markdown crate would be the pipeline's largest dependency.
fn markdown_to_html(md: &str) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let inline = |s: &str| {
        let e = esc(s);
        let mut out = String::new();
        for (i, part) in e.split('`').enumerate() {
            if i % 2 == 1 {
                write!(out, "<code>{part}</code>").unwrap();
            } else {
                // **bold** outside code.
                for (j, piece) in part.split("**").enumerate() {
                    if j % 2 == 1 {
                        write!(out, "<strong>{piece}</strong>").unwrap();
                    } else {
                        out.push_str(piece);
                    }
                }
            }
        }
        out
    };
    let mut html = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>lmc report</title><style>body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}img{max-width:100%}</style></head><body>\n");
    let (mut in_table, mut in_list) = (false, false);
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
        if let Some(item) = t.strip_prefix("- ") {
            if !in_list {
                html.push_str("<ul>\n");
                in_list = true;
            }
            writeln!(html, "<li>{}</li>", inline(item)).unwrap();
            continue;
        }
        if in_list {
            html.push_str("</ul>\n");
            in_list = false;
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
    if in_list {
        html.push_str("</ul>\n");
    }
    html.push_str("</body></html>\n");
    html
}

#[cfg(test)]
mod tests {
    #[test]
    fn markdown_tables_images_and_code_become_html() {
        let html = super::markdown_to_html(
            "# T\n\n| a | b |\n|---|---|\n| 1 | `x<y` |\n\n![alt](p.svg)\n\n- **A.** one `**`\n- two\n\nend\n",
        );
        assert!(html.contains("<ul>\n<li><strong>A.</strong> one <code>**</code></li>\n<li>two</li>\n</ul>\n<p>end</p>"), "{html}");
        assert!(html.contains("<h1>T</h1>"));
        assert!(html.contains("<tr><th>a</th><th>b</th></tr>"));
        assert!(html.contains("<td><code>x&lt;y</code></td>"));
        assert!(html.contains("<img src=\"p.svg\" alt=\"alt\">"));
        assert_eq!(html.matches("<table>").count(), html.matches("</table>").count());
    }
}
