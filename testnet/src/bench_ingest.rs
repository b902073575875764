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

/// One figure (or the samples behind it) per step.
#[derive(Serialize, Default)]
struct Steps<T> {
    load_us: T,
    list_changes_us: T,
    verify_each_change_us: T,
    verify_one_per_author_us: T,
    judge_history_us: T,
    view_us: T,
    save_us: T,
    /// Applying the changes one by one to an empty document: what judging each change on
    /// the document as it grows (rather than at past heads) would pay before reading.
    replay_us: T,
}

impl<T> Steps<T> {
    /// The steps with their names, in the order they run.
    fn named(&self) -> [(&'static str, &T); 8] {
        [
            ("load", &self.load_us),
            ("list changes", &self.list_changes_us),
            ("verify every change", &self.verify_each_change_us),
            ("verify one per author", &self.verify_one_per_author_us),
            ("judge the history", &self.judge_history_us),
            ("view", &self.view_us),
            ("save", &self.save_us),
            ("replay", &self.replay_us),
        ]
    }

    fn map<U>(&mut self, mut f: impl FnMut(&mut T) -> U) -> Steps<U> {
        Steps {
            load_us: f(&mut self.load_us),
            list_changes_us: f(&mut self.list_changes_us),
            verify_each_change_us: f(&mut self.verify_each_change_us),
            verify_one_per_author_us: f(&mut self.verify_one_per_author_us),
            judge_history_us: f(&mut self.judge_history_us),
            view_us: f(&mut self.view_us),
            save_us: f(&mut self.save_us),
            replay_us: f(&mut self.replay_us),
        }
    }
}

#[derive(Serialize)]
struct Report {
    profile: &'static str,
    data: String,
    files: usize,
    changes_per_file: f64,
    saved_bytes_per_file: f64,
    /// Medians per file, in microseconds.
    median: Steps<f64>,
    /// Means per file, in microseconds (what throughput pays).
    mean: Steps<f64>,
}

/// Builds the files as an app writes them and signs every change.
fn build(options: &Options) -> anyhow::Result<(Vec<Fetched>, usize)> {
    let writer = Identity::from_secret(WRITER);
    let actor = writer.actor();
    let records = options.source.records(options.files)?;
    let mut fetched = Vec::with_capacity(records.len());
    let mut changes = 0;
    for record in &records {
        let file = crate::health_data::writes(record)?.build(&actor, sample::HOSPITAL)?;
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
    let mut samples: Steps<Vec<f64>> = Steps::default();
    for file in &fetched {
        let mut doc: AutoCommit = timed(&mut samples.load_us, || load_document(&file.saved))
            .map_err(|error| anyhow::anyhow!("a built file does not load: {error}"))?;
        let list_changes: Vec<Change> =
            timed(&mut samples.list_changes_us, || doc.get_changes(&[]));
        let mut hashes: Vec<_> = list_changes.iter().map(|c| c.hash()).collect();
        hashes.sort_unstable();
        timed(&mut samples.verify_each_change_us, || {
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
        timed(&mut samples.verify_one_per_author_us, || {
            let last = list_changes.last().context("no changes")?;
            let at = hashes.binary_search(&last.hash()).ok().context("a hash")?;
            verify_signature(&file.id, last, &file.signatures[at])
                .map_err(|error| anyhow::anyhow!("a signature fails: {error}"))
        })?;
        let authors = vec![institution.clone(); list_changes.len()];
        timed(&mut samples.judge_history_us, || {
            judge_history(&doc, &list_changes, &authors)
        })
        .map_err(|error| anyhow::anyhow!("a built history is refused: {error}"))?;
        timed(&mut samples.view_us, || estuary_node::model::view(&doc))
            .map_err(|error| anyhow::anyhow!("a built file does not read: {error}"))?;
        timed(&mut samples.save_us, || doc.save());
        timed(&mut samples.replay_us, || {
            let mut fresh = AutoCommit::new();
            for change in &list_changes {
                fresh.apply_changes([change.clone()]).expect("replay");
            }
            fresh
        });
    }
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
        mean: samples.map(|s| mean(s)),
        median: samples.map(|s| median(s)),
    };
    println!(
        "{} files, {:.1} changes and {:.0} saved bytes each; per file, µs (median / mean):",
        report.files, report.changes_per_file, report.saved_bytes_per_file
    );
    for ((step, median), (_, mean)) in report.median.named().into_iter().zip(report.mean.named()) {
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
