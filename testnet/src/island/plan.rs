//! The seeded plan of a run: the clinical workload and the fault schedule, fixed before the run
//! starts. The same seed, size and preset give the same plan; what each write finds when it
//! runs (has the file reached this node yet?) depends on the network, and the report says.

use serde::Serialize;

use super::consortium::Member;
use estuary_node::model::InstitutionKind;

/// xorshift64*: small and seeded.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64 of the seed: neighbouring seeds start far apart.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What a step does. Residents and referrals are numbered in the order the plan creates them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// A member brings its existing records: `residents` files of the consortium's data set
    /// (`gen.js`), loaded in bulk, each one change.
    Load { residents: u32 },
    /// A resident registers at their home centre.
    Register { resident: u32 },
    /// An outpatient or follow-up encounter.
    Encounter { resident: u32 },
    /// A lab, imaging or ECG result from a hospital.
    ExamResult { resident: u32 },
    /// A chronic-disease follow-up at the home centre.
    FollowUp { resident: u32 },
    /// An allergy recorded.
    Allergy { resident: u32 },
    /// The hospital that filed an exam result marks it entered in error (filed on the wrong
    /// resident, say).
    CorrectExam { resident: u32 },
    /// A hospital registers a resident again, not finding the file the home centre made
    /// (registered offline, or under another spelling): a second file of one resident.
    RegisterAgain { resident: u32 },
    /// The hospital links its duplicate file to the resident's main file.
    LinkDuplicate { resident: u32 },
    /// The phone number changed (two institutions at once make a conflict to review).
    Phone { resident: u32, variant: u32 },
    /// A referral sent: up from the home centre to a hospital, or down for recovery.
    Refer {
        referral: u32,
        resident: u32,
        to: usize,
        up: bool,
        priority: bool,
    },
    /// The receiver accepts.
    Accept { referral: u32 },
    /// The receiver declines, saying why.
    Decline { referral: u32 },
    /// The receiver passes the referral on to another hospital (`to`, a member index), which
    /// gets an onward referral.
    Redirect { referral: u32, to: usize },
    /// The receiver books an appointment.
    Schedule { referral: u32 },
    /// The resident does not come to the appointment.
    NoShow { referral: u32 },
    /// The receiver books again.
    Reschedule { referral: u32 },
    /// The resident arrives.
    Arrive { referral: u32 },
    /// Care completed.
    Complete { referral: u32 },
    /// The receiver writes the return summary for the sender.
    ReturnSummary { referral: u32 },
    /// The sender cancels.
    Cancel { referral: u32 },
}

/// One write, at a time, by a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Milliseconds after the start.
    pub at_ms: u64,
    /// The node that writes.
    pub node: usize,
    /// What it writes.
    #[serde(flatten)]
    pub action: Action,
}

/// A fault and when it is in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultWindow {
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "fault", rename_all = "snake_case")]
pub enum Fault {
    /// Nodes in different groups cannot reach each other; every node is in one group.
    Partition {
        name: String,
        groups: Vec<Vec<usize>>,
    },
    /// Links lose this percentage of writes (retransmitted late) and drop connections.
    Loss { percent: u64 },
    /// The node is down (killed; restarted from its data directory at the end).
    Crash { node: usize },
}

/// A preset: which faults a run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Preset {
    /// No faults.
    Calm,
    /// Lossy links and node restarts.
    Flaky,
    /// The north cut off, then the core hospital isolated.
    Partition,
    /// All of it: partitions, loss and restarts.
    Island,
    /// A member publishes changes with bad signatures (the last centre runs hostile code).
    Forged,
    /// A non-member dials in and publishes.
    Stranger,
    /// A centre on the north shore is revoked while the north is cut off, and keeps writing on
    /// its side.
    Revoked,
    /// A member sends missing and invented dependencies, oversized frames, undecodable
    /// messages and replayed envelopes.
    Garbage,
    /// A member publishes valid but useless changes as fast as it can.
    Flood,
    /// A member answers sync requests with garbage or never answers.
    Mute,
}

/// What the `rogue` of a Byzantine preset does: hostile code under a member's key (or a
/// stranger's), not an Estuary node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Misbehaviour {
    Forged,
    Stranger,
    Garbage,
    Mute,
}

/// How a Byzantine preset's bad node misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BadNode {
    /// Hostile code in the member's place: it runs no node and no workload.
    Rogue { misbehaviour: Misbehaviour },
    /// An ordinary node the authority revokes (during the north's partition); it keeps
    /// writing on its side.
    Revoked { at_ms: u64 },
    /// An ordinary node whose app writes valid, useless changes as fast as the node takes
    /// them, besides its share of the workload.
    Flood,
}

/// The bad node of a Byzantine preset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Byzantine {
    /// Its index among the members (for a stranger, the slot it is dialled from; its key
    /// is not in the roster).
    pub node: usize,
    /// What it does.
    #[serde(flatten)]
    pub bad: BadNode,
}

impl Byzantine {
    /// The rogue's misbehaviour, when the bad node is a rogue.
    pub fn rogue(&self) -> Option<Misbehaviour> {
        match self.bad {
            BadNode::Rogue { misbehaviour } => Some(misbehaviour),
            _ => None,
        }
    }
}

impl Preset {
    /// Whether a bad node takes part.
    pub fn byzantine(self) -> bool {
        matches!(
            self,
            Preset::Forged
                | Preset::Stranger
                | Preset::Revoked
                | Preset::Garbage
                | Preset::Flood
                | Preset::Mute
        )
    }

    fn loss(self) -> bool {
        matches!(self, Preset::Flaky | Preset::Island)
    }
    fn restarts(self) -> bool {
        matches!(self, Preset::Flaky | Preset::Island)
    }
    fn partitions(self) -> bool {
        matches!(self, Preset::Partition | Preset::Island)
    }
    /// Only the north's partition, for the revocation to happen during it.
    fn north_cut_off(self) -> bool {
        self.partitions() || self == Preset::Revoked
    }
}

/// The whole plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub seed: u64,
    pub preset: Preset,
    pub duration_ms: u64,
    /// When writing and faults stop and the convergence clock starts.
    pub quiet_ms: u64,
    pub steps: Vec<Step>,
    pub faults: Vec<FaultWindow>,
    /// The bad node of a Byzantine preset.
    pub byzantine: Option<Byzantine>,
}

/// Steps in a referral's life after it is sent, with the share of referrals that take each:
/// most are completed, some cancelled by the sender.
const REFERRAL_STEP_GAP_MS: u64 = 1_500;

/// When the bulk load of a joining member's records starts, in ms from the start.
const LOAD_AT_MS: u64 = 1_000;

/// Builds the plan for `members` writing `files` health files over `duration_ms`.
pub fn plan(
    seed: u64,
    preset: Preset,
    members: &[Member],
    files: u32,
    duration_ms: u64,
    loss_percent: u64,
) -> Plan {
    let mut rng = Rng::new(seed);
    let mut desk = Rng::new(seed ^ 0x0de5_c0de_5eed_0001);
    let quiet_ms = duration_ms * 8 / 10;
    let nodes = members.len();
    let byzantine = byzantine(preset, members, quiet_ms);
    // A rogue runs no workload of its own: it is not an Estuary node.
    let rogue = byzantine
        .as_ref()
        .filter(|b| b.rogue().is_some())
        .map(|b| b.node);
    let writers = |i: &usize| Some(*i) != rogue;
    let hospitals: Vec<usize> = (0..nodes)
        .filter(|i| members[*i].kind != InstitutionKind::CommunityCentre)
        .filter(writers)
        .collect();
    let centres: Vec<usize> = (0..nodes)
        .filter(|i| members[*i].kind == InstitutionKind::CommunityCentre)
        .filter(writers)
        .collect();
    // A consortium without centres (two nodes) registers at the hospitals.
    let centres = if centres.is_empty() {
        hospitals.clone()
    } else {
        centres
    };
    let mut steps = Vec::new();
    let mut referrals = 0u32;
    // A member joins with its existing records: the first centre loads a quarter as many
    // residents as the plan registers, from the consortium's data set, in one bulk load.
    steps.push(Step {
        at_ms: LOAD_AT_MS,
        node: centres[0],
        action: Action::Load {
            residents: (files / 4).max(1),
        },
    });
    // Registrations fill the first half; the rest of the work follows the residents.
    let clinical_ms = quiet_ms.saturating_sub(REFERRAL_STEP_GAP_MS * 5).max(1);
    for resident in 0..files {
        let home = *rng.pick(&centres);
        let registered = rng.below(clinical_ms / 2);
        steps.push(Step {
            at_ms: registered,
            node: home,
            action: Action::Register { resident },
        });
        // One resident in twelve is registered again at a hospital, which then links the
        // duplicate to the main file.
        if rng.below(12) == 0 {
            let hospital = *rng.pick(&hospitals);
            let again = registered + REFERRAL_STEP_GAP_MS;
            steps.push(Step {
                at_ms: again,
                node: hospital,
                action: Action::RegisterAgain { resident },
            });
            steps.push(Step {
                at_ms: again + 2 * REFERRAL_STEP_GAP_MS,
                node: hospital,
                action: Action::LinkDuplicate { resident },
            });
        }
        // Two or three further events per resident.
        let events = 2 + rng.below(2);
        for _ in 0..events {
            let at_ms = registered + 200 + rng.below(clinical_ms.saturating_sub(registered).max(1));
            let roll = rng.below(100);
            let (node, action) = match roll {
                0..25 => (home, Action::FollowUp { resident }),
                25..45 => (home, Action::Encounter { resident }),
                45..65 => {
                    let hospital = *rng.pick(&hospitals);
                    // One result in eight turns out to be filed in error.
                    if rng.chance(12) {
                        steps.push(Step {
                            at_ms: at_ms + REFERRAL_STEP_GAP_MS,
                            node: hospital,
                            action: Action::CorrectExam { resident },
                        });
                    }
                    (hospital, Action::ExamResult { resident })
                }
                65..75 => (*rng.pick(&hospitals), Action::Allergy { resident }),
                75..85 => {
                    // The same change of phone made at the centre and at a hospital at once.
                    let variant = rng.below(1_000) as u32;
                    steps.push(Step {
                        at_ms,
                        node: *rng.pick(&hospitals),
                        action: Action::Phone {
                            resident,
                            variant: variant + 1,
                        },
                    });
                    (home, Action::Phone { resident, variant })
                }
                _ => {
                    // A referral goes to another institution.
                    let others: Vec<usize> =
                        hospitals.iter().copied().filter(|h| *h != home).collect();
                    if others.is_empty() {
                        continue;
                    }
                    let referral = referrals;
                    referrals += 1;
                    let up = rng.chance(70);
                    let hospital = *rng.pick(&others);
                    let (from, to) = if up {
                        (home, hospital)
                    } else {
                        (hospital, home)
                    };
                    let priority = rng.chance(30);
                    let mut life = Vec::new();
                    // The desk's other moves are drawn from their own stream, so the rest of
                    // a seed's plan is what it was before they were added.
                    let cancelled = rng.chance(10);
                    if cancelled {
                        life.push((to, Action::Accept { referral }));
                        life.push((from, Action::Cancel { referral }));
                    } else if desk.chance(5) {
                        life.push((to, Action::Decline { referral }));
                    } else if let Some(onward) = desk
                        .chance(4)
                        .then(|| {
                            let onward: Vec<usize> = hospitals
                                .iter()
                                .copied()
                                .filter(|h| *h != from && *h != to)
                                .collect();
                            (!onward.is_empty()).then(|| *desk.pick(&onward))
                        })
                        .flatten()
                    {
                        life.extend([
                            (to, Action::Accept { referral }),
                            (
                                to,
                                Action::Redirect {
                                    referral,
                                    to: onward,
                                },
                            ),
                        ]);
                    } else {
                        life.extend([
                            (to, Action::Accept { referral }),
                            (to, Action::Schedule { referral }),
                        ]);
                        if desk.chance(10) {
                            life.extend([
                                (to, Action::NoShow { referral }),
                                (to, Action::Reschedule { referral }),
                            ]);
                        }
                        life.extend([
                            (to, Action::Arrive { referral }),
                            (to, Action::Complete { referral }),
                            (to, Action::ReturnSummary { referral }),
                        ]);
                    }
                    for (n, (node, action)) in life.into_iter().enumerate() {
                        steps.push(Step {
                            at_ms: at_ms + REFERRAL_STEP_GAP_MS * (n as u64 + 1),
                            node,
                            action,
                        });
                    }
                    (
                        from,
                        Action::Refer {
                            referral,
                            resident,
                            to,
                            up,
                            priority,
                        },
                    )
                }
            };
            steps.push(Step {
                at_ms,
                node,
                action,
            });
        }
    }
    steps.retain(|s| s.at_ms < quiet_ms);
    steps.sort_by_key(|s| s.at_ms);
    Plan {
        seed,
        preset,
        duration_ms,
        quiet_ms,
        faults: faults(&mut rng, preset, members, quiet_ms, loss_percent),
        steps,
        byzantine,
    }
}

/// The bad node of a Byzantine preset: the last member (a centre when there are three
/// members or more), or for `revoked` the first northern centre, revoked while the north is
/// cut off.
fn byzantine(preset: Preset, members: &[Member], quiet_ms: u64) -> Option<Byzantine> {
    let last = members.len() - 1;
    let rogue = |misbehaviour| {
        Some(Byzantine {
            node: last,
            bad: BadNode::Rogue { misbehaviour },
        })
    };
    match preset {
        Preset::Forged => rogue(Misbehaviour::Forged),
        Preset::Stranger => rogue(Misbehaviour::Stranger),
        Preset::Garbage => rogue(Misbehaviour::Garbage),
        Preset::Mute => rogue(Misbehaviour::Mute),
        Preset::Flood => Some(Byzantine {
            node: last,
            bad: BadNode::Flood,
        }),
        Preset::Revoked => Some(Byzantine {
            node: members
                .iter()
                .position(|m| m.north && m.kind == InstitutionKind::CommunityCentre)?,
            // The north is cut off from 120/800 to 320/800 of the writing phase.
            bad: BadNode::Revoked {
                at_ms: quiet_ms * 200 / 800,
            },
        }),
        _ => None,
    }
}

fn faults(
    rng: &mut Rng,
    preset: Preset,
    members: &[Member],
    quiet_ms: u64,
    loss_percent: u64,
) -> Vec<FaultWindow> {
    let at = |fraction_per_mille: u64| quiet_ms * fraction_per_mille / 800;
    let mut windows = Vec::new();
    if preset.north_cut_off() {
        let (north, south): (Vec<usize>, Vec<usize>) =
            (0..members.len()).partition(|i| members[*i].north);
        if !north.is_empty() && !south.is_empty() {
            windows.push(FaultWindow {
                start_ms: at(120),
                end_ms: at(320),
                fault: Fault::Partition {
                    name: "north cut off".into(),
                    groups: vec![north, south],
                },
            });
        }
    }
    if preset.partitions() {
        windows.push(FaultWindow {
            start_ms: at(400),
            end_ms: at(560),
            fault: Fault::Partition {
                name: "core hospital isolated".into(),
                groups: vec![vec![0], (1..members.len()).collect()],
            },
        });
    }
    if preset.loss() && loss_percent > 0 {
        windows.push(FaultWindow {
            start_ms: at(80),
            end_ms: at(720),
            fault: Fault::Loss {
                percent: loss_percent.min(90),
            },
        });
    }
    if preset.restarts() && members.len() > 1 {
        // Two restarts of different nodes other than the core hospital.
        let first = 1 + rng.below(members.len() as u64 - 1) as usize;
        let mut second = 1 + rng.below(members.len() as u64 - 1) as usize;
        if second == first && members.len() > 2 {
            second = 1 + (first % (members.len() - 1));
        }
        for (node, start) in [(first, at(240)), (second, at(500))] {
            windows.push(FaultWindow {
                start_ms: start,
                end_ms: start + at(100),
                fault: Fault::Crash { node },
            });
        }
    }
    windows.sort_by_key(|w| w.start_ms);
    windows
}

impl Plan {
    /// The faults in force at `t_ms`.
    pub fn active(&self, t_ms: u64) -> Vec<&FaultWindow> {
        self.faults
            .iter()
            .filter(|w| w.start_ms <= t_ms && t_ms < w.end_ms)
            .collect()
    }

    /// When the last fault ends.
    #[cfg(test)]
    pub fn faults_end_ms(&self) -> u64 {
        self.faults.iter().map(|w| w.end_ms).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::consortium::members;
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_workload_and_fault_schedule() {
        let members = members(7);
        let a = plan(42, Preset::Island, &members, 50, 30_000, 20);
        let b = plan(42, Preset::Island, &members, 50, 30_000, 20);
        assert_eq!(a, b);
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            serde_json::to_string(&b).unwrap()
        );
        let c = plan(43, Preset::Island, &members, 50, 30_000, 20);
        assert!(a.steps != c.steps, "another seed, another workload");
        assert!(
            a.faults
                .iter()
                .any(|w| matches!(w.fault, Fault::Partition { .. }))
        );
        assert_eq!(
            a.faults
                .iter()
                .filter(|w| matches!(w.fault, Fault::Crash { .. }))
                .count(),
            2
        );
        assert!(a.faults_end_ms() <= a.quiet_ms);
        assert!(a.steps.iter().all(|s| s.at_ms < a.quiet_ms));
        assert_eq!(
            a.steps
                .iter()
                .filter(|s| matches!(s.action, Action::Register { .. }))
                .count(),
            50
        );
    }

    #[test]
    fn calm_has_no_faults() {
        let members = members(5);
        assert!(
            plan(1, Preset::Calm, &members, 10, 10_000, 20)
                .faults
                .is_empty()
        );
    }
}
