//! The roster's typed operations.

mod common;

use common::*;
use estuary_crdt_model::automerge::transaction::Transactable;
use estuary_crdt_model::automerge::{AutoCommit, ObjId, ObjType, ReadDoc, ScalarValue};
use estuary_crdt_model::*;

fn authority() -> Editor {
    editor("xinhua", 1_000)
}

fn key(n: u8) -> Bytes32 {
    Bytes32([n; 32])
}

fn roster() -> Roster {
    let mut roster = Roster::create(&actor(1), &authority()).unwrap();
    roster
        .apply(
            &authority(),
            &RosterOp::AddInstitution {
                id: institution("xinhua"),
                name: "Xinhua Hospital".into(),
                kind: InstitutionKind::CoreHospital,
            },
        )
        .unwrap();
    roster
}

#[test]
fn add_institution_and_key_raise_the_version() {
    let mut roster = roster();
    roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("xinhua"),
                key: key(7),
            },
        )
        .unwrap();
    let view = roster.view();
    assert_eq!(view.version, 3);
    assert_eq!(view.institutions[0].kind, InstitutionKind::CoreHospital);
    assert_eq!(
        view.institution_of(&key(7)).unwrap().id,
        institution("xinhua")
    );
    assert!(view.institution_of(&key(8)).is_none());
}

#[test]
fn a_key_belongs_to_one_institution() {
    let mut roster = roster();
    roster
        .apply(
            &authority(),
            &RosterOp::AddInstitution {
                id: institution("chc-jianshe"),
                name: "Jianshe CHC".into(),
                kind: InstitutionKind::CommunityCentre,
            },
        )
        .unwrap();
    roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("xinhua"),
                key: key(7),
            },
        )
        .unwrap();
    let error = roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("chc-jianshe"),
                key: key(7),
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::InvalidValue { .. })
    ));
    let error = roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("nowhere"),
                key: key(8),
            },
        )
        .unwrap_err();
    assert!(matches!(
        error,
        OpError::Invalid(ValidationError::InvalidValue { .. })
    ));
}

#[test]
fn revoke_records_the_cut_off() {
    let mut roster = roster();
    roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("xinhua"),
                key: key(7),
            },
        )
        .unwrap();
    roster
        .apply(
            &authority(),
            &RosterOp::Revoke {
                key: key(7),
                cutoff: vec![key(1), key(2)],
                reason: "key lost".into(),
            },
        )
        .unwrap();
    let view = roster.view();
    let revocation = view.revocation_of(&key(7)).unwrap();
    assert_eq!(revocation.cutoff, vec![key(1), key(2)]);
    assert_eq!(revocation.reason, "key lost");
    let error = roster
        .apply(
            &authority(),
            &RosterOp::Revoke {
                key: key(9),
                cutoff: vec![],
                reason: "x".into(),
            },
        )
        .unwrap_err();
    assert!(matches!(error, OpError::Invalid(_)));
}

#[test]
fn roster_round_trips_through_save() {
    let mut roster = roster();
    let loaded = Roster::load(&roster.save(), &actor(2)).unwrap();
    assert_eq!(loaded.view(), roster.view());
    let json = serde_json::to_string(&roster.view()).unwrap();
    let back: RosterView = serde_json::from_str(&json).unwrap();
    assert_eq!(back, roster.view());
}

#[test]
fn save_incremental_round_trips() {
    let mut roster = roster();
    let mut copy = Roster::load(&roster.save(), &actor(2)).unwrap();
    roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("xinhua"),
                key: key(7),
            },
        )
        .unwrap();
    copy.load_incremental(&roster.save_incremental()).unwrap();
    assert_eq!(copy.view(), roster.view());
    assert_eq!(copy.heads(), roster.heads());
}

/// A roster where Xinhua holds key 7, revoked with cut-off `[1]`.
fn revoked() -> Roster {
    let mut roster = roster();
    roster
        .apply(
            &authority(),
            &RosterOp::AddNodeKey {
                institution: institution("xinhua"),
                key: key(7),
            },
        )
        .unwrap();
    roster
        .apply(
            &authority(),
            &RosterOp::Revoke {
                key: key(7),
                cutoff: vec![key(1)],
                reason: "key lost".into(),
            },
        )
        .unwrap();
    roster
}

#[test]
fn a_revocation_is_final() {
    let mut roster = revoked();
    let before = roster.view();
    let error = roster
        .apply(
            &authority(),
            &RosterOp::Revoke {
                key: key(7),
                cutoff: vec![key(2)],
                reason: "a later line".into(),
            },
        )
        .unwrap_err();
    let OpError::Invalid(ValidationError::InvalidValue { field, reason }) = error else {
        panic!("expected the revocation to be refused, got {error:?}");
    };
    assert_eq!(field, "revocations");
    assert!(reason.contains("final"), "{reason}");
    assert_eq!(roster.view(), before, "nothing was written");
}

/// `roster` with `edit` committed as one raw automerge change, past the typed operations'
/// rules, as a hand-crafted roster or an older tool's could be. `edit` gets the revocations map.
fn raw(roster: &Roster, edit: impl FnOnce(&mut AutoCommit, &ObjId)) -> Roster {
    let mut doc = roster.automerge().clone();
    let Some((_, revocations)) = doc.get(automerge::ROOT, "revocations").unwrap() else {
        panic!("a roster has revocations");
    };
    edit(&mut doc, &revocations);
    doc.commit();
    Roster::from_automerge(doc, &actor(1)).expect("the state itself is valid")
}

/// A raw edit of a roster document, given its revocations map.
type Edit = fn(&mut AutoCommit, &ObjId);

fn entry_of(doc: &AutoCommit, revocations: &ObjId, key: Bytes32) -> ObjId {
    doc.get(revocations, key.to_string()).unwrap().unwrap().1
}

#[test]
fn a_history_of_added_revocations_is_accepted() {
    let mut roster = revoked();
    for n in [8, 9] {
        for op in [
            RosterOp::AddNodeKey {
                institution: institution("xinhua"),
                key: key(n),
            },
            RosterOp::Revoke {
                key: key(n),
                cutoff: vec![key(n), key(1)],
                reason: "key lost".into(),
            },
        ] {
            roster.apply(&authority(), &op).unwrap();
        }
    }
    assert_eq!(roster.check_revocations_final(), Ok(()));
    let mut loaded = Roster::load(&roster.save(), &actor(2)).unwrap();
    assert_eq!(loaded.check_revocations_final(), Ok(()));
}

#[test]
fn a_history_that_changes_a_revocation_is_refused() {
    let changed = Err(RevocationHistoryError::Changed { key: key(7) });
    let rewritten: [(&str, Edit); 4] = [
        ("revoked again", |doc, revocations| {
            let entry = doc
                .put_object(revocations, key(7).to_string(), ObjType::Map)
                .unwrap();
            doc.put(&entry, "at", ScalarValue::Timestamp(2_000))
                .unwrap();
            doc.put(&entry, "reason", "a later line").unwrap();
            let list = doc.put_object(&entry, "cutoff", ObjType::List).unwrap();
            doc.insert(&list, 0, ScalarValue::Bytes(vec![2; 32]))
                .unwrap();
        }),
        ("removed", |doc, revocations| {
            doc.delete(revocations, key(7).to_string()).unwrap()
        }),
        ("cut-off extended in place", |doc, revocations| {
            let entry = entry_of(doc, revocations, key(7));
            let list = doc.get(&entry, "cutoff").unwrap().unwrap().1;
            doc.insert(&list, 1, ScalarValue::Bytes(vec![2; 32]))
                .unwrap();
        }),
        ("reason rewritten", |doc, revocations| {
            let entry = entry_of(doc, revocations, key(7));
            doc.put(&entry, "reason", "another reason").unwrap();
        }),
    ];
    for (what, edit) in rewritten {
        let mut roster = raw(&revoked(), edit);
        assert_eq!(roster.check_revocations_final(), changed, "{what}");
        // The verdict comes from the history itself, so a replica loaded from the bytes
        // reaches it too.
        let mut loaded = Roster::load(&roster.save(), &actor(2)).unwrap();
        assert_eq!(loaded.check_revocations_final(), changed, "{what}");
    }
    let mut replaced = raw(&revoked(), |doc, _| {
        doc.put_object(automerge::ROOT, "revocations", ObjType::Map)
            .unwrap();
    });
    assert!(replaced.view().revocations.is_empty());
    assert_eq!(
        replaced.check_revocations_final(),
        Err(RevocationHistoryError::Rewritten)
    );
}

#[test]
fn concurrent_revocations_of_one_key_are_refused_and_of_two_keys_accepted() {
    let mut base = roster();
    for n in [7, 8] {
        let add = RosterOp::AddNodeKey {
            institution: institution("xinhua"),
            key: key(n),
        };
        base.apply(&authority(), &add).unwrap();
    }
    let revoke = |roster: &mut Roster, n: u8, head: u8| {
        let op = RosterOp::Revoke {
            key: key(n),
            cutoff: vec![key(head)],
            reason: "key lost".into(),
        };
        roster.apply(&authority(), &op).unwrap();
    };
    // Each replica of the authority's roster writes as its own actor.
    let replica = |roster: &mut Roster, n: u8| Roster::load(&roster.save(), &actor(n)).unwrap();

    // Two replicas revoke key 7 with different cut-offs: automerge keeps both, and nothing in
    // the merged state says which line a node drew first.
    let mut first = replica(&mut base, 2);
    let mut other = replica(&mut base, 3);
    revoke(&mut first, 7, 1);
    revoke(&mut other, 7, 2);
    first.merge(&mut other).unwrap();
    assert_eq!(
        first.check_revocations_final(),
        Err(RevocationHistoryError::Changed { key: key(7) })
    );

    let mut first = replica(&mut base, 2);
    let mut other = replica(&mut base, 3);
    revoke(&mut first, 7, 1);
    revoke(&mut other, 8, 2);
    first.merge(&mut other).unwrap();
    assert_eq!(first.view().revocations.len(), 2);
    assert_eq!(first.check_revocations_final(), Ok(()));
}

#[test]
fn a_member_is_placed_on_the_map_by_one_edit_and_an_area_is_bounded() {
    let mut roster = roster();
    assert_eq!(roster.view().institutions[0].area, None);
    let place = |area: &str| RosterOp::SetArea {
        institution: institution("xinhua"),
        area: area.into(),
    };
    roster.apply(&authority(), &place("north shore")).unwrap();
    roster.apply(&authority(), &place("south shore")).unwrap();
    let view = roster.view();
    assert_eq!(view.version, 4);
    assert_eq!(view.institutions[0].area.as_deref(), Some("south shore"));
    // It survives a save and a load, and its view's JSON names it.
    let loaded = Roster::load(&roster.save(), &actor(2)).unwrap();
    assert_eq!(loaded.view(), view);
    assert_eq!(
        serde_json::to_value(&view.institutions[0]).unwrap()["area"],
        "south shore"
    );

    let too_long = "n".repeat(limits::AREA_BYTES_MAX + 1);
    assert!(roster.apply(&authority(), &place(&too_long)).is_err());
    assert!(roster.apply(&authority(), &place("")).is_err());
    let elsewhere = RosterOp::SetArea {
        institution: institution("nowhere"),
        area: "north shore".into(),
    };
    assert!(roster.apply(&authority(), &elsewhere).is_err());
    assert_eq!(
        roster.view().institutions[0].area.as_deref(),
        Some("south shore")
    );
}
