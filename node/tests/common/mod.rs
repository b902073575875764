//! Builders shared by the node's integration tests.
#![allow(dead_code)]

pub mod schema;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use estuary_node::identity::Identity;
use estuary_node::membership::SignedRoster;
use estuary_node::model::*;
use estuary_node::replica::{Node, NodeConfig};
use estuary_node::store::{Batch, StoreError};
use estuary_node::sync::{SyncConfig, SyncHandle, TransportKind};
use libp2p::Multiaddr;

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
            store_engine: Default::default(),
        },
        SignedRoster::sign(&authority, &mut roster).encode(),
    )
}

/// How long convergence may take before a test fails. Generous: it bounds a liveness check
/// on a loaded 2-core machine, it does not measure speed.
pub const CONVERGENCE: Duration = Duration::from_secs(90);

pub struct Consortium {
    pub dir: tempfile::TempDir,
    pub roster: Vec<u8>,
    pub document: Roster,
    pub members: Vec<String>,
    /// The engine of the stores `node` opens (none named: the default).
    pub store_engine: Option<estuary_node::store::StoreEngine>,
}

impl Consortium {
    /// `n` member institutions, each with a node key in its data directory.
    pub fn new(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let authority = Identity::from_secret(AUTHORITY);
        let by = editor("xinhua");
        let mut roster = Roster::create(&authority.actor(), &by).unwrap();
        let members: Vec<String> = (0..n).map(|i| format!("member-{i}")).collect();
        for member in &members {
            let data_dir = dir.path().join(member);
            std::fs::create_dir_all(&data_dir).unwrap();
            let key = Identity::load_or_create(&data_dir).unwrap().public_key();
            add_member(
                &mut roster,
                &by,
                member,
                InstitutionKind::CommunityCentre,
                key,
            );
        }
        let signed = SignedRoster::sign(&authority, &mut roster).encode();
        Self {
            dir,
            roster: signed,
            document: roster,
            members,
            store_engine: Default::default(),
        }
    }

    /// Revokes a member's key (no cut-off: it wrote nothing); returns the signed roster.
    pub fn revoke(&mut self, member: &str) -> Vec<u8> {
        let key = Identity::load_or_create(&self.dir.path().join(member))
            .unwrap()
            .public_key();
        self.document
            .apply(
                &editor("xinhua"),
                &RosterOp::Revoke {
                    key,
                    cutoff: vec![],
                    reason: "node compromised".into(),
                },
            )
            .unwrap();
        SignedRoster::sign(&Identity::from_secret(AUTHORITY), &mut self.document).encode()
    }

    pub fn node(&self, i: usize) -> Arc<Node> {
        self.node_in(&self.members[i])
    }

    pub fn node_in(&self, name: &str) -> Arc<Node> {
        let config = NodeConfig {
            data_dir: self.dir.path().join(name),
            authority: Identity::from_secret(AUTHORITY).public_key(),
            store_engine: self.store_engine,
        };
        Arc::new(Node::open(&config, Some(&self.roster)).unwrap())
    }
}

/// A fresh in-memory address.
pub fn memory_address() -> Multiaddr {
    let mut n = [0u8; 8];
    getrandom::fill(&mut n).unwrap();
    format!("/memory/{}", u64::from_le_bytes(n) >> 1)
        .parse()
        .unwrap()
}

pub fn start(node: &Arc<Node>, listen: &Multiaddr, bootstrap: Vec<Multiaddr>) -> SyncHandle {
    start_on(node, listen, bootstrap, TransportKind::Memory)
}

pub fn start_on(
    node: &Arc<Node>,
    listen: &Multiaddr,
    bootstrap: Vec<Multiaddr>,
    transport: TransportKind,
) -> SyncHandle {
    SyncHandle::start(
        node.clone(),
        SyncConfig {
            listen: vec![listen.clone()],
            bootstrap,
            reconcile_every: Duration::from_millis(500),
            request_timeout: Duration::from_secs(5),
            transport,
            ..SyncConfig::default()
        },
    )
    .unwrap()
}

/// Waits until every node holds the same catalogue of `documents` documents.
pub async fn converge(nodes: &[Arc<Node>], handles: &[&SyncHandle], documents: usize) {
    converge_or(nodes, handles, documents, "").await
}

/// Waits for convergence; `context` (a seed) is printed if it does not come.
pub async fn converge_or(
    nodes: &[Arc<Node>],
    handles: &[&SyncHandle],
    documents: usize,
    context: &str,
) {
    let started = Instant::now();
    loop {
        let first = nodes[0].catalogue().clone();
        let agreed = first.len() == documents && nodes.iter().all(|n| *n.catalogue() == first);
        if agreed {
            return;
        }
        if started.elapsed() > CONVERGENCE {
            let sizes: Vec<usize> = nodes.iter().map(|n| n.catalogue().len()).collect();
            let stats: Vec<_> = handles.iter().map(|h| h.stats()).collect();
            panic!(
                "no convergence within {CONVERGENCE:?} {context}: catalogues {sizes:?}; {stats:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every file below `dir`, in order (the store's files, for the damage tests).
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// A bare libp2p swarm over the memory transport: a peer that is not an Estuary node (a
/// stranger, or a member's node running faulty or hostile code). Idle connections are kept
/// for `idle` (a held request must not be dropped with its connection).
pub fn bare_swarm<B: libp2p::swarm::NetworkBehaviour>(
    key: libp2p::identity::Keypair,
    behaviour: B,
    idle: Duration,
) -> libp2p::Swarm<B> {
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    use libp2p::{Transport, noise, yamux};
    libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(
            |key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                Ok(MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()))
            },
        )
        .unwrap()
        .with_behaviour(|_| behaviour)
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
        .build()
}

/// Opens a stopped node's store directly, in whichever engine it is kept, as a test that
/// damages or rewrites it does (each engine's open waits a moment for a lock its threads may
/// still hold after the node is dropped).
pub fn open_stopped_store(dir: &Path) -> StoppedStore {
    StoppedStore(estuary_node::store::open_existing(dir).expect("the store opens"))
}

/// A stopped node's store, written a key at a time.
pub struct StoppedStore(Box<dyn estuary_node::store::KeyValue>);

impl StoppedStore {
    /// The value of `key`.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.get(key.as_ref())
    }

    /// Sets `key` to `value`; returns what it held.
    pub fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl Into<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let before = self.get(key.as_ref())?;
        let mut batch = Batch::default();
        batch.put(key.as_ref().to_vec(), value);
        self.0.apply(batch)?;
        Ok(before)
    }

    /// Removes `key`; returns what it held.
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>, StoreError> {
        let before = self.get(key.as_ref())?;
        let mut batch = Batch::default();
        batch.delete(key.as_ref().to_vec());
        self.0.apply(batch)?;
        Ok(before)
    }

    /// Every key and value starting with `prefix`.
    pub fn scan_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        let entries = self.0.scan_prefix(prefix.as_ref());
        let (entries, error) = match entries {
            Ok(entries) => (entries, None),
            Err(error) => (Vec::new(), Some(error)),
        };
        error
            .into_iter()
            .map(Err)
            .chain(entries.into_iter().map(Ok))
    }

    /// Every key and value.
    pub fn iter(&self) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> {
        self.scan_prefix([])
    }

    /// Makes every write durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.0.flush()
    }
}
