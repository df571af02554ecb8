//! `vmatrix sim --suite tune|held-out|both`: reads the development traces and prints the
//! suite's table ([`vmatrix_sim::suite`]) with the targets checked.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use vmatrix_sim::suite::{held, loss, PairResult, PARTS};
use vmatrix_sim::{Pool, Settings};

/// The directory of the development traces: `--traces-dir`, or `../shared/traces` from here.
pub fn traces_dir(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_owned());
    }
    let d = PathBuf::from("../shared/traces");
    if d.is_dir() {
        Ok(d)
    } else {
        bail!("the development traces are not in ../shared/traces: give --traces-dir DIR")
    }
}

/// Reads the trace files of [`PARTS`] from `dir` and runs the suite.
pub fn run_suite(
    dir: &Path,
    held_out: bool,
    settings: &Settings,
    pool: &Pool,
    standby_max: u32,
    spread: bool,
) -> Result<Vec<PairResult>> {
    let texts: Vec<String> = PARTS
        .iter()
        .map(|p| {
            let path = dir.join(p.file);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        })
        .collect::<Result<_>>()?;
    vmatrix_sim::suite::run_suite(&texts, held_out, settings, pool, standby_max, spread)
        .map_err(|e| anyhow!(e))
}

/// Prints the suite's table and returns how many pairs miss a target.
pub fn print(results: &[PairResult], title: &str) -> usize {
    println!("\n{title}\n");
    println!(
        "| high (p10) / low (p5) | days | lower bound | static | reactive | switching | ÷ reactive | \
         high lost | low lost | high held | reactive: high lost / held | targets |"
    );
    println!("|{}", " --- |".repeat(12));
    let mut missed = 0;
    for r in results {
        let misses = r.misses();
        if !misses.is_empty() {
            missed += 1;
        }
        println!(
            "| {} / {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3}% | {:.3}% | {:.3}% | {:.3}% / {:.3}% | {} |",
            r.high,
            r.low,
            r.days,
            r.lower.machine_hours,
            r.stat.machine_hours,
            r.reactive.machine_hours,
            r.switching.machine_hours,
            r.switching.machine_hours / r.reactive.machine_hours.max(1e-9),
            loss(&r.switching, "high") * 100.0,
            loss(&r.switching, "low") * 100.0,
            held(&r.switching, "high") * 100.0,
            loss(&r.reactive, "high") * 100.0,
            held(&r.reactive, "high") * 100.0,
            if misses.is_empty() {
                "met".to_string()
            } else {
                misses.join("; ")
            }
        );
    }
    missed
}
