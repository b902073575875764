//! `bench model`: what one typical health file and one full-cycle referral cost to build,
//! store and load. Prints medians (and p90) over many runs and writes `bench-model.json`.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use estuary_node::model::*;
use serde::Serialize;

use crate::sample::*;

#[derive(Serialize)]
struct Figures {
    document: &'static str,
    changes: usize,
    build_ms_median: f64,
    build_ms_p90: f64,
    saved_bytes: usize,
    load_ms_median: f64,
    load_ms_p90: f64,
    load_unvalidated_ms_median: f64,
}

#[derive(Serialize)]
struct Report {
    iterations: usize,
    profile: &'static str,
    results: Vec<Figures>,
}

fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * q).round() as usize]
}

fn elapsed_ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1_000.0
}

fn build_file() -> anyhow::Result<HealthFile> {
    let actor = Actor::from_bytes(vec![0xc1; 32]);
    let mut file = HealthFile::create(&actor, &editor(CENTRE, MORNING_MS), &demographics())?;
    for (by, op) in typical_file_ops() {
        file.apply(&by, &op)?;
    }
    Ok(file)
}

fn build_referral() -> anyhow::Result<Referral> {
    let actor = Actor::from_bytes(vec![0xc1; 32]);
    let mut referral = Referral::create(
        &actor,
        &editor(CENTRE, MORNING_MS),
        &referral_request(DocumentId::from_bytes([1; 16])),
    )?;
    let receiver = editor(HOSPITAL, MORNING_MS + 60_000);
    for op in [
        ReferralOp::Accept,
        ReferralOp::Schedule {
            appointment: Timestamp(MORNING_MS + 3_600_000),
            minutes: Some(30),
        },
        ReferralOp::MarkArrived,
        ReferralOp::Complete,
    ] {
        referral.apply(&receiver, &op)?;
    }
    Ok(referral)
}

fn measure<T>(
    document: &'static str,
    iterations: usize,
    build: impl Fn() -> anyhow::Result<T>,
    save: impl Fn(&mut T) -> Vec<u8>,
    load: impl Fn(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Figures> {
    let mut build_ms = Vec::with_capacity(iterations);
    let mut load_ms = Vec::with_capacity(iterations);
    let mut raw_ms = Vec::with_capacity(iterations);
    let mut saved = Vec::new();
    for _ in 0..iterations {
        let start = Instant::now();
        let mut doc = build()?;
        build_ms.push(elapsed_ms(start));
        saved = save(&mut doc);
        let start = Instant::now();
        load(&saved)?;
        load_ms.push(elapsed_ms(start));
        let start = Instant::now();
        automerge::AutoCommit::load(&saved).context("raw load")?;
        raw_ms.push(elapsed_ms(start));
    }
    let changes = automerge::AutoCommit::load(&saved)?.get_changes(&[]).len();
    Ok(Figures {
        document,
        changes,
        build_ms_median: quantile(&mut build_ms, 0.5),
        build_ms_p90: quantile(&mut build_ms, 0.9),
        saved_bytes: saved.len(),
        load_ms_median: quantile(&mut load_ms, 0.5),
        load_ms_p90: quantile(&mut load_ms, 0.9),
        load_unvalidated_ms_median: quantile(&mut raw_ms, 0.5),
    })
}

pub fn run(iterations: usize, report_dir: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(iterations > 0, "--iterations must be at least 1");
    let actor = Actor::from_bytes(vec![0x4b; 32]);
    let results = vec![
        measure(
            "health_file",
            iterations,
            build_file,
            HealthFile::save,
            |bytes| {
                HealthFile::load(bytes, &actor)
                    .map(drop)
                    .map_err(Into::into)
            },
        )?,
        measure(
            "referral",
            iterations,
            build_referral,
            Referral::save,
            |bytes| Referral::load(bytes, &actor).map(drop).map_err(Into::into),
        )?,
    ];
    let report = Report {
        iterations,
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        results,
    };
    println!(
        "{:<12} {:>7} {:>10} {:>9} {:>12} {:>9} {:>14}",
        "document", "changes", "build ms", "p90", "saved bytes", "load ms", "raw load ms"
    );
    for f in &report.results {
        println!(
            "{:<12} {:>7} {:>10.3} {:>9.3} {:>12} {:>9.3} {:>14.3}",
            f.document,
            f.changes,
            f.build_ms_median,
            f.build_ms_p90,
            f.saved_bytes,
            f.load_ms_median,
            f.load_unvalidated_ms_median
        );
    }
    println!(
        "(medians over {iterations} runs, {} build; load = decode + validate)",
        report.profile
    );
    std::fs::create_dir_all(report_dir)
        .with_context(|| format!("cannot create {}", report_dir.display()))?;
    let path = report_dir.join("bench-model.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
