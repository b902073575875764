//! `estuary`: the command institution IT and operators use to set up, run and inspect a node,
//! and the consortium authority uses to keep the roster.
//!
//! Inspection commands talk to a running node through its admin API (loopback, the admin
//! token from the config, sent only once the node has signed a challenge with its key), or
//! open a stopped node's data directory. Tables for people by default, `--json` for scripts;
//! exit codes are listed in [`Failure`].

/// The node runs in this process: automerge allocates and frees per operation, and mimalloc
/// makes that cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod authority;
mod client;
mod inspect;
mod load;
mod output;
mod run;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Default config path: the one `estuary init` writes with its default data directory.
const CONFIG_DEFAULT: &str = "estuary-data/estuary.toml";
/// Default authority directory.
const AUTHORITY_DIR_DEFAULT: &str = "estuary-authority";

#[derive(Parser)]
#[command(name = "estuary", version, about = "Run and inspect an Estuary node")]
struct Cli {
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The node's config file.
    #[arg(long, global = true, env = "ESTUARY_CONFIG", default_value = CONFIG_DEFAULT)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a node's key, config and data directory (or, with --authority, a consortium
    /// authority key and a first signed roster).
    Init(setup::InitArgs),
    /// Maintain the consortium roster (authority only).
    #[command(subcommand)]
    Roster(authority::RosterCommand),
    /// Run the node.
    #[command(subcommand)]
    Node(run::NodeCommand),
    /// The node: institution, roster version, documents, quarantine, storage.
    Status,
    /// Members connected now, with addresses, round-trip times and last reconciliation.
    Peers(inspect::Watch),
    /// Per-peer lag and bytes, and bulk catch-up progress.
    Sync(inspect::Watch),
    /// The address of the running node's web dashboard, the admin token in its fragment
    /// (which a browser never sends): open it in a browser on this machine. Printed only once
    /// the node has proved, by its key, that it is the process answering there.
    Dashboard,
    /// Residents' health files.
    #[command(subcommand)]
    Patient(inspect::PatientCommand),
    /// Referrals.
    #[command(subcommand)]
    Referral(inspect::ReferralCommand),
    /// Changes refused with a reason.
    #[command(subcommand)]
    Quarantine(inspect::QuarantineCommand),
    /// The hash-chained audit log.
    Audit(inspect::AuditArgs),
    /// Re-check every signature, hash and document in the store.
    Verify {
        /// When problems are found, take the damaged documents out of the store (the node
        /// fetches them again from its peers) and clear the record of lost changes.
        #[arg(long)]
        repair: bool,
    },
    /// Write every envelope the node holds to a bundle signed by its key, readable by its
    /// owner only (mode 0600), and encrypted to the receiving node's key with --to.
    Export {
        /// The bundle file to write.
        file: PathBuf,
        /// Encrypt the bundle to this node key (hex, as `estuary status` and the roster show
        /// it): only that node can import it.
        #[arg(long, value_name = "NODE_KEY")]
        to: Option<String>,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Run a bundle's envelopes through the node's pipeline; a bundle encrypted to this
    /// node is decrypted with its key, read from the data directory.
    ///
    /// Or load residents' existing records (a member joining brings them): NDJSON, one
    /// resident per line in the consortium data set's shape, or a FHIR R4 transaction Bundle
    /// (all or nothing).
    /// Each resident becomes one health file written as one signed change; a resident whose
    /// national id a file here already has is not loaded again. Refused residents are listed
    /// with their line and reason (exit 6); the others are loaded.
    Import {
        /// The file: a bundle, records (`.ndjson`, `.jsonl`, either also `.gz`) or a FHIR
        /// Bundle (`.json`).
        file: PathBuf,
        /// What the file holds, when its name does not say.
        #[arg(long, value_enum, default_value = "auto")]
        format: load::Format,
    },
    /// Validate a saved document (automerge bytes) and print its typed view.
    Inspect {
        /// The saved document.
        file: PathBuf,
    },
}

/// How a command failed, and the exit code that says so:
/// 1 an error here (a file, a config), 3 the data checked is unsound (verify, audit
/// --verify, an invalid document), 4 the node cannot be reached or opened, 5 not found,
/// 6 the node refused the request. Usage errors exit with 2 (clap).
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

/// Exit code: the data checked is unsound.
pub const EXIT_UNSOUND: u8 = 3;
const EXIT_UNREACHABLE: u8 = 4;
const EXIT_NOT_FOUND: u8 = 5;
const EXIT_REFUSED: u8 = 6;

impl Failure {
    /// An error here.
    pub fn error(error: anyhow::Error) -> Self {
        Self {
            code: 1,
            message: format!("{error:#}"),
        }
    }

    /// The node cannot be reached or opened.
    pub fn unreachable(error: anyhow::Error) -> Self {
        Self {
            code: EXIT_UNREACHABLE,
            message: format!("{error:#}"),
        }
    }

    /// The node answered with an error.
    pub fn refused(status: u16, code: String, reason: String) -> Self {
        Self {
            code: if status == 404 {
                EXIT_NOT_FOUND
            } else {
                EXIT_REFUSED
            },
            message: format!("the node refused ({status} {code}): {reason}"),
        }
    }

    /// The data checked is unsound.
    pub fn unsound(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_UNSOUND,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self::error(error)
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Self::error(error.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn run(cli: Cli) -> Result<(), Failure> {
    let json = cli.json;
    let connect = || client::Client::connect(&cli.config);
    match cli.command {
        Command::Init(args) => setup::init(args, json),
        Command::Roster(command) => authority::roster(command, &cli.config, json),
        Command::Node(command) => run::node(command, &cli.config),
        Command::Status => inspect::status(&connect()?, json),
        Command::Peers(watch) => inspect::watching(&connect()?, &watch, json, inspect::peers),
        Command::Sync(watch) => inspect::watching(&connect()?, &watch, json, inspect::sync),
        Command::Dashboard => inspect::dashboard(&connect()?, json),
        Command::Patient(command) => inspect::patient(&connect()?, command, json),
        Command::Referral(command) => inspect::referral(&connect()?, command, json),
        Command::Quarantine(command) => inspect::quarantine(&connect()?, command, json),
        Command::Audit(args) => inspect::audit(&connect()?, args, json),
        Command::Verify { repair } => inspect::verify(&connect()?, json, repair),
        Command::Export { file, to, force } => {
            inspect::export(&connect()?, &file, to.as_deref(), force, json)
        }
        Command::Import { file, format } => match format.of(&file) {
            load::Format::Ndjson => load::ndjson(&connect()?, &file, json),
            load::Format::Fhir => load::fhir(&connect()?, &file, json),
            _ => inspect::import(&connect()?, &cli.config, &file, json),
        },
        Command::Inspect { file } => inspect::inspect_file(&file, json),
    }
}
