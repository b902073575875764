//! `bench sync`: two real nodes (real stores, real libp2p swarms over the in-process memory
//! transport). A node that joins empty catches up on every health file the other holds —
//! documents and changes per second, bytes on the wire — and then the other's new writes
//! reach it by gossip: propagation latency from the writer's acknowledgement to the change
//! being durable at the receiver, as p50 and p99.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::node::{Node, NodeConfig};
use estuary_node::sync::{Multiaddr, SyncConfig, SyncHandle, TransportKind};
use serde::Serialize;

use crate::sample;

const AUTHORITY: [u8; 32] = [1; 32];
/// Envelopes ingested per batch while building the source node.
const BUILD_BATCH: usize = 2_048;
/// How long the catch-up may take before the benchmark gives up.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(1_800);

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    docs: usize,
    changes: usize,
    catch_up_s: f64,
    catch_up_docs_per_s: f64,
    catch_up_changes_per_s: f64,
    catch_up_bytes_in: u64,
    propagation_writes: usize,
    propagation_p50_ms: f64,
    propagation_p99_ms: f64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn memory_address(n: u64) -> Multiaddr {
    format!("/memory/{n}").parse().expect("a memory address")
}

pub fn run(docs: usize, writes: usize, json: Option<&Path>) -> anyhow::Result<()> {
    anyhow::ensure!(
        docs > 0 && writes > 0,
        "--docs and --writes must be positive"
    );
    let root = std::env::temp_dir().join(format!("estuary-bench-sync-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(run_in(&root, docs, writes, json));
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn run_in(
    root: &Path,
    docs: usize,
    writes: usize,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    // Two members: the hospital holds every file; the centre joins empty.
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
        });
    }
    let roster = SignedRoster::sign(&authority, &mut roster).encode();
    let hospital = Arc::new(Node::open(&configs[0], Some(&roster))?);
    let centre = Arc::new(Node::open(&configs[1], Some(&roster))?);

    eprintln!("building {docs} health files at the hospital…");
    let actor = hospital.identity().actor();
    let mut batch = Vec::new();
    let mut changes = 0;
    let mut files = Vec::with_capacity(docs);
    for n in 0..docs {
        let at = sample::MORNING_MS + n as i64;
        let mut demographics = sample::demographics();
        demographics.phone = Some(format!("+86 135{n:08}"));
        let mut file =
            HealthFile::create(&actor, &sample::editor(sample::HOSPITAL, at), &demographics)?;
        for (k, substance) in ["penicillin", "sulfonamide", "latex"].iter().enumerate() {
            file.apply(
                &sample::editor(sample::HOSPITAL, at + k as i64 + 1),
                &HealthFileOp::AddAllergy(NewAllergy {
                    substance: (*substance).into(),
                    reaction: "rash".into(),
                    severity: Severity::Mild,
                }),
            )?;
        }
        let id = file.id();
        files.push(id);
        for mut change in file.automerge().clone().get_changes(&[]) {
            batch.push(Envelope::sign(hospital.identity(), id, &mut change).encode());
            changes += 1;
        }
        if batch.len() >= BUILD_BATCH {
            hospital.ingest_many(&batch)?;
            batch.clear();
        }
    }
    hospital.ingest_many(&batch)?;

    let config = |listen: Vec<_>, bootstrap: Vec<_>| SyncConfig {
        listen,
        bootstrap,
        reconcile_every: Duration::from_secs(1),
        transport: TransportKind::Memory,
        ..SyncConfig::default()
    };
    let port = u64::from(std::process::id()) << 16;
    let hospital_address = memory_address(port + 1);
    let hospital_sync = SyncHandle::start(
        hospital.clone(),
        config(vec![hospital_address.clone()], vec![]),
    )?;
    let started = Instant::now();
    let centre_sync = SyncHandle::start(
        centre.clone(),
        config(vec![memory_address(port + 2)], vec![hospital_address]),
    )?;
    eprintln!("the centre joins empty and catches up…");
    let mut last_report = Instant::now();
    while *centre.catalogue() != *hospital.catalogue() {
        anyhow::ensure!(
            started.elapsed() < CATCH_UP_LIMIT,
            "no catch-up within {CATCH_UP_LIMIT:?}"
        );
        if last_report.elapsed() > Duration::from_secs(5) {
            let catch_up = centre_sync.stats().catch_up;
            eprintln!(
                "  {}/{} documents, {} KiB, ETA {:.0} s",
                catch_up.documents_done,
                catch_up.documents_total,
                catch_up.bytes / 1024,
                catch_up.eta_s.unwrap_or(f64::NAN)
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up_s = started.elapsed().as_secs_f64();
    let bytes_in = centre_sync
        .stats()
        .peers
        .get(&hospital_sync.peer_id().to_string())
        .map(|p| p.bytes_in)
        .unwrap_or(0);

    eprintln!("{writes} new writes at the hospital, gossiped…");
    // Let the gossip mesh settle after the bulk transfer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut latencies = Vec::with_capacity(writes);
    for n in 0..writes {
        let file = files[(n * 7_919) % files.len()];
        let writer = hospital.clone();
        let acked = tokio::task::spawn_blocking(move || {
            writer
                .apply_health_file(
                    file,
                    &sample::editor(sample::HOSPITAL, sample::MORNING_MS + 10_000_000 + n as i64),
                    &HealthFileOp::AddAllergy(NewAllergy {
                        substance: format!("substance {n}"),
                        reaction: "rash".into(),
                        severity: Severity::Mild,
                    }),
                )
                .map_err(anyhow::Error::from)
        })
        .await??;
        let acked_at = Instant::now();
        loop {
            if centre.has_change(file, &acked)? {
                break;
            }
            anyhow::ensure!(
                acked_at.elapsed() < Duration::from_secs(60),
                "write {n} did not reach the centre within a minute"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(acked_at.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let report = Report {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        docs,
        changes,
        catch_up_s,
        catch_up_docs_per_s: docs as f64 / catch_up_s,
        catch_up_changes_per_s: changes as f64 / catch_up_s,
        catch_up_bytes_in: bytes_in,
        propagation_writes: writes,
        propagation_p50_ms: percentile(&latencies, 0.5),
        propagation_p99_ms: percentile(&latencies, 0.99),
    };
    println!(
        "catch-up of {docs} files ({changes} changes): {catch_up_s:.1} s, {:.0} files/s, {:.0} changes/s, {} KiB received",
        report.catch_up_docs_per_s,
        report.catch_up_changes_per_s,
        bytes_in / 1024
    );
    println!(
        "gossip propagation of {writes} writes: p50 {:.2} ms, p99 {:.2} ms (ack at the writer → durable at the receiver)",
        report.propagation_p50_ms, report.propagation_p99_ms
    );
    println!("({} build)", report.profile);
    hospital_sync.shutdown().await;
    centre_sync.shutdown().await;
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
