//! `bench import`: a member's existing records loaded in bulk as a user loads them: the data
//! set written to an NDJSON file, `estuary import` run against an `estuary node run` process
//! (HTTP API), each resident one signed change, durable. Prints residents per second and the
//! store's bytes per file, and writes JSON.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::bench_store::setup;
use crate::health_data::Source;
use crate::node_process::{As, NodeProcess};

/// What to run.
pub struct Options {
    /// Residents loaded.
    pub files: usize,
    /// Where the records come from (default: the generated data set).
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
    files: usize,
    ndjson_bytes: u64,
    loaded: u64,
    refused: usize,
    seconds: f64,
    files_per_s: f64,
    /// The node's store after the load (its engine's files), per file loaded.
    store_bytes_per_file: f64,
    /// Target: at least this many residents per second, durably.
    files_per_s_target: f64,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.files > 0, "--files must be positive");
    let source = Source::from_input(options.input.as_deref());
    let records = source.records(options.files)?;
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("residents.ndjson");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&input)?);
    for record in &records {
        serde_json::to_writer(&mut out, record)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    drop(out);
    let ndjson_bytes = std::fs::metadata(&input)?.len();

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
    let started = Instant::now();
    let output = Command::new(&binary)
        .arg("--config")
        .arg(data_dir.join("estuary.toml"))
        .args(["--json", "import"])
        .arg(&input)
        .output()
        .context("running estuary import")?;
    let seconds = started.elapsed().as_secs_f64();
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "estuary import printed no JSON: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let loaded = answer["loaded"].as_u64().unwrap_or(0);
    let refused = answer["refused"].as_array().map_or(0, Vec::len);
    let (_, status) = node.get("/admin/status", As::Admin)?;
    let store_bytes = status["storage_bytes"].as_u64().unwrap_or(0);
    let report = Report {
        profile: crate::bench_sync::profile(),
        data: source.describe(),
        files: records.len(),
        ndjson_bytes,
        loaded,
        refused,
        seconds,
        files_per_s: loaded as f64 / seconds,
        store_bytes_per_file: store_bytes as f64 / loaded.max(1) as f64,
        files_per_s_target: 2_000.0,
    };
    println!(
        "bench import ({} build; {}; `estuary import` of an NDJSON file into an `estuary node run` process)",
        report.profile, report.data
    );
    println!(
        "  {} residents ({:.1} MiB of NDJSON): {} loaded, {} refused, in {:.2} s: {:.0} residents/s durably (target ≥{:.0}); store {:.0} B per file",
        report.files,
        ndjson_bytes as f64 / (1024.0 * 1024.0),
        report.loaded,
        report.refused,
        report.seconds,
        report.files_per_s,
        report.files_per_s_target,
        report.store_bytes_per_file,
    );
    anyhow::ensure!(
        refused == 0 && loaded == records.len() as u64,
        "the load refused residents: {}",
        answer["refused"]
    );
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
