//! The run's report: `report.json`, a summary on stdout, and `agreement.svg`, the share of
//! documents in agreement over time with the fault periods shaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::byzantine::ByzantineReport;
use super::check::Verdict;
use super::cluster::Traffic;
use super::consortium::Member;
use super::plan::{Fault, Preset};
use super::{
    AppliedWindow, DemoArgs, LATE_AFTER_MS, Mode, Outcome, Propagation, ReadLatency, SAMPLE_EVERY,
    WriteTiming,
};

/// What `report.json` holds.
#[derive(Debug, Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub institutions: Vec<&'static str>,
    pub preset: Preset,
    pub mode: Mode,
    pub files: u32,
    pub duration_s: u64,
    pub loss_percent: u64,
    /// Every node reached identical heads, nothing lost, nothing invented, every invariant
    /// held, quarantines identical.
    pub converged: bool,
    /// From the end of faults to full agreement.
    pub convergence_ms: Option<u64>,
    /// From the end of faults to agreement on the priority referrals and the files whose
    /// allergies were written (what peers take first).
    pub urgent_convergence_ms: Option<u64>,
    pub acknowledged_writes: u64,
    /// Acknowledged on some node, missing on some node (counted per node).
    pub lost: u64,
    /// Present on some node, written by no one.
    pub phantom: u64,
    pub invariant_violations: u64,
    pub quarantine_identical: bool,
    pub identical_heads: bool,
    /// Changes still waiting for dependencies when the check ran, over all nodes.
    pub pending_changes: u64,
    pub documents: u64,
    pub rejected_changes: u64,
    pub wire_bytes: u64,
    pub messages: u64,
    /// Connections the fault layer (or, between processes, the fault proxy) cut.
    pub connections_cut: u64,
    /// Writes it held back by a retransmission's delay.
    pub writes_delayed: u64,
    pub restarts: u64,
    /// Exam results marked entered in error by the hospital that filed them.
    pub corrections: u64,
    /// Referrals a hospital redirected to another, each with its onward referral.
    pub redirected: u64,
    /// Residents registered twice whose duplicate was linked, and the end's reads of them.
    pub links: super::LinkReads,
    /// Residents a joining member loaded in bulk, each one change.
    pub loaded: u64,
    /// Planned writes not made, by reason (a node down, a document not there yet, a
    /// transition made moot by a concurrent one).
    pub skipped_writes: BTreeMap<&'static str, u64>,
    /// Each planned fault window, with when the run put it in force and lifted it.
    pub faults: Vec<AppliedWindow>,
    /// Every planned fault window was put in force.
    pub faults_applied: bool,
    /// The planned writes against the plan's clock.
    pub writes: WriteTiming,
    /// Clinical reads on the nodes during the run; the slowest is the run's slowest part.
    pub reads: ReadLatency,
    /// (milliseconds from start, documents in agreement, documents).
    pub agreement: Vec<(u64, u64, u64)>,
    pub elapsed_ms: u64,
    /// From a write's acknowledgement to its acceptance at each other node checked (the
    /// workload's writes, not a bad node's).
    pub propagation: Propagation,
    /// Acknowledged writes refused because they build on a revoked key's refused change.
    pub collateral_writes: u64,
    /// A revoked key's acknowledged writes past its cut-off that some node holds.
    pub refused_but_held: u64,
    /// The Byzantine presets: what the bad node did and what the honest nodes made of it.
    pub byzantine: Option<ByzantineReport>,
    pub failures: Vec<String>,
    pub replay: String,
    /// The static copy of the core hospital's dashboard as the run ended, in the report
    /// folder (absent if the node was down at the end).
    pub dashboard: Option<String>,
}

impl Report {
    pub fn new(
        args: &DemoArgs,
        seed: u64,
        members: &[Member],
        outcome: Outcome,
        replay: &str,
    ) -> Self {
        let Outcome {
            acknowledged,
            skipped,
            timeline,
            converged_at_ms,
            urgent_converged_at_ms,
            verdict,
            traffic,
            restarts,
            corrections,
            redirected,
            links,
            loaded,
            elapsed_ms,
            propagation,
            byzantine,
            faults,
            writes,
            reads,
        } = outcome;
        let not_applied: Vec<String> = faults
            .iter()
            .filter(|w| w.applied_ms.is_none())
            .map(|w| {
                format!(
                    "planned fault {} ({:.1}–{:.1} s) was never applied",
                    fault_label(&w.planned.fault),
                    w.planned.start_ms as f64 / 1000.0,
                    w.planned.end_ms as f64 / 1000.0
                )
            })
            .collect();
        let Verdict {
            identical_heads,
            lost,
            phantom,
            invariant_violations,
            quarantine_identical,
            documents,
            pending,
            collateral,
            refused_but_held,
            examples,
        } = verdict.clone();
        let Traffic {
            wire_bytes,
            messages,
            rejected_changes,
            connections_cut,
            writes_delayed,
        } = traffic;
        Self {
            seed,
            nodes: members.len(),
            institutions: members.iter().map(|m| m.id).collect(),
            preset: args.preset,
            mode: args.mode,
            files: args.files,
            duration_s: args.duration,
            loss_percent: args.loss,
            converged: verdict.passed()
                && converged_at_ms.is_some()
                && byzantine.as_ref().is_none_or(|b| b.passed),
            faults_applied: not_applied.is_empty(),
            writes,
            reads,
            convergence_ms: converged_at_ms,
            urgent_convergence_ms: urgent_converged_at_ms,
            acknowledged_writes: acknowledged.len() as u64,
            lost,
            phantom,
            invariant_violations,
            quarantine_identical,
            identical_heads,
            pending_changes: pending,
            documents,
            rejected_changes,
            wire_bytes,
            messages,
            connections_cut,
            writes_delayed,
            restarts,
            corrections,
            redirected,
            links,
            loaded,
            skipped_writes: skipped,
            faults,
            agreement: timeline,
            elapsed_ms,
            propagation,
            collateral_writes: collateral,
            refused_but_held,
            failures: not_applied
                .into_iter()
                .chain(examples)
                .chain(byzantine.iter().flat_map(|b| b.failures.iter().cloned()))
                .collect(),
            byzantine,
            replay: replay.to_owned(),
            dashboard: None,
        }
    }

    /// The nodes converged and the run executed the fault schedule it planned.
    pub fn passed(&self) -> bool {
        self.converged && self.faults_applied
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(self)?)?;
        std::fs::write(dir.join("agreement.svg"), self.svg())?;
        Ok(())
    }

    pub fn print_summary(&self, dir: &Path) {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        println!(
            "island consortium: {} nodes, preset {:?}, seed {}",
            self.nodes, self.preset, self.seed
        );
        println!("  writes acknowledged   {}", self.acknowledged_writes);
        println!("  documents             {}", self.documents);
        for (reason, count) in &self.skipped_writes {
            println!("  writes skipped ({reason}) {count}");
        }
        let w = &self.writes;
        println!(
            "  writes on the clock   {} of {} issued on time (within {:.0} s), {} late (at most {:.1} s)",
            w.on_time,
            w.planned,
            LATE_AFTER_MS as f64 / 1000.0,
            w.late,
            w.latest_ms as f64 / 1000.0,
        );
        println!(
            "  writes finished       {:.1} s into a {:.1} s plan ({:.2}× the plan)",
            w.last_issued_ms as f64 / 1000.0,
            w.plan_last_ms as f64 / 1000.0,
            w.stretch()
        );
        if !self.faults.is_empty() {
            println!("  faults                planned → in force");
        }
        let seconds =
            |ms: Option<u64>| ms.map_or("never".into(), |ms| format!("{:.1}", ms as f64 / 1000.0));
        for window in &self.faults {
            println!(
                "    {:<28} {:.1}–{:.1} s → {}–{} s",
                fault_label(&window.planned.fault),
                window.planned.start_ms as f64 / 1000.0,
                window.planned.end_ms as f64 / 1000.0,
                seconds(window.applied_ms),
                seconds(window.lifted_ms)
            );
        }
        println!("  restarts              {}", self.restarts);
        println!(
            "  corrections           {} exam results marked entered in error (kept, on every node)",
            self.corrections
        );
        println!(
            "  redirected            {} referrals passed on to another hospital, each with its onward referral",
            self.redirected
        );
        println!(
            "  linked duplicates     {} residents registered twice, the duplicate linked; {}/{} reads through either file showed the main record",
            self.links.linked, self.links.as_one, self.links.reads
        );
        println!(
            "  bulk load             {} residents of a joining member, one change each",
            self.loaded
        );
        println!(
            "  converged             {} ({})",
            yes(self.converged),
            self.convergence_ms
                .map_or("not within the timeout".into(), |ms| format!(
                    "{:.1} s after the faults stopped",
                    ms as f64 / 1000.0
                ))
        );
        println!(
            "  urgent first          priority referrals and allergy changes agreed {}",
            self.urgent_convergence_ms
                .map_or("not within the timeout".into(), |ms| format!(
                    "{:.1} s after the faults stopped",
                    ms as f64 / 1000.0
                ))
        );
        println!("  identical heads       {}", yes(self.identical_heads));
        println!("  lost / phantom        {} / {}", self.lost, self.phantom);
        println!("  invariant violations  {}", self.invariant_violations);
        println!("  quarantine identical  {}", yes(self.quarantine_identical));
        println!("  pending changes       {}", self.pending_changes);
        println!("  rejected changes      {}", self.rejected_changes);
        if let (Some(p50), Some(p99)) = (self.propagation.p50_ms, self.propagation.p99_ms) {
            println!("  propagation           p50 {p50} ms, p99 {p99} ms");
        }
        if let (Some(p99), Some(max), Some(node), Some(at)) = (
            self.reads.p99_ms,
            self.reads.max_ms,
            self.reads.max_node,
            self.reads.max_at_ms,
        ) {
            println!(
                "  slowest part          a clinical read took {max:.1} ms (node {node}, at {:.1} s); p99 {p99:.1} ms over {} reads",
                at as f64 / 1000.0,
                self.reads.reads
            );
        }
        if let Some(b) = &self.byzantine {
            println!(
                "  bad node              {} ({}), {}",
                b.institution,
                b.peer_id,
                yes(b.passed)
            );
            if b.bad_changes_sent > 0 {
                println!(
                    "  bad changes           {} sent, {} accepted, {} quarantined, {} held pending (over honest nodes)",
                    b.bad_changes_sent,
                    b.bad_changes_accepted,
                    b.bad_changes_quarantined,
                    b.bad_changes_pending
                );
            }
            if b.flood_writes > 0 {
                println!("  flood                 {} writes", b.flood_writes);
            }
            println!(
                "  bad peer              score min {}, strikes max {}, disconnected by {} of {}, {} connections denied",
                b.score_min.map_or("-".into(), |s| format!("{s:.0}")),
                b.strikes_max,
                b.disconnected_by,
                b.per_node.len(),
                b.denied
            );
            if b.valid_changes_sent > 0 {
                println!(
                    "  its valid changes     {} sent, {} missing on honest nodes",
                    b.valid_changes_sent, b.valid_changes_missing
                );
            }
            if let Some(r) = &b.revocation {
                println!(
                    "  revocation            {} cut-off heads, {} changes kept, same everywhere {}, {} writes refused, {} refused with them",
                    r.cutoff_heads,
                    r.kept_expected,
                    yes(r.same_cutoff_everywhere),
                    r.refused_writes,
                    self.collateral_writes
                );
            }
        }
        println!(
            "  wire                  {:.1} MiB in {} messages",
            self.wire_bytes as f64 / 1_048_576.0,
            self.messages
        );
        println!(
            "  faults injected       {} connections cut, {} writes delayed",
            self.connections_cut, self.writes_delayed
        );
        for failure in &self.failures {
            println!("  ! {failure}");
        }
        println!(
            "  report                {} (and agreement.svg)",
            dir.join("report.json").display()
        );
        if let Some(dashboard) = &self.dashboard {
            println!(
                "  dashboard             {} (the core hospital's, as the run ended)",
                dir.join(dashboard).display()
            );
        }
    }

    /// The share of documents in agreement over time, fault periods shaded.
    pub fn svg(&self) -> String {
        let (width, height, left, bottom, top) = (900.0, 360.0, 60.0, 40.0, 30.0);
        let plot_w = width - left - 20.0;
        let plot_h = height - bottom - top;
        let end_ms = self.agreement.last().map_or(1, |s| s.0).max(1) as f64;
        let x = |ms: f64| left + plot_w * ms / end_ms;
        let y = |share: f64| top + plot_h * (1.0 - share);
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"##
        );
        let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="white"/>"##);
        // Faults shaded by when they were in force, not by the plan.
        for (lane, window) in self.faults.iter().enumerate() {
            let (Some(applied), Some(lifted)) = (window.applied_ms, window.lifted_ms) else {
                continue;
            };
            let colour = match &window.planned.fault {
                Fault::Partition { .. } => "#9ecae1",
                Fault::Loss { .. } => "#fdd0a2",
                Fault::Crash { .. } => "#fcbba1",
            };
            let label = fault_label(&window.planned.fault);
            let (x0, x1) = (x(applied as f64), x(lifted as f64));
            let _ = writeln!(
                svg,
                r##"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{plot_h}" fill="{colour}" fill-opacity="0.45"/><text x="{:.1}" y="{:.1}" fill="#555">{label}</text>"##,
                (x1 - x0).max(1.0),
                x0 + 3.0,
                top + 14.0 + 14.0 * (lane % 4) as f64
            );
        }
        // Real samples only: a dot each, joined where they are at most two sample periods
        // apart (a gap shows as a gap, not as a line across it).
        let gap_ms = 2 * SAMPLE_EVERY.as_millis() as u64;
        let mut segment: Vec<String> = Vec::new();
        let mut previous_ms: Option<u64> = None;
        let mut segments: Vec<Vec<String>> = Vec::new();
        for (t, agreed, total) in &self.agreement {
            let share = if *total == 0 {
                1.0
            } else {
                *agreed as f64 / *total as f64
            };
            if previous_ms.is_some_and(|p| t.saturating_sub(p) > gap_ms) {
                segments.push(std::mem::take(&mut segment));
            }
            previous_ms = Some(*t);
            let (px, py) = (x(*t as f64), y(share));
            let _ = writeln!(
                svg,
                r##"<circle cx="{px:.1}" cy="{py:.1}" r="1.8" fill="#08519c"/>"##
            );
            segment.push(format!("{px:.1},{py:.1}"));
        }
        segments.push(segment);
        for segment in segments.iter().filter(|s| s.len() > 1) {
            let _ = writeln!(
                svg,
                r##"<polyline points="{}" fill="none" stroke="#08519c" stroke-width="1.5"/>"##,
                segment.join(" ")
            );
        }
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{}" stroke="black"/>"##,
            top + plot_h,
            left + plot_w,
            top + plot_h,
            top + plot_h
        );
        for share in [0.0, 0.5, 1.0] {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}%</text>"##,
                left - 6.0,
                y(share) + 4.0,
                share * 100.0
            );
        }
        let seconds = end_ms / 1000.0;
        let step = ((seconds / 8.0).ceil()).max(1.0);
        let mut s = 0.0;
        while s <= seconds {
            let _ = writeln!(
                svg,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">{s:.0} s</text>"##,
                x(s * 1000.0),
                top + plot_h + 18.0
            );
            s += step;
        }
        let _ = writeln!(
            svg,
            r##"<text x="{left}" y="18" font-size="14">Documents in agreement on every node that is up — {} nodes, preset {:?}, seed {}</text>"##,
            self.nodes, self.preset, self.seed
        );
        svg.push_str("</svg>\n");
        svg
    }
}

/// A fault window's name in the summary, the plot and the progress line.
pub(super) fn fault_label(fault: &Fault) -> String {
    match fault {
        Fault::Partition { name, .. } => name.clone(),
        Fault::Loss { percent } => format!("{percent}% loss"),
        Fault::Crash { node } => format!("node {node} down"),
    }
}
