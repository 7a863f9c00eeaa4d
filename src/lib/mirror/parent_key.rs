//! The key a child mirror trusts for its parent (a `pm` product): the operator's `trusted_key`
//! file, followed through the parent's key rotations this mirror accepted before
//! (docs/keys.md, "Importing and child mirrors").
//!
//! The operator's file is theirs and is never rewritten. The rotations followed are recorded in
//! the home: `trust/followed/<product>.json` holds the signed statements (a [`KeyChain`]), and
//! `<product>.pem` beside it the key they lead to, for people and `openssl`. Every sync follows
//! the record from the operator's key again with [`follow`] and starts from the key reached, so
//! a key the parent rotated away from is no longer accepted. A record that starts from another
//! key (the operator replaced `trusted_key`) leads nowhere and is ignored; one whose statements
//! do not verify is an error that names it.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::durable;
use crate::pki::rotation::{ChainError, KeyChain, SignedRotation, follow};
use crate::pki::{self, VerifyingKey};

/// Where child mirrors record the parents' rotations they followed.
pub const FOLLOWED_DIR: &str = "trust/followed";

/// The words of a sync error when the parent's manifest is signed by a key no rotation leads to
/// (`pm-mirror sync` then prints [`lost_key_hint`]).
pub const NOT_FOLLOWED: &str =
    "no rotation statement in the parent's `keys.json` leads from the key this mirror trusts";

/// What to do when the parent's key was replaced without a statement (`--old-key-lost`): only
/// the operator can vouch for the new key.
pub fn lost_key_hint(product: &str) -> String {
    format!(
        "if the parent's key was lost and replaced, write its new public key on the parent with \
         `pm-mirror key export-public --out parent.pem`, check its fingerprint, replace the \
         `trusted_key` file of `{product}` (pm.toml) with it, and remove \
         `{FOLLOWED_DIR}/{product}.json` and `{FOLLOWED_DIR}/{product}.pem` from this home (the \
         old key's rotations followed); latest is unchanged (docs/keys.md)"
    )
}

/// The key a `pm` product trusts now.
pub struct ParentKey {
    /// `sha256:<hex>` of the key.
    pub fingerprint: String,
    /// The key.
    pub key: VerifyingKey,
    /// `sha256:<hex>` of the operator's `trusted_key` file, where following starts.
    pub configured_fingerprint: String,
    /// The statements followed from it, oldest first (empty: the operator's key itself).
    pub followed: Vec<SignedRotation>,
}

/// What `pm-mirror status` shows of a `pm` product's key.
#[derive(Debug, Serialize)]
pub struct ParentKeyStatus {
    /// The key the parent's manifests must be signed with now.
    pub fingerprint: String,
    /// The operator's `trusted_key` file.
    pub trusted_key: PathBuf,
    /// Its key, where following starts.
    pub trusted_key_fingerprint: String,
    /// The parent's rotations followed from it.
    pub rotations_followed: Vec<u64>,
    /// The home's record of them, when there are any.
    pub record: Option<PathBuf>,
}

impl ParentKeyStatus {
    /// One line for `pm-mirror status`.
    pub fn describe(&self) -> String {
        match &self.record {
            None => format!(
                "trusts the parent's key {} (`{}`)",
                self.fingerprint,
                self.trusted_key.display()
            ),
            Some(record) => format!(
                "trusts the parent's key {} (followed rotation {} from `{}`, {}; recorded in `{}`)",
                self.fingerprint,
                self.rotations_followed
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.trusted_key.display(),
                self.trusted_key_fingerprint,
                record.display()
            ),
        }
    }
}

/// The record of `product`: the statements (`.json`) and the key reached (`.pem`).
pub fn record_paths(home: &Path, product: &str) -> (PathBuf, PathBuf) {
    let dir = home.join(FOLLOWED_DIR);
    (
        dir.join(format!("{product}.json")),
        dir.join(format!("{product}.pem")),
    )
}

impl ParentKey {
    /// The operator's `trusted_key`, followed through the home's record of `product`. The error
    /// says what is wrong with the file or the record.
    pub fn load(home: &Path, product: &str, trusted_key: &Path) -> Result<ParentKey, String> {
        let pem = std::fs::read(trusted_key).map_err(|err| format!("cannot read it ({err})"))?;
        let (configured_fingerprint, key) =
            pki::parse_public_key(&pem, trusted_key).map_err(|_| {
                "it is not a PEM public key (write it with `pm-mirror key export-public` on the \
             parent)"
                    .to_string()
            })?;
        let (record_path, _) = record_paths(home, product);
        let record = match std::fs::read(&record_path) {
            Ok(bytes) => KeyChain::parse(&bytes).map_err(|err| err.to_string()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(KeyChain {
                format: 1,
                rotations: Vec::new(),
            }),
            Err(err) => Err(err.to_string()),
        };
        let reached = record
            .and_then(|record| {
                let reached = follow(&record, &configured_fingerprint, key.clone())
                    .map_err(|err| err.to_string())?;
                Ok((record, reached))
            })
            .map_err(|err| {
                format!(
                    "this home's record of the parent's key rotations `{}` is refused ({err}); \
                     remove it and sync again",
                    record_path.display()
                )
            })?;
        let (record, reached) = reached;
        let followed = accepted(&record, &reached.steps);
        Ok(ParentKey {
            fingerprint: reached.fingerprint,
            key: reached.key,
            configured_fingerprint,
            followed,
        })
    }

    /// Follows the parent's `chain` from this key: the key it leads to, with the statements that
    /// lead there, or `None` when the chain does not move it on. A statement starting from this
    /// key that it did not sign refuses the chain.
    pub fn follow(&self, chain: &KeyChain) -> Result<Option<ParentKey>, ChainError> {
        let reached = follow(chain, &self.fingerprint, self.key.clone())?;
        if reached.steps.is_empty() {
            return Ok(None);
        }
        let mut followed = self.followed.clone();
        followed.extend(accepted(chain, &reached.steps));
        Ok(Some(ParentKey {
            fingerprint: reached.fingerprint,
            key: reached.key,
            configured_fingerprint: self.configured_fingerprint.clone(),
            followed,
        }))
    }

    /// Sequence numbers of the rotations followed from the operator's key.
    pub fn rotations(&self) -> Vec<u64> {
        self.followed
            .iter()
            .filter_map(|signed| signed.rotation().ok())
            .map(|rotation| rotation.sequence)
            .collect()
    }

    /// Writes the home's record of `product`: the statements, then the key they lead to, each
    /// fsynced and renamed into place (the `.pem` is for people; syncs read the statements).
    pub fn record(&self, home: &Path, product: &str) -> std::io::Result<PathBuf> {
        let (record_path, pem_path) = record_paths(home, product);
        let dir = home.join(FOLLOWED_DIR);
        std::fs::create_dir_all(&dir)?;
        let chain = KeyChain {
            format: 1,
            rotations: self.followed.clone(),
        };
        durable::write_atomic(&record_path, &chain.to_bytes(), 0o644)?;
        if let Some(pem) = self
            .followed
            .last()
            .and_then(|signed| signed.rotation().ok())
            .map(|rotation| rotation.next_key_pem)
        {
            durable::write_atomic(&pem_path, pem.as_bytes(), 0o644)?;
        }
        Ok(record_path)
    }

    /// What `pm-mirror status` shows.
    pub fn status(&self, home: &Path, product: &str, trusted_key: &Path) -> ParentKeyStatus {
        ParentKeyStatus {
            fingerprint: self.fingerprint.clone(),
            trusted_key: trusted_key.to_owned(),
            trusted_key_fingerprint: self.configured_fingerprint.clone(),
            rotations_followed: self.rotations(),
            record: (!self.followed.is_empty()).then(|| record_paths(home, product).0),
        }
    }
}

/// The signed statements of `chain` that `steps` (what [`follow`] accepted) were parsed from.
fn accepted(chain: &KeyChain, steps: &[crate::pki::rotation::Rotation]) -> Vec<SignedRotation> {
    chain
        .rotations
        .iter()
        .filter(|signed| signed.rotation().is_ok_and(|r| steps.contains(&r)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::SigningKey;

    /// A home whose `parent.pem` is `key`'s public half; returns the file.
    fn trusting(home: &Path, key: &SigningKey) -> PathBuf {
        let path = home.join("parent.pem");
        std::fs::write(&path, key.public_key_pem().unwrap()).unwrap();
        path
    }

    fn chain(rotations: Vec<SignedRotation>) -> KeyChain {
        KeyChain {
            format: 1,
            rotations,
        }
    }

    #[test]
    fn a_followed_key_is_recorded_and_every_later_load_starts_from_it() {
        let home = tempfile::tempdir().unwrap();
        let [a, b, c] = [(); 3].map(|_| SigningKey::generate().unwrap());
        let file = trusting(home.path(), &a);
        let start = ParentKey::load(home.path(), "site", &file).unwrap();
        assert_eq!(start.fingerprint, a.fingerprint().unwrap());
        let parent = chain(vec![
            SignedRotation::sign(&a, &b, 1, "").unwrap(),
            SignedRotation::sign(&b, &c, 2, "").unwrap(),
        ]);
        let moved = start.follow(&parent).unwrap().unwrap();
        assert_eq!(moved.rotations(), [1, 2]);
        moved.record(home.path(), "site").unwrap();
        let again = ParentKey::load(home.path(), "site", &file).unwrap();
        assert_eq!(again.fingerprint, c.fingerprint().unwrap());
        assert_eq!(
            again.configured_fingerprint,
            a.fingerprint().unwrap(),
            "the operator's file is where following starts"
        );
        assert!(again.follow(&parent).unwrap().is_none(), "nothing new");
        let (_, pem) = record_paths(home.path(), "site");
        assert_eq!(
            std::fs::read(pem).unwrap(),
            c.public_key_pem().unwrap(),
            "the key reached, beside the statements"
        );
    }

    #[test]
    fn a_record_from_another_key_is_ignored_and_a_damaged_one_is_refused_by_name() {
        let home = tempfile::tempdir().unwrap();
        let [a, b, x] = [(); 3].map(|_| SigningKey::generate().unwrap());
        let file = trusting(home.path(), &a);
        let start = ParentKey::load(home.path(), "site", &file).unwrap();
        let parent = chain(vec![SignedRotation::sign(&a, &b, 1, "").unwrap()]);
        start
            .follow(&parent)
            .unwrap()
            .unwrap()
            .record(home.path(), "site")
            .unwrap();
        // The operator replaced `trusted_key` (the parent's key was lost): the record leads
        // nowhere from the new file and the new key is trusted as it is.
        let replaced = trusting(home.path(), &x);
        let loaded = ParentKey::load(home.path(), "site", &replaced).unwrap();
        assert_eq!(loaded.fingerprint, x.fingerprint().unwrap());
        assert!(loaded.followed.is_empty());
        // A record altered by hand does not verify from the operator's key.
        let file = trusting(home.path(), &a);
        let (record, _) = record_paths(home.path(), "site");
        let text = std::fs::read_to_string(&record).unwrap();
        std::fs::write(
            &record,
            text.replacen("\\\"sequence\\\": 1", "\\\"sequence\\\": 9", 1),
        )
        .unwrap();
        let err = ParentKey::load(home.path(), "site", &file).err().unwrap();
        assert!(
            err.contains("site.json") && err.contains("remove it"),
            "{err}"
        );
    }
}
