//! Arbitrary bytes as an offline bundle, in clear or sealed to a node's key: the reader
//! returns envelopes or documents, or a typed error, never panics, and never allocates past
//! one frame's (or one sealed chunk's) bound.
#![no_main]

use estuary_node::bundle::{BUNDLE_DOCUMENT_BYTES_MAX, BundleItem, BundleReader};
use estuary_node::identity::Identity;
use libfuzzer_sys::fuzz_target;

fn read_all<R: std::io::Read>(mut reader: BundleReader<R>) {
    while let Ok(Some(item)) = reader.next_item() {
        match item {
            BundleItem::Envelope(envelope) => {
                assert!(envelope.len() <= estuary_node::envelope::ENVELOPE_BYTES_MAX)
            }
            BundleItem::Document(document) => assert!(document.len() <= BUNDLE_DOCUMENT_BYTES_MAX),
        }
    }
}

fuzz_target!(|bytes: &[u8]| {
    if let Ok(reader) = BundleReader::open(bytes) {
        read_all(reader);
    }
    // The same bytes as a bundle sealed to this node's key.
    let recipient = Identity::from_secret([7; 32]);
    if let Ok(reader) = BundleReader::open_with_key(bytes, &recipient) {
        read_all(reader);
    }
});
