//! `bench reads`: what a clinical read of a long health file costs, and whether it waits
//! while the node decides a peer's batch. A file gets `entries` follow-ups (one write each);
//! then its view is read cold (the first read after a restart), warm (repeated), and while
//! another thread ingests peer files in batches of 64 (what a fetched batch does), beside how
//! long each batch took. Prints a table and writes JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::Context;
use estuary_node::identity::Identity;
use estuary_node::model::*;
use estuary_node::replica::Node;
use serde::Serialize;

use crate::bench_store::{OWN, PEER, foreign_envelope, quantile, resident, setup};
use crate::sample;

/// Warm reads timed.
const WARM_READS: usize = 200;
/// Peer files in one ingested batch, as a fetch response carries them.
const BATCH_FILES: usize = 64;

/// What to run.
pub struct Options {
    /// Follow-ups written to the file before it is read.
    pub entries: usize,
    /// Peer batches ingested while the file is read.
    pub batches: usize,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    entries: usize,
    last_writes_ms_median: f64,
    cold_read_ms: f64,
    warm_read_ms_median: f64,
    batches: usize,
    batch_ms_median: f64,
    batch_ms_max: f64,
    reads_during_batches: usize,
    read_during_batches_ms_p50: f64,
    read_during_batches_ms_p99: f64,
    read_during_batches_ms_max: f64,
}

fn millis(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1_000.0
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let setup = setup(&dir.path().join("node"))?;
    let node = Node::open(&setup.config, Some(&setup.roster))?;
    let (id, _) = node.create_health_file(&sample::editor(OWN, 0), &resident(0))?;
    let mut last_writes = Vec::new();
    for n in 0..options.entries {
        let op = HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(1_700_000_000 + n as i64),
            systolic_mmhg: Some(120 + (n % 40) as u64),
            diastolic_mmhg: Some(80),
            glucose_mmol_per_l: None,
        });
        let start = Instant::now();
        node.apply_health_file(id, &sample::editor(OWN, n as i64 + 1), &op)
            .context("a follow-up")?;
        if n + 10 >= options.entries {
            last_writes.push(millis(start));
        }
        if (n + 1) % 100 == 0 {
            eprintln!("  {} follow-ups written", n + 1);
        }
    }
    drop(node);

    let node = Arc::new(Node::open(&setup.config, None)?);
    let start = Instant::now();
    let view = node.health_file(id)?;
    let cold_read_ms = millis(start);
    anyhow::ensure!(
        view.follow_ups.len() == options.entries,
        "follow-ups missing"
    );
    let mut warm = Vec::with_capacity(WARM_READS);
    for _ in 0..WARM_READS {
        let start = Instant::now();
        node.health_file(id)?;
        warm.push(millis(start));
    }

    let peer = Identity::from_secret(PEER);
    let envelopes = (0..options.batches * BATCH_FILES)
        .map(|n| foreign_envelope(&peer, n + 1))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let done = Arc::new(AtomicBool::new(false));
    let ingester = {
        let (node, done) = (node.clone(), done.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            let mut batches = Vec::new();
            for batch in envelopes.chunks(BATCH_FILES) {
                let start = Instant::now();
                node.ingest_many(batch)?;
                batches.push(millis(start));
            }
            done.store(true, Ordering::SeqCst);
            Ok(batches)
        })
    };
    let mut during = Vec::new();
    while !done.load(Ordering::SeqCst) {
        let start = Instant::now();
        node.health_file(id)?;
        during.push(millis(start));
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut batches = ingester
        .join()
        .map_err(|_| anyhow::anyhow!("the ingester panicked"))??;

    let report = Report {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        entries: options.entries,
        last_writes_ms_median: quantile(&mut last_writes, 0.5),
        cold_read_ms,
        warm_read_ms_median: quantile(&mut warm, 0.5),
        batches: batches.len(),
        batch_ms_median: quantile(&mut batches, 0.5),
        batch_ms_max: quantile(&mut batches, 1.0),
        reads_during_batches: during.len(),
        read_during_batches_ms_p50: quantile(&mut during, 0.5),
        read_during_batches_ms_p99: quantile(&mut during, 0.99),
        read_during_batches_ms_max: quantile(&mut during, 1.0),
    };
    println!("bench reads ({} build)", report.profile);
    println!("  a file with {} follow-ups", report.entries);
    println!(
        "  a write to it (median of the last 10)  {:>9.2} ms",
        report.last_writes_ms_median
    );
    println!(
        "  first read after a restart             {:>9.2} ms",
        report.cold_read_ms
    );
    println!(
        "  read, warm (median of {WARM_READS})             {:>9.3} ms",
        report.warm_read_ms_median
    );
    println!(
        "  peer batches of {BATCH_FILES} files: {} (median {:.1} ms, max {:.1} ms)",
        report.batches, report.batch_ms_median, report.batch_ms_max
    );
    println!(
        "  {} reads meanwhile: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        report.reads_during_batches,
        report.read_during_batches_ms_p50,
        report.read_during_batches_ms_p99,
        report.read_during_batches_ms_max
    );
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
