//! The roster's typed operations.

mod common;

use common::*;
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
