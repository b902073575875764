//! Arbitrary bytes as a sync request, response or gossip message, decoded as the node
//! decodes them: a typed result, never a panic, no unbounded allocation.
#![no_main]

use estuary_node::sync::protocol::{Codec, Gossip, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let _ = Codec::decode::<Request>(bytes);
    let _ = Codec::decode::<Response>(bytes);
    let _ = Gossip::decode(bytes);
});
