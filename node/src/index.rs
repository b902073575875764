//! The node's indexes: residents by a salted hash of their national id and by normalised
//! name; referrals on the desks of the institutions that receive and send them (by status,
//! direction, urgency and time), and by patient; documents holding conflicts for a clinician
//! to review; health files by the file their link names.
//!
//! Index entries are keys of the store, so a lookup is a prefix scan in key order. A resident's
//! entries (name, national id) hold the resident's summary (`ResidentSummary`: name, sex,
//! birth date), so a search answers from the index alone, without reading a file; the other
//! entries are empty. Each document's current keys are recorded beside it, so an update
//! removes the entries its old content had in the same atomic batch that adds the new ones.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{
    Date, Direction, DocumentId, PersonName, ReferralStatus, Register, Sex, Timestamp, Urgency,
    View,
};

/// Key prefix: `x ‖ document` → the document's current index keys.
pub(crate) const RECORD: u8 = b'x';
/// Key prefix: `n ‖ SHA-256(salt ‖ national id) ‖ document`.
const NATIONAL_ID: u8 = b'n';
/// Key prefix: `a ‖ normalised name ‖ 0 ‖ document`.
const NAME: u8 = b'a';
/// Key prefix: `b ‖ institution ‖ 0 ‖ side ‖ status ‖ 0 ‖ direction ‖ rank ‖ time ‖
/// document`, a referral on an institution's desk (see [`DeskPosition`]): `side` is `i` for the
/// institution that receives it, `o` for the one that sent it; `direction` its first byte (`u`
/// or `d`); `rank` 0 for priority (the green channel; a referral whose urgency is in conflict
/// counts as priority), 1 for routine; `time` when it was sent, in milliseconds, big-endian
/// with the sign bit flipped so that byte order is time order. Every filter a desk asks for
/// is a range of keys, and each range is in the order a desk works: urgent first, oldest first.
const DESK: u8 = b'b';
/// Key prefix: `t ‖ patient ‖ document`.
const PATIENT: u8 = b't';
/// Key prefix: `k ‖ document`, for a document with conflicts to review.
const CONFLICTED: u8 = b'k';
/// Key prefix: `j ‖ linked file ‖ document`, for a health file linked to another.
const LINKED: u8 = b'j';
/// Most results a search returns.
pub const SEARCH_RESULTS_MAX: usize = 100;
/// Longest normalised name indexed, in bytes.
const NAME_KEY_BYTES_MAX: usize = 256;

/// A search hit: enough to tell residents apart (the values shown by default); the rest is
/// one read away.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResidentSummary {
    /// The health file.
    pub id: DocumentId,
    /// Name.
    pub name: PersonName,
    /// Administrative sex.
    pub sex: Sex,
    /// Date of birth.
    pub birth_date: Date,
}

/// The index entries a document's content calls for: keys, sorted, each with its value.
pub(crate) fn entries_of(salt: &[u8; 32], id: &DocumentId, view: &View) -> Vec<(Vec<u8>, Vec<u8>)> {
    let summary = match view {
        View::HealthFile(view) => crate::cbor::encode(&ResidentSummary {
            id: *id,
            name: view.demographics.name.value.clone(),
            sex: view.demographics.sex.value,
            birth_date: view.demographics.birth_date.value.clone(),
        }),
        _ => Vec::new(),
    };
    keys_of(salt, id, view)
        .into_iter()
        .map(|key| {
            let value = match key.first() {
                Some(&NAME | &NATIONAL_ID) => summary.clone(),
                _ => Vec::new(),
            };
            (key, value)
        })
        .collect()
}

/// The summary a resident's index entry holds; `None` for an entry written before entries held
/// one (empty) or unreadable.
pub(crate) fn summary_of(value: &[u8]) -> Option<ResidentSummary> {
    crate::cbor::decode_exact(value).ok()
}

/// Whether an index entry is a resident's (by name or national id) without the summary it
/// holds since store format 5: written by an earlier release.
pub(crate) fn lacks_summary(key: &[u8], value: &[u8]) -> bool {
    matches!(key.first(), Some(&NAME | &NATIONAL_ID)) && summary_of(value).is_none()
}

/// The index keys a document's content calls for.
fn keys_of(salt: &[u8; 32], id: &DocumentId, view: &View) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    match view {
        View::HealthFile(view) => {
            // Every value of a conflicted field is indexed: a search finds the resident under
            // any of the values a clinician still has to choose between.
            for national_id in all_values(view.demographics.national_id.as_ref()) {
                keys.push(
                    [
                        &[NATIONAL_ID][..],
                        &national_id_hash(salt, national_id),
                        id.as_bytes(),
                    ]
                    .concat(),
                );
            }
            for name in all_values(Some(&view.demographics.name)) {
                for form in [
                    format!("{} {}", name.family, name.given),
                    name.text.clone().unwrap_or_default(),
                ] {
                    let normalised = normalise_name(&form);
                    if !normalised.is_empty() {
                        keys.push(
                            [&[NAME][..], normalised.as_bytes(), &[0], id.as_bytes()].concat(),
                        );
                    }
                }
            }
            if let Some(to) = crate::model::linked::linked_to(*id, view) {
                keys.push([&[LINKED][..], to.as_bytes(), id.as_bytes()].concat());
            }
        }
        View::Referral(view) => {
            let position = DeskPosition {
                rank: if all_values(Some(&view.urgency)).any(|u| *u == Urgency::Priority) {
                    0
                } else {
                    1
                },
                time: view.created_at,
                document: *id,
            };
            for (side, institution) in [(Side::Receiving, &view.to), (Side::Sending, &view.from)] {
                keys.push(
                    [
                        desk_prefix(institution.as_str(), side, view.status, view.direction)
                            .as_slice(),
                        &position.encode(),
                    ]
                    .concat(),
                );
            }
            keys.push([&[PATIENT][..], view.patient.as_bytes(), id.as_bytes()].concat());
        }
        View::Roster(_) => {}
    }
    let conflicted = match view {
        View::HealthFile(view) => !view.conflicts().is_empty(),
        View::Referral(view) => !view.conflicts().is_empty(),
        View::Roster(_) => false,
    };
    if conflicted {
        keys.push([&[CONFLICTED][..], id.as_bytes()].concat());
    }
    keys.sort();
    keys.dedup();
    keys
}

fn all_values<T>(register: Option<&Register<T>>) -> impl Iterator<Item = &T> {
    register
        .into_iter()
        .flat_map(|r| std::iter::once(&r.value).chain(&r.conflicts))
}

/// The salted hash a national id is indexed under: the id itself is never a key.
pub(crate) fn national_id_hash(salt: &[u8; 32], national_id: &str) -> [u8; 32] {
    let normalised: String = national_id
        .chars()
        .filter(|c| !c.is_whitespace())
        .flat_map(char::to_uppercase)
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(b"estuary/national-id/v1");
    hasher.update(salt);
    hasher.update(normalised.as_bytes());
    hasher.finalize().into()
}

/// Lower case, single spaces, bounded: "  LU  Jianguo " → "lu jianguo".
pub(crate) fn normalise_name(name: &str) -> String {
    let mut normalised = name
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    if normalised.len() > NAME_KEY_BYTES_MAX {
        let mut end = NAME_KEY_BYTES_MAX;
        while !normalised.is_char_boundary(end) {
            end -= 1;
        }
        normalised.truncate(end);
    }
    normalised
}

/// The key prefix to scan for a national id.
pub(crate) fn national_id_prefix(salt: &[u8; 32], national_id: &str) -> Vec<u8> {
    [&[NATIONAL_ID][..], &national_id_hash(salt, national_id)].concat()
}

/// The key prefix to scan for names starting with `name`.
pub(crate) fn name_prefix(name: &str) -> Vec<u8> {
    [&[NAME][..], normalise_name(name).as_bytes()].concat()
}

/// Which side of a referral a desk is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The institution the referral is addressed to.
    Receiving,
    /// The institution that sent it.
    Sending,
}

/// Where a referral stands on a desk, in the order a desk works: priority before routine,
/// then oldest first, then by id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeskPosition {
    /// 0 for priority, 1 for routine.
    pub rank: u8,
    /// When the referral was sent.
    pub time: Timestamp,
    /// The referral.
    pub document: DocumentId,
}

/// Bytes of an encoded [`DeskPosition`]: rank, time, document.
pub const DESK_POSITION_BYTES: usize = 1 + 8 + 16;

impl DeskPosition {
    /// The position as it ends a desk key.
    pub fn encode(&self) -> [u8; DESK_POSITION_BYTES] {
        let mut bytes = [0u8; DESK_POSITION_BYTES];
        bytes[0] = self.rank;
        bytes[1..9].copy_from_slice(&time_key(self.time));
        bytes[9..].copy_from_slice(self.document.as_bytes());
        bytes
    }

    /// The position a desk key (or an encoded position) ends with.
    pub fn decode(key: &[u8]) -> Option<Self> {
        let start = key.len().checked_sub(DESK_POSITION_BYTES)?;
        let bytes = &key[start..];
        let time = u64::from_be_bytes(bytes[1..9].try_into().ok()?) ^ (1 << 63);
        Some(Self {
            rank: bytes[0],
            time: Timestamp(time as i64),
            document: DocumentId::from_bytes(bytes[9..].try_into().ok()?),
        })
    }
}

/// A time as desk keys order it: big-endian, sign bit flipped.
pub(crate) fn time_key(time: Timestamp) -> [u8; 8] {
    ((time.0 as u64) ^ (1 << 63)).to_be_bytes()
}

/// The key prefix of the referrals on `institution`'s desk on `side`, in `status` and
/// `direction`; a rank and a time follow.
pub(crate) fn desk_prefix(
    institution: &str,
    side: Side,
    status: ReferralStatus,
    direction: Direction,
) -> Vec<u8> {
    let side = match side {
        Side::Receiving => b'i',
        Side::Sending => b'o',
    };
    [
        &[DESK][..],
        institution.as_bytes(),
        &[0, side],
        status.as_str().as_bytes(),
        &[0, direction.as_str().as_bytes()[0]],
    ]
    .concat()
}

/// The key prefix to scan for referrals of `patient`.
pub(crate) fn patient_prefix(patient: &DocumentId) -> Vec<u8> {
    [&[PATIENT][..], patient.as_bytes()].concat()
}

/// The key prefix to scan for the health files linked to `to`.
pub(crate) fn linked_prefix(to: &DocumentId) -> Vec<u8> {
    [&[LINKED][..], to.as_bytes()].concat()
}

/// The key prefix to scan for documents with conflicts.
pub(crate) fn conflicted_prefix() -> Vec<u8> {
    vec![CONFLICTED]
}

/// The document an index key points to: its last 16 bytes.
pub(crate) fn document_of(key: &[u8]) -> Option<DocumentId> {
    let start = key.len().checked_sub(16)?;
    Some(DocumentId::from_bytes(key[start..].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_ids_hash_with_the_salt() {
        assert_eq!(normalise_name("  LU  Jianguo "), "lu jianguo");
        assert_eq!(normalise_name("陆建国"), "陆建国");
        let long = "é".repeat(300);
        assert!(normalise_name(&long).len() <= NAME_KEY_BYTES_MAX);
        let salt = [1; 32];
        // Spaces and the case of the check character do not matter.
        assert_eq!(
            national_id_hash(&salt, "31023019541017043x"),
            national_id_hash(&salt, "3102 3019 5410 17043X")
        );
        assert_ne!(
            national_id_hash(&[1; 32], "310230195410170433"),
            national_id_hash(&[2; 32], "310230195410170433")
        );
    }
}
