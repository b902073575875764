//! Envelopes: signing, verification, and every way an envelope can be wrong.

mod common;

use estuary_node::envelope::{ENVELOPE_BYTES_MAX, Envelope, EnvelopeError};
use estuary_node::identity::Identity;
use estuary_node::model::*;

fn editor() -> Editor {
    common::editor("chc-jianshe")
}

fn demographics() -> Demographics {
    common::resident("Jianguo")
}

/// A signed creation change of a health file written by `identity`.
fn signed(identity: &Identity) -> (DocumentId, Vec<u8>) {
    let mut file = HealthFile::create(&identity.actor(), &editor(), &demographics()).unwrap();
    let mut change = file.changes_since(&[]).remove(0);
    (
        file.id(),
        Envelope::sign(identity, file.id(), &mut change).encode(),
    )
}

#[test]
fn a_signed_change_verifies() {
    let identity = Identity::from_secret([7; 32]);
    let (document, bytes) = signed(&identity);
    let verified = Envelope::verify(&bytes).unwrap();
    assert_eq!(verified.document, document);
    assert_eq!(verified.author, identity.public_key());
    assert_eq!(
        document_id_of(&verified.hash),
        document,
        "a creation change names its document"
    );
}

#[test]
fn a_flipped_signature_bit_is_refused() {
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let mut envelope = Envelope::decode(&bytes).unwrap();
    envelope.signature[10] ^= 1;
    assert!(matches!(
        Envelope::verify(&envelope.encode()),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn a_change_replayed_into_another_document_is_refused() {
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let mut envelope = Envelope::decode(&bytes).unwrap();
    envelope.document[0] ^= 1;
    assert!(matches!(
        Envelope::verify(&envelope.encode()),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn a_change_signed_by_another_key_than_its_author_is_refused() {
    let author = Identity::from_secret([7; 32]);
    let forger = Identity::from_secret([8; 32]);
    let mut file = HealthFile::create(&author.actor(), &editor(), &demographics()).unwrap();
    let mut change = file.changes_since(&[]).remove(0);
    let bytes = Envelope::sign(&forger, file.id(), &mut change).encode();
    assert!(matches!(
        Envelope::verify(&bytes),
        Err(EnvelopeError::BadSignature)
    ));
}

#[test]
fn an_author_that_is_not_a_node_key_is_refused() {
    let identity = Identity::from_secret([7; 32]);
    let mut file =
        HealthFile::create(&Actor::from_bytes(vec![1; 16]), &editor(), &demographics()).unwrap();
    let mut change = file.changes_since(&[]).remove(0);
    let bytes = Envelope::sign(&identity, file.id(), &mut change).encode();
    assert!(matches!(
        Envelope::verify(&bytes),
        Err(EnvelopeError::NotANodeKey)
    ));
}

#[test]
fn oversized_input_is_refused_before_decoding() {
    let bytes = vec![0u8; ENVELOPE_BYTES_MAX + 1];
    assert!(matches!(
        Envelope::verify(&bytes),
        Err(EnvelopeError::TooLarge { .. })
    ));
}

#[test]
fn malformed_bytes_are_refused() {
    for bytes in [&b""[..], b"\xff\xff", b"garbage that is not cbor"] {
        assert!(
            matches!(
                Envelope::verify(bytes),
                Err(EnvelopeError::Malformed { .. })
            ),
            "{bytes:?}"
        );
    }
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let mut envelope = Envelope::decode(&bytes).unwrap();
    envelope.signature.truncate(10);
    assert!(matches!(
        Envelope::verify(&envelope.encode()),
        Err(EnvelopeError::Malformed { .. })
    ));
}

#[test]
fn undecodable_change_bytes_are_refused() {
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let mut envelope = Envelope::decode(&bytes).unwrap();
    envelope.change = b"not a change".to_vec();
    assert!(matches!(
        Envelope::verify(&envelope.encode()),
        Err(EnvelopeError::Change(_))
    ));
}

#[test]
fn a_newer_version_is_refused() {
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let mut envelope = Envelope::decode(&bytes).unwrap();
    envelope.version = 2;
    assert!(matches!(
        Envelope::verify(&envelope.encode()),
        Err(EnvelopeError::UnsupportedVersion { found: 2 })
    ));
}

#[test]
fn byte_fields_are_encoded_as_bytes() {
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let envelope = Envelope::decode(&bytes).unwrap();
    let payload = envelope.change.len() + 16 + 64;
    assert!(
        bytes.len() < payload + 64,
        "{} bytes for a {payload}-byte payload",
        bytes.len()
    );
}

/// A relay that pads an envelope, or re-encodes it, would give one change several digests
/// (its quarantine key, its gossip message id) while every copy still verifies: only the
/// encoding the signer wrote is taken.
#[test]
fn a_padded_or_re_encoded_envelope_is_refused() {
    let (_, bytes) = signed(&Identity::from_secret([7; 32]));
    let trailing = |candidate: &[u8]| {
        matches!(
            Envelope::verify(candidate),
            Err(EnvelopeError::Malformed { reason }) if reason.contains("trailing")
        )
    };
    let mut padded = bytes.clone();
    padded.push(0);
    assert!(trailing(&padded));
    let mut twice = bytes.clone();
    twice.extend_from_slice(&bytes);
    assert!(trailing(&twice));

    #[derive(serde::Serialize)]
    struct Reordered<'a> {
        #[serde(with = "serde_bytes")]
        signature: &'a [u8],
        #[serde(with = "serde_bytes")]
        change: &'a [u8],
        #[serde(with = "serde_bytes")]
        document: &'a [u8],
        version: u8,
    }
    let envelope = Envelope::decode(&bytes).unwrap();
    let mut reordered = Vec::new();
    ciborium::into_writer(
        &Reordered {
            signature: &envelope.signature,
            change: &envelope.change,
            document: &envelope.document,
            version: envelope.version,
        },
        &mut reordered,
    )
    .unwrap();
    assert_ne!(reordered, bytes);
    assert!(matches!(
        Envelope::verify(&reordered),
        Err(EnvelopeError::Malformed { .. })
    ));
    assert!(Envelope::verify(&bytes).is_ok());
}
