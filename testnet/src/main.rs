//! `estuary-testnet`: a whole consortium on one machine.
//!
//! Today it runs the data-model demo (two institutions editing the same health file and
//! referral while cut off from each other, then merging) and the model benchmark. The island
//! demo with 21 networked nodes replaces `demo` when the node and sync layers exist.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench_model;
mod model_demo;
mod sample;

#[derive(Parser)]
#[command(
    name = "estuary-testnet",
    version,
    about = "Estuary on one machine: demos and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The data-model demo: two replicas edit one health file and one referral concurrently,
    /// merge, and print the result with its conflicts.
    Demo {
        /// Print the merged views as JSON as well.
        #[arg(long)]
        json: bool,
        /// Write the merged documents (automerge bytes) into this folder, for `estuary inspect`.
        #[arg(long)]
        save_dir: Option<PathBuf>,
    },
    /// Benchmarks that print figures and write JSON.
    Bench {
        #[command(subcommand)]
        bench: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Build, save and load a typical health file and a full-cycle referral.
    Model {
        /// How many times to repeat each measurement (figures are medians).
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Where to write `bench-model.json`.
        #[arg(long, default_value = "testnet-report")]
        report_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { json, save_dir } => model_demo::run(json, save_dir.as_deref()),
        Command::Bench {
            bench:
                Bench::Model {
                    iterations,
                    report_dir,
                },
        } => bench_model::run(iterations, &report_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
