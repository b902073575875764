//! The node's identity: one ed25519 key, created on first start and loaded afterwards.
//!
//! The key's public half begins the node's automerge actor id (`Node::actor` adds its store's
//! incarnation), and the same key is the node's libp2p identity (its PeerId), so "who wrote a
//! change" and "who sent it" are checked against the same roster entry.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use curve25519_dalek::MontgomeryPoint;
use ed25519_dalek::{Signer, SigningKey};
use libp2p::PeerId;
use libp2p::identity::{Keypair, ed25519};
use zeroize::Zeroizing;

use crate::model::{Actor, Bytes32};

/// Name of the key file inside the data directory.
pub const KEY_FILE: &str = "node.key";
/// Length of a key file: the 32-byte ed25519 secret.
const KEY_FILE_BYTES: usize = 32;

/// Why the node's key could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("cannot access the node key at {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The key file is not a key.
    #[error(
        "{path} is {found} bytes; a node key file is {KEY_FILE_BYTES} bytes. Restore it from backup"
    )]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// Its length.
        found: u64,
    },
    /// Others than the owner may read the key file.
    #[error("{path} is readable by other users (mode {mode:o}); run `chmod 600` on it")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The operating system's random source failed.
    #[error("no randomness available to create a node key: {0}")]
    Randomness(getrandom::Error),
}

/// A node's signing key.
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Identity({})", self.public_key())
    }
}

impl Identity {
    /// Loads the key of an existing node from `data_dir`, with the same checks as at start;
    /// never creates one (a command that needs the node's key must not invent another).
    pub fn load(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        match fs::metadata(&path) {
            Ok(metadata) => Self::read(path, &metadata),
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    /// Loads the key from `data_dir`, creating it (mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join(KEY_FILE);
        let io = |source| IdentityError::Io {
            path: path.clone(),
            source,
        };
        match fs::metadata(&path) {
            Ok(metadata) => Self::read(path, &metadata),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = [0u8; KEY_FILE_BYTES];
                getrandom::fill(&mut secret).map_err(IdentityError::Randomness)?;
                // Written whole to a temporary file, then linked into place: a crash leaves no
                // truncated key, and the link fails rather than overwrite a key another
                // process created meanwhile.
                let temporary = data_dir.join(format!("{KEY_FILE}.{}.tmp", std::process::id()));
                let mut file = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&temporary)
                    .map_err(io)?;
                file.write_all(&secret).map_err(io)?;
                file.sync_all().map_err(io)?;
                let linked = fs::hard_link(&temporary, &path);
                let _ = fs::remove_file(&temporary);
                linked.map_err(io)?;
                fs::File::open(data_dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(io)?;
                Ok(Self::from_secret(secret))
            }
            Err(error) => Err(io(error)),
        }
    }

    /// Reads a key file that exists, refusing one others may read or of the wrong length.
    fn read(path: PathBuf, metadata: &fs::Metadata) -> Result<Self, IdentityError> {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(IdentityError::Permissions { path, mode });
        }
        if metadata.len() != KEY_FILE_BYTES as u64 {
            return Err(IdentityError::Malformed {
                path,
                found: metadata.len(),
            });
        }
        let bytes = fs::read(&path).map_err(|source| IdentityError::Io {
            path: path.clone(),
            source,
        })?;
        let secret: [u8; KEY_FILE_BYTES] =
            bytes
                .try_into()
                .map_err(|b: Vec<u8>| IdentityError::Malformed {
                    path: path.clone(),
                    found: b.len() as u64,
                })?;
        Ok(Self::from_secret(secret))
    }

    /// An identity from a known secret (tests, the testnet's generated consortium).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// The public key.
    pub fn public_key(&self) -> Bytes32 {
        Bytes32(self.key.verifying_key().to_bytes())
    }

    /// The key alone as an automerge actor: what the consortium authority writes the roster
    /// as. A node writes documents as `Node::actor` (the key and its store's incarnation),
    /// never as this.
    pub fn actor(&self) -> Actor {
        Actor::from_bytes(self.public_key().0.to_vec())
    }

    /// Signs `message` (already domain-separated by the caller).
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// X25519 between this key, in Montgomery form, and `their_public`: how a bundle
    /// encrypted to this node's key is opened. The secret scalar is the one ed25519 signs
    /// with, so the X25519 public key is the node key's Montgomery form and a sender needs
    /// nothing but the roster. Callers derive keys from the result under their own domain.
    pub(crate) fn key_agreement(&self, their_public: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let scalar = Zeroizing::new(self.key.to_scalar_bytes());
        Zeroizing::new(
            MontgomeryPoint(*their_public)
                .mul_clamped(*scalar)
                .to_bytes(),
        )
    }

    /// The same key as a libp2p keypair: the identity the node proves in every Noise
    /// handshake.
    pub fn libp2p_keypair(&self) -> Keypair {
        // Any 32 bytes are an ed25519 secret; libp2p checks only the length.
        let secret = ed25519::SecretKey::try_from_bytes(self.key.to_bytes())
            .expect("a 32-byte ed25519 secret");
        Keypair::from(ed25519::Keypair::from(secret))
    }

    /// The node's libp2p PeerId.
    pub fn peer_id(&self) -> PeerId {
        self.libp2p_keypair().public().to_peer_id()
    }
}

/// The libp2p PeerId of a node key from the roster; `None` if the bytes are not an ed25519
/// public key.
pub fn peer_id_of(key: &Bytes32) -> Option<PeerId> {
    let public = ed25519::PublicKey::try_from_bytes(&key.0).ok()?;
    Some(libp2p::identity::PublicKey::from(public).to_peer_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_once_with_mode_0600_and_loaded_after() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let again = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public_key(), again.public_key());
    }

    #[test]
    fn one_key_is_the_actor_and_the_peer_id() {
        let identity = Identity::from_secret([7; 32]);
        let keypair = identity.libp2p_keypair();
        assert_eq!(Some(identity.peer_id()), peer_id_of(&identity.public_key()));
        assert_eq!(
            keypair.public().try_into_ed25519().unwrap().to_bytes(),
            identity.public_key().0
        );
        // What the libp2p key signs, the node key verifies: it is one key.
        let signature: [u8; 64] = keypair.sign(b"estuary").unwrap().try_into().unwrap();
        ed25519_dalek::VerifyingKey::from_bytes(&identity.public_key().0)
            .unwrap()
            .verify_strict(
                b"estuary",
                &ed25519_dalek::Signature::from_bytes(&signature),
            )
            .unwrap();
        assert_ne!(
            peer_id_of(&Identity::from_secret([8; 32]).public_key()),
            Some(identity.peer_id())
        );
    }

    #[test]
    fn load_reads_an_existing_key_and_never_creates_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Io { .. })
        ));
        assert!(!dir.path().join(KEY_FILE).exists());
        let created = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(
            Identity::load(dir.path()).unwrap().public_key(),
            created.public_key()
        );
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            Identity::load(dir.path()),
            Err(IdentityError::Permissions { mode: 0o640, .. })
        ));
    }

    #[test]
    fn key_agreement_matches_x25519_on_the_node_keys_montgomery_form() {
        let node = Identity::from_secret([5; 32]);
        let ephemeral = [9u8; 32];
        let ephemeral_public = MontgomeryPoint::mul_base_clamped(ephemeral).to_bytes();
        let node_public = ed25519_dalek::VerifyingKey::from_bytes(&node.public_key().0)
            .unwrap()
            .to_montgomery();
        assert_eq!(
            *node.key_agreement(&ephemeral_public),
            node_public.mul_clamped(ephemeral).to_bytes()
        );
        assert_ne!(
            *Identity::from_secret([6; 32]).key_agreement(&ephemeral_public),
            *node.key_agreement(&ephemeral_public)
        );
    }

    #[test]
    fn a_readable_or_truncated_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(IdentityError::Permissions { mode: 0o644, .. })
        ));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [1u8; 5]).unwrap();
        assert!(matches!(
            Identity::load_or_create(dir.path()),
            Err(IdentityError::Malformed { found: 5, .. })
        ));
    }
}
