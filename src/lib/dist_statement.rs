//! The signed dist statement (SECURITY.md, rollback and freeze attacks): `dist.json` and its
//! detached signature `dist.sig` in every view of the repository, served at `/dist.json`. It
//! names the revision dist is, carries a counter that grows with every publish, rollback and
//! re-signing of this repository, and says until when it is valid. Manifests never expire and
//! every one the manager signed stays valid, so without it the network could replay an old
//! dist, or keep serving the same one, and an agent could not tell. An agent refuses a statement
//! older than one it already accepted, an expired one, and one that does not match the manifest
//! it fetched; only an explicit operator rollback (`--generation N`, over mutual TLS) goes back.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;

/// File name of the statement in a view, and its URL path under the dist URL.
pub const STATEMENT_FILE: &str = "dist.json";
/// File name of its detached Ed25519 signature (the manifest signing key's).
pub const SIGNATURE_FILE: &str = "dist.sig";
/// Largest statement an agent reads.
pub const MAX_STATEMENT_BYTES: u64 = 64 * 1024;
/// How long a statement is valid unless `[serve] dist_valid_for` says otherwise.
pub const DEFAULT_VALID_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// `pm-mirror publish` re-signs an unchanged dist once this part of the validity has passed, so
/// the statement of a healthy mirror that runs its timer never comes near expiring.
pub const REFRESH_AFTER_PART: u32 = 7;

/// The contents of `dist.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistStatement {
    /// Format version of this document.
    pub format: u32,
    /// Grows by one with every publish, rollback and re-signing of this repository.
    pub dist_serial: u64,
    /// The revision dist is.
    pub revision: String,
    /// Its manifest's serial.
    pub manifest_serial: u32,
    /// Its manifest's content hash.
    pub content_sha256: String,
    /// When the statement was signed.
    pub signed_at: DateTime<Utc>,
    /// After this an agent refuses it: dist was not re-signed for longer than expected.
    pub expires_at: DateTime<Utc>,
}

impl DistStatement {
    /// A statement for `manifest` as dist, numbered `dist_serial`, valid for `valid_for`.
    pub fn new(manifest: &Manifest, dist_serial: u64, valid_for: Duration) -> DistStatement {
        let signed_at = Utc::now();
        DistStatement {
            format: 1,
            dist_serial,
            revision: manifest.revision.clone(),
            manifest_serial: manifest.serial,
            content_sha256: manifest.content_sha256.clone(),
            signed_at,
            expires_at: signed_at
                + chrono::Duration::from_std(valid_for).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// Whether `manifest` is the one this statement names.
    pub fn names(&self, manifest: &Manifest) -> bool {
        self.revision == manifest.revision
            && self.manifest_serial == manifest.serial
            && self.content_sha256 == manifest.content_sha256
    }

    /// Whether it expired at `now`.
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }

    /// Whether publish should re-sign it at `now` (a part of `valid_for` has passed).
    pub fn is_due_for_refresh(&self, now: DateTime<Utc>, valid_for: Duration) -> bool {
        // Signed by a clock ahead of this one: its expiry says nothing of how fresh dist is.
        if self.signed_at > now + chrono::Duration::minutes(5) {
            return true;
        }
        let part = chrono::Duration::from_std(valid_for / REFRESH_AFTER_PART)
            .unwrap_or(chrono::Duration::MAX);
        now >= self.signed_at + part || self.is_expired(now)
    }

    /// The document's bytes as signed and served.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a statement serializes");
        bytes.push(b'\n');
        bytes
    }
}

/// A statement with its signature, as written into a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedStatement {
    /// `dist.json`.
    pub document: Vec<u8>,
    /// `dist.sig`.
    pub signature: Vec<u8>,
}

impl SignedStatement {
    /// Signs `statement` with the manifest signing key.
    pub fn sign(
        statement: &DistStatement,
        key: &crate::pki::SigningKey,
    ) -> Result<SignedStatement, crate::pki::PkiError> {
        let document = statement.to_bytes();
        let signature = key.sign(&document)?;
        Ok(SignedStatement {
            document,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(revision: &str, serial: u32) -> Manifest {
        Manifest {
            format: 1,
            revision: revision.into(),
            serial,
            created_at: Utc::now(),
            source: "upstream".into(),
            content_sha256: format!("sha-of-{revision}"),
            products: Vec::new(),
            files: Vec::new(),
        }
    }

    #[test]
    fn a_statement_names_only_the_manifest_it_was_made_for() {
        let statement = DistStatement::new(&manifest("r3", 3), 9, DEFAULT_VALID_FOR);
        assert!(statement.names(&manifest("r3", 3)));
        assert!(!statement.names(&manifest("r2", 2)));
        let mut same_name_other_content = manifest("r3", 3);
        same_name_other_content.content_sha256 = "other".into();
        assert!(!statement.names(&same_name_other_content));
    }

    #[test]
    fn a_statement_is_re_signed_after_a_seventh_of_its_validity_and_expires_after_all_of_it() {
        let statement = DistStatement::new(&manifest("r1", 1), 1, DEFAULT_VALID_FOR);
        let at = |hours: i64| statement.signed_at + chrono::Duration::hours(hours);
        assert!(!statement.is_due_for_refresh(at(23), DEFAULT_VALID_FOR));
        assert!(statement.is_due_for_refresh(at(24), DEFAULT_VALID_FOR));
        assert!(!statement.is_expired(at(7 * 24 - 1)));
        // Signed a year ahead (a manager clock stepped forward): due at once when it is back.
        assert!(statement.is_due_for_refresh(at(-365 * 24), DEFAULT_VALID_FOR));
        assert!(statement.is_expired(at(7 * 24)));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let statement = DistStatement::new(&manifest("r1", 1), 1, DEFAULT_VALID_FOR);
        let mut value = serde_json::to_value(&statement).unwrap();
        value["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<DistStatement>(value).is_err());
        let round: DistStatement = serde_json::from_slice(&statement.to_bytes()).unwrap();
        assert_eq!(round, statement);
    }
}
