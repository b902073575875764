//! Arbitrary bytes as a saved document: decoding and validation must return a typed result,
//! never panic, and agree with the typed loaders.
#![no_main]

use std::sync::Once;

use estuary_crdt_model::{Actor, DocumentKind, HealthFile, Referral, Roster, load_document, validate};
use libfuzzer_sys::fuzz_target;

static QUIET: Once = Once::new();

fuzz_target!(|bytes: &[u8]| {
    // `load_document` contains automerge's decoder panics on purpose. libfuzzer-sys installs a
    // hook that aborts on every panic, caught or not; replace it with a silent one. A panic
    // that escapes still fails the run: the fuzz_target wrapper aborts on it.
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let Ok(doc) = load_document(bytes) else { return };
    let verdict = validate(&doc);
    let actor = Actor::from_bytes(vec![1; 32]);
    match verdict {
        Ok(DocumentKind::HealthFile) => {
            let file = HealthFile::from_automerge(doc, &actor).expect("validated files load");
            let _ = serde_json::to_vec(&file.view()).expect("views serialise");
        }
        Ok(DocumentKind::Referral) => {
            let referral = Referral::from_automerge(doc, &actor).expect("validated referrals load");
            let _ = serde_json::to_vec(&referral.view()).expect("views serialise");
        }
        Ok(DocumentKind::Roster) => {
            let roster = Roster::from_automerge(doc, &actor).expect("validated rosters load");
            let _ = serde_json::to_vec(&roster.view()).expect("views serialise");
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
