//! Writes signed changes to a node's store as fast as it can and prints `ack DOC HASH` for each
//! one only after its durable acknowledgement. The crash test and `estuary-testnet bench store`
//! kill it at random moments and check that every printed hash survived.
//!
//! Usage: estuary-crash-writer DATA_DIR ROSTER_FILE AUTHORITY_KEY_HEX INSTITUTION [WRITES_MAX]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use estuary_node::model::{
    Bytes32, Date, Demographics, Editor, HealthFileOp, InstitutionId, NewFollowUp, PersonName, Sex,
    Timestamp,
};
use estuary_node::node::{Node, NodeConfig};

/// Stop by itself after this many writes if nobody kills it first.
const DEFAULT_WRITES_MAX: u64 = 100_000;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("estuary-crash-writer: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, data_dir, roster_file, authority, institution, rest @ ..] = args.as_slice() else {
        return Err("usage: estuary-crash-writer DATA_DIR ROSTER_FILE AUTHORITY_KEY_HEX INSTITUTION [WRITES_MAX]".into());
    };
    let writes_max = rest
        .first()
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(DEFAULT_WRITES_MAX);
    let config = NodeConfig {
        data_dir: PathBuf::from(data_dir),
        authority: Bytes32::parse_hex(authority, "authority")?,
    };
    let roster = std::fs::read(roster_file)?;
    let node = Node::open(&config, Some(&roster))?;
    let editor = Editor {
        institution: InstitutionId::new(institution.as_str())?,
        at: Timestamp(0),
    };
    let demographics = Demographics {
        name: PersonName {
            family: "Test".into(),
            given: "Crash".into(),
            text: None,
        },
        sex: Sex::Unknown,
        birth_date: Date::new("1950-01-01")?,
        // Distinct per run, so each run creates its own file.
        phone: Some(format!("{}", std::process::id())),
        address: None,
        national_id: None,
        insurance: None,
    };
    let (document, creation) = node.create_health_file(&editor, &demographics)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ack {document} {creation}")?;
    out.flush()?;
    for n in 0..writes_max {
        let op = HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(n as i64),
            systolic_mmhg: Some(120 + n % 40),
            diastolic_mmhg: Some(80),
            glucose_mmol_per_l: None,
        });
        let hash = node.apply_health_file(document, &editor, &op)?;
        writeln!(out, "ack {document} {hash}")?;
        out.flush()?;
    }
    Ok(())
}
