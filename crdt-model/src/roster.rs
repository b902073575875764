//! The consortium roster's content: member institutions, their node keys, and revocations.
//!
//! Only the consortium authority edits the roster; `node` checks the authority's signature.
//! Here the roster is plain content with its rules: ids and keys well formed, each key held by
//! one institution, limits respected, a version the authority raises on every edit so a node
//! can tell a newer signed roster from an older one, and revocations that are final: written
//! once, never changed or removed by a later change.

use std::collections::HashMap;
use std::fmt;

use automerge::legacy::{Key, ObjectId, OpId, OpType};
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ObjId, ObjType, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};

use crate::access::{Obj, check_text, checked, object, put_time, text, timestamp, uint};
use crate::document::{DocumentKind, IDENTITY_KEYS, read_identity, replica};
use crate::error::{OpError, ValidationError};
use crate::ids::{Actor, DocumentId, Editor, InstitutionId, Timestamp};
use crate::limits::{
    AREA_BYTES_MAX, ERASURES_MAX, FIELD_BYTES_MAX, INSTITUTIONS_MAX, NODE_KEYS_PER_INSTITUTION_MAX,
    REVOCATION_HEADS_MAX, REVOCATIONS_MAX, ROSTER_CHANGES_MAX,
};
use crate::vocab::InstitutionKind;

/// 32 opaque bytes: a node's public key, or the hash of a change. Shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bytes32(pub [u8; 32]);

impl Bytes32 {
    /// Parses 64 lowercase hex characters.
    pub fn parse_hex(text: &str, field: &'static str) -> Result<Self, ValidationError> {
        let invalid = ValidationError::InvalidValue {
            field,
            reason: "expected 64 lowercase hex characters",
        };
        crate::ids::decode_hex(text).map(Self).ok_or(invalid)
    }
}

impl fmt::Display for Bytes32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for Bytes32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes32({self})")
    }
}

impl Serialize for Bytes32 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Bytes32 {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse_hex(&text, "bytes").map_err(serde::de::Error::custom)
    }
}

/// A typed edit of the roster.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(tag = "op", content = "args", rename_all = "snake_case")]
pub enum RosterOp {
    /// Adds a member institution (or renames it, if present).
    AddInstitution {
        /// Its id.
        id: InstitutionId,
        /// Its display name.
        name: String,
        /// Core hospital, district hospital or community centre.
        kind: InstitutionKind,
    },
    /// Places a member on the consortium's map (for instance "north shore"): where
    /// operators' dashboards draw it. Replaces the area it had.
    SetArea {
        /// The institution.
        institution: InstitutionId,
        /// The area's name, 1 to `AREA_BYTES_MAX` bytes (no patient data).
        area: String,
    },
    /// Gives an institution a node key.
    AddNodeKey {
        /// The institution.
        institution: InstitutionId,
        /// The node's public key.
        key: Bytes32,
    },
    /// Revokes a node key. Changes by that key are accepted only if they are among `cutoff`
    /// heads or their ancestors: every node draws the same line. A revocation is final: a key
    /// is revoked once, and its cut-off never changes.
    Revoke {
        /// The revoked key.
        key: Bytes32,
        /// The heads accepted from that key, up to the cut-off.
        cutoff: Vec<Bytes32>,
        /// Why, for operators (no patient data).
        reason: String,
    },
    /// Orders a health file erased (a court's or a regulator's order): every node deletes its
    /// content and refuses it from then on. Final, like a revocation.
    Erase {
        /// The health file.
        document: DocumentId,
        /// The order's reference, for the audit (no patient data).
        order: String,
    },
}

/// An institution in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct InstitutionView {
    /// Its id.
    pub id: InstitutionId,
    /// Display name.
    pub name: String,
    /// Kind.
    pub kind: InstitutionKind,
    /// Where on the consortium's map it is, if the authority said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub area: Option<String>,
    /// Node keys, sorted.
    pub node_keys: Vec<Bytes32>,
}

/// A revocation in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RevocationView {
    /// The revoked key.
    pub key: Bytes32,
    /// When it was revoked.
    pub at: Timestamp,
    /// Why.
    pub reason: String,
    /// The heads accepted from that key, up to the cut-off.
    pub cutoff: Vec<Bytes32>,
}

/// An erasure in a view.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct ErasureView {
    /// The health file erased.
    pub document: DocumentId,
    /// When the authority ordered it.
    pub at: Timestamp,
    /// The order's reference.
    pub order: String,
}

/// The roster as nodes and operators see it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RosterView {
    /// The document id.
    pub id: DocumentId,
    /// Raised by the authority on every edit.
    pub version: u64,
    /// Member institutions, by id.
    pub institutions: Vec<InstitutionView>,
    /// Revoked keys, by key.
    pub revocations: Vec<RevocationView>,
    /// Health files erased on legal order, by id.
    #[serde(default)]
    pub erasures: Vec<ErasureView>,
}

impl RosterView {
    /// The institution holding `key`, if any (revoked or not).
    pub fn institution_of(&self, key: &Bytes32) -> Option<&InstitutionView> {
        self.institutions.iter().find(|i| i.node_keys.contains(key))
    }

    /// The erasure of `document`, if it was ordered erased.
    pub fn erasure_of(&self, document: &DocumentId) -> Option<&ErasureView> {
        self.erasures.iter().find(|e| e.document == *document)
    }

    /// The revocation of `key`, if it was revoked.
    pub fn revocation_of(&self, key: &Bytes32) -> Option<&RevocationView> {
        self.revocations.iter().find(|r| r.key == *key)
    }
}

/// Why a roster's history is refused: it changes what a revocation said once written.
///
/// A node that applied a revocation withdrew the key's changes past its cut-off and will not
/// decide them again; a node that sees only the later version would draw another line. So a
/// revocation, once written, must stay as it was, in every change after it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RevocationHistoryError {
    /// A change rewrote or removed the revocation of `key`, or two concurrent changes both
    /// wrote it.
    #[error(
        "the roster's history changes the revocation of node key {key}; a revocation is final \
         because nodes that applied its cut-off cannot draw another line, so the authority must \
         issue a roster that keeps it as first written"
    )]
    Changed {
        /// The revoked key.
        key: Bytes32,
    },
    /// A change replaced the revocations map, or wrote into it under something that is not a
    /// node key.
    #[error(
        "the roster's history replaces its revocations or writes malformed ones; the authority \
         must issue a roster whose revocations were only ever added"
    )]
    Rewritten,
    /// More changes than a roster may hold.
    #[error("the roster holds {count} changes; the limit is {max}")]
    TooManyChanges {
        /// How many it holds.
        count: usize,
        /// `ROSTER_CHANGES_MAX`.
        max: usize,
    },
}

/// The consortium roster: one automerge document behind typed operations.
#[derive(Debug)]
pub struct Roster {
    doc: AutoCommit,
    id: DocumentId,
}

replica!(Roster, DocumentKind::Roster, RosterView, parse_roster);

impl Roster {
    /// Creates an empty roster at version 1.
    pub fn create(actor: &Actor, editor: &Editor) -> Result<Self, OpError> {
        Self::create_with(actor, editor, |tx| {
            tx.put(automerge::ROOT, "version", 1u64)?;
            tx.put_object(automerge::ROOT, "institutions", ObjType::Map)?;
            tx.put_object(automerge::ROOT, "revocations", ObjType::Map)?;
            Ok(())
        })
    }

    /// Applies one edit as one change and raises the version.
    pub fn apply(&mut self, editor: &Editor, op: &RosterOp) -> Result<(), OpError> {
        let view = self.view();
        match op {
            RosterOp::AddInstitution { id, .. }
                if view.institutions.len() >= INSTITUTIONS_MAX
                    && view.institutions.iter().all(|i| i.id != *id) =>
            {
                return Err(OpError::Full {
                    field: "institutions",
                    max: INSTITUTIONS_MAX,
                });
            }
            RosterOp::AddNodeKey { institution, key } => {
                let Some(member) = view.institutions.iter().find(|i| i.id == *institution) else {
                    return Err(ValidationError::InvalidValue {
                        field: "institutions",
                        reason: "no such institution in the roster",
                    }
                    .into());
                };
                if view.institution_of(key).is_some() {
                    return Err(ValidationError::InvalidValue {
                        field: "institutions.node_keys",
                        reason: "the key already belongs to a member",
                    }
                    .into());
                }
                if member.node_keys.len() >= NODE_KEYS_PER_INSTITUTION_MAX {
                    return Err(OpError::Full {
                        field: "institutions.node_keys",
                        max: NODE_KEYS_PER_INSTITUTION_MAX,
                    });
                }
            }
            RosterOp::Revoke { key, cutoff, .. } => {
                if view.institution_of(key).is_none() {
                    return Err(ValidationError::InvalidValue {
                        field: "revocations",
                        reason: "only a member's key can be revoked",
                    }
                    .into());
                }
                if view.revocation_of(key).is_some() {
                    return Err(ValidationError::InvalidValue {
                        field: "revocations",
                        reason: "the key is already revoked, and a revocation is final: nodes \
                                 that applied its cut-off cannot draw another line, so a second \
                                 revocation would leave nodes disagreeing",
                    }
                    .into());
                }
                if cutoff.len() > REVOCATION_HEADS_MAX {
                    return Err(ValidationError::TooMany {
                        field: "revocations.cutoff",
                        count: cutoff.len(),
                        max: REVOCATION_HEADS_MAX,
                    }
                    .into());
                }
                if view.revocations.len() >= REVOCATIONS_MAX {
                    return Err(OpError::Full {
                        field: "revocations",
                        max: REVOCATIONS_MAX,
                    });
                }
            }
            RosterOp::Erase { document, .. } => {
                if view.erasure_of(document).is_some() {
                    return Err(ValidationError::InvalidValue {
                        field: "erasures",
                        reason: "the health file is already erased",
                    }
                    .into());
                }
                if view.erasures.len() >= ERASURES_MAX {
                    return Err(OpError::Full {
                        field: "erasures",
                        max: ERASURES_MAX,
                    });
                }
            }
            RosterOp::SetArea { institution, .. } => {
                if view.institutions.iter().all(|i| i.id != *institution) {
                    return Err(ValidationError::InvalidValue {
                        field: "institutions",
                        reason: "no such institution in the roster",
                    }
                    .into());
                }
            }
            RosterOp::AddInstitution { .. } => {}
        }
        self.transact(editor, |tx| {
            match op {
                RosterOp::AddInstitution { id, name, kind } => {
                    check_text(name, "institutions.name", FIELD_BYTES_MAX, true)?;
                    let institutions = map_at(tx, &automerge::ROOT, "institutions")?;
                    let existing = match tx.get(&institutions, id.as_str())? {
                        Some((Value::Object(ObjType::Map), obj)) => Some(obj),
                        _ => None,
                    };
                    let entry = match existing {
                        Some(entry) => entry,
                        None => {
                            let entry = tx.put_object(&institutions, id.as_str(), ObjType::Map)?;
                            tx.put_object(&entry, "node_keys", ObjType::Map)?;
                            entry
                        }
                    };
                    tx.put(&entry, "name", name.as_str())?;
                    tx.put(&entry, "kind", kind.as_str())?;
                }
                RosterOp::SetArea { institution, area } => {
                    check_text(area, "institutions.area", AREA_BYTES_MAX, true)?;
                    let institutions = map_at(tx, &automerge::ROOT, "institutions")?;
                    let entry = map_at(tx, &institutions, institution.as_str())?;
                    tx.put(&entry, "area", area.as_str())?;
                }
                RosterOp::AddNodeKey { institution, key } => {
                    let institutions = map_at(tx, &automerge::ROOT, "institutions")?;
                    let entry = map_at(tx, &institutions, institution.as_str())?;
                    let keys = map_at(tx, &entry, "node_keys")?;
                    put_time(tx, &keys, &key.to_string(), editor.at)?;
                }
                RosterOp::Revoke {
                    key,
                    cutoff,
                    reason,
                } => {
                    check_text(reason, "revocations.reason", FIELD_BYTES_MAX, true)?;
                    let revocations = map_at(tx, &automerge::ROOT, "revocations")?;
                    let entry = tx.put_object(&revocations, key.to_string(), ObjType::Map)?;
                    put_time(tx, &entry, "at", editor.at)?;
                    tx.put(&entry, "reason", reason.as_str())?;
                    let list = tx.put_object(&entry, "cutoff", ObjType::List)?;
                    for (index, head) in cutoff.iter().enumerate() {
                        tx.insert(&list, index, ScalarValue::Bytes(head.0.to_vec()))?;
                    }
                }
                RosterOp::Erase { document, order } => {
                    check_text(order, "erasures.order", FIELD_BYTES_MAX, true)?;
                    // Rosters made before erasures existed have no map: the first makes it
                    // (only the authority writes a roster, so no one writes it concurrently).
                    let erasures = match tx.get(automerge::ROOT, "erasures")? {
                        Some((Value::Object(ObjType::Map), obj)) => obj,
                        _ => tx.put_object(automerge::ROOT, "erasures", ObjType::Map)?,
                    };
                    let entry = tx.put_object(&erasures, document.to_string(), ObjType::Map)?;
                    put_time(tx, &entry, "at", editor.at)?;
                    tx.put(&entry, "order", order.as_str())?;
                }
            }
            let version = view
                .version
                .checked_add(1)
                .ok_or(ValidationError::InvalidValue {
                    field: "version",
                    reason: "the roster version cannot be raised past its maximum",
                })?;
            tx.put(automerge::ROOT, "version", version)?;
            Ok(())
        })
    }
}

impl Roster {
    /// Checks that no change in the roster's history changes a revocation once written: the
    /// revocations map is created once, with the roster; each key in it is written by one op
    /// only (a second one overwrites, deletes, or concurrently writes it); and everything
    /// inside an entry is written by the change that created the entry.
    ///
    /// Its cost is one pass over the history's ops, bounded by `ROSTER_CHANGES_MAX` changes
    /// (and by the bytes a node accepts as a roster).
    pub fn check_revocations_final(&mut self) -> Result<(), RevocationHistoryError> {
        let changes = self.doc.get_changes(&[]);
        if changes.len() > ROSTER_CHANGES_MAX {
            return Err(RevocationHistoryError::TooManyChanges {
                count: changes.len(),
                max: ROSTER_CHANGES_MAX,
            });
        }
        let mut revocations: Option<OpId> = None;
        let mut written: HashMap<Bytes32, ChangeHash> = HashMap::new();
        // Objects inside a revocation entry (the entry and its cut-off list): the key it
        // belongs to and the change that created it.
        let mut inside: HashMap<OpId, (Bytes32, ChangeHash)> = HashMap::new();
        // Changes come in causal order, so an object's creation is seen before any op in it.
        for change in &changes {
            let hash = change.hash();
            let expanded = change.decode();
            for (index, op) in expanded.operations.iter().enumerate() {
                let id = OpId(
                    expanded.start_op.get() + index as u64,
                    expanded.actor_id.clone(),
                );
                let ObjectId::Id(obj) = &op.obj else {
                    if matches!(&op.key, Key::Map(name) if name == "revocations") {
                        if revocations.is_some() || op.action != OpType::Make(ObjType::Map) {
                            return Err(RevocationHistoryError::Rewritten);
                        }
                        revocations = Some(id);
                    }
                    continue;
                };
                let owner = if revocations.as_ref() == Some(obj) {
                    let Key::Map(hex) = &op.key else {
                        return Err(RevocationHistoryError::Rewritten);
                    };
                    let key = Bytes32::parse_hex(hex, "revocations")
                        .map_err(|_| RevocationHistoryError::Rewritten)?;
                    if written.insert(key, hash).is_some() {
                        return Err(RevocationHistoryError::Changed { key });
                    }
                    key
                } else if let Some((key, created_by)) = inside.get(obj) {
                    if *created_by != hash {
                        return Err(RevocationHistoryError::Changed { key: *key });
                    }
                    *key
                } else {
                    continue;
                };
                if matches!(op.action, OpType::Make(_)) {
                    inside.insert(id, (owner, hash));
                }
            }
        }
        Ok(())
    }
}

fn map_at(tx: &AutoCommit, parent: &ObjId, key: &str) -> Result<ObjId, OpError> {
    match tx.get(parent, key)? {
        Some((Value::Object(ObjType::Map), id)) => Ok(id),
        _ => Err(ValidationError::InvalidValue {
            field: "institutions",
            reason: "no such institution in the roster",
        }
        .into()),
    }
}

/// Parses and validates a whole roster.
pub(crate) fn parse_roster<D: ReadDoc>(doc: &D) -> Result<RosterView, ValidationError> {
    if read_identity(doc)? != DocumentKind::Roster {
        return Err(ValidationError::UnknownDocumentType);
    }
    let root = Obj::root(doc);
    root.only_keys(&[
        IDENTITY_KEYS[0],
        IDENTITY_KEYS[1],
        "version",
        "institutions",
        "revocations",
        "erasures",
    ])?;
    let version = root.once("version", "version", uint("version"))?;
    let institutions_obj = root.child(
        root.once(
            "institutions",
            "institutions",
            object(ObjType::Map, "an object"),
        )?,
        "institutions",
    );
    let ids = institutions_obj.keys();
    if ids.len() > INSTITUTIONS_MAX {
        return Err(ValidationError::TooMany {
            field: "institutions",
            count: ids.len(),
            max: INSTITUTIONS_MAX,
        });
    }
    let mut institutions = Vec::with_capacity(ids.len());
    for key in ids {
        let id = InstitutionId::new(key.as_str()).map_err(|_| ValidationError::InvalidValue {
            field: "institutions",
            reason: "an institution id is 1-64 bytes of a-z, 0-9 and '-'",
        })?;
        let entry = institutions_obj.child(
            institutions_obj.once(&key, "institutions", object(ObjType::Map, "an object"))?,
            "institutions",
        );
        entry.only_keys(&["name", "kind", "area", "node_keys"])?;
        let keys_obj = entry.child(
            entry.once(
                "node_keys",
                "institutions.node_keys",
                object(ObjType::Map, "an object"),
            )?,
            "institutions.node_keys",
        );
        let hexes = keys_obj.keys();
        if hexes.len() > NODE_KEYS_PER_INSTITUTION_MAX {
            return Err(ValidationError::TooMany {
                field: "institutions.node_keys",
                count: hexes.len(),
                max: NODE_KEYS_PER_INSTITUTION_MAX,
            });
        }
        let mut node_keys = Vec::with_capacity(hexes.len());
        for hex in hexes {
            keys_obj.once(
                &hex,
                "institutions.node_keys",
                timestamp("institutions.node_keys"),
            )?;
            node_keys.push(Bytes32::parse_hex(&hex, "institutions.node_keys")?);
        }
        institutions.push(InstitutionView {
            id,
            name: entry.once(
                "name",
                "institutions.name",
                text("institutions.name", FIELD_BYTES_MAX, true),
            )?,
            kind: entry.once(
                "kind",
                "institutions.kind",
                checked("institutions.kind", InstitutionKind::parse),
            )?,
            area: entry.once_opt(
                "area",
                "institutions.area",
                text("institutions.area", AREA_BYTES_MAX, true),
            )?,
            node_keys,
        });
    }
    let mut all_keys: Vec<&Bytes32> = institutions.iter().flat_map(|i| &i.node_keys).collect();
    let total = all_keys.len();
    all_keys.sort();
    all_keys.dedup();
    if all_keys.len() != total {
        return Err(ValidationError::InvalidValue {
            field: "institutions.node_keys",
            reason: "a node key belongs to at most one institution",
        });
    }

    let revocations_obj = root.child(
        root.once(
            "revocations",
            "revocations",
            object(ObjType::Map, "an object"),
        )?,
        "revocations",
    );
    let keys = revocations_obj.keys();
    if keys.len() > REVOCATIONS_MAX {
        return Err(ValidationError::TooMany {
            field: "revocations",
            count: keys.len(),
            max: REVOCATIONS_MAX,
        });
    }
    let mut revocations = Vec::with_capacity(keys.len());
    for hex in keys {
        let key = Bytes32::parse_hex(&hex, "revocations")?;
        let entry = revocations_obj.child(
            revocations_obj.once(&hex, "revocations", object(ObjType::Map, "an object"))?,
            "revocations",
        );
        entry.only_keys(&["at", "reason", "cutoff"])?;
        let list = entry.once(
            "cutoff",
            "revocations.cutoff",
            object(ObjType::List, "a list"),
        )?;
        let count = doc.length(&list);
        if count > REVOCATION_HEADS_MAX {
            return Err(ValidationError::TooMany {
                field: "revocations.cutoff",
                count,
                max: REVOCATION_HEADS_MAX,
            });
        }
        let mut cutoff = Vec::with_capacity(count);
        for index in 0..count {
            let malformed = ValidationError::WrongType {
                field: "revocations.cutoff",
                expected: "a list of 32-byte change hashes",
            };
            let values = doc.get_all(&list, index).map_err(|_| malformed.clone())?;
            // A list element holds one value; conflicting values mean it was overwritten.
            let [(Value::Scalar(head), _)] = values.as_slice() else {
                return Err(malformed);
            };
            let head = head.as_bytes().and_then(|b| <[u8; 32]>::try_from(b).ok());
            cutoff.push(Bytes32(head.ok_or(malformed)?));
        }
        revocations.push(RevocationView {
            key,
            at: entry.once("at", "revocations.at", timestamp("revocations.at"))?,
            reason: entry.once(
                "reason",
                "revocations.reason",
                text("revocations.reason", FIELD_BYTES_MAX, true),
            )?,
            cutoff,
        });
    }
    let erasures = match root.once_opt("erasures", "erasures", object(ObjType::Map, "an object"))? {
        Some(obj) => parse_erasures(&root.child(obj, "erasures"))?,
        None => Vec::new(),
    };
    Ok(RosterView {
        // The id is not content: it is derived from the creation change by the replica.
        id: DocumentId::from_bytes([0; 16]),
        version,
        institutions,
        revocations,
        erasures,
    })
}

/// The erasures map of a roster: health file id → when and by which order.
fn parse_erasures<D: ReadDoc>(map: &Obj<'_, D>) -> Result<Vec<ErasureView>, ValidationError> {
    let ids = map.keys();
    if ids.len() > ERASURES_MAX {
        return Err(ValidationError::TooMany {
            field: "erasures",
            count: ids.len(),
            max: ERASURES_MAX,
        });
    }
    let mut erasures = Vec::with_capacity(ids.len());
    for hex in ids {
        let document = DocumentId::parse(&hex)?;
        let entry = map.child(
            map.once(&hex, "erasures", object(ObjType::Map, "an object"))?,
            "erasures",
        );
        entry.only_keys(&["at", "order"])?;
        erasures.push(ErasureView {
            document,
            at: entry.once("at", "erasures.at", timestamp("erasures.at"))?,
            order: entry.once(
                "order",
                "erasures.order",
                text("erasures.order", FIELD_BYTES_MAX, true),
            )?,
        });
    }
    Ok(erasures)
}
