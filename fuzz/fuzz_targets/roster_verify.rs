//! Arbitrary bytes as a signed roster from a peer: verification returns a typed result, never
//! panics.
#![no_main]

use std::sync::Once;

use estuary_node::membership::SignedRoster;
use estuary_node::model::Bytes32;
use libfuzzer_sys::fuzz_target;

static QUIET: Once = Once::new();

fuzz_target!(|bytes: &[u8]| {
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    // Any key: a forged signature fails, and decoding comes first.
    let _ = SignedRoster::verify(bytes, &Bytes32([7; 32]));
});
