//! `bench writes`: durable, acknowledged writes through the HTTP API of an `estuary node run`
//! process, from concurrent writers (each a clinic's app writing to its own residents' files):
//! writes per second and acknowledgement latency. The writes are the realistic data set's
//! entries, one operation each. Prints a table and writes JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::bench_store::{quantile, setup};
use crate::health_data::Source;
use crate::node_process::NodeProcess;
use crate::process_stats;

/// What to run.
pub struct Options {
    /// Concurrent writers.
    pub writers: usize,
    /// Writes in all (after each writer created its files).
    pub writes: usize,
    /// Health files to take the entries from (default: the generated data set).
    pub input: Option<PathBuf>,
    /// The `estuary` binary (default: beside this one).
    pub estuary: Option<PathBuf>,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// The storage engine of the node's store.
    pub store_engine: estuary_node::store::StoreEngine,
}

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    data: String,
    writers: usize,
    writes: usize,
    seconds: f64,
    writes_per_s: f64,
    ack_ms_p50: f64,
    ack_ms_p99: f64,
    ack_ms_max: f64,
    /// CPU time per acknowledged write (user and kernel, in the kernel's 10 ms ticks): of the
    /// node process, and of this benchmark's own writers (the HTTP client). Steadier than
    /// writes/s on a machine whose speed drifts.
    node_cpu_ms_per_write: f64,
    client_cpu_ms_per_write: f64,
    /// Targets: at least this many writes per second, acknowledged within this p99.
    writes_per_s_target: f64,
    ack_ms_p99_target: f64,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        options.writers > 0 && options.writes >= options.writers,
        "--writers must be positive and --writes at least --writers"
    );
    let source = Source::from_input(options.input.as_deref());
    // Each writer writes the entries of its own files, as a clinic does.
    let per_writer = options.writes.div_ceil(options.writers);
    let records = source.records(options.writers * (per_writer / 5 + 2))?;
    let mut plans: Vec<Vec<(serde_json::Value, Vec<serde_json::Value>)>> =
        vec![Vec::new(); options.writers];
    for (n, record) in records.iter().enumerate() {
        let writes = crate::health_data::writes(record)?;
        let operations = writes
            .records
            .iter()
            .map(|(_, op)| serde_json::to_value(op))
            .collect::<Result<Vec<_>, _>>()?;
        plans[n % options.writers].push((serde_json::to_value(&writes.demographics)?, operations));
    }

    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("node");
    let setup = setup(&data_dir)?;
    let binary = crate::island::estuary_binary(options.estuary.as_deref())?;
    let node = Arc::new(NodeProcess::start(
        &binary,
        &data_dir,
        &setup.config.authority,
        &setup.roster,
        &[],
        options.store_engine,
    )?);
    // Every writer's files exist before the clock starts.
    let mut jobs = Vec::new();
    for plan in plans {
        let mut ops = Vec::new();
        for (demographics, operations) in plan {
            let created = node.post("/v1/health-files", &demographics)?;
            let id = created["id"]
                .as_str()
                .context("a created file without an id")?;
            let path = format!("/v1/health-files/{id}/operations");
            ops.extend(operations.into_iter().map(|op| (path.clone(), op)));
        }
        anyhow::ensure!(
            ops.len() >= per_writer,
            "the data set is too small for {per_writer} writes per writer"
        );
        ops.truncate(per_writer);
        jobs.push(ops);
    }
    let started = Instant::now();
    let node_cpu_before = process_stats::cpu_seconds_of(node.pid());
    let client_cpu_before = process_stats::cpu_seconds();
    let threads: Vec<_> = jobs
        .into_iter()
        .map(|ops| {
            let node = node.clone();
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let mut latencies = Vec::with_capacity(ops.len());
                for (path, op) in ops {
                    let start = Instant::now();
                    node.post(&path, &op)?;
                    latencies.push(start.elapsed().as_secs_f64() * 1e3);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??,
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let per_write = |cpu_seconds: f64| cpu_seconds * 1e3 / latencies.len() as f64;
    let node_cpu_ms_per_write =
        per_write(process_stats::cpu_seconds_of(node.pid()) - node_cpu_before);
    let client_cpu_ms_per_write = per_write(process_stats::cpu_seconds() - client_cpu_before);
    let report = Report {
        profile: crate::bench_sync::profile(),
        data: source.describe(),
        writers: options.writers,
        writes: latencies.len(),
        seconds,
        writes_per_s: latencies.len() as f64 / seconds,
        ack_ms_p50: quantile(&mut latencies, 0.5),
        ack_ms_p99: quantile(&mut latencies, 0.99),
        ack_ms_max: quantile(&mut latencies, 1.0),
        node_cpu_ms_per_write,
        client_cpu_ms_per_write,
        writes_per_s_target: 2_000.0,
        ack_ms_p99_target: 25.0,
    };
    println!(
        "bench writes ({} build; entries of the {}; an `estuary node run` process, HTTP API)",
        report.profile, report.data
    );
    println!(
        "  {} writers, {} durable acknowledged writes in {:.1} s: {:.0} writes/s (target ≥{:.0}); ack p50 {:.2} ms, p99 {:.2} ms (target ≤{:.0} ms), max {:.2} ms",
        report.writers,
        report.writes,
        report.seconds,
        report.writes_per_s,
        report.writes_per_s_target,
        report.ack_ms_p50,
        report.ack_ms_p99,
        report.ack_ms_p99_target,
        report.ack_ms_max
    );
    println!(
        "  CPU per write: node {:.3} ms, this benchmark's writers {:.3} ms",
        report.node_cpu_ms_per_write, report.client_cpu_ms_per_write
    );
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
