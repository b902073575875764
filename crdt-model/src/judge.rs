//! Judging one change from what it wrote, at the cost of the change.
//!
//! [`crate::validate_change`] reads the whole document before and after a change: a history of
//! n changes then costs O(n²). [`judge_change`] gives the same answer from the change's own
//! operations: it finds the parts of the document they wrote (a root field, a section, a list,
//! an entry of a list), reads only those parts before and after, and applies the same rules
//! to them. Parts the change did not write are unchanged, so they break no rule and stay as
//! valid as they were. Documents that stay small (referrals, the roster) and changes that
//! write at the root (a document's creation, a container replaced) are judged whole.
//!
//! [`Judged::view`] then brings a kept view up to date the same way, reading again only what
//! the change touched.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::panic::{AssertUnwindSafe, catch_unwind};

use automerge::{
    ActorId, Change, ChangeHash, ObjId, ObjType, OpAction, OpOutline, OpRead, Prop, ReadDoc,
};

use crate::access::Obj;
use crate::at::At;
use crate::document::{DocumentKind, read_identity};
use crate::error::ValidationError;
use crate::ids::InstitutionId;
use crate::written::Written;
use crate::{View, health_file, validate_change_view, view};

/// The parts of a document one change wrote.
#[derive(Debug, Default)]
pub(crate) struct Touch {
    /// A root field other than a section or list, or a place it could not name: the change is
    /// judged against the whole document.
    pub whole: bool,
    /// The sections and lists the change wrote into, by root key, each with the entries
    /// (objects directly in it) whose content the change wrote. A list named here with no
    /// entries was written itself (an insert, a delete, a replaced element).
    pub under: BTreeMap<String, BTreeSet<ObjId>>,
    /// What the change wrote directly into each section or list it wrote into, by root key.
    pub direct: BTreeMap<String, DirectWrites>,
}

/// The operations of a change on a section or list object itself (not inside its entries).
#[derive(Debug, Default)]
pub(crate) struct DirectWrites {
    /// The objects it inserted into the list.
    pub inserted: BTreeSet<ObjId>,
    /// Whether it wrote the object in any other way: a delete, a replaced element, a value
    /// that is not an object, a map key.
    pub other: bool,
}

impl DirectWrites {
    /// The objects the change inserted, if inserting objects is all it did to the list: the
    /// list before it is then the list after it without them.
    pub(crate) fn only_inserted(&self) -> Option<&BTreeSet<ObjId>> {
        (!self.other).then_some(&self.inserted)
    }
}

impl Touch {
    /// Names the place of every operation of `change`, which `doc` holds. `parts` are the
    /// root keys judged by part (the root field `register` may be written at the root); any
    /// other place makes the change judged whole.
    ///
    /// An object the change itself creates is placed from the operation that made it (objects
    /// never move: `doc` would name the same parents); only objects made by earlier changes
    /// are looked up in `doc`. `places` keeps where objects live across the changes of one
    /// document judged against the same `doc`, so each is looked up once.
    fn of<'c, D: ReadDoc, P: Placed<'c>, E>(
        doc: &D,
        change: &'c Change,
        ops: impl IntoIterator<Item = Result<P, E>>,
        parts: &[&str],
        register: &str,
        places: &mut Places<'c>,
    ) -> Self {
        let mut touch = Touch::default();
        let whole = || Touch {
            whole: true,
            ..Touch::default()
        };
        let actor = change.actor_id();
        // The objects a change writes are few; what writing into each adds to `under` (and
        // to `direct`, but for inserts) is added once.
        let mut noted: Vec<(u64, &ActorId)> = Vec::new();
        // Only where each operation writes is read, not what it writes.
        for (index, op) in ops.into_iter().enumerate() {
            let Ok(op) = op else {
                return whole();
            };
            let parent = match op.obj() {
                None => match op.map_key() {
                    Some(key) => {
                        if key != register {
                            return whole();
                        }
                        touch.under.entry(key.to_string()).or_default();
                        None
                    }
                    None => return whole(),
                },
                Some(obj) => {
                    let place = match places.entry(obj) {
                        Entry::Occupied(known) => known.into_mut(),
                        Entry::Vacant(unknown) => {
                            let Some(place) = place(doc, &object_id(obj.0, obj.1)) else {
                                return whole();
                            };
                            unknown.insert(place)
                        }
                    };
                    if !noted.contains(&obj) {
                        if !parts.contains(&place.key.as_str()) {
                            return whole();
                        }
                        let entries = touch.under.entry(place.key.clone()).or_default();
                        entries.extend(place.entry.clone());
                        noted.push(obj);
                    }
                    if place.depth == 1 {
                        let direct = match touch.direct.get_mut(place.key.as_str()) {
                            Some(direct) => direct,
                            None => touch.direct.entry(place.key.clone()).or_default(),
                        };
                        match (op.makes(), op.inserts()) {
                            (Some(_), true) => {
                                let made = object_id(change.start_op().get() + index as u64, actor);
                                direct.inserted.insert(made);
                            }
                            _ => direct.other = true,
                        }
                    }
                    Some(&*place)
                }
            };
            if op.makes().is_some() {
                let counter = change.start_op().get() + index as u64;
                let place = match (parent, op.map_key()) {
                    (None, Some(key)) => Place {
                        key: key.to_string(),
                        depth: 1,
                        entry: None,
                    },
                    (None, None) => continue,
                    (Some(parent), _) => Place {
                        entry: match parent.depth {
                            1 => Some(object_id(counter, actor)),
                            _ => parent.entry.clone(),
                        },
                        key: parent.key.clone(),
                        depth: parent.depth + 1,
                    },
                };
                // An object id already placed is an op id used twice (honest changes never
                // do): judged whole rather than placed again.
                if places.insert((counter, actor), place).is_some() {
                    return whole();
                }
            }
        }
        touch
    }
}

/// Where an operation of a change writes, as [`Touch::of`] reads it: from `Change::outline`,
/// or from `Change::ops` where what it writes is read too.
trait Placed<'c> {
    /// The object it writes into (`None`: the root), as the operation that made it.
    fn obj(&self) -> Option<(u64, &'c ActorId)>;
    /// The key it writes in a map.
    fn map_key(&self) -> Option<&str>;
    /// Whether it inserts into a sequence.
    fn inserts(&self) -> bool;
    /// The type of object it makes, if it makes one.
    fn makes(&self) -> Option<ObjType>;
}

impl<'c> Placed<'c> for OpOutline<'c> {
    fn obj(&self) -> Option<(u64, &'c ActorId)> {
        self.obj
    }
    fn map_key(&self) -> Option<&str> {
        OpOutline::map_key(self)
    }
    fn inserts(&self) -> bool {
        self.insert
    }
    fn makes(&self) -> Option<ObjType> {
        self.make
    }
}

impl<'c> Placed<'c> for &OpRead<'c> {
    fn obj(&self) -> Option<(u64, &'c ActorId)> {
        self.obj
    }
    fn map_key(&self) -> Option<&str> {
        OpRead::map_key(self)
    }
    fn inserts(&self) -> bool {
        self.insert
    }
    fn makes(&self) -> Option<ObjType> {
        match self.action {
            OpAction::Make(kind) => Some(kind),
            _ => None,
        }
    }
}

/// Where objects live, by the operation that made each (its counter and actor): kept while
/// the changes of one document are judged against one state of it (objects never move).
type Places<'c> = BTreeMap<(u64, &'c ActorId), Place>;

/// Where an object lives: the root key its path starts from, how many objects deep it is
/// (1: directly at the root), and, deeper than a section or list, the object directly in that
/// section or list on its path (its entry).
#[derive(Clone, Debug)]
struct Place {
    key: String,
    depth: usize,
    entry: Option<ObjId>,
}

/// The external id of the object created by operation `counter@actor`. The actor index it
/// carries is only a hint: reads look the actor up when the hint does not match.
fn object_id(counter: u64, actor: &ActorId) -> ObjId {
    ObjId::Id(counter, actor.clone(), usize::MAX)
}

/// Where `obj` lives in `doc`. `None` if the object cannot be placed.
fn place<D: ReadDoc>(doc: &D, obj: &ObjId) -> Option<Place> {
    // automerge asserts on objects it cannot find; a change it applied names only objects it
    // holds, but a place not found is refused, not a crash.
    let chain: Vec<automerge::Parent> =
        catch_unwind(AssertUnwindSafe(|| doc.parents(obj).map(Iterator::collect)))
            .ok()?
            .ok()?;
    let top = chain.last()?;
    if top.obj != automerge::ROOT {
        return None;
    }
    let Prop::Map(key) = &top.prop else {
        return None;
    };
    let entry = match chain.len() {
        1 => None,
        2 => Some(obj.clone()),
        n => Some(chain[n - 3].obj.clone()),
    };
    Some(Place {
        key: key.clone(),
        depth: chain.len(),
        entry,
    })
}

/// What [`judge_change`] found: the change is allowed, what it touched, and what was read at
/// the change's own state.
pub struct Judged {
    kind: DocumentKind,
    touch: Touch,
    after: After,
}

/// What judging a change read at the change's own state.
enum After {
    /// The whole view (a change judged whole).
    Whole(Box<View>),
    /// The parts the change touched (see [`health_file::view_after`]).
    Parts(Box<health_file::AfterParts>),
}

impl std::fmt::Debug for Judged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Judged")
            .field("kind", &self.kind)
            .field("touch", &self.touch)
            .finish_non_exhaustive()
    }
}

impl Judged {
    /// The kind of the document.
    pub fn kind(&self) -> DocumentKind {
        self.kind
    }

    /// Whether the change wrote into the part of the document under root key `key` (a
    /// section, a list, the root register); `None` when it was judged whole, which tells
    /// nothing of where it wrote.
    pub fn wrote(&self, key: &str) -> Option<bool> {
        (!self.touch.whole).then(|| self.touch.under.contains_key(key))
    }

    /// The view of `doc` now, where `doc` holds the judged change (applied last, or merged
    /// with changes it was concurrent with), and `previous` is the view of `doc` before the
    /// change was applied. Only what the change touched is read again; the rest of `previous`
    /// moves over. Without `previous`, or for a change judged whole, `doc` is read whole.
    ///
    /// Fails if the merged state breaks the model (per-change checks keep merged states valid;
    /// this checks rather than assumes).
    pub fn view<D: ReadDoc>(
        &self,
        doc: &D,
        previous: Option<View>,
    ) -> Result<View, ValidationError> {
        match (self.kind, previous) {
            (DocumentKind::HealthFile, Some(View::HealthFile(previous))) if !self.touch.whole => {
                health_file::update_view(doc, &self.touch, *previous)
                    .map(|view| View::HealthFile(Box::new(view)))
            }
            _ => view(doc),
        }
    }

    /// The view of `doc`, which holds exactly the judged change and its ancestors (the change
    /// is its only head), given `previous`, the view at exactly the change's dependencies:
    /// made from what judging read, reading `doc` again only where that is not enough (no
    /// `previous`). The same as [`Judged::view`] on such a `doc`, at the cost of nothing read.
    pub fn view_at_change<D: ReadDoc>(
        self,
        doc: &D,
        previous: Option<View>,
    ) -> Result<View, ValidationError> {
        match self.into_view_at_change(previous) {
            Some(view) => Ok(view),
            None => view(doc),
        }
    }

    /// The view at the change's own state (the document at exactly the change and its
    /// ancestors), given `previous`, the view at exactly the change's dependencies: made from
    /// what judging read, with no read of the document. `None` where that is not enough (no
    /// or another kind of `previous` for a change judged by its parts).
    fn into_view_at_change(self, previous: Option<View>) -> Option<View> {
        match (self.after, previous) {
            (After::Whole(view), _) => Some(*view),
            (After::Parts(parts), Some(View::HealthFile(previous))) => {
                health_file::view_after(*parts, *previous).map(|v| View::HealthFile(Box::new(v)))
            }
            (After::Parts(_), _) => None,
        }
    }
}

/// Judges `change` as [`validate_change`](crate::validate_change) would, given that `doc`
/// holds exactly the change and its ancestors (the change is its only head) and that the
/// document at the change's dependencies is valid (every state a replica accepted is).
///
/// A health file's change costs what the change wrote: the entries it adds or writes into are
/// read before and after it; the entry ids of a list it inserts into or deletes from are read
/// (no entry is parsed for that); nothing else is read. The answer, and the error reported, is
/// the same as `validate_change`'s on the document before and after the change.
pub fn judge_change<D: ReadDoc>(
    doc: &D,
    change: &Change,
    author: &InstitutionId,
) -> Result<Judged, ValidationError> {
    judge_change_of_kind(doc, change, author, None)
}

/// [`judge_change`] for a change to a document its holder holds as of `kind`, when it knows
/// it (`None`: the kind is read at the change's dependencies): every state a replica
/// accepted has the kind the document was created with (a change that writes another kind is
/// refused, see [`judge_history`]), so the identity is not read again there. `kind` must be
/// the kind of the document at those dependencies, and the holder must have accepted those
/// under this release's `SCHEMA_VERSION` (their schema, which reading the identity also
/// checks, is then not checked again: a release that reads another schema migrates the
/// documents it holds first).
pub fn judge_change_of_kind<D: ReadDoc>(
    doc: &D,
    change: &Change,
    author: &InstitutionId,
    kind: Option<DocumentKind>,
) -> Result<Judged, ValidationError> {
    judge_at(
        doc,
        change.deps(),
        change.hash(),
        Some(change),
        author,
        kind,
    )
}

/// Judges the creation of a document, the change `hash`, as [`judge_change`] would, given
/// that `doc` holds exactly that change: for a document made here, without encoding the
/// change (automerge encodes it anew from the document on every request for it). Returns the
/// document's view.
pub fn judge_creation<D: ReadDoc>(
    doc: &D,
    hash: ChangeHash,
    author: &InstitutionId,
) -> Result<View, ValidationError> {
    let judged = judge_at(doc, &[], hash, None, author, None)?;
    judged.view_at_change(doc, None)
}

/// [`judge_change`] for the change `hash` with dependencies `deps`; `change`, which only a
/// change that is not a creation needs, is the change itself. `known`, when given, is the
/// kind the document has at `deps` (and there reads as valid), read there otherwise.
fn judge_at<D: ReadDoc>(
    doc: &D,
    deps: &[ChangeHash],
    hash: ChangeHash,
    change: Option<&Change>,
    author: &InstitutionId,
    known: Option<DocumentKind>,
) -> Result<Judged, ValidationError> {
    let before = At::new(doc, deps);
    let hash: [ChangeHash; 1] = [hash];
    let after = At::new(doc, &hash);
    let creation = deps.is_empty();
    let kind = match known {
        Some(kind) if !creation => kind,
        _ if creation => read_identity(&after)?,
        _ => read_identity(&before)?,
    };
    let touch = match change {
        Some(change) if !creation && kind == DocumentKind::HealthFile => Touch::of(
            doc,
            change,
            change.outline(),
            &health_file::PARTS,
            health_file::ROOT_REGISTER,
            &mut Places::new(),
        ),
        _ => Touch {
            whole: true,
            ..Touch::default()
        },
    };
    if touch.whole {
        let view = validate_change_view(&before, &after, author)?;
        return Ok(Judged {
            kind: view.kind(),
            touch,
            after: After::Whole(Box::new(view)),
        });
    }
    let parts = health_file::judge_touched(&before, &after, &touch, author)?;
    Ok(Judged {
        kind,
        touch,
        after: After::Parts(Box::new(parts)),
    })
}

/// The view at the creation of a document, judged as [`judge_at`] judges a creation: `doc`
/// is the document at exactly the creation, and `written` what the creation wrote, root
/// included (`Written::add`), from which it is read.
fn judge_creation_written<D: ReadDoc>(
    doc: &D,
    written: &Written,
    author: &InstitutionId,
) -> Result<View, ValidationError> {
    let view = crate::view_of(&Obj::root_written(doc, written))?;
    crate::check_creation(&view, author)?;
    Ok(view)
}

/// Why [`judge_history`] refused a history: the first change that deciding the changes one by
/// one would refuse, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRefused {
    /// Its index in the changes judged.
    pub index: usize,
    /// Why; `None` if automerge could not read the document at that change.
    pub error: Option<ValidationError>,
}

impl std::fmt::Display for HistoryRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            Some(error) => write!(
                f,
                "change {} of the history is refused: {error}",
                self.index
            ),
            None => write!(f, "change {} of the history could not be read", self.index),
        }
    }
}

impl std::error::Error for HistoryRefused {}

/// Judges a whole history in one pass, as deciding its changes one by one in the order given
/// does: each change by what it wrote, on the document as it was at that change
/// ([`judge_change`] on `doc` read at the change), and every state where concurrent changes
/// meet as a whole (the view of the document at the heads so far must read, as a decision on
/// the merged document checks). Nothing is applied or copied: `doc` already holds every
/// change.
///
/// `doc` holds exactly `changes`, given in causal order (as `get_changes(&[])` lists them);
/// `authors[i]` is the institution of `changes[i]`. Returns the view of `doc` when every
/// change would be accepted, otherwise the first that would not.
pub fn judge_history<D: ReadDoc>(
    doc: &D,
    changes: &[Change],
    authors: &[InstitutionId],
) -> Result<View, HistoryRefused> {
    // automerge asserts on some histories it cannot read; such a history is refused.
    let read = |index: usize, judge: &dyn Fn() -> Result<View, ValidationError>| match catch_unwind(
        AssertUnwindSafe(judge),
    ) {
        Ok(Ok(view)) => Ok(view),
        Ok(Err(error)) => Err(HistoryRefused {
            index,
            error: Some(error),
        }),
        Err(_) => Err(HistoryRefused { index, error: None }),
    };
    if changes.len() != authors.len() {
        return Err(HistoryRefused {
            index: changes.len().min(authors.len()),
            error: None,
        });
    }
    if let Ok(Some(view)) = catch_unwind(AssertUnwindSafe(|| judge_appends(doc, changes, authors)))
    {
        return Ok(view);
    }
    let mut heads: Vec<ChangeHash> = Vec::new();
    // The view at `heads`, while it is known without reading the whole document: each change
    // that builds on exactly the heads so far brings it forward from what judging it read.
    let mut running: Option<View> = None;
    // The document's kind, from its creation on. Every state a later change builds on has it
    // and reads as valid: a change that writes another kind or schema is refused, and
    // concurrent rewrites of the same kind, which conflict, are refused where they meet (the
    // state at the heads is read whole there, before any change can build on it). So the
    // identity is not read again at each change's dependencies.
    let mut kind: Option<DocumentKind> = None;
    for (index, (change, author)) in changes.iter().zip(authors).enumerate() {
        let at = [change.hash()];
        let judged = catch_unwind(AssertUnwindSafe(|| {
            judge_at(
                &At::new(doc, &at),
                change.deps(),
                change.hash(),
                Some(change),
                author,
                kind,
            )
        }));
        let judged = match judged {
            Ok(Ok(judged)) => judged,
            Ok(Err(error)) => {
                return Err(HistoryRefused {
                    index,
                    error: Some(error),
                });
            }
            Err(_) => return Err(HistoryRefused { index, error: None }),
        };
        kind = kind.or(Some(judged.kind));
        let on_heads = change.deps().len() == heads.len()
            && change.deps().iter().all(|dep| heads.contains(dep));
        running = if on_heads {
            judged.into_view_at_change(running.take())
        } else {
            None
        };
        heads.retain(|head| !change.deps().contains(head));
        heads.push(at[0]);
        // Concurrent changes meet here. The last state is read below, whole.
        if heads.len() > 1 {
            running = if index + 1 < changes.len() {
                Some(read(index, &|| view(&At::new(doc, &heads)))?)
            } else {
                None
            };
        }
    }
    match running {
        Some(view) => Ok(view),
        None => read(changes.len().saturating_sub(1), &|| view(doc)),
    }
}

/// [`judge_history`] for the usual history of a health file: in one line (each change builds
/// on the one before it), every change after the creation only appending entries to the
/// file's lists, each entry written by the change that appended it alone, and perhaps one
/// change writing the contract. What those changes wrote is then read once, in `doc` as it is
/// now, where it reads as it did at its own change (`health_file::view_with_appended`),
/// instead of reading the document at every change.
///
/// `Some` only where judging change by change accepts every change, with the same view.
/// `None` for any other history, and for any doubt (an entry that breaks a rule or does not
/// read): judging change by change then gives the answer, and names the change refused.
fn judge_appends<D: ReadDoc>(
    doc: &D,
    changes: &[Change],
    authors: &[InstitutionId],
) -> Option<View> {
    let (creation, rest) = changes.split_first()?;
    if !creation.deps().is_empty()
        || changes.windows(2).any(|pair| {
            // In one line, op ids only grow: each object id names one object (`Places`).
            pair[1].deps() != [pair[0].hash()] || pair[1].start_op().get() <= pair[0].max_op()
        })
    {
        return None;
    }
    // What the changes after the creation wrote, first: other histories (a referral's, a
    // file edited) are told apart here, before the creation is read.
    let mut appended = health_file::Appended::default();
    // Objects never move: `doc` names the parents the document at each change names.
    let mut places = Places::new();
    // What each change wrote into the objects it made, from the operations decoded here
    // once: each appended entry is read from there.
    let mut written = Written::default();
    for (index, change) in rest.iter().enumerate() {
        let ops = change.ops().collect::<Result<Vec<_>, _>>().ok()?;
        written.add(change, &ops, false);
        let touch = Touch::of(
            doc,
            change,
            ops.iter().map(Ok::<_, Infallible>),
            &health_file::PARTS,
            health_file::ROOT_REGISTER,
            &mut places,
        );
        if touch.whole {
            return None;
        }
        for (key, written) in &touch.under {
            if key == health_file::ROOT_REGISTER {
                // Read once, as it is now: so only if no other change wrote it since.
                if std::mem::replace(&mut appended.contract, true) {
                    return None;
                }
                continue;
            }
            let inserted = touch.direct.get(key)?.only_inserted()?;
            if !written.is_subset(inserted) {
                return None;
            }
            let list = appended.entries.entry(key.clone()).or_default();
            for entry in inserted {
                if list.insert(entry.clone(), index + 1).is_some() {
                    return None;
                }
            }
        }
    }
    // The creation, judged as change by change judges it, reading what it wrote from its
    // operations: at its own state, the document holds nothing else.
    let creation_ops = creation.ops().collect::<Result<Vec<_>, _>>().ok()?;
    written.add(creation, &creation_ops, false);
    let mut at_creation = Written::default();
    at_creation.add(creation, &creation_ops, true);
    let at = [creation.hash()];
    let created =
        judge_creation_written(&At::new(doc, &at), &at_creation, authors.first()?).ok()?;
    let View::HealthFile(created) = created else {
        return None;
    };
    health_file::view_with_appended(doc, &written, *created, &appended, authors)
        .map(|view| View::HealthFile(Box::new(view)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{editor, health_file};
    use crate::{Actor, HealthFile, HealthFileOp};
    use automerge::AutoCommit;

    /// A file created, then `encounters` encounters appended, each its own change.
    fn file_with_encounters(encounters: usize) -> AutoCommit {
        AutoCommit::load(&health_file(encounters, 0).save()).unwrap()
    }

    fn judged(doc: &mut AutoCommit) -> (Option<View>, Result<View, HistoryRefused>) {
        let changes = doc.get_changes(&[]);
        let authors = vec![InstitutionId::new("chc-jianshe").unwrap(); changes.len()];
        (
            judge_appends(doc, &changes, &authors),
            judge_history(doc, &changes, &authors),
        )
    }

    fn contract(doctor: &str) -> HealthFileOp {
        let institution = |id: &str| InstitutionId::new(id).unwrap();
        HealthFileOp::SetContract(crate::FamilyDoctorContract {
            community_centre: institution("chc-jianshe"),
            district_hospital: institution("dh-chongming-2"),
            municipal_hospital: institution("xinhua"),
            doctor_id: doctor.into(),
            doctor_name: "Shi Jianguo".into(),
            since: crate::Date::new("2024-12-03").unwrap(),
        })
    }

    /// `doc` with `op` applied as one more change.
    fn with(doc: &mut AutoCommit, op: &HealthFileOp) -> AutoCommit {
        let mut file = HealthFile::load(&doc.save(), &Actor::from_bytes(vec![1; 32])).unwrap();
        file.apply(&editor(9_000), op).unwrap();
        AutoCommit::load(&file.save()).unwrap()
    }

    #[test]
    fn a_history_of_appends_is_judged_by_its_entries_and_reads_as_the_whole_document() {
        let mut doc = file_with_encounters(5);
        // And a contract, as most files have.
        let mut doc = with(&mut doc, &contract("doc-1"));
        let (appends, history) = judged(&mut doc);
        let whole = crate::view(&doc).unwrap();
        let View::HealthFile(file) = &whole else {
            unreachable!("a health file")
        };
        assert!(file.contract.is_some());
        assert_eq!(appends.as_ref(), Some(&whole), "judged at once");
        assert_eq!(history.unwrap(), whole);

        // A contract written twice: judged change by change, as the first value is read
        // only where it was written.
        let mut twice = with(&mut doc, &contract("doc-2"));
        let (appends, history) = judged(&mut twice);
        assert!(appends.is_none());
        assert_eq!(history.unwrap(), crate::view(&twice).unwrap());
    }

    /// `doc` with one more change, written raw on its encounters list by `write`.
    fn with_raw(doc: &AutoCommit, write: fn(&mut AutoCommit, &automerge::ObjId)) -> AutoCommit {
        let mut raw = AutoCommit::load(&doc.clone().save())
            .unwrap()
            .with_actor(automerge::ActorId::from(vec![1u8; 32]));
        let (_, list) = raw.get(automerge::ROOT, "encounters").unwrap().unwrap();
        write(&mut raw, &list);
        assert!(raw.commit().is_some(), "the write was recorded");
        raw
    }

    #[test]
    fn writes_that_are_not_whole_new_entries_are_refused_at_their_own_change() {
        use automerge::ObjType;
        use automerge::transaction::Transactable;
        let doc = file_with_encounters(2);
        let writes: [fn(&mut AutoCommit, &automerge::ObjId); 3] = [
            // A list where an entry goes.
            |doc, list| {
                let end = doc.length(list);
                doc.insert_object(list, end, ObjType::List).unwrap();
            },
            // An entry with nothing in it.
            |doc, list| {
                let end = doc.length(list);
                doc.insert_object(list, end, ObjType::Map).unwrap();
            },
            // An earlier entry rewritten in another institution's name.
            |doc, list| {
                let (_, entry) = doc.get(list, 0).unwrap().unwrap();
                doc.put(&entry, "institution", "xinhua").unwrap();
            },
        ];
        for write in writes {
            let mut written = with_raw(&doc, write);
            let (appends, history) = judged(&mut written);
            assert!(appends.is_none());
            // The creation, two encounters, then this change.
            let refused = history.unwrap_err();
            assert_eq!(refused.index, 3, "{refused}");
        }
    }

    #[test]
    fn an_entry_written_again_or_in_another_name_is_judged_change_by_change() {
        // A note edited after its encounter was appended: judged change by change, accepted.
        let mut doc = file_with_encounters(3);
        let View::HealthFile(view) = crate::view(&doc).unwrap() else {
            unreachable!("a health file")
        };
        let edit = HealthFileOp::EditEncounterNote {
            entry: view.encounters[1].entry.clone(),
            note: "seen again".into(),
        };
        let mut edited = with(&mut doc, &edit);
        let (appends, history) = judged(&mut edited);
        assert!(appends.is_none());
        assert_eq!(history.unwrap(), crate::view(&edited).unwrap());

        // The appends of another institution's actor, judged as this one's: refused, at the
        // first append, as change by change refuses them.
        let changes = doc.get_changes(&[]);
        let mut authors = vec![InstitutionId::new("chc-jianshe").unwrap(); changes.len()];
        authors[2] = InstitutionId::new("xinhua").unwrap();
        assert!(judge_appends(&doc, &changes, &authors).is_none());
        let refused = judge_history(&doc, &changes, &authors).unwrap_err();
        assert_eq!(refused.index, 2, "{refused}");
    }
}
