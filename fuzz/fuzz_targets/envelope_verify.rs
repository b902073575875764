//! Arbitrary bytes as a peer's envelope: decode and signature check return a typed result,
//! never panic.
#![no_main]

use std::sync::Once;

use estuary_node::envelope::Envelope;
use libfuzzer_sys::fuzz_target;

static QUIET: Once = Once::new();

fuzz_target!(|bytes: &[u8]| {
    // The change decoder contains automerge's panics on purpose (see document_load).
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(verified) = Envelope::verify(bytes) {
        assert_eq!(verified.change.hash(), verified.hash);
    }
});
