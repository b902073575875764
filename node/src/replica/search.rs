//! Reads through the store's indexes: residents by name or national id, referrals on a desk
//! or of a patient, conflicted documents.

use super::*;
use crate::model::{Direction, ReferralStatus, Timestamp, Urgency};

impl Node {
    /// Adds to `batch` the index updates for a document's new content: its old entries out,
    /// its new ones in, atomically with the change itself.
    pub(super) fn reindex(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
        view: &crate::model::View,
    ) -> Result<(), StoreError> {
        self.set_index(batch, id, index::entries_of(&self.salt, id, view))
    }

    /// As `reindex`, after a change to a document whose index was written from `before`, its
    /// view before the change when that is kept: nothing is written when the change left the
    /// entries as they were, as most do (an encounter or a result leaves a resident's names
    /// and ids alone). A view is a function of the heads it shows, and every writer of the
    /// index writes the entries of the view of what it stores.
    pub(super) fn reindex_after(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
        before: Option<&crate::model::View>,
        view: &crate::model::View,
    ) -> Result<(), StoreError> {
        let entries = index::entries_of(&self.salt, id, view);
        if before.is_some_and(|before| index::entries_of(&self.salt, id, before) == entries) {
            return Ok(());
        }
        self.set_index(batch, id, entries)
    }

    /// Adds to `batch` the index updates that make `new` (keys, each with its value) a
    /// document's index entries. An entry holding a value is written again, as its value (a
    /// resident's summary) may have changed under the same key.
    pub(super) fn set_index(
        &self,
        batch: &mut Batch,
        id: &DocumentId,
        new: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let record_key = keys::per_document(index::RECORD, id);
        let old: Vec<Vec<u8>> = match self.store.get(&record_key)? {
            Some(bytes) => decode(&bytes, "index record")?,
            None => Vec::new(),
        };
        let keys: Vec<Vec<u8>> = new.iter().map(|(key, _)| key.clone()).collect();
        for key in old.iter().filter(|k| !keys.contains(k)) {
            batch.delete(key.clone());
        }
        for (key, value) in new {
            if !value.is_empty() || !old.contains(&key) {
                batch.put(key, value);
            }
        }
        batch.put(record_key, encode(&keys));
        Ok(())
    }

    pub(super) fn lookup(&self, prefix: &[u8]) -> Result<Vec<DocumentId>, NodeError> {
        // Only the first page of keys is read, however many match.
        let mut found: Vec<DocumentId> = self
            .store
            .scan_from(prefix, prefix, index::SEARCH_RESULTS_MAX)?
            .into_iter()
            .filter_map(|(key, _)| index::document_of(&key))
            .collect();
        found.dedup();
        Ok(found)
    }

    /// Residents whose index entries start with `prefix`, answered from the index (an entry
    /// without a summary, written by an earlier release, is answered from the file's view).
    pub(super) fn residents(&self, prefix: &[u8]) -> Result<Vec<ResidentSummary>, NodeError> {
        let mut found: Vec<ResidentSummary> = Vec::new();
        let mut seen = HashSet::new();
        for (key, value) in self
            .store
            .scan_from(prefix, prefix, index::SEARCH_RESULTS_MAX)?
        {
            let Some(id) = index::document_of(&key) else {
                continue;
            };
            if !seen.insert(id) {
                continue;
            }
            let summary = match index::summary_of(&value) {
                Some(summary) if summary.id == id => summary,
                _ => match self.view(id, DocumentKind::HealthFile)?.as_ref() {
                    View::HealthFile(view) => ResidentSummary {
                        id,
                        name: view.demographics.name.value.clone(),
                        sex: view.demographics.sex.value,
                        birth_date: view.demographics.birth_date.value.clone(),
                    },
                    _ => continue,
                },
            };
            found.push(summary);
        }
        Ok(found)
    }

    /// Residents whose name (family and given, or as written locally) starts with `name`,
    /// ignoring case and spacing, with their summaries; at most `SEARCH_RESULTS_MAX`. Answered
    /// from the index: no file is read.
    pub fn search_residents_by_name(&self, name: &str) -> Result<Vec<ResidentSummary>, NodeError> {
        if index::normalise_name(name).is_empty() {
            return Ok(Vec::new());
        }
        self.residents(&index::name_prefix(name))
    }

    /// The residents with this national id (through its salted hash), with their summaries.
    pub fn find_residents_by_national_id(
        &self,
        national_id: &str,
    ) -> Result<Vec<ResidentSummary>, NodeError> {
        self.residents(&index::national_id_prefix(&self.salt, national_id))
    }

    /// Health files that may be the same resident as `demographics`, other than `except`:
    /// the same national id (through its salted hash), or the same name (family and given, or
    /// as written locally, ignoring case and spacing) and the same birth date. What a
    /// registration warns of; at most `SEARCH_RESULTS_MAX` per way of matching, from the
    /// index (no file is read).
    pub fn duplicate_candidates(
        &self,
        demographics: &Demographics,
        except: Option<DocumentId>,
    ) -> Result<Vec<ResidentSummary>, NodeError> {
        let mut found = match &demographics.national_id {
            Some(national_id) => self.find_residents_by_national_id(national_id)?,
            None => Vec::new(),
        };
        let name = &demographics.name;
        for form in [
            format!("{} {}", name.family, name.given),
            name.text.clone().unwrap_or_default(),
        ] {
            if index::normalise_name(&form).is_empty() {
                continue;
            }
            // The whole name, not a prefix of a longer one.
            let exact = [index::name_prefix(&form), vec![0]].concat();
            found.extend(
                self.residents(&exact)?
                    .into_iter()
                    .filter(|r| r.birth_date == demographics.birth_date),
            );
        }
        found.retain(|r| Some(r.id) != except);
        found.sort_by_key(|r| r.id);
        found.dedup_by_key(|r| r.id);
        Ok(found)
    }

    /// Health files of the resident with this national id (through its salted hash).
    pub fn find_by_national_id(&self, national_id: &str) -> Result<Vec<DocumentId>, NodeError> {
        let found = self.find_residents_by_national_id(national_id)?;
        Ok(found.into_iter().map(|resident| resident.id).collect())
    }

    /// Health files whose name (family and given, or as written locally) starts with `name`,
    /// ignoring case and spacing; at most `SEARCH_RESULTS_MAX`.
    pub fn search_by_name(&self, name: &str) -> Result<Vec<DocumentId>, NodeError> {
        let found = self.search_residents_by_name(name)?;
        Ok(found.into_iter().map(|resident| resident.id).collect())
    }

    /// Referrals addressed to `to` that are in `status`, urgent first, then oldest first; at
    /// most `SEARCH_RESULTS_MAX`.
    pub fn referrals_to(
        &self,
        to: &InstitutionId,
        status: crate::model::ReferralStatus,
    ) -> Result<Vec<DocumentId>, NodeError> {
        let query = DeskQuery {
            statuses: vec![status],
            ..DeskQuery::new(to.clone(), index::Side::Receiving)
        };
        Ok(self.desk(&query)?.referrals)
    }

    /// A page of the referrals on an institution's desk that `query` asks for, in the order a
    /// desk works: priority (green channel) first, then oldest first. Every filter is a range
    /// of the desk index, so a page reads at most its own length per status and direction,
    /// however many referrals the desk holds.
    pub fn desk(&self, query: &DeskQuery) -> Result<DeskPage, NodeError> {
        let count = query.count.clamp(1, DESK_PAGE_MAX);
        let statuses: &[ReferralStatus] = if query.statuses.is_empty() {
            ReferralStatus::ALL
        } else {
            &query.statuses
        };
        let directions: Vec<Direction> = match query.direction {
            Some(direction) => vec![direction],
            None => Direction::ALL.to_vec(),
        };
        let ranks: &[u8] = match query.urgency {
            Some(Urgency::Priority) => &[0],
            Some(Urgency::Routine) => &[1],
            None => &[0, 1],
        };
        let since = query.since.map_or([0u8; 8], index::time_key);
        let until = query.until.map(index::time_key);
        let mut found: Vec<index::DeskPosition> = Vec::new();
        for &rank in ranks {
            if query.after.is_some_and(|after| after.rank > rank) {
                continue;
            }
            for &status in statuses {
                for &direction in &directions {
                    let prefix = [
                        index::desk_prefix(
                            query.institution.as_str(),
                            query.side,
                            status,
                            direction,
                        )
                        .as_slice(),
                        &[rank],
                    ]
                    .concat();
                    let mut start = [prefix.as_slice(), &since].concat();
                    if let Some(after) = query.after.filter(|after| after.rank == rank) {
                        // Just past the position the last page ended on.
                        let resume = [
                            &index::desk_prefix(
                                query.institution.as_str(),
                                query.side,
                                status,
                                direction,
                            ),
                            &after.encode()[..],
                            &[0],
                        ]
                        .concat();
                        start = start.max(resume);
                    }
                    for (key, _) in self.store.scan_from(&prefix, &start, count + 1)? {
                        let Some(position) = index::DeskPosition::decode(&key) else {
                            continue;
                        };
                        if until.is_some_and(|until| index::time_key(position.time) >= until) {
                            break;
                        }
                        found.push(position);
                    }
                }
            }
            // Every later rank sorts after a full page of this one.
            if found.len() > count {
                break;
            }
        }
        found.sort();
        let next = (found.len() > count).then(|| found[count - 1]);
        found.truncate(count);
        Ok(DeskPage {
            referrals: found.into_iter().map(|p| p.document).collect(),
            next,
        })
    }

    /// Documents holding concurrent values for a clinician to review (at most
    /// `SEARCH_RESULTS_MAX`, in id order).
    pub fn conflicted(&self) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::conflicted_prefix())
    }

    /// The kind of a document held, if held.
    pub fn kind_of(&self, id: DocumentId) -> Result<Option<DocumentKind>, NodeError> {
        Ok(self.document_record(&id)?.map(|record| record.kind))
    }

    /// The institution a node key belongs to in the current roster (revoked keys included).
    pub fn institution_of_key(&self, key: &Bytes32) -> Option<InstitutionId> {
        self.membership().institution_of(key)
    }

    /// Referrals of a resident.
    pub fn referrals_of(&self, patient: &DocumentId) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::patient_prefix(patient))
    }
}

/// Most referrals one page of a desk holds.
pub const DESK_PAGE_MAX: usize = 500;

/// What a desk asks for: its referrals on one side, filtered, a page at a time.
#[derive(Clone, Debug)]
pub struct DeskQuery {
    /// The desk's institution.
    pub institution: InstitutionId,
    /// The referrals it receives, or those it sent.
    pub side: index::Side,
    /// Only these statuses; all when empty.
    pub statuses: Vec<ReferralStatus>,
    /// Only this urgency (a referral whose urgency is in conflict counts as priority).
    pub urgency: Option<Urgency>,
    /// Only this direction.
    pub direction: Option<Direction>,
    /// Only referrals sent at or after this time.
    pub since: Option<Timestamp>,
    /// Only referrals sent before this time.
    pub until: Option<Timestamp>,
    /// Resume after this position (the `next` of the page before).
    pub after: Option<index::DeskPosition>,
    /// Referrals per page, at most `DESK_PAGE_MAX`.
    pub count: usize,
}

impl DeskQuery {
    /// Every referral on `institution`'s desk on `side`, a first page of
    /// `SEARCH_RESULTS_MAX`.
    pub fn new(institution: InstitutionId, side: index::Side) -> Self {
        Self {
            institution,
            side,
            statuses: Vec::new(),
            urgency: None,
            direction: None,
            since: None,
            until: None,
            after: None,
            count: index::SEARCH_RESULTS_MAX,
        }
    }
}

/// A page of a desk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeskPage {
    /// The referrals, in the order a desk works.
    pub referrals: Vec<DocumentId>,
    /// Where the next page starts, when there may be one.
    pub next: Option<index::DeskPosition>,
}
