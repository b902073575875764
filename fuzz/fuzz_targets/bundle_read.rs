//! Arbitrary bytes as an offline bundle, in clear or sealed to a node's key: the reader
//! returns envelopes or a typed error, never panics, and never allocates past one frame's
//! (or one sealed chunk's) bound.
#![no_main]

use estuary_node::bundle::BundleReader;
use estuary_node::identity::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(mut reader) = BundleReader::open(bytes) {
        while let Ok(Some(envelope)) = reader.next_envelope() {
            assert!(envelope.len() <= estuary_node::envelope::ENVELOPE_BYTES_MAX);
        }
    }
    // The same bytes as a bundle sealed to this node's key.
    let recipient = Identity::from_secret([7; 32]);
    if let Ok(mut reader) = BundleReader::open_with_key(bytes, &recipient) {
        while let Ok(Some(envelope)) = reader.next_envelope() {
            assert!(envelope.len() <= estuary_node::envelope::ENVELOPE_BYTES_MAX);
        }
    }
});
