//! The signed roster: only the authority's signature counts, a newer roster replaces an older
//! one and never the reverse, and admission follows membership and revocation.

mod common;

use estuary_node::identity::Identity;
use estuary_node::membership::{Admission, RosterError, RosterUpdate, SignedRoster};
use estuary_node::model::automerge::ChangeHash;
use estuary_node::model::*;

fn authority() -> Identity {
    Identity::from_secret([1; 32])
}

fn editor() -> Editor {
    Editor {
        institution: InstitutionId::new("xinhua").unwrap(),
        at: Timestamp(1),
    }
}

fn member() -> Identity {
    Identity::from_secret([2; 32])
}

/// A roster with Xinhua holding `member()`'s key, at version 3.
fn roster() -> Roster {
    let mut roster = Roster::create(&authority().actor(), &editor()).unwrap();
    roster
        .apply(
            &editor(),
            &RosterOp::AddInstitution {
                id: InstitutionId::new("xinhua").unwrap(),
                name: "Xinhua Hospital".into(),
                kind: InstitutionKind::CoreHospital,
            },
        )
        .unwrap();
    roster
        .apply(
            &editor(),
            &RosterOp::AddNodeKey {
                institution: InstitutionId::new("xinhua").unwrap(),
                key: member().public_key(),
            },
        )
        .unwrap();
    roster
}

#[test]
fn a_roster_signed_by_the_authority_is_accepted() {
    let signed = SignedRoster::sign(&authority(), &mut roster()).encode();
    let membership = SignedRoster::verify(&signed, &authority().public_key()).unwrap();
    assert_eq!(membership.version(), 3);
    assert_eq!(membership.encoded(), signed.as_slice());
}

#[test]
fn a_forged_authority_signature_is_rejected() {
    let forger = Identity::from_secret([9; 32]);
    let forged = SignedRoster::sign(&forger, &mut roster()).encode();
    assert!(matches!(
        SignedRoster::verify(&forged, &authority().public_key()),
        Err(RosterError::BadSignature)
    ));
    // A genuine signature over other content is rejected too.
    let mut signed = SignedRoster::sign(&authority(), &mut roster());
    let mut other = roster();
    other
        .apply(
            &editor(),
            &RosterOp::AddInstitution {
                id: InstitutionId::new("intruder").unwrap(),
                name: "Intruder".into(),
                kind: InstitutionKind::CommunityCentre,
            },
        )
        .unwrap();
    signed.roster = other.save();
    assert!(matches!(
        SignedRoster::verify(&signed.encode(), &authority().public_key()),
        Err(RosterError::BadSignature)
    ));
}

#[test]
fn an_older_roster_never_replaces_a_newer_one() {
    let mut document = roster();
    let old = SignedRoster::verify(
        &SignedRoster::sign(&authority(), &mut document).encode(),
        &authority().public_key(),
    )
    .unwrap();
    document
        .apply(
            &editor(),
            &RosterOp::AddInstitution {
                id: InstitutionId::new("chc-jianshe").unwrap(),
                name: "Jianshe CHC".into(),
                kind: InstitutionKind::CommunityCentre,
            },
        )
        .unwrap();
    let new = SignedRoster::verify(
        &SignedRoster::sign(&authority(), &mut document).encode(),
        &authority().public_key(),
    )
    .unwrap();
    let held = old.replaced_by(new.clone()).unwrap();
    assert_eq!(held.version(), 4);
    assert!(matches!(
        held.replaced_by(old),
        Err(RosterError::Stale {
            current: 4,
            offered: 3
        })
    ));
    assert_eq!(
        held.replaced_by(new).unwrap().version(),
        4,
        "the same roster again is fine"
    );
}

#[test]
fn two_rosters_with_one_version_are_refused() {
    let a = SignedRoster::verify(
        &SignedRoster::sign(&authority(), &mut roster()).encode(),
        &authority().public_key(),
    )
    .unwrap();
    let mut other = Roster::create(&authority().actor(), &editor()).unwrap();
    for id in ["a", "b"] {
        other
            .apply(
                &editor(),
                &RosterOp::AddInstitution {
                    id: InstitutionId::new(id).unwrap(),
                    name: id.into(),
                    kind: InstitutionKind::CommunityCentre,
                },
            )
            .unwrap();
    }
    let b = SignedRoster::verify(
        &SignedRoster::sign(&authority(), &mut other).encode(),
        &authority().public_key(),
    )
    .unwrap();
    assert_eq!(a.version(), b.version());
    assert!(matches!(
        a.replaced_by(b),
        Err(RosterError::Diverged { version: 3 })
    ));
}

#[test]
fn admission_follows_membership_and_revocation() {
    let change = ChangeHash([5; 32]);
    let accepted = ChangeHash([6; 32]);
    let mut document = roster();
    let membership = SignedRoster::verify(
        &SignedRoster::sign(&authority(), &mut document).encode(),
        &authority().public_key(),
    )
    .unwrap();
    let xinhua = InstitutionId::new("xinhua").unwrap();
    assert_eq!(
        membership.admit(&member().public_key(), &change),
        Admission::Member(xinhua.clone())
    );
    assert_eq!(
        membership.admit(&Identity::from_secret([3; 32]).public_key(), &change),
        Admission::Stranger
    );
    // The same key, seen as a network peer.
    assert_eq!(
        membership.peer_institution(&member().peer_id()),
        Some(xinhua.clone())
    );
    assert_eq!(
        membership.peer_institution(&Identity::from_secret([3; 32]).peer_id()),
        None
    );

    document
        .apply(
            &editor(),
            &RosterOp::Revoke {
                key: member().public_key(),
                cutoff: vec![Bytes32(accepted.0)],
                reason: "node compromised".into(),
            },
        )
        .unwrap();
    let revoked = SignedRoster::verify(
        &SignedRoster::sign(&authority(), &mut document).encode(),
        &authority().public_key(),
    )
    .unwrap();
    assert_eq!(
        revoked.admit(&member().public_key(), &accepted),
        Admission::WithinCutoff(xinhua.clone())
    );
    assert!(matches!(
        revoked.admit(&member().public_key(), &change),
        Admission::Revoked { .. }
    ));
    // A revoked key's node may no longer connect.
    assert_eq!(revoked.peer_institution(&member().peer_id()), None);
}

#[test]
fn malformed_and_oversized_rosters_are_refused() {
    assert!(matches!(
        SignedRoster::verify(b"junk", &authority().public_key()),
        Err(RosterError::Malformed { .. })
    ));
    let big = vec![0u8; estuary_node::membership::SIGNED_ROSTER_BYTES_MAX + 1];
    assert!(matches!(
        SignedRoster::verify(&big, &authority().public_key()),
        Err(RosterError::TooLarge { .. })
    ));
}

#[test]
fn a_padded_roster_is_refused() {
    let signed = SignedRoster::sign(&authority(), &mut roster()).encode();
    let mut padded = signed.clone();
    padded.extend_from_slice(b"junk");
    assert!(matches!(
        SignedRoster::verify(&padded, &authority().public_key()),
        Err(RosterError::Malformed { reason }) if reason.contains("trailing")
    ));
    assert!(SignedRoster::verify(&signed, &authority().public_key()).is_ok());
}

/// The roster a node holds, offered again (gossiped again, or re-encoded by a relay), costs
/// no write and no flush: the witness file, rewritten by every flush, is left alone.
#[test]
fn the_roster_held_offered_again_writes_nothing() {
    let mut consortium = common::Consortium::new(2);
    let node = consortium.node(0);
    let witness = consortium
        .dir
        .path()
        .join("member-0")
        .join(estuary_node::store::WITNESS_FILE);
    let modified = || std::fs::metadata(&witness).unwrap().modified().unwrap();
    #[derive(serde::Serialize)]
    struct Reordered<'a> {
        #[serde(with = "serde_bytes")]
        signature: &'a [u8],
        #[serde(with = "serde_bytes")]
        roster: &'a [u8],
        version: u8,
    }
    let held: SignedRoster = ciborium::from_reader(consortium.roster.as_slice()).unwrap();
    let mut re_encoded = Vec::new();
    ciborium::into_writer(
        &Reordered {
            signature: &held.signature,
            roster: &held.roster,
            version: held.version,
        },
        &mut re_encoded,
    )
    .unwrap();
    assert_ne!(re_encoded, consortium.roster);
    let before = modified();
    // File times have the kernel clock's granularity: a write now would show.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let version = node.roster_version();
    for offered in [&consortium.roster, &re_encoded] {
        assert_eq!(
            node.update_roster(offered).unwrap(),
            RosterUpdate::AlreadyHeld { version }
        );
    }
    assert_eq!(modified(), before, "the roster held was written again");
    assert_eq!(node.signed_roster(), consortium.roster);
    // A newer roster is written, and the witness shows it.
    let newer = consortium.revoke("member-1");
    assert_eq!(
        node.update_roster(&newer).unwrap(),
        RosterUpdate::Adopted {
            version: version + 1
        }
    );
    assert_ne!(modified(), before);
}
