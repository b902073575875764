//! One resident registered twice: linked health files read as one record.
//!
//! A file's `link` register ([`FileLink`]) names another file of the same resident, the one
//! holding the resident's main record. Files linked to one another, directly or through
//! others, form a *group*, and a read through any file of the group shows the group's
//! combined record ([`CombinedRecord`]): every entry of every file, and each register (a
//! demographic field, the contract, the statement of no known allergies) with the values of
//! every file, those that differ shown as values to review. Nothing is dropped: two
//! registrations of one resident hold different allergies more often than not.
//!
//! The group and its main file are a function of the files held: links are registers, so
//! every replica holding the same files reads the same group, whatever order links, unlinks
//! and edits arrived in.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::access::Register;
use crate::health_file::{FileLink, HealthFileView};
use crate::ids::{DocumentId, EntryId};

/// Most files read as one resident's record, in files. A group is a resident registered a
/// few times; a larger one is read up to this many files, the rest named as missing.
pub const LINKED_FILES_MAX: usize = 16;

/// The file a file is linked to now: its link's value shown by default, unless it is an
/// unlink or names the file itself.
pub fn linked_to(id: DocumentId, view: &HealthFileView) -> Option<DocumentId> {
    view.link
        .as_ref()
        .and_then(|link| link.value.to)
        .filter(|to| *to != id)
}

/// The files of a group, found from one of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group<V> {
    /// The file holding the resident's main record: following links from the file the group
    /// was found from, the first file read here with no link; where links make a cycle (two
    /// files linked to each other concurrently), the smallest id on it.
    pub main: DocumentId,
    /// The files read, main first, then in id order, each with its view.
    pub files: Vec<(DocumentId, V)>,
    /// Files of the group found but not read here: not held (yet), or found beyond
    /// [`LINKED_FILES_MAX`] (the files only they link to are not found at all).
    pub missing: Vec<DocumentId>,
}

/// Finds the group of `start`, reading at most [`LINKED_FILES_MAX`] files: `read` gives a
/// file's view (`None` when it is not held here), `linked_from` the files whose link names a
/// file. Files are visited breadth first in id order, so the answer depends only on the files
/// held. `None` when `start` itself is not held.
pub fn find_group<V, E>(
    start: DocumentId,
    mut read: impl FnMut(DocumentId) -> Result<Option<V>, E>,
    mut linked_from: impl FnMut(DocumentId) -> Result<Vec<DocumentId>, E>,
) -> Result<Option<Group<V>>, E>
where
    V: AsRef<HealthFileView>,
{
    let Some(first) = read(start)? else {
        return Ok(None);
    };
    let mut held: BTreeMap<DocumentId, V> = BTreeMap::new();
    let mut missing = BTreeSet::new();
    let mut seen = BTreeSet::from([start]);
    let mut queue = VecDeque::from([(start, Some(first))]);
    while let Some((id, view)) = queue.pop_front() {
        // Beyond the bound a file is not read at all.
        let view = match view {
            Some(view) => Some(view),
            None if held.len() < LINKED_FILES_MAX => read(id)?,
            None => None,
        };
        let Some(view) = view else {
            missing.insert(id);
            continue;
        };
        let mut next: BTreeSet<DocumentId> = linked_from(id)?.into_iter().collect();
        next.extend(linked_to(id, view.as_ref()));
        for other in next {
            if seen.insert(other) {
                queue.push_back((other, None));
            }
        }
        held.insert(id, view);
    }
    let main = main_of(start, &held);
    let mut files = Vec::with_capacity(held.len());
    if let Some(view) = held.remove(&main) {
        files.push((main, view));
    }
    files.extend(held);
    Ok(Some(Group {
        main,
        files,
        missing: missing.into_iter().collect(),
    }))
}

/// Follows links from `start` among the files read: the first with no link (or whose link
/// leaves the files read), or the smallest id on a cycle.
fn main_of<V: AsRef<HealthFileView>>(
    start: DocumentId,
    held: &BTreeMap<DocumentId, V>,
) -> DocumentId {
    let mut path = vec![start];
    loop {
        let current = path[path.len() - 1];
        let next = held
            .get(&current)
            .and_then(|view| linked_to(current, view.as_ref()))
            .filter(|to| held.contains_key(to));
        let Some(next) = next else {
            return current;
        };
        if let Some(at) = path.iter().position(|id| *id == next) {
            return path[at..].iter().copied().min().unwrap_or(next);
        }
        path.push(next);
    }
}

/// One resident's record read through the files of a group.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct CombinedRecord {
    /// The file holding the resident's main record (see [`Group::main`]).
    pub main: DocumentId,
    /// The files read, main first, then in id order.
    pub files: Vec<DocumentId>,
    /// Files of the group found but not read here (see [`Group::missing`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<DocumentId>,
    /// Each file's link, by file, for the files read that were ever linked or unlinked.
    pub links: BTreeMap<DocumentId, Register<FileLink>>,
    /// The file each entry of a file other than the main one is in: where an operation on the
    /// entry is sent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub entry_files: BTreeMap<EntryId, DocumentId>,
    /// The record: with `main`'s id, every register holding the values of every file (the
    /// main file's first; a value of another file that differs from those shown as a value to
    /// review), and every list holding the entries of every file, the main file's first.
    pub view: HealthFileView,
}

impl CombinedRecord {
    /// Combines the files of a group (main first, as [`find_group`] gives them); `None` for
    /// a group of no file.
    pub fn of<V: AsRef<HealthFileView>>(group: &Group<V>) -> Option<Self> {
        let views: Vec<&HealthFileView> = group.files.iter().map(|(_, v)| v.as_ref()).collect();
        let (first, rest) = views.split_first()?;
        let mut view = (*first).clone();
        view.id = group.main;
        let d = &mut view.demographics;
        merge_required(&mut d.name, rest.iter().map(|v| &v.demographics.name));
        merge_required(&mut d.sex, rest.iter().map(|v| &v.demographics.sex));
        merge_required(
            &mut d.birth_date,
            rest.iter().map(|v| &v.demographics.birth_date),
        );
        merge(&mut d.phone, rest.iter().map(|v| &v.demographics.phone));
        merge(&mut d.address, rest.iter().map(|v| &v.demographics.address));
        merge(
            &mut d.national_id,
            rest.iter().map(|v| &v.demographics.national_id),
        );
        merge(
            &mut d.insurance,
            rest.iter().map(|v| &v.demographics.insurance),
        );
        merge(&mut view.contract, rest.iter().map(|v| &v.contract));
        merge(
            &mut view.no_known_allergies,
            rest.iter().map(|v| &v.no_known_allergies),
        );
        let mut entry_files = BTreeMap::new();
        for ((file, _), other) in group.files.iter().skip(1).zip(rest) {
            let mut held_here = |entry: &EntryId| entry_files.insert(entry.clone(), *file);
            other.allergies.iter().for_each(|e| _ = held_here(&e.entry));
            other.problems.iter().for_each(|e| _ = held_here(&e.entry));
            other
                .medications
                .iter()
                .for_each(|e| _ = held_here(&e.entry));
            other
                .encounters
                .iter()
                .for_each(|e| _ = held_here(&e.entry));
            other.exams.iter().for_each(|e| _ = held_here(&e.entry));
            other
                .follow_ups
                .iter()
                .for_each(|e| _ = held_here(&e.entry));
            view.allergies.extend(other.allergies.iter().cloned());
            view.problems.extend(other.problems.iter().cloned());
            view.medications.extend(other.medications.iter().cloned());
            view.encounters.extend(other.encounters.iter().cloned());
            view.exams.extend(other.exams.iter().cloned());
            view.follow_ups.extend(other.follow_ups.iter().cloned());
        }
        let links = group
            .files
            .iter()
            .filter_map(|(id, v)| Some((*id, v.as_ref().link.clone()?)))
            .collect();
        Some(Self {
            main: group.main,
            files: group.files.iter().map(|(id, _)| *id).collect(),
            missing: group.missing.clone(),
            links,
            entry_files,
            view,
        })
    }
}

/// Adds to `into` the values of `others` it does not show yet, as values to review.
fn merge_required<'a, T: Clone + PartialEq + 'a>(
    into: &mut Register<T>,
    others: impl Iterator<Item = &'a Register<T>>,
) {
    for other in others {
        for value in std::iter::once(&other.value).chain(&other.conflicts) {
            if into.value != *value && !into.conflicts.contains(value) {
                into.conflicts.push(value.clone());
            }
        }
    }
}

/// As [`merge_required`], for a register a file may not hold: the first file holding it gives
/// the value shown.
fn merge<'a, T: Clone + PartialEq + 'a>(
    into: &mut Option<Register<T>>,
    others: impl Iterator<Item = &'a Option<Register<T>>>,
) {
    for other in others.flatten() {
        match into {
            Some(into) => merge_required(into, std::iter::once(other)),
            None => *into = Some(other.clone()),
        }
    }
}
