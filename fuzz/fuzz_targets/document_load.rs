//! Arbitrary bytes as a saved document: decoding and validation must return a typed result,
//! never panic, and agree with the typed loaders.
#![no_main]

use estuary_crdt_model::automerge::AutoCommit;
use estuary_crdt_model::{Actor, DocumentKind, HealthFile, Referral, Roster, validate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(doc) = AutoCommit::load(bytes) else { return };
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
