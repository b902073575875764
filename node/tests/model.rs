//! Model-based property test: a node on a real store acts like an in-memory model — plain
//! crdt-model replicas written as the same actor — through random writes, peers' changes,
//! forged envelopes and close/reopen cycles.

use estuary_node::envelope::Envelope;
use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::replica::{Ingested, Node, NodeConfig};
use proptest::prelude::*;

const AUTHORITY: [u8; 32] = [1; 32];
const PEER: [u8; 32] = [2; 32];

#[derive(Clone, Debug)]
enum Step {
    /// Register a resident locally.
    Create(u16),
    /// Edit the n-th known document locally.
    Edit(usize, u8),
    /// A peer registers a resident; the node ingests it.
    PeerCreate(u16),
    /// A forged envelope arrives; nothing may change.
    Forged,
    /// Close the node and open it again.
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        2 => any::<u16>().prop_map(Step::Create),
        4 => (any::<usize>(), any::<u8>()).prop_map(|(d, v)| Step::Edit(d, v)),
        2 => any::<u16>().prop_map(Step::PeerCreate),
        1 => Just(Step::Forged),
        1 => Just(Step::Reopen),
    ]
}

fn editor(institution: &str) -> Editor {
    Editor {
        institution: InstitutionId::new(institution).unwrap(),
        at: Timestamp(7),
    }
}

fn resident(n: u16) -> Demographics {
    Demographics {
        name: PersonName {
            family: "Model".into(),
            given: format!("R{n}"),
            text: None,
        },
        sex: Sex::Other,
        birth_date: Date::new("1960-01-01").unwrap(),
        phone: None,
        address: None,
        national_id: Some(format!("{n:018}")),
        insurance: None,
    }
}

fn op(value: u8) -> HealthFileOp {
    match value % 3 {
        0 => HealthFileOp::SetDemographic(DemographicField::Phone(format!("+86 {value}"))),
        1 => HealthFileOp::AddAllergy(NewAllergy {
            substance: format!("s{}", value % 5),
            reaction: "rash".into(),
            severity: Severity::Mild,
        }),
        _ => HealthFileOp::AddFollowUp(NewFollowUp {
            time: Timestamp(i64::from(value)),
            systolic_mmhg: Some(100 + u64::from(value % 80)),
            diastolic_mmhg: Some(70),
            glucose_mmol_per_l: None,
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn the_node_acts_like_its_model_across_reopens(steps in prop::collection::vec(step(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            data_dir: dir.path().join("node"),
            authority: Identity::from_secret(AUTHORITY).public_key(),
            store_engine: Default::default(),
        };
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let own = Identity::load_or_create(&config.data_dir).unwrap();
        let authority = Identity::from_secret(AUTHORITY);
        let by = editor("xinhua");
        let mut roster = Roster::create(&authority.actor(), &by).unwrap();
        for (id, kind, key) in [
            ("chc-a", InstitutionKind::CommunityCentre, own.public_key()),
            ("xinhua", InstitutionKind::CoreHospital, Identity::from_secret(PEER).public_key()),
        ] {
            roster.apply(&by, &RosterOp::AddInstitution { id: InstitutionId::new(id).unwrap(), name: id.into(), kind }).unwrap();
            roster.apply(&by, &RosterOp::AddNodeKey { institution: InstitutionId::new(id).unwrap(), key }).unwrap();
        }
        let signed = SignedRoster::sign(&authority, &mut roster).encode();
        let mut node = Node::open(&config, Some(&signed)).unwrap();
        let peer = Identity::from_secret(PEER);
        let mut model: Vec<HealthFile> = Vec::new();
        // The forgery is always the same envelope: one quarantine record however often.
        let mut forged = false;

        for step in steps {
            match step {
                Step::Create(n) => {
                    let expected = HealthFile::create(node.actor(), &editor("chc-a"), &resident(n)).unwrap();
                    let known = model.iter().any(|f| f.id() == expected.id());
                    let (id, _) = node.create_health_file(&editor("chc-a"), &resident(n)).unwrap();
                    prop_assert_eq!(id, expected.id());
                    if !known {
                        model.push(expected);
                    }
                }
                Step::Edit(index, value) => {
                    if model.is_empty() {
                        continue;
                    }
                    let count = model.len();
                    let file = &mut model[index % count];
                    node.apply_health_file(file.id(), &editor("chc-a"), &op(value)).unwrap();
                    file.apply(&editor("chc-a"), &op(value)).unwrap();
                }
                Step::PeerCreate(n) => {
                    let mut file = HealthFile::create(&peer.actor(), &editor("xinhua"), &resident(n)).unwrap();
                    let mut change = file.changes_since(&[]).remove(0);
                    node.ingest(&Envelope::sign(&peer, file.id(), &mut change).encode()).unwrap();
                    if !model.iter().any(|f| f.id() == file.id()) {
                        model.push(HealthFile::load(&file.save(), node.actor()).unwrap());
                    }
                }
                Step::Forged => {
                    let mut file = HealthFile::create(&peer.actor(), &editor("xinhua"), &resident(9_999)).unwrap();
                    let mut change = file.changes_since(&[]).remove(0);
                    let mut envelope = Envelope::sign(&peer, file.id(), &mut change);
                    envelope.signature[3] ^= 0x10;
                    let outcome = node.ingest(&envelope.encode());
                    prop_assert!(matches!(outcome, Ok(Ingested::Quarantined(..))), "{:?}", outcome);
                    forged = true;
                }
                Step::Reopen => {
                    drop(node);
                    node = Node::open(&config, None).unwrap();
                }
            }
            for file in &mut model {
                prop_assert_eq!(node.health_file(file.id()).unwrap(), file.view());
                prop_assert_eq!(node.heads(file.id()).unwrap(), file.heads());
            }
        }
        drop(node);
        let node = Node::open(&config, None).unwrap();
        for file in &mut model {
            prop_assert_eq!(node.health_file(file.id()).unwrap(), file.view());
        }
        let report = node.verify().unwrap();
        prop_assert!(report.problems.is_empty(), "{:?}", report);
        prop_assert_eq!(node.quarantine().unwrap().len(), usize::from(forged));
        prop_assert_eq!(node.audit(1, usize::MAX).unwrap().len() as u64, node.audit(1, usize::MAX).unwrap().last().map_or(0, |r| r.sequence));
    }
}
