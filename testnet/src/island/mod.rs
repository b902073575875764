//! The island demo: a consortium of up to 21 nodes, a seeded clinical workload, a seeded fault
//! schedule, and a checker that says whether anything was lost once the faults stop.

pub mod byzantine;
pub mod check;
pub mod cluster;
pub mod consortium;
pub mod content;
pub mod inproc;
pub mod plan;
pub mod procs;
pub mod proxy;
pub mod report;
pub mod rogue;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write as _};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use estuary_node::identity::Identity;
use estuary_node::model::{DocumentId, InstitutionId, ReferralOp, Timestamp};

use byzantine::Adversary;
use check::{Acknowledged, Expected, NodeState, agreement, check};
use cluster::{Cluster, Made, NetworkFaults, Write};
use consortium::Member;
use plan::{Action, BadNode, Fault, Plan, Preset};

/// How the nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// All nodes in this process over the memory transport, behind the fault layer.
    Inproc,
    /// Each node a real `estuary node run` process on a 127.0.0.1 port.
    Procs,
}

/// The demo's settings.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Nodes (at most 21: the core hospital, two district hospitals, 18 centres).
    #[arg(long, default_value_t = 21, value_parser = clap::value_parser!(u16).range(2..=21))]
    pub nodes: u16,
    /// Residents registered during the run. The default keeps 21 nodes in one process on 2
    /// cores on the plan's clock (every write is decided on all 21, and they share the
    /// cores): at 1,000 the writes took 2.4× the plan.
    #[arg(long, default_value_t = 400)]
    pub files: u32,
    /// The seed of the workload and the fault schedule (default: random, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of writing and faults; the convergence check follows.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Link loss during loss periods, in percent.
    #[arg(long, default_value_t = 20)]
    pub loss: u64,
    /// Which faults to inject.
    #[arg(long, value_enum, default_value_t = Preset::Island)]
    pub preset: Preset,
    /// Nodes in this process, or as `estuary node run` processes.
    #[arg(long, value_enum, default_value_t = Mode::Inproc)]
    pub mode: Mode,
    /// Where to write report.json and the plot.
    #[arg(long, default_value = "testnet-report")]
    pub report_dir: PathBuf,
    /// Seconds to wait for agreement once faults stop before declaring failure.
    #[arg(long, default_value_t = 120)]
    pub converge_timeout: u64,
    /// The `estuary` binary for `--mode procs` (default: beside this one).
    #[arg(long)]
    pub estuary: Option<PathBuf>,
    /// Write canary values (marked names, phone numbers, national ids, notes, referral
    /// reasons) and writes full of them that nodes must refuse, and keep what could leak
    /// them in the report folder: node logs (`logs/`) and metrics (`metrics/`), where nodes
    /// are processes. The canary test searches all of it.
    #[arg(long)]
    pub canary: bool,
}

/// How often agreement is sampled for the plot.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Most wall time one pass of the run's loop spends issuing due writes: then faults and
/// samples get their turn at their planned times, however far the writes have fallen behind.
const WRITE_BURST_MAX: Duration = Duration::from_millis(50);
/// A write issued more than this long after its planned time is counted late.
const LATE_AFTER_MS: u64 = 1_000;

/// Runs the demo; returns whether the checker passed.
pub fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let report = run_demo(&args)?;
    report.print_summary(&args.report_dir);
    if !report.passed() {
        eprintln!("FAILED; replay with: {}", report.replay);
    }
    Ok(report.passed())
}

/// Runs the demo and writes its report; returns the report.
pub fn run_demo(args: &DemoArgs) -> anyhow::Result<report::Report> {
    let seed = match args.seed {
        Some(seed) => seed,
        None => {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
            u64::from_le_bytes(bytes) >> 16
        }
    };
    let members = consortium::members(usize::from(args.nodes));
    if args.canary {
        content::use_canaries();
    }
    if args.preset.byzantine() {
        anyhow::ensure!(
            args.mode == Mode::Inproc,
            "the Byzantine presets run in process (--mode inproc): the bad node is driven from here"
        );
        anyhow::ensure!(
            members.len() >= 3,
            "the Byzantine presets need at least 3 nodes (two honest ones beside the bad one)"
        );
    }
    let plan = plan::plan(
        seed,
        args.preset,
        &members,
        args.files,
        args.duration * 1000,
        args.loss,
    );
    let replay = format!(
        "estuary-testnet demo --seed {seed} --nodes {} --files {} --duration {} --loss {} --preset {} --mode {}",
        args.nodes,
        args.files,
        args.duration,
        args.loss,
        clap::ValueEnum::to_possible_value(&args.preset)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default(),
        clap::ValueEnum::to_possible_value(&args.mode)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default(),
    );
    eprintln!(
        "island: {} nodes, {} residents, {} planned writes, {} fault windows, seed {seed}",
        members.len(),
        args.files,
        plan.steps.len(),
        plan.faults.len()
    );
    let data = tempfile::Builder::new()
        .prefix("estuary-island-")
        .tempdir()?;
    let setup = Setup::new(seed, &members, data.path())?;
    let rogue_slot: BTreeSet<usize> = plan
        .byzantine
        .iter()
        .filter(|b| b.rogue().is_some())
        .map(|b| b.node)
        .collect();
    let mut cluster: Box<dyn Cluster> = match args.mode {
        Mode::Inproc => Box::new(inproc::InProc::start(
            seed,
            setup.data_dirs.clone(),
            setup.authority,
            setup.roster.clone(),
            &setup.links,
            rogue_slot,
        )?),
        Mode::Procs => Box::new(procs::Procs::start(
            &estuary_binary(args.estuary.as_deref())?,
            seed,
            setup.data_dirs.clone(),
            setup.authority,
            &setup.roster,
            &setup.links,
        )?),
    };
    let outcome = match &plan.byzantine {
        Some(byzantine) => Adversary::start(
            byzantine,
            seed,
            &members,
            &setup.keys,
            setup.authority,
            cluster.as_mut(),
        )
        .and_then(|adversary| {
            run(
                &plan,
                &members,
                cluster.as_mut(),
                args.converge_timeout,
                Some(adversary),
            )
        }),
        None => run(
            &plan,
            &members,
            cluster.as_mut(),
            args.converge_timeout,
            None,
        ),
    };
    if args.canary {
        keep_metrics(cluster.as_mut(), &args.report_dir)?;
    }
    let dashboard = keep_dashboard(cluster.as_mut(), &args.report_dir);
    cluster.shutdown();
    if args.canary {
        keep_logs(&setup.data_dirs, &args.report_dir)?;
    }
    let outcome = outcome?;
    let mut report = report::Report::new(args, seed, &members, outcome, &replay);
    report.dashboard = dashboard;
    report.write(&args.report_dir)?;
    Ok(report)
}

/// Writes a static copy of the core hospital's dashboard as the run ended into the report
/// folder; its file name, or `None` if the node was down or the copy could not be made (the
/// run's verdict does not depend on it).
fn keep_dashboard(cluster: &mut dyn Cluster, report_dir: &Path) -> Option<String> {
    const FILE: &str = "dashboard.html";
    let written = cluster.dashboard(0).and_then(|page| {
        let Some(page) = page else { return Ok(false) };
        std::fs::create_dir_all(report_dir)?;
        std::fs::write(report_dir.join(FILE), page)?;
        Ok(true)
    });
    match written {
        Ok(true) => Some(FILE.into()),
        Ok(false) => None,
        Err(error) => {
            eprintln!("the dashboard's static copy was not written: {error:#}");
            None
        }
    }
}

/// Writes each node's `/metrics` (where nodes serve it) into `metrics/` of the report folder.
fn keep_metrics(cluster: &mut dyn Cluster, report_dir: &Path) -> anyhow::Result<()> {
    let dir = report_dir.join("metrics");
    std::fs::create_dir_all(&dir)?;
    for node in 0..cluster.len() {
        if let Some(text) = cluster.metrics(node)? {
            std::fs::write(dir.join(format!("node-{node:02}.prom")), text)?;
        }
    }
    Ok(())
}

/// Copies each node's log (where nodes are processes) into `logs/` of the report folder.
fn keep_logs(data_dirs: &[PathBuf], report_dir: &Path) -> anyhow::Result<()> {
    let dir = report_dir.join("logs");
    std::fs::create_dir_all(&dir)?;
    for (node, data_dir) in data_dirs.iter().enumerate() {
        let log = data_dir.join(procs::NODE_LOG);
        if log.exists() {
            std::fs::copy(&log, dir.join(format!("node-{node:02}.log")))?;
        }
    }
    Ok(())
}

/// Makes the canary probes at node 0 against a resident's file: every one must be refused.
/// Prints each outcome (the error as an operator or app would see it) for the canary test.
fn canary_probes(cluster: &mut dyn Cluster, resident: Option<DocumentId>) -> anyhow::Result<()> {
    let Some(resident) = resident else {
        return Ok(());
    };
    for (what, op) in content::canary_probes() {
        let outcome = match cluster.write(0, &Write::HealthFile(resident, op)) {
            Ok(Ok(_)) => anyhow::bail!("a canary probe ({what}) was accepted"),
            Ok(Err(skip)) => skip.name().to_owned(),
            Err(error) => format!("{error:#}"),
        };
        eprintln!("canary probe ({what}) refused: {outcome}");
    }
    Ok(())
}

/// The consortium's data directories (with keys), roster and links, under `root`.
struct Setup {
    data_dirs: Vec<PathBuf>,
    keys: Vec<estuary_node::model::Bytes32>,
    authority: estuary_node::model::Bytes32,
    roster: Vec<u8>,
    links: Vec<Vec<usize>>,
}

impl Setup {
    fn new(seed: u64, members: &[Member], root: &Path) -> anyhow::Result<Self> {
        let keys = write_keys(seed, members, root)?;
        let (authority, roster) = consortium::roster(seed, members, &keys);
        Ok(Self {
            data_dirs: (0..members.len())
                .map(|i| root.join(format!("node-{i:02}")))
                .collect(),
            keys,
            authority: authority.public_key(),
            roster,
            links: links(seed, members.len()),
        })
    }
}

/// The consortium in this process, its nodes' data under `root`.
pub fn inproc_cluster(
    seed: u64,
    members: &[Member],
    root: &Path,
) -> anyhow::Result<inproc::InProc> {
    let setup = Setup::new(seed, members, root)?;
    inproc::InProc::start(
        seed,
        setup.data_dirs,
        setup.authority,
        setup.roster,
        &setup.links,
        BTreeSet::new(),
    )
}

/// Where the `estuary` binary is: given, or beside this one.
pub fn estuary_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_owned());
    }
    let beside = std::env::current_exe()?.with_file_name("estuary");
    anyhow::ensure!(
        beside.exists(),
        "--mode procs runs the estuary binary, not found at {}; build it with `cargo build --release -p estuary-cli` or pass --estuary PATH",
        beside.display()
    );
    Ok(beside)
}

/// Writes each node's deterministic key into its data directory; returns the public keys.
fn write_keys(
    seed: u64,
    members: &[Member],
    root: &Path,
) -> anyhow::Result<Vec<estuary_node::model::Bytes32>> {
    let mut keys = Vec::new();
    for (i, member) in members.iter().enumerate() {
        let dir = root.join(format!("node-{i:02}"));
        std::fs::create_dir_all(&dir)?;
        let secret = consortium::secret(seed, member.id);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(estuary_node::identity::KEY_FILE))?;
        file.write_all(&secret)?;
        keys.push(Identity::from_secret(secret).public_key());
    }
    Ok(keys)
}

/// Whom each node dials: the hospitals and two other nodes drawn from the seed.
fn links(seed: u64, nodes: usize) -> Vec<Vec<usize>> {
    let mut rng = plan::Rng::new(seed ^ 0x11);
    (0..nodes)
        .map(|i| {
            let mut peers: BTreeSet<usize> = (0..nodes.min(3)).filter(|p| *p != i).collect();
            for _ in 0..2 {
                let peer = rng.below(nodes as u64) as usize;
                if peer != i {
                    peers.insert(peer);
                }
            }
            peers.into_iter().collect()
        })
        .collect()
}

/// What a run produced, for the report.
#[derive(Debug, Default)]
pub struct Outcome {
    pub acknowledged: BTreeSet<Acknowledged>,
    pub skipped: BTreeMap<&'static str, u64>,
    pub timeline: Vec<(u64, u64, u64)>,
    pub converged_at_ms: Option<u64>,
    /// When every node agreed on the priority referrals and the files whose allergies were
    /// written, from the end of faults.
    pub urgent_converged_at_ms: Option<u64>,
    pub verdict: check::Verdict,
    pub traffic: cluster::Traffic,
    pub restarts: u64,
    /// Exam results marked entered in error by the hospital that filed them.
    pub corrections: u64,
    /// Referrals a hospital redirected to another, each with its onward referral.
    pub redirected: u64,
    /// Duplicate files linked to their resident's main file, and how the nodes read them.
    pub links: LinkReads,
    /// Residents a joining member loaded in bulk, each one change.
    pub loaded: u64,
    pub elapsed_ms: u64,
    pub propagation: Propagation,
    pub byzantine: Option<byzantine::ByzantineReport>,
    /// Each planned fault window, with when it was actually in force.
    pub faults: Vec<AppliedWindow>,
    pub writes: WriteTiming,
    pub reads: ReadLatency,
}

/// Clinical reads made on every node that is up at each sample (a health file's view,
/// through the API where nodes serve one): the slowest part of a run a clinician would feel.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ReadLatency {
    pub reads: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// Which node answered the slowest, and when (milliseconds from the start).
    pub max_node: Option<usize>,
    pub max_at_ms: Option<u64>,
}

impl ReadLatency {
    /// From (node, milliseconds from the start, how long the read took).
    fn measure(reads: &[(usize, u64, Duration)]) -> Self {
        let mut took: Vec<f64> = reads
            .iter()
            .map(|(_, _, d)| d.as_secs_f64() * 1000.0)
            .collect();
        took.sort_by(f64::total_cmp);
        let at = |q: f64| -> Option<f64> {
            let last = took.len().checked_sub(1)?;
            took.get(((last as f64) * q).round() as usize).copied()
        };
        let slowest = reads.iter().max_by_key(|(_, _, d)| *d);
        Self {
            reads: reads.len() as u64,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: took.last().copied(),
            max_node: slowest.map(|(node, _, _)| *node),
            max_at_ms: slowest.map(|(_, at, _)| *at),
        }
    }
}

/// A planned fault window and when the run put it in force and lifted it (milliseconds from
/// the start; `None`: never).
#[derive(Clone, Debug, serde::Serialize)]
pub struct AppliedWindow {
    #[serde(flatten)]
    pub planned: plan::FaultWindow,
    pub applied_ms: Option<u64>,
    pub lifted_ms: Option<u64>,
}

/// The planned writes against the plan's clock.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct WriteTiming {
    pub planned: u64,
    /// Made (acknowledged or refused), or skipped for what came before.
    pub issued: u64,
    /// Issued within `LATE_AFTER_MS` of their planned time.
    pub on_time: u64,
    pub late: u64,
    /// The furthest behind its planned time a write was issued.
    pub latest_ms: u64,
    /// When the plan issues its last write, and when the run did.
    pub plan_last_ms: u64,
    pub last_issued_ms: u64,
}

impl WriteTiming {
    /// How much longer than planned the writes took (1.0: on the plan's clock).
    pub fn stretch(&self) -> f64 {
        self.last_issued_ms.max(self.plan_last_ms) as f64 / self.plan_last_ms.max(1) as f64
    }
}

/// How long the workload's writes took to reach the other nodes checked: from the writer's
/// acknowledgement to each other node's acceptance (its audit log), over every (write,
/// node) pair.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Propagation {
    pub samples: u64,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
}

impl Propagation {
    /// From each write's writer and acknowledgement time, and the nodes' acceptance times.
    fn measure(writes: &BTreeMap<String, (usize, i64)>, nodes: &[(usize, &NodeState)]) -> Self {
        let mut delays: Vec<u64> = Vec::new();
        for (change, (writer, acknowledged_ms)) in writes {
            for (index, state) in nodes {
                if index == writer {
                    continue;
                }
                if let Some(at) = state.accepted_at.get(change) {
                    // Clocks are the same in one process; a node may log its acceptance a
                    // moment before the writer's acknowledgement returns.
                    delays.push(at.saturating_sub(*acknowledged_ms).max(0) as u64);
                }
            }
        }
        delays.sort_unstable();
        let at = |q: f64| -> Option<u64> {
            let last = delays.len().checked_sub(1)?;
            delays.get(((last as f64) * q).round() as usize).copied()
        };
        Self {
            samples: delays.len() as u64,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: delays.last().copied(),
        }
    }
}

/// The residents and referrals created so far, by plan number.
#[derive(Default)]
struct Created {
    residents: BTreeMap<u32, DocumentId>,
    /// Second files of residents registered again, by plan number.
    duplicates: BTreeMap<u32, DocumentId>,
    referrals: BTreeMap<u32, DocumentId>,
}

/// Notes a write acknowledged at `node`: the checker looks for it everywhere, and propagation
/// is timed from now.
fn acknowledge(
    outcome: &mut Outcome,
    written: &mut BTreeMap<String, (usize, i64)>,
    node: usize,
    id: DocumentId,
    change: estuary_node::model::automerge::ChangeHash,
) {
    written.insert(change.to_string(), (node, estuary_node::audit::now_ms()));
    outcome
        .acknowledged
        .insert((id.to_string(), change.to_string()));
}

/// The write a planned action makes, given what was created so far.
fn write_for(
    plan: &Plan,
    members: &[Member],
    created: &Created,
    step: &plan::Step,
) -> Option<Write> {
    let action = &step.action;
    let seed = plan.seed;
    let now = estuary_node::audit::now_ms();
    let resident = |r: &u32| created.residents.get(r).copied();
    let referral = |k: &u32| created.referrals.get(k).copied();
    Some(match action {
        // Not one write: the driver loads the records itself.
        Action::Load { .. } => return None,
        Action::Register { resident } => {
            Write::CreateHealthFile(content::demographics(seed, *resident))
        }
        Action::RegisterAgain { resident } => {
            Write::CreateHealthFile(content::demographics(seed, *resident))
        }
        Action::LinkDuplicate { resident: r } => Write::HealthFile(
            created.duplicates.get(r).copied()?,
            estuary_node::model::HealthFileOp::Link {
                to: resident(r)?,
                reason: "registered twice: the same national id".into(),
            },
        ),
        Action::Encounter { resident: r } => {
            Write::HealthFile(resident(r)?, content::encounter(seed, *r, now))
        }
        Action::FollowUp { resident: r } => {
            Write::HealthFile(resident(r)?, content::follow_up(seed, *r, now))
        }
        Action::ExamResult { resident: r } => {
            Write::HealthFile(resident(r)?, content::exam_result(seed, *r, now))
        }
        Action::Allergy { resident: r } => {
            Write::HealthFile(resident(r)?, content::allergy(seed, *r))
        }
        Action::CorrectExam { resident: r } => Write::CorrectOwnExam(
            resident(r)?,
            estuary_node::model::InstitutionId::new(members[step.node].id).ok()?,
        ),
        Action::Phone {
            resident: r,
            variant,
        } => Write::HealthFile(resident(r)?, content::phone(seed, *r, *variant)),
        Action::Refer {
            resident: r,
            to,
            up,
            priority,
            ..
        } => Write::CreateReferral(content::referral(
            resident(r)?,
            members[*to].id,
            *up,
            *priority,
        )),
        Action::Accept { referral: k } => Write::Referral(referral(k)?, ReferralOp::Accept),
        Action::Decline { referral: k } => Write::Referral(
            referral(k)?,
            ReferralOp::Decline {
                reason: "no bed on the ward this week; please refer to the other district hospital"
                    .into(),
            },
        ),
        Action::Redirect {
            referral: k,
            to: onward,
        } => Write::Referral(
            referral(k)?,
            ReferralOp::Redirect {
                to: InstitutionId::new(members[*onward].id).ok()?,
                reason: "no rehabilitation bed this month; the other hospital has one".into(),
            },
        ),
        Action::Schedule { referral: k } => Write::Referral(
            referral(k)?,
            ReferralOp::Schedule {
                appointment: Timestamp(now + 3 * 86_400_000),
                minutes: Some(30),
            },
        ),
        Action::NoShow { referral: k } => Write::Referral(referral(k)?, ReferralOp::MarkNoShow),
        Action::Reschedule { referral: k } => Write::Referral(
            referral(k)?,
            ReferralOp::Reschedule {
                appointment: Timestamp(now + 7 * 86_400_000),
                minutes: Some(30),
            },
        ),
        Action::Arrive { referral: k } => Write::Referral(referral(k)?, ReferralOp::MarkArrived),
        Action::Complete { referral: k } => Write::Referral(referral(k)?, ReferralOp::Complete),
        Action::ReturnSummary { referral: k } => Write::Referral(
            referral(k)?,
            ReferralOp::WriteReturnSummary {
                summary:
                    "seen and treated; medication adjusted; follow up at the centre in two weeks"
                        .into(),
            },
        ),
        Action::Cancel { referral: k } => Write::Referral(referral(k)?, ReferralOp::Cancel),
    })
}

/// Drives the plan against the cluster (and the bad node, in a Byzantine preset), then waits
/// for agreement and checks.
fn run(
    plan: &Plan,
    members: &[Member],
    cluster: &mut dyn Cluster,
    converge_timeout_s: u64,
    mut adversary: Option<Adversary>,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        faults: plan
            .faults
            .iter()
            .map(|planned| AppliedWindow {
                planned: planned.clone(),
                applied_ms: None,
                lifted_ms: None,
            })
            .collect(),
        writes: WriteTiming {
            planned: plan.steps.len() as u64,
            plan_last_ms: plan.steps.last().map_or(0, |s| s.at_ms),
            ..WriteTiming::default()
        },
        ..Outcome::default()
    };
    let mut created = Created::default();
    let bad_node = plan.byzantine.as_ref().map(|b| b.node);
    // The nodes the checker holds to its rules: all but a rogue's slot and a revoked node
    // (a flooding node runs honest code, and is checked).
    let checked: Vec<usize> = (0..cluster.len())
        .filter(|i| {
            plan.byzantine
                .as_ref()
                .is_none_or(|b| b.node != *i || b.bad == BadNode::Flood)
        })
        .collect();
    // Each acknowledged write's writer and acknowledgement time (epoch milliseconds).
    let mut written: BTreeMap<String, (usize, i64)> = BTreeMap::new();
    // Duplicate files linked, each with its resident's main file.
    let mut linked: Vec<(DocumentId, DocumentId)> = Vec::new();
    // Priority referrals and files whose allergies were written: what peers take first.
    let mut urgent: BTreeSet<[u8; 16]> = BTreeSet::new();
    let start = Instant::now();
    let elapsed = || start.elapsed().as_millis() as u64;
    let mut next = 0;
    let mut next_sample = 0;
    let mut progress = Progress::new();
    let mut writes = 0u64;
    let mut reads: Vec<(usize, u64, Duration)> = Vec::new();
    loop {
        let t = elapsed();
        if let Some(adversary) = adversary.as_mut() {
            adversary.tick(t, cluster)?;
        }
        // Crashes and restarts.
        for window in &plan.faults {
            if let Fault::Crash { node } = window.fault {
                let down = window.start_ms <= t && t < window.end_ms;
                if down && cluster.is_up(node) {
                    cluster.crash(node)?;
                } else if !down && t >= window.end_ms && !cluster.is_up(node) {
                    cluster.restart(node)?;
                    outcome.restarts += 1;
                }
            }
        }
        let active = plan.active(t);
        cluster.set_faults(&network_faults(&active));
        note_applied(&mut outcome.faults, t, elapsed());
        // Due writes, for a bounded time: the faults and samples above and below keep the
        // plan's clock however far the writes fall behind.
        let burst = Instant::now();
        while next < plan.steps.len()
            && plan.steps[next].at_ms <= t
            && burst.elapsed() < WRITE_BURST_MAX
        {
            let step = &plan.steps[next];
            next += 1;
            let behind_ms = elapsed().saturating_sub(step.at_ms);
            let timing = &mut outcome.writes;
            timing.issued += 1;
            timing.last_issued_ms = elapsed();
            timing.latest_ms = timing.latest_ms.max(behind_ms);
            if behind_ms > LATE_AFTER_MS {
                timing.late += 1;
            } else {
                timing.on_time += 1;
            }
            if let Action::Load { residents } = step.action {
                let mut ndjson = String::new();
                for record in
                    crate::health_data::Source::from_input(None).records(residents as usize)?
                {
                    ndjson.push_str(&serde_json::to_string(&record)?);
                    ndjson.push('\n');
                }
                match cluster.load(step.node, &ndjson)? {
                    Ok(loaded) => {
                        outcome.loaded += loaded.len() as u64;
                        for (id, change) in loaded {
                            acknowledge(&mut outcome, &mut written, step.node, id, change);
                        }
                    }
                    Err(skip) => *outcome.skipped.entry(skip.name()).or_default() += 1,
                }
                continue;
            }
            let Some(write) = write_for(plan, members, &created, step) else {
                *outcome.skipped.entry("depends_on_skipped").or_default() += 1;
                continue;
            };
            match cluster.write(step.node, &write)? {
                Ok(Made { id, change, onward }) => {
                    writes += 1;
                    acknowledge(&mut outcome, &mut written, step.node, id, change);
                    if let Some((onward, created)) = onward {
                        acknowledge(&mut outcome, &mut written, step.node, onward, created);
                        outcome.redirected += 1;
                    }
                    match step.action {
                        Action::Register { resident } => {
                            created.residents.insert(resident, id);
                        }
                        Action::Refer {
                            referral, priority, ..
                        } => {
                            created.referrals.insert(referral, id);
                            if priority {
                                urgent.insert(*id.as_bytes());
                            }
                        }
                        Action::Allergy { .. } => {
                            urgent.insert(*id.as_bytes());
                        }
                        Action::RegisterAgain { resident } => {
                            created.duplicates.insert(resident, id);
                        }
                        Action::LinkDuplicate { resident } => {
                            if let Some(main) = created.residents.get(&resident) {
                                linked.push((id, *main));
                            }
                        }
                        Action::CorrectExam { .. } => outcome.corrections += 1,
                        _ => {}
                    }
                }
                Err(skip) => *outcome.skipped.entry(skip.name()).or_default() += 1,
            }
        }
        if t >= next_sample {
            // A clinical read on every node that is up, of a file chosen in turn.
            if !created.residents.is_empty() {
                let pick = outcome.timeline.len() % created.residents.len();
                if let Some(id) = created.residents.values().nth(pick).copied() {
                    for node in &checked {
                        if let Some(took) = cluster.read(*node, id)? {
                            reads.push((*node, t, took));
                        }
                    }
                }
            }
            let sample = sample(cluster, &checked, t)?;
            progress.show(t, "writing", writes, sample, &active);
            outcome.timeline.push(sample);
            next_sample = t + SAMPLE_EVERY.as_millis() as u64;
        }
        if t >= plan.quiet_ms && next == plan.steps.len() {
            break;
        }
        if next == plan.steps.len() || plan.steps[next].at_ms > elapsed() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    if content::canaries_on() {
        canary_probes(cluster, created.residents.values().next().copied())?;
    }
    // Faults stop: links heal, every node is up, a flooding app stops.
    cluster.set_faults(&NetworkFaults::default());
    for node in 0..cluster.len() {
        if !cluster.is_up(node) {
            cluster.restart(node)?;
            // A rogue's slot stays empty.
            outcome.restarts += u64::from(cluster.is_up(node));
        }
    }
    let lifted = elapsed();
    for window in &mut outcome.faults {
        if window.applied_ms.is_some() && window.lifted_ms.is_none() {
            window.lifted_ms = Some(lifted);
        }
    }
    if let Some(adversary) = adversary.as_mut() {
        for (ack, _) in adversary.stop_flood()? {
            outcome.acknowledged.insert(ack.clone());
        }
    }
    cluster.reconcile_now();
    let healed = elapsed();
    let deadline = healed + converge_timeout_s * 1000;
    loop {
        let t = elapsed();
        let sample = sample(cluster, &checked, t)?;
        outcome.timeline.push(sample);
        progress.show(t, "converging", writes, sample, &[]);
        if outcome.urgent_converged_at_ms.is_none() && agree_on(cluster, &checked, &urgent)? {
            outcome.urgent_converged_at_ms = Some(t - healed);
        }
        if sample.1 == sample.2 && all_catalogues_equal(cluster, &checked)? {
            outcome.converged_at_ms = Some(t - healed);
            break;
        }
        if t >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    progress.finish();
    // How the honest nodes see the bad peer, while it is still there.
    let stats: Vec<_> = checked.iter().map(|n| cluster.sync_stats(*n)).collect();
    let log = adversary.map(Adversary::finish).transpose()?;
    let revoked_key = match plan.byzantine.as_ref().map(|b| b.bad) {
        Some(BadNode::Revoked { .. }) => log.as_ref().and_then(|l| l.key),
        _ => None,
    };
    let states = checked
        .iter()
        .map(|node| cluster.state(*node, revoked_key))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("reading the nodes for the checker")?;
    let mut expected = Expected::default();
    if let Some(log) = &log {
        if let Some(rogue) = &log.rogue {
            outcome.acknowledged.extend(rogue.valid.iter().cloned());
            expected.bad = rogue
                .bad
                .iter()
                .map(|b| (b.document.clone(), b.change.clone()))
                .collect();
        }
        if let Some(revocation) = &log.revocation {
            // The revoked node's writes past the cut-off; what was built on them is
            // refused with them.
            expected.collateral_allowed = true;
            expected.refused = outcome
                .acknowledged
                .iter()
                .filter(|(_, change)| {
                    written
                        .get(change)
                        .is_some_and(|(writer, _)| Some(*writer) == bad_node)
                })
                .filter(|ack| !revocation.kept.contains(*ack))
                .cloned()
                .collect();
        }
    }
    outcome.verdict = check(&states, &outcome.acknowledged, &expected);
    // Every checked node reads a linked resident's record as one, through either file.
    outcome.links.linked = linked.len() as u64;
    for (duplicate, main) in &linked {
        for node in &checked {
            for file in [duplicate, main] {
                outcome.links.reads += 1;
                if cluster.main_file(*node, *file)? == Some(*main) {
                    outcome.links.as_one += 1;
                }
            }
        }
    }
    // Propagation of the workload's writes among the nodes other than a bad one.
    let workload: BTreeMap<String, (usize, i64)> = written
        .into_iter()
        .filter(|(_, (writer, _))| Some(*writer) != bad_node)
        .collect();
    let nodes: Vec<(usize, &NodeState)> = checked
        .iter()
        .copied()
        .zip(states.iter())
        .filter(|(node, _)| Some(*node) != bad_node)
        .collect();
    outcome.propagation = Propagation::measure(&workload, &nodes);
    if let (Some(byzantine), Some(log)) = (&plan.byzantine, &log) {
        outcome.byzantine = Some(byzantine::judge(
            byzantine,
            members,
            log,
            &checked,
            &states,
            &stats,
            expected.refused.len() as u64,
        ));
    }
    outcome.reads = ReadLatency::measure(&reads);
    outcome.traffic = cluster.traffic();
    outcome.elapsed_ms = elapsed();
    Ok(outcome)
}

/// Notes which planned windows are in force at plan time `t`, now that the loop has applied
/// them (at `now` milliseconds): the first time each is seen in force, and the first time it is
/// seen over.
fn note_applied(windows: &mut [AppliedWindow], t: u64, now: u64) {
    for window in windows {
        let planned = &window.planned;
        if planned.start_ms <= t && t < planned.end_ms {
            window.applied_ms.get_or_insert(now);
        } else if t >= planned.end_ms && window.applied_ms.is_some() {
            window.lifted_ms.get_or_insert(now);
        }
    }
}

fn network_faults(active: &[&plan::FaultWindow]) -> NetworkFaults {
    let mut faults = NetworkFaults::default();
    for window in active {
        match &window.fault {
            Fault::Partition { groups, .. } => faults.partition = Some(groups.clone()),
            Fault::Loss { percent } => faults.loss = Some(*percent),
            Fault::Crash { .. } => {}
        }
    }
    faults
}

/// (time, documents in agreement among the checked nodes that are up, documents).
fn sample(cluster: &mut dyn Cluster, checked: &[usize], t: u64) -> anyhow::Result<(u64, u64, u64)> {
    // The core hospital's dashboard charts its peers' lag over the run.
    cluster.sample_dashboard(0);
    let mut catalogues = Vec::new();
    for node in checked {
        if cluster.is_up(*node) {
            catalogues.push(cluster.catalogue(*node)?);
        }
    }
    let (agreed, total) = agreement(&catalogues);
    Ok((t, agreed, total))
}

/// Whether every node checked holds each of `documents` at the same heads.
fn agree_on(
    cluster: &mut dyn Cluster,
    checked: &[usize],
    documents: &BTreeSet<[u8; 16]>,
) -> anyhow::Result<bool> {
    let mut seen: Option<Vec<Option<[u8; 32]>>> = None;
    for node in checked {
        let catalogue = cluster.catalogue(*node)?;
        let digests: Vec<Option<[u8; 32]>> = documents
            .iter()
            .map(|d| catalogue.get(d).copied())
            .collect();
        match &seen {
            Some(first) if *first != digests => return Ok(false),
            Some(_) => {}
            None => seen = Some(digests),
        }
    }
    Ok(true)
}

fn all_catalogues_equal(cluster: &mut dyn Cluster, checked: &[usize]) -> anyhow::Result<bool> {
    let Some((first, rest)) = checked.split_first() else {
        return Ok(true);
    };
    let first = cluster.catalogue(*first)?;
    for node in rest {
        if cluster.catalogue(*node)? != first {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A status line: rewritten in place on a terminal, a line every few seconds otherwise.
struct Progress {
    terminal: bool,
    last_line_ms: u64,
}

impl Progress {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            last_line_ms: 0,
        }
    }

    fn show(
        &mut self,
        t: u64,
        phase: &str,
        writes: u64,
        (_, agreed, total): (u64, u64, u64),
        active: &[&plan::FaultWindow],
    ) {
        let faults: Vec<String> = active
            .iter()
            .map(|w| report::fault_label(&w.fault))
            .collect();
        let line = format!(
            "[{:>6.1} s] {phase:<10} {writes:>6} writes  {agreed:>6}/{total:<6} documents in agreement  faults: {}",
            t as f64 / 1000.0,
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            }
        );
        if self.terminal {
            eprint!("\r{line:<120}");
        } else if t >= self.last_line_ms + 5_000 {
            eprintln!("{line}");
            self.last_line_ms = t;
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// Duplicate files linked in a run, and how nodes read them at the end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LinkReads {
    /// Links made.
    pub linked: u64,
    /// Reads, through a duplicate or its main file, that named the main file as the
    /// resident's record.
    pub as_one: u64,
    /// Reads made: each linked pair, both files, every node checked.
    pub reads: u64,
}
