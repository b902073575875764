//! The consortium authority's side: its key, the roster document and the signed roster nodes
//! adopt. The authority directory holds `node.key` (the authority key), `roster.automerge`
//! (the roster being edited) and `roster.signed` (the last version signed).

use std::path::{Path, PathBuf};

use anyhow::Context;
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::{
    Bytes32, DocumentId, Editor, InstitutionId, InstitutionKind, Roster, RosterOp, Timestamp,
};

use crate::setup::{ROSTER_FILE, private_dir, write_private};
use crate::{AUTHORITY_DIR_DEFAULT, Failure, client, output};

/// The roster being edited, beside the signed one.
const ROSTER_DOCUMENT_FILE: &str = "roster.automerge";
/// The institution id the authority's roster edits are recorded under.
const AUTHORITY_EDITOR: &str = "consortium-authority";
/// Largest roster document read, in bytes.
const ROSTER_FILE_BYTES_MAX: u64 = 16 * 1024 * 1024;

#[derive(clap::Subcommand)]
pub enum RosterCommand {
    /// Add an institution (or a further node key of one).
    Add {
        /// The authority directory.
        #[arg(long, default_value = AUTHORITY_DIR_DEFAULT)]
        dir: PathBuf,
        /// The institution's id, e.g. `chc-jianshe`.
        #[arg(long)]
        institution: String,
        /// Its display name.
        #[arg(long)]
        name: String,
        /// core_hospital, district_hospital or community_centre.
        #[arg(long)]
        kind: String,
        /// The node's public key (hex), which `estuary init` prints.
        #[arg(long)]
        key: String,
        /// Where dashboards draw it on the consortium's map, e.g. `north shore` (one more
        /// edit).
        #[arg(long)]
        area: Option<String>,
    },
    /// Place a member on the consortium's map (e.g. `north shore`): where dashboards draw
    /// it. Nodes of releases before areas refuse a roster that holds one: upgrade every
    /// member first.
    SetArea {
        /// The authority directory.
        #[arg(long, default_value = AUTHORITY_DIR_DEFAULT)]
        dir: PathBuf,
        /// The institution's id.
        #[arg(long)]
        institution: String,
        /// The area's name, 1 to 64 bytes.
        #[arg(long)]
        area: String,
    },
    /// Revoke a node key; its changes are kept only up to the cut-off heads.
    Revoke {
        /// The authority directory.
        #[arg(long, default_value = AUTHORITY_DIR_DEFAULT)]
        dir: PathBuf,
        /// The revoked key (hex).
        #[arg(long)]
        key: String,
        /// Change hashes (hex) accepted from the key, up to the cut-off; none keeps none.
        #[arg(long)]
        cutoff: Vec<String>,
        /// Why, for operators (no patient data).
        #[arg(long)]
        reason: String,
    },
    /// Order a health file erased (a court's or a regulator's order): once nodes adopt the
    /// signed roster, each deletes the file and its resident's referrals and refuses them for
    /// good. It cannot be undone.
    Erase {
        /// The authority directory.
        #[arg(long, default_value = AUTHORITY_DIR_DEFAULT)]
        dir: PathBuf,
        /// The health file's id (32 hex characters).
        #[arg(long)]
        document: String,
        /// The order's reference, for the audit (no patient data), e.g. `court order 2026-117`.
        #[arg(long)]
        order: String,
    },
    /// Sign the roster as it stands, for nodes to adopt.
    Sign {
        /// The authority directory.
        #[arg(long, default_value = AUTHORITY_DIR_DEFAULT)]
        dir: PathBuf,
    },
    /// Show the roster: the authority's (with --dir) or the one a node holds.
    Show {
        /// The authority directory; without it, the node of --config is asked.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// `estuary init --authority`.
pub fn init(dir: &Path, json: bool) -> Result<(), Failure> {
    if dir.join(ROSTER_DOCUMENT_FILE).exists() {
        return Err(Failure::error(anyhow::anyhow!(
            "{} holds a roster already",
            dir.display()
        )));
    }
    private_dir(dir)?;
    let authority = Identity::load_or_create(dir).context("cannot create the authority key")?;
    let mut roster =
        Roster::create(&authority.actor(), &editor()?).context("cannot create the roster")?;
    write_private(&dir.join(ROSTER_DOCUMENT_FILE), &roster.save())?;
    write_private(
        &dir.join(ROSTER_FILE),
        &SignedRoster::sign(&authority, &mut roster).encode(),
    )?;
    let key = authority.public_key().to_string();
    if json {
        output::json(&serde_json::json!({ "authority_key": key, "dir": dir }));
    } else {
        output::fields(&[
            ("authority key", key.clone()),
            ("directory", dir.display().to_string()),
        ]);
        println!(
            "\nGive the authority key to every member (estuary init --authority-key {key}).\nKeep {} offline and backed up: it signs the roster.",
            dir.join("node.key").display()
        );
    }
    Ok(())
}

fn editor() -> anyhow::Result<Editor> {
    Ok(Editor {
        institution: InstitutionId::new(AUTHORITY_EDITOR)?,
        at: Timestamp(estuary_node::audit::now_ms()),
    })
}

fn load(dir: &Path) -> anyhow::Result<(Identity, Roster)> {
    let authority = Identity::load_or_create(dir)
        .with_context(|| format!("cannot read the authority key in {}", dir.display()))?;
    let path = dir.join(ROSTER_DOCUMENT_FILE);
    let size = std::fs::metadata(&path)
        .with_context(|| {
            format!(
                "no roster in {} (run estuary init --authority first)",
                dir.display()
            )
        })?
        .len();
    anyhow::ensure!(
        size <= ROSTER_FILE_BYTES_MAX,
        "{} is larger than any roster",
        path.display()
    );
    let roster = Roster::load(&std::fs::read(&path)?, &authority.actor())
        .with_context(|| format!("{} is not a valid roster", path.display()))?;
    Ok((authority, roster))
}

/// Replaces a file whole: written beside it, synced, renamed over it.
fn replace(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    write_private(&temporary, bytes)?;
    std::fs::rename(&temporary, path).with_context(|| format!("cannot replace {}", path.display()))
}

fn apply(dir: &Path, ops: &[RosterOp]) -> anyhow::Result<u64> {
    let (_, mut roster) = load(dir)?;
    let editor = editor()?;
    for op in ops {
        roster
            .apply(&editor, op)
            .context("the roster refused the edit")?;
    }
    replace(&dir.join(ROSTER_DOCUMENT_FILE), &roster.save())?;
    Ok(roster.view().version)
}

fn parse_key(text: &str, what: &'static str) -> anyhow::Result<Bytes32> {
    Bytes32::parse_hex(text, what)
        .map_err(|_| anyhow::anyhow!("{what} must be 64 lowercase hexadecimal characters"))
}

pub fn roster(command: RosterCommand, config: &Path, json: bool) -> Result<(), Failure> {
    match command {
        RosterCommand::Add {
            dir,
            institution,
            name,
            kind,
            key,
            area,
        } => {
            let id = InstitutionId::new(&institution)
                .map_err(|e| anyhow::anyhow!("--institution: {e}"))?;
            let kind = InstitutionKind::parse(&kind, "kind").map_err(|_| {
                anyhow::anyhow!("--kind is core_hospital, district_hospital or community_centre")
            })?;
            let key = parse_key(&key, "--key")?;
            let mut ops = vec![
                RosterOp::AddInstitution {
                    id: id.clone(),
                    name,
                    kind,
                },
                RosterOp::AddNodeKey {
                    institution: id.clone(),
                    key,
                },
            ];
            ops.extend(area.map(|area| RosterOp::SetArea {
                institution: id,
                area,
            }));
            let version = apply(&dir, &ops)?;
            report_edit(version, json);
            Ok(())
        }
        RosterCommand::SetArea {
            dir,
            institution,
            area,
        } => {
            let institution = InstitutionId::new(&institution)
                .map_err(|e| anyhow::anyhow!("--institution: {e}"))?;
            let version = apply(&dir, &[RosterOp::SetArea { institution, area }])?;
            report_edit(version, json);
            Ok(())
        }
        RosterCommand::Revoke {
            dir,
            key,
            cutoff,
            reason,
        } => {
            let key = parse_key(&key, "--key")?;
            let cutoff = cutoff
                .iter()
                .map(|c| parse_key(c, "--cutoff"))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let version = apply(
                &dir,
                &[RosterOp::Revoke {
                    key,
                    cutoff,
                    reason,
                }],
            )?;
            report_edit(version, json);
            Ok(())
        }
        RosterCommand::Erase {
            dir,
            document,
            order,
        } => {
            let document = DocumentId::parse(&document).map_err(|_| {
                anyhow::anyhow!("--document is a health file id: 32 hex characters")
            })?;
            let version = apply(&dir, &[RosterOp::Erase { document, order }])?;
            report_edit(version, json);
            Ok(())
        }
        RosterCommand::Sign { dir } => {
            let (authority, mut roster) = load(&dir)?;
            // Nodes refuse a roster whose history changes a revocation: never sign one.
            roster
                .check_revocations_final()
                .context("every node would refuse this roster")?;
            let signed = SignedRoster::sign(&authority, &mut roster).encode();
            let path = dir.join(ROSTER_FILE);
            replace(&path, &signed)?;
            let version = roster.view().version;
            if json {
                output::json(&serde_json::json!({ "version": version, "file": path }));
            } else {
                println!(
                    "signed roster version {version}: {}\nCopy it to each node's data directory as {ROSTER_FILE} before its first start; running nodes learn a newer roster from any peer that holds it.",
                    path.display()
                );
            }
            Ok(())
        }
        RosterCommand::Show { dir } => {
            let view = match dir {
                Some(dir) => serde_json::to_value(load(&dir)?.1.view())
                    .map_err(|e| Failure::error(e.into()))?,
                None => client::Client::connect(config)?.get("/admin/roster")?,
            };
            show(&view, json);
            Ok(())
        }
    }
}

fn report_edit(version: u64, json: bool) {
    if json {
        output::json(&serde_json::json!({ "version": version, "signed": false }));
    } else {
        println!(
            "roster is now at version {version}: every edit raises it by one, and `roster add` makes two (the institution, then its node key), three with --area; not yet signed: run estuary roster sign"
        );
    }
}

fn show(view: &serde_json::Value, json: bool) {
    if json {
        output::json(view);
        return;
    }
    println!(
        "roster version {} (every edit raises it by one: `roster add` makes two, the institution and its node key, three with --area; `roster set-area`, `roster revoke` and `roster erase` one)",
        output::cell(&view["version"])
    );
    let empty = Vec::new();
    let rows: Vec<Vec<String>> = view["institutions"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|i| {
            let keys: Vec<String> = i["node_keys"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(output::cell)
                .collect();
            vec![
                output::cell(&i["id"]),
                output::cell(&i["kind"]),
                output::cell(&i["area"]),
                output::cell(&i["name"]),
                keys.join(" "),
            ]
        })
        .collect();
    output::table(&["INSTITUTION", "KIND", "AREA", "NAME", "NODE KEYS"], &rows);
    // Revocations and erasures: an id, when, and why, each under its own header if any.
    for (list, header, id, why) in [
        ("revocations", "REVOKED KEY", "key", ("REASON", "reason")),
        (
            "erasures",
            "ERASED HEALTH FILE",
            "document",
            ("ORDER", "order"),
        ),
    ] {
        let rows: Vec<Vec<String>> = view[list]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|r| {
                vec![
                    output::cell(&r[id]),
                    output::time(&r["at"]),
                    output::cell(&r[why.1]),
                ]
            })
            .collect();
        if !rows.is_empty() {
            println!();
            output::table(&[header, "AT", why.0], &rows);
        }
    }
}
