//! An Estuary node: one member institution's replica of the consortium's documents.
//!
//! The node holds its identity and signed change envelopes, the durable store, sync over
//! libp2p and the HTTP API. It re-exports the data model it stands on, so that `cli` and
//! `testnet` depend on `node` alone.

pub use estuary_crdt_model as model;

pub mod api;
pub mod audit;
pub mod authorship;
pub mod bundle;
mod cbor;
pub mod config;
pub mod crash_writer;
pub mod envelope;
pub mod identity;
pub mod import;
mod index;
pub mod latency;
pub mod membership;
pub mod reconcile;
pub mod replica;
pub mod riblt;
pub mod store;
pub mod sync;

pub use index::{ResidentSummary, SEARCH_RESULTS_MAX};

/// Log directives every log filter of ours ends with, whatever `RUST_LOG` asks: crates that
/// log stored or carried values when verbose are held at `info`. sled logs whole write
/// batches and pages at trace — envelopes, snapshots and name index keys, which hold patient
/// data; yamux logs a data frame that arrives for a stream already dropped, body and all, at
/// trace — decrypted sync messages, envelopes included (the canary test found both); and the
/// HTTP client of the `estuary` command and the testnet, ureq, hex-dumps every body it sends
/// and receives at trace — health files read through the API (found by the canary test once
/// the demo read files back to check their links). The log-structured engine (fjall and its
/// tree, lsm-tree) is held at `info` too: its debug and trace lines name tables by their key
/// ranges, and a key of the name index holds a resident's name.
pub const LOG_CAPS: [&str; 6] = [
    "sled=info",
    "yamux=info",
    "ureq=info",
    "ureq_proto=info",
    "fjall=info",
    "lsm_tree=info",
];

use model::{DocumentKind, ValidationError};

/// Why a saved document could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The bytes are not a readable automerge document.
    #[error(transparent)]
    Decode(model::LoadError),
    /// The document breaks the model's rules.
    #[error("document is invalid: {0}")]
    Invalid(#[from] ValidationError),
}

/// Loads a saved document, validates it and returns its kind and typed view as JSON.
///
/// The view contains patient data: callers show it only to an authorised operator.
pub fn inspect_document(bytes: &[u8]) -> Result<(DocumentKind, serde_json::Value), InspectError> {
    let doc = model::load_document(bytes).map_err(InspectError::from)?;
    let kind = model::validate(&doc)?;
    let actor = model::Actor::from_bytes(Vec::new());
    let view = match kind {
        DocumentKind::HealthFile => to_json(model::HealthFile::from_automerge(doc, &actor)?.view()),
        DocumentKind::Referral => to_json(model::Referral::from_automerge(doc, &actor)?.view()),
        DocumentKind::Roster => to_json(model::Roster::from_automerge(doc, &actor)?.view()),
    };
    Ok((kind, view))
}

fn to_json(view: impl serde::Serialize) -> serde_json::Value {
    // Views are plain data (strings, numbers, vectors): serialising them cannot fail.
    serde_json::to_value(view).expect("views serialise to JSON")
}

impl From<model::LoadError> for InspectError {
    fn from(error: model::LoadError) -> Self {
        match error {
            model::LoadError::Invalid(e) => InspectError::Invalid(e),
            model::LoadError::WrongKind { .. } => {
                InspectError::Invalid(ValidationError::UnknownDocumentType)
            }
            decode @ (model::LoadError::Decode(_)
            | model::LoadError::DecoderFault
            | model::LoadError::Refused { .. }) => InspectError::Decode(decode),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::*;

    #[test]
    fn inspects_a_saved_referral_and_rejects_garbage() {
        let editor = Editor {
            institution: InstitutionId::new("chc-a").unwrap(),
            at: Timestamp(0),
        };
        let mut referral = Referral::create(
            &Actor::from_bytes(vec![1; 32]),
            &editor,
            &NewReferral {
                patient: DocumentId::from_bytes([4; 16]),
                direction: Direction::Up,
                to: InstitutionId::new("core").unwrap(),
                reason: "review".into(),
                urgency: Urgency::Routine,
                handover: String::new(),
            },
        )
        .unwrap();
        let (kind, view) = inspect_document(&referral.save()).unwrap();
        assert_eq!(kind, DocumentKind::Referral);
        assert_eq!(view["status"], "requested");
        assert!(matches!(
            inspect_document(b"\x85\x6f\x4a\x83garbage"),
            Err(InspectError::Decode(_))
        ));
    }
}
