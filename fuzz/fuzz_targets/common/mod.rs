//! A member node for the targets that drive a node: one data directory for the whole fuzzing
//! run (kept across inputs, so later inputs meet the state earlier ones left), a roster in
//! which the node's key is a member, and one health file it wrote.
#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::replica::{Node, NodeConfig};

/// The consortium authority's key in these targets.
pub const AUTHORITY: [u8; 32] = [1; 32];
/// The node's key.
pub const NODE_KEY: [u8; 32] = [2; 32];

pub struct Member {
    pub node: Arc<Node>,
    pub identity: Identity,
    /// A health file the node holds.
    pub file: DocumentId,
    /// Its creation change, signed: a template the change target splices into.
    pub creation: Vec<u8>,
    pub config: NodeConfig,
    pub roster: Vec<u8>,
}

pub fn editor() -> Editor {
    Editor {
        institution: InstitutionId::new("chc-fuzz").expect("a valid id"),
        at: Timestamp(1_700_000_000_000),
    }
}

/// The node, made on first use.
pub fn member() -> &'static Member {
    static MEMBER: OnceLock<Member> = OnceLock::new();
    MEMBER.get_or_init(|| {
        // The node contains automerge's panics on crafted input on purpose (`catch_unwind`
        // around every decode and apply). libfuzzer-sys installs a hook that aborts on every
        // panic, caught or not; replace it with a silent one. A panic that escapes still
        // fails the run: the fuzz_target wrapper aborts on it.
        std::panic::set_hook(Box::new(|_| {}));
        let dir = tempfile::tempdir().expect("a temporary directory").keep();
        let data_dir = dir.join("node");
        std::fs::create_dir_all(&data_dir).expect("the data directory");
        std::fs::write(data_dir.join(estuary_node::identity::KEY_FILE), NODE_KEY)
            .expect("the key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data_dir.join(estuary_node::identity::KEY_FILE),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("key permissions");
        }
        let identity = Identity::from_secret(NODE_KEY);
        let authority = Identity::from_secret(AUTHORITY);
        let by = editor();
        let mut roster = Roster::create(&authority.actor(), &by).expect("a roster");
        for op in [
            RosterOp::AddInstitution {
                id: by.institution.clone(),
                name: "Fuzz Community Health Centre".into(),
                kind: InstitutionKind::CommunityCentre,
            },
            RosterOp::AddNodeKey {
                institution: by.institution.clone(),
                key: identity.public_key(),
            },
        ] {
            roster.apply(&by, &op).expect("the roster takes the member");
        }
        let roster = SignedRoster::sign(&authority, &mut roster).encode();
        let config = NodeConfig {
            data_dir,
            authority: authority.public_key(),
            store_engine: Default::default(),
        };
        let node = Arc::new(Node::open(&config, Some(&roster)).expect("the node opens"));
        let demographics = Demographics {
            name: PersonName {
                family: "Fuzz".into(),
                given: "Resident".into(),
                text: None,
            },
            sex: Sex::Female,
            birth_date: Date::new("1950-01-01").expect("a date"),
            phone: None,
            address: None,
            national_id: None,
            insurance: None,
        };
        let (file, hash) = node
            .create_health_file(&by, &demographics)
            .expect("a health file");
        let creation = node
            .envelopes(file)
            .expect("its envelopes")
            .into_iter()
            .find(|e| {
                estuary_node::envelope::Envelope::verify(e).is_ok_and(|v| v.hash == hash)
            })
            .expect("its creation");
        Member {
            node,
            identity,
            file,
            creation,
            config,
            roster,
        }
    })
}
