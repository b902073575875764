//! Reads through the store's indexes: residents by name or national id, referrals by
//! destination or patient, conflicted documents.

use super::*;

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

    /// Adds to `batch` the index updates that make `new` a document's index keys.
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

    /// Referrals addressed to `to` that are in `status`: a referral desk's worklist.
    pub fn referrals_to(
        &self,
        to: &InstitutionId,
        status: crate::model::ReferralStatus,
    ) -> Result<Vec<DocumentId>, NodeError> {
        self.lookup(&index::destination_prefix(to.as_str(), status))
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
