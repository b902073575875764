//! Arbitrary bytes as a sync request, response or gossip message, decoded as the node
//! decodes them: a typed result, never a panic, no unbounded allocation.
#![no_main]

use estuary_node::sync::protocol::{Gossip, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = ciborium::from_reader::<Request, _>(bytes);
    let _ = ciborium::from_reader::<Response, _>(bytes);
    let _ = Gossip::decode(bytes);
});
