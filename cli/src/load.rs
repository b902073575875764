//! `estuary import` of residents' existing records: NDJSON, one resident per line (plain or
//! gzipped), sent to the node's `/v1/import` in chunks, two in flight so that the node makes
//! one chunk's files while it writes the other's; or a FHIR `transaction` Bundle, sent whole
//! to `/fhir` (all or nothing). Each resident becomes one signed change. A progress bar shows residents done;
//! at the end, every refused resident is listed with its line (or Bundle entry) and reason.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::Failure;
use crate::client::Client;
use crate::output;

/// Residents per request: large enough that a request's fixed costs vanish, small enough
/// that the progress bar moves and a chunk stays far below the node's limits (4,096
/// residents, 8 MiB).
const CHUNK_RESIDENTS: usize = 512;
/// Bytes per request at most (a chunk of long records is cut short).
const CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Requests in flight at once.
const REQUESTS_IN_FLIGHT: usize = 2;
/// Refusals printed; the rest are counted (`--json` lists them all).
const REFUSALS_PRINTED_MAX: usize = 50;
/// Longest line read, in bytes: the node's limit on one record, and a newline.
const LINE_BYTES_MAX: u64 = estuary_node::import::RECORD_BYTES_MAX as u64 + 1;

/// What a file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Chosen from the file's name: `.ndjson`, `.jsonl` (either also `.gz`) are records,
    /// `.json` a FHIR Bundle, anything else an export bundle.
    Auto,
    /// A bundle written by `estuary export`.
    Bundle,
    /// Residents' records, one per line, in the consortium data set's shape.
    Ndjson,
    /// A FHIR R4 `transaction` Bundle.
    Fhir,
}

impl Format {
    /// The format `self` names for `file`.
    pub fn of(self, file: &Path) -> Self {
        if self != Self::Auto {
            return self;
        }
        let name = file.to_string_lossy().to_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".ndjson") || name.ends_with(".jsonl") {
            Self::Ndjson
        } else if name.ends_with(".json") {
            Self::Fhir
        } else {
            Self::Bundle
        }
    }
}

/// A resident the node did not load.
struct Refusal {
    line: u64,
    code: String,
    reason: String,
}

/// Opens `file`, inflating it when its name ends in `.gz`.
fn open(file: &Path) -> Result<Box<dyn BufRead + Send>, Failure> {
    let opened = File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(if file.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(opened)))
    } else {
        Box::new(BufReader::new(opened))
    })
}

/// Reads one line of at most [`LINE_BYTES_MAX`] bytes into `line`; false at the end.
fn read_line(input: &mut dyn BufRead, line: &mut Vec<u8>, number: u64) -> Result<bool, Failure> {
    line.clear();
    let read = input
        .take(LINE_BYTES_MAX)
        .read_until(b'\n', line)
        .with_context(|| format!("cannot read line {number}"))?;
    if read as u64 == LINE_BYTES_MAX && line.last() != Some(&b'\n') {
        return Err(Failure::error(anyhow::anyhow!(
            "line {number} is longer than {} bytes, the most one resident's record may be; nothing after it was sent",
            estuary_node::import::RECORD_BYTES_MAX
        )));
    }
    Ok(read > 0)
}

/// Loads an NDJSON file of residents' records.
pub fn ndjson(client: &Client, file: &Path, json_output: bool) -> Result<(), Failure> {
    // First pass: how many residents, for the progress bar.
    let mut total = 0u64;
    let mut input = open(file)?;
    let mut line = Vec::new();
    let mut number = 0;
    while read_line(&mut *input, &mut line, number + 1)? {
        number += 1;
        if !line.trim_ascii().is_empty() {
            total += 1;
        }
    }
    let bar = if json_output {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "import {bar:30} {pos}/{len} residents ({per_sec}, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let loaded = Mutex::new(0u64);
    let refused = Mutex::new(Vec::<Refusal>::new());
    let failure = Mutex::new(None::<Failure>);
    let (chunks, queue) = std::sync::mpsc::sync_channel::<(u64, u64, Vec<u8>)>(REQUESTS_IN_FLIGHT);
    let queue = Mutex::new(queue);
    std::thread::scope(|scope| -> Result<(), Failure> {
        for _ in 0..REQUESTS_IN_FLIGHT {
            scope.spawn(|| {
                loop {
                    let next = queue
                        .lock()
                        .map_err(|_| ())
                        .and_then(|q| q.recv().map_err(|_| ()));
                    let Ok((first_line, residents, body)) = next else {
                        return;
                    };
                    // After a failure the rest is read and dropped, so the reader never waits.
                    if failure.lock().map_or(true, |f| f.is_some()) {
                        continue;
                    }
                    match client.post_bytes_as("/v1/import", &body, "application/x-ndjson") {
                        Ok(answer) => {
                            let done = answer["loaded"].as_array().map_or(0, Vec::len) as u64;
                            *loaded.lock().unwrap_or_else(|p| p.into_inner()) += done;
                            let mut refused = refused.lock().unwrap_or_else(|p| p.into_inner());
                            for r in answer["refused"].as_array().into_iter().flatten() {
                                refused.push(Refusal {
                                    line: first_line + r["line"].as_u64().unwrap_or(1) - 1,
                                    code: r["code"].as_str().unwrap_or("").to_owned(),
                                    reason: r["reason"].as_str().unwrap_or("").to_owned(),
                                });
                            }
                            bar.inc(residents);
                        }
                        Err(error) => {
                            failure
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .get_or_insert(error);
                        }
                    }
                }
            });
        }
        // Second pass: chunks of whole lines, blank ones inside a chunk kept so that the
        // node's line numbers count from the chunk's first line.
        let mut input = open(file)?;
        let (mut body, mut residents, mut first_line, mut number) = (Vec::new(), 0u64, 1u64, 0);
        let send = |first_line, residents, body| chunks.send((first_line, residents, body));
        while read_line(&mut *input, &mut line, number + 1)? {
            number += 1;
            let blank = line.trim_ascii().is_empty();
            if blank && residents == 0 {
                first_line = number + 1;
                continue;
            }
            residents += u64::from(!blank);
            body.extend_from_slice(&line);
            if line.last() != Some(&b'\n') {
                body.push(b'\n');
            }
            if residents as usize >= CHUNK_RESIDENTS || body.len() >= CHUNK_BYTES {
                // Fails only once every sender stopped, which cannot happen before this ends.
                let _ = send(first_line, residents, std::mem::take(&mut body));
                (residents, first_line) = (0, number + 1);
            }
        }
        if residents > 0 {
            let _ = send(first_line, residents, body);
        }
        drop(chunks);
        Ok(())
    })?;
    bar.finish_and_clear();
    if let Some(failure) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(failure);
    }
    let seconds = started.elapsed().as_secs_f64();
    let loaded = loaded.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut refused = refused.into_inner().unwrap_or_else(|p| p.into_inner());
    refused.sort_by_key(|r| r.line);
    report(loaded, &refused, seconds, "line", json_output)
}

/// Loads a FHIR transaction Bundle, sent whole: all or nothing.
pub fn fhir(client: &Client, file: &Path, json_output: bool) -> Result<(), Failure> {
    let limit = estuary_node::api::IMPORT_BODY_BYTES_MAX;
    let mut body = Vec::new();
    open(file)?
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .with_context(|| format!("cannot read {}", file.display()))?;
    if body.len() > limit {
        return Err(Failure::error(anyhow::anyhow!(
            "the Bundle is larger than {} MiB, the most the node takes at once; split it into several transaction Bundles (or load NDJSON)",
            limit / (1024 * 1024)
        )));
    }
    let started = Instant::now();
    let answer = client.post_bytes_as("/fhir", &body, "application/fhir+json")?;
    let loaded = answer["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["response"]["location"].is_string())
        .count() as u64;
    report(
        loaded,
        &[],
        started.elapsed().as_secs_f64(),
        "entry",
        json_output,
    )
}

/// Prints what a load did; fails (exit 6) if any resident was refused.
fn report(
    loaded: u64,
    refused: &[Refusal],
    seconds: f64,
    place: &str,
    json_output: bool,
) -> Result<(), Failure> {
    let rate = loaded as f64 / seconds.max(1e-9);
    if json_output {
        output::json(&json!({
            "loaded": loaded,
            "refused": refused
                .iter()
                .map(|r| json!({ place: r.line, "code": r.code, "reason": r.reason }))
                .collect::<Vec<Value>>(),
            "seconds": seconds,
            "residents_per_second": rate,
        }));
    } else {
        println!(
            "loaded {loaded} residents in {seconds:.1} s ({rate:.0} residents/s), each as one signed change"
        );
        for r in refused.iter().take(REFUSALS_PRINTED_MAX) {
            println!("  {place} {}: {} ({})", r.line, r.reason, r.code);
        }
        if refused.len() > REFUSALS_PRINTED_MAX {
            println!(
                "  … and {} more (--json lists them all)",
                refused.len() - REFUSALS_PRINTED_MAX
            );
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(Failure::refused(
            422,
            "records_refused".into(),
            format!(
                "{} residents were not loaded (listed above); the others were",
                refused.len()
            ),
        ))
    }
}
