//! Arbitrary automerge change bytes into a node's store, as a member's signed change: the
//! pipeline accepts, holds or quarantines it with a reason — never a panic, never a store
//! left unsound. The input's first byte chooses how it is used: as a whole change chunk, or
//! spliced into a member's genuine change; either way its checksum is made right, so the
//! fuzzer reaches the decoder and the pipeline rather than the checksum.
#![no_main]

mod common;

use estuary_node::envelope::Envelope;
use estuary_node::model::{DocumentId, document_id_of};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};

/// An automerge chunk: magic (4 bytes), checksum (4), then type, length and body.
const HEADER_BYTES: usize = 8;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let member = common::member();
    let mut bytes = match mode % 2 {
        0 => rest.to_vec(),
        _ => {
            let template = Envelope::decode(&member.creation).expect("a genuine envelope").change;
            let Some((&at, patch)) = rest.split_first() else {
                return;
            };
            let mut bytes = template.clone();
            let at = HEADER_BYTES + usize::from(at) % (bytes.len() - HEADER_BYTES);
            for (i, b) in patch.iter().enumerate().take(bytes.len() - at) {
                bytes[at + i] ^= b;
            }
            bytes
        }
    };
    if bytes.len() > HEADER_BYTES {
        let checksum = Sha256::digest(&bytes[HEADER_BYTES..]);
        bytes[4..HEADER_BYTES].copy_from_slice(&checksum[..4]);
    }
    let Ok(mut change) = estuary_node::model::decode_change(&bytes) else {
        return;
    };
    // A creation change claims its own document; any other goes to the member's file.
    let document = if change.deps().is_empty() {
        document_id_of(&change.hash())
    } else {
        member.file
    };
    let document: DocumentId = document;
    let envelope = Envelope::sign(&member.identity, document, &mut change).encode();
    let _ = member.node.ingest(&envelope);
});
