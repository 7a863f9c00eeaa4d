//! Rotation of the manifest signing key, as TUF rotates its root: the old key signs a statement
//! naming the new key (and the new key signs it too, proving it is held), and whoever trusts the
//! old key follows the chain of such statements to the newest key, and from then on trusts only
//! that one. The chain lives in `PM_HOME/pki/key-chain.json`, is served at `/keys.json` beside
//! `dist.json`, and travels in bundles; agents, importing mirrors and child mirrors all follow it
//! with [`follow`].
//!
//! A statement that names the key a follower trusts but does not verify with it is refused,
//! whole chain and all: only the holder of the old key can move its followers on.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{PkiError, SigningKey, VerifyingKey};
use crate::durable;
use crate::manifest::hex;
use crate::proto::unhex;

/// The chain of rotation statements this manager signed, oldest first.
pub const CHAIN_FILE: &str = "pki/key-chain.json";
/// The chain's name in a view, its URL path under the dist URL, and its member in a bundle.
pub const SERVED_FILE: &str = "keys.json";
/// The URL path under the dist URL where `pm-mirror serve` answers with the manager's current
/// public manifest key (`pm-agent trust-key` fetches it; it is trusted only by its fingerprint).
pub const SERVED_PUBLIC_KEY: &str = "manifest-key.pem";
/// The new key of a rotation that has not finished yet (0600); nothing signs while it exists.
pub const PENDING_KEY_FILE: &str = "pki/manifest-signing.next.key";
/// Public halves of the keys this manager used before, `<hex fingerprint>.pub.pem`.
pub const RETIRED_DIR: &str = "pki/retired";
/// Largest chain a follower reads.
pub const MAX_CHAIN_BYTES: u64 = 1024 * 1024;

/// One rotation: the key `previous_key` hands over to `next_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// Format version of this statement.
    pub format: u32,
    /// 1 for the first rotation of this manager, growing by one.
    pub sequence: u64,
    /// `sha256:<hex>` of the key that signs this statement and is replaced.
    pub previous_key: String,
    /// `sha256:<hex>` of the key that replaces it.
    pub next_key: String,
    /// The new key's public half (PEM).
    pub next_key_pem: String,
    /// When the rotation was made.
    pub rotated_at: DateTime<Utc>,
    /// Why, as the operator said it.
    pub reason: String,
}

/// A rotation statement as signed: the exact bytes, and both signatures in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRotation {
    /// The [`Rotation`] as JSON: the bytes both signatures cover.
    pub statement: String,
    /// Ed25519 signature of `statement` by the previous key.
    pub previous_signature: String,
    /// Ed25519 signature of `statement` by the next key.
    pub next_signature: String,
}

impl SignedRotation {
    /// Signs a rotation from `previous` to `next`.
    pub fn sign(
        previous: &SigningKey,
        next: &SigningKey,
        sequence: u64,
        reason: &str,
    ) -> Result<SignedRotation, PkiError> {
        let rotation = Rotation {
            format: 1,
            sequence,
            previous_key: previous.fingerprint()?,
            next_key: next.fingerprint()?,
            next_key_pem: String::from_utf8_lossy(&next.public_key_pem()?).into_owned(),
            rotated_at: Utc::now(),
            reason: reason.to_owned(),
        };
        let statement = serde_json::to_string_pretty(&rotation).expect("a rotation serializes");
        Ok(SignedRotation {
            previous_signature: hex(&previous.sign(statement.as_bytes())?),
            next_signature: hex(&next.sign(statement.as_bytes())?),
            statement,
        })
    }

    /// The statement, parsed (not verified).
    pub fn rotation(&self) -> Result<Rotation, ChainError> {
        serde_json::from_str(&self.statement).map_err(|err| ChainError::Malformed(err.to_string()))
    }
}

/// `keys.json`: every rotation of one manager's key, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyChain {
    /// Format version of this document.
    pub format: u32,
    /// The signed rotations, by sequence.
    pub rotations: Vec<SignedRotation>,
}

/// Why a chain cannot be followed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// Not a chain document.
    #[error("the key chain is not valid: {0}")]
    Malformed(String),
    /// A statement names the trusted key but that key did not sign it: forged, or damaged.
    #[error(
        "key rotation {sequence} from {previous} to {next} is not signed by {previous}: refusing \
         it (a forged or damaged rotation statement)"
    )]
    NotSignedByPrevious {
        sequence: u64,
        previous: String,
        next: String,
    },
    /// The new key did not sign the statement, or its PEM is not the key named.
    #[error("key rotation {sequence} to {next} is not signed by that key: refusing it")]
    NotSignedByNext { sequence: u64, next: String },
}

/// Where following a chain from a trusted key led.
pub struct Followed {
    /// `sha256:<hex>` of the newest key reached (the trusted one when nothing rotated it).
    pub fingerprint: String,
    /// Its PEM, when the chain moved on (the follower records it).
    pub pem: Option<String>,
    /// The key reached.
    pub key: VerifyingKey,
    /// The rotations accepted on the way, oldest first.
    pub steps: Vec<Rotation>,
}

impl KeyChain {
    /// Parses a chain document; a follower reads at most [`MAX_CHAIN_BYTES`].
    pub fn parse(bytes: &[u8]) -> Result<KeyChain, ChainError> {
        let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
        let chain: KeyChain =
            serde_json::from_slice(bytes).map_err(|err| ChainError::Malformed(err.to_string()))?;
        if chain.format != 1 {
            return Err(ChainError::Malformed(format!(
                "format {} is newer than this pm understands: upgrade it",
                chain.format
            )));
        }
        Ok(chain)
    }

    /// The home's chain (empty when its key was never rotated).
    pub fn load(home: &Path) -> Result<KeyChain, PkiError> {
        let path = home.join(CHAIN_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => KeyChain::parse(&bytes).map_err(|err| PkiError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, err.to_string()),
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(KeyChain {
                format: 1,
                rotations: Vec::new(),
            }),
            Err(source) => Err(PkiError::Io { path, source }),
        }
    }

    /// Writes the chain to the home (0644: it is public), fsynced, by rename.
    pub fn save(&self, home: &Path) -> Result<(), PkiError> {
        let path = home.join(CHAIN_FILE);
        durable::write_atomic(&path, &self.to_bytes(), 0o644)
            .map_err(|source| PkiError::Io { path, source })
    }

    /// The document as written and served.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a chain serializes");
        bytes.push(b'\n');
        bytes
    }

    /// The sequence number of the next rotation.
    pub fn next_sequence(&self) -> u64 {
        self.rotations
            .iter()
            .filter_map(|r| r.rotation().ok())
            .map(|r| r.sequence)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// The last rotation, parsed.
    pub fn last(&self) -> Option<Rotation> {
        self.rotations.last().and_then(|r| r.rotation().ok())
    }
}

/// Follows `chain` from the key a follower trusts (`fingerprint`, `key`) to the newest key it
/// leads to. Statements that do not start from the key reached so far are history the follower
/// is already past (or another branch) and are skipped; one that does start from it must carry
/// valid signatures of both keys, else the whole chain is refused.
pub fn follow(
    chain: &KeyChain,
    fingerprint: &str,
    key: VerifyingKey,
) -> Result<Followed, ChainError> {
    let mut reached = Followed {
        fingerprint: fingerprint.to_owned(),
        pem: None,
        key,
        steps: Vec::new(),
    };
    let mut last_sequence = 0;
    for signed in &chain.rotations {
        let rotation = signed.rotation()?;
        if rotation.sequence <= last_sequence {
            return Err(ChainError::Malformed(format!(
                "rotation {} comes after rotation {last_sequence}: the chain is out of order",
                rotation.sequence
            )));
        }
        last_sequence = rotation.sequence;
        if rotation.previous_key != reached.fingerprint {
            continue;
        }
        let signature = |text: &str| unhex(text).unwrap_or_default();
        if !reached.key.verify(
            signed.statement.as_bytes(),
            &signature(&signed.previous_signature),
        ) {
            return Err(ChainError::NotSignedByPrevious {
                sequence: rotation.sequence,
                previous: rotation.previous_key,
                next: rotation.next_key,
            });
        }
        let not_next = || ChainError::NotSignedByNext {
            sequence: rotation.sequence,
            next: rotation.next_key.clone(),
        };
        let (next_fingerprint, next_key) =
            super::parse_public_key(rotation.next_key_pem.as_bytes(), Path::new("keys.json"))
                .map_err(|_| not_next())?;
        if next_fingerprint != rotation.next_key
            || !next_key.verify(
                signed.statement.as_bytes(),
                &signature(&signed.next_signature),
            )
        {
            return Err(not_next());
        }
        reached.fingerprint = next_fingerprint;
        reached.pem = Some(rotation.next_key_pem.clone());
        reached.key = next_key;
        reached.steps.push(rotation);
    }
    Ok(reached)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(key: &SigningKey) -> VerifyingKey {
        key.verifying_key().unwrap()
    }

    fn chain(rotations: Vec<SignedRotation>) -> KeyChain {
        KeyChain {
            format: 1,
            rotations,
        }
    }

    /// Follows a chain of `rotations` from `key`.
    fn follow_from(
        key: &SigningKey,
        rotations: Vec<SignedRotation>,
    ) -> Result<Followed, ChainError> {
        follow(
            &chain(rotations),
            &key.fingerprint().unwrap(),
            verifier(key),
        )
    }

    #[test]
    fn a_follower_of_the_first_key_reaches_the_newest_through_every_rotation() {
        let [a, b, c] = [(); 3].map(|_| SigningKey::generate().unwrap());
        let chain = chain(vec![
            SignedRotation::sign(&a, &b, 1, "yearly").unwrap(),
            SignedRotation::sign(&b, &c, 2, "yearly").unwrap(),
        ]);
        let reached = follow(&chain, &a.fingerprint().unwrap(), verifier(&a)).unwrap();
        assert_eq!(reached.fingerprint, c.fingerprint().unwrap());
        assert_eq!(reached.steps.len(), 2);
        assert!(reached.key.verify(b"m", &c.sign(b"m").unwrap()));
        // A follower already on b takes only the second step; one on c stays.
        let from_b = follow(&chain, &b.fingerprint().unwrap(), verifier(&b)).unwrap();
        assert_eq!(from_b.steps.len(), 1);
        let from_c = follow(&chain, &c.fingerprint().unwrap(), verifier(&c)).unwrap();
        assert!(from_c.steps.is_empty() && from_c.pem.is_none());
        let round = KeyChain::parse(&chain.to_bytes()).unwrap();
        assert_eq!(round, chain);
    }

    #[test]
    fn a_rotation_not_signed_by_the_trusted_key_is_refused() {
        let [a, b, mallory] = [(); 3].map(|_| SigningKey::generate().unwrap());
        // Mallory names a's fingerprint but signs with her own key.
        let mut forged = SignedRotation::sign(&mallory, &b, 1, "forged").unwrap();
        let mut rotation = forged.rotation().unwrap();
        rotation.previous_key = a.fingerprint().unwrap();
        forged.statement = serde_json::to_string_pretty(&rotation).unwrap();
        forged.previous_signature = hex(&mallory.sign(forged.statement.as_bytes()).unwrap());
        forged.next_signature = hex(&b.sign(forged.statement.as_bytes()).unwrap());
        let err = follow_from(&a, vec![forged]).err().unwrap();
        assert!(
            matches!(err, ChainError::NotSignedByPrevious { .. }),
            "{err}"
        );
        // A statement altered after signing fails alike.
        let mut altered = SignedRotation::sign(&a, &b, 1, "yearly").unwrap();
        altered.statement = altered.statement.replace("yearly", "hourly");
        assert!(follow_from(&a, vec![altered]).is_err());
    }

    #[test]
    fn a_rotation_the_new_key_did_not_sign_is_refused() {
        let [a, b, c] = [(); 3].map(|_| SigningKey::generate().unwrap());
        let mut signed = SignedRotation::sign(&a, &b, 1, "yearly").unwrap();
        signed.next_signature = hex(&c.sign(signed.statement.as_bytes()).unwrap());
        let err = follow_from(&a, vec![signed]).err().unwrap();
        assert!(matches!(err, ChainError::NotSignedByNext { .. }), "{err}");
    }

    #[test]
    fn a_chain_out_of_order_or_of_a_newer_format_is_refused() {
        let [a, b, c] = [(); 3].map(|_| SigningKey::generate().unwrap());
        let chain = chain(vec![
            SignedRotation::sign(&b, &c, 2, "").unwrap(),
            SignedRotation::sign(&a, &b, 1, "").unwrap(),
        ]);
        assert!(follow(&chain, &a.fingerprint().unwrap(), verifier(&a)).is_err());
        assert!(KeyChain::parse(br#"{"format":2,"rotations":[]}"#).is_err());
    }
}
