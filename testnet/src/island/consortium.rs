//! The consortium the island demo models: the core hospital, two district hospitals and the
//! community health centres, each with a deterministic node key and the roster that lists them.

use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::{
    Bytes32, Editor, InstitutionId, InstitutionKind, Roster, RosterOp, Timestamp,
};

/// One member institution.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    /// Institution id.
    pub id: &'static str,
    /// Display name.
    pub name: &'static str,
    /// What it is.
    pub kind: InstitutionKind,
    /// On the island's northern shore (cut off in the `partition` preset).
    pub north: bool,
}

impl Member {
    /// Its area on the consortium's map, as the roster names it.
    pub fn area(&self) -> &'static str {
        if self.north {
            "north shore"
        } else {
            "south shore"
        }
    }
}

const fn member(
    id: &'static str,
    name: &'static str,
    kind: InstitutionKind,
    north: bool,
) -> Member {
    Member {
        id,
        name,
        kind,
        north,
    }
}

use InstitutionKind::{
    CommunityCentre as Centre, CoreHospital as Core, DistrictHospital as District,
};

/// The 21 members, in the order nodes are numbered: hospitals first.
pub const MEMBERS: [Member; 21] = [
    member("xinhua", "Xinhua Hospital Chongming", Core, false),
    member(
        "dh-chongming-2",
        "Chongming No. 2 District Hospital",
        District,
        true,
    ),
    member(
        "dh-chongming-3",
        "Chongming No. 3 District Hospital",
        District,
        false,
    ),
    member(
        "chc-chengqiao",
        "Chengqiao Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-jianshe",
        "Jianshe Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-miaozhen",
        "Miaozhen Community Health Centre",
        Centre,
        true,
    ),
    member(
        "chc-baozhen",
        "Baozhen Community Health Centre",
        Centre,
        false,
    ),
    member("chc-xinhai", "Xinhai Community Health Centre", Centre, true),
    member("chc-xinhe", "Xinhe Community Health Centre", Centre, false),
    member(
        "chc-dongping",
        "Dongping Community Health Centre",
        Centre,
        true,
    ),
    member(
        "chc-zhongxing",
        "Zhongxing Community Health Centre",
        Centre,
        true,
    ),
    member(
        "chc-shuxin",
        "Shuxin Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-gangyan",
        "Gangyan Community Health Centre",
        Centre,
        true,
    ),
    member(
        "chc-sanxing",
        "Sanxing Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-chenjia",
        "Chenjia Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-xianghua",
        "Xianghua Community Health Centre",
        Centre,
        false,
    ),
    member("chc-luhua", "Luhua Community Health Centre", Centre, true),
    member(
        "chc-gangxi",
        "Gangxi Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-hengsha",
        "Hengsha Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-changxing",
        "Changxing Community Health Centre",
        Centre,
        false,
    ),
    member(
        "chc-xinminzhou",
        "Xinminzhou Community Health Centre",
        Centre,
        true,
    ),
];

/// Members of an `nodes`-node consortium. Node 0 is the core hospital; a small consortium
/// still has a district hospital, centres on both shores and a second district hospital, in
/// that order, so that every size has referrals to send and a north to cut off.
pub fn members(nodes: usize) -> Vec<Member> {
    let (hospitals, centres): (Vec<Member>, Vec<Member>) =
        MEMBERS.iter().cloned().partition(|m| m.kind != Centre);
    let (north, south): (Vec<Member>, Vec<Member>) = centres.into_iter().partition(|m| m.north);
    let mut hospitals = hospitals.into_iter();
    let mut north = north.into_iter();
    let mut south = south.into_iter();
    let mut chosen: Vec<Member> = Vec::new();
    chosen.extend(hospitals.next());
    chosen.extend(hospitals.next());
    chosen.extend(north.next());
    chosen.extend(south.next());
    chosen.extend(hospitals.next());
    // Then alternate the shores.
    while chosen.len() < MEMBERS.len() {
        chosen.extend(north.next());
        chosen.extend(south.next());
    }
    chosen.truncate(nodes);
    chosen
}

/// A deterministic 32-byte secret for `what` under `seed`: the same seed gives the same keys,
/// so a replayed run is the same consortium.
pub fn secret(seed: u64, what: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::new()
        .chain_update(b"estuary-testnet/key")
        .chain_update(seed.to_be_bytes())
        .chain_update(what.as_bytes())
        .finalize()
        .into()
}

/// The authority's identity and the roster, signed, listing every member with its key.
pub fn roster(seed: u64, members: &[Member], keys: &[Bytes32]) -> (Identity, Vec<u8>) {
    let (authority, mut roster) = roster_document(seed, members, keys);
    let signed = SignedRoster::sign(&authority, &mut roster).encode();
    (authority, signed)
}

/// The next roster: `key` revoked at the cut-off `heads` (the changes accepted from it).
pub fn revoked_roster(
    seed: u64,
    members: &[Member],
    keys: &[Bytes32],
    key: Bytes32,
    heads: Vec<Bytes32>,
) -> anyhow::Result<Vec<u8>> {
    let (authority, mut roster) = roster_document(seed, members, keys);
    roster.apply(
        &authority_editor(),
        &RosterOp::Revoke {
            key,
            cutoff: heads,
            reason: "node compromised".into(),
        },
    )?;
    Ok(SignedRoster::sign(&authority, &mut roster).encode())
}

fn authority_editor() -> Editor {
    Editor {
        institution: InstitutionId::new("consortium-authority").expect("a valid id"),
        at: Timestamp(0),
    }
}

/// The roster document the authority keeps: the same for the same seed, so a later edit
/// builds on the roster every node holds.
fn roster_document(seed: u64, members: &[Member], keys: &[Bytes32]) -> (Identity, Roster) {
    let authority = Identity::from_secret(secret(seed, "authority"));
    let editor = authority_editor();
    let mut roster = Roster::create(&authority.actor(), &editor).expect("a roster");
    for (member, key) in members.iter().zip(keys) {
        let id = InstitutionId::new(member.id).expect("member ids are valid");
        for op in [
            RosterOp::AddInstitution {
                id: id.clone(),
                name: member.name.into(),
                kind: member.kind,
            },
            RosterOp::AddNodeKey {
                institution: id.clone(),
                key: *key,
            },
            RosterOp::SetArea {
                institution: id,
                area: member.area().into(),
            },
        ] {
            roster
                .apply(&editor, &op)
                .expect("the roster takes members");
        }
    }
    (authority, roster)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_keeps_the_hospitals_and_both_shores() {
        assert_eq!(members(21).len(), 21);
        let seven = members(7);
        assert_eq!(seven[0].id, "xinhua");
        assert!(seven.iter().any(|m| m.north && m.kind == Centre));
        assert!(seven.iter().any(|m| !m.north && m.kind == Centre));
        let three = members(3);
        assert_eq!(three[2].kind, Centre);
        let ids: std::collections::BTreeSet<_> = members(21).iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), 21);
    }
}
