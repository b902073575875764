//! `bench store`: what durability costs. Durable signed writes per second and acknowledgement
//! latency with 1, 8 and 64 concurrent writers; ingest rate of foreign envelopes; open time
//! and resident memory with many stored health files; a crash loop of SIGKILLs counting lost
//! acknowledged writes. Prints a table and writes JSON.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::*;
use estuary_node::replica::{Node, NodeConfig};
use serde::Serialize;

use crate::sample;

const AUTHORITY: [u8; 32] = [1; 32];
pub(crate) const PEER: [u8; 32] = [2; 32];
pub(crate) const OWN: &str = "chc-bench";
/// Writer counts measured.
const WRITERS: [usize; 3] = [1, 8, 64];
/// Threads ingesting foreign envelopes at once.
const INGEST_THREADS: usize = 8;
/// Longest a crash-loop writer runs before it is killed, in milliseconds.
const CRASH_RUN_MS_MAX: u64 = 300;

/// What to run.
pub struct Options {
    /// Stored health files for the open/RSS figure.
    pub docs: usize,
    /// Durable writes per writer count.
    pub writes: usize,
    /// Foreign envelopes for the ingest figure.
    pub ingest: usize,
    /// SIGKILLs in the crash loop.
    pub kills: usize,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    writes: usize,
    writes_per_s: BTreeMap<String, f64>,
    ack_p50_ms: BTreeMap<String, f64>,
    ack_p99_ms: BTreeMap<String, f64>,
    ingest_envelopes: usize,
    ingest_per_s: f64,
    docs: usize,
    populate_s: f64,
    open_ms: f64,
    rss_mb: f64,
    store_mb: f64,
    crash_kills: usize,
    crash_acknowledged: usize,
    crash_lost: usize,
}

/// A data directory with a key, and the signed roster that admits it and the peer.
pub(crate) struct Setup {
    pub(crate) config: NodeConfig,
    pub(crate) roster: Vec<u8>,
}

pub(crate) fn setup(dir: &Path) -> anyhow::Result<Setup> {
    std::fs::create_dir_all(dir)?;
    let own = Identity::load_or_create(dir)?.public_key();
    let authority = Identity::from_secret(AUTHORITY);
    let by = sample::editor(sample::HOSPITAL, 0);
    let mut roster = Roster::create(&authority.actor(), &by)?;
    for (id, kind, key) in [
        (OWN, InstitutionKind::CommunityCentre, own),
        (
            sample::HOSPITAL,
            InstitutionKind::CoreHospital,
            Identity::from_secret(PEER).public_key(),
        ),
    ] {
        roster.apply(
            &by,
            &RosterOp::AddInstitution {
                id: sample::institution(id),
                name: id.into(),
                kind,
            },
        )?;
        roster.apply(
            &by,
            &RosterOp::AddNodeKey {
                institution: sample::institution(id),
                key,
            },
        )?;
    }
    Ok(Setup {
        config: NodeConfig {
            data_dir: dir.to_path_buf(),
            authority: authority.public_key(),
            store_engine: Default::default(),
        },
        roster: SignedRoster::sign(&authority, &mut roster).encode(),
    })
}

pub(crate) fn resident(n: usize) -> Demographics {
    let mut demographics = sample::demographics();
    demographics.name.given = format!("R{n}");
    demographics.national_id = Some(format!("{n:018}"));
    demographics
}

/// The peer's creation envelope for resident `n`.
pub(crate) fn foreign_envelope(peer: &Identity, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut file = HealthFile::create(
        &peer.actor(),
        &sample::editor(sample::HOSPITAL, n as i64),
        &resident(n),
    )?;
    let mut change = file.changes_since(&[]).remove(0);
    Ok(Envelope::sign(peer, file.id(), &mut change).encode())
}

pub(crate) fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples
        .get(((samples.len().saturating_sub(1)) as f64 * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// Health files the write benchmark spreads its writes over: a clinic writes to many
/// residents' files, not thousands of entries into one.
const WRITE_POOL_DOCS: usize = 256;

/// Durable writes with `writers` concurrent writers, `total` writes in all, spread over
/// `pool`.
fn measure_writes(
    node: &Arc<Node>,
    pool: &Arc<Vec<DocumentId>>,
    writers: usize,
    total: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let per_writer = total.div_ceil(writers);
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let node = Arc::clone(node);
            let pool = Arc::clone(pool);
            std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
                let editor = sample::editor(OWN, 0);
                let mut latencies = Vec::with_capacity(per_writer);
                for n in 0..per_writer {
                    let id = pool[(w + n * writers) % pool.len()];
                    let op = HealthFileOp::AddFollowUp(NewFollowUp {
                        time: Timestamp(n as i64),
                        systolic_mmhg: Some(120),
                        diastolic_mmhg: Some(80),
                        glucose_mmol_per_l: Some(6.1),
                    });
                    let began = Instant::now();
                    node.apply_health_file(id, &editor, &op)?;
                    latencies.push(began.elapsed().as_secs_f64() * 1_000.0);
                }
                Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for thread in threads {
        latencies.extend(
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??,
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    let writes = latencies.len() as f64;
    Ok((
        writes / elapsed,
        quantile(&mut latencies, 0.5),
        quantile(&mut latencies, 0.99),
    ))
}

/// Ingests `envelopes` with `INGEST_THREADS` threads; returns envelopes per second.
fn ingest_all(node: &Arc<Node>, envelopes: Vec<Vec<u8>>) -> anyhow::Result<f64> {
    let count = envelopes.len();
    let chunks: Vec<Vec<Vec<u8>>> = {
        let mut chunks: Vec<Vec<Vec<u8>>> = (0..INGEST_THREADS).map(|_| Vec::new()).collect();
        for (n, envelope) in envelopes.into_iter().enumerate() {
            chunks[n % INGEST_THREADS].push(envelope);
        }
        chunks
    };
    let start = Instant::now();
    let threads: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let node = Arc::clone(node);
            std::thread::spawn(move || -> anyhow::Result<()> {
                for envelope in chunk {
                    node.ingest(&envelope)?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("an ingester panicked"))??;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

/// Generates and ingests `docs` foreign health files (not timed as ingest).
fn populate(node: &Arc<Node>, docs: usize, offset: usize) -> anyhow::Result<()> {
    let threads: Vec<_> = (0..INGEST_THREADS)
        .map(|t| {
            let node = Arc::clone(node);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let peer = Identity::from_secret(PEER);
                for n in (t..docs).step_by(INGEST_THREADS) {
                    node.ingest(&foreign_envelope(&peer, offset + n)?)?;
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread
            .join()
            .map_err(|_| anyhow::anyhow!("a populating thread panicked"))??;
    }
    Ok(())
}

/// Hidden subcommand: opens the node in `dir`, prints `open_ms rss_mb`. Run in a fresh
/// process so the figures are the open's alone.
pub fn open_probe(dir: &Path) -> anyhow::Result<()> {
    let config = NodeConfig {
        data_dir: dir.to_path_buf(),
        authority: Identity::from_secret(AUTHORITY).public_key(),
        store_engine: Default::default(),
    };
    let start = Instant::now();
    let node = Node::open(&config, None)?;
    let open_ms = start.elapsed().as_secs_f64() * 1_000.0;
    println!("{open_ms} {}", crate::process_stats::rss_mib());
    drop(node);
    Ok(())
}

/// Hidden subcommand: the crash writer, for the crash loop.
pub fn crash_writer(dir: &Path, roster: &Path) -> anyhow::Result<()> {
    let config = NodeConfig {
        data_dir: dir.to_path_buf(),
        authority: Identity::from_secret(AUTHORITY).public_key(),
        store_engine: Default::default(),
    };
    let roster = std::fs::read(roster)?;
    estuary_node::crash_writer::run(
        &config,
        &roster,
        sample::institution(OWN),
        100_000,
        &mut std::io::stdout().lock(),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Runs the crash writer `kills` times, SIGKILLing it at random moments; returns the
/// acknowledged writes and how many of them the reopened store lacks.
fn crash_loop(root: &Path, kills: usize) -> anyhow::Result<(usize, usize)> {
    let dir = root.join("crash");
    let setup = setup(&dir)?;
    let roster_file = root.join("roster.cbor");
    std::fs::write(&roster_file, &setup.roster)?;
    let exe = std::env::current_exe()?;
    let mut acknowledged = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..kills {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut child = Command::new(&exe)
            .args(["bench", "crash-writer"])
            .arg(&dir)
            .arg(&roster_file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(Duration::from_millis(state % CRASH_RUN_MS_MAX));
        child.kill()?;
        child.wait()?;
        let mut output = String::new();
        child
            .stdout
            .take()
            .context("child stdout")?
            .read_to_string(&mut output)?;
        for line in output.lines() {
            if let ["ack", document, hash] = line.split(' ').collect::<Vec<_>>().as_slice()
                && hash.len() == 64
            {
                acknowledged.push((
                    DocumentId::parse(document)?,
                    ChangeHash(Bytes32::parse_hex(hash, "hash")?.0),
                ));
            }
        }
    }
    let node = Node::open(&setup.config, None)?;
    let mut lost = 0;
    for (document, hash) in &acknowledged {
        if !node.has_change(*document, hash)? {
            lost += 1;
        }
    }
    Ok((acknowledged.len(), lost))
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    ensure!(
        options.writes >= 64,
        "--writes must be at least 64 (one per writer)"
    );
    let root = std::env::temp_dir().join(format!("estuary-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let result = run_in(&root, options);
    let _ = std::fs::remove_dir_all(&root);
    result
}

fn run_in(root: &Path, options: &Options) -> anyhow::Result<()> {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let setup = setup(&root.join("node"))?;
    let node = Arc::new(Node::open(&setup.config, Some(&setup.roster))?);

    let (mut writes_per_s, mut ack_p50_ms, mut ack_p99_ms) =
        (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    let editor = sample::editor(OWN, 0);
    let pool = (0..WRITE_POOL_DOCS)
        .map(|n| {
            Ok(node
                .create_health_file(&editor, &resident(1_000_000 + n))?
                .0)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pool = Arc::new(pool);
    for writers in WRITERS {
        let (rate, p50, p99) = measure_writes(&node, &pool, writers, options.writes)?;
        eprintln!("writes: {writers:>2} writers: {rate:>8.0}/s  p50 {p50:.2} ms  p99 {p99:.2} ms");
        writes_per_s.insert(writers.to_string(), rate);
        ack_p50_ms.insert(writers.to_string(), p50);
        ack_p99_ms.insert(writers.to_string(), p99);
    }

    let peer = Identity::from_secret(PEER);
    let envelopes = (0..options.ingest)
        .map(|n| foreign_envelope(&peer, n))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ingest_per_s = ingest_all(&node, envelopes)?;
    eprintln!("ingest: {ingest_per_s:.0} foreign envelopes/s");

    let started = Instant::now();
    populate(
        &node,
        options.docs.saturating_sub(options.ingest),
        options.ingest,
    )?;
    let populate_s = started.elapsed().as_secs_f64();
    let store_mb = node.storage_bytes()? as f64 / (1024.0 * 1024.0);
    drop(node);
    let probe = Command::new(std::env::current_exe()?)
        .args(["bench", "open-probe"])
        .arg(&setup.config.data_dir)
        .output()?;
    ensure!(
        probe.status.success(),
        "open probe failed: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let figures = String::from_utf8(probe.stdout)?;
    let mut parts = figures.split_whitespace().map(str::parse::<f64>);
    let (open_ms, rss_mb) = (
        parts.next().context("open_ms")??,
        parts.next().context("rss_mb")??,
    );
    eprintln!(
        "open: {open_ms:.0} ms, {rss_mb:.0} MiB resident, with {} stored health files",
        options.docs
    );

    let (crash_acknowledged, crash_lost) = crash_loop(root, options.kills)?;
    eprintln!(
        "crash loop: {} kills, {crash_acknowledged} acknowledged, {crash_lost} lost",
        options.kills
    );

    let report = Report {
        profile,
        writes: options.writes,
        writes_per_s,
        ack_p50_ms,
        ack_p99_ms,
        ingest_envelopes: options.ingest,
        ingest_per_s,
        docs: options.docs,
        populate_s,
        open_ms,
        rss_mb,
        store_mb,
        crash_kills: options.kills,
        crash_acknowledged,
        crash_lost,
    };
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "durable writes", "1", "8", "64"
    );
    let row =
        |m: &BTreeMap<String, f64>| WRITERS.map(|w| m.get(&w.to_string()).copied().unwrap_or(0.0));
    let [a, b, c] = row(&report.writes_per_s);
    println!("{:<28} {a:>10.0} {b:>10.0} {c:>10.0}", "  writes/s");
    let [a, b, c] = row(&report.ack_p50_ms);
    println!("{:<28} {a:>10.2} {b:>10.2} {c:>10.2}", "  ack p50 ms");
    let [a, b, c] = row(&report.ack_p99_ms);
    println!("{:<28} {a:>10.2} {b:>10.2} {c:>10.2}", "  ack p99 ms");
    println!(
        "ingest of foreign envelopes  {:>10.0} /s ({} envelopes, {INGEST_THREADS} threads)",
        report.ingest_per_s, report.ingest_envelopes
    );
    println!(
        "open with {} files     {:>10.0} ms, {:.0} MiB resident, store {:.0} MiB",
        report.docs, report.open_ms, report.rss_mb, report.store_mb
    );
    println!(
        "crash loop                   {} kills, {} acknowledged, {} lost",
        report.crash_kills, report.crash_acknowledged, report.crash_lost
    );
    println!("({} build)", report.profile);
    if let Some(path) = &options.json {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    ensure!(
        report.crash_lost == 0,
        "{} acknowledged writes were lost",
        report.crash_lost
    );
    Ok(())
}
