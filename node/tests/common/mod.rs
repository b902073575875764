//! Builders shared by the node's integration tests.
#![allow(dead_code)]

use std::path::Path;

use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::node::NodeConfig;

/// The consortium authority's test key.
pub const AUTHORITY: [u8; 32] = [1; 32];

pub fn institution(id: &str) -> InstitutionId {
    InstitutionId::new(id).unwrap()
}

pub fn editor(id: &str) -> Editor {
    Editor {
        institution: institution(id),
        at: Timestamp(1_000),
    }
}

/// A resident told apart by `given`: two creations with the same content, author and time
/// would be the same change, and so the same document.
pub fn resident(given: &str) -> Demographics {
    Demographics {
        name: PersonName {
            family: "Lu".into(),
            given: given.into(),
            text: None,
        },
        sex: Sex::Male,
        birth_date: Date::new("1954-10-17").unwrap(),
        phone: None,
        address: None,
        national_id: None,
        insurance: None,
    }
}

/// Adds institution `id` of `kind` with one node key to `roster`, as `by`.
pub fn add_member(roster: &mut Roster, by: &Editor, id: &str, kind: InstitutionKind, key: Bytes32) {
    roster
        .apply(
            by,
            &RosterOp::AddInstitution {
                id: institution(id),
                name: id.into(),
                kind,
            },
        )
        .unwrap();
    roster
        .apply(
            by,
            &RosterOp::AddNodeKey {
                institution: institution(id),
                key,
            },
        )
        .unwrap();
}

/// An allergy record for `substance`.
pub fn allergy(substance: &str) -> HealthFileOp {
    HealthFileOp::AddAllergy(NewAllergy {
        substance: substance.into(),
        reaction: "rash".into(),
        severity: Severity::Mild,
    })
}

/// A data directory under `dir` with a node key, and a signed roster in which that key is
/// the only member, for `institution`.
pub fn single_node(dir: &Path, institution_id: &str) -> (NodeConfig, Vec<u8>) {
    let data_dir = dir.join("node");
    std::fs::create_dir_all(&data_dir).unwrap();
    let key = Identity::load_or_create(&data_dir).unwrap().public_key();
    let authority = Identity::from_secret(AUTHORITY);
    let by = editor(institution_id);
    let mut roster = Roster::create(&authority.actor(), &by).unwrap();
    add_member(
        &mut roster,
        &by,
        institution_id,
        InstitutionKind::CommunityCentre,
        key,
    );
    (
        NodeConfig {
            data_dir,
            authority: authority.public_key(),
        },
        SignedRoster::sign(&authority, &mut roster).encode(),
    )
}
