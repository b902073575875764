//! `bench sync bootstrap|insync|diff`: two real nodes (real stores, real libp2p swarms over
//! the in-process memory transport).
//!
//! - `bootstrap`: a node that joins empty catches up on every health file the other holds:
//!   seconds, files per second, bytes on the wire against the compressed size of the data,
//!   and the latency of a clinical read (a name search and the first file it finds) made on the
//!   catching-up node every 50 ms meanwhile; then the other's new writes reach it by gossip
//!   (propagation p50/p99).
//!
//! The files are the realistic data set (`crate::health_data`), written as an app writes
//! them: ~11.6 changes per file.
//! - `insync`: both hold the same files; one reconciliation confirms it: round trips, bytes,
//!   and the CPU time of the reconciliation's work on both sides.
//! - `diff`: the files differ in `D` of them: round trips and bytes per difference.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use std::collections::HashMap;

use estuary_node::envelope::{Envelope, sign_change};
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::reconcile::Hybrid;
use estuary_node::replica::{Ingested, Node, NodeConfig, WholeDocument};
use estuary_node::store::StoreEngine;
use estuary_node::sync::{Multiaddr, PeerStats, SyncConfig, SyncHandle, TransportKind};
use serde::Serialize;

use crate::health_data::{FileRecord, Source};
use crate::{process_stats, sample};

const AUTHORITY: [u8; 32] = [1; 32];
/// Envelopes ingested per batch while building a node's files.
const BUILD_BATCH: usize = 2_048;
/// How long a catch-up or a reconciliation may take before the benchmark gives up.
const LIMIT: Duration = Duration::from_secs(3_600);

/// Files built whole at once per batch (`Build::Whole`), on each of `BUILD_THREADS`.
const BUILD_WHOLE_BATCH: usize = 128;
/// Threads that make and decide files built whole: the machine's two cores.
const BUILD_THREADS: usize = 2;

/// How the serving node comes to hold its files before a measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Build {
    /// Each change signed and decided one by one, as an app's writes leave a file: a snapshot
    /// and the envelopes written since.
    #[default]
    Changes,
    /// Each file decided whole with every change's signature, as a node that caught up holds
    /// it: one snapshot per file. About five times faster to build on two cores, for runs of
    /// 100,000 files and more; figures compare only with runs built the same way.
    Whole,
}

/// Which measurement.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Which {
    /// A fresh node bootstraps every file from one peer.
    Bootstrap,
    /// Two nodes holding the same files confirm it.
    Insync,
    /// Two nodes find the files that differ.
    Diff,
}

/// How often a clinical read is made on the catching-up node.
const READ_EVERY: Duration = Duration::from_millis(50);
/// How often the hospital sends the centre a priority referral while the centre catches up.
const PRIORITY_EVERY: Duration = Duration::from_millis(250);
/// How long a priority referral may take to reach the catching-up centre before the
/// benchmark gives up on it.
const PRIORITY_WAIT_MAX: Duration = Duration::from_secs(60);

/// Options of `bench sync`.
pub struct Options {
    pub which: Which,
    pub files: usize,
    pub source: Source,
    pub diff: usize,
    pub writes: usize,
    pub build: Build,
    pub json: Option<PathBuf>,
    /// The storage engine of the node's store.
    pub store_engine: estuary_node::store::StoreEngine,
}

#[derive(Serialize)]
struct Bootstrap {
    profile: &'static str,
    data: String,
    /// How the serving node's files were built.
    built: Build,
    /// The storage engine of both nodes' stores.
    store_engine: StoreEngine,
    files: usize,
    changes: usize,
    seconds: f64,
    files_per_s: f64,
    changes_per_s: f64,
    /// CPU time of this process (both nodes, the reader) during the catch-up, in seconds, and
    /// per file in ms.
    cpu_seconds: f64,
    cpu_ms_per_file: f64,
    /// This process's resident memory as the catch-up began, and its peak until the catch-up
    /// ended, in MiB: both nodes and the benchmark's own threads, so an upper bound on the
    /// catching-up node's. The peak counts from the process's start where the kernel cannot
    /// start it over (`peak_rss_from_start`).
    rss_before_mib: f64,
    peak_rss_mib: f64,
    peak_rss_from_start: bool,
    /// Bytes on the wire, both ways (the sync protocol's messages, CBOR).
    wire_bytes: u64,
    /// The data's compressed size: every file saved by automerge.
    payload_bytes: u64,
    wire_to_payload: f64,
    /// What the files cannot travel in less: their compressed saves plus one signature (64
    /// bytes) per author per file (every file here has one author, the hospital).
    floor_bytes: u64,
    wire_to_floor: f64,
    /// The catching-up node's store on disk, per file, against the file's automerge save.
    /// Once the store settled (`settled_storage_bytes`): its engine compacts in the
    /// background, and right after a fast catch-up it holds tables not yet compacted.
    store_bytes_per_file: f64,
    /// The same right as the catch-up ended.
    store_bytes_per_file_at_end: f64,
    /// How long the store took to settle, in seconds.
    store_settle_s: f64,
    payload_bytes_per_file: f64,
    store_to_payload: f64,
    /// Of the store per file, the storage engine's journal: a bounded amount (up to about
    /// 64 MB on the log-structured engine, none on sled) that does not grow with the store;
    /// the rest is what the files cost as the store grows.
    store_journal_bytes_per_file: f64,
    /// The store per file without its journal, against the file's save plus a signature.
    store_without_journal_to_floor: f64,
    /// The catching-up node's live bytes (keys and values) per keyspace, per file: what the
    /// store holds before the storage engine's own overhead.
    keyspaces: Vec<KeyspacePerFile>,
    /// Priority referrals the hospital sent the centre while it caught up (one every 250 ms),
    /// and how long each took from the hospital's acknowledgement until the centre held it,
    /// in ms.
    priority_referrals: usize,
    priority_ms_p50: f64,
    priority_ms_p99: f64,
    priority_ms_max: f64,
    /// Clinical reads made on the catching-up node while it caught up (one every 50 ms).
    reads: usize,
    read_ms_p50: f64,
    read_ms_p99: f64,
    read_ms_max: f64,
    propagation_writes: usize,
    propagation_p50_ms: f64,
    propagation_p99_ms: f64,
}

#[derive(Serialize)]
struct KeyspacePerFile {
    prefix: String,
    keys_per_file: f64,
    bytes_per_file: f64,
}

#[derive(Serialize)]
struct Insync {
    profile: &'static str,
    files: usize,
    round_trips: u64,
    bytes: u64,
    /// CPU of the reconciliation's work on both sides (fingerprints, answers), in ms.
    cpu_ms: f64,
}

#[derive(Serialize)]
struct Diff {
    profile: &'static str,
    files: usize,
    differences: usize,
    /// Differences the measured reconciliation found.
    found: usize,
    round_trips: u64,
    bytes: u64,
    bytes_per_difference: f64,
    /// Bytes per difference beyond the 16-byte document id and 32-byte digest it names.
    overhead_per_difference: f64,
}

pub fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

/// How long the store may take to settle after a catch-up, in seconds.
const STORE_SETTLE_MAX_S: f64 = 60.0;
/// How often its size is read meanwhile.
const STORE_SETTLE_POLL: Duration = Duration::from_millis(500);
/// It has settled once its size stays within this fraction (of its size) from one read to
/// the next…
const STORE_SETTLED_FRACTION: f64 = 0.005;
/// …for this many reads in a row.
const STORE_SETTLED_READS: usize = 4;

/// The store's bytes on disk once its engine's background compaction has caught up (its size
/// steady over `STORE_SETTLED_READS` reads), or after `STORE_SETTLE_MAX_S`; with the seconds
/// it took.
fn settled_storage_bytes(node: &Node) -> anyhow::Result<(u64, f64)> {
    let started = Instant::now();
    let mut last = node.storage_bytes()?;
    let mut steady = 0;
    while steady < STORE_SETTLED_READS && started.elapsed().as_secs_f64() < STORE_SETTLE_MAX_S {
        std::thread::sleep(STORE_SETTLE_POLL);
        let now = node.storage_bytes()?;
        let moved = (now as f64 - last as f64).abs() / (last.max(1) as f64);
        steady = if moved < STORE_SETTLED_FRACTION {
            steady + 1
        } else {
            0
        };
        last = now;
    }
    Ok((last, started.elapsed().as_secs_f64()))
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Two member nodes, the hospital and a centre, in `root`.
struct Pair {
    hospital: Arc<Node>,
    centre: Arc<Node>,
}

fn pair(root: &Path, store_engine: StoreEngine) -> anyhow::Result<Pair> {
    let authority = Identity::from_secret(AUTHORITY);
    let by = sample::editor(sample::HOSPITAL, 0);
    let mut roster = Roster::create(&authority.actor(), &by)?;
    let mut configs = Vec::new();
    for (name, kind) in [
        (sample::HOSPITAL, InstitutionKind::CoreHospital),
        (sample::CENTRE, InstitutionKind::CommunityCentre),
    ] {
        let data_dir = root.join(name);
        std::fs::create_dir_all(&data_dir)?;
        let key = Identity::load_or_create(&data_dir)?.public_key();
        roster.apply(
            &by,
            &RosterOp::AddInstitution {
                id: sample::institution(name),
                name: name.into(),
                kind,
            },
        )?;
        roster.apply(
            &by,
            &RosterOp::AddNodeKey {
                institution: sample::institution(name),
                key,
            },
        )?;
        configs.push(NodeConfig {
            data_dir,
            authority: authority.public_key(),
            store_engine: Some(store_engine),
        });
    }
    let roster = SignedRoster::sign(&authority, &mut roster).encode();
    Ok(Pair {
        hospital: Arc::new(Node::open(&configs[0], Some(&roster))?),
        centre: Arc::new(Node::open(&configs[1], Some(&roster))?),
    })
}

/// The health files of `options.source`, written as an app writes them by `writer`'s key
/// (the hospital), taken by every node of `into` as `options.build` says; returns their ids,
/// their residents' names, the number of changes, and the files' compressed size.
fn build(
    writer: &Node,
    into: &[&Node],
    files: usize,
    options: &Options,
) -> anyhow::Result<(Vec<DocumentId>, Vec<String>, usize, u64)> {
    let source = &options.source;
    if options.build == Build::Whole {
        return build_whole(writer, into, files, source);
    }
    let actor = writer.identity().actor();
    let mut batch = Vec::new();
    let (mut ids, mut names, mut total, mut payload) =
        (Vec::with_capacity(files), Vec::new(), 0, 0u64);
    let mut n = 0;
    let built = source.each_record(files, |record| {
        let mut file = crate::health_data::writes(&record)?.build(&actor, sample::HOSPITAL)?;
        payload += file.save().len() as u64;
        let id = file.id();
        ids.push(id);
        names.push(resident_name(&record));
        for mut change in file.automerge().clone().get_changes(&[]) {
            batch.push(Envelope::sign(writer.identity(), id, &mut change).encode());
            total += 1;
        }
        n += 1;
        if batch.len() >= BUILD_BATCH {
            ingest_into(into, &mut batch)?;
        }
        if n % 10_000 == 0 {
            eprintln!("  {n} files built");
        }
        Ok(())
    })?;
    ingest_into(into, &mut batch)?;
    anyhow::ensure!(
        built == files,
        "{} holds {built} files, not {files}",
        source.describe()
    );
    Ok((ids, names, total, payload))
}

/// "Family Given": what a clinician searches a resident by.
fn resident_name(record: &FileRecord) -> String {
    format!(
        "{} {}",
        record.demographics.name.family, record.demographics.name.given
    )
}

/// One file made and signed as `build_whole` makes it.
struct BuiltFile {
    id: DocumentId,
    name: String,
    changes: usize,
    payload: u64,
}

/// `build` with `Build::Whole`: batches of `BUILD_WHOLE_BATCH` records are made into files,
/// signed and decided whole (`Node::ingest_whole`) on `BUILD_THREADS` threads, while this one
/// reads the records.
fn build_whole(
    writer: &Node,
    into: &[&Node],
    files: usize,
    source: &Source,
) -> anyhow::Result<(Vec<DocumentId>, Vec<String>, usize, u64)> {
    let (records_to, records) =
        std::sync::mpsc::sync_channel::<(usize, Vec<FileRecord>)>(BUILD_THREADS);
    let records = std::sync::Mutex::new(records);
    let mut built: Vec<(usize, Vec<BuiltFile>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..BUILD_THREADS)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<Vec<(usize, Vec<BuiltFile>)>> {
                    let (mut done, mut failed) = (Vec::new(), None);
                    // After a failure the records are still taken (and dropped), so that the
                    // reader never waits on a full channel.
                    while let Ok((first, batch)) =
                        records.lock().unwrap_or_else(|p| p.into_inner()).recv()
                    {
                        if failed.is_none() {
                            match decide_whole_batch(writer, into, batch) {
                                Ok(files) => done.push((first, files)),
                                Err(error) => failed = Some(error),
                            }
                        }
                    }
                    failed.map_or(Ok(done), Err)
                })
            })
            .collect();
        let mut batch = Vec::with_capacity(BUILD_WHOLE_BATCH);
        let mut first = 0;
        let read = source.each_record(files, |record| {
            batch.push(record);
            if batch.len() == BUILD_WHOLE_BATCH {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BUILD_WHOLE_BATCH));
                records_to
                    .send((first, full))
                    .map_err(|_| anyhow::anyhow!("the build threads stopped"))?;
                first += BUILD_WHOLE_BATCH;
                if first % 10_000 < BUILD_WHOLE_BATCH {
                    eprintln!("  {first} files read");
                }
            }
            Ok(())
        });
        if !batch.is_empty() {
            let _ = records_to.send((first, batch));
        }
        drop(records_to);
        let mut built = Vec::new();
        for worker in workers {
            built.extend(
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a build thread panicked"))??,
            );
        }
        let read = read?;
        anyhow::ensure!(
            read == files,
            "{} holds {read} files, not {files}",
            source.describe()
        );
        anyhow::Ok(built)
    })?;
    built.sort_by_key(|(first, _)| *first);
    let (mut ids, mut names, mut changes, mut payload) =
        (Vec::with_capacity(files), Vec::with_capacity(files), 0, 0);
    for file in built.into_iter().flat_map(|(_, files)| files) {
        ids.push(file.id);
        names.push(file.name);
        changes += file.changes;
        payload += file.payload;
    }
    Ok((ids, names, changes, payload))
}

/// Makes `records` into files written by `writer`'s key, signs every change and decides each
/// file whole at every node of `into`.
fn decide_whole_batch(
    writer: &Node,
    into: &[&Node],
    records: Vec<FileRecord>,
) -> anyhow::Result<Vec<BuiltFile>> {
    let actor = writer.identity().actor();
    let mut built = Vec::with_capacity(records.len());
    let mut documents = Vec::with_capacity(records.len());
    for record in &records {
        let mut file = crate::health_data::writes(record)?.build(&actor, sample::HOSPITAL)?;
        let saved = file.save();
        let id = file.id();
        let mut doc = file.automerge().clone();
        let signatures: HashMap<[u8; 32], [u8; 64]> = doc
            .get_changes_meta(&[])
            .into_iter()
            .map(|meta| (meta.hash.0, sign_change(writer.identity(), &id, &meta.hash)))
            .collect();
        built.push(BuiltFile {
            id,
            name: resident_name(record),
            changes: signatures.len(),
            payload: saved.len() as u64,
        });
        documents.push(WholeDocument {
            id,
            doc,
            signatures,
            changes: None,
            saved: None,
        });
    }
    for (n, node) in into.iter().enumerate() {
        let copies = if n + 1 == into.len() {
            std::mem::take(&mut documents)
        } else {
            documents.clone()
        };
        let (outcomes, given_back) = node.ingest_whole(copies)?;
        anyhow::ensure!(
            given_back.is_empty()
                && outcomes
                    .iter()
                    .all(|o| matches!(o, Ok(Ingested::Accepted(_)))),
            "a file built whole was not accepted whole"
        );
    }
    Ok(built)
}

/// Ingests `batch` into every node of `into`, and empties it.
fn ingest_into(into: &[&Node], batch: &mut Vec<Vec<u8>>) -> anyhow::Result<()> {
    for node in into {
        node.ingest_many(batch)?;
    }
    batch.clear();
    Ok(())
}

/// A clinician's read: a search by name and a look at the first file it finds, as the API
/// answers them (`POST /v1/health-files/search`, `GET /v1/health-files/{id}`).
fn clinical_read(node: &Node, name: &str) -> anyhow::Result<()> {
    if let Some(first) = node.search_residents_by_name(name)?.first() {
        node.view(first.id, DocumentKind::HealthFile)?;
    }
    Ok(())
}

fn memory_address(n: u64) -> Multiaddr {
    format!("/memory/{n}").parse().expect("a memory address")
}

fn config(listen: Vec<Multiaddr>, bootstrap: Vec<Multiaddr>, every: Duration) -> SyncConfig {
    SyncConfig {
        listen,
        bootstrap,
        reconcile_every: every,
        transport: TransportKind::Memory,
        ..SyncConfig::default()
    }
}

/// Starts both nodes' sync, the centre dialling the hospital.
fn start(pair: &Pair, every: Duration) -> anyhow::Result<(SyncHandle, SyncHandle)> {
    // Fresh ports for every start: `bench all` runs several measurements in one process, and
    // the memory transport may hold a stopped swarm's port for a while.
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let port = u64::from_le_bytes(random) >> 8;
    let hospital_address = memory_address(port + 1);
    let hospital = SyncHandle::start(
        pair.hospital.clone(),
        config(vec![hospital_address.clone()], vec![], every),
    )?;
    let centre = SyncHandle::start(
        pair.centre.clone(),
        config(
            vec![memory_address(port + 2)],
            vec![hospital_address],
            every,
        ),
    )?;
    Ok((hospital, centre))
}

fn peer_stats(of: &SyncHandle, peer: &SyncHandle) -> Option<PeerStats> {
    of.stats().peers.get(&peer.peer_id().to_string()).cloned()
}

/// Reconciles the centre with the hospital once (after connecting); returns its round trips
/// and bytes.
async fn reconcile_once(centre: &SyncHandle, hospital: &SyncHandle) -> anyhow::Result<(u64, u64)> {
    let started = Instant::now();
    loop {
        centre.reconcile_now().await?;
        if let Some(stats) = peer_stats(centre, hospital)
            && let (Some(round_trips), Some(bytes)) =
                (stats.last_round_trips, stats.last_reconciliation_bytes)
        {
            return Ok((round_trips, bytes));
        }
        anyhow::ensure!(
            started.elapsed() < LIMIT,
            "no reconciliation within {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.files > 0, "--files must be positive");
    let root = std::env::temp_dir().join(format!("estuary-bench-sync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let pair = pair(&root, options.store_engine)?;
        let report = match options.which {
            Which::Bootstrap => serde_json::to_value(bootstrap(&pair, options).await?)?,
            Which::Insync => serde_json::to_value(insync(&pair, options).await?)?,
            Which::Diff => serde_json::to_value(diff(&pair, options).await?)?,
        };
        if let Some(path) = &options.json {
            std::fs::write(path, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
        anyhow::Ok(())
    });
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn bootstrap(pair: &Pair, options: &Options) -> anyhow::Result<Bootstrap> {
    let files = options.files;
    eprintln!(
        "building {files} health files at the hospital ({})…",
        options.source.describe()
    );
    let (ids, names, changes, payload) = build(&pair.hospital, &[&pair.hospital], files, options)?;
    let peak_from_here = process_stats::reset_peak_rss();
    let rss_before = process_stats::rss_mib();
    let started = Instant::now();
    let cpu_before = process_stats::cpu_seconds();
    let (hospital, centre) = start(pair, Duration::from_secs(1))?;
    eprintln!("the centre joins empty and catches up, a clinical read there every 50 ms…");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (node, done) = (pair.centre.clone(), done.clone());
        std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            let mut reads = Vec::new();
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let next = Instant::now() + READ_EVERY;
                let start = Instant::now();
                clinical_read(&node, &names[(n * 7_919) % names.len()])?;
                reads.push(start.elapsed().as_secs_f64() * 1e3);
                n += 1;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(reads)
        })
    };
    // Meanwhile the hospital refers residents to the centre in the green channel: each must
    // reach the catching-up centre at once (urgent first: gossip, and fetches ahead of the
    // catch-up's own).
    let priority = {
        let (hospital, centre, done) = (pair.hospital.clone(), pair.centre.clone(), done.clone());
        let ids = ids.clone();
        std::thread::spawn(move || -> anyhow::Result<Vec<f64>> {
            let mut latencies = Vec::new();
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let next = Instant::now() + PRIORITY_EVERY;
                let (referral, _) = hospital.create_referral(
                    &sample::editor(sample::HOSPITAL, sample::MORNING_MS + (1 << 41) + n),
                    &NewReferral {
                        patient: ids[(n as usize * 104_729) % ids.len()],
                        direction: Direction::Down,
                        to: InstitutionId::new(sample::CENTRE)?,
                        reason: format!("early discharge {n}: recovery at home"),
                        urgency: Urgency::Priority,
                        handover: String::new(),
                    },
                )?;
                let acked_at = Instant::now();
                while centre.kind_of(referral)?.is_none() {
                    anyhow::ensure!(
                        acked_at.elapsed() < PRIORITY_WAIT_MAX,
                        "priority referral {n} did not reach the centre within {PRIORITY_WAIT_MAX:?}"
                    );
                    std::thread::sleep(Duration::from_micros(500));
                }
                latencies.push(acked_at.elapsed().as_secs_f64() * 1e3);
                n += 1;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(latencies)
        })
    };
    let mut last_report = Instant::now();
    while *pair.centre.catalogue() != *pair.hospital.catalogue()
        || pair.centre.catalogue().len() < files
    {
        anyhow::ensure!(started.elapsed() < LIMIT, "no catch-up within {LIMIT:?}");
        if last_report.elapsed() > Duration::from_secs(10) {
            let catch_up = centre.stats().catch_up;
            eprintln!(
                "  {}/{} files, {} KiB, ETA {:.0} s",
                catch_up.documents_done,
                catch_up.documents_total,
                catch_up.bytes / 1024,
                catch_up.eta_s.unwrap_or(f64::NAN)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = process_stats::cpu_seconds() - cpu_before;
    let peak_rss_mib = process_stats::peak_rss_mib();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut reads = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    reads.sort_by(f64::total_cmp);
    let mut priority = priority
        .join()
        .map_err(|_| anyhow::anyhow!("the priority writer panicked"))??;
    priority.sort_by(f64::total_cmp);
    let wire_bytes = peer_stats(&centre, &hospital)
        .map(|p| p.bytes_in + p.bytes_out)
        .unwrap_or(0);
    let store_bytes_at_end = pair.centre.storage_bytes()?;
    let (store_bytes, store_settle_s) = settled_storage_bytes(&pair.centre)?;
    let journal_bytes = pair.centre.storage_journal_bytes()?;
    let keyspaces: Vec<KeyspacePerFile> = pair
        .centre
        .keyspace_bytes()?
        .into_iter()
        .map(|space| KeyspacePerFile {
            prefix: space.prefix,
            keys_per_file: space.keys as f64 / files as f64,
            bytes_per_file: space.bytes as f64 / files as f64,
        })
        .collect();

    let writes = options.writes;
    eprintln!("{writes} new writes at the hospital, gossiped…");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = Vec::with_capacity(writes);
    for n in 0..writes {
        let file = ids[(n * 7_919) % ids.len()];
        let writer = pair.hospital.clone();
        let acked = tokio::task::spawn_blocking(move || {
            writer
                .apply_health_file(
                    file,
                    &sample::editor(sample::HOSPITAL, sample::MORNING_MS + (1 << 40) + n as i64),
                    &HealthFileOp::AddAllergy(NewAllergy {
                        substance: format!("gossiped {n}"),
                        reaction: "rash".into(),
                        severity: Severity::Mild,
                    }),
                )
                .map_err(anyhow::Error::from)
        })
        .await??;
        let acked_at = Instant::now();
        while !pair.centre.has_change(file, &acked)? {
            anyhow::ensure!(
                acked_at.elapsed() < Duration::from_secs(60),
                "write {n} did not reach the centre within a minute"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(acked_at.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    hospital.shutdown().await;
    centre.shutdown().await;
    let report = Bootstrap {
        profile: profile(),
        data: options.source.describe(),
        built: options.build,
        store_engine: options.store_engine,
        files,
        changes,
        seconds,
        files_per_s: files as f64 / seconds,
        changes_per_s: changes as f64 / seconds,
        cpu_seconds,
        cpu_ms_per_file: cpu_seconds * 1e3 / files as f64,
        rss_before_mib: rss_before,
        peak_rss_mib,
        peak_rss_from_start: !peak_from_here,
        wire_bytes,
        payload_bytes: payload,
        wire_to_payload: wire_bytes as f64 / payload as f64,
        floor_bytes: payload + 64 * files as u64,
        wire_to_floor: wire_bytes as f64 / (payload + 64 * files as u64) as f64,
        store_bytes_per_file: store_bytes as f64 / files as f64,
        store_bytes_per_file_at_end: store_bytes_at_end as f64 / files as f64,
        store_settle_s,
        payload_bytes_per_file: payload as f64 / files as f64,
        store_to_payload: store_bytes as f64 / payload as f64,
        store_journal_bytes_per_file: journal_bytes as f64 / files as f64,
        store_without_journal_to_floor: (store_bytes - journal_bytes.min(store_bytes)) as f64
            / (payload + 64 * files as u64) as f64,
        keyspaces,
        priority_referrals: priority.len(),
        priority_ms_p50: percentile(&priority, 0.5),
        priority_ms_p99: percentile(&priority, 0.99),
        priority_ms_max: percentile(&priority, 1.0),
        reads: reads.len(),
        read_ms_p50: percentile(&reads, 0.5),
        read_ms_p99: percentile(&reads, 0.99),
        read_ms_max: percentile(&reads, 1.0),
        propagation_writes: writes,
        propagation_p50_ms: percentile(&latencies, 0.5),
        propagation_p99_ms: percentile(&latencies, 0.99),
    };
    println!(
        "bootstrap of {files} realistic files ({changes} changes): {seconds:.1} s, {:.0} files/s, wire {} KiB = {:.2}× the compressed payload ({} KiB), {:.2}× the floor (payload and a signature per author per file)",
        report.files_per_s,
        wire_bytes / 1024,
        report.wire_to_payload,
        payload / 1024,
        report.wire_to_floor
    );
    println!(
        "CPU over both nodes meanwhile: {cpu_seconds:.1} s, {:.2} ms per file",
        report.cpu_ms_per_file
    );
    println!(
        "resident memory of this process (both nodes): {rss_before:.0} MiB as the catch-up began, peak {peak_rss_mib:.0} MiB{}",
        if peak_from_here {
            ""
        } else {
            " (peak since the process started)"
        }
    );
    println!(
        "the centre's store: {:.0} bytes per file = {:.2}× the file's automerge save ({:.0} bytes), {:.1} s after the catch-up ended ({:.0} bytes per file as it ended)",
        report.store_bytes_per_file,
        report.store_to_payload,
        report.payload_bytes_per_file,
        report.store_settle_s,
        report.store_bytes_per_file_at_end
    );
    println!(
        "  of which the engine's journal (bounded, not per file) {:.0} bytes per file; without it {:.0} bytes per file = {:.2}× the save plus a signature",
        report.store_journal_bytes_per_file,
        report.store_bytes_per_file - report.store_journal_bytes_per_file,
        report.store_without_journal_to_floor
    );
    let live: f64 = report.keyspaces.iter().map(|k| k.bytes_per_file).sum();
    println!(
        "  live keys and values: {live:.0} bytes per file (the rest is the {} engine's overhead); by keyspace: {}",
        report.store_engine,
        report
            .keyspaces
            .iter()
            .map(|k| format!(
                "{} {:.0} B ({:.1} keys)",
                k.prefix, k.bytes_per_file, k.keys_per_file
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "{} clinical reads on the centre meanwhile (a name search and the first file found): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.reads, report.read_ms_p50, report.read_ms_p99, report.read_ms_max
    );
    println!(
        "{} priority referrals sent to the centre meanwhile (one every 250 ms), held there after p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (target p99 ≤1 s)",
        report.priority_referrals,
        report.priority_ms_p50,
        report.priority_ms_p99,
        report.priority_ms_max
    );
    println!(
        "gossip propagation of {writes} writes: p50 {:.2} ms, p99 {:.2} ms (ack at the writer → durable at the receiver)",
        report.propagation_p50_ms, report.propagation_p99_ms
    );
    println!("({} build)", report.profile);
    Ok(report)
}

/// The CPU time of one reconciliation's work on both sides, with the nodes' catalogues,
/// in-process: the median of 5 runs, in ms.
fn reconciliation_cpu_ms(pair: &Pair) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let ours = pair.centre.catalogue();
        let theirs = pair.hospital.catalogue();
        let mut run = Hybrid::new(&ours);
        while run.receive(&ours, &theirs.answer(&run.query())?)? {}
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

async fn insync(pair: &Pair, options: &Options) -> anyhow::Result<Insync> {
    let files = options.files;
    eprintln!("building the same {files} health files at both nodes…");
    build(
        &pair.hospital,
        &[&pair.hospital, &pair.centre],
        files,
        options,
    )?;
    let (hospital, centre) = start(pair, Duration::from_secs(3_600))?;
    let (round_trips, bytes) = reconcile_once(&centre, &hospital).await?;
    let lag = peer_stats(&centre, &hospital).and_then(|p| p.lag);
    anyhow::ensure!(lag == Some(0), "the nodes differ: {lag:?}");
    hospital.shutdown().await;
    centre.shutdown().await;
    let report = Insync {
        profile: profile(),
        files,
        round_trips,
        bytes,
        cpu_ms: reconciliation_cpu_ms(pair)?,
    };
    println!(
        "in-sync check of {files} files: {round_trips} round trip(s), {bytes} bytes, {:.1} ms CPU ({} build)",
        report.cpu_ms, report.profile
    );
    Ok(report)
}

async fn diff(pair: &Pair, options: &Options) -> anyhow::Result<Diff> {
    let (files, differences) = (options.files, options.diff.min(options.files));
    anyhow::ensure!(differences > 0, "--diff must be positive");
    eprintln!(
        "building the same {files} health files at both nodes, then {differences} edits at one…"
    );
    let (ids, _, _, _) = build(
        &pair.hospital,
        &[&pair.hospital, &pair.centre],
        files,
        options,
    )?;
    for k in 0..differences {
        let file = ids[(k * 7_919) % ids.len()];
        pair.hospital.apply_health_file(
            file,
            &sample::editor(sample::HOSPITAL, sample::MORNING_MS + (1 << 40) + k as i64),
            &HealthFileOp::AddAllergy(NewAllergy {
                substance: format!("different {k}"),
                reaction: "rash".into(),
                severity: Severity::Mild,
            }),
        )?;
    }
    let (hospital, centre) = start(pair, Duration::from_secs(3_600))?;
    let (round_trips, bytes) = reconcile_once(&centre, &hospital).await?;
    // The hospital may reconcile first on connecting (its interval's first tick) and sync a
    // few of the documents before the centre's measured reconciliation: that one finds the
    // rest, and its bytes are counted per document it found.
    let lag = peer_stats(&centre, &hospital).and_then(|p| p.lag);
    let found = lag.unwrap_or(0) as usize;
    anyhow::ensure!(
        found > 0 && found <= differences,
        "found {lag:?} differences of {differences}"
    );
    hospital.shutdown().await;
    centre.shutdown().await;
    let per = bytes as f64 / found as f64;
    let report = Diff {
        profile: profile(),
        files,
        differences,
        found,
        round_trips,
        bytes,
        bytes_per_difference: per,
        overhead_per_difference: per - 48.0,
    };
    println!(
        "{found} of {differences} differences among {files} files found: {round_trips} round trips, {bytes} bytes, {per:.0} bytes per difference ({} build)",
        report.profile
    );
    Ok(report)
}
