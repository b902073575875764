//! Inspection and courier commands: status, peers, sync, patients, referrals, quarantine,
//! audit, verify, export and import. Each is one or a few admin API calls and a table.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use estuary_node::bundle::{BundleError, BundleItem, BundleReader, BundleSummary, SealedWriter};
use estuary_node::config::Config;
use estuary_node::identity::Identity;
use estuary_node::model::Bytes32;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::Client;
use crate::output::{self, cell, time};
use crate::{EXIT_UNSOUND, Failure};

/// Envelopes sent per import request.
const IMPORT_CHUNK_ENVELOPES: usize = 1_024;
/// Envelope bytes sent per import request: under the node's 8 MiB import limit even when the
/// last envelope added is the largest possible (about 513 KiB).
const IMPORT_CHUNK_BYTES: usize = 6 * 1024 * 1024;
/// Permissions of a bundle file: its owner's alone, since a bundle in clear holds every
/// resident's record.
const BUNDLE_FILE_MODE: u32 = 0o600;
/// Largest document file `inspect` reads, in bytes: far above any real health file, low enough
/// that a wrong path (a disk image, a log) is refused instead of read into memory.
const INSPECT_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

#[derive(clap::Subcommand)]
pub enum PatientCommand {
    /// A health file, with its conflicts.
    Show {
        /// The document id.
        id: String,
    },
    /// Who changed the file and when.
    History {
        /// The document id.
        id: String,
    },
    /// Documents with concurrent values to review.
    Conflicts,
    /// Find residents by name, or by national id.
    Search {
        /// The beginning of the name (family and given, or as written).
        name: Option<String>,
        /// A national id number instead of a name.
        #[arg(long, conflicts_with = "name")]
        national_id: Option<String>,
    },
}

#[derive(clap::Subcommand)]
pub enum ReferralCommand {
    /// A referral, with its status and events.
    Show {
        /// The document id.
        id: String,
    },
    /// A desk's worklist, priority first then oldest first: the referrals an institution
    /// receives (--to) or sent (--from), filtered; or a resident's referrals (--patient).
    List {
        /// The desk of the institution the referrals are addressed to.
        #[arg(long, conflicts_with_all = ["from", "patient"])]
        to: Option<String>,
        /// The desk of the institution that sent them.
        #[arg(long, conflicts_with = "patient")]
        from: Option<String>,
        /// Only these statuses, comma-separated (requested, accepted, scheduled, …).
        #[arg(long)]
        status: Option<String>,
        /// Only routine or only priority referrals.
        #[arg(long)]
        urgency: Option<String>,
        /// Only referrals up or only referrals down.
        #[arg(long)]
        direction: Option<String>,
        /// Only referrals sent on or after this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only referrals sent on or before this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        until: Option<String>,
        /// Referrals shown, at most (pages are read up to it).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The resident's health file id.
        #[arg(long)]
        patient: Option<String>,
    },
    /// Who changed the referral and when.
    History {
        /// The document id.
        id: String,
    },
}

#[derive(clap::Subcommand)]
pub enum QuarantineCommand {
    /// Every quarantined change with its reason.
    List,
    /// One quarantined change.
    Show {
        /// The change hash (hex).
        change: String,
    },
    /// Removes quarantine records and their envelopes (all, or those older than --before).
    /// A purged change that arrives again is judged again; the purge is on the audit log.
    Purge {
        /// Only records quarantined before this day (YYYY-MM-DD, UTC) or time (milliseconds
        /// since the epoch).
        #[arg(long)]
        before: Option<String>,
        /// Purge without asking (required: the records cannot be brought back).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Args)]
pub struct AuditArgs {
    /// Only records about this health file or its referrals.
    #[arg(long)]
    patient: Option<String>,
    /// Only records of this institution.
    #[arg(long)]
    institution: Option<String>,
    /// Only records from this time on: YYYY-MM-DD (UTC) or milliseconds since the epoch.
    #[arg(long)]
    since: Option<String>,
    /// Most records to show.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Check the whole log's hash chain instead of listing records.
    #[arg(long)]
    verify: bool,
}

fn empty() -> &'static Vec<Value> {
    static EMPTY: Vec<Value> = Vec::new();
    &EMPTY
}

fn list(value: &Value) -> &Vec<Value> {
    value.as_array().unwrap_or(empty())
}

pub fn dashboard(client: &Client, json: bool) -> Result<(), Failure> {
    if client.is_offline() {
        return Err(Failure::unreachable(anyhow::anyhow!(
            "the node is not running, and only a running node serves its dashboard: start it with estuary node run"
        )));
    }
    let url = client.dashboard_url();
    if json {
        output::json(&serde_json::json!({ "url": url }));
    } else {
        println!("{url}");
        println!(
            "open it in a browser on this machine; the token after # stays in the browser (anyone with this address is the node's admin)"
        );
    }
    Ok(())
}

pub fn status(client: &Client, json: bool) -> Result<(), Failure> {
    let status = client.get("/admin/status")?;
    if json {
        output::json(&status);
        return Ok(());
    }
    if client.is_offline() {
        println!("the node is not running: these figures are read from its stopped data directory");
    }
    output::fields(&[
        ("institution", cell(&status["institution"])),
        ("node key", cell(&status["node_key"])),
        ("peer id", cell(&status["peer_id"])),
        ("roster version", cell(&status["roster_version"])),
        ("documents", cell(&status["documents"])),
        ("quarantined", cell(&status["quarantined"])),
        ("pending", cell(&status["pending"])),
        ("storage", output::bytes(&status["storage_bytes"])),
        ("audit records", cell(&status["audit_records"])),
        (
            "network",
            if status["network"].as_bool() == Some(true) {
                format!(
                    "running, {} peers connected",
                    cell(&status["connected_peers"])
                )
            } else {
                "not running (data directory opened directly)".into()
            },
        ),
    ]);
    Ok(())
}

fn peer_rows(stats: &Value, connected_only: bool) -> Vec<(String, Value)> {
    stats["peers"]
        .as_object()
        .map(|peers| {
            peers
                .iter()
                .filter(|(_, p)| !connected_only || p["connected"].as_bool() == Some(true))
                .map(|(id, p)| (id.clone(), p.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// `--watch`: a live view instead of one reading.
#[derive(clap::Args)]
pub struct Watch {
    /// Refresh in place (like `top`) until interrupted; with --json, one object per line.
    #[arg(long)]
    watch: bool,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2, requires = "watch",
          value_parser = clap::value_parser!(u64).range(1..=WATCH_EVERY_MAX_S))]
    every: u64,
    /// Stop after this many refreshes (for scripts).
    #[arg(long, requires = "watch")]
    count: Option<u64>,
}

/// Longest interval between refreshes of a watch, in seconds.
const WATCH_EVERY_MAX_S: u64 = 3_600;

/// Shows `show` once, or, with `--watch`, every `--every` seconds: on a terminal in place (the
/// screen cleared first), otherwise one reading after another. Stops at Ctrl-C, after
/// `--count` readings, or when a reading fails.
pub fn watching(
    client: &Client,
    watch: &Watch,
    json: bool,
    show: fn(&Client, bool) -> Result<(), Failure>,
) -> Result<(), Failure> {
    if !watch.watch {
        return show(client, json);
    }
    let in_place = !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut shown = 0u64;
    loop {
        if in_place {
            // Home, then clear: the new reading replaces the old one.
            print!("\x1b[H\x1b[2J");
            println!(
                "every {} s, Ctrl-C to stop; read at {}",
                watch.every,
                time(&Value::from(estuary_node::audit::now_ms()))
            );
        }
        show(client, json)?;
        std::io::stdout()
            .flush()
            .map_err(|e| Failure::error(e.into()))?;
        shown += 1;
        if watch.count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_secs(watch.every));
    }
}

pub fn peers(client: &Client, json: bool) -> Result<(), Failure> {
    let stats = client.get("/admin/sync")?;
    let peers = peer_rows(&stats, true);
    if json {
        let peers: serde_json::Map<String, Value> = peers.into_iter().collect();
        output::json(&Value::Object(peers));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|(id, p)| {
            vec![
                cell(&p["institution"]),
                id.clone(),
                cell(&p["address"]),
                p["rtt_ms"]
                    .as_f64()
                    .map_or("-".into(), |ms| format!("{ms:.1} ms")),
                time(&p["last_reconciled_ms"]),
            ]
        })
        .collect();
    output::table(
        &["INSTITUTION", "PEER", "ADDRESS", "RTT", "LAST RECONCILED"],
        &rows,
    );
    Ok(())
}

pub fn sync(client: &Client, json: bool) -> Result<(), Failure> {
    let stats = client.get("/admin/sync")?;
    if json {
        output::json(&stats);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = peer_rows(&stats, false)
        .iter()
        .map(|(_, p)| {
            vec![
                cell(&p["institution"]),
                if p["connected"].as_bool() == Some(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                cell(&p["lag"]),
                output::bytes(&p["bytes_in"]),
                output::bytes(&p["bytes_out"]),
                cell(&p["changes_received"]),
                cell(&p["changes_rejected"]),
                time(&p["last_reconciled_ms"]),
                cell(&p["score"]),
            ]
        })
        .collect();
    output::table(
        &[
            "INSTITUTION",
            "CONNECTED",
            "LAG (DOCS)",
            "IN",
            "OUT",
            "CHANGES IN",
            "REJECTED",
            "LAST RECONCILED",
            "SCORE",
        ],
        &rows,
    );
    let c = &stats["catch_up"];
    let (total, done) = (
        c["documents_total"].as_u64().unwrap_or(0),
        c["documents_done"].as_u64().unwrap_or(0),
    );
    if total > done {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("catch-up {bar:30} {pos}/{len} documents {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(done);
        bar.set_message(
            c["eta_s"]
                .as_f64()
                .map_or(String::new(), |s| format!("ETA {s:.0} s")),
        );
        bar.abandon();
        println!(
            "catch-up: {done}/{total} documents, {} fetched{}",
            output::bytes(&c["bytes"]),
            c["eta_s"]
                .as_f64()
                .map_or(String::new(), |s| format!(", about {s:.0} s left"))
        );
    } else {
        println!("catch-up: nothing missing ({total} documents fetched since start)");
    }
    Ok(())
}

fn show_document(value: &Value, json: bool) {
    if json {
        output::json(value);
        return;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&value["view"]).unwrap_or_default()
    );
    let conflicts = list(&value["conflicts"]);
    if conflicts.is_empty() {
        println!("conflicts: none");
    } else {
        let fields: Vec<String> = conflicts.iter().map(cell).collect();
        println!("conflicts to review: {}", fields.join(", "));
    }
}

fn show_history(value: &Value, json: bool) {
    if json {
        output::json(value);
        return;
    }
    let rows: Vec<Vec<String>> = list(&value["changes"])
        .iter()
        .map(|c| {
            vec![
                time(&c["at_ms"]),
                cell(&c["institution"]),
                cell(&c["change"]),
            ]
        })
        .collect();
    output::table(&["WHEN", "INSTITUTION", "CHANGE"], &rows);
}

/// A health file or referral (`kind` is its route), or its history.
fn show(client: &Client, kind: &str, id: &str, history: bool, json: bool) -> Result<(), Failure> {
    let path = format!("/v1/{kind}/{}", url_encode(id));
    if history {
        show_history(&client.get(&format!("{path}/history"))?, json);
    } else {
        show_document(&client.get(&path)?, json);
    }
    Ok(())
}

pub fn patient(client: &Client, command: PatientCommand, json: bool) -> Result<(), Failure> {
    match command {
        PatientCommand::Show { id } => show(client, "health-files", &id, false, json)?,
        PatientCommand::History { id } => show(client, "health-files", &id, true, json)?,
        PatientCommand::Conflicts => {
            let found = client.get("/v1/conflicts")?;
            if json {
                output::json(&found);
            } else {
                let rows: Vec<Vec<String>> = list(&found["results"])
                    .iter()
                    .map(|r| {
                        let fields: Vec<String> = list(&r["fields"]).iter().map(cell).collect();
                        vec![cell(&r["id"]), fields.join(", ")]
                    })
                    .collect();
                output::table(&["DOCUMENT", "FIELDS IN CONFLICT"], &rows);
            }
        }
        PatientCommand::Search { name, national_id } => {
            let found = match (name, national_id) {
                (_, Some(national_id)) => client.post_json(
                    "/v1/health-files/search",
                    &serde_json::json!({ "national_id": national_id }),
                )?,
                // In the body: a name in a URL would reach access logs.
                (Some(name), None) => client.post_json(
                    "/v1/health-files/search",
                    &serde_json::json!({ "name": name }),
                )?,
                (None, None) => {
                    return Err(Failure::error(anyhow::anyhow!(
                        "give a name, or --national-id"
                    )));
                }
            };
            if json {
                output::json(&found);
            } else {
                let rows: Vec<Vec<String>> = list(&found["results"])
                    .iter()
                    .map(|r| {
                        vec![
                            cell(&r["id"]),
                            format!(
                                "{} {}",
                                cell(&r["name"]["family"]),
                                cell(&r["name"]["given"])
                            ),
                            cell(&r["sex"]),
                            cell(&r["birth_date"]),
                        ]
                    })
                    .collect();
                output::table(&["DOCUMENT", "NAME", "SEX", "BORN"], &rows);
            }
        }
    }
    Ok(())
}

/// Percent-encodes a query value.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The query of a desk's worklist: `side` (`to` or `from`) of `institution`, with the filters
/// given.
fn desk_query(side: &str, institution: &str, filters: &[(&str, Option<String>)]) -> String {
    let mut query = format!("{side}={}", url_encode(institution));
    for (name, value) in filters {
        if let Some(value) = value {
            query.push_str(&format!("&{name}={}", url_encode(value)));
        }
    }
    query
}

pub fn referral(client: &Client, command: ReferralCommand, json: bool) -> Result<(), Failure> {
    match command {
        ReferralCommand::Show { id } => show(client, "referrals", &id, false, json)?,
        ReferralCommand::History { id } => show(client, "referrals", &id, true, json)?,
        ReferralCommand::List {
            to,
            from,
            status,
            urgency,
            direction,
            since,
            until,
            limit,
            patient,
        } => {
            let filters = [
                ("status", status),
                ("urgency", urgency),
                ("direction", direction),
                ("since", since),
                ("until", until),
            ];
            let query = match (to, from, patient) {
                (None, None, Some(patient)) => {
                    if filters.iter().any(|(_, value)| value.is_some()) {
                        return Err(Failure::error(anyhow::anyhow!(
                            "--patient lists every referral of the resident; filters are for a desk (--to or --from)"
                        )));
                    }
                    format!("patient={}", url_encode(&patient))
                }
                (Some(institution), None, None) => desk_query("to", &institution, &filters),
                (None, Some(institution), None) => desk_query("from", &institution, &filters),
                _ => {
                    return Err(Failure::error(anyhow::anyhow!(
                        "give --to or --from (a desk), or --patient"
                    )));
                }
            };
            // Page by page, up to --limit.
            let mut results = Vec::new();
            let mut path = format!("/v1/referrals?{query}");
            loop {
                let page = client.get(&path)?;
                results.extend(list(&page["results"]).iter().cloned());
                match page["next"].as_str() {
                    Some(next) if results.len() < limit => {
                        path = format!("/v1/referrals?{query}&cursor={next}");
                    }
                    _ => break,
                }
            }
            results.truncate(limit);
            let found = serde_json::json!({ "results": results });
            if json {
                output::json(&found);
            } else {
                let rows: Vec<Vec<String>> = list(&found["results"])
                    .iter()
                    .map(|r| {
                        vec![
                            cell(&r["id"]),
                            cell(&r["status"]),
                            cell(&r["direction"]),
                            cell(&r["from"]),
                            cell(&r["to"]),
                            cell(&r["urgency"]["value"]),
                            time(&r["created_at"]),
                        ]
                    })
                    .collect();
                output::table(
                    &[
                        "REFERRAL",
                        "STATUS",
                        "DIRECTION",
                        "FROM",
                        "TO",
                        "URGENCY",
                        "SENT",
                    ],
                    &rows,
                );
            }
        }
    }
    Ok(())
}

pub fn quarantine(client: &Client, command: QuarantineCommand, json: bool) -> Result<(), Failure> {
    let value = match &command {
        QuarantineCommand::List => {
            // Page by page: the node answers at most a thousand records at a time.
            let mut entries = Vec::new();
            let mut path = "/admin/quarantine".to_string();
            loop {
                let page = client.get(&path)?;
                entries.extend(list(&page["entries"]).iter().cloned());
                match page["next"].as_str() {
                    Some(next) => path = format!("/admin/quarantine?after={}", url_encode(next)),
                    None => break,
                }
            }
            serde_json::json!({ "entries": entries })
        }
        QuarantineCommand::Show { change } => {
            client.get(&format!("/admin/quarantine/{}", url_encode(change)))?
        }
        QuarantineCommand::Purge { before, yes } => {
            if !yes {
                return Err(Failure::error(anyhow::anyhow!(
                    "purging removes quarantine records for good; run again with --yes"
                )));
            }
            let before_ms = before
                .as_deref()
                .map(parse_since)
                .transpose()
                .map_err(Failure::error)?;
            client.post_json(
                "/admin/quarantine/purge",
                &serde_json::json!({ "before_ms": before_ms }),
            )?
        }
    };
    if json {
        output::json(&value);
        return Ok(());
    }
    match command {
        QuarantineCommand::List => {
            let rows: Vec<Vec<String>> = list(&value["entries"])
                .iter()
                .map(|e| vec![cell(&e["change"]), cell(&e["document"]), cell(&e["reason"])])
                .collect();
            output::table(&["CHANGE", "DOCUMENT", "REASON"], &rows);
        }
        QuarantineCommand::Show { .. } => output::fields(&[
            ("change", cell(&value["change"])),
            ("document", cell(&value["document"])),
            ("reason", cell(&value["reason"])),
            ("envelope bytes", cell(&value["envelope_bytes"])),
            ("envelope kept", cell(&value["envelope_kept"])),
        ]),
        QuarantineCommand::Purge { .. } => {
            println!("purged {} quarantine records", cell(&value["purged"]));
        }
    }
    Ok(())
}

/// Milliseconds since the epoch from YYYY-MM-DD (UTC midnight) or a number.
fn parse_since(text: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = text.parse::<i64>() {
        return Ok(ms);
    }
    let parts: Vec<&str> = text.split('-').collect();
    let [year, month, day] = parts.as_slice() else {
        anyhow::bail!("--since is YYYY-MM-DD or milliseconds since the epoch");
    };
    let (y, m, d): (i64, i64, i64) = (year.parse()?, month.parse()?, day.parse()?);
    anyhow::ensure!(
        (1..=12).contains(&m) && (1..=31).contains(&d),
        "--since: no such date"
    );
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    Ok((era * 146_097 + day_of_era - 719_468) * 86_400_000)
}

pub fn audit(client: &Client, args: AuditArgs, json: bool) -> Result<(), Failure> {
    if args.verify {
        let check = client.get_long("/admin/audit/verify")?;
        if json {
            output::json(&check);
        } else if check["sound"].as_bool() == Some(true) {
            println!(
                "audit log sound: {} records, hash chain whole",
                cell(&check["records"])
            );
        }
        if check["sound"].as_bool() != Some(true) {
            return Err(Failure::unsound(format!(
                "the audit log is not sound: {}",
                cell(&check["problem"])
            )));
        }
        return Ok(());
    }
    let since = args.since.as_deref().map(parse_since).transpose()?;
    let mut filter = Vec::new();
    if let Some(patient) = &args.patient {
        filter.push(format!("patient={}", url_encode(patient)));
    }
    if let Some(institution) = &args.institution {
        filter.push(format!("institution={}", url_encode(institution)));
    }
    if let Some(since) = since {
        filter.push(format!("since_ms={since}"));
    }
    // The newest `limit` matching records: the log is read forward, keeping the last ones.
    let mut records: std::collections::VecDeque<Value> = std::collections::VecDeque::new();
    let mut from = 1u64;
    loop {
        let mut query = filter.clone();
        query.push(format!("from={from}"));
        let page = client.get(&format!("/admin/audit?{}", query.join("&")))?;
        for record in list(&page["records"]) {
            records.push_back(record.clone());
            if records.len() > args.limit {
                records.pop_front();
            }
        }
        match page["next"].as_u64() {
            Some(next) => from = next,
            None => break,
        }
    }
    let records: Vec<Value> = records.into();
    if json {
        output::json(&Value::Array(records));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            vec![
                cell(&r["sequence"]),
                time(&r["at_ms"]),
                cell(&r["action"]),
                cell(&r["document"]),
                cell(&r["institution"]),
                cell(&r["app"]),
            ]
        })
        .collect();
    output::table(
        &["SEQ", "WHEN", "ACTION", "DOCUMENT", "INSTITUTION", "APP"],
        &rows,
    );
    Ok(())
}

pub fn verify(client: &Client, json: bool, repair: bool) -> Result<(), Failure> {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message("verifying every signature, hash and document");
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    let report = client.get_long("/admin/verify");
    spinner.finish_and_clear();
    let report = report?;
    if json {
        output::json(&report);
    } else {
        println!(
            "checked {} envelopes and {} documents",
            cell(&report["envelopes"]),
            cell(&report["documents"])
        );
        for problem in list(&report["problems"]) {
            println!(
                "problem: {} (document {})",
                cell(&problem["what"]),
                cell(&problem["document"])
            );
        }
    }
    if report["sound"].as_bool() == Some(true) {
        return Ok(());
    }
    if !repair {
        return Err(Failure {
            code: EXIT_UNSOUND,
            message: format!(
                "the store has problems ({} documents affected); `estuary verify --repair` takes them out for the node to fetch again from its peers",
                list(&report["affected_documents"]).len()
            ),
        });
    }
    let repaired = client.post_json("/admin/repair", &serde_json::Value::Null)?;
    if json {
        output::json(&repaired);
    } else {
        println!(
            "repaired: {} damaged documents taken out, {} lost changes to re-sync",
            list(&repaired["discarded"]).len(),
            cell(&repaired["lost_changes"])
        );
        for problem in list(&repaired["unrepaired"]) {
            println!("not repaired: {}", cell(&problem["what"]));
        }
    }
    if list(&repaired["unrepaired"]).is_empty() {
        // The node fetches what was taken out from its peers as it runs (at its next start,
        // if it is stopped).
        Ok(())
    } else {
        Err(Failure {
            code: EXIT_UNSOUND,
            message: "problems repair does not touch remain (see above)".into(),
        })
    }
}

fn byte_bar(json: bool) -> ProgressBar {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar
}

/// Copies `stream` to `out` while reading it as a bundle, so that what is written has been
/// checked whole, signature included, by the time the stream ends.
fn check_while_copying(stream: impl Read, out: &mut impl Write) -> Result<BundleSummary, Failure> {
    /// Passes on what it reads; keeps a write error, which the reader would report as a
    /// bundle cut short.
    struct Tee<R, W> {
        input: R,
        copy: W,
        failed: Option<std::io::Error>,
    }
    impl<R: Read, W: Write> Read for Tee<R, W> {
        fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
            let n = self.input.read(buffer)?;
            if let Err(error) = self.copy.write_all(&buffer[..n]) {
                let kind = error.kind();
                self.failed = Some(error);
                return Err(kind.into());
            }
            Ok(n)
        }
    }
    let mut tee = Tee {
        input: stream,
        copy: out,
        failed: None,
    };
    let checked = BundleReader::open(BufReader::new(&mut tee)).and_then(BundleReader::check);
    if let Some(error) = tee.failed {
        return Err(Failure::error(
            anyhow::Error::new(error).context("cannot write the bundle"),
        ));
    }
    checked.map_err(|e| Failure::unsound(format!("the exported bundle does not check: {e}")))
}

/// The roster's institution for a node key given to `--to`; a key the roster does not list,
/// or revokes, is refused: nobody, or a compromised key, would read the bundle.
fn recipient(client: &Client, key: &str) -> Result<(Bytes32, String), Failure> {
    let key = Bytes32::parse_hex(key, "--to").map_err(|_| {
        Failure::error(anyhow::anyhow!(
            "--to takes a node key: 64 lowercase hex characters, as `estuary status` shows it"
        ))
    })?;
    let roster = client.get("/admin/roster")?;
    let hex = key.to_string();
    if list(&roster["revocations"])
        .iter()
        .any(|r| r["key"].as_str() == Some(&hex))
    {
        return Err(Failure::error(anyhow::anyhow!(
            "the roster revokes node key {hex}; a bundle encrypted to it could be read by whoever holds that key"
        )));
    }
    let institution = list(&roster["institutions"])
        .iter()
        .find(|i| list(&i["node_keys"]).iter().any(|k| k.as_str() == Some(&hex)))
        .map(|i| cell(&i["id"]))
        .ok_or_else(|| {
            Failure::error(anyhow::anyhow!(
                "node key {hex} is not in this node's roster; check the key with the receiving node's `estuary status`"
            ))
        })?;
    Ok((key, institution))
}

pub fn export(
    client: &Client,
    file: &Path,
    to: Option<&str>,
    force: bool,
    json: bool,
) -> Result<(), Failure> {
    let recipient = to.map(|key| recipient(client, key)).transpose()?;
    // Checked now and again just before the rename, since an export takes minutes; only a
    // file that appears in the instant between would be replaced.
    let exists = |path: &Path| std::fs::symlink_metadata(path).is_ok();
    if exists(file) && !force {
        return Err(Failure::error(anyhow::anyhow!(
            "{} exists; give --force to replace it",
            file.display()
        )));
    }
    let temporary = file.with_extension("partial");
    // Created new, so no earlier file (or link) lends it its permissions.
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(BUNDLE_FILE_MODE)
        .open(&temporary)
        .with_context(|| {
            format!(
                "cannot create {} (left by an export that stopped? remove it)",
                temporary.display()
            )
        })?;
    let written = write_bundle(client, out, recipient.as_ref().map(|(key, _)| key), json);
    let summary = match written {
        Ok(summary) => summary,
        Err(failure) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(failure);
        }
    };
    if exists(file) && !force {
        let _ = std::fs::remove_file(&temporary);
        return Err(Failure::error(anyhow::anyhow!(
            "{} appeared during the export; give --force to replace it",
            file.display()
        )));
    }
    std::fs::rename(&temporary, file)?;
    let file_bytes = std::fs::metadata(file)?.len();
    let mode = std::fs::metadata(file)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        // FAT and exFAT media take their modes from the mount, not from the file.
        eprintln!(
            "warning: {} has mode {mode:o} on this file system; others may read it (mount removable media with umask=077)",
            file.display()
        );
    }
    if json {
        let mut value = serde_json::json!({
            "file": file,
            "envelopes": summary.envelopes,
            "documents": summary.header.documents,
            "documents_carried": summary.documents,
            "bytes": file_bytes,
        });
        if let Some((key, institution)) = &recipient {
            value["encrypted_to"] = key.to_string().into();
            value["recipient"] = institution.clone().into();
        }
        output::json(&value);
    } else {
        let sealed = recipient
            .as_ref()
            .map(|(_, institution)| format!(", encrypted to {institution}'s node key"))
            .unwrap_or_default();
        println!(
            "exported {} of {} documents ({}{sealed}) to {}",
            summary.documents,
            summary.header.documents,
            output::bytes(&file_bytes.into()),
            file.display()
        );
    }
    Ok(())
}

/// Streams the node's export into `out`, sealed to `recipient` if given, checked as it
/// passes, and made durable.
fn write_bundle(
    client: &Client,
    out: File,
    recipient: Option<&Bytes32>,
    json: bool,
) -> Result<BundleSummary, Failure> {
    let bar = byte_bar(json);
    bar.set_message("exported");
    let stream = bar.wrap_read(client.get_stream("/admin/export")?);
    let sealing = |e: BundleError| Failure::error(anyhow::Error::new(e));
    let (summary, out) = match recipient {
        None => {
            let mut out = out;
            (check_while_copying(stream, &mut out)?, out)
        }
        Some(key) => {
            let mut sealed = SealedWriter::new(out, key).map_err(sealing)?;
            let summary = check_while_copying(stream, &mut sealed)?;
            (summary, sealed.finish().map_err(sealing)?)
        }
    };
    out.sync_all()?;
    bar.finish_and_clear();
    Ok(summary)
}

/// This node's key, from the data directory its config names, for a bundle encrypted to it.
fn node_identity(config_path: &Path, recipient: &Bytes32) -> Result<Identity, Failure> {
    let config = Config::load(config_path).map_err(|e| Failure::error(e.into()))?;
    Identity::load(&config.data_dir).map_err(|e| {
        Failure::error(anyhow::Error::new(e).context(format!(
            "the bundle is encrypted to node key {recipient}; opening it needs this node's key"
        )))
    })
}

/// One item of an import request, as `/admin/import` reads it.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ImportItem {
    Envelope(serde_bytes::ByteBuf),
    Document(estuary_node::sync::protocol::CoveredDocument),
}

pub fn import(client: &Client, config_path: &Path, file: &Path, json: bool) -> Result<(), Failure> {
    let input = || -> Result<BufReader<File>, Failure> {
        let file = File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
        Ok(BufReader::new(file))
    };
    let refused = |e: BundleError| Failure::unsound(e.to_string());
    // The node's key is read only for a bundle encrypted to a node key.
    let identity = match BundleReader::open(input()?) {
        Err(BundleError::Sealed { recipient }) => Some(node_identity(config_path, &recipient)?),
        _ => None,
    };
    let open = || match &identity {
        None => BundleReader::open(input()?).map_err(refused),
        Some(identity) => BundleReader::open_with_key(input()?, identity).map_err(refused),
    };
    // First pass: the signature, before anything is sent.
    let summary = open()?.check().map_err(refused)?;
    // The exporter's roster first (the authority signed it; the node keeps the newer of the
    // two): an erasure or a revocation it orders is in force before any envelope is decided.
    let offered = match &summary.header.roster {
        Some(signed) => Some(client.post_bytes("/admin/roster", signed)?),
        None => None,
    };
    let roster = client.get("/admin/roster")?;
    let exporter = summary.header.created_by.to_string();
    let institution = list(&roster["institutions"])
        .iter()
        .find(|i| list(&i["node_keys"]).iter().any(|k| k.as_str() == Some(&exporter)))
        .map(|i| cell(&i["id"]))
        .ok_or_else(|| {
            Failure::unsound(
                "the bundle was signed by a key this node's roster does not list; it was not imported",
            )
        })?;
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(summary.envelopes + summary.documents)
    };
    let unit = if summary.envelopes > 0 {
        "envelopes"
    } else {
        "documents"
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "import {{bar:30}} {{pos}}/{{len}} {unit} ({{eta}} left)"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut reader = open()?;
    let mut totals = serde_json::Map::new();
    // An item read that did not fit the chunk before: it opens the next.
    let mut next: Option<(ImportItem, usize)> = None;
    loop {
        // Bounded by count and by bytes: the node takes at most 8 MiB per request, and one
        // envelope may be half a MiB; an item that would take a chunk past its bytes waits
        // for the next, and a larger one goes alone.
        let mut chunk = Vec::with_capacity(IMPORT_CHUNK_ENVELOPES);
        let mut bytes = 0;
        while chunk.len() < IMPORT_CHUNK_ENVELOPES {
            let item = match next.take() {
                Some(item) => Some(item),
                None => match reader.next_item().map_err(refused)? {
                    Some(BundleItem::Envelope(envelope)) => {
                        let size = envelope.len() + 16;
                        Some((
                            ImportItem::Envelope(serde_bytes::ByteBuf::from(envelope)),
                            size,
                        ))
                    }
                    Some(BundleItem::Document(document)) => Some((
                        ImportItem::Document(ciborium::from_reader(document.as_slice()).map_err(
                            |_| {
                                Failure::unsound("the bundle holds a document that does not decode")
                            },
                        )?),
                        document.len() + 16,
                    )),
                    None => None,
                },
            };
            let Some((item, size)) = item else { break };
            if !chunk.is_empty() && bytes + size > IMPORT_CHUNK_BYTES {
                next = Some((item, size));
                break;
            }
            bytes += size;
            chunk.push(item);
        }
        if chunk.is_empty() {
            break;
        }
        let mut body = Vec::new();
        ciborium::into_writer(&chunk, &mut body).context("cannot encode the chunk")?;
        let outcome = client.post_bytes("/admin/import", &body)?;
        for (key, value) in outcome.as_object().into_iter().flatten() {
            let sum =
                totals.get(key).and_then(Value::as_u64).unwrap_or(0) + value.as_u64().unwrap_or(0);
            totals.insert(key.clone(), sum.into());
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    totals.insert("exported_by".into(), institution.clone().into());
    if let Some(offered) = &offered {
        totals.insert("roster_adopted".into(), offered["adopted"].clone());
    }
    totals.insert("encrypted".into(), identity.is_some().into());
    if json {
        output::json(&Value::Object(totals));
    } else {
        let sealed = if identity.is_some() {
            ", decrypted with this node's key"
        } else {
            ""
        };
        println!(
            "bundle from {institution}{sealed}, {} {unit}:",
            summary.envelopes + summary.documents
        );
        if let Some(offered) = &offered {
            let held = if offered["adopted"] == Value::Bool(true) {
                "adopted first"
            } else {
                "not newer than this node's"
            };
            println!("its roster: {held} (version {})", cell(&offered["version"]));
        }
        output::fields(
            &[
                "accepted",
                "duplicate",
                "pending",
                "quarantined",
                "refused",
                "erased",
            ]
            .map(|k| (k, cell(totals.get(k).unwrap_or(&Value::Null)))),
        );
    }
    Ok(())
}

pub fn inspect_file(file: &Path, json: bool) -> Result<(), Failure> {
    let size = std::fs::metadata(file)
        .with_context(|| format!("cannot read {}", file.display()))?
        .len();
    if size > INSPECT_FILE_BYTES_MAX {
        return Err(Failure::error(anyhow::anyhow!(
            "{} is {size} bytes; documents are at most {INSPECT_FILE_BYTES_MAX} bytes",
            file.display()
        )));
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    match estuary_node::inspect_document(&bytes) {
        Ok((kind, view)) if json => {
            output::json(&serde_json::json!({ "kind": kind, "view": view }));
            Ok(())
        }
        Ok((kind, view)) => {
            println!("kind: {kind}");
            println!("id:   {}", view["id"].as_str().unwrap_or("?"));
            println!("valid: yes");
            Ok(())
        }
        Err(error) => Err(Failure::unsound(format!("{}: {error}", file.display()))),
    }
}
