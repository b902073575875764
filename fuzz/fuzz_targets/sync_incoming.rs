//! Arbitrary bytes as a peer's automerge sync message for a document the node holds, through
//! the same handler a sync request reaches (`document::incoming`, then the answer): a typed
//! error or changes judged one by one, never a panic.
#![no_main]

mod common;

use estuary_node::model::automerge::sync;
use estuary_node::sync::document;
use estuary_node::sync::protocol::{ChangeSignature, SyncMessage};
use libfuzzer_sys::fuzz_target;
use serde_bytes::{ByteArray, ByteBuf};

fuzz_target!(|input: &[u8]| {
    let member = common::member();
    // The first byte: whether the message claims a signature (of the bytes that follow it).
    let Some((&flags, message)) = input.split_first() else {
        return;
    };
    let signatures = if flags & 1 == 1 && message.len() >= 96 {
        vec![ChangeSignature {
            change: ByteArray::new(message[..32].try_into().expect("32 bytes")),
            signature: ByteArray::new(message[32..96].try_into().expect("64 bytes")),
        }]
    } else {
        Vec::new()
    };
    let incoming = SyncMessage {
        document: ByteArray::new(*member.file.as_bytes()),
        message: ByteBuf::from(message.to_vec()),
        signatures,
        first: flags & 2 == 2,
    };
    let mut state = sync::State::new();
    if document::incoming(&member.node, &incoming, &mut state).is_ok() {
        let _ = document::outgoing(
            &member.node,
            member.file,
            &mut state,
            estuary_node::sync::protocol::SYNC_MESSAGE_BYTES_MAX,
        );
    }
});
