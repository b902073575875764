//! The consortium roster as a node holds it: a snapshot signed by the consortium authority,
//! and the questions the ingest pipeline asks of it.
//!
//! A node never merges roster replicas: it replaces its roster with a newer signed snapshot
//! and refuses an older one, so every node that holds the same version agrees on who may
//! write. A revocation is final: a roster whose history changes one, or a newer roster that
//! drops or changes one the node holds, is refused, so every node draws the same line.

use std::collections::{BTreeSet, HashMap};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use libp2p::PeerId;

use crate::cbor::CborError;
use crate::identity::{Identity, peer_id_of};
use crate::model::automerge::ChangeHash;
use crate::model::{
    Actor, Bytes32, InstitutionId, LoadError, RevocationHistoryError, Roster, RosterView,
};

/// The signed-roster format this build reads and writes.
pub const SIGNED_ROSTER_VERSION: u8 = 1;
/// Largest signed roster, in bytes; checked before decoding.
pub const SIGNED_ROSTER_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Domain separation for roster signatures.
const SIGNING_DOMAIN: &[u8] = b"estuary/roster/v1";

/// Why a roster was refused.
#[derive(Debug, thiserror::Error)]
pub enum RosterError {
    /// Larger than `SIGNED_ROSTER_BYTES_MAX`.
    #[error("signed roster of {bytes} bytes exceeds the {SIGNED_ROSTER_BYTES_MAX}-byte limit")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// Not a signed roster.
    #[error("malformed signed roster: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// Written by a newer format.
    #[error("signed roster version {found} is not supported; upgrade the node")]
    UnsupportedVersion {
        /// The version found.
        found: u8,
    },
    /// Not signed by this consortium's authority.
    #[error("the roster is not signed by the consortium authority")]
    BadSignature,
    /// The roster document is unreadable or invalid.
    #[error("the roster document is invalid: {0}")]
    Invalid(#[from] LoadError),
    /// Older than the roster the node holds.
    #[error("roster version {offered} is older than the version {current} this node holds")]
    Stale {
        /// The version held.
        current: u64,
        /// The version offered.
        offered: u64,
    },
    /// Same version as the one held, different content: the authority signed two rosters with
    /// one version number.
    #[error("two different rosters carry version {version}; the authority must issue a newer one")]
    Diverged {
        /// The version both carry.
        version: u64,
    },
    /// The roster's history changes a revocation once written, or the roster drops or changes
    /// the cut-off of one the node holds. Nodes that applied the revocation cannot draw another
    /// line, so accepting it would leave nodes disagreeing for ever.
    #[error(
        "the roster changes or drops the revocation of node key {key}; a revocation is final, \
         so the authority must issue a roster that keeps it as first written"
    )]
    RevocationChanged {
        /// The revoked key.
        key: Bytes32,
    },
    /// The roster's history is refused for another reason than one revocation.
    #[error("the roster's history is refused: {0}")]
    History(RevocationHistoryError),
}

impl From<RevocationHistoryError> for RosterError {
    fn from(error: RevocationHistoryError) -> Self {
        match error {
            RevocationHistoryError::Changed { key } => Self::RevocationChanged { key },
            other => Self::History(other),
        }
    }
}

/// A roster snapshot with the authority's signature over `estuary/roster/v1 ‖ SHA-256(roster)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRoster {
    /// Format version.
    pub version: u8,
    /// The roster document, as automerge `save()` bytes.
    #[serde(with = "serde_bytes")]
    pub roster: Vec<u8>,
    /// The authority's ed25519 signature.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

fn signing_message(roster: &[u8]) -> Vec<u8> {
    let mut message = SIGNING_DOMAIN.to_vec();
    message.extend_from_slice(&Sha256::digest(roster));
    message
}

impl SignedRoster {
    /// Signs a roster as the consortium authority.
    pub fn sign(authority: &Identity, roster: &mut Roster) -> Self {
        let bytes = roster.save();
        let signature = authority.sign(&signing_message(&bytes));
        Self {
            version: SIGNED_ROSTER_VERSION,
            roster: bytes,
            signature: signature.to_vec(),
        }
    }

    /// Encodes the signed roster (CBOR).
    pub fn encode(&self) -> Vec<u8> {
        crate::cbor::encode(self)
    }

    /// What identifies a signed roster however it is encoded: the SHA-256 of its format
    /// version, the digest its signature covers, and the signature. `None` if `bytes` is not
    /// a signed roster. The signature is part of it, so that a forgery of a roster is not
    /// the same message as the genuine one.
    pub fn content_digest(bytes: &[u8]) -> Option<[u8; 32]> {
        if bytes.len() > SIGNED_ROSTER_BYTES_MAX {
            return None;
        }
        let signed: Self = crate::cbor::decode_exact(bytes).ok()?;
        let mut digest = Sha256::new();
        digest.update([signed.version]);
        digest.update(signing_message(&signed.roster));
        digest.update(&signed.signature);
        Some(digest.finalize().into())
    }

    /// Decodes a signed roster and checks it was signed by `authority`.
    pub fn verify(bytes: &[u8], authority: &Bytes32) -> Result<Membership, RosterError> {
        if bytes.len() > SIGNED_ROSTER_BYTES_MAX {
            return Err(RosterError::TooLarge { bytes: bytes.len() });
        }
        let signed: Self =
            crate::cbor::decode_exact(bytes).map_err(|error| RosterError::Malformed {
                reason: match error {
                    CborError::TrailingBytes { .. } => "trailing bytes after the signed roster",
                    CborError::Malformed | CborError::NotCanonical => "not a CBOR signed roster",
                },
            })?;
        if signed.version != SIGNED_ROSTER_VERSION {
            return Err(RosterError::UnsupportedVersion {
                found: signed.version,
            });
        }
        let signature: [u8; 64] =
            signed
                .signature
                .as_slice()
                .try_into()
                .map_err(|_| RosterError::Malformed {
                    reason: "signature of the wrong length",
                })?;
        let key = VerifyingKey::from_bytes(&authority.0).map_err(|_| RosterError::BadSignature)?;
        key.verify_strict(
            &signing_message(&signed.roster),
            &Signature::from_bytes(&signature),
        )
        .map_err(|_| RosterError::BadSignature)?;
        let mut roster = Roster::load(&signed.roster, &Actor::from_bytes(authority.0.to_vec()))?;
        // Judged from the roster's own history, so every node, fresh or not, refuses the same
        // rosters.
        roster.check_revocations_final()?;
        let view = roster.view();
        let mut cutoff_heads: HashMap<[u8; 32], Vec<Bytes32>> = HashMap::new();
        for revocation in &view.revocations {
            for head in &revocation.cutoff {
                cutoff_heads.entry(head.0).or_default().push(revocation.key);
            }
        }
        let peers = view
            .institutions
            .iter()
            .flat_map(|i| i.node_keys.iter())
            .filter(|key| view.revocation_of(key).is_none())
            .filter_map(|key| Some((peer_id_of(key)?, *key)))
            .collect();
        Ok(Membership {
            view,
            cutoff_heads,
            peers,
            encoded: bytes.to_vec(),
        })
    }
}

/// What offering a signed roster to a node did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RosterUpdate {
    /// It was newer than the roster held, and is held now.
    Adopted {
        /// Its version.
        version: u64,
    },
    /// It is the roster held already (the same version and content, whatever its encoding):
    /// nothing was written or re-checked. Gossip treats it as a duplicate.
    AlreadyHeld {
        /// Its version.
        version: u64,
    },
}

impl RosterUpdate {
    /// The version of the roster held after the offer.
    pub fn version(&self) -> u64 {
        match self {
            Self::Adopted { version } | Self::AlreadyHeld { version } => *version,
        }
    }
}

/// Whether a change's author may write, according to the roster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// A current member's key: the change is judged on its content.
    Member(InstitutionId),
    /// A revoked key, and the change is one of the heads the revocation accepted.
    WithinCutoff(InstitutionId),
    /// A revoked key, and the change is not among the heads the revocation accepted. It is
    /// accepted only as an ancestor of one of them (the ingest pipeline decides that).
    Revoked {
        /// The institution the key belonged to.
        institution: InstitutionId,
        /// The revoked key.
        key: Bytes32,
    },
    /// Not a key of the roster.
    Stranger,
}

/// A verified roster as a node holds it.
#[derive(Clone, Debug)]
pub struct Membership {
    view: RosterView,
    /// Cut-off head → the revoked keys whose revocation names it.
    cutoff_heads: HashMap<[u8; 32], Vec<Bytes32>>,
    /// The PeerIds of the current (not revoked) members' node keys.
    peers: HashMap<PeerId, Bytes32>,
    encoded: Vec<u8>,
}

impl Membership {
    /// The roster's version.
    pub fn version(&self) -> u64 {
        self.view.version
    }

    /// The roster's content.
    pub fn view(&self) -> &RosterView {
        &self.view
    }

    /// The signed roster, encoded, as it is stored and sent to peers.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The roster to hold after being offered `offered`: a newer one replaces this one; an
    /// older one is refused; the same version must be the same roster; and a newer one must
    /// keep every revocation this one has with the same cut-off (its time and reason may
    /// differ: an authority that rebuilt its roster records them again, and the line is the
    /// same). That last check guards against a roster rebuilt from scratch, whose history
    /// cannot show what it dropped.
    pub fn replaced_by(&self, offered: Membership) -> Result<Membership, RosterError> {
        let (current, version) = (self.version(), offered.version());
        if version < current {
            return Err(RosterError::Stale {
                current,
                offered: version,
            });
        }
        if version == current && offered.view != self.view {
            return Err(RosterError::Diverged { version });
        }
        for revocation in &self.view.revocations {
            if offered.view.revocation_of(&revocation.key).is_none()
                || offered.cutoff_of(&revocation.key) != self.cutoff_of(&revocation.key)
            {
                tracing::warn!(
                    key = %revocation.key,
                    current,
                    offered = version,
                    "keeping the roster held: the one offered drops or changes a revocation, \
                     and a revocation is final"
                );
                return Err(RosterError::RevocationChanged {
                    key: revocation.key,
                });
            }
        }
        Ok(offered)
    }

    /// Whether `offered` is this roster: the same version and the same content, whatever its
    /// encoding. `replaced_by` would give it back, but there is nothing to adopt.
    pub fn is_same_roster(&self, offered: &Membership) -> bool {
        offered.version() == self.version() && offered.view == self.view
    }

    /// Whether `author` may write the change with hash `change`.
    pub fn admit(&self, author: &Bytes32, change: &ChangeHash) -> Admission {
        let Some(institution) = self.view.institution_of(author) else {
            return Admission::Stranger;
        };
        let institution = institution.id.clone();
        match self.view.revocation_of(author) {
            None => Admission::Member(institution),
            Some(revocation) if revocation.cutoff.contains(&Bytes32(change.0)) => {
                Admission::WithinCutoff(institution)
            }
            Some(_) => Admission::Revoked {
                institution,
                key: *author,
            },
        }
    }

    /// The institution holding `key`, revoked or not.
    pub fn institution_of(&self, key: &Bytes32) -> Option<InstitutionId> {
        self.view.institution_of(key).map(|i| i.id.clone())
    }

    /// The institution of the node behind `peer`, if its key is a current member's: whom a
    /// node lets connect. A revoked key's node is refused like a stranger's.
    pub fn peer_institution(&self, peer: &PeerId) -> Option<InstitutionId> {
        self.institution_of(self.peers.get(peer)?)
    }

    /// The revoked keys that name `change` as one of their cut-off heads.
    pub fn cutoff_keys_of(&self, change: &ChangeHash) -> Vec<Bytes32> {
        self.cutoff_heads
            .get(&change.0)
            .cloned()
            .unwrap_or_default()
    }

    /// The cut-off heads of a revoked key (empty for a key that is not revoked).
    pub fn cutoff_of(&self, key: &Bytes32) -> BTreeSet<Bytes32> {
        self.view
            .revocation_of(key)
            .map(|r| r.cutoff.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Every revoked key.
    pub fn revoked_keys(&self) -> Vec<Bytes32> {
        self.view.revocations.iter().map(|r| r.key).collect()
    }
}
