//! `estuary-testnet`: a whole consortium on one machine.
//!
//! `demo` runs the island consortium: up to 21 nodes, a seeded clinical workload and fault
//! schedule, and a checker. `model-demo` shows the data model's merge rules on two replicas.
//! `bench` measures.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use estuary_node::store::StoreEngine;

/// The in-process island runs every node here: automerge allocates and frees per operation,
/// and mimalloc makes that cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench_byzantine;
mod bench_growth;
mod bench_import;
mod bench_ingest;
mod bench_island;
mod bench_model;
mod bench_reads;
mod bench_reconcile;
mod bench_store;
mod bench_sync;
mod bench_writes;
mod health_data;
mod island;
mod model_demo;
mod node_process;
mod process_stats;
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
    /// The island consortium: nodes modelled on the core hospital, the district hospitals and
    /// the community health centres, a clinical workload, flaky links, partitions and
    /// crashes, and a checker. Exits non-zero, printing the seed, if anything was lost.
    Demo(island::DemoArgs),
    /// The data-model demo: two replicas edit one health file and one referral concurrently,
    /// merge, and print the result with its conflicts.
    ModelDemo {
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

/// What a benchmark that measures through a node process's API takes and writes.
#[derive(clap::Args)]
struct ThroughApi {
    /// Health files (NDJSON in the shape of `gen.js`, gzipped if `.gz`) to take the entries
    /// from; default: the same data set, generated here.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The `estuary` binary to run (default: beside this one).
    #[arg(long)]
    estuary: Option<PathBuf>,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The storage engine of the node's store: lsm or sled.
    #[arg(long, default_value = "lsm", value_parser = str::parse::<StoreEngine>)]
    store_engine: StoreEngine,
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
    /// Durable writes, ingest, open time and memory, and a crash loop on a real store.
    Store {
        /// Stored health files for the open-time and memory figures.
        #[arg(long, default_value_t = 100_000)]
        docs: usize,
        /// Durable writes measured for each writer count (1, 8, 64).
        #[arg(long, default_value_t = 4_000)]
        writes: usize,
        /// Foreign envelopes for the ingest figure.
        #[arg(long, default_value_t = 10_000)]
        ingest: usize,
        /// SIGKILLs in the crash loop.
        #[arg(long, default_value_t = 100)]
        kills: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// A clinical read of a long health file: cold, warm, and while the node decides peers'
    /// batches.
    Reads {
        /// Follow-ups written to the file first (one write each).
        #[arg(long, default_value_t = 500)]
        entries: usize,
        /// Peer batches of 64 files ingested while the file is read.
        #[arg(long, default_value_t = 40)]
        batches: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// One file growing to `--entries` encounters, written and read through the HTTP API of an
    /// `estuary node run` process: write and view latency at 0, a quarter, half and all.
    Growth {
        /// Encounters in the file at the last checkpoint.
        #[arg(long, default_value_t = 1_000)]
        entries: usize,
        /// Writes and reads timed at each checkpoint.
        #[arg(long, default_value_t = 20)]
        samples: usize,
        #[command(flatten)]
        through: ThroughApi,
    },
    /// Durable writes through the HTTP API of an `estuary node run` process from concurrent
    /// writers, each to its own files: writes per second and acknowledgement latency.
    Writes {
        /// Concurrent writers.
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Writes in all.
        #[arg(long, default_value_t = 8_000)]
        writes: usize,
        #[command(flatten)]
        through: ThroughApi,
    },
    /// A member's existing records loaded in bulk: `estuary import` of an NDJSON file into an
    /// `estuary node run` process, each resident one signed change: residents per second.
    Import {
        /// Residents loaded.
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        #[command(flatten)]
        through: ThroughApi,
    },
    /// Catalogue reconciliation: bytes, rounds and time to find the documents that differ.
    Reconcile {
        /// Documents in the largest catalogue measured.
        #[arg(long, default_value_t = 700_000)]
        docs: usize,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Two nodes over libp2p: bootstrap of an empty node (and gossip latency after), the
    /// in-sync check, and finding differences.
    /// What deciding one fetched health file costs, step by step (load, list, signatures,
    /// judgement, view, save), on one core without the network.
    Ingest {
        /// Health files measured.
        #[arg(long, default_value_t = 2_000)]
        files: usize,
        /// Health files (NDJSON in the shape of `gen.js`, gzipped if `.gz`); default: the
        /// same data set, generated here.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    Sync {
        /// What to measure.
        #[arg(value_enum)]
        which: bench_sync::Which,
        /// Health files the nodes hold.
        #[arg(long, default_value_t = 10_000)]
        files: usize,
        /// Health files (NDJSON in the shape of `gen.js`, gzipped if `.gz`); default: the
        /// same data set, generated here.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Files that differ (`diff`).
        #[arg(long, default_value_t = 100)]
        diff: usize,
        /// New writes whose gossip propagation is timed (`bootstrap`).
        #[arg(long, default_value_t = 200)]
        writes: usize,
        /// How the serving node's files are built: change by change as an app writes them,
        /// or each file whole (faster, for 100,000 files and more).
        #[arg(long, value_enum, default_value_t = bench_sync::Build::Changes)]
        build: bench_sync::Build,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The storage engine of both nodes' stores: lsm or sled.
        #[arg(long, default_value = "lsm", value_parser = str::parse::<StoreEngine>)]
        store_engine: StoreEngine,
    },
    /// The consortium splits in two, each side writes `files` new files, the link heals:
    /// time to agreement and bytes against nodes × missing payload.
    Heal {
        /// Nodes.
        #[arg(long, default_value_t = 21)]
        nodes: usize,
        /// New files written on each side during the partition.
        #[arg(long, default_value_t = 5_000)]
        files: u32,
        /// The seed of the consortium's keys and content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Health files (NDJSON in the shape of `gen.js`, gzipped if `.gz`) to write; default:
        /// the generated data set.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Write files of one change each (the resident's demographics) instead.
        #[arg(long, conflicts_with = "input")]
        one_change: bool,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The time for one write to be visible on every node, clean and under loss.
    Latency {
        /// Nodes.
        #[arg(long, default_value_t = 21)]
        nodes: usize,
        /// Writes timed in each condition.
        #[arg(long, default_value_t = 100)]
        writes: usize,
        /// Loss on every link in the second condition, in percent.
        #[arg(long, default_value_t = 20)]
        loss: u64,
        /// The seed of the consortium's keys and content.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The island demo under each Byzantine preset beside calm runs: whether each passes,
    /// and the honest writes' propagation (median p50, p99 and p99 over calm's).
    Byzantine {
        /// Nodes (at least 3).
        #[arg(long, default_value_t = 7)]
        nodes: u16,
        /// Residents registered per run.
        #[arg(long, default_value_t = 100)]
        files: u32,
        /// Seconds of writing per run.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// Runs of every preset (alternated).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The seed of every run.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Write the figures as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Every benchmark at a size that finishes in about five minutes here.
    All {
        /// The folder for the JSON files.
        #[arg(long, default_value = "testnet-report")]
        json: PathBuf,
    },
    /// Opens a stopped node and prints its open time and memory (used by `bench store`).
    #[command(hide = true)]
    OpenProbe {
        /// The node's data directory.
        dir: PathBuf,
    },
    /// The crash loop's writer (used by `bench store`).
    #[command(hide = true)]
    CrashWriter {
        /// The node's data directory.
        dir: PathBuf,
        /// The signed roster file.
        roster: PathBuf,
    },
}

/// Exit code when the island's checker fails (distinct from errors of the harness).
const EXIT_CHECK_FAILED: u8 = 3;

fn main() -> ExitCode {
    // Node logs on request only (RUST_LOG), to stderr: the demo's own output is the report.
    if let Ok(mut filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        for cap in estuary_node::LOG_CAPS {
            if let Ok(directive) = cap.parse() {
                filter = filter.add_directive(directive);
            }
        }
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => match island::demo(args) {
            Ok(true) => Ok(()),
            Ok(false) => return ExitCode::from(EXIT_CHECK_FAILED),
            Err(error) => Err(error),
        },
        Command::ModelDemo { json, save_dir } => model_demo::run(json, save_dir.as_deref()),
        Command::Bench {
            bench:
                Bench::Model {
                    iterations,
                    report_dir,
                },
        } => bench_model::run(iterations, &report_dir),
        Command::Bench {
            bench:
                Bench::Store {
                    docs,
                    writes,
                    ingest,
                    kills,
                    json,
                },
        } => bench_store::run(&bench_store::Options {
            docs,
            writes,
            ingest,
            kills,
            json,
        }),
        Command::Bench {
            bench:
                Bench::Reads {
                    entries,
                    batches,
                    json,
                },
        } => bench_reads::run(&bench_reads::Options {
            entries,
            batches,
            json,
        }),
        Command::Bench {
            bench:
                Bench::Growth {
                    entries,
                    samples,
                    through:
                        ThroughApi {
                            input,
                            estuary,
                            json,
                            store_engine,
                        },
                },
        } => bench_growth::run(&bench_growth::Options {
            entries,
            samples,
            input,
            estuary,
            json,
            store_engine,
        }),
        Command::Bench {
            bench:
                Bench::Writes {
                    writers,
                    writes,
                    through:
                        ThroughApi {
                            input,
                            estuary,
                            json,
                            store_engine,
                        },
                },
        } => bench_writes::run(&bench_writes::Options {
            writers,
            writes,
            input,
            estuary,
            json,
            store_engine,
        }),
        Command::Bench {
            bench:
                Bench::Import {
                    files,
                    through:
                        ThroughApi {
                            input,
                            estuary,
                            json,
                            store_engine,
                        },
                },
        } => bench_import::run(&bench_import::Options {
            files,
            input,
            estuary,
            json,
            store_engine,
        }),
        Command::Bench {
            bench: Bench::Reconcile { docs, json },
        } => bench_reconcile::run(docs, json.as_deref()),
        Command::Bench {
            bench: Bench::Ingest { files, input, json },
        } => bench_ingest::run(&bench_ingest::Options {
            files,
            source: health_data::Source::from_input(input.as_deref()),
            json,
        }),
        Command::Bench {
            bench:
                Bench::Sync {
                    which,
                    files,
                    input,
                    diff,
                    writes,
                    build,
                    json,
                    store_engine,
                },
        } => bench_sync::run(&bench_sync::Options {
            which,
            files,
            source: health_data::Source::from_input(input.as_deref()),
            diff,
            writes,
            build,
            json,
            store_engine,
        }),
        Command::Bench {
            bench:
                Bench::Heal {
                    nodes,
                    files,
                    seed,
                    input,
                    one_change,
                    json,
                },
        } => {
            let data = match one_change {
                true => bench_island::HealData::OneChange,
                false => bench_island::HealData::Realistic(health_data::Source::from_input(
                    input.as_deref(),
                )),
            };
            bench_island::heal(nodes, files, seed, &data, json.as_deref()).map(|_| ())
        }
        Command::Bench {
            bench:
                Bench::Latency {
                    nodes,
                    writes,
                    loss,
                    seed,
                    json,
                },
        } => bench_island::latency(nodes, writes, loss, seed, json.as_deref()).map(|_| ()),
        Command::Bench {
            bench:
                Bench::Byzantine {
                    nodes,
                    files,
                    duration,
                    rounds,
                    seed,
                    json,
                },
        } => bench_byzantine::run(nodes, files, duration, rounds, seed, json.as_deref()),
        Command::Bench {
            bench: Bench::All { json },
        } => bench_island::all(&json),
        Command::Bench {
            bench: Bench::OpenProbe { dir },
        } => bench_store::open_probe(&dir),
        Command::Bench {
            bench: Bench::CrashWriter { dir, roster },
        } => bench_store::crash_writer(&dir, &roster),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
