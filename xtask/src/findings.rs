//! The report's plain answers to the study's two questions, worked out from its own numbers:
//! is the dense network unstable at initialisation and stable after some step k (Frankle et al.
//! 2020)? At each sparsity, are tickets found with distilled data more stable than real-data IMP
//! tickets and random ones (McDermott & Cummings)? Stable means an error barrier under
//! [`STABLE`], Frankle's threshold; "lower" and "higher" are claimed beyond noise only where
//! Welch's test on the seeds says so (the comparisons in `summary.json`).

use crate::pipeline::{Comparison, MeanStd, Results};

/// Frankle et al.'s threshold: a barrier under 2 percentage points counts as stable.
pub const STABLE: f64 = 0.02;

/// One condition across the seeds (one seed: no spread).
struct Row<'a> {
    method: &'a str,
    round: usize,
    k: u64,
    seeds: usize,
    sparsity: f64,
    accuracy: MeanStd,
    barrier: MeanStd,
    /// The barrier with running statistics re-estimated at every point (`--bn-reset`).
    reset: Option<MeanStd>,
}

fn rows(res: &Results) -> Vec<Row<'_>> {
    let one = |v: f64| MeanStd { mean: v, std: 0.0 };
    if res.sweep.is_empty() {
        return res
            .conditions
            .iter()
            .map(|c| Row {
                method: &c.method,
                round: c.round,
                k: c.spawn_step,
                seeds: 1,
                sparsity: c.sparsity,
                accuracy: one(c.test_accuracy_mean),
                barrier: one(c.error_barrier_mean),
                reset: c.error_barrier_reset_mean.map(one),
            })
            .collect();
    }
    res.sweep
        .iter()
        .map(|s| {
            let same = res.conditions.iter().filter(|c| {
                c.method == s.method && c.round == s.round && c.spawn_step == s.spawn_step
            });
            let reset: Option<Vec<f64>> = same.map(|c| c.error_barrier_reset_mean).collect();
            Row {
                method: &s.method,
                round: s.round,
                k: s.spawn_step,
                seeds: s.seeds.len(),
                sparsity: s.sparsity.mean,
                accuracy: s.test_accuracy,
                barrier: s.error_barrier,
                reset: reset.filter(|r| !r.is_empty()).map(|r| MeanStd::of(&r)),
            }
        })
        .collect()
}

/// `12.34 ± 0.56` in points (or percent), the spread only with several seeds.
fn points(m: MeanStd, seeds: usize) -> String {
    if seeds > 1 {
        format!("{:.2} ± {:.2}", 100.0 * m.mean, 100.0 * m.std)
    } else {
        format!("{:.2}", 100.0 * m.mean)
    }
}

fn stability(b: f64) -> &'static str {
    if b < STABLE {
        "stable"
    } else {
        "unstable"
    }
}

/// The answers as Markdown bullets (empty when the study has neither an instability sweep nor
/// distilled tickets at a sparsity with another method beside them).
pub fn findings(res: &Results) -> Vec<String> {
    let rows = rows(res);
    let find =
        |m: &str, r: usize, k: u64| rows.iter().find(|x| x.method == m && x.round == r && x.k == k);
    let mut out = Vec::new();
    // 1. Instability against the spawn step, for each swept condition.
    let mut swept: Vec<(&str, usize)> = Vec::new();
    for x in rows.iter().filter(|x| x.k > 0) {
        if !swept.contains(&(x.method, x.round)) {
            swept.push((x.method, x.round));
        }
    }
    for (m, r) in swept {
        let Some(start) = find(m, r, 0) else { continue };
        let mut later: Vec<&Row> =
            rows.iter().filter(|x| x.method == m && x.round == r && x.k > 0).collect();
        later.sort_by_key(|x| x.k);
        let name =
            if m == "dense" { "The dense network".to_string() } else { format!("`{m}-r{r}`") };
        let ladder: Vec<String> =
            later.iter().map(|x| format!("k = {}: {}", x.k, points(x.barrier, x.seeds))).collect();
        let first_stable = later.iter().find(|x| x.barrier.mean < STABLE);
        let mut s = format!(
            "**Instability.** {name} at initialisation (k = 0) has an error barrier of {} points: {}. Spawned later: {}. ",
            points(start.barrier, start.seeds),
            stability(start.barrier.mean),
            ladder.join(", ")
        );
        s += &match (start.barrier.mean >= STABLE, first_stable) {
            (true, Some(x)) => format!("It is stable from k = {} on the swept steps, Frankle et al.'s pattern (unstable at initialisation, stable early in training).", x.k),
            (true, None) => "No swept k brings it under 2 points: unstable throughout, so the swept steps are too early to show where it becomes stable.".into(),
            (false, _) if m == "dense" => "It is stable already at initialisation, unlike Frankle et al.'s ResNet-20.".into(),
            (false, _) => "It is stable already at initialisation.".into(),
        };
        if let (Some(r0), Some(last)) = (start.reset, later.last().and_then(|x| x.reset)) {
            s += &format!(
                " With running statistics re-estimated along the path: {} points at k = 0, {} at k = {}.",
                points(r0, start.seeds),
                points(last, start.seeds),
                later.last().map_or(0, |x| x.k)
            );
        }
        out.push(s);
    }
    // 2. Distilled tickets against IMP and random ones, per sparsity.
    let test = |a: &str, b: &str| -> Option<&Comparison> {
        res.comparisons.iter().find(|c| c.a == a && c.b == b)
    };
    for d in rows.iter().filter(|x| x.method == "distilled" && x.k == 0) {
        let others: Vec<&Row> =
            ["imp", "random", "imp-rewind"].iter().filter_map(|m| find(m, d.round, 0)).collect();
        if others.is_empty() {
            continue;
        }
        let label = |m: &str| match m {
            "imp" => "real-data IMP",
            "random" => "random",
            "imp-rewind" => "real-data IMP rewound",
            _ => "distilled",
        };
        let all: Vec<&Row> = std::iter::once(d).chain(others.iter().copied()).collect();
        let barriers: Vec<String> = all
            .iter()
            .map(|x| format!("{} {}", label(x.method), points(x.barrier, x.seeds)))
            .collect();
        let accuracies: Vec<String> = all
            .iter()
            .map(|x| format!("{} {}%", label(x.method), points(x.accuracy, x.seeds)))
            .collect();
        let mut s = format!(
            "**{:.1}% sparsity.** Error barriers (points): {}. Test accuracy: {}. ",
            100.0 * d.sparsity,
            barriers.join(", "),
            accuracies.join(", ")
        );
        // The paper's comparison: distilled against IMP and random, both at initialisation.
        let (mut lower, mut higher, mut untested) = (0, 0, 0);
        let mut verdicts = Vec::new();
        for o in others.iter().filter(|o| o.method != "imp-rewind") {
            let a = format!("distilled-r{}", d.round);
            let b = format!("{}-r{}", o.method, o.round);
            let dir = if d.barrier.mean < o.barrier.mean { "lower" } else { "higher" };
            let v = match test(&a, &b).and_then(|c| c.p_value.map(|p| (p, c.exceeds_spread))) {
                Some((p, true)) => {
                    if dir == "lower" {
                        lower += 1;
                    } else {
                        higher += 1;
                    }
                    format!(
                        "{dir} than {}'s beyond the seeds' spread (p = {p:.3})",
                        label(o.method)
                    )
                }
                Some((p, false)) => {
                    untested += 1;
                    format!(
                        "{dir} than {}'s but within the seeds' spread (p = {p:.3})",
                        label(o.method)
                    )
                }
                None => {
                    untested += 1;
                    format!("{dir} than {}'s (one seed or no spread: not tested)", label(o.method))
                }
            };
            verdicts.push(v);
        }
        if verdicts.is_empty() {
            out.push(s);
            continue;
        }
        s += &format!("The distilled tickets' barrier is {}. ", verdicts.join("; "));
        let compared = verdicts.len();
        s += if all.iter().all(|x| x.barrier.mean < STABLE) {
            "Every ticket here is stable (under 2 points), so there is no instability for distilled data to remove: this neither supports nor contradicts the paper's claim."
        } else if higher > 0 {
            "This contradicts the paper's claim at this sparsity."
        } else if lower == compared {
            "This supports the paper's claim at this sparsity."
        } else if lower > 0 {
            "This supports the paper's claim only in part at this sparsity."
        } else if untested == compared {
            "The differences are not shown beyond noise: these runs neither support nor contradict the paper's claim at this sparsity."
        } else {
            ""
        };
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{compare, SweepSummary};

    fn sweep(method: &str, round: usize, k: u64, barriers: &[f64]) -> SweepSummary {
        let ms = |v: f64| MeanStd { mean: v, std: 0.0 };
        SweepSummary {
            condition: format!(
                "{method}-r{round}{}",
                if k > 0 { format!("-k{k}") } else { String::new() }
            ),
            method: method.into(),
            round,
            spawn_step: k,
            seeds: (0..barriers.len() as u64).collect(),
            error_barriers: barriers.to_vec(),
            sparsity: ms(if round == 0 { 0.0 } else { 0.59 }),
            test_accuracy: ms(0.5),
            error_barrier: MeanStd::of(barriers),
            loss_barrier: ms(0.0),
        }
    }

    /// The answers follow the numbers: Frankle's pattern read off the k ladder, and the
    /// paper's claim judged by Welch's test, each way it can come out.
    #[test]
    fn findings_state_each_answer_the_numbers_give() {
        let mut res = Results::default();
        res.sweep = vec![
            sweep("dense", 0, 0, &[0.15, 0.17, 0.16]),
            sweep("dense", 0, 2, &[0.08, 0.09, 0.07]),
            sweep("dense", 0, 32, &[0.010, 0.012, 0.011]),
            sweep("distilled", 4, 0, &[0.03, 0.035, 0.032]),
            sweep("imp", 4, 0, &[0.10, 0.12, 0.11]),
            sweep("random", 4, 0, &[0.031, 0.036, 0.030]),
        ];
        res.comparisons = compare(&res.sweep);
        let f = findings(&res);
        assert_eq!(f.len(), 2, "{f:#?}");
        assert!(f[0].contains("16.00 ± 1.00 points: unstable"), "{}", f[0]);
        assert!(f[0].contains("stable from k = 32"), "{}", f[0]);
        assert!(f[1].contains("59.0% sparsity"), "{}", f[1]);
        assert!(f[1].contains("lower than real-data IMP's beyond the seeds' spread"), "{}", f[1]);
        assert!(f[1].contains("within the seeds' spread"), "{}", f[1]);
        assert!(f[1].contains("only in part"), "{}", f[1]);
        // Distilled clearly worse than IMP: a contradiction, said so.
        res.sweep[3] = sweep("distilled", 4, 0, &[0.20, 0.21, 0.22]);
        res.comparisons = compare(&res.sweep);
        let f = findings(&res);
        assert!(f[1].contains("higher than real-data IMP's beyond"), "{}", f[1]);
        assert!(f[1].contains("contradicts the paper's claim"), "{}", f[1]);
        // Every ticket stable: the question is moot.
        for (i, m) in [(3, "distilled"), (4, "imp"), (5, "random")] {
            res.sweep[i] = sweep(m, 4, 0, &[0.005, 0.006, 0.004]);
        }
        res.comparisons = compare(&res.sweep);
        assert!(findings(&res)[1].contains("neither supports nor contradicts"));
        // A dense network stable from the start.
        res.sweep[0] = sweep("dense", 0, 0, &[0.01, 0.011, 0.009]);
        assert!(findings(&res)[0].contains("stable already at initialisation"));
    }
}
