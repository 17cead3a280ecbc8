//! `lmc bench --vs-torch SCRIPT`: lmc and PyTorch's reference script side by side in one run.
//!
//! Speed targets here are ratios against PyTorch on the same host at the same hour: the development
//! VM (Intel Xeon with AVX-512, 2 cores) drifted by up to 1.6x within minutes in December 2026, so
//! a ratio is only meaningful between runs next to each other. The two alternate, each run its own
//! process (lmc, PyTorch, lmc, ..., lmc: one more lmc run than PyTorch runs), and every workload's
//! ratio is taken between adjacent runs (2 x rounds of them) with their median; each process's peak
//! resident memory comes from the kernel (`wait4`). The header names when and on what it ran (UTC
//! date, CPU model and vector instruction set, cores, load), as every measured figure in this
//! repository must.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// One process's result: images per second by workload, and its peak resident memory in bytes
/// (where the platform reports it).
struct Sample {
    rates: Vec<f64>,
    peak_rss: Option<u64>,
}

/// What was asked of both sides.
pub struct Plan<'a> {
    /// The reference script.
    pub script: &'a Path,
    /// Its interpreter.
    pub python: &'a str,
    /// PyTorch runs (lmc runs one more).
    pub rounds: usize,
    /// Threads for both.
    pub threads: usize,
    /// Timed repeats per workload for both.
    pub repeats: usize,
    /// Step-count scale (the script's `--steps` is 20 x this).
    pub scale: f64,
    /// The workloads, by the names both use.
    pub workloads: Vec<&'static str>,
    /// One JSON object instead of a table.
    pub json: bool,
}

/// Runs the alternation and prints it.
pub fn run(p: &Plan) -> Result<()> {
    if !p.script.is_file() {
        bail!("--vs-torch {}: no such file", p.script.display());
    }
    if p.rounds == 0 {
        bail!("--rounds 0: needs at least one PyTorch run");
    }
    let exe = std::env::current_exe().context("locating the lmc executable")?;
    let mut lmc_cmd = Command::new(exe);
    lmc_cmd.args(["bench", "--json", "--threads", &p.threads.to_string()]);
    lmc_cmd.args(["--repeats", &p.repeats.to_string(), "--scale", &p.scale.to_string(), "--only"]);
    lmc_cmd.args(&p.workloads);
    let steps = ((20.0 * p.scale).round() as usize).max(1);
    let mut torch_cmd = Command::new(p.python);
    torch_cmd.arg(p.script);
    torch_cmd.args(["--threads", &p.threads.to_string(), "--steps", &steps.to_string()]);
    torch_cmd.args(["--repeats", &p.repeats.to_string(), "--only"]);
    torch_cmd.args(&p.workloads);
    let torch_name = format!("{} {}", p.python, p.script.display());

    let header = host_line(p.threads);
    if !p.json {
        println!("{header}");
    }
    let (mut lmc, mut torch) = (Vec::new(), Vec::new());
    let mut torch_engine = String::new();
    for round in 0..=p.rounds {
        lmc.push(sample(&mut lmc_cmd, "lmc bench", &p.workloads)?.0);
        if round == p.rounds {
            break;
        }
        let (s, engine) = sample(&mut torch_cmd, &torch_name, &p.workloads)?;
        torch.push(s);
        torch_engine = engine;
        if !p.json {
            eprintln!("round {} of {} done", round + 1, p.rounds);
        }
    }

    let mut rows = Vec::new();
    for (w, name) in p.workloads.iter().enumerate() {
        let l: Vec<f64> = lmc.iter().map(|s| s.rates[w]).collect();
        let t: Vec<f64> = torch.iter().map(|s| s.rates[w]).collect();
        let r = adjacent_ratios(&l, &t);
        let m = median(&r);
        rows.push((name, l, t, r, m));
    }
    let rss = |v: &[Sample]| -> Vec<Option<u64>> { v.iter().map(|s| s.peak_rss).collect() };
    if p.json {
        let workloads: serde_json::Map<String, Value> = rows
            .iter()
            .map(|(name, l, t, r, m)| {
                (
                    name.to_string(),
                    json!({"lmc": l, "torch": t, "adjacent_ratios": r, "median_ratio": m}),
                )
            })
            .collect();
        println!(
            "{}",
            json!({
                "host": header,
                "torch_engine": torch_engine,
                "workloads": workloads,
                "peak_rss_bytes": {"lmc": rss(&lmc), "torch": rss(&torch)},
            })
        );
        return Ok(());
    }
    println!("PyTorch: {torch_engine}; lmc first and last, {} rounds", p.rounds);
    for (name, l, t, r, m) in &rows {
        println!("{name}");
        println!("  lmc      images/s  {}", list(l, 1));
        println!("  PyTorch  images/s  {}", list(t, 1));
        println!("  adjacent lmc/PyTorch {}  median {m:.2}", list(r, 2));
    }
    let gb = |v: Vec<Option<u64>>| {
        v.iter()
            .map(|b| b.map_or("?".to_string(), |b| format!("{:.2}", b as f64 / 1e9)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    println!("peak resident memory (GB): lmc {}, PyTorch {}", gb(rss(&lmc)), gb(rss(&torch)));
    Ok(())
}

/// The numbers joined by " / " with `digits` decimals.
fn list(v: &[f64], digits: usize) -> String {
    v.iter().map(|x| format!("{x:.digits$}")).collect::<Vec<_>>().join(" / ")
}

/// Ratios of lmc's runs to each PyTorch run next to them, in time order: `lmc[i] / torch[i]`,
/// then `lmc[i + 1] / torch[i]`, for the alternation lmc, PyTorch, lmc, ... (`lmc` one longer).
fn adjacent_ratios(lmc: &[f64], torch: &[f64]) -> Vec<f64> {
    debug_assert_eq!(lmc.len(), torch.len() + 1);
    torch.iter().enumerate().flat_map(|(i, t)| [lmc[i] / t, lmc[i + 1] / t]).collect()
}

/// The median (the mean of the middle two for an even count); NaN for none.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Runs `cmd`, reads the JSON object on its last line of output (`images_per_s` for each
/// workload, as both `lmc bench --json` and the reference script print it), and returns it with
/// the object's `engine`.
fn sample(cmd: &mut Command, name: &str, workloads: &[&str]) -> Result<(Sample, String)> {
    let (status, out, err, peak_rss) =
        run_measured(cmd).with_context(|| format!("running `{name}`"))?;
    if !status.success() {
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
        bail!("`{name}` failed ({status}): {last}");
    }
    let v = parse_last_object(&out).ok_or_else(|| anyhow!("`{name}` printed no JSON object"))?;
    let rates = workloads
        .iter()
        .map(|w| {
            v["images_per_s"][*w]
                .as_f64()
                .filter(|r| r.is_finite() && *r > 0.0)
                .ok_or_else(|| anyhow!("`{name}` printed no images_per_s for {w}"))
        })
        .collect::<Result<Vec<f64>>>()?;
    let engine = v["engine"].as_str().unwrap_or("?").to_string();
    Ok((Sample { rates, peak_rss }, engine))
}

/// The last line of `out` that parses as a JSON object.
fn parse_last_object(out: &str) -> Option<Value> {
    out.lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .find_map(|l| serde_json::from_str::<Value>(l).ok().filter(Value::is_object))
}

/// Runs `cmd` to its end: exit status, stdout, stderr, and the process's peak resident memory
/// in bytes (Linux and other Unix: `wait4`'s `ru_maxrss`, in KiB there).
fn run_measured(
    cmd: &mut Command,
) -> std::io::Result<(std::process::ExitStatus, String, String, Option<u64>)> {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    // stderr on its own thread: a child that fills one pipe while we block reading the other
    // would otherwise never finish.
    let mut err_pipe = child.stderr.take().expect("piped");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err_pipe.read_to_string(&mut s).map(|_| s)
    });
    let mut out = String::new();
    child.stdout.take().expect("piped").read_to_string(&mut out)?;
    let err = err_reader.join().expect("stderr reader")?;
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        let mut status = 0;
        // SAFETY: an all-zero `rusage` is a valid value; `wait4` reaps our own child, whose pid
        // std has not waited for (so not reused) and will not wait for again.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let pid = child.id() as libc::pid_t;
        let r = loop {
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            if r != -1 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
            {
                break r;
            }
        };
        if r == pid {
            let rss = u64::try_from(usage.ru_maxrss).ok().map(|k| k * 1024);
            return Ok((std::process::ExitStatus::from_raw(status), out, err, rss));
        }
        Err(std::io::Error::last_os_error())
    }
    #[cfg(not(unix))]
    {
        let status = child.wait()?;
        Ok((status, out, err, None))
    }
}

/// "2026-12-07 01:20 UTC, Intel(R) Xeon(R) Processor, AVX-512, 2 cores, 2 threads, load 0.52".
fn host_line(threads: usize) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let (h, mi) = (secs % 86_400 / 3600, secs % 3600 / 60);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(|l| format!(", load {l}")))
        .unwrap_or_default();
    format!(
        "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02} UTC, {cpu}, {}, {cores} cores, {threads} threads{load}",
        vector_isa()
    )
}

/// The widest vector instruction set the CPU has, as the README names it.
fn vector_isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "AVX-512";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "AVX2";
        }
        "SSE2"
    }
    #[cfg(not(target_arch = "x86_64"))]
    std::env::consts::ARCH
}

/// The proleptic Gregorian (year, month, day) of a day count from 1970-01-01. Written by hand
/// (Hinnant's `civil_from_days`) rather than pulling a date crate in for one header line.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_give_the_calendar_dates_python_gives() {
        // Oracle: Python's datetime.date.fromordinal(date(1970, 1, 1).toordinal() + z).
        for (z, want) in [
            (0, (1970, 1, 1)),
            (59, (1970, 3, 1)),
            (10_957, (2000, 1, 1)),
            (11_015, (2000, 2, 28)),
            (11_016, (2000, 2, 29)),
            (11_017, (2000, 3, 1)),
            (-1, (1969, 12, 31)),
            (20_794, (2026, 12, 7)),
            (47_540, (2100, 2, 28)),
            (47_541, (2100, 3, 1)),
        ] {
            assert_eq!(civil_from_days(z), want, "day {z}");
        }
    }

    #[test]
    fn ratios_pair_each_pytorch_run_with_the_lmc_runs_beside_it() {
        // The 2026-12-07 00:52-00:56 UTC alternation in the README, first two rounds: lmc 551.7,
        // PyTorch 365.4, lmc 496.0, PyTorch 436.7, lmc 506.2.
        let r = adjacent_ratios(&[551.7, 496.0, 506.2], &[365.4, 436.7]);
        let want = [551.7 / 365.4, 496.0 / 365.4, 496.0 / 436.7, 506.2 / 436.7];
        assert_eq!(r, want);
        // By hand: 1.510, 1.357, 1.136, 1.159 -> the middle two 1.159 and 1.357.
        assert!((median(&r) - (506.2 / 436.7 + 496.0 / 365.4) / 2.0).abs() < 1e-12);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn the_reference_scripts_last_line_is_read() {
        // What torch_reference.py printed on 2026-12-07 (PyTorch 2.15, 2 threads), after a
        // warning line of the kind PyTorch writes.
        let out = "UserWarning: something {not json}\n{\"engine\": \"torch 2.15.0+cu132\", \
                   \"threads\": 2, \"images_per_s\": {\"resnet20_cifar_b128\": 365.4}}\n";
        let v = parse_last_object(out).unwrap();
        assert_eq!(v["images_per_s"]["resnet20_cifar_b128"].as_f64(), Some(365.4));
        assert_eq!(v["engine"].as_str(), Some("torch 2.15.0+cu132"));
        assert!(parse_last_object("no json here\n[1, 2]\n").is_none());
    }
}
