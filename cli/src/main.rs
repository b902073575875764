//! `estuary`: the command institution IT and operators use to run and inspect a node.
//!
//! Node commands (`init`, `node run`, `status`, `peers`, `sync`, …) arrive with the node; for
//! now the command inspects saved documents offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Largest document file `inspect` reads, in bytes: far above any real health file, low enough
/// that a wrong path (a disk image, a log) is refused instead of read into memory.
const INSPECT_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

#[derive(Parser)]
#[command(name = "estuary", version, about = "Run and inspect an Estuary node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a saved document (automerge bytes) and print its typed view.
    Inspect {
        /// The saved document.
        file: PathBuf,
        /// Print the whole view as JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

/// Exit code for a document that was read but is invalid (distinct from usage or I/O errors).
const EXIT_INVALID: u8 = 3;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Inspect { file, json } => {
            let size = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            anyhow::ensure!(
                size <= INSPECT_FILE_BYTES_MAX,
                "{} is {size} bytes; documents are at most {INSPECT_FILE_BYTES_MAX} bytes",
                file.display()
            );
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            match estuary_node::inspect_document(&bytes) {
                Ok((kind, view)) if json => {
                    println!("{}", serde_json::json!({ "kind": kind, "view": view }));
                    Ok(ExitCode::SUCCESS)
                }
                Ok((kind, view)) => {
                    println!("kind: {kind}");
                    println!("id:   {}", view["id"].as_str().unwrap_or("?"));
                    println!("valid: yes");
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("{}: {error}", file.display());
                    Ok(ExitCode::from(EXIT_INVALID))
                }
            }
        }
    }
}
