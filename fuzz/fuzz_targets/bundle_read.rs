//! Arbitrary bytes as an offline bundle: the reader returns envelopes or a typed error, never
//! panics, and never allocates past one frame's bound.
#![no_main]

use estuary_node::bundle::BundleReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(mut reader) = BundleReader::open(bytes) else { return };
    while let Ok(Some(envelope)) = reader.next_envelope() {
        assert!(envelope.len() <= estuary_node::envelope::ENVELOPE_BYTES_MAX);
    }
});
