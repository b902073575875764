//! Reads through linked health files (see the model's `linked`): the group of files of one
//! resident, its combined record, and what a new link must pass here.

use super::*;
use crate::model::linked::{self, CombinedRecord, Group, LINKED_FILES_MAX, find_group};

impl Node {
    /// The health files whose link names `id`, from the index: at most `LINKED_FILES_MAX`.
    pub fn linked_from(&self, id: DocumentId) -> Result<Vec<DocumentId>, NodeError> {
        let prefix = index::linked_prefix(&id);
        Ok(self
            .store
            .scan_from(&prefix, &prefix, LINKED_FILES_MAX)?
            .into_iter()
            .filter_map(|(key, _)| index::document_of(&key))
            .collect())
    }

    /// The group of linked files the health file `id` is in (itself alone when it is linked
    /// to none). A file of the group that this node does not hold, or that is no health file,
    /// is named as missing.
    pub fn linked_group(&self, id: DocumentId) -> Result<Group<Arc<HealthFileView>>, NodeError> {
        let first = self.health_file(id)?;
        let mut first = Some(Arc::new(first));
        let group = find_group(
            id,
            |file| {
                if file == id {
                    return Ok(first.take());
                }
                match self.health_file(file) {
                    Ok(view) => Ok(Some(Arc::new(view))),
                    Err(NodeError::UnknownDocument(_) | NodeError::WrongKind { .. }) => Ok(None),
                    Err(error) => Err(error),
                }
            },
            |file| self.linked_from(file),
        )?;
        group.ok_or(NodeError::UnknownDocument(id))
    }

    /// The record of the resident whose health file `id` is, read through every file linked
    /// with it; `None` when the file is linked with no other (its own view is the record, read
    /// as kept, without a copy).
    pub fn resident_record(&self, id: DocumentId) -> Result<Option<CombinedRecord>, NodeError> {
        self.resident_record_of(id, self.view(id, DocumentKind::HealthFile)?.as_ref())
    }

    /// As [`Node::resident_record`], given the file's view as kept (`kept`), which a reader
    /// already holds: the file is not looked up again.
    pub fn resident_record_of(
        &self,
        id: DocumentId,
        kept: &View,
    ) -> Result<Option<CombinedRecord>, NodeError> {
        let linked_out = match kept {
            View::HealthFile(view) => linked::linked_to(id, view).is_some(),
            _ => false,
        };
        if !linked_out && self.linked_from(id)?.is_empty() {
            return Ok(None);
        }
        Ok(CombinedRecord::of(&self.linked_group(id)?))
    }

    /// Checks a link of the health file `id` to `to` before it is written: another health
    /// file held here, and the two files' groups together within `LINKED_FILES_MAX`.
    pub(super) fn check_link(&self, id: DocumentId, to: DocumentId) -> Result<(), NodeError> {
        if id == to {
            return Err(NodeError::LinkRefused {
                reason: "a file is linked to another file of the same resident, not to itself",
            });
        }
        let target = match self.linked_group(to) {
            Ok(group) => group,
            Err(NodeError::UnknownDocument(_) | NodeError::WrongKind { .. }) => {
                return Err(NodeError::LinkRefused {
                    reason: "this node holds no health file with the id the link names",
                });
            }
            Err(error) => return Err(error),
        };
        let own = self.linked_group(id)?;
        let files: BTreeSet<DocumentId> = [&own, &target]
            .into_iter()
            .flat_map(|group| {
                group
                    .files
                    .iter()
                    .map(|(file, _)| *file)
                    .chain(group.missing.iter().copied())
            })
            .collect();
        if files.len() > LINKED_FILES_MAX {
            return Err(NodeError::LinkRefused {
                reason: "the two files are linked with more files together than one resident's record reads (16)",
            });
        }
        Ok(())
    }
}
