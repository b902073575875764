//! Writes signed changes and prints `ack DOC HASH` for each only after its durable
//! acknowledgement, until killed (or after WRITES_MAX writes). Used by the crash test.
//!
//! Usage: estuary-crash-writer DATA_DIR ROSTER_FILE AUTHORITY_KEY_HEX INSTITUTION [WRITES_MAX
//! [ENGINE]], ENGINE being the storage engine of a new store, `lsm` (the default) or `sled`.

use std::path::PathBuf;
use std::process::ExitCode;

use estuary_node::model::{Bytes32, InstitutionId};
use estuary_node::replica::NodeConfig;
use estuary_node::store::StoreEngine;

/// Stop by itself after this many writes if nobody kills it first.
const DEFAULT_WRITES_MAX: u64 = 100_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, data_dir, roster_file, authority, institution, rest @ ..] = args.as_slice() else {
        eprintln!(
            "usage: estuary-crash-writer DATA_DIR ROSTER_FILE AUTHORITY_KEY_HEX INSTITUTION [WRITES_MAX [sled|lsm]]"
        );
        return ExitCode::from(2);
    };
    let result = (|| -> Result<(), Box<dyn std::error::Error>> {
        let writes_max = rest
            .first()
            .map(|n| n.parse())
            .transpose()?
            .unwrap_or(DEFAULT_WRITES_MAX);
        let store_engine = rest
            .get(1)
            .map(|name| name.parse::<StoreEngine>())
            .transpose()?;
        let config = NodeConfig {
            data_dir: PathBuf::from(data_dir),
            authority: Bytes32::parse_hex(authority, "authority")?,
            store_engine,
        };
        let roster = std::fs::read(roster_file)?;
        let institution = InstitutionId::new(institution.as_str())?;
        estuary_node::crash_writer::run(
            &config,
            &roster,
            institution,
            writes_max,
            &mut std::io::stdout().lock(),
        )
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("estuary-crash-writer: {error}");
            ExitCode::FAILURE
        }
    }
}
