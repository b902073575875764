//! `bench ingest`: what deciding one fetched health file costs, step by step, on one core and
//! without the network: loading its bytes, listing its changes, checking their signatures,
//! judging its history and reading its view, saving it (and, for comparison, replaying its
//! changes one by one). Realistic files (`gen.js`), medians
//! per file in microseconds; writes JSON.
//!
//! It says where the catch-up's CPU goes and what its floor is: a node that catches up at
//! some number of files per second spends at most (cores / that rate) of CPU per file.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use estuary_node::envelope::{Envelope, verify_signature};
use estuary_node::identity::Identity;
use estuary_node::model::automerge::{AutoCommit, Change};
use estuary_node::model::*;
use serde::Serialize;

use crate::health_data::Source;
use crate::sample;

/// The writer's key.
const WRITER: [u8; 32] = [7; 32];

/// What to run.
pub struct Options {
    /// Health files measured.
    pub files: usize,
    /// Their source.
    pub source: Source,
    /// Where to write the JSON report.
    pub json: Option<PathBuf>,
}

/// One fetched file as the catching-up node receives it.
struct Fetched {
    id: DocumentId,
    saved: Vec<u8>,
    signatures: Vec<[u8; 64]>,
}

#[derive(Serialize, Default)]
struct Steps {
    load_us: f64,
    list_changes_us: f64,
    verify_each_change_us: f64,
    verify_one_per_author_us: f64,
    judge_history_us: f64,
    view_us: f64,
    save_us: f64,
    /// Applying the changes one by one to an empty document: what judging each change on
    /// the document as it grows (rather than at past heads) would pay before reading.
    replay_us: f64,
}

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    data: String,
    files: usize,
    changes_per_file: f64,
    saved_bytes_per_file: f64,
    /// Medians per file, in microseconds.
    median: Steps,
    /// Means per file, in microseconds (what throughput pays).
    mean: Steps,
}

/// Builds the files as an app writes them and signs every change.
fn build(options: &Options) -> anyhow::Result<(Vec<Fetched>, usize)> {
    let writer = Identity::from_secret(WRITER);
    let actor = writer.actor();
    let records = options.source.records(options.files)?;
    let mut fetched = Vec::with_capacity(records.len());
    let mut changes = 0;
    for record in &records {
        let writes = record.writes()?;
        let editor = |at: Timestamp| sample::editor(sample::HOSPITAL, at.0);
        let mut file =
            HealthFile::create(&actor, &editor(writes.created_at), &writes.demographics)?;
        for (at, op) in &writes.operations {
            file.apply(&editor(*at), op)?;
        }
        let id = file.id();
        let mut doc = file.automerge().clone();
        let mut signed: Vec<([u8; 32], [u8; 64])> = doc
            .get_changes(&[])
            .into_iter()
            .map(|mut change| {
                let envelope = Envelope::sign(&writer, id, &mut change);
                let signature: [u8; 64] = envelope.signature.as_slice().try_into()?;
                Ok((change.hash().0, signature))
            })
            .collect::<anyhow::Result<_>>()?;
        signed.sort_unstable_by_key(|(hash, _)| *hash);
        changes += signed.len();
        fetched.push(Fetched {
            id,
            saved: doc.save(),
            signatures: signed.into_iter().map(|(_, s)| s).collect(),
        });
    }
    Ok((fetched, changes))
}

/// Times `step` in microseconds.
fn timed<T>(samples: &mut Vec<f64>, step: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = step();
    samples.push(started.elapsed().as_secs_f64() * 1e6);
    out
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}

fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len().max(1) as f64
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    eprintln!(
        "building {} health files ({})…",
        options.files,
        options.source.describe()
    );
    let (fetched, changes) = build(options)?;
    let institution = sample::institution(sample::HOSPITAL);
    let mut samples: [Vec<f64>; 8] = Default::default();
    let [
        load,
        list,
        verify_each,
        verify_one,
        judge,
        view_of,
        save,
        replay,
    ] = &mut samples;
    for file in &fetched {
        let mut doc: AutoCommit = timed(load, || load_document(&file.saved))
            .map_err(|error| anyhow::anyhow!("a built file does not load: {error}"))?;
        let list_changes: Vec<Change> = timed(list, || doc.get_changes(&[]));
        let mut hashes: Vec<_> = list_changes.iter().map(|c| c.hash()).collect();
        hashes.sort_unstable();
        timed(verify_each, || {
            for (change, signature) in hashes.iter().zip(&file.signatures) {
                let change = list_changes
                    .iter()
                    .find(|c| c.hash() == *change)
                    .context("a change listed twice")?;
                verify_signature(&file.id, change, signature)
                    .map_err(|error| anyhow::anyhow!("a signature fails: {error}"))?;
            }
            anyhow::Ok(())
        })?;
        // One check per author: the author's latest change (here the only author's last).
        timed(verify_one, || {
            let last = list_changes.last().context("no changes")?;
            let at = hashes.binary_search(&last.hash()).ok().context("a hash")?;
            verify_signature(&file.id, last, &file.signatures[at])
                .map_err(|error| anyhow::anyhow!("a signature fails: {error}"))
        })?;
        let authors = vec![institution.clone(); list_changes.len()];
        timed(judge, || judge_history(&doc, &list_changes, &authors))
            .map_err(|error| anyhow::anyhow!("a built history is refused: {error}"))?;
        timed(view_of, || estuary_node::model::view(&doc))
            .map_err(|error| anyhow::anyhow!("a built file does not read: {error}"))?;
        timed(save, || doc.save());
        timed(replay, || {
            let mut fresh = AutoCommit::new();
            for change in &list_changes {
                fresh.apply_changes([change.clone()]).expect("replay");
            }
            fresh
        });
    }
    let mut steps = |pick: &mut dyn FnMut(&mut Vec<f64>) -> f64| {
        let [
            load,
            list,
            verify_each,
            verify_one,
            judge,
            view_of,
            save,
            replay,
        ] = &mut samples;
        Steps {
            replay_us: pick(replay),
            load_us: pick(load),
            list_changes_us: pick(list),
            verify_each_change_us: pick(verify_each),
            verify_one_per_author_us: pick(verify_one),
            judge_history_us: pick(judge),
            view_us: pick(view_of),
            save_us: pick(save),
        }
    };
    let report = Report {
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        data: options.source.describe(),
        files: fetched.len(),
        changes_per_file: changes as f64 / fetched.len().max(1) as f64,
        saved_bytes_per_file: fetched.iter().map(|f| f.saved.len()).sum::<usize>() as f64
            / fetched.len().max(1) as f64,
        mean: steps(&mut |s| mean(s)),
        median: steps(&mut |s| median(s)),
    };
    println!(
        "{} files, {:.1} changes and {:.0} saved bytes each; per file, µs (median / mean):",
        report.files, report.changes_per_file, report.saved_bytes_per_file
    );
    let rows = [
        ("load", report.median.load_us, report.mean.load_us),
        (
            "list changes",
            report.median.list_changes_us,
            report.mean.list_changes_us,
        ),
        (
            "verify every change",
            report.median.verify_each_change_us,
            report.mean.verify_each_change_us,
        ),
        (
            "verify one per author",
            report.median.verify_one_per_author_us,
            report.mean.verify_one_per_author_us,
        ),
        (
            "judge the history",
            report.median.judge_history_us,
            report.mean.judge_history_us,
        ),
        ("view", report.median.view_us, report.mean.view_us),
        ("save", report.median.save_us, report.mean.save_us),
        ("replay", report.median.replay_us, report.mean.replay_us),
    ];
    for (step, median, mean) in rows {
        println!("  {step:<24} {median:>9.1} {mean:>9.1}");
    }
    println!("({} build)", report.profile);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
