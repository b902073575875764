//! `bench byzantine`: the island demo under each Byzantine preset, beside `calm` runs with the
//! same seed and size, alternated over rounds so the machine's noise falls on all of them.
//! Prints, per preset, whether the checker passed and the median of the honest writes'
//! propagation p50 and p99, with p99 over calm's; writes JSON.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::bench_sync::profile;
use crate::island::plan::Preset;
use crate::island::{DemoArgs, Mode, run_demo};

/// The presets measured, calm first.
const PRESETS: [Preset; 7] = [
    Preset::Calm,
    Preset::Forged,
    Preset::Stranger,
    Preset::Revoked,
    Preset::Garbage,
    Preset::Flood,
    Preset::Mute,
];

/// The figures of one preset over the rounds.
#[derive(Debug, Default, Serialize)]
pub struct PresetFigures {
    pub passed: Vec<bool>,
    pub propagation_p50_ms: Vec<u64>,
    pub propagation_p99_ms: Vec<u64>,
    pub median_p50_ms: Option<u64>,
    pub median_p99_ms: Option<u64>,
    /// Median p99 over calm's median p99.
    pub p99_over_calm: Option<f64>,
    pub bad_changes_sent: Vec<u64>,
    pub bad_changes_accepted: Vec<u64>,
}

#[derive(Serialize)]
struct ByzantineBench {
    profile: &'static str,
    nodes: u16,
    files: u32,
    duration_s: u64,
    rounds: usize,
    seed: u64,
    presets: BTreeMap<String, PresetFigures>,
    /// Under flood, the honest writes' p99 may be at most this many times calm's.
    target_flood_p99_over_calm: f64,
}

fn median(values: &[u64]) -> Option<u64> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied()
}

/// Runs every preset `rounds` times; prints a table; writes JSON to `json`.
pub fn run(
    nodes: u16,
    files: u32,
    duration_s: u64,
    rounds: usize,
    seed: u64,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("estuary-bench-byzantine-")
        .tempdir()?;
    let mut presets: BTreeMap<String, PresetFigures> = BTreeMap::new();
    for round in 0..rounds {
        for preset in PRESETS {
            let name = format!("{preset:?}").to_lowercase();
            eprintln!("round {}/{rounds}: {name}", round + 1);
            let report = run_demo(&DemoArgs {
                nodes,
                files,
                seed: Some(seed),
                duration: duration_s,
                loss: 0,
                preset,
                mode: Mode::Inproc,
                report_dir: scratch.path().join(format!("{name}-{round}")),
                converge_timeout: 120,
                estuary: None,
                canary: false,
            })?;
            let figures = presets.entry(name).or_default();
            figures.passed.push(report.passed());
            if let Some(p50) = report.propagation.p50_ms {
                figures.propagation_p50_ms.push(p50);
            }
            if let Some(p99) = report.propagation.p99_ms {
                figures.propagation_p99_ms.push(p99);
            }
            if let Some(byzantine) = &report.byzantine {
                figures.bad_changes_sent.push(byzantine.bad_changes_sent);
                figures
                    .bad_changes_accepted
                    .push(byzantine.bad_changes_accepted);
            }
        }
    }
    for figures in presets.values_mut() {
        figures.median_p50_ms = median(&figures.propagation_p50_ms);
        figures.median_p99_ms = median(&figures.propagation_p99_ms);
    }
    let calm_p99 = presets.get("calm").and_then(|f| f.median_p99_ms);
    for figures in presets.values_mut() {
        figures.p99_over_calm = match (figures.median_p99_ms, calm_p99) {
            (Some(p99), Some(calm)) if calm > 0 => Some(p99 as f64 / calm as f64),
            _ => None,
        };
    }
    println!(
        "byzantine presets: {nodes} nodes, {files} files, {duration_s} s, {rounds} rounds, seed {seed} ({})",
        profile()
    );
    println!(
        "  {:<9} {:>7} {:>9} {:>9} {:>10}",
        "preset", "passed", "p50 ms", "p99 ms", "p99/calm"
    );
    for preset in PRESETS {
        let name = format!("{preset:?}").to_lowercase();
        let Some(f) = presets.get(&name) else {
            continue;
        };
        let show = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
        println!(
            "  {:<9} {:>3}/{:<3} {:>9} {:>9} {:>10}",
            name,
            f.passed.iter().filter(|p| **p).count(),
            f.passed.len(),
            show(f.median_p50_ms),
            show(f.median_p99_ms),
            f.p99_over_calm.map_or("-".into(), |r| format!("{r:.2}")),
        );
    }
    let bench = ByzantineBench {
        profile: profile(),
        nodes,
        files,
        duration_s,
        rounds,
        seed,
        presets,
        target_flood_p99_over_calm: 2.0,
    };
    if let Some(path) = json {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&bench)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
