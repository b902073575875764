//! Proof that the process answering on the API's address is this node, asked for before a
//! client sends a token there.
//!
//! The client sends a fresh random nonce with `GET /health?challenge=<hex>` (no token); the
//! node answers with its node key's signature over
//! `estuary/api-challenge/v1 ‖ nonce ‖ api.listen` (the address as written in the config).
//! A process that took the port while the node was down does not hold the key, and a
//! signature the real node gave for another nonce or on another address does not verify.
//! The domain differs from every other message the node key signs (changes, bundles, and
//! libp2p's own handshakes), so an answer can never be replayed as one of those.

use std::net::SocketAddr;

use ed25519_dalek::{Signature, VerifyingKey};

use crate::identity::Identity;
use crate::model::Bytes32;

/// Length of a challenge's nonce, in bytes: random enough that a recorded answer never
/// matches a new challenge.
pub const CHALLENGE_NONCE_BYTES: usize = 32;
const SIGNING_DOMAIN: &[u8] = b"estuary/api-challenge/v1";
/// Length of an ed25519 signature written as hex, in characters.
const SIGNATURE_HEX_CHARS: usize = 128;

/// Why the answer to a challenge does not prove that this node answered.
#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    /// The answer carries no signature: not an Estuary node, or one too old to answer.
    #[error("it answered without a signature over the challenge")]
    Unsigned,
    /// The signature is not 64 bytes of hex.
    #[error("its answer to the challenge is not a 64-byte signature in hex")]
    Malformed,
    /// The signature does not verify with this node's key.
    #[error("its key does not sign the challenge")]
    WrongKey,
    /// The operating system's random source failed.
    #[error("no randomness available for a challenge: {0}")]
    Randomness(getrandom::Error),
}

/// One challenge: a fresh nonce, and the check of the answer to it.
pub struct Challenge {
    nonce: [u8; CHALLENGE_NONCE_BYTES],
}

impl Challenge {
    /// A challenge with a fresh random nonce.
    pub fn new() -> Result<Self, ChallengeError> {
        let mut nonce = [0u8; CHALLENGE_NONCE_BYTES];
        getrandom::fill(&mut nonce).map_err(ChallengeError::Randomness)?;
        Ok(Self { nonce })
    }

    /// The nonce as the `challenge` query parameter of `/health` takes it.
    pub fn nonce_hex(&self) -> String {
        Bytes32(self.nonce).to_string()
    }

    /// Checks `signature` (hex, from `/health`'s `challenge.signature`) against the key of
    /// the node that is meant to listen on `listen`.
    pub fn verify(
        &self,
        node_key: &Bytes32,
        listen: SocketAddr,
        signature: Option<&str>,
    ) -> Result<(), ChallengeError> {
        let signature = signature.ok_or(ChallengeError::Unsigned)?;
        let bytes = parse_signature(signature).ok_or(ChallengeError::Malformed)?;
        let key = VerifyingKey::from_bytes(&node_key.0).map_err(|_| ChallengeError::WrongKey)?;
        key.verify_strict(
            &message(&self.nonce, listen),
            &Signature::from_bytes(&bytes),
        )
        .map_err(|_| ChallengeError::WrongKey)
    }
}

/// The node's answer to `nonce`, for the API it serves on `listen`: the signature, hex.
pub fn answer(
    identity: &Identity,
    nonce: &[u8; CHALLENGE_NONCE_BYTES],
    listen: SocketAddr,
) -> String {
    crate::replica::hex_encode(&identity.sign(&message(nonce, listen)))
}

fn message(nonce: &[u8; CHALLENGE_NONCE_BYTES], listen: SocketAddr) -> Vec<u8> {
    [SIGNING_DOMAIN, nonce, listen.to_string().as_bytes()].concat()
}

fn parse_signature(text: &str) -> Option<[u8; 64]> {
    if text.len() != SIGNATURE_HEX_CHARS {
        return None;
    }
    let first = Bytes32::parse_hex(text.get(..64)?, "signature").ok()?;
    let second = Bytes32::parse_hex(text.get(64..)?, "signature").ok()?;
    let mut bytes = [0u8; 64];
    bytes[..32].copy_from_slice(&first.0);
    bytes[32..].copy_from_slice(&second.0);
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTEN: &str = "127.0.0.1:8080";

    fn nonce_of(challenge: &Challenge) -> [u8; CHALLENGE_NONCE_BYTES] {
        Bytes32::parse_hex(&challenge.nonce_hex(), "nonce")
            .unwrap()
            .0
    }

    #[test]
    fn only_the_node_key_answering_this_nonce_on_this_address_is_accepted() {
        let node = Identity::from_secret([3; 32]);
        let listen: SocketAddr = LISTEN.parse().unwrap();
        let challenge = Challenge::new().unwrap();
        let nonce = nonce_of(&challenge);
        let genuine = answer(&node, &nonce, listen);
        challenge
            .verify(&node.public_key(), listen, Some(&genuine))
            .unwrap();

        // Another key, another nonce (a recorded answer), another address (a relay to the
        // node listening elsewhere): none verifies.
        let other = Identity::from_secret([4; 32]);
        let forged = answer(&other, &nonce, listen);
        let replayed = answer(&node, &nonce_of(&Challenge::new().unwrap()), listen);
        let relayed = answer(&node, &nonce, "127.0.0.1:9090".parse().unwrap());
        for signature in [forged, replayed, relayed] {
            assert!(matches!(
                challenge.verify(&node.public_key(), listen, Some(&signature)),
                Err(ChallengeError::WrongKey)
            ));
        }
        assert!(matches!(
            challenge.verify(&node.public_key(), listen, None),
            Err(ChallengeError::Unsigned)
        ));
        for malformed in ["", "zz", &"g".repeat(128), &genuine[..126]] {
            assert!(matches!(
                challenge.verify(&node.public_key(), listen, Some(malformed)),
                Err(ChallengeError::Malformed)
            ));
        }
    }

    #[test]
    fn challenges_are_fresh() {
        let a = Challenge::new().unwrap().nonce_hex();
        let b = Challenge::new().unwrap().nonce_hex();
        assert_eq!(a.len(), 2 * CHALLENGE_NONCE_BYTES);
        assert_ne!(a, b);
    }
}
