//! The manager's keys. For now the manifest signing key: Ed25519, created on first use,
//! private key 0600 in `PM_HOME/pki/`. A signature is the raw 64 bytes, so operators can check
//! it with `openssl pkeyutl -verify -rawin`.
//! The mutual-TLS certificates (manager CA, client and agent certificates) are in [`ca`].

pub mod ca;
pub mod rotation;

use std::path::{Path, PathBuf};

use openssl::pkey::{PKey, Private, Public};
use openssl::sign::{Signer, Verifier};

use crate::durable;

/// Private key file of the manifest signing key, relative to the home.
pub const SIGNING_KEY_FILE: &str = "pki/manifest-signing.key";
/// Public key file that agents and importers trust.
pub const SIGNING_PUBLIC_KEY_FILE: &str = "pki/manifest-signing.pub.pem";

/// Key errors.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Reading or writing a key file failed.
    #[error("cannot access key file `{path}`")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file is not a usable key.
    #[error("`{path}` is not an Ed25519 key in PEM form")]
    BadKey {
        path: PathBuf,
        source: openssl::error::ErrorStack,
    },
    /// A key of another type.
    #[error("`{path}` is not an Ed25519 key (pm signs with Ed25519)")]
    NotEd25519 { path: PathBuf },
    /// The private key is readable by others.
    #[error("`{path}` is readable by other users (mode {mode:o})")]
    LoosePermissions { path: PathBuf, mode: u32 },
    /// The key is gone but the repository holds revisions it signed: creating a new one
    /// silently would leave every agent, importer and backup unable to verify them.
    #[error(
        "the manifest signing key `{path}` is missing, but this home's repository holds \
         revisions signed with a key"
    )]
    Lost { path: PathBuf },
    /// The key is not the one that signed the repository's dist and latest: a `pki/` restored
    /// from before a rotation, or a key replaced by hand. Signing with it would serve what no
    /// follower trusts.
    #[error(
        "the manifest signing key {fingerprint} did not sign this repository's {revision}{}",
        match rotated_to {
            Some((sequence, next)) => format!(
                ": it was rotated away by rotation {sequence} (to {next}); `pki/` looks restored \
                 from before that rotation"
            ),
            None => format!(
                ": it is not the key this repository was signed with (a key replaced by hand, \
                 or {revision}'s manifest was damaged)"
            ),
        }
    )]
    NotTheRepositorysKey {
        fingerprint: String,
        revision: String,
        rotated_to: Option<(u64, String)>,
    },
    /// `pm-mirror key rotate` stopped half-way: nothing may sign until it has finished.
    #[error("a key rotation is unfinished (`{path}` is the new key waiting to be installed)")]
    RotationUnfinished { path: PathBuf },
    /// An OpenSSL operation failed.
    #[error("openssl: {0}")]
    Openssl(#[from] openssl::error::ErrorStack),
}

impl PkiError {
    /// What the operator should do, for the errors that have one answer.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            PkiError::Lost { .. } => Some(
                "restore `pki/` from a backup of PM_HOME; if the key is truly lost, run \
                 `pm-mirror key rotate --old-key-lost` and tell the agents to trust the new \
                 key (docs/keys.md)",
            ),
            PkiError::RotationUnfinished { .. } => {
                Some("run `pm-mirror key rotate` again to finish it (docs/keys.md)")
            }
            PkiError::NotTheRepositorysKey { .. } => Some(
                "put back the key that signed the repository (restore `pki/` from a newer \
                 backup); if that key is lost, run `pm-mirror key rotate --old-key-lost`, which \
                 sets this one aside (docs/keys.md); `pm-doctor` tells a damaged manifest apart",
            ),
            PkiError::LoosePermissions { .. } => Some(
                "make it readable by its owner only (`chmod 600 FILE`), and check who else could \
                 read it: a key others could read may be stolen (docs/keys.md)",
            ),
            PkiError::BadKey { .. } | PkiError::NotEd25519 { .. } => Some(
                "the key file is damaged or not pm's: restore `pki/` from a backup of PM_HOME; \
                 if there is none, run `pm-mirror key rotate --old-key-lost`, which sets the \
                 file aside (docs/keys.md)",
            ),
            _ => None,
        }
    }
}

/// The manager's manifest signing key.
pub struct SigningKey {
    key: PKey<Private>,
}

impl SigningKey {
    /// Whether `home` has a signing key yet (dry runs must not create one).
    pub fn exists(home: &Path) -> bool {
        home.join(SIGNING_KEY_FILE).exists()
    }

    /// Loads the key from `home`, creating it (0600, in a 0700 `pki/`) on first use: when the
    /// home has no key yet and its repository no revision. A key that went missing after it
    /// signed revisions is [`PkiError::Lost`], never silently replaced; a rotation that stopped
    /// half-way is [`PkiError::RotationUnfinished`].
    pub fn load_or_create(home: &Path) -> Result<SigningKey, PkiError> {
        let pending = home.join(rotation::PENDING_KEY_FILE);
        if pending.exists() {
            return Err(PkiError::RotationUnfinished { path: pending });
        }
        match SigningKey::load(home)? {
            Some(key) => {
                key.check_signs_repository(home)?;
                Ok(key)
            }
            None if repository_has_revisions(home) => Err(PkiError::Lost {
                path: home.join(SIGNING_KEY_FILE),
            }),
            None => SigningKey::create(home),
        }
    }

    /// Fails unless this key signed the repository's dist or latest (when it has either): the
    /// signature only, two small files each.
    pub fn check_signs_repository(&self, home: &Path) -> Result<(), PkiError> {
        let repo = crate::repo::Repo::new(home);
        let Ok(generations) = repo.generations() else {
            // A view that does not parse is the repository's problem, reported where it is read.
            return Ok(());
        };
        let heads: Vec<&String> = generations
            .dist
            .iter()
            .chain(generations.latest.iter())
            .collect();
        let Some(first) = heads.first() else {
            return Ok(());
        };
        let verifier = self.verifying_key()?;
        if heads
            .iter()
            .any(|revision| revision_signed_by(&repo, revision, &verifier))
        {
            return Ok(());
        }
        let fingerprint = self.fingerprint()?;
        let rotated_to = std::fs::read(repo.root().join("view").join(rotation::SERVED_FILE))
            .ok()
            .and_then(|bytes| rotation::KeyChain::parse(&bytes).ok())
            .and_then(|chain| {
                chain
                    .rotations
                    .iter()
                    .filter_map(|r| r.rotation().ok())
                    .find(|r| r.previous_key == fingerprint)
                    .map(|r| (r.sequence, r.next_key))
            });
        Err(PkiError::NotTheRepositorysKey {
            fingerprint,
            revision: (*first).clone(),
            rotated_to,
        })
    }

    /// Loads the key from `home`; `None` when there is none.
    pub fn load(home: &Path) -> Result<Option<SigningKey>, PkiError> {
        SigningKey::load_file(&home.join(SIGNING_KEY_FILE))
    }

    /// Loads a private key file, refusing one readable by others; `None` when it does not exist.
    pub fn load_file(path: &Path) -> Result<Option<SigningKey>, PkiError> {
        use std::os::unix::fs::PermissionsExt;
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PkiError::Io {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mode = std::fs::metadata(path)
            .map_err(|source| PkiError::Io {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::LoosePermissions {
                path: path.to_owned(),
                mode: mode & 0o777,
            });
        }
        let key = PKey::private_key_from_pem(&pem).map_err(|source| PkiError::BadKey {
            path: path.to_owned(),
            source,
        })?;
        if key.id() != openssl::pkey::Id::ED25519 {
            return Err(PkiError::NotEd25519 {
                path: path.to_owned(),
            });
        }
        Ok(Some(SigningKey { key }))
    }

    /// Creates the home's key (0600, in a 0700 `pki/`) and its public half (0644).
    pub fn create(home: &Path) -> Result<SigningKey, PkiError> {
        let key = SigningKey::generate()?;
        key.install(home)?;
        tracing::info!(path = %home.join(SIGNING_KEY_FILE).display(), "created manifest signing key");
        Ok(key)
    }

    /// A new key, not written anywhere.
    pub fn generate() -> Result<SigningKey, PkiError> {
        Ok(SigningKey {
            key: PKey::generate_ed25519()?,
        })
    }

    /// Writes this key as the home's signing key: the public half first, then the private key
    /// by rename, so a crash leaves either key whole.
    pub fn install(&self, home: &Path) -> Result<(), PkiError> {
        let pki = home.join("pki");
        durable::create_private_dir(&pki, 0o700).map_err(|source| PkiError::Io {
            path: pki.clone(),
            source,
        })?;
        let public_path = home.join(SIGNING_PUBLIC_KEY_FILE);
        durable::write_atomic(&public_path, &self.key.public_key_to_pem()?, 0o644).map_err(
            |source| PkiError::Io {
                path: public_path,
                source,
            },
        )?;
        self.write_private(&home.join(SIGNING_KEY_FILE))
    }

    /// Writes the private key to `path` (0600, fsynced, by rename).
    pub fn write_private(&self, path: &Path) -> Result<(), PkiError> {
        durable::write_atomic(path, &self.key.private_key_to_pem_pkcs8()?, 0o600).map_err(
            |source| PkiError::Io {
                path: path.to_owned(),
                source,
            },
        )
    }

    /// The public half, to verify with.
    pub fn verifying_key(&self) -> Result<VerifyingKey, PkiError> {
        Ok(VerifyingKey::from_pem(&self.public_key_pem()?)?)
    }

    /// Signs `message`, returning the raw 64-byte Ed25519 signature.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, PkiError> {
        let mut signer = Signer::new_without_digest(&self.key)?;
        Ok(signer.sign_oneshot_to_vec(message)?)
    }

    /// The public half in PEM form.
    pub fn public_key_pem(&self) -> Result<Vec<u8>, PkiError> {
        Ok(self.key.public_key_to_pem()?)
    }

    /// `sha256:<hex>` of the public key, as `trust list` shows it.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        Ok(fingerprint_of_der(&self.key.public_key_to_der()?))
    }
}

fn fingerprint_of_der(der: &[u8]) -> String {
    format!(
        "sha256:{}",
        crate::manifest::hex(&openssl::sha::sha256(der))
    )
}

/// `sha256:<hex>` of the home's signing key, from its public half (`None` before it exists).
pub fn current_fingerprint(home: &Path) -> Option<String> {
    let path = home.join(SIGNING_PUBLIC_KEY_FILE);
    let pem = std::fs::read(&path).ok()?;
    parse_public_key(&pem, &path)
        .ok()
        .map(|(fingerprint, _)| fingerprint)
}

/// Whether `revision`'s manifest verifies with `key`.
pub fn revision_signed_by(repo: &crate::repo::Repo, revision: &str, key: &VerifyingKey) -> bool {
    let dir = repo.revision_dir(revision);
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_default();
    key.verify(
        &read(crate::manifest::MANIFEST_FILE),
        &read(crate::manifest::SIGNATURE_FILE),
    )
}

/// Whether `home/repo/revisions` holds any revision (then its key must not change silently).
pub fn repository_has_revisions(home: &Path) -> bool {
    std::fs::read_dir(home.join("repo/revisions")).is_ok_and(|entries| {
        entries.filter_map(|e| e.ok()).any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|name| name.starts_with('r'))
        })
    })
}

/// Directory of keys whose bundles and parent manifests this mirror accepts.
pub const TRUST_DIR: &str = "trust";

/// A key in the trust store.
pub struct TrustedKey {
    /// `sha256:<hex>` of the key.
    pub fingerprint: String,
    /// The key.
    pub key: VerifyingKey,
    /// Where it is stored.
    pub path: PathBuf,
}

/// Every key in `home/trust/`, sorted by fingerprint.
pub fn trusted_keys(home: &Path) -> Result<Vec<TrustedKey>, PkiError> {
    let dir = home.join(TRUST_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PkiError::Io { path: dir, source }),
    };
    let mut keys = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| PkiError::Io {
                path: dir.clone(),
                source,
            })?
            .path();
        if path.extension().is_none_or(|e| e != "pem") {
            continue;
        }
        let pem = std::fs::read(&path).map_err(|source| PkiError::Io {
            path: path.clone(),
            source,
        })?;
        let (fingerprint, key) = parse_public_key(&pem, &path)?;
        keys.push(TrustedKey {
            fingerprint,
            key,
            path,
        });
    }
    keys.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
    Ok(keys)
}

/// Parses an Ed25519 public key in PEM form; returns its fingerprint and the key.
pub fn parse_public_key(pem: &[u8], path: &Path) -> Result<(String, VerifyingKey), PkiError> {
    let bad = |source| PkiError::BadKey {
        path: path.to_owned(),
        source,
    };
    let key = PKey::public_key_from_pem(pem).map_err(bad)?;
    if key.id() != openssl::pkey::Id::ED25519 {
        return Err(PkiError::NotEd25519 {
            path: path.to_owned(),
        });
    }
    let fingerprint = fingerprint_of_der(&key.public_key_to_der()?);
    Ok((fingerprint, VerifyingKey { key }))
}

/// Adds the public key in `pem` to the trust store; `false` when it was already trusted.
pub fn trust_key(home: &Path, pem: &[u8], source: &Path) -> Result<(String, bool), PkiError> {
    let (fingerprint, _) = parse_public_key(pem, source)?;
    let dir = home.join(TRUST_DIR);
    std::fs::create_dir_all(&dir).map_err(|source| PkiError::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(format!("{}.pem", fingerprint.trim_start_matches("sha256:")));
    if path.exists() {
        return Ok((fingerprint, false));
    }
    durable::write_atomic(&path, pem, 0o644).map_err(|source| PkiError::Io { path, source })?;
    Ok((fingerprint, true))
}

/// Removes a key (by fingerprint or a unique prefix of it); `false` when none matched.
pub fn distrust_key(home: &Path, fingerprint: &str) -> Result<Option<String>, PkiError> {
    let wanted = fingerprint.trim_start_matches("sha256:");
    let matches: Vec<TrustedKey> = trusted_keys(home)?
        .into_iter()
        .filter(|k| {
            k.fingerprint
                .trim_start_matches("sha256:")
                .starts_with(wanted)
        })
        .collect();
    match matches.as_slice() {
        [key] => {
            std::fs::remove_file(&key.path).map_err(|source| PkiError::Io {
                path: key.path.clone(),
                source,
            })?;
            Ok(Some(key.fingerprint.clone()))
        }
        _ => Ok(None),
    }
}

/// Keys this mirror stopped trusting because their owner rotated away from them (a bundle
/// carried the rotation): `<hex>.pem` and a `<hex>.json` [`RetiredTrust`] record beside it.
pub const RETIRED_TRUST_DIR: &str = "trust/retired";

/// Why and when a key left the trust store.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RetiredTrust {
    /// The key retired.
    pub fingerprint: String,
    /// When.
    pub retired_at: chrono::DateTime<chrono::Utc>,
    /// The key its owner rotated to, trusted instead.
    pub replaced_by: String,
    /// Sequence numbers of the rotations followed.
    pub rotations: Vec<u64>,
    /// What carried the rotation (`bundle <sha256>`).
    pub carried_by: String,
}

impl RetiredTrust {
    /// `1, 2`: the rotations followed.
    pub fn rotations_text(&self) -> String {
        self.rotations
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Moves a trusted key out of the trust store into [`RETIRED_TRUST_DIR`] with its record: the
/// record first, then the key by rename, so a crash leaves it trusted (the next import retires
/// it again) or retired, never lost.
pub fn retire_trusted_key(
    home: &Path,
    path: &Path,
    record: &RetiredTrust,
) -> Result<PathBuf, PkiError> {
    let dir = home.join(RETIRED_TRUST_DIR);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PkiError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let (record_path, retired) = retired_paths(home, &record.fingerprint);
    let mut json = serde_json::to_vec_pretty(record).expect("a record serializes");
    json.push(b'\n');
    durable::write_atomic(&record_path, &json, 0o644).map_err(io(&record_path))?;
    std::fs::rename(path, &retired).map_err(io(path))?;
    durable::sync_parent_dir(path).map_err(io(path))?;
    durable::sync_parent_dir(&retired).map_err(io(&retired))?;
    Ok(retired)
}

/// Removes a retired key's record and its PEM from [`RETIRED_TRUST_DIR`] (it is trusted again);
/// what is not there is not an error.
pub fn forget_retired_key(home: &Path, fingerprint: &str) -> Result<(), PkiError> {
    let (record, pem) = retired_paths(home, fingerprint);
    for path in [record, pem] {
        match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                return Err(PkiError::Io { path, source: err });
            }
            _ => {}
        }
    }
    Ok(())
}

/// The record (`<hex>.json`) and PEM (`<hex>.pem`) of a retired key.
fn retired_paths(home: &Path, fingerprint: &str) -> (PathBuf, PathBuf) {
    let dir = home.join(RETIRED_TRUST_DIR);
    let name = fingerprint.trim_start_matches("sha256:");
    (
        dir.join(format!("{name}.json")),
        dir.join(format!("{name}.pem")),
    )
}

/// The records of [`RETIRED_TRUST_DIR`], oldest first.
pub fn retired_trust(home: &Path) -> Result<Vec<RetiredTrust>, PkiError> {
    let dir = home.join(RETIRED_TRUST_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PkiError::Io { path: dir, source }),
    };
    let mut records = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|source| PkiError::Io {
            path: path.clone(),
            source,
        })?;
        // A record damaged by hand is skipped: it decides nothing, the key is out of `trust/`.
        if let Ok(record) = serde_json::from_slice::<RetiredTrust>(&bytes) {
            records.push(record);
        }
    }
    records.sort_by_key(|record| record.retired_at);
    Ok(records)
}

/// A trusted public key that verifies manifest signatures.
#[derive(Clone)]
pub struct VerifyingKey {
    key: PKey<Public>,
}

impl VerifyingKey {
    /// Parses a PEM public key.
    pub fn from_pem(pem: &[u8]) -> Result<VerifyingKey, openssl::error::ErrorStack> {
        Ok(VerifyingKey {
            key: PKey::public_key_from_pem(pem)?,
        })
    }

    /// The key in PEM form, written anew (one block, nothing around it).
    pub fn to_pem(&self) -> Result<Vec<u8>, PkiError> {
        Ok(self.key.public_key_to_pem()?)
    }

    /// Whether `signature` is a valid signature of `message` by this key.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        Verifier::new_without_digest(&self.key)
            .and_then(|mut verifier| verifier.verify_oneshot(signature, message))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn signing_key_is_created_private_and_verifies_its_signatures() {
        let home = tempfile::tempdir().unwrap();
        let key = SigningKey::load_or_create(home.path()).unwrap();
        let mode = std::fs::metadata(home.path().join(SIGNING_KEY_FILE))
            .unwrap()
            .permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
        let signature = key.sign(b"manifest").unwrap();
        let again = SigningKey::load_or_create(home.path()).unwrap();
        let public = std::fs::read(home.path().join(SIGNING_PUBLIC_KEY_FILE)).unwrap();
        let verifier = VerifyingKey::from_pem(&public).unwrap();
        assert!(verifier.verify(b"manifest", &signature));
        assert!(verifier.verify(b"manifest", &again.sign(b"manifest").unwrap()));
        assert!(!verifier.verify(b"manifest!", &signature));
    }

    #[test]
    fn a_world_readable_signing_key_is_refused() {
        let home = tempfile::tempdir().unwrap();
        SigningKey::load_or_create(home.path()).unwrap();
        let path = home.path().join(SIGNING_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SigningKey::load_or_create(home.path()),
            Err(PkiError::LoosePermissions { .. })
        ));
    }
}
