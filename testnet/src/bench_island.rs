//! Benchmarks on the whole consortium in this process:
//!
//! - `heal`: the nodes split in two (the northern centres and the rest); each side writes
//!   `files` new health files (realistic ones, as an app writes them, unless told otherwise);
//!   the link heals. Time from the heal to full agreement, and the bytes sent meanwhile
//!   against nodes × missing payload: each node's envelope bytes it lacked at the heal, and
//!   their floor (each file's `save()` and one signature per author).
//! - `latency`: one write at a random node; the time until every node holds it. Clean, and
//!   with `loss` percent loss on every link.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::model::*;
use estuary_node::replica::Node;
use serde::Serialize;

use crate::bench_sync::{percentile, profile};
use crate::health_data::Source;
use crate::island::cluster::{Cluster, NetworkFaults};
use crate::island::inproc::InProc;
use crate::island::{consortium, content, inproc_cluster, plan::Rng};
use estuary_node::envelope::Envelope;

/// How long the nodes are given to connect before anything is measured.
const MESH_FORMING: Duration = Duration::from_secs(3);
/// How long agreement may take before the benchmark gives up.
const AGREEMENT_LIMIT: Duration = Duration::from_secs(600);

#[derive(Serialize)]
pub struct Heal {
    profile: &'static str,
    /// The files written.
    data: String,
    nodes: usize,
    files_per_side: u32,
    north_nodes: usize,
    south_nodes: usize,
    /// Seconds from the heal to every node holding every document.
    heal_to_agreement_s: f64,
    /// Bytes all nodes sent from the heal to agreement.
    wire_bytes: u64,
    /// Of those, by what they were for.
    sent: estuary_node::sync::SentBytes,
    /// Σ over nodes of the envelope bytes each lacked at the heal.
    missing_payload_bytes: u64,
    wire_over_missing: f64,
    /// Σ over nodes of the floor of what each lacked: each file's `save()` and one signature
    /// per author.
    missing_floor_bytes: u64,
    wire_over_floor: f64,
    /// Bytes that crossed the healed cut (either way).
    cut_bytes: u64,
    /// Those against the floor of both sides' new files (each crossing once).
    cut_over_files: f64,
    /// CPU time of this process (every node) from the heal to agreement, in seconds; how many
    /// of the machine's cores it kept busy on average; and per file a node took (each node
    /// takes the other side's files), in ms.
    cpu_s: f64,
    cores_busy: f64,
    cpu_ms_per_file_taken: f64,
    target_seconds: f64,
    target_ratio: f64,
}

#[derive(Serialize)]
pub struct Latency {
    profile: &'static str,
    nodes: usize,
    writes: usize,
    clean_p50_ms: f64,
    clean_p99_ms: f64,
    loss_percent: u64,
    lossy_p50_ms: f64,
    lossy_p99_ms: f64,
    target_clean_p99_ms: f64,
    target_lossy_p99_ms: f64,
}

fn write_json(path: Option<&Path>, value: &impl Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(value)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn handles(cluster: &InProc) -> anyhow::Result<Vec<Arc<Node>>> {
    (0..cluster.len())
        .map(|i| cluster.node_handle(i).context("a node is down"))
        .collect()
}

/// Waits until the catalogues of `nodes` are equal; returns when they were.
fn wait_agreement(cluster: &mut InProc, nodes: &[usize]) -> anyhow::Result<Instant> {
    let started = Instant::now();
    loop {
        let first = cluster.catalogue(nodes[0])?;
        let mut equal = true;
        for node in &nodes[1..] {
            if cluster.catalogue(*node)? != first {
                equal = false;
                break;
            }
        }
        if equal {
            return Ok(Instant::now());
        }
        if started.elapsed() >= AGREEMENT_LIMIT {
            let sizes: Vec<usize> = nodes
                .iter()
                .map(|n| cluster.catalogue(*n).map(|c| c.len()).unwrap_or(0))
                .collect();
            anyhow::bail!("no agreement within {AGREEMENT_LIMIT:?}: documents per node {sizes:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn envelope_bytes(node: &Node, id: DocumentId) -> anyhow::Result<u64> {
    Ok(node.envelopes(id)?.iter().map(|e| e.len() as u64).sum())
}

/// What the heal benchmark writes on each side.
pub enum HealData {
    /// Health files as an app writes them (one change per entry), from `gen.js`'s shape.
    Realistic(Source),
    /// One change per file: the resident's demographics only.
    OneChange,
}

/// Writes `files` new files at the nodes of one side (round robin); returns their ids and
/// the floor of what a node lacking them must receive: each file's automerge `save()` plus one
/// signature per author (one here).
fn write_side(
    all: &[Arc<Node>],
    writers: &[usize],
    files: u32,
    first: u32,
    seed: u64,
    records: Option<&[crate::health_data::FileRecord]>,
) -> anyhow::Result<(Vec<DocumentId>, u64)> {
    let mut ids = Vec::with_capacity(files as usize);
    let mut floor = 0u64;
    match records {
        None => {
            for k in 0..files {
                let node = &all[writers[k as usize % writers.len()]];
                let editor = Editor {
                    institution: node.institution().clone(),
                    at: Timestamp(estuary_node::audit::now_ms()),
                };
                let (id, _) =
                    node.create_health_file(&editor, &content::demographics(seed, first + k))?;
                let (saved, _) = node
                    .whole_document(id, true)?
                    .context("a file just written is held")?;
                floor += saved.len() as u64 + SIGNATURE_BYTES;
                ids.push(id);
            }
        }
        Some(records) => {
            let mut batches: Vec<Vec<Vec<u8>>> = vec![Vec::new(); writers.len()];
            let side = &records[first as usize..(first + files) as usize];
            for (k, record) in side.iter().enumerate() {
                let writer = &all[writers[k % writers.len()]];
                let mut file = crate::health_data::writes(record)?
                    .build(&writer.identity().actor(), writer.institution().as_str())?;
                floor += file.save().len() as u64 + SIGNATURE_BYTES;
                let id = file.id();
                ids.push(id);
                let batch = &mut batches[k % writers.len()];
                for mut change in file.automerge().clone().get_changes(&[]) {
                    batch.push(Envelope::sign(writer.identity(), id, &mut change).encode());
                }
                if batch.len() >= WRITE_BATCH {
                    writer.ingest_many(batch)?;
                    batch.clear();
                }
            }
            for (batch, writer) in batches.iter().zip(writers) {
                if !batch.is_empty() {
                    all[*writer].ingest_many(batch)?;
                }
            }
        }
    }
    Ok((ids, floor))
}

/// Envelopes a writer ingests at once while the benchmark writes a side's files.
const WRITE_BATCH: usize = 512;
/// An ed25519 signature's bytes.
const SIGNATURE_BYTES: u64 = 64;

pub fn heal(
    nodes: usize,
    files: u32,
    seed: u64,
    data: &HealData,
    json: Option<&Path>,
) -> anyhow::Result<Heal> {
    let members = consortium::members(nodes);
    let dir = tempfile::tempdir()?;
    let mut cluster = inproc_cluster(seed, &members, dir.path())?;
    let north: Vec<usize> = (0..nodes).filter(|i| members[*i].north).collect();
    let south: Vec<usize> = (0..nodes).filter(|i| !members[*i].north).collect();
    anyhow::ensure!(
        !north.is_empty() && !south.is_empty(),
        "too few nodes for two sides"
    );
    // Connected first, then split.
    std::thread::sleep(MESH_FORMING);
    cluster.set_faults(&NetworkFaults {
        partition: Some(vec![north.clone(), south.clone()]),
        loss: None,
    });
    let all = handles(&cluster)?;
    let started = Instant::now();
    // Both sides' records, read once: the north writes the first `files`, the south the rest.
    let records = match data {
        HealData::OneChange => None,
        HealData::Realistic(source) => {
            let records = source.records(2 * files as usize)?;
            anyhow::ensure!(
                records.len() == 2 * files as usize,
                "{} holds {} files, not {}",
                source.describe(),
                records.len(),
                2 * files
            );
            Some(records)
        }
    };
    let (north_written, north_floor) =
        write_side(&all, &north, files, 0, seed, records.as_deref())?;
    let (south_written, south_floor) =
        write_side(&all, &south, files, files, seed, records.as_deref())?;
    eprintln!(
        "heal: {} files written on each side in {:.1} s; waiting for each side to agree",
        files,
        started.elapsed().as_secs_f64()
    );
    wait_agreement(&mut cluster, &north)?;
    wait_agreement(&mut cluster, &south)?;
    eprintln!(
        "heal: each side agreed {:.1} s after the writes began; healing",
        started.elapsed().as_secs_f64()
    );
    // What each node lacks: the other side's files.
    let north_payload: u64 = north_written
        .iter()
        .map(|id| envelope_bytes(&all[north[0]], *id))
        .sum::<anyhow::Result<u64>>()?;
    let south_payload: u64 = south_written
        .iter()
        .map(|id| envelope_bytes(&all[south[0]], *id))
        .sum::<anyhow::Result<u64>>()?;
    let missing = north.len() as u64 * south_payload + south.len() as u64 * north_payload;
    let missing_floor = north.len() as u64 * south_floor + south.len() as u64 * north_floor;
    let before = cluster.traffic().wire_bytes;
    let sent_before = cluster.sent();
    let cut = |cluster: &InProc| {
        cluster.bytes_between(&north, &south) + cluster.bytes_between(&south, &north)
    };
    let cut_before = cut(&cluster);
    let healed = Instant::now();
    let cpu_before = crate::process_stats::cpu_seconds();
    cluster.set_faults(&NetworkFaults::default());
    cluster.reconcile_now();
    let everyone: Vec<usize> = (0..nodes).collect();
    let agreed = wait_agreement(&mut cluster, &everyone)?;
    let seconds = agreed.duration_since(healed).as_secs_f64();
    let cpu_s = crate::process_stats::cpu_seconds() - cpu_before;
    let files_taken = (north.len() + south.len()) as f64 * f64::from(files);
    let wire = cluster.traffic().wire_bytes - before;
    let sent = &cluster.sent() - &sent_before;
    let cut_bytes = cut(&cluster).saturating_sub(cut_before);
    cluster.shutdown();
    let report = Heal {
        profile: profile(),
        data: match data {
            HealData::Realistic(source) => source.describe(),
            HealData::OneChange => "one change per file".into(),
        },
        nodes,
        files_per_side: files,
        north_nodes: north.len(),
        south_nodes: south.len(),
        heal_to_agreement_s: seconds,
        wire_bytes: wire,
        sent,
        missing_payload_bytes: missing,
        wire_over_missing: wire as f64 / missing.max(1) as f64,
        missing_floor_bytes: missing_floor,
        wire_over_floor: wire as f64 / missing_floor.max(1) as f64,
        cut_bytes,
        cut_over_files: cut_bytes as f64 / (north_floor + south_floor).max(1) as f64,
        cpu_s,
        cores_busy: cpu_s / seconds,
        cpu_ms_per_file_taken: cpu_s * 1e3 / files_taken.max(1.0),
        target_seconds: 20.0,
        target_ratio: 1.5,
    };
    println!(
        "heal: {nodes} nodes, {files} files per side ({}): agreement {seconds:.1} s after the heal (target ≤20 s); {:.1} MiB sent for {:.1} MiB missing as envelopes = {:.2}×, {:.2}× the floor of {:.1} MiB (save and a signature per author per file; target ≤1.5×)",
        report.data,
        wire as f64 / 1_048_576.0,
        missing as f64 / 1_048_576.0,
        report.wire_over_missing,
        report.wire_over_floor,
        missing_floor as f64 / 1_048_576.0,
    );
    let mib = |b: u64| b as f64 / 1_048_576.0;
    println!(
        "heal: {:.1} MiB crossed the cut = {:.2}× both sides' new files (each crossing once: 1×)",
        mib(cut_bytes),
        report.cut_over_files
    );
    println!(
        "heal: sent by kind (MiB): fetch {:.1}, reconcile {:.1}, sync {:.1}, gossip {:.1}, roster {:.2}, refused {:.2}",
        mib(report.sent.fetch),
        mib(report.sent.reconcile),
        mib(report.sent.sync),
        mib(report.sent.gossip),
        mib(report.sent.roster),
        mib(report.sent.refused),
    );
    println!(
        "heal: CPU {:.1} s over all nodes = {:.2} ms per file a node took; {:.2} of {} cores busy",
        report.cpu_s,
        report.cpu_ms_per_file_taken,
        report.cores_busy,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    write_json(json, &report)?;
    Ok(report)
}

/// Times `writes` single writes until every node holds each.
fn time_writes(
    cluster: &InProc,
    rng: &mut Rng,
    seed: u64,
    writes: usize,
    first_resident: u32,
) -> anyhow::Result<Vec<f64>> {
    let all = handles(cluster)?;
    let mut times = Vec::with_capacity(writes);
    for k in 0..writes {
        let node = &all[rng.below(all.len() as u64) as usize];
        let editor = Editor {
            institution: node.institution().clone(),
            at: Timestamp(estuary_node::audit::now_ms()),
        };
        let started = Instant::now();
        let (id, hash) = node.create_health_file(
            &editor,
            &content::demographics(seed, first_resident + k as u32),
        )?;
        let mut waiting: BTreeSet<usize> = (0..all.len()).collect();
        while !waiting.is_empty() {
            waiting.retain(|i| !all[*i].has_change(id, &hash).unwrap_or(false));
            anyhow::ensure!(
                started.elapsed() < AGREEMENT_LIMIT,
                "a write did not reach every node"
            );
            if !waiting.is_empty() {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        times.push(started.elapsed().as_secs_f64() * 1e3);
        // Writes are spaced as a clinic's would be, not back to back.
        std::thread::sleep(Duration::from_millis(20));
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

pub fn latency(
    nodes: usize,
    writes: usize,
    loss: u64,
    seed: u64,
    json: Option<&Path>,
) -> anyhow::Result<Latency> {
    let members = consortium::members(nodes);
    let dir = tempfile::tempdir()?;
    let mut cluster = inproc_cluster(seed, &members, dir.path())?;
    std::thread::sleep(MESH_FORMING);
    let mut rng = Rng::new(seed);
    let clean = time_writes(&cluster, &mut rng, seed, writes, 0)?;
    cluster.set_faults(&NetworkFaults {
        partition: None,
        loss: Some(loss),
    });
    let lossy = time_writes(&cluster, &mut rng, seed, writes, writes as u32)?;
    cluster.shutdown();
    let report = Latency {
        profile: profile(),
        nodes,
        writes,
        clean_p50_ms: percentile(&clean, 0.5),
        clean_p99_ms: percentile(&clean, 0.99),
        loss_percent: loss,
        lossy_p50_ms: percentile(&lossy, 0.5),
        lossy_p99_ms: percentile(&lossy, 0.99),
        target_clean_p99_ms: 1_000.0,
        target_lossy_p99_ms: 5_000.0,
    };
    println!(
        "latency: one write visible on all {nodes} nodes: clean p50 {:.1} ms, p99 {:.1} ms (target ≤1 s); {loss}% loss p50 {:.1} ms, p99 {:.1} ms (target ≤5 s)",
        report.clean_p50_ms, report.clean_p99_ms, report.lossy_p50_ms, report.lossy_p99_ms
    );
    write_json(json, &report)?;
    Ok(report)
}

/// Every benchmark at a size that finishes in about five minutes here, JSON into `dir`.
pub fn all(dir: &Path) -> anyhow::Result<()> {
    let path = |name: &str| -> PathBuf { dir.join(name) };
    let started = Instant::now();
    crate::bench_model::run(100, dir)?;
    crate::bench_store::run(&crate::bench_store::Options {
        docs: 20_000,
        writes: 1_000,
        ingest: 5_000,
        kills: 20,
        json: Some(path("bench-store.json")),
    })?;
    crate::bench_reconcile::run(100_000, Some(&path("bench-reconcile.json")))?;
    for (which, name) in [
        (
            crate::bench_sync::Which::Bootstrap,
            "bench-sync-bootstrap.json",
        ),
        (crate::bench_sync::Which::Insync, "bench-sync-insync.json"),
        (crate::bench_sync::Which::Diff, "bench-sync-diff.json"),
    ] {
        crate::bench_sync::run(&crate::bench_sync::Options {
            which,
            files: 10_000,
            source: crate::health_data::Source::from_input(None),
            diff: 100,
            writes: 200,
            build: crate::bench_sync::Build::Changes,
            json: Some(path(name)),
            store_engine: Default::default(),
        })?;
    }
    // Realistic files cost a heal about ten times the CPU of one-change files: 1,000 a side
    // keeps this within the few minutes `all` is for.
    heal(
        21,
        1_000,
        1,
        &HealData::Realistic(Source::from_input(None)),
        Some(&path("bench-heal.json")),
    )?;
    latency(21, 100, 20, 1, Some(&path("bench-latency.json")))?;
    println!(
        "all benchmarks: {:.0} s; JSON in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}
