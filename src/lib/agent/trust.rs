//! The manager's manifest key as this agent trusts it (`manager/manifest-signing.pub.pem`, from
//! activation), and how it changes (docs/keys.md, Agents):
//!
//! - **Following a rotation.** When a signed document of the manager's dist (the dist statement,
//!   dist's or a backup generation's manifest) does not verify with the trusted key, the agent
//!   fetches the manager's rotation chain (`<dist URL>/keys.json`), follows it from its key with
//!   [`crate::pki::rotation::follow`], and when that leads to a key that verifies the document,
//!   trusts that key from then on. A chain the trusted key did not sign refuses the update.
//! - **The operator's trust step** after the manager's key was lost (nothing could sign a
//!   statement): `pm-agent trust-key --fingerprint sha256:HEX [--key FILE]`.
//!
//! The chain is fetched only when a document does not verify: the manager re-signs every
//! document it serves in the same view switch that serves the statement, so an agent talking to
//! the manager follows at its next update either way, and whoever answers an agent with
//! documents the old key signed answers for `keys.json` too. A GET per update would buy nothing.
//!
//! Every key change is appended to `manager/key-rotations.json` (and logged): when, from which
//! key to which, the statement's sequence and reason, and how (`rotation statement` or
//! `trusted by the operator`). `reset` forgets it with the rest of `manager/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::install::{MAX_DOCUMENT, activated_dist_url, get, get_unless_missing, join_url, lock};
use super::{MANIFEST_KEY_FILE, io_error};
use crate::cli::{ExitStatus, UserError};
use crate::durable;
use crate::manifest::{MANIFEST_FILE, SIGNATURE_FILE};
use crate::pki::VerifyingKey;
use crate::pki::rotation::{self, ChainError, KeyChain, MAX_CHAIN_BYTES};

/// Every change of the trusted manifest key, oldest first.
pub const HISTORY_FILE: &str = "manager/key-rotations.json";
/// `how` of a change made by following a rotation statement.
const BY_STATEMENT: &str = "rotation statement";
/// `how` of a change made by `pm-agent trust-key`.
const BY_OPERATOR: &str = "trusted by the operator";
/// Largest public key file read.
const MAX_KEY_BYTES: u64 = 64 * 1024;

/// One change of the trusted manifest key, as `manager/key-rotations.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyChange {
    /// When this agent made the change.
    pub changed_at: DateTime<Utc>,
    /// The key trusted before (`None`: it could not be read).
    pub previous_key: Option<String>,
    /// The key trusted since.
    pub new_key: String,
    /// The rotation statement's sequence number (none for the operator's trust step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// The statement's reason, or the operator's.
    pub reason: String,
    /// `rotation statement` or `trusted by the operator`.
    pub how: String,
}

/// The manifest key this agent trusts.
pub(super) struct TrustedKey {
    /// `sha256:<hex>` of the key.
    pub fingerprint: String,
    /// The key.
    pub key: VerifyingKey,
}

/// The manager's manifest verification key this agent trusts (from activation, or the last
/// key it moved to).
pub(super) fn trusted_key(dir: &Path) -> Result<TrustedKey> {
    let key_path = dir.join(MANIFEST_KEY_FILE);
    let pem = match std::fs::read(&key_path) {
        Ok(pem) => pem,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(UserError::failure(format!(
                "the manager's manifest key `{}` is missing: this agent cannot verify what the \
                 manager signs",
                key_path.display()
            ))
            .with_hint(
                "give it back with `pm-agent trust-key --fingerprint sha256:...` (the \
                 fingerprint `pm-mirror key export-public` prints on the manager), or reset and \
                 activate this agent again",
            )
            .into());
        }
        Err(err) => return Err(io_error("read", &key_path)(err)),
    };
    let (fingerprint, key) = crate::pki::parse_public_key(&pem, &key_path).map_err(|err| {
        anyhow::Error::from(UserError::failure(format!("{err}")).with_hint(format!(
            "run `pm-agent --state {} reset` and activate again",
            dir.display()
        )))
    })?;
    Ok(TrustedKey { fingerprint, key })
}

/// The fingerprint of the trusted manifest key, for status and the manager's poll (`None`
/// before activation or when it cannot be read).
pub(super) fn trusted_fingerprint(dir: &Path) -> Option<String> {
    trusted_key(dir).ok().map(|trusted| trusted.fingerprint)
}

/// Checks that `signature` over `body` (the document at `url`) is the manager's: made by the
/// trusted key, or by a key the manager's rotation chain leads to from it, which is then
/// recorded and trusted from now on (see the module).
pub(super) async fn verify_signed(
    client: &reqwest::Client,
    dir: &Path,
    url: &str,
    body: &[u8],
    signature: &[u8],
) -> Result<()> {
    let trusted = trusted_key(dir)?;
    if trusted.key.verify(body, signature) {
        return Ok(());
    }
    let chain_url = join_url(&activated_dist_url(dir)?, rotation::SERVED_FILE);
    let refused = |err: ChainError| chain_refused(&chain_url, &trusted.fingerprint, err);
    if let Some(bytes) = get_unless_missing(client, &chain_url, MAX_CHAIN_BYTES, true).await? {
        let chain = KeyChain::parse(&bytes).map_err(refused)?;
        let start = trusted_key(dir)?;
        let followed = rotation::follow(&chain, &start.fingerprint, start.key).map_err(refused)?;
        if let Some(pem) = &followed.pem
            && followed.key.verify(body, signature)
        {
            let changes: Vec<KeyChange> = followed
                .steps
                .iter()
                .map(|step| KeyChange {
                    changed_at: Utc::now(),
                    previous_key: Some(step.previous_key.clone()),
                    new_key: step.next_key.clone(),
                    sequence: Some(step.sequence),
                    reason: step.reason.clone(),
                    how: BY_STATEMENT.to_string(),
                })
                .collect();
            record(dir, &changes, pem.as_bytes())?;
            for change in &changes {
                tracing::info!(
                    old = change.previous_key.as_deref().unwrap_or("-"),
                    new = %change.new_key,
                    sequence = change.sequence.unwrap_or_default(),
                    reason = %change.reason,
                    "followed the manager's manifest key rotation: the old key is no longer trusted"
                );
            }
            return Ok(());
        }
    }
    Err(UserError::failure(format!(
        "refusing `{url}`: its signature does not verify with the manager's manifest key this \
         agent trusts ({}), nor with a key the manager's key chain leads to from it",
        trusted.fingerprint
    ))
    .with_hint(
        "if the manager's key was lost and replaced (`pm-mirror key rotate --old-key-lost`), \
         confirm the new key's fingerprint with the manager's operator (`pm-mirror key \
         export-public` shows it) and run `pm-agent trust-key --fingerprint sha256:HEX` on this \
         host, or re-activate it; otherwise the dist URL serves another manager's repository or \
         the file was altered: check the dist URL",
    )
    .into())
}

fn chain_refused(chain_url: &str, trusted: &str, err: ChainError) -> anyhow::Error {
    UserError::failure(format!(
        "refusing `{chain_url}`: the manager's key chain does not verify from the key this agent \
         trusts ({trusted}): {err}"
    ))
    .with_hint(
        "nothing was installed and this agent keeps its key; only the holder of the manager's \
         key can move its agents to another one, so check what answers for the dist URL; if the \
         manager's key was truly replaced, confirm the new fingerprint with its operator and run \
         `pm-agent trust-key --fingerprint sha256:HEX`",
    )
    .into()
}

/// Appends `changes` to the history, then makes `pem` the trusted key (by rename, 0644).
fn record(dir: &Path, changes: &[KeyChange], pem: &[u8]) -> Result<()> {
    let path = dir.join(HISTORY_FILE);
    let mut history: Vec<KeyChange> = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "`{}` is damaged: move it aside and run the command again",
                path.display()
            )
        })?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(io_error("read", &path)(err)),
    };
    history.extend_from_slice(changes);
    let mut bytes = serde_json::to_vec_pretty(&history)?;
    bytes.push(b'\n');
    durable::write_atomic(&path, &bytes, 0o644).map_err(io_error("write", &path))?;
    let key_path = dir.join(MANIFEST_KEY_FILE);
    durable::write_atomic(&key_path, pem, 0o644).map_err(io_error("write", &key_path))
}

/// `pm-agent trust-key`.
#[derive(Debug, clap::Args)]
pub struct TrustKeyArgs {
    /// Fingerprint of the manager's new manifest key, as `pm-mirror key rotate --old-key-lost`
    /// printed it (`pm-mirror key export-public` on the manager shows it)
    #[arg(long, value_parser = parse_key_fingerprint, value_name = "sha256:HEX")]
    pub fingerprint: String,
    /// Read the public key from FILE (`pm-mirror key export-public --out FILE`) instead of
    /// fetching it from the manager (`<dist URL>/manifest-key.pem`)
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Why, recorded in the history of this agent's key changes
    #[arg(
        long,
        value_name = "TEXT",
        default_value = "the manager's key was replaced"
    )]
    pub reason: String,
}

fn parse_key_fingerprint(text: &str) -> Result<String, String> {
    crate::tls::parse_fingerprint(text).map_err(|_| {
        format!(
            "`{text}` is not a key fingerprint: give sha256:<64 hex digits>, as `pm-mirror key \
             export-public` shows it on the manager"
        )
    })
}

/// What `trust-key` did; its `--json` document.
#[derive(Debug, Serialize)]
pub struct TrustKeyReport {
    /// Whether the trusted key changed (false: it was trusted already).
    pub changed: bool,
    /// The key trusted before.
    pub previous_key: Option<String>,
    /// The key trusted now.
    pub new_key: String,
    /// Where the key came from: the file, or the manager's URL.
    pub source: String,
    /// The dist manifest that verified with it.
    pub verified: String,
    /// The history file.
    pub history: PathBuf,
}

/// `pm-agent trust-key --fingerprint sha256:HEX [--key FILE]`: trusts the manager's new
/// manifest key after its old one was lost. The key is taken only when its fingerprint is the
/// one the operator confirmed and the manager's current dist manifest verifies with it.
pub fn trust_key_command(dir: &Path, args: &TrustKeyArgs, json: bool) -> Result<ExitStatus> {
    // A key file given is bad input when it is not a key: refused before anything else.
    let given = match &args.key {
        Some(path) => {
            let not_a_key = |problem: String| {
                UserError::usage(problem).with_hint(
                    "give the file `pm-mirror key export-public --out FILE` wrote on the manager",
                )
            };
            let pem = std::fs::read(path)
                .map_err(|err| not_a_key(format!("cannot read `{}`: {err}", path.display())))?;
            let (fingerprint, key) = crate::pki::parse_public_key(&pem, path)
                .map_err(|err| not_a_key(err.to_string()))?;
            Some((path.display().to_string(), fingerprint, key))
        }
        None => None,
    };
    let dist_url = activated_dist_url(dir)?;
    let _lock = lock(dir)?;
    let previous = trusted_fingerprint(dir);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = super::install::http_client()?;
    let (source, fingerprint, key) = match given {
        Some(given) => given,
        None => {
            let url = join_url(&dist_url, rotation::SERVED_PUBLIC_KEY);
            let pem = runtime.block_on(get(&client, &url, MAX_KEY_BYTES))?;
            let (fingerprint, key) = crate::pki::parse_public_key(&pem, Path::new(&url))
                .map_err(|err| UserError::failure(err.to_string()))?;
            (url, fingerprint, key)
        }
    };
    if fingerprint != args.fingerprint {
        return Err(UserError::failure(format!(
            "the key at `{source}` is {fingerprint}, not the {} you gave: refusing it",
            args.fingerprint
        ))
        .with_hint(
            "nothing was changed; compare with what `pm-mirror key export-public` shows on the \
             manager; if that is the fingerprint you gave, something else answers for the \
             manager: copy the key file over and give it with `--key FILE`",
        )
        .into());
    }
    let manifest_url = join_url(&dist_url, MANIFEST_FILE);
    let (manifest, signature) = runtime.block_on(async {
        let manifest = get(&client, &manifest_url, MAX_DOCUMENT as u64).await?;
        let signature = get(&client, &join_url(&dist_url, SIGNATURE_FILE), 4096).await?;
        anyhow::Ok((manifest, signature))
    })?;
    if !key.verify(&manifest, &signature) {
        return Err(UserError::failure(format!(
            "the manager's dist manifest `{manifest_url}` does not verify with {fingerprint}: \
             refusing to trust it"
        ))
        .with_hint(
            "nothing was changed; this key does not sign the manager's dist now: give the \
             fingerprint `pm-mirror key export-public` shows on the manager today (a rotation \
             since `--old-key-lost` replaced the key it printed), and check with `pm-doctor` \
             there that the rotation finished",
        )
        .into());
    }
    let changed = previous.as_deref() != Some(fingerprint.as_str());
    if changed {
        let change = KeyChange {
            changed_at: Utc::now(),
            previous_key: previous.clone(),
            new_key: fingerprint.clone(),
            sequence: None,
            reason: args.reason.clone(),
            how: BY_OPERATOR.to_string(),
        };
        // Stored as the key alone: comments or further blocks of the file given stay behind.
        record(dir, std::slice::from_ref(&change), &key.to_pem()?)?;
        tracing::info!(
            old = previous.as_deref().unwrap_or("-"),
            new = %fingerprint,
            reason = %args.reason,
            "the operator made this agent trust the manager's new manifest key"
        );
    }
    let report = TrustKeyReport {
        changed,
        previous_key: previous,
        new_key: fingerprint,
        source,
        verified: manifest_url,
        history: dir.join(HISTORY_FILE),
    };
    if json {
        crate::cli::print_json(&report)?;
    } else if changed {
        crate::cli::print_text(format!(
            "trusted the manager's manifest key {} (from `{}`; dist's manifest verifies with \
             it); it replaces {}; recorded in `{}`",
            report.new_key,
            report.source,
            report
                .previous_key
                .as_deref()
                .unwrap_or("an unreadable key"),
            report.history.display()
        ))?;
    } else {
        crate::cli::print_text(format!(
            "this agent trusts {} already; nothing changed",
            report.new_key
        ))?;
    }
    Ok(ExitStatus::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_sha256_and_64_hex_digits_in_any_case() {
        let print = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            parse_key_fingerprint(&print.to_uppercase()),
            Ok(print.clone())
        );
        assert_eq!(parse_key_fingerprint(&"ab".repeat(32)), Ok(print));
        for bad in ["", "abc", "sha256:", "md5:00"] {
            let problem = parse_key_fingerprint(bad).unwrap_err();
            assert!(
                problem.contains("is not a key fingerprint"),
                "{bad}: {problem}"
            );
        }
    }
}
