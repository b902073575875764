//! A referral between two member institutions, and the state machine that drives it.
//!
//! Status changes are stored as an append-only list of events. Each event records the status
//! it moved from and to, and `after`: the ids of the latest events its writer held. Those
//! links make the events a DAG that every replica holds identically, and the status is
//! *derived* from that DAG by one deterministic rule, whatever order the events arrived in:
//!
//! 1. The *frontier* is the set of events no other event names in `after`.
//! 2. The frontier event whose target status has the highest precedence wins, ties broken by
//!    event id; the derived status is its target. Precedence, highest first:
//!    completed > arrived > cancelled > redirected > no-show > scheduled > accepted > declined.
//!
//! So a cancel beats a concurrent accept or schedule (the sender withdrew; the hospital frees
//! the slot rather than the patient being expected somewhere they will not go), nothing beats
//! an arrival (the patient is physically there and must be cared for), and an accept beats a
//! concurrent decline (of two desks of the receiver, the one keeping the patient in care wins).
//! A no-show beats a concurrent reschedule (the missed appointment is a fact; the new booking
//! shows among the superseded events, to book again) and loses to an arrival (a resident
//! marked missing who did come is in care) and to a cancel.
//!
//! The receiver may also *redirect* a referral it cannot serve to another member (from
//! requested, accepted, scheduled or no-show), saying to whom and why. The node then sends an
//! onward referral from the redirecting institution to that member, which names the original
//! (`redirected_from`). A redirect beats a concurrent accept, booking, no-show or decline of the
//! receiver's other desks (the resident is already expected elsewhere: keeping the booking
//! would expect them in two places) and loses to a cancel and to an arrival, as any move of the
//! receiver does; a redirect that lost shows among the superseded events, and its onward
//! referral is then withdrawn by its own sender.
//!
//! The receiver books (`schedule`), books again (`reschedule`, from scheduled or no-show: a
//! move from scheduled to scheduled), records a no-show, and declines with a reason that the
//! declining event carries. The receiver alone writes the return summary (a register, like
//! the sender's handover), when care completes or the resident goes back down for recovery.
//! Every event is checked against the status derived from the events it names, so the winning
//! chain is always a legal path of the state machine made by institutions allowed to make it.

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ObjType, ReadDoc, Value};
use serde::{Deserialize, Serialize};

use crate::access::{
    NewEntry, Obj, Register, append_entry, check_text, checked, entry_id, institution, put_time,
    text, timestamp, uint,
};
use crate::document::{DocumentKind, IDENTITY_KEYS, read_identity, replica};
use crate::error::{OpError, ValidationError};
use crate::ids::{Actor, DocumentId, Editor, EntryId, InstitutionId, Timestamp};
use crate::limits::{
    APPOINTMENT_MINUTES_MAX, FIELD_BYTES_MAX, REFERRAL_EVENTS_MAX, SUMMARY_BYTES_MAX,
};
use crate::vocab::{Direction, Urgency, vocabulary};

vocabulary! {
    /// Where a referral stands.
    ReferralStatus {
        /// Sent, awaiting the receiver's answer.
        Requested = "requested",
        /// Accepted by the receiver.
        Accepted = "accepted",
        /// Declined by the receiver (final).
        Declined = "declined",
        /// An appointment is booked.
        Scheduled = "scheduled",
        /// The resident did not come to the booked appointment; the receiver may book again.
        NoShow = "no_show",
        /// The patient arrived at the receiver.
        Arrived = "arrived",
        /// Care at the receiver is complete (final).
        Completed = "completed",
        /// Withdrawn by the sender before arrival (final).
        Cancelled = "cancelled",
        /// Passed on by the receiver to another member, through an onward referral (final).
        Redirected = "redirected",
    }
}

vocabulary! {
    /// Which side of a referral an institution is on.
    Role {
        /// The institution that sent the referral.
        Sender = "sending",
        /// The institution the referral is addressed to.
        Receiver = "receiving",
    }
}

impl ReferralStatus {
    /// Whether the state machine has an edge `self -> to`.
    pub const fn may_move_to(self, to: ReferralStatus) -> bool {
        use ReferralStatus::*;
        matches!(
            (self, to),
            (Requested, Accepted | Declined | Cancelled | Redirected)
                | (Accepted, Scheduled | Cancelled | Redirected)
                | (
                    Scheduled,
                    Scheduled | NoShow | Arrived | Cancelled | Redirected
                )
                | (NoShow, Scheduled | Cancelled | Redirected)
                | (Arrived, Completed)
        )
    }

    /// Who may move a referral into this status.
    pub const fn authorised_role(self) -> Role {
        match self {
            ReferralStatus::Cancelled | ReferralStatus::Requested => Role::Sender,
            _ => Role::Receiver,
        }
    }

    /// Precedence among concurrent transitions: the highest wins (see the module docs).
    pub const fn precedence(self) -> u8 {
        match self {
            ReferralStatus::Requested => 0,
            ReferralStatus::Declined => 1,
            ReferralStatus::Accepted => 2,
            ReferralStatus::Scheduled => 3,
            ReferralStatus::NoShow => 4,
            ReferralStatus::Redirected => 5,
            ReferralStatus::Cancelled => 6,
            ReferralStatus::Arrived => 7,
            ReferralStatus::Completed => 8,
        }
    }
}

/// A referral to send.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct NewReferral {
    /// The resident's health file.
    pub patient: DocumentId,
    /// Up to a hospital, or down for recovery.
    pub direction: Direction,
    /// The receiving institution.
    pub to: InstitutionId,
    /// Why the resident is referred.
    pub reason: String,
    /// Routine, or priority ("green channel").
    pub urgency: Urgency,
    /// The handover summary for the receiving clinicians.
    pub handover: String,
}

/// A typed edit of a referral. This is also the JSON form apps send through the API.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum ReferralOp {
    /// The receiver accepts.
    Accept,
    /// The receiver declines, saying why (the sender's clinician acts on it).
    Decline {
        /// Why the receiver cannot take the resident.
        reason: String,
    },
    /// The receiver books an appointment.
    Schedule {
        /// When the resident is expected.
        appointment: Timestamp,
        /// How long the slot is booked for, in minutes (1 to `APPOINTMENT_MINUTES_MAX`).
        /// Optional, as earlier releases booked without it; a FHIR `Appointment` is served
        /// only for a booking that has it (R4 requires a booked appointment's end).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minutes: Option<u64>,
    },
    /// The receiver books another appointment for a referral already booked, or after the
    /// resident did not come.
    Reschedule {
        /// When the resident is expected now.
        appointment: Timestamp,
        /// How long the slot is booked for, in minutes, as for `schedule`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        minutes: Option<u64>,
    },
    /// The receiver records that the resident did not come to the appointment.
    MarkNoShow,
    /// The receiver passes the referral on to another member, which it cannot serve (see the
    /// module docs); the node sends the onward referral.
    Redirect {
        /// The member the resident is sent on to (neither side of this referral).
        to: InstitutionId,
        /// Why the receiver passes it on.
        reason: String,
    },
    /// The receiver records the resident's arrival.
    MarkArrived,
    /// The receiver completes its care.
    Complete,
    /// The sender withdraws the referral (only before arrival).
    Cancel,
    /// The sender rewrites the handover summary.
    EditHandover {
        /// The new summary.
        handover: String,
    },
    /// The sender changes the urgency.
    SetUrgency {
        /// The new urgency.
        urgency: Urgency,
    },
    /// The receiver writes (or rewrites) the return summary: what was done and what the
    /// sender's clinicians should do next, when care completes or the resident goes back
    /// down for recovery.
    WriteReturnSummary {
        /// The summary.
        summary: String,
    },
}

impl ReferralOp {
    /// What the operation does: the one exhaustive match over operations.
    fn intent(&self) -> Intent<'_> {
        match self {
            ReferralOp::Accept => Intent::Transition(ReferralStatus::Accepted),
            ReferralOp::Decline { .. } => Intent::Transition(ReferralStatus::Declined),
            ReferralOp::Schedule { .. } | ReferralOp::Reschedule { .. } => {
                Intent::Transition(ReferralStatus::Scheduled)
            }
            ReferralOp::MarkNoShow => Intent::Transition(ReferralStatus::NoShow),
            ReferralOp::Redirect { .. } => Intent::Transition(ReferralStatus::Redirected),
            ReferralOp::MarkArrived => Intent::Transition(ReferralStatus::Arrived),
            ReferralOp::Complete => Intent::Transition(ReferralStatus::Completed),
            ReferralOp::Cancel => Intent::Transition(ReferralStatus::Cancelled),
            ReferralOp::EditHandover { handover } => Intent::SenderEdit("handover", handover),
            ReferralOp::SetUrgency { urgency } => Intent::SenderEdit("urgency", urgency.as_str()),
            ReferralOp::WriteReturnSummary { summary } => {
                Intent::ReceiverEdit("return_summary", summary)
            }
        }
    }
}

/// A referral operation: a status transition, or an edit of a field only one side writes.
enum Intent<'a> {
    Transition(ReferralStatus),
    SenderEdit(&'static str, &'a str),
    ReceiverEdit(&'static str, &'a str),
}

/// One status event in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct EventView {
    /// The event's id.
    pub entry: EntryId,
    /// The institution that made the transition.
    pub institution: InstitutionId,
    /// When (the writer's clock).
    pub at: Timestamp,
    /// Status moved from.
    pub from: ReferralStatus,
    /// Status moved to.
    pub to: ReferralStatus,
    /// The latest events its writer held.
    pub after: Vec<EntryId>,
    /// The booked appointment, on a move to `scheduled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appointment: Option<Timestamp>,
    /// How long the booked slot is, in minutes, when the booking said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minutes: Option<u64>,
    /// Why, on a move to `declined` (declines of earlier releases have none) or to
    /// `redirected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The member the resident is sent on to, on a move to `redirected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<InstitutionId>,
}

/// A referral as apps see it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ReferralView {
    /// The document id.
    pub id: DocumentId,
    /// The resident's health file.
    pub patient: DocumentId,
    /// Up or down.
    pub direction: Direction,
    /// Sending institution.
    pub from: InstitutionId,
    /// Receiving institution.
    pub to: InstitutionId,
    /// When it was sent.
    pub created_at: Timestamp,
    /// The referral this one passes on, when a receiver redirected that one here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirected_from: Option<DocumentId>,
    /// Why.
    pub reason: String,
    /// How urgent, with concurrent settings.
    pub urgency: Register<Urgency>,
    /// Handover summary, with concurrent versions.
    pub handover: Register<String>,
    /// The receiver's return (discharge) summary, with concurrent versions, once written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_summary: Option<Register<String>>,
    /// The derived status.
    pub status: ReferralStatus,
    /// Where the receiver sent the resident on, when the status is `redirected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirected_to: Option<InstitutionId>,
    /// The appointment on the effective path, if one was booked.
    pub appointment: Option<Timestamp>,
    /// How long that appointment's slot is, in minutes, when its booking said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub appointment_minutes: Option<u64>,
    /// The events that make up the effective path, oldest first.
    pub effective: Vec<EntryId>,
    /// Every event, in causal (event id) order.
    pub history: Vec<EventView>,
}

impl ReferralView {
    /// The role `institution` plays in this referral, if any.
    pub fn role_of(&self, institution: &InstitutionId) -> Option<Role> {
        if *institution == self.from {
            Some(Role::Sender)
        } else if *institution == self.to {
            Some(Role::Receiver)
        } else {
            None
        }
    }

    /// Transitions that were made but lost to a concurrent one, for a clinician to review.
    pub fn superseded(&self) -> Vec<&EventView> {
        self.history
            .iter()
            .filter(|e| !self.effective.contains(&e.entry))
            .collect()
    }

    /// The fields holding concurrent values for review.
    pub fn conflicts(&self) -> Vec<String> {
        let mut fields = Vec::new();
        if self.urgency.is_conflicted() {
            fields.push("urgency".to_string());
        }
        if self.handover.is_conflicted() {
            fields.push("handover".to_string());
        }
        if self
            .return_summary
            .as_ref()
            .is_some_and(Register::is_conflicted)
        {
            fields.push("return_summary".to_string());
        }
        fields
    }
}

/// A referral: one automerge document behind typed operations.
#[derive(Debug)]
pub struct Referral {
    doc: AutoCommit,
    id: DocumentId,
}

replica!(
    Referral,
    DocumentKind::Referral,
    ReferralView,
    parse_referral
);

const ROOT_KEYS: [&str; 13] = [
    IDENTITY_KEYS[0],
    IDENTITY_KEYS[1],
    "patient",
    "direction",
    "from",
    "to",
    "created_at",
    "reason",
    "urgency",
    "handover",
    "events",
    "return_summary",
    "redirected_from",
];

impl Referral {
    /// Sends a referral from the editor's institution, as one change.
    ///
    /// The referral's id is derived from this first change (see [`crate::document_id_of`]).
    pub fn create(actor: &Actor, editor: &Editor, referral: &NewReferral) -> Result<Self, OpError> {
        Self::create_from(actor, editor, referral, None)
    }

    fn create_from(
        actor: &Actor,
        editor: &Editor,
        referral: &NewReferral,
        redirected_from: Option<DocumentId>,
    ) -> Result<Self, OpError> {
        if referral.to == editor.institution {
            return Err(ValidationError::InvalidValue {
                field: "to",
                reason: "a referral goes to another institution",
            }
            .into());
        }
        check_text(&referral.reason, "reason", FIELD_BYTES_MAX, true)?;
        check_text(&referral.handover, "handover", SUMMARY_BYTES_MAX, false)?;
        Self::create_with(actor, editor, |tx| {
            let root = automerge::ROOT;
            tx.put(&root, "patient", referral.patient.to_string())?;
            tx.put(&root, "direction", referral.direction.as_str())?;
            tx.put(&root, "from", editor.institution.as_str())?;
            tx.put(&root, "to", referral.to.as_str())?;
            put_time(tx, &root, "created_at", editor.at)?;
            tx.put(&root, "reason", referral.reason.as_str())?;
            tx.put(&root, "urgency", referral.urgency.as_str())?;
            tx.put(&root, "handover", referral.handover.as_str())?;
            tx.put_object(&root, "events", ObjType::List)?;
            if let Some(original) = redirected_from {
                tx.put(&root, "redirected_from", original.to_string())?;
            }
            Ok(())
        })
    }

    /// The onward referral of a redirect: from the redirecting institution (the editor, the
    /// receiver of `original`) to `to`, for the same resident, direction, reason, urgency and
    /// handover, naming `original_id` as the referral it passes on. The redirect's event on
    /// the original is written apart ([`ReferralOp::Redirect`]).
    pub fn create_onward(
        actor: &Actor,
        editor: &Editor,
        original_id: DocumentId,
        original: &ReferralView,
        to: &InstitutionId,
    ) -> Result<Self, OpError> {
        if original.to != editor.institution {
            return Err(ValidationError::Provenance {
                field: "redirected_from",
            }
            .into());
        }
        let onward = NewReferral {
            patient: original.patient,
            direction: original.direction,
            to: to.clone(),
            reason: original.reason.clone(),
            urgency: original.urgency.value,
            handover: original.handover.value.clone(),
        };
        Self::create_from(actor, editor, &onward, Some(original_id))
    }

    /// Applies one typed operation as one change. Refused with a typed error (and nothing
    /// written) when the editor may not make it or the state machine forbids it.
    pub fn apply(&mut self, editor: &Editor, op: &ReferralOp) -> Result<(), OpError> {
        let view = self.view();
        let role = view.role_of(&editor.institution);
        let to = match op.intent() {
            Intent::Transition(to) => to,
            Intent::SenderEdit(field, value) | Intent::ReceiverEdit(field, value) => {
                let side = match op.intent() {
                    Intent::ReceiverEdit(..) => Role::Receiver,
                    _ => Role::Sender,
                };
                if role != Some(side) {
                    return Err(ValidationError::Provenance { field }.into());
                }
                check_text(value, field, SUMMARY_BYTES_MAX, false)?;
                return self.transact(editor, |tx| Ok(tx.put(automerge::ROOT, field, value)?));
            }
        };
        check_transition(view.status, to, role)?;
        // A reschedule books again what was booked (or missed); a first booking is `schedule`.
        if matches!(op, ReferralOp::Reschedule { .. })
            && !matches!(
                view.status,
                ReferralStatus::Scheduled | ReferralStatus::NoShow
            )
        {
            return Err(ValidationError::IllegalTransition {
                from: view.status,
                to,
            }
            .into());
        }
        if let ReferralOp::Decline { reason } = op {
            check_text(reason, "events.reason", FIELD_BYTES_MAX, true)?;
        }
        if let ReferralOp::Redirect { to, reason } = op {
            check_text(reason, "events.reason", FIELD_BYTES_MAX, true)?;
            check_redirect(&view, to)?;
        }
        if let ReferralOp::Schedule {
            minutes: Some(minutes),
            ..
        }
        | ReferralOp::Reschedule {
            minutes: Some(minutes),
            ..
        } = op
        {
            check_minutes(*minutes)?;
        }
        let events = index_events(&view.history);
        let all: BTreeSet<EntryId> = events.keys().cloned().collect();
        let after = frontier(&events, &all);
        self.transact(editor, |tx| {
            let mut event = NewEntry::default();
            event
                .put("institution", editor.institution.as_str())
                .time("at", editor.at)
                .put("from", view.status.as_str())
                .put("to", to.as_str())
                .scalars("after", after.iter().map(|id| id.as_str().into()).collect());
            match op {
                ReferralOp::Schedule {
                    appointment,
                    minutes,
                }
                | ReferralOp::Reschedule {
                    appointment,
                    minutes,
                } => {
                    event.time("appointment", *appointment);
                    if let Some(minutes) = minutes {
                        event.put("minutes", *minutes);
                    }
                }
                ReferralOp::Decline { reason } => {
                    event.put("reason", reason.as_str());
                }
                ReferralOp::Redirect { to, reason } => {
                    event
                        .put("redirect", to.as_str())
                        .put("reason", reason.as_str());
                }
                _ => {}
            }
            append_entry(
                tx,
                &automerge::ROOT,
                "events",
                "events",
                REFERRAL_EVENTS_MAX,
                event,
            )?;
            Ok(())
        })
    }
}

/// Checks one transition against the state machine and the authority rules.
fn check_transition(
    from: ReferralStatus,
    to: ReferralStatus,
    role: Option<Role>,
) -> Result<(), ValidationError> {
    let required = to.authorised_role();
    if role != Some(required) {
        return Err(ValidationError::NotAuthorised { to, required });
    }
    if !from.may_move_to(to) {
        return Err(ValidationError::IllegalTransition { from, to });
    }
    Ok(())
}

/// Orders events by their automerge op id (counter, then actor): a writer's event always sorts
/// after every event it had seen.
fn order_key(entry: &EntryId) -> (u64, &str) {
    let (counter, actor) = entry
        .as_str()
        .split_once('@')
        .unwrap_or(("0", entry.as_str()));
    (counter.parse().unwrap_or(0), actor)
}

fn index_events(history: &[EventView]) -> BTreeMap<EntryId, &EventView> {
    history.iter().map(|e| (e.entry.clone(), e)).collect()
}

/// The events of `set` that no other event of `set` names as seen.
fn frontier(events: &BTreeMap<EntryId, &EventView>, set: &BTreeSet<EntryId>) -> Vec<EntryId> {
    let named: BTreeSet<&EntryId> = set
        .iter()
        .filter_map(|id| events.get(id))
        .flat_map(|e| e.after.iter())
        .collect();
    let mut tips: Vec<EntryId> = set
        .iter()
        .filter(|id| !named.contains(id))
        .cloned()
        .collect();
    tips.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    tips
}

/// Every event reachable from `start` through `after` links, `start` included.
fn closure(events: &BTreeMap<EntryId, &EventView>, start: &[EntryId]) -> BTreeSet<EntryId> {
    let mut seen = BTreeSet::new();
    let mut stack: Vec<&EntryId> = start.iter().collect();
    while let Some(id) = stack.pop() {
        if seen.insert(id.clone())
            && let Some(event) = events.get(id)
        {
            stack.extend(event.after.iter());
        }
    }
    seen
}

/// The winning frontier event of a causally closed set (None for the empty set).
fn winner<'e>(
    events: &BTreeMap<EntryId, &'e EventView>,
    set: &BTreeSet<EntryId>,
) -> Option<&'e EventView> {
    frontier(events, set)
        .iter()
        .filter_map(|id| events.get(id).copied())
        .max_by(|a, b| {
            (a.to.precedence(), order_key(&a.entry)).cmp(&(b.to.precedence(), order_key(&b.entry)))
        })
}

/// The status derived from a causally closed set of events.
fn derive(events: &BTreeMap<EntryId, &EventView>, set: &BTreeSet<EntryId>) -> ReferralStatus {
    winner(events, set).map_or(ReferralStatus::Requested, |e| e.to)
}

/// Checks one event against the events it names: they exist, precede it, are exactly the
/// frontier of what they reach, and derive the status it starts from.
fn check_event(
    events: &BTreeMap<EntryId, &EventView>,
    event: &EventView,
) -> Result<(), ValidationError> {
    let own = order_key(&event.entry);
    for id in &event.after {
        if !events.contains_key(id) {
            return Err(ValidationError::EventReference {
                reason: "it names an event the referral does not hold",
            });
        }
        if order_key(id) >= own {
            return Err(ValidationError::EventReference {
                reason: "it names an event written after it",
            });
        }
    }
    let reached = closure(events, &event.after);
    let mut named = event.after.clone();
    named.sort_by(|a, b| order_key(a).cmp(&order_key(b)));
    if named != frontier(events, &reached) {
        return Err(ValidationError::EventReference {
            reason: "it must name exactly the latest events its writer held",
        });
    }
    let derived = derive(events, &reached);
    if derived != event.from {
        return Err(ValidationError::EventBase {
            recorded: event.from,
            derived,
        });
    }
    if event.appointment.is_some() != (event.to == ReferralStatus::Scheduled) {
        return Err(ValidationError::InvalidValue {
            field: "events.appointment",
            reason: "an appointment is recorded exactly on a move to scheduled",
        });
    }
    if let Some(minutes) = event.minutes {
        if event.appointment.is_none() {
            return Err(ValidationError::InvalidValue {
                field: "events.minutes",
                reason: "a slot's length is recorded only with its appointment",
            });
        }
        check_minutes(minutes)?;
    }
    if event.reason.is_some()
        && !matches!(
            event.to,
            ReferralStatus::Declined | ReferralStatus::Redirected
        )
    {
        return Err(ValidationError::InvalidValue {
            field: "events.reason",
            reason: "a reason is recorded only on a move to declined or redirected",
        });
    }
    let redirects = event.to == ReferralStatus::Redirected;
    if event.redirect.is_some() != redirects || (redirects && event.reason.is_none()) {
        return Err(ValidationError::InvalidValue {
            field: "events.redirect",
            reason: "a redirect names the member the resident is sent on to, and why, and only a redirect does",
        });
    }
    Ok(())
}

/// A redirect sends the resident on to a member that is neither side of the referral.
fn check_redirect(view: &ReferralView, to: &InstitutionId) -> Result<(), ValidationError> {
    if *to == view.from || *to == view.to {
        return Err(ValidationError::InvalidValue {
            field: "events.redirect",
            reason: "a referral is redirected to a member other than its sender and receiver",
        });
    }
    Ok(())
}

/// A booked slot's length is 1 to `APPOINTMENT_MINUTES_MAX` minutes.
fn check_minutes(minutes: u64) -> Result<(), ValidationError> {
    if (1..=APPOINTMENT_MINUTES_MAX).contains(&minutes) {
        Ok(())
    } else {
        Err(ValidationError::InvalidValue {
            field: "events.minutes",
            reason: "a booked slot lasts from 1 minute to a day (1,440 minutes)",
        })
    }
}

/// Parses and validates a whole referral.
pub(crate) fn parse_referral<D: ReadDoc>(doc: &D) -> Result<ReferralView, ValidationError> {
    if read_identity(doc)? != DocumentKind::Referral {
        return Err(ValidationError::UnknownDocumentType);
    }
    let root = Obj::root(doc);
    root.only_keys(&ROOT_KEYS)?;
    let from = root.once("from", "from", institution("from"))?;
    let to = root.once("to", "to", institution("to"))?;
    if from == to {
        return Err(ValidationError::InvalidValue {
            field: "to",
            reason: "a referral goes to another institution",
        });
    }
    let mut history = root
        .entries("events", "events", None)?
        .into_iter()
        .map(|id| parse_event(&root.child(id, "events")))
        .collect::<Result<Vec<_>, _>>()?;
    history.sort_by(|a, b| order_key(&a.entry).cmp(&order_key(&b.entry)));

    let events = index_events(&history);
    for event in &history {
        check_event(&events, event)?;
        let role = if event.institution == from {
            Some(Role::Sender)
        } else if event.institution == to {
            Some(Role::Receiver)
        } else {
            None
        };
        check_transition(event.from, event.to, role)?;
        if let Some(onward) = &event.redirect
            && (*onward == from || *onward == to)
        {
            return Err(ValidationError::InvalidValue {
                field: "events.redirect",
                reason: "a referral is redirected to a member other than its sender and receiver",
            });
        }
    }
    let all: BTreeSet<EntryId> = events.keys().cloned().collect();
    let (status, effective, booking) = effective_path(&events, &all);
    let redirected_to = effective
        .last()
        .and_then(|last| events.get(last))
        .filter(|event| event.to == ReferralStatus::Redirected)
        .and_then(|event| event.redirect.clone());
    drop(events);

    Ok(ReferralView {
        // The id is not content: it is derived from the creation change by the replica.
        id: DocumentId::from_bytes([0; 16]),
        patient: root.once(
            "patient",
            "patient",
            checked("patient", |t, _| DocumentId::parse(t)),
        )?,
        direction: root.once(
            "direction",
            "direction",
            checked("direction", Direction::parse),
        )?,
        from,
        to,
        created_at: root.once("created_at", "created_at", timestamp("created_at"))?,
        redirected_from: root.once_opt(
            "redirected_from",
            "redirected_from",
            checked("redirected_from", |t, _| DocumentId::parse(t)),
        )?,
        reason: root.once("reason", "reason", text("reason", FIELD_BYTES_MAX, true))?,
        urgency: root.required("urgency", "urgency", checked("urgency", Urgency::parse))?,
        handover: root.required(
            "handover",
            "handover",
            text("handover", SUMMARY_BYTES_MAX, false),
        )?,
        return_summary: root.register(
            "return_summary",
            "return_summary",
            text("return_summary", SUMMARY_BYTES_MAX, false),
        )?,
        status,
        redirected_to,
        appointment: booking.map(|(at, _)| at),
        appointment_minutes: booking.and_then(|(_, minutes)| minutes),
        effective,
        history,
    })
}

/// Follows winners back from the whole set: the derived status, the effective path (oldest
/// first) and the last appointment booked on it, with its slot's length if the booking gave
/// one.
#[allow(clippy::type_complexity)]
fn effective_path(
    events: &BTreeMap<EntryId, &EventView>,
    all: &BTreeSet<EntryId>,
) -> (
    ReferralStatus,
    Vec<EntryId>,
    Option<(Timestamp, Option<u64>)>,
) {
    let status = derive(events, all);
    let mut path = Vec::new();
    let mut appointment = None;
    let mut set = all.clone();
    while let Some(event) = winner(events, &set) {
        if appointment.is_none() {
            appointment = event.appointment.map(|at| (at, event.minutes));
        }
        path.push(event.entry.clone());
        set = closure(events, &event.after);
    }
    path.reverse();
    (status, path, appointment)
}

fn parse_event<D: ReadDoc>(event: &Obj<'_, D>) -> Result<EventView, ValidationError> {
    event.only_keys(&[
        "institution",
        "at",
        "from",
        "to",
        "after",
        "appointment",
        "minutes",
        "reason",
        "redirect",
    ])?;
    let after_list = event.once(
        "after",
        "events.after",
        crate::access::object(ObjType::List, "a list"),
    )?;
    let count = event.doc.length(&after_list);
    if count > REFERRAL_EVENTS_MAX {
        return Err(ValidationError::TooMany {
            field: "events.after",
            count,
            max: REFERRAL_EVENTS_MAX,
        });
    }
    let mut after = Vec::with_capacity(count);
    for index in 0..count {
        let values =
            event
                .doc
                .get_all(&after_list, index)
                .map_err(|_| ValidationError::WrongType {
                    field: "events.after",
                    expected: "a list of event ids",
                })?;
        for (value, _) in values {
            match value {
                Value::Scalar(s) if s.as_str().is_some() => {
                    let id = EntryId::parse(s.as_str().unwrap_or_default()).map_err(|_| {
                        ValidationError::EventReference {
                            reason: "it names a malformed event id",
                        }
                    })?;
                    after.push(id);
                }
                _ => {
                    return Err(ValidationError::WrongType {
                        field: "events.after",
                        expected: "a list of event ids",
                    });
                }
            }
        }
    }
    Ok(EventView {
        entry: entry_id(&event.id),
        institution: event.once(
            "institution",
            "events.institution",
            institution("events.institution"),
        )?,
        at: event.once("at", "events.at", timestamp("events.at"))?,
        from: event.once(
            "from",
            "events.from",
            checked("events.from", ReferralStatus::parse),
        )?,
        to: event.once(
            "to",
            "events.to",
            checked("events.to", ReferralStatus::parse),
        )?,
        after,
        appointment: event.once_opt(
            "appointment",
            "events.appointment",
            timestamp("events.appointment"),
        )?,
        minutes: event.once_opt("minutes", "events.minutes", uint("events.minutes"))?,
        reason: event.once_opt(
            "reason",
            "events.reason",
            text("events.reason", FIELD_BYTES_MAX, true),
        )?,
        redirect: event.once_opt(
            "redirect",
            "events.redirect",
            institution("events.redirect"),
        )?,
    })
}

/// Checks what a change may do to a referral given what it saw (`before`): fixed fields stay
/// fixed, events are append-only, new events are the author's own and start from exactly the
/// events it held, only the sender edits the handover and urgency, and only the receiver the
/// return summary.
pub(crate) fn check_change(
    before: &ReferralView,
    after: &ReferralView,
    author: &InstitutionId,
) -> Result<(), ValidationError> {
    let fixed = |v: &ReferralView| {
        (
            v.patient,
            v.direction,
            v.from.clone(),
            v.to.clone(),
            v.created_at,
            v.reason.clone(),
            v.redirected_from,
        )
    };
    if fixed(before) != fixed(after) {
        return Err(ValidationError::ImmutableChanged { field: "referral" });
    }
    let author_role = after.role_of(author);
    if (before.urgency != after.urgency || before.handover != after.handover)
        && author_role != Some(Role::Sender)
    {
        return Err(ValidationError::Provenance { field: "handover" });
    }
    if before.return_summary != after.return_summary && author_role != Some(Role::Receiver) {
        return Err(ValidationError::Provenance {
            field: "return_summary",
        });
    }
    let old: BTreeMap<&EntryId, &EventView> =
        before.history.iter().map(|e| (&e.entry, e)).collect();
    for event in &before.history {
        match after.history.iter().find(|e| e.entry == event.entry) {
            None => return Err(ValidationError::EntryRemoved { field: "events" }),
            Some(same) if same != event => {
                return Err(ValidationError::ImmutableChanged { field: "events" });
            }
            Some(_) => {}
        }
    }
    // Concurrent events may merge past the bound; a change may not add past it.
    if after.history.len() > REFERRAL_EVENTS_MAX && after.history.len() > before.history.len() {
        return Err(ValidationError::TooMany {
            field: "events",
            count: after.history.len(),
            max: REFERRAL_EVENTS_MAX,
        });
    }
    // New events, in the order written: each must build on every event held when it was.
    let mut held: Vec<EventView> = before.history.clone();
    for event in after.history.iter().filter(|e| !old.contains_key(&e.entry)) {
        if event.institution != *author {
            return Err(ValidationError::Provenance {
                field: "events.institution",
            });
        }
        let index = index_events(&held);
        let all: BTreeSet<EntryId> = index.keys().cloned().collect();
        if event.after != frontier(&index, &all) {
            return Err(ValidationError::EventReference {
                reason: "it must name exactly the latest events its writer held",
            });
        }
        held.push(event.clone());
    }
    Ok(())
}
