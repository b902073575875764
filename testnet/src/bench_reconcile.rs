//! `bench reconcile`: what it costs two nodes to find the documents that differ between
//! their catalogues — bytes on the wire (CBOR, both directions), rounds, and CPU time — for
//! catalogues of up to 700,000 documents and a few to a thousand differences: by ranges, by
//! rateless IBLT symbols, and by the hybrid of the two that nodes run (`Hybrid`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use estuary_node::reconcile::{Catalogue, Hybrid, Reconciliation};
use estuary_node::riblt;
use serde::Serialize;

/// Runs per configuration; figures are medians.
const RUNS: usize = 5;

#[derive(Serialize)]
struct Figure {
    docs: usize,
    differences: usize,
    found: usize,
    bytes: usize,
    rounds: usize,
    ms: f64,
    /// Bytes per difference found, and what sending the whole catalogue would cost.
    bytes_per_difference: Option<f64>,
    whole_catalogue_bytes: usize,
    /// The same reconciliation by rateless IBLT symbols (`estuary_node::riblt`).
    riblt_bytes: usize,
    riblt_rounds: usize,
    riblt_ms: f64,
    riblt_bytes_per_difference: Option<f64>,
    /// The hybrid nodes run: symbols, then ranges when the differences are many.
    hybrid_bytes: usize,
    hybrid_rounds: usize,
    hybrid_ms: f64,
    hybrid_bytes_per_difference: Option<f64>,
    hybrid_went_on_with_ranges: bool,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for chunk in out.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    }
}

fn cbor_len(value: &impl Serialize) -> anyhow::Result<usize> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes)?;
    Ok(bytes.len())
}

fn reconcile(ours: &Catalogue, theirs: &Catalogue) -> anyhow::Result<(usize, usize, usize)> {
    let mut run = Reconciliation::new(ours);
    let mut bytes = 0;
    loop {
        bytes += cbor_len(run.query())?;
        let reply = theirs.answer(run.query())?;
        bytes += cbor_len(&reply)?;
        if !run.receive(ours, &reply)? {
            break;
        }
    }
    Ok((run.differing().len(), bytes, run.rounds()))
}

/// Reconciliation by rateless IBLT symbols, as nodes run it (`estuary_node::riblt`).
/// Returns (documents found, bytes, rounds).
fn reconcile_riblt(ours: &Catalogue, theirs: &Catalogue) -> anyhow::Result<(usize, usize, usize)> {
    let mut run = riblt::Reconciliation::new(ours);
    let mut bytes = 0;
    loop {
        bytes += cbor_len(run.query())?;
        let reply = riblt::answer(theirs, run.query())?;
        bytes += cbor_len(&reply)?;
        if !run.receive(ours, &reply)? {
            break;
        }
    }
    Ok((run.differing().len(), bytes, run.rounds()))
}

/// Reconciliation as nodes run it (`Hybrid`). Returns (documents found, bytes, rounds,
/// whether it went on with ranges).
fn reconcile_hybrid(
    ours: &Catalogue,
    theirs: &Catalogue,
) -> anyhow::Result<(usize, usize, usize, bool)> {
    let mut run = Hybrid::new(ours);
    let (mut bytes, mut rounds) = (0, 0);
    loop {
        let query = run.query();
        bytes += cbor_len(&query)?;
        let reply = theirs.answer(&query)?;
        bytes += cbor_len(&reply)?;
        rounds += 1;
        if !run.receive(ours, &reply)? {
            break;
        }
    }
    Ok((run.differing().len(), bytes, rounds, run.is_ranges()))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One reconciliation's documents found, bytes, rounds, CPU time and whether it ended with
/// ranges.
#[derive(Clone, Copy, Default)]
struct Outcome {
    found: usize,
    bytes: usize,
    rounds: usize,
    ms: f64,
    ranges: bool,
}

impl Outcome {
    /// Each figure's median over the runs (the found count and the way of the last).
    fn median(runs: &[Outcome]) -> Outcome {
        let of = |figure: fn(&Outcome) -> f64| median(runs.iter().map(figure).collect());
        let last = runs.last().copied().unwrap_or_default();
        Outcome {
            found: last.found,
            bytes: of(|run| run.bytes as f64) as usize,
            rounds: of(|run| run.rounds as f64) as usize,
            ms: of(|run| run.ms),
            ranges: last.ranges,
        }
    }
}

/// Runs one reconciliation and times it.
fn timed(
    run: impl FnOnce() -> anyhow::Result<(usize, usize, usize, bool)>,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let (found, bytes, rounds, ranges) = run()?;
    Ok(Outcome {
        found,
        bytes,
        rounds,
        ms: started.elapsed().as_secs_f64() * 1e3,
        ranges,
    })
}

pub fn run(docs: usize, json: Option<&Path>) -> anyhow::Result<()> {
    let mut sizes: Vec<usize> = [1_000, 10_000, 100_000]
        .into_iter()
        .filter(|n| *n < docs)
        .collect();
    sizes.push(docs);
    let mut figures = Vec::new();
    println!(
        "{:>9} {:>8} {:>8} {:>10} {:>7} {:>9} {:>12} {:>10} {:>7} {:>9} {:>10} {:>7} {:>9} {:>7}",
        "docs",
        "differ",
        "found",
        "bytes",
        "rounds",
        "ms",
        "catalogue B",
        "riblt B",
        "rounds",
        "ms",
        "hybrid B",
        "rounds",
        "ms",
        "ranges"
    );
    for &n in &sizes {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ n as u64);
        let mut ours = Catalogue::default();
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let id: [u8; 16] = rng.bytes();
            ours.insert(id, rng.bytes());
            ids.push(id);
        }
        for differences in [0usize, 1, 10, 100, 1_000] {
            if differences > n {
                continue;
            }
            // Each run another set of documents differs, so the figures are medians over
            // as many draws, not one draw timed again.
            let mut outcomes: [Vec<Outcome>; 3] = Default::default();
            for _ in 0..RUNS {
                let mut theirs = ours.clone();
                let offset = rng.next() as usize;
                for k in 0..differences {
                    theirs.insert(ids[(offset + k * 7_919) % n], rng.bytes());
                }
                outcomes[0].push(timed(|| {
                    reconcile(&ours, &theirs)
                        .map(|(found, bytes, rounds)| (found, bytes, rounds, true))
                })?);
                outcomes[1].push(timed(|| {
                    reconcile_riblt(&ours, &theirs)
                        .map(|(found, bytes, rounds)| (found, bytes, rounds, false))
                })?);
                outcomes[2].push(timed(|| reconcile_hybrid(&ours, &theirs))?);
            }
            for (way, runs) in ["ranges", "rateless IBLT", "the hybrid"]
                .iter()
                .zip(&outcomes)
            {
                if let Some(run) = runs.iter().find(|run| run.found != differences) {
                    anyhow::bail!(
                        "{way} found {} of {differences} differences among {n} documents",
                        run.found
                    );
                }
            }
            let [ranges, riblt, hybrid] = outcomes.map(|runs| Outcome::median(&runs));
            let (found, bytes, rounds, ms) = (ranges.found, ranges.bytes, ranges.rounds, ranges.ms);
            let (riblt_bytes, riblt_rounds, riblt_ms) = (riblt.bytes, riblt.rounds, riblt.ms);
            let (hybrid_bytes, hybrid_rounds, hybrid_ms, hybrid_ranges) =
                (hybrid.bytes, hybrid.rounds, hybrid.ms, hybrid.ranges);
            let figure = Figure {
                docs: n,
                differences,
                found,
                bytes,
                rounds,
                ms,
                bytes_per_difference: (differences > 0).then(|| bytes as f64 / differences as f64),
                whole_catalogue_bytes: n * 48,
                riblt_bytes,
                riblt_rounds,
                riblt_ms,
                riblt_bytes_per_difference: (differences > 0)
                    .then(|| riblt_bytes as f64 / differences as f64),
                hybrid_bytes,
                hybrid_rounds,
                hybrid_ms,
                hybrid_bytes_per_difference: (differences > 0)
                    .then(|| hybrid_bytes as f64 / differences as f64),
                hybrid_went_on_with_ranges: hybrid_ranges,
            };
            println!(
                "{:>9} {:>8} {:>8} {:>10} {:>7} {:>9.2} {:>12} {:>10} {:>7} {:>9.2} {:>10} {:>7} {:>9.2} {:>7}",
                n,
                differences,
                found,
                bytes,
                rounds,
                figure.ms,
                figure.whole_catalogue_bytes,
                riblt_bytes,
                riblt_rounds,
                riblt_ms,
                hybrid_bytes,
                hybrid_rounds,
                hybrid_ms,
                if hybrid_ranges { "yes" } else { "no" }
            );
            figures.push(figure);
        }
    }
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "({profile} build; medians of {RUNS} runs, each with other documents differing; bytes are CBOR, both directions)"
    );
    if let Some(path) = json {
        let report = BTreeMap::from([
            ("profile", serde_json::to_value(profile)?),
            ("runs", serde_json::to_value(RUNS)?),
            ("figures", serde_json::to_value(&figures)?),
        ]);
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
