//! `bench growth`: what a write and a clinical read cost as one resident's file grows, measured
//! as an app sees them: an `estuary node run` process, written to and read through its HTTP
//! API. One file gets encounters from the realistic data set, one write each; at each
//! checkpoint (0, a quarter, half and all of `--entries`) the next writes and reads of the
//! whole file are timed (a read until the answer's last byte arrives; parsing the JSON is the
//! app's own cost). Prints a table and writes JSON.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::bench_store::{quantile, setup};
use crate::health_data::Source;
use crate::node_process::{As, NodeProcess};

/// What to run.
pub struct Options {
    /// Encounters in the file at the last checkpoint.
    pub entries: usize,
    /// Writes and reads timed at each checkpoint.
    pub samples: usize,
    /// Health files to take encounters from (default: the generated data set).
    pub input: Option<PathBuf>,
    /// The `estuary` binary (default: beside this one).
    pub estuary: Option<PathBuf>,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
    /// The storage engine of the node's store.
    pub store_engine: estuary_node::store::StoreEngine,
}

#[derive(Serialize)]
struct Checkpoint {
    entries: usize,
    write_ms_p50: f64,
    write_ms_p99: f64,
    view_ms_p50: f64,
    view_ms_p99: f64,
    view_bytes: usize,
}

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    data: String,
    samples: usize,
    checkpoints: Vec<Checkpoint>,
    /// The write's median at the last checkpoint over its median on a fresh file.
    write_growth: f64,
    /// Target: at most 2.
    write_growth_target: f64,
    /// Target for the view's median at the last checkpoint, in milliseconds.
    view_ms_target: f64,
}

fn millis(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1_000.0
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.samples > 0, "--samples must be at least 1");
    let source = Source::from_input(options.input.as_deref());
    // Records hold ~3 encounters each; enough for every write made.
    let wanted = options.entries + 4 * options.samples;
    let mut encounters = Vec::with_capacity(wanted);
    let mut records = source.records(wanted)?.into_iter();
    let first = records.next().context("the data set holds no record")?;
    for record in std::iter::once(first.clone()).chain(records) {
        for encounter in &record.encounters {
            encounters.push(serde_json::to_value(
                estuary_node::model::HealthFileOp::AddEncounter(encounter.to_new()?),
            )?);
        }
        if encounters.len() >= wanted {
            break;
        }
    }
    anyhow::ensure!(
        encounters.len() >= wanted,
        "the data set holds {} encounters; {wanted} are needed",
        encounters.len()
    );
    let mut encounters = encounters.into_iter();

    let dir = tempfile::tempdir()?;
    let data_dir = dir.path().join("node");
    let setup = setup(&data_dir)?;
    let binary = crate::island::estuary_binary(options.estuary.as_deref())?;
    let node = NodeProcess::start(
        &binary,
        &data_dir,
        &setup.config.authority,
        &setup.roster,
        &[],
        options.store_engine,
    )?;
    let created = node.post(
        "/v1/health-files",
        &serde_json::to_value(crate::health_data::writes(&first)?.demographics.clone())?,
    )?;
    let id = created["id"]
        .as_str()
        .context("a created file's answer without an id")?
        .to_owned();
    let operations = format!("/v1/health-files/{id}/operations");
    let view = format!("/v1/health-files/{id}");

    let marks = [0, options.entries / 4, options.entries / 2, options.entries];
    let mut written = 0;
    let mut checkpoints = Vec::new();
    for mark in marks {
        while written < mark {
            node.post(&operations, &encounters.next().context("encounters")?)?;
            written += 1;
            if written % 250 == 0 {
                eprintln!("  {written} encounters written");
            }
        }
        let mut writes = Vec::with_capacity(options.samples);
        for _ in 0..options.samples {
            let op = encounters.next().context("encounters")?;
            let start = Instant::now();
            node.post(&operations, &op)?;
            writes.push(millis(start));
        }
        written += options.samples;
        let mut reads = Vec::with_capacity(options.samples);
        let mut view_bytes = 0;
        for _ in 0..options.samples {
            let start = Instant::now();
            let (status, body) = node.get_bytes(&view, As::App)?;
            reads.push(millis(start));
            anyhow::ensure!(status == 200, "GET {view} answered {status}");
            view_bytes = body.len();
        }
        let (_, answer) = node.get(&view, As::App)?;
        let shown = answer["view"]["encounters"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(
            shown == written,
            "the view shows {shown} encounters; {written} were written"
        );
        checkpoints.push(Checkpoint {
            entries: mark,
            write_ms_p50: quantile(&mut writes, 0.5),
            write_ms_p99: quantile(&mut writes, 0.99),
            view_ms_p50: quantile(&mut reads, 0.5),
            view_ms_p99: quantile(&mut reads, 0.99),
            view_bytes,
        });
    }
    let write_growth =
        checkpoints[checkpoints.len() - 1].write_ms_p50 / checkpoints[0].write_ms_p50;
    let report = Report {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        data: source.describe(),
        samples: options.samples,
        write_growth,
        write_growth_target: 2.0,
        view_ms_target: 10.0,
        checkpoints,
    };
    println!(
        "bench growth ({} build; one file, encounters from the {}; an `estuary node run` process, HTTP API)",
        report.profile, report.data
    );
    println!(
        "  {:>8}  {:>14}  {:>14}  {:>13}  {:>13}  {:>10}",
        "entries", "write p50 ms", "write p99 ms", "view p50 ms", "view p99 ms", "view KiB"
    );
    for c in &report.checkpoints {
        println!(
            "  {:>8}  {:>14.2}  {:>14.2}  {:>13.2}  {:>13.2}  {:>10.1}",
            c.entries,
            c.write_ms_p50,
            c.write_ms_p99,
            c.view_ms_p50,
            c.view_ms_p99,
            c.view_bytes as f64 / 1024.0
        );
    }
    let last = &report.checkpoints[report.checkpoints.len() - 1];
    println!(
        "  a write at {} entries costs {:.2}× a write to a fresh file (target ≤{:.0}×); the view at {} entries {:.2} ms (target ≤{:.0} ms)",
        last.entries,
        report.write_growth,
        report.write_growth_target,
        last.entries,
        last.view_ms_p50,
        report.view_ms_target
    );
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
